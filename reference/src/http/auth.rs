//! Who is asking, and may they: a handler that moves money or reads an
//! account takes a [`Caller`]: the principal of a valid bearer token, or
//! `Demo` when the server runs in demo mode (no auth, loopback only). Then
//! it asks the caller's leave: [`Caller::may_debit`], [`Caller::may_read`],
//! [`Caller::require`]. The auth service's own routes are in
//! `auth::routes`.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::HeaderMap;

use super::{ApiError, AppState};
use crate::auth::{AuthError, Principal, Role};
use crate::codes::ErrorCode;

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> ApiError {
        let message = e.to_string();
        match e {
            AuthError::Invalid(code, _) => ApiError::new(code, message),
            AuthError::BadCredentials => ApiError::new(ErrorCode::InvalidCredentials, message),
            AuthError::Unauthorized(code, _) | AuthError::Forbidden(code, _) => {
                ApiError::new(code, message)
            }
            AuthError::Taken(_) => ApiError::new(ErrorCode::UsernameTaken, message),
            AuthError::RateLimited { retry_after, .. } => {
                ApiError::new(ErrorCode::RateLimited, message)
                    .retry_after(retry_after.as_millis().div_ceil(1000) as u64)
            }
            AuthError::Unavailable(_) => ApiError::new(
                ErrorCode::AuthStoreUnavailable,
                "the session store (Redis) is unavailable; nothing was changed, retry shortly",
            )
            .retry_after(1),
            AuthError::PeerUnavailable(_) => ApiError::new(
                ErrorCode::AuthServiceUnavailable,
                format!("{message}; nothing was changed, retry shortly"),
            )
            .retry_after(1),
            AuthError::Busy => ApiError::new(ErrorCode::Busy, message).retry_after(1),
            AuthError::Internal(_) => ApiError::new(ErrorCode::Internal, message),
        }
    }
}

/// Who is asking.
#[derive(Debug, Clone)]
pub enum Caller {
    /// Demo mode: no auth (the server listens on loopback only).
    Demo,
    Token(Principal),
}

fn forbidden(code: ErrorCode, message: impl Into<String>) -> ApiError {
    ApiError::new(code, message)
}

impl Caller {
    pub fn principal(&self) -> Option<&Principal> {
        match self {
            Caller::Demo => None,
            Caller::Token(p) => Some(p),
        }
    }

    pub fn is_admin(&self) -> bool {
        match self {
            Caller::Demo => true,
            Caller::Token(p) => p.role == Role::Admin,
        }
    }

    /// One of `roles` (demo mode: anyone).
    pub fn require(&self, roles: &[Role]) -> Result<(), ApiError> {
        match self {
            Caller::Demo => Ok(()),
            Caller::Token(p) if roles.contains(&p.role) => Ok(()),
            Caller::Token(p) => Err(forbidden(
                ErrorCode::Forbidden,
                format!(
                    "a {} token may not do this; it needs the role {}",
                    p.role.as_str(),
                    roles
                        .iter()
                        .map(|r| r.as_str())
                        .collect::<Vec<_>>()
                        .join(" or ")
                ),
            )),
        }
    }

    /// Only the owner of an account may debit it: not an admin, not a
    /// service.
    pub async fn may_debit(&self, state: &AppState, account: &str) -> Result<(), ApiError> {
        let Caller::Token(p) = self else {
            return Ok(());
        };
        let auth = state.auth.as_ref().expect("a token implies auth");
        if p.role == Role::User
            && auth.owner_of(account).await?.as_deref() == Some(p.username.as_str())
        {
            return Ok(());
        }
        Err(forbidden(
            ErrorCode::NotAccountOwner,
            format!("only the owner of account {account} may pay from it"),
        ))
    }

    /// Admins and services read any account; a user reads its own.
    pub async fn may_read(&self, state: &AppState, account: &str) -> Result<(), ApiError> {
        let Caller::Token(p) = self else {
            return Ok(());
        };
        if matches!(p.role, Role::Admin | Role::Service) {
            return Ok(());
        }
        let auth = state.auth.as_ref().expect("a token implies auth");
        if auth.owner_of(account).await?.as_deref() == Some(p.username.as_str()) {
            return Ok(());
        }
        Err(forbidden(
            ErrorCode::NotAccountOwner,
            format!("account {account} is not yours"),
        ))
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        // The permission guard authenticated this request already.
        if let Some(caller) = parts.extensions.get::<Caller>() {
            return Ok(caller.clone());
        }
        Caller::from_headers(&parts.headers, state).await
    }
}

impl Caller {
    pub(crate) async fn from_headers(
        headers: &HeaderMap,
        state: &AppState,
    ) -> Result<Caller, ApiError> {
        let Some(auth) = &state.auth else {
            return Ok(Caller::Demo);
        };
        let header = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let token = match header.and_then(|h| h.strip_prefix("Bearer ")) {
            Some(token) => token.trim(),
            None => {
                return Err(ApiError::new(
                    ErrorCode::MissingToken,
                    "send Authorization: Bearer <access token> (POST /v1/auth/login gives one)",
                ))
            }
        };
        Ok(Caller::Token(auth.authenticate(token).await?))
    }
}
