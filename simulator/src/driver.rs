//! The load itself: a goose attack with one scenario whose one transaction
//! takes the next operation of the plan and executes it. goose runs the
//! virtual users, their think times and the run's length; the latency we
//! report is timed here, in microseconds, from each operation's intended
//! start (open model) or from the moment it is sent (closed model).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use goose::config::GooseConfiguration;
use goose::goose::{GooseUser, Scenario as GooseScenario, Transaction};
use goose::metrics::GooseMetrics;
use goose::GooseAttack;
use serde_json::json;
use shardpay_reference::peers::Replicas;

use crate::accounting::{self, Books, Entry, Outcome};
use crate::plan::{Op, Plan, Transfer};
use crate::record::{Class, Recorder, Sample};
use crate::scenario::{Load, Scenario, Stop};
use crate::schedule::Schedule;
use crate::Kind;

/// How long a user that has run out of work sleeps before looking again,
/// until goose ends the run.
const IDLE: Duration = Duration::from_millis(20);
/// Time goose gives the last operations to finish after the run's length.
pub const GRACE_S: u64 = 2;
/// Timeout of one measured request. A request slower than this counts as an
/// error, and its outcome is settled after the run.
pub const REQUEST_TIMEOUT_S: u64 = 30;

/// Everything the virtual users share.
pub struct Sim {
    /// Faults and reshards as they happen, for the live view.
    pub marks: crate::marks::Marks,
    pub plan: Plan,
    /// Account index -> id.
    pub names: Vec<String>,
    pub currency: String,
    pub recorder: Recorder,
    pub books: Books,
    pub stop: Stop,
    pub schedule: Option<Schedule>,
    /// Idempotency keys are `<key_prefix><op>-<n>`: unique per run.
    pub key_prefix: String,
    /// With auth on: the access token of each account owner; account `i`
    /// belongs to owner `i % tokens.len()`. Empty without auth.
    tokens: std::sync::RwLock<Vec<Arc<str>>>,
    /// With auth on: the owners' usernames (in token order) and password,
    /// to log them in again after the system restarts (its sessions are
    /// gone then).
    pub credentials: Option<(Vec<String>, String)>,
    /// The run restarts the system (its faults do) and then logs the owners
    /// in again: a request refused for a lost session waits for that.
    pub restarts: bool,
    /// The shard manager's replicas: each request goes to the next in turn;
    /// one that refuses the connection (the request never sent) is skipped.
    pub targets: Replicas,
    /// Transfers sent again at once because their connection closed before
    /// an answer (see [`closed_unanswered`]).
    pub resent: AtomicU64,
    /// Transfers the virtual users sent through their clients (each try;
    /// racing resends and settling use [`send_raw`] and are not counted).
    pub sent: AtomicU64,
    /// The hostile requests and how they were answered.
    pub hostile: crate::hostile::Tally,
    next: AtomicU64,
    executed: AtomicU64,
    /// Open model: operations sent later than [`LATE`] after they were
    /// due (every user was busy), and the worst such lag, microseconds.
    late: AtomicU64,
    worst_lag_us: AtomicU64,
    start: OnceLock<Instant>,
}

/// An open-model operation sent this long after it was due counts as late:
/// the schedule fell behind because every virtual user was busy.
pub const LATE: Duration = Duration::from_millis(100);

impl Sim {
    pub fn new(
        scenario: &Scenario,
        plan: Plan,
        names: Vec<String>,
        key_prefix: String,
        targets: Replicas,
    ) -> Sim {
        let schedule = match &scenario.load {
            Load::Open {
                start_rate_per_s,
                stages,
                ..
            } => Some(Schedule::new(*start_rate_per_s, stages)),
            Load::Closed { .. } => None,
        };
        Sim {
            plan,
            names,
            currency: scenario.accounts.currency.code().to_string(),
            recorder: Recorder::new(Duration::from_secs(scenario.warmup_s)),
            books: Books::default(),
            stop: scenario.stop,
            schedule,
            key_prefix,
            tokens: std::sync::RwLock::new(Vec::new()),
            credentials: None,
            restarts: false,
            targets,
            resent: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            hostile: crate::hostile::Tally::default(),
            next: AtomicU64::new(0),
            executed: AtomicU64::new(0),
            late: AtomicU64::new(0),
            marks: crate::marks::Marks::default(),
            worst_lag_us: AtomicU64::new(0),
            start: OnceLock::new(),
        }
    }

