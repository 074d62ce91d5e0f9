//! The calls the simulator makes to the system under test, outside the
//! measured traffic: shard facts, bulk account setup, account balances,
//! transfer lookups and the audit.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{bail, Context};
use serde::Deserialize;
use serde_json::json;
use shardpay_reference::peers::Replicas;

/// Accounts per bulk request (the server takes up to 500).
pub const BULK_BATCH: usize = 500;
/// Bulk requests in flight during setup: enough to keep every shard's
/// writer busy with group commits.
pub const SETUP_CONCURRENCY: usize = 8;
/// Transfers per lookup request (the server takes up to 1000).
pub const LOOKUP_BATCH: usize = 1000;
/// Accounts per page when reading balances back.
pub const PAGE: usize = 1000;
/// Timeout of one setup or check request; the audit gets `AUDIT_TIMEOUT`.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// The audit reads every shard in full.
pub const AUDIT_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Clone)]
pub struct Api {
    pub client: reqwest::Client,
    /// The admin's bearer token, when the system has auth on.
    pub token: Option<String>,
    /// The shard manager's replicas (`--target`), called in turn; one that
    /// refuses a connection is skipped.
    pub base: Replicas,
    /// The replicas of the services of a split deployment that answer some
    /// paths instead of `base` (the shard manager): auth, notification,
    /// analytics.
    pub services: Vec<(String, Replicas)>,
}

/// The service of a split deployment that answers `path` (a query string
/// ignored): the reference system's own route table says which, the one
/// its routers and API description are built from. Paths no other
/// service serves go to the shard manager (`--target`).
pub fn service_of(path: &str) -> &'static str {
    let path = path.split('?').next().unwrap_or(path);
    shardpay_reference::api::served_by(path).map_or("shard-manager", |s| s.name())
}

/// A 404 from a service of a split deployment that says another service
/// serves the route: the run needs `--service NAME=URL`.
fn split_hint(name: &str, answer: &str) -> anyhow::Result<()> {
    if answer.contains(&format!("served by the {name} service")) {
        let said: serde_json::Value = serde_json::from_str(answer).unwrap_or_default();
        bail!(
            "{}; tell the simulator where: --service {name}=URL",
            said["error"]["message"].as_str().unwrap_or(answer)
        );
    }
    Ok(())
}

/// Services `--service NAME=URL` may name.
pub const SERVICES: [&str; 3] = ["auth", "notification", "analytics"];

/// Checks `NAME=URL` pairs; a URL may be several, separated by commas
/// (the service's replicas).
pub fn parse_services(pairs: &[String]) -> anyhow::Result<Vec<(String, Replicas)>> {
    pairs
        .iter()
        .map(|pair| {
            let (name, url) = pair.split_once('=').with_context(|| {
                format!("--service {pair}: write NAME=URL, such as auth=http://127.0.0.1:8001")
            })?;
            anyhow::ensure!(
                SERVICES.contains(&name),
                "--service {pair}: the simulator calls {} besides the shard manager (--target)",
                SERVICES.join(", ")
            );
            let replicas =
                Replicas::parse(url).map_err(|e| anyhow::anyhow!("--service {pair}: {e}"))?;
            Ok((name.to_string(), replicas))
        })
        .collect()
}

#[derive(Debug, Clone, Deserialize)]
pub struct ShardInfo {
    pub shard: usize,
    pub name: String,
    pub healthy: bool,
    pub transfers: TransferCounts,
}

#[derive(Debug, Clone, Copy, Deserialize, Default)]
pub struct TransferCounts {
    pub pending: u64,
    pub completed: u64,
    pub failed: u64,
}

impl TransferCounts {
    pub fn total(&self) -> u64 {
        self.pending + self.completed + self.failed
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct TransferView {
    pub id: String,
    pub from: String,
    pub to: String,
    pub amount_minor: i64,
    pub state: String,
}

impl Api {
    /// An API at `base`: one URL, or the shard manager's replicas'
    /// separated by commas.
    pub fn new(base: &str) -> anyhow::Result<Api> {
        let client = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .build()
            .context("cannot build the HTTP client")?;
        Ok(Api {
            client,
            token: None,
            base: Replicas::parse(base).map_err(|e| anyhow::anyhow!("--target {base:?}: {e}"))?,
            services: Vec::new(),
        })
    }

    fn authed(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(t) => request.bearer_auth(t),
            None => request,
        }
    }

    /// Whether the system has auth on: `/v1/auth/me` without a token
    /// answers 401 then, and 404 in demo mode.
    pub async fn auth_on(&self) -> anyhow::Result<bool> {
        let path = "/v1/auth/me";
        let response = self
            .replicas(path)
            .send(path, |url| self.client.get(url))
            .await
            .with_context(|| format!("GET {path} failed; is the system running there?"))?;
        let status = response.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            let text = response.text().await.unwrap_or_default();
            split_hint("auth", &text)?;
        }
        Ok(status == reqwest::StatusCode::UNAUTHORIZED)
    }

