//! The fault schedule at run time. A scenario with `[[faults]]` runs the
//! reference system as a child process (`shardpay serve`) on a port and data
//! of its own, so a fault can SIGKILL it and start it again on the same
//! data; `crash_at` faults start it with a fault hook that waits for
//! SIGUSR1, sent at the fault's time, and fires at the next transfer that
//! reaches the step. After each heal the run waits for the system to be
//! ready, watches its pending transfers drain, and audits it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, Command};

use crate::api::Api;
use crate::driver::Sim;
use crate::scenario::faults::{Action, Fault};

/// How the harness starts the reference system as a child.
#[derive(Debug, Clone)]
pub struct ChildSpec {
    /// The `shardpay` binary.
    pub binary: PathBuf,
    /// `serve` and its options, the port included.
    pub args: Vec<String>,
    /// Secrets and harness switches, passed in the environment.
    pub env: Vec<(String, String)>,
    /// Where the child's log goes (appended across restarts).
    pub log: PathBuf,
    /// The fault hooks of the schedule's `crash_at` faults, in order: each
    /// start carries the hook of the next one still to come.
    pub hooks: Vec<(u64, &'static str)>,
}

/// The shard servers the run started with `scripts/shards.sh`, which
/// shard faults kill, pause and start again.
#[derive(Debug, Clone)]
pub struct ShardServers {
    pub script: PathBuf,
    /// How many the run uses (`up N` starts those stopped).
    pub count: u32,
}

impl ShardServers {
    async fn script(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new("bash")
            .arg(&self.script)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .await
            .with_context(|| format!("cannot run {}", self.script.display()))?;
        anyhow::ensure!(
            out.status.success(),
            "{} {} failed: {}",
            self.script.display(),
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The pid of shard `shard`'s server, from the script's status.
    async fn pid(&self, shard: u32) -> anyhow::Result<u32> {
        let status = self.script(&["status"]).await?;
        let prefix = format!("shard {shard}: running (pid ");
        status
            .lines()
            .find_map(|l| {
                l.strip_prefix(&prefix)?
                    .split([',', ')'])
                    .next()?
                    .parse()
                    .ok()
            })
            .with_context(|| format!("shard {shard}'s server is not running: {status}"))
    }

    /// Starts the servers that are stopped.
    async fn up(&self) -> anyhow::Result<()> {
        self.script(&["up", &self.count.to_string()])
            .await
            .map(|_| ())
    }
}

/// What faults other than the system's own crash act on.
#[derive(Clone, Default)]
pub struct Backends {
    /// The shard servers the run started (kill, pause).
    pub shard_servers: Option<ShardServers>,
    /// The proxy in front of each backend a link fault targets, by target
    /// (`shard-N`, `redis`).
    pub links: BTreeMap<String, Arc<crate::proxy::Link>>,
    /// The Redis the run started (redis_down).
    pub redis: Option<Arc<tokio::sync::Mutex<LocalRedis>>>,
    /// With six processes: each service by name (`crash` of one).
    pub services: BTreeMap<String, Arc<tokio::sync::Mutex<ChildSystem>>>,
}

/// A Redis the run starts for itself, so a fault can kill it and start it
/// again: a `redis-server` child keeping nothing on disk, on a port of its
/// own.
pub struct LocalRedis {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl LocalRedis {
    /// Starts `redis-server` with its files in `dir`, and waits until it
    /// accepts connections.
    pub async fn start(dir: &Path) -> anyhow::Result<LocalRedis> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let mut redis = LocalRedis {
            port: free_port()?,
            dir: dir.to_path_buf(),
            child: None,
        };
        redis.spawn().await?;
        Ok(redis)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("redis.log"))
            .with_context(|| format!("cannot open a log in {}", self.dir.display()))?;
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(Stdio::null())
            // Its own process group: a Ctrl-C to the run leaves it to the
            // run, which stops it once the books are settled.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .context("cannot start redis-server, which redis faults need: install it (Debian: apt-get install -y redis-server)")?;
        self.child = Some(child);
        let by = Instant::now() + Duration::from_secs(10);
        while Instant::now() < by {
            // Another process may have taken the port while it was down.
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                anyhow::bail!(
                    "redis-server exited ({status}) instead of listening on port {}; its log is in {}",
                    self.port,
                    self.dir.display()
                );
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        anyhow::bail!(
            "redis-server did not listen on port {} within 10 s; its log is in {}",
            self.port,
            self.dir.display()
        )
    }

    /// SIGKILLs it and waits until it is gone.
    async fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().await.context("cannot SIGKILL redis-server")?;
        }
        Ok(())
    }

