//! The routes of the modelled payment system, answering with the fields that
//! system answers with, so its README walkthrough and clients run as written.
//! Amounts there are JSON numbers of the major unit (`470.50`), written here
//! from integer minor units; amounts in paths are decimal text, except
//! `/accounts/{user}/create/{balance}`, which takes minor units.

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::Role;
use crate::codes::ErrorCode;
use crate::http::auth::Caller;
use crate::http::{
    decimal_number, json, send, shard_bodies, ApiError, AppState, IdempotencyHeader,
    ModelledErrors, MAX_PAGE,
};
use crate::ids::AccountId;
use crate::ledger::{Account, StoredResponse, Transfer, TransferState};
use crate::manager::{AccountRequest, TransferRequest, View};
use crate::money::{Amount, Currency};

/// The modelled system's routes, each documented in the API description.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_user))
        .routes(routes!(transfer))
        .routes(routes!(user_shard))
        .routes(routes!(user_route))
        .routes(routes!(account))
        .routes(routes!(create_account_minor))
        .routes(routes!(users))
        .routes(routes!(stats))
        .routes(routes!(analytics))
        .routes(routes!(shard_stats))
        .routes(routes!(health))
}

#[derive(Serialize)]
struct CreatedUser {
    success: bool,
    user: String,
    user_id: String,
    balance: Box<RawValue>,
    /// The shard's index: the modelled system answers integers here.
    shard: usize,
    shard_id: usize,
    message: String,
}

fn render_created(a: &Account) -> StoredResponse {
    json(
        200,
        &CreatedUser {
            success: true,
            user: a.id.to_string(),
            user_id: a.id.to_string(),
            balance: decimal_number(a.balance_minor as i128, a.currency),
            shard: a.shard.index(),
            shard_id: a.shard.index(),
            message: format!("User {} created on {}", a.id, a.shard.name()),
        },
    )
}

const CREATE_USER_VIEW: View<Account> = View {
    route: "legacy.create_user",
    render: render_created,
};
const CREATE_ACCOUNT_VIEW: View<Account> = View {
    route: "legacy.create_account",
    render: render_created,
};

#[derive(Serialize)]
struct Payment {
    success: bool,
    payment_id: String,
    from_user: String,
    to_user: String,
    amount: Box<RawValue>,
    from_shard: usize,
    to_shard: usize,
    cross_shard: bool,
    status: TransferState,
    message: String,
}

fn render_payment(t: &Transfer) -> StoredResponse {
    let (status, success, message) = match t.state {
        TransferState::Completed => (200, true, "Transfer completed".to_string()),
        TransferState::Pending => (
            202,
            true,
            "Transfer accepted; the payee's shard is unreachable and will be credited by recovery"
                .to_string(),
        ),
        TransferState::Failed => (
            422,
            false,
            format!(
                "Transfer failed ({}); the debit was reversed",
                t.failure_code.as_deref().unwrap_or("refused")
            ),
        ),
    };
    json(
        status,
        &Payment {
            success,
            payment_id: t.id.to_string(),
            from_user: t.payer.to_string(),
            to_user: t.payee.to_string(),
            amount: decimal_number(t.amount.minor() as i128, t.currency),
            from_shard: t.payer_shard.index(),
            to_shard: t.payee_shard.index(),
            cross_shard: t.is_cross_shard(),
            status: t.state,
            message,
        },
    )
}

const PAYMENT_VIEW: View<Transfer> = View {
    route: "legacy.transfer",
    render: render_payment,
};

async fn create(
    state: AppState,
    caller: Caller,
    user: String,
    balance: Amount,
    key: IdempotencyHeader,
    view: &View<Account>,
) -> Result<Response, ApiError> {
    let mut request = AccountRequest {
        id: AccountId::parse(&user)?,
        currency: state.default_currency,
        opening_balance: balance,
        owner: None,
    };
    // The modelled system names an account after its user: a user creates
    // its own (unfunded); an admin funds one for the user of that name.
    let owner = match caller.principal() {
        None => None,
        Some(p) if p.role == Role::Admin => Some(user.clone()),
        Some(p) if p.role == Role::User && p.username == user => {
            if balance.minor() != 0 {
                return Err(ApiError::new(
                    ErrorCode::OpeningBalanceRequiresAdmin,
                    "only an admin creates accounts with a balance",
                ));
            }
            Some(user.clone())
        }
        Some(_) => {
            return Err(ApiError::new(
                ErrorCode::Forbidden,
                "a user creates only the account named after itself",
            ))
        }
    };
    request.owner = owner.clone();
    let pair = [(user.as_str(), owner.as_deref())];
    if !super::check_owners(&state, &pair).await?[0] {
        return Err(ApiError::new(
            ErrorCode::AccountExists,
            format!("account {user} exists and belongs to another user"),
        ));
    }
    let reply = state
        .manager()?
        .create_account(request, key.0, view)
        .await?;
    super::record_owners(&state, &pair, &[reply.response.status < 300]).await?;
    Ok(send(reply))
}

