//! The shard manager: routes accounts to shards, runs same-shard transfers
//! as one local transaction and cross-shard transfers as a saga of local
//! transactions, and applies idempotency keys.
//!
//! Cross-shard saga, for a transfer from payer P (shard A) to payee Q (B):
//! (a) on A, debit P into A's in-flight account, transfer `pending`;
//! (b) on B, credit Q from B's in-flight account, idempotent on the id;
//! (c) on A, mark the transfer `completed`.
//! When (b) is refused for good, A reverses (a) and the transfer ends
//! `failed`. When B cannot be reached, the caller gets 202 and the recovery
//! loop finishes the transfer later.
//!
//! Or, chosen per run (`CrossShard::Xa`, MySQL shards only), two-phase
//! commit: both branches are run and prepared (`XA PREPARE`) in shard
//! order, the commit decision is written to the payer's shard, and both
//! branches commit. The client never sees a pending transfer; a crash
//! leaves prepared branches that recovery commits or rolls back as the
//! decision log says (`resolve_in_doubt`).

pub mod reshard;
pub mod routes;
pub mod statement;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

use crate::codes::ErrorCode;
use crate::fraud::{FraudEngine, Verdict};
use crate::ids::ShardId;
use crate::ids::{AccountId, IdempotencyKey, TransferId};
use crate::ledger::{
    now_ms, Account, BranchId, CreditOutcome, DebitOutcome, Decision, IdempotencyRecord,
    IdempotencyWrite, Lookup, NewAccount, PreparedBranch, PreparedDebit, Refusal, ShardStore,
    StoreError, StoredResponse, TimestampMs, Transfer, TransferState, TwoPhase,
};
use crate::money::{Amount, Currency};
use crate::sharding::{Ring, Strategy};
use reshard::{Gate, GateCounters, Passage, ReshardStatus, Routing};

/// Test hooks that stop the process at a chosen point of the saga, to show
/// that recovery finishes what was in flight. Never set in production.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Abort the process right after step (a) commits.
    CrashAfterDebit,
    /// Abort the process right after step (b) commits.
    CrashAfterCredit,
    /// XA: abort once both branches are prepared, before the decision.
    CrashAfterPrepare,
    /// XA: abort once the commit decision is written, before any branch
    /// commits.
    CrashAfterDecision,
    /// XA: wait a second once both branches are prepared, before the
    /// decision: a coordinator that is slow, or gone for a while.
    StallAfterPrepare,
    /// Reshard: abort once an account's old home has closed it and its
    /// balance is in flight, before its new home is credited.
    CrashMidMove,
}

/// Whether the fault hook of `ManagerConfig::fault` may fire. On unless
/// the process waits for a signal to arm it (`shardpay run`'s `crash_at`
/// faults arm it at the scheduled time with SIGUSR1).
pub static FAULT_ARMED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

impl Fault {
    pub const NAMES: &'static str =
        "crash_after_debit, crash_after_credit, crash_after_prepare, crash_after_decision, stall_after_prepare, crash_mid_move";

    pub fn parse(text: &str) -> Option<Fault> {
        match text {
            "crash_after_debit" => Some(Fault::CrashAfterDebit),
            "crash_after_credit" => Some(Fault::CrashAfterCredit),
            "crash_after_prepare" => Some(Fault::CrashAfterPrepare),
            "crash_after_decision" => Some(Fault::CrashAfterDecision),
            "stall_after_prepare" => Some(Fault::StallAfterPrepare),
            "crash_mid_move" => Some(Fault::CrashMidMove),
            _ => None,
        }
    }
}

/// How a cross-shard transfer is made atomic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CrossShard {
    /// Local transactions with compensation: debit, credit, complete (or
    /// reverse). Works on every backend.
    #[default]
    Saga,
    /// XA two-phase commit with a durable decision log. MySQL shards only.
    Xa,
}

impl CrossShard {
    pub fn as_str(self) -> &'static str {
        match self {
            CrossShard::Saga => "saga",
            CrossShard::Xa => "xa",
        }
    }

    pub fn parse(text: &str) -> Option<CrossShard> {
        match text {
            "saga" => Some(CrossShard::Saga),
            "xa" => Some(CrossShard::Xa),
            _ => None,
        }
    }
}

/// What one pass of in-doubt resolution did.
#[derive(Debug, Clone, Default)]
pub struct XaSweep {
    /// Branches committed or rolled back.
    pub resolved: usize,
    /// Prepared branches left: their coordinator's deadline has not passed
    /// (an older gtrid: seen for the first time), or their shard (or
    /// coordinator's shard) could not be reached.
    pub remaining: Vec<BranchId>,
    /// The latest deadline among the branches left for their deadline:
    /// when every one of them may be settled.
    pub due_by: Option<TimestampMs>,
    /// Shards whose branches could not be listed.
    pub unreachable: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// How long an idempotency key is remembered.
    pub idempotency_ttl_ms: i64,
    /// Pending transfers younger than this are left to their request; the
    /// recovery loop takes older ones.
    pub recovery_grace_ms: i64,
    /// A pending transfer older than this fails the audit.
    pub recovery_deadline_ms: i64,
    pub cross_shard: CrossShard,
    /// XA: how long a coordinator has from its start to write its
    /// decision. Until then, recovery in any process leaves its undecided
    /// branches alone; after it, recovery aborts them (the abort written
    /// to the decision log first, so a late coordinator cannot commit).
    pub xa_decision_ms: i64,
    pub fault: Option<Fault>,
    /// Test hook of a broken recovery: finishing a cross-shard transfer an
    /// earlier request or process left pending (recovery, or a retry of
    /// its key) marks it complete without crediting the payee, so money
    /// goes missing and the audit must say so. Never set in production.
    pub broken_recovery: bool,
    /// Accounts are placed over this many of the shard stores (`None`:
    /// all of them); the rest are spare, for a reshard to grow into.
    pub placed_shards: Option<u32>,
    /// How accounts are placed on shards.
    pub strategy: Strategy,
    /// Test hook of a broken reshard switch: a moved account stays open on
    /// its old home and credits keep going there, so the audit must name
    /// it. Never set in production.
    pub broken_switch: bool,
}

/// Two branches that each wait out a lock-wait timeout, and five seconds
/// more for the decision.
pub const XA_DECISION_MS: i64 = 2 * crate::ledger::mysql::LOCK_WAIT_TIMEOUT_S as i64 * 1000 + 5_000;

