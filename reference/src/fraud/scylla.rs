//! Fraud features on ScyllaDB (or Cassandra), shared by every fraud
//! replica and kept across restarts. Two tables in one keyspace, both
//! created at start if missing:
//! - `<table>`: one row per attempt, `((payer), at_ms, id)`, written with a
//!   TTL of the window (plus a margin), so old attempts vanish by
//!   themselves; a score reads the payer's attempts after the window's
//!   start;
//! - `<table>_payees`: one row per payer and payee paid, TTL
//!   `PAYEES_TTL_MS` from the last payment to that payee.
//!
//! CQL has no script to make an attempt atomic, so the attempt is written
//! first and the window read after (both at `LOCAL_QUORUM`): of two
//! attempts of one payer scored at once, at least one counts the other,
//! and both may (a concurrent attempt counts as earlier: more reviews,
//! never fewer). Two concurrent first payments to a payee may both count
//! it as new. Where exact counts under concurrency matter, use Redis.

use std::sync::Arc;
use std::time::Duration;

use ::scylla::client::session::Session;
use ::scylla::client::session_builder::SessionBuilder;
use ::scylla::policies::timestamp_generator::MonotonicTimestampGenerator;
use ::scylla::statement::prepared::PreparedStatement;
use ::scylla::statement::Consistency;
use async_trait::async_trait;
use futures_util::TryStreamExt;
use uuid::Uuid;

use super::{FeatureStore, Features, CLOCK_SKEW_MARGIN_MS, MAX_PAYEES_PER_PAYER, PAYEES_TTL_MS};
use crate::auth::stores::StoreDown;
use crate::ledger::TimestampMs;

/// Where the features live in ScyllaDB.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScyllaConfig {
    /// `host:port` of one or more nodes (the driver finds the others).
    pub nodes: Vec<String>,
    pub keyspace: String,
    /// Attempts live in this table, payees in `<table>_payees`.
    pub table: String,
    /// Replicas of the keyspace, used only when this process creates it;
    /// a keyspace that exists keeps its own.
    pub replication_factor: u32,
}

impl ScyllaConfig {
    pub fn new(nodes: Vec<String>) -> ScyllaConfig {
        ScyllaConfig {
            nodes,
            keyspace: "shardpay".into(),
            table: "fraud_attempts".into(),
            replication_factor: 1,
        }
    }
}

/// How long one statement may take before the score fails (and the
/// transfer is refused): well inside the shard manager's wait for a score.
const STATEMENT_TIMEOUT: Duration = Duration::from_millis(500);
/// How long connecting and creating the tables may take at start.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest CQL name: Cassandra's limit for keyspaces and tables.
const MAX_NAME_LEN: usize = 48;
/// Longest TTL CQL accepts, in seconds (20 years).
const MAX_TTL_S: i64 = 630_720_000;

/// A keyspace or table name as CQL takes it unquoted: a lowercase letter,
/// then lowercase letters, digits and `_`, at most 48 in all. Only such
/// names are put into statement text.
pub fn check_name(what: &str, name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let starts_well = chars.next().is_some_and(|c| c.is_ascii_lowercase());
    let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if starts_well && rest_ok && name.len() <= MAX_NAME_LEN {
        Ok(())
    } else {
        Err(format!(
            "{what} {name:?}: give a lowercase letter, then lowercase letters, digits or _, at most {MAX_NAME_LEN} in all"
        ))
    }
}

/// The CQL the store runs, built once from checked names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statements {
    pub create_keyspace: String,
    pub create_attempts: String,
    pub create_payees: String,
    pub insert_attempt: String,
    pub select_window: String,
    pub select_payee: String,
    pub count_payees: String,
    pub forget_payees: String,
    pub insert_payee: String,
}

