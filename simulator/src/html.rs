//! `report.html`: one self-contained file (inline CSS and SVG, no scripts,
//! nothing fetched), so it opens offline and can be attached anywhere.
//!
//! The page is a maud template: every text taken from the report (names,
//! labels, messages, codes, the scenario file) is escaped by maud; only the
//! style sheet, which is ours, goes into the page as it is.

use std::collections::BTreeMap;

use maud::{html, Markup, PreEscaped, DOCTYPE};
use shardpay_reference::pipeline::PipelineReport;

use crate::accounting::{Accounting, Fraud};
use crate::report::{
    Audit, FaultReport, Faults, Hist, Latency, OutcomeRow, Report, ThresholdResult, Timeline,
};

/// The page's style sheet, inlined into it.
const CSS: &str = include_str!("html.css");

const PALETTE: [&str; 10] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf",
];
const W: f64 = 720.0;
const H: f64 = 300.0;
const LEFT: f64 = 60.0;
const RIGHT: f64 = 150.0;
const TOP: f64 = 16.0;
const BOTTOM: f64 = 40.0;
/// The plotting area, inside the margins (the right one holds the legend).
const PLOT_W: f64 = W - LEFT - RIGHT;
const PLOT_H: f64 = H - TOP - BOTTOM;
/// The baseline of the x axis's labels, below the plotting area.
const X_LABEL_Y: f64 = TOP + PLOT_H + 16.0;

/// Percentiles plotted on the latency curves; x is log10(1 / (1 - p)).
const PERCENTILES: [f64; 17] = [
    0.0, 25.0, 50.0, 75.0, 90.0, 95.0, 97.5, 99.0, 99.5, 99.75, 99.9, 99.95, 99.975, 99.99, 99.995,
    99.999, 100.0,
];
/// Where the curve's x axis ends: the 99.999th percentile.
const MAX_NINES: f64 = 5.0;
/// The ticks of the percentile axis: nines and label.
const NINES_TICKS: [(f64, &str); 6] = [
    (0.0, "0%"),
    (1.0, "90%"),
    (2.0, "99%"),
    (3.0, "99.9%"),
    (4.0, "99.99%"),
    (5.0, "99.999%"),
];

/// The whole page, from the verdict down to the scenario file.
pub fn render(r: &Report) -> String {
    let page = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                title { "shardpay report: " (r.scenario.name) }
                style { (PreEscaped(CSS)) }
            }
            body {
                (headline(r))
                (totals(r))
                (thresholds(&r.thresholds))
                (latency(&r.latency))
                h2 { "Throughput over time" }
                (tps_chart(&r.timeline, &windows(r)))
                @if !r.timeline.requests.is_empty() {
                    h3 { "Errors and p99 latency per second" }
                    (per_second_chart(
                        "seconds since start (errors as a share of requests, %)",
                        &[("errors %".into(), error_percent(&r.timeline))],
                        &r.timeline,
                        &windows(r),
                    ))
                    (per_second_chart(
                        "seconds since start (p99 latency of the requests completed, ms)",
                        &[("p99 ms".into(), r.timeline.p99_ms.clone())],
                        &r.timeline,
                        &windows(r),
                    ))
                }
                @if let Some(f) = &r.faults {
                    (faults(f))
                }
                @if !r.reshards.is_empty() {
                    (reshards(&r.reshards))
                }
                (outcomes(&r.outcomes))
                (audit(&r.audit))
                (accounting(&r.accounting))
                (fraud(&r.accounting.fraud))
                @if let Some(p) = &r.pipeline {
                    (pipeline(p))
                }
                h2 { "Scenario" }
                p { (r.scenario.file) }
                pre { (r.scenario.source) }
            }
        }
    };
    page.into_string() + "\n"
}

