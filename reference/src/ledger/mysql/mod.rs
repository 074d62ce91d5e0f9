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

use async_trait::async_trait;
use sqlx::mysql::{MySqlConnectOptions, MySqlPoolOptions, MySqlRow};
use sqlx::{MySqlConnection, MySqlPool, Row};

use super::{
    Account, AccountKind, CreditOutcome, DebitOutcome, IdempotencyRecord, IdempotencyWrite,
    LedgerEntry, NewAccount, OutboxEvent, Refusal, ShardAudit, ShardStats, ShardStore, StoreError,
    StoredResponse, TimestampMs, Transfer, TransferState,
};
use crate::ids::{AccountId, IdempotencyKey, ShardId, TransferId};
use crate::money::{Amount, Currency};
pub use schema::MIGRATIONS;

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

/// One transaction's connection, with the shard for error mapping. A
/// statement error that a rerun may cure sets `retry`.
struct Tx<'a> {
    conn: &'a mut MySqlConnection,
    shard: ShardId,
    retry: bool,
}

type Q<'q> = sqlx::query::Query<'q, sqlx::MySql, sqlx::mysql::MySqlArguments>;

impl Tx<'_> {
    fn sql_err(&mut self, error: sqlx::Error) -> StoreError {
        let (retry, e) = classify(self.shard, &error);
        self.retry |= retry;
        e
    }

    fn corrupt(&self, what: String) -> StoreError {
        StoreError::Internal {
            shard: self.shard,
            reason: what,
        }
    }

    async fn execute(&mut self, query: Q<'_>) -> Result<u64, StoreError> {
        match query.execute(&mut *self.conn).await {
            Ok(done) => Ok(done.rows_affected()),
            Err(e) => Err(self.sql_err(e)),
        }
    }

    async fn optional(&mut self, query: Q<'_>) -> Result<Option<MySqlRow>, StoreError> {
        match query.fetch_optional(&mut *self.conn).await {
            Ok(row) => Ok(row),
            Err(e) => Err(self.sql_err(e)),
        }
    }

    async fn all(&mut self, query: Q<'_>) -> Result<Vec<MySqlRow>, StoreError> {
        match query.fetch_all(&mut *self.conn).await {
            Ok(rows) => Ok(rows),
            Err(e) => Err(self.sql_err(e)),
        }
    }

    fn get<T: Column>(&self, row: &MySqlRow, index: usize) -> Result<T, StoreError> {
        T::read(row, index).map_err(|e| self.corrupt(format!("unexpected column {index}: {e}")))
    }

    /// An outbox row read as `id, event_id, event_type, aggregate_id,
    /// payload, created_at_ms`.
    fn outbox_event(&self, r: &MySqlRow) -> Result<OutboxEvent, StoreError> {
        Ok(OutboxEvent {
            seq: self.get(r, 0)?,
            event_id: self.get(r, 1)?,
            event_type: self.get(r, 2)?,
            key: self.get(r, 3)?,
            shard: self.shard,
            payload: self.get(r, 4)?,
            created_at_ms: self.get(r, 5)?,
        })
    }

    fn currency(&self, code: &str) -> Result<Currency, StoreError> {
        Currency::parse(code)
            .map_err(|_| self.corrupt(format!("unknown currency {code:?} in shard database")))
    }

    // --- accounts -------------------------------------------------------

    /// A customer account's (currency, balance), locked for this transaction.
    async fn lock_user(&mut self, id: &AccountId) -> Result<Option<(Currency, i64)>, StoreError> {
        let row = self
            .optional(
                sqlx::query(
                    "SELECT currency, balance_minor FROM accounts
                     WHERE id = ? AND kind = 'user' FOR UPDATE",
                )
                .bind(id.as_str()),
            )
            .await?;
        match row {
            None => Ok(None),
            Some(r) => {
                let code: String = self.get(&r, 0)?;
                Ok(Some((self.currency(&code)?, self.get(&r, 1)?)))
            }
        }
    }

    async fn add_balance(&mut self, id: &str, delta: i64) -> Result<(), StoreError> {
        let changed = self
            .execute(
                sqlx::query("UPDATE accounts SET balance_minor = balance_minor + ? WHERE id = ?")
                    .bind(delta)
                    .bind(id),
            )
            .await?;
        if changed != 1 {
            return Err(self.corrupt(format!("account {id} vanished during a transaction")));
        }
        Ok(())
    }

    async fn ensure_system_account(
        &mut self,
        kind: AccountKind,
        currency: Currency,
        now: TimestampMs,
    ) -> Result<String, StoreError> {
        let id = kind.system_account_id(currency);
        // A plain read first: INSERT IGNORE on an existing row would take a
        // shared lock that the update after it must upgrade, and two
        // transactions doing that deadlock.
        let exists = self
            .optional(sqlx::query("SELECT 1 FROM accounts WHERE id = ?").bind(&id))
            .await?;
        if exists.is_some() {
            return Ok(id);
        }
        self.execute(
            sqlx::query(
                "INSERT IGNORE INTO accounts (id, kind, currency, balance_minor, created_at_ms)
                 VALUES (?, ?, ?, 0, ?)",
            )
            .bind(&id)
            .bind(kind.as_str())
            .bind(currency.code())
            .bind(now),
        )
        .await?;
        Ok(id)
    }

    async fn entry(
        &mut self,
        transfer_id: &str,
        account_id: &str,
        amount_minor: i64,
        currency: Currency,
        now: TimestampMs,
    ) -> Result<(), StoreError> {
        self.execute(
            sqlx::query(
                "INSERT INTO ledger_entries (transfer_id, account_id, amount_minor, currency, created_at_ms)
                 VALUES (?, ?, ?, ?, ?)",
            )
            .bind(transfer_id)
            .bind(account_id)
            .bind(amount_minor)
            .bind(currency.code())
            .bind(now),
        )
        .await?;
        Ok(())
    }

    async fn post(
        &mut self,
        transfer_id: &str,
        from: &str,
        to: &str,
        amount: i64,
        currency: Currency,
        now: TimestampMs,
    ) -> Result<(), StoreError> {
        self.add_balance(from, -amount).await?;
        self.add_balance(to, amount).await?;
        self.entry(transfer_id, from, -amount, currency, now)
            .await?;
        self.entry(transfer_id, to, amount, currency, now).await
    }

    async fn outbox(
        &mut self,
        event_type: &str,
        aggregate_id: &str,
        payload: serde_json::Value,
        now: TimestampMs,
    ) -> Result<(), StoreError> {
        let event_id = uuid::Uuid::new_v4().simple().to_string();
        self.execute(
            sqlx::query(
                "INSERT INTO outbox (event_id, event_type, aggregate_id, payload, created_at_ms)
                 VALUES (?, ?, ?, ?, ?)",
            )
            .bind(event_id)
            .bind(event_type)
            .bind(aggregate_id)
            .bind(payload.to_string())
            .bind(now),
        )
        .await?;
        Ok(())
    }

    // --- idempotency ----------------------------------------------------

    async fn idempotency_record(
        &mut self,
        scope: &str,
        key: &str,
        now: TimestampMs,
        lock: bool,
    ) -> Result<Option<IdempotencyRecord>, StoreError> {
        let sql = if lock {
            "SELECT fingerprint, resource_id, response_status, response_body, expires_at_ms
             FROM idempotency_keys WHERE scope = ? AND `key` = ? FOR UPDATE"
        } else {
            "SELECT fingerprint, resource_id, response_status, response_body, expires_at_ms
             FROM idempotency_keys WHERE scope = ? AND `key` = ?"
        };
        let row = self
            .optional(sqlx::query(sql).bind(scope).bind(key))
            .await?;
        let Some(r) = row else { return Ok(None) };
        let expires_at_ms: i64 = self.get(&r, 4)?;
        if expires_at_ms <= now {
            return Ok(None);
        }
        let status: Option<u16> = self.get(&r, 2)?;
        let body: Option<String> = self.get(&r, 3)?;
        Ok(Some(IdempotencyRecord {
            fingerprint: self.get(&r, 0)?,
            resource_id: self.get(&r, 1)?,
            response: status
                .zip(body)
                .map(|(status, body)| StoredResponse { status, body }),
            expires_at_ms,
        }))
    }

    async fn claim_idempotency(
        &mut self,
        idem: Option<&IdempotencyWrite>,
        now: TimestampMs,
    ) -> Result<(), StoreError> {
        let Some(idem) = idem else { return Ok(()) };
        let (scope, key) = (idem.scope.as_str(), idem.key.as_str());
        // Locks the record when there is one. Two requests racing on a new
        // key both get here; the second one's insert then hits the primary
        // key, and its rerun finds the first one's record.
        let row = self
            .optional(
                sqlx::query(
                    "SELECT expires_at_ms FROM idempotency_keys WHERE scope = ? AND `key` = ? FOR UPDATE",
                )
                .bind(scope)
                .bind(key),
            )
            .await?;
        let Some(row) = row else { return Ok(()) };
        if let Some(record) = self.idempotency_record(scope, key, now, false).await? {
            return Err(StoreError::IdempotencyKeyExists(record));
        }
        let _expired: i64 = self.get(&row, 0)?;
        self.execute(
            sqlx::query("DELETE FROM idempotency_keys WHERE scope = ? AND `key` = ?")
                .bind(scope)
                .bind(key),
        )
        .await?;
        Ok(())
    }

    async fn write_idempotency(
        &mut self,
        idem: Option<&IdempotencyWrite>,
        resource_id: &str,
        response: Option<&StoredResponse>,
        now: TimestampMs,
    ) -> Result<(), StoreError> {
        let Some(idem) = idem else { return Ok(()) };
        self.execute(
            sqlx::query(
                "INSERT INTO idempotency_keys
                   (scope, `key`, fingerprint, resource_id, response_status, response_body,
                    created_at_ms, expires_at_ms)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(idem.scope.as_str())
            .bind(idem.key.as_str())
            .bind(&idem.fingerprint)
            .bind(resource_id)
            .bind(response.map(|r| r.status))
            .bind(response.map(|r| r.body.clone()))
            .bind(now)
            .bind(idem.expires_at_ms),
        )
        .await?;
        Ok(())
    }

    // --- transfers ------------------------------------------------------

    async fn decline(
        &mut self,
        t: &Transfer,
        refusal: Refusal,
        idem: Option<&IdempotencyWrite>,
        now: TimestampMs,
    ) -> Result<DebitOutcome, StoreError> {
        self.write_idempotency(idem, t.id.as_str(), Some(&refusal.response()), now)
            .await?;
        Ok(DebitOutcome::Declined(refusal))
    }

    async fn insert_transfer(&mut self, t: &Transfer) -> Result<(), StoreError> {
        self.execute(
            sqlx::query(
                "INSERT INTO transfers (id, payer, payee, amount_minor, currency, payer_shard,
                    payee_shard, state, failure_code, created_at_ms, updated_at_ms)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(t.id.as_str())
            .bind(t.payer.as_str())
            .bind(t.payee.as_str())
            .bind(t.amount.minor())
            .bind(t.currency.code())
            .bind(t.payer_shard.index() as i64)
            .bind(t.payee_shard.index() as i64)
            .bind(t.state.as_str())
            .bind(t.failure_code.clone())
            .bind(t.created_at_ms)
            .bind(t.updated_at_ms),
        )
        .await?;
        Ok(())
    }

    fn parse_transfer(&self, r: &MySqlRow) -> Result<Transfer, StoreError> {
        let id: String = self.get(r, 0)?;
        let bad = |what: &str| self.corrupt(format!("transfer {id} has a bad {what}"));
        let payer: String = self.get(r, 1)?;
        let payee: String = self.get(r, 2)?;
        let amount: i64 = self.get(r, 3)?;
        let currency: String = self.get(r, 4)?;
        let payer_shard: i32 = self.get(r, 5)?;
        let payee_shard: i32 = self.get(r, 6)?;
        let state: String = self.get(r, 7)?;
        Ok(Transfer {
            id: TransferId::parse(&id).map_err(|_| bad("id"))?,
            payer: AccountId::parse(&payer).map_err(|_| bad("payer"))?,
            payee: AccountId::parse(&payee).map_err(|_| bad("payee"))?,
            amount: Amount::from_minor(amount).map_err(|_| bad("amount"))?,
            currency: self.currency(&currency)?,
            payer_shard: ShardId::new(payer_shard as u32).map_err(|_| bad("payer shard"))?,
            payee_shard: ShardId::new(payee_shard as u32).map_err(|_| bad("payee shard"))?,
            state: TransferState::parse(&state).ok_or_else(|| bad("state"))?,
            failure_code: self.get(r, 8)?,
            created_at_ms: self.get(r, 9)?,
            updated_at_ms: self.get(r, 10)?,
        })
    }

    async fn transfer(&mut self, id: &str, lock: bool) -> Result<Option<Transfer>, StoreError> {
        let sql = format!(
            "SELECT {TRANSFER_COLUMNS} FROM transfers WHERE id = ?{}",
            if lock { " FOR UPDATE" } else { "" }
        );
        let row = self.optional(sqlx::query(&sql).bind(id)).await?;
        row.map(|r| self.parse_transfer(&r)).transpose()
    }

    async fn transfer_event(&mut self, event_type: &str, t: &Transfer) -> Result<(), StoreError> {
        let payload = serde_json::json!({
            "transfer_id": t.id.as_str(),
            "from": t.payer.as_str(),
            "to": t.payee.as_str(),
            "amount_minor": t.amount.minor(),
            "currency": t.currency.code(),
            "from_shard": t.payer_shard.index(),
            "to_shard": t.payee_shard.index(),
            "state": t.state.as_str(),
            "failure_code": t.failure_code,
        });
        self.outbox(event_type, t.id.as_str(), payload, t.updated_at_ms)
            .await
    }

    async fn credit_outcome(
        &mut self,
        id: &str,
        lock: bool,
    ) -> Result<Option<CreditOutcome>, StoreError> {
        let sql = if lock {
            "SELECT outcome, refusal_code FROM inbound_credits WHERE transfer_id = ? FOR UPDATE"
        } else {
            "SELECT outcome, refusal_code FROM inbound_credits WHERE transfer_id = ?"
        };
        let row = self.optional(sqlx::query(sql).bind(id)).await?;
        let Some(r) = row else { return Ok(None) };
        let outcome: String = self.get(&r, 0)?;
        let code: Option<String> = self.get(&r, 1)?;
        Ok(Some(match outcome.as_str() {
            "credited" => CreditOutcome::Credited,
            _ => CreditOutcome::Refused {
                code: code.unwrap_or_else(|| "refused".into()),
            },
        }))
    }

    /// The payer's side of a cross-shard transfer: debit the payer into the
    /// in-flight account and record the transfer in `state` (pending for
    /// the saga's step (a); completed for an XA branch, which commits only
    /// together with the credit).
    async fn debit_into_flight(
        &mut self,
        t: &Transfer,
        state: TransferState,
        event: &str,
        idem: Option<&IdempotencyWrite>,
    ) -> Result<DebitOutcome, StoreError> {
        let now = t.created_at_ms;
        self.claim_idempotency(idem, now).await?;
        let payer = self.lock_user(&t.payer).await?;
        if let Some(refusal) = super::payer_refusal(t, payer)? {
            return self.decline(t, refusal, idem, now).await;
        }
        let mut recorded = t.clone();
        recorded.state = state;
        let in_flight = self
            .ensure_system_account(AccountKind::InFlight, t.currency, now)
            .await?;
        self.post(
            t.id.as_str(),
            t.payer.as_str(),
            &in_flight,
            t.amount.minor(),
            t.currency,
            now,
        )
        .await?;
        self.insert_transfer(&recorded).await?;
        self.transfer_event(event, &recorded).await?;
        let response = idem.and_then(|i| i.response.as_ref());
        self.write_idempotency(idem, t.id.as_str(), response, now)
            .await?;
        Ok(DebitOutcome::Applied(recorded))
    }

    /// The payee's side: record the credit's outcome and, unless refused,
    /// credit the payee from the in-flight account. Answers the refusal.
    async fn credit_out_of_flight(&mut self, t: &Transfer) -> Result<Option<Refusal>, StoreError> {
        let now = super::now_ms();
        let payee = self.lock_user(&t.payee).await?;
        let refusal = super::payee_refusal(t, payee);
        let (outcome, code) = match &refusal {
            None => ("credited", None),
            Some(r) => ("refused", Some(r.code())),
        };
        self.execute(
            sqlx::query(
                "INSERT INTO inbound_credits (transfer_id, payer, payee, amount_minor, currency,
                    payer_shard, outcome, refusal_code, created_at_ms)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(t.id.as_str())
            .bind(t.payer.as_str())
            .bind(t.payee.as_str())
            .bind(t.amount.minor())
            .bind(t.currency.code())
            .bind(t.payer_shard.index() as i64)
            .bind(outcome)
            .bind(code)
            .bind(now),
        )
        .await?;
        if refusal.is_some() {
            return Ok(refusal);
        }
        let in_flight = self
            .ensure_system_account(AccountKind::InFlight, t.currency, now)
            .await?;
        self.post(
            t.id.as_str(),
            &in_flight,
            t.payee.as_str(),
            t.amount.minor(),
            t.currency,
            now,
        )
        .await?;
        Ok(None)
    }

    fn account_from_row(&self, r: &MySqlRow) -> Result<Account, StoreError> {
        let id: String = self.get(r, 0)?;
        let currency: String = self.get(r, 1)?;
        Ok(Account {
            id: AccountId::parse(&id)
                .map_err(|_| self.corrupt(format!("bad account id {id:?}")))?,
            currency: self.currency(&currency)?,
            balance_minor: self.get(r, 2)?,
            shard: self.shard,
            created_at_ms: self.get(r, 3)?,
        })
    }

    async fn sums_by_currency(&mut self, sql: &str) -> Result<Vec<(Currency, i128)>, StoreError> {
        let rows = self.all(sqlx::query(sql)).await?;
        let mut out = Vec::new();
        for r in &rows {
            let code: String = self.get(r, 0)?;
            let Sum(sum) = self.get(r, 1)?;
            out.push((self.currency(&code)?, sum));
        }
        Ok(out)
    }
}

