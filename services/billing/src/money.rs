//! Exact money: a signed count of micro-units (10^-6 of the currency unit) in an `i64`.
//!
//! Amounts are written as decimal strings (`"0.06"`, `"12"`, `"0.000125"`) and never pass
//! through a float. Every operation is checked: an overflow is an error, never a wrap or a
//! panic. Division (only needed to turn byte-hours into GB-hours) rounds once, half up, to the
//! micro-unit; see [`Money::mul_ratio`].

use std::fmt;
use std::str::FromStr;

/// Micro-units in one currency unit.
pub const MICROS_PER_UNIT: i64 = 1_000_000;
/// Decimal places an amount may carry.
pub const MAX_DECIMALS: usize = 6;

/// An exact amount of money in micro-units.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Money(i64);

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("{0:?} is not a decimal amount (digits, an optional '-', an optional '.' and 1 to 6 decimals)")]
    Malformed(String),
    #[error("{0:?} has more than 6 decimal places")]
    TooPrecise(String),
    #[error("amount overflow")]
    Overflow,
}

impl Money {
    pub const ZERO: Money = Money(0);

    /// An amount from micro-units.
    pub const fn from_micros(micros: i64) -> Money {
        Money(micros)
    }

    /// The amount in micro-units.
    pub const fn micros(self) -> i64 {
        self.0
    }

    pub const fn is_negative(self) -> bool {
        self.0 < 0
    }

    pub const fn is_zero(self) -> bool {
        self.0 == 0
    }

    /// Parses `[-]digits[.digits]` with at most [`MAX_DECIMALS`] decimals.
    pub fn parse(text: &str) -> Result<Money, MoneyError> {
        let malformed = || MoneyError::Malformed(text.to_string());
        let (negative, body) = match text.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let (whole, fraction) = match body.split_once('.') {
            Some((w, f)) => (w, Some(f)),
            None => (body, None),
        };
        if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) {
            return Err(malformed());
        }
        let fraction = fraction.unwrap_or("");
        if body.contains('.') && fraction.is_empty() {
            return Err(malformed());
        }
        if !fraction.bytes().all(|b| b.is_ascii_digit()) {
            return Err(malformed());
        }
        if fraction.len() > MAX_DECIMALS {
            return Err(MoneyError::TooPrecise(text.to_string()));
        }
        let mut micros: i64 = 0;
        for digit in whole.bytes() {
            micros = micros
                .checked_mul(10)
                .and_then(|m| m.checked_add(i64::from(digit - b'0')))
                .ok_or(MoneyError::Overflow)?;
        }
        micros = micros
            .checked_mul(MICROS_PER_UNIT)
            .ok_or(MoneyError::Overflow)?;
        let mut frac: i64 = 0;
        for digit in fraction.bytes() {
            frac = frac * 10 + i64::from(digit - b'0');
        }
        for _ in fraction.len()..MAX_DECIMALS {
            frac *= 10;
        }
        micros = micros.checked_add(frac).ok_or(MoneyError::Overflow)?;
        Ok(Money(if negative { -micros } else { micros }))
    }

    pub fn checked_add(self, other: Money) -> Result<Money, MoneyError> {
        self.0
            .checked_add(other.0)
            .map(Money)
            .ok_or(MoneyError::Overflow)
    }

    pub fn checked_sub(self, other: Money) -> Result<Money, MoneyError> {
        self.0
            .checked_sub(other.0)
            .map(Money)
            .ok_or(MoneyError::Overflow)
    }

    /// The amount times a whole quantity (hours, instances).
    pub fn checked_mul(self, quantity: u64) -> Result<Money, MoneyError> {
        i64::try_from(quantity)
            .ok()
            .and_then(|q| self.0.checked_mul(q))
            .map(Money)
            .ok_or(MoneyError::Overflow)
    }

    /// `self * numerator / denominator`, rounded half away from zero to the micro-unit, e.g.
    /// a price per GB-hour times byte-hours over bytes per GB. A zero denominator is an
    /// overflow.
    pub fn mul_ratio(self, numerator: u128, denominator: u128) -> Result<Money, MoneyError> {
        if denominator == 0 {
            return Err(MoneyError::Overflow);
        }
        let magnitude = self.0.unsigned_abs() as u128;
        let product = magnitude
            .checked_mul(numerator)
            .ok_or(MoneyError::Overflow)?;
        let quotient = product / denominator;
        let remainder = product % denominator;
        // Half up: the remainder is at least half the denominator.
        let rounded = if remainder >= denominator - remainder {
            quotient + 1
        } else {
            quotient
        };
        let micros = i64::try_from(rounded).map_err(|_| MoneyError::Overflow)?;
        Ok(Money(if self.0 < 0 { -micros } else { micros }))
    }

    /// The sum of many amounts, refusing overflow.
    pub fn sum<I: IntoIterator<Item = Money>>(amounts: I) -> Result<Money, MoneyError> {
        amounts
            .into_iter()
            .try_fold(Money::ZERO, |total, amount| total.checked_add(amount))
    }
}

