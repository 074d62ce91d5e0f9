//! One run, from start to report: start the reference system in-process
//! (or use the target given), create the accounts, drive the load, settle
//! and check the books, run the system's audit, judge the thresholds, and
//! write `report.json`, `report.html` and the terminal summary.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures_util::{StreamExt, TryStreamExt};
use indicatif::{ProgressBar, ProgressStyle};
use rand::Rng;
use shardpay_reference::app::AuthSetup;
use shardpay_reference::app::{self, ServeConfig};
use shardpay_reference::auth::AuthConfig;
use shardpay_reference::events::BusConfig;
use shardpay_reference::ledger::sqlite::{Durability, SqliteConfig};
use shardpay_reference::manager::CrossShard;

use crate::accounting::{self, Accounting, Check, Entry, Outcome};
use crate::api::{Api, ShardInfo, TransferView, BULK_BATCH, SETUP_CONCURRENCY};
use crate::baseline::{BaselineKind, BaselineResult};
use crate::driver::{self, Sim};
use crate::plan::Plan;
use crate::record::{Counts, Measured};
use crate::report::{
    Audit, Hist, Latency, Machine, OutcomeRow, Report, Resources, RunInfo, ScenarioInfo,
    ThresholdResult, Timeline, Totals, SCHEMA,
};
use crate::scenario::{Scenario, Stop, Thresholds};
use crate::Kind;

/// How long the books wait, after the run, for pending cross-shard
/// transfers to finish (the reference system's recovery finishes them
/// within seconds; its audit deadline is 60 s).
pub const PENDING_DEADLINE: Duration = Duration::from_secs(120);
/// Thread-name prefixes of the in-process reference system, so its CPU time
/// is told apart from the simulator's.
const SERVER_THREADS: [&str; 2] = ["sp-server", "shard-"];

/// What a run drives.
#[derive(Debug, Clone)]
pub enum Target {
    /// The reference system started in this process on SQLite shard files:
    /// in `data_dir` when given (kept), else in a temporary directory.
    Embedded {
        shards: u32,
        data_dir: Option<PathBuf>,
        durability: Durability,
        /// Keep the shards in MySQL/MariaDB databases instead of SQLite.
        mysql: Option<MysqlShards>,
        /// How cross-shard transfers are made atomic (XA needs MySQL).
        cross_shard: CrossShard,
        /// Fraud checks on the in-process system (the default rules).
        fraud: bool,
        /// The in-process system's event bus. On Kafka, the run's topics
        /// and groups get a prefix of their own, so runs sharing a broker
        /// never read each other's events.
        bus: BusConfig,
        /// Sessions, rate limits and idempotency locks on this Redis
        /// instead of in memory (auth is always on).
        redis: Option<String>,
    },
    /// A system already running at this base URL, or at these (the shard
    /// manager's replicas, separated by commas; requests go to each in
    /// turn).
    Url(String),
}

/// MySQL/MariaDB shard databases for the in-process system.
#[derive(Debug, Clone)]
pub struct MysqlShards {
    /// One URL per shard, in shard order; the run uses the first `shards`.
    pub urls: Vec<String>,
    /// Drop and create the databases before the run, so the run starts from
    /// empty shards (only for databases the simulator owns, such as those
    /// of `scripts/shards.sh`).
    pub fresh: bool,
    /// The script that runs these servers on this machine
    /// (`scripts/shards.sh`), when the run started them: faults can then
    /// kill, pause and restart a shard's server.
    pub script: Option<PathBuf>,
}

/// Empties a shard database: drops and creates it.
async fn recreate_database(url: &str) -> anyhow::Result<()> {
    make_database(url, true).await
}

/// A database of the run's system beside its first shard,
/// `<first shard's database>_<what>` (`auth`: users and sessions' owners;
/// `notify`: webhooks and deliveries), emptied on fresh shards and created
/// if missing on given ones, so that the run's users and delivery counts
/// are its own, not those of every system that used the server's shared
/// `shardpay_auth` and `shardpay_notify`.
async fn run_database(first_shard: &str, what: &str, fresh: bool) -> anyhow::Result<String> {
    let url = format!("{first_shard}_{what}");
    make_database(&url, fresh).await?;
    Ok(url)
}

/// Creates a database (dropping it first when `fresh`).
async fn make_database(url: &str, fresh: bool) -> anyhow::Result<()> {
    use sqlx::Connection;
    let (server, db) = url
        .rsplit_once('/')
        .filter(|(server, db)| server.contains("://") && !server.ends_with('/') && !db.is_empty())
        .with_context(|| {
            format!(
                "{} names no database",
                shardpay_reference::ledger::mysql::redact(url)
            )
        })?;
    anyhow::ensure!(
        db.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
        "database name {db:?}: use letters, digits and '_'"
    );
    let mut admin = sqlx::MySqlConnection::connect(server)
        .await
        .with_context(|| {
            format!(
                "cannot connect to {}",
                shardpay_reference::ledger::mysql::redact(server)
            )
        })?;
    if fresh {
        sqlx::query(&format!("DROP DATABASE IF EXISTS {db}"))
            .execute(&mut admin)
            .await?;
    }
    sqlx::query(&format!(
        "CREATE DATABASE IF NOT EXISTS {db} CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
    ))
    .execute(&mut admin)
    .await?;
    Ok(())
}

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub target: Target,
    /// With `Target::Url`, the other services of a split deployment (auth,
    /// notification, analytics) by name; those left out answer at the
    /// target.
    pub services: Vec<(String, shardpay_reference::peers::Replicas)>,
    /// Parent of the run's report folder.
    pub reports_dir: PathBuf,
    /// With `Target::Url`: webhooks for some accounts, to the run's
    /// receiver on loopback, checked as on the in-process system (the
    /// target must deliver there: `serve --webhooks-to-private-networks`).
    pub webhooks: bool,
    /// Show progress bars (when stderr is a terminal) and the summary.
    pub progress: bool,
    /// With MySQL shards: before the load, measure the raw-database
    /// baseline for this many seconds per kind, at the scenario's
    /// concurrency, so the report states the services' share of it.
    pub baseline_s: Option<u64>,
    /// The `shardpay` binary, for scenarios with faults: they run the
    /// reference system as a child process, to kill and start it again.
    pub system_binary: Option<PathBuf>,
    /// Run the in-process target as its six services, each a child process
    /// (`serve auth`, ... `serve shard-manager`) sharing its MySQL shards,
    /// Kafka broker and Redis; faults can crash one by name.
    pub six_processes: bool,
    /// Serve the live view (`live.rs`) on this loopback port while the
    /// load runs (0: a free port).
    pub live: Option<u16>,
}

pub struct RunResult {
    pub report: Report,
    pub dir: PathBuf,
}

/// The reference system running on its own threads and runtime, so the
/// simulator's measurements of itself leave it out.
struct Embedded {
    url: String,
    /// The password of its `admin` user (drawn at random per run).
    admin_password: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
    _temp: Option<tempfile::TempDir>,
}

/// How the in-process system places accounts: by which strategy, and with
/// how many spare shard stores for the scenario's reshards to grow into.
#[derive(Debug, Clone, Copy, Default)]
pub struct Placement {
    pub spare: u32,
    pub strategy: shardpay_reference::sharding::Strategy,
}

impl Placement {
    /// What `scenario`'s reshards need of a system of `shards` shards.
    pub fn for_scenario(scenario: &Scenario, shards: u32) -> Placement {
        Placement {
            spare: scenario
                .max_reshard_to()
                .map_or(0, |to| to.saturating_sub(shards)),
            strategy: scenario
                .placement()
                .and_then(shardpay_reference::sharding::Strategy::parse)
                .unwrap_or_default(),
        }
    }
}

impl Embedded {
    async fn start(
        shards: u32,
        data_dir: Option<PathBuf>,
        durability: Durability,
        mysql: Option<MysqlShards>,
        cross_shard: CrossShard,
        fraud: bool,
        bus: BusConfig,
        redis: Option<String>,
        placement: Placement,
    ) -> anyhow::Result<Embedded> {
        let fresh = mysql.as_ref().is_some_and(|m| m.fresh);
        let mysql_urls = match mysql {
            None => None,
            Some(m) => Some(mysql_shard_urls(shards + placement.spare, m).await?),
        };
        let (temp, dir) = fresh_data_dir(data_dir)?;
        let mut config = ServeConfig::new(&dir);
        config.shards = shards;
        config.spare_shards = placement.spare;
        config.manager.strategy = placement.strategy;
        // The test hook of a broken reshard switch (tests/cli/reshard.rs).
        config.manager.broken_switch = std::env::var_os("SHARDPAY_TEST_BROKEN_SWITCH").is_some();
        if let Some(first) = mysql_urls.as_ref().and_then(|urls| urls.first()) {
            // Fresh shards reuse the seed's account and user names, so the
            // users and owners start empty too; on given shards the run's
            // system still has users of its own (an admin another system
            // on the server reset would lock the run out).
            config.auth_mysql_url = Some(run_database(first, "auth", fresh).await?);
            config.notification_mysql_url = Some(run_database(first, "notify", fresh).await?);
        }
        config.mysql_urls = mysql_urls;
        config.manager.cross_shard = cross_shard;
        if !fraud {
            config.fraud = None;
        }
        config.bus = with_run_prefix(bus);
        config.bind = "127.0.0.1:0".parse().expect("constant address");
        // The run's webhook receiver listens on loopback.
        config.webhooks.allow_private = true;
        let admin_password = random_secret();
        config.auth = load_test_auth(&admin_password, redis);
        config.sqlite = SqliteConfig {
            durability,
            ..SqliteConfig::default()
        };
        Embedded::serve(config, admin_password, temp).await
    }

    /// Starts the reference system on a thread and runtime of its own, and
    /// waits until it listens.
    async fn serve(
        config: ServeConfig,
        admin_password: String,
        temp: Option<tempfile::TempDir>,
    ) -> anyhow::Result<Embedded> {
        let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("sp-server-main".into())
            .spawn(move || -> anyhow::Result<()> {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(server_threads())
                    .thread_name("sp-server")
                    .enable_all()
                    .build()?;
                runtime.block_on(async move {
                    let app = match app::build(config).await {
                        Ok(app) => app,
                        Err(e) => {
                            let message = format!("{e:#}");
                            let _ = addr_tx.send(Err(e));
                            anyhow::bail!(message);
                        }
                    };
                    let _ = addr_tx.send(Ok(app.addr));
                    app.run_until(async {
                        let _ = stop_rx.await;
                    })
                    .await
                })
            })?;
        let addr = addr_rx
            .await
            .context("the reference system did not start")??;
        Ok(Embedded {
            url: format!("http://{addr}"),
            admin_password,
            stop: Some(stop_tx),
            thread: Some(thread),
            _temp: temp,
        })
    }

