//! The MySQL/MariaDB backend (sqlx): one database per shard, with the same
//! behaviour as the embedded backend, proven by the same storage suite.
//!
//! Every write is one InnoDB transaction. Rows about to change are locked
//! first (`SELECT ... FOR UPDATE`), customer accounts in id order and the
//! shard's system accounts after them, so two transfers cannot deadlock on
//! each other's order. A deadlock or lock-wait timeout the server reports
//! anyway rolls the transaction back whole and runs it again, up to
//! `MAX_ATTEMPTS`; after that, and on a lost connection, the shard answers
//! unavailable. Nothing is ever half-applied.

mod schema;
mod xa;

use std::time::Duration;

use sqlx::mysql::{MySqlConnectOptions, MySqlPoolOptions, MySqlRow};
use sqlx::pool::PoolConnection;
use sqlx::{Decode, Executor, MySql, MySqlConnection, MySqlPool, Row as _, TypeInfo, ValueRef};

use super::book::{self, Cell, Dialect, Param, Row, Session};
use super::StoreError;
use crate::ids::ShardId;
pub use schema::{migrate, migrate_interrupted, Interrupt, MIGRATIONS};

/// Times a transaction is run when the server reports a deadlock or a lock
/// wait timeout, before the shard answers unavailable.
pub const MAX_ATTEMPTS: u32 = 5;
/// Seconds a statement waits for a row lock before giving up (and being
/// retried); InnoDB's default of 50 s would hold requests far too long.
pub const LOCK_WAIT_TIMEOUT_S: u32 = 5;
/// Connections per shard for writing XA decisions.
const DECISION_CONNECTIONS: u32 = 4;

#[derive(Debug, Clone)]
pub struct MysqlConfig {
    /// Connections per shard: the most transactions one shard runs at once.
    pub pool_size: u32,
    /// How long a request waits for a free connection.
    pub acquire_timeout: Duration,
}

impl Default for MysqlConfig {
    fn default() -> Self {
        MysqlConfig {
            pool_size: 16,
            acquire_timeout: Duration::from_secs(2),
        }
    }
}

pub struct MysqlShard {
    shard: ShardId,
    pool: MySqlPool,
    /// A few connections of its own for XA decisions: a coordinator writes
    /// its decision while it holds a prepared branch's connection from
    /// `pool`, so decisions taken from `pool` could wait on each other
    /// until every connection is held by a coordinator waiting for one.
    decisions: MySqlPool,
    /// Names this shard's XA branches (`s<shard>-<tag>`, the tag hashed
    /// from the database name), so shards of several deployments sharing
    /// one server never resolve each other's branches.
    xa_bqual: String,
}

