//! Work that must not grow with history: on a shard of a million
//! transfers (written in bulk, straight into the tables, by the schema of
//! the release before counters), the migration counts the figures once,
//! `stats` and `outbox_counts` (what `/metrics`, `/ready`, `/v1/shards` and
//! `/v1/analytics` read) answer what a full recount answers, and every
//! statement the polled paths run reads a bounded number of rows: by
//! SQLite's query plans, and by MySQL's handler counters.

use std::path::Path;

use rusqlite::{params, Connection};
use shardpay_reference::ids::{AccountId, ShardId, TransferId};
use shardpay_reference::ledger::sqlite::{SqliteConfig, SqliteShard};
use shardpay_reference::ledger::*;
use shardpay_reference::money::Amount;

use crate::support::inr;

const TRANSFERS: i64 = 1_000_000;
const USERS: i64 = 1_000;
/// Rows left unpublished at the end of the history.
const UNPUBLISHED_ROWS: i64 = 100;
/// Rows a polled statement may read here: its limit (500 in these tests)
/// and some, against the million a scan would read.
const MOST_ROWS_READ: i64 = 2_000;

/// What a full recount of a shard finds.
#[derive(Debug, PartialEq, Eq)]
struct Truth {
    accounts: u64,
    pending: u64,
    completed: u64,
    failed: u64,
    balance_minor: i128,
    outbox_rows: u64,
    unpublished: u64,
}

/// The figures the polled paths read equal `truth`.
async fn assert_figures(store: &dyn ShardStore, truth: &Truth) {
    let stats = store.stats().await.unwrap();
    let seen = Truth {
        accounts: stats.accounts,
        pending: stats.transfers_pending,
        completed: stats.transfers_completed,
        failed: stats.transfers_failed,
        balance_minor: stats.balance_minor_by_currency[0].1,
        outbox_rows: store.outbox_counts().await.unwrap().0,
        unpublished: store.outbox_counts().await.unwrap().1,
    };
    assert_eq!(&seen, truth);
    assert_eq!(stats.balance_minor_by_currency.len(), 1);
}

/// One more transfer and account through the ledger: the counters move
/// with them, in their transactions.
async fn one_more_of_each(store: &dyn ShardStore) {
    let account = NewAccount {
        id: AccountId::parse("newcomer").unwrap(),
        currency: inr(),
        opening_balance: Amount::from_minor(5_00).unwrap(),
        created_at_ms: now_ms(),
    };
    store.create_account(account, None).await.unwrap();
    let transfer = Transfer {
        id: TransferId::generate(),
        payer: AccountId::parse("u1").unwrap(),
        payee: AccountId::parse("newcomer").unwrap(),
        amount: Amount::from_minor(1).unwrap(),
        currency: inr(),
        payer_shard: store.shard(),
        payee_shard: store.shard(),
        state: TransferState::Pending,
        failure_code: None,
        created_at_ms: now_ms(),
        updated_at_ms: now_ms(),
    };
    let done = store.transfer_local(&transfer, None).await.unwrap();
    assert!(matches!(done, DebitOutcome::Applied(_)), "{done:?}");
}

fn state_of(n: i64) -> &'static str {
    match n % 50 {
        0 => "pending",
        1 | 2 => "failed",
        _ => "completed",
    }
}

