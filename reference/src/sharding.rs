//! The one place that decides which shard holds an account.
//!
//! The account id's bytes are hashed with XXH3-64 (seed 0, the published
//! XXH3 specification), and the 64-bit hash is mapped to a shard with jump
//! consistent hashing (Lamping and Veach, "A Fast, Minimal Memory,
//! Consistent Hash Algorithm", 2014). Both are fixed functions of their
//! inputs: the same id lands on the same shard in every process, on every
//! machine and in every release. The golden values in the tests below pin
//! that; changing them is a data migration, not a refactor.
//!
//! Jump hashing spreads ids evenly over `n` shards, and growing from `n` to
//! `n + 1` shards moves only the ids that land on the new shard, about
//! `1 / (n + 1)` of them.

use crate::ids::{AccountId, IdError, ShardId, MAX_SHARDS};

/// How a key's hash is mapped onto `n` shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Strategy {
    /// Jump consistent hashing (the default): growing from `n` to `n + 1`
    /// shards moves about `1 / (n + 1)` of the accounts.
    #[default]
    Jump,
    /// `hash % n`, as the modelled system places accounts (`md5(id) % 4`):
    /// growing from `n` to `n + 1` moves about `n / (n + 1)` of them.
    Modulo,
}

impl Strategy {
    pub const NAMES: &'static str = "jump, modulo";

    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Jump => "jump",
            Strategy::Modulo => "modulo",
        }
    }

    pub fn parse(text: &str) -> Option<Strategy> {
        match text {
            "jump" => Some(Strategy::Jump),
            "modulo" => Some(Strategy::Modulo),
            _ => None,
        }
    }
}

/// Maps account ids to shards for a fixed shard count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ring {
    shard_count: u32,
    strategy: Strategy,
}

impl Ring {
    /// A ring over `shard_count` shards, 1 to 64, by jump hashing.
    pub fn new(shard_count: u32) -> Result<Ring, IdError> {
        Ring::with_strategy(shard_count, Strategy::Jump)
    }

    /// A ring over `shard_count` shards, 1 to 64, placed by `strategy`.
    pub fn with_strategy(shard_count: u32, strategy: Strategy) -> Result<Ring, IdError> {
        if (1..=MAX_SHARDS).contains(&shard_count) {
            Ok(Ring {
                shard_count,
                strategy,
            })
        } else {
            Err(IdError::Shard(shard_count))
        }
    }

    pub fn shard_count(&self) -> u32 {
        self.shard_count
    }

    pub fn strategy(&self) -> Strategy {
        self.strategy
    }

    /// All shard ids, in order.
    pub fn shards(&self) -> impl Iterator<Item = ShardId> {
        (0..self.shard_count).map(|i| ShardId::new(i).expect("count is bounded"))
    }

    /// The shard that holds `account`.
    pub fn shard_of(&self, account: &AccountId) -> ShardId {
        self.shard_of_key(account.as_str())
    }

    /// The shard for any key text (used for ids not yet validated as
    /// account ids, such as lookups that will answer "not found").
    pub fn shard_of_key(&self, key: &str) -> ShardId {
        let hash = key_hash(key.as_bytes());
        let index = match self.strategy {
            Strategy::Jump => jump(hash, self.shard_count),
            Strategy::Modulo => (hash % u64::from(self.shard_count)) as u32,
        };
        ShardId::new(index).expect("the index stays below the count")
    }
}

/// The fixed 64-bit hash of a key: XXH3-64 with seed 0.
pub fn key_hash(key: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(key)
}

/// Jump consistent hash: the bucket in `0..buckets` for `key`.
fn jump(mut key: u64, buckets: u32) -> u32 {
    let mut bucket: i64 = -1;
    let mut next: i64 = 0;
    while next < buckets as i64 {
        bucket = next;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        let divisor = ((key >> 33) + 1) as f64;
        next = ((bucket + 1) as f64 * ((1u64 << 31) as f64 / divisor)) as i64;
    }
    bucket as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<AccountId> {
        (0..n)
            .map(|i| AccountId::parse(&format!("user_{i}")).unwrap())
            .collect()
    }

    #[test]
    fn spreads_100k_ids_evenly_over_four_shards() {
        let ring = Ring::new(4).unwrap();
        let mut counts = [0usize; 4];
        let all = ids(100_000);
        for id in &all {
            counts[ring.shard_of(id).index()] += 1;
        }
        for (shard, count) in counts.iter().enumerate() {
            let share = *count as f64 * 100.0 / all.len() as f64;
            assert!(
                (share - 25.0).abs() <= 1.5,
                "shard {shard} holds {share:.2}% of ids: {counts:?}"
            );
        }
    }

    #[test]
    fn growing_by_one_shard_moves_about_one_over_n_plus_one() {
        let all = ids(100_000);
        for n in 1..=7u32 {
            let before = Ring::new(n).unwrap();
            let after = Ring::new(n + 1).unwrap();
            let mut moved = 0usize;
            for id in &all {
                let (a, b) = (before.shard_of(id), after.shard_of(id));
                if a != b {
                    moved += 1;
                    // Only moves onto the new shard: nothing reshuffles
                    // between shards that already existed.
                    assert_eq!(b.index(), n as usize, "{id} moved {a} -> {b}");
                }
            }
            let moved_pct = moved as f64 * 100.0 / all.len() as f64;
            let ideal_pct = 100.0 / (n + 1) as f64;
            assert!(
                (moved_pct - ideal_pct).abs() <= 2.0,
                "{n} -> {} shards moved {moved_pct:.2}%, ideal {ideal_pct:.2}%",
                n + 1
            );
        }
    }

    #[test]
    fn modulo_placement_moves_most_accounts_when_growing_by_one() {
        let all = ids(100_000);
        for n in 2..=7u32 {
            let before = Ring::with_strategy(n, Strategy::Modulo).unwrap();
            let after = Ring::with_strategy(n + 1, Strategy::Modulo).unwrap();
            let moved = all
                .iter()
                .filter(|id| before.shard_of(id) != after.shard_of(id))
                .count();
            let moved_pct = moved as f64 * 100.0 / all.len() as f64;
            let ideal_pct = 100.0 * n as f64 / (n + 1) as f64;
            assert!(
                (moved_pct - ideal_pct).abs() <= 2.0,
                "modulo {n} -> {} moved {moved_pct:.2}%, ideal {ideal_pct:.2}%",
                n + 1
            );
        }
    }

    #[test]
    fn placement_is_pinned_across_releases() {
        // Golden values: if these change, every deployed shard file would
        // hold accounts the ring no longer routes to it. They agree with
        // the reference XXH3 implementation (python-xxhash 3.5) and a
        // separate implementation of jump hashing.
        assert_eq!(key_hash(b"alice"), 0x4da1_0dd6_1a01_16b0);
        let ring = Ring::new(4).unwrap();
        let got: Vec<usize> = ["alice", "bob", "coffee_shop", "user_0", "user_1"]
            .iter()
            .map(|k| ring.shard_of_key(k).index())
            .collect();
        assert_eq!(got, GOLDEN_FOUR_SHARDS);
    }

    const GOLDEN_FOUR_SHARDS: [usize; 5] = [1, 0, 0, 2, 1];

    #[test]
    fn rejects_shard_counts_outside_1_to_64() {
        assert!(Ring::new(0).is_err());
        assert!(Ring::new(65).is_err());
        assert!(Ring::new(64).is_ok());
        let ring = Ring::new(1).unwrap();
        assert_eq!(ring.shard_of_key("anything").index(), 0);
    }
}
