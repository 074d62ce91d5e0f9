//! The embedded backend: one SQLite file per shard, in WAL mode, written by
//! one thread per file (see `worker`).

mod schema;
mod worker;

pub use worker::Writer;

use std::path::{Path, PathBuf};

use std::future::Future;
use std::task::{Context, Poll, Waker};

use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::Connection;

use super::book::{self, Cell, Dialect, Param, Row, Session};
use super::StoreError;
use crate::ids::ShardId;
pub use schema::MIGRATIONS;
use worker::Readers;

/// How a commit reaches the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// `synchronous=FULL`: a committed transfer survives power loss.
    Full,
    /// `synchronous=NORMAL`: survives a process crash; the last commits may
    /// be lost on power loss. Faster.
    Normal,
}

#[derive(Debug, Clone)]
pub struct SqliteConfig {
    pub durability: Durability,
    /// Reader threads (and connections) per shard file.
    pub readers_per_shard: usize,
}

impl Default for SqliteConfig {
    fn default() -> Self {
        SqliteConfig {
            durability: Durability::Full,
            readers_per_shard: 2,
        }
    }
}

/// WAL pages between automatic checkpoints (SQLite's default is 1,000).
/// A checkpoint writes each page the WAL holds once, however many commits
/// changed it: the accounts' pages and the tails of the append-only tables
/// change in nearly every commit, so a longer WAL writes them back far
/// fewer times. The WAL file grows to about 64 MiB per shard.
const WAL_CHECKPOINT_PAGES: i64 = 16_000;

/// How long a connection waits on a lock held by another process before
/// the shard reports itself unavailable.
const BUSY_TIMEOUT_MS: u64 = 5_000;

pub struct SqliteShard {
    shard: ShardId,
    path: PathBuf,
    writer: Writer,
    readers: Readers,
}

impl SqliteShard {
    /// The file of `shard` inside `dir`.
    pub fn file_path(dir: &Path, shard: ShardId) -> PathBuf {
        dir.join(format!("shard-{shard}.sqlite3"))
    }

    /// Opens (creating if needed) the file of `shard` in `dir` and brings its
    /// schema up to date.
    pub fn open(dir: &Path, shard: ShardId, config: &SqliteConfig) -> anyhow::Result<SqliteShard> {
        let path = Self::file_path(dir, shard);
        let mut conn = open_write_connection(&path, config)?;
        schema::migrate(&mut conn)?;
        let readers = (0..config.readers_per_shard.max(1))
            .map(|_| open_connection(&path, config))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(SqliteShard {
            shard,
            path,
            writer: Writer::spawn(shard, conn),
            readers: Readers::spawn(shard, readers),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens (creating if needed) the file of `shard` in `dir` with the
    /// system's schema and returns its writer thread alone: the storage
    /// with the same connection settings and group commit the system
    /// uses, for a baseline that measures the files themselves.
    pub fn open_writer(
        dir: &Path,
        shard: ShardId,
        config: &SqliteConfig,
    ) -> anyhow::Result<Writer> {
        let path = Self::file_path(dir, shard);
        let mut conn = open_write_connection(&path, config)?;
        schema::migrate(&mut conn)?;
        Ok(Writer::spawn(shard, conn))
    }
}

/// Runs `$body` (using `$s: &mut SqliteSession`) as one job of the shard's
/// writer: inside its group commit's transaction, rolled back alone when it
/// answers an error.
macro_rules! writing {
    ($self:ident, |$s:ident| $body:expr) => {{
        let shard = $self.shard;
        $self
            .writer
            .write(move |conn| {
                let mut session = SqliteSession { conn, shard };
                let $s = &mut session;
                run_now(shard, $body)
            })
            .await
    }};
}

/// Runs `$body` (using `$s: &mut SqliteSession`) on a reader thread.
macro_rules! reading {
    ($self:ident, |$s:ident| $body:expr) => {{
        let shard = $self.shard;
        $self
            .readers
            .read(move |conn| {
                let mut session = SqliteSession { conn, shard };
                let $s = &mut session;
                run_now(shard, $body)
            })
            .await
    }};
}

/// Completes a ledger function on the thread that owns the connection. A
/// SQLite session never waits (its calls are plain function calls), so
/// the future is ready at the first poll.
fn run_now<T>(
    shard: ShardId,
    future: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    let mut future = std::pin::pin!(future);
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(result) => result,
        Poll::Pending => Err(book::corrupt(
            shard,
            "a SQLite ledger call waited, which it never should".into(),
        )),
    }
}

/// Opens the writer's connection: as a reader's, and it keeps each job's
/// savepoint journal in memory and checkpoints the WAL in large steps.
fn open_write_connection(path: &Path, config: &SqliteConfig) -> anyhow::Result<Connection> {
    let conn = open_connection(path, config)?;
    // Every job runs inside its own savepoint, and SQLite journals the
    // original of each page a savepoint changes. On a temporary file that
    // journal cost a write system call and a copy per page, about 60 KiB
    // per transfer, growing with the depth of the indexes; in memory it is
    // a copy.
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    conn.pragma_update(None, "wal_autocheckpoint", WAL_CHECKPOINT_PAGES)?;
    Ok(conn)
}

fn open_connection(path: &Path, config: &SqliteConfig) -> anyhow::Result<Connection> {
    let conn = Connection::open(path)
        .map_err(|e| anyhow::anyhow!("cannot open shard file {}: {e}", path.display()))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    let synchronous = match config.durability {
        Durability::Full => "FULL",
        Durability::Normal => "NORMAL",
    };
    conn.pragma_update(None, "synchronous", synchronous)?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.busy_timeout(std::time::Duration::from_millis(BUSY_TIMEOUT_MS))?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

/// Maps a SQLite error to the storage error callers handle: lock waits,
/// I/O errors and full disks make the shard unavailable (retry later);
/// anything else is internal.
pub(crate) fn store_error(shard: ShardId, error: rusqlite::Error) -> StoreError {
    use rusqlite::ErrorCode::*;
    let unavailable = matches!(
        error.sqlite_error_code(),
        Some(DatabaseBusy | DatabaseLocked | SystemIoFailure | DiskFull | CannotOpen)
    );
    let reason = error.to_string();
    if unavailable {
        StoreError::Unavailable { shard, reason }
    } else {
        StoreError::Internal { shard, reason }
    }
}

/// A SQLite connection as a ledger session: statements are cached per
/// connection, nothing is locked (one writer per file).
struct SqliteSession<'a> {
    conn: &'a Connection,
    shard: ShardId,
}

const DIALECT: Dialect = Dialect {
    insert_system_account: "INSERT OR IGNORE INTO accounts
        (id, kind, currency, balance_minor, created_at_ms) VALUES (?, ?, ?, 0, ?)",
    purge_expired: "DELETE FROM idempotency_keys WHERE (scope, `key`) IN (
        SELECT scope, `key` FROM idempotency_keys WHERE expires_at_ms <= ? LIMIT ?)",
    begin_snapshot: &["BEGIN"],
    counter_slots: 1,
    save_snapshot: "INSERT INTO consumer_snapshots (consumer, position, body, updated_at_ms)
        VALUES (?, ?, ?, ?) ON CONFLICT (consumer) DO UPDATE SET position = excluded.position,
        body = excluded.body, updated_at_ms = excluded.updated_at_ms
        WHERE excluded.position > consumer_snapshots.position",
};

impl rusqlite::ToSql for Param<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match *self {
            Param::Int(v) => ValueRef::Integer(v),
            Param::Text(t) => ValueRef::Text(t.as_bytes()),
            Param::Null => ValueRef::Null,
        }))
    }
}