/// A value read from a result column. Text is read as bytes and checked
/// as UTF-8: columns with a binary collation (`utf8mb4_bin`, which the
/// schema uses so ids compare as bytes) come back flagged binary, and sqlx
/// will not decode those as `String` directly.
trait Column: Sized {
    fn read(row: &MySqlRow, index: usize) -> Result<Self, sqlx::Error>;
}

fn utf8(bytes: Vec<u8>) -> Result<String, sqlx::Error> {
    String::from_utf8(bytes).map_err(|e| sqlx::Error::Decode(Box::new(e)))
}

impl Column for String {
    fn read(row: &MySqlRow, index: usize) -> Result<Self, sqlx::Error> {
        utf8(row.try_get::<Vec<u8>, _>(index)?)
    }
}

impl Column for Option<String> {
    fn read(row: &MySqlRow, index: usize) -> Result<Self, sqlx::Error> {
        row.try_get::<Option<Vec<u8>>, _>(index)?
            .map(utf8)
            .transpose()
    }
}

macro_rules! plain_column {
    ($($t:ty),*) => {$(
        impl Column for $t {
            fn read(row: &MySqlRow, index: usize) -> Result<Self, sqlx::Error> {
                row.try_get(index)
            }
        }
    )*};
}
plain_column!(i64, i32, u16, Option<i64>, Option<u16>);

