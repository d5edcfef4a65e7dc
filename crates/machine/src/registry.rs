//! The machine's device registry: one list of every device the board
//! attaches, with where it sits (MMIO windows, PCI slot), which interrupts
//! it drives, and its hooks. Machine reset walks the list, and so will
//! snapshots (design.md "Machine state": one section per device, keyed by
//! its [`DeviceId`]); nothing names devices by hand, so a device attached
//! here cannot be left out of either.
//!
//! The registry owns the MMIO bus while the machine is built: attaching is
//! the only way onto it, so every region of the bus belongs to an entry.

use std::fmt;
use std::sync::Arc;

use gic::GicV3;
use pci::{PciDevice, PciHost};
use vm_core::{IrqLine, MmioBus, MmioDevice};

use crate::MachineError;

/// A device's name in the registry, stable across runs of the same
/// configuration: the key of its section in a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(String);

impl DeviceId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A mistake in how the machine attaches its devices (a defect of the
/// board code, never of the user's configuration).
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("two devices named {0} in the registry")]
    DuplicateId(String),
    #[error("{0}: the bus is in use; attach devices first")]
    BusInUse(DeviceId),
    #[error("{id}: no PCI host {host}")]
    NoPciHost { id: DeviceId, host: String },
    #[error("{0}: its build step did not run")]
    NotBuilt(&'static str),
}

/// One device's saved state and whose it is.
pub type Section = (DeviceId, Vec<u8>);

/// What the machine needs of every device it attaches.
pub trait Device: Send + Sync {
    /// Back to the power-on state: called at every machine reset, in
    /// attach order, with no machine lock held (a device may drain work
    /// that calls back into it).
    fn reset(&self);

    /// The device's state for snapshots. The snapshot work (issue 13) gives
    /// every device one; until a device has it, a snapshot must refuse the
    /// machine rather than lose the device's state
    /// ([`Registry::without_state`] lists them).
    fn state(&self) -> Option<&dyn DeviceState> {
        None
    }
}

/// A device's saved state, as the snapshot container stores it under the
/// device's id.
pub trait DeviceState: Send + Sync {
    /// The state as bytes, taken with the vCPUs parked.
    fn save(&self) -> Result<Vec<u8>, StateError>;
    /// Puts back what [`DeviceState::save`] returned.
    fn restore(&self, bytes: &[u8]) -> Result<(), StateError>;

    /// Before a save, with the vCPUs parked: finish the work in flight
    /// and stop the device's own threads, so that [`DeviceState::save`]
    /// sees a state nothing changes. Devices that work only on vCPU
    /// threads have nothing to do.
    fn quiesce(&self) {}

    /// After a save the VM goes on from: start what
    /// [`DeviceState::quiesce`] stopped.
    fn resume(&self) {}
}

/// Why a device's state could not be saved or restored.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StateError(pub String);

/// A device state as section bytes (CBOR, like the whole snapshot).
fn encode<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, StateError> {
    let mut bytes = Vec::new();
    ciborium::into_writer(value, &mut bytes).map_err(|e| StateError(e.to_string()))?;
    Ok(bytes)
}

/// Section bytes back into a device state.
fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, StateError> {
    ciborium::from_reader(bytes).map_err(|e| StateError(format!("unreadable state: {e}")))
}

/// A device whose state is one serde value, saved and put back whole.
macro_rules! serde_state {
    ($ty:ty, |$dev:ident| $save:expr, |$d:ident, $saved:ident| $restore:expr) => {
        impl DeviceState for $ty {
            fn save(&self) -> Result<Vec<u8>, StateError> {
                let $dev = self;
                encode(&$save)
            }
            fn restore(&self, bytes: &[u8]) -> Result<(), StateError> {
                let $d = self;
                let $saved = decode(bytes)?;
                $restore.map_err(|e: String| StateError(e))
            }
        }
    };
}

serde_state!(GicV3, |d| d.save_state(), |d, s| d.restore_state(s));
serde_state!(devices::pl011::Pl011, |d| d.save_state(), |d, s| d
    .restore_state(s));
