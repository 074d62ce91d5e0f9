//! The raw-database baseline: the transfer transactions the reference
//! system runs, sent straight to the shards with no HTTP and no services in
//! between, at a given concurrency. Its TPS is the ceiling the services'
//! TPS is measured against.
//!
//! On SQLite (`run_sqlite`), each shard is a fresh file with the system's
//! own schema, written by the system's own writer thread with its group
//! commit (`SqliteShard::open_writer`): the same connection settings and
//! durability, raw SQL instead of the ledger's functions.
//!
//! On MySQL (`run`), each shard URL's database gets a sibling `<database>_baseline` holding
//! accounts, transfers, credits, entries and outbox tables of the same
//! shape; it is dropped and created afresh on every run.
//! - same-shard: one transaction locking both accounts in id order, two
//!   balance updates, two entries, the transfer row and an outbox row;
//! - cross-shard: the saga's three transactions: debit into in-flight on
//!   the payer's shard, credit from in-flight on the payee's, completion on
//!   the payer's;
//! - cross-shard XA: the same writes as two XA branches, each on its own
//!   connection, prepared in shard order, the decision written to the
//!   payer's shard, then both committed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng};
use sqlx::mysql::MySqlPoolOptions;
use sqlx::{Connection, MySqlPool};

use shardpay_reference::ids::ShardId;
use shardpay_reference::ledger::sqlite::{SqliteConfig, SqliteShard, Writer};
use shardpay_reference::ledger::StoreError;
use shardpay_reference::money::Currency;

use crate::record::new_histogram;
use crate::report::Hist;
pub use crate::report::{BaselineKind, BaselineResult};

/// Accounts per shard in the baseline tables: enough that random pairs
/// rarely collide, as in the scenarios.
pub const ACCOUNTS_PER_SHARD: u32 = 10_000;

const SCHEMA: &[&str] = &[
    "CREATE TABLE accounts (id VARCHAR(64) NOT NULL PRIMARY KEY, balance_minor BIGINT NOT NULL) ENGINE=InnoDB",
    "CREATE TABLE transfers (id VARCHAR(64) NOT NULL PRIMARY KEY, payer VARCHAR(64) NOT NULL, payee VARCHAR(64) NOT NULL, amount_minor BIGINT NOT NULL, state VARCHAR(16) NOT NULL, created_at_ms BIGINT NOT NULL, updated_at_ms BIGINT NOT NULL) ENGINE=InnoDB",
    "CREATE TABLE inbound_credits (transfer_id VARCHAR(64) NOT NULL PRIMARY KEY, payee VARCHAR(64) NOT NULL, amount_minor BIGINT NOT NULL, created_at_ms BIGINT NOT NULL) ENGINE=InnoDB",
    "CREATE TABLE ledger_entries (id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY, transfer_id VARCHAR(64) NOT NULL, account_id VARCHAR(64) NOT NULL, amount_minor BIGINT NOT NULL, KEY (transfer_id)) ENGINE=InnoDB",
    "CREATE TABLE outbox (id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY, event_id CHAR(32) NOT NULL UNIQUE, payload TEXT NOT NULL) ENGINE=InnoDB",
    "CREATE TABLE xa_decisions (gtrid VARCHAR(64) NOT NULL PRIMARY KEY, decision VARCHAR(8) NOT NULL, created_at_ms BIGINT NOT NULL) ENGINE=InnoDB",
];

/// formatID of the baseline's XA branches ("BL"), apart from the reference
/// system's, so its recovery never touches them.
const XA_FORMAT_ID: u32 = 0x424C;

fn split(url: &str) -> anyhow::Result<(&str, &str)> {
    url.rsplit_once('/')
        .filter(|(server, db)| server.contains("://") && !server.ends_with('/') && !db.is_empty())
        .with_context(|| {
            format!(
                "{} names no database",
                shardpay_reference::ledger::mysql::redact(url)
            )
        })
}

