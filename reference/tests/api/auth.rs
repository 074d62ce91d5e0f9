//! Auth: only an account's owner can debit it; missing, tampered, forged,
//! expired and revoked tokens are refused and change nothing; refresh tokens
//! work once; brute-force logins get 429; rate limits are exact under
//! concurrency; idempotency locks expire; Redis going down loses and doubles
//! no money. Each test runs on the in-memory stores and, when a Redis
//! server is configured, on Redis.

use std::sync::Arc;
use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};
use shardpay_reference::auth::stores::{IdempotencyLocks, RateLimiter};
use shardpay_reference::auth::Stores;

use crate::support::{auth_service, redis_server, Options, TestApp, TEST_SECRET};

async fn app_with_auth(redis: Option<&str>) -> TestApp {
    TestApp::start_with(Options {
        auth: Some(auth_service(redis, |_| {}).await),
        ..Options::default()
    })
    .await
}

fn token(login: &Value) -> String {
    login["access_token"].as_str().unwrap().to_string()
}

/// Admin creates `account` for `owner` with an opening balance.
async fn fund(app: &TestApp, admin: &str, account: &str, owner: &str, amount: &str) {
    let (status, answer, _) = app
        .call(
            Method::POST,
            "/v1/accounts",
            Some(admin),
            Some(json!({"id": account, "owner": owner, "opening_balance": amount})),
        )
        .await;
    assert_eq!(status, 201, "{answer}");
}

async fn balances(app: &TestApp) -> (i64, i64) {
    (
        app.balance_minor("alice-main").await,
        app.balance_minor("bob-main").await,
    )
}

