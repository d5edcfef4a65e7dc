//! The vmapple configuration region (`vmapple-cfg`), vmapple-machine.md §8.
//!
//! The boot ROM learns the VM's shape (CPU count, RAM size, ECID, serial
//! number, MAC addresses…) from a fixed structure at the start of a 64 KiB
//! window at `0x0040_0000`. The window is plain guest RAM with no side
//! effects, so this module is not an [`vm_core::MmioDevice`]: the machine
//! maps the window as RAM, [`CfgParams::build`] computes the structure once
//! (at machine creation, with its validation errors, §8.3) and [`install`]
//! restores it on every reset (§8.4). Guest writes persist until then.
//!
//! # Layout (quirk Q1)
//!
//! QEMU's source comments place the fields after `cpu_ids` 0x180 bytes
//! earlier than where its compiled struct actually puts them, because
//! `cpu_ids` is 128 *32-bit* entries, not 128 bytes. Guests have only ever
//! seen the compiled layout, so the [`off`] constants follow §8.2's
//! "actual offset" column. Whether Apple's Virtualization.framework agrees
//! is unconfirmed.

use vm_core::memory::{range_is_ram, write_all, MemoryError};
use vm_core::GuestRam;

/// Guest physical base of the window (§2).
pub const BASE: u64 = 0x0040_0000;
/// Size of the window; all of it is zeroed on reset.
pub const REGION_SIZE: u64 = 0x1_0000;
/// Size of the structure written at offset 0 (padded to 8 bytes).
pub const STRUCT_SIZE: usize = 0x5A8;

/// Byte offsets of the structure's fields (§8.2, actual layout).
pub mod off {
    pub const VERSION: usize = 0x000;
    pub const NR_CPUS: usize = 0x004;
    pub const UNK1: usize = 0x008;
    pub const UNK2: usize = 0x00C;
    pub const UNK3: usize = 0x010;
    pub const UNK4: usize = 0x014;
    pub const ECID: usize = 0x018;
    pub const RAM_SIZE: usize = 0x020;
    pub const RUN_INSTALLER1: usize = 0x028;
    pub const UNK5: usize = 0x02C;
    pub const UNK6: usize = 0x030;
    pub const RUN_INSTALLER2: usize = 0x034;
    pub const RND: usize = 0x038;
    pub const UNK7: usize = 0x03C;
    pub const MAC_EN0: usize = 0x040;
    pub const MAC_EN1: usize = 0x048;
    pub const MAC_WIFI0: usize = 0x050;
    pub const MAC_BT0: usize = 0x058;
    pub const RESERVED: usize = 0x060;
    pub const CPU_IDS: usize = 0x100;
    pub const SCRATCH: usize = 0x300;
    pub const SERIAL: usize = 0x500;
    pub const UNK8: usize = 0x520;
    pub const MODEL: usize = 0x540;
    pub const UNK9: usize = 0x560;
    pub const UNK10: usize = 0x580;
    pub const SOC_NAME: usize = 0x584;
}

/// Structure format version written at [`off::VERSION`].
pub const VERSION: u32 = 2;
/// Entries of `cpu_ids`, and the most CPUs the structure can describe.
pub const MAX_CPUS: u32 = 128;
/// Size of each string field, terminating NUL included.
pub const STRING_FIELD: usize = 32;
/// Longest string a string field accepts.
pub const MAX_STRING_LEN: usize = STRING_FIELD - 1;
/// The fixed string at [`off::UNK8`]; not a property.
pub const UNK8: &str = "D/A";

pub const DEFAULT_SERIAL: &str = "1234";
pub const DEFAULT_MODEL: &str = "VM0001";
pub const DEFAULT_SOC_NAME: &str = "Apple M1 (Virtual)";

