//! The plan: operation k of a run is a pure function of the scenario, its
//! seed, the accounts' shards and k. Whichever virtual user picks it up, and
//! whatever the timing, the same seed and file give the same requests.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::scenario::{Popularity, Scenario};
use crate::Kind;

/// How many times a payee is redrawn by popularity to land on the wanted
/// side of a shard boundary before one is taken uniformly from the right
/// shard. With N shards a same-shard draw succeeds 1 time in N on average.
const PAYEE_DRAWS: u32 = 32;
/// Separates the payee stream of an operation from its main stream.
const PAYEE_STREAM: u64 = 0x7061_7965_6573;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transfer {
    pub payer: u32,
    pub payee: u32,
    pub amount_minor: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// One transfer, sent once with its own idempotency key.
    Single { kind: Kind, transfer: Transfer },
    /// One transfer sent 1 + `resends` times with one key: `concurrent` of
    /// the resends race the first request, the rest follow its answer; when
    /// `changed_amount_minor` is set the key is also sent once with that
    /// amount, which must be refused.
    Retry {
        transfer: Transfer,
        resends: u32,
        concurrent: u32,
        changed_amount_minor: Option<i64>,
    },
    /// Fraud-heavy traffic, labelled: a fraudulent burst of large round
    /// amounts to new payees, or one legitimate large round payment.
    Fraud {
        fraudulent: bool,
        transfers: Vec<Transfer>,
    },
    /// A hostile request built on an ordinary transfer's accounts.
    Hostile {
        attack: crate::hostile::Attack,
        transfer: Transfer,
    },
}

impl Op {
    pub fn kind(&self) -> Kind {
        match self {
            Op::Single { kind, .. } => *kind,
            Op::Retry { .. } => Kind::IdempotentRetry,
            Op::Fraud { .. } => Kind::FraudHeavy,
            Op::Hostile { .. } => Kind::Hostile,
        }
    }
}

/// Draws accounts by popularity.
#[derive(Debug, Clone)]
pub struct Popular {
    count: u32,
    /// Zipf: cumulative weights of the hot ranks, and which account holds
    /// each rank.
    cdf: Vec<f64>,
    hot: Vec<u32>,
    hot_share: f64,
}

impl Popular {
    pub fn new(count: u32, popularity: &Popularity, seed: u64) -> Popular {
        match *popularity {
            Popularity::Uniform => Popular {
                count,
                cdf: Vec::new(),
                hot: Vec::new(),
                hot_share: 0.0,
            },
            Popularity::Zipf {
                exponent,
                hot_set,
                hot_share,
            } => {
                let mut cdf = Vec::with_capacity(hot_set as usize);
                let mut sum = 0.0;
                for rank in 1..=hot_set {
                    sum += 1.0 / (rank as f64).powf(exponent);
                    cdf.push(sum);
                }
                for c in &mut cdf {
                    *c /= sum;
                }
                // The hot accounts are spread over the id space (and so over
                // the shards) by a seeded shuffle.
                let mut rng = StdRng::seed_from_u64(mix64(seed ^ 0x5eed_0f_407));
                let mut all: Vec<u32> = (0..count).collect();
                let (hot, _) = all.partial_shuffle(&mut rng, hot_set as usize);
                Popular {
                    count,
                    cdf,
                    hot: hot.to_vec(),
                    hot_share,
                }
            }
        }
    }

    pub fn draw(&self, rng: &mut impl Rng) -> u32 {
        if !self.hot.is_empty() && rng.random_bool(self.hot_share) {
            let u: f64 = rng.random();
            let rank = self.cdf.partition_point(|c| *c < u).min(self.hot.len() - 1);
            return self.hot[rank];
        }
        rng.random_range(0..self.count)
    }
}

pub struct Plan {
    seed: u64,
    /// Cumulative mix weights in `Kind::ALL` order.
    mix: [u32; 5],
    popular: Popular,
    shard_of: Vec<u16>,
    by_shard: Vec<Vec<u32>>,
    count: u32,
    scenario: Scenario,
}

