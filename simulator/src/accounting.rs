//! The simulator's own books. Every transfer it sends is written down under
//! its idempotency key before it is sent, with what the system answered.
//! After the run the books are checked against the system:
//! - every transfer it saw accepted exists, once, with its payer, payee and
//!   amount, and has finished (completed or failed);
//! - each idempotent retry group made one transfer, and every replay
//!   matched the first answer;
//! - every account's balance is its opening balance plus what the books
//!   say it received minus what it paid: a transfer paid twice, or a
//!   refused one that moved money, shows here;
//! - the money total of the simulated accounts is unchanged;
//! - the system's transfer count grew by exactly the transfers accepted.
//!
//! A request whose answer never came (a timeout, a 5xx) is settled after
//! the run by sending it again with the same key and body, as a client
//! should: the system replays what happened, or does it now.

use std::collections::HashMap;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// Violations kept word for word in the report; the rest are counted.
pub const MAX_VIOLATIONS_KEPT: usize = 50;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Sent; no final answer yet.
    Unknown,
    /// The system took it: `state` is completed, pending or failed.
    Accepted { id: String, state: String },
    /// Refused before any money moved.
    Declined { code: String },
}

#[derive(Debug, Clone)]
pub struct Entry {
    pub payer: u32,
    pub payee: u32,
    pub amount_minor: i64,
    pub outcome: Outcome,
    /// Fraud-heavy traffic carries its label (true: fraudulent).
    pub fraud_label: Option<bool>,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<String, Entry>,
    violations: Vec<String>,
    violation_count: u64,
    retry_groups: u64,
}

#[derive(Default)]
pub struct Books {
    inner: Mutex<Inner>,
}

impl Books {
    pub fn sent(&self, key: &str, entry: Entry) {
        let mut inner = self.inner.lock().expect("books lock");
        inner.entries.insert(key.to_string(), entry);
    }

    /// Records a final answer; the first one stands.
    pub fn settle(&self, key: &str, outcome: Outcome) {
        let mut inner = self.inner.lock().expect("books lock");
        if let Some(e) = inner.entries.get_mut(key) {
            if e.outcome == Outcome::Unknown {
                e.outcome = outcome;
            }
        }
    }

    pub fn violation(&self, what: String) {
        let mut inner = self.inner.lock().expect("books lock");
        inner.violation_count += 1;
        if inner.violations.len() < MAX_VIOLATIONS_KEPT {
            inner.violations.push(what);
        }
    }

    pub fn retry_group(&self) {
        self.inner.lock().expect("books lock").retry_groups += 1;
    }

    pub fn entries(&self) -> Vec<(String, Entry)> {
        let inner = self.inner.lock().expect("books lock");
        inner
            .entries
            .iter()
            .map(|(k, e)| (k.clone(), e.clone()))
            .collect()
    }

    pub fn violations(&self) -> (u64, Vec<String>, u64) {
        let inner = self.inner.lock().expect("books lock");
        (
            inner.violation_count,
            inner.violations.clone(),
            inner.retry_groups,
        )
    }
}

/// One check of the books against the system.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct Accounting {
    pub ok: bool,
    pub checks: Vec<Check>,
    pub transfers_sent: u64,
    pub transfers_accepted: u64,
    pub transfers_declined: u64,
    /// Answers that never came, settled after the run by resending.
    pub settled_after_run: u64,
    /// Requests whose connection closed before an answer (a server closing
    /// keep-alive connections as it stops), sent again at once under the
    /// same key, as Stripe's client libraries do.
    #[serde(default)]
    pub resent_unanswered: u64,
    /// Still unknown after settling.
    pub unsettled: u64,
    pub retry_groups: u64,
    pub violations: Vec<String>,
    pub fraud: Fraud,
}

/// Labelled fraud-heavy transfers against what the system decided.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct Fraud {
    pub fraudulent_allowed: u64,
    pub fraudulent_refused: u64,
    pub legitimate_allowed: u64,
    pub legitimate_refused: u64,
    /// Refused fraudulent / all refused; null when nothing was refused.
    pub precision: Option<f64>,
    /// Refused fraudulent / all fraudulent; null with no fraudulent traffic.
    pub recall: Option<f64>,
}

impl Fraud {
    pub fn from_entries<'a>(entries: impl Iterator<Item = &'a Entry>) -> Fraud {
        let mut f = Fraud::default();
        for e in entries {
            let Some(fraudulent) = e.fraud_label else {
                continue;
            };
            let refused = matches!(&e.outcome, Outcome::Declined { code } if is_fraud_code(code));
            match (fraudulent, refused) {
                (true, true) => f.fraudulent_refused += 1,
                (true, false) => f.fraudulent_allowed += 1,
                (false, true) => f.legitimate_refused += 1,
                (false, false) => f.legitimate_allowed += 1,
            }
        }
        let refused = f.fraudulent_refused + f.legitimate_refused;
        let fraudulent = f.fraudulent_refused + f.fraudulent_allowed;
        f.precision = (refused > 0).then(|| f.fraudulent_refused as f64 / refused as f64);
        f.recall = (fraudulent > 0).then(|| f.fraudulent_refused as f64 / fraudulent as f64);
        f
    }
}