impl Default for ManagerConfig {
    fn default() -> Self {
        ManagerConfig {
            idempotency_ttl_ms: 24 * 60 * 60 * 1000,
            recovery_grace_ms: 2_000,
            recovery_deadline_ms: 60_000,
            cross_shard: CrossShard::Saga,
            xa_decision_ms: XA_DECISION_MS,
            fault: None,
            broken_recovery: false,
            placed_shards: None,
            strategy: Strategy::Jump,
            broken_switch: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error("{message}")]
    Invalid { code: ErrorCode, message: String },
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error("Idempotency-Key was already used with a different request; use a new key for a new request")]
    IdempotencyKeyReused,
    #[error(
        "a request with this Idempotency-Key is still being processed; retry after it finishes"
    )]
    IdempotencyKeyInFlight,
    #[error("{0}")]
    Unavailable(String),
    /// The account is being moved to another shard and did not open in
    /// time: nothing was changed.
    #[error("account {0} is moving to another shard; retry shortly")]
    Moving(AccountId),
    /// The fraud checks could not run (the fraud service does not answer):
    /// the transfer is refused, never made unscored.
    #[error("fraud checks failed: {0}; nothing was changed, retry shortly")]
    FraudUnavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl ManagerError {
    pub fn invalid(code: ErrorCode, message: impl Into<String>) -> ManagerError {
        ManagerError::Invalid {
            code,
            message: message.into(),
        }
    }
}

impl From<StoreError> for ManagerError {
    fn from(error: StoreError) -> ManagerError {
        match error {
            StoreError::Refused(refusal) => ManagerError::Refused(refusal),
            StoreError::Unavailable { .. } => ManagerError::Unavailable(error.to_string()),
            StoreError::IdempotencyKeyExists(_) => ManagerError::IdempotencyKeyInFlight,
            StoreError::Internal { .. } => ManagerError::Internal(error.to_string()),
        }
    }
}

/// How a route renders a resource into its response. Each route renders
/// its own shape; the response is what idempotent retries replay.
pub struct View<T> {
    /// Names the route in the request fingerprint, so one key cannot be
    /// replayed across routes.
    pub route: &'static str,
    pub render: fn(&T) -> StoredResponse,
}

/// A response to send, and whether it is a replay of an earlier one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub response: StoredResponse,
    pub replayed: bool,
}

/// What every step of one transfer request needs.
struct Attempt<'a> {
    request: &'a TransferRequest,
    key: Option<&'a IdempotencyKey>,
    /// Hash of the route and the parsed request: a retry under the same
    /// key must match it.
    fingerprint: String,
    now: TimestampMs,
    view: &'a View<Transfer>,
    /// Where the payer lives, and where the payee is credited.
    payer_shard: ShardId,
    payee_shard: ShardId,
}

fn transfer_fingerprint(route: &str, request: &TransferRequest) -> String {
    let currency = request.currency.map(|c| c.code().to_string());
    fingerprint(
        route,
        &[
            request.from.as_str(),
            request.to.as_str(),
            &request.amount.minor().to_string(),
            currency.as_deref().unwrap_or(""),
        ],
    )
}

/// The transfer's currency (the payer's unless the request names one),
/// which both accounts must hold.
fn transfer_currency(
    request: &TransferRequest,
    payer: &Account,
    payee: &Account,
) -> Result<Currency, ManagerError> {
    let currency = request.currency.unwrap_or(payer.currency);
    for account in [payer, payee] {
        if account.currency != currency {
            return Err(Refusal::CurrencyMismatch {
                account: account.id.clone(),
                account_currency: account.currency,
                requested: currency,
            }
            .into());
        }
    }
    Ok(currency)
}

#[derive(Debug, Clone)]
pub struct TransferRequest {
    pub from: AccountId,
    pub to: AccountId,
    pub amount: Amount,
    /// `None`: the payer's currency.
    pub currency: Option<Currency>,
}

#[derive(Debug, Clone)]
pub struct AccountRequest {
    pub id: AccountId,
    pub currency: Currency,
    pub opening_balance: Amount,
    /// The user the account is made for, when auth is on. Part of the
    /// request's fingerprint, so a replay of the create (same key, same
    /// body) can only be for the same owner.
    pub owner: Option<String>,
}

pub struct ShardManager {
    routing: std::sync::RwLock<Routing>,
    gate: Arc<Gate>,
    gate_counters: GateCounters,
    reshard_lock: Arc<tokio::sync::Mutex<()>>,
    reshard_state: Mutex<ReshardStatus>,
    shards: Vec<Arc<dyn ShardStore>>,
    config: ManagerConfig,
    /// (scope, key) pairs whose request is running in this process.
    running_keys: Mutex<HashSet<(String, String)>>,
    /// In-doubt branches of older gtrids (without a decision deadline)
    /// seen by the last recovery pass: such a branch is resolved only when
    /// a second pass still finds it.
    xa_seen: Mutex<HashSet<BranchId>>,
    /// When recovery last forgot old decisions.
    xa_forgotten_at: Mutex<Option<std::time::Instant>>,
    /// Scores transfers before they commit; `None` turns fraud checks off.
    fraud: Option<Arc<FraudEngine>>,
}

