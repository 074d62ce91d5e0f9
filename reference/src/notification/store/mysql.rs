//! Notification state in a MySQL/MariaDB database of its own, which every
//! notification replica shares. Each claim is one row: taken by inserting
//! it (a duplicate key is someone else's claim) or by a conditional
//! `UPDATE` of a row whose lease has ended (InnoDB lets one such update
//! match; the other finds the row changed), so of two replicas at most one
//! holds a delivery at a time. Texts compare as bytes (`utf8mb4_bin`).

use async_trait::async_trait;
use sqlx::{MySqlConnection, MySqlPool};

use super::{
    Added, Claim, Lease, LetterClaim, NotificationStore, StoreError, StoredCounts, StoredHook,
};
use crate::events::Event;
use crate::ledger::mysql::{MysqlConfig, MAX_ATTEMPTS};
use crate::ledger::TimestampMs;
use crate::notification::MAX_WEBHOOKS_PER_ACCOUNT;
use crate::notification::{DeadLetter, Webhook, MAX_DEAD_LETTERS, MAX_WEBHOOKS};

/// The database the notification service uses on the first shard's
/// server when no URL of its own is given.
pub const DATABASE: &str = "shardpay_notify";

/// The tables, created at start when missing. When a table first changes,
/// number the changes as the shard schema does (`ledger/mysql/schema.rs`).
const TABLES: &[&str] = &[
    r#"CREATE TABLE IF NOT EXISTS webhooks (
        id             VARCHAR(64) NOT NULL PRIMARY KEY,
        account        VARCHAR(64) NOT NULL,
        slot           INT NOT NULL,
        url            VARCHAR(2048) NOT NULL,
        secret         VARCHAR(128) NOT NULL,
        created_at_ms  BIGINT NOT NULL,
        UNIQUE KEY webhooks_account_slot (account, slot)
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin"#,
    r#"CREATE TABLE IF NOT EXISTS applied_events (
        event_id       VARCHAR(128) NOT NULL PRIMARY KEY,
        outbox         TINYINT NOT NULL,
        applied_at_ms  BIGINT NOT NULL,
        KEY applied_events_outbox (outbox)
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin"#,
    r#"CREATE TABLE IF NOT EXISTS deliveries (
        event_id        VARCHAR(128) NOT NULL,
        webhook_id      VARCHAR(64) NOT NULL,
        state           VARCHAR(16) NOT NULL CHECK (state IN ('claimed', 'delivered', 'dead', 'dropped')),
        owner           VARCHAR(64) NOT NULL,
        lease_until_ms  BIGINT NOT NULL,
        event           MEDIUMTEXT NULL,
        attempts        BIGINT NOT NULL,
        letter_id       VARCHAR(64) NULL,
        event_type      VARCHAR(128) NULL,
        url             VARCHAR(2048) NULL,
        last_error      TEXT NULL,
        failed_at_ms    BIGINT NULL,
        PRIMARY KEY (event_id, webhook_id),
        UNIQUE KEY deliveries_letter (letter_id),
        KEY deliveries_by_lease (state, lease_until_ms),
        KEY deliveries_by_failure (state, failed_at_ms, letter_id),
        KEY deliveries_by_owner (owner, state)
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin"#,
    // What the stats report, kept by triggers in the transaction of each
    // change (counting rows would read all history on every scrape), in
    // COUNTER_SLOTS rows picked by event id so that replicas applying
    // different events do not wait on one row.
    r#"CREATE TABLE IF NOT EXISTS notify_counters (
        slot            INT NOT NULL PRIMARY KEY,
        applied         BIGINT NOT NULL DEFAULT 0,
        applied_outbox  BIGINT NOT NULL DEFAULT 0,
        delivered       BIGINT NOT NULL DEFAULT 0,
        failed          BIGINT NOT NULL DEFAULT 0,
        dead            BIGINT NOT NULL DEFAULT 0,
        dropped         BIGINT NOT NULL DEFAULT 0,
        claimed         BIGINT NOT NULL DEFAULT 0
    ) ENGINE=InnoDB"#,
    // A store made before the counters: the rows it has, counted once,
    // in slot 0, before the triggers exist (the service is not running
    // while it starts on a store of the old shape alone).
    r#"INSERT IGNORE INTO notify_counters (slot, applied, applied_outbox, delivered, failed, dead, dropped, claimed)
        SELECT 0,
            (SELECT COUNT(*) FROM applied_events),
            (SELECT COUNT(*) FROM applied_events WHERE outbox = 1),
            (SELECT COUNT(*) FROM deliveries WHERE state = 'delivered'),
            (SELECT COUNT(*) FROM deliveries WHERE failed_at_ms IS NOT NULL),
            (SELECT COUNT(*) FROM deliveries WHERE state = 'dead'),
            (SELECT COUNT(*) FROM deliveries WHERE state = 'dropped'),
            (SELECT COUNT(*) FROM deliveries WHERE state = 'claimed')
        FROM DUAL WHERE NOT EXISTS (SELECT 1 FROM notify_counters)"#,
    r#"INSERT IGNORE INTO notify_counters (slot)
        VALUES (0), (1), (2), (3), (4), (5), (6), (7), (8), (9), (10), (11), (12), (13), (14), (15)"#,
    r#"CREATE TRIGGER IF NOT EXISTS applied_events_count AFTER INSERT ON applied_events
        FOR EACH ROW UPDATE notify_counters
            SET applied = applied + 1, applied_outbox = applied_outbox + (NEW.outbox = 1)
            WHERE slot = CRC32(NEW.event_id) % 16"#,
    r#"CREATE TRIGGER IF NOT EXISTS deliveries_count_insert AFTER INSERT ON deliveries
        FOR EACH ROW UPDATE notify_counters SET
            delivered = delivered + (NEW.state = 'delivered'),
            failed = failed + (NEW.failed_at_ms IS NOT NULL),
            dead = dead + (NEW.state = 'dead'),
            dropped = dropped + (NEW.state = 'dropped'),
            claimed = claimed + (NEW.state = 'claimed')
            WHERE slot = CRC32(NEW.event_id) % 16"#,
    r#"CREATE TRIGGER IF NOT EXISTS deliveries_count_update AFTER UPDATE ON deliveries
        FOR EACH ROW UPDATE notify_counters SET
            delivered = delivered + (NEW.state = 'delivered') - (OLD.state = 'delivered'),
            failed = failed + (NEW.failed_at_ms IS NOT NULL) - (OLD.failed_at_ms IS NOT NULL),
            dead = dead + (NEW.state = 'dead') - (OLD.state = 'dead'),
            dropped = dropped + (NEW.state = 'dropped') - (OLD.state = 'dropped'),
            claimed = claimed + (NEW.state = 'claimed') - (OLD.state = 'claimed')
            WHERE slot = CRC32(NEW.event_id) % 16"#,
    r#"CREATE TRIGGER IF NOT EXISTS deliveries_count_delete AFTER DELETE ON deliveries
        FOR EACH ROW UPDATE notify_counters SET
            delivered = delivered - (OLD.state = 'delivered'),
            failed = failed - (OLD.failed_at_ms IS NOT NULL),
            dead = dead - (OLD.state = 'dead'),
            dropped = dropped - (OLD.state = 'dropped'),
            claimed = claimed - (OLD.state = 'claimed')
            WHERE slot = CRC32(OLD.event_id) % 16"#,
];

