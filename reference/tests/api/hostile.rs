//! Hostile input and hostile users: each attack that once worked against
//! the reference system, kept as a test, and the permission table walked
//! as a matrix of every route and every kind of caller. After every
//! refusal the balances and the audit are unchanged.

use reqwest::Method;
use serde_json::{json, Value};
use shardpay_reference::http::permissions::{Access, TABLE};

use crate::support::{auth_service, Options, TestApp, TEST_SECRET};

async fn app_with_auth() -> TestApp {
    TestApp::start_with(Options {
        auth: Some(auth_service(None, |_| {}).await),
        ..Options::default()
    })
    .await
}

fn token(login: &Value) -> String {
    login["access_token"].as_str().unwrap().to_string()
}

fn assert_error_shape(status: u16, answer: &Value, what: &str) {
    assert!(
        (400..500).contains(&status),
        "{what}: answered {status}: {answer}"
    );
    assert!(
        answer["error"]["code"]
            .as_str()
            .is_some_and(|c| !c.is_empty())
            && answer["error"]["message"].is_string(),
        "{what}: not the error shape: {answer}"
    );
}

/// Every customer balance, straight from the shards.
async fn all_balances(app: &TestApp) -> Vec<(String, i64)> {
    app.manager
        .list_accounts(None, 1000)
        .await
        .unwrap()
        .into_iter()
        .map(|a| (a.id.to_string(), a.balance_minor))
        .collect()
}

async fn audit_ok(app: &TestApp, admin: &str) {
    let (status, report, _) = app.call(Method::GET, "/v1/audit", Some(admin), None).await;
    assert_eq!(
        (status, report["ok"].as_bool()),
        (200, Some(true)),
        "{report}"
    );
}

/// An amount of 30,000 dashes once recursed once per dash in the parser,
/// overflowed the stack and aborted the whole process. Through every entry
/// point that parses an amount: a clear 4xx, and the server stays up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_amount_of_thirty_thousand_dashes_is_refused_everywhere() {
    let app = app_with_auth().await;
    let admin = token(&app.login("admin", "admin-password", false).await);
    let alice = token(&app.login("alice", "alice-password", true).await);
    let (status, answer, _) = app
        .call(
            Method::POST,
            "/v1/accounts",
            Some(&admin),
            Some(json!({"id": "alice-main", "owner": "alice", "opening_balance": "100.00"})),
        )
        .await;
    assert_eq!(status, 201, "{answer}");
    app.create_as(&admin, "bob-main", None, "0").await;
    let before = all_balances(&app).await;
    let dashes = "-".repeat(30_000);
    let long_digits = "9".repeat(30_000);
    for amount in [dashes.as_str(), long_digits.as_str(), "--1", "-1"] {
        let cases: Vec<(Method, String, Option<&str>, Option<Value>)> = vec![
            (
                Method::POST,
                "/v1/accounts".into(),
                Some(&admin),
                Some(json!({"id": "x-1", "opening_balance": amount})),
            ),
            (
                Method::POST,
                "/v1/transfers".into(),
                Some(&alice),
                Some(json!({"from": "alice-main", "to": "bob-main", "amount": amount})),
            ),
            (
                Method::POST,
                "/v1/fraud/score".into(),
                Some(&admin),
                Some(json!({"from": "alice-main", "to": "bob-main", "amount": amount})),
            ),
            (
                Method::POST,
                format!("/create_user/alice/{amount}"),
                Some(&alice),
                None,
            ),
            (
                Method::POST,
                format!("/transfer/alice-main/bob-main/{amount}"),
                Some(&alice),
                None,
            ),
            (
                Method::POST,
                format!("/accounts/alice/create/{amount}"),
                Some(&admin),
                None,
            ),
        ];
        for (method, path, who, body) in cases {
            let (status, answer, _) = app.call(method, &path, who, body).await;
            assert_error_shape(status, &answer, &path[..path.len().min(60)]);
            assert!(
                answer.to_string().len() < 2_000,
                "the error does not echo the whole input back"
            );
        }
    }
    let (status, _) = app.get("/health").await;
    assert_eq!(status, 200, "the server is still up");
    assert_eq!(all_balances(&app).await, before);
    audit_ok(&app, &admin).await;
}

