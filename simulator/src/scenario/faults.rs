//! `[[faults]]`: the scenario's fault schedule. Each entry names an action,
//! a target, a start and a length, and may repeat; the times may be drawn
//! from the seed. The checked schedule is a list of occurrences in time
//! order, none overlapping another, each with the name the report gives it.

use std::ops::Range;

use serde::Deserialize;
use toml::Spanned;

use super::{Locator, ScenarioError, Stop};

/// What a fault does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// SIGKILL the system's process, and start it again on the same data
    /// after the fault's length.
    Crash,
    /// Arm the system to abort itself at a step of a cross-shard transfer:
    /// the next transfer that reaches the step after the fault's start
    /// crashes it; it is started again on the same data after the length.
    CrashAt,
    /// SIGKILL a shard's database server (MySQL shards the run started),
    /// and start it again after the length.
    Kill,
    /// SIGSTOP a shard's database server for the length, then SIGCONT.
    Pause,
    /// Cut the link between the system and a backend (a shard's server,
    /// Redis) for the length: nothing crosses it, or with `reset = true`
    /// every connection is reset.
    Partition,
    /// Delay what the system sends a backend by `delay_ms`, plus up to
    /// `jitter_ms`, for the length.
    Slow,
    /// Reset a `share` of the system's connections to a backend, and that
    /// share of the new ones, for the length.
    Flaky,
    /// SIGKILL the Redis the run started, and start it again, empty, after
    /// the length.
    RedisDown,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Crash => "crash",
            Action::CrashAt => "crash_at",
            Action::Kill => "kill",
            Action::Pause => "pause",
            Action::Partition => "partition",
            Action::Slow => "slow",
            Action::Flaky => "flaky",
            Action::RedisDown => "redis_down",
        }
    }

    /// Whether the fault acts on a link through the run's proxy.
    pub fn link(self) -> bool {
        matches!(self, Action::Partition | Action::Slow | Action::Flaky)
    }

    /// Whether the fault kills or stops a shard's database server.
    pub fn shard_server(self) -> bool {
        matches!(self, Action::Kill | Action::Pause)
    }
}

/// What a link fault does to the link, from its entry's keys.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LinkFault {
    /// `partition`: reset the connections instead of holding them.
    #[serde(default)]
    pub reset: bool,
    /// `slow`: the delay toward the backend, and the most added to it.
    #[serde(default)]
    pub delay_ms: u64,
    #[serde(default)]
    pub jitter_ms: u64,
    /// `flaky`: the share of connections reset.
    #[serde(default)]
    pub share: f64,
}

/// The step of a cross-shard transfer at which `crash_at` aborts the
/// system.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// Saga: the payer's debit committed, the credit not yet made.
    AfterDebit,
    /// Saga: the credit committed, the transfer not yet marked complete.
    AfterCredit,
    /// XA: both branches prepared, no decision yet.
    AfterPrepare,
    /// XA: the commit decision written, no branch committed.
    AfterDecision,
    /// Reshard: an account closed at its old home, its balance in flight,
    /// its new home not yet credited.
    MidMove,
}

impl Step {
    pub const NAMES: &'static str =
        "after_debit, after_credit (saga); after_prepare, after_decision (xa); mid_move (a [[reshard]])";

    fn parse(text: &str) -> Option<Step> {
        Some(match text {
            "after_debit" => Step::AfterDebit,
            "after_credit" => Step::AfterCredit,
            "after_prepare" => Step::AfterPrepare,
            "after_decision" => Step::AfterDecision,
            "mid_move" => Step::MidMove,
            _ => return None,
        })
    }

    /// The system's name of the fault hook (`SHARDPAY_FAULT`).
    pub fn hook(self) -> &'static str {
        match self {
            Step::AfterDebit => "crash_after_debit",
            Step::AfterCredit => "crash_after_credit",
            Step::AfterPrepare => "crash_after_prepare",
            Step::AfterDecision => "crash_after_decision",
            Step::MidMove => "crash_mid_move",
        }
    }

    /// Whether the step belongs to a reshard's move of an account.
    pub fn reshard(self) -> bool {
        self == Step::MidMove
    }

    /// Whether the step belongs to XA two-phase commit (else to the saga).
    pub fn xa(self) -> bool {
        matches!(self, Step::AfterPrepare | Step::AfterDecision)
    }
}

