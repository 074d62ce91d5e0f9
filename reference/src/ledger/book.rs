//! The ledger's logic, written once for every backend.
//!
//! Every write a shard makes (an account with its opening balance, a
//! same-shard transfer, each step of the saga, each branch of an XA
//! transfer, idempotency records, outbox rows) and every read is a function
//! here, generic over a [`Session`]: a connection inside a transaction that
//! a backend provides. A backend supplies only what differs between
//! databases: how a statement is sent and its rows read, the few
//! statements whose SQL differs ([`Dialect`]), whether rows are locked with
//! `FOR UPDATE`, how a transaction begins, commits and is retried.
//!
//! The SQL below is the dialect both SQLite and MySQL/MariaDB accept:
//! positional `?` parameters, the `key` column in backticks, integer casts
//! written `CAST(.. AS SIGNED)` and sums read back as text (`CAST(.. AS
//! CHAR)`), since a sum of `BIGINT`s may pass `i64`.

use crate::ids::{AccountId, IdempotencyKey, ShardId, TransferId};
use crate::money::{Amount, Currency};

use super::{
    payee_refusal, payer_refusal, Account, AccountKind, CreditOutcome, DebitOutcome,
    IdempotencyRecord, IdempotencyWrite, KeptKey, LedgerEntry, MovedOut, MovingAccount, NewAccount,
    OutboxEvent, PlacementRecord, Refusal, ShardStats, StoreError, StoredResponse, TimestampMs,
    Transfer, TransferState,
};
use super::{AccountMismatch, CreditEntries, ShardAudit, TransferEntries};

/// Implements [`ShardStore`] for a backend from its two ways of running
/// ledger code: `$write!(self, |s| body)` runs `body` (a future using the
/// backend's session `s`) as one transaction that commits on `Ok`, and
/// `$read!(self, |s| body)` runs it as a read. Every method is the
/// matching function of `book`; the arguments are owned before they go
/// in, as a backend may run the body on a thread of its own. `$extra` adds
/// methods (two-phase commit, where the backend has it).
macro_rules! shard_store {
    ($backend:ty, $write:ident, $read:ident $(, $($extra:tt)*)?) => {
        #[async_trait::async_trait]
        impl $crate::ledger::ShardStore for $backend {
            fn shard(&self) -> $crate::ids::ShardId {
                self.shard
            }

            async fn create_account(
                &self,
                account: $crate::ledger::NewAccount,
                idempotency: Option<$crate::ledger::IdempotencyWrite>,
            ) -> Result<$crate::ledger::Account, $crate::ledger::StoreError> {
                $write!(self, |s| book::create_account(s, &account, idempotency.as_ref()))
            }

            async fn account(
                &self,
                id: &$crate::ids::AccountId,
            ) -> Result<Option<$crate::ledger::Account>, $crate::ledger::StoreError> {
                let id = id.clone();
                $read!(self, |s| book::account(s, &id))
            }

            async fn lookup(
                &self,
                lookup: $crate::ledger::Lookup,
            ) -> Result<$crate::ledger::Looked, $crate::ledger::StoreError> {
                $read!(self, |s| book::lookup(s, &lookup))
            }

            async fn list_accounts(
                &self,
                after: Option<$crate::ids::AccountId>,
                limit: u32,
            ) -> Result<Vec<$crate::ledger::Account>, $crate::ledger::StoreError> {
                $read!(self, |s| book::list_accounts(s, after.as_ref(), limit))
            }

            async fn idempotency_record(
                &self,
                scope: &$crate::ids::AccountId,
                key: &$crate::ids::IdempotencyKey,
                now: $crate::ledger::TimestampMs,
            ) -> Result<Option<$crate::ledger::IdempotencyRecord>, $crate::ledger::StoreError> {
                let (scope, key) = (scope.clone(), key.clone());
                $read!(self, |s| book::idempotency_record(s, &scope, &key, now))
            }

            async fn save_idempotent_response(
                &self,
                scope: &$crate::ids::AccountId,
                key: &$crate::ids::IdempotencyKey,
                response: $crate::ledger::StoredResponse,
            ) -> Result<(), $crate::ledger::StoreError> {
                let (scope, key) = (scope.clone(), key.clone());
                $write!(self, |s| book::save_idempotent_response(s, &scope, &key, &response))
            }

            async fn record_decline(
                &self,
                idempotency: $crate::ledger::IdempotencyWrite,
                transfer_id: &$crate::ids::TransferId,
                response: $crate::ledger::StoredResponse,
                now: $crate::ledger::TimestampMs,
            ) -> Result<(), $crate::ledger::StoreError> {
                let id = transfer_id.clone();
                $write!(self, |s| book::record_decline(s, &idempotency, &id, &response, now))
            }

            async fn transfer_local(
                &self,
                transfer: &$crate::ledger::Transfer,
                idempotency: Option<$crate::ledger::IdempotencyWrite>,
            ) -> Result<$crate::ledger::DebitOutcome, $crate::ledger::StoreError> {
                let t = transfer.clone();
                $write!(self, |s| book::transfer_local(s, &t, idempotency.as_ref()))
            }

            async fn debit_to_in_flight(
                &self,
                transfer: &$crate::ledger::Transfer,
                idempotency: Option<$crate::ledger::IdempotencyWrite>,
            ) -> Result<$crate::ledger::DebitOutcome, $crate::ledger::StoreError> {
                let t = transfer.clone();
                let step = ($crate::ledger::TransferState::Pending, "transfer.initiated");
                $write!(self, |s| book::debit_to_in_flight(s, &t, step, idempotency.as_ref()))
            }

            async fn credit_from_in_flight(
                &self,
                transfer: &$crate::ledger::Transfer,
            ) -> Result<$crate::ledger::CreditOutcome, $crate::ledger::StoreError> {
                let t = transfer.clone();
                $write!(self, |s| book::credit_from_in_flight(s, &t))
            }

            async fn complete_transfer(
                &self,
                id: &$crate::ids::TransferId,
                now: $crate::ledger::TimestampMs,
            ) -> Result<$crate::ledger::Transfer, $crate::ledger::StoreError> {
                let id = id.clone();
                $write!(self, |s| book::complete_transfer(s, &id, now))
            }

            async fn reverse_transfer(
                &self,
                id: &$crate::ids::TransferId,
                code: &str,
                now: $crate::ledger::TimestampMs,
            ) -> Result<$crate::ledger::Transfer, $crate::ledger::StoreError> {
                let (id, code) = (id.clone(), code.to_string());
                $write!(self, |s| book::reverse_transfer(s, &id, &code, now))
            }

            async fn transfer(
                &self,
                id: &$crate::ids::TransferId,
            ) -> Result<Option<$crate::ledger::Transfer>, $crate::ledger::StoreError> {
                let id = id.clone();
                $read!(self, |s| book::transfer(s, &id))
            }

            async fn account_to_move(
                &self,
                id: &$crate::ids::AccountId,
            ) -> Result<Option<$crate::ledger::MovingAccount>, $crate::ledger::StoreError> {
                let id = id.clone();
                $read!(self, |s| book::account_to_move(s, &id))
            }

            async fn adopt_account(
                &self,
                moving: $crate::ledger::MovingAccount,
            ) -> Result<(), $crate::ledger::StoreError> {
                $write!(self, |s| book::adopt_account(s, &moving))
            }

            async fn disown(
                &self,
                id: &$crate::ids::AccountId,
                home: $crate::ids::ShardId,
            ) -> Result<(), $crate::ledger::StoreError> {
                let id = id.clone();
                $write!(self, |s| book::disown(s, &id, home))
            }

            async fn move_out(
                &self,
                id: &$crate::ids::AccountId,
                to: $crate::ids::ShardId,
                transfer_id: &$crate::ids::TransferId,
                now: $crate::ledger::TimestampMs,
                keep_open: bool,
            ) -> Result<$crate::ledger::MovedOut, $crate::ledger::StoreError> {
                let (id, transfer_id) = (id.clone(), transfer_id.clone());
                $write!(self, |s| book::move_out(s, &id, to, &transfer_id, now, keep_open))
            }

            async fn forwarding(
                &self,
            ) -> Result<Vec<($crate::ids::AccountId, $crate::ids::ShardId)>, $crate::ledger::StoreError>
            {
                $read!(self, |s| book::forwarding(s))
            }

            async fn moved_to(
                &self,
                id: &$crate::ids::AccountId,
            ) -> Result<Option<$crate::ids::ShardId>, $crate::ledger::StoreError> {
                let id = id.clone();
                $read!(self, |s| book::moved_to(s, id.as_str()))
            }

            async fn finish_move(
                &self,
                id: &$crate::ids::TransferId,
                now: $crate::ledger::TimestampMs,
            ) -> Result<(), $crate::ledger::StoreError> {
                let id = id.clone();
                $write!(self, |s| book::finish_move(s, &id, now))
            }

            async fn arrived(
                &self,
                id: &$crate::ids::AccountId,
            ) -> Result<(), $crate::ledger::StoreError> {
                let id = id.clone();
                $write!(self, |s| book::arrived(s, &id))
            }

            async fn fence_creates(
                &self,
                strategy: $crate::sharding::Strategy,
                shards: u32,
            ) -> Result<(), $crate::ledger::StoreError> {
                $write!(self, |s| book::fence_creates(s, strategy, shards))
            }

            async fn placement(
                &self,
            ) -> Result<Option<$crate::ledger::PlacementRecord>, $crate::ledger::StoreError> {
                $read!(self, |s| book::placement(s))
            }

            async fn save_placement(
                &self,
                placement: $crate::ledger::PlacementRecord,
            ) -> Result<(), $crate::ledger::StoreError> {
                $write!(self, |s| book::save_placement(s, placement))
            }

            async fn account_entries(
                &self,
                account: &$crate::ids::AccountId,
                after: i64,
                limit: u32,
            ) -> Result<Vec<$crate::ledger::LedgerEntry>, $crate::ledger::StoreError> {
                let account = account.clone();
                $read!(self, |s| book::account_entries(s, &account, after, limit))
            }

            async fn pending_transfers(
                &self,
                created_before: $crate::ledger::TimestampMs,
                limit: u32,
            ) -> Result<Vec<$crate::ledger::Transfer>, $crate::ledger::StoreError> {
                $read!(self, |s| book::pending_transfers(s, created_before, limit))
            }

            async fn credit_outcome(
                &self,
                id: &$crate::ids::TransferId,
            ) -> Result<Option<$crate::ledger::CreditOutcome>, $crate::ledger::StoreError> {
                let id = id.clone();
                $read!(self, |s| book::credit_outcome(s, &id))
            }

            async fn stats(&self) -> Result<$crate::ledger::ShardStats, $crate::ledger::StoreError> {
                $read!(self, |s| book::stats(s))
            }

            async fn audit(&self) -> Result<$crate::ledger::ShardAudit, $crate::ledger::StoreError> {
                $read!(self, |s| book::audit(s))
            }

            async fn purge_expired_idempotency(
                &self,
                now: $crate::ledger::TimestampMs,
                limit: u32,
            ) -> Result<u64, $crate::ledger::StoreError> {
                $write!(self, |s| book::purge_expired_idempotency(s, now, limit))
            }

            async fn outbox_page(
                &self,
                after_seq: i64,
                limit: u32,
            ) -> Result<Vec<$crate::ledger::OutboxEvent>, $crate::ledger::StoreError> {
                $read!(self, |s| book::outbox_page(s, after_seq, limit))
            }

            async fn unpublished_events(
                &self,
                limit: u32,
            ) -> Result<Vec<$crate::ledger::OutboxEvent>, $crate::ledger::StoreError> {
                $read!(self, |s| book::unpublished_events(s, limit))
            }

            async fn mark_published(
                &self,
                seqs: &[i64],
                now: $crate::ledger::TimestampMs,
            ) -> Result<(), $crate::ledger::StoreError> {
                if seqs.is_empty() {
                    return Ok(());
                }
                let seqs = seqs.to_vec();
                $write!(self, |s| book::mark_published(s, &seqs, now))
            }

            async fn outbox_counts(&self) -> Result<(u64, u64), $crate::ledger::StoreError> {
                $read!(self, |s| book::outbox_counts(s))
            }

            async fn stage_outbox(&self, limit: u32) -> Result<u64, $crate::ledger::StoreError> {
                $write!(self, |s| book::stage_outbox(s, limit))
            }

            async fn outbox_tail(
                &self,
                after_position: i64,
                limit: u32,
            ) -> Result<Vec<$crate::ledger::OutboxEvent>, $crate::ledger::StoreError> {
                $read!(self, |s| book::outbox_tail(s, after_position, limit))
            }

            async fn prune_outbox(
                &self,
                published_before: $crate::ledger::TimestampMs,
                limit: u32,
            ) -> Result<u64, $crate::ledger::StoreError> {
                $write!(self, |s| book::prune_outbox(s, published_before, limit))
            }

            async fn consumer_snapshot(
                &self,
                consumer: &str,
            ) -> Result<Option<(i64, String)>, $crate::ledger::StoreError> {
                let consumer = consumer.to_string();
                $read!(self, |s| book::consumer_snapshot(s, &consumer))
            }

            async fn save_consumer_snapshot(
                &self,
                consumer: &str,
                position: i64,
                body: String,
            ) -> Result<(), $crate::ledger::StoreError> {
                let consumer = consumer.to_string();
                let now = $crate::ledger::now_ms();
                $write!(self, |s| book::save_consumer_snapshot(s, &consumer, position, &body, now))
            }

            $($($extra)*)?
        }
    };
}
pub(crate) use shard_store;

