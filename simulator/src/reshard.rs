//! The scenario's reshards at run time: at each entry's time the system is
//! asked to place accounts over `to` shards (`POST /v1/admin/reshard`), and
//! followed until the new placement is in force, with the audit run
//! before, about every second during, and after it.

use std::time::{Duration, Instant};

use crate::api::Api;
use crate::report::{ReshardAudit, ReshardRun};
use crate::scenario::Reshard;

/// How often the reshard's status is read while it runs.
const POLL: Duration = Duration::from_millis(250);

/// How often the audit runs while a reshard runs.
const AUDIT_EVERY: Duration = Duration::from_secs(1);

/// The longest a reshard may take before the run gives up following it.
const GIVE_UP: Duration = Duration::from_secs(600);

/// Runs `schedule` against the system; `started` is when the load began
/// (`started_ms`: the same moment as milliseconds since the Unix epoch,
/// to place the system's phase times on the run's clock).
pub async fn apply(
    schedule: Vec<Reshard>,
    api: Api,
    started: Instant,
    started_ms: i64,
    progress: bool,
) -> Vec<ReshardRun> {
    let mut runs = Vec::new();
    for entry in schedule {
        let due = started + Duration::from_secs_f64(entry.at_s);
        tokio::time::sleep_until(due.into()).await;
        let run = one(&entry, &api, started, started_ms).await;
        if progress {
            let what = match &run.error {
                Some(error) => format!("stopped: {error}"),
                None => format!(
                    "{} accounts moved",
                    run.figure("accounts_moved").unwrap_or(0.0)
                ),
            };
            eprintln!("reshard to {} shards: {what}", entry.to);
        }
        runs.push(run);
    }
    runs
}

fn since(started: Instant) -> f64 {
    started.elapsed().as_secs_f64()
}

async fn audit(api: &Api, when: &str, started: Instant) -> ReshardAudit {
    let at_s = since(started);
    match api.audit().await {
        Ok(raw) => ReshardAudit {
            when: when.into(),
            at_s,
            ok: raw["ok"].as_bool().unwrap_or(false),
            failed: crate::api::failed_checks(&raw),
        },
        Err(e) => ReshardAudit {
            when: when.into(),
            at_s,
            ok: false,
            failed: vec![format!("the audit could not run: {e:#}")],
        },
    }
}

async fn one(entry: &Reshard, api: &Api, started: Instant, started_ms: i64) -> ReshardRun {
    let mut run = ReshardRun {
        line: entry.line,
        scheduled_s: entry.at_s,
        to: entry.to,
        started_s: None,
        ended_s: None,
        phases: Vec::new(),
        system: None,
        audits: vec![audit(api, "before", started).await],
        error: None,
    };
    run.started_s = Some(since(started));
    if let Err(e) = api.start_reshard(entry.to, entry.strategy.as_deref()).await {
        run.error = Some(format!("{e:#}"));
        return run;
    }
    let asked = Instant::now();
    // One audit at once, while the first batches move.
    run.audits.push(audit(api, "during", started).await);
    let mut last_audit = Instant::now();
    loop {
        tokio::time::sleep(POLL).await;
        let status = match api.reshard_status().await {
            Ok(status) => status,
            Err(e) => {
                run.error = Some(format!("its progress could not be read: {e:#}"));
                return run;
            }
        };
        if status["running"].as_bool() != Some(true) {
            run.ended_s = Some(since(started));
            if let Some(error) = status["error"].as_str() {
                run.error = Some(format!("the system stopped it: {error}"));
            } else if status["shards"].as_u64() != Some(u64::from(entry.to)) {
                run.error = Some(format!(
                    "it ended with accounts placed over {} shards, not {}",
                    status["shards"], entry.to
                ));
            }
            let last = status["last"].clone();
            for phase in last["phases"].as_array().into_iter().flatten() {
                let at =
                    |key: &str| (phase[key].as_i64().unwrap_or(0) - started_ms) as f64 / 1000.0;
                run.phases.push((
                    phase["name"].as_str().unwrap_or("?").to_string(),
                    at("started_at_ms"),
                    at("ended_at_ms"),
                ));
            }
            run.system = (!last.is_null()).then_some(last);
            break;
        }
        if asked.elapsed() > GIVE_UP {
            run.error = Some(format!(
                "still running after {} s; the run stopped following it",
                GIVE_UP.as_secs()
            ));
            return run;
        }
        if last_audit.elapsed() >= AUDIT_EVERY {
            run.audits.push(audit(api, "during", started).await);
            last_audit = Instant::now();
        }
    }
    run.audits.push(audit(api, "after", started).await);
    run
}
