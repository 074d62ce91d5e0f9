//! `shardpay audit --data-dir` over shard files edited while the server is
//! stopped: the untouched files pass, and each edit makes the audit exit 1
//! and name exactly the checks that caught it.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;
use shardpay_reference::sharding::Ring;

use crate::{assert_audit_passes, post, serve};

/// Every check `shardpay audit` prints for SQLite shards, in its order.
const CHECKS: [&str; 8] = [
    "entries_sum_to_zero",
    "balances_match_entries",
    "no_negative_balances",
    "in_flight_matches_transfers",
    "transfers_have_entries_exactly_once",
    "money_conserved",
    "no_stale_pending_transfers",
    "moved_accounts_closed",
];

/// One edit of one shard file, and the checks it must fail.
struct Corruption<'a> {
    what: &'a str,
    /// The account whose shard's file is edited.
    on_shard_of: &'a str,
    sql: &'a str,
    params: Vec<String>,
    fails: &'a [&'a str],
}

#[test]
fn shardpay_audit_exits_1_naming_the_check_a_corrupted_shard_file_fails() {
    let ring = Ring::new(4).unwrap();
    let shard = |id: &str| ring.shard_of_key(id);
    let payer = "audit_payer";
    let near = (0..)
        .map(|i| format!("audit_near_{i}"))
        .find(|id| shard(id) == shard(payer))
        .unwrap();
    let far = (0..)
        .map(|i| format!("audit_far_{i}"))
        .find(|id| shard(id) != shard(payer))
        .unwrap();

    let served = tempfile::tempdir().unwrap();
    let (same_shard, cross_shard) = {
        let server = serve(served.path(), None);
        for (id, opening) in [(payer, "100.00"), (near.as_str(), "0"), (far.as_str(), "0")] {
            let body = json!({"id": id, "opening_balance": opening});
            let (status, answer) = post(&format!("{}/v1/accounts", server.url), body, id).unwrap();
            assert_eq!(status, 201, "{answer}");
        }
        let mut ids = Vec::new();
        for (n, (from, to, amount)) in [
            (payer, near.as_str(), "10.00"),
            (payer, far.as_str(), "20.00"),
            (far.as_str(), payer, "1.00"),
        ]
        .into_iter()
        .enumerate()
        {
            let body = json!({"from": from, "to": to, "amount": amount});
            let (status, answer) = post(
                &format!("{}/v1/transfers", server.url),
                body,
                &format!("audit-{n}"),
            )
            .unwrap();
            assert_eq!(status, 201, "{answer}");
            assert_eq!(answer["state"], "completed", "{answer}");
            ids.push(answer["id"].as_str().unwrap().to_string());
        }
        assert_audit_passes(&server.url);
        (ids[0].clone(), ids[1].clone())
        // The server is killed here; its files stay as it left them.
    };

    // The files as the server left them pass offline too, so every failure
    // below is the edit's doing.
    let untouched = copy_of(served.path());
    let (code, text) = audit_files(untouched.path());
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("audit passed"), "{text}");
    assert_eq!(failed_checks(&text), Vec::<String>::new(), "{text}");

    let entry_checks: &[&str] = &[
        "entries_sum_to_zero",
        "balances_match_entries",
        "transfers_have_entries_exactly_once",
    ];
    let corruptions = [
        Corruption {
            what: "a customer balance off by one minor unit",
            on_shard_of: &near,
            sql: "UPDATE accounts SET balance_minor = balance_minor + 1 WHERE id = ?1",
            params: vec![near.clone()],
            fails: &["balances_match_entries", "money_conserved"],
        },
        Corruption {
            what: "the payee's entry of a same-shard transfer deleted",
            on_shard_of: payer,
            sql: "DELETE FROM ledger_entries WHERE transfer_id = ?1 AND account_id = ?2",
            params: vec![same_shard.clone(), near.clone()],
            fails: entry_checks,
        },
        Corruption {
            what: "the payee's entry of a same-shard transfer written twice",
            on_shard_of: payer,
            sql: "INSERT INTO ledger_entries (transfer_id, account_id, amount_minor, currency, created_at_ms)
                  SELECT transfer_id, account_id, amount_minor, currency, created_at_ms
                  FROM ledger_entries WHERE transfer_id = ?1 AND account_id = ?2",
            params: vec![same_shard.clone(), near.clone()],
            fails: entry_checks,
        },
        Corruption {
            what: "the in-flight account's balance off by one minor unit",
            on_shard_of: payer,
            sql: "UPDATE accounts SET balance_minor = balance_minor + 1 WHERE kind = 'in_flight'",
            params: vec![],
            fails: &[
                "balances_match_entries",
                "in_flight_matches_transfers",
                "money_conserved",
            ],
        },
        Corruption {
            what: "a cross-shard transfer's amount changed on its payer's shard",
            on_shard_of: payer,
            sql: "UPDATE transfers SET amount_minor = amount_minor + 1 WHERE id = ?1",
            params: vec![cross_shard.clone()],
            fails: &[
                "in_flight_matches_transfers",
                "transfers_have_entries_exactly_once",
            ],
        },
        Corruption {
            // Credited on the payee's shard, so the entries and the credit
            // count still agree: only its age is wrong.
            what: "a cross-shard transfer left pending for an hour",
            on_shard_of: payer,
            sql: "UPDATE transfers SET state = 'pending',
                         created_at_ms = created_at_ms - 3600000,
                         updated_at_ms = created_at_ms - 3600000
                  WHERE id = ?1",
            params: vec![cross_shard.clone()],
            fails: &["no_stale_pending_transfers"],
        },
        Corruption {
            what: "an account marked moved to another shard but left open here",
            on_shard_of: payer,
            sql: "INSERT INTO moved_accounts (id, to_shard, transfer_id, moved_at_ms)
                  VALUES (?1, 3, NULL, 0)",
            params: vec![payer.to_string()],
            fails: &["moved_accounts_closed"],
        },
    ];
    for c in &corruptions {
        let copy = copy_of(served.path());
        let file = copy
            .path()
            .join(format!("shard-{}.sqlite3", shard(c.on_shard_of)));
        let changed = {
            let conn = rusqlite::Connection::open(&file).unwrap();
            conn.execute(c.sql, rusqlite::params_from_iter(&c.params))
                .unwrap_or_else(|e| panic!("{}: {e}", c.what))
        };
        assert_eq!(changed, 1, "{}: rows changed", c.what);

        let (code, text) = audit_files(copy.path());
        assert_eq!(code, Some(1), "{}:\n{text}", c.what);
        assert!(text.contains("audit FAILED"), "{}:\n{text}", c.what);
        assert_eq!(failed_checks(&text), c.fails, "{}:\n{text}", c.what);
        // The others were run and passed.
        for name in CHECKS.iter().filter(|name| !c.fails.contains(name)) {
            assert!(
                text.lines().any(|l| l.trim_end() == format!("ok   {name}")),
                "{}: {name} should pass:\n{text}",
                c.what
            );
        }
    }
}

/// `shardpay audit --data-dir DIR`: its exit code, and stdout then stderr.
fn audit_files(dir: &Path) -> (Option<i32>, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_shardpay"))
        .args(["audit", "--data-dir"])
        .arg(dir)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.code(), text)
}

/// The names on the audit's `FAIL <check>` lines, in order.
fn failed_checks(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("FAIL "))
        .map(|name| name.trim().to_string())
        .collect()
}

/// A copy of a stopped server's data directory. SQLite's `-shm` index is
/// left behind: it is rebuilt from the `-wal` log on open.
fn copy_of(dir: &Path) -> tempfile::TempDir {
    let copy = tempfile::tempdir().unwrap();
    copy_files(dir, copy.path());
    copy
}

fn copy_files(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let path: PathBuf = entry.path();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            std::fs::create_dir(&target).unwrap();
            copy_files(&path, &target);
        } else if !path.to_string_lossy().ends_with("-shm") {
            std::fs::copy(&path, &target).unwrap();
        }
    }
}
