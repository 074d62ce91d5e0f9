//! Where the auth service keeps its users and account owners: a
//! [`UserStore`], in a SQLite file ([`SqliteUsers`], one process) or in a
//! MySQL/MariaDB database ([`MysqlUsers`], which several auth replicas
//! share). The rules around them (who may own an account, what a
//! password is, what each refusal says) are the auth service's, written
//! once in `auth`; a store keeps rows and makes each claim atomic.

mod mysql;
mod sqlite;

use async_trait::async_trait;

use super::{AuthError, Role};
use crate::codes::ErrorCode;

pub use mysql::{database_beside, MysqlUsers, DATABASE};
pub use sqlite::SqliteUsers;

/// What a login checks a password against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The argon2id hash, in PHC string form.
    pub password_hash: String,
    /// The role as stored (`user`, `admin`, `service`).
    pub role: String,
}

/// Users and account owners. Owners never change once set, and only a
/// registered user (role `user`) can own an account.
#[async_trait]
pub trait UserStore: Send + Sync {
    /// Adds a user; `AuthError::Taken` when the name is.
    async fn add_user(
        &self,
        username: &str,
        password_hash: &str,
        role: Role,
    ) -> Result<(), AuthError>;

    /// Creates the user `admin` with this password hash, or gives an
    /// existing `admin` this hash and the admin role.
    async fn put_admin(&self, password_hash: &str) -> Result<(), AuthError>;

    /// The stored hash and role of `username`, if it is a user.
    async fn credentials(&self, username: &str) -> Result<Option<Credentials>, AuthError>;

    /// Checks every owner is a user (else `UnknownOwner`) and answers, per
    /// (account, owner) pair, whether the account is free for that owner:
    /// no owner yet, or that one. Records nothing.
    async fn check_owners(&self, pairs: &[(&str, &str)]) -> Result<Vec<bool>, AuthError>;

    /// In one transaction: checks every owner is a user (else
    /// `UnknownOwner`, and nothing is recorded), records each owner of an
    /// account that has none, and answers per pair whether that owner owns
    /// the account now. Of concurrent claims of one account for different
    /// owners, wherever they run, exactly one wins and every answer agrees
    /// with it.
    async fn claim_owners(&self, pairs: &[(&str, &str)]) -> Result<Vec<bool>, AuthError>;

    /// The owner of an account, if it has one.
    async fn owner_of(&self, account: &str) -> Result<Option<String>, AuthError>;
}

/// The refusal of an owner who is not a registered user.
pub(crate) fn unknown_owner(owner: &str) -> AuthError {
    AuthError::Invalid(
        ErrorCode::UnknownOwner,
        format!("no user named {owner}; register it first (owners are users, not admins or services, who cannot pay)"),
    )
}
