//! Money: an integer count of minor units with a currency. Never floats.
//!
//! Decimal text such as `"4.50"` is parsed once, at the HTTP edge, into an
//! [`Amount`] in the currency's minor units. Inside the core, amounts are
//! `i64` minor units; sums that could exceed `i64` are taken in `i128`.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The largest amount one transfer or opening balance may carry, in minor
/// units: 10^15 (ten trillion of a two-decimal currency). Bounding single
/// amounts keeps every balance and every shard total far from `i64::MAX`.
pub const MAX_AMOUNT_MINOR: i64 = 1_000_000_000_000_000;

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
    pub fn parse(code: &str) -> Result<Currency, MoneyError> {
        let upper = code.to_ascii_uppercase();
        CURRENCIES
            .iter()
            .find(|(c, _)| *c == upper)
            .map(|(c, scale)| Currency {
                code: c.as_bytes().try_into().expect("codes are three bytes"),
                scale: *scale,
            })
            .ok_or_else(|| MoneyError::UnsupportedCurrency(code.to_string()))
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
    /// The stable machine code clients see in error responses.
    pub fn code(&self) -> &'static str {
        match self {
            MoneyError::Malformed(_) => "invalid_amount",
            MoneyError::TooPrecise { .. } => "amount_too_precise",
            MoneyError::Negative(_) => "negative_amount",
            MoneyError::Zero => "zero_amount",
            MoneyError::TooLarge(_) => "amount_too_large",
            MoneyError::UnsupportedCurrency(_) => "unsupported_currency",
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
        let malformed = || MoneyError::Malformed(text.to_string());
        let trimmed = text.trim();
        if let Some(rest) = trimmed.strip_prefix('-') {
            // Say "negative" only when the rest is a number.
            return if Amount::parse(rest, currency).is_ok() {
                Err(MoneyError::Negative(text.to_string()))
            } else {
                Err(malformed())
            };
        }
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
        assert!(Amount::from_minor(MAX_AMOUNT_MINOR + 1).is_err());
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

    #[test]
    fn unknown_currency_is_refused() {
        assert_eq!(
            Currency::parse("XYZ").unwrap_err().code(),
            "unsupported_currency"
        );
    }
}
