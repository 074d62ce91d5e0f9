//! The shard-storage suite: what every `ShardStore` backend must do. It
//! takes a factory so each backend runs the same checks.

use std::sync::Arc;

use shardpay_reference::ids::{AccountId, IdempotencyKey, ShardId, TransferId};
use shardpay_reference::ledger::sqlite::{SqliteConfig, SqliteShard};
use shardpay_reference::ledger::*;
use shardpay_reference::money::Amount;

use crate::support::inr;

fn account(id: &str, opening_minor: i64) -> NewAccount {
    NewAccount {
        id: AccountId::parse(id).unwrap(),
        currency: inr(),
        opening_balance: Amount::from_minor(opening_minor).unwrap(),
        created_at_ms: now_ms(),
    }
}

fn transfer(from: &str, to: &str, minor: i64, to_shard: u32) -> Transfer {
    Transfer {
        id: TransferId::generate(),
        payer: AccountId::parse(from).unwrap(),
        payee: AccountId::parse(to).unwrap(),
        amount: Amount::from_minor(minor).unwrap(),
        currency: inr(),
        payer_shard: ShardId::new(0).unwrap(),
        payee_shard: ShardId::new(to_shard).unwrap(),
        state: TransferState::Pending,
        failure_code: None,
        created_at_ms: now_ms(),
        updated_at_ms: now_ms(),
    }
}

async fn balance(store: &dyn ShardStore, id: &str) -> i64 {
    store
        .account(&AccountId::parse(id).unwrap())
        .await
        .unwrap()
        .unwrap()
        .balance_minor
}

/// Entries sum to zero, balances match their entries and none is below
/// zero, every transfer and credit has exactly its entries, none is orphaned
/// (the audit's rules, `shardpay_reference::audit::shard_problems`).
fn assert_clean(audit: &ShardAudit) {
    let problems = shardpay_reference::audit::shard_problems(audit);
    assert!(problems.is_empty(), "{problems:?} in {audit:?}");
    assert_eq!(audit.orphan_entries, 0);
}

