//! The one error type of the HTTP layer. Every error answers
//! `{"error":{"code":"...","message":"..."}}`: 4xx say exactly what was wrong
//! with the request; 5xx say nothing internal.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::ids::IdError;
use crate::manager::ManagerError;
use crate::money::MoneyError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Seconds, sent as `Retry-After` (429 and 503 answers).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn retry_after(mut self, seconds: u64) -> ApiError {
        self.retry_after = Some(seconds.max(1));
        self
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, code, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(code = self.code, error = %self.message, "request failed");
        }
        // A 5xx message is logged above, never sent: it may carry a
        // database driver's or another service's words (addresses, SQL).
        let message = if self.status == StatusCode::INTERNAL_SERVER_ERROR {
            "internal error; the request may be retried with the same Idempotency-Key".to_string()
        } else if self.status.is_server_error() {
            format!(
                "a service this request needs is unavailable ({}); retry shortly with the same Idempotency-Key",
                self.code
            )
        } else {
            self.message
        };
        let body = crate::error_body(self.code, &message);
        let mut response = (
            self.status,
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, seconds.into());
        }
        response
    }
}

impl From<ManagerError> for ApiError {
    fn from(error: ManagerError) -> ApiError {
        let message = error.to_string();
        match error {
            ManagerError::Invalid { code, .. } => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
            }
            ManagerError::Refused(refusal) => ApiError::new(
                StatusCode::from_u16(refusal.http_status()).expect("valid status"),
                refusal.code(),
                message,
            ),
            ManagerError::IdempotencyKeyReused => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                message,
            ),
            ManagerError::IdempotencyKeyInFlight => {
                ApiError::new(StatusCode::CONFLICT, "idempotency_key_in_flight", message)
            }
            ManagerError::Unavailable(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "shard_unavailable",
                message,
            ),
            ManagerError::FraudUnavailable(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "fraud_unavailable",
                message,
            )
            .retry_after(1),
            ManagerError::Internal(_) => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
            }
        }
    }
}

impl From<MoneyError> for ApiError {
    fn from(error: MoneyError) -> ApiError {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            error.code(),
            error.to_string(),
        )
    }
}

impl From<IdError> for ApiError {
    fn from(error: IdError) -> ApiError {
        ApiError::bad_request(error.code(), error.to_string())
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> ApiError {
        let status = rejection.status();
        let code = match &rejection {
            JsonRejection::JsonSyntaxError(_) => "malformed_json",
            JsonRejection::JsonDataError(_) => "invalid_body",
            JsonRejection::MissingJsonContentType(_) => "unsupported_media_type",
            _ if status == StatusCode::PAYLOAD_TOO_LARGE => "body_too_large",
            _ => "invalid_body",
        };
        let status = if code == "invalid_body" && status != StatusCode::PAYLOAD_TOO_LARGE {
            StatusCode::BAD_REQUEST
        } else {
            status
        };
        ApiError::new(status, code, rejection.body_text())
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> ApiError {
        ApiError::bad_request("invalid_path", rejection.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> ApiError {
        ApiError::bad_request("invalid_query", rejection.body_text())
    }
}
