//! The snapshot decoder: any bytes as a snapshot file's start, or as one
//! device's saved state. A snapshot is user input (a file anyone may
//! hand to `--restore`): decoding must fail cleanly, never panic or
//! allocate without bound, and a device must refuse state it could not
//! hold (a FIFO longer than its own, another GIC's shape).

use std::sync::Arc;

use gic::{CpuInterruptOutputs, GicV3};
use machine::registry::DeviceState;
use machine::snapshot::Header;
use vm_core::NoIrq;

use crate::Report;

/// Which decoder the first byte picks.
pub const HEADER: u8 = 0;
pub const GIC: u8 = 1;
pub const PL011: u8 = 2;
pub const PL061: u8 = 3;
pub const AES: u8 = 4;
pub const PCI_HOST: u8 = 5;
pub const VIRTIO_BLK: u8 = 6;
pub const VIRTIO_BLK_MSIX: u8 = 7;
pub const XHCI: u8 = 8;
pub const VIRTIO_GPU: u8 = 9;

struct NoCpus;

impl CpuInterruptOutputs for NoCpus {
    fn set(&self, _cpu: usize, _irq: bool, _fiq: bool) {}
}

struct Discard;

impl devices::pl011::SerialOutput for Discard {
    fn write_bytes(&mut self, _bytes: &[u8]) {}
}

/// A GIC like the machine's with two CPUs.
pub fn gic() -> Arc<GicV3> {
    GicV3::new(2, 256, Arc::new(NoCpus))
}

pub fn pl011() -> Arc<devices::pl011::Pl011> {
    devices::pl011::Pl011::new(Arc::new(NoIrq), Box::new(Discard))
}

pub fn pl061() -> Arc<devices::pl061::Pl061> {
    devices::pl061::Pl061::new(Arc::new(NoIrq))
}

pub fn aes() -> Arc<devices::apple_aes::AppleAes> {
    let ram =
        vm_core::memory::create_guest_memory(&[(0x7000_0000, 0x1000)]).expect("a page of RAM");
    devices::apple_aes::AppleAes::new(ram, Arc::new(NoIrq), Default::default())
}

pub fn pci_host() -> pci::PciHost {
    pci::PciHost::new(std::array::from_fn(|_| Arc::new(NoIrq) as _))
}

/// Where [`virtio_blk`]'s RAM starts (1 MiB of it).
pub const VIRTIO_RAM: u64 = 0x4000_0000;

/// A virtio-blk function on a 1 MiB disk, its rings to be in 1 MiB of RAM.
pub fn virtio_blk() -> virtio::transport::pci::VirtioPciDevice {
    let ram = vm_core::memory::create_guest_memory(&[(VIRTIO_RAM, 0x10_0000)]).expect("RAM");
    let disk = Arc::new(block::MemoryDisk::new(vec![0; 1 << 20], false));
    let blk = virtio::block::VirtioBlock::new(disk, Default::default());
    virtio::transport::pci::VirtioPciDevice::new(Box::new(blk), ram)
}

struct NoMessages;

impl pci::MsiSink for NoMessages {
    fn send(&self, _address: u64, _data: u32) {}
}

/// [`virtio_blk`] with MSI-X (as with `--msi on`) and I/O threads.
pub fn virtio_blk_msix() -> virtio::transport::pci::VirtioPciDevice {
    let ram = vm_core::memory::create_guest_memory(&[(VIRTIO_RAM, 0x10_0000)]).expect("RAM");
    let disk = Arc::new(block::MemoryDisk::new(vec![0; 1 << 20], false));
    let config = virtio::block::BlockConfig {
        io_threads: true,
        ..Default::default()
    };
    let blk = virtio::block::VirtioBlock::new(disk, config);
    virtio::transport::pci::VirtioPciDevice::with_msix(Box::new(blk), ram, Arc::new(NoMessages))
}

/// A virtio-gpu function with one 640x480 head, its rings and resources'
/// backing in [`virtio_blk`]'s 1 MiB of RAM.
pub fn virtio_gpu() -> virtio::transport::pci::VirtioPciDevice {
    let ram = vm_core::memory::create_guest_memory(&[(VIRTIO_RAM, 0x10_0000)]).expect("RAM");
    let display = display::Display::new(vec![vec![display::DisplayMode::new(640, 480, 60)]]);
    let gpu = virtio::gpu::VirtioGpu::new(display);
    virtio::transport::pci::VirtioPciDevice::new(Box::new(gpu), ram)
}