serde_state!(devices::pl031::Pl031, |d| d.save_state(), |d, s| d
    .restore_state(s));
serde_state!(devices::avp_rtc::AvpRtc, |d| d.save_state(), |d, s| {
    d.restore_state(s);
    Ok(())
});
serde_state!(devices::pl061::Pl061, |d| d.save_state(), |d, s| d
    .restore_state(s));
serde_state!(
    devices::power_button::PowerButton,
    |d| d.save_state(),
    |d, s| {
        d.restore_state(s);
        Ok(())
    }
);
serde_state!(devices::apple_aes::AppleAes, |d| d.save_state(), |d, s| d
    .restore_state(s));
serde_state!(PciHost, |d| d.save_state(), |d, s| d
    .restore_state(&s)
    .map_err(|e| e.to_string()));
impl DeviceState for virtio::transport::pci::VirtioPciDevice {
    fn save(&self) -> Result<Vec<u8>, StateError> {
        encode(&self.save_state().map_err(StateError)?)
    }
    fn restore(&self, bytes: &[u8]) -> Result<(), StateError> {
        self.restore_state(&decode(bytes)?).map_err(StateError)
    }
    fn quiesce(&self) {
        virtio::transport::pci::VirtioPciDevice::quiesce(self);
    }
    fn resume(&self) {
        virtio::transport::pci::VirtioPciDevice::resume(self);
    }
}

impl DeviceState for usb::Xhci {
    fn save(&self) -> Result<Vec<u8>, StateError> {
        encode(&self.save_state().map_err(StateError)?)
    }
    fn restore(&self, bytes: &[u8]) -> Result<(), StateError> {
        self.restore_state(&decode(bytes)?).map_err(StateError)
    }
    fn quiesce(&self) {
        usb::Xhci::quiesce(self);
    }
    fn resume(&self) {
        usb::Xhci::resume(self);
    }
}

/// Devices with no state of their own: an empty section records that they
/// were there.
macro_rules! stateless {
    ($ty:ty) => {
        impl DeviceState for $ty {
            fn save(&self) -> Result<Vec<u8>, StateError> {
                Ok(Vec::new())
            }
            fn restore(&self, _bytes: &[u8]) -> Result<(), StateError> {
                Ok(())
            }
        }
    };
}

stateless!(devices::apple_bdif::Bdif);
stateless!(devices::pvpanic::PvPanic);

/// One MMIO window of a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Window {
    pub base: u64,
    pub size: u64,
    /// The bus region's name, in logs of guest accesses.
    pub name: String,
}

/// Who resets a device and holds its state.
#[derive(Clone)]
pub enum Hooks {
    /// The device itself.
    Own(Arc<dyn Device>),
    /// The parent device resets it: a PCI function is reset by the PCI
    /// host, which unmaps its BARs and resets its config space with it.
    /// The host saves the function's header; the function's own state
    /// (queues, rings, device registers) is `state`, or `None` while the
    /// function cannot save it.
    Parent {
        parent: DeviceId,
        state: Option<Arc<dyn DeviceState>>,
    },
}

impl Hooks {
    /// Where the device's state is, if it can save one.
    fn state(&self) -> Option<&dyn DeviceState> {
        match self {
            Self::Own(device) => device.state(),
            Self::Parent { state, .. } => state.as_deref(),
        }
    }
}

impl fmt::Debug for Hooks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Own(_) => f.write_str("Own"),
            Self::Parent { parent, state } => {
                write!(f, "Parent({parent}, state: {})", state.is_some())
            }
        }
    }
}

/// One attached device.
#[derive(Debug)]
pub struct Entry {
    id: DeviceId,
    windows: Vec<Window>,
    spis: Vec<u32>,
    pci_slot: Option<u8>,
    hooks: Hooks,
}

impl Entry {
    pub fn id(&self) -> &DeviceId {
        &self.id
    }

    /// Where the device is on the MMIO bus (none for a PCI function: its
    /// BARs move with the guest's programming).
    pub fn windows(&self) -> &[Window] {
        &self.windows
    }

    /// The GIC SPIs the device drives.
    pub fn spis(&self) -> &[u32] {
        &self.spis
    }

