//! A scenario's reshards, as users run them: `shardpay run` grows the live
//! in-process system from 4 to 5 shards under mixed traffic and back,
//! audits around each reshard and reports the moved share and the phases;
//! on MySQL shards too; and a switch broken on purpose (the old home keeps
//! taking credits) fails the run and names the audit check.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

use super::{mysql_databases_n, only_report};

/// A short form of scenarios/reshard.toml.
const SHORT: &str = r#"
name = "reshard-short"
seed = 5
duration_s = 12
warmup_s = 1

[accounts]
count = 1500
opening_balance = "1000.00"

[load]
model = "closed"
users = 8

[mix]
same_shard = 50
cross_shard = 35
idempotent_retry = 15

[[reshard]]
at_s = 2
to = 5

[[reshard]]
at_s = 7
to = 4

[thresholds]
error_rate = 0.01
audit = true
"#;

fn run(
    dir: &Path,
    extra: &[String],
    broken_switch: bool,
) -> (std::process::ExitStatus, Value, String) {
    let scenario = dir.join("reshard.toml");
    std::fs::write(&scenario, SHORT).unwrap();
    let reports = dir.join("reports");
    let mut command = Command::new(env!("CARGO_BIN_EXE_shardpay"));
    command
        .args(["run", "--quiet"])
        .arg(&scenario)
        .arg("--reports")
        .arg(&reports)
        .args(extra);
    if broken_switch {
        command.env("SHARDPAY_TEST_BROKEN_SWITCH", "1");
    }
    let out = command.output().unwrap();
    eprintln!("{}", String::from_utf8_lossy(&out.stdout));
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    let report = only_report(&reports);
    let folder = std::fs::read_dir(&reports)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let html = std::fs::read_to_string(folder.join("report.html")).unwrap();
    (out.status, report, html)
}

fn expect_two_reshards_that_passed(status: std::process::ExitStatus, report: &Value, html: &str) {
    let reshards = report["reshards"].as_array().expect("a reshards report");
    assert_eq!(reshards.len(), 2, "{}", report["reshards"]);
    for (r, to) in reshards.iter().zip([5, 4]) {
        assert_eq!(r["to"], to, "{r}");
        assert_eq!(r["error"], Value::Null, "{r}");
        let share = r["system"]["moved_share"].as_f64().unwrap();
        assert!(
            (0.14..=0.26).contains(&share),
            "jump hashing moves about 1/5: {r}"
        );
        let audits = r["audits"].as_array().unwrap();
        let when: Vec<&str> = audits.iter().map(|a| a["when"].as_str().unwrap()).collect();
        assert_eq!(when.first(), Some(&"before"), "{r}");
        assert!(when.contains(&"during"), "{r}");
        assert_eq!(when.last(), Some(&"after"), "{r}");
        assert!(audits.iter().all(|a| a["ok"] == true), "{r}");
        let phases: Vec<&str> = r["phases"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p[0].as_str().unwrap())
            .collect();
        assert_eq!(phases, ["prepare", "copy", "switch"], "{r}");
    }
    // Transfers are counted at the shard the system placed their payer
    // on: while the system had five shards, some paid from the fifth.
    let fifth = &report["latency"]["shards"]["4"]["count"];
    assert!(
        fifth.as_u64().is_some_and(|n| n > 0),
        "no transfer counted on shard 4: {}",
        report["latency"]["shards"]
    );
    // The phases are shaded and labelled on the charts, and tabled.
    assert!(html.contains(">copy (to 5)</text>"), "copy phase labelled");
    assert!(html.contains("<h2>Reshards</h2>"), "reshards table");
    assert_eq!(report["audit"]["ok"], true, "{}", report["audit"]);
    assert_eq!(report["accounting"]["ok"], true, "{}", report["accounting"]);
    assert_eq!(report["failures"], serde_json::json!([]));
    assert!(status.success(), "{status}");
}

#[test]
fn a_reshard_schedule_grows_the_live_system_and_back_and_every_check_passes() {
    let dir = tempfile::tempdir().unwrap();
    let (status, report, html) = run(dir.path(), &[], false);
    expect_two_reshards_that_passed(status, &report, &html);
}