/// Why the structure could not be built (§8.3), or a MAC did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CfgError {
    /// A string property is 32 characters or longer.
    #[error(
        "Provided value too long for property '{name}': length ({len}) exceeds maximum of {MAX_STRING_LEN}"
    )]
    TooLong { name: &'static str, len: usize },
    /// More CPUs than `cpu_ids` has entries.
    #[error("Failed to create {0} CPUs, vmapple machine supports {MAX_CPUS} max")]
    TooManyCpus(u32),
}

/// The `vmapple-cfg` properties (§8.3). [`Default`] gives QEMU's defaults;
/// the machine fills `nr_cpus`, `ecid`, `ram_size` and `rnd` (§6.6).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CfgParams {
    pub nr_cpus: u32,
    pub ecid: u64,
    pub ram_size: u64,
    pub run_installer1: u32,
    pub run_installer2: u32,
    pub rnd: u32,
    pub mac_en0: [u8; 6],
    pub mac_en1: [u8; 6],
    pub mac_wifi0: [u8; 6],
    pub mac_bt0: [u8; 6],
    pub serial: String,
    pub model: String,
    pub soc_name: String,
}

impl Default for CfgParams {
    fn default() -> Self {
        Self {
            nr_cpus: 1,
            ecid: 0,
            ram_size: 0,
            run_installer1: 0,
            run_installer2: 0,
            rnd: 0,
            mac_en0: [0; 6],
            mac_en1: [0; 6],
            mac_wifi0: [0; 6],
            mac_bt0: [0; 6],
            serial: DEFAULT_SERIAL.to_owned(),
            model: DEFAULT_MODEL.to_owned(),
            soc_name: DEFAULT_SOC_NAME.to_owned(),
        }
    }
}

/// The bytes QEMU would copy for `s`: C strings end at the first NUL.
fn c_str_bytes(s: &str) -> &[u8] {
    let bytes = s.as_bytes();
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    &bytes[..end]
}