fn encode(claims: Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

async fn only_the_owner_moves_money(redis: Option<&str>) {
    let app = app_with_auth(redis).await;
    let admin = token(&app.login("admin", "admin-password", false).await);
    let alice_login = app.login("alice", "alice-password", true).await;
    let alice = token(&alice_login);
    let bob = token(&app.login("bob", "bob-password", true).await);
    fund(&app, &admin, "alice-main", "alice", "100.00").await;
    fund(&app, &admin, "bob-main", "bob", "100.00").await;
    let pay = json!({"from": "alice-main", "to": "bob-main", "amount": "10.00"});
    let before = balances(&app).await;

    // Refused, each with its code, and nothing moves.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let sid = {
        // A real session id, so that only the expiry is wrong.
        let parts: Vec<&str> = alice.split('.').collect();
        let claims: Value = serde_json::from_slice(&base64_decode(parts[1])).unwrap();
        claims["sid"].as_str().unwrap().to_string()
    };
    let expired = encode(
        json!({"sub": "alice", "role": "user", "sid": sid, "aud": "shardpay", "iss": "shardpay-auth", "iat": now - 120, "exp": now - 60}),
        TEST_SECRET,
    );
    let forged = encode(
        json!({"sub": "alice", "role": "user", "sid": sid, "aud": "shardpay", "iss": "shardpay-auth", "iat": now, "exp": now + 600}),
        "not-the-server-secret-0123456789abcdef",
    );
    let mut tampered = alice.clone();
    // Flip one character of the signature.
    let last = tampered.pop().unwrap();
    tampered.push(if last == 'A' { 'B' } else { 'A' });
    let admin_role_claimed = {
        // Alice's own token with the role edited to admin: the signature
        // no longer matches.
        let parts: Vec<&str> = alice.split('.').collect();
        let mut claims: Value = serde_json::from_slice(&base64_decode(parts[1])).unwrap();
        claims["role"] = json!("admin");
        format!(
            "{}.{}.{}",
            parts[0],
            base64_encode(&serde_json::to_vec(&claims).unwrap()),
            parts[2]
        )
    };
    for (token, status, code) in [
        (None, 401, "missing_token"),
        (Some(bob.as_str()), 403, "not_account_owner"),
        // Admins set the system up; the permission table gives them no
        // transfer route at all.
        (Some(admin.as_str()), 403, "forbidden"),
        (Some(tampered.as_str()), 401, "invalid_token"),
        (Some(forged.as_str()), 401, "invalid_token"),
        (Some(admin_role_claimed.as_str()), 401, "invalid_token"),
        (Some(expired.as_str()), 401, "token_expired"),
    ] {
        let (got, answer, _) = app
            .call(Method::POST, "/v1/transfers", token, Some(pay.clone()))
            .await;
        assert_eq!(
            (got, answer["error"]["code"].as_str()),
            (status, Some(code)),
            "{answer}"
        );
        // The modelled system's route too.
        let (got, answer, _) = app
            .call(
                Method::POST,
                "/transfer/alice-main/bob-main/10",
                token,
                None,
            )
            .await;
        assert_eq!(
            (got, answer["error"]["code"].as_str()),
            (status, Some(code)),
            "legacy: {answer}"
        );
    }
    assert_eq!(balances(&app).await, before, "refused requests moved money");

    // Reads: a user reads its own account only.
    let (status, _, _) = app
        .call(Method::GET, "/v1/accounts/bob-main", Some(&alice), None)
        .await;
    assert_eq!(status, 403);
    let (status, _, _) = app
        .call(Method::GET, "/v1/accounts/alice-main", Some(&alice), None)
        .await;
    assert_eq!(status, 200);
    // A user cannot mint money or audit.
    let (status, answer, _) = app
        .call(
            Method::POST,
            "/v1/accounts",
            Some(&alice),
            Some(json!({"id": "alice-2", "opening_balance": "5.00"})),
        )
        .await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (403, Some("opening_balance_requires_admin"))
    );
    let (status, _, _) = app.call(Method::GET, "/v1/audit", Some(&alice), None).await;
    assert_eq!(status, 403);
    // Registering an admin needs an admin.
    let (status, _, _) = app
        .call(
            Method::POST,
            "/v1/auth/register",
            None,
            Some(json!({"username": "mallory", "password": "mallory-pass", "role": "admin"})),
        )
        .await;
    assert_eq!(status, 401);

    // The owner pays.
    let (status, answer, _) = app
        .call(
            Method::POST,
            "/v1/transfers",
            Some(&alice),
            Some(pay.clone()),
        )
        .await;
    assert_eq!(status, 201, "{answer}");
    assert_eq!(balances(&app).await, (before.0 - 1_000, before.1 + 1_000));

    // A refresh token works once.
    let refresh = alice_login["refresh_token"].as_str().unwrap();
    let (status, renewed, _) = app
        .call(
            Method::POST,
            "/v1/auth/refresh",
            None,
            Some(json!({"refresh_token": refresh})),
        )
        .await;
    assert_eq!(status, 200, "{renewed}");
    let (status, again, _) = app
        .call(
            Method::POST,
            "/v1/auth/refresh",
            None,
            Some(json!({"refresh_token": refresh})),
        )
        .await;
    // A used refresh token coming back means one of its holders stole it:
    // the whole session is revoked, the thief's and the owner's tokens.
    assert_eq!(
        (status, again["error"]["code"].as_str()),
        (401, Some("refresh_token_reused")),
        "{again}"
    );
    let (status, me, _) = app
        .call(Method::GET, "/v1/auth/me", Some(&token(&renewed)), None)
        .await;
    assert_eq!(
        (status, me["error"]["code"].as_str()),
        (401, Some("session_revoked")),
        "the refreshed access token dies with its session: {me}"
    );
    let (status, _, _) = app
        .call(
            Method::POST,
            "/v1/auth/refresh",
            None,
            Some(json!({"refresh_token": renewed["refresh_token"]})),
        )
        .await;
    assert_eq!(status, 401, "so does the rotated refresh token");
    let alice_login = app.login("alice", "alice-password", false).await;
    let alice = token(&alice_login);
    let (status, renewed, _) = app
        .call(
            Method::POST,
            "/v1/auth/refresh",
            None,
            Some(json!({"refresh_token": alice_login["refresh_token"]})),
        )
        .await;
    assert_eq!(status, 200, "{renewed}");
    let (status, me, _) = app
        .call(Method::GET, "/v1/auth/me", Some(&token(&renewed)), None)
        .await;
    assert_eq!((status, me["username"].as_str()), (200, Some("alice")));

    // Logout revokes the session: its access tokens stop working at once.
    let (status, _, _) = app
        .call(Method::POST, "/v1/auth/logout", Some(&alice), None)
        .await;
    assert_eq!(status, 204);
    let after = balances(&app).await;
    for revoked in [&alice, &token(&renewed)] {
        let (status, answer, _) = app
            .call(
                Method::POST,
                "/v1/transfers",
                Some(revoked),
                Some(pay.clone()),
            )
            .await;
        assert_eq!(
            (status, answer["error"]["code"].as_str()),
            (401, Some("session_revoked")),
            "{answer}"
        );
    }
    assert_eq!(balances(&app).await, after);
    let (status, report, _) = app.call(Method::GET, "/v1/audit", Some(&admin), None).await;
    assert_eq!(
        (status, report["ok"].as_bool()),
        (200, Some(true)),
        "{report}"
    );
}

