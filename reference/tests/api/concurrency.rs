//! Many tasks, random same- and cross-shard transfers, some retried with the
//! same key (one after another and concurrently): afterwards every balance
//! is exactly what the accepted transfers imply and the audit passes.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

use shardpay_reference::manager::{CrossShard, ManagerConfig};

use crate::support::{mysql_server, Options, TestApp};

const TASKS: usize = 8;
const TRANSFERS_PER_TASK: usize = 250;
const ACCOUNTS: usize = 24;
const OPENING_MINOR: i64 = 50_00;

#[derive(Default)]
struct Seen {
    /// Accepted transfers by id: (from, to, amount_minor).
    accepted: HashMap<String, (String, String, i64)>,
    declined: usize,
    conflicts: usize,
    replays: usize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_transfers_with_retries_keep_every_balance_exact() {
    random_transfers(TestApp::start().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_transfers_on_mysql_shards_keep_every_balance_exact() {
    if mysql_server().is_none() {
        return;
    }
    let options = Options {
        mysql: true,
        ..Options::default()
    };
    random_transfers(TestApp::start_with(options).await).await;
}

/// With only 3 connections per shard, fewer than the transfers running at
/// once: coordinators holding prepared branches must still get their
/// decisions written (they once waited for each other's connections).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_xa_transfers_on_mysql_shards_keep_every_balance_exact() {
    if mysql_server().is_none() {
        return;
    }
    let options = Options {
        mysql: true,
        mysql_pool_size: Some(3),
        manager: ManagerConfig {
            cross_shard: CrossShard::Xa,
            ..ManagerConfig::default()
        },
        ..Options::default()
    };
    let app = TestApp::start_with(options).await;
    random_transfers(app).await;
}

async fn random_transfers(app: TestApp) {
    let app = Arc::new(app);
    let ids: Vec<String> = (0..ACCOUNTS).map(|i| format!("acct_{i}")).collect();
    for id in &ids {
        app.create(id, "50.00").await;
    }
    let seen = Arc::new(Mutex::new(Seen::default()));
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let (app, ids, seen) = (Arc::clone(&app), ids.clone(), Arc::clone(&seen));
        tasks.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(task as u64);
            for n in 0..TRANSFERS_PER_TASK {
                let from = &ids[rng.random_range(0..ids.len())];
                let mut to = &ids[rng.random_range(0..ids.len())];
                while to == from {
                    to = &ids[rng.random_range(0..ids.len())];
                }
                let minor: i64 = rng.random_range(1..=1_500);
                let body = json!({"from": from, "to": to, "amount_minor": minor});
                let key = format!("t{task}-{n}");
                let attempts = match rng.random_range(0..10) {
                    0 => 3, // retried one after another
                    1 => 2, // retried concurrently
                    _ => 1,
                };
                let answers = if attempts == 2 {
                    let (a, b) = tokio::join!(
                        app.post("/v1/transfers", body.clone(), Some(&key)),
                        app.post("/v1/transfers", body.clone(), Some(&key))
                    );
                    vec![a, b]
                } else {
                    let mut answers = Vec::new();
                    for _ in 0..attempts {
                        answers.push(app.post("/v1/transfers", body.clone(), Some(&key)).await);
                    }
                    answers
                };
                let mut seen = seen.lock().unwrap();
                let mut ids_for_key = HashSet::new();
                for (status, answer) in answers {
                    match status {
                        201 => {
                            let id = answer["id"].as_str().unwrap().to_string();
                            ids_for_key.insert(id.clone());
                            if seen
                                .accepted
                                .insert(id, (from.clone(), to.clone(), minor))
                                .is_some()
                            {
                                seen.replays += 1;
                            }
                        }
                        422 => {
                            assert_eq!(answer["error"]["code"], "insufficient_funds", "{answer}");
                            seen.declined += 1;
                        }
                        409 => {
                            assert_eq!(answer["error"]["code"], "idempotency_key_in_flight");
                            seen.conflicts += 1;
                        }
                        other => panic!("unexpected {other}: {answer}"),
                    }
                }
                assert!(
                    ids_for_key.len() <= 1,
                    "one key made two transfers: {ids_for_key:?}"
                );
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }

    let seen = seen.lock().unwrap();
    let mut expected: HashMap<&str, i64> =
        ids.iter().map(|id| (id.as_str(), OPENING_MINOR)).collect();
    for (from, to, minor) in seen.accepted.values() {
        *expected.get_mut(from.as_str()).unwrap() -= minor;
        *expected.get_mut(to.as_str()).unwrap() += minor;
    }
    for id in &ids {
        assert_eq!(app.balance_minor(id).await, expected[id.as_str()], "{id}");
    }
    let (_, shards) = app.get("/v1/shards").await;
    let completed: u64 = shards["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["transfers"]["completed"].as_u64().unwrap())
        .sum();
    assert_eq!(
        completed as usize,
        seen.accepted.len(),
        "transfers stored vs accepted"
    );
    assert!(
        seen.accepted.len() > 1_000,
        "too few accepted: {}",
        seen.accepted.len()
    );
    assert!(seen.replays > 0);
    app.assert_audit_passes().await;
    let total: i64 = expected.values().sum();
    assert_eq!(total, OPENING_MINOR * ACCOUNTS as i64);
}