fn put_u32(buf: &mut [u8], at: usize, v: u32) {
    buf[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(buf: &mut [u8], at: usize, v: u64) {
    buf[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

impl CfgParams {
    /// The structure as it must appear at offset 0 of the window:
    /// [`STRUCT_SIZE`] bytes, little-endian, every unnamed byte zero.
    pub fn build(&self) -> Result<Vec<u8>, CfgError> {
        let strings: [(&'static str, &str, usize); 4] = [
            ("serial", &self.serial, off::SERIAL),
            ("model", &self.model, off::MODEL),
            ("soc_name", &self.soc_name, off::SOC_NAME),
            ("unk8", UNK8, off::UNK8),
        ];
        // Same order as QEMU, so the first offending property is the one named.
        for (name, value, _) in strings {
            let len = c_str_bytes(value).len();
            if len > MAX_STRING_LEN {
                return Err(CfgError::TooLong { name, len });
            }
        }
        if self.nr_cpus > MAX_CPUS {
            return Err(CfgError::TooManyCpus(self.nr_cpus));
        }

        let mut buf = vec![0u8; STRUCT_SIZE];
        put_u32(&mut buf, off::VERSION, VERSION);
        put_u32(&mut buf, off::NR_CPUS, self.nr_cpus);
        put_u32(&mut buf, off::UNK1, 1);
        put_u32(&mut buf, off::UNK2, 1);
        put_u32(&mut buf, off::UNK3, 0x20);
        put_u32(&mut buf, off::UNK4, 0);
        put_u64(&mut buf, off::ECID, self.ecid);
        put_u64(&mut buf, off::RAM_SIZE, self.ram_size);
        put_u32(&mut buf, off::RUN_INSTALLER1, self.run_installer1);
        put_u32(&mut buf, off::UNK5, 1);
        put_u32(&mut buf, off::UNK6, 1);
        put_u32(&mut buf, off::RUN_INSTALLER2, self.run_installer2);
        put_u32(&mut buf, off::RND, self.rnd);
        put_u32(&mut buf, off::UNK7, 0);
        for (at, mac) in [
            (off::MAC_EN0, &self.mac_en0),
            (off::MAC_EN1, &self.mac_en1),
            (off::MAC_WIFI0, &self.mac_wifi0),
            (off::MAC_BT0, &self.mac_bt0),
        ] {
            buf[at..at + 6].copy_from_slice(mac);
        }
        for cpu in 0..self.nr_cpus {
            put_u32(&mut buf, off::CPU_IDS + 4 * cpu as usize, cpu);
        }
        for (_, value, at) in strings {
            let bytes = c_str_bytes(value);
            buf[at..at + bytes.len()].copy_from_slice(bytes);
        }
        put_u32(&mut buf, off::UNK10, 1);
        Ok(buf)
    }
}

/// Reset hold phase (§8.4): zeroes `region_size` bytes of guest memory at
/// `base`, then writes `image` (from [`CfgParams::build`]) at `base`.
///
/// Fails, writing nothing, unless the whole window is RAM and `image` fits
/// in it: that is a machine-assembly bug, not something a guest can cause.
pub fn install(
    mem: &GuestRam,
    base: u64,
    region_size: u64,
    image: &[u8],
) -> Result<(), MemoryError> {
    if image.len() as u64 > region_size || !range_is_ram(mem, base, region_size) {
        return Err(MemoryError::OutOfRange {
            addr: base,
            len: region_size,
        });
    }
    const CHUNK: u64 = 0x1_0000;
    let zeros = vec![0u8; region_size.min(CHUNK) as usize];
    let mut done = 0u64;
    while done < region_size {
        let n = (region_size - done).min(CHUNK);
        write_all(mem, base + done, &zeros[..n as usize])?;
        done += n;
    }
    write_all(mem, base, image)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_core::memory::{create_guest_memory, read_exact};

    /// §20: `-smp 4 -m 4G -M vmapple,uuid=0x1122334455667788`.
    fn vector_params() -> CfgParams {
        CfgParams {
            nr_cpus: 4,
            ecid: 0x1122_3344_5566_7788,
            ram_size: 4 << 30,
            rnd: 0xDEAD_BEEF,
            ..CfgParams::default()
        }
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    fn string_field(b: &[u8], at: usize, text: &str) {
        let mut want = [0u8; STRING_FIELD];
        want[..text.len()].copy_from_slice(text.as_bytes());
        assert_eq!(b[at..at + STRING_FIELD], want, "field at {at:#x}");
    }

    /// Guest memory with the cfg window installed, read back whole.
    fn installed(params: &CfgParams) -> (GuestRam, Vec<u8>) {
        let mem = create_guest_memory(&[(BASE, REGION_SIZE as usize)]).unwrap();
        install(&mem, BASE, REGION_SIZE, &params.build().unwrap()).unwrap();
        let mut back = vec![0u8; REGION_SIZE as usize];
        read_exact(&mem, BASE, &mut back).unwrap();
        (mem, back)
    }

    #[test]
    fn defaults_are_qemus() {
        let p = CfgParams::default();
        assert_eq!(p.nr_cpus, 1);
        assert_eq!((p.ecid, p.ram_size, p.rnd), (0, 0, 0));
        assert_eq!(p.serial, "1234");
        assert_eq!(p.model, "VM0001");
        assert_eq!(p.soc_name, "Apple M1 (Virtual)");
        let b = p.build().unwrap();
        assert_eq!(b.len(), STRUCT_SIZE);
        assert_eq!(u32_at(&b, off::NR_CPUS), 1);
        assert_eq!(u32_at(&b, off::CPU_IDS), 0);
        assert_eq!(u32_at(&b, off::CPU_IDS + 4), 0);
    }

    #[test]
    fn v12_header_words() {
        let (_, b) = installed(&vector_params());
        let words: Vec<u32> = (0..6).map(|i| u32_at(&b, 4 * i)).collect();
        assert_eq!(words, [2, 4, 1, 1, 0x20, 0]);
    }

    #[test]
    fn v13_ecid_little_endian() {
        let (_, b) = installed(&vector_params());
        assert_eq!(u64_at(&b, 0x18), 0x1122_3344_5566_7788);
        assert_eq!(
            b[0x18..0x20],
            [0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11]
        );
    }

    #[test]
    fn v14_ram_size() {
        let (_, b) = installed(&vector_params());
        assert_eq!(u64_at(&b, 0x20), 0x1_0000_0000);
    }

    #[test]
    fn v15_installer_flags_and_rnd() {
        let (_, b) = installed(&vector_params());
        assert_eq!(u32_at(&b, 0x28), 0);
        assert_eq!(u32_at(&b, 0x2C), 1);
        assert_eq!(u32_at(&b, 0x30), 1);
        assert_eq!(u32_at(&b, 0x34), 0);
        assert_eq!(u32_at(&b, 0x38), 0xDEAD_BEEF);
        assert_eq!(u32_at(&b, 0x3C), 0);
        let flags = CfgParams {
            run_installer1: 7,
            run_installer2: 9,
            ..vector_params()
        }
        .build()
        .unwrap();
        assert_eq!((u32_at(&flags, 0x28), u32_at(&flags, 0x34)), (7, 9));
    }

    #[test]
    fn v15_rnd_survives_guest_reset() {
        let params = vector_params();
        let image = params.build().unwrap();
        let (mem, _) = installed(&params);
        write_all(&mem, BASE + 0x38, &[0; 4]).unwrap();
        install(&mem, BASE, REGION_SIZE, &image).unwrap();
        let mut rnd = [0u8; 4];
        read_exact(&mem, BASE + 0x38, &mut rnd).unwrap();
        assert_eq!(u32::from_le_bytes(rnd), 0xDEAD_BEEF);
    }

    #[test]
    fn v16_no_macs_by_default() {
        let (_, b) = installed(&vector_params());
        assert!(b[0x40..0x60].iter().all(|&x| x == 0));
    }

    #[test]
    fn v17_cpu_ids_are_linear_indices() {
        let (_, b) = installed(&vector_params());
        let ids: Vec<u32> = (0..5).map(|i| u32_at(&b, 0x100 + 4 * i)).collect();
        assert_eq!(ids, [0, 1, 2, 3, 0]);
        let full = CfgParams {
            nr_cpus: 128,
            ..vector_params()
        }
        .build()
        .unwrap();
        assert_eq!(u32_at(&full, 0x2FC), 127);
        assert_eq!(u32_at(&full, 0x300), 0, "scratch stays zero");
    }

    #[test]
    fn v18_strings_at_compiled_offsets() {
        let (_, b) = installed(&vector_params());
        string_field(&b, 0x500, "1234");
        string_field(&b, 0x520, "D/A");
        string_field(&b, 0x540, "VM0001");
        assert!(b[0x560..0x580].iter().all(|&x| x == 0), "unk9");
        assert_eq!(u32_at(&b, 0x580), 1);
        string_field(&b, 0x584, "Apple M1 (Virtual)");
        // The offsets QEMU's comments claim are inside `scratch`.
        assert_eq!(b[0x380], 0);
        assert_eq!(b[0x400], 0);
        assert!(b[off::RESERVED..off::CPU_IDS].iter().all(|&x| x == 0));
        assert!(b[off::SCRATCH..off::SERIAL].iter().all(|&x| x == 0));
    }

    #[test]
    fn v19_rest_of_window_is_zero() {
        let (_, b) = installed(&vector_params());
        assert!(b[STRUCT_SIZE..].iter().all(|&x| x == 0));
        assert!(b[0x5A4..0x5A8].iter().all(|&x| x == 0), "tail padding");
    }

    #[test]
    fn v20_reset_wipes_guest_writes() {
        let params = vector_params();
        let (mem, _) = installed(&params);
        write_all(&mem, BASE + 0x1000, &[0xAA]).unwrap();
        write_all(&mem, BASE + 0x500, b"XXXXXXXX").unwrap();
        let mut byte = [0u8];
        read_exact(&mem, BASE + 0x1000, &mut byte).unwrap();
        assert_eq!(byte, [0xAA], "plain RAM until reset");
        install(&mem, BASE, REGION_SIZE, &params.build().unwrap()).unwrap();
        read_exact(&mem, BASE + 0x1000, &mut byte).unwrap();
        assert_eq!(byte, [0]);
        let mut serial = [0u8; STRING_FIELD];
        read_exact(&mem, BASE + 0x500, &mut serial).unwrap();
        string_field(&serial, 0, "1234");
    }

    #[test]
    fn v21_string_length_limit() {
        let ok = "x".repeat(31);
        let long = "y".repeat(32);
        for name in ["serial", "model", "soc_name"] {
            let mut p = vector_params();
            let field = match name {
                "serial" => &mut p.serial,
                "model" => &mut p.model,
                _ => &mut p.soc_name,
            };
            *field = ok.clone();
            let at = match name {
                "serial" => off::SERIAL,
                "model" => off::MODEL,
                _ => off::SOC_NAME,
            };
            let b = p.build().unwrap();
            string_field(&b, at, &ok);
            let field = match name {
                "serial" => &mut p.serial,
                "model" => &mut p.model,
                _ => &mut p.soc_name,
            };
            *field = long.clone();
            let err = p.build().unwrap_err();
            assert_eq!(err, CfgError::TooLong { name, len: 32 });
            assert_eq!(
                err.to_string(),
                format!(
                    "Provided value too long for property '{name}': length (32) exceeds maximum of 31"
                )
            );
        }
    }

    #[test]
    fn v21_first_bad_property_in_qemu_order() {
        let p = CfgParams {
            serial: "s".repeat(40),
            model: "m".repeat(40),
            soc_name: "c".repeat(40),
            ..CfgParams::default()
        };
        assert_eq!(
            p.build().unwrap_err(),
            CfgError::TooLong {
                name: "serial",
                len: 40
            }
        );
    }

    #[test]
    fn too_many_cpus() {
        let p = CfgParams {
            nr_cpus: 129,
            ..CfgParams::default()
        };
        let err = p.build().unwrap_err();
        assert_eq!(
            err.to_string(),
            "Failed to create 129 CPUs, vmapple machine supports 128 max"
        );
    }

    #[test]
    fn v22_mac_en0() {
        let p = CfgParams {
            mac_en0: [0x52, 0x54, 0x00, 0x12, 0x34, 0x56],
            ..vector_params()
        };
        let (_, b) = installed(&p);
        assert_eq!(b[0x40..0x48], [0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 0, 0]);
        assert!(b[0x48..0x60].iter().all(|&x| x == 0));
    }

    #[test]
    fn every_mac_field() {
        let p = CfgParams {
            mac_en0: [1; 6],
            mac_en1: [2; 6],
            mac_wifi0: [3; 6],
            mac_bt0: [4; 6],
            ..CfgParams::default()
        };
        let b = p.build().unwrap();
        for (at, v) in [(0x40, 1), (0x48, 2), (0x50, 3), (0x58, 4)] {
            assert_eq!(b[at..at + 6], [v; 6]);
            assert_eq!(b[at + 6..at + 8], [0, 0]);
        }
    }

    #[test]
    fn install_refuses_a_window_that_is_not_ram() {
        let mem = create_guest_memory(&[(BASE, 0x8000)]).unwrap();
        write_all(&mem, BASE, &[0x55]).unwrap();
        let image = CfgParams::default().build().unwrap();
        assert!(install(&mem, BASE, REGION_SIZE, &image).is_err());
        let mut byte = [0u8];
        read_exact(&mem, BASE, &mut byte).unwrap();
        assert_eq!(byte, [0x55], "nothing written");
        assert!(install(&mem, BASE, 0x100, &image).is_err(), "image too big");
    }
}
