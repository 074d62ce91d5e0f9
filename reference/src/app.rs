//! Building and running the reference system: one of its six services, or
//! all six in one process. One path for all: open what the service needs
//! (shards, bus, stores), start its background work (recovery loop, outbox
//! relay, consumers), serve its routes, shut down gracefully.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::auth::users::{self, MysqlUsers, SqliteUsers, UserStore};
use crate::auth::{AuthConfig, AuthService, Stores};
use crate::events::{BusConfig, EventBus};
use crate::fraud::{FeaturesConfig, FraudConfig, FraudEngine};
use crate::http::AppState;
use crate::ids::ShardId;
use crate::ledger::mysql::{redact, MysqlConfig, MysqlShard};
use crate::ledger::sqlite::{SqliteConfig, SqliteShard};
use crate::ledger::ShardStore;
use crate::manager::{ManagerConfig, ShardManager};
use crate::money::Currency;
use crate::notification::store::{MysqlNotifications, NotificationStore, SqliteNotifications};
use crate::notification::{self, NotifierConfig};
use crate::pipeline::Pipeline;
use crate::sharding::Ring;

pub use crate::peers::{Peers, Service};

/// Pending transfers one recovery pass takes per shard.
pub const RECOVERY_BATCH: u32 = 256;

#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The service this process runs (`All`: the six in one process).
    pub service: Service,
    /// The other services, when this process runs one of six.
    pub peers: Peers,
    pub data_dir: PathBuf,
    pub shards: u32,
    /// Shard stores opened beyond those accounts are placed on: the last
    /// `spare_shards` SQLite files (or MySQL URLs) hold nothing until a
    /// reshard grows the placement into them. A placement saved by a
    /// finished reshard is used over `shards` when the system restarts.
    pub spare_shards: u32,
    /// MySQL/MariaDB shard databases, one URL per shard in shard order.
    /// When set, the shards live there (and `data_dir`, `shards` and
    /// `sqlite` are not used).
    pub mysql_urls: Option<Vec<String>>,
    /// The auth service's users and account owners in this MySQL/MariaDB
    /// database, which every auth replica shares. `None`: database
    /// `shardpay_auth` on the first shard's server when `mysql_urls` is
    /// set, else `auth.sqlite` in `data_dir` (one auth process only).
    pub auth_mysql_url: Option<String>,
    /// The notification service's webhooks, deliveries and dead letters
    /// in this MySQL/MariaDB database, which every notification replica
    /// shares. `None`: database `shardpay_notify` on the first shard's
    /// server when `mysql_urls` is set, else `notify.sqlite` in
    /// `data_dir` (one notification process only).
    pub notification_mysql_url: Option<String>,
    pub mysql: MysqlConfig,
    pub bind: SocketAddr,
    pub sqlite: SqliteConfig,
    pub manager: ManagerConfig,
    pub default_currency: Currency,
    pub recovery_interval: Duration,
    /// Fraud checks before every transfer; `None` turns them off.
    pub fraud: Option<FraudConfig>,
    /// Where the fraud service keeps its features (payer velocity, payees
    /// paid): in memory for one fraud process, Redis or ScyllaDB for
    /// several replicas.
    pub fraud_features: FeaturesConfig,
    /// The event bus the outbox relay publishes to.
    pub bus: BusConfig,
    pub auth: AuthSetup,
    /// Where webhooks may be delivered.
    pub webhooks: crate::notification::WebhookPolicy,
    /// How long published outbox rows are kept before they are pruned
    /// (once the analytics snapshot covers them).
    pub outbox_retention: Duration,
    /// The consumer group the analytics service reads the bus in; each
    /// analytics replica needs its own (see `Pipeline::with_analytics_group`).
    pub analytics_group: String,
    /// How long a graceful shutdown lets running requests and webhook
    /// deliveries finish; deliveries still running then are let go, for
    /// another notification replica or the next start to make.
    pub shutdown_deadline: Duration,
}

/// Whether and how requests are authenticated.
#[derive(Debug, Clone)]
pub enum AuthSetup {
    /// No auth: every caller may do everything. Listens on loopback only.
    Demo,
    On {
        config: AuthConfig,
        /// Sessions, rate limits and idempotency locks on this Redis
        /// (`redis://host:port`); in memory when `None`.
        redis: Option<String>,
        /// Put before every Redis key.
        redis_prefix: String,
        /// Allows the built-in development JWT secret.
        dev: bool,
    },
}

