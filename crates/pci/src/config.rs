//! The standard type-0 configuration header of one PCI function.
//!
//! Follows the PCI Local Bus Specification 3.0 §6.1–§6.2 (header layout,
//! command/status, BAR sizing) as a PCI Express endpoint presents it (PCIe
//! Base 4.0 §7.5.1). Only the first 64 bytes live here; the host bridge
//! forwards 0x40..0x1000 to the function itself.
//!
//! # Model
//!
//! * **Read-only fields.** IDs, revision, class, header type, subsystem IDs,
//!   interrupt pin and the capabilities pointer come from the function and
//!   ignore writes. Cardbus CIS, expansion ROM, BIST, min/max latency and
//!   the reserved dwords read 0 (there is no option ROM, so sizing the ROM
//!   BAR reads 0 = "not implemented").
//! * **Command.** I/O space, memory space, bus master, parity error
//!   response, SERR# enable and interrupt disable are writable; every other
//!   bit reads 0. There is no I/O window on vmapple, so the I/O enable bit
//!   is stored and has no effect.
//! * **Status.** Bit 3 (interrupt status) mirrors the function's INTx
//!   output before the interrupt-disable gate, bit 4 (capabilities list) is
//!   set when the function has capabilities. No error is ever recorded, so
//!   the write-1-to-clear bits read 0 and writes have nothing to clear.
//! * **BARs.** Memory BARs only (32- or 64-bit, optionally prefetchable).
//!   The address bits below the BAR's size are hard-wired to 0, so the
//!   usual sizing sequence (write all-ones, read back) returns the size
//!   mask with the type bits. A 64-bit BAR takes two registers; the upper
//!   one holds address bits 63:32. Unused BAR registers read 0.
//! * **Sub-dword accesses** act on the bytes they cover: a byte store to
//!   the command register's low byte leaves its high byte alone.

use crate::device::{BarKind, BarRegion};
use vm_core::AccessWidth;

/// Offsets and bits of the type-0 header.
pub mod reg {
    pub const VENDOR_ID: u16 = 0x00;
    pub const DEVICE_ID: u16 = 0x02;
    pub const COMMAND: u16 = 0x04;
    pub const STATUS: u16 = 0x06;
    pub const REVISION_ID: u16 = 0x08;
    pub const CLASS_PROG: u16 = 0x09;
    pub const CACHE_LINE_SIZE: u16 = 0x0c;
    pub const LATENCY_TIMER: u16 = 0x0d;
    pub const HEADER_TYPE: u16 = 0x0e;
    pub const BIST: u16 = 0x0f;
    pub const BAR0: u16 = 0x10;
    pub const CARDBUS_CIS: u16 = 0x28;
    pub const SUBSYSTEM_VENDOR_ID: u16 = 0x2c;
    pub const SUBSYSTEM_ID: u16 = 0x2e;
    pub const EXPANSION_ROM: u16 = 0x30;
    pub const CAPABILITIES_POINTER: u16 = 0x34;
    pub const INTERRUPT_LINE: u16 = 0x3c;
    pub const INTERRUPT_PIN: u16 = 0x3d;
    /// First byte after the standard header.
    pub const HEADER_END: u16 = 0x40;
    /// Size of a PCI Express function's configuration space.
    pub const CONFIG_SIZE: u16 = 0x1000;

    pub const COMMAND_IO: u16 = 1 << 0;
    pub const COMMAND_MEMORY: u16 = 1 << 1;
    pub const COMMAND_MASTER: u16 = 1 << 2;
    pub const COMMAND_PARITY: u16 = 1 << 6;
    pub const COMMAND_SERR: u16 = 1 << 8;
    pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
    /// Command bits a guest may change.
    pub const COMMAND_WRITABLE: u16 = COMMAND_IO
        | COMMAND_MEMORY
        | COMMAND_MASTER
        | COMMAND_PARITY
        | COMMAND_SERR
        | COMMAND_INTX_DISABLE;

