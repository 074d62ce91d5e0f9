//! `report.json`: a versioned schema. Histograms are stored losslessly (the
//! HdrHistogram V2 encoding, base64), next to readable summaries, so reports
//! from several runs or machines merge into exactly the histogram of all
//! their samples. Also the terminal summary.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{bail, Context};
use base64::Engine as _;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::accounting::Accounting;
use crate::record::{new_histogram, Counts};

/// The schema this build writes. Readers refuse other major versions.
pub const SCHEMA: &str = "shardpay.report/1";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Report {
    pub schema: String,
    pub scenario: ScenarioInfo,
    pub run: RunInfo,
    pub machine: Machine,
    pub totals: Totals,
    pub by_kind: BTreeMap<String, Counts>,
    pub latency: Latency,
    pub timeline: Timeline,
    /// Every answer that was not a plain accepted transfer, by status and
    /// code (status 0: no HTTP answer).
    pub outcomes: Vec<OutcomeRow>,
    pub accounting: Accounting,
    pub audit: Audit,
    pub thresholds: Vec<ThresholdResult>,
    /// The raw-database baseline measured before the load, when asked for.
    #[serde(default)]
    pub baseline: Option<Baseline>,
    /// The system's event pipeline after the run, once caught up (or as it
    /// stood when waiting gave up); `None` when the system has none.
    #[serde(default)]
    pub pipeline: Option<shardpay_reference::pipeline::PipelineReport>,
    /// The simulator's webhook receiver, for runs on the in-process system.
    #[serde(default)]
    pub webhooks: Option<crate::webhooks::WebhookReport>,
    /// The scenario's faults, each with what it did to the traffic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub faults: Option<Faults>,
    /// The scenario's reshards of the live system, each with the system's
    /// account of it and the audits around it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reshards: Vec<ReshardRun>,
    pub resources: Resources,
    pub passed: bool,
    pub failures: Vec<String>,
}

/// One reshard of the live system during the load.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ReshardRun {
    /// The entry's line in the scenario file.
    pub line: usize,
    pub scheduled_s: f64,
    pub to: u32,
    /// When it was asked for and when the new placement was in force,
    /// seconds since the load began.
    pub started_s: Option<f64>,
    pub ended_s: Option<f64>,
    /// Its phases (prepare, copy, switch) in seconds since the load began.
    #[serde(default)]
    pub phases: Vec<(String, f64, f64)>,
    /// The system's account of it (`GET /v1/admin/reshard`'s `last`):
    /// accounts scanned and moved, the moved share, keys and bytes copied,
    /// requests that waited or were refused, the longest freeze.
    pub system: Option<serde_json::Value>,
    /// The audits before, during (about each second) and after it.
    pub audits: Vec<ReshardAudit>,
    /// When it was asked for again after a fault stopped it (seconds since
    /// the load began), and what stopped it.
    #[serde(default)]
    pub resumed: Vec<(f64, String)>,
    /// Why it did not finish, when it did not.
    pub error: Option<String>,
}

impl ReshardRun {
    /// The figure `name` of the system's account, as a number.
    pub fn figure(&self, name: &str) -> Option<f64> {
        self.system.as_ref()?.get(name)?.as_f64()
    }

    /// What went wrong with it: an error, or a failed audit.
    pub fn problems(&self) -> Vec<String> {
        let mut problems: Vec<String> = self.error.iter().cloned().collect();
        for a in self.audits.iter().filter(|a| !a.ok) {
            problems.push(format!(
                "audit {} it (at {:.1} s) failed: {}",
                a.when,
                a.at_s,
                a.failed.join("; ")
            ));
        }
        problems
    }
}