impl ServeConfig {
    /// Defaults for a data directory: 4 shards, loopback port 8006.
    pub fn new(data_dir: impl Into<PathBuf>) -> ServeConfig {
        ServeConfig {
            service: Service::All,
            peers: Peers::default(),
            data_dir: data_dir.into(),
            shards: 4,
            spare_shards: 0,
            mysql_urls: None,
            auth_mysql_url: None,
            notification_mysql_url: None,
            mysql: MysqlConfig::default(),
            bind: SocketAddr::from(([127, 0, 0, 1], 8006)),
            sqlite: SqliteConfig::default(),
            manager: ManagerConfig::default(),
            default_currency: Currency::DEFAULT,
            recovery_interval: Duration::from_millis(500),
            fraud: Some(FraudConfig::default()),
            fraud_features: FeaturesConfig::Memory,
            bus: BusConfig::InProcess,
            auth: AuthSetup::Demo,
            webhooks: Default::default(),
            outbox_retention: crate::events::OUTBOX_RETENTION,
            analytics_group: crate::analytics::ANALYTICS_GROUP.into(),
            shutdown_deadline: DEFAULT_SHUTDOWN_DEADLINE,
        }
    }
}

/// What `ServeConfig::shutdown_deadline` is unless set: inside the ten
/// seconds container runtimes wait after SIGTERM before they kill.
pub const DEFAULT_SHUTDOWN_DEADLINE: Duration = Duration::from_secs(5);

const MANIFEST: &str = "shardpay.json";

/// Opens (creating if needed) the embedded shards in `data_dir`. A data
/// directory remembers its shard count: opening it with another count would
/// route accounts to shards that do not hold them, so that is refused.
pub fn open_embedded(
    data_dir: &Path,
    shards: u32,
    sqlite: &SqliteConfig,
) -> anyhow::Result<Vec<Arc<dyn ShardStore>>> {
    let ring = Ring::new(shards).map_err(|e| anyhow::anyhow!("--shards {shards}: {e}"))?;
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create data directory {}", data_dir.display()))?;
    let manifest = data_dir.join(MANIFEST);
    match std::fs::read_to_string(&manifest) {
        Ok(text) => {
            let found: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not valid JSON", manifest.display()))?;
            let found_shards = found["shards"].as_u64().unwrap_or(0);
            anyhow::ensure!(
                found_shards == shards as u64,
                "data directory {} holds {found_shards} shards; start with --shards {found_shards}, or use another --data-dir for {shards} shards",
                data_dir.display()
            );
        }
        Err(_) => {
            let text = serde_json::json!({ "backend": "sqlite", "shards": shards, "format": 1 });
            std::fs::write(&manifest, format!("{text:#}\n"))
                .with_context(|| format!("cannot write {}", manifest.display()))?;
        }
    }
    ring.shards()
        .map(|shard: ShardId| {
            let store = SqliteShard::open(data_dir, shard, sqlite)?;
            Ok(Arc::new(store) as Arc<dyn ShardStore>)
        })
        .collect()
}

/// Connects to one MySQL/MariaDB database per shard, in shard order, and
/// brings each schema up to date.
pub async fn open_mysql(
    urls: &[String],
    config: &MysqlConfig,
) -> anyhow::Result<Vec<Arc<dyn ShardStore>>> {
    Ring::new(urls.len() as u32)
        .map_err(|e| anyhow::anyhow!("{} MySQL shard URLs: {e}", urls.len()))?;
    let mut stores = Vec::with_capacity(urls.len());
    for (i, url) in urls.iter().enumerate() {
        let shard = ShardId::new(i as u32)?;
        stores.push(
            Arc::new(MysqlShard::connect(url, shard, urls.len() as u32, config).await?)
                as Arc<dyn ShardStore>,
        );
    }
    Ok(stores)
}

/// A built, bound application, not yet serving.
pub struct App {
    pub addr: SocketAddr,
    pub state: AppState,
    listener: tokio::net::TcpListener,
    recovery_interval: Duration,
    shutdown_deadline: Duration,
}