    async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            tokio::task::spawn_blocking(move || thread.join())
                .await?
                .map_err(|_| anyhow::anyhow!("the reference system panicked"))??;
        }
        Ok(())
    }
}

/// The reference system in this process, started as a run starts it (auth
/// on with an `admin` user, fraud checks, the in-process bus) on fresh
/// SQLite shards in a temporary folder: for benches of the full path.
pub struct LocalSystem {
    system: Embedded,
}

impl LocalSystem {
    pub async fn start(shards: u32, durability: Durability) -> anyhow::Result<LocalSystem> {
        let system = Embedded::start(
            shards,
            None,
            durability,
            None,
            CrossShard::Saga,
            true,
            BusConfig::default(),
            None,
            Placement::default(),
        )
        .await?;
        Ok(LocalSystem { system })
    }

    /// Its base URL, on loopback.
    pub fn url(&self) -> &str {
        &self.system.url
    }

    /// The password of its `admin` user.
    pub fn admin_password(&self) -> &str {
        &self.system.admin_password
    }

    pub async fn stop(self) -> anyhow::Result<()> {
        self.system.stop().await
    }
}

/// Worker threads of the in-process system's runtime: one per core, as
/// `shardpay serve` has (the simulator's own runtime shares the cores).
pub fn server_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// The first `shards` of the MySQL URLs, each database emptied first when
/// the run owns them.
async fn mysql_shard_urls(shards: u32, mysql: MysqlShards) -> anyhow::Result<Vec<String>> {
    anyhow::ensure!(
        mysql.urls.len() >= shards as usize,
        "{shards} shards need {shards} MySQL URLs; {} given",
        mysql.urls.len()
    );
    let urls: Vec<String> = mysql.urls[..shards as usize].to_vec();
    if mysql.fresh {
        for url in &urls {
            recreate_database(url).await?;
        }
    }
    Ok(urls)
}

/// The folder for the shard files: the one given, which must not hold
/// shards yet, or a temporary one (returned too, so that it lives as long
/// as the run).
fn fresh_data_dir(
    data_dir: Option<PathBuf>,
) -> anyhow::Result<(Option<tempfile::TempDir>, PathBuf)> {
    match data_dir {
        Some(dir) => {
            if dir.join("shardpay.json").exists() {
                bail!(
                    "{} already holds shard files; give a new --data-dir (a run needs fresh shards so its books start from zero)",
                    dir.display()
                );
            }
            Ok((None, dir))
        }
        None => {
            let temp = tempfile::Builder::new()
                .prefix("shardpay-run-")
                .tempdir()
                .context("cannot create a temporary data directory")?;
            let dir = temp.path().to_path_buf();
            Ok((Some(temp), dir))
        }
    }
}

/// The event bus with, on Kafka, a topic and group prefix of the run's own,
/// so runs sharing a broker never read each other's events.
fn with_run_prefix(bus: BusConfig) -> BusConfig {
    match bus {
        BusConfig::Kafka(mut kafka) => {
            kafka.prefix = format!("{}run-{:08x}-", kafka.prefix, rand::random::<u32>());
            BusConfig::Kafka(kafka)
        }
        other => other,
    }
}

/// Auth on, as a deployment runs it, with what a load test needs: a secret
/// and an admin password of the run's own, cheap password hashes (the run
/// logs in hundreds of users) and no login limits (they all log in from
/// this one address).
fn load_test_auth(admin_password: &str, redis: Option<String>) -> AuthSetup {
    let mut auth = AuthConfig::new(random_secret());
    auth.argon2_memory_kib = 256;
    auth.argon2_iterations = 1;
    auth.login_per_user.max = 0;
    auth.login_per_address.max = 0;
    auth.admin_password = Some(admin_password.to_string());
    AuthSetup::On {
        config: auth,
        redis,
        redis_prefix: format!("shardpay-run-{:08x}:", rand::random::<u32>()),
        dev: false,
    }
}

/// The machine's busy share over the measured window of a timed run, from
/// the end of its warm-up to the end of its length: the ramp before it and
/// the grace after the load are left out, so the share matches the rates
/// the report gives. `None` for a run by count.
async fn measured_window_busy(
    sim: Arc<Sim>,
    warmup: Duration,
    length: Option<Duration>,
) -> Option<f64> {
    let length = length?;
    let start = loop {
        if let Some(start) = sim.started() {
            break start;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    tokio::time::sleep_until((start + warmup).into()).await;
    let before = crate::machine::machine_ticks();
    tokio::time::sleep_until((start + length).into()).await;
    crate::machine::busy_share(before, crate::machine::machine_ticks())
}

/// CPU seconds used by this process, and by the threads of the in-process
/// reference system, from /proc (Linux; zeros elsewhere).
fn cpu_seconds() -> (f64, f64) {
    let ticks = crate::nemesis::stat_cpu_s;
    let total = std::fs::read_to_string("/proc/self/stat")
        .map(|s| ticks(&s))
        .unwrap_or(0.0);
    // The simulator's threads live as long as the run; the system's come
    // and go (its blocking pool's threads end when idle, taking their CPU
    // out of a sum over live threads). So the simulator's own threads are
    // summed, and the system's share is the rest of the process's total,
    // which keeps the CPU of threads that ended.
    let mut simulator = 0.0;
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for task in tasks.flatten() {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            if !SERVER_THREADS.iter().any(|p| comm.starts_with(p)) {
                simulator += std::fs::read_to_string(task.path().join("stat"))
                    .map(|s| ticks(&s))
                    .unwrap_or(0.0);
            }
        }
    }
    (total, total - simulator)
}

fn git_commit() -> String {
    let out = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    match out(&["rev-parse", "HEAD"]) {
        Some(commit) => {
            let dirty = out(&["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.is_empty());
            if dirty {
                format!("{commit}-dirty")
            } else {
                commit
            }
        }
        None => "unknown".into(),
    }
}

fn report_dir(parent: &Path, name: &str, stamp: &str) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(parent)
        .with_context(|| format!("cannot create {}", parent.display()))?;
    for n in 1.. {
        let dir = if n == 1 {
            parent.join(format!("{name}-{stamp}"))
        } else {
            parent.join(format!("{name}-{stamp}-{n}"))
        };
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("cannot create {}", dir.display())),
        }
    }
    unreachable!()
}

fn bar(progress: bool, len: u64, template: &str) -> ProgressBar {
    if !progress || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(template)
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar
}

/// Opening balance of each account the run creates: the scenario's for the
/// regular accounts, zero for the new payees of fraud bursts after them.
fn opening_balances(scenario: &Scenario, accounts: usize) -> Vec<i64> {
    let regular = scenario.accounts.count as usize;
    (0..accounts)
        .map(|i| {
            if i < regular {
                scenario.accounts.opening_balance.minor()
            } else {
                0
            }
        })
        .collect()
}

/// Account owners of a run on a system with auth on.
struct Owners {
    /// The owner's username of each account, in account order.
    of_account: Vec<String>,
    /// Each owner's access token; account `i` belongs to owner
    /// `i % tokens.len()`.
    tokens: Vec<String>,
    /// The owners' usernames, in token order, and their password.
    names: Vec<String>,
    password: String,
}

/// Most users a run logs in; accounts are shared out among them.
const MAX_OWNERS: usize = 256;

fn random_secret() -> String {
    let mut rng = rand::rng();
    (0..32)
        .map(|_| format!("{:02x}", rng.random::<u8>()))
        .collect()
}

/// On a system with auth on: logs the admin in (for setup, lookups and
/// the audit), then registers and logs in the users who will own the run's
/// accounts, so that every transfer carries its payer's owner's token.
/// `None` when the system runs without auth.
async fn sign_in(
    api: &mut Api,
    run_id: &str,
    accounts: usize,
    admin_password: Option<&str>,
    progress: bool,
) -> anyhow::Result<Option<Owners>> {
    if !api.auth_on().await? {
        return Ok(None);
    }
    let password = admin_password.context(
        "the target has auth on: set SHARDPAY_ADMIN_PASSWORD to the password of its admin user (serve --admin-password), and turn its login rate limits off or up for the run's users",
    )?;
    if api.token.is_none() {
        api.token = Some(api.login("admin", password).await?);
    }
    let users = accounts.clamp(1, MAX_OWNERS);
    let names: Vec<String> = (0..users).map(|j| format!("{run_id}user{j}")).collect();
    let user_password = random_secret();
    let bar = bar(
        progress,
        users as u64,
        "logging users in [{bar:30}] {pos}/{len}",
    );
    let api_ref = &*api;
    let tokens: Vec<String> = futures_util::stream::iter(names.iter())
        .map(|name| {
            let bar = bar.clone();
            let user_password = user_password.clone();
            async move {
                api_ref.register(name, &user_password).await?;
                let token = api_ref.login(name, &user_password).await?;
                bar.inc(1);
                anyhow::Ok(token)
            }
        })
        .buffered(SETUP_CONCURRENCY)
        .try_collect()
        .await?;
    bar.finish_and_clear();
    Ok(Some(Owners {
        of_account: (0..accounts).map(|i| names[i % users].clone()).collect(),
        tokens,
        names,
        password: user_password,
    }))
}

/// Creates the run's accounts in bulk; returns each one's shard.
async fn setup(
    api: &Api,
    scenario: &Scenario,
    names: &[String],
    owners: Option<&[String]>,
    progress: bool,
) -> anyhow::Result<Vec<u16>> {
    let opening = opening_balances(scenario, names.len());
    let bar = bar(
        progress,
        names.len() as u64,
        "creating accounts [{bar:30}] {pos}/{len} {per_sec} eta {eta}",
    );
    let currency = scenario.accounts.currency.code().to_string();
    let batches = names
        .chunks(BULK_BATCH)
        .zip(opening.chunks(BULK_BATCH))
        .enumerate();
    let shards: Vec<Vec<u16>> = futures_util::stream::iter(batches)
        .map(|(b, (ids, minor))| {
            let bar = bar.clone();
            let currency = currency.clone();
            let owners = owners.map(|o| &o[b * BULK_BATCH..b * BULK_BATCH + ids.len()]);
            async move {
                let shards = api.create_accounts(ids, owners, &currency, minor).await?;
                bar.inc(ids.len() as u64);
                anyhow::Ok(shards)
            }
        })
        .buffered(SETUP_CONCURRENCY)
        .try_collect()
        .await?;
    bar.finish_and_clear();
    Ok(shards.into_iter().flatten().collect())
}

