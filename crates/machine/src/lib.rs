//! The vmapple board: QEMU's `-M vmapple` as a Rust machine.
//!
//! [`Machine::new`] builds the memory map of vmapple-machine.md §2 (guest
//! memory for the ROM, cfg and RAM regions; an MMIO bus for the rest),
//! creates the devices and wires their interrupts to the GIC as §3 says.
//! [`Machine::run`] boots it on any accelerator and handles resets until
//! the guest powers off or something stops it.

pub mod boot;
pub mod display;
pub mod exits;
pub mod fdt;
pub mod handle;
pub mod layout;
pub mod pci_devices;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use accel::{AccelError, CpuSnapshot, StopReason, VcpuConfig, Vm, VmControl};
use arch_arm64::timer::{Counter, COUNTER_HZ};
use arch_arm64::Mpidr;
use block::{BlockBackend, DiskImage, MemoryDisk};
use devices::apple_aes::{AppleAes, FifoResetPolicy};
use devices::apple_bdif::Bdif;
use devices::apple_cfg::CfgParams;
use devices::clock::{Clock, HostClock, TimerThread};
use devices::pl011::Pl011;
use devices::pl031::Pl031;
use devices::pl061::Pl061;
use devices::power_button::PowerButton;
use devices::pvpanic::{PanicEvents, PvPanic};
use devices::serial::{SerialBackend, SerialHandle};
use gic::{CpuInterruptOutputs, GicV3};
use handle::{EventBus, MachineEvent, MachineHandle};
use pci::PciHost;
pub use pci_devices::{default_mac, MacAddress, NetBackend, NicSpec};
use vm_core::{GuestMemory, MmioBus};

use boot::{BootError, Firmware, LinuxImages};
use display::{DisplayConfig, FrameGrabber, GfxBackend, Screen};
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

