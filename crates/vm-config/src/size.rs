//! Byte counts with binary unit suffixes.

use std::fmt;
use std::str::FromStr;

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

use crate::quote;

/// A byte count, written `512M`, `4G`, `4GiB`, `2t` or as a plain number
/// (binary units: K is 1024).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Size(pub u64);

impl Size {
    pub const fn bytes(self) -> u64 {
        self.0
    }
}

impl From<Size> for u64 {
    fn from(s: Size) -> u64 {
        s.0
    }
}

/// Why a size was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("{0} is not a size (try 512M or 4G)")]
    NotASize(String),
    #[error("{0} is too large")]
    TooLarge(String),
    #[error("{text}: unknown unit {unit} (use K, M, G or T)")]
    UnknownUnit { text: String, unit: String },
    #[error("a size cannot be negative")]
    Negative,
}

impl FromStr for Size {
    type Err = SizeError;

    fn from_str(text: &str) -> Result<Self, SizeError> {
        let trimmed = text.trim();
        let digits_end = trimmed
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(trimmed.len());
        let (digits, unit) = trimmed.split_at(digits_end);
        if digits.is_empty() {
            return Err(SizeError::NotASize(quote(text)));
        }
        let number: u64 = digits
            .parse()
            .map_err(|_| SizeError::TooLarge(quote(text)))?;
        let upper = unit.trim().to_ascii_uppercase();
        let shift = match upper
            .strip_suffix("IB")
            .unwrap_or(upper.strip_suffix('B').unwrap_or(&upper))
        {
            "" => 0,
            "K" => 10,
            "M" => 20,
            "G" => 30,
            "T" => 40,
            other => {
                return Err(SizeError::UnknownUnit {
                    text: quote(text),
                    unit: quote(other),
                })
            }
        };
        number
            .checked_mul(1u64 << shift)
            .map(Size)
            .ok_or_else(|| SizeError::TooLarge(quote(text)))
    }
}

impl fmt::Display for Size {
    /// The largest unit that divides the count exactly, so the text parses
    /// back to the same number.
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let v = self.0;
        for (shift, unit) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
            if v != 0 && v % (1u64 << shift) == 0 {
                return write!(f, "{}{unit}", v >> shift);
            }
        }
        write!(f, "{v}")
    }
}

impl Serialize for Size {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Size {
    /// A string in the command-line syntax, or a byte count as an integer.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size like \"4G\" or a byte count")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Size, E> {
                v.parse().map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Size, E> {
                u64::try_from(v)
                    .map(Size)
                    .map_err(|_| E::custom(SizeError::Negative))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Size, E> {
                Ok(Size(v))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn size(s: &str) -> Result<u64, SizeError> {
        s.parse::<Size>().map(|s| s.0)
    }

    #[test]
    fn units_are_binary_and_case_blind() {
        assert_eq!(size("512M"), Ok(512 << 20));
        assert_eq!(size("4G"), Ok(4 << 30));
        assert_eq!(size("4GiB"), Ok(4 << 30));
        assert_eq!(size("4gb"), Ok(4 << 30));
        assert_eq!(size("2t"), Ok(2 << 40));
        assert_eq!(size("1024K"), Ok(1 << 20));
        assert_eq!(size("4096"), Ok(4096));
        assert_eq!(size(" 8 M "), Ok(8 << 20));
    }

    #[test]
    fn bad_sizes_say_why() {
        for (text, want) in [
            ("", "is not a size"),
            ("G", "is not a size"),
            ("-1M", "is not a size"),
            ("12Q", "unknown unit \"Q\""),
            ("4GIBB", "unknown unit"),
            ("99999999999T", "too large"),
            ("99999999999999999999999", "too large"),
        ] {
            let e = size(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
        let e = size(&format!("1{}", "Q".repeat(100_000)))
            .unwrap_err()
            .to_string();
        assert!(e.len() < 200, "hostile unit quoted in full: {}", e.len());
    }

    #[test]
    fn display_uses_the_largest_exact_unit() {
        assert_eq!(Size(4 << 30).to_string(), "4G");
        assert_eq!(Size(1536 << 20).to_string(), "1536M");
        assert_eq!(Size(1000).to_string(), "1000");
        assert_eq!(Size(0).to_string(), "0");
    }

    #[test]
    fn serde_takes_strings_and_integers() {
        #[derive(serde::Deserialize, serde::Serialize, PartialEq, Debug)]
        struct T {
            s: Size,
        }
        let t: T = toml::from_str("s = \"4G\"").unwrap();
        assert_eq!(t.s, Size(4 << 30));
        let t: T = toml::from_str("s = 1073741824").unwrap();
        assert_eq!(t.s, Size(1 << 30));
        let e = toml::from_str::<T>("s = -1").unwrap_err().to_string();
        assert!(e.contains("negative"), "{e}");
        assert_eq!(toml::to_string(&t).unwrap().trim(), "s = \"1G\"");
    }

    proptest! {
        #[test]
        fn round_trips(v in any::<u64>()) {
            let text = Size(v).to_string();
            prop_assert_eq!(text.parse::<Size>(), Ok(Size(v)));
            let json = serde_json::to_string(&Size(v)).unwrap();
            prop_assert_eq!(serde_json::from_str::<Size>(&json).unwrap(), Size(v));
        }

        #[test]
        fn any_text_is_a_size_or_an_error(text in ".{0,40}") {
            let _ = text.parse::<Size>();
        }
    }
}
