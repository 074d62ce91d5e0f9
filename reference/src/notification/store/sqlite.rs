//! Notification state in one SQLite file (or in memory): one connection
//! behind a mutex, used from blocking threads. Write transactions take
//! the file's write lock when they begin (`BEGIN IMMEDIATE`) and wait for
//! it up to [`BUSY_TIMEOUT`], so two processes over one file take turns.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use super::{
    Added, Applied, Claim, Lease, LetterClaim, NotificationStore, StoreError, StoredCounts,
    StoredHook,
};
use crate::events::Event;
use crate::ledger::TimestampMs;
use crate::notification::MAX_WEBHOOKS_PER_ACCOUNT;
use crate::notification::{DeadLetter, Webhook, MAX_DEAD_LETTERS, MAX_WEBHOOKS};

/// How long a statement waits for another process's write to finish.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS webhooks (
        id TEXT PRIMARY KEY,
        account TEXT NOT NULL,
        slot INTEGER NOT NULL,
        url TEXT NOT NULL,
        secret TEXT NOT NULL,
        created_at_ms INTEGER NOT NULL,
        UNIQUE (account, slot)
    );
    CREATE TABLE IF NOT EXISTS applied_events (
        event_id TEXT PRIMARY KEY,
        outbox INTEGER NOT NULL,
        applied_at_ms INTEGER NOT NULL
    );
    CREATE TABLE IF NOT EXISTS deliveries (
        event_id TEXT NOT NULL,
        webhook_id TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('claimed', 'delivered', 'dead', 'dropped')),
        owner TEXT NOT NULL,
        lease_until_ms INTEGER NOT NULL,
        event TEXT,
        attempts INTEGER NOT NULL,
        letter_id TEXT UNIQUE,
        event_type TEXT,
        url TEXT,
        last_error TEXT,
        failed_at_ms INTEGER,
        PRIMARY KEY (event_id, webhook_id)
    );
    CREATE INDEX IF NOT EXISTS deliveries_by_lease ON deliveries (state, lease_until_ms);
    CREATE INDEX IF NOT EXISTS deliveries_by_failure ON deliveries (state, failed_at_ms, letter_id);
    -- What the stats report, kept by triggers in the transaction of each
    -- change: counting rows would read all history on every scrape.
    CREATE TABLE IF NOT EXISTS notify_counters (
        slot INTEGER PRIMARY KEY,
        applied INTEGER NOT NULL DEFAULT 0,
        applied_outbox INTEGER NOT NULL DEFAULT 0,
        delivered INTEGER NOT NULL DEFAULT 0,
        failed INTEGER NOT NULL DEFAULT 0,
        dead INTEGER NOT NULL DEFAULT 0,
        dropped INTEGER NOT NULL DEFAULT 0,
        claimed INTEGER NOT NULL DEFAULT 0
    );
    -- A store made before the counters: its rows, counted once.
    INSERT INTO notify_counters
        SELECT 0,
            (SELECT COUNT(*) FROM applied_events),
            (SELECT COUNT(*) FROM applied_events WHERE outbox = 1),
            (SELECT COUNT(*) FROM deliveries WHERE state = 'delivered'),
            (SELECT COUNT(*) FROM deliveries WHERE failed_at_ms IS NOT NULL),
            (SELECT COUNT(*) FROM deliveries WHERE state = 'dead'),
            (SELECT COUNT(*) FROM deliveries WHERE state = 'dropped'),
            (SELECT COUNT(*) FROM deliveries WHERE state = 'claimed')
        WHERE NOT EXISTS (SELECT 1 FROM notify_counters);
    CREATE TRIGGER IF NOT EXISTS applied_events_count AFTER INSERT ON applied_events
    BEGIN
        UPDATE notify_counters
            SET applied = applied + 1, applied_outbox = applied_outbox + (NEW.outbox = 1)
            WHERE slot = 0;
    END;
    CREATE TRIGGER IF NOT EXISTS deliveries_count_insert AFTER INSERT ON deliveries
    BEGIN
        UPDATE notify_counters SET
            delivered = delivered + (NEW.state = 'delivered'),
            failed = failed + (NEW.failed_at_ms IS NOT NULL),
            dead = dead + (NEW.state = 'dead'),
            dropped = dropped + (NEW.state = 'dropped'),
            claimed = claimed + (NEW.state = 'claimed')
            WHERE slot = 0;
    END;
    CREATE TRIGGER IF NOT EXISTS deliveries_count_update AFTER UPDATE ON deliveries
    BEGIN
        UPDATE notify_counters SET
            delivered = delivered + (NEW.state = 'delivered') - (OLD.state = 'delivered'),
            failed = failed + (NEW.failed_at_ms IS NOT NULL) - (OLD.failed_at_ms IS NOT NULL),
            dead = dead + (NEW.state = 'dead') - (OLD.state = 'dead'),
            dropped = dropped + (NEW.state = 'dropped') - (OLD.state = 'dropped'),
            claimed = claimed + (NEW.state = 'claimed') - (OLD.state = 'claimed')
            WHERE slot = 0;
    END;
    CREATE TRIGGER IF NOT EXISTS deliveries_count_delete AFTER DELETE ON deliveries
    BEGIN
        UPDATE notify_counters SET
            delivered = delivered - (OLD.state = 'delivered'),
            failed = failed - (OLD.failed_at_ms IS NOT NULL),
            dead = dead - (OLD.state = 'dead'),
            dropped = dropped - (OLD.state = 'dropped'),
            claimed = claimed - (OLD.state = 'claimed')
            WHERE slot = 0;
    END;
