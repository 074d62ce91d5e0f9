//! The shard manager's routes: accounts and transfers under `/v1`, the
//! shards' figures and the audit (which the ledger service serves too),
//! and the modelled system's routes ([`legacy`]) so its walkthrough and
//! clients run as written. Amounts go in as decimal text of the major unit
//! (`"amount": "4.50"`) or as integer minor units (`"amount_minor": 450`),
//! and come out as both.

mod legacy;

use axum::extract::{Path, Query, State};
use axum::response::Response;
use axum::Json;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use crate::audit::{self, AuditReport};
use crate::auth::Role;
use crate::codes::ErrorCode;
use crate::http::auth::Caller;
use crate::http::{
    amount_of, json, json_response, send, shard_bodies, transfer_amount, AccountBody, ApiError,
    ApiJson, AppState, CommonErrors, ErrorBody, IdempotencyHeader, TransferBody, MAX_PAGE,
};
use crate::ids::{AccountId, TransferId};
use crate::ledger::{Account, StoredResponse, Transfer, TransferState};
use crate::manager::reshard::ReshardStatus;
use crate::manager::{AccountRequest, TransferRequest, View};
use crate::money::{Amount, Currency};
use crate::sharding::Strategy;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// The shard manager's `/v1` routes: accounts and transfers.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_account, list_accounts))
        .routes(routes!(create_accounts_bulk))
        .routes(routes!(get_account))
        .routes(routes!(create_transfer))
        .routes(routes!(lookup_transfers))
        .routes(routes!(get_transfer))
        .routes(routes!(start_reshard, reshard_status))
        .merge(legacy::routes())
}

/// The routes of every service that reads the shards (the shard manager
/// and the ledger): their figures and the audit.
pub fn shard_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(shards))
        .routes(routes!(run_audit))
}

const ACCOUNT_VIEW: View<Account> = View {
    route: "v1.create_account",
    render: |a| json(201, &AccountBody::from(a)),
};

/// 201 completed, 202 pending (the payee's shard will be credited by
/// recovery), 422 failed (the credit was refused and the debit reversed).
fn render_transfer(t: &Transfer) -> StoredResponse {
    let status = match t.state {
        TransferState::Completed => 201,
        TransferState::Pending => 202,
        TransferState::Failed => 422,
    };
    json(status, &TransferBody::from(t))
}

const TRANSFER_VIEW: View<Transfer> = View {
    route: "v1.create_transfer",
    render: render_transfer,
};

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct CreateAccount {
    id: String,
    /// The user who may pay from it (admins only; a user's own accounts
    /// are theirs).
    owner: Option<String>,
    currency: Option<String>,
    opening_balance: Option<String>,
    opening_balance_minor: Option<i64>,
}

#[utoipa::path(
    post,
    path = "/v1/accounts",
    tag = "accounts",
    summary = "Create an account (users: their own, unfunded; admins: any owner and opening balance)",
    params(
        ("Idempotency-Key" = Option<String>, Header, description = "Same key and body replays the first answer; same key, other body: 422; while the first runs: 409."),
    ),
    request_body = CreateAccount,
    responses(
        (status = 201, description = "created", body = AccountBody),
        (status = 409, description = "account exists", body = ErrorBody),
        CommonErrors,
    ),
)]
async fn create_account(
    State(state): State<AppState>,
    caller: Caller,
    IdempotencyHeader(key): IdempotencyHeader,
    ApiJson(body): ApiJson<CreateAccount>,
) -> Result<Response, ApiError> {
    let mut request = account_request(&state, &body)?;
    let owner = owner_for(&caller, &body, &request)?;
    if let (Some(p), Some(auth)) = (caller.principal(), &state.auth) {
        if p.role == Role::User {
            auth.limit("accounts-user", &p.username, crate::auth::ACCOUNTS_PER_USER)
                .await?;
        }
    }
    request.owner = owner.clone();
    let id = request.id.clone();
    let pair = [(id.as_str(), owner.as_deref())];
    if !check_owners(&state, &pair).await?[0] {
        return Err(owned_by_another(id.as_str()));
    }
    let reply = state
        .manager()?
        .create_account(request, key, &ACCOUNT_VIEW)
        .await?;
    record_owners(&state, &pair, &[reply.response.status < 300]).await?;
    Ok(send(reply))
}

