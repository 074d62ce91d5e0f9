//! The auth service: users with argon2 password hashes, logins that open a
//! session, short-lived JWT access tokens bound to their session, refresh
//! tokens that work once (rotated), logout that revokes the session, login
//! rate limits, and who owns which account.
//!
//! Roles: `user` may debit only accounts it owns and read only its own;
//! `admin` sets the system up (users, accounts with opening balances,
//! audit, dead letters) but cannot debit anyone's account; `service` is for
//! service-to-service calls: fraud scoring and reads.
//!
//! Users and account owners live behind the [`users::UserStore`] trait: in
//! a SQLite file next to the shards (or in memory), or in a MySQL database
//! that several auth replicas share; sessions, rate-limit windows and
//! idempotency locks live behind the traits of [`stores`], on Redis or in
//! memory.

pub mod redis;
pub mod routes;
pub mod stores;
pub mod users;

use crate::codes::ErrorCode;
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use jsonwebtoken::{DecodingKey, EncodingKey, Header, Validation};
use rand::Rng;
use serde::{Deserialize, Serialize};
use sha2::Digest;

use stores::{IdempotencyLocks, MemoryStores, RateLimiter, Session, SessionStore, StoreDown};
use users::{SqliteUsers, UserStore};

/// The secret `--dev` uses. The server refuses to start with it otherwise.
pub const DEV_SECRET: &str = "shardpay-dev-secret-do-not-use-in-production";
pub const AUDIENCE: &str = "shardpay";
pub const ISSUER: &str = "shardpay-auth";
/// Longest password accepted, in bytes; hashing cost grows with length.
pub const MAX_PASSWORD_LEN: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    User,
    Admin,
    Service,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Admin => "admin",
            Role::Service => "service",
        }
    }

    pub fn parse(text: &str) -> Option<Role> {
        match text {
            "user" => Some(Role::User),
            "admin" => Some(Role::Admin),
            "service" => Some(Role::Service),
            _ => None,
        }
    }
}

/// A fixed-window limit: at most `max` requests per `window` (0: off).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub max: u64,
    pub window: Duration,
}

#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// HMAC key of the access tokens (HS256).
    pub secret: String,
    pub access_ttl: Duration,
    pub refresh_ttl: Duration,
    /// Argon2id cost: memory in KiB and passes. The defaults are OWASP's
    /// (19 MiB, 2 passes); a load test that logs in thousands of users may
    /// lower them.
    pub argon2_memory_kib: u32,
    pub argon2_iterations: u32,
    pub login_per_user: Limit,
    pub login_per_address: Limit,
    /// Registrations per client address: each costs a password hash, so an
    /// open register route is a cheap way to load the server.
    pub register_per_address: Limit,
    pub transfers_per_payer: Limit,
    /// How long an idempotency lock holds if its holder dies.
    pub idempotency_lock_ttl: Duration,
    /// Creates (or resets) the user `admin` with this password at start.
    pub admin_password: Option<String>,
}

impl AuthConfig {
    pub fn new(secret: impl Into<String>) -> AuthConfig {
        AuthConfig {
            secret: secret.into(),
            access_ttl: Duration::from_secs(15 * 60),
            refresh_ttl: Duration::from_secs(7 * 24 * 3600),
            argon2_memory_kib: 19 * 1024,
            argon2_iterations: 2,
            login_per_user: Limit {
                max: 5,
                window: Duration::from_secs(60),
            },
            login_per_address: Limit {
                max: 20,
                window: Duration::from_secs(60),
            },
            register_per_address: Limit {
                max: 10,
                window: Duration::from_secs(60),
            },
            transfers_per_payer: Limit {
                max: 0,
                window: Duration::from_secs(1),
            },
            idempotency_lock_ttl: Duration::from_secs(10),
            admin_password: None,
        }
    }

    /// Refuses a missing, short or built-in secret unless `dev` allows the
    /// built-in one.
    pub fn check(&self, dev: bool) -> anyhow::Result<()> {
        if self.secret == DEV_SECRET {
            anyhow::ensure!(
                dev,
                "the JWT secret is the built-in development one; set SHARDPAY_JWT_SECRET (32+ characters), or pass --dev on a machine of your own"
            );
        } else {
            anyhow::ensure!(
                self.secret.len() >= 32,
                "the JWT secret must be at least 32 characters; set SHARDPAY_JWT_SECRET (for example: openssl rand -hex 32)"
            );
        }
        anyhow::ensure!(
            self.argon2_memory_kib >= 8 && self.argon2_iterations >= 1,
            "argon2 cost too low: memory at least 8 KiB, at least 1 pass"
        );
        Ok(())
    }
}

