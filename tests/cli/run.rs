//! `shardpay run`, `sweep` and `compare` as users call them: exit codes,
//! error messages and the files written.

use std::path::Path;
use std::process::{Command, Output};

const SMALL: &str = r#"
name = "cli"
seed = 4
requests = 120

[accounts]
count = 200
opening_balance = "1000.00"

[load]
model = "closed"
users = 4

[mix]
same_shard = 2
cross_shard = 1
idempotent_retry = 1
"#;

fn shardpay(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shardpay"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run shardpay")
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn a_malformed_scenario_is_refused_with_its_key_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let bad = SMALL.replace("users = 4", "users = 4\nuserz = 8");
    std::fs::write(dir.path().join("bad.toml"), bad).unwrap();
    let out = shardpay(&["run", "bad.toml"], dir.path());
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("bad.toml:13: `load.userz`: unknown field `userz`"),
        "{stderr}"
    );
    assert!(!dir.path().join("reports").exists(), "nothing ran");

    let bad = SMALL.replace("count = 200", "count = 1");
    std::fs::write(dir.path().join("bad.toml"), bad).unwrap();
    let out = shardpay(&["run", "bad.toml"], dir.path());
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("bad.toml:7: `accounts.count`: must be 2 to"),
        "{stderr}"
    );
}

