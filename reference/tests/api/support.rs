//! Test harness: an app on port 0 in a temporary directory, a JSON client,
//! and a shard store wrapper that can be taken down or held at a gate.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use shardpay_reference::app::{self, ServeConfig};
use shardpay_reference::http::AppState;
use shardpay_reference::ids::{AccountId, IdempotencyKey, ShardId, TransferId};
use shardpay_reference::ledger::sqlite::SqliteConfig;
use shardpay_reference::ledger::*;
use shardpay_reference::manager::{ManagerConfig, ShardManager};
use shardpay_reference::money::Currency;

pub struct TestApp {
    pub url: String,
    pub manager: Arc<ShardManager>,
    pub pipeline: Arc<shardpay_reference::pipeline::Pipeline>,
    pub client: reqwest::Client,
    pub flaky: Vec<Arc<Flaky>>,
    /// The pipeline's tasks: the relay first, then the consumers.
    pub tasks: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
    pub auth: Option<Arc<shardpay_reference::auth::AuthService>>,
    _dir: tempfile::TempDir,
}

pub struct Options {
    pub shards: u32,
    pub manager: ManagerConfig,
    /// Shard stores on a real MySQL/MariaDB server instead of SQLite files.
    pub mysql: bool,
    /// Connections per MySQL shard (the backend's default when `None`).
    pub mysql_pool_size: Option<u32>,
    /// Fraud rules; `None` turns fraud checks off.
    pub fraud: Option<shardpay_reference::fraud::FraudConfig>,
    /// Events on this Kafka broker (topics under a prefix of the test's
    /// own) instead of the in-process bus.
    pub kafka: Option<String>,
    /// Auth on (with this service); `None` is demo mode.
    pub auth: Option<Arc<shardpay_reference::auth::AuthService>>,
    /// Webhooks may go to loopback (the tests' receivers listen there).
    pub webhooks_to_private_networks: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            shards: 4,
            manager: ManagerConfig::default(),
            mysql: false,
            mysql_pool_size: None,
            fraud: Some(Default::default()),
            kafka: None,
            auth: None,
            webhooks_to_private_networks: true,
        }
    }
}

/// The server the MySQL tests use: `SHARDPAY_TEST_MYSQL_URL`, such as
/// `mysql://shardpay:shardpay@127.0.0.1:3316` (`scripts/shards.sh up 1`
/// starts one). Unset, the MySQL tests say so and pass, unless
/// `SHARDPAY_REQUIRE_MYSQL=1` (as CI sets) makes that a failure.
pub fn mysql_server() -> Option<String> {
    match std::env::var("SHARDPAY_TEST_MYSQL_URL") {
        Ok(url) if !url.is_empty() => Some(url.trim_end_matches('/').to_string()),
        _ => {
            assert!(
                std::env::var("SHARDPAY_REQUIRE_MYSQL").as_deref() != Ok("1"),
                "SHARDPAY_REQUIRE_MYSQL=1 but SHARDPAY_TEST_MYSQL_URL is not set; run scripts/shards.sh up 1"
            );
            eprintln!("MySQL test skipped: set SHARDPAY_TEST_MYSQL_URL (scripts/shards.sh up 1)");
            None
        }
    }
}

/// The broker the Kafka tests use: `SHARDPAY_TEST_KAFKA_BOOTSTRAP`, such as
/// `127.0.0.1:9192` (`scripts/kafka.sh up` starts one). Unset, the Kafka
/// tests say so and pass, unless `SHARDPAY_REQUIRE_KAFKA=1` (as CI sets)
/// makes that a failure.
pub fn kafka_server() -> Option<String> {
    match std::env::var("SHARDPAY_TEST_KAFKA_BOOTSTRAP") {
        Ok(bootstrap) if !bootstrap.is_empty() => Some(bootstrap),
        _ => {
            assert!(
                std::env::var("SHARDPAY_REQUIRE_KAFKA").as_deref() != Ok("1"),
                "SHARDPAY_REQUIRE_KAFKA=1 but SHARDPAY_TEST_KAFKA_BOOTSTRAP is not set; run scripts/kafka.sh up"
            );
            eprintln!(
                "Kafka test skipped: set SHARDPAY_TEST_KAFKA_BOOTSTRAP (scripts/kafka.sh up)"
            );
            None
        }
    }
}

