//! `report.html`: one self-contained file (inline CSS and SVG, no scripts,
//! nothing fetched), so it opens offline and can be attached anywhere.

use std::fmt::Write as _;

use crate::report::{Hist, Report};

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

/// Percentiles plotted on the latency curves; x is log10(1 / (1 - p)).
const PERCENTILES: [f64; 17] = [
    0.0, 25.0, 50.0, 75.0, 90.0, 95.0, 97.5, 99.0, 99.5, 99.75, 99.9, 99.95, 99.975, 99.99, 99.995,
    99.999, 100.0,
];
/// Where the curve's x axis ends: the 99.999th percentile.
const MAX_NINES: f64 = 5.0;

fn esc(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn nines(p: f64) -> f64 {
    if p >= 100.0 {
        MAX_NINES
    } else {
        (1.0 / (1.0 - p / 100.0)).log10().min(MAX_NINES)
    }
}

/// Latency percentile curves, log-scaled on both axes, one line per series.
fn percentile_chart(title: &str, series: &[(String, &Hist)]) -> String {
    let mut lines = Vec::new();
    for (name, hist) in series {
        let Ok(h) = hist.decode() else { continue };
        if h.is_empty() {
            continue;
        }
        let points: Vec<(f64, f64)> = PERCENTILES
            .iter()
            .map(|p| (nines(*p), h.value_at_percentile(*p).max(1) as f64 / 1000.0))
            .collect();
        lines.push((name.clone(), points));
    }
    if lines.is_empty() {
        return format!("<h3>{}</h3><p>No requests.</p>", esc(title));
    }
    let (lo, hi) = lines
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(_, y)| *y))
        .fold((f64::MAX, f64::MIN), |(a, b), y| (a.min(y), b.max(y)));
    let y_lo = lo.log10().floor();
    let y_hi = (hi.log10().ceil()).max(y_lo + 1.0);
    let pw = W - LEFT - RIGHT;
    let ph = H - TOP - BOTTOM;
    let x = |n: f64| LEFT + n / MAX_NINES * pw;
    let y = |ms: f64| TOP + ph - (ms.log10() - y_lo) / (y_hi - y_lo) * ph;
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<h3>{}</h3><svg viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img">"#,
        esc(title)
    );
    for (n, label) in [
        (0.0, "0%"),
        (1.0, "90%"),
        (2.0, "99%"),
        (3.0, "99.9%"),
        (4.0, "99.99%"),
        (5.0, "99.999%"),
    ] {
        let _ = write!(
            svg,
            r##"<line x1="{0}" x2="{0}" y1="{TOP}" y2="{1}" stroke="#ddd"/><text x="{0}" y="{2}" class="tick" text-anchor="middle">{label}</text>"##,
            x(n),
            TOP + ph,
            TOP + ph + 16.0
        );
    }
    let mut decade = y_lo;
    while decade <= y_hi {
        let ms = 10f64.powf(decade);
        let _ = write!(
            svg,
            r##"<line x1="{LEFT}" x2="{0}" y1="{1}" y2="{1}" stroke="#ddd"/><text x="{2}" y="{3}" class="tick" text-anchor="end">{4}</text>"##,
            LEFT + pw,
            y(ms),
            LEFT - 6.0,
            y(ms) + 4.0,
            if ms < 1.0 {
                format!("{ms} ms")
            } else {
                format!("{ms:.0} ms")
            }
        );
        decade += 1.0;
    }
    let _ = write!(
        svg,
        r#"<text x="{}" y="{}" class="axis" text-anchor="middle">percentile</text>"#,
        LEFT + pw / 2.0,
        H - 4.0
    );
    for (i, (name, points)) in lines.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let path: Vec<String> = points
            .iter()
            .map(|(n, ms)| format!("{:.1},{:.1}", x(*n), y(*ms)))
            .collect();
        let _ = write!(
            svg,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
            path.join(" ")
        );
        let ly = TOP + 14.0 + i as f64 * 16.0;
        let _ = write!(
            svg,
            r#"<rect x="{}" y="{}" width="10" height="10" fill="{color}"/><text x="{}" y="{}" class="tick">{}</text>"#,
            LEFT + pw + 12.0,
            ly - 9.0,
            LEFT + pw + 26.0,
            ly,
            esc(name)
        );
    }
    svg.push_str("</svg>");
    svg
}

