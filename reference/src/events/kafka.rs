//! The event bus on a Kafka-protocol broker, through librdkafka.
//!
//! Producing is idempotent with `acks=all`: `publish` returns once the
//! broker has acknowledged every event, so the relay marks outbox rows only
//! after that. Events are keyed by account or transfer id, so one key's
//! events stay in one partition, in order. Consumers join consumer groups
//! with auto-commit off and commit offsets after processing (at least once;
//! the consumers deduplicate by event id).
//!
//! Topic and group names can carry a prefix, so that several systems (or
//! tests) share one broker without reading each other's events.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Message, Offset, TopicPartitionList};

use super::{
    Event, EventBus, Subscription, ANALYTICS_EVENTS, FRAUD_EVENTS, NOTIFICATION_EVENTS,
    PAYMENT_EVENTS,
};

/// Where the broker is and how the topics are laid out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaConfig {
    /// `host:port[,host:port...]`.
    pub bootstrap: String,
    /// Put before every topic and group name ("" by default).
    pub prefix: String,
    /// Partitions of each topic when this bus creates it.
    pub partitions: i32,
    /// How long a publish may wait for the broker's acknowledgement.
    pub delivery_timeout: Duration,
}

impl KafkaConfig {
    pub fn new(bootstrap: impl Into<String>) -> KafkaConfig {
        KafkaConfig {
            bootstrap: bootstrap.into(),
            prefix: String::new(),
            partitions: 4,
            delivery_timeout: Duration::from_secs(30),
        }
    }
}

/// The topics the system uses.
pub const TOPICS: [&str; 4] = [
    PAYMENT_EVENTS,
    FRAUD_EVENTS,
    NOTIFICATION_EVENTS,
    ANALYTICS_EVENTS,
];

pub struct KafkaBus {
    config: KafkaConfig,
    producer: FutureProducer,
}

impl KafkaBus {
    /// Connects, checks that the broker answers, and creates the topics
    /// that do not exist yet.
    pub async fn connect(config: KafkaConfig) -> anyhow::Result<KafkaBus> {
        let unreachable = || {
            format!(
                "cannot reach the Kafka broker at {}; start one (scripts/kafka.sh up) or fix --kafka",
                config.bootstrap
            )
        };
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &config.bootstrap)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "2")
            .set(
                "message.timeout.ms",
                config.delivery_timeout.as_millis().to_string(),
            )
            .create()
            .with_context(unreachable)?;
        let probe = producer.clone();
        tokio::task::spawn_blocking(move || {
            probe
                .client()
                .fetch_metadata(None, Duration::from_secs(10))
                .map(|_| ())
        })
        .await?
        .with_context(unreachable)?;
        let bus = KafkaBus { config, producer };
        bus.create_topics().await?;
        Ok(bus)
    }

    pub fn topic(&self, topic: &str) -> String {
        format!("{}{topic}", self.config.prefix)
    }

    async fn create_topics(&self) -> anyhow::Result<()> {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &self.config.bootstrap)
            .create()?;
        let names: Vec<String> = TOPICS.iter().map(|t| self.topic(t)).collect();
        let new: Vec<NewTopic<'_>> = names
            .iter()
            .map(|n| NewTopic::new(n, self.config.partitions, TopicReplication::Fixed(1)))
            .collect();
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        for result in admin.create_topics(&new, &options).await? {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => anyhow::bail!("cannot create Kafka topic {topic}: {code}"),
            }
        }
        Ok(())
    }
}

#[async_trait]
impl EventBus for KafkaBus {
    async fn publish(&self, topic: &str, events: &[Event]) -> anyhow::Result<()> {
        let topic = self.topic(topic);
        let payloads: Vec<String> = events
            .iter()
            .map(serde_json::to_string)
            .collect::<Result<_, _>>()?;
        // Every send is queued in order (one key, one partition, in
        // order), then every acknowledgement is awaited.
        let sends = events.iter().zip(&payloads).map(|(event, payload)| {
            self.producer.send(
                FutureRecord::to(&topic).key(&event.key).payload(payload),
                self.config.delivery_timeout,
            )
        });
        for result in futures_util::future::join_all(sends).await {
            if let Err((error, _)) = result {
                anyhow::bail!("Kafka did not take an event for {topic}: {error}");
            }
        }
        Ok(())
    }

    async fn ready(&self) -> anyhow::Result<()> {
        let probe = self.producer.clone();
        tokio::task::spawn_blocking(move || {
            probe
                .client()
                .fetch_metadata(None, Duration::from_secs(2))
                .map(|_| ())
        })
        .await?
        .with_context(|| {
            format!(
                "the Kafka broker at {} does not answer",
                self.config.bootstrap
            )
        })
    }

    async fn subscribe(&self, topic: &str, group: &str) -> anyhow::Result<Box<dyn Subscription>> {
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.config.bootstrap)
            .set("group.id", format!("{}{group}", self.config.prefix))
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", "10000")
            .create()
            .with_context(|| format!("cannot create a Kafka consumer for {group}"))?;
        consumer.subscribe(&[&self.topic(topic)])?;
        Ok(Box::new(KafkaSubscription {
            consumer: Arc::new(consumer),
            polled: BTreeMap::new(),
        }))
    }
}

struct KafkaSubscription {
    consumer: Arc<StreamConsumer>,
    /// Next offset to commit, per (topic, partition), for what was polled.
    polled: BTreeMap<(String, i32), i64>,
}

impl KafkaSubscription {
    fn take(&mut self, message: &rdkafka::message::BorrowedMessage<'_>) -> anyhow::Result<Event> {
        self.polled.insert(
            (message.topic().to_string(), message.partition()),
            message.offset() + 1,
        );
        let payload = message.payload().unwrap_or_default();
        serde_json::from_slice(payload).with_context(|| {
            format!(
                "an event on {} (partition {}, offset {}) is not a shardpay event",
                message.topic(),
                message.partition(),
                message.offset()
            )
        })
    }
}

#[async_trait]
impl Subscription for KafkaSubscription {
    async fn poll(&mut self, max: usize, wait: Duration) -> anyhow::Result<Vec<Event>> {
        let consumer = Arc::clone(&self.consumer);
        let mut batch = Vec::new();
        match tokio::time::timeout(wait, consumer.recv()).await {
            Err(_) => return Ok(batch),
            Ok(message) => batch.push(self.take(&message?)?),
        }
        // Whatever else is already here, without waiting.
        while batch.len() < max {
            match tokio::time::timeout(Duration::from_millis(1), consumer.recv()).await {
                Err(_) => break,
                Ok(message) => batch.push(self.take(&message?)?),
            }
        }
        Ok(batch)
    }

    async fn commit(&mut self) -> anyhow::Result<()> {
        if self.polled.is_empty() {
            return Ok(());
        }
        let mut offsets = TopicPartitionList::new();
        for ((topic, partition), next) in &self.polled {
            offsets.add_partition_offset(topic, *partition, Offset::Offset(*next))?;
        }
        let consumer = Arc::clone(&self.consumer);
        tokio::task::spawn_blocking(move || consumer.commit(&offsets, CommitMode::Sync))
            .await?
            .context("Kafka refused the consumer group's offsets")?;
        self.polled.clear();
        Ok(())
    }
}
