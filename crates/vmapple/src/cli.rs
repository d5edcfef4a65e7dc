//! Command-line interface.

use std::path::PathBuf;
use std::sync::Arc;

use crate::fronts::{Front, GpuArg};
use clap::{Args, Parser, Subcommand};
use machine::display::{DisplayConfig, GpuKind, MAX_HEADS};
use machine::{BootSource, Machine, MachineConfig, NicSpec, RunOutcome};
use vm_config::{
    DiskSpec, DisplayModes, Ecid, MacAddress, NetBackend, Network, PanicPolicy, SerialBackend,
    ShareSpec, Size,
};

use crate::error::{Error, Result};
use crate::status;

const EXIT_STATUS_HELP: &str = "\
Exit status:
  0  the guest powered off
  1  host error or bad configuration
  2  bad command-line syntax
  3  the guest crashed a vCPU
  4  the guest was stuck in a reset loop
  5  the guest panicked (pvpanic)
  6  the host stopped the VM (signal, Ctrl-A x on the console)";

#[derive(Parser, Debug)]
#[command(name = "vmapple", version, about = "Run Apple's vmapple arm64 machine", after_help = EXIT_STATUS_HELP)]
pub struct Cli {
    /// Log filter, e.g. `info`, `debug`, `warn,guest=off` (overrides
    /// RUST_LOG). The log goes to stderr and, when running a bundle, is
    /// also appended to the bundle's vmapple.log.
    #[arg(long, global = true, value_name = "FILTER")]
    pub log: Option<String>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Boot and run a VM: a bundle (by name or path), or a machine given
    /// entirely by options. Options override the bundle's config.toml.
    #[command(after_help = EXIT_STATUS_HELP)]
    Run(Box<RunArgs>),
    /// Make a new VM bundle (config.toml, sparse aux and root disks, a new
    /// machine identifier).
    Create(crate::bundles::CreateArgs),
    /// Turn a Tart VM directory or a macosvm JSON into a vmapple bundle
    /// (disks are used in place, not copied).
    Import(crate::bundles::ImportArgs),
    /// List the bundles in the bundles home ($VMAPPLE_HOME, else
    /// $XDG_DATA_HOME/vmapple, else ~/.local/share/vmapple).
    List,
    /// Delete a bundle that is not running.
    Delete(crate::bundles::DeleteArgs),
    /// Print the ECID of a machine identifier: a bundle, a Tart VM, a
    /// macosvm JSON, a Virtualization.framework bundle or the plist itself.
    Identity(crate::bundles::IdentityArgs),
    /// Send a command to a running VM's control socket.
    Ctl(crate::control::CtlArgs),
    /// Save a running bundle's VM into the bundle and stop it; the next
    /// `vmapple run NAME` resumes it (docs/bundles.md).
    Suspend(crate::suspend::SuspendArgs),
    /// Make a bundle from a Tart VM image in an OCI registry.
    Pull(crate::images::PullArgs),
    /// Push a bundle to an OCI registry as a Tart VM image.
    Push(crate::images::PushArgs),
    /// Copy a bundle: copy-on-write disks where the filesystem allows, a
    /// new MAC address, the same machine identity unless --new-identity.
    Clone(crate::images::CloneArgs),
    /// Change a stopped bundle: grow its root disk, set vCPUs or memory.
    Set(crate::images::SetArgs),
    /// Print where Apple's device tree for the virtual Mac (a DeviceTree
    /// .im4p extracted from an IPSW, or its payload) puts each device,
    /// next to where vmapple puts it.
    InspectIpsw(InspectArgs),
}

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// The DeviceTree file.
    #[arg(value_name = "FILE")]
    pub path: PathBuf,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// A bundle name (in the bundles home) or path; see `vmapple create`.
    #[arg(value_name = "BUNDLE")]
    pub bundle: Option<PathBuf>,

    /// Boot ROM image loaded at 0x10_0000 (at most 1 MiB), e.g. Apple's
    /// AVPBooter.vmapple2.bin or vmapple's test firmware.
    #[arg(long, value_name = "FILE", conflicts_with = "kernel")]
    pub firmware: Option<PathBuf>,

    /// Linux kernel Image (raw or gzip) to boot directly with a generated
    /// device tree, instead of a boot ROM.
    #[arg(long, value_name = "FILE")]
    pub kernel: Option<PathBuf>,

    /// Initramfs for --kernel.
    #[arg(long, value_name = "FILE")]
    pub initrd: Option<PathBuf>,

    /// Kernel command line for --kernel [default: console=ttyAMA0].
    #[arg(long, value_name = "CMDLINE")]
    pub append: Option<String>,

    /// Number of vCPUs (1 to 32) [default: 1, or the bundle's].
    #[arg(long, value_name = "N")]
    pub cpus: Option<usize>,

    /// Guest RAM, with a K, M, G or T suffix (binary units), e.g. 512M or
    /// 4G [default: 512M, or the bundle's].
    #[arg(long, value_name = "SIZE")]
    pub memory: Option<Size>,

    /// Serial console: `stdio`, `file:PATH`, `unix:PATH` (a socket vmapple
    /// listens on) or `none` [default: stdio, or the bundle's]. On stdio,
    /// Ctrl-A x stops the VM.
    #[arg(long, value_name = "BACKEND")]
    pub serial: Option<SerialBackend>,

    /// Serve the control socket (JSON lines, see docs/bundles.md) at PATH
    /// [default: control.sock in the bundle; none without a bundle].
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,

    /// Accelerator: `hvf` (Hypervisor.framework, macOS on Apple silicon;
    /// the default there) or `tcg` (the portable software CPU; the default
    /// elsewhere).
    #[arg(long, default_value = AVAILABLE_ACCELERATORS.first().copied().unwrap_or("tcg"), value_name = "ACCEL")]
    pub accel: String,

    /// The aux volume (VZF's auxiliary storage with its 16 KiB header
    /// removed): the boot ROM reads it through the backdoor block
    /// interface. Append `,readonly` to open it read-only, `,offset=BYTES`
    /// to skip a header; write a comma in the path as `,,`.
    #[arg(long, value_name = "FILE[,readonly]")]
    pub aux: Option<DiskSpec>,

    /// The root volume (the macOS disk image). Append `,readonly` to open
    /// it read-only.
    #[arg(long, value_name = "FILE[,readonly]")]
    pub root: Option<DiskSpec>,

    /// The machine's ECID (Virtualization.framework's machine identifier),
    /// decimal or 0x-prefixed hex; `vmapple identity` prints it for a
    /// bundle.
    #[arg(long, value_name = "N")]
    pub ecid: Option<Ecid>,

    /// Serial number the boot ROM reports (at most 31 characters).
    #[arg(long, value_name = "TEXT", default_value = devices::apple_cfg::DEFAULT_SERIAL)]
    pub serial_number: String,

    /// Model name the boot ROM reports (at most 31 characters) [default:
    /// the bundle's `model`, else VM0001].
    #[arg(long, value_name = "TEXT")]
    pub model: Option<String>,

    /// SoC name the boot ROM reports (at most 31 characters) [default: the
    /// bundle's `soc-name`, else "Apple M1 (Virtual)"].
    #[arg(long, value_name = "TEXT")]
    pub soc_name: Option<String>,

    /// Bytes to skip at the start of the --aux file: 16384 for an
    /// untrimmed Virtualization.framework auxiliary-storage file (the
    /// same as `--aux FILE,offset=16384`).
    #[arg(long, value_name = "BYTES")]
    pub aux_offset: Option<Size>,

    /// Tell the boot ROM to start the macOS installer (sets the cfg
    /// region's run_installer1 and run_installer2 words).
    #[arg(long)]
    pub run_installer: bool,

    /// An extra virtio-blk disk (a raw image; sparse files stay sparse).
    /// Repeat for more disks. Append `,readonly` to open it read-only.
    #[arg(long = "disk", value_name = "FILE[,readonly]")]
    pub disks: Vec<DiskSpec>,

    /// Share a host directory with the guest over virtio-fs under TAG
    /// (at most 36 bytes; a Linux guest mounts it with `mount -t virtiofs
    /// TAG DIR`). Append `,readonly` to refuse every change. Repeat for
    /// more shares; these replace the bundle's.
    #[arg(long = "share", value_name = "TAG:PATH[,readonly]")]
    pub shares: Vec<ShareSpec>,

    /// virtio-vsock: listen on the Unix socket PATH, where the host
    /// connects to guest port P by writing `CONNECT P\n` (answered `OK
    /// <host port>\n`); guest connections to host port P go to the socket
    /// `PATH_P` [default: vsock.sock in the bundle; none without a bundle].
    #[arg(long, value_name = "PATH")]
    pub vsock: Option<PathBuf>,

    /// Leave out virtio-vsock (a bundle has one by default).
    #[arg(long, conflicts_with = "vsock")]
    pub no_vsock: bool,

    /// The guest's vsock context id (3 or more) [default: 3].
    #[arg(long, value_name = "CID")]
    pub vsock_cid: Option<u64>,

    /// Network: `passt` (user-mode networking through the passt program;
    /// the default when passt is installed), `unix:PATH` (a stream socket
    /// with passt's framing), `unix-dgram:LOCAL,PEER`, `tap:NAME` (Linux),
    /// `vmnet` (macOS vmnet.framework NAT; needs root or the
    /// com.apple.vm.networking entitlement) or `none`.
    #[arg(long, value_name = "BACKEND")]
    pub net: Option<Network>,

    /// MAC address of the NIC [default: 52:54:00 followed by three bytes
    /// derived from the process id].
    #[arg(long, value_name = "MAC")]
    pub mac: Option<MacAddress>,

    /// Leave out the XHCI controller with its USB keyboard and tablet
    /// (QEMU's -nodefaults).
    #[arg(long)]
    pub no_usb: bool,

    /// Message-signalled interrupts: `on` gives the GIC a GICv2m frame
    /// and message-based SPIs and the PCI devices MSI-X; `off` keeps
    /// QEMU's machine (shared INTx lines only) [default: on with --kernel,
    /// off when booting firmware].
    #[arg(long, value_name = "on|off")]
    pub msi: Option<vm_config::Msi>,
    /// Offer pointer authentication (FEAT_PAuth) on the software CPU, as
    /// macOS guests expect; off by default because it slows Linux guests,
    /// which sign every return address when it is there.
    #[arg(long)]
    pub pointer_auth: bool,

    /// Front ends showing the display: `cocoa` (a window, macOS on Apple
    /// silicon), `vnc` (a VNC server on the bundle's address, else
    /// 127.0.0.1:5900), `vnc=HOST:PORT`, `vnc=unix:PATH`, or `none`; a
    /// vnc value followed by `,head=N` shows head N (default 0).
    /// Repeat for several. They show whichever display device the machine
    /// has (see --gpu).
    #[arg(long = "display", value_name = "UI")]
    pub displays: Vec<crate::fronts::Front>,

    /// The display device: `apple` (apple-gfx, for macOS guests; needs
    /// macOS on Apple silicon), `apple-pci` (apple-gfx-pci, signalling by
    /// MSI: needs --msi on), `virtio` (virtio-gpu, for Linux guests, every
    /// host) or `none` [default: apple].
    #[arg(long, value_enum, value_name = "DEVICE")]
    pub gpu: Option<crate::fronts::GpuArg>,

    /// VNC authentication with the password in the first line of FILE
    /// (at most 8 bytes count) [default: the bundle's
    /// display.vnc-password-file, else no authentication].
    #[arg(long, value_name = "FILE")]
    pub vnc_password_file: Option<PathBuf>,

    /// Display modes offered to the guest, comma-separated
    /// WIDTHxHEIGHT@HZ, the first preferred; `;` separates heads
    /// (virtio-gpu: up to 4, one connector each) [default:
    /// 1920x1080@60,1440x1080@60,1280x1024@60].
    // The doc comment is clap's help text; the brackets are its notation
    // for defaults, not a rustdoc link.
    #[allow(rustdoc::broken_intra_doc_links)]
    #[arg(long, value_name = "LIST")]
    pub display_modes: Option<String>,

    /// Start with the vCPUs paused: nothing runs until `vmapple ctl VM
    /// resume`, so a client can subscribe to events before the guest's
    /// first instruction (QEMU's -S).
    #[arg(long)]
    pub paused: bool,

    /// Continue the VM saved in this snapshot (`vmapple ctl VM save`)
    /// instead of booting: give the options the VM was started with;
    /// options that differ from the snapshot's are refused. The boot files
    /// are used again only if the guest resets. See docs/snapshots.md.
    #[arg(long, value_name = "FILE")]
    pub restore: Option<PathBuf>,

    /// With --restore, or resuming a suspended bundle: restore even onto
    /// disks that changed since the snapshot was saved (the restored
    /// guest's view of them is then stale; see docs/snapshots.md).
    #[arg(long)]
    pub force: bool,

    /// What a guest panic reported through pvpanic does: `exit` (stop with
    /// status 5), `pause` (keep the VM for inspection), `reset` or
    /// `continue` [default: exit, or the bundle's].
    #[arg(long, value_name = "POLICY")]
    pub on_panic: Option<PanicPolicy>,
}

