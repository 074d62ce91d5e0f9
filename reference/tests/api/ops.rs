//! The operational surface: request ids, `/metrics`, `/ready`.

use serde_json::json;

use crate::support::TestApp;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_carry_an_id_and_are_counted_in_metrics() {
    let app = TestApp::start().await;
    let (a, b, _) = app.ids_by_shard("ops");
    app.create(&a, "100.00").await;
    app.create(&b, "100.00").await;
    for i in 0..2 {
        let (status, answer) = app
            .post(
                "/v1/transfers",
                json!({"from": a, "to": b, "amount": "1.00"}),
                Some(&format!("ops-{i}")),
            )
            .await;
        assert_eq!(status, 201, "{answer}");
    }
    // An id given is echoed; none given, one is made up.
    let given = app
        .client
        .get(format!("{}/v1/shards", app.url))
        .header("x-request-id", "trace-abc-123")
        .send()
        .await
        .unwrap();
    assert_eq!(given.headers()["x-request-id"], "trace-abc-123");
    let made = app
        .client
        .get(format!("{}/v1/shards", app.url))
        .send()
        .await
        .unwrap();
    assert_eq!(made.headers()["x-request-id"].len(), 16);

    let metrics = app.text(reqwest::Method::GET, "/metrics").await;
    for line in [
        "shardpay_http_requests_total{method=\"POST\",route=\"/v1/transfers\",status=\"201\"} 2",
        "shardpay_http_requests_total{method=\"GET\",route=\"/v1/shards\",status=\"200\"} 2",
        "shardpay_http_request_duration_seconds_count{method=\"POST\",route=\"/v1/transfers\"} 2",
        "shardpay_transfers{state=\"completed\"} 2",
        "shardpay_shard_healthy{shard=\"0\"} 1",
        "shardpay_dlq_size 0",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "missing {line:?} in\n{metrics}"
        );
    }
    assert!(metrics.contains("# TYPE shardpay_http_request_duration_seconds histogram"));
    assert!(metrics.contains("shardpay_outbox_backlog "));
    assert!(metrics.contains("shardpay_consumer_unapplied{group=\"analytics\"}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_answers_503_while_a_shard_is_down() {
    let app = TestApp::start().await;
    let (status, body) = app.get("/ready").await;
    assert_eq!(
        (status, body["ready"].as_bool()),
        (200, Some(true)),
        "{body}"
    );
    app.flaky[1].set_down(true);
    let (status, body) = app.get("/ready").await;
    assert_eq!(status, 503, "{body}");
    let problems = body["problems"].to_string();
    assert!(problems.contains("shard 1"), "{problems}");
    app.flaky[1].set_down(false);
    let (status, _) = app.get("/ready").await;
    assert_eq!(status, 200);
}

/// Every path the API description lists is routed (none answers
/// `route_not_found`), and `/docs` shows each of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_path_is_served() {
    let app = TestApp::start().await;
    let (status, spec) = app.get("/openapi.json").await;
    assert_eq!(status, 200);
    let docs = app.text(reqwest::Method::GET, "/docs").await;
    let paths = spec["paths"].as_object().unwrap();
    assert!(paths.len() >= 20, "{}", paths.len());
    for (path, ops) in paths {
        let concrete = path.replace("{id}", "unknown-id");
        for method in ops.as_object().unwrap().keys() {
            let method = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let response = app
                .client
                .request(method.clone(), format!("{}{concrete}", app.url))
                .json(&json!({}))
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            let body = response.text().await.unwrap_or_default();
            let code = serde_json::from_str::<serde_json::Value>(&body)
                .map(|b| b["error"]["code"].clone())
                .unwrap_or_default();
            assert!(
                status != 405 && code != "route_not_found",
                "{method} {path} is documented but not routed: {status} {body}"
            );
            assert!(
                docs.contains(&format!("<code>{path}</code>")),
                "{path} missing from /docs"
            );
        }
    }
}

/// An account's statement (the ledger service's route) lists its entries
/// oldest first, a page at a time; they add up to its balance. The
/// trial balance shows every shard balanced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_add_up_to_the_balance_and_shards_balance() {
    let app = TestApp::start().await;
    let (a, b, _) = app.ids_by_shard("stmt");
    app.create(&a, "100.00").await;
    app.create(&b, "5.00").await;
    for (i, (from, to, amount)) in [(&a, &b, "12.50"), (&b, &a, "2.25"), (&a, &b, "0.10")]
        .iter()
        .enumerate()
    {
        let (status, answer) = app
            .post(
                "/v1/transfers",
                json!({"from": from, "to": to, "amount": amount}),
                Some(&format!("stmt-{i}")),
            )
            .await;
        assert_eq!(status, 201, "{answer}");
    }
    let mut seen = Vec::new();
    let mut after = "0".to_string();
    loop {
        let (status, page) = app
            .get(&format!("/v1/accounts/{a}/entries?limit=2&after={after}"))
            .await;
        assert_eq!(status, 200, "{page}");
        let entries = page["entries"].as_array().unwrap();
        assert!(entries.len() <= 2);
        seen.extend(entries.iter().cloned());
        match page["next_after"].as_str() {
            Some(next) => after = next.to_string(),
            None => break,
        }
    }
    let amounts: Vec<i64> = seen
        .iter()
        .map(|e| e["amount_minor"].as_i64().unwrap())
        .collect();
    assert_eq!(amounts, [100_00, -12_50, 2_25, -10], "{seen:?}");
    let ids: Vec<i64> = seen.iter().map(|e| e["id"].as_i64().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    assert_eq!(amounts.iter().sum::<i64>(), app.balance_minor(&a).await);

    let (status, body) = app.get("/v1/accounts/nobody/entries").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("account_not_found"))
    );
    let (status, _) = app.get(&format!("/v1/accounts/{a}/entries?limit=0")).await;
    assert_eq!(status, 422);

    let (status, trial) = app.get("/v1/ledger/trial-balance").await;
    assert_eq!(status, 200, "{trial}");
    let shards = trial["shards"].as_array().unwrap();
    assert_eq!(shards.len(), 4);
    for shard in shards {
        assert_eq!(shard["balanced"], true, "{shard}");
    }
}

/// `reference/openapi/openapi.json` is the API description the code makes
/// (from the handlers' annotations and their body types), so a reader of
/// the repository sees what the server serves. After changing a route:
/// `SHARDPAY_WRITE_OPENAPI=1 cargo test --release -p shardpay-reference --test api openapi`.
#[test]
fn the_checked_in_openapi_json_is_the_one_the_code_makes() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi/openapi.json");
    let made = shardpay_reference::api::openapi_json();
    if std::env::var_os("SHARDPAY_WRITE_OPENAPI").is_some() {
        std::fs::write(path, made).unwrap();
    }
    let kept = std::fs::read_to_string(path).unwrap();
    assert!(
        kept == made,
        "reference/openapi/openapi.json differs from what the code makes; rewrite it with \
         SHARDPAY_WRITE_OPENAPI=1 cargo test --release -p shardpay-reference --test api openapi"
    );
}
