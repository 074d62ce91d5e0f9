//! The live view of a run (`shardpay run --live`): a page on loopback that
//! shows the run's charts second by second while it runs. The page is one
//! self-contained document (no script, font or style from the network);
//! each second the server pushes the charts, drawn by the same code as the
//! HTML report's (`html::live_charts`), over server-sent events
//! (`/events`), and the page swaps them in. `/series.json` gives the
//! numbers behind them.
//!
//! Everything shown is what the simulator measures, so the view works the
//! same against the in-process system, a `--target` and six processes.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use axum::Router;
use serde::Serialize;

use crate::api::Api;
use crate::driver::Sim;
use crate::marks::{Mark, Marks};
use crate::report::Timeline;

/// How often the page is sent new charts.
const EVERY: Duration = Duration::from_secs(1);

/// Codes drawn on the by-code chart: the most frequent ones.
const CODES_SHOWN: usize = 6;

/// The live view's server; it stops when dropped.
pub struct LiveView {
    pub url: String,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for LiveView {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// The event pipeline as the system reports it (`GET /v1/pipeline`), one
/// sample a second.
#[derive(Debug, Clone, Serialize)]
pub struct PipelineSample {
    pub at_s: u64,
    pub outbox_backlog: u64,
    /// Events not yet applied by the slowest consumer.
    pub unapplied: u64,
    /// Commit-to-consume lag p99 since the start, per consumer group.
    pub lag_p99_ms: BTreeMap<String, f64>,
    pub dlq_size: Option<u64>,
}

#[derive(Clone)]
struct Shared {
    /// Weak: a page left open must not keep the run's state alive after
    /// the load (the run takes it back to settle and report).
    sim: std::sync::Weak<Sim>,
    marks: Marks,
    pipeline: Arc<std::sync::Mutex<Vec<PipelineSample>>>,
    name: String,
    warmup_s: u64,
}

/// What the page is sent each second, and `/series.json` answers.
#[derive(Debug, Serialize)]
pub struct Snapshot {
    pub scenario: String,
    /// Seconds since the load began (0 before it has).
    pub elapsed_s: u64,
    pub requests: u64,
    pub accepted: u64,
    pub errors: u64,
    pub timeline: Timeline,
    /// Answers other than an accepted transfer, per second, by
    /// `status code` (the most frequent codes).
    pub by_code: BTreeMap<String, Vec<u64>>,
    /// Faults and reshards so far.
    pub marks: Vec<Mark>,
    /// The system's event pipeline, sampled each second (empty when the
    /// system has none, or does not say).
    pub pipeline: Vec<PipelineSample>,
}

/// Serves the live view on `127.0.0.1:port` (0: a free port); `api` reads
/// the system's event pipeline each second.
pub async fn start(
    port: u16,
    sim: Arc<Sim>,
    api: Api,
    name: &str,
    warmup_s: u64,
) -> anyhow::Result<LiveView> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .map_err(|e| {
            anyhow::anyhow!("the live view cannot listen on 127.0.0.1:{port}: {e}; give another --live-port (0 picks a free one)")
        })?;
    let url = format!("http://{}/", listener.local_addr()?);
    let shared = Shared {
        sim: Arc::downgrade(&sim),
        marks: sim.marks.clone(),
        pipeline: Arc::default(),
        name: name.to_string(),
        warmup_s,
    };
    let sampler = tokio::spawn(sample_pipeline(shared.clone(), api));
    let app = Router::new()
        .route("/", get(page))
        .route("/events", get(events))
        .route("/series.json", get(series))
        .with_state(shared);
    let server = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!(error = %e, "the live view stopped");
        }
    });
    Ok(LiveView {
        url,
        tasks: vec![server, sampler],
    })
}

