//! Display modes offered to the guest: `--display-modes` and a bundle's
//! `display.modes`.
//!
//! Follows apple-gfx.md §11 (the `display-modes` property) and §4.2 step 7
//! (defaults). An entry is `<width>x<height>@<refresh>`, three decimal
//! integers 1…65535; a list is comma-separated, first entry preferred.
//!
//! Two grammars:
//!
//! * [`ModeSyntax::Strict`] (the default): digits only, lowercase `x`, no
//!   whitespace, no sign, nothing after the refresh rate, no duplicate
//!   entries.
//! * [`ModeSyntax::QemuCompatible`]: what QEMU's `qemu_strtoi`-based parser
//!   accepts, so command lines written for QEMU keep working: each number may
//!   have leading whitespace and a `+`, and anything after the refresh rate
//!   is ignored (`1920x1080@60Hz`). The separators are still exactly `x`
//!   (lowercase) and `@`, so `1920X1080@60` and `1920x1080 @60` fail there
//!   too. Duplicates are accepted, as in QEMU.
//!
//! Both reject more than [`MAX_MODES`] entries, the framework's limit, which
//! QEMU does not check (§11 "Not enforced by QEMU").
//!
//! In `config.toml` a mode may also be written `WIDTHxHEIGHT` (60 Hz), the
//! form bundles were first written with; it is written back with its rate.

use std::fmt;
use std::str::FromStr;

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

use crate::quote;

/// Most modes ParavirtualizedGraphics accepts in a display's mode list
/// (apple-gfx.md §2.4).
pub const MAX_MODES: usize = 128;

/// How much of an offending entry an error message quotes: the option value
/// comes from the user, and a megabyte of it in a log helps nobody.
const QUOTE_LIMIT: usize = 40;

/// One display mode: size in pixels and refresh rate in hertz.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DisplayMode {
    pub width: u16,
    pub height: u16,
    pub refresh_hz: u16,
}

impl DisplayMode {
    pub const fn new(width: u16, height: u16, refresh_hz: u16) -> Self {
        Self {
            width,
            height,
            refresh_hz,
        }
    }
}

/// QEMU's defaults when no mode is configured (apple-gfx.md §4.2 step 7);
/// the first is the preferred mode.
pub const DEFAULT_MODES: [DisplayMode; 3] = [
    DisplayMode::new(1920, 1080, 60),
    DisplayMode::new(1440, 1080, 60),
    DisplayMode::new(1280, 1024, 60),
];

impl fmt::Display for DisplayMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{}@{}", self.width, self.height, self.refresh_hz)
    }
}

impl FromStr for DisplayMode {
    type Err = EntryError;

    /// Parses one entry with the strict grammar.
    fn from_str(s: &str) -> Result<Self, EntryError> {
        parse_entry(s, ModeSyntax::Strict)
    }
}

impl Serialize for DisplayMode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DisplayMode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = DisplayMode;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a display mode like 1920x1080@60")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<DisplayMode, E> {
                let legacy = !v.contains('@') && v.contains('x');
                let parsed = if legacy {
                    parse_entry(&format!("{v}@{LEGACY_REFRESH_HZ}"), ModeSyntax::Strict)
                } else {
                    parse_entry(v, ModeSyntax::Strict)
                };
                parsed.map_err(|reason| E::custom(format!("display mode {}: {reason}", quote(v))))
            }
        }
        d.deserialize_str(V)
    }
}

/// The rate of a mode written without one in `config.toml`.
pub const LEGACY_REFRESH_HZ: u16 = 60;

/// A list of modes, the first preferred: the `--display-modes` syntax
/// (comma-separated, strict grammar) and a TOML array of modes. Never more
/// than [`MAX_MODES`], never the same mode twice. An empty list parses
/// from TOML (a bundle without a display) but not from text.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct DisplayModes(Vec<DisplayMode>);