/// Live progress: a bar on a terminal, a line every 5 s otherwise.
fn spawn_progress(
    sim: Arc<Sim>,
    scenario: &Scenario,
    progress: bool,
) -> (tokio::task::JoinHandle<()>, ProgressBar) {
    let total_s = scenario.stop.seconds();
    let count = scenario.stop.count();
    let bar = bar(
        progress,
        total_s.or(count).unwrap_or(0),
        "{prefix} [{bar:30}] {msg}",
    );
    let plain = progress && !std::io::stderr().is_terminal();
    let b = bar.clone();
    let handle = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut last_accepted = 0;
        let mut n = 0u64;
        loop {
            tick.tick().await;
            let Some(start) = sim.started() else { continue };
            let live = sim.recorder.live();
            let elapsed = start.elapsed().as_secs();
            let tps = live.accepted - last_accepted;
            last_accepted = live.accepted;
            let msg = format!(
                "{elapsed} s · {tps} tps · {} requests · {} errors · p99 {:.1} ms",
                live.requests,
                live.errors,
                live.p99_us as f64 / 1000.0
            );
            b.set_prefix("running");
            b.set_position(if total_s.is_some() {
                elapsed
            } else {
                sim.executed()
            });
            b.set_message(msg.clone());
            n += 1;
            if plain && n % 5 == 0 {
                eprintln!("  {msg}");
            }
        }
    });
    (handle, bar)
}

/// Runs a scenario against the target and writes its report.
pub async fn run(scenario: &Scenario, options: &RunOptions) -> anyhow::Result<RunResult> {
    let started_at = chrono::Utc::now();
    if !scenario.faults.is_empty() || options.six_processes {
        return run_with_faults(scenario, options, started_at).await;
    }
    let (embedded, base_url) = match &options.target {
        Target::Embedded {
            shards,
            data_dir,
            durability,
            mysql,
            cross_shard,
            fraud,
            bus,
            redis,
        } => {
            let system = Embedded::start(
                *shards,
                data_dir.clone(),
                *durability,
                mysql.clone(),
                *cross_shard,
                *fraud,
                bus.clone(),
                redis.clone(),
                Placement::for_scenario(scenario, *shards),
            )
            .await?;
            let url = system.url.clone();
            (Some(system), url)
        }
        Target::Url(url) => (None, url.trim_end_matches('/').to_string()),
    };
    let backend = backend_of(&options.target);
    let admin_password = match &embedded {
        Some(system) => Some(system.admin_password.clone()),
        None => std::env::var("SHARDPAY_ADMIN_PASSWORD").ok(),
    };
    let result = drive(
        scenario,
        options,
        &base_url,
        backend,
        started_at,
        admin_password,
        None,
        crate::nemesis::Backends::default(),
    )
    .await;
    if let Some(system) = embedded {
        system.stop().await?;
    }
    result
}

fn backend_of(target: &Target) -> Backend {
    match target {
        Target::Embedded { mysql: Some(m), .. } => Backend::Mysql { fresh: m.fresh },
        Target::Embedded { .. } => Backend::Sqlite,
        Target::Url(_) => Backend::Remote,
    }
}

/// A run with a fault schedule: the reference system runs as a child
/// process the faults can kill and start again on the same data.
async fn run_with_faults(
    scenario: &Scenario,
    options: &RunOptions,
    started_at: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<RunResult> {
    let Target::Embedded {
        shards,
        data_dir,
        durability,
        mysql,
        cross_shard,
        fraud,
        bus,
        redis,
    } = &options.target
    else {
        if options.six_processes {
            bail!("--six-processes starts the six services itself: drop --target");
        }
        bail!("a scenario with [[faults]] needs the system the run starts itself (it kills and restarts it): drop --target");
    };
    let six = options.six_processes;
    if six {
        anyhow::ensure!(
            mysql.is_some(),
            "--six-processes needs MySQL shards the six services share: give --backend mysql"
        );
    }
    for fault in &scenario.faults {
        let service = SERVICES.contains(&fault.target.as_str());
        if service && !six {
            bail!(
                "{}: line {}: fault {} crashes the {} service, but this run runs the six services in one process: give --six-processes",
                scenario.file,
                fault.line,
                fault.name,
                fault.target
            );
        }
    }
    let binary = options
        .system_binary
        .clone()
        .context("a scenario with [[faults]] needs the shardpay binary to start the system as a child process")?;
    if scenario.mix.hostile > 0 {
        bail!(
            "{}: hostile traffic and [[faults]] in one scenario are not judged together yet (a hostile request caught by a fault has no answer to judge); run them as two scenarios",
            scenario.file
        );
    }
    for fault in scenario.faults.iter().filter(|f| f.action.shard_server()) {
        let local = mysql.as_ref().is_some_and(|m| m.script.is_some());
        if !local {
            bail!(
                "{}: line {}: fault {} hits the database server of {}, which this run does not run: shard faults need the MySQL shard servers of scripts/shards.sh (--backend mysql, without --mysql-urls)",
                scenario.file,
                fault.line,
                fault.name,
                fault.target
            );
        }
    }
    for fault in scenario.faults.iter().filter(|f| f.action.link()) {
        if fault.shard.is_some() && mysql.is_none() {
            bail!(
                "{}: line {}: fault {} cuts the link to {}, but this run's shards are SQLite files inside the system's process, with no link to cut: give --backend mysql",
                scenario.file,
                fault.line,
                fault.name,
                fault.target
            );
        }
    }
    for (fault, shard) in scenario
        .faults
        .iter()
        .filter_map(|f| f.shard.map(|s| (f, s)))
    {
        if shard >= *shards {
            bail!(
                "{}: line {}: fault {} targets {}, but this run has {} shards (shard-0 to shard-{})",
                scenario.file,
                fault.line,
                fault.name,
                fault.target,
                shards,
                shards - 1
            );
        }
    }
    if let Some(fault) = scenario
        .faults
        .iter()
        .find(|f| f.action == crate::scenario::faults::Action::RedisDown && redis.is_some())
    {
        bail!(
            "{}: line {}: fault {} stops the Redis the run starts itself, and this run was given one (--redis): drop --redis",
            scenario.file,
            fault.line,
            fault.name
        );
    }
    let cross_traffic =
        scenario.mix.cross_shard + scenario.mix.idempotent_retry + scenario.mix.fraud_heavy > 0;
    for fault in &scenario.faults {
        if fault.step.is_some_and(|s| s.reshard()) {
            if scenario.reshards.is_empty() {
                bail!(
                    "{}: line {}: fault {} crashes in the middle of a reshard's move, but this scenario has no [[reshard]]",
                    scenario.file,
                    fault.line,
                    fault.name
                );
            }
            continue;
        }
        if fault.step.is_some() && (*shards < 2 || !cross_traffic) {
            bail!(
                "{}: line {}: fault {} crashes at a step of a cross-shard transfer, but this run makes none (it needs 2 or more shards and cross-shard traffic in its mix)",
                scenario.file,
                fault.line,
                fault.name
            );
        }
        if let Some(step) = fault.step {
            let needs = if step.xa() {
                CrossShard::Xa
            } else {
                CrossShard::Saga
            };
            if needs != *cross_shard {
                bail!(
                    "{}: line {}: fault {} crashes at {}, a step of {} transfers, but this run makes cross-shard transfers by {}; give --cross-shard {}",
                    scenario.file,
                    fault.line,
                    fault.name,
                    step.hook().trim_start_matches("crash_"),
                    needs.as_str(),
                    cross_shard.as_str(),
                    needs.as_str()
                );
            }
        }
    }
    let fresh = mysql.as_ref().is_some_and(|m| m.fresh);
    // Spare shard stores for the scenario's reshards to grow into.
    let placement = Placement::for_scenario(scenario, *shards);
    let stores = *shards + placement.spare;
    let mysql_urls = match mysql {
        None => None,
        Some(m) => Some(mysql_shard_urls(stores, m.clone()).await?),
    };
    let (temp, dir) = fresh_data_dir(data_dir.clone())?;
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut backends = crate::nemesis::Backends {
        shard_servers: mysql.as_ref().and_then(|m| m.script.clone()).map(|script| {
            crate::nemesis::ShardServers {
                script,
                count: stores,
            }
        }),
        ..Default::default()
    };
    // Faults on Redis need one: the run starts its own unless given one.
    let mut redis = redis.clone();
    if redis.is_none() && (six || scenario.faults.iter().any(|f| f.target == "redis")) {
        let local = crate::nemesis::LocalRedis::start(&dir.join("redis")).await?;
        redis = Some(local.url());
        backends.redis = Some(Arc::new(tokio::sync::Mutex::new(local)));
    }
    // Link faults on the broker need one that tells its clients the
    // proxy's address: the run starts its own.
    // Six processes share a broker: the run starts one unless given one.
    let mut bus = bus.clone();
    let mut broker = None;
    let broker_fault = scenario.faults.iter().find(|f| f.target == "broker");
    let kafka_given = matches!(bus, BusConfig::Kafka(_));
    if broker_fault.is_some() || (six && !kafka_given) {
        if let Some(fault) = broker_fault.filter(|_| kafka_given) {
            bail!(
                "{}: line {}: fault {} cuts the link to the broker, which must be one the run starts itself (a broker tells its clients its own address, and the run's must tell them its proxy's): drop --kafka",
                scenario.file,
                fault.line,
                fault.name
            );
        }
        let port = crate::nemesis::free_port()?;
        let link = crate::proxy::Link::start(&format!("127.0.0.1:{port}")).await?;
        let script = std::env::var_os("SHARDPAY_KAFKA_SCRIPT")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("scripts/kafka.sh"));
        anyhow::ensure!(
            script.is_file(),
            "{} not found: the run starts its broker with it (for faults on the broker, or six processes without --kafka); run from the shardpay checkout or set SHARDPAY_KAFKA_SCRIPT",
            script.display()
        );
        broker = Some(crate::nemesis::LocalBroker::start(
            &script,
            &dir.join("broker"),
            port,
            link.addr,
        )?);
        bus = BusConfig::Kafka(shardpay_reference::events::kafka::KafkaConfig::new(
            link.addr.to_string(),
        ));
        backends.links.insert("broker".into(), Arc::new(link));
    }
    // A proxy in front of each backend a link fault targets; the system is
    // given the proxy's address.
    let mut system_mysql_urls = mysql_urls.clone();
    let mut system_redis = redis.clone();
    for fault in scenario.faults.iter().filter(|f| f.action.link()) {
        if backends.links.contains_key(&fault.target) {
            continue;
        }
        let url = match (fault.shard, &mut system_mysql_urls, &mut system_redis) {
            (Some(shard), Some(urls), _) => &mut urls[shard as usize],
            (None, _, Some(url)) if fault.target == "redis" => url,
            _ => bail!(
                "{}: line {}: fault {} targets {}, which this run does not use",
                scenario.file,
                fault.line,
                fault.name,
                fault.target
            ),
        };
        let link = crate::proxy::Link::start(&crate::proxy::host_port(url)?).await?;
        *url = crate::proxy::via_proxy(url, link.addr)?;
        backends.links.insert(fault.target.clone(), Arc::new(link));
    }
    let port = crate::nemesis::free_port()?;
    let admin_password = random_secret();
    let mut args: Vec<String> = vec![
        "serve".into(),
        "--bind".into(),
        "127.0.0.1".into(),
        "--port".into(),
        port.to_string(),
        "--shards".into(),
        shards.to_string(),
        "--spare-shards".into(),
        placement.spare.to_string(),
        "--placement".into(),
        placement.strategy.as_str().into(),
        "--data-dir".into(),
        dir.display().to_string(),
        "--durability".into(),
        match durability {
            Durability::Full => "full".into(),
            Durability::Normal => "normal".into(),
        },
        "--cross-shard".into(),
        cross_shard.as_str().into(),
        "--fraud".into(),
        if *fraud { "on" } else { "off" }.into(),
        "--webhooks-to-private-networks".into(),
        "--argon2-memory-kib".into(),
        "256".into(),
        "--argon2-iterations".into(),
        "1".into(),
        "--login-limit-per-user".into(),
        "0".into(),
        "--login-limit-per-address".into(),
        "0".into(),
    ];
    let mut env = vec![
        ("SHARDPAY_JWT_SECRET".to_string(), random_secret()),
        (
            "SHARDPAY_ADMIN_PASSWORD".to_string(),
            admin_password.clone(),
        ),
        ("RUST_LOG".to_string(), "warn".to_string()),
    ];
    if let (Some(urls), Some(system_urls)) = (&mysql_urls, &system_mysql_urls) {
        args.push("--mysql-urls".into());
        args.push(system_urls.join(","));
        if let Some(first) = urls.first() {
            let auth = run_database(first, "auth", fresh).await?;
            env.push(("SHARDPAY_AUTH_MYSQL_URL".into(), auth));
            let notify = run_database(first, "notify", fresh).await?;
            env.push(("SHARDPAY_NOTIFICATION_MYSQL_URL".into(), notify));
        }
    }
    if let BusConfig::Kafka(kafka) = with_run_prefix(bus.clone()) {
        args.extend([
            "--kafka".into(),
            kafka.bootstrap,
            "--kafka-prefix".into(),
            kafka.prefix,
        ]);
    }
    if let Some(redis) = &system_redis {
        env.push(("SHARDPAY_REDIS_URL".into(), redis.clone()));
        env.push((
            "SHARDPAY_REDIS_PREFIX".into(),
            format!("shardpay-run-{:08x}:", rand::random::<u32>()),
        ));
    }
    let hooks = scenario
        .faults
        .iter()
        .filter_map(|f| f.step.map(|s| (f.at_ms, s.hook())))
        .collect();
    let spec = crate::nemesis::ChildSpec {
        binary,
        args,
        env,
        log: crate::nemesis::log_path(&dir),
        hooks,
    };
    let mut options = options.clone();
    if let Target::Embedded { bus: b, .. } = &mut options.target {
        *b = bus.clone();
    }
    let child = if six {
        let services = start_six(&spec, port).await?;
        options.services = ["auth", "notification", "analytics"]
            .iter()
            .map(|name| {
                let url = services[*name].url.clone();
                Ok((
                    name.to_string(),
                    shardpay_reference::peers::Replicas::parse(&url)?,
                ))
            })
            .collect::<anyhow::Result<_>>()?;
        for (name, system) in services {
            backends
                .services
                .insert(name.to_string(), Arc::new(tokio::sync::Mutex::new(system)));
        }
        backends.services["shard-manager"].clone()
    } else {
        let url = format!("http://127.0.0.1:{port}");
        let child = crate::nemesis::ChildSystem::start(spec, url)
            .await
            .context("cannot start the reference system as a child process")?;
        Arc::new(tokio::sync::Mutex::new(child))
    };
    let url = child.lock().await.url.clone();
    let options = &options;
    let result = drive(
        scenario,
        options,
        &url,
        backend_of(&options.target),
        started_at,
        Some(admin_password),
        Some(child.clone()),
        backends.clone(),
    )
    .await;
    backends.services.remove("shard-manager");
    let child = Arc::try_unwrap(child)
        .map_err(|_| anyhow::anyhow!("the fault schedule outlived the run"))?
        .into_inner();
    child.stop().await?;
    for (_, service) in std::mem::take(&mut backends.services) {
        if let Ok(service) = Arc::try_unwrap(service) {
            let _ = service.into_inner().stop().await;
        }
    }
    if let Some(local) = backends.redis.take() {
        if let Ok(local) = Arc::try_unwrap(local) {
            local.into_inner().stop().await;
        }
    }
    drop(broker);
    drop(temp);
    result
}

