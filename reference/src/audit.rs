//! The ledger audit: proves, across every shard at one quiet moment, that no
//! money was created, lost or moved twice.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use serde::Serialize;

use crate::ids::TransferId;
use crate::ledger::{
    now_ms, AccountKind, AccountMismatch, BranchId, CreditEntries, CreditOutcome, ShardAudit,
    TimestampMs, Transfer, TransferEntries, TransferState,
};
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

/// Runs the audit under live traffic, from any process, without holding
/// transfers back: each shard is read in one snapshot, shard after shard.
///
/// A saga's steps run on two shards one after the other, so snapshots taken
/// at different moments can disagree about a transfer that moved between
/// them: its payer's shard says completed while its payee's shard, read
/// earlier, has no credit yet; or a credit shows up whose transfer began
/// after its payer's shard was read. Each such disagreement is read again
/// from the shards as they are now (after the prepared XA branches seen have
/// settled); the ones still there are problems. Every other check holds
/// within one shard's snapshot, or (money conserved) for any set of
/// snapshots, since each step of a saga moves money within one shard.
pub async fn run(manager: &ShardManager) -> Result<AuditReport, ManagerError> {
    let two_phase = manager.shards().iter().any(|s| s.two_phase().is_some());
    let mut in_doubt = settle_in_doubt(manager).await;
    let mut shards: Vec<ShardAudit> = Vec::new();
    for store in manager.shards() {
        shards.push(store.audit().await?);
    }
    let unmatched = Unmatched::of(&shards);
    let mut seen_now = read_again(manager, &unmatched).await?;
    if two_phase && !unmatched.explained_by(&seen_now) {
        // A branch prepared while the shards were read may be between its
        // two commits: let it settle, then look again.
        in_doubt = settle_in_doubt(manager).await;
        seen_now = read_again(manager, &unmatched).await?;
    }
    let mut report = evaluate(
        &shards,
        &seen_now,
        manager.config().recovery_deadline_ms,
        now_ms(),
    );
    if two_phase {
        let mut checks = Checks(std::mem::take(&mut report.checks));
        checks.add("no_in_doubt_xa_branches", in_doubt);
        report.checks = checks.0;
        report.ok = report.checks.iter().all(|c| c.ok);
    }
    Ok(report)
}

/// The cross-shard transfers the snapshots show on one side only: completed
/// ones with no credit on any shard, and credits whose transfer is on no
/// payer's shard.
#[derive(Debug, Default)]
struct Unmatched {
    credits_missing: Vec<String>,
    transfers_missing: Vec<String>,
}

impl Unmatched {
    fn of(shards: &[ShardAudit]) -> Unmatched {
        let credited: BTreeSet<&str> = shards
            .iter()
            .flat_map(|s| s.credits.iter())
            .filter(|c| c.credited)
            .map(|c| c.transfer_id.as_str())
            .collect();
        let cross: BTreeSet<&str> = shards
            .iter()
            .flat_map(|s| s.transfers.iter())
            .filter(|t| t.cross_shard)
            .map(|t| t.id.as_str())
            .collect();
        let credits_missing = shards
            .iter()
            .flat_map(|s| s.transfers.iter())
            .filter(|t| t.cross_shard && t.state == TransferState::Completed)
            .filter(|t| !credited.contains(t.id.as_str()))
            .map(|t| t.id.clone())
            .collect();
        let transfers_missing = credited
            .iter()
            .filter(|id| !cross.contains(*id))
            .map(|id| id.to_string())
            .collect();
        Unmatched {
            credits_missing,
            transfers_missing,
        }
    }

    fn explained_by(&self, now: &SeenNow) -> bool {
        self.credits_missing
            .iter()
            .all(|id| now.credited.contains(id))
            && self
                .transfers_missing
                .iter()
                .all(|id| now.transfers.contains_key(id))
    }
}

/// What the shards show now of the transfers the snapshots saw on one side
/// only.
#[derive(Debug, Default)]
pub struct SeenNow {
    /// Transfers credited on some shard now.
    pub credited: BTreeSet<String>,
    /// Transfers found now on some shard: (state, amount in minor units).
    pub transfers: BTreeMap<String, (TransferState, i64)>,
}

/// Looks up, on every shard, the credits and transfers `unmatched` lacks.
async fn read_again(
    manager: &ShardManager,
    unmatched: &Unmatched,
) -> Result<SeenNow, ManagerError> {
    let mut now = SeenNow::default();
    for id in &unmatched.credits_missing {
        let Ok(transfer) = TransferId::parse(id) else {
            continue;
        };
        for store in manager.shards() {
            if store.credit_outcome(&transfer).await? == Some(CreditOutcome::Credited) {
                now.credited.insert(id.clone());
            }
        }
    }
    for id in &unmatched.transfers_missing {
        let Ok(transfer) = TransferId::parse(id) else {
            continue;
        };
        for store in manager.shards() {
            if let Some(t) = store.transfer(&transfer).await? {
                now.transfers
                    .insert(id.clone(), (t.state, t.amount.minor()));
            }
        }
    }
    Ok(now)
}

