//! Scenario files: TOML read into checked types. Every error names the file,
//! the line and the dotted key, and unknown keys are refused, so a typo
//! cannot silently fall back to a default. `scenarios/README.md` documents
//! every key.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::path::Path;

use serde::Deserialize;
use shardpay_reference::money::{Amount, Currency};
use toml::Spanned;

use crate::Kind;

pub mod faults;

/// Most accounts a scenario may create: setup time and the simulator's own
/// bookkeeping grow with it, and 10 million is beyond any demo or CI run.
pub const MAX_ACCOUNTS: u32 = 10_000_000;
/// Longest run, one day: longer is a soak test, not a scenario.
pub const MAX_DURATION_S: u64 = 86_400;
/// Most concurrent virtual users (closed) or requests in flight (open).
pub const MAX_USERS: u32 = 10_000;
/// Most times one idempotent transfer is re-sent.
pub const MAX_RESENDS: u32 = 16;
/// Most transfers in one fraud burst.
pub const MAX_BURST: u32 = 100;
/// Largest weight of one kind in `[mix]`: weights are proportions, and
/// four of them must add up without overflowing.
pub const MAX_WEIGHT: u32 = 1_000_000;

/// A scenario error: where it is and what to change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScenarioError {
    pub file: String,
    pub line: usize,
    pub key: String,
    pub message: String,
}

impl fmt::Display for ScenarioError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}:{}: {}", self.file, self.line, self.message)
        } else {
            write!(
                f,
                "{}:{}: `{}`: {}",
                self.file, self.line, self.key, self.message
            )
        }
    }
}

impl std::error::Error for ScenarioError {}

/// When a run stops issuing new work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    Duration {
        seconds: u64,
    },
    Requests {
        count: u64,
    },
    /// Whichever comes first.
    Either {
        seconds: u64,
        count: u64,
    },
}

