//! The embedded backend: one SQLite file per shard, in WAL mode, written by
//! one thread per file (see `worker`).

mod schema;
mod worker;

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension, Row};

use super::{
    Account, AccountKind, CreditOutcome, DebitOutcome, IdempotencyRecord, IdempotencyWrite,
    LedgerEntry, NewAccount, OutboxEvent, Refusal, ShardAudit, ShardStats, ShardStore, StoreError,
    StoredResponse, TimestampMs, Transfer, TransferState,
};
use crate::ids::{AccountId, IdempotencyKey, ShardId, TransferId};
use crate::money::{Amount, Currency};
pub use schema::MIGRATIONS;
use worker::{Readers, Writer};

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
        let mut conn = open_connection(&path, config)?;
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

    async fn write<R, F>(&self, job: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&Ctx) -> Result<R, StoreError> + Send + 'static,
    {
        let shard = self.shard;
        self.writer
            .write(move |conn| job(&Ctx { conn, shard }))
            .await
    }

    async fn read<R, F>(&self, job: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&Ctx) -> Result<R, StoreError> + Send + 'static,
    {
        let shard = self.shard;
        self.readers
            .read(move |conn| job(&Ctx { conn, shard }))
            .await
    }
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

/// A connection with the shard it belongs to, for error mapping.
struct Ctx<'a> {
    conn: &'a Connection,
    shard: ShardId,
}