/// A Kafka bus on the test broker whose topics and groups carry a fresh
/// prefix, so tests never read each other's events.
pub fn kafka_config(bootstrap: &str) -> shardpay_reference::events::kafka::KafkaConfig {
    shardpay_reference::events::kafka::KafkaConfig {
        prefix: format!("t{}-", &uuid::Uuid::new_v4().simple().to_string()[..12]),
        ..shardpay_reference::events::kafka::KafkaConfig::new(bootstrap)
    }
}

/// `n` shard stores, each in a fresh database of its own on the MySQL test
/// server (databases `t<random>_<i>`), so tests never share data.
pub async fn mysql_stores(server: &str, n: u32) -> Vec<Arc<dyn ShardStore>> {
    mysql_stores_with(server, n, &Default::default()).await
}

pub async fn mysql_stores_with(
    server: &str,
    n: u32,
    config: &shardpay_reference::ledger::mysql::MysqlConfig,
) -> Vec<Arc<dyn ShardStore>> {
    use shardpay_reference::ledger::mysql::MysqlShard;
    use sqlx::Connection;
    let prefix = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let mut admin = sqlx::MySqlConnection::connect(server).await.unwrap();
    let mut stores = Vec::new();
    for i in 0..n {
        let db = format!("{prefix}_{i}");
        sqlx::query(&format!(
            "CREATE DATABASE {db} CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
        ))
        .execute(&mut admin)
        .await
        .unwrap();
        let store = MysqlShard::connect(
            &format!("{server}/{db}"),
            ShardId::new(i).unwrap(),
            n,
            config,
        )
        .await
        .unwrap();
        stores.push(Arc::new(store) as Arc<dyn ShardStore>);
    }
    stores
}

impl TestApp {
    pub async fn start() -> TestApp {
        TestApp::start_with(Options::default()).await
    }

    /// Every shard store is wrapped in `Flaky`, so tests can take one down.
    /// `SHARDPAY_TEST_LOG` (a `RUST_LOG` filter) prints the server's logs.
    pub async fn start_with(options: Options) -> TestApp {
        if let Ok(filter) = std::env::var("SHARDPAY_TEST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_test_writer()
                .try_init();
        }
        let dir = tempfile::tempdir().unwrap();
        let config = ServeConfig::new(dir.path());
        let stores = if options.mysql {
            let server = mysql_server().expect("MySQL tests check mysql_server() first");
            let mut config = shardpay_reference::ledger::mysql::MysqlConfig::default();
            if let Some(size) = options.mysql_pool_size {
                config.pool_size = size;
            }
            mysql_stores_with(&server, options.shards, &config).await
        } else {
            app::open_embedded(dir.path(), options.shards, &SqliteConfig::default()).unwrap()
        };
        let flaky: Vec<Arc<Flaky>> = stores.into_iter().map(Flaky::wrap).collect();
        let stores: Vec<Arc<dyn ShardStore>> = flaky
            .iter()
            .map(|f| Arc::clone(f) as Arc<dyn ShardStore>)
            .collect();
        let bus = match &options.kafka {
            None => shardpay_reference::events::BusConfig::InProcess,
            Some(bootstrap) => {
                shardpay_reference::events::BusConfig::Kafka(kafka_config(bootstrap))
            }
        };
        let pipeline = Arc::new(
            shardpay_reference::pipeline::Pipeline::with_bus(
                stores.clone(),
                bus.connect().await.unwrap(),
            )
            .with_webhooks(shardpay_reference::notification::WebhookPolicy {
                allow_private: options.webhooks_to_private_networks,
            }),
        );
        let mut manager = ShardManager::new(stores, options.manager).unwrap();
        if let Some(rules) = options.fraud {
            manager = manager.with_fraud(Arc::new(
                shardpay_reference::fraud::FraudEngine::new(
                    rules,
                    Box::new(shardpay_reference::fraud::MemoryFeatureStore::default()),
                )
                .publishing_to(Arc::clone(&pipeline.bus)),
            ));
        }
        let manager = Arc::new(manager);
        let tasks = pipeline
            .spawn(std::time::Duration::from_millis(10))
            .await
            .unwrap();
        let state = AppState {
            service: shardpay_reference::app::Service::All,
            peers: None,
            fraud: manager.fraud().cloned(),
            pipeline: Some(Arc::clone(&pipeline)),
            manager: Some(Arc::clone(&manager)),
            default_currency: config.default_currency,
            auth: options.auth.clone(),
            metrics: Default::default(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            axum::serve(
                listener,
                shardpay_reference::api::router(state)
                    .into_make_service_with_connect_info::<std::net::SocketAddr>(),
            )
            .await
            .unwrap();
        });
        TestApp {
            url,
            manager,
            pipeline,
            client: reqwest::Client::new(),
            flaky,
            tasks: std::sync::Mutex::new(tasks),
            auth: options.auth,
            _dir: dir,
        }
    }

