//! The raw-database baseline: the transfer transactions the reference
//! system runs, sent straight to the MySQL shards with sqlx, with no HTTP
//! and no services in between, at a given concurrency. Its TPS is the
//! ceiling the services' TPS is measured against.
//!
//! Each shard URL's database gets a sibling `<database>_baseline` holding
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

fn uuid_like() -> String {
    format!("{:032x}", rand::rng().random::<u128>())
}

/// Runs `concurrency` workers for `seconds` against the shards' baseline
/// databases and reports transfers per second and latency.
pub async fn run(
    urls: &[String],
    kind: BaselineKind,
    concurrency: usize,
    seconds: u64,
) -> anyhow::Result<BaselineResult> {
    anyhow::ensure!(
        !urls.is_empty(),
        "the baseline needs at least one shard URL"
    );
    anyhow::ensure!(
        kind == BaselineKind::SameShard || urls.len() > 1,
        "a cross-shard baseline needs at least two shards"
    );
    let pools = Arc::new(prepare(urls, pool_size(kind, concurrency, urls.len())).await?);
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|w| {
            tokio::spawn(worker(
                w as u64,
                kind,
                pools.clone(),
                done.clone(),
                deadline,
            ))
        })
        .collect();
    let mut hist = new_histogram();
    for w in workers {
        let (h, _errors) = w.await?;
        hist.add(&h).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let transfers = done.load(Ordering::Relaxed);
    for pool in pools.iter() {
        pool.close().await;
    }
    Ok(BaselineResult {
        kind,
        shards: urls.len(),
        concurrency,
        seconds: elapsed,
        transfers,
        tps: transfers as f64 / elapsed,
        latency: Hist::of(&hist),
    })
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
    pools: Arc<Vec<MySqlPool>>,
    done: Arc<AtomicU64>,
    deadline: Instant,
) -> (Histogram<u64>, u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(w);
    let mut hist: Histogram<u64> = new_histogram();
    let mut errors = 0u64;
    while Instant::now() < deadline {
        let transfer = Draw::new(&mut rng, pools.len());
        let t = Instant::now();
        match transfer.send(kind, &pools, &mut rng).await {
            Ok(()) => {
                hist.saturating_record(t.elapsed().as_micros() as u64);
                done.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => errors += 1,
        }
    }
    (hist, errors)
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
        pools: &[MySqlPool],
        rng: &mut rand::rngs::StdRng,
    ) -> Result<(), sqlx::Error> {
        let Draw {
            shard,
            payer,
            payee,
            amount,
        } = *self;
        match kind {
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
        }
    }
}
