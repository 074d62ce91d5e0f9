//! A MySQL shard server killed (SIGKILL, by its pid) in the middle of
//! cross-shard traffic and started again: every pending transfer ends, each
//! client retry with its key gets a final answer, and the audit passes.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;

use super::{get, post, serve_with, Storage};

fn shards_script(dir: &Path, base_port: u16, args: &[&str]) -> std::process::Output {
    Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/shards.sh"))
        .args(args)
        .env("SHARDPAY_SHARDS_DIR", dir)
        .env("SHARDPAY_SHARDS_BASE_PORT", base_port.to_string())
        .output()
        .expect("run scripts/shards.sh")
}

/// Two free ports in a row, below the kernel's ephemeral range: a port in
/// that range can be handed to an outgoing connection (even the pool's own
/// reconnect attempt to the dead server, which then connects to itself)
/// while the shard is down, and the restarted server could not bind it.
fn free_port_pair() -> u16 {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (start, end) = (
        low.saturating_sub(12_000).max(10_000),
        low.saturating_sub(2),
    );
    // Tests in one process run at once: start each one somewhere else.
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u16;
    (0..end - start)
        .map(|i| start + (seed.wrapping_mul(7).wrapping_add(i * 2)) % (end - start))
        .find(|&p| {
            std::net::TcpListener::bind(("127.0.0.1", p)).is_ok()
                && std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok()
        })
        .expect("no two free ports below the ephemeral range")
}

fn server_installed() -> bool {
    [
        "/usr/sbin/mariadbd",
        "/usr/sbin/mysqld",
        "/usr/bin/mariadbd",
    ]
    .iter()
    .any(|p| Path::new(p).exists())
}

#[test]
fn a_shard_server_killed_mid_run_loses_no_transfer() {
    shard_killed_mid_run("saga");
}

/// Under XA the branches prepared on the killed server survive its
/// restart, and recovery commits or rolls them back as the payer's shard
/// decided.
#[test]
fn with_xa_a_shard_server_killed_mid_run_loses_no_transfer() {
    shard_killed_mid_run("xa");
}

