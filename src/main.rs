//! `shardpay`: load-testing and simulation harness for sharded payment
//! systems. This binary runs scenarios against the reference payment system
//! (or any target), compares runs, serves the reference system and audits it.

mod config;
mod simulate;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use serde::{Deserialize, Serialize};
use shardpay_reference::app::{self, AuthSetup, Peers, ServeConfig, Service};
use shardpay_reference::auth::{AuthConfig, Limit};
use shardpay_reference::events::kafka::KafkaConfig;
use shardpay_reference::events::BusConfig;
use shardpay_reference::fraud::scylla::ScyllaConfig;
use shardpay_reference::fraud::{FeaturesConfig, FraudConfig};
use shardpay_reference::ledger::sqlite::{Durability, SqliteConfig};
use shardpay_reference::manager::{CrossShard, Fault, ManagerConfig, ShardManager};
use shardpay_reference::money::Currency;
use shardpay_reference::peers::Replicas;
use shardpay_reference::sharding::Strategy;

#[derive(Parser)]
#[command(
    name = "shardpay",
    version,
    about = "Load-testing and simulation harness for sharded payment systems",
    long_about = "Load-testing and simulation harness for sharded payment systems, with a \
reference payment system to drive.\n\nQuick start:\n  shardpay run scenarios/mixed.toml     # drive the in-process reference system, audit, report\n  shardpay run scenarios/smoke.toml --target http://127.0.0.1:8006\n  shardpay sweep scenarios/cross-shard.toml --shards 1,2,4\n  shardpay compare reports/A reports/B\n  shardpay serve --demo     # the reference system on http://127.0.0.1:8006, 4 shards in ./data, no auth\n  shardpay audit            # prove no money was created, lost or paid twice"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log lines as text for people (pretty) or one JSON object per line
    /// for log collectors (json). Each request's lines carry its
    /// request_id (the x-request-id header, echoed back).
    #[arg(
        long,
        global = true,
        env = "SHARDPAY_LOG_FORMAT",
        value_enum,
        default_value = "pretty"
    )]
    log_format: LogFormat,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
enum LogFormat {
    Pretty,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run a scenario and report on it (start here)
    ///
    /// Creates the scenario's accounts, drives its traffic (goose), measures
    /// latency per kind and shard in microseconds, settles and checks the
    /// simulator's books, runs the system's audit, and writes
    /// reports/<scenario>-<time>/report.json, report.html and summary.txt.
    /// Without --target the reference system runs in-process on SQLite shard
    /// files. Exit status: 0 passed, 1 a threshold or the audit failed (the
    /// summary says which), 2 an error (such as a malformed scenario).
    Run(simulate::RunArgs),
    /// Run a scenario once per shard count and compare the runs
    ///
    /// Each run uses the in-process reference system with that many shards;
    /// the comparison (compare.md, compare.json) gives scaling efficiency.
    Sweep(simulate::SweepArgs),
    /// Compare reports side by side
    ///
    /// Throughput, latency percentiles per kind, errors and audit verdicts;
    /// scaling efficiency against the report with the fewest shards when the
    /// shard counts differ.
    Compare(simulate::CompareArgs),
    /// Merge reports of runs that drove one system at once (several load
    /// machines) into one
    ///
    /// Histograms merge exactly (they are stored losslessly), counts and
    /// timelines add up, and the scenario's thresholds are judged again.
    Merge(simulate::MergeArgs),
    /// Measure the storage's own limit: the transfer transactions sent
    /// straight to the shards, no HTTP, no services
    ///
    /// On SQLite (the default): fresh shard files with the system's schema,
    /// written by the system's writer thread and group commit. On MySQL
    /// (--backend mysql): databases beside the shards', through sqlx.
    /// Same-shard: one transaction per transfer; cross-shard: the saga's
    /// three; cross-shard-xa: two prepared branches. Compare its
    /// transfers/s with a run's to see how close the services come to what
    /// the storage can do; `shardpay bench` does both and compares.
    Baseline(simulate::BaselineArgs),
    /// The full path against the storage ceiling, side by side
    ///
    /// For each scenario (same-shard and cross-shard by default): the raw
    /// baseline of its kind of transfer on the same storage, then the
    /// scenario through the in-process system (HTTP, auth, idempotency
    /// keys, fraud, the outbox) at the same concurrency. Writes
    /// reports/bench-<time>/bench.md and bench.json with the ratios and
    /// each run's report beside them. Example: shardpay bench --backend mysql
    Bench(simulate::BenchArgs),
    /// Serve the reference payment system: all six services in one process
    /// (the default), or one service of six
    ///
    /// `shardpay serve` (or `serve --all`) runs the six services in this
    /// process on port 8006, on SQLite shard files in --data-dir, with an
    /// in-process event bus. `shardpay serve <SERVICE>` runs one service as
    /// its own process, on its own port (auth 8001, ledger 8002, fraud
    /// 8003, notification 8004, analytics 8005, shard-manager 8006); the
    /// six then share MySQL shards (--mysql-urls), a Kafka broker (--kafka)
    /// and, with auth on, Redis (--redis), and call each other at
    /// --auth-url, --fraud-url, --ledger-url and --notification-url.
    /// scripts/stack.sh up starts all six on local servers.
    Serve(ServeArgs),
    /// Audit the ledger: entries sum to zero on every shard, all balances
    /// plus money in flight equal the total funded, no negative balance,
    /// every transfer's entries exactly once, no stale pending transfer.
    /// Exits 1 when a check fails.
    Audit(AuditArgs),
    /// Grow or shrink a running system's shards while traffic runs
    ///
    /// Asks the shard manager at --url to place accounts over --to shards
    /// and follows the move until the new placement is in force: accounts
    /// whose home changes move batch by batch (their balance, through the
    /// in-flight accounts, and their idempotency records), requests on a
    /// moving account wait at most 3 s (then 503 account_moving, retry),
    /// and a write that reaches an account's old home is refused. The
    /// system must have the shard stores to grow into: start it with
    /// --spare-shards. Example: shardpay serve --demo --spare-shards 1, then
    /// shardpay reshard --to 5
    Reshard(ReshardArgs),
    /// The notification service's dead-letter store: webhook deliveries
    /// that failed every attempt
    ///
    /// `dlq list` shows them; `dlq replay --all` (or `--id ID`) delivers
    /// them again, once each. A delivery that already reached its webhook
    /// is recognised and not sent twice.
    #[command(subcommand)]
    Dlq(DlqCommand),
}