/// What one service of six needs that the all-in-one process does not:
/// shards, a bus and a session store that the other processes share.
fn check_split(config: &ServeConfig) -> anyhow::Result<()> {
    let service = config.service;
    if service == Service::All {
        return Ok(());
    }
    let name = service.name();
    anyhow::ensure!(
        !service.uses_shards() || config.mysql_urls.is_some(),
        "serve {name} shares the shards with the other services: give their MySQL URLs (--mysql-urls; scripts/shards.sh up 4 starts local servers and prints them). SQLite shard files take one writer each, so they serve `serve --all` only"
    );
    anyhow::ensure!(
        !service.uses_bus() || !matches!(config.bus, BusConfig::InProcess),
        "serve {name} exchanges events with the other services: give a Kafka broker (--kafka host:port; scripts/kafka.sh up starts a local one). The in-process bus serves `serve --all` only"
    );
    if let AuthSetup::On { redis: None, .. } = &config.auth {
        anyhow::bail!(
            "serve {name} shares sessions with the other services: give a Redis (--redis redis://host:port; scripts/redis.sh up starts a local one), or run every service with --demo"
        );
    }
    Ok(())
}

/// Opens what the configured service needs (shards, bus, stores) and binds
/// the listener (port 0 picks a free port; the bound address is in
/// `App::addr`).
pub async fn build(config: ServeConfig) -> anyhow::Result<App> {
    check_split(&config)?;
    let service = config.service;
    let split = service != Service::All;
    let shards = if service.uses_shards() {
        Some(match &config.mysql_urls {
            Some(urls) => open_mysql(urls, &config.mysql).await?,
            None => open_embedded(
                &config.data_dir,
                config.shards + config.spare_shards,
                &config.sqlite,
            )?,
        })
    } else {
        None
    };
    let bus = if service.uses_bus() {
        Some(config.bus.connect().await?)
    } else {
        None
    };
    let auth = open_auth(&config).await?;
    let fraud = open_fraud(&config, bus.as_ref(), &auth).await?;
    let (manager, pipeline) = match shards {
        Some(shards) => {
            let pipeline = match bus {
                Some(bus) => Some(open_pipeline(&config, &shards, bus, &auth).await?),
                None => None,
            };
            let manager = open_manager(&config, shards, &fraud)?;
            manager
                .load_placement()
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            (Some(manager), pipeline)
        }
        None => (None, None),
    };
    let listener = tokio::net::TcpListener::bind(config.bind)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {}; is another shardpay running? pick another with --port",
                config.bind
            )
        })?;
    let addr = listener.local_addr()?;
    Ok(App {
        addr,
        state: AppState {
            service,
            peers: split.then(|| config.peers.clone()),
            pipeline,
            manager,
            fraud,
            default_currency: config.default_currency,
            auth,
            metrics: Default::default(),
        },
        listener,
        recovery_interval: config.recovery_interval,
        shutdown_deadline: config.shutdown_deadline,
    })
}

/// Authentication as configured: none in demo mode (loopback only), else
/// the auth service with its users here (the auth service) or remote (the
/// others check tokens with the same secret and sessions).
async fn open_auth(config: &ServeConfig) -> anyhow::Result<Option<Arc<AuthService>>> {
    let (auth_config, redis, redis_prefix, dev) = match &config.auth {
        AuthSetup::Demo => {
            anyhow::ensure!(
                config.bind.ip().is_loopback(),
                "demo mode (no auth) listens on loopback only; bind 127.0.0.1, or turn auth on (leave --demo out and set SHARDPAY_JWT_SECRET)"
            );
            tracing::warn!(
                "DEMO MODE: NO AUTHENTICATION. Anyone who can reach {} may move any money. Loopback only; never expose this.",
                config.bind
            );
            return Ok(None);
        }
        AuthSetup::On {
            config,
            redis,
            redis_prefix,
            dev,
        } => (config, redis, redis_prefix, *dev),
    };
    auth_config.check(dev)?;
    if auth_config.secret == crate::auth::DEV_SECRET {
        tracing::warn!("--dev: the JWT secret is the built-in development one; tokens can be forged by anyone who reads the source");
    }
    let stores = match redis {
        Some(url) => Stores::redis(url, redis_prefix).await?,
        None => Stores::memory(),
    };
    let service = config.service;
    let auth = if service.runs(Service::Auth) {
        let users = open_users(config).await?;
        let auth = AuthService::with_users(auth_config.clone(), users, stores)?;
        auth.bootstrap_admin().await?;
        auth
    } else {
        // Tokens are checked here (same secret, same sessions); account
        // owners are the auth service's to keep.
        AuthService::open(auth_config.clone(), None, stores)?
            .with_remote_owners(config.peers.auth.clone(), service.name())
    };
    Ok(Some(Arc::new(auth)))
}

