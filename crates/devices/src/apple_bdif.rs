//! The vmapple backdoor block interface (`vmapple-bdif`),
//! vmapple-machine.md §9.
//!
//! The boot ROM reads the aux and root volumes through this 2 MiB window
//! at `0x3000_0000` before any virtio driver exists. Bits 31:16 of the
//! offset pick a device window ([`devid`]), bits 15:0 a register ([`reg`]).
//! Every window reads the same constants (only `NEXT_DEVICE` differs), and
//! a write of a descriptor address to `CMD` in the ROOT or AUX window runs
//! one request synchronously, before the vCPU resumes (§9.5). The device
//! has no state, no interrupt and no reset behaviour.
//!
//! # Decisions on QEMU's quirks
//!
//! * **Q7 — descriptor read failure: reproduced.** When the 48-byte
//!   descriptor is not wholly in RAM, QEMU still writes the failure status
//!   to the `retval.addr` found in the bytes its failed read produced. We
//!   assemble those bytes the same way, RAM bytes as they are and every
//!   other byte (including any past the top of the address space) as 0,
//!   and write status 1 there if that is RAM. One difference remains: a
//!   descriptor byte that lies on an MMIO device reads 0 here, where QEMU
//!   would ask the device; DMA never reaches devices in this VMM
//!   (`vm_core::memory`).
//! * **`NEXT_DEVICE` is the disk's size: differs from QEMU.** The register
//!   QEMU calls NEXT_DEVICE holds the volume's size in 512-byte sectors;
//!   QEMU returns 64 GiB for ROOT and 32 MiB for AUX whatever the image.
//!   AVPBooter reads the backup GPT header at the last sector it is told
//!   of, so with any other root size it reads past the image and panics
//!   (aquarat/experiment-macos-arm64-on-asahi-linux-arm64, docs/NOTES.md,
//!   "BDIF disk size"; their QEMU reports `blk_getlength() / 512`). This
//!   model reads the length of the backing image: whole sectors, a
//!   partial last sector left out.
//! * **Q8 — WRITE always fails: reproduced.** The boot ROM only reads, so
//!   a WRITE request (`data.flags` = `0x0001_0001`) leaves the image
//!   untouched and reports status 1, as any unknown operation does.
//!
//! # Guest-controlled sizes
//!
//! `data.len` may be up to 128 MiB. Before anything is read, the whole
//! destination range must be RAM and the whole source range must lie inside
//! the image, so a request that QEMU would fail without writing guest
//! memory fails here without writing it either; the copy then moves
//! [`CHUNK`] bytes at a time, so a hostile length never costs 128 MiB of
//! host memory. Only a host I/O error in the middle of a transfer can leave
//! part of the buffer written (QEMU would write none of it); the status is
//! 1 in both.
//!
//! A zero-length READ succeeds whenever the sector offset is at most the
//! image size, wherever `data.addr` points: QEMU's block layer accepts a
//! 0-byte read at the end of the image (and refuses one beyond it), and its
//! memory core completes a 0-byte DMA without decoding the address.

use std::sync::Arc;

use block::BlockBackend;
use vm_core::memory::{range_is_ram, read_exact, write_all};
use vm_core::{guest_error, AccessWidth, GuestRam, MmioDevice};

/// Guest physical base of the window (§2).
pub const BASE: u64 = 0x3000_0000;
/// Size of the window.
pub const SIZE: u64 = 0x20_0000;

/// Device windows: `offset & DEVID_MASK`.
pub mod devid {
    pub const MASK: u64 = 0xFFFF_0000;
    pub const ROOT: u64 = 0x0000_0000;
    pub const AUX: u64 = 0x0001_0000;
    /// Named by QEMU, but behaves like any other unused window.
    pub const USB: u64 = 0x0010_0000;
}

