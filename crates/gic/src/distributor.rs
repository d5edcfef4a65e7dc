//! The distributor (GICD_*, IHI 0069 §12.9): SPI configuration, routing and
//! the global group enables. With affinity routing always on (ARE = 1),
//! the banked registers for INTIDs 0-31 are RAZ/WI here and live in the
//! redistributors.

use vm_core::{guest_error, AccessWidth};

use crate::message;
use crate::registers::{self, array_register};
use crate::state::{State, IROUTER_MASK, PRIVATE_IRQS};

pub const CTLR: u64 = 0x0000;
pub const TYPER: u64 = 0x0004;
pub const IIDR: u64 = 0x0008;
pub const TYPER2: u64 = 0x000c;
pub const IROUTER: u64 = 0x6000;
const IROUTER_END: u64 = 0x7fe0;

const CTLR_ENABLE_GRP0: u32 = 1 << 0;
const CTLR_ENABLE_GRP1: u32 = 1 << 1;
const CTLR_ARE: u32 = 1 << 4;
const CTLR_DS: u32 = 1 << 6;

/// GICD_TYPER.IDbits: INTIDs are 10 bits wide (no LPIs).
const TYPER_IDBITS: u32 = 9 << 19;
/// GICD_TYPER.A3V: Aff3 is supported in affinity routing.
const TYPER_A3V: u32 = 1 << 24;

fn read32(state: &State, offset: u64) -> u32 {
    match offset {
        CTLR => {
            let mut v = CTLR_ARE | CTLR_DS;
            if state.enable_grp0 {
                v |= CTLR_ENABLE_GRP0;
            }
            if state.enable_grp1 {
                v |= CTLR_ENABLE_GRP1;
            }
            v
        }
        TYPER => {
            let mbis = if state.message_intids.is_empty() {
                0
            } else {
                message::TYPER_MBIS
            };
            (state.num_irqs() / 32 - 1) | TYPER_IDBITS | TYPER_A3V | mbis
        }
        IIDR => registers::IIDR,
        registers::ID_BASE.. => registers::id_register(offset),
        _ => match array_register(offset) {
            Some((kind, first)) if first >= PRIVATE_IRQS => {
                registers::read_array(state, 0, kind, first)
            }
            _ => 0,
        },
    }
}

fn write32(state: &mut State, offset: u64, value: u32) {
    match offset {
        CTLR => {
            state.enable_grp0 = value & CTLR_ENABLE_GRP0 != 0;
            state.enable_grp1 = value & CTLR_ENABLE_GRP1 != 0;
        }
        message::GICD_SETSPI_NSR | message::GICD_CLRSPI_NSR => {
            message::gicd_write(state, offset, value)
        }
        TYPER | IIDR | TYPER2 | registers::ID_BASE.. => {
            guest_error!("gic: write of {value:#x} to read-only GICD register {offset:#x}");
        }
        _ => match array_register(offset) {
            Some((kind, first)) if first >= PRIVATE_IRQS => {
                registers::write_array(state, 0, kind, first, value)
            }
            // The banked INTIDs 0-31 (ARE = 1), and IGRPMODR/NSACR/SGIR
            // with a single security state: RAZ/WI.
            _ => {}
        },
    }
}

fn irouter_index(state: &State, offset: u64) -> Option<usize> {
    let intid = ((offset - IROUTER) / 8) as u32;
    (intid >= PRIVATE_IRQS && intid < state.num_irqs()).then(|| (intid - PRIVATE_IRQS) as usize)
}

pub fn read(state: &State, offset: u64, width: AccessWidth) -> u64 {
    if (registers::IPRIORITYR..0x0800).contains(&offset) {
        let first = (offset - registers::IPRIORITYR) as u32;
        return if first >= PRIVATE_IRQS {
            registers::read_priorities(state, 0, first, width)
        } else {
            0
        };
    }
    if (IROUTER..IROUTER_END).contains(&offset) {
        let Some(index) = irouter_index(state, offset & !7) else {
            return 0;
        };
        let route = state.routes[index];
        return match (width, offset % 8) {
            (AccessWidth::Double, 0) => route,
            (AccessWidth::Word, 0) => route & 0xffff_ffff,
            (AccessWidth::Word, 4) => route >> 32,
            _ => 0,
        };
    }
    match registers::words(offset, width) {
        Some(offsets) => offsets
            .iter()
            .enumerate()
            .map(|(i, &o)| u64::from(read32(state, o)) << (32 * i))
            .fold(0, |acc, v| acc | v),
        None => {
            guest_error!("gic: {width} read of GICD offset {offset:#x}");
            0
        }
    }
}

pub fn write(state: &mut State, offset: u64, width: AccessWidth, value: u64) {
    if (registers::IPRIORITYR..0x0800).contains(&offset) {
        let first = (offset - registers::IPRIORITYR) as u32;
        if first >= PRIVATE_IRQS {
            registers::write_priorities(state, 0, first, width, value);
        }
        return;
    }
    if (IROUTER..IROUTER_END).contains(&offset) {
        let Some(index) = irouter_index(state, offset & !7) else {
            return;
        };
        let route = &mut state.routes[index];
        match (width, offset % 8) {
            (AccessWidth::Double, 0) => *route = value & IROUTER_MASK,
            (AccessWidth::Word, 0) => {
                *route = (*route & !0xffff_ffff) | (value & 0xffff_ffff & IROUTER_MASK)
            }
            (AccessWidth::Word, 4) => {
                *route = (*route & 0xffff_ffff) | ((value << 32) & IROUTER_MASK)
            }
            _ => guest_error!("gic: {width} write to GICD_IROUTER at {offset:#x}"),
        }
        return;
    }
    match registers::words(offset, width) {
        Some(offsets) => {
            for (i, o) in offsets.into_iter().enumerate() {
                write32(state, o, (value >> (32 * i)) as u32);
            }
        }
        None => guest_error!("gic: {width} write of {value:#x} to GICD offset {offset:#x}"),
    }
}
