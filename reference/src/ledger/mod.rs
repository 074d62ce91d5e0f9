//! The ledger: what a shard stores, and the trait every storage backend
//! implements.
//!
//! Each shard keeps its own accounts, the transfers whose payer it holds,
//! the cross-shard credits whose payee it holds, double-entry ledger
//! entries, an outbox of events and idempotency keys. Every balance change
//! is written with its entries in the same local transaction, so the entries
//! of each shard always sum to zero. Two system accounts per currency and
//! shard make that possible: `~funding:<CUR>` is debited for every opening
//! balance, and `~in_flight:<CUR>` holds money between the two local steps
//! of a cross-shard transfer.

mod book;
pub mod mysql;
pub use book::POLLED;
pub mod routes;
pub mod sqlite;

use crate::codes::ErrorCode;
use async_trait::async_trait;
use serde::Serialize;

use crate::ids::{AccountId, IdempotencyKey, ShardId, TransferId};
use crate::money::{Amount, Currency};

/// Milliseconds since the Unix epoch.
pub type TimestampMs = i64;

pub fn now_ms() -> TimestampMs {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as i64
}

/// Account kinds. Only `User` accounts are visible through the API and may
/// never go below zero; system accounts run negative by design.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AccountKind {
    User,
    Funding,
    InFlight,
}

impl AccountKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AccountKind::User => "user",
            AccountKind::Funding => "funding",
            AccountKind::InFlight => "in_flight",
        }
    }

    pub fn parse(text: &str) -> Option<AccountKind> {
        match text {
            "user" => Some(AccountKind::User),
            "funding" => Some(AccountKind::Funding),
            "in_flight" => Some(AccountKind::InFlight),
            _ => None,
        }
    }

    /// The id of this system account for `currency` on every shard.
    pub fn system_account_id(self, currency: Currency) -> String {
        format!("~{}:{}", self.as_str(), currency.code())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Account {
    pub id: AccountId,
    pub currency: Currency,
    pub balance_minor: i64,
    pub shard: ShardId,
    pub created_at_ms: TimestampMs,
}

/// A new customer account with its opening balance.
#[derive(Debug, Clone)]
pub struct NewAccount {
    pub id: AccountId,
    pub currency: Currency,
    pub opening_balance: Amount,
    pub created_at_ms: TimestampMs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TransferState {
    Pending,
    Completed,
    Failed,
}

impl TransferState {
    pub fn as_str(self) -> &'static str {
        match self {
            TransferState::Pending => "pending",
            TransferState::Completed => "completed",
            TransferState::Failed => "failed",
        }
    }

    pub fn parse(text: &str) -> Option<TransferState> {
        match text {
            "pending" => Some(TransferState::Pending),
            "completed" => Some(TransferState::Completed),
            "failed" => Some(TransferState::Failed),
            _ => None,
        }
    }
}

/// A transfer as its payer's shard records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Transfer {
    pub id: TransferId,
    pub payer: AccountId,
    pub payee: AccountId,
    pub amount: Amount,
    pub currency: Currency,
    pub payer_shard: ShardId,
    pub payee_shard: ShardId,
    pub state: TransferState,
    /// Why a transfer ended failed (the refusal code of the credit step).
    pub failure_code: Option<String>,
    pub created_at_ms: TimestampMs,
    pub updated_at_ms: TimestampMs,
}

impl Transfer {
    pub fn is_cross_shard(&self) -> bool {
        self.payer_shard != self.payee_shard
    }
}

/// A response kept with an idempotency key and replayed for retries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResponse {
    pub status: u16,
    pub body: String,
}

/// What a request writes with its idempotency key, in the same transaction
/// as its money movement.
#[derive(Debug, Clone)]
pub struct IdempotencyWrite {
    /// The payer (or, for account creation, the new account): keys are
    /// scoped to it and stored on its shard.
    pub scope: AccountId,
    pub key: IdempotencyKey,
    /// Hash of the route and the parsed request body.
    pub fingerprint: String,
    pub expires_at_ms: TimestampMs,
    /// The response to keep if the operation completes in this transaction.
    /// `None` where the final answer is only known later (cross-shard).
    pub response: Option<StoredResponse>,
}