/// Accepted transfers per second, one line per shard, warm-up shaded.
fn tps_chart(report: &Report) -> String {
    let t = &report.timeline;
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
    if len == 0 {
        return "<p>No transfers.</p>".into();
    }
    let hi = t
        .shards
        .values()
        .flat_map(|v| v.iter().copied())
        .max()
        .unwrap_or(1)
        .max(1) as f64
        * 1.1;
    let pw = W - LEFT - RIGHT;
    let ph = H - TOP - BOTTOM;
    let span = (len.max(2) - 1) as f64;
    let x = |s: f64| LEFT + s / span * pw;
    let y = |v: f64| TOP + ph - v / hi * ph;
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img">"#
    );
    if t.warmup_s > 0 {
        let _ = write!(
            svg,
            r##"<rect x="{LEFT}" y="{TOP}" width="{:.1}" height="{ph}" fill="#f3f3f3"/><text x="{}" y="{}" class="tick">warm-up</text>"##,
            (x(t.warmup_s as f64) - LEFT).max(0.0),
            LEFT + 4.0,
            TOP + 12.0
        );
    }
    for i in 0..=4 {
        let v = hi / 4.0 * i as f64;
        let _ = write!(
            svg,
            r##"<line x1="{LEFT}" x2="{0}" y1="{1}" y2="{1}" stroke="#ddd"/><text x="{2}" y="{3}" class="tick" text-anchor="end">{4:.0}</text>"##,
            LEFT + pw,
            y(v),
            LEFT - 6.0,
            y(v) + 4.0,
            v
        );
    }
    let step = (len / 10).max(1);
    for s in (0..len).step_by(step) {
        let _ = write!(
            svg,
            r#"<text x="{}" y="{}" class="tick" text-anchor="middle">{s}s</text>"#,
            x(s as f64),
            TOP + ph + 16.0
        );
    }
    let _ = write!(
        svg,
        r#"<text x="{}" y="{}" class="axis" text-anchor="middle">seconds since start (transfers accepted per second, by payer shard)</text>"#,
        LEFT + pw / 2.0,
        H - 4.0
    );
    for (i, (shard, values)) in t.shards.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let path: Vec<String> = values
            .iter()
            .take(len)
            .enumerate()
            .map(|(s, v)| format!("{:.1},{:.1}", x(s as f64), y(*v as f64)))
            .collect();
        let _ = write!(
            svg,
            r#"<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{}"/>"#,
            path.join(" ")
        );
        let ly = TOP + 14.0 + i as f64 * 16.0;
        let _ = write!(
            svg,
            r#"<rect x="{}" y="{}" width="10" height="10" fill="{color}"/><text x="{}" y="{}" class="tick">shard {}</text>"#,
            LEFT + pw + 12.0,
            ly - 9.0,
            LEFT + pw + 26.0,
            ly,
            esc(shard)
        );
    }
    svg.push_str("</svg>");
    svg
}

fn hist_table(rows: &[(String, &Hist)]) -> String {
    let mut out = String::from(
        "<table><tr><th></th><th>count</th><th>p50</th><th>p90</th><th>p99</th><th>p99.9</th><th>max</th><th>mean</th></tr>",
    );
    let ms = |us: u64| format!("{:.2}", us as f64 / 1000.0);
    for (name, h) in rows {
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.2}</td></tr>",
            esc(name),
            h.count,
            ms(h.p50_us),
            ms(h.p90_us),
            ms(h.p99_us),
            ms(h.p999_us),
            ms(h.max_us),
            h.mean_us / 1000.0
        );
    }
    out.push_str("</table><p class=\"note\">milliseconds</p>");
    out
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "<span class=\"ok\">passed</span>"
    } else {
        "<span class=\"bad\">FAILED</span>"
    }
}

