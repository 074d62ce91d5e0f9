//! The operational surface: a request id on every request (taken from
//! `x-request-id` or made up, echoed back and put on the request's log
//! span), per-route request counts and latency histograms, `/metrics` in
//! the Prometheus text format, and `/ready`, which answers 503 while a
//! dependency (a shard, the session store, the event bus) is unreachable.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tracing::Instrument;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::metrics::{GroupLabel, LagLabel, Route, ShardLabel, ShardStateLabel, StateLabel};
use super::{AppState, ErrorBody};

pub use crate::peers::{with_request_id, REQUEST_ID};

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
        "GET" => "GET",
        "HEAD" => "HEAD",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "PATCH" => "PATCH",
        "OPTIONS" => "OPTIONS",
        _ => "other",
    };
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .cloned()
        .map_or(Route::Unmatched, Route::Matched);
    let span = tracing::info_span!("request", request_id = %id, %method, route = route.as_str());
    let started = Instant::now();
    let mut response = crate::peers::CURRENT_REQUEST_ID
        .scope(id.clone(), next.run(request).instrument(span.clone()))
        .await;
    let seconds = started.elapsed().as_secs_f64();
    let status = response.status().as_u16();
    span.in_scope(|| tracing::debug!(status, ms = seconds * 1e3, "answered"));
    state.metrics.observe(method, route, status, seconds);
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

/// The services `state`'s service calls, by name and replicas.
fn peers_needed(state: &AppState) -> Vec<(&'static str, crate::peers::Replicas)> {
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
    if state.manager.is_some() {
        shard_gauges(&state).await;
    }
    if let Some(pipeline) = &state.pipeline {
        if let Ok(report) = pipeline.report().await {
            pipeline_gauges(&state, &report);
        }
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

/// Transfers by state and each shard's health, read now.
async fn shard_gauges(state: &AppState) {
    let shards = super::shard_bodies(state).await;
    let m = &state.metrics;
    let count = |f: fn(&super::TransferCounts) -> u64| -> i64 {
        shards.iter().map(|s| f(&s.transfers)).sum::<u64>() as i64
    };
    for (label, n) in [
        ("pending", count(|t| t.pending)),
        ("completed", count(|t| t.completed)),
        ("failed", count(|t| t.failed)),
    ] {
        m.transfers
            .get_or_create(&StateLabel { state: label })
            .set(n);
    }
    for s in &shards {
        m.shard_healthy
            .get_or_create(&ShardLabel { shard: s.shard })
            .set(i64::from(s.healthy));
        for (label, n) in [
            ("pending", s.transfers.pending),
            ("completed", s.transfers.completed),
            ("failed", s.transfers.failed),
        ] {
            m.shard_transfers
                .get_or_create(&ShardStateLabel {
                    shard: s.shard,
                    state: label,
                })
                .set(n as i64);
        }
    }
}

/// The outbox, the consumer groups this process runs, and the dead
/// letters, from the pipeline's report.
fn pipeline_gauges(state: &AppState, report: &crate::pipeline::PipelineReport) {
    let m = &state.metrics;
    m.outbox_backlog.set(report.outbox_backlog as i64);
    m.outbox_rows.set(report.outbox_rows as i64);
    for (group, n) in report
        .unapplied
        .iter()
        .filter(|(g, _)| runs_group(state, g))
    {
        m.consumer_unapplied
            .get_or_create(&GroupLabel {
                group: group.clone(),
            })
            .set(*n as i64);
    }
    let lagging = report
        .consumers
        .iter()
        .filter(|c| c.lag.count > 0 && runs_group(state, &c.group));
    for c in lagging {
        for (quantile, ms) in [("0.5", c.lag.p50_ms), ("0.99", c.lag.p99_ms)] {
            let label = LagLabel {
                group: c.group.clone(),
                quantile,
            };
            m.consumer_lag.get_or_create(&label).set(ms / 1e3);
        }
    }
    if let Some(n) = report
        .notification
        .as_ref()
        .filter(|_| state.service.runs(crate::peers::Service::Notification))
    {
        m.dlq_size.set(n.dlq_size as i64);
    }
}

/// Whether this process runs the consumer group `group`.
fn runs_group(state: &AppState, group: &str) -> bool {
    use crate::peers::Service;
    if group == crate::analytics::ANALYTICS_GROUP {
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
    for s in super::shard_bodies(&state).await {
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
    // A peer is there when one of its replicas answers.
    let client = reqwest::Client::new();
    for (name, replicas) in peers_needed(&state) {
        let answer = replicas
            .send_waiting(
                "/health",
                |url| client.get(url).timeout(std::time::Duration::from_secs(2)),
                std::time::Duration::ZERO,
            )
            .await;
        match answer {
            Ok(r) if r.status().is_success() => {}
            Ok(r) => problems.push(format!(
                "{name} service at {} answered {}",
                r.url(),
                r.status()
            )),
            Err(e) => problems.push(format!("{name} service at {e}")),
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