/// A statement parameter.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Param<'a> {
    Int(i64),
    Text(&'a str),
    Null,
}

impl From<i64> for Param<'_> {
    fn from(v: i64) -> Self {
        Param::Int(v)
    }
}

impl<'a> From<&'a str> for Param<'a> {
    fn from(v: &'a str) -> Self {
        Param::Text(v)
    }
}

impl<'a> From<Option<&'a str>> for Param<'a> {
    fn from(v: Option<&'a str>) -> Self {
        v.map_or(Param::Null, Param::Text)
    }
}

impl From<Option<i64>> for Param<'_> {
    fn from(v: Option<i64>) -> Self {
        v.map_or(Param::Null, Param::Int)
    }
}

/// One value of a result row, as the backend read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Cell {
    Null,
    Int(i64),
    Text(String),
}

/// One result row, with the shard it came from (for error messages).
#[derive(Debug)]
pub(crate) struct Row {
    pub cells: Vec<Cell>,
    pub shard: ShardId,
}

impl Row {
    fn bad(&self, index: usize, want: &str) -> StoreError {
        corrupt(
            self.shard,
            format!(
                "column {index} is {:?}, expected {want}",
                self.cells.get(index)
            ),
        )
    }

    fn int(&self, index: usize) -> Result<i64, StoreError> {
        match self.cells.get(index) {
            Some(Cell::Int(v)) => Ok(*v),
            Some(Cell::Text(t)) => t.parse().map_err(|_| self.bad(index, "an integer")),
            _ => Err(self.bad(index, "an integer")),
        }
    }

    fn opt_int(&self, index: usize) -> Result<Option<i64>, StoreError> {
        match self.cells.get(index) {
            Some(Cell::Null) => Ok(None),
            _ => self.int(index).map(Some),
        }
    }

    /// A sum, read as text or integer; `NULL` (no rows summed) is zero.
    fn sum(&self, index: usize) -> Result<i128, StoreError> {
        match self.cells.get(index) {
            Some(Cell::Null) => Ok(0),
            Some(Cell::Int(v)) => Ok(*v as i128),
            Some(Cell::Text(t)) => t.parse().map_err(|_| self.bad(index, "a sum")),
            None => Err(self.bad(index, "a sum")),
        }
    }

    fn text(&self, index: usize) -> Result<String, StoreError> {
        match self.cells.get(index) {
            Some(Cell::Text(t)) => Ok(t.clone()),
            _ => Err(self.bad(index, "text")),
        }
    }

    fn opt_text(&self, index: usize) -> Result<Option<String>, StoreError> {
        match self.cells.get(index) {
            Some(Cell::Null) => Ok(None),
            _ => self.text(index).map(Some),
        }
    }

    fn currency(&self, index: usize) -> Result<Currency, StoreError> {
        let code = self.text(index)?;
        Currency::parse(&code).map_err(|_| {
            corrupt(
                self.shard,
                format!("unknown currency {code:?} in the shard"),
            )
        })
    }
}

pub(crate) fn corrupt(shard: ShardId, reason: String) -> StoreError {
    StoreError::Internal { shard, reason }
}

/// The statements whose SQL differs between backends.
pub(crate) struct Dialect {
    /// Inserts a system account unless it exists (`id, kind, currency,
    /// created_at_ms`).
    pub insert_system_account: &'static str,
    /// Deletes up to `?2` idempotency records expired at `?1`.
    pub purge_expired: &'static str,
    /// Opens a read-only transaction that sees one snapshot of the shard.
    pub begin_snapshot: &'static [&'static str],
    /// Rows of `shard_counters`: a transaction updates one, picked by a
    /// hash of what it changes, and a read sums them all.
    pub counter_slots: i64,
    /// Writes a consumer's snapshot (`consumer, position, body,
    /// updated_at_ms`), replacing the one it had unless that covers as
    /// much or more (replicas of the consumer save in any order).
    pub save_snapshot: &'static str,
}