impl MysqlShard {
    /// Connects to the shard's database (`mysql://user:pass@host:port/db`),
    /// brings its schema up to date, and checks the database is shard
    /// `shard` of `shard_count` (a new database is marked so): accounts are
    /// routed by the ring, so a database opened as another shard, or under
    /// another count, would hold accounts the ring sends elsewhere.
    pub async fn connect(
        url: &str,
        shard: ShardId,
        shard_count: u32,
        config: &MysqlConfig,
    ) -> anyhow::Result<MysqlShard> {
        let options: MySqlConnectOptions = url
            .parse()
            .map_err(|e| anyhow::anyhow!("shard {shard}: bad MySQL URL {url:?}: {e}"))?;
        let decisions = MySqlPoolOptions::new()
            .max_connections(DECISION_CONNECTIONS)
            .acquire_timeout(config.acquire_timeout)
            .connect_lazy_with(options.clone());
        let pool = MySqlPoolOptions::new()
            .max_connections(config.pool_size.max(1))
            .acquire_timeout(config.acquire_timeout)
            .after_connect(|conn, _| {
                Box::pin(async move {
                    sqlx::query(&format!(
                        "SET SESSION innodb_lock_wait_timeout = {LOCK_WAIT_TIMEOUT_S}"
                    ))
                    .execute(&mut *conn)
                    .await?;
                    // Row locks guard every balance; READ COMMITTED takes no
                    // gap locks, which would make concurrent inserts of new
                    // keys and accounts deadlock. The audit asks for a
                    // snapshot of its own.
                    sqlx::query("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
                        .execute(&mut *conn)
                        .await?;
                    Ok(())
                })
            })
            .connect_with(options)
            .await
            .map_err(|e| {
                anyhow::anyhow!("shard {shard}: cannot connect to {}: {e}", redact(url))
            })?;
        schema::migrate(&pool)
            .await
            .map_err(|e| anyhow::anyhow!("shard {shard}: schema migration failed: {e}"))?;
        sqlx::query(
            "INSERT IGNORE INTO shard_identity (singleton, shard_index, shard_count) VALUES (1, ?, ?)",
        )
        .bind(shard.index() as i64)
        .bind(shard_count as i64)
        .execute(&pool)
        .await?;
        let (index, count): (i32, i32) = sqlx::query_as(
            "SELECT shard_index, shard_count FROM shard_identity WHERE singleton = 1",
        )
        .fetch_one(&pool)
        .await?;
        anyhow::ensure!(
            index as usize == shard.index() && count as u32 == shard_count,
            "{} holds shard {index} of {count}, but was given as shard {} of {shard_count}; \
             give the URLs in shard order and as many as the data was written with, or use empty databases",
            redact(url),
            shard.index()
        );
        let database: String = sqlx::query_scalar("SELECT DATABASE()")
            .fetch_one(&pool)
            .await
            .map(|d: Option<Vec<u8>>| String::from_utf8_lossy(&d.unwrap_or_default()).into_owned())
            .unwrap_or_default();
        let digest = <sha2::Sha256 as sha2::Digest>::digest(database.as_bytes());
        let tag: String = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
        Ok(MysqlShard {
            shard,
            pool,
            decisions,
            xa_bqual: format!("s{}-{tag}", shard.index()),
        })
    }

    pub fn pool(&self) -> &MySqlPool {
        &self.pool
    }
}

/// The URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

const DEADLOCK: u16 = 1213;
const LOCK_WAIT_TIMEOUT: u16 = 1205;
const DUPLICATE_KEY: u16 = 1062;

/// A MySQL error: whether running the transaction again may succeed, and
/// the storage error to answer otherwise.
fn classify(shard: ShardId, error: &sqlx::Error) -> (bool, StoreError) {
    let reason = error.to_string();
    match error {
        sqlx::Error::Database(db) => {
            let number = db
                .try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
                .map(|e| e.number())
                .unwrap_or(0);
            let retry = matches!(number, DEADLOCK | LOCK_WAIT_TIMEOUT | DUPLICATE_KEY);
            let e = if matches!(number, DEADLOCK | LOCK_WAIT_TIMEOUT) {
                StoreError::Unavailable { shard, reason }
            } else {
                StoreError::Internal { shard, reason }
            };
            (retry, e)
        }
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::WorkerCrashed => (false, StoreError::Unavailable { shard, reason }),
        _ => (false, StoreError::Internal { shard, reason }),
    }
}

/// A MySQL connection as a ledger session. A statement error that a rerun
/// may cure (a deadlock, a lock-wait timeout, a duplicate key another
/// transaction inserted first) sets `retry`.
pub(super) struct MysqlSession<'a> {
    conn: &'a mut MySqlConnection,
    shard: ShardId,
    retry: bool,
}

const DIALECT: Dialect = Dialect {
    insert_system_account: "INSERT IGNORE INTO accounts
        (id, kind, currency, balance_minor, created_at_ms) VALUES (?, ?, ?, 0, ?)",
    purge_expired: "DELETE FROM idempotency_keys WHERE expires_at_ms <= ? LIMIT ?",
    begin_snapshot: &[
        "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ",
        "START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY",
    ],
    counter_slots: schema::COUNTER_SLOTS,
    save_snapshot: "INSERT INTO consumer_snapshots (consumer, position, body, updated_at_ms)
        VALUES (?, ?, ?, ?) ON DUPLICATE KEY UPDATE
        body = IF(VALUES(position) > position, VALUES(body), body),
        updated_at_ms = IF(VALUES(position) > position, VALUES(updated_at_ms), updated_at_ms),
        position = GREATEST(position, VALUES(position))",
};