/// Settles the prepared XA branches found now, waiting for their
/// coordinators' deadlines where needed (a coordinator in any process has
/// until its deadline to decide). Branches prepared after this call started
/// belong to transfers still running and are not waited for. Answers the
/// branches seen at the start that are still prepared after that.
async fn settle_in_doubt(manager: &ShardManager) -> Vec<String> {
    let mut sweep = manager.resolve_in_doubt().await;
    let watched: HashSet<BranchId> = sweep.remaining.iter().cloned().collect();
    let give_up = now_ms() + manager.config().xa_decision_ms + 1_000;
    while sweep.remaining.iter().any(|b| watched.contains(b)) && now_ms() < give_up {
        let wait = sweep
            .due_by
            .map_or(500, |due_by| (due_by - now_ms()).clamp(0, 2_000))
            + 50;
        tokio::time::sleep(std::time::Duration::from_millis(wait as u64)).await;
        sweep = manager.resolve_in_doubt().await;
    }
    let mut in_doubt: Vec<String> = sweep
        .remaining
        .iter()
        .filter(|b| watched.contains(b))
        .map(|b| format!("XA branch {b} is still prepared"))
        .collect();
    in_doubt.extend(
        sweep
            .unreachable
            .iter()
            .map(|s| format!("cannot list XA branches of {s}")),
    );
    in_doubt
}

/// Judges the shards' snapshots (in shard order) without reading anything:
/// `seen_now` holds what the shards showed afterwards of the cross-shard
/// transfers the snapshots saw on one side only, and a pending transfer
/// created more than `recovery_deadline_ms` before `now` is stale.
fn evaluate(
    shards: &[ShardAudit],
    seen_now: &SeenNow,
    recovery_deadline_ms: i64,
    now: TimestampMs,
) -> AuditReport {
    let per_shard = |f: &dyn Fn(&ShardAudit) -> Vec<String>| -> Vec<String> {
        shards
            .iter()
            .enumerate()
            .flat_map(|(i, s)| f(s).into_iter().map(move |p| format!("shard {i}: {p}")))
            .collect()
    };
    let mut checks = Checks(Vec::new());
    checks.add("entries_sum_to_zero", per_shard(&entry_sum_problems));
    checks.add(
        "balances_match_entries",
        per_shard(&|s| {
            s.accounts_to_check
                .iter()
                .filter_map(balance_problem)
                .collect()
        }),
    );
    checks.add(
        "no_negative_balances",
        per_shard(&|s| {
            s.accounts_to_check
                .iter()
                .filter_map(negative_problem)
                .collect()
        }),
    );
    checks.add(
        "in_flight_matches_transfers",
        per_shard(&in_flight_problems),
    );
    let mut exactly_once = per_shard(&entry_problems);
    exactly_once.extend(cross_shard_problems(shards, seen_now));
    checks.add("transfers_have_entries_exactly_once", exactly_once);
    let totals = money_totals(shards);
    checks.add("money_conserved", conservation_problems(&totals));
    let pending: Vec<&Transfer> = shards.iter().flat_map(|s| s.pending.iter()).collect();
    checks.add(
        "no_stale_pending_transfers",
        stale_problems(&pending, recovery_deadline_ms, now),
    );
    checks.add("moved_accounts_closed", per_shard(&moved_problems));
    AuditReport {
        ok: checks.0.iter().all(|c| c.ok),
        shards: shards.len(),
        checks: checks.0,
        totals,
        pending_transfers: pending.len(),
    }
}

/// Accounts that moved away from a shard (a reshard) but are still open
/// there: a second live copy a stale writer could pay into.
fn moved_problems(s: &ShardAudit) -> Vec<String> {
    s.open_after_move
        .iter()
        .map(|(id, balance)| {
            format!(
                "account {id} moved to another shard but is still open here (balance {balance})"
            )
        })
        .collect()
}

/// Currencies whose entries on one shard do not sum to zero.
fn entry_sum_problems(s: &ShardAudit) -> Vec<String> {
    s.entry_sum_by_currency
        .iter()
        .filter(|(_, sum)| *sum != 0)
        .map(|(c, sum)| format!("{c} entries sum to {sum}"))
        .collect()
}

/// A shard's in-flight account against what its transfers imply: money
/// sent into flight by its payers (not failed) less credits it took out.
fn in_flight_problems(s: &ShardAudit) -> Vec<String> {
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
    let codes: std::collections::BTreeSet<&str> = want.keys().chain(have.keys()).copied().collect();
    codes
        .into_iter()
        .filter_map(|c| {
            let (w, h) = (
                want.get(c).copied().unwrap_or(0),
                have.get(c).copied().unwrap_or(0),
            );
            (w != h).then(|| format!("{c} in-flight account holds {h}, transfers imply {w}"))
        })
        .collect()
}