impl Ctx<'_> {
    fn err(&self, error: rusqlite::Error) -> StoreError {
        store_error(self.shard, error)
    }

    fn corrupt(&self, what: String) -> StoreError {
        StoreError::Internal {
            shard: self.shard,
            reason: what,
        }
    }

    fn execute<P: rusqlite::Params>(&self, sql: &str, params: P) -> Result<usize, StoreError> {
        self.conn
            .prepare_cached(sql)
            .and_then(|mut s| s.execute(params))
            .map_err(|e| self.err(e))
    }

    fn query_opt<T, P: rusqlite::Params>(
        &self,
        sql: &str,
        params: P,
        map: impl FnOnce(&Row<'_>) -> rusqlite::Result<T>,
    ) -> Result<Option<T>, StoreError> {
        self.conn
            .prepare_cached(sql)
            .and_then(|mut s| s.query_row(params, map).optional())
            .map_err(|e| self.err(e))
    }

    fn query_all<T, P: rusqlite::Params>(
        &self,
        sql: &str,
        params: P,
        map: impl FnMut(&Row<'_>) -> rusqlite::Result<T>,
    ) -> Result<Vec<T>, StoreError> {
        let mut stmt = self.conn.prepare_cached(sql).map_err(|e| self.err(e))?;
        let rows = stmt.query_map(params, map).map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<Vec<T>>>()
            .map_err(|e| self.err(e))
    }

    // --- accounts -------------------------------------------------------

    /// A customer account's (currency, balance).
    fn user_account(&self, id: &AccountId) -> Result<Option<(Currency, i64)>, StoreError> {
        let row = self.query_opt(
            "SELECT currency, balance_minor FROM accounts WHERE id = ?1 AND kind = 'user'",
            params![id.as_str()],
            |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)),
        )?;
        row.map(|(code, balance)| Ok((self.currency(&code)?, balance)))
            .transpose()
    }

    fn currency(&self, code: &str) -> Result<Currency, StoreError> {
        Currency::parse(code)
            .map_err(|_| self.corrupt(format!("unknown currency {code:?} in shard file")))
    }

    /// Adds `delta` to an account's balance.
    fn add_balance(&self, id: &str, delta: i64) -> Result<(), StoreError> {
        let changed = self.execute(
            "UPDATE accounts SET balance_minor = balance_minor + ?2 WHERE id = ?1",
            params![id, delta],
        )?;
        if changed != 1 {
            return Err(self.corrupt(format!("account {id} vanished during a transaction")));
        }
        Ok(())
    }

    /// Makes sure the system account of `kind` for `currency` exists.
    fn ensure_system_account(
        &self,
        kind: AccountKind,
        currency: Currency,
        now: TimestampMs,
    ) -> Result<String, StoreError> {
        let id = kind.system_account_id(currency);
        self.execute(
            "INSERT OR IGNORE INTO accounts (id, kind, currency, balance_minor, created_at_ms)
             VALUES (?1, ?2, ?3, 0, ?4)",
            params![id, kind.as_str(), currency.code(), now],
        )?;
        Ok(id)
    }

    fn entry(
        &self,
        transfer_id: &str,
        account_id: &str,
        amount_minor: i64,
        currency: Currency,
        now: TimestampMs,
    ) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO ledger_entries (transfer_id, account_id, amount_minor, currency, created_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![transfer_id, account_id, amount_minor, currency.code(), now],
        )?;
        Ok(())
    }

    /// Moves `amount` from `from` to `to` with its two entries.
    fn post(
        &self,
        transfer_id: &str,
        from: &str,
        to: &str,
        amount: i64,
        currency: Currency,
        now: TimestampMs,
    ) -> Result<(), StoreError> {
        self.add_balance(from, -amount)?;
        self.add_balance(to, amount)?;
        self.entry(transfer_id, from, -amount, currency, now)?;
        self.entry(transfer_id, to, amount, currency, now)
    }

    fn outbox(
        &self,
        event_type: &str,
        aggregate_id: &str,
        payload: serde_json::Value,
        now: TimestampMs,
    ) -> Result<(), StoreError> {
        let event_id = uuid::Uuid::new_v4().simple().to_string();
        self.execute(
            "INSERT INTO outbox (event_id, event_type, aggregate_id, payload, created_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![event_id, event_type, aggregate_id, payload.to_string(), now],
        )?;
        Ok(())
    }

    // --- idempotency ----------------------------------------------------

    fn idempotency_record(
        &self,
        scope: &str,
        key: &str,
        now: TimestampMs,
    ) -> Result<Option<IdempotencyRecord>, StoreError> {
        self.query_opt(
            "SELECT fingerprint, resource_id, response_status, response_body, expires_at_ms
             FROM idempotency_keys WHERE scope = ?1 AND key = ?2 AND expires_at_ms > ?3",
            params![scope, key, now],
            |r| {
                let status: Option<u16> = r.get(2)?;
                let body: Option<String> = r.get(3)?;
                Ok(IdempotencyRecord {
                    fingerprint: r.get(0)?,
                    resource_id: r.get(1)?,
                    response: status
                        .zip(body)
                        .map(|(status, body)| StoredResponse { status, body }),
                    expires_at_ms: r.get(4)?,
                })
            },
        )
    }

    /// Refuses the write if a live record holds the key; clears an expired one.
    fn claim_idempotency(
        &self,
        idem: Option<&IdempotencyWrite>,
        now: TimestampMs,
    ) -> Result<(), StoreError> {
        let Some(idem) = idem else { return Ok(()) };
        let (scope, key) = (idem.scope.as_str(), idem.key.as_str());
        if let Some(record) = self.idempotency_record(scope, key, now)? {
            return Err(StoreError::IdempotencyKeyExists(record));
        }
        self.execute(
            "DELETE FROM idempotency_keys WHERE scope = ?1 AND key = ?2",
            params![scope, key],
        )?;
        Ok(())
    }

    fn write_idempotency(
        &self,
        idem: Option<&IdempotencyWrite>,
        resource_id: &str,
        response: Option<&StoredResponse>,
        now: TimestampMs,
    ) -> Result<(), StoreError> {
        let Some(idem) = idem else { return Ok(()) };
        self.execute(
            "INSERT INTO idempotency_keys
               (scope, key, fingerprint, resource_id, response_status, response_body,
                created_at_ms, expires_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                idem.scope.as_str(),
                idem.key.as_str(),
                idem.fingerprint,
                resource_id,
                response.map(|r| r.status),
                response.map(|r| r.body.as_str()),
                now,
                idem.expires_at_ms
            ],
        )?;
        Ok(())
    }

    // --- transfers ------------------------------------------------------

    /// Checks the payer of `t` can pay it (see `ledger::payer_refusal`).
    fn check_payer(&self, t: &Transfer) -> Result<Option<Refusal>, StoreError> {
        super::payer_refusal(t, self.user_account(&t.payer)?)
    }

    fn payee_refusal(&self, t: &Transfer) -> Result<Option<Refusal>, StoreError> {
        Ok(super::payee_refusal(t, self.user_account(&t.payee)?))
    }

    /// Keeps a decline under the request's key and answers it.
    fn decline(
        &self,
        t: &Transfer,
        refusal: Refusal,
        idem: Option<&IdempotencyWrite>,
        now: TimestampMs,
    ) -> Result<DebitOutcome, StoreError> {
        self.write_idempotency(idem, t.id.as_str(), Some(&refusal.response()), now)?;
        Ok(DebitOutcome::Declined(refusal))
    }

    fn insert_transfer(&self, t: &Transfer) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO transfers (id, payer, payee, amount_minor, currency, payer_shard,
                payee_shard, state, failure_code, created_at_ms, updated_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            params![
                t.id.as_str(),
                t.payer.as_str(),
                t.payee.as_str(),
                t.amount.minor(),
                t.currency.code(),
                t.payer_shard.index() as i64,
                t.payee_shard.index() as i64,
                t.state.as_str(),
                t.failure_code,
                t.created_at_ms,
                t.updated_at_ms
            ],
        )?;
        Ok(())
    }

    fn transfer(&self, id: &str) -> Result<Option<Transfer>, StoreError> {
        let row = self.query_opt(
            &format!("SELECT {TRANSFER_COLUMNS} FROM transfers WHERE id = ?1"),
            params![id],
            RawTransfer::from_row,
        )?;
        row.map(|raw| raw.parse(self)).transpose()
    }

    fn transfer_event(&self, event_type: &str, t: &Transfer) -> Result<(), StoreError> {
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
    }

    fn credit_outcome(&self, id: &str) -> Result<Option<CreditOutcome>, StoreError> {
        let row = self.query_opt(
            "SELECT outcome, refusal_code FROM inbound_credits WHERE transfer_id = ?1",
            params![id],
            |r| Ok((r.get::<_, String>(0)?, r.get::<_, Option<String>>(1)?)),
        )?;
        Ok(row.map(|(outcome, code)| match outcome.as_str() {
            "credited" => CreditOutcome::Credited,
            _ => CreditOutcome::Refused {
                code: code.unwrap_or_else(|| "refused".into()),
            },
        }))
    }
}

