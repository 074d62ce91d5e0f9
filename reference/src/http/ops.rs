//! The operational surface: a request id on every request (taken from
//! `x-request-id` or made up, echoed back and put on the request's log
//! span), per-route request counts and latency histograms, `/metrics` in
//! the Prometheus text format, and `/ready`, which answers 503 while a
//! dependency (a shard, the session store, the event bus) is unreachable.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tracing::Instrument;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{AppState, ErrorBody};

pub use crate::peers::{with_request_id, REQUEST_ID};

/// Upper bounds of the latency buckets, seconds.
const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Default)]
struct RouteStats {
    /// Requests per status code.
    by_status: BTreeMap<u16, u64>,
    /// Cumulative counts per bucket, and the +Inf bucket last.
    buckets: [u64; BUCKETS.len() + 1],
    sum_s: f64,
    count: u64,
}

/// Request counts and latencies per (method, route).
#[derive(Default)]
pub struct Metrics {
    routes: Mutex<BTreeMap<(String, String), RouteStats>>,
}

impl Metrics {
    fn observe(&self, method: &str, route: &str, status: u16, seconds: f64) {
        let mut routes = self.routes.lock().expect("metrics lock");
        let s = routes
            .entry((method.to_string(), route.to_string()))
            .or_default();
        *s.by_status.entry(status).or_default() += 1;
        for (i, bound) in BUCKETS.iter().enumerate() {
            if seconds <= *bound {
                s.buckets[i] += 1;
            }
        }
        s.buckets[BUCKETS.len()] += 1;
        s.sum_s += seconds;
        s.count += 1;
    }

    fn render(&self, out: &mut String) {
        let routes = self.routes.lock().expect("metrics lock");
        let _ = writeln!(
            out,
            "# HELP shardpay_http_requests_total HTTP requests answered, by route and status."
        );
        let _ = writeln!(out, "# TYPE shardpay_http_requests_total counter");
        for ((method, route), s) in routes.iter() {
            for (status, n) in &s.by_status {
                let _ = writeln!(
                    out,
                    "shardpay_http_requests_total{{method=\"{method}\",route=\"{route}\",status=\"{status}\"}} {n}"
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP shardpay_http_request_duration_seconds Time to answer, by route."
        );
        let _ = writeln!(
            out,
            "# TYPE shardpay_http_request_duration_seconds histogram"
        );
        for ((method, route), s) in routes.iter() {
            let labels = format!("method=\"{method}\",route=\"{route}\"");
            for (bound, n) in BUCKETS.iter().zip(s.buckets.iter()) {
                let _ = writeln!(
                    out,
                    "shardpay_http_request_duration_seconds_bucket{{{labels},le=\"{bound}\"}} {n}"
                );
            }
            let _ = writeln!(
                out,
                "shardpay_http_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}",
                s.buckets[BUCKETS.len()]
            );
            let _ = writeln!(
                out,
                "shardpay_http_request_duration_seconds_sum{{{labels}}} {}",
                s.sum_s
            );
            let _ = writeln!(
                out,
                "shardpay_http_request_duration_seconds_count{{{labels}}} {}",
                s.count
            );
        }
    }
}

/// Middleware on every route: request id, log span, metrics.
pub async fn observe(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let id = request
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.chars().all(|c| c.is_ascii_graphic()))
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string()[..16].to_string());
    if let Ok(value) = HeaderValue::from_str(&id) {
        request.headers_mut().insert(REQUEST_ID, value);
    }
    // The method is a label of the metrics: only the standard ones are
    // kept as they are, so invented methods cannot grow /metrics.
    let method = match request.method().as_str() {
        m @ ("GET" | "HEAD" | "POST" | "PUT" | "DELETE" | "PATCH" | "OPTIONS") => m.to_string(),
        _ => "other".to_string(),
    };
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let span = tracing::info_span!("request", request_id = %id, %method, %route);
    let started = Instant::now();
    let mut response = crate::peers::CURRENT_REQUEST_ID
        .scope(id.clone(), next.run(request).instrument(span.clone()))
        .await;
    let seconds = started.elapsed().as_secs_f64();
    let status = response.status().as_u16();
    span.in_scope(|| tracing::debug!(status, ms = seconds * 1e3, "answered"));
    state.metrics.observe(&method, &route, status, seconds);
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID, value);
    }
    response
}

/// `/health` (liveness) of the services other than the shard manager,
/// whose `/health` is the modelled system's.
pub fn health_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(health))
}

#[utoipa::path(
    get,
    path = "/health",
    tag = "operations",
    summary = "Liveness (the shard manager's in the modelled system's shape)",
    security(()),
    responses(
        (status = 200, description = "OK"),
    ),
)]
async fn health(State(state): State<AppState>) -> Response {
    axum::Json(serde_json::json!({ "ok": true, "service": state.service.name() })).into_response()
}