const DEADLOCK: u16 = 1213;
const LOCK_WAIT_TIMEOUT: u16 = 1205;
const DUPLICATE_KEY: u16 = 1062;

/// The URL of database [`DATABASE`] on the server of `shard_url` (same
/// user, password and options).
pub fn database_beside(shard_url: &str) -> anyhow::Result<String> {
    crate::ledger::mysql::database_beside(shard_url, DATABASE)
}

pub struct MysqlNotifications {
    pool: MySqlPool,
}

impl MysqlNotifications {
    /// Connects to the database `url` names
    /// (`mysql://user:password@host:port/database`), creating it and its
    /// tables when missing.
    pub async fn connect(url: &str, config: &MysqlConfig) -> anyhow::Result<MysqlNotifications> {
        let pool =
            crate::ledger::mysql::open_side_database(url, "notification", DATABASE, TABLES, config)
                .await?;
        Ok(MysqlNotifications { pool })
    }
}

fn error_number(e: &sqlx::Error) -> Option<u16> {
    match e {
        sqlx::Error::Database(db) => db
            .try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
            .map(|e| e.number()),
        _ => None,
    }
}

fn retryable(e: &sqlx::Error) -> bool {
    matches!(error_number(e), Some(DEADLOCK | LOCK_WAIT_TIMEOUT))
}

