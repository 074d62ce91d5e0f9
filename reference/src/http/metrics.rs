//! What `/metrics` exposes, through `prometheus-client`: each server has a
//! registry of its own (tests run several servers in one process), label
//! values are bounded (standard methods, routed paths, status codes, shard
//! indexes, consumer groups), and the exposition's format and escaping are
//! the library's.
//!
//! Request counts and latencies are counted as requests are answered;
//! the shards' and the pipeline's figures are gauges set when `/metrics`
//! is read.

use std::sync::atomic::AtomicU64;

use axum::extract::MatchedPath;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Upper bounds of the latency buckets, seconds.
const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The route a request matched, as a label: the routed path template
/// (`/v1/accounts/{id}`), never the path a client sent.
#[derive(Clone, Debug)]
pub enum Route {
    Matched(MatchedPath),
    Unmatched,
}

impl Route {
    pub fn as_str(&self) -> &str {
        match self {
            Route::Matched(path) => path.as_str(),
            Route::Unmatched => "unmatched",
        }
    }
}

impl PartialEq for Route {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Route {}

impl std::hash::Hash for Route {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state)
    }
}

impl EncodeLabelValue for Route {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Answered {
    method: &'static str,
    route: Route,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Routed {
    method: &'static str,
    route: Route,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShardLabel {
    pub shard: usize,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShardStateLabel {
    pub shard: usize,
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GroupLabel {
    pub group: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LagLabel {
    pub group: String,
    pub quantile: &'static str,
}

type Seconds = Gauge<f64, AtomicU64>;

/// One server's metrics.
pub struct Metrics {
    registry: Registry,
    requests: Family<Answered, Counter>,
    durations: Family<Routed, Histogram, fn() -> Histogram>,
    /// Transfers on all shards, by state.
    pub transfers: Family<StateLabel, Gauge>,
    /// 1 when the shard answers.
    pub shard_healthy: Family<ShardLabel, Gauge>,
    /// Transfers paid from each shard (payer side), by state.
    pub shard_transfers: Family<ShardStateLabel, Gauge>,
    pub outbox_backlog: Gauge,
    pub outbox_rows: Gauge,
    pub consumer_unapplied: Family<GroupLabel, Gauge>,
    pub consumer_lag: Family<LagLabel, Seconds>,
    pub dlq_size: Gauge,
}

fn latency_histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

impl Default for Metrics {
    fn default() -> Self {
        let mut metrics = Metrics {
            registry: Registry::default(),
            requests: Family::default(),
            durations: Family::new_with_constructor(latency_histogram),
            transfers: Family::default(),
            shard_healthy: Family::default(),
            shard_transfers: Family::default(),
            outbox_backlog: Gauge::default(),
            outbox_rows: Gauge::default(),
            consumer_unapplied: Family::default(),
            consumer_lag: Family::default(),
            dlq_size: Gauge::default(),
        };
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        metrics.registry = registry;
        metrics
    }
}

impl Metrics {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "shardpay_http_requests",
            "HTTP requests answered, by route and status",
            self.requests.clone(),
        );
        registry.register(
            "shardpay_http_request_duration_seconds",
            "Time to answer, by route",
            self.durations.clone(),
        );
        registry.register(
            "shardpay_transfers",
            "Transfers on all shards, by state",
            self.transfers.clone(),
        );
        registry.register(
            "shardpay_shard_healthy",
            "1 when the shard answers",
            self.shard_healthy.clone(),
        );
        registry.register(
            "shardpay_shard_transfers",
            "Transfers paid from each shard (its payers), by state",
            self.shard_transfers.clone(),
        );
        registry.register(
            "shardpay_outbox_backlog",
            "Outbox rows not yet published",
            self.outbox_backlog.clone(),
        );
        registry.register(
            "shardpay_outbox_rows",
            "Outbox rows ever written on all shards (pruned ones included)",
            self.outbox_rows.clone(),
        );
        registry.register(
            "shardpay_consumer_unapplied",
            "Outbox events a consumer group has not applied yet (its lag, in events)",
            self.consumer_unapplied.clone(),
        );
        registry.register(
            "shardpay_consumer_lag_seconds",
            "Commit-to-consume lag of applied events, by group and quantile",
            self.consumer_lag.clone(),
        );
        registry.register(
            "shardpay_dlq_size",
            "Webhook deliveries in the dead-letter store",
            self.dlq_size.clone(),
        );
    }

    /// Counts an answered request. `method` is one of the standard methods
    /// or "other", so invented methods cannot grow `/metrics`.
    pub fn observe(&self, method: &'static str, route: Route, status: u16, seconds: f64) {
        let routed = Routed { method, route };
        self.durations.get_or_create(&routed).observe(seconds);
        let answered = Answered {
            method,
            route: routed.route,
            status,
        };
        self.requests.get_or_create(&answered).inc();
    }

    /// The exposition, in the text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}
