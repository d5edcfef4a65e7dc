//! Register encodings shared by the distributor and the redistributors'
//! SGI frames: one bit, two bits or one byte per interrupt (IHI 0069
//! §12.9 and §12.11, e.g. `GICD_ISENABLER<n>` and GICR_ISENABLER0).

use vm_core::AccessWidth;

use crate::state::{State, PRIORITY_MASK};

/// Offsets of the per-interrupt register arrays inside a frame.
pub const IGROUPR: u64 = 0x0080;
pub const ISENABLER: u64 = 0x0100;
pub const ICENABLER: u64 = 0x0180;
pub const ISPENDR: u64 = 0x0200;
pub const ICPENDR: u64 = 0x0280;
pub const ISACTIVER: u64 = 0x0300;
pub const ICACTIVER: u64 = 0x0380;
pub const IPRIORITYR: u64 = 0x0400;
pub const ICFGR: u64 = 0x0c00;

/// Identification registers (PIDR4-7, PIDR0-3, CIDR0-3 from 0xFFD0), the
/// values of an Arm GICv3 with ArchRev = 3 in PIDR2.
pub const ID_BASE: u64 = 0xffd0;
pub const ID_VALUES: [u8; 12] = [0x44, 0, 0, 0, 0x92, 0xb4, 0x3b, 0, 0x0d, 0xf0, 0x05, 0xb1];

/// GICD_IIDR/GICR_IIDR: implementer Arm (0x43B), revision and product 0.
pub const IIDR: u32 = 0x0000_043b;

pub fn id_register(offset: u64) -> u32 {
    let index = (offset - ID_BASE) / 4;
    if offset % 4 == 0 {
        u32::from(*ID_VALUES.get(index as usize).unwrap_or(&0))
    } else {
        0
    }
}

/// What one 32-bit register of a per-interrupt array does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArrayReg {
    Group,
    SetEnable,
    ClearEnable,
    SetPending,
    ClearPending,
    SetActive,
    ClearActive,
    /// Two bits per interrupt.
    Config,
}

/// Classifies `offset` as a register of a per-interrupt array; returns its
/// kind and the first INTID it covers.
pub fn array_register(offset: u64) -> Option<(ArrayReg, u32)> {
    let (kind, base, bits) = match offset {
        0x0080..=0x00fc => (ArrayReg::Group, IGROUPR, 1),
        0x0100..=0x017c => (ArrayReg::SetEnable, ISENABLER, 1),
        0x0180..=0x01fc => (ArrayReg::ClearEnable, ICENABLER, 1),
        0x0200..=0x027c => (ArrayReg::SetPending, ISPENDR, 1),
        0x0280..=0x02fc => (ArrayReg::ClearPending, ICPENDR, 1),
        0x0300..=0x037c => (ArrayReg::SetActive, ISACTIVER, 1),
        0x0380..=0x03fc => (ArrayReg::ClearActive, ICACTIVER, 1),
        0x0c00..=0x0cfc => (ArrayReg::Config, ICFGR, 2),
        _ => return None,
    };
    let first_intid = ((offset - base) / 4) as u32 * (32 / bits);
    Some((kind, first_intid))
}

/// Reads a 32-bit array register covering `first..` as seen by `cpu`.
pub fn read_array(state: &State, cpu: usize, kind: ArrayReg, first: u32) -> u32 {
    let per_irq = if kind == ArrayReg::Config { 2 } else { 1 };
    let mut value = 0u32;
    for i in 0..32 / per_irq {
        let Some(irq) = state.irq(cpu, first + i) else {
            break;
        };
        let bits = match kind {
            ArrayReg::Group => u32::from(irq.group1),
            ArrayReg::SetEnable | ArrayReg::ClearEnable => u32::from(irq.enabled),
            ArrayReg::SetPending | ArrayReg::ClearPending => u32::from(irq.pending()),
            ArrayReg::SetActive | ArrayReg::ClearActive => u32::from(irq.active),
            ArrayReg::Config => u32::from(irq.edge) << 1,
        };
        value |= bits << (i * per_irq);
    }
    value
}

/// Writes a 32-bit array register covering `first..` as seen by `cpu`.
pub fn write_array(state: &mut State, cpu: usize, kind: ArrayReg, first: u32, value: u32) {
    let per_irq = if kind == ArrayReg::Config { 2 } else { 1 };
    for i in 0..32 / per_irq {
        let intid = first + i;
        let bits = (value >> (i * per_irq)) & ((1 << per_irq) - 1);
        let Some(irq) = state.irq_mut(cpu, intid) else {
            break;
        };
        match kind {
            ArrayReg::Group => irq.group1 = bits != 0,
            ArrayReg::SetEnable if bits != 0 => irq.enabled = true,
            ArrayReg::ClearEnable if bits != 0 => irq.enabled = false,
            ArrayReg::SetPending if bits != 0 => irq.pending_latch = true,
            // Clears the latch; a level interrupt whose line is high stays
            // pending, as the architecture says.
            ArrayReg::ClearPending if bits != 0 => irq.pending_latch = false,
            ArrayReg::SetActive if bits != 0 => irq.active = true,
            ArrayReg::ClearActive if bits != 0 => irq.active = false,
            // SGIs are always edge-triggered (their ICFGR bits are RO).
            ArrayReg::Config if intid >= 16 => irq.edge = bits & 0b10 != 0,
            _ => {}
        }
    }
}

/// Reads priority bytes starting at INTID `first`, `width` of them.
pub fn read_priorities(state: &State, cpu: usize, first: u32, width: AccessWidth) -> u64 {
    (0..width.bytes() as u32)
        .map(|i| {
            state
                .irq(cpu, first + i)
                .map_or(0, |irq| u64::from(irq.priority & PRIORITY_MASK))
                << (8 * i)
        })
        .fold(0, |acc, b| acc | b)
}

pub fn write_priorities(state: &mut State, cpu: usize, first: u32, width: AccessWidth, value: u64) {
    for i in 0..width.bytes() as u32 {
        if let Some(irq) = state.irq_mut(cpu, first + i) {
            irq.priority = (value >> (8 * i)) as u8 & PRIORITY_MASK;
        }
    }
}

/// Splits an access into the 32-bit registers it covers: a 64-bit access
/// to word registers reads or writes two of them (low word first).
pub fn words(offset: u64, width: AccessWidth) -> Option<Vec<u64>> {
    match width {
        AccessWidth::Word => Some(vec![offset]),
        AccessWidth::Double => Some(vec![offset, offset + 4]),
        _ => None,
    }
}
