//! The simulator's commands: `run`, `sweep` and `compare`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use shardpay_reference::ledger::sqlite::Durability;
use shardpay_simulator::compare::{self, Comparison};
use shardpay_simulator::report::Report;
use shardpay_simulator::run::{self, MysqlShards, RunOptions, Target};
use shardpay_simulator::scenario::{self, Scenario};

use crate::{CrossShardArg, DurabilityArg, OnOff};
use shardpay_reference::manager::CrossShard;

#[derive(clap::Args)]
pub struct RunArgs {
    /// Scenario file (TOML); see scenarios/README.md. Try scenarios/mixed.toml.
    pub scenario: PathBuf,
    /// Drive a system already running at this URL instead of starting the
    /// reference system in-process. Several (the shard manager's replicas),
    /// separated by commas or as repeated --target: requests go to each in
    /// turn, and one that refuses a connection is skipped.
    #[arg(long, env = "SHARDPAY_TARGET", value_delimiter = ',')]
    pub target: Vec<String>,
    /// With --target on a deployment of six services: where another
    /// service answers, as NAME=URL (auth, notification, analytics; the URL
    /// may be several, separated by commas, for its replicas); repeat for
    /// each. Those left out answer at --target. Example:
    /// --service auth=http://127.0.0.1:8001 --service notification=http://127.0.0.1:8004 --service analytics=http://127.0.0.1:8005
    #[arg(long = "service", value_name = "NAME=URL", requires = "target")]
    pub services: Vec<String>,
    #[command(flatten)]
    pub embedded: EmbeddedArgs,
    /// Replace the scenario's seed (same seed and file: same requests).
    #[arg(long)]
    pub seed: Option<u64>,
    /// How the in-process system makes cross-shard transfers atomic: saga
    /// (any backend) or xa (two-phase commit; needs --backend mysql). The
    /// report records it; `shardpay sweep --cross-shard saga,xa` compares.
    #[arg(long, value_enum, default_value = "saga")]
    pub cross_shard: CrossShardArg,
    /// Fraud checks on the in-process system (default rules): on, or off to
    /// let every transfer through to the ledger.
    #[arg(long, value_enum, default_value = "on")]
    pub fraud: OnOff,
    /// The in-process system publishes its events to this Kafka-protocol
    /// broker (host:port) instead of its in-process bus; the run's topics
    /// get a prefix of their own. scripts/kafka.sh up starts one.
    #[arg(long, env = "SHARDPAY_KAFKA_BOOTSTRAP")]
    pub kafka: Option<String>,
    /// The in-process system keeps sessions, rate limits and idempotency
    /// locks in this Redis (redis://host:port) instead of in memory. Its
    /// auth is always on: the run logs its users in.
    #[arg(long, env = "SHARDPAY_REDIS_URL")]
    pub redis: Option<String>,
    /// With --backend mysql: first measure the raw-database baseline for
    /// this many seconds per kind, so the report gives the services' TPS as
    /// a share of what the databases do.
    #[arg(long, value_name = "SECONDS")]
    pub baseline: Option<u64>,
    /// Folder that receives the run's report folder.
    #[arg(long, default_value = "reports")]
    pub reports: PathBuf,
    /// No progress output; the summary is still printed.
    #[arg(long, short)]
    pub quiet: bool,
    /// With --target: register webhooks for some of the run's accounts with
    /// the run's receiver, on loopback, and check every delivery, as runs
    /// of the in-process system do. The target's notification service must
    /// deliver to loopback (serve --webhooks-to-private-networks).
    #[arg(long, requires = "target")]
    pub webhooks: bool,
    /// Run the reference system as its six services, each a process of its
    /// own (serve auth, ledger, fraud, notification, analytics,
    /// shard-manager) on ports of their own, sharing the MySQL shards
    /// (--backend mysql), a broker (--kafka, or one the run starts with
    /// scripts/kafka.sh) and a Redis (--redis, or one the run starts); a
    /// scenario's `crash` fault can then name one service. Example:
    /// --six-processes --backend mysql
    #[arg(long, conflicts_with = "target")]
    pub six_processes: bool,
    /// Watch the run as it goes: serve a live view on loopback and print
    /// its address. The page shows, second by second, transfers accepted
    /// per shard, errors, p99 latency and the declines and errors by code,
    /// drawn like the report's charts; it needs nothing from the network.
    /// Works with --target and --six-processes too. Example: shardpay run
    /// scenarios/mixed.toml --live
    #[arg(long)]
    pub live: bool,
    /// The live view's port on 127.0.0.1 (0 picks a free one).
    #[arg(long, default_value_t = 0, requires = "live")]
    pub live_port: u16,
}