/// The six services, in the order they start.
pub use crate::scenario::faults::SERVICES;

/// Starts the six services as child processes from the all-in-one `spec`:
/// each `serve <service>` on a port of its own (the shard manager on
/// `manager_port`), given its peers' URLs; the shard manager carries the
/// `crash_at` hooks, as it runs the sagas and XA.
async fn start_six(
    spec: &crate::nemesis::ChildSpec,
    manager_port: u16,
) -> anyhow::Result<BTreeMap<&'static str, crate::nemesis::ChildSystem>> {
    let mut ports = BTreeMap::new();
    for name in SERVICES {
        let port = if name == "shard-manager" {
            manager_port
        } else {
            crate::nemesis::free_port()?
        };
        ports.insert(name, port);
    }
    let url = |name: &str| format!("http://127.0.0.1:{}", ports[name]);
    let mut out = BTreeMap::new();
    for name in SERVICES {
        // `serve SERVICE`, then the all-in-one options but the port.
        let mut args = vec!["serve".to_string(), name.to_string()];
        let mut rest = spec.args.iter().skip(1);
        while let Some(arg) = rest.next() {
            if arg == "--port" {
                rest.next();
                continue;
            }
            args.push(arg.clone());
        }
        args.extend([
            "--port".into(),
            ports[name].to_string(),
            "--auth-url".into(),
            url("auth"),
            "--ledger-url".into(),
            url("ledger"),
            "--fraud-url".into(),
            url("fraud"),
            "--notification-url".into(),
            url("notification"),
            "--fraud-features".into(),
            "redis".into(),
        ]);
        let child_spec = crate::nemesis::ChildSpec {
            binary: spec.binary.clone(),
            args,
            env: spec.env.clone(),
            log: spec.log.with_file_name(format!("{name}.log")),
            hooks: if name == "shard-manager" {
                spec.hooks.clone()
            } else {
                Vec::new()
            },
        };
        let system = crate::nemesis::ChildSystem::start(child_spec, url(name))
            .await
            .with_context(|| format!("cannot start the {name} service as a child process"))?;
        out.insert(name, system);
    }
    Ok(out)
}

/// What the run drives, for the report and for how ids are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Sqlite,
    Mysql { fresh: bool },
    Remote,
}

/// One run on a started target: connect, create the accounts, measure the
/// baseline, drive the load, check the books and audit, report.
async fn drive(
    scenario: &Scenario,
    options: &RunOptions,
    base_url: &str,
    backend: Backend,
    started_at: chrono::DateTime<chrono::Utc>,
    admin_password: Option<String>,
    child: Option<Arc<tokio::sync::Mutex<crate::nemesis::ChildSystem>>>,
    backends: crate::nemesis::Backends,
) -> anyhow::Result<RunResult> {
    let cx = RunContext {
        scenario,
        options,
        base_url,
        backend,
        started_at,
        child,
        backends,
        admin_password: admin_password.clone(),
    };
    let (mut api, shard_info) = cx.connect(admin_password.as_deref()).await?;
    // Spare shards (open, for a reshard to grow into) hold no account yet.
    let shards = api
        .placed_shards()
        .await?
        .unwrap_or(shard_info.len())
        .min(shard_info.len());
    let transfers_before: u64 = shard_info.iter().map(|s| s.transfers.total()).sum();
    let accounts = cx
        .create_accounts(&mut api, shards, admin_password.as_deref())
        .await?;
    let baseline = cx.measure_baseline(shards).await?;
    let plan = Plan::new(scenario, accounts.shard_of, shards as u16);
    let mut sim = Sim::new(
        scenario,
        plan,
        accounts.names.clone(),
        accounts.run_id.clone(),
        api.base.clone(),
    );
    if let Some(owners) = accounts.owners {
        sim.set_tokens(owners.tokens);
        sim.credentials = Some((owners.names, owners.password));
        sim.restarts = cx.child.is_some();
    }
    let sim = Arc::new(sim);
    let load = cx.load(&sim, &api).await?;
    if cx.child.is_some() && api.token.is_some() {
        // A restart took the admin's session.
        let password = admin_password.as_deref().unwrap_or_default();
        api.token = Some(api.login("admin", password).await?);
    }

    cx.say("load done; settling the books and auditing".into());
    let names = &accounts.names;
    let accounting =
        check_books(&api, scenario, &sim, names, transfers_before, cx.embedded()).await?;
    let audit = read_audit(&api).await?;
    let sim =
        Arc::try_unwrap(sim).map_err(|_| anyhow::anyhow!("a virtual user outlived the run"))?;
    let run = cx.run_info(shards, accounts.run_id, &sim, &load);
    let machine = Machine::here();
    let resources = load.resources(cx.embedded(), &machine);
    let measured = sim.recorder.finish();
    let faults = cx.child.is_some().then(|| {
        let mut f =
            crate::nemesis::report(&scenario.faults, &load.faults, &measured, scenario.warmup_s);
        f.down_outside_faults |= load.down_at_end;
        f
    });
    let mut report = build_report(
        scenario, measured, accounting, audit, resources, machine, run,
    );
    report.faults = faults;
    report.reshards = load.reshards.clone();
    if let Some(results) = baseline {
        report.baseline = Some(crate::report::Baseline::new(results, &report));
    }
    report.pipeline = settle_pipeline(&api).await;
    if let Some(receiver) = &accounts.receiver {
        let active = accounts_in_completed_transfers(&sim.books);
        report.webhooks = Some(settle_webhooks(&api, receiver, &active).await);
    }
    judge(scenario, &mut report);
    let dir = cx.write_report(&report)?;
    Ok(RunResult { report, dir })
}