/// The live view's charts (see `live.rs`), drawn by the code that draws
/// the report's: accepted transfers per second by payer shard, errors as a
/// share of requests, p99 latency, the answers other than an accepted
/// transfer by code (declines and errors), and the event pipeline as the
/// system reports it; `marks` (name, from, to, a fault or not) are shaded.
pub fn live_charts(
    t: &Timeline,
    by_code: &[(String, Vec<f64>)],
    marks: &[(String, f64, f64, bool)],
    pipeline: &[(String, Vec<f64>)],
    lag: &[(String, Vec<f64>)],
) -> String {
    let windows: Vec<Window> = marks
        .iter()
        .map(|(name, from, to, fault)| Window {
            name: name.clone(),
            from: *from,
            to: to.max(*from),
            fill: if *fault { "#f8d0d0" } else { "#d0dcf8" },
        })
        .collect();
    html! {
        h2 { "Throughput" }
        (tps_chart(t, &windows))
        @if !t.requests.is_empty() {
            h3 { "Errors and p99 latency per second" }
            (per_second_chart(
                "seconds since start (errors as a share of requests, %)",
                &[("errors %".into(), error_percent(t))],
                t,
                &windows,
            ))
            (per_second_chart(
                "seconds since start (p99 latency of the requests completed, ms)",
                &[("p99 ms".into(), t.p99_ms.clone())],
                t,
                &windows,
            ))
        }
        @if !by_code.is_empty() {
            h3 { "Declines and errors by code, per second" }
            (per_second_chart("seconds since start (answers per second)", by_code, t, &windows))
        }
        @if !pipeline.is_empty() {
            h3 { "Event pipeline" }
            (per_second_chart(
                "seconds since start (events waiting: outbox backlog, unapplied by the slowest consumer; dead letters)",
                pipeline,
                t,
                &windows,
            ))
        }
        @if !lag.is_empty() {
            (per_second_chart(
                "seconds since start (commit-to-consume lag p99 since the start, ms, per consumer)",
                lag,
                t,
                &windows,
            ))
        }
    }
    .into_string()
}

/// The stylesheet of the report, which the live view shares.
pub fn stylesheet() -> &'static str {
    CSS
}

/// The scenario's name and verdict, what ran where, and why the run failed.
fn headline(r: &Report) -> Markup {
    let meta = format!(
        "{} · seed {} · {} shards ({}, cross-shard {}) · {} model, {} users · {} · commit {} · {} ({} cpus, {})",
        r.run.started_at,
        r.scenario.seed,
        r.run.shards,
        r.run.backend,
        r.run.cross_shard,
        r.scenario.model,
        r.run.users,
        r.run.target,
        r.run.git_commit,
        r.machine.hostname,
        r.machine.cpus,
        r.machine.cpu_model
    );
    html! {
        h1 { (r.scenario.name) " " (verdict(r.passed)) }
        p.meta { (meta) }
        @if !r.failures.is_empty() {
            div.fail {
                b { "The run failed:" }
                ul {
                    @for failure in &r.failures {
                        li { (failure) }
                    }
                }
            }
        }
    }
}

/// The headline figures in large type, then the counts behind them.
fn totals(r: &Report) -> Markup {
    let t = &r.totals;
    let figures = [
        (format!("{:.0}", t.tps), "transfers/s"),
        (format!("{:.0}", t.rps), "requests/s"),
        (
            format!("{:.2} ms", r.latency.all.p99_us as f64 / 1000.0),
            "p99",
        ),
        (format!("{:.3}%", t.error_rate * 100.0), "errors"),
        (format!("{:.1} s", r.run.measured_s), "measured"),
    ];
    let counts = format!(
        "{} requests: {} accepted, {} replayed, {} declined, {} errors. The virtual users sent {} requests. Simulator CPU {:.1} s of {:.1} s wall ({:.0}% of {} cpus, {:.0} µs per request){}.",
        t.counts.requests,
        t.counts.accepted,
        t.counts.replayed,
        t.counts.declined,
        t.counts.errors,
        r.run.goose_requests,
        r.resources.simulator_cpu_s,
        r.resources.wall_s,
        r.resources.simulator_cpu_share * 100.0,
        r.machine.cpus,
        r.resources.simulator_cpu_us_per_request,
        r.resources.system_cpu()
    );
    html! {
        div.big {
            @for (figure, unit) in &figures {
                div { b { (figure) } (unit) }
            }
        }
        p { (counts) }
        @if let Some(d) = r.timeline.drift {
            p { (d.describe()) "." }
        }
        @if let Some(lag) = r.run.schedule.filter(|l| !l.kept()) {
            div.fail {
                b { "The schedule fell behind: " }
                (format!(
                    "{} of {} due operations never sent, {} sent more than 100 ms late (worst {:.0} ms); all {} users were busy. Raise users or lower the rate.",
                    lag.unsent, lag.due, lag.late, lag.worst_lag_ms, r.run.users
                ))
            }
        }
    }
}