/// An audit taken around a reshard.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ReshardAudit {
    /// `before`, `during` or `after`.
    pub when: String,
    pub at_s: f64,
    pub ok: bool,
    /// Each failed check with its first problems.
    pub failed: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ScenarioInfo {
    pub name: String,
    pub file: String,
    pub seed: u64,
    pub model: String,
    /// The scenario file as it was read.
    pub source: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunInfo {
    /// RFC 3339, UTC.
    pub started_at: String,
    pub shards: usize,
    /// "sqlite" (embedded), or what the target says it runs on.
    pub backend: String,
    /// The cross-shard protocol of the system driven: "saga" or "xa".
    #[serde(default = "saga")]
    pub cross_shard: String,
    /// The in-process system's event bus (`in-process`, `kafka://...`).
    #[serde(default)]
    pub bus: String,
    /// "off", or "on: N users own the accounts" (each transfer carries its
    /// payer's owner's token).
    #[serde(default)]
    pub auth: String,
    /// "embedded" or the URL driven.
    pub target: String,
    pub git_commit: String,
    pub simulator_version: String,
    /// Prefix of this run's account ids and idempotency keys.
    pub run_id: String,
    pub accounts: u64,
    pub warmup_s: u64,
    /// Measured window: from the end of the warm-up to the last answer.
    pub measured_s: f64,
    pub operations: u64,
    pub users: u32,
    /// Requests goose's virtual users sent through their clients, every try
    /// (a cross-check of the recorder's count; racing resends bypass it).
    pub goose_requests: u64,
    /// Stopped early by Ctrl-C; the books and audit cover what ran, and the
    /// run fails.
    pub interrupted: bool,
    /// Open model: how far the arrival schedule fell behind (absent in the
    /// closed model).
    #[serde(default)]
    pub schedule: Option<ScheduleLag>,
}

/// The open model's arrivals against what was sent. An operation is due at
/// its scheduled time; one sent late (every virtual user busy) is still
/// measured from when it was due, and one never sent before the run ended
/// is counted here rather than dropped.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Default)]
pub struct ScheduleLag {
    /// Operations due within the run's length.
    pub due: u64,
    /// Due but never sent: the users were all busy until the run ended.
    pub unsent: u64,
    /// Sent more than 100 ms after they were due.
    pub late: u64,
    /// The latest an operation was sent after it was due, milliseconds.
    pub worst_lag_ms: f64,
}

impl ScheduleLag {
    /// Whether the run kept to its schedule.
    pub fn kept(&self) -> bool {
        self.unsent == 0 && self.late == 0
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Machine {
    pub os: String,
    pub arch: String,
    pub cpus: usize,
    pub cpu_model: String,
    pub memory_bytes: u64,
    pub hostname: String,
}

impl Machine {
    pub fn here() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .unwrap_or("unknown")
            .trim()
            .to_string();
        let memory_bytes = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find(|l| l.starts_with("MemTotal:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|kb| kb.parse::<u64>().ok())
            })
            .map(|kb| kb * 1024)
            .unwrap_or(0);
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .unwrap_or_default()
            .trim()
            .to_string();
        Machine {
            os: std::env::consts::OS.to_string(),
            arch: std::env::consts::ARCH.to_string(),
            cpus: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            cpu_model,
            memory_bytes,
            hostname,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Totals {
    pub counts: Counts,
    /// Accepted transfers per second over the measured window.
    pub tps: f64,
    /// Requests per second over the measured window.
    pub rps: f64,
    /// errors / requests.
    pub error_rate: f64,
}

/// A histogram in microseconds: the summary for reading, `hdr` for merging.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Hist {
    pub count: u64,
    pub min_us: u64,
    pub mean_us: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    /// HdrHistogram V2 encoding, base64.
    pub hdr: String,
}

impl Hist {
    pub fn of(h: &Histogram<u64>) -> Hist {
        let mut bytes = Vec::new();
        V2Serializer::new()
            .serialize(h, &mut bytes)
            .expect("serializing to memory cannot fail");
        let q = |x: f64| {
            if h.is_empty() {
                0
            } else {
                h.value_at_quantile(x)
            }
        };
        Hist {
            count: h.len(),
            min_us: if h.is_empty() { 0 } else { h.min() },
            mean_us: if h.is_empty() {
                0.0
            } else {
                (h.mean() * 10.0).round() / 10.0
            },
            p50_us: q(0.50),
            p90_us: q(0.90),
            p99_us: q(0.99),
            p999_us: q(0.999),
            max_us: if h.is_empty() { 0 } else { h.max() },
            hdr: base64::engine::general_purpose::STANDARD.encode(bytes),
        }
    }

    pub fn decode(&self) -> anyhow::Result<Histogram<u64>> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(&self.hdr)
            .context("histogram is not base64")?;
        let h: Histogram<u64> = Deserializer::new()
            .deserialize(&mut bytes.as_slice())
            .map_err(|e| anyhow::anyhow!("histogram does not decode: {e:?}"))?;
        Ok(h)
    }

    /// Exactly the histogram of both sets of samples.
    pub fn merge(&self, other: &Hist) -> anyhow::Result<Hist> {
        let mut a = self.decode()?;
        let b = other.decode()?;
        let mut merged = new_histogram();
        merged.add(&a).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        merged.add(&b).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        a.reset();
        Ok(Hist::of(&merged))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Latency {
    pub all: Hist,
    pub kinds: BTreeMap<String, Hist>,
    /// By payer shard.
    pub shards: BTreeMap<String, Hist>,
    /// Cross-shard requests by "payer->payee" shard pair.
    pub pairs: BTreeMap<String, Hist>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Timeline {
    /// Seconds per slot.
    pub interval_s: u64,
    pub warmup_s: u64,
    /// Accepted transfers per second, by payer shard.
    pub shards: BTreeMap<String, Vec<u64>>,
    pub errors: Vec<u64>,
    /// Requests completed per second.
    #[serde(default)]
    pub requests: Vec<u64>,
    /// p99 latency per second, in ms (0 for a second without requests).
    #[serde(default)]
    pub p99_ms: Vec<f64>,
    /// Throughput at the end of the measured window against its start.
    #[serde(default)]
    pub drift: Option<Drift>,
}

/// Accepted transfers per second in the first and the last tenth of the
/// measured window: a system that slows as its history grows shows it
/// here. Absent for windows under ten whole seconds.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Drift {
    pub first_tps: f64,
    pub last_tps: f64,
    /// last_tps / first_tps - 1: -0.05 is 5% slower at the end.
    pub change: f64,
    /// Seconds in each tenth.
    pub tenth_s: u64,
}

impl Drift {
    /// One line for the summary and the HTML report.
    pub fn describe(&self) -> String {
        format!(
            "throughput over the run: {:.0}/s in the first {} s, {:.0}/s in the last {} s ({:+.1}%)",
            self.first_tps,
            self.tenth_s,
            self.last_tps,
            self.tenth_s,
            self.change * 100.0
        )
    }
}

impl Timeline {
    /// Accepted transfers per second over all shards, second by second.
    pub fn accepted(&self) -> Vec<u64> {
        let len = self.shards.values().map(Vec::len).max().unwrap_or(0);
        (0..len)
            .map(|i| {
                self.shards
                    .values()
                    .map(|s| s.get(i).copied().unwrap_or(0))
                    .sum()
            })
            .collect()
    }

    /// The drift of the measured window (after the warm-up, without the
    /// last second, which is partial).
    pub fn drift(&self) -> Option<Drift> {
        let accepted = self.accepted();
        let from = self.warmup_s as usize;
        let measured = accepted.get(from..accepted.len().checked_sub(1)?)?;
        let tenth = measured.len() / 10;
        if tenth == 0 {
            return None;
        }
        let mean = |s: &[u64]| s.iter().sum::<u64>() as f64 / s.len() as f64;
        let first_tps = mean(&measured[..tenth]);
        let last_tps = mean(&measured[measured.len() - tenth..]);
        (first_tps > 0.0).then(|| Drift {
            first_tps,
            last_tps,
            change: last_tps / first_tps - 1.0,
            tenth_s: tenth as u64,
        })
    }
}

/// The fault schedule as it ran.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Faults {
    pub faults: Vec<FaultReport>,
    /// Measured requests outside every fault's span, and their errors.
    pub outside: Counts,
    pub outside_error_rate: f64,
    /// Of every fault's span together.
    pub inside: Counts,
    pub inside_error_rate: f64,
    /// The system was found down after the load, outside any fault.
    #[serde(default)]
    pub down_outside_faults: bool,
}

/// One fault: when it ran, what it did to the traffic, how the system came
/// back. Times are seconds from the start of the run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FaultReport {
    pub name: String,
    pub action: String,
    pub target: String,
    #[serde(default)]
    pub step: Option<String>,
    /// The entry's line in the scenario file.
    pub line: usize,
    pub scheduled_s: f64,
    /// When it began (the kill, or the hook armed).
    pub started_s: Option<f64>,
    /// When the system went down.
    pub hit_s: Option<f64>,
    /// When the system listened again.
    pub healed_s: Option<f64>,
    /// From the heal to the first transfer accepted after it.
    pub first_accepted_after_s: Option<f64>,
    /// From the heal to the end of the first whole second at full
    /// throughput again (80% of the mean of the seconds before the fault).
    pub recovered_after_s: Option<f64>,
    /// Accepted transfers per second before the fault, the mark of "full".
    pub tps_before: Option<f64>,
    /// Why the recovery was not measured, when it was not (no clean
    /// seconds before the fault, or a heal too close to the run's end).
    #[serde(default)]
    pub recovery_unmeasured: Option<String>,
    /// The span the figures below cover: from the start to the recovery (or
    /// to 5 s after the heal when the run never got back to full).
    pub span_s: (f64, f64),
    pub counts: Counts,
    pub error_rate: f64,
    /// Answers other than accepted transfers in the span, by status.
    pub answers: Vec<OutcomeRow>,
    /// Transfers pending on the shards when the system was back.
    pub pending_at_heal: Option<u64>,
    /// From the heal until the pending transfers were back to their level
    /// before the fault (under load some are always on their way).
    pub pending_cleared_after_s: Option<f64>,
    /// The system's audit once the pending transfers cleared.
    pub audit_ok: Option<bool>,
    #[serde(default)]
    pub audit_failures: Vec<String>,
    #[serde(default)]
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OutcomeRow {
    pub status: u16,
    pub code: String,
    pub count: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Audit {
    pub ok: bool,
    pub summary: String,
    /// The system's audit answer as it gave it.
    pub raw: serde_json::Value,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ThresholdResult {
    pub name: String,
    pub limit: String,
    pub actual: String,
    pub ok: bool,
}

/// The kinds of transfer the raw-database baseline measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BaselineKind {
    SameShard,
    CrossShard,
    CrossShardXa,
}

impl BaselineKind {
    /// The kind of traffic in a report this baseline is the ceiling of.
    pub fn traffic(self) -> &'static str {
        match self {
            BaselineKind::SameShard => "same_shard",
            BaselineKind::CrossShard | BaselineKind::CrossShardXa => "cross_shard",
        }
    }
}

/// One kind of transfer measured raw by the baseline.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BaselineResult {
    pub kind: BaselineKind,
    pub shards: usize,
    pub concurrency: usize,
    pub seconds: f64,
    pub transfers: u64,
    pub tps: f64,
    /// Latency of one whole transfer (all its transactions), microseconds.
    pub latency: Hist,
    /// The machine's busy share while the baseline ran (every process on
    /// it: the shard servers too); `None` when it could not be read.
    #[serde(default)]
    pub machine_busy: Option<f64>,
}

/// The transfer transactions sent straight to the shard databases (no HTTP,
/// no services) at the run's concurrency, and the services' share of it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Baseline {
    pub results: Vec<BaselineResult>,
    /// Per kind: the run's accepted transfers per second of that kind
    /// against the raw-database figure.
    pub ratios: Vec<BaselineRatio>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BaselineRatio {
    pub kind: String,
    pub service_tps: f64,
    pub database_tps: f64,
    pub ratio: f64,
}

impl Baseline {
    pub fn new(results: Vec<BaselineResult>, report: &Report) -> Baseline {
        let seconds = report.run.measured_s.max(1e-3);
        let ratios = results
            .iter()
            .map(|r| {
                let kind = r.kind.traffic();
                // A sole kind's TPS is the run's; in a mix, the kind's own.
                let accepted = report
                    .by_kind
                    .get(kind)
                    .map(|c| c.accepted)
                    .unwrap_or(report.totals.counts.accepted);
                let service_tps = if report.by_kind.len() == 1 {
                    report.totals.tps
                } else {
                    accepted as f64 / seconds
                };
                BaselineRatio {
                    kind: kind.into(),
                    service_tps,
                    database_tps: r.tps,
                    ratio: if r.tps > 0.0 {
                        service_tps / r.tps
                    } else {
                        0.0
                    },
                }
            })
            .collect();
        Baseline { results, ratios }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct Resources {
    /// CPU seconds the simulator used during the load (the in-process
    /// reference system's threads excluded).
    pub simulator_cpu_s: f64,
    /// CPU seconds of the in-process reference system, when embedded.
    pub system_cpu_s: Option<f64>,
    pub wall_s: f64,
    /// simulator_cpu_s / (wall_s * cpus).
    pub simulator_cpu_share: f64,
    /// The simulator's CPU per request sent, microseconds.
    #[serde(default)]
    pub simulator_cpu_us_per_request: f64,
    /// Worker threads of the in-process system's runtime (its HTTP and
    /// services; each SQLite shard adds a writer and reader threads).
    #[serde(default)]
    pub system_threads: Option<usize>,
    /// Share of the whole machine's CPU (every process on it) busy over
    /// the measured window of a timed run (over the whole load for a run
    /// by count, or one stopped early); at SATURATED or above, the CPU, not the system's design,
    /// set the throughput.
    #[serde(default)]
    pub machine_busy: Option<f64>,
}

/// The machine's busy share from which a run counts as CPU-bound.
pub const SATURATED: f64 = 0.9;

impl Resources {
    /// "; reference system 12.3 s on 2 worker threads" when the system ran
    /// in-process, then "; machine 97% busy (CPU-bound)" when measured: the
    /// tail of the CPU line of both reports.
    pub fn system_cpu(&self) -> String {
        let system = self
            .system_cpu_s
            .map(|s| {
                format!(
                    "; reference system {s:.1} s{}",
                    self.system_threads
                        .map(|n| format!(" on {n} worker threads"))
                        .unwrap_or_default()
                )
            })
            .unwrap_or_default();
        let machine = self
            .machine_busy
            .map(|b| {
                format!(
                    "; machine {:.0}% busy{}",
                    b * 100.0,
                    if self.saturated() { " (CPU-bound)" } else { "" }
                )
            })
            .unwrap_or_default();
        system + &machine
    }

    /// The machine's CPU was saturated during the load.
    pub fn saturated(&self) -> bool {
        self.machine_busy.is_some_and(|b| b >= SATURATED)
    }
}

impl Report {
    pub fn read(path: &Path) -> anyhow::Result<Report> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let value: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", path.display()))?;
        let schema = value["schema"].as_str().unwrap_or("");
        if schema.split('/').next() != Some("shardpay.report") {
            bail!(
                "{} is not a shardpay report (no \"schema\": \"{SCHEMA}\")",
                path.display()
            );
        }
        if schema != SCHEMA {
            bail!(
                "{} has schema {schema}; this build reads {SCHEMA}",
                path.display()
            );
        }
        serde_json::from_value(value)
            .with_context(|| format!("{} does not match {SCHEMA}", path.display()))
    }

    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(path, text + "\n")
            .with_context(|| format!("cannot write {}", path.display()))
    }

    /// The terminal summary.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        self.summarize_run(&mut out);
        self.summarize_latency(&mut out);
        summarize_outcomes(&self.outcomes, &mut out);
        if let Some(f) = &self.faults {
            summarize_faults(f, &mut out);
        }
        if !self.reshards.is_empty() {
            summarize_reshards(&self.reshards, &mut out);
        }
        self.summarize_books(&mut out);
        if let Some(p) = &self.pipeline {
            summarize_pipeline(p, &mut out);
        }
        if let Some(w) = &self.webhooks {
            summarize_webhooks(w, &mut out);
        }
        summarize_fraud(&self.accounting.fraud, &mut out);
        if let Some(b) = &self.baseline {
            summarize_baseline(b, &mut out);
        }
        summarize_thresholds(&self.thresholds, &mut out);
        self.summarize_cpu(&mut out);
        out
    }

    /// What ran, and what came of its requests.
    fn summarize_run(&self, out: &mut String) {
        let t = &self.totals;
        let _ = writeln!(
            out,
            "\n{} · seed {} · {} shards ({}, cross-shard {}, bus {}) · {} model · {} users · {:.1} s measured · auth {}",
            self.scenario.name,
            self.scenario.seed,
            self.run.shards,
            self.run.backend,
            self.run.cross_shard,
            if self.run.bus.is_empty() { "in-process" } else { &self.run.bus },
            self.scenario.model,
            self.run.users,
            self.run.measured_s,
            if self.run.auth.is_empty() { "off" } else { &self.run.auth }
        );
        let _ = writeln!(
            out,
            "{:.0} transfers/s · {:.0} requests/s · {} requests · {} accepted · {} replayed · {} declined · {} errors ({:.3}%)",
            t.tps,
            t.rps,
            t.counts.requests,
            t.counts.accepted,
            t.counts.replayed,
            t.counts.declined,
            t.counts.errors,
            t.error_rate * 100.0
        );
        if let Some(d) = self.timeline.drift {
            let _ = writeln!(out, "{}", d.describe());
        }
        if let Some(lag) = self.run.schedule.filter(|l| !l.kept()) {
            let _ = writeln!(
                out,
                "the schedule fell behind: {} of {} due operations never sent, {} sent more than 100 ms late (worst {:.0} ms late); every one of the {} users was busy. Raise `users` or lower the rate to measure the rate asked for.",
                lag.unsent, lag.due, lag.late, lag.worst_lag_ms, self.run.users
            );
        }
        if t.counts.unauthorized + t.counts.rate_limited > 0 {
            let _ = writeln!(
                out,
                "auth: {} unauthorized (401/403, among the errors) · {} rate limited (429, not errors)",
                t.counts.unauthorized, t.counts.rate_limited
            );
        }
    }

    /// Latency percentiles of all requests, by kind and by payer shard.
    fn summarize_latency(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "\n{:<22} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "latency (ms)", "count", "p50", "p90", "p99", "p99.9", "max"
        );
        let mut row = |name: &str, h: &Hist| {
            let ms = |us: u64| format!("{:.2}", us as f64 / 1000.0);
            let _ = writeln!(
                out,
                "{:<22} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
                name,
                h.count,
                ms(h.p50_us),
                ms(h.p90_us),
                ms(h.p99_us),
                ms(h.p999_us),
                ms(h.max_us)
            );
        };
        row("all", &self.latency.all);
        for (k, h) in &self.latency.kinds {
            row(k, h);
        }
        for (s, h) in &self.latency.shards {
            row(&format!("shard {s}"), h);
        }
    }

    /// The verdicts of the audit and of the simulator's own books, and the
    /// books' failed checks.
    fn summarize_books(&self, out: &mut String) {
        let a = &self.accounting;
        let _ = writeln!(
            out,
            "\naudit: {} · accounting: {} ({} transfers sent, {} accepted, {} retry groups{})",
            if self.audit.ok { "passed" } else { "FAILED" },
            if a.ok { "passed" } else { "FAILED" },
            a.transfers_sent,
            a.transfers_accepted,
            a.retry_groups,
            [
                (a.settled_after_run, "settled after the run"),
                (a.resent_unanswered, "resent after a closed connection"),
            ]
            .iter()
            .filter(|(n, _)| *n > 0)
            .map(|(n, what)| format!(", {n} {what}"))
            .collect::<String>()
        );
        for c in a.checks.iter().filter(|c| !c.ok) {
            let _ = writeln!(out, "  FAILED {}: {}", c.name, c.detail);
        }
    }

    /// The simulator's CPU time, and the in-process system's when embedded.
    fn summarize_cpu(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "\nsimulator CPU: {:.1} s of {:.1} s wall on {} cpus ({:.0}% of the machine, {:.0} µs per request){}",
            self.resources.simulator_cpu_s,
            self.resources.wall_s,
            self.machine.cpus,
            self.resources.simulator_cpu_share * 100.0,
            self.resources.simulator_cpu_us_per_request,
            self.resources.system_cpu()
        );
    }
}

