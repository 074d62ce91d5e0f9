//! The event pipeline of one process: the outbox relay, the bus and the
//! consumers this process runs, and the pipeline report that checks every
//! committed event was applied exactly once by every consumer. In a split
//! deployment each service runs its part (the ledger the relay, the
//! notification and analytics services their consumers) and the report
//! reads the other parts' counts from their services.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::analytics::{Analytics, ANALYTICS_GROUP, SNAPSHOT_INTERVAL};
use crate::events::*;
use crate::ledger::ShardStore;
use crate::notification::store::NotificationStore;
use crate::notification::{Notifier, NotifierConfig};

/// The whole pipeline of one process: bus, relay, consumers. In a split
/// deployment each service runs its part: the ledger the relay, the
/// notification and analytics services their consumers.
pub struct Pipeline {
    pub bus: Arc<dyn EventBus>,
    pub relay: Arc<Relay>,
    pub analytics: Arc<Analytics>,
    pub notifier: Arc<crate::notification::Notifier>,
    /// The service whose part this process runs.
    service: crate::peers::Service,
    /// Where the parts this process does not run answer (split only).
    peers: Option<crate::peers::Peers>,
    /// Mints the service token the report's calls to other services carry
    /// (their counts are for staff only).
    auth: Option<Arc<crate::auth::AuthService>>,
    /// The consumer group analytics reads the bus in: one per analytics
    /// replica, since each keeps whole totals.
    analytics_group: String,
}

/// What `/v1/ledger/relay` answers.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct RelayCounts {
    pub published: u64,
    pub failures: u64,
}

/// What `/v1/pipeline` answers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PipelineReport {
    /// Outbox rows ever written on all shards (pruned ones included), and
    /// those not yet published: from the shards' counters.
    pub outbox_rows: u64,
    pub outbox_backlog: u64,
    /// Events the relays published (repeats after a failure included).
    pub published: u64,
    pub relay_failures: u64,
    pub consumers: Vec<ConsumerStats>,
    /// Outbox rows that no consumer has applied yet: the backlog, or lost
    /// events once the backlog is empty.
    pub unapplied: BTreeMap<String, u64>,
    /// Every committed event applied exactly once by every consumer.
    pub complete: bool,
    /// The notification service's deliveries and dead letters.
    #[serde(default)]
    pub notification: Option<crate::notification::NotificationStats>,
}

impl Pipeline {
    pub fn start_in_process(shards: Vec<Arc<dyn ShardStore>>) -> Pipeline {
        Pipeline::with_bus(shards, Arc::new(InProcessBus::default()))
    }

    /// A pipeline on a bus of the caller's choosing.
    pub fn with_bus(shards: Vec<Arc<dyn ShardStore>>, bus: Arc<dyn EventBus>) -> Pipeline {
        let relay = Arc::new(Relay::new(shards, Arc::clone(&bus)));
        let analytics = Arc::new(Analytics::default());
        Pipeline {
            bus,
            relay,
            analytics,
            notifier: Arc::new(Notifier::in_memory(NotifierConfig::default())),
            service: crate::peers::Service::All,
            peers: None,
            auth: None,
            analytics_group: ANALYTICS_GROUP.into(),
        }
    }

    /// Analytics reads the bus in consumer group `group`. Every analytics
    /// replica keeps whole totals, so each needs a group of its own:
    /// replicas in one group would split the events between them.
    pub fn with_analytics_group(mut self, group: &str) -> Self {
        self.analytics_group = group.into();
        self
    }

    /// Calls to other services carry a service token from `auth`.
    pub fn with_auth(mut self, auth: Option<Arc<crate::auth::AuthService>>) -> Self {
        self.auth = auth;
        self
    }

    /// Webhook deliveries under `policy` (where they may go).
    pub fn with_webhooks(mut self, policy: crate::notification::WebhookPolicy) -> Self {
        let config = NotifierConfig {
            webhooks: policy,
            ..self.notifier.config().clone()
        };
        self.notifier = Arc::new(Notifier::new(self.notifier.store(), config));
        self
    }

    /// Notification state in `store` (shared by the replicas over it),
    /// deliveries as `config` says.
    pub fn with_notifications(
        mut self,
        store: Arc<dyn NotificationStore>,
        config: NotifierConfig,
    ) -> Self {
        self.notifier = Arc::new(Notifier::new(store, config));
        self
    }

    /// Keeps published outbox rows for `retention` before the relay
    /// prunes them.
    pub fn with_outbox_retention(self, retention: Duration) -> Self {
        self.relay.set_retention(retention);
        self
    }

    /// Runs only `service`'s part; its report asks `peers` for the rest.
    pub fn for_service(
        mut self,
        service: crate::peers::Service,
        peers: crate::peers::Peers,
    ) -> Self {
        self.service = service;
        self.peers = Some(peers);
        self
    }

    pub fn relay_stats(&self) -> RelayCounts {
        RelayCounts {
            published: self.relay.stats.published.load(Ordering::Relaxed),
            failures: self.relay.stats.failures.load(Ordering::Relaxed),
        }
    }

