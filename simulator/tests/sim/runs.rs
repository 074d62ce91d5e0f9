//! Whole runs on the in-process reference system.

use shardpay_reference::ledger::sqlite::Durability;
use shardpay_reference::manager::CrossShard;
use shardpay_simulator::report::Report;
use shardpay_simulator::run::{run, RunOptions, Target};
use shardpay_simulator::Kind;

use crate::scenario;

fn options(reports: &std::path::Path, shards: u32) -> RunOptions {
    RunOptions {
        webhooks: false,
        services: Vec::new(),
        target: Target::Embedded {
            shards,
            data_dir: None,
            durability: Durability::Normal,
            mysql: None,
            cross_shard: CrossShard::Saga,
            fraud: true,
            bus: Default::default(),
            redis: None,
        },
        reports_dir: reports.to_path_buf(),
        progress: false,
        baseline_s: None,
        system_binary: None,
        six_processes: false,
        live: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_run_by_count_passes_and_writes_three_reports() {
    let reports = tempfile::tempdir().unwrap();
    let s = scenario(
        "requests = 400",
        "model = \"closed\"\nusers = 8",
        "[thresholds]\nerror_rate = 0.0",
    );
    let result = run(&s, &options(reports.path(), 4)).await.unwrap();
    let r = &result.report;
    assert!(r.passed, "{:?}\n{}", r.failures, r.summary());
    assert_eq!(
        r.run.operations, 400,
        "a count-bounded run executes exactly its count"
    );
    assert!(r.audit.ok && r.accounting.ok);
    assert_eq!(r.accounting.checks.len(), 8);
    // Every request is in the overall histogram and in exactly one kind.
    let c = r.totals.counts;
    assert_eq!(r.latency.all.count, c.requests);
    let by_kind: u64 = r.latency.kinds.values().map(|h| h.count).sum();
    assert_eq!(by_kind, c.requests);
    let by_shard: u64 = r.latency.shards.values().map(|h| h.count).sum();
    assert_eq!(by_shard, c.requests);
    assert_eq!(
        c.requests,
        c.accepted + c.replayed + c.declined + c.errors + c.rate_limited
    );
    // Auth is on: every transfer carried its payer's owner's token, and
    // none was refused for it.
    assert!(r.run.auth.starts_with("on: "), "{}", r.run.auth);
    assert_eq!((c.unauthorized, c.rate_limited), (0, 0));
    // Every kind the mix sends (all but hostile, a scenario of its own).
    for kind in Kind::ALL.into_iter().filter(|k| s.mix.weight(*k) > 0) {
        assert!(
            r.latency.kinds.contains_key(kind.as_str()),
            "{kind:?} missing"
        );
    }
    assert_eq!(s.mix.weight(Kind::Hostile), 0);
    assert!(r.accounting.retry_groups > 0);
    assert!(!r.latency.pairs.is_empty(), "cross-shard pairs recorded");
    // Every committed change reached the analytics consumer once: at least
    // one event per account and per accepted transfer.
    let p = r
        .pipeline
        .as_ref()
        .expect("the in-process system has a pipeline");
    assert!(p.complete, "{p:?}");
    assert_eq!(p.consumers[0].applied, p.outbox_rows);
    assert!(p.outbox_rows >= r.run.accounts + r.accounting.transfers_accepted);
    assert!(r
        .thresholds
        .iter()
        .any(|t| t.name == "event pipeline complete" && t.ok));
    // The webhook receiver got every delivery the system made, signed.
    let w = r.webhooks.as_ref().expect("in-process runs hook accounts");
    assert!(w.ok, "{w:?}");
    assert_eq!(w.hooked_accounts, 20);
    assert!(w.deliveries > 0 && w.bad_signatures == 0, "{w:?}");
    // Each operation sent at least one request through its virtual user's
    // client (a fraud burst several; racing resends go around it).
    assert!(
        r.run.goose_requests >= r.run.operations,
        "{} sent for {} operations",
        r.run.goose_requests,
        r.run.operations
    );

    for file in ["report.json", "report.html", "summary.txt"] {
        assert!(result.dir.join(file).is_file(), "{file} missing");
    }
    let back = Report::read(&result.dir.join("report.json")).unwrap();
    assert!(
        &back == r,
        "report.json does not read back to the same report"
    );
    let html = std::fs::read_to_string(result.dir.join("report.html")).unwrap();
    assert!(
        html.contains("<svg") && !html.contains("<script"),
        "self-contained"
    );
    assert!(html.contains("by payer shard") || html.contains("By payer shard"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_run_sends_its_schedule_and_fails_an_unmeetable_threshold() {
    let reports = tempfile::tempdir().unwrap();
    // 100/s for 3 s: 300 operations, whatever the system's speed.
    let s = scenario(
        "duration_s = 3",
        "model = \"open\"\nrate = 100.0\nmax_in_flight = 32",
        "[thresholds]\nmin_tps = 1000000.0\np99_ms = { same_shard = 0.001 }",
    );
    let result = run(&s, &options(reports.path(), 2)).await.unwrap();
    let r = &result.report;
    assert_eq!(r.run.operations, 300);
    assert_eq!(r.scenario.model, "open");
    let lag = r.run.schedule.expect("an open run reports its schedule");
    assert_eq!((lag.due, lag.unsent), (300, 0), "{lag:?}");
    assert!(r.audit.ok && r.accounting.ok, "{}", r.summary());
    assert!(!r.passed);
    let failed: Vec<&str> = r
        .thresholds
        .iter()
        .filter(|t| !t.ok)
        .map(|t| t.name.as_str())
        .collect();
    assert_eq!(
        failed,
        vec!["p99 latency, same_shard", "transfers per second"],
        "{:?}",
        r.thresholds
    );
    assert_eq!(r.failures.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_run_whose_users_cannot_keep_up_says_its_schedule_fell_behind() {
    let reports = tempfile::tempdir().unwrap();
    // 20,000/s for 2 s through one user: no system answers that fast, so
    // most operations go out late or not at all, and the report says so.
    let s = scenario(
        "duration_s = 2",
        "model = \"open\"\nrate = 20000.0\nmax_in_flight = 1",
        "",
    );
    let result = run(&s, &options(reports.path(), 2)).await.unwrap();
    let r = &result.report;
    let lag = r.run.schedule.expect("an open run reports its schedule");
    assert_eq!(lag.due, 40_000, "{lag:?}");
    assert_eq!(lag.unsent, lag.due - r.run.operations, "{lag:?}");
    assert!(lag.unsent > 0 && lag.late > 0 && !lag.kept(), "{lag:?}");
    assert!(lag.worst_lag_ms > 100.0, "{lag:?}");
    let summary = r.summary();
    assert!(summary.contains("the schedule fell behind"), "{summary}");
    let html = std::fs::read_to_string(result.dir.join("report.html")).unwrap();
    assert!(html.contains("The schedule fell behind"));
    // What was sent still balances.
    assert!(r.audit.ok && r.accounting.ok, "{summary}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sqlite_baseline_moves_money_that_still_adds_up() {
    use shardpay_reference::ledger::sqlite::SqliteConfig;
    use shardpay_simulator::baseline::{run_sqlite, BaselineKind};
    let dir = tempfile::tempdir().unwrap();
    let config = SqliteConfig {
        durability: Durability::Normal,
        ..SqliteConfig::default()
    };
    let mut transfers = 0;
    for kind in [BaselineKind::SameShard, BaselineKind::CrossShard] {
        let r = run_sqlite(dir.path(), 2, &config, kind, 8, 1)
            .await
            .unwrap();
        assert!(r.transfers > 0 && r.tps > 0.0, "{r:?}");
        assert_eq!((r.shards, r.concurrency), (2, 8));
        transfers = r.transfers;
    }
    // The files of the last kind (each kind starts from fresh files): every
    // transfer left its entries, summing to zero over both shards, and the
    // balances moved by exactly the entries.
    let (mut entries, mut sum, mut balances, mut rows) = (0i64, 0i64, 0i64, 0i64);
    for shard in 0..2 {
        let path = dir.path().join(format!("shard-{shard}.sqlite3"));
        let conn = rusqlite::Connection::open(path).unwrap();
        let (n, s): (i64, i64) = conn
            .query_row(
                "SELECT COUNT(*), COALESCE(SUM(amount_minor), 0) FROM ledger_entries",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        entries += n;
        sum += s;
        balances += conn
            .query_row("SELECT SUM(balance_minor) FROM accounts", [], |r| {
                r.get::<_, i64>(0)
            })
            .unwrap();
        rows += conn
            .query_row(
                "SELECT COUNT(*) FROM transfers WHERE state = 'completed'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .unwrap();
    }
    assert_eq!(sum, 0);
    assert_eq!(entries, 4 * rows, "a saga posts four entries");
    assert_eq!(rows as u64, transfers);
    let opening = 2 * 10_000 * 1_000_000_000i64;
    assert_eq!(balances, opening);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_seed_same_requests() {
    // The books of two runs with one seed hold the same transfers (account
    // indices and amounts), whatever the interleaving.
    let reports = tempfile::tempdir().unwrap();
    let s = scenario("requests = 150", "model = \"closed\"\nusers = 4", "");
    let a = run(&s, &options(reports.path(), 2)).await.unwrap().report;
    let b = run(&s, &options(reports.path(), 2)).await.unwrap().report;
    assert_eq!(a.accounting.transfers_sent, b.accounting.transfers_sent);
    assert_eq!(a.accounting.retry_groups, b.accounting.retry_groups);
    assert_eq!(
        a.by_kind.keys().collect::<Vec<_>>(),
        b.by_kind.keys().collect::<Vec<_>>()
    );
    for (kind, counts) in &a.by_kind {
        assert_eq!(
            counts.requests,
            b.by_kind[kind].requests,
            "{kind}\n{}\n{}",
            a.summary(),
            b.summary()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merged_reports_add_up() {
    let reports = tempfile::tempdir().unwrap();
    let s = scenario(
        "requests = 100",
        "model = \"closed\"\nusers = 4",
        "[thresholds]\nerror_rate = 0.0",
    );
    let a = run(&s, &options(reports.path(), 2)).await.unwrap().report;
    let b = run(&s, &options(reports.path(), 2)).await.unwrap().report;
    let m = shardpay_simulator::report::merge(&[a.clone(), b.clone()]).unwrap();
    let c = m.totals.counts;
    assert_eq!(
        c.requests,
        a.totals.counts.requests + b.totals.counts.requests
    );
    assert_eq!(m.latency.all.count, c.requests);
    assert_eq!(
        m.latency.all.max_us,
        a.latency.all.max_us.max(b.latency.all.max_us)
    );
    assert_eq!(
        m.latency.all.min_us,
        a.latency.all.min_us.min(b.latency.all.min_us)
    );
    let timeline: u64 = m.timeline.shards.values().flatten().sum();
    let parts: u64 = [&a, &b]
        .iter()
        .flat_map(|r| r.timeline.shards.values().flatten())
        .sum();
    assert_eq!(timeline, parts);
    assert_eq!(m.run.operations, 200);
    assert!(m.passed, "{:?}", m.failures);
    // error rate, event pipeline, webhooks, audit and accounting.
    assert_eq!(m.thresholds.len(), 4, "thresholds judged again");
    let w = m.webhooks.as_ref().unwrap();
    assert_eq!(w.hooked_accounts, 40);
    assert!(w.ok);
    let p = m.pipeline.as_ref().unwrap();
    assert_eq!(
        p.outbox_rows,
        a.pipeline.as_ref().unwrap().outbox_rows + b.pipeline.as_ref().unwrap().outbox_rows
    );
    assert!(p.complete);
}

/// With fraud checks off, no transfer is refused as fraud.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_fraud_checks_off_nothing_is_blocked() {
    let reports = tempfile::tempdir().unwrap();
    // Fraud-heavy only, with bursts that the default rules block.
    let s = crate::scenario("requests = 150", "model = \"closed\"\nusers = 4", "");
    let mut s = s;
    s.mix.same_shard = 0;
    s.mix.cross_shard = 0;
    s.mix.idempotent_retry = 0;
    s.fraud.large_min = shardpay_reference::money::Amount::from_minor(60_000_00).unwrap();
    s.fraud.large_max = shardpay_reference::money::Amount::from_minor(90_000_00).unwrap();
    s.accounts.opening_balance =
        shardpay_reference::money::Amount::from_minor(100_000_000_00).unwrap();
    let mut on = options(reports.path(), 2);
    let r = run(&s, &on).await.unwrap().report;
    let refused =
        |r: &Report| r.accounting.fraud.fraudulent_refused + r.accounting.fraud.legitimate_refused;
    assert!(
        refused(&r) > 0,
        "the default rules block these bursts: {:?}",
        r.accounting.fraud
    );
    if let Target::Embedded { fraud, .. } = &mut on.target {
        *fraud = false;
    }
    let r = run(&s, &on).await.unwrap().report;
    assert_eq!(refused(&r), 0, "{:?}", r.accounting.fraud);
    assert!(
        !r.outcomes.iter().any(|o| o.code == "transfer_blocked"),
        "{:?}",
        r.outcomes
    );
    assert!(r.passed, "{:?}", r.failures);
}
