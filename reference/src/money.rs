//! Money: an integer count of minor units with a currency. Never floats.
//!
//! Decimal text such as `"4.50"` is parsed once, at the HTTP edge, into an
//! [`Amount`] in the currency's minor units. Inside the core, amounts are
//! `i64` minor units; sums that could exceed `i64` are taken in `i128`.

use crate::codes::ErrorCode;
use std::fmt;

use serde::{Deserialize, Serialize};

/// The largest amount one transfer or opening balance may carry, in minor
/// units: 10^15 (ten trillion of a two-decimal currency). Bounding single
/// amounts keeps every balance and every shard total far from `i64::MAX`.
pub const MAX_AMOUNT_MINOR: i64 = 1_000_000_000_000_000;

/// The longest amount text accepted, in bytes: the largest amount with
/// leading zeros and trailing decimal zeros to spare. Longer text is
/// refused before it is looked at.
pub const MAX_AMOUNT_TEXT_LEN: usize = 64;

/// At most the first [`MAX_AMOUNT_TEXT_LEN`] bytes of client text (cut at a
/// character boundary, "..." marking the cut), for an error message. Bytes,
/// not characters: a message escapes each control or unassigned character
/// to up to ten bytes, so 80 characters could have made 800.
fn shorten(text: &str) -> String {
    if text.len() <= MAX_AMOUNT_TEXT_LEN {
        return text.to_string();
    }
    let mut end = MAX_AMOUNT_TEXT_LEN;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

/// An ISO 4217 currency the ledger supports, with its number of decimals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Currency {
    code: [u8; 3],
    scale: u8,
}

/// Supported currencies and their minor-unit scales.
const CURRENCIES: &[(&str, u8)] = &[
    ("INR", 2),
    ("USD", 2),
    ("EUR", 2),
    ("GBP", 2),
    ("SGD", 2),
    ("JPY", 0),
    ("KRW", 0),
    ("KWD", 3),
    ("BHD", 3),
];

impl Currency {
    /// The currency accounts get when a request names none.
    pub const DEFAULT: Currency = Currency {
        code: *b"INR",
        scale: 2,
    };

    /// Looks up a currency by its ISO code (case-insensitive).
    /// Unknown codes are refused naming at most the first 64 bytes of the
    /// text, so an absurd code cannot make an absurd message.
    pub fn parse(code: &str) -> Result<Currency, MoneyError> {
        CURRENCIES
            .iter()
            .find(|(c, _)| c.eq_ignore_ascii_case(code))
            .map(|(c, scale)| Currency {
                code: c.as_bytes().try_into().expect("codes are three bytes"),
                scale: *scale,
            })
            .ok_or_else(|| MoneyError::UnsupportedCurrency(shorten(code)))
    }

    pub fn code(&self) -> &str {
        std::str::from_utf8(&self.code).expect("codes are ASCII")
    }

    /// Number of decimals of the major unit (2 for INR: 1 rupee = 100 paise).
    pub fn scale(&self) -> u8 {
        self.scale
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

impl TryFrom<String> for Currency {
    type Error = MoneyError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Currency::parse(&value)
    }
}

impl From<Currency> for String {
    fn from(c: Currency) -> String {
        c.code().to_string()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("amount {0:?} is not a decimal number such as \"4.50\"")]
    Malformed(String),
    #[error("amount {text:?} has more decimals than {currency} allows ({scale})")]
    TooPrecise {
        text: String,
        currency: Currency,
        scale: u8,
    },
    #[error("amount {0:?} is negative; amounts are always positive")]
    Negative(String),
    #[error("amount must be greater than zero")]
    Zero,
    #[error("amount {0:?} is larger than the maximum of {max} minor units", max = MAX_AMOUNT_MINOR)]
    TooLarge(String),
    #[error(
        "currency {0:?} is not supported (supported: INR, USD, EUR, GBP, SGD, JPY, KRW, KWD, BHD)"
    )]
    UnsupportedCurrency(String),
}

impl MoneyError {
    /// The same error, naming `text` (the client's untrimmed input).
    fn with_text(self, text: &str) -> MoneyError {
        match self {
            MoneyError::Malformed(_) => MoneyError::Malformed(text.to_string()),
            MoneyError::TooPrecise {
                currency, scale, ..
            } => MoneyError::TooPrecise {
                text: text.to_string(),
                currency,
                scale,
            },
            MoneyError::TooLarge(_) => MoneyError::TooLarge(text.to_string()),
            other => other,
        }
    }

