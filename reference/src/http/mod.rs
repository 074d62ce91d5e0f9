//! The shard manager's HTTP API: our JSON API under `/v1`, and the routes of
//! the modelled system (`legacy`) so its walkthrough and clients run as
//! written.

pub mod auth;
mod error;
mod legacy;
pub mod ops;
pub mod permissions;
mod v1;

use std::sync::{Arc, LazyLock};

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;
use utoipa_axum::router::OpenApiRouter;

pub use error::ApiError;

use crate::codes::ErrorCode;
use crate::ids::IdempotencyKey;
use crate::ledger::StoredResponse;
use crate::manager::{Reply, ShardManager};
use crate::money::{format_minor, Currency};
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
    pub metrics: Arc<ops::Metrics>,
}

impl AppState {
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

/// The routes of `service` (all of them for `Service::All`), each with its
/// description: the one route table, from which the router, the API
/// description and which service serves a path are all derived.
pub fn api(service: Service) -> OpenApiRouter<AppState> {
    let mut routes = OpenApiRouter::new();
    if service.runs(Service::Auth) {
        routes = routes.merge(auth::routes());
    }
    if service.runs(Service::ShardManager) {
        // The modelled system's routes, its /health among them.
        routes = routes.merge(legacy::routes());
    } else {
        routes = routes.merge(ops::health_routes());
    }
    routes.merge(v1::routes(service)).merge(ops::routes())
}

/// The routes of the process's service (all of them for `Service::All`),
/// for serving or for `oneshot` tests.
pub fn router(state: AppState) -> Router {
    let (routes, _) = api(state.service).split_for_parts();
    routes
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            permissions::guard,
        ))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            ops::observe,
        ))
        .fallback(route_not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
            BODY_TIMEOUT,
        ))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            REQUEST_TIMEOUT,
        ))
        .layer(axum::middleware::from_fn(json_errors))
        .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
            MAX_CONCURRENT_REQUESTS,
        ))
        .with_state(state)
}

/// 405 in the error shape, naming the methods the route takes.
async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
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
async fn json_errors(request: Request, next: axum::middleware::Next) -> Response {
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

/// The API description (OpenAPI 3) of every route, as JSON: derived from
/// the handlers' annotations and the types of their bodies. Served at
/// `/openapi.json`; `reference/openapi/openapi.json` is a copy a test keeps
/// equal to it.
pub fn openapi_json() -> &'static str {
    static DOCUMENT: LazyLock<String> = LazyLock::new(|| {
        let (_, mut doc) = api(Service::All).split_for_parts();
        doc.info = utoipa::openapi::InfoBuilder::new()
            .title("shardpay reference payment system")
            .version("1")
            .description(Some(API_DESCRIPTION))
            .build();
        doc.servers = Some(vec![utoipa::openapi::server::Server::new(
            "http://127.0.0.1:8006",
        )]);
        doc.security = Some(vec![utoipa::openapi::security::SecurityRequirement::new(
            "bearer",
            Vec::<String>::new(),
        )]);
        doc.components
            .get_or_insert_with(Default::default)
            .add_security_scheme(
                "bearer",
                utoipa::openapi::security::SecurityScheme::Http(
                    utoipa::openapi::security::HttpBuilder::new()
                        .scheme(utoipa::openapi::security::HttpAuthScheme::Bearer)
                        .bearer_format("JWT")
                        .build(),
                ),
            );
        doc.to_pretty_json()
            .expect("the API description serializes")
    });
    &DOCUMENT
}

const API_DESCRIPTION: &str = "The reference system's API: the routes of its six services. \
Run as one process (shardpay serve) all of them answer on one port; run as six (shardpay \
serve <service>) each service answers its own: auth 8001, ledger 8002, fraud 8003, \
notification 8004, analytics 8005, shard manager 8006. Money is integer minor units with a \
currency; amounts go in as decimal text or minor units. Errors are \
{\"error\":{\"code\",\"message\"}}. With auth on, send Authorization: Bearer <access token> \
from POST /v1/auth/login.";