    pub const STATUS_INTERRUPT: u16 = 1 << 3;
    pub const STATUS_CAP_LIST: u16 = 1 << 4;

    pub const BAR_MEM_TYPE_64: u32 = 0b10 << 1;
    pub const BAR_MEM_PREFETCH: u32 = 1 << 3;
    /// Low bits of a memory BAR that are flags, not address.
    pub const BAR_MEM_FLAGS: u32 = 0xf;
}

/// Number of BAR registers in a type-0 header.
pub const NUM_BARS: usize = 6;

/// The read-only identity of a function's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeaderIdentity {
    pub vendor_id: u16,
    pub device_id: u16,
    pub subsystem_vendor_id: u16,
    pub subsystem_id: u16,
    /// base class << 16 | sub-class << 8 | prog-if
    pub class_code: u32,
    pub revision: u8,
    /// 0 = no interrupt, 1..=4 = INTA..INTD.
    pub interrupt_pin: u8,
    /// Offset of the first capability, 0 when there are none.
    pub capabilities_pointer: u8,
}

/// Why a function's BAR list was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BarError {
    #[error("BAR {0}: index out of range (a 64-bit BAR needs two registers)")]
    Index(u8),
    #[error("BAR {index}: size {size:#x} is not a power of two of at least 16 bytes")]
    Size { index: u8, size: u64 },
    #[error("BAR {0} overlaps another BAR's registers")]
    Overlap(u8),
}

/// What a BAR register holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BarSlot {
    Unused,
    /// The low (or only) register of a BAR.
    Low(BarRegion),
    /// The upper half of the 64-bit BAR in the register before.
    High {
        size: u64,
    },
}

/// One memory BAR the guest has placed: `[base, base + size)` on the bus.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MappedBar {
    pub index: u8,
    pub base: u64,
    pub size: u64,
}

/// The guest-programmed part of a header, as a snapshot stores it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedHeader {
    pub command: u16,
    pub cache_line_size: u8,
    pub interrupt_line: u8,
    pub interrupt_status: bool,
    pub bar_regs: [u32; NUM_BARS],
}

/// The 64-byte type-0 header of one function.
#[derive(Clone, Debug)]
pub struct ConfigSpace {
    identity: HeaderIdentity,
    command: u16,
    cache_line_size: u8,
    interrupt_line: u8,
    /// Level of the function's INTx output (status bit 3).
    interrupt_status: bool,
    slots: [BarSlot; NUM_BARS],
    /// Guest-written address bits of each register (flag bits excluded).
    bar_regs: [u32; NUM_BARS],
}

impl ConfigSpace {
    /// A header for a function with `identity` and `bars`.
    pub fn new(identity: HeaderIdentity, bars: &[BarRegion]) -> Result<Self, BarError> {
        let mut slots = [BarSlot::Unused; NUM_BARS];
        for bar in bars {
            let index = usize::from(bar.index);
            let regs = match bar.kind {
                BarKind::Memory32 => 1,
                BarKind::Memory64 => 2,
            };
            if index + regs > NUM_BARS {
                return Err(BarError::Index(bar.index));
            }
            let size_ok = bar.size.is_power_of_two()
                && bar.size >= 16
                && (bar.kind == BarKind::Memory64 || bar.size <= 1 << 31);
            if !size_ok {
                return Err(BarError::Size {
                    index: bar.index,
                    size: bar.size,
                });
            }
            if slots[index..index + regs]
                .iter()
                .any(|s| *s != BarSlot::Unused)
            {
                return Err(BarError::Overlap(bar.index));
            }
            slots[index] = BarSlot::Low(*bar);
            if regs == 2 {
                slots[index + 1] = BarSlot::High { size: bar.size };
            }
        }
        Ok(Self {
            identity,
            command: 0,
            cache_line_size: 0,
            interrupt_line: 0,
            interrupt_status: false,
            slots,
            bar_regs: [0; NUM_BARS],
        })
    }