#[utoipa::path(
    post,
    path = "/create_user/{user}/{balance}",
    tag = "modelled system",
    summary = "Create an account with an opening balance in decimal text (the modelled system's route)",
    params(
        ("user" = String, Path),
        ("balance" = String, Path),
    ),
    responses(
        (status = 201, description = "created"),
        ModelledErrors,
    ),
)]
async fn create_user(
    State(state): State<AppState>,
    caller: Caller,
    key: IdempotencyHeader,
    Path((user, balance)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let balance = Amount::parse(&balance, state.default_currency)?;
    create(state, caller, user, balance, key, &CREATE_USER_VIEW).await
}

#[utoipa::path(
    post,
    path = "/accounts/{user}/create/{balance}",
    tag = "modelled system",
    summary = "Create an account with an opening balance in minor units",
    params(
        ("user" = String, Path),
        ("balance" = String, Path),
    ),
    responses(
        (status = 201, description = "created"),
        ModelledErrors,
    ),
)]
async fn create_account_minor(
    State(state): State<AppState>,
    caller: Caller,
    key: IdempotencyHeader,
    Path((user, balance)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let minor: i64 = balance.parse().map_err(|_| {
        let shown: String = balance.chars().take(40).collect();
        ApiError::new(
            ErrorCode::InvalidAmount,
            format!("balance {shown:?} must be a whole number of minor units"),
        )
    })?;
    let balance = Amount::from_minor(minor)?;
    create(state, caller, user, balance, key, &CREATE_ACCOUNT_VIEW).await
}

#[utoipa::path(
    post,
    path = "/transfer/{from}/{to}/{amount}",
    tag = "modelled system",
    summary = "Move a decimal amount from one account to another (the modelled system's route)",
    params(
        ("from" = String, Path),
        ("to" = String, Path),
        ("amount" = String, Path),
    ),
    responses(
        (status = 200, description = "transferred"),
        ModelledErrors,
    ),
)]
async fn transfer(
    State(state): State<AppState>,
    caller: Caller,
    IdempotencyHeader(key): IdempotencyHeader,
    Path((from, to, amount)): Path<(String, String, String)>,
) -> Result<Response, ApiError> {
    let from = AccountId::parse(&from)?;
    caller.may_debit(&state, from.as_str()).await?;
    let request = TransferRequest {
        from,
        to: AccountId::parse(&to)?,
        amount: Amount::parse_positive(&amount, state.default_currency)?,
        currency: Some(state.default_currency),
    };
    Ok(send(
        crate::http::guarded_transfer(&state, request, key, &PAYMENT_VIEW).await?,
    ))
}

#[derive(Serialize)]
struct UserShard {
    user: String,
    user_id: String,
    /// The shard's index, an integer as the modelled system answers it.
    shard: usize,
    shard_id: usize,
    /// Left out when the account does not exist, as the modelled system
    /// does.
    #[serde(skip_serializing_if = "Option::is_none")]
    balance: Option<Box<RawValue>>,
    exists: bool,
}

#[utoipa::path(
    get,
    path = "/user_shard/{user}",
    tag = "modelled system",
    summary = "The shard an account lives on",
    params(
        ("user" = String, Path),
    ),
    responses(
        (status = 200, description = "user and shard"),
        ModelledErrors,
    ),
)]
async fn user_shard(
    State(state): State<AppState>,
    caller: Caller,
    Path(user): Path<String>,
) -> Result<Json<UserShard>, ApiError> {
    let id = AccountId::parse(&user)?;
    caller.may_read(&state, id.as_str()).await?;
    let account = state.manager()?.account(&id).await?;
    let shard = state.manager()?.shard_of(&id);
    Ok(Json(UserShard {
        user,
        user_id: id.to_string(),
        shard: shard.index(),
        shard_id: shard.index(),
        balance: account
            .as_ref()
            .map(|a| decimal_number(a.balance_minor as i128, a.currency)),
        exists: account.is_some(),
    }))
}