/// The suite. `payer_store` is shard 0, `payee_store` shard 1.
pub async fn storage_suite(payer_store: Arc<dyn ShardStore>, payee_store: Arc<dyn ShardStore>) {
    let (a, b) = (payer_store.as_ref(), payee_store.as_ref());
    a.create_account(account("p", 100_00), None).await.unwrap();
    a.create_account(account("q", 0), None).await.unwrap();
    b.create_account(account("r", 5), None).await.unwrap();
    let dup = a.create_account(account("p", 1), None).await.unwrap_err();
    assert!(
        matches!(dup, StoreError::Refused(Refusal::AccountExists(_))),
        "{dup:?}"
    );

    // Same shard, with an idempotency record kept in the same transaction.
    let key = IdempotencyKey::parse("k1").unwrap();
    let idem = IdempotencyWrite {
        scope: AccountId::parse("p").unwrap(),
        key: key.clone(),
        fingerprint: "f1".into(),
        expires_at_ms: now_ms() + 60_000,
        response: Some(StoredResponse {
            status: 201,
            body: "{}".into(),
        }),
    };
    let local = transfer("p", "q", 10_00, 0);
    let done = a.transfer_local(&local, Some(idem.clone())).await.unwrap();
    assert!(matches!(done, DebitOutcome::Applied(ref t) if t.state == TransferState::Completed));
    let again = a
        .transfer_local(&transfer("p", "q", 10_00, 0), Some(idem))
        .await
        .unwrap_err();
    assert!(matches!(again, StoreError::IdempotencyKeyExists(ref r) if r.fingerprint == "f1"));
    assert_eq!(
        (balance(a, "p").await, balance(a, "q").await),
        (90_00, 10_00)
    );
    let record = a
        .idempotency_record(&AccountId::parse("p").unwrap(), &key, now_ms())
        .await
        .unwrap();
    assert_eq!(
        record.unwrap().resource_id.as_deref(),
        Some(local.id.as_str())
    );

    // The pre-write lookup: payer, same-shard payee and the key's record in
    // one visit; what it does not find, or was not asked for, is None.
    let looked = a
        .lookup(Lookup {
            payer: AccountId::parse("p").unwrap(),
            payee: Some(AccountId::parse("q").unwrap()),
            key: Some((key.clone(), now_ms())),
        })
        .await
        .unwrap();
    assert_eq!(looked.payer.map(|p| p.balance_minor), Some(90_00));
    assert_eq!(looked.payee.map(|q| q.balance_minor), Some(10_00));
    assert_eq!(
        looked.record.and_then(|r| r.resource_id),
        Some(local.id.as_str().to_string())
    );
    let looked = a
        .lookup(Lookup {
            payer: AccountId::parse("q").unwrap(),
            payee: None,
            key: Some((IdempotencyKey::parse("never-used").unwrap(), now_ms())),
        })
        .await
        .unwrap();
    assert_eq!(looked.payer.map(|q| q.balance_minor), Some(10_00));
    assert!(looked.payee.is_none() && looked.record.is_none());
    let missing = a
        .lookup(Lookup {
            payer: AccountId::parse("nobody").unwrap(),
            payee: Some(AccountId::parse("r").unwrap()),
            key: Some((key.clone(), now_ms())),
        })
        .await
        .unwrap();
    assert!(
        missing.payer.is_none() && missing.payee.is_none() && missing.record.is_none(),
        "'nobody' has no account and no key of its own (k1 is p's); r lives on the other shard: {missing:?}"
    );

    // Overdraft refused, nothing written.
    let over = a
        .transfer_local(&transfer("q", "p", 10_01, 0), None)
        .await
        .unwrap();
    assert!(matches!(
        over,
        DebitOutcome::Declined(Refusal::InsufficientFunds(_))
    ));
    assert_eq!(balance(a, "q").await, 10_00);

    // Cross-shard: debit into flight, credit twice (once applied), complete.
    let cross = transfer("p", "r", 25_00, 1);
    let DebitOutcome::Applied(pending) = a.debit_to_in_flight(&cross, None).await.unwrap() else {
        panic!("debit declined")
    };
    assert_eq!(pending.state, TransferState::Pending);
    assert_eq!(
        a.pending_transfers(now_ms() + 1, 10).await.unwrap().len(),
        1
    );
    assert_eq!(
        b.credit_from_in_flight(&cross).await.unwrap(),
        CreditOutcome::Credited
    );
    assert_eq!(
        b.credit_from_in_flight(&cross).await.unwrap(),
        CreditOutcome::Credited
    );
    assert_eq!(balance(b, "r").await, 25_05);
    let completed = a.complete_transfer(&cross.id, now_ms()).await.unwrap();
    assert_eq!(completed.state, TransferState::Completed);
    assert!(a
        .pending_transfers(now_ms() + 1, 10)
        .await
        .unwrap()
        .is_empty());

    // Cross-shard to a payee that is not there: refused, then reversed.
    let lost = transfer("p", "nobody", 1_00, 1);
    a.debit_to_in_flight(&lost, None).await.unwrap();
    let refused = b.credit_from_in_flight(&lost).await.unwrap();
    assert_eq!(
        refused,
        CreditOutcome::Refused {
            code: "account_not_found".into()
        }
    );
    let failed = a
        .reverse_transfer(&lost.id, "account_not_found", now_ms())
        .await
        .unwrap();
    assert_eq!(failed.state, TransferState::Failed);
    let twice = a
        .reverse_transfer(&lost.id, "account_not_found", now_ms())
        .await
        .unwrap();
    assert_eq!(twice.state, TransferState::Failed);
    assert_eq!(balance(a, "p").await, 90_00 - 25_00);

    let (sa, sb) = (a.audit().await.unwrap(), b.audit().await.unwrap());
    assert_clean(&sa);
    assert_clean(&sb);
    let completed: Vec<i64> = sa
        .transfers
        .iter()
        .filter(|t| t.state == TransferState::Completed && t.cross_shard)
        .map(|t| t.amount_minor)
        .collect();
    assert_eq!(completed, [25_00]);
    let credited: Vec<i64> = sb
        .credits
        .iter()
        .filter(|c| c.credited)
        .map(|c| c.amount_minor)
        .collect();
    assert_eq!(credited, [25_00]);
    let stats = a.stats().await.unwrap();
    assert_eq!(
        (
            stats.accounts,
            stats.transfers_completed,
            stats.transfers_failed
        ),
        (2, 2, 1)
    );
    let listed = a.list_accounts(None, 10).await.unwrap();
    assert_eq!(
        listed.iter().map(|x| x.id.as_str()).collect::<Vec<_>>(),
        ["p", "q"]
    );
    assert_eq!(
        a.purge_expired_idempotency(now_ms() + 120_000, 10)
            .await
            .unwrap(),
        1
    );

    // The outbox as a log: every row, published or not, in order, by page.
    let (rows, unpublished) = a.outbox_counts().await.unwrap();
    assert!(rows >= 4 && unpublished == rows, "{rows} {unpublished}");
    let all = a.outbox_page(0, 1_000).await.unwrap();
    assert_eq!(all.len() as u64, rows);
    assert!(all.windows(2).all(|w| w[0].seq < w[1].seq));
    a.mark_published(&[all[0].seq], now_ms()).await.unwrap();
    let mut paged = Vec::new();
    let mut after = 0;
    loop {
        let page = a.outbox_page(after, 2).await.unwrap();
        let Some(last) = page.last() else { break };
        after = last.seq;
        paged.extend(page);
    }
    assert_eq!(
        paged, all,
        "pages of 2 give the same log, the published row too"
    );

    counters_match_the_tables(a).await;
    counters_match_the_tables(b).await;
    outbox_positions_and_pruning(a).await;

    // A statement: the account's entries in order, adding up to its balance.
    let entries = a
        .account_entries(&AccountId::parse("p").unwrap(), 0, 100)
        .await
        .unwrap();
    assert!(entries.len() >= 3, "{entries:?}");
    assert!(entries.windows(2).all(|w| w[0].id < w[1].id));
    assert_eq!(
        entries.iter().map(|e| e.amount_minor).sum::<i64>(),
        balance(a, "p").await
    );
    let rest = a
        .account_entries(&AccountId::parse("p").unwrap(), entries[0].id, 100)
        .await
        .unwrap();
    assert_eq!(rest, entries[1..]);
}

