//! Every error code a client can receive, with the HTTP status it comes
//! with. Errors answer `{"error":{"code":"...","message":"..."}}`; the code
//! is stable, the message is for people. The API description lists the
//! codes (`ErrorDetail.code`).

macro_rules! error_codes {
    ($($(#[doc = $doc:literal])* $variant:ident = ($code:literal, $status:literal),)*) => {
        /// A stable error code and its HTTP status.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum ErrorCode {
            $($(#[doc = $doc])* $variant,)*
        }

        impl ErrorCode {
            /// Every code, in the order of this table.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant,)*];

            /// The code as clients see it.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(ErrorCode::$variant => $code,)*
                }
            }

            /// The HTTP status an error with this code answers.
            pub fn status(self) -> u16 {
                match self {
                    $(ErrorCode::$variant => $status,)*
                }
            }

            /// The code named `text`, if there is one.
            pub fn parse(text: &str) -> Option<ErrorCode> {
                ErrorCode::ALL.iter().copied().find(|c| c.as_str() == text)
            }
        }
    };
}

error_codes! {
    /// The account id is taken.
    AccountExists = ("account_exists", 409),
    /// A user may only create accounts named after them.
    AccountIdNotYours = ("account_id_not_yours", 403),
    /// No such account.
    AccountNotFound = ("account_not_found", 404),
    /// The account is moving to another shard (a reshard), or a process
    /// routed it to the shard it left; nothing was changed, retry shortly.
    AccountMoving = ("account_moving", 503),
    /// Both amount and amount_minor were given.
    AmbiguousAmount = ("ambiguous_amount", 422),
    /// The amount is above the largest the ledger holds.
    AmountTooLarge = ("amount_too_large", 422),
    /// The amount has more decimals than the currency.
    AmountTooPrecise = ("amount_too_precise", 422),
    /// The server runs in demo mode, without auth.
    AuthDisabled = ("auth_disabled", 404),
    /// The auth service cannot be reached.
    AuthServiceUnavailable = ("auth_service_unavailable", 503),
    /// The session store (Redis) cannot be reached.
    AuthStoreUnavailable = ("auth_store_unavailable", 503),
    /// The request was refused before it reached a route.
    BadRequest = ("bad_request", 400),
    /// The credit would take the payee above the largest balance.
    BalanceOverflow = ("balance_overflow", 422),
    /// The body is over the limit.
    BodyTooLarge = ("body_too_large", 413),
    /// A bulk request holds too many accounts.
    BulkSize = ("bulk_size", 422),
    /// Too many password checks at once; retry shortly.
    Busy = ("busy", 503),
    /// Demo mode: a state-changing request from another site.
    CrossOriginRefused = ("cross_origin_refused", 403),
    /// The account holds another currency.
    CurrencyMismatch = ("currency_mismatch", 422),
    /// Not allowed for this caller.
    Forbidden = ("forbidden", 403),
    /// This server runs without fraud checks.
    FraudChecksOff = ("fraud_checks_off", 404),
    /// The fraud service cannot be reached; nothing was moved.
    FraudUnavailable = ("fraud_unavailable", 503),
    /// Demo mode: a Host that is not a loopback name.
    HostNotAllowed = ("host_not_allowed", 421),
    /// A request with this key is still running.
    IdempotencyKeyInFlight = ("idempotency_key_in_flight", 409),
    /// The key was used with another body.
    IdempotencyKeyReused = ("idempotency_key_reused", 422),
    /// The payer cannot pay this amount.
    InsufficientFunds = ("insufficient_funds", 422),
    /// Something failed inside; the request may be retried with its key.
    Internal = ("internal", 500),
    /// The account id is malformed.
    InvalidAccountId = ("invalid_account_id", 400),
    /// The amount is not a decimal number.
    InvalidAmount = ("invalid_amount", 422),
    /// The body is JSON of the wrong shape.
    InvalidBody = ("invalid_body", 400),
    /// Wrong username or password.
    InvalidCredentials = ("invalid_credentials", 401),
    /// The Idempotency-Key header is malformed.
    InvalidIdempotencyKey = ("invalid_idempotency_key", 400),
    /// The page size is out of range.
    InvalidLimit = ("invalid_limit", 422),
    /// A path parameter is malformed.
    InvalidPath = ("invalid_path", 400),
    /// A query parameter is malformed.
    InvalidQuery = ("invalid_query", 400),
    /// The refresh token is not one this server issued.
    InvalidRefreshToken = ("invalid_refresh_token", 401),
    /// The request was refused (a rewritten error of another layer).
    InvalidRequest = ("invalid_request", 422),
    /// The shard number is out of range.
    InvalidShard = ("invalid_shard", 400),
    /// A reshard's shard count is out of range, or already in force.
    InvalidShardCount = ("invalid_shard_count", 422),
    /// The access token is malformed or not signed by this server.
    InvalidToken = ("invalid_token", 401),
    /// The transfer id is malformed.
    InvalidTransferId = ("invalid_transfer_id", 400),
    /// The webhook URL is not an absolute http(s) URL.
    InvalidUrl = ("invalid_url", 422),
    /// The username is not allowed.
    InvalidUsername = ("invalid_username", 422),
    /// A lookup holds too many ids.
    LookupSize = ("lookup_size", 422),
    /// The body is not JSON.
    MalformedJson = ("malformed_json", 400),
    /// The route does not take this method.
    MethodNotAllowed = ("method_not_allowed", 405),
    /// Neither amount nor amount_minor was given.
    MissingAmount = ("missing_amount", 422),
    /// No bearer token.
    MissingToken = ("missing_token", 401),
    /// The amount is below zero.
    NegativeAmount = ("negative_amount", 422),
    /// The route has no permission row, so nobody may call it.
    NoPermissionRule = ("no_permission_rule", 403),
    /// Only the account's owner may do this.
    NotAccountOwner = ("not_account_owner", 403),
    /// This process runs no event pipeline.
    NoPipeline = ("no_pipeline", 404),
    /// This service does not serve the route.
    NotServedHere = ("not_served_here", 404),
    /// The notification service's store cannot be reached; nothing changed.
    NotificationStoreUnavailable = ("notification_store_unavailable", 503),
    /// Only an admin may fund an account.
    OpeningBalanceRequiresAdmin = ("opening_balance_requires_admin", 403),
    /// Another user owns the account.
    OwnerAlreadySet = ("owner_already_set", 409),
    /// The event pipeline's report cannot be made now.
    PipelineUnavailable = ("pipeline_unavailable", 503),
    /// Too many requests; see Retry-After.
    RateLimited = ("rate_limited", 429),
    /// A refresh token was used twice; the session is revoked.
    RefreshTokenReused = ("refresh_token_reused", 401),
    /// A replay names neither ids nor all.
    ReplayWhat = ("replay_what", 422),
    /// The body arrived too slowly.
    RequestTimeout = ("request_timeout", 408),
    /// A reshard is already running.
    ReshardRunning = ("reshard_running", 409),
    /// No such route (or, split, served by another service).
    RouteNotFound = ("route_not_found", 404),
    /// A transfer needs two different accounts.
    SameAccount = ("same_account", 422),
    /// The session was logged out or revoked.
    SessionRevoked = ("session_revoked", 401),
    /// A shard cannot be reached; nothing changed.
    ShardUnavailable = ("shard_unavailable", 503),
    /// The request took too long and was stopped.
    Timeout = ("timeout", 503),
    /// The access token expired; refresh it.
    TokenExpired = ("token_expired", 401),
    /// An owners request holds too many pairs.
    TooManyPairs = ("too_many_pairs", 422),
    /// The account (or server) holds its maximum of webhooks.
    TooManyWebhooks = ("too_many_webhooks", 409),
    /// Fraud checks blocked the transfer.
    TransferBlocked = ("transfer_blocked", 403),
    /// No such transfer.
    TransferNotFound = ("transfer_not_found", 404),
    /// The owner named is not a registered user.
    UnknownOwner = ("unknown_owner", 422),
    /// The currency is not one the ledger knows.
    UnsupportedCurrency = ("unsupported_currency", 422),
    /// The body is not application/json.
    UnsupportedMediaType = ("unsupported_media_type", 415),
    /// The username is registered already.
    UsernameTaken = ("username_taken", 409),
    /// The password is too short or too common.
    WeakPassword = ("weak_password", 422),
    /// The webhook URL is not a public address.
    WebhookUrlNotPublic = ("webhook_url_not_public", 422),
    /// A transfer of nothing.
    ZeroAmount = ("zero_amount", 422),
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A code equals its text as clients see it.
impl PartialEq<&str> for ErrorCode {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl serde::Serialize for ErrorCode {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::ErrorCode;

    #[test]
    fn codes_are_unique_snake_case_and_their_statuses_errors() {
        let mut seen = std::collections::BTreeSet::new();
        for code in ErrorCode::ALL {
            let text = code.as_str();
            assert!(seen.insert(text), "{text} twice");
            assert!(
                text.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{text} is not snake_case"
            );
            assert!((400..600).contains(&code.status()), "{text}");
            assert_eq!(ErrorCode::parse(text), Some(*code));
        }
        assert_eq!(ErrorCode::parse("no_such_code"), None);
    }
}