impl ShardManager {
    /// Whether the test hook `fault` is set and armed.
    pub(crate) fn fault_fires(&self, fault: Fault) -> bool {
        self.config.fault == Some(fault) && FAULT_ARMED.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// `shards[i]` must be the store of shard `i`.
    pub fn new(shards: Vec<Arc<dyn ShardStore>>, config: ManagerConfig) -> anyhow::Result<Self> {
        let stores = shards.len() as u32;
        let placed = config.placed_shards.unwrap_or(stores);
        anyhow::ensure!(
            placed <= stores,
            "accounts cannot be placed over {placed} shards with {stores} shard stores"
        );
        let ring = Ring::with_strategy(placed, config.strategy)?;
        for (i, store) in shards.iter().enumerate() {
            anyhow::ensure!(store.shard().index() == i, "shard {i} is out of order");
            anyhow::ensure!(
                config.cross_shard != CrossShard::Xa || store.two_phase().is_some(),
                "cross-shard protocol xa needs shards that support XA two-phase commit \
                 (the MySQL backend: --mysql-urls or --backend mysql); shard {i} does not. \
                 Use --cross-shard saga with the embedded SQLite shards"
            );
        }
        Ok(ShardManager {
            routing: std::sync::RwLock::new(Routing::new(ring)),
            gate: Arc::new(Gate::default()),
            gate_counters: GateCounters::default(),
            reshard_lock: Arc::new(tokio::sync::Mutex::new(())),
            reshard_state: Mutex::new(ReshardStatus::default()),
            shards,
            config,
            running_keys: Mutex::new(HashSet::new()),
            xa_seen: Mutex::new(HashSet::new()),
            xa_forgotten_at: Mutex::new(None),
            fraud: None,
        })
    }

    /// Scores every transfer with `engine` before it commits.
    pub fn with_fraud(mut self, engine: Arc<FraudEngine>) -> Self {
        self.fraud = Some(engine);
        self
    }

    pub fn fraud(&self) -> Option<&Arc<FraudEngine>> {
        self.fraud.as_ref()
    }

    /// The placement in force.
    pub fn ring(&self) -> Ring {
        self.routing.read().expect("routing lock").ring
    }

    pub fn config(&self) -> &ManagerConfig {
        &self.config
    }

    pub fn shards(&self) -> &[Arc<dyn ShardStore>] {
        &self.shards
    }

    pub fn store_of(&self, account: &AccountId) -> &Arc<dyn ShardStore> {
        &self.shards[self.shard_of(account).index()]
    }

    fn store(&self, shard: ShardId) -> &Arc<dyn ShardStore> {
        &self.shards[shard.index()]
    }

    /// An account, read at its home (after its move, if it is moving).
    pub async fn account(&self, id: &AccountId) -> Result<Option<Account>, ManagerError> {
        let _passage = self.pass_gate(&[id], false).await?;
        let store = self.store_of(id);
        let found = store.account(id).await?;
        // Not here: moved by another process's reshard, perhaps.
        if found.is_none() && self.follow_move(id, store.shard(), None).await? {
            return Ok(self.store_of(id).account(id).await?);
        }
        Ok(found)
    }

    /// Customer accounts in id order across all shards.
    pub async fn list_accounts(
        &self,
        after: Option<AccountId>,
        limit: u32,
    ) -> Result<Vec<Account>, ManagerError> {
        let mut all = Vec::new();
        for store in &self.shards {
            all.extend(store.list_accounts(after.clone(), limit).await?);
        }
        // An account being moved is open on two shards for a moment: the
        // copy at its home (where routing sends it) is the one listed.
        let routing = self.routing.read().expect("routing lock");
        let away = |a: &Account| a.shard != routing.shard_of(&a.id);
        all.sort_by(|a, b| a.id.cmp(&b.id).then_with(|| away(a).cmp(&away(b))));
        drop(routing);
        all.dedup_by(|a, b| a.id == b.id);
        all.truncate(limit as usize);
        Ok(all)
    }

    /// Finds a transfer on whichever shard holds its payer.
    pub async fn transfer(&self, id: &TransferId) -> Result<Option<Transfer>, ManagerError> {
        for store in &self.shards {
            if let Some(t) = store.transfer(id).await? {
                return Ok(Some(t));
            }
        }
        Ok(None)
    }

    pub async fn create_account(
        &self,
        request: AccountRequest,
        key: Option<IdempotencyKey>,
        view: &View<Account>,
    ) -> Result<Reply, ManagerError> {
        // A new account goes where the latest placement puts it, even if
        // another process switched it a moment ago.
        // (Best effort: shard 0 down must not stop accounts opening on
        // the other shards; the shard's creation fence guards the rest.)
        let _ = self.refresh_placement().await;
        let tried = self.shard_of(&request.id);
        match self
            .create_account_once(request.clone(), key.clone(), view)
            .await
        {
            Err(ManagerError::Refused(Refusal::AccountMoved { account, shard }))
                if self.follow_move(&account, tried, Some(shard)).await? =>
            {
                self.create_account_once(request, key, view).await
            }
            other => other,
        }
    }

    async fn create_account_once(
        &self,
        request: AccountRequest,
        key: Option<IdempotencyKey>,
        view: &View<Account>,
    ) -> Result<Reply, ManagerError> {
        let _passage = self.pass_gate(&[&request.id], true).await?;
        let store = self.store_of(&request.id);
        let owner_field = request.owner.as_ref().map(|o| format!("owner:{o}"));
        let balance = request.opening_balance.minor().to_string();
        let mut fields = vec![request.id.as_str(), request.currency.code(), &balance];
        if let Some(owner) = &owner_field {
            fields.push(owner);
        }
        let fingerprint = fingerprint(view.route, &fields);
        let _running = self.claim_key(&request.id, key.as_ref())?;
        let now = now_ms();
        let account = Account {
            id: request.id.clone(),
            currency: request.currency,
            balance_minor: request.opening_balance.minor(),
            shard: store.shard(),
            created_at_ms: now,
        };
        let idempotency = key.map(|key| IdempotencyWrite {
            scope: request.id.clone(),
            key,
            fingerprint: fingerprint.clone(),
            expires_at_ms: now + self.config.idempotency_ttl_ms,
            response: Some((view.render)(&account)),
        });
        let new = NewAccount {
            id: request.id,
            currency: request.currency,
            opening_balance: request.opening_balance,
            created_at_ms: now,
        };
        match store.create_account(new, idempotency).await {
            Ok(created) => Ok(Reply {
                response: (view.render)(&created),
                replayed: false,
            }),
            Err(StoreError::IdempotencyKeyExists(record)) => replay_stored(record, &fingerprint),
            Err(error) => Err(error.into()),
        }
    }

    /// Moves money, in the steps of a transfer: refuse a transfer to
    /// oneself; hold back while an audit reads; claim the key in this
    /// process; replay the key's first answer or find both accounts; settle
    /// the currency; ask fraud; then write: one local transaction
    /// (same-shard), XA (cross-shard with `--cross-shard xa`), or step (a)
    /// of the saga and the rest in a task of its own.
    ///
    /// A request that finds an account missing or moved at the home this
    /// process knows (another process's reshard moved it) is sent once
    /// more after following the move: the first try wrote nothing.
    pub async fn transfer_funds(
        self: &Arc<Self>,
        request: TransferRequest,
        key: Option<IdempotencyKey>,
        view: &View<Transfer>,
    ) -> Result<Reply, ManagerError> {
        let mut followed = 0;
        loop {
            let tried = (
                self.shard_of(&request.from),
                self.payee_shard_of(&request.to),
            );
            let error = match self.transfer_once(request.clone(), key.clone(), view).await {
                Err(error) if followed < 2 => error,
                other => return other,
            };
            let (id, hint) = match &error {
                ManagerError::Refused(Refusal::AccountNotFound(id)) => (id.clone(), None),
                ManagerError::Refused(Refusal::AccountMoved { account, shard }) => {
                    (account.clone(), Some(*shard))
                }
                _ => return Err(error),
            };
            let tried = if id == request.from { tried.0 } else { tried.1 };
            if !self.follow_move(&id, tried, hint).await? {
                return Err(error);
            }
            followed += 1;
        }
    }

    async fn transfer_once(
        self: &Arc<Self>,
        request: TransferRequest,
        key: Option<IdempotencyKey>,
        view: &View<Transfer>,
    ) -> Result<Reply, ManagerError> {
        if request.from == request.to {
            return Err(ManagerError::invalid(
                ErrorCode::SameAccount,
                "a transfer needs two different accounts",
            ));
        }
        let passage = self.pass_gate(&[&request.from, &request.to], false).await?;
        let attempt = Attempt {
            fingerprint: transfer_fingerprint(view.route, &request),
            request: &request,
            key: key.as_ref(),
            now: now_ms(),
            view,
            payer_shard: self.shard_of(&request.from),
            payee_shard: self.payee_shard_of(&request.to),
        };
        let _running = self.claim_key(&request.from, attempt.key)?;
        let (payer, payee) = match self.accounts_or_replay(&attempt).await? {
            Ok(accounts) => accounts,
            Err(replayed) => return Ok(replayed),
        };
        let currency = transfer_currency(&request, &payer, &payee)?;
        if let Some(replayed) = self.screen(&attempt).await? {
            return Ok(replayed);
        }
        let transfer = Transfer {
            id: TransferId::generate(),
            payer: request.from.clone(),
            payee: request.to.clone(),
            amount: request.amount,
            currency,
            payer_shard: attempt.payer_shard,
            payee_shard: attempt.payee_shard,
            state: TransferState::Pending,
            failure_code: None,
            created_at_ms: attempt.now,
            updated_at_ms: attempt.now,
        };
        let cross_shard = transfer.is_cross_shard();
        let xa = cross_shard && self.config.cross_shard == CrossShard::Xa;
        // A same-shard or XA transfer's answer is known before it commits;
        // a saga's only after its last step.
        let idempotency =
            self.idempotency_write(&attempt, (!cross_shard || xa).then_some(&transfer));
        if xa {
            let fingerprint = attempt.fingerprint.clone();
            return self
                .spawn_xa(transfer, idempotency, key, fingerprint, view, passage)
                .await;
        }
        let applied = match self.debit(&attempt, &transfer, idempotency).await? {
            Ok(applied) => applied,
            Err(replayed) => return Ok(replayed),
        };
        if !cross_shard {
            return Ok(Reply {
                response: (view.render)(&applied),
                replayed: false,
            });
        }
        if self.fault_fires(Fault::CrashAfterDebit) {
            tracing::error!(transfer = %applied.id, "fault injection: aborting after step (a)");
            std::process::abort();
        }
        self.spawn_saga(applied, key, view.render, passage).await
    }

    /// For a request whose key another request holds (its lock): the
    /// answer the key's record gives once the first request has stored one
    /// (a replay of it), or a refusal when the body differs; `None` while
    /// no answer is stored, when the holder is truly still running. A lock
    /// left by a process that died mid-request then never stands in the
    /// way of the answers Stripe's rules give.
    pub async fn answer_from_record(
        &self,
        request: &TransferRequest,
        key: &IdempotencyKey,
        view: &View<Transfer>,
    ) -> Result<Option<Reply>, ManagerError> {
        let store = self.store_of(&request.from);
        let Some(record) = store
            .idempotency_record(&request.from, key, now_ms())
            .await?
        else {
            return Ok(None);
        };
        if record.fingerprint != transfer_fingerprint(view.route, request) {
            return Err(ManagerError::IdempotencyKeyReused);
        }
        Ok(record.response.map(|response| Reply {
            response,
            replayed: true,
        }))
    }

    /// Looks at the key and both accounts before anything is written: the
    /// key's first answer when it has one (`Err`), or the two accounts.
    async fn accounts_or_replay(
        &self,
        attempt: &Attempt<'_>,
    ) -> Result<Result<(Account, Account), Reply>, ManagerError> {
        let request = attempt.request;
        let same_shard = attempt.payer_shard == attempt.payee_shard;
        // One visit to the payer's shard reads the payer, the key's record
        // and (on the same shard) the payee; another shard's payee is read
        // beside it.
        let lookup = self.store(attempt.payer_shard).lookup(Lookup {
            payer: request.from.clone(),
            payee: same_shard.then(|| request.to.clone()),
            key: attempt.key.map(|k| (k.clone(), attempt.now)),
        });
        let (looked, payee) = if same_shard {
            let looked = lookup.await;
            (looked, None)
        } else {
            let payee = self.store(attempt.payee_shard).account(&request.to);
            let (looked, payee) = tokio::join!(lookup, payee);
            (looked, Some(payee))
        };
        let looked = looked?;
        if let Some(record) = looked.record {
            return self.replay_attempt(attempt, record).await.map(Err);
        }
        // An unknown payer is named before the payee's shard is asked about.
        let payer = looked
            .payer
            .ok_or_else(|| Refusal::AccountNotFound(request.from.clone()))?;
        let payee = match payee {
            Some(payee) => payee?,
            None => looked.payee,
        };
        let payee = payee.ok_or_else(|| Refusal::AccountNotFound(request.to.clone()))?;
        Ok(Ok((payer, payee)))
    }

    /// The first answer kept under the attempt's key, if its body matches.
    async fn replay_attempt(
        &self,
        attempt: &Attempt<'_>,
        record: IdempotencyRecord,
    ) -> Result<Reply, ManagerError> {
        let key = attempt.key.expect("a key record exists only with a key");
        self.replay(
            record,
            &attempt.fingerprint,
            &attempt.request.from,
            key,
            attempt.view,
        )
        .await
    }

    /// The fraud check, before any shard is written: `Ok(None)` to go on;
    /// a block is an error, kept under the key like a decline for lack of
    /// funds so a retry replays it (`Ok(Some)`: the key already held one).
    async fn screen(&self, attempt: &Attempt<'_>) -> Result<Option<Reply>, ManagerError> {
        let Some(fraud) = &self.fraud else {
            return Ok(None);
        };
        let request = attempt.request;
        let (from, to, minor) = (
            request.from.as_str(),
            request.to.as_str(),
            request.amount.minor(),
        );
        let assessment = fraud
            .score(from, to, minor, attempt.now)
            .await
            .map_err(|e| ManagerError::FraudUnavailable(format!("{e:#}")))?;
        fraud.publish(from, to, minor, &assessment).await;
        match assessment.decision {
            Verdict::Allow => return Ok(None),
            Verdict::Review => {
                tracing::debug!(
                    payer = %request.from,
                    score = assessment.score,
                    reasons = ?assessment.reasons,
                    "transfer marked for review"
                );
                return Ok(None);
            }
            Verdict::Block => {}
        }
        let refusal = Refusal::Blocked {
            score: assessment.score,
            reasons: assessment.reasons,
        };
        if let Some(record) = self.idempotency_write(attempt, None) {
            let kept = self
                .store_of(&request.from)
                .record_decline(
                    record,
                    &TransferId::generate(),
                    refusal.response(),
                    attempt.now,
                )
                .await;
            match kept {
                Ok(()) => {}
                Err(StoreError::IdempotencyKeyExists(record)) => {
                    return self.replay_attempt(attempt, record).await.map(Some);
                }
                Err(error) => return Err(error.into()),
            }
        }
        Err(refusal.into())
    }

    /// What the attempt writes under its key (nothing without one), with
    /// the answer of `completed` when it is known before the commit.
    fn idempotency_write(
        &self,
        attempt: &Attempt<'_>,
        completed: Option<&Transfer>,
    ) -> Option<IdempotencyWrite> {
        let key = attempt.key?;
        Some(IdempotencyWrite {
            scope: attempt.request.from.clone(),
            key: key.clone(),
            fingerprint: attempt.fingerprint.clone(),
            expires_at_ms: attempt.now + self.config.idempotency_ttl_ms,
            response: completed.map(|t| {
                let mut done = t.clone();
                done.state = TransferState::Completed;
                (attempt.view.render)(&done)
            }),
        })
    }

    /// The same-shard transfer, or step (a) of the saga, on the payer's
    /// shard: the transfer as applied, or the key's first answer (`Err`)
    /// when another request wrote it first.
    async fn debit(
        &self,
        attempt: &Attempt<'_>,
        transfer: &Transfer,
        idempotency: Option<IdempotencyWrite>,
    ) -> Result<Result<Transfer, Reply>, ManagerError> {
        let payer_store = self.store(transfer.payer_shard);
        let debit = if transfer.is_cross_shard() {
            payer_store.debit_to_in_flight(transfer, idempotency).await
        } else {
            payer_store.transfer_local(transfer, idempotency).await
        };
        match debit {
            Ok(DebitOutcome::Applied(applied)) => Ok(Ok(applied)),
            Ok(DebitOutcome::Declined(refusal)) => Err(refusal.into()),
            Err(StoreError::IdempotencyKeyExists(record)) => {
                self.replay_attempt(attempt, record).await.map(Err)
            }
            Err(error) => Err(error.into()),
        }
    }

    /// Runs an XA transfer in its own task, so a
    /// client that hangs up cannot drop a branch half-way.
    async fn spawn_xa(
        self: &Arc<Self>,
        transfer: Transfer,
        idempotency: Option<IdempotencyWrite>,
        key: Option<IdempotencyKey>,
        fingerprint: String,
        view: &View<Transfer>,
        passage: Passage,
    ) -> Result<Reply, ManagerError> {
        let manager = Arc::clone(self);
        let (route, render) = (view.route, view.render);
        let task = tokio::spawn(async move {
            // The gate stays passed until the transfer ends, even if the
            // client hangs up: a reshard waits for it.
            let _passage = passage;
            let view = View { route, render };
            manager
                .transfer_xa(transfer, idempotency, key, &fingerprint, &view)
                .await
        });
        task.await
            .map_err(|e| ManagerError::Internal(format!("transfer task failed: {e}")))?
    }

    /// Runs the rest of the saga (steps (b) and (c), or the reversal) in its
    /// own task, so a client that hangs up cannot
    /// stop it between steps; keeps the final answer under the key.
    async fn spawn_saga(
        self: &Arc<Self>,
        applied: Transfer,
        key: Option<IdempotencyKey>,
        render: fn(&Transfer) -> StoredResponse,
        passage: Passage,
    ) -> Result<Reply, ManagerError> {
        let manager = Arc::clone(self);
        let saga = tokio::spawn(async move {
            let _passage = passage;
            let finished = manager.finish(&applied).await;
            let response = render(&finished);
            let kept = match &key {
                Some(key) => manager
                    .store(applied.payer_shard)
                    .save_idempotent_response(&applied.payer, key, response.clone())
                    .await
                    .err(),
                None => None,
            };
            unkept_pending(&finished, kept)?;
            Ok::<_, ManagerError>(response)
        });
        let response = saga
            .await
            .map_err(|e| ManagerError::Internal(format!("transfer task failed: {e}")))??;
        Ok(Reply {
            response,
            replayed: false,
        })
    }

    /// Runs steps (b) and (c) (or the reversal) of a pending cross-shard
    /// transfer. Answers the transfer as it stands afterwards: still pending
    /// when a shard could not be reached.
    pub async fn finish(&self, transfer: &Transfer) -> Transfer {
        match self.drive(transfer).await {
            Ok(done) => done,
            Err(error) => {
                tracing::warn!(transfer = %transfer.id, %error, "cross-shard transfer left pending; recovery will finish it");
                transfer.clone()
            }
        }
    }

    /// [`Self::drive`] for a transfer an earlier request or process left
    /// pending; broken on purpose under `ManagerConfig::broken_recovery`.
    async fn drive_left(&self, transfer: &Transfer) -> Result<Transfer, StoreError> {
        if self.config.broken_recovery {
            tracing::error!(transfer = %transfer.id, "broken recovery (test hook): completing without the credit");
            return self.shards[transfer.payer_shard.index()]
                .complete_transfer(&transfer.id, now_ms())
                .await;
        }
        self.drive(transfer).await
    }

    async fn drive(&self, transfer: &Transfer) -> Result<Transfer, StoreError> {
        let store = |shard: ShardId| {
            self.shards
                .get(shard.index())
                .ok_or_else(|| StoreError::Internal {
                    shard,
                    reason: format!(
                        "transfer {} names shard {shard}, which this process has not open \
                     (start it with the shards a reshard grew into: --spare-shards)",
                        transfer.id
                    ),
                })
        };
        let payer_store = store(transfer.payer_shard)?;
        let mut payee_store = store(transfer.payee_shard)?;
        // A payee that moved (a reshard) is credited at its new home; the
        // credit is idempotent on the transfer id wherever it lands.
        let mut outcome = payee_store.credit_from_in_flight(transfer).await;
        for _ in 0..3 {
            match outcome {
                Err(StoreError::Refused(Refusal::AccountMoved { shard, .. })) => {
                    payee_store = store(shard)?;
                    outcome = payee_store.credit_from_in_flight(transfer).await;
                }
                _ => break,
            }
        }
        let outcome = outcome?;
        if self.fault_fires(Fault::CrashAfterCredit) {
            tracing::error!(transfer = %transfer.id, "fault injection: aborting after step (b)");
            std::process::abort();
        }
        match outcome {
            CreditOutcome::Credited => payer_store.complete_transfer(&transfer.id, now_ms()).await,
            CreditOutcome::Refused { code } => {
                payer_store
                    .reverse_transfer(&transfer.id, &code, now_ms())
                    .await
            }
        }
    }

    /// A cross-shard transfer by XA two-phase commit (see the module
    /// docs). Answers the completed transfer once the commit decision is
    /// durable, even if a branch's commit then fails: recovery commits it.
    async fn transfer_xa(
        &self,
        transfer: Transfer,
        idempotency: Option<IdempotencyWrite>,
        key: Option<IdempotencyKey>,
        fingerprint: &str,
        view: &View<Transfer>,
    ) -> Result<Reply, ManagerError> {
        let deadline = now_ms() + self.config.xa_decision_ms;
        let xa = XaTransfer::new(&self.shards, &transfer, deadline)?;
        let (debit, credit) = match xa.prepare(&transfer, idempotency).await {
            Ok(branches) => branches,
            Err(NotPrepared::Debit(error)) => {
                return self
                    .xa_refused(error, &transfer, key, fingerprint, view)
                    .await
            }
            Err(NotPrepared::Refused(error)) => return Err(error),
        };
        if self.fault_fires(Fault::CrashAfterPrepare) {
            tracing::error!(transfer = %transfer.id, "fault injection: aborting after XA PREPARE");
            std::process::abort();
        }
        if self.fault_fires(Fault::StallAfterPrepare) {
            tracing::warn!(transfer = %transfer.id, "fault injection: stalling after XA PREPARE");
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
        let (debit, credit) = xa.decide(&transfer, debit, credit).await?;
        if self.fault_fires(Fault::CrashAfterDecision) {
            tracing::error!(transfer = %transfer.id, "fault injection: aborting after the XA decision");
            std::process::abort();
        }
        let (a, b) = tokio::join!(debit.commit(), credit.commit());
        for error in [a.err(), b.err()].into_iter().flatten() {
            tracing::warn!(transfer = %transfer.id, %error, "XA commit of a branch failed; recovery will commit it");
        }
        let mut done = transfer;
        done.state = TransferState::Completed;
        Ok(Reply {
            response: (view.render)(&done),
            replayed: false,
        })
    }

    /// A payer branch that could not run: an earlier request's key record
    /// (replay it), or an error.
    async fn xa_refused(
        &self,
        error: StoreError,
        transfer: &Transfer,
        key: Option<IdempotencyKey>,
        fingerprint: &str,
        view: &View<Transfer>,
    ) -> Result<Reply, ManagerError> {
        match (error, key) {
            (StoreError::IdempotencyKeyExists(record), Some(key)) => {
                self.replay(record, fingerprint, &transfer.payer, &key, view)
                    .await
            }
            (error, _) => Err(error.into()),
        }
    }

    /// Commits or rolls back prepared XA branches whose coordinator's
    /// deadline has passed, as its decision log says; a branch without a
    /// decision is aborted, the abort written to the log first so a late
    /// coordinator cannot commit it. Branches of coordinators still within
    /// their deadline, in this process or any other, are left alone (an
    /// older gtrid without a deadline is left the first time it is seen).
    /// Every ~30 s, forgets decisions older than a minute that no branch
    /// needs.
    pub async fn resolve_in_doubt(&self) -> XaSweep {
        let mut sweep = XaSweep::default();
        let Some(found) = self.in_doubt_branches(&mut sweep).await else {
            return sweep;
        };
        let seen = std::mem::take(&mut *self.xa_seen.lock().expect("xa seen lock"));
        let mut still = HashSet::new();
        for branch in found {
            let deadline = BranchId::deadline(&branch.gtrid);
            let due = match deadline {
                Some(deadline) => now_ms() > deadline,
                None => seen.contains(&branch),
            };
            if !due {
                if let Some(deadline) = deadline {
                    sweep.due_by = sweep.due_by.max(Some(deadline));
                } else {
                    still.insert(branch.clone());
                }
                sweep.remaining.push(branch);
                continue;
            }
            match self.settle(&branch).await {
                Ok(decision) => {
                    sweep.resolved += 1;
                    tracing::info!(%branch, ?decision, "recovery resolved an in-doubt XA branch");
                }
                Err(error) => {
                    tracing::warn!(%branch, %error, "recovery cannot resolve XA branch yet");
                    still.insert(branch.clone());
                    sweep.remaining.push(branch);
                }
            }
        }
        *self.xa_seen.lock().expect("xa seen lock") = still;
        self.forget_old_decisions(&sweep).await;
        sweep
    }

    /// Every shard's prepared branches; `None` when no shard has XA.
    async fn in_doubt_branches(&self, sweep: &mut XaSweep) -> Option<Vec<BranchId>> {
        let mut found = Vec::new();
        let mut any = false;
        for store in &self.shards {
            let Some(xa) = store.two_phase() else {
                continue;
            };
            any = true;
            match xa.in_doubt().await {
                Ok(branches) => found.extend(branches),
                Err(error) => sweep
                    .unreachable
                    .push(format!("shard {}: {error}", store.shard())),
            }
        }
        any.then_some(found)
    }

    /// Every ~30 s, when every shard answered: forgets decisions older
    /// than a minute that no branch left needs.
    async fn forget_old_decisions(&self, sweep: &XaSweep) {
        let due = {
            let mut at = self.xa_forgotten_at.lock().expect("xa forget lock");
            let due = at.is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(30));
            if due {
                *at = Some(std::time::Instant::now());
            }
            due
        };
        if !due || !sweep.unreachable.is_empty() {
            return;
        }
        let keep: Vec<String> = sweep.remaining.iter().map(|b| b.gtrid.clone()).collect();
        for store in &self.shards {
            if let Some(xa) = store.two_phase() {
                if let Err(error) = xa.forget_decisions(now_ms() - 60_000, &keep).await {
                    tracing::warn!(shard = %store.shard(), %error, "cannot forget old XA decisions yet");
                }
            }
        }
    }

    async fn settle(&self, branch: &BranchId) -> Result<Decision, StoreError> {
        let internal = |reason: String| StoreError::Internal {
            shard: branch.shard,
            reason,
        };
        let coordinator = BranchId::coordinator(&branch.gtrid)
            .filter(|c| c.index() < self.shards.len())
            .ok_or_else(|| internal(format!("{} names no shard of this ring", branch.gtrid)))?;
        let log = self.shards[coordinator.index()]
            .two_phase()
            .ok_or_else(|| internal(format!("shard {coordinator} keeps no XA decisions")))?;
        let decision = match log.decision(&branch.gtrid).await? {
            Some(decision) => decision,
            None => log.decide(&branch.gtrid, Decision::Abort).await?,
        };
        self.shards[branch.shard.index()]
            .two_phase()
            .ok_or_else(|| internal(format!("shard {} has no two-phase commit", branch.shard)))?
            .resolve(branch, decision)
            .await?;
        Ok(decision)
    }

    /// Drives pending transfers older than the grace period on every shard
    /// to an end, and purges expired idempotency keys. A shard that cannot
    /// be reached is skipped until the next pass. Answers how many
    /// transfers it finished.
    pub async fn recover_once(&self, batch: u32) -> usize {
        let before: TimestampMs = now_ms() - self.config.recovery_grace_ms;
        let mut finished = self.resolve_in_doubt().await.resolved;
        for store in &self.shards {
            let pending = match store.pending_transfers(before, batch).await {
                Ok(pending) => pending,
                Err(error) => {
                    tracing::warn!(shard = %store.shard(), %error, "recovery cannot read shard yet");
                    continue;
                }
            };
            for transfer in pending {
                match self.drive_left(&transfer).await {
                    Ok(done) if done.state != TransferState::Pending => finished += 1,
                    Ok(_) => {}
                    Err(error) => {
                        tracing::warn!(transfer = %transfer.id, %error, "recovery could not finish transfer yet")
                    }
                }
            }
            if let Err(error) = store.purge_expired_idempotency(now_ms(), batch).await {
                tracing::warn!(shard = %store.shard(), %error, "cannot purge expired idempotency keys yet");
            }
        }
        finished
    }

    /// Answers a retry from its idempotency record.
    async fn replay(
        &self,
        record: IdempotencyRecord,
        fingerprint: &str,
        scope: &AccountId,
        key: &IdempotencyKey,
        view: &View<Transfer>,
    ) -> Result<Reply, ManagerError> {
        if record.fingerprint != fingerprint {
            return Err(ManagerError::IdempotencyKeyReused);
        }
        if let Some(response) = record.response {
            return Ok(Reply {
                response,
                replayed: true,
            });
        }
        // The first request debited but stopped before answering (a crash):
        // finish its transfer and keep that answer.
        let id = record
            .resource_id
            .as_deref()
            .and_then(|id| TransferId::parse(id).ok())
            .ok_or_else(|| {
                ManagerError::Internal("idempotency record without a transfer".into())
            })?;
        let store = self.store_of(scope);
        // The key's transfer stays on the payer's shard of its time; the
        // key moves with its account (a reshard).
        let transfer = match store.transfer(&id).await? {
            Some(transfer) => Some(transfer),
            None => self.transfer(&id).await?,
        }
        .ok_or_else(|| ManagerError::Internal(format!("transfer {id} of a key is missing")))?;
        let transfer = if transfer.state == TransferState::Pending {
            match self.drive_left(&transfer).await {
                Ok(done) => done,
                Err(error) => {
                    tracing::warn!(transfer = %transfer.id, %error, "cross-shard transfer left pending; recovery will finish it");
                    transfer.clone()
                }
            }
        } else {
            transfer
        };
        let response = (view.render)(&transfer);
        let kept = store
            .save_idempotent_response(scope, key, response.clone())
            .await
            .err();
        unkept_pending(&transfer, kept)?;
        Ok(Reply {
            response,
            replayed: true,
        })
    }

    fn claim_key(
        &self,
        scope: &AccountId,
        key: Option<&IdempotencyKey>,
    ) -> Result<Option<RunningKey<'_>>, ManagerError> {
        let Some(key) = key else { return Ok(None) };
        let entry = (scope.as_str().to_string(), key.as_str().to_string());
        let mut running = self.running_keys.lock().expect("key set lock");
        if !running.insert(entry.clone()) {
            return Err(ManagerError::IdempotencyKeyInFlight);
        }
        Ok(Some(RunningKey {
            set: &self.running_keys,
            entry,
        }))
    }
}