";

pub struct SqliteNotifications {
    db: Arc<Mutex<Connection>>,
}

impl SqliteNotifications {
    /// Opens (creating if needed) the store at `path`, or one in memory
    /// when `None`.
    pub fn open(path: Option<&Path>) -> anyhow::Result<SqliteNotifications> {
        let db = match path {
            Some(p) => Connection::open(p)?,
            None => Connection::open_in_memory()?,
        };
        db.busy_timeout(BUSY_TIMEOUT)?;
        // NORMAL: a commit survives the process, not always the machine.
        // What a power loss can take is recovered: an event applied is
        // applied again from the outbox, a delivery recorded is sent
        // again (receivers deduplicate by event id).
        db.execute_batch("PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;")?;
        db.execute_batch(SCHEMA)?;
        Ok(SqliteNotifications {
            db: Arc::new(Mutex::new(db)),
        })
    }

    /// Runs `f` on the connection, on a blocking thread.
    async fn run<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let db = Arc::clone(&self.db);
        tokio::task::spawn_blocking(move || {
            let mut db = db.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            f(&mut db)
        })
        .await
        .map_err(|e| StoreError(e.to_string()))?
        .map_err(StoreError::from)
    }
}

fn hook_from(row: &rusqlite::Row<'_>) -> rusqlite::Result<StoredHook> {
    Ok(StoredHook {
        webhook: Webhook {
            id: row.get(0)?,
            account: row.get(1)?,
            url: row.get(2)?,
            secret: None,
        },
        secret: row.get(3)?,
    })
}

/// An event as kept in a delivery row; a row that does not parse is an
/// error of the store, not a panic.
fn event_from(json: &str) -> rusqlite::Result<Event> {
    serde_json::from_str(json).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })
}

fn add_webhook(db: &mut Connection, hook: &StoredHook) -> rusqlite::Result<Added> {
    let tx = db.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let total: i64 = tx.query_row("SELECT COUNT(*) FROM webhooks", [], |r| r.get(0))?;
    if total as usize >= MAX_WEBHOOKS {
        return Ok(Added::StoreFull);
    }
    let w = &hook.webhook;
    for slot in 0..MAX_WEBHOOKS_PER_ACCOUNT as i64 {
        let inserted = tx.execute(
            "INSERT INTO webhooks (id, account, slot, url, secret, created_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (account, slot) DO NOTHING",
            params![
                w.id,
                w.account,
                slot,
                w.url,
                hook.secret,
                crate::ledger::now_ms()
            ],
        )?;
        if inserted == 1 {
            tx.commit()?;
            return Ok(Added::Added);
        }
    }
    Ok(Added::AccountFull)
}

fn apply(
    db: &mut Connection,
    event: &Event,
    json: &str,
    webhooks: &[String],
    lease: &Lease,
) -> rusqlite::Result<Option<Vec<String>>> {
    let tx = db.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let first = tx.execute(
        "INSERT INTO applied_events (event_id, outbox, applied_at_ms) VALUES (?1, ?2, ?3)
         ON CONFLICT (event_id) DO NOTHING",
        params![event.id, event.shard.is_some(), crate::ledger::now_ms()],
    )?;
    if first == 0 {
        return Ok(None);
    }
    let mut claimed = Vec::with_capacity(webhooks.len());
    for webhook in webhooks {
        let inserted = tx.execute(
            "INSERT INTO deliveries (event_id, webhook_id, state, owner, lease_until_ms, event, attempts)
             VALUES (?1, ?2, 'claimed', ?3, ?4, ?5, 0) ON CONFLICT (event_id, webhook_id) DO NOTHING",
            params![event.id, webhook, lease.owner, lease.until_ms, json],
        )?;
        if inserted == 1 {
            claimed.push(webhook.clone());
        }
    }
    tx.commit()?;
    Ok(Some(claimed))
}

