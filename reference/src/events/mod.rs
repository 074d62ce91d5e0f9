//! The event backbone: a relay per shard publishes the transactional
//! outbox to an event bus, and consumers (analytics here) read it in
//! consumer groups, deduplicating by event id.
//!
//! Delivery is at least once: the relay marks outbox rows published only
//! after the bus took them, so a relay that dies in between publishes them
//! again, and a consumer that dies before committing its position reads
//! them again. Consumers therefore recognise what they have applied and
//! skip repeats (analytics by each row's publish position, gap-free per
//! shard, which the relay gives rows before publishing them); the
//! pipeline statistics count those as duplicates suppressed. Published
//! rows are pruned once every consumer snapshot covers them and the
//! retention has passed, so the outbox does not grow with history.
//!
//! The bus is a trait. [`InProcessBus`] is the embedded default: one
//! ordered log per topic, group positions committed after processing, as a
//! Kafka consumer group commits offsets. [`kafka::KafkaBus`] is the same on
//! a Kafka-protocol broker.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::ledger::{now_ms, OutboxEvent, ShardStore, TimestampMs};

pub mod kafka;

/// Which bus a process uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum BusConfig {
    /// In memory, in this process (the embedded default).
    #[default]
    InProcess,
    /// A Kafka-protocol broker.
    Kafka(kafka::KafkaConfig),
}

impl BusConfig {
    /// Connects to the bus (for Kafka: checks the broker and creates the
    /// topics).
    pub async fn connect(&self) -> anyhow::Result<Arc<dyn EventBus>> {
        Ok(match self {
            BusConfig::InProcess => Arc::new(InProcessBus::default()),
            BusConfig::Kafka(config) => Arc::new(kafka::KafkaBus::connect(config.clone()).await?),
        })
    }

    /// `in-process` or `kafka://<bootstrap>`, for reports and logs.
    pub fn describe(&self) -> String {
        match self {
            BusConfig::InProcess => "in-process".into(),
            BusConfig::Kafka(k) => format!("kafka://{}", k.bootstrap),
        }
    }
}

pub const PAYMENT_EVENTS: &str = "payment_events";
pub const FRAUD_EVENTS: &str = "fraud_events";
pub const NOTIFICATION_EVENTS: &str = "notification_events";
pub const ANALYTICS_EVENTS: &str = "analytics_events";

/// An event on the bus.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub id: String,
    pub event_type: String,
    /// The account or transfer it is about; the topic's partition key.
    pub key: String,
    /// The shard whose outbox it came from.
    pub shard: Option<u16>,
    pub payload: String,
    /// When the change it describes committed.
    pub created_at_ms: TimestampMs,
    /// Its publish position in its shard's outbox (gap-free per shard), by
    /// which consumers recognise repeats without keeping every id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<i64>,
}

impl Event {
    pub fn from_outbox(e: &OutboxEvent) -> Event {
        Event {
            id: e.event_id.clone(),
            event_type: e.event_type.clone(),
            key: e.key.clone(),
            shard: Some(e.shard.index() as u16),
            payload: e.payload.clone(),
            created_at_ms: e.created_at_ms,
            position: e.position,
        }
    }

    /// The topic an outbox event goes to.
    pub fn topic(&self) -> &'static str {
        if self.event_type.starts_with("fraud.") {
            FRAUD_EVENTS
        } else if self.event_type.starts_with("notification.") {
            NOTIFICATION_EVENTS
        } else {
            PAYMENT_EVENTS
        }
    }
}

/// A message bus with topics and consumer groups.
#[async_trait]
pub trait EventBus: Send + Sync {
    /// Appends events to a topic, in order. Done when it returns.
    async fn publish(&self, topic: &str, events: &[Event]) -> anyhow::Result<()>;
    /// Reads `topic` as a member of `group`, from the group's committed
    /// position.
    async fn subscribe(&self, topic: &str, group: &str) -> anyhow::Result<Box<dyn Subscription>>;
    /// Whether the bus answers (for readiness checks).
    async fn ready(&self) -> anyhow::Result<()> {
        Ok(())
    }
}

