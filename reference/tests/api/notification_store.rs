//! The notification service's durable state: one store suite run on both
//! backends (SQLite in a temporary directory, MySQL in a fresh database);
//! two notifier replicas over one store deliver each (event, webhook) once
//! to a receiver that counts; a claim whose holder died is delivered by
//! another replica, a live one is not; a delivery cut by shutdown is let
//! go and made by another replica; the consumer commits its position only
//! once the events' deliveries are recorded; and webhooks and dead letters
//! outlive a restart of the service.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use serde_json::{json, Value};
use shardpay_reference::app::{self, ServeConfig};
use shardpay_reference::events::{Event, EventBus, InProcessBus, Subscription, PAYMENT_EVENTS};
use shardpay_reference::ledger::mysql::MysqlConfig;
use shardpay_reference::ledger::{now_ms, TimestampMs};
use shardpay_reference::notification::store::{
    Added, Claim, Lease, LetterClaim, MysqlNotifications, NotificationStore, SqliteNotifications,
    StoreError, StoredCounts, StoredHook,
};
use shardpay_reference::notification::{
    verify, DeadLetter, NotificationStats, Notifier, NotifierConfig, RetryPolicy, Webhook,
    WebhookPolicy, NOTIFICATION_GROUP,
};

use crate::auth_users::FreshDatabase;
use crate::support::{eventually, mysql_server};

/// A webhook receiver that checks every signature and counts arrivals and
/// 2xx answers per (hook, event id). It answers 500 while `failing`, and
/// never answers the first arrival of an event while `hang_first`.
#[derive(Default)]
struct Counting {
    secrets: Mutex<HashMap<String, String>>,
    arrivals: Mutex<HashMap<(String, String), u64>>,
    accepted: Mutex<HashMap<(String, String), u64>>,
    failing: AtomicBool,
    hang_first: AtomicBool,
    bad_signatures: AtomicU64,
}

async fn count(
    State(r): State<Arc<Counting>>,
    UrlPath(hook): UrlPath<String>,
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
    let secret = r.secrets.lock().unwrap().get(&hook).cloned();
    let now = now_ms() / 1000;
    let signed = secret.is_some_and(|secret| {
        verify(
            &secret,
            &header("shardpay-timestamp"),
            &header("shardpay-signature"),
            &body,
            now,
        )
    });
    if !signed {
        r.bad_signatures.fetch_add(1, Ordering::SeqCst);
        return StatusCode::UNAUTHORIZED;
    }
    let key = (hook, header("shardpay-event-id"));
    let arrival = {
        let mut arrivals = r.arrivals.lock().unwrap();
        let n = arrivals.entry(key.clone()).or_insert(0);
        *n += 1;
        *n
    };
    if r.hang_first.load(Ordering::SeqCst) && arrival == 1 {
        std::future::pending::<()>().await;
    }
    if r.failing.load(Ordering::SeqCst) {
        return StatusCode::INTERNAL_SERVER_ERROR;
    }
    *r.accepted.lock().unwrap().entry(key).or_insert(0) += 1;
    StatusCode::OK
}

impl Counting {
    /// Starts a receiver; answers it and the base of its hook URLs
    /// (`<base>/<name>`).
    async fn start() -> (Arc<Counting>, String) {
        let receiver = Arc::new(Counting::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}/hook", listener.local_addr().unwrap());
        let router = axum::Router::new()
            .route("/hook/{name}", axum::routing::post(count))
            .with_state(Arc::clone(&receiver));
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        (receiver, base)
    }

    /// Registers a webhook named `name` for `account` through `notifier`.
    async fn hook(&self, notifier: &Notifier, base: &str, account: &str, name: &str) -> Webhook {
        let hook = notifier
            .register(account, &format!("{base}/{name}"))
            .await
            .unwrap();
        let secret = hook.secret.clone().unwrap();
        self.secrets
            .lock()
            .unwrap()
            .insert(name.to_string(), secret);
        hook
    }

    fn arrivals(&self) -> HashMap<(String, String), u64> {
        self.arrivals.lock().unwrap().clone()
    }

    fn accepted(&self) -> HashMap<(String, String), u64> {
        self.accepted.lock().unwrap().clone()
    }

    fn arrivals_of(&self, hook: &str, event: &str) -> u64 {
        let key = (hook.to_string(), event.to_string());
        self.arrivals().get(&key).copied().unwrap_or(0)
    }
}

