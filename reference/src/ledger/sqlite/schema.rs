//! The shard schema, as numbered migrations applied in order. The number of
//! migrations applied is kept in SQLite's `user_version`; a file from a newer
//! release (a higher number than this build knows) is refused.

use rusqlite::Connection;

/// Each entry is one migration. Append only: never edit a released one.
pub const MIGRATIONS: &[&str] = &[
    // 1: the ledger.
    r#"
    CREATE TABLE accounts (
        id             TEXT PRIMARY KEY,
        kind           TEXT NOT NULL CHECK (kind IN ('user', 'funding', 'in_flight')),
        currency       TEXT NOT NULL,
        balance_minor  INTEGER NOT NULL,
        created_at_ms  INTEGER NOT NULL,
        CHECK (kind <> 'user' OR balance_minor >= 0)
    ) WITHOUT ROWID;

    -- Transfers whose payer lives on this shard.
    CREATE TABLE transfers (
        id             TEXT PRIMARY KEY,
        payer          TEXT NOT NULL,
        payee          TEXT NOT NULL,
        amount_minor   INTEGER NOT NULL CHECK (amount_minor > 0),
        currency       TEXT NOT NULL,
        payer_shard    INTEGER NOT NULL,
        payee_shard    INTEGER NOT NULL,
        state          TEXT NOT NULL CHECK (state IN ('pending', 'completed', 'failed')),
        failure_code   TEXT,
        created_at_ms  INTEGER NOT NULL,
        updated_at_ms  INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX transfers_pending ON transfers (created_at_ms) WHERE state = 'pending';

    -- Step (b) of cross-shard transfers whose payee lives on this shard.
    CREATE TABLE inbound_credits (
        transfer_id    TEXT PRIMARY KEY,
        payer          TEXT NOT NULL,
        payee          TEXT NOT NULL,
        amount_minor   INTEGER NOT NULL CHECK (amount_minor > 0),
        currency       TEXT NOT NULL,
        payer_shard    INTEGER NOT NULL,
        outcome        TEXT NOT NULL CHECK (outcome IN ('credited', 'refused')),
        refusal_code   TEXT,
        created_at_ms  INTEGER NOT NULL
    ) WITHOUT ROWID;

    -- Double entry: negative amounts debit, positive amounts credit. The
    -- entries of one shard sum to zero per currency.
    CREATE TABLE ledger_entries (
        id             INTEGER PRIMARY KEY,
        transfer_id    TEXT NOT NULL,
        account_id     TEXT NOT NULL,
        amount_minor   INTEGER NOT NULL CHECK (amount_minor <> 0),
        currency       TEXT NOT NULL,
        created_at_ms  INTEGER NOT NULL
    );
    CREATE INDEX ledger_entries_account ON ledger_entries (account_id, id);
    CREATE INDEX ledger_entries_transfer ON ledger_entries (transfer_id);

    -- Transactional outbox: events written with the change they describe.
    CREATE TABLE outbox (
        id              INTEGER PRIMARY KEY,
        event_id        TEXT NOT NULL UNIQUE,
        event_type      TEXT NOT NULL,
        aggregate_id    TEXT NOT NULL,
        payload         TEXT NOT NULL,
        created_at_ms   INTEGER NOT NULL,
        published_at_ms INTEGER
    );
    CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_at_ms IS NULL;

    CREATE TABLE idempotency_keys (
        scope           TEXT NOT NULL,
        key             TEXT NOT NULL,
        fingerprint     TEXT NOT NULL,
        resource_id     TEXT,
        response_status INTEGER,
        response_body   TEXT,
        created_at_ms   INTEGER NOT NULL,
        expires_at_ms   INTEGER NOT NULL,
        PRIMARY KEY (scope, key)
    ) WITHOUT ROWID;
    CREATE INDEX idempotency_keys_expiry ON idempotency_keys (expires_at_ms);
    "#,
];

#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("shard file is at schema version {found}, newer than this build knows ({known}); use a newer shardpay")]
    TooNew { found: i64, known: i64 },
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
}

/// Brings the file's schema up to date. Each migration commits on its own.
pub fn migrate(conn: &mut Connection) -> Result<(), MigrationError> {
    let found: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let known = MIGRATIONS.len() as i64;
    if found > known {
        return Err(MigrationError::TooNew { found, known });
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", index as i64 + 1)?;
        tx.commit()?;
    }
    Ok(())
}
