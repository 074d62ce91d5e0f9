//! The notification service: consumes payment and fraud events and tells
//! the accounts concerned, on a log channel and on the webhooks they
//! registered.
//!
//! A webhook delivery is a POST of the event as JSON with two headers:
//! `Shardpay-Timestamp` (Unix seconds) and `Shardpay-Signature`
//! (`v1=` and the hex HMAC-SHA256, keyed by the webhook's secret, of
//! `"<timestamp>.<body>"`). Receivers should recompute the signature,
//! compare it in constant time, and refuse timestamps more than 5 minutes
//! from their clock ([`SIGNATURE_TOLERANCE_S`]), which stops replays of
//! captured requests. A delivery that does not get a 2xx is retried with
//! exponential backoff and full jitter; after the last attempt it goes to
//! the dead-letter store, from which it can be replayed.
//!
//! What must outlive a process lives in a [`store::NotificationStore`]
//! (SQLite for one process, MySQL for replicas): webhooks, the events
//! applied, and each (event, webhook) delivery, claimed under a lease by
//! the replica sending it, then recorded delivered or dead. A replica
//! sends only what it holds a live claim on, so each pair is recorded
//! delivered at most once, across restarts and replicas; a claim whose
//! holder died is taken up by another replica's sweep when its lease
//! ends. The consumer commits its bus position only once the events it
//! read are recorded with their claims. A delivery is sent again only
//! when a send's outcome was lost (a timeout, or a crash before it was
//! recorded): receivers recognise it by `Shardpay-Event-Id`.

pub mod routes;
pub mod store;

use crate::codes::ErrorCode;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use hmac::{Hmac, Mac};
use rand::Rng;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio::sync::watch;

use crate::events::{Event, Subscription};
use crate::ledger::{now_ms, ShardStore, TimestampMs};
use store::{
    Added, Claim, Lease, LetterClaim, NotificationStore, SqliteNotifications, StoreError,
    StoredHook, MAX_EVENT_ID_LEN,
};

/// How far a receiver should accept a delivery's timestamp from its own
/// clock.
pub const SIGNATURE_TOLERANCE_S: i64 = 300;
pub const NOTIFICATION_GROUP: &str = "notification";
/// Webhooks one account may register: a transfer concerns two accounts,
/// so one event makes at most twice this many deliveries.
pub const MAX_WEBHOOKS_PER_ACCOUNT: usize = 5;
/// Webhooks registered in all (memory held for them is bounded).
pub const MAX_WEBHOOKS: usize = 100_000;
/// Longest webhook URL accepted, in bytes.
pub const MAX_WEBHOOK_URL_LEN: usize = 2048;
/// Deliveries waiting or running at once. Past this, an event's delivery
/// goes straight to the dead-letter store ("queue full"), to be replayed
/// later: a receiver that hangs cannot make the queue, and the memory it
/// holds, grow without bound or delay everyone else's deliveries forever.
pub const MAX_QUEUED_DELIVERIES: u64 = 10_000;
/// Dead letters kept; past this the oldest are dropped (and counted).
pub const MAX_DEAD_LETTERS: usize = 10_000;

/// Where webhooks may point.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WebhookPolicy {
    /// Deliver to loopback, private, link-local and other non-public
    /// addresses too. Off by default: a webhook is a request this server
    /// makes on a client's behalf, and must not reach this machine's own
    /// services or its network's. Tests and the simulator's own receiver,
    /// which listen on loopback, turn it on (`serve
    /// --webhooks-to-private-networks`, which says so at start).
    pub allow_private: bool,
}

/// Why a webhook cannot be registered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookRefused {
    #[error("url must be an absolute http:// or https:// URL of at most {MAX_WEBHOOK_URL_LEN} bytes, with a host")]
    InvalidUrl,
    #[error("{0} is not a public address; webhooks go only to public hosts (this server runs without --webhooks-to-private-networks)")]
    NotPublic(String),
    #[error("an account may register at most {MAX_WEBHOOKS_PER_ACCOUNT} webhooks")]
    TooManyForAccount,
    #[error("the server holds its maximum of {MAX_WEBHOOKS} webhooks")]
    TooMany,
    #[error("webhooks cannot be registered now; retry")]
    StoreFailed(StoreError),
}

impl WebhookRefused {
    pub fn code(&self) -> ErrorCode {
        match self {
            WebhookRefused::InvalidUrl => ErrorCode::InvalidUrl,
            WebhookRefused::NotPublic(_) => ErrorCode::WebhookUrlNotPublic,
            WebhookRefused::TooManyForAccount => ErrorCode::TooManyWebhooks,
            WebhookRefused::TooMany => ErrorCode::TooManyWebhooks,
            WebhookRefused::StoreFailed(_) => ErrorCode::NotificationStoreUnavailable,
        }
    }
}

/// Whether `ip` is an address on the public internet: not loopback,
/// private, link-local (cloud metadata lives there), shared, reserved,
/// documentation, multicast or unspecified. IPv6 addresses that embed an
/// IPv4 one are judged by it.
pub fn is_public(ip: std::net::IpAddr) -> bool {
    use std::net::{IpAddr, Ipv4Addr};
    fn v4(ip: Ipv4Addr) -> bool {
        let [a, b, c, _] = ip.octets();
        !(ip.is_unspecified()
            || ip.is_loopback()
            || ip.is_private()
            || ip.is_link_local()
            || ip.is_broadcast()
            || ip.is_documentation()
            || ip.is_multicast()
            || a == 0
            || (a == 100 && (64..128).contains(&b)) // shared address space (CGNAT)
            || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
            || (a == 198 && (b == 18 || b == 19)) // benchmarking
            || a >= 240) // reserved
    }
    match ip {
        IpAddr::V4(ip) => v4(ip),
        IpAddr::V6(ip) => {
            if let Some(mapped) = ip.to_ipv4_mapped() {
                return v4(mapped);
            }
            let s = ip.segments();
            !(ip.is_unspecified()
                || ip.is_loopback()
                || ip.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local
                || (s[0] & 0xffc0) == 0xfe80 // link-local
                || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
                || (s[0] == 0x64 && s[1] == 0xff9b) // NAT64: embeds IPv4
                || s[0] == 0x2002 // 6to4: embeds IPv4
                || (s[0] == 0x2001 && s[1] == 0) // Teredo
                || (s[0] & 0xffc0) == 0xfec0 // site-local (deprecated)
                || (s[0] == 0x100 && s[1] == 0 && s[2] == 0 && s[3] == 0) // discard
                || (s[0..4] == [0, 0, 0, 0] && s[4] == 0xffff && s[5] == 0) // IPv4-translated
                || (s[0] == 0 && s[1] == 0 && s[2] == 0 && s[3] == 0 && s[4] == 0 && s[5] == 0))
            // IPv4-compatible
        }
    }
}