impl Plan {
    /// `shard_of[i]` is the shard of account i (regular accounts, then the
    /// new payees of fraud bursts).
    pub fn new(scenario: &Scenario, shard_of: Vec<u16>, shards: u16) -> Plan {
        let count = scenario.accounts.count;
        let mut by_shard = vec![Vec::new(); shards as usize];
        for (i, s) in shard_of.iter().take(count as usize).enumerate() {
            by_shard[*s as usize].push(i as u32);
        }
        let mut mix = [0u32; 5];
        let mut sum = 0;
        for (slot, kind) in mix.iter_mut().zip(Kind::ALL) {
            sum += scenario.mix.weight(kind);
            *slot = sum;
        }
        Plan {
            seed: scenario.seed,
            mix,
            popular: Popular::new(count, &scenario.accounts.popularity, scenario.seed),
            shard_of,
            by_shard,
            count,
            scenario: scenario.clone(),
        }
    }

    /// Accounts the setup creates: the regular ones, then the new payees of
    /// fraud bursts when the mix has fraud-heavy traffic.
    pub fn accounts_needed(scenario: &Scenario) -> u32 {
        scenario.accounts.count
            + if scenario.mix.fraud_heavy > 0 {
                scenario.fraud.new_payees
            } else {
                0
            }
    }

    /// The regular accounts (the payers and payees of ordinary traffic).
    pub fn accounts(&self) -> u32 {
        self.count
    }

    pub fn shard_of(&self, account: u32) -> u16 {
        self.shard_of[account as usize]
    }

    pub fn shards(&self) -> usize {
        self.by_shard.len()
    }

    /// Operation k. Kinds, payers, amounts and retry choices come from one
    /// random stream, payees from another: how many draws finding a payee
    /// on the right shard takes depends on where the ids landed, and must
    /// not shift the rest.
    pub fn op(&self, k: u64) -> Op {
        let mut rng = StdRng::seed_from_u64(mix64(self.seed ^ mix64(k)));
        let payees = &mut StdRng::seed_from_u64(mix64(self.seed ^ mix64(k) ^ PAYEE_STREAM));
        let pick = rng.random_range(0..self.mix[4]);
        let kind = Kind::ALL[self
            .mix
            .iter()
            .position(|c| pick < *c)
            .expect("pick < total")];
        match kind {
            Kind::SameShard | Kind::CrossShard => {
                let transfer = self.pair(&mut rng, payees, kind == Kind::CrossShard);
                Op::Single { kind, transfer }
            }
            Kind::IdempotentRetry => {
                let cross = rng.random_bool(0.5);
                let transfer = self.pair(&mut rng, payees, cross);
                let retry = self.scenario.retry;
                let changed = rng
                    .random_bool(retry.changed_body_share)
                    .then_some(transfer.amount_minor + 1);
                Op::Retry {
                    transfer,
                    resends: retry.resends,
                    concurrent: retry.concurrent,
                    changed_amount_minor: changed,
                }
            }
            Kind::FraudHeavy => self.fraud(&mut rng, payees),
            Kind::Hostile => {
                let all = crate::hostile::Attack::ALL;
                let attack = all[rng.random_range(0..all.len())];
                let cross = rng.random_bool(0.5);
                Op::Hostile {
                    attack,
                    transfer: self.pair(&mut rng, payees, cross),
                }
            }
        }
    }

    fn amount(&self, rng: &mut impl Rng) -> i64 {
        let a = self.scenario.amounts;
        rng.random_range(a.min.minor()..=a.max.minor())
    }

    fn round_large(&self, rng: &mut impl Rng) -> i64 {
        let f = self.scenario.fraud;
        let round = f.round_to.minor();
        let hi = (f.large_max.minor() / round).max(1);
        let lo = ((f.large_min.minor() + round - 1) / round).clamp(1, hi);
        rng.random_range(lo..=hi) * round
    }

