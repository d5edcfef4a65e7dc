//! The PCIe side of the machine (vmapple-machine.md §7, §11): the host
//! bridge, and the devices in the slot order QEMU gives them with the
//! documented command line (§7.4): XHCI first, then the Apple aux and
//! root block devices, the NIC, and any plain virtio disks.

use std::sync::Arc;

use block::BlockBackend;
use pci::{PciDevice, PciHost};
use virtio::block::{AppleVariant, BlockConfig, VirtioBlock};
use virtio::gpu::VirtioGpu;
use virtio::net::VirtioNet;
use virtio::transport::pci::VirtioPciDevice;
use vm_core::IrqLine;

use crate::layout::{
    PCIE_ECAM_BASE, PCIE_ECAM_SIZE, PCIE_INTX_LINES, PCIE_MMIO_BASE, PCIE_MMIO_SIZE, SPI_PCIE_INTX,
};
use crate::platform::Core;
use crate::registry::{Attachment, DeviceState, Registry};
use crate::{Disks, MachineConfig, MachineError};

pub use vm_config::{MacAddress, NetBackend};

/// Opens the host side of a NIC's backend.
fn open_backend(backend: &NetBackend) -> std::io::Result<Box<dyn virtio::net::NetBackend>> {
    use virtio::net::{passt::PasstBackend, unix};
    Ok(match backend {
        NetBackend::Passt => Box::new(PasstBackend::spawn()?),
        NetBackend::UnixStream(path) => Box::new(unix::UnixStreamBackend::connect(path)?),
        NetBackend::UnixDgram { local, peer } => {
            Box::new(unix::UnixDgramBackend::bind_connect(local, peer)?)
        }
        #[cfg(target_os = "linux")]
        NetBackend::Tap(name) => Box::new(virtio::net::tap::TapBackend::open(name)?),
        #[cfg(not(target_os = "linux"))]
        NetBackend::Tap(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "TAP networking is only available on Linux",
            ))
        }
        #[cfg(target_os = "macos")]
        NetBackend::Vmnet => {
            let backend = virtio::net::vmnet::VmnetBackend::start()?;
            if let Some(mac) = &backend.assigned_mac {
                tracing::info!("vmnet: interface up (vmnet's MAC for it: {mac})");
            }
            Box::new(backend)
        }
        #[cfg(not(target_os = "macos"))]
        NetBackend::Vmnet => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "vmnet networking is only available on macOS",
            ))
        }
    })
}

/// A NIC the user asked for.
#[derive(Clone, Debug)]
pub struct NicSpec {
    pub backend: NetBackend,
    /// `None`: [`default_mac`] at boot; a restore keeps the guest's.
    pub mac: Option<MacAddress>,
}

/// A locally administered MAC address in QEMU's 52:54:00 range, unique
/// enough per NIC of a host.
pub fn default_mac(index: u8) -> MacAddress {
    let pid = std::process::id().to_le_bytes();
    MacAddress([
        0x52,
        0x54,
        0x00,
        pid[0],
        pid[1] ^ index,
        0x56u8.wrapping_add(index),
    ])
}

