//! Transfers on the embedded backend through the shard manager (no HTTP):
//! one at a time (latency) and 64 concurrent (throughput, where group
//! commit shares each fsync among many transfers).

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use shardpay_reference::app::open_embedded;
use shardpay_reference::ids::AccountId;
use shardpay_reference::ledger::sqlite::SqliteConfig;
use shardpay_reference::ledger::{StoredResponse, Transfer};
use shardpay_reference::manager::{
    AccountRequest, ManagerConfig, ShardManager, TransferRequest, View,
};
use shardpay_reference::money::{Amount, Currency};

const ACCOUNTS: usize = 256;
const CONCURRENCY: usize = 64;

const VIEW: View<Transfer> = View {
    route: "bench",
    render: |_| StoredResponse {
        status: 201,
        body: String::new(),
    },
};

struct Fixture {
    manager: Arc<ShardManager>,
    /// Pairs of accounts on the same shard, and on different shards.
    same: Vec<(AccountId, AccountId)>,
    cross: Vec<(AccountId, AccountId)>,
    _dir: tempfile::TempDir,
}

fn fixture(runtime: &tokio::runtime::Runtime) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let stores = open_embedded(dir.path(), 4, &SqliteConfig::default()).unwrap();
    let manager = Arc::new(ShardManager::new(stores, ManagerConfig::default()).unwrap());
    let ids: Vec<AccountId> = (0..ACCOUNTS)
        .map(|i| AccountId::parse(&format!("bench_{i}")).unwrap())
        .collect();
    let account_view: View<_> = View {
        route: "bench",
        render: |_| StoredResponse {
            status: 201,
            body: String::new(),
        },
    };
    runtime.block_on(async {
        for id in &ids {
            let request = AccountRequest {
                id: id.clone(),
                currency: Currency::DEFAULT,
                opening_balance: Amount::from_minor(1_000_000_000).unwrap(),
                owner: None,
            };
            manager
                .create_account(request, None, &account_view)
                .await
                .unwrap();
        }
    });
    let ring = manager.ring();
    let (mut same, mut cross) = (Vec::new(), Vec::new());
    for a in &ids {
        for b in &ids {
            if a == b {
                continue;
            }
            if ring.shard_of(a) == ring.shard_of(b) {
                same.push((a.clone(), b.clone()));
            } else {
                cross.push((a.clone(), b.clone()));
            }
        }
    }
    Fixture {
        manager,
        same,
        cross,
        _dir: dir,
    }
}

async fn pay(manager: &Arc<ShardManager>, (from, to): &(AccountId, AccountId)) {
    let request = TransferRequest {
        from: from.clone(),
        to: to.clone(),
        amount: Amount::from_minor(1).unwrap(),
        currency: None,
    };
    manager.transfer_funds(request, None, &VIEW).await.unwrap();
}

fn transfers(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let f = fixture(&runtime);
    for (name, pairs) in [("same_shard", &f.same), ("cross_shard", &f.cross)] {
        let mut group = c.benchmark_group(format!("transfer_{name}"));
        let mut i = 0usize;
        group.bench_function("one_at_a_time", |b| {
            b.iter(|| {
                i = (i + 7919) % pairs.len();
                runtime.block_on(pay(&f.manager, &pairs[i]));
            })
        });
        group.throughput(Throughput::Elements(CONCURRENCY as u64));
        group.bench_function(format!("{CONCURRENCY}_concurrent"), |b| {
            b.iter(|| {
                runtime.block_on(async {
                    let mut tasks = Vec::with_capacity(CONCURRENCY);
                    for _ in 0..CONCURRENCY {
                        i = (i + 7919) % pairs.len();
                        let (manager, pair) = (Arc::clone(&f.manager), pairs[i].clone());
                        tasks.push(tokio::spawn(async move { pay(&manager, &pair).await }));
                    }
                    for task in tasks {
                        task.await.unwrap();
                    }
                })
            })
        });
        group.finish();
    }
}

criterion_group!(benches, transfers);
criterion_main!(benches);