/// The services `state`'s service calls, by name and URL.
fn peers_needed(state: &AppState) -> Vec<(&'static str, String)> {
    use crate::peers::Service;
    let Some(peers) = &state.peers else {
        return Vec::new();
    };
    let mut needed = Vec::new();
    let auth_on = state.auth.is_some();
    match state.service {
        Service::ShardManager => {
            if auth_on {
                needed.push(("auth", peers.auth.clone()));
            }
            if state.fraud.as_ref().is_some_and(|f| f.is_remote()) {
                needed.push(("fraud", peers.fraud.clone()));
            }
        }
        Service::Notification if auth_on => needed.push(("auth", peers.auth.clone())),
        Service::Analytics => {
            needed.push(("ledger", peers.ledger.clone()));
            needed.push(("notification", peers.notification.clone()));
        }
        _ => {}
    }
    needed
}

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(metrics))
        .routes(routes!(ready))
        .routes(routes!(openapi))
        .routes(routes!(docs))
}

#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "operations",
    summary = "This document",
    security(()),
    responses(
        (status = 200, description = "OK"),
    ),
)]
async fn openapi() -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        super::openapi_json(),
    )
        .into_response()
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The API description as a page: every operation with its summary, who
/// may call it, its body fields and its answers. Self-contained: no
/// scripts, nothing fetched.
#[utoipa::path(
    get,
    path = "/docs",
    tag = "operations",
    summary = "This document as a page",
    security(()),
    responses(
        (status = 200, description = "OK"),
    ),
)]
async fn docs() -> Response {
    let spec: serde_json::Value =
        serde_json::from_str(super::openapi_json()).expect("the API description is JSON");
    let mut page = String::from(
        "<!doctype html><meta charset=utf-8><title>shardpay API</title>\
         <style>body{font:14px system-ui;max-width:960px;margin:2em auto;padding:0 1em}\
         code{background:#f3f3f3;padding:1px 4px}h2{margin-top:1.6em}.m{font-weight:bold;\
         display:inline-block;width:4em}td{padding:2px 8px;vertical-align:top}</style>",
    );
    let info = &spec["info"];
    let _ = write!(
        page,
        "<h1>{}</h1><p>{}</p><p>Machine-readable: <a href=/openapi.json>/openapi.json</a> (OpenAPI 3).</p>",
        escape(info["title"].as_str().unwrap_or("")),
        escape(info["description"].as_str().unwrap_or(""))
    );
    if let Some(paths) = spec["paths"].as_object() {
        for (path, ops) in paths {
            let Some(ops) = ops.as_object() else { continue };
            for (method, op) in ops {
                // `[]` or `[{}]`: no token needed.
                let public = op["security"].as_array().is_some_and(|a| {
                    a.iter()
                        .all(|r| r.as_object().is_some_and(|r| r.is_empty()))
                });
                let _ = write!(
                    page,
                    "<h2><span class=m>{}</span><code>{}</code></h2><p>{}{}</p>",
                    method.to_uppercase(),
                    escape(path),
                    escape(op["summary"].as_str().unwrap_or("")),
                    if public {
                        " · no token needed"
                    } else {
                        " · bearer token"
                    }
                );
                let mut schema = &op["requestBody"]["content"]["application/json"]["schema"];
                if let Some(name) = schema["$ref"]
                    .as_str()
                    .and_then(|r| r.strip_prefix("#/components/schemas/"))
                {
                    schema = &spec["components"]["schemas"][name];
                }
                let fields = &schema["properties"];
                if let Some(fields) = fields.as_object() {
                    let names: Vec<String> = fields
                        .keys()
                        .map(|k| format!("<code>{}</code>", escape(k)))
                        .collect();
                    let _ = write!(page, "<p>Body: {}</p>", names.join(", "));
                }
                if let Some(responses) = op["responses"].as_object() {
                    page.push_str("<table>");
                    for (code, r) in responses {
                        let _ = write!(
                            page,
                            "<tr><td><code>{}</code></td><td>{}</td></tr>",
                            escape(code),
                            escape(r["description"].as_str().unwrap_or(""))
                        );
                    }
                    page.push_str("</table>");
                }
            }
        }
    }
    (
        [(axum::http::header::CONTENT_TYPE, "text/html; charset=utf-8")],
        page,
    )
        .into_response()
}

fn gauge(out: &mut String, name: &str, help: &str, samples: &[(String, f64)]) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} gauge");
    for (labels, value) in samples {
        if labels.is_empty() {
            let _ = writeln!(out, "{name} {value}");
        } else {
            let _ = writeln!(out, "{name}{{{labels}}} {value}");
        }
    }
}

