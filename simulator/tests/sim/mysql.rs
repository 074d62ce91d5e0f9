//! A run on the in-process reference system with its shards in MySQL
//! databases, with the raw-database baseline measured first.

use shardpay_reference::ledger::sqlite::Durability;
use shardpay_reference::manager::CrossShard;
use shardpay_simulator::baseline::BaselineKind;
use shardpay_simulator::run::{run, MysqlShards, RunOptions, Target};

use crate::scenario;

/// The MySQL test server (`SHARDPAY_TEST_MYSQL_URL`), or `None` to skip,
/// unless `SHARDPAY_REQUIRE_MYSQL=1` makes that a failure.
fn mysql_server() -> Option<String> {
    match std::env::var("SHARDPAY_TEST_MYSQL_URL") {
        Ok(url) if !url.is_empty() => Some(url.trim_end_matches('/').to_string()),
        _ => {
            assert!(
                std::env::var("SHARDPAY_REQUIRE_MYSQL").as_deref() != Ok("1"),
                "SHARDPAY_REQUIRE_MYSQL=1 but SHARDPAY_TEST_MYSQL_URL is not set"
            );
            eprintln!("MySQL test skipped: set SHARDPAY_TEST_MYSQL_URL (scripts/shards.sh up 1)");
            None
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_on_mysql_shards_passes_and_states_its_share_of_the_database() {
    run_on_mysql(CrossShard::Saga).await;
}

/// The same under XA two-phase commit: the books and the audit pass, the
/// report says xa, and the baseline is the raw XA transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_xa_run_on_mysql_shards_passes_and_says_so() {
    run_on_mysql(CrossShard::Xa).await;
}

async fn run_on_mysql(cross_shard: CrossShard) {
    let Some(server) = mysql_server() else {
        return;
    };
    let prefix = format!("s{}", &uuid_like()[..12]);
    // fresh: the run creates the databases itself.
    let urls: Vec<String> = (0..2).map(|i| format!("{server}/{prefix}_{i}")).collect();
    let reports = tempfile::tempdir().unwrap();
    let s = scenario(
        "requests = 200",
        "model = \"closed\"\nusers = 8",
        "[thresholds]\nerror_rate = 0.0",
    );
    let options = RunOptions {
        webhooks: false,
        services: Vec::new(),
        target: Target::Embedded {
            shards: 2,
            data_dir: None,
            durability: Durability::Full,
            mysql: Some(MysqlShards {
                urls,
                fresh: true,
                script: None,
            }),
            cross_shard,
            fraud: true,
            bus: Default::default(),
            redis: None,
        },
        reports_dir: reports.path().to_path_buf(),
        progress: false,
        baseline_s: Some(1),
        system_binary: None,
        six_processes: false,
        live: None,
    };
    let r = run(&s, &options).await.unwrap().report;
    assert!(r.passed, "{:?}\n{}", r.failures, r.summary());
    assert_eq!(r.run.backend, "mysql");
    assert_eq!(r.run.cross_shard, cross_shard.as_str());
    assert_eq!(r.run.operations, 200);
    assert!(r.audit.ok && r.accounting.ok);
    let b = r.baseline.expect("baseline asked for");
    let kinds: Vec<&str> = b.ratios.iter().map(|x| x.kind.as_str()).collect();
    assert_eq!(kinds, vec!["same_shard", "cross_shard"]);
    let measured: Vec<BaselineKind> = b.results.iter().map(|x| x.kind).collect();
    let cross = match cross_shard {
        CrossShard::Saga => BaselineKind::CrossShard,
        CrossShard::Xa => BaselineKind::CrossShardXa,
    };
    assert_eq!(measured, vec![BaselineKind::SameShard, cross]);
    for ratio in &b.ratios {
        assert!(
            ratio.database_tps > 0.0 && ratio.service_tps > 0.0,
            "{ratio:?}"
        );
        assert!((ratio.ratio - ratio.service_tps / ratio.database_tps).abs() < 1e-9);
    }
    if cross_shard == CrossShard::Xa {
        // No transfer is ever left pending under XA.
        assert!(
            !r.outcomes.iter().any(|o| o.status == 202),
            "{:?}",
            r.outcomes
        );
    }
}

fn uuid_like() -> String {
    use rand::Rng;
    format!("{:032x}", rand::rng().random::<u128>())
}