/// Attaches the PCIe host bridge (ECAM, MMIO window, INTx lines) and the
/// functions on it.
pub(crate) fn attach(
    reg: &mut Registry,
    core: &Core,
    config: &MachineConfig,
    disks: Disks,
    gpu: Option<Arc<display::Display>>,
) -> Result<PciBus, MachineError> {
    let host = reg.attach(HOST, |wires| {
        let intx: [Arc<dyn IrqLine>; PCIE_INTX_LINES as usize] =
            std::array::from_fn(|line| wires.spi(SPI_PCIE_INTX + line as u32));
        let mut host = PciHost::new(intx);
        if config.msi {
            host = host.with_msi(Arc::new(crate::msi::GicDoorbells(core.gic.clone())));
        }
        let host = Arc::new(host);
        Ok(Attachment::new(host.clone())
            .mmio("pcie-ecam", PCIE_ECAM_BASE, PCIE_ECAM_SIZE, host.ecam())
            .mmio(
                "pcie-mmio",
                PCIE_MMIO_BASE,
                PCIE_MMIO_SIZE,
                host.mmio_window(),
            ))
    })?;
    let mut plug =
        |id: &str, (function, state): (Arc<dyn PciDevice>, Option<Arc<dyn DeviceState>>)| {
            reg.attach_pci(HOST, &host, id, function, state).map(drop)
        };
    let msi = host.msi_sink();
    // A virtio function's state is its transport's, when its device can
    // give what the transport needs.
    let virtio = |device: Box<dyn virtio::VirtioDevice>| {
        let function = Arc::new(match &msi {
            Some(sink) => VirtioPciDevice::with_msix(device, core.memory.clone(), sink.clone()),
            None => VirtioPciDevice::new(device, core.memory.clone()),
        });
        let state = function
            .saves_state()
            .then(|| function.clone() as Arc<dyn DeviceState>);
        (function as Arc<dyn PciDevice>, state)
    };
    let queues_per_disk = config.cpus.clamp(1, 16) as u16;
    let block = |backend: Arc<dyn BlockBackend>, serial: &str, apple: Option<AppleVariant>| {
        let config = BlockConfig {
            read_only: backend.is_read_only(),
            serial: Some(serial.to_owned()),
            num_queues: queues_per_disk,
            apple_variant: apple,
            // With MSI, a kick only wakes the queue's thread and the vCPU
            // goes back to the guest while the host does the I/O. `--msi
            // off` keeps the first wave's model (requests complete in the
            // kick). Snapshots save either: a save quiesces the threads.
            io_threads: config.msi,
        };
        virtio(Box::new(VirtioBlock::new(backend, config)))
    };
    let mut input = None;
    if config.usb {
        let mut xhci = usb::Xhci::with_hid_devices(core.memory.clone(), usb::XhciConfig::default());
        if let Some(sink) = &msi {
            xhci = xhci.with_msix(sink.clone());
        }
        let xhci = Arc::new(xhci);
        input = Some(xhci.input_sink());
        let state = xhci
            .saves_state()
            .then(|| xhci.clone() as Arc<dyn DeviceState>);
        plug("xhci", (xhci, state))?;
    }
    if config.aux.is_some() {
        plug(
            "virtio-blk-aux",
            block(disks.aux, "vmapple-aux", Some(AppleVariant::Aux)),
        )?;
    }
    if config.root.is_some() {
        plug(
            "virtio-blk-root",
            block(disks.root, "vmapple-root", Some(AppleVariant::Root)),
        )?;
    }
    for (i, nic) in config.nics.iter().enumerate() {
        let backend = open_backend(&nic.backend).map_err(|source| MachineError::Net {
            backend: nic.backend.clone(),
            source,
        })?;
        let index = u8::try_from(i).unwrap_or(u8::MAX);
        let mac = nic.mac.unwrap_or_else(|| default_mac(index));
        tracing::info!("NIC {i}: {}, MAC {mac}", nic.backend);
        let net = VirtioNet::new(backend, mac.octets());
        let net = if nic.mac.is_none() {
            net.with_mac_from_snapshot()
        } else {
            net
        };
        plug(&format!("virtio-net{i}"), virtio(Box::new(net)))?;
    }
    for (i, (path, disk)) in disks.extra.into_iter().enumerate() {
        tracing::debug!("virtio-blk{i} is {}", path.display());
        plug(
            &format!("virtio-blk{i}"),
            block(disk, &format!("vmapple-disk{i}"), None),
        )?;
    }
    for (i, share) in config.shares.iter().enumerate() {
        if config.shares[..i].iter().any(|s| s.tag == share.tag) {
            return Err(MachineError::ShareTagTwice(share.tag.clone()));
        }
        let fs = virtio::fs::VirtioFs::new(&share.tag, share.path.clone(), share.read_only)
            .map_err(|source| MachineError::Share {
                tag: share.tag.clone(),
                source,
            })?;
        tracing::info!("share {share}");
        plug(&format!("virtio-fs{i}"), virtio(Box::new(fs)))?;
    }
    if let Some(vsock) = &config.vsock {
        let dev = virtio::vsock::VirtioVsock::new(vsock.path.clone(), vsock.guest_cid)?;
        tracing::info!(
            "vsock: guest CID {}, host socket {}",
            vsock.guest_cid,
            vsock.path.display()
        );
        plug("virtio-vsock", virtio(Box::new(dev)))?;
    }
    // Last, after the slots QEMU's vmapple command line fills (§7.4).
    if let Some(display) = gpu {
        plug("virtio-gpu", virtio(Box::new(VirtioGpu::new(display))))?;
    }
    Ok(PciBus { host, input })
}

/// The registry id of the PCIe host bridge, parent of every function.
pub(crate) const HOST: &str = "pcie-host";

/// What the machine keeps of the PCI side besides the registry.
pub(crate) struct PciBus {
    pub host: Arc<PciHost>,
    /// Where keyboard and pointer input for the USB devices goes.
    pub input: Option<usb::InputSink>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_macs_are_locally_administered_and_distinct() {
        let a = default_mac(0).octets();
        let b = default_mac(1).octets();
        assert_eq!(a[0] & 0x02, 0x02, "locally administered");
        assert_eq!(a[0] & 0x01, 0, "unicast");
        assert_ne!(a, b);
    }
}
