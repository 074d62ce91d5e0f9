//! Reports side by side. When shard counts differ, scaling efficiency says
//! how much of the added shards turned into throughput: (TPS / base TPS) /
//! (shards / base shards), the base being the report with the fewest
//! shards. 1.0 is linear scaling.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::report::Report;

pub const SCHEMA: &str = "shardpay.compare/1";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Row {
    pub label: String,
    pub scenario: String,
    pub shards: usize,
    pub backend: String,
    /// "saga" or "xa".
    #[serde(default = "crate::report::saga")]
    pub cross_shard: String,
    pub model: String,
    pub machine: String,
    pub tps: f64,
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    /// p99 per kind, in milliseconds.
    pub p99_ms_by_kind: std::collections::BTreeMap<String, f64>,
    pub error_rate: f64,
    pub audit_ok: bool,
    pub accounting_ok: bool,
    pub passed: bool,
    /// Against the report with the fewest shards; absent when all reports
    /// have the same count.
    pub scaling_efficiency: Option<f64>,
    pub tps_vs_base: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Comparison {
    pub schema: String,
    pub rows: Vec<Row>,
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

pub fn compare(reports: &[(String, Report)]) -> Comparison {
    let base = reports
        .iter()
        .min_by_key(|(_, r)| r.run.shards)
        .map(|(_, r)| (r.run.shards, r.totals.tps));
    let varied = reports
        .iter()
        .any(|(_, r)| Some(r.run.shards) != base.map(|b| b.0));
    let rows = reports
        .iter()
        .map(|(label, r)| {
            let (base_shards, base_tps) = base.expect("at least one report");
            let tps_vs_base = if base_tps > 0.0 {
                r.totals.tps / base_tps
            } else {
                0.0
            };
            Row {
                label: label.clone(),
                scenario: r.scenario.name.clone(),
                shards: r.run.shards,
                backend: r.run.backend.clone(),
                cross_shard: r.run.cross_shard.clone(),
                model: r.scenario.model.clone(),
                machine: format!("{} cpus, {}", r.machine.cpus, r.machine.hostname),
                tps: r.totals.tps,
                rps: r.totals.rps,
                p50_ms: ms(r.latency.all.p50_us),
                p99_ms: ms(r.latency.all.p99_us),
                p999_ms: ms(r.latency.all.p999_us),
                p99_ms_by_kind: r
                    .latency
                    .kinds
                    .iter()
                    .map(|(k, h)| (k.clone(), ms(h.p99_us)))
                    .collect(),
                error_rate: r.totals.error_rate,
                audit_ok: r.audit.ok,
                accounting_ok: r.accounting.ok,
                passed: r.passed,
                scaling_efficiency: varied
                    .then(|| tps_vs_base / (r.run.shards as f64 / base_shards as f64)),
                tps_vs_base,
            }
        })
        .collect();
    Comparison {
        schema: SCHEMA.into(),
        rows,
    }
}

impl Comparison {
    /// A Markdown table; also what the terminal shows.
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "| report | scenario | shards | backend | cross-shard | TPS | x base | scaling eff. | p50 ms | p99 ms | p99.9 ms | errors | audit | passed |"
        );
        let _ = writeln!(
            out,
            "|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|"
        );
        for r in &self.rows {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {:.0} | {:.2} | {} | {:.2} | {:.2} | {:.2} | {:.3}% | {} | {} |",
                r.label,
                r.scenario,
                r.shards,
                r.backend,
                r.cross_shard,
                r.tps,
                r.tps_vs_base,
                r.scaling_efficiency
                    .map(|e| format!("{:.0}%", e * 100.0))
                    .unwrap_or_else(|| "-".into()),
                r.p50_ms,
                r.p99_ms,
                r.p999_ms,
                r.error_rate * 100.0,
                if r.audit_ok && r.accounting_ok { "passed" } else { "FAILED" },
                if r.passed { "yes" } else { "no" },
            );
        }
        let kinds: std::collections::BTreeSet<&String> = self
            .rows
            .iter()
            .flat_map(|r| r.p99_ms_by_kind.keys())
            .collect();
        if !kinds.is_empty() {
            let _ = writeln!(out, "\np99 ms by kind:\n");
            let _ = write!(out, "| report |");
            for k in &kinds {
                let _ = write!(out, " {k} |");
            }
            let _ = write!(out, "\n|---|");
            for _ in &kinds {
                let _ = write!(out, "---:|");
            }
            let _ = writeln!(out);
            for r in &self.rows {
                let _ = write!(out, "| {} |", r.label);
                for k in &kinds {
                    match r.p99_ms_by_kind.get(*k) {
                        Some(v) => {
                            let _ = write!(out, " {v:.2} |");
                        }
                        None => {
                            let _ = write!(out, " - |");
                        }
                    }
                }
                let _ = writeln!(out);
            }
        }
        out
    }
}