/// Creating an account that exists once recorded the caller as its owner
/// before the create failed with 409; an account without an owner could
/// then be drained by anyone. Ownership now follows only the create that
/// made the account.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_account_cannot_be_taken_over() {
    let app = app_with_auth().await;
    let admin = token(&app.login("admin", "admin-password", false).await);
    let mallory = token(&app.login("mallory", "mallory-pass", true).await);
    let _victim = token(&app.login("victim", "victim-pass", true).await);
    // Ownerless accounts with money: made by an admin without an owner,
    // one of them named like the attacker (the modelled system's route
    // creates "the account named after its user").
    app.create_as(&admin, "treasury", None, "500.00").await;
    app.create_as(&admin, "mallory", None, "500.00").await;
    app.create_as(&admin, "sink", None, "0").await;
    let before = all_balances(&app).await;

    let attempts: Vec<(&str, Value)> = vec![
        ("/v1/accounts", json!({"id": "treasury"})),
        ("/create_user/mallory/0", Value::Null),
        ("/accounts/mallory/create/0", Value::Null),
    ];
    for (path, body) in attempts {
        let body = (!body.is_null()).then_some(body);
        let (status, answer, _) = app.call(Method::POST, path, Some(&mallory), body).await;
        // 403: not a name of hers; 409: exists.
        assert!(matches!(status, 403 | 409), "{path}: {status} {answer}");
    }
    // Bulk (admin) naming an owner for an existing account: that item
    // fails and records nothing.
    let (status, answer, _) = app
        .call(
            Method::POST,
            "/v1/accounts/bulk",
            Some(&admin),
            Some(json!({"accounts": [{"id": "treasury", "owner": "mallory"}, {"id": "fresh-1", "owner": "victim"}]})),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["results"][0]["status"], 409, "{answer}");
    assert_eq!(answer["results"][1]["status"], 201, "{answer}");

    for from in ["treasury", "mallory"] {
        let (status, answer, _) = app
            .call(
                Method::POST,
                "/v1/transfers",
                Some(&mallory),
                Some(json!({"from": from, "to": "sink", "amount": "1.00"})),
            )
            .await;
        assert_eq!(
            (status, answer["error"]["code"].as_str()),
            (403, Some("not_account_owner")),
            "{from}: {answer}"
        );
        let (status, _, _) = app
            .call(
                Method::POST,
                &format!("/transfer/{from}/sink/1.00"),
                Some(&mallory),
                None,
            )
            .await;
        assert_eq!(status, 403, "{from} via the modelled route");
    }
    let mut expected = before.clone();
    expected.push(("fresh-1".into(), 0));
    expected.sort();
    let mut now = all_balances(&app).await;
    now.sort();
    assert_eq!(now, expected, "nothing moved");
    let (status, owner, _) = app
        .call(Method::GET, "/v1/auth/owners/treasury", Some(&admin), None)
        .await;
    assert_eq!((status, &owner["owner"]), (200, &Value::Null), "{owner}");
    let (_, owner, _) = app
        .call(Method::GET, "/v1/auth/owners/fresh-1", Some(&admin), None)
        .await;
    assert_eq!(
        owner["owner"], "victim",
        "the create that made it records its owner"
    );

    // An admin gives an ownerless account to a user; owners never change.
    let (status, answer, _) = app
        .call(
            Method::PUT,
            "/v1/auth/owners/mallory",
            Some(&admin),
            Some(json!({"owner": "mallory"})),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    let (status, answer, _) = app
        .call(
            Method::PUT,
            "/v1/auth/owners/mallory",
            Some(&admin),
            Some(json!({"owner": "victim"})),
        )
        .await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (409, Some("owner_already_set")),
        "{answer}"
    );
    let (status, _, _) = app
        .call(
            Method::PUT,
            "/v1/auth/owners/no-such-account",
            Some(&admin),
            Some(json!({"owner": "victim"})),
        )
        .await;
    assert_eq!(status, 404);
    let (status, _, _) = app
        .call(
            Method::PUT,
            "/v1/auth/owners/treasury",
            Some(&mallory),
            Some(json!({"owner": "mallory"})),
        )
        .await;
    assert_eq!(status, 403, "only an admin assigns owners");
    let (status, answer, _) = app
        .call(
            Method::POST,
            "/v1/transfers",
            Some(&mallory),
            Some(json!({"from": "mallory", "to": "sink", "amount": "1.00"})),
        )
        .await;
    assert_eq!(status, 201, "the assigned owner pays: {answer}");

    // A user's own create, retried with its key, is still its own; the
    // same key and body from another user is not a replay.
    // The account named after another user is that user's to create: a
    // user creating it first would be paid in its place.
    let carol = token(&app.login("carol", "carol-pass", true).await);
    let (status, answer, _) = app
        .call(
            Method::POST,
            "/v1/accounts",
            Some(&mallory),
            Some(json!({"id": "carol"})),
        )
        .await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (403, Some("account_id_not_yours")),
        "{answer}"
    );
    let (status, answer, _) = app
        .call(Method::POST, "/create_user/carol/0", Some(&carol), None)
        .await;
    assert_eq!(status, 200, "carol still creates her own: {answer}");
    let (_, owner, _) = app
        .call(Method::GET, "/v1/auth/owners/carol", Some(&admin), None)
        .await;
    assert_eq!(owner["owner"], "carol");
    // Owners are users: an admin or a service could never pay from it.
    let (status, answer, _) = app
        .call(
            Method::PUT,
            "/v1/auth/owners/treasury",
            Some(&admin),
            Some(json!({"owner": "admin"})),
        )
        .await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (422, Some("unknown_owner")),
        "{answer}"
    );
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("owners are users"),
        "the message is the message, not the code: {answer}"
    );

    let body = json!({"id": "mallory-2"});
    let (status, _, _) = app
        .call_with_key(Method::POST, "/v1/accounts", &mallory, "k-1", body.clone())
        .await;
    assert_eq!(status, 201);
    let (status, _, headers) = app
        .call_with_key(Method::POST, "/v1/accounts", &mallory, "k-1", body.clone())
        .await;
    assert_eq!(status, 201);
    assert_eq!(headers["idempotent-replayed"], "true");
    let victim = token(&app.login("victim", "victim-pass", false).await);
    let (status, answer, _) = app
        .call_with_key(Method::POST, "/v1/accounts", &victim, "k-1", body)
        .await;
    assert!(
        matches!(status, 403 | 409 | 422),
        "another owner's replay: {status} {answer}"
    );
    let (_, owner, _) = app
        .call(Method::GET, "/v1/auth/owners/mallory-2", Some(&admin), None)
        .await;
    assert_eq!(owner["owner"], "mallory");
    audit_ok(&app, &admin).await;
}