#[test]
fn on_mysql_shards_a_reshard_schedule_grows_the_live_system_and_back() {
    // Four shards and the spare fifth the scenario grows into.
    let Some(urls) = mysql_databases_n(5) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut extra = vec!["--backend".to_string(), "mysql".to_string()];
    for url in urls {
        extra.push("--mysql-urls".into());
        extra.push(url);
    }
    let (status, report, html) = run(dir.path(), &extra, false);
    assert_eq!(report["run"]["backend"], "mysql", "{}", report["run"]);
    expect_two_reshards_that_passed(status, &report, &html);
}

#[test]
fn a_broken_switch_fails_the_run_and_names_the_check() {
    let dir = tempfile::tempdir().unwrap();
    let (status, report, _) = run(dir.path(), &[], true);
    assert_eq!(status.code(), Some(1), "the run must fail");
    let failures = report["failures"].to_string();
    assert!(failures.contains("moved_accounts_closed"), "{failures}");
}

/// A short form of scenarios/reshard-crash.toml: the system is killed in
/// the middle of the first reshard's move. No `max_recovery_s`: in 14 s with
/// two reshards, the throughput before the crash is not always reached
/// again on a busy machine, and recovery time is a figure for the report,
/// not for a test to time.
const CRASH: &str = r#"
name = "reshard-crash-short"
seed = 5
duration_s = 14
warmup_s = 1

[accounts]
count = 1500
opening_balance = "1000.00"

[load]
model = "closed"
users = 8

[mix]
same_shard = 50
cross_shard = 35
idempotent_retry = 15

[[reshard]]
at_s = 3
to = 5

[[reshard]]
at_s = 9
to = 4

[[faults]]
name = "mid-move"
action = "crash_at"
step = "mid_move"
at_s = 2.5
for_s = 1

[thresholds]
error_rate = 0.01
fault_error_rate = 0.1
audit = true
"#;

/// Killed with an account's balance in flight between its old and new
/// home: started again, the system finds every account, recovery lands the
/// money, the run resumes the reshard, and every audit and the books pass.
#[test]
fn a_reshard_killed_mid_move_is_resumed_and_every_check_passes() {
    let dir = tempfile::tempdir().unwrap();
    let scenario = dir.path().join("reshard-crash.toml");
    std::fs::write(&scenario, CRASH).unwrap();
    let reports = dir.path().join("reports");
    let out = Command::new(env!("CARGO_BIN_EXE_shardpay"))
        .args(["run", "--quiet"])
        .arg(&scenario)
        .arg("--reports")
        .arg(&reports)
        .output()
        .unwrap();
    eprintln!("{}", String::from_utf8_lossy(&out.stdout));
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    let report = only_report(&reports);
    let reshards = report["reshards"].as_array().expect("a reshards report");
    assert_eq!(reshards.len(), 2, "{}", report["reshards"]);
    let first = &reshards[0];
    assert_eq!(first["error"], Value::Null, "{first}");
    let resumed = first["resumed"].as_array().unwrap();
    assert!(!resumed.is_empty(), "the crash stopped it: {first}");
    assert!(
        resumed[0][1].as_str().unwrap().contains("started again"),
        "{first}"
    );
    for r in reshards {
        assert_eq!(r["error"], Value::Null, "{r}");
        assert!(
            r["audits"]
                .as_array()
                .unwrap()
                .iter()
                .all(|a| a["ok"] == true),
            "{r}"
        );
    }
    assert_eq!(
        reshards[1]["resumed"],
        serde_json::json!([]),
        "{}",
        reshards[1]
    );
    let fault = &report["faults"]["faults"][0];
    assert!(fault["hit_s"].as_f64().is_some(), "{fault}");
    assert_eq!(report["audit"]["ok"], true, "{}", report["audit"]);
    assert_eq!(report["accounting"]["ok"], true, "{}", report["accounting"]);
    assert_eq!(report["failures"], serde_json::json!([]));
    assert!(out.status.success(), "{}", out.status);
}
