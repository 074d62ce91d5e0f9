//! Threads that own SQLite connections.
//!
//! SQLite allows one writer per file, and several connections writing one
//! file only add busy back-off latency. So each shard has exactly one writer
//! thread owning its write connection. It drains whatever jobs are queued
//! (up to [`MAX_GROUP_COMMIT`]) into one transaction, each job inside its own
//! savepoint, and answers the jobs only after the commit: one fsync serves
//! many transfers, and a job that fails rolls back alone. Readers run on a
//! small pool of threads with their own connections (WAL lets them read
//! while the writer writes).

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};

use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

use crate::ids::ShardId;
use crate::ledger::StoreError;

/// Most jobs one commit carries. Bounds the latency a job can add to the
/// others in its group and the work lost to one failed commit.
pub const MAX_GROUP_COMMIT: usize = 128;
/// Queue length per worker before callers wait (backpressure).
pub const QUEUE_LEN: usize = 4096;

type Reply = Box<dyn FnOnce(Option<StoreError>) + Send>;
/// A write job gets the connection inside an open transaction, or the error
/// that kept the transaction from opening (then it only answers that).
type WriteJob = Box<dyn FnOnce(Result<&Connection, StoreError>) -> (bool, Reply) + Send>;
type ReadJob = Box<dyn FnOnce(&Connection) + Send>;

/// The one writer of a shard file.
pub struct Writer {
    shard: ShardId,
    sender: mpsc::Sender<WriteJob>,
    thread: std::thread::JoinHandle<()>,
}

impl Writer {
    pub fn spawn(shard: ShardId, conn: Connection) -> Writer {
        let (sender, receiver) = mpsc::channel(QUEUE_LEN);
        let thread = std::thread::Builder::new()
            .name(format!("shard-{shard}-writer"))
            .spawn(move || write_loop(shard, conn, receiver))
            .expect("spawn writer thread");
        Writer {
            shard,
            sender,
            thread,
        }
    }

    /// Lets the queued jobs finish, then ends the thread and closes the
    /// file. Blocks until then.
    pub fn close(self) {
        drop(self.sender);
        let _ = self.thread.join();
    }

    /// Runs `job` inside a transaction; its writes are kept when it answers
    /// `Ok` and rolled back when it answers `Err`. Resolves after commit.
    pub async fn write<R, F>(&self, job: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> Result<R, StoreError> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let boxed: WriteJob = Box::new(move |conn| {
            let result = conn.and_then(job);
            let keep = result.is_ok();
            let reply: Reply = Box::new(move |commit_error| {
                let answer = match (commit_error, result) {
                    (Some(error), Ok(_)) => Err(error),
                    (_, result) => result,
                };
                let _ = tx.send(answer);
            });
            (keep, reply)
        });
        self.sender
            .send(boxed)
            .await
            .map_err(|_| stopped(self.shard))?;
        rx.await.map_err(|_| stopped(self.shard))?
    }
}

fn stopped(shard: ShardId) -> StoreError {
    StoreError::Internal {
        shard,
        reason: "the shard's storage thread stopped".into(),
    }
}

fn write_loop(shard: ShardId, conn: Connection, mut receiver: mpsc::Receiver<WriteJob>) {
    let mut batch: Vec<WriteJob> = Vec::with_capacity(MAX_GROUP_COMMIT);
    while let Some(first) = receiver.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_GROUP_COMMIT {
            match receiver.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        run_group(shard, &conn, &mut batch);
    }
}

fn run_group(shard: ShardId, conn: &Connection, batch: &mut Vec<WriteJob>) {
    if let Err(error) = conn.execute_batch("BEGIN IMMEDIATE") {
        let error = super::store_error(shard, error);
        for job in batch.drain(..) {
            let (_, reply) = job(Err(error.clone()));
            reply(None);
        }
        return;
    }
    let mut replies: Vec<Reply> = Vec::with_capacity(batch.len());
    for job in batch.drain(..) {
        if let Err(error) = conn.execute_batch("SAVEPOINT job") {
            let (_, reply) = job(Err(super::store_error(shard, error)));
            reply(None);
            continue;
        }
        match std::panic::catch_unwind(AssertUnwindSafe(|| job(Ok(conn)))) {
            Ok((keep, reply)) => {
                let end = if keep {
                    "RELEASE job"
                } else {
                    "ROLLBACK TO job; RELEASE job"
                };
                if let Err(error) = conn.execute_batch(end) {
                    reply(Some(super::store_error(shard, error)));
                    continue;
                }
                replies.push(reply);
            }
            Err(_) => {
                tracing::error!(%shard, "a storage job panicked; its writes are rolled back");
                let _ = conn.execute_batch("ROLLBACK TO job; RELEASE job");
            }
        }
    }
    let commit_error = conn
        .execute_batch("COMMIT")
        .err()
        .map(|error| super::store_error(shard, error));
    if commit_error.is_some() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    for reply in replies {
        reply(commit_error.clone());
    }
}

/// A pool of reader threads for one shard file.
pub struct Readers {
    shard: ShardId,
    sender: mpsc::Sender<ReadJob>,
}

impl Readers {
    pub fn spawn(shard: ShardId, connections: Vec<Connection>) -> Readers {
        let (sender, receiver) = mpsc::channel::<ReadJob>(QUEUE_LEN);
        let receiver = Arc::new(Mutex::new(receiver));
        for (i, conn) in connections.into_iter().enumerate() {
            let receiver = Arc::clone(&receiver);
            std::thread::Builder::new()
                .name(format!("shard-{shard}-reader-{i}"))
                .spawn(move || loop {
                    let job = match receiver.lock() {
                        Ok(mut guard) => guard.blocking_recv(),
                        Err(_) => None,
                    };
                    match job {
                        Some(job) => {
                            if std::panic::catch_unwind(AssertUnwindSafe(|| job(&conn))).is_err() {
                                tracing::error!(%shard, "a storage read panicked");
                            }
                        }
                        None => break,
                    }
                })
                .expect("spawn reader thread");
        }
        Readers { shard, sender }
    }

    pub async fn read<R, F>(&self, job: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> Result<R, StoreError> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let boxed: ReadJob = Box::new(move |conn| {
            let _ = tx.send(job(conn));
        });
        self.sender
            .send(boxed)
            .await
            .map_err(|_| stopped(self.shard))?;
        rx.await.map_err(|_| stopped(self.shard))?
    }
}