/// `GET /user_shard/{user}` once answered any account's balance to anyone.
/// It answers the owner (and staff) now, with the shard as an integer as
/// the modelled system does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_shard_needs_the_owner_and_answers_an_integer_shard() {
    let app = app_with_auth().await;
    let admin = token(&app.login("admin", "admin-password", false).await);
    let alice = token(&app.login("alice", "alice-password", true).await);
    let bob = token(&app.login("bob", "bob-password", true).await);
    app.create_as(&admin, "alice", Some("alice"), "12.00").await;
    let (status, answer, _) = app.call(Method::GET, "/user_shard/alice", None, None).await;
    assert_eq!(status, 401, "{answer}");
    let (status, _, _) = app
        .call(Method::GET, "/user_shard/alice", Some(&bob), None)
        .await;
    assert_eq!(status, 403);
    let (status, answer, _) = app
        .call(Method::GET, "/user_shard/alice", Some(&alice), None)
        .await;
    assert_eq!(status, 200, "{answer}");
    assert!(answer["shard"].is_u64(), "{answer}");
    assert_eq!(answer["shard"], answer["shard_id"]);
    assert_eq!(answer["balance"].as_f64(), Some(12.0));
}

/// Webhooks once went anywhere: this machine's own services, cloud
/// metadata, through redirects; 200 of them on one account multiplied a
/// transfer into 400 deliveries; their counts were open to anyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_cannot_reach_this_machine_or_fan_out() {
    let app = TestApp::start_with(Options {
        auth: Some(auth_service(None, |_| {}).await),
        webhooks_to_private_networks: false,
        ..Options::default()
    })
    .await;
    let admin = token(&app.login("admin", "admin-password", false).await);
    let alice = token(&app.login("alice", "alice-password", true).await);
    app.create_as(&admin, "alice-main", Some("alice"), "10.00")
        .await;
    for url in [
        app.url.clone(),
        "http://127.0.0.1:8001/v1/auth/register".into(),
        "http://localhost:6379/".into(),
        "http://169.254.169.254/latest/meta-data/".into(),
        "http://0.0.0.0:8006/".into(),
        "http://[::1]:8006/".into(),
        "http://10.0.0.1/".into(),
    ] {
        let (status, answer, _) = app
            .call(
                Method::POST,
                "/v1/webhooks",
                Some(&alice),
                Some(json!({"account": "alice-main", "url": url})),
            )
            .await;
        assert_eq!(
            (status, answer["error"]["code"].as_str()),
            (422, Some("webhook_url_not_public")),
            "{url}: {answer}"
        );
    }
    for n in 0..5 {
        let (status, answer, _) = app
            .call(
                Method::POST,
                "/v1/webhooks",
                Some(&alice),
                Some(json!({"account": "alice-main", "url": format!("https://hooks.example.com/{n}")})),
            )
            .await;
        assert_eq!(status, 201, "{answer}");
    }
    let (status, answer, _) = app
        .call(
            Method::POST,
            "/v1/webhooks",
            Some(&alice),
            Some(json!({"account": "alice-main", "url": "https://hooks.example.com/6"})),
        )
        .await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (409, Some("too_many_webhooks"))
    );
    for who in [None, Some(alice.as_str())] {
        let (status, _, _) = app
            .call(Method::GET, "/v1/notification/stats", who, None)
            .await;
        assert!(status == 401 || status == 403, "stats are for staff");
    }
    let (status, _, _) = app
        .call(Method::GET, "/v1/notification/stats", Some(&admin), None)
        .await;
    assert_eq!(status, 200);
}