/// One occurrence of a fault, as the run applies it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Fault {
    /// The entry's name, with `#n` for the n-th repeat of a repeating one.
    pub name: String,
    pub action: Action,
    /// `system`, `shard-N` or `redis`.
    pub target: String,
    /// The shard of a `shard-N` target.
    #[serde(default)]
    pub shard: Option<u32>,
    /// `crash_at`: where the system aborts.
    pub step: Option<Step>,
    /// `partition`, `slow`, `flaky`: what the link does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<LinkFault>,
    /// Start, in ms from the start of the run.
    pub at_ms: u64,
    /// How long the target stays down once the fault has hit, in ms.
    pub for_ms: u64,
    /// The line of the entry in the scenario file.
    pub line: usize,
}

/// The services a `crash` can name, when the run starts them as six
/// processes.
pub const SERVICES: [&str; 6] = [
    "auth",
    "ledger",
    "fraud",
    "notification",
    "analytics",
    "shard-manager",
];

/// The longest a target may stay down.
pub const MAX_FOR_S: f64 = 60.0;
/// The most occurrences of one entry.
pub const MAX_TIMES: u32 = 100;
/// The least time between one occurrence's end and the next one's start:
/// the system must be back before it is hit again.
pub const MIN_GAP_S: f64 = 2.0;

/// The actions the schedule knows, for errors.
const BUILT: &str = "crash, crash_at, kill, pause, partition, slow, flaky, redis_down";
/// Actions of the fault model that this version cannot apply yet.
const NOT_BUILT: [&str; 1] = ["broker_down"];
/// The longest delay of a slow link.
pub const MAX_DELAY_MS: u64 = 10_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFault {
    name: Option<Spanned<String>>,
    action: Spanned<String>,
    target: Option<Spanned<String>>,
    step: Option<Spanned<String>>,
    at_s: Spanned<f64>,
    for_s: Option<Spanned<f64>>,
    every_s: Option<Spanned<f64>>,
    times: Option<Spanned<u32>>,
    jitter_s: Option<Spanned<f64>>,
    reset: Option<Spanned<bool>>,
    delay_ms: Option<Spanned<u64>>,
    jitter_ms: Option<Spanned<u64>>,
    share: Option<Spanned<f64>>,
}

/// The shard of a target `shard-N`, N from 0 to 63.
fn shard_of(target: &str) -> Option<u32> {
    let n = target.strip_prefix("shard-")?;
    if n.is_empty() || n.len() > 2 || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    n.parse().ok().filter(|n| *n < 64)
}

/// The target of a fault, checked against what its action can hit:
/// `system` for crashes, `shard-N` for a shard's server, `shard-N` or
/// `redis` for a link, `redis` for `redis_down`.
fn fault_target(
    action: Action,
    target: Option<Spanned<String>>,
    span: Range<usize>,
    key: &str,
    at: &Locator,
) -> Result<(String, Option<u32>), ScenarioError> {
    let (want, default) = match action {
        Action::Crash => (
            "`system`, the reference system the run starts, or with --six-processes one of its services: auth, ledger, fraud, notification, analytics, shard-manager",
            Some("system"),
        ),
        Action::CrashAt => ("`system`, the reference system the run starts", Some("system")),
        Action::Kill | Action::Pause => ("a shard's database server, as shard-N (0 to 63)", None),
        Action::Partition | Action::Slow | Action::Flaky => (
            "the link to a shard's database server (shard-N, 0 to 63), to Redis (redis) or to the broker (broker)",
            None,
        ),
        Action::RedisDown => ("`redis`, the Redis the run starts", Some("redis")),
    };
    let Some(t) = target else {
        return match default {
            Some(d) => Ok((d.to_string(), None)),
            None => Err(at.err(
                span,
                key,
                format!("{} needs a target: {want}", action.as_str()),
            )),
        };
    };
    let name = t.get_ref().as_str();
    let shard = shard_of(name);
    let fits = match action {
        Action::Crash => name == "system" || SERVICES.contains(&name),
        Action::CrashAt => name == "system",
        Action::Kill | Action::Pause => shard.is_some(),
        Action::Partition | Action::Slow | Action::Flaky => {
            shard.is_some() || name == "redis" || name == "broker"
        }
        Action::RedisDown => name == "redis",
    };
    if fits {
        return Ok((t.into_inner(), shard));
    }
    Err(at.err(
        t.span(),
        key,
        format!(
            "`{name}` cannot be the target of {}: its target is {want}",
            action.as_str()
        ),
    ))
}

