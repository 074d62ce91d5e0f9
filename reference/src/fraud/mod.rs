//! The fraud service: scores a transfer before the shard manager commits
//! it, and answers allow, review or block with a score and its reasons.
//!
//! Rules, each adding points to a score out of 100 (thresholds in
//! [`FraudConfig`], loadable from a TOML file with `serve --fraud-rules`):
//! - `large_amount`: at least `review_amount_minor` (+25), or at least
//!   `block_amount_minor` (+50);
//! - `round_amount`: a multiple of `round_unit_minor` (+15);
//! - `new_payee`: the payer has not paid this payee before (+15);
//! - `velocity_count`: more than `velocity_count` transfers by the payer in
//!   the last `velocity_window_ms` (+25);
//! - `velocity_sum`: the payer's transfers in the window, this one
//!   included, above `velocity_sum_minor` (+30).
//!
//! A score of `block_score` or more blocks the transfer: it is refused
//! (403 `transfer_blocked`) and touches no balance. `review_score` or more
//! lets it through marked for review. Every attempt is recorded in the
//! feature store, blocked ones included, so retrying a blocked transfer
//! does not wash its velocity away.
//!
//! Features live behind [`FeatureStore`]: in this process's memory
//! ([`MemoryFeatureStore`], the default), or shared by every fraud replica
//! in Redis ([`redis::RedisFeatureStore`], one Lua script per attempt) or
//! ScyllaDB ([`scylla::ScyllaFeatureStore`]); [`FeaturesConfig`] says which.

pub mod redis;
pub mod routes;
pub mod scylla;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::auth::stores::StoreDown;
use crate::ledger::TimestampMs;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FraudConfig {
    pub review_amount_minor: i64,
    pub block_amount_minor: i64,
    pub round_unit_minor: i64,
    pub velocity_window_ms: i64,
    pub velocity_count: u32,
    pub velocity_sum_minor: i64,
    pub review_score: u32,
    pub block_score: u32,
}

impl Default for FraudConfig {
    fn default() -> Self {
        FraudConfig {
            review_amount_minor: 10_000_00,
            block_amount_minor: 1_000_000_00,
            round_unit_minor: 1_000_00,
            velocity_window_ms: 60_000,
            velocity_count: 20,
            velocity_sum_minor: 100_000_00,
            review_score: 40,
            block_score: 70,
        }
    }
}

impl FraudConfig {
    /// Reads a TOML file of [`FraudConfig`] keys; keys left out keep their
    /// defaults, unknown keys are refused.
    pub fn load(path: &std::path::Path) -> anyhow::Result<FraudConfig> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        let config: FraudConfig =
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        config.check()?;
        Ok(config)
    }

    pub fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.review_score <= self.block_score && self.block_score <= 100,
            "fraud rules: need review_score <= block_score <= 100"
        );
        anyhow::ensure!(
            self.velocity_window_ms > 0 && self.round_unit_minor > 0,
            "fraud rules: velocity_window_ms and round_unit_minor must be positive"
        );
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Allow,
    Review,
    Block,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assessment {
    pub decision: Verdict,
    pub score: u32,
    pub reasons: Vec<String>,
}

/// What the feature store knew of a payer just before this transfer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Features {
    /// Transfers by the payer within the window, before this one.
    pub count_in_window: u32,
    /// Their sum, in minor units.
    pub sum_in_window: i64,
    pub paid_payee_before: bool,
}

/// Where payer features live: in memory for one process, in Redis or
/// ScyllaDB for several fraud replicas that must see each other's attempts.
#[async_trait]
pub trait FeatureStore: Send + Sync {
    /// Records one transfer attempt and answers the features as they were
    /// just before it. An error means the store itself failed: the engine
    /// then refuses to score (fails closed), never guesses.
    async fn observe(
        &self,
        payer: &str,
        payee: &str,
        amount_minor: i64,
        at_ms: TimestampMs,
        window_ms: i64,
    ) -> Result<Features, StoreDown>;
}