impl Stop {
    pub fn seconds(&self) -> Option<u64> {
        match *self {
            Stop::Duration { seconds } | Stop::Either { seconds, .. } => Some(seconds),
            Stop::Requests { .. } => None,
        }
    }
    pub fn count(&self) -> Option<u64> {
        match *self {
            Stop::Requests { count } | Stop::Either { count, .. } => Some(count),
            Stop::Duration { .. } => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Popularity {
    Uniform,
    /// With probability `hot_share` the account is drawn from the `hot_set`
    /// most popular accounts, rank r weighted 1/r^exponent; otherwise
    /// uniformly from all accounts.
    Zipf {
        exponent: f64,
        hot_set: u32,
        hot_share: f64,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Accounts {
    pub count: u32,
    pub opening_balance: Amount,
    pub currency: Currency,
    pub popularity: Popularity,
}

/// One stage of the open model: the arrival rate moves linearly to
/// `target_per_s` over `duration_s`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stage {
    pub duration_s: u64,
    pub target_per_s: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Load {
    /// N virtual users, each sending its next operation when the last one
    /// answered, after a think time drawn from [min, max].
    Closed {
        users: u32,
        think_time_ms: (u64, u64),
    },
    /// Operations arrive on a schedule whatever the system's speed; latency
    /// is measured from each operation's intended start.
    Open {
        start_rate_per_s: f64,
        stages: Vec<Stage>,
        max_in_flight: u32,
    },
}

impl Load {
    pub fn model(&self) -> &'static str {
        match self {
            Load::Closed { .. } => "closed",
            Load::Open { .. } => "open",
        }
    }
    /// Goose users the run needs.
    pub fn users(&self) -> u32 {
        match self {
            Load::Closed { users, .. } => *users,
            Load::Open { max_in_flight, .. } => *max_in_flight,
        }
    }
}

/// Weights of the kinds of operation; zero leaves a kind out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Mix {
    pub same_shard: u32,
    pub cross_shard: u32,
    pub idempotent_retry: u32,
    pub fraud_heavy: u32,
    pub hostile: u32,
}

impl Mix {
    pub fn weight(&self, kind: Kind) -> u32 {
        match kind {
            Kind::SameShard => self.same_shard,
            Kind::CrossShard => self.cross_shard,
            Kind::IdempotentRetry => self.idempotent_retry,
            Kind::FraudHeavy => self.fraud_heavy,
            Kind::Hostile => self.hostile,
        }
    }
    pub fn total(&self) -> u32 {
        Kind::ALL.iter().map(|k| self.weight(*k)).sum()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Amounts {
    pub min: Amount,
    pub max: Amount,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Retry {
    /// Times the transfer is sent again with the same key and body.
    pub resends: u32,
    /// How many of the resends race the first request instead of waiting for
    /// its answer (they may get 409 idempotency_key_in_flight).
    pub concurrent: u32,
    /// Chance that a group also sends the key once with a changed amount,
    /// which must be refused with 422 idempotency_key_reused.
    pub changed_body_share: f64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fraud {
    /// Share of fraud-heavy operations that are fraudulent (labelled fraud):
    /// a burst of large, round amounts to new payees. The rest are legitimate
    /// look-alikes (one large round payment to a known payee).
    pub fraud_share: f64,
    pub burst: u32,
    pub large_min: Amount,
    pub large_max: Amount,
    pub round_to: Amount,
    /// Accounts with no history, created at setup, used only as the new
    /// payees of fraudulent bursts.
    pub new_payees: u32,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Thresholds {
    /// Highest allowed p99 latency per kind, or for all requests ("all").
    pub p99_ms: BTreeMap<String, f64>,
    /// Highest allowed share of requests that failed unexpectedly.
    pub error_rate: Option<f64>,
    /// Lowest allowed rate of accepted transfers over the measured window.
    pub min_tps: Option<f64>,
    /// The ledger audit and the simulator's own accounting must pass.
    pub audit: bool,
    /// With faults: the longest a fault's recovery may take, from its heal
    /// to the first second at full throughput again.
    pub max_recovery_s: Option<f64>,
    /// With faults: the highest share of errors among the requests a fault
    /// affects (from its start to its recovery). `error_rate` then bounds
    /// the requests outside them.
    pub fault_error_rate: Option<f64>,
    /// The most the throughput of the measured window's last tenth may
    /// fall below its first tenth's, as a share (0.05: 5%). For soaks: a
    /// system that slows as its history grows fails it.
    pub max_slowdown: Option<f64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Scenario {
    pub name: String,
    pub description: String,
    pub seed: u64,
    pub stop: Stop,
    pub warmup_s: u64,
    pub accounts: Accounts,
    pub load: Load,
    pub mix: Mix,
    pub amounts: Amounts,
    pub retry: Retry,
    pub fraud: Fraud,
    pub thresholds: Thresholds,
    /// The fault schedule: occurrences in time order (`[[faults]]`).
    pub faults: Vec<faults::Fault>,
    /// Reshards of the live system, in time order (`[[reshard]]`).
    pub reshards: Vec<Reshard>,
    /// The file as read, kept in the report.
    pub source: String,
    pub file: String,
}

// ---- the file's shape -----------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScenario {
    name: Spanned<String>,
    #[serde(default)]
    description: String,
    seed: Option<u64>,
    duration_s: Option<Spanned<u64>>,
    requests: Option<Spanned<u64>>,
    warmup_s: Option<Spanned<u64>>,
    accounts: Spanned<RawAccounts>,
    load: Spanned<RawLoad>,
    mix: Spanned<RawMix>,
    amounts: Option<Spanned<RawAmounts>>,
    idempotent_retry: Option<Spanned<RawRetry>>,
    fraud_heavy: Option<Spanned<RawFraud>>,
    thresholds: Option<RawThresholds>,
    faults: Option<Vec<Spanned<faults::RawFault>>>,
    reshard: Option<Vec<Spanned<RawReshard>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReshard {
    at_s: Spanned<f64>,
    to: Spanned<u32>,
    strategy: Option<Spanned<String>>,
}

/// A reshard the scenario schedules: at `at_s` seconds into the load, the
/// system is asked to place accounts over `to` shards.
#[derive(Debug, Clone, PartialEq)]
pub struct Reshard {
    pub at_s: f64,
    pub to: u32,
    /// `jump` or `modulo`: how accounts are placed before and after (the
    /// system a run starts places them so from the start).
    pub strategy: Option<String>,
    /// The entry's line in the scenario file.
    pub line: usize,
}

impl Scenario {
    /// The most shards a reshard of the scenario grows into.
    pub fn max_reshard_to(&self) -> Option<u32> {
        self.reshards.iter().map(|r| r.to).max()
    }

    /// The placement strategy the scenario's reshards name.
    pub fn placement(&self) -> Option<&str> {
        self.reshards.iter().find_map(|r| r.strategy.as_deref())
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAccounts {
    count: Spanned<u32>,
    opening_balance: Spanned<String>,
    currency: Option<Spanned<String>>,
    popularity: Option<Spanned<RawPopularity>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPopularity {
    distribution: Spanned<String>,
    exponent: Option<Spanned<f64>>,
    hot_set: Option<Spanned<u32>>,
    hot_share: Option<Spanned<f64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLoad {
    model: Spanned<String>,
    users: Option<Spanned<u32>>,
    think_time_ms: Option<Spanned<Vec<u64>>>,
    rate: Option<Spanned<f64>>,
    start_rate: Option<Spanned<f64>>,
    stages: Option<Spanned<Vec<RawStage>>>,
    max_in_flight: Option<Spanned<u32>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStage {
    duration_s: u64,
    target: f64,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMix {
    same_shard: Option<Spanned<u32>>,
    cross_shard: Option<Spanned<u32>>,
    idempotent_retry: Option<Spanned<u32>>,
    fraud_heavy: Option<Spanned<u32>>,
    hostile: Option<Spanned<u32>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAmounts {
    min: Spanned<String>,
    max: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    resends: Option<Spanned<u32>>,
    concurrent: Option<Spanned<u32>>,
    changed_body_share: Option<Spanned<f64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFraud {
    fraud_share: Option<Spanned<f64>>,
    burst: Option<Spanned<u32>>,
    large_min: Option<Spanned<String>>,
    large_max: Option<Spanned<String>>,
    round_to: Option<Spanned<String>>,
    new_payees: Option<Spanned<u32>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawThresholds {
    p99_ms: Option<Spanned<BTreeMap<String, f64>>>,
    error_rate: Option<Spanned<f64>>,
    min_tps: Option<Spanned<f64>>,
    audit: Option<bool>,
    max_recovery_s: Option<Spanned<f64>>,
    fault_error_rate: Option<Spanned<f64>>,
    max_slowdown: Option<Spanned<f64>>,
}

// ---- reading ----------------------------------------------------------------

/// Reads and checks a scenario file.
pub fn load(path: &Path) -> Result<Scenario, ScenarioError> {
    let file = path.display().to_string();
    let source = std::fs::read_to_string(path).map_err(|e| ScenarioError {
        file: file.clone(),
        line: 0,
        key: String::new(),
        message: format!("cannot read the scenario file: {e}"),
    })?;
    parse(&source, &file)
}

/// Checks a scenario given as text; `file` names it in errors.
pub fn parse(source: &str, file: &str) -> Result<Scenario, ScenarioError> {
    parse_with_seed(source, file, None)
}

/// [`parse`], with `seed` (when given) in place of the file's: the fault
/// schedule's drawn times follow it too.
pub fn parse_with_seed(
    source: &str,
    file: &str,
    seed: Option<u64>,
) -> Result<Scenario, ScenarioError> {
    let at = Locator { source, file };
    let mut raw: RawScenario = toml::from_str(source).map_err(|e| at.serde_error(&e))?;
    if seed.is_some() {
        raw.seed = seed;
    }
    check(raw, &at)
}

struct Locator<'a> {
    source: &'a str,
    file: &'a str,
}

impl Locator<'_> {
    fn line_of(&self, offset: usize) -> usize {
        let end = offset.min(self.source.len());
        self.source[..end].matches('\n').count() + 1
    }

    fn err(&self, span: Range<usize>, key: &str, message: impl Into<String>) -> ScenarioError {
        ScenarioError {
            file: self.file.to_string(),
            line: self.line_of(span.start),
            key: key.to_string(),
            message: message.into(),
        }
    }

    /// A serde error from the TOML reader: its span gives the line; the key is
    /// read off the source around the span (the message names it only for
    /// unknown and missing fields).
    fn serde_error(&self, e: &toml::de::Error) -> ScenarioError {
        let span = e.span().unwrap_or(0..0);
        let message = e.message().trim().to_string();
        let mut key = key_at(self.source, span.start);
        if let Some(field) = backticked(&message) {
            if message.starts_with("missing field") {
                key = join_key(&key, &field);
            } else if message.starts_with("unknown field") {
                let parent = key.rsplit_once('.').map(|(p, _)| p).unwrap_or("");
                key = if key.ends_with(&field) {
                    key
                } else {
                    join_key(parent, &field)
                };
            }
        }
        let message = if message.starts_with("unknown field") {
            format!("{message}; see scenarios/README.md for every key")
        } else {
            message
        };
        ScenarioError {
            file: self.file.to_string(),
            line: self.line_of(span.start),
            key,
            message,
        }
    }
}

fn join_key(parent: &str, field: &str) -> String {
    if parent.is_empty() {
        field.to_string()
    } else {
        format!("{parent}.{field}")
    }
}

fn backticked(message: &str) -> Option<String> {
    let start = message.find('`')? + 1;
    let len = message[start..].find('`')?;
    Some(message[start..start + len].to_string())
}

/// The dotted key whose value contains `offset`: the nearest `[table]`
/// header above, then the keys of the line up to the offset (inline tables
/// included). A header line itself names its table.
pub(crate) fn key_at(source: &str, offset: usize) -> String {
    let offset = offset.min(source.len());
    let line_start = source[..offset].rfind('\n').map(|i| i + 1).unwrap_or(0);
    let line_end = source[offset..]
        .find('\n')
        .map(|i| offset + i)
        .unwrap_or(source.len());
    let line = &source[line_start..line_end];
    let header = |l: &str| -> Option<String> {
        let t = l.trim();
        t.starts_with('[').then(|| {
            t.trim_start_matches('[')
                .split(']')
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
    };
    if let Some(table) = header(line) {
        return table;
    }
    let table = source[..line_start]
        .lines()
        .rev()
        .find_map(header)
        .unwrap_or_default();
    // Keys of the line up to the offset: `a = { b = { c = 1` gives a.b.c.
    let prefix = &source[line_start..offset];
    let mut stack: Vec<String> = Vec::new();
    let mut last_key = String::new();
    let mut word = String::new();
    let mut in_string = false;
    for ch in prefix.chars() {
        if in_string {
            in_string = ch != '"';
            continue;
        }
        match ch {
            '"' => in_string = true,
            '=' => {
                last_key = word.trim().trim_matches('"').to_string();
                word.clear();
            }
            '{' => {
                stack.push(std::mem::take(&mut last_key));
                word.clear();
            }
            '}' => {
                stack.pop();
                last_key.clear();
                word.clear();
            }
            ',' => {
                last_key.clear();
                word.clear();
            }
            '#' => break,
            c => word.push(c),
        }
    }
    if !last_key.is_empty() {
        stack.push(last_key);
    } else if prefix.trim().is_empty() {
        // The offset is at the start of a `key = value` line.
        if let Some((k, _)) = line.split_once('=') {
            stack.push(k.trim().trim_matches('"').to_string());
        }
    }
    let mut key = table;
    for part in stack.into_iter().filter(|p| !p.is_empty()) {
        key = join_key(&key, &part);
    }
    key
}

/// How long the file says the run lasts: `duration_s`, `requests`, both, or
/// neither (the open model's stages may say it instead).
struct Length {
    duration_s: Option<u64>,
    requests: Option<u64>,
    /// Where `requests` is written, for errors about it.
    requests_span: Option<Range<usize>>,
}

/// Checks the file section by section, in the order its errors are reported.
fn check(raw: RawScenario, at: &Locator) -> Result<Scenario, ScenarioError> {
    let name = check_name(raw.name, at)?;
    let length = check_length(raw.duration_s, raw.requests, at)?;
    let accounts = check_accounts(raw.accounts, at)?;
    let load_span = raw.load.span();
    let mut load = check_load(raw.load.into_inner(), load_span.clone(), at)?;
    set_constant_rate_length(&mut load, &length, load_span.clone(), at)?;
    let stop = check_stop(&load, &length, load_span, at)?;
    let warmup_s = check_warmup(raw.warmup_s, stop, at)?;
    let mix = check_mix(raw.mix, at)?;
    let currency = accounts.currency;
    let amounts = check_amounts(raw.amounts, currency, at)?;
    let retry = check_retry(raw.idempotent_retry, at)?;
    let fraud = check_fraud(raw.fraud_heavy, currency, at)?;
    let thresholds = check_thresholds(raw.thresholds, at)?;
    let seed = raw.seed.unwrap_or(1);
    let faults = faults::check(raw.faults, stop, seed, at)?;
    let reshards = check_reshards(raw.reshard, stop, at)?;

    Ok(Scenario {
        name,
        description: raw.description,
        seed,
        stop,
        warmup_s,
        accounts,
        load,
        mix,
        amounts,
        retry,
        fraud,
        thresholds,
        faults,
        reshards,
        source: at.source.to_string(),
        file: at.file.to_string(),
    })
}

/// `[[reshard]]`: each at a time inside the run, to 1 to 64 shards, all by
/// one placement strategy.
fn check_reshards(
    raw: Option<Vec<Spanned<RawReshard>>>,
    stop: Stop,
    at: &Locator,
) -> Result<Vec<Reshard>, ScenarioError> {
    let Some(entries) = raw else {
        return Ok(Vec::new());
    };
    let mut out: Vec<Reshard> = Vec::new();
    for (index, entry) in entries.into_iter().enumerate() {
        let span = entry.span();
        let key = |field: &str| format!("reshard[{index}].{field}");
        let r = entry.into_inner();
        let Some(length_s) = stop.seconds() else {
            return Err(at.err(
                span,
                &format!("reshard[{index}]"),
                "reshards are scheduled in seconds: give the scenario a duration_s",
            ));
        };
        let at_s = *r.at_s.get_ref();
        if !(at_s.is_finite() && at_s >= 0.0 && at_s < length_s as f64) {
            return Err(at.err(
                r.at_s.span(),
                &key("at_s"),
                format!("must be from 0 to less than the run's {length_s} seconds"),
            ));
        }
        let to = *r.to.get_ref();
        if !(1..=64).contains(&to) {
            return Err(at.err(r.to.span(), &key("to"), "must be 1 to 64 shards"));
        }
        let strategy = match r.strategy {
            None => None,
            Some(s) => {
                let text = s.get_ref().clone();
                if !matches!(text.as_str(), "jump" | "modulo") {
                    return Err(at.err(
                        s.span(),
                        &key("strategy"),
                        format!("unknown placement `{text}`; use jump or modulo"),
                    ));
                }
                if let Some(other) = out.iter().find_map(|o| o.strategy.as_ref()) {
                    if *other != text {
                        return Err(at.err(
                            s.span(),
                            &key("strategy"),
                            format!("an earlier reshard places by {other}: one placement strategy per scenario, so runs compare like for like"),
                        ));
                    }
                }
                Some(text)
            }
        };
        if let Some(last) = out.last() {
            if at_s <= last.at_s {
                return Err(at.err(
                    r.at_s.span(),
                    &key("at_s"),
                    format!(
                        "reshards run in the order written: this one must start after {:.1} s (line {})",
                        last.at_s, last.line
                    ),
                ));
            }
        }
        out.push(Reshard {
            at_s,
            to,
            strategy,
            line: at.line_of(span.start),
        });
    }
    Ok(out)
}

/// `name`: it becomes part of the report's folder.
fn check_name(raw: Spanned<String>, at: &Locator) -> Result<String, ScenarioError> {
    let span = raw.span();
    let name = raw.into_inner();
    let allowed = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    if name.is_empty() || !name.chars().all(allowed) {
        return Err(at.err(
            span,
            "name",
            "use letters, digits, '-' and '_' only: the name becomes part of the report's folder",
        ));
    }
    Ok(name)
}

/// `duration_s` and `requests`, each on its own; which of them stop the run
/// depends on the load model (`check_stop`).
fn check_length(
    duration_s: Option<Spanned<u64>>,
    requests: Option<Spanned<u64>>,
    at: &Locator,
) -> Result<Length, ScenarioError> {
    let duration_s = duration_s
        .map(|d| {
            let span = d.span();
            let seconds = d.into_inner();
            if seconds == 0 || seconds > MAX_DURATION_S {
                Err(at.err(
                    span,
                    "duration_s",
                    format!("must be 1 to {MAX_DURATION_S} seconds"),
                ))
            } else {
                Ok(seconds)
            }
        })
        .transpose()?;
    let requests_span = requests.as_ref().map(|r| r.span());
    let requests = requests
        .map(|r| {
            if *r.get_ref() == 0 {
                Err(at.err(r.span(), "requests", "must be at least 1"))
            } else {
                Ok(r.into_inner())
            }
        })
        .transpose()?;
    Ok(Length {
        duration_s,
        requests,
        requests_span,
    })
}

/// A constant open-model rate lasts duration_s, or as long as the requests
/// take at that rate.
fn set_constant_rate_length(
    load: &mut Load,
    length: &Length,
    load_span: Range<usize>,
    at: &Locator,
) -> Result<(), ScenarioError> {
    let Load::Open { stages, .. } = load else {
        return Ok(());
    };
    if stages.len() != 1 || stages[0].duration_s != 0 {
        return Ok(());
    }
    let rate = stages[0].target_per_s;
    stages[0].duration_s = match (length.duration_s, length.requests) {
        (Some(d), _) => d,
        (None, Some(n)) => {
            let seconds = (n as f64 / rate).ceil();
            if seconds > MAX_DURATION_S as f64 {
                return Err(at.err(
                    length.requests_span.clone().unwrap_or(load_span),
                    "requests",
                    format!("at load.rate, these requests take longer than a run may last ({MAX_DURATION_S} s): raise the rate, lower requests or set duration_s"),
                ));
            }
            (seconds as u64).max(1)
        }
        (None, None) => {
            return Err(at.err(
                load_span,
                "duration_s",
                "say how long the run lasts: duration_s = 30, or requests = 10000",
            ))
        }
    };
    Ok(())
}

/// When the run stops. The open model's stages define its length; a
/// duration_s beside them must agree.
fn check_stop(
    load: &Load,
    length: &Length,
    load_span: Range<usize>,
    at: &Locator,
) -> Result<Stop, ScenarioError> {
    let stop = match (load, length.duration_s, length.requests) {
        (Load::Open { stages, .. }, duration, requests) => {
            let total: u64 = stages.iter().map(|s| s.duration_s).sum();
            if let Some(d) = duration {
                if stages.len() > 1 && d != total {
                    return Err(at.err(
                        load_span,
                        "load.stages",
                        format!("the stages last {total} s but duration_s is {d}; drop duration_s or make them agree"),
                    ));
                }
            }
            match requests {
                Some(count) => Stop::Either {
                    seconds: total,
                    count,
                },
                None => Stop::Duration { seconds: total },
            }
        }
        (Load::Closed { .. }, Some(seconds), None) => Stop::Duration { seconds },
        (Load::Closed { .. }, None, Some(count)) => Stop::Requests { count },
        (Load::Closed { .. }, Some(seconds), Some(count)) => Stop::Either { seconds, count },
        (Load::Closed { .. }, None, None) => {
            return Err(at.err(
                0..0,
                "duration_s",
                "say how long the run lasts: duration_s = 30, or requests = 10000 (or both: whichever comes first)",
            ))
        }
    };
    Ok(stop)
}

/// `warmup_s`: none when absent, and shorter than a run of fixed length.
fn check_warmup(raw: Option<Spanned<u64>>, stop: Stop, at: &Locator) -> Result<u64, ScenarioError> {
    let Some(w) = raw else {
        return Ok(0);
    };
    let span = w.span();
    let w = w.into_inner();
    if let Some(total) = stop.seconds() {
        if w >= total {
            return Err(at.err(
                span,
                "warmup_s",
                format!("the warm-up ({w} s) must be shorter than the run ({total} s)"),
            ));
        }
    }
    Ok(w)
}

/// `[mix]`: a bounded weight per kind, at least one above zero.
fn check_mix(raw: Spanned<RawMix>, at: &Locator) -> Result<Mix, ScenarioError> {
    let mix_span = raw.span();
    let m = raw.into_inner();
    // Each weight is bounded, so their sums (here and in the plan) cannot
    // overflow: weights adding up past u32::MAX once panicked here.
    let weight = |w: Option<Spanned<u32>>, key: &str| match w {
        None => Ok(0),
        Some(w) if *w.get_ref() > MAX_WEIGHT => Err(at.err(
            w.span(),
            &format!("mix.{key}"),
            format!("must be 0 to {MAX_WEIGHT}: weights are proportions"),
        )),
        Some(w) => Ok(w.into_inner()),
    };
    let mix = Mix {
        same_shard: weight(m.same_shard, "same_shard")?,
        cross_shard: weight(m.cross_shard, "cross_shard")?,
        idempotent_retry: weight(m.idempotent_retry, "idempotent_retry")?,
        fraud_heavy: weight(m.fraud_heavy, "fraud_heavy")?,
        hostile: weight(m.hostile, "hostile")?,
    };
    if mix.total() == 0 {
        return Err(at.err(
            mix_span,
            "mix",
            "give at least one kind a weight above zero: same_shard, cross_shard, idempotent_retry, fraud_heavy, hostile",
        ));
    }
    Ok(mix)
}

/// `[amounts]`: the range of ordinary transfers' amounts, 100 to 50,000
/// minor units when absent.
fn check_amounts(
    raw: Option<Spanned<RawAmounts>>,
    currency: Currency,
    at: &Locator,
) -> Result<Amounts, ScenarioError> {
    let Some(a) = raw else {
        return Ok(Amounts {
            min: Amount::from_minor(100).expect("constant"),
            max: Amount::from_minor(50_000).expect("constant"),
        });
    };
    let span = a.span();
    let a = a.into_inner();
    let min = positive_amount(a.min, "amounts.min", currency, at)?;
    let max = positive_amount(a.max, "amounts.max", currency, at)?;
    if min > max {
        return Err(at.err(span, "amounts", "min must not exceed max"));
    }
    Ok(Amounts { min, max })
}

fn positive_amount(
    text: Spanned<String>,
    key: &str,
    currency: Currency,
    at: &Locator,
) -> Result<Amount, ScenarioError> {
    let span = text.span();
    let amount = Amount::parse(text.get_ref(), currency)
        .and_then(|a| a.positive())
        .map_err(|e| {
            at.err(
                span,
                key,
                format!("{e} (write decimal text in {currency}, such as \"4.50\")"),
            )
        })?;
    Ok(amount)
}

fn share(
    value: Option<Spanned<f64>>,
    key: &str,
    default: f64,
    at: &Locator,
) -> Result<f64, ScenarioError> {
    match value {
        None => Ok(default),
        Some(v) => {
            let x = *v.get_ref();
            if (0.0..=1.0).contains(&x) {
                Ok(x)
            } else {
                Err(at.err(v.span(), key, "must be a share between 0.0 and 1.0"))
            }
        }
    }
}

/// `[accounts]`: how many, their opening balance and currency, and how
/// transfers pick them.
fn check_accounts(raw: Spanned<RawAccounts>, at: &Locator) -> Result<Accounts, ScenarioError> {
    let a = raw.into_inner();
    let count = *a.count.get_ref();
    if !(2..=MAX_ACCOUNTS).contains(&count) {
        return Err(at.err(
            a.count.span(),
            "accounts.count",
            format!("must be 2 to {MAX_ACCOUNTS}"),
        ));
    }
    let currency = match a.currency {
        None => Currency::DEFAULT,
        Some(c) => Currency::parse(c.get_ref())
            .map_err(|e| at.err(c.span(), "accounts.currency", e.to_string()))?,
    };
    let opening_balance =
        positive_amount(a.opening_balance, "accounts.opening_balance", currency, at)?;
    let popularity = check_popularity(a.popularity, count, at)?;
    Ok(Accounts {
        count,
        opening_balance,
        currency,
        popularity,
    })
}

/// `accounts.popularity`: uniform when absent.
fn check_popularity(
    raw: Option<Spanned<RawPopularity>>,
    count: u32,
    at: &Locator,
) -> Result<Popularity, ScenarioError> {
    let Some(p) = raw else {
        return Ok(Popularity::Uniform);
    };
    let span = p.span();
    let p = p.into_inner();
    match p.distribution.get_ref().as_str() {
        "uniform" => {
            if p.exponent.is_some() || p.hot_set.is_some() || p.hot_share.is_some() {
                return Err(at.err(
                    span,
                    "accounts.popularity",
                    "exponent, hot_set and hot_share belong to distribution = \"zipf\"",
                ));
            }
            Ok(Popularity::Uniform)
        }
        "zipf" => check_zipf(p, count, at),
        other => Err(at.err(
            p.distribution.span(),
            "accounts.popularity.distribution",
            format!("unknown distribution {other:?}; use \"uniform\" or \"zipf\""),
        )),
    }
}

/// `accounts.popularity` with distribution = "zipf": classic Zipf over all
/// `count` accounts unless it says otherwise.
fn check_zipf(p: RawPopularity, count: u32, at: &Locator) -> Result<Popularity, ScenarioError> {
    let exponent = match p.exponent {
        None => 1.0,
        Some(e) => {
            let x = *e.get_ref();
            if !(x > 0.0 && x <= 5.0) {
                return Err(at.err(
                    e.span(),
                    "accounts.popularity.exponent",
                    "must be above 0 and at most 5 (1.0 is classic Zipf)",
                ));
            }
            x
        }
    };
    let hot_set = match p.hot_set {
        None => count,
        Some(h) => {
            let n = *h.get_ref();
            if n == 0 || n > count {
                return Err(at.err(
                    h.span(),
                    "accounts.popularity.hot_set",
                    format!("must be 1 to accounts.count ({count})"),
                ));
            }
            n
        }
    };
    let hot_share = share(p.hot_share, "accounts.popularity.hot_share", 1.0, at)?;
    Ok(Popularity::Zipf {
        exponent,
        hot_set,
        hot_share,
    })
}

/// `[load]`: the model, then the keys that model reads.
fn check_load(l: RawLoad, span: Range<usize>, at: &Locator) -> Result<Load, ScenarioError> {
    match l.model.get_ref().as_str() {
        "closed" => check_closed(l, at),
        "open" => check_open(l, span, at),
        other => Err(at.err(
            l.model.span(),
            "load.model",
            format!("unknown model {other:?}; use \"closed\" (virtual users) or \"open\" (arrival rate)"),
        )),
    }
}

/// Refuses a `[load]` key that `model` does not read.
fn not_in_model<T>(
    value: &Option<Spanned<T>>,
    key: &str,
    model: &str,
    at: &Locator,
) -> Result<(), ScenarioError> {
    match value {
        Some(v) => Err(at.err(
            v.span(),
            &format!("load.{key}"),
            format!("does not apply to model = \"{model}\""),
        )),
        None => Ok(()),
    }
}

/// `load.users` or `load.max_in_flight` (`key`): 1 to MAX_USERS, `default`
/// when absent.
fn check_users(
    value: Option<Spanned<u32>>,
    key: &str,
    default: u32,
    at: &Locator,
) -> Result<u32, ScenarioError> {
    let Some(v) = value else {
        return Ok(default);
    };
    let n = *v.get_ref();
    if n == 0 || n > MAX_USERS {
        return Err(at.err(v.span(), key, format!("must be 1 to {MAX_USERS}")));
    }
    Ok(n)
}

/// The closed model: virtual users and their think time.
fn check_closed(l: RawLoad, at: &Locator) -> Result<Load, ScenarioError> {
    not_in_model(&l.rate, "rate", "closed", at)?;
    not_in_model(&l.start_rate, "start_rate", "closed", at)?;
    not_in_model(&l.stages, "stages", "closed", at)?;
    not_in_model(&l.max_in_flight, "max_in_flight", "closed", at)?;
    let users = check_users(l.users, "load.users", 16, at)?;
    let think_time_ms = match l.think_time_ms {
        None => (0, 0),
        Some(t) => match t.get_ref().as_slice() {
            [ms] => (*ms, *ms),
            [lo, hi] if lo <= hi => (*lo, *hi),
            _ => {
                return Err(at.err(
                    t.span(),
                    "load.think_time_ms",
                    "write [ms] or [min_ms, max_ms] with min <= max",
                ))
            }
        },
    };
    Ok(Load::Closed {
        users,
        think_time_ms,
    })
}

/// The open model: a constant rate or a ramp of stages, and a bound on the
/// requests in flight.
fn check_open(l: RawLoad, span: Range<usize>, at: &Locator) -> Result<Load, ScenarioError> {
    not_in_model(&l.users, "users", "open", at)?;
    not_in_model(&l.think_time_ms, "think_time_ms", "open", at)?;
    let max_in_flight = check_users(l.max_in_flight, "load.max_in_flight", 256, at)?;
    let (start_rate_per_s, stages) = match (l.rate, l.stages) {
        (Some(rate), None) => check_constant_rate(rate, l.start_rate, at)?,
        (None, Some(stages)) => check_ramp(l.start_rate, stages, at)?,
        (Some(rate), Some(_)) => {
            return Err(at.err(
                rate.span(),
                "load.rate",
                "give either rate (constant) or stages (a ramp), not both",
            ))
        }
        (None, None) => {
            return Err(at.err(
                span,
                "load.rate",
                "the open model needs rate = <arrivals per second>, or stages = [{ duration_s = 10, target = 500 }, ...]",
            ))
        }
    };
    Ok(Load::Open {
        start_rate_per_s,
        stages,
        max_in_flight,
    })
}

/// An arrival rate the open model can keep: 0 to 1,000,000 per second.
fn rate_ok(per_s: f64) -> bool {
    per_s.is_finite() && (0.0..=1_000_000.0).contains(&per_s)
}

/// `load.rate`: a constant rate is one stage, its length filled in from
/// duration_s or requests by `set_constant_rate_length`.
fn check_constant_rate(
    rate: Spanned<f64>,
    start_rate: Option<Spanned<f64>>,
    at: &Locator,
) -> Result<(f64, Vec<Stage>), ScenarioError> {
    let r = *rate.get_ref();
    if !rate_ok(r) || r == 0.0 {
        return Err(at.err(
            rate.span(),
            "load.rate",
            "must be above 0 and at most 1,000,000 arrivals per second",
        ));
    }
    if start_rate.is_some() {
        return Err(at.err(
            rate.span(),
            "load.start_rate",
            "start_rate goes with stages; a single rate needs none",
        ));
    }
    let stage = Stage {
        duration_s: 0,
        target_per_s: r,
    };
    Ok((r, vec![stage]))
}

/// `load.stages` from `load.start_rate` (0 when absent): the rate moves
/// through each stage's target in turn.
fn check_ramp(
    start_rate: Option<Spanned<f64>>,
    stages: Spanned<Vec<RawStage>>,
    at: &Locator,
) -> Result<(f64, Vec<Stage>), ScenarioError> {
    let stages_span = stages.span();
    let stages = stages.into_inner();
    if stages.is_empty() {
        return Err(at.err(stages_span, "load.stages", "give at least one stage"));
    }
    let start = match start_rate {
        None => 0.0,
        Some(s) => {
            if !rate_ok(*s.get_ref()) {
                return Err(at.err(s.span(), "load.start_rate", "must be 0 to 1,000,000"));
            }
            *s.get_ref()
        }
    };
    let mut out = Vec::new();
    // The stages are the run's length, so together they keep duration_s's
    // bound (their u64 sum once overflowed and panicked).
    let mut total: u64 = 0;
    for (i, s) in stages.iter().enumerate() {
        if !(1..=MAX_DURATION_S).contains(&s.duration_s) || !rate_ok(s.target) {
            return Err(at.err(
                stages_span.clone(),
                &format!("load.stages[{i}]"),
                format!("each stage needs duration_s of 1 to {MAX_DURATION_S} and a target of 0 to 1,000,000 arrivals per second"),
            ));
        }
        total = total.saturating_add(s.duration_s);
        out.push(Stage {
            duration_s: s.duration_s,
            target_per_s: s.target,
        });
    }
    if total > MAX_DURATION_S {
        return Err(at.err(
            stages_span,
            "load.stages",
            format!("the stages last {total} s; a run lasts 1 to {MAX_DURATION_S} s"),
        ));
    }
    Ok((start, out))
}

fn check_retry(raw: Option<Spanned<RawRetry>>, at: &Locator) -> Result<Retry, ScenarioError> {
    let mut retry = Retry {
        resends: 3,
        concurrent: 1,
        changed_body_share: 0.2,
    };
    let Some(raw) = raw else { return Ok(retry) };
    let r = raw.into_inner();
    if let Some(n) = r.resends {
        if *n.get_ref() == 0 || *n.get_ref() > MAX_RESENDS {
            return Err(at.err(
                n.span(),
                "idempotent_retry.resends",
                format!("must be 1 to {MAX_RESENDS}"),
            ));
        }
        retry.resends = n.into_inner();
        retry.concurrent = retry.concurrent.min(retry.resends);
    }
    if let Some(c) = r.concurrent {
        if *c.get_ref() > retry.resends {
            return Err(at.err(
                c.span(),
                "idempotent_retry.concurrent",
                format!("must be 0 to resends ({})", retry.resends),
            ));
        }
        retry.concurrent = c.into_inner();
    }
    retry.changed_body_share = share(
        r.changed_body_share,
        "idempotent_retry.changed_body_share",
        retry.changed_body_share,
        at,
    )?;
    Ok(retry)
}

fn check_fraud(
    raw: Option<Spanned<RawFraud>>,
    currency: Currency,
    at: &Locator,
) -> Result<Fraud, ScenarioError> {
    let major = |units: i64| {
        Amount::from_minor(units * 10_i64.pow(currency.scale() as u32)).expect("constant")
    };
    let mut fraud = Fraud {
        fraud_share: 0.5,
        burst: 5,
        large_min: major(2_000),
        large_max: major(20_000),
        round_to: major(500),
        new_payees: 1_000,
    };
    let Some(raw) = raw else { return Ok(fraud) };
    let span = raw.span();
    let f = raw.into_inner();
    fraud.fraud_share = share(f.fraud_share, "fraud_heavy.fraud_share", 0.5, at)?;
    if let Some(b) = f.burst {
        if *b.get_ref() == 0 || *b.get_ref() > MAX_BURST {
            return Err(at.err(
                b.span(),
                "fraud_heavy.burst",
                format!("must be 1 to {MAX_BURST}"),
            ));
        }
        fraud.burst = b.into_inner();
    }
    if let Some(a) = f.large_min {
        fraud.large_min = positive_amount(a, "fraud_heavy.large_min", currency, at)?;
    }
    if let Some(a) = f.large_max {
        fraud.large_max = positive_amount(a, "fraud_heavy.large_max", currency, at)?;
    }
    if let Some(a) = f.round_to {
        fraud.round_to = positive_amount(a, "fraud_heavy.round_to", currency, at)?;
    }
    if fraud.large_min > fraud.large_max {
        return Err(at.err(span, "fraud_heavy", "large_min must not exceed large_max"));
    }
    if fraud.round_to > fraud.large_max {
        return Err(at.err(
            span,
            "fraud_heavy.round_to",
            "must not exceed large_max, or no round amount fits",
        ));
    }
    if let Some(n) = f.new_payees {
        if *n.get_ref() == 0 || *n.get_ref() > MAX_ACCOUNTS {
            return Err(at.err(
                n.span(),
                "fraud_heavy.new_payees",
                format!("must be 1 to {MAX_ACCOUNTS}"),
            ));
        }
        fraud.new_payees = n.into_inner();
    }
    Ok(fraud)
}

fn check_thresholds(raw: Option<RawThresholds>, at: &Locator) -> Result<Thresholds, ScenarioError> {
    let Some(t) = raw else {
        return Ok(Thresholds {
            audit: true,
            ..Thresholds::default()
        });
    };
    let mut out = Thresholds {
        audit: t.audit.unwrap_or(true),
        ..Thresholds::default()
    };
    if let Some(p) = t.p99_ms {
        let span = p.span();
        for (kind, ms) in p.into_inner() {
            if kind != "all" && Kind::parse(&kind).is_none() {
                return Err(at.err(
                    span,
                    &format!("thresholds.p99_ms.{kind}"),
                    "unknown kind; use all, same_shard, cross_shard, idempotent_retry, fraud_heavy or hostile",
                ));
            }
            if !(ms.is_finite() && ms > 0.0) {
                return Err(at.err(
                    span,
                    &format!("thresholds.p99_ms.{kind}"),
                    "must be a positive number of milliseconds",
                ));
            }
            out.p99_ms.insert(kind, ms);
        }
    }
    if let Some(e) = t.error_rate {
        out.error_rate = Some(share(Some(e), "thresholds.error_rate", 0.0, at)?);
    }
    if let Some(m) = t.min_tps {
        if !(m.get_ref().is_finite() && *m.get_ref() >= 0.0) {
            return Err(at.err(m.span(), "thresholds.min_tps", "must be 0 or more"));
        }
        out.min_tps = Some(m.into_inner());
    }
    if let Some(m) = t.max_recovery_s {
        if !(m.get_ref().is_finite() && *m.get_ref() > 0.0) {
            return Err(at.err(
                m.span(),
                "thresholds.max_recovery_s",
                "must be a positive number of seconds",
            ));
        }
        out.max_recovery_s = Some(m.into_inner());
    }
    if let Some(e) = t.fault_error_rate {
        out.fault_error_rate = Some(share(Some(e), "thresholds.fault_error_rate", 0.0, at)?);
    }
    if let Some(m) = t.max_slowdown {
        out.max_slowdown = Some(share(Some(m), "thresholds.max_slowdown", 0.0, at)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "t"
seed = 7
duration_s = 10
warmup_s = 2

[accounts]
count = 100
opening_balance = "1000.00"
popularity = { distribution = "zipf", exponent = 1.2, hot_set = 10, hot_share = 0.8 }

[load]
model = "closed"
users = 4

[mix]
same_shard = 3
cross_shard = 1

[thresholds]
p99_ms = { all = 100.0 }
"#;

    #[test]
    fn reads_a_good_file() {
        let s = parse(GOOD, "t.toml").unwrap();
        assert_eq!(s.seed, 7);
        assert_eq!(s.stop, Stop::Duration { seconds: 10 });
        assert_eq!(s.accounts.opening_balance.minor(), 100_000);
        assert_eq!(
            s.accounts.popularity,
            Popularity::Zipf {
                exponent: 1.2,
                hot_set: 10,
                hot_share: 0.8
            }
        );
        assert!(s.thresholds.audit);
        assert_eq!(s.thresholds.p99_ms["all"], 100.0);
    }

    fn error_of(text: &str) -> ScenarioError {
        parse(text, "t.toml").unwrap_err()
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let e = error_of(&GOOD.replace("users = 4", "users = 4\nuser = 5"));
        assert_eq!(e.line, 15, "{e}");
        assert_eq!(e.key, "load.user", "{e}");
        assert!(e.message.contains("unknown field"), "{e}");
    }

    #[test]
    fn wrong_type_names_the_key() {
        let e = error_of(&GOOD.replace("count = 100", "count = \"many\""));
        assert_eq!((e.line, e.key.as_str()), (8, "accounts.count"), "{e}");
        let e = error_of(&GOOD.replace("exponent = 1.2", "exponent = \"steep\""));
        assert_eq!(
            (e.line, e.key.as_str()),
            (10, "accounts.popularity.exponent"),
            "{e}"
        );
    }

    #[test]
    fn bad_values_are_refused_with_line_and_key() {
        let cases = [
            (
                "opening_balance = \"1000.00\"",
                "opening_balance = \"10.001\"",
                9,
                "accounts.opening_balance",
            ),
            (
                "hot_set = 10",
                "hot_set = 1000",
                10,
                "accounts.popularity.hot_set",
            ),
            ("model = \"closed\"", "model = \"rush\"", 13, "load.model"),
            ("warmup_s = 2", "warmup_s = 10", 5, "warmup_s"),
            (
                "p99_ms = { all = 100.0 }",
                "p99_ms = { allx = 100.0 }",
                21,
                "thresholds.p99_ms.allx",
            ),
            ("users = 4", "users = 4\nrate = 5.0", 15, "load.rate"),
        ];
        for (from, to, line, key) in cases {
            let e = error_of(&GOOD.replace(from, to));
            assert_eq!((e.line, e.key.as_str()), (line, key), "{from} -> {to}: {e}");
        }
    }

    #[test]
    fn missing_key_is_named() {
        let e = error_of(&GOOD.replace("count = 100\n", ""));
        assert_eq!(e.key, "accounts.count", "{e}");
        let e = error_of(&GOOD.replace("duration_s = 10\n", ""));
        assert_eq!(e.key, "duration_s", "{e}");
    }

    #[test]
    fn open_model_stages_set_the_length() {
        let text = GOOD
            .replace("duration_s = 10\n", "")
            .replace("warmup_s = 2", "warmup_s = 1")
            .replace(
                "model = \"closed\"\nusers = 4",
                "model = \"open\"\nstart_rate = 10\nstages = [{ duration_s = 2, target = 100 }, { duration_s = 3, target = 100 }]",
            );
        let s = parse(&text, "t.toml").unwrap();
        assert_eq!(s.stop, Stop::Duration { seconds: 5 });
        assert!(matches!(
            s.load,
            Load::Open {
                max_in_flight: 256,
                ..
            }
        ));
    }

    // Found by the property tests (proptests below); each input is the
    // one they reduced it to, or the file they changed.

    #[test]
    fn mix_weights_are_bounded_instead_of_overflowing_their_sum() {
        // Once panicked: "attempt to add with overflow" in Mix::total.
        let text = GOOD.replace("same_shard = 3", "same_shard = 4294967295");
        let e = error_of(&text);
        assert_eq!((e.line, e.key.as_str()), (17, "mix.same_shard"), "{e}");
        let text = GOOD.replace("cross_shard = 1", "cross_shard = 1000001");
        assert_eq!(error_of(&text).key, "mix.cross_shard");
        let text = GOOD.replace("same_shard = 3", "same_shard = 1000000");
        assert_eq!(parse(&text, "t.toml").unwrap().mix.total(), 1_000_001);
    }

    #[test]
    fn stages_last_at_most_a_day() {
        // Once accepted as a run of 86,401 s.
        let text = "name = \"t\"\n\n[accounts]\ncount = 2\nopening_balance = \"0.01\"\n\n[load]\nmodel = \"open\"\nstages = [{ duration_s = 86401, target = 0.0 }]\n\n[mix]\nfraud_heavy = 1\n";
        let e = error_of(text);
        assert_eq!((e.line, e.key.as_str()), (9, "load.stages[0]"), "{e}");
        // Stages of a day each: together too long.
        let text = text.replace(
            "{ duration_s = 86401, target = 0.0 }",
            "{ duration_s = 86400, target = 1.0 }, { duration_s = 1, target = 1.0 }",
        );
        let e = error_of(&text);
        assert_eq!(e.key, "load.stages", "{e}");
        assert!(e.message.contains("86401 s"), "{e}");
    }

    #[test]
    fn huge_stages_are_refused_instead_of_overflowing_their_sum() {
        // Once panicked: the u64 sum of the stages' lengths overflowed.
        let mixed = include_str!("../../scenarios/mixed.toml");
        let text = mixed.replace("duration_s = 5,", "duration_s = 9223372036854775807,");
        let e = error_of(&text);
        assert_eq!(e.key, "load.stages[0]", "{e}");
    }

    #[test]
    fn a_constant_rate_for_a_count_of_requests_lasts_at_most_a_day() {
        let text = GOOD
            .replace("duration_s = 10\n", "requests = 1000\n")
            .replace(
                "model = \"closed\"\nusers = 4",
                "model = \"open\"\nrate = 0.001",
            );
        let e = error_of(&text);
        assert_eq!((e.line, e.key.as_str()), (4, "requests"), "{e}");
        let text = text.replace("rate = 0.001", "rate = 100.0");
        let s = parse(&text, "t.toml").unwrap();
        assert_eq!(
            s.stop,
            Stop::Either {
                seconds: 10,
                count: 1000
            }
        );
    }

    #[test]
    fn key_at_reads_tables_and_inline_tables() {
        let src = "a = 1\n[t]\nx = { y = { z = 3 } }\n";
        let z = src.find('3').unwrap();
        assert_eq!(key_at(src, z), "t.x.y.z");
        assert_eq!(key_at(src, src.find("1").unwrap()), "a");
    }
}

/// Property tests: a scenario file is text someone typed, so no text may
/// panic the reader, every refusal names the file and a line within it
/// (and the key when it names one), and every scenario accepted keeps the
/// bounds scenarios/README.md gives its keys.
#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;
    use proptest::sample::{select, Index};

    /// The scenario files shipped in `scenarios/`.
    const FILES: &[(&str, &str)] = &[
        (
            "cross-shard.toml",
            include_str!("../../scenarios/cross-shard.toml"),
        ),
        (
            "faults-backends.toml",
            include_str!("../../scenarios/faults-backends.toml"),
        ),
        (
            "faults-crash.toml",
            include_str!("../../scenarios/faults-crash.toml"),
        ),
        (
            "faults-partition.toml",
            include_str!("../../scenarios/faults-partition.toml"),
        ),
        (
            "faults-shard-kill.toml",
            include_str!("../../scenarios/faults-shard-kill.toml"),
        ),
        (
            "fraud-heavy.toml",
            include_str!("../../scenarios/fraud-heavy.toml"),
        ),
        ("hostile.toml", include_str!("../../scenarios/hostile.toml")),
        (
            "idempotent-retry.toml",
            include_str!("../../scenarios/idempotent-retry.toml"),
        ),
        ("mixed.toml", include_str!("../../scenarios/mixed.toml")),
        (
            "reshard-crash.toml",
            include_str!("../../scenarios/reshard-crash.toml"),
        ),
        (
            "reshard-modulo.toml",
            include_str!("../../scenarios/reshard-modulo.toml"),
        ),
        ("reshard.toml", include_str!("../../scenarios/reshard.toml")),
        (
            "same-shard.toml",
            include_str!("../../scenarios/same-shard.toml"),
        ),
        ("smoke.toml", include_str!("../../scenarios/smoke.toml")),
        ("soak.toml", include_str!("../../scenarios/soak.toml")),
    ];

    /// Every key scenarios/README.md documents, and the table headers.
    const KEYS: &[&str] = &[
        "name",
        "description",
        "seed",
        "duration_s",
        "requests",
        "warmup_s",
        "count",
        "opening_balance",
        "currency",
        "popularity",
        "distribution",
        "exponent",
        "hot_set",
        "hot_share",
        "model",
        "users",
        "think_time_ms",
        "rate",
        "start_rate",
        "stages",
        "max_in_flight",
        "same_shard",
        "cross_shard",
        "idempotent_retry",
        "fraud_heavy",
        "min",
        "max",
        "resends",
        "concurrent",
        "changed_body_share",
        "fraud_share",
        "burst",
        "large_min",
        "large_max",
        "round_to",
        "new_payees",
        "p99_ms",
        "error_rate",
        "min_tps",
        "max_slowdown",
        "audit",
        "target",
        "all",
    ];
    const HEADERS: &[&str] = &[
        "[accounts]",
        "[load]",
        "[mix]",
        "[amounts]",
        "[idempotent_retry]",
        "[fraud_heavy]",
        "[thresholds]",
        "[[load.stages]]",
        "[accounts.popularity]",
        "[thresholds.p99_ms]",
    ];

    const FILE: &str = "scenarios/t.toml";

    const RESHARD_BASE: &str = "name = \"r\"\nduration_s = 30\n[accounts]\ncount = 10\nopening_balance = \"1.00\"\n[load]\nmodel = \"closed\"\nusers = 1\n[mix]\nsame_shard = 100\n";

    #[test]
    fn reshards_are_read_in_time_order_with_one_strategy() {
        let text = format!(
            "{RESHARD_BASE}[[reshard]]\nat_s = 5\nto = 5\nstrategy = \"modulo\"\n[[reshard]]\nat_s = 20\nto = 4\n"
        );
        let s = parse(&text, FILE).unwrap();
        assert_eq!(s.reshards.len(), 2);
        assert_eq!((s.reshards[0].at_s, s.reshards[0].to), (5.0, 5));
        assert_eq!(s.max_reshard_to(), Some(5));
        assert_eq!(s.placement(), Some("modulo"));
        let refused = |extra: &str, key: &str, says: &str| {
            let e = parse(&format!("{RESHARD_BASE}{extra}"), FILE).unwrap_err();
            assert_eq!(e.key, key, "{e}");
            assert!(e.message.contains(says), "{e}");
        };
        refused(
            "[[reshard]]\nat_s = 30\nto = 5\n",
            "reshard[0].at_s",
            "less than",
        );
        refused(
            "[[reshard]]\nat_s = 3\nto = 0\n",
            "reshard[0].to",
            "1 to 64",
        );
        refused(
            "[[reshard]]\nat_s = 3\nto = 5\nstrategy = \"ring\"\n",
            "reshard[0].strategy",
            "jump or modulo",
        );
        refused(
            "[[reshard]]\nat_s = 9\nto = 5\n[[reshard]]\nat_s = 4\nto = 4\n",
            "reshard[1].at_s",
            "after 9.0 s",
        );
        refused(
            "[[reshard]]\nat_s = 3\nto = 5\nstrategy = \"jump\"\n[[reshard]]\nat_s = 9\nto = 4\nstrategy = \"modulo\"\n",
            "reshard[1].strategy",
            "one placement strategy",
        );
    }

    fn config() -> ProptestConfig {
        ProptestConfig {
            cases: 10_000,
            // Failures are kept as explicit regression tests, not files.
            failure_persistence: None,
            ..ProptestConfig::default()
        }
    }

    /// The reader's answer for `source`: an accepted scenario within its
    /// bounds, or an error naming this file, a line of it and the key.
    fn check_answer(source: &str) -> Result<(), TestCaseError> {
        match parse(source, FILE) {
            Ok(s) => check_bounds(&s),
            Err(e) => {
                let lines = source.split('\n').count();
                prop_assert_eq!(e.file.as_str(), FILE);
                prop_assert!(
                    (1..=lines).contains(&e.line),
                    "line {} of {}: {}",
                    e.line,
                    lines,
                    e
                );
                prop_assert!(!e.message.trim().is_empty(), "{}", e);
                let shown = e.to_string();
                let at = format!("{FILE}:{}: ", e.line);
                prop_assert!(shown.starts_with(&at), "{}", shown);
                if !e.key.is_empty() {
                    prop_assert!(shown.contains(&format!("`{}`", e.key)), "{}", shown);
                }
                Ok(())
            }
        }
    }

    /// The bounds scenarios/README.md gives each key, on the checked types.
    fn check_bounds(s: &Scenario) -> Result<(), TestCaseError> {
        let shown = format!("{s:?}");
        prop_assert!(!s.name.is_empty());
        prop_assert!(s
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
        prop_assert!(s.stop.seconds().is_some() || s.stop.count().is_some());
        if let Some(seconds) = s.stop.seconds() {
            prop_assert!((1..=MAX_DURATION_S).contains(&seconds), "{}", shown);
            prop_assert!(s.warmup_s < seconds, "{}", shown);
        }
        if let Some(count) = s.stop.count() {
            prop_assert!(count >= 1, "{}", shown);
        }
        let a = &s.accounts;
        prop_assert!((2..=MAX_ACCOUNTS).contains(&a.count), "{}", shown);
        prop_assert!(a.opening_balance.minor() > 0, "{}", shown);
        if let Popularity::Zipf {
            exponent,
            hot_set,
            hot_share,
        } = a.popularity
        {
            prop_assert!(exponent > 0.0 && exponent <= 5.0, "{}", shown);
            prop_assert!((1..=a.count).contains(&hot_set), "{}", shown);
            prop_assert!((0.0..=1.0).contains(&hot_share), "{}", shown);
        }
        match &s.load {
            Load::Closed {
                users,
                think_time_ms: (lo, hi),
            } => {
                prop_assert!((1..=MAX_USERS).contains(users), "{}", shown);
                prop_assert!(lo <= hi, "{}", shown);
            }
            Load::Open {
                start_rate_per_s,
                stages,
                max_in_flight,
            } => {
                let rate = |x: f64| x.is_finite() && (0.0..=1_000_000.0).contains(&x);
                prop_assert!(rate(*start_rate_per_s), "{}", shown);
                prop_assert!(!stages.is_empty(), "{}", shown);
                let mut total = 0u64;
                for stage in stages {
                    prop_assert!(stage.duration_s >= 1, "{}", shown);
                    prop_assert!(rate(stage.target_per_s), "{}", shown);
                    total = total.saturating_add(stage.duration_s);
                }
                prop_assert_eq!(Some(total), s.stop.seconds(), "{}", shown);
                prop_assert!((1..=MAX_USERS).contains(max_in_flight), "{}", shown);
            }
        }
        prop_assert!(s.mix.total() > 0, "{}", shown);
        for kind in Kind::ALL {
            prop_assert!(s.mix.weight(kind) <= MAX_WEIGHT, "{}", shown);
        }

        prop_assert!(s.amounts.min.minor() > 0, "{}", shown);
        prop_assert!(s.amounts.min <= s.amounts.max, "{}", shown);
        let r = &s.retry;
        prop_assert!((1..=MAX_RESENDS).contains(&r.resends), "{}", shown);
        prop_assert!(r.concurrent <= r.resends, "{}", shown);
        prop_assert!((0.0..=1.0).contains(&r.changed_body_share), "{}", shown);
        let f = &s.fraud;
        prop_assert!((0.0..=1.0).contains(&f.fraud_share), "{}", shown);
        prop_assert!((1..=MAX_BURST).contains(&f.burst), "{}", shown);
        prop_assert!(
            f.large_min.minor() > 0 && f.round_to.minor() > 0,
            "{}",
            shown
        );
        prop_assert!(f.large_min <= f.large_max, "{}", shown);
        prop_assert!(f.round_to <= f.large_max, "{}", shown);
        prop_assert!((1..=MAX_ACCOUNTS).contains(&f.new_payees), "{}", shown);
        for (kind, ms) in &s.thresholds.p99_ms {
            prop_assert!(kind == "all" || Kind::parse(kind).is_some(), "{}", shown);
            prop_assert!(ms.is_finite() && *ms > 0.0, "{}", shown);
        }
        if let Some(e) = s.thresholds.error_rate {
            prop_assert!((0.0..=1.0).contains(&e), "{}", shown);
        }
        if let Some(m) = s.thresholds.min_tps {
            prop_assert!(m.is_finite() && m >= 0.0, "{}", shown);
        }
        if let Some(m) = s.thresholds.max_slowdown {
            prop_assert!((0.0..=1.0).contains(&m), "{}", shown);
        }
        prop_assert_eq!(s.file.as_str(), FILE);
        Ok(())
    }

    // ---- values --------------------------------------------------------

    /// Integers at and around every bound the checks use, and any i64.
    fn integer() -> BoxedStrategy<String> {
        prop_oneof![
            3 => select(vec![
                "0", "1", "-1", "2", "3", "5", "16", "17", "64", "100", "101", "256", "1000",
                "10000", "10001", "86399", "86400", "86401", "1000000", "1000001", "10000000",
                "10000001", "2147483648", "4294967295", "4294967296", "9223372036854775807",
                "-9223372036854775808", "9223372036854775808", "1_000", "0x10", "0o7", "0b1",
                "+1", "01",
            ])
            .prop_map(String::from),
            1 => any::<i64>().prop_map(|n| n.to_string()),
            1 => (0u64..100_000).prop_map(|n| n.to_string()),
        ]
        .boxed()
    }

    /// Floats at the bounds, and ones that are not numbers.
    fn float() -> BoxedStrategy<String> {
        prop_oneof![
            3 => select(vec![
                "0.0", "-0.0", "1.0", "0.5", "1.0000001", "5.0", "5.1", "1e308", "1e309",
                "-1e-308", "5e-324", "inf", "-inf", "nan", "+nan", "-nan", "1000000.0",
                "1000000.1", "1e6", "1e-300", "0.001",
            ])
            .prop_map(String::from),
            1 => any::<f64>().prop_map(|x| toml::Value::Float(x).to_string()),
        ]
        .boxed()
    }

    fn number() -> BoxedStrategy<String> {
        prop_oneof![3 => integer(), 1 => float()].boxed()
    }

    /// Amount text, good and bad, as a TOML string: mostly minor units
    /// from `minor` written with two decimals.
    fn amount_in(minor: Range<u64>) -> BoxedStrategy<String> {
        prop_oneof![
            30 => minor.prop_map(|n| format!("{}.{:02}", n / 100, n % 100)),
            2 => select(vec![
                "4.50", "0", "0.00", "0.01", "-1", "--1", "1.001", "1.0000",
                "10000000000000.00", "10000000000000.01", "99999999999999999999999", "", " 1 ",
                "1e3", "\u{ff11}",
            ])
            .prop_map(String::from),
            1 => (1usize..20_000).prop_map(|n| "-".repeat(n)),
        ]
        .prop_map(|s| toml::Value::String(s).to_string())
        .boxed()
    }

    fn amount() -> BoxedStrategy<String> {
        amount_in(1..10_000_000)
    }

    fn word() -> BoxedStrategy<String> {
        prop_oneof![
            3 => select(vec![
                "closed", "open", "rush", "zipf", "uniform", "INR", "jpy", "KWD", "XXX", "", "t",
                "a b", "all", "same_shard", "cross_shard", "idempotent_retry", "fraud_heavy",
            ])
            .prop_map(String::from),
            1 => any::<String>(),
        ]
        .prop_map(|s| toml::Value::String(s).to_string())
        .boxed()
    }

    /// An integer from `range` most of the time, otherwise any integer.
    fn int(range: std::ops::RangeInclusive<u64>) -> BoxedStrategy<String> {
        prop_oneof![12 => range.prop_map(|n| n.to_string()), 1 => integer()].boxed()
    }

    /// A float from `range` most of the time, otherwise any float.
    fn real(range: Range<f64>) -> BoxedStrategy<String> {
        prop_oneof![
            12 => range.prop_map(|x| toml::Value::Float(x).to_string()),
            1 => float(),
        ]
        .boxed()
    }

    fn stages() -> BoxedStrategy<String> {
        prop::collection::vec((int(1..=30), real(0.0..2_000.0)), 0..6)
            .prop_map(|stages| {
                let stages: Vec<String> = stages
                    .into_iter()
                    .map(|(d, t)| format!("{{ duration_s = {d}, target = {t} }}"))
                    .collect();
                format!("[{}]", stages.join(", "))
            })
            .boxed()
    }

    /// `{ k = v, ... }`, each pair present `present` of 10 times.
    fn inline_table(
        pairs: Vec<(&'static str, BoxedStrategy<String>, u32)>,
    ) -> BoxedStrategy<String> {
        let pairs: Vec<BoxedStrategy<Option<String>>> = pairs
            .into_iter()
            .map(|(k, v, present)| {
                prop_oneof![
                    10 - present => Just(None),
                    present => v.prop_map(move |v| Some(format!("{k} = {v}"))),
                ]
                .boxed()
            })
            .collect();
        pairs
            .prop_map(|pairs| {
                let pairs: Vec<String> = pairs.into_iter().flatten().collect();
                format!("{{ {} }}", pairs.join(", "))
            })
            .boxed()
    }

    fn popularity() -> BoxedStrategy<String> {
        let distribution = prop_oneof![
            12 => select(vec!["\"zipf\"", "\"uniform\""]).prop_map(String::from),
            1 => word(),
        ];
        inline_table(vec![
            ("distribution", distribution.boxed(), 10),
            ("exponent", real(0.0..6.0), 5),
            ("hot_set", int(0..=2_000), 5),
            ("hot_share", real(0.0..1.2), 5),
        ])
    }

    fn p99() -> BoxedStrategy<String> {
        inline_table(vec![
            ("all", real(0.0..1_000.0), 5),
            ("same_shard", real(0.0..1_000.0), 3),
            ("cross_shard", real(0.0..1_000.0), 3),
            ("idempotent_retry", real(0.0..1_000.0), 3),
            ("fraud_heavy", real(0.0..1_000.0), 3),
            ("allx", real(0.0..1_000.0), 1),
        ])
    }

    /// Any value for any key: the right type or not.
    fn toml_value() -> BoxedStrategy<String> {
        prop_oneof![
            4 => integer(),
            3 => float(),
            3 => amount(),
            2 => word(),
            1 => select(vec![
                "true", "false", "[]", "{}", "{ a = 1 }", "1979-05-27T07:32:00Z", "1979-05-27",
                "[[]]", "[1, \"a\"]", "\"\"\"\nmulti\n\"\"\"", "'literal'",
            ])
            .prop_map(String::from),
            1 => stages(),
            1 => p99(),
            1 => popularity(),
            1 => prop::collection::vec(integer(), 0..4)
                .prop_map(|items| format!("[{}]", items.join(", "))),
        ]
        .boxed()
    }

    // ---- whole documents -----------------------------------------------

    /// `key = value`: `present` of 10 times with a plausible value, now and
    /// then with a value of any kind, otherwise no line at all.
    fn line(
        key: &'static str,
        plausible: BoxedStrategy<String>,
        present: u32,
    ) -> BoxedStrategy<String> {
        prop_oneof![
            4 * (10 - present) => Just(String::new()),
            4 * present => plausible.prop_map(move |v| format!("{key} = {v}\n")),
            1 => toml_value().prop_map(move |v| format!("{key} = {v}\n")),
        ]
        .boxed()
    }

    fn table(header: &'static str, lines: Vec<BoxedStrategy<String>>) -> BoxedStrategy<String> {
        lines
            .prop_map(move |lines| format!("\n{header}\n{}", lines.concat()))
            .boxed()
    }

    fn optional(table: BoxedStrategy<String>) -> BoxedStrategy<String> {
        prop_oneof![Just(String::new()), table].boxed()
    }

    /// A scenario written from the documented keys, each present or not,
    /// mostly with values of the right type near their bounds.
    fn document() -> impl Strategy<Value = String> {
        let share = || real(0.0..1.1);
        let name = line(
            "name",
            prop_oneof![30 => Just("\"t\"".to_string()), 1 => word()].boxed(),
            10,
        );
        let model = |model: &'static str| {
            line(
                "model",
                prop_oneof![12 => Just(format!("\"{model}\"")), 1 => word()].boxed(),
                10,
            )
        };
        let users = |present| line("users", int(0..=100), present);
        let think_time = |present| {
            line(
                "think_time_ms",
                prop::collection::vec(int(0..=20), 0..4)
                    .prop_map(|items| format!("[{}]", items.join(", ")))
                    .boxed(),
                present,
            )
        };
        let in_flight = |present| line("max_in_flight", int(0..=600), present);
        let rate = |present| line("rate", real(0.0..5_000.0), present);
        let start_rate = |present| line("start_rate", real(0.0..5_000.0), present);
        let stages = |present| line("stages", stages(), present);
        // The top level and [load] go together: a closed run, an open run
        // at a constant rate, or an open run in stages, each now and then
        // with a key of another.
        let closed = (
            vec![
                name.clone(),
                line("duration_s", int(1..=100), 8),
                line("requests", int(1..=10_000), 3),
                line("warmup_s", int(0..=30), 4),
            ],
            vec![
                model("closed"),
                users(5),
                think_time(4),
                rate(1),
                in_flight(1),
            ],
        );
        let constant = (
            vec![
                name.clone(),
                line("duration_s", int(1..=100), 6),
                line("requests", int(1..=10_000), 6),
                line("warmup_s", int(0..=30), 3),
            ],
            vec![
                model("open"),
                rate(10),
                start_rate(1),
                in_flight(4),
                users(1),
            ],
        );
        let staged = (
            vec![
                name,
                line("duration_s", int(1..=100), 1),
                line("requests", int(1..=10_000), 3),
                line("warmup_s", int(0..=30), 3),
            ],
            vec![
                model("open"),
                stages(10),
                start_rate(5),
                in_flight(4),
                rate(1),
                think_time(1),
            ],
        );
        let top_and_load = prop_oneof![closed, constant, staged]
            .prop_map(|(top, load)| format!("{}\n[load]\n{}", top.concat(), load.concat()));
        let top = vec![
            line("description", word(), 3),
            line("seed", int(0..=1_000), 5),
        ];
        let zipf = inline_table(vec![
            ("distribution", Just("\"zipf\"".to_string()).boxed(), 10),
            ("exponent", real(0.0..6.0), 5),
            ("hot_set", int(0..=2_000), 5),
            ("hot_share", real(0.0..1.2), 5),
        ]);
        let popularity = prop_oneof![
            1 => Just("{ distribution = \"uniform\" }".to_string()),
            4 => zipf,
            1 => popularity(),
        ];
        let accounts = table(
            "[accounts]",
            vec![
                line("count", int(0..=1_000), 10),
                line("opening_balance", amount(), 10),
                line(
                    "currency",
                    prop_oneof![
                        3 => select(vec!["\"INR\"", "\"jpy\"", "\"KWD\""]).prop_map(String::from),
                        1 => word(),
                    ]
                    .boxed(),
                    3,
                ),
                line("popularity", popularity.boxed(), 4),
            ],
        );
        let mix = table(
            "[mix]",
            vec![
                line("same_shard", int(0..=60), 5),
                line("cross_shard", int(0..=60), 5),
                line("idempotent_retry", int(0..=60), 5),
                line("fraud_heavy", int(0..=60), 5),
            ],
        );
        let amounts = optional(table(
            "[amounts]",
            vec![
                line("min", amount_in(1..20_000), 10),
                line("max", amount_in(10_000..10_000_000), 10),
            ],
        ));
        let retry = optional(table(
            "[idempotent_retry]",
            vec![
                line("resends", int(0..=20), 5),
                line("concurrent", int(0..=20), 5),
                line("changed_body_share", share(), 5),
            ],
        ));
        let fraud = optional(table(
            "[fraud_heavy]",
            vec![
                line("fraud_share", share(), 5),
                line("burst", int(0..=120), 5),
                line("large_min", amount_in(1..200_000), 5),
                line("large_max", amount_in(100_000..10_000_000), 5),
                line("round_to", amount_in(1..200_000), 5),
                line("new_payees", int(0..=5_000), 5),
            ],
        ));
        let thresholds = optional(table(
            "[thresholds]",
            vec![
                line("p99_ms", p99(), 5),
                line("error_rate", share(), 5),
                line("min_tps", real(-1.0..1_000.0), 5),
                line("max_slowdown", share(), 5),
                line(
                    "audit",
                    select(vec!["true", "false"]).prop_map(String::from).boxed(),
                    5,
                ),
            ],
        ));
        (
            top,
            top_and_load,
            accounts,
            mix,
            amounts,
            retry,
            fraud,
            thresholds,
        )
            .prop_map(
                |(top, top_and_load, accounts, mix, amounts, retry, fraud, thresholds)| {
                    // Top-level keys come before the first table.
                    let (first, load) = top_and_load.split_once("\n[load]\n").unwrap();
                    [
                        top.concat(),
                        first.to_string(),
                        accounts,
                        format!("\n[load]\n{load}"),
                        mix,
                        amounts,
                        retry,
                        fraud,
                        thresholds,
                    ]
                    .concat()
                },
            )
    }

    /// Text that is TOML-shaped without being a scenario: keys, headers,
    /// brackets, quotes, numbers and unicode in any order, and deep nesting.
    fn toml_soup() -> impl Strategy<Value = String> {
        let token = prop_oneof![
            4 => select(vec![
                "[", "]", "[[", "]]", "{", "}", "=", ",", ".", "\"", "'", "\"\"\"", "'''", "\n",
                " ", "#", "\\", "\\u", "\\U0010FFFF", "\\ud800", "\r", "\t", "\u{0}", "\u{7f}",
                "\u{feff}", "\u{e9}", "\u{10ffff}", "1", "-", "+", "_", "e", "inf", "nan",
                "true", "1979-05-27T07:32:00Z", "07:32:00", "0x", "a.b",
            ])
            .prop_map(String::from),
            2 => select(KEYS.to_vec()).prop_map(String::from),
            1 => select(HEADERS.to_vec()).prop_map(String::from),
            2 => toml_value(),
            1 => any::<char>().prop_map(String::from),
        ];
        let nested = (
            select(vec!["a = ", "[load]\nstages = ", "x = { y = "]),
            select(vec!["[", "{ a = ", "[{ b = "]),
            1usize..20_000,
        )
            .prop_map(|(start, open, depth)| format!("{start}{}1", open.repeat(depth)));
        prop_oneof![
            6 => prop::collection::vec(token, 0..120).prop_map(|tokens| tokens.concat()),
            2 => any::<String>(),
            1 => nested,
        ]
    }

    // ---- mutations of the shipped files --------------------------------

    /// One change to a scenario file's values: the file stays TOML, and
    /// mostly stays of the right types, so the checks after the reader run.
    #[derive(Debug, Clone)]
    enum Edit {
        /// Give the n-th `key = value` line a new value.
        SetKey(Index, String),
        /// Add `key = value` (a documented key) before a line.
        AddKey(Index, &'static str, String),
        /// Replace one number literal.
        SetNumber(Index, String),
        /// Replace every copy of one number literal (all stages at once).
        SetEveryNumber(Index, String),
        /// Remove the n-th `key = value` line.
        DeleteKey(Index),
    }

    fn edit() -> impl Strategy<Value = Edit> {
        prop_oneof![
            3 => (any::<Index>(), toml_value()).prop_map(|(i, v)| Edit::SetKey(i, v)),
            2 => (any::<Index>(), select(KEYS.to_vec()), toml_value())
                .prop_map(|(i, k, v)| Edit::AddKey(i, k, v)),
            4 => (any::<Index>(), number()).prop_map(|(i, v)| Edit::SetNumber(i, v)),
            2 => (any::<Index>(), number()).prop_map(|(i, v)| Edit::SetEveryNumber(i, v)),
            1 => any::<Index>().prop_map(Edit::DeleteKey),
        ]
    }

    /// One change to a scenario file's text, blind to what it means.
    #[derive(Debug, Clone)]
    enum Damage {
        DeleteLine(Index),
        DuplicateLine(Index),
        SwapLines(Index, Index),
        ReplaceLine(Index, String),
        AddHeader(Index, &'static str),
        DeleteBytes(Index, usize),
        InsertBytes(Index, Vec<u8>),
        ReplaceByte(Index, u8),
        Truncate(Index),
    }

    fn damage() -> impl Strategy<Value = Damage> {
        let junk = prop_oneof![
            prop::collection::vec(any::<u8>(), 1..8),
            select(vec![
                "=", "[", "]", "{", "}", ",", "\"", "'", "#", "\n", ".", "\\", "\u{0}", "\u{feff}",
                "\u{e9}", "\r\n", "[[", "\"\"\"",
            ])
            .prop_map(|s| s.as_bytes().to_vec()),
        ];
        let line = prop_oneof![
            any::<String>(),
            (select(KEYS.to_vec()), toml_value()).prop_map(|(k, v)| format!("{k} = {v}")),
            select(HEADERS.to_vec()).prop_map(String::from),
        ];
        prop_oneof![
            2 => any::<Index>().prop_map(Damage::DeleteLine),
            2 => any::<Index>().prop_map(Damage::DuplicateLine),
            1 => (any::<Index>(), any::<Index>()).prop_map(|(a, b)| Damage::SwapLines(a, b)),
            2 => (any::<Index>(), line).prop_map(|(i, l)| Damage::ReplaceLine(i, l)),
            1 => (any::<Index>(), select(HEADERS.to_vec()))
                .prop_map(|(i, h)| Damage::AddHeader(i, h)),
            1 => (any::<Index>(), 1usize..40).prop_map(|(i, n)| Damage::DeleteBytes(i, n)),
            2 => (any::<Index>(), junk).prop_map(|(i, b)| Damage::InsertBytes(i, b)),
            2 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Damage::ReplaceByte(i, b)),
            1 => any::<Index>().prop_map(Damage::Truncate),
        ]
    }

    fn lines_of(text: &str) -> Vec<String> {
        text.split('\n').map(String::from).collect()
    }

    /// Indices of the `key = value` lines.
    fn keyed(lines: &[String]) -> Vec<usize> {
        (0..lines.len())
            .filter(|&n| {
                let l = lines[n].trim_start();
                !l.starts_with('#') && !l.starts_with('[') && l.contains('=')
            })
            .collect()
    }

    /// Byte ranges of the number literals in `text`.
    fn numbers(text: &str) -> Vec<Range<usize>> {
        let bytes = text.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i].is_ascii_digit() {
                let start = i;
                while i < bytes.len() && (bytes[i].is_ascii_digit() || bytes[i] == b'.') {
                    i += 1;
                }
                out.push(start..i);
            } else {
                i += 1;
            }
        }
        out
    }

    fn apply_edit(text: &str, edit: &Edit) -> String {
        let mut lines = lines_of(text);
        match edit {
            Edit::SetKey(i, value) => {
                let keyed = keyed(&lines);
                if let Some(&n) = keyed.get(i.index(keyed.len().max(1))) {
                    let key = lines[n].split('=').next().unwrap_or("").to_string();
                    lines[n] = format!("{key}= {value}");
                }
            }
            Edit::AddKey(i, key, value) => {
                lines.insert(i.index(lines.len() + 1), format!("{key} = {value}"));
            }
            Edit::DeleteKey(i) => {
                let keyed = keyed(&lines);
                if let Some(&n) = keyed.get(i.index(keyed.len().max(1))) {
                    lines.remove(n);
                }
            }
            Edit::SetNumber(i, value) => {
                let found = numbers(text);
                return match found.get(i.index(found.len().max(1))) {
                    Some(r) => format!("{}{value}{}", &text[..r.start], &text[r.end..]),
                    None => text.to_string(),
                };
            }
            Edit::SetEveryNumber(i, value) => {
                let found = numbers(text);
                let Some(chosen) = found.get(i.index(found.len().max(1))) else {
                    return text.to_string();
                };
                let literal = &text[chosen.clone()];
                let mut out = String::new();
                let mut last = 0;
                for r in found.iter().filter(|r| &text[(*r).clone()] == literal) {
                    out.push_str(&text[last..r.start]);
                    out.push_str(value);
                    last = r.end;
                }
                out.push_str(&text[last..]);
                return out;
            }
        }
        lines.join("\n")
    }

    fn apply_damage(text: &str, damage: &Damage) -> String {
        let mut lines = lines_of(text);
        let mut bytes = text.as_bytes().to_vec();
        match damage {
            Damage::DeleteLine(i) => {
                lines.remove(i.index(lines.len()));
            }
            Damage::DuplicateLine(i) => {
                let n = i.index(lines.len());
                let copy = lines[n].clone();
                lines.insert(n, copy);
            }
            Damage::SwapLines(a, b) => {
                let len = lines.len();
                lines.swap(a.index(len), b.index(len));
            }
            Damage::ReplaceLine(i, line) => {
                let n = i.index(lines.len());
                lines[n] = line.clone();
            }
            Damage::AddHeader(i, header) => {
                lines.insert(i.index(lines.len() + 1), header.to_string());
            }
            Damage::DeleteBytes(i, n) => {
                let at = i.index(bytes.len() + 1);
                let end = (at + n).min(bytes.len());
                bytes.drain(at..end);
                return String::from_utf8_lossy(&bytes).into_owned();
            }
            Damage::InsertBytes(i, junk) => {
                let at = i.index(bytes.len() + 1);
                bytes.splice(at..at, junk.iter().copied());
                return String::from_utf8_lossy(&bytes).into_owned();
            }
            Damage::ReplaceByte(i, b) => {
                if !bytes.is_empty() {
                    let at = i.index(bytes.len());
                    bytes[at] = *b;
                }
                return String::from_utf8_lossy(&bytes).into_owned();
            }
            Damage::Truncate(i) => {
                bytes.truncate(i.index(bytes.len() + 1));
                return String::from_utf8_lossy(&bytes).into_owned();
            }
        }
        lines.join("\n")
    }

    #[test]
    fn every_shipped_scenario_is_read_and_tested() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios");
        let mut shipped: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.ends_with(".toml"))
            .collect();
        shipped.sort();
        let known: Vec<String> = FILES.iter().map(|(name, _)| name.to_string()).collect();
        assert_eq!(shipped, known, "add new scenario files to FILES");
        for (name, text) in FILES {
            let s = parse(text, name).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(s.file, *name);
        }
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn any_text_is_read_or_refused_with_its_place(text in toml_soup()) {
            check_answer(&text)?;
        }

        #[test]
        fn documents_of_the_documented_keys_are_checked(text in document()) {
            check_answer(&text)?;
        }

        #[test]
        fn shipped_files_with_changed_values_are_checked(
            file in select(FILES.to_vec()),
            edits in prop_oneof![2 => prop::collection::vec(edit(), 1..2), 1 => prop::collection::vec(edit(), 2..5)],
        ) {
            let mut text = file.1.to_string();
            for e in &edits {
                text = apply_edit(&text, e);
            }
            check_answer(&text)?;
        }

        #[test]
        fn damaged_shipped_files_are_refused_with_their_place(
            file in select(FILES.to_vec()),
            damage in prop::collection::vec(damage(), 1..5),
        ) {
            let mut text = file.1.to_string();
            for d in &damage {
                text = apply_damage(&text, d);
            }
            check_answer(&text)?;
        }
    }
}