/// A live idempotency record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyRecord {
    pub fingerprint: String,
    /// The transfer or account the first request created.
    pub resource_id: Option<String>,
    pub response: Option<StoredResponse>,
    pub expires_at_ms: TimestampMs,
}

/// Why a shard refused an operation. A refusal writes nothing, except that
/// a declined transfer (`InsufficientFunds`) keeps its answer under the
/// request's idempotency key so a retry gets the same answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("account {0} does not exist")]
    AccountNotFound(AccountId),
    #[error("account {0} already exists")]
    AccountExists(AccountId),
    #[error("account {account} holds {account_currency}, not {requested}")]
    CurrencyMismatch {
        account: AccountId,
        account_currency: Currency,
        requested: Currency,
    },
    #[error("account {0} has insufficient funds for this transfer")]
    InsufficientFunds(AccountId),
    #[error("the credit would take account {0} above the largest balance the ledger holds")]
    BalanceOverflow(AccountId),
    #[error("the transfer was blocked by fraud checks (score {score}: {})", reasons.join(", "))]
    Blocked { score: u32, reasons: Vec<String> },
    /// The account lived on this shard and has moved to `shard` (a
    /// reshard): a writer that still routes it here is refused, never
    /// served from a stale copy.
    #[error("account {account} has moved to shard {shard}; retry shortly")]
    AccountMoved { account: AccountId, shard: ShardId },
    /// The account is arriving on this shard (a reshard) and its balance is
    /// still in flight: a debit it cannot pay yet is refused for now, never
    /// declined for good.
    #[error(
        "account {0} is moving to this shard and its balance has not arrived yet; retry shortly"
    )]
    AccountArriving(AccountId),
}

impl Refusal {
    pub fn code(&self) -> ErrorCode {
        match self {
            Refusal::AccountNotFound(_) => ErrorCode::AccountNotFound,
            Refusal::AccountExists(_) => ErrorCode::AccountExists,
            Refusal::CurrencyMismatch { .. } => ErrorCode::CurrencyMismatch,
            Refusal::InsufficientFunds(_) => ErrorCode::InsufficientFunds,
            Refusal::BalanceOverflow(_) => ErrorCode::BalanceOverflow,
            Refusal::Blocked { .. } => ErrorCode::TransferBlocked,
            Refusal::AccountMoved { .. } | Refusal::AccountArriving(_) => ErrorCode::AccountMoving,
        }
    }

    pub fn http_status(&self) -> u16 {
        self.code().status()
    }

    /// The error body every API route answers with for this refusal.
    pub fn response(&self) -> StoredResponse {
        StoredResponse {
            status: self.http_status(),
            body: crate::error_body(self.code().as_str(), &self.to_string()),
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// A live idempotency record already holds this key.
    #[error("idempotency key already recorded")]
    IdempotencyKeyExists(IdempotencyRecord),
    /// The shard cannot be reached right now; the operation may be retried.
    #[error("shard {shard} is unavailable: {reason}")]
    Unavailable { shard: ShardId, reason: String },
    #[error("shard {shard} storage error: {reason}")]
    Internal { shard: ShardId, reason: String },
}

/// The outcome of a transfer's debit on the payer's shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DebitOutcome {
    Applied(Transfer),
    /// Declined for lack of funds; the decline is kept under the key.
    Declined(Refusal),
}

/// The outcome of step (b), crediting the payee from in-flight money.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreditOutcome {
    Credited,
    /// Refused for good; recorded, so every later attempt answers the same.
    Refused {
        code: String,
    },
}