/// Who is calling, from a valid access token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub username: String,
    pub role: Role,
    pub session: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub role: Role,
    pub sid: String,
    pub aud: String,
    pub iss: String,
    pub iat: u64,
    pub exp: u64,
}

#[derive(Debug, Serialize, Clone)]
pub struct Tokens {
    pub access_token: String,
    pub token_type: &'static str,
    pub expires_in: u64,
    pub refresh_token: String,
    pub username: String,
    pub role: Role,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("{1}")]
    Invalid(ErrorCode, String),
    #[error("username or password is wrong")]
    BadCredentials,
    #[error("{1}")]
    Unauthorized(ErrorCode, String),
    #[error("{1}")]
    Forbidden(ErrorCode, String),
    #[error("username {0} is taken")]
    Taken(String),
    #[error("too many requests; retry in {} s", retry_after.as_secs().max(1))]
    RateLimited {
        what: &'static str,
        retry_after: Duration,
    },
    #[error("the session store is unavailable: {0}")]
    Unavailable(String),
    /// The auth service of a split deployment did not answer.
    #[error("the auth service is unavailable: {0}")]
    PeerUnavailable(String),
    /// Every password-hashing slot stayed busy.
    #[error("the server is busy checking other passwords; retry shortly")]
    Busy,
    #[error("{0}")]
    Internal(String),
}

impl From<StoreDown> for AuthError {
    fn from(e: StoreDown) -> AuthError {
        AuthError::Unavailable(e.0)
    }
}

impl From<rusqlite::Error> for AuthError {
    fn from(e: rusqlite::Error) -> AuthError {
        AuthError::Internal(format!("user store: {e}"))
    }
}

/// The Redis-or-memory half of the auth state.
#[derive(Clone)]
pub struct Stores {
    pub sessions: Arc<dyn SessionStore>,
    pub limits: Arc<dyn RateLimiter>,
    pub locks: Arc<dyn IdempotencyLocks>,
}

impl Stores {
    pub fn memory() -> Stores {
        let m = Arc::new(MemoryStores::default());
        Stores {
            sessions: m.clone(),
            limits: m.clone(),
            locks: m,
        }
    }

    pub async fn redis(url: &str, prefix: &str) -> anyhow::Result<Stores> {
        let r = Arc::new(redis::RedisStores::connect(url, prefix).await?);
        Ok(Stores {
            sessions: r.clone(),
            limits: r.clone(),
            locks: r,
        })
    }
}

pub struct AuthService {
    config: AuthConfig,
    users: Arc<dyn UserStore>,
    /// Account owners seen so far (an owner never changes).
    owners: Mutex<HashMap<String, Option<String>>>,
    pub stores: Stores,
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    argon2: Argon2<'static>,
    /// Verified against when the user does not exist, so that a missing
    /// user costs the same time as a wrong password.
    dummy_hash: String,
    /// In a split deployment, every service but auth asks the auth service
    /// for account owners.
    remote: Option<RemoteOwners>,
    /// This process's own service token and its expiry (seconds).
    service_token: Mutex<Option<(String, u64)>>,
    /// Password hashes computed at once (each takes ~19 MiB and a core for
    /// tens of milliseconds): more wait, up to [`HASH_WAIT`].
    hashing: tokio::sync::Semaphore,
}

/// Password hashes computed at once: one per core, so logins cannot take
/// every core or, at 19 MiB each, unbounded memory.
fn hash_slots() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// Longest a login or registration waits for a hashing slot before it is
/// answered 503 (the server is busy hashing other passwords).
pub const HASH_WAIT: Duration = Duration::from_secs(5);

/// The auth service's owner routes, over HTTP.
struct RemoteOwners {
    replicas: crate::peers::Replicas,
    client: reqwest::Client,
    /// The service asking (its service token's subject).
    caller: String,
}

#[derive(Deserialize)]
struct OwnedAnswer {
    owned: Vec<bool>,
}

#[derive(Deserialize)]
struct OwnerAnswer {
    owner: Option<String>,
}

