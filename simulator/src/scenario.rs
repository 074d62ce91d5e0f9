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
}

impl Mix {
    pub fn weight(&self, kind: Kind) -> u32 {
        match kind {
            Kind::SameShard => self.same_shard,
            Kind::CrossShard => self.cross_shard,
            Kind::IdempotentRetry => self.idempotent_retry,
            Kind::FraudHeavy => self.fraud_heavy,
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
    #[serde(default)]
    same_shard: u32,
    #[serde(default)]
    cross_shard: u32,
    #[serde(default)]
    idempotent_retry: u32,
    #[serde(default)]
    fraud_heavy: u32,
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
    let at = Locator { source, file };
    let raw: RawScenario = toml::from_str(source).map_err(|e| at.serde_error(&e))?;
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

fn check(raw: RawScenario, at: &Locator) -> Result<Scenario, ScenarioError> {
    let name_span = raw.name.span();
    let name = raw.name.into_inner();
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(at.err(
            name_span,
            "name",
            "use letters, digits, '-' and '_' only: the name becomes part of the report's folder",
        ));
    }
    let seed = raw.seed.unwrap_or(1);

    let duration = raw
        .duration_s
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
    let requests = raw
        .requests
        .map(|r| {
            if *r.get_ref() == 0 {
                Err(at.err(r.span(), "requests", "must be at least 1"))
            } else {
                Ok(r.into_inner())
            }
        })
        .transpose()?;

    let accounts = check_accounts(raw.accounts, at)?;
    let load_span = raw.load.span();
    let mut load = check_load(raw.load.into_inner(), load_span.clone(), at)?;
    // A constant open-model rate lasts duration_s, or as long as the
    // requests take at that rate.
    if let Load::Open { stages, .. } = &mut load {
        if stages.len() == 1 && stages[0].duration_s == 0 {
            let rate = stages[0].target_per_s;
            stages[0].duration_s = match (duration, requests) {
                (Some(d), _) => d,
                (None, Some(n)) => ((n as f64 / rate).ceil() as u64).max(1),
                (None, None) => {
                    return Err(at.err(
                        load_span,
                        "duration_s",
                        "say how long the run lasts: duration_s = 30, or requests = 10000",
                    ))
                }
            };
        }
    }

    // The open model's stages define its length; a duration_s beside them
    // must agree.
    let stop = match (&load, duration, requests) {
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

    let warmup_s = match raw.warmup_s {
        None => 0,
        Some(w) => {
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
            w
        }
    };

    let mix_span = raw.mix.span();
    let m = raw.mix.into_inner();
    let mix = Mix {
        same_shard: m.same_shard,
        cross_shard: m.cross_shard,
        idempotent_retry: m.idempotent_retry,
        fraud_heavy: m.fraud_heavy,
    };
    if mix.total() == 0 {
        return Err(at.err(
            mix_span,
            "mix",
            "give at least one kind a weight above zero: same_shard, cross_shard, idempotent_retry, fraud_heavy",
        ));
    }

    let currency = accounts.currency;
    let amounts = match raw.amounts {
        None => Amounts {
            min: Amount::from_minor(100).expect("constant"),
            max: Amount::from_minor(50_000).expect("constant"),
        },
        Some(a) => {
            let span = a.span();
            let a = a.into_inner();
            let min = positive_amount(a.min, "amounts.min", currency, at)?;
            let max = positive_amount(a.max, "amounts.max", currency, at)?;
            if min > max {
                return Err(at.err(span, "amounts", "min must not exceed max"));
            }
            Amounts { min, max }
        }
    };

    let retry = check_retry(raw.idempotent_retry, at)?;
    let fraud = check_fraud(raw.fraud_heavy, currency, at)?;
    let thresholds = check_thresholds(raw.thresholds, at)?;

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
        source: at.source.to_string(),
        file: at.file.to_string(),
    })
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
    let popularity = match a.popularity {
        None => Popularity::Uniform,
        Some(p) => {
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
                    Popularity::Uniform
                }
                "zipf" => {
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
                    Popularity::Zipf {
                        exponent,
                        hot_set,
                        hot_share,
                    }
                }
                other => {
                    return Err(at.err(
                        p.distribution.span(),
                        "accounts.popularity.distribution",
                        format!("unknown distribution {other:?}; use \"uniform\" or \"zipf\""),
                    ))
                }
            }
        }
    };
    Ok(Accounts {
        count,
        opening_balance,
        currency,
        popularity,
    })
}

