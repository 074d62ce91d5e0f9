//! API, saga, idempotency and concurrency tests of the shard manager, each
//! against its own app on port 0 with its own temporary data directory.

mod audit_live;
mod auth;
mod auth_users;
mod bodies;
mod bulk;
mod concurrency;
mod cross_shard;
mod events;
mod features;
mod fraud;
mod history;
mod hostile;
mod idempotency;
mod kafka;
mod notification;
mod notification_store;
mod ops;
mod reshard;
mod storage;
mod support;
mod validation;
mod walkthrough;
mod xa_replicas;