    /// The bearer token that may pay from account `payer`.
    pub fn token(&self, payer: u32) -> Option<Arc<str>> {
        let tokens = self.tokens.read().expect("tokens lock");
        if tokens.is_empty() {
            None
        } else {
            Some(tokens[payer as usize % tokens.len()].clone())
        }
    }

    /// The owners' tokens, in the order of `credentials`.
    pub fn set_tokens(&self, tokens: Vec<String>) {
        *self.tokens.write().expect("tokens lock") = tokens.into_iter().map(Arc::from).collect();
    }

    /// Whether `answer` says a restart of the system took the session, and
    /// the run logs its owners in again after restarts.
    fn session_lost(&self, answer: &Answer) -> bool {
        self.restarts && answer.status == 401 && answer.code == "session_revoked"
    }

    /// Waits until the payer's token is not `old` (the run logged the
    /// owners in again); false when `give_up` came first.
    async fn new_token(&self, payer: u32, old: &Option<Arc<str>>, give_up: Instant) -> bool {
        while Instant::now() < give_up {
            if self.token(payer) != *old {
                return true;
            }
            tokio::time::sleep(REFUSED_PAUSE).await;
        }
        false
    }

    /// How many owners have tokens (0: auth off).
    pub fn owners(&self) -> usize {
        self.tokens.read().expect("tokens lock").len()
    }

    /// When the first operation started; the run's clock.
    pub fn started(&self) -> Option<Instant> {
        self.start.get().copied()
    }

    /// Operations taken so far (some past the end of the run, not sent).
    pub fn issued(&self) -> u64 {
        self.next.load(Ordering::Relaxed)
    }

    /// Operations executed.
    pub fn executed(&self) -> u64 {
        self.executed.load(Ordering::Relaxed)
    }

    /// Open model: how far the schedule fell behind. `None` in the closed
    /// model, which has no schedule.
    pub fn schedule_lag(&self) -> Option<ScheduleLag> {
        let schedule = self.schedule.as_ref()?;
        let mut due = schedule.len();
        if let Some(seconds) = self.stop.seconds() {
            due = due.min(schedule.due_before(Duration::from_secs(seconds)));
        }
        if let Some(count) = self.stop.count() {
            due = due.min(count);
        }
        Some(ScheduleLag {
            due,
            unsent: due.saturating_sub(self.executed()),
            late: self.late.load(Ordering::Relaxed),
            worst_lag_ms: self.worst_lag_us.load(Ordering::Relaxed) as f64 / 1000.0,
        })
    }
}

pub use crate::report::ScheduleLag;

/// Runs the goose attack to the end of the scenario, on `sim`'s targets.
pub async fn attack(scenario: &Scenario, sim: Arc<Sim>) -> anyhow::Result<GooseMetrics> {
    quiet_goose();
    let mut config = GooseConfiguration::default();
    let users = scenario.load.users() as usize;
    // goose has one host; every request names its replica's full URL.
    config.host = Some(sim.targets.urls()[0].clone());
    config.users = Some(users);
    // Every user starts at once: the warm-up absorbs the ramp.
    config.increase_rate = Some(format!("{}", users.max(1) * 100));
    config.quiet = 1;
    config.no_print_metrics = true;
    config.no_error_summary = true;
    config.no_telnet = true;
    config.no_autostart = false;
    config.no_gzip = true;
    config.no_metrics = true;
    config.timeout = Some(REQUEST_TIMEOUT_S.to_string());
    match (scenario.stop, &scenario.load) {
        (Stop::Requests { count }, Load::Closed { .. }) => {
            // Each user runs its share; users past the count return at once.
            config.iterations = Some((count as usize).div_ceil(users));
        }
        (stop, _) => {
            let seconds = stop.seconds().expect("timed runs have a length");
            config.run_time = Some(format!("{}", seconds + GRACE_S));
        }
    }
    let step_sim = sim.clone();
    let step: goose::goose::TransactionFunction = Arc::new(move |user| {
        let sim = step_sim.clone();
        Box::pin(async move {
            step(user, &sim).await;
            Ok(())
        })
    });
    let mut payments = GooseScenario::new("payments")
        .register_transaction(Transaction::new(step).set_name("operation"));
    if let Load::Closed {
        think_time_ms: (lo, hi),
        ..
    } = scenario.load
    {
        if hi > 0 {
            payments = payments
                .set_wait_time(Duration::from_millis(lo), Duration::from_millis(hi))
                .map_err(|e| anyhow::anyhow!("think time: {e}"))?;
        }
    }
    let metrics = GooseAttack::initialize_with_config(config)
        .map_err(|e| anyhow::anyhow!("cannot set up the load generator: {e}"))?
        .register_scenario(payments)
        .execute()
        .await
        .map_err(|e| anyhow::anyhow!("the load generator failed: {e}"))?;
    Ok(metrics)
}