/// Checks `--display` and `--display-modes` against this host; the modes
/// are validated on every host so a bad list fails the same everywhere.
fn display_options(fronts: &[Front], modes: Option<&str>) -> Result<Option<Vec<DisplayModes>>> {
    // Parsed here rather than by clap: a bad list is a configuration error
    // (status 1) that names the entry, as `config.toml`'s would.
    let heads = modes
        .map(|list| {
            list.split(';')
                .map(|head| {
                    head.parse::<DisplayModes>()
                        .map_err(|e| Error::usage(format!("--display-modes {list:?}: {e}")))
                })
                .collect::<Result<Vec<_>>>()
        })
        .transpose()?;
    if heads.as_ref().is_some_and(|h| h.len() > MAX_HEADS) {
        return Err(Error::usage(format!(
            "--display-modes: at most {MAX_HEADS} heads (lists separated by ';')"
        )));
    }
    if fronts.contains(&Front::Cocoa) && !cfg!(all(target_os = "macos", target_arch = "aarch64")) {
        return Err(Error::usage(
            "--display cocoa needs a macOS host on Apple silicon (AppKit and Metal); use --display none or vnc",
        ));
    }
    Ok(heads)
}

/// The NIC list: none when asked, passt by default when it is installed
/// (and nothing, with a note, when it is not). `given` says where the
/// network came from, for the message when this host lacks its backend.
fn nics(net: Option<(Network, String)>, mac: Option<MacAddress>) -> Result<Vec<NicSpec>> {
    let backend = match net {
        Some((Network::None, _)) => return Ok(Vec::new()),
        Some((Network::Nic(backend), given)) => {
            backend
                .host_supported()
                .map_err(|why| Error::usage(format!("{given} {why}")))?;
            backend
        }
        None if passt_installed() => NetBackend::Passt,
        None => {
            tracing::info!("passt is not installed: no network (install passt, or give --net)");
            return Ok(Vec::new());
        }
    };
    Ok(vec![NicSpec { backend, mac }])
}

