//! Link and Redis faults, as users run them: the run puts a TCP proxy in
//! front of a MySQL shard's server or Redis and cuts, slows or breaks the
//! system's connections through it, or kills the Redis it started and
//! starts it again empty; each fault is reported, the audit after each
//! heal and the books pass.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

use super::only_report;

const BASE: &str = r#"
name = "links-short"
seed = 12
duration_s = 16
warmup_s = 1

[accounts]
count = 300
opening_balance = "100000.00"

[load]
model = "closed"
users = 8

[mix]
same_shard = 40
cross_shard = 45
idempotent_retry = 15

[thresholds]
error_rate = 0.0
"#;

/// Runs the scenario with `faults`. Each run starts servers and several
/// processes: one at a time, and not beside the six-process tests, on 2
/// cpus.
fn run(dir: &Path, faults: &str, args: &[&str]) -> (std::process::ExitStatus, Value, String) {
    let _turn = super::six::one_stack_at_a_time();
    let scenario = dir.join("links.toml");
    std::fs::write(&scenario, format!("{BASE}{faults}")).unwrap();
    let reports = dir.join("reports");
    let out = Command::new(env!("CARGO_BIN_EXE_shardpay"))
        .args(["run", "--quiet"])
        .args(args)
        .arg(&scenario)
        .arg("--reports")
        .arg(&reports)
        .env_remove("SHARDPAY_FAULT")
        .env_remove("SHARDPAY_REDIS_URL")
        .env_remove("SHARDPAY_KAFKA_BOOTSTRAP")
        .env(
            "SHARDPAY_KAFKA_SCRIPT",
            concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/kafka.sh"),
        )
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    (out.status, only_report(&reports), stdout)
}

/// The worst p99 of the seconds from `from_s` to `to_s` of the run (the
/// timeline's slot n is second n from the start).
fn worst_p99_ms(report: &Value, from_s: f64, to_s: f64) -> f64 {
    let p99 = report["timeline"]["p99_ms"].as_array().expect("a timeline");
    p99.iter()
        .enumerate()
        .filter(|(n, _)| (*n as f64) >= from_s && (*n as f64) <= to_s)
        .filter_map(|(_, p)| p.as_f64())
        .fold(0.0, f64::max)
}

/// Whether a cut between `hit_s` and `healed_s` held requests up: a whole
/// second inside it completed under a quarter of the run's median second, or
/// a second around it has a p99 of a second or more. The held requests
/// finish in the second the link heals, among hundreds of fast ones, so
/// that second's p99 alone may miss them.
fn held_up(report: &Value, hit_s: f64, healed_s: f64) -> bool {
    let requests: Vec<u64> = report["timeline"]["requests"]
        .as_array()
        .expect("a timeline")
        .iter()
        .filter_map(Value::as_u64)
        .collect();
    let mut sorted = requests.clone();
    sorted.sort_unstable();
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or(0);
    let starved = (hit_s.ceil() as usize..healed_s.floor() as usize)
        .filter_map(|n| requests.get(n))
        .any(|&r| r * 4 < median);
    starved || worst_p99_ms(report, hit_s.floor(), healed_s.ceil()) >= 1000.0
}

fn every_fault_hit_healed_and_audited(report: &Value, count: usize) -> Vec<Value> {
    let faults = report["faults"]["faults"]
        .as_array()
        .expect("a faults report")
        .clone();
    assert_eq!(faults.len(), count, "{}", report["faults"]);
    for f in &faults {
        assert!(f["hit_s"].as_f64().is_some(), "{f}");
        assert!(f["healed_s"].as_f64().is_some(), "{f}");
        assert_eq!(f["audit_ok"], true, "{f}");
    }
    faults
}