/// `/metrics` once grew by a series per invented HTTP method; 500 such
/// requests made it 74 MB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invented_methods_do_not_grow_the_metrics() {
    let app = TestApp::start().await;
    let before = app.text(Method::GET, "/metrics").await.len();
    for n in 0..300 {
        let method = Method::from_bytes(format!("X{n:04}{}", "Y".repeat(1000)).as_bytes()).unwrap();
        let response = app
            .client
            .request(method, format!("{}/v1/shards", app.url))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 405);
        let answer: Value = response.json().await.unwrap();
        assert_eq!(answer["error"]["code"], "method_not_allowed");
    }
    let after = app.text(Method::GET, "/metrics").await;
    assert!(
        after.len() < before + 4_000,
        "/metrics grew from {before} to {} bytes",
        after.len()
    );
    assert!(!after.contains("X0001"), "raw methods are not labels");
}

/// In demo mode (no auth) a page on another site could once POST a
/// transfer through the visitor's browser, and DNS rebinding reached the
/// loopback server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_mode_refuses_other_sites() {
    let app = TestApp::start().await;
    app.create("a1", "10.00").await;
    app.create("b1", "0").await;
    let transfer = |origin: Option<&'static str>, host: Option<&'static str>| {
        let mut request = app.client.post(format!("{}/transfer/a1/b1/1.00", app.url));
        if let Some(origin) = origin {
            request = request.header("origin", origin);
        }
        if let Some(host) = host {
            request = request.header("host", host);
        }
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            (
                status,
                response.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };
    for origin in ["http://evil.example", "null", "http://127.0.0.1:1"] {
        let (status, answer) = transfer(Some(origin), None).await;
        assert_eq!(
            (status, answer["error"]["code"].as_str()),
            (403, Some("cross_origin_refused")),
            "{origin}: {answer}"
        );
    }
    let (status, answer) = transfer(None, Some("evil.example")).await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (421, Some("host_not_allowed")),
        "{answer}"
    );
    let (status, _) = app.get("/v1/shards").await;
    assert_eq!(status, 200, "reads from this machine still work");
    assert_eq!(app.balance_minor("a1").await, 1_000, "nothing moved");
    // The server's own origin may.
    let own: &'static str = Box::leak(app.url.clone().into_boxed_str());
    let (status, answer) = transfer(Some(own), None).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(app.balance_minor("a1").await, 900);
}