    /// What the guest programmed, for a snapshot (the rest of the header
    /// is the function's identity, which the machine rebuilds).
    pub fn save_state(&self) -> SavedHeader {
        SavedHeader {
            command: self.command,
            cache_line_size: self.cache_line_size,
            interrupt_line: self.interrupt_line,
            interrupt_status: self.interrupt_status,
            bar_regs: self.bar_regs,
        }
    }

    /// Puts back what [`ConfigSpace::save_state`] returned, through the
    /// same masks as guest writes (a snapshot cannot give a BAR bits its
    /// size does not allow).
    pub fn restore_state(&mut self, saved: &SavedHeader) {
        self.reset();
        for (i, value) in saved.bar_regs.iter().enumerate() {
            self.write(0x10 + 4 * i as u16, AccessWidth::Word, u64::from(*value));
        }
        self.cache_line_size = saved.cache_line_size;
        self.interrupt_line = saved.interrupt_line;
        self.interrupt_status = saved.interrupt_status;
        self.write(0x04, AccessWidth::Word, u64::from(saved.command));
    }

    /// Power-on state: decoding off, BARs at 0, interrupt line 0.
    pub fn reset(&mut self) {
        self.command = 0;
        self.cache_line_size = 0;
        self.interrupt_line = 0;
        self.bar_regs = [0; NUM_BARS];
    }

    pub fn identity(&self) -> &HeaderIdentity {
        &self.identity
    }

    pub fn command(&self) -> u16 {
        self.command
    }

    /// The function decodes its memory BARs.
    pub fn memory_enabled(&self) -> bool {
        self.command & reg::COMMAND_MEMORY != 0
    }

    /// The guest masked the function's INTx output.
    pub fn intx_disabled(&self) -> bool {
        self.command & reg::COMMAND_INTX_DISABLE != 0
    }

    /// Records the level of the function's INTx output for status bit 3.
    pub fn set_interrupt_status(&mut self, asserted: bool) {
        self.interrupt_status = asserted;
    }

    /// The guest-programmed address of the BAR whose low register is
    /// `index`, whether or not decoding is enabled.
    pub fn bar_address(&self, index: u8) -> Option<u64> {
        let i = usize::from(index);
        match self.slots.get(i)? {
            BarSlot::Low(bar) => {
                let low = u64::from(self.bar_regs[i] & !reg::BAR_MEM_FLAGS);
                let high = match bar.kind {
                    BarKind::Memory32 => 0,
                    BarKind::Memory64 => u64::from(self.bar_regs[i + 1]),
                };
                Some(high << 32 | low)
            }
            _ => None,
        }
    }

    /// The BARs the function decodes now: none unless memory space is
    /// enabled. A BAR whose range would wrap past the top of the address
    /// space is left out.
    pub fn mapped_bars(&self) -> Vec<MappedBar> {
        if !self.memory_enabled() {
            return Vec::new();
        }
        self.slots
            .iter()
            .filter_map(|slot| match slot {
                BarSlot::Low(bar) => Some(*bar),
                _ => None,
            })
            .filter_map(|bar| {
                let base = self.bar_address(bar.index)?;
                base.checked_add(bar.size - 1)?;
                Some(MappedBar {
                    index: bar.index,
                    base,
                    size: bar.size,
                })
            })
            .collect()
    }