    /// Spawns the relay and the consumers on the current runtime. The
    /// tasks answered are the relay's and analytics' (the relay first);
    /// the notifier keeps its own, which [`Pipeline::shutdown`] stops.
    pub async fn spawn(
        &self,
        relay_interval: Duration,
    ) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
        use crate::notification::NOTIFICATION_GROUP;
        use crate::peers::Service;
        let mut tasks = Vec::new();
        if self.service.runs(Service::Ledger) {
            tasks.push(tokio::spawn(Arc::clone(&self.relay).run(relay_interval)));
        }
        if self.service.runs(Service::Analytics) {
            // Before subscribing: what the bus delivers after this is
            // either new or recognised.
            let started = std::time::Instant::now();
            let rebuilt = self.analytics.rebuild(self.relay.shards()).await?;
            if rebuilt > 0 {
                tracing::info!(
                    events = rebuilt,
                    ms = started.elapsed().as_millis() as u64,
                    "analytics started from its snapshots and the outboxes' tails"
                );
            }
        }
        // Every group subscribes before any consumes: the in-process bus
        // lets go of events once every group it knows has committed them.
        let (mut analytics, mut notification) = (Vec::new(), Vec::new());
        for topic in [PAYMENT_EVENTS, FRAUD_EVENTS] {
            if self.service.runs(Service::Analytics) {
                analytics.push(self.bus.subscribe(topic, &self.analytics_group).await?);
            }
            if self.service.runs(Service::Notification) {
                notification.push(self.bus.subscribe(topic, NOTIFICATION_GROUP).await?);
            }
        }
        if self.service.runs(Service::Notification) {
            // Alongside consuming: outbox events the bus lost (the
            // in-process one keeps nothing across a restart).
            self.notifier
                .start_catching_up(self.relay.shards().to_vec(), notification);
        }
        for subscription in analytics {
            tasks.push(tokio::spawn(Arc::clone(&self.analytics).run(subscription)));
        }
        if self.service.runs(Service::Analytics) {
            let shards = self.relay.shards().to_vec();
            let snapshots = Arc::clone(&self.analytics).snapshot_loop(shards, SNAPSHOT_INTERVAL);
            tasks.push(tokio::spawn(snapshots));
        }
        Ok(tasks)
    }

    /// Stops the notifier of this process (when it runs one): no new
    /// events, deliveries in flight finish until `deadline`, the rest are
    /// let go for another replica or the next start.
    pub async fn shutdown(&self, deadline: tokio::time::Instant) {
        if self.service.runs(crate::peers::Service::Notification) {
            self.notifier.shutdown(deadline).await;
        }
    }

    /// The pipeline end to end. In a split deployment (the analytics
    /// service answers) the relay's and the notification consumer's counts
    /// come from the ledger and notification services; one that does not
    /// answer makes this an error rather than a report of lost events.
    pub async fn report(&self) -> anyhow::Result<PipelineReport> {
        let (mut rows, mut backlog) = (0, 0);
        for store in self.relay.shards() {
            let (all, unpublished) = store.outbox_counts().await?;
            rows += all;
            backlog += unpublished;
        }
        let analytics = self.analytics.stats();
        let remote = self
            .peers
            .as_ref()
            .filter(|_| self.service == crate::peers::Service::Analytics);
        let (relay, notification) = match remote {
            None => (self.relay_stats(), self.notifier.stats().await?),
            Some(peers) => {
                let token = match &self.auth {
                    Some(auth) => Some(auth.service_token().await?),
                    None => None,
                };
                let read = async {
                    let token = token.as_deref();
                    let relay = peer_json(&peers.ledger, "/v1/ledger/relay", token).await?;
                    let notification =
                        peer_json(&peers.notification, "/v1/notification/stats", token).await?;
                    anyhow::Ok((relay, notification))
                };
                match (read.await, &self.auth, &token) {
                    (Ok(read), _, _) => read,
                    // A refused token is not used again: the next read opens
                    // a new session.
                    (Err(e), Some(auth), Some(token)) => {
                        auth.forget_service_token(token);
                        return Err(e);
                    }
                    (Err(e), _, _) => return Err(e),
                }
            }
        };
        let notification_consumer = ConsumerStats {
            group: crate::notification::NOTIFICATION_GROUP.into(),
            received: notification.events_received,
            applied: notification.outbox_applied,
            duplicates_suppressed: notification.duplicates_suppressed,
            lag: LagSummary {
                count: 0,
                p50_ms: 0.0,
                p99_ms: 0.0,
                max_ms: 0.0,
            },
        };
        let unapplied: BTreeMap<String, u64> = [&analytics, &notification_consumer]
            .iter()
            .map(|c| (c.group.clone(), rows.saturating_sub(c.applied)))
            .collect();
        Ok(PipelineReport {
            outbox_rows: rows,
            outbox_backlog: backlog,
            published: relay.published,
            relay_failures: relay.failures,
            complete: backlog == 0 && unapplied.values().all(|n| *n == 0),
            unapplied,
            consumers: vec![analytics, notification_consumer],
            notification: Some(notification),
        })
    }
}

/// A JSON answer of another service (any of its replicas), asked with
/// this service's token when auth is on.
async fn peer_json<T: serde::de::DeserializeOwned>(
    replicas: &crate::peers::Replicas,
    path: &str,
    token: Option<&str>,
) -> anyhow::Result<T> {
    let client = reqwest::Client::new();
    let response = replicas
        .send(path, |url| {
            let mut request = client.get(url).timeout(Duration::from_secs(5));
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            crate::peers::with_request_id(request)
        })
        .await?;
    let url = response.url().clone();
    let down = |e: String| anyhow::anyhow!("{url}: {e}");
    if !response.status().is_success() {
        return Err(down(format!("answered {}", response.status())));
    }
    response.json().await.map_err(|e| down(e.to_string()))
}