/// Which [`FeatureStore`] the fraud service keeps its features in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum FeaturesConfig {
    /// This process's memory: right for one fraud process; several
    /// replicas would each count only the attempts they scored.
    #[default]
    Memory,
    /// Redis (`redis://host:port`), keys under `prefix`: shared by every
    /// replica, each attempt counted atomically.
    Redis { url: String, prefix: String },
    /// ScyllaDB or Cassandra: shared and durable, without Redis's
    /// per-payer atomicity (see [`scylla`]).
    Scylla(scylla::ScyllaConfig),
}

impl FeaturesConfig {
    /// Connects to the store (and, for ScyllaDB, creates its tables).
    pub async fn open(&self) -> anyhow::Result<Box<dyn FeatureStore>> {
        Ok(match self {
            FeaturesConfig::Memory => Box::new(MemoryFeatureStore::default()),
            FeaturesConfig::Redis { url, prefix } => {
                Box::new(redis::RedisFeatureStore::connect(url, prefix).await?)
            }
            FeaturesConfig::Scylla(config) => {
                Box::new(scylla::ScyllaFeatureStore::connect(config).await?)
            }
        })
    }

    /// For the log line at start: which store, where.
    pub fn describe(&self) -> String {
        match self {
            FeaturesConfig::Memory => "memory".into(),
            FeaturesConfig::Redis { url, .. } => format!("redis {url}"),
            FeaturesConfig::Scylla(config) => {
                format!("scylla {} ({})", config.nodes.join(","), config.keyspace)
            }
        }
    }
}

#[derive(Default)]
struct PayerState {
    recent: VecDeque<(TimestampMs, i64)>,
    /// Sum of `recent`, wide enough that no number of transfers overflows.
    sum: i128,
    payees: HashSet<String>,
}

/// Payees remembered per payer. Past this the set starts again: a payee
/// then counts as new once more (more reviews, never fewer).
const MAX_PAYEES_PER_PAYER: usize = 1024;
/// How long the shared stores keep a payer's payees after its last
/// attempt: their bound on memory, where the memory store's is
/// `MAX_PAYERS_PER_PART`. A forgotten payee counts as new again.
const PAYEES_TTL_MS: i64 = 30 * 24 * 60 * 60 * 1000;
/// How long past the window the shared stores keep an attempt. Replicas
/// stamp attempts with their own clocks; kept this much longer, an attempt
/// still counts for a replica whose clock runs up to this far ahead.
const CLOCK_SKEW_MARGIN_MS: i64 = 10_000;
/// Payers remembered per lock part (64 parts). Past this, payers with no
/// attempt inside the window are forgotten.
const MAX_PAYERS_PER_PART: usize = 4096;

/// The embedded feature store: per payer, the attempts inside the window
/// and the payees paid. Split over 64 locks by payer.
pub struct MemoryFeatureStore {
    parts: Vec<Mutex<HashMap<String, PayerState>>>,
}

