//! What every service knows of the deployment it is part of: which
//! service a process runs, where the others answer, and the request id
//! that follows a payment through every service's calls to the others.
//!
//! This sits below the services, so a service that calls another takes
//! what it needs from here, never from the application's assembly (`app`)
//! or the HTTP layer (`http`).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

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

/// Where the other services of a split deployment answer: each one as
/// the list of its replicas' URLs.
#[derive(Debug, Clone)]
pub struct Peers {
    pub auth: Replicas,
    pub ledger: Replicas,
    pub fraud: Replicas,
    pub notification: Replicas,
}

impl Default for Peers {
    fn default() -> Peers {
        let at = |s: Service| Replicas::one(&format!("http://127.0.0.1:{}", s.default_port()));
        Peers {
            auth: at(Service::Auth),
            ledger: at(Service::Ledger),
            fraud: at(Service::Fraud),
            notification: at(Service::Notification),
        }
    }
}

/// Replicas one peer list may name: more than a deployment runs of one
/// service, few enough that a request trying each in turn stays short.
pub const MAX_REPLICAS: usize = 16;
/// How long a replica that refused a connection is tried after the others.
const DOWN_FOR_MS: u64 = 1_000;
/// How long a call waits, trying again, while every replica refuses
/// connections: a service restarting on its port (a deploy, a crash and
/// its supervisor) is back within this, and a call refused was never sent,
/// so trying it again cannot do its work twice. A service down for longer
/// fails the call after this wait.
pub const RESTART_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
/// The pause between two tries while every replica refuses.
const REFUSED_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);

/// A peer list that cannot be used, said at start.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PeerListError {
    #[error("names no URL; give one, or several separated by commas")]
    Empty,
    #[error("names {0} URLs; at most {MAX_REPLICAS}")]
    TooMany(usize),
    #[error("{0:?} is not an http:// or https:// URL")]
    NotHttp(String),
}

/// A call that no replica answered.
#[derive(Debug, thiserror::Error)]
#[error("{url} does not answer: {source}")]
pub struct PeerDown {
    /// The last replica tried.
    pub url: String,
    #[source]
    pub source: reqwest::Error,
}

/// The replicas of one service, called in turn (round robin). A call that
/// cannot connect to one replica goes to the next, so a replica that is
/// down fails no call while another is up; a call that got an HTTP answer,
/// or failed after it was sent, is never sent again here (it may have
/// done its work). Clones share the turn and what is known to be down.
#[derive(Debug, Clone)]
pub struct Replicas {
    urls: std::sync::Arc<[String]>,
    next: std::sync::Arc<AtomicUsize>,
    /// Per replica: until when (ms since `epoch`) it is tried last.
    down_until_ms: std::sync::Arc<[AtomicU64]>,
    epoch: std::time::Instant,
}

impl Replicas {
    /// Parses `http://a:8003,http://b:8003` (one URL is a list of one);
    /// trailing slashes are dropped.
    pub fn parse(list: &str) -> Result<Replicas, PeerListError> {
        let urls: Vec<String> = list
            .split(',')
            .map(|u| u.trim().trim_end_matches('/'))
            .filter(|u| !u.is_empty())
            .map(str::to_string)
            .collect();
        if urls.is_empty() {
            return Err(PeerListError::Empty);
        }
        if urls.len() > MAX_REPLICAS {
            return Err(PeerListError::TooMany(urls.len()));
        }
        if let Some(bad) = urls
            .iter()
            .find(|u| !(u.starts_with("http://") || u.starts_with("https://")))
        {
            return Err(PeerListError::NotHttp(bad.clone()));
        }
        let down_until_ms = urls.iter().map(|_| AtomicU64::new(0)).collect();
        Ok(Replicas {
            urls: urls.into(),
            next: Default::default(),
            down_until_ms,
            epoch: std::time::Instant::now(),
        })
    }