/// A SUM over many rows, read as text (`CAST(SUM(..) AS CHAR)`) into an
/// `i128`: `CAST(.. AS SIGNED)` would clamp a sum past the `i64` range
/// with only a warning, and a wrong total is worse than an error. NULL
/// (no rows) is zero.
struct Sum(i128);

impl Column for Sum {
    fn read(row: &MySqlRow, index: usize) -> Result<Self, sqlx::Error> {
        let Some(text) = Option::<String>::read(row, index)? else {
            return Ok(Sum(0));
        };
        text.trim()
            .parse::<i128>()
            .map(Sum)
            .map_err(|e| sqlx::Error::Decode(format!("sum {text:?}: {e}").into()))
    }
}

const TRANSFER_COLUMNS: &str = "id, payer, payee, amount_minor, currency, payer_shard, \
     payee_shard, state, failure_code, created_at_ms, updated_at_ms";

/// Runs `$body` (an expression using `$tx: &mut Tx`) in a transaction:
/// commits on `Ok`, rolls back on `Err`, and runs it again from the start
/// when the server reported a deadlock or lock-wait timeout.
macro_rules! in_transaction {
    ($self:ident, |$tx:ident| $body:expr) => {{
        let mut attempt = 1;
        loop {
            let mut conn = match $self.pool.begin().await {
                Ok(conn) => conn,
                Err(e) => break Err(classify($self.shard, &e).1),
            };
            let mut tx_state = Tx {
                conn: &mut *conn,
                shard: $self.shard,
                retry: false,
            };
            let result = {
                let $tx = &mut tx_state;
                $body
            };
            let retry = tx_state.retry;
            match result {
                Ok(value) => match conn.commit().await {
                    Ok(()) => break Ok(value),
                    Err(e) => {
                        let (again, error) = classify($self.shard, &e);
                        if again && attempt < MAX_ATTEMPTS {
                            attempt += 1;
                            continue;
                        }
                        break Err(error);
                    }
                },
                Err(error) => {
                    let _ = conn.rollback().await;
                    if retry && attempt < MAX_ATTEMPTS {
                        attempt += 1;
                        tokio::time::sleep(Duration::from_millis(2 * attempt as u64)).await;
                        continue;
                    }
                    break Err(error);
                }
            }
        }
    }};
}