fn cell(value: ValueRef<'_>) -> Cell {
    match value {
        ValueRef::Null => Cell::Null,
        ValueRef::Integer(v) => Cell::Int(v),
        ValueRef::Text(t) | ValueRef::Blob(t) => {
            Cell::Text(String::from_utf8_lossy(t).into_owned())
        }
        // STRICT tables hold no REAL; a computed one is shown as text.
        ValueRef::Real(v) => Cell::Text(v.to_string()),
    }
}

impl Session for SqliteSession<'_> {
    fn shard(&self) -> ShardId {
        self.shard
    }

    fn dialect(&self) -> &'static Dialect {
        &DIALECT
    }

    fn locks_rows(&self) -> bool {
        false
    }

    async fn execute(&mut self, sql: &str, params: &[Param<'_>]) -> Result<u64, StoreError> {
        self.conn
            .prepare_cached(sql)
            .and_then(|mut s| s.execute(rusqlite::params_from_iter(params)))
            .map(|n| n as u64)
            .map_err(|e| store_error(self.shard, e))
    }

    async fn rows(&mut self, sql: &str, params: &[Param<'_>]) -> Result<Vec<Row>, StoreError> {
        let shard = self.shard;
        let read = || -> rusqlite::Result<Vec<Row>> {
            let mut statement = self.conn.prepare_cached(sql)?;
            let columns = statement.column_count();
            let mut rows = statement.query(rusqlite::params_from_iter(params))?;
            let mut out = Vec::new();
            while let Some(r) = rows.next()? {
                let cells = (0..columns)
                    .map(|i| r.get_ref(i).map(cell))
                    .collect::<rusqlite::Result<Vec<Cell>>>()?;
                out.push(Row { cells, shard });
            }
            Ok(out)
        };
        read().map_err(|e| store_error(shard, e))
    }
}

book::shard_store!(SqliteShard, writing, reading);

#[cfg(test)]
mod tests {
    use super::*;

    /// The writer keeps its savepoint journals in memory and checkpoints in
    /// large steps; readers keep SQLite's defaults (a reader's large sort
    /// may spill to a temporary file rather than fill memory).
    #[tokio::test]
    async fn the_writer_journals_savepoints_in_memory_and_checkpoints_in_large_steps() {
        let dir = tempfile::tempdir().unwrap();
        let id = ShardId::new(0).unwrap();
        let shard = SqliteShard::open(dir.path(), id, &SqliteConfig::default()).unwrap();
        let pragma = |name: &'static str| {
            move |conn: &Connection| {
                conn.query_row(&format!("PRAGMA {name}"), [], |r| r.get::<_, i64>(0))
                    .map_err(|e| store_error(id, e))
            }
        };
        // 2 is MEMORY.
        assert_eq!(shard.writer.write(pragma("temp_store")).await.unwrap(), 2);
        assert_eq!(
            shard
                .writer
                .write(pragma("wal_autocheckpoint"))
                .await
                .unwrap(),
            WAL_CHECKPOINT_PAGES
        );
        assert_eq!(shard.readers.read(pragma("temp_store")).await.unwrap(), 0);
        shard.writer.close();
    }
}