/// [`NotificationStore::apply_batch`] in one transaction; an event's JSON
/// is written only when it has a webhook to deliver to.
fn apply_batch(
    db: &mut Connection,
    events: &[(Event, Vec<String>)],
    lease: &Lease,
) -> rusqlite::Result<Vec<Applied>> {
    let tx = db.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut out = Vec::with_capacity(events.len());
    {
        let mut hooks_of = tx.prepare_cached(
            "SELECT id, account, url, secret FROM webhooks WHERE account = ?1 ORDER BY slot",
        )?;
        let mut applied = tx.prepare_cached(
            "INSERT INTO applied_events (event_id, outbox, applied_at_ms) VALUES (?1, ?2, ?3)
             ON CONFLICT (event_id) DO NOTHING",
        )?;
        let mut claim = tx.prepare_cached(
            "INSERT INTO deliveries (event_id, webhook_id, state, owner, lease_until_ms, event, attempts)
             VALUES (?1, ?2, 'claimed', ?3, ?4, ?5, 0) ON CONFLICT (event_id, webhook_id) DO NOTHING",
        )?;
        let now = crate::ledger::now_ms();
        for (event, accounts) in events {
            let mut hooks = Vec::new();
            for account in accounts {
                for hook in hooks_of.query_map([account], hook_from)? {
                    hooks.push(hook?);
                }
            }
            if applied.execute(params![event.id, event.shard.is_some(), now])? == 0 {
                out.push((hooks, None));
                continue;
            }
            let mut claimed = Vec::with_capacity(hooks.len());
            if !hooks.is_empty() {
                let json = serde_json::to_string(event)
                    .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
                for hook in &hooks {
                    let id = &hook.webhook.id;
                    if claim.execute(params![event.id, id, lease.owner, lease.until_ms, json])? == 1
                    {
                        claimed.push(id.clone());
                    }
                }
            }
            out.push((hooks, Some(claimed)));
        }
    }
    tx.commit()?;
    Ok(out)
}

fn bury(db: &mut Connection, letter: &DeadLetter, owner: &str) -> rusqlite::Result<bool> {
    let tx = db.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let buried = tx.execute(
        "UPDATE deliveries SET state = 'dead', lease_until_ms = 0, letter_id = ?1, event_type = ?2,
             url = ?3, attempts = ?4, last_error = ?5, failed_at_ms = ?6
         WHERE event_id = ?7 AND webhook_id = ?8 AND owner = ?9 AND state = 'claimed'",
        params![
            letter.id,
            letter.event_type,
            letter.url,
            letter.attempts,
            letter.last_error,
            letter.failed_at_ms,
            letter.event_id,
            letter.webhook_id,
            owner
        ],
    )?;
    if buried == 0 {
        return Ok(false);
    }
    let kept: i64 = tx.query_row(
        "SELECT COUNT(*) FROM deliveries WHERE state = 'dead'",
        [],
        |r| r.get(0),
    )?;
    let excess = kept - MAX_DEAD_LETTERS as i64;
    if excess > 0 {
        tx.execute(
            "UPDATE deliveries SET state = 'dropped', event = NULL WHERE rowid IN (
                 SELECT rowid FROM deliveries WHERE state = 'dead'
                 ORDER BY failed_at_ms, letter_id LIMIT ?1)",
            [excess],
        )?;
    }
    tx.commit()?;
    Ok(true)
}

fn take_expired(
    db: &mut Connection,
    lease: &Lease,
    now_ms: TimestampMs,
    limit: u32,
) -> rusqlite::Result<Vec<Claim>> {
    let tx = db.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut claims = Vec::new();
    {
        let mut expired = tx.prepare_cached(
            "SELECT event_id, webhook_id, event, attempts FROM deliveries
             WHERE state = 'claimed' AND lease_until_ms < ?1 ORDER BY lease_until_ms LIMIT ?2",
        )?;
        let rows = expired.query_map(params![now_ms, limit], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, u32>(3)?,
            ))
        })?;
        for row in rows {
            let (_, webhook_id, json, attempts) = row?;
            claims.push(Claim {
                event: event_from(&json)?,
                webhook_id,
                attempts,
            });
        }
    }
    for claim in &claims {
        tx.execute(
            "UPDATE deliveries SET owner = ?1, lease_until_ms = ?2
             WHERE event_id = ?3 AND webhook_id = ?4 AND state = 'claimed'",
            params![
                lease.owner,
                lease.until_ms,
                claim.event.id,
                claim.webhook_id
            ],
        )?;
    }
    tx.commit()?;
    Ok(claims)
}