#[derive(clap::Args)]
pub struct EmbeddedArgs {
    /// Shards of the in-process reference system (ignored with --target).
    #[arg(long, default_value_t = 4)]
    pub shards: u32,
    /// Keep the in-process system's shard files in this new directory
    /// (default: a temporary directory, removed after the run).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Durability of the in-process system's commits.
    #[arg(long, value_enum, default_value = "full")]
    pub durability: DurabilityArg,
    #[command(flatten)]
    pub storage: StorageArgs,
}

#[derive(clap::Args)]
pub struct StorageArgs {
    /// Where the in-process system keeps its shards: SQLite files, or
    /// MySQL/MariaDB databases (local servers started by scripts/shards.sh
    /// when no --mysql-urls are given, and stopped after).
    #[arg(long, value_enum, default_value = "sqlite")]
    pub backend: BackendArg,
    /// MySQL shard databases, one per shard in order, comma separated. They
    /// are used as they are: a run adds its own accounts beside earlier data.
    #[arg(long, env = "SHARDPAY_MYSQL_URLS", value_delimiter = ',')]
    pub mysql_urls: Vec<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendArg {
    Sqlite,
    Mysql,
}

/// Local shard servers this command started, to stop when it ends.
struct LocalShards {
    started: bool,
}

fn shards_script() -> PathBuf {
    std::env::var_os("SHARDPAY_SHARDS_SCRIPT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("scripts/shards.sh"))
}

fn run_script(args: &[&str]) -> anyhow::Result<String> {
    let script = shards_script();
    anyhow::ensure!(
        script.is_file(),
        "{} not found: run from the shardpay checkout, set SHARDPAY_SHARDS_SCRIPT, or give --mysql-urls",
        script.display()
    );
    let out = std::process::Command::new("bash")
        .arg(&script)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {}", script.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    anyhow::ensure!(
        out.status.success(),
        "{} {} failed:\n{stdout}{}",
        script.display(),
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(stdout)
}

/// The shard databases for a MySQL run: the URLs given, or local servers.
fn mysql_shards(
    storage: &StorageArgs,
    shards: u32,
) -> anyhow::Result<Option<(MysqlShards, LocalShards)>> {
    if storage.backend == BackendArg::Sqlite {
        anyhow::ensure!(
            storage.mysql_urls.is_empty(),
            "--mysql-urls needs --backend mysql"
        );
        return Ok(None);
    }
    if !storage.mysql_urls.is_empty() {
        return Ok(Some((
            MysqlShards {
                urls: storage.mysql_urls.clone(),
                fresh: false,
                script: None,
            },
            LocalShards { started: false },
        )));
    }
    let running = run_script(&["status"])?
        .lines()
        .filter(|l| l.contains(": running"))
        .count();
    eprintln!("starting local MySQL shard servers (scripts/shards.sh up {shards})");
    let out = run_script(&["up", &shards.to_string()])?;
    let urls: Vec<String> = out
        .lines()
        .last()
        .unwrap_or("")
        .split(',')
        .map(str::to_string)
        .collect();
    Ok(Some((
        MysqlShards {
            urls,
            fresh: true,
            script: Some(shards_script()),
        },
        LocalShards {
            started: running == 0,
        },
    )))
}

impl LocalShards {
    fn stop(self) {
        if self.started {
            match run_script(&["down"]) {
                Ok(_) => eprintln!("stopped the local MySQL shard servers"),
                Err(e) => eprintln!("warning: {e:#}"),
            }
        }
    }
}

#[derive(clap::Args)]
pub struct SweepArgs {
    /// Scenario file (TOML).
    pub scenario: PathBuf,
    /// Shard counts to run, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    pub shards: Vec<u32>,
    /// Cross-shard protocols to run at each shard count, comma separated:
    /// saga, xa (xa needs --backend mysql). `--cross-shard saga,xa`
    /// compares the two.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "saga")]
    pub cross_shard: Vec<CrossShardArg>,
    /// Durability of the in-process system's commits (SQLite).
    #[arg(long, value_enum, default_value = "full")]
    pub durability: DurabilityArg,
    #[command(flatten)]
    pub storage: StorageArgs,
    /// Replace the scenario's seed.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Folder that receives the report folders and the comparison.
    #[arg(long, default_value = "reports")]
    pub reports: PathBuf,
    #[arg(long, short)]
    pub quiet: bool,
}

#[derive(clap::Args)]
pub struct CompareArgs {
    /// report.json files, or report folders holding one.
    #[arg(required = true, num_args = 1..)]
    pub reports: Vec<PathBuf>,
    /// Also write compare.json and compare.md into this folder.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct MergeArgs {
    /// report.json files, or report folders holding one.
    #[arg(required = true, num_args = 1..)]
    pub reports: Vec<PathBuf>,
    /// Folder to write the merged report.json, report.html and summary.txt.
    #[arg(long)]
    pub out: PathBuf,
}

fn durability(arg: DurabilityArg) -> Durability {
    match arg {
        DurabilityArg::Full => Durability::Full,
        DurabilityArg::Normal => Durability::Normal,
    }
}

fn load_scenario(path: &Path, seed: Option<u64>) -> anyhow::Result<Scenario> {
    let s = scenario::load(path).map_err(|e| anyhow::anyhow!("{e}"))?;
    match seed {
        // Parsed again: the fault schedule's drawn times follow the seed.
        Some(seed) => scenario::parse_with_seed(&s.source, &s.file, Some(seed))
            .map_err(|e| anyhow::anyhow!("{e}")),
        None => Ok(s),
    }
}

/// Runs one scenario; returns whether it passed its thresholds.
pub async fn run(args: RunArgs) -> anyhow::Result<bool> {
    let scenario = load_scenario(&args.scenario, args.seed)?;
    anyhow::ensure!(
        args.cross_shard == CrossShardArg::Saga
            || !args.target.is_empty()
            || args.embedded.storage.backend == BackendArg::Mysql,
        "--cross-shard xa needs --backend mysql: the embedded SQLite shards have no XA"
    );
    anyhow::ensure!(
        args.fraud == OnOff::On || args.target.is_empty(),
        "--fraud applies to the in-process system; with --target, start that system with `shardpay serve --fraud off`"
    );
    anyhow::ensure!(
        args.cross_shard == CrossShardArg::Saga || args.target.is_empty(),
        "--cross-shard applies to the in-process system; with --target, start that system with `shardpay serve --cross-shard xa`"
    );
    let mut local = None;
    let target = match args.target.is_empty() {
        false => Target::Url(args.target.join(",")),
        true => {
            // The scenario's reshards grow into spare shard stores.
            let stores = args.embedded.shards
                + shardpay_simulator::run::Placement::for_scenario(&scenario, args.embedded.shards)
                    .spare;
            let mysql = match mysql_shards(&args.embedded.storage, stores)? {
                Some((m, l)) => {
                    local = Some(l);
                    Some(m)
                }
                None => None,
            };
            Target::Embedded {
                shards: args.embedded.shards,
                data_dir: args.embedded.data_dir,
                durability: durability(args.embedded.durability),
                mysql,
                cross_shard: args.cross_shard.into(),
                fraud: args.fraud == OnOff::On,
                bus: crate::bus_config(args.kafka.as_deref(), ""),
                redis: args.redis.clone(),
            }
        }
    };
    let options = RunOptions {
        webhooks: args.webhooks,
        target,
        services: shardpay_simulator::api::parse_services(&args.services)?,
        reports_dir: args.reports,
        progress: !args.quiet,
        baseline_s: args.baseline,
        system_binary: std::env::current_exe().ok(),
        six_processes: args.six_processes,
        live: args.live.then_some(args.live_port),
    };
    let result = run::run(&scenario, &options).await;
    if let Some(local) = local {
        local.stop();
    }
    let result = result?;
    finish(&result.report, &result.dir);
    Ok(result.report.passed)
}

fn finish(report: &Report, dir: &Path) {
    print!("{}", report.summary());
    println!(
        "\nreport: {}/report.html (and report.json, summary.txt)",
        dir.display()
    );
    if report.passed {
        println!("run passed");
    } else {
        println!("run FAILED:");
        for f in &report.failures {
            println!("  {f}");
        }
    }
}

/// Runs the scenario once per shard count and compares the runs.
pub async fn sweep(args: SweepArgs) -> anyhow::Result<bool> {
    let scenario = load_scenario(&args.scenario, args.seed)?;
    anyhow::ensure!(!args.shards.is_empty(), "--shards: give at least one count");
    anyhow::ensure!(
        !args.cross_shard.contains(&CrossShardArg::Xa) || args.storage.backend == BackendArg::Mysql,
        "--cross-shard xa needs --backend mysql: the embedded SQLite shards have no XA"
    );
    let most = *args.shards.iter().max().expect("checked above");
    let (mysql, local) = match mysql_shards(&args.storage, most)? {
        Some((m, l)) => (Some(m), Some(l)),
        None => (None, None),
    };
    let result = sweep_runs(&args, &scenario, mysql).await;
    if let Some(local) = local {
        local.stop();
    }
    let (reports, all_passed) = result?;
    let comparison = compare::compare(&reports);
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%SZ");
    let dir = args
        .reports
        .join(format!("sweep-{}-{stamp}", scenario.name));
    write_comparison(&comparison, &dir)?;
    println!("\n{}", comparison.markdown());
    println!(
        "comparison: {}/compare.md (and compare.json)",
        dir.display()
    );
    Ok(all_passed)
}

fn write_comparison(comparison: &Comparison, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::write(
        dir.join("compare.json"),
        serde_json::to_string_pretty(comparison)? + "\n",
    )?;
    std::fs::write(dir.join("compare.md"), comparison.markdown())?;
    Ok(())
}

fn read_reports(paths: &[PathBuf]) -> anyhow::Result<Vec<(String, Report)>> {
    let mut reports = Vec::new();
    for path in paths {
        let file = if path.is_dir() {
            path.join("report.json")
        } else {
            path.clone()
        };
        let report = Report::read(&file)?;
        let label = file
            .parent()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| file.display().to_string());
        reports.push((label, report));
    }
    Ok(reports)
}

pub fn compare(args: CompareArgs) -> anyhow::Result<()> {
    let reports = read_reports(&args.reports)?;
    let comparison = compare::compare(&reports);
    print!("{}", comparison.markdown());
    if let Some(dir) = args.out {
        write_comparison(&comparison, &dir)?;
        println!(
            "\ncomparison: {}/compare.md (and compare.json)",
            dir.display()
        );
    }
    Ok(())
}

/// Merges reports; returns whether the merged run passes its thresholds.
pub fn merge(args: MergeArgs) -> anyhow::Result<bool> {
    let reports: Vec<Report> = read_reports(&args.reports)?
        .into_iter()
        .map(|(_, r)| r)
        .collect();
    let merged = shardpay_simulator::report::merge(&reports)?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    merged.write(&args.out.join("report.json"))?;
    std::fs::write(
        args.out.join("report.html"),
        shardpay_simulator::html::render(&merged),
    )?;
    std::fs::write(args.out.join("summary.txt"), merged.summary())?;
    finish(&merged, &args.out);
    Ok(merged.passed)
}

async fn sweep_runs(
    args: &SweepArgs,
    scenario: &Scenario,
    mysql: Option<MysqlShards>,
) -> anyhow::Result<(Vec<(String, Report)>, bool)> {
    let mut reports = Vec::new();
    let mut all_passed = true;
    let several = args.cross_shard.len() > 1;
    for shards in &args.shards {
        for protocol in &args.cross_shard {
            let protocol = CrossShard::from(*protocol);
            if !args.quiet {
                eprintln!(
                    "\n== {} with {shards} shards, cross-shard {}",
                    scenario.name,
                    protocol.as_str()
                );
            }
            let options = RunOptions {
                webhooks: false,
                services: Vec::new(),
                target: Target::Embedded {
                    shards: *shards,
                    data_dir: None,
                    durability: durability(args.durability),
                    mysql: mysql.clone(),
                    cross_shard: protocol,
                    fraud: true,
                    bus: Default::default(),
                    redis: None,
                },
                reports_dir: args.reports.clone(),
                progress: !args.quiet,
                baseline_s: None,
                system_binary: std::env::current_exe().ok(),
                six_processes: false,
                live: None,
            };
            let result = run::run(scenario, &options).await?;
            finish(&result.report, &result.dir);
            all_passed &= result.report.passed;
            let label = if several {
                format!("shards={shards} {}", protocol.as_str())
            } else {
                format!("shards={shards}")
            };
            reports.push((label, result.report));
        }
    }
    Ok((reports, all_passed))
}

#[derive(clap::Args)]
pub struct BaselineArgs {
    /// Shards to run against.
    #[arg(long, default_value_t = 4)]
    pub shards: u32,
    /// The storage to measure: SQLite files (fresh ones, with the system's
    /// schema, written by the system's writer thread and group commit), or
    /// MySQL/MariaDB databases (local servers from scripts/shards.sh when
    /// no --mysql-urls are given).
    #[arg(long, value_enum, default_value = "sqlite")]
    pub backend: BackendArg,
    /// MySQL shard databases, comma separated; each gets a sibling
    /// <database>_baseline, dropped and created afresh.
    #[arg(long, env = "SHARDPAY_MYSQL_URLS", value_delimiter = ',')]
    pub mysql_urls: Vec<String>,
    /// Folder for the SQLite baseline's files (replaced on each run); a
    /// temporary folder when not given.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Durability of the SQLite baseline's commits, as `serve --durability`.
    #[arg(long, value_enum, default_value = "full")]
    pub durability: DurabilityArg,
    /// Transactions in flight at once (the scenario's users).
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Seconds per kind.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Which transfers: same-shard, cross-shard (the saga), cross-shard-xa, both (same-shard and cross-shard) or all.
    #[arg(long, value_enum, default_value = "both")]
    pub kind: BaselineKindArg,
    /// Print the results as JSON (histograms included) instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BaselineKindArg {
    SameShard,
    /// The saga's three local transactions.
    CrossShard,
    /// XA two-phase commit: two prepared branches, a decision, two commits.
    CrossShardXa,
    /// same-shard and cross-shard.
    Both,
    /// same-shard, cross-shard and cross-shard-xa.
    All,
}

/// Runs the raw-database baseline and prints its figures.
pub async fn baseline(args: BaselineArgs) -> anyhow::Result<()> {
    use shardpay_simulator::baseline::{self, BaselineKind};
    anyhow::ensure!(
        args.concurrency >= 1 && args.seconds >= 1,
        "--concurrency and --seconds must be at least 1"
    );
    let storage = StorageArgs {
        backend: args.backend,
        mysql_urls: args.mysql_urls.clone(),
    };
    let (urls, local) = match mysql_shards(&storage, args.shards)? {
        Some((shards, local)) => (
            shards
                .urls
                .iter()
                .take(args.shards as usize)
                .cloned()
                .collect(),
            Some(local),
        ),
        None => (Vec::new(), None),
    };
    let (temp, dir) = match &args.data_dir {
        Some(dir) => (None, dir.clone()),
        None => {
            let temp = tempfile::Builder::new()
                .prefix("shardpay-baseline-")
                .tempdir()?;
            let dir = temp.path().to_path_buf();
            (Some(temp), dir)
        }
    };
    let sqlite = shardpay_reference::ledger::sqlite::SqliteConfig {
        durability: durability(args.durability),
        ..Default::default()
    };
    let shard_count = match args.backend {
        BackendArg::Sqlite => args.shards as usize,
        BackendArg::Mysql => urls.len(),
    };
    let kinds: &[BaselineKind] = match args.kind {
        BaselineKindArg::SameShard => &[BaselineKind::SameShard],
        BaselineKindArg::CrossShard => &[BaselineKind::CrossShard],
        BaselineKindArg::CrossShardXa => &[BaselineKind::CrossShardXa],
        BaselineKindArg::Both => &[BaselineKind::SameShard, BaselineKind::CrossShard],
        BaselineKindArg::All => &[
            BaselineKind::SameShard,
            BaselineKind::CrossShard,
            BaselineKind::CrossShardXa,
        ],
    };
    let mut results = Vec::new();
    let mut failure = None;
    for kind in kinds {
        if *kind != BaselineKind::SameShard && shard_count < 2 {
            continue;
        }
        if *kind == BaselineKind::CrossShardXa && args.backend == BackendArg::Sqlite {
            eprintln!("baseline {kind:?}: skipped, XA needs MySQL shards (--backend mysql)");
            continue;
        }
        eprintln!(
            "baseline {kind:?}: {shard_count} shards, {} in flight, {} s",
            args.concurrency, args.seconds
        );
        let result = match args.backend {
            BackendArg::Sqlite => {
                baseline::run_sqlite(
                    &dir,
                    shard_count,
                    &sqlite,
                    *kind,
                    args.concurrency,
                    args.seconds,
                )
                .await
            }
            BackendArg::Mysql => baseline::run(&urls, *kind, args.concurrency, args.seconds).await,
        };
        match result {
            Ok(r) => results.push(r),
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    if let Some(local) = local {
        local.stop();
    }
    drop(temp);
    if let Some(e) = failure {
        return Err(e);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&results)?);
        return Ok(());
    }
    println!("| kind | shards | in flight | transfers/s | p50 ms | p99 ms |");
    println!("|---|---:|---:|---:|---:|---:|");
    for r in &results {
        println!(
            "| {:?} | {} | {} | {:.0} | {:.2} | {:.2} |",
            r.kind,
            r.shards,
            r.concurrency,
            r.tps,
            r.latency.p50_us as f64 / 1000.0,
            r.latency.p99_us as f64 / 1000.0
        );
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Scenarios to measure, each of one kind of transfer (its baseline is
    /// that kind's).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "scenarios/same-shard.toml,scenarios/cross-shard.toml"
    )]
    pub scenarios: Vec<PathBuf>,
    #[command(flatten)]
    pub embedded: EmbeddedArgs,
    /// How cross-shard transfers are made atomic: saga, or xa (needs
    /// --backend mysql); give both (saga,xa) to measure each.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "saga")]
    pub cross_shard: Vec<CrossShardArg>,
    /// Seconds of raw baseline per run.
    #[arg(long, default_value_t = 10)]
    pub baseline_seconds: u64,
    /// Fail (exit 1) when a row's services/raw ratio is below this, for a
    /// CI gate; by default the table only says which goals were met.
    #[arg(long)]
    pub min_ratio: Option<f64>,
    /// Folder that receives the bench's folder.
    #[arg(long, default_value = "reports")]
    pub reports: PathBuf,
}

/// Runs each scenario with its raw baseline, and writes one table of the
/// services' share of the storage's throughput.
pub async fn bench(args: BenchArgs) -> anyhow::Result<bool> {
    use shardpay_simulator::bench::{self, BenchRow};
    anyhow::ensure!(
        args.baseline_seconds >= 1,
        "--baseline-seconds must be at least 1: a ratio needs a baseline"
    );
    anyhow::ensure!(
        args.min_ratio.is_none_or(|r| r.is_finite() && r >= 0.0),
        "--min-ratio must be a number of 0 or more, such as 0.3"
    );
    anyhow::ensure!(
        !args.cross_shard.contains(&CrossShardArg::Xa)
            || args.embedded.storage.backend == BackendArg::Mysql,
        "--cross-shard xa needs --backend mysql: the embedded SQLite shards have no XA"
    );
    anyhow::ensure!(
        args.embedded.data_dir.is_none(),
        "bench runs several systems, each on fresh shards in a temporary folder; drop --data-dir"
    );
    let mut scenarios = Vec::new();
    for path in &args.scenarios {
        scenarios.push(load_scenario(path, None)?);
    }
    let dir = args.reports.join(format!(
        "bench-{}",
        chrono::Utc::now().format("%Y%m%dT%H%M%SZ")
    ));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let (mysql, local) = match mysql_shards(&args.embedded.storage, args.embedded.shards)? {
        Some((m, l)) => (Some(m), Some(l)),
        None => (None, None),
    };
    let mut rows = Vec::new();
    let mut failure = None;
    'runs: for scenario in &scenarios {
        let crosses_shards = scenario.mix.cross_shard > 0;
        let protocols: Vec<CrossShardArg> = if crosses_shards {
            args.cross_shard.clone()
        } else {
            vec![CrossShardArg::Saga]
        };
        for protocol in protocols {
            eprintln!(
                "bench: {} ({}), {} shards, {} users",
                scenario.name,
                CrossShard::from(protocol).as_str(),
                args.embedded.shards,
                scenario.load.users()
            );
            let options = RunOptions {
                webhooks: false,
                target: Target::Embedded {
                    shards: args.embedded.shards,
                    data_dir: None,
                    durability: durability(args.embedded.durability),
                    mysql: mysql.clone(),
                    cross_shard: protocol.into(),
                    fraud: true,
                    bus: crate::bus_config(None, ""),
                    redis: None,
                },
                services: Default::default(),
                reports_dir: dir.clone(),
                progress: true,
                baseline_s: Some(args.baseline_seconds),
                system_binary: std::env::current_exe().ok(),
                six_processes: false,
                live: None,
            };
            match run::run(scenario, &options).await {
                Ok(result) => match BenchRow::of(&result.report, result.dir.clone()) {
                    Some(row) => rows.push(row),
                    None => {
                        failure = Some(anyhow::anyhow!(
                            "{}: the run measured no baseline",
                            scenario.name
                        ));
                        break 'runs;
                    }
                },
                Err(e) => {
                    failure = Some(e);
                    break 'runs;
                }
            }
        }
    }
    if let Some(local) = local {
        local.stop();
    }
    if let Some(e) = failure {
        return Err(e);
    }
    let table = bench::table(&rows);
    std::fs::write(dir.join("bench.md"), &table)?;
    std::fs::write(dir.join("bench.json"), serde_json::to_string_pretty(&rows)?)?;
    print!("{table}");
    println!(
        "\nbench: {}/bench.md (and bench.json; each run's report beside them)",
        dir.display()
    );
    let mut passed = rows.iter().all(|r| r.run_passed);
    if let Some(min) = args.min_ratio {
        for r in rows.iter().filter(|r| r.ratio < min) {
            println!(
                "FAILED: {} on {}: ratio {:.2} below --min-ratio {min}",
                r.kind, r.backend, r.ratio
            );
            passed = false;
        }
    }
    Ok(passed)
}
