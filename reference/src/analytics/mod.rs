//! The analytics service: a consumer of payment events that keeps totals
//! per shard and overall, and how long events took from commit to here.
//! Its routes are in [`routes`].

pub mod routes;

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::events::{ConsumerStats, Event, LagSummary, Subscription};
use crate::ledger::{now_ms, ShardStore, TimestampMs};

/// Totals of one shard (or all) as the analytics service sees them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    pub accounts_created: u64,
    pub transfers_completed: u64,
    pub transfers_failed: u64,
    pub same_shard: u64,
    pub cross_shard: u64,
    /// Completed volume per currency, minor units.
    pub volume_minor: BTreeMap<String, i64>,
    /// Fraud decisions by kind (allow, review, block); overall only.
    #[serde(default)]
    pub fraud_decisions: BTreeMap<String, u64>,
}

/// What analytics has applied of one shard's outbox. Events are
/// recognised by publish position: every position up to `position` is
/// applied (and in `base`), and `ahead` holds those applied above it,
/// which came early (the bus orders events per key, not per shard).
#[derive(Default)]
struct ShardProgress {
    position: i64,
    /// Totals of the events at positions up to `position`: what the
    /// snapshot keeps.
    base: Totals,
    base_applied: u64,
    ahead: BTreeMap<i64, Event>,
    /// Totals of every event applied from this shard.
    live: Totals,
    applied: u64,
}

impl ShardProgress {
    /// Whether the event at `position` was applied before.
    fn has(&self, position: i64) -> bool {
        position <= self.position || self.ahead.contains_key(&position)
    }

    /// Records the event at `position` applied, and moves the events that
    /// now follow `position` without a gap into `base`.
    fn advance(&mut self, position: i64, event: &Event) {
        self.ahead.insert(position, event.clone());
        while let Some(next) = self.ahead.remove(&(self.position + 1)) {
            add(&mut self.base, &next);
            self.base_applied += 1;
            self.position += 1;
        }
    }
}

/// The ids of the latest events that carry no position (fraud decisions,
/// events relayed before positions existed): at most `RECENT_IDS`.
#[derive(Default)]
struct RecentIds {
    ids: HashSet<String>,
    order: VecDeque<String>,
}

impl RecentIds {
    /// Remembers `id`; answers false if it was remembered already.
    fn insert(&mut self, id: &str) -> bool {
        if !self.ids.insert(id.to_string()) {
            return false;
        }
        self.order.push_back(id.to_string());
        if self.order.len() > RECENT_IDS {
            if let Some(old) = self.order.pop_front() {
                self.ids.remove(&old);
            }
        }
        true
    }
}

struct AnalyticsState {
    shards: BTreeMap<u16, ShardProgress>,
    recent: RecentIds,
    received: u64,
    duplicates: u64,
    fraud_decisions: BTreeMap<String, u64>,
    lag: Histogram<u64>,
}

/// The analytics service's consumer: totals per shard and overall, and
/// how long events took from commit to here.
pub struct Analytics {
    state: Mutex<AnalyticsState>,
}

pub const ANALYTICS_GROUP: &str = "analytics";

/// Outbox rows per page when analytics reads a shard's tail at start.
pub const REBUILD_PAGE: u32 = 5_000;
/// Ids of events without a position remembered for recognising repeats:
/// repeats come within seconds (a relay or consumer retry), and this is
/// minutes of fraud decisions.
pub const RECENT_IDS: usize = 100_000;
/// How often analytics writes its snapshot to each shard.
pub const SNAPSHOT_INTERVAL: Duration = Duration::from_secs(1);

/// What a shard keeps of analytics: the totals of its events up to the
/// snapshot's position, and how many they are.
#[derive(Serialize, Deserialize)]
struct Snapshot {
    totals: Totals,
    applied: u64,
}

impl Default for Analytics {
    fn default() -> Self {
        Analytics {
            state: Mutex::new(AnalyticsState {
                shards: BTreeMap::new(),
                recent: RecentIds::default(),
                received: 0,
                duplicates: 0,
                fraud_decisions: BTreeMap::new(),
                lag: Histogram::new_with_bounds(1, 3_600_000, 3).expect("valid bounds"),
            }),
        }
    }
}

#[derive(Deserialize)]
struct TransferPayload {
    amount_minor: i64,
    currency: String,
    from_shard: u16,
    to_shard: u16,
}

