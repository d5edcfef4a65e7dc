//! The snapshot file: a fixed preamble, a CBOR header (machine
//! configuration, vCPU and device sections), then guest memory, sparse.
//!
//! ```text
//! 0   magic "VMAPSNAP"
//! 8   format version (u32, little-endian)
//! 12  CRC-32 of the header bytes (u32)
//! 16  header length (u64)
//! 24  header: CBOR (RFC 8949) of [`Header`]
//! ... each memory region at its `offset` (a multiple of [`RAM_ALIGN`]),
//!     zero pages left as holes
//! ```
//!
//! CBOR is self-describing: fields are named, so a reader sees exactly
//! what is missing or extra rather than misreading bytes. Every section
//! carries its own CRC-32 besides the header's, so a mismatch names the
//! device. Guest memory is not checksummed: restoring maps it lazily, and
//! reading it all to check it would cost what the lazy mapping saves.

use std::io::Read;

use serde::{Deserialize, Serialize};

use super::SnapshotError;

pub const MAGIC: [u8; 8] = *b"VMAPSNAP";
/// Bumped whenever the layout or a section's meaning changes.
pub const FORMAT_VERSION: u32 = 1;
/// Bytes before the header.
pub const PREAMBLE: u64 = 24;
/// Alignment of each memory image in the file, so it can be mapped
/// directly (64 KiB covers 4 KiB and 16 KiB host pages).
pub const RAM_ALIGN: u64 = 64 << 10;
/// A header longer than this is not one (device state is kilobytes).
pub const MAX_HEADER: u64 = 64 << 20;
/// The version of vmapple writing snapshots.
pub const VMAPPLE_VERSION: &str = env!("CARGO_PKG_VERSION");

/// One named, checksummed block of state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Section {
    pub id: String,
    pub crc32: u32,
    #[serde(with = "bytes")]
    pub bytes: Vec<u8>,
}

impl Section {
    pub fn new(id: impl Into<String>, bytes: Vec<u8>) -> Self {
        Self {
            id: id.into(),
            crc32: crc32fast::hash(&bytes),
            bytes,
        }
    }

    fn check(&self) -> Result<(), String> {
        if crc32fast::hash(&self.bytes) == self.crc32 {
            Ok(())
        } else {
            Err(format!("section {} fails its checksum", self.id))
        }
    }
}

/// Byte strings as CBOR byte strings (not arrays of numbers).
mod bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        Ok(ciborium::value::Value::deserialize(d)?
            .into_bytes()
            .unwrap_or_default())
    }
}

/// One guest memory region's image in the file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RamRegion {
    /// Guest physical address.
    pub base: u64,
    pub size: u64,
    /// Where in the file the image starts.
    pub offset: u64,
}

/// What the machine was: the options a restore must repeat. Boot sources
/// are not here (a restored VM does not boot; they are used again only if
/// the guest resets).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedMachine {
    pub cpus: usize,
    pub ram_size: u64,
    /// The device registry's ids, in attach order: the devices the
    /// options gave (USB, disks, NICs, display).
    pub devices: Vec<String>,
    /// The cfg region's description (ECID, serial number, model...).
    pub platform: String,
    /// `--msi on`: the GICv2m frame, message-based SPIs and MSI-X.
    #[serde(default)]
    pub msi: bool,
    /// `--pointer-auth`: the CPU's ID registers offer FEAT_PAuth.
    #[serde(default)]
    pub pointer_auth: bool,
}

impl SavedMachine {
    /// How `self` (this run's) differs from `snapshot`, one phrase per
    /// difference, in the options' terms.
    pub fn differences(&self, snapshot: &SavedMachine) -> Vec<String> {
        let mut out = Vec::new();
        if self.cpus != snapshot.cpus {
            out.push(format!(
                "--cpus: the snapshot has {}, this run {}",
                snapshot.cpus, self.cpus
            ));
        }
        if self.ram_size != snapshot.ram_size {
            out.push(format!(
                "--memory: the snapshot has {} MiB, this run {} MiB",
                snapshot.ram_size >> 20,
                self.ram_size >> 20
            ));
        }
        if self.devices != snapshot.devices {
            let missing: Vec<&str> = snapshot
                .devices
                .iter()
                .filter(|d| !self.devices.contains(d))
                .map(String::as_str)
                .collect();
            let extra: Vec<&str> = self
                .devices
                .iter()
                .filter(|d| !snapshot.devices.contains(d))
                .map(String::as_str)
                .collect();
            out.push(format!(
                "devices: the snapshot has {} that this run lacks, this run has {} that the snapshot lacks (check --no-usb, --disk, --net, --display)",
                list(&missing),
                list(&extra)
            ));
        }
        let on_off = |b: bool| if b { "on" } else { "off" };
        if self.msi != snapshot.msi {
            out.push(format!(
                "--msi: the snapshot has {}, this run {}",
                on_off(snapshot.msi),
                on_off(self.msi)
            ));
        }
        if self.pointer_auth != snapshot.pointer_auth {
            out.push(format!(
                "--pointer-auth: the snapshot has it {}, this run {}",
                on_off(snapshot.pointer_auth),
                on_off(self.pointer_auth)
            ));
        }
        if self.platform != snapshot.platform {
            out.push(
                "platform description (--ecid, --serial-number, --model, --soc-name, --run-installer) differs".into(),
            );
        }
        out
    }
}