fn summarize_reshards(reshards: &[ReshardRun], out: &mut String) {
    let _ = writeln!(out, "\nreshards: {}", reshards.len());
    for r in reshards {
        let n = |name: &str| r.figure(name).unwrap_or(0.0);
        let span = match (r.started_s, r.ended_s) {
            (Some(a), Some(b)) => format!("{a:.1} s to {b:.1} s"),
            (Some(a), None) => format!("from {a:.1} s"),
            _ => "never started".into(),
        };
        let phases: Vec<String> = r
            .phases
            .iter()
            .map(|(name, a, b)| format!("{name} {:.0} ms", (b - a) * 1000.0))
            .collect();
        let audits_ok = r.audits.iter().filter(|a| a.ok).count();
        let _ = writeln!(
            out,
            "  to {} shards (line {}): {span} · moved {:.0} of {:.0} accounts ({:.1}%), {:.0} keys, {:.0} bytes · {} · requests waited {:.0}, refused {:.0} · longest freeze {:.0} ms · audits {audits_ok}/{} passed",
            r.to,
            r.line,
            n("accounts_moved"),
            n("accounts_scanned"),
            n("moved_share") * 100.0,
            n("keys_copied"),
            n("bytes_copied"),
            phases.join(", "),
            n("requests_waited"),
            n("requests_refused"),
            n("longest_freeze_ms"),
            r.audits.len()
        );
        for problem in r.problems() {
            let _ = writeln!(out, "    {problem}");
        }
    }
}