fn claim_letter(db: &mut Connection, id: &str, lease: &Lease) -> rusqlite::Result<LetterClaim> {
    let tx = db.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let row = tx
        .query_row(
            "SELECT state, event, webhook_id, attempts FROM deliveries WHERE letter_id = ?1",
            [id],
            |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, Option<String>>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, u32>(3)?,
                ))
            },
        )
        .optional()?;
    let claim = match row {
        None => LetterClaim::NotFound,
        Some((state, _, _, _)) if state == "delivered" => LetterClaim::Delivered,
        Some((state, _, _, _)) if state == "claimed" => LetterClaim::Busy,
        Some((state, Some(json), webhook_id, attempts)) if state == "dead" => {
            tx.execute(
                "UPDATE deliveries SET state = 'claimed', owner = ?1, lease_until_ms = ?2
                 WHERE letter_id = ?3 AND state = 'dead'",
                params![lease.owner, lease.until_ms, id],
            )?;
            LetterClaim::Claimed(Claim {
                event: event_from(&json)?,
                webhook_id,
                attempts,
            })
        }
        Some(_) => LetterClaim::NotFound,
    };
    tx.commit()?;
    Ok(claim)
}

fn counts(db: &mut Connection) -> rusqlite::Result<StoredCounts> {
    db.query_row(
        "SELECT applied, applied_outbox, delivered, failed, dead, dropped, claimed
         FROM notify_counters WHERE slot = 0",
        [],
        |r| {
            Ok(StoredCounts {
                events_applied: r.get::<_, i64>(0)? as u64,
                outbox_applied: r.get::<_, i64>(1)? as u64,
                delivered: r.get::<_, i64>(2)? as u64,
                dead_lettered: r.get::<_, i64>(3)? as u64,
                dead_letters: r.get::<_, i64>(4)? as u64,
                dead_letters_dropped: r.get::<_, i64>(5)? as u64,
                claimed: r.get::<_, i64>(6)? as u64,
            })
        },
    )
}

fn dead_letters(db: &mut Connection) -> rusqlite::Result<Vec<DeadLetter>> {
    let mut stmt = db.prepare_cached(
        "SELECT letter_id, event_id, event_type, webhook_id, url, attempts, last_error, failed_at_ms
         FROM deliveries WHERE state = 'dead' ORDER BY failed_at_ms, letter_id",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(DeadLetter {
            id: r.get(0)?,
            event_id: r.get(1)?,
            event_type: r.get(2)?,
            webhook_id: r.get(3)?,
            url: r.get(4)?,
            attempts: r.get(5)?,
            last_error: r.get(6)?,
            failed_at_ms: r.get(7)?,
        })
    })?;
    rows.collect()
}

#[async_trait]
impl NotificationStore for SqliteNotifications {
    async fn add_webhook(&self, hook: &StoredHook) -> Result<Added, StoreError> {
        let hook = hook.clone();
        self.run(move |db| add_webhook(db, &hook)).await
    }

    async fn webhooks_of(&self, accounts: &[String]) -> Result<Vec<StoredHook>, StoreError> {
        let accounts = accounts.to_vec();
        self.run(move |db| {
            let mut stmt = db.prepare_cached(
                "SELECT id, account, url, secret FROM webhooks WHERE account = ?1 ORDER BY slot",
            )?;
            let mut hooks = Vec::new();
            for account in &accounts {
                for hook in stmt.query_map([account], hook_from)? {
                    hooks.push(hook?);
                }
            }
            Ok(hooks)
        })
        .await
    }

    async fn webhook(&self, id: &str) -> Result<Option<StoredHook>, StoreError> {
        let id = id.to_string();
        self.run(move |db| {
            db.query_row(
                "SELECT id, account, url, secret FROM webhooks WHERE id = ?1",
                [id],
                hook_from,
            )
            .optional()
        })
        .await
    }