#[derive(clap::Subcommand)]
enum DlqCommand {
    /// List the dead letters.
    List {
        /// URL of a running shard manager.
        #[arg(long, env = "SHARDPAY_URL", default_value = "http://127.0.0.1:8006")]
        url: String,
    },
    /// Deliver dead letters again.
    Replay {
        /// Dead-letter ids (from `dlq list`); repeat for several.
        #[arg(long = "id", required_unless_present = "all", conflicts_with = "all")]
        ids: Vec<String>,
        /// Every dead letter.
        #[arg(long)]
        all: bool,
        #[arg(long, env = "SHARDPAY_URL", default_value = "http://127.0.0.1:8006")]
        url: String,
    },
}

/// `serve`'s SERVICE argument: the names `Service` knows.
fn service_names() -> clap::builder::PossibleValuesParser {
    clap::builder::PossibleValuesParser::new(Service::SPLIT.map(Service::name))
}

/// `service` in a config file: one of the names `Service` knows, as on the
/// command line.
fn service_name<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<String>, D::Error> {
    let name = Option::<String>::deserialize(deserializer)?;
    match name.as_deref().map(Service::parse) {
        Some(None) => Err(serde::de::Error::custom(format!(
            "invalid value {:?}; possible values: {}",
            name.unwrap_or_default(),
            Service::SPLIT.map(Service::name).join(", ")
        ))),
        _ => Ok(name),
    }
}