#[utoipa::path(
    get,
    path = "/user/{user}/shard",
    tag = "modelled system",
    summary = "The shard an account would live on, whether or not it exists",
    security(()),
    params(
        ("user" = String, Path),
    ),
    responses(
        (status = 200, description = "user and shard"),
    ),
)]
async fn user_route(
    State(state): State<AppState>,
    Path(user): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let id = AccountId::parse(&user)?;
    let manager = state.manager()?;
    Ok(Json(serde_json::json!({
        "user_id": id.to_string(),
        "shard_id": manager.shard_of(&id).index(),
        "total_shards": manager.ring().shard_count(),
    })))
}

#[derive(Serialize)]
struct LegacyAccount {
    found: bool,
    user: String,
    user_id: String,
    balance: Box<RawValue>,
    balance_minor: i64,
    currency: String,
    shard: usize,
    shard_id: usize,
}

impl From<&Account> for LegacyAccount {
    fn from(a: &Account) -> Self {
        LegacyAccount {
            found: true,
            user: a.id.to_string(),
            user_id: a.id.to_string(),
            balance: decimal_number(a.balance_minor as i128, a.currency),
            balance_minor: a.balance_minor,
            currency: a.currency.to_string(),
            shard: a.shard.index(),
            shard_id: a.shard.index(),
        }
    }
}

#[utoipa::path(
    get,
    path = "/accounts/{user}",
    tag = "modelled system",
    summary = "One account in the modelled system's shape",
    params(
        ("user" = String, Path),
    ),
    responses(
        (status = 200, description = "the account"),
        ModelledErrors,
    ),
)]
async fn account(
    State(state): State<AppState>,
    caller: Caller,
    Path(user): Path<String>,
) -> Result<Json<LegacyAccount>, ApiError> {
    let id = AccountId::parse(&user)?;
    caller.may_read(&state, id.as_str()).await?;
    let account = state.account(&id).await?;
    Ok(Json(LegacyAccount::from(&account)))
}

#[derive(Deserialize)]
struct UsersQuery {
    limit: Option<u32>,
}

#[derive(Serialize)]
struct Users {
    total: usize,
    users: Vec<LegacyAccount>,
}

#[utoipa::path(
    get,
    path = "/users",
    tag = "modelled system",
    summary = "Accounts, a page at a time (admin, service)",
    responses(
        (status = 200, description = "accounts"),
        ModelledErrors,
    ),
)]
async fn users(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<UsersQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Users>, ApiError> {
    caller.require(&[Role::Admin, Role::Service])?;
    let Query(query) = query?;
    let limit = query.limit.unwrap_or(MAX_PAGE).clamp(1, MAX_PAGE);
    let accounts = state.manager()?.list_accounts(None, limit).await?;
    let users: Vec<_> = accounts.iter().map(LegacyAccount::from).collect();
    Ok(Json(Users {
        total: users.len(),
        users,
    }))
}

/// Totals in the default currency, as the single-currency modelled system
/// reports them.
struct Totals {
    currency: Currency,
    total_shards: usize,
    healthy_shards: usize,
    accounts: u64,
    balance_minor: i128,
    shards: Vec<crate::http::ShardBody>,
}

impl Totals {
    fn status(&self) -> &'static str {
        if self.healthy_shards == self.total_shards {
            "healthy"
        } else {
            "degraded"
        }
    }

    fn shard_balance(&self, s: &crate::http::ShardBody) -> Box<RawValue> {
        let minor = s
            .balance_minor
            .get(self.currency.code())
            .copied()
            .unwrap_or(0);
        decimal_number(minor, self.currency)
    }
}

