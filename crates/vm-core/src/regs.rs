//! Guest accesses to a block of 32-bit registers.
//!
//! Most devices here are made of 32-bit registers, while the guest may load
//! and store 1, 2, 4 or 8 bytes anywhere in their window. [`RegisterFile`]
//! turns any access into the 32-bit register operations the device
//! implements, once for all of them: accesses outside the block are ignored
//! (loads read 0), a 64-bit access is two 32-bit ones (low dword first),
//! and narrower ones follow the device's [`Narrow`] rule. Every refused
//! access is a rate-limited guest error.

use crate::bus::AccessWidth;
use crate::guest_error;

/// What a register file does with 8- and 16-bit accesses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Narrow {
    /// The register at the access's offset is read or written as a whole:
    /// a load gives its low bits, a store writes the value zero-extended.
    /// The offset is passed on as it is, so one inside a register reaches
    /// the device unaligned (logged: the guest meant something else).
    WholeRegister,
    /// Ignored, and logged.
    Refused,
    /// A load gives the bytes it covers, from the registers around them
    /// (for registers without read side effects); a store is refused.
    Lanes,
}

/// What a register file does with 64-bit accesses: either way two 32-bit
/// accesses, the low dword (at the lower offset) first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wide {
    /// The device documents 64-bit access: one access, which must lie
    /// wholly inside the block.
    Split,
    /// A 32-bit peripheral: two independent 32-bit accesses, as QEMU splits
    /// them for such a device. A half past the end of the block reads 0
    /// and is dropped. Logged, as the guest meant something else.
    Halves,
}

/// How one device's block of 32-bit registers answers guest accesses.
#[derive(Clone, Copy, Debug)]
pub struct RegisterFile<'a> {
    /// The device (and window) in guest-error logs.
    pub name: &'a str,
    /// Bytes the block spans from offset 0.
    pub size: u64,
    pub narrow: Narrow,
    pub wide: Wide,
}

impl RegisterFile<'_> {
    /// Whether the access reaches the device at all: with independent
    /// halves, its start must be inside; otherwise all of it.
    fn fits(&self, offset: u64, width: AccessWidth) -> bool {
        let bytes = match (width, self.wide) {
            (AccessWidth::Double, Wide::Halves) => 1,
            _ => width.bytes(),
        };
        offset
            .checked_add(bytes)
            .is_some_and(|end| end <= self.size)
    }

    /// Whether the high half of a 64-bit access at `offset` is inside.
    fn high_half_fits(&self, offset: u64) -> bool {
        offset.checked_add(8).is_some_and(|end| end <= self.size)
    }

    /// A load of `width` at `offset`, from `read32` (the 32-bit register
    /// at an offset). The value is masked to `width`.
    pub fn read(&self, offset: u64, width: AccessWidth, mut read32: impl FnMut(u64) -> u32) -> u64 {
        let name = self.name;
        if !self.fits(offset, width) {
            guest_error!("{name}: {width} read at offset {offset:#x} beyond the registers");
            return 0;
        }
        let aligned = offset % width.bytes() == 0;
        if self.narrow == Narrow::Lanes && (!aligned || width.bytes() < 4) {
            return lanes(offset, width, read32);
        }
        if self.narrow == Narrow::Refused && !aligned {
            guest_error!("{name}: unaligned {width} read at {offset:#x} ignored");
            return 0;
        }
        match width {
            AccessWidth::Word => u64::from(read32(offset)),
            AccessWidth::Double => {
                if self.wide == Wide::Halves {
                    guest_error!("{name}: 64-bit read at {offset:#x}; split into two 32-bit reads");
                }
                let low = read32(offset);
                let high = if self.high_half_fits(offset) {
                    read32(offset + 4)
                } else {
                    0
                };
                u64::from(high) << 32 | u64::from(low)
            }
            AccessWidth::Byte | AccessWidth::Half => match self.narrow {
                Narrow::WholeRegister => {
                    if offset % 4 != 0 {
                        guest_error!(
                            "{name}: {width} read at offset {offset:#x} inside a register returns its low bits"
                        );
                    }
                    u64::from(read32(offset)) & width.mask()
                }
                Narrow::Refused | Narrow::Lanes => {
                    guest_error!("{name}: {width} read at {offset:#x} ignored");
                    0
                }
            },
        }
    }

    /// A store of the low `width` bits of `value` at `offset`, through
    /// `write32` (the 32-bit register at an offset).
    pub fn write(
        &self,
        offset: u64,
        width: AccessWidth,
        value: u64,
        mut write32: impl FnMut(u64, u32),
    ) {
        let name = self.name;
        let value = value & width.mask();
        if !self.fits(offset, width) {
            guest_error!(
                "{name}: {width} write of {value:#x} at offset {offset:#x} beyond the registers"
            );
            return;
        }
        if self.narrow != Narrow::WholeRegister && offset % width.bytes() != 0 {
            guest_error!("{name}: unaligned {width} write of {value:#x} at {offset:#x} ignored");
            return;
        }
        // Truncations below keep the dword a register takes; the mask
        // above cleared anything wider than the access.
        match width {
            AccessWidth::Word => write32(offset, value as u32),
            AccessWidth::Double => {
                if self.wide == Wide::Halves {
                    guest_error!(
                        "{name}: 64-bit write at {offset:#x}; split into two 32-bit writes"
                    );
                }
                write32(offset, value as u32);
                if self.high_half_fits(offset) {
                    write32(offset + 4, (value >> 32) as u32);
                }
            }
            AccessWidth::Byte | AccessWidth::Half => match self.narrow {
                Narrow::WholeRegister => {
                    if offset % 4 != 0 {
                        guest_error!(
                            "{name}: {width} write at offset {offset:#x} inside a register writes the whole register"
                        );
                    }
                    write32(offset, value as u32);
                }
                Narrow::Refused | Narrow::Lanes => {
                    guest_error!("{name}: {width} write of {value:#x} at {offset:#x} ignored");
                }
            },
        }
    }
}