fn passt_installed() -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join("passt").is_file()))
}

/// Accelerators this build has, the default first. The Hypervisor.framework
/// double is a test vehicle (half the software CPU's speed), so on Linux it
/// is offered but never the default.
const AVAILABLE_ACCELERATORS: &[&str] = &[
    #[cfg(all(target_os = "macos", target_arch = "aarch64"))]
    "hvf",
    #[cfg(feature = "tcg")]
    "tcg",
    #[cfg(all(feature = "hvf-double", not(target_os = "macos")))]
    "hvf",
];

// Without any accelerator `machine` has no use.
#[cfg_attr(
    not(any(
        feature = "tcg",
        feature = "hvf-double",
        all(target_os = "macos", target_arch = "aarch64")
    )),
    allow(unused_variables)
)]
fn create_vm(machine: &Machine, accel: &str) -> Result<Box<dyn accel::Vm>> {
    match accel {
        #[cfg(feature = "tcg")]
        "tcg" => {
            let config = accel_tcg::TcgConfig {
                cpus: machine.vcpu_configs(),
                counter: machine.counter(),
                time_slice: accel_tcg::TcgConfig::DEFAULT_TIME_SLICE,
            };
            let vm = accel_tcg::TcgVm::new(machine.memory(), config)?;
            Ok(Box::new(vm))
        }
        #[cfg(any(
            all(target_os = "macos", target_arch = "aarch64"),
            feature = "hvf-double"
        ))]
        "hvf" => {
            let config = accel_hvf::HvfConfig {
                cpus: machine.vcpu_configs(),
            };
            let vm = accel_hvf::HvfVm::new(machine.memory(), config)?;
            Ok(Box::new(vm))
        }
        other => Err(Error::usage(format!(
            "--accel {other}: not available in this build (available: {})",
            AVAILABLE_ACCELERATORS.join(", ")
        ))),
    }
}

