//! Disk images and shared directories.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{escape_commas, quote, split_options, Size};

/// A disk image the user named: `PATH[,readonly][,offset=BYTES]` on the
/// command line (`,,` for a comma in the path), a table
/// `{ path, read-only, offset }` in `config.toml`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct DiskSpec {
    pub path: PathBuf,
    #[serde(default, skip_serializing_if = "is_false")]
    pub read_only: bool,
    /// Bytes at the start of the file the guest does not see (16 KiB for
    /// an untrimmed Virtualization.framework aux file).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub offset: u64,
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl DiskSpec {
    /// A read-write disk seen whole.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        DiskSpec {
            path: path.into(),
            read_only: false,
            offset: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiskSpecError {
    #[error("empty disk path")]
    EmptyPath,
    #[error("unknown disk option {option} in {text} (the options are `readonly` and `offset=BYTES`; write a comma in a path as `,,`)")]
    UnknownOption { option: String, text: String },
    #[error("disk {text}: offset: {source}")]
    Offset {
        text: String,
        #[source]
        source: crate::SizeError,
    },
    #[error("disk {0}: an option is given twice")]
    Repeated(String),
}

impl FromStr for DiskSpec {
    type Err = DiskSpecError;
    fn from_str(text: &str) -> Result<Self, DiskSpecError> {
        let (path, options) = split_options(text);
        if path.is_empty() {
            return Err(DiskSpecError::EmptyPath);
        }
        let mut spec = DiskSpec::new(path);
        let (mut ro_seen, mut offset_seen) = (false, false);
        for option in options {
            let seen = match option {
                "readonly" | "ro" => std::mem::replace(&mut ro_seen, true),
                _ => match option.strip_prefix("offset=") {
                    Some(bytes) => {
                        spec.offset = bytes
                            .parse::<Size>()
                            .map_err(|source| DiskSpecError::Offset {
                                text: quote(text),
                                source,
                            })?
                            .0;
                        std::mem::replace(&mut offset_seen, true)
                    }
                    None => {
                        return Err(DiskSpecError::UnknownOption {
                            option: quote(option),
                            text: quote(text),
                        })
                    }
                },
            };
            if seen {
                return Err(DiskSpecError::Repeated(quote(text)));
            }
        }
        spec.read_only = ro_seen;
        Ok(spec)
    }
}

impl fmt::Display for DiskSpec {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(&escape_commas(&self.path))?;
        if self.read_only {
            f.write_str(",readonly")?;
        }
        if self.offset != 0 {
            write!(f, ",offset={}", self.offset)?;
        }
        Ok(())
    }
}

/// Longest virtio-fs tag: the device's config field is 36 bytes (virtio
/// 1.2 §5.11.4).
pub const MAX_SHARE_TAG: usize = 36;

/// A host directory shared with the guest over virtio-fs:
/// `TAG:PATH[,readonly]` on the command line, a table
/// `{ tag, path, read-only }` in `config.toml`. The guest mounts it by
/// its tag.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(
    rename_all = "kebab-case",
    deny_unknown_fields,
    try_from = "ShareTable"
)]
pub struct ShareSpec {
    pub tag: String,
    pub path: PathBuf,
    #[serde(default, skip_serializing_if = "is_false")]
    pub read_only: bool,
}

/// A share as TOML holds it, checked on the way in.
#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct ShareTable {
    tag: String,
    path: PathBuf,
    #[serde(default)]
    read_only: bool,
}

