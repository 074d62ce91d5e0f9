//! A scenario's fault schedule, as users run it: `shardpay run` starts the
//! reference system as a child, SIGKILLs it (at once, and at a step of a
//! saga), starts it again on the same data, reports each fault and audits
//! after each heal; a recovery broken on purpose fails the run and names
//! the check.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

use super::only_report;

/// A short form of scenarios/faults-crash.toml: a kill, then a crash
/// after a saga's debit.
const SHORT: &str = r#"
name = "faults-short"
seed = 11
duration_s = 14
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

[[faults]]
name = "kill"
action = "crash"
at_s = 3
jitter_s = 1
for_s = 0.5

[[faults]]
name = "mid-saga"
action = "crash_at"
step = "after_debit"
at_s = 8
for_s = 0.5

[thresholds]
error_rate = 0.0
max_recovery_s = 8
"#;

fn run(dir: &Path, broken_recovery: bool) -> (std::process::ExitStatus, Value, String) {
    let scenario = dir.join("faults.toml");
    std::fs::write(&scenario, SHORT).unwrap();
    let reports = dir.join("reports");
    let mut command = Command::new(env!("CARGO_BIN_EXE_shardpay"));
    command
        .args(["run", "--quiet"])
        .arg(&scenario)
        .arg("--reports")
        .arg(&reports)
        .env_remove("SHARDPAY_FAULT");
    if broken_recovery {
        command.env("SHARDPAY_TEST_BROKEN_RECOVERY", "1");
    }
    let out = command.output().unwrap();
    let report = only_report(&reports);
    let dir = std::fs::read_dir(&reports)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let html = std::fs::read_to_string(dir.join("report.html")).unwrap();
    eprintln!("{}", String::from_utf8_lossy(&out.stdout));
    (out.status, report, html)
}

#[test]
fn a_fault_schedule_kills_and_restarts_the_system_and_every_check_passes() {
    let dir = tempfile::tempdir().unwrap();
    let (status, report, html) = run(dir.path(), false);
    let faults = report["faults"]["faults"]
        .as_array()
        .expect("a faults report");
    assert_eq!(faults.len(), 2, "{}", report["faults"]);
    for f in faults {
        let (hit, healed) = (f["hit_s"].as_f64(), f["healed_s"].as_f64());
        let (hit, healed) = (
            hit.expect("the fault hit"),
            healed.expect("the system came back"),
        );
        assert!(
            hit >= f["scheduled_s"].as_f64().unwrap() && healed > hit,
            "{f}"
        );
        assert!(healed - hit >= 0.5, "down for its for_s: {f}");
        assert_eq!(f["audit_ok"], true, "{f}");
        assert!(f["recovered_after_s"].as_f64().is_some(), "{f}");
        assert!(f["first_accepted_after_s"].as_f64().is_some(), "{f}");
        // The windows are shaded and labelled on the charts.
        let name = f["name"].as_str().unwrap();
        assert!(
            html.contains(&format!("> {name}</text>")) || html.contains(&format!(">{name}</text>")),
            "{name} labelled"
        );
    }
    assert_eq!(faults[1]["step"], "after_debit");
    assert!(
        html.matches("class=\"fault\"").count() >= 6,
        "each fault shaded on three charts"
    );
    assert_eq!(report["audit"]["ok"], true, "{}", report["audit"]);
    assert_eq!(report["accounting"]["ok"], true, "{}", report["accounting"]);
    for group in ["analytics", "notification"] {
        assert_eq!(
            report["pipeline"]["unapplied"][group], 0,
            "{}",
            report["pipeline"]
        );
    }
    assert_eq!(report["failures"], serde_json::json!([]));
    assert!(status.success(), "{status}");
}

#[test]
fn a_broken_recovery_fails_the_run_and_names_the_check() {
    let dir = tempfile::tempdir().unwrap();
    let (status, report, _) = run(dir.path(), true);
    assert_eq!(status.code(), Some(1), "a failed check exits 1");
    let failures: Vec<&str> = report["failures"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        failures
            .iter()
            .any(|f| f.starts_with("fault mid-saga: audit after the heal: failed")),
        "{failures:?}"
    );
    assert_eq!(report["audit"]["ok"], false, "{}", report["audit"]);
}

/// The same schedule with the shards in MySQL (the CI server's fresh
/// databases): the child system restarts on them, and every check passes.
#[test]
fn on_mysql_shards_a_fault_schedule_passes_every_check() {
    let Some(urls) = super::mysql_databases() else {
        return;
    };
    // Not beside the six-process and link runs, on 2 cpus.
    let _turn = super::six::one_stack_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let scenario = dir.path().join("faults.toml");
    std::fs::write(&scenario, SHORT).unwrap();
    let reports = dir.path().join("reports");
    let out = Command::new(env!("CARGO_BIN_EXE_shardpay"))
        .args([
            "run",
            "--quiet",
            "--backend",
            "mysql",
            "--mysql-urls",
            &urls.join(","),
        ])
        .arg(&scenario)
        .arg("--reports")
        .arg(&reports)
        .env_remove("SHARDPAY_FAULT")
        .output()
        .unwrap();
    eprintln!("{}", String::from_utf8_lossy(&out.stdout));
    let report = only_report(&reports);
    assert_eq!(report["run"]["backend"], "mysql");
    let faults = report["faults"]["faults"]
        .as_array()
        .expect("a faults report");
    assert_eq!(faults.len(), 2);
    for f in faults {
        assert!(f["healed_s"].as_f64().is_some(), "{f}");
        assert_eq!(f["audit_ok"], true, "{f}");
    }
    assert_eq!(report["failures"], serde_json::json!([]));
    assert!(out.status.success(), "{}", out.status);
}

/// Faults this run cannot have are refused before anything runs, with the
/// fault's line: a shard server's kill on SQLite shards, a crash at an XA
/// step of a saga run.
#[test]
fn faults_the_run_cannot_have_are_refused_with_their_line() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            SHORT.replace(
                "name = \"kill\"\naction = \"crash\"\nat_s = 3\njitter_s = 1",
                "name = \"kill\"\naction = \"kill\"\ntarget = \"shard-1\"\nat_s = 3",
            ),
            "shard faults need the MySQL shard servers of scripts/shards.sh",
        ),
        (
            SHORT.replace(
                "name = \"kill\"\naction = \"crash\"\nat_s = 3\njitter_s = 1",
                "name = \"cut\"\naction = \"partition\"\ntarget = \"shard-1\"\nat_s = 3",
            ),
            "with no link to cut",
        ),
        (
            SHORT.replace(
                "name = \"kill\"\naction = \"crash\"\nat_s = 3",
                "name = \"kill\"\naction = \"crash\"\ntarget = \"auth\"\nat_s = 3",
            ),
            "give --six-processes",
        ),
        (
            SHORT.replace("step = \"after_debit\"", "step = \"after_prepare\""),
            "give --cross-shard xa",
        ),
    ];
    for (text, says) in cases {
        let scenario = dir.path().join("refused.toml");
        std::fs::write(&scenario, &text).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_shardpay"))
            .args(["run", "--quiet"])
            .arg(&scenario)
            .arg("--reports")
            .arg(dir.path().join("reports"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(says), "{stderr}");
        assert!(stderr.contains("line "), "{stderr}");
        assert!(!dir.path().join("reports").exists(), "nothing ran");
    }
}