/// Deliveries to loopback, quick retries, sweeps every 20 ms.
fn fast() -> NotifierConfig {
    NotifierConfig {
        retry: RetryPolicy {
            attempts: 2,
            base_delay_ms: 10,
            max_delay_ms: 20,
            timeout_ms: 60_000,
        },
        webhooks: WebhookPolicy {
            allow_private: true,
        },
        lease_ms: 30_000,
        sweep_interval_ms: 20,
    }
}

/// An outbox event of a transfer between two accounts.
fn event(id: &str, from: &str, to: &str) -> Event {
    Event {
        id: id.into(),
        event_type: "transfer.completed".into(),
        key: format!("tr_{id}"),
        shard: Some(0),
        payload: json!({"from": from, "to": to, "amount_minor": 100}).to_string(),
        created_at_ms: 0,
        position: None,
    }
}

fn lease(owner: &str, until_ms: TimestampMs) -> Lease {
    Lease {
        owner: owner.into(),
        until_ms,
    }
}

fn stored_hook(account: &str, n: usize) -> StoredHook {
    StoredHook {
        webhook: Webhook {
            id: format!("wh_{account}_{n}"),
            account: account.into(),
            url: format!("https://hooks.example.com/{account}/{n}"),
            secret: None,
        },
        secret: format!("whsec_{account}_{n}"),
    }
}

fn sqlite_store(path: &Path) -> Arc<dyn NotificationStore> {
    Arc::new(SqliteNotifications::open(Some(path)).unwrap())
}

async fn mysql_store(url: &str) -> Arc<dyn NotificationStore> {
    Arc::new(
        MysqlNotifications::connect(url, &MysqlConfig::default())
            .await
            .unwrap(),
    )
}

/// Registrations: five per account, in order, with their secrets.
async fn registrations(store: &dyn NotificationStore) {
    for n in 0..5 {
        let added = store.add_webhook(&stored_hook("alice", n)).await.unwrap();
        assert_eq!(added, Added::Added);
    }
    let sixth = store.add_webhook(&stored_hook("alice", 5)).await.unwrap();
    assert_eq!(sixth, Added::AccountFull);
    assert_eq!(
        store.add_webhook(&stored_hook("bob", 0)).await.unwrap(),
        Added::Added
    );
    let alice = store.webhooks_of(&["alice".into()]).await.unwrap();
    let ids: Vec<&str> = alice.iter().map(|h| h.webhook.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "wh_alice_0",
            "wh_alice_1",
            "wh_alice_2",
            "wh_alice_3",
            "wh_alice_4"
        ]
    );
    assert_eq!(alice[2], stored_hook("alice", 2));
    let all = store
        .webhooks_of(&["alice".into(), "bob".into(), "carol".into()])
        .await
        .unwrap();
    assert_eq!(all.len(), 6);
    assert_eq!(
        store.webhook("wh_bob_0").await.unwrap(),
        Some(stored_hook("bob", 0))
    );
    assert_eq!(store.webhook("wh_nobody").await.unwrap(), None);
}

/// Applying events and claiming their deliveries: once per event; a live
/// claim is its holder's; a lapsed one is taken over by one replica,
/// whose record counts and the old holder's does not.
async fn claims(store: &dyn NotificationStore, now: TimestampMs) {
    let e1 = event("e1", "bob", "alice");
    let hooks = vec!["wh_alice_0".to_string(), "wh_bob_0".to_string()];
    let a = lease("replica-a", now + 60_000);
    let b = lease("replica-b", now + 60_000);
    assert_eq!(
        store.apply(&e1, &hooks, &a).await.unwrap(),
        Some(hooks.clone())
    );
    assert_eq!(
        store.apply(&e1, &hooks, &b).await.unwrap(),
        None,
        "an event is applied once"
    );
    let applied = store.applied(&["e1".into(), "e2".into()]).await.unwrap();
    assert_eq!(applied, ["e1"]);
    assert!(store.renew("e1", "wh_alice_0", &a).await.unwrap());
    assert!(!store.renew("e1", "wh_alice_0", &b).await.unwrap());
    assert!(store.take_expired(&b, now, 100).await.unwrap().is_empty());

    let e2 = event("e2", "bob", "alice");
    let died = lease("replica-a", now - 1);
    store
        .apply(&e2, &["wh_alice_1".into()], &died)
        .await
        .unwrap();
    let taken = store.take_expired(&b, now, 100).await.unwrap();
    let expected = Claim {
        event: e2.clone(),
        webhook_id: "wh_alice_1".into(),
        attempts: 0,
    };
    assert_eq!(taken, [expected]);
    let c = lease("replica-c", now + 60_000);
    assert!(
        store.take_expired(&c, now, 100).await.unwrap().is_empty(),
        "taken over once"
    );
    assert!(!store
        .mark_delivered("e2", "wh_alice_1", "replica-a", 1)
        .await
        .unwrap());
    assert!(store
        .mark_delivered("e2", "wh_alice_1", "replica-b", 1)
        .await
        .unwrap());
    assert!(
        !store
            .mark_delivered("e2", "wh_alice_1", "replica-b", 1)
            .await
            .unwrap(),
        "delivered once"
    );
    assert!(!store.renew("e2", "wh_alice_1", &b).await.unwrap());
}