type Query<'q> = sqlx::query::Query<'q, MySql, sqlx::mysql::MySqlArguments>;

fn bind<'q>(sql: &'q str, params: &[Param<'q>]) -> Query<'q> {
    params
        .iter()
        .fold(sqlx::query(sql), |query, param| match *param {
            Param::Int(v) => query.bind(v),
            Param::Text(t) => query.bind(t),
            Param::Null => query.bind(None::<i64>),
        })
}

/// One column of a row. Integers by their declared type; everything else
/// (text, decimals, sums cast to text) as UTF-8 read from bytes: columns
/// with a binary collation (`utf8mb4_bin`, so ids compare as bytes) come
/// back flagged binary, and sqlx will not decode those as `String`.
fn cell(row: &MySqlRow, index: usize) -> Result<Cell, sqlx::Error> {
    let raw = row.try_get_raw(index)?;
    if raw.is_null() {
        return Ok(Cell::Null);
    }
    let name = raw.type_info().name().to_string();
    let decode = |e| sqlx::Error::Decode(e);
    if name.contains("INT") {
        let value = if name.contains("UNSIGNED") {
            let v = <u64 as Decode<MySql>>::decode(raw).map_err(decode)?;
            i64::try_from(v).map_err(|e| sqlx::Error::Decode(Box::new(e)))?
        } else {
            <i64 as Decode<MySql>>::decode(raw).map_err(decode)?
        };
        return Ok(Cell::Int(value));
    }
    let bytes = <Vec<u8> as Decode<MySql>>::decode(raw).map_err(decode)?;
    String::from_utf8(bytes)
        .map(Cell::Text)
        .map_err(|e| sqlx::Error::Decode(Box::new(e)))
}

impl MysqlSession<'_> {
    fn sql_error(&mut self, error: sqlx::Error) -> StoreError {
        let (retry, e) = classify(self.shard, &error);
        self.retry |= retry;
        e
    }
}

impl Session for MysqlSession<'_> {
    fn shard(&self) -> ShardId {
        self.shard
    }

    fn dialect(&self) -> &'static Dialect {
        &DIALECT
    }

    fn locks_rows(&self) -> bool {
        true
    }

    async fn execute(&mut self, sql: &str, params: &[Param<'_>]) -> Result<u64, StoreError> {
        match bind(sql, params).execute(&mut *self.conn).await {
            Ok(done) => Ok(done.rows_affected()),
            Err(e) => Err(self.sql_error(e)),
        }
    }

    async fn rows(&mut self, sql: &str, params: &[Param<'_>]) -> Result<Vec<Row>, StoreError> {
        let rows = match bind(sql, params).fetch_all(&mut *self.conn).await {
            Ok(rows) => rows,
            Err(e) => return Err(self.sql_error(e)),
        };
        let shard = self.shard;
        rows.iter()
            .map(|r| {
                let cells = (0..r.len())
                    .map(|i| cell(r, i))
                    .collect::<Result<Vec<Cell>, sqlx::Error>>()
                    .map_err(|e| book::corrupt(shard, format!("unexpected column: {e}")))?;
                Ok(Row { cells, shard })
            })
            .collect()
    }
}

/// A pooled connection held for one transaction, XA branch or read.
/// Dropped before `release` (an error, a cancelled request), it is closed
/// rather than pooled: the server rolls back whatever it had open, and no
/// later request finds itself inside it.
pub(super) struct Held {
    conn: Option<PoolConnection<MySql>>,
    shard: ShardId,
}

impl Held {
    fn session(&mut self) -> MysqlSession<'_> {
        MysqlSession {
            conn: self.conn.as_deref_mut().expect("held until released"),
            shard: self.shard,
            retry: false,
        }
    }

    /// Runs a statement that cannot be prepared (transaction control, XA).
    pub(super) async fn text(&mut self, sql: &str) -> Result<(), sqlx::Error> {
        let conn = self.conn.as_deref_mut().expect("held until released");
        conn.execute(sql).await.map(|_| ())
    }

    pub(super) fn conn(&mut self) -> &mut MySqlConnection {
        self.conn.as_deref_mut().expect("held until released")
    }

    /// The connection, no longer closed on drop.
    pub(super) fn release(mut self) -> PoolConnection<MySql> {
        self.conn.take().expect("held until released")
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.as_mut() {
            conn.close_on_drop();
        }
    }
}

