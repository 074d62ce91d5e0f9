//! The audit under live traffic from another process: cross-shard
//! transfers keep running in one shard manager while a second manager over
//! the same shards (standing for the ledger service's process, with none of
//! the first one's memory) audits again and again. Every audit must pass:
//! no false failure from a saga caught between its steps, on either
//! backend, with sagas and with XA.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde_json::json;
use shardpay_reference::manager::{CrossShard, ManagerConfig, ShardManager};

use crate::support::{eventually, mysql_server, Options, TestApp};

const ACCOUNTS: usize = 8;
const WORKERS: usize = 4;
const TRANSFERS_PER_WORKER: usize = 60;

/// Runs the traffic and the audits side by side; answers how many audits
/// ran and how many transfers were accepted.
async fn audits_during_traffic(app: TestApp) -> (usize, usize) {
    let app = Arc::new(app);
    let ids: Vec<String> = (0..ACCOUNTS).map(|i| format!("live_{i}")).collect();
    for id in &ids {
        app.create(id, "1000.00").await;
    }
    let other = ShardManager::new(app.manager.shards().to_vec(), ManagerConfig::default())
        .expect("a second manager over the same shards");
    let done = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..WORKERS {
        let (app, ids) = (Arc::clone(&app), ids.clone());
        workers.push(tokio::spawn(async move {
            let mut accepted = 0;
            for n in 0..TRANSFERS_PER_WORKER {
                let from = &ids[(w + n) % ACCOUNTS];
                let to = &ids[(w + n * 3 + 1) % ACCOUNTS];
                if from == to {
                    continue;
                }
                let body = json!({"from": from, "to": to, "amount_minor": 1 + (n % 7) as i64});
                let (status, answer) = app.post("/v1/transfers", body, None).await;
                assert!(
                    status == 201 || status == 202,
                    "transfer answered {status}: {answer}"
                );
                accepted += 1;
            }
            accepted
        }));
    }
    let auditor = {
        let done = Arc::clone(&done);
        tokio::spawn(async move {
            let mut audits = 0;
            while !done.load(Ordering::Relaxed) || audits < 3 {
                let report = shardpay_reference::audit::run(&other)
                    .await
                    .expect("the audit reads every shard");
                assert!(
                    report.ok,
                    "audit {audits} failed under live traffic: {report:#?}"
                );
                audits += 1;
            }
            audits
        })
    };
    let mut accepted = 0;
    for worker in workers {
        accepted += worker.await.expect("a worker");
    }
    done.store(true, Ordering::Relaxed);
    let audits = auditor.await.expect("the auditor");
    app.assert_audit_passes().await;
    (audits, accepted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn audits_pass_while_sagas_run_in_another_process_sqlite() {
    let app = TestApp::start_with(Options::default()).await;
    let (audits, accepted) = audits_during_traffic(app).await;
    assert!(
        audits >= 3 && accepted > 0,
        "{audits} audits, {accepted} transfers"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn audits_pass_while_sagas_run_in_another_process_mysql() {
    if mysql_server().is_none() {
        return;
    }
    let app = TestApp::start_with(Options {
        mysql: true,
        ..Options::default()
    })
    .await;
    let (audits, accepted) = audits_during_traffic(app).await;
    assert!(
        audits >= 3 && accepted > 0,
        "{audits} audits, {accepted} transfers"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn audits_pass_while_xa_transfers_run_in_another_process() {
    if mysql_server().is_none() {
        return;
    }
    let app = TestApp::start_with(Options {
        mysql: true,
        manager: ManagerConfig {
            cross_shard: CrossShard::Xa,
            ..ManagerConfig::default()
        },
        ..Options::default()
    })
    .await;
    let (audits, accepted) = audits_during_traffic(app).await;
    assert!(
        audits >= 3 && accepted > 0,
        "{audits} audits, {accepted} transfers"
    );
}

/// The same Idempotency-Key sent to two shard managers at once (two
/// replicas behind a load balancer: neither sees the other's running keys).
/// The database record written with the money decides: the payer is
/// debited once, one answer is the first, and the other is its replay or a
/// conflict, never a second payment.
async fn one_key_two_replicas(app: TestApp) {
    use shardpay_reference::ids::{AccountId, IdempotencyKey};
    use shardpay_reference::ledger::{StoredResponse, Transfer};
    use shardpay_reference::manager::{ManagerError, TransferRequest, View};
    use shardpay_reference::money::Amount;

    fn render(t: &Transfer) -> StoredResponse {
        StoredResponse {
            status: 201,
            body: t.id.to_string(),
        }
    }
    const VIEW: View<Transfer> = View {
        route: "test.transfer",
        render,
    };
    let (payer, same, other) = app.ids_by_shard("dup");
    app.create(&payer, "100.00").await;
    app.create(&same, "0.00").await;
    app.create(&other, "0.00").await;
    let second = Arc::new(
        ShardManager::new(app.manager.shards().to_vec(), ManagerConfig::default())
            .expect("a second manager over the same shards"),
    );
    let mut paid = 0;
    for round in 0..20 {
        let payee = if round % 2 == 0 { &same } else { &other };
        let request = TransferRequest {
            from: AccountId::parse(&payer).unwrap(),
            to: AccountId::parse(payee).unwrap(),
            amount: Amount::from_minor(100).unwrap(),
            currency: None,
        };
        let key = IdempotencyKey::parse(&format!("twice-{round}")).unwrap();
        let (a, b) = tokio::join!(
            app.manager
                .transfer_funds(request.clone(), Some(key.clone()), &VIEW),
            second.transfer_funds(request.clone(), Some(key.clone()), &VIEW)
        );
        let firsts: Vec<_> = [&a, &b]
            .into_iter()
            .filter(|r| matches!(r, Ok(reply) if !reply.replayed))
            .collect();
        assert_eq!(firsts.len(), 1, "round {round}: {a:?} / {b:?}");
        for r in [&a, &b] {
            match r {
                Ok(reply) if reply.replayed => {
                    let first = firsts[0].as_ref().unwrap();
                    assert_eq!(reply.response, first.response, "round {round}");
                }
                Ok(_) => {}
                Err(ManagerError::IdempotencyKeyInFlight) => {}
                Err(e) => panic!("round {round}: unexpected {e:?}"),
            }
        }
        paid += 1;
    }
    let (app_ref, payer_ref) = (&app, &payer);
    eventually("every transfer settled", || async move {
        app_ref.balance_minor(payer_ref).await == 10_000 - 100 * paid
    })
    .await;
    assert_eq!(
        app.balance_minor(&same).await + app.balance_minor(&other).await,
        100 * paid
    );
    app.assert_audit_passes().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_key_sent_to_two_replicas_pays_once_sqlite() {
    one_key_two_replicas(TestApp::start_with(Options::default()).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_key_sent_to_two_replicas_pays_once_mysql() {
    if mysql_server().is_none() {
        return;
    }
    let app = TestApp::start_with(Options {
        mysql: true,
        ..Options::default()
    })
    .await;
    one_key_two_replicas(app).await;
}