/// Error codes that mean a fraud decision refused the transfer.
pub fn is_fraud_code(code: &str) -> bool {
    code.starts_with("fraud") || code == "transfer_blocked" || code == "review_required"
}

/// Expected balance of every account from the books: opening balance plus
/// completed transfers in, minus completed transfers out. Pending
/// transfers must have finished before this is asked.
pub fn expected_balances(entries: &[(String, Entry)], opening_minor: &[i64]) -> Vec<i64> {
    let mut balances = opening_minor.to_vec();
    for (_, e) in entries {
        if let Outcome::Accepted { state, .. } = &e.outcome {
            if state == "completed" {
                balances[e.payer as usize] -= e.amount_minor;
                balances[e.payee as usize] += e.amount_minor;
            }
        }
    }
    balances
}

/// Compares balances read from the system with the books; returns the
/// check and the first few differences.
pub fn balance_check(names: &[String], expected: &[i64], actual: &HashMap<String, i64>) -> Check {
    let mut wrong = Vec::new();
    let mut wrong_count = 0;
    for (name, want) in names.iter().zip(expected) {
        let got = actual.get(name).copied();
        if got != Some(*want) {
            wrong_count += 1;
            if wrong.len() < 5 {
                wrong.push(format!(
                    "{name}: books {want}, system {}",
                    got.map(|g| g.to_string())
                        .unwrap_or_else(|| "missing".into())
                ));
            }
        }
    }
    Check {
        name: "balances match the books".into(),
        ok: wrong_count == 0,
        detail: if wrong_count == 0 {
            format!(
                "{} accounts, each balance equals opening + received - paid",
                names.len()
            )
        } else {
            format!("{wrong_count} accounts differ, e.g. {}", wrong.join("; "))
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(payer: u32, payee: u32, amount_minor: i64, outcome: Outcome) -> (String, Entry) {
        (
            format!("k{payer}{payee}{amount_minor}"),
            Entry {
                payer,
                payee,
                amount_minor,
                outcome,
                fraud_label: None,
            },
        )
    }

    #[test]
    fn only_completed_transfers_move_money_in_the_books() {
        let done = |id: &str| Outcome::Accepted {
            id: id.into(),
            state: "completed".into(),
        };
        let entries = vec![
            entry(0, 1, 30, done("a")),
            entry(1, 2, 5, done("b")),
            entry(
                2,
                0,
                7,
                Outcome::Declined {
                    code: "insufficient_funds".into(),
                },
            ),
            entry(
                2,
                0,
                9,
                Outcome::Accepted {
                    id: "c".into(),
                    state: "failed".into(),
                },
            ),
        ];
        let got = expected_balances(&entries, &[100, 100, 100]);
        assert_eq!(got, vec![70, 125, 105]);
        assert_eq!(got.iter().sum::<i64>(), 300);

        let names: Vec<String> = ["x", "y", "z"].iter().map(|s| s.to_string()).collect();
        let mut actual: HashMap<String, i64> =
            names.iter().cloned().zip(got.iter().copied()).collect();
        assert!(balance_check(&names, &got, &actual).ok);
        // A transfer paid twice shows.
        *actual.get_mut("x").unwrap() -= 30;
        *actual.get_mut("y").unwrap() += 30;
        let check = balance_check(&names, &got, &actual);
        assert!(!check.ok);
        assert!(
            check.detail.starts_with("2 accounts differ"),
            "{}",
            check.detail
        );
    }

    #[test]
    fn fraud_precision_and_recall() {
        let mut entries = Vec::new();
        for (label, code) in [
            (true, Some("fraud_blocked")),
            (true, Some("fraud_blocked")),
            (true, None),
            (false, Some("fraud_blocked")),
            (false, None),
            (false, Some("insufficient_funds")),
        ] {
            entries.push(Entry {
                payer: 0,
                payee: 1,
                amount_minor: 1,
                outcome: match code {
                    Some(c) => Outcome::Declined { code: c.into() },
                    None => Outcome::Accepted {
                        id: "t".into(),
                        state: "completed".into(),
                    },
                },
                fraud_label: Some(label),
            });
        }
        let f = Fraud::from_entries(entries.iter());
        assert_eq!((f.fraudulent_refused, f.fraudulent_allowed), (2, 1));
        assert_eq!((f.legitimate_refused, f.legitimate_allowed), (1, 2));
        assert_eq!(f.precision, Some(2.0 / 3.0));
        assert_eq!(f.recall, Some(2.0 / 3.0));
    }
}
