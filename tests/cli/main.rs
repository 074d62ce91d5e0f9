//! Tests of the `shardpay` binary as users run it: a process killed between
//! the two steps of a cross-shard transfer is restarted and recovery
//! finishes the transfer; `shardpay audit` agrees.

mod audit;
mod config;
mod faults;
mod grafana;
mod links;
mod live;
mod memory;
mod modules;
mod replicas;
mod reshard;
mod restarts;
mod run;
mod shard_kill;
mod sigterm;
mod six;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

struct Server {
    child: Child,
    url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where a served system keeps its shards.
#[derive(Clone, Copy)]
enum Storage<'a> {
    Files(&'a Path),
    Mysql(&'a [String]),
}

/// Four fresh MySQL databases on the test server, or `None` (the test is
/// skipped) when `SHARDPAY_TEST_MYSQL_URL` is unset, unless
/// `SHARDPAY_REQUIRE_MYSQL=1` makes that a failure.
fn mysql_databases() -> Option<Vec<String>> {
    mysql_databases_n(4)
}

/// `n` fresh MySQL databases on the test server, as `mysql_databases`.
fn mysql_databases_n(n: usize) -> Option<Vec<String>> {
    let server = match std::env::var("SHARDPAY_TEST_MYSQL_URL") {
        Ok(url) if !url.is_empty() => url.trim_end_matches('/').to_string(),
        _ => {
            assert!(
                std::env::var("SHARDPAY_REQUIRE_MYSQL").as_deref() != Ok("1"),
                "SHARDPAY_REQUIRE_MYSQL=1 but SHARDPAY_TEST_MYSQL_URL is not set"
            );
            eprintln!("MySQL test skipped: set SHARDPAY_TEST_MYSQL_URL (scripts/shards.sh up 1)");
            return None;
        }
    };
    let prefix = format!("c{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    block_on(async {
        use sqlx::Connection;
        let mut admin = sqlx::MySqlConnection::connect(&server).await.unwrap();
        let mut urls = Vec::new();
        for i in 0..n {
            let db = format!("{prefix}_{i}");
            sqlx::query(&format!("CREATE DATABASE {db}"))
                .execute(&mut admin)
                .await
                .unwrap();
            urls.push(format!("{server}/{db}"));
        }
        Some(urls)
    })
}

/// Starts `shardpay serve` on a free port and reads the URL it prints.
fn serve(data_dir: &Path, fault: Option<&str>) -> Server {
    serve_on(Storage::Files(data_dir), fault)
}

fn serve_on(storage: Storage<'_>, fault: Option<&str>) -> Server {
    serve_with(storage, fault, &[])
}

fn serve_with(storage: Storage<'_>, fault: Option<&str>, extra: &[&str]) -> Server {
    let mut command = Command::new(env!("CARGO_BIN_EXE_shardpay"));
    command
        .args([
            "serve",
            "--demo",
            "--port",
            "0",
            "--recovery-grace-ms",
            "0",
            "--recovery-interval-ms",
            "50",
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(match std::env::var_os("SHARDPAY_TEST_SERVE_LOG") {
            Some(path) => Stdio::from(std::fs::File::create(path).unwrap()),
            None => Stdio::null(),
        });
    match storage {
        Storage::Files(dir) => command.arg("--data-dir").arg(dir),
        Storage::Mysql(urls) => command.arg("--mysql-urls").arg(urls.join(",")),
    };
    command.args(extra);
    if let Some(fault) = fault {
        command.env("SHARDPAY_FAULT", fault);
    }
    start(command)
}

/// Starts a `shardpay serve` command (stdout piped) and reads the URL it
/// prints first.
fn start(mut command: Command) -> Server {
    let mut child = command.spawn().expect("start shardpay serve");
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let url = line
        .trim()
        .strip_prefix("shardpay listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    Server { child, url }
}

fn post(url: &str, body: Value, key: &str) -> Result<(u16, Value), reqwest::Error> {
    block_on(async {
        let response = reqwest::Client::new()
            .post(url)
            .header("Idempotency-Key", key)
            .json(&body)
            .send()
            .await?;
        let status = response.status().as_u16();
        Ok((status, response.json().await.unwrap_or(Value::Null)))
    })
}

fn get(url: &str) -> Value {
    block_on(async { reqwest::get(url).await.unwrap().json().await.unwrap() })
}

/// Runs a future to its end on a runtime of its own: the tests are plain
/// threads that drive processes.
fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(future)
}

/// The report.json of the one run that wrote its report under `reports`.
fn only_report(reports: &Path) -> Value {
    let dir = std::fs::read_dir(reports)
        .unwrap()
        .next()
        .expect("a report folder")
        .unwrap()
        .path();
    serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap()
}

/// `shardpay audit --url URL` exits 0 and says the audit passed.
fn assert_audit_passes(url: &str) {
    let audit = Command::new(env!("CARGO_BIN_EXE_shardpay"))
        .args(["audit", "--url", url])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&audit.stdout);
    assert!(audit.status.success(), "{text}");
    assert!(text.contains("audit passed"), "{text}");
}

fn ring_pair() -> (String, String) {
    // Two accounts on different shards of four.
    let ring = shardpay_reference::sharding::Ring::new(4).unwrap();
    let a = "crash_payer".to_string();
    let b = (0..)
        .map(|i| format!("crash_payee_{i}"))
        .find(|b| ring.shard_of_key(b) != ring.shard_of_key(&a))
        .unwrap();
    (a, b)
}

#[test]
fn a_crash_between_debit_and_credit_is_finished_by_recovery() {
    let dir = tempfile::tempdir().unwrap();
    crash_between_debit_and_credit(Storage::Files(dir.path()));
}

#[test]
fn on_mysql_shards_a_crash_between_debit_and_credit_is_finished_by_recovery() {
    let Some(urls) = mysql_databases() else {
        return;
    };
    crash_between_debit_and_credit(Storage::Mysql(&urls));
}

fn crash_between_debit_and_credit(storage: Storage<'_>) {
    let (payer, payee) = ring_pair();
    {
        let server = serve_on(storage, None);
        for (id, opening) in [(&payer, "100.00"), (&payee, "0")] {
            let body = json!({"id": id, "opening_balance": opening});
            let (status, _) = post(&format!("{}/v1/accounts", server.url), body, id).unwrap();
            assert_eq!(status, 201);
        }
    }
    let transfer = json!({"from": payer, "to": payee, "amount": "12.34"});
    {
        // This process aborts right after step (a) commits.
        let mut server = serve_on(storage, Some("crash_after_debit"));
        let url = format!("{}/v1/transfers", server.url);
        assert!(
            post(&url, transfer.clone(), "crash-1").is_err(),
            "no answer expected"
        );
        let status = server.child.wait().unwrap();
        assert!(!status.success(), "the process should have aborted");
    }
    let server = serve_on(storage, None);
    let balance =
        |id: &str| get(&format!("{}/v1/accounts/{id}", server.url))["balance_minor"].as_i64();
    assert_eq!(
        balance(&payer),
        Some(100_00 - 12_34),
        "step (a) was committed"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while balance(&payee) != Some(12_34) {
        assert!(
            Instant::now() < deadline,
            "recovery did not credit the payee"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The client's retry gets the finished transfer, and pays nothing more.
    let (status, answer) =
        post(&format!("{}/v1/transfers", server.url), transfer, "crash-1").unwrap();
    assert_eq!(status, 201, "{answer}");
    assert_eq!(answer["state"], "completed");
    assert_eq!(balance(&payer), Some(100_00 - 12_34));
    assert_eq!(balance(&payee), Some(12_34));

    assert_audit_passes(&server.url);
}

#[test]
fn a_crash_after_the_credit_is_completed_without_paying_twice() {
    let dir = tempfile::tempdir().unwrap();
    let (payer, payee) = ring_pair();
    {
        let server = serve(dir.path(), None);
        for (id, opening) in [(&payer, "10.00"), (&payee, "0")] {
            let body = json!({"id": id, "opening_balance": opening});
            post(&format!("{}/v1/accounts", server.url), body, id).unwrap();
        }
    }
    {
        let mut server = serve(dir.path(), Some("crash_after_credit"));
        let body = json!({"from": payer, "to": payee, "amount": "3.00"});
        assert!(post(&format!("{}/v1/transfers", server.url), body, "c-2").is_err());
        server.child.wait().unwrap();
    }
    let server = serve(dir.path(), None);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let report = get(&format!("{}/v1/audit", server.url));
        if report["pending_transfers"] == 0 {
            assert_eq!(report["ok"], true, "{report:#}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "transfer still pending: {report:#}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let payee_balance =
        get(&format!("{}/v1/accounts/{payee}", server.url))["balance_minor"].as_i64();
    assert_eq!(payee_balance, Some(3_00));
    // Offline audit of the files agrees once the server is stopped.
    drop(server);
    let audit = Command::new(env!("CARGO_BIN_EXE_shardpay"))
        .args(["audit", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        audit.status.success(),
        "{}",
        String::from_utf8_lossy(&audit.stdout)
    );
}

/// XA: the coordinator dies once with both branches prepared and no
/// decision, and once right after writing the commit decision. After a
/// restart, recovery rolls the first back and commits the second, as the
/// decision log says; retries with the same keys pay each transfer once.
#[test]
fn on_mysql_shards_xa_branches_left_by_a_crashed_coordinator_follow_the_decision_log() {
    let Some(urls) = mysql_databases() else {
        return;
    };
    let storage = Storage::Mysql(&urls);
    let xa = ["--cross-shard", "xa"];
    let (payer, payee) = ring_pair();
    {
        let server = serve_with(storage, None, &xa);
        for (id, opening) in [(&payer, "100.00"), (&payee, "0")] {
            let body = json!({"id": id, "opening_balance": opening});
            let (status, _) = post(&format!("{}/v1/accounts", server.url), body, id).unwrap();
            assert_eq!(status, 201);
        }
    }
    let undecided = json!({"from": payer, "to": payee, "amount": "12.34"});
    let decided = json!({"from": payer, "to": payee, "amount": "20.00"});
    for (fault, body, key) in [
        ("crash_after_prepare", &undecided, "xa-undecided"),
        ("crash_after_decision", &decided, "xa-decided"),
    ] {
        let mut server = serve_with(storage, Some(fault), &xa);
        let url = format!("{}/v1/transfers", server.url);
        assert!(post(&url, body.clone(), key).is_err(), "no answer expected");
        let status = server.child.wait().unwrap();
        assert!(
            !status.success(),
            "the process should have aborted ({fault})"
        );
    }

    let server = serve_with(storage, None, &xa);
    let balance =
        |id: &str| get(&format!("{}/v1/accounts/{id}", server.url))["balance_minor"].as_i64();
    let deadline = Instant::now() + Duration::from_secs(20);
    while balance(&payee) != Some(20_00) {
        assert!(
            Instant::now() < deadline,
            "recovery did not commit the decided transfer: payee holds {:?}",
            balance(&payee)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        balance(&payer),
        Some(100_00 - 20_00),
        "the undecided transfer was rolled back, the decided one committed"
    );
    let shards = get(&format!("{}/v1/shards", server.url));
    let transfers: u64 = shards["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["transfers"]["completed"].as_u64().unwrap())
        .sum();
    assert_eq!(transfers, 1, "{shards}");

    // The decided transfer's retry replays it; the rolled-back one's retry
    // runs it now, once.
    let url = format!("{}/v1/transfers", server.url);
    let (status, answer) = post(&url, decided, "xa-decided").unwrap();
    assert_eq!(status, 201, "{answer}");
    assert_eq!(answer["state"], "completed");
    let (status, answer) = post(&url, undecided.clone(), "xa-undecided").unwrap();
    assert_eq!(status, 201, "{answer}");
    let (again, replay) = post(&url, undecided, "xa-undecided").unwrap();
    assert_eq!((again, &replay["id"]), (201, &answer["id"]));
    assert_eq!(balance(&payer), Some(100_00 - 20_00 - 12_34));
    assert_eq!(balance(&payee), Some(20_00 + 12_34));

    let audit = Command::new(env!("CARGO_BIN_EXE_shardpay"))
        .args(["audit", "--url", &server.url])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&audit.stdout);
    assert!(audit.status.success(), "{text}");
    assert!(text.contains("no_in_doubt_xa_branches"), "{text}");
}

/// Auth is on by default: without a secret the server refuses to start
/// and says how to fix it; demo mode refuses anything but loopback.
#[test]
fn the_server_refuses_to_start_without_a_secret_or_with_demo_on_a_public_address() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_shardpay"))
            .arg("serve")
            .args(["--port", "0", "--data-dir"])
            .arg(dir.path())
            .args(args)
            .env_remove("SHARDPAY_JWT_SECRET")
            .env_remove("SHARDPAY_DEMO")
            .env_remove("SHARDPAY_DEV")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, stderr) = run(&[]);
    assert_ne!(code, Some(0));
    assert!(
        stderr.contains("SHARDPAY_JWT_SECRET") && stderr.contains("--demo"),
        "{stderr}"
    );
    let (code, stderr) = run(&["--jwt-secret", "short"]);
    assert_ne!(code, Some(0));
    assert!(stderr.contains("at least 32 characters"), "{stderr}");
    let (code, stderr) = run(&["--demo", "--bind", "0.0.0.0"]);
    assert_ne!(code, Some(0));
    assert!(stderr.contains("loopback only"), "{stderr}");
}