/// Reads the system's pipeline figures once a second while the load runs;
/// stops for good when the system has no pipeline to report.
async fn sample_pipeline(shared: Shared, api: Api) {
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        let Some(sim) = shared.sim.upgrade() else {
            return;
        };
        let Some(started) = sim.started() else {
            continue;
        };
        drop(sim);
        let report = match api.pipeline().await {
            Ok(Some(report)) => report,
            Ok(None) => return,
            // Down for a moment (a fault): the chart has a gap.
            Err(_) => continue,
        };
        let sample = PipelineSample {
            at_s: started.elapsed().as_secs(),
            outbox_backlog: report.outbox_backlog,
            unapplied: report.unapplied.values().copied().max().unwrap_or(0),
            lag_p99_ms: report
                .consumers
                .iter()
                .map(|c| (c.group.clone(), c.lag.p99_ms))
                .collect(),
            dlq_size: report.notification.as_ref().map(|n| n.dlq_size),
        };
        shared.pipeline.lock().expect("pipeline lock").push(sample);
    }
}

fn snapshot(shared: &Shared) -> Option<Snapshot> {
    let sim = shared.sim.upgrade()?;
    let series = sim.recorder.series();
    let live = sim.recorder.totals();
    let seconds = series.requests.len();
    let mut shards: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut seen: Vec<u16> = series
        .accepted
        .iter()
        .flat_map(|second| second.keys().copied())
        .collect();
    seen.sort_unstable();
    seen.dedup();
    for shard in seen {
        shards.insert(
            shard.to_string(),
            series
                .accepted
                .iter()
                .map(|second| second.get(&shard).copied().unwrap_or(0))
                .collect(),
        );
    }
    let mut totals: BTreeMap<String, u64> = BTreeMap::new();
    for second in &series.outcomes {
        for ((status, code), n) in second {
            *totals.entry(format!("{status} {code}")).or_default() += n;
        }
    }
    let mut codes: Vec<(String, u64)> = totals.into_iter().collect();
    codes.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let by_code = codes
        .into_iter()
        .take(CODES_SHOWN)
        .map(|(label, _)| {
            let per_second = series
                .outcomes
                .iter()
                .map(|second| {
                    second
                        .iter()
                        .filter(|((status, code), _)| format!("{status} {code}") == label)
                        .map(|(_, n)| *n)
                        .sum()
                })
                .collect();
            (label, per_second)
        })
        .collect();
    Some(Snapshot {
        scenario: shared.name.clone(),
        elapsed_s: sim.started().map_or(0, |s| s.elapsed().as_secs()),
        requests: live.requests,
        accepted: live.accepted,
        errors: live.errors,
        timeline: Timeline {
            interval_s: 1,
            warmup_s: shared.warmup_s.min(seconds as u64),
            shards,
            errors: series.errors,
            requests: series.requests,
            p99_ms: series.p99_us.iter().map(|us| *us as f64 / 1000.0).collect(),
            drift: None,
        },
        by_code,
        marks: shared.marks.all(),
        pipeline: shared.pipeline.lock().expect("pipeline lock").clone(),
    })
}

/// A sampled figure per second of the timeline (`seconds` long), each
/// second holding the latest sample at or before it.
fn per_second(
    samples: &[PipelineSample],
    seconds: usize,
    f: impl Fn(&PipelineSample) -> Option<f64>,
) -> Vec<f64> {
    let mut out = vec![0.0; seconds];
    let mut last = 0.0;
    let mut next = samples.iter().peekable();
    for (second, slot) in out.iter_mut().enumerate() {
        while let Some(s) = next.peek() {
            if s.at_s as usize > second {
                break;
            }
            if let Some(v) = f(s) {
                last = v;
            }
            next.next();
        }
        *slot = last;
    }
    out
}

