//! SIGTERM in the middle of traffic: the server stops accepting, lets the
//! transfers it is running finish, publishes its outbox and exits 0. After a
//! restart on the same shards every transfer the clients sent ends exactly
//! once (a retry with its key gets the transfer it made, if it made one),
//! the balances are what the completed transfers say, and the audit passes.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{assert_audit_passes, block_on, get, only_report, post, serve_with, Storage};

const ACCOUNTS: usize = 8;
const OPENING_MINOR: i64 = 1_000_00;

#[test]
fn sigterm_mid_run_loses_no_transfer() {
    let dir = tempfile::tempdir().unwrap();
    let ids: Vec<String> = (0..ACCOUNTS).map(|i| format!("term{i}")).collect();
    // Fraud checks off: each payer sends 30-odd transfers a minute, which
    // the velocity rule rightly flags; this test is about the stop.
    let serve = || serve_with(Storage::Files(dir.path()), None, &["--fraud", "off"]);
    let mut server = serve();
    for id in &ids {
        let (status, body) = post(
            &format!("{}/v1/accounts", server.url),
            json!({"id": id, "opening_balance": "1000.00"}),
            &format!("open-{id}"),
        )
        .unwrap();
        assert_eq!(status, 201, "{body}");
    }

    // Same-shard and cross-shard transfers from 6 clients; SIGTERM once a
    // third are sent. Clients keep going: what they send after the server
    // is gone fails to connect and is retried after the restart.
    let total = 300;
    let clients = 6;
    let body_of = |n: usize| {
        json!({
            "from": ids[n % ACCOUNTS],
            "to": ids[(n % ACCOUNTS + 1 + (n / ACCOUNTS) % (ACCOUNTS - 1)) % ACCOUNTS],
            "amount_minor": 100 + n as i64,
        })
    };
    let url = format!("{}/v1/transfers", server.url);
    let first: Mutex<HashMap<usize, (u16, Value)>> = Mutex::new(HashMap::new());
    let sent = AtomicUsize::new(0);
    let mut exit = None;
    std::thread::scope(|scope| {
        for c in 0..clients {
            let (url, first, sent, body_of) = (&url, &first, &sent, &body_of);
            scope.spawn(move || {
                for n in (c..total).step_by(clients) {
                    if let Ok(answer) = post(url, body_of(n), &format!("term-{n}")) {
                        first.lock().unwrap().insert(n, answer);
                    }
                    sent.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
        while sent.load(Ordering::SeqCst) < total / 3 {
            std::thread::sleep(Duration::from_millis(2));
        }
        let pid = server.child.id().to_string();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = server.child.try_wait().unwrap() {
                exit = Some(status);
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the server did not stop within 30 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    let exit = exit.unwrap();
    assert!(exit.success(), "SIGTERM is a clean stop, not {exit}");
    let first = first.into_inner().unwrap();
    let answered = first.len();
    assert!(
        answered >= total / 3 && answered < total,
        "{answered} of {total} answered: the stop should fall mid-run"
    );
    for (n, (status, body)) in &first {
        assert!(
            matches!(status, 201 | 202),
            "transfer {n} answered {status} {body} before the stop"
        );
    }

    // Nothing is left in the outbox: the stop published what the last
    // requests wrote. And the shard files, read directly, pass the audit.
    assert_eq!(unpublished(dir.path()), 0, "the outbox was not flushed");
    let audit = Command::new(env!("CARGO_BIN_EXE_shardpay"))
        .arg("audit")
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&audit.stdout);
    assert!(
        audit.status.success(),
        "audit of the stopped shards: {text}"
    );

    // Restart; every transfer, retried with its key and body, gets one
    // transfer, the one it got before the stop if it got an answer.
    let server = serve();
    let url = format!("{}/v1/transfers", server.url);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut balances: HashMap<String, i64> =
        ids.iter().map(|id| (id.clone(), OPENING_MINOR)).collect();
    let mut completed = 0;
    for n in 0..total {
        let (status, answer) = post(&url, body_of(n), &format!("term-{n}")).unwrap();
        assert!(
            matches!(status, 201 | 202),
            "transfer {n}: {status} {answer}"
        );
        let id = answer["id"].as_str().unwrap().to_string();
        if let Some((_, before)) = first.get(&n) {
            assert_eq!(before["id"], answer["id"], "transfer {n} was made twice");
        }
        let state = loop {
            let t = get(&format!("{}/v1/transfers/{id}", server.url));
            if t["state"] != "pending" {
                break t["state"].as_str().unwrap().to_string();
            }
            assert!(
                Instant::now() < deadline,
                "transfer {n} stayed pending: {t}"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(state, "completed", "transfer {n}");
        completed += 1;
        let body = body_of(n);
        let amount = body["amount_minor"].as_i64().unwrap();
        *balances.get_mut(body["from"].as_str().unwrap()).unwrap() -= amount;
        *balances.get_mut(body["to"].as_str().unwrap()).unwrap() += amount;
    }
    assert_eq!(completed, total);
    for (id, expected) in &balances {
        let account = get(&format!("{}/v1/accounts/{id}", server.url));
        assert_eq!(
            account["balance_minor"].as_i64(),
            Some(*expected),
            "{id}: {account}"
        );
    }
    assert_audit_passes(&server.url);
    eprintln!("sigterm: {answered} of {total} answered before the stop");
}

/// Outbox rows not yet published, read from the shard files of a stopped
/// server.
fn unpublished(dir: &Path) -> u64 {
    let stores = shardpay_reference::app::open_embedded(
        dir,
        4,
        &shardpay_reference::ledger::sqlite::SqliteConfig::default(),
    )
    .unwrap();
    block_on(async {
        let mut left = 0;
        for store in &stores {
            left += store.outbox_counts().await.unwrap().1;
        }
        left
    })
}

/// SIGTERM in the middle of a simulator run against the served system,
/// which is started again on the same port at once: the run's books
/// (every transfer it sent, settled by resending its key and body), the
/// system's audit and the event pipeline's check (every outbox event
/// applied once by analytics and by notification) all pass.
#[test]
fn sigterm_during_a_simulator_run_loses_no_transfer() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let start = || {
        let mut child = Command::new(env!("CARGO_BIN_EXE_shardpay"))
            .args(["serve", "--demo", "--port", &port.to_string()])
            .arg("--data-dir")
            .arg(&data)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        assert!(line.starts_with("shardpay listening on"), "{line:?}");
        child
    };
    let mut server = start();
    let reports = dir.path().join("reports");
    let mut run = Command::new(env!("CARGO_BIN_EXE_shardpay"))
        .args(["run", "scenarios/smoke.toml", "--quiet", "--target", &url])
        .arg("--reports")
        .arg(&reports)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();

    // Once the load is under way (transfers are being made), stop the
    // server and start it again.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let shards = std::panic::catch_unwind(|| get(&format!("{url}/v1/shards")));
        let completed: u64 = shards
            .ok()
            .and_then(|s| {
                s["shards"].as_array().map(|a| {
                    a.iter()
                        .map(|x| x["transfers"]["completed"].as_u64().unwrap_or(0))
                        .sum()
                })
            })
            .unwrap_or(0);
        if completed > 1000 {
            break;
        }
        assert!(Instant::now() < deadline, "the run made no transfers");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status()
        .unwrap()
        .success());
    let stopped = server.wait().unwrap();
    assert!(stopped.success(), "SIGTERM is a clean stop, not {stopped}");
    let _restarted = super::Server {
        child: start(),
        url: url.clone(),
    };
    let finished = run.wait().unwrap();

    let report = only_report(&reports);
    assert_eq!(report["accounting"]["ok"], true, "{}", report["accounting"]);
    // Analytics starts from its snapshots and the outboxes' tails; the
    // notification service keeps the events it applied in its store and
    // applies, when it starts, the outbox events the in-process bus lost
    // with the stop: each consumer has every event, once.
    for group in ["analytics", "notification"] {
        assert_eq!(
            report["pipeline"]["unapplied"][group], 0,
            "{group}: {}",
            report["pipeline"]
        );
    }
    assert_eq!(report["failures"], json!([]), "{}", report["pipeline"]);
    assert!(
        finished.success(),
        "the run passes every threshold: {finished}"
    );
    assert_eq!(report["audit"]["ok"], true, "{}", report["audit"]);
    assert_audit_passes(&url);
    eprintln!(
        "sigterm during a run: exit {finished}, {} errors of {} requests, {} answers settled after the run, {} resent after a closed connection; failures {}",
        report["totals"]["counts"]["errors"], report["totals"]["counts"]["requests"], report["accounting"]["settled_after_run"], report["accounting"]["resent_unanswered"], report["failures"]
    );
}