/// Every completed cross-shard transfer was credited exactly once, for its
/// amount, and no failed one was; every credit belongs to a transfer that
/// did not fail. A side missing from the snapshots counts when `seen_now`
/// found it afterwards.
fn cross_shard_problems(shards: &[ShardAudit], seen_now: &SeenNow) -> Vec<String> {
    let mut credits: BTreeMap<&str, Vec<&CreditEntries>> = BTreeMap::new();
    for c in shards.iter().flat_map(|s| s.credits.iter()) {
        credits.entry(c.transfer_id.as_str()).or_default().push(c);
    }
    let mut problems = Vec::new();
    let mut payers: BTreeSet<&str> = BTreeSet::new();
    for t in shards.iter().flat_map(|s| s.transfers.iter()) {
        if !t.cross_shard {
            continue;
        }
        payers.insert(&t.id);
        let credited: Vec<&CreditEntries> = credits
            .get(t.id.as_str())
            .map(|cs| cs.iter().copied().filter(|c| c.credited).collect())
            .unwrap_or_default();
        problems.extend(credit_of_problem(
            t,
            &credited,
            seen_now.credited.contains(&t.id),
        ));
    }
    for (id, cs) in &credits {
        if cs.len() > 1 {
            problems.push(format!("{id} has a credit on {} shards", cs.len()));
        }
        for c in cs.iter().filter(|c| c.credited && !payers.contains(id)) {
            problems.extend(match seen_now.transfers.get(*id) {
                Some((state, amount))
                    if *state != TransferState::Failed && *amount == c.amount_minor =>
                {
                    None
                }
                Some((state, amount)) => Some(format!(
                    "{id} credited {} but its transfer is {} for {amount}",
                    c.amount_minor,
                    state.as_str()
                )),
                None => Some(format!(
                    "{id} credited {} but no shard has its transfer",
                    c.amount_minor
                )),
            });
        }
    }
    problems
}

/// A cross-shard transfer against the credits applied for it.
fn credit_of_problem(
    t: &TransferEntries,
    credited: &[&CreditEntries],
    credited_since: bool,
) -> Option<String> {
    match (t.state, credited) {
        (_, [c]) if c.amount_minor != t.amount_minor => Some(format!(
            "{} of {} was credited {}",
            t.id, t.amount_minor, c.amount_minor
        )),
        (TransferState::Failed, [_, ..]) => Some(format!("{} failed but was credited", t.id)),
        (_, [_, _, ..]) => Some(format!("{} was credited {} times", t.id, credited.len())),
        (TransferState::Completed, []) if !credited_since => {
            Some(format!("{} completed but no shard credited it", t.id))
        }
        _ => None,
    }
}

/// Currencies whose balances and money in flight differ from what was funded.
fn conservation_problems(totals: &[CurrencyTotals]) -> Vec<String> {
    totals
        .iter()
        .filter(|t| t.balances_minor + t.in_flight_minor != t.funded_minor)
        .map(|t| {
            format!(
                "{}: balances {} + in flight {} != funded {}",
                t.currency, t.balances, t.in_flight, t.funded
            )
        })
        .collect()
}

/// Pending transfers older than the recovery deadline.
fn stale_problems(
    pending: &[&Transfer],
    recovery_deadline_ms: i64,
    now: TimestampMs,
) -> Vec<String> {
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
        .collect()
}

/// An account whose balance is not the sum of its entries.
pub fn balance_problem(a: &AccountMismatch) -> Option<String> {
    (a.balance_minor as i128 != a.entries_minor).then(|| {
        format!(
            "{}: balance {}, entries {}",
            a.account, a.balance_minor, a.entries_minor
        )
    })
}

/// A customer account below zero.
pub fn negative_problem(a: &AccountMismatch) -> Option<String> {
    (a.kind == AccountKind::User && a.balance_minor < 0)
        .then(|| format!("{}: {}", a.account, a.balance_minor))
}

/// A transfer whose entries on its payer's shard are not exactly what its
/// state implies: same-shard completed, payer -amount and payee +amount (2
/// entries); cross-shard pending or completed, payer -amount and in-flight
/// +amount; cross-shard failed, those two and their reversal (4, payer net
/// 0). Every transfer's entries sum to zero.
pub fn transfer_problem(t: &TransferEntries) -> Option<String> {
    let amount = t.amount_minor as i128;
    let (want_entries, want_payer) = match (t.state, t.cross_shard) {
        (TransferState::Completed, false) => (2, -amount),
        (TransferState::Pending | TransferState::Completed, true) => (2, -amount),
        (TransferState::Failed, true) => (4, 0),
        // A same-shard transfer is never pending or failed.
        _ => (-1, 0),
    };
    let ok = t.entries == want_entries && t.net_minor == 0 && t.payer_net_minor == want_payer;
    (!ok).then(|| {
        format!(
            "{} ({}, cross_shard={}): {} entries, payer net {}, expected {want_entries} entries and payer net {want_payer}",
            t.id,
            t.state.as_str(),
            t.cross_shard,
            t.entries,
            t.payer_net_minor
        )
    })
}

/// A credit whose entries on its payee's shard are not what its outcome
/// implies: credited, in-flight -amount and payee +amount; refused, none.
pub fn credit_problem(c: &CreditEntries) -> Option<String> {
    let (want_entries, want_payee) = if c.credited {
        (2, c.amount_minor as i128)
    } else {
        (0, 0)
    };
    (c.entries != want_entries || c.payee_net_minor != want_payee).then(|| {
        format!(
            "credit {} ({}): {} entries, payee net {}",
            c.transfer_id,
            if c.credited { "credited" } else { "refused" },
            c.entries,
            c.payee_net_minor
        )
    })
}