/// The counters `stats` reads equal what a full read of the shard (the
/// audit's) counts: transfers by state, customer accounts, and customer
/// balances per currency.
async fn counters_match_the_tables(store: &dyn ShardStore) {
    let stats = store.stats().await.unwrap();
    let audit = store.audit().await.unwrap();
    let state_count = |state| audit.transfers.iter().filter(|t| t.state == state).count() as u64;
    assert_eq!(
        (
            stats.transfers_pending,
            stats.transfers_completed,
            stats.transfers_failed
        ),
        (
            state_count(TransferState::Pending),
            state_count(TransferState::Completed),
            state_count(TransferState::Failed)
        ),
        "shard {}",
        store.shard()
    );
    let accounts = store.list_accounts(None, 1_000).await.unwrap();
    assert_eq!(stats.accounts, accounts.len() as u64);
    let customers: Vec<(shardpay_reference::money::Currency, i128)> = audit
        .totals
        .iter()
        .filter(|(kind, _, _)| *kind == AccountKind::User)
        .map(|(_, currency, total)| (*currency, *total))
        .collect();
    assert_eq!(stats.balance_minor_by_currency, customers);
    assert_eq!(
        customers[0].1,
        accounts
            .iter()
            .map(|a| i128::from(a.balance_minor))
            .sum::<i128>()
    );
}

