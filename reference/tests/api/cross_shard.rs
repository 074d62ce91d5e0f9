//! The cross-shard saga: an unreachable payee shard leaves the transfer
//! pending (202) until recovery finishes it; a credit refused for good
//! reverses the debit.

use serde_json::json;
use shardpay_reference::ids::{AccountId, TransferId};
use shardpay_reference::ledger::{now_ms, DebitOutcome, Transfer, TransferState};
use shardpay_reference::manager::ManagerConfig;
use shardpay_reference::money::Amount;

use crate::support::{inr, Options, TestApp};

fn recover_at_once() -> Options {
    Options {
        manager: ManagerConfig {
            recovery_grace_ms: 0,
            ..ManagerConfig::default()
        },
        ..Options::default()
    }
}

#[tokio::test]
async fn unreachable_payee_shard_answers_202_and_recovery_completes() {
    let app = TestApp::start_with(recover_at_once()).await;
    let (payer, _, payee) = app.ids_by_shard("x");
    app.create(&payer, "100.00").await;
    app.create(&payee, "0").await;
    let payee_shard = app.manager.ring().shard_of_key(&payee).index();
    app.flaky[payee_shard].set_writes_down(true);

    let body = json!({"from": payer, "to": payee, "amount": "30.00"});
    let (status, pending) = app.post("/v1/transfers", body.clone(), Some("p-1")).await;
    assert_eq!(status, 202, "{pending}");
    assert_eq!(pending["state"], "pending");
    let id = pending["id"].as_str().unwrap().to_string();
    assert_eq!(app.balance_minor(&payer).await, 70_00);
    assert_eq!(app.balance_minor(&payee).await, 0);
    // Money in flight is accounted for while the shard is away.
    let audit = app.audit().await;
    assert_eq!(audit["ok"], true, "{audit:#}");
    assert_eq!(audit["totals"][0]["in_flight_minor"], 30_00);
    assert_eq!(audit["pending_transfers"], 1);

    // Recovery cannot finish while the shard is down...
    app.manager.recover_once(100).await;
    assert_eq!(
        app.get(&format!("/v1/transfers/{id}")).await.1["state"],
        "pending"
    );
    // ...and does once it is back.
    app.flaky[payee_shard].set_writes_down(false);
    assert_eq!(app.manager.recover_once(100).await, 1);
    let (_, done) = app.get(&format!("/v1/transfers/{id}")).await;
    assert_eq!(done["state"], "completed");
    assert_eq!(app.balance_minor(&payee).await, 30_00);
    // A retry replays the first answer (202), and pays nothing more.
    let (status, replay) = app.post("/v1/transfers", body, Some("p-1")).await;
    assert_eq!((status, &replay), (202, &pending));
    assert_eq!(app.balance_minor(&payer).await, 70_00);
    let audit = app.audit().await;
    assert_eq!(audit["ok"], true, "{audit:#}");
    assert_eq!(audit["totals"][0]["in_flight_minor"], 0);
}

#[tokio::test]
async fn a_refused_credit_reverses_the_debit() {
    let app = TestApp::start_with(recover_at_once()).await;
    let (payer, _, ghost) = app.ids_by_shard("r");
    app.create(&payer, "10.00").await;
    let ring = app.manager.ring();
    let payer_id = AccountId::parse(&payer).unwrap();
    let ghost_id = AccountId::parse(&ghost).unwrap();
    // Step (a) for a payee that does not exist (the API's pre-check would
    // refuse it; a payee lost between the check and the credit is the case).
    let transfer = Transfer {
        id: TransferId::generate(),
        payer: payer_id.clone(),
        payee: ghost_id.clone(),
        amount: Amount::from_minor(4_00).unwrap(),
        currency: inr(),
        payer_shard: ring.shard_of(&payer_id),
        payee_shard: ring.shard_of(&ghost_id),
        state: TransferState::Pending,
        failure_code: None,
        created_at_ms: now_ms(),
        updated_at_ms: now_ms(),
    };
    let payer_store = app.manager.store_of(&payer_id);
    let applied = match payer_store
        .debit_to_in_flight(&transfer, None)
        .await
        .unwrap()
    {
        DebitOutcome::Applied(t) => t,
        other => panic!("{other:?}"),
    };
    assert_eq!(app.balance_minor(&payer).await, 6_00);
    let failed = app.manager.finish(&applied).await;
    assert_eq!(failed.state, TransferState::Failed);
    assert_eq!(failed.failure_code.as_deref(), Some("account_not_found"));
    assert_eq!(app.balance_minor(&payer).await, 10_00);
    // The refusal is final: creating the payee now and retrying the credit
    // must not pay it.
    app.create(&ghost, "0").await;
    let again = app.manager.finish(&applied).await;
    assert_eq!(again.state, TransferState::Failed);
    assert_eq!(app.balance_minor(&ghost).await, 0);
    app.assert_audit_passes().await;
}
