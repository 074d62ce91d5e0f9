//! The analytics service: a consumer of payment events that keeps totals
//! per shard and overall, and how long events took from commit to here.
//! Its routes are in [`routes`].

pub mod routes;

use std::collections::{BTreeMap, HashSet};
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

struct AnalyticsState {
    seen: HashSet<String>,
    /// Distinct outbox (payment) events applied.
    outbox_applied: u64,
    received: u64,
    duplicates: u64,
    overall: Totals,
    per_shard: BTreeMap<u16, Totals>,
    lag: Histogram<u64>,
}

/// The analytics service's consumer: totals per shard and overall, and
/// how long events took from commit to here.
pub struct Analytics {
    state: Mutex<AnalyticsState>,
}

pub const ANALYTICS_GROUP: &str = "analytics";

/// Outbox rows per page when analytics rebuilds its totals.
pub const REBUILD_PAGE: u32 = 5_000;

impl Default for Analytics {
    fn default() -> Self {
        Analytics {
            state: Mutex::new(AnalyticsState {
                seen: HashSet::new(),
                outbox_applied: 0,
                received: 0,
                duplicates: 0,
                overall: Totals::default(),
                per_shard: BTreeMap::new(),
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

impl Analytics {
    /// Applies one event from the bus unless its id was applied before.
    pub fn apply(&self, event: &Event, now: TimestampMs) {
        self.apply_one(event, Some(now));
    }

    /// Rebuilds the totals from the shards' outboxes (every row, published
    /// or not), as a restarted analytics service must: its totals live in
    /// memory, and the bus goes on from where the group left off. Events
    /// that arrive from the bus afterwards are recognised by id. Decisions
    /// of the fraud service are not in any outbox (published at most once)
    /// and are not rebuilt. Answers how many events it applied.
    pub async fn rebuild(&self, shards: &[Arc<dyn ShardStore>]) -> anyhow::Result<u64> {
        let mut applied = 0;
        for store in shards {
            let mut after = 0;
            loop {
                let page = store.outbox_page(after, REBUILD_PAGE).await?;
                for row in &page {
                    self.apply_one(&Event::from_outbox(row), None);
                    applied += 1;
                }
                match page.last() {
                    Some(last) if page.len() == REBUILD_PAGE as usize => after = last.seq,
                    _ => break,
                }
            }
        }
        Ok(applied)
    }

    /// Applies one event unless its id was applied before; `now` is the
    /// time it came off the bus (`None` when rebuilt from an outbox, which
    /// says nothing of the pipeline's lag).
    fn apply_one(&self, event: &Event, now: Option<TimestampMs>) {
        let mut s = self.state.lock().expect("analytics lock");
        if now.is_some() {
            s.received += 1;
        }
        if !s.seen.insert(event.id.clone()) {
            s.duplicates += 1;
            return;
        }
        if event.shard.is_some() {
            s.outbox_applied += 1;
            if let Some(now) = now {
                let lag = (now - event.created_at_ms).max(1) as u64;
                s.lag.saturating_record(lag);
            }
        }
        if let Some(decision) = event.event_type.strip_prefix("fraud.") {
            let kind = match decision {
                "blocked" => "block",
                "review_required" => "review",
                _ => "allow",
            };
            *s.overall.fraud_decisions.entry(kind.into()).or_default() += 1;
            return;
        }
        let shard = event.shard.unwrap_or(0);
        let transfer = serde_json::from_str::<TransferPayload>(&event.payload).ok();
        let update = |t: &mut Totals| match event.event_type.as_str() {
            "account.created" => t.accounts_created += 1,
            "transfer.completed" => {
                if let Some(p) = &transfer {
                    t.transfers_completed += 1;
                    if p.from_shard == p.to_shard {
                        t.same_shard += 1;
                    } else {
                        t.cross_shard += 1;
                    }
                    let volume = t.volume_minor.entry(p.currency.clone()).or_default();
                    // Saturating: a total is a report, never a reason to panic.
                    *volume = volume.saturating_add(p.amount_minor);
                }
            }
            "transfer.failed" => t.transfers_failed += 1,
            _ => {}
        };
        update(&mut s.overall);
        update(s.per_shard.entry(shard).or_default());
    }

    pub fn totals(&self) -> (Totals, BTreeMap<u16, Totals>) {
        let s = self.state.lock().expect("analytics lock");
        (s.overall.clone(), s.per_shard.clone())
    }

    pub fn stats(&self) -> ConsumerStats {
        let s = self.state.lock().expect("analytics lock");
        let ms = |q: f64| s.lag.value_at_quantile(q) as f64;
        ConsumerStats {
            group: ANALYTICS_GROUP.into(),
            received: s.received,
            applied: s.outbox_applied,
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
