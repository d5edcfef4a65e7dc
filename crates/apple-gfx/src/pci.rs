//! `apple-gfx-pci`: the PCI variant of the display (apple-gfx.md §2.2
//! `PGDeviceSpec.h` constants, §8), as a [`pci::PciDevice`].
//!
//! * **Identity.** Apple's vendor 0x106b, device 0xeeee, class 0x038000
//!   (display, other). Revision, subsystem IDs, interrupt pin and the MSI
//!   capability offset are QEMU's defaults for a device that sets none
//!   (the spec marks them derived).
//! * **BAR0** is the framework's register window: 32-bit, not
//!   prefetchable, `mmioLength` rounded up to a power of two. Accesses go
//!   to the framework exactly as through the MMIO variant's GFX window
//!   ([`crate::mmio`]): offsets unchanged (the MSI area in the first page
//!   included), 32-bit accesses as they are, 64-bit ones split low dword
//!   first, narrower ones and the padding past `mmioLength` read 0 and
//!   ignore writes.
//! * **Interrupts.** Only MSI, one vector, 64-bit address, no per-vector
//!   masking; there is no INTx (pin 0). The framework's `raiseInterrupt`
//!   becomes one write of the programmed data to the programmed address
//!   through the [`MsiSink`] the function was built with, provided the
//!   guest has set MSI Enable and Bus Master Enable (an MSI is a memory
//!   write by the function, which bus mastering gates; QEMU's message goes
//!   through the function's bus-master address space, which drops it the
//!   same way). Otherwise the interrupt is lost, as in QEMU, and counted
//!   ([`AppleGfx::interrupts_dropped`]).
//! * **No MSI, no device.** QEMU refuses to realize `apple-gfx-pci` on a
//!   machine without MSI, and so does [`ApplePciGfx::new`] when given no
//!   sink. vmapple is such a machine (no ITS, vmapple-machine.md §7.5;
//!   [`pci::PciHost::msi_sink`] is `None`), so there the display is
//!   `apple-gfx-mmio` and this function exists as a tested model only.
//! * **Not modelled:** the option ROM (`PGCopyOptionROMURL`, only
//!   meaningful on a Mac host and for firmware that runs it).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use vm_core::sync::lock;

use pci::config::reg::COMMAND_MASTER;
use pci::{BarKind, BarRegion, CapabilityList, Msi, MsiConfig, MsiSink, PciDevice};
use vm_core::{guest_error, AccessWidth, IrqLine};

use crate::device::{AppleGfx, GfxConfig, GfxError, Variant};
use crate::framework::Framework;
use crate::irq::MsiSender;
use crate::mmio::registers;

/// The function's name in logs.
pub const NAME: &str = "apple-gfx-pci";

/// `PG_PCI_VENDOR_ID` (Apple).
pub const VENDOR_ID: u16 = 0x106b;
/// `PG_PCI_DEVICE_ID`.
pub const DEVICE_ID: u16 = 0xeeee;
pub const REVISION: u8 = 0;
pub const SUBSYSTEM_VENDOR_ID: u16 = 0x1af4;
pub const SUBSYSTEM_ID: u16 = 0x1100;
/// Display controller, "other" (base class 0x03, subclass 0x80, prog-if 0).
pub const CLASS_CODE: u16 = 0x0380;
pub const PROG_IF: u8 = 0;
/// `PG_PCI_BAR_MMIO`: the register window, 32-bit non-prefetchable memory.
pub const BAR_MMIO: u8 = 0;
/// `PG_PCI_MAX_MSI_VECTORS`.
pub const MSI_VECTORS: u8 = 1;
/// The MSI capability is the only one, so it sits right after the header.
pub const MSI_CAP_OFFSET: u8 = 0x40;
/// No INTx.
pub const INTERRUPT_PIN: u8 = 0;
/// First register of the window per `PGDeviceSpec.h`; the MSI area is
/// below it. Every offset is still forwarded unchanged.
pub const REGISTERS_OFFSET: u64 = 0x1000;

