//! The event bus on a real Kafka-protocol broker (`scripts/kafka.sh up`):
//! consumer groups resume from their committed offsets, and a relay that is
//! stopped mid-run and restarted, a relay that dies between publishing and
//! marking, and a consumer restarted before committing lose no event and,
//! after deduplication, apply none twice.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use shardpay_reference::analytics::ANALYTICS_GROUP;
use shardpay_reference::events::kafka::KafkaBus;
use shardpay_reference::events::{Event, EventBus, PAYMENT_EVENTS};

use crate::support::{eventually, kafka_config, kafka_server, Options, TestApp};

fn event(id: &str) -> Event {
    Event {
        id: id.into(),
        event_type: "transfer.completed".into(),
        // One key: one partition, so the order is the publish order.
        key: "acct-1".into(),
        shard: Some(0),
        payload: "{}".into(),
        created_at_ms: 1,
        position: None,
    }
}

/// Polls until `n` events came (the first group join takes seconds on
/// some brokers), at most `max` per poll.
async fn poll_n(
    sub: &mut Box<dyn shardpay_reference::events::Subscription>,
    n: usize,
) -> Vec<String> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while got.len() < n && tokio::time::Instant::now() < deadline {
        let batch = sub
            .poll(n - got.len(), Duration::from_secs(2))
            .await
            .unwrap();
        got.extend(batch.into_iter().map(|e| e.id));
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kafka_consumer_group_resumes_from_its_committed_offset() {
    let Some(bootstrap) = kafka_server() else {
        return;
    };
    let bus = KafkaBus::connect(kafka_config(&bootstrap)).await.unwrap();
    bus.publish("t", &[event("a"), event("b"), event("c")])
        .await
        .unwrap();
    {
        let mut first = bus.subscribe("t", "g").await.unwrap();
        assert_eq!(poll_n(&mut first, 2).await, ["a", "b"]);
        first.commit().await.unwrap();
        // Read but never committed: the group must hand it out again.
        assert_eq!(poll_n(&mut first, 1).await, ["c"]);
    }
    let mut second = bus.subscribe("t", "g").await.unwrap();
    assert_eq!(poll_n(&mut second, 1).await, ["c"]);
    second.commit().await.unwrap();
    assert!(
        second
            .poll(10, Duration::from_secs(1))
            .await
            .unwrap()
            .is_empty(),
        "nothing after c"
    );
    // Another group reads everything.
    let mut other = bus.subscribe("t", "h").await.unwrap();
    assert_eq!(poll_n(&mut other, 3).await, ["a", "b", "c"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_refuses_a_broker_that_is_not_there_with_a_clear_error() {
    // Nothing listens on port 1.
    let mut config = shardpay_reference::events::kafka::KafkaConfig::new("127.0.0.1:1");
    config.delivery_timeout = Duration::from_secs(2);
    let error = match KafkaBus::connect(config).await {
        Ok(_) => panic!("connected to nothing"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        error.contains("cannot reach the Kafka broker at 127.0.0.1:1")
            && error.contains("scripts/kafka.sh up"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_and_a_consumer_restarted_mid_run_over_kafka_lose_nothing_and_double_nothing() {
    let Some(bootstrap) = kafka_server() else {
        return;
    };
    let app = TestApp::start_with(Options {
        kafka: Some(bootstrap),
        ..Options::default()
    })
    .await;
    let (a, b, c) = app.ids_by_shard("kf");
    for id in [&a, &b, &c] {
        app.create(id, "100.00").await;
    }
    let mut n = 0;
    let mut transfers = |count: usize| {
        let batch: Vec<_> = (0..count)
            .map(|_| {
                n += 1;
                let (from, to) = if n % 2 == 0 { (&a, &b) } else { (&b, &c) };
                (
                    json!({"from": from, "to": to, "amount": "1.00"}),
                    format!("kf-{n}"),
                )
            })
            .collect();
        batch
    };
    let phase1 = transfers(10);
    let phase2 = transfers(20);
    let phase3 = transfers(10);
    for (body, key) in phase1 {
        let (status, answer) = app.post("/v1/transfers", body, Some(&key)).await;
        assert!(matches!(status, 201 | 202), "{answer}");
    }
    eventually(
        "the first transfers to reach analytics over Kafka",
        || async {
            let (_, p) = app.get("/v1/pipeline").await;
            p["complete"] == true
        },
    )
    .await;

    // Stop the relay: transfers keep committing, their events wait in the
    // outbox.
    let relay = app.tasks.lock().unwrap().remove(0);
    relay.abort();
    let _ = relay.await;
    for (body, key) in phase2 {
        let (status, answer) = app.post("/v1/transfers", body, Some(&key)).await;
        assert!(matches!(status, 201 | 202), "{answer}");
    }
    let (_, p) = app.get("/v1/pipeline").await;
    assert!(
        p["outbox_backlog"].as_u64().unwrap() >= 20,
        "a stopped relay leaves the events in the outbox: {p:#}"
    );

    // Restart the analytics consumer of payment events before it commits
    // anything new, and the relay, which this time publishes a batch and
    // dies before marking it (so that batch goes out twice).
    let consumer = app.tasks.lock().unwrap().remove(0);
    consumer.abort();
    let _ = consumer.await;
    let subscription = app
        .pipeline
        .bus
        .subscribe(PAYMENT_EVENTS, ANALYTICS_GROUP)
        .await
        .unwrap();
    tokio::spawn(Arc::clone(&app.pipeline.analytics).run(subscription));
    app.pipeline
        .relay
        .fail_before_mark_once
        .store(true, Ordering::SeqCst);
    tokio::spawn(Arc::clone(&app.pipeline.relay).run(Duration::from_millis(10)));
    for (body, key) in phase3 {
        let (status, answer) = app.post("/v1/transfers", body, Some(&key)).await;
        assert!(matches!(status, 201 | 202), "{answer}");
    }

    eventually("the pipeline to catch up after the restarts", || async {
        let (_, p) = app.get("/v1/pipeline").await;
        p["complete"] == true
    })
    .await;
    let (_, p) = app.get("/v1/pipeline").await;
    let rows = p["outbox_rows"].as_u64().unwrap();
    // 3 accounts, 40 transfers (initiated + completed, or one event for a
    // same-shard transfer: at least one each).
    assert!(rows >= 43, "{p:#}");
    for consumer in p["consumers"].as_array().unwrap() {
        assert_eq!(consumer["applied"].as_u64().unwrap(), rows, "{p:#}");
    }
    assert_eq!(p["relay_failures"], 1, "{p:#}");
    assert!(
        p["published"].as_u64().unwrap() > rows,
        "the failed batch went out twice: {p:#}"
    );
    let analytics = &p["consumers"][0];
    assert_eq!(analytics["group"], "analytics");
    assert!(
        analytics["duplicates_suppressed"].as_u64().unwrap() > 0,
        "repeats reached analytics and were suppressed: {p:#}"
    );

    let (_, totals) = app.get("/v1/analytics").await;
    assert_eq!(totals["matches_shards"], true, "{totals:#}");
    assert_eq!(totals["overall"]["transfers_completed"], 40, "{totals:#}");
    assert_eq!(
        totals["overall"]["volume_minor"]["INR"], 4_000,
        "{totals:#}"
    );
    app.assert_audit_passes().await;
}
