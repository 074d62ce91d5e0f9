//! Transfers through the full path of the in-process system, as a run
//! drives it: HTTP on loopback, a bearer token, an idempotency key, the
//! fraud check, the ledger with its outbox, the in-process bus and its
//! consumers. One at a time (latency) and 64 concurrent (throughput), for
//! same-shard and cross-shard (saga) transfers. `shardpay bench` sets the
//! same path against the raw storage; these catch a change that slows it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use shardpay_reference::ledger::sqlite::Durability;
use shardpay_simulator::api::Api;
use shardpay_simulator::run::LocalSystem;

const ACCOUNTS: usize = 256;
const CONCURRENCY: usize = 64;
const PASSWORD: &str = "bench-owner-password";

struct Fixture {
    system: LocalSystem,
    client: reqwest::Client,
    token: String,
    /// Pairs of account ids on one shard, and on different shards.
    same: Vec<(String, String)>,
    cross: Vec<(String, String)>,
    keys: AtomicU64,
}

async fn fixture() -> anyhow::Result<Fixture> {
    let system = LocalSystem::start(4, Durability::Full).await?;
    let mut admin = Api::new(system.url())?;
    admin.token = Some(admin.login("admin", system.admin_password()).await?);
    admin.register("bench-owner", PASSWORD).await?;
    let token = admin.login("bench-owner", PASSWORD).await?;
    let ids: Vec<String> = (0..ACCOUNTS).map(|i| format!("bench_{i}")).collect();
    let owners = vec!["bench-owner".to_string(); ACCOUNTS];
    let shards = admin
        .create_accounts(&ids, Some(&owners), "USD", &vec![1_000_000_000; ACCOUNTS])
        .await?;
    let (mut same, mut cross) = (Vec::new(), Vec::new());
    for (a, shard_a) in ids.iter().zip(&shards) {
        for (b, shard_b) in ids.iter().zip(&shards) {
            if a == b {
                continue;
            }
            let pair = (a.clone(), b.clone());
            if shard_a == shard_b {
                same.push(pair);
            } else {
                cross.push(pair);
            }
        }
    }
    Ok(Fixture {
        system,
        client: reqwest::Client::new(),
        token,
        same,
        cross,
        keys: AtomicU64::new(0),
    })
}

/// One transfer of one minor unit; panics unless it was accepted, so a
/// bench that measures refusals fails instead.
async fn pay(f: &Fixture, (from, to): &(String, String)) {
    let key = format!("bench-{}", f.keys.fetch_add(1, Ordering::Relaxed));
    let response = f
        .client
        .post(format!("{}/v1/transfers", f.system.url()))
        .bearer_auth(&f.token)
        .header("Idempotency-Key", key)
        .json(&serde_json::json!({
            "from": from, "to": to, "amount_minor": 1, "currency": "USD"
        }))
        .send()
        .await
        .expect("the in-process system answers");
    let status = response.status();
    assert!(
        status == 201 || status == 202,
        "transfer answered {status}: {}",
        response.text().await.unwrap_or_default()
    );
}

fn full_path(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let f = Arc::new(
        runtime
            .block_on(fixture())
            .expect("start the in-process system"),
    );
    for (name, pairs) in [("same_shard", &f.same), ("cross_shard", &f.cross)] {
        let mut group = c.benchmark_group(format!("http_transfer_{name}"));
        let mut i = 0usize;
        group.bench_function("one_at_a_time", |b| {
            b.iter(|| {
                i = (i + 7919) % pairs.len();
                runtime.block_on(pay(&f, &pairs[i]));
            })
        });
        group.throughput(Throughput::Elements(CONCURRENCY as u64));
        group.bench_function(format!("{CONCURRENCY}_concurrent"), |b| {
            b.iter(|| {
                runtime.block_on(async {
                    let mut tasks = Vec::with_capacity(CONCURRENCY);
                    for _ in 0..CONCURRENCY {
                        i = (i + 7919) % pairs.len();
                        let (f, pair) = (Arc::clone(&f), pairs[i].clone());
                        tasks.push(tokio::spawn(async move { pay(&f, &pair).await }));
                    }
                    for task in tasks {
                        task.await.expect("transfer task");
                    }
                })
            })
        });
        group.finish();
    }
    if let Ok(f) = Arc::try_unwrap(f) {
        runtime.block_on(f.system.stop()).expect("stop the system");
    }
}

criterion_group!(benches, full_path);
criterion_main!(benches);