/// The bytes `[offset, offset + width)` from the dwords that hold them,
/// each dword read once.
fn lanes(offset: u64, width: AccessWidth, mut read32: impl FnMut(u64) -> u32) -> u64 {
    let mut value = 0u64;
    let mut cached: Option<(u64, u32)> = None;
    for i in 0..width.bytes() {
        let at = offset + i;
        let base = at & !3;
        let dword = match cached {
            Some((b, d)) if b == base => d,
            _ => {
                let d = read32(base);
                cached = Some((base, d));
                d
            }
        };
        value |= u64::from((dword >> (8 * (at & 3))) & 0xff) << (8 * i);
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use AccessWidth::{Byte, Double, Half, Word};

    /// Eight registers whose reads return `0x1000_0000 + offset`; writes
    /// are recorded.
    struct Regs {
        writes: RefCell<Vec<(u64, u32)>>,
        reads: RefCell<Vec<u64>>,
    }

    impl Regs {
        fn new() -> Self {
            Self {
                writes: RefCell::new(Vec::new()),
                reads: RefCell::new(Vec::new()),
            }
        }
        fn read(&self, file: RegisterFile, offset: u64, width: AccessWidth) -> u64 {
            file.read(offset, width, |o| {
                self.reads.borrow_mut().push(o);
                0x1000_0000 + o as u32
            })
        }
        fn write(&self, file: RegisterFile, offset: u64, width: AccessWidth, value: u64) {
            file.write(offset, width, value, |o, v| {
                self.writes.borrow_mut().push((o, v))
            });
        }
    }

    const PERMISSIVE: RegisterFile = RegisterFile {
        name: "test",
        size: 0x20,
        narrow: Narrow::WholeRegister,
        wide: Wide::Halves,
    };
    const STRICT: RegisterFile = RegisterFile {
        name: "test",
        size: 0x20,
        narrow: Narrow::Refused,
        wide: Wide::Split,
    };

    #[test]
    fn a_64_bit_access_is_two_32_bit_ones_low_first() {
        for file in [PERMISSIVE, STRICT] {
            let regs = Regs::new();
            assert_eq!(regs.read(file, 0x8, Double), 0x1000_000c_1000_0008);
            assert_eq!(*regs.reads.borrow(), [0x8, 0xc]);
            regs.write(file, 0x18, Double, 0x1122_3344_5566_7788);
            assert_eq!(
                *regs.writes.borrow(),
                [(0x18, 0x5566_7788), (0x1c, 0x1122_3344)]
            );
        }
    }

    #[test]
    fn nothing_beyond_the_block_reaches_the_device() {
        for file in [PERMISSIVE, STRICT] {
            let regs = Regs::new();
            assert_eq!(regs.read(file, 0x20, Word), 0);
            assert_eq!(regs.read(file, 0x20, Double), 0);
            assert_eq!(regs.read(file, u64::MAX - 3, Word), 0);
            assert_eq!(regs.read(file, u64::MAX, Double), 0);
            regs.write(file, 0x20, Byte, 1);
            regs.write(file, 0x20, Double, 1);
            regs.write(file, u64::MAX, Byte, 1);
            assert!(regs.reads.borrow().is_empty());
            assert!(regs.writes.borrow().is_empty());
        }
    }

    #[test]
    fn a_64_bit_access_across_the_end_is_half_or_nothing() {
        let regs = Regs::new();
        assert_eq!(regs.read(PERMISSIVE, 0x1c, Double), 0x1000_001c);
        regs.write(PERMISSIVE, 0x1c, Double, 0x1_0000_0002);
        assert_eq!(*regs.writes.borrow(), [(0x1c, 2)]);

        let regs = Regs::new();
        assert_eq!(regs.read(STRICT, 0x1c, Double), 0);
        regs.write(STRICT, 0x1c, Double, 1);
        assert!(regs.reads.borrow().is_empty());
        assert!(regs.writes.borrow().is_empty());
    }

    #[test]
    fn narrow_accesses_reach_the_whole_register_or_nothing() {
        let regs = Regs::new();
        assert_eq!(regs.read(PERMISSIVE, 0x4, Byte), 0x04);
        assert_eq!(regs.read(PERMISSIVE, 0x6, Half), 0x0006);
        regs.write(PERMISSIVE, 0x4, Byte, 0xabcd);
        regs.write(PERMISSIVE, 0x8, Half, 0x1_2345);
        assert_eq!(*regs.writes.borrow(), [(0x4, 0xcd), (0x8, 0x2345)]);

        let regs = Regs::new();
        assert_eq!(regs.read(STRICT, 0x4, Byte), 0);
        assert_eq!(regs.read(STRICT, 0x4, Half), 0);
        regs.write(STRICT, 0x4, Byte, 1);
        regs.write(STRICT, 0x4, Half, 1);
        assert!(regs.reads.borrow().is_empty());
        assert!(regs.writes.borrow().is_empty());
    }

    #[test]
    fn lanes_give_the_bytes_a_load_covers_and_refuse_narrow_stores() {
        let file = RegisterFile {
            narrow: Narrow::Lanes,
            ..STRICT
        };
        let regs = Regs::new();
        assert_eq!(regs.read(file, 0x5, Byte), 0x00);
        assert_eq!(regs.read(file, 0x4, Byte), 0x04);
        assert_eq!(regs.read(file, 0x7, Byte), 0x10);
        assert_eq!(regs.read(file, 0x6, Half), 0x1000);
        assert_eq!(regs.read(file, 0x2, Word), 0x0004_1000, "two dwords");
        assert_eq!(*regs.reads.borrow(), [0x4, 0x4, 0x4, 0x4, 0x0, 0x4]);
        assert_eq!(regs.read(file, 0x8, Double), 0x1000_000c_1000_0008);
        regs.write(file, 0x4, Byte, 1);
        regs.write(file, 0x2, Word, 1);
        assert!(regs.writes.borrow().is_empty());
        regs.write(file, 0x4, Word, 1);
        assert_eq!(*regs.writes.borrow(), [(0x4, 1)]);
    }

    #[test]
    fn strict_files_ignore_unaligned_accesses() {
        let regs = Regs::new();
        assert_eq!(regs.read(STRICT, 0x2, Word), 0);
        assert_eq!(regs.read(STRICT, 0x4, Double), 0);
        regs.write(STRICT, 0x2, Word, 1);
        regs.write(STRICT, 0x4, Double, 1);
        assert!(regs.reads.borrow().is_empty());
        assert!(regs.writes.borrow().is_empty());
    }

    #[test]
    fn a_word_store_takes_only_the_low_32_bits() {
        let regs = Regs::new();
        regs.write(STRICT, 0x0, Word, 0xffff_ffff_1234_5678);
        assert_eq!(*regs.writes.borrow(), [(0x0, 0x1234_5678)]);
    }
}