fn thresholds(rows: &[ThresholdResult]) -> Markup {
    html! {
        h2 { "Thresholds" }
        @if rows.is_empty() {
            p { "None set." }
        } @else {
            table {
                (header(&["threshold", "limit", "actual", ""]))
                @for row in rows {
                    tr {
                        td { (row.name) }
                        td { (row.limit) }
                        td { (row.actual) }
                        td { (verdict(row.ok)) }
                    }
                }
            }
        }
    }
}

/// Percentile curves and tables by kind and by payer shard, and a table by
/// shard pair for cross-shard requests.
fn latency(l: &Latency) -> Markup {
    let mut kinds: Vec<(String, &Hist)> = vec![("all".into(), &l.all)];
    kinds.extend(l.kinds.iter().map(|(k, h)| (k.clone(), h)));
    let shards = labelled("shard", &l.shards);
    let pairs = labelled("shards", &l.pairs);
    html! {
        h2 { "Latency" }
        (percentile_chart("By kind", &kinds))
        (hist_table(&kinds))
        (percentile_chart("By payer shard", &shards))
        (hist_table(&shards))
        @if !pairs.is_empty() {
            h3 { "Cross-shard, by shard pair" }
            (hist_table(&pairs))
        }
    }
}

/// Histograms named "`prefix` `key`".
fn labelled<'a>(prefix: &str, hists: &'a BTreeMap<String, Hist>) -> Vec<(String, &'a Hist)> {
    hists
        .iter()
        .map(|(key, h)| (format!("{prefix} {key}"), h))
        .collect()
}

fn hist_table(rows: &[(String, &Hist)]) -> Markup {
    let ms = |us: u64| format!("{:.2}", us as f64 / 1000.0);
    html! {
        table {
            (header(&["", "count", "p50", "p90", "p99", "p99.9", "max", "mean"]))
            @for (name, h) in rows {
                tr {
                    td { (name) }
                    td { (h.count) }
                    td { (ms(h.p50_us)) }
                    td { (ms(h.p90_us)) }
                    td { (ms(h.p99_us)) }
                    td { (ms(h.p999_us)) }
                    td { (ms(h.max_us)) }
                    td { (format!("{:.2}", h.mean_us / 1000.0)) }
                }
            }
        }
        p.note { "milliseconds" }
    }
}

/// Every answer that was not an accepted transfer, by status and code.
fn outcomes(rows: &[OutcomeRow]) -> Markup {
    html! {
        h2 { "Answers other than an accepted transfer" }
        @if rows.is_empty() {
            p { "None." }
        } @else {
            table {
                (header(&["status", "code", "count"]))
                @for row in rows {
                    tr {
                        td {
                            @if row.status == 0 { "no answer" } @else { (row.status) }
                        }
                        td { (row.code) }
                        td { (row.count) }
                    }
                }
            }
        }
    }
}

/// The system's audit: its summary, and its checks when it lists them.
fn audit(a: &Audit) -> Markup {
    html! {
        h2 { "Audit " (verdict(a.ok)) }
        p { (a.summary) }
        @if let Some(checks) = a.raw["checks"].as_array() {
            table {
                (header(&["check", "problems", ""]))
                @for check in checks {
                    tr {
                        td { (check["name"].as_str().unwrap_or("")) }
                        td { (first_problems(check)) }
                        td { (verdict(check["ok"].as_bool().unwrap_or(false))) }
                    }
                }
            }
        }
    }
}

/// The first five problems an audit check lists, joined.
fn first_problems(check: &serde_json::Value) -> String {
    check["problems"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p.as_str())
        .take(5)
        .collect::<Vec<_>>()
        .join("; ")
}