/// Text from a column with a binary collation (sqlx hands those over as
/// bytes).
fn text(bytes: Vec<u8>) -> String {
    String::from_utf8_lossy(&bytes).into_owned()
}

fn event_from(json: &[u8]) -> Result<Event, StoreError> {
    serde_json::from_slice(json).map_err(|e| StoreError(format!("a stored event: {e}")))
}

/// Inserts a row unless its key is taken; answers whether it did. Only
/// that statement is undone on a duplicate, the transaction goes on.
async fn insert_new(
    query: sqlx::query::Query<'_, sqlx::MySql, sqlx::mysql::MySqlArguments>,
    conn: &mut MySqlConnection,
) -> Result<bool, sqlx::Error> {
    match query.execute(conn).await {
        Err(e) if error_number(&e) == Some(DUPLICATE_KEY) => Ok(false),
        Err(e) => Err(e),
        Ok(_) => Ok(true),
    }
}

type HookRow = (Vec<u8>, Vec<u8>, Vec<u8>, Vec<u8>);

fn hook_from((id, account, url, secret): HookRow) -> StoredHook {
    StoredHook {
        webhook: Webhook {
            id: text(id),
            account: text(account),
            url: text(url),
            secret: None,
        },
        secret: text(secret),
    }
}

type LetterRow = (
    Vec<u8>,
    Vec<u8>,
    Option<Vec<u8>>,
    Vec<u8>,
    Option<Vec<u8>>,
    i64,
    Option<Vec<u8>>,
    Option<i64>,
);

fn letter_from(row: LetterRow) -> DeadLetter {
    let (id, event_id, event_type, webhook_id, url, attempts, last_error, failed_at_ms) = row;
    DeadLetter {
        id: text(id),
        event_id: text(event_id),
        event_type: event_type.map(text).unwrap_or_default(),
        webhook_id: text(webhook_id),
        url: url.map(text).unwrap_or_default(),
        attempts: attempts.clamp(0, u32::MAX as i64) as u32,
        last_error: last_error.map(text).unwrap_or_default(),
        failed_at_ms: failed_at_ms.unwrap_or_default(),
    }
}