/// An answer under a key that could not be kept (`lost`, the store's
/// error) may still be given when the transfer is final: a retry rebuilds
/// the same answer from it. A pending transfer's answer would change once
/// recovery finishes it, so a retry would not replay what the client saw:
/// the client gets a retryable 503 instead, and its retry the outcome.
fn unkept_pending(transfer: &Transfer, lost: Option<StoreError>) -> Result<(), ManagerError> {
    match lost {
        Some(error) if transfer.state == TransferState::Pending => {
            Err(ManagerError::Unavailable(format!(
                "transfer {} is under way, but its answer could not be kept under the Idempotency-Key ({error}); retry with the same Idempotency-Key for its outcome",
                transfer.id
            )))
        }
        _ => Ok(()),
    }
}

fn replay_stored(record: IdempotencyRecord, fingerprint: &str) -> Result<Reply, ManagerError> {
    if record.fingerprint != fingerprint {
        return Err(ManagerError::IdempotencyKeyReused);
    }
    let response = record
        .response
        .ok_or_else(|| ManagerError::Internal("idempotency record without a response".into()))?;
    Ok(Reply {
        response,
        replayed: true,
    })
}

/// Releases a running (scope, key) pair when the request ends, however it
/// ends.
struct RunningKey<'a> {
    set: &'a Mutex<HashSet<(String, String)>>,
    entry: (String, String),
}