/// Whether the routed path `template` (`/v1/accounts/{id}`) matches `path`.
fn template_matches(template: &str, path: &str) -> bool {
    let (mut t, mut p) = (template.split('/'), path.split('/'));
    loop {
        match (t.next(), p.next()) {
            (None, None) => return true,
            (Some(t), Some(p)) if t == p || (t.starts_with('{') && !p.is_empty()) => {}
            _ => return false,
        }
    }
}

/// The service that serves `path` in a split deployment (the shard manager
/// first where several do), from the route table.
pub fn served_by(path: &str) -> Option<Service> {
    static PATHS: LazyLock<Vec<(Service, Vec<String>)>> = LazyLock::new(|| {
        let mut order = vec![Service::ShardManager];
        order.extend(
            Service::SPLIT
                .into_iter()
                .filter(|s| *s != Service::ShardManager),
        );
        order
            .into_iter()
            .map(|s| {
                let (_, doc) = api(s).split_for_parts();
                (s, doc.paths.paths.keys().cloned().collect())
            })
            .collect()
    });
    PATHS
        .iter()
        .find(|(_, templates)| templates.iter().any(|t| template_matches(t, path)))
        .map(|(service, _)| *service)
}

/// 404 for a route this process does not serve; in a split deployment,
/// naming the service that does.
async fn route_not_found(
    axum::extract::State(state): axum::extract::State<AppState>,
    uri: axum::http::Uri,
) -> ApiError {
    let elsewhere = served_by(uri.path()).filter(|s| !state.service.runs(*s));
    match (elsewhere, &state.peers) {
        (Some(service), Some(peers)) => {
            let url = match service {
                Service::Auth => Some(peers.auth.as_str()),
                Service::Ledger => Some(peers.ledger.as_str()),
                Service::Fraud => Some(peers.fraud.as_str()),
                Service::Notification => Some(peers.notification.as_str()),
                _ => None,
            };
            let at = url.map_or_else(
                || format!("on port {}", service.default_port()),
                |u| format!("at {u}"),
            );
            ApiError::new(
                ErrorCode::RouteNotFound,
                format!(
                    "this is the {} service; {} is served by the {} service ({at})",
                    state.service.name(),
                    uri.path(),
                    service.name()
                ),
            )
        }
        _ => ApiError::new(
            ErrorCode::RouteNotFound,
            "no such route; see README.md for the API",
        ),
    }
}

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
fn send(reply: Reply) -> Response {
    let mut response = stored(reply.response);
    if reply.replayed {
        response
            .headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    response
}

fn stored(response: StoredResponse) -> Response {
    let status = StatusCode::from_u16(response.status).unwrap_or(StatusCode::OK);
    (
        status,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        response.body,
    )
        .into_response()
}

/// A JSON response body with its status.
fn json(status: u16, value: &impl serde::Serialize) -> StoredResponse {
    StoredResponse {
        status,
        body: serde_json::to_string(value).expect("responses serialize"),
    }
}

/// A money amount as a JSON number of the major unit (`470.50`), written
/// from integer minor units without passing through a float.
fn decimal_number(minor: i128, currency: Currency) -> Box<RawValue> {
    RawValue::from_string(format_minor(minor, currency)).expect("a decimal is a JSON number")
}

/// A transfer behind the auth service's guards: the payer's rate limit,
/// then a short idempotency lock per (payer, key) (SET NX PX) so that a
/// concurrent duplicate is refused before any database work. The
/// database's idempotency record stays the source of truth: a lock store
/// that is down only skips the lock, and a holder that dies only delays a
/// retry until the lock expires.
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
                    return Err(ApiError::new(ErrorCode::IdempotencyKeyInFlight,
                        "a request with this Idempotency-Key is still being processed; retry after it finishes",
                    ))
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
