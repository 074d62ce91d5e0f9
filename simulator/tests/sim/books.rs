//! The simulator's books are a check that can fail: money moved behind its
//! back shows, even though the system's own audit (which only sees that
//! money is conserved) still passes.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use shardpay_reference::app::{self, ServeConfig};
use shardpay_simulator::run::{run, RunOptions, Target};

use crate::scenario;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_the_simulator_did_not_send_fails_its_books() {
    let data = tempfile::tempdir().unwrap();
    let mut config = ServeConfig::new(data.path());
    config.bind = "127.0.0.1:0".parse().unwrap();
    let system = app::build(config).await.unwrap();
    let url = format!("http://{}", system.addr);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(system.run_until(async {
        let _ = stop_rx.await;
    }));

    // Behind the simulator's back: once its accounts exist, move money
    // between two of them.
    let client = reqwest::Client::new();
    let meddler = {
        let url = url.clone();
        tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                assert!(
                    Instant::now() < deadline,
                    "the run's accounts never appeared"
                );
                let page: Value = client
                    .get(format!("{url}/v1/accounts?limit=10"))
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                let ids: Vec<String> = page["data"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|a| a["id"].as_str().unwrap().to_string())
                    .collect();
                if ids.len() >= 2 {
                    let response = client
                        .post(format!("{url}/v1/transfers"))
                        .json(&json!({"from": ids[0], "to": ids[1], "amount": "3.00"}))
                        .send()
                        .await
                        .unwrap();
                    assert!(response.status().is_success());
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    let reports = tempfile::tempdir().unwrap();
    let s = scenario("duration_s = 2", "model = \"closed\"\nusers = 4", "");
    let options = RunOptions {
        webhooks: false,
        services: Vec::new(),
        target: Target::Url(url.clone()),
        reports_dir: reports.path().to_path_buf(),
        progress: false,
        baseline_s: None,
        system_binary: None,
        six_processes: false,
        live: None,
    };
    let result = run(&s, &options).await.unwrap();
    meddler.await.unwrap();
    let r = &result.report;
    assert!(
        r.audit.ok,
        "money is still conserved, so the system's audit passes"
    );
    assert!(!r.accounting.ok);
    let failed: Vec<&str> = r
        .accounting
        .checks
        .iter()
        .filter(|c| !c.ok)
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(
        failed,
        vec!["balances match the books"],
        "{:#?}",
        r.accounting.checks
    );
    assert!(!r.passed, "the audit threshold covers the books too");
    assert_eq!(r.run.backend, "remote");
    let _ = stop_tx.send(());
    server.await.unwrap().unwrap();
}
