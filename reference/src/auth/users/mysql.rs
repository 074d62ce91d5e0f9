//! Users and account owners in a MySQL/MariaDB database of their own, which
//! every auth replica shares. Names compare as bytes (`utf8mb4_bin`), as
//! in SQLite. An account's owner is its primary key: of two concurrent
//! claims of one account, InnoDB lets one insert and makes the other wait
//! for it and then find the row, so exactly one owner wins.

use std::collections::HashSet;

use async_trait::async_trait;
use sqlx::{MySqlConnection, MySqlPool};

use super::{unknown_owner, Credentials, UserStore};
use crate::auth::{AuthError, Role};
use crate::ledger::mysql::{MysqlConfig, MAX_ATTEMPTS};

/// The database the auth service uses on the first shard's server when no
/// URL of its own is given.
pub const DATABASE: &str = "shardpay_auth";

/// The tables, created at start when missing, so replicas starting at once
/// all find them (MySQL serialises the DDL). When a table first changes,
/// number the changes as the shard schema does (`ledger/mysql/schema.rs`).
const TABLES: &[&str] = &[
    r#"CREATE TABLE IF NOT EXISTS users (
        username       VARCHAR(64) NOT NULL PRIMARY KEY,
        password_hash  VARCHAR(255) NOT NULL,
        role           VARCHAR(16) NOT NULL CHECK (role IN ('user', 'admin', 'service')),
        created_at_ms  BIGINT NOT NULL
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin"#,
    r#"CREATE TABLE IF NOT EXISTS account_owners (
        account  VARCHAR(64) NOT NULL PRIMARY KEY,
        owner    VARCHAR(64) NOT NULL,
        KEY account_owners_owner (owner)
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin"#,
];

const DEADLOCK: u16 = 1213;
const LOCK_WAIT_TIMEOUT: u16 = 1205;
const DUPLICATE_KEY: u16 = 1062;

/// The URL of database [`DATABASE`] on the server of `shard_url` (same
/// user, password and options).
pub fn database_beside(shard_url: &str) -> anyhow::Result<String> {
    crate::ledger::mysql::database_beside(shard_url, DATABASE)
}

pub struct MysqlUsers {
    pool: MySqlPool,
}

impl MysqlUsers {
    /// Connects to the database `url` names
    /// (`mysql://user:password@host:port/database`), creating it and its
    /// tables when missing.
    pub async fn connect(url: &str, config: &MysqlConfig) -> anyhow::Result<MysqlUsers> {
        let pool =
            crate::ledger::mysql::open_side_database(url, "auth", DATABASE, TABLES, config).await?;
        Ok(MysqlUsers { pool })
    }

    /// [`UserStore::claim_owners`] (`record`) or
    /// [`UserStore::check_owners`], in one transaction, run again whole
    /// when the server reports a deadlock or a lock-wait timeout.
    async fn owners(&self, pairs: &[(&str, &str)], record: bool) -> Result<Vec<bool>, AuthError> {
        let mut attempt = 1;
        loop {
            match self.owners_once(pairs, record).await {
                Err(Failure::Sql(e)) if attempt < MAX_ATTEMPTS && retryable(&e) => attempt += 1,
                Err(Failure::Sql(e)) => return Err(store_error(e)),
                Err(Failure::Refused(e)) => return Err(e),
                Ok(answers) => return Ok(answers),
            }
        }
    }

    async fn owners_once(
        &self,
        pairs: &[(&str, &str)],
        record: bool,
    ) -> Result<Vec<bool>, Failure> {
        let mut tx = self.pool.begin().await?;
        let mut known = HashSet::new();
        for (_, owner) in pairs {
            if known.insert(*owner) && !is_user(&mut tx, owner).await? {
                return Err(Failure::Refused(unknown_owner(owner)));
            }
        }
        let mut answers = Vec::with_capacity(pairs.len());
        for (account, owner) in pairs {
            if record {
                insert_owner(&mut tx, account, owner).await?;
            }
            let current: Option<Vec<u8>> =
                sqlx::query_scalar("SELECT owner FROM account_owners WHERE account = ?")
                    .bind(account)
                    .fetch_optional(&mut *tx)
                    .await?;
            answers.push(current.is_none_or(|c| c == owner.as_bytes()));
        }
        tx.commit().await?;
        Ok(answers)
    }
}

/// Why one try at a transaction failed: a refusal to answer as is, or a
/// server error that may be worth another try.
enum Failure {
    Refused(AuthError),
    Sql(sqlx::Error),
}

impl From<sqlx::Error> for Failure {
    fn from(e: sqlx::Error) -> Failure {
        Failure::Sql(e)
    }
}

async fn is_user(conn: &mut MySqlConnection, name: &str) -> Result<bool, sqlx::Error> {
    let found: Option<i64> =
        sqlx::query_scalar("SELECT 1 FROM users WHERE username = ? AND role = 'user'")
            .bind(name)
            .fetch_optional(conn)
            .await?;
    Ok(found.is_some())
}