/// A shard file as the release before counters left it, with `USERS`
/// accounts and `TRANSFERS` transfers, their entries and outbox rows, all
/// published but the last `UNPUBLISHED_ROWS`: one bulk transaction.
fn write_sqlite_history(path: &Path) {
    let mut conn = Connection::open(path).unwrap();
    conn.pragma_update(None, "journal_mode", "WAL").unwrap();
    conn.pragma_update(None, "synchronous", "OFF").unwrap();
    let tx = conn.transaction().unwrap();
    for migration in &shardpay_reference::ledger::sqlite::MIGRATIONS[..2] {
        tx.execute_batch(migration).unwrap();
    }
    tx.pragma_update(None, "user_version", 2).unwrap();
    {
        let mut account = tx
            .prepare("INSERT INTO accounts VALUES (?, 'user', 'INR', ?, 1)")
            .unwrap();
        for u in 0..USERS {
            account
                .execute(params![format!("u{u}"), 1_000 + u])
                .unwrap();
        }
        let funded: i64 = (0..USERS).map(|u| 1_000 + u).sum();
        tx.execute(
            "INSERT INTO accounts VALUES ('~funding:INR', 'funding', 'INR', ?, 1)",
            [-funded],
        )
        .unwrap();
        let mut transfer = tx
            .prepare("INSERT INTO transfers VALUES (?, ?, ?, ?, 'INR', 0, 0, ?, NULL, ?, ?)")
            .unwrap();
        let mut entry = tx
            .prepare(
                "INSERT INTO ledger_entries (transfer_id, account_id, amount_minor, currency,
                    created_at_ms) VALUES (?, ?, ?, 'INR', ?)",
            )
            .unwrap();
        let mut outbox = tx
            .prepare(
                "INSERT INTO outbox (event_id, event_type, aggregate_id, payload, created_at_ms,
                    published_at_ms) VALUES (?, 'transfer.completed', ?, '{}', ?, ?)",
            )
            .unwrap();
        for n in 0..TRANSFERS {
            let id = format!("{n:032x}");
            let (payer, payee) = (format!("u{}", n % USERS), format!("u{}", (n + 1) % USERS));
            let amount = 1 + n % 500;
            transfer
                .execute(params![id, payer, payee, amount, state_of(n), n, n])
                .unwrap();
            entry.execute(params![id, payer, -amount, n]).unwrap();
            entry.execute(params![id, payee, amount, n]).unwrap();
            let published = (n < TRANSFERS - UNPUBLISHED_ROWS).then_some(n);
            outbox.execute(params![id, id, n, published]).unwrap();
        }
    }
    tx.commit().unwrap();
}

