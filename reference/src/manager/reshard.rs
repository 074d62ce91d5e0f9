//! Growing (or shrinking) a live system by a shard: the routing the shard
//! manager keeps, the gate transfers pass through, and the reshard itself.
//!
//! A reshard from a placement over `n` shards to one over `m` moves every
//! account whose home changes, batch by batch, while transfers keep
//! running. For each batch:
//! 1. **freeze**: new requests that touch a batch account wait at the gate
//!    (up to [`WAIT_AT_GATE`], then `503 account_moving`); the batch waits
//!    for the requests already running on its accounts (a saga's last
//!    steps included) to finish;
//! 2. accounts in a pending cross-shard transfer are left for a later
//!    pass (recovery finishes such transfers first);
//! 3. **copy**, per account: the new home adopts it (zero balance, its
//!    idempotency records), the old home moves its whole balance into
//!    flight and closes it with a forwarding record, the new home takes
//!    the money out of flight, the old home marks the move complete. The
//!    move is a cross-shard transfer of the account's balance to itself,
//!    so the audit's in-flight and exactly-once checks cover it, and a
//!    crash between the steps is finished by the recovery loop;
//! 4. the routing sends the batch's accounts to their new home, and the
//!    gate opens.
//!
//! Passes repeat until none finds an account to move; then, with account
//! creation held at the gate, a last pass and the **switch**: the new
//! placement is in force (saved on shard 0, its version one higher). A
//! write that still reaches an old home (a process that routes by an older
//! placement) is refused by that shard (`Refusal::AccountMoved`), never
//! applied to a stale copy.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::{ManagerError, ShardManager};
use crate::codes::ErrorCode;
use crate::ids::{AccountId, ShardId, TransferId};
use crate::ledger::{
    now_ms, CreditOutcome, MovedOut, MovingAccount, PlacementRecord, ShardStore, StoreError,
};
use crate::sharding::{Ring, Strategy};

/// How long a request waits at the gate for its account's move before it
/// is refused with `503 account_moving`.
pub const WAIT_AT_GATE: Duration = Duration::from_secs(3);

/// Accounts moved under one freeze.
const BATCH: usize = 32;

/// Accounts read per page when a pass scans a shard.
const PAGE: u32 = 500;

/// Where accounts live: the placement in force and, while a reshard runs,
/// the placement it moves to and the accounts already at their new home.
#[derive(Debug, Clone)]
pub(crate) struct Routing {
    pub ring: Ring,
    pub version: u64,
    pub target: Option<Ring>,
    pub moved: HashMap<AccountId, ShardId>,
    /// The placement before the last switch (the broken-switch test hook
    /// routes credits by it).
    pub previous: Option<Ring>,
}

impl Routing {
    pub fn new(ring: Ring) -> Routing {
        Routing {
            ring,
            version: 0,
            target: None,
            moved: HashMap::new(),
            previous: None,
        }
    }

    pub fn shard_of(&self, id: &AccountId) -> ShardId {
        match self.moved.get(id) {
            Some(shard) => *shard,
            None => self.ring.shard_of(id),
        }
    }
}

