//! The auth service's routes (`/v1/auth/...`): users, sessions and the
//! owners of accounts.

use axum::extract::{ConnectInfo, FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::Role;
use crate::codes::ErrorCode;
use crate::http::auth::Caller;
use crate::http::{ApiError, ApiJson, AppState, CommonErrors, ErrorBody};

/// The auth service's routes.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(register))
        .routes(routes!(login))
        .routes(routes!(refresh))
        .routes(routes!(logout))
        .routes(routes!(logout_all))
        .routes(routes!(me))
        .routes(routes!(claim_owners))
        .routes(routes!(owner_of, assign_owner))
}

fn auth_of(state: &AppState) -> Result<&std::sync::Arc<crate::auth::AuthService>, ApiError> {
    state.auth.as_ref().ok_or_else(|| {
        ApiError::new(
            ErrorCode::AuthDisabled,
            "this server runs in demo mode without auth",
        )
    })
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct Register {
    username: String,
    password: String,
    role: Option<Role>,
}

/// Anyone may register a user; only an admin may create an admin or a
/// service user.
#[utoipa::path(
    post,
    path = "/v1/auth/register",
    tag = "auth",
    summary = "Register a user (role admin or service: admins only)",
    security(()),
    request_body = Register,
    responses(
        (status = 201, description = "registered"),
        (status = 409, description = "username taken", body = ErrorBody),
        (status = 422, description = "invalid username or weak password", body = ErrorBody),
    ),
)]
async fn register(
    State(state): State<AppState>,
    headers: HeaderMap,
    Peer(peer): Peer,
    ApiJson(body): ApiJson<Register>,
) -> Result<Response, ApiError> {
    let auth = auth_of(&state)?;
    let role = body.role.unwrap_or(Role::User);
    let caller = match headers.contains_key(axum::http::header::AUTHORIZATION) {
        true => Some(Caller::from_headers(&headers, &state).await?),
        false => None,
    };
    if role != Role::User {
        caller
            .as_ref()
            .ok_or_else(|| {
                ApiError::new(
                    ErrorCode::MissingToken,
                    "only an admin may create an admin or a service user; send its token",
                )
            })?
            .require(&[Role::Admin])?;
    }
    // Admins (setting up users for a load test, say) are not limited.
    if !caller.as_ref().is_some_and(|c| c.is_admin()) {
        auth.limit(
            "register-address",
            &peer,
            auth.config().register_per_address,
        )
        .await?;
    }
    auth.register(&body.username, &body.password, role).await?;
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({ "username": body.username, "role": role })),
    )
        .into_response())
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct Login {
    username: String,
    password: String,
}

/// The client's address, when the server knows it.
pub struct Peer(pub String);

impl<S: Send + Sync> FromRequestParts<S> for Peer {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Peer(
            parts
                .extensions
                .get::<ConnectInfo<std::net::SocketAddr>>()
                .map_or_else(|| "unknown".to_string(), |c| c.0.ip().to_string()),
        ))
    }
}

#[utoipa::path(
    post,
    path = "/v1/auth/login",
    tag = "auth",
    summary = "Log in: access and refresh tokens",
    security(()),
    request_body = Login,
    responses(
        (status = 200, description = "tokens"),
        (status = 401, description = "wrong username or password", body = ErrorBody),
        (status = 429, description = "too many attempts (Retry-After)", body = ErrorBody),
    ),
)]
async fn login(
    State(state): State<AppState>,
    Peer(peer): Peer,
    ApiJson(body): ApiJson<Login>,
) -> Result<Response, ApiError> {
    let auth = auth_of(&state)?;
    let tokens = auth.login(&body.username, &body.password, &peer).await?;
    Ok(Json(tokens).into_response())
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct Refresh {
    refresh_token: String,
}

#[utoipa::path(
    post,
    path = "/v1/auth/refresh",
    tag = "auth",
    summary = "Trade a refresh token (works once) for new tokens",
    security(()),
    request_body = Refresh,
    responses(
        (status = 200, description = "tokens"),
        (status = 401, description = "refresh token used, revoked or expired", body = ErrorBody),
    ),
)]
async fn refresh(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<Refresh>,
) -> Result<Response, ApiError> {
    let auth = auth_of(&state)?;
    Ok(Json(auth.refresh(&body.refresh_token).await?).into_response())
}

#[utoipa::path(
    post,
    path = "/v1/auth/logout",
    tag = "auth",
    summary = "Revoke this session and its tokens",
    responses(
        (status = 204, description = "logged out"),
        (status = 401, description = "no valid token", body = ErrorBody),
    ),
)]
async fn logout(State(state): State<AppState>, caller: Caller) -> Result<Response, ApiError> {
    let auth = auth_of(&state)?;
    if let Caller::Token(p) = &caller {
        auth.logout(p).await?;
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize, Default, ToSchema)]
#[serde(deny_unknown_fields)]
struct LogoutAll {
    /// Admins only: whose sessions (default: the caller's own).
    username: Option<String>,
}