pub use vm_config::{DiskSpec, PanicPolicy};

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
}

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
    #[error("cannot start the {name} thread")]
    Thread {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("machine assembly: cfg region")]
    CfgRegion(#[source] vm_core::memory::MemoryError),
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

/// The VM's virtual time (the generic timer's count, which stops while
/// the VM is paused) as a device clock: the power button's 100 ms pulse
/// is measured in it (§13.3).
struct VirtualClock(Arc<Counter>);

impl Clock for VirtualClock {
    fn now_ns(&self) -> u64 {
        let ticks = u128::from(self.0.now());
        u64::try_from(ticks * 1_000_000_000 / u128::from(COUNTER_HZ)).unwrap_or(u64::MAX)
    }
}

/// pvpanic's events, acted on as `--on-panic` says.
struct PanicActions {
    policy: PanicPolicy,
    control: Arc<VmControl>,
    counter: Arc<Counter>,
    events: Arc<EventBus>,
}

impl PanicEvents for PanicActions {
    fn guest_panicked(&self) {
        tracing::error!(
            "guest panicked (pvpanic); --on-panic {}",
            self.policy.name()
        );
        match self.policy {
            PanicPolicy::Exit => self.control.request_stop(StopReason::GuestPanic),
            PanicPolicy::Pause => {
                self.counter.pause();
                self.control.pause();
                tracing::warn!("VM paused after the guest panic");
            }
            PanicPolicy::Continue => {}
            PanicPolicy::Reset => self.control.request_stop(StopReason::Reset),
        }
        self.events.publish(MachineEvent::GuestPanicked {
            action: self.policy.name(),
        });
    }

    fn guest_crash_loaded(&self) {
        tracing::warn!("guest reports a crash-loaded event (pvpanic): its crash kernel runs");
        self.events.publish(MachineEvent::GuestCrashLoaded);
    }

    fn guest_shutdown(&self) {
        tracing::info!("guest asked for an orderly shutdown (pvpanic)");
        self.control.request_stop(StopReason::PowerOff);
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

/// The assembled vmapple machine.
pub struct Machine {
    cpus: usize,
    ram_size: u64,
    memory: GuestMemory,
    bus: Arc<MmioBus>,
    gic: Arc<GicV3>,
    uart: Arc<Pl011>,
    aes: Arc<AppleAes>,
    pci: Arc<PciHost>,
    input: Option<usb::InputSink>,
    /// The apple-gfx-mmio device and its host side, when there is one.
    gfx: Option<Screen>,
    #[cfg(all(target_os = "macos", target_arch = "aarch64"))]
    mac_framework: Option<Arc<apple_gfx_macos::MacFramework>>,
    rtc: Arc<Pl031>,
    gpio: Arc<Pl061>,
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
}

impl Machine {
    /// Builds the machine with this host's display backend, if the
    /// configuration asks for a display and the host has one.
    pub fn new(config: MachineConfig) -> Result<Self, MachineError> {
        #[cfg(all(target_os = "macos", target_arch = "aarch64"))]
        {
            let (backend, framework) = mac_display_backend(config.display.as_ref())?;
            let mut machine = Self::with_display_backend(config, backend)?;
            // Without a device the framework has no display to show.
            if machine.gfx.is_some() {
                machine.mac_framework = framework;
            }
            Ok(machine)
        }
        #[cfg(not(all(target_os = "macos", target_arch = "aarch64")))]
        Self::with_display_backend(config, None)
    }

    /// Builds the machine; the display device, if configured, comes from
    /// `backend`'s framework. A window display without a backend, or whose
    /// device cannot be created, is an error; a windowless one is left
    /// out with a warning, and the guest then has no display.
    pub fn with_display_backend(
        config: MachineConfig,
        backend: Option<GfxBackend>,
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
        let open_disk = |which: &'static str, spec: &Option<DiskSpec>| match spec {
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
        let aux = open_disk("aux", &config.aux)?;
        let root = open_disk("root", &config.root)?;
        let mut disks = Vec::new();
        for spec in &config.disks {
            disks.push((spec.path.clone(), open_disk("disk", &Some(spec.clone()))?));
        }
        if matches!(config.boot, BootSource::Firmware(_)) && config.aux.is_none() {
            tracing::warn!(
                "no --aux disk: a boot ROM that loads the OS through the backdoor will fail"
            );
        }
        // Read the boot files first: a wrong path should not cost a
        // multi-gigabyte allocation.
        let boot = match &config.boot {
            BootSource::Firmware(path) => Boot::Firmware(Firmware::load(path)?),
            BootSource::Linux {
                kernel,
                initrd,
                cmdline,
            } => Boot::Linux(Box::new(LinuxImages::load(
                kernel,
                initrd.as_deref(),
                cmdline.clone(),
                config.ram_size,
            )?)),
        };

        let memory = vm_core::memory::create_guest_memory(&[
            (FIRMWARE_BASE, FIRMWARE_SIZE as usize),
            (CFG_BASE, CFG_SIZE as usize),
            (RAM_BASE, config.ram_size as usize),
        ])
        .map_err(|source| MachineError::Memory {
            mib: config.ram_size >> 20,
            source,
        })?;

        let control = Arc::new(VmControl::new(config.cpus));
        let gic = GicV3::new(config.cpus, GIC_SPIS, Arc::new(GicToCpus(control.clone())));

        let quit_control = control.clone();
        let (uart, serial) =
            devices::serial::connect(&config.serial, gic.spi(SPI_UART), move || {
                tracing::info!("console escape: stopping the VM");
                quit_control.request_stop(StopReason::HostStop)
            })?;

        let mut bus = MmioBus::new();
        let add = |bus: &mut MmioBus, base, size, name: &str, dev| {
            bus.insert(base, size, name, dev)
                .map_err(|source| MachineError::Bus {
                    name: name.to_owned(),
                    source,
                })
        };
        add(
            &mut bus,
            GICD_BASE,
            GICD_SIZE,
            "gic-distributor",
            gic.distributor(),
        )?;
        add(
            &mut bus,
            GICR_BASE,
            GICR_SIZE,
            "gic-redistributors",
            gic.redistributors(),
        )?;
        add(&mut bus, UART_BASE, Pl011::SIZE, "pl011", uart.clone())?;
        add(
            &mut bus,
            BDIF_BASE,
            BDIF_SIZE,
            "bdif",
            Arc::new(Bdif::new(memory.clone(), root.clone(), aux.clone())),
        )?;

        let intx: [Arc<dyn vm_core::IrqLine>; PCIE_INTX_LINES as usize] =
            std::array::from_fn(|line| gic.spi(SPI_PCIE_INTX + line as u32));
        let pci = Arc::new(PciHost::new(intx));
        let xhci = config.usb.then(|| {
            Arc::new(usb::Xhci::with_hid_devices(
                memory.clone(),
                usb::XhciConfig::default(),
            ))
        });
        let input = xhci.as_ref().map(|x| x.input_sink());
        pci_devices::populate(
            &pci,
            pci_devices::PciPlan {
                memory: &memory,
                xhci,
                aux: config.aux.is_some().then_some(aux),
                root: config.root.is_some().then_some(root),
                nics: &config.nics,
                disks,
                queues_per_disk: config.cpus.clamp(1, 16) as u16,
            },
        )?;
        add(
            &mut bus,
            PCIE_ECAM_BASE,
            PCIE_ECAM_SIZE,
            "pcie-ecam",
            pci.ecam(),
        )?;
        add(
            &mut bus,
            PCIE_MMIO_BASE,
            PCIE_MMIO_SIZE,
            "pcie-mmio",
            pci.mmio_window(),
        )?;
        let counter = Arc::new(Counter::new(COUNTER_HZ));
        let events = Arc::new(EventBus::default());
        let rtc = Pl031::new(gic.spi(SPI_RTC), Arc::new(HostClock::new()));
        add(&mut bus, RTC_BASE, RTC_SIZE, "pl031", rtc.clone())?;
        let gpio = Pl061::new(gic.spi(SPI_GPIO));
        add(&mut bus, GPIO_BASE, GPIO_SIZE, "pl061", gpio.clone())?;
        let virtual_clock: Arc<dyn Clock> = Arc::new(VirtualClock(counter.clone()));
        let power_button = PowerButton::new(gpio.clone(), virtual_clock.clone());
        let pvpanic = PvPanic::new(Arc::new(PanicActions {
            policy: config.on_panic,
            control: control.clone(),
            counter: counter.clone(),
            events: events.clone(),
        }));
        add(&mut bus, PVPANIC_BASE, PVPANIC_SIZE, "pvpanic", pvpanic)?;
        let timer = |name: &str, clock: Arc<dyn Clock>, target, max_sleep| {
            TimerThread::spawn(name, clock, target, max_sleep).map_err(|source| {
                MachineError::Thread {
                    name: name.to_owned(),
                    source,
                }
            })
        };
        let timers = vec![
            timer(
                "rtc-alarm",
                Arc::new(HostClock::new()),
                rtc.clone(),
                Duration::from_secs(1),
            )?,
            // Virtual time may stop (pause): re-read it often.
            timer(
                "power-button",
                virtual_clock,
                power_button.clone(),
                Duration::from_millis(10),
            )?,
        ];
        let aes = AppleAes::new(memory.clone(), gic.spi(SPI_AES), config.aes_fifo_on_reset);
        add(&mut bus, AES1_BASE, AES_WINDOW_SIZE, "aes", aes.window1())?;
        add(&mut bus, AES2_BASE, AES_WINDOW_SIZE, "aes-2", aes.window2())?;
        let gfx = match &config.display {
            Some(display) => create_gfx(display, backend, &memory, &gic)?,
            None => None,
        };
        if let Some(screen) = &gfx {
            let gfx_window = apple_gfx::GfxWindow::new(screen.device().clone());
            // The window decodes the framework's mmioLength, at most the
            // 64 KiB slot; the rest of the slot stays unmapped.
            let size = gfx_window.size().min(GFX_SLOT);
            add(&mut bus, GFX_BASE, size, "apple-gfx", Arc::new(gfx_window))?;
            add(
                &mut bus,
                GFX_IOSFC_BASE,
                GFX_IOSFC_SIZE,
                "apple-gfx-iosfc",
                Arc::new(apple_gfx::IosfcWindow::new(screen.device().clone())),
            )?;
        }

        Ok(Self {
            cpus: config.cpus,
            ram_size: config.ram_size,
            memory,
            bus: Arc::new(bus),
            gic,
            uart,
            aes,
            pci,
            input,
            gfx,
            #[cfg(all(target_os = "macos", target_arch = "aarch64"))]
            mac_framework: None,
            rtc,
            gpio,
            power_button,
            events,
            _timers: timers,
            platform_image,
            control,
            counter,
            boot,
            _serial: serial,
        })
    }

    pub fn memory(&self) -> &GuestMemory {
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
        }
    }

    /// Where keyboard and pointer input for the USB devices goes; `None`
    /// without USB.
    pub fn input_sink(&self) -> Option<usb::InputSink> {
        self.input.clone()
    }

    /// The display as host-side clients see it; `None` without one.
    pub fn screen(&self) -> Option<Screen> {
        self.gfx.clone()
    }

    /// ParavirtualizedGraphics as this machine's display uses it (for the
    /// window code); `None` without a display.
    #[cfg(all(target_os = "macos", target_arch = "aarch64"))]
    pub fn mac_framework(&self) -> Option<&apple_gfx_macos::MacFramework> {
        self.mac_framework.as_deref()
    }

    pub fn control(&self) -> Arc<VmControl> {
        self.control.clone()
    }

    pub fn counter(&self) -> Arc<Counter> {
        self.counter.clone()
    }

    pub fn bus(&self) -> &MmioBus {
        &self.bus
    }

    /// Per-vCPU wiring for the accelerator.
    pub fn vcpu_configs(&self) -> Vec<VcpuConfig> {
        (0..self.cpus)
            .map(|cpu| VcpuConfig {
                mpidr: Mpidr::for_cpu(cpu).0,
                vtimer_irq: self.gic.ppi(cpu, PPI_VTIMER),
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

    fn reset_devices(&self) {
        self.gic.reset();
        self.uart.reset();
        self.aes.reset();
        self.pci.reset();
        self.rtc.reset();
        self.gpio.reset();
        self.power_button.reset();
        if let Some(screen) = &self.gfx {
            // Drains the framework's work, which may call back into the
            // device: no machine lock is held here.
            screen.device().reset();
        }
    }

    /// Boots the machine on `vm` and runs it, through guest resets, until
    /// it stops for good.
    pub fn run(&mut self, vm: &mut dyn Vm) -> Result<RunOutcome, MachineError> {
        let exits = MachineExits {
            bus: self.bus.clone(),
            gic: self.gic.clone(),
            control: self.control.clone(),
            memory: self.memory.clone(),
        };
        let mut resets = ResetLoopDetector::default();
        loop {
            let (entry, x0) = self.install_boot()?;
            tracing::info!(
                accelerator = vm.name(),
                cpus = self.cpus,
                ram_mib = self.ram_size >> 20,
                "starting at {entry:#x}"
            );
            self.control.reset_for_boot(entry, x0);
            let reason = vm.run(&exits, &self.control)?;
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
                StopReason::HostStop => return Ok(RunOutcome::HostStopped),
            }
        }
    }
}

/// The apple-gfx-mmio device on `backend`'s framework, its interrupts on
/// the GIC (§3), or `None` where a windowless display cannot be had.
fn create_gfx(
    display: &DisplayConfig,
    backend: Option<GfxBackend>,
    memory: &GuestMemory,
    gic: &Arc<GicV3>,
) -> Result<Option<Screen>, MachineError> {
    let refuse = |what: &'static str, source: Option<BoxError>| {
        let e = MachineError::Display { what, source };
        if display.window {
            Err(e)
        } else {
            tracing::warn!(
                "{}; the guest has no display",
                vm_core::error_chain::Chain(&e)
            );
            Ok(None)
        }
    };
    let Some(backend) = backend else {
        if display.window {
            return refuse("this host has no ParavirtualizedGraphics.framework", None);
        }
        tracing::debug!("no display device: this host has no ParavirtualizedGraphics.framework");
        return Ok(None);
    };
    let grabber = Arc::new(FrameGrabber::default());
    let created = apple_gfx::AppleGfx::new(
        &*backend.framework,
        apple_gfx::Variant::Mmio {
            gfx_irq: gic.spi(SPI_GFX),
            iosfc_irq: gic.spi(SPI_GFX_IOSFC),
        },
        apple_gfx::GfxConfig {
            memory: Arc::new(memory.clone()),
            va_space: backend.va_space,
            page_size: backend.page_size,
            sink: grabber.clone(),
            executor: backend.executor,
            modes: display.modes.clone(),
        },
    );
    match created {
        Ok(gfx) => Ok(Some(Screen::new(gfx, grabber))),
        Err(e) => refuse(
            "cannot create the apple-gfx display device",
            Some(Box::new(e)),
        ),
    }
}

/// ParavirtualizedGraphics as the display backend: handlers on the main
/// queue for a window (its layer belongs to the main thread), on a private
/// queue otherwise so a headless VMM needs no main run loop. A framework
/// that cannot be set up fails a window display and only costs a
/// windowless one its display.
#[cfg(all(target_os = "macos", target_arch = "aarch64"))]
#[allow(clippy::type_complexity)]
fn mac_display_backend(
    display: Option<&DisplayConfig>,
) -> Result<
    (
        Option<GfxBackend>,
        Option<Arc<apple_gfx_macos::MacFramework>>,
    ),
    MachineError,
> {
    use apple_gfx_macos::{host_page_size, DisplayQueue, MacFramework, MachVaSpace};
    let Some(display) = display else {
        return Ok((None, None));
    };
    let queue = if display.window {
        DisplayQueue::Main
    } else {
        DisplayQueue::Private
    };
    match MacFramework::new(queue) {
        Ok(fw) => {
            let fw = Arc::new(fw);
            let backend = GfxBackend {
                framework: fw.clone(),
                va_space: Arc::new(MachVaSpace),
                page_size: host_page_size(),
                executor: Arc::new(apple_gfx::ThreadExecutor),
            };
            Ok((Some(backend), Some(fw)))
        }
        Err(e) if display.window => Err(MachineError::Display {
            what: "ParavirtualizedGraphics",
            source: Some(Box::new(e)),
        }),
        Err(e) => {
            tracing::warn!("ParavirtualizedGraphics: {e}; the guest has no display");
            Ok((None, None))
        }
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
    use apple_gfx::fake::IOSFC_CMD_RAISE_IRQ;
    use apple_gfx::fake::{FakeFramework, FakeVaSpace, CMD_RAISE_IRQ, FAKE_MMIO_LENGTH, FAKE_PAGE};
    use apple_gfx::MemoryInterface;
    use display::{DisplayMode, ScreenshotError};
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
            modes: vec![DisplayMode::new(800, 600, 60)],
            window,
        });
        let backend = fw.map(|fw| GfxBackend {
            framework: Arc::new(fw.clone()),
            va_space: Arc::new(FakeVaSpace::new()),
            page_size: FAKE_PAGE,
            executor: Arc::new(apple_gfx::ThreadExecutor),
        });
        Machine::with_display_backend(config, backend)
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
            sink: Arc::new(display::FrameGrabber::default()),
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
    fn screenshots_show_the_guest_frame() {
        let fw = FakeFramework::new(MemoryInterface::Tasks);
        let m = with_display(Some(&fw), false).unwrap();
        let screen = m.screen().unwrap();
        let wait = Duration::from_secs(10);
        assert!(matches!(
            screen.capture(wait),
            Err(ScreenshotError::NoFrame)
        ));
        fw.guest_mode_change(3, 2);
        let frame = screen.capture(wait).unwrap();
        assert_eq!((frame.width, frame.height), (3, 2));
        // The fake fills each render with its sequence number.
        assert_eq!(frame.pixels, vec![0xff00_0001; 6]);

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.png");
        screen.screenshot_png(&path, wait).unwrap();
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
            screen.screenshot_png(&bad, wait),
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

    #[cfg(not(all(target_os = "macos", target_arch = "aarch64")))]
    #[test]
    fn without_the_framework_the_machine_has_no_display() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = bare_config(dir.path());
        config.display = Some(DisplayConfig::default());
        let m = Machine::new(config).unwrap();
        assert!(m.screen().is_none());
        assert!(m.bus().read(GFX_BASE, Word).is_err());
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