    async fn apply(
        &self,
        event: &Event,
        webhooks: &[String],
        lease: &Lease,
    ) -> Result<Option<Vec<String>>, StoreError> {
        let json = serde_json::to_string(event).map_err(|e| StoreError(e.to_string()))?;
        let (event, webhooks, lease) = (event.clone(), webhooks.to_vec(), lease.clone());
        self.run(move |db| apply(db, &event, &json, &webhooks, &lease))
            .await
    }

    async fn apply_batch(
        &self,
        events: &[(Event, Vec<String>)],
        lease: &Lease,
    ) -> Option<Result<Vec<Applied>, StoreError>> {
        let (events, lease) = (events.to_vec(), lease.clone());
        Some(self.run(move |db| apply_batch(db, &events, &lease)).await)
    }

    async fn applied(&self, ids: &[String]) -> Result<Vec<String>, StoreError> {
        let ids = ids.to_vec();
        self.run(move |db| {
            let mut stmt = db.prepare_cached("SELECT 1 FROM applied_events WHERE event_id = ?1")?;
            let mut found = Vec::new();
            for id in ids {
                if stmt.exists([&id])? {
                    found.push(id);
                }
            }
            Ok(found)
        })
        .await
    }

    async fn renew(
        &self,
        event_id: &str,
        webhook_id: &str,
        lease: &Lease,
    ) -> Result<bool, StoreError> {
        let (event_id, webhook_id, lease) =
            (event_id.to_string(), webhook_id.to_string(), lease.clone());
        self.run(move |db| {
            let renewed = db.execute(
                "UPDATE deliveries SET lease_until_ms = ?1
                 WHERE event_id = ?2 AND webhook_id = ?3 AND owner = ?4 AND state = 'claimed'",
                params![lease.until_ms, event_id, webhook_id, lease.owner],
            )?;
            Ok(renewed == 1)
        })
        .await
    }

    async fn mark_delivered(
        &self,
        event_id: &str,
        webhook_id: &str,
        owner: &str,
        attempts: u32,
    ) -> Result<bool, StoreError> {
        let (event_id, webhook_id, owner) = (
            event_id.to_string(),
            webhook_id.to_string(),
            owner.to_string(),
        );
        self.run(move |db| {
            let marked = db.execute(
                "UPDATE deliveries SET state = 'delivered', event = NULL, lease_until_ms = 0, attempts = ?1
                 WHERE event_id = ?2 AND webhook_id = ?3 AND owner = ?4 AND state = 'claimed'",
                params![attempts, event_id, webhook_id, owner],
            )?;
            Ok(marked == 1)
        })
        .await
    }

    async fn bury(&self, letter: &DeadLetter, owner: &str) -> Result<bool, StoreError> {
        let (letter, owner) = (letter.clone(), owner.to_string());
        self.run(move |db| bury(db, &letter, &owner)).await
    }

    async fn take_expired(
        &self,
        lease: &Lease,
        now_ms: TimestampMs,
        limit: u32,
    ) -> Result<Vec<Claim>, StoreError> {
        let lease = lease.clone();
        self.run(move |db| take_expired(db, &lease, now_ms, limit))
            .await
    }

    async fn release(&self, owner: &str) -> Result<u64, StoreError> {
        let owner = owner.to_string();
        self.run(move |db| {
            let released = db.execute(
                "UPDATE deliveries SET lease_until_ms = 0 WHERE owner = ?1 AND state = 'claimed'",
                [owner],
            )?;
            Ok(released as u64)
        })
        .await
    }

    async fn dead_letters(&self) -> Result<Vec<DeadLetter>, StoreError> {
        self.run(dead_letters).await
    }

    async fn claim_letter(&self, id: &str, lease: &Lease) -> Result<LetterClaim, StoreError> {
        let (id, lease) = (id.to_string(), lease.clone());
        self.run(move |db| claim_letter(db, &id, &lease)).await
    }

    async fn return_letter(
        &self,
        event_id: &str,
        webhook_id: &str,
        owner: &str,
        error: &str,
    ) -> Result<(), StoreError> {
        let (event_id, webhook_id, owner, error) = (
            event_id.to_string(),
            webhook_id.to_string(),
            owner.to_string(),
            error.to_string(),
        );
        self.run(move |db| {
            db.execute(
                "UPDATE deliveries SET state = 'dead', lease_until_ms = 0, attempts = attempts + 1, last_error = ?1
                 WHERE event_id = ?2 AND webhook_id = ?3 AND owner = ?4 AND state = 'claimed'",
                params![error, event_id, webhook_id, owner],
            )?;
            Ok(())
        })
        .await
    }

    async fn counts(&self) -> Result<StoredCounts, StoreError> {
        self.run(counts).await
    }
}