impl MysqlNotifications {
    async fn add_once(&self, hook: &StoredHook) -> Result<Added, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let total: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM webhooks")
            .fetch_one(&mut *tx)
            .await?;
        if total as usize >= MAX_WEBHOOKS {
            return Ok(Added::StoreFull);
        }
        let w = &hook.webhook;
        for slot in 0..MAX_WEBHOOKS_PER_ACCOUNT as i64 {
            let insert = sqlx::query(
                "INSERT INTO webhooks (id, account, slot, url, secret, created_at_ms) VALUES (?, ?, ?, ?, ?, ?)",
            )
            .bind(&w.id)
            .bind(&w.account)
            .bind(slot)
            .bind(&w.url)
            .bind(&hook.secret)
            .bind(crate::ledger::now_ms());
            if insert_new(insert, &mut tx).await? {
                tx.commit().await?;
                return Ok(Added::Added);
            }
        }
        Ok(Added::AccountFull)
    }

    async fn apply_once(
        &self,
        event: &Event,
        json: &str,
        webhooks: &[String],
        lease: &Lease,
    ) -> Result<Option<Vec<String>>, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let first = sqlx::query(
            "INSERT INTO applied_events (event_id, outbox, applied_at_ms) VALUES (?, ?, ?)",
        )
        .bind(&event.id)
        .bind(event.shard.is_some() as i8)
        .bind(crate::ledger::now_ms());
        if !insert_new(first, &mut tx).await? {
            return Ok(None);
        }
        let mut claimed = Vec::with_capacity(webhooks.len());
        for webhook in webhooks {
            let insert = sqlx::query(
                "INSERT INTO deliveries (event_id, webhook_id, state, owner, lease_until_ms, event, attempts)
                 VALUES (?, ?, 'claimed', ?, ?, ?, 0)",
            )
            .bind(&event.id)
            .bind(webhook)
            .bind(&lease.owner)
            .bind(lease.until_ms)
            .bind(json);
            if insert_new(insert, &mut tx).await? {
                claimed.push(webhook.clone());
            }
        }
        tx.commit().await?;
        Ok(Some(claimed))
    }

    async fn bury_once(&self, letter: &DeadLetter, owner: &str) -> Result<bool, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let buried = sqlx::query(
            "UPDATE deliveries SET state = 'dead', lease_until_ms = 0, letter_id = ?, event_type = ?,
                 url = ?, attempts = ?, last_error = ?, failed_at_ms = ?
             WHERE event_id = ? AND webhook_id = ? AND owner = ? AND state = 'claimed'",
        )
        .bind(&letter.id)
        .bind(&letter.event_type)
        .bind(&letter.url)
        .bind(letter.attempts as i64)
        .bind(&letter.last_error)
        .bind(letter.failed_at_ms)
        .bind(&letter.event_id)
        .bind(&letter.webhook_id)
        .bind(owner)
        .execute(&mut *tx)
        .await?;
        if buried.rows_affected() == 0 {
            return Ok(false);
        }
        let kept: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM deliveries WHERE state = 'dead'")
            .fetch_one(&mut *tx)
            .await?;
        let excess = kept - MAX_DEAD_LETTERS as i64;
        if excess > 0 {
            sqlx::query(
                "UPDATE deliveries SET state = 'dropped', event = NULL WHERE state = 'dead'
                 ORDER BY failed_at_ms, letter_id LIMIT ?",
            )
            .bind(excess)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    /// Takes over one expired claim, if no one took it first.
    async fn take_one(
        &self,
        event_id: &[u8],
        webhook_id: &[u8],
        lease: &Lease,
        now_ms: TimestampMs,
    ) -> Result<Option<Claim>, StoreError> {
        let taken = sqlx::query(
            "UPDATE deliveries SET owner = ?, lease_until_ms = ?
             WHERE event_id = ? AND webhook_id = ? AND state = 'claimed' AND lease_until_ms < ?",
        )
        .bind(&lease.owner)
        .bind(lease.until_ms)
        .bind(event_id)
        .bind(webhook_id)
        .bind(now_ms)
        .execute(&self.pool)
        .await?;
        if taken.rows_affected() == 0 {
            return Ok(None);
        }
        let row: Option<(Option<Vec<u8>>, i64)> = sqlx::query_as(
            "SELECT event, attempts FROM deliveries WHERE event_id = ? AND webhook_id = ? AND owner = ?",
        )
        .bind(event_id)
        .bind(webhook_id)
        .bind(&lease.owner)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some((Some(json), attempts)) => Ok(Some(Claim {
                event: event_from(&json)?,
                webhook_id: text(webhook_id.to_vec()),
                attempts: attempts.clamp(0, u32::MAX as i64) as u32,
            })),
            _ => Ok(None),
        }
    }
}

/// Runs `attempt` again, whole, while the server reports a deadlock or a
/// lock-wait timeout.
macro_rules! retrying {
    ($attempt:expr) => {{
        let mut tries = 1;
        loop {
            match $attempt.await {
                Err(e) if tries < MAX_ATTEMPTS && retryable(&e) => tries += 1,
                other => break other.map_err(StoreError::from),
            }
        }
    }};
}

