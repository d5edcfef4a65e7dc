//! Message-signalled interrupts on the board (`--msi on`): the GIC's
//! message-based SPIs behind two doorbells, and the sink through which PCI
//! functions' MSI writes reach them.
//!
//! QEMU's vmapple has no MSI controller (vmapple-machine.md §7.5); newer
//! macOS guests look for a GICv2m frame at 0x1FFF_0000 with SPIs from 0x80
//! (newer-macos-guests.md §1), and Linux's GICv3 driver uses the
//! distributor's GICD_SETSPI_NSR when the device tree says so. Both
//! doorbells raise the same 128 SPIs.

use std::sync::Arc;

use gic::message::{Doorbells, GICD_SETSPI_NSR, V2M_MSI_SETSPI_NS};
use gic::GicV3;
use pci::MsiSink;

use crate::layout::{GICD_BASE, GIC_V2M_BASE};

/// Where a PCI function's MSI write lands: a doorbell of the GIC, or
/// nowhere. A function writes whatever address the guest programmed; a
/// write to any other address (RAM, another device) is dropped and
/// logged rather than performed, so a hostile table cannot make a device
/// scribble over memory behind the guest's back.
pub(crate) struct GicDoorbells(pub Arc<GicV3>);

/// The board's doorbells.
pub const DOORBELLS: Doorbells = Doorbells {
    v2m_base: GIC_V2M_BASE,
    gicd_base: GICD_BASE,
};
/// Their guest-physical addresses.
pub const V2M_DOORBELL: u64 = GIC_V2M_BASE + V2M_MSI_SETSPI_NS;
pub const GICD_DOORBELL: u64 = GICD_BASE + GICD_SETSPI_NSR;

impl MsiSink for GicDoorbells {
    fn send(&self, address: u64, data: u32) {
        if !DOORBELLS.deliver(&self.0, address, data) {
            vm_core::guest_error!(
                "msi: a PCI function wrote {data:#x} to {address:#x}, which is not an MSI \
                 doorbell; dropped"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Outputs(Mutex<Vec<(usize, bool)>>);

    impl gic::CpuInterruptOutputs for Outputs {
        fn set(&self, cpu: usize, irq: bool, _fiq: bool) {
            self.0.lock().unwrap().push((cpu, irq));
        }
    }

    #[test]
    fn only_the_two_doorbells_raise_message_spis() {
        let outputs = Arc::new(Outputs::default());
        let gic = GicV3::new(1, crate::layout::GIC_SPIS, outputs.clone());
        assert!(gic.enable_message_spis(crate::layout::SPI_MSI_BASE, crate::layout::MSI_SPIS));
        let dist = gic.distributor();
        // Linux's setup: groups on, INTID 0xA0 group 1, enabled; the CPU
        // interface unmasked.
        dist.write(0, vm_core::AccessWidth::Word, 0b11);
        dist.write(0x80 + 4 * 5, vm_core::AccessWidth::Word, 1);
        dist.write(0x100 + 4 * 5, vm_core::AccessWidth::Word, 1);
        assert!(gic.write_sysreg(0, arch_arm64::sysreg::ICC_PMR_EL1, 0xf0));
        assert!(gic.write_sysreg(0, arch_arm64::sysreg::ICC_IGRPEN1_EL1, 1));
        let sink = GicDoorbells(gic.clone());
        let irq = || outputs.0.lock().unwrap().last().copied();
        for bad in [
            0,
            GIC_V2M_BASE,
            V2M_DOORBELL + 4,
            GICD_DOORBELL + 8,
            0x7000_0000,
            u64::MAX,
        ] {
            sink.send(bad, 0xa0);
        }
        assert_ne!(irq(), Some((0, true)));
        sink.send(V2M_DOORBELL, 0xa0);
        assert_eq!(irq(), Some((0, true)));
        assert_eq!(
            gic.read_sysreg(0, arch_arm64::sysreg::ICC_IAR1_EL1),
            Some(0xa0)
        );
        assert!(gic.write_sysreg(0, arch_arm64::sysreg::ICC_EOIR1_EL1, 0xa0));
        sink.send(GICD_DOORBELL, 0xa0);
        assert_eq!(
            gic.read_sysreg(0, arch_arm64::sysreg::ICC_IAR1_EL1),
            Some(0xa0)
        );
    }
}
