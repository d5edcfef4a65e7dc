//! Message-based SPIs: interrupts a PCI function raises by writing an
//! INTID to a doorbell instead of driving a line.
//!
//! Two doorbells reach the same SPIs, because the guests this machine runs
//! look for different ones:
//!
//! * the distributor's **GICD_SETSPI_NSR / GICD_CLRSPI_NSR** (IHI 0069
//!   §12.9.20, §12.9.4), advertised by GICD_TYPER.MBIS, which Linux's
//!   GICv3 driver uses when the device tree gives the GIC node
//!   `msi-controller` and `mbi-ranges`;
//! * a **GICv2m MSI frame** (Arm's GICv2m architecture: `MSI_TYPER` at
//!   0x008, `MSI_SETSPI_NS` at 0x040, `MSI_IIDR` at 0xFCC, identification
//!   registers from 0xFD0), which newer macOS guests look for at
//!   0x1FFF_0000 on the vmapple board.
//!
//! # Model
//!
//! * The message range is a block of SPIs the board sets once
//!   ([`GicV3::enable_message_spis`]); outside it no doorbell does
//!   anything. A write naming an INTID outside the range is ignored and
//!   logged (rate-limited): a hostile or confused guest cannot raise the
//!   UART's or a PCI line's interrupt through a doorbell.
//! * A doorbell write is an edge: it sets the SPI's pending latch, and the
//!   acknowledge clears it, whatever the SPI's ICFGR says (drivers set
//!   these edge-triggered anyway). GICD_CLRSPI_NSR clears the latch.
//! * Doorbells are write-only: loads read 0. Only the INTID field of the
//!   written value counts (bits 9:0 for the v2m frame, 12:0 for the
//!   distributor), as in hardware.
//! * The v2m frame answers loads of any width and alignment (a guest reads
//!   it with `ldp`), and takes 32- and 64-bit stores; a 64-bit store at
//!   `MSI_SETSPI_NS` is the doorbell (low word) plus the reserved word
//!   above it.

use std::ops::Range;
use std::sync::Arc;

use vm_core::regs::{Narrow, RegisterFile, Wide};
use vm_core::{guest_error, AccessWidth, MmioDevice};

use crate::state::{State, PRIVATE_IRQS};
use crate::GicV3;

/// Distributor doorbells (offsets in the GICD frame).
pub const GICD_SETSPI_NSR: u64 = 0x0040;
pub const GICD_CLRSPI_NSR: u64 = 0x0048;
/// GICD_TYPER.MBIS: message-based SPIs are supported.
pub const TYPER_MBIS: u32 = 1 << 16;
/// The INTID field of GICD_SETSPI_NSR/CLRSPI_NSR.
const GICD_INTID_MASK: u32 = 0x1fff;

/// Registers of a GICv2m MSI frame.
pub const V2M_MSI_TYPER: u64 = 0x008;
pub const V2M_MSI_SETSPI_NS: u64 = 0x040;
pub const V2M_MSI_IIDR: u64 = 0xfcc;
/// First identification register (PIDR4); PIDR4-7, PIDR0-3, CIDR0-3
/// follow, one byte in each word.
pub const V2M_ID_BASE: u64 = 0xfd0;
/// Bytes of one frame.
pub const V2M_FRAME_SIZE: u64 = 0x1000;
/// MSI_TYPER fields: bits 25:16 the first INTID, bits 9:0 the count.
pub const V2M_TYPER_BASE_SHIFT: u32 = 16;
const V2M_FIELD_MASK: u32 = 0x3ff;
/// MSI_IIDR: implementer Arm (JEP106 0x43B), product 0, revision 0.
pub const V2M_IIDR: u32 = 0x0000_043b;
/// PIDR4-7, PIDR0-3, CIDR0-3: an Arm part (JEP106 continuation 4,
/// identity 0x3B) of class 0xF (CoreLink), the CIDR preamble every
/// CoreSight/PrimeCell component reads.
pub const V2M_ID_VALUES: [u8; 12] = [0x04, 0, 0, 0, 0, 0xb0, 0x1b, 0, 0x0d, 0xf0, 0x05, 0xb1];

/// What a doorbell does to its SPI.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Doorbell {
    Set,
    Clear,
}

