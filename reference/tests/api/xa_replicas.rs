//! XA coordinators and recovery in different processes: a process's
//! recovery (or audit) must leave alone the prepared branches of a
//! coordinator that is still within its decision deadline, wherever that
//! coordinator runs, and settle them once the deadline has passed.
//!
//! Two `ShardManager`s over the same MySQL shards stand for two processes:
//! nothing of one manager's memory is visible to the other.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use shardpay_reference::manager::{CrossShard, Fault, ManagerConfig, ShardManager};

use crate::support::{mysql_server, Options, TestApp};

/// A coordinator that stalls between PREPARE and its decision, beside the
/// recovery of another process.
async fn stalled_coordinator(xa_decision_ms: i64) -> Option<(TestApp, ShardManager)> {
    mysql_server()?;
    let manager = ManagerConfig {
        cross_shard: CrossShard::Xa,
        fault: Some(Fault::StallAfterPrepare),
        xa_decision_ms,
        ..ManagerConfig::default()
    };
    let app = TestApp::start_with(Options {
        mysql: true,
        manager,
        ..Options::default()
    })
    .await;
    let other = ShardManager::new(app.manager.shards().to_vec(), ManagerConfig::default())
        .expect("a second manager over the same shards");
    Some((app, other))
}

/// Runs recovery passes in `other` while a transfer stalls after PREPARE
/// in `app`, and answers the transfer's status.
async fn transfer_beside_recovery(app: &TestApp, other: &ShardManager) -> (u16, String, String) {
    let (payer, _, payee) = app.ids_by_shard("xa");
    app.create(&payer, "100.00").await;
    app.create(&payee, "0.00").await;
    let body = json!({"from": payer, "to": payee, "amount_minor": 2_500});
    let transfer = app.post("/v1/transfers", body, Some("stalled-1"));
    let recovery = async {
        // Several passes while the branches are prepared and undecided: the
        // old rule settled a branch the second time a pass saw it. (A whole
        // `recover_once` would also wait on the prepared rows' locks in its
        // other steps; the XA step is the one under test.)
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            other.resolve_in_doubt().await;
        }
    };
    let ((status, answer), ()) = tokio::join!(transfer, recovery);
    assert!(
        status == 201 || status == 503,
        "unexpected answer {status}: {answer}"
    );
    (status, payer, payee)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn another_process_leaves_a_live_coordinators_branches_alone() {
    let Some((app, other)) = stalled_coordinator(ManagerConfig::default().xa_decision_ms).await
    else {
        return;
    };
    let (status, payer, payee) = transfer_beside_recovery(&app, &other).await;
    assert_eq!(
        status, 201,
        "the other process's recovery aborted a live coordinator's branches"
    );
    assert_eq!(app.balance_minor(&payer).await, 7_500);
    assert_eq!(app.balance_minor(&payee).await, 2_500);
    assert!(other.resolve_in_doubt().await.remaining.is_empty());
    app.assert_audit_passes().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_coordinator_past_its_deadline_is_aborted_by_another_process() {
    let Some((app, other)) = stalled_coordinator(300).await else {
        return;
    };
    let (status, payer, payee) = transfer_beside_recovery(&app, &other).await;
    assert_eq!(
        status, 503,
        "a coordinator past its deadline committed after recovery aborted it"
    );
    assert_eq!(app.balance_minor(&payer).await, 10_000);
    assert_eq!(app.balance_minor(&payee).await, 0);
    app.assert_audit_passes().await;
}

/// The audit of one process, run while another process's coordinator has
/// branches prepared, waits for that coordinator's decision instead of
/// aborting them, and passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_audit_waits_for_a_live_coordinator_in_another_process() {
    let Some((app, other)) = stalled_coordinator(ManagerConfig::default().xa_decision_ms).await
    else {
        return;
    };
    let other = Arc::new(other);
    let (payer, _, payee) = app.ids_by_shard("xa");
    app.create(&payer, "100.00").await;
    app.create(&payee, "0.00").await;
    let body = json!({"from": payer, "to": payee, "amount_minor": 100});
    let transfer = app.post("/v1/transfers", body, Some("audited-1"));
    let audit = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        shardpay_reference::audit::run(&other).await
    };
    let ((status, answer), report) = tokio::join!(transfer, audit);
    assert_eq!(status, 201, "{answer}");
    let report = report.expect("the audit runs");
    assert!(report.ok, "{report:#?}");
}
