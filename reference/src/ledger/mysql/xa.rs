//! XA two-phase commit on a MySQL/MariaDB shard: the branches of a
//! cross-shard transfer, the coordinator's decision log, and what recovery
//! needs (`XA RECOVER`, commit or roll back from any session).
//!
//! Each branch runs on a connection of its own for its whole life (`XA
//! START` to `XA COMMIT`): a pooled connection handed back with a branch
//! open would carry it into the next request. A branch whose session is
//! given up (an error, a cancelled request) has its connection closed, not
//! pooled, which detaches the prepared branch for recovery to find. XA
//! statements are not preparable and their ids cannot be bound, so they go
//! as plain text built from ids this module checks.

use std::time::Duration;

use async_trait::async_trait;
use sqlx::{Executor, Row};

use super::{attempts, classify, Held, MysqlShard, DUPLICATE_KEY, MAX_ATTEMPTS};
use crate::ledger::book;
use crate::ledger::{
    now_ms, BranchId, DebitOutcome, Decision, IdempotencyWrite, PreparedBranch, PreparedDebit,
    StoreError, TimestampMs, Transfer, TransferState, TwoPhase,
};

/// The formatID of our XA transactions ("SP"), so recovery leaves other
/// applications' branches on a shared server alone.
const FORMAT_ID: i64 = 0x5350;
/// XAER_NOTA: no such branch (already committed or rolled back).
const XAER_NOTA: u16 = 1397;

impl Decision {
    fn as_str(self) -> &'static str {
        match self {
            Decision::Commit => "commit",
            Decision::Abort => "abort",
        }
    }
}

impl MysqlShard {
    /// The XA id of a branch on this shard as SQL text:
    /// `'gtrid','s<shard>-<tag>',formatID`.
    fn xid(&self, id: &BranchId) -> Result<String, StoreError> {
        let safe = !id.gtrid.is_empty()
            && id.gtrid.len() <= 64
            && id.shard == self.shard
            && id
                .gtrid
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !safe {
            return Err(StoreError::Internal {
                shard: self.shard,
                reason: format!("refusing XA id {:?} for shard {}", id.gtrid, id.shard),
            });
        }
        Ok(format!("'{}','{}',{FORMAT_ID}", id.gtrid, self.xa_bqual))
    }
}

fn error_number(error: &sqlx::Error) -> u16 {
    match error {
        sqlx::Error::Database(db) => db
            .try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
            .map(|e| e.number())
            .unwrap_or(0),
        _ => 0,
    }
}

/// Ends and rolls back a branch that has not been prepared. Answers
/// whether the session confirmed it (the connection may be pooled again);
/// if not, the held connection is closed when dropped, and the server
/// rolls the branch back itself.
pub(super) async fn abort_open(held: &mut Held, xid: &str) -> bool {
    let _ = held.text(&format!("XA END {xid}")).await;
    match held.text(&format!("XA ROLLBACK {xid}")).await {
        Ok(()) => true,
        Err(e) => error_number(&e) == XAER_NOTA,
    }
}

/// A prepared branch and the session that prepared it. Never pooled while
/// it holds the branch: dropped unresolved, the connection is closed.
struct MysqlBranch {
    id: BranchId,
    xid: String,
    held: Option<Held>,
}

impl MysqlBranch {
    async fn prepare(
        id: &BranchId,
        xid: String,
        mut held: Held,
    ) -> Result<MysqlBranch, StoreError> {
        if let Err(e) = held.text(&format!("XA PREPARE {xid}")).await {
            // Whether it was prepared is unknown if the connection broke;
            // either way no decision exists, so recovery rolls it back.
            let _ = held.text(&format!("XA ROLLBACK {xid}")).await;
            return Err(classify(id.shard, &e).1);
        }
        Ok(MysqlBranch {
            id: id.clone(),
            xid,
            held: Some(held),
        })
    }

    async fn finish(&mut self, decision: Decision) -> Result<(), StoreError> {
        let Some(mut held) = self.held.take() else {
            return Ok(());
        };
        let verb = match decision {
            Decision::Commit => "COMMIT",
            Decision::Abort => "ROLLBACK",
        };
        match held.text(&format!("XA {verb} {}", self.xid)).await {
            Ok(()) => {
                drop(held.release());
                Ok(())
            }
            Err(e) => Err(classify(self.id.shard, &e).1),
        }
    }
}

#[async_trait]
impl PreparedBranch for MysqlBranch {
    fn id(&self) -> &BranchId {
        &self.id
    }

    async fn commit(mut self: Box<Self>) -> Result<(), StoreError> {
        self.finish(Decision::Commit).await
    }

    async fn rollback(mut self: Box<Self>) -> Result<(), StoreError> {
        self.finish(Decision::Abort).await
    }

    async fn abandon(mut self: Box<Self>) {
        if let Some(held) = self.held.take() {
            let _ = held.release().close().await;
        }
    }
}

#[async_trait]
impl TwoPhase for MysqlShard {
    async fn prepare_debit(
        &self,
        id: &BranchId,
        transfer: &Transfer,
        idempotency: Option<IdempotencyWrite>,
    ) -> Result<PreparedDebit, StoreError> {
        let xid = self.xid(id)?;
        let step = (TransferState::Completed, "transfer.completed");
        let (mut held, outcome) = attempts!(self, Some(&xid), |s| book::debit_to_in_flight(
            s,
            transfer,
            step,
            idempotency.as_ref()
        ))?;
        match outcome {
            DebitOutcome::Applied(_) => Ok(PreparedDebit::Prepared(Box::new(
                MysqlBranch::prepare(id, xid, held).await?,
            ))),
            DebitOutcome::Declined(refusal) => {
                // The decline moves no money: keep it under the key now.
                if let Err(e) = held.text(&format!("XA COMMIT {xid} ONE PHASE")).await {
                    return Err(classify(self.shard, &e).1);
                }
                drop(held.release());
                Ok(PreparedDebit::Declined(refusal))
            }
        }
    }