impl Statements {
    pub fn new(keyspace: &str, table: &str, replication_factor: u32) -> Result<Statements, String> {
        check_name("keyspace", keyspace)?;
        check_name("table", table)?;
        let attempts = format!("{keyspace}.{table}");
        let payees_table = format!("{table}_payees");
        check_name("table", &payees_table)?;
        let payees = format!("{keyspace}.{payees_table}");
        if replication_factor == 0 {
            return Err("replication factor 0: give 1 or more".into());
        }
        Ok(Statements {
            create_keyspace: format!(
                "CREATE KEYSPACE IF NOT EXISTS {keyspace} WITH replication = {{'class': 'NetworkTopologyStrategy', 'replication_factor': {replication_factor}}}"
            ),
            create_attempts: format!(
                "CREATE TABLE IF NOT EXISTS {attempts} (payer text, at_ms bigint, id uuid, amount_minor bigint, PRIMARY KEY ((payer), at_ms, id))"
            ),
            create_payees: format!(
                "CREATE TABLE IF NOT EXISTS {payees} (payer text, payee text, PRIMARY KEY ((payer), payee))"
            ),
            insert_attempt: format!(
                "INSERT INTO {attempts} (payer, at_ms, id, amount_minor) VALUES (?, ?, ?, ?) USING TTL ?"
            ),
            select_window: format!(
                "SELECT id, amount_minor FROM {attempts} WHERE payer = ? AND at_ms > ?"
            ),
            select_payee: format!("SELECT payee FROM {payees} WHERE payer = ? AND payee = ?"),
            count_payees: format!("SELECT COUNT(*) FROM {payees} WHERE payer = ?"),
            forget_payees: format!("DELETE FROM {payees} WHERE payer = ?"),
            insert_payee: format!(
                "INSERT INTO {payees} (payer, payee) VALUES (?, ?) USING TTL ?"
            ),
        })
    }
}

/// CQL TTL, whole seconds rounded up, for something kept `ms`.
pub fn ttl_s(ms: i64) -> i32 {
    let seconds = ms.max(1).saturating_add(999) / 1000;
    seconds.min(MAX_TTL_S) as i32
}

/// The attempts of a payer read in the window, folded as they stream in:
/// this attempt's own row is left out, so the features are those just
/// before it.
#[derive(Debug, Clone, Copy)]
pub struct Tally {
    own: Uuid,
    count: u32,
    /// Wide enough that no number of attempts overflows, as in the memory
    /// store.
    sum: i128,
}

impl Tally {
    pub fn new(own: Uuid) -> Tally {
        Tally {
            own,
            count: 0,
            sum: 0,
        }
    }

    pub fn add(&mut self, id: Uuid, amount_minor: i64) {
        if id != self.own {
            self.count = self.count.saturating_add(1);
            self.sum += amount_minor as i128;
        }
    }

    pub fn features(&self, paid_payee_before: bool) -> Features {
        Features {
            count_in_window: self.count,
            sum_in_window: i64::try_from(self.sum).unwrap_or(i64::MAX),
            paid_payee_before,
        }
    }
}

/// The statements, prepared on the session.
struct Prepared {
    insert_attempt: PreparedStatement,
    select_window: PreparedStatement,
    select_payee: PreparedStatement,
    count_payees: PreparedStatement,
    forget_payees: PreparedStatement,
    insert_payee: PreparedStatement,
}

/// Features shared through ScyllaDB.
pub struct ScyllaFeatureStore {
    session: Session,
    prepared: Prepared,
}

/// A ScyllaDB failure: the fraud engine refuses to score on it.
fn down(e: impl std::fmt::Display) -> StoreDown {
    StoreDown(format!("scylla: {e}"))
}