/// The charts and the figures above them, as the page shows them.
fn fragment(s: &Snapshot) -> serde_json::Value {
    let by_code: Vec<(String, Vec<f64>)> = s
        .by_code
        .iter()
        .map(|(label, v)| (label.clone(), v.iter().map(|n| *n as f64).collect()))
        .collect();
    let seconds = s.timeline.requests.len();
    let marks: Vec<(String, f64, f64, bool)> = s
        .marks
        .iter()
        .map(|m| {
            let to = m.to_s.unwrap_or(s.elapsed_s as f64);
            (m.name.clone(), m.from_s, to, m.kind == "fault")
        })
        .collect();
    let mut pipeline = Vec::new();
    let mut lag = Vec::new();
    if !s.pipeline.is_empty() {
        let p = &s.pipeline;
        pipeline.push((
            "outbox backlog".to_string(),
            per_second(p, seconds, |x| Some(x.outbox_backlog as f64)),
        ));
        pipeline.push((
            "unapplied".to_string(),
            per_second(p, seconds, |x| Some(x.unapplied as f64)),
        ));
        if p.iter().any(|x| x.dlq_size.is_some()) {
            pipeline.push((
                "dead letters".to_string(),
                per_second(p, seconds, |x| x.dlq_size.map(|d| d as f64)),
            ));
        }
        let groups: std::collections::BTreeSet<&String> =
            p.iter().flat_map(|x| x.lag_p99_ms.keys()).collect();
        for group in groups {
            lag.push((
                group.clone(),
                per_second(p, seconds, |x| x.lag_p99_ms.get(group).copied()),
            ));
        }
    }
    let charts = if seconds == 0 {
        "<p>Waiting for the load to start…</p>".to_string()
    } else {
        crate::html::live_charts(&s.timeline, &by_code, &marks, &pipeline, &lag)
    };
    serde_json::json!({
        "status": format!(
            "{} s · {} requests · {} transfers accepted · {} errors",
            s.elapsed_s, s.requests, s.accepted, s.errors
        ),
        "charts": charts,
        "seconds": s.timeline.requests.len(),
    })
}

async fn series(State(shared): State<Shared>) -> axum::response::Response {
    match snapshot(&shared) {
        Some(s) => axum::Json(s).into_response(),
        None => (axum::http::StatusCode::GONE, "the run's load has ended").into_response(),
    }
}

async fn events(
    State(shared): State<Shared>,
) -> Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>> {
    let first = true;
    let stream = futures_util::stream::unfold((shared, first), |(shared, first)| async move {
        if !first {
            tokio::time::sleep(EVERY).await;
        }
        // The stream ends with the load.
        let data = fragment(&snapshot(&shared)?).to_string();
        Some((Ok(Event::default().data(data)), (shared, false)))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

async fn page(State(shared): State<Shared>) -> Html<String> {
    let title = format!("shardpay live: {}", shared.name);
    let page = maud::html! {
        (maud::DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                title { (title) }
                style { (maud::PreEscaped(crate::html::stylesheet())) }
            }
            body {
                h1 { (title) }
                p #status { "Connecting…" }
                div #charts {}
                p .note { "Charts from what the simulator measures, pushed every second; the report written at the end has the rest." }
                script { (maud::PreEscaped(SCRIPT)) }
            }
        }
    };
    Html(page.into_string())
}

/// Swaps in each pushed fragment; says so when the run has ended. With
/// `?frames=N` in the address the page stops listening after N updates (a
/// still for a screenshot: a headless browser waits for open streams).
const SCRIPT: &str = r#"
const frames = Number(new URLSearchParams(location.search).get('frames') || 0);
let seen = 0;
const events = new EventSource('/events');
events.onmessage = (e) => {
  const data = JSON.parse(e.data);
  document.getElementById('status').textContent = data.status;
  document.getElementById('charts').innerHTML = data.charts;
  document.body.dataset.seconds = data.seconds;
  seen += 1;
  document.body.dataset.frames = seen;
  if (frames > 0 && seen >= frames) {
    events.close();
  }
};
events.onerror = () => {
  document.getElementById('status').textContent += ' · the run has ended (or the connection dropped)';
  events.close();
};
"#;
