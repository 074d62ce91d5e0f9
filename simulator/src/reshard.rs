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

/// How long the system may not answer (a fault has it down) before the
/// run stops following a reshard.
const WAIT_FOR_SYSTEM: Duration = Duration::from_secs(60);

/// How soon a reshard a fault stopped is asked for again.
const RESUME_EVERY: Duration = Duration::from_secs(1);

/// How many times one reshard is resumed before the run gives up on it.
const MAX_RESUMES: usize = 30;

/// Runs `schedule` against the system; `started` is when the load began
/// (`started_ms`: the same moment as milliseconds since the Unix epoch,
/// to place the system's phase times on the run's clock).
/// `admin_password` logs the admin in again when a restart (a fault) has
/// forgotten its session.
pub async fn apply(
    schedule: Vec<Reshard>,
    api: Api,
    admin_password: Option<String>,
    marks: crate::marks::Marks,
    started: Instant,
    started_ms: i64,
    progress: bool,
) -> Vec<ReshardRun> {
    let mut admin = Admin {
        api,
        password: admin_password,
    };
    let mut runs = Vec::new();
    for entry in schedule {
        let due = started + Duration::from_secs_f64(entry.at_s);
        tokio::time::sleep_until(due.into()).await;
        let name = format!("reshard to {}", entry.to);
        let mark = marks.begin("reshard", &name, since(started));
        let run = one(&entry, &mut admin, started, started_ms).await;
        marks.end(mark, run.ended_s.unwrap_or_else(|| since(started)));
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

/// The audit, or `None` when the system did not answer (a fault has it
/// down): the run tries again rather than count that as a failed audit.
async fn try_audit(admin: &mut Admin, when: &str, started: Instant) -> Option<ReshardAudit> {
    let at_s = since(started);
    let raw = match admin.api.audit().await {
        Ok(raw) => raw,
        Err(e) if admin.transient(&e).await => return None,
        Err(e) => {
            return Some(ReshardAudit {
                when: when.into(),
                at_s,
                ok: false,
                failed: vec![format!("the audit could not run: {e:#}")],
            })
        }
    };
    Some(ReshardAudit {
        when: when.into(),
        at_s,
        ok: raw["ok"].as_bool().unwrap_or(false),
        failed: crate::api::failed_checks(&raw),
    })
}

/// The audit, asked again for up to [`WAIT_FOR_SYSTEM`] while the system
/// does not answer.
async fn audit(admin: &mut Admin, when: &str, started: Instant) -> ReshardAudit {
    let asked = Instant::now();
    loop {
        if let Some(audit) = try_audit(admin, when, started).await {
            return audit;
        }
        if asked.elapsed() > WAIT_FOR_SYSTEM {
            return ReshardAudit {
                when: when.into(),
                at_s: since(started),
                ok: false,
                failed: vec![format!(
                    "the audit could not run: the system did not answer for {} s",
                    WAIT_FOR_SYSTEM.as_secs()
                )],
            };
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn one(entry: &Reshard, admin: &mut Admin, started: Instant, started_ms: i64) -> ReshardRun {
    let mut run = ReshardRun {
        line: entry.line,
        scheduled_s: entry.at_s,
        to: entry.to,
        started_s: None,
        ended_s: None,
        phases: Vec::new(),
        system: None,
        audits: vec![audit(admin, "before", started).await],
        resumed: Vec::new(),
        error: None,
    };
    run.started_s = Some(since(started));
    let asked = Instant::now();
    // Asked until the system takes it (a fault may have it down).
    loop {
        match admin
            .api
            .start_reshard(entry.to, entry.strategy.as_deref())
            .await
        {
            Ok(_) => break,
            Err(e) if asked.elapsed() < WAIT_FOR_SYSTEM && admin.transient(&e).await => {
                tokio::time::sleep(POLL).await
            }
            Err(e) => {
                run.error = Some(format!("{e:#}"));
                return run;
            }
        }
    }
    // One audit at once, while the first batches move.
    run.audits.push(audit(admin, "during", started).await);
    let mut last_audit = Instant::now();
    let mut last_answer = Instant::now();
    let mut last_resume = Instant::now();
    loop {
        tokio::time::sleep(POLL).await;
        if asked.elapsed() > GIVE_UP {
            run.error = Some(format!(
                "still running after {} s; the run stopped following it",
                GIVE_UP.as_secs()
            ));
            return run;
        }
        let status = match admin.api.reshard_status().await {
            Ok(status) => status,
            // Down (a fault): followed again once it is back.
            Err(e) if last_answer.elapsed() < WAIT_FOR_SYSTEM && admin.transient(&e).await => {
                continue
            }
            Err(e) => {
                run.error = Some(format!("its progress could not be read: {e:#}"));
                return run;
            }
        };
        last_answer = Instant::now();
        let running = status["running"].as_bool() == Some(true);
        let there = status["shards"].as_u64() == Some(u64::from(entry.to))
            && entry
                .strategy
                .as_deref()
                .is_none_or(|s| status["strategy"].as_str() == Some(s));
        let failed = status["error"].is_string();
        if !running && (!there || failed) {
            // Stopped short: by a fault (a shard down, the system killed
            // and started again, which forgets a reshard it was running).
            // Asked again, as an operator would run `shardpay reshard`
            // again: it moves what is left.
            if last_resume.elapsed() < RESUME_EVERY {
                continue;
            }
            last_resume = Instant::now();
            let why = match status["error"].as_str() {
                Some(error) => format!("the system stopped it: {error}"),
                None => "the system no longer ran it (started again)".to_string(),
            };
            if run.resumed.len() < MAX_RESUMES {
                run.resumed.push((since(started), why.clone()));
            } else {
                run.error = Some(format!(
                    "asked {MAX_RESUMES} times to resume it; last stop: {why}"
                ));
                return run;
            }
            if let Err(e) = admin
                .api
                .start_reshard(entry.to, entry.strategy.as_deref())
                .await
            {
                if !admin.transient(&e).await {
                    run.error = Some(format!("it could not be resumed: {e:#}"));
                    return run;
                }
            }
            continue;
        }
        if !running {
            run.ended_s = Some(since(started));
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
        if last_audit.elapsed() >= AUDIT_EVERY {
            if let Some(audit) = try_audit(admin, "during", started).await {
                run.audits.push(audit);
            }
            last_audit = Instant::now();
        }
    }
    run.audits.push(audit(admin, "after", started).await);
    run
}

/// The admin's client: its token is renewed when a restart forgot it.
struct Admin {
    api: Api,
    password: Option<String>,
}

impl Admin {
    /// Whether `error` passes once the fault behind it does: the system
    /// down or starting again, or its admin session forgotten by a restart
    /// (then logged in again here).
    async fn transient(&mut self, error: &anyhow::Error) -> bool {
        if format!("{error:#}").contains("answered 401") {
            let (Some(password), true) = (&self.password, self.api.token.is_some()) else {
                return false;
            };
            if let Ok(token) = self.api.login("admin", password).await {
                self.api.token = Some(token);
            }
            return true;
        }
        unreachable(error)
    }
}

/// Whether `error` is the system not answering at all (down, restarting),
/// rather than an answer refusing the request.
fn unreachable(error: &anyhow::Error) -> bool {
    let down = error.chain().any(|cause| {
        cause
            .downcast_ref::<shardpay_reference::peers::PeerDown>()
            .is_some()
            || cause
                .downcast_ref::<reqwest::Error>()
                .is_some_and(|e| e.is_connect() || e.is_timeout() || e.is_request())
    });
    // Starting again: up, but not ready for its shards yet.
    let starting = ["answered 502", "answered 503", "answered 504"]
        .iter()
        .any(|status| format!("{error:#}").contains(status));
    down || starting
}
