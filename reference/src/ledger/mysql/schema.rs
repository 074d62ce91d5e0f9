//! The shard schema on MySQL/MariaDB, as numbered migrations applied in
//! order and recorded in `schema_migrations`. The same tables as the
//! embedded backend; ids compare as bytes (`utf8mb4_bin`), as in SQLite, so
//! both backends list accounts in the same order.

use sqlx::MySqlPool;

/// Each entry is one migration, a list of statements. Append only. A
/// statement is a step of its own (see `migrate`): a DDL statement must be
/// one atomic change that, run again after it took effect, fails with one
/// of `ALREADY_THERE` (or changes nothing); data statements are
/// `INSERT`, `UPDATE` or `DELETE` only.
pub const MIGRATIONS: &[&[&str]] = &[
    // 1: the ledger.
    &[
        r#"CREATE TABLE accounts (
            id             VARCHAR(64) NOT NULL PRIMARY KEY,
            kind           VARCHAR(16) NOT NULL CHECK (kind IN ('user', 'funding', 'in_flight')),
            currency       CHAR(3) NOT NULL,
            balance_minor  BIGINT NOT NULL,
            created_at_ms  BIGINT NOT NULL,
            CONSTRAINT user_balance_not_negative CHECK (kind <> 'user' OR balance_minor >= 0)
        ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin"#,
        r#"CREATE TABLE transfers (
            id             VARCHAR(64) NOT NULL PRIMARY KEY,
            payer          VARCHAR(64) NOT NULL,
            payee          VARCHAR(64) NOT NULL,
            amount_minor   BIGINT NOT NULL CHECK (amount_minor > 0),
            currency       CHAR(3) NOT NULL,
            payer_shard    INT NOT NULL,
            payee_shard    INT NOT NULL,
            state          VARCHAR(16) NOT NULL CHECK (state IN ('pending', 'completed', 'failed')),
            failure_code   VARCHAR(64) NULL,
            created_at_ms  BIGINT NOT NULL,
            updated_at_ms  BIGINT NOT NULL,
            KEY transfers_state (state, created_at_ms)
        ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin"#,
        r#"CREATE TABLE inbound_credits (
            transfer_id    VARCHAR(64) NOT NULL PRIMARY KEY,
            payer          VARCHAR(64) NOT NULL,
            payee          VARCHAR(64) NOT NULL,
            amount_minor   BIGINT NOT NULL CHECK (amount_minor > 0),
            currency       CHAR(3) NOT NULL,
            payer_shard    INT NOT NULL,
            outcome        VARCHAR(16) NOT NULL CHECK (outcome IN ('credited', 'refused')),
            refusal_code   VARCHAR(64) NULL,
            created_at_ms  BIGINT NOT NULL
        ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin"#,
        r#"CREATE TABLE ledger_entries (
            id             BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
            transfer_id    VARCHAR(80) NOT NULL,
            account_id     VARCHAR(80) NOT NULL,
            amount_minor   BIGINT NOT NULL CHECK (amount_minor <> 0),
            currency       CHAR(3) NOT NULL,
            created_at_ms  BIGINT NOT NULL,
            KEY ledger_entries_account (account_id, id),
            KEY ledger_entries_transfer (transfer_id)
        ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin"#,
        r#"CREATE TABLE outbox (
            id              BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
            event_id        CHAR(32) NOT NULL UNIQUE,
            event_type      VARCHAR(64) NOT NULL,
            aggregate_id    VARCHAR(80) NOT NULL,
            payload         TEXT NOT NULL,
            created_at_ms   BIGINT NOT NULL,
            published_at_ms BIGINT NULL,
            KEY outbox_unpublished (published_at_ms, id)
        ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin"#,
        r#"CREATE TABLE idempotency_keys (
            scope           VARCHAR(64) NOT NULL,
            `key`           VARCHAR(255) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
            fingerprint     VARCHAR(128) NOT NULL,
            resource_id     VARCHAR(80) NULL,
            response_status SMALLINT UNSIGNED NULL,
            response_body   MEDIUMTEXT NULL,
            created_at_ms   BIGINT NOT NULL,
            expires_at_ms   BIGINT NOT NULL,
            PRIMARY KEY (scope, `key`),
            KEY idempotency_keys_expiry (expires_at_ms)
        ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin"#,
    ],
    // 2: which shard of how many this database is, so a database cannot be
    // opened as another shard, or under another shard count.
    &[r#"CREATE TABLE shard_identity (
            singleton    TINYINT NOT NULL PRIMARY KEY CHECK (singleton = 1),
            shard_index  INT NOT NULL,
            shard_count  INT NOT NULL
        ) ENGINE=InnoDB"#],
    // 3: the decision log of two-phase (XA) transfers this shard
    // coordinates. A decision is written once: the coordinator's `commit`
    // and recovery's `abort` race on the primary key.
    &[r#"CREATE TABLE xa_decisions (
            gtrid          VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL PRIMARY KEY,
            decision       VARCHAR(8) NOT NULL CHECK (decision IN ('commit', 'abort')),
            created_at_ms  BIGINT NOT NULL,
            KEY xa_decisions_age (created_at_ms)
        ) ENGINE=InnoDB"#],
    // 4: figures that do not grow with history. The shard's counts, kept in
    // the transaction of each change, striped over `COUNTER_SLOTS` rows
    // (a transaction updates one, so transfers do not queue on one row
    // lock) and counted once from the tables into slot 0; each outbox
    // row's publish position (gap-free, in the order rows are staged for
    // the bus; rows already written are numbered in id order); the consumers'
    // snapshots, which say which published rows may be pruned.
    &[
        r#"CREATE TABLE shard_counters (
            slot                INT NOT NULL PRIMARY KEY,
            accounts            BIGINT NOT NULL,
            transfers_pending   BIGINT NOT NULL,
            transfers_completed BIGINT NOT NULL,
            transfers_failed    BIGINT NOT NULL,
            outbox_rows         BIGINT NOT NULL,
            outbox_published    BIGINT NOT NULL
        ) ENGINE=InnoDB"#,
        r#"INSERT INTO shard_counters SELECT 0,
            (SELECT COUNT(*) FROM accounts WHERE kind = 'user'),
            (SELECT COUNT(*) FROM transfers WHERE state = 'pending'),
            (SELECT COUNT(*) FROM transfers WHERE state = 'completed'),
            (SELECT COUNT(*) FROM transfers WHERE state = 'failed'),
            (SELECT COUNT(*) FROM outbox),
            (SELECT COUNT(*) FROM outbox WHERE published_at_ms IS NOT NULL)"#,
        r#"INSERT INTO shard_counters VALUES
            (1, 0, 0, 0, 0, 0, 0), (2, 0, 0, 0, 0, 0, 0), (3, 0, 0, 0, 0, 0, 0),
            (4, 0, 0, 0, 0, 0, 0), (5, 0, 0, 0, 0, 0, 0), (6, 0, 0, 0, 0, 0, 0),
            (7, 0, 0, 0, 0, 0, 0), (8, 0, 0, 0, 0, 0, 0), (9, 0, 0, 0, 0, 0, 0),
            (10, 0, 0, 0, 0, 0, 0), (11, 0, 0, 0, 0, 0, 0), (12, 0, 0, 0, 0, 0, 0),
            (13, 0, 0, 0, 0, 0, 0), (14, 0, 0, 0, 0, 0, 0), (15, 0, 0, 0, 0, 0, 0)"#,
        r#"ALTER TABLE outbox ADD COLUMN publish_position BIGINT NULL,
            ADD UNIQUE KEY outbox_position (publish_position)"#,
        r#"UPDATE outbox o
            JOIN (SELECT id, ROW_NUMBER() OVER (ORDER BY id) AS n FROM outbox) ranked
              ON o.id = ranked.id
            SET o.publish_position = ranked.n"#,
        r#"CREATE TABLE outbox_cursor (
            singleton      TINYINT NOT NULL PRIMARY KEY CHECK (singleton = 1),
            last_position  BIGINT NOT NULL
        ) ENGINE=InnoDB"#,
        "INSERT INTO outbox_cursor SELECT 1, COUNT(*) FROM outbox",
        r#"CREATE TABLE consumer_snapshots (
            consumer       VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL PRIMARY KEY,
            position       BIGINT NOT NULL,
            body           MEDIUMTEXT NOT NULL,
            updated_at_ms  BIGINT NOT NULL
        ) ENGINE=InnoDB"#,
    ],
    // 5: resharding. A forwarding record for each account that moved away
    // from this shard (writes that still route it here are refused), and
    // the placement in force (kept on shard 0).
    &[
        r#"CREATE TABLE moved_accounts (
            id           VARCHAR(64) NOT NULL PRIMARY KEY,
            to_shard     INT NOT NULL,
            transfer_id  VARCHAR(64) NULL,
            moved_at_ms  BIGINT NOT NULL
        ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin"#,
        r#"CREATE TABLE placement (
            singleton      TINYINT NOT NULL PRIMARY KEY CHECK (singleton = 1),
            strategy       VARCHAR(16) NOT NULL,
            shards         INT NOT NULL,
            version        BIGINT NOT NULL,
            updated_at_ms  BIGINT NOT NULL
        ) ENGINE=InnoDB"#,
    ],
    // 6: resharding, two guards. The placement a reshard is about to switch
    // to, written on every shard before its last pass: an account opened
    // here that this placement puts elsewhere is refused (a process that
    // routes by the older one). And the accounts arriving here whose
    // balance is still in flight: a debit they cannot pay yet waits.
    &[
        r#"CREATE TABLE create_fence (
            singleton      TINYINT NOT NULL PRIMARY KEY CHECK (singleton = 1),
            strategy       VARCHAR(16) NOT NULL,
            shards         INT NOT NULL,
            updated_at_ms  BIGINT NOT NULL
        ) ENGINE=InnoDB"#,
        r#"CREATE TABLE arriving_accounts (
            id             VARCHAR(64) NOT NULL PRIMARY KEY,
            since_ms       BIGINT NOT NULL
        ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin"#,
    ],
    // 7: idempotency records clustered in the order they were written, with
    // a narrow unique index on (scope, key). InnoDB clustered them by the
    // random key with the stored response in the row, so each transfer
    // inserted a wide row into a random page; now the rows append at the
    // end and only the index takes a random insert. One statement: InnoDB
    // applies it whole or not at all; a crash after it and before its step
    // is recorded is resumed like any other (see `migrate`).
    &[r#"ALTER TABLE idempotency_keys
            DROP PRIMARY KEY,
            ADD COLUMN id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY FIRST,
            ADD UNIQUE KEY idempotency_keys_scope_key (scope, `key`)"#],
];