impl TryFrom<ShareTable> for ShareSpec {
    type Error = ShareSpecError;
    fn try_from(t: ShareTable) -> Result<Self, ShareSpecError> {
        ShareSpec::new(t.tag, t.path, t.read_only)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShareSpecError {
    #[error("share {0}: expected TAG:PATH[,readonly]")]
    Syntax(String),
    #[error("share tag {0}: give 1 to {MAX_SHARE_TAG} bytes, no `:`, `,` or control characters")]
    BadTag(String),
    #[error("share {0}: empty path")]
    EmptyPath(String),
    #[error("unknown share option {option} in {text} (the only option is `readonly`; write a comma in a path as `,,`)")]
    UnknownOption { option: String, text: String },
}

impl ShareSpec {
    /// A share with its tag checked.
    pub fn new(tag: String, path: PathBuf, read_only: bool) -> Result<Self, ShareSpecError> {
        if tag.is_empty()
            || tag.len() > MAX_SHARE_TAG
            || tag.chars().any(|c| c == ':' || c == ',' || c.is_control())
        {
            return Err(ShareSpecError::BadTag(quote(&tag)));
        }
        if path.as_os_str().is_empty() {
            return Err(ShareSpecError::EmptyPath(quote(&tag)));
        }
        Ok(ShareSpec {
            tag,
            path,
            read_only,
        })
    }
}

impl FromStr for ShareSpec {
    type Err = ShareSpecError;
    fn from_str(text: &str) -> Result<Self, ShareSpecError> {
        let (tag, rest) = text
            .split_once(':')
            .ok_or_else(|| ShareSpecError::Syntax(quote(text)))?;
        let (path, options) = split_options(rest);
        let mut read_only = false;
        for option in options {
            match option {
                "readonly" | "ro" if !read_only => read_only = true,
                _ => {
                    return Err(ShareSpecError::UnknownOption {
                        option: quote(option),
                        text: quote(text),
                    })
                }
            }
        }
        ShareSpec::new(tag.to_owned(), path.into(), read_only)
    }
}

impl fmt::Display for ShareSpec {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}:{}", self.tag, escape_commas(&self.path))?;
        if self.read_only {
            f.write_str(",readonly")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn disk_syntax() {
        let d: DiskSpec = "/a/b.img,readonly".parse().unwrap();
        assert_eq!((d.path.to_str().unwrap(), d.read_only), ("/a/b.img", true));
        assert!(!"plain.img".parse::<DiskSpec>().unwrap().read_only);
        assert_eq!(
            "aux.img,ro,offset=16K".parse(),
            Ok(DiskSpec {
                path: "aux.img".into(),
                read_only: true,
                offset: 16384
            })
        );
        assert_eq!("a,,b.img".parse(), Ok(DiskSpec::new("a,b.img")));
        for (bad, want) in [
            ("x,y.img", "unknown disk option \"y.img\""),
            (",readonly", "empty disk path"),
            ("", "empty disk path"),
            ("a,readonly,ro", "given twice"),
            ("a,offset=1,offset=2", "given twice"),
            ("a,offset=lots", "offset"),
            ("a,", "unknown disk option \"\""),
        ] {
            let e = bad.parse::<DiskSpec>().unwrap_err().to_string();
            assert!(e.contains(want), "{bad:?}: {e}");
        }
    }

    #[test]
    fn disk_tables() {
        let d: DiskSpec = toml::from_str("path = \"aux.img\"\noffset = 16384").unwrap();
        assert_eq!(d.offset, 16384);
        let e = toml::from_str::<DiskSpec>("path = \"a\"\nofset = 1")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `ofset`"), "{e}");
        assert_eq!(
            toml::to_string(&DiskSpec::new("r.img")).unwrap().trim(),
            "path = \"r.img\""
        );
    }

    #[test]
    fn share_syntax() {
        assert_eq!(
            "home:/Users/me,readonly".parse(),
            Ok(ShareSpec {
                tag: "home".into(),
                path: "/Users/me".into(),
                read_only: true
            })
        );
        assert_eq!(
            "t:/a:b,,c".parse::<ShareSpec>().unwrap().path,
            PathBuf::from("/a:b,c")
        );
        let long_tag = format!("{}:/x", "t".repeat(37));
        for (bad, want) in [
            ("/no/tag", "expected TAG:PATH"),
            (":/x", "share tag \"\""),
            (long_tag.as_str(), "1 to 36 bytes"),
            ("t\n:/x", "share tag"),
            ("t:", "empty path"),
            ("t:/x,rw", "unknown share option \"rw\""),
            ("t:/x,ro,ro", "unknown share option \"ro\""),
        ] {
            let e = bad.parse::<ShareSpec>().unwrap_err().to_string();
            assert!(e.contains(want), "{bad:?}: {e}");
        }
        let t: ShareSpec = toml::from_str("tag = \"t\"\npath = \"/x\"").unwrap();
        assert_eq!(t, "t:/x".parse().unwrap());
        let e = toml::from_str::<ShareSpec>("tag = \"a:b\"\npath = \"/x\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("share tag"), "{e}");
    }

    proptest! {
        #[test]
        fn disks_round_trip(path in "[^\0]{1,60}", read_only in any::<bool>(), offset in any::<u64>()) {
            let d = DiskSpec { path: path.into(), read_only, offset };
            prop_assert_eq!(d.to_string().parse::<DiskSpec>(), Ok(d.clone()));
            let json = serde_json::to_string(&d).unwrap();
            prop_assert_eq!(serde_json::from_str::<DiskSpec>(&json).unwrap(), d);
        }

        #[test]
        fn shares_round_trip(tag in "[^\0-\u{1f}:,\u{7f}-\u{9f}]{1,12}", path in "[^\0]{1,60}", read_only in any::<bool>()) {
            let s = ShareSpec::new(tag, path.into(), read_only).unwrap();
            prop_assert_eq!(s.to_string().parse::<ShareSpec>(), Ok(s.clone()));
            let json = serde_json::to_string(&s).unwrap();
            prop_assert_eq!(serde_json::from_str::<ShareSpec>(&json).unwrap(), s);
        }

        #[test]
        fn any_text_parses_or_fails_cleanly(s in ".{0,60}") {
            let _ = s.parse::<DiskSpec>();
            let _ = s.parse::<ShareSpec>();
        }
    }
}
