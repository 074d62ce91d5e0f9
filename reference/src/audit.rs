//! The ledger audit: proves, across every shard at one quiet moment, that no
//! money was created, lost or moved twice.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::ledger::{now_ms, AccountKind, CreditOutcome, ShardAudit};
use crate::manager::{ManagerError, ShardManager};
use crate::money::{format_minor, Currency};

#[derive(Debug, Clone, Serialize)]
pub struct AuditReport {
    /// True when every check passed.
    pub ok: bool,
    pub shards: usize,
    pub checks: Vec<Check>,
    /// Money totals per currency.
    pub totals: Vec<CurrencyTotals>,
    pub pending_transfers: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    /// What was found wrong (empty when the check passed), at most
    /// [`MAX_PROBLEMS`] lines.
    pub problems: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CurrencyTotals {
    pub currency: Currency,
    /// Money brought in by opening balances.
    pub funded_minor: i128,
    /// Sum of all customer balances.
    pub balances_minor: i128,
    /// Money debited from payers and not yet credited to payees.
    pub in_flight_minor: i128,
    pub funded: String,
    pub balances: String,
    pub in_flight: String,
}

/// Problems listed per check; the count is always given in full.
pub const MAX_PROBLEMS: usize = 20;

struct Checks(Vec<Check>);

impl Checks {
    fn add(&mut self, name: &'static str, problems: Vec<String>) {
        let total = problems.len();
        let mut problems: Vec<String> = problems.into_iter().take(MAX_PROBLEMS).collect();
        if total > MAX_PROBLEMS {
            problems.push(format!("... and {} more", total - MAX_PROBLEMS));
        }
        self.0.push(Check {
            name,
            ok: total == 0,
            problems,
        });
    }
}

/// Runs the audit. Waits for running transfers to finish their current step
/// and holds new ones back while it reads, so no saga is caught mid-way.
pub async fn run(manager: &ShardManager) -> Result<AuditReport, ManagerError> {
    let _quiet = manager.quiesce().await;
    // No transfer of this process is between its steps now: settle every
    // prepared XA branch first, as its decision says.
    let sweep = manager.resolve_in_doubt(true).await;
    let mut in_doubt: Vec<String> = sweep
        .remaining
        .iter()
        .map(|b| format!("XA branch {b} is still prepared"))
        .collect();
    in_doubt.extend(
        sweep
            .unreachable
            .iter()
            .map(|s| format!("cannot list XA branches of {s}")),
    );
    let mut shards: Vec<ShardAudit> = Vec::new();
    for store in manager.shards() {
        shards.push(store.audit().await?);
    }
    // For each pending transfer, whether its payee's shard already credited.
    let mut pending_credited: Vec<(Currency, i128)> = Vec::new();
    for audit in &shards {
        for t in &audit.pending {
            let payee_store = &manager.shards()[t.payee_shard.index()];
            if payee_store.credit_outcome(&t.id).await? == Some(CreditOutcome::Credited) {
                pending_credited.push((t.currency, t.amount.minor() as i128));
            }
        }
    }
    let mut report = evaluate(
        &shards,
        &pending_credited,
        manager.config().recovery_deadline_ms,
    );
    if manager.shards().iter().any(|s| s.two_phase().is_some()) {
        let mut checks = Checks(std::mem::take(&mut report.checks));
        checks.add("no_in_doubt_xa_branches", in_doubt);
        report.checks = checks.0;
        report.ok = report.checks.iter().all(|c| c.ok);
    }
    Ok(report)
}

fn evaluate(
    shards: &[ShardAudit],
    pending_credited: &[(Currency, i128)],
    recovery_deadline_ms: i64,
) -> AuditReport {
    let mut checks = Checks(Vec::new());
    let per_shard = |f: &dyn Fn(&ShardAudit) -> Vec<String>| -> Vec<String> {
        shards
            .iter()
            .enumerate()
            .flat_map(|(i, s)| f(s).into_iter().map(move |p| format!("shard {i}: {p}")))
            .collect()
    };

    checks.add(
        "entries_sum_to_zero",
        per_shard(&|s| {
            s.entry_sum_by_currency
                .iter()
                .filter(|(_, sum)| *sum != 0)
                .map(|(c, sum)| format!("{c} entries sum to {sum}"))
                .collect()
        }),
    );
    checks.add(
        "balances_match_entries",
        per_shard(&|s| s.balance_mismatches.clone()),
    );
    checks.add(
        "no_negative_balances",
        per_shard(&|s| s.negative_balances.clone()),
    );
    checks.add(
        "in_flight_matches_transfers",
        per_shard(&|s| {
            let mut want: BTreeMap<&str, i128> = BTreeMap::new();
            for (c, sum) in &s.sent_minor_by_currency {
                *want.entry(c.code()).or_default() += sum;
            }
            for (c, sum) in &s.received_minor_by_currency {
                *want.entry(c.code()).or_default() -= sum;
            }
            let mut have: BTreeMap<&str, i128> = BTreeMap::new();
            for (kind, c, sum) in &s.totals {
                if *kind == AccountKind::InFlight {
                    *have.entry(c.code()).or_default() += sum;
                }
            }
            let codes: std::collections::BTreeSet<&str> =
                want.keys().chain(have.keys()).copied().collect();
            codes
                .into_iter()
                .filter_map(|c| {
                    let (w, h) = (
                        want.get(c).copied().unwrap_or(0),
                        have.get(c).copied().unwrap_or(0),
                    );
                    (w != h)
                        .then(|| format!("{c} in-flight account holds {h}, transfers imply {w}"))
                })
                .collect()
        }),
    );
    let mut entry_problems = per_shard(&|s| {
        let mut p = s.bad_transfers.clone();
        p.extend(s.bad_credits.iter().cloned());
        if s.orphan_entries > 0 {
            p.push(format!(
                "{} entries belong to no transfer",
                s.orphan_entries
            ));
        }
        p
    });
    // Every completed cross-shard transfer was credited exactly once, and no
    // failed one was: credits = completed + pending-but-credited.
    let completed: (u64, i128) = shards.iter().fold((0, 0), |acc, s| {
        (
            acc.0 + s.completed_cross_out.0,
            acc.1 + s.completed_cross_out.1,
        )
    });
    let credited: (u64, i128) = shards.iter().fold((0, 0), |acc, s| {
        (acc.0 + s.credited_in.0, acc.1 + s.credited_in.1)
    });
    let halfway = (
        pending_credited.len() as u64,
        pending_credited.iter().map(|(_, a)| a).sum::<i128>(),
    );
    if (completed.0 + halfway.0, completed.1 + halfway.1) != credited {
        entry_problems.push(format!(
            "{} completed cross-shard transfers ({} minor units) and {} credited pending ones, but {} credits ({} minor units) on payee shards",
            completed.0, completed.1, halfway.0, credited.0, credited.1
        ));
    }
    checks.add("transfers_have_entries_exactly_once", entry_problems);

    let totals = money_totals(shards);
    checks.add(
        "money_conserved",
        totals
            .iter()
            .filter(|t| t.balances_minor + t.in_flight_minor != t.funded_minor)
            .map(|t| {
                format!(
                    "{}: balances {} + in flight {} != funded {}",
                    t.currency, t.balances, t.in_flight, t.funded
                )
            })
            .collect(),
    );

    let now = now_ms();
    let pending: Vec<_> = shards.iter().flat_map(|s| s.pending.iter()).collect();
    checks.add(
        "no_stale_pending_transfers",
        pending
            .iter()
            .filter(|t| now - t.created_at_ms > recovery_deadline_ms)
            .map(|t| {
                format!(
                    "{} pending for {} s (deadline {} s)",
                    t.id,
                    (now - t.created_at_ms) / 1000,
                    recovery_deadline_ms / 1000
                )
            })
            .collect(),
    );

    AuditReport {
        ok: checks.0.iter().all(|c| c.ok),
        shards: shards.len(),
        checks: checks.0,
        totals,
        pending_transfers: pending.len(),
    }
}

fn money_totals(shards: &[ShardAudit]) -> Vec<CurrencyTotals> {
    let mut by_currency: BTreeMap<&str, (Currency, i128, i128, i128)> = BTreeMap::new();
    for s in shards {
        for (kind, currency, sum) in &s.totals {
            let entry = by_currency
                .entry(currency.code())
                .or_insert((*currency, 0, 0, 0));
            match kind {
                AccountKind::Funding => entry.1 -= sum,
                AccountKind::User => entry.2 += sum,
                AccountKind::InFlight => entry.3 += sum,
            }
        }
    }
    by_currency
        .into_values()
        .map(|(currency, funded, balances, in_flight)| CurrencyTotals {
            currency,
            funded_minor: funded,
            balances_minor: balances,
            in_flight_minor: in_flight,
            funded: format_minor(funded, currency),
            balances: format_minor(balances, currency),
            in_flight: format_minor(in_flight, currency),
        })
        .collect()
}