/// What every phase of a run reads.
struct RunContext<'a> {
    scenario: &'a Scenario,
    options: &'a RunOptions,
    base_url: &'a str,
    backend: Backend,
    started_at: chrono::DateTime<chrono::Utc>,
    /// With faults: the reference system as a child process.
    child: Option<Arc<tokio::sync::Mutex<crate::nemesis::ChildSystem>>>,
    /// With faults: the shard servers, link proxies and Redis they hit.
    backends: crate::nemesis::Backends,
    admin_password: Option<String>,
}

/// The run's accounts, created on the target.
struct Accounts {
    /// Prefix of the run's account ids and idempotency keys.
    run_id: String,
    /// Account index -> id.
    names: Vec<String>,
    /// With auth on: who owns which account, and their tokens.
    owners: Option<Owners>,
    /// Account index -> shard.
    shard_of: Vec<u16>,
    /// The webhook receiver, on the in-process system.
    receiver: Option<crate::webhooks::Receiver>,
}

/// What the load phase measured of itself.
struct LoadFigures {
    wall_s: f64,
    /// CPU seconds of the whole process during the load.
    cpu_s: f64,
    /// Share of the whole machine's CPU busy during the load.
    machine_busy: Option<f64>,
    /// CPU seconds of the in-process system's threads during the load.
    server_cpu_s: f64,
    /// Ctrl-C ended the load before the scenario's end.
    interrupted: bool,
    /// Requests as goose counted them.
    goose_requests: u64,
    /// The system ran as a child process (its CPU is not in `cpu_s`).
    child_process: bool,
    /// What each fault of the schedule did.
    faults: Vec<crate::nemesis::Happened>,
    /// What each reshard of the schedule did.
    reshards: Vec<crate::report::ReshardRun>,
    /// The child system was found down after the load, outside any fault.
    down_at_end: bool,
}

impl RunContext<'_> {
    /// CPU seconds of the six services but the shard manager (which is
    /// the run's child) so far; 0 with one process.
    async fn other_services_cpu_s(&self) -> f64 {
        let mut cpu = 0.0;
        for (name, service) in &self.backends.services {
            if name != "shard-manager" {
                cpu += service.lock().await.cpu_s();
            }
        }
        cpu
    }

    /// Tells the user how the run goes, when progress is shown.
    fn say(&self, text: String) {
        if self.options.progress {
            eprintln!("{text}");
        }
    }

    /// The target is the in-process system.
    fn embedded(&self) -> bool {
        self.backend != Backend::Remote
    }

    /// Connects to the target and reads its shards, which must all be
    /// healthy.
    async fn connect(&self, admin_password: Option<&str>) -> anyhow::Result<(Api, Vec<ShardInfo>)> {
        let base_url = self.base_url;
        let mut api = Api::new(base_url)?;
        api.services = self.options.services.clone();
        // The shards' figures are for staff: with auth on, the admin logs in
        // first.
        let auth_on = match api.auth_on().await {
            Ok(on) => on,
            // A split deployment's hint (where the auth routes are) is the
            // answer to give.
            Err(e) if e.to_string().contains("--service") => return Err(e),
            // Unreachable: reading the shards below says how to start it.
            Err(_) => false,
        };
        if auth_on {
            let password = admin_password.context(
                "the target has auth on: set SHARDPAY_ADMIN_PASSWORD to the password of its admin user (serve --admin-password), and turn its login rate limits off or up for the run's users",
            )?;
            api.token = Some(api.login("admin", password).await?);
        }
        let shard_info = api.shards().await.with_context(|| {
            format!("cannot read {base_url}/v1/shards; start the system first (shardpay serve) or drop --target")
        })?;
        if let Some(down) = shard_info.iter().find(|s| !s.healthy) {
            bail!(
                "shard {} ({}) is not healthy; fix it before a run",
                down.shard,
                down.name
            );
        }
        Ok((api, shard_info))
    }

    /// Prefix of the run's account ids and idempotency keys. On fresh
    /// embedded shards the ids follow from the seed, so the same seed and
    /// file send the same requests. A target may already hold the ids of an
    /// earlier run, so there each run draws its own.
    fn run_id(&self) -> String {
        // Ids follow from the seed only on shards the run knows are empty.
        let fresh = matches!(
            self.backend,
            Backend::Sqlite | Backend::Mysql { fresh: true }
        );
        if fresh {
            format!(
                "s{:06x}_",
                crate::plan::mix64(self.scenario.seed) & 0xff_ffff
            )
        } else {
            format!("r{:06x}_", rand::rng().random_range(0..0x100_0000u32))
        }
    }

    /// Logs the owners in (with auth on) and creates the run's accounts;
    /// on the in-process system, some of them get webhooks.
    async fn create_accounts(
        &self,
        api: &mut Api,
        shards: usize,
        admin_password: Option<&str>,
    ) -> anyhow::Result<Accounts> {
        let (scenario, progress) = (self.scenario, self.options.progress);
        let run_id = self.run_id();
        let needed = Plan::accounts_needed(scenario);
        let names: Vec<String> = (0..needed).map(|i| format!("{run_id}{i}")).collect();
        self.say(format!(
            "{}: {} shards at {}; creating {} accounts (run id {run_id})",
            scenario.name,
            shards,
            match self.backend {
                Backend::Sqlite => "in-process (SQLite)",
                Backend::Mysql { .. } => "in-process (MySQL shards)",
                Backend::Remote => self.base_url,
            },
            needed
        ));
        let setup_started = Instant::now();
        let owners = sign_in(api, &run_id, needed as usize, admin_password, progress).await?;
        let of_account = owners.as_ref().map(|o| o.of_account.as_slice());
        let shard_of = setup(api, scenario, &names, of_account, progress).await?;
        // Webhooks for some accounts, on the in-process system, or a target
        // said to reach this machine's loopback.
        let receiver = if self.embedded() || self.options.webhooks {
            crate::webhooks::Receiver::start(api, &names).await?
        } else {
            None
        };
        self.say(format!(
            "accounts created in {:.2} s",
            setup_started.elapsed().as_secs_f64()
        ));
        Ok(Accounts {
            run_id,
            names,
            owners,
            shard_of,
            receiver,
        })
    }

    /// With `--baseline`: the raw-database baseline of each kind of
    /// transfer the scenario sends, measured before the load, on the same
    /// kind of storage as the run's system (fresh SQLite files with the
    /// same durability, or databases beside the MySQL shards').
    async fn measure_baseline(&self, shards: usize) -> anyhow::Result<Option<Vec<BaselineResult>>> {
        let Some(seconds) = self.options.baseline_s else {
            return Ok(None);
        };
        let Target::Embedded {
            mysql,
            cross_shard,
            durability,
            ..
        } = &self.options.target
        else {
            bail!("--baseline measures the storage of the system this run starts; a run against --target has no storage of its own to measure")
        };
        let concurrency = self.scenario.load.users() as usize;
        let mut results = Vec::new();
        let kinds = baseline_kinds(self.scenario, shards, *cross_shard);
        match mysql {
            Some(m) => {
                let urls: Vec<String> = m.urls.iter().take(shards).cloned().collect();
                for kind in kinds {
                    self.say(format!("raw-database baseline, {kind:?}, {seconds} s"));
                    results.push(crate::baseline::run(&urls, kind, concurrency, seconds).await?);
                }
            }
            None => {
                let dir = tempfile::Builder::new()
                    .prefix("shardpay-baseline-")
                    .tempdir()
                    .context("cannot create a folder for the baseline's shard files")?;
                let config = SqliteConfig {
                    durability: *durability,
                    ..SqliteConfig::default()
                };
                for kind in kinds {
                    self.say(format!("raw SQLite baseline, {kind:?}, {seconds} s"));
                    results.push(
                        crate::baseline::run_sqlite(
                            dir.path(),
                            shards,
                            &config,
                            kind,
                            concurrency,
                            seconds,
                        )
                        .await?,
                    );
                }
            }
        }
        Ok(Some(results))
    }

    /// Drives the load with live progress, and the fault schedule beside
    /// it; times it and the CPU it costs.
    async fn load(&self, sim: &Arc<Sim>, api: &Api) -> anyhow::Result<LoadFigures> {
        let _live = match self.options.live {
            Some(port) => {
                let view = crate::live::start(
                    port,
                    sim.clone(),
                    api.clone(),
                    &self.scenario.name,
                    self.scenario.warmup_s,
                )
                .await?;
                eprintln!(
                    "live view: {} (open it in a browser; the charts move every second)",
                    view.url
                );
                Some(view)
            }
            None => None,
        };
        let (progress, bar) = spawn_progress(sim.clone(), self.scenario, self.options.progress);
        let (cpu0, server0) = cpu_seconds();
        let machine0 = crate::machine::machine_ticks();
        let child_cpu0 = match &self.child {
            Some(child) => child.lock().await.cpu_s() + self.other_services_cpu_s().await,
            None => 0.0,
        };
        let nemesis = self.child.as_ref().map(|child| {
            tokio::spawn(crate::nemesis::apply(
                self.scenario.faults.clone(),
                child.clone(),
                sim.clone(),
                api.clone(),
                self.admin_password.clone(),
                self.scenario.stop.seconds().map(Duration::from_secs),
                self.backends.clone(),
                self.options.progress,
            ))
        });
        let wall = Instant::now();
        let reshards = (!self.scenario.reshards.is_empty()).then(|| {
            tokio::spawn(crate::reshard::apply(
                self.scenario.reshards.clone(),
                api.clone(),
                self.admin_password.clone(),
                sim.marks.clone(),
                wall,
                chrono::Utc::now().timestamp_millis(),
                self.options.progress,
            ))
        });
        let window = tokio::spawn(measured_window_busy(
            sim.clone(),
            Duration::from_secs(self.scenario.warmup_s),
            self.scenario.stop.seconds().map(Duration::from_secs),
        ));
        let goose = driver::attack(self.scenario, sim.clone()).await;
        let wall_s = wall.elapsed().as_secs_f64();
        let (cpu1, server1) = cpu_seconds();
        let whole_load = crate::machine::busy_share(machine0, crate::machine::machine_ticks());
        let window_busy = if window.is_finished() {
            window.await.ok().flatten()
        } else {
            window.abort();
            None
        };
        let machine_busy = window_busy.or(whole_load);
        progress.abort();
        bar.finish_and_clear();
        let interrupted = stopped_early(self.scenario.stop, sim.executed(), wall_s);
        let reshards = match reshards {
            Some(task) if goose.is_err() || interrupted => {
                task.abort();
                Vec::new()
            }
            Some(task) => task.await.context("the reshard schedule failed")?,
            None => Vec::new(),
        };
        let faults = match nemesis {
            // The load failed or was stopped: the schedule stops too.
            Some(task) if goose.is_err() || interrupted => {
                task.abort();
                Vec::new()
            }
            Some(task) => task.await.context("the fault schedule failed")?,
            None => Vec::new(),
        };
        let mut down_at_end = false;
        let child_cpu_s = match &self.child {
            Some(child) => {
                // A Redis the run started, left down by a schedule stopped
                // halfway, is started again for the books.
                if let Some(redis) = &self.backends.redis {
                    if redis.lock().await.ensure_running().await? {
                        let mut api = api.clone();
                        let password = self.admin_password.as_deref();
                        crate::nemesis::log_in_again(&mut api, sim, password).await?;
                    }
                }
                let others = self.other_services_cpu_s().await;
                // A service other than the manager that died outside a
                // fault is started again too, and fails the run.
                for (name, service) in &self.backends.services {
                    if name != "shard-manager" && service.lock().await.ensure_running().await? {
                        down_at_end = true;
                    }
                }
                let mut child = child.lock().await;
                let cpu = child.cpu_s() + others - child_cpu0;
                // The books and the audit need the system: one that died
                // outside a fault is started again, and the run fails.
                if child.ensure_running().await? {
                    down_at_end = true;
                    let mut api = api.clone();
                    let password = self.admin_password.as_deref();
                    crate::nemesis::log_in_again(&mut api, sim, password).await?;
                }
                Some(cpu)
            }
            None => None,
        };
        goose?;
        if interrupted {
            self.say(
                "interrupted: the load stopped early; settling the books and auditing what ran"
                    .into(),
            );
        }
        // goose runs the users; each request goes to its user's client
        // (see `driver::send_user_to`), counted as sent.
        let goose_requests = sim.sent.load(std::sync::atomic::Ordering::Relaxed);
        Ok(LoadFigures {
            wall_s,
            cpu_s: cpu1 - cpu0,
            machine_busy,
            server_cpu_s: child_cpu_s.unwrap_or(server1 - server0),
            child_process: child_cpu_s.is_some(),
            interrupted,
            goose_requests,
            faults,
            reshards,
            down_at_end,
        })
    }

    /// The run's facts for its report (the measured length is set with the
    /// measurements).
    fn run_info(&self, shards: usize, run_id: String, sim: &Sim, load: &LoadFigures) -> RunInfo {
        let target = &self.options.target;
        RunInfo {
            started_at: self
                .started_at
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            shards,
            backend: match self.backend {
                Backend::Sqlite => "sqlite".into(),
                Backend::Mysql { .. } => "mysql".into(),
                Backend::Remote => "remote".into(),
            },
            cross_shard: match target {
                Target::Embedded { cross_shard, .. } => cross_shard.as_str().into(),
                Target::Url(_) => "as configured on the target".into(),
            },
            bus: match target {
                Target::Embedded { bus, .. } => bus.describe(),
                Target::Url(_) => "as configured on the target".into(),
            },
            auth: if sim.owners() == 0 {
                "off".into()
            } else {
                format!("on: {} users own the accounts", sim.owners())
            },
            target: if self.embedded() {
                "embedded".into()
            } else {
                self.base_url.to_string()
            },
            git_commit: git_commit(),
            simulator_version: env!("CARGO_PKG_VERSION").into(),
            run_id,
            accounts: sim.names.len() as u64,
            warmup_s: self.scenario.warmup_s,
            measured_s: 0.0,
            operations: sim.executed(),
            users: self.scenario.load.users(),
            goose_requests: load.goose_requests,
            interrupted: load.interrupted,
            schedule: sim.schedule_lag(),
        }
    }

    /// Writes report.json, report.html and summary.txt into a new folder of
    /// the run's own; returns the folder.
    fn write_report(&self, report: &Report) -> anyhow::Result<PathBuf> {
        let stamp = self.started_at.format("%Y%m%dT%H%M%SZ").to_string();
        let dir = report_dir(&self.options.reports_dir, &self.scenario.name, &stamp)?;
        report.write(&dir.join("report.json"))?;
        std::fs::write(dir.join("report.html"), crate::html::render(report))
            .with_context(|| format!("cannot write {}", dir.join("report.html").display()))?;
        std::fs::write(dir.join("summary.txt"), report.summary())?;
        Ok(dir)
    }
}