impl Default for MemoryFeatureStore {
    fn default() -> Self {
        MemoryFeatureStore {
            parts: (0..64).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }
}

#[async_trait]
impl FeatureStore for MemoryFeatureStore {
    async fn observe(
        &self,
        payer: &str,
        payee: &str,
        amount_minor: i64,
        at_ms: TimestampMs,
        window_ms: i64,
    ) -> Result<Features, StoreDown> {
        let part = xxhash_rust::xxh3::xxh3_64(payer.as_bytes()) as usize % self.parts.len();
        let mut map = self.parts[part].lock().expect("feature store lock");
        if map.len() >= MAX_PAYERS_PER_PART && !map.contains_key(payer) {
            map.retain(|_, s| s.recent.back().is_some_and(|(t, _)| *t > at_ms - window_ms));
        }
        let state = map.entry(payer.to_string()).or_default();
        while let Some(&(t, amount)) = state.recent.front() {
            if t > at_ms - window_ms {
                break;
            }
            state.recent.pop_front();
            state.sum -= amount as i128;
        }
        let features = Features {
            count_in_window: state.recent.len() as u32,
            sum_in_window: i64::try_from(state.sum).unwrap_or(i64::MAX),
            paid_payee_before: state.payees.contains(payee),
        };
        state.recent.push_back((at_ms, amount_minor));
        state.sum += amount_minor as i128;
        if !features.paid_payee_before {
            if state.payees.len() >= MAX_PAYEES_PER_PAYER {
                state.payees.clear();
            }
            state.payees.insert(payee.to_string());
        }
        Ok(features)
    }
}

pub struct FraudEngine {
    config: FraudConfig,
    store: Box<dyn FeatureStore>,
    /// Where decisions are published (`fraud_events`), if anywhere.
    bus: Option<std::sync::Arc<dyn crate::events::EventBus>>,
    /// The fraud service of a split deployment, which scores (and
    /// publishes) in place of this engine's own rules.
    remote: Option<RemoteFraud>,
}

/// The fraud service, over HTTP.
struct RemoteFraud {
    replicas: crate::peers::Replicas,
    client: reqwest::Client,
    /// Mints this service's token for the call, when auth is on.
    auth: Option<std::sync::Arc<crate::auth::AuthService>>,
}

/// How long the shard manager waits for a score before it refuses the
/// transfer with 503 (a transfer is never made unscored).
pub const REMOTE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

impl FraudEngine {
    pub fn new(config: FraudConfig, store: Box<dyn FeatureStore>) -> FraudEngine {
        FraudEngine {
            config,
            store,
            bus: None,
            remote: None,
        }
    }

    /// An engine that asks the fraud service, any of `replicas` (`POST
    /// /v1/fraud/score`, which also publishes the decision).
    pub fn remote(
        replicas: crate::peers::Replicas,
        auth: Option<std::sync::Arc<crate::auth::AuthService>>,
    ) -> FraudEngine {
        let client = reqwest::Client::builder()
            .timeout(REMOTE_TIMEOUT)
            .build()
            .expect("an HTTP client with a timeout builds");
        FraudEngine {
            config: FraudConfig::default(),
            store: Box::new(MemoryFeatureStore::default()),
            bus: None,
            remote: Some(RemoteFraud {
                replicas,
                client,
                auth,
            }),
        }
    }

    /// Whether scores come from the fraud service over HTTP.
    pub fn is_remote(&self) -> bool {
        self.remote.is_some()
    }

    /// Publishes every decision to `fraud_events` on `bus`: straight to
    /// the bus, as a decision changes no shard (so there is no outbox row
    /// to relay), keyed by payer.
    pub fn publishing_to(mut self, bus: std::sync::Arc<dyn crate::events::EventBus>) -> Self {
        self.bus = Some(bus);
        self
    }

    /// Publishes a decision; a bus that fails loses the event (and says so
    /// in the log), never the transfer.
    pub async fn publish(&self, payer: &str, payee: &str, amount_minor: i64, a: &Assessment) {
        // A remote engine's decisions were published by the fraud service.
        let Some(bus) = &self.bus else { return };
        let event_type = match a.decision {
            Verdict::Allow => "fraud.scored",
            Verdict::Review => "fraud.review_required",
            Verdict::Block => "fraud.blocked",
        };
        let event = crate::events::Event {
            id: uuid::Uuid::new_v4().simple().to_string(),
            event_type: event_type.into(),
            key: payer.into(),
            shard: None,
            payload: serde_json::json!({
                "from": payer,
                "to": payee,
                "amount_minor": amount_minor,
                "decision": a.decision,
                "score": a.score,
                "reasons": a.reasons,
            })
            .to_string(),
            created_at_ms: crate::ledger::now_ms(),
            position: None,
        };
        // Off the transfer's path: a broker round trip must not add to the
        // payment's latency.
        let bus = std::sync::Arc::clone(bus);
        tokio::spawn(async move {
            if let Err(error) = bus
                .publish(crate::events::FRAUD_EVENTS, std::slice::from_ref(&event))
                .await
            {
                tracing::warn!(%error, "cannot publish a fraud decision");
            }
        });
    }