/// Rows of `shard_counters` (migration 4 makes slots 0 to 15).
pub const COUNTER_SLOTS: i64 = 16;

#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("shard database is at schema version {found}, newer than this build knows ({known}); use a newer shardpay")]
    TooNew { found: i64, known: i64 },
    #[error("another process has held the schema migration lock for 60 s; is a migration stuck? (see SHOW PROCESSLIST)")]
    Locked,
    #[error(transparent)]
    Sql(#[from] sqlx::Error),
}

/// Brings the database's schema up to date.
///
/// DDL commits on its own in MySQL, so a migration cannot be one
/// transaction. Instead each statement is a step, recorded in
/// `schema_migration_steps` once it has run, and the next start goes on
/// from the first step not recorded:
/// - a statement that changes rows (`INSERT`, `UPDATE`) runs in one
///   transaction with its step's record, so it is applied exactly once;
/// - a DDL statement (each is one atomic change in InnoDB) that a crash
///   left applied but not recorded fails again with "already exists"
///   (table, column, key or primary key), which is taken as done.
///
/// The version row is written when every step of a migration is.
pub async fn migrate(pool: &MySqlPool) -> Result<(), MigrationError> {
    migrate_until(pool, None).await
}

/// Where [`migrate_interrupted`] stops: after running the statement
/// `step` (from 0) of migration `version` (from 1), before recording it.
#[doc(hidden)]
#[derive(Debug, Clone, Copy)]
pub struct Interrupt {
    pub version: usize,
    pub step: usize,
}