impl MysqlShard {
    async fn reader(&self) -> Result<sqlx::pool::PoolConnection<sqlx::MySql>, StoreError> {
        self.pool
            .acquire()
            .await
            .map_err(|e| classify(self.shard, &e).1)
    }
}

/// A read outside a transaction, on a pooled connection.
macro_rules! reading {
    ($self:ident, |$tx:ident| $body:expr) => {{
        let mut conn = $self.reader().await?;
        let mut tx_state = Tx {
            conn: &mut *conn,
            shard: $self.shard,
            retry: false,
        };
        let $tx = &mut tx_state;
        $body
    }};
}

#[async_trait]
impl ShardStore for MysqlShard {
    fn shard(&self) -> ShardId {
        self.shard
    }

    async fn create_account(
        &self,
        account: NewAccount,
        idempotency: Option<IdempotencyWrite>,
    ) -> Result<Account, StoreError> {
        in_transaction!(self, |tx| async {
            let now = account.created_at_ms;
            tx.claim_idempotency(idempotency.as_ref(), now).await?;
            let inserted = sqlx::query(
                "INSERT INTO accounts (id, kind, currency, balance_minor, created_at_ms)
                 VALUES (?, 'user', ?, 0, ?)",
            )
            .bind(account.id.as_str())
            .bind(account.currency.code())
            .bind(now)
            .execute(&mut *tx.conn)
            .await;
            match inserted {
                Ok(_) => {}
                Err(sqlx::Error::Database(db))
                    if db
                        .try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
                        .is_some_and(|e| e.number() == DUPLICATE_KEY) =>
                {
                    return Err(Refusal::AccountExists(account.id.clone()).into());
                }
                Err(e) => return Err(tx.sql_err(e)),
            }
            let opening = account.opening_balance.minor();
            if opening > 0 {
                let funding = tx
                    .ensure_system_account(AccountKind::Funding, account.currency, now)
                    .await?;
                let reference = format!("open:{}", account.id);
                tx.post(
                    &reference,
                    &funding,
                    account.id.as_str(),
                    opening,
                    account.currency,
                    now,
                )
                .await?;
            }
            let created = Account {
                id: account.id.clone(),
                currency: account.currency,
                balance_minor: opening,
                shard: tx.shard,
                created_at_ms: now,
            };
            tx.outbox(
                "account.created",
                account.id.as_str(),
                serde_json::json!({
                    "account_id": account.id.as_str(),
                    "currency": account.currency.code(),
                    "opening_balance_minor": opening,
                    "shard": tx.shard.index(),
                }),
                now,
            )
            .await?;
            let response = idempotency.as_ref().and_then(|i| i.response.as_ref());
            tx.write_idempotency(idempotency.as_ref(), account.id.as_str(), response, now)
                .await?;
            Ok(created)
        }
        .await)
    }