/// Who will own an account `caller` creates: a user owns what it creates
/// (with no opening balance: only an admin funds accounts); an admin names
/// the owner, or none; a service creates nothing.
fn owner_for(
    caller: &Caller,
    body: &CreateAccount,
    request: &AccountRequest,
) -> Result<Option<String>, ApiError> {
    let Some(p) = caller.principal() else {
        return Ok(body.owner.clone());
    };
    match p.role {
        Role::Admin => Ok(body.owner.clone()),
        Role::User => {
            if !crate::auth::names_own_account(&p.username, request.id.as_str()) {
                // Otherwise a user could create the account named after
                // another user (who then cannot) and be paid in its place.
                return Err(ApiError::new(ErrorCode::AccountIdNotYours,
                    format!(
                        "a user's accounts are named after it: {0}, or {0} followed by '-', '.', '_' or '@' and more",
                        p.username
                    ),
                ));
            }
            if body.owner.as_ref().is_some_and(|o| *o != p.username) {
                return Err(ApiError::new(
                    ErrorCode::Forbidden,
                    "a user creates accounts for itself only; leave owner out",
                ));
            }
            if request.opening_balance.minor() != 0 {
                return Err(ApiError::new(
                    ErrorCode::OpeningBalanceRequiresAdmin,
                    "only an admin creates accounts with an opening balance",
                ));
            }
            Ok(Some(p.username.clone()))
        }
        Role::Service => Err(ApiError::new(
            ErrorCode::Forbidden,
            "a service token may not create accounts",
        )),
    }
}

fn owned_by_another(account: &str) -> ApiError {
    ApiError::new(
        ErrorCode::AccountExists,
        format!("account {account} exists and belongs to another user"),
    )
}

/// Before accounts are created for owners: every owner named must be a
/// registered user (422 `unknown_owner`); answers, per account, whether it
/// is free for its owner (no owner yet, or that one). Records nothing.
pub(crate) async fn check_owners(
    state: &AppState,
    pairs: &[(&str, Option<&str>)],
) -> Result<Vec<bool>, ApiError> {
    let Some(auth) = &state.auth else {
        return Ok(vec![true; pairs.len()]);
    };
    let owned: Vec<(&str, &str)> = pairs
        .iter()
        .filter_map(|(a, o)| o.map(|o| (*a, o)))
        .collect();
    let mut answers = auth.check_owners(&owned).await?.into_iter();
    Ok(pairs
        .iter()
        .map(|(_, o)| o.is_none() || answers.next().unwrap_or(false))
        .collect())
}

/// After the creates: records the owner of each account that `made` says
/// this request created (or replayed the creation of, with the same key
/// and the same owner in its fingerprint). An account whose create failed
/// (it existed already, say) gets no owner from this request: ownership
/// follows only the create that made the account. If this step fails, the
/// account stays without an owner: nobody can pay from it until the
/// create is retried with its Idempotency-Key or an admin assigns it.
pub(crate) async fn record_owners(
    state: &AppState,
    pairs: &[(&str, Option<&str>)],
    made: &[bool],
) -> Result<(), ApiError> {
    let Some(auth) = &state.auth else {
        return Ok(());
    };
    let owned: Vec<(&str, &str)> = pairs
        .iter()
        .zip(made)
        .filter(|(_, made)| **made)
        .filter_map(|((a, o), _)| o.map(|o| (*a, o)))
        .collect();
    let recorded = auth.claim(&owned).await?;
    for ((account, owner), mine) in owned.iter().zip(recorded) {
        if !mine {
            tracing::warn!(%account, %owner, "an account was created for an owner, but an admin had given it to another user first");
        }
    }
    Ok(())
}

/// Most accounts one bulk request creates; 500 accounts fit well inside the
/// body limit (`MAX_BODY_BYTES`).
pub const MAX_BULK: usize = 500;
/// Creates of one bulk request in flight at once.
const BULK_CONCURRENCY: usize = 16;

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct BulkAccounts {
    accounts: Vec<CreateAccount>,
}

#[derive(Serialize)]
struct BulkResult {
    id: String,
    /// The status a single create would have answered: 201, or the error's.
    status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    account: Option<Box<serde_json::value::RawValue>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<serde_json::Value>,
}

fn account_request(state: &AppState, body: &CreateAccount) -> Result<AccountRequest, ApiError> {
    let id = AccountId::parse(&body.id)?;
    let currency = match &body.currency {
        Some(code) => Currency::parse(code)?,
        None => state.default_currency,
    };
    let opening_balance = amount_of(
        body.opening_balance.as_deref(),
        body.opening_balance_minor,
        currency,
        "opening_balance",
    )?
    .unwrap_or(Amount::ZERO);
    Ok(AccountRequest {
        id,
        currency,
        opening_balance,
        owner: None,
    })
}

