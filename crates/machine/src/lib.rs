//! The vmapple board: QEMU's `-M vmapple` as a Rust machine.
//!
//! [`Machine::new`] builds the memory map of vmapple-machine.md §2 (guest
//! memory for the ROM, cfg and RAM regions; an MMIO bus for the rest) and
//! attaches the devices in three steps, platform, PCI and display, each
//! device through the [`registry`], which maps it on the bus, wires its
//! interrupts to the GIC as §3 says and keeps its reset.
//! [`Machine::run`] boots it on any accelerator and handles resets until
//! the guest powers off or something stops it.

pub mod adt;
pub mod boot;
pub mod display;
pub mod exits;
pub mod fdt;
pub mod handle;
pub mod layout;
pub mod msi;
pub mod pci_devices;
mod platform;
pub mod registry;
pub mod snapshot;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use accel::{AccelError, CpuSnapshot, StopReason, VcpuConfig, Vm, VmControl};
use arch_arm64::timer::{Counter, COUNTER_HZ};
use arch_arm64::Mpidr;
use block::{BlockBackend, DiskImage, MemoryDisk};
use devices::apple_aes::FifoResetPolicy;
use devices::apple_cfg::CfgParams;
use devices::clock::TimerThread;
use devices::power_button::PowerButton;
use devices::serial::{SerialBackend, SerialHandle};
use gic::{CpuInterruptOutputs, GicV3};
use handle::{EventBus, MachineEvent, MachineHandle};
use pci::PciHost;
pub use pci_devices::{default_mac, MacAddress, NetBackend, NicSpec};
use registry::Registry;
use vm_core::{GuestRam, MmioBus};

use crate::display::{DisplayConfig, GfxBackend, GpuKind};
use boot::{BootError, Firmware, LinuxImages};
use exits::MachineExits;
use layout::*;

/// Fewest and most vCPUs (vmapple-machine.md §4).
pub const MIN_CPUS: usize = 1;
pub const MAX_CPUS: usize = arch_arm64::mpidr::MAX_CPUS;
/// RAM limits: enough for firmware to run, and what fits below the
/// 48-bit physical address space with room to spare.
pub const MIN_RAM: u64 = 16 << 20;
pub const MAX_RAM: u64 = 1 << 40;

/// What CPU 0 boots.
#[derive(Clone, Debug)]
pub enum BootSource {
    /// A boot ROM image for the 1 MiB region at 0x10_0000.
    Firmware(PathBuf),
    /// A Linux kernel with an optional initramfs and command line, booted
    /// directly with a generated device tree.
    Linux {
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        cmdline: String,
    },
}

pub use vm_config::{DiskSpec, PanicPolicy, ShareSpec};

/// Everything needed to build a machine.
#[derive(Clone, Debug)]
pub struct MachineConfig {
    pub cpus: usize,
    pub ram_size: u64,
    pub boot: BootSource,
    pub serial: SerialBackend,
    /// The platform description for the boot ROM (§8). `nr_cpus`,
    /// `ram_size` and `rnd` are filled in by the machine.
    pub platform: CfgParams,
    /// The aux volume: the boot ROM reads it through the backdoor block
    /// interface (§9); the running OS through Apple's virtio-blk variant.
    pub aux: Option<DiskSpec>,
    /// The root volume, likewise.
    pub root: Option<DiskSpec>,
    /// What the AES engine does with its command FIFO at reset (§10.8, Q4).
    pub aes_fifo_on_reset: FifoResetPolicy,
    pub on_panic: PanicPolicy,
    /// virtio-net devices, in slot order.
    pub nics: Vec<NicSpec>,
    /// Plain virtio-blk disks, after the Apple ones.
    pub disks: Vec<DiskSpec>,
    /// The XHCI controller with a USB keyboard and tablet (§7.3; QEMU
    /// leaves it out with -nodefaults).
    pub usb: bool,
    /// The apple-gfx-mmio display; `None` leaves it out. It needs
    /// ParavirtualizedGraphics.framework, so elsewhere than on macOS
    /// (Apple silicon) the machine has no display even when one is asked
    /// for without a window.
    pub display: Option<DisplayConfig>,
    /// Message-signalled interrupts: the GICv2m frame, the GIC's
    /// message-based SPIs and MSI-X on the PCI functions (see [`msi`]).
    /// Off in QEMU's machine, so off by default.
    pub msi: bool,
    /// Offer pointer authentication on the software CPU (macOS guests
    /// sign pointers; Linux guests run faster without).
    pub pointer_auth: bool,
    /// Host directories shared over virtio-fs, after the disks.
    pub shares: Vec<ShareSpec>,
    /// virtio-vsock with its host side on Unix sockets; `None` leaves the
    /// device out.
    pub vsock: Option<VsockConfig>,
}

/// virtio-vsock's host side.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VsockConfig {
    /// The socket vmapple listens on for `CONNECT PORT`; guest
    /// connections to host port P go to `<path>_P`.
    pub path: PathBuf,
    /// The guest's context id (3 or more).
    pub guest_cid: u64,
}

/// The guest context id when none is given.
pub const DEFAULT_GUEST_CID: u64 = 3;

impl MachineConfig {
    /// A configuration with QEMU's defaults for everything but what must
    /// be given.
    pub fn new(cpus: usize, ram_size: u64, boot: BootSource, serial: SerialBackend) -> Self {
        Self {
            cpus,
            ram_size,
            boot,
            serial,
            platform: CfgParams::default(),
            aux: None,
            root: None,
            aes_fifo_on_reset: FifoResetPolicy::default(),
            on_panic: PanicPolicy::default(),
            nics: Vec::new(),
            disks: Vec::new(),
            usb: true,
            display: None,
            msi: false,
            pointer_auth: false,
            shares: Vec::new(),
            vsock: None,
        }
    }
}