    pub fn config(&self) -> &FraudConfig {
        &self.config
    }

    /// Scores a transfer and records it as an attempt.
    pub async fn score(
        &self,
        payer: &str,
        payee: &str,
        amount_minor: i64,
        at_ms: TimestampMs,
    ) -> anyhow::Result<Assessment> {
        if let Some(remote) = &self.remote {
            return remote.score(payer, payee, amount_minor).await;
        }
        let features = self
            .store
            .observe(
                payer,
                payee,
                amount_minor,
                at_ms,
                self.config.velocity_window_ms,
            )
            .await?;
        Ok(assess(&self.config, amount_minor, &features))
    }
}

impl RemoteFraud {
    async fn score(
        &self,
        payer: &str,
        payee: &str,
        amount_minor: i64,
    ) -> anyhow::Result<Assessment> {
        let body = serde_json::json!({
            "from": payer,
            "to": payee,
            "amount_minor": amount_minor,
            "publish": true,
        });
        // A refused service token (its session is gone) is replaced once.
        let mut attempt = 0;
        let response = loop {
            attempt += 1;
            let token = match &self.auth {
                Some(auth) => Some(
                    auth.service_token()
                        .await
                        .map_err(|e| anyhow::anyhow!("cannot get a service token: {e}"))?,
                ),
                None => None,
            };
            let response = self
                .replicas
                .send("/v1/fraud/score", |url| {
                    let mut request = self.client.post(url).json(&body);
                    if let Some(token) = &token {
                        request = request.bearer_auth(token);
                    }
                    crate::peers::with_request_id(request)
                })
                .await
                .map_err(|e| anyhow::anyhow!("the fraud service at {e}"))?;
            match (&self.auth, &token) {
                (Some(auth), Some(token))
                    if response.status() == reqwest::StatusCode::UNAUTHORIZED && attempt == 1 =>
                {
                    auth.forget_service_token(token);
                }
                _ => break response,
            }
        };
        let status = response.status();
        if !status.is_success() {
            let text = response.text().await.unwrap_or_default();
            anyhow::bail!("the fraud service answered {status}: {text}");
        }
        Ok(response.json().await?)
    }
}

/// The rules, as a pure function of the transfer and the features.
pub fn assess(config: &FraudConfig, amount_minor: i64, f: &Features) -> Assessment {
    let mut score = 0;
    let mut reasons = Vec::new();
    let mut add = |points: u32, reason: &str| {
        score += points;
        reasons.push(reason.to_string());
    };
    if amount_minor >= config.block_amount_minor {
        add(50, "large_amount");
    } else if amount_minor >= config.review_amount_minor {
        add(25, "large_amount");
    }
    if amount_minor >= config.round_unit_minor && amount_minor % config.round_unit_minor == 0 {
        add(15, "round_amount");
    }
    if !f.paid_payee_before {
        add(15, "new_payee");
    }
    if f.count_in_window >= config.velocity_count {
        add(25, "velocity_count");
    }
    if f.sum_in_window.saturating_add(amount_minor) > config.velocity_sum_minor {
        add(30, "velocity_sum");
    }
    let score = score.min(100);
    let decision = if score >= config.block_score {
        Verdict::Block
    } else if score >= config.review_score {
        Verdict::Review
    } else {
        Verdict::Allow
    };
    Assessment {
        decision,
        score,
        reasons,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn features(count: u32, sum: i64, seen: bool) -> Features {
        Features {
            count_in_window: count,
            sum_in_window: sum,
            paid_payee_before: seen,
        }
    }

    #[test]
    fn a_small_payment_to_a_known_payee_is_allowed() {
        let a = assess(&FraudConfig::default(), 4_50, &features(3, 100_00, true));
        assert_eq!((a.decision, a.score), (Verdict::Allow, 0));
        assert!(a.reasons.is_empty());
    }

    #[test]
    fn a_large_round_payment_to_a_new_payee_goes_to_review() {
        let a = assess(&FraudConfig::default(), 20_000_00, &features(0, 0, false));
        assert_eq!(a.decision, Verdict::Review);
        assert_eq!(a.score, 55);
        assert_eq!(a.reasons, ["large_amount", "round_amount", "new_payee"]);
    }

    #[test]
    fn a_burst_over_the_sum_limit_is_blocked() {
        let a = assess(
            &FraudConfig::default(),
            40_000_00,
            &features(2, 80_000_00, false),
        );
        assert_eq!(a.decision, Verdict::Block);
        assert!(a.reasons.contains(&"velocity_sum".to_string()), "{a:?}");
    }

    #[test]
    fn thresholds_come_from_config() {
        let config = FraudConfig {
            block_score: 15,
            review_score: 10,
            ..FraudConfig::default()
        };
        let a = assess(&config, 1_00, &features(0, 0, false));
        assert_eq!(a.decision, Verdict::Block);
        let bad = FraudConfig {
            review_score: 90,
            block_score: 80,
            ..FraudConfig::default()
        };
        assert!(bad.check().is_err());
    }

    #[test]
    fn the_readme_rules_file_gives_the_defaults_and_typos_are_refused() {
        let readme = include_str!("../../../README.md");
        let start = readme.find("# serve --fraud-rules fraud.toml").unwrap();
        let text = &readme[start..start + readme[start..].find("```").unwrap()];
        let config: FraudConfig = toml::from_str(text).unwrap();
        assert_eq!(config, FraudConfig::default());
        assert!(toml::from_str::<FraudConfig>("block_scor = 50").is_err());
    }

    /// A store that is down.
    struct Down;

    #[async_trait]
    impl FeatureStore for Down {
        async fn observe(
            &self,
            _: &str,
            _: &str,
            _: i64,
            _: TimestampMs,
            _: i64,
        ) -> Result<Features, StoreDown> {
            Err(StoreDown("redis: connection refused".into()))
        }
    }

    #[tokio::test]
    async fn a_store_that_is_down_fails_the_score_rather_than_allowing() {
        let engine = FraudEngine::new(FraudConfig::default(), Box::new(Down));
        let e = engine.score("p", "q", 1_00, 1_000).await.unwrap_err();
        assert!(e.to_string().contains("connection refused"), "{e}");
    }

    #[test]
    fn memory_is_the_default_feature_store() {
        assert_eq!(FeaturesConfig::default(), FeaturesConfig::Memory);
        let redis = FeaturesConfig::Redis {
            url: "redis://127.0.0.1:6379".into(),
            prefix: "shardpay:".into(),
        };
        assert_eq!(redis.describe(), "redis redis://127.0.0.1:6379");
    }

    #[tokio::test]
    async fn the_memory_store_keeps_a_sliding_window_per_payer() {
        let store = MemoryFeatureStore::default();
        let f = store.observe("p", "a", 10, 1_000, 5_000).await.unwrap();
        assert_eq!(f, features(0, 0, false));
        let f = store.observe("p", "a", 20, 2_000, 5_000).await.unwrap();
        assert_eq!(f, features(1, 10, true));
        let f = store.observe("q", "a", 5, 2_500, 5_000).await.unwrap();
        assert_eq!(f, features(0, 0, false), "another payer");
        // At 6,500 the attempt at 1,000 has left the 5 s window.
        let f = store.observe("p", "b", 30, 6_500, 5_000).await.unwrap();
        assert_eq!(f, features(1, 20, false));
    }
}