/// One pass of a virtual user: the next operation, when it is due.
async fn step(user: &mut GooseUser, sim: &Sim) {
    let start = *sim.start.get_or_init(Instant::now);
    let k = sim.next.fetch_add(1, Ordering::Relaxed);
    let over_count = sim.stop.count().is_some_and(|count| k >= count);
    let intended = match &sim.schedule {
        Some(schedule) => match schedule.due(k) {
            Some(due) if !over_count => {
                let at = start + due;
                let lag = Instant::now().saturating_duration_since(at);
                if lag > LATE {
                    sim.late.fetch_add(1, Ordering::Relaxed);
                    sim.worst_lag_us
                        .fetch_max(lag.as_micros() as u64, Ordering::Relaxed);
                }
                tokio::time::sleep_until(at.into()).await;
                at
            }
            _ => return idle(sim).await,
        },
        None if over_count => return idle(sim).await,
        None => Instant::now(),
    };
    if let Some(seconds) = sim.stop.seconds() {
        if intended.duration_since(start) >= Duration::from_secs(seconds) {
            return idle(sim).await;
        }
    }
    let op = sim.plan.op(k);
    sim.executed.fetch_add(1, Ordering::Relaxed);
    execute(user, sim, k, op, start, intended).await;
}

/// A user with nothing left to send waits for goose to end the run (closed
/// runs by count end by goose's iteration limit, so they return at once).
async fn idle(sim: &Sim) {
    if sim.stop.seconds().is_some() {
        tokio::time::sleep(IDLE).await;
    }
}

/// goose logs a warning for every request that fails, which floods the
/// terminal when a fault takes the system down (the report counts them).
/// Taking the `log` facade first keeps only its errors; goose's own logger
/// then finds the place taken and stands aside.
fn quiet_goose() {
    struct ErrorsOnly;
    impl log::Log for ErrorsOnly {
        fn enabled(&self, metadata: &log::Metadata) -> bool {
            metadata.level() <= log::Level::Error
        }
        fn log(&self, record: &log::Record) {
            if self.enabled(record.metadata()) {
                eprintln!("{}: {}", record.target(), record.args());
            }
        }
        fn flush(&self) {}
    }
    static LOGGER: ErrorsOnly = ErrorsOnly;
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(log::LevelFilter::Error);
    }
}

/// An answer to one transfer request.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Answer {
    /// 0: no HTTP answer (connection error or timeout).
    status: u16,
    replayed: bool,
    code: String,
    id: Option<String>,
    state: Option<String>,
    /// The payer's and payee's shards as the system placed them when it
    /// took the transfer (a reshard may have moved them since setup).
    shards: Option<(u16, u16)>,
    body: String,
}

impl Answer {
    fn transport(error: &reqwest::Error) -> Answer {
        Answer {
            status: 0,
            replayed: false,
            code: if error.is_timeout() {
                "timeout".into()
            } else {
                "transport".into()
            },
            id: None,
            state: None,
            shards: None,
            body: error.to_string(),
        }
    }

    async fn read(response: reqwest::Response) -> Answer {
        let status = response.status().as_u16();
        let replayed = response
            .headers()
            .get("idempotent-replayed")
            .is_some_and(|v| v == "true");
        let body = match response.text().await {
            Ok(body) => body,
            Err(e) => return Answer::transport(&e),
        };
        let value: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        let code = value["error"]["code"]
            .as_str()
            .or_else(|| value["failure_code"].as_str())
            .unwrap_or("")
            .to_string();
        Answer {
            status,
            replayed,
            code,
            id: value["id"].as_str().map(str::to_string),
            state: value["state"].as_str().map(str::to_string),
            shards: shard_pair(&value),
            body,
        }
    }

    /// The system took the transfer (it has an id and a state).
    fn accepted(&self) -> bool {
        matches!(self.status, 201 | 202 | 422) && self.id.is_some() && self.state.is_some()
    }

    /// A refusal that the system keeps as the key's answer.
    fn declined(&self) -> bool {
        matches!(self.status, 402 | 403 | 422)
            && !self.accepted()
            && (self.code == "insufficient_funds" || accounting::is_fraud_code(&self.code))
    }