/// The simulator's own books: counts, checks, and any violations.
fn accounting(a: &Accounting) -> Markup {
    let counts = format!(
        "{} transfers sent, {} accepted, {} declined, {} retry groups, {} settled after the run, {} resent after a closed connection.",
        a.transfers_sent,
        a.transfers_accepted,
        a.transfers_declined,
        a.retry_groups,
        a.settled_after_run,
        a.resent_unanswered
    );
    html! {
        h2 { "Simulator's own accounting " (verdict(a.ok)) }
        p { (counts) }
        table {
            (header(&["check", "detail", ""]))
            @for check in &a.checks {
                tr {
                    td { (check.name) }
                    td { (check.detail) }
                    td { (verdict(check.ok)) }
                }
            }
        }
        @if !a.violations.is_empty() {
            ul {
                @for violation in &a.violations {
                    li { code { (violation) } }
                }
            }
        }
    }
}

/// Labelled fraud-heavy transfers against the system's decisions; nothing
/// when the run sent none.
fn fraud(f: &Fraud) -> Markup {
    if f.fraudulent_allowed + f.fraudulent_refused + f.legitimate_allowed + f.legitimate_refused
        == 0
    {
        return html! {};
    }
    let pct = |v: Option<f64>| v.map_or_else(|| "n/a".into(), |x| format!("{:.1}%", x * 100.0));
    html! {
        h2 { "Fraud-heavy traffic" }
        table {
            (header(&["", "refused", "allowed"]))
            tr {
                td { "labelled fraudulent" }
                td { (f.fraudulent_refused) }
                td { (f.fraudulent_allowed) }
            }
            tr {
                td { "labelled legitimate" }
                td { (f.legitimate_refused) }
                td { (f.legitimate_allowed) }
            }
        }
        p { "precision " (pct(f.precision)) " · recall " (pct(f.recall)) }
    }
}

/// The event pipeline after the run: the outbox, the relays, each consumer.
fn pipeline(p: &PipelineReport) -> Markup {
    let outbox = format!(
        "{} outbox rows, {} unpublished, {} published by the relays ({} relay failures).",
        p.outbox_rows, p.outbox_backlog, p.published, p.relay_failures
    );
    let columns = [
        "consumer",
        "received",
        "applied",
        "duplicates suppressed",
        "unapplied",
        "lag p50 ms",
        "lag p99 ms",
        "lag max ms",
    ];
    html! {
        h2 { "Event pipeline " (verdict(p.complete)) }
        p { (outbox) }
        table {
            (header(&columns))
            @for c in &p.consumers {
                tr {
                    td { (c.group) }
                    td { (c.received) }
                    td { (c.applied) }
                    td { (c.duplicates_suppressed) }
                    td { (p.unapplied.get(&c.group).copied().unwrap_or(0)) }
                    td { (format!("{:.0}", c.lag.p50_ms)) }
                    td { (format!("{:.0}", c.lag.p99_ms)) }
                    td { (format!("{:.0}", c.lag.max_ms)) }
                }
            }
        }
    }
}

fn header(columns: &[&str]) -> Markup {
    html! {
        tr {
            @for column in columns {
                th { (column) }
            }
        }
    }
}

fn verdict(ok: bool) -> Markup {
    html! {
        @if ok {
            span.ok { "passed" }
        } @else {
            span.bad { "FAILED" }
        }
    }
}

fn nines(p: f64) -> f64 {
    if p >= 100.0 {
        MAX_NINES
    } else {
        (1.0 / (1.0 - p / 100.0)).log10().min(MAX_NINES)
    }
}