#[async_trait]
impl NotificationStore for MysqlNotifications {
    async fn add_webhook(&self, hook: &StoredHook) -> Result<Added, StoreError> {
        retrying!(self.add_once(hook))
    }

    async fn webhooks_of(&self, accounts: &[String]) -> Result<Vec<StoredHook>, StoreError> {
        let mut hooks = Vec::new();
        for account in accounts {
            let rows: Vec<HookRow> = sqlx::query_as(
                "SELECT id, account, url, secret FROM webhooks WHERE account = ? ORDER BY slot",
            )
            .bind(account)
            .fetch_all(&self.pool)
            .await?;
            hooks.extend(rows.into_iter().map(hook_from));
        }
        Ok(hooks)
    }

    async fn webhook(&self, id: &str) -> Result<Option<StoredHook>, StoreError> {
        let row: Option<HookRow> =
            sqlx::query_as("SELECT id, account, url, secret FROM webhooks WHERE id = ?")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(hook_from))
    }

    async fn apply(
        &self,
        event: &Event,
        webhooks: &[String],
        lease: &Lease,
    ) -> Result<Option<Vec<String>>, StoreError> {
        let json = serde_json::to_string(event).map_err(|e| StoreError(e.to_string()))?;
        retrying!(self.apply_once(event, &json, webhooks, lease))
    }

    async fn applied(&self, ids: &[String]) -> Result<Vec<String>, StoreError> {
        let mut found = Vec::new();
        for chunk in ids.chunks(500) {
            let marks = vec!["?"; chunk.len()].join(", ");
            let sql = format!("SELECT event_id FROM applied_events WHERE event_id IN ({marks})");
            let mut query = sqlx::query_scalar::<_, Vec<u8>>(&sql);
            for id in chunk {
                query = query.bind(id);
            }
            found.extend(query.fetch_all(&self.pool).await?.into_iter().map(text));
        }
        Ok(found)
    }

    async fn renew(
        &self,
        event_id: &str,
        webhook_id: &str,
        lease: &Lease,
    ) -> Result<bool, StoreError> {
        let renewed = sqlx::query(
            "UPDATE deliveries SET lease_until_ms = ?
             WHERE event_id = ? AND webhook_id = ? AND owner = ? AND state = 'claimed'",
        )
        .bind(lease.until_ms)
        .bind(event_id)
        .bind(webhook_id)
        .bind(&lease.owner)
        .execute(&self.pool)
        .await?;
        Ok(renewed.rows_affected() == 1)
    }

    async fn mark_delivered(
        &self,
        event_id: &str,
        webhook_id: &str,
        owner: &str,
        attempts: u32,
    ) -> Result<bool, StoreError> {
        let marked = sqlx::query(
            "UPDATE deliveries SET state = 'delivered', event = NULL, lease_until_ms = 0, attempts = ?
             WHERE event_id = ? AND webhook_id = ? AND owner = ? AND state = 'claimed'",
        )
        .bind(attempts as i64)
        .bind(event_id)
        .bind(webhook_id)
        .bind(owner)
        .execute(&self.pool)
        .await?;
        Ok(marked.rows_affected() == 1)
    }

    async fn bury(&self, letter: &DeadLetter, owner: &str) -> Result<bool, StoreError> {
        retrying!(self.bury_once(letter, owner))
    }

    async fn take_expired(
        &self,
        lease: &Lease,
        now_ms: TimestampMs,
        limit: u32,
    ) -> Result<Vec<Claim>, StoreError> {
        let expired: Vec<(Vec<u8>, Vec<u8>)> = sqlx::query_as(
            "SELECT event_id, webhook_id FROM deliveries
             WHERE state = 'claimed' AND lease_until_ms < ? ORDER BY lease_until_ms LIMIT ?",
        )
        .bind(now_ms)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        let mut claims = Vec::new();
        for (event_id, webhook_id) in expired {
            if let Some(claim) = self.take_one(&event_id, &webhook_id, lease, now_ms).await? {
                claims.push(claim);
            }
        }
        Ok(claims)
    }

    async fn release(&self, owner: &str) -> Result<u64, StoreError> {
        let released = sqlx::query(
            "UPDATE deliveries SET lease_until_ms = 0 WHERE owner = ? AND state = 'claimed'",
        )
        .bind(owner)
        .execute(&self.pool)
        .await?;
        Ok(released.rows_affected())
    }

    async fn dead_letters(&self) -> Result<Vec<DeadLetter>, StoreError> {
        let rows: Vec<LetterRow> = sqlx::query_as(
            "SELECT letter_id, event_id, event_type, webhook_id, url, attempts, last_error, failed_at_ms
             FROM deliveries WHERE state = 'dead' ORDER BY failed_at_ms, letter_id",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(letter_from).collect())
    }

    async fn claim_letter(&self, id: &str, lease: &Lease) -> Result<LetterClaim, StoreError> {
        let row: Option<(Vec<u8>, Option<Vec<u8>>, Vec<u8>, i64)> = sqlx::query_as(
            "SELECT state, event, webhook_id, attempts FROM deliveries WHERE letter_id = ?",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        let Some((state, event, webhook_id, attempts)) = row else {
            return Ok(LetterClaim::NotFound);
        };
        match (state.as_slice(), event) {
            (b"delivered", _) => Ok(LetterClaim::Delivered),
            (b"claimed", _) => Ok(LetterClaim::Busy),
            (b"dead", Some(json)) => {
                let taken = sqlx::query(
                    "UPDATE deliveries SET state = 'claimed', owner = ?, lease_until_ms = ?
                     WHERE letter_id = ? AND state = 'dead'",
                )
                .bind(&lease.owner)
                .bind(lease.until_ms)
                .bind(id)
                .execute(&self.pool)
                .await?;
                if taken.rows_affected() == 0 {
                    return Ok(LetterClaim::Busy);
                }
                Ok(LetterClaim::Claimed(Claim {
                    event: event_from(&json)?,
                    webhook_id: text(webhook_id),
                    attempts: attempts.clamp(0, u32::MAX as i64) as u32,
                }))
            }
            _ => Ok(LetterClaim::NotFound),
        }
    }

    async fn return_letter(
        &self,
        event_id: &str,
        webhook_id: &str,
        owner: &str,
        error: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE deliveries SET state = 'dead', lease_until_ms = 0, attempts = attempts + 1, last_error = ?
             WHERE event_id = ? AND webhook_id = ? AND owner = ? AND state = 'claimed'",
        )
        .bind(error)
        .bind(event_id)
        .bind(webhook_id)
        .bind(owner)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn counts(&self) -> Result<StoredCounts, StoreError> {
        // CAST: MySQL's SUM of integers is a DECIMAL.
        let row: (i64, i64, i64, i64, i64, i64, i64) = sqlx::query_as(
            "SELECT CAST(COALESCE(SUM(applied), 0) AS SIGNED),
                 CAST(COALESCE(SUM(applied_outbox), 0) AS SIGNED),
                 CAST(COALESCE(SUM(delivered), 0) AS SIGNED),
                 CAST(COALESCE(SUM(failed), 0) AS SIGNED),
                 CAST(COALESCE(SUM(dead), 0) AS SIGNED),
                 CAST(COALESCE(SUM(dropped), 0) AS SIGNED),
                 CAST(COALESCE(SUM(claimed), 0) AS SIGNED)
             FROM notify_counters",
        )
        .fetch_one(&self.pool)
        .await?;
        let n = |v: i64| v.max(0) as u64;
        Ok(StoredCounts {
            events_applied: n(row.0),
            outbox_applied: n(row.1),
            delivered: n(row.2),
            dead_lettered: n(row.3),
            dead_letters: n(row.4),
            dead_letters_dropped: n(row.5),
            claimed: n(row.6),
        })
    }
}