/// Size of BAR0 for a register window of `mmio_length` bytes: the next
/// power of two (BARs must be), at least 4 KiB.
pub fn bar0_size(mmio_length: u64) -> Option<u64> {
    mmio_length.max(0x1000).checked_next_power_of_two()
}

/// Size of the expansion-ROM BAR for an option ROM of `len` bytes, which
/// is zero-padded to a power of two; `None` for an empty or absurd ROM.
pub fn rom_bar_size(len: u64) -> Option<u64> {
    if len == 0 {
        return None;
    }
    len.max(0x800).checked_next_power_of_two()
}

/// Why the PCI function could not be built.
#[derive(Debug, thiserror::Error)]
pub enum PciGfxError {
    #[error(
        "apple-gfx-pci needs MSI, which the vmapple machine does not offer; \
         use the MMIO display (apple-gfx-mmio)"
    )]
    NoMsi,
    #[error("apple-gfx-pci: a register window of {0:#x} bytes does not fit a 32-bit BAR")]
    BarSize(u64),
    #[error(transparent)]
    Gfx(#[from] GfxError),
}

/// The function's MSI side: its capability image and what gates it.
///
/// The framework raises interrupts from its own threads, possibly while a
/// vCPU is inside a BAR0 access; the `caps` lock is never held across a
/// call into the framework or the sink, so neither can wait on the other.
struct MsiState {
    caps: Mutex<CapabilityList>,
    msi: Msi,
    bus_master: AtomicBool,
    sink: Arc<dyn MsiSink>,
}

impl MsiSender for MsiState {
    fn msi_enabled(&self) -> bool {
        self.bus_master.load(Ordering::SeqCst) && self.msi.enabled(&lock(&self.caps))
    }

    fn send_msi(&self, vector: u32) -> bool {
        if !self.bus_master.load(Ordering::SeqCst) {
            return false;
        }
        let message = self.msi.message(&lock(&self.caps), vector);
        match message {
            Some(m) => {
                self.sink.send(m.address, m.data);
                true
            }
            None => false,
        }
    }
}

/// The `apple-gfx-pci` function: plug it into a [`pci::PciHost`] of a
/// machine that has MSI.
pub struct ApplePciGfx {
    core: AppleGfx,
    msi: Arc<MsiState>,
    bar0_size: u64,
}

impl ApplePciGfx {
    /// Realizes the device (§8.2) with its MSIs going to `msi`. `None`,
    /// which is what a machine without MSI (vmapple) has to give, is
    /// [`PciGfxError::NoMsi`], checked before the framework is touched.
    pub fn new(
        fw: &dyn Framework,
        cfg: GfxConfig,
        msi: Option<Arc<dyn MsiSink>>,
    ) -> Result<Self, PciGfxError> {
        let sink = msi.ok_or(PciGfxError::NoMsi)?;
        let mmio_length = fw.mmio_length();
        let bar0_size = bar0_size(mmio_length)
            .filter(|&size| size <= 1 << 31)
            .ok_or(PciGfxError::BarSize(mmio_length))?;
        let mut caps = CapabilityList::new();
        let config = MsiConfig {
            vectors: MSI_VECTORS,
            address_64: true,
        };
        let msi = Msi::add(&mut caps, config).expect("an empty capability list has room for MSI");
        let state = Arc::new(MsiState {
            caps: Mutex::new(caps),
            msi,
            bus_master: AtomicBool::new(false),
            sink,
        });
        let core = AppleGfx::new(fw, Variant::Pci { msi: state.clone() }, cfg)?;
        Ok(Self {
            core,
            msi: state,
            bar0_size,
        })
    }

    /// The device core (display, reset, counters).
    pub fn core(&self) -> &AppleGfx {
        &self.core
    }

    /// Size of BAR0.
    pub fn bar0_size(&self) -> u64 {
        self.bar0_size
    }
}