#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    summary = "Prometheus metrics (text format)",
    security(()),
    responses(
        (status = 200, description = "OK"),
    ),
)]
async fn metrics(State(state): State<AppState>) -> Response {
    let mut out = String::new();
    state.metrics.render(&mut out);
    if state.manager.is_some() {
        let shards = super::v1::shard_bodies(&state).await;
        let (mut pending, mut completed, mut failed) = (0u64, 0u64, 0u64);
        for s in &shards {
            pending += s.transfers.pending;
            completed += s.transfers.completed;
            failed += s.transfers.failed;
        }
        gauge(
            &mut out,
            "shardpay_transfers",
            "Transfers on all shards, by state.",
            &[
                ("state=\"pending\"".into(), pending as f64),
                ("state=\"completed\"".into(), completed as f64),
                ("state=\"failed\"".into(), failed as f64),
            ],
        );
        gauge(
            &mut out,
            "shardpay_shard_healthy",
            "1 when the shard answers.",
            &shards
                .iter()
                .map(|s| {
                    (
                        format!("shard=\"{}\"", s.shard),
                        if s.healthy { 1.0 } else { 0.0 },
                    )
                })
                .collect::<Vec<_>>(),
        );
    }
    if let Some(pipeline) = &state.pipeline {
        if let Ok(report) = pipeline.report().await {
            gauge(
                &mut out,
                "shardpay_outbox_backlog",
                "Outbox rows not yet published.",
                &[(String::new(), report.outbox_backlog as f64)],
            );
            gauge(
                &mut out,
                "shardpay_outbox_rows",
                "Outbox rows on all shards.",
                &[(String::new(), report.outbox_rows as f64)],
            );
            gauge(
                &mut out,
                "shardpay_consumer_unapplied",
                "Outbox events a consumer group has not applied yet (its lag, in events).",
                &report
                    .unapplied
                    .iter()
                    .filter(|(g, _)| runs_group(&state, g))
                    .map(|(g, n)| (format!("group=\"{g}\""), *n as f64))
                    .collect::<Vec<_>>(),
            );
            gauge(
                &mut out,
                "shardpay_consumer_lag_seconds",
                "Commit-to-consume lag of applied events, by group and quantile.",
                &report
                    .consumers
                    .iter()
                    .filter(|c| c.lag.count > 0 && runs_group(&state, &c.group))
                    .flat_map(|c| {
                        [
                            (
                                format!("group=\"{}\",quantile=\"0.5\"", c.group),
                                c.lag.p50_ms / 1e3,
                            ),
                            (
                                format!("group=\"{}\",quantile=\"0.99\"", c.group),
                                c.lag.p99_ms / 1e3,
                            ),
                        ]
                    })
                    .collect::<Vec<_>>(),
            );
            if let Some(n) = report
                .notification
                .as_ref()
                .filter(|_| state.service.runs(crate::peers::Service::Notification))
            {
                gauge(
                    &mut out,
                    "shardpay_dlq_size",
                    "Webhook deliveries in the dead-letter store.",
                    &[(String::new(), n.dlq_size as f64)],
                );
            }
        }
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
        .into_response()
}

/// Whether this process runs the consumer group `group`.
fn runs_group(state: &AppState, group: &str) -> bool {
    use crate::peers::Service;
    if group == crate::events::ANALYTICS_GROUP {
        state.service.runs(Service::Analytics)
    } else if group == crate::notification::NOTIFICATION_GROUP {
        state.service.runs(Service::Notification)
    } else {
        true
    }
}

/// 200 when every dependency answers, else 503 naming those that do not.
#[utoipa::path(
    get,
    path = "/ready",
    tag = "operations",
    summary = "Readiness: every shard, the session store, the event bus and the services this one calls answer",
    security(()),
    responses(
        (status = 200, description = "ready"),
        (status = 503, description = "what does not answer", body = ErrorBody),
    ),
)]
async fn ready(State(state): State<AppState>) -> Response {
    let mut problems = Vec::new();
    for s in super::v1::shard_bodies(&state).await {
        if !s.healthy {
            problems.push(format!("shard {} ({}) does not answer", s.shard, s.name));
        }
    }
    if let Some(auth) = &state.auth {
        if let Err(e) = auth.stores.sessions.get("readiness-probe").await {
            problems.push(format!("session store: {e}"));
        }
    }
    if let Some(pipeline) = &state.pipeline {
        if let Err(e) = pipeline.bus.ready().await {
            problems.push(format!("event bus: {e:#}"));
        }
    }
    for (name, url) in peers_needed(&state) {
        let health = format!("{}/health", url.trim_end_matches('/'));
        let answer = reqwest::Client::new()
            .get(&health)
            .timeout(std::time::Duration::from_secs(2))
            .send()
            .await;
        match answer {
            Ok(r) if r.status().is_success() => {}
            Ok(r) => problems.push(format!("{name} service at {url} answered {}", r.status())),
            Err(e) => problems.push(format!("{name} service at {url} does not answer: {e}")),
        }
    }
    let status = if problems.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        axum::Json(serde_json::json!({ "ready": problems.is_empty(), "problems": problems })),
    )
        .into_response()
}