fn base64_decode(part: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .unwrap()
}

fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_owner_moves_money_in_memory() {
    only_the_owner_moves_money(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_owner_moves_money_on_redis() {
    let Some(redis) = redis_server() else { return };
    only_the_owner_moves_money(Some(&redis)).await;
}

async fn brute_force_logins_get_429(redis: Option<&str>) {
    let app = app_with_auth(redis).await;
    app.login("carol", "carol-password", true).await;
    let attempt = |password: &str| {
        app.call(
            Method::POST,
            "/v1/auth/login",
            None,
            Some(json!({"username": "carol", "password": password})),
        )
    };
    for _ in 0..4 {
        let (status, answer, _) = attempt("wrong-password").await;
        assert_eq!(
            (status, answer["error"]["code"].as_str()),
            (401, Some("invalid_credentials"))
        );
    }
    // The 6th attempt in the minute (one login above), even with the right
    // password.
    let (status, answer, headers) = attempt("carol-password").await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (429, Some("rate_limited")),
        "{answer}"
    );
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brute_force_logins_get_429_in_memory() {
    brute_force_logins_get_429(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brute_force_logins_get_429_on_redis() {
    let Some(redis) = redis_server() else { return };
    brute_force_logins_get_429(Some(&redis)).await;
}

/// Registering costs a password hash: an address gets 10 a minute;
/// registrations an admin makes are not counted.
async fn registrations_are_limited_per_address(redis: Option<&str>) {
    let app = app_with_auth(redis).await;
    let register = |name: String, token: Option<String>| {
        let app = &app;
        async move {
            app.call(
                Method::POST,
                "/v1/auth/register",
                token.as_deref(),
                Some(json!({"username": name, "password": "a long enough password"})),
            )
            .await
        }
    };
    for i in 0..10 {
        let (status, answer, _) = register(format!("reg{i}"), None).await;
        assert_eq!(status, 201, "registration {i}: {answer}");
    }
    let (status, answer, headers) = register("reg10".into(), None).await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (429, Some("rate_limited")),
        "{answer}"
    );
    assert!(headers.contains_key("retry-after"));
    let admin = token(&app.login("admin", "admin-password", false).await);
    let (status, answer, _) = register("reg11".into(), Some(admin)).await;
    assert_eq!(status, 201, "an admin's registration: {answer}");
    // The refused one was not created: logging in as it fails.
    let (status, _, _) = app
        .call(
            Method::POST,
            "/v1/auth/login",
            None,
            Some(json!({"username": "reg10", "password": "a long enough password"})),
        )
        .await;
    assert_eq!(status, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_are_limited_per_address_in_memory() {
    registrations_are_limited_per_address(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_are_limited_per_address_on_redis() {
    let Some(redis) = redis_server() else { return };
    registrations_are_limited_per_address(Some(&redis)).await;
}

async fn stores(redis: Option<&str>) -> Stores {
    match redis {
        Some(url) => {
            let prefix = format!("t{}:", &uuid::Uuid::new_v4().simple().to_string()[..12]);
            Stores::redis(url, &prefix).await.unwrap()
        }
        None => Stores::memory(),
    }
}

/// 200 concurrent hits on one key: every count from 1 to 200 exactly once.
async fn rate_limits_are_exact_under_concurrency(redis: Option<&str>) {
    let limits: Arc<dyn RateLimiter> = stores(redis).await.limits;
    let hits = (0..200).map(|_| {
        let limits = Arc::clone(&limits);
        tokio::spawn(async move {
            limits
                .hit("payer-1", Duration::from_secs(60))
                .await
                .unwrap()
        })
    });
    let mut counts: Vec<u64> = futures_util::future::join_all(hits)
        .await
        .into_iter()
        .map(|h| h.unwrap().count)
        .collect();
    counts.sort_unstable();
    assert_eq!(counts, (1..=200).collect::<Vec<u64>>());
    let other = limits
        .hit("payer-2", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(other.count, 1);
    assert!(other.reset_in <= Duration::from_secs(60) && other.reset_in > Duration::from_secs(50));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_are_exact_under_concurrency_in_memory() {
    rate_limits_are_exact_under_concurrency(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_are_exact_under_concurrency_on_redis() {
    let Some(redis) = redis_server() else { return };
    rate_limits_are_exact_under_concurrency(Some(&redis)).await;
}

async fn idempotency_locks_exclude_and_expire(redis: Option<&str>) {
    let locks: Arc<dyn IdempotencyLocks> = stores(redis).await.locks;
    let ttl = Duration::from_millis(300);
    assert!(locks.acquire("p:k", "holder-1", ttl).await.unwrap());
    assert!(!locks.acquire("p:k", "holder-2", ttl).await.unwrap());
    // Someone else's release leaves the lock alone.
    locks.release("p:k", "holder-2").await.unwrap();
    assert!(!locks.acquire("p:k", "holder-2", ttl).await.unwrap());
    // A holder that never releases: the lock expires by itself.
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert!(locks.acquire("p:k", "holder-2", ttl).await.unwrap());
    locks.release("p:k", "holder-2").await.unwrap();
    assert!(locks.acquire("p:k", "holder-3", ttl).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_locks_exclude_and_expire_in_memory() {
    idempotency_locks_exclude_and_expire(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_locks_exclude_and_expire_on_redis() {
    let Some(redis) = redis_server() else { return };
    idempotency_locks_exclude_and_expire(Some(&redis)).await;
}

/// A transfer whose (payer, key) lock is held elsewhere, and whose key has
/// no stored answer yet, is refused as in flight without moving money; the
/// same request after the lock is gone goes through once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_idempotency_lock_refuses_the_duplicate() {
    let redis = redis_server();
    let app = app_with_auth(redis.as_deref()).await;
    let admin = token(&app.login("admin", "admin-password", false).await);
    let alice = token(&app.login("alice", "alice-password", true).await);
    app.login("bob", "bob-password", true).await;
    fund(&app, &admin, "alice-main", "alice", "100.00").await;
    fund(&app, &admin, "bob-main", "bob", "100.00").await;
    let auth = app.auth.clone().unwrap();
    assert!(auth
        .stores
        .locks
        .acquire(
            "alice-main:pay-1",
            "another-request",
            Duration::from_secs(30)
        )
        .await
        .unwrap());
    let pay = |app: &TestApp| {
        let request = app
            .client
            .post(format!("{}/v1/transfers", app.url))
            .bearer_auth(&alice)
            .header("Idempotency-Key", "pay-1")
            .json(&json!({"from": "alice-main", "to": "bob-main", "amount": "1.00"}));
        async move {
            let r = request.send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap())
        }
    };
    let (status, answer) = pay(&app).await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (409, Some("idempotency_key_in_flight"))
    );
    assert_eq!(balances(&app).await, (10_000, 10_000));
    auth.stores
        .locks
        .release("alice-main:pay-1", "another-request")
        .await
        .unwrap();
    let (status, first) = pay(&app).await;
    assert_eq!(status, 201, "{first}");
    let (status, replay) = pay(&app).await;
    assert_eq!(status, 201);
    assert_eq!(first["id"], replay["id"]);
    assert_eq!(balances(&app).await, (9_900, 10_100));
}

/// A lock left by a request whose process died (it never released it)
/// after the first request with the key stored its answer: a retry with
/// the same body replays that answer and a changed body is refused, as
/// Stripe's rules say, instead of 409 until the lock expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_left_by_a_dead_holder_does_not_hide_the_stored_answer() {
    let redis = redis_server();
    let app = app_with_auth(redis.as_deref()).await;
    let admin = token(&app.login("admin", "admin-password", false).await);
    let alice = token(&app.login("alice", "alice-password", true).await);
    app.login("bob", "bob-password", true).await;
    fund(&app, &admin, "alice-main", "alice", "100.00").await;
    fund(&app, &admin, "bob-main", "bob", "100.00").await;
    let pay = |amount: &'static str| {
        let request = app
            .client
            .post(format!("{}/v1/transfers", app.url))
            .bearer_auth(&alice)
            .header("Idempotency-Key", "pay-dead")
            .json(&json!({"from": "alice-main", "to": "bob-main", "amount": amount}));
        async move {
            let r = request.send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap())
        }
    };
    let (status, first) = pay("1.00").await;
    assert_eq!(status, 201, "{first}");
    let auth = app.auth.clone().unwrap();
    assert!(auth
        .stores
        .locks
        .acquire(
            "alice-main:pay-dead",
            "a-dead-process",
            Duration::from_secs(30)
        )
        .await
        .unwrap());
    let (status, replay) = pay("1.00").await;
    assert_eq!(status, 201, "{replay}");
    assert_eq!(first["id"], replay["id"]);
    let (status, changed) = pay("2.00").await;
    assert_eq!(
        (status, changed["error"]["code"].as_str()),
        (422, Some("idempotency_key_reused")),
        "{changed}"
    );
    assert_eq!(balances(&app).await, (9_900, 10_100));
}

/// A Redis server of the test's own, so that it can be killed: the
/// `redis-server` on PATH (or `SHARDPAY_TEST_REDIS_SERVER`).
struct OwnRedis {
    child: std::process::Child,
    port: u16,
}

impl OwnRedis {
    fn start(port: u16) -> Option<OwnRedis> {
        let bin =
            std::env::var("SHARDPAY_TEST_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let child = match std::process::Command::new(&bin)
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
        {
            Ok(child) => child,
            Err(e) => {
                assert!(
                    std::env::var("SHARDPAY_REQUIRE_REDIS").as_deref() != Ok("1"),
                    "SHARDPAY_REQUIRE_REDIS=1 but {bin} does not start: {e}"
                );
                eprintln!("Redis-down test skipped: no {bin}");
                return None;
            }
        };
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(OwnRedis { child, port });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("redis-server did not listen on {port}");
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Redis dies in the middle of a stream of transfers and comes back empty:
/// every request either went through or was refused with 503 and changed
/// nothing; retrying the refused ones with their keys pays each once; the
/// audit passes throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_going_down_neither_loses_nor_doubles_money() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let Some(mut redis) = OwnRedis::start(port) else {
        return;
    };
    let app = app_with_auth(Some(&redis.url())).await;
    let admin = token(&app.login("admin", "admin-password", false).await);
    let alice = token(&app.login("alice", "alice-password", true).await);
    app.login("bob", "bob-password", true).await;
    fund(&app, &admin, "alice-main", "alice", "100.00").await;
    fund(&app, &admin, "bob-main", "bob", "100.00").await;

    let send = |token: String, key: String| {
        let request = app
            .client
            .post(format!("{}/v1/transfers", app.url))
            .bearer_auth(token)
            .header("Idempotency-Key", key)
            .json(&json!({"from": "alice-main", "to": "bob-main", "amount": "1.00"}));
        async move {
            let r = request.send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap())
        }
    };
    // 40 transfers, Redis killed after the 15th.
    let mut refused = Vec::new();
    let mut paid = std::collections::BTreeSet::new();
    for i in 0..40 {
        if i == 15 {
            redis.kill();
        }
        let key = format!("down-{i}");
        let (status, answer) = send(alice.clone(), key.clone()).await;
        match status {
            201 => {
                paid.insert(key);
            }
            503 => {
                assert_eq!(
                    answer["error"]["code"], "auth_store_unavailable",
                    "{answer}"
                );
                refused.push(key);
            }
            other => panic!("answer {other} while Redis went down: {answer}"),
        }
    }
    assert!(paid.len() >= 15, "the first 15 went through: {paid:?}");
    assert!(!refused.is_empty(), "with Redis down, requests are refused");
    let paid_so_far = paid.len() as i64;
    assert_eq!(
        balances(&app).await,
        (10_000 - 100 * paid_so_far, 10_000 + 100 * paid_so_far)
    );
    let report = shardpay_reference::audit::run(&app.manager).await.unwrap();
    assert!(report.ok, "{report:?}");

    // Redis comes back empty: every session is gone, so log in again, then
    // retry everything with the same keys.
    let _redis = OwnRedis::start(port).expect("restart redis");
    let mut alice = None;
    for _ in 0..50 {
        let (status, answer, _) = app
            .call(
                Method::POST,
                "/v1/auth/login",
                None,
                Some(json!({"username": "alice", "password": "alice-password"})),
            )
            .await;
        if status == 200 {
            alice = Some(token(&answer));
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let alice = alice.expect("login after Redis came back");
    for i in 0..40 {
        let key = format!("down-{i}");
        let (status, answer) = send(alice.clone(), key.clone()).await;
        assert_eq!(status, 201, "{answer}");
        paid.insert(key);
    }
    assert_eq!(paid.len(), 40);
    // Each key paid exactly once.
    assert_eq!(balances(&app).await, (10_000 - 4_000, 10_000 + 4_000));
    let report = shardpay_reference::audit::run(&app.manager).await.unwrap();
    assert!(report.ok, "{report:?}");
}

/// Log out everywhere: every session of the user is revoked, access and
/// refresh tokens alike; an admin may do it for another user, a user may
/// not.
async fn logout_everywhere_revokes_every_session(redis: Option<&str>) {
    let app = app_with_auth(redis).await;
    let first = app.login("erin", "erin-password-1", true).await;
    let second = app.login("erin", "erin-password-1", false).await;
    let other = app.login("frank", "frank-password-1", true).await;
    let me = |t: &Value| {
        let t = token(t);
        let app = &app;
        async move { app.call(Method::GET, "/v1/auth/me", Some(&t), None).await.0 }
    };
    assert_eq!(me(&second).await, 200);
    // frank may not log erin out.
    let (status, answer, _) = app
        .call(
            Method::POST,
            "/v1/auth/logout-all",
            Some(&token(&other)),
            Some(json!({"username": "erin"})),
        )
        .await;
    assert_eq!(status, 403, "{answer}");
    assert_eq!(me(&second).await, 200);
    let (status, answer, _) = app
        .call(
            Method::POST,
            "/v1/auth/logout-all",
            Some(&token(&first)),
            None,
        )
        .await;
    assert_eq!(
        (status, answer["revoked"].as_u64()),
        (200, Some(2)),
        "{answer}"
    );
    assert_eq!(me(&first).await, 401);
    assert_eq!(me(&second).await, 401);
    let (status, _, _) = app
        .call(
            Method::POST,
            "/v1/auth/refresh",
            None,
            Some(json!({"refresh_token": second["refresh_token"]})),
        )
        .await;
    assert_eq!(status, 401, "the refresh token went with its session");
    assert_eq!(me(&other).await, 200, "other users keep their sessions");
    // An admin logs a user out everywhere.
    let third = app.login("erin", "erin-password-1", false).await;
    assert_eq!(me(&third).await, 200);
    let admin = token(&app.login("admin", "admin-password", false).await);
    let (status, answer, _) = app
        .call(
            Method::POST,
            "/v1/auth/logout-all",
            Some(&admin),
            Some(json!({"username": "erin"})),
        )
        .await;
    assert_eq!(
        (status, answer["revoked"].as_u64()),
        (200, Some(1)),
        "{answer}"
    );
    assert_eq!(me(&third).await, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logout_everywhere_revokes_every_session_in_memory() {
    logout_everywhere_revokes_every_session(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logout_everywhere_revokes_every_session_on_redis() {
    let Some(redis) = redis_server() else { return };
    logout_everywhere_revokes_every_session(Some(&redis)).await;
}