impl RunArgs {
    /// Rules clap's derive cannot express; a violation is a usage error.
    pub fn check(&self) -> Result<(), clap::Error> {
        use clap::CommandFactory;
        if self.paused && self.control.is_none() && self.bundle.is_none() {
            return Err(Cli::command().error(
                clap::error::ErrorKind::MissingRequiredArgument,
                "--paused needs a control socket to resume from: run a bundle or give --control PATH",
            ));
        }
        if self.kernel.is_none() && (self.initrd.is_some() || self.append.is_some()) {
            return Err(Cli::command().error(
                clap::error::ErrorKind::MissingRequiredArgument,
                "--initrd and --append need --kernel",
            ));
        }
        Ok(())
    }
}

/// The bundle a run uses, locked for the run's lifetime.
struct OpenBundle {
    bundle: bundle::Bundle,
    _lock: bundle::BundleLock,
}

fn open_bundle(spec: &std::path::Path) -> Result<OpenBundle> {
    let bundle = bundle::Bundle::open(spec)?;
    let lock = bundle.lock().map_err(bundle::BundleError::from)?;
    crate::logging::log_to_file(&bundle.log_path())?;
    Ok(OpenBundle {
        bundle,
        _lock: lock,
    })
}

/// A bundle's disk, its path relative to the bundle.
fn disk_from_bundle(b: &bundle::Bundle, disk: &DiskSpec) -> DiskSpec {
    DiskSpec {
        path: b.resolve(&disk.path),
        ..disk.clone()
    }
}

/// Boots `machine` on `accel` and runs it to the end.
///
/// With a window, AppKit must own the main thread (this one), so the
/// machine runs on a `vmm-main` thread meanwhile; the vCPUs have their own
/// threads either way. The window shows the machine's display model,
/// whichever device feeds it. The accelerator is created on the thread
/// that runs the machine.
#[cfg_attr(
    not(all(target_os = "macos", target_arch = "aarch64")),
    allow(unused_variables)
)]
fn run_machine(mut machine: Machine, accel: String, window: bool) -> Result<RunOutcome> {
    #[cfg(all(target_os = "macos", target_arch = "aarch64"))]
    if window {
        use apple_gfx_macos::main_thread::{run_vmm, PlatformLoop};
        use apple_gfx_macos::runloop::AppKitLoop;
        let screen = machine
            .screen()
            .ok_or_else(|| Error::usage("--display cocoa: the machine has no display"))?;
        let mut app = AppKitLoop::new(&screen).map_err(|e| {
            Error::usage(format!(
                "--display cocoa: {}",
                vm_core::error_chain::Chain(&e)
            ))
        })?;
        return run_vmm(Some(&mut app as &mut dyn PlatformLoop), move || {
            let mut vm = create_vm(&machine, &accel)?;
            Ok(machine.run(vm.as_mut())?)
        });
    }
    let mut vm = create_vm(&machine, &accel)?;
    Ok(machine.run(vm.as_mut())?)
}