    /// A payer by popularity and a payee on the same shard (`cross` false)
    /// or another shard (`cross` true). With one shard every pair is
    /// same-shard.
    fn pair(&self, rng: &mut impl Rng, payees: &mut impl Rng, cross: bool) -> Transfer {
        let payer = self.popular.draw(rng);
        let amount_minor = self.amount(rng);
        let rng = payees;
        let payer_shard = self.shard_of(payer);
        let cross = cross && self.by_shard.iter().filter(|s| !s.is_empty()).count() > 1;
        for _ in 0..PAYEE_DRAWS {
            let payee = self.popular.draw(rng);
            if payee != payer && (self.shard_of(payee) != payer_shard) == cross {
                return Transfer {
                    payer,
                    payee,
                    amount_minor,
                };
            }
        }
        let payee = loop {
            let shard = if cross {
                let others: Vec<usize> = (0..self.by_shard.len())
                    .filter(|s| *s != payer_shard as usize && !self.by_shard[*s].is_empty())
                    .collect();
                others[rng.random_range(0..others.len())]
            } else {
                payer_shard as usize
            };
            let candidates = &self.by_shard[shard];
            let payee = if candidates.len() > 1 || cross {
                candidates[rng.random_range(0..candidates.len())]
            } else {
                // The payer is alone on its shard: any other account.
                (payer + 1 + rng.random_range(0..self.count - 1)) % self.count
            };
            if payee != payer {
                break payee;
            }
        };
        Transfer {
            payer,
            payee,
            amount_minor,
        }
    }

    fn fraud(&self, rng: &mut impl Rng, payees: &mut impl Rng) -> Op {
        let f = self.scenario.fraud;
        let fraudulent = rng.random_bool(f.fraud_share);
        let payer = self.popular.draw(rng);
        let transfers = if fraudulent {
            (0..f.burst)
                .map(|_| Transfer {
                    payer,
                    payee: self.count + rng.random_range(0..f.new_payees),
                    amount_minor: self.round_large(rng),
                })
                .collect()
        } else {
            let cross = rng.random_bool(0.5);
            let mut t = self.pair(rng, payees, cross);
            t.payer = payer;
            if t.payee == payer {
                t.payee = (payer + 1) % self.count;
            }
            t.amount_minor = self.round_large(rng);
            vec![t]
        };
        Op::Fraud {
            fraudulent,
            transfers,
        }
    }
}