/// Checks a webhook URL when it is registered: http(s), a host, not too
/// long, and (unless private networks are allowed) no literal address or
/// loopback name that is not public. A name's addresses are checked again
/// at every delivery, on what it resolves to then.
pub fn check_url(url: &str, policy: WebhookPolicy) -> Result<reqwest::Url, WebhookRefused> {
    if url.len() > MAX_WEBHOOK_URL_LEN {
        return Err(WebhookRefused::InvalidUrl);
    }
    let parsed = reqwest::Url::parse(url).map_err(|_| WebhookRefused::InvalidUrl)?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(WebhookRefused::InvalidUrl);
    }
    let host = parsed.host().ok_or(WebhookRefused::InvalidUrl)?;
    if !policy.allow_private {
        let refused = |h: String| Err(WebhookRefused::NotPublic(h));
        match host {
            url::Host::Ipv4(ip) if !is_public(ip.into()) => return refused(ip.to_string()),
            url::Host::Ipv6(ip) if !is_public(ip.into()) => return refused(ip.to_string()),
            url::Host::Domain(name) => {
                let name = name.trim_end_matches('.').to_ascii_lowercase();
                if name == "localhost" || name.ends_with(".localhost") {
                    return refused(name);
                }
            }
            _ => {}
        }
    }
    Ok(parsed)
}

/// Resolves webhook hosts to their public addresses only, at connection
/// time: a name that resolves (or is re-pointed, DNS rebinding) to a
/// private address gets no connection.
struct PublicOnly;

