//! What every service's routes stand on: the state a handler gets, the
//! error shape, the extractors (a JSON body, an Idempotency-Key, the
//! [`auth::Caller`]), who may call what ([`permissions`]), and the routes
//! every process serves ([`ops`]: health, readiness, metrics). Each
//! service's own routes are in its folder (`manager::routes`,
//! `ledger::routes`, ...); [`crate::api`] puts them together.

pub mod auth;
mod error;
pub mod metrics;
pub mod ops;
pub mod permissions;

use std::sync::Arc;

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;

pub use error::ApiError;

use crate::codes::ErrorCode;
use crate::ids::{AccountId, IdempotencyKey};
use crate::ledger::StoredResponse;
use crate::ledger::{Account, Transfer, TransferState};
use crate::manager::{Reply, ShardManager};
use crate::money::{format_minor, Amount, Currency};
use crate::peers::{Peers, Service};

/// Largest request body accepted. Our requests are a few hundred bytes;
/// 64 KiB leaves room for bulk account creation.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Most accounts one list request returns.
pub const MAX_PAGE: u32 = 1000;
/// Longest a request may take before it is answered 503: far above any
/// healthy answer (a saga step waits at most its lock timeout; an audit of
/// a few million transfers takes seconds), short enough that a stuck
/// request does not hold its connection forever.
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// Longest a client may take to send its body: a slow sender cannot hold a
/// connection and a task open by trickling bytes.
pub const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Requests answered at once; more wait for a slot. Well above what the
/// simulator drives (hundreds of users) and bounds the memory and tasks a
/// flood of connections can take.
pub const MAX_CONCURRENT_REQUESTS: usize = 2048;

#[derive(Clone)]
pub struct AppState {
    /// The service this process runs, which decides its routes.
    pub service: Service,
    /// The other services, when this process runs one of six.
    pub peers: Option<Peers>,
    /// The shards and the transfer logic, in the services that use shards.
    pub manager: Option<Arc<ShardManager>>,
    /// The fraud rules, in the fraud service (or the all-in-one process);
    /// the shard manager of a split deployment asks the fraud service.
    pub fraud: Option<Arc<crate::fraud::FraudEngine>>,
    /// The outbox relay, the bus and the consumers, when this process runs
    /// them.
    pub pipeline: Option<Arc<crate::pipeline::Pipeline>>,
    /// Currency of accounts and transfers that name none.
    pub default_currency: Currency,
    /// Authentication and authorization; `None` is demo mode (no auth).
    pub auth: Option<Arc<crate::auth::AuthService>>,
    /// Request counts and latencies for `/metrics`.
    pub metrics: Arc<metrics::Metrics>,
}

impl AppState {
    /// Account `id`, or 404 `account_not_found`.
    pub async fn account(&self, id: &AccountId) -> Result<Account, ApiError> {
        self.manager()?.account(id).await?.ok_or_else(|| {
            ApiError::new(
                ErrorCode::AccountNotFound,
                format!("account {id} does not exist"),
            )
        })
    }

    /// The shard manager of a process that uses shards.
    pub fn manager(&self) -> Result<&Arc<ShardManager>, ApiError> {
        self.manager.as_ref().ok_or_else(|| {
            ApiError::new(
                ErrorCode::NotServedHere,
                format!("the {} service keeps no shards", self.service.name()),
            )
        })
    }
}

/// 405 in the error shape, naming the methods the route takes.
pub async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        ErrorCode::MethodNotAllowed,
        format!("{} does not take {method}", uri.path()),
    )
}

/// Most of a plain-text error body kept in the JSON error's message.
const MAX_REWRITTEN_MESSAGE: usize = 512;

