//! Property test over every JSON body of the API: generated bodies (the
//! routes' own field names with values of every JSON type and absurd
//! sizes, unknown fields, wrong shapes) sent to every POST route, by a user
//! and by an admin. The answer is a success or a clear 4xx in the error
//! shape, never a 5xx; a refusal changes no balance.

use proptest::prelude::*;
use reqwest::Method;
use serde_json::{json, Map, Value};

use crate::support::{auth_service, Options, TestApp};

/// Routes that take a JSON body.
const ROUTES: &[&str] = &[
    "/v1/accounts",
    "/v1/accounts/bulk",
    "/v1/transfers",
    "/v1/transfers/lookup",
    "/v1/fraud/score",
    "/v1/webhooks",
    "/v1/dlq/replay",
    "/v1/auth/register",
    "/v1/auth/login",
    "/v1/auth/refresh",
    "/v1/auth/owners",
];

/// The field names the routes read, so generated bodies reach past the
/// "unknown field" refusal into the parsers.
const FIELDS: &[&str] = &[
    "id",
    "owner",
    "currency",
    "opening_balance",
    "opening_balance_minor",
    "accounts",
    "from",
    "to",
    "amount",
    "amount_minor",
    "ids",
    "url",
    "account",
    "all",
    "username",
    "password",
    "role",
    "refresh_token",
    "pairs",
    "check_only",
    "publish",
];

fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        Just(json!(u64::MAX)),
        "[a-z0-9_.@-]{0,12}".prop_map(Value::from),
        "[0-9]{0,25}(\\.[0-9]{0,5})?".prop_map(Value::from),
        "-{1,40}[0-9]{0,3}".prop_map(Value::from),
        any::<String>().prop_map(Value::from),
        (0usize..3000).prop_map(|n| Value::from("9".repeat(n))),
        prop_oneof![
            Just("alice-main"),
            Just("bob-main"),
            Just("INR"),
            Just("JPY"),
            Just("admin"),
            Just("user"),
            Just("service"),
            Just("http://127.0.0.1:9/x"),
            Just("http://10.1.2.3/x"),
            Just("tr_00000000000000000000000000000000"),
        ]
        .prop_map(Value::from),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    scalar().prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((field(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

fn field() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => prop::sample::select(FIELDS).prop_map(str::to_string),
        1 => "[a-z_]{1,10}",
    ]
}

fn any_body() -> impl Strategy<Value = Value> {
    prop_oneof![
        6 => prop::collection::vec((field(), value()), 0..7)
            .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        1 => value(),
    ]
}

/// A well-formed body of `route`, so that mutations of it reach the
/// handlers' own checks (and some succeed).
fn template(route: &str, n: u32) -> Value {
    match route {
        "/v1/accounts" => json!({"id": format!("p-{n}"), "opening_balance": "1.00"}),
        "/v1/accounts/bulk" => {
            json!({"accounts": [{"id": format!("q-{n}"), "opening_balance_minor": 5}]})
        }
        "/v1/transfers" => json!({"from": "alice-main", "to": "bob-main", "amount": "0.01"}),
        "/v1/transfers/lookup" => json!({"ids": ["tr_00000000000000000000000000000000"]}),
        "/v1/fraud/score" => json!({"from": "alice-main", "to": "bob-main", "amount": "1.00"}),
        // Webhooks aimed at a private address: refused, so no delivery
        // waits on a network this test does not have.
        "/v1/webhooks" => json!({"account": "alice-main", "url": "http://10.0.0.1/x"}),
        "/v1/dlq/replay" => json!({"all": true}),
        "/v1/auth/register" => json!({"username": format!("u{n}"), "password": "password-123"}),
        "/v1/auth/login" => json!({"username": "alice", "password": "alice-password"}),
        "/v1/auth/refresh" => json!({"refresh_token": "x.y"}),
        _ => json!({"pairs": [{"account": "alice-main", "owner": "alice"}], "check_only": true}),
    }
}

/// A route and its body: a template as it is, a template with one or two
/// fields changed to generated values, or a generated shape.
fn case() -> impl Strategy<Value = (&'static str, Value)> {
    (
        prop::sample::select(ROUTES),
        any::<u32>(),
        prop::collection::vec((field(), value()), 0..3),
        0u8..4,
    )
        .prop_flat_map(|(route, n, changes, how)| {
            let mut body = template(route, n);
            match how {
                0 => Just((route, body)).boxed(),
                1 | 2 => {
                    if let Value::Object(map) = &mut body {
                        for (k, v) in changes {
                            map.insert(k, v);
                        }
                    }
                    Just((route, body)).boxed()
                }
                _ => any_body().prop_map(move |b| (route, b)).boxed(),
            }
        })
}

#[test]
fn generated_bodies_get_a_success_or_a_clear_4xx_and_refusals_change_nothing() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (app, admin, alice) = runtime.block_on(async {
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
        let admin = app.login("admin", "admin-password", false).await["access_token"]
            .as_str()
            .unwrap()
            .to_string();
        let alice = app.login("alice", "alice-password", true).await["access_token"]
            .as_str()
            .unwrap()
            .to_string();
        app.create_as(&admin, "alice-main", Some("alice"), "1000.00")
            .await;
        app.create_as(&admin, "bob-main", None, "10.00").await;
        (app, admin, alice)
    });
    let balances = |app: &TestApp| {
        runtime.block_on(async {
            app.manager
                .list_accounts(None, 1000)
                .await
                .unwrap()
                .into_iter()
                .map(|a| (a.id.to_string(), a.balance_minor))
                .collect::<Vec<_>>()
        })
    };
    let answered = std::cell::RefCell::new(std::collections::BTreeMap::<u16, u32>::new());
    let config = ProptestConfig {
        // SHARDPAY_BODY_CASES runs fewer (or more) while investigating.
        cases: std::env::var("SHARDPAY_BODY_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(10_000),
        failure_persistence: None,
        // Each step of shrinking a failure is a request: bound it.
        max_shrink_iters: 500,
        ..ProptestConfig::default()
    };
    proptest!(config, |((route, body) in case(), as_admin in any::<bool>())| {
        let token = if as_admin { &admin } else { &alice };
        let before = balances(&app);
        let started = std::time::Instant::now();
        let (status, answer, _) = runtime.block_on(app.call(Method::POST, route, Some(token), Some(body.clone())));
        if started.elapsed() > std::time::Duration::from_secs(1) {
            eprintln!("slow: {:?} {route} {body} -> {status} {answer}", started.elapsed());
        }
        *answered.borrow_mut().entry(status).or_default() += 1;
        prop_assert!(status < 500, "{route} {body}: answered {status} {answer}");
        if status >= 400 {
            prop_assert!(
                answer["error"]["code"].as_str().is_some_and(|c| !c.is_empty())
                    && answer["error"]["message"].is_string(),
                "{route} {body}: not the error shape: {answer}"
            );
            let after = balances(&app);
            prop_assert_eq!(&before, &after, "{} {} was refused but changed a balance", route, body);
        }
    });
    // The generator reaches past the parsers: some bodies are accepted.
    let answered = answered.into_inner();
    eprintln!("answers by status: {answered:?}");
    let accepted: u32 = answered.range(200..300).map(|(_, n)| n).sum();
    assert!(accepted > 0, "no generated body was accepted: {answered:?}");
    // The sessions the cases used are alive, and the books add up.
    runtime.block_on(async {
        let (status, report, _) = app.call(Method::GET, "/v1/audit", Some(&admin), None).await;
        assert_eq!(
            (status, report["ok"].as_bool()),
            (200, Some(true)),
            "{report}"
        );
        let (status, _, _) = app
            .call(Method::GET, "/v1/auth/me", Some(&alice), None)
            .await;
        assert_eq!(status, 200);
    });
}