/// Registers inside every device window: `offset & 0xFFFF`.
pub mod reg {
    pub const MASK: u64 = 0xFFFF;
    pub const STATUS: u64 = 0x000;
    pub const CFG: u64 = 0x004;
    pub const UNK1: u64 = 0x008;
    pub const BUSY: u64 = 0x010;
    pub const UNK2: u64 = 0x400;
    pub const CMD: u64 = 0x408;
    pub const NEXT_DEVICE: u64 = 0x420;
    pub const UNK3: u64 = 0x434;
}

/// Read values of the constant registers (§9.3).
pub mod value {
    /// `STATUS.ACTIVE`.
    pub const STATUS: u64 = 1 << 0;
    /// `CFG.ACTIVE`.
    pub const CFG: u64 = 1 << 1;
    pub const UNK1: u64 = 0x420;
    /// `BUSY.READY`: requests finish inside the `CMD` write.
    pub const BUSY: u64 = 1 << 0;
    pub const UNK2: u64 = 1;
    pub const UNK3: u64 = 0;
    /// Everything else, truncated to the access width.
    pub const UNDEFINED: u64 = u64::MAX;
}

/// Request descriptor in guest memory (§9.4): three `{addr: u64, len: u32,
/// flags: u32}` triples.
pub mod desc {
    pub const SIZE: usize = 48;
    pub const SECTOR_ADDR: usize = 0x00;
    pub const SECTOR_LEN: usize = 0x08;
    pub const DATA_ADDR: usize = 0x10;
    pub const DATA_LEN: usize = 0x18;
    pub const DATA_FLAGS: usize = 0x1C;
    pub const RETVAL_ADDR: usize = 0x20;
}

/// The sector block that `sector.addr` points at.
pub mod sector_block {
    pub const SIZE: usize = 16;
    /// Offset of the 32-bit sector number.
    pub const SECTOR: usize = 0x8;
}

/// Operation codes in `data.flags`.
pub mod op {
    pub const READ: u32 = 0x0003_0001;
    pub const WRITE: u32 = 0x0001_0001;
}

/// Status byte written to `retval.addr`.
pub mod status {
    pub const SUCCESS: u8 = 0;
    pub const FAILED: u8 = 1;
}

/// Largest `data.len` accepted (inclusive).
pub const MAX_DATA_LEN: u64 = 128 << 20;
/// Bytes moved per step of a transfer.
pub const CHUNK: usize = 1 << 20;
/// Sector size of the byte offset computation.
pub const SECTOR_SIZE: u64 = block::SECTOR_SIZE;

/// The backdoor block interface: one [`MmioDevice`] for the whole window.
pub struct Bdif {
    memory: GuestRam,
    root: Arc<dyn BlockBackend>,
    aux: Arc<dyn BlockBackend>,
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from(le_u32(b, at)) | (u64::from(le_u32(b, at + 4)) << 32)
}

impl Bdif {
    pub fn new(memory: GuestRam, root: Arc<dyn BlockBackend>, aux: Arc<dyn BlockBackend>) -> Self {
        Self { memory, root, aux }
    }

    /// The descriptor as QEMU's failed-or-not read produces it (Q7): RAM
    /// bytes as they are, any other byte 0.
    fn read_descriptor(&self, addr: u64) -> ([u8; desc::SIZE], bool) {
        let mut d = [0u8; desc::SIZE];
        if read_exact(&self.memory, addr, &mut d).is_ok() {
            return (d, true);
        }
        for (i, byte) in d.iter_mut().enumerate() {
            let mut one = [0u8];
            *byte = match addr.checked_add(i as u64) {
                Some(a) if read_exact(&self.memory, a, &mut one).is_ok() => one[0],
                _ => 0,
            };
        }
        (d, false)
    }