    async fn prepare_credit(
        &self,
        id: &BranchId,
        transfer: &Transfer,
    ) -> Result<Box<dyn PreparedBranch>, StoreError> {
        let xid = self.xid(id)?;
        let (mut held, refusal) = attempts!(self, Some(&xid), |s| book::credit_out_of_flight(
            s, transfer
        ))?;
        if let Some(refusal) = refusal {
            if held.text(&format!("XA ROLLBACK {xid}")).await.is_ok() {
                drop(held.release());
            }
            return Err(refusal.into());
        }
        Ok(Box::new(MysqlBranch::prepare(id, xid, held).await?))
    }

    async fn decide(&self, gtrid: &str, decision: Decision) -> Result<Decision, StoreError> {
        let inserted = sqlx::query(
            "INSERT INTO xa_decisions (gtrid, decision, created_at_ms) VALUES (?, ?, ?)",
        )
        .bind(gtrid)
        .bind(decision.as_str())
        .bind(now_ms())
        .execute(&self.decisions)
        .await;
        match inserted {
            Ok(_) => Ok(decision),
            Err(e) if error_number(&e) == DUPLICATE_KEY => {
                self.decision(gtrid)
                    .await?
                    .ok_or_else(|| StoreError::Internal {
                        shard: self.shard,
                        reason: format!("decision for {gtrid} vanished"),
                    })
            }
            Err(e) => Err(classify(self.shard, &e).1),
        }
    }

    async fn decision(&self, gtrid: &str) -> Result<Option<Decision>, StoreError> {
        let row = sqlx::query("SELECT decision FROM xa_decisions WHERE gtrid = ?")
            .bind(gtrid)
            .fetch_optional(&self.decisions)
            .await
            .map_err(|e| classify(self.shard, &e).1)?;
        let Some(row) = row else { return Ok(None) };
        let text: Vec<u8> = row
            .try_get_unchecked(0)
            .map_err(|e| classify(self.shard, &e).1)?;
        let text = String::from_utf8_lossy(&text);
        match &*text {
            "commit" => Ok(Some(Decision::Commit)),
            "abort" => Ok(Some(Decision::Abort)),
            other => Err(StoreError::Internal {
                shard: self.shard,
                reason: format!("decision {other:?} for {gtrid}"),
            }),
        }
    }

    async fn forget_decisions(
        &self,
        before: TimestampMs,
        keep: &[String],
    ) -> Result<u64, StoreError> {
        if keep.len() > 1_000 {
            return Ok(0);
        }
        let mut sql = String::from("DELETE FROM xa_decisions WHERE created_at_ms < ?");
        if !keep.is_empty() {
            sql.push_str(" AND gtrid NOT IN (");
            sql.push_str(&vec!["?"; keep.len()].join(", "));
            sql.push(')');
        }
        sql.push_str(" LIMIT 1000");
        let mut query = sqlx::query(&sql).bind(before);
        for gtrid in keep {
            query = query.bind(gtrid);
        }
        let done = query
            .execute(&self.decisions)
            .await
            .map_err(|e| classify(self.shard, &e).1)?;
        Ok(done.rows_affected())
    }

    async fn in_doubt(&self) -> Result<Vec<BranchId>, StoreError> {
        let mut held = self.hold().await?;
        let rows = held
            .conn()
            .fetch_all("XA RECOVER")
            .await
            .map_err(|e| classify(self.shard, &e).1)?;
        drop(held.release());
        let mut found = Vec::new();
        for row in rows {
            let number = |i: usize| -> i64 {
                row.try_get_unchecked::<i64, _>(i)
                    .or_else(|_| row.try_get_unchecked::<i32, _>(i).map(i64::from))
                    .unwrap_or(-1)
            };
            if number(0) != FORMAT_ID {
                continue;
            }
            let gtrid_length = number(1).max(0) as usize;
            let data: Vec<u8> = row.try_get_unchecked(3).unwrap_or_default();
            if data.len() < gtrid_length {
                continue;
            }
            let (gtrid, bqual) = data.split_at(gtrid_length);
            let (Ok(gtrid), Ok(bqual)) = (std::str::from_utf8(gtrid), std::str::from_utf8(bqual))
            else {
                continue;
            };
            // A branch of another database on the same server (another
            // shard, another deployment) is not this shard's to resolve.
            if bqual == self.xa_bqual && BranchId::coordinator(gtrid).is_some() {
                found.push(BranchId {
                    gtrid: gtrid.to_string(),
                    shard: self.shard,
                });
            }
        }
        Ok(found)
    }

    async fn resolve(&self, id: &BranchId, decision: Decision) -> Result<(), StoreError> {
        let xid = self.xid(id)?;
        let mut held = self.hold().await?;
        let verb = match decision {
            Decision::Commit => "COMMIT",
            Decision::Abort => "ROLLBACK",
        };
        match held.text(&format!("XA {verb} {xid}")).await {
            Ok(()) => {
                drop(held.release());
                Ok(())
            }
            Err(e) if error_number(&e) == XAER_NOTA => {
                drop(held.release());
                Ok(())
            }
            Err(e) => Err(classify(self.shard, &e).1),
        }
    }
}