/// As a process killed at `at`: migrates up to that statement, runs it,
/// and stops without recording it. For tests of the resume.
#[doc(hidden)]
pub async fn migrate_interrupted(pool: &MySqlPool, at: Interrupt) -> Result<(), MigrationError> {
    migrate_until(pool, Some(at)).await
}

async fn migrate_until(pool: &MySqlPool, stop: Option<Interrupt>) -> Result<(), MigrationError> {
    // Services of a split deployment start at once against the same
    // databases: one migrates, the others wait on this named lock (held by
    // the connection, so freed if its holder dies) and find it done.
    let mut conn = pool.acquire().await?;
    let locked: Option<i64> =
        sqlx::query_scalar("SELECT GET_LOCK(CONCAT('shardpay_migrate:', DATABASE()), 60)")
            .fetch_one(&mut *conn)
            .await?;
    if locked != Some(1) {
        return Err(MigrationError::Locked);
    }
    let result = migrate_locked(&mut conn, stop).await;
    let _ = sqlx::query("SELECT RELEASE_LOCK(CONCAT('shardpay_migrate:', DATABASE()))")
        .execute(&mut *conn)
        .await;
    result
}

/// MySQL's errors for a DDL statement whose change is already there:
/// table exists (1050), duplicate column (1060), duplicate key name
/// (1061). Each migration's DDL statement must fail with one of these when
/// run a second time (its first change being one of them), or be
/// idempotent itself.
const ALREADY_THERE: [u16; 3] = [1050, 1060, 1061];

