//! The fraud service's route: score a transfer.

use axum::extract::State;
use axum::response::Response;
use serde::Deserialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::Role;
use crate::codes::ErrorCode;
use crate::http::auth::Caller;
use crate::http::{json_response, transfer_amount, ApiError, ApiJson, AppState, CommonErrors};
use crate::ids::AccountId;

/// The fraud service's routes.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(score_transfer))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct ScoreRequest {
    from: String,
    to: String,
    amount: Option<String>,
    amount_minor: Option<i64>,
    /// Publish the decision to `fraud_events`: the shard manager asks so
    /// when it scores a transfer it is about to make.
    #[serde(default)]
    publish: bool,
}

/// The fraud service's scoring endpoint: the decision, score and reasons
/// for a transfer, recorded as an attempt of the payer. Moves no money.
#[utoipa::path(
    post,
    path = "/v1/fraud/score",
    tag = "fraud",
    summary = "Score a transfer: allow, review or block, with reasons (service, admin); publish: true also publishes the decision (the shard manager asks so)",
    request_body = ScoreRequest,
    responses(
        (status = 200, description = "decision, score, reasons"),
        CommonErrors,
    ),
)]
async fn score_transfer(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<ScoreRequest>,
) -> Result<Response, ApiError> {
    caller.require(&[Role::Service, Role::Admin])?;
    let Some(engine) = &state.fraud else {
        return Err(ApiError::new(
            ErrorCode::FraudChecksOff,
            "fraud checks are off on this server (serve --fraud on turns them on)",
        ));
    };
    let from = AccountId::parse(&body.from)?;
    let to = AccountId::parse(&body.to)?;
    let amount = transfer_amount(
        body.amount.as_deref(),
        body.amount_minor,
        state.default_currency,
    )?;
    let assessment = engine
        .score(
            from.as_str(),
            to.as_str(),
            amount.minor(),
            crate::ledger::now_ms(),
        )
        .await
        .map_err(|e| {
            ApiError::new(
                ErrorCode::FraudUnavailable,
                format!("fraud checks failed: {e}"),
            )
        })?;
    if body.publish {
        engine
            .publish(from.as_str(), to.as_str(), amount.minor(), &assessment)
            .await;
    }
    Ok(json_response(200, &assessment))
}
