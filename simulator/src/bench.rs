//! `shardpay bench`: the full path against the storage ceiling. Each of its
//! runs drives one kind of transfer through the in-process system (HTTP,
//! auth, idempotency keys, fraud, the outbox) and measures the raw
//! baseline of that kind on the same storage just before, at the same
//! concurrency. This module turns those runs' reports into one table of
//! ratios, and says which goals each row meets.

use std::fmt::Write as _;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::report::Report;

/// The services' throughput as a share of the raw baseline's that a row
/// is held to.
pub const GOAL_RATIO: f64 = 0.75;
/// The services' p99 against the raw baseline's p99, at most.
pub const GOAL_P99_FACTOR: f64 = 2.0;

/// One run of `shardpay bench`, against its baseline.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BenchRow {
    pub scenario: String,
    /// The kind of transfer measured: same_shard or cross_shard.
    pub kind: String,
    pub backend: String,
    pub cross_shard: String,
    pub shards: usize,
    pub users: u32,
    /// Accepted transfers per second through the services.
    pub service_tps: f64,
    /// The same transactions straight to the storage.
    pub raw_tps: f64,
    pub ratio: f64,
    pub service_p99_ms: f64,
    pub raw_p99_ms: f64,
    /// CPU of the in-process system per accepted transfer, microseconds.
    pub system_cpu_us_per_transfer: Option<f64>,
    /// The simulator's CPU per request, microseconds.
    pub simulator_cpu_us_per_request: f64,
    pub system_threads: Option<usize>,
    /// The machine's CPUs, and its busy share during the services' run and
    /// during the raw baseline (every process on it).
    #[serde(default)]
    pub cpus: usize,
    #[serde(default)]
    pub service_machine_busy: Option<f64>,
    #[serde(default)]
    pub raw_machine_busy: Option<f64>,
    /// Microseconds of the whole machine's CPU per transfer, busy share ×
    /// CPUs over the rate: through the services over the run's measured
    /// window, and raw over the baseline's seconds.
    #[serde(default)]
    pub service_machine_cpu_us: Option<f64>,
    #[serde(default)]
    pub raw_machine_cpu_us: Option<f64>,
    /// Whether the run itself passed (books, audit, thresholds).
    pub run_passed: bool,
    /// The run's report folder.
    pub report: PathBuf,
}

impl BenchRow {
    /// The row of a run that measured a baseline; `None` when it has none.
    pub fn of(report: &Report, dir: PathBuf) -> Option<BenchRow> {
        let baseline = report.baseline.as_ref()?;
        let ratio = baseline.ratios.first()?;
        let raw = baseline.results.first()?;
        let service_p99 = report
            .latency
            .kinds
            .get(&ratio.kind)
            .unwrap_or(&report.latency.all)
            .p99_us;
        let operations = report.run.operations.max(1) as f64;
        let cpus = report.machine.cpus as f64;
        let service_machine_cpu_us = report
            .resources
            .machine_busy
            .filter(|_| ratio.service_tps > 0.0)
            .map(|b| b * cpus * 1e6 / ratio.service_tps);
        let raw_machine_cpu_us = raw
            .machine_busy
            .filter(|_| raw.tps > 0.0)
            .map(|b| b * cpus * 1e6 / raw.tps);
        Some(BenchRow {
            scenario: report.scenario.name.clone(),
            kind: ratio.kind.clone(),
            backend: report.run.backend.clone(),
            cross_shard: report.run.cross_shard.clone(),
            shards: report.run.shards,
            users: report.run.users,
            service_tps: ratio.service_tps,
            raw_tps: ratio.database_tps,
            ratio: ratio.ratio,
            service_p99_ms: service_p99 as f64 / 1000.0,
            raw_p99_ms: raw.latency.p99_us as f64 / 1000.0,
            // The system's CPU covers the whole load, warm-up included: over
            // every operation sent (one transfer each in a bench scenario).
            system_cpu_us_per_transfer: report.resources.system_cpu_s.map(|s| s * 1e6 / operations),
            simulator_cpu_us_per_request: report.resources.simulator_cpu_us_per_request,
            system_threads: report.resources.system_threads,
            cpus: report.machine.cpus,
            service_machine_busy: report.resources.machine_busy,
            raw_machine_busy: raw.machine_busy,
            service_machine_cpu_us,
            raw_machine_cpu_us,
            run_passed: report.passed,
            report: dir,
        })
    }

