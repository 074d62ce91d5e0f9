//! The reference payment system that shardpay drives: a sharded
//! double-entry ledger behind the shard manager's HTTP API.
//!
//! # Layout
//! Each service is a folder (or a file) with its logic, and its routes in
//! `routes`; lower layers never import higher ones (`tests/cli/modules.rs`
//! checks it):
//! - [`codes`], [`money`], [`ids`], [`sharding`]: the domain: error codes,
//!   amounts, identifiers checked at the boundary, an account's shard.
//! - [`ledger`]: what a shard stores, written once over a transaction
//!   trait (`ledger::book`) with SQLite and MySQL backends; the ledger
//!   service's routes.
//! - [`events`], [`peers`]: the outbox relay and the event bus; the other
//!   services of a split deployment and request ids.
//! - [`auth`], [`fraud`], [`notification`], [`analytics`]: the services.
//! - [`manager`]: the shard manager: transfers (same-shard, saga, XA),
//!   idempotency keys, recovery, and its routes (ours and the modelled
//!   system's).
//! - [`pipeline`]: the relay and the consumers a process runs.
//! - [`audit`]: proof that money was neither created, lost nor moved twice.
//! - [`http`]: what every route stands on: state, errors, extractors,
//!   permissions, health, readiness and metrics.
//! - [`api`]: the route table: which service serves what, the router, the
//!   API description.
//! - [`app`]: building, serving and shutting down.

pub mod analytics;
pub mod api;
pub mod app;
pub mod audit;
pub mod auth;
pub mod codes;
pub mod events;
pub mod fraud;
pub mod http;
pub mod ids;
pub mod ledger;
pub mod manager;
pub mod money;
pub mod notification;
pub mod peers;
pub mod pipeline;
pub mod sharding;

/// The error body every API route answers with:
/// `{"error":{"code":"...","message":"..."}}`.
pub fn error_body(code: &str, message: &str) -> String {
    serde_json::json!({ "error": { "code": code, "message": message } }).to_string()
}