impl Drop for RunningKey<'_> {
    fn drop(&mut self) {
        if let Ok(mut set) = self.set.lock() {
            set.remove(&self.entry);
        }
    }
}

/// Rolls back a prepared branch; if that fails, the branch stays prepared
/// with no decision, and recovery rolls it back.
async fn undo(branch: Box<dyn PreparedBranch>) {
    let id = branch.id().clone();
    if let Err(error) = branch.rollback().await {
        tracing::warn!(branch = %id, %error, "XA rollback failed; recovery will roll the branch back");
    }
}

/// Why an XA transfer's two branches were not both prepared.
enum NotPrepared {
    /// The payer's branch could not run: an earlier request's key record
    /// may answer instead (`xa_refused` tells).
    Debit(StoreError),
    /// Declined, or the payee's branch failed; nothing is prepared.
    Refused(ManagerError),
}

/// The two branches of one XA transfer and the shards that run them.
struct XaTransfer<'a> {
    payer: &'a dyn TwoPhase,
    payee: &'a dyn TwoPhase,
    gtrid: String,
    debit_id: BranchId,
    credit_id: BranchId,
}

impl<'a> XaTransfer<'a> {
    fn new(
        shards: &'a [Arc<dyn ShardStore>],
        transfer: &Transfer,
        deadline: TimestampMs,
    ) -> Result<Self, ManagerError> {
        let xa_of = |shard: crate::ids::ShardId| {
            shards[shard.index()].two_phase().ok_or_else(|| {
                ManagerError::Internal(format!("shard {shard} has no two-phase commit"))
            })
        };
        let gtrid = BranchId::gtrid(transfer.payer_shard, &transfer.id, deadline);
        Ok(XaTransfer {
            payer: xa_of(transfer.payer_shard)?,
            payee: xa_of(transfer.payee_shard)?,
            debit_id: BranchId {
                gtrid: gtrid.clone(),
                shard: transfer.payer_shard,
            },
            credit_id: BranchId {
                gtrid: gtrid.clone(),
                shard: transfer.payee_shard,
            },
            gtrid,
        })
    }