impl reqwest::dns::Resolve for PublicOnly {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        Box::pin(async move {
            let host = name.as_str().to_string();
            let found = tokio::net::lookup_host((host.as_str(), 0)).await?;
            let public: Vec<std::net::SocketAddr> = found.filter(|a| is_public(a.ip())).collect();
            if public.is_empty() {
                return Err(format!(
                    "{host} resolves to no public address; webhooks go only to public hosts"
                )
                .into());
            }
            Ok(Box::new(public.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub base_delay_ms: u64,
    pub max_delay_ms: u64,
    pub timeout_ms: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 5,
            base_delay_ms: 200,
            max_delay_ms: 10_000,
            timeout_ms: 5_000,
        }
    }
}

impl RetryPolicy {
    /// The wait before attempt `n + 1` (n counted from 1): a random
    /// duration up to base * 2^(n-1), capped ("full jitter").
    pub fn delay(&self, n: u32) -> Duration {
        let ceiling = self
            .base_delay_ms
            .saturating_mul(1u64 << (n.saturating_sub(1)).min(20))
            .min(self.max_delay_ms);
        Duration::from_millis(rand::rng().random_range(0..=ceiling))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Webhook {
    pub id: String,
    pub account: String,
    pub url: String,
    /// Shown once, when registered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

/// A delivery that failed every attempt.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeadLetter {
    pub id: String,
    pub event_id: String,
    pub event_type: String,
    pub webhook_id: String,
    pub url: String,
    pub attempts: u32,
    pub last_error: String,
    pub failed_at_ms: TimestampMs,
}

/// The notification service's figures. Those about state (events applied,
/// deliveries made and held, dead letters) come from the store, so every
/// replica answers the same; the rest count what this process did since
/// it started.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct NotificationStats {
    /// Events this process read from the bus, repeats included.
    pub events_received: u64,
    pub events_applied: u64,
    /// Distinct outbox events applied.
    pub outbox_applied: u64,
    pub duplicates_suppressed: u64,
    pub logged: u64,
    /// (event, webhook) deliveries recorded as made.
    pub delivered: u64,
    pub attempts: u64,
    /// Deliveries that failed every attempt (replayed since or not).
    pub dead_lettered: u64,
    pub dlq_size: u64,
    pub replays_skipped: u64,
    /// Dead letters dropped, oldest first, to keep the store within
    /// [`MAX_DEAD_LETTERS`].
    #[serde(default)]
    pub dead_letters_dropped: u64,
    /// Deliveries claimed and not finished, by any replica.
    #[serde(default)]
    pub deliveries_queued: u64,
}

/// What a replay did.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReplayOutcome {
    pub delivered: u64,
    /// Already delivered before: recognised, not sent again.
    pub already_delivered: u64,
    pub failed: u64,
    pub not_found: u64,
    /// Left in the store for a later replay: the request's time budget
    /// ([`REPLAY_BUDGET`]) ran out first, or another replay holds it.
    #[serde(default)]
    pub not_attempted: u64,
}

/// What replaying one dead letter did.
enum ReplayStep {
    Delivered,
    Already,
    Failed,
    NotFound,
    NotAttempted,
}

/// Dead letters sent at once by a replay.
const REPLAY_CONCURRENCY: usize = 32;
/// How long one replay request starts new deliveries: well inside the
/// server's request timeout, so a store of letters to unreachable hosts
/// answers with what it did instead of timing out; the rest stay for the
/// next replay.
pub const REPLAY_BUDGET: Duration = Duration::from_secs(15);
/// Lapsed claims one sweep takes over.
const SWEEP_BATCH: u64 = 256;
/// Outbox rows read per page when catching up at start.
const CATCH_UP_PAGE: u32 = 500;
/// How long a consumer waits before recording an event again when the
/// store failed.
const STORE_RETRY: Duration = Duration::from_millis(200);

/// How a notifier delivers and holds its deliveries.
#[derive(Debug, Clone, PartialEq)]
pub struct NotifierConfig {
    pub retry: RetryPolicy,
    pub webhooks: WebhookPolicy,
    /// How long a claim lasts without renewal. It is renewed before every
    /// attempt, so it must outlast one attempt and the wait before the
    /// next (30 s against 5 s and at most 10 s): a live replica keeps
    /// what it sends, and a dead one's deliveries wait this long before
    /// another replica takes them.
    pub lease_ms: u64,
    /// How often a notifier looks for claims whose lease ended.
    pub sweep_interval_ms: u64,
}

impl Default for NotifierConfig {
    fn default() -> Self {
        NotifierConfig {
            retry: RetryPolicy::default(),
            webhooks: WebhookPolicy::default(),
            lease_ms: 30_000,
            sweep_interval_ms: 1_000,
        }
    }
}

/// Delivers events to webhooks, holding each (event, webhook) delivery
/// by a claim in the [`NotificationStore`], so that replicas over one
/// store, and the next start of this one, make each delivery once.
pub struct Notifier {
    store: Arc<dyn NotificationStore>,
    /// This instance, as the holder of its claims.
    owner: String,
    client: reqwest::Client,
    config: NotifierConfig,
    counters: Counters,
    /// Deliveries running at once.
    limit: tokio::sync::Semaphore,
    /// Set at shutdown: consumers and the sweep stop.
    stopping: watch::Sender<bool>,
    /// Set at shutdown's deadline: deliveries still running stop.
    cancelled: watch::Sender<bool>,
    /// Woken when no delivery is queued or running.
    idle: tokio::sync::Notify,
    /// The consumers and the sweep.
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

#[derive(Default)]
struct Counters {
    received: AtomicU64,
    duplicates: AtomicU64,
    logged: AtomicU64,
    attempts: AtomicU64,
    replays_skipped: AtomicU64,
    /// Deliveries started here and not finished.
    queued: AtomicU64,
    /// Dead letters made here, numbering them in order.
    letters: AtomicU64,
}
fn sign(secret: &str, timestamp: i64, body: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    let digest = mac.finalize().into_bytes();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("v1={hex}")
}

/// Checks a delivery as a receiver should: the signature over timestamp and
/// body, compared in constant time, and the timestamp within the
/// tolerance of `now_s`.
pub fn verify(secret: &str, timestamp: &str, signature: &str, body: &str, now_s: i64) -> bool {
    let Ok(ts) = timestamp.parse::<i64>() else {
        return false;
    };
    if (now_s - ts).abs() > SIGNATURE_TOLERANCE_S {
        return false;
    }
    let Some(hex) = signature.strip_prefix("v1=") else {
        return false;
    };
    let Some(given) = (0..hex.len())
        .step_by(2)
        .map(|i| {
            hex.get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect::<Option<Vec<u8>>>()
    else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(ts.to_string().as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    mac.verify_slice(&given).is_ok()
}

/// The accounts an event concerns.
fn accounts_of(event: &Event) -> Vec<String> {
    let payload: serde_json::Value = serde_json::from_str(&event.payload).unwrap_or_default();
    let mut out = Vec::new();
    for field in ["from", "to", "account_id"] {
        if let Some(id) = payload[field].as_str() {
            if !out.iter().any(|a| a == id) {
                out.push(id.to_string());
            }
        }
    }
    out
}

impl Notifier {
    pub fn new(store: Arc<dyn NotificationStore>, config: NotifierConfig) -> Notifier {
        // Redirects are never followed: a redirect would carry the
        // signature headers to wherever the receiver points.
        let mut client = reqwest::Client::builder()
            .timeout(Duration::from_millis(config.retry.timeout_ms))
            .redirect(reqwest::redirect::Policy::none())
            // A proxy from the environment would resolve names itself,
            // past the public-only resolver.
            .no_proxy();
        if !config.webhooks.allow_private {
            client = client.dns_resolver(std::sync::Arc::new(PublicOnly));
        }
        Notifier {
            store,
            owner: format!("n_{}", uuid::Uuid::new_v4().simple()),
            client: client.build().expect("HTTP client"),
            config,
            counters: Counters::default(),
            limit: tokio::sync::Semaphore::new(64),
            stopping: watch::Sender::new(false),
            cancelled: watch::Sender::new(false),
            idle: tokio::sync::Notify::new(),
            tasks: Mutex::new(Vec::new()),
        }
    }

    /// A notifier over an in-memory store: for one process that keeps
    /// nothing across restarts (tests, benches).
    pub fn in_memory(config: NotifierConfig) -> Notifier {
        let store = SqliteNotifications::open(None).expect("an in-memory SQLite database opens");
        Notifier::new(Arc::new(store), config)
    }

    pub fn store(&self) -> Arc<dyn NotificationStore> {
        Arc::clone(&self.store)
    }

    pub fn config(&self) -> &NotifierConfig {
        &self.config
    }

    /// A claim's lease, from now.
    fn lease(&self) -> Lease {
        Lease {
            owner: self.owner.clone(),
            until_ms: now_ms().saturating_add(self.config.lease_ms as i64),
        }
    }

    /// Registers a webhook for an account; answers it with its secret.
    pub async fn register(&self, account: &str, url: &str) -> Result<Webhook, WebhookRefused> {
        let url = check_url(url, self.config.webhooks)?;
        let secret = format!("whsec_{}", uuid::Uuid::new_v4().simple());
        let webhook = Webhook {
            id: format!("wh_{}", uuid::Uuid::new_v4().simple()),
            account: account.to_string(),
            url: url.to_string(),
            secret: None,
        };
        let hook = StoredHook {
            webhook: webhook.clone(),
            secret: secret.clone(),
        };
        match self.store.add_webhook(&hook).await {
            Ok(Added::Added) => Ok(Webhook {
                secret: Some(secret),
                ..webhook
            }),
            Ok(Added::AccountFull) => Err(WebhookRefused::TooManyForAccount),
            Ok(Added::StoreFull) => Err(WebhookRefused::TooMany),
            Err(e) => Err(WebhookRefused::StoreFailed(e)),
        }
    }

    pub async fn stats(&self) -> Result<NotificationStats, StoreError> {
        let stored = self.store.counts().await?;
        let c = &self.counters;
        Ok(NotificationStats {
            events_received: c.received.load(Ordering::Relaxed),
            events_applied: stored.events_applied,
            outbox_applied: stored.outbox_applied,
            duplicates_suppressed: c.duplicates.load(Ordering::Relaxed),
            logged: c.logged.load(Ordering::Relaxed),
            delivered: stored.delivered,
            attempts: c.attempts.load(Ordering::Relaxed),
            dead_lettered: stored.dead_lettered,
            dlq_size: stored.dead_letters,
            replays_skipped: c.replays_skipped.load(Ordering::Relaxed),
            dead_letters_dropped: stored.dead_letters_dropped,
            deliveries_queued: stored.claimed,
        })
    }

    pub async fn dead_letters(&self) -> Result<Vec<DeadLetter>, StoreError> {
        self.store.dead_letters().await
    }

    /// Takes one event: logs it, records it applied with a claim on its
    /// delivery to every webhook of the accounts it concerns, and starts
    /// those deliveries (in the background). When this returns Ok, the
    /// event's deliveries are recorded: the consumer may commit past it.
    /// Repeats (from the bus, or applied by another replica) are skipped.
    pub async fn apply(self: &Arc<Self>, event: &Event) -> Result<(), StoreError> {
        if event.id.len() > MAX_EVENT_ID_LEN {
            tracing::warn!(
                len = event.id.len(),
                "an event id longer than {MAX_EVENT_ID_LEN} bytes; not notified"
            );
            return Ok(());
        }
        let hooks = self.store.webhooks_of(&accounts_of(event)).await?;
        let ids: Vec<String> = hooks.iter().map(|h| h.webhook.id.clone()).collect();
        let claimed = self.store.apply(event, &ids, &self.lease()).await?;
        self.applied(event, hooks, claimed).await;
        Ok(())
    }

    /// Counts an event the store took, and starts the deliveries it
    /// claimed (`None`: applied before, a duplicate).
    async fn applied(
        self: &Arc<Self>,
        event: &Event,
        hooks: Vec<StoredHook>,
        claimed: Option<Vec<String>>,
    ) {
        let Some(claimed) = claimed else {
            self.counters.duplicates.fetch_add(1, Ordering::Relaxed);
            return;
        };
        self.counters.logged.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(event = %event.id, kind = %event.event_type, "notification (log channel)");
        for hook in hooks {
            if claimed.contains(&hook.webhook.id) {
                let claim = Claim {
                    event: event.clone(),
                    webhook_id: hook.webhook.id.clone(),
                    attempts: 0,
                };
                self.start_delivery(claim, hook).await;
            }
        }
    }

    /// Runs a claimed delivery in the background, or, when
    /// [`MAX_QUEUED_DELIVERIES`] are already waiting, makes it a dead
    /// letter at once.
    async fn start_delivery(self: &Arc<Self>, claim: Claim, hook: StoredHook) {
        let queued = self.counters.queued.fetch_add(1, Ordering::Relaxed);
        if queued >= MAX_QUEUED_DELIVERIES {
            self.finished_one();
            let error = format!("not attempted: {MAX_QUEUED_DELIVERIES} deliveries were already waiting; replay it later");
            self.bury(&claim, &hook.webhook, claim.attempts, error)
                .await;
            return;
        }
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let mut cancelled = me.cancelled.subscribe();
            let deliver = async {
                let _permit = me.limit.acquire().await;
                me.deliver_with_retries(&claim, &hook).await;
            };
            tokio::select! {
                _ = cancelled.wait_for(|c| *c) => {}
                () = deliver => {}
            }
            me.finished_one();
        });
    }

    fn finished_one(&self) {
        if self.counters.queued.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.idle.notify_waiters();
        }
    }

    /// Resolves when no delivery started here is waiting or running.
    async fn idle(&self) {
        loop {
            let woken = self.idle.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            if self.counters.queued.load(Ordering::Relaxed) == 0 {
                return;
            }
            woken.await;
        }
    }

    /// One POST; Ok on a 2xx.
    async fn send(&self, event: &Event, webhook: &Webhook, secret: &str) -> Result<(), String> {
        self.counters.attempts.fetch_add(1, Ordering::Relaxed);
        // Literal addresses skip the resolver: check them here, every time.
        check_url(&webhook.url, self.config.webhooks).map_err(|e| e.to_string())?;
        let body = serde_json::to_string(event).expect("event serializes");
        let timestamp = now_ms() / 1000;
        let response = self
            .client
            .post(&webhook.url)
            .header("content-type", "application/json")
            .header("Shardpay-Timestamp", timestamp.to_string())
            .header("Shardpay-Signature", sign(secret, timestamp, &body))
            .header("Shardpay-Event-Id", &event.id)
            .body(body)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status();
        if status.is_success() {
            Ok(())
        } else if status.is_redirection() {
            Err(format!(
                "answered {status}; redirects are not followed, register the final URL"
            ))
        } else {
            Err(format!("answered {status}"))
        }
    }

    /// Sends a claimed delivery until it is made or the attempts run out,
    /// renewing the claim before each attempt after the first; stops if
    /// the claim was lost (its lease ended and another replica took it).
    async fn deliver_with_retries(&self, claim: &Claim, hook: &StoredHook) {
        let (event, webhook) = (&claim.event, &hook.webhook);
        let attempts = self.config.retry.attempts.max(1);
        let mut last_error = String::new();
        for attempt in 1..=attempts {
            if attempt > 1 && !self.still_holds(event, webhook).await {
                return;
            }
            match self.send(event, webhook, &hook.secret).await {
                Ok(()) => {
                    self.record_delivered(event, webhook, claim.attempts + attempt)
                        .await;
                    return;
                }
                Err(e) => last_error = e,
            }
            if attempt < attempts {
                tokio::time::sleep(self.config.retry.delay(attempt)).await;
            }
        }
        self.bury(claim, webhook, claim.attempts + attempts, last_error)
            .await;
    }

    /// Renews the claim on a delivery; false when it is no longer held
    /// (or the store cannot say: the claim's lease then ends, and a sweep
    /// takes the delivery up again).
    async fn still_holds(&self, event: &Event, webhook: &Webhook) -> bool {
        match self
            .store
            .renew(&event.id, &webhook.id, &self.lease())
            .await
        {
            Ok(true) => true,
            Ok(false) => {
                tracing::info!(event = %event.id, webhook = %webhook.id, "another replica holds this delivery now; leaving it");
                false
            }
            Err(error) => {
                tracing::warn!(event = %event.id, webhook = %webhook.id, %error, "cannot renew a delivery's claim; it will be taken up again when its lease ends");
                false
            }
        }
    }

    async fn record_delivered(&self, event: &Event, webhook: &Webhook, attempts: u32) {
        let recorded = self
            .store
            .mark_delivered(&event.id, &webhook.id, &self.owner, attempts)
            .await;
        match recorded {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(event = %event.id, webhook = %webhook.id, "delivered after its claim had lapsed; the replica holding it now may send it again (the receiver sees the same Shardpay-Event-Id)")
            }
            Err(error) => {
                tracing::warn!(event = %event.id, webhook = %webhook.id, %error, "delivered but not recorded; it will be sent again when its claim's lease ends (the receiver sees the same Shardpay-Event-Id)")
            }
        }
    }

    /// Makes a claimed delivery that did not happen a dead letter (the
    /// store drops the oldest letters past its bound).
    async fn bury(&self, claim: &Claim, webhook: &Webhook, attempts: u32, last_error: String) {
        let failed_at_ms = now_ms();
        let letter = DeadLetter {
            // Ordered by time, then by number here: the store's order is
            // oldest first.
            id: format!(
                "dl_{failed_at_ms:013}_{:010}_{}",
                self.counters.letters.fetch_add(1, Ordering::Relaxed),
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            ),
            event_id: claim.event.id.clone(),
            event_type: claim.event.event_type.clone(),
            webhook_id: claim.webhook_id.clone(),
            url: webhook.url.clone(),
            attempts,
            last_error,
            failed_at_ms,
        };
        match self.store.bury(&letter, &self.owner).await {
            Ok(true) => {
                tracing::warn!(dead_letter = %letter.id, event = %letter.event_id, url = %webhook.url, "webhook delivery failed; kept in the dead-letter store")
            }
            Ok(false) => {
                tracing::info!(event = %letter.event_id, webhook = %letter.webhook_id, "a failed delivery's claim had lapsed; the replica holding it now goes on")
            }
            Err(error) => {
                tracing::warn!(event = %letter.event_id, webhook = %letter.webhook_id, %error, "cannot keep a dead letter; the delivery will be taken up again when its claim's lease ends")
            }
        }
    }

    /// Takes over deliveries whose claim's lease ended (their holder died,
    /// or let them go at shutdown) and starts them; answers how many.
    pub async fn sweep_once(self: &Arc<Self>) -> Result<usize, StoreError> {
        let queued = self.counters.queued.load(Ordering::Relaxed);
        let room = MAX_QUEUED_DELIVERIES
            .saturating_sub(queued)
            .min(SWEEP_BATCH);
        if room == 0 {
            return Ok(0);
        }
        let claims = self
            .store
            .take_expired(&self.lease(), now_ms(), room as u32)
            .await?;
        let taken = claims.len();
        for claim in claims {
            match self.store.webhook(&claim.webhook_id).await? {
                Some(hook) => self.start_delivery(claim, hook).await,
                None => {
                    let gone = Webhook {
                        id: claim.webhook_id.clone(),
                        account: String::new(),
                        url: String::new(),
                        secret: None,
                    };
                    let error = "its webhook is not registered".to_string();
                    self.bury(&claim, &gone, claim.attempts, error).await;
                }
            }
        }
        if taken > 0 {
            tracing::info!(
                taken,
                "notification took over deliveries whose claim had lapsed"
            );
        }
        Ok(taken)
    }

    /// Applies the outbox events of `shards` that no notifier over this
    /// store has applied: what a bus that keeps nothing across restarts
    /// (the in-process one) lost, or what was never published. Run
    /// before subscribing; answers how many it applied.
    pub async fn catch_up(self: &Arc<Self>, shards: &[Arc<dyn ShardStore>]) -> anyhow::Result<u64> {
        let mut applied = 0;
        for shard in shards {
            let mut after = 0;
            loop {
                let page = shard.outbox_page(after, CATCH_UP_PAGE).await?;
                let events: Vec<Event> = page.iter().map(Event::from_outbox).collect();
                let ids: Vec<String> = events.iter().map(|e| e.id.clone()).collect();
                let known: HashSet<String> = self.store.applied(&ids).await?.into_iter().collect();
                for event in events.iter().filter(|e| !known.contains(&e.id)) {
                    if *self.stopping.borrow() {
                        return Ok(applied);
                    }
                    self.apply(event).await?;
                    applied += 1;
                }
                match page.last() {
                    Some(last) if page.len() == CATCH_UP_PAGE as usize => after = last.seq,
                    _ => break,
                }
            }
        }
        Ok(applied)
    }

    /// Consumes `subscriptions` and sweeps lapsed claims in the
    /// background, until [`Notifier::shutdown`].
    pub fn start(self: &Arc<Self>, subscriptions: Vec<Box<dyn Subscription>>) {
        self.start_catching_up(Vec::new(), subscriptions);
    }

    /// [`Notifier::start`], and catches up on the outbox events of
    /// `shards` alongside (applying is idempotent), so a start does not
    /// wait for it.
    pub fn start_catching_up(
        self: &Arc<Self>,
        shards: Vec<Arc<dyn ShardStore>>,
        subscriptions: Vec<Box<dyn Subscription>>,
    ) {
        let mut tasks = self.tasks.lock().expect("notifier tasks");
        if !shards.is_empty() {
            let me = Arc::clone(self);
            tasks.push(tokio::spawn(async move {
                match me.catch_up(&shards).await {
                    Ok(0) => {}
                    Ok(events) => tracing::info!(
                        events,
                        "notification applied outbox events it had not seen"
                    ),
                    Err(error) => tracing::warn!(%error, "notification could not catch up on the outboxes; events the bus lost wait for the next start"),
                }
            }));
        }
        for subscription in subscriptions {
            tasks.push(tokio::spawn(Arc::clone(self).consume(subscription)));
        }
        tasks.push(tokio::spawn(Arc::clone(self).sweep()));
    }

    /// Consumes one topic until shutdown. The position is committed only
    /// after every event of the batch is recorded with its deliveries'
    /// claims; an event the store cannot take is tried again, and at
    /// shutdown the batch is left uncommitted, to be read again.
    async fn consume(self: Arc<Self>, mut subscription: Box<dyn Subscription>) {
        let mut stopping = self.stopping.subscribe();
        loop {
            let polled = tokio::select! {
                biased;
                _ = stopping.wait_for(|s| *s) => return,
                polled = subscription.poll(1_000, Duration::from_millis(200)) => polled,
            };
            let batch = match polled {
                Ok(batch) => batch,
                Err(error) => {
                    tracing::warn!(%error, "notification cannot read events; retrying");
                    tokio::time::sleep(STORE_RETRY).await;
                    continue;
                }
            };
            if batch.is_empty() {
                continue;
            }
            if !self.record(&batch, &stopping).await {
                return;
            }
            if let Err(error) = subscription.commit().await {
                tracing::warn!(%error, "notification cannot commit its position");
            }
        }
    }

    /// Applies a batch, in one transaction when the store can (the whole
    /// batch again after a failure), else each event until the store
    /// takes it; false when shutdown came first.
    async fn record(self: &Arc<Self>, batch: &[Event], stopping: &watch::Receiver<bool>) -> bool {
        let events: Vec<(Event, Vec<String>)> = batch
            .iter()
            .filter(|event| {
                let ok = event.id.len() <= MAX_EVENT_ID_LEN;
                if !ok {
                    tracing::warn!(
                        len = event.id.len(),
                        "an event id longer than {MAX_EVENT_ID_LEN} bytes; not notified"
                    );
                }
                ok
            })
            .map(|event| (event.clone(), accounts_of(event)))
            .collect();
        loop {
            // At shutdown the batch is handed back: it stays uncommitted,
            // to be read again (or caught up from the outbox).
            if *stopping.borrow() {
                return false;
            }
            match self.store.apply_batch(&events, &self.lease()).await {
                None => break,
                Some(Ok(results)) => {
                    self.counters
                        .received
                        .fetch_add(batch.len() as u64, Ordering::Relaxed);
                    for ((event, _), (hooks, claimed)) in events.iter().zip(results) {
                        self.applied(event, hooks, claimed).await;
                    }
                    return true;
                }
                Some(Err(error)) => {
                    tracing::warn!(events = events.len(), %error, "notification cannot record a batch of events; trying again");
                    tokio::time::sleep(STORE_RETRY).await;
                }
            }
        }
        for event in batch {
            if *stopping.borrow() {
                return false;
            }
            self.counters.received.fetch_add(1, Ordering::Relaxed);
            while let Err(error) = self.apply(event).await {
                tracing::warn!(event = %event.id, %error, "notification cannot record an event; trying again");
                if *stopping.borrow() {
                    return false;
                }
                tokio::time::sleep(STORE_RETRY).await;
            }
        }
        true
    }

    /// Takes up lapsed claims every sweep interval, until shutdown.
    async fn sweep(self: Arc<Self>) {
        let mut stopping = self.stopping.subscribe();
        let every = Duration::from_millis(self.config.sweep_interval_ms.max(10));
        loop {
            tokio::select! {
                biased;
                _ = stopping.wait_for(|s| *s) => return,
                () = tokio::time::sleep(every) => {}
            }
            if let Err(error) = self.sweep_once().await {
                tracing::warn!(%error, "notification cannot look for lapsed deliveries; trying again");
            }
        }
    }

    /// Stops taking events and lapsed claims (a consumer finishes
    /// recording the batch it holds), lets the deliveries in flight finish
    /// until `deadline`, then stops the rest and lets go of their claims,
    /// so that another replica, or the next start, takes them at once.
    /// Answers how many claims it let go.
    pub async fn shutdown(&self, deadline: tokio::time::Instant) -> u64 {
        self.stopping.send_replace(true);
        let tasks = std::mem::take(&mut *self.tasks.lock().expect("notifier tasks"));
        for task in tasks {
            let abort = task.abort_handle();
            if tokio::time::timeout_at(deadline, task).await.is_err() {
                abort.abort();
            }
        }
        let _ = tokio::time::timeout_at(deadline, self.idle()).await;
        self.cancelled.send_replace(true);
        // Cancelled deliveries stop at their next await.
        let _ = tokio::time::timeout(Duration::from_secs(1), self.idle()).await;
        match self.store.release(&self.owner).await {
            Ok(released) => {
                if released > 0 {
                    tracing::info!(
                        released,
                        "notification let go of deliveries it could not finish before the shutdown deadline"
                    );
                }
                released
            }
            Err(error) => {
                tracing::warn!(%error, "notification cannot let go of its claims; other replicas take them when their leases end");
                0
            }
        }
    }

    /// Delivers dead letters again, once each (no retries): `ids`, or all
    /// of them. A letter whose delivery was made since (a replay of a
    /// replay) is recognised and not sent; one another replay is sending
    /// is left alone.
    pub async fn replay(&self, ids: Option<&[String]>) -> Result<ReplayOutcome, StoreError> {
        let mut outcome = ReplayOutcome::default();
        let mut ids: Vec<String> = match ids {
            None => self
                .store
                .dead_letters()
                .await?
                .into_iter()
                .map(|l| l.id)
                .collect(),
            Some(ids) => ids.to_vec(),
        };
        // At most a store's worth per request; the rest wait.
        if ids.len() > MAX_DEAD_LETTERS {
            outcome.not_attempted += (ids.len() - MAX_DEAD_LETTERS) as u64;
            ids.truncate(MAX_DEAD_LETTERS);
        }
        // The same letter twice is replayed one after the other, so the
        // second sees the first delivered; different letters go out at once.
        let mut groups: Vec<Vec<String>> = Vec::new();
        let mut group_of: HashMap<String, usize> = HashMap::new();
        for id in ids {
            let index = *group_of.entry(id.clone()).or_insert_with(|| {
                groups.push(Vec::new());
                groups.len() - 1
            });
            groups[index].push(id);
        }
        let deadline = tokio::time::Instant::now() + REPLAY_BUDGET;
        let steps: Vec<Vec<ReplayStep>> = futures_util::stream::iter(groups)
            .map(|group| async move {
                let mut steps = Vec::with_capacity(group.len());
                for id in group {
                    steps.push(if tokio::time::Instant::now() >= deadline {
                        ReplayStep::NotAttempted
                    } else {
                        self.replay_one(&id).await
                    });
                }
                steps
            })
            .buffer_unordered(REPLAY_CONCURRENCY)
            .collect()
            .await;
        for step in steps.into_iter().flatten() {
            match step {
                ReplayStep::Delivered => outcome.delivered += 1,
                ReplayStep::Already => outcome.already_delivered += 1,
                ReplayStep::Failed => outcome.failed += 1,
                ReplayStep::NotFound => outcome.not_found += 1,
                ReplayStep::NotAttempted => outcome.not_attempted += 1,
            }
        }
        Ok(outcome)
    }

    /// Delivers one dead letter again, once, holding its claim meanwhile.
    async fn replay_one(&self, id: &str) -> ReplayStep {
        let claim = match self.store.claim_letter(id, &self.lease()).await {
            Ok(LetterClaim::Claimed(claim)) => claim,
            Ok(LetterClaim::Delivered) => {
                self.counters
                    .replays_skipped
                    .fetch_add(1, Ordering::Relaxed);
                return ReplayStep::Already;
            }
            Ok(LetterClaim::Busy) => return ReplayStep::NotAttempted,
            Ok(LetterClaim::NotFound) => return ReplayStep::NotFound,
            Err(error) => {
                tracing::warn!(dead_letter = %id, %error, "cannot replay a dead letter");
                return ReplayStep::NotAttempted;
            }
        };
        let sent = match self.store.webhook(&claim.webhook_id).await {
            Ok(Some(hook)) => self
                .send(&claim.event, &hook.webhook, &hook.secret)
                .await
                .map(|()| hook),
            Ok(None) => Err("its webhook is not registered".to_string()),
            Err(e) => Err(e.to_string()),
        };
        match sent {
            Ok(hook) => {
                self.record_delivered(&claim.event, &hook.webhook, claim.attempts + 1)
                    .await;
                ReplayStep::Delivered
            }
            Err(error) => {
                let back = self
                    .store
                    .return_letter(&claim.event.id, &claim.webhook_id, &self.owner, &error)
                    .await;
                if let Err(e) = back {
                    tracing::warn!(dead_letter = %id, error = %e, "cannot put a dead letter back; it will be taken up again when its claim's lease ends");
                }
                ReplayStep::Failed
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_verifies_only_with_its_secret_body_and_a_fresh_timestamp() {
        let sig = sign("whsec_1", 1_700_000_000, r#"{"id":"e1"}"#);
        assert!(sig.starts_with("v1=") && sig.len() == 3 + 64);
        let ok = |secret, ts, body, now| verify(secret, ts, &sig, body, now);
        assert!(ok("whsec_1", "1700000000", r#"{"id":"e1"}"#, 1_700_000_100));
        assert!(!ok(
            "whsec_2",
            "1700000000",
            r#"{"id":"e1"}"#,
            1_700_000_100
        ));
        assert!(!ok(
            "whsec_1",
            "1700000000",
            r#"{"id":"e2"}"#,
            1_700_000_100
        ));
        assert!(!ok(
            "whsec_1",
            "1700000001",
            r#"{"id":"e1"}"#,
            1_700_000_100
        ));
        assert!(
            !ok("whsec_1", "1700000000", r#"{"id":"e1"}"#, 1_700_000_301),
            "older than 5 minutes"
        );
    }

    #[test]
    fn only_public_addresses_are_public() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fc00::1",
            "fd12::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "2001:db8::1",
            "2002:7f00:1::",
            "2001::1",
            "fec0::1",
            "100::1",
            "::ffff:0:7f00:1",
        ] {
            assert!(!is_public(private.parse().unwrap()), "{private}");
        }
        for public in ["1.1.1.1", "8.8.8.8", "93.184.216.34", "2606:4700::1111"] {
            assert!(is_public(public.parse().unwrap()), "{public}");
        }
    }

    #[test]
    fn webhook_urls_to_this_machine_are_refused_unless_allowed() {
        let strict = WebhookPolicy::default();
        let open = WebhookPolicy {
            allow_private: true,
        };
        for url in [
            "http://127.0.0.1:8001/x",
            "http://localhost/x",
            "http://a.localhost./x",
            "http://[::1]/x",
            "http://169.254.169.254/latest/meta-data/",
            "http://0.0.0.0:8006/",
            "http://2130706433/",
            "http://0x7f.1/",
        ] {
            assert_eq!(
                check_url(url, strict).unwrap_err().code(),
                "webhook_url_not_public",
                "{url}"
            );
            assert!(check_url(url, open).is_ok(), "{url}");
        }
        for bad in [
            "ftp://example.com/",
            "not a url",
            "http://",
            "file:///etc/passwd",
        ] {
            assert_eq!(
                check_url(bad, strict).unwrap_err().code(),
                "invalid_url",
                "{bad}"
            );
        }
        assert!(check_url("https://hooks.example.com/shardpay", strict).is_ok());
        let long = format!("https://example.com/{}", "a".repeat(MAX_WEBHOOK_URL_LEN));
        assert_eq!(check_url(&long, open).unwrap_err().code(), "invalid_url");
    }

    #[tokio::test]
    async fn an_account_has_a_bounded_number_of_webhooks() {
        let n = Notifier::in_memory(NotifierConfig::default());
        for _ in 0..MAX_WEBHOOKS_PER_ACCOUNT {
            n.register("alice", "https://hooks.example.com/a")
                .await
                .unwrap();
        }
        assert_eq!(
            n.register("alice", "https://hooks.example.com/a")
                .await
                .unwrap_err()
                .code(),
            "too_many_webhooks"
        );
        assert!(n
            .register("bob", "https://hooks.example.com/b")
            .await
            .is_ok());
    }

    #[tokio::test]
    async fn a_name_that_resolves_to_loopback_gets_no_connection() {
        use reqwest::dns::Resolve;
        let name: reqwest::dns::Name = "localhost".parse().unwrap();
        let refused = PublicOnly.resolve(name).await;
        assert!(refused.is_err(), "localhost resolves to loopback only");
    }

    #[tokio::test]
    async fn a_batch_is_applied_in_one_go_and_its_repeats_are_duplicates() {
        let n = Arc::new(Notifier::in_memory(NotifierConfig::default()));
        let hook = n
            .register("alice", "https://hooks.example.com/a")
            .await
            .unwrap();
        let event = |id: &str, from: &str| Event {
            id: id.into(),
            event_type: "transfer.completed".into(),
            key: from.into(),
            shard: Some(0),
            payload: format!(r#"{{"from":"{from}","to":"dora"}}"#),
            created_at_ms: 0,
            position: None,
        };
        let batch: Vec<(Event, Vec<String>)> = [
            event("e1", "alice"),
            event("e2", "carol"),
            event("e1", "alice"),
        ]
        .into_iter()
        .map(|e| {
            let accounts = accounts_of(&e);
            (e, accounts)
        })
        .collect();
        let results = n
            .store
            .apply_batch(&batch, &n.lease())
            .await
            .expect("the SQLite store takes batches")
            .unwrap();
        let summary: Vec<(usize, Option<Vec<String>>)> = results
            .into_iter()
            .map(|(hooks, claimed)| (hooks.len(), claimed))
            .collect();
        assert_eq!(
            summary,
            vec![
                (1, Some(vec![hook.id.clone()])),
                (0, Some(vec![])),
                (1, None),
            ]
        );
        // Taken again (a consumer that read the batch twice): all repeats.
        let again = n
            .store
            .apply_batch(&batch[..2], &n.lease())
            .await
            .unwrap()
            .unwrap();
        assert!(again.iter().all(|(_, claimed)| claimed.is_none()));
        let ids = ["e1".to_string(), "e2".into(), "e3".into()];
        assert_eq!(n.store.applied(&ids).await.unwrap(), vec!["e1", "e2"]);
    }

    #[tokio::test]
    async fn the_dead_letter_store_keeps_the_newest_within_its_bound() {
        let n = Arc::new(Notifier::in_memory(NotifierConfig::default()));
        let hook = n
            .register("alice", "https://hooks.example.com/a")
            .await
            .unwrap();
        let event = |i: usize| Event {
            id: format!("e{i}"),
            event_type: "transfer.completed".into(),
            key: "alice".into(),
            shard: None,
            payload: "{}".into(),
            created_at_ms: 0,
            position: None,
        };
        for i in 0..MAX_DEAD_LETTERS + 5 {
            let claimed = n
                .store
                .apply(&event(i), std::slice::from_ref(&hook.id), &n.lease())
                .await
                .unwrap();
            assert_eq!(claimed, Some(vec![hook.id.clone()]));
            let claim = Claim {
                event: event(i),
                webhook_id: hook.id.clone(),
                attempts: 0,
            };
            n.bury(&claim, &hook, 1, "down".into()).await;
        }
        let stats = n.stats().await.unwrap();
        assert_eq!(stats.dlq_size, MAX_DEAD_LETTERS as u64);
        assert_eq!(stats.dead_letters_dropped, 5);
        assert_eq!(stats.dead_lettered, MAX_DEAD_LETTERS as u64 + 5);
        let kept = n.dead_letters().await.unwrap();
        assert_eq!(kept.len(), MAX_DEAD_LETTERS);
        assert!(
            !kept.iter().any(|d| d.event_id == "e0"),
            "the oldest letters go first"
        );
        assert!(kept
            .iter()
            .any(|d| d.event_id == format!("e{}", MAX_DEAD_LETTERS + 4)));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = RetryPolicy {
            base_delay_ms: 100,
            max_delay_ms: 1_000,
            ..RetryPolicy::default()
        };
        for _ in 0..200 {
            assert!(p.delay(1) <= Duration::from_millis(100));
            assert!(p.delay(3) <= Duration::from_millis(400));
            assert!(p.delay(30) <= Duration::from_millis(1_000));
        }
        let longest = (0..500).map(|_| p.delay(3)).max().unwrap();
        assert!(
            longest > Duration::from_millis(200),
            "jitter spans the range"
        );
    }
}
