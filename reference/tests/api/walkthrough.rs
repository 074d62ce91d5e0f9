//! The modelled system's README walkthrough, through its own routes.

use crate::support::TestApp;

#[tokio::test]
async fn walkthrough_leaves_the_documented_balances_and_passes_the_audit() {
    let app = TestApp::start().await;
    for (user, balance) in [("alice", "500.00"), ("bob", "300.00"), ("coffee_shop", "0")] {
        let (status, body) = app
            .post_empty(&format!("/create_user/{user}/{balance}"))
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["success"], true);
        assert_eq!(body["user"], user);
    }
    let pay = app
        .text(reqwest::Method::POST, "/transfer/alice/coffee_shop/4.50")
        .await;
    // Written from minor units: exact decimal text, never a float.
    assert!(pay.contains(r#""amount":4.50"#), "{pay}");
    let pay: serde_json::Value = serde_json::from_str(&pay).unwrap();
    assert_eq!(pay["success"], true);
    assert!(pay["payment_id"].as_str().unwrap().starts_with("tr_"));
    let (status, _) = app.post_empty("/transfer/alice/bob/25.00").await;
    assert_eq!(status, 200);

    for (user, expected) in [
        ("alice", "470.50"),
        ("bob", "325.00"),
        ("coffee_shop", "4.50"),
    ] {
        let body = app
            .text(reqwest::Method::GET, &format!("/user_shard/{user}"))
            .await;
        assert!(body.contains(r#""exists":true"#), "{body}");
        assert!(
            body.contains(&format!(r#""balance":{expected}"#)),
            "{user}: {body}"
        );
    }
    let stats = app.text(reqwest::Method::GET, "/stats").await;
    assert!(stats.contains(r#""total_balance":800.00"#), "{stats}");
    assert!(stats.contains(r#""total_accounts":3"#), "{stats}");
    assert!(stats.contains(r#""healthy_shards":4"#), "{stats}");
    let analytics = app.text(reqwest::Method::GET, "/analytics").await;
    assert!(
        analytics.contains(r#""average_balance":266.67"#),
        "{analytics}"
    );
    let (_, health) = app.get("/health").await;
    assert_eq!(health["ok"], true);
    assert_eq!(health["service"], "shard-manager");
    let (_, route) = app.get("/user/alice/shard").await;
    assert_eq!(route["total_shards"], 4);
    let (_, unknown) = app.get("/user_shard/nobody").await;
    assert_eq!(unknown["exists"], false);
    let (status, _) = app.post_empty("/accounts/dave/create/1250").await;
    assert_eq!(status, 200);
    let dave = app.text(reqwest::Method::GET, "/accounts/dave").await;
    assert!(dave.contains(r#""balance":12.50"#), "{dave}");
    let (_, users) = app.get("/users").await;
    assert_eq!(users["total"], 4);
    app.assert_audit_passes().await;
}

#[tokio::test]
async fn v1_api_creates_reads_and_lists() {
    let app = TestApp::start().await;
    let (status, created) = app
        .post(
            "/v1/accounts",
            serde_json::json!({"id": "erin", "opening_balance": "10.05"}),
            None,
        )
        .await;
    assert_eq!(status, 201);
    assert_eq!(created["balance_minor"], 1005);
    assert_eq!(created["currency"], "INR");
    app.create("frank", "0").await;
    let (status, t) = app
        .post(
            "/v1/transfers",
            serde_json::json!({"from": "erin", "to": "frank", "amount": "0.05"}),
            None,
        )
        .await;
    assert_eq!(status, 201, "{t}");
    assert_eq!(t["state"], "completed");
    let (status, fetched) = app
        .get(&format!("/v1/transfers/{}", t["id"].as_str().unwrap()))
        .await;
    assert_eq!(status, 200);
    assert_eq!(fetched["amount_minor"], 5);
    let (_, page) = app.get("/v1/accounts?limit=1").await;
    assert_eq!(page["data"][0]["id"], "erin");
    assert_eq!(page["next_after"], "erin");
    let (_, page) = app.get("/v1/accounts?after=erin").await;
    assert_eq!(page["data"][0]["id"], "frank");
    assert!(page["next_after"].is_null());
    let (_, shards) = app.get("/v1/shards").await;
    assert_eq!(shards["shards"].as_array().unwrap().len(), 4);
    assert_eq!(app.balance_minor("frank").await, 5);
}
