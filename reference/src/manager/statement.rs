//! An account's statement across every shard it has lived on.
//!
//! A reshard moves an account's balance, not its history: the entries
//! written before a move stay on the shard that was its home then (they
//! balance there, against that shard's other entries), and the new home's
//! entries start with the move's credit. So the statement reads the
//! account's entries from every shard and merges them in time order.
//! Entry ids order the entries of one shard only, so where a page left
//! off is one entry id per shard: the [`StatementCursor`].

use std::collections::BTreeMap;

use serde::Serialize;

use super::{ManagerError, ShardManager};
use crate::ids::AccountId;
use crate::ledger::LedgerEntry;

/// Longest cursor accepted: a `shard:id` pair per shard of the most a
/// system opens, each at most 3 + 1 + 19 characters, with commas.
const MAX_CURSOR_LEN: usize = crate::ids::MAX_SHARDS as usize * 24;

/// Where a statement's page left off: the id of the last entry read from
/// each shard. Written as `shard:id` pairs joined by commas (`0:17,4:3`);
/// a shard not named starts from its first entry. `0` (or nothing) is the
/// start of the statement.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatementCursor(BTreeMap<usize, i64>);

impl StatementCursor {
    /// Reads a cursor for a system of `shards` shard stores. The error says
    /// what is wrong with it.
    pub fn parse(text: &str, shards: usize) -> Result<StatementCursor, String> {
        const HOW: &str = "after takes the next_after of the previous page \
                           (shard:entry_id pairs joined by commas, such as 0:17,4:3)";
        let text = text.trim();
        if text.is_empty() || text == "0" {
            return Ok(StatementCursor::default());
        }
        if text.len() > MAX_CURSOR_LEN {
            return Err(format!("after is too long; {HOW}"));
        }
        let mut at = BTreeMap::new();
        for pair in text.split(',') {
            let (shard, id) = pair
                .split_once(':')
                .ok_or_else(|| format!("after: {pair:?} is not shard:entry_id; {HOW}"))?;
            let shard: usize = shard.parse().ok().filter(|s| *s < shards).ok_or_else(|| {
                format!(
                    "after: {shard:?} is not a shard of this system (0 to {}); {HOW}",
                    shards - 1
                )
            })?;
            let id: i64 = id
                .parse()
                .ok()
                .filter(|id| *id >= 0)
                .ok_or_else(|| format!("after: {id:?} is not an entry id; {HOW}"))?;
            if at.insert(shard, id).is_some() {
                return Err(format!("after names shard {shard} twice; {HOW}"));
            }
        }
        Ok(StatementCursor(at))
    }

    /// The id after which `shard`'s entries are read.
    pub fn after(&self, shard: usize) -> i64 {
        self.0.get(&shard).copied().unwrap_or(0)
    }

