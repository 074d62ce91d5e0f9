//! What every service knows of the deployment it is part of: which
//! service a process runs, where the others answer, and the request id
//! that follows a payment through every service's calls to the others.
//!
//! This sits below the services, so a service that calls another takes
//! what it needs from here, never from the application's assembly (`app`)
//! or the HTTP layer (`http`).

/// The header that carries a request's id, in and out of every service.
pub const REQUEST_ID: &str = "x-request-id";

/// Which service a process runs. `All` is the embedded default: the six
/// services in one process, talking through memory; each other value is
/// one service in its own process, talking to the others over HTTP and the
/// event bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Service {
    All,
    /// Public API: accounts, transfers (same-shard and cross-shard),
    /// idempotency, the audit, and the modelled system's routes.
    ShardManager,
    /// Users, logins, sessions, tokens, account owners.
    Auth,
    /// Trial balances per shard; runs the outbox relay and the recovery
    /// loop.
    Ledger,
    /// Scores transfers (allow, review, block); publishes decisions.
    Fraud,
    /// Consumes events; webhooks, retries, the dead-letter store.
    Notification,
    /// Consumes events; totals, lag, the dashboard, the pipeline report.
    Analytics,
}

impl Service {
    /// The six services, in port order.
    pub const SPLIT: [Service; 6] = [
        Service::Auth,
        Service::Ledger,
        Service::Fraud,
        Service::Notification,
        Service::Analytics,
        Service::ShardManager,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Service::All => "all",
            Service::ShardManager => "shard-manager",
            Service::Auth => "auth",
            Service::Ledger => "ledger",
            Service::Fraud => "fraud",
            Service::Notification => "notification",
            Service::Analytics => "analytics",
        }
    }

    pub fn parse(text: &str) -> Option<Service> {
        [Service::All]
            .into_iter()
            .chain(Service::SPLIT)
            .find(|s| s.name() == text)
    }

    /// Ports of the modelled system: auth 8001 ... analytics 8005, shard
    /// manager 8006 (and the all-in-one process, whose public face it is).
    pub fn default_port(self) -> u16 {
        match self {
            Service::Auth => 8001,
            Service::Ledger => 8002,
            Service::Fraud => 8003,
            Service::Notification => 8004,
            Service::Analytics => 8005,
            Service::ShardManager | Service::All => 8006,
        }
    }

    /// Reads or writes the shards.
    pub fn uses_shards(self) -> bool {
        !matches!(self, Service::Auth | Service::Fraud)
    }

    /// Publishes to or consumes from the event bus.
    pub fn uses_bus(self) -> bool {
        !matches!(self, Service::Auth | Service::ShardManager)
    }

    /// Whether this process runs `part`.
    pub fn runs(self, part: Service) -> bool {
        self == Service::All || self == part
    }
}

/// Where the other services of a split deployment answer.
#[derive(Debug, Clone)]
pub struct Peers {
    pub auth: String,
    pub ledger: String,
    pub fraud: String,
    pub notification: String,
}

impl Default for Peers {
    fn default() -> Peers {
        let at = |s: Service| format!("http://127.0.0.1:{}", s.default_port());
        Peers {
            auth: at(Service::Auth),
            ledger: at(Service::Ledger),
            fraud: at(Service::Fraud),
            notification: at(Service::Notification),
        }
    }
}

tokio::task_local! {
    /// The id of the request this task is answering (set by the HTTP
    /// layer's `observe` middleware).
    pub(crate) static CURRENT_REQUEST_ID: String;
}

/// Adds the id of the request being answered to a call to another
/// service, so that one id follows a payment through every service's logs.
pub fn with_request_id(request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
    match CURRENT_REQUEST_ID.try_with(|id| id.clone()) {
        Ok(id) => request.header(REQUEST_ID, id),
        Err(_) => request,
    }
}