/// Every error answers in the one shape: query-string errors, 405s and
/// unknown routes once answered plain text or nothing. An Idempotency-Key
/// with a space is printable ASCII, as the README says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_answers_in_the_error_shape() {
    let app = TestApp::start().await;
    app.create("a1", "10.00").await;
    app.create("b1", "0").await;
    for (method, path) in [
        (Method::GET, "/v1/accounts/a1/entries?limit=abc"),
        (Method::GET, "/v1/accounts/a1/entries?bogus=1"),
        (Method::GET, "/v1/accounts?limit=-1"),
        (Method::DELETE, "/v1/accounts"),
        (Method::PUT, "/v1/transfers"),
        (Method::GET, "/no/such/route"),
        (Method::GET, "/v1/accounts/%FF"),
    ] {
        let response = app
            .client
            .request(method.clone(), format!("{}{path}", app.url))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        let answer: Value = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("{method} {path}: not JSON: {text:?}"));
        assert_error_shape(status, &answer, path);
    }
    let response = app
        .client
        .post(format!("{}/v1/transfers", app.url))
        .header("content-type", "application/json")
        .body(vec![b' '; 100 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["error"]["code"], "body_too_large");

    let (status, answer) = app
        .post(
            "/v1/transfers",
            json!({"from": "a1", "to": "b1", "amount": "1.00"}),
            Some("order 42 retry"),
        )
        .await;
    assert_eq!(status, 201, "{answer}");
}

/// A shard that cannot answer once put the database driver's words in the
/// 503 body. The code says what is down; the detail stays in the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unavailable_shard_answers_without_driver_text() {
    let app = TestApp::start().await;
    let (payer, payee, _) = app.ids_by_shard("d");
    app.create(&payer, "10.00").await;
    app.create(&payee, "0").await;
    for f in &app.flaky {
        f.set_down(true);
    }
    let (status, answer) = app
        .post(
            "/v1/transfers",
            json!({"from": payer, "to": payee, "amount": "1.00"}),
            Some("k"),
        )
        .await;
    assert_eq!(status, 503, "{answer}");
    assert_eq!(answer["error"]["code"], "shard_unavailable");
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(!message.contains("taken down by the test"), "{message}");
    for f in &app.flaky {
        f.set_down(false);
    }
}

/// What a caller of each kind gets from the guard for a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Refused for who is calling: 401.
    Unauthenticated,
    /// Refused for the role or the account: 403.
    Forbidden,
    /// Past the permission checks (the answer may still be a 4xx about
    /// the request itself, never 401 or 403).
    Passes,
}