/// The keys of a link fault: `reset` for a partition, `delay_ms` and
/// `jitter_ms` for a slow link, `share` for a flaky one; refused on any
/// other fault.
fn link_fault(
    action: Action,
    f: &RawFault,
    span: Range<usize>,
    key: &dyn Fn(&str) -> String,
    at: &Locator,
) -> Result<Option<LinkFault>, ScenarioError> {
    let only = |field: &str, on: Action, key_span: Range<usize>| {
        at.err(
            key_span,
            &key(field),
            format!(
                "only {} takes {field}, not {}",
                on.as_str(),
                action.as_str()
            ),
        )
    };
    if action != Action::Partition {
        if let Some(v) = &f.reset {
            return Err(only("reset", Action::Partition, v.span()));
        }
    }
    if action != Action::Slow {
        if let Some(v) = &f.delay_ms {
            return Err(only("delay_ms", Action::Slow, v.span()));
        }
        if let Some(v) = &f.jitter_ms {
            return Err(only("jitter_ms", Action::Slow, v.span()));
        }
    }
    if action != Action::Flaky {
        if let Some(v) = &f.share {
            return Err(only("share", Action::Flaky, v.span()));
        }
    }
    let mut link = LinkFault {
        reset: false,
        delay_ms: 0,
        jitter_ms: 0,
        share: 0.0,
    };
    match action {
        Action::Partition => link.reset = f.reset.as_ref().is_some_and(|r| *r.get_ref()),
        Action::Slow => {
            let Some(delay) = &f.delay_ms else {
                return Err(at.err(
                    span,
                    &key("delay_ms"),
                    format!(
                        "slow needs delay_ms: the delay toward the backend, 1 to {MAX_DELAY_MS}"
                    ),
                ));
            };
            for (field, v, min) in [
                ("delay_ms", Some(delay), 1),
                ("jitter_ms", f.jitter_ms.as_ref(), 0),
            ] {
                if let Some(v) = v {
                    if *v.get_ref() < min || *v.get_ref() > MAX_DELAY_MS {
                        return Err(at.err(
                            v.span(),
                            &key(field),
                            format!("must be {min} to {MAX_DELAY_MS} ms"),
                        ));
                    }
                }
            }
            link.delay_ms = *delay.get_ref();
            link.jitter_ms = f.jitter_ms.as_ref().map(|j| *j.get_ref()).unwrap_or(0);
        }
        Action::Flaky => {
            let Some(share) = &f.share else {
                return Err(at.err(
                    span,
                    &key("share"),
                    "flaky needs share: the share of connections reset, above 0 and at most 1",
                ));
            };
            let x = *share.get_ref();
            if !(x > 0.0 && x <= 1.0) {
                return Err(at.err(share.span(), &key("share"), "must be above 0 and at most 1"));
            }
            link.share = x;
        }
        _ => return Ok(None),
    }
    Ok(Some(link))
}