/// An event written to a shard's outbox in the transaction of the change
/// it describes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct OutboxEvent {
    /// Position in the shard's outbox: events of one shard are published
    /// in this order.
    pub seq: i64,
    pub event_id: String,
    pub event_type: String,
    /// The account or transfer the event is about (the topic key).
    pub key: String,
    pub shard: ShardId,
    /// The event's JSON body.
    pub payload: String,
    /// When the change committed (the outbox row was written).
    pub created_at_ms: TimestampMs,
    /// Its publish position: gap-free per shard, given when the relay
    /// stages the row for the bus (`None` until then).
    pub position: Option<i64>,
}

/// Per-shard counts for `/v1/shards` and the modelled system's stats.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ShardStats {
    pub accounts: u64,
    /// Sum of customer balances per currency, in minor units.
    pub balance_minor_by_currency: Vec<(Currency, i128)>,
    pub transfers_pending: u64,
    pub transfers_completed: u64,
    pub transfers_failed: u64,
}

/// Everything the audit needs from one shard, read in one snapshot. The
/// rules that judge it are in `crate::audit`.
#[derive(Debug, Clone, Default)]
pub struct ShardAudit {
    /// Sum of all ledger entries per currency (must be zero).
    pub entry_sum_by_currency: Vec<(Currency, i128)>,
    /// Accounts whose balance differs from the sum of their entries, or
    /// customer accounts below zero.
    pub accounts_to_check: Vec<AccountMismatch>,
    /// Balance totals per (kind, currency).
    pub totals: Vec<(AccountKind, Currency, i128)>,
    /// Every transfer whose payer is on this shard, with its entries.
    pub transfers: Vec<TransferEntries>,
    /// Every credit (payee side) recorded on this shard, with its entries.
    pub credits: Vec<CreditEntries>,
    /// Entries that belong to no transfer, credit or opening balance.
    pub orphan_entries: u64,
    /// Cross-shard transfers from this shard: pending ones in full.
    pub pending: Vec<Transfer>,
    /// Cross-shard transfers from this shard not failed, per currency: the
    /// money this shard has sent into flight.
    pub sent_minor_by_currency: Vec<(Currency, i128)>,
    /// Credits applied on this shard per currency: money taken out of flight.
    pub received_minor_by_currency: Vec<(Currency, i128)>,
    /// Accounts that moved away from this shard (a reshard) yet are still
    /// open here, with their balance: a second live copy.
    pub open_after_move: Vec<(String, i64)>,
}

/// An account whose balance is not the sum of its entries, or is below zero.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountMismatch {
    pub account: String,
    pub kind: AccountKind,
    pub balance_minor: i64,
    /// The sum of the account's ledger entries.
    pub entries_minor: i128,
}

/// A transfer (payer side) with the entries written under its id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferEntries {
    pub id: String,
    pub state: TransferState,
    pub cross_shard: bool,
    pub amount_minor: i64,
    /// How many entries carry its id on this shard.
    pub entries: i64,
    /// Their sum.
    pub net_minor: i128,
    /// The sum of those on the payer's account.
    pub payer_net_minor: i128,
}

/// A credit (payee side) with the entries written under its transfer id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreditEntries {
    pub transfer_id: String,
    /// Credited, or refused for good.
    pub credited: bool,
    pub amount_minor: i64,
    pub entries: i64,
    /// The sum of those on the payee's account.
    pub payee_net_minor: i128,
}

/// An idempotency record as it is stored, copied with its account when the
/// account moves to another shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeptKey {
    pub key: String,
    pub fingerprint: String,
    pub resource_id: Option<String>,
    pub response: Option<StoredResponse>,
    pub created_at_ms: TimestampMs,
    pub expires_at_ms: TimestampMs,
}

/// What moves with a customer account: the account (its balance moves as
/// money, through the in-flight accounts) and the idempotency records
/// scoped to it, so a retry reaching the new home replays its first answer.
#[derive(Debug, Clone)]
pub struct MovingAccount {
    pub account: Account,
    pub keys: Vec<KeptKey>,
}