/// One shard's transfers, credits and entries that are wrong on their own.
/// A cross-shard transfer whose payee moved to the payer's shard (a
/// reshard) has its debit and its credit here: each sees the other's two
/// entries too.
pub fn entry_problems(s: &ShardAudit) -> Vec<String> {
    let debited: std::collections::HashSet<&str> =
        s.transfers.iter().map(|t| t.id.as_str()).collect();
    let both: std::collections::HashSet<&str> = s
        .credits
        .iter()
        .filter(|c| c.credited && debited.contains(c.transfer_id.as_str()))
        .map(|c| c.transfer_id.as_str())
        .collect();
    let mut problems: Vec<String> = s
        .transfers
        .iter()
        .filter_map(|t| {
            if both.contains(t.id.as_str()) && t.cross_shard {
                // Its own two entries and the credit's two.
                let mut own = t.clone();
                own.entries -= 2;
                transfer_problem(&own)
            } else {
                transfer_problem(t)
            }
        })
        .collect();
    problems.extend(s.credits.iter().filter_map(|c| {
        if both.contains(c.transfer_id.as_str()) {
            let mut own = c.clone();
            own.entries -= 2;
            credit_problem(&own)
        } else {
            credit_problem(c)
        }
    }));
    if s.orphan_entries > 0 {
        problems.push(format!(
            "{} entries belong to no transfer",
            s.orphan_entries
        ));
    }
    problems
}