/// Creates up to `MAX_BULK` accounts in one request. Each account succeeds
/// or fails on its own (an existing id answers 409 for that item only); the
/// creates run concurrently, so each shard's writer commits them in groups.
#[utoipa::path(
    post,
    path = "/v1/accounts/bulk",
    tag = "accounts",
    summary = "Create up to 500 accounts, each answering for itself (admin)",
    request_body = BulkAccounts,
    responses(
        (status = 200, description = "results, one per account"),
        CommonErrors,
    ),
)]
async fn create_accounts_bulk(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<BulkAccounts>,
) -> Result<Response, ApiError> {
    caller.require(&[Role::Admin])?;
    if body.accounts.is_empty() || body.accounts.len() > MAX_BULK {
        return Err(ApiError::new(
            ErrorCode::BulkSize,
            format!("send 1 to {MAX_BULK} accounts per bulk request"),
        ));
    }
    let owned_pairs: Vec<(String, Option<String>)> = body
        .accounts
        .iter()
        .map(|a| (a.id.clone(), a.owner.clone()))
        .collect();
    let pairs: Vec<(&str, Option<&str>)> = owned_pairs
        .iter()
        .map(|(a, o)| (a.as_str(), o.as_deref()))
        .collect();
    let free = check_owners(&state, &pairs).await?;
    let creates = body.accounts.into_iter().zip(free).map(|(item, free)| {
        let state = state.clone();
        async move {
            let result = match account_request(&state, &item) {
                Ok(_) if !free => Err(owned_by_another(&item.id)),
                Ok(mut request) => {
                    request.owner = item.owner.clone();
                    match state.manager() {
                        Ok(manager) => manager
                            .create_account(request, None, &ACCOUNT_VIEW)
                            .await
                            .map_err(ApiError::from),
                        Err(e) => Err(e),
                    }
                }
                Err(e) => Err(e),
            };
            match result {
                Ok(reply) => BulkResult {
                    id: item.id.clone(),
                    status: reply.response.status,
                    account: serde_json::value::RawValue::from_string(reply.response.body).ok(),
                    error: None,
                },
                Err(e) => BulkResult {
                    id: item.id.clone(),
                    status: e.status.as_u16(),
                    account: None,
                    error: Some(serde_json::json!({ "code": e.code, "message": e.message })),
                },
            }
        }
    });
    // Bounded, so a bulk request cannot take every connection of a shard's
    // pool; the writes of one request still overlap enough to commit in
    // groups.
    let results: Vec<BulkResult> = futures_util::stream::iter(creates)
        .buffered(BULK_CONCURRENCY)
        .collect()
        .await;
    let made: Vec<bool> = results.iter().map(|r| r.status < 300).collect();
    record_owners(&state, &pairs, &made).await?;
    Ok(json_response(
        200,
        &serde_json::json!({ "results": results }),
    ))
}

/// Most transfers one lookup names.
pub const MAX_LOOKUP: usize = 1000;

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct Lookup {
    ids: Vec<String>,
}