    /// The PCI slot (device number on bus 0) of a PCI function.
    pub fn pci_slot(&self) -> Option<u8> {
        self.pci_slot
    }

    pub fn hooks(&self) -> &Hooks {
        &self.hooks
    }
}

/// The interrupt lines a device gets while it is built; each one taken is
/// recorded in its entry.
pub struct Wires<'a> {
    gic: &'a Arc<GicV3>,
    spis: Vec<u32>,
}

impl Wires<'_> {
    /// The line of shared peripheral interrupt `spi` (INTID `spi + 32`).
    pub fn spi(&mut self, spi: u32) -> Arc<dyn IrqLine> {
        self.spis.push(spi);
        self.gic.spi(spi)
    }
}

/// A built device and its MMIO windows, for [`Registry::attach`].
pub struct Attachment<D> {
    device: Arc<D>,
    windows: Vec<(Window, Arc<dyn MmioDevice>)>,
}

impl<D: Device + 'static> Attachment<D> {
    pub fn new(device: Arc<D>) -> Self {
        Self {
            device,
            windows: Vec::new(),
        }
    }

    /// Maps `window` at `[base, base + size)`, named `name` on the bus.
    pub fn mmio(mut self, name: &str, base: u64, size: u64, window: Arc<dyn MmioDevice>) -> Self {
        self.windows.push((
            Window {
                base,
                size,
                name: name.to_owned(),
            },
            window,
        ));
        self
    }
}

/// The board's devices and the bus they are mapped on.
pub struct Registry {
    gic: Arc<GicV3>,
    /// Shared with the accelerator's exit handler once the machine runs;
    /// only while it is not may devices be attached.
    bus: Arc<MmioBus>,
    entries: Vec<Entry>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("entries", &self.entries)
            .finish()
    }
}

impl Registry {
    /// An empty bus whose devices' interrupts go to `gic`. The GIC itself
    /// is attached like any other device.
    pub fn new(gic: Arc<GicV3>) -> Self {
        Self {
            gic,
            bus: Arc::new(MmioBus::new()),
            entries: Vec::new(),
        }
    }

