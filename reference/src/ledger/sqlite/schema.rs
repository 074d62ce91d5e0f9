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
    // 2: the same tables, STRICT: a value of the wrong type (an integer
    // that overflowed into REAL, text in an amount) is refused by SQLite
    // instead of stored. Rebuilt in place; a file holding such a value
    // fails this migration rather than carry it on.
    r#"
    CREATE TABLE accounts_strict (
        id             TEXT PRIMARY KEY,
        kind           TEXT NOT NULL CHECK (kind IN ('user', 'funding', 'in_flight')),
        currency       TEXT NOT NULL,
        balance_minor  INTEGER NOT NULL,
        created_at_ms  INTEGER NOT NULL,
        CHECK (kind <> 'user' OR balance_minor >= 0)
    ) STRICT, WITHOUT ROWID;

    -- Transfers whose payer lives on this shard.
    CREATE TABLE transfers_strict (
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
    ) STRICT, WITHOUT ROWID;

    -- Step (b) of cross-shard transfers whose payee lives on this shard.
    CREATE TABLE inbound_credits_strict (
        transfer_id    TEXT PRIMARY KEY,
        payer          TEXT NOT NULL,
        payee          TEXT NOT NULL,
        amount_minor   INTEGER NOT NULL CHECK (amount_minor > 0),
        currency       TEXT NOT NULL,
        payer_shard    INTEGER NOT NULL,
        outcome        TEXT NOT NULL CHECK (outcome IN ('credited', 'refused')),
        refusal_code   TEXT,
        created_at_ms  INTEGER NOT NULL
    ) STRICT, WITHOUT ROWID;

    -- Double entry: negative amounts debit, positive amounts credit. The
    -- entries of one shard sum to zero per currency.
    CREATE TABLE ledger_entries_strict (
        id             INTEGER PRIMARY KEY,
        transfer_id    TEXT NOT NULL,
        account_id     TEXT NOT NULL,
        amount_minor   INTEGER NOT NULL CHECK (amount_minor <> 0),
        currency       TEXT NOT NULL,
        created_at_ms  INTEGER NOT NULL
    ) STRICT;

    -- Transactional outbox: events written with the change they describe.
    CREATE TABLE outbox_strict (
        id              INTEGER PRIMARY KEY,
        event_id        TEXT NOT NULL UNIQUE,
        event_type      TEXT NOT NULL,
        aggregate_id    TEXT NOT NULL,
        payload         TEXT NOT NULL,
        created_at_ms   INTEGER NOT NULL,
        published_at_ms INTEGER
    ) STRICT;

    CREATE TABLE idempotency_keys_strict (
        scope           TEXT NOT NULL,
        key             TEXT NOT NULL,
        fingerprint     TEXT NOT NULL,
        resource_id     TEXT,
        response_status INTEGER,
        response_body   TEXT,
        created_at_ms   INTEGER NOT NULL,
        expires_at_ms   INTEGER NOT NULL,
        PRIMARY KEY (scope, key)
    ) STRICT, WITHOUT ROWID;
    INSERT INTO accounts_strict SELECT * FROM accounts;
    DROP TABLE accounts;
    ALTER TABLE accounts_strict RENAME TO accounts;
    INSERT INTO transfers_strict SELECT * FROM transfers;
    DROP TABLE transfers;
    ALTER TABLE transfers_strict RENAME TO transfers;
    INSERT INTO inbound_credits_strict SELECT * FROM inbound_credits;
    DROP TABLE inbound_credits;
    ALTER TABLE inbound_credits_strict RENAME TO inbound_credits;
    INSERT INTO ledger_entries_strict SELECT * FROM ledger_entries;
    DROP TABLE ledger_entries;
    ALTER TABLE ledger_entries_strict RENAME TO ledger_entries;
    INSERT INTO outbox_strict SELECT * FROM outbox;
    DROP TABLE outbox;
    ALTER TABLE outbox_strict RENAME TO outbox;
    INSERT INTO idempotency_keys_strict SELECT * FROM idempotency_keys;
    DROP TABLE idempotency_keys;
    ALTER TABLE idempotency_keys_strict RENAME TO idempotency_keys;
    CREATE INDEX transfers_pending ON transfers (created_at_ms) WHERE state = 'pending';
    CREATE INDEX ledger_entries_account ON ledger_entries (account_id, id);
    CREATE INDEX ledger_entries_transfer ON ledger_entries (transfer_id);
    CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_at_ms IS NULL;
    CREATE INDEX idempotency_keys_expiry ON idempotency_keys (expires_at_ms);
    "#,
    // 3: figures that do not grow with history. The shard's counts, kept in
    // the transaction of each change (one row here: one writer per file),
    // counted once from the tables for a file made before; each outbox
    // row's publish position (gap-free, in the order rows are staged for
    // the bus; rows already written are numbered in id order); the consumers'
    // snapshots, which say which published rows may be pruned.
    r#"
    CREATE TABLE shard_counters (
        slot                INTEGER PRIMARY KEY,
        accounts            INTEGER NOT NULL,
        transfers_pending   INTEGER NOT NULL,
        transfers_completed INTEGER NOT NULL,
        transfers_failed    INTEGER NOT NULL,
        outbox_rows         INTEGER NOT NULL,
        outbox_published    INTEGER NOT NULL
    ) STRICT;
    INSERT INTO shard_counters VALUES (0,
        (SELECT COUNT(*) FROM accounts WHERE kind = 'user'),
        (SELECT COUNT(*) FROM transfers WHERE state = 'pending'),
        (SELECT COUNT(*) FROM transfers WHERE state = 'completed'),
        (SELECT COUNT(*) FROM transfers WHERE state = 'failed'),
        (SELECT COUNT(*) FROM outbox),
        (SELECT COUNT(*) FROM outbox WHERE published_at_ms IS NOT NULL));
    ALTER TABLE outbox ADD COLUMN publish_position INTEGER;
    UPDATE outbox SET publish_position = ranked.n
      FROM (SELECT id, ROW_NUMBER() OVER (ORDER BY id) AS n FROM outbox) AS ranked
      WHERE outbox.id = ranked.id;
    CREATE UNIQUE INDEX outbox_position ON outbox (publish_position);
    CREATE TABLE outbox_cursor (
        singleton      INTEGER PRIMARY KEY CHECK (singleton = 1),
        last_position  INTEGER NOT NULL
    ) STRICT;
    INSERT INTO outbox_cursor VALUES (1, (SELECT COUNT(*) FROM outbox));
    CREATE TABLE consumer_snapshots (
        consumer       TEXT PRIMARY KEY,
        position       INTEGER NOT NULL,
        body           TEXT NOT NULL,
        updated_at_ms  INTEGER NOT NULL
    ) STRICT, WITHOUT ROWID;
    "#,
    // 4: resharding. A forwarding record for each account that moved away
    // from this shard (writes that still route it here are refused), and
    // the placement in force (kept on shard 0).
    r#"
    CREATE TABLE moved_accounts (
        id           TEXT PRIMARY KEY,
        to_shard     INTEGER NOT NULL,
        transfer_id  TEXT,
        moved_at_ms  INTEGER NOT NULL
    ) STRICT, WITHOUT ROWID;
    CREATE TABLE placement (
        singleton      INTEGER PRIMARY KEY CHECK (singleton = 1),
        strategy       TEXT NOT NULL,
        shards         INTEGER NOT NULL,
        version        INTEGER NOT NULL,
        updated_at_ms  INTEGER NOT NULL
    ) STRICT;
    "#,
    // 5: resharding, two guards. The placement a reshard is about to switch
    // to, written on every shard before its last pass: an account opened
    // here that this placement puts elsewhere is refused (a process that
    // routes by the older one). And the accounts arriving here whose
    // balance is still in flight: a debit they cannot pay yet waits.
    r#"
    CREATE TABLE create_fence (
        singleton      INTEGER PRIMARY KEY CHECK (singleton = 1),
        strategy       TEXT NOT NULL,
        shards         INTEGER NOT NULL,
        updated_at_ms  INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE arriving_accounts (
        id             TEXT PRIMARY KEY,
        since_ms       INTEGER NOT NULL
    ) STRICT, WITHOUT ROWID;
    "#,
    // 6: idempotency records in the order they were written, with a narrow
    // index on (scope, key). The table was clustered by the random key with
    // the stored response in the row, so each transfer inserted a wide row
    // into a random page of a table that grew with history; now the rows
    // append at its end and only the index takes a random insert.
    r#"
    CREATE TABLE idempotency_keys_appended (
        id              INTEGER PRIMARY KEY,
        scope           TEXT NOT NULL,
        key             TEXT NOT NULL,
        fingerprint     TEXT NOT NULL,
        resource_id     TEXT,
        response_status INTEGER,
        response_body   TEXT,
        created_at_ms   INTEGER NOT NULL,
        expires_at_ms   INTEGER NOT NULL,
        UNIQUE (scope, key)
    ) STRICT;
    INSERT INTO idempotency_keys_appended
        (scope, key, fingerprint, resource_id, response_status, response_body,
         created_at_ms, expires_at_ms)
      SELECT scope, key, fingerprint, resource_id, response_status, response_body,
             created_at_ms, expires_at_ms
      FROM idempotency_keys ORDER BY created_at_ms;
    DROP TABLE idempotency_keys;
    ALTER TABLE idempotency_keys_appended RENAME TO idempotency_keys;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_are_strict_so_a_wrong_type_is_refused_not_stored() {
        let mut conn = Connection::open_in_memory().unwrap();
        // A file made by the first release, with a row in it, migrates.
        let tx = conn.transaction().unwrap();
        tx.execute_batch(MIGRATIONS[0]).unwrap();
        tx.pragma_update(None, "user_version", 1).unwrap();
        tx.execute(
            "INSERT INTO accounts VALUES ('alice', 'user', 'INR', 450, 1)",
            [],
        )
        .unwrap();
        tx.commit().unwrap();
        migrate(&mut conn).unwrap();
        let balance: i64 = conn
            .query_row(
                "SELECT balance_minor FROM accounts WHERE id = 'alice'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(balance, 450, "rows survive the rebuild");
        // An integer past i64 once became a REAL silently; now refused.
        let overflow = conn.execute(
            "UPDATE accounts SET balance_minor = balance_minor * 1e30 WHERE id = 'alice'",
            [],
        );
        assert!(overflow.is_err(), "a REAL in an INTEGER column is refused");
        let text = conn.execute(
            "INSERT INTO ledger_entries (transfer_id, account_id, amount_minor, currency, created_at_ms)
             VALUES ('t', 'alice', 'ten', 'INR', 1)",
            [],
        );
        assert!(text.is_err(), "text in an amount is refused");
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64);
    }

    #[test]
    fn idempotency_records_append_in_write_order_and_keep_their_keys_unique() {
        let mut conn = Connection::open_in_memory().unwrap();
        // A file of the release before, with two records, migrates.
        let tx = conn.transaction().unwrap();
        for migration in &MIGRATIONS[..5] {
            tx.execute_batch(migration).unwrap();
        }
        tx.pragma_update(None, "user_version", 5).unwrap();
        let insert = "INSERT INTO idempotency_keys
            (scope, key, fingerprint, resource_id, response_status, response_body,
             created_at_ms, expires_at_ms)
            VALUES (?1, ?2, 'f', 't', 201, '{}', ?3, ?3 + 100)";
        tx.execute(insert, rusqlite::params!["alice", "zz-late", 2])
            .unwrap();
        tx.execute(insert, rusqlite::params!["alice", "aa-early", 1])
            .unwrap();
        tx.commit().unwrap();
        migrate(&mut conn).unwrap();

        // Rows sit in the order they were written, not in key order: the
        // two old ones by their time, a new one after them whatever its key.
        conn.execute(insert, rusqlite::params!["bob", "0-first-in-key-order", 3])
            .unwrap();
        let keys: Vec<String> = conn
            .prepare("SELECT key FROM idempotency_keys ORDER BY id")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(keys, ["aa-early", "zz-late", "0-first-in-key-order"]);

        // A key is still held once per scope, and found through the index.
        let again = conn.execute(insert, rusqlite::params!["alice", "zz-late", 4]);
        assert!(
            again.is_err(),
            "a second record under the same key is refused"
        );
        conn.execute(insert, rusqlite::params!["bob", "zz-late", 4])
            .unwrap();
        let plan: String = conn
            .query_row(
                "EXPLAIN QUERY PLAN SELECT response_body FROM idempotency_keys
                 WHERE scope = 'alice' AND key = 'zz-late'",
                [],
                |r| r.get(3),
            )
            .unwrap();
        assert!(plan.contains("USING INDEX"), "{plan}");
    }
}