    /// Starts it again if it is down (a schedule stopped halfway through
    /// a `redis_down`); answers whether it was.
    pub async fn ensure_running(&mut self) -> anyhow::Result<bool> {
        let running = matches!(self.child.as_mut().map(Child::try_wait), Some(Ok(None)));
        if running {
            return Ok(false);
        }
        self.child = None;
        self.spawn().await?;
        Ok(true)
    }

    /// Stops it at the end of the run.
    pub async fn stop(mut self) {
        let _ = self.kill().await;
    }
}

/// A Kafka-protocol broker the run starts with `scripts/kafka.sh` (in the
/// run's directory, on a port of its own) for link faults on the broker: it
/// tells its clients to connect to `advertised`, the proxy's address, so
/// every connection goes through the proxy. Stopped when dropped.
pub struct LocalBroker {
    script: PathBuf,
    env: Vec<(&'static str, String)>,
}

impl LocalBroker {
    pub fn start(
        script: &Path,
        dir: &Path,
        port: u16,
        advertised: std::net::SocketAddr,
    ) -> anyhow::Result<LocalBroker> {
        let broker = LocalBroker {
            script: script.to_path_buf(),
            env: vec![
                ("SHARDPAY_KAFKA_PORT", port.to_string()),
                ("SHARDPAY_KAFKA_DIR", dir.display().to_string()),
                ("SHARDPAY_KAFKA_ADVERTISED", advertised.to_string()),
            ],
        };
        let out = broker
            .command("up")
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("cannot run {}", script.display()))?;
        anyhow::ensure!(
            out.status.success(),
            "{} up failed: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(broker)
    }