impl PciDevice for ApplePciGfx {
    fn name(&self) -> &str {
        NAME
    }

    fn ids(&self) -> (u16, u16, u16, u16) {
        (VENDOR_ID, DEVICE_ID, SUBSYSTEM_VENDOR_ID, SUBSYSTEM_ID)
    }

    fn class_and_revision(&self) -> (u32, u8) {
        (u32::from(CLASS_CODE) << 8 | u32::from(PROG_IF), REVISION)
    }

    fn bars(&self) -> Vec<BarRegion> {
        vec![BarRegion {
            index: BAR_MMIO,
            size: self.bar0_size,
            kind: BarKind::Memory32,
            prefetchable: false,
        }]
    }

    fn read_config(&self, offset: u16, width: AccessWidth) -> u32 {
        lock(&self.msi.caps).read(offset, width)
    }

    fn write_config(&self, offset: u16, width: AccessWidth, value: u32) {
        let mut caps = lock(&self.msi.caps);
        self.msi.msi.write(&mut caps, offset, width, value);
    }

    fn capabilities_pointer(&self) -> u8 {
        lock(&self.msi.caps).pointer()
    }

    fn command_written(&self, command: u16) {
        self.msi
            .bus_master
            .store(command & COMMAND_MASTER != 0, Ordering::SeqCst);
    }

    fn read_bar(&self, bar: u8, offset: u64, width: AccessWidth) -> u64 {
        if bar != BAR_MMIO {
            guest_error!("{NAME}: load from BAR {bar}, which does not exist");
            return 0;
        }
        registers("apple-gfx pci", self.core.mmio_length())
            .read(offset, width, |o| self.core.read_register(o))
    }

    fn write_bar(&self, bar: u8, offset: u64, width: AccessWidth, value: u64) {
        if bar != BAR_MMIO {
            guest_error!("{NAME}: store to BAR {bar}, which does not exist");
            return;
        }
        registers("apple-gfx pci", self.core.mmio_length())
            .write(offset, width, value, |o, v| self.core.write_register(o, v))
    }

    fn interrupt_pin(&self) -> u8 {
        INTERRUPT_PIN
    }

    fn set_intx(&self, _line: Arc<dyn IrqLine>) {}