/// Latency percentile curves, log-scaled on both axes, one line per series.
fn percentile_chart(title: &str, series: &[(String, &Hist)]) -> Markup {
    let curves = percentile_curves(series);
    if curves.is_empty() {
        return html! {
            h3 { (title) }
            p { "No requests." }
        };
    }
    let (lo, hi) = curves
        .iter()
        .flat_map(|(_, points)| points.iter().map(|&(_, ms)| ms))
        .fold((f64::MAX, f64::MIN), |(lo, hi), ms| {
            (lo.min(ms), hi.max(ms))
        });
    let y_lo = lo.log10().floor();
    let y_hi = hi.log10().ceil().max(y_lo + 1.0);
    let x = |n: f64| LEFT + n / MAX_NINES * PLOT_W;
    let y = |ms: f64| TOP + PLOT_H - (ms.log10() - y_lo) / (y_hi - y_lo) * PLOT_H;
    // One grid line per power of ten between the bounds.
    let decades = (y_lo as i32..=y_hi as i32).map(|decade| 10f64.powf(decade.into()));
    html! {
        h3 { (title) }
        (chart(html! {
            @for (n, label) in NINES_TICKS {
                line x1=(x(n)) x2=(x(n)) y1=(TOP) y2=(TOP + PLOT_H) stroke="#ddd" {}
                (x_label(x(n), label))
            }
            @for ms in decades {
                (y_gridline(y(ms), &ms_label(ms)))
            }
            (axis_title("percentile"))
            @for (i, (name, points)) in curves.iter().enumerate() {
                (plot_series(i, 2.0, name, points.iter().map(|&(n, ms)| (x(n), y(ms)))))
            }
        }))
    }
}

/// Each series' latency in milliseconds (at least 1 µs) at the plotted
/// percentiles, by nines; series without samples are left out.
fn percentile_curves<'a>(series: &'a [(String, &Hist)]) -> Vec<(&'a str, Vec<(f64, f64)>)> {
    series
        .iter()
        .filter_map(|(name, hist)| {
            let h = hist.decode().ok().filter(|h| !h.is_empty())?;
            let points = PERCENTILES
                .iter()
                .map(|&p| (nines(p), h.value_at_percentile(p).max(1) as f64 / 1000.0))
                .collect();
            Some((name.as_str(), points))
        })
        .collect()
}

fn ms_label(ms: f64) -> String {
    if ms < 1.0 {
        format!("{ms} ms")
    } else {
        format!("{ms:.0} ms")
    }
}

/// A span of the run shaded on the per-second charts: a fault, or a phase
/// of a reshard.
struct Window {
    name: String,
    from: f64,
    to: f64,
    fill: &'static str,
}

/// The run's faults and reshard phases, as shaded windows.
fn windows(r: &Report) -> Vec<Window> {
    let faults = r.faults.as_ref().map_or(&[][..], |f| f.faults.as_slice());
    let mut out: Vec<Window> = faults
        .iter()
        .map(|f: &FaultReport| {
            // From the hit to the system's return (a second when it never
            // hit); the span its figures cover runs on to its recovery.
            let from = f.hit_s.or(f.started_s).unwrap_or(f.scheduled_s);
            let to = f
                .healed_s
                .or(f.hit_s.map(|h| h + 1.0))
                .unwrap_or(from + 1.0)
                .max(from);
            Window {
                name: f.name.clone(),
                from,
                to,
                fill: "#f8d0d0",
            }
        })
        .collect();
    for reshard in &r.reshards {
        for (phase, from, to) in &reshard.phases {
            out.push(Window {
                name: format!("{phase} (to {})", reshard.to),
                from: *from,
                to: to.max(*from),
                fill: if phase == "copy" {
                    "#d0dcf8"
                } else {
                    "#d8f0d0"
                },
            });
        }
    }
    out
}

/// Errors per second as a percentage of the requests of that second.
fn error_percent(t: &Timeline) -> Vec<f64> {
    t.requests
        .iter()
        .zip(&t.errors)
        .map(|(&r, &e)| {
            if r == 0 {
                0.0
            } else {
                e as f64 * 100.0 / r as f64
            }
        })
        .collect()
}

/// Each window shaded on a chart, labelled with its name.
fn fault_shading(windows: &[Window], x: impl Fn(f64) -> f64, len: usize) -> Markup {
    html! {
        @for w in windows {
            @let from = w.from.min(len as f64);
            @let to = w.to.min(len as f64).max(from);
            @let (x0, x1) = (x(from), x(to));
            rect class="fault" x=(format!("{x0:.1}")) y=(TOP) width=(format!("{:.1}", (x1 - x0).max(2.0))) height=(PLOT_H) fill=(w.fill) fill-opacity="0.7" {}
            text x=(format!("{:.1}", x0 + 2.0)) y=(TOP + PLOT_H - 4.0) class="tick" { (w.name) }
        }
    }
}