fn sqlite_truth(conn: &Connection) -> Truth {
    let count = |sql: &str| conn.query_row(sql, [], |r| r.get::<_, i64>(0)).unwrap() as u64;
    let transfers = |state: &str| {
        count(&format!(
            "SELECT COUNT(*) FROM transfers WHERE state = '{state}'"
        ))
    };
    Truth {
        accounts: count("SELECT COUNT(*) FROM accounts WHERE kind = 'user'"),
        pending: transfers("pending"),
        completed: transfers("completed"),
        failed: transfers("failed"),
        balance_minor: conn
            .query_row(
                "SELECT SUM(balance_minor) FROM accounts WHERE kind = 'user'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .unwrap()
            .into(),
        outbox_rows: count("SELECT COUNT(*) FROM outbox"),
        unpublished: count("SELECT COUNT(*) FROM outbox WHERE published_at_ms IS NULL"),
    }
}

/// Whether a line of SQLite's query plan reads a bounded number of rows:
/// a search of an index, a sort of what was found, a scan of a table that
/// holds a row per counter slot or consumer, or a scan of a partial index
/// that holds only the backlog (unpublished rows, pending transfers).
fn bounded(detail: &str) -> bool {
    let detail = detail.replace("TABLE ", "");
    detail.starts_with("SEARCH ")
        || detail.starts_with("USE TEMP B-TREE")
        || ["SCAN shard_counters", "SCAN consumer_snapshots"].contains(&detail.as_str())
        || detail.ends_with("USING INDEX outbox_unpublished")
        || detail.ends_with("USING INDEX transfers_pending")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_figures_stay_flat_over_a_million_transfers() {
    let dir = tempfile::tempdir().unwrap();
    let shard = ShardId::new(0).unwrap();
    let path = SqliteShard::file_path(dir.path(), shard);
    write_sqlite_history(&path);
    // Opening migrates the file: the counters are counted from the tables once.
    let store = SqliteShard::open(dir.path(), shard, &SqliteConfig::default()).unwrap();
    let conn = Connection::open(&path).unwrap();
    let truth = sqlite_truth(&conn);
    assert_eq!(
        (truth.pending, truth.outbox_rows, truth.unpublished),
        (20_000, TRANSFERS as u64, UNPUBLISHED_ROWS as u64)
    );
    assert_figures(&store, &truth).await;
    for sql in POLLED {
        let mut plan = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        let unbound = vec![rusqlite::types::Null; plan.parameter_count()];
        let details: Vec<String> = plan
            .query_map(rusqlite::params_from_iter(unbound), |r| {
                r.get::<_, String>(3)
            })
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert!(!details.is_empty(), "{sql}");
        for detail in &details {
            println!("{}: {detail}", sql.lines().next().unwrap_or_default());
            assert!(bounded(detail), "{sql}\n reads without bound: {detail}");
        }
    }
    one_more_of_each(&store).await;
    assert_figures(&store, &sqlite_truth(&conn)).await;
    // The rows the old release published are numbered in id order, so a
    // consumer's tail and the prune work on them as on new rows.
    let tail = store.outbox_tail(TRANSFERS - 3, 10).await.unwrap();
    let positions: Vec<i64> = tail.iter().filter_map(|e| e.position).collect();
    assert_eq!(positions, [TRANSFERS - 2, TRANSFERS - 1, TRANSFERS]);
    store
        .save_consumer_snapshot("analytics", TRANSFERS, "{}".into())
        .await
        .unwrap();
    assert_eq!(store.prune_outbox(now_ms(), 5_000).await.unwrap(), 5_000);
    assert_eq!(
        store.outbox_tail(0, 1).await.unwrap()[0].position,
        Some(5_001)
    );
    // The counters still count every row written: what the pipeline
    // report compares with what the consumers applied.
    let left = sqlite_truth(&conn);
    assert_eq!(left.outbox_rows, TRANSFERS as u64 + 2 - 5_000);
    let (rows, unpublished) = store.outbox_counts().await.unwrap();
    assert_eq!(
        (rows, unpublished),
        (TRANSFERS as u64 + 2, left.unpublished)
    );
}

/// Statements that make `n` in `digits` count 0 to 999,999 (a cross join
/// of six copies of ten digits): bulk rows without a million round trips.
const MILLION: &str =
    "(SELECT a.d + 10 * b.d + 100 * c.d + 1000 * e.d + 10000 * f.d + 100000 * g.d AS n
     FROM digits a, digits b, digits c, digits e, digits f, digits g) numbers";

/// The MySQL shard database `url` as the release before counters left it,
/// with the same history as the SQLite one (entries left out: no polled
/// statement reads them).
async fn write_mysql_history(conn: &mut sqlx::MySqlConnection) {
    use shardpay_reference::ledger::mysql::MIGRATIONS;
    sqlx::query(
        "CREATE TABLE schema_migrations (version BIGINT NOT NULL PRIMARY KEY,
            applied_at_ms BIGINT NOT NULL) ENGINE=InnoDB",
    )
    .execute(&mut *conn)
    .await
    .unwrap();
    for (index, statements) in MIGRATIONS[..3].iter().enumerate() {
        for sql in *statements {
            sqlx::query(sql).execute(&mut *conn).await.unwrap();
        }
        sqlx::query("INSERT INTO schema_migrations VALUES (?, 0)")
            .bind(index as i64 + 1)
            .execute(&mut *conn)
            .await
            .unwrap();
    }
    let unpublished_from = TRANSFERS - UNPUBLISHED_ROWS;
    for sql in [
        "CREATE TABLE digits (d INT NOT NULL PRIMARY KEY)".to_string(),
        "INSERT INTO digits VALUES (0), (1), (2), (3), (4), (5), (6), (7), (8), (9)".into(),
        format!(
            "INSERT INTO accounts SELECT CONCAT('u', n), 'user', 'INR', 1000 + n, 1
             FROM {MILLION} WHERE n < {USERS}"
        ),
        format!(
            "INSERT INTO accounts SELECT '~funding:INR', 'funding', 'INR', -SUM(balance_minor), 1
             FROM accounts WHERE kind = 'user'"
        ),
        format!(
            "INSERT INTO transfers SELECT LPAD(HEX(n), 32, '0'), CONCAT('u', n % {USERS}),
                CONCAT('u', (n + 1) % {USERS}), 1 + n % 500, 'INR', 0, 0,
                CASE n % 50 WHEN 0 THEN 'pending' WHEN 1 THEN 'failed' WHEN 2 THEN 'failed'
                     ELSE 'completed' END, NULL, n, n
             FROM {MILLION}"
        ),
        format!(
            "INSERT INTO outbox (event_id, event_type, aggregate_id, payload, created_at_ms,
                published_at_ms)
             SELECT LPAD(HEX(n), 32, '0'), 'transfer.completed', LPAD(HEX(n), 32, '0'), '{{}}', n,
                IF(n < {unpublished_from}, n, NULL)
             FROM {MILLION} ORDER BY n"
        ),
        "DROP TABLE digits".into(),
    ] {
        sqlx::query(&sql).execute(&mut *conn).await.unwrap();
    }
}

async fn mysql_count(conn: &mut sqlx::MySqlConnection, sql: &str) -> u64 {
    let n: i64 = sqlx::query_scalar(sql).fetch_one(&mut *conn).await.unwrap();
    n as u64
}