    /// The key's final answer, if this is one.
    fn outcome(&self) -> Option<Outcome> {
        if self.accepted() {
            Some(Outcome::Accepted {
                id: self.id.clone().unwrap_or_default(),
                state: self.state.clone().unwrap_or_default(),
            })
        } else if self.declined() {
            Some(Outcome::Declined {
                code: self.code.clone(),
            })
        } else {
            None
        }
    }

    fn class(&self) -> Class {
        if self.replayed && self.outcome().is_some() {
            Class::Replayed
        } else if self.accepted() {
            Class::Accepted
        } else if self.declined() {
            Class::Declined
        } else if self.status == 429 {
            Class::RateLimited
        } else if self.status == 401
            || (self.status == 403
                && matches!(
                    self.code.as_str(),
                    "not_account_owner" | "forbidden" | "opening_balance_requires_admin"
                ))
        {
            Class::Unauthorized
        } else {
            Class::Error
        }
    }

    fn code_or_status(&self) -> &str {
        if self.code.is_empty() {
            match self.state.as_deref() {
                Some(state) => state,
                None => "",
            }
        } else {
            &self.code
        }
    }
}

fn body(sim: &Sim, t: &Transfer, amount_minor: i64) -> serde_json::Value {
    json!({
        "from": sim.names[t.payer as usize],
        "to": sim.names[t.payee as usize],
        "amount_minor": amount_minor,
        "currency": sim.currency,
    })
}

/// Sends one transfer through the virtual user's client with the payer's
/// owner's token; see [`send_user_with`]. A restart of the system
/// (a fault of the run's) takes its sessions: the request is sent again
/// once the run has logged its owners in again.
async fn send_user(
    user: &GooseUser,
    sim: &Sim,
    key: &str,
    body: &serde_json::Value,
    payer: u32,
) -> Answer {
    let give_up = Instant::now() + REFUSED_FOR;
    loop {
        let token = sim.token(payer);
        let answer = send_user_with(user, sim, key, body, token.as_deref()).await;
        if !sim.session_lost(&answer) || !sim.new_token(payer, &token, give_up).await {
            return answer;
        }
    }
}

/// Sends one transfer through the virtual user's client, to the next
/// replica in turn; a replica that refuses the connection is skipped.
async fn send_user_with(
    user: &GooseUser,
    sim: &Sim,
    key: &str,
    body: &serde_json::Value,
    token: Option<&str>,
) -> Answer {
    let targets = &sim.targets;
    let give_up = Instant::now() + REFUSED_FOR;
    let mut resends = 0;
    loop {
        let mut refused = None;
        for (i, base) in targets.turn() {
            match send_user_to(user, sim, base, key, body, token).await {
                Err(e) if e.is_connect() => {
                    targets.refused(i);
                    refused = Some(e);
                }
                Err(e) if closed_unanswered(&e) && resends < MAX_RESENDS => {
                    resends += 1;
                    sim.resent.fetch_add(1, Ordering::Relaxed);
                    refused = Some(e);
                }
                Err(e) => return Answer::transport(&e),
                Ok(answer) => return answer,
            }
        }
        let refused = refused.expect("a target list has at least one URL");
        if Instant::now() >= give_up {
            return Answer::transport(&refused);
        }
        tokio::time::sleep(REFUSED_PAUSE).await;
    }
}

/// Whether a request's connection closed before any answer came: a server
/// that stops closes its idle keep-alive connections, and one the client
/// had just written to ends like this. Under its idempotency key the
/// transfer can be sent again safely (a replay if it ran), so the simulator
/// does, as Stripe's client libraries do, rather than count an error the
/// system did not make.
fn closed_unanswered(error: &reqwest::Error) -> bool {
    if error.is_timeout() || error.is_connect() {
        return false;
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if let Some(h) = e.downcast_ref::<hyper::Error>() {
            if h.is_incomplete_message() || h.is_canceled() {
                return true;
            }
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            if matches!(
                io.kind(),
                ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof
            ) {
                return true;
            }
        }
        source = e.source();
    }
    false
}

/// How many times one transfer is sent again after its connection closed
/// unanswered: a server that keeps doing it is failing, not stopping.
const MAX_RESENDS: u32 = 3;

/// How long a request that every replica refused (no connection, so
/// nothing was sent) is tried again, a pause apart, before it counts as an
/// error: a system restarting on its port answers it late, and the time
/// waited is in its latency.
const REFUSED_FOR: Duration = Duration::from_secs(10);
const REFUSED_PAUSE: Duration = Duration::from_millis(25);

