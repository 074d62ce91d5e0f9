//! Bulk account creation and transfer lookup: the endpoints a load
//! generator uses to set up fast and to check its books.

use serde_json::json;

use crate::support::TestApp;

#[tokio::test]
async fn bulk_creates_each_account_on_its_own() {
    let app = TestApp::start().await;
    app.create("taken", "1.00").await;
    let accounts: Vec<_> = (0..300)
        .map(|i| json!({"id": format!("b{i}"), "opening_balance_minor": 1000 + i}))
        .chain([
            json!({"id": "taken", "opening_balance": "5.00"}),
            json!({"id": "bad id!", "opening_balance": "5.00"}),
            json!({"id": "neg", "opening_balance": "-5.00"}),
        ])
        .collect();
    let (status, body) = app
        .post("/v1/accounts/bulk", json!({ "accounts": accounts }), None)
        .await;
    assert_eq!(status, 200, "{body}");
    let results = body["results"].as_array().unwrap();
    assert_eq!(results.len(), 303);
    for (i, r) in results.iter().take(300).enumerate() {
        assert_eq!(r["status"], 201, "{r}");
        assert_eq!(r["id"], format!("b{i}"));
        assert_eq!(r["account"]["balance_minor"], 1000 + i as i64);
        assert!(r["account"]["shard"].as_u64().unwrap() < 4);
    }
    assert_eq!(results[300]["status"], 409, "{}", results[300]);
    assert_eq!(results[301]["status"], 400, "{}", results[301]);
    assert_eq!(results[301]["error"]["code"], "invalid_account_id");
    assert_eq!(
        results[302]["error"]["code"], "negative_amount",
        "{}",
        results[302]
    );
    // The refused ones changed nothing; the created ones are real.
    assert_eq!(app.balance_minor("taken").await, 100);
    assert_eq!(app.balance_minor("b299").await, 1299);
    let (status, _) = app.get("/v1/accounts/neg").await;
    assert_eq!(status, 404);
    app.assert_audit_passes().await;

    // Too many, or none, is refused whole.
    let many: Vec<_> = (0..501).map(|i| json!({"id": format!("m{i}")})).collect();
    let (status, body) = app
        .post("/v1/accounts/bulk", json!({ "accounts": many }), None)
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (422, Some("bulk_size"))
    );
    let (status, _) = app.get("/v1/accounts/m0").await;
    assert_eq!(status, 404);
    let (status, _) = app
        .post("/v1/accounts/bulk", json!({ "accounts": [] }), None)
        .await;
    assert_eq!(status, 422);
}

#[tokio::test]
async fn lookup_finds_transfers_on_any_shard() {
    let app = TestApp::start().await;
    let (payer, same, other) = app.ids_by_shard("lk");
    app.create(&payer, "100.00").await;
    app.create(&same, "0").await;
    app.create(&other, "0").await;
    let mut ids = Vec::new();
    for to in [&same, &other] {
        let (status, t) = app
            .post(
                "/v1/transfers",
                json!({"from": payer, "to": to, "amount": "1.00"}),
                None,
            )
            .await;
        assert_eq!(status, 201, "{t}");
        ids.push(t["id"].as_str().unwrap().to_string());
    }
    let unknown = "tr_00000000000000000000000000000000".to_string();
    let (status, body) = app
        .post(
            "/v1/transfers/lookup",
            json!({ "ids": [ids[0], unknown, ids[1]] }),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let found = body["found"].as_array().unwrap();
    assert_eq!(found.len(), 2);
    assert_eq!(found[0]["id"], ids[0]);
    assert_eq!(found[1]["id"], ids[1]);
    assert_eq!(found[1]["cross_shard"], true);
    assert_eq!(found[1]["state"], "completed");
    assert_eq!(body["missing"], json!([unknown]));
    let (status, body) = app
        .post("/v1/transfers/lookup", json!({ "ids": ["nope"] }), None)
        .await;
    assert_eq!(status, 400, "{body}");
}
