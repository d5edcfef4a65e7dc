//! The PCIe side of the machine (vmapple-machine.md §7, §11): the host
//! bridge, and the devices in the slot order QEMU gives them with the
//! documented command line (§7.4): XHCI first, then the Apple aux and
//! root block devices, the NIC, and any plain virtio disks.

use std::path::PathBuf;
use std::sync::Arc;

use block::BlockBackend;
use pci::{PciDevice, PciHost};
use virtio::block::{AppleVariant, BlockConfig, VirtioBlock};
use virtio::net::VirtioNet;
use virtio::transport::pci::VirtioPciDevice;
use vm_core::GuestMemory;

use crate::MachineError;

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
    pub mac: MacAddress,
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

/// What goes on the PCI bus.
pub(crate) struct PciPlan<'a> {
    pub memory: &'a GuestMemory,
    /// The USB controller with keyboard and tablet, or none.
    pub xhci: Option<Arc<usb::Xhci>>,
    pub aux: Option<Arc<dyn BlockBackend>>,
    pub root: Option<Arc<dyn BlockBackend>>,
    pub nics: &'a [NicSpec],
    pub disks: Vec<(PathBuf, Arc<dyn BlockBackend>)>,
    pub queues_per_disk: u16,
}

pub(crate) fn populate(host: &PciHost, plan: PciPlan) -> Result<(), MachineError> {
    let plug = |name: &str, device: Arc<dyn PciDevice>| {
        let slot = host
            .add_device(device)
            .map_err(|source| MachineError::Pci {
                name: name.to_owned(),
                source,
            })?;
        tracing::debug!(slot, "PCI 00:{slot:02x}.0 is {name}");
        Ok::<(), MachineError>(())
    };
    let virtio = |device: Box<dyn virtio::VirtioDevice>| -> Arc<dyn PciDevice> {
        Arc::new(VirtioPciDevice::new(device, plan.memory.clone()))
    };
    let block = |backend: Arc<dyn BlockBackend>, serial: &str, apple: Option<AppleVariant>| {
        let config = BlockConfig {
            read_only: backend.is_read_only(),
            serial: Some(serial.to_owned()),
            num_queues: plan.queues_per_disk,
            apple_variant: apple,
        };
        virtio(Box::new(VirtioBlock::new(backend, config)))
    };
    if let Some(xhci) = plan.xhci {
        plug("qemu-xhci (USB keyboard, tablet)", xhci)?;
    }
    if let Some(aux) = plan.aux {
        plug(
            "vmapple-virtio-blk (aux)",
            block(aux, "vmapple-aux", Some(AppleVariant::Aux)),
        )?;
    }
    if let Some(root) = plan.root {
        plug(
            "vmapple-virtio-blk (root)",
            block(root, "vmapple-root", Some(AppleVariant::Root)),
        )?;
    }
    for (i, nic) in plan.nics.iter().enumerate() {
        let backend = open_backend(&nic.backend).map_err(|source| MachineError::Net {
            backend: nic.backend.clone(),
            source,
        })?;
        tracing::info!("NIC {i}: {}, MAC {}", nic.backend, nic.mac);
        plug(
            "virtio-net",
            virtio(Box::new(VirtioNet::new(backend, nic.mac.octets()))),
        )?;
    }
    for (i, (path, disk)) in plan.disks.into_iter().enumerate() {
        let name = format!("virtio-blk ({})", path.display());
        plug(&name, block(disk, &format!("vmapple-disk{i}"), None))?;
    }
    Ok(())
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
