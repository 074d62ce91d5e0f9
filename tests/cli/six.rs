//! The reference system as six processes, started with the commands and
//! environment docker-compose.yml gives them (as Docker Compose resolves
//! the file), on real local servers in place of compose's: four MySQL shard
//! databases, the Kafka-protocol broker and Redis, with auth on. The smoke
//! scenario runs through them and its audit, books and event pipeline
//! pass; a user pays from its own account and not from another's; a
//! request id given to the shard manager shows in the fraud service's log.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{block_on, mysql_databases, only_report};

/// One service process; killed when dropped.
pub(super) struct Process {
    pub(super) child: Child,
    pub(super) url: String,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `SHARDPAY_TEST_<NAME>` or `None` (the test is skipped), unless
/// `SHARDPAY_REQUIRE_<WHAT>=1` makes that a failure.
pub(super) fn server(var: &str, require: &str, how: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => Some(v),
        _ => {
            assert!(
                std::env::var(require).as_deref() != Ok("1"),
                "{require}=1 but {var} is not set"
            );
            eprintln!("six-service test skipped: set {var} ({how})");
            None
        }
    }
}

pub(super) fn start(
    command: &[String],
    env: &[(String, String)],
    extra: &[String],
    log: &Path,
) -> Process {
    let mut child = Command::new(env!("CARGO_BIN_EXE_shardpay"))
        .args(command)
        .args(extra)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("RUST_LOG", "info,shardpay_reference::http=debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::from(std::fs::File::create(log).unwrap()))
        .spawn()
        .expect("start shardpay serve");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let Some(url) = line.trim().strip_prefix("shardpay listening on ") else {
        let _ = child.wait();
        panic!(
            "{command:?} did not start: {line:?}\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
    };
    Process {
        url: url.replace("0.0.0.0", "127.0.0.1"),
        child,
    }
}

/// docker-compose.yml resolved by Docker Compose (`scripts/compose.sh
/// json`), or `None` (skipped) when Compose cannot be had, unless
/// `SHARDPAY_REQUIRE_COMPOSE=1`.
fn compose_json(env_file: &Path) -> Option<Value> {
    let out = Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/compose.sh"))
        .arg("json")
        .arg(env_file)
        .output()
        .expect("run scripts/compose.sh");
    if !out.status.success() {
        assert!(
            std::env::var("SHARDPAY_REQUIRE_COMPOSE").as_deref() != Ok("1"),
            "SHARDPAY_REQUIRE_COMPOSE=1 but scripts/compose.sh json failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!(
            "six-service test skipped: Docker Compose is not available ({})",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        return None;
    }
    Some(serde_json::from_slice(&out.stdout).expect("compose config JSON"))
}

/// The environment variables `shardpay serve` reads, from its --help.
fn serve_env_names() -> Vec<String> {
    let help = Command::new(env!("CARGO_BIN_EXE_shardpay"))
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&help.stdout).to_string();
    text.split("[env: ")
        .skip(1)
        .filter_map(|rest| rest.split(['=', ']']).next())
        .map(str::to_string)
        .collect()
}

pub(super) fn get_auth(url: &str, token: &str) -> Value {
    block_on(async {
        reqwest::Client::new()
            .get(url)
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    })
}

pub(super) fn text(url: &str) -> String {
    block_on(async { reqwest::get(url).await.unwrap().text().await.unwrap() })
}

/// The stack tests (here and `replicas.rs`) run one at a time: two stacks
/// at once take more connections than one MySQL server allows by default.
pub(super) fn one_stack_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static STACK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    STACK
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A port free now, below Linux's ephemeral range (32768 up): a port the
/// kernel hands out for port 0 can be taken, before its service binds it,
/// by an outgoing connection of a service started earlier.
pub(super) fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = 20_000 + (std::process::id() % 500) * 20;
    loop {
        let port = (start + NEXT.fetch_add(1, Ordering::Relaxed) % 12_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

pub(super) fn ready(name: &str, url: &str, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let answer = get(&format!("{url}/ready"));
        if let Some((200, _)) = answer {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} not ready within 60 s: {answer:?}\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A GET answering (status, JSON body), or `None` when nothing answers.
pub(super) fn get(url: &str) -> Option<(u16, Value)> {
    block_on(async {
        let response = reqwest::get(url).await.ok()?;
        let status = response.status().as_u16();
        Some((status, response.json().await.unwrap_or_default()))
    })
}

#[test]
fn six_services_as_six_processes_run_the_smoke_scenario() {
    let _one_stack = one_stack_at_a_time();
    let Some(kafka) = server(
        "SHARDPAY_TEST_KAFKA_BOOTSTRAP",
        "SHARDPAY_REQUIRE_KAFKA",
        "scripts/kafka.sh up",
    ) else {
        return;
    };
    let Some(redis) = server(
        "SHARDPAY_TEST_REDIS_URL",
        "SHARDPAY_REQUIRE_REDIS",
        "scripts/redis.sh up",
    ) else {
        return;
    };
    let Some(urls) = mysql_databases() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let tag = format!("six{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let admin_password = uuid::Uuid::new_v4().simple().to_string();
    let secret = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );

    // The services as docker-compose.yml defines them, resolved by Docker
    // Compose itself, with this .env.
    let env_file = dir.path().join(".env");
    std::fs::write(
        &env_file,
        format!("SHARDPAY_JWT_SECRET={secret}\nSHARDPAY_ADMIN_PASSWORD={admin_password}\nMYSQL_ROOT_PASSWORD=unused\n"),
    )
    .unwrap();
    let Some(compose) = compose_json(&env_file) else {
        return;
    };
    let known = serve_env_names();
    let order = [
        "auth",
        "fraud",
        "ledger",
        "notification",
        "analytics",
        "shard-manager",
    ];
    let ports: Vec<u16> = order.iter().map(|_| free_port()).collect();
    let local = |name: &str| {
        let i = order.iter().position(|n| *n == name).unwrap();
        format!("http://127.0.0.1:{}", ports[i])
    };
    let log = |name: &str| dir.path().join(format!("{name}.log"));
    let mut processes = Vec::new();
    for (i, name) in order.iter().enumerate() {
        let service = &compose["services"][*name];
        let command: Vec<String> = service["command"]
            .as_array()
            .unwrap_or_else(|| panic!("{name} has no command in docker-compose.yml"))
            .iter()
            .map(|w| w.as_str().unwrap().to_string())
            .collect();
        assert_eq!(command, ["serve", name], "{name}'s command");
        let mut env: Vec<(String, String)> = Vec::new();
        for (key, value) in service["environment"].as_object().unwrap() {
            assert!(
                known.contains(key),
                "{name}: {key} in docker-compose.yml is not an option of shardpay serve"
            );
            // Where compose names its own hosts, this test names local
            // servers; every other setting is used as compose gives it.
            let value = match key.as_str() {
                "SHARDPAY_MYSQL_URLS" => urls.join(","),
                "SHARDPAY_KAFKA_BOOTSTRAP" => kafka.clone(),
                "SHARDPAY_REDIS_URL" => redis.clone(),
                "SHARDPAY_AUTH_URL" => local("auth"),
                "SHARDPAY_LEDGER_URL" => local("ledger"),
                "SHARDPAY_FRAUD_URL" => local("fraud"),
                "SHARDPAY_NOTIFICATION_URL" => local("notification"),
                "SHARDPAY_DATA_DIR" => dir.path().join(name).display().to_string(),
                _ => value.as_str().unwrap().to_string(),
            };
            env.push((key.clone(), value));
        }
        // Test-only: its own port, topics, keys, auth and notification
        // databases (several runs share the servers), and cheap password
        // hashes.
        let extra: Vec<String> = [
            "--port",
            &ports[i].to_string(),
            "--auth-mysql-url",
            &format!("{}_auth", urls[0]),
            "--notification-mysql-url",
            &format!("{}_notify", urls[0]),
            "--kafka-prefix",
            &format!("{tag}-"),
            "--redis-prefix",
            &format!("{tag}:"),
            "--argon2-memory-kib",
            "64",
            "--argon2-iterations",
            "1",
            "--recovery-grace-ms",
            "500",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        processes.push(start(&command, &env, &extra, &log(name)));
    }
    for (name, process) in order.iter().zip(&processes) {
        ready(name, &process.url, &log(name));
    }
    let by_name = |name: &str| &processes[order.iter().position(|n| *n == name).unwrap()];
    let (auth, fraud, notification, analytics, manager) = (
        by_name("auth"),
        by_name("fraud"),
        by_name("notification"),
        by_name("analytics"),
        by_name("shard-manager"),
    );
    // Each service serves its own routes, not the others'.
    let elsewhere = get(&format!("{}/v1/analytics", manager.url)).unwrap();
    assert_eq!(elsewhere.0, 404);
    assert!(
        elsewhere.1["error"]["message"]
            .as_str()
            .unwrap()
            .contains("served by the analytics service"),
        "{elsewhere:?}"
    );
    assert_eq!(get(&format!("{}/v1/shards", fraud.url)).unwrap().0, 404);
    let health = get(&format!("{}/health", fraud.url)).unwrap();
    assert_eq!(health.1["service"], "fraud", "{health:?}");

    // Without --service, the simulator is told where the auth routes are.
    let lost = Command::new(env!("CARGO_BIN_EXE_shardpay"))
        .args([
            "run",
            "scenarios/smoke.toml",
            "--quiet",
            "--target",
            &manager.url,
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&lost.stderr);
    assert_eq!(lost.status.code(), Some(2), "{said}");
    assert!(
        said.contains("served by the auth service") && said.contains("--service auth=URL"),
        "{said}"
    );

    let reports = dir.path().join("reports");
    let mut run = Command::new(env!("CARGO_BIN_EXE_shardpay"))
        .args([
            "run",
            "scenarios/smoke.toml",
            "--quiet",
            "--target",
            &manager.url,
        ])
        .arg("--service")
        .arg(format!("auth={}", auth.url))
        .arg("--service")
        .arg(format!("notification={}", notification.url))
        .arg("--service")
        .arg(format!("analytics={}", analytics.url))
        .arg("--reports")
        .arg(&reports)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("SHARDPAY_ADMIN_PASSWORD", &admin_password)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The ledger service audits again and again while the run's sagas go
    // on in the shard manager's process: every audit must pass.
    let admin = login(&auth.url, "admin", &admin_password);
    let audit_url = format!("{}/v1/audit", by_name("ledger").url);
    let mut audits = 0;
    while run.try_wait().unwrap().is_none() {
        let audit = get_auth(&audit_url, &admin);
        assert_eq!(
            audit["ok"], true,
            "audit {audits} during the run: {audit:#}"
        );
        audits += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(audits >= 3, "only {audits} audits ran during the run");
    eprintln!("six services: {audits} audits passed during the run");
    let run = run.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(run.status.success(), "the run failed:\n{said}");
    let report = only_report(&reports);
    assert_eq!(report["audit"]["ok"], true, "{}", report["audit"]);
    assert_eq!(
        report["pipeline"]["complete"], true,
        "{}",
        report["pipeline"]
    );
    assert!(
        report["run"]["auth"]
            .as_str()
            .unwrap_or("")
            .starts_with("on"),
        "{}",
        report["run"]["auth"]
    );
    eprintln!(
        "six services: {}",
        said.lines().take(12).collect::<Vec<_>>().join("\n")
    );

    // A user who owns one account pays from it through the shard manager
    // (owners kept by the auth service, the score asked of the fraud
    // service); the request id given to the shard manager shows in the
    // fraud service's log. The same user may not pay from another's
    // account.
    let admin = login(&auth.url, "admin", &admin_password);
    call(
        &auth.url,
        "/v1/auth/register",
        None,
        serde_json::json!({"username": format!("{tag}u"), "password": "correct horse battery"}),
        201,
    );
    let user = login(&auth.url, &format!("{tag}u"), "correct horse battery");
    call(
        &manager.url,
        "/v1/accounts",
        Some(&admin),
        serde_json::json!({"id": format!("{tag}a"), "owner": format!("{tag}u"), "opening_balance": "100.00"}),
        201,
    );
    call(
        &manager.url,
        "/v1/accounts",
        Some(&admin),
        serde_json::json!({"id": format!("{tag}b"), "opening_balance": "0"}),
        201,
    );
    let trace = format!("{tag}-trace");
    let paid = call_with(
        &manager.url,
        "/v1/transfers",
        Some(&user),
        serde_json::json!({"from": format!("{tag}a"), "to": format!("{tag}b"), "amount": "12.50"}),
        &[
            ("x-request-id", trace.as_str()),
            ("idempotency-key", "six-1"),
        ],
    );
    assert_eq!(paid.0, 201, "{paid:?}");
    // The ledger service serves the payer's statement to its owner.
    let statement = get_auth(
        &format!("{}/v1/accounts/{tag}a/entries", by_name("ledger").url),
        &user,
    );
    let amounts: Vec<i64> = statement["entries"]
        .as_array()
        .unwrap_or_else(|| panic!("{statement}"))
        .iter()
        .map(|e| e["amount_minor"].as_i64().unwrap())
        .collect();
    assert_eq!(amounts, [100_00, -12_50], "{statement}");
    let refused = call_with(
        &manager.url,
        "/v1/transfers",
        Some(&user),
        serde_json::json!({"from": format!("{tag}b"), "to": format!("{tag}a"), "amount": "1.00"}),
        &[("idempotency-key", "six-2")],
    );
    assert_eq!(refused.0, 403, "{refused:?}");
    assert_eq!(
        refused.1["error"]["code"], "not_account_owner",
        "{refused:?}"
    );
    // Each service's /metrics tells of its own part.
    let metrics = |p: &Process| text(&format!("{}/metrics", p.url));
    let fraud_metrics = metrics(fraud);
    assert!(
        fraud_metrics.contains("route=\"/v1/fraud/score\",status=\"200\""),
        "{fraud_metrics}"
    );
    assert!(
        !fraud_metrics.contains("shardpay_transfers{"),
        "{fraud_metrics}"
    );
    // The last transfer's events are published and applied within moments.
    let eventually = |p: &Process, line: &str| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let now = metrics(p);
            if now.lines().any(|l| l == line) {
                return;
            }
            assert!(Instant::now() < deadline, "no {line:?} in\n{now}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    eventually(by_name("ledger"), "shardpay_outbox_backlog 0");
    eventually(
        analytics,
        "shardpay_consumer_unapplied{group=\"analytics\"} 0",
    );
    assert!(metrics(notification).contains("shardpay_dlq_size"));

    let fraud_log = std::fs::read_to_string(log("fraud")).unwrap();
    assert!(
        fraud_log.contains(&trace),
        "the fraud service did not log request id {trace}"
    );

    // With the fraud service down, the shard manager refuses transfers
    // (they are never made unscored), moves nothing, and is not ready.
    let manager_url = manager.url.clone();
    let balance = |token: &str| {
        get_auth(&format!("{manager_url}/v1/accounts/{tag}a"), token)["balance_minor"].as_i64()
    };
    let before = balance(&user);
    stop(
        &mut processes[order.iter().position(|n| *n == "fraud").unwrap()],
        "fraud",
        &log("fraud"),
    );
    let refused = call_with(
        &manager_url,
        "/v1/transfers",
        Some(&user),
        serde_json::json!({"from": format!("{tag}a"), "to": format!("{tag}b"), "amount": "1.00"}),
        &[("idempotency-key", "six-3")],
    );
    assert_eq!(refused.0, 503, "{refused:?}");
    assert_eq!(
        refused.1["error"]["code"], "fraud_unavailable",
        "{refused:?}"
    );
    assert_eq!(balance(&user), before);
    let ready = get(&format!("{manager_url}/ready")).unwrap();
    assert_eq!(ready.0, 503, "{ready:?}");
    assert!(
        ready.1["problems"].to_string().contains("fraud"),
        "{ready:?}"
    );

    // Each service stops cleanly on SIGTERM (as `docker compose stop` and
    // scripts/stack.sh down stop them), the shard manager first.
    for (name, process) in order.iter().zip(processes.iter_mut()).rev() {
        if *name != "fraud" {
            stop(process, name, &log(name));
        }
    }
}

/// SIGTERM; the process must exit 0 within 30 s and log its stop.
pub(super) fn stop(process: &mut Process, name: &str, log: &Path) {
    {
        assert!(Command::new("kill")
            .args(["-TERM", &process.child.id().to_string()])
            .status()
            .unwrap()
            .success());
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = process.child.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "{name} ignored SIGTERM for 30 s");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(status.success(), "{name} stopped with {status}");
        let said = std::fs::read_to_string(log).unwrap();
        assert!(said.contains("\"stopped\""), "{name} did not log its stop");
    }
}

fn call(base: &str, path: &str, token: Option<&str>, body: Value, expect: u16) -> Value {
    let (status, answer) = call_with(base, path, token, body, &[]);
    assert_eq!(status, expect, "{path}: {answer}");
    answer
}

fn call_with(
    base: &str,
    path: &str,
    token: Option<&str>,
    body: Value,
    headers: &[(&str, &str)],
) -> (u16, Value) {
    block_on(async {
        let mut request = reqwest::Client::new()
            .post(format!("{base}{path}"))
            .json(&body);
        if let Some(t) = token {
            request = request.bearer_auth(t);
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or_default())
    })
}

pub(super) fn login(auth: &str, username: &str, password: &str) -> String {
    block_on(async {
        let answer: Value = reqwest::Client::new()
            .post(format!("{auth}/v1/auth/login"))
            .json(&serde_json::json!({"username": username, "password": password}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        answer["access_token"].as_str().unwrap().to_string()
    })
}