/// What the old home's step of a move did.
#[derive(Debug, Clone)]
pub enum MovedOut {
    /// Nothing: a transfer the account pays is still pending here.
    Busy,
    /// The account is closed here; its balance went into flight under
    /// `transfer` (`None`: it held nothing). `keys`: its idempotency
    /// records as they stood when it closed.
    Moved {
        transfer: Option<Transfer>,
        keys: Vec<KeptKey>,
    },
}

/// The placement the shards hold: how accounts map to shards, over how
/// many, and its version (each reshard that finishes adds one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlacementRecord {
    pub strategy: crate::sharding::Strategy,
    pub shards: u32,
    pub version: u64,
}

/// The reads of [`ShardStore::lookup`].
#[derive(Debug, Clone)]
pub struct Lookup {
    pub payer: AccountId,
    /// Read too when it lives on the same shard as the payer.
    pub payee: Option<AccountId>,
    /// The payer's idempotency key, and the time that decides expiry.
    pub key: Option<(IdempotencyKey, TimestampMs)>,
}

/// What [`ShardStore::lookup`] found.
#[derive(Debug, Clone, Default)]
pub struct Looked {
    pub payer: Option<Account>,
    /// `None` when not asked for, or not found.
    pub payee: Option<Account>,
    pub record: Option<IdempotencyRecord>,
}