impl DisplayModes {
    /// The list if it is one a user could give: at most [`MAX_MODES`]
    /// modes, no duplicates.
    pub fn new(modes: Vec<DisplayMode>) -> Result<Self, ModeError> {
        check_mode_list(&modes)?;
        Ok(DisplayModes(modes))
    }

    pub fn as_slice(&self) -> &[DisplayMode] {
        &self.0
    }

    pub fn into_vec(self) -> Vec<DisplayMode> {
        self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::ops::Deref for DisplayModes {
    type Target = [DisplayMode];
    fn deref(&self) -> &[DisplayMode] {
        &self.0
    }
}

impl FromStr for DisplayModes {
    type Err = ModeError;
    fn from_str(s: &str) -> Result<Self, ModeError> {
        parse_mode_list(s, ModeSyntax::Strict).map(DisplayModes)
    }
}

impl fmt::Display for DisplayModes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_mode_list(&self.0))
    }
}

impl Serialize for DisplayModes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de> Deserialize<'de> for DisplayModes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = DisplayModes;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list of display modes like [\"1920x1080@60\"]")
            }
            fn visit_seq<A: de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<DisplayModes, A::Error> {
                let mut modes = Vec::new();
                while let Some(mode) = seq.next_element::<DisplayMode>()? {
                    // Counted as they come: a huge array is refused before
                    // it is all in memory.
                    if modes.len() == MAX_MODES {
                        return Err(de::Error::custom(ModeError::TooMany { max: MAX_MODES }));
                    }
                    modes.push(mode);
                }
                DisplayModes::new(modes).map_err(de::Error::custom)
            }
        }
        d.deserialize_seq(V)
    }
}

/// Which grammar to accept; see the module documentation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ModeSyntax {
    #[default]
    Strict,
    QemuCompatible,
}

/// Which of the three numbers of an entry is meant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    Width,
    Height,
    Refresh,
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Field::Width => "width",
            Field::Height => "height",
            Field::Refresh => "refresh rate",
        })
    }
}

/// What is wrong with one entry.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    #[error("the entry is empty")]
    Empty,
    #[error("the {0} is missing")]
    Missing(Field),
    #[error("the {0} is not a decimal number")]
    NotANumber(Field),
    #[error("the {0} must be at least 1")]
    Zero(Field),
    #[error("the {0} is negative")]
    Negative(Field),
    #[error("the {0} is larger than 65535")]
    TooLarge(Field),
    #[error(
        "expected '{expected}' after the {after} (the form is WIDTHxHEIGHT@HZ, e.g. 1920x1080@60)"
    )]
    Separator { expected: char, after: Field },
    #[error(
        "unexpected text after the refresh rate (the form is WIDTHxHEIGHT@HZ, e.g. 1920x1080@60)"
    )]
    Trailing,
}

/// Why a mode list was refused. Messages name the entry and the reason.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ModeError {
    #[error("no display modes given (leave the option out to get the defaults)")]
    NoModes,
    #[error("display mode {index} {entry:?}: {reason}")]
    BadEntry {
        /// 1-based position in the list.
        index: usize,
        /// The entry as written, shortened if very long.
        entry: String,
        reason: EntryError,
    },
    #[error("display mode {index} {entry:?} repeats mode {first}")]
    Duplicate {
        index: usize,
        entry: String,
        first: usize,
    },
    #[error("more than {max} display modes given; the framework accepts at most {max}")]
    TooMany { max: usize },
}

/// Parses a comma-separated `--display-modes` value.
///
/// Never allocates more than [`MAX_MODES`] entries, however long `list` is.
pub fn parse_mode_list(list: &str, syntax: ModeSyntax) -> Result<Vec<DisplayMode>, ModeError> {
    if list.is_empty() {
        return Err(ModeError::NoModes);
    }
    let mut modes: Vec<DisplayMode> = Vec::new();
    for (i, entry) in list.split(',').enumerate() {
        let index = i + 1;
        if index > MAX_MODES {
            return Err(ModeError::TooMany { max: MAX_MODES });
        }
        let mode = parse_entry(entry, syntax).map_err(|reason| ModeError::BadEntry {
            index,
            entry: quote_entry(entry),
            reason,
        })?;
        if syntax == ModeSyntax::Strict {
            if let Some(first) = modes.iter().position(|m| *m == mode) {
                return Err(ModeError::Duplicate {
                    index,
                    entry: quote_entry(entry),
                    first: first + 1,
                });
            }
        }
        modes.push(mode);
    }
    Ok(modes)
}