    /// One replica at `url`, a URL the code itself made.
    pub fn one(url: &str) -> Replicas {
        Replicas::parse(url).expect("a URL made by the code is a peer list of one")
    }

    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    /// The list as it was given (comma-separated).
    pub fn list(&self) -> String {
        self.urls.join(",")
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// The replicas in the order one call tries them, by index and URL:
    /// from the next in turn, those that recently refused a connection
    /// last.
    pub fn turn(&self) -> Vec<(usize, &str)> {
        let n = self.urls.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let now = self.now_ms();
        let mut order: Vec<usize> = (0..n).map(|i| (start + i) % n).collect();
        order.sort_by_key(|&i| self.down_until_ms[i].load(Ordering::Relaxed) > now);
        order
            .into_iter()
            .map(|i| (i, self.urls[i].as_str()))
            .collect()
    }

    /// Replica `index` refused a connection: calls try it after the others
    /// for a while.
    pub fn refused(&self, index: usize) {
        let until = self.now_ms() + DOWN_FOR_MS;
        self.down_until_ms[index].store(until, Ordering::Relaxed);
    }

    /// Sends the request `build` makes for the full URL of `path` on a
    /// replica, trying the next one while a replica cannot be connected to;
    /// while none can, tries again for up to [`RESTART_WAIT`].
    pub async fn send(
        &self,
        path: &str,
        build: impl Fn(&str) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, PeerDown> {
        self.send_waiting(path, build, RESTART_WAIT).await
    }

    /// As [`Replicas::send`], waiting at most `wait` while every replica
    /// refuses (zero: one pass over the replicas, as a readiness probe
    /// wants).
    pub async fn send_waiting(
        &self,
        path: &str,
        build: impl Fn(&str) -> reqwest::RequestBuilder,
        wait: std::time::Duration,
    ) -> Result<reqwest::Response, PeerDown> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match self.send_once(path, &build).await {
                Err(down) if down.source.is_connect() => {
                    if tokio::time::Instant::now() + REFUSED_PAUSE > deadline {
                        return Err(down);
                    }
                    tokio::time::sleep(REFUSED_PAUSE).await;
                }
                answer => return answer,
            }
        }
    }