impl LoadFigures {
    /// The CPU the load cost: the simulator's own, apart from the
    /// in-process system's.
    fn resources(&self, embedded: bool, machine: &Machine) -> Resources {
        let simulator_cpu_s = if embedded && !self.child_process {
            self.cpu_s - self.server_cpu_s
        } else {
            self.cpu_s
        };
        Resources {
            simulator_cpu_s,
            system_cpu_s: embedded.then_some(self.server_cpu_s),
            wall_s: self.wall_s,
            simulator_cpu_share: simulator_cpu_s / (self.wall_s * machine.cpus as f64).max(1e-9),
            // Set from the report's request count once it is built.
            simulator_cpu_us_per_request: 0.0,
            system_threads: (embedded && !self.child_process).then(server_threads),
            machine_busy: self.machine_busy,
        }
    }
}

/// Ctrl-C makes goose end the attack early: fewer operations than the
/// count, or less time than the length.
fn stopped_early(stop: Stop, executed: u64, wall_s: f64) -> bool {
    match stop {
        Stop::Requests { count } => executed < count,
        Stop::Duration { seconds } => wall_s < seconds as f64,
        Stop::Either { seconds, count } => executed < count && wall_s < seconds as f64,
    }
}

/// The kinds of transfer the baseline measures for a scenario: same-shard
/// when it sends any (or there is one shard), cross-shard made atomic as
/// the system makes it when it sends any across shards.
fn baseline_kinds(
    scenario: &Scenario,
    shards: usize,
    cross_shard: CrossShard,
) -> Vec<BaselineKind> {
    let mut kinds = Vec::new();
    if scenario.mix.same_shard > 0 || shards == 1 {
        kinds.push(BaselineKind::SameShard);
    }
    if scenario.mix.cross_shard > 0 && shards > 1 {
        kinds.push(match cross_shard {
            CrossShard::Saga => BaselineKind::CrossShard,
            CrossShard::Xa => BaselineKind::CrossShardXa,
        });
    }
    kinds
}

/// The system's audit: passed, or which checks failed.
async fn read_audit(api: &Api) -> anyhow::Result<Audit> {
    let raw = api.audit().await?;
    let ok = raw["ok"].as_bool().unwrap_or(false);
    Ok(Audit {
        ok,
        summary: if ok {
            "every audit check passed".into()
        } else {
            format!("failed: {}", crate::api::failed_checks(&raw).join("; "))
        },
        raw,
    })
}

/// Settles unknown answers, waits for pending transfers, and checks the
/// books against the system.
async fn check_books(
    api: &Api,
    scenario: &Scenario,
    sim: &Sim,
    names: &[String],
    transfers_before: u64,
    embedded: bool,
) -> anyhow::Result<Accounting> {
    let (settled, unsettled) = driver::settle_unknown(sim).await?;
    let mut entries = sim.books.entries();
    let accepted_ids = accepted_ids(&entries);
    let distinct: HashSet<&String> = accepted_ids.iter().collect();
    let mut checks = vec![Check {
        name: "one transfer per idempotency key".into(),
        ok: distinct.len() == accepted_ids.len(),
        detail: format!(
            "{} accepted keys, {} distinct transfer ids",
            accepted_ids.len(),
            distinct.len()
        ),
    }];
    let found = lookup_once_finished(api, &accepted_ids).await?;
    checks.extend(check_found(&mut entries, &found, names));
    let (violation_count, violations, retry_groups) = sim.books.violations();
    checks.push(Check {
        name: "idempotent retries replayed the first answer".into(),
        ok: violation_count == 0,
        detail: format!("{retry_groups} retry groups, {violation_count} violations"),
    });
    checks.push(Check {
        name: "every request has a final answer".into(),
        ok: unsettled == 0,
        detail: format!("{settled} settled after the run by resending, {unsettled} unsettled"),
    });
    let (hostile, wrong, examples) = sim.hostile.get();
    if hostile > 0 {
        checks.push(Check {
            name: "hostile requests refused as they must be".into(),
            ok: wrong == 0,
            detail: match wrong {
                0 => format!("{hostile} hostile requests, each refused with its 4xx and code"),
                _ => format!(
                    "{wrong} of {hostile} answered otherwise: {}",
                    examples.join("; ")
                ),
            },
        });
    }
    checks.extend(check_balances(api, scenario, sim, names, &entries).await?);
    let accepted = distinct.len() as u64;
    checks.push(check_transfer_count(api, transfers_before, accepted, embedded).await?);

    let declined = entries
        .iter()
        .filter(|(_, e)| matches!(e.outcome, Outcome::Declined { .. }))
        .count() as u64;
    let fraud = accounting::Fraud::from_entries(entries.iter().map(|(_, e)| e));
    Ok(Accounting {
        ok: checks.iter().all(|c| c.ok),
        checks,
        transfers_sent: entries.len() as u64,
        transfers_accepted: accepted,
        transfers_declined: declined,
        settled_after_run: settled,
        resent_unanswered: sim.resent.load(std::sync::atomic::Ordering::Relaxed),
        unsettled,
        retry_groups,
        violations,
        fraud,
    })
}