#[test]
fn bench_sets_each_kind_beside_its_raw_baseline_and_gates_on_the_ratio() {
    let dir = tempfile::tempdir().unwrap();
    let head = SMALL.split("[mix]").next().unwrap();
    std::fs::write(
        dir.path().join("same.toml"),
        format!("{head}[mix]\nsame_shard = 1\n"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("cross.toml"),
        format!("{head}[mix]\ncross_shard = 1\n"),
    )
    .unwrap();
    let out = shardpay(
        &[
            "bench",
            "--scenarios",
            "same.toml,cross.toml",
            "--baseline-seconds",
            "1",
            "--durability",
            "normal",
            "--min-ratio",
            "1000",
        ],
        dir.path(),
    );
    let (stdout, stderr) = text(&out);
    // No system reaches a thousand times its storage: the gate fails.
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(stdout.contains("below --min-ratio 1000"), "{stdout}");
    let benches: Vec<_> = std::fs::read_dir(dir.path().join("reports"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(benches.len(), 1);
    assert!(benches[0].join("bench.md").is_file());
    let rows: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(benches[0].join("bench.json")).unwrap())
            .unwrap();
    let rows = rows.as_array().unwrap();
    let kinds: Vec<&str> = rows.iter().map(|r| r["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["same_shard", "cross_shard"]);
    for row in rows {
        for figure in ["service_tps", "raw_tps", "ratio", "raw_p99_ms"] {
            assert!(row[figure].as_f64().unwrap() > 0.0, "{figure}: {row}");
        }
        assert_eq!(row["run_passed"], true, "{row}");
        assert!(row["system_threads"].as_u64().unwrap() >= 1, "{row}");
        let report = dir.path().join(row["report"].as_str().unwrap());
        assert!(report.join("report.json").is_file(), "{row}");
    }
}

#[test]
fn bench_and_baseline_refuse_settings_that_measure_nothing() {
    let dir = tempfile::tempdir().unwrap();
    for (args, says) in [
        (
            &["baseline", "--concurrency", "0"][..],
            "--concurrency and --seconds",
        ),
        (
            &["baseline", "--seconds", "0"][..],
            "--concurrency and --seconds",
        ),
        (&["baseline", "--shards", "0"][..], "at least one shard"),
        (
            &["bench", "--baseline-seconds", "0"][..],
            "--baseline-seconds",
        ),
        (&["bench", "--min-ratio", "NaN"][..], "--min-ratio"),
        (&["bench", "--min-ratio=-1"][..], "--min-ratio"),
    ] {
        let out = shardpay(args, dir.path());
        let (stdout, stderr) = text(&out);
        assert!(!out.status.success(), "{args:?}: {stdout}\n{stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
    assert!(
        !dir.path().join("reports").exists(),
        "a refused bench wrote nothing"
    );
}

#[test]
fn an_unmeetable_threshold_exits_1_and_says_which() {
    let dir = tempfile::tempdir().unwrap();
    let file = format!("{SMALL}\n[thresholds]\nmin_tps = 1000000000.0\nerror_rate = 0.5\n");
    std::fs::write(dir.path().join("slow.toml"), file).unwrap();
    let out = shardpay(&["run", "slow.toml", "--quiet"], dir.path());
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(stdout.contains("run FAILED:"), "{stdout}");
    assert!(stdout.contains("transfers per second:"), "{stdout}");
    let failures = stdout.split("run FAILED:").nth(1).unwrap();
    assert!(
        !failures.contains("error rate"),
        "a met threshold is listed as failed: {stdout}"
    );
    let runs: Vec<_> = std::fs::read_dir(dir.path().join("reports"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(runs.len(), 1);
    for file in ["report.json", "report.html", "summary.txt"] {
        assert!(runs[0].join(file).is_file(), "{file}");
    }
}

#[test]
fn sweep_runs_each_shard_count_and_compare_reads_the_reports() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("s.toml"), SMALL).unwrap();
    let out = shardpay(
        &["sweep", "s.toml", "--shards", "1,2,4", "--quiet"],
        dir.path(),
    );
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("scaling eff."), "{stdout}");
    assert!(
        stdout.contains("with one shard every transfer is same-shard"),
        "{stdout}"
    );
    let mut runs: Vec<_> = std::fs::read_dir(dir.path().join("reports"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    runs.sort();
    let sweep = runs
        .iter()
        .find(|p| p.to_string_lossy().contains("sweep-cli-"))
        .unwrap();
    let comparison: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(sweep.join("compare.json")).unwrap())
            .unwrap();
    let rows = comparison["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 3);
    assert_eq!(
        rows.iter()
            .map(|r| r["shards"].as_u64())
            .collect::<Vec<_>>(),
        [Some(1), Some(2), Some(4)]
    );
    for row in rows {
        assert_eq!(
            row["mix"], "same_shard 50%, cross_shard 25%, idempotent_retry 25%",
            "every step is labelled with the mix it was given"
        );
        // Measured on Linux (from /proc/stat) when the load lasted long
        // enough to say; never outside 0..=1.
        match row["cpu_busy"].as_f64() {
            Some(busy) => {
                assert!(busy > 0.0 && busy <= 1.0, "{busy}");
                assert_eq!(row["cpu_saturated"].as_bool(), Some(busy >= 0.9));
            }
            None => assert_eq!(row["cpu_saturated"].as_bool(), Some(false)),
        }
    }
    // The mix sends pairs across shards; one shard cannot, so that run is
    // labelled as what it did and is not the base of the scaling.
    assert!(
        rows[0]["ran_as"]
            .as_str()
            .unwrap()
            .contains("no transfer crosses shards"),
        "{}",
        rows[0]
    );
    assert!(rows[0]["scaling_efficiency"].is_null(), "{}", rows[0]);
    assert!(rows[1]["ran_as"].is_null());
    assert_eq!(
        rows[1]["scaling_efficiency"].as_f64(),
        Some(1.0),
        "the base (the fewest shards that cross) scales 1.0 by definition"
    );
    assert!(rows[2]["scaling_efficiency"].as_f64().unwrap() > 0.0);
    assert!(
        comparison["notes"].as_array().unwrap().iter().any(|n| n
            .as_str()
            .unwrap()
            .contains("scaling is measured from 2 shards")),
        "{comparison}"
    );

    let reports: Vec<String> = runs
        .iter()
        .filter(|p| p.join("report.json").is_file())
        .map(|p| p.display().to_string())
        .collect();
    assert_eq!(reports.len(), 3);
    let mut args = vec!["compare"];
    args.extend(reports.iter().map(String::as_str));
    let out = shardpay(&args, dir.path());
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(
        stdout.lines().filter(|l| l.contains("| cli | ")).count(),
        3,
        "{stdout}"
    );

    std::fs::write(dir.path().join("not-a-report.json"), "{}").unwrap();
    let out = shardpay(&["compare", "not-a-report.json"], dir.path());
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(stderr.contains("is not a shardpay report"), "{stderr}");
}

/// scenarios/hostile.toml as shipped: every hostile request is refused
/// with the status and code it must get, no other answer is an error, and
/// the books (balances, transfer count) and the audit pass.
#[test]
fn hostile_traffic_is_refused_with_its_codes_and_moves_no_money() {
    let dir = tempfile::tempdir().unwrap();
    let reports = dir.path().join("reports");
    let scenario = concat!(env!("CARGO_MANIFEST_DIR"), "/scenarios/hostile.toml");
    let out = shardpay(
        &[
            "run",
            "--quiet",
            scenario,
            "--reports",
            reports.to_str().unwrap(),
        ],
        dir.path(),
    );
    let (stdout, stderr) = text(&out);
    let report = super::only_report(&reports);
    let hostile = &report["by_kind"]["hostile"];
    let sent = hostile["requests"].as_u64().unwrap();
    assert!(sent > 100, "{hostile}");
    assert_eq!(
        hostile["declined"], sent,
        "every one refused as it must be: {stdout}"
    );
    assert_eq!(hostile["errors"], 0, "{stdout}");
    let check = report["accounting"]["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "hostile requests refused as they must be")
        .expect("the hostile check")
        .clone();
    assert_eq!(check["ok"], true, "{check}");
    // Every attack was tried, auth's among them (the run has auth on).
    for code in [
        "negative_amount",
        "malformed_json",
        "invalid_token",
        "not_account_owner",
        "unsupported_media_type",
    ] {
        assert!(
            report["outcomes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|o| o["code"] == code),
            "{code} answered: {}",
            report["outcomes"]
        );
    }
    assert_eq!(report["accounting"]["ok"], true, "{}", report["accounting"]);
    assert_eq!(report["audit"]["ok"], true, "{}", report["audit"]);
    assert!(out.status.success(), "{stdout}{stderr}");
}