#[async_trait]
pub trait Subscription: Send {
    /// Events after the last one polled, at most `max`, waiting up to
    /// `wait` when there are none.
    async fn poll(&mut self, max: usize, wait: Duration) -> anyhow::Result<Vec<Event>>;
    /// Commits the group's position after everything polled so far.
    async fn commit(&mut self) -> anyhow::Result<()>;
}

/// One topic: the events no group has committed past yet, and each
/// group's committed position (positions count from the topic's first
/// event ever, `start` being that of `log[0]`).
#[derive(Default)]
struct Topic {
    log: VecDeque<Arc<Event>>,
    start: usize,
    committed: HashMap<String, usize>,
}

impl Topic {
    /// Drops the events every group has committed past: the log holds
    /// what some group has still to read, not the topic's history.
    fn trim(&mut self) {
        let Some(&low) = self.committed.values().min() else {
            return;
        };
        let drop = low.saturating_sub(self.start).min(self.log.len());
        self.log.drain(..drop);
        self.start += drop;
    }
}

/// The embedded bus: in memory, one ordered log per topic.
#[derive(Default, Clone)]
pub struct InProcessBus {
    inner: Arc<BusInner>,
}

#[derive(Default)]
struct BusInner {
    topics: Mutex<HashMap<String, Topic>>,
    appended: tokio::sync::Notify,
}

#[async_trait]
impl EventBus for InProcessBus {
    async fn publish(&self, topic: &str, events: &[Event]) -> anyhow::Result<()> {
        {
            let mut topics = self.inner.topics.lock().expect("bus lock");
            let log = &mut topics.entry(topic.to_string()).or_default().log;
            log.extend(events.iter().cloned().map(Arc::new));
        }
        self.inner.appended.notify_waiters();
        Ok(())
    }

    async fn subscribe(&self, topic: &str, group: &str) -> anyhow::Result<Box<dyn Subscription>> {
        let position = {
            let mut topics = self.inner.topics.lock().expect("bus lock");
            let t = topics.entry(topic.to_string()).or_default();
            let start = t.start;
            *t.committed.entry(group.to_string()).or_insert(start)
        };
        Ok(Box::new(InProcessSubscription {
            bus: Arc::clone(&self.inner),
            topic: topic.to_string(),
            group: group.to_string(),
            position,
        }))
    }
}

impl InProcessBus {
    /// Events on a topic so far.
    pub fn len(&self, topic: &str) -> usize {
        let topics = self.inner.topics.lock().expect("bus lock");
        topics.get(topic).map_or(0, |t| t.start + t.log.len())
    }

    /// Events on a topic still held in memory (not yet committed past by
    /// every group).
    pub fn held(&self, topic: &str) -> usize {
        let topics = self.inner.topics.lock().expect("bus lock");
        topics.get(topic).map_or(0, |t| t.log.len())
    }

    pub fn is_empty(&self, topic: &str) -> bool {
        self.len(topic) == 0
    }
}

struct InProcessSubscription {
    bus: Arc<BusInner>,
    topic: String,
    group: String,
    position: usize,
}

#[async_trait]
impl Subscription for InProcessSubscription {
    async fn poll(&mut self, max: usize, wait: Duration) -> anyhow::Result<Vec<Event>> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.bus.appended.notified();
            {
                let topics = self.bus.topics.lock().expect("bus lock");
                if let Some(t) = topics.get(&self.topic) {
                    let from = self.position.max(t.start) - t.start;
                    if t.log.len() > from {
                        let end = t.log.len().min(from + max);
                        let batch = t.log.range(from..end).map(|e| (**e).clone()).collect();
                        self.position = t.start + end;
                        return Ok(batch);
                    }
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(Vec::new());
            }
        }
    }

    async fn commit(&mut self) -> anyhow::Result<()> {
        let mut topics = self.bus.topics.lock().expect("bus lock");
        let t = topics.entry(self.topic.clone()).or_default();
        t.committed.insert(self.group.clone(), self.position);
        t.trim();
        Ok(())
    }
}