/// SplitMix64's finaliser: spreads seeds and indices over all 64 bits.
pub fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario;

    fn scenario(extra: &str) -> Scenario {
        let text = format!(
            r#"
name = "p"
seed = 11
duration_s = 5
[accounts]
count = 400
opening_balance = "100000.00"
{extra}
[load]
model = "closed"
[mix]
same_shard = 4
cross_shard = 3
idempotent_retry = 2
fraud_heavy = 1
"#
        );
        scenario::parse(&text, "p.toml").unwrap()
    }

    fn shards_of(n: u32, shards: u16) -> Vec<u16> {
        (0..n)
            .map(|i| (mix64(i as u64) % shards as u64) as u16)
            .collect()
    }

    #[test]
    fn same_seed_same_operations_other_seed_others() {
        let s = scenario("");
        let n = Plan::accounts_needed(&s);
        let a = Plan::new(&s, shards_of(n, 4), 4);
        let b = Plan::new(&s, shards_of(n, 4), 4);
        let ops_a: Vec<Op> = (0..500).map(|k| a.op(k)).collect();
        let ops_b: Vec<Op> = (0..500).rev().map(|k| b.op(k)).collect::<Vec<_>>();
        let ops_b: Vec<Op> = ops_b.into_iter().rev().collect();
        assert_eq!(ops_a, ops_b, "order of asking must not matter");
        let mut other = s.clone();
        other.seed = 12;
        let c = Plan::new(&other, shards_of(n, 4), 4);
        let same = (0..500).filter(|k| c.op(*k) == ops_a[*k as usize]).count();
        assert!(
            same < 50,
            "another seed gave {same} equal operations of 500"
        );
    }

    #[test]
    fn another_shard_layout_changes_only_payees() {
        let s = scenario("");
        let n = Plan::accounts_needed(&s);
        let a = Plan::new(&s, shards_of(n, 4), 4);
        let b = Plan::new(&s, shards_of(n, 2), 2);
        for k in 0..2_000 {
            match (a.op(k), b.op(k)) {
                (
                    Op::Single {
                        kind: ka,
                        transfer: ta,
                    },
                    Op::Single {
                        kind: kb,
                        transfer: tb,
                    },
                ) => {
                    assert_eq!(
                        (ka, ta.payer, ta.amount_minor),
                        (kb, tb.payer, tb.amount_minor)
                    );
                }
                (
                    Op::Retry {
                        transfer: ta,
                        changed_amount_minor: ca,
                        ..
                    },
                    Op::Retry {
                        transfer: tb,
                        changed_amount_minor: cb,
                        ..
                    },
                ) => {
                    assert_eq!(
                        (ta.payer, ta.amount_minor, ca),
                        (tb.payer, tb.amount_minor, cb)
                    );
                }
                (
                    Op::Fraud {
                        fraudulent: fa,
                        transfers: ta,
                    },
                    Op::Fraud {
                        fraudulent: fb,
                        transfers: tb,
                    },
                ) => {
                    assert_eq!(
                        (fa, ta.len(), ta[0].amount_minor),
                        (fb, tb.len(), tb[0].amount_minor)
                    );
                }
                (x, y) => panic!("op {k}: {x:?} against {y:?}"),
            }
        }
    }

    #[test]
    fn shard_sides_and_mix_hold() {
        let s = scenario("");
        let n = Plan::accounts_needed(&s);
        let plan = Plan::new(&s, shards_of(n, 4), 4);
        let mut kinds = std::collections::HashMap::new();
        for k in 0..10_000 {
            let op = plan.op(k);
            *kinds.entry(op.kind()).or_insert(0) += 1;
            if let Op::Single { kind, transfer } = op {
                assert_ne!(transfer.payer, transfer.payee);
                let cross = plan.shard_of(transfer.payer) != plan.shard_of(transfer.payee);
                assert_eq!(cross, kind == Kind::CrossShard, "op {k}");
                assert!(transfer.amount_minor >= s.amounts.min.minor());
                assert!(transfer.amount_minor <= s.amounts.max.minor());
            }
            if let Op::Fraud {
                fraudulent: true,
                transfers,
            } = plan.op(k)
            {
                assert_eq!(transfers.len(), s.fraud.burst as usize);
                for t in transfers {
                    assert!(t.payee >= s.accounts.count, "new payees only");
                    assert_eq!(t.amount_minor % s.fraud.round_to.minor(), 0);
                }
            }
        }
        // Weights 4:3:2:1 of 10,000 draws, within 2 points each.
        for (kind, weight) in [
            (Kind::SameShard, 4),
            (Kind::CrossShard, 3),
            (Kind::IdempotentRetry, 2),
            (Kind::FraudHeavy, 1),
        ] {
            let got = kinds[&kind] as f64 / 10_000.0;
            assert!((got - weight as f64 / 10.0).abs() < 0.02, "{kind:?}: {got}");
        }
    }

    #[test]
    fn zipf_concentrates_on_the_hot_set() {
        let s = scenario(
            "popularity = { distribution = \"zipf\", exponent = 1.0, hot_set = 20, hot_share = 0.9 }",
        );
        let popular = Popular::new(400, &s.accounts.popularity, 3);
        let mut rng = StdRng::seed_from_u64(1);
        let mut hits = vec![0u32; 400];
        for _ in 0..100_000 {
            hits[popular.draw(&mut rng) as usize] += 1;
        }
        let hot: u32 = popular.hot.iter().map(|a| hits[*a as usize]).sum();
        // 90% from the hot set plus its uniform share of the other 10%.
        assert!((hot as f64 / 100_000.0 - 0.905).abs() < 0.01, "{hot}");
        let first = hits[popular.hot[0] as usize];
        let tenth = hits[popular.hot[9] as usize];
        // Rank 1 against rank 10 under exponent 1: about ten times.
        assert!(
            (7.0..13.0).contains(&(first as f64 / tenth as f64)),
            "{first} vs {tenth}"
        );
    }
}