const TRANSFER_COLUMNS: &str = "id, payer, payee, amount_minor, currency, payer_shard, \
     payee_shard, state, failure_code, created_at_ms, updated_at_ms";

/// A transfer row as stored, before its fields are checked.
struct RawTransfer {
    id: String,
    payer: String,
    payee: String,
    amount_minor: i64,
    currency: String,
    payer_shard: i64,
    payee_shard: i64,
    state: String,
    failure_code: Option<String>,
    created_at_ms: i64,
    updated_at_ms: i64,
}

impl RawTransfer {
    fn from_row(r: &Row<'_>) -> rusqlite::Result<RawTransfer> {
        Ok(RawTransfer {
            id: r.get(0)?,
            payer: r.get(1)?,
            payee: r.get(2)?,
            amount_minor: r.get(3)?,
            currency: r.get(4)?,
            payer_shard: r.get(5)?,
            payee_shard: r.get(6)?,
            state: r.get(7)?,
            failure_code: r.get(8)?,
            created_at_ms: r.get(9)?,
            updated_at_ms: r.get(10)?,
        })
    }

    fn parse(self, ctx: &Ctx<'_>) -> Result<Transfer, StoreError> {
        let bad = |what: &str| ctx.corrupt(format!("transfer {} has a bad {what}", self.id));
        Ok(Transfer {
            id: TransferId::parse(&self.id).map_err(|_| bad("id"))?,
            payer: AccountId::parse(&self.payer).map_err(|_| bad("payer"))?,
            payee: AccountId::parse(&self.payee).map_err(|_| bad("payee"))?,
            amount: Amount::from_minor(self.amount_minor).map_err(|_| bad("amount"))?,
            currency: ctx.currency(&self.currency)?,
            payer_shard: ShardId::new(self.payer_shard as u32).map_err(|_| bad("payer shard"))?,
            payee_shard: ShardId::new(self.payee_shard as u32).map_err(|_| bad("payee shard"))?,
            state: TransferState::parse(&self.state).ok_or_else(|| bad("state"))?,
            failure_code: self.failure_code,
            created_at_ms: self.created_at_ms,
            updated_at_ms: self.updated_at_ms,
        })
    }
}

fn account_from_row(ctx: &Ctx<'_>, r: (String, String, i64, i64)) -> Result<Account, StoreError> {
    let (id, currency, balance_minor, created_at_ms) = r;
    Ok(Account {
        id: AccountId::parse(&id).map_err(|_| ctx.corrupt(format!("bad account id {id:?}")))?,
        currency: ctx.currency(&currency)?,
        balance_minor,
        shard: ctx.shard,
        created_at_ms,
    })
}

#[async_trait]
impl ShardStore for SqliteShard {
    fn shard(&self) -> ShardId {
        self.shard
    }

