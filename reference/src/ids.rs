//! Identifiers, each checked once at the boundary and opaque afterwards.

use crate::codes::ErrorCode;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Longest account id we accept, in bytes. Long enough for user names,
/// e-mail-like handles and UUIDs; short enough to keep index rows small.
pub const MAX_ACCOUNT_ID_LEN: usize = 64;
/// Longest idempotency key, in bytes (Stripe allows 255).
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

/// At most the first 64 bytes of client text (cut at a character boundary,
/// "..." marking the cut), for an error message. Bytes, not characters: a
/// message escapes each control or unassigned character to up to ten
/// bytes, so 80 characters could have made 800.
fn shorten(text: &str) -> String {
    const MAX: usize = MAX_ACCOUNT_ID_LEN;
    if text.len() <= MAX {
        return text.to_string();
    }
    let mut end = MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("account id {0:?} must be 1-64 characters of letters, digits, '_', '-', '.', '@'")]
    Account(String),
    #[error("transfer id {0:?} is not a transfer id (tr_ followed by 32 hex digits)")]
    Transfer(String),
    #[error("Idempotency-Key must be 1-255 printable ASCII characters (spaces allowed, not at either end)")]
    IdempotencyKey,
    #[error("shard {0} is out of range: shard counts are 1 to 64")]
    Shard(u32),
}

