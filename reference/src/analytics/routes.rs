//! The analytics service's routes: the pipeline report, the totals and
//! the dashboard page.

use axum::extract::State;
use axum::response::Response;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::http::{
    json_response, pipeline_of, pipeline_unavailable, ApiError, AppState, CommonErrors,
};

/// The dashboard page: static, it reads `/v1/analytics` from the browser.
const DASHBOARD: &str = include_str!("dashboard.html");

/// The analytics service's routes.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(pipeline_report))
        .routes(routes!(analytics_totals))
        .routes(routes!(analytics_dashboard))
}

/// The event pipeline: outbox rows and backlog, events published, and each
/// consumer's applied events, duplicates suppressed and lag.
#[utoipa::path(
    get,
    path = "/v1/pipeline",
    tag = "events",
    summary = "The event pipeline: outbox, published, per consumer applied, duplicates, lag (admin, service)",
    responses(
        (status = 200, description = "the pipeline report"),
        CommonErrors,
    ),
)]
async fn pipeline_report(State(state): State<AppState>) -> Result<Response, ApiError> {
    let pipeline = pipeline_of(&state)?;
    let report = pipeline.report().await.map_err(pipeline_unavailable)?;
    Ok(json_response(200, &report))
}

/// The analytics service's totals, overall and per shard, next to the
/// shards' own counts: `matches_shards` is true when the completed
/// transfers agree (once the pipeline has caught up).
#[utoipa::path(
    get,
    path = "/v1/analytics",
    tag = "events",
    summary = "Analytics totals per shard and overall, next to the shards' own counts (admin, service)",
    responses(
        (status = 200, description = "totals"),
        CommonErrors,
    ),
)]
async fn analytics_totals(State(state): State<AppState>) -> Result<Response, ApiError> {
    let pipeline = pipeline_of(&state)?;
    let (overall, per_shard) = pipeline.analytics.totals();
    // A shard that does not answer is shown as down (null), not an error:
    // the dashboard keeps drawing the others.
    let mut shard_completed = Vec::new();
    for store in state.manager()?.shards() {
        shard_completed.push(store.stats().await.ok().map(|s| s.transfers_completed));
    }
    let seen: Vec<Option<u64>> = (0..shard_completed.len())
        .map(|i| {
            Some(
                per_shard
                    .get(&(i as u16))
                    .map_or(0, |t| t.transfers_completed),
            )
        })
        .collect();
    let shards_healthy: Vec<bool> = shard_completed.iter().map(Option::is_some).collect();
    // Also best effort: its outbox counts read every shard.
    let pipeline_report = pipeline.report().await.ok();
    Ok(json_response(
        200,
        &serde_json::json!({
            "overall": overall,
            "per_shard": per_shard,
            "consumer": pipeline.analytics.stats(),
            "shards_completed": shard_completed,
            "matches_shards": seen == shard_completed,
            "pipeline_complete": pipeline_report.as_ref().is_some_and(|p| p.complete),
            "shards_healthy": shards_healthy,
            "outbox_backlog": pipeline_report.as_ref().map(|p| p.outbox_backlog),
            "dlq_size": pipeline_report
                .as_ref()
                .and_then(|p| p.notification.as_ref())
                .map(|n| n.dlq_size),
        }),
    ))
}

/// A page that shows the analytics totals and refreshes itself every
/// second. Self-contained: no scripts from elsewhere. It holds no data:
/// with auth on it reads `/v1/analytics` with the token given after `#`
/// in its address (`#token=...`), which never leaves the browser.
#[utoipa::path(
    get,
    path = "/dashboard/analytics",
    tag = "events",
    summary = "The analytics dashboard (HTML, refreshes itself; with auth on, open it as /dashboard/analytics#token=<admin or service access token>)",
    security(()),
    responses(
        (status = 200, description = "OK"),
    ),
)]
async fn analytics_dashboard() -> Response {
    let mut response = Response::new(axum::body::Body::from(DASHBOARD));
    response.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("text/html; charset=utf-8"),
    );
    response
}