/// What the relays have done.
#[derive(Debug, Default)]
pub struct RelayStats {
    pub published: AtomicU64,
    pub failures: AtomicU64,
    /// Outbox rows deleted once every consumer had them.
    pub pruned: AtomicU64,
}

/// Publishes each shard's outbox in publish-position order, marks rows
/// published once the bus has them, and prunes published rows that every
/// consumer's snapshot covers once they are older than the retention.
pub struct Relay {
    shards: Vec<Arc<dyn ShardStore>>,
    bus: Arc<dyn EventBus>,
    pub stats: Arc<RelayStats>,
    /// Test hook: publish one batch, then fail before marking it, once.
    pub fail_before_mark_once: AtomicBool,
    /// How long published rows stay in the outbox, in milliseconds.
    retention_ms: AtomicU64,
    /// When the relay next prunes.
    prune_at: Mutex<std::time::Instant>,
}

impl Relay {
    /// The shards whose outboxes it publishes.
    pub fn shards(&self) -> &[Arc<dyn ShardStore>] {
        &self.shards
    }
}

/// Rows per relay pass and shard.
pub const RELAY_BATCH: u32 = 500;
/// How long published outbox rows are kept by default: long enough that
/// a consumer restarted within it still finds what it had not put in its
/// snapshot, short enough that the outbox stays a few minutes of traffic.
pub const OUTBOX_RETENTION: Duration = Duration::from_secs(300);
/// Rows one prune deletes per shard: a short transaction, whatever the
/// backlog of rows to prune.
pub const PRUNE_BATCH: u32 = 5_000;
/// How often the relay prunes while the last prune left nothing behind.
pub const PRUNE_INTERVAL: Duration = Duration::from_secs(1);

impl Relay {
    pub fn new(shards: Vec<Arc<dyn ShardStore>>, bus: Arc<dyn EventBus>) -> Relay {
        Relay {
            shards,
            bus,
            stats: Arc::new(RelayStats::default()),
            fail_before_mark_once: AtomicBool::new(false),
            retention_ms: AtomicU64::new(OUTBOX_RETENTION.as_millis() as u64),
            prune_at: Mutex::new(std::time::Instant::now()),
        }
    }

    /// Keeps published rows for `retention` before pruning them.
    pub fn set_retention(&self, retention: Duration) {
        let ms = u64::try_from(retention.as_millis()).unwrap_or(u64::MAX);
        self.retention_ms.store(ms, Ordering::Relaxed);
    }

    /// One pass over every shard; answers how many events it published.
    /// Prunes too, when a prune is due.
    pub async fn relay_once(&self) -> u64 {
        let mut published = 0;
        for store in &self.shards {
            match self.relay_shard(store.as_ref()).await {
                Ok(n) => published += n,
                Err(error) => {
                    self.stats.failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(shard = %store.shard(), %error, "outbox relay pass failed; retrying");
                }
            }
        }
        let due = *self.prune_at.lock().expect("relay lock") <= std::time::Instant::now();
        if due {
            let more = self.prune_once().await;
            let wait = if more { Duration::ZERO } else { PRUNE_INTERVAL };
            *self.prune_at.lock().expect("relay lock") = std::time::Instant::now() + wait;
        }
        published
    }

    /// Prunes up to `PRUNE_BATCH` rows per shard; answers whether a shard
    /// had more to prune.
    pub async fn prune_once(&self) -> bool {
        let retention = self.retention_ms.load(Ordering::Relaxed);
        let before = now_ms().saturating_sub(i64::try_from(retention).unwrap_or(i64::MAX));
        let mut more = false;
        for store in &self.shards {
            match store.prune_outbox(before, PRUNE_BATCH).await {
                Ok(n) => {
                    self.stats.pruned.fetch_add(n, Ordering::Relaxed);
                    more |= n == u64::from(PRUNE_BATCH);
                }
                Err(error) => {
                    tracing::warn!(shard = %store.shard(), %error, "outbox prune failed; retrying");
                }
            }
        }
        more
    }

