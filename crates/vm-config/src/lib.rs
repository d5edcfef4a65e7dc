//! vmapple's configuration model.
//!
//! Each thing a user configures is one type here, with [`FromStr`] for the
//! command line, [`Display`](std::fmt::Display) giving back the same
//! syntax, and serde for `config.toml`. The command line, bundles and the
//! machine all use these types, so each syntax is parsed in one place and
//! a value never goes back to a string to be parsed again.
//!
//! | type | syntax |
//! |---|---|
//! | [`Size`] | `512M`, `4G`, `4GiB`, a byte count |
//! | [`Ecid`] | decimal or `0x` hex, 64 bits |
//! | [`SerialBackend`] | `stdio`, `file:PATH`, `unix:PATH`, `none` |
//! | [`Network`], [`NetBackend`] | `passt`, `unix:PATH`, `unix-dgram:LOCAL,PEER`, `tap:NAME`, `vmnet`, `none` |
//! | [`MacAddress`] | `52:54:00:12:34:56` (unicast) |
//! | [`DisplayMode`], [`DisplayModes`] | `1920x1080@60`, comma-separated |
//! | [`DiskSpec`] | `PATH[,readonly][,offset=BYTES]` |
//! | [`ShareSpec`] | `TAG:PATH[,readonly]` |
//! | [`PanicPolicy`] | `exit`, `pause`, `continue`, `reset` |
//! | [`Msi`] | `on`, `off` |
//!
//! Every parser takes hostile text: it never panics, never allocates in
//! proportion to the input beyond the value itself, and quotes at most
//! [`QUOTE_LIMIT`] characters of the input in an error.
//!
//! [`FromStr`]: std::str::FromStr

mod disk;
pub mod display;
mod ecid;
mod msi;
mod net;
mod panic;
mod serial;
mod size;

pub use disk::{DiskSpec, DiskSpecError, ShareSpec, ShareSpecError, MAX_SHARE_TAG};
pub use display::{DisplayMode, DisplayModes};
pub use ecid::{Ecid, EcidError};
pub use msi::{Msi, MsiError};
pub use net::{MacAddress, MacError, NetBackend, NetError, Network, MAX_TAP_NAME};
pub use panic::{PanicPolicy, PanicPolicyError};
pub use serial::{SerialBackend, SerialSpecError, SERIAL_BACKEND_FORMS};
pub use size::{Size, SizeError};

/// Most characters of user input an error message repeats: the text may
/// be a megabyte of junk, and a log of it helps nobody.
pub const QUOTE_LIMIT: usize = 40;

/// `text` as a Rust string literal, shortened to [`QUOTE_LIMIT`]
/// characters (with an ellipsis) when longer.
pub(crate) fn quote(text: &str) -> String {
    if text.chars().count() <= QUOTE_LIMIT {
        format!("{text:?}")
    } else {
        let head: String = text.chars().take(QUOTE_LIMIT).collect();
        format!("{head:?}…")
    }
}

/// Serde through [`FromStr`](std::str::FromStr) and
/// [`Display`](std::fmt::Display): the value is written in its
/// command-line syntax.
macro_rules! serde_as_string {
    ($ty:ty, $expecting:expr) => {
        impl serde::Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> serde::Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl serde::de::Visitor<'_> for V {
                    type Value = $ty;
                    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                        f.write_str($expecting)
                    }
                    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<$ty, E> {
                        v.parse().map_err(E::custom)
                    }
                }
                d.deserialize_str(V)
            }
        }
    };
}
pub(crate) use serde_as_string;

/// Splits `text` at single commas; `,,` stands for a literal comma (QEMU's
/// escape), so any path can be written. The first part is the unescaped
/// head (a path); the rest are the options as written.
pub(crate) fn split_options(text: &str) -> (String, Vec<&str>) {
    let mut head = String::new();
    let mut rest = text;
    loop {
        match rest.find(',') {
            None => {
                head.push_str(rest);
                return (head, Vec::new());
            }
            Some(i) if rest[i + 1..].starts_with(',') => {
                head.push_str(&rest[..=i]);
                rest = &rest[i + 2..];
            }
            Some(i) => {
                head.push_str(&rest[..i]);
                return (head, rest[i + 1..].split(',').collect());
            }
        }
    }
}

/// Writes `path` with each comma doubled, for [`split_options`].
pub(crate) fn escape_commas(path: &std::path::Path) -> String {
    path.display().to_string().replace(',', ",,")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_split_at_single_commas_only() {
        assert_eq!(split_options("a.img"), ("a.img".into(), vec![]));
        assert_eq!(
            split_options("a.img,readonly"),
            ("a.img".into(), vec!["readonly"])
        );
        assert_eq!(
            split_options("a,,b.img,ro,x"),
            ("a,b.img".into(), vec!["ro", "x"])
        );
        assert_eq!(split_options(",,,,"), (",,".into(), vec![]));
        assert_eq!(split_options(",x"), ("".into(), vec!["x"]));
        assert_eq!(split_options("a,"), ("a".into(), vec![""]));
    }

    #[test]
    fn long_input_is_quoted_short() {
        let q = quote(&"x".repeat(100_000));
        assert!(q.chars().count() < QUOTE_LIMIT + 4, "{q}");
        assert_eq!(quote("ab"), "\"ab\"");
    }
}