/// Everything wrong with one shard read on its own (the checks that need
/// no other shard): entries that do not sum to zero, balances that differ
/// from their entries or are below zero, and [`entry_problems`].
pub fn shard_problems(s: &ShardAudit) -> Vec<String> {
    let mut problems: Vec<String> = s
        .entry_sum_by_currency
        .iter()
        .filter(|(_, sum)| *sum != 0)
        .map(|(c, sum)| format!("{c} entries sum to {sum}"))
        .collect();
    problems.extend(s.accounts_to_check.iter().filter_map(balance_problem));
    problems.extend(s.accounts_to_check.iter().filter_map(negative_problem));
    problems.extend(entry_problems(s));
    problems
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

#[cfg(test)]
mod tests {
    //! The audit's verdicts over hand-built snapshots. A consistent pair of
    //! shards passes; each corruption is written into the snapshots as a
    //! shard's audit query would read it back, and must fail exactly the
    //! checks named, no more and no fewer.

    use super::*;
    use crate::ids::{AccountId, ShardId, TransferId};
    use crate::ledger::{Transfer, TransferState};
    use crate::money::Amount;

    const NOW: TimestampMs = 1_700_000_000_000;
    const DEADLINE_MS: i64 = 60_000;

    const ALL_CHECKS: [&str; 8] = [
        "entries_sum_to_zero",
        "balances_match_entries",
        "no_negative_balances",
        "in_flight_matches_transfers",
        "transfers_have_entries_exactly_once",
        "money_conserved",
        "no_stale_pending_transfers",
        "moved_accounts_closed",
    ];

    fn usd() -> Currency {
        Currency::parse("USD").unwrap()
    }

    fn tid(n: u32) -> TransferId {
        TransferId::parse(&format!("tr_{n:032x}")).unwrap()
    }

    fn pending(
        n: u32,
        (payer, payer_shard): (&str, u32),
        (payee, payee_shard): (&str, u32),
        minor: i64,
        created_at_ms: TimestampMs,
    ) -> Transfer {
        Transfer {
            id: tid(n),
            payer: AccountId::parse(payer).unwrap(),
            payee: AccountId::parse(payee).unwrap(),
            amount: Amount::from_minor(minor).unwrap(),
            currency: usd(),
            payer_shard: ShardId::new(payer_shard).unwrap(),
            payee_shard: ShardId::new(payee_shard).unwrap(),
            state: TransferState::Pending,
            failure_code: None,
            created_at_ms,
            updated_at_ms: created_at_ms,
        }
    }

    /// The snapshots of two shards and the pending transfers already
    /// credited on their payee's shard, in USD minor units:
    ///
    /// - shard 0: alice opened with 100.00, bob with 50.00;
    ///   shard 1: carol opened with 70.00.
    /// - t1 alice -> bob 10.00, same shard, completed.
    /// - t2 alice -> carol 20.00, cross-shard, completed and credited.
    /// - t3 carol -> bob 5.00, cross-shard, failed: shard 0 refused the
    ///   credit and shard 1 reversed the debit (nets to nothing).
    /// - t4 alice -> carol 3.00, cross-shard, pending, not credited yet.
    /// - t5 carol -> alice 4.00, cross-shard, pending, already credited.
    ///
    /// Balances: alice 71.00, bob 60.00, carol 86.00; in flight on shard 0
    /// +20 +3 -4 = 19.00, on shard 1 -20 +4 = -16.00; funded 220.00 =
    /// 217.00 in balances + 3.00 in flight (t4).
    struct World {
        shards: Vec<ShardAudit>,
        seen_now: SeenNow,
    }

    fn consistent() -> World {
        let shard_0 = ShardAudit {
            entry_sum_by_currency: vec![(usd(), 0)],
            totals: vec![
                (AccountKind::Funding, usd(), -15_000),
                (AccountKind::InFlight, usd(), 1_900),
                (AccountKind::User, usd(), 7_100 + 6_000),
            ],
            transfers: vec![
                entries(1, TransferState::Completed, false, 1_000, (2, 0, -1_000)),
                entries(2, TransferState::Completed, true, 2_000, (2, 0, -2_000)),
                entries(4, TransferState::Pending, true, 300, (2, 0, -300)),
            ],
            credits: vec![
                credit(3, false, 500, (0, 0)),
                credit(5, true, 400, (2, 400)),
            ],
            pending: vec![pending(4, ("alice", 0), ("carol", 1), 300, NOW - 1_000)],
            sent_minor_by_currency: vec![(usd(), 2_000 + 300)],
            received_minor_by_currency: vec![(usd(), 400)],
            ..Default::default()
        };
        let shard_1 = ShardAudit {
            entry_sum_by_currency: vec![(usd(), 0)],
            totals: vec![
                (AccountKind::Funding, usd(), -7_000),
                (AccountKind::InFlight, usd(), -1_600),
                (AccountKind::User, usd(), 8_600),
            ],
            transfers: vec![
                entries(3, TransferState::Failed, true, 500, (4, 0, 0)),
                entries(5, TransferState::Pending, true, 400, (2, 0, -400)),
            ],
            credits: vec![credit(2, true, 2_000, (2, 2_000))],
            pending: vec![pending(5, ("carol", 1), ("alice", 0), 400, NOW - 1_000)],
            sent_minor_by_currency: vec![(usd(), 400)],
            received_minor_by_currency: vec![(usd(), 2_000)],
            ..Default::default()
        };
        World {
            shards: vec![shard_0, shard_1],
            seen_now: SeenNow::default(),
        }
    }

    impl World {
        fn judge(&self) -> AuditReport {
            evaluate(&self.shards, &self.seen_now, DEADLINE_MS, NOW)
        }
    }

    /// Transfer `n` as its payer's shard reads it, with (entries, net,
    /// payer's net).
    fn entries(
        n: u32,
        state: TransferState,
        cross_shard: bool,
        amount_minor: i64,
        (entries, net_minor, payer_net_minor): (i64, i128, i128),
    ) -> TransferEntries {
        TransferEntries {
            id: tid(n).to_string(),
            state,
            cross_shard,
            amount_minor,
            entries,
            net_minor,
            payer_net_minor,
        }
    }

    /// The credit of transfer `n`, with (entries, payee's net).
    fn credit(
        n: u32,
        credited: bool,
        amount_minor: i64,
        (entries, payee_net_minor): (i64, i128),
    ) -> CreditEntries {
        CreditEntries {
            transfer_id: tid(n).to_string(),
            credited,
            amount_minor,
            entries,
            payee_net_minor,
        }
    }

    fn mismatch(
        account: &str,
        kind: AccountKind,
        balance_minor: i64,
        entries_minor: i128,
    ) -> AccountMismatch {
        AccountMismatch {
            account: account.into(),
            kind,
            balance_minor,
            entries_minor,
        }
    }

    fn transfer_row(shard: &mut ShardAudit, n: u32) -> &mut TransferEntries {
        let id = tid(n).to_string();
        shard
            .transfers
            .iter_mut()
            .find(|t| t.id == id)
            .expect("that transfer")
    }

    fn add_to_total(shard: &mut ShardAudit, kind: AccountKind, delta: i128) {
        let total = shard
            .totals
            .iter_mut()
            .find(|(k, _, _)| *k == kind)
            .expect("a total of that kind");
        total.2 += delta;
    }

    fn check<'a>(report: &'a AuditReport, name: &str) -> &'a Check {
        report
            .checks
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no check {name}"))
    }

    /// The report failed, exactly `failing` failed (each saying why), and
    /// every other check passed with nothing to say.
    fn assert_fails_exactly(report: &AuditReport, failing: &[&str]) {
        assert!(!report.ok, "{report:#?}");
        let names: Vec<&str> = report.checks.iter().map(|c| c.name).collect();
        assert_eq!(names, ALL_CHECKS, "the checks and their order");
        let failed: Vec<&str> = report
            .checks
            .iter()
            .filter(|c| !c.ok)
            .map(|c| c.name)
            .collect();
        let mut want = failing.to_vec();
        want.sort_by_key(|name| ALL_CHECKS.iter().position(|c| c == name));
        assert_eq!(failed, want, "{report:#?}");
        for c in &report.checks {
            assert_eq!(c.ok, c.problems.is_empty(), "{c:?}");
        }
    }

    #[test]
    fn consistent_shards_pass_every_check() {
        let report = consistent().judge();
        assert!(report.ok, "{report:#?}");
        let names: Vec<&str> = report.checks.iter().map(|c| c.name).collect();
        assert_eq!(names, ALL_CHECKS);
        for c in &report.checks {
            assert!(c.ok && c.problems.is_empty(), "{c:?}");
        }
        assert_eq!(report.shards, 2);
        assert_eq!(report.pending_transfers, 2);
        assert_eq!(report.totals.len(), 1);
        let usd_totals = &report.totals[0];
        assert_eq!(usd_totals.currency, usd());
        assert_eq!(usd_totals.funded_minor, 22_000);
        assert_eq!(usd_totals.balances_minor, 21_700);
        assert_eq!(usd_totals.in_flight_minor, 300);
        assert_eq!(usd_totals.funded, "220.00");
    }

    /// `UPDATE accounts SET balance_minor = balance_minor + 1` on bob.
    #[test]
    fn a_balance_off_by_one_minor_unit_fails_balances_and_conservation() {
        let mut world = consistent();
        let shard = &mut world.shards[0];
        shard
            .accounts_to_check
            .push(mismatch("bob", AccountKind::User, 6_001, 6_000));
        add_to_total(shard, AccountKind::User, 1);
        let report = world.judge();
        assert_fails_exactly(&report, &["balances_match_entries", "money_conserved"]);
        assert_eq!(
            check(&report, "balances_match_entries").problems,
            ["shard 0: bob: balance 6001, entries 6000"]
        );
        assert_eq!(
            check(&report, "money_conserved").problems,
            ["USD: balances 217.01 + in flight 3.00 != funded 220.00"]
        );
    }

    /// One minor unit moved from alice to bob by editing both balances: the
    /// totals still add up, so only the entries can tell.
    #[test]
    fn balances_edited_to_cancel_out_are_caught_by_their_entries() {
        let mut world = consistent();
        world.shards[0].accounts_to_check = vec![
            mismatch("alice", AccountKind::User, 7_099, 7_100),
            mismatch("bob", AccountKind::User, 6_001, 6_000),
        ];
        let report = world.judge();
        assert_fails_exactly(&report, &["balances_match_entries"]);
        assert_eq!(check(&report, "balances_match_entries").problems.len(), 2);
    }

    /// bob's +10.00 entry of t1 deleted.
    #[test]
    fn a_missing_entry_fails_the_entry_checks() {
        let mut world = consistent();
        let shard = &mut world.shards[0];
        shard.entry_sum_by_currency = vec![(usd(), -1_000)];
        shard
            .accounts_to_check
            .push(mismatch("bob", AccountKind::User, 6_000, 5_000));
        *transfer_row(shard, 1) = entries(
            1,
            TransferState::Completed,
            false,
            1_000,
            (1, -1_000, -1_000),
        );
        let report = world.judge();
        assert_fails_exactly(
            &report,
            &[
                "entries_sum_to_zero",
                "balances_match_entries",
                "transfers_have_entries_exactly_once",
            ],
        );
        assert_eq!(
            check(&report, "entries_sum_to_zero").problems,
            ["shard 0: USD entries sum to -1000"]
        );
        assert!(
            check(&report, "transfers_have_entries_exactly_once").problems[0]
                .starts_with(&format!("shard 0: {}", tid(1)))
        );
    }

    /// bob's +10.00 entry of t1 written twice.
    #[test]
    fn a_duplicated_entry_fails_the_entry_checks() {
        let mut world = consistent();
        let shard = &mut world.shards[0];
        shard.entry_sum_by_currency = vec![(usd(), 1_000)];
        shard
            .accounts_to_check
            .push(mismatch("bob", AccountKind::User, 6_000, 7_000));
        *transfer_row(shard, 1) = entries(
            1,
            TransferState::Completed,
            false,
            1_000,
            (3, 1_000, -1_000),
        );
        let report = world.judge();
        assert_fails_exactly(
            &report,
            &[
                "entries_sum_to_zero",
                "balances_match_entries",
                "transfers_have_entries_exactly_once",
            ],
        );
        assert_eq!(
            check(&report, "entries_sum_to_zero").problems,
            ["shard 0: USD entries sum to 1000"]
        );
    }

    /// Both entries of t1 written twice and both balances moved with them:
    /// the shard balances, only the transfer's own entries show it was paid
    /// twice.
    #[test]
    fn a_same_shard_transfer_paid_twice_fails_only_the_exactly_once_check() {
        let mut world = consistent();
        *transfer_row(&mut world.shards[0], 1) =
            entries(1, TransferState::Completed, false, 1_000, (4, 0, -2_000));
        let report = world.judge();
        assert_fails_exactly(&report, &["transfers_have_entries_exactly_once"]);
    }

    /// Step (b) of t2 applied twice on shard 1 (carol +20.00 and in-flight
    /// -20.00 again): no money is created overall, but shard 1's in-flight
    /// account no longer matches what its transfers imply.
    #[test]
    fn a_credit_applied_twice_fails_in_flight_and_exactly_once() {
        let mut world = consistent();
        let shard = &mut world.shards[1];
        add_to_total(shard, AccountKind::User, 2_000);
        add_to_total(shard, AccountKind::InFlight, -2_000);
        shard.credits[0] = credit(2, true, 2_000, (4, 4_000));
        let report = world.judge();
        assert_fails_exactly(
            &report,
            &[
                "in_flight_matches_transfers",
                "transfers_have_entries_exactly_once",
            ],
        );
        assert_eq!(
            check(&report, "in_flight_matches_transfers").problems,
            ["shard 1: USD in-flight account holds -3600, transfers imply -1600"]
        );
    }

    /// The in-flight account's balance edited by one minor unit.
    #[test]
    fn an_in_flight_balance_off_by_one_fails_in_flight_balances_and_conservation() {
        let mut world = consistent();
        let shard = &mut world.shards[0];
        shard.accounts_to_check.push(mismatch(
            "~in_flight:USD",
            AccountKind::InFlight,
            1_901,
            1_900,
        ));
        add_to_total(shard, AccountKind::InFlight, 1);
        let report = world.judge();
        assert_fails_exactly(
            &report,
            &[
                "balances_match_entries",
                "in_flight_matches_transfers",
                "money_conserved",
            ],
        );
        assert_eq!(
            check(&report, "in_flight_matches_transfers").problems,
            ["shard 0: USD in-flight account holds 1901, transfers imply 1900"]
        );
    }

    /// Step (a) of t4 credited bob instead of the in-flight account: the
    /// transfer's entry count, its net and the payer's side are all right,
    /// balances follow entries and the total is kept; only the in-flight
    /// account is short of what the transfers imply.
    #[test]
    fn money_sent_to_a_customer_instead_of_in_flight_fails_only_the_in_flight_check() {
        let mut world = consistent();
        let shard = &mut world.shards[0];
        add_to_total(shard, AccountKind::InFlight, -300);
        add_to_total(shard, AccountKind::User, 300);
        let report = world.judge();
        assert_fails_exactly(&report, &["in_flight_matches_transfers"]);
        assert_eq!(
            check(&report, "in_flight_matches_transfers").problems,
            ["shard 0: USD in-flight account holds 1600, transfers imply 1900"]
        );
    }

    /// t2's amount changed from 20.00 to 20.01 on its payer's shard; the
    /// payee's shard still credited 20.00.
    #[test]
    fn a_transfer_amount_changed_fails_in_flight_and_exactly_once() {
        let mut world = consistent();
        let shard = &mut world.shards[0];
        transfer_row(shard, 2).amount_minor = 2_001;
        shard.sent_minor_by_currency = vec![(usd(), 2_301)];
        let report = world.judge();
        assert_fails_exactly(
            &report,
            &[
                "in_flight_matches_transfers",
                "transfers_have_entries_exactly_once",
            ],
        );
        assert_eq!(
            check(&report, "in_flight_matches_transfers").problems,
            ["shard 0: USD in-flight account holds 1900, transfers imply 1901"]
        );
        let problems = &check(&report, "transfers_have_entries_exactly_once").problems;
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert_eq!(problems[1], format!("{} of 2001 was credited 2000", tid(2)));
    }

    /// Shard 1 restored from a copy taken before t2's credit: every shard is
    /// consistent on its own, and money adds up (it is in flight), but a
    /// completed transfer has no credit anywhere.
    #[test]
    fn a_completed_transfer_without_its_credit_fails_the_exactly_once_check() {
        let mut world = consistent();
        let shard = &mut world.shards[1];
        add_to_total(shard, AccountKind::User, -2_000);
        add_to_total(shard, AccountKind::InFlight, 2_000);
        shard.received_minor_by_currency = vec![];
        shard.credits.clear();
        let report = world.judge();
        assert_fails_exactly(&report, &["transfers_have_entries_exactly_once"]);
        assert_eq!(
            check(&report, "transfers_have_entries_exactly_once").problems,
            [format!("{} completed but no shard credited it", tid(2))]
        );
    }

    /// Shard 1 read before t2's credit and shard 0 after t2 completed: the
    /// snapshots disagree, and the credit found when the audit looked again
    /// settles it. Found nowhere, it fails as above.
    #[test]
    fn a_credit_applied_between_two_snapshots_passes_once_found() {
        let mut world = consistent();
        let shard = &mut world.shards[1];
        add_to_total(shard, AccountKind::User, -2_000);
        add_to_total(shard, AccountKind::InFlight, 2_000);
        shard.received_minor_by_currency = vec![];
        shard.credits.clear();
        world.seen_now.credited.insert(tid(2).to_string());
        let report = world.judge();
        assert!(report.ok, "{report:#?}");
    }

    /// t6 carol -> alice 6.00 began after shard 1 (its payer's) was read and
    /// was credited before shard 0 was: a credit whose transfer the
    /// snapshots lack. It passes when the transfer is found afterwards, not
    /// failed and for the same amount, and fails otherwise.
    #[test]
    fn a_transfer_begun_between_two_snapshots_passes_once_found() {
        let with_late_credit = || {
            let mut world = consistent();
            let shard = &mut world.shards[0];
            shard.credits.push(credit(6, true, 600, (2, 600)));
            add_to_total(shard, AccountKind::User, 600);
            add_to_total(shard, AccountKind::InFlight, -600);
            shard.received_minor_by_currency = vec![(usd(), 1_000)];
            world
        };
        let report = with_late_credit().judge();
        assert_fails_exactly(&report, &["transfers_have_entries_exactly_once"]);
        assert_eq!(
            check(&report, "transfers_have_entries_exactly_once").problems,
            [format!(
                "{} credited 600 but no shard has its transfer",
                tid(6)
            )]
        );
        let mut world = with_late_credit();
        world
            .seen_now
            .transfers
            .insert(tid(6).to_string(), (TransferState::Pending, 600));
        let report = world.judge();
        assert!(report.ok, "{report:#?}");
        for (state, amount) in [
            (TransferState::Failed, 600),
            (TransferState::Completed, 601),
        ] {
            let mut world = with_late_credit();
            world
                .seen_now
                .transfers
                .insert(tid(6).to_string(), (state, amount));
            let report = world.judge();
            assert_fails_exactly(&report, &["transfers_have_entries_exactly_once"]);
        }
    }

    /// t4 left pending past the recovery deadline; exactly at the deadline
    /// it is still in time.
    #[test]
    fn a_stale_pending_transfer_fails_only_the_stale_check() {
        let mut world = consistent();
        world.shards[0].pending[0].created_at_ms = NOW - DEADLINE_MS;
        let report = world.judge();
        assert!(report.ok, "{report:#?}");

        world.shards[0].pending[0].created_at_ms = NOW - DEADLINE_MS - 1;
        let report = world.judge();
        assert_fails_exactly(&report, &["no_stale_pending_transfers"]);
        assert_eq!(
            check(&report, "no_stale_pending_transfers").problems,
            [format!("{} pending for 60 s (deadline 60 s)", tid(4))]
        );
        assert_eq!(report.pending_transfers, 2);
    }

    /// bob driven to -1.00 by an edit that also wrote the entry: the books
    /// balance, but a customer is below zero.
    #[test]
    fn a_negative_customer_balance_fails_only_that_check() {
        let mut world = consistent();
        world.shards[0]
            .accounts_to_check
            .push(mismatch("bob", AccountKind::User, -100, -100));
        let report = world.judge();
        assert_fails_exactly(&report, &["no_negative_balances"]);
        assert_eq!(
            check(&report, "no_negative_balances").problems,
            ["shard 0: bob: -100"]
        );
        // System accounts run negative by design.
        let mut world = consistent();
        world.shards[0].accounts_to_check.push(mismatch(
            "~funding:USD",
            AccountKind::Funding,
            -15_000,
            -15_000,
        ));
        assert!(world.judge().ok);
    }

    /// t3 marked failed on shard 1 without its reversal's two entries: the
    /// payer was never paid back.
    #[test]
    fn a_failed_transfer_without_its_reversal_fails_exactly_once() {
        let mut world = consistent();
        *transfer_row(&mut world.shards[1], 3) =
            entries(3, TransferState::Failed, true, 500, (2, 0, -500));
        let report = world.judge();
        assert_fails_exactly(&report, &["transfers_have_entries_exactly_once"]);
        assert_eq!(
            check(&report, "transfers_have_entries_exactly_once").problems,
            [format!(
                "shard 1: {} (failed, cross_shard=true): 2 entries, payer net -500, expected 4 entries and payer net 0",
                tid(3)
            )]
        );
    }

    /// The refused credit of t3 moved money anyway.
    #[test]
    fn a_refused_credit_that_moved_money_fails_exactly_once() {
        let mut world = consistent();
        world.shards[0].credits[0] = credit(3, false, 500, (2, 500));
        let report = world.judge();
        assert_fails_exactly(&report, &["transfers_have_entries_exactly_once"]);
    }

    /// A same-shard transfer recorded pending can only be a bug.
    #[test]
    fn a_pending_same_shard_transfer_fails_exactly_once() {
        let mut world = consistent();
        transfer_row(&mut world.shards[0], 1).state = TransferState::Pending;
        assert_fails_exactly(&world.judge(), &["transfers_have_entries_exactly_once"]);
    }

    /// Entries written under an id no transfer or credit has.
    #[test]
    fn an_account_left_open_after_its_move_fails_only_that_check() {
        let mut world = consistent();
        world.shards[0]
            .open_after_move
            .push(("alice".to_string(), 0));
        let report = world.judge();
        assert_fails_exactly(&report, &["moved_accounts_closed"]);
        assert!(
            check(&report, "moved_accounts_closed").problems[0].contains("alice"),
            "{:?}",
            check(&report, "moved_accounts_closed")
        );
    }

    /// A cross-shard transfer whose payee moved to the payer's shard (a
    /// reshard): its debit and credit pairs on one shard are both right,
    /// and one entry more is still caught.
    #[test]
    fn a_credit_that_followed_its_payee_to_the_payers_shard_passes() {
        let shard = |extra: i64| ShardAudit {
            transfers: vec![entries(
                6,
                TransferState::Completed,
                true,
                700,
                (4 + extra, 0, -700),
            )],
            credits: vec![credit(6, true, 700, (4 + extra, 700))],
            ..Default::default()
        };
        assert_eq!(entry_problems(&shard(0)), Vec::<String>::new());
        assert_eq!(entry_problems(&shard(1)).len(), 2);
    }

    #[test]
    fn orphan_entries_fail_exactly_once() {
        let mut world = consistent();
        world.shards[1].orphan_entries = 2;
        let report = world.judge();
        assert_fails_exactly(&report, &["transfers_have_entries_exactly_once"]);
        assert_eq!(
            check(&report, "transfers_have_entries_exactly_once").problems,
            ["shard 1: 2 entries belong to no transfer"]
        );
        assert_eq!(shard_problems(&world.shards[1]).len(), 1);
        assert!(shard_problems(&consistent().shards[1]).is_empty());
    }
}
