//! Resharding a live system: accounts move to a placement over more (or
//! fewer) shards while transfers run, and money stays exact throughout.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

use shardpay_reference::ids::{AccountId, TransferId};
use shardpay_reference::ledger::{now_ms, Refusal, StoreError, Transfer, TransferState};
use shardpay_reference::manager::{CrossShard, ManagerConfig};
use shardpay_reference::money::Amount;
use shardpay_reference::sharding::{Ring, Strategy};

use crate::support::{inr, mysql_server, Options, TestApp};

const ACCOUNTS: usize = 200;
const OPENING_MINOR: i64 = 50_00;

/// Five shard stores, accounts placed over four.
fn options(manager: ManagerConfig) -> Options {
    Options {
        shards: 5,
        manager: ManagerConfig {
            placed_shards: Some(4),
            ..manager
        },
        fraud: None,
        ..Options::default()
    }
}

async fn accounts(app: &TestApp) -> Vec<String> {
    let ids: Vec<String> = (0..ACCOUNTS).map(|i| format!("acct_{i}")).collect();
    for id in &ids {
        app.create(id, "50.00").await;
    }
    ids
}

#[derive(Default)]
struct Seen {
    /// Accepted transfers by id: (from, to, amount_minor).
    accepted: HashMap<String, (String, String, i64)>,
    moving: usize,
}

/// Random transfers, some retried under their key, until `stop`.
fn traffic(
    app: &Arc<TestApp>,
    ids: &[String],
    seen: &Arc<Mutex<Seen>>,
    stop: &Arc<AtomicBool>,
    tasks: usize,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..tasks)
        .map(|task| {
            let (app, ids, seen, stop) = (
                Arc::clone(app),
                ids.to_vec(),
                Arc::clone(seen),
                Arc::clone(stop),
            );
            tokio::spawn(async move {
                let mut rng = StdRng::seed_from_u64(task as u64);
                let mut n = 0;
                while !stop.load(Ordering::SeqCst) {
                    n += 1;
                    let from = &ids[rng.random_range(0..ids.len())];
                    let mut to = &ids[rng.random_range(0..ids.len())];
                    while to == from {
                        to = &ids[rng.random_range(0..ids.len())];
                    }
                    let minor: i64 = rng.random_range(1..=900);
                    let body = json!({"from": from, "to": to, "amount_minor": minor});
                    let key = format!("t{task}-{n}");
                    // A request refused while its account moved is sent
                    // again under the same key, as a client would.
                    let mut transfer_ids = HashSet::new();
                    for attempt in 0..20 {
                        let (status, answer) =
                            app.post("/v1/transfers", body.clone(), Some(&key)).await;
                        match status {
                            201 => {
                                let id = answer["id"].as_str().unwrap().to_string();
                                transfer_ids.insert(id.clone());
                                seen.lock()
                                    .unwrap()
                                    .accepted
                                    .insert(id, (from.clone(), to.clone(), minor));
                                // Every tenth is retried once more: a replay.
                                if n % 10 != 0 || attempt > 0 {
                                    break;
                                }
                            }
                            422 => {
                                assert_eq!(
                                    answer["error"]["code"], "insufficient_funds",
                                    "{answer}"
                                );
                                break;
                            }
                            503 => {
                                assert_eq!(answer["error"]["code"], "account_moving", "{answer}");
                                seen.lock().unwrap().moving += 1;
                            }
                            other => panic!("unexpected {other}: {answer}"),
                        }
                    }
                    assert!(transfer_ids.len() <= 1, "one key made two transfers");
                }
            })
        })
        .collect()
}

async fn expect_exact_balances(app: &TestApp, ids: &[String], seen: &Seen) {
    let mut expected: HashMap<&str, i64> =
        ids.iter().map(|id| (id.as_str(), OPENING_MINOR)).collect();
    for (from, to, minor) in seen.accepted.values() {
        *expected.get_mut(from.as_str()).unwrap() -= minor;
        *expected.get_mut(to.as_str()).unwrap() += minor;
    }
    for id in ids {
        assert_eq!(app.balance_minor(id).await, expected[id.as_str()], "{id}");
    }
}

