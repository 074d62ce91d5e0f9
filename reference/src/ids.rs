//! Identifiers, each checked once at the boundary and opaque afterwards.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Longest account id we accept, in bytes. Long enough for user names,
/// e-mail-like handles and UUIDs; short enough to keep index rows small.
pub const MAX_ACCOUNT_ID_LEN: usize = 64;
/// Longest idempotency key, in bytes (Stripe allows 255).
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("account id {0:?} must be 1-64 characters of letters, digits, '_', '-', '.', '@'")]
    Account(String),
    #[error("transfer id {0:?} is not a transfer id (tr_ followed by 32 hex digits)")]
    Transfer(String),
    #[error("Idempotency-Key must be 1-255 printable ASCII characters")]
    IdempotencyKey,
    #[error("shard {0} is out of range: shard counts are 1 to 64")]
    Shard(u32),
}

impl IdError {
    pub fn code(&self) -> &'static str {
        match self {
            IdError::Account(_) => "invalid_account_id",
            IdError::Transfer(_) => "invalid_transfer_id",
            IdError::IdempotencyKey => "invalid_idempotency_key",
            IdError::Shard(_) => "invalid_shard",
        }
    }
}

/// A customer account id, chosen by the client (the modelled system uses
/// user names such as `alice`). System accounts live outside this space.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct AccountId(String);

impl AccountId {
    pub fn parse(text: &str) -> Result<AccountId, IdError> {
        let ok = !text.is_empty()
            && text.len() <= MAX_ACCOUNT_ID_LEN
            && text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'@'));
        if ok {
            Ok(AccountId(text.to_string()))
        } else {
            Err(IdError::Account(text.chars().take(80).collect()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for AccountId {
    type Error = IdError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        AccountId::parse(&value)
    }
}

impl From<AccountId> for String {
    fn from(id: AccountId) -> String {
        id.0
    }
}

/// The most shards a deployment may have.
pub const MAX_SHARDS: u32 = 64;

/// A shard number, `0..shard_count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ShardId(u16);

impl ShardId {
    pub fn new(index: u32) -> Result<ShardId, IdError> {
        if index < MAX_SHARDS {
            Ok(ShardId(index as u16))
        } else {
            Err(IdError::Shard(index))
        }
    }

    pub fn index(self) -> usize {
        self.0 as usize
    }

    /// The shard's display name, as the modelled system names its shards.
    pub fn name(self) -> String {
        format!("shard_{}", self.0)
    }
}

impl fmt::Display for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A transfer id: `tr_` and 32 lowercase hex digits (a random UUID). Made by
/// the shard manager; a retried POST gets the first id back through its
/// idempotency key, never a new one.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TransferId(String);

impl TransferId {
    pub fn generate() -> TransferId {
        TransferId(format!("tr_{}", uuid::Uuid::new_v4().simple()))
    }

    pub fn parse(text: &str) -> Result<TransferId, IdError> {
        let ok = text.len() == 35
            && text.starts_with("tr_")
            && text[3..]
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if ok {
            Ok(TransferId(text.to_string()))
        } else {
            Err(IdError::Transfer(text.chars().take(80).collect()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TransferId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for TransferId {
    type Error = IdError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        TransferId::parse(&value)
    }
}

impl From<TransferId> for String {
    fn from(id: TransferId) -> String {
        id.0
    }
}

/// A client's `Idempotency-Key`: 1-255 printable ASCII characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    pub fn parse(text: &str) -> Result<IdempotencyKey, IdError> {
        let ok = !text.is_empty()
            && text.len() <= MAX_IDEMPOTENCY_KEY_LEN
            && text.bytes().all(|b| (0x21..=0x7e).contains(&b));
        if ok {
            Ok(IdempotencyKey(text.to_string()))
        } else {
            Err(IdError::IdempotencyKey)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn account_ids_are_checked() {
        assert!(AccountId::parse("alice").is_ok());
        assert!(AccountId::parse("coffee_shop").is_ok());
        assert!(AccountId::parse("a.b-c@d_9").is_ok());
        for bad in ["", "with space", "semi;colon", "slash/", "~funding", "é"] {
            assert!(AccountId::parse(bad).is_err(), "{bad:?}");
        }
        assert!(AccountId::parse(&"x".repeat(64)).is_ok());
        assert!(AccountId::parse(&"x".repeat(65)).is_err());
    }

    #[test]
    fn transfer_ids_round_trip() {
        let id = TransferId::generate();
        assert_eq!(TransferId::parse(id.as_str()).unwrap(), id);
        assert!(TransferId::parse("tr_xyz").is_err());
        assert!(TransferId::parse(&format!("tx_{}", &id.as_str()[3..])).is_err());
    }

    #[test]
    fn idempotency_keys_are_printable_ascii() {
        assert!(IdempotencyKey::parse("order-42/retry").is_ok());
        assert!(IdempotencyKey::parse("").is_err());
        assert!(IdempotencyKey::parse("has space").is_err());
        assert!(IdempotencyKey::parse(&"k".repeat(256)).is_err());
    }

    #[test]
    fn shard_ids_are_bounded() {
        assert!(ShardId::new(63).is_ok());
        assert!(ShardId::new(64).is_err());
        assert_eq!(ShardId::new(3).unwrap().name(), "shard_3");
    }
}