/// The gate every request on an account passes while a reshard may run.
/// Without a reshard a request only counts itself in and out (two atomic
/// operations); during one, each request's accounts are counted, so a
/// batch can wait for the requests on its accounts and hold back new ones.
#[derive(Debug, Default)]
pub(crate) struct Gate {
    resharding: AtomicBool,
    /// Requests that entered while no reshard ran.
    untracked: AtomicU64,
    state: Mutex<GateState>,
    /// Woken when a batch opens, or creation reopens.
    opened: tokio::sync::Notify,
    /// Woken when a request leaves.
    left: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct GateState {
    frozen: HashSet<AccountId>,
    /// Requests running per account (only while resharding).
    active: HashMap<AccountId, u32>,
    /// Account creation held (the switch).
    creates_closed: bool,
    /// Account creations running.
    creating: u32,
}

/// A request's pass through the gate; leaving is on drop.
#[derive(Debug)]
pub(crate) struct Passage {
    gate: Arc<Gate>,
    tracked: Vec<AccountId>,
    untracked: bool,
    create: bool,
}

impl Drop for Passage {
    fn drop(&mut self) {
        if self.untracked {
            self.gate.untracked.fetch_sub(1, Ordering::SeqCst);
            // Only a reshard starting waits for untracked requests.
            if !self.gate.resharding.load(Ordering::SeqCst) {
                return;
            }
        } else {
            let mut state = self.gate.state.lock().expect("gate lock");
            if self.create {
                state.creating -= 1;
            }
            for id in &self.tracked {
                if let Some(n) = state.active.get_mut(id) {
                    *n -= 1;
                    if *n == 0 {
                        state.active.remove(id);
                    }
                }
            }
        }
        self.gate.left.notify_waiters();
    }
}

/// Why the gate held a request back.
#[derive(Debug)]
pub(crate) struct Held(pub AccountId);

impl Gate {
    /// Enters for `accounts` (`create`: an account creation), or says
    /// which account is held.
    fn try_enter(self: &Arc<Self>, accounts: &[&AccountId], create: bool) -> Result<Passage, Held> {
        self.untracked.fetch_add(1, Ordering::SeqCst);
        if !self.resharding.load(Ordering::SeqCst) {
            return Ok(Passage {
                gate: Arc::clone(self),
                tracked: Vec::new(),
                untracked: true,
                create: false,
            });
        }
        self.untracked.fetch_sub(1, Ordering::SeqCst);
        let mut state = self.state.lock().expect("gate lock");
        for id in accounts {
            if state.frozen.contains(*id) || (create && state.creates_closed) {
                return Err(Held((*id).clone()));
            }
        }
        let tracked: Vec<AccountId> = accounts.iter().map(|id| (*id).clone()).collect();
        for id in &tracked {
            *state.active.entry(id.clone()).or_insert(0) += 1;
        }
        if create {
            state.creating += 1;
        }
        Ok(Passage {
            gate: Arc::clone(self),
            tracked,
            untracked: false,
            create,
        })
    }

    /// Enters, waiting up to [`WAIT_AT_GATE`] while an account is held.
    pub async fn enter(
        self: &Arc<Self>,
        accounts: &[&AccountId],
        create: bool,
        counters: &GateCounters,
    ) -> Result<Passage, Held> {
        let deadline = Instant::now() + WAIT_AT_GATE;
        let mut waited = false;
        loop {
            let opened = self.opened.notified();
            match self.try_enter(accounts, create) {
                Ok(passage) => {
                    if waited {
                        counters.waited.fetch_add(1, Ordering::Relaxed);
                    }
                    return Ok(passage);
                }
                Err(held) => {
                    waited = true;
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        counters.refused.fetch_add(1, Ordering::Relaxed);
                        return Err(held);
                    }
                    // Woken when a batch opens; a short cap covers a batch
                    // that opened between the check and this wait.
                    let _ = tokio::time::timeout(left.min(Duration::from_millis(50)), opened).await;
                }
            }
        }
    }

    /// Starts tracking requests per account; answers once every request
    /// that entered untracked has left.
    async fn start(&self) {
        self.resharding.store(true, Ordering::SeqCst);
        while self.untracked.load(Ordering::SeqCst) > 0 {
            let left = self.left.notified();
            if self.untracked.load(Ordering::SeqCst) == 0 {
                break;
            }
            let _ = tokio::time::timeout(Duration::from_millis(20), left).await;
        }
    }

    fn stop(&self) {
        self.resharding.store(false, Ordering::SeqCst);
        let mut state = self.state.lock().expect("gate lock");
        state.frozen.clear();
        state.creates_closed = false;
        drop(state);
        self.opened.notify_waiters();
    }

    /// Holds back new requests on `ids`, then waits for the running ones.
    async fn freeze(&self, ids: &[AccountId]) {
        {
            let mut state = self.state.lock().expect("gate lock");
            state.frozen.extend(ids.iter().cloned());
        }
        loop {
            let left = self.left.notified();
            let busy = {
                let state = self.state.lock().expect("gate lock");
                ids.iter().any(|id| state.active.contains_key(id))
            };
            if !busy {
                return;
            }
            let _ = tokio::time::timeout(Duration::from_millis(20), left).await;
        }
    }

    fn open(&self, ids: &[AccountId]) {
        let mut state = self.state.lock().expect("gate lock");
        for id in ids {
            state.frozen.remove(id);
        }
        drop(state);
        self.opened.notify_waiters();
    }

    /// Holds back account creation, then waits for the creations running.
    async fn close_creates(&self) {
        self.state.lock().expect("gate lock").creates_closed = true;
        loop {
            let left = self.left.notified();
            if self.state.lock().expect("gate lock").creating == 0 {
                return;
            }
            let _ = tokio::time::timeout(Duration::from_millis(20), left).await;
        }
    }
}