/// Creates the baseline database next to each shard's, with its accounts.
async fn prepare(urls: &[String], pool_size: u32) -> anyhow::Result<Vec<MySqlPool>> {
    let mut pools = Vec::new();
    for url in urls {
        let (server, db) = split(url)?;
        let name = format!("{db}_baseline");
        let mut admin = sqlx::MySqlConnection::connect(server).await?;
        sqlx::query(&format!("DROP DATABASE IF EXISTS {name}"))
            .execute(&mut admin)
            .await?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await?;
        let pool = MySqlPoolOptions::new()
            .max_connections(pool_size.max(1))
            .after_connect(|conn, _| {
                Box::pin(async move {
                    sqlx::query("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
                        .execute(conn)
                        .await?;
                    Ok(())
                })
            })
            .connect(&format!("{server}/{name}"))
            .await?;
        for sql in SCHEMA {
            sqlx::query(sql).execute(&pool).await?;
        }
        // Accounts in batches of 1,000 rows, plus the in-flight account.
        for start in (0..ACCOUNTS_PER_SHARD).step_by(1000) {
            let values: Vec<String> = (start..(start + 1000).min(ACCOUNTS_PER_SHARD))
                .map(|i| format!("('a{i}', 1000000000)"))
                .collect();
            sqlx::query(&format!(
                "INSERT INTO accounts (id, balance_minor) VALUES {}",
                values.join(",")
            ))
            .execute(&pool)
            .await?;
        }
        sqlx::query("INSERT INTO accounts (id, balance_minor) VALUES ('~in_flight', 0)")
            .execute(&pool)
            .await?;
        pools.push(pool);
    }
    Ok(pools)
}

fn now_ms() -> i64 {
    shardpay_reference::ledger::now_ms()
}

async fn same_shard(
    pool: &MySqlPool,
    payer: u32,
    payee: u32,
    amount: i64,
) -> Result<(), sqlx::Error> {
    let id = uuid_like();
    let (a, b) = (format!("a{payer}"), format!("a{payee}"));
    let mut tx = pool.begin().await?;
    let (first, second) = if a <= b { (&a, &b) } else { (&b, &a) };
    for account in [first, second] {
        sqlx::query("SELECT balance_minor FROM accounts WHERE id = ? FOR UPDATE")
            .bind(account)
            .fetch_one(&mut *tx)
            .await?;
    }
    post(&mut tx, &id, [(a.as_str(), -amount), (b.as_str(), amount)]).await?;
    let now = now_ms();
    sqlx::query("INSERT INTO transfers (id, payer, payee, amount_minor, state, created_at_ms, updated_at_ms) VALUES (?, ?, ?, ?, 'completed', ?, ?)")
        .bind(&id).bind(&a).bind(&b).bind(amount).bind(now).bind(now)
        .execute(&mut *tx).await?;
    outbox(&mut tx, &id).await?;
    tx.commit().await
}

async fn cross_shard(
    payer_pool: &MySqlPool,
    payee_pool: &MySqlPool,
    payer: u32,
    payee: u32,
    amount: i64,
) -> Result<(), sqlx::Error> {
    let id = uuid_like();
    let (a, b) = (format!("a{payer}"), format!("a{payee}"));
    let now = now_ms();
    // (a) debit into in-flight.
    let mut tx = payer_pool.begin().await?;
    sqlx::query("SELECT balance_minor FROM accounts WHERE id = ? FOR UPDATE")
        .bind(&a)
        .fetch_one(&mut *tx)
        .await?;
    post(
        &mut tx,
        &id,
        [(a.as_str(), -amount), ("~in_flight", amount)],
    )
    .await?;
    sqlx::query("INSERT INTO transfers (id, payer, payee, amount_minor, state, created_at_ms, updated_at_ms) VALUES (?, ?, ?, ?, 'pending', ?, ?)")
        .bind(&id).bind(&a).bind(&b).bind(amount).bind(now).bind(now)
        .execute(&mut *tx).await?;
    outbox(&mut tx, &id).await?;
    tx.commit().await?;
    // (b) credit from in-flight.
    let mut tx = payee_pool.begin().await?;
    sqlx::query("SELECT balance_minor FROM accounts WHERE id = ? FOR UPDATE")
        .bind(&b)
        .fetch_one(&mut *tx)
        .await?;
    sqlx::query("INSERT INTO inbound_credits (transfer_id, payee, amount_minor, created_at_ms) VALUES (?, ?, ?, ?)")
        .bind(&id).bind(&b).bind(amount).bind(now)
        .execute(&mut *tx).await?;
    post(
        &mut tx,
        &id,
        [("~in_flight", -amount), (b.as_str(), amount)],
    )
    .await?;
    tx.commit().await?;
    // (c) complete.
    sqlx::query("UPDATE transfers SET state = 'completed', updated_at_ms = ? WHERE id = ?")
        .bind(now_ms())
        .bind(&id)
        .execute(payer_pool)
        .await?;
    Ok(())
}

/// The payer's XA branch: lock, debit into in-flight, the transfer row
/// (completed) and its outbox row; ended and prepared.
async fn xa_debit(
    conn: &mut sqlx::MySqlConnection,
    xid: &str,
    (id, a, b): (&str, &str, &str),
    amount: i64,
    now: i64,
) -> Result<(), sqlx::Error> {
    use sqlx::Executor;
    conn.execute(&*format!("XA START {xid}")).await?;
    sqlx::query("SELECT balance_minor FROM accounts WHERE id = ? FOR UPDATE")
        .bind(a)
        .fetch_one(&mut *conn)
        .await?;
    post(conn, id, [(a, -amount), ("~in_flight", amount)]).await?;
    sqlx::query("INSERT INTO transfers (id, payer, payee, amount_minor, state, created_at_ms, updated_at_ms) VALUES (?, ?, ?, ?, 'completed', ?, ?)")
        .bind(id).bind(a).bind(b).bind(amount).bind(now).bind(now)
        .execute(&mut *conn).await?;
    outbox(conn, id).await?;
    conn.execute(&*format!("XA END {xid}")).await?;
    conn.execute(&*format!("XA PREPARE {xid}")).await?;
    Ok(())
}

/// The payee's XA branch: lock, the credit row, credit from in-flight;
/// ended and prepared.
async fn xa_credit(
    conn: &mut sqlx::MySqlConnection,
    xid: &str,
    (id, b): (&str, &str),
    amount: i64,
    now: i64,
) -> Result<(), sqlx::Error> {
    use sqlx::Executor;
    conn.execute(&*format!("XA START {xid}")).await?;
    sqlx::query("SELECT balance_minor FROM accounts WHERE id = ? FOR UPDATE")
        .bind(b)
        .fetch_one(&mut *conn)
        .await?;
    sqlx::query("INSERT INTO inbound_credits (transfer_id, payee, amount_minor, created_at_ms) VALUES (?, ?, ?, ?)")
        .bind(id).bind(b).bind(amount).bind(now)
        .execute(&mut *conn).await?;
    post(conn, id, [("~in_flight", -amount), (b, amount)]).await?;
    conn.execute(&*format!("XA END {xid}")).await?;
    conn.execute(&*format!("XA PREPARE {xid}")).await?;
    Ok(())
}

/// Rolls a branch back, open or prepared; if that fails the connection is
/// closed rather than pooled with a branch attached.
async fn xa_abandon(conn: &mut sqlx::pool::PoolConnection<sqlx::MySql>, xid: &str) {
    use sqlx::Executor;
    let _ = (&mut **conn).execute(&*format!("XA END {xid}")).await;
    if (&mut **conn)
        .execute(&*format!("XA ROLLBACK {xid}"))
        .await
        .is_err()
    {
        conn.close_on_drop();
    }
}

async fn cross_shard_xa(
    pools: (&MySqlPool, &MySqlPool),
    shards: (usize, usize),
    payer: u32,
    payee: u32,
    amount: i64,
) -> Result<(), sqlx::Error> {
    use sqlx::Executor;
    let id = uuid_like();
    let (a, b) = (format!("a{payer}"), format!("a{payee}"));
    let now = now_ms();
    let xid = |shard: usize| format!("'bl{id}','s{shard}',{XA_FORMAT_ID}");
    let (dx, cx) = (xid(shards.0), xid(shards.1));
    let mut debit = pools.0.acquire().await?;
    let mut credit = pools.1.acquire().await?;
    // In shard order, as the reference system opens them.
    let prepared = if shards.0 < shards.1 {
        match xa_debit(&mut debit, &dx, (&id, &a, &b), amount, now).await {
            Err(e) => Err((e, false)),
            Ok(()) => xa_credit(&mut credit, &cx, (&id, &b), amount, now)
                .await
                .map_err(|e| (e, true)),
        }
    } else {
        match xa_credit(&mut credit, &cx, (&id, &b), amount, now).await {
            Err(e) => Err((e, false)),
            Ok(()) => xa_debit(&mut debit, &dx, (&id, &a, &b), amount, now)
                .await
                .map_err(|e| (e, true)),
        }
    };
    let decided = match prepared {
        Ok(()) => sqlx::query(
            "INSERT INTO xa_decisions (gtrid, decision, created_at_ms) VALUES (?, 'commit', ?)",
        )
        .bind(format!("bl{id}"))
        .bind(now)
        .execute(pools.0)
        .await
        .map(|_| ()),
        Err((e, _)) => Err(e),
    };
    if let Err(e) = decided {
        xa_abandon(&mut debit, &dx).await;
        xa_abandon(&mut credit, &cx).await;
        return Err(e);
    }
    let (commit_debit, commit_credit) = (format!("XA COMMIT {dx}"), format!("XA COMMIT {cx}"));
    let (d, c) = tokio::join!(
        (&mut *debit).execute(commit_debit.as_str()),
        (&mut *credit).execute(commit_credit.as_str())
    );
    for (result, conn) in [(d, &mut debit), (c, &mut credit)] {
        if result.is_err() {
            conn.close_on_drop();
        }
    }
    Ok(())
}

/// Two balance changes with their ledger entries.
async fn post(
    conn: &mut sqlx::MySqlConnection,
    transfer_id: &str,
    moves: [(&str, i64); 2],
) -> Result<(), sqlx::Error> {
    for (account, delta) in moves {
        sqlx::query("UPDATE accounts SET balance_minor = balance_minor + ? WHERE id = ?")
            .bind(delta)
            .bind(account)
            .execute(&mut *conn)
            .await?;
        sqlx::query(
            "INSERT INTO ledger_entries (transfer_id, account_id, amount_minor) VALUES (?, ?, ?)",
        )
        .bind(transfer_id)
        .bind(account)
        .bind(delta)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

async fn outbox(conn: &mut sqlx::MySqlConnection, transfer_id: &str) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO outbox (event_id, payload) VALUES (?, ?)")
        .bind(uuid_like())
        .bind(format!("{{\"transfer_id\":\"{transfer_id}\"}}"))
        .execute(conn)
        .await?;
    Ok(())
}

/// A transfer or event id as the system makes them: ordered by creation
/// (UUIDv7), so the raw inserts land in the indexes where the system's do.
fn uuid_like() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

/// The shards a baseline writes to.
enum Shards {
    Mysql(Vec<MySqlPool>),
    Sqlite(Vec<(ShardId, Writer)>),
}

impl Shards {
    fn len(&self) -> usize {
        match self {
            Shards::Mysql(pools) => pools.len(),
            Shards::Sqlite(writers) => writers.len(),
        }
    }
}

fn check_kind(kind: BaselineKind, shards: usize) -> anyhow::Result<()> {
    anyhow::ensure!(shards > 0, "the baseline needs at least one shard");
    anyhow::ensure!(
        kind == BaselineKind::SameShard || shards > 1,
        "a cross-shard baseline needs at least two shards"
    );
    Ok(())
}

/// Runs `concurrency` workers for `seconds` against the MySQL shards'
/// baseline databases and reports transfers per second and latency.
pub async fn run(
    urls: &[String],
    kind: BaselineKind,
    concurrency: usize,
    seconds: u64,
) -> anyhow::Result<BaselineResult> {
    check_kind(kind, urls.len())?;
    let pools = prepare(urls, pool_size(kind, concurrency, urls.len())).await?;
    let shards = Arc::new(Shards::Mysql(pools));
    let result = measure(&shards, kind, concurrency, seconds).await;
    if let Shards::Mysql(pools) = &*shards {
        for pool in pools {
            pool.close().await;
        }
    }
    result
}

/// Runs `concurrency` workers for `seconds` against `shards` fresh SQLite
/// files in `dir` (created, and replaced if there), each written by the
/// system's writer thread with its group commit at `config`'s durability.
/// XA needs MySQL and is refused.
pub async fn run_sqlite(
    dir: &std::path::Path,
    shards: usize,
    config: &SqliteConfig,
    kind: BaselineKind,
    concurrency: usize,
    seconds: u64,
) -> anyhow::Result<BaselineResult> {
    check_kind(kind, shards)?;
    anyhow::ensure!(
        kind != BaselineKind::CrossShardXa,
        "an XA baseline needs MySQL shards: SQLite files have no XA"
    );
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut writers = Vec::with_capacity(shards);
    for index in 0..shards {
        let shard = ShardId::new(index as u32)?;
        let path = SqliteShard::file_path(dir, shard);
        for suffix in ["", "-wal", "-shm"] {
            let file = std::path::PathBuf::from(format!("{}{suffix}", path.display()));
            if file.exists() {
                std::fs::remove_file(&file)
                    .with_context(|| format!("cannot replace {}", file.display()))?;
            }
        }
        let writer = SqliteShard::open_writer(dir, shard, config)?;
        writer
            .write(move |conn| sqlite_accounts(conn).map_err(|e| sqlite_error(shard, e)))
            .await?;
        writers.push((shard, writer));
    }
    let shards = Arc::new(Shards::Sqlite(writers));
    let result = measure(&shards, kind, concurrency, seconds).await;
    // Each file is closed before this returns. Left to close on their own
    // threads, the writers could still be closing the files when the next
    // run (`bench` runs kind after kind in one directory) replaced them,
    // and under CPU load that run's files then missed committed writes:
    // its entries and transfer rows disagreed.
    if let Ok(Shards::Sqlite(writers)) = Arc::try_unwrap(shards) {
        tokio::task::spawn_blocking(move || {
            for (_, writer) in writers {
                writer.close();
            }
        })
        .await?;
    }
    result
}

async fn measure(
    shards: &Arc<Shards>,
    kind: BaselineKind,
    concurrency: usize,
    seconds: u64,
) -> anyhow::Result<BaselineResult> {
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let machine0 = crate::machine::machine_ticks();
    let workers: Vec<_> = (0..concurrency)
        .map(|w| {
            tokio::spawn(worker(
                w as u64,
                kind,
                shards.clone(),
                done.clone(),
                deadline,
            ))
        })
        .collect();
    let mut hist = new_histogram();
    let mut errors = 0;
    let mut first_error = None;
    for w in workers {
        let (h, e, first) = w.await?;
        errors += e;
        first_error = first_error.or(first);
        hist.add(&h).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let machine_busy = crate::machine::busy_share(machine0, crate::machine::machine_ticks());
    let transfers = done.load(Ordering::Relaxed);
    if let Some(error) = first_error.filter(|_| transfers == 0) {
        anyhow::bail!("every baseline transfer failed ({errors}); the first: {error:#}");
    }
    Ok(BaselineResult {
        kind,
        shards: shards.len(),
        concurrency,
        seconds: elapsed,
        transfers,
        tps: transfers as f64 / elapsed,
        latency: Hist::of(&hist),
        machine_busy,
    })
}

/// The baseline's accounts on a fresh SQLite shard file, plus its
/// in-flight account, in one transaction.
fn sqlite_accounts(conn: &rusqlite::Connection) -> rusqlite::Result<()> {
    let currency = Currency::DEFAULT;
    let now = now_ms();
    let mut insert = conn.prepare(
        "INSERT INTO accounts (id, kind, currency, balance_minor, created_at_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    for i in 0..ACCOUNTS_PER_SHARD {
        insert.execute(rusqlite::params![
            format!("a{i}"),
            "user",
            currency.code(),
            1_000_000_000i64,
            now
        ])?;
    }
    insert.execute(rusqlite::params![
        "~in_flight",
        "in_flight",
        currency.code(),
        0i64,
        now
    ])?;
    Ok(())
}

fn sqlite_error(shard: ShardId, error: rusqlite::Error) -> StoreError {
    StoreError::Internal {
        shard,
        reason: error.to_string(),
    }
}

/// One balance change and its ledger entry; a user account never goes
/// below zero.
fn sqlite_post(
    conn: &rusqlite::Connection,
    transfer_id: &str,
    account: &str,
    delta: i64,
    now: i64,
) -> rusqlite::Result<()> {
    let changed = conn
        .prepare_cached(
            "UPDATE accounts SET balance_minor = balance_minor + ?1 WHERE id = ?2 AND (kind <> 'user' OR balance_minor + ?1 >= 0)",
        )?
        .execute(rusqlite::params![delta, account])?;
    if changed != 1 {
        return Err(rusqlite::Error::QueryReturnedNoRows);
    }
    conn.prepare_cached(
        "INSERT INTO ledger_entries (transfer_id, account_id, amount_minor, currency, created_at_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(rusqlite::params![transfer_id, account, delta, Currency::DEFAULT.code(), now])?;
    Ok(())
}

/// The transfer row (payer's shard) with its outbox row and the shard's
/// counters, as the system keeps them.
fn sqlite_transfer_row(
    conn: &rusqlite::Connection,
    (id, a, b): (&str, &str, &str),
    amount: i64,
    state: &str,
    now: i64,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO transfers (id, payer, payee, amount_minor, currency, payer_shard, payee_shard, state, created_at_ms, updated_at_ms) VALUES (?1, ?2, ?3, ?4, ?5, 0, 0, ?6, ?7, ?7)",
    )?
    .execute(rusqlite::params![id, a, b, amount, Currency::DEFAULT.code(), state, now])?;
    conn.prepare_cached(
        "INSERT INTO outbox (event_id, event_type, aggregate_id, payload, created_at_ms) VALUES (?1, 'transfer', ?2, ?3, ?4)",
    )?
    .execute(rusqlite::params![
        uuid_like(),
        id,
        format!("{{\"transfer_id\":\"{id}\"}}"),
        now
    ])?;
    conn.prepare_cached(
        "UPDATE shard_counters SET transfers_completed = transfers_completed + 1, outbox_rows = outbox_rows + 1 WHERE slot = 0",
    )?
    .execute([])?;
    Ok(())
}

async fn sqlite_same_shard(
    (shard_id, writer): &(ShardId, Writer),
    payer: u32,
    payee: u32,
    amount: i64,
) -> Result<(), StoreError> {
    let shard_id = *shard_id;
    let id = uuid_like();
    let (a, b) = (format!("a{payer}"), format!("a{payee}"));
    writer
        .write(move |conn| {
            let now = now_ms();
            sqlite_post(conn, &id, &a, -amount, now)
                .and_then(|()| sqlite_post(conn, &id, &b, amount, now))
                .and_then(|()| sqlite_transfer_row(conn, (&id, &a, &b), amount, "completed", now))
                .map_err(|e| sqlite_error(shard_id, e))
        })
        .await
}

/// The saga's three transactions, each its own group-committed job: debit
/// into in-flight on the payer's shard, credit from in-flight on the
/// payee's (with its credit row), completion on the payer's.
async fn sqlite_cross_shard(
    writers: &[(ShardId, Writer)],
    (from, to): (usize, usize),
    payer: u32,
    payee: u32,
    amount: i64,
) -> Result<(), StoreError> {
    let (payer_shard, payee_shard) = (writers[from].0, writers[to].0);
    let id = uuid_like();
    let (a, b) = (format!("a{payer}"), format!("a{payee}"));
    let (id1, a1, b1) = (id.clone(), a.clone(), b.clone());
    writers[from]
        .1
        .write(move |conn| {
            let now = now_ms();
            sqlite_post(conn, &id1, &a1, -amount, now)
                .and_then(|()| sqlite_post(conn, &id1, "~in_flight", amount, now))
                .and_then(|()| sqlite_transfer_row(conn, (&id1, &a1, &b1), amount, "pending", now))
                .map_err(|e| sqlite_error(payer_shard, e))
        })
        .await?;
    let (id2, a2, b2) = (id.clone(), a.clone(), b.clone());
    writers[to]
        .1
        .write(move |conn| {
            let now = now_ms();
            conn.prepare_cached(
                "INSERT INTO inbound_credits (transfer_id, payer, payee, amount_minor, currency, payer_shard, outcome, created_at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'credited', ?7)",
            )
            .and_then(|mut st| {
                st.execute(rusqlite::params![id2, a2, b2, amount, Currency::DEFAULT.code(), from as i64, now])
            })
            .and_then(|_| sqlite_post(conn, &id2, "~in_flight", -amount, now))
            .and_then(|()| sqlite_post(conn, &id2, &b2, amount, now))
            .map_err(|e| sqlite_error(payee_shard, e))
        })
        .await?;
    writers[from]
        .1
        .write(move |conn| {
            conn.prepare_cached(
                "UPDATE transfers SET state = 'completed', updated_at_ms = ?1 WHERE id = ?2",
            )
            .and_then(|mut st| st.execute(rusqlite::params![now_ms(), id]))
            .map(|_| ())
            .map_err(|e| sqlite_error(payer_shard, e))
        })
        .await
}

/// Connections per shard pool for `concurrency` workers on `shards` shards.
fn pool_size(kind: BaselineKind, concurrency: usize, shards: usize) -> u32 {
    match kind {
        // An XA transfer holds a connection on each of its two shards at
        // once: pools that could run dry would leave workers waiting on each
        // other.
        BaselineKind::CrossShardXa => concurrency as u32 + 1,
        _ => (concurrency.div_ceil(shards) as u32 + 1) * 2,
    }
}

/// One worker: random transfers of `kind`, back to back, until the
/// deadline; returns the latency of those that committed and how many
/// failed. Worker `w` draws from its own seed.
async fn worker(
    w: u64,
    kind: BaselineKind,
    shards: Arc<Shards>,
    done: Arc<AtomicU64>,
    deadline: Instant,
) -> (Histogram<u64>, u64, Option<anyhow::Error>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(w);
    let mut hist: Histogram<u64> = new_histogram();
    let mut errors = 0u64;
    let mut first_error = None;
    while Instant::now() < deadline {
        let transfer = Draw::new(&mut rng, shards.len());
        let t = Instant::now();
        match transfer.send(kind, &shards, &mut rng).await {
            Ok(()) => {
                hist.saturating_record(t.elapsed().as_micros() as u64);
                done.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                errors += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    (hist, errors, first_error)
}

/// A transfer between two random accounts, from a random shard.
struct Draw {
    shard: usize,
    payer: u32,
    payee: u32,
    amount: i64,
}

impl Draw {
    fn new(rng: &mut rand::rngs::StdRng, shards: usize) -> Draw {
        let shard = rng.random_range(0..shards);
        let payer = rng.random_range(0..ACCOUNTS_PER_SHARD);
        let mut payee = rng.random_range(0..ACCOUNTS_PER_SHARD);
        if payee == payer {
            payee = (payee + 1) % ACCOUNTS_PER_SHARD;
        }
        let amount = rng.random_range(100..10_000);
        Draw {
            shard,
            payer,
            payee,
            amount,
        }
    }

    /// Runs it as a `kind` transfer; across shards, the payee is on another
    /// shard drawn at random.
    async fn send(
        &self,
        kind: BaselineKind,
        shards: &Shards,
        rng: &mut rand::rngs::StdRng,
    ) -> anyhow::Result<()> {
        let Draw {
            shard,
            payer,
            payee,
            amount,
        } = *self;
        let pools = match shards {
            Shards::Mysql(pools) => pools,
            Shards::Sqlite(writers) => {
                return Ok(match kind {
                    BaselineKind::SameShard => {
                        sqlite_same_shard(&writers[shard], payer, payee, amount).await?
                    }
                    _ => {
                        let other =
                            (shard + 1 + rng.random_range(0..writers.len() - 1)) % writers.len();
                        sqlite_cross_shard(writers, (shard, other), payer, payee, amount).await?
                    }
                });
            }
        };
        Ok(match kind {
            BaselineKind::SameShard => same_shard(&pools[shard], payer, payee, amount).await,
            BaselineKind::CrossShard => {
                let other = (shard + 1 + rng.random_range(0..pools.len() - 1)) % pools.len();
                cross_shard(&pools[shard], &pools[other], payer, payee, amount).await
            }
            BaselineKind::CrossShardXa => {
                let other = (shard + 1 + rng.random_range(0..pools.len() - 1)) % pools.len();
                let pair = (&pools[shard], &pools[other]);
                cross_shard_xa(pair, (shard, other), payer, payee, amount).await
            }
        }?)
    }
}