impl MysqlShard {
    pub(super) async fn hold(&self) -> Result<Held, StoreError> {
        match self.pool.acquire().await {
            Ok(conn) => Ok(Held {
                conn: Some(conn),
                shard: self.shard,
            }),
            Err(e) => Err(classify(self.shard, &e).1),
        }
    }

    /// Opens a transaction, or the XA branch `xid`.
    async fn begin(&self, held: &mut Held, xid: Option<&str>) -> Result<(), StoreError> {
        let sql = match xid {
            None => "BEGIN".to_string(),
            Some(xid) => format!("XA START {xid}"),
        };
        held.text(&sql)
            .await
            .map_err(|e| classify(self.shard, &e).1)
    }

    /// Commits a transaction, or ends (without preparing) an XA branch,
    /// after a body that succeeded. On an error, answers whether a rerun may
    /// succeed (a commit refused for a deadlock).
    async fn finish(&self, held: &mut Held, xid: Option<&str>) -> Result<(), (bool, StoreError)> {
        let sql = match xid {
            None => "COMMIT".to_string(),
            Some(xid) => format!("XA END {xid}"),
        };
        if let Err(e) = held.text(&sql).await {
            if let Some(xid) = xid {
                xa::abort_open(held, xid).await;
            }
            return Err(classify(self.shard, &e));
        }
        Ok(())
    }

    /// Rolls back what `begin` opened, after a body that failed. Answers
    /// whether the connection is clean enough to pool again.
    async fn roll_back(&self, held: &mut Held, xid: Option<&str>) -> bool {
        match xid {
            None => held.text("ROLLBACK").await.is_ok(),
            Some(xid) => xa::abort_open(held, xid).await,
        }
    }
}

/// Runs `$body` (an expression using `$s: &mut MysqlSession`) in a
/// transaction, or in the XA branch `$xid` when it is `Some`, on a
/// connection of its own: committed (or ended, ready to prepare) on `Ok`,
/// rolled back on `Err`, and run again from the start when the server
/// reported a deadlock or lock-wait timeout, up to `MAX_ATTEMPTS` times.
/// Answers the held connection and the body's value.
macro_rules! attempts {
    ($self:ident, $xid:expr, |$s:ident| $body:expr) => {{
        let xid: Option<&str> = $xid;
        let mut attempt = 1;
        loop {
            let mut held = match $self.hold().await {
                Ok(held) => held,
                Err(e) => break Err(e),
            };
            if let Err(e) = $self.begin(&mut held, xid).await {
                break Err(e);
            }
            let mut session = held.session();
            let result = {
                let $s = &mut session;
                $body.await
            };
            let retry = session.retry;
            let again = match result {
                Ok(value) => match $self.finish(&mut held, xid).await {
                    Ok(()) => break Ok((held, value)),
                    Err(failed) => failed,
                },
                Err(error) => {
                    if $self.roll_back(&mut held, xid).await {
                        drop(held.release());
                    }
                    (retry, error)
                }
            };
            if again.0 && attempt < MAX_ATTEMPTS {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(2 * attempt as u64)).await;
                continue;
            }
            break Err(again.1);
        }
    }};
}
pub(super) use attempts;

/// Runs `$body` in a transaction; answers its value.
macro_rules! transaction {
    ($self:ident, |$s:ident| $body:expr) => {
        attempts!($self, None, |$s| $body).map(|(held, value)| {
            drop(held.release());
            value
        })
    };
}

