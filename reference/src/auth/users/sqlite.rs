//! Users and account owners in one SQLite file (or in memory), behind a
//! mutex: one process, one writer. A claim is one transaction on the one
//! connection, so claims are atomic because they take turns.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Mutex;

use async_trait::async_trait;

use super::{unknown_owner, Credentials, UserStore};
use crate::auth::{AuthError, Role};

pub struct SqliteUsers {
    db: Mutex<rusqlite::Connection>,
}

impl SqliteUsers {
    /// Opens (creating if needed) the store at `path`, or one in memory
    /// when `None`.
    pub fn open(path: Option<&Path>) -> anyhow::Result<SqliteUsers> {
        let db = match path {
            Some(p) => rusqlite::Connection::open(p)?,
            None => rusqlite::Connection::open_in_memory()?,
        };
        db.execute_batch(
            "PRAGMA journal_mode=WAL;
             PRAGMA synchronous=FULL;
             CREATE TABLE IF NOT EXISTS users (
                 username TEXT PRIMARY KEY,
                 password_hash TEXT NOT NULL,
                 role TEXT NOT NULL,
                 created_at_ms INTEGER NOT NULL
             );
             CREATE TABLE IF NOT EXISTS account_owners (
                 account TEXT PRIMARY KEY,
                 owner TEXT NOT NULL REFERENCES users(username)
             );",
        )?;
        Ok(SqliteUsers { db: Mutex::new(db) })
    }

    /// [`UserStore::claim_owners`] (`record`) or
    /// [`UserStore::check_owners`], in one transaction.
    fn owners(&self, pairs: &[(&str, &str)], record: bool) -> Result<Vec<bool>, AuthError> {
        let mut db = self.db.lock().expect("auth db");
        let tx = db.transaction()?;
        let mut answers = Vec::with_capacity(pairs.len());
        {
            let mut user =
                tx.prepare_cached("SELECT 1 FROM users WHERE username = ?1 AND role = 'user'")?;
            let mut insert = tx.prepare_cached(
                "INSERT INTO account_owners (account, owner) VALUES (?1, ?2) ON CONFLICT(account) DO NOTHING",
            )?;
            let mut select =
                tx.prepare_cached("SELECT owner FROM account_owners WHERE account = ?1")?;
            let mut known = HashSet::new();
            for (account, owner) in pairs {
                if !known.contains(owner) {
                    if !user.exists([owner])? {
                        return Err(unknown_owner(owner));
                    }
                    known.insert(*owner);
                }
                if record {
                    insert.execute([account, owner])?;
                }
                let mut rows = select.query([account])?;
                let current: Option<String> = match rows.next()? {
                    Some(r) => Some(r.get(0)?),
                    None => None,
                };
                answers.push(current.is_none_or(|c| c == *owner));
            }
        }
        tx.commit()?;
        Ok(answers)
    }
}

#[async_trait]
impl UserStore for SqliteUsers {
    async fn add_user(
        &self,
        username: &str,
        password_hash: &str,
        role: Role,
    ) -> Result<(), AuthError> {
        let inserted = self.db.lock().expect("auth db").execute(
            "INSERT INTO users (username, password_hash, role, created_at_ms) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(username) DO NOTHING",
            rusqlite::params![username, password_hash, role.as_str(), crate::ledger::now_ms()],
        )?;
        if inserted == 0 {
            return Err(AuthError::Taken(username.into()));
        }
        Ok(())
    }

    async fn put_admin(&self, password_hash: &str) -> Result<(), AuthError> {
        self.db.lock().expect("auth db").execute(
            "INSERT INTO users (username, password_hash, role, created_at_ms) VALUES ('admin', ?1, 'admin', ?2)
             ON CONFLICT(username) DO UPDATE SET password_hash = excluded.password_hash, role = 'admin'",
            rusqlite::params![password_hash, crate::ledger::now_ms()],
        )?;
        Ok(())
    }

    async fn credentials(&self, username: &str) -> Result<Option<Credentials>, AuthError> {
        let db = self.db.lock().expect("auth db");
        let mut stmt =
            db.prepare_cached("SELECT password_hash, role FROM users WHERE username = ?1")?;
        let mut rows = stmt.query([username])?;
        Ok(match rows.next()? {
            Some(r) => Some(Credentials {
                password_hash: r.get(0)?,
                role: r.get(1)?,
            }),
            None => None,
        })
    }

    async fn check_owners(&self, pairs: &[(&str, &str)]) -> Result<Vec<bool>, AuthError> {
        self.owners(pairs, false)
    }

    async fn claim_owners(&self, pairs: &[(&str, &str)]) -> Result<Vec<bool>, AuthError> {
        self.owners(pairs, true)
    }

    async fn owner_of(&self, account: &str) -> Result<Option<String>, AuthError> {
        let db = self.db.lock().expect("auth db");
        let mut stmt = db.prepare_cached("SELECT owner FROM account_owners WHERE account = ?1")?;
        let mut rows = stmt.query([account])?;
        Ok(match rows.next()? {
            Some(r) => Some(r.get(0)?),
            None => None,
        })
    }
}