    fn command(&self, what: &str) -> std::process::Command {
        let mut command = std::process::Command::new("bash");
        command.arg(&self.script).arg(what);
        command.envs(self.env.iter().map(|(k, v)| (*k, v)));
        command
    }
}

impl Drop for LocalBroker {
    fn drop(&mut self) {
        let _ = self
            .command("down")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Puts a link back up if the schedule is stopped while it is faulted.
struct UpOnDrop(Arc<crate::proxy::Link>);

impl Drop for UpOnDrop {
    fn drop(&mut self) {
        self.0.set(crate::proxy::LinkState::Up);
    }
}

/// What a link fault sets its link to.
fn link_state(fault: &Fault) -> crate::proxy::LinkState {
    use crate::proxy::LinkState;
    let link = fault.link.unwrap_or(crate::scenario::faults::LinkFault {
        reset: false,
        delay_ms: 0,
        jitter_ms: 0,
        share: 0.0,
    });
    match fault.action {
        Action::Partition if link.reset => LinkState::Reset,
        Action::Partition => LinkState::Blackhole,
        Action::Slow => LinkState::Slow {
            delay_ms: link.delay_ms,
            jitter_ms: link.jitter_ms,
        },
        Action::Flaky => LinkState::Flaky { share: link.share },
        _ => LinkState::Up,
    }
}

/// Sets a link fault for its length; answers when it hit and when the
/// link was up again.
async fn link_fault(
    backends: &Backends,
    fault: &Fault,
    start: Instant,
    happened: &mut Happened,
) -> (Option<Duration>, Option<Duration>) {
    let Some(link) = backends.links.get(&fault.target) else {
        happened.notes.push(format!(
            "no proxy stands in front of {}: the link was not touched",
            fault.target
        ));
        return (None, None);
    };
    let up = UpOnDrop(link.clone());
    link.set(link_state(fault));
    let hit = start.elapsed();
    tokio::time::sleep(Duration::from_millis(fault.for_ms)).await;
    drop(up);
    (Some(hit), Some(start.elapsed()))
}

/// Kills the run's Redis for the fault's length and starts it again
/// (empty: sessions and locks are gone); answers when it went down and
/// when it listened again.
async fn redis_fault(
    backends: &Backends,
    fault: &Fault,
    start: Instant,
    happened: &mut Happened,
) -> (Option<Duration>, Option<Duration>) {
    let Some(redis) = &backends.redis else {
        happened
            .notes
            .push("no Redis of the run's own: nothing was stopped".into());
        return (None, None);
    };
    let mut redis = redis.lock().await;
    if let Err(e) = redis.kill().await {
        happened.notes.push(format!("{e:#}"));
        return (None, None);
    }
    let hit = start.elapsed();
    tokio::time::sleep(Duration::from_millis(fault.for_ms)).await;
    match redis.spawn().await {
        Ok(()) => (Some(hit), Some(start.elapsed())),
        Err(e) => {
            happened
                .notes
                .push(format!("restarting Redis failed: {e:#}"));
            (Some(hit), None)
        }
    }
}

fn signal_pid(pid: u32, signal: &str) -> anyhow::Result<()> {
    let status = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .context("cannot run kill")?;
    anyhow::ensure!(status.success(), "kill {signal} {pid} failed");
    Ok(())
}

/// Whether process `pid` is gone (or a zombie, which is as good as gone).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X"),
    }
}

/// Heals a shard fault if the schedule is stopped halfway (the load failed
/// or was interrupted, and its task aborted): a paused server is
/// continued, a killed one started again, so the run's books and audit
/// find their shards.
struct HealOnDrop {
    pid: u32,
    action: Action,
    servers: ShardServers,
    healed: bool,
}

impl Drop for HealOnDrop {
    fn drop(&mut self) {
        if self.healed {
            return;
        }
        match self.action {
            Action::Pause => {
                let _ = signal_pid(self.pid, "-CONT");
            }
            _ => {
                let _ = std::process::Command::new("bash")
                    .arg(&self.servers.script)
                    .args(["up", &self.servers.count.to_string()])
                    .stdout(Stdio::null())
                    .status();
            }
        }
    }
}

/// Kills or pauses a shard's server for the fault's length; answers when
/// it went down and when it was back (`None` for a step that failed; the
/// notes say why).
async fn shard_fault(
    servers: Option<&ShardServers>,
    fault: &Fault,
    start: Instant,
    happened: &mut Happened,
) -> (Option<Duration>, Option<Duration>) {
    let mut hit = None;
    let run = async {
        let servers = servers.context("no shard servers of the run's own")?;
        let shard = fault.shard.context("a shard fault without a shard")?;
        let pid = servers.pid(shard).await?;
        let mut heal = HealOnDrop {
            pid,
            action: fault.action,
            servers: servers.clone(),
            healed: false,
        };
        match fault.action {
            Action::Pause => {
                signal_pid(pid, "-STOP")?;
                hit = Some(start.elapsed());
                tokio::time::sleep(Duration::from_millis(fault.for_ms)).await;
                heal.healed = true;
                signal_pid(pid, "-CONT")?;
            }
            _ => {
                signal_pid(pid, "-KILL")?;
                hit = Some(start.elapsed());
                // Gone before it is started again.
                let gone_by = Instant::now() + Duration::from_secs(10);
                while !gone(pid) && Instant::now() < gone_by {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                tokio::time::sleep(Duration::from_millis(fault.for_ms)).await;
                heal.healed = true;
                servers.up().await?;
            }
        }
        anyhow::Ok(start.elapsed())
    };
    match run.await {
        Ok(healed) => (hit, Some(healed)),
        Err(e) => {
            happened.notes.push(format!("{e:#}"));
            (hit, None)
        }
    }
}

/// The reference system as a child process.
pub struct ChildSystem {
    spec: ChildSpec,
    child: Option<Child>,
    pub url: String,
    /// CPU seconds of the incarnations that have ended.
    ended_cpu_s: f64,
    pub starts: u32,
}

/// How long a child may take to listen.
const START_TIMEOUT: Duration = Duration::from_secs(60);

impl ChildSystem {
    pub async fn start(spec: ChildSpec, url: String) -> anyhow::Result<ChildSystem> {
        let mut system = ChildSystem {
            spec,
            child: None,
            url,
            ended_cpu_s: 0.0,
            starts: 0,
        };
        system.spawn(0).await?;
        Ok(system)
    }

    /// Starts the child (armed for the next `crash_at` at or after
    /// `from_ms`) and waits until it listens.
    async fn spawn(&mut self, from_ms: u64) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.spec.log)
            .with_context(|| format!("cannot open {}", self.spec.log.display()))?;
        let mut command = Command::new(&self.spec.binary);
        // The system under test is what the run's options say, not what
        // this shell's SHARDPAY_* variables would make of `serve`.
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy().into_owned();
            if name.starts_with("SHARDPAY_") && name != "SHARDPAY_TEST_BROKEN_RECOVERY" {
                command.env_remove(name);
            }
        }
        command
            .args(&self.spec.args)
            .envs(self.spec.env.iter().map(|(k, v)| (k, v)))
            .env_remove("SHARDPAY_FAULT")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true);
        if let Some((_, hook)) = self.spec.hooks.iter().find(|(at, _)| *at >= from_ms) {
            command
                .env("SHARDPAY_FAULT", hook)
                .env("SHARDPAY_FAULT_ARM_ON_SIGUSR1", "1");
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot start {}", self.spec.binary.display()))?;
        let stdout = child.stdout.take().context("the child's stdout")?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let first = tokio::time::timeout(START_TIMEOUT, lines.next_line()).await;
        match first {
            Ok(Ok(Some(line))) if line.starts_with("shardpay listening on") => {}
            other => {
                let _ = child.kill().await;
                anyhow::bail!(
                    "the reference system did not start ({other:?}); its log is {}",
                    self.spec.log.display()
                );
            }
        }
        // Keep reading its stdout so that it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        self.child = Some(child);
        self.starts += 1;
        Ok(())
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// CPU seconds of the running child so far.
    fn running_cpu_s(&self) -> f64 {
        self.pid().map(process_cpu_s).unwrap_or(0.0)
    }

    /// CPU seconds of every incarnation so far.
    pub fn cpu_s(&self) -> f64 {
        self.ended_cpu_s + self.running_cpu_s()
    }

    fn signal(&self, signal: &str) -> anyhow::Result<()> {
        signal_pid(self.pid().context("the system is not running")?, signal)
    }

    /// SIGKILLs the child and waits until it is gone.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        self.ended_cpu_s += self.running_cpu_s();
        if let Some(mut child) = self.child.take() {
            child.kill().await.context("cannot SIGKILL the system")?;
        }
        Ok(())
    }