#[test]
fn on_mysql_shards_a_link_cut_slowed_and_made_flaky_loses_nothing() {
    let Some(urls) = super::mysql_databases() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let faults = r#"
[[faults]]
name = "cut"
action = "partition"
target = "shard-1"
at_s = 3
for_s = 2

[[faults]]
name = "slow"
action = "slow"
target = "shard-0"
at_s = 7
for_s = 2
delay_ms = 300

[[faults]]
name = "flaky"
action = "flaky"
target = "shard-1"
at_s = 11
for_s = 2
share = 0.5
"#;
    let (status, report, stdout) = run(
        dir.path(),
        faults,
        &["--backend", "mysql", "--mysql-urls", &urls.join(",")],
    );
    let faults = every_fault_hit_healed_and_audited(&report, 3);
    assert_eq!(faults[0]["action"], "partition");
    assert_eq!(faults[1]["target"], "shard-0");
    // A cut link holds requests for the cut's length; a slow one adds its
    // delay to every round trip: both show in the p99 of their seconds.
    let (hit, healed) = (
        faults[0]["hit_s"].as_f64().unwrap(),
        faults[0]["healed_s"].as_f64().unwrap(),
    );
    assert!(
        held_up(&report, hit, healed),
        "the partition held nothing up: requests per second {}, p99 {}",
        report["timeline"]["requests"],
        report["timeline"]["p99_ms"]
    );
    let (hit, healed) = (
        faults[1]["hit_s"].as_f64().unwrap(),
        faults[1]["healed_s"].as_f64().unwrap(),
    );
    assert!(
        worst_p99_ms(&report, hit.floor(), healed.ceil()) >= 300.0,
        "the slow link added no delay: {}",
        report["timeline"]["p99_ms"]
    );
    assert_eq!(report["audit"]["ok"], true, "{}", report["audit"]);
    assert_eq!(report["accounting"]["ok"], true, "{}", report["accounting"]);
    assert_eq!(report["failures"], serde_json::json!([]), "{stdout}");
    assert!(status.success(), "{stdout}");
}

fn redis_server_installed() -> bool {
    let found = Command::new("redis-server")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var("SHARDPAY_REQUIRE_REDIS").as_deref() != Ok("1"),
            "SHARDPAY_REQUIRE_REDIS=1 but redis-server is not installed"
        );
        eprintln!("skipped: redis-server is not installed");
    }
    found
}

#[test]
fn redis_slowed_then_killed_and_restarted_empty_loses_nothing() {
    if !redis_server_installed() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let faults = r#"
[[faults]]
name = "slow-redis"
action = "slow"
target = "redis"
at_s = 3
for_s = 2
delay_ms = 250

[[faults]]
name = "redis-down"
action = "redis_down"
at_s = 8
for_s = 1.5
"#;
    let (status, report, stdout) = run(dir.path(), faults, &[]);
    let faults = every_fault_hit_healed_and_audited(&report, 2);
    assert_eq!(faults[1]["target"], "redis");
    let (hit, healed) = (
        faults[0]["hit_s"].as_f64().unwrap(),
        faults[0]["healed_s"].as_f64().unwrap(),
    );
    assert!(
        worst_p99_ms(&report, hit.floor(), healed.ceil()) >= 250.0,
        "the slow link to Redis added no delay: {}",
        report["timeline"]["p99_ms"]
    );
    // Transfers go on after Redis came back empty: the run logged in again.
    assert!(
        faults[1]["first_accepted_after_s"].as_f64().is_some(),
        "{}",
        faults[1]
    );
    assert_eq!(report["audit"]["ok"], true, "{}", report["audit"]);
    assert_eq!(report["accounting"]["ok"], true, "{}", report["accounting"]);
    assert_eq!(report["failures"], serde_json::json!([]), "{stdout}");
    assert!(status.success(), "{stdout}");
}

