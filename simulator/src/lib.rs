//! The shardpay simulator: drives a sharded payment system with the traffic
//! a scenario file describes, measures it, and proves afterwards that no
//! money was lost or paid twice.
//!
//! Layout:
//! - `scenario`: the TOML scenario file, read into checked types.
//! - `plan`: the deterministic sequence of operations (operation k depends
//!   only on the seed and k), and account popularity.
//! - `schedule`: the open model's arrival times.
//! - `api`: the HTTP calls to the system under test (setup, transfers,
//!   lookups, audit).
//! - `record`: microsecond hdrhistograms per kind, shard and shard pair;
//!   TPS per second per shard; errors by status and code.
//! - `driver`: the goose load test that executes the plan.
//! - `accounting`: the simulator's own books, checked against the system.
//! - `report`, `html`, `compare`: report.json (versioned, histograms
//!   lossless), report.html, the terminal summary, and comparisons.
//! - `nemesis`, `proxy`: the fault schedule at run time, and the TCP proxy
//!   link faults cut, slow or break.
//! - `reshard`: the scenario's reshards of the live system at run time.
//! - `run`: one run from setup to report; `Target` says what is driven.

pub mod accounting;
pub mod api;
pub mod baseline;
pub mod bench;
pub mod compare;
pub mod driver;
pub mod hostile;
pub mod html;
pub mod live;
pub mod machine;
pub mod marks;
pub mod nemesis;
pub mod plan;
pub mod proxy;
pub mod record;
pub mod report;
pub mod reshard;
pub mod run;
pub mod scenario;
pub mod schedule;
pub mod webhooks;

use serde::{Deserialize, Serialize};

/// The kinds of operation a scenario mixes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    SameShard,
    CrossShard,
    IdempotentRetry,
    FraudHeavy,
    /// Requests a well-behaved client never sends, each with the refusal
    /// it must get (see `hostile`).
    Hostile,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::SameShard,
        Kind::CrossShard,
        Kind::IdempotentRetry,
        Kind::FraudHeavy,
        Kind::Hostile,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::SameShard => "same_shard",
            Kind::CrossShard => "cross_shard",
            Kind::IdempotentRetry => "idempotent_retry",
            Kind::FraudHeavy => "fraud_heavy",
            Kind::Hostile => "hostile",
        }
    }

    pub fn parse(text: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == text)
    }
}