    /// Whether the child has exited (it crashed, or was killed).
    fn exited(&mut self) -> bool {
        match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(Some(_))) | None => true,
            Some(Ok(None)) => false,
            Some(Err(_)) => true,
        }
    }

    /// Starts the child again if it is down; answers whether it was.
    pub async fn ensure_running(&mut self) -> anyhow::Result<bool> {
        if !self.exited() {
            return Ok(false);
        }
        self.child = None;
        self.spawn(u64::MAX).await?;
        Ok(true)
    }

    /// Stops the child at the end of a run: SIGTERM, then SIGKILL after the
    /// system's own shutdown deadline and a margin.
    pub async fn stop(mut self) -> anyhow::Result<f64> {
        let cpu = self.cpu_s();
        if self.child.is_some() && !self.exited() {
            self.signal("-TERM")?;
            let child = self.child.as_mut().expect("checked");
            if tokio::time::timeout(Duration::from_secs(15), child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
        }
        Ok(cpu)
    }
}

/// CPU seconds process `pid` has used, from /proc (Linux; 0 elsewhere).
fn process_cpu_s(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| stat_cpu_s(&stat))
        .unwrap_or(0.0)
}

/// The user and system CPU seconds of a `/proc/.../stat` line.
pub(crate) fn stat_cpu_s(stat: &str) -> f64 {
    // Linux reports these in clock ticks of 1/100 s on every common build.
    const TICKS_PER_S: f64 = 100.0;
    // Fields after the command name, which is in parentheses.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11).and_then(|f| f.parse().ok()).unwrap_or(0.0);
    let stime: f64 = fields.get(12).and_then(|f| f.parse().ok()).unwrap_or(0.0);
    (utime + stime) / TICKS_PER_S
}

/// What happened to one fault, as the run saw it; the report adds the
/// traffic's figures.
#[derive(Debug, Clone, Default)]
pub struct Happened {
    /// When the fault started (the kill, or the hook armed), from the start
    /// of the run.
    pub started: Option<Duration>,
    /// When the system went down (the kill, or the hook fired).
    pub hit: Option<Duration>,
    /// When it listened again.
    pub healed: Option<Duration>,
    /// From the heal to the first transfer accepted after it.
    pub first_accepted_after: Option<Duration>,
    /// Transfers pending on the shards once it was ready again.
    pub pending_at_heal: Option<u64>,
    /// From the heal until no transfer was pending.
    pub pending_cleared_after: Option<Duration>,
    /// The audit once the pending transfers cleared: passed, and the failed
    /// checks.
    pub audit: Option<(bool, Vec<String>)>,
    /// What went other than planned.
    pub notes: Vec<String>,
    /// The system was down when the fault began: it crashed outside the
    /// schedule.
    pub found_down: bool,
}

/// How long after a heal the pending transfers are read and the audit
/// run: past the reference system's recovery grace (2 s) and a pass of its
/// recovery loop (0.5 s).
const RECOVERY_SETTLE: Duration = Duration::from_millis(3_000);

/// The longest the run waits after a heal for the pending transfers to
/// clear before it audits anyway.
const PENDING_WAIT: Duration = Duration::from_secs(30);