impl ScyllaFeatureStore {
    /// Connects, creates the keyspace and tables if missing, and prepares
    /// the statements.
    pub async fn connect(config: &ScyllaConfig) -> anyhow::Result<ScyllaFeatureStore> {
        let statements =
            Statements::new(&config.keyspace, &config.table, config.replication_factor)
                .map_err(|e| anyhow::anyhow!("fraud features on ScyllaDB: {e}"))?;
        let nodes = config.nodes.join(",");
        anyhow::ensure!(
            !config.nodes.is_empty(),
            "fraud features on ScyllaDB: give a node (--scylla-uri host:9042)"
        );
        let session = SessionBuilder::new()
            .known_nodes(&config.nodes)
            .connection_timeout(CONNECT_TIMEOUT)
            // Client-side, increasing write times: forgetting a payer's
            // payees and then recording one is never read as the reverse.
            .timestamp_generator(Arc::new(MonotonicTimestampGenerator::new()))
            .build()
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot reach ScyllaDB at {nodes} for the fraud features: {e}; start one (docker compose --profile scylla up -d scylla) or use --fraud-features memory or redis"
                )
            })?;
        for cql in [
            &statements.create_keyspace,
            &statements.create_attempts,
            &statements.create_payees,
        ] {
            session
                .query_unpaged(cql.as_str(), ())
                .await
                .map_err(|e| anyhow::anyhow!("ScyllaDB at {nodes}: {cql}: {e}"))?;
        }
        let prepared = prepare(&session, &statements)
            .await
            .map_err(|e| anyhow::anyhow!("ScyllaDB at {nodes}: {e}"))?;
        Ok(ScyllaFeatureStore { session, prepared })
    }

    /// Whether the payer has paid the payee before.
    async fn paid_before(&self, payer: &str, payee: &str) -> Result<bool, StoreDown> {
        let rows = self
            .session
            .execute_unpaged(&self.prepared.select_payee, (payer, payee))
            .await
            .map_err(down)?
            .into_rows_result()
            .map_err(down)?;
        Ok(rows.rows_num() > 0)
    }

    /// The payer's attempts after `cutoff_ms`, this one left out.
    async fn window(&self, payer: &str, cutoff_ms: i64, own: Uuid) -> Result<Tally, StoreDown> {
        let mut rows = self
            .session
            .execute_iter(self.prepared.select_window.clone(), (payer, cutoff_ms))
            .await
            .map_err(down)?
            .rows_stream::<(Uuid, i64)>()
            .map_err(down)?;
        let mut tally = Tally::new(own);
        while let Some((id, amount_minor)) = rows.try_next().await.map_err(down)? {
            tally.add(id, amount_minor);
        }
        Ok(tally)
    }

    /// Records the payee (refreshing its TTL); a payer past
    /// `MAX_PAYEES_PER_PAYER` starts its set again first, as the memory
    /// store does.
    async fn remember_payee(&self, payer: &str, payee: &str, new: bool) -> Result<(), StoreDown> {
        let p = &self.prepared;
        if new {
            let (count,): (i64,) = self
                .session
                .execute_unpaged(&p.count_payees, (payer,))
                .await
                .map_err(down)?
                .into_rows_result()
                .map_err(down)?
                .single_row()
                .map_err(down)?;
            if count >= MAX_PAYEES_PER_PAYER as i64 {
                self.session
                    .execute_unpaged(&p.forget_payees, (payer,))
                    .await
                    .map_err(down)?;
            }
        }
        let ttl = ttl_s(PAYEES_TTL_MS);
        self.session
            .execute_unpaged(&p.insert_payee, (payer, payee, ttl))
            .await
            .map_err(down)?;
        Ok(())
    }
}

/// Prepares every statement the store runs, at `LOCAL_QUORUM` and with a
/// bounded wait.
async fn prepare(session: &Session, s: &Statements) -> Result<Prepared, String> {
    let prepare = |cql: &str| {
        let cql = cql.to_string();
        async move {
            let mut prepared = session
                .prepare(cql.as_str())
                .await
                .map_err(|e| format!("{cql}: {e}"))?;
            prepared.set_consistency(Consistency::LocalQuorum);
            prepared.set_request_timeout(Some(STATEMENT_TIMEOUT));
            Ok::<_, String>(prepared)
        }
    };
    Ok(Prepared {
        insert_attempt: prepare(&s.insert_attempt).await?,
        select_window: prepare(&s.select_window).await?,
        select_payee: prepare(&s.select_payee).await?,
        count_payees: prepare(&s.count_payees).await?,
        forget_payees: prepare(&s.forget_payees).await?,
        insert_payee: prepare(&s.insert_payee).await?,
    })
}