    async fn account(&self, id: &AccountId) -> Result<Option<Account>, StoreError> {
        reading!(self, |tx| {
            let row = tx
                .optional(
                    sqlx::query(
                        "SELECT id, currency, balance_minor, created_at_ms FROM accounts
                         WHERE id = ? AND kind = 'user'",
                    )
                    .bind(id.as_str()),
                )
                .await?;
            row.map(|r| tx.account_from_row(&r)).transpose()
        })
    }

    async fn list_accounts(
        &self,
        after: Option<AccountId>,
        limit: u32,
    ) -> Result<Vec<Account>, StoreError> {
        reading!(self, |tx| {
            let after = after.as_ref().map(|a| a.as_str()).unwrap_or("");
            let rows = tx
                .all(
                    sqlx::query(
                        "SELECT id, currency, balance_minor, created_at_ms FROM accounts
                         WHERE kind = 'user' AND id > ? ORDER BY id LIMIT ?",
                    )
                    .bind(after)
                    .bind(limit),
                )
                .await?;
            rows.iter().map(|r| tx.account_from_row(r)).collect()
        })
    }

    async fn idempotency_record(
        &self,
        scope: &AccountId,
        key: &IdempotencyKey,
        now: TimestampMs,
    ) -> Result<Option<IdempotencyRecord>, StoreError> {
        reading!(self, |tx| {
            tx.idempotency_record(scope.as_str(), key.as_str(), now, false)
                .await
        })
    }

    async fn save_idempotent_response(
        &self,
        scope: &AccountId,
        key: &IdempotencyKey,
        response: StoredResponse,
    ) -> Result<(), StoreError> {
        in_transaction!(self, |tx| async {
            tx.execute(
                sqlx::query(
                    "UPDATE idempotency_keys SET response_status = ?, response_body = ?
                     WHERE scope = ? AND `key` = ? AND response_status IS NULL",
                )
                .bind(response.status)
                .bind(response.body.clone())
                .bind(scope.as_str())
                .bind(key.as_str()),
            )
            .await?;
            Ok(())
        }
        .await)
    }

    async fn record_decline(
        &self,
        idempotency: IdempotencyWrite,
        transfer_id: &TransferId,
        response: StoredResponse,
        now: TimestampMs,
    ) -> Result<(), StoreError> {
        in_transaction!(self, |tx| async {
            tx.claim_idempotency(Some(&idempotency), now).await?;
            tx.write_idempotency(
                Some(&idempotency),
                transfer_id.as_str(),
                Some(&response),
                now,
            )
            .await
        }
        .await)
    }

    async fn transfer_local(
        &self,
        transfer: &Transfer,
        idempotency: Option<IdempotencyWrite>,
    ) -> Result<DebitOutcome, StoreError> {
        let t = transfer;
        in_transaction!(self, |tx| async {
            let now = t.created_at_ms;
            debug_assert_eq!(t.payer_shard, t.payee_shard);
            tx.claim_idempotency(idempotency.as_ref(), now).await?;
            // Lock both accounts in id order.
            let (payer, payee) = if t.payer.as_str() <= t.payee.as_str() {
                let payer = tx.lock_user(&t.payer).await?;
                (payer, tx.lock_user(&t.payee).await?)
            } else {
                let payee = tx.lock_user(&t.payee).await?;
                (tx.lock_user(&t.payer).await?, payee)
            };
            let decline = super::payer_refusal(t, payer)?;
            if let Some(refusal) = super::payee_refusal(t, payee) {
                return Err(refusal.into());
            }
            if let Some(refusal) = decline {
                return tx.decline(t, refusal, idempotency.as_ref(), now).await;
            }
            let mut done = t.clone();
            done.state = TransferState::Completed;
            tx.post(
                t.id.as_str(),
                t.payer.as_str(),
                t.payee.as_str(),
                t.amount.minor(),
                t.currency,
                now,
            )
            .await?;
            tx.insert_transfer(&done).await?;
            tx.transfer_event("transfer.completed", &done).await?;
            let response = idempotency.as_ref().and_then(|i| i.response.as_ref());
            tx.write_idempotency(idempotency.as_ref(), t.id.as_str(), response, now)
                .await?;
            Ok(DebitOutcome::Applied(done))
        }
        .await)
    }