/// Resolves a run's settings: options first, then the bundle, then the
/// built-in defaults.
fn machine_config(args: RunArgs, bundle: Option<&bundle::Bundle>) -> Result<MachineConfig> {
    let config = bundle.map(|b| b.config());
    let boot = match (args.firmware, args.kernel) {
        (Some(firmware), None) => BootSource::Firmware(firmware),
        (None, Some(kernel)) => BootSource::Linux {
            kernel,
            initrd: args.initrd,
            cmdline: args.append.unwrap_or_else(|| "console=ttyAMA0".into()),
        },
        (None, None) => match (bundle, config.and_then(|c| c.firmware.as_ref())) {
            (Some(b), Some(firmware)) => BootSource::Firmware(b.resolve(firmware)),
            (Some(b), None) => {
                return Err(Error::usage(format!(
                    "bundle {} names no firmware: add `firmware = \"PATH\"` to its config.toml or give --firmware",
                    b.name()
                )))
            }
            (None, _) => {
                return Err(Error::usage(
                    "nothing to boot: give a bundle, --firmware FILE or --kernel FILE",
                ))
            }
        },
        (Some(_), Some(_)) => return Err(Error::usage("give only one of --firmware and --kernel")),
    };
    let cpus = args.cpus.or(config.map(|c| c.cpus as usize)).unwrap_or(1);
    let memory = args
        .memory
        .or(config.map(|c| c.memory))
        .map_or(512 << 20, Size::bytes);
    let serial = args
        .serial
        .or(bundle.map(|b| b.serial()))
        .unwrap_or(SerialBackend::Stdio);
    // A macOS guest on MSI is untested, so firmware boots keep QEMU's
    // machine unless asked.
    let msi = args.msi.or(config.and_then(|c| c.msi)).map_or(
        matches!(boot, BootSource::Linux { .. }),
        vm_config::Msi::is_on,
    );
    let mut machine = MachineConfig::new(cpus, memory, boot, serial);
    machine.msi = msi;
    let ecid = match (args.ecid, bundle) {
        (Some(ecid), _) => ecid.0,
        (None, Some(b)) => b.ecid()?,
        (None, None) => 0,
    };
    let installer = u32::from(args.run_installer);
    machine.platform = devices::apple_cfg::CfgParams {
        ecid,
        serial: args.serial_number,
        model: args
            .model
            .or_else(|| config.and_then(|c| c.model.clone()))
            .unwrap_or_else(|| devices::apple_cfg::DEFAULT_MODEL.to_owned()),
        soc_name: args
            .soc_name
            .or_else(|| config.and_then(|c| c.soc_name.clone()))
            .unwrap_or_else(|| devices::apple_cfg::DEFAULT_SOC_NAME.to_owned()),
        run_installer1: installer,
        run_installer2: installer,
        ..Default::default()
    };
    machine.aux = match (args.aux, bundle) {
        (Some(mut aux), _) => {
            if let Some(offset) = args.aux_offset {
                aux.offset = offset.bytes();
            }
            Some(aux)
        }
        (None, Some(b)) => Some(disk_from_bundle(b, &b.config().aux)),
        (None, None) => None,
    };
    machine.root = args
        .root
        .or_else(|| bundle.map(|b| disk_from_bundle(b, &b.config().root)));
    machine.disks = if args.disks.is_empty() {
        bundle
            .map(|b| {
                b.config()
                    .disks
                    .iter()
                    .map(|d| disk_from_bundle(b, d))
                    .collect()
            })
            .unwrap_or_default()
    } else {
        args.disks
    };
    machine.shares = if args.shares.is_empty() {
        bundle
            .map(|b| {
                b.config()
                    .shares
                    .iter()
                    .map(|s| ShareSpec {
                        path: b.resolve(&s.path),
                        ..s.clone()
                    })
                    .collect()
            })
            .unwrap_or_default()
    } else {
        args.shares
    };
    for (i, share) in machine.shares.iter().enumerate() {
        if machine.shares[..i].iter().any(|s| s.tag == share.tag) {
            return Err(Error::usage(format!(
                "share tag {:?} is used twice: give each share its own tag",
                share.tag
            )));
        }
    }
    let vsock_path = args
        .vsock
        .or_else(|| bundle.map(|b| b.dir().join(bundle::VSOCK_SOCKET)))
        .filter(|_| !args.no_vsock);
    if args.vsock_cid.is_some() && vsock_path.is_none() {
        return Err(Error::usage(
            "--vsock-cid needs a vsock: give --vsock PATH or run a bundle",
        ));
    }
    machine.vsock = vsock_path.map(|path| machine::VsockConfig {
        path,
        guest_cid: args.vsock_cid.unwrap_or(machine::DEFAULT_GUEST_CID),
    });
    machine.on_panic = args
        .on_panic
        .or(config.map(|c| c.on_panic))
        .unwrap_or_default();
    // Only a MAC given here conflicts with no network: the bundle's is for
    // runs that have one, and `--net none` for one run must not need an
    // edit of config.toml.
    if args.mac.is_some() && args.net == Some(Network::None) {
        return Err(Error::usage(
            "--mac needs a network: it conflicts with --net none",
        ));
    }
    let net = match (args.net, bundle) {
        (Some(net), _) => {
            let given = format!("--net {net}");
            Some((net, given))
        }
        (None, Some(b)) => {
            let net = b.network();
            let given = format!("bundle {}: network {net}", b.name());
            Some((net, given))
        }
        (None, None) => None,
    };
    let mac = args.mac.or(config.and_then(|c| c.mac));
    machine.nics = nics(net, mac)?;
    machine.usb = !args.no_usb;
    machine.pointer_auth = args.pointer_auth;
    machine.display = display_config(
        &args.displays,
        args.gpu,
        args.display_modes.as_deref(),
        bundle.map(|b| (b.name(), &b.config().display.modes)),
    )?;
    Ok(machine)
}