fn summarize_faults(f: &Faults, out: &mut String) {
    let secs = |v: Option<f64>| v.map_or("-".to_string(), |s| format!("{s:.1} s"));
    let _ = writeln!(
        out,
        "\nfaults: {} · inside their spans {} requests, {:.3}% errors · outside {} requests, {:.3}% errors",
        f.faults.len(),
        f.inside.requests,
        f.inside_error_rate * 100.0,
        f.outside.requests,
        f.outside_error_rate * 100.0
    );
    for r in &f.faults {
        let _ = writeln!(
            out,
            "  {:<16} {:<9} at {:>6}  down {:>6}  back {:>6}  first accepted +{:<6} recovered +{:<6} {} req {} err  pending {} cleared +{}  audit {}{}",
            r.name,
            r.step.as_deref().unwrap_or(&r.action),
            secs(r.started_s),
            secs(r.hit_s),
            secs(r.healed_s),
            secs(r.first_accepted_after_s),
            secs(r.recovered_after_s),
            r.counts.requests,
            r.counts.errors,
            r.pending_at_heal.map_or("-".to_string(), |p| p.to_string()),
            secs(r.pending_cleared_after_s),
            match r.audit_ok {
                Some(true) => "passed",
                Some(false) => "FAILED",
                None => "-",
            },
            if r.notes.is_empty() {
                String::new()
            } else {
                format!("  ({})", r.notes.join("; "))
            }
        );
    }
}