fn check_load(l: RawLoad, span: Range<usize>, at: &Locator) -> Result<Load, ScenarioError> {
    let model_span = l.model.span();
    let in_model = |name: Option<Range<usize>>, key: &str, model: &str| match name {
        Some(s) => Err(at.err(
            s,
            &format!("load.{key}"),
            format!("does not apply to model = \"{model}\""),
        )),
        None => Ok(()),
    };
    match l.model.get_ref().as_str() {
        "closed" => {
            in_model(l.rate.as_ref().map(|r| r.span()), "rate", "closed")?;
            in_model(l.start_rate.as_ref().map(|r| r.span()), "start_rate", "closed")?;
            in_model(l.stages.as_ref().map(|r| r.span()), "stages", "closed")?;
            in_model(
                l.max_in_flight.as_ref().map(|r| r.span()),
                "max_in_flight",
                "closed",
            )?;
            let users = match l.users {
                None => 16,
                Some(u) => {
                    let n = *u.get_ref();
                    if n == 0 || n > MAX_USERS {
                        return Err(at.err(
                            u.span(),
                            "load.users",
                            format!("must be 1 to {MAX_USERS}"),
                        ));
                    }
                    n
                }
            };
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
        "open" => {
            in_model(l.users.as_ref().map(|r| r.span()), "users", "open")?;
            in_model(
                l.think_time_ms.as_ref().map(|r| r.span()),
                "think_time_ms",
                "open",
            )?;
            let rate_ok = |x: f64| x.is_finite() && (0.0..=1_000_000.0).contains(&x);
            let max_in_flight = match l.max_in_flight {
                None => 256,
                Some(m) => {
                    let n = *m.get_ref();
                    if n == 0 || n > MAX_USERS {
                        return Err(at.err(
                            m.span(),
                            "load.max_in_flight",
                            format!("must be 1 to {MAX_USERS}"),
                        ));
                    }
                    n
                }
            };
            let (start_rate_per_s, stages) = match (l.rate, l.stages) {
                (Some(rate), None) => {
                    let r = *rate.get_ref();
                    if !rate_ok(r) || r == 0.0 {
                        return Err(at.err(
                            rate.span(),
                            "load.rate",
                            "must be above 0 and at most 1,000,000 arrivals per second",
                        ));
                    }
                    if l.start_rate.is_some() {
                        return Err(at.err(
                            rate.span(),
                            "load.start_rate",
                            "start_rate goes with stages; a single rate needs none",
                        ));
                    }
                    // Length filled in from duration_s by the caller's check
                    // below; a constant rate is one stage.
                    (r, vec![Stage {
                        duration_s: 0,
                        target_per_s: r,
                    }])
                }
                (None, Some(stages)) => {
                    let stages_span = stages.span();
                    let stages = stages.into_inner();
                    if stages.is_empty() {
                        return Err(at.err(stages_span, "load.stages", "give at least one stage"));
                    }
                    let start = match l.start_rate {
                        None => 0.0,
                        Some(s) => {
                            if !rate_ok(*s.get_ref()) {
                                return Err(at.err(s.span(), "load.start_rate", "must be 0 to 1,000,000"));
                            }
                            *s.get_ref()
                        }
                    };
                    let mut out = Vec::new();
                    for (i, s) in stages.iter().enumerate() {
                        if s.duration_s == 0 || !rate_ok(s.target) {
                            return Err(at.err(
                                stages_span.clone(),
                                &format!("load.stages[{i}]"),
                                "each stage needs duration_s >= 1 and a target of 0 to 1,000,000 arrivals per second",
                            ));
                        }
                        out.push(Stage {
                            duration_s: s.duration_s,
                            target_per_s: s.target,
                        });
                    }
                    (start, out)
                }
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
        other => Err(at.err(
            model_span,
            "load.model",
            format!("unknown model {other:?}; use \"closed\" (virtual users) or \"open\" (arrival rate)"),
        )),
    }
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
                    "unknown kind; use all, same_shard, cross_shard, idempotent_retry or fraud_heavy",
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

    #[test]
    fn key_at_reads_tables_and_inline_tables() {
        let src = "a = 1\n[t]\nx = { y = { z = 3 } }\n";
        let z = src.find('3').unwrap();
        assert_eq!(key_at(src, z), "t.x.y.z");
        assert_eq!(key_at(src, src.find("1").unwrap()), "a");
    }
}