/// Dead letters: buried by the claim's holder only, claimed by one replay
/// at a time, put back when the replay fails, recognised once delivered.
async fn dead_letters(store: &dyn NotificationStore, now: TimestampMs) {
    let letter = DeadLetter {
        id: "dl_1".into(),
        event_id: "e1".into(),
        event_type: "transfer.completed".into(),
        webhook_id: "wh_bob_0".into(),
        url: "https://hooks.example.com/bob/0".into(),
        attempts: 5,
        last_error: "answered 500 Internal Server Error".into(),
        failed_at_ms: now,
    };
    assert!(!store.bury(&letter, "replica-b").await.unwrap());
    assert!(store.bury(&letter, "replica-a").await.unwrap());
    assert_eq!(store.dead_letters().await.unwrap(), [letter.clone()]);
    let r = lease("replayer", now + 60_000);
    let claim = Claim {
        event: event("e1", "bob", "alice"),
        webhook_id: "wh_bob_0".into(),
        attempts: 5,
    };
    assert_eq!(
        store.claim_letter("dl_1", &r).await.unwrap(),
        LetterClaim::Claimed(claim)
    );
    assert_eq!(
        store.claim_letter("dl_1", &r).await.unwrap(),
        LetterClaim::Busy
    );
    assert!(store.dead_letters().await.unwrap().is_empty());
    store
        .return_letter("e1", "wh_bob_0", "replayer", "answered 503")
        .await
        .unwrap();
    let back = store.dead_letters().await.unwrap();
    assert_eq!(
        (back[0].attempts, back[0].last_error.as_str()),
        (6, "answered 503")
    );
    let LetterClaim::Claimed(claim) = store.claim_letter("dl_1", &r).await.unwrap() else {
        panic!("a letter put back can be claimed again");
    };
    assert!(store
        .mark_delivered("e1", "wh_bob_0", "replayer", claim.attempts + 1)
        .await
        .unwrap());
    assert_eq!(
        store.claim_letter("dl_1", &r).await.unwrap(),
        LetterClaim::Delivered
    );
    assert_eq!(
        store.claim_letter("dl_nope", &r).await.unwrap(),
        LetterClaim::NotFound
    );
}

