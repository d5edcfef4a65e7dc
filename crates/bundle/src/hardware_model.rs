//! The hardware model a macOS VM was made for: the data representation of
//! a `VZMacHardwareModel`, as Tart (`hardwareModel` in config.json, base64),
//! macosvm (`hardwareModel` in its JSON, base64) and Virtualization.framework
//! bundles (a `HardwareModel` file) keep it.
//!
//! Observed layout (tart-oci.md §2.1, not documented by Apple): a property
//! list (binary in practice, XML accepted) holding a dictionary with an
//! integer `DataRepresentationVersion` (1 or 2), an integer
//! `PlatformVersion` (2 in every sample) and an array `MinimumSupportedOS`
//! = [major, minor, patch]. macOS 26 restore images choose version 2
//! (newer-macos-guests.md). Other keys are kept as they are and shown, not
//! interpreted.
//!
//! vmapple emulates one machine whatever the model says: what a guest
//! needs of `PlatformVersion` or the representation version is unknown,
//! so the model is kept and passed on (push, `identity`), never acted on.
//! The bytes are kept exactly as they came, so a push gives
//! Virtualization.framework back what it wrote.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Name of the hardware-model plist inside a Virtualization.framework
/// bundle and inside a vmapple bundle.
pub const HARDWARE_MODEL_FILE: &str = "HardwareModel";

/// Largest hardware model accepted. Real ones are about 100 bytes; the
/// bound keeps a hostile one from costing memory or time to parse.
pub const MAX_HARDWARE_MODEL: usize = 64 << 10;

const VERSION_KEY: &str = "DataRepresentationVersion";
const PLATFORM_KEY: &str = "PlatformVersion";
const MIN_OS_KEY: &str = "MinimumSupportedOS";

/// The two data representations seen in Tart and Virtualization.framework
/// bundles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Representation {
    V1 = 1,
    V2 = 2,
}

/// A decoded hardware model.
#[derive(Debug, Clone, PartialEq)]
pub struct HardwareModel {
    pub representation: Representation,
    pub platform_version: u64,
    /// [major, minor, patch].
    pub minimum_os: [u64; 3],
    /// Keys vmapple does not know, as found.
    pub other: plist::Dictionary,
    /// The plist exactly as read: what is written to a bundle and pushed.
    raw: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum HardwareModelError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: hardwareModel is not a base64 string")]
    NotBase64 { what: String },
    #[error("{what}: larger than {MAX_HARDWARE_MODEL} bytes, not a hardware model")]
    TooLarge { what: String },
    #[error("{what} is not a property list: {reason}")]
    NotPlist { what: String, reason: String },
    #[error("{what} is not a dictionary")]
    NotDictionary { what: String },
    #[error("{what} has no {key} key")]
    Missing { what: String, key: &'static str },
    #[error("{what}: {key} is {found}, expected {expected}")]
    BadValue {
        what: String,
        key: &'static str,
        found: String,
        expected: &'static str,
    },
    #[error("{what}: DataRepresentationVersion {version} is unknown (vmapple knows 1 and 2)")]
    UnknownVersion { what: String, version: String },
}

fn unsigned(v: &plist::Value) -> Option<u64> {
    match v {
        plist::Value::Integer(i) => i.as_unsigned(),
        _ => None,
    }
}

/// A short description of a plist value for messages, bounded in length
/// whatever the value holds.
fn describe(v: &plist::Value) -> String {
    match v {
        plist::Value::Integer(i) => i.to_string(),
        plist::Value::Array(a) => format!("an array of {}", a.len()),
        plist::Value::Dictionary(_) => "a dictionary".into(),
        plist::Value::Boolean(b) => b.to_string(),
        plist::Value::Data(d) => format!("{} bytes of data", d.len()),
        plist::Value::Date(_) => "a date".into(),
        plist::Value::Real(r) => r.to_string(),
        plist::Value::String(s) if s.len() <= 32 => format!("{s:?}"),
        plist::Value::String(_) => "a long string".into(),
        _ => "a value of another type".into(),
    }
}

impl HardwareModel {
    /// Decodes a hardware-model plist (binary or XML). `what` names the
    /// source in error messages.
    pub fn decode(data: &[u8], what: &str) -> Result<HardwareModel, HardwareModelError> {
        let what = what.to_string();
        if data.len() > MAX_HARDWARE_MODEL {
            return Err(HardwareModelError::TooLarge { what });
        }
        let value =
            crate::identity::parse_plist(data).map_err(|e| HardwareModelError::NotPlist {
                what: what.clone(),
                reason: e.to_string(),
            })?;
        let plist::Value::Dictionary(mut dict) = value else {
            return Err(HardwareModelError::NotDictionary { what });
        };
        let mut take = |key: &'static str| {
            dict.remove(key).ok_or_else(|| HardwareModelError::Missing {
                what: what.clone(),
                key,
            })
        };
        let version = take(VERSION_KEY)?;
        let platform = take(PLATFORM_KEY)?;
        let min_os = take(MIN_OS_KEY)?;
        let representation = match unsigned(&version) {
            Some(1) => Representation::V1,
            Some(2) => Representation::V2,
            _ => {
                return Err(HardwareModelError::UnknownVersion {
                    what,
                    version: describe(&version),
                })
            }
        };
        let platform_version = unsigned(&platform).ok_or_else(|| HardwareModelError::BadValue {
            what: what.clone(),
            key: PLATFORM_KEY,
            found: describe(&platform),
            expected: "an unsigned integer",
        })?;
        let minimum_os = match &min_os {
            plist::Value::Array(a) if a.len() == 3 => {
                let parts: Vec<u64> = a.iter().filter_map(unsigned).collect();
                <[u64; 3]>::try_from(parts).ok()
            }
            _ => None,
        }
        .ok_or_else(|| HardwareModelError::BadValue {
            what: what.clone(),
            key: MIN_OS_KEY,
            found: describe(&min_os),
            expected: "[major, minor, patch] as unsigned integers",
        })?;
        Ok(HardwareModel {
            representation,
            platform_version,
            minimum_os,
            other: dict,
            raw: data.to_vec(),
        })
    }