/// Where the auth service keeps users and account owners: the MySQL
/// database `auth_mysql_url` names, or else `shardpay_auth` beside the
/// first shard, so that every auth replica serves the same users; without
/// MySQL, `auth.sqlite` in the data directory.
async fn open_users(config: &ServeConfig) -> anyhow::Result<Arc<dyn UserStore>> {
    let first_shard = config.mysql_urls.as_ref().and_then(|urls| urls.first());
    let url = match (&config.auth_mysql_url, first_shard) {
        (Some(url), _) => Some(url.clone()),
        (None, Some(shard)) => Some(users::database_beside(shard)?),
        (None, None) => None,
    };
    if let Some(url) = url {
        let users = MysqlUsers::connect(&url, &config.mysql).await?;
        tracing::info!(database = %redact(&url), "auth: users and owners in MySQL");
        return Ok(Arc::new(users));
    }
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data directory {}", config.data_dir.display()))?;
    let path = config.data_dir.join("auth.sqlite");
    Ok(Arc::new(SqliteUsers::open(Some(&path))?))
}

/// The fraud rules: here in the fraud service (publishing decisions to the
/// bus, features in the configured store), a client of the fraud service
/// in a split shard manager.
async fn open_fraud(
    config: &ServeConfig,
    bus: Option<&Arc<dyn EventBus>>,
    auth: &Option<Arc<AuthService>>,
) -> anyhow::Result<Option<Arc<FraudEngine>>> {
    let service = config.service;
    Ok(match &config.fraud {
        None => None,
        Some(rules) if service.runs(Service::Fraud) => {
            rules.check()?;
            if service == Service::Fraud && config.fraud_features == FeaturesConfig::Memory {
                tracing::warn!("fraud features are kept in this process's memory: each fraud replica counts only the attempts it scores; with more than one, use --fraud-features redis (or scylla)");
            }
            let store = config.fraud_features.open().await?;
            let mut engine = FraudEngine::new(rules.clone(), store);
            if let Some(bus) = bus {
                engine = engine.publishing_to(Arc::clone(bus));
            }
            Some(Arc::new(engine))
        }
        Some(_) if service == Service::ShardManager => Some(Arc::new(FraudEngine::remote(
            config.peers.fraud.clone(),
            auth.clone(),
        ))),
        Some(_) => None,
    })
}

/// The outbox relay, the bus and the consumers this service runs.
async fn open_pipeline(
    config: &ServeConfig,
    shards: &[Arc<dyn ShardStore>],
    bus: Arc<dyn EventBus>,
    auth: &Option<Arc<AuthService>>,
) -> anyhow::Result<Arc<Pipeline>> {
    let service = config.service;
    let mut pipeline = Pipeline::with_bus(shards.to_vec(), bus)
        .with_webhooks(config.webhooks)
        .with_auth(auth.clone())
        .with_outbox_retention(config.outbox_retention)
        .with_analytics_group(&config.analytics_group);
    if service.runs(Service::Notification) {
        let notifier = NotifierConfig {
            webhooks: config.webhooks,
            ..NotifierConfig::default()
        };
        pipeline = pipeline.with_notifications(open_notifications(config).await?, notifier);
        if config.webhooks.allow_private {
            tracing::warn!("webhooks may be delivered to loopback and private addresses (--webhooks-to-private-networks): for tests and local receivers only");
        }
    }
    if service != Service::All {
        pipeline = pipeline.for_service(service, config.peers.clone());
    }
    Ok(Arc::new(pipeline))
}

/// Where the notification service keeps webhooks, deliveries and dead
/// letters: the MySQL database `notification_mysql_url` names, or else
/// `shardpay_notify` beside the first shard, so that every notification
/// replica shares them; without MySQL, `notify.sqlite` in the data
/// directory.
async fn open_notifications(config: &ServeConfig) -> anyhow::Result<Arc<dyn NotificationStore>> {
    let first_shard = config.mysql_urls.as_ref().and_then(|urls| urls.first());
    let url = match (&config.notification_mysql_url, first_shard) {
        (Some(url), _) => Some(url.clone()),
        (None, Some(shard)) => Some(notification::store::database_beside(shard)?),
        (None, None) => None,
    };
    if let Some(url) = url {
        let store = MysqlNotifications::connect(&url, &config.mysql).await?;
        tracing::info!(database = %redact(&url), "notification: webhooks and deliveries in MySQL");
        return Ok(Arc::new(store));
    }
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data directory {}", config.data_dir.display()))?;
    let path = config.data_dir.join("notify.sqlite");
    let store = SqliteNotifications::open(Some(&path))
        .with_context(|| format!("cannot open {}", path.display()))?;
    Ok(Arc::new(store))
}

