//! `apple-gfx-mmio`'s two register windows as bus devices (apple-gfx.md §5,
//! §7; placement from vmapple-machine.md §2, §3, §15).
//!
//! * **GFX** ([`GfxWindow`]) at `0x3020_0000`: a 64 KiB slot of which the
//!   device decodes the framework's `mmioLength` bytes; every access is
//!   forwarded to `mmioReadAtOffset:` / `mmioWriteAtOffset:value:`.
//!   Interrupt: SPI 0x11.
//! * **IOSFC** ([`IosfcWindow`]) at `0x3021_0000`, exactly 64 KiB, forwarded
//!   the same way to the private IOSurface host device. Interrupt: SPI 0x10.
//!
//! Access rules, both windows: little-endian; 32-bit accesses go through as
//! they are; a 64-bit access becomes two 32-bit ones, lower address first
//! (for IOSFC QEMU instead passes it as one call and loses the upper half —
//! the spec recommends splitting); 8- and 16-bit accesses never reach the
//! framework (QEMU's memory core rejects them): reads return 0, writes are
//! ignored, both logged as guest errors. Offsets past the decoded size read
//! 0 and ignore writes.
//!
//! No lock is held while forwarding: the framework may call back into the
//! core before the access returns (see [`crate::device`]).

use vm_core::regs::{Narrow, RegisterFile, Wide};
use vm_core::{AccessWidth, MmioDevice};

use crate::device::AppleGfx;

/// Guest physical base of the GFX window on vmapple.
pub const GFX_BASE: u64 = 0x3020_0000;
/// Address-map slot reserved for the GFX window.
pub const GFX_SLOT_SIZE: u64 = 0x1_0000;
/// Guest physical base of the IOSFC window on vmapple.
pub const IOSFC_BASE: u64 = 0x3021_0000;
/// Size of the IOSFC window.
pub const IOSFC_SIZE: u64 = 0x1_0000;
/// GIC SPI of the GFX interrupt (INTID 49).
pub const GFX_SPI: u32 = 0x11;
/// GIC SPI of the IOSFC interrupt (INTID 48).
pub const IOSFC_SPI: u32 = 0x10;

/// A window of the framework's 32-bit registers: aligned 32- and 64-bit
/// accesses (a 64-bit one as two, low dword first) inside `size`; anything
/// else is ignored. Shared with the PCI variant's BAR0, which follows the
/// same rules.
pub(crate) fn registers(name: &str, size: u64) -> RegisterFile<'_> {
    RegisterFile {
        name,
        size,
        narrow: Narrow::Refused,
        wide: Wide::Split,
    }
}

/// The main register window.
#[derive(Clone)]
pub struct GfxWindow {
    core: AppleGfx,
}

impl GfxWindow {
    pub fn new(core: AppleGfx) -> Self {
        Self { core }
    }

    /// Bytes the window decodes (map this many at [`GFX_BASE`]).
    pub fn size(&self) -> u64 {
        self.core.mmio_length().min(GFX_SLOT_SIZE)
    }
}

impl MmioDevice for GfxWindow {
    fn read(&self, offset: u64, width: AccessWidth) -> u64 {
        registers("apple-gfx gfx", self.size()).read(offset, width, |o| self.core.read_register(o))
    }

    fn write(&self, offset: u64, width: AccessWidth, value: u64) {
        registers("apple-gfx gfx", self.size())
            .write(offset, width, value, |o, v| self.core.write_register(o, v))
    }
}

/// The IOSurface host device's window.
#[derive(Clone)]
pub struct IosfcWindow {
    core: AppleGfx,
}

impl IosfcWindow {
    pub fn new(core: AppleGfx) -> Self {
        Self { core }
    }

    pub fn size(&self) -> u64 {
        IOSFC_SIZE
    }
}

impl MmioDevice for IosfcWindow {
    fn read(&self, offset: u64, width: AccessWidth) -> u64 {
        registers("apple-gfx iosfc", IOSFC_SIZE).read(offset, width, |o| self.core.iosfc_read(o))
    }