/// Runs `$body` (using `$s`) outside a transaction, on a pooled connection.
/// A read that failed may have left session state behind (the audit's
/// snapshot opens a transaction), so its connection is closed, not pooled.
macro_rules! reading {
    ($self:ident, |$s:ident| $body:expr) => {{
        let mut held = $self.hold().await?;
        let result = {
            let mut session = held.session();
            let $s = &mut session;
            $body.await
        };
        if result.is_ok() {
            drop(held.release());
        }
        result
    }};
}

book::shard_store!(
    MysqlShard,
    transaction,
    reading,
    fn two_phase(&self) -> Option<&dyn super::TwoPhase> {
        Some(self)
    }
);

#[cfg(test)]
mod tests {
    #[test]
    fn urls_lose_their_password_in_messages() {
        assert_eq!(
            super::redact("mysql://app:secret@127.0.0.1:3316/shard_0"),
            "mysql://app:***@127.0.0.1:3316/shard_0"
        );
        assert_eq!(super::redact("mysql://127.0.0.1/x"), "mysql://127.0.0.1/x");
    }
}

/// The URL of `database` on the server of `shard_url` (same user,
/// password and options): where a service's own tables sit beside the
/// shards.
pub fn database_beside(shard_url: &str, database: &str) -> anyhow::Result<String> {
    let mut url = url::Url::parse(shard_url)
        .map_err(|e| anyhow::anyhow!("bad MySQL URL {:?}: {e}", redact(shard_url)))?;
    url.set_path(&format!("/{database}"));
    Ok(url.to_string())
}

/// Opens a service's own database (`mysql://user:password@host:port/database`),
/// creating it and `tables` when missing; sessions run under READ COMMITTED
/// with the shards' lock-wait timeout. `what` names the service in errors,
/// `example` the database a URL would usually name.
pub async fn open_side_database(
    url: &str,
    what: &str,
    example: &str,
    tables: &[&str],
    config: &MysqlConfig,
) -> anyhow::Result<MySqlPool> {
    let shown = redact(url);
    let options: sqlx::mysql::MySqlConnectOptions = url
        .parse()
        .map_err(|e| anyhow::anyhow!("{what}: bad MySQL URL {shown:?}: {e}"))?;
    let database = options.get_database().unwrap_or_default().to_string();
    anyhow::ensure!(
        !database.is_empty()
            && database
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_'),
        "{what}: the MySQL URL {shown:?} must name a database of letters, digits and '_' (such as .../{example})"
    );
    create_side_database(url, &database).await.map_err(|e| {
        anyhow::anyhow!("{what}: cannot create database {database} at {shown}: {e}")
    })?;
    let pool = sqlx::mysql::MySqlPoolOptions::new()
        .max_connections(config.pool_size.max(1))
        .acquire_timeout(config.acquire_timeout)
        .after_connect(|conn, _| {
            Box::pin(async move {
                sqlx::query(&format!(
                    "SET SESSION innodb_lock_wait_timeout = {LOCK_WAIT_TIMEOUT_S}"
                ))
                .execute(&mut *conn)
                .await?;
                // Claims lock only the keys they insert; READ COMMITTED takes
                // no gap locks, and each read sees the winner.
                sqlx::query("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
                    .execute(&mut *conn)
                    .await?;
                Ok(())
            })
        })
        .connect_with(options)
        .await
        .map_err(|e| anyhow::anyhow!("{what}: cannot connect to {shown}: {e}"))?;
    for sql in tables {
        // As text: CREATE TRIGGER is not a statement MySQL prepares.
        sqlx::raw_sql(sql)
            .execute(&pool)
            .await
            .map_err(|e| anyhow::anyhow!("{what}: cannot create tables in {shown}: {e}"))?;
    }
    Ok(pool)
}

/// Creates `database` on the server of `url` unless it exists.
async fn create_side_database(url: &str, database: &str) -> Result<(), sqlx::Error> {
    use sqlx::Connection as _;
    let mut server = url::Url::parse(url).map_err(|e| sqlx::Error::Configuration(e.into()))?;
    server.set_path("");
    let mut conn = MySqlConnection::connect(server.as_str()).await?;
    sqlx::query(&format!(
        "CREATE DATABASE IF NOT EXISTS `{database}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
    ))
    .execute(&mut conn)
    .await?;
    conn.close().await
}
