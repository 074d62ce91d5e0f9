//! The one error type of the HTTP layer. Every error answers
//! `{"error":{"code":"...","message":"..."}}`: 4xx say exactly what was wrong
//! with the request; 5xx say nothing internal.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::codes::ErrorCode;
use crate::ids::IdError;
use crate::manager::ManagerError;
use crate::money::MoneyError;

#[derive(Debug)]
pub struct ApiError {
    /// The code's own status, except for errors of other layers rewritten
    /// into this shape (`ApiError::rewritten`).
    pub status: StatusCode,
    pub code: ErrorCode,
    pub message: String,
    /// Seconds, sent as `Retry-After` (429 and 503 answers).
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// An error with `code`, answering the code's status.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        let status = StatusCode::from_u16(code.status()).expect("codes carry valid statuses");
        ApiError::rewritten(status, code, message)
    }

    /// An error another layer answered with `status` (a rejection before
    /// any route, a timeout), put in this shape under the nearest code.
    pub fn rewritten(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> ApiError {
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
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(code = self.code.as_str(), error = %self.message, "request failed");
        }
        // A 5xx message is logged above, never sent: it may carry a
        // database driver's or another service's words (addresses, SQL).
        let message = if self.status == StatusCode::INTERNAL_SERVER_ERROR {
            "internal error; the request may be retried with the same Idempotency-Key".to_string()
        } else if self.status.is_server_error() {
            format!(
                "a service this request needs is unavailable ({}); retry shortly with the same Idempotency-Key",
                self.code.as_str()
            )
        } else {
            self.message
        };
        let body = crate::error_body(self.code.as_str(), &message);
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
            ManagerError::Invalid { code, .. } => ApiError::new(code, message),
            ManagerError::Refused(refusal) => {
                let retry = refusal.code() == ErrorCode::AccountMoving;
                let error = ApiError::new(refusal.code(), message);
                if retry {
                    error.retry_after(1)
                } else {
                    error
                }
            }
            ManagerError::IdempotencyKeyReused => {
                ApiError::new(ErrorCode::IdempotencyKeyReused, message)
            }
            ManagerError::IdempotencyKeyInFlight => {
                ApiError::new(ErrorCode::IdempotencyKeyInFlight, message)
            }
            ManagerError::Unavailable(_) => ApiError::new(ErrorCode::ShardUnavailable, message),
            ManagerError::Moving(_) => {
                ApiError::new(ErrorCode::AccountMoving, message).retry_after(1)
            }
            ManagerError::FraudUnavailable(_) => {
                ApiError::new(ErrorCode::FraudUnavailable, message).retry_after(1)
            }
            ManagerError::Internal(_) => ApiError::new(ErrorCode::Internal, message),
        }
    }
}

impl From<MoneyError> for ApiError {
    fn from(error: MoneyError) -> ApiError {
        ApiError::new(error.code(), error.to_string())
    }
}

impl From<IdError> for ApiError {
    fn from(error: IdError) -> ApiError {
        ApiError::new(error.code(), error.to_string())
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> ApiError {
        let code = match &rejection {
            JsonRejection::JsonSyntaxError(_) => ErrorCode::MalformedJson,
            JsonRejection::JsonDataError(_) => ErrorCode::InvalidBody,
            JsonRejection::MissingJsonContentType(_) => ErrorCode::UnsupportedMediaType,
            _ if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => ErrorCode::BodyTooLarge,
            _ => ErrorCode::InvalidBody,
        };
        ApiError::new(code, rejection.body_text())
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> ApiError {
        ApiError::new(ErrorCode::InvalidPath, rejection.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> ApiError {
        ApiError::new(ErrorCode::InvalidQuery, rejection.body_text())
    }
}
