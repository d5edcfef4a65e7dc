//! Turning fuzzer bytes into what a hostile guest does: the contents of a
//! small guest RAM and a sequence of MMIO accesses whose values often point
//! back into that RAM (so DMA descriptors and rings are reachable, not just
//! rejected).

use vm_core::memory::create_guest_memory;
use vm_core::{AccessWidth, GuestRam};

/// Where the fuzz RAM lives, and how big it is: small so that guest
/// pointers built from fuzz bytes land in it often.
pub const RAM_BASE: u64 = 0x7000_0000;
pub const RAM_SIZE: u64 = 0x10_0000;
/// Bytes of input copied to the start of RAM before the accesses run.
pub const RAM_SEED_LEN: usize = 4096;
/// Accesses per input at most, so every input finishes quickly.
pub const MAX_ACCESSES: usize = 256;

/// A cursor over the input; reads past the end give zeros.
pub struct Input<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Input<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, pos: 0 }
    }

    pub fn is_empty(&self) -> bool {
        self.pos >= self.bytes.len()
    }

    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let start = self.pos.min(self.bytes.len());
        let end = self.pos.saturating_add(n).min(self.bytes.len());
        self.pos = end;
        &self.bytes[start..end]
    }

    fn le(&mut self, n: usize) -> u64 {
        self.take(n)
            .iter()
            .rev()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
    }

    pub fn u8(&mut self) -> u8 {
        self.le(1) as u8
    }

    pub fn u16(&mut self) -> u16 {
        self.le(2) as u16
    }

    pub fn u32(&mut self) -> u32 {
        self.le(4) as u32
    }

    pub fn u64(&mut self) -> u64 {
        self.le(8)
    }
}

/// One guest access.
#[derive(Clone, Copy, Debug)]
pub enum Access {
    Read {
        offset: u64,
        width: AccessWidth,
    },
    Write {
        offset: u64,
        width: AccessWidth,
        value: u64,
    },
}

/// Builds the fuzz RAM, seeded from the input.
pub fn guest_memory(input: &mut Input) -> GuestRam {
    let mem = create_guest_memory(&[(RAM_BASE, RAM_SIZE as usize)]).expect("1 MiB of RAM");
    let seed = input.take(RAM_SEED_LEN);
    vm_core::memory::write_all(&mem, RAM_BASE, seed).expect("seed fits in RAM");
    mem
}

/// A value a guest might store: raw bits, a pointer into RAM, or a small
/// number (lengths, indices, command words' low bits).
pub fn value(input: &mut Input) -> u64 {
    match input.u8() % 4 {
        0 => input.u64(),
        1 => RAM_BASE + u64::from(input.u32()) % RAM_SIZE,
        2 => u64::from(input.u8()),
        _ => u64::from(input.u32()),
    }
}

/// One step of a guest: an access, or (first byte `0xF?`) something
/// else the target decodes itself (host input, time passing, a reset).
#[derive(Clone, Copy, Debug)]
pub enum Op {
    Access(Access),
    Extra,
}

/// Marks an [`Op::Extra`]: the upper nibble of the op's first byte.
pub const EXTRA: u8 = 0xF0;

/// The next op inside a region of `size` bytes; `registers` are offsets
/// worth hitting more often than a uniform draw would.
pub fn next_op(input: &mut Input, size: u64, registers: &[u64]) -> Option<Op> {
    if input.is_empty() {
        return None;
    }
    let kind = input.u8();
    if kind & 0xF0 == EXTRA {
        return Some(Op::Extra);
    }
    let width = match kind & 3 {
        0 => AccessWidth::Byte,
        1 => AccessWidth::Half,
        2 => AccessWidth::Word,
        _ => AccessWidth::Double,
    };
    let offset = if kind & 4 != 0 && !registers.is_empty() {
        registers[usize::from(input.u8()) % registers.len()]
    } else {
        u64::from(input.u32()) % size.max(1)
    };
    Some(Op::Access(if kind & 8 != 0 {
        Access::Read { offset, width }
    } else {
        Access::Write {
            offset,
            width,
            value: value(input),
        }
    }))
}