/// The display: the device from `--gpu` (apple-gfx by default), the
/// heads' modes from `--display-modes`, then the bundle's modes (an empty
/// list there means no display unless `--gpu` asks for one), then the
/// device's defaults.
fn display_config(
    fronts: &[Front],
    gpu: Option<GpuArg>,
    modes: Option<&str>,
    bundle: Option<(String, &DisplayModes)>,
) -> Result<Option<DisplayConfig>> {
    let window = fronts.contains(&Front::Cocoa);
    let shown = fronts.iter().any(|f| *f != Front::None);
    let given = display_options(fronts, modes)?;
    let device = match gpu {
        Some(GpuArg::None) => {
            if shown {
                return Err(Error::usage(
                    "--gpu none leaves out the display device that --display would show",
                ));
            }
            return Ok(None);
        }
        Some(GpuArg::Virtio) => GpuKind::Virtio,
        Some(GpuArg::ApplePci) => GpuKind::AppleGfxPci,
        Some(GpuArg::Apple) | None => GpuKind::AppleGfx,
    };
    let heads: Vec<_> = match (given, bundle) {
        (Some(given), _) => given.into_iter().map(DisplayModes::into_vec).collect(),
        (None, Some((name, list))) => {
            if list.is_empty() {
                if gpu.is_none() {
                    if window {
                        return Err(Error::usage(format!(
                            "--display cocoa: bundle {name} has no display (its display.modes is empty); give --display-modes"
                        )));
                    }
                    return Ok(None);
                }
                Vec::new()
            } else {
                vec![list.clone().into_vec()]
            }
        }
        (None, None) => Vec::new(),
    };
    if device != GpuKind::Virtio && heads.len() > 1 {
        return Err(Error::usage(
            "--display-modes: apple-gfx has one head; several heads need --gpu virtio",
        ));
    }
    Ok(Some(DisplayConfig {
        device,
        heads,
        window,
    }))
}

/// The VNC servers' addresses and password: `--display vnc[=...]`, the
/// bundle's `display.vnc` and `display.vnc-password-file` for what the
/// options leave open.
fn vnc_settings(
    args: &RunArgs,
    bundle: Option<&bundle::Bundle>,
) -> Result<(Vec<crate::fronts::VncListen>, Option<Vec<u8>>)> {
    let display = bundle.map(|b| &b.config().display);
    let mut listens = Vec::new();
    for front in &args.displays {
        if let Front::Vnc { listen, head } = front {
            let listen = match (listen, display.and_then(|d| d.vnc.as_deref())) {
                (Some(l), _) => l.clone(),
                (None, Some(addr)) => crate::fronts::parse_listen(addr)
                    .map_err(|e| Error::usage(format!("bundle display.vnc: {e}")))?,
                (None, None) => {
                    crate::fronts::parse_listen(crate::fronts::DEFAULT_VNC).map_err(Error::usage)?
                }
            };
            listens.push((listen, *head));
        }
    }
    if listens.is_empty() {
        return Ok((listens, None));
    }
    let file = match (&args.vnc_password_file, bundle) {
        (Some(f), _) => Some(f.clone()),
        (None, Some(b)) => b
            .config()
            .display
            .vnc_password_file
            .as_ref()
            .map(|f| b.resolve(f)),
        (None, None) => None,
    };
    let password = file.map(|f| crate::fronts::read_password(&f)).transpose()?;
    Ok((listens, password))
}