/// Every error answers in the one JSON shape, whoever made it: an
/// extractor's plain-text rejection, axum's empty 405, a timeout layer's
/// empty 503 are rewritten here (our own `ApiError`s pass unchanged).
pub async fn json_errors(request: Request, next: axum::middleware::Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let is_json = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, MAX_REWRITTEN_MESSAGE * 4)
        .await
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let code = match status {
        StatusCode::BAD_REQUEST => ErrorCode::BadRequest,
        StatusCode::NOT_FOUND => ErrorCode::RouteNotFound,
        StatusCode::METHOD_NOT_ALLOWED => ErrorCode::MethodNotAllowed,
        StatusCode::REQUEST_TIMEOUT => ErrorCode::RequestTimeout,
        StatusCode::PAYLOAD_TOO_LARGE => ErrorCode::BodyTooLarge,
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ErrorCode::UnsupportedMediaType,
        StatusCode::UNPROCESSABLE_ENTITY => ErrorCode::InvalidRequest,
        StatusCode::TOO_MANY_REQUESTS => ErrorCode::RateLimited,
        StatusCode::SERVICE_UNAVAILABLE => ErrorCode::Timeout,
        s if s.is_server_error() => ErrorCode::Internal,
        _ => ErrorCode::InvalidRequest,
    };
    let message = match (code, text.trim()) {
        (ErrorCode::Timeout, _) => {
            "the request took too long and was stopped; retry with the same Idempotency-Key"
                .to_string()
        }
        (ErrorCode::Internal, _) => {
            "internal error; the request may be retried with the same Idempotency-Key".to_string()
        }
        (_, "") => status
            .canonical_reason()
            .unwrap_or("the request was refused")
            .to_string(),
        (_, t) => t.chars().take(MAX_REWRITTEN_MESSAGE).collect(),
    };
    let mut error = ApiError::rewritten(status, code, message);
    if status == StatusCode::SERVICE_UNAVAILABLE {
        error = error.retry_after(1);
    }
    let mut rewritten = error.into_response();
    for (name, value) in parts.headers.iter() {
        if name == axum::http::header::ALLOW || name == ops::REQUEST_ID {
            rewritten.headers_mut().insert(name, value.clone());
        }
    }
    rewritten
}

/// The shape of every error answer (`{"error":{"code","message"}}`), for
/// the API description.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct ErrorBody {
    error: ErrorDetail,
}

#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct ErrorDetail {
    /// A stable machine code, such as `insufficient_funds`.
    code: ErrorCode,
    /// What was wrong, for a person.
    message: String,
}

/// The errors most routes may answer, described once for the API
/// description.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
pub enum CommonErrors {
    #[response(
        status = 401,
        description = "missing, invalid, expired or revoked token"
    )]
    Unauthorized(ErrorBody),
    #[response(status = 403, description = "not allowed for this caller")]
    Forbidden(ErrorBody),
    #[response(status = 422, description = "invalid input")]
    Invalid(ErrorBody),
    #[response(status = 429, description = "rate limited (Retry-After)")]
    RateLimited(ErrorBody),
    #[response(
        status = 503,
        description = "a shard, the session store or (split) the fraud or auth service is unavailable; nothing changed, retry"
    )]
    Unavailable(ErrorBody),
}

/// The errors of the modelled system's routes, described once.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
pub enum ModelledErrors {
    #[response(
        status = 401,
        description = "missing, invalid, expired or revoked token"
    )]
    Unauthorized(ErrorBody),
    #[response(status = 403, description = "not allowed for this caller")]
    Forbidden(ErrorBody),
    #[response(status = 422, description = "invalid input")]
    Invalid(ErrorBody),
    #[response(
        status = 503,
        description = "a shard or a service it needs is unavailable; nothing changed, retry"
    )]
    Unavailable(ErrorBody),
}

/// Error codes in the API description: the list of every code.
impl utoipa::PartialSchema for ErrorCode {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::schema::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .enum_values(Some(ErrorCode::ALL.iter().map(|c| c.as_str())))
            .description(Some(
                "A stable error code; each comes with one HTTP status (reference/src/codes.rs)",
            ))
            .into()
    }
}

impl utoipa::ToSchema for ErrorCode {}

/// A JSON body whose rejections answer in our error shape.
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let axum::Json(value) = axum::Json::<T>::from_request(req, state).await?;
        Ok(ApiJson(value))
    }
}

/// The optional `Idempotency-Key` header, checked.
pub struct IdempotencyHeader(pub Option<IdempotencyKey>);

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyHeader {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let Some(value) = parts.headers.get("idempotency-key") else {
            return Ok(IdempotencyHeader(None));
        };
        let text = value.to_str().map_err(|_| {
            ApiError::new(
                ErrorCode::InvalidIdempotencyKey,
                "Idempotency-Key must be printable ASCII",
            )
        })?;
        Ok(IdempotencyHeader(Some(IdempotencyKey::parse(text)?)))
    }
}