/// A shard's storage. One implementation per backend; the same test suite
/// runs against each (`tests/storage`).
#[async_trait]
pub trait ShardStore: Send + Sync + 'static {
    fn shard(&self) -> ShardId;

    /// Creates a customer account, funding its opening balance from the
    /// shard's funding account, with entries, outbox event and idempotency
    /// record in one transaction.
    async fn create_account(
        &self,
        account: NewAccount,
        idempotency: Option<IdempotencyWrite>,
    ) -> Result<Account, StoreError>;

    async fn account(&self, id: &AccountId) -> Result<Option<Account>, StoreError>;

    /// What a transfer reads before it writes, in one visit to the shard
    /// (one reader job, one pooled connection): the payer, the payee when
    /// it lives on the same shard, and the payer's live record under `key`.
    async fn lookup(&self, lookup: Lookup) -> Result<Looked, StoreError>;

    /// Customer accounts in id order, after `after`, at most `limit`.
    async fn list_accounts(
        &self,
        after: Option<AccountId>,
        limit: u32,
    ) -> Result<Vec<Account>, StoreError>;

    /// The live (unexpired) idempotency record for `scope` and `key`.
    async fn idempotency_record(
        &self,
        scope: &AccountId,
        key: &IdempotencyKey,
        now: TimestampMs,
    ) -> Result<Option<IdempotencyRecord>, StoreError>;

    /// Keeps the final response of a request whose record was written
    /// without one (a cross-shard transfer), unless one is already kept.
    async fn save_idempotent_response(
        &self,
        scope: &AccountId,
        key: &IdempotencyKey,
        response: StoredResponse,
    ) -> Result<(), StoreError>;

    /// Keeps the answer of a transfer refused before it reached the ledger
    /// (blocked by fraud checks) under its idempotency key, so a retry
    /// replays it. Writes nothing else. A live record for the key answers
    /// `IdempotencyKeyExists`.
    async fn record_decline(
        &self,
        idempotency: IdempotencyWrite,
        transfer_id: &TransferId,
        response: StoredResponse,
        now: TimestampMs,
    ) -> Result<(), StoreError>;

    /// A same-shard transfer in one local transaction: payer and payee
    /// balances, two entries, the transfer (completed), an outbox event and
    /// the idempotency record.
    async fn transfer_local(
        &self,
        transfer: &Transfer,
        idempotency: Option<IdempotencyWrite>,
    ) -> Result<DebitOutcome, StoreError>;

    /// Step (a) of a cross-shard transfer, on the payer's shard: debit the
    /// payer into the in-flight account and record the transfer pending.
    async fn debit_to_in_flight(
        &self,
        transfer: &Transfer,
        idempotency: Option<IdempotencyWrite>,
    ) -> Result<DebitOutcome, StoreError>;

    /// Step (b), on the payee's shard: credit the payee from the in-flight
    /// account. Idempotent on the transfer id: a second call answers what
    /// the first decided and writes nothing.
    async fn credit_from_in_flight(&self, transfer: &Transfer)
        -> Result<CreditOutcome, StoreError>;

    /// Step (c): mark a pending transfer completed. Answers the transfer as
    /// it stands afterwards (a failed transfer stays failed).
    async fn complete_transfer(
        &self,
        id: &TransferId,
        now: TimestampMs,
    ) -> Result<Transfer, StoreError>;

    /// Undo step (a) of a transfer whose credit was refused for good: money
    /// back from in-flight to the payer, transfer failed with `code`.
    async fn reverse_transfer(
        &self,
        id: &TransferId,
        code: &str,
        now: TimestampMs,
    ) -> Result<Transfer, StoreError>;

    /// A transfer whose payer is on this shard.
    async fn transfer(&self, id: &TransferId) -> Result<Option<Transfer>, StoreError>;

    /// A customer account with the idempotency records scoped to it, read
    /// to be copied to its new home.
    async fn account_to_move(&self, id: &AccountId) -> Result<Option<MovingAccount>, StoreError>;

    /// The new home's first step of a move: the account opened here with a
    /// zero balance (its money arrives as a credit from in-flight) and its
    /// idempotency records. Idempotent: a second call changes nothing.
    async fn adopt_account(&self, moving: MovingAccount) -> Result<(), StoreError>;

    /// Undoes `adopt_account` when the old home put the move off
    /// (`MovedOut::Busy`): the account still lives at `home`, so the copy
    /// here is dropped (its zero-balance row, its arrival mark and its
    /// copied idempotency records) and a forwarding record to `home` is
    /// written in its place (adopting dropped any earlier one); entries an
    /// earlier stay left here are kept. A copy that holds money is not
    /// dropped: that is an error, and nothing changes.
    async fn disown(&self, id: &AccountId, home: ShardId) -> Result<(), StoreError>;

    /// The old home's step of a move, in one transaction: the whole
    /// balance debited into in-flight under `transfer_id` (a pending
    /// transfer from the account to itself on shard `to`; `None` when the
    /// balance is zero), the account closed here and a forwarding record
    /// to `to` written, so later writes here are refused
    /// (`Refusal::AccountMoved`); nothing (`MovedOut::Busy`) while a
    /// transfer the account pays is pending here. `keep_open` is a test hook of a broken
    /// switch: the account stays open here.
    async fn move_out(
        &self,
        id: &AccountId,
        to: ShardId,
        transfer_id: &TransferId,
        now: TimestampMs,
        keep_open: bool,
    ) -> Result<MovedOut, StoreError>;

    /// Every forwarding record of this shard (accounts that moved away,
    /// and where to).
    async fn forwarding(&self) -> Result<Vec<(AccountId, ShardId)>, StoreError>;

    /// Where `id` moved from this shard, if it did (its forwarding record).
    async fn moved_to(&self, id: &AccountId) -> Result<Option<ShardId>, StoreError>;

    /// Marks a move's pending transfer completed once its credit landed,
    /// without a transfer event: a move is not a payment.
    async fn finish_move(&self, id: &TransferId, now: TimestampMs) -> Result<(), StoreError>;

    /// The new home's last step of a move whose balance was zero (no money
    /// in flight): the account has arrived (a credit of a move's balance
    /// marks it so itself).
    async fn arrived(&self, id: &AccountId) -> Result<(), StoreError>;

    /// The placement a reshard is about to switch to, kept on every shard
    /// before its last pass: an account opened on this shard that it
    /// places elsewhere is refused (`Refusal::AccountMoved`).
    async fn fence_creates(
        &self,
        strategy: crate::sharding::Strategy,
        shards: u32,
    ) -> Result<(), StoreError>;

    /// The placement this shard holds, if one was saved.
    async fn placement(&self) -> Result<Option<PlacementRecord>, StoreError>;

    /// Saves the placement (kept on shard 0).
    async fn save_placement(&self, placement: PlacementRecord) -> Result<(), StoreError>;

    /// An account's ledger entries with ids after `after`, oldest first, at
    /// most `limit` (its statement, page by page).
    async fn account_entries(
        &self,
        account: &AccountId,
        after: i64,
        limit: u32,
    ) -> Result<Vec<LedgerEntry>, StoreError>;

    /// Pending transfers created before `created_before`, oldest first.
    async fn pending_transfers(
        &self,
        created_before: TimestampMs,
        limit: u32,
    ) -> Result<Vec<Transfer>, StoreError>;

    /// The outcome of a credit step already run for `id`, if any.
    async fn credit_outcome(&self, id: &TransferId) -> Result<Option<CreditOutcome>, StoreError>;

    async fn stats(&self) -> Result<ShardStats, StoreError>;

    async fn audit(&self) -> Result<ShardAudit, StoreError>;

    /// Deletes up to `limit` expired idempotency records; answers how many.
    async fn purge_expired_idempotency(
        &self,
        now: TimestampMs,
        limit: u32,
    ) -> Result<u64, StoreError>;

    /// Up to `limit` outbox events after position `after_seq`, published or
    /// not, oldest first: the shard's event log, for a consumer that
    /// rebuilds its state.
    async fn outbox_page(&self, after_seq: i64, limit: u32)
        -> Result<Vec<OutboxEvent>, StoreError>;

    /// Up to `limit` outbox events not yet published, oldest first.
    async fn unpublished_events(&self, limit: u32) -> Result<Vec<OutboxEvent>, StoreError>;

    /// Marks outbox events (by `seq`) published at `now`.
    async fn mark_published(&self, seqs: &[i64], now: TimestampMs) -> Result<(), StoreError>;

    /// Outbox rows ever written, and those still unpublished, from the
    /// shard's counters (pruning leaves them as they are).
    async fn outbox_counts(&self) -> Result<(u64, u64), StoreError>;

    /// Gives unpublished rows without a publish position one (up to
    /// `limit`, oldest first); answers how many.
    async fn stage_outbox(&self, limit: u32) -> Result<u64, StoreError>;

    /// Up to `limit` outbox events at publish positions after
    /// `after_position`, in position order.
    async fn outbox_tail(
        &self,
        after_position: i64,
        limit: u32,
    ) -> Result<Vec<OutboxEvent>, StoreError>;

    /// Deletes up to `limit` outbox rows published before
    /// `published_before` whose positions every consumer snapshot on this
    /// shard covers; answers how many.
    async fn prune_outbox(
        &self,
        published_before: TimestampMs,
        limit: u32,
    ) -> Result<u64, StoreError>;

    /// The snapshot `consumer` keeps on this shard: the publish position it
    /// covers and its body.
    async fn consumer_snapshot(&self, consumer: &str) -> Result<Option<(i64, String)>, StoreError>;

    /// Keeps `consumer`'s snapshot covering positions up to `position`,
    /// unless the one kept covers as much or more: several replicas of a
    /// consumer save their snapshots in any order, and the outbox rows the
    /// newest covers may be pruned already.
    async fn save_consumer_snapshot(
        &self,
        consumer: &str,
        position: i64,
        body: String,
    ) -> Result<(), StoreError>;

    /// Two-phase commit, where the backend has it (XA on MySQL); `None`
    /// for backends that only run the saga.
    fn two_phase(&self) -> Option<&dyn TwoPhase> {
        None
    }
}