/// Answers other than an accepted transfer, by status and code.
fn summarize_outcomes(outcomes: &[OutcomeRow], out: &mut String) {
    if outcomes.is_empty() {
        return;
    }
    let _ = writeln!(out, "\n{:<8} {:<32} {:>9}", "status", "code", "count");
    for o in outcomes {
        let _ = writeln!(out, "{:<8} {:<32} {:>9}", o.status, o.code, o.count);
    }
}

/// One line per consumer of the event pipeline.
fn summarize_pipeline(p: &shardpay_reference::pipeline::PipelineReport, out: &mut String) {
    for c in &p.consumers {
        let _ = writeln!(
            out,
            "events: {} outbox rows, {} published · {}: {} applied, {} duplicates suppressed, {} unapplied{} · pipeline {}",
            p.outbox_rows,
            p.published,
            c.group,
            c.applied,
            c.duplicates_suppressed,
            p.unapplied.get(&c.group).copied().unwrap_or(0),
            if c.lag.count > 0 {
                format!(
                    " · commit-to-consume lag p50 {:.0} ms, p99 {:.0} ms",
                    c.lag.p50_ms, c.lag.p99_ms
                )
            } else {
                String::new()
            },
            if p.complete { "complete" } else { "INCOMPLETE" }
        );
    }
}

