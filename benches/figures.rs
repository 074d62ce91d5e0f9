//! What `/metrics`, `/ready`, `/v1/shards` and `/v1/analytics` read from a
//! shard (`stats` and `outbox_counts`) on the embedded backend, on shards
//! of a thousand and of a hundred thousand transfers: the time should not
//! depend on the history.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use rusqlite::{params, Connection};
use shardpay_reference::ids::ShardId;
use shardpay_reference::ledger::sqlite::{SqliteConfig, SqliteShard, MIGRATIONS};
use shardpay_reference::ledger::ShardStore;

const USERS: i64 = 100;

/// A shard file with `transfers` transfers and their outbox rows, written
/// in one transaction straight into the tables of the schema before
/// counters; opening it counts them once.
fn shard_of(dir: &std::path::Path, transfers: i64) -> SqliteShard {
    let shard = ShardId::new(0).unwrap();
    let mut conn = Connection::open(SqliteShard::file_path(dir, shard)).unwrap();
    let tx = conn.transaction().unwrap();
    for migration in &MIGRATIONS[..2] {
        tx.execute_batch(migration).unwrap();
    }
    tx.pragma_update(None, "user_version", 2).unwrap();
    {
        let mut account = tx
            .prepare("INSERT INTO accounts VALUES (?, 'user', 'INR', 1000, 1)")
            .unwrap();
        for u in 0..USERS {
            account.execute(params![format!("u{u}")]).unwrap();
        }
        let mut transfer = tx
            .prepare(
                "INSERT INTO transfers VALUES (?, ?, ?, 1, 'INR', 0, 0, 'completed', NULL, ?, ?)",
            )
            .unwrap();
        let mut outbox = tx
            .prepare(
                "INSERT INTO outbox (event_id, event_type, aggregate_id, payload, created_at_ms,
                    published_at_ms) VALUES (?, 'transfer.completed', ?, '{}', ?, ?)",
            )
            .unwrap();
        for n in 0..transfers {
            let id = format!("{n:032x}");
            let (payer, payee) = (format!("u{}", n % USERS), format!("u{}", (n + 1) % USERS));
            transfer.execute(params![id, payer, payee, n, n]).unwrap();
            outbox.execute(params![id, id, n, n]).unwrap();
        }
    }
    tx.commit().unwrap();
    SqliteShard::open(dir, shard, &SqliteConfig::default()).unwrap()
}

fn figures(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut group = c.benchmark_group("shard_figures");
    for transfers in [1_000, 100_000] {
        let dir = tempfile::tempdir().unwrap();
        let store = shard_of(dir.path(), transfers);
        group.bench_with_input(
            BenchmarkId::from_parameter(transfers),
            &store,
            |b, store| {
                b.iter(|| {
                    runtime.block_on(async {
                        store.stats().await.unwrap();
                        store.outbox_counts().await.unwrap();
                    })
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, figures);
criterion_main!(benches);