/// Adds one outbox event to `t`.
fn add(t: &mut Totals, event: &Event) {
    match event.event_type.as_str() {
        "account.created" => t.accounts_created += 1,
        "transfer.completed" => {
            let Ok(p) = serde_json::from_str::<TransferPayload>(&event.payload) else {
                return;
            };
            t.transfers_completed += 1;
            if p.from_shard == p.to_shard {
                t.same_shard += 1;
            } else {
                t.cross_shard += 1;
            }
            let volume = t.volume_minor.entry(p.currency).or_default();
            // Saturating: a total is a report, never a reason to panic.
            *volume = volume.saturating_add(p.amount_minor);
        }
        "transfer.failed" => t.transfers_failed += 1,
        _ => {}
    }
}

/// `from` added into `into`.
fn merge(into: &mut Totals, from: &Totals) {
    into.accounts_created += from.accounts_created;
    into.transfers_completed += from.transfers_completed;
    into.transfers_failed += from.transfers_failed;
    into.same_shard += from.same_shard;
    into.cross_shard += from.cross_shard;
    for (currency, minor) in &from.volume_minor {
        let volume = into.volume_minor.entry(currency.clone()).or_default();
        *volume = volume.saturating_add(*minor);
    }
}

impl Analytics {
    /// Applies one event from the bus unless it was applied before.
    pub fn apply(&self, event: &Event, now: TimestampMs) {
        self.apply_one(event, Some(now));
    }

    /// Brings a fresh analytics up to date with the shards, as a restarted
    /// analytics service must (its totals live in memory, and the bus goes
    /// on from where the group left off): each shard's snapshot, then the
    /// outbox rows after the snapshot's position. What the bus delivers
    /// afterwards is recognised by position. Decisions of the fraud
    /// service are not in any outbox (published at most once) and are not
    /// rebuilt. Answers how many outbox events the totals now cover.
    pub async fn rebuild(&self, shards: &[Arc<dyn ShardStore>]) -> anyhow::Result<u64> {
        for store in shards {
            let shard = store.shard().index() as u16;
            let mut after = 0;
            if let Some((position, body)) = store.consumer_snapshot(ANALYTICS_GROUP).await? {
                let snapshot: Snapshot = serde_json::from_str(&body).map_err(|e| {
                    anyhow::anyhow!("shard {shard}: unreadable analytics snapshot: {e}")
                })?;
                self.restore(shard, position, snapshot);
                after = position;
            }
            loop {
                let page = store.outbox_tail(after, REBUILD_PAGE).await?;
                for row in &page {
                    self.apply_one(&Event::from_outbox(row), None);
                }
                match page.last().and_then(|last| last.position) {
                    Some(last) if page.len() == REBUILD_PAGE as usize => after = last,
                    _ => break,
                }
            }
        }
        let s = self.state.lock().expect("analytics lock");
        Ok(s.shards.values().map(|p| p.applied).sum())
    }

    /// Starts shard `shard` from its snapshot at `position`.
    fn restore(&self, shard: u16, position: i64, snapshot: Snapshot) {
        let mut s = self.state.lock().expect("analytics lock");
        let progress = s.shards.entry(shard).or_default();
        if progress.position > 0 || progress.applied > 0 {
            return;
        }
        *progress = ShardProgress {
            position,
            live: snapshot.totals.clone(),
            applied: snapshot.applied,
            base: snapshot.totals,
            base_applied: snapshot.applied,
            ahead: BTreeMap::new(),
        };
    }

    /// Writes each shard's snapshot where it moved since `saved` (the
    /// positions last written, updated here). A shard that fails keeps its
    /// old snapshot, which only delays pruning.
    pub async fn save_snapshots(
        &self,
        shards: &[Arc<dyn ShardStore>],
        saved: &mut BTreeMap<u16, i64>,
    ) {
        for store in shards {
            let shard = store.shard().index() as u16;
            let snapshot = {
                let s = self.state.lock().expect("analytics lock");
                s.shards.get(&shard).map(|p| {
                    let body = Snapshot {
                        totals: p.base.clone(),
                        applied: p.base_applied,
                    };
                    (p.position, body)
                })
            };
            let Some((position, body)) = snapshot else {
                continue;
            };
            if saved.get(&shard) == Some(&position) {
                continue;
            }
            let body = serde_json::to_string(&body).expect("totals serialize");
            match store
                .save_consumer_snapshot(ANALYTICS_GROUP, position, body)
                .await
            {
                Ok(()) => {
                    saved.insert(shard, position);
                }
                Err(error) => {
                    tracing::warn!(%shard, %error, "analytics cannot save its snapshot; retrying");
                }
            }
        }
    }