/// Series of one value per second on one scale, warm-up and faults shaded.
fn per_second_chart(
    title: &str,
    series: &[(String, Vec<f64>)],
    t: &Timeline,
    faults: &[Window],
) -> Markup {
    // The last second is partial: leave it out.
    let len = series
        .iter()
        .map(|(_, v)| v.len())
        .max()
        .unwrap_or(0)
        .saturating_sub(1)
        .max(1);
    let hi = series
        .iter()
        .flat_map(|(_, v)| v.iter().take(len).copied())
        .fold(0.0f64, f64::max)
        .max(1e-9)
        * 1.1;
    let span = (len.max(2) - 1) as f64;
    let x = |s: f64| LEFT + s / span * PLOT_W;
    let y = |v: f64| TOP + PLOT_H - v / hi * PLOT_H;
    let warmup_w = (x(t.warmup_s as f64) - LEFT).max(0.0);
    chart(html! {
        @if t.warmup_s > 0 {
            rect x=(LEFT) y=(TOP) width=(format!("{warmup_w:.1}")) height=(PLOT_H) fill="#f3f3f3" {}
        }
        (fault_shading(faults, x, len))
        @for i in 0..=4 {
            @let v = hi / 4.0 * i as f64;
            (y_gridline(y(v), &format!("{v:.1}")))
        }
        @for s in (0..len).step_by((len / 10).max(1)) {
            (x_label(x(s as f64), &format!("{s}s")))
        }
        (axis_title(title))
        @for (i, (name, values)) in series.iter().enumerate() {
            @let points = values.iter().take(len).enumerate();
            (plot_series(i, 1.5, name, points.map(|(s, &v)| (x(s as f64), y(v)))))
        }
    })
}

/// The reshards: what each moved, how long each phase held, and the
/// audits around it.
fn reshards(list: &[crate::report::ReshardRun]) -> Markup {
    html! {
        h2 { "Reshards" }
        table {
            (header(&["to", "line", "started", "ended", "moved", "scanned", "moved share", "keys", "bytes", "phases", "waited", "refused", "longest freeze", "audits", "problems"]))
            @for r in list {
                @let n = |name: &str| r.figure(name).unwrap_or(0.0);
                tr {
                    td { (r.to) " shards" }
                    td { (r.line) }
                    td { (r.started_s.map_or("-".into(), |s| format!("{s:.1} s"))) }
                    td { (r.ended_s.map_or("-".into(), |s| format!("{s:.1} s"))) }
                    td { (format!("{:.0}", n("accounts_moved"))) }
                    td { (format!("{:.0}", n("accounts_scanned"))) }
                    td { (format!("{:.1}%", n("moved_share") * 100.0)) }
                    td { (format!("{:.0}", n("keys_copied"))) }
                    td { (format!("{:.0}", n("bytes_copied"))) }
                    td { (r.phases.iter().map(|(p, a, b)| format!("{p} {:.0} ms", (b - a) * 1000.0)).collect::<Vec<_>>().join(", ")) }
                    td { (format!("{:.0}", n("requests_waited"))) }
                    td { (format!("{:.0}", n("requests_refused"))) }
                    td { (format!("{:.0} ms", n("longest_freeze_ms"))) }
                    td { (format!("{}/{} passed", r.audits.iter().filter(|a| a.ok).count(), r.audits.len())) }
                    td { (r.problems().join("; ")) }
                }
            }
        }
    }
}