    async fn debit_to_in_flight(
        &self,
        transfer: &Transfer,
        idempotency: Option<IdempotencyWrite>,
    ) -> Result<DebitOutcome, StoreError> {
        in_transaction!(self, |tx| tx
            .debit_into_flight(
                transfer,
                TransferState::Pending,
                "transfer.initiated",
                idempotency.as_ref()
            )
            .await)
    }

    async fn credit_from_in_flight(
        &self,
        transfer: &Transfer,
    ) -> Result<CreditOutcome, StoreError> {
        in_transaction!(self, |tx| async {
            if let Some(outcome) = tx.credit_outcome(transfer.id.as_str(), true).await? {
                return Ok(outcome);
            }
            Ok(match tx.credit_out_of_flight(transfer).await? {
                None => CreditOutcome::Credited,
                Some(refusal) => CreditOutcome::Refused {
                    code: refusal.code().to_string(),
                },
            })
        }
        .await)
    }

    async fn complete_transfer(
        &self,
        id: &TransferId,
        now: TimestampMs,
    ) -> Result<Transfer, StoreError> {
        in_transaction!(self, |tx| async {
            let t = tx
                .transfer(id.as_str(), true)
                .await?
                .ok_or_else(|| tx.corrupt(format!("transfer {id} not found to complete")))?;
            if t.state != TransferState::Pending {
                return Ok(t);
            }
            tx.execute(
                sqlx::query(
                    "UPDATE transfers SET state = 'completed', updated_at_ms = ?
                     WHERE id = ? AND state = 'pending'",
                )
                .bind(now)
                .bind(id.as_str()),
            )
            .await?;
            let done = tx
                .transfer(id.as_str(), false)
                .await?
                .ok_or_else(|| tx.corrupt(format!("transfer {id} vanished")))?;
            tx.transfer_event("transfer.completed", &done).await?;
            Ok(done)
        }
        .await)
    }

    async fn reverse_transfer(
        &self,
        id: &TransferId,
        code: &str,
        now: TimestampMs,
    ) -> Result<Transfer, StoreError> {
        in_transaction!(self, |tx| async {
            let t = tx
                .transfer(id.as_str(), true)
                .await?
                .ok_or_else(|| tx.corrupt(format!("transfer {id} not found to reverse")))?;
            if t.state != TransferState::Pending {
                return Ok(t);
            }
            // The payer's row first, as every transfer locks it.
            tx.lock_user(&t.payer).await?;
            let in_flight = tx
                .ensure_system_account(AccountKind::InFlight, t.currency, now)
                .await?;
            tx.post(
                t.id.as_str(),
                &in_flight,
                t.payer.as_str(),
                t.amount.minor(),
                t.currency,
                now,
            )
            .await?;
            tx.execute(
                sqlx::query(
                    "UPDATE transfers SET state = 'failed', failure_code = ?, updated_at_ms = ?
                     WHERE id = ?",
                )
                .bind(code)
                .bind(now)
                .bind(id.as_str()),
            )
            .await?;
            let failed = tx
                .transfer(id.as_str(), false)
                .await?
                .ok_or_else(|| tx.corrupt(format!("transfer {id} vanished")))?;
            tx.transfer_event("transfer.failed", &failed).await?;
            Ok(failed)
        }
        .await)
    }

    async fn transfer(&self, id: &TransferId) -> Result<Option<Transfer>, StoreError> {
        reading!(self, |tx| tx.transfer(id.as_str(), false).await)
    }

    async fn account_entries(
        &self,
        account: &AccountId,
        after: i64,
        limit: u32,
    ) -> Result<Vec<LedgerEntry>, StoreError> {
        reading!(self, |tx| {
            let rows = tx
                .all(
                    sqlx::query(
                        "SELECT id, transfer_id, account_id, amount_minor, currency, created_at_ms
                         FROM ledger_entries WHERE account_id = ? AND id > ? ORDER BY id LIMIT ?",
                    )
                    .bind(account.as_str())
                    .bind(after)
                    .bind(limit),
                )
                .await?;
            rows.iter()
                .map(|r| {
                    Ok(LedgerEntry {
                        id: tx.get(r, 0)?,
                        transfer_id: tx.get(r, 1)?,
                        account_id: tx.get(r, 2)?,
                        amount_minor: tx.get(r, 3)?,
                        currency: tx.get(r, 4)?,
                        created_at_ms: tx.get(r, 5)?,
                    })
                })
                .collect()
        })
    }

    async fn pending_transfers(
        &self,
        created_before: TimestampMs,
        limit: u32,
    ) -> Result<Vec<Transfer>, StoreError> {
        reading!(self, |tx| {
            let rows = tx
                .all(
                    sqlx::query(&format!(
                        "SELECT {TRANSFER_COLUMNS} FROM transfers
                         WHERE state = 'pending' AND created_at_ms < ?
                         ORDER BY created_at_ms LIMIT ?"
                    ))
                    .bind(created_before)
                    .bind(limit),
                )
                .await?;
            rows.iter().map(|r| tx.parse_transfer(r)).collect()
        })
    }

    async fn credit_outcome(&self, id: &TransferId) -> Result<Option<CreditOutcome>, StoreError> {
        reading!(self, |tx| tx.credit_outcome(id.as_str(), false).await)
    }