fn list(items: &[&str]) -> String {
    if items.is_empty() {
        "nothing".into()
    } else {
        items.join(", ")
    }
}

/// Everything but guest memory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub vmapple_version: String,
    /// The accelerator whose vCPU encoding `cpus` is.
    pub accelerator: String,
    pub machine: SavedMachine,
    /// The guest counter (24 MHz ticks) when the VM was saved.
    pub counter: u64,
    /// PSCI power state of each vCPU.
    pub powers: Vec<accel::CpuPower>,
    pub cpus: Section,
    /// One per registry entry, keyed by its id, in attach order.
    pub devices: Vec<Section>,
    pub ram: Vec<RamRegion>,
    /// The file's length: a shorter file is truncated.
    pub file_len: u64,

    // --- Disks (issue 13 point 4): what a restore checks or puts back.
    /// Each disk's identity and, saved `--with-disks`, its copy.
    #[serde(default)]
    pub disks: Vec<super::disks::SavedDisk>,
}

impl Header {
    /// The preamble and header bytes.
    pub fn encode(&self) -> Result<Vec<u8>, SnapshotError> {
        let mut header = Vec::new();
        ciborium::into_writer(self, &mut header)
            .map_err(|e| SnapshotError::Encode(e.to_string()))?;
        let mut out = Vec::with_capacity(PREAMBLE as usize + header.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&crc32fast::hash(&header).to_le_bytes());
        out.extend_from_slice(&(header.len() as u64).to_le_bytes());
        out.extend_from_slice(&header);
        Ok(out)
    }

