//! What the auth service and the shard manager keep in Redis, as traits
//! with an in-memory twin each, so the embedded default needs no server:
//! sessions (and so token revocation), fixed-window rate limits, and short
//! idempotency locks.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;

/// A failure of the store itself (Redis down, a timeout): callers answer
/// 503 or fall back to the database path, never guess.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StoreDown(pub String);

/// A login session: what a refresh token and the access tokens issued
/// under it stand for. Deleting it revokes them all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub username: String,
    pub role: String,
    /// SHA-256 (hex) of the current refresh token; rotated on refresh.
    pub refresh_hash: String,
}

#[async_trait]
pub trait SessionStore: Send + Sync {
    async fn put(&self, sid: &str, session: &Session, ttl: Duration) -> Result<(), StoreDown>;
    async fn get(&self, sid: &str) -> Result<Option<Session>, StoreDown>;
    /// Swaps the refresh hash if it still is `old` (so a refresh token
    /// works once); answers whether it did.
    async fn rotate(
        &self,
        sid: &str,
        old: &str,
        new: &str,
        ttl: Duration,
    ) -> Result<bool, StoreDown>;
    async fn revoke(&self, sid: &str) -> Result<(), StoreDown>;
    /// Revokes every session of `username` ("log out everywhere");
    /// answers how many there were.
    async fn revoke_user(&self, username: &str) -> Result<u64, StoreDown>;
}

/// What a rate limit answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hit {
    /// Requests in the current window, this one included.
    pub count: u64,
    /// Until the window ends.
    pub reset_in: Duration,
}

#[async_trait]
pub trait RateLimiter: Send + Sync {
    /// Counts one request against `key` in a fixed window of `window`,
    /// atomically (concurrent callers never both see the same count).
    async fn hit(&self, key: &str, window: Duration) -> Result<Hit, StoreDown>;
}

#[async_trait]
pub trait IdempotencyLocks: Send + Sync {
    /// Takes the lock if free (SET NX PX); answers whether it did.
    async fn acquire(&self, key: &str, token: &str, ttl: Duration) -> Result<bool, StoreDown>;
    /// Releases it if `token` still holds it.
    async fn release(&self, key: &str, token: &str) -> Result<(), StoreDown>;
}

/// The in-memory twin of all three.
#[derive(Default)]
pub struct MemoryStores {
    sessions: Mutex<HashMap<String, (Session, Instant)>>,
    windows: Mutex<HashMap<String, (u64, Instant)>>,
    locks: Mutex<HashMap<String, (String, Instant)>>,
}

#[async_trait]
impl SessionStore for MemoryStores {
    async fn put(&self, sid: &str, session: &Session, ttl: Duration) -> Result<(), StoreDown> {
        let mut sessions = self.sessions.lock().expect("sessions lock");
        sessions.insert(sid.into(), (session.clone(), Instant::now() + ttl));
        Ok(())
    }

    async fn get(&self, sid: &str) -> Result<Option<Session>, StoreDown> {
        let mut sessions = self.sessions.lock().expect("sessions lock");
        match sessions.get(sid) {
            Some((s, expires)) if *expires > Instant::now() => Ok(Some(s.clone())),
            Some(_) => {
                sessions.remove(sid);
                Ok(None)
            }
            None => Ok(None),
        }
    }

    async fn rotate(
        &self,
        sid: &str,
        old: &str,
        new: &str,
        ttl: Duration,
    ) -> Result<bool, StoreDown> {
        let mut sessions = self.sessions.lock().expect("sessions lock");
        match sessions.get_mut(sid) {
            Some((s, expires)) if *expires > Instant::now() && s.refresh_hash == old => {
                s.refresh_hash = new.into();
                *expires = Instant::now() + ttl;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn revoke(&self, sid: &str) -> Result<(), StoreDown> {
        self.sessions.lock().expect("sessions lock").remove(sid);
        Ok(())
    }

    async fn revoke_user(&self, username: &str) -> Result<u64, StoreDown> {
        let now = Instant::now();
        let mut sessions = self.sessions.lock().expect("sessions lock");
        let before = sessions.len();
        let mut live = 0;
        sessions.retain(|_, (s, expires)| {
            let theirs = s.username == username;
            if theirs && *expires > now {
                live += 1;
            }
            !theirs
        });
        debug_assert!(sessions.len() <= before);
        Ok(live)
    }
}

#[async_trait]
impl RateLimiter for MemoryStores {
    async fn hit(&self, key: &str, window: Duration) -> Result<Hit, StoreDown> {
        let now = Instant::now();
        let mut windows = self.windows.lock().expect("windows lock");
        if windows.len() > 100_000 {
            windows.retain(|_, (_, end)| *end > now);
        }
        let entry = windows.entry(key.into()).or_insert((0, now + window));
        if entry.1 <= now {
            *entry = (0, now + window);
        }
        entry.0 += 1;
        Ok(Hit {
            count: entry.0,
            reset_in: entry.1 - now,
        })
    }
}

#[async_trait]
impl IdempotencyLocks for MemoryStores {
    async fn acquire(&self, key: &str, token: &str, ttl: Duration) -> Result<bool, StoreDown> {
        let now = Instant::now();
        let mut locks = self.locks.lock().expect("locks lock");
        match locks.get(key) {
            Some((_, expires)) if *expires > now => Ok(false),
            _ => {
                locks.insert(key.into(), (token.into(), now + ttl));
                Ok(true)
            }
        }
    }

    async fn release(&self, key: &str, token: &str) -> Result<(), StoreDown> {
        let mut locks = self.locks.lock().expect("locks lock");
        if locks.get(key).is_some_and(|(t, _)| t == token) {
            locks.remove(key);
        }
        Ok(())
    }
}