    /// Prepares both branches, in shard order: two transfers between the
    /// same shards then lock in the same order, and the lock-wait timeout
    /// settles what InnoDB cannot see across shards. A branch prepared
    /// before the other failed is rolled back.
    async fn prepare(
        &self,
        transfer: &Transfer,
        idempotency: Option<IdempotencyWrite>,
    ) -> Result<(Box<dyn PreparedBranch>, Box<dyn PreparedBranch>), NotPrepared> {
        let refused = |e: StoreError| NotPrepared::Refused(e.into());
        if transfer.payer_shard < transfer.payee_shard {
            let debit = self.prepare_debit(transfer, idempotency).await?;
            match self.payee.prepare_credit(&self.credit_id, transfer).await {
                Ok(credit) => Ok((debit, credit)),
                Err(error) => {
                    undo(debit).await;
                    Err(refused(error))
                }
            }
        } else {
            let credit = self
                .payee
                .prepare_credit(&self.credit_id, transfer)
                .await
                .map_err(refused)?;
            match self.prepare_debit(transfer, idempotency).await {
                Ok(debit) => Ok((debit, credit)),
                Err(not) => {
                    undo(credit).await;
                    Err(not)
                }
            }
        }
    }

    async fn prepare_debit(
        &self,
        transfer: &Transfer,
        idempotency: Option<IdempotencyWrite>,
    ) -> Result<Box<dyn PreparedBranch>, NotPrepared> {
        match self
            .payer
            .prepare_debit(&self.debit_id, transfer, idempotency)
            .await
        {
            Ok(PreparedDebit::Prepared(branch)) => Ok(branch),
            Ok(PreparedDebit::Declined(refusal)) => Err(NotPrepared::Refused(refusal.into())),
            Err(error) => Err(NotPrepared::Debit(error)),
        }
    }