    async fn create_account(
        &self,
        account: NewAccount,
        idempotency: Option<IdempotencyWrite>,
    ) -> Result<Account, StoreError> {
        self.write(move |ctx| {
            let now = account.created_at_ms;
            ctx.claim_idempotency(idempotency.as_ref(), now)?;
            let exists = ctx.query_opt(
                "SELECT 1 FROM accounts WHERE id = ?1",
                params![account.id.as_str()],
                |_| Ok(()),
            )?;
            if exists.is_some() {
                return Err(Refusal::AccountExists(account.id.clone()).into());
            }
            ctx.execute(
                "INSERT INTO accounts (id, kind, currency, balance_minor, created_at_ms)
                 VALUES (?1, 'user', ?2, 0, ?3)",
                params![account.id.as_str(), account.currency.code(), now],
            )?;
            let opening = account.opening_balance.minor();
            if opening > 0 {
                let funding =
                    ctx.ensure_system_account(AccountKind::Funding, account.currency, now)?;
                let reference = format!("open:{}", account.id);
                ctx.post(
                    &reference,
                    &funding,
                    account.id.as_str(),
                    opening,
                    account.currency,
                    now,
                )?;
            }
            let created = Account {
                id: account.id.clone(),
                currency: account.currency,
                balance_minor: opening,
                shard: ctx.shard,
                created_at_ms: now,
            };
            ctx.outbox(
                "account.created",
                account.id.as_str(),
                serde_json::json!({
                    "account_id": account.id.as_str(),
                    "currency": account.currency.code(),
                    "opening_balance_minor": opening,
                    "shard": ctx.shard.index(),
                }),
                now,
            )?;
            let response = idempotency.as_ref().and_then(|i| i.response.as_ref());
            ctx.write_idempotency(idempotency.as_ref(), account.id.as_str(), response, now)?;
            Ok(created)
        })
        .await
    }

    async fn account(&self, id: &AccountId) -> Result<Option<Account>, StoreError> {
        let id = id.clone();
        self.read(move |ctx| {
            let row = ctx.query_opt(
                "SELECT id, currency, balance_minor, created_at_ms FROM accounts
                 WHERE id = ?1 AND kind = 'user'",
                params![id.as_str()],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )?;
            row.map(|r| account_from_row(ctx, r)).transpose()
        })
        .await
    }

    async fn list_accounts(
        &self,
        after: Option<AccountId>,
        limit: u32,
    ) -> Result<Vec<Account>, StoreError> {
        self.read(move |ctx| {
            let after = after.as_ref().map(|a| a.as_str()).unwrap_or("");
            let rows = ctx.query_all(
                "SELECT id, currency, balance_minor, created_at_ms FROM accounts
                 WHERE kind = 'user' AND id > ?1 ORDER BY id LIMIT ?2",
                params![after, limit],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )?;
            rows.into_iter().map(|r| account_from_row(ctx, r)).collect()
        })
        .await
    }

    async fn idempotency_record(
        &self,
        scope: &AccountId,
        key: &IdempotencyKey,
        now: TimestampMs,
    ) -> Result<Option<IdempotencyRecord>, StoreError> {
        let (scope, key) = (scope.clone(), key.clone());
        self.read(move |ctx| ctx.idempotency_record(scope.as_str(), key.as_str(), now))
            .await
    }

    async fn save_idempotent_response(
        &self,
        scope: &AccountId,
        key: &IdempotencyKey,
        response: StoredResponse,
    ) -> Result<(), StoreError> {
        let (scope, key) = (scope.clone(), key.clone());
        self.write(move |ctx| {
            ctx.execute(
                "UPDATE idempotency_keys SET response_status = ?3, response_body = ?4
                 WHERE scope = ?1 AND key = ?2 AND response_status IS NULL",
                params![scope.as_str(), key.as_str(), response.status, response.body],
            )?;
            Ok(())
        })
        .await
    }

    async fn record_decline(
        &self,
        idempotency: IdempotencyWrite,
        transfer_id: &TransferId,
        response: StoredResponse,
        now: TimestampMs,
    ) -> Result<(), StoreError> {
        let id = transfer_id.clone();
        self.write(move |ctx| {
            ctx.claim_idempotency(Some(&idempotency), now)?;
            ctx.write_idempotency(Some(&idempotency), id.as_str(), Some(&response), now)
        })
        .await
    }