    /// Writes snapshots every `interval`, forever.
    pub async fn snapshot_loop(
        self: Arc<Self>,
        shards: Vec<Arc<dyn ShardStore>>,
        interval: Duration,
    ) {
        let mut saved = BTreeMap::new();
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            self.save_snapshots(&shards, &mut saved).await;
        }
    }

    /// Applies one event unless it was applied before; `now` is the time
    /// it came off the bus (`None` when read from an outbox, which says
    /// nothing of the pipeline's lag).
    fn apply_one(&self, event: &Event, now: Option<TimestampMs>) {
        let mut s = self.state.lock().expect("analytics lock");
        if now.is_some() {
            s.received += 1;
        }
        let fresh = match (event.shard, event.position) {
            (Some(shard), Some(position)) => !s.shards.entry(shard).or_default().has(position),
            _ => s.recent.insert(&event.id),
        };
        if !fresh {
            s.duplicates += 1;
            return;
        }
        if let Some(decision) = event.event_type.strip_prefix("fraud.") {
            let kind = match decision {
                "blocked" => "block",
                "review_required" => "review",
                _ => "allow",
            };
            *s.fraud_decisions.entry(kind.into()).or_default() += 1;
            return;
        }
        let Some(shard) = event.shard else { return };
        if let Some(now) = now {
            let lag = (now - event.created_at_ms).max(1) as u64;
            s.lag.saturating_record(lag);
        }
        let progress = s.shards.entry(shard).or_default();
        add(&mut progress.live, event);
        progress.applied += 1;
        // An event relayed before positions existed is counted, but is
        // never in a snapshot.
        if let Some(position) = event.position {
            progress.advance(position, event);
        }
    }

    pub fn totals(&self) -> (Totals, BTreeMap<u16, Totals>) {
        let s = self.state.lock().expect("analytics lock");
        let mut overall = Totals {
            fraud_decisions: s.fraud_decisions.clone(),
            ..Totals::default()
        };
        let mut per_shard = BTreeMap::new();
        for (shard, progress) in &s.shards {
            merge(&mut overall, &progress.live);
            per_shard.insert(*shard, progress.live.clone());
        }
        (overall, per_shard)
    }

    pub fn stats(&self) -> ConsumerStats {
        let s = self.state.lock().expect("analytics lock");
        let ms = |q: f64| s.lag.value_at_quantile(q) as f64;
        ConsumerStats {
            group: ANALYTICS_GROUP.into(),
            received: s.received,
            applied: s.shards.values().map(|p| p.applied).sum(),
            duplicates_suppressed: s.duplicates,
            lag: LagSummary {
                count: s.lag.len(),
                p50_ms: ms(0.5),
                p99_ms: ms(0.99),
                max_ms: s.lag.max() as f64,
            },
        }
    }

    /// Consumes one topic forever, committing after each batch.
    pub async fn run(self: Arc<Self>, mut subscription: Box<dyn Subscription>) {
        loop {
            match subscription.poll(1_000, Duration::from_millis(200)).await {
                Ok(batch) => {
                    let now = now_ms();
                    for event in &batch {
                        self.apply(event, now);
                    }
                    if !batch.is_empty() {
                        if let Err(error) = subscription.commit().await {
                            tracing::warn!(%error, "analytics cannot commit its position");
                        }
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "analytics cannot read events; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: &str, n: i64) -> Event {
        Event {
            id: id.into(),
            event_type: "transfer.completed".into(),
            key: format!("tr_{n}"),
            shard: Some(0),
            payload: format!(
                r#"{{"amount_minor":{n},"currency":"INR","from_shard":0,"to_shard":1}}"#
            ),
            created_at_ms: 1_000,
            position: None,
        }
    }

    #[test]
    fn analytics_counts_each_event_once() {
        let a = Analytics::default();
        a.apply(&event("a", 5), 1_010);
        a.apply(&event("a", 5), 1_020);
        a.apply(&event("b", 7), 1_030);
        let (overall, _) = a.totals();
        assert_eq!(overall.transfers_completed, 2);
        assert_eq!(overall.cross_shard, 2);
        assert_eq!(overall.volume_minor["INR"], 12);
        let stats = a.stats();
        assert_eq!(
            (stats.received, stats.applied, stats.duplicates_suppressed),
            (3, 2, 1)
        );
        assert_eq!(stats.lag.count, 2);
    }
}