    /// The plist exactly as it was decoded.
    pub fn raw(&self) -> &[u8] {
        &self.raw
    }
}

impl std::fmt::Display for HardwareModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [major, minor, patch] = self.minimum_os;
        write!(
            f,
            "DataRepresentationVersion {}, PlatformVersion {}, MinimumSupportedOS {major}.{minor}.{patch}",
            self.representation as u8, self.platform_version
        )?;
        for (i, key) in self.other.keys().take(8).enumerate() {
            let sep = if i == 0 { ", other keys: " } else { " " };
            // A hostile key must not flood the terminal.
            let key: String = key.chars().take(40).collect();
            write!(f, "{sep}{key:?}")?;
        }
        if self.other.len() > 8 {
            write!(f, " (and {} more)", self.other.len() - 8)?;
        }
        Ok(())
    }
}

/// Reads at most `limit` bytes of `path`; `None` if there is no such file.
fn read_at_most(path: &Path, limit: usize) -> Result<Option<Vec<u8>>, HardwareModelError> {
    let io = |source| HardwareModelError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(e)),
    };
    let mut data = Vec::new();
    file.take(limit as u64 + 1)
        .read_to_end(&mut data)
        .map_err(io)?;
    if data.len() > limit {
        return Err(HardwareModelError::TooLarge {
            what: path.display().to_string(),
        });
    }
    Ok(Some(data))
}

/// The hardware model in the plist file `path` (a bundle's
/// `HardwareModel`), or `None` if there is no such file.
pub fn from_file(path: &Path) -> Result<Option<HardwareModel>, HardwareModelError> {
    read_at_most(path, MAX_HARDWARE_MODEL)?
        .map(|data| HardwareModel::decode(&data, &path.display().to_string()))
        .transpose()
}

/// The hardware model of a JSON VM description (Tart config.json, macosvm
/// JSON): its base64 `hardwareModel`, or `None` if it has none.
pub fn from_json(
    json: &serde_json::Map<String, serde_json::Value>,
    what: &str,
) -> Result<Option<HardwareModel>, HardwareModelError> {
    let Some(value) = json.get("hardwareModel") else {
        return Ok(None);
    };
    let data = value
        .as_str()
        .and_then(|t| crate::identity::decode_base64(t).ok())
        .ok_or_else(|| HardwareModelError::NotBase64 {
            what: what.to_string(),
        })?;
    HardwareModel::decode(&data, &format!("{what}: hardwareModel")).map(Some)
}