    /// Registers a user (`admin`: with the admin's token, any role).
    pub async fn register(&self, username: &str, password: &str) -> anyhow::Result<()> {
        let _: serde_json::Value = self
            .post_json(
                "/v1/auth/register",
                &json!({ "username": username, "password": password }),
            )
            .await?;
        Ok(())
    }

    /// Logs in; answers the access token.
    pub async fn login(&self, username: &str, password: &str) -> anyhow::Result<String> {
        let answer: serde_json::Value = self
            .post_json(
                "/v1/auth/login",
                &json!({ "username": username, "password": password }),
            )
            .await
            .with_context(|| format!("cannot log in as {username}"))?;
        answer["access_token"]
            .as_str()
            .map(str::to_string)
            .context("the login answer has no access_token")
    }

    /// The replicas of the service that answers `path`.
    fn replicas(&self, path: &str) -> &Replicas {
        let service = service_of(path);
        self.services
            .iter()
            .find(|(name, _)| name == service)
            .map_or(&self.base, |(_, replicas)| replicas)
    }

    /// Sends the request `build` makes of the client and a full URL to a
    /// replica of the service that answers `path`, with the admin's token;
    /// a replica that refuses the connection is skipped.
    async fn send(
        &self,
        path: &str,
        build: impl Fn(&reqwest::Client, &str) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, shardpay_reference::peers::PeerDown> {
        self.replicas(path)
            .send(path, |url| self.authed(build(&self.client, url)))
            .await
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let response = self
            .send(path, |client, url| client.get(url))
            .await
            .with_context(|| format!("GET {path} failed; is the system running there?"))?;
        let status = response.status();
        let text = response.text().await?;
        if !status.is_success() {
            bail!("GET {path} answered {status}: {text}");
        }
        serde_json::from_str(&text).with_context(|| format!("GET {path}: unexpected answer {text}"))
    }

    async fn post_json<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> anyhow::Result<T> {
        let response = self
            .send(path, |client, url| client.post(url).json(body))
            .await
            .with_context(|| format!("POST {path} failed"))?;
        let status = response.status();
        let text = response.text().await?;
        if !status.is_success() {
            bail!("POST {path} answered {status}: {text}");
        }
        serde_json::from_str(&text)
            .with_context(|| format!("POST {path}: unexpected answer {text}"))
    }

    /// Asks the system to place accounts over `to` shards (a reshard,
    /// which runs on in the system; follow it with `reshard_status`).
    pub async fn start_reshard(
        &self,
        to: u32,
        strategy: Option<&str>,
    ) -> anyhow::Result<serde_json::Value> {
        let mut body = serde_json::json!({ "to": to });
        if let Some(strategy) = strategy {
            body["strategy"] = strategy.into();
        }
        self.post_json("/v1/admin/reshard", &body).await
    }

    /// The placement in force and the reshard running or last run.
    pub async fn reshard_status(&self) -> anyhow::Result<serde_json::Value> {
        self.get_json("/v1/admin/reshard").await
    }

    /// How many shards accounts are placed over (`None`: the system does
    /// not say, and places them over all of them).
    pub async fn placed_shards(&self) -> anyhow::Result<Option<usize>> {
        let s: serde_json::Value = self.get_json("/v1/shards").await?;
        Ok(s["placed_shards"].as_u64().map(|n| n as usize))
    }

    pub async fn shards(&self) -> anyhow::Result<Vec<ShardInfo>> {
        #[derive(Deserialize)]
        struct Shards {
            shards: Vec<ShardInfo>,
        }
        let s: Shards = self.get_json("/v1/shards").await?;
        Ok(s.shards)
    }

    /// Creates accounts in one bulk request; returns each one's shard, in
    /// the order given.
    pub async fn create_accounts(
        &self,
        ids: &[String],
        owners: Option<&[String]>,
        currency: &str,
        opening_balance_minor: &[i64],
    ) -> anyhow::Result<Vec<u16>> {
        let accounts: Vec<_> = ids
            .iter()
            .zip(opening_balance_minor)
            .enumerate()
            .map(|(i, (id, minor))| {
                let mut item =
                    json!({ "id": id, "currency": currency, "opening_balance_minor": minor });
                if let Some(owners) = owners {
                    item["owner"] = json!(owners[i]);
                }
                item
            })
            .collect();
        #[derive(Deserialize)]
        struct Item {
            id: String,
            status: u16,
            account: Option<serde_json::Value>,
            error: Option<serde_json::Value>,
        }
        #[derive(Deserialize)]
        struct Bulk {
            results: Vec<Item>,
        }
        let bulk: Bulk = self
            .post_json("/v1/accounts/bulk", &json!({ "accounts": accounts }))
            .await?;
        let mut shards = Vec::with_capacity(ids.len());
        for (want, item) in ids.iter().zip(bulk.results) {
            if item.status != 201 || &item.id != want {
                bail!(
                    "creating account {} answered {}: {}",
                    item.id,
                    item.status,
                    item.error.unwrap_or_default()
                );
            }
            let shard = item
                .account
                .as_ref()
                .and_then(|a| a["shard"].as_u64())
                .context("the bulk answer gives no shard")?;
            shards.push(shard as u16);
        }
        Ok(shards)
    }

    /// Balances of every account whose id starts with `prefix`.
    pub async fn balances(&self, prefix: &str) -> anyhow::Result<HashMap<String, i64>> {
        #[derive(Deserialize)]
        struct Row {
            id: String,
            balance_minor: i64,
        }
        #[derive(Deserialize)]
        struct Page {
            data: Vec<Row>,
            next_after: Option<String>,
        }
        // Ids sort as text, so the prefix's accounts are one run of pages
        // starting just below the prefix itself.
        let mut out = HashMap::new();
        let mut after = prefix.trim_end_matches('_').to_string();
        loop {
            let page: Page = self
                .get_json(&format!("/v1/accounts?limit={PAGE}&after={after}"))
                .await?;
            let mut beyond = false;
            for row in &page.data {
                if row.id.starts_with(prefix) {
                    out.insert(row.id.clone(), row.balance_minor);
                } else if row.id.as_str() > prefix {
                    beyond = true;
                }
            }
            match page.next_after {
                Some(next) if !beyond => after = next,
                _ => break,
            }
        }
        Ok(out)
    }

    /// Looks transfers up by id; returns those found.
    pub async fn lookup(&self, ids: &[String]) -> anyhow::Result<Vec<TransferView>> {
        #[derive(Deserialize)]
        struct Found {
            found: Vec<TransferView>,
        }
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(LOOKUP_BATCH) {
            let f: Found = self
                .post_json("/v1/transfers/lookup", &json!({ "ids": chunk }))
                .await?;
            out.extend(f.found);
        }
        Ok(out)
    }

    /// The system's own ledger audit, as it answers it.
    pub async fn audit(&self) -> anyhow::Result<serde_json::Value> {
        let response = self
            .send("/v1/audit", |client, url| {
                client.get(url).timeout(AUDIT_TIMEOUT)
            })
            .await
            .context("GET /v1/audit failed")?;
        let status = response.status();
        let text = response.text().await?;
        if !status.is_success() {
            bail!("GET /v1/audit answered {status}: {text}");
        }
        Ok(serde_json::from_str(&text)?)
    }

    /// The system's event pipeline (`GET /v1/pipeline`); `None` when the
    /// system has none.
    pub async fn pipeline(
        &self,
    ) -> anyhow::Result<Option<shardpay_reference::pipeline::PipelineReport>> {
        let response = self
            .send("/v1/pipeline", |client, url| client.get(url))
            .await
            .context("GET /v1/pipeline failed")?;
        let status = response.status();
        let text = response.text().await?;
        if status == reqwest::StatusCode::NOT_FOUND {
            split_hint("analytics", &text)?;
            return Ok(None);
        }
        if !status.is_success() {
            bail!("GET /v1/pipeline answered {status}: {text}");
        }
        Ok(Some(serde_json::from_str(&text)?))
    }

    /// Registers a webhook; answers its signing secret, or `None` when the
    /// system has no webhooks.
    pub async fn register_webhook(
        &self,
        account: &str,
        url: &str,
    ) -> anyhow::Result<Option<String>> {
        let body = json!({ "account": account, "url": url });
        let response = self
            .send("/v1/webhooks", |client, to| client.post(to).json(&body))
            .await
            .context("POST /v1/webhooks failed")?;
        let status = response.status();
        let text = response.text().await?;
        if status == reqwest::StatusCode::NOT_FOUND {
            split_hint("notification", &text)?;
            return Ok(None);
        }
        if !status.is_success() {
            bail!("POST /v1/webhooks answered {status}: {text}");
        }
        let hook: serde_json::Value = serde_json::from_str(&text)?;
        Ok(hook["secret"].as_str().map(String::from))
    }
}

/// Each failed check of an audit answer, with its first three problems.
pub fn failed_checks(raw: &serde_json::Value) -> Vec<String> {
    let Some(checks) = raw["checks"].as_array() else {
        return Vec::new();
    };
    checks
        .iter()
        .filter(|c| c["ok"] == false)
        .map(|c| {
            let problems: Vec<&str> = c["problems"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| p.as_str())
                .take(3)
                .collect();
            format!(
                "{}: {}",
                c["name"].as_str().unwrap_or("?"),
                problems.join(", ")
            )
        })
        .collect()
}