/// Looks up many transfers by id: `found` holds those that exist, `missing`
/// the ids no shard holds. For clients that check their own books.
#[utoipa::path(
    post,
    path = "/v1/transfers/lookup",
    tag = "transfers",
    summary = "Look up to 1000 transfers by id (admin, service)",
    request_body = Lookup,
    responses(
        (status = 200, description = "found and missing"),
        CommonErrors,
    ),
)]
async fn lookup_transfers(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<Lookup>,
) -> Result<Response, ApiError> {
    caller.require(&[Role::Admin, Role::Service])?;
    if body.ids.len() > MAX_LOOKUP {
        return Err(ApiError::new(
            ErrorCode::LookupSize,
            format!("name at most {MAX_LOOKUP} transfers per lookup"),
        ));
    }
    let ids = body
        .ids
        .iter()
        .map(|id| TransferId::parse(id))
        .collect::<Result<Vec<_>, _>>()?;
    let manager = state.manager()?;
    let lookups = ids.iter().map(|id| manager.transfer(id));
    let mut found = Vec::new();
    let mut missing = Vec::new();
    for (id, result) in ids
        .iter()
        .zip(futures_util::future::join_all(lookups).await)
    {
        match result? {
            Some(t) => found.push(TransferBody::from(&t)),
            None => missing.push(id.to_string()),
        }
    }
    Ok(json_response(
        200,
        &serde_json::json!({ "found": found, "missing": missing }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    after: Option<String>,
    limit: Option<u32>,
}

#[derive(Serialize, ToSchema)]
struct AccountPage {
    data: Vec<AccountBody>,
    /// Pass as `after` to get the next page; absent on the last page.
    next_after: Option<String>,
}

#[utoipa::path(
    get,
    path = "/v1/accounts",
    tag = "accounts",
    summary = "List accounts, by id (admin, service)",
    params(
        ("after" = Option<String>, Query),
        ("limit" = Option<i64>, Query),
    ),
    responses(
        (status = 200, description = "a page: data, next_after", body = AccountPage),
        CommonErrors,
    ),
)]
async fn list_accounts(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<AccountPage>, ApiError> {
    caller.require(&[Role::Admin, Role::Service])?;
    let Query(query) = query?;
    let after = query.after.as_deref().map(AccountId::parse).transpose()?;
    let limit = query.limit.unwrap_or(100).clamp(1, MAX_PAGE);
    let accounts = state.manager()?.list_accounts(after, limit).await?;
    let next_after = (accounts.len() == limit as usize)
        .then(|| accounts.last().map(|a| a.id.to_string()))
        .flatten();
    Ok(Json(AccountPage {
        data: accounts.iter().map(AccountBody::from).collect(),
        next_after,
    }))
}

#[utoipa::path(
    get,
    path = "/v1/accounts/{id}",
    tag = "accounts",
    summary = "One account: balance, shard (its owner, admin, service)",
    params(
        ("id" = String, Path),
    ),
    responses(
        (status = 200, description = "the account", body = AccountBody),
        (status = 404, description = "no such account", body = ErrorBody),
        CommonErrors,
    ),
)]
async fn get_account(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<AccountBody>, ApiError> {
    let id = AccountId::parse(&id)?;
    caller.may_read(&state, id.as_str()).await?;
    let account = state.account(&id).await?;
    Ok(Json(AccountBody::from(&account)))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct CreateTransfer {
    from: String,
    to: String,
    amount: Option<String>,
    amount_minor: Option<i64>,
    currency: Option<String>,
}

#[utoipa::path(
    post,
    path = "/v1/transfers",
    tag = "transfers",
    summary = "Move money (only the payer's owner)",
    params(
        ("Idempotency-Key" = Option<String>, Header, description = "Same key and body replays the first answer; same key, other body: 422; while the first runs: 409."),
    ),
    request_body = CreateTransfer,
    responses(
        (status = 201, description = "completed", body = TransferBody),
        (status = 202, description = "pending: recovery completes it"),
        (status = 404, description = "no such payer or payee", body = ErrorBody),
        (status = 401, description = "missing, invalid, expired or revoked token", body = ErrorBody),
        (status = 403, description = "transfer blocked by fraud checks, or not the payer's owner", body = ErrorBody),
        (status = 422, description = "invalid input, insufficient funds, currency mismatch, or failed (credit refused, debit reversed)", body = ErrorBody),
        (status = 429, description = "rate limited (Retry-After)", body = ErrorBody),
        (status = 503, description = "a shard, the session store or (split) the fraud or auth service is unavailable; nothing changed, retry", body = ErrorBody),
        (status = 409, description = "same key still running", body = ErrorBody),
    ),
)]
async fn create_transfer(
    State(state): State<AppState>,
    caller: Caller,
    IdempotencyHeader(key): IdempotencyHeader,
    ApiJson(body): ApiJson<CreateTransfer>,
) -> Result<Response, ApiError> {
    let from = AccountId::parse(&body.from)?;
    caller.may_debit(&state, from.as_str()).await?;
    let to = AccountId::parse(&body.to)?;
    let currency = body.currency.as_deref().map(Currency::parse).transpose()?;
    // Decimal text is read in the named currency, or the payer's; parse in
    // the default first and let the manager check the payer's currency.
    let parse_in = currency.unwrap_or(state.default_currency);
    let amount = transfer_amount(body.amount.as_deref(), body.amount_minor, parse_in)?;
    let request = TransferRequest {
        from,
        to,
        amount,
        currency: Some(parse_in),
    };
    let reply = crate::http::guarded_transfer(&state, request, key, &TRANSFER_VIEW).await?;
    Ok(send(reply))
}