    /// Reads and checks the preamble and header of a file of `file_len`
    /// bytes: magic, version, checksums, vmapple version, and that every
    /// memory image lies inside the file. Reads at most the header's
    /// length, which is bounded before anything is allocated.
    pub fn decode(mut from: impl Read, file_len: u64) -> Result<Header, SnapshotError> {
        let mut preamble = [0u8; PREAMBLE as usize];
        if file_len < PREAMBLE {
            return Err(SnapshotError::NotASnapshot);
        }
        from.read_exact(&mut preamble)
            .map_err(|_| SnapshotError::NotASnapshot)?;
        if preamble[..8] != MAGIC {
            return Err(SnapshotError::NotASnapshot);
        }
        let word = |at: usize| u32::from_le_bytes([0, 1, 2, 3].map(|i| preamble[at + i]));
        let version = word(8);
        if version != FORMAT_VERSION {
            return Err(SnapshotError::FormatVersion(version));
        }
        let crc = word(12);
        let len = u64::from_le_bytes([0, 1, 2, 3, 4, 5, 6, 7].map(|i| preamble[16 + i]));
        if len > MAX_HEADER || len > file_len - PREAMBLE {
            return Err(SnapshotError::Truncated {
                len: file_len,
                need: PREAMBLE.saturating_add(len),
            });
        }
        let mut header = vec![0u8; len as usize];
        from.read_exact(&mut header)
            .map_err(|_| SnapshotError::Truncated {
                len: file_len,
                need: PREAMBLE + len,
            })?;
        if crc32fast::hash(&header) != crc {
            return Err(SnapshotError::Corrupt(
                "the header fails its checksum".into(),
            ));
        }
        let header: Header = ciborium::from_reader(header.as_slice())
            .map_err(|e| SnapshotError::Corrupt(format!("unreadable header: {e}")))?;
        if header.vmapple_version != VMAPPLE_VERSION {
            return Err(SnapshotError::VmappleVersion(header.vmapple_version));
        }
        if file_len < header.file_len {
            return Err(SnapshotError::Truncated {
                len: file_len,
                need: header.file_len,
            });
        }
        header.cpus.check().map_err(SnapshotError::Corrupt)?;
        for section in &header.devices {
            section.check().map_err(SnapshotError::Corrupt)?;
        }
        for r in &header.ram {
            let end = r.offset.checked_add(r.size);
            if r.offset % RAM_ALIGN != 0 || end.is_none_or(|end| end > header.file_len) {
                return Err(SnapshotError::Corrupt(format!(
                    "memory image {:#x}+{:#x} at {:#x} lies outside the file",
                    r.base, r.size, r.offset
                )));
            }
        }
        Ok(header)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            vmapple_version: VMAPPLE_VERSION.into(),
            accelerator: "tcg".into(),
            machine: SavedMachine {
                cpus: 2,
                ram_size: 64 << 20,
                devices: vec!["gic".into(), "pl011".into()],
                platform: "p".into(),
                msi: false,
                pointer_auth: false,
            },
            counter: 42,
            powers: vec![accel::CpuPower::On, accel::CpuPower::Off],
            cpus: Section::new("cpus", vec![1, 2, 3]),
            devices: vec![Section::new("gic", vec![9; 100])],
            ram: vec![RamRegion {
                base: 0x7000_0000,
                size: 0x1000,
                offset: RAM_ALIGN,
            }],
            file_len: RAM_ALIGN + 0x1000,
            disks: Vec::new(),
        }
    }

    #[test]
    fn a_header_round_trips() {
        let h = header();
        let bytes = h.encode().unwrap();
        assert_eq!(Header::decode(bytes.as_slice(), h.file_len).unwrap(), h);
    }

    #[test]
    fn every_damaged_byte_of_the_header_is_refused() {
        let h = header();
        let bytes = h.encode().unwrap();
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x40;
            assert!(
                Header::decode(bad.as_slice(), h.file_len).is_err(),
                "flipping byte {i} went unnoticed"
            );
        }
    }

    #[test]
    fn bad_files_get_their_own_errors() {
        let h = header();
        let bytes = h.encode().unwrap();
        let decode = |b: &[u8], len| Header::decode(b, len).unwrap_err();
        assert!(matches!(
            decode(b"not a snapshot at all, no", 25),
            SnapshotError::NotASnapshot
        ));
        assert!(matches!(
            decode(&bytes, h.file_len - 1),
            SnapshotError::Truncated { .. }
        ));
        assert!(matches!(
            decode(&bytes[..bytes.len() - 1], h.file_len),
            SnapshotError::Truncated { .. }
        ));
        let mut other = bytes.clone();
        other[8] = 2;
        assert!(matches!(
            decode(&other, h.file_len),
            SnapshotError::FormatVersion(2)
        ));
        let old = Header {
            vmapple_version: "0.0.1".into(),
            ..h.clone()
        };
        assert!(matches!(
            decode(&old.encode().unwrap(), h.file_len),
            SnapshotError::VmappleVersion(v) if v == "0.0.1"
        ));
        let mut section = h.clone();
        section.devices[0].bytes[3] = 0;
        let e = decode(&section.encode().unwrap(), h.file_len);
        assert!(e.to_string().contains("section gic"), "{e}");
        // A header length far beyond the file is refused before any
        // allocation.
        let mut huge = bytes.clone();
        huge[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            decode(&huge, h.file_len),
            SnapshotError::Truncated { .. }
        ));
    }

    #[test]
    fn differences_name_the_option() {
        let a = header().machine;
        let b = SavedMachine {
            cpus: 1,
            ram_size: 128 << 20,
            devices: vec!["gic".into(), "pl011".into(), "xhci".into()],
            ..a.clone()
        };
        let d = b.differences(&a);
        assert_eq!(d.len(), 3, "{d:?}");
        assert!(d[0].contains("--cpus: the snapshot has 2, this run 1"));
        assert!(d[1].contains("--memory: the snapshot has 64 MiB, this run 128 MiB"));
        assert!(d[2].contains("this run has xhci"));
        assert!(a.differences(&a).is_empty());
        let msi = SavedMachine {
            msi: true,
            ..a.clone()
        };
        assert_eq!(
            msi.differences(&a),
            vec!["--msi: the snapshot has off, this run on".to_string()]
        );
    }
}