/// The faults: when each ran and what it did.
fn faults(f: &Faults) -> Markup {
    let secs = |v: Option<f64>| v.map_or("-".to_string(), |s| format!("{s:.1} s"));
    html! {
        h2 { "Faults" }
        p {
            (format!(
                "Inside the faults' spans: {} requests, {} errors ({:.3}%). Outside: {} requests, {} errors ({:.3}%).",
                f.inside.requests, f.inside.errors, f.inside_error_rate * 100.0,
                f.outside.requests, f.outside.errors, f.outside_error_rate * 100.0
            ))
        }
        table {
            (header(&["fault", "line", "started", "down at", "back at", "first accepted", "recovered", "requests", "errors", "pending at heal", "cleared", "audit after", "notes"]))
            @for r in &f.faults {
                tr {
                    td { (r.name) " (" (r.action) @if let Some(step) = &r.step { " " (step) } ")" }
                    td { (r.line) }
                    td { (secs(r.started_s)) }
                    td { (secs(r.hit_s)) }
                    td { (secs(r.healed_s)) }
                    td { (secs(r.first_accepted_after_s)) }
                    td { (secs(r.recovered_after_s)) }
                    td { (r.counts.requests) }
                    td { (r.counts.errors) }
                    td { (r.pending_at_heal.map_or("-".to_string(), |p| p.to_string())) }
                    td { (secs(r.pending_cleared_after_s)) }
                    td {
                        @match r.audit_ok {
                            Some(ok) => (verdict(ok)),
                            None => "-",
                        }
                    }
                    td { (r.notes.join("; ")) (r.audit_failures.join("; ")) }
                }
            }
        }
    }
}

/// Accepted transfers per second, one line per shard, warm-up and faults
/// shaded.
fn tps_chart(t: &Timeline, faults: &[Window]) -> Markup {
    // The last second is partial (the run ends inside it): leave it out of
    // the chart, where it would read as a collapse.
    let len = t
        .shards
        .values()
        .map(Vec::len)
        .max()
        .unwrap_or(0)
        .saturating_sub(1)
        .max(1);
    let hi = t
        .shards
        .values()
        .flat_map(|v| v.iter().copied())
        .max()
        .unwrap_or(1)
        .max(1) as f64
        * 1.1;
    let span = (len.max(2) - 1) as f64;
    let x = |s: f64| LEFT + s / span * PLOT_W;
    let y = |v: f64| TOP + PLOT_H - v / hi * PLOT_H;
    let warmup_w = (x(t.warmup_s as f64) - LEFT).max(0.0);
    let title = "seconds since start (transfers accepted per second, by payer shard)";
    chart(html! {
        @if t.warmup_s > 0 {
            rect x=(LEFT) y=(TOP) width=(format!("{warmup_w:.1}")) height=(PLOT_H) fill="#f3f3f3" {}
            text x=(LEFT + 4.0) y=(TOP + 12.0) class="tick" { "warm-up" }
        }
        (fault_shading(faults, x, len))
        @for i in 0..=4 {
            @let tps = hi / 4.0 * i as f64;
            (y_gridline(y(tps), &format!("{tps:.0}")))
        }
        @for s in (0..len).step_by((len / 10).max(1)) {
            (x_label(x(s as f64), &format!("{s}s")))
        }
        (axis_title(title))
        @for (i, (shard, values)) in t.shards.iter().enumerate() {
            @let points = values.iter().take(len).enumerate();
            (plot_series(i, 1.5, &format!("shard {shard}"), points.map(|(s, &v)| (x(s as f64), y(v as f64)))))
        }
    })
}

/// A chart's frame; its contents are drawn in the chart's pixels.
fn chart(contents: Markup) -> Markup {
    html! {
        svg viewBox=(format!("0 0 {W} {H}")) width=(W) height=(H) role="img" {
            (contents)
        }
    }
}

/// A horizontal grid line across the plot, labelled on the left.
fn y_gridline(y: f64, label: &str) -> Markup {
    html! {
        line x1=(LEFT) x2=(LEFT + PLOT_W) y1=(y) y2=(y) stroke="#ddd" {}
        text x=(LEFT - 6.0) y=(y + 4.0) class="tick" text-anchor="end" { (label) }
    }
}

/// A label on the x axis, centred under `x`.
fn x_label(x: f64, label: &str) -> Markup {
    html! {
        text x=(x) y=(X_LABEL_Y) class="tick" text-anchor="middle" { (label) }
    }
}

