//! Fraud features on Redis, shared by every fraud replica. One Lua script
//! per attempt drops the payer's attempts that left the window, reads the
//! features, and records the attempt, so attempts scored at once by
//! several replicas are each counted, in one order, as the memory store
//! counts them in one process.
//!
//! Keys, per payer (one hash tag, so a cluster keeps them on one node):
//! - `<prefix>fraud:{<payer>}:recent`: a list of `"<at_ms> <hi> <lo>"`,
//!   oldest first, as the memory store's queue;
//! - `<prefix>fraud:{<payer>}:sums`: a hash of the sums of the list's `hi`
//!   and `lo` parts (an amount is `hi * 2^32 + lo`), so that the sum is
//!   kept exactly in Redis's 64-bit integers whatever the amounts;
//! - `<prefix>fraud:{<payer>}:payees`: a set of the payees paid.
//!
//! Every attempt sets the expiry of all three: the attempts and sums
//! vanish a window (plus a margin) after the payer's last attempt, the
//! payees after `PAYEES_TTL_MS`.

use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;

use super::{FeatureStore, Features, CLOCK_SKEW_MARGIN_MS, MAX_PAYEES_PER_PAYER, PAYEES_TTL_MS};
use crate::auth::stores::{bounded_key, StoreDown};
use crate::ledger::TimestampMs;

/// Drop the attempts at or before the window's start (from the oldest, as
/// the memory store does), answer count, sums and whether the payee was
/// paid before, then record the attempt and the payee. Subtractions negate
/// the stored digits as text, so no number passes through a Lua double.
const OBSERVE: &str = r#"
local function negated(n)
  if n == '0' then return n end
  if string.sub(n, 1, 1) == '-' then return string.sub(n, 2) end
  return '-' .. n
end
local cutoff = tonumber(ARGV[1])
while true do
  local oldest = redis.call('LINDEX', KEYS[1], 0)
  if not oldest then break end
  local at, hi, lo = string.match(oldest, '^(%S+) (%S+) (%S+)$')
  if tonumber(at) > cutoff then break end
  redis.call('LPOP', KEYS[1])
  redis.call('HINCRBY', KEYS[2], 'hi', negated(hi))
  redis.call('HINCRBY', KEYS[2], 'lo', negated(lo))
end
local count = redis.call('LLEN', KEYS[1])
if count == 0 then redis.call('DEL', KEYS[2]) end
local sums = redis.call('HMGET', KEYS[2], 'hi', 'lo')
local seen = redis.call('SISMEMBER', KEYS[3], ARGV[5])
if seen == 0 then
  if redis.call('SCARD', KEYS[3]) >= tonumber(ARGV[8]) then redis.call('DEL', KEYS[3]) end
  redis.call('SADD', KEYS[3], ARGV[5])
end
redis.call('RPUSH', KEYS[1], ARGV[2])
redis.call('HINCRBY', KEYS[2], 'hi', ARGV[3])
redis.call('HINCRBY', KEYS[2], 'lo', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[6])
redis.call('PEXPIRE', KEYS[2], ARGV[6])
redis.call('PEXPIRE', KEYS[3], ARGV[7])
return {count, sums[1] or '0', sums[2] or '0', seen}
"#;

/// Features shared through one Redis: one multiplexed connection that
/// reconnects by itself, with short timeouts (a Redis that is down costs
/// a score a bounded wait, then a refusal).
pub struct RedisFeatureStore {
    conn: ConnectionManager,
    prefix: String,
    observe: Script,
}

/// A Redis failure: the fraud engine refuses to score on it.
fn down(e: redis::RedisError) -> StoreDown {
    StoreDown(format!("redis: {e}"))
}

/// `amount` as `(hi, lo)` with `amount == hi * 2^32 + lo` and
/// `0 <= lo < 2^32`: summed separately, neither part can overflow Redis's
/// 64-bit integers before 2^31 attempts.
pub(crate) fn split(amount_minor: i64) -> (i64, i64) {
    (amount_minor >> 32, amount_minor & 0xFFFF_FFFF)
}

/// The sum of amounts whose parts summed to `hi` and `lo`, capped at
/// `i64::MAX` as the memory store caps its sum.
pub(crate) fn join(hi: i64, lo: i64) -> i64 {
    let sum = ((hi as i128) << 32) + lo as i128;
    i64::try_from(sum).unwrap_or(i64::MAX)
}

impl RedisFeatureStore {
    /// Connects (`redis://host:port[/db]`); fails if Redis does not answer.
    pub async fn connect(url: &str, prefix: &str) -> anyhow::Result<RedisFeatureStore> {
        let client = redis::Client::open(url)
            .map_err(|e| anyhow::anyhow!("fraud features on Redis {url}: {e}"))?;
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
                    "cannot reach Redis at {url} for the fraud features: {e}; start one (scripts/redis.sh up) or use --fraud-features memory"
                )
            })?;
        Ok(RedisFeatureStore {
            conn,
            prefix: prefix.to_string(),
            observe: Script::new(OBSERVE),
        })
    }

    fn key(&self, payer: &str, kind: &str) -> String {
        format!("{}fraud:{{{}}}:{kind}", self.prefix, bounded_key(payer))
    }
}

#[async_trait]
impl FeatureStore for RedisFeatureStore {
    async fn observe(
        &self,
        payer: &str,
        payee: &str,
        amount_minor: i64,
        at_ms: TimestampMs,
        window_ms: i64,
    ) -> Result<Features, StoreDown> {
        let (hi, lo) = split(amount_minor);
        let mut conn = self.conn.clone();
        let (count, hi_sum, lo_sum, seen): (u32, i64, i64, i64) = self
            .observe
            .key(self.key(payer, "recent"))
            .key(self.key(payer, "sums"))
            .key(self.key(payer, "payees"))
            .arg(at_ms.saturating_sub(window_ms))
            .arg(format!("{at_ms} {hi} {lo}"))
            .arg(hi)
            .arg(lo)
            .arg(bounded_key(payee).as_ref())
            .arg(window_ms.saturating_add(CLOCK_SKEW_MARGIN_MS).max(1))
            .arg(PAYEES_TTL_MS)
            .arg(MAX_PAYEES_PER_PAYER)
            .invoke_async(&mut conn)
            .await
            .map_err(down)?;
        Ok(Features {
            count_in_window: count,
            sum_in_window: join(hi_sum, lo_sum),
            paid_payee_before: seen == 1,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_amount_splits_into_parts_that_join_back() {
        for amount in [0, 1, -1, 4_50, 1 << 32, (1 << 32) - 1, i64::MAX, i64::MIN] {
            let (hi, lo) = split(amount);
            assert!((0..1 << 32).contains(&lo), "{amount}: lo {lo}");
            assert_eq!(join(hi, lo), amount, "{amount}");
        }
    }

    #[test]
    fn sums_of_parts_give_the_sum_capped_as_the_memory_store_caps_it() {
        let amounts = [i64::MAX, i64::MAX, 7];
        let (hi, lo) = amounts.iter().fold((0, 0), |(h, l), &a| {
            let (ah, al) = split(a);
            (h + ah, l + al)
        });
        assert_eq!(join(hi, lo), i64::MAX);
        let (hi, lo) = [(1i64 << 40) + 3, 5, 1 << 33]
            .iter()
            .fold((0, 0), |(h, l), &a| (h + split(a).0, l + split(a).1));
        assert_eq!(join(hi, lo), (1 << 40) + 8 + (1 << 33));
    }
}