/// One transfer through the virtual user's HTTP client to the replica at
/// `base`: the answer, or the transport error that kept it. goose runs the
/// users and their clients; the request goes to the client directly, not
/// through goose's per-request metrics, which the run does not read (the
/// recorder measures every request), and which cost the simulator CPU.
async fn send_user_to(
    user: &GooseUser,
    sim: &Sim,
    base: &str,
    key: &str,
    body: &serde_json::Value,
    token: Option<&str>,
) -> Result<Answer, reqwest::Error> {
    let request = user
        .client
        .post(format!("{base}/v1/transfers"))
        .header("Idempotency-Key", key)
        .json(body);
    let request = match token {
        Some(t) => request.bearer_auth(t),
        None => request,
    };
    sim.sent.fetch_add(1, Ordering::Relaxed);
    let response = request.send().await?;
    Ok(Answer::read(response).await)
}

/// Sends one transfer straight through the user's HTTP client, for requests
/// that race another one of the same user (or settle one after the run), to
/// the next replica in turn; a replica that refuses the connection is
/// skipped.
async fn send_raw(
    client: &reqwest::Client,
    sim: &Sim,
    key: &str,
    body: &serde_json::Value,
    payer: u32,
) -> Answer {
    let give_up = Instant::now() + REFUSED_FOR;
    loop {
        let token = sim.token(payer);
        let answer = send_raw_with(client, sim, key, body, token.as_deref()).await;
        if !sim.session_lost(&answer) || !sim.new_token(payer, &token, give_up).await {
            return answer;
        }
    }
}

async fn send_raw_with(
    client: &reqwest::Client,
    sim: &Sim,
    key: &str,
    body: &serde_json::Value,
    token: Option<&str>,
) -> Answer {
    let give_up = Instant::now() + REFUSED_FOR;
    let mut resends = 0;
    let sent = loop {
        let sent = sim
            .targets
            .send("/v1/transfers", |url| {
                let request = client.post(url).header("Idempotency-Key", key).json(body);
                match token {
                    Some(t) => request.bearer_auth(t),
                    None => request,
                }
            })
            .await;
        match &sent {
            Err(down) if down.source.is_connect() && Instant::now() < give_up => {
                tokio::time::sleep(REFUSED_PAUSE).await;
            }
            Err(down) if closed_unanswered(&down.source) && resends < MAX_RESENDS => {
                resends += 1;
                sim.resent.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(REFUSED_PAUSE).await;
            }
            _ => break sent,
        }
    };
    match sent {
        Ok(response) => Answer::read(response).await,
        Err(down) => Answer::transport(&down.source),
    }
}

/// A transfer's `from_shard` and `to_shard`, when the answer is one.
fn shard_pair(value: &serde_json::Value) -> Option<(u16, u16)> {
    let shard = |name: &str| value[name].as_u64().and_then(|s| u16::try_from(s).ok());
    Some((shard("from_shard")?, shard("to_shard")?))
}

struct Ctx<'a> {
    sim: &'a Sim,
    start: Instant,
    kind: Kind,
}

impl Ctx<'_> {
    fn record(&self, t: &Transfer, answer: &Answer, from: Instant, class: Class) {
        let now = Instant::now();
        self.sim.recorder.record(&Sample {
            kind: self.kind,
            // Where the system says the accounts were, else where they
            // were at setup.
            payer_shard: answer
                .shards
                .map_or_else(|| self.sim.plan.shard_of(t.payer), |(from, _)| from),
            payee_shard: answer
                .shards
                .map_or_else(|| self.sim.plan.shard_of(t.payee), |(_, to)| to),
            latency: now.duration_since(from),
            at: now.duration_since(self.start),
            class,
            status: answer.status,
            code: if answer.replayed && class == Class::Replayed {
                "idempotent_replay"
            } else {
                answer.code_or_status()
            },
        });
    }

    fn entry(&self, key: &str, t: &Transfer, fraud_label: Option<bool>) {
        self.sim.books.sent(
            key,
            Entry {
                payer: t.payer,
                payee: t.payee,
                amount_minor: t.amount_minor,
                outcome: Outcome::Unknown,
                fraud_label,
            },
        );
    }
}