/// Checks `[[faults]]` and expands it into occurrences in time order.
pub(super) fn check(
    raw: Option<Vec<Spanned<RawFault>>>,
    stop: Stop,
    seed: u64,
    at: &Locator,
) -> Result<Vec<Fault>, ScenarioError> {
    let Some(entries) = raw else {
        return Ok(Vec::new());
    };
    let mut out: Vec<(Fault, Range<usize>)> = Vec::new();
    for (index, entry) in entries.into_iter().enumerate() {
        let span = entry.span();
        let key = |field: &str| format!("faults[{index}].{field}");
        let f = entry.into_inner();
        let Some(length_s) = stop.seconds() else {
            return Err(at.err(
                span,
                &format!("faults[{index}]"),
                "faults are scheduled in seconds: give the scenario a duration_s",
            ));
        };
        let action = match f.action.get_ref().as_str() {
            "crash" => Action::Crash,
            "crash_at" => Action::CrashAt,
            "kill" => Action::Kill,
            "pause" => Action::Pause,
            "partition" => Action::Partition,
            "slow" => Action::Slow,
            "flaky" => Action::Flaky,
            "redis_down" => Action::RedisDown,
            other if NOT_BUILT.contains(&other) => {
                return Err(at.err(
                    f.action.span(),
                    &key("action"),
                    format!("`{other}` is not built yet: the broker that installs here keeps its topics in memory, so one started again has lost every event not yet consumed; cut its link instead (partition, target = \"broker\"). This version applies {BUILT}"),
                ))
            }
            other => {
                return Err(at.err(
                    f.action.span(),
                    &key("action"),
                    format!("unknown fault `{other}`; use one of {BUILT}"),
                ))
            }
        };
        let link = link_fault(action, &f, span.clone(), &key, at)?;
        let (target, shard) = fault_target(action, f.target, span.clone(), &key("target"), at)?;
        let step = match (action, f.step) {
            (Action::CrashAt, Some(s)) => Some(Step::parse(s.get_ref()).ok_or_else(|| {
                at.err(
                    s.span(),
                    &key("step"),
                    format!("unknown step `{}`; use one of {}", s.get_ref(), Step::NAMES),
                )
            })?),
            (Action::CrashAt, None) => {
                return Err(at.err(
                    span,
                    &key("step"),
                    format!("crash_at needs a step: one of {}", Step::NAMES),
                ))
            }
            (_, Some(s)) => {
                return Err(at.err(
                    s.span(),
                    &key("step"),
                    format!("only crash_at takes a step, not {}", action.as_str()),
                ))
            }
            (_, None) => None,
        };
        let seconds = |v: &Spanned<f64>, field: &str, min: f64, max: f64| {
            let x = *v.get_ref();
            if x.is_finite() && x >= min && x <= max {
                Ok(x)
            } else {
                Err(at.err(
                    v.span(),
                    &key(field),
                    format!("must be between {min} and {max} seconds"),
                ))
            }
        };
        let at_s = seconds(&f.at_s, "at_s", 0.0, length_s as f64)?;
        let for_s = match &f.for_s {
            Some(v) => seconds(v, "for_s", 0.0, MAX_FOR_S)?,
            None => 0.0,
        };
        if action.link() && for_s <= 0.0 {
            return Err(at.err(
                f.for_s.as_ref().map(|v| v.span()).unwrap_or(span.clone()),
                &key("for_s"),
                format!(
                    "{} lasts a while: give for_s, above 0 and at most {MAX_FOR_S} seconds",
                    action.as_str()
                ),
            ));
        }
        let jitter_s = match &f.jitter_s {
            Some(v) => seconds(v, "jitter_s", 0.0, length_s as f64)?,
            None => 0.0,
        };
        let times = match (&f.every_s, &f.times) {
            (_, Some(t)) if *t.get_ref() == 0 || *t.get_ref() > MAX_TIMES => {
                return Err(at.err(t.span(), &key("times"), format!("must be 1 to {MAX_TIMES}")))
            }
            (None, Some(t)) if *t.get_ref() > 1 => {
                return Err(at.err(
                    t.span(),
                    &key("times"),
                    "a fault that repeats needs every_s, the time from one start to the next",
                ))
            }
            (_, t) => t.as_ref().map(|t| *t.get_ref()).unwrap_or(1),
        };
        let every_s = match &f.every_s {
            Some(v) => seconds(v, "every_s", MIN_GAP_S, length_s as f64)?,
            None => 0.0,
        };
        let name = match &f.name {
            Some(n) => {
                let ok = !n.get_ref().is_empty()
                    && n.get_ref().len() <= 40
                    && n.get_ref()
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_ ".contains(c));
                if !ok {
                    return Err(at.err(
                        n.span(),
                        &key("name"),
                        "use up to 40 letters, digits, spaces, '-' and '_'",
                    ));
                }
                n.get_ref().clone()
            }
            None => format!("{}-{}", action.as_str().replace('_', "-"), index + 1),
        };
        let line = at.line_of(span.start);
        for n in 0..times {
            // Drawn from the seed, the entry and the repeat: the same file
            // and seed give the same schedule.
            let draw =
                crate::plan::mix64(seed ^ crate::plan::mix64(((index as u64) << 32) | n as u64));
            let jitter = if jitter_s > 0.0 {
                (draw >> 11) as f64 / (1u64 << 53) as f64 * jitter_s
            } else {
                0.0
            };
            let start_s = at_s + every_s * n as f64 + jitter;
            if start_s + for_s >= length_s as f64 {
                return Err(at.err(
                    span.clone(),
                    &format!("faults[{index}]"),
                    format!(
                        "occurrence {} would run from {start_s:.1} s to {:.1} s, past the run's end at {length_s} s",
                        n + 1,
                        start_s + for_s
                    ),
                ));
            }
            out.push((
                Fault {
                    name: if times > 1 {
                        format!("{name}#{}", n + 1)
                    } else {
                        name.clone()
                    },
                    action,
                    target: target.clone(),
                    shard,
                    step,
                    link,
                    at_ms: (start_s * 1000.0).round() as u64,
                    for_ms: (for_s * 1000.0).round() as u64,
                    line,
                },
                span.clone(),
            ));
        }
    }
    out.sort_by_key(|(f, _)| f.at_ms);
    for pair in out.windows(2) {
        let (a, b) = (&pair[0].0, &pair[1].0);
        let end = a.at_ms.saturating_add(a.for_ms);
        if b.at_ms < end.saturating_add((MIN_GAP_S * 1000.0) as u64) {
            return Err(at.err(
                pair[1].1.clone(),
                "faults",
                format!(
                    "{} starts at {:.1} s, less than {MIN_GAP_S} s after {} (line {}) ends at {:.1} s: faults may not overlap, and the system needs time to come back",
                    b.name,
                    b.at_ms as f64 / 1000.0,
                    a.name,
                    a.line,
                    end as f64 / 1000.0
                ),
            ));
        }
    }
    Ok(out.into_iter().map(|(f, _)| f).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::{parse, ScenarioError};

    const BASE: &str = r#"
name = "f"
seed = 5
duration_s = 60

[accounts]
count = 100
opening_balance = "1000.00"

[load]
model = "closed"
users = 4

[mix]
same_shard = 1
cross_shard = 1
"#;

    fn with(faults: &str) -> Result<Vec<Fault>, ScenarioError> {
        parse(&format!("{BASE}{faults}"), "t.toml").map(|s| s.faults)
    }

    /// The line of `needle` in the file `with` builds.
    fn line_of(faults: &str, needle: &str) -> usize {
        let text = format!("{BASE}{faults}");
        text[..text.find(needle).unwrap()].matches('\n').count() + 1
    }

    #[test]
    fn a_schedule_expands_in_time_order_with_names() {
        let faults = with(
            r#"
[[faults]]
action = "crash_at"
step = "after_debit"
at_s = 30
for_s = 1.5

[[faults]]
name = "kill"
action = "crash"
at_s = 5
every_s = 10
times = 2
"#,
        )
        .unwrap();
        let got: Vec<(&str, Action, u64, u64)> = faults
            .iter()
            .map(|f| (f.name.as_str(), f.action, f.at_ms, f.for_ms))
            .collect();
        assert_eq!(
            got,
            vec![
                ("kill#1", Action::Crash, 5_000, 0),
                ("kill#2", Action::Crash, 15_000, 0),
                ("crash-at-1", Action::CrashAt, 30_000, 1_500),
            ]
        );
        assert_eq!(faults[2].step, Some(Step::AfterDebit));
        assert_eq!(faults[2].target, "system");
    }

    #[test]
    fn drawn_times_follow_the_seed() {
        let entry = r#"
[[faults]]
action = "crash"
at_s = 5
every_s = 12
times = 4
jitter_s = 4
"#;
        let a = with(entry).unwrap();
        assert_eq!(
            a,
            with(entry).unwrap(),
            "the same seed replays the schedule"
        );
        let other = parse(
            &format!("{BASE}{entry}").replace("seed = 5", "seed = 6"),
            "t.toml",
        )
        .unwrap()
        .faults;
        assert_ne!(a, other, "another seed draws other times");
        for (n, f) in a.iter().enumerate() {
            let planned = 5_000 + 12_000 * n as u64;
            assert!(
                (planned..=planned + 4_000).contains(&f.at_ms),
                "{n}: {}",
                f.at_ms
            );
        }
    }

    #[test]
    fn impossible_faults_are_refused_with_line_and_reason() {
        let cases = [
            (
                "[[faults]]\naction = \"explode\"\nat_s = 5\n",
                "explode",
                "faults[0].action",
                "unknown fault `explode`",
            ),
            (
                "[[faults]]\naction = \"broker_down\"\nat_s = 5\n",
                "broker_down",
                "faults[0].action",
                "not built yet",
            ),
            (
                "[[faults]]\naction = \"partition\"\nat_s = 5\nfor_s = 2\n",
                "[[faults]]",
                "faults[0].target",
                "partition needs a target",
            ),
            (
                "[[faults]]\naction = \"partition\"\ntarget = \"kafka\"\nat_s = 5\nfor_s = 2\n",
                "kafka",
                "faults[0].target",
                "or to the broker (broker)",
            ),
            (
                "[[faults]]\naction = \"partition\"\ntarget = \"shard-1\"\nat_s = 5\n",
                "[[faults]]",
                "faults[0].for_s",
                "partition lasts a while",
            ),
            (
                "[[faults]]\naction = \"slow\"\ntarget = \"shard-1\"\nat_s = 5\nfor_s = 2\n",
                "[[faults]]",
                "faults[0].delay_ms",
                "slow needs delay_ms",
            ),
            (
                "[[faults]]\naction = \"slow\"\ntarget = \"redis\"\nat_s = 5\nfor_s = 2\ndelay_ms = 20000\n",
                "delay_ms = 20000",
                "faults[0].delay_ms",
                "1 to 10000 ms",
            ),
            (
                "[[faults]]\naction = \"flaky\"\ntarget = \"redis\"\nat_s = 5\nfor_s = 2\nshare = 1.5\n",
                "share = 1.5",
                "faults[0].share",
                "at most 1",
            ),
            (
                "[[faults]]\naction = \"kill\"\ntarget = \"shard-1\"\nat_s = 5\ndelay_ms = 5\n",
                "delay_ms = 5",
                "faults[0].delay_ms",
                "only slow takes delay_ms",
            ),
            (
                "[[faults]]\naction = \"redis_down\"\ntarget = \"shard-1\"\nat_s = 5\n",
                "shard-1",
                "faults[0].target",
                "`redis`, the Redis the run starts",
            ),
            (
                "[[faults]]\naction = \"kill\"\nat_s = 5\n",
                "[[faults]]",
                "faults[0].target",
                "kill needs a target",
            ),
            (
                "[[faults]]\naction = \"pause\"\ntarget = \"system\"\nat_s = 5\n",
                "system",
                "faults[0].target",
                "shard-N",
            ),
            (
                "[[faults]]\naction = \"kill\"\ntarget = \"shard-64\"\nat_s = 5\n",
                "shard-64",
                "faults[0].target",
                "shard-N (0 to 63)",
            ),
            (
                "[[faults]]\naction = \"crash\"\ntarget = \"shard-9\"\nat_s = 5\n",
                "shard-9",
                "faults[0].target",
                "its target is `system`",
            ),
            (
                "[[faults]]\naction = \"crash_at\"\nat_s = 5\n",
                "[[faults]]",
                "faults[0].step",
                "crash_at needs a step",
            ),
            (
                "[[faults]]\naction = \"crash_at\"\nstep = \"after_lunch\"\nat_s = 5\n",
                "after_lunch",
                "faults[0].step",
                "unknown step",
            ),
            (
                "[[faults]]\naction = \"crash\"\nstep = \"after_debit\"\nat_s = 5\n",
                "after_debit",
                "faults[0].step",
                "only crash_at takes a step",
            ),
            (
                "[[faults]]\naction = \"crash\"\nat_s = 5\nfor_s = 90\n",
                "for_s = 90",
                "faults[0].for_s",
                "between 0 and 60",
            ),
            (
                "[[faults]]\naction = \"crash\"\nat_s = 59\nfor_s = 2\n",
                "[[faults]]",
                "faults[0]",
                "past the run's end",
            ),
            (
                "[[faults]]\naction = \"crash\"\nat_s = 5\ntimes = 3\n",
                "times = 3",
                "faults[0].times",
                "needs every_s",
            ),
            (
                "[[faults]]\naction = \"crash\"\nat_s = 5\nfor_s = 3\n\n[[faults]]\naction = \"crash\"\nat_s = 9\n",
                "[[faults]]\naction = \"crash\"\nat_s = 9",
                "faults",
                "may not overlap",
            ),
            (
                "[[faults]]\naction = \"crash\"\nat_s = 5\nsoon = true\n",
                "soon",
                "faults",
                "unknown field",
            ),
        ];
        for (faults, needle, key, message) in cases {
            let e = with(faults).unwrap_err();
            assert_eq!(e.line, line_of(faults, needle), "{faults}: {e}");
            assert!(e.key.starts_with(key), "{faults}: {e}");
            assert!(e.message.contains(message), "{faults}: {e}");
        }
    }

    #[test]
    fn link_faults_carry_what_the_link_does() {
        let faults = with(
            r#"
[[faults]]
action = "partition"
target = "shard-1"
at_s = 5
for_s = 3
reset = true

[[faults]]
action = "slow"
target = "redis"
at_s = 12
for_s = 4
delay_ms = 50
jitter_ms = 20

[[faults]]
action = "flaky"
target = "shard-0"
at_s = 20
for_s = 4
share = 0.25

[[faults]]
action = "redis_down"
at_s = 30
for_s = 2
"#,
        )
        .unwrap();
        let link = |i: usize| faults[i].link.unwrap();
        assert!(link(0).reset);
        assert_eq!(
            (faults[0].target.as_str(), faults[0].shard),
            ("shard-1", Some(1))
        );
        assert_eq!((link(1).delay_ms, link(1).jitter_ms), (50, 20));
        assert_eq!(
            (faults[1].target.as_str(), faults[1].shard),
            ("redis", None)
        );
        assert_eq!(link(2).share, 0.25);
        assert_eq!(faults[3].action, Action::RedisDown);
        assert_eq!(faults[3].target, "redis");
        assert!(faults[3].link.is_none());
    }

    #[test]
    fn faults_need_a_timed_run() {
        let text = format!("{BASE}[[faults]]\naction = \"crash\"\nat_s = 5\n")
            .replace("duration_s = 60", "requests = 1000");
        let e = parse(&text, "t.toml").unwrap_err();
        assert!(e.message.contains("duration_s"), "{e}");
    }
}