    /// The stable machine code clients see in error responses.
    pub fn code(&self) -> ErrorCode {
        match self {
            MoneyError::Malformed(_) => ErrorCode::InvalidAmount,
            MoneyError::TooPrecise { .. } => ErrorCode::AmountTooPrecise,
            MoneyError::Negative(_) => ErrorCode::NegativeAmount,
            MoneyError::Zero => ErrorCode::ZeroAmount,
            MoneyError::TooLarge(_) => ErrorCode::AmountTooLarge,
            MoneyError::UnsupportedCurrency(_) => ErrorCode::UnsupportedCurrency,
        }
    }
}

/// A non-negative count of minor units, at most [`MAX_AMOUNT_MINOR`].
/// Whether zero is allowed depends on the use: a transfer needs a positive
/// amount ([`Amount::positive`]), an opening balance may be zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Amount(i64);

impl Amount {
    pub const ZERO: Amount = Amount(0);

    /// Checks a count of minor units: not negative, not above the maximum.
    pub fn from_minor(minor: i64) -> Result<Amount, MoneyError> {
        if minor < 0 {
            return Err(MoneyError::Negative(minor.to_string()));
        }
        if minor > MAX_AMOUNT_MINOR {
            return Err(MoneyError::TooLarge(minor.to_string()));
        }
        Ok(Amount(minor))
    }

    /// Parses decimal text of the major unit (`"4.50"`, `"4.5"`, `"12"`) in
    /// `currency`. Rejects signs other than none, exponents, separators,
    /// more decimals than the currency has, and overflow. Zero is allowed
    /// here; use [`Amount::positive`] where it is not.
    pub fn parse(text: &str, currency: Currency) -> Result<Amount, MoneyError> {
        // Refused before any other work, so an absurd input costs nothing
        // and its error message stays short.
        if text.len() > MAX_AMOUNT_TEXT_LEN {
            return Err(MoneyError::Malformed(shorten(text)));
        }
        let trimmed = text.trim();
        if let Some(rest) = trimmed.strip_prefix('-') {
            // Say "negative" only when the rest is an unsigned number (one
            // level only: "--1" is malformed, never parsed recursively).
            return if !rest.starts_with('-') && Amount::parse_unsigned(rest, currency).is_ok() {
                Err(MoneyError::Negative(text.to_string()))
            } else {
                Err(MoneyError::Malformed(text.to_string()))
            };
        }
        Amount::parse_unsigned(trimmed, currency).map_err(|e| e.with_text(text))
    }

    /// Parses trimmed text with no sign.
    fn parse_unsigned(trimmed: &str, currency: Currency) -> Result<Amount, MoneyError> {
        let text = trimmed;
        let malformed = || MoneyError::Malformed(text.to_string());
        let (whole, fraction) = match trimmed.split_once('.') {
            Some((w, f)) => (w, Some(f)),
            None => (trimmed, None),
        };
        let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        if whole.is_empty() || !all_digits(whole) {
            return Err(malformed());
        }
        let fraction = fraction.unwrap_or("");
        if trimmed.contains('.') && fraction.is_empty() || !all_digits(fraction) {
            return Err(malformed());
        }
        let scale = currency.scale() as usize;
        if fraction.trim_end_matches('0').len() > scale {
            return Err(MoneyError::TooPrecise {
                text: text.to_string(),
                currency,
                scale: currency.scale(),
            });
        }
        let too_large = || MoneyError::TooLarge(text.to_string());
        let whole = whole.trim_start_matches('0');
        if whole.len() > 19 {
            return Err(too_large());
        }
        let whole_value: i64 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| too_large())?
        };
        let mut fraction_value: i64 = 0;
        for i in 0..scale {
            let digit = fraction.as_bytes().get(i).map_or(0, |b| (b - b'0') as i64);
            fraction_value = fraction_value * 10 + digit;
        }
        let minor = whole_value
            .checked_mul(10i64.pow(scale as u32))
            .and_then(|v| v.checked_add(fraction_value))
            .ok_or_else(too_large)?;
        if minor > MAX_AMOUNT_MINOR {
            return Err(too_large());
        }
        Ok(Amount(minor))
    }

    /// Like [`Amount::parse`], but zero is refused.
    pub fn parse_positive(text: &str, currency: Currency) -> Result<Amount, MoneyError> {
        Amount::parse(text, currency)?.positive()
    }

    /// Refuses zero.
    pub fn positive(self) -> Result<Amount, MoneyError> {
        if self.0 == 0 {
            Err(MoneyError::Zero)
        } else {
            Ok(self)
        }
    }

    pub fn minor(self) -> i64 {
        self.0
    }
}