#[utoipa::path(
    get,
    path = "/v1/transfers/{id}",
    tag = "transfers",
    summary = "One transfer (payer's or payee's owner, admin, service)",
    params(
        ("id" = String, Path),
    ),
    responses(
        (status = 200, description = "the transfer", body = TransferBody),
        (status = 404, description = "no such transfer", body = ErrorBody),
        CommonErrors,
    ),
)]
async fn get_transfer(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<TransferBody>, ApiError> {
    let id = TransferId::parse(&id)?;
    let transfer = state.manager()?.transfer(&id).await?.ok_or_else(|| {
        ApiError::new(
            ErrorCode::TransferNotFound,
            format!("transfer {id} does not exist"),
        )
    })?;
    // Its payer's or payee's owner may read it.
    if caller
        .may_read(&state, transfer.payer.as_str())
        .await
        .is_err()
    {
        caller.may_read(&state, transfer.payee.as_str()).await?;
    }
    Ok(Json(TransferBody::from(&transfer)))
}

#[utoipa::path(
    get,
    path = "/v1/shards",
    tag = "operations",
    summary = "Per shard: health, accounts, balances, transfers by state (admin, service)",
    responses(
        (status = 200, description = "shards"),
        CommonErrors,
    ),
)]
async fn shards(State(state): State<AppState>) -> Json<serde_json::Value> {
    let shards = shard_bodies(&state).await;
    let placement = state.manager.as_ref().map(|m| m.reshard_status());
    let (placed, strategy, version) = match &placement {
        Some(p) => (p.shards as usize, p.strategy, p.version),
        None => (shards.len(), Strategy::Jump.as_str(), 0),
    };
    let hash = match strategy {
        "modulo" => "xxh3-64 modulo the shard count",
        _ => "xxh3-64 + jump consistent hash",
    };
    // Shards beyond the placed ones are spare: open, empty until a
    // reshard grows into them.
    Json(serde_json::json!({
        "total_shards": shards.len(),
        "placed_shards": placed,
        "placement": strategy,
        "placement_version": version,
        "hash": hash,
        "shards": shards,
    }))
}

#[utoipa::path(
    get,
    path = "/v1/audit",
    tag = "operations",
    summary = "Prove no money was created, lost or paid twice (admin)",
    responses(
        (status = 200, description = "the audit report"),
        CommonErrors,
    ),
)]
async fn run_audit(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<AuditReport>, ApiError> {
    caller.require(&[Role::Admin])?;
    Ok(Json(audit::run(state.manager()?).await?))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct ReshardRequest {
    /// The shard count to place accounts over (1 to the number of shard
    /// stores the system has open).
    to: u32,
    /// `jump` or `modulo`; the placement's own when left out.
    strategy: Option<String>,
}

#[utoipa::path(
    post,
    path = "/v1/admin/reshard",
    tag = "operations",
    summary = "Move accounts to a placement over `to` shards while traffic runs (admin)",
    request_body = ReshardRequest,
    responses(
        (status = 202, description = "the reshard started; GET /v1/admin/reshard follows it"),
        CommonErrors,
    ),
)]
async fn start_reshard(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<ReshardRequest>,
) -> Result<(axum::http::StatusCode, Json<ReshardStatus>), ApiError> {
    caller.require(&[Role::Admin])?;
    let manager = state.manager()?;
    let strategy = match body.strategy.as_deref() {
        None => None,
        Some(text) => Some(Strategy::parse(text).ok_or_else(|| {
            ApiError::new(
                ErrorCode::InvalidShardCount,
                format!("strategy must be one of {}", Strategy::NAMES),
            )
        })?),
    };
    // Another shard manager may have switched the placement since.
    manager.refresh_placement().await?;
    manager.check_reshard(body.to, strategy)?;
    // Claimed here, so a second request is refused rather than told 202.
    let claim = manager.claim_reshard()?;
    let task = std::sync::Arc::clone(manager);
    let to = body.to;
    tokio::spawn(async move {
        if let Err(error) = task.reshard_claimed(claim, to, strategy).await {
            tracing::error!(%error, "reshard failed");
        }
    });
    let mut status = manager.reshard_status();
    status.target_shards = Some(to);
    Ok((axum::http::StatusCode::ACCEPTED, Json(status)))
}

#[utoipa::path(
    get,
    path = "/v1/admin/reshard",
    tag = "operations",
    summary = "The placement in force, and the reshard running or last run (admin)",
    responses(
        (status = 200, description = "placement and reshard status"),
        CommonErrors,
    ),
)]
async fn reshard_status(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<ReshardStatus>, ApiError> {
    caller.require(&[Role::Admin])?;
    Ok(Json(state.manager()?.reshard_status()))
}