    /// The dword at `reg` (dword-aligned, below [`reg::HEADER_END`]).
    fn read_dword(&self, offset: u16) -> u32 {
        let id = &self.identity;
        match offset {
            0x00 => u32::from(id.device_id) << 16 | u32::from(id.vendor_id),
            0x04 => {
                let mut status = 0;
                if self.interrupt_status {
                    status |= reg::STATUS_INTERRUPT;
                }
                if id.capabilities_pointer != 0 {
                    status |= reg::STATUS_CAP_LIST;
                }
                u32::from(status) << 16 | u32::from(self.command)
            }
            0x08 => (id.class_code & 0x00ff_ffff) << 8 | u32::from(id.revision),
            // Latency timer, header type (single-function type 0) and BIST
            // are all 0.
            0x0c => u32::from(self.cache_line_size),
            0x10..=0x27 => {
                let i = usize::from((offset - reg::BAR0) / 4);
                match self.slots[i] {
                    BarSlot::Unused => 0,
                    BarSlot::High { .. } => self.bar_regs[i],
                    BarSlot::Low(bar) => {
                        let mut flags = 0;
                        if bar.kind == BarKind::Memory64 {
                            flags |= reg::BAR_MEM_TYPE_64;
                        }
                        if bar.prefetchable {
                            flags |= reg::BAR_MEM_PREFETCH;
                        }
                        self.bar_regs[i] | flags
                    }
                }
            }
            0x2c => u32::from(id.subsystem_id) << 16 | u32::from(id.subsystem_vendor_id),
            0x34 => u32::from(id.capabilities_pointer),
            0x3c => u32::from(id.interrupt_pin) << 8 | u32::from(self.interrupt_line),
            _ => 0,
        }
    }

    /// Stores the dword at `offset`, `value` already merged with the bytes
    /// the access did not cover.
    fn write_dword(&mut self, offset: u16, value: u32) {
        match offset {
            0x04 => self.command = value as u16 & reg::COMMAND_WRITABLE,
            0x0c => self.cache_line_size = value as u8,
            0x10..=0x27 => {
                let i = usize::from((offset - reg::BAR0) / 4);
                let writable = match self.slots[i] {
                    BarSlot::Unused => 0,
                    BarSlot::Low(bar) => !(bar.size - 1) as u32 & !reg::BAR_MEM_FLAGS,
                    BarSlot::High { size } => (!(size - 1) >> 32) as u32,
                };
                self.bar_regs[i] = value & writable;
            }
            0x3c => self.interrupt_line = value as u8,
            _ => {}
        }
    }

    /// A load of `width` at `offset` (< [`reg::HEADER_END`], naturally
    /// aligned; an 8-byte load covers two dwords).
    pub fn read(&self, offset: u16, width: AccessWidth) -> u64 {
        if offset >= reg::HEADER_END {
            return 0;
        }
        let aligned = offset & !3;
        let lo = u64::from(self.read_dword(aligned));
        let value = if width == AccessWidth::Double {
            let hi = if aligned + 4 < reg::HEADER_END {
                u64::from(self.read_dword(aligned + 4))
            } else {
                0
            };
            hi << 32 | lo
        } else {
            lo >> (8 * (offset & 3))
        };
        value & width.mask()
    }