    /// Builds a device with the interrupt lines `build` takes from its
    /// [`Wires`], maps its windows and records it under `id`. Returns the
    /// device for whatever else the machine does with it; the registry
    /// keeps what reset (and snapshots) need.
    pub fn attach<D: Device + 'static>(
        &mut self,
        id: &str,
        build: impl FnOnce(&mut Wires) -> Result<Attachment<D>, MachineError>,
    ) -> Result<Arc<D>, MachineError> {
        let id = self.new_id(id)?;
        let mut wires = Wires {
            gic: &self.gic,
            spis: Vec::new(),
        };
        let attachment = build(&mut wires)?;
        let spis = wires.spis;
        let Some(bus) = Arc::get_mut(&mut self.bus) else {
            return Err(RegistryError::BusInUse(id).into());
        };
        let mut windows = Vec::new();
        for (window, device) in attachment.windows {
            bus.insert(window.base, window.size, window.name.clone(), device)
                .map_err(|source| MachineError::Bus {
                    name: format!("{id} ({})", window.name),
                    source,
                })?;
            windows.push(window);
        }
        let device = attachment.device;
        self.entries.push(Entry {
            id,
            windows,
            spis,
            pci_slot: None,
            hooks: Hooks::Own(device.clone()),
        });
        Ok(device)
    }

    /// Plugs `function` into the next free slot of `host` (which must be
    /// attached already, as `host_id`) and records it under `id`, with
    /// its `state` if it has one. The host resets it.
    pub fn attach_pci(
        &mut self,
        host_id: &str,
        host: &PciHost,
        id: &str,
        function: Arc<dyn PciDevice>,
        state: Option<Arc<dyn DeviceState>>,
    ) -> Result<u8, MachineError> {
        let id = self.new_id(id)?;
        let parent =
            self.get(host_id)
                .map(|e| e.id.clone())
                .ok_or_else(|| RegistryError::NoPciHost {
                    id: id.clone(),
                    host: host_id.to_owned(),
                })?;
        let name = function.name().to_owned();
        let slot = host
            .add_device(function)
            .map_err(|source| MachineError::Pci {
                name: format!("{id} ({name})"),
                source,
            })?;
        tracing::debug!(slot, "PCI 00:{slot:02x}.0 is {id} ({name})");
        self.entries.push(Entry {
            id,
            windows: Vec::new(),
            spis: Vec::new(),
            pci_slot: Some(slot),
            hooks: Hooks::Parent { parent, state },
        });
        Ok(slot)
    }

    fn new_id(&self, id: &str) -> Result<DeviceId, MachineError> {
        if self.get(id).is_some() {
            return Err(RegistryError::DuplicateId(id.to_owned()).into());
        }
        Ok(DeviceId(id.to_owned()))
    }

    /// The entry named `id`.
    pub fn get(&self, id: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.id.0 == id)
    }

    /// Every device, in attach order.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// The bus every window is on.
    pub fn bus(&self) -> &Arc<MmioBus> {
        &self.bus
    }

    /// Resets every device with a reset of its own, in attach order.
    pub fn reset(&self) {
        for entry in &self.entries {
            if let Hooks::Own(device) = &entry.hooks {
                tracing::trace!("reset {}", entry.id);
                device.reset();
            }
        }
    }

    /// Devices that hold their own state but cannot save it yet. A PCI
    /// function's configuration header is its host's; the state behind it
    /// (queues, rings, device registers) is its own, so a function
    /// attached without one is listed.
    pub fn without_state(&self) -> impl Iterator<Item = &DeviceId> {
        self.entries
            .iter()
            .filter(|e| e.hooks.state().is_none())
            .map(|e| &e.id)
    }

    /// Quiesces every device that has a state ([`DeviceState::quiesce`]),
    /// in attach order.
    pub fn quiesce(&self) {
        for entry in &self.entries {
            if let Some(state) = entry.hooks.state() {
                state.quiesce();
            }
        }
    }

    /// Resumes every device quiesced by [`Registry::quiesce`].
    pub fn resume(&self) {
        for entry in &self.entries {
            if let Some(state) = entry.hooks.state() {
                state.resume();
            }
        }
    }

    /// Every device's saved state, keyed by its id, in attach order; an
    /// error names the first device that cannot (the caller checks
    /// [`Registry::without_state`] first for a better message).
    pub fn save_states(&self) -> Result<Vec<Section>, (DeviceId, StateError)> {
        let mut out = Vec::new();
        for entry in &self.entries {
            let state = entry
                .hooks
                .state()
                .ok_or_else(|| (entry.id.clone(), StateError("cannot save its state".into())))?;
            out.push((
                entry.id.clone(),
                state.save().map_err(|e| (entry.id.clone(), e))?,
            ));
        }
        Ok(out)
    }

    /// Restores every device from `sections` (id, bytes). The ids must be
    /// exactly this registry's, in the same order.
    pub fn restore_states(
        &self,
        sections: &[(String, Vec<u8>)],
    ) -> Result<(), (String, StateError)> {
        let ours: Vec<&str> = self.entries.iter().map(|e| e.id.as_str()).collect();
        let theirs: Vec<&str> = sections.iter().map(|(id, _)| id.as_str()).collect();
        if ours != theirs {
            return Err((
                "machine".into(),
                StateError(format!(
                    "the snapshot's devices are {} but this machine's are {}",
                    theirs.join(", "),
                    ours.join(", ")
                )),
            ));
        }
        for (entry, (_, bytes)) in self.entries.iter().zip(sections) {
            let Some(state) = entry.hooks.state() else {
                return Err((entry.id.to_string(), StateError("cannot restore".into())));
            };
            state
                .restore(bytes)
                .map_err(|e| (entry.id.to_string(), e))?;
        }
        Ok(())
    }
}

// The board's devices. Each says here how it resets; one without state of
// its own to reset says so.

impl Device for GicV3 {
    fn state(&self) -> Option<&dyn DeviceState> {
        Some(self)
    }

    fn reset(&self) {
        GicV3::reset(self);
    }
}