/// A cause carried along without a type of its own (the display
/// framework's, which differs per host).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Configuration mistakes and host failures, each with a message for the
/// user; the underlying error, if any, is the [`source`].
///
/// [`source`]: std::error::Error::source
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    #[error("--cpus {0} is out of range: the vmapple machine has {MIN_CPUS} to {MAX_CPUS} CPUs")]
    CpuCount(usize),
    #[error("--memory {0} is out of range: give at least 16 MiB and at most 1 TiB, in whole MiB")]
    RamSize(u64),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error("cannot allocate {mib} MiB of guest RAM")]
    Memory {
        mib: u64,
        #[source]
        source: vm_core::memory::MemoryError,
    },
    #[error("serial port")]
    Serial(#[from] devices::serial::SerialError),
    #[error("machine configuration")]
    Platform(#[from] devices::apple_cfg::CfgError),
    #[error("--{which}")]
    Disk {
        which: &'static str,
        #[source]
        source: block::OpenError,
    },
    #[error("--{which} {}", path.display())]
    DiskOffset {
        which: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("network backend {backend}")]
    Net {
        backend: NetBackend,
        #[source]
        source: std::io::Error,
    },
    #[error("share {tag}")]
    Share {
        tag: String,
        #[source]
        source: virtio::fs::ShareError,
    },
    #[error("vsock")]
    Vsock(#[from] virtio::vsock::VsockError),
    #[error("share tag {0:?} is used twice")]
    ShareTagTwice(String),
    #[error("display: {what}")]
    Display {
        what: &'static str,
        #[source]
        source: Option<BoxError>,
    },
    #[error(transparent)]
    Accel(#[from] AccelError),
    #[error("machine assembly: cannot map {name}")]
    Bus {
        name: String,
        #[source]
        source: vm_core::bus::BusError,
    },
    #[error("machine assembly: PCI: cannot add {name}")]
    Pci {
        name: String,
        #[source]
        source: pci::PciError,
    },
    #[error("machine assembly")]
    Registry(#[from] registry::RegistryError),
    #[error("cannot start the {name} thread")]
    Thread {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("machine assembly: cfg region")]
    CfgRegion(#[source] vm_core::memory::MemoryError),
    #[error("snapshot {}", path.display())]
    Snapshot {
        path: PathBuf,
        #[source]
        source: snapshot::SnapshotError,
    },
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunOutcome {
    /// The guest powered off.
    PoweredOff,
    /// The guest crashed a vCPU; the report says how.
    GuestCrashed(String),
    /// The guest kept resetting (see [`ResetLoopDetector`]).
    ResetLoop,
    /// The guest reported a panic and policy said stop.
    GuestPanicked,
    /// The host stopped the VM.
    HostStopped,
}

/// A reset loop is [`ResetLoopDetector::LIMIT`] resets in a row, each
/// within [`ResetLoopDetector::WINDOW`] of the previous one: a guest that
/// cannot get past early boot. Legitimate resets (an installer, an update)
/// are far apart.
#[derive(Debug, Default)]
pub struct ResetLoopDetector {
    last: Option<Instant>,
    quick_in_a_row: u32,
}

impl ResetLoopDetector {
    pub const LIMIT: u32 = 10;
    pub const WINDOW: Duration = Duration::from_secs(10);

    /// Records a reset at `now`; true if this one completes a loop.
    pub fn record(&mut self, now: Instant) -> bool {
        let quick = self
            .last
            .is_some_and(|last| now.saturating_duration_since(last) < Self::WINDOW);
        self.quick_in_a_row = if quick { self.quick_in_a_row + 1 } else { 1 };
        self.last = Some(now);
        self.quick_in_a_row >= Self::LIMIT
    }
}

/// The GIC's CPU outputs drive the vCPUs' IRQ/FIQ inputs.
struct GicToCpus(Arc<VmControl>);

impl CpuInterruptOutputs for GicToCpus {
    fn set(&self, cpu: usize, irq: bool, fiq: bool) {
        self.0.set_interrupt_lines(cpu, irq, fiq);
    }
}

enum Boot {
    Firmware(Firmware),
    Linux(Box<LinuxImages>),
}

impl Boot {
    fn load(config: &MachineConfig) -> Result<Self, MachineError> {
        Ok(match &config.boot {
            BootSource::Firmware(path) => Self::Firmware(Firmware::load(path)?),
            BootSource::Linux {
                kernel,
                initrd,
                cmdline,
            } => Self::Linux(Box::new(LinuxImages::load(
                kernel,
                initrd.as_deref(),
                cmdline.clone(),
                config.ram_size,
            )?)),
        })
    }
}

/// The boot ROM's and the OS's disks, opened once: the backdoor block
/// interface and the Apple virtio-blk functions share the aux and root
/// images.
pub(crate) struct Disks {
    pub aux: Arc<dyn BlockBackend>,
    pub root: Arc<dyn BlockBackend>,
    /// Plain virtio-blk disks, with the paths they came from.
    pub extra: Vec<(PathBuf, Arc<dyn BlockBackend>)>,
}

impl Disks {
    fn open(config: &MachineConfig) -> Result<Self, MachineError> {
        let open = |which: &'static str, spec: Option<&DiskSpec>| match spec {
            Some(spec) => {
                let image: Arc<dyn BlockBackend> = Arc::new(
                    DiskImage::open(&spec.path, spec.read_only)
                        .map_err(|source| MachineError::Disk { which, source })?,
                );
                if spec.offset == 0 {
                    Ok(image)
                } else {
                    block::OffsetDisk::new(image, spec.offset)
                        .map(|d| Arc::new(d) as Arc<dyn BlockBackend>)
                        .map_err(|source| MachineError::DiskOffset {
                            which,
                            path: spec.path.clone(),
                            source,
                        })
                }
            }
            // No drive: every backdoor read fails with status 1, as
            // reading past the end of an empty disk would.
            None => Ok(Arc::new(MemoryDisk::new(Vec::new(), true)) as Arc<dyn BlockBackend>),
        };
        let aux = open("aux", config.aux.as_ref())?;
        let root = open("root", config.root.as_ref())?;
        let mut extra = Vec::new();
        for spec in &config.disks {
            extra.push((spec.path.clone(), open("disk", Some(spec))?));
        }
        Ok(Self { aux, root, extra })
    }
}

/// The assembled vmapple machine.
pub struct Machine {
    cpus: usize,
    pointer_auth: bool,
    ram_size: u64,
    memory: GuestRam,
    /// Every device, its windows on the bus and its reset.
    registry: Registry,
    gic: Arc<GicV3>,
    pci: Arc<PciHost>,
    input: Option<usb::InputSink>,
    /// The display model the display device (apple-gfx-mmio or
    /// virtio-gpu) feeds, when there is one.
    screen: Option<Arc<::display::Display>>,
    power_button: Arc<PowerButton>,
    events: Arc<EventBus>,
    /// Threads that fire the RTC alarm and end the power button's pulse.
    _timers: Vec<TimerThread>,
    /// The cfg region's contents, rebuilt into guest memory at every reset.
    platform_image: Vec<u8>,
    control: Arc<VmControl>,
    counter: Arc<Counter>,
    boot: Boot,
    _serial: SerialHandle,
    /// What a snapshot records of this machine's configuration.
    saved_machine: snapshot::SavedMachine,
    /// Save requests from the handle, served between accelerator runs.
    saves: Arc<snapshot::SaveSlot>,
    /// A restored snapshot's vCPUs, put on the accelerator when it runs.
    pending: Option<Pending>,
    /// The disk files by id, whose identities a snapshot records.
    disk_files: Vec<(String, DiskSpec)>,
}

/// What [`Machine::restore`] leaves for [`Machine::run`].
struct Pending {
    path: PathBuf,
    accelerator: String,
    cpus: Vec<u8>,
    powers: Vec<accel::CpuPower>,
    /// Disk copies to put in place once nothing can refuse the restore.
    disks: snapshot::disks::Prepared,
}

impl Machine {
    /// Builds the machine: the board's fixed devices, the PCI bus, then
    /// the display, whose device (if `config` asks for one) comes from
    /// `display`'s framework. A window display without a backend, or whose
    /// device cannot be created, is an error; a windowless one is left
    /// out with a warning, and the guest then has no display.
    pub fn new(config: MachineConfig, display: Option<GfxBackend>) -> Result<Self, MachineError> {
        Self::build(config, display, None)
    }

    /// Builds the machine `config` describes around the memory of
    /// `snapshot` (mapped copy-on-write, read lazily) and puts every
    /// device back as saved; [`Machine::run`] then continues the vCPUs
    /// instead of booting. A snapshot of another configuration is refused,
    /// naming each difference.
    pub fn restore(
        config: MachineConfig,
        display: Option<GfxBackend>,
        snapshot: snapshot::Snapshot,
    ) -> Result<Self, MachineError> {
        let path = snapshot.path.clone();
        let fail = |source| MachineError::Snapshot {
            path: path.clone(),
            source,
        };
        // Shape first: a wrong --cpus or --memory must not cost a mapping.
        let h = &snapshot.header;
        if h.machine.cpus != config.cpus || h.machine.ram_size != config.ram_size {
            let ours = snapshot::SavedMachine {
                cpus: config.cpus,
                ram_size: config.ram_size,
                ..h.machine.clone()
            };
            return Err(fail(snapshot::SnapshotError::Mismatch(
                ours.differences(&h.machine),
            )));
        }
        // The disks: each as it was at the save, or a copy to put back.
        let disk_files =
            snapshot::disks::listed(config.aux.as_ref(), config.root.as_ref(), &config.disks);
        let mut config = config;
        let disks = {
            let mut run = snapshot::disks::listed_mut(
                config.aux.as_mut(),
                config.root.as_mut(),
                &mut config.disks,
            );
            snapshot::disks::prepare(&snapshot.path, &h.disks, &mut run, snapshot.force)
                .map_err(fail)?
        };
        let memory = snapshot::ram::map_private(&snapshot.file, &h.ram)
            .map_err(|e| fail(snapshot::SnapshotError::Corrupt(e)))?;
        let mut machine = Self::build(config, display, Some(memory)).map_err(|e| match e {
            // Another VM from the same snapshot has the disk.
            MachineError::Disk {
                which,
                source: source @ block::OpenError::Locked { .. },
            } => {
                let path = match &source {
                    block::OpenError::Locked { path, .. } => path.display().to_string(),
                    _ => String::new(),
                };
                fail(snapshot::SnapshotError::DiskInUse {
                    disk: format!("--{which} {path}"),
                    source,
                })
            }
            e => e,
        })?;
        machine.disk_files = disk_files;
        let differences = machine.saved_machine.differences(&h.machine);
        if !differences.is_empty() {
            return Err(fail(snapshot::SnapshotError::Mismatch(differences)));
        }
        // Devices' timers read the guest counter: set it first, held until
        // the vCPUs run.
        machine.counter.pause();
        machine.counter.set(h.counter);
        machine
            .registry
            .restore_states(&snapshot.device_sections())
            .map_err(|(id, e)| {
                fail(snapshot::SnapshotError::Device {
                    id,
                    message: e.to_string(),
                })
            })?;
        machine.pending = Some(Pending {
            path: path.clone(),
            accelerator: h.accelerator.clone(),
            cpus: h.cpus.bytes.clone(),
            powers: h.powers.clone(),
            disks,
        });
        Ok(machine)
    }

    fn build(
        config: MachineConfig,
        display: Option<GfxBackend>,
        restored: Option<GuestRam>,
    ) -> Result<Self, MachineError> {
        if !(MIN_CPUS..=MAX_CPUS).contains(&config.cpus) {
            return Err(MachineError::CpuCount(config.cpus));
        }
        if !(MIN_RAM..=MAX_RAM).contains(&config.ram_size) || config.ram_size % (1 << 20) != 0 {
            return Err(MachineError::RamSize(config.ram_size));
        }
        let platform_image = CfgParams {
            nr_cpus: config.cpus as u32,
            ram_size: config.ram_size,
            rnd: random_u32(),
            ..config.platform.clone()
        }
        .build()?;
        let disk_files =
            snapshot::disks::listed(config.aux.as_ref(), config.root.as_ref(), &config.disks);
        let disks = Disks::open(&config)?;
        if matches!(config.boot, BootSource::Firmware(_)) && config.aux.is_none() {
            tracing::warn!(
                "no --aux disk: a boot ROM that loads the OS through the backdoor will fail"
            );
        }
        // Read the boot files first: a wrong path should not cost a
        // multi-gigabyte allocation.
        let boot = Boot::load(&config)?;
        let layout = [
            (FIRMWARE_BASE, FIRMWARE_SIZE as usize),
            (CFG_BASE, CFG_SIZE as usize),
            (RAM_BASE, config.ram_size as usize),
        ];
        let memory = match restored {
            Some(memory) => {
                use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
                let got: Vec<(u64, usize)> = memory
                    .iter()
                    .map(|r| (r.start_addr().0, r.len() as usize))
                    .collect();
                if got != layout {
                    return Err(MachineError::Memory {
                        mib: config.ram_size >> 20,
                        source: vm_core::memory::MemoryError::Map(
                            "the snapshot's memory regions are not this machine's".into(),
                        ),
                    });
                }
                memory
            }
            None => vm_core::memory::create_guest_memory(&layout).map_err(|source| {
                MachineError::Memory {
                    mib: config.ram_size >> 20,
                    source,
                }
            })?,
        };
        let control = Arc::new(VmControl::new(config.cpus));
        let core = platform::Core {
            memory,
            gic: GicV3::new(config.cpus, GIC_SPIS, Arc::new(GicToCpus(control.clone()))),
            control,
            counter: Arc::new(Counter::new(COUNTER_HZ)),
            events: Arc::new(EventBus::default()),
        };

        let mut registry = Registry::new(core.gic.clone());
        let platform = platform::attach(&mut registry, &core, &config, &disks)?;
        let virtio_display = match config.display.as_ref() {
            Some(d) if d.device == GpuKind::Virtio => {
                if d.heads.len() > display::MAX_HEADS {
                    return Err(MachineError::Display {
                        what: "virtio-gpu has at most 4 heads",
                        source: None,
                    });
                }
                Some(::display::Display::new(d.head_modes()))
            }
            _ => None,
        };
        let pci =
            pci_devices::attach(&mut registry, &core, &config, disks, virtio_display.clone())?;
        let gfx = display::attach(&mut registry, &core, config.display.as_ref(), display, &pci)?;
        let screen = virtio_display.or(gfx);
        if let (Some(screen), Some(input)) = (&screen, &pci.input) {
            screen.set_input(Arc::new(display::UsbInput(input.clone())));
        }

        let platform::Core {
            memory,
            gic,
            control,
            counter,
            events,
        } = core;
        let saved_machine = snapshot::SavedMachine {
            cpus: config.cpus,
            ram_size: config.ram_size,
            devices: registry
                .entries()
                .iter()
                .map(|e| e.id().to_string())
                .collect(),
            platform: format!(
                "{:?}",
                CfgParams {
                    rnd: 0,
                    ..config.platform.clone()
                }
            ),
            msi: config.msi,
            pointer_auth: config.pointer_auth,
        };
        Ok(Self {
            saved_machine,
            saves: Arc::default(),
            pending: None,
            disk_files,
            cpus: config.cpus,
            pointer_auth: config.pointer_auth,
            ram_size: config.ram_size,
            memory,
            registry,
            gic,
            pci: pci.host,
            input: pci.input,
            screen,
            power_button: platform.power_button,
            events,
            _timers: platform.timers,
            platform_image,
            control,
            counter,
            boot,
            _serial: platform.serial,
        })
    }

    pub fn memory(&self) -> &GuestRam {
        &self.memory
    }

    /// A remote control for signals, the control socket and UIs.
    pub fn handle(&self) -> MachineHandle {
        let button = self.power_button.clone();
        MachineHandle {
            control: self.control.clone(),
            counter: self.counter.clone(),
            events: self.events.clone(),
            power_button: Arc::new(move || button.press()),
            saves: self.saves.clone(),
        }
    }

    /// Where keyboard and pointer input for the USB devices goes; `None`
    /// without USB.
    pub fn input_sink(&self) -> Option<usb::InputSink> {
        self.input.clone()
    }

    /// The display as host-side front ends see it; `None` without one.
    pub fn screen(&self) -> Option<Arc<::display::Display>> {
        self.screen.clone()
    }

    pub fn control(&self) -> Arc<VmControl> {
        self.control.clone()
    }

    pub fn counter(&self) -> Arc<Counter> {
        self.counter.clone()
    }

    pub fn bus(&self) -> &MmioBus {
        self.registry.bus()
    }

    /// Every device of the machine, for snapshots and inspection.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Per-vCPU wiring for the accelerator.
    pub fn vcpu_configs(&self) -> Vec<VcpuConfig> {
        (0..self.cpus)
            .map(|cpu| VcpuConfig {
                mpidr: Mpidr::for_cpu(cpu).0,
                vtimer_irq: self.gic.ppi(cpu, PPI_VTIMER),
                pointer_auth: self.pointer_auth,
            })
            .collect()
    }

    /// Puts the boot images in guest memory; returns CPU 0's entry and x0.
    fn install_boot(&self) -> Result<(u64, u64), MachineError> {
        devices::apple_cfg::install(&self.memory, CFG_BASE, CFG_SIZE, &self.platform_image)
            .map_err(MachineError::CfgRegion)?;
        match &self.boot {
            Boot::Firmware(firmware) => {
                firmware.install(&self.memory);
                Ok((FIRMWARE_BASE, 0))
            }
            Boot::Linux(images) => {
                let mut params = fdt::FdtParams {
                    cpus: self.cpus,
                    ram_size: self.ram_size,
                    cmdline: images.cmdline.clone(),
                    rng_seed: random_seed(),
                    rtc: true,
                    gpio_power_key: true,
                    pci_interrupt_map: Some(
                        self.pci
                            .interrupt_map_cells(fdt::GIC_PHANDLE, fdt::GIC_ADDRESS_CELLS),
                    ),
                    message_intids: Some(self.gic.message_intids()).filter(|r| !r.is_empty()),
                    ..Default::default()
                };
                // The blob's size hardly depends on the initrd addresses:
                // plan with a first build, then build the real one.
                let sizing = fdt::build(&params).map_err(BootError::DeviceTree)?;
                let placement = images.plan(self.ram_size, sizing.len() as u64)?;
                params.initrd = placement.initrd;
                let blob = fdt::build(&params).map_err(BootError::DeviceTree)?;
                images.install(&self.memory, &placement, &blob);
                Ok((placement.entry, placement.dtb))
            }
        }
    }

    /// Machine reset: every device in the registry, in attach order. No
    /// machine lock is held (the display drains framework work that may
    /// call back into its device).
    fn reset_devices(&self) {
        self.registry.reset();
    }

    /// Boots the machine on `vm` and runs it, through guest resets, until
    /// it stops for good.
    pub fn run(&mut self, vm: &mut dyn Vm) -> Result<RunOutcome, MachineError> {
        let result = self.run_inner(vm);
        // Nobody serves saves any more: refuse new ones, fail a waiting one.
        *vm_core::sync::lock(&self.saves.refusal) = None;
        if let Some(request) = vm_core::sync::lock(&self.saves.request).take() {
            let _ = request.reply.send(Err(snapshot::SnapshotError::Stopped));
        }
        result
    }

    fn run_inner(&mut self, vm: &mut dyn Vm) -> Result<RunOutcome, MachineError> {
        let exits = MachineExits {
            bus: self.registry.bus().clone(),
            gic: self.gic.clone(),
            control: self.control.clone(),
            memory: self.memory.clone(),
        };
        let mut resets = ResetLoopDetector::default();
        let refusal = self.cannot_save(vm);
        *vm_core::sync::lock(&self.saves.refusal) = Some(refusal);
        let mut boot = true;
        if let Some(pending) = self.pending.take() {
            self.resume_restored(vm, pending)?;
            boot = false;
        }
        loop {
            if boot {
                let (entry, x0) = self.install_boot()?;
                tracing::info!(
                    accelerator = vm.name(),
                    cpus = self.cpus,
                    ram_mib = self.ram_size >> 20,
                    "starting at {entry:#x}"
                );
                self.control.reset_for_boot(entry, x0);
            }
            boot = true;
            let reason = vm.run(&exits, &self.control)?;
            if reason == StopReason::Save {
                let stop = self.serve_save(vm);
                if stop {
                    self.control.request_stop(StopReason::HostStop);
                }
                // If another stop came during the save, it stays and the
                // next run returns it at once.
                self.control.clear_save();
                boot = false;
                continue;
            }
            // A reset or stop ends any pause; the clock runs again for the
            // next boot.
            self.control.resume();
            self.counter.resume();
            if reason != StopReason::Reset {
                self.events.publish(MachineEvent::Stopped {
                    reason: format!("{reason:?}"),
                });
            }
            match reason {
                StopReason::PowerOff => return Ok(RunOutcome::PoweredOff),
                StopReason::Reset => {
                    if resets.record(Instant::now()) {
                        tracing::error!(
                            "the guest reset {} times in a row within {:?} of each other; giving up",
                            ResetLoopDetector::LIMIT,
                            ResetLoopDetector::WINDOW
                        );
                        return Ok(RunOutcome::ResetLoop);
                    }
                    tracing::info!("resetting the machine");
                    self.events.publish(MachineEvent::Reset);
                    self.reset_devices();
                }
                StopReason::GuestCrash(report) => {
                    let regs: Vec<(usize, CpuSnapshot)> = (0..self.cpus)
                        .filter_map(|cpu| vm.snapshot(cpu).map(|s| (cpu, s)))
                        .collect();
                    let mut full = report;
                    for (cpu, snap) in regs {
                        full.push_str(&format!("\nvCPU {cpu} registers:\n{snap}"));
                    }
                    return Ok(RunOutcome::GuestCrashed(full));
                }
                StopReason::GuestPanic => return Ok(RunOutcome::GuestPanicked),
                StopReason::HostStop | StopReason::Save => return Ok(RunOutcome::HostStopped),
            }
        }
    }

    /// Why this machine on `vm` cannot be saved, if it cannot: devices
    /// without state (named), or an accelerator that cannot save vCPUs.
    fn cannot_save(&self, vm: &dyn Vm) -> Option<String> {
        let missing: Vec<String> = self
            .registry
            .without_state()
            .map(|id| id.to_string())
            .collect();
        if !missing.is_empty() {
            return Some(format!(
                "these devices cannot save their state yet: {}",
                missing.join(", ")
            ));
        }
        vm.cannot_save()
    }

    /// Puts a restored snapshot's vCPUs on `vm` and lets the counter run.
    fn resume_restored(&mut self, vm: &mut dyn Vm, pending: Pending) -> Result<(), MachineError> {
        let fail = |source| MachineError::Snapshot {
            path: pending.path.clone(),
            source,
        };
        if pending.accelerator != vm.name() {
            return Err(fail(snapshot::SnapshotError::Mismatch(vec![format!(
                "--accel: the snapshot was saved on {}, this run uses {}",
                pending.accelerator,
                vm.name()
            )])));
        }
        vm.restore_cpus(&pending.cpus)
            .map_err(|e| fail(snapshot::SnapshotError::Accel(e)))?;
        self.control
            .restore_powers(&pending.powers)
            .map_err(|e| fail(snapshot::SnapshotError::Corrupt(e)))?;
        pending.disks.commit().map_err(fail)?;
        // The GIC's outputs were driven at restore; drive them again now
        // that the power states are back.
        self.gic.refresh_outputs();
        if !self.control.is_paused() {
            self.counter.resume();
        }
        tracing::info!("restored from {}", pending.path.display());
        self.events.publish(MachineEvent::Restored {
            path: pending.path.clone(),
        });
        Ok(())
    }

    /// Serves the waiting save request with the vCPUs stopped; true if the
    /// VM is to stop afterwards.
    fn serve_save(&mut self, vm: &mut dyn Vm) -> bool {
        let Some(request) = vm_core::sync::lock(&self.saves.request).take() else {
            return false;
        };
        let was_paused = self.control.is_paused();
        self.counter.pause();
        // Devices' own threads finish their work and stop for the save;
        // they start again unless the VM stops here.
        self.registry.quiesce();
        let result = self.save_to(vm, &request.path, request.with_disks);
        let stop = request.stop && result.is_ok();
        if !stop {
            self.registry.resume();
        }
        if !was_paused {
            self.counter.resume();
        }
        match &result {
            Ok(report) => {
                tracing::info!(
                    "saved to {} in {:?} ({} MiB stored of {} MiB memory)",
                    report.path.display(),
                    report.elapsed,
                    report.stored_bytes >> 20,
                    report.ram_bytes >> 20
                );
                self.events.publish(MachineEvent::Saved {
                    path: report.path.clone(),
                });
            }
            Err(e) => tracing::warn!("save to {} failed: {e}", request.path.display()),
        }
        let _ = request.reply.send(result);
        stop
    }

    fn save_to(
        &mut self,
        vm: &mut dyn Vm,
        path: &std::path::Path,
        with_disks: bool,
    ) -> Result<snapshot::SaveReport, snapshot::SnapshotError> {
        if let Some(reason) = self.cannot_save(vm) {
            return Err(snapshot::SnapshotError::Unsupported(reason));
        }
        let cpus = vm.save_cpus().map_err(snapshot::SnapshotError::Accel)?;
        let devices = self
            .registry
            .save_states()
            .map_err(|(id, e)| snapshot::SnapshotError::Device {
                id: id.to_string(),
                message: e.to_string(),
            })?
            .into_iter()
            .map(|(id, bytes)| (id.to_string(), bytes))
            .collect();
        let captured = snapshot::Captured {
            accelerator: vm.name().into(),
            machine: self.saved_machine.clone(),
            counter: self.counter.now(),
            powers: self.control.powers(),
            cpus,
            devices,
            disks: snapshot::disks::identify(&self.disk_files)?,
            with_disks,
        };
        snapshot::write(path, captured, &self.memory)
    }
}

/// The cfg region's `rnd` word: 32 random bits per VMM launch (§6.6).
fn random_u32() -> u32 {
    let seed = random_seed();
    u32::from_le_bytes([seed[0], seed[1], seed[2], seed[3]])
}

/// 32 bytes from the host's entropy source for the guest's RNG seed; a
/// fixed pattern only if the host has none (the guest then seeds itself
/// more slowly, nothing breaks).
fn random_seed() -> [u8; 32] {
    use std::io::Read;
    let mut seed = [0u8; 32];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut seed))
        .is_err()
    {
        tracing::warn!("no /dev/urandom: the guest gets a fixed RNG seed");
        seed = [0x5a; 32];
    }
    seed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::display::{DisplayMode, ScreenshotError};
    use apple_gfx::fake::IOSFC_CMD_RAISE_IRQ;
    use apple_gfx::fake::{FakeFramework, FakeVaSpace, CMD_RAISE_IRQ, FAKE_MMIO_LENGTH, FAKE_PAGE};
    use apple_gfx::MemoryInterface;
    use vm_core::AccessWidth::Word;

    /// The smallest machine: one CPU, a 16-byte ROM written into `dir`, no
    /// USB.
    fn bare_config(dir: &std::path::Path) -> MachineConfig {
        let rom = dir.join("rom.bin");
        std::fs::write(&rom, [0u8; 16]).unwrap();
        let mut config =
            MachineConfig::new(1, MIN_RAM, BootSource::Firmware(rom), SerialBackend::None);
        config.usb = false;
        config
    }

    /// A machine with a display on `fw`, or on no backend at all.
    fn with_display(fw: Option<&FakeFramework>, window: bool) -> Result<Machine, MachineError> {
        let dir = tempfile::tempdir().unwrap();
        let mut config = bare_config(dir.path());
        config.display = Some(DisplayConfig {
            heads: vec![vec![DisplayMode::new(800, 600, 60)]],
            window,
            ..DisplayConfig::default()
        });
        let backend = fw.map(|fw| GfxBackend {
            framework: Arc::new(fw.clone()),
            va_space: Arc::new(FakeVaSpace::new()),
            page_size: FAKE_PAGE,
            executor: Arc::new(apple_gfx::ThreadExecutor),
        });
        Machine::new(config, backend)
    }

    /// GICD_ISPENDR1: pending bits of INTIDs 32..64.
    fn spis_pending(m: &Machine) -> u64 {
        m.bus().read(GICD_BASE + 0x204, Word).unwrap()
    }

    #[test]
    fn gfx_registers_interrupts_and_reset_go_through_the_machine() {
        let fw = FakeFramework::new(MemoryInterface::Tasks);
        let m = with_display(Some(&fw), false).unwrap();
        assert_eq!(fw.mode_list(), vec![DisplayMode::new(800, 600, 60)]);

        m.bus().write(GFX_BASE + 0x100, Word, 7).unwrap();
        assert_eq!(fw.register(0x100), Some(7));
        assert_eq!(m.bus().read(GFX_BASE + 0x100, Word).unwrap(), 7);
        m.bus().write(GFX_IOSFC_BASE + 0x40, Word, 9).unwrap();
        assert_eq!(fw.iosfc_register(0x40), Some(9));
        assert_eq!(fw.register(0x40), None, "the main window is separate");
        // Past mmioLength the slot is unmapped: nothing reaches the device.
        let before = fw.access_log().len();
        let _ = m.bus().write(GFX_BASE + FAKE_MMIO_LENGTH, Word, 1);
        assert_eq!(fw.access_log().len(), before);

        // The device pulses its lines; INTIDs 48 and 49 must be
        // edge-triggered (GICD_ICFGR3) for a pulse to latch.
        let gfx_bit = 1 << (SPI_GFX % 32);
        let iosfc_bit = 1 << (SPI_GFX_IOSFC % 32);
        m.bus().write(GICD_BASE + 0xc0c, Word, 0b1010).unwrap();
        assert_eq!(spis_pending(&m) & (gfx_bit | iosfc_bit), 0);
        m.bus().write(GFX_BASE + CMD_RAISE_IRQ, Word, 0).unwrap();
        assert_eq!(spis_pending(&m) & (gfx_bit | iosfc_bit), gfx_bit);
        m.bus()
            .write(GFX_IOSFC_BASE + IOSFC_CMD_RAISE_IRQ, Word, 0)
            .unwrap();
        assert_eq!(
            spis_pending(&m) & (gfx_bit | iosfc_bit),
            gfx_bit | iosfc_bit
        );

        assert_eq!(fw.resets(), 0);
        m.reset_devices();
        assert_eq!(fw.resets(), 1);
    }

    #[test]
    fn the_pci_display_cannot_be_attached_to_vmapple() {
        let m = with_display(None, false).unwrap();
        let fw = FakeFramework::new(MemoryInterface::Tasks);
        let config = apple_gfx::GfxConfig {
            memory: Arc::new(m.memory.clone()),
            va_space: Arc::new(FakeVaSpace::new()),
            page_size: FAKE_PAGE,
            sink: Arc::new(display::GfxSink(
                ::display::Display::new(vec![vec![]]).heads()[0].clone(),
            )),
            executor: Arc::new(apple_gfx::ThreadExecutor),
            modes: vec![],
        };
        let err = apple_gfx::ApplePciGfx::new(&fw, config, m.pci.msi_sink())
            .err()
            .expect("vmapple has no MSI");
        assert!(matches!(err, apple_gfx::PciGfxError::NoMsi));
        assert!(err.to_string().contains("use the MMIO display"), "{err}");
        assert_eq!(fw.display_info(), None, "the framework was never asked");
    }

    #[test]
    fn apple_gfx_pci_is_a_pci_function_with_msi_on_and_refused_without() {
        let build = |msi: bool, fw: &FakeFramework| {
            let dir = tempfile::tempdir().unwrap();
            let mut config = bare_config(dir.path());
            config.msi = msi;
            config.display = Some(DisplayConfig {
                device: GpuKind::AppleGfxPci,
                ..DisplayConfig::default()
            });
            let backend = GfxBackend {
                framework: Arc::new(fw.clone()),
                va_space: Arc::new(FakeVaSpace::new()),
                page_size: FAKE_PAGE,
                executor: Arc::new(apple_gfx::ThreadExecutor),
            };
            Machine::new(config, Some(backend))
        };
        let fw = FakeFramework::new(MemoryInterface::Tasks);
        let m = build(true, &fw).unwrap();
        let slot = m
            .registry()
            .get("apple-gfx-pci")
            .unwrap()
            .pci_slot()
            .unwrap();
        let ids = m
            .bus()
            .read(PCIE_ECAM_BASE + (u64::from(slot) << 15), Word)
            .unwrap();
        assert_eq!(
            ids,
            u64::from(apple_gfx::pci::DEVICE_ID) << 16 | u64::from(apple_gfx::pci::VENDOR_ID)
        );
        assert!(
            m.screen().is_some(),
            "the display model is fed by the function"
        );
        assert!(
            m.registry().get("apple-gfx").is_none(),
            "no MMIO variant beside it"
        );

        let fw = FakeFramework::new(MemoryInterface::Tasks);
        let err = build(false, &fw).err().expect("no MSI, no apple-gfx-pci");
        assert!(err.to_string().contains("--msi on"), "{err}");
        assert_eq!(fw.display_info(), None, "the framework was never asked");
    }

    #[test]
    fn screenshots_show_the_guest_frame() {
        let fw = FakeFramework::new(MemoryInterface::Tasks);
        let m = with_display(Some(&fw), false).unwrap();
        let screen = m.screen().unwrap();
        let wait = Duration::from_secs(10);
        assert!(matches!(
            screen.capture(0, wait),
            Err(ScreenshotError::NoFrame)
        ));
        fw.guest_mode_change(3, 2);
        let frame = screen.capture(0, wait).unwrap();
        assert_eq!((frame.width, frame.height), (3, 2));
        // The fake fills each render with its sequence number.
        assert_eq!(frame.pixels, vec![0xff00_0001; 6]);

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.png");
        screen.screenshot_png(0, &path, wait).unwrap();
        let decoder =
            png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&path).unwrap()));
        let mut reader = decoder.read_info().unwrap();
        let mut rgb = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut rgb).unwrap();
        assert_eq!((info.width, info.height), (3, 2));
        assert_eq!(info.color_type, png::ColorType::Rgb);
        assert_eq!(rgb, [0, 0, 2].repeat(6), "second render, RGB");

        let bad = dir.path().join("missing").join("s.png");
        assert!(matches!(
            screen.screenshot_png(0, &bad, wait),
            Err(ScreenshotError::Write { .. })
        ));
    }

    #[test]
    fn a_display_that_cannot_be_had_fails_only_a_window() {
        for fw in [None, Some(FakeFramework::failing())] {
            let m = with_display(fw.as_ref(), false).unwrap();
            assert!(m.screen().is_none());
            assert!(m.bus().read(GFX_BASE, Word).is_err(), "nothing mapped");
            assert!(matches!(
                with_display(fw.as_ref(), true),
                Err(MachineError::Display { .. })
            ));
        }
    }

    /// A machine with everything that can be attached without a network
    /// peer: USB, the Apple disks, a plain disk and a display on `fw`.
    fn full_machine(dir: &std::path::Path, fw: &FakeFramework) -> Machine {
        let mut config = bare_config(dir);
        config.usb = true;
        let disk = |name: &str| {
            let path = dir.join(name);
            std::fs::write(&path, vec![0u8; 4096]).unwrap();
            DiskSpec {
                path,
                read_only: false,
                offset: 0,
            }
        };
        config.aux = Some(disk("aux.img"));
        config.root = Some(disk("root.img"));
        config.disks = vec![disk("data.img")];
        config.display = Some(DisplayConfig::default());
        let backend = GfxBackend {
            framework: Arc::new(fw.clone()),
            va_space: Arc::new(FakeVaSpace::new()),
            page_size: FAKE_PAGE,
            executor: Arc::new(apple_gfx::ThreadExecutor),
        };
        Machine::new(config, Some(backend)).unwrap()
    }

    #[test]
    fn every_device_on_the_bus_and_the_pci_bus_is_in_the_registry() {
        let dir = tempfile::tempdir().unwrap();
        let fw = FakeFramework::new(MemoryInterface::Tasks);
        let m = full_machine(dir.path(), &fw);
        let ids: Vec<&str> = m
            .registry()
            .entries()
            .iter()
            .map(|e| e.id().as_str())
            .collect();
        assert_eq!(
            ids,
            [
                "gic",
                "pl011",
                "bdif",
                "pl031",
                "avp-rtc",
                "pl061",
                "power-button",
                "pvpanic",
                "aes",
                "pcie-host",
                "xhci",
                "virtio-blk-aux",
                "virtio-blk-root",
                "virtio-blk0",
                "apple-gfx",
            ]
        );
        // The virtio functions and XHCI save their state; the display
        // cannot.
        let unsaved: Vec<&str> = m.registry().without_state().map(|id| id.as_str()).collect();
        assert_eq!(unsaved, ["apple-gfx"]);

        let mut windows: Vec<(u64, u64, String)> = m
            .registry()
            .entries()
            .iter()
            .flat_map(|e| e.windows())
            .map(|w| (w.base, w.size, w.name.clone()))
            .collect();
        windows.sort();
        let on_bus: Vec<(u64, u64, String)> = m
            .bus()
            .regions()
            .map(|(base, size, name)| (base, size, name.to_owned()))
            .collect();
        assert_eq!(windows, on_bus);
        assert_eq!(on_bus.len(), 14, "{on_bus:#x?}");

        let mut slots: Vec<u8> = m
            .registry()
            .entries()
            .iter()
            .filter_map(|e| e.pci_slot())
            .collect();
        // 00:00.0 is the root complex, part of the host.
        slots.insert(0, 0);
        slots.sort();
        let plugged: Vec<u8> = m.pci.devices().into_iter().map(|(slot, _)| slot).collect();
        assert_eq!(slots, plugged);
        assert_eq!(plugged.len(), 5);

        let spis: Vec<u32> = m
            .registry()
            .entries()
            .iter()
            .flat_map(|e| e.spis().iter().copied())
            .collect();
        let mut wired = vec![SPI_UART, SPI_RTC, SPI_AVP_RTC, SPI_GPIO, SPI_AES];
        wired.extend(SPI_PCIE_INTX..SPI_PCIE_INTX + PCIE_INTX_LINES);
        wired.extend([SPI_GFX, SPI_GFX_IOSFC]);
        assert_eq!(spis, wired);
    }

    /// A one-register device that counts its resets; the machine never
    /// names it.
    #[derive(Default)]
    struct Scratch {
        value: std::sync::atomic::AtomicU64,
        resets: std::sync::atomic::AtomicU64,
    }

    impl vm_core::MmioDevice for Scratch {
        fn read(&self, _offset: u64, _width: vm_core::AccessWidth) -> u64 {
            self.value.load(std::sync::atomic::Ordering::SeqCst)
        }
        fn write(&self, _offset: u64, _width: vm_core::AccessWidth, value: u64) {
            self.value.store(value, std::sync::atomic::Ordering::SeqCst);
        }
    }

    impl registry::Device for Scratch {
        fn reset(&self) {
            self.value.store(0, std::sync::atomic::Ordering::SeqCst);
            self.resets
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[test]
    fn machine_reset_resets_a_registered_device_it_does_not_name() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = Machine::new(bare_config(dir.path()), None).unwrap();
        let base = 0x2008_0000;
        let scratch = m
            .registry
            .attach("scratch", |wires| {
                let _line = wires.spi(40);
                let dev = Arc::new(Scratch::default());
                Ok(registry::Attachment::new(dev.clone()).mmio("scratch", base, 0x1000, dev))
            })
            .unwrap();
        m.bus().write(base, Word, 0x55).unwrap();
        assert_eq!(m.bus().read(base, Word).unwrap(), 0x55);
        m.reset_devices();
        assert_eq!(scratch.resets.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(m.bus().read(base, Word).unwrap(), 0);
    }

    #[test]
    fn machine_reset_returns_the_guests_programming_to_reset_values() {
        use devices::{pl031, pl061};
        let dir = tempfile::tempdir().unwrap();
        let fw = FakeFramework::new(MemoryInterface::Tasks);
        let m = full_machine(dir.path(), &fw);
        // What a guest leaves behind: GPIO directions, an RTC alarm, an
        // enabled SPI, a PCI function with memory decoding on.
        let xhci = m.registry().get("xhci").unwrap().pci_slot().unwrap();
        let ecam_command = PCIE_ECAM_BASE + (u64::from(xhci) << 15) + 0x4;
        let bus = m.bus();
        let programmed = [
            (GPIO_BASE + pl061::reg::DIR, 0xff),
            (RTC_BASE + pl031::reg::MR, 0x1234),
            (GICD_BASE + 0x104, 1 << SPI_UART),
            (ecam_command, 0x2),
        ];
        for (addr, value) in programmed {
            bus.write(addr, Word, value).unwrap();
            assert_eq!(bus.read(addr, Word).unwrap() & value, value, "{addr:#x}");
        }
        m.reset_devices();
        for (addr, value) in programmed {
            assert_eq!(bus.read(addr, Word).unwrap() & value, 0, "{addr:#x}");
        }
        assert_eq!(fw.resets(), 1, "the display's framework too");
    }

    #[test]
    fn reset_loop_needs_quick_resets_in_a_row() {
        let mut d = ResetLoopDetector::default();
        let t0 = Instant::now();
        for i in 0..ResetLoopDetector::LIMIT - 1 {
            assert!(!d.record(t0 + Duration::from_secs(u64::from(i))));
        }
        assert!(d.record(t0 + Duration::from_secs(9)));

        let mut d = ResetLoopDetector::default();
        for i in 0..50u64 {
            assert!(
                !d.record(t0 + Duration::from_secs(i * 11)),
                "slow resets never loop"
            );
        }
    }
}