/// Of concurrent applications of one event, concurrent take-overs of one
/// lapsed claim and concurrent registrations for one account, exactly one,
/// one and five win.
async fn races(store: Arc<dyn NotificationStore>, now: TimestampMs) {
    let race = event("race", "bob", "alice");
    let applies: Vec<_> = (0..8)
        .map(|i| {
            let (store, race) = (Arc::clone(&store), race.clone());
            tokio::spawn(async move {
                let died = lease(&format!("r{i}"), now - 1);
                store
                    .apply(&race, &["wh_alice_3".into()], &died)
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut winners = 0;
    for apply in applies {
        winners += apply.await.unwrap().is_some() as usize;
    }
    assert_eq!(winners, 1);
    let takes: Vec<_> = (0..8)
        .map(|i| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                let live = lease(&format!("s{i}"), now + 60_000);
                store.take_expired(&live, now, 100).await.unwrap().len()
            })
        })
        .collect();
    let mut taken = 0;
    for take in takes {
        taken += take.await.unwrap();
    }
    assert_eq!(taken, 1, "a lapsed claim is taken over once");
    let adds: Vec<_> = (0..12)
        .map(|n| {
            let store = Arc::clone(&store);
            tokio::spawn(async move { store.add_webhook(&stored_hook("dora", n)).await.unwrap() })
        })
        .collect();
    let mut added = 0;
    for add in adds {
        added += (add.await.unwrap() == Added::Added) as usize;
    }
    assert_eq!(added, 5);
    let dora = store.webhooks_of(&["dora".into()]).await.unwrap();
    assert_eq!(dora.len(), 5);
}

async fn store_suite(store: Arc<dyn NotificationStore>) {
    let now = now_ms();
    registrations(store.as_ref()).await;
    claims(store.as_ref(), now).await;
    dead_letters(store.as_ref(), now).await;
    // Letting go: the holder's claims lapse at once, and another replica
    // takes them (e1 to wh_alice_0).
    assert_eq!(store.release("replica-a").await.unwrap(), 1);
    let b = lease("replica-b", now + 60_000);
    let taken = store.take_expired(&b, now, 100).await.unwrap();
    assert_eq!(taken.len(), 1);
    assert_eq!(
        (taken[0].event.id.as_str(), taken[0].webhook_id.as_str()),
        ("e1", "wh_alice_0")
    );
    assert_eq!(
        store.counts().await.unwrap(),
        StoredCounts {
            events_applied: 2,
            outbox_applied: 2,
            delivered: 2,
            dead_lettered: 1,
            dead_letters: 0,
            dead_letters_dropped: 0,
            claimed: 1,
        }
    );
    races(store, now).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_notification_store_passes_the_store_suite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sqlite");
    let store = sqlite_store(&path);
    store_suite(Arc::clone(&store)).await;
    // The counters the stats read are kept, not counted again, when the
    // store is opened a second time.
    let counts = store.counts().await.unwrap();
    assert!(counts.events_applied > 0, "{counts:?}");
    drop(store);
    assert_eq!(sqlite_store(&path).counts().await.unwrap(), counts);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mysql_notification_store_passes_the_store_suite() {
    let Some(server) = mysql_server() else { return };
    let database = FreshDatabase::new(&server);
    let store = mysql_store(&database.url()).await;
    store_suite(Arc::clone(&store)).await;
    let counts = store.counts().await.unwrap();
    assert!(counts.events_applied > 0, "{counts:?}");
    // A second replica opening the store (creating what is missing) counts
    // nothing again.
    let again = mysql_store(&database.url()).await;
    assert_eq!(again.counts().await.unwrap(), counts);
}

/// Two stores over the same state, as two processes would open it.
enum Shared {
    Sqlite(tempfile::TempDir),
    Mysql(FreshDatabase),
}

impl Shared {
    /// SQLite (a file in a fresh directory), or MySQL (a fresh database)
    /// when the test server is there: `None` then means skip.
    fn new(mysql: bool) -> Option<Shared> {
        if !mysql {
            return Some(Shared::Sqlite(tempfile::tempdir().unwrap()));
        }
        mysql_server().map(|server| Shared::Mysql(FreshDatabase::new(&server)))
    }

    /// A store of its own (its own connections) over the shared state.
    async fn open(&self) -> Arc<dyn NotificationStore> {
        match self {
            Shared::Sqlite(dir) => sqlite_store(&dir.path().join("notify.sqlite")),
            Shared::Mysql(database) => mysql_store(&database.url()).await,
        }
    }
}

/// Two replicas both read every event (the worst a consumer group's
/// rebalance can do): the receiver gets each (event, webhook) once, and
/// both replicas answer the same figures.
async fn two_replicas_deliver_each_pair_once(mysql: bool) {
    let Some(shared) = Shared::new(mysql) else {
        return;
    };
    let (receiver, base) = Counting::start().await;
    let one = Arc::new(Notifier::new(shared.open().await, fast()));
    let two = Arc::new(Notifier::new(shared.open().await, fast()));
    let accounts = ["ann", "ben", "cat"];
    for (i, account) in accounts.iter().enumerate() {
        for n in 0..2 {
            let via = if (i + n) % 2 == 0 { &one } else { &two };
            receiver
                .hook(via, &base, account, &format!("{account}-{n}"))
                .await;
        }
    }
    let bus = InProcessBus::default();
    // A group each: both read every event. (In one group of the in-process
    // bus, the first replica's commit would let go of events the second
    // has not read yet: that bus serves one process.)
    for (replica, group) in [(&one, "a"), (&two, "b")] {
        let subscription = bus
            .subscribe(PAYMENT_EVENTS, &format!("{NOTIFICATION_GROUP}-{group}"))
            .await
            .unwrap();
        replica.start(vec![subscription]);
    }
    let events: Vec<Event> = (0..60)
        .map(|i| event(&format!("ev{i}"), accounts[i % 3], accounts[(i + 1) % 3]))
        .collect();
    for chunk in events.chunks(7) {
        bus.publish(PAYMENT_EVENTS, chunk).await.unwrap();
    }
    // Each event concerns two accounts of two webhooks each.
    let expected = 60 * 4;
    eventually("every delivery to be recorded", || async {
        one.stats().await.unwrap().delivered == expected as u64
    })
    .await;
    let arrivals = receiver.arrivals();
    assert_eq!(arrivals.len(), expected);
    let repeated: Vec<_> = arrivals.iter().filter(|(_, n)| **n != 1).collect();
    assert!(repeated.is_empty(), "sent more than once: {repeated:?}");
    assert_eq!(receiver.bad_signatures.load(Ordering::SeqCst), 0);
    // Each replica read every event: it applied it, or found it applied.
    let taken = |s: &NotificationStats| s.logged + s.duplicates_suppressed;
    eventually("both replicas to have taken every event", || async {
        let (s1, s2) = (one.stats().await.unwrap(), two.stats().await.unwrap());
        taken(&s1) == 60 && taken(&s2) == 60
    })
    .await;
    let (s1, s2) = (one.stats().await.unwrap(), two.stats().await.unwrap());
    assert_eq!(s1.logged + s2.logged, 60, "each event applied once");
    let state =
        |s: &NotificationStats| (s.events_applied, s.outbox_applied, s.delivered, s.dlq_size);
    assert_eq!(state(&s1), (60, 60, expected as u64, 0));
    assert_eq!(state(&s1), state(&s2), "both replicas answer the same");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    assert_eq!(one.shutdown(deadline).await, 0, "nothing left to let go");
    assert_eq!(two.shutdown(deadline).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_notifier_replicas_on_sqlite_deliver_each_event_to_each_webhook_once() {
    two_replicas_deliver_each_pair_once(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_notifier_replicas_on_mysql_deliver_each_event_to_each_webhook_once() {
    two_replicas_deliver_each_pair_once(true).await;
}

/// A replica died holding a claim, whose lease has ended: another
/// replica's sweep takes it and delivers it, once. A claim whose lease
/// is live stays its holder's.
async fn a_lapsed_claim_is_delivered_by_another_replica(mysql: bool) {
    let Some(shared) = Shared::new(mysql) else {
        return;
    };
    let (receiver, base) = Counting::start().await;
    let (elsewhere, here) = (shared.open().await, shared.open().await);
    // Sweeps by hand only.
    let config = NotifierConfig {
        sweep_interval_ms: 3_600_000,
        ..fast()
    };
    let live = Arc::new(Notifier::new(here, config));
    let hook = receiver.hook(&live, &base, "eve", "eve").await;
    let now = now_ms();
    let hooks = [hook.id.clone()];
    let died = lease("replica-that-died", now - 1);
    let alive = lease("replica-still-sending", now + 600_000);
    let claimed = elsewhere
        .apply(&event("died", "zed", "eve"), &hooks, &died)
        .await
        .unwrap();
    assert_eq!(claimed.as_deref(), Some(&hooks[..]));
    elsewhere
        .apply(&event("alive", "zed", "eve"), &hooks, &alive)
        .await
        .unwrap();
    assert_eq!(live.sweep_once().await.unwrap(), 1);
    eventually("the lapsed delivery to be made", || async {
        live.stats().await.unwrap().delivered == 1
    })
    .await;
    assert_eq!(live.sweep_once().await.unwrap(), 0);
    assert_eq!(receiver.arrivals_of("eve", "died"), 1);
    assert_eq!(
        receiver.arrivals_of("eve", "alive"),
        0,
        "a live claim is left to its holder"
    );
    let stats = live.stats().await.unwrap();
    assert_eq!((stats.delivered, stats.deliveries_queued), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_claim_whose_holder_died_is_delivered_by_another_replica_on_sqlite() {
    a_lapsed_claim_is_delivered_by_another_replica(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_claim_whose_holder_died_is_delivered_by_another_replica_on_mysql() {
    a_lapsed_claim_is_delivered_by_another_replica(true).await;
}

/// Shutdown's deadline passes with a delivery still waiting for its
/// receiver: the replica lets its claim go, and another takes it at once
/// and makes it.
async fn a_delivery_cut_by_shutdown_is_handed_over(mysql: bool) {
    let Some(shared) = Shared::new(mysql) else {
        return;
    };
    let (receiver, base) = Counting::start().await;
    receiver.hang_first.store(true, Ordering::SeqCst);
    let stopping = Arc::new(Notifier::new(shared.open().await, fast()));
    let config = NotifierConfig {
        sweep_interval_ms: 3_600_000,
        ..fast()
    };
    let other = Arc::new(Notifier::new(shared.open().await, config));
    receiver.hook(&stopping, &base, "fay", "fay").await;
    stopping.apply(&event("cut", "zed", "fay")).await.unwrap();
    eventually("the delivery to reach the receiver", || async {
        receiver.arrivals_of("fay", "cut") == 1
    })
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(100);
    assert_eq!(stopping.shutdown(deadline).await, 1, "one claim let go");
    assert_eq!(other.sweep_once().await.unwrap(), 1, "taken at once");
    eventually("the other replica to make the delivery", || async {
        other.stats().await.unwrap().delivered == 1
    })
    .await;
    // The cut send and the one that was answered carry the same event id.
    assert_eq!(receiver.arrivals_of("fay", "cut"), 2);
    let accepted = receiver.accepted();
    assert_eq!(accepted.get(&("fay".into(), "cut".into())), Some(&1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_delivery_cut_by_shutdown_is_let_go_and_made_by_another_replica_on_sqlite() {
    a_delivery_cut_by_shutdown_is_handed_over(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_delivery_cut_by_shutdown_is_let_go_and_made_by_another_replica_on_mysql() {
    a_delivery_cut_by_shutdown_is_handed_over(true).await;
}

/// A store whose `apply` can be made to fail, around a real one.
struct Failing {
    inner: Arc<dyn NotificationStore>,
    down: AtomicBool,
    refused: AtomicU64,
}

#[async_trait]
impl NotificationStore for Failing {
    async fn add_webhook(&self, hook: &StoredHook) -> Result<Added, StoreError> {
        self.inner.add_webhook(hook).await
    }
    async fn webhooks_of(&self, accounts: &[String]) -> Result<Vec<StoredHook>, StoreError> {
        self.inner.webhooks_of(accounts).await
    }
    async fn webhook(&self, id: &str) -> Result<Option<StoredHook>, StoreError> {
        self.inner.webhook(id).await
    }
    async fn apply(
        &self,
        event: &Event,
        webhooks: &[String],
        lease: &Lease,
    ) -> Result<Option<Vec<String>>, StoreError> {
        if self.down.load(Ordering::SeqCst) {
            self.refused.fetch_add(1, Ordering::SeqCst);
            return Err(StoreError("taken down by the test".into()));
        }
        self.inner.apply(event, webhooks, lease).await
    }
    async fn applied(&self, ids: &[String]) -> Result<Vec<String>, StoreError> {
        self.inner.applied(ids).await
    }
    async fn renew(&self, e: &str, w: &str, lease: &Lease) -> Result<bool, StoreError> {
        self.inner.renew(e, w, lease).await
    }
    async fn mark_delivered(
        &self,
        e: &str,
        w: &str,
        owner: &str,
        attempts: u32,
    ) -> Result<bool, StoreError> {
        self.inner.mark_delivered(e, w, owner, attempts).await
    }
    async fn bury(&self, letter: &DeadLetter, owner: &str) -> Result<bool, StoreError> {
        self.inner.bury(letter, owner).await
    }
    async fn take_expired(
        &self,
        lease: &Lease,
        now_ms: TimestampMs,
        limit: u32,
    ) -> Result<Vec<Claim>, StoreError> {
        self.inner.take_expired(lease, now_ms, limit).await
    }
    async fn release(&self, owner: &str) -> Result<u64, StoreError> {
        self.inner.release(owner).await
    }
    async fn dead_letters(&self) -> Result<Vec<DeadLetter>, StoreError> {
        self.inner.dead_letters().await
    }
    async fn claim_letter(&self, id: &str, lease: &Lease) -> Result<LetterClaim, StoreError> {
        self.inner.claim_letter(id, lease).await
    }
    async fn return_letter(
        &self,
        e: &str,
        w: &str,
        owner: &str,
        error: &str,
    ) -> Result<(), StoreError> {
        self.inner.return_letter(e, w, owner, error).await
    }
    async fn counts(&self) -> Result<StoredCounts, StoreError> {
        self.inner.counts().await
    }
}

/// What the store held when the consumer committed.
type AtCommit = Arc<Mutex<Vec<(usize, StoredCounts)>>>;

/// One batch of events, then nothing; each commit notes what the store
/// holds of the batch at that moment.
struct OneBatch {
    batch: Option<Vec<Event>>,
    ids: Vec<String>,
    store: Arc<dyn NotificationStore>,
    commits: AtCommit,
}

#[async_trait]
impl Subscription for OneBatch {
    async fn poll(&mut self, _max: usize, wait: Duration) -> anyhow::Result<Vec<Event>> {
        match self.batch.take() {
            Some(batch) => Ok(batch),
            None => {
                tokio::time::sleep(wait).await;
                Ok(Vec::new())
            }
        }
    }

    async fn commit(&mut self) -> anyhow::Result<()> {
        let applied = self.store.applied(&self.ids).await?.len();
        let counts = self.store.counts().await?;
        self.commits.lock().unwrap().push((applied, counts));
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_consumer_commits_its_position_only_after_the_deliveries_are_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let failing = Arc::new(Failing {
        inner: sqlite_store(&dir.path().join("notify.sqlite")),
        down: AtomicBool::new(true),
        refused: AtomicU64::new(0),
    });
    let store: Arc<dyn NotificationStore> = Arc::clone(&failing) as _;
    let notifier = Arc::new(Notifier::new(Arc::clone(&store), fast()));
    let (receiver, base) = Counting::start().await;
    receiver.hook(&notifier, &base, "gil", "gil-0").await;
    receiver.hook(&notifier, &base, "gil", "gil-1").await;
    let batch: Vec<Event> = (0..10)
        .map(|i| event(&format!("c{i}"), "zed", "gil"))
        .collect();
    let commits: AtCommit = Arc::default();
    notifier.start(vec![Box::new(OneBatch {
        ids: batch.iter().map(|e| e.id.clone()).collect(),
        batch: Some(batch),
        store,
        commits: Arc::clone(&commits),
    })]);
    eventually("the consumer to try the failing store again", || async {
        failing.refused.load(Ordering::SeqCst) >= 3
    })
    .await;
    assert!(
        commits.lock().unwrap().is_empty(),
        "committed past events whose deliveries are not recorded"
    );
    assert!(receiver.arrivals().is_empty());
    failing.down.store(false, Ordering::SeqCst);
    eventually("the consumer to commit", || async {
        !commits.lock().unwrap().is_empty()
    })
    .await;
    let (applied, counts) = commits.lock().unwrap()[0];
    assert_eq!(applied, 10, "every event of the batch recorded first");
    assert_eq!(
        counts.claimed + counts.delivered + counts.dead_letters,
        20,
        "and every delivery of it: {counts:?}"
    );
    eventually("the deliveries to be made", || async {
        notifier.stats().await.unwrap().delivered == 20
    })
    .await;
    assert_eq!(receiver.arrivals().len(), 20);
}

/// The reference system as `shardpay serve` builds it, serving on a
/// free port until told to stop.
struct Served {
    url: String,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Served {
    async fn start(dir: &Path, notification_mysql_url: Option<String>) -> Served {
        let mut config = ServeConfig::new(dir);
        config.bind = "127.0.0.1:0".parse().unwrap();
        config.webhooks.allow_private = true;
        config.notification_mysql_url = notification_mysql_url;
        let app = app::build(config).await.unwrap();
        let url = format!("http://{}", app.addr);
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(app.run_until(async {
            let _ = stopped.await;
        }));
        Served { url, stop, task }
    }

    async fn stop(self) {
        self.stop.send(()).unwrap();
        self.task.await.unwrap().unwrap();
    }

    async fn get(&self, path: &str) -> Value {
        let response = reqwest::get(format!("{}{path}", self.url)).await.unwrap();
        assert!(response.status().is_success(), "{path}");
        response.json().await.unwrap()
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let response = reqwest::Client::new()
            .post(format!("{}{path}", self.url))
            .header("Idempotency-Key", uuid::Uuid::new_v4().to_string())
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap())
    }

    async fn pay(&self, from: &str, to: &str) {
        let body = json!({"from": from, "to": to, "amount": "1.00"});
        let (status, answer) = self.post("/v1/transfers", body).await;
        assert_eq!(status, 201, "{answer}");
    }

    async fn pipeline_complete(&self) {
        eventually("the event pipeline to complete", || async {
            self.get("/v1/pipeline").await["complete"] == true
        })
        .await;
    }
}

/// Two accounts on one shard of four.
fn same_shard_pair(prefix: &str) -> (String, String) {
    let ring = shardpay_reference::sharding::Ring::new(4).unwrap();
    let first = format!("{prefix}_0");
    let second = (1..)
        .map(|i| format!("{prefix}_{i}"))
        .find(|id| ring.shard_of_key(id) == ring.shard_of_key(&first))
        .unwrap();
    (first, second)
}

/// A failing receiver fills the dead-letter store; the service stops and
/// starts again over the same state; the letters are still there, the
/// webhook still delivers, and a replay delivers each letter once.
async fn webhooks_and_dead_letters_survive_a_restart(mysql: bool) {
    let database = match mysql {
        false => None,
        true => match mysql_server() {
            Some(server) => Some(FreshDatabase::new(&server)),
            None => return,
        },
    };
    let url = database.as_ref().map(FreshDatabase::url);
    let dir = tempfile::tempdir().unwrap();
    let (receiver, base) = Counting::start().await;
    receiver.failing.store(true, Ordering::SeqCst);
    let (payer, payee) = same_shard_pair("rs");
    let first = Served::start(dir.path(), url.clone()).await;
    for (id, opening) in [(&payer, "100.00"), (&payee, "0")] {
        let body = json!({"id": id, "opening_balance": opening});
        let (status, answer) = first.post("/v1/accounts", body).await;
        assert_eq!(status, 201, "{answer}");
    }
    first.pipeline_complete().await;
    let body = json!({"account": payee, "url": format!("{base}/payee")});
    let (status, hook) = first.post("/v1/webhooks", body).await;
    assert_eq!(status, 201, "{hook}");
    let secret = hook["secret"].as_str().unwrap().to_string();
    receiver
        .secrets
        .lock()
        .unwrap()
        .insert("payee".into(), secret);
    // transfer.completed and fraud.scored, both about the payee.
    first.pay(&payer, &payee).await;
    eventually("two deliveries to fail every attempt", || async {
        first.get("/v1/dlq").await["dead_letters"]
            .as_array()
            .map_or(0, Vec::len)
            == 2
    })
    .await;
    let letters = first.get("/v1/dlq").await;
    first.stop().await;

    let second = Served::start(dir.path(), url).await;
    assert_eq!(
        second.get("/v1/dlq").await,
        letters,
        "the letters outlive the restart"
    );
    receiver.failing.store(false, Ordering::SeqCst);
    second.pay(&payer, &payee).await;
    eventually(
        "the webhook registered before the restart to deliver",
        || async { receiver.accepted().len() == 2 },
    )
    .await;
    let (status, outcome) = second.post("/v1/dlq/replay", json!({"all": true})).await;
    assert_eq!(status, 200, "{outcome}");
    assert_eq!(outcome["delivered"], 2, "{outcome}");
    let accepted = receiver.accepted();
    assert_eq!(accepted.len(), 4, "{accepted:?}");
    assert!(accepted.values().all(|n| *n == 1), "{accepted:?}");
    assert_eq!(receiver.bad_signatures.load(Ordering::SeqCst), 0);
    second.pipeline_complete().await;
    let stats = &second.get("/v1/pipeline").await["notification"];
    assert_eq!(
        (
            &stats["delivered"],
            &stats["dead_lettered"],
            &stats["dlq_size"]
        ),
        (&json!(4), &json!(2), &json!(0)),
        "{stats}"
    );
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn webhooks_and_dead_letters_survive_a_restart_on_sqlite() {
    webhooks_and_dead_letters_survive_a_restart(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn webhooks_and_dead_letters_survive_a_restart_on_mysql() {
    webhooks_and_dead_letters_survive_a_restart(true).await;
}