    /// Records the commit decision in the payer shard's log and hands the
    /// branches back to be committed. If recovery aborted them first, both
    /// are rolled back; if whether the decision was written is unknown,
    /// both are left prepared for recovery, which reads the log.
    async fn decide(
        &self,
        transfer: &Transfer,
        debit: Box<dyn PreparedBranch>,
        credit: Box<dyn PreparedBranch>,
    ) -> Result<(Box<dyn PreparedBranch>, Box<dyn PreparedBranch>), ManagerError> {
        match self.payer.decide(&self.gtrid, Decision::Commit).await {
            Ok(Decision::Commit) => Ok((debit, credit)),
            Ok(Decision::Abort) => {
                undo(debit).await;
                undo(credit).await;
                Err(ManagerError::Unavailable(format!(
                    "transfer {} was rolled back by recovery before it could commit; nothing was paid; retry with the same Idempotency-Key",
                    transfer.id
                )))
            }
            Err(error) => {
                debit.abandon().await;
                credit.abandon().await;
                Err(ManagerError::Unavailable(format!(
                    "the commit decision for transfer {} could not be confirmed ({error}); recovery settles it; retry with the same Idempotency-Key for the outcome",
                    transfer.id
                )))
            }
        }
    }
}

/// SHA-256 over the route and the parsed request fields, each length-
/// prefixed so no two different requests share a fingerprint.
pub fn fingerprint(route: &str, fields: &[&str]) -> String {
    let mut hasher = Sha256::new();
    for part in std::iter::once(route).chain(fields.iter().copied()) {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part.as_bytes());
    }
    let digest = hasher.finalize();
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::ShardId;

    fn transfer(state: TransferState) -> Transfer {
        Transfer {
            id: TransferId::generate(),
            payer: AccountId::parse("payer").unwrap(),
            payee: AccountId::parse("payee").unwrap(),
            amount: Amount::from_minor(100).unwrap(),
            currency: Currency::parse("INR").unwrap(),
            payer_shard: ShardId::new(0).unwrap(),
            payee_shard: ShardId::new(1).unwrap(),
            state,
            failure_code: None,
            created_at_ms: 1,
            updated_at_ms: 1,
        }
    }

    fn lost() -> Option<StoreError> {
        Some(StoreError::Unavailable {
            shard: ShardId::new(0).unwrap(),
            reason: "connection reset".into(),
        })
    }

    /// Found by a run with a flaky link to the payer's shard: the 202 of a
    /// pending transfer whose key record could not be written was answered,
    /// and a retry after recovery replayed 201 instead.
    #[test]
    fn a_pending_answer_that_could_not_be_kept_is_a_retryable_503() {
        let pending = transfer(TransferState::Pending);
        let e = unkept_pending(&pending, lost()).unwrap_err();
        assert!(matches!(e, ManagerError::Unavailable(_)), "{e}");
        assert!(e.to_string().contains("same Idempotency-Key"), "{e}");
        assert!(unkept_pending(&pending, None).is_ok());
        for state in [TransferState::Completed, TransferState::Failed] {
            assert!(unkept_pending(&transfer(state), lost()).is_ok());
        }
    }
}