    /// As `parse` reads it.
    pub fn render(&self) -> String {
        self.0
            .iter()
            .map(|(shard, id)| format!("{shard}:{id}"))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// One line of a statement: a ledger entry and the shard that holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StatementEntry {
    pub shard: usize,
    #[serde(flatten)]
    pub entry: LedgerEntry,
}

/// A page of a statement, and where the next one starts (`None`: this
/// page reached the end).
#[derive(Debug, Clone)]
pub struct StatementPage {
    pub entries: Vec<StatementEntry>,
    pub next: Option<StatementCursor>,
}

impl ShardManager {
    /// At most `limit` of an account's entries after `cursor`, oldest
    /// first, from every shard that holds some (its home, and the homes a
    /// reshard moved it away from). Every shard is asked, at once: a shard
    /// that cannot answer fails the page rather than leaving a gap in it.
    pub async fn statement(
        &self,
        account: &AccountId,
        cursor: &StatementCursor,
        limit: u32,
    ) -> Result<StatementPage, ManagerError> {
        let reads = self.shards.iter().enumerate().map(|(shard, store)| {
            let after = cursor.after(shard);
            async move { store.account_entries(account, after, limit).await }
        });
        let pages = futures_util::future::try_join_all(reads).await?;
        Ok(merge(pages, cursor, limit))
    }
}

/// Merges each shard's entries (each in its own id order) by the time
/// they were written (ties: debits first, then by shard), keeping each
/// shard's order: takes at
/// most `limit`, and moves the cursor past the ones taken.
fn merge(pages: Vec<Vec<LedgerEntry>>, cursor: &StatementCursor, limit: u32) -> StatementPage {
    let limit = limit as usize;
    let mut next = cursor.clone();
    let mut heads = vec![0usize; pages.len()];
    let mut entries = Vec::new();
    while entries.len() < limit {
        let pick = (0..pages.len())
            .filter(|&s| heads[s] < pages[s].len())
            .min_by_key(|&s| {
                let e = &pages[s][heads[s]];
                // A move's debit and credit can share a millisecond: the
                // debit (at the home it leaves) comes first.
                (e.created_at_ms, e.amount_minor > 0, s)
            });
        let Some(shard) = pick else { break };
        let entry = pages[shard][heads[shard]].clone();
        heads[shard] += 1;
        next.0.insert(shard, entry.id);
        entries.push(StatementEntry { shard, entry });
    }
    // A shard that filled its page may hold more beyond it.
    let more = pages
        .iter()
        .enumerate()
        .any(|(s, page)| heads[s] < page.len() || page.len() == limit);
    StatementPage {
        next: (entries.len() == limit && more).then_some(next),
        entries,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: i64, at: i64, amount: i64) -> LedgerEntry {
        LedgerEntry {
            id,
            transfer_id: format!("t{id}"),
            account_id: "alice".into(),
            amount_minor: amount,
            currency: "INR".into(),
            created_at_ms: at,
        }
    }

    #[test]
    fn cursors_read_back_what_they_render_and_refuse_the_rest() {
        let c = StatementCursor::parse("0:17,4:3", 5).unwrap();
        assert_eq!((c.after(0), c.after(4), c.after(2)), (17, 3, 0));
        assert_eq!(c.render(), "0:17,4:3");
        assert_eq!(StatementCursor::parse(&c.render(), 5).unwrap(), c);
        assert_eq!(StatementCursor::parse("0", 4).unwrap().render(), "");
        assert_eq!(StatementCursor::parse("", 4).unwrap().render(), "");
        for bad in [
            "17",
            "4:3",
            "0:-1",
            "0:x",
            "x:1",
            "0:1,0:2",
            "0:1,",
            ":",
            "0:99999999999999999999",
        ] {
            let err = StatementCursor::parse(bad, 4).unwrap_err();
            assert!(err.contains("next_after"), "{bad}: {err}");
        }
        assert!(StatementCursor::parse(&"0:1,".repeat(1000), 4).is_err());
    }

    #[test]
    fn a_moved_accounts_entries_merge_in_time_order_and_page_without_gaps() {
        // Home on shard 0, moved to 4 at t=30, back to 0 at t=60.
        let shard0 = vec![
            entry(1, 10, 100),
            entry(2, 20, -5),
            entry(3, 30, -95),
            entry(9, 60, 90),
            entry(10, 70, -1),
        ];
        let shard4 = vec![entry(1, 31, 95), entry(2, 40, -5), entry(3, 59, -90)];
        let all = |cursor: &StatementCursor, limit: u32| {
            let pages = vec![
                shard0
                    .iter()
                    .filter(|e| e.id > cursor.after(0))
                    .take(limit as usize)
                    .cloned()
                    .collect(),
                vec![],
                vec![],
                vec![],
                shard4
                    .iter()
                    .filter(|e| e.id > cursor.after(4))
                    .take(limit as usize)
                    .cloned()
                    .collect(),
            ];
            merge(pages, cursor, limit)
        };
        let mut cursor = StatementCursor::default();
        let mut seen = Vec::new();
        loop {
            let page = all(&cursor, 3);
            assert!(page.entries.len() <= 3);
            seen.extend(page.entries.iter().map(|e| (e.shard, e.entry.id)));
            match page.next {
                Some(next) => {
                    cursor = StatementCursor::parse(&next.render(), 5).unwrap();
                }
                None => break,
            }
        }
        assert_eq!(
            seen,
            [
                (0, 1),
                (0, 2),
                (0, 3),
                (4, 1),
                (4, 2),
                (4, 3),
                (0, 9),
                (0, 10)
            ]
        );
        // One page holding everything says there is no next one.
        assert!(all(&StatementCursor::default(), 20).next.is_none());

        // A move back in one millisecond: the debit at the home it leaves
        // (shard 4) before the credit at the one it returns to (shard 0).
        let pages = vec![
            vec![entry(5, 100, 70)],
            vec![],
            vec![],
            vec![],
            vec![entry(2, 100, -70)],
        ];
        let page = merge(pages, &StatementCursor::default(), 10);
        let order: Vec<(usize, i64)> = page
            .entries
            .iter()
            .map(|e| (e.shard, e.entry.amount_minor))
            .collect();
        assert_eq!(order, [(4, -70), (0, 70)]);
    }
}