impl Device for devices::avp_rtc::AvpRtc {
    fn state(&self) -> Option<&dyn DeviceState> {
        Some(self)
    }

    fn reset(&self) {
        devices::avp_rtc::AvpRtc::reset(self);
    }
}

impl Device for devices::pl011::Pl011 {
    fn state(&self) -> Option<&dyn DeviceState> {
        Some(self)
    }

    fn reset(&self) {
        devices::pl011::Pl011::reset(self);
    }
}

impl Device for devices::pl031::Pl031 {
    fn state(&self) -> Option<&dyn DeviceState> {
        Some(self)
    }

    fn reset(&self) {
        devices::pl031::Pl031::reset(self);
    }
}

impl Device for devices::pl061::Pl061 {
    fn state(&self) -> Option<&dyn DeviceState> {
        Some(self)
    }

    fn reset(&self) {
        devices::pl061::Pl061::reset(self);
    }
}

impl Device for devices::power_button::PowerButton {
    fn state(&self) -> Option<&dyn DeviceState> {
        Some(self)
    }

    fn reset(&self) {
        devices::power_button::PowerButton::reset(self);
    }
}

impl Device for devices::apple_aes::AppleAes {
    fn state(&self) -> Option<&dyn DeviceState> {
        Some(self)
    }

    fn reset(&self) {
        devices::apple_aes::AppleAes::reset(self);
    }
}

impl Device for devices::apple_bdif::Bdif {
    fn state(&self) -> Option<&dyn DeviceState> {
        Some(self)
    }

    /// Every request is complete when its doorbell write returns: nothing
    /// to reset.
    fn reset(&self) {}
}

impl Device for devices::pvpanic::PvPanic {
    fn state(&self) -> Option<&dyn DeviceState> {
        Some(self)
    }

    /// Write-only events: nothing to reset.
    fn reset(&self) {}
}

impl Device for PciHost {
    fn state(&self) -> Option<&dyn DeviceState> {
        Some(self)
    }

    /// Unmaps the BARs and resets every function's config space and the
    /// function itself.
    fn reset(&self) {
        PciHost::reset(self);
    }
}

