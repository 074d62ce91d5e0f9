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
        let accepted = report.totals.counts.accepted.max(1) as f64;
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
            system_cpu_us_per_transfer: report.resources.system_cpu_s.map(|s| s * 1e6 / accepted),
            simulator_cpu_us_per_request: report.resources.simulator_cpu_us_per_request,
            system_threads: report.resources.system_threads,
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
}

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
}