    pub fn meets_ratio(&self) -> bool {
        self.ratio >= GOAL_RATIO
    }

    pub fn meets_p99(&self) -> bool {
        self.service_p99_ms <= GOAL_P99_FACTOR * self.raw_p99_ms
    }

    /// Microseconds of the whole machine's CPU per transfer through the
    /// services and raw.
    pub fn machine_cpu_us(&self) -> Option<(f64, f64)> {
        Some((self.service_machine_cpu_us?, self.raw_machine_cpu_us?))
    }

    /// What stands between the row and the ratio goal, from its figures:
    /// when both runs kept the machine busy, CPU bounds the ratio at raw's
    /// CPU per transfer over the services'; when the raw baseline left the
    /// machine idle, it waited on storage, and the services could catch up
    /// only by waiting less. `None` when the goal is met or unmeasured.
    pub fn in_the_way(&self) -> Option<String> {
        if self.meets_ratio() {
            return None;
        }
        let (service_us, raw_us) = self.machine_cpu_us()?;
        let (service_busy, raw_busy) = (self.service_machine_busy?, self.raw_machine_busy?);
        let kind = match self.kind.as_str() {
            "cross_shard" => format!("cross_shard ({})", self.cross_shard),
            k => k.to_string(),
        };
        let figures = format!(
            "the machine ({} CPUs) was {:.0}% busy through the services and {:.0}% raw; \
             a transfer took {:.0} µs of its CPU through the services (system, simulator \
             and, on MySQL, the shard servers) against {:.0} µs raw",
            self.cpus,
            service_busy * 100.0,
            raw_busy * 100.0,
            service_us,
            raw_us
        );
        let bound = raw_us / service_us;
        Some(
            if service_busy >= BUSY && raw_busy >= BUSY && bound >= GOAL_RATIO {
                format!(
                    "- {} on {}: busy, but not held by CPU alone: {figures}, so CPU would \
                 allow about {bound:.2}, above the goal; the rest of the gap is waits \
                 (round trips, commits, queues).",
                    kind, self.backend
                )
            } else if service_busy >= BUSY && raw_busy >= BUSY {
                format!(
                    "- {} on {}: CPU-bound: {figures}. A transfer through the services costs \
                 {:.1}× the CPU of a raw one, so with the whole machine each they would run \
                 at about {bound:.2} of raw's rate whatever the storage does: the goal of \
                 {GOAL_RATIO} needs the services' CPU per transfer cut to {:.0} µs. The \
                 README's performance section profiles where it goes.",
                    kind,
                    self.backend,
                    service_us / raw_us,
                    raw_us / GOAL_RATIO
                )
            } else if raw_busy < BUSY {
                format!(
                    "- {} on {}: the raw baseline waited on the storage: {figures}. The services \
                 are short of it by waits (round trips, commits) as much as by CPU.",
                    kind, self.backend
                )
            } else {
                format!(
                    "- {} on {}: the services waited: {figures}. They left the machine idle \
                 while the raw baseline kept it busy, so something in the path waits \
                 (a pool, a lock, a commit) rather than computes.",
                    kind, self.backend
                )
            },
        )
    }
}

/// The machine's busy share from which a bench run counts as held by CPU:
/// a little under the reports' CPU-bound mark, since a closed run at full
/// concurrency still idles between a commit and the next request.
pub const BUSY: f64 = 0.8;