/// At least two decimals, trailing zeros beyond them dropped: `0.06`, `12.00`, `0.000125`.
impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let magnitude = self.0.unsigned_abs();
        let unit = MICROS_PER_UNIT as u64;
        let whole = magnitude / unit;
        let mut fraction = format!("{:06}", magnitude % unit);
        while fraction.len() > 2 && fraction.ends_with('0') {
            fraction.pop();
        }
        let sign = if self.0 < 0 { "-" } else { "" };
        write!(f, "{sign}{whole}.{fraction}")
    }
}

impl FromStr for Money {
    type Err = MoneyError;
    fn from_str(s: &str) -> Result<Money, MoneyError> {
        Money::parse(s)
    }
}

impl serde::Serialize for Money {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Money {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Money, D::Error> {
        let text = String::deserialize(deserializer)?;
        Money::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        for (text, micros, shown) in [
            ("0", 0, "0.00"),
            ("0.06", 60_000, "0.06"),
            ("12", 12_000_000, "12.00"),
            ("0.000125", 125, "0.000125"),
            ("-1.5", -1_500_000, "-1.50"),
            ("007.10", 7_100_000, "7.10"),
        ] {
            let m = Money::parse(text).unwrap();
            assert_eq!(m.micros(), micros, "{text}");
            assert_eq!(m.to_string(), shown, "{text}");
        }
    }

    #[test]
    fn refuses_malformed() {
        for text in [
            "", "-", ".5", "5.", "1e3", "+1", "1.2.3", " 1", "1,5", "0x10", "--1",
        ] {
            assert!(
                matches!(Money::parse(text), Err(MoneyError::Malformed(_))),
                "{text:?}"
            );
        }
        assert!(matches!(
            Money::parse("0.0000001"),
            Err(MoneyError::TooPrecise(_))
        ));
        assert_eq!(
            Money::parse("9223372036854.775808"),
            Err(MoneyError::Overflow)
        );
        assert_eq!(
            Money::parse("9223372036854.775807").unwrap().micros(),
            i64::MAX
        );
        assert_eq!(
            Money::parse("99999999999999999999"),
            Err(MoneyError::Overflow)
        );
    }

    #[test]
    fn ratio_rounds_half_up() {
        let m = Money::from_micros(3);
        assert_eq!(m.mul_ratio(1, 2).unwrap().micros(), 2); // 1.5 -> 2
        assert_eq!(m.mul_ratio(1, 3).unwrap().micros(), 1); // 1.0
        assert_eq!(m.mul_ratio(1, 4).unwrap().micros(), 1); // 0.75 -> 1
        assert_eq!(m.mul_ratio(1, 7).unwrap().micros(), 0); // 0.43 -> 0
        assert_eq!(Money::from_micros(-3).mul_ratio(1, 2).unwrap().micros(), -2);
        assert_eq!(m.mul_ratio(1, 0), Err(MoneyError::Overflow));
        assert_eq!(
            Money::from_micros(i64::MAX).mul_ratio(2, 1),
            Err(MoneyError::Overflow)
        );
    }
}