/// Every account answers from the shard the placement in force names.
async fn expect_at_home(app: &TestApp, ids: &[String], ring: Ring) {
    for id in ids {
        let (status, account) = app.get(&format!("/v1/accounts/{id}")).await;
        assert_eq!(status, 200, "{account}");
        let home = ring.shard_of(&AccountId::parse(id).unwrap()).index();
        assert_eq!(account["shard"], home, "{id}: {account}");
    }
}

async fn grow_and_shrink_under_load(app: TestApp) {
    let app = Arc::new(app);
    let ids = accounts(&app).await;
    let seen = Arc::new(Mutex::new(Seen::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = traffic(&app, &ids, &seen, &stop, 6);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;

    let grown = app.manager.reshard(5, None).await.unwrap();
    eprintln!("grown: {grown:?}");
    assert_eq!((grown.from_shards, grown.to_shards), (4, 5));
    assert_eq!(grown.accounts_scanned, ACCOUNTS as u64);
    // Jump hashing moves about 1/5 of the accounts, all onto the new shard.
    assert!(
        (0.12..=0.28).contains(&grown.moved_share),
        "moved share {}",
        grown.moved_share
    );
    assert_eq!(app.manager.ring(), Ring::new(5).unwrap());
    app.assert_audit_passes().await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;

    let shrunk = app.manager.reshard(4, None).await.unwrap();
    assert_eq!(
        shrunk.accounts_moved, grown.accounts_moved,
        "back where they came from"
    );
    assert_eq!(shrunk.version, 2);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    stop.store(true, Ordering::SeqCst);
    for task in tasks {
        task.await.unwrap();
    }

    let seen = seen.lock().unwrap();
    assert!(
        seen.accepted.len() > 200,
        "too few transfers: {}",
        seen.accepted.len()
    );
    expect_exact_balances(&app, &ids, &seen).await;
    expect_at_home(&app, &ids, Ring::new(4).unwrap()).await;
    app.assert_audit_passes().await;
    let (_, status) = app.get("/v1/admin/reshard").await;
    assert_eq!(status["shards"], 4, "{status}");
    assert_eq!(status["version"], 2, "{status}");
    assert_eq!(status["running"], false, "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_live_system_grows_by_a_shard_and_back_with_every_balance_exact() {
    grow_and_shrink_under_load(TestApp::start_with(options(ManagerConfig::default())).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_live_system_on_mysql_shards_grows_by_a_shard_and_back() {
    if mysql_server().is_none() {
        return;
    }
    let options = Options {
        mysql: true,
        ..options(ManagerConfig::default())
    };
    grow_and_shrink_under_load(TestApp::start_with(options).await).await;
}

/// Cross-shard transfers by XA two-phase commit while accounts move: a
/// branch prepared on a moving account holds the move until it is
/// decided, and every balance is exact after.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_live_system_on_mysql_shards_paying_by_xa_grows_by_a_shard_and_back() {
    if mysql_server().is_none() {
        return;
    }
    let options = Options {
        mysql: true,
        ..options(ManagerConfig {
            cross_shard: CrossShard::Xa,
            ..ManagerConfig::default()
        })
    };
    grow_and_shrink_under_load(TestApp::start_with(options).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_its_payer_moved_replays_the_first_answer() {
    let app = TestApp::start_with(options(ManagerConfig::default())).await;
    let ids = accounts(&app).await;
    let next = Ring::new(5).unwrap();
    let payer = ids
        .iter()
        .find(|id| next.shard_of(&AccountId::parse(id).unwrap()).index() == 4)
        .expect("some account moves to the new shard");
    let payee = ids.iter().find(|id| *id != payer).unwrap();
    let body = json!({"from": payer, "to": payee, "amount_minor": 1_00});
    let (status, first) = app.post("/v1/transfers", body.clone(), Some("k-1")).await;
    assert_eq!(status, 201, "{first}");

    let report = app.manager.reshard(5, None).await.unwrap();
    assert!(report.keys_copied >= 1, "{report:?}");
    let (status, again) = app.post("/v1/transfers", body.clone(), Some("k-1")).await;
    assert_eq!(status, 201, "{again}");
    assert_eq!(again["id"], first["id"], "the retry made a second transfer");
    let changed = json!({"from": payer, "to": payee, "amount_minor": 2_00});
    let (status, refused) = app.post("/v1/transfers", changed, Some("k-1")).await;
    assert_eq!(status, 422, "{refused}");
    assert_eq!(app.balance_minor(payer).await, OPENING_MINOR - 1_00);
    let (_, account) = app.get(&format!("/v1/accounts/{payer}")).await;
    assert_eq!(account["shard"], 4, "{account}");
    app.assert_audit_passes().await;
}

/// Every page of an account's statement, `limit` entries at a time.
async fn statement(app: &TestApp, id: &str, limit: u32) -> Vec<serde_json::Value> {
    let mut seen = Vec::new();
    let mut after = String::new();
    loop {
        let (status, page) = app
            .get(&format!(
                "/v1/accounts/{id}/entries?limit={limit}&after={after}"
            ))
            .await;
        assert_eq!(status, 200, "{page}");
        let entries = page["entries"].as_array().unwrap();
        assert!(entries.len() <= limit as usize, "{page}");
        seen.extend(entries.iter().cloned());
        match page["next_after"].as_str() {
            Some(next) => after = next.to_string(),
            None => return seen,
        }
    }
}

/// The entries written before a move stay on the earlier home; the
/// statement reads every home and gives the whole history in time order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_accounts_statement_holds_its_history_from_every_home() {
    let app = TestApp::start_with(options(ManagerConfig::default())).await;
    let ids = accounts(&app).await;
    let next = Ring::new(5).unwrap();
    let mover = ids
        .iter()
        .find(|id| next.shard_of(&AccountId::parse(id).unwrap()).index() == 4)
        .expect("some account moves to the new shard")
        .clone();
    let other = ids.iter().find(|id| **id != mover).unwrap().clone();
    let home = Ring::new(4)
        .unwrap()
        .shard_of(&AccountId::parse(&mover).unwrap())
        .index() as u64;
    let pay = |n: usize, minor: i64| {
        let (from, to) = if n % 2 == 0 {
            (&mover, &other)
        } else {
            (&other, &mover)
        };
        (
            json!({"from": from, "to": to, "amount_minor": minor}),
            format!("stmt-{n}"),
        )
    };
    let mut n = 0;
    for round in 0..3 {
        for _ in 0..3 {
            let (body, key) = pay(n, 1_00 + n as i64);
            let (status, answer) = app.post("/v1/transfers", body, Some(&key)).await;
            assert_eq!(status, 201, "{answer}");
            n += 1;
        }
        match round {
            0 => assert!(app.manager.reshard(5, None).await.unwrap().accounts_moved > 0),
            1 => assert!(app.manager.reshard(4, None).await.unwrap().accounts_moved > 0),
            _ => {}
        }
    }

    let whole = statement(&app, &mover, 100).await;
    let shards: Vec<u64> = whole.iter().map(|e| e["shard"].as_u64().unwrap()).collect();
    let mut homes = shards.clone();
    homes.dedup();
    assert_eq!(homes, [home, 4, home], "{whole:#?}");
    // Opening credit, 9 transfers, and each move out and in.
    assert_eq!(whole.len(), 1 + 9 + 4, "{whole:#?}");
    let sum: i64 = whole
        .iter()
        .map(|e| e["amount_minor"].as_i64().unwrap())
        .sum();
    assert_eq!(sum, app.balance_minor(&mover).await);
    let times: Vec<i64> = whole
        .iter()
        .map(|e| e["created_at_ms"].as_i64().unwrap())
        .collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
    // Pages of two give the same history, nothing missed or repeated.
    let paged = statement(&app, &mover, 2).await;
    assert_eq!(paged, whole);

    for bad in ["17", "9:1", "0:-1", "0:1,0:2"] {
        let (status, body) = app
            .get(&format!("/v1/accounts/{mover}/entries?after={bad}"))
            .await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (400, Some("invalid_query")),
            "{bad}: {body}"
        );
    }
    app.assert_audit_passes().await;
}

/// A new home's copy of an account whose old home put the move off (a
/// transfer it pays was pending there) is never listed in place of the
/// account, and `disown` drops it with its copied records and count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_left_by_a_put_off_move_is_not_listed_and_is_dropped() {
    let app = TestApp::start_with(options(ManagerConfig::default())).await;
    let ids = accounts(&app).await;
    let old = Ring::new(4).unwrap();
    let stores = app.manager.shards().to_vec();
    // Its home is not shard 0, where the copy goes: listed first by shard.
    let id = ids
        .iter()
        .map(|i| AccountId::parse(i).unwrap())
        .find(|id| old.shard_of(id).index() > 0)
        .unwrap();
    let home = old.shard_of(&id).index();
    let payee = ids.iter().find(|p| **p != id.as_str()).unwrap();
    let body = json!({"from": id.as_str(), "to": payee, "amount_minor": 1_00});
    let (status, answer) = app.post("/v1/transfers", body, Some("copy-1")).await;
    assert_eq!(status, 201, "{answer}");
    let counted = |shard: usize| {
        let app = &app;
        async move {
            let (_, shards) = app.get("/v1/shards").await;
            shards["shards"][shard]["accounts"].as_u64().unwrap()
        }
    };
    let before = counted(0).await;
    let moving = stores[home].account_to_move(&id).await.unwrap().unwrap();
    assert!(!moving.keys.is_empty());
    stores[0].adopt_account(moving).await.unwrap();
    assert_eq!(counted(0).await, before + 1);

    let (status, page) = app.get("/v1/accounts?limit=1000").await;
    assert_eq!(status, 200, "{page}");
    let listed: Vec<&serde_json::Value> = page["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["id"] == id.as_str())
        .collect();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["shard"], home as u64, "{listed:?}");
    assert_eq!(
        listed[0]["balance_minor"],
        OPENING_MINOR - 1_00,
        "{listed:?}"
    );

    stores[0].disown(&id, old.shard_of(&id)).await.unwrap();
    assert!(stores[0].account(&id).await.unwrap().is_none());
    // Where the copy was, a record points at the account's home.
    assert_eq!(
        stores[0].moved_to(&id).await.unwrap(),
        Some(old.shard_of(&id))
    );
    assert_eq!(counted(0).await, before);
    assert!(stores[0].account_to_move(&id).await.unwrap().is_none());
    // The home keeps the account and its record: the retry replays.
    let body = json!({"from": id.as_str(), "to": payee, "amount_minor": 1_00});
    let (status, again) = app.post("/v1/transfers", body, Some("copy-1")).await;
    assert_eq!((status, &again["id"]), (201, &answer["id"]), "{again}");
    assert_eq!(app.balance_minor(id.as_str()).await, OPENING_MINOR - 1_00);
    app.assert_audit_passes().await;
}

/// A writer that routes by the placement before the move (a stale
/// process) is refused by the old home; it never pays from a copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_old_home_refuses_writes_after_the_move() {
    let app = TestApp::start_with(options(ManagerConfig::default())).await;
    let ids = accounts(&app).await;
    app.manager.reshard(5, None).await.unwrap();
    let old = Ring::new(4).unwrap();
    let moved = ids
        .iter()
        .map(|id| AccountId::parse(id).unwrap())
        .find(|id| app.manager.ring().shard_of(id).index() == 4)
        .unwrap();
    let other = ids
        .iter()
        .map(|id| AccountId::parse(id).unwrap())
        .find(|id| old.shard_of(id) == old.shard_of(&moved) && *id != moved)
        .expect("another account shares the old home");
    let old_home = &app.manager.shards()[old.shard_of(&moved).index()];
    let now = now_ms();
    let stale = Transfer {
        id: TransferId::generate(),
        payer: moved.clone(),
        payee: other.clone(),
        amount: Amount::from_minor(1_00).unwrap(),
        currency: inr(),
        payer_shard: old.shard_of(&moved),
        payee_shard: old.shard_of(&moved),
        state: TransferState::Pending,
        failure_code: None,
        created_at_ms: now,
        updated_at_ms: now,
    };
    match old_home.transfer_local(&stale, None).await {
        Err(StoreError::Refused(Refusal::AccountMoved { account, shard })) => {
            assert_eq!((account, shard.index()), (moved.clone(), 4));
        }
        other => panic!("a stale write was not refused: {other:?}"),
    }
    let credit = Transfer {
        payer: other.clone(),
        payee: moved.clone(),
        ..stale
    };
    assert!(
        matches!(
            old_home.credit_from_in_flight(&credit).await,
            Err(StoreError::Refused(Refusal::AccountMoved { .. }))
        ),
        "a stale credit was not refused"
    );
    app.assert_audit_passes().await;
    assert_eq!(app.balance_minor(moved.as_str()).await, OPENING_MINOR);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modulo_placement_moves_most_accounts_for_the_same_growth() {
    let app = TestApp::start_with(options(ManagerConfig {
        strategy: Strategy::Modulo,
        ..ManagerConfig::default()
    }))
    .await;
    let ids = accounts(&app).await;
    let report = app.manager.reshard(5, None).await.unwrap();
    assert_eq!(report.strategy, "modulo");
    assert!(
        (0.7..=0.9).contains(&report.moved_share),
        "moved share {}",
        report.moved_share
    );
    expect_at_home(
        &app,
        &ids,
        Ring::with_strategy(5, Strategy::Modulo).unwrap(),
    )
    .await;
    app.assert_audit_passes().await;
}

/// The test hook of a broken switch leaves each moved account open on its
/// old home and keeps crediting it there: the audit names the check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_switch_fails_the_audit_by_name() {
    let app = TestApp::start_with(options(ManagerConfig {
        broken_switch: true,
        ..ManagerConfig::default()
    }))
    .await;
    let ids = accounts(&app).await;
    app.manager.reshard(5, None).await.unwrap();
    let moved = ids
        .iter()
        .find(|id| {
            app.manager
                .ring()
                .shard_of(&AccountId::parse(id).unwrap())
                .index()
                == 4
        })
        .unwrap();
    let payer = ids.iter().find(|id| *id != moved).unwrap();
    let body = json!({"from": payer, "to": moved, "amount_minor": 5_00});
    let (status, answer) = app.post("/v1/transfers", body, Some("b-1")).await;
    assert!(status == 201 || status == 202, "{status} {answer}");
    let audit = app.audit().await;
    assert_eq!(audit["ok"], false, "{audit}");
    let failing: Vec<&str> = audit["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["ok"] == false)
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert!(failing.contains(&"moved_accounts_closed"), "{audit}");
    // The payee's balance at its new home misses the credit.
    assert_eq!(app.balance_minor(moved).await, OPENING_MINOR);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reshard_beyond_the_open_shards_is_refused_with_the_fix() {
    let app = TestApp::start_with(options(ManagerConfig::default())).await;
    let (status, answer) = app.post("/v1/admin/reshard", json!({"to": 6}), None).await;
    assert_eq!(status, 422, "{answer}");
    assert_eq!(answer["error"]["code"], "invalid_shard_count");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--spare-shards"),
        "{answer}"
    );
    let (status, answer) = app.post("/v1/admin/reshard", json!({"to": 4}), None).await;
    assert_eq!(status, 422, "already in force: {answer}");
    let (status, answer) = app
        .post(
            "/v1/admin/reshard",
            json!({"to": 5, "strategy": "ring"}),
            None,
        )
        .await;
    assert_eq!(status, 422, "{answer}");
    let (status, answer) = app.post("/v1/admin/reshard", json!({"to": 5}), None).await;
    assert_eq!(status, 202, "{answer}");
    crate::support::eventually("the reshard finishes", || async {
        let (_, status) = app.get("/v1/admin/reshard").await;
        status["running"] == false && status["shards"] == 5
    })
    .await;
}

/// A process that starts on shards a reshard left (finished, or stopped
/// half-way) routes each account to where it lives: the placement saved on
/// shard 0, and the forwarding records of accounts already moved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_manager_routes_by_the_saved_placement_and_the_moves() {
    use shardpay_reference::ledger::ShardStore;
    use std::sync::Arc;

    let app = TestApp::start_with(options(ManagerConfig::default())).await;
    let ids = accounts(&app).await;
    let stores: Vec<Arc<dyn ShardStore>> = app.manager.shards().to_vec();

    // Half-way: one account moved by hand, as a reshard stopped after it.
    let next = Ring::new(5).unwrap();
    let old = Ring::new(4).unwrap();
    let (id, t) = half_moved(&stores, &ids).await;
    let (from, to) = (&stores[old.shard_of(&id).index()], &stores[4]);
    to.credit_from_in_flight(&t).await.unwrap();
    from.finish_move(&t.id, now_ms()).await.unwrap();
    let manager = restarted(&stores, 4).await;
    assert_eq!(manager.ring(), old, "the placement before the reshard");
    // Started again with the spare shard taken for a placed one: the
    // placement the shards keep wins.
    assert_eq!(restarted(&stores, 5).await.ring(), old);
    assert_eq!(
        manager.shard_of(&id).index(),
        4,
        "the forwarding record routes it"
    );
    let account = manager
        .account(&id)
        .await
        .unwrap()
        .expect("found at its new home");
    assert_eq!(account.balance_minor, OPENING_MINOR);

    // Finished: the saved placement is in force.
    app.manager.reshard(5, None).await.unwrap();
    let manager = restarted(&stores, 4).await;
    assert_eq!(manager.ring(), next);
    for id in &ids {
        let id = AccountId::parse(id).unwrap();
        let account = manager.account(&id).await.unwrap().expect("found");
        assert_eq!(account.shard, next.shard_of(&id), "{id}");
    }
    app.assert_audit_passes().await;
}

async fn restarted(
    stores: &[std::sync::Arc<dyn shardpay_reference::ledger::ShardStore>],
    placed: u32,
) -> shardpay_reference::manager::ShardManager {
    let manager = shardpay_reference::manager::ShardManager::new(
        stores.to_vec(),
        ManagerConfig {
            placed_shards: Some(placed),
            ..ManagerConfig::default()
        },
    )
    .unwrap();
    manager.load_placement().await.unwrap();
    manager
}

/// A second shard manager over the same shards (a replica behind the same
/// load balancer) that did not run the reshard: while the other moves
/// accounts and switches, the replica's transfers follow the moves (a
/// stale write is refused by the old home and sent on, a miss at the old
/// home follows its forwarding record, never a wrong 404), the accounts it
/// opens after the switch go where the new placement puts them, and it
/// routes by the new placement afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_that_did_not_run_the_reshard_follows_it() {
    let app = TestApp::start_with(options(ManagerConfig::default())).await;
    app.manager.load_placement().await.unwrap();
    let ids = accounts(&app).await;
    let replica = Arc::new(
        app.replica(ManagerConfig {
            placed_shards: Some(4),
            ..ManagerConfig::default()
        })
        .await,
    );
    let seen = Arc::new(Mutex::new(Seen::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = traffic(&replica, &ids, &seen, &stop, 4);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;

    let grown = app.manager.reshard(5, None).await.unwrap();
    assert!(grown.accounts_moved > 10, "{grown:?}");
    // The replica has not read the new placement yet: it finds each moved
    // account by the old home's forwarding record.
    assert_eq!(replica.manager.ring(), Ring::new(4).unwrap());
    expect_at_home(&replica, &ids, Ring::new(5).unwrap()).await;
    // Opened through the replica after the switch: at the new placement's
    // home, where the manager that ran the reshard looks.
    let late: Vec<String> = (0..40).map(|i| format!("late_{i}")).collect();
    for id in &late {
        replica.create(id, "1.00").await;
    }
    expect_at_home(&app, &late, Ring::new(5).unwrap()).await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;

    app.manager.reshard(4, None).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    stop.store(true, Ordering::SeqCst);
    for task in tasks {
        task.await.unwrap();
    }
    let seen = seen.lock().unwrap();
    assert!(
        seen.accepted.len() > 100,
        "too few transfers: {}",
        seen.accepted.len()
    );
    expect_exact_balances(&replica, &ids, &seen).await;
    expect_exact_balances(&app, &ids, &seen).await;
    expect_at_home(&replica, &ids, Ring::new(4).unwrap()).await;
    expect_at_home(&replica, &late, Ring::new(4).unwrap()).await;
    // Its recovery tick reads the placement on shard 0.
    replica.manager.refresh_placement().await.unwrap();
    assert_eq!(replica.manager.ring(), Ring::new(4).unwrap());
    assert_eq!(replica.manager.reshard_status().version, 2);
    app.assert_audit_passes().await;
}

/// Before its last pass a reshard fences account creation on every shard
/// with the placement it switches to: a process still routing by the old
/// placement that opens an account the new one puts elsewhere is refused
/// by the shard, follows to the new home and opens it there, so the last
/// pass never misses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_opened_by_a_stale_router_after_the_fence_lands_at_its_new_home() {
    let app = TestApp::start_with(options(ManagerConfig::default())).await;
    let next = Ring::new(5).unwrap();
    for store in app.manager.shards() {
        store.fence_creates(Strategy::Jump, 5).await.unwrap();
    }
    // The manager still places over 4 shards.
    assert_eq!(app.manager.ring(), Ring::new(4).unwrap());
    let ids: Vec<String> = (0..400)
        .map(|i| format!("fenced_{i}"))
        .filter(|id| next.shard_of(&AccountId::parse(id).unwrap()).index() == 4)
        .take(15)
        .collect();
    assert!(ids.len() >= 10);
    for id in &ids {
        app.create(id, "3.00").await;
    }
    expect_at_home(&app, &ids, next).await;
    // Straight to a shard the fence puts it off: refused, naming the home.
    let old = Ring::new(4).unwrap();
    let id = AccountId::parse("fenced_direct_1").unwrap();
    let id = (0..400)
        .map(|i| AccountId::parse(&format!("fenced_direct_{i}")).unwrap())
        .find(|id| next.shard_of(id) != old.shard_of(id))
        .unwrap_or(id);
    let refused = app.manager.shards()[old.shard_of(&id).index()]
        .create_account(
            shardpay_reference::ledger::NewAccount {
                id: id.clone(),
                currency: inr(),
                opening_balance: Amount::from_minor(100).unwrap(),
                created_at_ms: now_ms(),
            },
            None,
        )
        .await;
    match refused {
        Err(StoreError::Refused(Refusal::AccountMoved { shard, .. })) => {
            assert_eq!(shard, next.shard_of(&id))
        }
        other => panic!("expected a refusal naming the new home: {other:?}"),
    }
    app.assert_audit_passes().await;
}

/// An account whose balance is still in flight to its new home (a process
/// routing there before the move's credit, as after a crash mid-move) is
/// refused a debit with a retryable 503, and nothing is kept under the
/// key: once the balance lands, the same key pays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_debit_before_the_balance_arrives_waits_and_is_not_declined_for_good() {
    let app = TestApp::start_with(options(ManagerConfig::default())).await;
    let ids = accounts(&app).await;
    let old = Ring::new(4).unwrap();
    let stores = app.manager.shards().to_vec();
    let (id, t) = half_moved(&stores, &ids).await;
    let (from, to) = (&stores[old.shard_of(&id).index()], &stores[4]);
    // Routes by the forwarding record, as a process started now would.
    let replica = app
        .replica(ManagerConfig {
            placed_shards: Some(4),
            ..ManagerConfig::default()
        })
        .await;
    let payee = ids.iter().find(|p| **p != id.as_str()).unwrap();
    let body = json!({"from": id.as_str(), "to": payee, "amount_minor": 10_00});
    let (status, answer) = replica
        .post("/v1/transfers", body.clone(), Some("arriving-1"))
        .await;
    assert_eq!(status, 503, "{answer}");
    assert_eq!(answer["error"]["code"], "account_moving", "{answer}");

    to.credit_from_in_flight(&t).await.unwrap();
    from.finish_move(&t.id, now_ms()).await.unwrap();
    let (status, answer) = replica
        .post("/v1/transfers", body, Some("arriving-1"))
        .await;
    assert_eq!(status, 201, "the key kept nothing: {answer}");
    assert_eq!(
        replica.balance_minor(id.as_str()).await,
        OPENING_MINOR - 10_00
    );
    app.assert_audit_passes().await;
}

/// An account that places on shard 4 of five, moved by hand up to its
/// balance in flight: adopted by shard 4 and closed at its home of four,
/// not yet credited. Answers it and the move's pending transfer.
async fn half_moved(
    stores: &[std::sync::Arc<dyn shardpay_reference::ledger::ShardStore>],
    ids: &[String],
) -> (AccountId, Transfer) {
    use shardpay_reference::ledger::MovedOut;

    let (next, old) = (Ring::new(5).unwrap(), Ring::new(4).unwrap());
    let id = ids
        .iter()
        .map(|id| AccountId::parse(id).unwrap())
        .find(|id| next.shard_of(id).index() == 4)
        .unwrap();
    let (from, to) = (&stores[old.shard_of(&id).index()], &stores[4]);
    let moving = from.account_to_move(&id).await.unwrap().unwrap();
    to.adopt_account(moving).await.unwrap();
    let out = from
        .move_out(
            &id,
            next.shard_of(&id),
            &TransferId::generate(),
            now_ms(),
            false,
        )
        .await
        .unwrap();
    let MovedOut::Moved {
        transfer: Some(t), ..
    } = out
    else {
        panic!("the account held money: {out:?}");
    };
    (id, t)
}
