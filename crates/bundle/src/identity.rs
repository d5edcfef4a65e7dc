//! Machine identity: the ECID a macOS guest was installed for.
//!
//! A macOS guest only boots on the machine identifier it was installed
//! with (vmapple-machine.md §6.4, §16.3). Virtualization.framework
//! serialises a `VZMacMachineIdentifier` as a property list (binary in
//! practice, XML accepted too) whose integer key `ECID` is the value the
//! vmapple machine's `uuid` property takes and which lands in the
//! configuration region's `ecid` field.
//!
//! Where that plist is found:
//! * as a file of its own (a Virtualization.framework bundle's
//!   `MachineIdentifier`, or a vmapple bundle's);
//! * base64-encoded under the top-level key `machineId` of a macosvm JSON
//!   file (this is what QEMU's `contrib/vmapple/uuid.sh` decodes);
//! * base64-encoded under the key `ecid` of a Tart `config.json`
//!   (cirruslabs/tart `Sources/tart/Platform/Darwin.swift` stores
//!   `ecid.dataRepresentation.base64EncodedString()` there).

use std::fs;
use std::io::{Cursor, Read};
use std::path::{Path, PathBuf};

use base64::Engine;

/// Name of the machine-identifier plist inside a Virtualization.framework
/// bundle and inside a vmapple bundle.
pub const MACHINE_IDENTIFIER_FILE: &str = "MachineIdentifier";

/// The plist key holding the ECID.
pub const ECID_KEY: &str = "ECID";

/// Largest identity source read into memory. Real machine identifiers are
/// about 50 bytes and JSON configurations a few KiB; anything larger is not
/// one of them.
pub const MAX_IDENTITY_FILE: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: larger than {MAX_IDENTITY_FILE} bytes, not a machine identifier or VM configuration", path.display())]
    TooLarge { path: PathBuf },
    #[error("{what} is not a property list: {reason}")]
    NotPlist { what: String, reason: String },
    #[error("{what} is not a dictionary")]
    NotDictionary { what: String },
    #[error("{what} has no ECID key")]
    NoEcidKey { what: String },
    #[error("{what}: ECID is not an unsigned 64-bit integer")]
    EcidNotInteger { what: String },
    #[error("{what}: {key} is not base64: {reason}")]
    NotBase64 {
        what: String,
        key: &'static str,
        reason: String,
    },
    #[error("{what}: {key} is not a string")]
    NotString { what: String, key: &'static str },
    #[error("{what} is not valid JSON: {reason}")]
    BadJson { what: String, reason: String },
    #[error("{what} has neither `machineId` (macosvm) nor `ecid` (Tart)")]
    NoIdentityInJson { what: String },
    #[error("{}: no {MACHINE_IDENTIFIER_FILE}, config.json (Tart) or config.toml (vmapple) in this directory", path.display())]
    NoIdentityInDir { path: PathBuf },
    #[error("{}: not a machine identifier plist, macosvm JSON or Tart config.json", path.display())]
    UnknownFormat { path: PathBuf },
    #[error("{}: {reason}", path.display())]
    BundleConfig { path: PathBuf, reason: String },
}

/// A reader that fails once `left` bytes have been read from it.
struct Budget<'a> {
    inner: Cursor<&'a [u8]>,
    left: u64,
}

impl Read for Budget<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            return Err(std::io::Error::other(
                "too many objects for its size (shared references expand without bound)",
            ));
        }
        let len = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..len])?;
        self.left -= n as u64;
        Ok(n)
    }
}

impl std::io::Seek for Budget<'_> {
    fn seek(&mut self, pos: std::io::SeekFrom) -> std::io::Result<u64> {
        self.inner.seek(pos)
    }
}

/// Parses a property list (binary or XML) with work bounded by its size.
/// A binary plist's objects may be referenced many times, and the `plist`
/// crate expands each reference anew, so a few hundred bytes of nested
/// shared arrays would make billions of values; each expanded object is
/// read again from the input, so capping the bytes read caps the values
/// made.
pub(crate) fn parse_plist(data: &[u8]) -> Result<plist::Value, plist::Error> {
    let budget = (data.len() as u64)
        .saturating_mul(64)
        .saturating_add(64 << 10);
    plist::Value::from_reader(Budget {
        inner: Cursor::new(data),
        left: budget,
    })
}