/// One ledger entry: a negative amount debits the account, a positive one
/// credits it. `id` orders the entries of one shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LedgerEntry {
    pub id: i64,
    pub transfer_id: String,
    pub account_id: String,
    pub amount_minor: i64,
    pub currency: String,
    pub created_at_ms: TimestampMs,
}

/// The id of one branch of a two-phase transfer: the global transaction id
/// (shared by both branches, naming the coordinating shard, which keeps the
/// decision) and the branch's shard.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BranchId {
    pub gtrid: String,
    pub shard: ShardId,
}

impl BranchId {
    const PREFIX: &'static str = "sp";

    /// The gtrid of transfer `id`, whose decision is kept on shard
    /// `coordinator` (the payer's), and which its coordinator decides by
    /// `deadline` (ms since the epoch): until then no other process
    /// settles a branch of it that has no decision.
    pub fn gtrid(coordinator: ShardId, id: &TransferId, deadline: TimestampMs) -> String {
        format!("{}{}-{deadline}-{id}", Self::PREFIX, coordinator.index())
    }

    /// The coordinating shard named in a gtrid of ours, `None` for a
    /// transaction that is not ours.
    pub fn coordinator(gtrid: &str) -> Option<ShardId> {
        Self::parts(gtrid).map(|(shard, _)| shard)
    }