    /// A store of `width` at `offset` (< [`reg::HEADER_END`], naturally
    /// aligned; an 8-byte store covers two dwords).
    pub fn write(&mut self, offset: u16, width: AccessWidth, value: u64) {
        if offset >= reg::HEADER_END {
            return;
        }
        let aligned = offset & !3;
        if width == AccessWidth::Double {
            self.write_dword(aligned, value as u32);
            if aligned + 4 < reg::HEADER_END {
                self.write_dword(aligned + 4, (value >> 32) as u32);
            }
            return;
        }
        let shift = 8 * u32::from(offset & 3);
        let enables = (width.mask() as u32) << shift;
        let old = self.read_dword(aligned);
        let merged = (old & !enables) | ((value as u32) << shift & enables);
        self.write_dword(aligned, merged);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use AccessWidth::*;

    fn identity() -> HeaderIdentity {
        HeaderIdentity {
            vendor_id: 0x1af4,
            device_id: 0x1042,
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x1100,
            class_code: 0x01_00_00,
            revision: 1,
            interrupt_pin: 1,
            capabilities_pointer: 0x40,
        }
    }

    fn space() -> ConfigSpace {
        ConfigSpace::new(
            identity(),
            &[
                BarRegion {
                    index: 0,
                    size: 0x4000,
                    kind: BarKind::Memory64,
                    prefetchable: true,
                },
                BarRegion {
                    index: 2,
                    size: 0x1000,
                    kind: BarKind::Memory32,
                    prefetchable: false,
                },
            ],
        )
        .unwrap()
    }

    #[test]
    fn identity_fields_read_back_and_ignore_writes() {
        let mut cs = space();
        for (offset, value) in [
            (0x00, 0x1042_1af4u64),
            (0x08, 0x0100_0001),
            (0x2c, 0x1100_1af4),
        ] {
            assert_eq!(cs.read(offset, Word), value, "offset {offset:#x}");
            cs.write(offset, Word, 0xdead_beef);
            assert_eq!(
                cs.read(offset, Word),
                value,
                "offset {offset:#x} after write"
            );
        }
        assert_eq!(cs.read(reg::DEVICE_ID, Half), 0x1042);
        assert_eq!(cs.read(reg::CLASS_PROG + 2, Byte), 0x01);
        assert_eq!(cs.read(reg::HEADER_TYPE, Byte), 0);
        assert_eq!(cs.read(reg::CAPABILITIES_POINTER, Byte), 0x40);
        assert_eq!(cs.read(reg::INTERRUPT_PIN, Byte), 1);
        cs.write(reg::INTERRUPT_PIN, Byte, 3);
        assert_eq!(cs.read(reg::INTERRUPT_PIN, Byte), 1);
        cs.write(reg::INTERRUPT_LINE, Byte, 0x2a);
        assert_eq!(cs.read(reg::INTERRUPT_LINE, Half), 0x012a);
        cs.write(reg::EXPANSION_ROM, Word, 0xffff_ffff);
        assert_eq!(cs.read(reg::EXPANSION_ROM, Word), 0, "no option ROM");
    }

    #[test]
    fn command_keeps_only_writable_bits_and_status_reports_caps() {
        let mut cs = space();
        cs.write(reg::COMMAND, Half, 0xffff);
        assert_eq!(
            cs.read(reg::COMMAND, Half),
            u64::from(reg::COMMAND_WRITABLE)
        );
        assert!(cs.memory_enabled() && cs.intx_disabled());
        // A byte store to the high byte leaves the low byte alone.
        cs.write(reg::COMMAND + 1, Byte, 0);
        assert_eq!(cs.read(reg::COMMAND, Half), 0x47);
        assert_eq!(cs.read(reg::STATUS, Half), u64::from(reg::STATUS_CAP_LIST));
        cs.write(reg::STATUS, Half, 0xffff);
        assert_eq!(cs.read(reg::STATUS, Half), u64::from(reg::STATUS_CAP_LIST));
        cs.set_interrupt_status(true);
        assert_eq!(cs.read(reg::STATUS, Byte), 0x18);

        let mut bare = ConfigSpace::new(
            HeaderIdentity {
                capabilities_pointer: 0,
                ..identity()
            },
            &[],
        )
        .unwrap();
        assert_eq!(bare.read(reg::STATUS, Half), 0);
        bare.write(reg::COMMAND, Word, 0xffff_ffff);
        assert_eq!(
            bare.read(reg::COMMAND, Word),
            u64::from(reg::COMMAND_WRITABLE)
        );
    }

    #[test]
    fn bar_sizing_returns_the_size_mask_with_type_bits() {
        let mut cs = space();
        assert_eq!(cs.read(0x10, Word), 0xc, "64-bit prefetchable, address 0");
        for bar in 0..6 {
            cs.write(0x10 + 4 * bar, Word, 0xffff_ffff);
        }
        assert_eq!(cs.read(0x10, Word), 0xffff_c00c);
        assert_eq!(cs.read(0x14, Word), 0xffff_ffff);
        assert_eq!(cs.read(0x18, Word), 0xffff_f000);
        for unused in [0x1c, 0x20, 0x24] {
            assert_eq!(cs.read(unused, Word), 0, "unused BAR {unused:#x}");
        }
        cs.write(0x10, Word, 0x5000_0000);
        cs.write(0x14, Word, 0);
        cs.write(0x18, Word, 0x5001_0abc);
        assert_eq!(cs.bar_address(0), Some(0x5000_0000));
        assert_eq!(cs.bar_address(2), Some(0x5001_0000));
        assert_eq!(cs.bar_address(1), None);
        cs.write(0x10, Double, 0x0000_0001_2345_8000);
        assert_eq!(cs.bar_address(0), Some(0x1_2345_8000));
        assert_eq!(cs.read(0x10, Double), 0x0000_0001_2345_800c);
    }

    #[test]
    fn bars_decode_only_with_memory_space_enabled() {
        let mut cs = space();
        cs.write(0x10, Word, 0x5000_0000);
        cs.write(0x18, Word, 0x5000_8000);
        assert!(cs.mapped_bars().is_empty());
        cs.write(reg::COMMAND, Half, u64::from(reg::COMMAND_MEMORY));
        assert_eq!(
            cs.mapped_bars(),
            vec![
                MappedBar {
                    index: 0,
                    base: 0x5000_0000,
                    size: 0x4000
                },
                MappedBar {
                    index: 2,
                    base: 0x5000_8000,
                    size: 0x1000
                }
            ]
        );
        // A 64-bit BAR sized with all-ones and left there would wrap.
        cs.write(0x10, Word, 0xffff_ffff);
        cs.write(0x14, Word, 0xffff_ffff);
        assert_eq!(cs.mapped_bars().len(), 2);
        assert_eq!(cs.mapped_bars()[0].base, 0xffff_ffff_ffff_c000);
        cs.reset();
        assert!(cs.mapped_bars().is_empty());
        assert_eq!(cs.bar_address(0), Some(0));
    }

    #[test]
    fn refuses_malformed_bar_lists() {
        let bar = |index, size, kind| BarRegion {
            index,
            size,
            kind,
            prefetchable: false,
        };
        let id = identity();
        assert!(ConfigSpace::new(id, &[bar(5, 0x1000, BarKind::Memory64)]).is_err());
        assert!(ConfigSpace::new(id, &[bar(6, 0x1000, BarKind::Memory32)]).is_err());
        assert!(ConfigSpace::new(id, &[bar(0, 0x1800, BarKind::Memory32)]).is_err());
        assert!(ConfigSpace::new(id, &[bar(0, 1 << 32, BarKind::Memory32)]).is_err());
        assert!(ConfigSpace::new(
            id,
            &[
                bar(0, 0x1000, BarKind::Memory64),
                bar(1, 0x1000, BarKind::Memory32)
            ]
        )
        .is_err());
        // A 64-bit BAR of 8 GiB: the whole low register is size bits.
        let mut cs = ConfigSpace::new(id, &[bar(0, 1 << 33, BarKind::Memory64)]).unwrap();
        cs.write(0x10, Word, 0xffff_ffff);
        cs.write(0x14, Word, 0xffff_ffff);
        assert_eq!(cs.read(0x10, Word), 0x4);
        assert_eq!(cs.read(0x14, Word), 0xffff_fffe);
    }

    #[test]
    fn every_offset_and_width_is_harmless() {
        let mut cs = space();
        for width in [Byte, Half, Word, Double] {
            let mut offset = 0;
            while offset < 0x48 {
                let _ = cs.read(offset, width);
                cs.write(offset, width, u64::MAX);
                offset += width.bytes() as u16;
            }
        }
        assert_eq!(cs.read(0, Word), 0x1042_1af4);
    }
}
