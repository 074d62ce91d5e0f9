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

/// Rate-limit windows and idempotency locks held at most, each: past this,
/// expired ones are swept, and if the map is still full a new key is
/// refused (a limit answers "over", a lock "held") rather than grown.
pub const MAX_MEMORY_KEYS: usize = 100_000;
/// Longest key kept as it is; a longer one (built from client input) is
/// kept as a hash of itself, so a key costs a bounded number of bytes.
pub const MAX_KEY_LEN: usize = 128;

/// `key`, or a fixed-size stand-in for a long one.
pub fn bounded_key(key: &str) -> std::borrow::Cow<'_, str> {
    if key.len() <= MAX_KEY_LEN {
        std::borrow::Cow::Borrowed(key)
    } else {
        let digest = xxhash_rust::xxh3::xxh3_128(key.as_bytes());
        std::borrow::Cow::Owned(format!("#{digest:032x}"))
    }
}

/// Makes room for one more key in `map`: sweeps expired entries when it is
/// full; answers false when it is still full.
fn room<V>(map: &mut HashMap<String, V>, expired: impl Fn(&V) -> bool) -> bool {
    if map.len() < MAX_MEMORY_KEYS {
        return true;
    }
    map.retain(|_, v| !expired(v));
    map.len() < MAX_MEMORY_KEYS
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
        let now = Instant::now();
        let mut sessions = self.sessions.lock().expect("sessions lock");
        if !room(&mut sessions, |(_, expires)| *expires <= now) {
            return Err(StoreDown(format!(
                "the in-memory session store holds its maximum of {MAX_MEMORY_KEYS} live sessions"
            )));
        }
        sessions.insert(sid.into(), (session.clone(), now + ttl));
        Ok(())
    }

    async fn get(&self, sid: &str) -> Result<Option<Session>, StoreDown> {
        if sid.len() > MAX_KEY_LEN {
            return Ok(None);
        }
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
        let key = bounded_key(key);
        let mut windows = self.windows.lock().expect("windows lock");
        if !windows.contains_key(key.as_ref()) && !room(&mut windows, |(_, end)| *end <= now) {
            // Full of live windows: count this key as over any limit.
            return Ok(Hit {
                count: u64::MAX,
                reset_in: window,
            });
        }
        let entry = windows.entry(key.into_owned()).or_insert((0, now + window));
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
        let key = bounded_key(key);
        let mut locks = self.locks.lock().expect("locks lock");
        match locks.get(key.as_ref()) {
            Some((_, expires)) if *expires > now => Ok(false),
            Some(_) => {
                locks.insert(key.into_owned(), (token.into(), now + ttl));
                Ok(true)
            }
            None => {
                if !room(&mut locks, |(_, expires)| *expires <= now) {
                    return Ok(false);
                }
                locks.insert(key.into_owned(), (token.into(), now + ttl));
                Ok(true)
            }
        }
    }

    async fn release(&self, key: &str, token: &str) -> Result<(), StoreDown> {
        let key = bounded_key(key);
        let mut locks = self.locks.lock().expect("locks lock");
        if locks.get(key.as_ref()).is_some_and(|(t, _)| t == token) {
            locks.remove(key.as_ref());
        }
        Ok(())
    }
}