fn already_there(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(db) => db
            .try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
            .is_some_and(|e| ALREADY_THERE.contains(&e.number())),
        _ => false,
    }
}

/// Whether a statement changes rows (and so can share a transaction with
/// its step's record) rather than the schema.
fn changes_rows(sql: &str) -> bool {
    let head = sql.trim_start();
    ["INSERT", "UPDATE", "DELETE"]
        .iter()
        .any(|verb| head.len() >= verb.len() && head[..verb.len()].eq_ignore_ascii_case(verb))
}

async fn migrate_locked(
    conn: &mut sqlx::MySqlConnection,
    stop: Option<Interrupt>,
) -> Result<(), MigrationError> {
    for table in [
        "CREATE TABLE IF NOT EXISTS schema_migrations (
            version BIGINT NOT NULL PRIMARY KEY,
            applied_at_ms BIGINT NOT NULL
        ) ENGINE=InnoDB",
        "CREATE TABLE IF NOT EXISTS schema_migration_steps (
            version BIGINT NOT NULL,
            step INT NOT NULL,
            applied_at_ms BIGINT NOT NULL,
            PRIMARY KEY (version, step)
        ) ENGINE=InnoDB",
    ] {
        sqlx::query(table).execute(&mut *conn).await?;
    }
    let found: Option<i64> = sqlx::query_scalar("SELECT MAX(version) FROM schema_migrations")
        .fetch_one(&mut *conn)
        .await?;
    let found = found.unwrap_or(0);
    let known = MIGRATIONS.len() as i64;
    if found > known {
        return Err(MigrationError::TooNew { found, known });
    }
    for (index, statements) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let version = index as i64 + 1;
        let done: Vec<i32> =
            sqlx::query_scalar("SELECT step FROM schema_migration_steps WHERE version = ?")
                .bind(version)
                .fetch_all(&mut *conn)
                .await?;
        for (step, sql) in statements.iter().enumerate() {
            if done.contains(&(step as i32)) {
                continue;
            }
            let interrupted =
                stop.is_some_and(|at| at.version == version as usize && at.step == step);
            if changes_rows(sql) {
                let mut tx = sqlx::Connection::begin(&mut *conn).await?;
                sqlx::query(sql).execute(&mut *tx).await?;
                if interrupted {
                    // Killed before the commit: the change is rolled back.
                    drop(tx);
                    return Ok(());
                }
                record_step(&mut tx, version, step).await?;
                tx.commit().await?;
                continue;
            }
            match sqlx::query(sql).execute(&mut *conn).await {
                Ok(_) => {}
                // Applied before a crash that came before its record.
                Err(e) if already_there(&e) => {}
                Err(e) => return Err(e.into()),
            }
            if interrupted {
                return Ok(());
            }
            record_step(conn, version, step).await?;
        }
        sqlx::query("INSERT INTO schema_migrations (version, applied_at_ms) VALUES (?, ?)")
            .bind(version)
            .bind(super::super::now_ms())
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// Records that statement `step` of migration `version` has run.
async fn record_step(
    conn: &mut sqlx::MySqlConnection,
    version: i64,
    step: usize,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO schema_migration_steps (version, step, applied_at_ms) VALUES (?, ?, ?)",
    )
    .bind(version)
    .bind(step as i32)
    .bind(super::super::now_ms())
    .execute(conn)
    .await?;
    Ok(())
}