/// The two kill tests run one after the other: each starts, kills and
/// restarts server processes, and two of those at once on 2 cpus only
/// make each slower and noisier.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// This test's turn and a directory for its shard servers (open to the
/// mysql user the server runs as under root), or `None` (skipped) when no
/// server is installed, unless `SHARDPAY_REQUIRE_MYSQL=1` makes that a
/// failure.
fn shard_servers_dir() -> Option<(std::sync::MutexGuard<'static, ()>, tempfile::TempDir)> {
    let turn = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if !server_installed() {
        assert!(
            std::env::var("SHARDPAY_REQUIRE_MYSQL").as_deref() != Ok("1"),
            "SHARDPAY_REQUIRE_MYSQL=1 but no MariaDB/MySQL server is installed"
        );
        eprintln!("skipped: no MariaDB/MySQL server installed");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    Command::new("chmod")
        .arg("755")
        .arg(dir.path())
        .status()
        .unwrap();
    Some((turn, dir))
}

fn shard_killed_mid_run(protocol: &str) {
    let Some((_turn, dir)) = shard_servers_dir() else {
        return;
    };
    let base_port = free_port_pair();
    let up = shards_script(dir.path(), base_port, &["up", "2"]);
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    let stdout = String::from_utf8_lossy(&up.stdout).to_string();
    let urls: Vec<String> = stdout
        .lines()
        .last()
        .unwrap()
        .split(',')
        .map(String::from)
        .collect();
    assert_eq!(urls.len(), 2, "{stdout}");
    let stop = scopeguard(dir.path().to_path_buf(), base_port);

    // A dead shard answers 503 after 300 ms instead of the default 2 s.
    let server = serve_with(
        Storage::Mysql(&urls),
        None,
        &[
            "--mysql-acquire-timeout-ms",
            "300",
            "--cross-shard",
            protocol,
        ],
    );
    let ring = shardpay_reference::sharding::Ring::new(2).unwrap();
    let payers: Vec<String> = (0..)
        .map(|i| format!("kp{i}"))
        .filter(|id| ring.shard_of_key(id).index() == 0)
        .take(4)
        .collect();
    let payees: Vec<String> = (0..)
        .map(|i| format!("kq{i}"))
        .filter(|id| ring.shard_of_key(id).index() == 1)
        .take(4)
        .collect();
    for id in payers.iter().chain(&payees) {
        let (status, body) = post(
            &format!("{}/v1/accounts", server.url),
            json!({"id": id, "opening_balance": "1000.00"}),
            &format!("open-{id}"),
        )
        .unwrap();
        assert_eq!(status, 201, "{body}");
    }

    // Cross-shard transfers from shard 0 to shard 1 from 6 clients at once;
    // shard 1's server is killed while they run and started again.
    let pid_file = dir.path().join("shard-1/server.pid");
    let url = format!("{}/v1/transfers", server.url);
    let total = 240;
    let clients = 6;
    let body_of = |n: usize| {
        json!({
            "from": payers[n % 4],
            "to": payees[(n / 4) % 4],
            "amount_minor": 100 + n as i64,
        })
    };
    let answers = std::sync::Mutex::new(Vec::new());
    let sent = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for c in 0..clients {
            let (url, answers, sent, body_of) = (&url, &answers, &sent, &body_of);
            scope.spawn(move || {
                for n in (c..total).step_by(clients) {
                    let status = post(url, body_of(n), &format!("kill-{n}"))
                        .map(|(s, _)| s)
                        .unwrap_or(0);
                    answers.lock().unwrap().push(status);
                    sent.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            });
        }
        while sent.load(std::sync::atomic::Ordering::SeqCst) < total / 3 {
            std::thread::sleep(Duration::from_millis(5));
        }
        let pid = std::fs::read_to_string(&pid_file).unwrap();
        assert!(Command::new("kill")
            .args(["-9", pid.trim()])
            .status()
            .unwrap()
            .success());
        // SIGKILL is not instant (the server's io_uring is torn down first),
        // and a restart while the old process lingers would find it
        // "already running".
        let gone = Instant::now() + Duration::from_secs(30);
        while !process_gone(pid.trim()) {
            assert!(
                Instant::now() < gone,
                "shard 1 (pid {pid}) outlived SIGKILL by 30 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        while sent.load(std::sync::atomic::Ordering::SeqCst) < total / 2 {
            std::thread::sleep(Duration::from_millis(5));
        }
        let up = shards_script(dir.path(), base_port, &["up", "2"]);
        let said = String::from_utf8_lossy(&up.stdout);
        assert!(
            up.status.success() && said.contains("shard 1: started"),
            "shard 1 was not restarted: {said}{}",
            String::from_utf8_lossy(&up.stderr)
        );
    });
    let answers = answers.into_inner().unwrap();
    let outage = answers
        .iter()
        .filter(|s| matches!(**s, 0 | 202 | 503))
        .count();
    let pending = answers.iter().filter(|s| **s == 202).count();
    eprintln!("{protocol}: {outage} answers during the outage, {pending} of them pending (202)");
    if protocol == "xa" {
        assert_eq!(pending, 0, "an XA transfer is never left pending");
    }
    assert!(outage > 0, "the kill went unnoticed: {answers:?}");

    // Every transfer reaches an end: a retry with its key gets its answer
    // (a replayed 202 stays 202, as the first answer was), and the transfer
    // itself, looked up by id, finishes.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut moved = 0i64;
    for n in 0..total {
        let id = loop {
            let (status, answer) = post(&url, body_of(n), &format!("kill-{n}")).unwrap();
            if matches!(status, 201 | 202) {
                break answer["id"].as_str().unwrap().to_string();
            }
            assert!(
                matches!(status, 409 | 503),
                "transfer {n}: unexpected {status} {answer}"
            );
            if Instant::now() > deadline {
                explain(dir.path(), base_port);
                panic!("transfer {n} got no answer: {status} {answer}");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        loop {
            let t = get(&format!("{}/v1/transfers/{id}", server.url));
            if t["state"] == "completed" {
                moved += 100 + n as i64;
                break;
            }
            assert_eq!(t["state"], "pending", "transfer {n}: {t}");
            if Instant::now() > deadline {
                explain(dir.path(), base_port);
                panic!("transfer {n} stayed pending: {t}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let shards = get(&format!("{}/v1/shards", server.url));
    for shard in shards["shards"].as_array().unwrap() {
        assert_eq!(shard["transfers"]["pending"], 0, "{shards}");
    }
    let received: i64 = payees
        .iter()
        .map(|id| {
            get(&format!("{}/v1/accounts/{id}", server.url))["balance_minor"]
                .as_i64()
                .unwrap()
                - 1000_00
        })
        .sum();
    assert_eq!(received, moved, "every completed transfer credited once");
    let audit = get(&format!("{}/v1/audit", server.url));
    assert_eq!(audit["ok"], true, "{audit:#}");
    drop(server);
    drop(stop);
}

/// What the shard servers were doing, for a failure message.
fn explain(dir: &Path, base_port: u16) {
    let status = shards_script(dir, base_port, &["status"]);
    eprintln!("{}", String::from_utf8_lossy(&status.stdout));
    let log = std::fs::read_to_string(dir.join("shard-1/error.log")).unwrap_or_default();
    let tail: Vec<&str> = log.lines().rev().take(30).collect();
    for line in tail.into_iter().rev() {
        eprintln!("shard-1/error.log: {line}");
    }
}

/// Whether a process has exited (a zombie waiting to be reaped counts).
fn process_gone(pid: &str) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X')),
    }
}

/// Stops the test's shard servers however the test ends.
struct StopShards(std::path::PathBuf, u16);

impl Drop for StopShards {
    fn drop(&mut self) {
        let _ = shards_script(&self.0, self.1, &["down"]);
    }
}

fn scopeguard(dir: std::path::PathBuf, port: u16) -> StopShards {
    StopShards(dir, port)
}

/// A scenario's shard faults, as `shardpay run` applies them to the MySQL
/// shard servers it starts itself: shard 1's server SIGKILLed and started
/// again, shard 0's paused (SIGSTOP, SIGCONT) under load; each fault hits
/// and heals, the audit after each passes, and so do the books.
#[test]
fn a_scenario_kills_and_pauses_shard_servers_and_every_check_passes() {
    let Some((_turn, dir)) = shard_servers_dir() else {
        return;
    };
    let base_port = free_port_pair();
    let _stop = scopeguard(dir.path().to_path_buf(), base_port);
    let scenario = dir.path().join("shard-faults.toml");
    std::fs::write(
        &scenario,
        r#"
name = "shard-faults"
seed = 2
duration_s = 16
warmup_s = 1

[accounts]
count = 300
opening_balance = "100000.00"

[load]
model = "closed"
users = 8

[mix]
same_shard = 50
cross_shard = 50

[[faults]]
name = "kill-1"
action = "kill"
target = "shard-1"
at_s = 3
for_s = 1.5

[[faults]]
name = "pause-0"
action = "pause"
target = "shard-0"
at_s = 10
for_s = 1

[thresholds]
error_rate = 0.0
"#,
    )
    .unwrap();
    let reports = dir.path().join("reports");
    let out = Command::new(env!("CARGO_BIN_EXE_shardpay"))
        .args(["run", "--quiet", "--backend", "mysql", "--shards", "2"])
        .arg(&scenario)
        .arg("--reports")
        .arg(&reports)
        .env("SHARDPAY_SHARDS_DIR", dir.path())
        .env("SHARDPAY_SHARDS_BASE_PORT", base_port.to_string())
        .env(
            "SHARDPAY_SHARDS_SCRIPT",
            concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/shards.sh"),
        )
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let report = super::only_report(&reports);
    let faults = report["faults"]["faults"]
        .as_array()
        .expect("a faults report");
    assert_eq!(faults.len(), 2, "{}", report["faults"]);
    for f in faults {
        let (hit, healed) = (f["hit_s"].as_f64(), f["healed_s"].as_f64());
        assert!(hit.is_some() && healed.is_some(), "{f}");
        assert!(
            healed.unwrap() - hit.unwrap() >= 1.0,
            "down for its for_s: {f}"
        );
        assert_eq!(f["audit_ok"], true, "{f}");
    }
    assert_eq!(faults[0]["target"], "shard-1");
    assert_eq!(report["audit"]["ok"], true, "{}", report["audit"]);
    assert_eq!(report["accounting"]["ok"], true, "{}", report["accounting"]);
    assert_eq!(report["failures"], json!([]), "{stdout}");
    assert!(out.status.success(), "{stdout}");
}