pub fn run(args: RunArgs) -> Result<u8> {
    // Checked before the bundle is opened, so a typo fails at once.
    display_options(&args.displays, args.display_modes.as_deref())?;
    let window = args.displays.contains(&Front::Cocoa);
    let opened = args.bundle.as_deref().map(open_bundle).transpose()?;
    let bundle = opened.as_ref().map(|o| &o.bundle);
    if let Some(b) = bundle {
        tracing::info!(
            "vmapple {} (pid {}) running bundle {} ({})",
            env!("CARGO_PKG_VERSION"),
            std::process::id(),
            b.name(),
            b.dir().display()
        );
    }
    let control_path = args
        .control
        .clone()
        .or_else(|| bundle.map(|b| b.control_socket_path()));
    let accel = args.accel.clone();
    let start_paused = args.paused;
    // A suspended bundle resumes instead of booting.
    let resumed = match (&args.restore, bundle) {
        (None, Some(b)) => crate::suspend::pending(b),
        _ => None,
    };
    if let (Some(state), Some(b)) = (&resumed, bundle) {
        tracing::info!(
            "bundle {} is suspended: resuming it from {}",
            b.name(),
            state.display()
        );
    }
    if args.force && args.restore.is_none() && resumed.is_none() {
        return Err(Error::usage(
            "--force needs --restore FILE (or a suspended bundle to resume)",
        ));
    }
    // A bad snapshot is refused before anything else is opened.
    let restore = args
        .restore
        .as_deref()
        .or(resumed.as_deref())
        .map(|path| {
            machine::snapshot::Snapshot::open(path)
                .map(|s| machine::snapshot::Snapshot {
                    force: args.force,
                    ..s
                })
                .map_err(|source| machine::MachineError::Snapshot {
                    path: path.to_path_buf(),
                    source,
                })
        })
        .transpose()?;
    let (vnc_listens, vnc_password) = vnc_settings(&args, bundle)?;
    let config = machine_config(args, bundle)?;
    let backend = crate::host_display::open(config.display.as_ref())?;
    let machine = match restore {
        Some(snapshot) => {
            let started = std::time::Instant::now();
            let m = Machine::restore(config, backend, snapshot)?;
            eprintln!(
                "vmapple: restored machine state in {} ms",
                started.elapsed().as_millis()
            );
            m
        }
        None => Machine::new(config, backend)?,
    };
    let vnc = crate::fronts::start_vnc(vnc_listens, vnc_password, machine.screen())?;
    let signals = crate::signals::forward_to(machine.handle()).map_err(|source| Error::Host {
        what: "cannot install the signal handlers",
        source,
    })?;
    let control = control_path
        .map(|path| {
            crate::control::serve(
                &path,
                machine.handle(),
                machine.input_sink().map(|sink| {
                    Arc::new(crate::input::UsbInput(sink)) as Arc<dyn crate::control::InputTarget>
                }),
                machine.screen(),
            )
        })
        .transpose()?;
    if start_paused {
        machine.handle().pause();
    }
    if let Some(state) = &resumed {
        crate::suspend::discard_when_running(&machine.handle(), state);
    }
    let outcome = run_machine(machine, accel, window);
    drop(vnc);
    drop(control);
    drop(signals);
    Ok(match outcome? {
        RunOutcome::PoweredOff => {
            tracing::info!("guest powered off");
            status::POWERED_OFF
        }
        RunOutcome::GuestCrashed(report) => {
            tracing::error!("guest crashed: {report}");
            status::GUEST_CRASHED
        }
        RunOutcome::ResetLoop => status::RESET_LOOP,
        RunOutcome::GuestPanicked => {
            tracing::error!("guest panicked");
            status::GUEST_PANICKED
        }
        RunOutcome::HostStopped => {
            tracing::info!("VM stopped by the host");
            status::HOST_STOPPED
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_args(words: &[&str]) -> RunArgs {
        let cli = Cli::try_parse_from(["vmapple", "run"].iter().chain(words)).unwrap();
        match cli.command {
            Command::Run(args) => *args,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn net_none_for_one_run_overrides_a_bundle_with_a_mac() {
        let home = tempfile::tempdir().unwrap();
        let dir = home.path().join("m.vmapple");
        let b = bundle::Bundle::create(
            &dir,
            bundle::CreateOptions {
                ecid: Some(7),
                root_size: 4096,
                mac: Some("52:54:00:00:00:01".parse().unwrap()),
                ..Default::default()
            },
        )
        .unwrap();
        let config =
            machine_config(run_args(&["--firmware", "f", "--net", "none"]), Some(&b)).unwrap();
        assert!(config.nics.is_empty());
        let e = machine_config(
            run_args(&[
                "--firmware",
                "f",
                "--net",
                "none",
                "--mac",
                "52:54:00:00:00:02",
            ]),
            Some(&b),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("--mac needs a network"), "{e}");
    }

    #[test]
    fn msi_comes_from_the_option_then_the_bundle_then_the_boot_source() {
        let home = tempfile::tempdir().unwrap();
        let dir = home.path().join("m.vmapple");
        let b = bundle::Bundle::create(
            &dir,
            bundle::CreateOptions {
                ecid: Some(7),
                root_size: 4096,
                ..Default::default()
            },
        )
        .unwrap();
        let firmware = || run_args(&["--firmware", "f", "--net", "none"]);
        assert!(
            !machine_config(firmware(), Some(&b)).unwrap().msi,
            "boot ROM: off"
        );
        let text = std::fs::read_to_string(b.config_path()).unwrap();
        let text = text.replacen("cpus =", "msi = \"on\"\ncpus =", 1);
        std::fs::write(b.config_path(), text).unwrap();
        let b = bundle::Bundle::open(&dir).unwrap();
        assert!(
            machine_config(firmware(), Some(&b)).unwrap().msi,
            "the bundle's"
        );
        let mut off = firmware();
        off.msi = Some(vm_config::Msi::Off);
        assert!(!machine_config(off, Some(&b)).unwrap().msi, "the option's");
    }

    #[test]
    fn display_modes_come_from_the_option_then_the_bundle() {
        use apple_gfx::DisplayMode as M;
        let bundle_modes: DisplayModes = "1024x768@60,800x600@60".parse().unwrap();
        let b = || Some(("m".to_string(), &bundle_modes));
        let c = display_config(&[], None, None, b()).unwrap().unwrap();
        assert_eq!(
            c.heads,
            vec![vec![M::new(1024, 768, 60), M::new(800, 600, 60)]]
        );
        assert_eq!(c.device, GpuKind::AppleGfx);
        assert!(!c.window);
        let c = display_config(&[], None, Some("640x480@30"), b())
            .unwrap()
            .unwrap();
        assert_eq!(c.heads, vec![vec![M::new(640, 480, 30)]]);
        let c = display_config(&[], None, None, None).unwrap().unwrap();
        assert!(c.heads.is_empty(), "the device's defaults");
        let empty = DisplayModes::default();
        let none = || Some(("m".to_string(), &empty));
        assert!(display_config(&[], None, None, none()).unwrap().is_none());
        assert!(display_config(&[Front::Cocoa], None, None, none()).is_err());
        // The window shows virtio-gpu's heads as well as apple-gfx's.
        let virtio = display_config(
            &[Front::Cocoa],
            Some(GpuArg::Virtio),
            Some("640x480@60;800x600@60"),
            None,
        );
        if cfg!(all(target_os = "macos", target_arch = "aarch64")) {
            let c = virtio.unwrap().unwrap();
            assert!(c.window);
            assert_eq!((c.device, c.heads.len()), (GpuKind::Virtio, 2));
        } else {
            assert!(virtio.is_err(), "no window off a Mac");
        }
        let c = display_config(&[], Some(GpuArg::Virtio), None, none())
            .unwrap()
            .unwrap();
        assert_eq!(c.device, GpuKind::Virtio, "--gpu asks for a display");
    }

    #[test]
    fn heads_are_separated_by_semicolons_and_need_virtio_gpu() {
        use apple_gfx::DisplayMode as M;
        let c = display_config(
            &[Front::Vnc {
                listen: None,
                head: 0,
            }],
            Some(GpuArg::Virtio),
            Some("1024x768@60;800x600@60,640x480@60"),
            None,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            c.heads,
            vec![
                vec![M::new(1024, 768, 60)],
                vec![M::new(800, 600, 60), M::new(640, 480, 60)]
            ]
        );
        let e = display_config(&[], None, Some("1024x768@60;800x600@60"), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("several heads need --gpu virtio"), "{e}");
        let five = ["640x480@60"; 5].join(";");
        let e = display_config(&[], Some(GpuArg::Virtio), Some(&five), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("at most 4 heads"), "{e}");
        let e = display_config(
            &[Front::Vnc {
                listen: None,
                head: 0,
            }],
            Some(GpuArg::None),
            None,
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("--gpu none"), "{e}");
        assert!(display_config(&[], Some(GpuArg::None), None, None)
            .unwrap()
            .is_none());
    }

    #[test]
    fn display_options_are_checked_on_every_host() {
        let err = display_options(&[], Some("1920x")).unwrap_err().to_string();
        assert!(err.starts_with("--display-modes \"1920x\": "), "{err}");
        assert!(display_options(&[], Some("")).is_err());
        assert!(display_options(&[], Some("640x480@60;")).is_err());
        let modes = display_options(&[], Some("1280x800@60,640x480@30")).unwrap();
        assert_eq!(modes.unwrap()[0].len(), 2);
        assert!(display_options(&[], None).unwrap().is_none());
        let cocoa = display_options(&[Front::Cocoa], Some("640x480@60"));
        if cfg!(all(target_os = "macos", target_arch = "aarch64")) {
            assert_eq!(cocoa.unwrap().unwrap().len(), 1);
        } else {
            let err = cocoa.unwrap_err().to_string();
            assert!(err.contains("needs a macOS host"), "{err}");
        }
    }

    #[test]
    fn options_take_the_config_types() {
        let a = run_args(&["--memory", "1G", "--ecid", "0x10", "--on-panic", "pause"]);
        assert_eq!(a.memory, Some(Size(1 << 30)));
        assert_eq!(a.ecid, Some(Ecid(16)));
        assert_eq!(a.on_panic, Some(PanicPolicy::Pause));
        let args = run_args(&[
            "--firmware",
            "f",
            "--aux",
            "a,,b.img,ro",
            "--aux-offset",
            "16K",
        ]);
        let aux = machine_config(args, None).unwrap().aux.unwrap();
        assert_eq!(
            (aux.path.to_str(), aux.read_only, aux.offset),
            (Some("a,b.img"), true, 16384)
        );
        let args = run_args(&[
            "--firmware",
            "f",
            "--net",
            "unix:/tmp/s",
            "--mac",
            "52:54:00:00:00:07",
        ]);
        let c = machine_config(args, None).unwrap();
        assert_eq!(c.nics[0].backend, NetBackend::UnixStream("/tmp/s".into()));
        assert_eq!(c.nics[0].mac.unwrap().to_string(), "52:54:00:00:00:07");
        for bad in [
            &["--memory", "12Q"][..],
            &["--aux", "x,y.img"],
            &["--ecid", "twelve"],
            &["--net", "slirp"],
            &["--mac", "01:00:5e:00:00:01"],
            &["--on-panic", "explode"],
            &["--disk", ",readonly"],
        ] {
            let e = Cli::try_parse_from(["vmapple", "run"].iter().chain(bad)).unwrap_err();
            assert_eq!(e.kind(), clap::error::ErrorKind::ValueValidation, "{bad:?}");
        }
    }
}