    /// A second shard manager over the same shard stores, serving on a
    /// port of its own (as a replica behind a load balancer would): it
    /// routes by the placement the shards held when it started, and by
    /// what it learns afterwards.
    pub async fn replica(&self, config: ManagerConfig) -> TestApp {
        let stores = self.manager.shards().to_vec();
        let manager = Arc::new(ShardManager::new(stores, config).unwrap());
        manager.load_placement().await.unwrap();
        let state = AppState {
            service: shardpay_reference::app::Service::All,
            peers: None,
            fraud: None,
            pipeline: Some(Arc::clone(&self.pipeline)),
            manager: Some(Arc::clone(&manager)),
            default_currency: shardpay_reference::money::Currency::parse("INR").unwrap(),
            auth: self.auth.clone(),
            metrics: Default::default(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            axum::serve(
                listener,
                shardpay_reference::api::router(state)
                    .into_make_service_with_connect_info::<std::net::SocketAddr>(),
            )
            .await
            .unwrap();
        });
        TestApp {
            url,
            manager,
            pipeline: Arc::clone(&self.pipeline),
            client: reqwest::Client::new(),
            flaky: self.flaky.clone(),
            tasks: std::sync::Mutex::new(Vec::new()),
            auth: self.auth.clone(),
            _dir: tempfile::tempdir().unwrap(),
        }
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> (u16, Value) {
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub async fn post(&self, path: &str, body: Value, key: Option<&str>) -> (u16, Value) {
        let mut request = self.client.post(format!("{}{path}", self.url)).json(&body);
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        self.send(request).await
    }

    pub async fn post_empty(&self, path: &str) -> (u16, Value) {
        self.send(self.client.post(format!("{}{path}", self.url)))
            .await
    }

    /// The raw body text, to check how numbers are written.
    pub async fn text(&self, method: reqwest::Method, path: &str) -> String {
        let url = format!("{}{path}", self.url);
        let response = self.client.request(method, url).send().await.unwrap();
        response.text().await.unwrap()
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.send(self.client.get(format!("{}{path}", self.url)))
            .await
    }

    pub async fn create(&self, id: &str, opening: &str) {
        let (status, body) = self
            .post(
                "/v1/accounts",
                serde_json::json!({"id": id, "opening_balance": opening}),
                None,
            )
            .await;
        assert_eq!(status, 201, "{body}");
    }

    /// Straight from the shards, whatever the API's auth.
    pub async fn balance_minor(&self, id: &str) -> i64 {
        let id = AccountId::parse(id).unwrap();
        let account = self.manager.account(&id).await.unwrap();
        account
            .unwrap_or_else(|| panic!("account {id} does not exist"))
            .balance_minor
    }

    pub async fn audit(&self) -> Value {
        let (status, body) = self.get("/v1/audit").await;
        assert_eq!(status, 200);
        body
    }

    pub async fn assert_audit_passes(&self) {
        let report = self.audit().await;
        assert_eq!(report["ok"], true, "audit failed: {report:#}");
    }

    /// Ids of two accounts on the same shard and one on another.
    pub fn ids_by_shard(&self, prefix: &str) -> (String, String, String) {
        let ring = self.manager.ring();
        let shard = |s: &str| ring.shard_of_key(s);
        let first = format!("{prefix}_0");
        let mut same = None;
        let mut other = None;
        for i in 1.. {
            let id = format!("{prefix}_{i}");
            if shard(&id) == shard(&first) && same.is_none() {
                same = Some(id);
            } else if shard(&id) != shard(&first) && other.is_none() {
                other = Some(id);
            }
            if same.is_some() && other.is_some() {
                break;
            }
        }
        (first, same.unwrap(), other.unwrap())
    }
}

/// Polls `check` until it answers true, up to a deadline.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while tokio::time::Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for: {what}");
}

/// A shard store that can be made unavailable, or made to hold writes at a
/// gate until released, around a real store.
pub struct Flaky {
    inner: Arc<dyn ShardStore>,
    writes_down: AtomicBool,
    reads_down: AtomicBool,
    gate: tokio::sync::Semaphore,
    gated: AtomicBool,
    waiting: std::sync::atomic::AtomicUsize,
}

impl Flaky {
    pub fn wrap(inner: Arc<dyn ShardStore>) -> Arc<Flaky> {
        Arc::new(Flaky {
            inner,
            writes_down: AtomicBool::new(false),
            reads_down: AtomicBool::new(false),
            gate: tokio::sync::Semaphore::new(0),
            gated: AtomicBool::new(false),
            waiting: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// Refuses writes only: the shard answered a read, then went away.
    /// Reads and writes both fail, as with a shard server that is gone.
    pub fn set_down(&self, down: bool) {
        self.reads_down.store(down, Ordering::SeqCst);
        self.writes_down.store(down, Ordering::SeqCst);
    }

    pub fn set_writes_down(&self, down: bool) {
        self.writes_down.store(down, Ordering::SeqCst);
    }

    /// Holds every later write until `release_gate`.
    pub fn close_gate(&self) {
        self.gated.store(true, Ordering::SeqCst);
    }

    /// Writes now held at the gate.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    pub fn release_gate(&self) {
        self.gated.store(false, Ordering::SeqCst);
        self.gate.add_permits(1_000);
    }

    async fn check(&self, write: bool) -> Result<(), StoreError> {
        if (write && self.writes_down.load(Ordering::SeqCst))
            || self.reads_down.load(Ordering::SeqCst)
        {
            return Err(StoreError::Unavailable {
                shard: self.inner.shard(),
                reason: "taken down by the test".into(),
            });
        }
        if write && self.gated.load(Ordering::SeqCst) {
            self.waiting.fetch_add(1, Ordering::SeqCst);
            self.gate.acquire().await.unwrap().forget();
            self.waiting.fetch_sub(1, Ordering::SeqCst);
        }
        Ok(())
    }
}

#[async_trait]
impl ShardStore for Flaky {
    fn shard(&self) -> ShardId {
        self.inner.shard()
    }

    /// XA goes straight to the real store: taking a shard down is for the
    /// saga tests (the XA outage test kills a real server).
    fn two_phase(&self) -> Option<&dyn TwoPhase> {
        self.inner.two_phase()
    }
    async fn create_account(
        &self,
        a: NewAccount,
        i: Option<IdempotencyWrite>,
    ) -> Result<Account, StoreError> {
        self.check(true).await?;
        self.inner.create_account(a, i).await
    }
    async fn account(&self, id: &AccountId) -> Result<Option<Account>, StoreError> {
        self.check(false).await?;
        self.inner.account(id).await
    }
    async fn lookup(&self, lookup: Lookup) -> Result<Looked, StoreError> {
        self.check(false).await?;
        self.inner.lookup(lookup).await
    }
    async fn list_accounts(
        &self,
        after: Option<AccountId>,
        limit: u32,
    ) -> Result<Vec<Account>, StoreError> {
        self.check(false).await?;
        self.inner.list_accounts(after, limit).await
    }
    async fn idempotency_record(
        &self,
        s: &AccountId,
        k: &IdempotencyKey,
        now: TimestampMs,
    ) -> Result<Option<IdempotencyRecord>, StoreError> {
        self.check(false).await?;
        self.inner.idempotency_record(s, k, now).await
    }
    async fn save_idempotent_response(
        &self,
        s: &AccountId,
        k: &IdempotencyKey,
        r: StoredResponse,
    ) -> Result<(), StoreError> {
        self.check(true).await?;
        self.inner.save_idempotent_response(s, k, r).await
    }
    async fn record_decline(
        &self,
        idempotency: IdempotencyWrite,
        transfer_id: &TransferId,
        response: StoredResponse,
        now: TimestampMs,
    ) -> Result<(), StoreError> {
        self.check(true).await?;
        self.inner
            .record_decline(idempotency, transfer_id, response, now)
            .await
    }

    // The outbox relay runs in the background of every test app: it passes
    // the gate and the outage switch, which are for requests.
    async fn unpublished_events(&self, limit: u32) -> Result<Vec<OutboxEvent>, StoreError> {
        self.inner.unpublished_events(limit).await
    }

    async fn mark_published(&self, seqs: &[i64], now: TimestampMs) -> Result<(), StoreError> {
        self.inner.mark_published(seqs, now).await
    }

    async fn outbox_counts(&self) -> Result<(u64, u64), StoreError> {
        self.inner.outbox_counts().await
    }

    async fn stage_outbox(&self, limit: u32) -> Result<u64, StoreError> {
        self.inner.stage_outbox(limit).await
    }

    async fn outbox_tail(
        &self,
        after_position: i64,
        limit: u32,
    ) -> Result<Vec<OutboxEvent>, StoreError> {
        self.inner.outbox_tail(after_position, limit).await
    }

    async fn prune_outbox(&self, before: TimestampMs, limit: u32) -> Result<u64, StoreError> {
        self.inner.prune_outbox(before, limit).await
    }

    async fn consumer_snapshot(&self, consumer: &str) -> Result<Option<(i64, String)>, StoreError> {
        self.inner.consumer_snapshot(consumer).await
    }

    async fn save_consumer_snapshot(
        &self,
        consumer: &str,
        position: i64,
        body: String,
    ) -> Result<(), StoreError> {
        self.inner
            .save_consumer_snapshot(consumer, position, body)
            .await
    }

    async fn transfer_local(
        &self,
        t: &Transfer,
        i: Option<IdempotencyWrite>,
    ) -> Result<DebitOutcome, StoreError> {
        self.check(true).await?;
        self.inner.transfer_local(t, i).await
    }
    async fn debit_to_in_flight(
        &self,
        t: &Transfer,
        i: Option<IdempotencyWrite>,
    ) -> Result<DebitOutcome, StoreError> {
        self.check(true).await?;
        self.inner.debit_to_in_flight(t, i).await
    }
    async fn credit_from_in_flight(&self, t: &Transfer) -> Result<CreditOutcome, StoreError> {
        self.check(true).await?;
        self.inner.credit_from_in_flight(t).await
    }
    async fn complete_transfer(
        &self,
        id: &TransferId,
        now: TimestampMs,
    ) -> Result<Transfer, StoreError> {
        self.check(true).await?;
        self.inner.complete_transfer(id, now).await
    }
    async fn reverse_transfer(
        &self,
        id: &TransferId,
        code: &str,
        now: TimestampMs,
    ) -> Result<Transfer, StoreError> {
        self.check(true).await?;
        self.inner.reverse_transfer(id, code, now).await
    }
    async fn transfer(&self, id: &TransferId) -> Result<Option<Transfer>, StoreError> {
        self.check(false).await?;
        self.inner.transfer(id).await
    }

    async fn account_to_move(
        &self,
        id: &AccountId,
    ) -> Result<Option<shardpay_reference::ledger::MovingAccount>, StoreError> {
        self.check(false).await?;
        self.inner.account_to_move(id).await
    }

    async fn adopt_account(
        &self,
        moving: shardpay_reference::ledger::MovingAccount,
    ) -> Result<(), StoreError> {
        self.check(true).await?;
        self.inner.adopt_account(moving).await
    }

    async fn disown(&self, id: &AccountId, home: ShardId) -> Result<(), StoreError> {
        self.check(true).await?;
        self.inner.disown(id, home).await
    }

    async fn move_out(
        &self,
        id: &AccountId,
        to: ShardId,
        transfer_id: &TransferId,
        now: TimestampMs,
        keep_open: bool,
    ) -> Result<shardpay_reference::ledger::MovedOut, StoreError> {
        self.check(true).await?;
        self.inner
            .move_out(id, to, transfer_id, now, keep_open)
            .await
    }

    async fn forwarding(&self) -> Result<Vec<(AccountId, ShardId)>, StoreError> {
        self.check(false).await?;
        self.inner.forwarding().await
    }

    async fn arrived(&self, id: &AccountId) -> Result<(), StoreError> {
        self.check(true).await?;
        self.inner.arrived(id).await
    }

    async fn fence_creates(
        &self,
        strategy: shardpay_reference::sharding::Strategy,
        shards: u32,
    ) -> Result<(), StoreError> {
        self.check(true).await?;
        self.inner.fence_creates(strategy, shards).await
    }

    async fn moved_to(&self, id: &AccountId) -> Result<Option<ShardId>, StoreError> {
        self.check(false).await?;
        self.inner.moved_to(id).await
    }

    async fn finish_move(&self, id: &TransferId, now: TimestampMs) -> Result<(), StoreError> {
        self.check(true).await?;
        self.inner.finish_move(id, now).await
    }

    async fn placement(
        &self,
    ) -> Result<Option<shardpay_reference::ledger::PlacementRecord>, StoreError> {
        self.check(false).await?;
        self.inner.placement().await
    }

    async fn save_placement(
        &self,
        placement: shardpay_reference::ledger::PlacementRecord,
    ) -> Result<(), StoreError> {
        self.check(true).await?;
        self.inner.save_placement(placement).await
    }

    async fn outbox_page(
        &self,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<shardpay_reference::ledger::OutboxEvent>, StoreError> {
        self.check(false).await?;
        self.inner.outbox_page(after_seq, limit).await
    }

    async fn account_entries(
        &self,
        account: &AccountId,
        after: i64,
        limit: u32,
    ) -> Result<Vec<shardpay_reference::ledger::LedgerEntry>, StoreError> {
        self.check(false).await?;
        self.inner.account_entries(account, after, limit).await
    }
    async fn pending_transfers(
        &self,
        before: TimestampMs,
        limit: u32,
    ) -> Result<Vec<Transfer>, StoreError> {
        self.check(false).await?;
        self.inner.pending_transfers(before, limit).await
    }
    async fn credit_outcome(&self, id: &TransferId) -> Result<Option<CreditOutcome>, StoreError> {
        self.check(false).await?;
        self.inner.credit_outcome(id).await
    }
    async fn stats(&self) -> Result<ShardStats, StoreError> {
        self.check(false).await?;
        self.inner.stats().await
    }
    async fn audit(&self) -> Result<ShardAudit, StoreError> {
        self.check(false).await?;
        self.inner.audit().await
    }
    async fn purge_expired_idempotency(
        &self,
        now: TimestampMs,
        limit: u32,
    ) -> Result<u64, StoreError> {
        self.check(true).await?;
        self.inner.purge_expired_idempotency(now, limit).await
    }
}

pub fn inr() -> Currency {
    Currency::parse("INR").unwrap()
}

/// The Redis the Redis tests use: `SHARDPAY_TEST_REDIS_URL`, such as
/// `redis://127.0.0.1:6379` (`scripts/redis.sh up` starts one). Unset, the
/// Redis tests say so and pass, unless `SHARDPAY_REQUIRE_REDIS=1` (as CI
/// sets) makes that a failure.
pub fn redis_server() -> Option<String> {
    match std::env::var("SHARDPAY_TEST_REDIS_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            assert!(
                std::env::var("SHARDPAY_REQUIRE_REDIS").as_deref() != Ok("1"),
                "SHARDPAY_REQUIRE_REDIS=1 but SHARDPAY_TEST_REDIS_URL is not set; run scripts/redis.sh up"
            );
            eprintln!("Redis test skipped: set SHARDPAY_TEST_REDIS_URL (scripts/redis.sh up)");
            None
        }
    }
}

pub const TEST_SECRET: &str = "test-secret-0123456789abcdef0123456789abcdef";

/// An auth service for tests: cheap password hashes, the test secret, an
/// admin whose password is `admin-password`, stores on Redis (keys under a
/// fresh prefix) or in memory.
pub async fn auth_service(
    redis: Option<&str>,
    adjust: impl FnOnce(&mut shardpay_reference::auth::AuthConfig),
) -> Arc<shardpay_reference::auth::AuthService> {
    use shardpay_reference::auth::{AuthConfig, AuthService, Stores};
    let mut config = AuthConfig::new(TEST_SECRET);
    config.argon2_memory_kib = 64;
    config.argon2_iterations = 1;
    config.admin_password = Some("admin-password".into());
    adjust(&mut config);
    let stores = match redis {
        Some(url) => {
            let prefix = format!("t{}:", &uuid::Uuid::new_v4().simple().to_string()[..12]);
            Stores::redis(url, &prefix).await.unwrap()
        }
        None => Stores::memory(),
    };
    let service = AuthService::open(config, None, stores).unwrap();
    service.bootstrap_admin().await.unwrap();
    Arc::new(service)
}

impl TestApp {
    /// Sends with `Authorization: Bearer <token>` (no header when `None`).
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value, reqwest::header::HeaderMap) {
        let mut request = self.client.request(method, format!("{}{path}", self.url));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        (
            status,
            response.json().await.unwrap_or(Value::Null),
            headers,
        )
    }

