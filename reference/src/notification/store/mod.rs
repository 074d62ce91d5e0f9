//! Where the notification service keeps what must outlive it and be
//! shared by its replicas: a [`NotificationStore`], in a SQLite file
//! ([`SqliteNotifications`], one process) or in a MySQL/MariaDB database
//! ([`MysqlNotifications`], which several notification replicas share).
//!
//! It holds the webhooks registered, the events applied (so a repeat from
//! the bus, or from another replica, is recognised), and one row per
//! (event, webhook) delivery: `claimed` by one replica until its lease
//! ends, then `delivered`, or `dead` (a dead letter, with what a replay
//! needs), or `dropped` (a dead letter pushed out of the bounded store).
//! A claim is taken by inserting the row, or by taking over a row whose
//! lease has ended; a replica sends only what it holds a live claim on,
//! and marks it delivered only while it still holds it. The delivery
//! rules (retries, signatures, where webhooks may point) are the
//! notifier's; a store keeps rows and makes each claim atomic.

mod mysql;
mod sqlite;

use async_trait::async_trait;

use super::{DeadLetter, Webhook};
use crate::events::Event;
use crate::ledger::TimestampMs;

pub use mysql::{database_beside, MysqlNotifications, DATABASE};
pub use sqlite::SqliteNotifications;

/// A webhook as kept: what its owner sees, and the secret it is signed
/// with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredHook {
    /// `secret` is `None` here: the secret is the field below.
    pub webhook: Webhook,
    pub secret: String,
}

/// What adding a webhook did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Added {
    Added,
    /// The account holds its maximum of webhooks.
    AccountFull,
    /// The store holds its maximum of webhooks.
    StoreFull,
}

/// Who holds a claim, and until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The notifier instance (one per process start).
    pub owner: String,
    pub until_ms: TimestampMs,
}

/// A delivery held under a lease: the event, and the webhook it goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub event: Event,
    pub webhook_id: String,
    /// Attempts made before this claim (by replays, or an earlier holder
    /// that recorded them).
    pub attempts: u32,
}

/// What claiming a dead letter for a replay found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LetterClaim {
    Claimed(Claim),
    /// Its delivery has been made since (by an earlier replay).
    Delivered,
    /// Another replay holds it now.
    Busy,
    NotFound,
}

/// The store's figures: the same whichever replica asks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoredCounts {
    pub events_applied: u64,
    /// Of those, events from a shard's outbox.
    pub outbox_applied: u64,
    pub delivered: u64,
    /// Deliveries that ever failed every attempt (replayed since or not).
    pub dead_lettered: u64,
    /// Dead letters kept now.
    pub dead_letters: u64,
    /// Dead letters pushed out of the store by newer ones.
    pub dead_letters_dropped: u64,
    /// Deliveries claimed and not finished, by any replica.
    pub claimed: u64,
}

/// The store does not answer (or answered with an error); nothing is
/// known to have changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the notification store failed: {0}")]
pub struct StoreError(pub String);

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> StoreError {
        StoreError(e.to_string())
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> StoreError {
        StoreError(e.to_string())
    }
}

/// One event of a batch taken by [`NotificationStore::apply_batch`]: the
/// webhooks of its accounts, and `None` when it was applied before, else
/// the webhooks whose delivery this claimed.
pub type Applied = (Vec<StoredHook>, Option<Vec<String>>);

/// Registrations, applied events, deliveries and dead letters.
#[async_trait]
pub trait NotificationStore: Send + Sync {
    /// Adds a webhook, unless its account holds
    /// [`super::MAX_WEBHOOKS_PER_ACCOUNT`] (checked atomically: of
    /// concurrent registrations, wherever they run, no more than that
    /// many win) or the store [`super::MAX_WEBHOOKS`].
    async fn add_webhook(&self, hook: &StoredHook) -> Result<Added, StoreError>;

    /// The webhooks of these accounts, oldest first per account.
    async fn webhooks_of(&self, accounts: &[String]) -> Result<Vec<StoredHook>, StoreError>;

    async fn webhook(&self, id: &str) -> Result<Option<StoredHook>, StoreError>;

    /// In one transaction: records `event` as applied and claims its
    /// delivery to each of `webhooks` under `lease`. `None` when the event
    /// was applied before (nothing changes); else the webhooks whose
    /// delivery this claimed (a pair already there is left to its holder).
    async fn apply(
        &self,
        event: &Event,
        webhooks: &[String],
        lease: &Lease,
    ) -> Result<Option<Vec<String>>, StoreError>;

    /// A batch of events, each with the accounts it concerns, taken in
    /// one transaction: per event, the webhooks of its accounts (as
    /// `webhooks_of`) and what `apply` answers for it with them. `None`
    /// when the store takes one event at a time (then the caller uses
    /// `webhooks_of` and `apply`); all or nothing otherwise, so a failed
    /// batch can be taken again whole.
    async fn apply_batch(
        &self,
        _events: &[(Event, Vec<String>)],
        _lease: &Lease,
    ) -> Option<Result<Vec<Applied>, StoreError>> {
        None
    }

    /// Which of `ids` were applied.
    async fn applied(&self, ids: &[String]) -> Result<Vec<String>, StoreError>;

    /// Extends the lease of a claim its owner still holds; false when it
    /// does not (its lease ended and another replica took it).
    async fn renew(
        &self,
        event_id: &str,
        webhook_id: &str,
        lease: &Lease,
    ) -> Result<bool, StoreError>;

    /// Marks a delivery made, if `owner` still holds its claim; answers
    /// whether it did.
    async fn mark_delivered(
        &self,
        event_id: &str,
        webhook_id: &str,
        owner: &str,
        attempts: u32,
    ) -> Result<bool, StoreError>;

    /// Turns `owner`'s claim of the letter's pair into that dead letter,
    /// then drops the oldest letters past [`super::MAX_DEAD_LETTERS`];
    /// answers whether `owner` still held the claim.
    async fn bury(&self, letter: &DeadLetter, owner: &str) -> Result<bool, StoreError>;

    /// Takes over, for `lease`, up to `limit` claims whose lease ended
    /// before `now_ms` (their holder died, or let them go).
    async fn take_expired(
        &self,
        lease: &Lease,
        now_ms: TimestampMs,
        limit: u32,
    ) -> Result<Vec<Claim>, StoreError>;

    /// Ends the leases of every claim `owner` holds, so the next sweep of
    /// any replica takes them; answers how many.
    async fn release(&self, owner: &str) -> Result<u64, StoreError>;

    /// The dead letters, oldest first.
    async fn dead_letters(&self) -> Result<Vec<DeadLetter>, StoreError>;

    /// Claims the delivery of dead letter `id` for a replay.
    async fn claim_letter(&self, id: &str, lease: &Lease) -> Result<LetterClaim, StoreError>;

    /// A replay that failed: the claim goes back to being the dead letter
    /// it was, with one more attempt and this error.
    async fn return_letter(
        &self,
        event_id: &str,
        webhook_id: &str,
        owner: &str,
        error: &str,
    ) -> Result<(), StoreError>;

    async fn counts(&self) -> Result<StoredCounts, StoreError>;
}

/// Longest event id kept; longer ones are refused by the notifier before
/// they reach a store (ids the system makes are 32 characters).
pub const MAX_EVENT_ID_LEN: usize = 128;