/// Unpublished rows are staged with gap-free positions in id order; a
/// consumer's tail is the rows after its position; rows are pruned only
/// once published before the retention and covered by every consumer's
/// snapshot, and the counters still count them.
async fn outbox_positions_and_pruning(a: &dyn ShardStore) {
    let (rows, backlog) = a.outbox_counts().await.unwrap();
    assert_eq!(backlog, rows - 1, "one row was marked published");
    assert_eq!(a.stage_outbox(1_000).await.unwrap(), backlog);
    assert_eq!(a.stage_outbox(1_000).await.unwrap(), 0, "staged once");
    let unpublished = a.unpublished_events(1_000).await.unwrap();
    let positions: Vec<i64> = unpublished.iter().map(|e| e.position.unwrap()).collect();
    assert_eq!(positions, (1..=backlog as i64).collect::<Vec<_>>());
    let tail = a.outbox_tail(1, 1_000).await.unwrap();
    assert_eq!(tail, unpublished[1..]);
    let seqs: Vec<i64> = unpublished.iter().map(|e| e.seq).collect();
    let published_at = now_ms() - 10_000;
    a.mark_published(&seqs, published_at).await.unwrap();
    assert_eq!(a.outbox_counts().await.unwrap(), (rows, 0));
    // No consumer snapshot yet: nothing may go.
    assert_eq!(a.prune_outbox(now_ms(), 1_000).await.unwrap(), 0);
    a.save_consumer_snapshot("analytics", 1, "{}".into())
        .await
        .unwrap();
    a.save_consumer_snapshot("analytics", 2, "{\"n\":2}".into())
        .await
        .unwrap();
    assert_eq!(
        a.consumer_snapshot("analytics").await.unwrap(),
        Some((2, "{\"n\":2}".to_string()))
    );
    // Another analytics replica, behind this one, saves an older snapshot:
    // the newer stays (rows it covers may be pruned already).
    a.save_consumer_snapshot("analytics", 1, "{\"n\":1}".into())
        .await
        .unwrap();
    assert_eq!(
        a.consumer_snapshot("analytics").await.unwrap(),
        Some((2, "{\"n\":2}".to_string()))
    );
    // Published 10 s ago: kept by a 20 s retention, pruned by a shorter one,
    // and only what the snapshot covers.
    assert_eq!(
        a.prune_outbox(published_at - 10_000, 1_000).await.unwrap(),
        0
    );
    assert_eq!(a.prune_outbox(now_ms(), 1_000).await.unwrap(), 2);
    assert_eq!(a.prune_outbox(now_ms(), 1_000).await.unwrap(), 0);
    let left = a.outbox_tail(0, 1_000).await.unwrap();
    assert_eq!(left, unpublished[2..]);
    assert_eq!(a.outbox_counts().await.unwrap(), (rows, 0));
    // A second consumer that covers less holds rows back for itself.
    a.save_consumer_snapshot("other", 2, "{}".into())
        .await
        .unwrap();
    a.save_consumer_snapshot("analytics", backlog as i64, "{}".into())
        .await
        .unwrap();
    assert_eq!(a.prune_outbox(now_ms(), 1_000).await.unwrap(), 0);
    a.save_consumer_snapshot("other", backlog as i64, "{}".into())
        .await
        .unwrap();
    // At most `limit` rows a call.
    assert_eq!(a.prune_outbox(now_ms(), 1).await.unwrap(), 1);
    assert_eq!(a.prune_outbox(now_ms(), 1_000).await.unwrap(), backlog - 3);
    assert!(a.outbox_tail(0, 1_000).await.unwrap().is_empty());
}

#[tokio::test]
async fn sqlite_backend_passes_the_storage_suite() {
    let dir = tempfile::tempdir().unwrap();
    let config = SqliteConfig::default();
    let open = |i| {
        Arc::new(SqliteShard::open(dir.path(), ShardId::new(i).unwrap(), &config).unwrap())
            as Arc<dyn ShardStore>
    };
    storage_suite(open(0), open(1)).await;
}

#[tokio::test]
async fn mysql_backend_passes_the_storage_suite() {
    let Some(server) = crate::support::mysql_server() else {
        return;
    };
    let mut stores = crate::support::mysql_stores(&server, 2).await;
    let payee = stores.pop().unwrap();
    let payer = stores.pop().unwrap();
    storage_suite(payer, payee).await;
}

