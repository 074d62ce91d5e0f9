//! Our JSON API. Amounts go in as decimal text of the major unit
//! (`"amount": "4.50"`) or as integer minor units (`"amount_minor": 450`),
//! and come out as both.

use axum::extract::{Path, Query, State};
use axum::response::Response;
use axum::Json;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use super::auth::Caller;
use super::{
    json, send, ApiError, ApiJson, AppState, CommonErrors, ErrorBody, IdempotencyHeader, MAX_PAGE,
};
use crate::audit::{self, AuditReport};
use crate::auth::Role;
use crate::codes::ErrorCode;
use crate::ids::{AccountId, TransferId};
use crate::ledger::{Account, StoredResponse, Transfer, TransferState};
use crate::manager::{AccountRequest, TransferRequest, View};
use crate::money::{format_minor, Amount, Currency};
use crate::peers::Service;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// The `/v1` routes of `service` (all of them for `Service::All`).
pub fn routes(service: Service) -> OpenApiRouter<AppState> {
    let mut routes = OpenApiRouter::new();
    if service.runs(Service::ShardManager) {
        routes = routes
            .routes(routes!(create_account, list_accounts))
            .routes(routes!(create_accounts_bulk))
            .routes(routes!(get_account))
            .routes(routes!(create_transfer))
            .routes(routes!(lookup_transfers))
            .routes(routes!(get_transfer));
    }
    if service.runs(Service::ShardManager) || service.runs(Service::Ledger) {
        routes = routes.routes(routes!(shards)).routes(routes!(run_audit));
    }
    if service.runs(Service::Ledger) {
        routes = routes
            .routes(routes!(trial_balance))
            .routes(routes!(account_entries))
            .routes(routes!(relay_stats));
    }
    if service.runs(Service::Fraud) {
        routes = routes.routes(routes!(score_transfer));
    }
    if service.runs(Service::Notification) {
        routes = routes
            .routes(routes!(register_webhook))
            .routes(routes!(list_dead_letters))
            .routes(routes!(replay_dead_letters))
            .routes(routes!(notification_stats));
    }
    if service.runs(Service::Analytics) {
        routes = routes
            .routes(routes!(pipeline_report))
            .routes(routes!(analytics_totals))
            .routes(routes!(analytics_dashboard));
    }
    routes
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
    after: Option<i64>,
    limit: Option<u32>,
}

