//! The notification service's routes: webhooks, dead letters and the
//! consumer's figures.

use axum::extract::State;
use axum::response::Response;
use serde::Deserialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::Role;
use crate::codes::ErrorCode;
use crate::http::auth::Caller;
use crate::http::{
    json_response, pipeline_of, ApiError, ApiJson, AppState, CommonErrors, ErrorBody,
};
use crate::ids::AccountId;
use crate::notification::WebhookRefused;

/// The notification service's routes.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(register_webhook))
        .routes(routes!(list_dead_letters))
        .routes(routes!(replay_dead_letters))
        .routes(routes!(notification_stats))
}

/// The notification consumer's deliveries, dead letters and applied
/// events (the analytics service's pipeline report reads it).
#[utoipa::path(
    get,
    path = "/v1/notification/stats",
    tag = "notifications",
    summary = "The notification consumer's counts: events applied, deliveries, attempts, dead letters (admin, service)",
    responses(
        (status = 200, description = "counts"),
        CommonErrors,
    ),
)]
async fn notification_stats(State(state): State<AppState>) -> Result<Response, ApiError> {
    let pipeline = pipeline_of(&state)?;
    let stats = pipeline.notifier.stats().await.map_err(unavailable)?;
    Ok(json_response(200, &stats))
}

/// The notification store failed: 503, nothing changed, retry.
fn unavailable(error: super::store::StoreError) -> ApiError {
    tracing::warn!(%error, "the notification store does not answer");
    ApiError::new(
        ErrorCode::NotificationStoreUnavailable,
        "the notification service's store does not answer; nothing changed, retry",
    )
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct RegisterWebhook {
    account: String,
    url: String,
}

/// Registers a webhook for an account. The answer carries the signing
/// secret, shown this once.
#[utoipa::path(
    post,
    path = "/v1/webhooks",
    tag = "notifications",
    summary = "Register a signed webhook for an account (its owner, admin); the secret is shown once",
    request_body = RegisterWebhook,
    responses(
        (status = 201, description = "the webhook and its secret"),
        (status = 404, description = "no such account", body = ErrorBody),
        (status = 401, description = "missing, invalid, expired or revoked token", body = ErrorBody),
        (status = 403, description = "not allowed for this caller", body = ErrorBody),
        (status = 422, description = "invalid URL, or not a public address (unless the server allows private networks)", body = ErrorBody),
        (status = 429, description = "rate limited (Retry-After)", body = ErrorBody),
        (status = 503, description = "a shard, the session store, the notification store or (split) the fraud or auth service is unavailable; nothing changed, retry", body = ErrorBody),
        (status = 409, description = "the account has its maximum of 5 webhooks", body = ErrorBody),
    ),
)]
async fn register_webhook(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<RegisterWebhook>,
) -> Result<Response, ApiError> {
    let pipeline = pipeline_of(&state)?;
    let account = AccountId::parse(&body.account)?;
    if !caller.is_admin() {
        caller.may_debit(&state, account.as_str()).await?;
    }
    state.account(&account).await?;
    let webhook = pipeline
        .notifier
        .register(account.as_str(), &body.url)
        .await
        .map_err(|e| match e {
            WebhookRefused::StoreFailed(e) => unavailable(e),
            e => ApiError::new(e.code(), e.to_string()),
        })?;
    Ok(json_response(201, &webhook))
}

#[utoipa::path(
    get,
    path = "/v1/dlq",
    tag = "notifications",
    summary = "Dead-lettered webhook deliveries (admin)",
    responses(
        (status = 200, description = "dead letters"),
        CommonErrors,
    ),
)]
async fn list_dead_letters(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Response, ApiError> {
    caller.require(&[Role::Admin])?;
    let pipeline = pipeline_of(&state)?;
    Ok(json_response(
        200,
        &serde_json::json!({ "dead_letters": pipeline.notifier.dead_letters().await.map_err(unavailable)? }),
    ))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct Replay {
    #[serde(default)]
    ids: Vec<String>,
    #[serde(default)]
    all: bool,
}

/// Delivers dead letters again: `{"ids": [...]}` or `{"all": true}`.
#[utoipa::path(
    post,
    path = "/v1/dlq/replay",
    tag = "notifications",
    summary = "Deliver dead letters again: ids, or all (admin)",
    request_body = Replay,
    responses(
        (status = 200, description = "what was delivered, skipped, failed"),
        CommonErrors,
    ),
)]
async fn replay_dead_letters(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<Replay>,
) -> Result<Response, ApiError> {
    caller.require(&[Role::Admin])?;
    let pipeline = pipeline_of(&state)?;
    if body.all == !body.ids.is_empty() {
        return Err(ApiError::new(
            ErrorCode::ReplayWhat,
            "give either ids (a list of dead-letter ids) or all: true",
        ));
    }
    let outcome = if body.all {
        pipeline.notifier.replay(None).await
    } else {
        pipeline.notifier.replay(Some(&body.ids)).await
    };
    let outcome = outcome.map_err(unavailable)?;
    Ok(json_response(200, &outcome))
}