/// Log out everywhere: every session of the caller (or, for an admin, of
/// the user named) is revoked, with all its tokens.
#[utoipa::path(
    post,
    path = "/v1/auth/logout-all",
    tag = "auth",
    summary = "Log out everywhere: revoke every session of the caller (admins: of the user named) and all their tokens",
    request_body = LogoutAll,
    responses(
        (status = 200, description = "username and sessions revoked"),
        CommonErrors,
    ),
)]
async fn logout_all(
    State(state): State<AppState>,
    caller: Caller,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let auth = auth_of(&state)?;
    let p = caller.principal().expect("auth is on");
    let body: LogoutAll = if body.iter().all(u8::is_ascii_whitespace) {
        LogoutAll::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::new(
                ErrorCode::InvalidBody,
                format!("send no body, or {{\"username\": \"...\"}} (admins): {e}"),
            )
        })?
    };
    let username = match body.username {
        Some(other) if other != p.username => {
            caller.require(&[Role::Admin])?;
            other
        }
        _ => p.username.clone(),
    };
    let revoked = auth.logout_everywhere(&username).await?;
    Ok(Json(serde_json::json!({ "username": username, "revoked": revoked })).into_response())
}

#[utoipa::path(
    get,
    path = "/v1/auth/me",
    tag = "auth",
    summary = "Who the token belongs to",
    responses(
        (status = 200, description = "username and role"),
        (status = 401, description = "no valid token", body = ErrorBody),
    ),
)]
async fn me(State(state): State<AppState>, caller: Caller) -> Result<Response, ApiError> {
    auth_of(&state)?;
    let p = caller.principal().expect("auth is on");
    Ok(Json(serde_json::json!({ "username": p.username, "role": p.role })).into_response())
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct OwnerPair {
    account: String,
    owner: String,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct ClaimOwners {
    pairs: Vec<OwnerPair>,
    /// Only check: every owner is a user, and answer per pair whether the
    /// account is free for that owner. Records nothing.
    #[serde(default)]
    check_only: bool,
}

/// For the other services of a split deployment (service or admin token):
/// records owners of accounts that have none yet; answers, per pair,
/// whether that owner owns the account now.
#[utoipa::path(
    post,
    path = "/v1/auth/owners",
    tag = "auth",
    summary = "Record owners of accounts that have none yet; per pair, whether that owner owns it now (service, admin: the other services of a split deployment). check_only: record nothing, answer whether each account is free for its owner",
    request_body = ClaimOwners,
    responses(
        (status = 200, description = "owned: one boolean per pair"),
        CommonErrors,
    ),
)]
async fn claim_owners(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<ClaimOwners>,
) -> Result<Response, ApiError> {
    caller.require(&[Role::Service, Role::Admin])?;
    let auth = auth_of(&state)?;
    if body.pairs.len() > 1000 {
        return Err(ApiError::new(
            ErrorCode::TooManyPairs,
            "at most 1000 pairs per request",
        ));
    }
    for pair in &body.pairs {
        crate::ids::AccountId::parse(&pair.account)?;
    }
    let pairs: Vec<(&str, &str)> = body
        .pairs
        .iter()
        .map(|p| (p.account.as_str(), p.owner.as_str()))
        .collect();
    let owned = if body.check_only {
        auth.check_owners(&pairs).await?
    } else {
        auth.claim(&pairs).await?
    };
    Ok(Json(serde_json::json!({ "owned": owned })).into_response())
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct AssignOwner {
    owner: String,
}

/// An admin gives an account that has no owner (made by an admin without
/// one, or in demo mode) to a registered user. Owners never change once
/// set: naming another user for an owned account answers 409.
#[utoipa::path(
    put,
    path = "/v1/auth/owners/{account}",
    tag = "auth",
    summary = "Give an account without an owner to a registered user (admin); owners never change once set",
    params(
        ("account" = String, Path),
    ),
    request_body = AssignOwner,
    responses(
        (status = 200, description = "account and owner"),
        (status = 404, description = "no such account", body = ErrorBody),
        (status = 409, description = "another user owns it", body = ErrorBody),
        CommonErrors,
    ),
)]
async fn assign_owner(
    State(state): State<AppState>,
    caller: Caller,
    axum::extract::Path(account): axum::extract::Path<String>,
    ApiJson(body): ApiJson<AssignOwner>,
) -> Result<Response, ApiError> {
    caller.require(&[Role::Admin])?;
    let auth = auth_of(&state)?;
    let id = crate::ids::AccountId::parse(&account)?;
    if let Some(manager) = &state.manager {
        if manager.account(&id).await?.is_none() {
            return Err(ApiError::new(
                ErrorCode::AccountNotFound,
                format!("account {id} does not exist"),
            ));
        }
    }
    if !auth.assign_owner(id.as_str(), &body.owner).await? {
        let current = auth.owner_of(id.as_str()).await?;
        return Err(ApiError::new(
            ErrorCode::OwnerAlreadySet,
            format!(
                "account {id} belongs to {}; owners do not change once set",
                current.as_deref().unwrap_or("another user")
            ),
        ));
    }
    Ok(Json(serde_json::json!({ "account": id.as_str(), "owner": body.owner })).into_response())
}

/// For the other services: the owner of an account, or null.
#[utoipa::path(
    get,
    path = "/v1/auth/owners/{account}",
    tag = "auth",
    summary = "The owner of an account, or null (service, admin)",
    params(
        ("account" = String, Path),
    ),
    responses(
        (status = 200, description = "account and owner"),
        CommonErrors,
    ),
)]
async fn owner_of(
    State(state): State<AppState>,
    caller: Caller,
    axum::extract::Path(account): axum::extract::Path<String>,
) -> Result<Response, ApiError> {
    caller.require(&[Role::Service, Role::Admin])?;
    let auth = auth_of(&state)?;
    crate::ids::AccountId::parse(&account)?;
    let owner = auth.owner_of(&account).await?;
    Ok(Json(serde_json::json!({ "account": account, "owner": owner })).into_response())
}