    /// Runs the request at `addr` against `disk` and returns
    /// `(retval.addr, status)`.
    fn execute(&self, name: &str, disk: &dyn BlockBackend, addr: u64) -> (u64, u8) {
        let (d, ok) = self.read_descriptor(addr);
        let retval = le_u64(&d, desc::RETVAL_ADDR);
        if !ok {
            guest_error!("bdif {name}: descriptor at {addr:#x} is not wholly in RAM");
            return (retval, status::FAILED);
        }
        let sector_len = le_u32(&d, desc::SECTOR_LEN);
        if sector_len as usize != sector_block::SIZE {
            guest_error!("bdif {name}: sector.len {sector_len} is not 16");
            return (retval, status::FAILED);
        }
        let sector_addr = le_u64(&d, desc::SECTOR_ADDR);
        let mut sb = [0u8; sector_block::SIZE];
        if read_exact(&self.memory, sector_addr, &mut sb).is_err() {
            guest_error!("bdif {name}: sector block at {sector_addr:#x} is not in RAM");
            return (retval, status::FAILED);
        }
        // A u32 sector times 512 fits easily in 64 bits.
        let offset = u64::from(le_u32(&sb, sector_block::SECTOR)) * SECTOR_SIZE;
        let data_addr = le_u64(&d, desc::DATA_ADDR);
        let len = u64::from(le_u32(&d, desc::DATA_LEN));
        if len > MAX_DATA_LEN {
            guest_error!("bdif {name}: data.len {len:#x} exceeds 128 MiB");
            return (retval, status::FAILED);
        }
        let flags = le_u32(&d, desc::DATA_FLAGS);
        let result = match flags {
            op::READ => self.read_disk(name, disk, data_addr, offset, len),
            op::WRITE => {
                tracing::debug!("bdif {name}: WRITE request refused (read-only interface)");
                status::FAILED
            }
            _ => {
                guest_error!("bdif {name}: unknown operation {flags:#x}");
                status::FAILED
            }
        };
        (retval, result)
    }

    fn read_disk(
        &self,
        name: &str,
        disk: &dyn BlockBackend,
        data_addr: u64,
        offset: u64,
        len: u64,
    ) -> u8 {
        let in_disk = block::check_range(disk.len(), offset, len).is_ok();
        tracing::trace!(
            dev = name,
            data_addr,
            offset,
            len,
            ok = in_disk,
            "bdif_vblk_read"
        );
        if !in_disk {
            guest_error!(
                "bdif {name}: read of {len:#x} bytes at disk offset {offset:#x} is past the end of the image"
            );
            return status::FAILED;
        }
        // QEMU's memory core completes a zero-length DMA without looking at
        // the address.
        if len != 0 && !range_is_ram(&self.memory, data_addr, len) {
            guest_error!("bdif {name}: data buffer {data_addr:#x}+{len:#x} is not wholly in RAM");
            return status::FAILED;
        }
        let mut buf = vec![0u8; CHUNK.min(usize::try_from(len).unwrap_or(usize::MAX))];
        let mut done = 0u64;
        while done < len {
            let n = CHUNK.min(usize::try_from(len - done).unwrap_or(usize::MAX));
            let chunk = &mut buf[..n];
            if let Err(e) = disk.read_at(chunk, offset + done) {
                vm_core::log_limited!(
                    warn,
                    "bdif {name}: disk read at {:#x} failed: {e}",
                    offset + done
                );
                return status::FAILED;
            }
            if write_all(&self.memory, data_addr + done, chunk).is_err() {
                return status::FAILED;
            }
            done += n as u64;
        }
        status::SUCCESS
    }
}

impl MmioDevice for Bdif {
    fn read(&self, offset: u64, width: AccessWidth) -> u64 {
        let window = offset & devid::MASK;
        let value = match offset & reg::MASK {
            reg::STATUS => value::STATUS,
            reg::CFG => value::CFG,
            reg::UNK1 => value::UNK1,
            reg::BUSY => value::BUSY,
            reg::UNK2 => value::UNK2,
            reg::UNK3 => value::UNK3,
            // The disk's size in 512-byte sectors (see the module doc).
            reg::NEXT_DEVICE => match window {
                devid::ROOT => self.root.len() / SECTOR_SIZE,
                devid::AUX => self.aux.len() / SECTOR_SIZE,
                _ => value::UNDEFINED,
            },
            _ => value::UNDEFINED,
        } & width.mask();
        tracing::trace!(offset, size = width.bytes(), value, "bdif_read");
        value
    }

