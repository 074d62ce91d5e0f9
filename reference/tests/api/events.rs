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

/// A restarted analytics service rebuilds its totals from its snapshots
/// and the shards' outboxes: the same totals as the analytics that saw
/// every event, every outbox row applied once, and events the bus then
/// delivers again recognised by their publish position.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn analytics_rebuilds_its_totals_from_the_outboxes() {
    let app = TestApp::start().await;
    let (a, b, c) = app.ids_by_shard("rb");
    for id in [&a, &b, &c] {
        app.create(id, "100.00").await;
    }
    for i in 0..12 {
        let (from, to) = if i % 3 == 0 { (&a, &c) } else { (&b, &a) };
        let body = json!({"from": from, "to": to, "amount_minor": 100 + i});
        let (status, answer) = app
            .post("/v1/transfers", body, Some(&format!("rb-{i}")))
            .await;
        assert!(matches!(status, 201 | 202), "{answer}");
    }
    eventually("the pipeline to catch up", || async {
        let (_, p) = app.get("/v1/pipeline").await;
        p["complete"] == true
    })
    .await;
    let live = &app.pipeline.analytics;
    let fresh = shardpay_reference::analytics::Analytics::default();
    let rows = fresh.rebuild(app.manager.shards()).await.unwrap();
    let (_, p) = app.get("/v1/pipeline").await;
    assert_eq!(rows, p["outbox_rows"].as_u64().unwrap());
    let (rebuilt, rebuilt_per_shard) = fresh.totals();
    let (seen, seen_per_shard) = live.totals();
    assert_eq!(rebuilt.transfers_completed, 12);
    assert_eq!(rebuilt.accounts_created, seen.accounts_created);
    assert_eq!(rebuilt.transfers_completed, seen.transfers_completed);
    assert_eq!(rebuilt.same_shard, seen.same_shard);
    assert_eq!(rebuilt.cross_shard, seen.cross_shard);
    assert_eq!(rebuilt.volume_minor, seen.volume_minor);
    assert_eq!(rebuilt_per_shard.len(), seen_per_shard.len());
    let stats = fresh.stats();
    assert_eq!(
        (stats.applied, stats.received, stats.lag.count),
        (rows, 0, 0)
    );
    // The bus delivering an event again changes nothing.
    let store = &app.manager.shards()[0];
    let first = store.outbox_page(0, 1).await.unwrap();
    let event = shardpay_reference::events::Event::from_outbox(&first[0]);
    fresh.apply(&event, shardpay_reference::ledger::now_ms());
    let stats = fresh.stats();
    assert_eq!((stats.applied, stats.duplicates_suppressed), (rows, 1));
    assert_eq!(fresh.totals().0.transfers_completed, 12);
}

/// Analytics keeps a snapshot of its totals on each shard; once the
/// snapshots cover the published rows the relay prunes them, and an
/// analytics started afterwards reads each snapshot and the outbox's tail:
/// the same totals as the analytics that saw every event, each event
/// counted once, before the prune and after more traffic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn analytics_starts_from_its_snapshots_once_the_outbox_is_pruned() {
    use shardpay_reference::analytics::{Analytics, Totals};
    // Fraud decisions are published straight to the bus, not kept.
    let payments = |(mut overall, per_shard): (Totals, _)| {
        overall.fraud_decisions.clear();
        (overall, per_shard)
    };
    let app = TestApp::start().await;
    let (a, b, c) = app.ids_by_shard("sn");
    for id in [&a, &b, &c] {
        app.create(id, "100.00").await;
    }
    let pay = |i: i64| {
        let (from, to) = if i % 3 == 0 { (&a, &c) } else { (&b, &a) };
        json!({"from": from, "to": to, "amount_minor": 100 + i})
    };
    for i in 0..9 {
        let (status, answer) = app
            .post("/v1/transfers", pay(i), Some(&format!("sn-{i}")))
            .await;
        assert!(matches!(status, 201 | 202), "{answer}");
    }
    let caught_up = || async {
        let (_, p) = app.get("/v1/pipeline").await;
        p["complete"] == true
    };
    eventually("the pipeline to catch up", caught_up).await;
    let shards = app.manager.shards();
    let mut first = None;
    for store in shards {
        first = first.or(store.outbox_page(0, 1).await.unwrap().pop());
    }
    let first = shardpay_reference::events::Event::from_outbox(&first.unwrap());
    app.pipeline.relay.set_retention(std::time::Duration::ZERO);
    eventually("every published row to be pruned", || async {
        let mut left = 0;
        for store in shards {
            left += store.outbox_page(0, 10).await.unwrap().len();
        }
        left == 0
    })
    .await;
    let (_, p) = app.get("/v1/pipeline").await;
    let rows = p["outbox_rows"].as_u64().unwrap();
    assert!(rows >= 12, "the counters count pruned rows: {p}");
    assert_eq!(p["complete"], true, "{p}");
    let live = &app.pipeline.analytics;
    let fresh = Analytics::default();
    assert_eq!(fresh.rebuild(shards).await.unwrap(), rows);
    assert_eq!(fresh.totals(), payments(live.totals()));
    assert_eq!(fresh.totals().0.transfers_completed, 9);
    fresh.apply(&first, shardpay_reference::ledger::now_ms());
    assert_eq!(fresh.stats().duplicates_suppressed, 1);
    assert_eq!(fresh.totals(), payments(live.totals()));
    // More traffic after the prune: snapshot and tail together.
    app.pipeline
        .relay
        .set_retention(std::time::Duration::from_secs(3_600));
    for i in 9..15 {
        let (status, answer) = app
            .post("/v1/transfers", pay(i), Some(&format!("sn-{i}")))
            .await;
        assert!(matches!(status, 201 | 202), "{answer}");
    }
    eventually("the pipeline to catch up", caught_up).await;
    let (_, p) = app.get("/v1/pipeline").await;
    let again = Analytics::default();
    assert_eq!(
        again.rebuild(shards).await.unwrap(),
        p["outbox_rows"].as_u64().unwrap()
    );
    assert_eq!(again.totals(), payments(live.totals()));
    assert_eq!(again.totals().0.transfers_completed, 15);
}