/// The serve options. clap parses them from the command line and the
/// environment; serde moves them through the layers of `serve --config`
/// (config.rs), under the same names (ValueEnums in kebab-case, as clap).
#[derive(clap::Args, Serialize, Deserialize)]
struct ServeArgs {
    /// The one service to run (leave out, or give --all, for all six in
    /// this process).
    #[arg(value_parser = service_names(), env = "SHARDPAY_SERVICE", conflicts_with = "all")]
    #[serde(deserialize_with = "service_name")]
    service: Option<String>,
    /// All six services in this process (the default).
    #[arg(long)]
    all: bool,
    /// A TOML file of these options: each key is an option's long name
    /// (`data_dir = "data"`, `mysql_urls = ["mysql://...", ...]`). The
    /// command line wins over the environment, which wins over the file.
    /// docs/configuration.md lists every key with its default.
    #[arg(long, env = "SHARDPAY_CONFIG")]
    config: Option<PathBuf>,
    /// Where the auth service answers (split deployment): a URL, or
    /// the URLs of its replicas separated by commas (called in turn).
    #[arg(
        long,
        env = "SHARDPAY_AUTH_URL",
        default_value = "http://127.0.0.1:8001"
    )]
    auth_url: String,
    /// Where the ledger service answers (split deployment): a URL, or
    /// the URLs of its replicas separated by commas (called in turn).
    #[arg(
        long,
        env = "SHARDPAY_LEDGER_URL",
        default_value = "http://127.0.0.1:8002"
    )]
    ledger_url: String,
    /// Where the fraud service answers (split deployment): a URL, or
    /// the URLs of its replicas separated by commas (called in turn).
    #[arg(
        long,
        env = "SHARDPAY_FRAUD_URL",
        default_value = "http://127.0.0.1:8003"
    )]
    fraud_url: String,
    /// Where the notification service answers (split deployment): a URL, or
    /// the URLs of its replicas separated by commas (called in turn).
    #[arg(
        long,
        env = "SHARDPAY_NOTIFICATION_URL",
        default_value = "http://127.0.0.1:8004"
    )]
    notification_url: String,
    /// Directory holding the shard files (created if missing), and the
    /// auth and notification services' stores when they are not in MySQL.
    #[arg(long, env = "SHARDPAY_DATA_DIR", default_value = "data")]
    data_dir: PathBuf,
    /// Keep the shards in these MySQL/MariaDB databases instead of SQLite
    /// files: one URL per shard, in shard order, comma separated
    /// (mysql://user:password@host:port/database). scripts/shards.sh up N
    /// starts local servers and prints the URLs.
    #[arg(long, env = "SHARDPAY_MYSQL_URLS", value_delimiter = ',')]
    mysql_urls: Vec<String>,
    /// Keep the auth service's users and account owners in this
    /// MySQL/MariaDB database (mysql://user:password@host:port/database;
    /// created, with its tables, if missing), which every auth replica
    /// shares. Default: with --mysql-urls, database shardpay_auth on the
    /// first shard's server; without, auth.sqlite in --data-dir, which
    /// serves one auth process only.
    #[arg(long, env = "SHARDPAY_AUTH_MYSQL_URL", hide_env_values = true)]
    auth_mysql_url: Option<String>,
    /// Keep the notification service's webhooks, deliveries and dead
    /// letters in this MySQL/MariaDB database
    /// (mysql://user:password@host:port/database; created, with its
    /// tables, if missing), which every notification replica shares.
    /// Default: with --mysql-urls, database shardpay_notify on the first
    /// shard's server; without, notify.sqlite in --data-dir, which serves
    /// one notification process only.
    #[arg(long, env = "SHARDPAY_NOTIFICATION_MYSQL_URL", hide_env_values = true)]
    notification_mysql_url: Option<String>,
    /// The Kafka consumer group the analytics service reads events in.
    /// Every analytics replica keeps whole totals of its own, so give each
    /// replica its own group (analytics-1, analytics-2, ...): replicas in
    /// one group would split the events between them. A replica keeps its
    /// group across restarts, so it goes on where it left off.
    #[arg(long, env = "SHARDPAY_ANALYTICS_GROUP", default_value = "analytics")]
    analytics_group: String,
    /// On SIGTERM or Ctrl-C, how long running requests and webhook
    /// deliveries may finish, in ms; deliveries still running then are
    /// let go, for another notification replica or the next start.
    #[arg(long, env = "SHARDPAY_SHUTDOWN_DEADLINE_MS", default_value_t = 5_000)]
    shutdown_deadline_ms: u64,
    /// Connections per MySQL shard: the most transactions one shard runs
    /// at once.
    #[arg(long, env = "SHARDPAY_MYSQL_POOL_SIZE", default_value_t = 16)]
    mysql_pool_size: u32,
    /// How long a request waits for a MySQL shard connection before the
    /// shard answers unavailable (503), in ms. Also how long a request
    /// waits on a shard server that is down.
    #[arg(
        long,
        env = "SHARDPAY_MYSQL_ACQUIRE_TIMEOUT_MS",
        default_value_t = 2_000
    )]
    mysql_acquire_timeout_ms: u64,
    /// Number of shards, 1 to 64. A data directory keeps the count it was
    /// created with.
    #[arg(long, env = "SHARDPAY_SHARDS", default_value_t = 4)]
    shards: u32,
    /// Shard stores opened beyond --shards, holding nothing until
    /// `shardpay reshard` grows the placement into them (SQLite: more
    /// files; MySQL: the last URLs of --mysql-urls). After a reshard the
    /// placement saved on shard 0 is used.
    #[arg(long, env = "SHARDPAY_SPARE_SHARDS", default_value_t = 0)]
    spare_shards: u32,
    /// How account ids map to shards: jump (jump consistent hash) or modulo
    /// (hash % n, as the modelled system does). A placement saved by a
    /// reshard wins.
    #[arg(long, env = "SHARDPAY_PLACEMENT", value_enum, default_value = "jump")]
    placement: PlacementArg,
    /// Address to listen on. Use 0.0.0.0 to accept other machines.
    #[arg(long, env = "SHARDPAY_BIND", default_value = "127.0.0.1")]
    bind: IpAddr,
    /// Port to listen on (0 picks a free one and prints it). Default: the
    /// service's own (8001-8006; 8006 for all six in one process).
    #[arg(long, env = "SHARDPAY_PORT")]
    port: Option<u16>,
    /// Currency of accounts and transfers that name none (ISO code).
    #[arg(long, env = "SHARDPAY_CURRENCY", default_value = "INR")]
    currency: String,
    /// full: a commit survives power loss; normal: faster, survives a
    /// process crash but may lose the last commits on power loss.
    #[arg(long, env = "SHARDPAY_DURABILITY", value_enum, default_value = "full")]
    durability: DurabilityArg,
    /// How long idempotency keys are remembered, in seconds.
    #[arg(long, env = "SHARDPAY_IDEMPOTENCY_TTL_S", default_value_t = 86_400)]
    idempotency_ttl_s: u64,
    /// How often the recovery loop looks for pending transfers, in ms.
    #[arg(long, env = "SHARDPAY_RECOVERY_INTERVAL_MS", default_value_t = 500)]
    recovery_interval_ms: u64,
    /// How long published outbox rows are kept before they are pruned, in seconds (a row is pruned only once the analytics snapshot covers it)
    #[arg(long, env = "SHARDPAY_OUTBOX_RETENTION_S", default_value_t = 300)]
    outbox_retention_s: u64,
    /// Age before recovery takes over a pending transfer from its request, ms.
    #[arg(long, env = "SHARDPAY_RECOVERY_GRACE_MS", default_value_t = 2_000)]
    recovery_grace_ms: u64,
    /// A pending transfer older than this fails the audit, in seconds.
    #[arg(long, env = "SHARDPAY_RECOVERY_DEADLINE_S", default_value_t = 60)]
    recovery_deadline_s: u64,
    /// How a cross-shard transfer is made atomic. saga: local transactions
    /// with compensation, answered 202 while a shard is down (any backend).
    /// xa: XA two-phase commit with a durable decision on the payer's shard;
    /// never pending, refused with 503 while a shard is down (MySQL only).
    #[arg(long, env = "SHARDPAY_CROSS_SHARD", value_enum, default_value = "saga")]
    cross_shard: CrossShardArg,
    /// Fraud checks before every transfer (allow / review / block): on or
    /// off. Blocked transfers are refused with 403 transfer_blocked.
    #[arg(long, env = "SHARDPAY_FRAUD", value_enum, default_value = "on")]
    fraud: OnOff,
    /// TOML file of fraud thresholds (keys of the fraud rules in
    /// ARCHITECTURE.md; keys left out keep their defaults).
    #[arg(long, env = "SHARDPAY_FRAUD_RULES")]
    fraud_rules: Option<PathBuf>,
    /// Where the fraud service keeps its features (each payer's transfers
    /// in the velocity window, the payees it paid): memory, redis or scylla.
    ///
    /// memory: in the fraud process; right for `serve` (all six in one
    /// process) or a single `serve fraud`. With several `serve fraud`
    /// replicas each would count only the transfers it scored, so a payer
    /// spreading a burst over them would escape the velocity rules.
    /// redis: in the Redis of --redis (or --fraud-redis-url), shared by
    /// every replica, each attempt counted atomically; choose it when you
    /// run several fraud replicas and already give --redis. scylla: in
    /// ScyllaDB or Cassandra (--scylla-uri), shared and kept across
    /// restarts, without per-payer atomicity (two attempts of one payer at
    /// the same instant may both count each other; never fewer reviews).
    #[arg(
        long,
        env = "SHARDPAY_FRAUD_FEATURES",
        value_enum,
        default_value = "memory"
    )]
    fraud_features: FeaturesArg,
    /// The Redis of --fraud-features redis (redis://host:port). Default:
    /// the one of --redis; keys go under --redis-prefix.
    #[arg(long, env = "SHARDPAY_FRAUD_REDIS_URL")]
    fraud_redis_url: Option<String>,
    /// ScyllaDB (or Cassandra) nodes of --fraud-features scylla: host:port,
    /// comma separated (the driver finds the rest of the cluster).
    #[arg(long, env = "SHARDPAY_SCYLLA_URI", value_delimiter = ',')]
    scylla_uri: Vec<String>,
    /// Keyspace of the fraud features in ScyllaDB, created at start if
    /// missing (with the tables fraud_attempts and fraud_attempts_payees).
    #[arg(long, env = "SHARDPAY_SCYLLA_KEYSPACE", default_value = "shardpay")]
    scylla_keyspace: String,
    /// Replication factor of that keyspace, used only when shardpay creates
    /// it (1 for a single node; 3 for a production cluster).
    #[arg(long, env = "SHARDPAY_SCYLLA_REPLICATION_FACTOR", default_value_t = 1)]
    scylla_replication_factor: u32,
    /// Publish events to this Kafka-protocol broker (host:port, comma
    /// separated for several) instead of the in-process bus.
    /// scripts/kafka.sh up starts a local one and prints its address.
    #[arg(long, env = "SHARDPAY_KAFKA_BOOTSTRAP")]
    kafka: Option<String>,
    /// Put this before every Kafka topic and consumer group name, so that
    /// several systems can share one broker.
    #[arg(long, env = "SHARDPAY_KAFKA_PREFIX", default_value = "")]
    kafka_prefix: String,
    /// Deliver webhooks to loopback and private addresses too (a receiver
    /// on this machine or its network). Off by default, so that a webhook
    /// cannot reach this machine's own services; for tests and local
    /// receivers only, and the server says so at start.
    #[arg(long, env = "SHARDPAY_WEBHOOKS_TO_PRIVATE_NETWORKS")]
    webhooks_to_private_networks: bool,
    #[command(flatten)]
    #[serde(flatten)]
    auth: AuthArgs,
}

