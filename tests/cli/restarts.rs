//! A run that spans a restart of every service: the split deployment (one
//! process per service, on four MySQL shard databases, the Kafka-protocol
//! broker and Redis) runs a longer smoke scenario, and while it runs each
//! service in turn is killed with SIGKILL and started again on its port and
//! data. After each restart the load must go on; at the end the run's
//! audit, books, event pipeline (every event applied once, the restarted
//! analytics included) and webhook checks must pass. The only errors
//! allowed are requests a kill cut off in flight: a call that finds a
//! service down waits for it to come back (`peers::RESTART_WAIT`, and the
//! simulator's own wait for the shard manager).

use std::time::Duration;

use super::only_report;
use super::replicas::{
    check_report, kill, pipeline_of, servers, smoke_without_error_rate, transfers_answered,
    wait_for_run, wait_for_transfers, Deployment,
};

const INSTANCES: [(&str, u32); 6] = [
    ("auth", 1),
    ("ledger", 1),
    ("fraud", 1),
    ("notification", 1),
    ("analytics", 1),
    ("shard-manager", 1),
];
/// The order of the restarts: the shard manager last, since its metrics
/// (which tell the test the load goes on) start again at zero.
const RESTARTS: [&str; 6] = [
    "fraud",
    "notification",
    "analytics",
    "ledger",
    "auth",
    "shard-manager",
];
/// Transfers the shard manager answers between two restarts.
const TRANSFERS_BETWEEN: u64 = 60;

#[test]
fn a_run_spanning_a_restart_of_each_service_passes_every_check() {
    let _one_stack = super::six::one_stack_at_a_time();
    let Some(servers) = servers() else {
        return;
    };
    let mut d = Deployment::start(&servers, &INSTANCES);
    let scenario = smoke_without_error_rate(d.dir.path(), Some(40));
    let reports = d.dir.path().join("reports");
    let said = d.dir.path().join("run.out");
    let mut run = d.run(&scenario, &reports, &said);

    let manager = d.url("shard-manager", 1);
    wait_for_transfers(&manager, TRANSFERS_BETWEEN, &mut run, &said);
    for service in RESTARTS {
        let before = transfers_answered(&manager);
        kill(d.process(service, 1));
        std::thread::sleep(Duration::from_millis(200));
        d.restart(service, 1, 2);
        let base = if service == "shard-manager" {
            0
        } else {
            before
        };
        wait_for_transfers(&manager, base + TRANSFERS_BETWEEN, &mut run, &said);
        eprintln!("restarts: {service} restarted; the load goes on");
    }
    assert!(
        run.try_wait().unwrap().is_none(),
        "the run ended before the last restart was over: make the scenario longer"
    );
    let status = wait_for_run(&mut run);
    let output = std::fs::read_to_string(&said).unwrap_or_default();
    let report = only_report(&reports);
    check_report(&report, &output);
    assert!(status.success(), "the run failed ({status}):\n{output}");
    let pipeline = pipeline_of(&d, &d.url("analytics", 1));
    assert_eq!(pipeline["complete"], true, "{pipeline}");
    eprintln!(
        "restarts: {}",
        output.lines().take(40).collect::<Vec<_>>().join("\n")
    );
}
