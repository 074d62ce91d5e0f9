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
//! the dead-letter store, from which it can be replayed. Each (event,
//! webhook) pair is delivered at most once successfully: a replay of one
//! already delivered is recognised and not sent.

pub mod routes;

use crate::codes::ErrorCode;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use hmac::{Hmac, Mac};
use rand::Rng;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::events::{Event, Subscription};
use crate::ledger::{now_ms, TimestampMs};

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
}

impl WebhookRefused {
    pub fn code(&self) -> ErrorCode {
        match self {
            WebhookRefused::InvalidUrl => ErrorCode::InvalidUrl,
            WebhookRefused::NotPublic(_) => ErrorCode::WebhookUrlNotPublic,
            WebhookRefused::TooManyForAccount => ErrorCode::TooManyWebhooks,
            WebhookRefused::TooMany => ErrorCode::TooManyWebhooks,
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

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct NotificationStats {
    pub events_received: u64,
    pub events_applied: u64,
    /// Distinct outbox events applied.
    pub outbox_applied: u64,
    pub duplicates_suppressed: u64,
    pub logged: u64,
    pub delivered: u64,
    pub attempts: u64,
    pub dead_lettered: u64,
    pub dlq_size: u64,
    pub replays_skipped: u64,
    /// Dead letters dropped, oldest first, to keep the store within
    /// [`MAX_DEAD_LETTERS`].
    #[serde(default)]
    pub dead_letters_dropped: u64,
    /// Deliveries waiting or running now (at most [`MAX_QUEUED_DELIVERIES`]).
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
    /// ([`REPLAY_BUDGET`]) ran out first.
    #[serde(default)]
    pub not_attempted: u64,
}

/// What replaying one dead letter did.
enum ReplayStep {
    Delivered,
    Already,
    Failed,
    NotAttempted,
}

/// Dead letters sent at once by a replay.
const REPLAY_CONCURRENCY: usize = 32;
/// How long one replay request starts new deliveries: well inside the
/// server's request timeout, so a store of letters to unreachable hosts
/// answers with what it did instead of timing out; the rest stay for the
/// next replay.
pub const REPLAY_BUDGET: Duration = Duration::from_secs(15);

struct Registered {
    webhook: Webhook,
    secret: String,
}

#[derive(Default)]
struct State {
    hooks: HashMap<String, Vec<Registered>>,
    seen: HashSet<String>,
    /// (event id, webhook id) pairs delivered.
    delivered: HashSet<(String, String)>,
    dlq: BTreeMap<String, (DeadLetter, Event)>,
    /// (event id, webhook id) pairs a replay is sending now: another
    /// replay leaves them alone, so two replays never both send one.
    replaying: HashSet<(String, String)>,
}

pub struct Notifier {
    state: Mutex<State>,
    client: reqwest::Client,
    policy: RetryPolicy,
    webhooks: WebhookPolicy,
    counters: Counters,
    /// Deliveries running at once.
    limit: tokio::sync::Semaphore,
}

#[derive(Default)]
struct Counters {
    received: AtomicU64,
    outbox_applied: AtomicU64,
    duplicates: AtomicU64,
    logged: AtomicU64,
    delivered: AtomicU64,
    attempts: AtomicU64,
    dead_lettered: AtomicU64,
    replays_skipped: AtomicU64,
    dead_letters_dropped: AtomicU64,
    /// Deliveries spawned and not finished.
    queued: AtomicU64,
    /// Dead letters made, numbering them in order.
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
    pub fn new(policy: RetryPolicy, webhooks: WebhookPolicy) -> Notifier {
        // Redirects are never followed: a redirect would carry the
        // signature headers to wherever the receiver points.
        let mut client = reqwest::Client::builder()
            .timeout(Duration::from_millis(policy.timeout_ms))
            .redirect(reqwest::redirect::Policy::none())
            // A proxy from the environment would resolve names itself,
            // past the public-only resolver.
            .no_proxy();
        if !webhooks.allow_private {
            client = client.dns_resolver(std::sync::Arc::new(PublicOnly));
        }
        Notifier {
            state: Mutex::new(State::default()),
            client: client.build().expect("HTTP client"),
            policy,
            webhooks,
            counters: Counters::default(),
            limit: tokio::sync::Semaphore::new(64),
        }
    }

    /// Registers a webhook for an account; answers it with its secret.
    pub fn register(&self, account: &str, url: &str) -> Result<Webhook, WebhookRefused> {
        let url = check_url(url, self.webhooks)?;
        let secret = format!("whsec_{}", uuid::Uuid::new_v4().simple());
        let webhook = Webhook {
            id: format!("wh_{}", uuid::Uuid::new_v4().simple()),
            account: account.to_string(),
            url: url.to_string(),
            secret: None,
        };
        {
            let mut state = self.state.lock().expect("notifier lock");
            let total: usize = state.hooks.values().map(Vec::len).sum();
            if total >= MAX_WEBHOOKS {
                return Err(WebhookRefused::TooMany);
            }
            let hooks = state.hooks.entry(account.to_string()).or_default();
            if hooks.len() >= MAX_WEBHOOKS_PER_ACCOUNT {
                return Err(WebhookRefused::TooManyForAccount);
            }
            hooks.push(Registered {
                webhook: webhook.clone(),
                secret: secret.clone(),
            });
        }
        Ok(Webhook {
            secret: Some(secret),
            ..webhook
        })
    }

    pub fn stats(&self) -> NotificationStats {
        let s = self.state.lock().expect("notifier lock");
        let c = &self.counters;
        NotificationStats {
            events_received: c.received.load(Ordering::Relaxed),
            events_applied: s.seen.len() as u64,
            outbox_applied: c.outbox_applied.load(Ordering::Relaxed),
            duplicates_suppressed: c.duplicates.load(Ordering::Relaxed),
            logged: c.logged.load(Ordering::Relaxed),
            delivered: c.delivered.load(Ordering::Relaxed),
            attempts: c.attempts.load(Ordering::Relaxed),
            dead_lettered: c.dead_lettered.load(Ordering::Relaxed),
            dlq_size: s.dlq.len() as u64,
            replays_skipped: c.replays_skipped.load(Ordering::Relaxed),
            dead_letters_dropped: c.dead_letters_dropped.load(Ordering::Relaxed),
            deliveries_queued: c.queued.load(Ordering::Relaxed),
        }
    }

    pub fn dead_letters(&self) -> Vec<DeadLetter> {
        let s = self.state.lock().expect("notifier lock");
        s.dlq.values().map(|(d, _)| d.clone()).collect()
    }

    /// Takes one event: logs it, and delivers it to every webhook of the
    /// accounts it concerns (in the background). Repeats are skipped.
    pub fn apply(self: &Arc<Self>, event: &Event) {
        self.counters.received.fetch_add(1, Ordering::Relaxed);
        let targets: Vec<(Webhook, String)> = {
            let mut s = self.state.lock().expect("notifier lock");
            if !s.seen.insert(event.id.clone()) {
                self.counters.duplicates.fetch_add(1, Ordering::Relaxed);
                return;
            }
            if event.shard.is_some() {
                self.counters.outbox_applied.fetch_add(1, Ordering::Relaxed);
            }
            accounts_of(event)
                .iter()
                .flat_map(|a| s.hooks.get(a).into_iter().flatten())
                .map(|r| (r.webhook.clone(), r.secret.clone()))
                .collect()
        };
        self.counters.logged.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(event = %event.id, kind = %event.event_type, "notification (log channel)");
        for (webhook, secret) in targets {
            let queued = self.counters.queued.fetch_add(1, Ordering::Relaxed);
            if queued >= MAX_QUEUED_DELIVERIES {
                self.counters.queued.fetch_sub(1, Ordering::Relaxed);
                self.bury(
                    event,
                    &webhook,
                    0,
                    format!("not attempted: {MAX_QUEUED_DELIVERIES} deliveries were already waiting; replay it later"),
                );
                continue;
            }
            let (me, event) = (Arc::clone(self), event.clone());
            tokio::spawn(async move {
                let _permit = me.limit.acquire().await;
                me.deliver_with_retries(&event, &webhook, &secret).await;
                me.counters.queued.fetch_sub(1, Ordering::Relaxed);
            });
        }
    }

    /// One POST; Ok on a 2xx.
    async fn send(&self, event: &Event, webhook: &Webhook, secret: &str) -> Result<(), String> {
        self.counters.attempts.fetch_add(1, Ordering::Relaxed);
        // Literal addresses skip the resolver: check them here, every time.
        check_url(&webhook.url, self.webhooks).map_err(|e| e.to_string())?;
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

    async fn deliver_with_retries(&self, event: &Event, webhook: &Webhook, secret: &str) {
        let mut last_error = String::new();
        for attempt in 1..=self.policy.attempts.max(1) {
            match self.send(event, webhook, secret).await {
                Ok(()) => {
                    self.mark_delivered(event, webhook);
                    return;
                }
                Err(e) => last_error = e,
            }
            if attempt < self.policy.attempts {
                tokio::time::sleep(self.policy.delay(attempt)).await;
            }
        }
        self.bury(event, webhook, self.policy.attempts, last_error);
    }

    /// Keeps a delivery that did not happen in the dead-letter store,
    /// dropping the oldest letter when the store is full.
    fn bury(&self, event: &Event, webhook: &Webhook, attempts: u32, last_error: String) {
        let failed_at_ms = now_ms();
        let letter = DeadLetter {
            // Numbered, so the store's order is oldest first.
            id: format!(
                "dl_{:012}_{}",
                self.counters.letters.fetch_add(1, Ordering::Relaxed),
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            ),
            event_id: event.id.clone(),
            event_type: event.event_type.clone(),
            webhook_id: webhook.id.clone(),
            url: webhook.url.clone(),
            attempts,
            last_error,
            failed_at_ms,
        };
        tracing::warn!(dead_letter = %letter.id, event = %event.id, url = %webhook.url, "webhook delivery failed; kept in the dead-letter store");
        self.counters.dead_lettered.fetch_add(1, Ordering::Relaxed);
        let mut state = self.state.lock().expect("notifier lock");
        while state.dlq.len() >= MAX_DEAD_LETTERS {
            state.dlq.pop_first();
            self.counters
                .dead_letters_dropped
                .fetch_add(1, Ordering::Relaxed);
        }
        state.dlq.insert(letter.id.clone(), (letter, event.clone()));
    }

    fn mark_delivered(&self, event: &Event, webhook: &Webhook) {
        self.counters.delivered.fetch_add(1, Ordering::Relaxed);
        self.state
            .lock()
            .expect("notifier lock")
            .delivered
            .insert((event.id.clone(), webhook.id.clone()));
    }

    /// Delivers dead letters again, once each (no retries): `ids`, or all
    /// of them. A letter whose event already reached its webhook (a replay
    /// of a replay, or a late success) is recognised and dropped unsent.
    pub async fn replay(&self, ids: Option<&[String]>) -> ReplayOutcome {
        let mut outcome = ReplayOutcome::default();
        let chosen: Vec<(DeadLetter, Event)> = {
            let s = self.state.lock().expect("notifier lock");
            match ids {
                None => s.dlq.values().cloned().collect(),
                Some(ids) => ids
                    .iter()
                    .filter_map(|id| {
                        let found = s.dlq.get(id).cloned();
                        if found.is_none() {
                            outcome.not_found += 1;
                        }
                        found
                    })
                    .collect(),
            }
        };
        // Letters of the same (event, webhook) pair are replayed one after
        // the other, so the second sees the first delivered and is not
        // sent; different pairs go out at once.
        let mut groups: Vec<Vec<(DeadLetter, Event)>> = Vec::new();
        let mut group_of: HashMap<(String, String), usize> = HashMap::new();
        for (letter, event) in chosen {
            let pair = (letter.event_id.clone(), letter.webhook_id.clone());
            let index = *group_of.entry(pair).or_insert_with(|| {
                groups.push(Vec::new());
                groups.len() - 1
            });
            groups[index].push((letter, event));
        }
        let deadline = tokio::time::Instant::now() + REPLAY_BUDGET;
        let steps: Vec<Vec<ReplayStep>> = futures_util::stream::iter(groups)
            .map(|group| async move {
                let mut steps = Vec::with_capacity(group.len());
                for (letter, event) in group {
                    steps.push(if tokio::time::Instant::now() >= deadline {
                        ReplayStep::NotAttempted
                    } else {
                        self.replay_one(letter, event).await
                    });
                }
                steps
            })
            .buffer_unordered(REPLAY_CONCURRENCY)
            .collect()
            .await;
        let steps = steps.into_iter().flatten();
        for step in steps {
            match step {
                ReplayStep::Delivered => outcome.delivered += 1,
                ReplayStep::Already => outcome.already_delivered += 1,
                ReplayStep::Failed => outcome.failed += 1,
                ReplayStep::NotAttempted => outcome.not_attempted += 1,
            }
        }
        outcome
    }

    /// Delivers one dead letter again, once.
    async fn replay_one(&self, letter: DeadLetter, event: Event) -> ReplayStep {
        let pair = (letter.event_id.clone(), letter.webhook_id.clone());
        let target = {
            let mut s = self.state.lock().expect("notifier lock");
            let done = s.delivered.contains(&pair);
            if !done && !s.replaying.insert(pair.clone()) {
                return ReplayStep::NotAttempted;
            }
            let hook = s
                .hooks
                .values()
                .flatten()
                .find(|r| r.webhook.id == letter.webhook_id)
                .map(|r| (r.webhook.clone(), r.secret.clone()));
            (done, hook)
        };
        match target {
            (true, _) => {
                self.counters
                    .replays_skipped
                    .fetch_add(1, Ordering::Relaxed);
                self.state
                    .lock()
                    .expect("notifier lock")
                    .dlq
                    .remove(&letter.id);
                ReplayStep::Already
            }
            (false, None) => {
                self.state
                    .lock()
                    .expect("notifier lock")
                    .replaying
                    .remove(&pair);
                ReplayStep::Failed
            }
            (false, Some((webhook, secret))) => {
                // Marked delivered before the pair is let go, so no other
                // replay can slip in between and send it again.
                let step = match self.send(&event, &webhook, &secret).await {
                    Ok(()) => {
                        self.mark_delivered(&event, &webhook);
                        self.state
                            .lock()
                            .expect("notifier lock")
                            .dlq
                            .remove(&letter.id);
                        ReplayStep::Delivered
                    }
                    Err(e) => {
                        if let Some((l, _)) = self
                            .state
                            .lock()
                            .expect("notifier lock")
                            .dlq
                            .get_mut(&letter.id)
                        {
                            l.last_error = e;
                            l.attempts += 1;
                        }
                        ReplayStep::Failed
                    }
                };
                self.state
                    .lock()
                    .expect("notifier lock")
                    .replaying
                    .remove(&pair);
                step
            }
        }
    }

    /// Consumes one topic forever, committing after each batch.
    pub async fn run(self: Arc<Self>, mut subscription: Box<dyn Subscription>) {
        loop {
            match subscription.poll(1_000, Duration::from_millis(200)).await {
                Ok(batch) => {
                    for event in &batch {
                        self.apply(event);
                    }
                    if !batch.is_empty() {
                        if let Err(error) = subscription.commit().await {
                            tracing::warn!(%error, "notification cannot commit its position");
                        }
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "notification cannot read events; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
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

    #[test]
    fn an_account_has_a_bounded_number_of_webhooks() {
        let n = Notifier::new(RetryPolicy::default(), WebhookPolicy::default());
        for _ in 0..MAX_WEBHOOKS_PER_ACCOUNT {
            n.register("alice", "https://hooks.example.com/a").unwrap();
        }
        assert_eq!(
            n.register("alice", "https://hooks.example.com/a")
                .unwrap_err()
                .code(),
            "too_many_webhooks"
        );
        assert!(n.register("bob", "https://hooks.example.com/b").is_ok());
    }

    #[tokio::test]
    async fn a_name_that_resolves_to_loopback_gets_no_connection() {
        use reqwest::dns::Resolve;
        let name: reqwest::dns::Name = "localhost".parse().unwrap();
        let refused = PublicOnly.resolve(name).await;
        assert!(refused.is_err(), "localhost resolves to loopback only");
    }

    #[test]
    fn the_dead_letter_store_keeps_the_newest_within_its_bound() {
        let n = Notifier::new(RetryPolicy::default(), WebhookPolicy::default());
        let hook = n.register("alice", "https://hooks.example.com/a").unwrap();
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
            n.bury(&event(i), &hook, 1, "down".into());
        }
        let stats = n.stats();
        assert_eq!(stats.dlq_size, MAX_DEAD_LETTERS as u64);
        assert_eq!(stats.dead_letters_dropped, 5);
        let kept = n.dead_letters();
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
