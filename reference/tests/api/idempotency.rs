//! Idempotency keys follow Stripe's rules: same key and body replays the
//! first answer, same key with another body is refused, a concurrent
//! duplicate gets a conflict.

use std::sync::Arc;

use serde_json::json;
use shardpay_reference::manager::ManagerConfig;

use crate::support::{eventually, Options, TestApp};

async fn replays_the_first_answer(cross_shard: bool) {
    let app = TestApp::start().await;
    let (payer, same, other) = app.ids_by_shard("idem");
    let payee = if cross_shard { other } else { same };
    app.create(&payer, "100.00").await;
    app.create(&payee, "0").await;
    let body = json!({"from": payer, "to": payee, "amount": "7.25"});
    let url = format!("{}/v1/transfers", app.url);
    let send = || {
        app.client
            .post(&url)
            .header("Idempotency-Key", "order-1")
            .json(&body)
            .send()
    };
    let first = send().await.unwrap();
    assert_eq!(first.status(), 201);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first: serde_json::Value = first.json().await.unwrap();
    for _ in 0..3 {
        let again = send().await.unwrap();
        assert_eq!(again.status(), 201);
        assert_eq!(again.headers()["idempotent-replayed"], "true");
        let again: serde_json::Value = again.json().await.unwrap();
        assert_eq!(
            again, first,
            "a replay must be the first answer, byte for byte"
        );
    }
    assert_eq!(app.balance_minor(&payer).await, 100_00 - 7_25);
    assert_eq!(app.balance_minor(&payee).await, 7_25);

    // Same key, another body: refused, nothing moves.
    let changed = json!({"from": payer, "to": payee, "amount": "7.26"});
    let (status, err) = app.post("/v1/transfers", changed, Some("order-1")).await;
    assert_eq!(status, 422);
    assert_eq!(err["error"]["code"], "idempotency_key_reused");
    // The same key on the modelled system's route is another request too.
    let (status, _) = app
        .client
        .post(format!("{}/transfer/{payer}/{payee}/7.25", app.url))
        .header("Idempotency-Key", "order-1")
        .send()
        .await
        .map(|r| (r.status().as_u16(), ()))
        .unwrap();
    assert_eq!(status, 422);
    // Keys are scoped to the payer: another payer may use the same key.
    app.create("other_payer", "1.00").await;
    let (status, _) = app
        .post(
            "/v1/transfers",
            json!({"from": "other_payer", "to": payee, "amount": "1.00"}),
            Some("order-1"),
        )
        .await;
    assert!(status == 201, "{status}");
    assert_eq!(app.balance_minor(&payer).await, 100_00 - 7_25);
    app.assert_audit_passes().await;
}

#[tokio::test]
async fn same_shard_retry_replays_and_pays_once() {
    replays_the_first_answer(false).await;
}

#[tokio::test]
async fn cross_shard_retry_replays_and_pays_once() {
    replays_the_first_answer(true).await;
}

#[tokio::test]
async fn concurrent_duplicate_gets_a_conflict() {
    let app = Arc::new(TestApp::start().await);
    let (payer, payee, _) = app.ids_by_shard("dup");
    app.create(&payer, "50.00").await;
    app.create(&payee, "0").await;
    let shard = app.manager.ring().shard_of_key(&payer).index();
    app.flaky[shard].close_gate();
    let body = json!({"from": payer, "to": payee, "amount": "5.00"});
    let first = {
        let (app, body) = (Arc::clone(&app), body.clone());
        tokio::spawn(async move { app.post("/v1/transfers", body, Some("k-1")).await })
    };
    eventually("the first request to reach the shard", || async {
        app.flaky[shard].waiting() == 1
    })
    .await;
    let (status, err) = app.post("/v1/transfers", body.clone(), Some("k-1")).await;
    assert_eq!(status, 409);
    assert_eq!(err["error"]["code"], "idempotency_key_in_flight");
    app.flaky[shard].release_gate();
    let (status, done) = first.await.unwrap();
    assert_eq!(status, 201, "{done}");
    let (status, replay) = app.post("/v1/transfers", body, Some("k-1")).await;
    assert_eq!((status, &replay), (201, &done));
    assert_eq!(app.balance_minor(&payee).await, 5_00);
}

#[tokio::test]
async fn a_declined_transfer_replays_its_decline() {
    let app = TestApp::start().await;
    app.create("poor", "1.00").await;
    app.create("shop", "0").await;
    let body = json!({"from": "poor", "to": "shop", "amount": "2.00"});
    let (status, first) = app.post("/v1/transfers", body.clone(), Some("buy-1")).await;
    assert_eq!(status, 422);
    assert_eq!(first["error"]["code"], "insufficient_funds");
    // Funds arrive, but the key still answers what it answered first.
    app.create("rich", "10.00").await;
    let (s, _) = app
        .post(
            "/v1/transfers",
            json!({"from": "rich", "to": "poor", "amount": "5.00"}),
            None,
        )
        .await;
    assert_eq!(s, 201);
    let (status, again) = app.post("/v1/transfers", body.clone(), Some("buy-1")).await;
    assert_eq!((status, &again), (422, &first));
    let (status, _) = app.post("/v1/transfers", body, Some("buy-2")).await;
    assert_eq!(status, 201);
    app.assert_audit_passes().await;
}

#[tokio::test]
async fn account_creation_is_idempotent() {
    let app = TestApp::start().await;
    let body = json!({"id": "gina", "opening_balance": "20.00"});
    let (s1, first) = app
        .post("/v1/accounts", body.clone(), Some("signup-gina"))
        .await;
    let (s2, second) = app.post("/v1/accounts", body, Some("signup-gina")).await;
    assert_eq!((s1, s2), (201, 201));
    assert_eq!(first, second);
    let (s3, err) = app
        .post(
            "/v1/accounts",
            json!({"id": "gina", "opening_balance": "30.00"}),
            Some("signup-gina"),
        )
        .await;
    assert_eq!(
        (s3, err["error"]["code"].as_str()),
        (422, Some("idempotency_key_reused"))
    );
    let (s4, err) = app.post("/v1/accounts", json!({"id": "gina"}), None).await;
    assert_eq!(
        (s4, err["error"]["code"].as_str()),
        (409, Some("account_exists"))
    );
    assert_eq!(app.balance_minor("gina").await, 20_00);
    app.assert_audit_passes().await;
}

#[tokio::test]
async fn an_expired_key_is_a_new_request() {
    let app = TestApp::start_with(Options {
        manager: ManagerConfig {
            idempotency_ttl_ms: 0,
            ..ManagerConfig::default()
        },
        ..Options::default()
    })
    .await;
    app.create("hal", "10.00").await;
    app.create("ivy", "0").await;
    let body = json!({"from": "hal", "to": "ivy", "amount": "1.00"});
    let (_, a) = app.post("/v1/transfers", body.clone(), Some("k")).await;
    let (_, b) = app.post("/v1/transfers", body, Some("k")).await;
    assert_ne!(a["id"], b["id"]);
    assert_eq!(app.balance_minor("ivy").await, 2_00);
}
