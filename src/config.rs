//! `shardpay serve --config FILE`: the serve options from a TOML file.
//!
//! Every key of the file is the long name of a `serve` option, with `_` or
//! `-` between words (`data_dir = "data"`, `mysql_urls = ["mysql://…", …]`).
//! A value given on the command line wins over the environment
//! (`SHARDPAY_…`), which wins over the file, which wins over the default.
//! The file is checked before anything starts: an unknown key, or a value
//! the option would refuse, is an error that names the file and the key.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::Context;

/// The option that names the file, and its environment variable.
pub const OPTION: &str = "config";
pub const ENV: &str = "SHARDPAY_CONFIG";

/// Options that cannot come from the file.
const NOT_IN_FILE: &[&str] = &["config", "help", "version", "log-format"];

/// Finds `--config FILE` (or `SHARDPAY_CONFIG`) for the `serve` command in
/// `argv` and loads that file into the environment, where clap reads it as
/// the options' environment values. Does nothing for other commands.
pub fn load_for_serve(command: &clap::Command, argv: &[OsString]) -> anyhow::Result<()> {
    let args: Vec<String> = argv
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    if subcommand(&args) != Some("serve") {
        return Ok(());
    }
    let path = config_path(&args).or_else(|| std::env::var_os(ENV).map(PathBuf::from));
    let Some(path) = path else {
        return Ok(());
    };
    let serve = command
        .find_subcommand("serve")
        .expect("the serve command exists");
    let settings = read(serve, &path)?;
    for (env, value) in settings {
        if std::env::var_os(&env).is_none() {
            std::env::set_var(env, value);
        }
    }
    Ok(())
}

/// The first word that is not an option (nor the value of the global
/// `--log-format`).
fn subcommand(args: &[String]) -> Option<&str> {
    let mut words = args.iter().skip(1);
    while let Some(word) = words.next() {
        if word == "--log-format" {
            words.next();
        } else if !word.starts_with('-') {
            return Some(word);
        }
    }
    None
}

fn config_path(args: &[String]) -> Option<PathBuf> {
    let flag = format!("--{OPTION}");
    let prefix = format!("--{OPTION}=");
    args.iter().enumerate().find_map(|(i, a)| {
        if let Some(rest) = a.strip_prefix(&prefix) {
            Some(PathBuf::from(rest))
        } else if *a == flag {
            args.get(i + 1).map(PathBuf::from)
        } else {
            None
        }
    })
}

/// The file's settings as (environment variable, value) pairs, each checked
/// by the option it sets.
pub fn read(serve: &clap::Command, path: &Path) -> anyhow::Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "cannot read the config file {}; check the path given to --config or {ENV}",
            path.display()
        )
    })?;
    let table: toml::Table = toml::from_str(&text)
        .map_err(|e| anyhow::anyhow!("config file {}: {e}", path.display()))?;
    let mut settings = Vec::new();
    for (key, value) in &table {
        let long = key.replace('_', "-");
        let arg = find(serve, &long)
            .filter(|_| !NOT_IN_FILE.contains(&long.as_str()))
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "config file {}: unknown key `{key}`. Known keys: {}",
                    path.display(),
                    keys(serve).join(", ")
                )
            })?;
        let env = arg
            .get_env()
            .map(|e| e.to_string_lossy().into_owned())
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "config file {}: `{key}` can only be given on the command line",
                    path.display()
                )
            })?;
        let text = match value {
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            toml::Value::Array(items) => items
                .iter()
                .map(|item| match item {
                    toml::Value::String(s) => Ok(s.clone()),
                    toml::Value::Integer(i) => Ok(i.to_string()),
                    _ => Err(anyhow::anyhow!(
                        "config file {}: `{key}` takes a list of strings",
                        path.display()
                    )),
                })
                .collect::<anyhow::Result<Vec<_>>>()?
                .join(","),
            other => anyhow::bail!(
                "config file {}: `{key}` = {other} is not a string, number, boolean or list",
                path.display()
            ),
        };
        check(serve, &long, &text)
            .map_err(|e| anyhow::anyhow!("config file {}: `{key}`: {e}", path.display()))?;
        settings.push((env, text));
    }
    Ok(settings)
}

