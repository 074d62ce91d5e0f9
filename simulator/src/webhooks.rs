//! A webhook receiver the simulator runs during a run: it registers a
//! webhook for some of the run's accounts, checks every delivery's
//! signature and timestamp as a careful receiver would, and counts
//! deliveries, distinct events and repeats.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use serde::{Deserialize, Serialize};
use shardpay_reference::notification::verify;

use crate::api::Api;

/// Accounts of a run that get a webhook.
pub const HOOKED_ACCOUNTS: usize = 20;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct WebhookReport {
    pub hooked_accounts: u64,
    /// POSTs that arrived (after the hook's secret was known; earlier ones
    /// are answered 503 and come again).
    pub deliveries: u64,
    /// Distinct (webhook, event) pairs among them.
    pub distinct: u64,
    /// The same event to the same webhook again (at-least-once delivery:
    /// receivers deduplicate by `Shardpay-Event-Id`).
    pub repeats: u64,
    /// Deliveries whose signature or timestamp did not verify.
    pub bad_signatures: u64,
    /// What the system says it delivered, and gave up on.
    pub system_delivered: u64,
    pub system_dead_lettered: u64,
    /// Hooked accounts that paid or were paid in a completed transfer but
    /// got no delivery: their events were never delivered to them.
    #[serde(default)]
    pub hooks_missed: u64,
    /// Every delivery verified, every one the system counts arrived, and
    /// every hooked account with a completed transfer got deliveries.
    pub ok: bool,
}

#[derive(Default)]
struct Inner {
    /// Secret per hook number.
    secrets: HashMap<usize, String>,
    seen: HashSet<(usize, String)>,
    /// Deliveries that came before their hook's secret was known.
    early: u64,
    deliveries: u64,
    repeats: u64,
    bad: u64,
}

pub struct Receiver {
    inner: Arc<Mutex<Inner>>,
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
    hooked: u64,
}

async fn receive(
    State(inner): State<Arc<Mutex<Inner>>>,
    Path(hook): Path<usize>,
    headers: HeaderMap,
    body: String,
) -> StatusCode {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let now = chrono::Utc::now().timestamp();
    let mut s = inner.lock().expect("receiver lock");
    // A delivery can come before the registration's answer has given us
    // the secret: ask for a retry, as a receiver still being set up would.
    let Some(secret) = s.secrets.get(&hook).cloned() else {
        s.early += 1;
        return StatusCode::SERVICE_UNAVAILABLE;
    };
    s.deliveries += 1;
    if !verify(
        &secret,
        &header("shardpay-timestamp"),
        &header("shardpay-signature"),
        &body,
        now,
    ) {
        s.bad += 1;
        return StatusCode::UNAUTHORIZED;
    }
    if !s.seen.insert((hook, header("shardpay-event-id"))) {
        s.repeats += 1;
    }
    StatusCode::OK
}

impl Receiver {
    /// Starts the receiver and registers a webhook for each of `accounts`.
    /// `None` when the system has no webhooks (404) or refuses them.
    pub async fn start(api: &Api, accounts: &[String]) -> anyhow::Result<Option<Receiver>> {
        let inner = Arc::new(Mutex::new(Inner::default()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let router = axum::Router::new()
            .route("/hook/{n}", axum::routing::post(receive))
            .with_state(Arc::clone(&inner));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        let mut hooked = 0;
        for (n, account) in accounts.iter().take(HOOKED_ACCOUNTS).enumerate() {
            let url = format!("http://{addr}/hook/{n}");
            match api.register_webhook(account, &url).await? {
                Some(secret) => {
                    inner
                        .lock()
                        .expect("receiver lock")
                        .secrets
                        .insert(n, secret);
                    hooked += 1;
                }
                None => {
                    task.abort();
                    return Ok(None);
                }
            }
        }
        Ok(Some(Receiver {
            inner,
            addr,
            task,
            hooked,
        }))
    }

    /// The figures, against what the system says it delivered; `active`
    /// holds the accounts (by index) that paid or were paid in a completed
    /// transfer, whose webhooks must have had deliveries.
    pub fn report(
        &self,
        system_delivered: u64,
        system_dead_lettered: u64,
        active: &HashSet<usize>,
    ) -> WebhookReport {
        let s = self.inner.lock().expect("receiver lock");
        let distinct = s.seen.len() as u64;
        // Hook n is account n's (the first accounts are hooked).
        let reached: HashSet<usize> = s.seen.iter().map(|(hook, _)| *hook).collect();
        let hooks_missed = (0..self.hooked as usize)
            .filter(|n| active.contains(n) && !reached.contains(n))
            .count() as u64;
        WebhookReport {
            hooked_accounts: self.hooked,
            deliveries: s.deliveries,
            distinct,
            repeats: s.repeats,
            bad_signatures: s.bad,
            system_delivered,
            system_dead_lettered,
            hooks_missed,
            ok: s.bad == 0
                && distinct == system_delivered
                && system_dead_lettered == 0
                && hooks_missed == 0,
        }
    }

    pub fn distinct(&self) -> u64 {
        self.inner.lock().expect("receiver lock").seen.len() as u64
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}
