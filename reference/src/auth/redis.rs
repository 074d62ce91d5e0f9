//! The auth stores on Redis: one multiplexed connection that reconnects by
//! itself, short timeouts so a Redis that is down costs a request a bounded
//! wait, and Lua scripts where two commands must act as one.

use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Script};

use super::stores::{Hit, IdempotencyLocks, RateLimiter, Session, SessionStore, StoreDown};

/// Keys are `<prefix>sess:<sid>`, `<prefix>usess:<username>` (the set of a
/// user's session ids), `<prefix>rl:<key>`, `<prefix>idem:<key>`.
pub struct RedisStores {
    conn: ConnectionManager,
    prefix: String,
    hit: Script,
    rotate: Script,
    release: Script,
    revoke_user: Script,
}

fn down(e: redis::RedisError) -> StoreDown {
    StoreDown(format!("redis: {e}"))
}

/// INCR, and start the window on the first hit: atomic, so concurrent
/// requests each get their own count and the key always expires.
const HIT: &str = r#"
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[1]); ttl = tonumber(ARGV[1]) end
return {n, ttl}
"#;

/// Swap the refresh hash only if it is still the old one; the user's set
/// of sessions lives at least as long as the session.
const ROTATE: &str = r#"
if redis.call('HGET', KEYS[1], 'refresh') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'refresh', ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  local user = redis.call('HGET', KEYS[1], 'user')
  if user then redis.call('PEXPIRE', ARGV[4] .. user, ARGV[3]) end
  return 1
end
return 0
"#;

/// Delete every session in the user's set, then the set; answers how many
/// still existed.
const REVOKE_USER: &str = r#"
local sids = redis.call('SMEMBERS', KEYS[1])
local n = 0
for _, sid in ipairs(sids) do
  n = n + redis.call('DEL', ARGV[1] .. sid)
end
redis.call('DEL', KEYS[1])
return n
"#;

/// Delete the lock only if this holder still has it.
const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

impl RedisStores {
    /// Connects (`redis://host:port[/db]`); fails if Redis does not answer.
    pub async fn connect(url: &str, prefix: &str) -> anyhow::Result<RedisStores> {
        let client = redis::Client::open(url).map_err(|e| anyhow::anyhow!("--redis {url}: {e}"))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_millis(500)))
            .set_response_timeout(Some(Duration::from_millis(500)))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(200));
        let conn = client
            .get_connection_manager_with_config(config)
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot reach Redis at {url}: {e}; start one (redis-server --port 6379) or leave --redis out for the in-memory stores"
                )
            })?;
        Ok(RedisStores {
            conn,
            prefix: prefix.to_string(),
            hit: Script::new(HIT),
            rotate: Script::new(ROTATE),
            release: Script::new(RELEASE),
            revoke_user: Script::new(REVOKE_USER),
        })
    }

    fn key(&self, kind: &str, key: &str) -> String {
        // Keys built from client input are bounded in size here too.
        let key = super::stores::bounded_key(key);
        format!("{}{kind}:{key}", self.prefix)
    }
}

fn ms(d: Duration) -> u64 {
    d.as_millis().max(1) as u64
}

#[async_trait]
impl SessionStore for RedisStores {
    async fn put(&self, sid: &str, session: &Session, ttl: Duration) -> Result<(), StoreDown> {
        let key = self.key("sess", sid);
        let user_key = self.key("usess", &session.username);
        let mut conn = self.conn.clone();
        redis::pipe()
            .atomic()
            .hset(&key, "user", &session.username)
            .hset(&key, "role", &session.role)
            .hset(&key, "refresh", &session.refresh_hash)
            .pexpire(&key, ms(ttl) as i64)
            // Every session gets the same lifetime, so the newest one
            // expires last: the set lives as long as it.
            .sadd(&user_key, sid)
            .pexpire(&user_key, ms(ttl) as i64)
            .query_async::<()>(&mut conn)
            .await
            .map_err(down)
    }

    async fn get(&self, sid: &str) -> Result<Option<Session>, StoreDown> {
        let mut conn = self.conn.clone();
        let (user, role, refresh): (Option<String>, Option<String>, Option<String>) =
            redis::cmd("HMGET")
                .arg(self.key("sess", sid))
                .arg("user")
                .arg("role")
                .arg("refresh")
                .query_async(&mut conn)
                .await
                .map_err(down)?;
        Ok(match (user, role, refresh) {
            (Some(username), Some(role), Some(refresh_hash)) => Some(Session {
                username,
                role,
                refresh_hash,
            }),
            _ => None,
        })
    }

    async fn rotate(
        &self,
        sid: &str,
        old: &str,
        new: &str,
        ttl: Duration,
    ) -> Result<bool, StoreDown> {
        let mut conn = self.conn.clone();
        let swapped: i64 = self
            .rotate
            .key(self.key("sess", sid))
            .arg(old)
            .arg(new)
            .arg(ms(ttl))
            .arg(self.key("usess", ""))
            .invoke_async(&mut conn)
            .await
            .map_err(down)?;
        Ok(swapped == 1)
    }

    async fn revoke(&self, sid: &str) -> Result<(), StoreDown> {
        let mut conn = self.conn.clone();
        conn.del::<_, ()>(self.key("sess", sid)).await.map_err(down)
    }

    async fn revoke_user(&self, username: &str) -> Result<u64, StoreDown> {
        let mut conn = self.conn.clone();
        self.revoke_user
            .key(self.key("usess", username))
            .arg(self.key("sess", ""))
            .invoke_async(&mut conn)
            .await
            .map_err(down)
    }
}

#[async_trait]
impl RateLimiter for RedisStores {
    async fn hit(&self, key: &str, window: Duration) -> Result<Hit, StoreDown> {
        let mut conn = self.conn.clone();
        let (count, ttl): (u64, i64) = self
            .hit
            .key(self.key("rl", key))
            .arg(ms(window))
            .invoke_async(&mut conn)
            .await
            .map_err(down)?;
        Ok(Hit {
            count,
            reset_in: Duration::from_millis(ttl.max(0) as u64),
        })
    }
}

#[async_trait]
impl IdempotencyLocks for RedisStores {
    async fn acquire(&self, key: &str, token: &str, ttl: Duration) -> Result<bool, StoreDown> {
        let mut conn = self.conn.clone();
        let set: Option<String> = redis::cmd("SET")
            .arg(self.key("idem", key))
            .arg(token)
            .arg("NX")
            .arg("PX")
            .arg(ms(ttl))
            .query_async(&mut conn)
            .await
            .map_err(down)?;
        Ok(set.is_some())
    }

    async fn release(&self, key: &str, token: &str) -> Result<(), StoreDown> {
        let mut conn = self.conn.clone();
        self.release
            .key(self.key("idem", key))
            .arg(token)
            .invoke_async::<i64>(&mut conn)
            .await
            .map_err(down)?;
        Ok(())
    }
}