/// Runs the option's own parser on the value, so a bad value is refused
/// with the option's message and the file's name.
fn check(serve: &clap::Command, long: &str, value: &str) -> anyhow::Result<()> {
    let arg = find(serve, long).expect("looked up before");
    let takes_value = arg.get_num_args().map(|n| n.takes_values()).unwrap_or(true)
        && !matches!(
            arg.get_action(),
            clap::ArgAction::SetTrue | clap::ArgAction::SetFalse
        );
    if !takes_value {
        return match value {
            "true" | "false" => Ok(()),
            _ => anyhow::bail!("takes true or false, not {value:?}"),
        };
    }
    let probe = clap::Command::new("check")
        .no_binary_name(true)
        .arg(arg.clone().env(None::<&str>).required(false));
    let word = if arg.is_positional() {
        value.to_string()
    } else {
        format!("--{long}={value}")
    };
    probe.try_get_matches_from([word]).map(|_| ()).map_err(|e| {
        let text = e.render().to_string();
        let first = text
            .lines()
            .next()
            .unwrap_or("")
            .trim_start_matches("error: ");
        anyhow::anyhow!("{first}")
    })
}

/// The option a key names: a long option, or a positional by its name.
fn find<'c>(serve: &'c clap::Command, long: &str) -> Option<&'c clap::Arg> {
    serve.get_arguments().find(|a| match a.get_long() {
        Some(l) => l == long,
        None => a.is_positional() && a.get_id().as_str() == long,
    })
}

/// The long name of an option, or a positional's name.
fn name_of(arg: &clap::Arg) -> Option<String> {
    match arg.get_long() {
        Some(l) => Some(l.to_string()),
        None if arg.is_positional() => Some(arg.get_id().as_str().to_string()),
        None => None,
    }
}

/// Every key a config file may hold.
pub fn keys(serve: &clap::Command) -> Vec<String> {
    serve
        .get_arguments()
        .filter(|a| a.get_env().is_some())
        .filter_map(name_of)
        .filter(|l| !NOT_IN_FILE.contains(&l.as_str()))
        .map(|l| l.replace('-', "_"))
        .collect()
}

/// The reference table of the keys: key, environment variable, default and
/// what it does. docs/configuration.md holds it; a test keeps them equal.
#[cfg(test)]
pub fn reference(serve: &clap::Command) -> String {
    let mut out = String::from(
        "| Key | Environment variable | Default | What it sets |\n|---|---|---|---|\n",
    );
    for arg in serve.get_arguments() {
        let Some(long) = name_of(arg) else { continue };
        if NOT_IN_FILE.contains(&long.as_str()) || arg.get_env().is_none() {
            continue;
        }
        let env = arg
            .get_env()
            .map(|e| format!("`{}`", e.to_string_lossy()))
            .unwrap_or_default();
        let defaults: Vec<String> = arg
            .get_default_values()
            .iter()
            .map(|v| v.to_string_lossy().into_owned())
            .collect();
        let default = if defaults.is_empty() {
            match arg.get_action() {
                clap::ArgAction::SetTrue => "`false`".to_string(),
                _ => "(none)".to_string(),
            }
        } else if defaults.iter().all(|d| d.is_empty()) {
            "(empty)".to_string()
        } else {
            format!("`{}`", defaults.join(","))
        };
        let help = arg
            .get_help()
            .map(|h| h.to_string().replace('\n', " ").replace('|', "\\|"))
            .unwrap_or_default();
        out.push_str(&format!(
            "| `{}` | {env} | {default} | {help} |\n",
            long.replace('-', "_")
        ));
    }
    out
}