/// Where [`xhci`]'s RAM starts (1 MiB of it).
pub const XHCI_RAM: u64 = 0x8000_0000;

/// The machine's XHCI with its keyboard and tablet, with MSI-X.
pub fn xhci() -> usb::Xhci {
    let ram = vm_core::memory::create_guest_memory(&[(XHCI_RAM, 0x10_0000)]).expect("RAM");
    usb::Xhci::with_hid_devices(ram, usb::XhciConfig::default()).with_msix(Arc::new(NoMessages))
}

/// Decodes `data[1..]` with the decoder `data[0]` picks. A header that
/// decodes must encode back to one that decodes equal; a device state
/// that restores must save back to the same bytes' meaning (restoring
/// what it saves changes nothing).
pub fn snapshot(data: &[u8]) -> Report {
    let mut report = Report {
        ops: 1,
        ..Report::default()
    };
    let Some((&which, rest)) = data.split_first() else {
        return report;
    };
    let restored = |device: &dyn DeviceState| -> bool {
        if device.restore(rest).is_err() {
            return false;
        }
        let saved = device.save().expect("a restored device saves");
        device
            .restore(&saved)
            .expect("a device restores what it saved");
        assert_eq!(device.save().unwrap(), saved, "save/restore round trip");
        true
    };
    let ok = match which {
        HEADER => match Header::decode(rest, rest.len() as u64) {
            Ok(header) => {
                let bytes = header.encode().expect("a decoded header encodes");
                let again =
                    Header::decode(bytes.as_slice(), header.file_len.max(bytes.len() as u64))
                        .expect("an encoded header decodes");
                assert_eq!(again, header);
                true
            }
            Err(e) => {
                assert!(!e.to_string().is_empty());
                false
            }
        },
        GIC => {
            let gic = gic();
            let ok = restored(&*gic);
            // The interface computes priorities from what was restored.
            for cpu in 0..2 {
                for reg in [
                    arch_arm64::sysreg::ICC_HPPIR1_EL1,
                    arch_arm64::sysreg::ICC_IAR1_EL1,
                    arch_arm64::sysreg::ICC_RPR_EL1,
                    arch_arm64::sysreg::ICC_IAR0_EL1,
                ] {
                    let _ = gic.read_sysreg(cpu, reg);
                }
                gic.write_sysreg(cpu, arch_arm64::sysreg::ICC_EOIR1_EL1, 27);
            }
            ok
        }
        PL011 => restored(&*pl011()),
        PL061 => restored(&*pl061()),
        AES => restored(&*aes()),
        PCI_HOST => restored(&pci_host()),
        VIRTIO_BLK => restored(&virtio_blk()),
        VIRTIO_GPU => restored(&virtio_gpu()),
        XHCI => {
            let x = xhci();
            // MFINDEX runs on host time, so the round trip compares the
            // rest.
            let ok = x.restore(rest).is_ok();
            if ok {
                let without_clock = |mut s: usb::xhci::SavedXhci| {
                    s.mfindex = 0;
                    s
                };
                let saved = x.save_state().expect("a restored XHCI saves");
                x.restore_state(&saved)
                    .expect("an XHCI restores what it saved");
                let again = x.save_state().expect("it saves again");
                assert_eq!(
                    without_clock(again),
                    without_clock(saved),
                    "save/restore round trip"
                );
                // What the restored controller does next: host input.
                let sink = x.input_sink();
                sink.send(usb::InputEvent::Key {
                    usage: 4,
                    pressed: true,
                });
                sink.send(usb::InputEvent::PointerAbs { x: 9, y: 9 });
            }
            ok
        }
        VIRTIO_BLK_MSIX => {
            // A running device's threads hold its queues until quiesced,
            // as at a save.
            let f = virtio_blk_msix();
            if f.restore(rest).is_ok() {
                f.quiesce();
                let saved = f.save().expect("a restored device saves");
                f.restore(&saved).expect("a device restores what it saved");
                f.quiesce();
                assert_eq!(f.save().unwrap(), saved, "save/restore round trip");
                true
            } else {
                false
            }
        }
        _ => false,
    };
    report.completions = u64::from(ok);
    report
}