    /// When the coordinator of `gtrid` decides by; `None` for a gtrid of
    /// ours written before gtrids carried a deadline, or not ours.
    pub fn deadline(gtrid: &str) -> Option<TimestampMs> {
        Self::parts(gtrid).and_then(|(_, deadline)| deadline)
    }

    /// `sp{shard}-{deadline}-{transfer}`, or `sp{shard}-{transfer}` (older).
    fn parts(gtrid: &str) -> Option<(ShardId, Option<TimestampMs>)> {
        let rest = gtrid.strip_prefix(Self::PREFIX)?;
        let (index, rest) = rest.split_once('-')?;
        let shard = ShardId::new(index.parse().ok()?).ok()?;
        if TransferId::parse(rest).is_ok() {
            return Some((shard, None));
        }
        let (deadline, id) = rest.split_once('-')?;
        TransferId::parse(id).ok()?;
        let deadline = deadline.parse().ok().filter(|d: &TimestampMs| *d >= 0)?;
        Some((shard, Some(deadline)))
    }
}

impl std::fmt::Display for BranchId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} on shard {}", self.gtrid, self.shard)
    }
}

/// What the coordinator decided for a global transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Commit,
    Abort,
}

/// The payer's branch of a two-phase transfer, once the shard has run it.
pub enum PreparedDebit {
    /// Debited and prepared: commits or rolls back with the other branch.
    Prepared(Box<dyn PreparedBranch>),
    /// Declined for lack of funds. The decline is kept under the key and
    /// already committed on its own: it moves no money.
    Declined(Refusal),
}

/// A prepared branch, still held by the session that prepared it.
#[async_trait]
pub trait PreparedBranch: Send {
    fn id(&self) -> &BranchId;
    async fn commit(self: Box<Self>) -> Result<(), StoreError>;
    async fn rollback(self: Box<Self>) -> Result<(), StoreError>;
    /// Lets go of the branch without resolving it: it stays prepared on the
    /// shard, where recovery finds it.
    async fn abandon(self: Box<Self>);
}

/// A shard that can take part in a two-phase (XA) cross-shard transfer.
///
/// The payer's branch debits the payer into the in-flight account and
/// records the transfer completed; the payee's branch records the credit
/// and credits the payee from the in-flight account. Both write exactly the
/// rows the saga's steps write, so the audit reads the two protocols alike.
/// The decision is kept in the coordinating shard's decision log before any
/// branch commits; recovery commits or rolls back prepared branches as that
/// log says, and a branch with no decision is aborted by writing `abort`
/// there first, so a late coordinator cannot commit it.
#[async_trait]
pub trait TwoPhase: Send + Sync {
    /// Runs and prepares the payer's branch. On an error the branch is
    /// rolled back and nothing is written.
    async fn prepare_debit(
        &self,
        id: &BranchId,
        transfer: &Transfer,
        idempotency: Option<IdempotencyWrite>,
    ) -> Result<PreparedDebit, StoreError>;

    /// Runs and prepares the payee's branch. A refused credit rolls the
    /// branch back and answers the refusal.
    async fn prepare_credit(
        &self,
        id: &BranchId,
        transfer: &Transfer,
    ) -> Result<Box<dyn PreparedBranch>, StoreError>;