    fn reset(&self) {
        self.core.reset();
        self.msi.bus_master.store(false, Ordering::SeqCst);
        self.msi.msi.reset(&mut lock(&self.msi.caps));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::*;
    use crate::framework::MemoryInterface;
    use pci::config::reg::COMMAND_MEMORY;
    use pci::{PciHost, MMIO_BASE, NUM_INTX_LINES};
    use vm_core::memory::create_guest_memory;
    use vm_core::{MmioDevice, TestIrq};
    use AccessWidth::*;

    /// Records every MSI write.
    #[derive(Default)]
    struct RecordingMsi(Mutex<Vec<(u64, u32)>>);

    impl MsiSink for RecordingMsi {
        fn send(&self, address: u64, data: u32) {
            lock(&self.0).push((address, data));
        }
    }

    impl RecordingMsi {
        fn sent(&self) -> Vec<(u64, u32)> {
            lock(&self.0).clone()
        }
    }

    fn config() -> GfxConfig {
        GfxConfig {
            memory: Arc::new(create_guest_memory(&HARNESS_RAM).unwrap()),
            va_space: Arc::new(FakeVaSpace::new()),
            page_size: FAKE_PAGE,
            sink: Arc::new(RecordingSink::default()),
            executor: Arc::new(ManualExecutor::default()),
            modes: vec![],
        }
    }

    /// The function in slot 1 of a host, on the fake framework.
    struct Bench {
        host: PciHost,
        gfx: Arc<ApplePciGfx>,
        fake: FakeFramework,
        msi: Arc<RecordingMsi>,
        ecam: Arc<dyn MmioDevice>,
        window: Arc<dyn MmioDevice>,
    }

    /// ECAM offset of register `reg` of slot 1.
    fn cfg(reg: u64) -> u64 {
        1 << 15 | reg
    }

    const MSI_ADDR: u64 = 0x1_fee0_0040;
    const MSI_DATA: u32 = 0x4051;

    impl Bench {
        fn new() -> Self {
            let lines: Vec<Arc<dyn IrqLine>> = (0..NUM_INTX_LINES)
                .map(|_| Arc::new(TestIrq::new()) as Arc<dyn IrqLine>)
                .collect();
            let host = PciHost::new(lines.try_into().ok().unwrap());
            let fake = FakeFramework::new(MemoryInterface::Tasks);
            let msi = Arc::new(RecordingMsi::default());
            let gfx = Arc::new(ApplePciGfx::new(&fake, config(), Some(msi.clone())).unwrap());
            assert_eq!(host.add_device(gfx.clone()).unwrap(), 1);
            let (ecam, window) = (host.ecam(), host.mmio_window());
            Self {
                host,
                gfx,
                fake,
                msi,
                ecam,
                window,
            }
        }

        /// BAR0 at the bottom of the MMIO window, decoding on.
        fn map_bar0(&self, command: u16) {
            self.ecam.write(cfg(0x10), Word, MMIO_BASE);
            self.ecam.write(cfg(0x04), Half, u64::from(command));
        }

        fn program_msi(&self, enable: bool) {
            let at = u64::from(MSI_CAP_OFFSET);
            self.ecam.write(cfg(at + 4), Word, MSI_ADDR & 0xffff_ffff);
            self.ecam.write(cfg(at + 8), Word, MSI_ADDR >> 32);
            self.ecam.write(cfg(at + 12), Half, u64::from(MSI_DATA));
            self.ecam.write(cfg(at + 2), Half, u64::from(enable));
        }

        /// What the framework does when it raises `vector`.
        fn raise(&self, vector: u32) {
            self.gfx.core().write_register(CMD_RAISE_IRQ, vector);
        }
    }

    #[test]
    fn header_identity_through_ecam() {
        let b = Bench::new();
        assert_eq!(b.ecam.read(cfg(0x00), Word), 0xeeee_106b);
        assert_eq!(b.ecam.read(cfg(0x08), Word), 0x0380_0000, "class, rev 0");
        assert_eq!(b.ecam.read(cfg(0x2c), Word), 0x1100_1af4);
        assert_eq!(b.ecam.read(cfg(0x3d), Byte), 0, "no INTx pin");
        assert_eq!(b.ecam.read(cfg(0x06), Half) & 0x10, 0x10, "capability list");
        assert_eq!(b.ecam.read(cfg(0x34), Byte), u64::from(MSI_CAP_OFFSET));
        assert_eq!(b.host.devices()[1], (1, NAME.to_string()));
    }

    #[test]
    fn bar0_sizes_as_a_32_bit_memory_bar() {
        let b = Bench::new();
        assert_eq!(b.gfx.bar0_size(), FAKE_MMIO_LENGTH);
        b.ecam.write(cfg(0x10), Word, 0xffff_ffff);
        let sized = b.ecam.read(cfg(0x10), Word);
        assert_eq!(sized, 0xffff_c000, "16 KiB, 32-bit, not prefetchable");
        assert_eq!(!(sized & !0xf) as u32 + 1, FAKE_MMIO_LENGTH as u32);
        for bar in 1..6 {
            b.ecam.write(cfg(0x10 + 4 * bar), Word, 0xffff_ffff);
            assert_eq!(b.ecam.read(cfg(0x10 + 4 * bar), Word), 0, "BAR {bar}");
        }
    }

    #[test]
    fn msi_capability_through_ecam() {
        let b = Bench::new();
        let at = u64::from(MSI_CAP_OFFSET);
        assert_eq!(
            b.ecam.read(cfg(at), Word),
            0x0080_0005,
            "MSI, last in the list, 1 vector, 64-bit, no masking"
        );
        for reg in (at..at + 16).step_by(4) {
            b.ecam.write(cfg(reg), Word, 0xffff_ffff);
        }
        assert_eq!(
            b.ecam.read(cfg(at), Word),
            0x0081_0005,
            "only Enable sticks"
        );
        assert_eq!(b.ecam.read(cfg(at + 4), Word), 0xffff_fffc);
        assert_eq!(b.ecam.read(cfg(at + 8), Word), 0xffff_ffff);
        assert_eq!(b.ecam.read(cfg(at + 12), Word), 0x0000_ffff);
        b.ecam.write(cfg(0x50), Word, 0xffff_ffff);
        assert_eq!(
            b.ecam.read(cfg(0x50), Word),
            0,
            "nothing past the capability"
        );
    }

    #[test]
    fn bar0_accesses_reach_the_framework_at_the_same_offsets() {
        let b = Bench::new();
        b.map_bar0(COMMAND_MEMORY);
        b.window.write(0x1010, Word, 0xdead_beef);
        assert_eq!(b.fake.register(0x1010), Some(0xdead_beef));
        assert_eq!(b.window.read(0x1010, Word), 0xdead_beef);
        // The MSI area below REGISTERS_OFFSET is forwarded too.
        b.window.write(0x4, Word, 7);
        assert_eq!(b.fake.register(0x4), Some(7));
        b.window.write(0x2000, Double, 0x1111_2222_3333_4444);
        assert_eq!(b.fake.register(0x2000), Some(0x3333_4444));
        assert_eq!(b.fake.register(0x2004), Some(0x1111_2222));
        let log = b.fake.access_log();
        let tail: Vec<u64> = log[log.len() - 2..].iter().map(|a| a.offset).collect();
        assert_eq!(tail, vec![0x2000, 0x2004], "low dword first");
        let before = b.fake.access_log().len();
        b.window.write(0x20, Byte, 0xff);
        b.window.write(0x20, Half, 0xffff);
        assert_eq!(b.window.read(0x20, Half), 0);
        assert_eq!(
            b.fake.access_log().len(),
            before,
            "narrow accesses stop here"
        );
        assert_eq!(
            b.window.read(FAKE_MMIO_LENGTH, Word),
            0xffff_ffff,
            "past BAR0"
        );
    }

    #[test]
    fn an_interrupt_is_one_msi_write_when_enabled() {
        let b = Bench::new();
        b.map_bar0(COMMAND_MEMORY | COMMAND_MASTER);
        b.raise(0);
        assert!(b.msi.sent().is_empty(), "MSI not enabled yet");
        assert_eq!(b.gfx.core().interrupts_dropped(), 1);

        b.program_msi(true);
        b.raise(0);
        assert_eq!(b.msi.sent(), vec![(MSI_ADDR, MSI_DATA)]);
        assert_eq!(b.gfx.core().interrupts_delivered().0, 1);

        b.raise(1);
        assert_eq!(b.msi.sent().len(), 1, "only vector 0 exists");

        b.program_msi(false);
        b.raise(0);
        assert_eq!(b.msi.sent().len(), 1, "disabled again");
        assert_eq!(b.gfx.core().interrupts_dropped(), 3);
    }

    #[test]
    fn no_msi_without_bus_mastering() {
        let b = Bench::new();
        b.map_bar0(COMMAND_MEMORY);
        b.program_msi(true);
        b.raise(0);
        assert!(b.msi.sent().is_empty());
        b.ecam
            .write(cfg(0x04), Half, u64::from(COMMAND_MEMORY | COMMAND_MASTER));
        b.raise(0);
        assert_eq!(b.msi.sent(), vec![(MSI_ADDR, MSI_DATA)]);
    }

    #[test]
    fn reset_disables_msi_and_resets_the_framework() {
        let b = Bench::new();
        b.map_bar0(COMMAND_MEMORY | COMMAND_MASTER);
        b.program_msi(true);
        b.host.reset();
        assert_eq!(b.fake.resets(), 1);
        let at = u64::from(MSI_CAP_OFFSET);
        assert_eq!(b.ecam.read(cfg(at), Word), 0x0080_0005);
        for reg in [at + 4, at + 8, at + 12] {
            assert_eq!(b.ecam.read(cfg(reg), Word), 0);
        }
        b.raise(0);
        assert!(b.msi.sent().is_empty());
        // Enabling MSI alone is not enough after reset: bus mastering is off.
        b.program_msi(true);
        b.raise(0);
        assert!(b.msi.sent().is_empty());
    }

    #[test]
    fn hostile_config_and_bar_accesses_are_harmless() {
        let b = Bench::new();
        b.map_bar0(COMMAND_MEMORY | COMMAND_MASTER);
        for width in [Byte, Half, Word, Double] {
            for reg in 0x40..0x1000 {
                let _ = b.ecam.read(cfg(reg), width);
                b.ecam.write(cfg(reg), width, u64::MAX);
            }
            let mut offset = 0;
            while offset < 0x5000 {
                let _ = b.window.read(offset, width);
                b.window.write(offset, width, u64::MAX);
                offset += 0x3f;
            }
        }
        let gfx: &dyn PciDevice = &*b.gfx;
        for offset in [0, 0x3f, 0xff, 0xfff, u16::MAX - 1, u16::MAX] {
            let _ = gfx.read_config(offset, Double);
            gfx.write_config(offset, Double, u32::MAX);
        }
        for bar in [0, 1, 5, 6, u8::MAX] {
            for offset in [0, 0x3fff, 0x4000, u64::MAX - 3, u64::MAX] {
                let _ = gfx.read_bar(bar, offset, Double);
                gfx.write_bar(bar, offset, Double, u64::MAX);
            }
        }
        assert_eq!(b.ecam.read(cfg(0), Word), 0xeeee_106b);
        assert_eq!(b.ecam.read(cfg(u64::from(MSI_CAP_OFFSET)), Half), 0x0005);
    }

    #[test]
    fn without_msi_there_is_no_device() {
        let lines: Vec<Arc<dyn IrqLine>> = (0..NUM_INTX_LINES)
            .map(|_| Arc::new(TestIrq::new()) as Arc<dyn IrqLine>)
            .collect();
        let vmapple_host = PciHost::new(lines.try_into().ok().unwrap());
        let fake = FakeFramework::new(MemoryInterface::Tasks);
        let err = ApplePciGfx::new(&fake, config(), vmapple_host.msi_sink())
            .err()
            .unwrap();
        assert!(matches!(err, PciGfxError::NoMsi));
        let text = err.to_string();
        assert!(
            text.contains("needs MSI") && text.contains("MMIO display"),
            "{text}"
        );
        assert_eq!(fake.memory_setup(), None, "the framework was never asked");
        assert_eq!(fake.display_info(), None);
    }

    #[test]
    fn framework_failures_are_errors() {
        let sink: Arc<dyn MsiSink> = Arc::new(RecordingMsi::default());
        let err = ApplePciGfx::new(&FakeFramework::failing(), config(), Some(sink))
            .err()
            .unwrap();
        assert!(matches!(err, PciGfxError::Gfx(_)), "{err}");
    }

    #[test]
    fn bar_sizes_are_powers_of_two() {
        assert_eq!(bar0_size(0x4000), Some(0x4000));
        assert_eq!(bar0_size(0x4001), Some(0x8000));
        assert_eq!(bar0_size(0), Some(0x1000));
        assert_eq!(bar0_size(u64::MAX), None);
        assert_eq!(rom_bar_size(0x1_2345), Some(0x2_0000));
        assert_eq!(rom_bar_size(0), None);
        assert_eq!(rom_bar_size(1), Some(0x800));
    }
}