/// Applies the schedule against the child system; answers what happened to
/// each fault, in the schedule's order.
pub async fn apply(
    faults: Vec<Fault>,
    system: Arc<tokio::sync::Mutex<ChildSystem>>,
    sim: Arc<Sim>,
    mut api: Api,
    admin_password: Option<String>,
    run_length: Option<Duration>,
    backends: Backends,
    progress: bool,
) -> Vec<Happened> {
    let mut out = Vec::with_capacity(faults.len());
    let start = loop {
        if let Some(start) = sim.started() {
            break start;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let mut check: Option<(usize, tokio::task::JoinHandle<AfterHeal>)> = None;
    for (i, fault) in faults.iter().enumerate() {
        let mut happened = Happened::default();
        let due = start + Duration::from_millis(fault.at_ms);
        tokio::time::sleep_until(
            due.checked_sub(Duration::from_secs(1))
                .unwrap_or(due)
                .into(),
        )
        .await;
        // The checks after the last heal finish first: a fault must not cut
        // its audit short.
        if let Some((j, task)) = check.take() {
            fill(&mut out[j], task.await);
            let late = Instant::now().saturating_duration_since(due);
            if late > Duration::from_millis(100) {
                happened.notes.push(format!(
                    "started {:.1} s late: the checks after the previous heal were still running",
                    late.as_secs_f64()
                ));
            }
        }
        // The pending transfers just before: the level recovery returns to.
        let pending_before = pending_now(&api).await.unwrap_or(0);
        tokio::time::sleep_until(due.into()).await;
        let next_at = faults
            .get(i + 1)
            .map(|f| start + Duration::from_millis(f.at_ms));
        let say = |text: String| {
            if progress {
                eprintln!("  fault {}: {text}", fault.name);
            }
        };
        if !matches!(fault.action, Action::Crash | Action::CrashAt) {
            happened.started = Some(start.elapsed());
            let (hit, healed) = match fault.action {
                Action::Kill | Action::Pause => {
                    let servers = backends.shard_servers.as_ref();
                    shard_fault(servers, fault, start, &mut happened).await
                }
                Action::RedisDown => redis_fault(&backends, fault, start, &mut happened).await,
                _ => link_fault(&backends, fault, start, &mut happened).await,
            };
            happened.hit = hit;
            happened.healed = healed;
            if let Some(hit) = hit {
                let mark = sim.marks.begin("fault", &fault.name, hit.as_secs_f64());
                if let Some(healed) = healed {
                    sim.marks.end(mark, healed.as_secs_f64());
                }
            }
            if let (Some(hit), Some(healed)) = (hit, healed) {
                say(format!(
                    "{} {} at {:.1} s, back at {:.1} s",
                    fault.target,
                    if fault.action.link() {
                        fault.action.as_str()
                    } else {
                        "down"
                    },
                    hit.as_secs_f64(),
                    healed.as_secs_f64()
                ));
            }
            // A new Redis holds no sessions: everyone logs in again, once
            // the system's connection to it is back (up to 10 s).
            if fault.action == Action::RedisDown && healed.is_some() {
                let give_up = Instant::now() + Duration::from_secs(10);
                loop {
                    match log_in_again(&mut api, &sim, admin_password.as_deref()).await {
                        Ok(()) => break,
                        Err(_) if Instant::now() < give_up => {
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        Err(e) => {
                            happened
                                .notes
                                .push(format!("logging in again failed: {e:#}"));
                            break;
                        }
                    }
                }
            }
            out.push(happened);
            if let Some(healed) = out[i].healed {
                let api = api.clone();
                let task =
                    tokio::spawn(after_heal(api, sim.clone(), start, healed, pending_before));
                check = Some((i, task));
            }
            continue;
        }
        // `system` is the one process, or with six the shard manager.
        let target = backends
            .services
            .get(&fault.target)
            .cloned()
            .unwrap_or_else(|| system.clone());
        let mut system = target.lock().await;
        if system.exited() {
            happened.found_down = true;
            happened.notes.push(
                "the system was already down when the fault began: it crashed outside the schedule"
                    .into(),
            );
            system.child = None;
        }
        happened.started = Some(start.elapsed());
        let hit = match fault.action {
            Action::Crash => match system.kill().await {
                Ok(()) => Some(start.elapsed()),
                Err(e) => {
                    happened.notes.push(format!("{e:#}"));
                    None
                }
            },
            Action::CrashAt => {
                let end = run_length.map(|l| start + l);
                let until = [next_at, end].into_iter().flatten().min();
                crash_at(&mut system, fault, start, until, &mut happened).await
            }
            _ => unreachable!("faults of backends are applied above"),
        };
        happened.hit = hit;
        let mark = hit.map(|hit| sim.marks.begin("fault", &fault.name, hit.as_secs_f64()));
        if let Some(hit) = hit {
            say(format!(
                "{} down at {:.1} s",
                fault.target,
                hit.as_secs_f64()
            ));
            tokio::time::sleep(Duration::from_millis(fault.for_ms)).await;
        }
        if system.exited() {
            match system.spawn(fault.at_ms + 1).await {
                Ok(()) => {
                    happened.healed = Some(start.elapsed());
                    if let Some(mark) = mark {
                        sim.marks.end(mark, start.elapsed().as_secs_f64());
                    }
                    say(format!(
                        "{} listening again at {:.1} s",
                        fault.target,
                        start.elapsed().as_secs_f64()
                    ));
                    // Its sessions died with it: everyone logs in again.
                    if let Err(e) = log_in_again(&mut api, &sim, admin_password.as_deref()).await {
                        happened
                            .notes
                            .push(format!("logging in again failed: {e:#}"));
                    }
                }
                Err(e) => happened.notes.push(format!("restart failed: {e:#}")),
            }
        }
        drop(system);
        out.push(happened);
        // Watch the heal in the background while the load goes on.
        if let Some(healed) = out[i].healed {
            let api = api.clone();
            let task = tokio::spawn(after_heal(api, sim.clone(), start, healed, pending_before));
            check = Some((i, task));
        }
    }
    if let Some((j, task)) = check.take() {
        fill(&mut out[j], task.await);
    }
    out
}

/// What the checks after a heal found: the first accepted transfer after
/// it, the pending transfers at the heal and when they cleared, the audit,
/// and notes.
type AfterHeal = (
    Option<Duration>,
    Option<u64>,
    Option<Duration>,
    Option<(bool, Vec<String>)>,
    Vec<String>,
);

fn fill(h: &mut Happened, checked: Result<AfterHeal, tokio::task::JoinError>) {
    match checked {
        Ok((first_accepted, pending, cleared, audit, notes)) => {
            h.first_accepted_after = first_accepted;
            h.pending_at_heal = pending;
            h.pending_cleared_after = cleared.and_then(|at| Some(at.saturating_sub(h.healed?)));
            h.audit = audit;
            h.notes.extend(notes);
        }
        Err(e) => h
            .notes
            .push(format!("the checks after the heal failed: {e}")),
    }
}

/// Logs the admin and the run's owners in again, after a restart took
/// their sessions.
pub async fn log_in_again(
    api: &mut Api,
    sim: &Sim,
    admin_password: Option<&str>,
) -> anyhow::Result<()> {
    use futures_util::{StreamExt, TryStreamExt};
    let Some(password) = admin_password else {
        return Ok(());
    };
    if api.token.is_none() {
        return Ok(());
    }
    api.token = Some(api.login("admin", password).await?);
    if let Some((names, password)) = &sim.credentials {
        let tokens: Vec<String> = futures_util::stream::iter(names.clone())
            .map(|name| {
                let (api, password) = (api.clone(), password.clone());
                async move { api.login(&name, &password).await }
            })
            .buffered(crate::api::SETUP_CONCURRENCY)
            .try_collect()
            .await?;
        sim.set_tokens(tokens);
    }
    Ok(())
}

/// Arms the child's hook with SIGUSR1 and waits for it to fire, until the
/// next fault is due or the run ends (less a second), or a minute has
/// passed; answers when the system went down. Unfired, the hook is
/// disarmed (SIGUSR2).
async fn crash_at(
    system: &mut ChildSystem,
    fault: &Fault,
    start: Instant,
    next_at: Option<Instant>,
    happened: &mut Happened,
) -> Option<Duration> {
    if let Err(e) = system.signal("-USR1") {
        happened.notes.push(format!("cannot arm the hook: {e:#}"));
        return None;
    }
    let give_up = next_at
        .map(|n| n - Duration::from_secs(1))
        .unwrap_or_else(|| Instant::now() + Duration::from_secs(60))
        .min(Instant::now() + Duration::from_secs(60));
    while Instant::now() < give_up {
        let cpu = system.running_cpu_s();
        if system.exited() {
            let hit = start.elapsed();
            system.ended_cpu_s += cpu;
            system.child = None;
            return Some(hit);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    happened.notes.push(format!(
        "no transfer reached {} in time: the hook never fired, and was disarmed",
        fault.step.map(|s| s.hook()).unwrap_or("?")
    ));
    if let Err(e) = system.signal("-USR2") {
        happened
            .notes
            .push(format!("cannot disarm the hook: {e:#}"));
    }
    // It may have fired as the signal went.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let cpu = system.running_cpu_s();
    if system.exited() {
        system.ended_cpu_s += cpu;
        system.child = None;
        return Some(start.elapsed());
    }
    None
}

/// After a heal: waits for the system to answer, reads the pending
/// transfers, waits until none is pending, and audits.
async fn after_heal(
    api: Api,
    sim: Arc<Sim>,
    start: Instant,
    healed: Duration,
    pending_before: u64,
) -> AfterHeal {
    let mut notes = Vec::new();
    let first_accepted = async {
        let give_up = Instant::now() + PENDING_WAIT;
        while Instant::now() < give_up {
            match sim.recorder.last_accepted_at() {
                Some(at) if at > healed => return Some(at - healed),
                _ => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
        None
    };
    // Recovery takes over what a crash left once it is older than its
    // grace: the audit waits for that, so that it shows recovery's work.
    let settled = async {
        tokio::time::sleep(RECOVERY_SETTLE).await;
        settle(&api, start, pending_before).await
    };
    let (first_accepted, (pending, cleared, audit, more)) = tokio::join!(first_accepted, settled);
    notes.extend(more);
    (first_accepted, pending, cleared, audit, notes)
}

/// Reads the pending transfers once the system answers, waits until they
/// are back to their level before the fault (under load some are always on
/// their way), and audits.
async fn settle(
    api: &Api,
    start: Instant,
    pending_before: u64,
) -> (
    Option<u64>,
    Option<Duration>,
    Option<(bool, Vec<String>)>,
    Vec<String>,
) {
    let mut notes = Vec::new();
    let pending = || pending_now(api);
    let ready_by = Instant::now() + Duration::from_secs(10);
    let mut first = None;
    while first.is_none() && Instant::now() < ready_by {
        first = pending().await;
        if first.is_none() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let Some(at_heal) = first else {
        notes.push("the system did not answer /v1/shards within 10 s of its restart".into());
        return (None, None, None, notes);
    };
    let mut cleared = (at_heal <= pending_before).then(|| start.elapsed());
    let wait_until = Instant::now() + PENDING_WAIT;
    while cleared.is_none() && Instant::now() < wait_until {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if pending().await.is_some_and(|p| p <= pending_before) {
            cleared = Some(start.elapsed());
        }
    }
    if cleared.is_none() {
        notes.push(format!(
            "more transfers than before the fault ({pending_before}) were still pending {} s after the restart",
            PENDING_WAIT.as_secs()
        ));
    }
    let audit = match api.audit().await {
        Ok(raw) => Some((
            raw["ok"].as_bool().unwrap_or(false),
            crate::api::failed_checks(&raw),
        )),
        Err(e) => {
            notes.push(format!("the audit after the heal failed: {e:#}"));
            Some((false, vec![format!("audit not read: {e:#}")]))
        }
    };
    (Some(at_heal), cleared, audit, notes)
}

/// Transfers pending on the system's shards now; `None` when it does not
/// answer within a second.
async fn pending_now(api: &Api) -> Option<u64> {
    let shards = tokio::time::timeout(Duration::from_secs(1), api.shards())
        .await
        .ok()?
        .ok()?;
    Some(shards.iter().map(|s| s.transfers.pending).sum())
}

/// The port the child system listens on, kept for every restart: a free
/// one below the kernel's ephemeral range. A port in that range can be
/// handed to an outgoing connection while the system is down (a client
/// retrying its refused connection to that very port can connect to
/// itself), and the restarted system could not bind it.
pub fn free_port() -> anyhow::Result<u16> {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (from, to) = (
        low.saturating_sub(12_000).max(10_000),
        low.saturating_sub(1),
    );
    if to <= from {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").context("no free port")?;
        return Ok(listener.local_addr()?.port());
    }
    let offset = rand::random::<u16>() % (to - from);
    (0..to - from)
        .map(|i| from + (offset + i) % (to - from))
        .find(|&p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok())
        .context("no free port below the ephemeral range")
}

/// The log file of the child system in `dir`.
pub fn log_path(dir: &Path) -> PathBuf {
    dir.join("system.log")
}

/// The share of the throughput before a fault that counts as full again.
pub const FULL_SHARE: f64 = 0.8;
/// How many seconds before a fault give its "before" throughput.
const BEFORE_S: usize = 5;
/// A heal closer than this to the run's end leaves its recovery
/// unmeasured rather than failed.
const RECOVERY_HORIZON_S: f64 = 5.0;
/// Without a recovery, how long after the heal a fault's span lasts.
const SPAN_AFTER_HEAL_S: f64 = 5.0;

/// Each fault with its figures from the measurements, and the counts
/// inside and outside the faults' spans (measured seconds only).
pub fn report(
    faults: &[Fault],
    happened: &[Happened],
    m: &crate::record::Measured,
    warmup_s: u64,
) -> crate::report::Faults {
    use crate::record::Counts;
    let seconds = m.timeline.len();
    let accepted: Vec<u64> = m.timeline.iter().map(|s| s.values().sum()).collect();
    let secs = |d: Option<Duration>| d.map(|d| (d.as_secs_f64() * 1000.0).round() / 1000.0);
    let mut in_span = vec![false; seconds];
    let mut reports = Vec::new();
    for (fault, h) in faults.iter().zip(happened) {
        // A crash_at fault's window opens when it hits, not when it is armed.
        let started = h
            .hit
            .or(h.started)
            .map(|d| d.as_secs_f64())
            .unwrap_or(fault.at_ms as f64 / 1000.0);
        let first = started.floor() as usize;
        let from = first.saturating_sub(BEFORE_S).max(warmup_s as usize);
        let before: Vec<u64> = (from..first.min(seconds))
            .filter(|&s| !in_span[s])
            .map(|s| accepted[s])
            .collect();
        let tps_before =
            (!before.is_empty()).then(|| before.iter().sum::<u64>() as f64 / before.len() as f64);
        let healed = h.healed.map(|d| d.as_secs_f64());
        // The last whole second of the run is partial: leave it out.
        let whole = seconds.saturating_sub(1);
        let recovered_end = match (healed, tps_before) {
            (Some(healed), Some(before)) => (healed.ceil() as usize..whole)
                .find(|&s| accepted[s] as f64 >= FULL_SHARE * before)
                .map(|s| (s + 1) as f64),
            _ => None,
        };
        let recovery_unmeasured = match (healed, tps_before, recovered_end) {
            (Some(_), None, _) => {
                Some("no clean seconds before the fault to compare with".to_string())
            }
            (Some(h), Some(_), None) if h + RECOVERY_HORIZON_S > whole as f64 => Some(format!(
                "the system came back less than {RECOVERY_HORIZON_S} s before the run ended"
            )),
            _ => None,
        };
        let end = recovered_end
            .or(healed.map(|h| h + SPAN_AFTER_HEAL_S))
            .unwrap_or(started + 1.0)
            .min(seconds as f64);
        let mut counts = Counts::default();
        let mut answers: BTreeMap<(u16, String), u64> = BTreeMap::new();
        let last = (end.ceil() as usize).min(seconds);
        for s in first..last {
            if s < warmup_s as usize {
                continue;
            }
            in_span[s] = true;
            counts.requests += m.timeline_requests[s];
            counts.errors += m.timeline_errors[s];
            counts.accepted += accepted[s];
            for (k, n) in &m.timeline_outcomes[s] {
                *answers.entry(k.clone()).or_insert(0) += n;
            }
        }
        let mut answers: Vec<crate::report::OutcomeRow> = answers
            .into_iter()
            .map(|((status, code), count)| crate::report::OutcomeRow {
                status,
                code,
                count,
            })
            .collect();
        answers.sort_by(|a, b| b.count.cmp(&a.count));
        let (audit_ok, audit_failures) = match &h.audit {
            Some((ok, failed)) => (Some(*ok), failed.clone()),
            None => (None, Vec::new()),
        };
        reports.push(crate::report::FaultReport {
            name: fault.name.clone(),
            action: fault.action.as_str().into(),
            target: fault.target.clone(),
            step: fault
                .step
                .map(|s| s.hook().trim_start_matches("crash_").to_string()),
            line: fault.line,
            scheduled_s: fault.at_ms as f64 / 1000.0,
            started_s: secs(h.started),
            hit_s: secs(h.hit),
            healed_s: secs(h.healed),
            first_accepted_after_s: secs(h.first_accepted_after),
            recovered_after_s: match (recovered_end, healed) {
                (Some(end), Some(healed)) => Some(((end - healed) * 1000.0).round() / 1000.0),
                _ => None,
            },
            tps_before,
            recovery_unmeasured,
            span_s: (started, end),
            error_rate: rate(counts.errors, counts.requests),
            counts,
            answers,
            pending_at_heal: h.pending_at_heal,
            pending_cleared_after_s: secs(h.pending_cleared_after),
            audit_ok,
            audit_failures,
            notes: h.notes.clone(),
        });
    }
    let mut inside = Counts::default();
    let mut outside = Counts::default();
    for s in (warmup_s as usize)..seconds {
        let c = if in_span[s] {
            &mut inside
        } else {
            &mut outside
        };
        c.requests += m.timeline_requests[s];
        c.errors += m.timeline_errors[s];
        c.accepted += accepted[s];
    }
    crate::report::Faults {
        faults: reports,
        outside_error_rate: rate(outside.errors, outside.requests),
        outside,
        inside_error_rate: rate(inside.errors, inside.requests),
        inside,
        down_outside_faults: happened.iter().any(|h| h.found_down),
    }
}

fn rate(errors: u64, requests: u64) -> f64 {
    if requests == 0 {
        0.0
    } else {
        errors as f64 / requests as f64
    }
}