    /// Records `decision` for `gtrid` unless one is recorded already, and
    /// answers the decision that holds. Durable when it returns.
    async fn decide(&self, gtrid: &str, decision: Decision) -> Result<Decision, StoreError>;

    /// The recorded decision for `gtrid`.
    async fn decision(&self, gtrid: &str) -> Result<Option<Decision>, StoreError>;

    /// Forgets decisions made before `before` whose gtrid is not in
    /// `keep`; answers how many.
    async fn forget_decisions(
        &self,
        before: TimestampMs,
        keep: &[String],
    ) -> Result<u64, StoreError>;

    /// Prepared branches of ours on this shard that no session holds.
    async fn in_doubt(&self) -> Result<Vec<BranchId>, StoreError>;

    /// Commits or rolls back a prepared branch from any session. A branch
    /// already resolved counts as done.
    async fn resolve(&self, id: &BranchId, decision: Decision) -> Result<(), StoreError>;
}

/// Whether the payer of `t`, found with `payer` = (currency, balance), can
/// pay it: a missing account or another currency is refused outright; lack
/// of funds is a decline (`Ok(Some)`), kept under the request's key.
pub(crate) fn payer_refusal(
    t: &Transfer,
    payer: Option<(Currency, i64)>,
) -> Result<Option<Refusal>, StoreError> {
    let (currency, balance) = payer.ok_or_else(|| Refusal::AccountNotFound(t.payer.clone()))?;
    if currency != t.currency {
        return Err(Refusal::CurrencyMismatch {
            account: t.payer.clone(),
            account_currency: currency,
            requested: t.currency,
        }
        .into());
    }
    if balance < t.amount.minor() {
        return Ok(Some(Refusal::InsufficientFunds(t.payer.clone())));
    }
    Ok(None)
}

/// Why the payee of `t`, found with `payee` = (currency, balance), cannot
/// receive it, if it cannot.
pub(crate) fn payee_refusal(t: &Transfer, payee: Option<(Currency, i64)>) -> Option<Refusal> {
    let Some((currency, balance)) = payee else {
        return Some(Refusal::AccountNotFound(t.payee.clone()));
    };
    if currency != t.currency {
        return Some(Refusal::CurrencyMismatch {
            account: t.payee.clone(),
            account_currency: currency,
            requested: t.currency,
        });
    }
    if balance.checked_add(t.amount.minor()).is_none() {
        return Some(Refusal::BalanceOverflow(t.payee.clone()));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gtrid_names_its_coordinator_and_its_deadline() {
        let id = TransferId::generate();
        let shard = ShardId::new(3).unwrap();
        let gtrid = BranchId::gtrid(shard, &id, 1_796_049_962_441);
        assert_eq!(BranchId::coordinator(&gtrid), Some(shard));
        assert_eq!(BranchId::deadline(&gtrid), Some(1_796_049_962_441));
        // XA ids are at most 64 bytes, whatever the shard and the date.
        let widest = BranchId::gtrid(
            ShardId::new(crate::ids::MAX_SHARDS - 1).unwrap(),
            &id,
            i64::MAX,
        );
        assert!(widest.len() <= 64, "{widest} is {} bytes", widest.len());
    }

    #[test]
    fn an_older_gtrid_has_no_deadline_and_others_are_not_ours() {
        let id = TransferId::generate();
        let older = format!("sp1-{id}");
        assert_eq!(BranchId::coordinator(&older), ShardId::new(1).ok());
        assert_eq!(BranchId::deadline(&older), None);
        for other in [
            "xyz".to_string(),
            format!("sp1-12-{}", "tr_short"),
            format!("sp1--5-{id}"),
            format!("spx-12-{id}"),
            format!("sp1-12x-{id}"),
        ] {
            assert_eq!(BranchId::coordinator(&other), None, "{other}");
            assert_eq!(BranchId::deadline(&other), None, "{other}");
        }
    }
}