/// What the gate did to requests during reshards, since the process
/// started.
#[derive(Debug, Default)]
pub(crate) struct GateCounters {
    pub waited: AtomicU64,
    pub refused: AtomicU64,
}

/// One phase of a reshard, timed.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Phase {
    pub name: &'static str,
    /// Milliseconds since the Unix epoch.
    pub started_at_ms: i64,
    pub ended_at_ms: i64,
}

/// What a reshard did.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ReshardReport {
    pub from_shards: u32,
    pub to_shards: u32,
    pub strategy: &'static str,
    /// The placement's version once it finished.
    pub version: u64,
    /// Customer accounts on the shards when it began.
    pub accounts_scanned: u64,
    pub accounts_moved: u64,
    /// Moved accounts over scanned accounts.
    pub moved_share: f64,
    /// Money moved with the accounts, in minor units (all currencies).
    pub money_moved_minor: i128,
    pub keys_copied: u64,
    /// Bytes of account and idempotency-record data copied.
    pub bytes_copied: u64,
    /// Passes over the shards, and accounts put off to a later pass
    /// because a cross-shard transfer on them was pending.
    pub passes: u32,
    pub deferred: u64,
    /// Requests that waited at the gate, and that were refused after
    /// waiting (`503 account_moving`), during this reshard.
    pub requests_waited: u64,
    pub requests_refused: u64,
    /// Longest time a batch held its accounts, in milliseconds.
    pub longest_freeze_ms: u64,
    pub phases: Vec<Phase>,
}

/// The state of the reshard running or last run, for the status route.
#[derive(Debug, Clone, Serialize, Default)]
pub struct ReshardStatus {
    pub running: bool,
    pub shards: u32,
    pub strategy: &'static str,
    pub version: u64,
    pub target_shards: Option<u32>,
    pub accounts_moved: u64,
    pub last: Option<ReshardReport>,
    pub error: Option<String>,
}