    /// With auth on: `admin_token` creates `id` for `owner` (or none) with
    /// an opening balance.
    pub async fn create_as(&self, admin_token: &str, id: &str, owner: Option<&str>, opening: &str) {
        let mut body = serde_json::json!({"id": id, "opening_balance": opening});
        if let Some(owner) = owner {
            body["owner"] = serde_json::json!(owner);
        }
        let (status, answer, _) = self
            .call(
                reqwest::Method::POST,
                "/v1/accounts",
                Some(admin_token),
                Some(body),
            )
            .await;
        assert_eq!(status, 201, "{answer}");
    }

    /// Like [`TestApp::call`], with an Idempotency-Key.
    pub async fn call_with_key(
        &self,
        method: reqwest::Method,
        path: &str,
        token: &str,
        key: &str,
        body: Value,
    ) -> (u16, Value, reqwest::header::HeaderMap) {
        let response = self
            .client
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(token)
            .header("Idempotency-Key", key)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        (
            status,
            response.json().await.unwrap_or(Value::Null),
            headers,
        )
    }

    /// Registers (when `register`) and logs in; answers the token reply.
    pub async fn login(&self, username: &str, password: &str, register: bool) -> Value {
        if register {
            let (status, answer, _) = self
                .call(
                    reqwest::Method::POST,
                    "/v1/auth/register",
                    None,
                    Some(serde_json::json!({"username": username, "password": password})),
                )
                .await;
            assert_eq!(status, 201, "{answer}");
        }
        let (status, answer, _) = self
            .call(
                reqwest::Method::POST,
                "/v1/auth/login",
                None,
                Some(serde_json::json!({"username": username, "password": password})),
            )
            .await;
        assert_eq!(status, 200, "{answer}");
        answer
    }
}
