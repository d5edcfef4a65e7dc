//! The machine's ECID (Virtualization.framework's machine identifier).

use std::fmt;
use std::str::FromStr;

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

use crate::quote;

/// An ECID: decimal or `0x` hex. Written to TOML as a string because TOML
/// integers stop at 2^63 - 1; a bare integer is read too.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Ecid(pub u64);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EcidError {
    #[error("{0} is not an ECID (a 64-bit number, decimal or 0x-prefixed hex)")]
    Invalid(String),
    #[error("an ECID cannot be negative")]
    Negative,
}

impl FromStr for Ecid {
    type Err = EcidError;
    fn from_str(s: &str) -> Result<Self, EcidError> {
        let t = s.trim();
        let parsed = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
            Some(hex) => u64::from_str_radix(hex, 16),
            None => t.parse(),
        };
        // from_str_radix takes a leading '+', which is no ECID syntax.
        if t.contains('+') {
            return Err(EcidError::Invalid(quote(s)));
        }
        parsed.map(Ecid).map_err(|_| EcidError::Invalid(quote(s)))
    }
}

impl fmt::Display for Ecid {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl Serialize for Ecid {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Ecid {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Ecid;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an ECID as a decimal or 0x-hex string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Ecid, E> {
                v.parse().map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Ecid, E> {
                u64::try_from(v)
                    .map(Ecid)
                    .map_err(|_| E::custom(EcidError::Negative))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Ecid, E> {
                Ok(Ecid(v))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn decimal_and_hex() {
        assert_eq!(
            "0x112210f47de98115".parse::<Ecid>(),
            Ok(Ecid(1234567890123456789))
        );
        assert_eq!("18446744073709551615".parse(), Ok(Ecid(u64::MAX)));
        assert_eq!("0X10".parse(), Ok(Ecid(16)));
        for bad in [
            "0x",
            "",
            "twelve",
            "18446744073709551616",
            "-1",
            "+1",
            "0x+1",
        ] {
            let e = bad.parse::<Ecid>().unwrap_err().to_string();
            assert!(e.contains("is not an ECID"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn values_past_i64_survive_toml() {
        #[derive(serde::Deserialize, serde::Serialize, PartialEq, Debug)]
        struct T {
            ecid: Ecid,
        }
        let t = T {
            ecid: Ecid(u64::MAX),
        };
        let text = toml::to_string(&t).unwrap();
        assert_eq!(toml::from_str::<T>(&text).unwrap(), t);
        assert_eq!(toml::from_str::<T>("ecid = 42").unwrap().ecid, Ecid(42));
        assert!(toml::from_str::<T>("ecid = -42").is_err());
    }

    proptest! {
        #[test]
        fn round_trips(v in any::<u64>()) {
            prop_assert_eq!(Ecid(v).to_string().parse::<Ecid>(), Ok(Ecid(v)));
            let json = serde_json::to_string(&Ecid(v)).unwrap();
            prop_assert_eq!(serde_json::from_str::<Ecid>(&json).unwrap(), Ecid(v));
        }
    }
}