async fn totals(state: &AppState) -> Totals {
    let shards = shard_bodies(state).await;
    let currency = state.default_currency;
    Totals {
        currency,
        total_shards: shards.len(),
        healthy_shards: shards.iter().filter(|s| s.healthy).count(),
        accounts: shards.iter().map(|s| s.accounts).sum(),
        balance_minor: shards
            .iter()
            .filter_map(|s| s.balance_minor.get(currency.code()))
            .sum(),
        shards,
    }
}

#[derive(Serialize)]
struct ShardSummary<'a> {
    shard_id: usize,
    shard: &'a str,
    healthy: bool,
    accounts: u64,
    balance: Box<RawValue>,
    transfers: &'a crate::http::TransferCounts,
}

#[derive(Serialize)]
struct Stats<'a> {
    status: &'static str,
    total_shards: usize,
    healthy_shards: usize,
    total_accounts: u64,
    total_balance: Box<RawValue>,
    shards: Vec<ShardSummary<'a>>,
}

#[utoipa::path(
    get,
    path = "/stats",
    tag = "modelled system",
    summary = "Totals across shards in the default currency (admin, service)",
    responses(
        (status = 200, description = "totals"),
        ModelledErrors,
    ),
)]
async fn stats(State(state): State<AppState>) -> Response {
    let t = totals(&state).await;
    let body = Stats {
        status: t.status(),
        total_shards: t.total_shards,
        healthy_shards: t.healthy_shards,
        total_accounts: t.accounts,
        total_balance: decimal_number(t.balance_minor, t.currency),
        shards: t
            .shards
            .iter()
            .map(|s| ShardSummary {
                shard_id: s.shard,
                shard: &s.name,
                healthy: s.healthy,
                accounts: s.accounts,
                balance: t.shard_balance(s),
                transfers: &s.transfers,
            })
            .collect(),
    };
    Json(body).into_response()
}

#[derive(Serialize)]
struct ShardBalance {
    shard_id: usize,
    accounts: u64,
    balance: Box<RawValue>,
}

#[derive(Serialize)]
struct Analytics {
    total_accounts: u64,
    total_balance: Box<RawValue>,
    average_balance: Box<RawValue>,
    total_shards: usize,
    healthy_shards: usize,
    shards: Vec<ShardBalance>,
}

#[utoipa::path(
    get,
    path = "/analytics",
    tag = "modelled system",
    summary = "Transfer counts and volume across shards (admin, service)",
    responses(
        (status = 200, description = "analytics"),
        ModelledErrors,
    ),
)]
async fn analytics(State(state): State<AppState>) -> Json<Analytics> {
    let t = totals(&state).await;
    // Average in whole minor units, rounded half away from zero.
    let average_minor = if t.accounts == 0 {
        0
    } else {
        let n = t.accounts as i128;
        (2 * t.balance_minor + n) / (2 * n)
    };
    Json(Analytics {
        total_accounts: t.accounts,
        total_balance: decimal_number(t.balance_minor, t.currency),
        average_balance: decimal_number(average_minor, t.currency),
        total_shards: t.total_shards,
        healthy_shards: t.healthy_shards,
        shards: t
            .shards
            .iter()
            .map(|s| ShardBalance {
                shard_id: s.shard,
                accounts: s.accounts,
                balance: t.shard_balance(s),
            })
            .collect(),
    })
}

#[utoipa::path(
    get,
    path = "/shard-stats",
    tag = "modelled system",
    summary = "Per shard: health, accounts, balances, transfers by state (admin, service)",
    responses(
        (status = 200, description = "shards"),
        ModelledErrors,
    ),
)]
async fn shard_stats(State(state): State<AppState>) -> Json<serde_json::Value> {
    let t = totals(&state).await;
    Json(serde_json::json!({
        "total_shards": t.total_shards,
        "shards": t.shards,
    }))
}

#[utoipa::path(
    get,
    path = "/health",
    tag = "modelled system",
    summary = "Liveness (the shard manager's in the modelled system's shape)",
    security(()),
    responses(
        (status = 200, description = "OK"),
    ),
)]
async fn health(State(state): State<AppState>) -> Json<serde_json::Value> {
    let t = totals(&state).await;
    let ok = t.healthy_shards == t.total_shards;
    Json(serde_json::json!({
        "ok": ok,
        "status": t.status(),
        "service": "shard-manager",
        "total_shards": t.total_shards,
        "healthy_shards": t.healthy_shards,
    }))
}