/// The rows as a Markdown table, with the goals each meets.
pub fn table(rows: &[BenchRow]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| backend | kind | users | services/s | raw/s | ratio (goal ≥ {GOAL_RATIO}) | p99 services ms | p99 raw ms | p99 (goal ≤ {GOAL_P99_FACTOR}× raw) | system CPU µs/transfer | simulator CPU µs/request | run |"
    );
    let _ = writeln!(
        out,
        "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---|"
    );
    for r in rows {
        let mark = |ok: bool| if ok { "met" } else { "MISSED" };
        let kind = if r.kind == "cross_shard" {
            format!("cross_shard ({})", r.cross_shard)
        } else {
            r.kind.clone()
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.0} | {:.0} | {:.2} {} | {:.2} | {:.2} | {:.1}× {} | {} | {:.0} | {} |",
            r.backend,
            kind,
            r.users,
            r.service_tps,
            r.raw_tps,
            r.ratio,
            mark(r.meets_ratio()),
            r.service_p99_ms,
            r.raw_p99_ms,
            r.service_p99_ms / r.raw_p99_ms.max(1e-3),
            mark(r.meets_p99()),
            r.system_cpu_us_per_transfer
                .map_or("-".into(), |v| format!("{v:.0}")),
            r.simulator_cpu_us_per_request,
            if r.run_passed { "passed" } else { "FAILED" }
        );
    }
    let reasons: Vec<String> = rows.iter().filter_map(BenchRow::in_the_way).collect();
    if !reasons.is_empty() {
        let _ = writeln!(out, "\nWhat stands in the way of the ratio goal:\n");
        for reason in reasons {
            let _ = writeln!(out, "{reason}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(ratio: f64, service_p99_ms: f64, raw_p99_ms: f64) -> BenchRow {
        BenchRow {
            scenario: "same-shard".into(),
            kind: "same_shard".into(),
            backend: "sqlite".into(),
            cross_shard: "saga".into(),
            shards: 4,
            users: 64,
            service_tps: 1000.0 * ratio,
            raw_tps: 1000.0,
            ratio,
            service_p99_ms,
            raw_p99_ms,
            system_cpu_us_per_transfer: Some(300.0),
            simulator_cpu_us_per_request: 40.0,
            system_threads: Some(2),
            cpus: 2,
            service_machine_busy: Some(0.95),
            raw_machine_busy: Some(0.95),
            service_machine_cpu_us: Some(1.9e6 / (1000.0 * ratio)),
            raw_machine_cpu_us: Some(1900.0),
            run_passed: true,
            report: PathBuf::from("reports/x"),
        }
    }

    #[test]
    fn a_row_meets_the_goals_only_inside_both_limits() {
        assert!(row(0.75, 20.0, 10.0).meets_ratio());
        assert!(row(0.75, 20.0, 10.0).meets_p99());
        assert!(!row(0.74, 20.0, 10.0).meets_ratio());
        assert!(!row(0.9, 20.1, 10.0).meets_p99());
        let table = table(&[row(0.5, 30.0, 10.0)]);
        assert!(table.contains("0.50 MISSED"), "{table}");
        assert!(table.contains("3.0× MISSED"), "{table}");
    }

    #[test]
    fn a_missed_ratio_is_explained_by_where_the_machine_spent_its_cpu() {
        // 500/s and 1000/s with 2 CPUs 95% busy: 3,800 µs against 1,900 µs
        // a transfer, so CPU bounds the ratio at 0.50.
        let cpu_bound = row(0.5, 30.0, 10.0);
        let (service_us, raw_us) = cpu_bound.machine_cpu_us().unwrap();
        assert_eq!((service_us.round(), raw_us.round()), (3800.0, 1900.0));
        let why = cpu_bound.in_the_way().unwrap();
        assert!(why.contains("CPU-bound"), "{why}");
        assert!(why.contains("costs 2.0× the CPU"), "{why}");
        assert!(why.contains("at about 0.50 of raw's rate"), "{why}");
        assert!(why.contains("cut to 2533 µs"), "{why}");
        assert!(table(&[cpu_bound]).contains("What stands in the way"));

        // A raw baseline that left the machine idle waited on its storage.
        let mut waiting = row(0.5, 30.0, 10.0);
        waiting.raw_machine_busy = Some(0.3);
        let why = waiting.in_the_way().unwrap();
        assert!(why.contains("waited on the storage"), "{why}");

        // Services that idled while raw kept the machine busy waited.
        let mut idle = row(0.5, 30.0, 10.0);
        idle.service_machine_busy = Some(0.4);
        assert!(idle.in_the_way().unwrap().contains("the services waited"));

        // Busy, but CPU alone would allow more than the goal: the gap is
        // waits, and the line does not claim a bound below the goal.
        let mut waits = row(0.7, 30.0, 10.0);
        waits.service_machine_cpu_us = Some(2000.0);
        let why = waits.in_the_way().unwrap();
        assert!(why.contains("allow about 0.95, above the goal"), "{why}");
        assert!(!why.contains("of raw's rate"), "{why}");

        // Nothing to explain when the goal is met or a figure is missing.
        assert_eq!(row(0.8, 10.0, 10.0).in_the_way(), None);
        let mut unmeasured = row(0.5, 30.0, 10.0);
        unmeasured.raw_machine_cpu_us = None;
        assert_eq!(unmeasured.in_the_way(), None);
        assert!(!table(&[row(0.8, 10.0, 10.0)]).contains("What stands in the way"));
    }
}
