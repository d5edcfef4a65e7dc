//! Turning fuzzer bytes into what a hostile guest does: the contents of a
//! small guest RAM and a sequence of MMIO accesses whose values often point
//! back into that RAM (so DMA descriptors and rings are reachable, not just
//! rejected).

use vm_core::memory::create_guest_memory;
use vm_core::{AccessWidth, GuestMemory};

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
pub fn guest_memory(input: &mut Input) -> GuestMemory {
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

/// The next access inside a region of `size` bytes; `registers` are
/// offsets worth hitting more often than a uniform draw would.
pub fn next_access(input: &mut Input, size: u64, registers: &[u64]) -> Option<Access> {
    if input.is_empty() {
        return None;
    }
    let kind = input.u8();
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
    Some(if kind & 8 != 0 {
        Access::Read { offset, width }
    } else {
        Access::Write {
            offset,
            width,
            value: value(input),
        }
    })
}

/// Replays up to [`MAX_ACCESSES`] accesses on `device`.
pub fn drive(
    input: &mut Input,
    device: &dyn vm_core::MmioDevice,
    size: u64,
    registers: &[u64],
) {
    for _ in 0..MAX_ACCESSES {
        match next_access(input, size, registers) {
            None => break,
            Some(Access::Read { offset, width }) => {
                device.read(offset, width);
            }
            Some(Access::Write {
                offset,
                width,
                value,
            }) => device.write(offset, width, value),
        }
    }
}