#[tokio::test]
async fn a_mysql_database_cannot_be_opened_as_another_shard() {
    use shardpay_reference::ledger::mysql::{MysqlConfig, MysqlShard};
    use sqlx::Connection;
    let Some(server) = crate::support::mysql_server() else {
        return;
    };
    let db = format!("t{}_id", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let mut admin = sqlx::MySqlConnection::connect(&server).await.unwrap();
    sqlx::query(&format!("CREATE DATABASE {db}"))
        .execute(&mut admin)
        .await
        .unwrap();
    let url = format!("{server}/{db}");
    let config = MysqlConfig::default();
    let shard = |i| ShardId::new(i).unwrap();
    // A new database becomes shard 1 of 2; it opens as that again, and as
    // nothing else.
    MysqlShard::connect(&url, shard(1), 2, &config)
        .await
        .unwrap();
    MysqlShard::connect(&url, shard(1), 2, &config)
        .await
        .unwrap();
    let wrong = MysqlShard::connect(&url, shard(0), 2, &config)
        .await
        .err()
        .expect("opened as another shard");
    assert!(wrong.to_string().contains("holds shard 1 of 2"), "{wrong}");
    assert!(MysqlShard::connect(&url, shard(1), 4, &config)
        .await
        .is_err());
}

#[tokio::test]
async fn sqlite_shard_files_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let shard = ShardId::new(0).unwrap();
    {
        let store = SqliteShard::open(dir.path(), shard, &SqliteConfig::default()).unwrap();
        store
            .create_account(account("kept", 7_00), None)
            .await
            .unwrap();
    }
    let store = SqliteShard::open(dir.path(), shard, &SqliteConfig::default()).unwrap();
    assert_eq!(balance(&store, "kept").await, 7_00);
    assert_clean(&store.audit().await.unwrap());
}

