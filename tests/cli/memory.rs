//! Bounded resources: a few thousand hostile requests against a server
//! with auth on leave its resident memory within a stated bound, and
//! `/metrics` stays small. Once, 2,000 refused logins with 60 KB usernames
//! left 116 MiB behind, and 500 requests with invented HTTP methods grew
//! `/metrics` from 3 KB to 74 MB.

use std::process::{Command, Stdio};

use futures_util::StreamExt;
use serde_json::json;

use super::{block_on, start, Server};

/// Most the server's resident memory may grow through the hostile load.
/// The load's bodies alone add up to more than 120 MiB; a server that
/// kept a fraction of them would pass this bound.
const MAX_GROWTH_KIB: u64 = 48 * 1024;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc/<pid>/status")
}

fn serve_with_auth(dir: &std::path::Path) -> Server {
    let mut command = Command::new(env!("CARGO_BIN_EXE_shardpay"));
    command
        .args(["serve", "--port", "0", "--data-dir"])
        .arg(dir)
        .args([
            "--jwt-secret",
            "memory-test-secret-0123456789abcdef0123",
            "--admin-password",
            "admin-password",
            "--argon2-memory-kib",
            "64",
            "--argon2-iterations",
            "1",
        ])
        .env_remove("SHARDPAY_DEMO")
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    start(command)
}

/// The size of `/metrics`, in bytes.
async fn metrics_len(client: &reqwest::Client, url: &str) -> usize {
    let response = client.get(format!("{url}/metrics")).send().await.unwrap();
    response.text().await.unwrap().len()
}

#[test]
fn hostile_requests_leave_memory_and_metrics_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve_with_auth(dir.path());
    let pid = server.child.id();
    let url = server.url.clone();
    block_on(async move {
        // A connection per request: a server that refuses a request before
        // reading its body closes that connection, and a reused one would
        // fail the next request instead.
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap();
        // Warm up: the allocator's and the runtime's first growth is not
        // what this test measures.
        for _ in 0..50 {
            let _ = client.get(format!("{url}/health")).send().await.unwrap();
            let _ = client
                .post(format!("{url}/v1/auth/login"))
                .json(&json!({"username": "nobody", "password": "wrong-password"}))
                .send()
                .await
                .unwrap();
        }
        let metrics_before = metrics_len(&client, &url).await;
        let before = rss_kib(pid);
        let mut statuses = std::collections::BTreeMap::<u16, u64>::new();
        let long_name = |i: usize| format!("{i:06}{}", "u".repeat(60_000));
        let requests = (0..3_500).map(|i| {
            let client = client.clone();
            let url = url.clone();
            async move {
                let request = match i % 7 {
                    // Refused logins with 60 KB usernames.
                    0..=2 => client
                        .post(format!("{url}/v1/auth/login"))
                        .json(&json!({"username": long_name(i), "password": "wrong-password"})),
                    // Registrations with 60 KB usernames and passwords.
                    3 => client
                        .post(format!("{url}/v1/auth/register"))
                        .json(&json!({"username": long_name(i), "password": "p".repeat(3_000)})),
                    // Invented HTTP methods.
                    4 => client.request(
                        reqwest::Method::from_bytes(format!("M{i}X{}", "Y".repeat(500)).as_bytes())
                            .unwrap(),
                        format!("{url}/v1/shards"),
                    ),
                    // Forged tokens with absurd amounts and 255-byte keys.
                    5 => client
                        .post(format!("{url}/v1/transfers"))
                        .bearer_auth(format!("eyJ.{}.x", "A".repeat(4_000)))
                        .header("idempotency-key", format!("{i:0255}"))
                        .json(&json!({"from": "a", "to": "b", "amount": "-".repeat(30_000)})),
                    // The modelled system's routes, unauthenticated.
                    _ => client.post(format!("{url}/transfer/a/b/{}", "-".repeat(8_000))),
                };
                request.send().await.map(|r| r.status().as_u16())
            }
        });
        let answers: Vec<_> = futures_util::stream::iter(requests)
            .buffer_unordered(16)
            .collect()
            .await;
        // A request refused before its body was read (a forged token, say)
        // may see the connection closed while it is still sending: counted
        // apart, and bounded.
        let mut cut_short = 0;
        for answer in answers {
            match answer {
                Ok(status) => *statuses.entry(status).or_default() += 1,
                Err(e) if e.is_request() => cut_short += 1,
                Err(e) => panic!("the server did not answer: {e}"),
            }
        }
        assert!(
            cut_short < 350,
            "{cut_short} requests were cut short; answers {statuses:?}"
        );
        assert!(
            statuses.keys().all(|s| (400..500).contains(s)),
            "only 4xx answers: {statuses:?}"
        );
        let health = client.get(format!("{url}/health")).send().await.unwrap();
        assert_eq!(health.status(), 200, "the server is up");
        let after = rss_kib(pid);
        let metrics_after = metrics_len(&client, &url).await;
        eprintln!(
            "resident memory {before} KiB -> {after} KiB; /metrics {metrics_before} -> {metrics_after} bytes; answers {statuses:?}, {cut_short} cut short while sending"
        );
        assert!(
            after.saturating_sub(before) < MAX_GROWTH_KIB,
            "resident memory grew from {before} KiB to {after} KiB"
        );
        assert!(
            metrics_after < metrics_before + 16 * 1024,
            "/metrics grew from {metrics_before} to {metrics_after} bytes"
        );
    });
}