    fn write(&self, offset: u64, width: AccessWidth, value: u64) {
        registers("apple-gfx iosfc", IOSFC_SIZE)
            .write(offset, width, value, |o, v| self.core.iosfc_write(o, v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::Harness;
    use std::sync::Arc;
    use vm_core::MmioBus;

    #[test]
    fn gfx_window_forwards_words_and_splits_doubles() {
        let h = Harness::mmio();
        let w = GfxWindow::new(h.gfx.clone());
        assert_eq!(w.size(), crate::fake::FAKE_MMIO_LENGTH);
        w.write(0x10, AccessWidth::Word, 0xdead_beef);
        assert_eq!(w.read(0x10, AccessWidth::Word), 0xdead_beef);
        w.write(0x20, AccessWidth::Double, 0x1122_3344_5566_7788);
        assert_eq!(h.fake.register(0x20), Some(0x5566_7788));
        assert_eq!(h.fake.register(0x24), Some(0x1122_3344));
        assert_eq!(w.read(0x20, AccessWidth::Double), 0x1122_3344_5566_7788);
        // Lower address first.
        let log = h.fake.access_log();
        let tail = &log[log.len() - 2..];
        assert_eq!((tail[0].offset, tail[1].offset), (0x20, 0x24));
        assert!(!tail[0].write && !tail[1].write);
    }

    #[test]
    fn narrow_and_out_of_window_accesses_never_reach_the_framework() {
        let h = Harness::mmio();
        let w = GfxWindow::new(h.gfx.clone());
        let before = h.fake.access_log().len();
        w.write(0x10, AccessWidth::Byte, 0xff);
        w.write(0x10, AccessWidth::Half, 0xffff);
        assert_eq!(w.read(0x10, AccessWidth::Byte), 0);
        assert_eq!(w.read(0x10, AccessWidth::Half), 0);
        let end = w.size();
        w.write(end, AccessWidth::Word, 1);
        w.write(end - 4, AccessWidth::Double, 1);
        assert_eq!(w.read(u64::MAX - 3, AccessWidth::Word), 0);
        assert_eq!(h.fake.access_log().len(), before);
        assert_eq!(h.fake.register(0x10), None);
    }

    #[test]
    fn iosfc_window_reaches_the_iosurface_device() {
        let h = Harness::mmio();
        let w = IosfcWindow::new(h.gfx.clone());
        assert_eq!(w.size(), 0x1_0000);
        w.write(0xfff8, AccessWidth::Double, 0xaaaa_bbbb_cccc_dddd);
        assert_eq!(h.fake.iosfc_register(0xfff8), Some(0xcccc_dddd));
        assert_eq!(h.fake.iosfc_register(0xfffc), Some(0xaaaa_bbbb));
        assert_eq!(h.fake.register(0xfff8), None, "main window untouched");
        assert_eq!(w.read(0xfff8, AccessWidth::Double), 0xaaaa_bbbb_cccc_dddd);
    }

    #[test]
    fn windows_sit_on_the_bus_at_the_vmapple_addresses() {
        let h = Harness::mmio();
        let mut bus = MmioBus::default();
        let gfx = GfxWindow::new(h.gfx.clone());
        bus.insert(GFX_BASE, gfx.size(), "apple-gfx", Arc::new(gfx))
            .unwrap();
        let iosfc = IosfcWindow::new(h.gfx.clone());
        bus.insert(IOSFC_BASE, IOSFC_SIZE, "apple-gfx-iosfc", Arc::new(iosfc))
            .unwrap();
        bus.write(GFX_BASE + 0x100, AccessWidth::Word, 7).unwrap();
        bus.write(IOSFC_BASE + 0x100, AccessWidth::Word, 9).unwrap();
        assert_eq!(h.fake.register(0x100), Some(7));
        assert_eq!(h.fake.iosfc_register(0x100), Some(9));
    }
}