#[derive(clap::Args, Serialize, Deserialize)]
struct AuthArgs {
    /// Demo mode: no authentication at all, for the walkthrough on your own
    /// machine. Listens on loopback only and says so loudly.
    #[arg(long, env = "SHARDPAY_DEMO")]
    demo: bool,
    /// HMAC key of the access tokens (JWT, HS256), 32+ characters. Required
    /// unless --demo or --dev. Example: SHARDPAY_JWT_SECRET=$(openssl rand -hex 32)
    #[arg(long, env = "SHARDPAY_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
    /// Development: without --jwt-secret, use a built-in secret (anyone who
    /// reads the source can forge tokens; never in production).
    #[arg(long, env = "SHARDPAY_DEV")]
    dev: bool,
    /// Keep sessions, rate limits and idempotency locks in this Redis
    /// (redis://host:port) instead of in memory.
    #[arg(long, env = "SHARDPAY_REDIS_URL")]
    redis: Option<String>,
    /// Put this before every Redis key.
    #[arg(long, env = "SHARDPAY_REDIS_PREFIX", default_value = "shardpay:")]
    redis_prefix: String,
    /// Create (or reset) the user `admin` with this password at start.
    #[arg(long, env = "SHARDPAY_ADMIN_PASSWORD", hide_env_values = true)]
    admin_password: Option<String>,
    /// Access-token lifetime, seconds.
    #[arg(long, env = "SHARDPAY_ACCESS_TTL_S", default_value_t = 900)]
    access_ttl_s: u64,
    /// Argon2id memory per password hash, KiB (OWASP: 19456). Lower only
    /// for load tests that log in many users.
    #[arg(long, env = "SHARDPAY_ARGON2_MEMORY_KIB", default_value_t = 19_456)]
    argon2_memory_kib: u32,
    /// Argon2id passes (OWASP: 2).
    #[arg(long, env = "SHARDPAY_ARGON2_ITERATIONS", default_value_t = 2)]
    argon2_iterations: u32,
    /// Login attempts per username per minute (0: no limit).
    #[arg(long, env = "SHARDPAY_LOGIN_LIMIT_PER_USER", default_value_t = 5)]
    login_limit_per_user: u64,
    /// Login attempts per client address per minute (0: no limit).
    #[arg(long, env = "SHARDPAY_LOGIN_LIMIT_PER_ADDRESS", default_value_t = 20)]
    login_limit_per_address: u64,
    /// Registrations per client address per minute, admins' excepted (0:
    /// no limit). Each one costs a password hash.
    #[arg(
        long,
        env = "SHARDPAY_REGISTER_LIMIT_PER_ADDRESS",
        default_value_t = 10
    )]
    register_limit_per_address: u64,
    /// Transfers per payer account per second (0: no limit).
    #[arg(long, env = "SHARDPAY_TRANSFER_LIMIT_PER_PAYER", default_value_t = 0)]
    transfer_limit_per_payer: u64,
}

impl AuthArgs {
    fn setup(&self) -> anyhow::Result<AuthSetup> {
        if self.demo {
            return Ok(AuthSetup::Demo);
        }
        let secret = match (&self.jwt_secret, self.dev) {
            (Some(s), _) => s.clone(),
            (None, true) => shardpay_reference::auth::DEV_SECRET.to_string(),
            (None, false) => anyhow::bail!(
                "auth is on and no JWT secret is set: set SHARDPAY_JWT_SECRET (32+ characters, e.g. $(openssl rand -hex 32)), or pass --dev on your own machine, or --demo for no auth on loopback"
            ),
        };
        let minute = Duration::from_secs(60);
        let mut config = AuthConfig::new(secret);
        config.access_ttl = Duration::from_secs(self.access_ttl_s.max(1));
        config.argon2_memory_kib = self.argon2_memory_kib;
        config.argon2_iterations = self.argon2_iterations;
        config.login_per_user = Limit {
            max: self.login_limit_per_user,
            window: minute,
        };
        config.login_per_address = Limit {
            max: self.login_limit_per_address,
            window: minute,
        };
        config.register_per_address = Limit {
            max: self.register_limit_per_address,
            window: minute,
        };
        config.transfers_per_payer = Limit {
            max: self.transfer_limit_per_payer,
            window: Duration::from_secs(1),
        };
        config.admin_password = self.admin_password.clone();
        Ok(AuthSetup::On {
            config,
            redis: self.redis.clone(),
            redis_prefix: self.redis_prefix.clone(),
            dev: self.dev,
        })
    }
}