/// A request dropped mid-transaction (a client that hangs up, a timeout)
/// must leave nothing open: cancels each transfer after a growing delay,
/// so some land before, inside and after the transaction; then the same
/// accounts must still move money at once (no lock left held, no pooled
/// connection inside an old transaction), and the shard must audit clean
/// with every unit of money accounted for.
async fn cancelled_transfers_leave_nothing_open(store: &dyn ShardStore) {
    store
        .create_account(account("cx_a", 100_000), None)
        .await
        .unwrap();
    store
        .create_account(account("cx_b", 0), None)
        .await
        .unwrap();
    let mut finished = 0;
    for i in 0..300u64 {
        let (from, to) = if i % 2 == 0 {
            ("cx_a", "cx_b")
        } else {
            ("cx_b", "cx_a")
        };
        let t = transfer(from, to, 1, 0);
        let delay = std::time::Duration::from_micros((i % 100) * 10);
        if let Ok(outcome) = tokio::time::timeout(delay, store.transfer_local(&t, None)).await {
            outcome.unwrap();
            finished += 1;
        }
    }
    // Every later transfer on the same rows goes through, promptly: a
    // lock left by a cancelled transaction would hold it for the lock-wait
    // timeout and answer unavailable.
    for _ in 0..20 {
        let started = std::time::Instant::now();
        let t = transfer("cx_a", "cx_b", 1, 0);
        let outcome = store.transfer_local(&t, None).await.unwrap();
        assert!(matches!(outcome, DebitOutcome::Applied(_)), "{outcome:?}");
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
    }
    let (a, b) = (balance(store, "cx_a").await, balance(store, "cx_b").await);
    assert_eq!(
        a + b,
        100_000,
        "money created or lost by cancelled transfers"
    );
    assert_clean(&store.audit().await.unwrap());
    eprintln!("{finished} of 300 cancelled-or-not transfers finished before their deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_transfers_cancelled_mid_flight_leave_nothing_open() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteShard::open(
        dir.path(),
        ShardId::new(0).unwrap(),
        &SqliteConfig::default(),
    )
    .unwrap();
    cancelled_transfers_leave_nothing_open(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_transfers_cancelled_mid_transaction_leave_nothing_open() {
    use shardpay_reference::ledger::mysql::{MysqlConfig, MysqlShard};
    use sqlx::Connection;
    let Some(server) = crate::support::mysql_server() else {
        return;
    };
    let db = format!("t{}_cx", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let mut admin = sqlx::MySqlConnection::connect(&server).await.unwrap();
    sqlx::query(&format!("CREATE DATABASE {db}"))
        .execute(&mut admin)
        .await
        .unwrap();
    // A small pool, so a connection pooled inside an old transaction
    // would be handed out again soon.
    let config = MysqlConfig {
        pool_size: 2,
        ..MysqlConfig::default()
    };
    let store = MysqlShard::connect(
        &format!("{server}/{db}"),
        ShardId::new(0).unwrap(),
        1,
        &config,
    )
    .await
    .unwrap();
    cancelled_transfers_leave_nothing_open(&store).await;
}

/// Every table of the database at `url`, as `SHOW CREATE TABLE` gives it
/// (AUTO_INCREMENT counters left out), and its schema version.
async fn mysql_schema(url: &str) -> (Vec<String>, i64) {
    use sqlx::{Connection, Row};
    let mut conn = sqlx::MySqlConnection::connect(url).await.unwrap();
    let tables: Vec<String> = sqlx::query_scalar("SHOW TABLES")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    let mut shown = Vec::new();
    for table in tables {
        if table == "schema_migration_steps" {
            continue;
        }
        let row = sqlx::query(&format!("SHOW CREATE TABLE `{table}`"))
            .fetch_one(&mut conn)
            .await
            .unwrap();
        let create: String = row.get(1);
        let create = create
            .split(' ')
            .filter(|word| !word.starts_with("AUTO_INCREMENT="))
            .collect::<Vec<_>>()
            .join(" ");
        shown.push(create);
    }
    let version: i64 = sqlx::query_scalar("SELECT MAX(version) FROM schema_migrations")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    (shown, version)
}

/// A shard database whose migration was killed after any one statement
/// (run, not yet recorded) is brought up to date by the next start, to the
/// same schema as an unbroken migration, with its data steps applied once.
#[tokio::test]
async fn a_mysql_migration_killed_after_any_statement_resumes_on_the_next_start() {
    use shardpay_reference::ledger::mysql::{migrate, migrate_interrupted, Interrupt, MIGRATIONS};
    use sqlx::Connection;
    let Some(server) = crate::support::mysql_server() else {
        return;
    };
    let prefix = format!("t{}_m", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let mut admin = sqlx::MySqlConnection::connect(&server).await.unwrap();
    let fresh = |name: String| {
        let server = server.clone();
        async move {
            let mut admin = sqlx::MySqlConnection::connect(&server).await.unwrap();
            sqlx::query(&format!("CREATE DATABASE {name}"))
                .execute(&mut admin)
                .await
                .unwrap();
            let url = format!("{server}/{name}");
            let pool = sqlx::mysql::MySqlPoolOptions::new()
                .max_connections(1)
                .connect(&url)
                .await
                .unwrap();
            (url, pool)
        }
    };
    let (clean_url, clean) = fresh(format!("{prefix}_clean")).await;
    migrate(&clean).await.unwrap();
    let expected = mysql_schema(&clean_url).await;
    assert_eq!(expected.1, MIGRATIONS.len() as i64);
    let mut cases = 0;
    for (v, statements) in MIGRATIONS.iter().enumerate() {
        for step in 0..statements.len() {
            let name = format!("{prefix}_{}_{step}", v + 1);
            let (url, pool) = fresh(name.clone()).await;
            let at = Interrupt {
                version: v + 1,
                step,
            };
            migrate_interrupted(&pool, at).await.unwrap();
            let stopped: Option<i64> =
                sqlx::query_scalar("SELECT MAX(version) FROM schema_migrations")
                    .fetch_one(&pool)
                    .await
                    .unwrap();
            assert_eq!(stopped.unwrap_or(0), v as i64, "{at:?}");
            migrate(&pool)
                .await
                .unwrap_or_else(|e| panic!("resume after {at:?}: {e}"));
            assert_eq!(mysql_schema(&url).await, expected, "{at:?}");
            // The counter rows are written once (slot 0 from the tables,
            // then one per slot).
            let slots: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM shard_counters")
                .fetch_one(&pool)
                .await
                .unwrap();
            assert_eq!(slots, 16, "{at:?}");
            pool.close().await;
            sqlx::query(&format!("DROP DATABASE {name}"))
                .execute(&mut admin)
                .await
                .unwrap();
            cases += 1;
        }
    }
    assert!(cases >= 20, "{cases}");
    clean.close().await;
    sqlx::query(&format!("DROP DATABASE {prefix}_clean"))
        .execute(&mut admin)
        .await
        .unwrap();
}