impl IdError {
    pub fn code(&self) -> ErrorCode {
        match self {
            IdError::Account(_) => ErrorCode::InvalidAccountId,
            IdError::Transfer(_) => ErrorCode::InvalidTransferId,
            IdError::IdempotencyKey => ErrorCode::InvalidIdempotencyKey,
            IdError::Shard(_) => ErrorCode::InvalidShard,
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
            Err(IdError::Account(shorten(text)))
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

/// A transfer id: `tr_` and 32 lowercase hex digits (a UUIDv7). Made by
/// the shard manager; a retried POST gets the first id back through its
/// idempotency key, never a new one.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TransferId(String);

impl TransferId {
    /// A new id, ordered by creation (UUIDv7: milliseconds, then random
    /// bits): a shard's transfers and their entries' index then grow at
    /// one end instead of at random places, which keeps inserts in the
    /// page cache as history grows.
    pub fn generate() -> TransferId {
        TransferId(format!("tr_{}", uuid::Uuid::now_v7().simple()))
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
            Err(IdError::Transfer(shorten(text)))
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

/// A client's `Idempotency-Key`: 1-255 printable ASCII characters, spaces
/// included but not at either end (HTTP strips those from header values,
/// so a key with them could never arrive as sent).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    pub fn parse(text: &str) -> Result<IdempotencyKey, IdError> {
        let ok = !text.is_empty()
            && text.len() <= MAX_IDEMPOTENCY_KEY_LEN
            && text.bytes().all(|b| (0x20..=0x7e).contains(&b))
            && !text.starts_with(' ')
            && !text.ends_with(' ');
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
    fn transfer_ids_sort_in_the_order_they_were_made() {
        // Inserts into a shard's indexes then land at one end.
        let ids: Vec<TransferId> = (0..1000).map(|_| TransferId::generate()).collect();
        let mut sorted = ids.clone();
        sorted.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        assert_eq!(sorted, ids);
        let distinct: std::collections::HashSet<&str> = ids.iter().map(|i| i.as_str()).collect();
        assert_eq!(distinct.len(), ids.len());
    }

    #[test]
    fn idempotency_keys_are_printable_ascii() {
        assert!(IdempotencyKey::parse("order-42/retry").is_ok());
        assert!(IdempotencyKey::parse("").is_err());
        assert!(
            IdempotencyKey::parse("has space").is_ok(),
            "a space is printable ASCII, as the README says"
        );
        assert!(IdempotencyKey::parse(" leading").is_err());
        assert!(IdempotencyKey::parse("trailing ").is_err());
        assert!(IdempotencyKey::parse("tab\there").is_err());
        assert!(IdempotencyKey::parse("caf\u{e9}").is_err());
        assert!(IdempotencyKey::parse(&"k".repeat(256)).is_err());
    }

    /// Found by the property tests: messages named the first 80
    /// characters, escaped, so control characters made them 500 bytes and
    /// more; the longest now is 512 (proptests::MAX_MESSAGE_LEN).
    #[test]
    fn messages_about_long_text_stay_short() {
        let text = "\u{10}".repeat(300);
        let err = AccountId::parse(&text).unwrap_err();
        assert!(err.to_string().len() <= 512, "{err}");
        let text = "\u{2028}".repeat(56);
        let err = TransferId::parse(&text).unwrap_err();
        assert!(err.to_string().len() <= 512, "{err}");
        let err = AccountId::parse(&"x".repeat(100_000)).unwrap_err();
        assert!(err.to_string().len() < 200, "{err}");
    }

    #[test]
    fn shard_ids_are_bounded() {
        assert!(ShardId::new(63).is_ok());
        assert!(ShardId::new(64).is_err());
        assert_eq!(ShardId::new(3).unwrap().name(), "shard_3");
    }
}

/// Property tests: ids and keys arrive in URL paths, JSON bodies and
/// headers, so each parser must accept exactly what its documented rule
/// says, never panic, and refuse with a short message.
#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    /// Longest error message any input may produce, in bytes.
    const MAX_MESSAGE_LEN: usize = 512;
    const MAX_TEXT_LEN: usize = 100_000;

    fn config() -> ProptestConfig {
        ProptestConfig {
            cases: 10_000,
            // Failures are kept as explicit regression tests, not files.
            failure_persistence: None,
            ..ProptestConfig::default()
        }
    }

    // The documented rules, written out again as oracles.

    /// 1-64 characters, each an ASCII letter or digit, '_', '-', '.' or '@'.
    fn is_account_id(text: &str) -> bool {
        let allowed =
            |c: char| matches!(c, 'a'..='z' | 'A'..='Z' | '0'..='9' | '_' | '-' | '.' | '@');
        (1..=64).contains(&text.chars().count()) && text.chars().all(allowed)
    }

    /// `tr_` and 32 lowercase hex digits.
    fn is_transfer_id(text: &str) -> bool {
        match text.strip_prefix("tr_") {
            Some(hex) => {
                hex.chars().count() == 32 && hex.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f'))
            }
            None => false,
        }
    }

    /// 1-255 printable ASCII characters (space to '~'), no space at either
    /// end.
    fn is_idempotency_key(text: &str) -> bool {
        (1..=255).contains(&text.chars().count())
            && text.chars().all(|c| (' '..='~').contains(&c))
            && !text.starts_with(' ')
            && !text.ends_with(' ')
    }

    /// Characters near the edges of the rules: every class the rules allow,
    /// their neighbours in ASCII, look-alikes outside it, and characters
    /// whose escapes are long.
    fn edge_char() -> impl Strategy<Value = char> {
        prop_oneof![
            6 => prop::sample::select(
                "abcdefxyzABCDEFXYZ0123456789_-.@ ~!/:;#%\"\\{}[]'`^|?*+=,<>$&()"
                    .chars()
                    .collect::<Vec<_>>()
            ),
            2 => prop::char::range(' ', '~'),
            1 => prop::char::range('\0', '\u{1f}'),
            1 => prop::sample::select(vec![
                '\u{7f}', '\u{80}', '\u{9f}', '\u{a0}', '\u{e9}', '\u{131}', '\u{17f}',
                '\u{212a}', '\u{430}', '\u{435}', '\u{200b}', '\u{301}', '\u{2028}',
                '\u{feff}', '\u{ff10}', '\u{ff41}', '\u{e0001}', '\u{10ffff}',
            ]),
            1 => any::<char>(),
        ]
    }

    fn truncate(mut text: String, max: usize) -> String {
        if text.len() > max {
            let mut end = max;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.truncate(end);
        }
        text
    }

    /// Short strings around the length limits, long runs of one character
    /// up to 100 KB, and valid-looking transfer ids with a flaw or two.
    fn id_text() -> impl Strategy<Value = String> {
        let short = prop::collection::vec(edge_char(), 0..300)
            .prop_map(|chars| chars.into_iter().collect::<String>());
        let runs = prop::collection::vec(
            (
                edge_char(),
                prop_oneof![4 => 1usize..=70, 1 => 250usize..=260, 1 => 1usize..=40_000],
            ),
            0..4,
        )
        .prop_map(|runs| {
            let text: String = runs
                .into_iter()
                .map(|(c, n)| c.to_string().repeat(n))
                .collect();
            truncate(text, MAX_TEXT_LEN)
        });
        let hex = prop_oneof![
            30 => prop::sample::select("0123456789abcdef".chars().collect::<Vec<_>>()),
            1 => edge_char(),
        ];
        let transfer_like = (
            prop::sample::select(vec!["tr_", "tr_", "tr_", "TR_", "tr-", "tr", ""]),
            prop::collection::vec(hex, 30..=34),
        )
            .prop_map(|(prefix, digits)| {
                prefix.to_string() + &digits.into_iter().collect::<String>()
            });
        prop_oneof![
            4 => short,
            2 => runs,
            2 => transfer_like,
            1 => any::<String>(),
        ]
    }

    fn check_message(e: &IdError) -> Result<(), TestCaseError> {
        let message = e.to_string();
        prop_assert!(
            message.len() <= MAX_MESSAGE_LEN,
            "{} bytes: {message}",
            message.len()
        );
        Ok(())
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn account_ids_follow_their_rule(text in id_text()) {
            match AccountId::parse(&text) {
                Ok(id) => {
                    prop_assert!(is_account_id(&text), "accepted {:?}", text);
                    prop_assert_eq!(id.as_str(), text.as_str());
                }
                Err(e) => {
                    prop_assert!(!is_account_id(&text), "refused {:?}", text);
                    prop_assert_eq!(e.code(), "invalid_account_id");
                    check_message(&e)?;
                }
            }
            // JSON bodies deserialize through the same check.
            let json = serde_json::Value::String(text.clone());
            prop_assert_eq!(
                serde_json::from_value::<AccountId>(json).is_ok(),
                is_account_id(&text)
            );
        }

        #[test]
        fn transfer_ids_follow_their_rule(text in id_text()) {
            match TransferId::parse(&text) {
                Ok(id) => {
                    prop_assert!(is_transfer_id(&text), "accepted {:?}", text);
                    prop_assert_eq!(id.as_str(), text.as_str());
                }
                Err(e) => {
                    prop_assert!(!is_transfer_id(&text), "refused {:?}", text);
                    prop_assert_eq!(e.code(), "invalid_transfer_id");
                    check_message(&e)?;
                }
            }
            let json = serde_json::Value::String(text.clone());
            prop_assert_eq!(
                serde_json::from_value::<TransferId>(json).is_ok(),
                is_transfer_id(&text)
            );
        }

        #[test]
        fn idempotency_keys_follow_their_rule(text in id_text()) {
            match IdempotencyKey::parse(&text) {
                Ok(key) => {
                    prop_assert!(is_idempotency_key(&text), "accepted {:?}", text);
                    prop_assert_eq!(key.as_str(), text.as_str());
                }
                Err(e) => {
                    prop_assert!(!is_idempotency_key(&text), "refused {:?}", text);
                    prop_assert_eq!(e.code(), "invalid_idempotency_key");
                    check_message(&e)?;
                }
            }
        }

        #[test]
        fn generated_transfer_ids_parse(_n in 0u8..1) {
            let id = TransferId::generate();
            prop_assert!(is_transfer_id(id.as_str()));
            prop_assert_eq!(TransferId::parse(id.as_str()), Ok(id));
        }
    }
}
