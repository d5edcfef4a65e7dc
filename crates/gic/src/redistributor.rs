//! The redistributors (GICR_*, IHI 0069 §12.10-12.11): one 128 KiB pair of
//! frames per CPU in CPU order, RD_base (identity, power handshake) then
//! SGI_base (the banked SGIs and PPIs). Frames past the last CPU are
//! RAZ/WI. No LPIs: PROPBASER/PENDBASER are RAZ/WI.

use vm_core::{guest_error, AccessWidth};

use crate::registers::{self, array_register};
use crate::state::{State, PRIVATE_IRQS};

pub const FRAME_STRIDE: u64 = 0x2_0000;
pub const SGI_FRAME: u64 = 0x1_0000;

pub const IIDR: u64 = 0x0004;
pub const TYPER: u64 = 0x0008;
pub const WAKER: u64 = 0x0014;

const WAKER_PROCESSOR_SLEEP: u32 = 1 << 1;
const WAKER_CHILDREN_ASLEEP: u32 = 1 << 2;
const TYPER_LAST: u64 = 1 << 4;

fn typer(state: &State, cpu: usize) -> u64 {
    let mut v = (state.cpus[cpu].affinity_value() << 32) | ((cpu as u64) << 8);
    if cpu + 1 == state.cpus.len() {
        v |= TYPER_LAST;
    }
    v
}

fn rd_read32(state: &State, cpu: usize, offset: u64) -> u32 {
    match offset {
        IIDR => registers::IIDR,
        TYPER => typer(state, cpu) as u32,
        0x000c => (typer(state, cpu) >> 32) as u32,
        // The redistributor reports its children asleep exactly when the
        // processor is marked asleep: there is nothing to wait for.
        WAKER if state.cpus[cpu].processor_sleep => WAKER_PROCESSOR_SLEEP | WAKER_CHILDREN_ASLEEP,
        WAKER => 0,
        registers::ID_BASE.. => registers::id_register(offset),
        _ => 0,
    }
}

fn rd_write32(state: &mut State, cpu: usize, offset: u64, value: u32) {
    match offset {
        WAKER => state.cpus[cpu].processor_sleep = value & WAKER_PROCESSOR_SLEEP != 0,
        IIDR | TYPER | 0x000c | registers::ID_BASE.. => {
            guest_error!(
                "gic: write of {value:#x} to read-only GICR register {offset:#x} (CPU {cpu})"
            )
        }
        _ => {}
    }
}

fn sgi_read32(state: &State, cpu: usize, offset: u64) -> u32 {
    match array_register(offset) {
        Some((kind, first)) if first < PRIVATE_IRQS => {
            registers::read_array(state, cpu, kind, first)
        }
        _ => 0,
    }
}

fn sgi_write32(state: &mut State, cpu: usize, offset: u64, value: u32) {
    if let Some((kind, first)) = array_register(offset).filter(|&(_, first)| first < PRIVATE_IRQS) {
        registers::write_array(state, cpu, kind, first, value);
    }
}

/// `(cpu, frame offset, in SGI frame)` of a region offset, if a CPU has it.
fn locate(state: &State, offset: u64) -> Option<(usize, u64, bool)> {
    let cpu = (offset / FRAME_STRIDE) as usize;
    if cpu >= state.cpus.len() {
        return None;
    }
    let within = offset % FRAME_STRIDE;
    Some(if within >= SGI_FRAME {
        (cpu, within - SGI_FRAME, true)
    } else {
        (cpu, within, false)
    })
}

pub fn read(state: &State, offset: u64, width: AccessWidth) -> u64 {
    let Some((cpu, offset, sgi)) = locate(state, offset) else {
        return 0;
    };
    if sgi && (registers::IPRIORITYR..registers::IPRIORITYR + 32).contains(&offset) {
        let first = (offset - registers::IPRIORITYR) as u32;
        return registers::read_priorities(state, cpu, first, width);
    }
    if !sgi && offset == TYPER && width == AccessWidth::Double {
        return typer(state, cpu);
    }
    match registers::words(offset, width) {
        Some(offsets) => offsets
            .iter()
            .enumerate()
            .map(|(i, &o)| {
                let v = if sgi {
                    sgi_read32(state, cpu, o)
                } else {
                    rd_read32(state, cpu, o)
                };
                u64::from(v) << (32 * i)
            })
            .fold(0, |acc, v| acc | v),
        None => {
            guest_error!("gic: {width} read of GICR offset {offset:#x} (CPU {cpu})");
            0
        }
    }
}

/// Returns the CPU whose state the write may have changed.
pub fn write(state: &mut State, offset: u64, width: AccessWidth, value: u64) -> Option<usize> {
    let (cpu, offset, sgi) = locate(state, offset)?;
    if sgi && (registers::IPRIORITYR..registers::IPRIORITYR + 32).contains(&offset) {
        let first = (offset - registers::IPRIORITYR) as u32;
        registers::write_priorities(state, cpu, first, width, value);
        return Some(cpu);
    }
    match registers::words(offset, width) {
        Some(offsets) => {
            for (i, o) in offsets.into_iter().enumerate() {
                let v = (value >> (32 * i)) as u32;
                if sgi {
                    sgi_write32(state, cpu, o, v);
                } else {
                    rd_write32(state, cpu, o, v);
                }
            }
        }
        None => {
            guest_error!("gic: {width} write of {value:#x} to GICR offset {offset:#x} (CPU {cpu})")
        }
    }
    Some(cpu)
}