fn axis_title(title: &str) -> Markup {
    html! {
        text x=(LEFT + PLOT_W / 2.0) y=(H - 4.0) class="axis" text-anchor="middle" { (title) }
    }
}

/// The `i`th series: its line through `points` (pixels) and its legend entry.
fn plot_series(
    i: usize,
    stroke_width: f64,
    name: &str,
    points: impl Iterator<Item = (f64, f64)>,
) -> Markup {
    let color = PALETTE[i % PALETTE.len()];
    let points: Vec<String> = points.map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
    let legend_y = TOP + 14.0 + i as f64 * 16.0;
    html! {
        polyline fill="none" stroke=(color) stroke-width=(stroke_width) points=(points.join(" ")) {}
        rect x=(LEFT + PLOT_W + 12.0) y=(legend_y - 9.0) width="10" height="10" fill=(color) {}
        text x=(LEFT + PLOT_W + 26.0) y=(legend_y) class="tick" { (name) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accounting::Check;
    use crate::record::{new_histogram, Counts};
    use crate::report::Resources;

    /// A report of a run that sent nothing, to fill in.
    fn report() -> Report {
        let empty = serde_json::to_value(Hist::of(&new_histogram())).unwrap();
        serde_json::from_value(serde_json::json!({
            "schema": crate::report::SCHEMA,
            "scenario": {"name": "test", "file": "test.toml", "seed": 1, "model": "closed", "source": ""},
            "run": {
                "started_at": "2025-01-01T00:00:00Z", "shards": 2, "backend": "sqlite",
                "target": "embedded", "git_commit": "unknown", "simulator_version": "0",
                "run_id": "r", "accounts": 0, "warmup_s": 0, "measured_s": 0.0, "operations": 0,
                "users": 1, "goose_requests": 0, "interrupted": false
            },
            "machine": {"os": "linux", "arch": "x86_64", "cpus": 2, "cpu_model": "cpu", "memory_bytes": 0, "hostname": "host"},
            "totals": {"counts": Counts::default(), "tps": 0.0, "rps": 0.0, "error_rate": 0.0},
            "by_kind": {},
            "latency": {"all": empty, "kinds": {}, "shards": {}, "pairs": {}},
            "timeline": {"interval_s": 1, "warmup_s": 0, "shards": {}, "errors": []},
            "outcomes": [],
            "accounting": Accounting::default(),
            "audit": {"ok": true, "summary": "", "raw": {}},
            "thresholds": [],
            "resources": Resources::default(),
            "passed": false,
            "failures": []
        }))
        .unwrap()
    }

    #[test]
    fn texts_from_the_report_are_escaped() {
        let hostile = "<script>alert(1)</script> & co";
        let escaped = "&lt;script&gt;alert(1)&lt;/script&gt; &amp; co";
        let mut r = report();
        r.scenario.name = hostile.into();
        r.failures.push(format!("p99 too high: {hostile}"));
        r.outcomes.push(OutcomeRow {
            status: 500,
            code: hostile.into(),
            count: 1,
        });
        r.accounting.checks.push(Check {
            name: "balances".into(),
            ok: false,
            detail: hostile.into(),
        });
        let mut samples = new_histogram();
        samples.record(1_500).unwrap();
        r.latency.shards.insert(hostile.into(), Hist::of(&samples));
        r.timeline.shards.insert(hostile.into(), vec![3, 4, 5]);

        let html = render(&r);
        assert!(!html.contains("<script"), "{html}");
        for expected in [
            format!("<title>shardpay report: {escaped}</title>"),
            format!("<h1>{escaped} <span class=\"bad\">FAILED</span></h1>"),
            format!("<li>p99 too high: {escaped}</li>"),
            format!("<td>500</td><td>{escaped}</td><td>1</td>"),
            format!("<td>balances</td><td>{escaped}</td>"),
            // The latency table, and the legends of both charts.
            format!("<td>shard {escaped}</td>"),
            format!("class=\"tick\">shard {escaped}</text>"),
        ] {
            assert!(html.contains(&expected), "{expected} not in {html}");
        }
        assert_eq!(html.matches(&format!(">shard {escaped}</text>")).count(), 2);
    }
}