/// A connection inside a transaction (or a read), as a backend provides it.
///
/// Its futures may complete without waiting (SQLite runs them on the
/// shard's own thread, see `sqlite::run_now`) or talk to a server (MySQL).
pub(crate) trait Session {
    fn shard(&self) -> ShardId;
    fn dialect(&self) -> &'static Dialect;
    /// Whether reads of rows about to change take row locks (`FOR UPDATE`):
    /// a server with many writers needs them; a file with one writer
    /// neither needs nor understands them.
    fn locks_rows(&self) -> bool;
    /// Runs a statement; answers the rows it changed.
    async fn execute(&mut self, sql: &str, params: &[Param<'_>]) -> Result<u64, StoreError>;
    /// Runs a query; answers its rows.
    async fn rows(&mut self, sql: &str, params: &[Param<'_>]) -> Result<Vec<Row>, StoreError>;
}

/// A statement that locks the rows it reads where the backend locks rows:
/// the plain form and the `FOR UPDATE` form.
macro_rules! locking {
    ($sql:literal) => {
        [$sql, concat!($sql, " FOR UPDATE")]
    };
}

async fn row<S: Session>(
    s: &mut S,
    sql: &str,
    params: &[Param<'_>],
) -> Result<Option<Row>, StoreError> {
    Ok(s.rows(sql, params).await?.into_iter().next())
}

fn pick<S: Session>(s: &S, statement: &[&'static str; 2], lock: bool) -> &'static str {
    statement[(lock && s.locks_rows()) as usize]
}

// --- accounts -------------------------------------------------------------

const USER_ACCOUNT: [&str; 2] =
    locking!("SELECT currency, balance_minor FROM accounts WHERE id = ? AND kind = 'user'");

/// A customer account's (currency, balance), locked for the rest of the
/// transaction where the backend locks rows.
async fn user_account<S: Session>(
    s: &mut S,
    id: &AccountId,
) -> Result<Option<(Currency, i64)>, StoreError> {
    let sql = pick(s, &USER_ACCOUNT, true);
    match row(s, sql, &[id.as_str().into()]).await? {
        None => refuse_if_moved(s, id).await.map(|()| None),
        Some(r) => Ok(Some((r.currency(0)?, r.int(1)?))),
    }
}

/// The shard an account that lived here moved to, if it moved.
pub(crate) async fn moved_to<S: Session>(
    s: &mut S,
    id: &str,
) -> Result<Option<ShardId>, StoreError> {
    let Some(r) = row(
        s,
        "SELECT to_shard FROM moved_accounts WHERE id = ?",
        &[id.into()],
    )
    .await?
    else {
        return Ok(None);
    };
    let to = u32::try_from(r.int(0)?)
        .ok()
        .and_then(|i| ShardId::new(i).ok())
        .ok_or_else(|| r.bad(0, "a shard"))?;
    Ok(Some(to))
}

/// Refuses a write to an account that has moved away from this shard: the
/// writer routed it by a placement older than the move.
async fn refuse_if_moved<S: Session>(s: &mut S, id: &AccountId) -> Result<(), StoreError> {
    match moved_to(s, id.as_str()).await? {
        Some(shard) => Err(Refusal::AccountMoved {
            account: id.clone(),
            shard,
        }
        .into()),
        None => Ok(()),
    }
}

async fn add_balance<S: Session>(s: &mut S, id: &str, delta: i64) -> Result<(), StoreError> {
    let changed = s
        .execute(
            "UPDATE accounts SET balance_minor = balance_minor + ? WHERE id = ?",
            &[delta.into(), id.into()],
        )
        .await?;
    if changed != 1 {
        return Err(corrupt(
            s.shard(),
            format!("account {id} vanished during a transaction"),
        ));
    }
    Ok(())
}

/// Makes sure the system account of `kind` for `currency` exists; answers
/// its id. A plain read first: inserting over an existing row would take a
/// lock that the balance update after it must upgrade, and two transactions
/// doing that deadlock on a server that locks rows.
async fn system_account<S: Session>(
    s: &mut S,
    kind: AccountKind,
    currency: Currency,
    now: TimestampMs,
) -> Result<String, StoreError> {
    let id = kind.system_account_id(currency);
    let exists = row(
        s,
        "SELECT 1 FROM accounts WHERE id = ?",
        &[id.as_str().into()],
    )
    .await?;
    if exists.is_none() {
        let sql = s.dialect().insert_system_account;
        s.execute(
            sql,
            &[
                id.as_str().into(),
                kind.as_str().into(),
                currency.code().into(),
                now.into(),
            ],
        )
        .await?;
    }
    Ok(id)
}

/// Moves `amount` from `from` to `to`, with its two entries.
async fn post<S: Session>(
    s: &mut S,
    reference: &str,
    (from, to): (&str, &str),
    amount: i64,
    currency: Currency,
    now: TimestampMs,
) -> Result<(), StoreError> {
    add_balance(s, from, -amount).await?;
    add_balance(s, to, amount).await?;
    s.execute(
        "INSERT INTO ledger_entries (transfer_id, account_id, amount_minor, currency, created_at_ms)
         VALUES (?, ?, ?, ?, ?), (?, ?, ?, ?, ?)",
        &[
            reference.into(),
            from.into(),
            (-amount).into(),
            currency.code().into(),
            now.into(),
            reference.into(),
            to.into(),
            amount.into(),
            currency.code().into(),
            now.into(),
        ],
    )
    .await?;
    Ok(())
}

async fn outbox<S: Session>(
    s: &mut S,
    event_type: &str,
    aggregate_id: &str,
    payload: serde_json::Value,
    now: TimestampMs,
) -> Result<(), StoreError> {
    // Ordered by creation, like transfer ids: the outbox's unique index
    // and the consumers' applied-event tables grow at one end.
    let event_id = uuid::Uuid::now_v7().simple().to_string();
    let payload = payload.to_string();
    s.execute(
        "INSERT INTO outbox (event_id, event_type, aggregate_id, payload, created_at_ms)
         VALUES (?, ?, ?, ?, ?)",
        &[
            event_id.as_str().into(),
            event_type.into(),
            aggregate_id.into(),
            payload.as_str().into(),
            now.into(),
        ],
    )
    .await?;
    Ok(())
}

fn account_from_row(r: &Row) -> Result<Account, StoreError> {
    let id = r.text(0)?;
    Ok(Account {
        id: AccountId::parse(&id)
            .map_err(|_| corrupt(r.shard, format!("bad account id {id:?}")))?,
        currency: r.currency(1)?,
        balance_minor: r.int(2)?,
        shard: r.shard,
        created_at_ms: r.int(3)?,
    })
}

/// Creates a customer account, funding its opening balance from the shard's
/// funding account, with entries, outbox event and idempotency record.
pub(crate) async fn create_account<S: Session>(
    s: &mut S,
    account: &NewAccount,
    idem: Option<&IdempotencyWrite>,
) -> Result<Account, StoreError> {
    let now = account.created_at_ms;
    let id = account.id.as_str();
    claim_idempotency(s, idem, now).await?;
    // Two creates racing past this read: the second insert hits the primary
    // key, and the backend runs that transaction again, which finds the row.
    if row(s, "SELECT 1 FROM accounts WHERE id = ?", &[id.into()])
        .await?
        .is_some()
    {
        return Err(Refusal::AccountExists(account.id.clone()).into());
    }
    refuse_if_moved(s, &account.id).await?;
    refuse_if_fenced(s, &account.id).await?;
    s.execute(
        "INSERT INTO accounts (id, kind, currency, balance_minor, created_at_ms)
         VALUES (?, 'user', ?, 0, ?)",
        &[id.into(), account.currency.code().into(), now.into()],
    )
    .await?;
    let opening = account.opening_balance.minor();
    if opening > 0 {
        let funding = system_account(s, AccountKind::Funding, account.currency, now).await?;
        let reference = format!("open:{id}");
        post(
            s,
            &reference,
            (&funding, id),
            opening,
            account.currency,
            now,
        )
        .await?;
    }
    let payload = serde_json::json!({
        "account_id": id,
        "currency": account.currency.code(),
        "opening_balance_minor": opening,
        "shard": s.shard().index(),
    });
    outbox(s, "account.created", id, payload, now).await?;
    write_idempotency(s, idem, id, idem.and_then(|i| i.response.as_ref()), now).await?;
    let created = Counts {
        accounts: 1,
        outbox_rows: 1,
        ..Counts::default()
    };
    count(s, id, created).await?;
    Ok(Account {
        id: account.id.clone(),
        currency: account.currency,
        balance_minor: opening,
        shard: s.shard(),
        created_at_ms: now,
    })
}

/// The payer, the same-shard payee and the payer's key record, read on one
/// session.
pub(crate) async fn lookup<S: Session>(
    s: &mut S,
    lookup: &super::Lookup,
) -> Result<super::Looked, StoreError> {
    let payer = account(s, &lookup.payer).await?;
    let payee = match &lookup.payee {
        Some(id) => account(s, id).await?,
        None => None,
    };
    let record = match &lookup.key {
        Some((key, now)) => idempotency_record(s, &lookup.payer, key, *now).await?,
        None => None,
    };
    Ok(super::Looked {
        payer,
        payee,
        record,
    })
}

pub(crate) async fn account<S: Session>(
    s: &mut S,
    id: &AccountId,
) -> Result<Option<Account>, StoreError> {
    let found = row(
        s,
        "SELECT id, currency, balance_minor, created_at_ms FROM accounts
         WHERE id = ? AND kind = 'user'",
        &[id.as_str().into()],
    )
    .await?;
    found.as_ref().map(account_from_row).transpose()
}

pub(crate) async fn list_accounts<S: Session>(
    s: &mut S,
    after: Option<&AccountId>,
    limit: u32,
) -> Result<Vec<Account>, StoreError> {
    let after = after.map(|a| a.as_str()).unwrap_or("");
    let rows = s
        .rows(
            "SELECT id, currency, balance_minor, created_at_ms FROM accounts
             WHERE kind = 'user' AND id > ? ORDER BY id LIMIT ?",
            &[after.into(), i64::from(limit).into()],
        )
        .await?;
    rows.iter().map(account_from_row).collect()
}

pub(crate) async fn account_entries<S: Session>(
    s: &mut S,
    account: &AccountId,
    after: i64,
    limit: u32,
) -> Result<Vec<LedgerEntry>, StoreError> {
    let rows = s
        .rows(
            "SELECT id, transfer_id, account_id, amount_minor, currency, created_at_ms
             FROM ledger_entries WHERE account_id = ? AND id > ? ORDER BY id LIMIT ?",
            &[
                account.as_str().into(),
                after.into(),
                i64::from(limit).into(),
            ],
        )
        .await?;
    rows.iter()
        .map(|r| {
            Ok(LedgerEntry {
                id: r.int(0)?,
                transfer_id: r.text(1)?,
                account_id: r.text(2)?,
                amount_minor: r.int(3)?,
                currency: r.text(4)?,
                created_at_ms: r.int(5)?,
            })
        })
        .collect()
}

// --- idempotency ------------------------------------------------------------

const IDEMPOTENCY_RECORD: [&str; 2] = locking!(
    "SELECT fingerprint, resource_id, response_status, response_body, expires_at_ms
     FROM idempotency_keys WHERE scope = ? AND `key` = ?"
);

/// The record for `scope` and `key`, expired or not.
async fn idempotency_row<S: Session>(
    s: &mut S,
    scope: &str,
    key: &str,
    lock: bool,
) -> Result<Option<IdempotencyRecord>, StoreError> {
    let sql = pick(s, &IDEMPOTENCY_RECORD, lock);
    let Some(r) = row(s, sql, &[scope.into(), key.into()]).await? else {
        return Ok(None);
    };
    let status = r.opt_int(2)?;
    let status = status
        .map(|v| u16::try_from(v).map_err(|_| r.bad(2, "an HTTP status")))
        .transpose()?;
    Ok(Some(IdempotencyRecord {
        fingerprint: r.text(0)?,
        resource_id: r.opt_text(1)?,
        response: status
            .zip(r.opt_text(3)?)
            .map(|(status, body)| StoredResponse { status, body }),
        expires_at_ms: r.int(4)?,
    }))
}

/// The live (unexpired) record for `scope` and `key`.
pub(crate) async fn idempotency_record<S: Session>(
    s: &mut S,
    scope: &AccountId,
    key: &IdempotencyKey,
    now: TimestampMs,
) -> Result<Option<IdempotencyRecord>, StoreError> {
    let record = idempotency_row(s, scope.as_str(), key.as_str(), false).await?;
    Ok(record.filter(|r| r.expires_at_ms > now))
}

/// Refuses the write if a live record holds the key; clears an expired one.
/// The record is locked where the backend locks rows. Two requests racing
/// on a new key both pass; the second one's insert then hits the unique
/// (scope, key) index, and its rerun finds the first one's record.
async fn claim_idempotency<S: Session>(
    s: &mut S,
    idem: Option<&IdempotencyWrite>,
    now: TimestampMs,
) -> Result<(), StoreError> {
    let Some(idem) = idem else { return Ok(()) };
    let (scope, key) = (idem.scope.as_str(), idem.key.as_str());
    let Some(record) = idempotency_row(s, scope, key, true).await? else {
        return Ok(());
    };
    if record.expires_at_ms > now {
        return Err(StoreError::IdempotencyKeyExists(record));
    }
    s.execute(
        "DELETE FROM idempotency_keys WHERE scope = ? AND `key` = ?",
        &[scope.into(), key.into()],
    )
    .await?;
    Ok(())
}

async fn write_idempotency<S: Session>(
    s: &mut S,
    idem: Option<&IdempotencyWrite>,
    resource_id: &str,
    response: Option<&StoredResponse>,
    now: TimestampMs,
) -> Result<(), StoreError> {
    let Some(idem) = idem else { return Ok(()) };
    s.execute(
        "INSERT INTO idempotency_keys
           (scope, `key`, fingerprint, resource_id, response_status, response_body,
            created_at_ms, expires_at_ms)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        &[
            idem.scope.as_str().into(),
            idem.key.as_str().into(),
            idem.fingerprint.as_str().into(),
            resource_id.into(),
            response.map(|r| i64::from(r.status)).into(),
            response.map(|r| r.body.as_str()).into(),
            now.into(),
            idem.expires_at_ms.into(),
        ],
    )
    .await?;
    Ok(())
}

/// Keeps the final response of a request whose record was written without
/// one (a cross-shard transfer), unless one is already kept.
pub(crate) async fn save_idempotent_response<S: Session>(
    s: &mut S,
    scope: &AccountId,
    key: &IdempotencyKey,
    response: &StoredResponse,
) -> Result<(), StoreError> {
    s.execute(
        "UPDATE idempotency_keys SET response_status = ?, response_body = ?
         WHERE scope = ? AND `key` = ? AND response_status IS NULL",
        &[
            i64::from(response.status).into(),
            response.body.as_str().into(),
            scope.as_str().into(),
            key.as_str().into(),
        ],
    )
    .await?;
    Ok(())
}

/// Keeps the answer of a transfer refused before it reached the ledger
/// under its key; writes nothing else.
pub(crate) async fn record_decline<S: Session>(
    s: &mut S,
    idem: &IdempotencyWrite,
    transfer_id: &TransferId,
    response: &StoredResponse,
    now: TimestampMs,
) -> Result<(), StoreError> {
    claim_idempotency(s, Some(idem), now).await?;
    write_idempotency(s, Some(idem), transfer_id.as_str(), Some(response), now).await
}

pub(crate) async fn purge_expired_idempotency<S: Session>(
    s: &mut S,
    now: TimestampMs,
    limit: u32,
) -> Result<u64, StoreError> {
    let sql = s.dialect().purge_expired;
    s.execute(sql, &[now.into(), i64::from(limit).into()]).await
}

// --- transfers ----------------------------------------------------------------

const TRANSFER: [&str; 2] = locking!(
    "SELECT id, payer, payee, amount_minor, currency, payer_shard, payee_shard, state,
            failure_code, created_at_ms, updated_at_ms
     FROM transfers WHERE id = ?"
);

fn transfer_from_row(r: &Row) -> Result<Transfer, StoreError> {
    let id = r.text(0)?;
    let bad = |what: &str| corrupt(r.shard, format!("transfer {id} has a bad {what}"));
    let shard = |index: usize, what: &str| {
        u32::try_from(r.int(index)?)
            .ok()
            .and_then(|i| ShardId::new(i).ok())
            .ok_or_else(|| bad(what))
    };
    Ok(Transfer {
        id: TransferId::parse(&id).map_err(|_| bad("id"))?,
        payer: AccountId::parse(&r.text(1)?).map_err(|_| bad("payer"))?,
        payee: AccountId::parse(&r.text(2)?).map_err(|_| bad("payee"))?,
        amount: Amount::from_minor(r.int(3)?).map_err(|_| bad("amount"))?,
        currency: r.currency(4)?,
        payer_shard: shard(5, "payer shard")?,
        payee_shard: shard(6, "payee shard")?,
        state: TransferState::parse(&r.text(7)?).ok_or_else(|| bad("state"))?,
        failure_code: r.opt_text(8)?,
        created_at_ms: r.int(9)?,
        updated_at_ms: r.int(10)?,
    })
}

async fn find_transfer<S: Session>(
    s: &mut S,
    id: &TransferId,
    lock: bool,
) -> Result<Option<Transfer>, StoreError> {
    let sql = pick(s, &TRANSFER, lock);
    let found = row(s, sql, &[id.as_str().into()]).await?;
    found.as_ref().map(transfer_from_row).transpose()
}

/// A transfer whose payer is on this shard.
pub(crate) async fn transfer<S: Session>(
    s: &mut S,
    id: &TransferId,
) -> Result<Option<Transfer>, StoreError> {
    find_transfer(s, id, false).await
}

async fn existing_transfer<S: Session>(
    s: &mut S,
    id: &TransferId,
    lock: bool,
) -> Result<Transfer, StoreError> {
    find_transfer(s, id, lock)
        .await?
        .ok_or_else(|| corrupt(s.shard(), format!("transfer {id} not found")))
}

/// Pending transfers created before `created_before`, oldest first.
pub(crate) async fn pending_transfers<S: Session>(
    s: &mut S,
    created_before: TimestampMs,
    limit: u32,
) -> Result<Vec<Transfer>, StoreError> {
    let rows = s
        .rows(PENDING, &[created_before.into(), i64::from(limit).into()])
        .await?;
    rows.iter().map(transfer_from_row).collect()
}

async fn insert_transfer<S: Session>(s: &mut S, t: &Transfer) -> Result<(), StoreError> {
    s.execute(
        "INSERT INTO transfers (id, payer, payee, amount_minor, currency, payer_shard,
            payee_shard, state, failure_code, created_at_ms, updated_at_ms)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        &[
            t.id.as_str().into(),
            t.payer.as_str().into(),
            t.payee.as_str().into(),
            t.amount.minor().into(),
            t.currency.code().into(),
            (t.payer_shard.index() as i64).into(),
            (t.payee_shard.index() as i64).into(),
            t.state.as_str().into(),
            t.failure_code.as_deref().into(),
            t.created_at_ms.into(),
            t.updated_at_ms.into(),
        ],
    )
    .await?;
    Ok(())
}

async fn transfer_event<S: Session>(
    s: &mut S,
    event_type: &str,
    t: &Transfer,
) -> Result<(), StoreError> {
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
    outbox(s, event_type, t.id.as_str(), payload, t.updated_at_ms).await
}

/// Keeps a decline under the request's key and answers it. A payer short
/// of funds because its balance is still on its way here (a reshard's
/// move) is refused for now instead, and nothing is kept.
async fn decline<S: Session>(
    s: &mut S,
    t: &Transfer,
    refusal: Refusal,
    idem: Option<&IdempotencyWrite>,
) -> Result<DebitOutcome, StoreError> {
    if let Refusal::InsufficientFunds(payer) = &refusal {
        if row(
            s,
            "SELECT 1 FROM arriving_accounts WHERE id = ?",
            &[payer.as_str().into()],
        )
        .await?
        .is_some()
        {
            return Err(Refusal::AccountArriving(payer.clone()).into());
        }
    }
    let response = refusal.response();
    write_idempotency(s, idem, t.id.as_str(), Some(&response), t.created_at_ms).await?;
    Ok(DebitOutcome::Declined(refusal))
}

/// A same-shard transfer: both balances, two entries, the transfer
/// (completed), its event and the idempotency record. The two accounts are
/// read (and locked) in id order, so two transfers never wait on each other
/// in opposite orders.
pub(crate) async fn transfer_local<S: Session>(
    s: &mut S,
    t: &Transfer,
    idem: Option<&IdempotencyWrite>,
) -> Result<DebitOutcome, StoreError> {
    debug_assert_eq!(t.payer_shard, t.payee_shard);
    let now = t.created_at_ms;
    claim_idempotency(s, idem, now).await?;
    let (payer, payee) = if t.payer.as_str() <= t.payee.as_str() {
        let payer = user_account(s, &t.payer).await?;
        (payer, user_account(s, &t.payee).await?)
    } else {
        let payee = user_account(s, &t.payee).await?;
        (user_account(s, &t.payer).await?, payee)
    };
    let decline_for = payer_refusal(t, payer)?;
    if let Some(refusal) = payee_refusal(t, payee) {
        return Err(refusal.into());
    }
    if let Some(refusal) = decline_for {
        return decline(s, t, refusal, idem).await;
    }
    let mut done = t.clone();
    done.state = TransferState::Completed;
    let accounts = (t.payer.as_str(), t.payee.as_str());
    post(
        s,
        t.id.as_str(),
        accounts,
        t.amount.minor(),
        t.currency,
        now,
    )
    .await?;
    insert_transfer(s, &done).await?;
    transfer_event(s, "transfer.completed", &done).await?;
    write_idempotency(
        s,
        idem,
        t.id.as_str(),
        idem.and_then(|i| i.response.as_ref()),
        now,
    )
    .await?;
    let counts = Counts::transfer(None, TransferState::Completed);
    count(s, t.id.as_str(), counts).await?;
    Ok(DebitOutcome::Applied(done))
}

/// The payer's side of a cross-shard transfer: debit the payer into the
/// in-flight account and record the transfer in `state` with the event
/// `event` (pending and `transfer.initiated` for the saga's step (a);
/// completed and `transfer.completed` for an XA branch, which commits only
/// together with the credit).
pub(crate) async fn debit_to_in_flight<S: Session>(
    s: &mut S,
    t: &Transfer,
    (state, event): (TransferState, &str),
    idem: Option<&IdempotencyWrite>,
) -> Result<DebitOutcome, StoreError> {
    let now = t.created_at_ms;
    claim_idempotency(s, idem, now).await?;
    let payer = user_account(s, &t.payer).await?;
    if let Some(refusal) = payer_refusal(t, payer)? {
        return decline(s, t, refusal, idem).await;
    }
    let mut recorded = t.clone();
    recorded.state = state;
    let in_flight = system_account(s, AccountKind::InFlight, t.currency, now).await?;
    let accounts = (t.payer.as_str(), in_flight.as_str());
    post(
        s,
        t.id.as_str(),
        accounts,
        t.amount.minor(),
        t.currency,
        now,
    )
    .await?;
    insert_transfer(s, &recorded).await?;
    transfer_event(s, event, &recorded).await?;
    write_idempotency(
        s,
        idem,
        t.id.as_str(),
        idem.and_then(|i| i.response.as_ref()),
        now,
    )
    .await?;
    count(s, t.id.as_str(), Counts::transfer(None, state)).await?;
    Ok(DebitOutcome::Applied(recorded))
}

const CREDIT_OUTCOME: [&str; 2] =
    locking!("SELECT outcome, refusal_code FROM inbound_credits WHERE transfer_id = ?");

async fn find_credit_outcome<S: Session>(
    s: &mut S,
    id: &TransferId,
    lock: bool,
) -> Result<Option<CreditOutcome>, StoreError> {
    let sql = pick(s, &CREDIT_OUTCOME, lock);
    let Some(r) = row(s, sql, &[id.as_str().into()]).await? else {
        return Ok(None);
    };
    Ok(Some(match r.text(0)?.as_str() {
        "credited" => CreditOutcome::Credited,
        _ => CreditOutcome::Refused {
            code: r.opt_text(1)?.unwrap_or_else(|| "refused".into()),
        },
    }))
}

/// The outcome of a credit step already run for `id`, if any.
pub(crate) async fn credit_outcome<S: Session>(
    s: &mut S,
    id: &TransferId,
) -> Result<Option<CreditOutcome>, StoreError> {
    find_credit_outcome(s, id, false).await
}

/// The payee's side: record the credit's outcome and, unless refused,
/// credit the payee from the in-flight account. Answers the refusal.
pub(crate) async fn credit_out_of_flight<S: Session>(
    s: &mut S,
    t: &Transfer,
) -> Result<Option<Refusal>, StoreError> {
    let now = super::now_ms();
    let payee = user_account(s, &t.payee).await?;
    let refusal = payee_refusal(t, payee);
    let (outcome, code) = match &refusal {
        None => ("credited", None),
        Some(r) => ("refused", Some(r.code().as_str())),
    };
    s.execute(
        "INSERT INTO inbound_credits (transfer_id, payer, payee, amount_minor, currency,
            payer_shard, outcome, refusal_code, created_at_ms)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        &[
            t.id.as_str().into(),
            t.payer.as_str().into(),
            t.payee.as_str().into(),
            t.amount.minor().into(),
            t.currency.code().into(),
            (t.payer_shard.index() as i64).into(),
            outcome.into(),
            code.into(),
            now.into(),
        ],
    )
    .await?;
    if refusal.is_some() {
        return Ok(refusal);
    }
    let in_flight = system_account(s, AccountKind::InFlight, t.currency, now).await?;
    let accounts = (in_flight.as_str(), t.payee.as_str());
    post(
        s,
        t.id.as_str(),
        accounts,
        t.amount.minor(),
        t.currency,
        now,
    )
    .await?;
    Ok(None)
}

/// Step (b) of the saga: idempotent on the transfer id, so a second call
/// answers what the first decided and writes nothing.
pub(crate) async fn credit_from_in_flight<S: Session>(
    s: &mut S,
    t: &Transfer,
) -> Result<CreditOutcome, StoreError> {
    if t.payer == t.payee {
        // A move's balance: the account has arrived with it.
        arrived(s, &t.payee).await?;
    }
    if let Some(outcome) = find_credit_outcome(s, &t.id, true).await? {
        return Ok(outcome);
    }
    Ok(match credit_out_of_flight(s, t).await? {
        None => CreditOutcome::Credited,
        Some(refusal) => CreditOutcome::Refused {
            code: refusal.code().to_string(),
        },
    })
}

/// Step (c): mark a pending transfer completed. Answers the transfer as it
/// stands afterwards (a failed transfer stays failed).
pub(crate) async fn complete_transfer<S: Session>(
    s: &mut S,
    id: &TransferId,
    now: TimestampMs,
) -> Result<Transfer, StoreError> {
    let mut t = existing_transfer(s, id, true).await?;
    if t.state != TransferState::Pending {
        return Ok(t);
    }
    if t.payer == t.payee {
        // An account's move to another shard (a reshard), finished by
        // recovery: no event, not counted.
        finish_move(s, id, now).await?;
        t.state = TransferState::Completed;
        t.updated_at_ms = now;
        return Ok(t);
    }
    s.execute(
        "UPDATE transfers SET state = 'completed', updated_at_ms = ?
         WHERE id = ? AND state = 'pending'",
        &[now.into(), id.as_str().into()],
    )
    .await?;
    t.state = TransferState::Completed;
    t.updated_at_ms = now;
    transfer_event(s, "transfer.completed", &t).await?;
    let counts = Counts::transfer(Some(TransferState::Pending), TransferState::Completed);
    count(s, id.as_str(), counts).await?;
    Ok(t)
}

/// Undoes step (a) of a transfer whose credit was refused for good: money
/// back from in-flight to the payer, the transfer failed with `code`.
pub(crate) async fn reverse_transfer<S: Session>(
    s: &mut S,
    id: &TransferId,
    code: &str,
    now: TimestampMs,
) -> Result<Transfer, StoreError> {
    let mut t = existing_transfer(s, id, true).await?;
    if t.state != TransferState::Pending {
        return Ok(t);
    }
    // The payer's row first, as every transfer locks it.
    user_account(s, &t.payer).await?;
    let in_flight = system_account(s, AccountKind::InFlight, t.currency, now).await?;
    let accounts = (in_flight.as_str(), t.payer.as_str());
    post(
        s,
        t.id.as_str(),
        accounts,
        t.amount.minor(),
        t.currency,
        now,
    )
    .await?;
    s.execute(
        "UPDATE transfers SET state = 'failed', failure_code = ?, updated_at_ms = ?
         WHERE id = ?",
        &[code.into(), now.into(), id.as_str().into()],
    )
    .await?;
    t.state = TransferState::Failed;
    t.failure_code = Some(code.to_string());
    t.updated_at_ms = now;
    transfer_event(s, "transfer.failed", &t).await?;
    let counts = Counts::transfer(Some(TransferState::Pending), TransferState::Failed);
    count(s, id.as_str(), counts).await?;
    Ok(t)
}

// --- moving accounts between shards (a reshard) ---------------------------------

/// A customer account with its idempotency records, to be copied to its
/// new home.
pub(crate) async fn account_to_move<S: Session>(
    s: &mut S,
    id: &AccountId,
) -> Result<Option<MovingAccount>, StoreError> {
    let Some(account) = account(s, id).await? else {
        return Ok(None);
    };
    let keys = kept_keys(s, id).await?;
    Ok(Some(MovingAccount { account, keys }))
}

/// The idempotency records scoped to `id`, as stored.
async fn kept_keys<S: Session>(s: &mut S, id: &AccountId) -> Result<Vec<KeptKey>, StoreError> {
    let rows = s
        .rows(
            "SELECT `key`, fingerprint, resource_id, response_status, response_body,
                    created_at_ms, expires_at_ms
             FROM idempotency_keys WHERE scope = ?",
            &[id.as_str().into()],
        )
        .await?;
    let mut keys = Vec::with_capacity(rows.len());
    for r in &rows {
        let status = r
            .opt_int(3)?
            .map(|v| u16::try_from(v).map_err(|_| r.bad(3, "an HTTP status")))
            .transpose()?;
        keys.push(KeptKey {
            key: r.text(0)?,
            fingerprint: r.text(1)?,
            resource_id: r.opt_text(2)?,
            response: status
                .zip(r.opt_text(4)?)
                .map(|(status, body)| StoredResponse { status, body }),
            created_at_ms: r.int(5)?,
            expires_at_ms: r.int(6)?,
        });
    }
    Ok(keys)
}

/// Opens a moving account on its new home with a zero balance, and copies
/// its idempotency records. A forwarding record left by an earlier move
/// away from this shard is dropped: the account is home here again.
pub(crate) async fn adopt_account<S: Session>(
    s: &mut S,
    moving: &MovingAccount,
) -> Result<(), StoreError> {
    let account = &moving.account;
    let id = account.id.as_str();
    s.execute("DELETE FROM moved_accounts WHERE id = ?", &[id.into()])
        .await?;
    // Until its balance lands, a debit it cannot pay waits (`decline`).
    s.execute("DELETE FROM arriving_accounts WHERE id = ?", &[id.into()])
        .await?;
    s.execute(
        "INSERT INTO arriving_accounts (id, since_ms) VALUES (?, ?)",
        &[id.into(), super::now_ms().into()],
    )
    .await?;
    let exists = row(s, "SELECT 1 FROM accounts WHERE id = ?", &[id.into()])
        .await?
        .is_some();
    if !exists {
        s.execute(
            "INSERT INTO accounts (id, kind, currency, balance_minor, created_at_ms)
             VALUES (?, 'user', ?, 0, ?)",
            &[
                id.into(),
                account.currency.code().into(),
                account.created_at_ms.into(),
            ],
        )
        .await?;
        let opened = Counts {
            accounts: 1,
            ..Counts::default()
        };
        count(s, id, opened).await?;
    }
    for kept in &moving.keys {
        s.execute(
            "DELETE FROM idempotency_keys WHERE scope = ? AND `key` = ?",
            &[id.into(), kept.key.as_str().into()],
        )
        .await?;
        s.execute(
            "INSERT INTO idempotency_keys
               (scope, `key`, fingerprint, resource_id, response_status, response_body,
                created_at_ms, expires_at_ms)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            &[
                id.into(),
                kept.key.as_str().into(),
                kept.fingerprint.as_str().into(),
                kept.resource_id.as_deref().into(),
                kept.response.as_ref().map(|r| i64::from(r.status)).into(),
                kept.response.as_ref().map(|r| r.body.as_str()).into(),
                kept.created_at_ms.into(),
                kept.expires_at_ms.into(),
            ],
        )
        .await?;
    }
    Ok(())
}

/// See `ShardStore::disown`.
pub(crate) async fn disown<S: Session>(
    s: &mut S,
    id: &AccountId,
    home: ShardId,
) -> Result<(), StoreError> {
    let copy = row(
        s,
        "SELECT balance_minor FROM accounts WHERE id = ? AND kind = 'user'",
        &[id.as_str().into()],
    )
    .await?;
    if let Some(r) = copy {
        let balance = r.int(0)?;
        if balance != 0 {
            return Err(corrupt(
                s.shard(),
                format!("account {id}'s copy here holds {balance} minor units; it is not dropped"),
            ));
        }
    }
    let id = id.as_str();
    let dropped = s
        .execute(
            "DELETE FROM accounts WHERE id = ? AND kind = 'user'",
            &[id.into()],
        )
        .await?;
    if dropped > 0 {
        let closed = Counts {
            accounts: -1,
            ..Counts::default()
        };
        count(s, id, closed).await?;
    }
    s.execute("DELETE FROM arriving_accounts WHERE id = ?", &[id.into()])
        .await?;
    s.execute("DELETE FROM idempotency_keys WHERE scope = ?", &[id.into()])
        .await?;
    s.execute("DELETE FROM moved_accounts WHERE id = ?", &[id.into()])
        .await?;
    s.execute(
        "INSERT INTO moved_accounts (id, to_shard, transfer_id, moved_at_ms) VALUES (?, ?, NULL, ?)",
        &[id.into(), (home.index() as i64).into(), super::now_ms().into()],
    )
    .await?;
    Ok(())
}

/// The old home's step of a move (see `ShardStore::move_out`).
pub(crate) async fn move_out<S: Session>(
    s: &mut S,
    id: &AccountId,
    to: ShardId,
    transfer_id: &TransferId,
    now: TimestampMs,
    keep_open: bool,
) -> Result<MovedOut, StoreError> {
    let (currency, balance) = user_account(s, id)
        .await?
        .ok_or_else(|| Refusal::AccountNotFound(id.clone()))?;
    // A transfer the account pays that is still pending (its request's
    // debit committed after the batch looked): it must end here first.
    let pending = s
        .rows(PENDING, &[i64::MAX.into(), 10_000i64.into()])
        .await?;
    for r in &pending {
        if r.text(1)? == id.as_str() {
            return Ok(MovedOut::Busy);
        }
    }
    let mut moved = None;
    if balance > 0 {
        let t = Transfer {
            id: transfer_id.clone(),
            payer: id.clone(),
            payee: id.clone(),
            amount: Amount::from_minor(balance)
                .map_err(|_| corrupt(s.shard(), format!("account {id} holds {balance}")))?,
            currency,
            payer_shard: s.shard(),
            payee_shard: to,
            state: TransferState::Pending,
            failure_code: None,
            created_at_ms: now,
            updated_at_ms: now,
        };
        let in_flight = system_account(s, AccountKind::InFlight, currency, now).await?;
        post(
            s,
            t.id.as_str(),
            (id.as_str(), in_flight.as_str()),
            balance,
            currency,
            now,
        )
        .await?;
        // Not counted as a transfer and no outbox event: a move is not a
        // payment, and the consumers never hear of it.
        insert_transfer(s, &t).await?;
        moved = Some(t);
    }
    if !keep_open {
        s.execute("DELETE FROM accounts WHERE id = ?", &[id.as_str().into()])
            .await?;
        let closed = Counts {
            accounts: -1,
            ..Counts::default()
        };
        count(s, id.as_str(), closed).await?;
    }
    s.execute(
        "DELETE FROM moved_accounts WHERE id = ?",
        &[id.as_str().into()],
    )
    .await?;
    s.execute(
        "INSERT INTO moved_accounts (id, to_shard, transfer_id, moved_at_ms) VALUES (?, ?, ?, ?)",
        &[
            id.as_str().into(),
            (to.index() as i64).into(),
            moved.as_ref().map(|t| t.id.as_str()).into(),
            now.into(),
        ],
    )
    .await?;
    // Read once the account is closed here: no record for it can be
    // written here after this.
    let keys = kept_keys(s, id).await?;
    Ok(MovedOut::Moved {
        transfer: moved,
        keys,
    })
}

/// The account's balance has arrived (see `ShardStore::arrived`).
pub(crate) async fn arrived<S: Session>(s: &mut S, id: &AccountId) -> Result<(), StoreError> {
    s.execute(
        "DELETE FROM arriving_accounts WHERE id = ?",
        &[id.as_str().into()],
    )
    .await?;
    Ok(())
}

/// See `ShardStore::fence_creates`.
pub(crate) async fn fence_creates<S: Session>(
    s: &mut S,
    strategy: crate::sharding::Strategy,
    shards: u32,
) -> Result<(), StoreError> {
    s.execute("DELETE FROM create_fence WHERE singleton = 1", &[])
        .await?;
    s.execute(
        "INSERT INTO create_fence (singleton, strategy, shards, updated_at_ms) VALUES (1, ?, ?, ?)",
        &[
            strategy.as_str().into(),
            i64::from(shards).into(),
            super::now_ms().into(),
        ],
    )
    .await?;
    Ok(())
}

/// The fence a reshard about to switch wrote (`fence_creates`), read with
/// a shared lock where rows are locked, so a create and the fence's write
/// never pass each other.
const CREATE_FENCE: [&str; 2] = [
    "SELECT strategy, shards FROM create_fence WHERE singleton = 1",
    "SELECT strategy, shards FROM create_fence WHERE singleton = 1 LOCK IN SHARE MODE",
];

/// Refuses to open an account here that the placement a reshard is about
/// to switch to puts on another shard: the writer routes by an older one.
async fn refuse_if_fenced<S: Session>(s: &mut S, id: &AccountId) -> Result<(), StoreError> {
    let sql = pick(s, &CREATE_FENCE, true);
    let Some(r) = row(s, sql, &[]).await? else {
        return Ok(());
    };
    let strategy = crate::sharding::Strategy::parse(&r.text(0)?)
        .ok_or_else(|| r.bad(0, "a placement strategy"))?;
    let shards = u32::try_from(r.int(1)?).map_err(|_| r.bad(1, "a shard count"))?;
    let ring = crate::sharding::Ring::with_strategy(shards, strategy)
        .map_err(|_| r.bad(1, "a shard count"))?;
    let home = ring.shard_of(id);
    if home != s.shard() {
        return Err(Refusal::AccountMoved {
            account: id.clone(),
            shard: home,
        }
        .into());
    }
    Ok(())
}

/// Every forwarding record of this shard: accounts that moved away, and
/// where to.
pub(crate) async fn forwarding<S: Session>(
    s: &mut S,
) -> Result<Vec<(AccountId, ShardId)>, StoreError> {
    let rows = s
        .rows("SELECT id, to_shard FROM moved_accounts ORDER BY id", &[])
        .await?;
    rows.iter()
        .map(|r| {
            let id = r.text(0)?;
            let id = AccountId::parse(&id).map_err(|_| r.bad(0, "an account id"))?;
            let to = u32::try_from(r.int(1)?)
                .ok()
                .and_then(|i| ShardId::new(i).ok())
                .ok_or_else(|| r.bad(1, "a shard"))?;
            Ok((id, to))
        })
        .collect()
}

/// Marks a move's transfer completed, without an event.
pub(crate) async fn finish_move<S: Session>(
    s: &mut S,
    id: &TransferId,
    now: TimestampMs,
) -> Result<(), StoreError> {
    s.execute(
        "UPDATE transfers SET state = 'completed', updated_at_ms = ?
         WHERE id = ? AND state = 'pending'",
        &[now.into(), id.as_str().into()],
    )
    .await?;
    Ok(())
}

pub(crate) async fn placement<S: Session>(
    s: &mut S,
) -> Result<Option<PlacementRecord>, StoreError> {
    let Some(r) = row(
        s,
        "SELECT strategy, shards, version FROM placement WHERE singleton = 1",
        &[],
    )
    .await?
    else {
        return Ok(None);
    };
    Ok(Some(PlacementRecord {
        strategy: crate::sharding::Strategy::parse(&r.text(0)?)
            .ok_or_else(|| r.bad(0, "a placement strategy"))?,
        shards: u32::try_from(r.int(1)?).map_err(|_| r.bad(1, "a shard count"))?,
        version: u64::try_from(r.int(2)?).map_err(|_| r.bad(2, "a version"))?,
    }))
}

pub(crate) async fn save_placement<S: Session>(
    s: &mut S,
    placement: PlacementRecord,
) -> Result<(), StoreError> {
    s.execute("DELETE FROM placement WHERE singleton = 1", &[])
        .await?;
    s.execute(
        "INSERT INTO placement (singleton, strategy, shards, version, updated_at_ms)
         VALUES (1, ?, ?, ?, ?)",
        &[
            placement.strategy.as_str().into(),
            i64::from(placement.shards).into(),
            (placement.version as i64).into(),
            super::now_ms().into(),
        ],
    )
    .await?;
    Ok(())
}

// --- outbox -------------------------------------------------------------------

fn outbox_event(r: &Row) -> Result<OutboxEvent, StoreError> {
    Ok(OutboxEvent {
        seq: r.int(0)?,
        event_id: r.text(1)?,
        event_type: r.text(2)?,
        key: r.text(3)?,
        shard: r.shard,
        payload: r.text(4)?,
        created_at_ms: r.int(5)?,
        position: r.opt_int(6)?,
    })
}

/// An outbox query: its columns, then `$rest`.
macro_rules! outbox_select {
    ($rest:literal) => {
        concat!(
            "SELECT id, event_id, event_type, aggregate_id, payload, created_at_ms, publish_position
             FROM outbox ",
            $rest
        )
    };
}

/// The relay's read: the oldest unpublished rows.
pub const UNPUBLISHED: &str = outbox_select!("WHERE published_at_ms IS NULL ORDER BY id LIMIT ?");
/// What a consumer's snapshot does not cover: rows after a position.
pub const OUTBOX_TAIL: &str =
    outbox_select!("WHERE publish_position > ? ORDER BY publish_position LIMIT ?");
/// The staging's read: unpublished rows without a position.
pub const UNSTAGED: &str = "SELECT id FROM outbox
     WHERE published_at_ms IS NULL AND publish_position IS NULL ORDER BY id LIMIT ?";
/// The lowest position every consumer's snapshot covers.
pub const COVERED: &str = "SELECT MIN(position) FROM consumer_snapshots";
/// The lowest position left in the outbox.
pub const LOWEST_POSITION: &str = "SELECT MIN(publish_position) FROM outbox";
/// The prune: rows in a range of positions, published before a time.
pub const PRUNE: &str = "DELETE FROM outbox
     WHERE publish_position >= ? AND publish_position <= ? AND published_at_ms < ?";
/// The recovery loop's read: pending transfers, oldest first.
pub const PENDING: &str =
    "SELECT id, payer, payee, amount_minor, currency, payer_shard, payee_shard, state,
            failure_code, created_at_ms, updated_at_ms
     FROM transfers WHERE state = 'pending' AND created_at_ms < ?
     ORDER BY created_at_ms LIMIT ?";

/// The statements `/metrics`, `/ready`, `/v1/shards`, `/v1/analytics`,
/// the outbox relay, analytics' start and the recovery loop run over and
/// over: each reads a number of rows bounded by a limit, the backlog or
/// the shard's currencies, never by its history (tests check their plans
/// and the rows they read on shards of a million transfers).
pub const POLLED: &[&str] = &[
    COUNTER_SUMS,
    SYSTEM_BALANCES,
    UNPUBLISHED,
    UNSTAGED,
    OUTBOX_TAIL,
    COVERED,
    LOWEST_POSITION,
    PRUNE,
    PENDING,
];

/// Up to `limit` outbox events after `after_seq`, published or not.
pub(crate) async fn outbox_page<S: Session>(
    s: &mut S,
    after_seq: i64,
    limit: u32,
) -> Result<Vec<OutboxEvent>, StoreError> {
    let sql = outbox_select!("WHERE id > ? ORDER BY id LIMIT ?");
    let rows = s
        .rows(sql, &[after_seq.into(), i64::from(limit).into()])
        .await?;
    rows.iter().map(outbox_event).collect()
}

/// Up to `limit` outbox events at publish positions after `after`, in
/// position order: what a consumer's snapshot at `after` does not cover.
pub(crate) async fn outbox_tail<S: Session>(
    s: &mut S,
    after: i64,
    limit: u32,
) -> Result<Vec<OutboxEvent>, StoreError> {
    let rows = s
        .rows(OUTBOX_TAIL, &[after.into(), i64::from(limit).into()])
        .await?;
    rows.iter().map(outbox_event).collect()
}

/// Up to `limit` outbox events not yet published, oldest first.
pub(crate) async fn unpublished_events<S: Session>(
    s: &mut S,
    limit: u32,
) -> Result<Vec<OutboxEvent>, StoreError> {
    let rows = s.rows(UNPUBLISHED, &[i64::from(limit).into()]).await?;
    rows.iter().map(outbox_event).collect()
}

/// Gives up to `limit` unpublished rows that have no publish position
/// one, in id order, after the last position given: positions are
/// gap-free and taken under the cursor's row lock, so a consumer that
/// has every position up to `p` knows it has every row staged by then.
/// Answers how many it staged.
pub(crate) async fn stage_outbox<S: Session>(s: &mut S, limit: u32) -> Result<u64, StoreError> {
    let sql = pick(
        s,
        &locking!("SELECT last_position FROM outbox_cursor WHERE singleton = 1"),
        true,
    );
    let last = match row(s, sql, &[]).await? {
        Some(r) => r.int(0)?,
        None => return Err(corrupt(s.shard(), "the outbox cursor is missing".into())),
    };
    let ids = s.rows(UNSTAGED, &[i64::from(limit).into()]).await?;
    let ids = ids
        .iter()
        .map(|r| r.int(0))
        .collect::<Result<Vec<_>, _>>()?;
    if ids.is_empty() {
        return Ok(0);
    }
    let largest = PUBLISH_BATCHES[PUBLISH_BATCHES.len() - 1];
    for (chunk_index, chunk) in ids.chunks(largest).enumerate() {
        let first = last + (chunk_index * largest) as i64 + 1;
        let size = batch_size(chunk.len());
        let sql = format!(
            "UPDATE outbox SET publish_position = CASE id {} END WHERE id IN ({})",
            vec!["WHEN ? THEN ?"; size].join(" "),
            vec!["?"; size].join(", ")
        );
        let mut pairs: Vec<(i64, i64)> = (0..chunk.len())
            .map(|i| (chunk[i], first + i as i64))
            .collect();
        pairs.resize(size, pairs[pairs.len() - 1]);
        let mut params: Vec<Param<'_>> = Vec::with_capacity(size * 3);
        for (id, position) in &pairs {
            params.extend([Param::Int(*id), Param::Int(*position)]);
        }
        params.extend(pairs.iter().map(|(id, _)| Param::Int(*id)));
        s.execute(&sql, &params).await?;
    }
    let staged = ids.len() as i64;
    s.execute(
        "UPDATE outbox_cursor SET last_position = ? WHERE singleton = 1",
        &[(last + staged).into()],
    )
    .await?;
    Ok(staged as u64)
}

/// The smallest of the batch sizes that holds `n` positions.
fn batch_size(n: usize) -> usize {
    let largest = PUBLISH_BATCHES[PUBLISH_BATCHES.len() - 1];
    PUBLISH_BATCHES
        .iter()
        .copied()
        .find(|&size| size >= n)
        .unwrap_or(largest)
}

/// `UPDATE .. WHERE id IN (?, ..)` statements for 1, 8, 64 and 512
/// positions: a batch is padded to the next size by repeating its last
/// position, so a backend caches four statements, not one per batch size.
const PUBLISH_BATCHES: [usize; 4] = [1, 8, 64, 512];

/// Marks outbox events (by position) published at `now`.
pub(crate) async fn mark_published<S: Session>(
    s: &mut S,
    seqs: &[i64],
    now: TimestampMs,
) -> Result<(), StoreError> {
    let largest = PUBLISH_BATCHES[PUBLISH_BATCHES.len() - 1];
    let mut marked = 0;
    for chunk in seqs.chunks(largest) {
        let size = batch_size(chunk.len());
        let sql = format!(
            "UPDATE outbox SET published_at_ms = ? WHERE published_at_ms IS NULL AND id IN ({})",
            vec!["?"; size].join(", ")
        );
        let last = chunk[chunk.len() - 1];
        let mut params: Vec<Param<'_>> = Vec::with_capacity(size + 1);
        params.push(now.into());
        params.extend(chunk.iter().map(|&seq| Param::Int(seq)));
        params.resize(size + 1, Param::Int(last));
        marked += s.execute(&sql, &params).await?;
    }
    let published = Counts {
        outbox_published: marked as i64,
        ..Counts::default()
    };
    count(s, &seqs[0].to_string(), published).await
}

/// Outbox rows ever written, and those still unpublished, from the
/// shard's counters.
pub(crate) async fn outbox_counts<S: Session>(s: &mut S) -> Result<(u64, u64), StoreError> {
    let found = row(s, COUNTER_SUMS, &[]).await?;
    let Some(r) = found else {
        return Ok((0, 0));
    };
    let rows = r.sum(4)?;
    let published = r.sum(5)?;
    Ok((clamp(rows), clamp(rows - published)))
}

/// Deletes outbox rows published before `published_before` that every
/// consumer's snapshot covers (none, while no consumer has written one),
/// among the `limit` lowest positions left: rows are published in
/// position order, so the lowest are the oldest, and the statement reads
/// at most `limit` rows however long the outbox is. Answers how many.
pub(crate) async fn prune_outbox<S: Session>(
    s: &mut S,
    published_before: TimestampMs,
    limit: u32,
) -> Result<u64, StoreError> {
    let lowest = |r: Option<Row>| r.map(|r| r.opt_int(0)).transpose().map(Option::flatten);
    let Some(covered) = lowest(row(s, COVERED, &[]).await?)? else {
        return Ok(0);
    };
    let Some(low) = lowest(row(s, LOWEST_POSITION, &[]).await?)? else {
        return Ok(0);
    };
    let high = covered.min(low.saturating_add(i64::from(limit) - 1));
    if high < low {
        return Ok(0);
    }
    s.execute(PRUNE, &[low.into(), high.into(), published_before.into()])
        .await
}

/// A consumer's snapshot: the publish position it covers and its body.
pub(crate) async fn consumer_snapshot<S: Session>(
    s: &mut S,
    consumer: &str,
) -> Result<Option<(i64, String)>, StoreError> {
    let found = row(
        s,
        "SELECT position, body FROM consumer_snapshots WHERE consumer = ?",
        &[consumer.into()],
    )
    .await?;
    found.map(|r| Ok((r.int(0)?, r.text(1)?))).transpose()
}

/// Keeps a consumer's snapshot, covering publish positions up to
/// `position`, in place of the one it had if that covers less.
pub(crate) async fn save_consumer_snapshot<S: Session>(
    s: &mut S,
    consumer: &str,
    position: i64,
    body: &str,
    now: TimestampMs,
) -> Result<(), StoreError> {
    let sql = s.dialect().save_snapshot;
    s.execute(
        sql,
        &[consumer.into(), position.into(), body.into(), now.into()],
    )
    .await?;
    Ok(())
}

// --- counters -----------------------------------------------------------------

/// Changes to the shard's counters, written in the transaction of the
/// change they count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Counts {
    accounts: i64,
    transfers_pending: i64,
    transfers_completed: i64,
    transfers_failed: i64,
    outbox_rows: i64,
    outbox_published: i64,
}

impl Counts {
    /// A transfer's step that moved it from `from` (if it existed) to
    /// `to`, with its one outbox event.
    fn transfer(from: Option<TransferState>, to: TransferState) -> Counts {
        let mut counts = Counts {
            outbox_rows: 1,
            ..Counts::default()
        };
        let mut add = |state: TransferState, n: i64| match state {
            TransferState::Pending => counts.transfers_pending += n,
            TransferState::Completed => counts.transfers_completed += n,
            TransferState::Failed => counts.transfers_failed += n,
        };
        if let Some(from) = from {
            add(from, -1);
        }
        add(to, 1);
        counts
    }
}

/// The counters summed over their slots: accounts, pending, completed,
/// failed, outbox rows, outbox rows published.
pub const COUNTER_SUMS: &str =
    "SELECT CAST(SUM(accounts) AS CHAR), CAST(SUM(transfers_pending) AS CHAR),
        CAST(SUM(transfers_completed) AS CHAR), CAST(SUM(transfers_failed) AS CHAR),
        CAST(SUM(outbox_rows) AS CHAR), CAST(SUM(outbox_published) AS CHAR)
     FROM shard_counters";

/// The balances of the shard's system accounts, per kind and currency.
/// Customer ids never start with `~` (letters, digits, `_-.@`), so this
/// is a range of the primary key that holds the system accounts only.
pub const SYSTEM_BALANCES: &str = "SELECT kind, currency, balance_minor FROM accounts
     WHERE id >= '~' AND kind <> 'user'";

/// Adds `counts` to one slot of the shard's counters, picked by a hash of
/// `key` (the transfer, account or outbox row the transaction is about).
/// The last statement of its transaction: on a server that locks rows the
/// slot's lock is held only until the commit that follows.
async fn count<S: Session>(s: &mut S, key: &str, counts: Counts) -> Result<(), StoreError> {
    if counts == Counts::default() {
        return Ok(());
    }
    let slots = s.dialect().counter_slots.max(1) as u64;
    let slot = (xxhash_rust::xxh3::xxh3_64(key.as_bytes()) % slots) as i64;
    let changed = s
        .execute(
            "UPDATE shard_counters SET accounts = accounts + ?,
                transfers_pending = transfers_pending + ?,
                transfers_completed = transfers_completed + ?,
                transfers_failed = transfers_failed + ?,
                outbox_rows = outbox_rows + ?,
                outbox_published = outbox_published + ?
             WHERE slot = ?",
            &[
                counts.accounts.into(),
                counts.transfers_pending.into(),
                counts.transfers_completed.into(),
                counts.transfers_failed.into(),
                counts.outbox_rows.into(),
                counts.outbox_published.into(),
                slot.into(),
            ],
        )
        .await?;
    if changed != 1 {
        return Err(corrupt(
            s.shard(),
            format!("counter slot {slot} is missing"),
        ));
    }
    Ok(())
}

/// A count read back from the counters; never negative.
fn clamp(n: i128) -> u64 {
    u64::try_from(n.max(0)).unwrap_or(u64::MAX)
}

// --- figures ------------------------------------------------------------------

async fn sums_by_currency<S: Session>(
    s: &mut S,
    sql: &str,
) -> Result<Vec<(Currency, i128)>, StoreError> {
    let rows = s.rows(sql, &[]).await?;
    rows.iter()
        .map(|r| Ok((r.currency(0)?, r.sum(1)?)))
        .collect()
}

/// A count and a sum, from a query answering one row of both.
async fn count_and_sum<S: Session>(s: &mut S, sql: &str) -> Result<(u64, i128), StoreError> {
    match row(s, sql, &[]).await? {
        Some(r) => Ok((r.int(0)? as u64, r.sum(1)?)),
        None => Ok((0, 0)),
    }
}

/// Per-shard counts for `/v1/shards`, `/metrics`, `/ready` and the
/// modelled system's stats: the counters, and the customer balances per
/// currency as minus the system accounts' (every shard's entries sum to
/// zero per currency, so its balances do too). A few rows, whatever the
/// shard's history.
pub(crate) async fn stats<S: Session>(s: &mut S) -> Result<ShardStats, StoreError> {
    let mut stats = ShardStats::default();
    if let Some(r) = row(s, COUNTER_SUMS, &[]).await? {
        stats.accounts = clamp(r.sum(0)?);
        stats.transfers_pending = clamp(r.sum(1)?);
        stats.transfers_completed = clamp(r.sum(2)?);
        stats.transfers_failed = clamp(r.sum(3)?);
    }
    let mut balances: Vec<(Currency, i128)> = Vec::new();
    for r in &s.rows(SYSTEM_BALANCES, &[]).await? {
        let (currency, balance) = (r.currency(1)?, i128::from(r.int(2)?));
        match balances.iter_mut().find(|(c, _)| *c == currency) {
            Some((_, total)) => *total -= balance,
            None => balances.push((currency, -balance)),
        }
    }
    balances.sort_by(|a, b| a.0.code().cmp(b.0.code()));
    stats.balance_minor_by_currency = balances;
    Ok(stats)
}

/// Reads every figure the audit needs. The caller runs it inside one
/// snapshot (`Dialect::begin_snapshot`); the rules that judge the figures
/// are in `crate::audit`.
pub(crate) async fn audit_snapshot<S: Session>(s: &mut S) -> Result<ShardAudit, StoreError> {
    let mut audit = ShardAudit {
        entry_sum_by_currency: sums_by_currency(
            s,
            "SELECT currency, CAST(SUM(amount_minor) AS CHAR) FROM ledger_entries
             GROUP BY currency",
        )
        .await?,
        ..Default::default()
    };
    let rows = s
        .rows(
            "SELECT a.id, a.kind, a.balance_minor, CAST(COALESCE(e.total, 0) AS CHAR)
             FROM accounts a
             LEFT JOIN (SELECT account_id, SUM(amount_minor) AS total FROM ledger_entries
                        GROUP BY account_id) e ON e.account_id = a.id
             WHERE a.balance_minor <> COALESCE(e.total, 0)
                OR (a.kind = 'user' AND a.balance_minor < 0)",
            &[],
        )
        .await?;
    for r in &rows {
        audit.accounts_to_check.push(AccountMismatch {
            account: r.text(0)?,
            kind: AccountKind::parse(&r.text(1)?).ok_or_else(|| r.bad(1, "an account kind"))?,
            balance_minor: r.int(2)?,
            entries_minor: r.sum(3)?,
        });
    }
    let rows = s
        .rows(
            "SELECT kind, currency, CAST(SUM(balance_minor) AS CHAR) FROM accounts
             GROUP BY kind, currency",
            &[],
        )
        .await?;
    for r in &rows {
        let kind = AccountKind::parse(&r.text(0)?).ok_or_else(|| r.bad(0, "an account kind"))?;
        audit.totals.push((kind, r.currency(1)?, r.sum(2)?));
    }
    audit.transfers = transfer_entries(s).await?;
    audit.credits = credit_entries(s).await?;
    let (orphans, _) = count_and_sum(
        s,
        "SELECT COUNT(*), 0 FROM ledger_entries e
         WHERE e.transfer_id NOT LIKE 'open:%'
           AND NOT EXISTS (SELECT 1 FROM transfers t WHERE t.id = e.transfer_id)
           AND NOT EXISTS (SELECT 1 FROM inbound_credits c WHERE c.transfer_id = e.transfer_id)",
    )
    .await?;
    audit.orphan_entries = orphans;
    audit.pending = pending_transfers(s, i64::MAX, u32::MAX).await?;
    audit.sent_minor_by_currency = sums_by_currency(
        s,
        "SELECT currency, CAST(SUM(amount_minor) AS CHAR) FROM transfers
         WHERE payer_shard <> payee_shard AND state <> 'failed' GROUP BY currency",
    )
    .await?;
    audit.received_minor_by_currency = sums_by_currency(
        s,
        "SELECT currency, CAST(SUM(amount_minor) AS CHAR) FROM inbound_credits
         WHERE outcome = 'credited' GROUP BY currency",
    )
    .await?;
    let rows = s
        .rows(
            "SELECT m.id, a.balance_minor FROM moved_accounts m JOIN accounts a ON a.id = m.id",
            &[],
        )
        .await?;
    for r in &rows {
        audit.open_after_move.push((r.text(0)?, r.int(1)?));
    }
    Ok(audit)
}

/// Each transfer of this shard with the count and sums of its entries.
async fn transfer_entries<S: Session>(s: &mut S) -> Result<Vec<TransferEntries>, StoreError> {
    let rows = s
        .rows(
            "SELECT t.id, t.state, CAST(t.payer_shard <> t.payee_shard AS SIGNED), t.amount_minor,
                    COUNT(e.id), CAST(COALESCE(SUM(e.amount_minor), 0) AS CHAR),
                    CAST(COALESCE(SUM(CASE WHEN e.account_id = t.payer THEN e.amount_minor END), 0) AS CHAR)
             FROM transfers t LEFT JOIN ledger_entries e ON e.transfer_id = t.id
             GROUP BY t.id, t.state, t.payer_shard, t.payee_shard, t.amount_minor",
            &[],
        )
        .await?;
    rows.iter()
        .map(|r| {
            Ok(TransferEntries {
                id: r.text(0)?,
                state: TransferState::parse(&r.text(1)?).ok_or_else(|| r.bad(1, "a state"))?,
                cross_shard: r.int(2)? != 0,
                amount_minor: r.int(3)?,
                entries: r.int(4)?,
                net_minor: r.sum(5)?,
                payer_net_minor: r.sum(6)?,
            })
        })
        .collect()
}

/// Each credit recorded on this shard with the count and payee sum of its
/// entries.
async fn credit_entries<S: Session>(s: &mut S) -> Result<Vec<CreditEntries>, StoreError> {
    let rows = s
        .rows(
            "SELECT c.transfer_id, c.outcome, c.amount_minor, COUNT(e.id),
                    CAST(COALESCE(SUM(CASE WHEN e.account_id = c.payee THEN e.amount_minor END), 0) AS CHAR)
             FROM inbound_credits c LEFT JOIN ledger_entries e ON e.transfer_id = c.transfer_id
             GROUP BY c.transfer_id, c.outcome, c.amount_minor",
            &[],
        )
        .await?;
    rows.iter()
        .map(|r| {
            Ok(CreditEntries {
                transfer_id: r.text(0)?,
                credited: r.text(1)? == "credited",
                amount_minor: r.int(2)?,
                entries: r.int(3)?,
                payee_net_minor: r.sum(4)?,
            })
        })
        .collect()
}

/// The audit's figures, read inside one snapshot of the shard.
pub(crate) async fn audit<S: Session>(s: &mut S) -> Result<ShardAudit, StoreError> {
    for sql in s.dialect().begin_snapshot {
        s.execute(sql, &[]).await?;
    }
    let audit = audit_snapshot(s).await;
    let committed = s.execute("COMMIT", &[]).await;
    let audit = audit?;
    committed?;
    Ok(audit)
}