/// An account's statement: its ledger entries, oldest first, a page at a
/// time (`after` the last entry id of the previous page).
#[utoipa::path(
    get,
    path = "/v1/accounts/{id}/entries",
    tag = "ledger",
    summary = "An account's statement: its ledger entries, oldest first, a page at a time (its owner, admin, service; the ledger service)",
    params(
        ("id" = String, Path),
        ("after" = Option<i64>, Query),
        ("limit" = Option<i64>, Query),
    ),
    responses(
        (status = 200, description = "account, entries, next_after"),
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
    let Some(account) = manager.account(&id).await? else {
        return Err(ApiError::new(
            ErrorCode::AccountNotFound,
            format!("account {id} does not exist"),
        ));
    };
    let store = &manager.shards()[manager.ring().shard_of(&id).index()];
    let entries = store
        .account_entries(&id, query.after.unwrap_or(0), limit)
        .await
        .map_err(crate::manager::ManagerError::from)?;
    let next_after = (entries.len() == limit as usize)
        .then(|| entries.last().map(|e| e.id))
        .flatten();
    Ok(json_response(
        200,
        &serde_json::json!({
            "account": AccountBody::from(&account),
            "entries": entries,
            "next_after": next_after,
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
    Ok(json_response(200, &pipeline.notifier.stats()))
}

#[derive(Serialize, ToSchema)]
pub struct AccountBody {
    id: String,
    currency: String,
    balance: String,
    balance_minor: i64,
    shard: usize,
    created_at_ms: i64,
}

impl From<&Account> for AccountBody {
    fn from(a: &Account) -> Self {
        AccountBody {
            id: a.id.to_string(),
            currency: a.currency.to_string(),
            balance: format_minor(a.balance_minor as i128, a.currency),
            balance_minor: a.balance_minor,
            shard: a.shard.index(),
            created_at_ms: a.created_at_ms,
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct TransferBody {
    id: String,
    from: String,
    to: String,
    amount: String,
    amount_minor: i64,
    currency: String,
    state: TransferState,
    failure_code: Option<String>,
    from_shard: usize,
    to_shard: usize,
    cross_shard: bool,
    created_at_ms: i64,
    updated_at_ms: i64,
}

impl From<&Transfer> for TransferBody {
    fn from(t: &Transfer) -> Self {
        TransferBody {
            id: t.id.to_string(),
            from: t.payer.to_string(),
            to: t.payee.to_string(),
            amount: format_minor(t.amount.minor() as i128, t.currency),
            amount_minor: t.amount.minor(),
            currency: t.currency.to_string(),
            state: t.state,
            failure_code: t.failure_code.clone(),
            from_shard: t.payer_shard.index(),
            to_shard: t.payee_shard.index(),
            cross_shard: t.is_cross_shard(),
            created_at_ms: t.created_at_ms,
            updated_at_ms: t.updated_at_ms,
        }
    }
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

/// Exactly one of `amount` (decimal text) and `amount_minor`.
fn amount_of(
    text: Option<&str>,
    minor: Option<i64>,
    currency: Currency,
    field: &str,
) -> Result<Option<Amount>, ApiError> {
    match (text, minor) {
        (Some(_), Some(_)) => Err(ApiError::new(
            ErrorCode::AmbiguousAmount,
            format!("give either {field} or {field}_minor, not both"),
        )),
        (Some(text), None) => Ok(Some(Amount::parse(text, currency)?)),
        (None, Some(minor)) => Ok(Some(Amount::from_minor(minor)?)),
        (None, None) => Ok(None),
    }
}

/// The positive amount a transfer (or a score request) must name.
fn transfer_amount(
    text: Option<&str>,
    minor: Option<i64>,
    currency: Currency,
) -> Result<Amount, ApiError> {
    let amount = amount_of(text, minor, currency, "amount")?.ok_or_else(|| {
        ApiError::new(
            ErrorCode::MissingAmount,
            "give amount (decimal text such as \"4.50\") or amount_minor",
        )
    })?;
    Ok(amount.positive()?)
}

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
pub(super) async fn check_owners(
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
pub(super) async fn record_owners(
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

fn json_response(status: u16, value: &impl Serialize) -> Response {
    send(crate::manager::Reply {
        response: json(status, value),
        replayed: false,
    })
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
    let account = state.manager()?.account(&id).await?.ok_or_else(|| {
        ApiError::new(
            ErrorCode::AccountNotFound,
            format!("account {id} does not exist"),
        )
    })?;
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
    let reply = super::guarded_transfer(&state, request, key, &TRANSFER_VIEW).await?;
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

#[derive(Serialize)]
pub struct ShardBody {
    pub shard: usize,
    pub name: String,
    pub healthy: bool,
    pub accounts: u64,
    /// Customer balances per currency, in minor units.
    pub balance_minor: std::collections::BTreeMap<String, i128>,
    pub transfers: TransferCounts,
    pub error: Option<String>,
}

#[derive(Serialize, Default)]
pub struct TransferCounts {
    pub pending: u64,
    pub completed: u64,
    pub failed: u64,
}

/// Per-shard figures; a shard that cannot answer is reported unhealthy.
pub async fn shard_bodies(state: &AppState) -> Vec<ShardBody> {
    let mut out = Vec::new();
    let shards = state.manager.as_ref().map_or(&[][..], |m| m.shards());
    for store in shards {
        let shard = store.shard();
        let body = match store.stats().await {
            Ok(stats) => ShardBody {
                shard: shard.index(),
                name: shard.name(),
                healthy: true,
                accounts: stats.accounts,
                balance_minor: stats
                    .balance_minor_by_currency
                    .iter()
                    .map(|(c, v)| (c.to_string(), *v))
                    .collect(),
                transfers: TransferCounts {
                    pending: stats.transfers_pending,
                    completed: stats.transfers_completed,
                    failed: stats.transfers_failed,
                },
                error: None,
            },
            Err(error) => ShardBody {
                shard: shard.index(),
                name: shard.name(),
                healthy: false,
                accounts: 0,
                balance_minor: Default::default(),
                transfers: TransferCounts::default(),
                error: Some(error.to_string()),
            },
        };
        out.push(body);
    }
    out
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
    Json(serde_json::json!({
        "total_shards": shards.len(),
        "hash": "xxh3-64 + jump consistent hash",
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

fn pipeline_unavailable(e: anyhow::Error) -> ApiError {
    ApiError::new(
        ErrorCode::PipelineUnavailable,
        format!("cannot read the event pipeline: {e:#}"),
    )
    .retry_after(1)
}

fn pipeline_of(state: &AppState) -> Result<&std::sync::Arc<crate::pipeline::Pipeline>, ApiError> {
    state
        .pipeline
        .as_ref()
        .ok_or_else(|| ApiError::new(ErrorCode::NoPipeline, "this process runs no event pipeline"))
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
    let mut shard_completed = Vec::new();
    for store in state.manager()?.shards() {
        shard_completed.push(
            store
                .stats()
                .await
                .map_err(crate::manager::ManagerError::from)?
                .transfers_completed,
        );
    }
    let seen: Vec<u64> = (0..shard_completed.len())
        .map(|i| {
            per_shard
                .get(&(i as u16))
                .map_or(0, |t| t.transfers_completed)
        })
        .collect();
    let pipeline_report = pipeline.report().await.map_err(pipeline_unavailable)?;
    Ok(json_response(
        200,
        &serde_json::json!({
            "overall": overall,
            "per_shard": per_shard,
            "consumer": pipeline.analytics.stats(),
            "shards_completed": shard_completed,
            "matches_shards": seen == shard_completed,
            "pipeline_complete": pipeline_report.complete,
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
    let page = r#"<!doctype html><html><head><meta charset="utf-8"><title>shardpay analytics</title>
<style>body{font:14px system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}th{background:#f4f4f4}.ok{color:#070}.bad{color:#b00}</style>
</head><body><h1>shardpay analytics</h1><p id="status">loading...</p><div id="tables"></div>
<script>
function row(name,t){const v=Object.entries(t.volume_minor||{}).map(([c,m])=>c+' '+(m/100).toFixed(2)).join(', ');
return `<tr><th>${name}</th><td>${t.accounts_created}</td><td>${t.transfers_completed}</td><td>${t.same_shard}</td><td>${t.cross_shard}</td><td>${t.transfers_failed}</td><td>${v}</td></tr>`;}
const token=new URLSearchParams(location.hash.slice(1)).get('token');
async function tick(){try{const r=await fetch('/v1/analytics',{headers:token?{Authorization:'Bearer '+token}:{}});const a=await r.json();
if(!r.ok){document.getElementById('status').textContent=(a.error&&a.error.message||r.status)+' (with auth on, open this page as /dashboard/analytics#token=<admin or service access token>)';return;}
const c=a.consumer;document.getElementById('status').innerHTML=
`events applied ${c.applied} · duplicates suppressed ${c.duplicates_suppressed} · lag p50 ${c.lag.p50_ms} ms, p99 ${c.lag.p99_ms} ms · `+
(a.matches_shards?'<span class=ok>totals match the shards</span>':'<span class=bad>totals differ from the shards (catching up?)</span>');
let h='<table><tr><th></th><th>accounts</th><th>completed</th><th>same-shard</th><th>cross-shard</th><th>failed</th><th>volume</th></tr>'+row('all',a.overall);
for(const [s,t] of Object.entries(a.per_shard)){h+=row('shard '+s,t);}document.getElementById('tables').innerHTML=h+'</table>';}
catch(e){document.getElementById('status').textContent='cannot reach the analytics API: '+e;}}
tick();setInterval(tick,1000);
</script></body></html>"#;
    let mut response = Response::new(axum::body::Body::from(page));
    response.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("text/html; charset=utf-8"),
    );
    response
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
        (status = 503, description = "a shard, the session store or (split) the fraud or auth service is unavailable; nothing changed, retry", body = ErrorBody),
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
    if state.manager()?.account(&account).await?.is_none() {
        return Err(ApiError::new(
            ErrorCode::AccountNotFound,
            format!("account {account} does not exist"),
        ));
    }
    let webhook = pipeline
        .notifier
        .register(account.as_str(), &body.url)
        .map_err(|e| ApiError::new(e.code(), e.to_string()))?;
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
        &serde_json::json!({ "dead_letters": pipeline.notifier.dead_letters() }),
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
    Ok(json_response(200, &outcome))
}