/// Applies a doorbell write naming `intid`; returns the CPU the SPI is
/// routed to (whose outputs may have changed), or `None` when the write
/// did nothing.
pub(crate) fn ring(state: &mut State, intid: u32, doorbell: Doorbell, via: &str) -> Option<usize> {
    if !state.message_intids.contains(&intid) {
        guest_error!(
            "gic: {via} write of INTID {intid} outside the message SPIs {:?}; ignored",
            state.message_intids
        );
        return None;
    }
    let irq = state.irq_mut(0, intid)?;
    irq.pending_latch = doorbell == Doorbell::Set;
    state.spi_target((intid - PRIVATE_IRQS) as usize)
}

/// A distributor store to a doorbell register.
pub(crate) fn gicd_write(state: &mut State, offset: u64, value: u32) {
    let doorbell = if offset == GICD_SETSPI_NSR {
        Doorbell::Set
    } else {
        Doorbell::Clear
    };
    if state.message_intids.is_empty() {
        guest_error!("gic: GICD doorbell {offset:#x} written without message-based SPIs");
        return;
    }
    ring(
        state,
        value & GICD_INTID_MASK,
        doorbell,
        if doorbell == Doorbell::Set {
            "GICD_SETSPI_NSR"
        } else {
            "GICD_CLRSPI_NSR"
        },
    );
}

/// Where the board put the two doorbells, to tell an MSI write's
/// address apart: what a PCI function's message does on arriving.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Doorbells {
    /// Guest-physical base of the GICv2m frame.
    pub v2m_base: u64,
    /// Guest-physical base of the distributor.
    pub gicd_base: u64,
}

impl Doorbells {
    /// A 32-bit memory write of `data` to `address` by a device: raises
    /// the message SPI it names when `address` is one of the doorbells
    /// (`true`). Any other address is not the GIC's (`false`).
    pub fn deliver(&self, gic: &GicV3, address: u64, data: u32) -> bool {
        let v2m = self.v2m_base.checked_add(V2M_MSI_SETSPI_NS);
        let gicd = self.gicd_base.checked_add(GICD_SETSPI_NSR);
        if Some(address) == v2m {
            gic.signal_message(data & V2M_FIELD_MASK);
        } else if Some(address) == gicd {
            gic.signal_message(data & GICD_INTID_MASK);
        } else {
            return false;
        }
        true
    }
}

/// MSI_TYPER for a message range.
pub fn v2m_typer(intids: &Range<u32>) -> u32 {
    let count = intids.end.saturating_sub(intids.start);
    (intids.start & V2M_FIELD_MASK) << V2M_TYPER_BASE_SHIFT | (count & V2M_FIELD_MASK)
}

fn v2m_register(intids: &Range<u32>, offset: u64) -> u32 {
    match offset {
        V2M_MSI_TYPER => v2m_typer(intids),
        V2M_MSI_IIDR => V2M_IIDR,
        V2M_ID_BASE.. => {
            let index = ((offset - V2M_ID_BASE) / 4) as usize;
            u32::from(*V2M_ID_VALUES.get(index).unwrap_or(&0))
        }
        _ => 0,
    }
}

const V2M_REGISTERS: RegisterFile<'static> = RegisterFile {
    name: "gicv2m",
    size: V2M_FRAME_SIZE,
    narrow: Narrow::Lanes,
    wide: Wide::Split,
};

/// The GICv2m MSI frame as a bus device.
pub(crate) struct V2mFrame(pub Arc<GicV3>);

impl MmioDevice for V2mFrame {
    fn read(&self, offset: u64, width: AccessWidth) -> u64 {
        let intids = self.0.lock().message_intids.clone();
        V2M_REGISTERS.read(offset, width, |at| v2m_register(&intids, at))
    }

    fn write(&self, offset: u64, width: AccessWidth, value: u64) {
        let mut state = self.0.lock();
        let mut target = None;
        V2M_REGISTERS.write(offset, width, value, |at, v| {
            if at == V2M_MSI_SETSPI_NS {
                target = ring(
                    &mut state,
                    v & V2M_FIELD_MASK,
                    Doorbell::Set,
                    "MSI_SETSPI_NS",
                );
            } else {
                guest_error!("gicv2m: write of {v:#x} to read-only offset {at:#x}");
            }
        });
        if let Some(cpu) = target {
            self.0.update(&state, cpu);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typer_names_the_first_intid_and_the_count() {
        // SPI 0x80 is INTID 0xA0; 128 of them.
        assert_eq!(v2m_typer(&(0xa0..0x120)), 0x00a0_0080);
        assert_eq!(v2m_typer(&(0..0)), 0);
    }
}