/// Inserts the owner of `account` unless it has one. A duplicate key is
/// the account's existing owner, who stays; only that statement is undone,
/// the transaction goes on.
async fn insert_owner(
    conn: &mut MySqlConnection,
    account: &str,
    owner: &str,
) -> Result<(), sqlx::Error> {
    let inserted = sqlx::query("INSERT INTO account_owners (account, owner) VALUES (?, ?)")
        .bind(account)
        .bind(owner)
        .execute(conn)
        .await;
    match inserted {
        Err(e) if error_number(&e) == Some(DUPLICATE_KEY) => Ok(()),
        other => other.map(|_| ()),
    }
}

fn error_number(e: &sqlx::Error) -> Option<u16> {
    match e {
        sqlx::Error::Database(db) => db
            .try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
            .map(|e| e.number()),
        _ => None,
    }
}

fn retryable(e: &sqlx::Error) -> bool {
    matches!(error_number(e), Some(DEADLOCK | LOCK_WAIT_TIMEOUT))
}

/// A server error as the auth service answers it: the database out of
/// reach is the auth service unavailable (503, retry); anything else is
/// internal.
fn store_error(e: sqlx::Error) -> AuthError {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::WorkerCrashed => {
            tracing::warn!(error = %e, "the auth service's MySQL database does not answer");
            AuthError::PeerUnavailable("its user database does not answer".into())
        }
        e if retryable(&e) => {
            AuthError::PeerUnavailable("its user database is busy with the same accounts".into())
        }
        e => AuthError::Internal(format!("user store: {e}")),
    }
}

/// Text from a column with a binary collation (sqlx hands those over as
/// bytes).
fn text(bytes: Vec<u8>) -> String {
    String::from_utf8_lossy(&bytes).into_owned()
}

#[async_trait]
impl UserStore for MysqlUsers {
    async fn add_user(
        &self,
        username: &str,
        password_hash: &str,
        role: Role,
    ) -> Result<(), AuthError> {
        let inserted = sqlx::query(
            "INSERT INTO users (username, password_hash, role, created_at_ms) VALUES (?, ?, ?, ?)",
        )
        .bind(username)
        .bind(password_hash)
        .bind(role.as_str())
        .bind(crate::ledger::now_ms())
        .execute(&self.pool)
        .await;
        match inserted {
            Err(e) if error_number(&e) == Some(DUPLICATE_KEY) => {
                Err(AuthError::Taken(username.into()))
            }
            Err(e) => Err(store_error(e)),
            Ok(_) => Ok(()),
        }
    }

    async fn put_admin(&self, password_hash: &str) -> Result<(), AuthError> {
        sqlx::query(
            "INSERT INTO users (username, password_hash, role, created_at_ms) VALUES ('admin', ?, 'admin', ?)
             ON DUPLICATE KEY UPDATE password_hash = ?, role = 'admin'",
        )
        .bind(password_hash)
        .bind(crate::ledger::now_ms())
        .bind(password_hash)
        .execute(&self.pool)
        .await
        .map_err(store_error)?;
        Ok(())
    }

    async fn credentials(&self, username: &str) -> Result<Option<Credentials>, AuthError> {
        let row: Option<(Vec<u8>, Vec<u8>)> =
            sqlx::query_as("SELECT password_hash, role FROM users WHERE username = ?")
                .bind(username)
                .fetch_optional(&self.pool)
                .await
                .map_err(store_error)?;
        Ok(row.map(|(hash, role)| Credentials {
            password_hash: text(hash),
            role: text(role),
        }))
    }

    async fn check_owners(&self, pairs: &[(&str, &str)]) -> Result<Vec<bool>, AuthError> {
        self.owners(pairs, false).await
    }

    async fn claim_owners(&self, pairs: &[(&str, &str)]) -> Result<Vec<bool>, AuthError> {
        self.owners(pairs, true).await
    }

    async fn owner_of(&self, account: &str) -> Result<Option<String>, AuthError> {
        let owner: Option<Vec<u8>> =
            sqlx::query_scalar("SELECT owner FROM account_owners WHERE account = ?")
                .bind(account)
                .fetch_optional(&self.pool)
                .await
                .map_err(store_error)?;
        Ok(owner.map(text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_auth_database_sits_beside_the_first_shard() {
        for (shard, auth) in [
            (
                "mysql://shardpay:secret@shard0:3306/shardpay_0",
                "mysql://shardpay:secret@shard0:3306/shardpay_auth",
            ),
            (
                "mysql://root@127.0.0.1:3316/s0?ssl-mode=disabled",
                "mysql://root@127.0.0.1:3316/shardpay_auth?ssl-mode=disabled",
            ),
            (
                "mysql://root@127.0.0.1",
                "mysql://root@127.0.0.1/shardpay_auth",
            ),
        ] {
            assert_eq!(database_beside(shard).unwrap(), auth);
        }
        let err = database_beside("127.0.0.1:3306/shardpay_0")
            .unwrap_err()
            .to_string();
        assert!(err.contains("bad MySQL URL"), "{err}");
    }
}