/// Extracts the ECID from a serialised `VZMacMachineIdentifier` (binary or
/// XML plist). `what` names the source in error messages.
pub fn ecid_from_plist(data: &[u8], what: &str) -> Result<u64, IdentityError> {
    let value = parse_plist(data).map_err(|e| IdentityError::NotPlist {
        what: what.to_string(),
        reason: e.to_string(),
    })?;
    let dict = value
        .as_dictionary()
        .ok_or_else(|| IdentityError::NotDictionary {
            what: what.to_string(),
        })?;
    let ecid = dict.get(ECID_KEY).ok_or_else(|| IdentityError::NoEcidKey {
        what: what.to_string(),
    })?;
    match ecid {
        plist::Value::Integer(i) => i.as_unsigned(),
        _ => None,
    }
    .ok_or_else(|| IdentityError::EcidNotInteger {
        what: what.to_string(),
    })
}

/// A binary-plist `VZMacMachineIdentifier` data representation carrying
/// `ecid`, as Virtualization.framework (and macosvm's aux-file fallback)
/// writes it: a one-entry dictionary `{ECID: <integer>}`.
pub fn machine_identifier_plist(ecid: u64) -> Vec<u8> {
    let mut dict = plist::Dictionary::new();
    dict.insert(ECID_KEY.to_string(), plist::Value::Integer(ecid.into()));
    let mut out = Vec::new();
    plist::Value::Dictionary(dict)
        .to_writer_binary(&mut out)
        .expect("serialising a one-integer plist into memory cannot fail");
    out
}

/// Decodes the base64 string under `key` of a JSON object and reads the
/// ECID from the plist inside.
fn ecid_from_base64_field(
    json: &serde_json::Map<String, serde_json::Value>,
    key: &'static str,
    what: &str,
) -> Result<u64, IdentityError> {
    let text = json
        .get(key)
        .and_then(|v| v.as_str())
        .ok_or_else(|| IdentityError::NotString {
            what: what.to_string(),
            key,
        })?;
    let plist = decode_base64(text).map_err(|e| IdentityError::NotBase64 {
        what: what.to_string(),
        key,
        reason: e.to_string(),
    })?;
    ecid_from_plist(&plist, &format!("{what}: {key}"))
}

/// Apple's `Data(base64Encoded:)` and coreutils' `base64 -d` both take
/// padded standard base64; whitespace (line-wrapped output pasted into a
/// file) is tolerated.
pub(crate) fn decode_base64(text: &str) -> Result<Vec<u8>, base64::DecodeError> {
    let compact: String = text.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    base64::engine::general_purpose::STANDARD.decode(compact)
}

/// Standard padded base64, as Tart and macosvm write `ecid`/`machineId`.
pub fn encode_base64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// The ECID of a macosvm JSON configuration (its `machineId`), exactly what
/// `contrib/vmapple/uuid.sh` prints.
pub fn ecid_from_macosvm_json(text: &[u8], what: &str) -> Result<u64, IdentityError> {
    let obj = json_object(text, what)?;
    ecid_from_base64_field(&obj, "machineId", what)
}

/// The ECID of a Tart `config.json` (its `ecid`).
pub fn ecid_from_tart_config(text: &[u8], what: &str) -> Result<u64, IdentityError> {
    let obj = json_object(text, what)?;
    ecid_from_base64_field(&obj, "ecid", what)
}

fn json_object(
    text: &[u8],
    what: &str,
) -> Result<serde_json::Map<String, serde_json::Value>, IdentityError> {
    match serde_json::from_slice::<serde_json::Value>(text) {
        Ok(serde_json::Value::Object(map)) => Ok(map),
        Ok(_) => Err(IdentityError::BadJson {
            what: what.to_string(),
            reason: "top level is not an object".into(),
        }),
        Err(e) => Err(IdentityError::BadJson {
            what: what.to_string(),
            reason: e.to_string(),
        }),
    }
}

/// Reads a whole file, refusing anything larger than
/// [`MAX_IDENTITY_FILE`] so a wrong path (a disk image) is not slurped.
pub(crate) fn read_bounded(path: &Path) -> Result<Vec<u8>, IdentityError> {
    let io = |source| IdentityError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = fs::File::open(path).map_err(io)?;
    let mut data = Vec::new();
    file.take(MAX_IDENTITY_FILE + 1)
        .read_to_end(&mut data)
        .map_err(io)?;
    if data.len() as u64 > MAX_IDENTITY_FILE {
        return Err(IdentityError::TooLarge {
            path: path.to_path_buf(),
        });
    }
    Ok(data)
}

fn looks_like_plist(data: &[u8]) -> bool {
    let head = data.trim_ascii_start();
    head.starts_with(b"bplist") || head.starts_with(b"<?xml") || head.starts_with(b"<plist")
}