    /// The shard's unpublished rows in publish-position order, staging
    /// rows that have no position yet (rows committed after the staging
    /// wait for the next pass).
    async fn staged_rows(&self, store: &dyn ShardStore) -> anyhow::Result<Vec<OutboxEvent>> {
        let mut rows = store.unpublished_events(RELAY_BATCH).await?;
        if rows.iter().any(|r| r.position.is_none()) {
            store.stage_outbox(RELAY_BATCH).await?;
            rows = store.unpublished_events(RELAY_BATCH).await?;
        }
        rows.retain(|r| r.position.is_some());
        rows.sort_by_key(|r| r.position);
        Ok(rows)
    }

    async fn relay_shard(&self, store: &dyn ShardStore) -> anyhow::Result<u64> {
        let rows = self.staged_rows(store).await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let mut by_topic: BTreeMap<&'static str, Vec<Event>> = BTreeMap::new();
        for row in &rows {
            let event = Event::from_outbox(row);
            by_topic.entry(event.topic()).or_default().push(event);
        }
        for (topic, events) in &by_topic {
            self.bus.publish(topic, events).await?;
        }
        self.stats
            .published
            .fetch_add(rows.len() as u64, Ordering::Relaxed);
        if self.fail_before_mark_once.swap(false, Ordering::SeqCst) {
            anyhow::bail!("fault injection: relay stopped after publishing, before marking");
        }
        let seqs: Vec<i64> = rows.iter().map(|r| r.seq).collect();
        store.mark_published(&seqs, now_ms()).await?;
        Ok(rows.len() as u64)
    }

    /// Relays forever, a pass every `interval` (sooner while there is a
    /// backlog).
    pub async fn run(self: Arc<Self>, interval: Duration) {
        loop {
            if self.relay_once().await < RELAY_BATCH as u64 {
                tokio::time::sleep(interval).await;
            }
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LagSummary {
    pub count: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// A consumer's own figures.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ConsumerStats {
    pub group: String,
    /// Events read, repeats included.
    pub received: u64,
    /// Distinct outbox events applied (events published straight to the
    /// bus, such as fraud decisions, are counted in the totals only).
    pub applied: u64,
    pub duplicates_suppressed: u64,
    /// From the change's commit to its application (outbox events).
    pub lag: LagSummary,
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

    #[tokio::test]
    async fn a_group_resumes_from_its_committed_position() {
        let bus = InProcessBus::default();
        bus.publish("t", &[event("a", 1), event("b", 2), event("c", 3)])
            .await
            .unwrap();
        let mut first = bus.subscribe("t", "g").await.unwrap();
        // Another group, known to the bus before anyone commits.
        let mut other = bus.subscribe("t", "h").await.unwrap();
        let got = first.poll(2, Duration::from_millis(10)).await.unwrap();
        assert_eq!(got.len(), 2);
        first.commit().await.unwrap();
        let _uncommitted = first.poll(10, Duration::from_millis(10)).await.unwrap();
        // A new member of the group starts after the committed two.
        let mut second = bus.subscribe("t", "g").await.unwrap();
        let got = second.poll(10, Duration::from_millis(10)).await.unwrap();
        assert_eq!(got.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(), ["c"]);
        // The other group reads everything.
        assert_eq!(
            other
                .poll(10, Duration::from_millis(10))
                .await
                .unwrap()
                .len(),
            3
        );
        // Nothing more: poll waits, then answers empty.
        assert!(second
            .poll(10, Duration::from_millis(20))
            .await
            .unwrap()
            .is_empty());
        // Group h has read all three but committed none: all are held.
        assert_eq!(bus.held("t"), 3);
        other.commit().await.unwrap();
        second.commit().await.unwrap();
        // Every group past them: the bus holds none, and counts them still.
        assert_eq!((bus.held("t"), bus.len("t")), (0, 3));
        bus.publish("t", &[event("d", 4)]).await.unwrap();
        let got = second.poll(10, Duration::from_millis(10)).await.unwrap();
        assert_eq!(got.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(), ["d"]);
        // A group the bus did not know starts at what is held.
        let mut late = bus.subscribe("t", "late").await.unwrap();
        let got = late.poll(10, Duration::from_millis(10)).await.unwrap();
        assert_eq!(got.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(), ["d"]);
    }
}