/// The shard manager over `shards`, screening with `fraud` where it moves
/// money.
fn open_manager(
    config: &ServeConfig,
    shards: Vec<Arc<dyn ShardStore>>,
    fraud: &Option<Arc<FraudEngine>>,
) -> anyhow::Result<Arc<ShardManager>> {
    let stores = shards.len() as u32;
    anyhow::ensure!(
        config.spare_shards < stores,
        "--spare-shards {} leaves no shard to place accounts on ({stores} shard stores)",
        config.spare_shards
    );
    let mut manager_config = config.manager.clone();
    manager_config.placed_shards = Some(stores - config.spare_shards);
    let mut manager = ShardManager::new(shards, manager_config)?;
    if config.service.runs(Service::ShardManager) {
        if let Some(engine) = fraud {
            manager = manager.with_fraud(Arc::clone(engine));
        }
    }
    Ok(Arc::new(manager))
}

impl App {
    /// Serves until `shutdown` resolves, then stops accepting and taking
    /// events, lets running requests and webhook deliveries finish until
    /// the shutdown deadline (deliveries still running are let go, for
    /// another replica or the next start), stops the recovery loop and
    /// publishes what is left in the outbox.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let service = self.state.service;
        let recovery = match &self.state.manager {
            Some(manager) if service.runs(Service::Ledger) => Some(tokio::spawn(recovery_loop(
                Arc::clone(manager),
                self.recovery_interval,
            ))),
            _ => None,
        };
        let pipeline = self.state.pipeline.clone();
        let background = match &pipeline {
            Some(p) => p.spawn(RELAY_INTERVAL).await?,
            None => Vec::new(),
        };
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let router = crate::api::router(self.state);
        let mut server = tokio::spawn(serve(self.listener, router, stopped));
        let ended = tokio::select! {
            ended = &mut server => Some(ended),
            () = shutdown => None,
        };
        stop.send_replace(true);
        let deadline = tokio::time::Instant::now() + self.shutdown_deadline;
        let drain = async {
            if let Some(p) = &pipeline {
                p.shutdown(deadline).await;
            }
        };
        let (served, ()) = match ended {
            Some(ended) => (ended.context("HTTP server task")?, drain.await),
            None => tokio::join!(finish_requests(server, deadline), drain),
        };
        if let Some(recovery) = recovery {
            recovery.abort();
        }
        // Analytics rebuilds its totals from the outboxes when it starts:
        // it has nothing to hand back.
        for task in background {
            task.abort();
        }
        // Publish what the last requests wrote (bounded: a shard that is
        // down keeps its rows for the next start).
        if let Some(p) = pipeline.filter(|_| service.runs(Service::Ledger)) {
            for _ in 0..20 {
                if p.relay.relay_once().await == 0 {
                    break;
                }
            }
        }
        served.context("HTTP server failed")
    }
}

/// Serves `router` until `stopped` turns true, then lets running requests
/// finish.
async fn serve(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move {
        let _ = stopped.wait_for(|s| *s).await;
    })
    .await
}

/// Waits for the server's running requests until `deadline`, then cuts
/// those still running.
async fn finish_requests(
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    deadline: tokio::time::Instant,
) -> std::io::Result<()> {
    let abort = server.abort_handle();
    match tokio::time::timeout_at(deadline, server).await {
        Ok(Ok(served)) => served,
        Ok(Err(joined)) => Err(std::io::Error::other(joined)),
        Err(_) => {
            abort.abort();
            tracing::warn!("requests still running at the shutdown deadline were cut off");
            Ok(())
        }
    }
}

/// How often an idle outbox relay looks for new rows.
pub const RELAY_INTERVAL: Duration = Duration::from_millis(20);

/// Drives pending cross-shard transfers to an end, forever.
pub async fn recovery_loop(manager: Arc<ShardManager>, interval: Duration) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        // A placement another shard manager switched to (its reshard).
        if let Err(error) = manager.refresh_placement().await {
            tracing::warn!(%error, "the placement on shard 0 could not be read");
        }
        let finished = manager.recover_once(RECOVERY_BATCH).await;
        if finished > 0 {
            tracing::info!(finished, "recovery finished pending transfers");
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
}