async fn execute(
    user: &mut GooseUser,
    sim: &Sim,
    k: u64,
    op: Op,
    start: Instant,
    intended: Instant,
) {
    let ctx = Ctx {
        sim,
        start,
        kind: op.kind(),
    };
    match op {
        Op::Hostile { attack, transfer } => {
            use crate::hostile::Attack;
            // Attacks on auth need it on, and another owner to attack.
            let attack = if attack.needs_auth() && sim.owners() < 2 {
                Attack::NegativeAmount
            } else {
                attack
            };
            let key = format!("{}{k}-h", sim.key_prefix);
            let client = user.client.clone();
            let (status, code) = send_hostile(&client, sim, attack, &key, &transfer).await;
            let class = if sim.hostile.record(attack, status, &code) {
                Class::Declined
            } else {
                Class::Error
            };
            let answer = Answer {
                status,
                replayed: false,
                code,
                id: None,
                state: None,
                shards: None,
                body: String::new(),
            };
            ctx.record(&transfer, &answer, intended, class);
        }
        Op::Single { kind: _, transfer } => {
            let key = format!("{}{k}-0", sim.key_prefix);
            ctx.entry(&key, &transfer, None);
            let answer = send_user(
                user,
                sim,
                &key,
                &body(sim, &transfer, transfer.amount_minor),
                transfer.payer,
            )
            .await;
            if let Some(outcome) = answer.outcome() {
                sim.books.settle(&key, outcome);
            }
            ctx.record(&transfer, &answer, intended, answer.class());
        }
        Op::Fraud {
            fraudulent,
            transfers,
        } => {
            // A burst: back to back, the first timed from the intended start.
            let mut from = intended;
            for (n, transfer) in transfers.iter().enumerate() {
                let key = format!("{}{k}-{n}", sim.key_prefix);
                ctx.entry(&key, transfer, Some(fraudulent));
                let answer = send_user(
                    user,
                    sim,
                    &key,
                    &body(sim, transfer, transfer.amount_minor),
                    transfer.payer,
                )
                .await;
                if let Some(outcome) = answer.outcome() {
                    sim.books.settle(&key, outcome);
                }
                ctx.record(transfer, &answer, from, answer.class());
                from = Instant::now();
            }
        }
        Op::Retry {
            transfer,
            resends,
            concurrent,
            changed_amount_minor,
        } => {
            retry_group(
                user,
                &ctx,
                k,
                transfer,
                resends,
                concurrent,
                changed_amount_minor,
                intended,
            )
            .await
        }
    }
}

/// One transfer sent 1 + `resends` times under one key, `concurrent` of them
/// racing the first. Exactly one request may execute it; every other answer
/// must be a replay identical to that one's, or a 409 while it runs.
#[allow(clippy::too_many_arguments)]
async fn retry_group(
    user: &mut GooseUser,
    ctx: &Ctx<'_>,
    k: u64,
    transfer: Transfer,
    resends: u32,
    concurrent: u32,
    changed_amount_minor: Option<i64>,
    intended: Instant,
) {
    ctx.sim.books.retry_group();
    let group = RetryGroup::new(user, ctx, k, transfer);
    ctx.entry(&group.key, &group.transfer, None);
    let answers = group.send_all(user, concurrent, resends, intended).await;
    let reference = group.reference(&answers);
    if let Some(outcome) = reference.as_ref().and_then(Answer::outcome) {
        ctx.sim.books.settle(&group.key, outcome);
    }
    for (answer, sent) in &answers {
        let class = group.class(answer, reference.as_ref());
        ctx.record(&group.transfer, answer, *sent, class);
    }
    // The same key with another amount must be refused and change nothing.
    // Only once the key has a stored answer: before that, a changed body
    // would simply be a new request.
    if let (Some(amount), Some(_)) = (changed_amount_minor, &reference) {
        group.send_changed_body(amount).await;
    }
}

/// The requests of one retry group: one transfer under one key.
struct RetryGroup<'a> {
    ctx: &'a Ctx<'a>,
    transfer: Transfer,
    key: String,
    body: serde_json::Value,
    /// The user's HTTP client, for the requests that bypass goose.
    client: reqwest::Client,
}

impl<'a> RetryGroup<'a> {
    fn new(user: &GooseUser, ctx: &'a Ctx<'a>, k: u64, transfer: Transfer) -> Self {
        let sim = ctx.sim;
        RetryGroup {
            ctx,
            key: format!("{}{k}-0", sim.key_prefix),
            body: body(sim, &transfer, transfer.amount_minor),
            transfer,
            client: user.client.clone(),
        }
    }

    /// Sends `body` under the group's key, outside goose.
    async fn send_raw(&self, body: &serde_json::Value) -> Answer {
        send_raw(
            &self.client,
            self.ctx.sim,
            &self.key,
            body,
            self.transfer.payer,
        )
        .await
    }