/// The ECID behind `path`, whichever of these it is:
/// * a machine-identifier plist file (binary or XML);
/// * a macosvm JSON file (`machineId`);
/// * a Tart `config.json` (`ecid`);
/// * a directory holding a `MachineIdentifier` file (Virtualization.framework
///   or vmapple bundle), a Tart `config.json`, or a vmapple `config.toml`
///   with an `ecid` field.
pub fn ecid_from_path(path: &Path) -> Result<u64, IdentityError> {
    let meta = fs::metadata(path).map_err(|source| IdentityError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if meta.is_dir() {
        let ident = path.join(MACHINE_IDENTIFIER_FILE);
        if ident.is_file() {
            return ecid_from_path(&ident);
        }
        let tart = path.join("config.json");
        if tart.is_file() {
            return ecid_from_path(&tart);
        }
        let toml = path.join(crate::bundle::CONFIG_FILE);
        if toml.is_file() {
            let config =
                crate::config::VmConfig::load(&toml).map_err(|e| IdentityError::BundleConfig {
                    path: toml.clone(),
                    reason: e.to_string(),
                })?;
            return config
                .ecid
                .map(|e| e.0)
                .ok_or_else(|| IdentityError::NoEcidKey {
                    what: toml.display().to_string(),
                });
        }
        return Err(IdentityError::NoIdentityInDir {
            path: path.to_path_buf(),
        });
    }
    let data = read_bounded(path)?;
    let what = path.display().to_string();
    if looks_like_plist(&data) {
        return ecid_from_plist(&data, &what);
    }
    if data.trim_ascii_start().starts_with(b"{") {
        let obj = json_object(&data, &what)?;
        if obj.contains_key("machineId") {
            return ecid_from_base64_field(&obj, "machineId", &what);
        }
        if obj.contains_key("ecid") {
            return ecid_from_base64_field(&obj, "ecid", &what);
        }
        return Err(IdentityError::NoIdentityInJson { what });
    }
    Err(IdentityError::UnknownFormat {
        path: path.to_path_buf(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// §20.7: the ECID of the uuid.sh test vector.
    const ECID: u64 = 1234567890123456789;

    fn xml_plist(body: &str) -> Vec<u8> {
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
             <!DOCTYPE plist PUBLIC \"-//Apple//DTD PLIST 1.0//EN\" \
             \"http://www.apple.com/DTDs/PropertyList-1.0.dtd\">\n\
             <plist version=\"1.0\">\n{body}\n</plist>\n"
        )
        .into_bytes()
    }

    #[test]
    fn binary_plist_round_trips() {
        let plist = machine_identifier_plist(ECID);
        // Same shape as the sample machineId in macosvm's README, whose
        // visible prefix `YnBsaXN0MDDRAQJURUN` is `bplist00 d1 01 02 54 'E'
        // 'C'...`: a one-entry dictionary with a four-letter ASCII key.
        let readme = decode_base64("YnBsaXN0MDDRAQJU").unwrap();
        assert!(plist.starts_with(&readme), "{plist:02x?}");
        assert_eq!(&plist[readme.len()..readme.len() + 4], b"ECID");
        assert_eq!(ecid_from_plist(&plist, "test").unwrap(), ECID);
        // The cfg region stores it little-endian (§20.7).
        assert_eq!(
            ECID.to_le_bytes(),
            [0x15, 0x81, 0xe9, 0x7d, 0xf4, 0x10, 0x22, 0x11]
        );
    }

    #[test]
    fn full_u64_range_round_trips() {
        for ecid in [0, 1, i64::MAX as u64, 1 << 63, u64::MAX] {
            let plist = machine_identifier_plist(ecid);
            assert_eq!(ecid_from_plist(&plist, "t").unwrap(), ecid);
        }
    }

    #[test]
    fn xml_plist_is_accepted() {
        let xml = xml_plist(&format!(
            "<dict><key>ECID</key><integer>{ECID}</integer></dict>"
        ));
        assert_eq!(ecid_from_plist(&xml, "t").unwrap(), ECID);
    }

    #[test]
    fn a_shared_reference_bomb_is_refused_not_expanded() {
        let bomb = crate::hardware_model::tests::shared_reference_bomb(8, 30);
        let e = ecid_from_plist(&bomb, "bomb").unwrap_err().to_string();
        assert!(e.contains("too many objects for its size"), "{e}");
    }

    #[test]
    fn plist_errors_name_the_problem() {
        let no_key = xml_plist("<dict><key>Other</key><integer>1</integer></dict>");
        let e = ecid_from_plist(&no_key, "id.plist")
            .unwrap_err()
            .to_string();
        assert_eq!(e, "id.plist has no ECID key");

        let string = xml_plist("<dict><key>ECID</key><string>12</string></dict>");
        let e = ecid_from_plist(&string, "x").unwrap_err().to_string();
        assert!(e.contains("not an unsigned 64-bit integer"), "{e}");

        let negative = xml_plist("<dict><key>ECID</key><integer>-5</integer></dict>");
        assert!(ecid_from_plist(&negative, "x").is_err());

        let array = xml_plist("<array/>");
        let e = ecid_from_plist(&array, "x").unwrap_err().to_string();
        assert!(e.contains("not a dictionary"), "{e}");

        let e = ecid_from_plist(b"garbage", "x").unwrap_err().to_string();
        assert!(e.contains("not a property list"), "{e}");
    }

    #[test]
    fn macosvm_json_like_uuid_sh() {
        let json = format!(
            "{{\"cpus\":2,\"machineId\":\"{}\"}}",
            encode_base64(&machine_identifier_plist(ECID))
        );
        assert_eq!(
            ecid_from_macosvm_json(json.as_bytes(), "vm.json").unwrap(),
            ECID
        );

        let e = ecid_from_macosvm_json(br#"{"machineId":"@@@"}"#, "vm.json")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("vm.json: machineId is not base64"), "{e}");

        let e = ecid_from_macosvm_json(br#"{"machineId":5}"#, "vm.json")
            .unwrap_err()
            .to_string();
        assert_eq!(e, "vm.json: machineId is not a string");

        // base64 of something that is not a plist
        let e = ecid_from_macosvm_json(br#"{"machineId":"aGVsbG8="}"#, "vm.json")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("vm.json: machineId is not a property list"),
            "{e}"
        );
    }

    #[test]
    fn tart_config() {
        let json = format!(
            "{{\"version\":1,\"ecid\":\"{}\"}}",
            encode_base64(&machine_identifier_plist(ECID))
        );
        assert_eq!(ecid_from_tart_config(json.as_bytes(), "c").unwrap(), ECID);
    }

    #[test]
    fn path_dispatch() {
        let dir = tempfile::tempdir().unwrap();
        let b64 = encode_base64(&machine_identifier_plist(ECID));

        let plist = dir.path().join("id.plist");
        fs::write(&plist, machine_identifier_plist(ECID)).unwrap();
        assert_eq!(ecid_from_path(&plist).unwrap(), ECID);

        let xml = dir.path().join("id.xml");
        fs::write(
            &xml,
            xml_plist("<dict><key>ECID</key><integer>42</integer></dict>"),
        )
        .unwrap();
        assert_eq!(ecid_from_path(&xml).unwrap(), 42);

        let macosvm = dir.path().join("macosvm.json");
        fs::write(&macosvm, format!("{{\"machineId\":\"{b64}\"}}")).unwrap();
        assert_eq!(ecid_from_path(&macosvm).unwrap(), ECID);

        let tart = dir.path().join("tartvm");
        fs::create_dir(&tart).unwrap();
        fs::write(tart.join("config.json"), format!("{{\"ecid\":\"{b64}\"}}")).unwrap();
        assert_eq!(ecid_from_path(&tart).unwrap(), ECID);
        assert_eq!(ecid_from_path(&tart.join("config.json")).unwrap(), ECID);

        let vz = dir.path().join("VM.bundle");
        fs::create_dir(&vz).unwrap();
        fs::write(vz.join("MachineIdentifier"), machine_identifier_plist(7)).unwrap();
        assert_eq!(ecid_from_path(&vz).unwrap(), 7);

        let other = dir.path().join("other.json");
        fs::write(&other, "{\"cpus\":1}").unwrap();
        let e = ecid_from_path(&other).unwrap_err().to_string();
        assert!(e.contains("neither `machineId`"), "{e}");

        let empty = dir.path().join("empty");
        fs::create_dir(&empty).unwrap();
        assert!(matches!(
            ecid_from_path(&empty),
            Err(IdentityError::NoIdentityInDir { .. })
        ));

        let text = dir.path().join("notes.txt");
        fs::write(&text, "hello").unwrap();
        assert!(matches!(
            ecid_from_path(&text),
            Err(IdentityError::UnknownFormat { .. })
        ));

        assert!(matches!(
            ecid_from_path(&dir.path().join("missing")),
            Err(IdentityError::Io { .. })
        ));
    }

    #[test]
    fn huge_file_is_refused_without_reading_it_all() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("disk.img");
        let f = fs::File::create(&big).unwrap();
        f.set_len(64 << 20).unwrap();
        assert!(matches!(
            ecid_from_path(&big),
            Err(IdentityError::TooLarge { .. })
        ));
    }
}