/// Formats minor units as decimal text of the major unit in `currency`,
/// with exactly the currency's number of decimals: 45050 INR -> "450.50".
/// Works for negative values too (system accounts run negative).
pub fn format_minor(minor: i128, currency: Currency) -> String {
    let scale = currency.scale() as u32;
    let sign = if minor < 0 { "-" } else { "" };
    let abs = minor.unsigned_abs();
    if scale == 0 {
        return format!("{sign}{abs}");
    }
    let unit = 10u128.pow(scale);
    format!(
        "{sign}{}.{:0width$}",
        abs / unit,
        abs % unit,
        width = scale as usize
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inr() -> Currency {
        Currency::parse("INR").unwrap()
    }

    #[test]
    fn parses_decimal_text_into_minor_units() {
        assert_eq!(Amount::parse("4.50", inr()).unwrap().minor(), 450);
        assert_eq!(Amount::parse("4.5", inr()).unwrap().minor(), 450);
        assert_eq!(Amount::parse("12", inr()).unwrap().minor(), 1200);
        assert_eq!(Amount::parse("0.01", inr()).unwrap().minor(), 1);
        assert_eq!(Amount::parse("007.10", inr()).unwrap().minor(), 710);
        assert_eq!(Amount::parse("4.500", inr()).unwrap().minor(), 450);
        let jpy = Currency::parse("jpy").unwrap();
        assert_eq!(Amount::parse("1500", jpy).unwrap().minor(), 1500);
        let kwd = Currency::parse("KWD").unwrap();
        assert_eq!(Amount::parse("1.234", kwd).unwrap().minor(), 1234);
    }

    #[test]
    fn rejects_more_decimals_than_the_currency_has() {
        let err = Amount::parse("4.505", inr()).unwrap_err();
        assert_eq!(err.code(), "amount_too_precise");
        let jpy = Currency::parse("JPY").unwrap();
        assert_eq!(
            Amount::parse("1.5", jpy).unwrap_err().code(),
            "amount_too_precise"
        );
    }

    #[test]
    fn rejects_malformed_negative_zero_and_overflow() {
        for bad in [
            "", " ", ".5", "5.", "4,50", "1e3", "+4", "abc", "4.5.0", "0x10", "NaN", "inf", "--1",
        ] {
            assert_eq!(
                Amount::parse(bad, inr()).unwrap_err().code(),
                "invalid_amount",
                "{bad:?}"
            );
        }
        assert_eq!(
            Amount::parse("-4.50", inr()).unwrap_err().code(),
            "negative_amount"
        );
        assert_eq!(
            Amount::parse_positive("0.00", inr()).unwrap_err().code(),
            "zero_amount"
        );
        assert!(Amount::parse("0.00", inr()).is_ok());
        for huge in [
            "10000000000000.01",
            "92233720368547758.07",
            "99999999999999999999999",
        ] {
            assert_eq!(
                Amount::parse(huge, inr()).unwrap_err().code(),
                "amount_too_large",
                "{huge}"
            );
        }
        assert_eq!(
            Amount::parse("10000000000000.00", inr()).unwrap().minor(),
            MAX_AMOUNT_MINOR
        );
        assert!(Amount::from_minor(-1).is_err());
        assert_eq!(
            Amount::parse(" 4.50 ", inr()).unwrap().minor(),
            450,
            "surrounding spaces are trimmed"
        );
        assert!(Amount::from_minor(MAX_AMOUNT_MINOR + 1).is_err());
    }

    #[test]
    fn a_long_run_of_dashes_is_refused_without_recursion() {
        // Once recursed one frame per '-', and 30,000 of them overflowed
        // the stack and aborted the server.
        for n in [2, 3, 64, 65, 30_000, 1_000_000] {
            let text = "-".repeat(n) + "1";
            assert_eq!(
                Amount::parse(&text, inr()).unwrap_err().code(),
                "invalid_amount",
                "{n} dashes"
            );
        }
        let long_digits = "1".repeat(100_000);
        let err = Amount::parse(&long_digits, inr()).unwrap_err();
        assert_eq!(err.code(), "invalid_amount");
        assert!(err.to_string().len() < 200, "the message stays short");
    }

    #[test]
    fn formats_minor_units_with_the_currency_scale() {
        assert_eq!(format_minor(47050, inr()), "470.50");
        assert_eq!(format_minor(5, inr()), "0.05");
        assert_eq!(format_minor(-450, inr()), "-4.50");
        assert_eq!(format_minor(1500, Currency::parse("JPY").unwrap()), "1500");
        assert_eq!(format_minor(1234, Currency::parse("KWD").unwrap()), "1.234");
    }

    #[test]
    fn parse_and_format_round_trip() {
        for minor in [0i64, 1, 99, 100, 12345, MAX_AMOUNT_MINOR] {
            let text = format_minor(minor as i128, inr());
            assert_eq!(Amount::parse(&text, inr()).unwrap().minor(), minor);
        }
    }

    /// Found by the property tests: the longest message any amount or
    /// currency text may produce is 512 bytes (proptests::MAX_MESSAGE_LEN).
    #[test]
    fn messages_about_long_text_stay_short() {
        // 52 unassigned characters: 208 bytes, each escaped to 9 in the
        // message, which named the first 80 characters (516 bytes).
        let text = "\u{3347a}".repeat(52);
        let err = Amount::parse(&text, inr()).unwrap_err();
        assert_eq!(err.code(), "invalid_amount");
        assert!(err.to_string().len() <= 512, "{err}");
        // Currency codes were named in full: 430 dashes made 513 bytes, and
        // 100 KB made 100 KB.
        for text in ["-".repeat(430), "-".repeat(100_000), "\u{7f}".repeat(1_000)] {
            let err = Currency::parse(&text).unwrap_err();
            assert_eq!(err.code(), "unsupported_currency");
            assert!(err.to_string().len() <= 512, "{err}");
        }
    }

    #[test]
    fn unknown_currency_is_refused() {
        assert_eq!(
            Currency::parse("XYZ").unwrap_err().code(),
            "unsupported_currency"
        );
    }
}

/// Property tests: amount and currency text is client input (JSON bodies,
/// URL path segments), so no text may panic the parser, every accepted
/// amount is in range, and every refusal is a short message with its code.
#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    /// Longest error message any input may produce, in bytes: it goes back
    /// to the client and into the logs.
    const MAX_MESSAGE_LEN: usize = 512;
    /// Longest generated text: far past any limit the parser has.
    const MAX_TEXT_LEN: usize = 100_000;

    fn config() -> ProptestConfig {
        ProptestConfig {
            cases: 10_000,
            // Failures are kept as explicit regression tests, not files.
            failure_persistence: None,
            ..ProptestConfig::default()
        }
    }

    /// The supported currencies and their decimals, as the error message
    /// lists them and ISO 4217 defines them.
    const SUPPORTED: &[(&str, u8)] = &[
        ("INR", 2),
        ("USD", 2),
        ("EUR", 2),
        ("GBP", 2),
        ("SGD", 2),
        ("JPY", 0),
        ("KRW", 0),
        ("KWD", 3),
        ("BHD", 3),
    ];

    fn currencies() -> Vec<Currency> {
        SUPPORTED
            .iter()
            .map(|(code, _)| Currency::parse(code).unwrap())
            .collect()
    }

    fn currency() -> impl Strategy<Value = Currency> {
        prop::sample::select(currencies())
    }

    /// One piece of hostile text: a character or short token that parsers
    /// trip on, repeated from once to tens of thousands of times.
    fn piece() -> impl Strategy<Value = String> {
        let atom = prop_oneof![
            4 => prop::sample::select(vec![
                "-", ".", "0", "1", "9", "00", "4.50", " ", "\t", "\n", "\r", "+", "e", "E",
                ",", "_", "x", "NaN", "inf", "\u{a0}", "\u{3000}", "\u{2028}", "\u{feff}",
                "\u{200b}", "\u{0}", "\u{7f}", "\u{301}", "\u{e0001}", "\u{10ffff}", "\u{660}",
                "\u{ff11}", "\u{2212}", "\u{fe63}", "\u{ff0e}",
            ])
            .prop_map(String::from),
            1 => any::<char>().prop_map(String::from),
            // C1 controls: two bytes each, escaped to six in a message.
            1 => prop::char::range('\u{80}', '\u{9f}').prop_map(String::from),
            1 => (0u64..u64::MAX).prop_map(|n| n.to_string()),
        ];
        let run = prop_oneof![
            8 => 1usize..=3,
            2 => 1usize..=100,
            1 => 1usize..=40_000,
        ];
        (atom, run).prop_map(|(atom, n)| atom.repeat(n))
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

    /// Text that looks like an amount: optional spaces and sign, digits
    /// with leading zeros, an optional fraction, optional spaces.
    fn amount_like() -> impl Strategy<Value = String> {
        let digits = |max: usize| prop::collection::vec(prop::char::range('0', '9'), 0..max);
        (
            prop::sample::select(vec!["", " ", "\t", "\u{3000}", "  "]),
            prop::sample::select(vec!["", "", "", "-", "--", "+"]),
            digits(24),
            prop::sample::select(vec!["", ".", ".", ".", ".."]),
            digits(8),
            prop::sample::select(vec!["", " ", "\n", "\u{a0}"]),
        )
            .prop_map(|(pre, sign, whole, dot, fraction, post)| {
                let whole: String = whole.into_iter().collect();
                let fraction: String = fraction.into_iter().collect();
                format!("{pre}{sign}{whole}{dot}{fraction}{post}")
            })
    }

    fn hostile_text() -> impl Strategy<Value = String> {
        prop_oneof![
            3 => prop::collection::vec(piece(), 0..8)
                .prop_map(|pieces| truncate(pieces.concat(), MAX_TEXT_LEN)),
            2 => amount_like(),
            1 => any::<String>(),
        ]
    }

    /// Unsigned decimal text read by the documented rules, independently of
    /// the parser: ASCII digits, optionally one '.' and more ASCII digits;
    /// no more significant decimals than the currency has; at most
    /// MAX_AMOUNT_MINOR minor units. Checked in that order.
    fn expected_unsigned(text: &str, currency: Currency) -> Result<i64, &'static str> {
        let digits = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_digit());
        let parts: Vec<&str> = text.split('.').collect();
        let (whole, fraction) = match parts.as_slice() {
            [whole] if digits(whole) => (*whole, ""),
            [whole, fraction] if digits(whole) && digits(fraction) => (*whole, *fraction),
            _ => return Err("invalid_amount"),
        };
        let scale = currency.scale() as usize;
        let significant = fraction.trim_end_matches('0');
        if significant.len() > scale {
            return Err("amount_too_precise");
        }
        // Minor units, digit by digit, saturating far above the maximum.
        let mut minor: u128 = 0;
        let padded = significant
            .chars()
            .chain(std::iter::repeat('0'))
            .take(scale);
        for c in whole.chars().chain(padded) {
            minor = (minor * 10 + u128::from(c.to_digit(10).unwrap())).min(u128::from(u64::MAX));
        }
        if minor > MAX_AMOUNT_MINOR as u128 {
            Err("amount_too_large")
        } else {
            Ok(minor as i64)
        }
    }

    /// What `Amount::parse` must answer: the minor units, or the error code.
    /// Over-long text is malformed; surrounding whitespace is ignored; a
    /// '-' before a valid unsigned amount is negative, before anything else
    /// malformed.
    fn expected(text: &str, currency: Currency) -> Result<i64, &'static str> {
        if text.len() > MAX_AMOUNT_TEXT_LEN {
            return Err("invalid_amount");
        }
        let trimmed = text.trim_matches(char::is_whitespace);
        match trimmed.strip_prefix('-') {
            Some(rest) => match expected_unsigned(rest, currency) {
                Ok(_) => Err("negative_amount"),
                Err(_) => Err("invalid_amount"),
            },
            None => expected_unsigned(trimmed, currency),
        }
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn amount_parse_answers_as_documented(text in hostile_text()) {
            for currency in currencies() {
                let got = Amount::parse(&text, currency);
                match &got {
                    Ok(amount) => {
                        prop_assert!((0..=MAX_AMOUNT_MINOR).contains(&amount.minor()));
                    }
                    Err(e) => {
                        let message = e.to_string();
                        prop_assert!(
                            message.len() <= MAX_MESSAGE_LEN,
                            "{} bytes: {message}",
                            message.len()
                        );
                    }
                }
                prop_assert_eq!(
                    got.as_ref().map(|a| a.minor()).map_err(|e| e.code().as_str()),
                    expected(&text, currency),
                    "{:?} in {}", text, currency
                );
                // parse_positive is parse with zero refused.
                let positive = Amount::parse_positive(&text, currency);
                match got {
                    Ok(a) if a.minor() == 0 => {
                        prop_assert_eq!(positive.unwrap_err().code(), "zero_amount")
                    }
                    other => prop_assert_eq!(positive, other),
                }
            }
        }

        #[test]
        fn currency_parse_accepts_exactly_the_supported_codes(
            text in prop_oneof![
                2 => hostile_text(),
                // Three characters, ASCII letters mostly, and the non-ASCII
                // letters that upper-case to ASCII ones.
                3 => prop::collection::vec(
                    prop_oneof![
                        8 => prop::sample::select(
                            "INRUSDEGBPJYKWHinrusdegbpjykwhXZ".chars().collect::<Vec<_>>()
                        ),
                        1 => prop::sample::select(vec!['\u{131}', '\u{17f}', '\u{212a}', '\u{ff29}', ' ', '\0']),
                    ],
                    3..=4,
                )
                .prop_map(|chars| chars.into_iter().collect::<String>()),
            ],
        ) {
            let want = SUPPORTED
                .iter()
                .find(|(code, _)| text.len() == 3 && text.eq_ignore_ascii_case(code));
            match (Currency::parse(&text), want) {
                (Ok(c), Some((code, scale))) => {
                    prop_assert_eq!(c.code(), *code);
                    prop_assert_eq!(c.scale(), *scale);
                    prop_assert_eq!(c.to_string(), *code);
                }
                (Err(e), None) => {
                    prop_assert_eq!(e.code(), "unsupported_currency");
                    let message = e.to_string();
                    prop_assert!(
                        message.len() <= MAX_MESSAGE_LEN,
                        "{} bytes: {message}",
                        message.len()
                    );
                }
                (got, want) => prop_assert!(false, "{text:?}: got {got:?}, want {want:?}"),
            }
        }

        #[test]
        fn formatted_amounts_parse_back(
            minor in prop_oneof![
                0..=MAX_AMOUNT_MINOR,
                0i64..=1_000,
                MAX_AMOUNT_MINOR - 1_000..=MAX_AMOUNT_MINOR,
            ],
            currency in currency(),
        ) {
            let text = format_minor(minor as i128, currency);
            prop_assert_eq!(Amount::parse(&text, currency).map(Amount::minor), Ok(minor));
            // And one past the maximum is refused, whatever the currency.
            let over = format_minor(MAX_AMOUNT_MINOR as i128 + 1 + minor as i128, currency);
            prop_assert_eq!(
                Amount::parse(&over, currency).unwrap_err().code(),
                "amount_too_large"
            );
        }

        #[test]
        fn a_minus_before_a_valid_amount_is_negative(
            minor in 0..=MAX_AMOUNT_MINOR,
            currency in currency(),
            leading_zeros in 0usize..40,
            trailing_zeros in 0usize..40,
            before in prop::sample::select(vec!["", " ", "\t", "\u{3000}"]),
            after in prop::sample::select(vec!["", " ", "\n", "\u{a0}"]),
        ) {
            // Any way of writing the amount: leading zeros, trailing decimal
            // zeros, surrounding whitespace.
            let mut valid = "0".repeat(leading_zeros) + &format_minor(minor as i128, currency);
            if trailing_zeros > 0 {
                if !valid.contains('.') {
                    valid.push('.');
                }
                valid.push_str(&"0".repeat(trailing_zeros));
            }
            let plain = format!("{before}{valid}{after}");
            let negative = format!("{before}-{valid}{after}");
            if plain.len() <= MAX_AMOUNT_TEXT_LEN {
                prop_assert_eq!(Amount::parse(&plain, currency).map(Amount::minor), Ok(minor));
            }
            let code = Amount::parse(&negative, currency).unwrap_err().code();
            if negative.len() <= MAX_AMOUNT_TEXT_LEN {
                prop_assert_eq!(code, "negative_amount", "{:?}", negative);
            } else {
                // Too long to be looked at, sign or not.
                prop_assert_eq!(code, "invalid_amount", "{:?}", negative);
            }
        }
    }
}
