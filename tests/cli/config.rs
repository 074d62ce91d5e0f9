//! `shardpay serve --config FILE`: the file's values start the server where
//! neither the command line nor the environment gives them, and a file the
//! server would refuse stops it before anything starts, naming the file and
//! the key.

use std::path::Path;
use std::process::{Command, Stdio};

use super::{get, start};

/// `shardpay serve ARGS` in the environment `env`, without the serve
/// options the tests' own environment may hold.
fn serve_command(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_shardpay"));
    command
        .arg("serve")
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    for var in [
        "SHARDPAY_CONFIG",
        "SHARDPAY_SHARDS",
        "SHARDPAY_PORT",
        "SHARDPAY_DATA_DIR",
        "SHARDPAY_DEMO",
    ] {
        command.env_remove(var);
    }
    command.envs(env.iter().copied());
    command
}

/// A config file for a demo server on a free port, with shard files in
/// `data_dir`, and `more` after that.
fn write_config(path: &Path, data_dir: &Path, more: &str) {
    let text = format!("demo = true\nport = 0\ndata_dir = {data_dir:?}\n{more}");
    std::fs::write(path, text).unwrap();
}

#[test]
fn the_command_line_wins_over_the_environment_which_wins_over_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("serve.toml");
    let config = file.to_str().unwrap();
    let shards_served = |data_dir: &str, args: &[&str], env: &[(&str, &str)]| {
        write_config(&file, &dir.path().join(data_dir), "shards = 3\n");
        let server = start(serve_command(args, env));
        get(&format!("{}/v1/audit", server.url))["shards"].as_u64()
    };
    assert_eq!(shards_served("file", &["--config", config], &[]), Some(3));
    let env = [("SHARDPAY_SHARDS", "2")];
    assert_eq!(shards_served("env", &["--config", config], &env), Some(2));
    let env = [("SHARDPAY_SHARDS", "2"), ("SHARDPAY_CONFIG", config)];
    assert_eq!(
        shards_served("command-line", &["--shards", "5"], &env),
        Some(5)
    );
}

#[test]
fn a_config_file_the_server_would_refuse_stops_it_before_it_starts() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("serve.toml");
    let data_dir = dir.path().join("data");
    for (more, says) in [
        ("shards = \"many\"\n", "`shards`"),
        ("shard = 4\n", "unknown key `shard`"),
        ("jwt_secret = 42\n", "`jwt_secret`"),
    ] {
        write_config(&file, &data_dir, more);
        let out = serve_command(&["--config", file.to_str().unwrap()], &[])
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains("config file")
                && stderr.contains("serve.toml")
                && stderr.contains(says),
            "{more:?}: {stderr}"
        );
        assert!(!data_dir.exists(), "{more:?}: the server started");
    }
}