impl Device for apple_gfx::AppleGfx {
    /// Drains the framework's work, which may call back into the device.
    fn reset(&self) {
        apple_gfx::AppleGfx::reset(self);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gic::CpuInterruptOutputs;
    use std::sync::atomic::{AtomicU32, Ordering};
    use vm_core::AccessWidth;

    struct NoCpus;
    impl CpuInterruptOutputs for NoCpus {
        fn set(&self, _cpu: usize, _irq: bool, _fiq: bool) {}
    }

    /// A one-register device that counts its resets.
    #[derive(Debug, Default)]
    struct Counting {
        resets: AtomicU32,
        value: AtomicU32,
    }

    impl MmioDevice for Counting {
        fn read(&self, _offset: u64, _width: AccessWidth) -> u64 {
            self.value.load(Ordering::SeqCst).into()
        }
        fn write(&self, _offset: u64, _width: AccessWidth, value: u64) {
            self.value.store(value as u32, Ordering::SeqCst);
        }
    }

    impl Device for Counting {
        fn reset(&self) {
            self.resets.fetch_add(1, Ordering::SeqCst);
            self.value.store(0, Ordering::SeqCst);
        }
    }

    fn registry() -> Registry {
        Registry::new(GicV3::new(1, 64, Arc::new(NoCpus)))
    }

    #[test]
    fn an_attached_device_is_mapped_wired_and_reset() {
        let mut reg = registry();
        let dev = reg
            .attach("counting", |wires| {
                let _line = wires.spi(3);
                let dev = Arc::new(Counting::default());
                Ok(Attachment::new(dev.clone()).mmio("counting", 0x1000, 0x100, dev))
            })
            .unwrap();
        reg.bus().write(0x1004, AccessWidth::Word, 7).unwrap();
        assert_eq!(reg.bus().read(0x1000, AccessWidth::Word).unwrap(), 7);

        let entry = reg.get("counting").unwrap();
        assert_eq!(entry.spis(), [3]);
        assert_eq!(
            entry.windows(),
            [Window {
                base: 0x1000,
                size: 0x100,
                name: "counting".into()
            }]
        );

        reg.reset();
        assert_eq!(dev.resets.load(Ordering::SeqCst), 1);
        assert_eq!(reg.bus().read(0x1000, AccessWidth::Word).unwrap(), 0);
        assert_eq!(
            reg.without_state()
                .map(|id| id.as_str())
                .collect::<Vec<_>>(),
            ["counting"]
        );
    }

    #[test]
    fn ids_are_unique_and_windows_may_not_overlap() {
        let mut reg = registry();
        let build = |base| {
            move |_: &mut Wires| {
                let dev = Arc::new(Counting::default());
                Ok(Attachment::new(dev.clone()).mmio("c", base, 0x100, dev))
            }
        };
        reg.attach("a", build(0x1000)).unwrap();
        assert!(reg.attach("a", build(0x2000)).is_err());
        assert!(reg.attach("b", build(0x1080)).is_err());
        assert_eq!(reg.entries().len(), 1);
    }

    #[test]
    fn nothing_is_attached_once_the_bus_is_shared() {
        let mut reg = registry();
        let _running = reg.bus().clone();
        let err = reg
            .attach("late", |_| {
                let dev = Arc::new(Counting::default());
                Ok(Attachment::new(dev.clone()).mmio("late", 0, 0x100, dev))
            })
            .unwrap_err();
        let line = vm_core::error_chain::Chain(&err).to_string();
        assert!(line.contains("bus is in use"), "{line}");
    }

    /// A virtio-blk function whose driver runs queue 0 at `(7, 5)`, as
    /// its section bytes.
    fn blk_function() -> virtio::transport::pci::VirtioPciDevice {
        let memory = vm_core::memory::create_guest_memory(&[(0x4000_0000, 0x10_0000)]).unwrap();
        let disk = Arc::new(block::MemoryDisk::new(vec![0; 1 << 20], false));
        let blk = virtio::block::VirtioBlock::new(disk, Default::default());
        virtio::transport::pci::VirtioPciDevice::new(Box::new(blk), memory)
    }

    fn running_blk_state() -> Vec<u8> {
        use virtio::transport::pci::{SavedQueue, SavedVirtioPci};
        encode(&SavedVirtioPci {
            device_feature_select: 1,
            driver_feature_select: 1,
            driver_features: virtio::device::VIRTIO_F_VERSION_1,
            status: 0xf,
            queue_select: 0,
            queues: vec![SavedQueue {
                size: 16,
                enabled: true,
                desc: 0x4000_1000,
                driver: 0x4000_2000,
                device: 0x4000_3000,
            }],
            positions: vec![(7, 5)],
            live: true,
            bus_master: true,
            isr: 1,
            config_generation: 3,
            pci_cfg_window: vec![0; 16],
            config_vector: virtio::transport::pci::NO_VECTOR,
            queue_vectors: vec![virtio::transport::pci::NO_VECTOR],
            msix: None,
            device: None,
        })
        .unwrap()
    }

    #[test]
    fn a_virtio_blk_function_state_round_trips_through_its_section() {
        let bytes = running_blk_state();
        let f = blk_function();
        DeviceState::restore(&f, &bytes).unwrap();
        assert_eq!(f.status(), 0xf);
        assert_eq!(DeviceState::save(&f).unwrap(), bytes);
    }

    #[test]
    fn a_damaged_virtio_section_never_panics_and_a_refused_one_changes_nothing() {
        let good = running_blk_state();
        let pristine = DeviceState::save(&blk_function()).unwrap();
        for at in 0..good.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut bad = good.clone();
                bad[at] ^= flip;
                let f = blk_function();
                if DeviceState::restore(&f, &bad).is_err() {
                    assert_eq!(
                        DeviceState::save(&f).unwrap(),
                        pristine,
                        "byte {at} ^ {flip:#x}"
                    );
                }
            }
            let f = blk_function();
            let _ = DeviceState::restore(&f, &good[..at]);
        }
    }
}