/// The hardware model behind `path`, for the same sources as
/// [`crate::identity::ecid_from_path`]: a directory with a `HardwareModel`
/// file (Virtualization.framework or vmapple bundle) or a Tart
/// `config.json`, or a Tart/macosvm JSON file. `None` where the source
/// has none (a bare machine-identifier plist, a bundle made by `create`).
pub fn from_path(path: &Path) -> Result<Option<HardwareModel>, HardwareModelError> {
    if path.is_dir() {
        if let Some(model) = from_file(&path.join(HARDWARE_MODEL_FILE))? {
            return Ok(Some(model));
        }
        let tart = path.join("config.json");
        return if tart.is_file() {
            from_path(&tart)
        } else {
            Ok(None)
        };
    }
    let Some(data) = read_at_most(path, crate::identity::MAX_IDENTITY_FILE as usize)? else {
        return Ok(None);
    };
    match serde_json::from_slice::<serde_json::Value>(&data) {
        Ok(serde_json::Value::Object(json)) => from_json(&json, &path.display().to_string()),
        _ => Ok(None),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A hardware model built the way VZ's observed ones are laid out.
    pub(crate) fn model_plist(version: u64, platform: u64, min: [u64; 3], binary: bool) -> Vec<u8> {
        let mut d = plist::Dictionary::new();
        d.insert(VERSION_KEY.into(), plist::Value::Integer(version.into()));
        d.insert(PLATFORM_KEY.into(), plist::Value::Integer(platform.into()));
        d.insert(
            MIN_OS_KEY.into(),
            plist::Value::Array(
                min.iter()
                    .map(|&n| plist::Value::Integer(n.into()))
                    .collect(),
            ),
        );
        encode(d, binary)
    }

    fn encode(d: plist::Dictionary, binary: bool) -> Vec<u8> {
        let mut out = Vec::new();
        let v = plist::Value::Dictionary(d);
        if binary {
            v.to_writer_binary(&mut out).unwrap();
        } else {
            v.to_writer_xml(&mut out).unwrap();
        }
        out
    }

    #[test]
    fn both_representations_decode_from_binary_and_xml() {
        for (version, rep) in [(1, Representation::V1), (2, Representation::V2)] {
            for binary in [true, false] {
                let data = model_plist(version, 2, [13, 0, 0], binary);
                let m = HardwareModel::decode(&data, "test").unwrap();
                assert_eq!(m.representation, rep);
                assert_eq!(m.platform_version, 2);
                assert_eq!(m.minimum_os, [13, 0, 0]);
                assert!(m.other.is_empty());
                assert_eq!(m.raw(), &data[..], "kept byte for byte");
                assert_eq!(
                    m.to_string(),
                    format!(
                        "DataRepresentationVersion {version}, PlatformVersion 2, MinimumSupportedOS 13.0.0"
                    )
                );
            }
        }
    }

    #[test]
    fn unknown_keys_are_kept_and_shown() {
        let mut d = plist::Dictionary::new();
        d.insert(VERSION_KEY.into(), plist::Value::Integer(2.into()));
        d.insert(PLATFORM_KEY.into(), plist::Value::Integer(2.into()));
        d.insert(
            MIN_OS_KEY.into(),
            plist::Value::Array(vec![
                plist::Value::Integer(26.into()),
                plist::Value::Integer(1.into()),
                plist::Value::Integer(0.into()),
            ]),
        );
        d.insert("ISA".into(), plist::Value::Integer(2.into()));
        let m = HardwareModel::decode(&encode(d, true), "test").unwrap();
        assert_eq!(m.other.get("ISA").and_then(unsigned), Some(2));
        assert!(m
            .to_string()
            .ends_with("MinimumSupportedOS 26.1.0, other keys: \"ISA\""));
    }

    fn error_of(data: &[u8]) -> String {
        HardwareModel::decode(data, "src").unwrap_err().to_string()
    }

    #[test]
    fn errors_name_the_problem() {
        assert!(error_of(b"{\"not\": \"a plist\"}").starts_with("src is not a property list"));
        assert!(error_of(b"bplist00").starts_with("src is not a property list"));
        assert_eq!(
            error_of(&model_plist(3, 2, [13, 0, 0], true)),
            "src: DataRepresentationVersion 3 is unknown (vmapple knows 1 and 2)"
        );
        assert_eq!(
            error_of(&model_plist(0, 2, [13, 0, 0], false)),
            "src: DataRepresentationVersion 0 is unknown (vmapple knows 1 and 2)"
        );
        let mut d = plist::Dictionary::new();
        d.insert(VERSION_KEY.into(), plist::Value::Integer(1.into()));
        assert_eq!(
            error_of(&encode(d.clone(), true)),
            "src has no PlatformVersion key"
        );
        d.insert(PLATFORM_KEY.into(), plist::Value::String("2".into()));
        d.insert(MIN_OS_KEY.into(), plist::Value::Array(vec![]));
        assert_eq!(
            error_of(&encode(d.clone(), true)),
            "src: PlatformVersion is \"2\", expected an unsigned integer"
        );
        d.insert(PLATFORM_KEY.into(), plist::Value::Integer((-1).into()));
        assert!(error_of(&encode(d.clone(), true)).contains("PlatformVersion is -1"));
        d.insert(PLATFORM_KEY.into(), plist::Value::Integer(2.into()));
        assert_eq!(
            error_of(&encode(d.clone(), true)),
            "src: MinimumSupportedOS is an array of 0, expected [major, minor, patch] as unsigned integers"
        );
        d.insert(
            MIN_OS_KEY.into(),
            plist::Value::Array(vec![
                plist::Value::Integer(13.into()),
                plist::Value::String("0".into()),
                plist::Value::Integer(0.into()),
            ]),
        );
        assert!(error_of(&encode(d, true)).contains("MinimumSupportedOS is an array of 3"));
        let list = plist::Value::Array(vec![plist::Value::Integer(1.into())]);
        let mut out = Vec::new();
        list.to_writer_binary(&mut out).unwrap();
        assert_eq!(error_of(&out), "src is not a dictionary");
    }

    #[test]
    fn oversized_input_is_refused_before_parsing() {
        let mut data = model_plist(1, 2, [13, 0, 0], false);
        data.resize(MAX_HARDWARE_MODEL + 1, b' ');
        assert!(error_of(&data).contains("larger than"));
    }

    #[test]
    fn hostile_key_names_are_bounded_in_display() {
        let mut d = plist::Dictionary::new();
        d.insert(VERSION_KEY.into(), plist::Value::Integer(1.into()));
        d.insert(PLATFORM_KEY.into(), plist::Value::Integer(2.into()));
        d.insert(
            MIN_OS_KEY.into(),
            plist::Value::Array(vec![plist::Value::Integer(12.into()); 3]),
        );
        for i in 0..20 {
            d.insert(format!("{i:0>200}"), plist::Value::Boolean(true));
        }
        let shown = HardwareModel::decode(&encode(d, true), "t")
            .unwrap()
            .to_string();
        assert!(shown.len() < 600, "{} bytes", shown.len());
        assert!(shown.ends_with("(and 12 more)"));
    }

    /// A binary plist of `levels` arrays, each holding `refs` references to
    /// the next one: tiny, but `refs^levels` values once expanded.
    pub(crate) fn shared_reference_bomb(levels: usize, refs: usize) -> Vec<u8> {
        let mut p = b"bplist00".to_vec();
        let mut offsets = Vec::new();
        for i in 0..levels {
            offsets.push(p.len());
            if i + 1 < levels {
                p.extend_from_slice(&[0xaf, 0x11]); // array, count in a 2-byte int
                p.extend_from_slice(&(refs as u16).to_be_bytes());
                for _ in 0..refs {
                    p.extend_from_slice(&((i + 1) as u16).to_be_bytes());
                }
            } else {
                p.push(0xa0); // empty array
            }
        }
        binary_trailer(p, &offsets)
    }

    /// Appends the offset table (2-byte offsets and refs) and trailer.
    fn binary_trailer(mut p: Vec<u8>, offsets: &[usize]) -> Vec<u8> {
        let table = p.len();
        for &o in offsets {
            p.extend_from_slice(&(o as u16).to_be_bytes());
        }
        p.extend_from_slice(&[0; 6]);
        p.extend_from_slice(&[2, 2]);
        p.extend_from_slice(&(offsets.len() as u64).to_be_bytes());
        p.extend_from_slice(&0u64.to_be_bytes());
        p.extend_from_slice(&(table as u64).to_be_bytes());
        p
    }

    #[test]
    fn shared_references_cannot_expand_without_bound() {
        // 30^7 values if expanded; refused after a bounded amount of work.
        let bomb = shared_reference_bomb(8, 30);
        assert!(bomb.len() < 600);
        let e = error_of(&bomb);
        assert!(e.contains("too many objects for its size"), "{e}");
        // A few shared references are fine (and not a hardware model).
        assert_eq!(
            error_of(&shared_reference_bomb(3, 30)),
            "src is not a dictionary"
        );
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let depth = (MAX_HARDWARE_MODEL - 100) / 15;
        let xml = format!(
            "<?xml version=\"1.0\"?><plist version=\"1.0\">{}{}</plist>",
            "<array>".repeat(depth),
            "</array>".repeat(depth)
        );
        assert!(xml.len() <= MAX_HARDWARE_MODEL);
        assert_eq!(error_of(xml.as_bytes()), "src is not a dictionary");
        // Binary: each array holds the next, up to the size bound.
        let mut p = b"bplist00".to_vec();
        let mut offsets = Vec::new();
        for i in 1..=12_000u16 {
            offsets.push(p.len());
            p.push(0xa1);
            p.extend_from_slice(&i.to_be_bytes());
        }
        offsets.push(p.len());
        p.push(0xa0);
        let p = binary_trailer(p, &offsets);
        assert!(p.len() <= MAX_HARDWARE_MODEL);
        assert_eq!(error_of(&p), "src is not a dictionary");
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = HardwareModel::decode(&data, "fuzz");
        }

        #[test]
        fn mutated_models_never_panic(
            binary in any::<bool>(),
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        ) {
            let mut data = model_plist(2, 2, [26, 0, 0], binary);
            for (at, byte) in flips {
                let i = at % data.len();
                data[i] = byte;
            }
            let _ = HardwareModel::decode(&data, "fuzz");
        }
    }
}
