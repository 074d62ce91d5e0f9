//! Fraud checks before a transfer commits: a burst of large round payments
//! to new payees is blocked and touches no balance; the scoring endpoint
//! answers decision, score and reasons; thresholds come from config.

use serde_json::json;
use shardpay_reference::fraud::FraudConfig;

use crate::support::{Options, TestApp};

#[tokio::test]
async fn a_burst_of_large_round_payments_to_new_payees_is_blocked_and_pays_nothing() {
    let app = TestApp::start().await;
    app.create("mallory", "1000000.00").await;
    for i in 0..4 {
        app.create(&format!("mule{i}"), "0").await;
    }
    let mut answers = Vec::new();
    for i in 0..4 {
        let body = json!({"from": "mallory", "to": format!("mule{i}"), "amount": "40000.00"});
        answers.push(
            app.post("/v1/transfers", body, Some(&format!("burst-{i}")))
                .await,
        );
    }
    // 40,000.00 is large (+25), round (+15), to a new payee (+15): review,
    // let through. The third takes the payer past 100,000.00 in a minute
    // (+30): blocked.
    assert_eq!(answers[0].0, 201, "{:?}", answers[0]);
    assert_eq!(answers[1].0, 201, "{:?}", answers[1]);
    for (status, body) in &answers[2..] {
        assert_eq!(*status, 403, "{body}");
        assert_eq!(body["error"]["code"], "transfer_blocked");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("velocity_sum"), "{message}");
    }
    // A retry with the same key replays the block, word for word, even
    // though its velocity has changed since.
    let body = json!({"from": "mallory", "to": "mule2", "amount": "40000.00"});
    let again = app.post("/v1/transfers", body, Some("burst-2")).await;
    assert_eq!(again, answers[2]);
    assert_eq!(app.balance_minor("mule2").await, 0);
    assert_eq!(app.balance_minor("mule3").await, 0);
    assert_eq!(app.balance_minor("mallory").await, 1_000_000_00 - 80_000_00);
    app.assert_audit_passes().await;

    // The scoring endpoint gives the reasons and moves nothing.
    let (status, score) = app
        .post(
            "/v1/fraud/score",
            json!({"from": "mallory", "to": "mule0", "amount": "5.00"}),
            None,
        )
        .await;
    assert_eq!(status, 200, "{score}");
    // Only the sum rule fires for a small payment to a payee paid before.
    assert_eq!(score["decision"], "allow", "{score}");
    assert_eq!(score["score"], 30, "{score}");
    let reasons: Vec<&str> = score["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    assert_eq!(reasons, ["velocity_sum"], "mule0 was paid before");
    assert_eq!(app.balance_minor("mule0").await, 40_000_00);

    // Every decision on a transfer was published; analytics counts them by
    // kind (the replayed block was not scored again, and the scoring
    // endpoint only answers).
    crate::support::eventually("analytics to see the decisions", || async {
        let (_, a) = app.get("/v1/analytics").await;
        a["overall"]["fraud_decisions"] == json!({"review": 2, "block": 2})
    })
    .await;
}

#[tokio::test]
async fn everyday_payments_are_allowed() {
    let app = TestApp::start().await;
    app.create("alice", "500.00").await;
    app.create("bob", "0").await;
    for i in 0..10 {
        let body = json!({"from": "alice", "to": "bob", "amount": "4.50"});
        let (status, answer) = app
            .post("/v1/transfers", body, Some(&format!("coffee-{i}")))
            .await;
        assert_eq!(status, 201, "{answer}");
    }
    let (_, score) = app
        .post(
            "/v1/fraud/score",
            json!({"from": "alice", "to": "bob", "amount_minor": 450}),
            None,
        )
        .await;
    assert_eq!(score["decision"], "allow", "{score}");
    assert_eq!(score["score"], 0, "{score}");
}

#[tokio::test]
async fn thresholds_come_from_config_and_checks_can_be_off() {
    let strict = TestApp::start_with(Options {
        fraud: Some(FraudConfig {
            review_amount_minor: 1_00,
            block_score: 25,
            review_score: 10,
            ..FraudConfig::default()
        }),
        ..Options::default()
    })
    .await;
    strict.create("carol", "100.00").await;
    strict.create("dave", "0").await;
    let body = json!({"from": "carol", "to": "dave", "amount": "2.00"});
    let (status, answer) = strict.post("/v1/transfers", body.clone(), None).await;
    assert_eq!(
        (status, &answer["error"]["code"]),
        (403, &json!("transfer_blocked"))
    );
    assert_eq!(strict.balance_minor("carol").await, 100_00);

    let off = TestApp::start_with(Options {
        fraud: None,
        ..Options::default()
    })
    .await;
    off.create("carol", "1000000.00").await;
    off.create("dave", "0").await;
    for i in 0..4 {
        let body = json!({"from": "carol", "to": "dave", "amount": "40000.00"});
        let (status, answer) = off
            .post("/v1/transfers", body, Some(&format!("k{i}")))
            .await;
        assert_eq!(status, 201, "{answer}");
    }
    let (status, answer) = off
        .post(
            "/v1/fraud/score",
            json!({"from": "carol", "to": "dave", "amount_minor": 1}),
            None,
        )
        .await;
    assert_eq!(
        (status, &answer["error"]["code"]),
        (404, &json!("fraud_checks_off"))
    );
}