/// What the simulator's webhook receiver got, against what the system says
/// it delivered.
fn summarize_webhooks(w: &crate::webhooks::WebhookReport, out: &mut String) {
    let _ = writeln!(
        out,
        "webhooks: {} accounts hooked · {} deliveries, {} distinct, {} repeats, {} bad signatures · system delivered {}, dead-lettered {} · {}",
        w.hooked_accounts,
        w.deliveries,
        w.distinct,
        w.repeats,
        w.bad_signatures,
        w.system_delivered,
        w.system_dead_lettered,
        if w.ok { "ok" } else { "FAILED" }
    );
}

/// The fraud service's precision and recall on labelled fraud-heavy
/// transfers, when the run sent any.
fn summarize_fraud(f: &crate::accounting::Fraud, out: &mut String) {
    let fraudulent = f.fraudulent_allowed + f.fraudulent_refused;
    let legitimate = f.legitimate_allowed + f.legitimate_refused;
    if fraudulent + legitimate == 0 {
        return;
    }
    let share = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.3}"));
    let _ = writeln!(
        out,
        "fraud: precision {} · recall {} ({} of {} labelled fraudulent transfers refused, {} of {} legitimate ones)",
        share(f.precision),
        share(f.recall),
        f.fraudulent_refused,
        fraudulent,
        f.legitimate_refused,
        legitimate
    );
}

/// The run's transfers per second against the raw databases', per kind.
fn summarize_baseline(b: &Baseline, out: &mut String) {
    let _ = writeln!(
        out,
        "\nagainst the raw databases (same concurrency, no HTTP):"
    );
    for r in &b.ratios {
        let _ = writeln!(
            out,
            "  {}: services {:.0}/s, databases {:.0}/s: {:.0}%",
            r.kind,
            r.service_tps,
            r.database_tps,
            r.ratio * 100.0
        );
    }
}