    async fn outbox_page(
        &self,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<OutboxEvent>, StoreError> {
        reading!(self, |tx| {
            let rows = tx
                .all(
                    sqlx::query(
                        "SELECT id, event_id, event_type, aggregate_id, payload, created_at_ms
                         FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
                    )
                    .bind(after_seq)
                    .bind(limit),
                )
                .await?;
            rows.iter().map(|r| tx.outbox_event(r)).collect()
        })
    }

    async fn unpublished_events(&self, limit: u32) -> Result<Vec<OutboxEvent>, StoreError> {
        reading!(self, |tx| {
            let rows = tx
                .all(
                    sqlx::query(
                        "SELECT id, event_id, event_type, aggregate_id, payload, created_at_ms
                         FROM outbox WHERE published_at_ms IS NULL ORDER BY id LIMIT ?",
                    )
                    .bind(limit),
                )
                .await?;
            rows.iter().map(|r| tx.outbox_event(r)).collect()
        })
    }

    async fn mark_published(&self, seqs: &[i64], now: TimestampMs) -> Result<(), StoreError> {
        if seqs.is_empty() {
            return Ok(());
        }
        let sql = format!(
            "UPDATE outbox SET published_at_ms = ? WHERE published_at_ms IS NULL AND id IN ({})",
            vec!["?"; seqs.len()].join(", ")
        );
        in_transaction!(self, |tx| async {
            let mut query = sqlx::query(&sql).bind(now);
            for seq in seqs {
                query = query.bind(seq);
            }
            tx.execute(query).await?;
            Ok(())
        }
        .await)
    }

    async fn outbox_counts(&self) -> Result<(u64, u64), StoreError> {
        reading!(self, |tx| {
            let row = tx
                .optional(sqlx::query(
                    "SELECT COUNT(*), CAST(COALESCE(SUM(published_at_ms IS NULL), 0) AS SIGNED) FROM outbox",
                ))
                .await?;
            match row {
                Some(r) => Ok((tx.get::<i64>(&r, 0)? as u64, tx.get::<i64>(&r, 1)? as u64)),
                None => Ok((0, 0)),
            }
        })
    }

    async fn stats(&self) -> Result<ShardStats, StoreError> {
        reading!(self, |tx| {
            let row = tx
                .optional(sqlx::query(
                    "SELECT COUNT(*) FROM accounts WHERE kind = 'user'",
                ))
                .await?;
            let accounts: i64 = match &row {
                Some(r) => tx.get(r, 0)?,
                None => 0,
            };
            let balances = tx
                .sums_by_currency(
                    "SELECT currency, CAST(SUM(balance_minor) AS CHAR) FROM accounts
                     WHERE kind = 'user' GROUP BY currency ORDER BY currency",
                )
                .await?;
            let states = tx
                .all(sqlx::query(
                    "SELECT state, COUNT(*) FROM transfers GROUP BY state",
                ))
                .await?;
            let mut stats = ShardStats {
                accounts: accounts as u64,
                balance_minor_by_currency: balances,
                ..Default::default()
            };
            for r in &states {
                let state: String = tx.get(r, 0)?;
                let count: i64 = tx.get(r, 1)?;
                match state.as_str() {
                    "pending" => stats.transfers_pending = count as u64,
                    "completed" => stats.transfers_completed = count as u64,
                    _ => stats.transfers_failed = count as u64,
                }
            }
            Ok(stats)
        })
    }

    async fn audit(&self) -> Result<ShardAudit, StoreError> {
        // One consistent snapshot of the whole shard.
        reading!(self, |tx| {
            tx.execute(sqlx::query(
                "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ",
            ))
            .await?;
            tx.execute(sqlx::query(
                "START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY",
            ))
            .await?;
            let audit = audit_snapshot(tx).await;
            let committed = tx.execute(sqlx::query("COMMIT")).await;
            let audit = audit?;
            committed?;
            Ok(audit)
        })
    }

    async fn purge_expired_idempotency(
        &self,
        now: TimestampMs,
        limit: u32,
    ) -> Result<u64, StoreError> {
        in_transaction!(self, |tx| async {
            tx.execute(
                sqlx::query("DELETE FROM idempotency_keys WHERE expires_at_ms <= ? LIMIT ?")
                    .bind(now)
                    .bind(limit),
            )
            .await
        }
        .await)
    }

    fn two_phase(&self) -> Option<&dyn super::TwoPhase> {
        Some(self)
    }
}

/// Reads every figure the audit needs, inside one transaction.
async fn audit_snapshot(tx: &mut Tx<'_>) -> Result<ShardAudit, StoreError> {
    let mut audit = ShardAudit {
        entry_sum_by_currency: tx
            .sums_by_currency(
                "SELECT currency, CAST(SUM(amount_minor) AS CHAR) FROM ledger_entries
                 GROUP BY currency",
            )
            .await?,
        ..Default::default()
    };
    let strings = |tx: &Tx<'_>, rows: Vec<MySqlRow>| -> Result<Vec<String>, StoreError> {
        rows.iter().map(|r| tx.get::<String>(r, 0)).collect()
    };
    let rows = tx
        .all(sqlx::query(
            "SELECT CONCAT(a.id, ': balance ', a.balance_minor, ', entries ', COALESCE(e.total, 0))
             FROM accounts a
             LEFT JOIN (SELECT account_id, SUM(amount_minor) AS total FROM ledger_entries
                        GROUP BY account_id) e ON e.account_id = a.id
             WHERE a.balance_minor <> COALESCE(e.total, 0)",
        ))
        .await?;
    audit.balance_mismatches = strings(tx, rows)?;
    let rows = tx
        .all(sqlx::query(
            "SELECT CONCAT(id, ': ', balance_minor) FROM accounts
             WHERE kind = 'user' AND balance_minor < 0",
        ))
        .await?;
    audit.negative_balances = strings(tx, rows)?;
    let rows = tx
        .all(sqlx::query(
            "SELECT kind, currency, CAST(SUM(balance_minor) AS CHAR) FROM accounts
             GROUP BY kind, currency",
        ))
        .await?;
    for r in &rows {
        let kind: String = tx.get(r, 0)?;
        let code: String = tx.get(r, 1)?;
        let Sum(sum) = tx.get(r, 2)?;
        let kind = AccountKind::parse(&kind)
            .ok_or_else(|| tx.corrupt(format!("unknown account kind {kind:?}")))?;
        audit.totals.push((kind, tx.currency(&code)?, sum));
    }
    let rows = tx
        .all(sqlx::query(
            "SELECT t.id, t.state, CAST(t.payer_shard <> t.payee_shard AS SIGNED), t.amount_minor,
                    COUNT(e.id), CAST(COALESCE(SUM(e.amount_minor), 0) AS SIGNED),
                    CAST(COALESCE(SUM(CASE WHEN e.account_id = t.payer THEN e.amount_minor END), 0) AS SIGNED)
             FROM transfers t LEFT JOIN ledger_entries e ON e.transfer_id = t.id
             GROUP BY t.id, t.state, t.payer_shard, t.payee_shard, t.amount_minor",
        ))
        .await?;
    for r in &rows {
        let id: String = tx.get(r, 0)?;
        let state: String = tx.get(r, 1)?;
        let cross: i64 = tx.get(r, 2)?;
        let cross = cross != 0;
        let amount: i64 = tx.get(r, 3)?;
        let count: i64 = tx.get(r, 4)?;
        let net: i64 = tx.get(r, 5)?;
        let payer_net: i64 = tx.get(r, 6)?;
        let (want_count, want_payer) = match (state.as_str(), cross) {
            ("completed", false) => (2, -amount),
            ("pending" | "completed", true) => (2, -amount),
            ("failed", true) => (4, 0),
            _ => (-1, 0),
        };
        if !(count == want_count && net == 0 && payer_net == want_payer) {
            audit.bad_transfers.push(format!(
                "{id} ({state}, cross_shard={cross}): {count} entries, payer net {payer_net}, expected {want_count} entries and payer net {want_payer}"
            ));
        }
    }
    let rows = tx
        .all(sqlx::query(
            "SELECT c.transfer_id, c.outcome, c.amount_minor, COUNT(e.id),
                    CAST(COALESCE(SUM(CASE WHEN e.account_id = c.payee THEN e.amount_minor END), 0) AS SIGNED)
             FROM inbound_credits c LEFT JOIN ledger_entries e ON e.transfer_id = c.transfer_id
             GROUP BY c.transfer_id, c.outcome, c.amount_minor",
        ))
        .await?;
    for r in &rows {
        let id: String = tx.get(r, 0)?;
        let outcome: String = tx.get(r, 1)?;
        let amount: i64 = tx.get(r, 2)?;
        let count: i64 = tx.get(r, 3)?;
        let payee_net: i64 = tx.get(r, 4)?;
        let (want_count, want_payee) = if outcome == "credited" {
            (2, amount)
        } else {
            (0, 0)
        };
        if count != want_count || payee_net != want_payee {
            audit.bad_credits.push(format!(
                "credit {id} ({outcome}): {count} entries, payee net {payee_net}"
            ));
        }
    }
    let row = tx
        .optional(sqlx::query(
            "SELECT COUNT(*) FROM ledger_entries e
             WHERE e.transfer_id NOT LIKE 'open:%'
               AND NOT EXISTS (SELECT 1 FROM transfers t WHERE t.id = e.transfer_id)
               AND NOT EXISTS (SELECT 1 FROM inbound_credits c WHERE c.transfer_id = e.transfer_id)",
        ))
        .await?;
    audit.orphan_entries = match &row {
        Some(r) => tx.get::<i64>(r, 0)? as u64,
        None => 0,
    };
    let rows = tx
        .all(sqlx::query(&format!(
            "SELECT {TRANSFER_COLUMNS} FROM transfers WHERE state = 'pending'"
        )))
        .await?;
    audit.pending = rows
        .iter()
        .map(|r| tx.parse_transfer(r))
        .collect::<Result<_, _>>()?;
    audit.sent_minor_by_currency = tx
        .sums_by_currency(
            "SELECT currency, CAST(SUM(amount_minor) AS CHAR) FROM transfers
             WHERE payer_shard <> payee_shard AND state <> 'failed' GROUP BY currency",
        )
        .await?;
    audit.received_minor_by_currency = tx
        .sums_by_currency(
            "SELECT currency, CAST(SUM(amount_minor) AS CHAR) FROM inbound_credits
             WHERE outcome = 'credited' GROUP BY currency",
        )
        .await?;
    let pair = |tx: &Tx<'_>, row: Option<MySqlRow>| -> Result<(u64, i128), StoreError> {
        match row {
            Some(r) => Ok((tx.get::<i64>(&r, 0)? as u64, tx.get::<Sum>(&r, 1)?.0)),
            None => Ok((0, 0)),
        }
    };
    let row = tx
        .optional(sqlx::query(
            "SELECT COUNT(*), CAST(COALESCE(SUM(amount_minor), 0) AS CHAR) FROM transfers
             WHERE payer_shard <> payee_shard AND state = 'completed'",
        ))
        .await?;
    audit.completed_cross_out = pair(tx, row)?;
    let row = tx
        .optional(sqlx::query(
            "SELECT COUNT(*), CAST(COALESCE(SUM(amount_minor), 0) AS CHAR) FROM inbound_credits
             WHERE outcome = 'credited'",
        ))
        .await?;
    audit.credited_in = pair(tx, row)?;
    Ok(audit)
}

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
