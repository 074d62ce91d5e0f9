//! Reports side by side. When shard counts differ, scaling efficiency says
//! how much of the added shards turned into throughput: (TPS / base TPS) /
//! (shards / base shards), the base being the report with the fewest
//! shards that sends its mix as written (a one-shard run of a mix with
//! cross-shard pairs is not). 1.0 is linear scaling.
//!
//! Each row names its traffic mix, and what of it the run could do as
//! written: on one shard no transfer crosses shards, so a one-shard run of
//! a cross-shard scenario is labelled as such and is not the base of the
//! others' scaling. Each row also says whether the machine's CPU was
//! saturated, where more shards cannot add throughput.

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
    /// Against the base (see the module's doc); absent when all reports
    /// that send their mix as written have the same count, and for a row
    /// with `ran_as`.
    pub scaling_efficiency: Option<f64>,
    pub tps_vs_base: f64,
    /// The scenario's traffic mix, e.g. "cross_shard 100%".
    #[serde(default)]
    pub mix: String,
    /// Set when the run could not send its mix as written: "one shard: no
    /// transfer crosses shards".
    #[serde(default)]
    pub ran_as: Option<String>,
    /// Share of the machine's CPU busy during the load, when measured.
    #[serde(default)]
    pub cpu_busy: Option<f64>,
    /// cpu_busy at or above report::SATURATED.
    #[serde(default)]
    pub cpu_saturated: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Comparison {
    pub schema: String,
    pub rows: Vec<Row>,
    /// What a reader must know before comparing the rows: mixes that
    /// differ, runs that could not send their mix, saturated steps.
    #[serde(default)]
    pub notes: Vec<String>,
}

/// A report's traffic mix as text, from the scenario file it records;
/// the kinds it measured when the file no longer parses.
fn mix_of(r: &Report) -> (String, bool) {
    match crate::scenario::parse(&r.scenario.source, &r.scenario.file) {
        Ok(s) => {
            let total = s.mix.total().max(1) as f64;
            let parts: Vec<String> = crate::Kind::ALL
                .iter()
                .filter(|k| s.mix.weight(**k) > 0)
                .map(|k| {
                    format!(
                        "{} {:.0}%",
                        k.as_str(),
                        s.mix.weight(*k) as f64 * 100.0 / total
                    )
                })
                .collect();
            // Every kind but same_shard draws some pairs across shards.
            (parts.join(", "), s.mix.same_shard != s.mix.total())
        }
        Err(_) => {
            let kinds: Vec<&str> = r.latency.kinds.keys().map(String::as_str).collect();
            (kinds.join(", "), kinds.iter().any(|k| *k != "same_shard"))
        }
    }
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

pub fn compare(reports: &[(String, Report)]) -> Comparison {
    let mixes: Vec<(String, bool)> = reports.iter().map(|(_, r)| mix_of(r)).collect();
    // A run crosses shards as written unless its mix needs pairs across
    // shards and it had one shard.
    let as_written = |i: usize| !(mixes[i].1 && reports[i].1.run.shards == 1);
    let base = (0..reports.len())
        .filter(|i| as_written(*i))
        .min_by_key(|i| reports[*i].1.run.shards)
        .or_else(|| (0..reports.len()).min_by_key(|i| reports[*i].1.run.shards))
        .map(|i| (reports[i].1.run.shards, reports[i].1.totals.tps));
    // Scaling is read only between runs that send their mix as written.
    let varied = (0..reports.len())
        .filter(|i| as_written(*i))
        .any(|i| Some(reports[i].1.run.shards) != base.map(|b| b.0));
    let rows: Vec<Row> = reports
        .iter()
        .enumerate()
        .map(|(i, (label, r))| {
            let (base_shards, base_tps) = base.expect("at least one report");
            let tps_vs_base = if base_tps > 0.0 {
                r.totals.tps / base_tps
            } else {
                0.0
            };
            let ran_as =
                (!as_written(i)).then(|| "one shard: no transfer crosses shards".to_string());
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
                scaling_efficiency: (varied && ran_as.is_none())
                    .then(|| tps_vs_base / (r.run.shards as f64 / base_shards as f64)),
                tps_vs_base,
                mix: mixes[i].0.clone(),
                ran_as,
                cpu_busy: r.resources.machine_busy,
                cpu_saturated: r.resources.saturated(),
            }
        })
        .collect();
    let mut notes = Vec::new();
    let distinct: std::collections::BTreeSet<&str> = rows.iter().map(|r| r.mix.as_str()).collect();
    if distinct.len() > 1 {
        notes.push(format!(
            "the runs drive different traffic mixes ({}): their throughput is not the same work",
            distinct.into_iter().collect::<Vec<_>>().join("; ")
        ));
    }
    let one: Vec<&str> = rows
        .iter()
        .filter(|r| r.ran_as.is_some())
        .map(|r| r.label.as_str())
        .collect();
    if !one.is_empty() {
        notes.push(format!(
            "{}: the mix draws pairs across shards, but with one shard every transfer is same-shard; \
             this is not the same traffic{}",
            one.join(", "),
            match base {
                Some((shards, _)) if varied => format!(", so scaling is measured from {shards} shards"),
                _ => ", and no other shard count runs it as written to scale from".into(),
            }
        ));
    }
    let saturated: Vec<&str> = rows
        .iter()
        .filter(|r| r.cpu_saturated)
        .map(|r| r.label.as_str())
        .collect();
    if !saturated.is_empty() {
        notes.push(format!(
            "the machine's CPU was saturated (at least {:.0}% busy) during {}: there, the CPU set the throughput, and more shards cannot add to it",
            crate::report::SATURATED * 100.0,
            saturated.join(", ")
        ));
    }
    Comparison {
        schema: SCHEMA.into(),
        rows,
        notes,
    }
}

impl Comparison {
    /// A Markdown table; also what the terminal shows.
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "| report | scenario | mix | shards | backend | cross-shard | TPS | x base | scaling eff. | p50 ms | p99 ms | p99.9 ms | errors | CPU busy | audit | passed |"
        );
        let _ = writeln!(
            out,
            "|---|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"
        );
        for r in &self.rows {
            let _ = writeln!(
                out,
                "| {} | {} | {}{} | {} | {} | {} | {:.0} | {:.2} | {} | {:.2} | {:.2} | {:.2} | {:.3}% | {} | {} | {} |",
                r.label,
                r.scenario,
                r.mix,
                r.ran_as
                    .as_ref()
                    .map(|a| format!(" ({a})"))
                    .unwrap_or_default(),
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
                match r.cpu_busy {
                    Some(b) if r.cpu_saturated => format!("{:.0}% saturated", b * 100.0),
                    Some(b) => format!("{:.0}%", b * 100.0),
                    None => "-".into(),
                },
                if r.audit_ok && r.accounting_ok { "passed" } else { "FAILED" },
                if r.passed { "yes" } else { "no" },
            );
        }
        for note in &self.notes {
            let _ = writeln!(out, "\nNote: {note}.");
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