async fn mysql_truth(conn: &mut sqlx::MySqlConnection) -> Truth {
    let transfers = "SELECT COUNT(*) FROM transfers WHERE state =";
    Truth {
        accounts: mysql_count(conn, "SELECT COUNT(*) FROM accounts WHERE kind = 'user'").await,
        pending: mysql_count(conn, &format!("{transfers} 'pending'")).await,
        completed: mysql_count(conn, &format!("{transfers} 'completed'")).await,
        failed: mysql_count(conn, &format!("{transfers} 'failed'")).await,
        balance_minor: mysql_count(
            conn,
            "SELECT CAST(SUM(balance_minor) AS SIGNED) FROM accounts WHERE kind = 'user'",
        )
        .await
        .into(),
        outbox_rows: mysql_count(conn, "SELECT COUNT(*) FROM outbox").await,
        unpublished: mysql_count(
            conn,
            "SELECT COUNT(*) FROM outbox WHERE published_at_ms IS NULL",
        )
        .await,
    }
}

/// The rows this session's handlers have read so far (every
/// `Handler_read_*` counter).
async fn rows_read(conn: &mut sqlx::MySqlConnection) -> i64 {
    use sqlx::{Executor, Row};
    let rows = conn
        .fetch_all("SHOW SESSION STATUS LIKE 'Handler_read%'")
        .await
        .unwrap();
    rows.iter()
        .map(|r| {
            let value: Vec<u8> = r.try_get_unchecked(1).unwrap();
            String::from_utf8_lossy(&value).parse::<i64>().unwrap()
        })
        .sum()
}

/// The rows `sql` reads, each of its parameters 500 (a limit, a position,
/// a time), run in a transaction that is rolled back.
async fn rows_read_by(conn: &mut sqlx::MySqlConnection, sql: &str) -> i64 {
    use sqlx::Executor;
    conn.execute("BEGIN").await.unwrap();
    // What reading the counters itself reads, measured around nothing.
    let before = rows_read(conn).await;
    let idle = rows_read(conn).await - before;
    let before = rows_read(conn).await;
    let query = (0..sql.matches('?').count()).fold(sqlx::query(sql), |q, _| q.bind(500_i64));
    query.execute(&mut *conn).await.unwrap();
    let read = rows_read(conn).await - before - idle;
    conn.execute("ROLLBACK").await.unwrap();
    read
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_figures_stay_flat_over_a_million_transfers() {
    use shardpay_reference::ledger::mysql::{MysqlConfig, MysqlShard};
    use sqlx::Connection;
    let Some(server) = crate::support::mysql_server() else {
        return;
    };
    let db = format!("t{}_flat", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let mut admin = sqlx::MySqlConnection::connect(&server).await.unwrap();
    sqlx::query(&format!(
        "CREATE DATABASE {db} CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
    ))
    .execute(&mut admin)
    .await
    .unwrap();
    let url = format!("{server}/{db}");
    let mut conn = sqlx::MySqlConnection::connect(&url).await.unwrap();
    write_mysql_history(&mut conn).await;
    // Connecting migrates the database: counters counted once, into slot 0.
    let shard = ShardId::new(0).unwrap();
    let store = MysqlShard::connect(&url, shard, 1, &MysqlConfig::default())
        .await
        .unwrap();
    let truth = mysql_truth(&mut conn).await;
    assert_eq!(
        (truth.pending, truth.outbox_rows, truth.unpublished),
        (20_000, TRANSFERS as u64, UNPUBLISHED_ROWS as u64)
    );
    assert_figures(&store, &truth).await;
    for sql in POLLED {
        let read = rows_read_by(&mut conn, sql).await;
        let first_line = sql.lines().next().unwrap_or_default();
        println!("{read:>7} rows read by {first_line}");
        assert!(read <= MOST_ROWS_READ, "{sql}\n read {read} rows");
    }
    // A full count, measured the same way, reads the table: the measure
    // sees a scan when there is one.
    let scan = rows_read_by(&mut conn, "SELECT COUNT(*) FROM transfers WHERE state <> ?").await;
    println!("{scan:>7} rows read by a full count of the transfers");
    assert!(scan >= TRANSFERS, "a full count read {scan} rows");
    one_more_of_each(&store).await;
    assert_figures(&store, &mysql_truth(&mut conn).await).await;
    store
        .save_consumer_snapshot("analytics", TRANSFERS, "{}".into())
        .await
        .unwrap();
    assert_eq!(store.prune_outbox(now_ms(), 5_000).await.unwrap(), 5_000);
    assert_eq!(
        store.outbox_tail(0, 1).await.unwrap()[0].position,
        Some(5_001)
    );
    let (rows, _) = store.outbox_counts().await.unwrap();
    assert_eq!(rows, TRANSFERS as u64 + 2);
    sqlx::query(&format!("DROP DATABASE {db}"))
        .execute(&mut admin)
        .await
        .unwrap();
}