    async fn transfer_local(
        &self,
        transfer: &Transfer,
        idempotency: Option<IdempotencyWrite>,
    ) -> Result<DebitOutcome, StoreError> {
        let t = transfer.clone();
        self.write(move |ctx| {
            let now = t.created_at_ms;
            debug_assert_eq!(t.payer_shard, t.payee_shard);
            ctx.claim_idempotency(idempotency.as_ref(), now)?;
            let decline = ctx.check_payer(&t)?;
            if let Some(refusal) = ctx.payee_refusal(&t)? {
                return Err(refusal.into());
            }
            if let Some(refusal) = decline {
                return ctx.decline(&t, refusal, idempotency.as_ref(), now);
            }
            let mut done = t.clone();
            done.state = TransferState::Completed;
            ctx.post(
                t.id.as_str(),
                t.payer.as_str(),
                t.payee.as_str(),
                t.amount.minor(),
                t.currency,
                now,
            )?;
            ctx.insert_transfer(&done)?;
            ctx.transfer_event("transfer.completed", &done)?;
            let response = idempotency.as_ref().and_then(|i| i.response.as_ref());
            ctx.write_idempotency(idempotency.as_ref(), t.id.as_str(), response, now)?;
            Ok(DebitOutcome::Applied(done))
        })
        .await
    }

    async fn debit_to_in_flight(
        &self,
        transfer: &Transfer,
        idempotency: Option<IdempotencyWrite>,
    ) -> Result<DebitOutcome, StoreError> {
        let t = transfer.clone();
        self.write(move |ctx| {
            let now = t.created_at_ms;
            ctx.claim_idempotency(idempotency.as_ref(), now)?;
            if let Some(refusal) = ctx.check_payer(&t)? {
                return ctx.decline(&t, refusal, idempotency.as_ref(), now);
            }
            let mut pending = t.clone();
            pending.state = TransferState::Pending;
            let in_flight = ctx.ensure_system_account(AccountKind::InFlight, t.currency, now)?;
            ctx.post(
                t.id.as_str(),
                t.payer.as_str(),
                &in_flight,
                t.amount.minor(),
                t.currency,
                now,
            )?;
            ctx.insert_transfer(&pending)?;
            ctx.transfer_event("transfer.initiated", &pending)?;
            let response = idempotency.as_ref().and_then(|i| i.response.as_ref());
            ctx.write_idempotency(idempotency.as_ref(), t.id.as_str(), response, now)?;
            Ok(DebitOutcome::Applied(pending))
        })
        .await
    }