pub fn render(r: &Report) -> String {
    let mut h = String::new();
    let _ = write!(
        h,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>shardpay report: {}</title><style>{}</style></head><body>",
        esc(&r.scenario.name),
        CSS
    );
    let _ = write!(
        h,
        "<h1>{} {}</h1><p class=\"meta\">{} · seed {} · {} shards ({}, cross-shard {}) · {} model, {} users · {} · commit {} · {} ({} cpus, {})</p>",
        esc(&r.scenario.name),
        verdict(r.passed),
        esc(&r.run.started_at),
        r.scenario.seed,
        r.run.shards,
        esc(&r.run.backend),
        esc(&r.run.cross_shard),
        esc(&r.scenario.model),
        r.run.users,
        esc(&r.run.target),
        esc(&r.run.git_commit),
        esc(&r.machine.hostname),
        r.machine.cpus,
        esc(&r.machine.cpu_model)
    );
    if !r.failures.is_empty() {
        h.push_str("<div class=\"fail\"><b>The run failed:</b><ul>");
        for f in &r.failures {
            let _ = write!(h, "<li>{}</li>", esc(f));
        }
        h.push_str("</ul></div>");
    }
    let t = &r.totals;
    let _ = write!(
        h,
        "<div class=\"big\"><div><b>{:.0}</b>transfers/s</div><div><b>{:.0}</b>requests/s</div><div><b>{:.2} ms</b>p99</div><div><b>{:.3}%</b>errors</div><div><b>{:.1} s</b>measured</div></div>",
        t.tps,
        t.rps,
        r.latency.all.p99_us as f64 / 1000.0,
        t.error_rate * 100.0,
        r.run.measured_s
    );
    let _ = write!(
        h,
        "<p>{} requests: {} accepted, {} replayed, {} declined, {} errors. goose counted {} requests. Simulator CPU {:.1} s of {:.1} s wall ({:.0}% of {} cpus){}.</p>",
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
        r.resources
            .system_cpu_s
            .map(|s| format!("; reference system {s:.1} s"))
            .unwrap_or_default()
    );

    h.push_str("<h2>Thresholds</h2>");
    if r.thresholds.is_empty() {
        h.push_str("<p>None set.</p>");
    } else {
        h.push_str("<table><tr><th>threshold</th><th>limit</th><th>actual</th><th></th></tr>");
        for th in &r.thresholds {
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&th.name),
                esc(&th.limit),
                esc(&th.actual),
                verdict(th.ok)
            );
        }
        h.push_str("</table>");
    }

    h.push_str("<h2>Latency</h2>");
    let mut kinds: Vec<(String, &Hist)> = vec![("all".into(), &r.latency.all)];
    kinds.extend(r.latency.kinds.iter().map(|(k, v)| (k.clone(), v)));
    h.push_str(&percentile_chart("By kind", &kinds));
    h.push_str(&hist_table(&kinds));
    let shards: Vec<(String, &Hist)> = r
        .latency
        .shards
        .iter()
        .map(|(s, v)| (format!("shard {s}"), v))
        .collect();
    h.push_str(&percentile_chart("By payer shard", &shards));
    h.push_str(&hist_table(&shards));
    if !r.latency.pairs.is_empty() {
        let pairs: Vec<(String, &Hist)> = r
            .latency
            .pairs
            .iter()
            .map(|(p, v)| (format!("shards {p}"), v))
            .collect();
        h.push_str("<h3>Cross-shard, by shard pair</h3>");
        h.push_str(&hist_table(&pairs));
    }

    h.push_str("<h2>Throughput over time</h2>");
    h.push_str(&tps_chart(r));

    h.push_str("<h2>Answers other than an accepted transfer</h2>");
    if r.outcomes.is_empty() {
        h.push_str("<p>None.</p>");
    } else {
        h.push_str("<table><tr><th>status</th><th>code</th><th>count</th></tr>");
        for o in &r.outcomes {
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
                if o.status == 0 {
                    "no answer".to_string()
                } else {
                    o.status.to_string()
                },
                esc(&o.code),
                o.count
            );
        }
        h.push_str("</table>");
    }

    let _ = write!(
        h,
        "<h2>Audit {}</h2><p>{}</p>",
        verdict(r.audit.ok),
        esc(&r.audit.summary)
    );
    if let Some(checks) = r.audit.raw["checks"].as_array() {
        h.push_str("<table><tr><th>check</th><th>problems</th><th></th></tr>");
        for c in checks {
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(c["name"].as_str().unwrap_or("")),
                esc(&c["problems"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|p| p.as_str())
                    .take(5)
                    .collect::<Vec<_>>()
                    .join("; ")),
                verdict(c["ok"].as_bool().unwrap_or(false))
            );
        }
        h.push_str("</table>");
    }
    let a = &r.accounting;
    let _ = write!(
        h,
        "<h2>Simulator's own accounting {}</h2><p>{} transfers sent, {} accepted, {} declined, {} retry groups, {} settled after the run.</p><table><tr><th>check</th><th>detail</th><th></th></tr>",
        verdict(a.ok),
        a.transfers_sent,
        a.transfers_accepted,
        a.transfers_declined,
        a.retry_groups,
        a.settled_after_run
    );
    for c in &a.checks {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&c.name),
            esc(&c.detail),
            verdict(c.ok)
        );
    }
    h.push_str("</table>");
    if !a.violations.is_empty() {
        h.push_str("<ul>");
        for v in &a.violations {
            let _ = write!(h, "<li><code>{}</code></li>", esc(v));
        }
        h.push_str("</ul>");
    }
    let f = &a.fraud;
    if f.fraudulent_allowed + f.fraudulent_refused + f.legitimate_allowed + f.legitimate_refused > 0
    {
        let pct = |v: Option<f64>| {
            v.map(|x| format!("{:.1}%", x * 100.0))
                .unwrap_or_else(|| "n/a".into())
        };
        let _ = write!(
            h,
            "<h2>Fraud-heavy traffic</h2><table><tr><th></th><th>refused</th><th>allowed</th></tr><tr><td>labelled fraudulent</td><td>{}</td><td>{}</td></tr><tr><td>labelled legitimate</td><td>{}</td><td>{}</td></tr></table><p>precision {} · recall {}</p>",
            f.fraudulent_refused,
            f.fraudulent_allowed,
            f.legitimate_refused,
            f.legitimate_allowed,
            pct(f.precision),
            pct(f.recall)
        );
    }
    if let Some(p) = &r.pipeline {
        let _ = write!(
            h,
            "<h2>Event pipeline {}</h2><p>{} outbox rows, {} unpublished, {} published by the relays ({} relay failures).</p><table><tr><th>consumer</th><th>received</th><th>applied</th><th>duplicates suppressed</th><th>unapplied</th><th>lag p50 ms</th><th>lag p99 ms</th><th>lag max ms</th></tr>",
            verdict(p.complete),
            p.outbox_rows,
            p.outbox_backlog,
            p.published,
            p.relay_failures
        );
        for c in &p.consumers {
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.0}</td><td>{:.0}</td><td>{:.0}</td></tr>",
                esc(&c.group),
                c.received,
                c.applied,
                c.duplicates_suppressed,
                p.unapplied.get(&c.group).copied().unwrap_or(0),
                c.lag.p50_ms,
                c.lag.p99_ms,
                c.lag.max_ms
            );
        }
        h.push_str("</table>");
    }
    let _ = write!(
        h,
        "<h2>Scenario</h2><p>{}</p><pre>{}</pre></body></html>\n",
        esc(&r.scenario.file),
        esc(&r.scenario.source)
    );
    h
}

const CSS: &str = "body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:980px;color:#222;padding:0 1em}\
h1{font-size:1.6em}h2{margin-top:1.8em;border-bottom:1px solid #ddd}\
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}\
td:first-child,th:first-child{text-align:left}.ok{color:#2a7d2a;font-weight:600}.bad{color:#c0262d;font-weight:700}\
.meta{color:#555}.note{color:#777;font-size:.85em;margin-top:0}.fail{background:#fdecea;padding:.5em 1em;border-left:4px solid #c0262d}\
.big{display:flex;gap:2em;margin:1em 0}.big div{display:flex;flex-direction:column;color:#555}.big b{font-size:1.7em;color:#111}\
.tick{font-size:11px;fill:#555}.axis{font-size:12px;fill:#333}pre{background:#f6f6f6;padding:1em;overflow:auto}";