    /// One pass over the replicas in turn.
    async fn send_once(
        &self,
        path: &str,
        build: &impl Fn(&str) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, PeerDown> {
        let mut last = None;
        for (i, base) in self.turn() {
            let url = format!("{base}{path}");
            match build(&url).send().await {
                Ok(response) => return Ok(response),
                Err(e) if e.is_connect() => {
                    self.refused(i);
                    last = Some(PeerDown { url, source: e });
                }
                Err(e) => return Err(PeerDown { url, source: e }),
            }
        }
        Err(last.expect("a peer list has at least one URL"))
    }
}

impl std::fmt::Display for Replicas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.list())
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    /// A server on a port of its own that answers `GET /who` with `name`
    /// and `GET /fail` with 500, counting the calls it answered.
    async fn upstream(name: &'static str) -> (String, Arc<AtomicUsize>) {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&calls);
        let router = axum::Router::new()
            .route(
                "/who",
                axum::routing::get(move || {
                    counted.fetch_add(1, Ordering::Relaxed);
                    async move { name }
                }),
            )
            .route(
                "/fail",
                axum::routing::get(|| async { axum::http::StatusCode::INTERNAL_SERVER_ERROR }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        (url, calls)
    }

    /// A URL nothing listens on: a port bound, then let go.
    fn dead_url() -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    }

    async fn who(replicas: &Replicas) -> Result<String, PeerDown> {
        let client = reqwest::Client::new();
        let response = replicas.send("/who", |url| client.get(url)).await?;
        Ok(response.text().await.unwrap())
    }

    #[test]
    fn a_list_is_one_url_or_several_separated_by_commas() {
        let one = Replicas::parse("http://a:8003/").unwrap();
        assert_eq!(one.urls(), ["http://a:8003"]);
        let two = Replicas::parse(" http://a:8003, https://b:8003/ ,").unwrap();
        assert_eq!(two.urls(), ["http://a:8003", "https://b:8003"]);
        assert_eq!(two.list(), "http://a:8003,https://b:8003");
        assert_eq!(Replicas::parse(" , ").unwrap_err(), PeerListError::Empty);
        assert_eq!(
            Replicas::parse("http://a,b:8003").unwrap_err(),
            PeerListError::NotHttp("b:8003".into())
        );
        let many = vec!["http://a"; MAX_REPLICAS + 1].join(",");
        assert_eq!(
            Replicas::parse(&many).unwrap_err(),
            PeerListError::TooMany(MAX_REPLICAS + 1)
        );
    }

    #[tokio::test]
    async fn calls_go_to_each_replica_in_turn() {
        let (a, a_calls) = upstream("a").await;
        let (b, b_calls) = upstream("b").await;
        let replicas = Replicas::parse(&format!("{a},{b}")).unwrap();
        let mut answers = Vec::new();
        for _ in 0..6 {
            answers.push(who(&replicas).await.unwrap());
        }
        assert_eq!(answers, ["a", "b", "a", "b", "a", "b"]);
        assert_eq!(a_calls.load(Ordering::Relaxed), 3);
        assert_eq!(b_calls.load(Ordering::Relaxed), 3);
    }

    #[tokio::test]
    async fn a_replica_that_refuses_connections_fails_no_call() {
        let (live, live_calls) = upstream("live").await;
        let replicas = Replicas::parse(&format!("{},{live}", dead_url())).unwrap();
        for _ in 0..5 {
            assert_eq!(who(&replicas).await.unwrap(), "live");
        }
        assert_eq!(live_calls.load(Ordering::Relaxed), 5);
        // A clone shares the turn and what is known to be down.
        assert_eq!(who(&replicas.clone()).await.unwrap(), "live");
    }

    #[tokio::test]
    async fn when_every_replica_is_down_the_call_fails_naming_one() {
        let (d1, d2) = (dead_url(), dead_url());
        let replicas = Replicas::parse(&format!("{d1},{d2}")).unwrap();
        let client = reqwest::Client::new();
        let started = std::time::Instant::now();
        let down = replicas
            .send_waiting("/who", |url| client.get(url), Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert!(down.url == format!("{d1}/who") || down.url == format!("{d2}/who"));
        assert!(down.source.is_connect(), "{down}");
    }

    /// A service restarting: its port refuses, then answers. The call
    /// made while it was down waits and gets the answer.
    #[tokio::test]
    async fn a_call_waits_for_a_replica_that_comes_back_on_its_port() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        drop(listener);
        let replicas = Replicas::parse(&format!("http://{address}")).unwrap();
        let back = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(400)).await;
            let listener = tokio::net::TcpListener::bind(address).await.unwrap();
            let router = axum::Router::new().route("/who", axum::routing::get(|| async { "back" }));
            axum::serve(listener, router).await.unwrap()
        });
        assert_eq!(who(&replicas).await.unwrap(), "back");
        back.abort();
    }

    #[tokio::test]
    async fn an_http_answer_is_never_sent_again_to_another_replica() {
        let (a, a_calls) = upstream("a").await;
        let (b, b_calls) = upstream("b").await;
        let replicas = Replicas::parse(&format!("{a},{b}")).unwrap();
        let client = reqwest::Client::new();
        let response = replicas.send("/fail", |url| client.get(url)).await.unwrap();
        assert_eq!(response.status(), 500);
        assert!(
            response.url().as_str().starts_with(&a),
            "{}",
            response.url()
        );
        // The failing path answered once, and nothing else was called.
        assert_eq!(
            a_calls.load(Ordering::Relaxed) + b_calls.load(Ordering::Relaxed),
            0
        );
        assert_eq!(who(&replicas).await.unwrap(), "b");
    }
}
