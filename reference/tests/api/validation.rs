//! Bad input gets a 4xx with a JSON error code, and changes nothing.

use serde_json::json;

use crate::support::TestApp;

async fn snapshot(app: &TestApp) -> (serde_json::Value, serde_json::Value) {
    let (_, shards) = app.get("/v1/shards").await;
    let (_, accounts) = app.get("/v1/accounts").await;
    (shards, accounts)
}

#[tokio::test]
async fn bad_requests_get_clear_errors_and_write_nothing() {
    let app = TestApp::start().await;
    app.create("alice", "100.00").await;
    app.create("bob", "0").await;
    let (_, usd) = app
        .post(
            "/v1/accounts",
            json!({"id": "usd_user", "currency": "USD"}),
            None,
        )
        .await;
    assert_eq!(usd["currency"], "USD");
    let before = snapshot(&app).await;

    let cases: Vec<(serde_json::Value, u16, &str)> = vec![
        (
            json!({"from": "alice", "to": "bob", "amount": "4.505"}),
            422,
            "amount_too_precise",
        ),
        (
            json!({"from": "alice", "to": "bob", "amount": "-1.00"}),
            422,
            "negative_amount",
        ),
        (
            json!({"from": "alice", "to": "bob", "amount": "0"}),
            422,
            "zero_amount",
        ),
        (
            json!({"from": "alice", "to": "bob", "amount": "abc"}),
            422,
            "invalid_amount",
        ),
        (
            json!({"from": "alice", "to": "bob", "amount": "99999999999999999999"}),
            422,
            "amount_too_large",
        ),
        (
            json!({"from": "alice", "to": "bob", "amount": 4.5}),
            400,
            "invalid_body",
        ),
        (json!({"from": "alice", "to": "bob"}), 422, "missing_amount"),
        (
            json!({"from": "alice", "to": "bob", "amount": "1", "amount_minor": 100}),
            422,
            "ambiguous_amount",
        ),
        (
            json!({"from": "alice", "to": "nobody", "amount": "1.00"}),
            404,
            "account_not_found",
        ),
        (
            json!({"from": "nobody", "to": "alice", "amount": "1.00"}),
            404,
            "account_not_found",
        ),
        (
            json!({"from": "alice", "to": "alice", "amount": "1.00"}),
            422,
            "same_account",
        ),
        (
            json!({"from": "alice", "to": "usd_user", "amount": "1.00"}),
            422,
            "currency_mismatch",
        ),
        (
            json!({"from": "alice", "to": "bob", "amount": "1.00", "currency": "XXX"}),
            422,
            "unsupported_currency",
        ),
        (
            json!({"from": "alice", "to": "bob", "amount": "1.00", "memo": "x"}),
            400,
            "invalid_body",
        ),
        (
            json!({"from": "a b", "to": "bob", "amount": "1.00"}),
            400,
            "invalid_account_id",
        ),
        (
            json!({"from": "bob", "to": "alice", "amount": "1.00"}),
            422,
            "insufficient_funds",
        ),
    ];
    for (body, status, code) in cases {
        let (got, answer) = app.post("/v1/transfers", body.clone(), None).await;
        assert_eq!(got, status, "{body} -> {answer}");
        assert_eq!(answer["error"]["code"], code, "{body} -> {answer}");
        assert!(answer["error"]["message"].as_str().unwrap().len() > 5);
    }

    // Malformed JSON, wrong content type, oversized body.
    let url = format!("{}/v1/transfers", app.url);
    let r = app
        .client
        .post(&url)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["error"]["code"],
        "malformed_json"
    );
    let r = app.client.post(&url).body("{}").send().await.unwrap();
    assert_eq!(r.status(), 415);
    let huge = format!("{{\"from\":\"{}\"}}", "a".repeat(100_000));
    let r = app
        .client
        .post(&url)
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["error"]["code"],
        "body_too_large"
    );
    let r = app
        .client
        .post(&url)
        .header("Idempotency-Key", "has space")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    // The modelled system's routes refuse the same way.
    let (status, body) = app.post_empty("/transfer/alice/bob/1.001").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (422, Some("amount_too_precise"))
    );
    let (status, _) = app.post_empty("/transfer/alice/ghost/1.00").await;
    assert_eq!(status, 404);
    let (status, body) = app.post_empty("/create_user/alice/5.00").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("account_exists"))
    );
    let (status, _) = app.post_empty("/create_user/carol/-5").await;
    assert_eq!(status, 422);
    let (status, body) = app.get("/no/such/route").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("route_not_found"))
    );

    assert_eq!(
        snapshot(&app).await,
        before,
        "a refused request changed state"
    );
    assert_eq!(app.balance_minor("alice").await, 100_00);
    app.assert_audit_passes().await;
}
