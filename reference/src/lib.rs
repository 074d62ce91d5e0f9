//! The reference payment system that shardpay drives: a sharded
//! double-entry ledger behind the shard manager's HTTP API.
//!
//! # Layout
//! - [`money`], [`ids`]: domain types, checked at the boundary.
//! - [`sharding`]: the one place that decides an account's shard.
//! - [`ledger`]: what a shard stores, the `ShardStore` trait and its
//!   embedded SQLite implementation.
//! - [`manager`]: transfers (same-shard and the cross-shard saga),
//!   idempotency keys, recovery.
//! - [`fraud`]: risk scores, allow/review/block, the feature store.
//! - [`events`]: the outbox relay, the event bus, the analytics consumer.
//! - [`notification`]: log channel and signed webhooks, retries, dead letters.
//! - [`audit`]: proof that money was neither created, lost nor moved twice.
//! - [`http`]: the API (`/v1` and the modelled system's routes).
//! - [`app`]: building, serving and shutting down.

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
