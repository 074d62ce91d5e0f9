//! Webhooks: deliveries are signed; a receiver that fails every call fills
//! the dead-letter store; once it recovers, a replay delivers each event
//! once, and a replay of a delivery already made is recognised, not sent.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use serde_json::json;
use shardpay_reference::notification::verify;

use crate::support::{eventually, TestApp};

#[derive(Default)]
struct Receiver {
    secret: Mutex<String>,
    failing: AtomicBool,
    calls: AtomicU64,
    bad_signatures: AtomicU64,
    /// Event ids accepted, in order.
    accepted: Mutex<Vec<String>>,
}

async fn receive(State(r): State<Arc<Receiver>>, headers: HeaderMap, body: String) -> StatusCode {
    r.calls.fetch_add(1, Ordering::SeqCst);
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let secret = r.secret.lock().unwrap().clone();
    if !verify(
        &secret,
        &header("shardpay-timestamp"),
        &header("shardpay-signature"),
        &body,
        now,
    ) {
        r.bad_signatures.fetch_add(1, Ordering::SeqCst);
        return StatusCode::UNAUTHORIZED;
    }
    if r.failing.load(Ordering::SeqCst) {
        return StatusCode::INTERNAL_SERVER_ERROR;
    }
    let event: serde_json::Value = serde_json::from_str(&body).unwrap();
    r.accepted
        .lock()
        .unwrap()
        .push(event["id"].as_str().unwrap().to_string());
    StatusCode::OK
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_receiver_fills_the_dead_letter_store_and_a_replay_delivers_each_event_once() {
    let receiver = Arc::new(Receiver::default());
    receiver.failing.store(true, Ordering::SeqCst);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook_url = format!("http://{}/hook", listener.local_addr().unwrap());
    let router = axum::Router::new()
        .route("/hook", axum::routing::post(receive))
        .with_state(Arc::clone(&receiver));
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });

    let app = TestApp::start().await;
    let (payer, payee, _) = app.ids_by_shard("wh");
    app.create(&payer, "100.00").await;
    app.create(&payee, "0").await;
    // Registered once the accounts' own events are through, so only the
    // transfers' events concern the webhook.
    eventually("the pipeline to catch up", || async {
        app.get("/v1/pipeline").await.1["complete"] == true
    })
    .await;
    let (status, hook) = app
        .post(
            "/v1/webhooks",
            json!({"account": payee, "url": hook_url}),
            None,
        )
        .await;
    assert_eq!(status, 201, "{hook}");
    *receiver.secret.lock().unwrap() = hook["secret"].as_str().unwrap().to_string();
    let (status, bad) = app
        .post(
            "/v1/webhooks",
            json!({"account": payee, "url": "ftp://x"}),
            None,
        )
        .await;
    assert_eq!(
        (status, &bad["error"]["code"]),
        (422, &json!("invalid_url"))
    );

    // Three same-shard transfers: each makes transfer.completed (from the
    // outbox) and fraud.scored (from the fraud checks) about the payee.
    for i in 0..3 {
        let body = json!({"from": payer, "to": payee, "amount": "1.00"});
        let (status, answer) = app
            .post("/v1/transfers", body, Some(&format!("wh-{i}")))
            .await;
        assert_eq!(status, 201, "{answer}");
    }
    eventually("six deliveries to fail every attempt", || async {
        app.get("/v1/dlq").await.1["dead_letters"]
            .as_array()
            .map_or(0, |l| l.len())
            == 6
    })
    .await;
    assert_eq!(receiver.bad_signatures.load(Ordering::SeqCst), 0);
    assert_eq!(
        receiver.calls.load(Ordering::SeqCst),
        6 * 5,
        "five attempts each"
    );
    assert!(receiver.accepted.lock().unwrap().is_empty());

    receiver.failing.store(false, Ordering::SeqCst);
    let (_, dlq) = app.get("/v1/dlq").await;
    let first = dlq["dead_letters"][0]["id"].as_str().unwrap().to_string();
    // The same letter twice in one replay: sent once, then recognised.
    let (status, outcome) = app
        .post("/v1/dlq/replay", json!({"ids": [first, first]}), None)
        .await;
    assert_eq!(status, 200, "{outcome}");
    assert_eq!(outcome["delivered"], 1, "{outcome}");
    assert_eq!(outcome["already_delivered"], 1, "{outcome}");
    let (_, outcome) = app.post("/v1/dlq/replay", json!({"all": true}), None).await;
    assert_eq!(outcome["delivered"], 5, "{outcome}");
    let (_, outcome) = app.post("/v1/dlq/replay", json!({"all": true}), None).await;
    assert_eq!(outcome["delivered"], 0, "the store is empty now: {outcome}");

    let accepted = receiver.accepted.lock().unwrap().clone();
    let distinct: std::collections::HashSet<&String> = accepted.iter().collect();
    assert_eq!(accepted.len(), 6, "{accepted:?}");
    assert_eq!(distinct.len(), 6, "each event once: {accepted:?}");
    assert_eq!(receiver.bad_signatures.load(Ordering::SeqCst), 0);

    let (_, p) = app.get("/v1/pipeline").await;
    assert_eq!(p["notification"]["dead_lettered"], 6, "{p:#}");
    assert_eq!(p["notification"]["dlq_size"], 0, "{p:#}");
    assert_eq!(p["unapplied"]["notification"], 0, "{p:#}");
}