/// Runs up to [`MAX_ACCESSES`] ops: accesses go to `device`, are then
/// passed to `after` with what a read returned, and extras go to `extra`.
/// Panics if a read returns bits above its width: callers rely on the
/// value being what the guest register would hold.
pub fn drive_with(
    input: &mut Input,
    device: &dyn vm_core::MmioDevice,
    size: u64,
    registers: &[u64],
    mut extra: impl FnMut(&mut Input),
    mut after: impl FnMut(Access, Option<u64>),
) -> u64 {
    let mut ops = 0;
    while ops < MAX_ACCESSES as u64 {
        let Some(op) = next_op(input, size, registers) else {
            break;
        };
        ops += 1;
        match op {
            Op::Extra => extra(input),
            Op::Access(a @ Access::Read { offset, width }) => {
                let v = device.read(offset, width);
                assert_eq!(
                    v & !width.mask(),
                    0,
                    "{width} read at {offset:#x} returned {v:#x}"
                );
                after(a, Some(v));
            }
            Op::Access(
                a @ Access::Write {
                    offset,
                    width,
                    value,
                },
            ) => {
                device.write(offset, width, value);
                after(a, None);
            }
        }
    }
    ops
}

/// Replays up to [`MAX_ACCESSES`] accesses on `device`, extras ignored.
pub fn drive(input: &mut Input, device: &dyn vm_core::MmioDevice, size: u64, registers: &[u64]) {
    drive_with(input, device, size, registers, |_| {}, |_, _| {});
}

/// Builds inputs in the format the targets decode, for hand-written seeds.
#[derive(Clone, Debug)]
pub struct Encoder {
    bytes: Vec<u8>,
}

impl Default for Encoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Encoder {
    /// An input whose RAM seed is all zeros and that has no ops yet.
    pub fn new() -> Self {
        Self {
            bytes: vec![0; RAM_SEED_LEN],
        }
    }

    /// Places `bytes` in the RAM seed at guest address `addr`.
    pub fn ram(&mut self, addr: u64, bytes: &[u8]) -> &mut Self {
        let at = usize::try_from(addr - RAM_BASE).expect("seed address in RAM");
        self.bytes[at..at + bytes.len()].copy_from_slice(bytes);
        self
    }

    /// Appends raw bytes (an extra op's operands, a target's own format).
    pub fn raw(&mut self, bytes: &[u8]) -> &mut Self {
        self.bytes.extend_from_slice(bytes);
        self
    }

    fn kind(width: AccessWidth, read: bool) -> u8 {
        let w = match width {
            AccessWidth::Byte => 0,
            AccessWidth::Half => 1,
            AccessWidth::Word => 2,
            AccessWidth::Double => 3,
        };
        w | if read { 8 } else { 0 }
    }

    /// A store of `value` at `offset` (which must be below the region size).
    pub fn write(&mut self, offset: u64, width: AccessWidth, value: u64) -> &mut Self {
        self.bytes.push(Self::kind(width, false));
        self.bytes
            .extend_from_slice(&u32::try_from(offset).expect("offset").to_le_bytes());
        self.bytes.push(0);
        self.bytes.extend_from_slice(&value.to_le_bytes());
        self
    }

    /// A 32-bit store.
    pub fn w32(&mut self, offset: u64, value: u32) -> &mut Self {
        self.write(offset, AccessWidth::Word, u64::from(value))
    }

    /// A load at `offset`.
    pub fn read(&mut self, offset: u64, width: AccessWidth) -> &mut Self {
        self.bytes.push(Self::kind(width, true));
        self.bytes
            .extend_from_slice(&u32::try_from(offset).expect("offset").to_le_bytes());
        self
    }

    /// An [`Op::Extra`] followed by its operands.
    pub fn extra(&mut self, operands: &[u8]) -> &mut Self {
        self.bytes.push(EXTRA);
        self.raw(operands)
    }

    pub fn finish(&self) -> Vec<u8> {
        self.bytes.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoder_round_trips_through_the_decoder() {
        let mut e = Encoder::new();
        e.ram(RAM_BASE + 8, &[1, 2, 3])
            .write(0x40, AccessWidth::Word, 0xdead_beef)
            .read(0x10, AccessWidth::Double)
            .extra(&[7]);
        let bytes = e.finish();
        let mut input = Input::new(&bytes);
        let mem = guest_memory(&mut input);
        let mut b = [0u8; 3];
        vm_core::memory::read_exact(&mem, RAM_BASE + 8, &mut b).unwrap();
        assert_eq!(b, [1, 2, 3]);
        assert!(matches!(
            next_op(&mut input, 0x100, &[]),
            Some(Op::Access(Access::Write {
                offset: 0x40,
                width: AccessWidth::Word,
                value: 0xdead_beef
            }))
        ));
        assert!(matches!(
            next_op(&mut input, 0x100, &[]),
            Some(Op::Access(Access::Read {
                offset: 0x10,
                width: AccessWidth::Double
            }))
        ));
        assert!(matches!(next_op(&mut input, 0x100, &[]), Some(Op::Extra)));
        assert_eq!(input.u8(), 7);
        assert!(next_op(&mut input, 0x100, &[]).is_none());
    }
}