    async fn credit_from_in_flight(
        &self,
        transfer: &Transfer,
    ) -> Result<CreditOutcome, StoreError> {
        let t = transfer.clone();
        self.write(move |ctx| {
            if let Some(outcome) = ctx.credit_outcome(t.id.as_str())? {
                return Ok(outcome);
            }
            let now = super::now_ms();
            let refusal = ctx.payee_refusal(&t)?;
            let (outcome, code) = match &refusal {
                None => ("credited", None),
                Some(r) => ("refused", Some(r.code())),
            };
            ctx.execute(
                "INSERT INTO inbound_credits (transfer_id, payer, payee, amount_minor, currency,
                    payer_shard, outcome, refusal_code, created_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    t.id.as_str(),
                    t.payer.as_str(),
                    t.payee.as_str(),
                    t.amount.minor(),
                    t.currency.code(),
                    t.payer_shard.index() as i64,
                    outcome,
                    code,
                    now
                ],
            )?;
            if let Some(refusal) = refusal {
                return Ok(CreditOutcome::Refused {
                    code: refusal.code().to_string(),
                });
            }
            let in_flight = ctx.ensure_system_account(AccountKind::InFlight, t.currency, now)?;
            ctx.post(
                t.id.as_str(),
                &in_flight,
                t.payee.as_str(),
                t.amount.minor(),
                t.currency,
                now,
            )?;
            Ok(CreditOutcome::Credited)
        })
        .await
    }

    async fn complete_transfer(
        &self,
        id: &TransferId,
        now: TimestampMs,
    ) -> Result<Transfer, StoreError> {
        let id = id.clone();
        self.write(move |ctx| {
            let changed = ctx.execute(
                "UPDATE transfers SET state = 'completed', updated_at_ms = ?2
                 WHERE id = ?1 AND state = 'pending'",
                params![id.as_str(), now],
            )?;
            let t = ctx
                .transfer(id.as_str())?
                .ok_or_else(|| ctx.corrupt(format!("transfer {id} not found to complete")))?;
            if changed == 1 {
                ctx.transfer_event("transfer.completed", &t)?;
            }
            Ok(t)
        })
        .await
    }

    async fn reverse_transfer(
        &self,
        id: &TransferId,
        code: &str,
        now: TimestampMs,
    ) -> Result<Transfer, StoreError> {
        let (id, code) = (id.clone(), code.to_string());
        self.write(move |ctx| {
            let t = ctx
                .transfer(id.as_str())?
                .ok_or_else(|| ctx.corrupt(format!("transfer {id} not found to reverse")))?;
            if t.state != TransferState::Pending {
                return Ok(t);
            }
            let in_flight = ctx.ensure_system_account(AccountKind::InFlight, t.currency, now)?;
            ctx.post(
                t.id.as_str(),
                &in_flight,
                t.payer.as_str(),
                t.amount.minor(),
                t.currency,
                now,
            )?;
            ctx.execute(
                "UPDATE transfers SET state = 'failed', failure_code = ?2, updated_at_ms = ?3
                 WHERE id = ?1",
                params![id.as_str(), code, now],
            )?;
            let failed = ctx
                .transfer(id.as_str())?
                .ok_or_else(|| ctx.corrupt(format!("transfer {id} vanished")))?;
            ctx.transfer_event("transfer.failed", &failed)?;
            Ok(failed)
        })
        .await
    }

    async fn transfer(&self, id: &TransferId) -> Result<Option<Transfer>, StoreError> {
        let id = id.clone();
        self.read(move |ctx| ctx.transfer(id.as_str())).await
    }

    async fn account_entries(
        &self,
        account: &AccountId,
        after: i64,
        limit: u32,
    ) -> Result<Vec<LedgerEntry>, StoreError> {
        let account = account.clone();
        self.read(move |ctx| {
            ctx.query_all(
                "SELECT id, transfer_id, account_id, amount_minor, currency, created_at_ms
                 FROM ledger_entries WHERE account_id = ?1 AND id > ?2 ORDER BY id LIMIT ?3",
                params![account.as_str(), after, limit],
                |r| {
                    Ok(LedgerEntry {
                        id: r.get(0)?,
                        transfer_id: r.get(1)?,
                        account_id: r.get(2)?,
                        amount_minor: r.get(3)?,
                        currency: r.get(4)?,
                        created_at_ms: r.get(5)?,
                    })
                },
            )
        })
        .await
    }

    async fn pending_transfers(
        &self,
        created_before: TimestampMs,
        limit: u32,
    ) -> Result<Vec<Transfer>, StoreError> {
        self.read(move |ctx| {
            let rows = ctx.query_all(
                &format!(
                    "SELECT {TRANSFER_COLUMNS} FROM transfers
                     WHERE state = 'pending' AND created_at_ms < ?1
                     ORDER BY created_at_ms LIMIT ?2"
                ),
                params![created_before, limit],
                RawTransfer::from_row,
            )?;
            rows.into_iter().map(|raw| raw.parse(ctx)).collect()
        })
        .await
    }

    async fn credit_outcome(&self, id: &TransferId) -> Result<Option<CreditOutcome>, StoreError> {
        let id = id.clone();
        self.read(move |ctx| ctx.credit_outcome(id.as_str())).await
    }

    async fn outbox_page(
        &self,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<OutboxEvent>, StoreError> {
        let shard = self.shard;
        self.read(move |ctx| {
            ctx.query_all(
                "SELECT id, event_id, event_type, aggregate_id, payload, created_at_ms FROM outbox
                 WHERE id > ?1 ORDER BY id LIMIT ?2",
                params![after_seq, limit as i64],
                |r| outbox_event(r, shard),
            )
        })
        .await
    }

    async fn unpublished_events(&self, limit: u32) -> Result<Vec<OutboxEvent>, StoreError> {
        let shard = self.shard;
        self.read(move |ctx| {
            ctx.query_all(
                "SELECT id, event_id, event_type, aggregate_id, payload, created_at_ms FROM outbox
                 WHERE published_at_ms IS NULL ORDER BY id LIMIT ?1",
                [limit as i64],
                |r| outbox_event(r, shard),
            )
        })
        .await
    }

    async fn mark_published(&self, seqs: &[i64], now: TimestampMs) -> Result<(), StoreError> {
        let seqs = seqs.to_vec();
        self.write(move |ctx| {
            for seq in &seqs {
                ctx.execute(
                    "UPDATE outbox SET published_at_ms = ?2 WHERE id = ?1 AND published_at_ms IS NULL",
                    params![seq, now],
                )?;
            }
            Ok(())
        })
        .await
    }

    async fn outbox_counts(&self) -> Result<(u64, u64), StoreError> {
        self.read(|ctx| {
            let all = ctx
                .query_opt("SELECT COUNT(*) FROM outbox", [], |r| r.get::<_, i64>(0))?
                .unwrap_or(0);
            let unpublished = ctx
                .query_opt(
                    "SELECT COUNT(*) FROM outbox WHERE published_at_ms IS NULL",
                    [],
                    |r| r.get::<_, i64>(0),
                )?
                .unwrap_or(0);
            Ok((all as u64, unpublished as u64))
        })
        .await
    }

    async fn stats(&self) -> Result<ShardStats, StoreError> {
        self.read(|ctx| {
            let accounts = ctx
                .query_opt(
                    "SELECT COUNT(*) FROM accounts WHERE kind = 'user'",
                    [],
                    |r| r.get::<_, i64>(0),
                )?
                .unwrap_or(0) as u64;
            let balances = ctx.query_all(
                "SELECT currency, SUM(balance_minor) FROM accounts WHERE kind = 'user'
                 GROUP BY currency ORDER BY currency",
                [],
                |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)),
            )?;
            let states = ctx.query_all(
                "SELECT state, COUNT(*) FROM transfers GROUP BY state",
                [],
                |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64)),
            )?;
            let mut stats = ShardStats {
                accounts,
                ..Default::default()
            };
            for (code, sum) in balances {
                stats
                    .balance_minor_by_currency
                    .push((ctx.currency(&code)?, sum as i128));
            }
            for (state, count) in states {
                match state.as_str() {
                    "pending" => stats.transfers_pending = count,
                    "completed" => stats.transfers_completed = count,
                    _ => stats.transfers_failed = count,
                }
            }
            Ok(stats)
        })
        .await
    }

    async fn audit(&self) -> Result<ShardAudit, StoreError> {
        self.read(|ctx| {
            ctx.conn.execute_batch("BEGIN").map_err(|e| ctx.err(e))?;
            let result = audit_snapshot(ctx);
            let _ = ctx.conn.execute_batch("COMMIT");
            result
        })
        .await
    }

    async fn purge_expired_idempotency(
        &self,
        now: TimestampMs,
        limit: u32,
    ) -> Result<u64, StoreError> {
        self.write(move |ctx| {
            let deleted = ctx.execute(
                "DELETE FROM idempotency_keys WHERE (scope, key) IN (
                     SELECT scope, key FROM idempotency_keys
                     WHERE expires_at_ms <= ?1 LIMIT ?2)",
                params![now, limit],
            )?;
            Ok(deleted as u64)
        })
        .await
    }
}