/// The bus the `--kafka` and `--kafka-prefix` flags name.
pub fn bus_config(kafka: Option<&str>, prefix: &str) -> BusConfig {
    match kafka {
        None | Some("") => BusConfig::InProcess,
        Some(bootstrap) => BusConfig::Kafka(KafkaConfig {
            prefix: prefix.to_string(),
            ..KafkaConfig::new(bootstrap)
        }),
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnOff {
    On,
    Off,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FeaturesArg {
    Memory,
    Redis,
    Scylla,
}

impl ServeArgs {
    /// The fraud feature store the options name, for a process that runs
    /// the fraud rules (the others keep none).
    fn fraud_features(&self, service: Service) -> anyhow::Result<FeaturesConfig> {
        if !service.runs(Service::Fraud) {
            return Ok(FeaturesConfig::Memory);
        }
        Ok(match self.fraud_features {
            FeaturesArg::Memory => FeaturesConfig::Memory,
            FeaturesArg::Redis => {
                let url = [&self.fraud_redis_url, &self.auth.redis]
                    .into_iter()
                    .flatten()
                    .find(|url| !url.is_empty())
                    .ok_or_else(|| anyhow::anyhow!(
                        "--fraud-features redis needs a Redis: give --redis redis://host:port (or --fraud-redis-url); scripts/redis.sh up starts a local one"
                    ))?;
                FeaturesConfig::Redis {
                    url: url.clone(),
                    prefix: self.auth.redis_prefix.clone(),
                }
            }
            FeaturesArg::Scylla => {
                anyhow::ensure!(
                    !self.scylla_uri.is_empty(),
                    "--fraud-features scylla needs a ScyllaDB node: give --scylla-uri host:9042 (SHARDPAY_SCYLLA_URI); `docker compose --profile scylla up -d scylla` starts one"
                );
                FeaturesConfig::Scylla(ScyllaConfig {
                    keyspace: self.scylla_keyspace.clone(),
                    replication_factor: self.scylla_replication_factor,
                    ..ScyllaConfig::new(self.scylla_uri.clone())
                })
            }
        })
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PlacementArg {
    Jump,
    Modulo,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CrossShardArg {
    Saga,
    Xa,
}

impl From<CrossShardArg> for CrossShard {
    fn from(arg: CrossShardArg) -> CrossShard {
        match arg {
            CrossShardArg::Saga => CrossShard::Saga,
            CrossShardArg::Xa => CrossShard::Xa,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DurabilityArg {
    Full,
    Normal,
}

#[derive(clap::Args)]
struct ReshardArgs {
    /// The shard count to place accounts over.
    #[arg(long)]
    to: u32,
    /// How account ids map to shards: jump (jump consistent hash: growing
    /// by one moves about 1/(n+1) of accounts) or modulo (hash % n, as the
    /// modelled system does: growing by one moves about n/(n+1)). Default:
    /// the placement in force.
    #[arg(long, value_parser = ["jump", "modulo"])]
    strategy: Option<String>,
    /// URL of a running shard manager.
    #[arg(long, env = "SHARDPAY_URL", default_value = "http://127.0.0.1:8006")]
    url: String,
    /// An admin's access token (not needed with serve --demo).
    #[arg(long, env = "SHARDPAY_TOKEN")]
    token: Option<String>,
}

#[derive(clap::Args)]
struct AuditArgs {
    /// URL of a running shard manager.
    #[arg(long, env = "SHARDPAY_URL", default_value = "http://127.0.0.1:8006")]
    url: String,
    /// Audit the shard files in this directory directly instead of asking a
    /// running server (stop the server first for an exact snapshot).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// The command line, with `serve`'s options layered over its config file.
fn parse_cli() -> anyhow::Result<Cli> {
    let mut command = Cli::command();
    let matches = command.get_matches_mut();
    let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if let (Command::Serve(args), Some(("serve", given))) = (&mut cli.command, matches.subcommand())
    {
        let serve = command
            .find_subcommand("serve")
            .expect("the serve command exists");
        config::layer(args, serve, given)?;
    }
    Ok(cli)
}

fn main() -> anyhow::Result<()> {
    let cli = parse_cli().unwrap_or_else(|e| {
        eprintln!("error: {e:#}");
        std::process::exit(2)
    });
    // The server logs its work; the simulator's commands keep the terminal
    // for progress and show only warnings (RUST_LOG overrides both).
    let default_filter = match cli.command {
        Command::Serve(_) => "info",
        _ => "warn",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| default_filter.into());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Pretty => logs.init(),
        LogFormat::Json => logs.json().with_current_span(true).init(),
    }
    let runtime = tokio::runtime::Runtime::new()?;
    let passed = |result: anyhow::Result<bool>| -> anyhow::Result<()> {
        // 1: the run finished but failed a threshold; errors exit 2.
        match result {
            Ok(true) => Ok(()),
            Ok(false) => std::process::exit(1),
            Err(e) => {
                eprintln!("error: {e:#}");
                std::process::exit(2)
            }
        }
    };
    match cli.command {
        Command::Run(args) => passed(runtime.block_on(simulate::run(args))),
        Command::Sweep(args) => passed(runtime.block_on(simulate::sweep(args))),
        Command::Compare(args) => simulate::compare(args),
        Command::Merge(args) => passed(simulate::merge(args)),
        Command::Baseline(args) => runtime.block_on(simulate::baseline(args)),
        Command::Bench(args) => passed(runtime.block_on(simulate::bench(args))),
        Command::Serve(args) => runtime.block_on(serve(args)),
        Command::Dlq(command) => runtime.block_on(dlq(command)),
        Command::Reshard(args) => {
            if let Err(e) = runtime.block_on(reshard(args)) {
                eprintln!("error: {e:#}");
                std::process::exit(2);
            }
            Ok(())
        }
        Command::Audit(args) => {
            let ok = runtime.block_on(audit(args))?;
            std::process::exit(if ok { 0 } else { 1 });
        }
    }
}

/// `--analytics-group`, checked: a Kafka group id of letters, digits and
/// `.`, `_`, `-`, as topic names are.
fn analytics_group(group: &str) -> anyhow::Result<String> {
    let fine = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if group.is_empty() || group.len() > 200 || !group.chars().all(fine) {
        anyhow::bail!(
            "--analytics-group {group:?}: give 1 to 200 letters, digits, '.', '_' or '-' (for example analytics-2)"
        );
    }
    Ok(group.to_string())
}

/// A peer option's list of replica URLs, or why it cannot be used.
fn peer_list(option: &str, list: &str) -> anyhow::Result<Replicas> {
    Replicas::parse(list).map_err(|e| anyhow::anyhow!("{option} {list:?}: {e}"))
}

impl ServeArgs {
    /// What the reference system is built from.
    fn serve_config(&self, fault: Option<Fault>) -> anyhow::Result<ServeConfig> {
        let service = match &self.service {
            // --all on the command line wins over a config file's service
            // (clap refuses both on the command line or in the environment).
            Some(name) if !self.all => {
                Service::parse(name).expect("clap and the config file accept only service names")
            }
            _ => Service::All,
        };
        Ok(ServeConfig {
            service,
            peers: Peers {
                auth: peer_list("--auth-url", &self.auth_url)?,
                ledger: peer_list("--ledger-url", &self.ledger_url)?,
                fraud: peer_list("--fraud-url", &self.fraud_url)?,
                notification: peer_list("--notification-url", &self.notification_url)?,
            },
            data_dir: self.data_dir.clone(),
            shards: self.shards,
            spare_shards: self.spare_shards,
            mysql_urls: (!self.mysql_urls.is_empty()).then(|| self.mysql_urls.clone()),
            auth_mysql_url: self.auth_mysql_url.clone().filter(|url| !url.is_empty()),
            notification_mysql_url: self
                .notification_mysql_url
                .clone()
                .filter(|url| !url.is_empty()),
            mysql: shardpay_reference::ledger::mysql::MysqlConfig {
                pool_size: self.mysql_pool_size,
                acquire_timeout: Duration::from_millis(self.mysql_acquire_timeout_ms.max(50)),
            },
            bind: SocketAddr::new(self.bind, self.port.unwrap_or(service.default_port())),
            sqlite: SqliteConfig {
                durability: match self.durability {
                    DurabilityArg::Full => Durability::Full,
                    DurabilityArg::Normal => Durability::Normal,
                },
                ..SqliteConfig::default()
            },
            manager: ManagerConfig {
                idempotency_ttl_ms: self.idempotency_ttl_s as i64 * 1000,
                recovery_grace_ms: self.recovery_grace_ms as i64,
                recovery_deadline_ms: self.recovery_deadline_s as i64 * 1000,
                cross_shard: self.cross_shard.into(),
                fault,
                broken_recovery: broken_recovery(),
                strategy: match self.placement {
                    PlacementArg::Jump => Strategy::Jump,
                    PlacementArg::Modulo => Strategy::Modulo,
                },
                broken_switch: std::env::var_os("SHARDPAY_TEST_BROKEN_SWITCH").is_some(),
                ..ManagerConfig::default()
            },
            default_currency: Currency::parse(&self.currency)
                .map_err(|e| anyhow::anyhow!("--currency: {e}"))?,
            recovery_interval: Duration::from_millis(self.recovery_interval_ms.max(10)),
            fraud: match (self.fraud, &self.fraud_rules) {
                (OnOff::Off, _) => None,
                (OnOff::On, None) => Some(FraudConfig::default()),
                (OnOff::On, Some(path)) => Some(FraudConfig::load(path)?),
            },
            fraud_features: self.fraud_features(service)?,
            bus: bus_config(self.kafka.as_deref(), &self.kafka_prefix),
            auth: self.auth.setup()?,
            webhooks: shardpay_reference::notification::WebhookPolicy {
                allow_private: self.webhooks_to_private_networks,
            },
            outbox_retention: Duration::from_secs(self.outbox_retention_s),
            analytics_group: analytics_group(&self.analytics_group)?,
            shutdown_deadline: Duration::from_millis(self.shutdown_deadline_ms),
        })
    }
}

/// The test hook of a recovery broken on purpose (`ManagerConfig::
/// broken_recovery`), for the tests that show a run fails on it.
fn broken_recovery() -> bool {
    let broken = std::env::var_os("SHARDPAY_TEST_BROKEN_RECOVERY").is_some();
    if broken {
        tracing::error!("BROKEN RECOVERY ENABLED (test hook): transfers left pending will be completed without their credit");
    }
    broken
}

/// Leaves the fault hook disarmed until the process gets SIGUSR1; SIGUSR2
/// disarms it again (a scheduled fault whose time ran out unfired).
fn arm_fault_on_sigusr1() -> anyhow::Result<()> {
    use shardpay_reference::manager::FAULT_ARMED;
    FAULT_ARMED.store(false, std::sync::atomic::Ordering::Relaxed);
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut arm = signal(SignalKind::user_defined1()).context("cannot listen for SIGUSR1")?;
        let mut disarm =
            signal(SignalKind::user_defined2()).context("cannot listen for SIGUSR2")?;
        tokio::spawn(async move {
            loop {
                let armed = tokio::select! {
                    Some(()) = arm.recv() => true,
                    Some(()) = disarm.recv() => false,
                    else => break,
                };
                tracing::warn!(
                    armed,
                    "fault hook {} by signal",
                    if armed { "armed" } else { "disarmed" }
                );
                FAULT_ARMED.store(armed, std::sync::atomic::Ordering::Relaxed);
            }
        });
    }
    Ok(())
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let fault = match std::env::var("SHARDPAY_FAULT") {
        Ok(text) => Some(Fault::parse(&text).with_context(|| {
            format!("SHARDPAY_FAULT={text:?}: known faults are {}", Fault::NAMES)
        })?),
        Err(_) => None,
    };
    if let Some(fault) = fault {
        tracing::warn!(
            ?fault,
            "FAULT INJECTION ENABLED: this process will abort mid-transfer (testing only)"
        );
        // `shardpay run` arms the hook at a fault's scheduled time.
        if std::env::var_os("SHARDPAY_FAULT_ARM_ON_SIGUSR1").is_some() {
            arm_fault_on_sigusr1()?;
        }
    }
    let config = args.serve_config(fault)?;
    let service = config.service;
    let bus = config.bus.describe();
    let fraud_features = match service.runs(Service::Fraud) && config.fraud.is_some() {
        true => config.fraud_features.describe(),
        false => "none".to_string(),
    };
    let app = app::build(config).await?;
    // Scripts and tests read this line to find the port.
    println!("shardpay listening on http://{}", app.addr);
    tracing::info!(
        service = service.name(),
        shards = args.shards,
        data_dir = %args.data_dir.display(),
        cross_shard = CrossShard::from(args.cross_shard).as_str(),
        %bus,
        %fraud_features,
        "ready"
    );
    app.run_until(app::shutdown_signal()).await?;
    tracing::info!(service = service.name(), "stopped");
    Ok(())
}

async fn dlq(command: DlqCommand) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let (url, request) = match &command {
        DlqCommand::List { url } => {
            let url = format!("{}/v1/dlq", url.trim_end_matches('/'));
            (url.clone(), client.get(url))
        }
        DlqCommand::Replay { ids, all, url } => {
            let url = format!("{}/v1/dlq/replay", url.trim_end_matches('/'));
            let body = if *all {
                serde_json::json!({ "all": true })
            } else {
                serde_json::json!({ "ids": ids })
            };
            (url.clone(), client.post(url).json(&body))
        }
    };
    let response = request
        .send()
        .await
        .with_context(|| format!("cannot reach {url}; is `shardpay serve` running?"))?;
    let status = response.status();
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    anyhow::ensure!(status.is_success(), "{url} answered {status}: {body}");
    match command {
        DlqCommand::List { .. } => {
            let letters = body["dead_letters"].as_array().cloned().unwrap_or_default();
            if letters.is_empty() {
                println!("the dead-letter store is empty");
            }
            for l in &letters {
                println!(
                    "{}  event {} ({})  to {}  after {} attempts: {}",
                    l["id"].as_str().unwrap_or(""),
                    l["event_id"].as_str().unwrap_or(""),
                    l["event_type"].as_str().unwrap_or(""),
                    l["url"].as_str().unwrap_or(""),
                    l["attempts"],
                    l["last_error"].as_str().unwrap_or("")
                );
            }
        }
        DlqCommand::Replay { .. } => {
            println!(
                "delivered {} · already delivered before (not sent again) {} · failed again {} · not found {}",
                body["delivered"], body["already_delivered"], body["failed"], body["not_found"]
            );
            if body["not_attempted"].as_u64().unwrap_or(0) > 0 {
                println!(
                    "{} not attempted: the replay's time budget ran out; they stay in the store, run the replay again",
                    body["not_attempted"]
                );
            }
        }
    }
    Ok(())
}

async fn reshard(args: ReshardArgs) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let url = format!("{}/v1/admin/reshard", args.url.trim_end_matches('/'));
    let with_token = |request: reqwest::RequestBuilder| match &args.token {
        Some(token) => request.bearer_auth(token),
        None => request,
    };
    let mut body = serde_json::json!({ "to": args.to });
    if let Some(strategy) = &args.strategy {
        body["strategy"] = strategy.as_str().into();
    }
    let response = with_token(client.post(&url).json(&body))
        .send()
        .await
        .with_context(|| format!("cannot reach {url}; is `shardpay serve` running?"))?;
    let status = response.status();
    let answer: serde_json::Value = response.json().await.unwrap_or_default();
    anyhow::ensure!(
        status.is_success(),
        "{url} answered {status}: {}",
        answer["error"]["message"]
            .as_str()
            .unwrap_or("no reason given")
    );
    eprintln!("reshard to {} shards started", args.to);
    let started = std::time::Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let status: serde_json::Value = with_token(client.get(&url))
            .send()
            .await
            .with_context(|| format!("cannot reach {url}"))?
            .json()
            .await?;
        if status["running"].as_bool() == Some(true) {
            eprint!(
                "\r{:>5.1} s: {} accounts moved",
                started.elapsed().as_secs_f64(),
                status["accounts_moved"]
            );
            continue;
        }
        eprintln!();
        if let Some(error) = status["error"].as_str() {
            anyhow::bail!("the reshard stopped: {error}");
        }
        let last = &status["last"];
        println!(
            "placement: {} shards by {}, version {}",
            status["shards"], status["strategy"], status["version"]
        );
        println!(
            "moved {} of {} accounts ({:.1}%), {} keys, {} bytes, in {} passes; \
             requests waited {}, refused {}; longest freeze {} ms",
            last["accounts_moved"],
            last["accounts_scanned"],
            last["moved_share"].as_f64().unwrap_or(0.0) * 100.0,
            last["keys_copied"],
            last["bytes_copied"],
            last["passes"],
            last["requests_waited"],
            last["requests_refused"],
            last["longest_freeze_ms"]
        );
        for phase in last["phases"].as_array().into_iter().flatten() {
            let ms = phase["ended_at_ms"].as_i64().unwrap_or(0)
                - phase["started_at_ms"].as_i64().unwrap_or(0);
            println!("  {:<8} {ms} ms", phase["name"].as_str().unwrap_or("?"));
        }
        return Ok(());
    }
}

async fn audit(args: AuditArgs) -> anyhow::Result<bool> {
    let report: serde_json::Value = match &args.data_dir {
        Some(dir) => {
            let manifest =
                std::fs::read_to_string(dir.join("shardpay.json")).with_context(|| {
                    format!(
                        "{} is not a shardpay data directory (no shardpay.json)",
                        dir.display()
                    )
                })?;
            let shards = serde_json::from_str::<serde_json::Value>(&manifest)?["shards"]
                .as_u64()
                .context("shardpay.json has no shard count")? as u32;
            let stores = app::open_embedded(dir, shards, &SqliteConfig::default())?;
            let manager = ShardManager::new(stores, ManagerConfig::default())?;
            let report = shardpay_reference::audit::run(&manager).await?;
            serde_json::to_value(report)?
        }
        None => {
            let url = format!("{}/v1/audit", args.url.trim_end_matches('/'));
            let response = reqwest::get(&url).await.with_context(|| {
                format!("cannot reach {url}; is `shardpay serve` running? (or use --data-dir)")
            })?;
            anyhow::ensure!(
                response.status().is_success(),
                "{url} answered {}",
                response.status()
            );
            response.json().await?
        }
    };
    let ok = report["ok"].as_bool().unwrap_or(false);
    if args.json {
        println!("{report:#}");
    } else {
        print_report(&report);
    }
    Ok(ok)
}

fn print_report(report: &serde_json::Value) {
    for check in report["checks"].as_array().into_iter().flatten() {
        let mark = if check["ok"].as_bool() == Some(true) {
            "ok  "
        } else {
            "FAIL"
        };
        println!("{mark} {}", check["name"].as_str().unwrap_or("?"));
        for problem in check["problems"].as_array().into_iter().flatten() {
            println!("       {}", problem.as_str().unwrap_or(""));
        }
    }
    for t in report["totals"].as_array().into_iter().flatten() {
        println!(
            "{}: funded {}, balances {}, in flight {}",
            t["currency"].as_str().unwrap_or("?"),
            t["funded"].as_str().unwrap_or("?"),
            t["balances"].as_str().unwrap_or("?"),
            t["in_flight"].as_str().unwrap_or("?"),
        );
    }
    println!(
        "{} shards, {} pending transfers: audit {}",
        report["shards"],
        report["pending_transfers"],
        if report["ok"].as_bool() == Some(true) {
            "passed"
        } else {
            "FAILED"
        }
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serve_command() -> clap::Command {
        let mut cli = Cli::command();
        cli.build();
        cli.find_subcommand("serve").unwrap().clone()
    }

    /// docs/configuration.md lists every key with its default;
    /// `SHARDPAY_BLESS=1 cargo test` rewrites the table after a change.
    #[test]
    fn the_configuration_doc_lists_every_serve_option() {
        let table = config::reference(&serve_command());
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/configuration.md");
        let doc = std::fs::read_to_string(path).unwrap();
        let (start, end) = ("<!-- keys:start -->\n", "<!-- keys:end -->");
        let (head, rest) = doc.split_once(start).expect("the start marker");
        let (_, tail) = rest.split_once(end).expect("the end marker");
        let fresh = format!("{head}{start}{table}{end}{tail}");
        if std::env::var("SHARDPAY_BLESS").as_deref() == Ok("1") {
            std::fs::write(path, &fresh).unwrap();
        }
        assert!(
            doc == fresh,
            "docs/configuration.md is out of date; rewrite its table with SHARDPAY_BLESS=1 cargo test --release --workspace the_configuration_doc"
        );
        for key in [
            "data_dir",
            "mysql_urls",
            "service",
            "jwt_secret",
            "auth_url",
        ] {
            assert!(table.contains(&format!("| `{key}` |")), "{key} missing");
        }
    }

    #[test]
    fn analytics_groups_are_kafka_group_ids() {
        assert_eq!(analytics_group("analytics-2").unwrap(), "analytics-2");
        for bad in ["", "a b", "analytics/2", &"a".repeat(201)] {
            let e = analytics_group(bad).unwrap_err().to_string();
            assert!(e.contains("--analytics-group"), "{e}");
        }
    }

    #[test]
    fn peer_options_take_the_urls_of_replicas() {
        let args = serve_args(&[
            "shard-manager",
            "--dev",
            "--fraud-url",
            "http://f1:8003,http://f2:8003/",
        ]);
        let config = args.serve_config(None).unwrap();
        assert_eq!(
            config.peers.fraud.urls(),
            ["http://f1:8003", "http://f2:8003"]
        );
        assert_eq!(config.peers.auth.urls(), ["http://127.0.0.1:8001"]);
        let args = serve_args(&[
            "shard-manager",
            "--dev",
            "--fraud-url",
            "http://f1:8003,f2:8003",
        ]);
        let error = args.serve_config(None).unwrap_err().to_string();
        assert!(
            error.contains("--fraud-url") && error.contains("\"f2:8003\""),
            "{error}"
        );
    }

    fn serve_args(argv: &[&str]) -> ServeArgs {
        let cli = Cli::try_parse_from([&["shardpay", "serve"], argv].concat()).unwrap();
        match cli.command {
            Command::Serve(args) => args,
            _ => unreachable!("a serve command"),
        }
    }

    #[test]
    fn fraud_features_default_to_memory_and_redis_to_the_redis_of_auth() {
        let args = serve_args(&["fraud"]);
        assert_eq!(
            args.fraud_features(Service::Fraud).unwrap(),
            FeaturesConfig::Memory
        );
        let args = serve_args(&[
            "fraud",
            "--fraud-features",
            "redis",
            "--redis",
            "redis://r:6379",
        ]);
        assert_eq!(
            args.fraud_features(Service::Fraud).unwrap(),
            FeaturesConfig::Redis {
                url: "redis://r:6379".into(),
                prefix: "shardpay:".into()
            }
        );
        let args = serve_args(&[
            "--fraud-features",
            "redis",
            "--redis",
            "redis://r:6379",
            "--fraud-redis-url",
            "redis://f:6379",
        ]);
        let Ok(FeaturesConfig::Redis { url, .. }) = args.fraud_features(Service::All) else {
            panic!("redis features");
        };
        assert_eq!(url, "redis://f:6379");
        // A service that runs no fraud rules keeps no features.
        let args = serve_args(&["ledger", "--fraud-features", "scylla"]);
        assert_eq!(
            args.fraud_features(Service::Ledger).unwrap(),
            FeaturesConfig::Memory
        );
    }

    #[test]
    fn fraud_features_without_their_server_say_what_to_give() {
        let args = serve_args(&["fraud", "--fraud-features", "redis"]);
        let e = args.fraud_features(Service::Fraud).unwrap_err().to_string();
        assert!(e.contains("--redis redis://host:port"), "{e}");
        let args = serve_args(&["fraud", "--fraud-features", "scylla"]);
        let e = args.fraud_features(Service::Fraud).unwrap_err().to_string();
        assert!(e.contains("--scylla-uri host:9042"), "{e}");
        let args = serve_args(&[
            "fraud",
            "--fraud-features",
            "scylla",
            "--scylla-uri",
            "a:9042,b:9042",
        ]);
        let Ok(FeaturesConfig::Scylla(config)) = args.fraud_features(Service::Fraud) else {
            panic!("scylla features");
        };
        assert_eq!(config.nodes, ["a:9042", "b:9042"]);
        assert_eq!(
            (config.keyspace.as_str(), config.replication_factor),
            ("shardpay", 1)
        );
    }

    #[test]
    fn the_help_of_fraud_features_says_when_to_use_which() {
        let serve = serve_command();
        let arg = serve
            .get_arguments()
            .find(|a| a.get_long() == Some("fraud-features"))
            .unwrap();
        let help = arg.get_long_help().unwrap().to_string();
        for needed in ["several `serve fraud`", "--redis", "scylla", "atomically"] {
            assert!(help.contains(needed), "{needed}: {help}");
        }
    }

    /// The serve options of `shardpay serve ARGS` with a config file of
    /// `text` (the environment as the test runs in).
    fn serve_with_file(text: &str, args: &[&str]) -> anyhow::Result<ServeArgs> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serve.toml");
        std::fs::write(&path, text).unwrap();
        let matches = Cli::command()
            .try_get_matches_from(
                ["shardpay", "serve", "--config", path.to_str().unwrap()]
                    .iter()
                    .chain(args),
            )
            .unwrap();
        let given = matches.subcommand_matches("serve").unwrap();
        let mut serve = ServeArgs::from_arg_matches(given).unwrap();
        config::layer(&mut serve, &serve_command(), given)?;
        Ok(serve)
    }

    #[test]
    fn a_config_file_sets_the_options_the_command_line_leaves_out() {
        let file = "service = \"ledger\"\ndata-dir = \"/srv/data\"\nshards = 8\ndemo = true\nmysql_urls = [\"mysql://a/x\", \"mysql://b/y\"]\ncross_shard = \"xa\"\naccess_ttl_s = 60\nport = 8100\n";
        let serve = serve_with_file(file, &[]).unwrap();
        assert_eq!(serve.service.as_deref(), Some("ledger"));
        assert_eq!(serve.data_dir, PathBuf::from("/srv/data"));
        assert_eq!(serve.shards, 8);
        assert!(serve.auth.demo);
        assert_eq!(serve.mysql_urls, ["mysql://a/x", "mysql://b/y"]);
        assert_eq!(serve.cross_shard, CrossShardArg::Xa);
        assert_eq!(serve.auth.access_ttl_s, 60);
        assert_eq!(serve.port, Some(8100));
        // Keys the file leaves out keep their defaults.
        assert_eq!(serve.currency, "INR");
        assert_eq!(serve.auth.argon2_iterations, 2);

        // The command line wins, even with a value equal to the default.
        let serve = serve_with_file(file, &["--shards", "4", "--port", "0", "auth"]).unwrap();
        assert_eq!(serve.shards, 4);
        assert_eq!(serve.port, Some(0));
        assert_eq!(serve.service.as_deref(), Some("auth"));
        assert_eq!(serve.data_dir, PathBuf::from("/srv/data"));
        let serve = serve_with_file(file, &["--all"]).unwrap();
        assert_eq!(serve.serve_config(None).unwrap().service, Service::All);
    }

    #[test]
    fn a_config_file_with_a_bad_key_or_value_is_refused_by_name() {
        let refused = |text: &str| match serve_with_file(text, &[]) {
            Ok(_) => panic!("{text:?} was accepted"),
            Err(e) => e.to_string(),
        };
        let e = refused("data_dri = \"x\"\n");
        assert!(
            e.contains("unknown key `data_dri`") && e.contains("data_dir"),
            "{e}"
        );
        let e = refused("shards = \"many\"\n");
        assert!(e.contains("`shards`") && e.contains("many"), "{e}");
        let e = refused("service = \"billing\"\n");
        assert!(e.contains("`service`") && e.contains("billing"), "{e}");
        let e = refused("demo = \"yes please\"\n");
        assert!(e.contains("`demo`") && e.contains("yes please"), "{e}");
        let e = refused("cross_shard = \"2pc\"\n");
        assert!(
            e.contains("`cross_shard`: invalid value \"2pc\"; possible values: saga, xa"),
            "{e}"
        );
        let e = refused("port = 70000\n");
        assert!(e.contains("`port`") && e.contains("70000"), "{e}");
        let e = refused("access_ttl_s = \"long\"\n");
        assert!(e.contains("`access_ttl_s`") && e.contains("long"), "{e}");
        let e = refused("all = true\n");
        assert!(e.contains("`all`") && e.contains("command line"), "{e}");
        let e = refused("log_format = \"json\"\n");
        assert!(e.contains("unknown key `log_format`"), "{e}");
        for e in [
            refused("port = 8006\nport = 8007\n"),
            refused("shards = 0x\n"),
        ] {
            assert!(
                e.starts_with("config file ") && e.contains("serve.toml"),
                "{e}"
            );
        }
    }

    /// A value of a config file reads as it does on the command line.
    #[test]
    fn value_enums_have_their_command_line_names_in_a_config_file() {
        fn same<T: clap::ValueEnum + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug>() {
            for variant in T::value_variants() {
                let name = variant.to_possible_value().unwrap().get_name().to_string();
                let read: T = serde_json::from_value(serde_json::Value::String(name)).unwrap();
                assert_eq!(&read, variant);
            }
        }
        same::<OnOff>();
        same::<CrossShardArg>();
        same::<DurabilityArg>();
    }
}