/// The permission table walked as a matrix: every route of every service
/// by every kind of caller (no token, forged, expired, another user, the
/// owner, a service, an admin). Each cell has one expected answer derived
/// here from who the caller is; refusals come before any change, so the
/// balances and the audit are unchanged after all of them. The table and
/// the API description agree on which routes need no token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_permission_matrix_holds_for_every_route_and_caller() {
    let auth = auth_service(None, |_| {}).await;
    let app = TestApp::start_with(Options {
        auth: Some(auth.clone()),
        ..Options::default()
    })
    .await;
    let admin = token(&app.login("admin", "admin-password", false).await);
    let owner = token(&app.login("alice", "alice-password", true).await);
    let other = token(&app.login("mallory", "mallory-pass", true).await);
    let service = auth.service_token().await.unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let sign = |claims: Value, secret: &str| {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    };
    let forged = sign(
        json!({"sub": "admin", "role": "admin", "sid": "x", "aud": "shardpay", "iss": "shardpay-auth", "iat": now, "exp": now + 600}),
        "not-the-server-secret-0123456789abcdef",
    );
    let expired = sign(
        json!({"sub": "admin", "role": "admin", "sid": "x", "aud": "shardpay", "iss": "shardpay-auth", "iat": now - 120, "exp": now - 60}),
        TEST_SECRET,
    );
    app.create_as(&admin, "alice", Some("alice"), "100.00")
        .await;
    app.create_as(&admin, "alice-main", Some("alice"), "100.00")
        .await;
    app.create_as(&admin, "bob-main", None, "5.00").await;
    let (_, made, _) = app
        .call(
            Method::POST,
            "/v1/transfers",
            Some(&owner),
            Some(json!({"from": "alice-main", "to": "bob-main", "amount": "1.00"})),
        )
        .await;
    let transfer_id = made["id"].as_str().unwrap().to_string();

    // The table and the API description: every documented operation has a
    // row, and "no token needed" means the same in both.
    let spec: Value = serde_json::from_str(shardpay_reference::api::openapi_json()).unwrap();
    for (path, ops) in spec["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            let row = TABLE
                .iter()
                .find(|(m, r, _)| m.eq_ignore_ascii_case(method) && r == path)
                .unwrap_or_else(|| panic!("{method} {path} is documented but has no row"));
            // `[{}]`: no token needed.
            let public = op["security"].as_array().is_some_and(|a| {
                a.iter()
                    .all(|r| r.as_object().is_some_and(|r| r.is_empty()))
            });
            assert_eq!(
                public,
                row.2 == Access::Public,
                "{method} {path}: the description and the table disagree on needing a token"
            );
        }
    }

    // Routes that read or move money of the account in their path check
    // its owner on top of the role.
    let owner_checked = |route: &str| {
        matches!(
            route,
            "/v1/accounts/{id}"
                | "/v1/accounts/{id}/entries"
                | "/v1/transfers/{id}"
                | "/user_shard/{user}"
                | "/accounts/{user}"
                | "/transfer/{from}/{to}/{amount}"
                | "/v1/transfers"
                | "/v1/accounts"
                | "/v1/webhooks"
                | "/create_user/{user}/{balance}"
                | "/accounts/{user}/create/{balance}"
        )
    };
    let fill = |route: &str| {
        route
            .replace("{id}/entries", "alice-main/entries")
            .replace(
                "/v1/transfers/{id}",
                &format!("/v1/transfers/{transfer_id}"),
            )
            .replace("{id}", "alice-main")
            .replace("{account}", "alice-main")
            .replace("{user}", "alice")
            .replace("{from}", "alice-main")
            .replace("{to}", "bob-main")
            .replace("{amount}", "0.01")
            .replace("{balance}", "0")
    };
    // Bodies a refusal must never get to read; they would move money or
    // change state if they got through.
    let body_of = |route: &str| -> Option<Value> {
        Some(match route {
            "/v1/transfers" => json!({"from": "alice-main", "to": "bob-main", "amount": "0.01"}),
            "/v1/accounts" => json!({"id": "alice-matrix"}),
            "/v1/accounts/bulk" => json!({"accounts": [{"id": "matrix-bulk"}]}),
            "/v1/transfers/lookup" => json!({"ids": []}),
            "/v1/fraud/score" => json!({"from": "alice-main", "to": "bob-main", "amount": "0.01"}),
            "/v1/webhooks" => {
                json!({"account": "alice-main", "url": "https://hooks.example.com/m"})
            }
            "/v1/dlq/replay" => json!({"all": true}),
            "/v1/auth/owners" => json!({"pairs": [], "check_only": true}),
            "/v1/auth/owners/{account}" => json!({"owner": "alice"}),
            "/v1/auth/register" => json!({"username": "m", "password": "x"}),
            "/v1/auth/login" => json!({"username": "nobody"}),
            "/v1/auth/refresh" => json!({}),
            _ => return None,
        })
    };
    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    enum Who {
        Nobody,
        Forged,
        Expired,
        OtherUser,
        Owner,
        Service,
        Admin,
    }
    let callers = [
        (Who::Nobody, None),
        (Who::Forged, Some(forged.as_str())),
        (Who::Expired, Some(expired.as_str())),
        (Who::OtherUser, Some(other.as_str())),
        (Who::Owner, Some(owner.as_str())),
        (Who::Service, Some(service.as_str())),
        (Who::Admin, Some(admin.as_str())),
    ];
    let role_of = |who: Who| match who {
        Who::OtherUser | Who::Owner => Some(shardpay_reference::auth::Role::User),
        Who::Service => Some(shardpay_reference::auth::Role::Service),
        Who::Admin => Some(shardpay_reference::auth::Role::Admin),
        _ => None,
    };
    let expect = |access: Access, route: &str, who: Who| -> Expect {
        if access == Access::Public {
            // Registering reads a token when one is sent (admins create
            // admins): a bad one is refused.
            if route == "/v1/auth/register" && matches!(who, Who::Forged | Who::Expired) {
                return Expect::Unauthenticated;
            }
            return Expect::Passes;
        }
        let Some(role) = role_of(who) else {
            return Expect::Unauthenticated;
        };
        let allowed = match access {
            Access::Signed => true,
            Access::Roles(roles) => roles.contains(&role),
            Access::Public => true,
        };
        if !allowed {
            return Expect::Forbidden;
        }
        if owner_checked(route) && who == Who::OtherUser {
            return Expect::Forbidden;
        }
        Expect::Passes
    };

    // Refusals first: nothing may change.
    let before = all_balances(&app).await;
    let mut refused = 0;
    for pass in [false, true] {
        for (method, route, access) in TABLE {
            // Logging out would end the caller's session for later cells.
            if route.starts_with("/v1/auth/logout") && pass {
                continue;
            }
            for (who, token) in callers {
                let want = expect(*access, route, who);
                if (want == Expect::Passes) != pass {
                    continue;
                }
                if pass && route.starts_with("/v1/auth/logout") {
                    continue;
                }
                let method = Method::from_bytes(method.as_bytes()).unwrap();
                let path = fill(route);
                let (status, answer, _) =
                    app.call(method.clone(), &path, token, body_of(route)).await;
                let got = match status {
                    401 => Expect::Unauthenticated,
                    403 if answer["error"]["code"] != "transfer_blocked" => Expect::Forbidden,
                    _ => Expect::Passes,
                };
                assert_eq!(
                    got, want,
                    "{method} {route} as {who:?}: answered {status} {answer}"
                );
                if want != Expect::Passes {
                    assert_error_shape(status, &answer, route);
                    refused += 1;
                }
            }
        }
        if !pass {
            assert_eq!(
                all_balances(&app).await,
                before,
                "a refused request changed a balance"
            );
            audit_ok(&app, &admin).await;
        }
    }
    assert!(refused > 100, "the matrix refused {refused} calls");
    audit_ok(&app, &admin).await;
}

