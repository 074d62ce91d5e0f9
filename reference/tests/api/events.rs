//! The event pipeline: every outbox row reaches the analytics consumer
//! once after deduplication, even when the relay dies between publishing a
//! batch and marking it published; analytics agrees with the shards.

use std::sync::atomic::Ordering;

use serde_json::json;

use crate::support::{eventually, TestApp};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_dies_after_publishing_loses_nothing_and_doubles_nothing() {
    let app = TestApp::start().await;
    let (a, b, c) = app.ids_by_shard("ev");
    for id in [&a, &b, &c] {
        app.create(id, "100.00").await;
    }
    // The next batch is published, then the relay fails before marking
    // it: the rows are published again on the next pass.
    app.pipeline
        .relay
        .fail_before_mark_once
        .store(true, Ordering::SeqCst);
    for i in 0..20 {
        let (from, to) = if i % 2 == 0 { (&a, &b) } else { (&b, &c) };
        let body = json!({"from": from, "to": to, "amount": "1.00"});
        let (status, answer) = app
            .post("/v1/transfers", body, Some(&format!("ev-{i}")))
            .await;
        assert!(matches!(status, 201 | 202), "{answer}");
    }
    eventually("the pipeline to catch up", || async {
        let (_, p) = app.get("/v1/pipeline").await;
        p["complete"] == true
    })
    .await;
    let (_, p) = app.get("/v1/pipeline").await;
    let rows = p["outbox_rows"].as_u64().unwrap();
    let consumer = &p["consumers"][0];
    assert_eq!(consumer["group"], "analytics");
    assert_eq!(consumer["applied"].as_u64().unwrap(), rows, "{p:#}");
    assert!(
        consumer["duplicates_suppressed"].as_u64().unwrap() > 0,
        "the failed batch came twice: {p:#}"
    );
    assert!(p["published"].as_u64().unwrap() > rows, "{p:#}");
    assert_eq!(p["relay_failures"], 1, "{p:#}");
    assert_eq!(p["unapplied"]["analytics"], 0, "{p:#}");

    let (_, analytics) = app.get("/v1/analytics").await;
    assert_eq!(analytics["matches_shards"], true, "{analytics:#}");
    assert_eq!(
        analytics["overall"]["transfers_completed"], 20,
        "{analytics:#}"
    );
    assert_eq!(analytics["overall"]["accounts_created"], 3, "{analytics:#}");
    assert_eq!(
        analytics["overall"]["volume_minor"]["INR"], 2_000,
        "{analytics:#}"
    );
    let page = app.text(reqwest::Method::GET, "/dashboard/analytics").await;
    assert!(
        page.contains("/v1/analytics"),
        "the dashboard polls the API"
    );
}