#[async_trait]
impl FeatureStore for ScyllaFeatureStore {
    async fn observe(
        &self,
        payer: &str,
        payee: &str,
        amount_minor: i64,
        at_ms: TimestampMs,
        window_ms: i64,
    ) -> Result<Features, StoreDown> {
        let own = Uuid::new_v4();
        let ttl = ttl_s(window_ms.saturating_add(CLOCK_SKEW_MARGIN_MS));
        let write = self.session.execute_unpaged(
            &self.prepared.insert_attempt,
            (payer, at_ms, own, amount_minor, ttl),
        );
        // The payee is read while the attempt is written; the window only
        // after the write, so that it sees every attempt written before.
        let (seen, written) = tokio::join!(self.paid_before(payer, payee), write);
        let seen = seen?;
        written.map_err(down)?;
        let cutoff_ms = at_ms.saturating_sub(window_ms);
        let (tally, remembered) = tokio::join!(
            self.window(payer, cutoff_ms, own),
            self.remember_payee(payer, payee, !seen)
        );
        remembered?;
        Ok(tally?.features(seen))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_name_the_keyspace_and_tables() {
        let s = Statements::new("shardpay", "fraud_attempts", 3).unwrap();
        assert_eq!(
            s.create_keyspace,
            "CREATE KEYSPACE IF NOT EXISTS shardpay WITH replication = {'class': 'NetworkTopologyStrategy', 'replication_factor': 3}"
        );
        assert!(s
            .create_attempts
            .starts_with("CREATE TABLE IF NOT EXISTS shardpay.fraud_attempts ("));
        assert!(s
            .create_payees
            .starts_with("CREATE TABLE IF NOT EXISTS shardpay.fraud_attempts_payees ("));
        assert_eq!(
            s.select_window,
            "SELECT id, amount_minor FROM shardpay.fraud_attempts WHERE payer = ? AND at_ms > ?"
        );
        assert!(s.insert_attempt.ends_with("USING TTL ?"));
        assert!(s.insert_payee.ends_with("USING TTL ?"));
        assert_eq!(
            s.forget_payees,
            "DELETE FROM shardpay.fraud_attempts_payees WHERE payer = ?"
        );
    }

    #[test]
    fn only_plain_lowercase_names_reach_the_statements() {
        for good in ["shardpay", "t1", "fraud_attempts", "a"] {
            assert!(check_name("table", good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "1t",
            "_t",
            "Fraud",
            "a-b",
            "a.b",
            "x; DROP TABLE y",
            "é",
        ] {
            let e = check_name("table", bad).unwrap_err();
            assert!(e.contains("lowercase letter"), "{bad}: {e}");
        }
        assert!(check_name("table", &"a".repeat(48)).is_ok());
        assert!(check_name("table", &"a".repeat(49)).is_err());
        // The payees table's name, <table>_payees, must fit too.
        let e = Statements::new("ks", &"a".repeat(45), 1).unwrap_err();
        assert!(e.contains("_payees"), "{e}");
        assert!(Statements::new("ks", "t", 0).is_err());
        assert!(Statements::new("Ks", "t", 1)
            .unwrap_err()
            .contains("keyspace"));
    }

    #[test]
    fn ttls_round_up_to_whole_seconds_within_cql_bounds() {
        assert_eq!(ttl_s(60_000), 60);
        assert_eq!(ttl_s(60_001), 61);
        assert_eq!(ttl_s(1), 1);
        assert_eq!(ttl_s(0), 1);
        assert_eq!(ttl_s(-5), 1);
        assert_eq!(ttl_s(i64::MAX), MAX_TTL_S as i32);
        assert_eq!(ttl_s(PAYEES_TTL_MS), 30 * 24 * 60 * 60);
    }

    #[test]
    fn the_tally_leaves_out_the_attempt_being_scored() {
        let own = Uuid::new_v4();
        let mut tally = Tally::new(own);
        assert_eq!(tally.features(false), Features::default());
        tally.add(Uuid::new_v4(), 10);
        tally.add(own, 1_000);
        tally.add(Uuid::new_v4(), 20);
        assert_eq!(
            tally.features(true),
            Features {
                count_in_window: 2,
                sum_in_window: 30,
                paid_payee_before: true,
            }
        );
    }

    #[test]
    fn the_tally_caps_its_sum_as_the_memory_store_does() {
        let mut tally = Tally::new(Uuid::new_v4());
        tally.add(Uuid::new_v4(), i64::MAX);
        tally.add(Uuid::new_v4(), i64::MAX);
        assert_eq!(tally.features(false).sum_in_window, i64::MAX);
        assert_eq!(tally.features(false).count_in_window, 2);
    }
}