/// A few thousand hostile requests of every kind against a server with
/// auth on: only 4xx answers in the error shape, the server stays up, and
/// every balance and the audit are unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_mix_gets_only_4xx_and_changes_nothing() {
    let app = TestApp::start_with(Options {
        auth: Some(
            auth_service(None, |c| {
                c.login_per_user.max = 0;
                c.login_per_address.max = 0;
            })
            .await,
        ),
        webhooks_to_private_networks: false,
        ..Options::default()
    })
    .await;
    let admin = token(&app.login("admin", "admin-password", false).await);
    let alice = token(&app.login("alice", "alice-password", true).await);
    let mallory = token(&app.login("mallory", "mallory-pass", true).await);
    app.create_as(&admin, "alice-main", Some("alice"), "100.00")
        .await;
    app.create_as(&admin, "bob-main", None, "100.00").await;
    app.create_as(&admin, "mallory", None, "50.00").await;
    let before = all_balances(&app).await;
    let dashes = "-".repeat(30_000);
    let bad_amounts = [
        dashes.as_str(),
        "1e9",
        "NaN",
        "-0.01",
        "0.001",
        "99999999999999999999",
        "",
        " ",
        "1,00",
        "\u{0661}",
    ];
    let bad_ids = [
        "",
        "../etc",
        "a b",
        "~funding:INR",
        "x'; DROP TABLE accounts;--",
        "é",
    ];
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut sent = 0;
    for i in 0..2_000 {
        let pick = |n: u64, r: u64| (r % n) as usize;
        let r = next();
        let amount = bad_amounts[pick(bad_amounts.len() as u64, r >> 8)];
        let id = bad_ids[pick(bad_ids.len() as u64, r >> 16)];
        let (method, path, who, body): (Method, String, Option<&str>, Option<Value>) = match i % 12
        {
            0 => (
                Method::POST,
                "/v1/transfers".into(),
                Some(&alice),
                Some(json!({"from": "alice-main", "to": "bob-main", "amount": amount})),
            ),
            1 => (
                Method::POST,
                "/v1/transfers".into(),
                Some(&mallory),
                Some(json!({"from": "alice-main", "to": "mallory", "amount": "1.00"})),
            ),
            2 => (
                Method::POST,
                "/v1/transfers".into(),
                Some(&alice),
                Some(json!({"from": id, "to": "bob-main", "amount": "1.00"})),
            ),
            3 => (
                Method::POST,
                format!("/transfer/alice-main/bob-main/{amount}"),
                Some(&alice),
                None,
            ),
            4 => (
                Method::GET,
                "/v1/accounts/alice-main".into(),
                Some(&mallory),
                None,
            ),
            5 => (Method::GET, "/user_shard/alice-main".into(), None, None),
            6 => (
                Method::POST,
                "/v1/accounts".into(),
                Some(&mallory),
                Some(json!({"id": "bob-main"})),
            ),
            7 => (
                Method::POST,
                "/create_user/mallory/0".into(),
                Some(&mallory),
                None,
            ),
            8 => (
                Method::POST,
                "/v1/webhooks".into(),
                Some(&alice),
                Some(
                    json!({"account": "alice-main", "url": format!("http://127.0.0.1:{}/", 8000 + (r % 10))}),
                ),
            ),
            9 => (
                Method::POST,
                "/v1/transfers".into(),
                Some("eyJhbGciOiJIUzI1NiJ9.e30.forged"),
                Some(json!({"from": "alice-main", "to": "mallory", "amount": "1.00"})),
            ),
            10 => (
                Method::POST,
                "/v1/accounts".into(),
                Some(&admin),
                Some(json!({"id": format!("h{i}"), "opening_balance": amount})),
            ),
            _ => (
                Method::POST,
                "/v1/transfers".into(),
                Some(&alice),
                Some(
                    json!({"from": "alice-main", "to": "bob-main", "amount_minor": -5, "extra": true}),
                ),
            ),
        };
        let (status, answer, _) = app.call(method, &path, who, body).await;
        assert_error_shape(status, &answer, &format!("#{i} {path}"));
        sent += 1;
    }
    // Raw malformed bodies and headers.
    for body in [
        &b"{"[..],
        b"[]",
        b"null",
        b"{\"from\":1}",
        &[0xff, 0xfe, 0x00][..],
    ] {
        let response = app
            .client
            .post(format!("{}/v1/transfers", app.url))
            .bearer_auth(&alice)
            .header("content-type", "application/json")
            .header("idempotency-key", "k")
            .body(body.to_vec())
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let answer: Value = response.json().await.unwrap();
        assert_error_shape(status, &answer, "raw body");
        sent += 1;
    }
    assert!(sent > 2_000);
    let (status, _) = app.get("/health").await;
    assert_eq!(status, 200);
    assert_eq!(
        all_balances(&app).await,
        before,
        "a hostile request moved money"
    );
    audit_ok(&app, &admin).await;
}

/// A user creates at most 20 accounts a minute: accounts are rows on the
/// shards and room for webhooks, and one user once filled the server's
/// webhook limit for everyone by creating 20,000 of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_creates_a_bounded_number_of_accounts() {
    let app = app_with_auth().await;
    let mallory = token(&app.login("mallory", "mallory-pass", true).await);
    let mut statuses = Vec::new();
    for n in 0..25 {
        let (status, _, _) = app
            .call(
                Method::POST,
                "/v1/accounts",
                Some(&mallory),
                Some(json!({"id": format!("mallory-{n}")})),
            )
            .await;
        statuses.push(status);
    }
    assert!(statuses[..20].iter().all(|s| *s == 201), "{statuses:?}");
    assert!(statuses[20..].iter().all(|s| *s == 429), "{statuses:?}");
}