    /// The first request (through goose, timed from `intended`) with its
    /// `concurrent` racers, then the resends that wait for an answer; each
    /// answer with the moment its request was sent.
    async fn send_all(
        &self,
        user: &mut GooseUser,
        concurrent: u32,
        resends: u32,
        intended: Instant,
    ) -> Vec<(Answer, Instant)> {
        let racers = (0..concurrent).map(|_| async {
            let sent = Instant::now();
            (self.send_raw(&self.body).await, sent)
        });
        let first = async {
            let payer = self.transfer.payer;
            let answer = send_user(user, self.ctx.sim, &self.key, &self.body, payer).await;
            (answer, intended)
        };
        let (first, raced) = tokio::join!(first, futures_util::future::join_all(racers));
        let mut answers = vec![first];
        answers.extend(raced);
        for _ in concurrent..resends {
            let sent = Instant::now();
            answers.push((self.send_raw(&self.body).await, sent));
        }
        answers
    }

    /// The executing answer: the one that is final and not a replay (more
    /// than one is a violation), else the first final one.
    fn reference(&self, answers: &[(Answer, Instant)]) -> Option<Answer> {
        let executed: Vec<&Answer> = answers
            .iter()
            .map(|(a, _)| a)
            .filter(|a| a.outcome().is_some() && !a.replayed)
            .collect();
        if executed.len() > 1 {
            self.ctx.sim.books.violation(format!(
                "key {}: executed {} times ({})",
                self.key,
                executed.len(),
                executed
                    .iter()
                    .map(|a| a.id.clone().unwrap_or_else(|| a.code.clone()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        executed.first().copied().cloned().or_else(|| {
            answers
                .iter()
                .find(|(a, _)| a.outcome().is_some())
                .map(|(a, _)| a.clone())
        })
    }

    /// How an answer of the group counts: a 409 while the first runs as a
    /// replay; a replay that differs from the executing answer as an error
    /// (and a violation).
    fn class(&self, answer: &Answer, reference: Option<&Answer>) -> Class {
        if answer.status == 409 && answer.code == "idempotency_key_in_flight" {
            return Class::Replayed;
        }
        if answer.replayed
            && !reference.is_some_and(|r| r.status == answer.status && r.body == answer.body)
        {
            self.ctx.sim.books.violation(format!(
                "key {}: replay answered {} {} but the request executed with {}",
                self.key,
                answer.status,
                answer.body,
                reference
                    .map(|r| format!("{} {}", r.status, r.body))
                    .unwrap_or_else(|| "no final answer".into())
            ));
            return Class::Error;
        }
        answer.class()
    }

    /// Sends the transfer again under the key with another amount; anything
    /// but a 422 `idempotency_key_reused` is a violation, except a 503: the
    /// system said it could not look at the request (a store it needs is
    /// down), which is an error of the run but breaks no rule of keys.
    async fn send_changed_body(&self, amount_minor: i64) {
        let sent = Instant::now();
        let answer = self
            .send_raw(&body(self.ctx.sim, &self.transfer, amount_minor))
            .await;
        let refused = answer.status == 422 && answer.code == "idempotency_key_reused";
        if !refused && answer.status != 0 && answer.status != 503 {
            self.ctx.sim.books.violation(format!(
                "key {}: a changed body answered {} {} instead of 422 idempotency_key_reused",
                self.key, answer.status, answer.body
            ));
        }
        let class = if refused {
            Class::Declined
        } else {
            Class::Error
        };
        self.ctx.record(&self.transfer, &answer, sent, class);
    }
}

/// After the run: sends every request whose answer never came again, with
/// its key and body, until it has one (to any replica that answers).
/// Returns how many were settled.
pub async fn settle_unknown(sim: &Sim) -> anyhow::Result<(u64, u64)> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(REQUEST_TIMEOUT_S))
        .build()?;
    let mut settled = 0;
    let mut unsettled = 0;
    for (key, entry) in sim.books.entries() {
        if entry.outcome != Outcome::Unknown {
            continue;
        }
        let t = Transfer {
            payer: entry.payer,
            payee: entry.payee,
            amount_minor: entry.amount_minor,
        };
        let mut outcome = None;
        // A 409 means a request with this key is still running: wait a bit.
        for attempt in 0..20 {
            let answer =
                send_raw(&client, sim, &key, &body(sim, &t, t.amount_minor), t.payer).await;
            outcome = answer.outcome();
            if outcome.is_some()
                || answer.status != 409 && answer.status != 0 && answer.status < 500
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50 * (attempt + 1))).await;
        }
        match outcome {
            Some(o) => {
                sim.books.settle(&key, o);
                settled += 1;
            }
            None => unsettled += 1,
        }
    }
    Ok((settled, unsettled))
}

/// Sends one hostile request; answers the status (0: no answer) and the
/// error code.
pub(crate) async fn send_hostile(
    client: &reqwest::Client,
    sim: &Sim,
    attack: crate::hostile::Attack,
    key: &str,
    t: &Transfer,
) -> (u16, String) {
    let name = |i: u32| sim.names[i as usize].clone();
    let count = sim.plan.accounts();
    // An account of another owner: account i belongs to owner i % owners
    // (the driver sends these attacks only with two owners or more).
    let victim = name(if t.payer + 1 < count {
        t.payer + 1
    } else {
        t.payer.saturating_sub(1)
    });
    let mut body = serde_json::json!({
        "from": name(t.payer),
        "to": name(t.payee),
        "amount_minor": t.amount_minor,
        "currency": sim.currency,
    });
    let mut raw: Option<(&str, String)> = None;
    let mut key = key.to_string();
    let mut token = sim.token(t.payer).map(|t| t.to_string());
    let mut read = None;
    match attack {
        crate::hostile::Attack::NegativeAmount => {
            body["amount_minor"] = serde_json::json!(-t.amount_minor.max(1))
        }
        crate::hostile::Attack::ZeroAmount => body["amount_minor"] = serde_json::json!(0),
        crate::hostile::Attack::HugeAmount => body["amount_minor"] = serde_json::json!(i64::MAX),
        crate::hostile::Attack::TooPrecise => {
            body.as_object_mut().expect("object").remove("amount_minor");
            // One decimal more than the currency has.
            let scale = shardpay_reference::money::Currency::parse(&sim.currency)
                .map(|c| c.scale())
                .unwrap_or(2);
            body["amount"] = serde_json::json!(format!("1.{}1", "0".repeat(scale as usize)));
        }
        crate::hostile::Attack::NotANumber => {
            body.as_object_mut().expect("object").remove("amount_minor");
            body["amount"] = serde_json::json!("12abc");
        }
        crate::hostile::Attack::BothAmounts => body["amount"] = serde_json::json!("1.00"),
        crate::hostile::Attack::MalformedJson => {
            raw = Some((
                "application/json",
                format!(r#"{{"from": "{}", "amount_minor": "#, name(t.payer)),
            ));
        }
        crate::hostile::Attack::WrongShape => body["amount_minor"] = serde_json::json!("ten"),
        crate::hostile::Attack::BadAccountId => body["to"] = serde_json::json!("../../etc/passwd"),
        crate::hostile::Attack::UnknownPayee => {
            body["to"] = serde_json::json!(format!("{}nobody", sim.key_prefix))
        }
        crate::hostile::Attack::SameAccount => body["to"] = body["from"].clone(),
        crate::hostile::Attack::UnknownCurrency => body["currency"] = serde_json::json!("XYZ"),
        crate::hostile::Attack::BadKey => key = "k".repeat(300),
        crate::hostile::Attack::WrongMediaType => raw = Some(("text/plain", body.to_string())),
        crate::hostile::Attack::NoToken => token = None,
        crate::hostile::Attack::ForgedToken => token = Some(crate::hostile::forged_token()),
        crate::hostile::Attack::OthersAccount => body["from"] = serde_json::json!(victim),
        crate::hostile::Attack::ReadOthersAccount => read = Some(format!("/v1/accounts/{victim}")),
    }
    let path = read.clone().unwrap_or_else(|| "/v1/transfers".into());
    let sent = sim
        .targets
        .send(&path, |url| {
            let request = match (&read, &raw) {
                (Some(_), _) => client.get(url),
                (None, Some((content_type, text))) => client
                    .post(url)
                    .header("content-type", *content_type)
                    .body(text.clone()),
                (None, None) => client.post(url).json(&body),
            };
            let request = match read {
                Some(_) => request,
                None => request.header("Idempotency-Key", key.as_str()),
            };
            match &token {
                Some(t) => request.bearer_auth(t),
                None => request,
            }
        })
        .await;
    match sent {
        Ok(response) => {
            let status = response.status().as_u16();
            let text = response.text().await.unwrap_or_default();
            let value: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
            let code = value["error"]["code"].as_str().unwrap_or("").to_string();
            (status, code)
        }
        Err(_) => (0, "transport".into()),
    }
}