/// The transfer id of every accepted entry.
fn accepted_ids(entries: &[(String, Entry)]) -> Vec<String> {
    entries
        .iter()
        .filter_map(|(_, e)| match &e.outcome {
            Outcome::Accepted { id, .. } => Some(id.clone()),
            _ => None,
        })
        .collect()
}

/// Reads the transfers once none is pending any more, or as they stand
/// after [`PENDING_DEADLINE`].
async fn lookup_once_finished(api: &Api, ids: &[String]) -> anyhow::Result<Vec<TransferView>> {
    let deadline = Instant::now() + PENDING_DEADLINE;
    loop {
        let found = api.lookup(ids).await?;
        let pending = found.iter().filter(|t| t.state == "pending").count();
        if pending == 0 || Instant::now() >= deadline {
            return Ok(found);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Checks that every accepted transfer exists with the payer, payee and
/// amount it was sent with, and has finished; records on each accepted
/// entry the state the system gives it.
fn check_found(
    entries: &mut [(String, Entry)],
    found: &[TransferView],
    names: &[String],
) -> [Check; 2] {
    let by_id: HashMap<&str, &TransferView> = found.iter().map(|t| (t.id.as_str(), t)).collect();
    let mut missing = 0;
    // The first few that differ, for the detail.
    let mut mismatched = Vec::new();
    let mut still_pending = 0;
    for (_, e) in entries.iter_mut() {
        let Outcome::Accepted { id, state } = &mut e.outcome else {
            continue;
        };
        let Some(t) = by_id.get(id.as_str()) else {
            missing += 1;
            continue;
        };
        let as_sent = t.from == names[e.payer as usize]
            && t.to == names[e.payee as usize]
            && t.amount_minor == e.amount_minor;
        if !as_sent && mismatched.len() < 5 {
            mismatched.push(format!("{id}: {} -> {} {}", t.from, t.to, t.amount_minor));
        }
        if t.state == "pending" {
            still_pending += 1;
        }
        *state = t.state.clone();
    }
    let exists = missing == 0 && mismatched.is_empty();
    [
        Check {
            name: "every accepted transfer exists as sent".into(),
            ok: exists,
            detail: if exists {
                format!(
                    "{} transfers found with their payer, payee and amount",
                    found.len()
                )
            } else {
                format!(
                    "{missing} missing, {} differ from what was sent {}",
                    mismatched.len(),
                    mismatched.join("; ")
                )
            },
        },
        Check {
            name: "every accepted transfer finished".into(),
            ok: still_pending == 0,
            detail: format!(
                "{still_pending} still pending after waiting up to {} s",
                PENDING_DEADLINE.as_secs()
            ),
        },
    ]
}

/// Each account's balance against the books, and the money total against
/// the opening balances.
async fn check_balances(
    api: &Api,
    scenario: &Scenario,
    sim: &Sim,
    names: &[String],
    entries: &[(String, Entry)],
) -> anyhow::Result<[Check; 2]> {
    let opening = opening_balances(scenario, names.len());
    let expected = accounting::expected_balances(entries, &opening);
    let actual = api.balances(&sim.key_prefix).await?;
    let each = accounting::balance_check(names, &expected, &actual);
    let total_before: i128 = opening.iter().map(|m| *m as i128).sum();
    let total_after: i128 = actual.values().map(|m| *m as i128).sum();
    let total = Check {
        name: "money total unchanged".into(),
        ok: total_before == total_after && actual.len() == names.len(),
        detail: format!(
            "{} accounts hold {total_after} minor units; they opened with {total_before}",
            actual.len()
        ),
    };
    Ok([each, total])
}

/// The system's transfer count grew by the transfers accepted: exactly, on
/// the in-process system; at least, on a target other clients may use.
async fn check_transfer_count(
    api: &Api,
    transfers_before: u64,
    accepted: u64,
    embedded: bool,
) -> anyhow::Result<Check> {
    let shard_info = api.shards().await?;
    let transfers_after: u64 = shard_info.iter().map(|s| s.transfers.total()).sum();
    let grew = transfers_after - transfers_before.min(transfers_after);
    Ok(Check {
        name: "no transfer beyond those accepted".into(),
        ok: grew == accepted || !embedded && grew > accepted,
        detail: format!(
            "the system's transfer count grew by {grew}; the simulator saw {accepted} accepted{}",
            if embedded {
                ""
            } else {
                " (other clients of the target would add to the count)"
            }
        ),
    })
}

/// The report of a run from what it measured, with its thresholds not yet
/// judged.
fn build_report(
    scenario: &Scenario,
    m: Measured,
    accounting: Accounting,
    audit: Audit,
    resources: Resources,
    machine: Machine,
    mut run: RunInfo,
) -> Report {
    let measured_s = (m.last_at.as_secs_f64() - scenario.warmup_s as f64).max(1e-3);
    run.measured_s = (measured_s * 1000.0).round() / 1000.0;
    let totals = totals(m.counts, measured_s);
    let mut resources = resources;
    resources.simulator_cpu_us_per_request =
        resources.simulator_cpu_s * 1e6 / (totals.counts.requests as f64).max(1.0);
    let latency = latency(&m);
    let by_kind = m
        .counts_by_kind
        .iter()
        .map(|(k, c)| (k.as_str().to_string(), *c))
        .collect();
    let mut timeline = timeline(scenario.warmup_s, run.shards, m.timeline, m.timeline_errors);
    timeline.requests = m.timeline_requests;
    timeline.p99_ms = m
        .timeline_p99_us
        .iter()
        .map(|&us| us as f64 / 1000.0)
        .collect();
    timeline.drift = timeline.drift();
    let outcomes = outcome_rows(m.outcomes);
    Report {
        schema: SCHEMA.into(),
        scenario: ScenarioInfo {
            name: scenario.name.clone(),
            file: scenario.file.clone(),
            seed: scenario.seed,
            model: scenario.load.model().into(),
            source: scenario.source.clone(),
        },
        run,
        machine,
        totals,
        by_kind,
        latency,
        timeline,
        outcomes,
        accounting,
        audit,
        thresholds: Vec::new(),
        baseline: None,
        pipeline: None,
        webhooks: None,
        faults: None,
        reshards: Vec::new(),
        resources,
        passed: false,
        failures: Vec::new(),
    }
}

/// Counts and rates over the measured window.
fn totals(counts: Counts, measured_s: f64) -> Totals {
    Totals {
        counts,
        tps: counts.accepted as f64 / measured_s,
        rps: counts.requests as f64 / measured_s,
        error_rate: if counts.requests == 0 {
            0.0
        } else {
            counts.errors as f64 / counts.requests as f64
        },
    }
}

/// The latency histograms: all requests, by kind, by payer shard and by
/// shard pair.
fn latency(m: &Measured) -> Latency {
    Latency {
        all: Hist::of(&m.all),
        kinds: m
            .kinds
            .iter()
            .map(|(k, h)| (k.as_str().to_string(), Hist::of(h)))
            .collect(),
        shards: m
            .shards
            .iter()
            .map(|(s, h)| (s.to_string(), Hist::of(h)))
            .collect(),
        pairs: m
            .pairs
            .iter()
            .map(|((a, b), h)| (format!("{a}->{b}"), Hist::of(h)))
            .collect(),
    }
}

/// Accepted transfers per second for every shard (zero where it had none),
/// and errors per second.
fn timeline(
    warmup_s: u64,
    shard_count: usize,
    per_second: Vec<BTreeMap<u16, u64>>,
    errors: Vec<u64>,
) -> Timeline {
    let mut shards: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for shard in 0..shard_count as u16 {
        shards.insert(
            shard.to_string(),
            per_second
                .iter()
                .map(|second| second.get(&shard).copied().unwrap_or(0))
                .collect(),
        );
    }
    Timeline {
        interval_s: 1,
        warmup_s,
        shards,
        errors,
        requests: Vec::new(),
        p99_ms: Vec::new(),
        drift: None,
    }
}

/// The answers by status and code, most frequent first.
fn outcome_rows(outcomes: BTreeMap<(u16, String), u64>) -> Vec<OutcomeRow> {
    let mut rows: Vec<OutcomeRow> = outcomes
        .into_iter()
        .map(|((status, code), count)| OutcomeRow {
            status,
            code,
            count,
        })
        .collect();
    rows.sort_by(|a, b| b.count.cmp(&a.count));
    rows
}

/// How long a run waits, after the audit, for the event pipeline to apply
/// every committed event.
const PIPELINE_WAIT: Duration = Duration::from_secs(30);

/// The pipeline once every consumer has caught up, or as it stands after
/// [`PIPELINE_WAIT`]; `None` for a system without one (or that fails to
/// say).
async fn settle_pipeline(api: &Api) -> Option<shardpay_reference::pipeline::PipelineReport> {
    let deadline = Instant::now() + PIPELINE_WAIT;
    loop {
        let report = match api.pipeline().await {
            Ok(report) => report?,
            // A fault can leave a first read failing (a service's session
            // with its peers died with Redis and is opened again): retry.
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            Err(e) => {
                tracing::warn!("cannot read the event pipeline: {e:#}");
                return None;
            }
        };
        if report.complete || Instant::now() >= deadline {
            return Some(report);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The receiver's figures once the deliveries the system made have all
/// arrived and none is still being retried (up to [`PIPELINE_WAIT`]).
async fn settle_webhooks(
    api: &Api,
    receiver: &crate::webhooks::Receiver,
    active: &HashSet<usize>,
) -> crate::webhooks::WebhookReport {
    let deadline = Instant::now() + PIPELINE_WAIT;
    let mut last = None;
    loop {
        let (delivered, dead) = match api.pipeline().await {
            Ok(Some(p)) => p
                .notification
                .map(|n| (n.delivered, n.dead_lettered))
                .unwrap_or((0, 0)),
            _ => (0, 0),
        };
        let now = (delivered, dead, receiver.distinct());
        if (last == Some(now) && now.2 == delivered) || Instant::now() >= deadline {
            return receiver.report(delivered, dead, active);
        }
        last = Some(now);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The accounts (by index) that paid or were paid in a transfer the books
/// saw completed: each has events its webhooks must be sent.
fn accounts_in_completed_transfers(books: &crate::accounting::Books) -> HashSet<usize> {
    books
        .entries()
        .into_iter()
        .filter(
            |(_, e)| matches!(&e.outcome, Outcome::Accepted { state, .. } if state == "completed"),
        )
        .flat_map(|(_, e)| [e.payer as usize, e.payee as usize])
        .collect()
}

/// Judges the scenario's thresholds; sets `passed` and `failures`.
/// A reshard must finish, and every audit around it pass.
fn reshard_result(r: &crate::report::ReshardRun) -> ThresholdResult {
    let problems = r.problems();
    ThresholdResult {
        name: format!("reshard to {} shards (line {})", r.to, r.line),
        limit: "finishes; audits before, during and after pass".into(),
        actual: if problems.is_empty() {
            format!(
                "{} of {} accounts moved, {} audits passed",
                r.figure("accounts_moved").unwrap_or(0.0),
                r.figure("accounts_scanned").unwrap_or(0.0),
                r.audits.len()
            )
        } else {
            problems.join("; ")
        },
        ok: problems.is_empty(),
    }
}

pub fn judge(scenario: &Scenario, report: &mut Report) {
    let t = &scenario.thresholds;
    let mut results = latency_results(&t.p99_ms, &report.latency);
    match &report.faults {
        // With faults, the error rate bounds the requests outside them, and
        // the faults have limits of their own.
        Some(faults) => {
            let outside = Totals {
                error_rate: faults.outside_error_rate,
                ..report.totals.clone()
            };
            results.extend(rate_results(t, &outside).into_iter().map(|mut r| {
                if r.name == "error rate" {
                    r.name = "error rate outside faults".into();
                }
                r
            }));
            results.extend(fault_results(t, faults));
        }
        None => results.extend(rate_results(t, &report.totals)),
    }
    results.extend(drift_result(t, &report.timeline));
    results.extend(report.reshards.iter().map(reshard_result));
    if t.audit {
        results.extend(report.pipeline.as_ref().map(pipeline_result));
        results.extend(report.webhooks.as_ref().map(webhooks_result));
        results.push(audit_result(&report.audit, &report.accounting));
    }
    if report.run.interrupted {
        results.push(ThresholdResult {
            name: "run completed".into(),
            limit: "the whole scenario".into(),
            actual: "interrupted (Ctrl-C) before its end".into(),
            ok: false,
        });
    }
    report.failures = results
        .iter()
        .filter(|r| !r.ok)
        .map(|r| format!("{}: {} (limit {})", r.name, r.actual, r.limit))
        .collect();
    report.passed = report.failures.is_empty();
    report.thresholds = results;
}

/// Each p99 limit against its kind's latency ("all": every request's); a
/// kind without requests fails its limit.
fn latency_results(limits_ms: &BTreeMap<String, f64>, latency: &Latency) -> Vec<ThresholdResult> {
    limits_ms
        .iter()
        .map(|(kind, limit_ms)| {
            let hist = if kind == "all" {
                Some(&latency.all)
            } else {
                latency.kinds.get(kind)
            };
            let (actual, ok) = match hist.filter(|h| h.count > 0) {
                Some(h) => {
                    let ms = h.p99_us as f64 / 1000.0;
                    (format!("{ms:.2} ms"), ms <= *limit_ms)
                }
                None => ("no requests of this kind".into(), false),
            };
            ThresholdResult {
                name: format!("p99 latency, {kind}"),
                limit: format!("<= {limit_ms} ms"),
                actual,
                ok,
            }
        })
        .collect()
}

/// The error-rate and transfers-per-second limits the scenario sets.
fn rate_results(t: &Thresholds, totals: &Totals) -> Vec<ThresholdResult> {
    let error_rate = t.error_rate.map(|limit| ThresholdResult {
        name: "error rate".into(),
        limit: format!("<= {:.3}%", limit * 100.0),
        actual: format!("{:.3}%", totals.error_rate * 100.0),
        ok: totals.error_rate <= limit,
    });
    let tps = t.min_tps.map(|limit| ThresholdResult {
        name: "transfers per second".into(),
        limit: format!(">= {limit}"),
        actual: format!("{:.1}", totals.tps),
        ok: totals.tps >= limit,
    });
    error_rate.into_iter().chain(tps).collect()
}

/// The slowdown limit: the measured window's last tenth against its first.
fn drift_result(t: &Thresholds, timeline: &crate::report::Timeline) -> Option<ThresholdResult> {
    let limit = t.max_slowdown?;
    let (actual, ok) = match timeline.drift {
        Some(d) => (
            format!(
                "{:+.1}% ({:.0}/s in the first {} s, {:.0}/s in the last {} s)",
                d.change * 100.0,
                d.first_tps,
                d.tenth_s,
                d.last_tps,
                d.tenth_s
            ),
            d.change >= -limit,
        ),
        None => (
            "not measured: the measured window needs at least ten whole seconds with transfers"
                .into(),
            false,
        ),
    };
    Some(ThresholdResult {
        name: "slowdown over the run".into(),
        limit: format!("<= {:.1}% slower at the end", limit * 100.0),
        actual,
        ok,
    })
}

/// Each fault's recovery and audit, and the error budget of the requests
/// they affect.
fn fault_results(t: &Thresholds, faults: &crate::report::Faults) -> Vec<ThresholdResult> {
    let mut results = Vec::new();
    if let Some(limit) = t.fault_error_rate {
        results.push(ThresholdResult {
            name: "error rate during faults".into(),
            limit: format!("<= {:.3}%", limit * 100.0),
            actual: format!("{:.3}%", faults.inside_error_rate * 100.0),
            ok: faults.inside_error_rate <= limit,
        });
    }
    for f in &faults.faults {
        if f.hit_s.is_some() && f.healed_s.is_none() {
            results.push(ThresholdResult {
                name: format!("fault {}: system back", f.name),
                limit: "listening again after the fault".into(),
                actual: f.notes.join("; "),
                ok: false,
            });
        }
        if f.hit_s.is_none() {
            results.push(ThresholdResult {
                name: format!("fault {}: hit", f.name),
                limit: "the fault took the system down".into(),
                actual: f.notes.join("; "),
                ok: false,
            });
        }
        if let Some(limit) = t.max_recovery_s {
            let (actual, ok) = match (f.recovered_after_s, &f.recovery_unmeasured) {
                (Some(s), _) => (format!("{s:.1} s"), s <= limit),
                (None, _) if f.hit_s.is_none() => ("the fault never hit".into(), true),
                (None, Some(why)) => (format!("not measured: {why}"), true),
                (None, None) => (
                    "not back to full throughput before the run ended".into(),
                    false,
                ),
            };
            results.push(ThresholdResult {
                name: format!("fault {}: recovery", f.name),
                limit: format!("<= {limit} s"),
                actual,
                ok,
            });
        }
        if t.audit && f.healed_s.is_some() {
            let (actual, ok) = match f.audit_ok {
                Some(true) => ("passed".to_string(), true),
                Some(false) => (format!("failed: {}", f.audit_failures.join("; ")), false),
                None => (format!("not run: {}", f.notes.join("; ")), false),
            };
            results.push(ThresholdResult {
                name: format!("fault {}: audit after the heal", f.name),
                limit: "passes".into(),
                actual,
                ok,
            });
        }
    }
    if faults.down_outside_faults {
        results.push(ThresholdResult {
            name: "system up outside faults".into(),
            limit: "no crash the schedule did not make".into(),
            actual: "the system crashed outside the schedule; see system.log in its data directory"
                .into(),
            ok: false,
        });
    }
    results
}

/// Every committed event applied once by every consumer.
fn pipeline_result(p: &shardpay_reference::pipeline::PipelineReport) -> ThresholdResult {
    let unapplied: u64 = p.unapplied.values().sum();
    ThresholdResult {
        name: "event pipeline complete".into(),
        limit: "every committed event applied once by every consumer".into(),
        actual: if p.complete {
            format!("{} events, all applied", p.outbox_rows)
        } else {
            format!(
                "{unapplied} of {} events not applied, {} unpublished",
                p.outbox_rows, p.outbox_backlog
            )
        },
        ok: p.complete,
    }
}

/// Every webhook delivery verifies, and every one the system made arrived.
fn webhooks_result(w: &crate::webhooks::WebhookReport) -> ThresholdResult {
    ThresholdResult {
        name: "webhooks signed and delivered".into(),
        limit: "every delivery verifies; every delivery the system made arrived; every hooked account with a completed transfer got deliveries".into(),
        actual: format!(
            "{} arrived of {} delivered, {} bad signatures, {} dead-lettered, {} hooked accounts with transfers got none",
            w.distinct, w.system_delivered, w.bad_signatures, w.system_dead_lettered, w.hooks_missed
        ),
        ok: w.ok,
    }
}

/// The system's audit and the simulator's own accounting both pass.
fn audit_result(audit: &Audit, accounting: &Accounting) -> ThresholdResult {
    ThresholdResult {
        name: "audit and accounting".into(),
        limit: "pass".into(),
        actual: match (audit.ok, accounting.ok) {
            (true, true) => "passed".into(),
            (false, true) => format!("audit {}", audit.summary),
            (true, false) => "accounting failed".into(),
            (false, false) => "audit and accounting failed".into(),
        },
        ok: audit.ok && accounting.ok,
    }
}

/// Kinds in the order reports list them.
pub fn kind_names() -> Vec<&'static str> {
    Kind::ALL.iter().map(|k| k.as_str()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_soak_that_slows_more_than_its_limit_fails() {
        let t = Thresholds {
            max_slowdown: Some(0.05),
            ..Thresholds::default()
        };
        let with = |change: Option<f64>| crate::report::Timeline {
            interval_s: 1,
            warmup_s: 0,
            shards: Default::default(),
            errors: Vec::new(),
            requests: Vec::new(),
            p99_ms: Vec::new(),
            drift: change.map(|c| crate::report::Drift {
                first_tps: 1000.0,
                last_tps: 1000.0 * (1.0 + c),
                change: c,
                tenth_s: 60,
            }),
        };
        let judged = |c| drift_result(&t, &with(c)).unwrap();
        assert!(judged(Some(-0.02)).ok);
        assert!(judged(Some(0.3)).ok, "faster at the end is fine");
        let slow = judged(Some(-0.08));
        assert!(!slow.ok);
        assert!(slow.actual.starts_with("-8.0%"), "{}", slow.actual);
        let short = judged(None);
        assert!(!short.ok, "a soak too short to measure does not pass");
        assert!(short.actual.contains("ten whole seconds"));
        assert!(drift_result(&Thresholds::default(), &with(Some(-0.5))).is_none());
    }
}