/// Whether a user may create the account `id` for itself: accounts are
/// named after their user (`alice`, `alice-savings`, `alice.2`), so no
/// user can take the id another user's name stands for.
pub fn names_own_account(username: &str, id: &str) -> bool {
    match id.strip_prefix(username) {
        Some("") => true,
        Some(rest) => rest.len() > 1 && matches!(rest.as_bytes()[0], b'-' | b'.' | b'_' | b'@'),
        None => false,
    }
}

/// Accounts one user may create a minute: each one is a row on a shard
/// and room for webhooks, so a user cannot grow the system without bound.
pub const ACCOUNTS_PER_USER: Limit = Limit {
    max: 20,
    window: Duration::from_secs(60),
};

/// A username: 3 to 64 letters, digits, '_', '.', '-'.
pub fn valid_username(username: &str) -> bool {
    (3..=64).contains(&username.len())
        && username
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
}

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn sha256_hex(text: &str) -> String {
    let digest = sha2::Sha256::digest(text.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

fn random_hex(bytes: usize) -> String {
    let mut rng = rand::rng();
    (0..bytes)
        .map(|_| format!("{:02x}", rng.random::<u8>()))
        .collect()
}

impl AuthService {
    /// Opens the SQLite user store (`path`, or in memory when `None`).
    pub fn open(
        config: AuthConfig,
        path: Option<&Path>,
        stores: Stores,
    ) -> anyhow::Result<AuthService> {
        AuthService::with_users(config, Arc::new(SqliteUsers::open(path)?), stores)
    }

    /// The auth service over `users`: a SQLite file of its own, or a MySQL
    /// database that other replicas share.
    pub fn with_users(
        config: AuthConfig,
        users: Arc<dyn UserStore>,
        stores: Stores,
    ) -> anyhow::Result<AuthService> {
        let params = Params::new(config.argon2_memory_kib, config.argon2_iterations, 1, None)
            .map_err(|e| anyhow::anyhow!("argon2 cost: {e}"))?;
        let mut validation = Validation::new(jsonwebtoken::Algorithm::HS256);
        validation.set_audience(&[AUDIENCE]);
        validation.set_issuer(&[ISSUER]);
        validation.leeway = 0;
        let argon2 = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
        let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>())
            .map_err(|e| anyhow::anyhow!("salt: {e}"))?;
        let dummy_hash = argon2
            .hash_password(random_hex(16).as_bytes(), &salt)
            .map_err(|e| anyhow::anyhow!("argon2: {e}"))?
            .to_string();
        let service = AuthService {
            dummy_hash,
            encoding: EncodingKey::from_secret(config.secret.as_bytes()),
            decoding: DecodingKey::from_secret(config.secret.as_bytes()),
            validation,
            argon2,
            users,
            owners: Mutex::new(HashMap::new()),
            stores,
            config,
            remote: None,
            service_token: Mutex::new(None),
            hashing: tokio::sync::Semaphore::new(hash_slots()),
        };
        Ok(service)
    }

    /// Keeps account owners at the auth service (any of `replicas`)
    /// instead of in this process; `caller` names this service in its
    /// service token.
    pub fn with_remote_owners(
        mut self,
        replicas: crate::peers::Replicas,
        caller: &str,
    ) -> AuthService {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .expect("an HTTP client with a timeout builds");
        self.remote = Some(RemoteOwners {
            replicas,
            client,
            caller: caller.to_string(),
        });
        self
    }

    /// A service-role access token for this process's calls to the other
    /// services: a session of its own in the shared session store, signed
    /// with the shared secret, minted again before it expires.
    pub async fn service_token(&self) -> Result<String, AuthError> {
        let now = now_s();
        let margin = (self.config.access_ttl.as_secs() / 4).max(1);
        if let Some((token, exp)) = self.service_token.lock().expect("token lock").as_ref() {
            if *exp > now + margin {
                return Ok(token.clone());
            }
        }
        let name = match &self.remote {
            Some(r) => format!("service:{}", r.caller),
            None => "service:auth".to_string(),
        };
        let tokens = self.open_session(&name, Role::Service).await?;
        let exp = now + self.config.access_ttl.as_secs();
        *self.service_token.lock().expect("token lock") = Some((tokens.access_token.clone(), exp));
        Ok(tokens.access_token)
    }

    /// Drops the cached service token when it is `token`, which a peer
    /// refused (401: its session is gone, say with a Redis that restarted
    /// empty): the next call opens a new session.
    pub fn forget_service_token(&self, token: &str) {
        let mut cached = self.service_token.lock().expect("token lock");
        if cached.as_ref().is_some_and(|(t, _)| t == token) {
            *cached = None;
        }
    }

    /// Calls `path` on an auth replica with the request `build` makes of
    /// the client and the full URL; once more with a new service token when
    /// the first is refused.
    async fn remote_call(
        &self,
        remote: &RemoteOwners,
        path: &str,
        build: impl Fn(&reqwest::Client, &str) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, AuthError> {
        let mut token = self.service_token().await?;
        let mut response = remote
            .replicas
            .send(path, |url| {
                crate::peers::with_request_id(build(&remote.client, url).bearer_auth(&token))
            })
            .await
            .map_err(|e| AuthError::PeerUnavailable(e.to_string()))?;
        if response.status() == reqwest::StatusCode::UNAUTHORIZED {
            self.forget_service_token(&token);
            token = self.service_token().await?;
            response = remote
                .replicas
                .send(path, |url| {
                    crate::peers::with_request_id(build(&remote.client, url).bearer_auth(&token))
                })
                .await
                .map_err(|e| AuthError::PeerUnavailable(e.to_string()))?;
        }
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let response_url = response.url().clone();
        let body: serde_json::Value = response.json().await.unwrap_or_default();
        let message = body["error"]["message"]
            .as_str()
            .unwrap_or("no message")
            .to_string();
        Err(match body["error"]["code"].as_str() {
            Some("unknown_owner") => AuthError::Invalid(ErrorCode::UnknownOwner, message),
            _ => {
                AuthError::PeerUnavailable(format!("{} answered {status}: {message}", response_url))
            }
        })
    }

    /// Creates or resets the `admin` user when the config names a password.
    pub async fn bootstrap_admin(&self) -> anyhow::Result<()> {
        if let Some(password) = self.config.admin_password.clone() {
            let hash = self.hash(&password).await?;
            self.users.put_admin(&hash).await?;
        }
        Ok(())
    }

    pub fn config(&self) -> &AuthConfig {
        &self.config
    }

    /// A slot to compute one password hash in.
    async fn hash_slot(&self) -> Result<tokio::sync::SemaphorePermit<'_>, AuthError> {
        match tokio::time::timeout(HASH_WAIT, self.hashing.acquire()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(AuthError::Busy),
        }
    }

    async fn hash(&self, password: &str) -> Result<String, AuthError> {
        let _slot = self.hash_slot().await?;
        let argon2 = self.argon2.clone();
        let password = password.to_string();
        tokio::task::spawn_blocking(move || {
            let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>())
                .map_err(|e| AuthError::Internal(e.to_string()))?;
            argon2
                .hash_password(password.as_bytes(), &salt)
                .map(|h| h.to_string())
                .map_err(|e| AuthError::Internal(e.to_string()))
        })
        .await
        .map_err(|e| AuthError::Internal(e.to_string()))?
    }

    /// Registers a user. Only an admin may create another admin or a
    /// service user (the caller checks who is asking).
    pub async fn register(
        &self,
        username: &str,
        password: &str,
        role: Role,
    ) -> Result<(), AuthError> {
        if !valid_username(username) {
            return Err(AuthError::Invalid(
                ErrorCode::InvalidUsername,
                "username: 3 to 64 characters of letters, digits, '_', '.', '-'".into(),
            ));
        }
        if password.len() < 8 || password.len() > MAX_PASSWORD_LEN {
            return Err(AuthError::Invalid(
                ErrorCode::WeakPassword,
                "password: 8 to 256 characters".into(),
            ));
        }
        let hash = self.hash(password).await?;
        self.users.add_user(username, &hash, role).await
    }

    /// Counts one request against a limit; over it: `RateLimited`.
    pub async fn limit(
        &self,
        what: &'static str,
        key: &str,
        limit: Limit,
    ) -> Result<(), AuthError> {
        if limit.max == 0 {
            return Ok(());
        }
        let hit = self
            .stores
            .limits
            .hit(&format!("{what}:{key}"), limit.window)
            .await?;
        if hit.count > limit.max {
            return Err(AuthError::RateLimited {
                what,
                retry_after: hit.reset_in,
            });
        }
        Ok(())
    }

    pub async fn login(
        &self,
        username: &str,
        password: &str,
        address: &str,
    ) -> Result<Tokens, AuthError> {
        // The address first: a refused flood then leaves no per-user keys.
        self.limit("login-address", address, self.config.login_per_address)
            .await?;
        if !valid_username(username) {
            // No such user can exist; nothing to count or hash.
            return Err(AuthError::BadCredentials);
        }
        self.limit("login-user", username, self.config.login_per_user)
            .await?;
        let row = self.users.credentials(username).await?;
        let argon2 = self.argon2.clone();
        let password = password.to_string();
        // A missing user costs the same hash as a wrong password.
        let (hash, role) = match row {
            Some(found) => (found.password_hash, found.role),
            None => (self.dummy_hash.clone(), String::new()),
        };
        let _slot = self.hash_slot().await?;
        let ok = tokio::task::spawn_blocking(move || {
            PasswordHash::new(&hash)
                .map(|parsed| argon2.verify_password(password.as_bytes(), &parsed).is_ok())
                .unwrap_or(false)
        })
        .await
        .map_err(|e| AuthError::Internal(e.to_string()))?;
        let role = Role::parse(&role);
        match (ok, role) {
            (true, Some(role)) => self.open_session(username, role).await,
            _ => Err(AuthError::BadCredentials),
        }
    }

    /// The refresh secret of generation `generation` of session `sid`:
    /// `<generation>.<hex HMAC-SHA256 of "refresh.<sid>.<generation>">`,
    /// keyed by the server's secret. Only this server can make one, so a
    /// presented secret that verifies but is not the session's current one
    /// is a token it issued earlier: a reuse, not a guess.
    fn refresh_secret(&self, sid: &str, generation: u64) -> String {
        use hmac::{Hmac, Mac};
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(self.config.secret.as_bytes())
            .expect("any key length");
        mac.update(format!("refresh.{sid}.{generation}").as_bytes());
        let digest = mac.finalize().into_bytes();
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        format!("{generation}.{hex}")
    }

    /// The generation of `secret` if this server issued it for `sid`.
    fn issued_generation(&self, sid: &str, secret: &str) -> Option<u64> {
        let (generation, _) = secret.split_once('.')?;
        let generation: u64 = generation.parse().ok()?;
        let expected = self.refresh_secret(sid, generation);
        // Compared as hashes: equal-length digests, no early exit on the
        // secret's own bytes.
        (sha256_hex(&expected) == sha256_hex(secret)).then_some(generation)
    }

    async fn open_session(&self, username: &str, role: Role) -> Result<Tokens, AuthError> {
        let sid = random_hex(16);
        let secret = self.refresh_secret(&sid, 0);
        let session = Session {
            username: username.into(),
            role: role.as_str().into(),
            refresh_hash: sha256_hex(&secret),
        };
        self.stores
            .sessions
            .put(&sid, &session, self.config.refresh_ttl)
            .await?;
        self.tokens(username, role, &sid, &secret)
    }

    fn tokens(
        &self,
        username: &str,
        role: Role,
        sid: &str,
        secret: &str,
    ) -> Result<Tokens, AuthError> {
        let now = now_s();
        let claims = Claims {
            sub: username.into(),
            role,
            sid: sid.into(),
            aud: AUDIENCE.into(),
            iss: ISSUER.into(),
            iat: now,
            exp: now + self.config.access_ttl.as_secs(),
        };
        let access_token = jsonwebtoken::encode(&Header::default(), &claims, &self.encoding)
            .map_err(|e| AuthError::Internal(e.to_string()))?;
        Ok(Tokens {
            access_token,
            token_type: "Bearer",
            expires_in: self.config.access_ttl.as_secs(),
            refresh_token: format!("{sid}.{secret}"),
            username: username.into(),
            role,
        })
    }

    /// Trades a refresh token for new tokens; the old refresh token stops
    /// working.
    pub async fn refresh(&self, refresh_token: &str) -> Result<Tokens, AuthError> {
        let invalid = || {
            AuthError::Unauthorized(
                ErrorCode::InvalidRefreshToken,
                "the refresh token is not valid (used, revoked or expired); log in again".into(),
            )
        };
        let (sid, secret) = refresh_token.split_once('.').ok_or_else(invalid)?;
        if sid.len() > 64 || secret.len() > 128 {
            return Err(invalid());
        }
        // A secret this server never issued is a guess: refused, and the
        // session (whose id is no secret) is left alone.
        let generation = self.issued_generation(sid, secret).ok_or_else(invalid)?;
        let session = self.stores.sessions.get(sid).await?.ok_or_else(invalid)?;
        let new_secret = self.refresh_secret(sid, generation + 1);
        let rotated = self
            .stores
            .sessions
            .rotate(
                sid,
                &sha256_hex(secret),
                &sha256_hex(&new_secret),
                self.config.refresh_ttl,
            )
            .await?;
        if !rotated {
            // A refresh token this server issued, but not the session's
            // current one, is being used again: one of its two holders is
            // a thief, and we cannot tell which. Revoke the whole session,
            // so neither keeps access (refresh-token rotation practice,
            // RFC 6819 5.2.2.3).
            self.stores.sessions.revoke(sid).await?;
            tracing::warn!(user = %session.username, "a used refresh token came back; its session is revoked");
            return Err(AuthError::Unauthorized(ErrorCode::RefreshTokenReused,
                "this refresh token was already used; the session is revoked for safety, log in again".into(),
            ));
        }
        let role = Role::parse(&session.role).ok_or_else(invalid)?;
        self.tokens(&session.username, role, sid, &new_secret)
    }

    pub async fn logout(&self, principal: &Principal) -> Result<(), AuthError> {
        Ok(self.stores.sessions.revoke(&principal.session).await?)
    }

    /// Revokes every session of `username`: its access and refresh tokens
    /// stop working at once, wherever they are.
    pub async fn logout_everywhere(&self, username: &str) -> Result<u64, AuthError> {
        Ok(self.stores.sessions.revoke_user(username).await?)
    }

    /// Checks an access token: signature, audience, issuer, expiry, and
    /// that its session was not revoked.
    pub async fn authenticate(&self, token: &str) -> Result<Principal, AuthError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Unauthorized(
                    ErrorCode::TokenExpired,
                    "the access token expired; refresh it (POST /v1/auth/refresh) or log in again"
                        .into(),
                ),
                _ => AuthError::Unauthorized(
                    ErrorCode::InvalidToken,
                    format!("the access token is not valid: {e}"),
                ),
            })?;
        let claims = data.claims;
        let session = self.stores.sessions.get(&claims.sid).await?;
        match session {
            Some(s) if s.username == claims.sub => Ok(Principal {
                username: claims.sub,
                role: claims.role,
                session: claims.sid,
            }),
            _ => Err(AuthError::Unauthorized(
                ErrorCode::SessionRevoked,
                "this session was logged out or expired; log in again".into(),
            )),
        }
    }

    /// Records owners of accounts that have none yet, in one transaction;
    /// answers, per (account, owner) pair, whether that owner owns the
    /// account now. Every owner must be a registered user.
    pub async fn claim(&self, pairs: &[(&str, &str)]) -> Result<Vec<bool>, AuthError> {
        let owned = self.owners_call(pairs, true).await?;
        let mut cache = self.owners.lock().expect("owners lock");
        for ((account, owner), mine) in pairs.iter().zip(&owned) {
            if *mine {
                cache.insert(account.to_string(), Some(owner.to_string()));
            }
        }
        Ok(owned)
    }

    /// Before accounts are created for owners: checks every owner is a
    /// registered user and answers, per pair, whether the account is free
    /// for that owner (no owner yet, or that one). Records nothing.
    pub async fn check_owners(&self, pairs: &[(&str, &str)]) -> Result<Vec<bool>, AuthError> {
        self.owners_call(pairs, false).await
    }

    /// An admin gives an account without an owner to `owner` (a registered
    /// user). Answers whether `owner` owns it now: false when another
    /// user already does (owners never change once set, which is what
    /// lets every service cache them).
    pub async fn assign_owner(&self, account: &str, owner: &str) -> Result<bool, AuthError> {
        Ok(self.claim(&[(account, owner)]).await?[0])
    }

    /// [`AuthService::claim`] (`record`) or [`AuthService::check_owners`],
    /// here or at the auth service of a split deployment.
    async fn owners_call(
        &self,
        pairs: &[(&str, &str)],
        record: bool,
    ) -> Result<Vec<bool>, AuthError> {
        if pairs.is_empty() {
            return Ok(Vec::new());
        }
        let Some(remote) = &self.remote else {
            return if record {
                self.users.claim_owners(pairs).await
            } else {
                self.users.check_owners(pairs).await
            };
        };
        let body = serde_json::json!({
            "pairs": pairs
                .iter()
                .map(|(account, owner)| serde_json::json!({"account": account, "owner": owner}))
                .collect::<Vec<_>>(),
            "check_only": !record,
        });
        let response = self
            .remote_call(remote, "/v1/auth/owners", |client, url| {
                client.post(url).json(&body)
            })
            .await?;
        let answer: OwnedAnswer = response
            .json()
            .await
            .map_err(|e| AuthError::PeerUnavailable(format!("owners answer: {e}")))?;
        if answer.owned.len() != pairs.len() {
            return Err(AuthError::PeerUnavailable(
                "the owners answer does not match the request".into(),
            ));
        }
        Ok(answer.owned)
    }

    /// The owner of an account, if it has one.
    pub async fn owner_of(&self, account: &str) -> Result<Option<String>, AuthError> {
        if let Some(Some(owner)) = self.owners.lock().expect("owners lock").get(account) {
            return Ok(Some(owner.clone()));
        }
        let Some(remote) = &self.remote else {
            return self.owner_here(account).await;
        };
        let path = format!("/v1/auth/owners/{account}");
        let response = self
            .remote_call(remote, &path, |client, url| client.get(url))
            .await?;
        let answer: OwnerAnswer = response
            .json()
            .await
            .map_err(|e| AuthError::PeerUnavailable(format!("owner answer: {e}")))?;
        if let Some(owner) = &answer.owner {
            self.owners
                .lock()
                .expect("owners lock")
                .insert(account.into(), Some(owner.clone()));
        }
        Ok(answer.owner)
    }

    /// [`AuthService::owner_of`] on this process's own user store.
    async fn owner_here(&self, account: &str) -> Result<Option<String>, AuthError> {
        let owner = self.users.owner_of(account).await?;
        if owner.is_some() {
            self.owners
                .lock()
                .expect("owners lock")
                .insert(account.into(), owner.clone());
        }
        Ok(owner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_names_only_its_own_accounts() {
        for id in ["alice", "alice-savings", "alice.2", "alice_b", "alice@home"] {
            assert!(names_own_account("alice", id), "{id}");
        }
        for id in ["carol", "alicex", "alice-", "xalice", "ali", "Alice", ""] {
            assert!(!names_own_account("alice", id), "{id}");
        }
    }

    #[tokio::test]
    async fn only_a_refresh_token_this_server_issued_counts_as_reused() {
        let mut config = AuthConfig::new("a-test-secret-of-at-least-32-characters!!");
        config.argon2_memory_kib = 64;
        config.argon2_iterations = 1;
        let auth = AuthService::open(config, None, Stores::memory()).unwrap();
        auth.register("alice", "alice-password", Role::User)
            .await
            .unwrap();
        let first = auth.login("alice", "alice-password", "t").await.unwrap();
        let sid = first.refresh_token.split_once('.').unwrap().0.to_string();
        // A guess at the secret of a known session id: refused, and the
        // session lives on (a session id is no secret: it is in every
        // access token).
        for guess in [
            format!("{sid}.0.deadbeef"),
            format!("{sid}.1.{}", "0".repeat(64)),
            format!("{sid}.x"),
        ] {
            let err = auth.refresh(&guess).await.unwrap_err();
            assert!(
                matches!(
                    err,
                    AuthError::Unauthorized(ErrorCode::InvalidRefreshToken, _)
                ),
                "{err:?}"
            );
        }
        assert!(auth.authenticate(&first.access_token).await.is_ok());
        // The real one works once; presented again, the session is revoked.
        let second = auth.refresh(&first.refresh_token).await.unwrap();
        let err = auth.refresh(&first.refresh_token).await.unwrap_err();
        assert!(
            matches!(
                err,
                AuthError::Unauthorized(ErrorCode::RefreshTokenReused, _)
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("log in again"), "{err}");
        assert!(auth.authenticate(&second.access_token).await.is_err());
        assert!(auth.refresh(&second.refresh_token).await.is_err());
    }
}