/// The modes to offer: the configured list if it has any entry, otherwise
/// [`DEFAULT_MODES`] (apple-gfx.md §4.2 step 7).
pub fn modes_or_default(configured: &[DisplayMode]) -> Vec<DisplayMode> {
    if configured.is_empty() {
        DEFAULT_MODES.to_vec()
    } else {
        configured.to_vec()
    }
}

/// Formats a list back into the option syntax.
pub fn format_mode_list(modes: &[DisplayMode]) -> String {
    modes
        .iter()
        .map(DisplayMode::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Checks a list given as values: at most [`MAX_MODES`], no duplicates.
pub fn check_mode_list(modes: &[DisplayMode]) -> Result<(), ModeError> {
    if modes.len() > MAX_MODES {
        return Err(ModeError::TooMany { max: MAX_MODES });
    }
    for (i, mode) in modes.iter().enumerate() {
        if let Some(first) = modes[..i].iter().position(|m| m == mode) {
            return Err(ModeError::Duplicate {
                index: i + 1,
                entry: mode.to_string(),
                first: first + 1,
            });
        }
    }
    Ok(())
}

fn quote_entry(entry: &str) -> String {
    if entry.chars().count() <= QUOTE_LIMIT {
        entry.to_owned()
    } else {
        let mut s: String = entry.chars().take(QUOTE_LIMIT).collect();
        s.push('…');
        s
    }
}

/// Parses one `WxH@R` entry.
pub fn parse_entry(entry: &str, syntax: ModeSyntax) -> Result<DisplayMode, EntryError> {
    if entry.is_empty() {
        return Err(EntryError::Empty);
    }
    let b = entry.as_bytes();
    let (width, rest) = number(b, Field::Width, syntax)?;
    let rest = separator(rest, b'x', Field::Width)?;
    let (height, rest) = number(rest, Field::Height, syntax)?;
    let rest = separator(rest, b'@', Field::Height)?;
    let (refresh_hz, rest) = number(rest, Field::Refresh, syntax)?;
    if syntax == ModeSyntax::Strict && !rest.is_empty() {
        return Err(EntryError::Trailing);
    }
    Ok(DisplayMode {
        width,
        height,
        refresh_hz,
    })
}

fn separator(s: &[u8], expected: u8, after: Field) -> Result<&[u8], EntryError> {
    match s.split_first() {
        Some((&c, rest)) if c == expected => Ok(rest),
        _ => Err(EntryError::Separator {
            expected: char::from(expected),
            after,
        }),
    }
}

/// Reads one number at the start of `s`, returning it and what follows.
fn number(s: &[u8], field: Field, syntax: ModeSyntax) -> Result<(u16, &[u8]), EntryError> {
    let mut s = s;
    let mut negative = false;
    if syntax == ModeSyntax::QemuCompatible {
        // strtol's prefix: C-locale whitespace, then an optional sign.
        while let Some((&c, rest)) = s.split_first() {
            if matches!(c, b' ' | b'\t' | b'\n' | b'\x0b' | b'\x0c' | b'\r') {
                s = rest;
            } else {
                break;
            }
        }
        if let Some((&c, rest)) = s.split_first() {
            if c == b'+' || c == b'-' {
                negative = c == b'-';
                s = rest;
            }
        }
    }
    let digits = s.iter().take_while(|c| c.is_ascii_digit()).count();
    if digits == 0 {
        return Err(
            if s.is_empty()
                || (field != Field::Refresh && s[0] == b'x')
                || s[0] == b'@'
                || s[0] == b','
            {
                EntryError::Missing(field)
            } else {
                EntryError::NotANumber(field)
            },
        );
    }
    // Saturate instead of overflowing: any value past u16 is refused anyway.
    let value = s[..digits].iter().fold(0u32, |acc, &d| {
        acc.saturating_mul(10).saturating_add(u32::from(d - b'0'))
    });
    let rest = &s[digits..];
    if negative && value != 0 {
        return Err(EntryError::Negative(field));
    }
    if value == 0 {
        return Err(EntryError::Zero(field));
    }
    let value = u16::try_from(value).map_err(|_| EntryError::TooLarge(field))?;
    Ok((value, rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    use proptest::prelude::*;

    fn strict(s: &str) -> Result<Vec<DisplayMode>, ModeError> {
        parse_mode_list(s, ModeSyntax::Strict)
    }

    fn qemu(s: &str) -> Result<Vec<DisplayMode>, ModeError> {
        parse_mode_list(s, ModeSyntax::QemuCompatible)
    }

    fn reason(r: Result<Vec<DisplayMode>, ModeError>) -> EntryError {
        match r {
            Err(ModeError::BadEntry { reason, .. }) => reason,
            other => panic!("expected a bad entry, got {other:?}"),
        }
    }

    #[test]
    fn single_and_multiple_entries() {
        assert_eq!(
            strict("1920x1080@60").unwrap(),
            vec![DisplayMode::new(1920, 1080, 60)]
        );
        assert_eq!(
            strict("3840x2160@60,1280x720@30").unwrap(),
            vec![
                DisplayMode::new(3840, 2160, 60),
                DisplayMode::new(1280, 720, 30)
            ]
        );
        assert_eq!(
            strict("65535x65535@65535").unwrap()[0],
            DisplayMode::new(65535, 65535, 65535)
        );
        assert_eq!(strict("1x1@1").unwrap()[0], DisplayMode::new(1, 1, 1));
    }

    #[test]
    fn formatting_round_trips() {
        let modes = strict("1920x1080@60,800x600@75").unwrap();
        assert_eq!(format_mode_list(&modes), "1920x1080@60,800x600@75");
        assert_eq!(DisplayMode::new(1, 2, 3).to_string(), "1x2@3");
        assert_eq!(
            "640x480@60".parse::<DisplayMode>().unwrap(),
            DisplayMode::new(640, 480, 60)
        );
    }

    #[test]
    fn defaults_apply_only_without_configuration() {
        assert_eq!(
            format_mode_list(&modes_or_default(&[])),
            "1920x1080@60,1440x1080@60,1280x1024@60"
        );
        let one = [DisplayMode::new(800, 600, 60)];
        assert_eq!(modes_or_default(&one), one.to_vec());
    }

    #[test]
    fn spaced_uppercase_entry_is_refused_by_both_grammars() {
        let s = "  1920X1080 @ 60 ";
        assert_eq!(reason(strict(s)), EntryError::NotANumber(Field::Width));
        // QEMU skips the leading blanks but wants a lowercase 'x'.
        assert_eq!(
            reason(qemu(s)),
            EntryError::Separator {
                expected: 'x',
                after: Field::Width
            }
        );
        assert_eq!(
            reason(qemu("1920x1080 @60")),
            EntryError::Separator {
                expected: '@',
                after: Field::Height
            }
        );
    }

    #[test]
    fn qemu_grammar_accepts_its_quirks() {
        let want = vec![DisplayMode::new(1920, 1080, 60)];
        assert_eq!(qemu("1920x1080@60Hz").unwrap(), want);
        assert_eq!(qemu("1920x1080@60 ").unwrap(), want);
        assert_eq!(qemu(" +1920x\t1080@ 60").unwrap(), want);
        assert_eq!(qemu("1920x1080@60,1920x1080@60").unwrap().len(), 2);
        // Strict refuses each of them.
        assert_eq!(reason(strict("1920x1080@60Hz")), EntryError::Trailing);
        assert_eq!(reason(strict("1920x1080@60 ")), EntryError::Trailing);
        assert_eq!(
            reason(strict("+1920x1080@60")),
            EntryError::NotANumber(Field::Width)
        );
    }

    #[test]
    fn zero_and_oversized_dimensions() {
        assert_eq!(reason(strict("0x0@60")), EntryError::Zero(Field::Width));
        assert_eq!(reason(strict("1920x0@60")), EntryError::Zero(Field::Height));
        assert_eq!(
            reason(strict("1920x1080@0")),
            EntryError::Zero(Field::Refresh)
        );
        assert_eq!(
            reason(strict("99999999999x1@60")),
            EntryError::TooLarge(Field::Width)
        );
        assert_eq!(
            reason(strict("65536x1@60")),
            EntryError::TooLarge(Field::Width)
        );
        assert_eq!(
            reason(strict("1x1@70000")),
            EntryError::TooLarge(Field::Refresh)
        );
        let huge = format!("1x{}@60", "9".repeat(10_000));
        assert_eq!(reason(strict(&huge)), EntryError::TooLarge(Field::Height));
        assert_eq!(
            reason(qemu("-1920x1080@60")),
            EntryError::Negative(Field::Width)
        );
        assert_eq!(reason(qemu("-0x1080@60")), EntryError::Zero(Field::Width));
    }

    #[test]
    fn missing_parts_and_garbage() {
        assert_eq!(
            reason(strict("1920x1080@")),
            EntryError::Missing(Field::Refresh)
        );
        assert_eq!(
            reason(qemu("1920x1080@")),
            EntryError::Missing(Field::Refresh)
        );
        assert_eq!(
            reason(strict("1920x1080")),
            EntryError::Separator {
                expected: '@',
                after: Field::Height
            }
        );
        assert_eq!(
            reason(strict("x1080@60")),
            EntryError::Missing(Field::Width)
        );
        assert_eq!(
            reason(strict("1920x@60")),
            EntryError::Missing(Field::Height)
        );
        assert_eq!(reason(strict("a,b")), EntryError::NotANumber(Field::Width));
        assert_eq!(reason(strict("1920x1080@60,")), EntryError::Empty);
        assert_eq!(reason(strict(",1920x1080@60")), EntryError::Empty);
        assert_eq!(
            reason(strict("１９２０x1080@60")),
            EntryError::NotANumber(Field::Width)
        );
        assert_eq!(strict(""), Err(ModeError::NoModes));
        assert_eq!(qemu(""), Err(ModeError::NoModes));
    }

    #[test]
    fn errors_name_the_entry_and_the_reason() {
        let msg = strict("1920x1080@60,a,b").unwrap_err().to_string();
        assert_eq!(
            msg,
            "display mode 2 \"a\": the width is not a decimal number"
        );
        let msg = strict("0x0@60").unwrap_err().to_string();
        assert_eq!(
            msg,
            "display mode 1 \"0x0@60\": the width must be at least 1"
        );
        let msg = strict("1920x1080@").unwrap_err().to_string();
        assert!(
            msg.contains("1920x1080@") && msg.contains("refresh rate is missing"),
            "{msg}"
        );
        let long = format!("{}x1@60", "7".repeat(500));
        let msg = strict(&long).unwrap_err().to_string();
        assert!(
            msg.len() < 200,
            "hostile entry quoted in full: {}",
            msg.len()
        );
    }

    #[test]
    fn duplicates_are_refused_in_strict_mode() {
        let err = strict("1920x1080@60,800x600@60,1920x1080@60").unwrap_err();
        assert_eq!(
            err,
            ModeError::Duplicate {
                index: 3,
                entry: "1920x1080@60".into(),
                first: 1
            }
        );
        assert_eq!(
            err.to_string(),
            "display mode 3 \"1920x1080@60\" repeats mode 1"
        );
        // Same size at another rate is a different mode.
        assert_eq!(strict("1920x1080@60,1920x1080@30").unwrap().len(), 2);
    }

    #[test]
    fn at_most_128_modes() {
        let list = |n: u16| {
            (1..=n)
                .map(|w| format!("{w}x100@60"))
                .collect::<Vec<_>>()
                .join(",")
        };
        assert_eq!(strict(&list(128)).unwrap().len(), 128);
        assert_eq!(strict(&list(129)), Err(ModeError::TooMany { max: 128 }));
        assert_eq!(strict(&list(1000)), Err(ModeError::TooMany { max: 128 }));
        assert_eq!(qemu(&list(1000)), Err(ModeError::TooMany { max: 128 }));
        // Even when every entry is the same, the count is checked first.
        let same = vec!["1x1@1"; 1000].join(",");
        assert_eq!(qemu(&same), Err(ModeError::TooMany { max: 128 }));
    }

    #[test]
    fn toml_lists_take_the_legacy_form_and_refuse_bad_lists() {
        #[derive(serde::Deserialize, serde::Serialize, Debug, PartialEq)]
        struct T {
            modes: DisplayModes,
        }
        let t: T = toml::from_str(r#"modes = ["2560x1600", "800x600@75"]"#).unwrap();
        assert_eq!(
            t.modes.as_slice(),
            [
                DisplayMode::new(2560, 1600, 60),
                DisplayMode::new(800, 600, 75)
            ]
        );
        let text = toml::to_string(&t).unwrap();
        assert_eq!(text.trim(), r#"modes = ["2560x1600@60", "800x600@75"]"#);
        assert_eq!(toml::from_str::<T>(&text).unwrap(), t);
        assert!(toml::from_str::<T>("modes = []").unwrap().modes.is_empty());
        for (bad, want) in [
            (r#"modes = ["0x1600"]"#, "the width must be at least 1"),
            (r#"modes = ["1x1@60", "1x1"]"#, "repeats mode 1"),
            (r#"modes = ["1920X1080"]"#, "display mode \"1920X1080\""),
            (r#"modes = [1]"#, "display mode"),
        ] {
            let e = toml::from_str::<T>(bad).unwrap_err().to_string();
            assert!(e.contains(want), "{bad}: {e}");
        }
        let many = (1..=129)
            .map(|w| format!("\"{w}x1@1\""))
            .collect::<Vec<_>>();
        let e = toml::from_str::<T>(&format!("modes = [{}]", many.join(",")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("more than 128"), "{e}");
    }

    #[test]
    fn value_lists_are_checked_like_text() {
        let m = DisplayMode::new(1, 2, 3);
        assert!(DisplayModes::new(vec![m, m]).is_err());
        assert!(DisplayModes::new(vec![m; 129]).is_err());
        assert_eq!(DisplayModes::new(vec![m]).unwrap().to_string(), "1x2@3");
        assert_eq!("".parse::<DisplayModes>(), Err(ModeError::NoModes));
    }

    fn mode() -> impl Strategy<Value = DisplayMode> {
        (1..=u16::MAX, 1..=u16::MAX, 1..=u16::MAX).prop_map(|(w, h, r)| DisplayMode::new(w, h, r))
    }

    proptest! {
        #[test]
        fn modes_and_lists_round_trip(modes in proptest::collection::hash_set(mode(), 1..8)) {
            let list = DisplayModes::new(modes.into_iter().collect()).unwrap();
            prop_assert_eq!(list.to_string().parse::<DisplayModes>(), Ok(list.clone()));
            for m in list.iter() {
                prop_assert_eq!(m.to_string().parse::<DisplayMode>(), Ok(*m));
            }
            let json = serde_json::to_string(&list).unwrap();
            prop_assert_eq!(serde_json::from_str::<DisplayModes>(&json).unwrap(), list);
        }
    }
}