/// Each threshold's verdict, actual figure and limit.
fn summarize_thresholds(thresholds: &[ThresholdResult], out: &mut String) {
    if thresholds.is_empty() {
        return;
    }
    let _ = writeln!(out, "\nthresholds:");
    for th in thresholds {
        let _ = writeln!(
            out,
            "  {} {}: {} (limit {})",
            if th.ok { "ok    " } else { "FAILED" },
            th.name,
            th.actual,
            th.limit
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn timeline(warmup_s: u64, a: Vec<u64>, b: Vec<u64>) -> Timeline {
        Timeline {
            interval_s: 1,
            warmup_s,
            shards: [("0".to_string(), a), ("1".to_string(), b)].into(),
            errors: Vec::new(),
            requests: Vec::new(),
            p99_ms: Vec::new(),
            drift: None,
        }
    }

    #[test]
    fn drift_compares_the_last_tenth_of_the_measured_window_with_the_first() {
        // 3 s of warm-up (ignored, however fast), 20 measured seconds that
        // slow from 100/s to 90/s over the shards, and a partial last one.
        let mut a = vec![500, 500, 500];
        let mut b = vec![0, 0, 0];
        for s in 0..20 {
            let total = if s < 2 {
                100
            } else if s >= 18 {
                90
            } else {
                95
            };
            a.push(total - 40);
            b.push(40);
        }
        a.push(1);
        b.push(0);
        let d = timeline(3, a.clone(), b.clone()).drift().unwrap();
        assert_eq!((d.first_tps, d.last_tps, d.tenth_s), (100.0, 90.0, 2));
        assert!((d.change + 0.1).abs() < 1e-9, "{}", d.change);
        assert!(d.describe().contains("(-10.0%)"), "{}", d.describe());
        // Under ten whole measured seconds, or none accepted at first:
        // nothing to say.
        assert_eq!(timeline(15, a, b).drift(), None);
        assert_eq!(timeline(0, vec![0; 30], vec![0; 30]).drift(), None);
        assert_eq!(timeline(0, Vec::new(), Vec::new()).drift(), None);
    }

    #[test]
    fn merged_reports_equal_the_histogram_of_all_samples() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let (mut a, mut b, mut all) = (new_histogram(), new_histogram(), new_histogram());
        for i in 0..20_000 {
            // Two machines: one fast, one slow with a long tail.
            let us: u64 = if i % 2 == 0 {
                rng.random_range(200..5_000)
            } else {
                rng.random_range(1_000..2_000_000)
            };
            let target = if i % 2 == 0 { &mut a } else { &mut b };
            target.record(us).unwrap();
            all.record(us).unwrap();
        }
        // Through JSON, as two report files would carry them.
        let a_json = serde_json::to_string(&Hist::of(&a)).unwrap();
        let b_json = serde_json::to_string(&Hist::of(&b)).unwrap();
        let a_back: Hist = serde_json::from_str(&a_json).unwrap();
        let b_back: Hist = serde_json::from_str(&b_json).unwrap();
        let merged = a_back.merge(&b_back).unwrap().decode().unwrap();
        assert_eq!(merged.len(), all.len());
        let got: Vec<_> = merged
            .iter_recorded()
            .map(|v| (v.value_iterated_to(), v.count_at_value()))
            .collect();
        let want: Vec<_> = all
            .iter_recorded()
            .map(|v| (v.value_iterated_to(), v.count_at_value()))
            .collect();
        assert_eq!(got, want);
        assert_eq!(merged, all);
        assert_eq!(Hist::of(&merged), Hist::of(&all));
        // And a merge is not a no-op: each part alone differs.
        assert_ne!(Hist::of(&a).p99_us, Hist::of(&all).p99_us);
    }
}

/// Merges reports of runs that drove one system together (from several
/// machines, say): histograms merge exactly, counts and timelines add up,
/// the books and audits must all have passed, and the first report's
/// scenario thresholds are judged again on the merged figures.
pub fn merge(reports: &[Report]) -> anyhow::Result<Report> {
    let Some(first) = reports.first() else {
        bail!("give at least one report to merge");
    };
    let mut out = first.clone();
    for r in &reports[1..] {
        if r.scenario.name != first.scenario.name {
            bail!(
                "cannot merge runs of different scenarios ({} and {})",
                first.scenario.name,
                r.scenario.name
            );
        }
        let merge_map = |into: &mut BTreeMap<String, Hist>,
                         from: &BTreeMap<String, Hist>|
         -> anyhow::Result<()> {
            for (k, h) in from {
                let merged = match into.get(k) {
                    Some(mine) => mine.merge(h)?,
                    None => h.clone(),
                };
                into.insert(k.clone(), merged);
            }
            Ok(())
        };
        out.latency.all = out.latency.all.merge(&r.latency.all)?;
        merge_map(&mut out.latency.kinds, &r.latency.kinds)?;
        merge_map(&mut out.latency.shards, &r.latency.shards)?;
        merge_map(&mut out.latency.pairs, &r.latency.pairs)?;
        add_counts(&mut out.totals.counts, &r.totals.counts);
        for (k, c) in &r.by_kind {
            add_counts(out.by_kind.entry(k.clone()).or_default(), c);
        }
        for (shard, series) in &r.timeline.shards {
            add_series(
                out.timeline.shards.entry(shard.clone()).or_default(),
                series,
            );
        }
        add_series(&mut out.timeline.errors, &r.timeline.errors);
        add_series(&mut out.timeline.requests, &r.timeline.requests);
        // Per-second p99s and fault windows do not add up across runs.
        out.timeline.p99_ms.clear();
        out.faults = None;
        for o in &r.outcomes {
            match out
                .outcomes
                .iter_mut()
                .find(|m| m.status == o.status && m.code == o.code)
            {
                Some(m) => m.count += o.count,
                None => out.outcomes.push(o.clone()),
            }
        }
        let run = &mut out.run;
        run.target = format!("{} + {}", run.target, r.run.target);
        run.operations += r.run.operations;
        run.users += r.run.users;
        run.goose_requests += r.run.goose_requests;
        run.accounts += r.run.accounts;
        run.measured_s = run.measured_s.max(r.run.measured_s);
        run.interrupted |= r.run.interrupted;
        run.schedule = match (run.schedule, r.run.schedule) {
            (Some(a), Some(b)) => Some(ScheduleLag {
                due: a.due + b.due,
                unsent: a.unsent + b.unsent,
                late: a.late + b.late,
                worst_lag_ms: a.worst_lag_ms.max(b.worst_lag_ms),
            }),
            (a, b) => a.or(b),
        };
        out.machine.cpus += r.machine.cpus;
        out.machine.hostname = format!("{} + {}", out.machine.hostname, r.machine.hostname);
        let a = &mut out.accounting;
        a.ok &= r.accounting.ok;
        a.checks.extend(r.accounting.checks.iter().cloned());
        a.transfers_sent += r.accounting.transfers_sent;
        a.transfers_accepted += r.accounting.transfers_accepted;
        a.transfers_declined += r.accounting.transfers_declined;
        a.settled_after_run += r.accounting.settled_after_run;
        a.resent_unanswered += r.accounting.resent_unanswered;
        a.unsettled += r.accounting.unsettled;
        a.retry_groups += r.accounting.retry_groups;
        a.violations.extend(r.accounting.violations.iter().cloned());
        out.audit.ok &= r.audit.ok;
        if !r.audit.ok {
            out.audit.summary = format!("{}; {}", out.audit.summary, r.audit.summary);
        }
        out.resources.simulator_cpu_s += r.resources.simulator_cpu_s;
        out.resources.wall_s = out.resources.wall_s.max(r.resources.wall_s);
        out.webhooks = match (out.webhooks.take(), &r.webhooks) {
            (Some(mut w), Some(v)) => {
                w.hooked_accounts += v.hooked_accounts;
                w.deliveries += v.deliveries;
                w.distinct += v.distinct;
                w.repeats += v.repeats;
                w.bad_signatures += v.bad_signatures;
                w.system_delivered += v.system_delivered;
                w.system_dead_lettered += v.system_dead_lettered;
                w.ok &= v.ok;
                Some(w)
            }
            _ => None,
        };
        out.pipeline = match (out.pipeline.take(), &r.pipeline) {
            (Some(mut p), Some(q)) => {
                merge_pipeline(&mut p, q);
                Some(p)
            }
            _ => None,
        };
    }
    out.outcomes.sort_by(|a, b| b.count.cmp(&a.count));
    let c = out.totals.counts;
    let seconds = out.run.measured_s.max(1e-3);
    out.totals.tps = c.accepted as f64 / seconds;
    out.totals.rps = c.requests as f64 / seconds;
    out.totals.error_rate = if c.requests == 0 {
        0.0
    } else {
        c.errors as f64 / c.requests as f64
    };
    out.resources.simulator_cpu_share =
        out.resources.simulator_cpu_s / (out.resources.wall_s * out.machine.cpus as f64).max(1e-9);
    out.resources.simulator_cpu_us_per_request =
        out.resources.simulator_cpu_s * 1e6 / (c.requests as f64).max(1.0);
    // Busy shares of different machines do not add up to one figure.
    out.resources.machine_busy = None;
    out.timeline.drift = out.timeline.drift();
    let scenario = crate::scenario::parse(&out.scenario.source, &out.scenario.file)
        .map_err(|e| anyhow::anyhow!("the report's scenario no longer reads: {e}"))?;
    crate::run::judge(&scenario, &mut out);
    Ok(out)
}

/// Adds another system's pipeline figures. Counts add up; lag
/// percentiles are not mergeable from summaries, so the worse is kept.
fn merge_pipeline(
    into: &mut shardpay_reference::pipeline::PipelineReport,
    from: &shardpay_reference::pipeline::PipelineReport,
) {
    into.outbox_rows += from.outbox_rows;
    into.outbox_backlog += from.outbox_backlog;
    into.published += from.published;
    into.relay_failures += from.relay_failures;
    into.complete &= from.complete;
    for (group, n) in &from.unapplied {
        *into.unapplied.entry(group.clone()).or_default() += n;
    }
    for c in &from.consumers {
        match into.consumers.iter_mut().find(|x| x.group == c.group) {
            Some(x) => {
                x.received += c.received;
                x.applied += c.applied;
                x.duplicates_suppressed += c.duplicates_suppressed;
                x.lag.count += c.lag.count;
                x.lag.p50_ms = x.lag.p50_ms.max(c.lag.p50_ms);
                x.lag.p99_ms = x.lag.p99_ms.max(c.lag.p99_ms);
                x.lag.max_ms = x.lag.max_ms.max(c.lag.max_ms);
            }
            None => into.consumers.push(c.clone()),
        }
    }
}

fn add_counts(into: &mut Counts, from: &Counts) {
    into.requests += from.requests;
    into.accepted += from.accepted;
    into.replayed += from.replayed;
    into.declined += from.declined;
    into.errors += from.errors;
    into.unauthorized += from.unauthorized;
    into.rate_limited += from.rate_limited;
}

fn add_series(into: &mut Vec<u64>, from: &[u64]) {
    if into.len() < from.len() {
        into.resize(from.len(), 0);
    }
    for (a, b) in into.iter_mut().zip(from) {
        *a += b;
    }
}

/// Reports written before the protocol was recorded all ran the saga.
pub(crate) fn saga() -> String {
    "saga".into()
}
