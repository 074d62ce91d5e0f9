//! End-to-end runs of the simulator against the reference system, each in
//! its own temporary directories.

mod books;
mod mysql;
mod runs;

use shardpay_simulator::scenario::{self, Scenario};

/// A small scenario: `load` and `extra` fill in the rest.
pub fn scenario(stop: &str, load: &str, extra: &str) -> Scenario {
    let text = format!(
        r#"
name = "test"
seed = 17
{stop}

[accounts]
count = 300
opening_balance = "10000.00"
popularity = {{ distribution = "zipf", exponent = 1.0, hot_set = 30, hot_share = 0.5 }}

[load]
{load}

[mix]
same_shard = 4
cross_shard = 3
idempotent_retry = 2
fraud_heavy = 1

[fraud_heavy]
new_payees = 50
large_min = "100.00"
large_max = "1000.00"
round_to = "100.00"

{extra}
"#
    );
    scenario::parse(&text, "test.toml").unwrap_or_else(|e| panic!("{e}"))
}
