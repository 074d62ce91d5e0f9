//! Hostile traffic, a kind of the mix: requests a well-behaved client never
//! sends (bad amounts, ids, keys and bodies, forged tokens, another user's
//! account). Each attack knows the answer the system must give, a 4xx with
//! its code; any other answer is an error of the run, and the books prove
//! none of it moved money (a hostile request is never an entry of them).

use std::sync::Mutex;

use base64::Engine as _;

/// One kind of hostile request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attack {
    NegativeAmount,
    ZeroAmount,
    HugeAmount,
    TooPrecise,
    NotANumber,
    BothAmounts,
    MalformedJson,
    WrongShape,
    BadAccountId,
    UnknownPayee,
    SameAccount,
    UnknownCurrency,
    BadKey,
    WrongMediaType,
    NoToken,
    ForgedToken,
    OthersAccount,
    ReadOthersAccount,
}

impl Attack {
    pub const ALL: [Attack; 18] = [
        Attack::NegativeAmount,
        Attack::ZeroAmount,
        Attack::HugeAmount,
        Attack::TooPrecise,
        Attack::NotANumber,
        Attack::BothAmounts,
        Attack::MalformedJson,
        Attack::WrongShape,
        Attack::BadAccountId,
        Attack::UnknownPayee,
        Attack::SameAccount,
        Attack::UnknownCurrency,
        Attack::BadKey,
        Attack::WrongMediaType,
        Attack::NoToken,
        Attack::ForgedToken,
        Attack::OthersAccount,
        Attack::ReadOthersAccount,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Attack::NegativeAmount => "negative_amount",
            Attack::ZeroAmount => "zero_amount",
            Attack::HugeAmount => "huge_amount",
            Attack::TooPrecise => "too_precise",
            Attack::NotANumber => "not_a_number",
            Attack::BothAmounts => "both_amounts",
            Attack::MalformedJson => "malformed_json",
            Attack::WrongShape => "wrong_shape",
            Attack::BadAccountId => "bad_account_id",
            Attack::UnknownPayee => "unknown_payee",
            Attack::SameAccount => "same_account",
            Attack::UnknownCurrency => "unknown_currency",
            Attack::BadKey => "bad_idempotency_key",
            Attack::WrongMediaType => "wrong_media_type",
            Attack::NoToken => "no_token",
            Attack::ForgedToken => "forged_token",
            Attack::OthersAccount => "debit_another_users_account",
            Attack::ReadOthersAccount => "read_another_users_account",
        }
    }

    /// Whether the attack needs auth on (tokens) to mean anything.
    pub fn needs_auth(self) -> bool {
        matches!(
            self,
            Attack::NoToken
                | Attack::ForgedToken
                | Attack::OthersAccount
                | Attack::ReadOthersAccount
        )
    }

    /// The answer the system must give: status and error code.
    pub fn expected(self) -> (u16, &'static str) {
        match self {
            Attack::NegativeAmount => (422, "negative_amount"),
            Attack::ZeroAmount => (422, "zero_amount"),
            Attack::HugeAmount => (422, "amount_too_large"),
            Attack::TooPrecise => (422, "amount_too_precise"),
            Attack::NotANumber => (422, "invalid_amount"),
            Attack::BothAmounts => (422, "ambiguous_amount"),
            Attack::MalformedJson => (400, "malformed_json"),
            Attack::WrongShape => (400, "invalid_body"),
            Attack::BadAccountId => (400, "invalid_account_id"),
            Attack::UnknownPayee => (404, "account_not_found"),
            Attack::SameAccount => (422, "same_account"),
            Attack::UnknownCurrency => (422, "unsupported_currency"),
            Attack::BadKey => (400, "invalid_idempotency_key"),
            Attack::WrongMediaType => (415, "unsupported_media_type"),
            Attack::NoToken => (401, "missing_token"),
            Attack::ForgedToken => (401, "invalid_token"),
            Attack::OthersAccount => (403, "not_account_owner"),
            Attack::ReadOthersAccount => (403, "not_account_owner"),
        }
    }
}

/// A token shaped like the system's (HS256 JWT) with admin claims, signed
/// with a key the system does not have.
pub fn forged_token() -> String {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = b64.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let claims = b64.encode(br#"{"sub":"admin","role":"admin","sid":"forged","exp":4102444800}"#);
    let signature = b64.encode([7u8; 32]);
    format!("{header}.{claims}.{signature}")
}

/// The hostile requests of a run and those answered otherwise than they
/// must be.
#[derive(Debug, Default)]
pub struct Tally {
    inner: Mutex<(u64, u64, Vec<String>)>,
}

/// How many wrong answers the report quotes.
const EXAMPLES: usize = 10;

impl Tally {
    pub fn record(&self, attack: Attack, status: u16, code: &str) -> bool {
        let (want_status, want_code) = attack.expected();
        let ok = status == want_status && code == want_code;
        let mut t = self.inner.lock().expect("tally lock");
        t.0 += 1;
        if !ok {
            t.1 += 1;
            // One example per attack.
            let prefix = format!("{}: ", attack.name());
            if t.2.len() < EXAMPLES && !t.2.iter().any(|e| e.starts_with(&prefix)) {
                t.2.push(format!(
                    "{prefix}answered {status} {code}, not {want_status} {want_code}"
                ));
            }
        }
        ok
    }

    /// Sent, answered otherwise, and the first of those.
    pub fn get(&self) -> (u64, u64, Vec<String>) {
        self.inner.lock().expect("tally lock").clone()
    }
}