    fn write(&self, offset: u64, width: AccessWidth, value: u64) {
        let value = value & width.mask();
        tracing::trace!(offset, size = width.bytes(), value, "bdif_write");
        if offset & reg::MASK != reg::CMD {
            return;
        }
        let (name, disk) = match offset & devid::MASK {
            devid::ROOT => ("root", &self.root),
            devid::AUX => ("aux", &self.aux),
            _ => return,
        };
        let (retval, result) = self.execute(name, disk.as_ref(), value);
        // QEMU ignores a failed status write; so do we.
        if write_all(&self.memory, retval, &[result]).is_err() {
            guest_error!("bdif {name}: status address {retval:#x} is not in RAM");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use block::MemoryDisk;
    use vm_core::memory::create_guest_memory;
    use AccessWidth::{Byte, Double, Half, Word};

    const RAM: u64 = 0x7000_0000;
    const RAM_SIZE: usize = 0x40_0000;
    const DESC: u64 = 0x7000_1000;
    const SECTOR: u64 = 0x7000_2000;
    const DATA: u64 = 0x7000_3000;
    const RETVAL: u64 = 0x7000_4000;
    const ROOT_CMD: u64 = devid::ROOT | reg::CMD;
    const AUX_CMD: u64 = devid::AUX | reg::CMD;

    fn image(seed: u8, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ ((i >> 8) as u8) ^ seed)
            .collect()
    }

    struct Rig {
        mem: GuestRam,
        bdif: Bdif,
        root: Arc<MemoryDisk>,
        aux: Arc<MemoryDisk>,
    }

    /// A request as the boot ROM builds it: fields in RAM, not yet issued.
    struct Req {
        sector_addr: u64,
        sector_len: u32,
        sector: u32,
        data_addr: u64,
        len: u32,
        flags: u32,
        retval: u64,
    }

    impl Default for Req {
        fn default() -> Self {
            Self {
                sector_addr: SECTOR,
                sector_len: 16,
                sector: 5,
                data_addr: DATA,
                len: 0x1000,
                flags: op::READ,
                retval: RETVAL,
            }
        }
    }

    impl Rig {
        fn new() -> Self {
            let mem = create_guest_memory(&[(RAM, RAM_SIZE)]).unwrap();
            let root = Arc::new(MemoryDisk::new(image(0x00, 0x10_0000), false));
            let aux = Arc::new(MemoryDisk::new(image(0xA5, 0x8000), false));
            let bdif = Bdif::new(mem.clone(), root.clone(), aux.clone());
            let rig = Self {
                mem,
                bdif,
                root,
                aux,
            };
            rig.poke(RETVAL, &[0xEE, 0xEE]);
            rig
        }

        fn poke(&self, addr: u64, bytes: &[u8]) {
            write_all(&self.mem, addr, bytes).unwrap();
        }

        fn peek(&self, addr: u64, len: usize) -> Vec<u8> {
            let mut v = vec![0u8; len];
            read_exact(&self.mem, addr, &mut v).unwrap();
            v
        }

        fn place(&self, at: u64, req: &Req) {
            let mut d = [0u8; desc::SIZE];
            d[0x00..0x08].copy_from_slice(&req.sector_addr.to_le_bytes());
            d[0x08..0x0C].copy_from_slice(&req.sector_len.to_le_bytes());
            d[0x0C..0x10].copy_from_slice(&0xDEAD_BEEFu32.to_le_bytes());
            d[0x10..0x18].copy_from_slice(&req.data_addr.to_le_bytes());
            d[0x18..0x1C].copy_from_slice(&req.len.to_le_bytes());
            d[0x1C..0x20].copy_from_slice(&req.flags.to_le_bytes());
            d[0x20..0x28].copy_from_slice(&req.retval.to_le_bytes());
            d[0x28..0x30].copy_from_slice(&[0x77; 8]);
            self.poke(at, &d);
            if range_is_ram(&self.mem, req.sector_addr, 16) {
                let mut sb = [0xCCu8; 16];
                sb[8..12].copy_from_slice(&req.sector.to_le_bytes());
                self.poke(req.sector_addr, &sb);
            }
        }

        /// Places `req` at [`DESC`], issues it through `cmd`, returns the
        /// status byte.
        fn run(&self, cmd: u64, req: &Req) -> u8 {
            self.place(DESC, req);
            self.bdif.write(cmd, Word, DESC);
            self.peek(req.retval, 1)[0]
        }
    }

    /// AVPBooter reads the backup GPT header at (reported size - 1): with
    /// QEMU's fixed 64 GiB it would read past this image and fail.
    #[test]
    fn next_device_reports_the_disk_size_so_the_backup_gpt_is_found() {
        let mem = create_guest_memory(&[(RAM, RAM_SIZE)]).unwrap();
        let size = 0x30_0000;
        let mut bytes = image(0x00, size);
        // "EFI PART" in the last sector, where a backup GPT header lives.
        bytes[size - 512..size - 504].copy_from_slice(b"EFI PART");
        let root = Arc::new(MemoryDisk::new(bytes, false));
        let aux = Arc::new(MemoryDisk::new(image(0xA5, 0x8000 + 100), false));
        let bdif = Bdif::new(mem.clone(), root, aux);
        let sectors = bdif.read(devid::ROOT | reg::NEXT_DEVICE, Double);
        assert_eq!(sectors, (size / 512) as u64);
        assert_eq!(
            bdif.read(devid::AUX | reg::NEXT_DEVICE, Word),
            0x40,
            "a partial last sector is not counted"
        );
        let rig = Rig {
            mem,
            bdif,
            root: Arc::new(MemoryDisk::new(Vec::new(), false)),
            aux: Arc::new(MemoryDisk::new(Vec::new(), false)),
        };
        let req = Req {
            sector: (sectors - 1) as u32,
            len: 512,
            ..Req::default()
        };
        assert_eq!(rig.run(ROOT_CMD, &req), 0);
        assert_eq!(&rig.peek(DATA, 8), b"EFI PART");
    }

    #[test]
    fn v23_register_reads() {
        let rig = Rig::new();
        let r = |off: u64, w: AccessWidth| rig.bdif.read(off, w);
        assert_eq!(r(0x0, Word), 1);
        assert_eq!(r(0x4, Word), 2);
        assert_eq!(r(0x8, Word), 0x420);
        assert_eq!(r(0x10, Word), 1);
        assert_eq!(r(0x400, Word), 1);
        assert_eq!(r(0x434, Word), 0);
        // Disk sizes in sectors: 1 MiB root, 32 KiB aux.
        assert_eq!(r(0x420, Word), 0x800);
        assert_eq!(r(0x1_0420, Word), 0x40);
        assert_eq!(r(0x2_0420, Word), 0xFFFF_FFFF);
        assert_eq!(r(0x10_0000, Word), 1, "USB window STATUS");
        assert_eq!(r(0x408, Word), 0xFFFF_FFFF);
        assert_eq!(r(0xC, Word), 0xFFFF_FFFF);
        assert_eq!(r(0x5, Byte), 0xFF);
        assert_eq!(r(0x0, Double), 1);
        assert_eq!(r(0xC, Double), u64::MAX);
        assert_eq!(r(0xC, Half), 0xFFFF);
        assert_eq!(r(0x1F_0004, Word), 2, "constants in every window");
    }

    #[test]
    fn v24_aux_read() {
        let rig = Rig::new();
        rig.poke(RETVAL + 1, &[0x5A]);
        assert_eq!(rig.run(AUX_CMD, &Req::default()), 0);
        assert_eq!(rig.peek(DATA, 0x1000), rig.aux.contents()[2560..6656]);
        assert_eq!(rig.peek(RETVAL + 1, 1), [0x5A], "only one status byte");
    }

    #[test]
    fn v24_eight_byte_cmd_write() {
        let rig = Rig::new();
        rig.place(DESC, &Req::default());
        rig.bdif.write(AUX_CMD, Double, DESC);
        assert_eq!(rig.peek(RETVAL, 1), [0]);
        assert_eq!(rig.peek(DATA, 0x1000), rig.aux.contents()[2560..6656]);
    }

    #[test]
    fn v25_root_read() {
        let rig = Rig::new();
        assert_eq!(rig.run(ROOT_CMD, &Req::default()), 0);
        assert_eq!(rig.peek(DATA, 0x1000), rig.root.contents()[2560..6656]);
    }

    #[test]
    fn v26_sector_len_not_16() {
        let rig = Rig::new();
        let req = Req {
            sector_len: 8,
            ..Req::default()
        };
        assert_eq!(rig.run(AUX_CMD, &req), 1);
        assert!(rig.peek(DATA, 0x1000).iter().all(|&b| b == 0));
    }

    #[test]
    fn v27_write_refused() {
        let rig = Rig::new();
        rig.poke(DATA, &[0x99; 0x1000]);
        let before = rig.aux.contents();
        let req = Req {
            flags: op::WRITE,
            ..Req::default()
        };
        assert_eq!(rig.run(AUX_CMD, &req), 1);
        assert_eq!(rig.aux.contents(), before);
    }

    #[test]
    fn v28_unknown_operation() {
        let rig = Rig::new();
        for flags in [0, 0x0003_0000, 0x0002_0001, u32::MAX] {
            rig.poke(RETVAL, &[0xEE]);
            let req = Req {
                flags,
                ..Req::default()
            };
            assert_eq!(rig.run(ROOT_CMD, &req), 1, "{flags:#x}");
        }
        assert!(rig.peek(DATA, 0x1000).iter().all(|&b| b == 0));
    }

    #[test]
    fn v29_length_limit_and_zero() {
        let rig = Rig::new();
        let req = Req {
            len: 0x0800_0001,
            ..Req::default()
        };
        assert_eq!(rig.run(ROOT_CMD, &req), 1);
        rig.poke(RETVAL, &[0xEE]);
        let req = Req {
            len: 0,
            ..Req::default()
        };
        assert_eq!(rig.run(ROOT_CMD, &req), 0);
        assert!(rig.peek(DATA, 0x1000).iter().all(|&b| b == 0));
        rig.poke(RETVAL, &[0xEE]);
        let req = Req {
            len: 0,
            data_addr: 0x0800_0000,
            ..Req::default()
        };
        assert_eq!(rig.run(ROOT_CMD, &req), 0, "empty DMA to unmapped space");
    }

    #[test]
    fn exactly_128_mib_is_not_rejected_for_its_length() {
        // The root image is 1 MiB, so the request fails on the image bound,
        // not on the length check, and allocates nothing.
        let rig = Rig::new();
        let req = Req {
            len: 128 << 20,
            sector: 0,
            ..Req::default()
        };
        assert_eq!(rig.run(ROOT_CMD, &req), 1);
        let big = Arc::new(MemoryDisk::new(vec![0x3C; (128 << 20) + 512], false));
        let mem = create_guest_memory(&[(RAM, (129 << 20) as usize)]).unwrap();
        let bdif = Bdif::new(mem.clone(), big.clone(), big);
        let rig = Rig {
            mem,
            bdif,
            root: Arc::new(MemoryDisk::default()),
            aux: Arc::new(MemoryDisk::default()),
        };
        let req = Req {
            len: 128 << 20,
            sector: 1,
            data_addr: RAM + 0x10_0000,
            ..Req::default()
        };
        assert_eq!(rig.run(ROOT_CMD, &req), 0);
        assert_eq!(rig.peek(RAM + 0x10_0000 + (128 << 20) - 4, 4), [0x3C; 4]);
    }

    #[test]
    fn multi_chunk_read_is_exact() {
        let rig = Rig::new();
        // 0x100 sectors in, 2.5 chunks long, not a multiple of 512.
        let len = (CHUNK * 5 / 2 + 7) as u32;
        let req = Req {
            sector: 0x100,
            len,
            data_addr: RAM + 0x10_0000,
            ..Req::default()
        };
        // The root image is only 1 MiB; give it room.
        let root = Arc::new(MemoryDisk::new(image(0x11, 0x40_0000), false));
        let bdif = Bdif::new(rig.mem.clone(), root.clone(), rig.aux.clone());
        rig.place(DESC, &req);
        bdif.write(ROOT_CMD, Word, DESC);
        assert_eq!(rig.peek(RETVAL, 1), [0]);
        let off = 0x100 * 512;
        assert_eq!(
            rig.peek(RAM + 0x10_0000, len as usize),
            root.contents()[off..off + len as usize]
        );
    }

    #[test]
    fn v30_sector_beyond_image() {
        let rig = Rig::new();
        // The aux image is 0x8000 bytes = 64 sectors.
        for (sector, len) in [(64, 1), (63, 513), (0xFFFF_FFFF, 0x1000), (65, 0)] {
            rig.poke(RETVAL, &[0xEE]);
            let req = Req {
                sector,
                len,
                ..Req::default()
            };
            assert_eq!(rig.run(AUX_CMD, &req), 1, "sector {sector} len {len}");
        }
        assert!(rig.peek(DATA, 0x1000).iter().all(|&b| b == 0));
        let end = Req {
            sector: 64,
            len: 0,
            ..Req::default()
        };
        assert_eq!(rig.run(AUX_CMD, &end), 0, "empty read at the very end");
        let last = Req {
            sector: 63,
            len: 512,
            ..Req::default()
        };
        assert_eq!(rig.run(AUX_CMD, &last), 0);
        assert_eq!(rig.peek(DATA, 512), rig.aux.contents()[0x7E00..]);
    }

    #[test]
    fn v31_data_buffer_not_in_ram() {
        let rig = Rig::new();
        for data_addr in [0x0800_0000, RAM + RAM_SIZE as u64 - 0x800, u64::MAX - 0x7FF] {
            rig.poke(RETVAL, &[0xEE]);
            let req = Req {
                data_addr,
                ..Req::default()
            };
            assert_eq!(rig.run(AUX_CMD, &req), 1, "{data_addr:#x}");
        }
        let tail = rig.peek(RAM + RAM_SIZE as u64 - 0x800, 0x800);
        assert!(tail.iter().all(|&b| b == 0), "nothing partially written");
    }

    #[test]
    fn v32_cmd_in_other_windows_does_nothing() {
        let rig = Rig::new();
        rig.place(DESC, &Req::default());
        for window in [devid::USB, 0x2_0000, 0x1F_0000] {
            rig.bdif.write(window | reg::CMD, Word, DESC);
        }
        assert_eq!(rig.peek(RETVAL, 1), [0xEE]);
        assert!(rig.peek(DATA, 0x1000).iter().all(|&b| b == 0));
        // Writes to other registers of the ROOT window are ignored too.
        for r in [reg::STATUS, reg::BUSY, reg::NEXT_DEVICE, 0x40C] {
            rig.bdif.write(r, Word, DESC);
        }
        assert_eq!(rig.peek(RETVAL, 1), [0xEE]);
    }

    #[test]
    fn cmd_value_is_truncated_to_the_access_width() {
        let rig = Rig::new();
        rig.place(DESC, &Req::default());
        // A 32-bit store sees only the low word of the register value.
        rig.bdif.write(AUX_CMD, Word, 0xFFFF_FFFF_0000_0000 | DESC);
        assert_eq!(rig.peek(RETVAL, 1), [0]);
    }

    #[test]
    fn q7_descriptor_straddling_end_of_ram() {
        let rig = Rig::new();
        // The descriptor's first 40 bytes (up to and including retval.addr)
        // are RAM; the last 8 are not. QEMU's failed read still yields
        // retval.addr, which gets status 1; nothing is read.
        let at = RAM + RAM_SIZE as u64 - 40;
        let mut d = [0u8; 40];
        d[0x00..0x08].copy_from_slice(&SECTOR.to_le_bytes());
        d[0x08..0x0C].copy_from_slice(&16u32.to_le_bytes());
        d[0x10..0x18].copy_from_slice(&DATA.to_le_bytes());
        d[0x18..0x1C].copy_from_slice(&0x200u32.to_le_bytes());
        d[0x1C..0x20].copy_from_slice(&op::READ.to_le_bytes());
        d[0x20..0x28].copy_from_slice(&RETVAL.to_le_bytes());
        rig.poke(at, &d);
        rig.poke(SECTOR, &[0; 16]);
        rig.bdif.write(ROOT_CMD, Double, at);
        assert_eq!(rig.peek(RETVAL, 2), [1, 0xEE]);
        assert!(rig.peek(DATA, 0x200).iter().all(|&b| b == 0));
    }

    #[test]
    fn q7_retval_half_outside_ram_reads_as_zero_bytes() {
        let rig = Rig::new();
        // retval.addr's upper 4 bytes fall outside RAM: they read 0, so the
        // assembled address is the low word alone.
        let at = RAM + RAM_SIZE as u64 - 0x24;
        let low = (RETVAL as u32).to_le_bytes();
        rig.poke(at + 0x20, &low);
        rig.bdif.write(ROOT_CMD, Double, at);
        assert_eq!(rig.peek(RETVAL, 1), [1]);
    }

    #[test]
    fn q7_unmapped_descriptor_and_wrapping_address() {
        let rig = Rig::new();
        for at in [0, 0x0800_0000, u64::MAX - 8, u64::MAX] {
            rig.bdif.write(ROOT_CMD, Double, at);
        }
        assert_eq!(rig.peek(RETVAL, 1), [0xEE]);
    }

    #[test]
    fn hostile_addresses_and_sizes() {
        let rig = Rig::new();
        // data.addr + len wraps the address space.
        let req = Req {
            data_addr: u64::MAX - 0x10,
            len: 0x100,
            ..Req::default()
        };
        assert_eq!(rig.run(ROOT_CMD, &req), 1);
        // Largest sector: 0xFFFF_FFFF * 512 does not overflow, it is just
        // beyond the image.
        rig.poke(RETVAL, &[0xEE]);
        let req = Req {
            sector: u32::MAX,
            len: 0x0800_0000,
            ..Req::default()
        };
        assert_eq!(rig.run(ROOT_CMD, &req), 1);
        // Sector block outside RAM.
        rig.poke(RETVAL, &[0xEE]);
        let req = Req {
            sector_addr: 0x10,
            ..Req::default()
        };
        assert_eq!(rig.run(ROOT_CMD, &req), 1);
        // Sector block straddling the end of RAM.
        rig.poke(RETVAL, &[0xEE]);
        let req = Req {
            sector_addr: RAM + RAM_SIZE as u64 - 8,
            ..Req::default()
        };
        assert_eq!(rig.run(ROOT_CMD, &req), 1);
        assert!(rig.peek(DATA, 0x1000).iter().all(|&b| b == 0));
        // Status address in MMIO space or wrapping: nothing written, no panic.
        for retval in [BASE + reg::CMD, u64::MAX] {
            let req = Req {
                retval,
                ..Req::default()
            };
            rig.place(DESC, &req);
            rig.bdif.write(ROOT_CMD, Word, DESC);
        }
        assert_eq!(rig.peek(DATA, 0x1000), rig.root.contents()[2560..6656]);
        // The descriptor pointing at itself as its data buffer works like
        // any other overlap: the read overwrites it.
        let req = Req {
            data_addr: DESC,
            len: 48,
            ..Req::default()
        };
        rig.place(DESC, &req);
        rig.bdif.write(ROOT_CMD, Word, DESC);
        assert_eq!(rig.peek(DESC, 48), rig.root.contents()[2560..2608]);
    }
}