/// Sends a stored or fresh response, marking replays as Stripe does.
pub fn send(reply: Reply) -> Response {
    let mut response = stored(reply.response);
    if reply.replayed {
        response
            .headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    response
}

pub fn stored(response: StoredResponse) -> Response {
    let status = StatusCode::from_u16(response.status).unwrap_or(StatusCode::OK);
    (
        status,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        response.body,
    )
        .into_response()
}

/// A JSON response body with its status.
pub fn json(status: u16, value: &impl serde::Serialize) -> StoredResponse {
    StoredResponse {
        status,
        body: serde_json::to_string(value).expect("responses serialize"),
    }
}

/// A money amount as a JSON number of the major unit (`470.50`), written
/// from integer minor units without passing through a float.
pub fn decimal_number(minor: i128, currency: Currency) -> Box<RawValue> {
    RawValue::from_string(format_minor(minor, currency)).expect("a decimal is a JSON number")
}

/// A transfer behind the auth service's guards: the payer's rate limit,
/// then a short idempotency lock per (payer, key) (SET NX PX) so that a
/// concurrent duplicate is refused before the transfer's database work
/// (one read of the key's record, below). The database's idempotency
/// record stays the source of truth: a lock store that is down only skips
/// the lock, and a holder that dies does not delay the key's stored
/// answer (its replay, or the refusal of a changed body).
pub async fn guarded_transfer(
    state: &AppState,
    request: crate::manager::TransferRequest,
    key: Option<crate::ids::IdempotencyKey>,
    view: &crate::manager::View<crate::ledger::Transfer>,
) -> Result<crate::manager::Reply, ApiError> {
    let Some(auth) = &state.auth else {
        return Ok(state.manager()?.transfer_funds(request, key, view).await?);
    };
    auth.limit(
        "transfers",
        request.from.as_str(),
        auth.config().transfers_per_payer,
    )
    .await?;
    let lock = match &key {
        None => None,
        Some(k) => {
            let name = format!("{}:{}", request.from.as_str(), k.as_str());
            let holder = uuid::Uuid::new_v4().simple().to_string();
            let ttl = auth.config().idempotency_lock_ttl;
            match auth.stores.locks.acquire(&name, &holder, ttl).await {
                Ok(true) => Some((name, holder)),
                Ok(false) => {
                    // The holder may be done (or dead, its lock not yet
                    // expired): the key's record answers then.
                    let manager = state.manager()?;
                    match manager.answer_from_record(&request, k, view).await {
                        Ok(Some(reply)) => return Ok(reply),
                        Err(e @ crate::manager::ManagerError::IdempotencyKeyReused) => {
                            return Err(e.into())
                        }
                        // No answer stored yet, or the record cannot be
                        // read now: the holder counts as running.
                        Ok(None) | Err(_) => {}
                    }
                    return Err(ApiError::new(ErrorCode::IdempotencyKeyInFlight,
                        "a request with this Idempotency-Key is still being processed; retry after it finishes",
                    ));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "idempotency lock store down; using the database path alone");
                    None
                }
            }
        }
    };
    let result = state.manager()?.transfer_funds(request, key, view).await;
    if let Some((name, holder)) = lock {
        if let Err(e) = auth.stores.locks.release(&name, &holder).await {
            tracing::warn!(error = %e, "cannot release an idempotency lock; it expires by itself");
        }
    }
    Ok(result?)
}

/// Exactly one of `amount` (decimal text) and `amount_minor`.
pub fn amount_of(
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
pub fn transfer_amount(
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

pub fn json_response(status: u16, value: &impl serde::Serialize) -> Response {
    send(crate::manager::Reply {
        response: json(status, value),
        replayed: false,
    })
}

#[derive(serde::Serialize)]
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

#[derive(serde::Serialize, Default)]
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

pub fn pipeline_unavailable(e: anyhow::Error) -> ApiError {
    ApiError::new(
        ErrorCode::PipelineUnavailable,
        format!("cannot read the event pipeline: {e:#}"),
    )
    .retry_after(1)
}

pub fn pipeline_of(
    state: &AppState,
) -> Result<&std::sync::Arc<crate::pipeline::Pipeline>, ApiError> {
    state
        .pipeline
        .as_ref()
        .ok_or_else(|| ApiError::new(ErrorCode::NoPipeline, "this process runs no event pipeline"))
}

/// An account as the API shows it.
#[derive(serde::Serialize, utoipa::ToSchema)]
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

#[derive(serde::Serialize, utoipa::ToSchema)]
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
