//! The ledger service's routes: trial balance, statements and the outbox
//! relay's figures.

use axum::extract::{Path, Query, State};
use axum::response::Response;
use serde::Deserialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::Role;
use crate::codes::ErrorCode;
use crate::http::auth::Caller;
use crate::http::{
    json_response, pipeline_of, AccountBody, ApiError, AppState, CommonErrors, ErrorBody, MAX_PAGE,
};
use crate::ids::AccountId;
use crate::manager::statement::StatementCursor;
use crate::money::Currency;

/// The ledger service's routes.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(trial_balance))
        .routes(routes!(account_entries))
        .routes(routes!(relay_stats))
}

/// Per shard, what its ledger adds up to: the sum of its entries per
/// currency (zero when it balances), balance totals per kind of account,
/// and the money it sent into and took out of flight.
#[utoipa::path(
    get,
    path = "/v1/ledger/trial-balance",
    tag = "ledger",
    summary = "Per shard: sum of entries per currency (zero when balanced), balance totals per kind of account, money sent into and taken out of flight (admin, service)",
    responses(
        (status = 200, description = "shards"),
        CommonErrors,
    ),
)]
async fn trial_balance(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Response, ApiError> {
    caller.require(&[Role::Admin, Role::Service])?;
    let mut shards = Vec::new();
    for store in state.manager()?.shards() {
        let a = store
            .audit()
            .await
            .map_err(crate::manager::ManagerError::from)?;
        let sums = |v: &[(Currency, i128)]| -> serde_json::Map<String, serde_json::Value> {
            v.iter()
                .map(|(c, m)| (c.to_string(), serde_json::Value::from(*m as i64)))
                .collect()
        };
        let totals: Vec<serde_json::Value> = a
            .totals
            .iter()
            .map(|(kind, c, m)| {
                serde_json::json!({ "kind": kind, "currency": c.to_string(), "balance_minor": *m as i64 })
            })
            .collect();
        shards.push(serde_json::json!({
            "shard": store.shard().index(),
            "entry_sum_minor": sums(&a.entry_sum_by_currency),
            "balanced": a.entry_sum_by_currency.iter().all(|(_, m)| *m == 0),
            "totals": totals,
            "sent_into_flight_minor": sums(&a.sent_minor_by_currency),
            "taken_out_of_flight_minor": sums(&a.received_minor_by_currency),
        }));
    }
    Ok(json_response(200, &serde_json::json!({ "shards": shards })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EntriesQuery {
    after: Option<String>,
    limit: Option<u32>,
}

/// An account's statement: its ledger entries, oldest first, a page at a
/// time (`after` the `next_after` of the previous page). An account a
/// reshard moved has entries on each shard it has lived on; the statement
/// merges them in time order and names each entry's shard.
#[utoipa::path(
    get,
    path = "/v1/accounts/{id}/entries",
    tag = "ledger",
    summary = "An account's statement: its ledger entries on every shard it has lived on, oldest first, a page at a time (its owner, admin, service; the ledger service)",
    params(
        ("id" = String, Path),
        ("after" = Option<String>, Query, description = "the next_after of the previous page"),
        ("limit" = Option<i64>, Query),
    ),
    responses(
        (status = 200, description = "account, entries (each with its shard), next_after"),
        (status = 404, description = "no such account", body = ErrorBody),
        CommonErrors,
    ),
)]
async fn account_entries(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    query: Result<Query<EntriesQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query?;
    let id = AccountId::parse(&id)?;
    caller.may_read(&state, id.as_str()).await?;
    let limit = query.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_PAGE {
        return Err(ApiError::new(
            ErrorCode::InvalidLimit,
            format!("limit must be 1 to {MAX_PAGE}"),
        ));
    }
    let manager = state.manager()?;
    let cursor = StatementCursor::parse(
        query.after.as_deref().unwrap_or_default(),
        manager.shards().len(),
    )
    .map_err(|why| ApiError::new(ErrorCode::InvalidQuery, why))?;
    let account = state.account(&id).await?;
    let page = manager.statement(&id, &cursor, limit).await?;
    Ok(json_response(
        200,
        &serde_json::json!({
            "account": AccountBody::from(&account),
            "entries": page.entries,
            "next_after": page.next.map(|c| c.render()),
        }),
    ))
}

/// What this process's outbox relay has published.
#[utoipa::path(
    get,
    path = "/v1/ledger/relay",
    tag = "ledger",
    summary = "What this process's outbox relay has published, and its failed passes (admin, service)",
    responses(
        (status = 200, description = "counts"),
        CommonErrors,
    ),
)]
async fn relay_stats(State(state): State<AppState>) -> Result<Response, ApiError> {
    let pipeline = pipeline_of(&state)?;
    Ok(json_response(200, &pipeline.relay_stats()))
}