/// The six services as six processes the run starts (`--six-processes`),
/// on MySQL shards, and a broker and a Redis the run starts itself: the
/// notification service and the shard manager are SIGKILLed and started
/// again, then Redis is killed and started empty. Found by this test: the
/// shard manager's own session with the fraud service died with Redis and
/// was never opened again, so every transfer after it failed.
#[test]
fn six_processes_a_service_crashed_and_redis_restarted_empty_lose_nothing() {
    let Some(urls) = super::mysql_databases() else {
        return;
    };
    // The run starts its own broker (scripts/kafka.sh, which the Kafka
    // tests' setting says is here) and Redis.
    if super::six::server(
        "SHARDPAY_TEST_KAFKA_BOOTSTRAP",
        "SHARDPAY_REQUIRE_KAFKA",
        "scripts/kafka.sh up",
    )
    .is_none()
    {
        return;
    }
    if !redis_server_installed() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let faults = r#"
[[faults]]
name = "notification"
action = "crash"
target = "notification"
at_s = 3
for_s = 0.5

[[faults]]
name = "manager"
action = "crash"
target = "shard-manager"
at_s = 7
for_s = 0.5

[[faults]]
name = "redis-down"
action = "redis_down"
at_s = 11
for_s = 1
"#;
    let (status, report, stdout) = run(
        dir.path(),
        faults,
        &[
            "--six-processes",
            "--backend",
            "mysql",
            "--mysql-urls",
            &urls.join(","),
        ],
    );
    let faults = every_fault_hit_healed_and_audited(&report, 3);
    assert_eq!(faults[0]["target"], "notification");
    assert_eq!(faults[1]["target"], "shard-manager");
    for f in &faults {
        assert!(f["first_accepted_after_s"].as_f64().is_some(), "{f}");
    }
    assert_eq!(report["run"]["backend"], "mysql");
    // The pipeline is read (and complete) after Redis lost every session.
    assert_eq!(
        report["pipeline"]["complete"], true,
        "{}",
        report["pipeline"]
    );
    assert_eq!(report["audit"]["ok"], true, "{}", report["audit"]);
    assert_eq!(report["accounting"]["ok"], true, "{}", report["accounting"]);
    assert_eq!(report["failures"], serde_json::json!([]), "{stdout}");
    assert!(status.success(), "{stdout}");
}

/// The one-process system on a broker the run starts itself, advertising
/// the run's proxy: the link is cut for 2 s, then slowed. Transfers go on
/// (the outbox holds the events); the events wait, and arrive once each.
#[test]
fn a_link_to_the_broker_cut_then_slowed_loses_no_event() {
    // The broker the run starts is the one scripts/kafka.sh installs, which
    // the Kafka tests' setting says is here.
    if super::six::server(
        "SHARDPAY_TEST_KAFKA_BOOTSTRAP",
        "SHARDPAY_REQUIRE_KAFKA",
        "scripts/kafka.sh up",
    )
    .is_none()
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let faults = r#"
[[faults]]
name = "cut-broker"
action = "partition"
target = "broker"
at_s = 3
for_s = 2

[[faults]]
name = "slow-broker"
action = "slow"
target = "broker"
at_s = 8
for_s = 2
delay_ms = 100
"#;
    let (status, report, stdout) = run(dir.path(), faults, &[]);
    let faults = every_fault_hit_healed_and_audited(&report, 2);
    assert_eq!(faults[0]["target"], "broker");
    let pipeline = &report["pipeline"];
    assert_eq!(pipeline["complete"], true, "{pipeline}");
    // The cut held events back for about its length.
    let worst_lag = pipeline["consumers"]
        .as_array()
        .expect("consumers")
        .iter()
        .filter_map(|c| c["lag"]["max_ms"].as_f64())
        .fold(0.0, f64::max);
    assert!(
        worst_lag >= 1000.0,
        "no event waited for the cut link: {pipeline}"
    );
    assert!(
        stdout.contains("bus kafka://"),
        "the run names its broker: {stdout}"
    );
    assert_eq!(report["audit"]["ok"], true, "{}", report["audit"]);
    assert_eq!(report["accounting"]["ok"], true, "{}", report["accounting"]);
    assert_eq!(report["failures"], serde_json::json!([]), "{stdout}");
    assert!(status.success(), "{stdout}");
}