fn sums_by_currency(ctx: &Ctx<'_>, sql: &str) -> Result<Vec<(Currency, i128)>, StoreError> {
    let rows = ctx.query_all(sql, [], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, Option<i64>>(1)?))
    })?;
    rows.into_iter()
        .map(|(code, sum)| Ok((ctx.currency(&code)?, sum.unwrap_or(0) as i128)))
        .collect()
}

/// Reads every figure the audit needs, inside one read transaction.
fn audit_snapshot(ctx: &Ctx<'_>) -> Result<ShardAudit, StoreError> {
    let mut audit = ShardAudit {
        entry_sum_by_currency: sums_by_currency(
            ctx,
            "SELECT currency, SUM(amount_minor) FROM ledger_entries GROUP BY currency",
        )?,
        ..Default::default()
    };
    audit.balance_mismatches = ctx.query_all(
        "SELECT a.id || ': balance ' || a.balance_minor || ', entries ' || COALESCE(e.total, 0)
         FROM accounts a
         LEFT JOIN (SELECT account_id, SUM(amount_minor) AS total FROM ledger_entries
                    GROUP BY account_id) e ON e.account_id = a.id
         WHERE a.balance_minor <> COALESCE(e.total, 0)",
        [],
        |r| r.get(0),
    )?;
    audit.negative_balances = ctx.query_all(
        "SELECT id || ': ' || balance_minor FROM accounts WHERE kind = 'user' AND balance_minor < 0",
        [],
        |r| r.get(0),
    )?;
    let totals = ctx.query_all(
        "SELECT kind, currency, SUM(balance_minor) FROM accounts GROUP BY kind, currency",
        [],
        |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
            ))
        },
    )?;
    for (kind, code, sum) in totals {
        let kind = AccountKind::parse(&kind)
            .ok_or_else(|| ctx.corrupt(format!("unknown account kind {kind:?}")))?;
        audit.totals.push((kind, ctx.currency(&code)?, sum as i128));
    }
    // Each transfer's entries on its payer's shard, against its state:
    // same-shard completed: payer -amount, payee +amount (2 entries);
    // cross-shard pending or completed: payer -amount, in-flight +amount;
    // cross-shard failed: those two and their reversal (4, payer net 0).
    audit.bad_transfers = ctx.query_all(
        "SELECT t.id, t.state, t.payer_shard <> t.payee_shard, t.amount_minor,
                COUNT(e.id), COALESCE(SUM(e.amount_minor), 0),
                COALESCE(SUM(CASE WHEN e.account_id = t.payer THEN e.amount_minor END), 0)
         FROM transfers t LEFT JOIN ledger_entries e ON e.transfer_id = t.id
         GROUP BY t.id",
        [],
        |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, bool>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, i64>(5)?,
                r.get::<_, i64>(6)?,
            ))
        },
    )?
    .into_iter()
    .filter_map(|(id, state, cross, amount, count, net, payer_net)| {
        let (want_count, want_payer) = match (state.as_str(), cross) {
            ("completed", false) => (2, -amount),
            ("pending" | "completed", true) => (2, -amount),
            ("failed", true) => (4, 0),
            _ => (-1, 0),
        };
        let ok = count == want_count && net == 0 && payer_net == want_payer;
        (!ok).then(|| {
            format!(
                "{id} ({state}, cross_shard={cross}): {count} entries, payer net {payer_net}, expected {want_count} entries and payer net {want_payer}"
            )
        })
    })
    .collect();
    audit.bad_credits = ctx
        .query_all(
            "SELECT c.transfer_id, c.outcome, c.amount_minor, COUNT(e.id),
                COALESCE(SUM(CASE WHEN e.account_id = c.payee THEN e.amount_minor END), 0)
         FROM inbound_credits c LEFT JOIN ledger_entries e ON e.transfer_id = c.transfer_id
         GROUP BY c.transfer_id",
            [],
            |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, i64>(4)?,
                ))
            },
        )?
        .into_iter()
        .filter_map(|(id, outcome, amount, count, payee_net)| {
            let (want_count, want_payee) = if outcome == "credited" {
                (2, amount)
            } else {
                (0, 0)
            };
            (count != want_count || payee_net != want_payee)
                .then(|| format!("credit {id} ({outcome}): {count} entries, payee net {payee_net}"))
        })
        .collect();
    audit.orphan_entries = ctx
        .query_opt(
            "SELECT COUNT(*) FROM ledger_entries e
             WHERE e.transfer_id NOT LIKE 'open:%'
               AND NOT EXISTS (SELECT 1 FROM transfers t WHERE t.id = e.transfer_id)
               AND NOT EXISTS (SELECT 1 FROM inbound_credits c WHERE c.transfer_id = e.transfer_id)",
            [],
            |r| r.get::<_, i64>(0),
        )?
        .unwrap_or(0) as u64;
    audit.pending = ctx
        .query_all(
            &format!("SELECT {TRANSFER_COLUMNS} FROM transfers WHERE state = 'pending'"),
            [],
            RawTransfer::from_row,
        )?
        .into_iter()
        .map(|raw| raw.parse(ctx))
        .collect::<Result<_, _>>()?;
    audit.sent_minor_by_currency = sums_by_currency(
        ctx,
        "SELECT currency, SUM(amount_minor) FROM transfers
         WHERE payer_shard <> payee_shard AND state <> 'failed' GROUP BY currency",
    )?;
    audit.received_minor_by_currency = sums_by_currency(
        ctx,
        "SELECT currency, SUM(amount_minor) FROM inbound_credits
         WHERE outcome = 'credited' GROUP BY currency",
    )?;
    audit.completed_cross_out = ctx
        .query_opt(
            "SELECT COUNT(*), COALESCE(SUM(amount_minor), 0) FROM transfers
             WHERE payer_shard <> payee_shard AND state = 'completed'",
            [],
            |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as i128)),
        )?
        .unwrap_or_default();
    audit.credited_in = ctx
        .query_opt(
            "SELECT COUNT(*), COALESCE(SUM(amount_minor), 0) FROM inbound_credits
             WHERE outcome = 'credited'",
            [],
            |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as i128)),
        )?
        .unwrap_or_default();
    Ok(audit)
}

/// An outbox row read as `id, event_id, event_type, aggregate_id, payload,
/// created_at_ms`.
fn outbox_event(r: &rusqlite::Row<'_>, shard: ShardId) -> rusqlite::Result<OutboxEvent> {
    Ok(OutboxEvent {
        seq: r.get(0)?,
        event_id: r.get(1)?,
        event_type: r.get(2)?,
        key: r.get(3)?,
        shard,
        payload: r.get(4)?,
        created_at_ms: r.get(5)?,
    })
}