/// The right to run the one reshard at a time ([`ShardManager::claim_reshard`]).
pub struct ReshardClaim(#[allow(dead_code)] tokio::sync::OwnedMutexGuard<()>);

/// What became of one account of a batch.
enum Moved {
    Done(MoveFigures),
    /// A transfer it pays is pending on its old home: put off.
    Busy,
    /// No longer on the shard the pass found it on.
    Gone,
}

/// What moving one account copied.
struct MoveFigures {
    keys: u64,
    bytes: u64,
    money: i128,
}

struct Progress {
    scanned: u64,
    moved: u64,
    money: i128,
    keys: u64,
    bytes: u64,
    deferred: u64,
    longest_freeze: Duration,
}

impl ShardManager {
    /// The shard that holds `account` under the routing in force.
    pub fn shard_of(&self, account: &AccountId) -> ShardId {
        self.routing.read().expect("routing lock").shard_of(account)
    }

    /// The shard a transfer credits `payee` on: its home, except under the
    /// broken-switch test hook, which keeps crediting an account's home
    /// before the last switch (a process with a stale placement).
    pub(crate) fn payee_shard_of(&self, payee: &AccountId) -> ShardId {
        let routing = self.routing.read().expect("routing lock");
        match routing.previous {
            Some(previous) if self.config.broken_switch => previous.shard_of(payee),
            _ => routing.shard_of(payee),
        }
    }

    /// Passes the gate for a request on `accounts`.
    pub(crate) async fn pass_gate(
        &self,
        accounts: &[&AccountId],
        create: bool,
    ) -> Result<Passage, ManagerError> {
        self.gate
            .enter(accounts, create, &self.gate_counters)
            .await
            .map_err(|Held(account)| ManagerError::Moving(account))
    }

    /// Adopts the placement saved on shard 0, if there is one (a system
    /// restarted after a reshard), and the moves of a reshard that did not
    /// finish; at a first start, saves the placement in force.
    pub async fn load_placement(&self) -> Result<(), ManagerError> {
        let (record, moved) = self.placement_on_shards().await?;
        let Some(record) = record else {
            self.routing.write().expect("routing lock").moved = moved;
            // The first start: the placement is kept from now on, so a
            // restart with other flags (--spare-shards taken for placed
            // shards) still finds every account.
            let ring = self.routing.read().expect("routing lock").ring;
            self.shards[0]
                .save_placement(PlacementRecord {
                    strategy: ring.strategy(),
                    shards: ring.shard_count(),
                    version: 0,
                })
                .await?;
            self.fence_creates(ring).await;
            return Ok(());
        };
        self.adopt_placement(record, moved);
        // A reshard that stopped at its switch may have left its fence.
        let ring = self.routing.read().expect("routing lock").ring;
        self.fence_creates(ring).await;
        Ok(())
    }

    /// Catches up with a placement another process switched to (a second
    /// shard manager ran a reshard): `true` when the routing changed.
    /// Called on each recovery tick and when an account is missed at the
    /// home this process knows.
    pub async fn refresh_placement(&self) -> Result<bool, ManagerError> {
        let Some(record) = self.shards[0].placement().await? else {
            return Ok(false);
        };
        {
            let routing = self.routing.read().expect("routing lock");
            if record.version <= routing.version || routing.target.is_some() {
                return Ok(false);
            }
        }
        let (record, moved) = self.placement_on_shards().await?;
        let Some(record) = record else {
            return Ok(false);
        };
        let before = self.routing.read().expect("routing lock").version;
        self.adopt_placement(record, moved);
        let after = self.routing.read().expect("routing lock").version;
        if after != before {
            tracing::info!(
                version = after,
                "adopted the placement another process switched to"
            );
        }
        Ok(after != before)
    }

    /// The placement saved on shard 0 and every forwarding record, checked
    /// against the shard stores this process has open.
    async fn placement_on_shards(
        &self,
    ) -> Result<(Option<PlacementRecord>, HashMap<AccountId, ShardId>), ManagerError> {
        let stores = self.shards.len() as u32;
        // Accounts a reshard that did not finish (a crash, an error) left
        // at their new home: their forwarding records say where.
        let mut hops: HashMap<AccountId, Vec<(ShardId, ShardId)>> = HashMap::new();
        for store in &self.shards {
            for (id, to) in store.forwarding().await? {
                if to.index() as u32 >= stores {
                    return Err(ManagerError::Internal(format!(
                        "account {id} moved to shard {to}, but only {stores} shard stores are \
                         open; start the system with more shards (--spare-shards)"
                    )));
                }
                hops.entry(id).or_default().push((store.shard(), to));
            }
        }
        let mut moved: HashMap<AccountId, ShardId> = hops
            .into_iter()
            .map(|(id, hops)| (id, last_hop(&hops)))
            .collect();
        let record = self.shards[0].placement().await?;
        if let Some(record) = &record {
            if record.shards > stores {
                return Err(ManagerError::Internal(format!(
                    "the shards hold a placement over {} shards (after a reshard) but only \
                     {stores} shard stores are open; start the system with {} shards (--shards \
                     or --spare-shards)",
                    record.shards, record.shards
                )));
            }
        }
        let ring = match &record {
            Some(r) => Ring::with_strategy(r.shards, r.strategy)
                .map_err(|e| ManagerError::Internal(e.to_string()))?,
            None => self.routing.read().expect("routing lock").ring,
        };
        // Only the moves the placement does not already say.
        moved.retain(|id, to| ring.shard_of(id) != *to);
        Ok((record, moved))
    }

    /// Routes by `record` and `moved` from now on, in one step.
    fn adopt_placement(&self, record: PlacementRecord, moved: HashMap<AccountId, ShardId>) {
        let Ok(ring) = Ring::with_strategy(record.shards, record.strategy) else {
            return;
        };
        let mut routing = self.routing.write().expect("routing lock");
        if routing.target.is_some() || record.version < routing.version {
            return;
        }
        if routing.ring != ring {
            routing.previous = Some(routing.ring);
        }
        routing.ring = ring;
        routing.version = record.version;
        routing.moved = moved;
    }

    /// After `id` was not found, or was refused as moved (`hint`), at the
    /// shard this process routes it to: follows that shard's forwarding
    /// records (a move another process made) or catches up with a newer
    /// placement. `true` when the routing changed, so the request is worth
    /// sending once more; nothing was written by the first try.
    pub(crate) async fn follow_move(
        &self,
        id: &AccountId,
        tried: ShardId,
        hint: Option<ShardId>,
    ) -> Result<bool, ManagerError> {
        if self.shard_of(id) != tried {
            // Learned meanwhile (another request, a recovery tick).
            return Ok(true);
        }
        let start = tried;
        let mut at = start;
        let mut next = match hint {
            Some(shard) => Some(shard),
            None => self.shards[at.index()].moved_to(id).await?,
        };
        // An account can move again while this process looks (three moves
        // at most are followed).
        for _ in 0..3 {
            let Some(to) = next.filter(|to| *to != at) else {
                break;
            };
            if to.index() >= self.shards.len() {
                return Err(ManagerError::Internal(format!(
                    "account {id} moved to shard {to}, which this process has not open \
                     (start it with the shards a reshard grew into: --spare-shards)"
                )));
            }
            at = to;
            next = self.shards[at.index()].moved_to(id).await?;
        }
        if at == start {
            // Shard 0 down must not turn a plain answer into an error.
            return Ok(self.refresh_placement().await.unwrap_or(false));
        }
        let _ = self.refresh_placement().await;
        let mut routing = self.routing.write().expect("routing lock");
        if routing.ring.shard_of(id) == at {
            routing.moved.remove(id);
        } else {
            routing.moved.insert(id.clone(), at);
        }
        Ok(true)
    }

    pub fn reshard_status(&self) -> ReshardStatus {
        let routing = self.routing.read().expect("routing lock").clone();
        let mut status = self.reshard_state.lock().expect("status lock").clone();
        status.shards = routing.ring.shard_count();
        status.strategy = routing.ring.strategy().as_str();
        status.version = routing.version;
        status.target_shards = routing.target.map(|t| t.shard_count());
        status.accounts_moved = routing.moved.len() as u64;
        status
    }

    /// The placement a reshard to `to` shards by `strategy` would move
    /// to, or why it cannot run.
    pub fn check_reshard(&self, to: u32, strategy: Option<Strategy>) -> Result<Ring, ManagerError> {
        let current = self.routing.read().expect("routing lock").ring;
        let stores = self.shards.len() as u32;
        if to == 0 || to > stores {
            return Err(ManagerError::invalid(
                ErrorCode::InvalidShardCount,
                format!(
                    "to must be 1 to {stores}: the system has {stores} shard stores open \
                     (start it with --spare-shards to hold shards it may grow into)"
                ),
            ));
        }
        let strategy = strategy.unwrap_or(current.strategy());
        let target = Ring::with_strategy(to, strategy)
            .map_err(|e| ManagerError::invalid(ErrorCode::InvalidShardCount, e.to_string()))?;
        if target == current {
            return Err(ManagerError::invalid(
                ErrorCode::InvalidShardCount,
                format!(
                    "the system already places accounts over {to} shards by {}",
                    strategy.as_str()
                ),
            ));
        }
        Ok(target)
    }

    /// Moves the system to a placement over `to` shards (by `strategy`,
    /// or the one in force), while requests keep running. See the module
    /// docs.
    pub async fn reshard(
        self: &Arc<Self>,
        to: u32,
        strategy: Option<Strategy>,
    ) -> Result<ReshardReport, ManagerError> {
        let one = self.claim_reshard()?;
        self.reshard_claimed(one, to, strategy).await
    }

    /// The right to run the one reshard at a time, or why not.
    pub fn claim_reshard(&self) -> Result<ReshardClaim, ManagerError> {
        let claim = Arc::clone(&self.reshard_lock)
            .try_lock_owned()
            .map_err(|_| {
                ManagerError::invalid(
                    ErrorCode::ReshardRunning,
                    "a reshard is already running; GET /v1/admin/reshard shows its progress",
                )
            })?;
        let mut state = self.reshard_state.lock().expect("status lock");
        state.running = true;
        state.error = None;
        state.last = None;
        Ok(ReshardClaim(claim))
    }

    /// [`Self::reshard`] with the claim already taken.
    pub async fn reshard_claimed(
        self: &Arc<Self>,
        claim: ReshardClaim,
        to: u32,
        strategy: Option<Strategy>,
    ) -> Result<ReshardReport, ManagerError> {
        let _claim = claim;
        if let Err(error) = self.refresh_placement().await {
            let mut state = self.reshard_state.lock().expect("status lock");
            state.running = false;
            state.error = Some(error.to_string());
            return Err(error);
        }
        let current = self.routing.read().expect("routing lock").ring;
        let target = match self.check_reshard(to, strategy) {
            Ok(target) => target,
            Err(error) => {
                let mut state = self.reshard_state.lock().expect("status lock");
                state.running = false;
                state.error = Some(error.to_string());
                return Err(error);
            }
        };
        let result = self.run_reshard(current, target).await;
        self.gate.stop();
        {
            let mut state = self.reshard_state.lock().expect("status lock");
            state.running = false;
            match &result {
                Ok(report) => state.last = Some(report.clone()),
                Err(error) => {
                    state.error = Some(error.to_string());
                    let mut routing = self.routing.write().expect("routing lock");
                    // The accounts moved so far stay where they are; the
                    // routing keeps them there until a reshard finishes.
                    tracing::error!(%error, moved = routing.moved.len(), "reshard stopped");
                    routing.target = None;
                }
            }
        }
        if result.is_err() {
            // Accounts open where the placement in force puts them.
            self.fence_creates(current).await;
        }
        result
    }

    /// Writes `ring` as the fence of account creation on every shard (see
    /// `ShardStore::fence_creates`); a shard that cannot be written is
    /// named in the log (it keeps its older fence).
    async fn fence_creates(&self, ring: Ring) -> bool {
        let mut all = true;
        for store in &self.shards {
            if let Err(error) = store
                .fence_creates(ring.strategy(), ring.shard_count())
                .await
            {
                tracing::warn!(%error, shard = %store.shard(), "the creation fence could not be written");
                all = false;
            }
        }
        all
    }

    async fn run_reshard(
        self: &Arc<Self>,
        current: Ring,
        target: Ring,
    ) -> Result<ReshardReport, ManagerError> {
        let mut phases = Vec::new();
        let waited_before = self.gate_counters.waited.load(Ordering::Relaxed);
        let refused_before = self.gate_counters.refused.load(Ordering::Relaxed);
        let started = now_ms();
        self.routing.write().expect("routing lock").target = Some(target);
        self.gate.start().await;
        phases.push(Phase {
            name: "prepare",
            started_at_ms: started,
            ended_at_ms: now_ms(),
        });
        let mut progress = Progress {
            scanned: 0,
            moved: 0,
            money: 0,
            keys: 0,
            bytes: 0,
            deferred: 0,
            longest_freeze: Duration::ZERO,
        };
        let copy_started = now_ms();
        let mut passes = 0u32;
        loop {
            passes += 1;
            let deferred_before = progress.deferred;
            let (found, _) = self.pass(target, &mut progress, passes == 1).await?;
            if found == 0 {
                break;
            }
            if passes >= 200 {
                return Err(ManagerError::Internal(format!(
                    "accounts are still to move after {passes} passes (pending transfers on \
                     them are not finishing; is a shard down?)"
                )));
            }
            if progress.deferred > deferred_before {
                // Pending transfers on them: give recovery a moment.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        phases.push(Phase {
            name: "copy",
            started_at_ms: copy_started,
            ended_at_ms: now_ms(),
        });
        let switch_started = now_ms();
        self.gate.close_creates().await;
        // From here every shard refuses to open an account the new
        // placement puts elsewhere (a process routing by the old one), so
        // the last pass finds every account there is.
        for store in &self.shards {
            store
                .fence_creates(target.strategy(), target.shard_count())
                .await?;
        }
        loop {
            passes += 1;
            let (found, _) = self.pass(target, &mut progress, false).await?;
            if found == 0 {
                break;
            }
            if passes >= 400 {
                return Err(ManagerError::Internal(
                    "accounts are still to move at the switch".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let version = {
            let routing = self.routing.read().expect("routing lock");
            routing.version + 1
        };
        self.shards[0]
            .save_placement(PlacementRecord {
                strategy: target.strategy(),
                shards: target.shard_count(),
                version,
            })
            .await?;
        {
            let mut routing = self.routing.write().expect("routing lock");
            routing.previous = Some(routing.ring);
            routing.ring = target;
            routing.version = version;
            routing.target = None;
            routing.moved.clear();
        }
        phases.push(Phase {
            name: "switch",
            started_at_ms: switch_started,
            ended_at_ms: now_ms(),
        });
        let report = ReshardReport {
            from_shards: current.shard_count(),
            to_shards: target.shard_count(),
            strategy: target.strategy().as_str(),
            version,
            accounts_scanned: progress.scanned,
            accounts_moved: progress.moved,
            moved_share: if progress.scanned == 0 {
                0.0
            } else {
                progress.moved as f64 / progress.scanned as f64
            },
            money_moved_minor: progress.money,
            keys_copied: progress.keys,
            bytes_copied: progress.bytes,
            passes,
            deferred: progress.deferred,
            requests_waited: self.gate_counters.waited.load(Ordering::Relaxed) - waited_before,
            requests_refused: self.gate_counters.refused.load(Ordering::Relaxed) - refused_before,
            longest_freeze_ms: progress.longest_freeze.as_millis() as u64,
            phases,
        };
        tracing::info!(?report, "reshard finished");
        Ok(report)
    }

    /// One pass over every shard that may hold accounts: moves each
    /// account whose home under `target` is not where it lives. Answers
    /// how many accounts it found to move (moved or put off).
    async fn pass(
        &self,
        target: Ring,
        progress: &mut Progress,
        count_scanned: bool,
    ) -> Result<(u64, u64), ManagerError> {
        let mut found = 0u64;
        let mut moved = 0u64;
        for source in self.shards.iter() {
            let from = source.shard();
            let mut after: Option<AccountId> = None;
            loop {
                let page = source.list_accounts(after.clone(), PAGE).await?;
                let Some(last) = page.last() else { break };
                after = Some(last.id.clone());
                if count_scanned {
                    // Accounts this reshard moved here are counted where
                    // they came from.
                    let routing = self.routing.read().expect("routing lock");
                    let here = page.iter().filter(|a| !routing.moved.contains_key(&a.id));
                    progress.scanned += here.count() as u64;
                }
                // An account this reshard already moved is not listed
                // here again (it was closed), except under the broken-
                // switch hook, which leaves it open.
                let to_move: Vec<AccountId> = {
                    let routing = self.routing.read().expect("routing lock");
                    page.iter()
                        .filter(|a| target.shard_of(&a.id) != from)
                        .filter(|a| routing.moved.get(&a.id) != Some(&target.shard_of(&a.id)))
                        .map(|a| a.id.clone())
                        .collect()
                };
                found += to_move.len() as u64;
                for batch in to_move.chunks(BATCH) {
                    moved += self.move_batch(batch, from, target, progress).await?;
                }
                if page.len() < PAGE as usize {
                    break;
                }
            }
        }
        Ok((found, moved))
    }

    /// Freezes a batch, moves each account not in a pending transfer, and
    /// opens the batch again.
    async fn move_batch(
        &self,
        batch: &[AccountId],
        from: ShardId,
        target: Ring,
        progress: &mut Progress,
    ) -> Result<u64, ManagerError> {
        let frozen_at = Instant::now();
        self.gate.freeze(batch).await;
        let result = self.move_frozen(batch, from, target, progress).await;
        // The routing first, then the gate: a request let through finds
        // the account at its new home.
        self.gate.open(batch);
        progress.longest_freeze = progress.longest_freeze.max(frozen_at.elapsed());
        result
    }

    async fn move_frozen(
        &self,
        batch: &[AccountId],
        from: ShardId,
        target: Ring,
        progress: &mut Progress,
    ) -> Result<u64, ManagerError> {
        let busy = self.accounts_in_pending(batch).await?;
        let ready: Vec<&AccountId> = batch.iter().filter(|id| !busy.contains(*id)).collect();
        progress.deferred += (batch.len() - ready.len()) as u64;
        // The batch's accounts move side by side: each shard's writer
        // commits their steps in groups.
        let moves = ready.iter().map(|id| async move {
            let to = target.shard_of(id);
            self.move_account(id, from, to).await
        });
        let mut moved = 0;
        let mut failed = None;
        for figures in futures_util::future::join_all(moves).await {
            match figures {
                Ok(Moved::Done(figures)) => {
                    progress.moved += 1;
                    progress.keys += figures.keys;
                    progress.bytes += figures.bytes;
                    progress.money += figures.money;
                    moved += 1;
                }
                Ok(Moved::Busy) => progress.deferred += 1,
                Ok(Moved::Gone) => {}
                Err(error) => failed = Some(error),
            }
        }
        match failed {
            Some(error) => Err(error),
            None => Ok(moved),
        }
    }

    /// The accounts of `batch` that a pending cross-shard transfer on any
    /// shard touches.
    async fn accounts_in_pending(
        &self,
        batch: &[AccountId],
    ) -> Result<HashSet<AccountId>, ManagerError> {
        let wanted: HashSet<&AccountId> = batch.iter().collect();
        let mut busy = HashSet::new();
        for store in &self.shards {
            for t in store.pending_transfers(i64::MAX, u32::MAX).await? {
                for id in [&t.payer, &t.payee] {
                    if wanted.contains(id) {
                        busy.insert(id.clone());
                    }
                }
            }
        }
        Ok(busy)
    }

    /// Moves one frozen account from shard `from` to `to` (module docs,
    /// step 3); `None` when it is no longer there.
    async fn move_account(
        &self,
        id: &AccountId,
        from: ShardId,
        to: ShardId,
    ) -> Result<Moved, ManagerError> {
        let old: &Arc<dyn ShardStore> = &self.shards[from.index()];
        let new: &Arc<dyn ShardStore> = &self.shards[to.index()];
        let Some(moving) = old.account_to_move(id).await? else {
            return Ok(Moved::Gone);
        };
        let mut figures = MoveFigures {
            keys: moving.keys.len() as u64,
            bytes: 0,
            money: 0,
        };
        figures.bytes = (id.as_str().len() + 3 + 16) as u64
            + moving
                .keys
                .iter()
                .map(|k| {
                    (k.key.len()
                        + k.fingerprint.len()
                        + k.resource_id.as_deref().map_or(0, str::len)
                        + k.response.as_ref().map_or(0, |r| r.body.len() + 2)
                        + 16) as u64
                })
                .sum::<u64>();
        let account = moving.account.clone();
        let keys_before = moving.keys.clone();
        new.adopt_account(moving).await?;
        let transfer_id = TransferId::generate();
        let (moved, keys) = match old
            .move_out(id, to, &transfer_id, now_ms(), self.config.broken_switch)
            .await?
        {
            MovedOut::Busy => {
                // It stays at its old home for now: no second copy, and a
                // forwarding record to it where the copy was.
                new.disown(id, old.shard()).await?;
                return Ok(Moved::Busy);
            }
            MovedOut::Moved { transfer, keys } => (transfer, keys),
        };
        // From here the old home refuses the account's writes: it lives at
        // its new home, whatever happens next (recovery finishes the
        // money's move).
        self.routing
            .write()
            .expect("routing lock")
            .moved
            .insert(id.clone(), to);
        if keys != keys_before {
            // A record written between the copy and the close (a request
            // whose commit outran the gate): copied again.
            figures.keys = keys.len() as u64;
            new.adopt_account(MovingAccount { account, keys }).await?;
        }
        if moved.is_none() {
            // Nothing in flight: it has arrived.
            new.arrived(id).await?;
        }
        if let Some(t) = moved {
            if self.fault_fires(super::Fault::CrashMidMove) {
                tracing::error!(account = %id, "fault injection: aborting in the middle of a move");
                std::process::abort();
            }
            match new.credit_from_in_flight(&t).await? {
                CreditOutcome::Credited => old.finish_move(&t.id, now_ms()).await?,
                CreditOutcome::Refused { code } => {
                    return Err(StoreError::Internal {
                        shard: to,
                        reason: format!("the new home refused account {id}'s balance: {code}"),
                    }
                    .into())
                }
            }
            figures.money = i128::from(t.amount.minor());
        }
        Ok(Moved::Done(figures))
    }
}

/// Where an account's forwarding records lead: an account that moved more
/// than once has a record on each shard it left (a shard it came back to
/// dropped its own), so its home is the shard a record points to that
/// none leads away from. Records that do not chain (none should) fall
/// back to the last one read.
fn last_hop(hops: &[(ShardId, ShardId)]) -> ShardId {
    hops.iter()
        .map(|(_, to)| *to)
        .find(|to| !hops.iter().any(|(from, _)| from == to))
        .unwrap_or(hops[hops.len() - 1].1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_account_that_moved_twice_is_routed_to_where_its_records_lead() {
        let s = |i| ShardId::new(i).unwrap();
        // 4 -> 1 -> 0, read in shard order: shard 1's record first.
        assert_eq!(last_hop(&[(s(1), s(0)), (s(4), s(1))]), s(0));
        assert_eq!(last_hop(&[(s(4), s(1)), (s(1), s(0))]), s(0));
        assert_eq!(last_hop(&[(s(2), s(3))]), s(3));
        // A copy dropped on 3 points back at the home, 2, where it lives.
        assert_eq!(last_hop(&[(s(3), s(2))]), s(2));
    }
}
