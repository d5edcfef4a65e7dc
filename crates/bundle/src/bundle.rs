//! VM bundles: one directory per VM.
//!
//! ```text
//! NAME.vmapple/
//!   config.toml         human-editable configuration (config.rs)
//!   MachineIdentifier   binary plist {ECID: n}, as Virtualization.framework
//!   HardwareModel       the imported VM's hardware-model plist, byte for
//!                       byte (only in imported and pulled bundles)
//!   aux.img             auxiliary storage (sparse)
//!   root.img            system disk (sparse)
//!   bundle.lock         locked by the process running the VM; holds its pid
//!   control.sock        control socket while running (control.rs)
//!   vsock.sock          virtio-vsock's host socket while running
//!   vmapple.log         log of the last run
//! ```
//!
//! A name (no `/`, no `.vmapple` suffix) resolves to `HOME/NAME.vmapple`
//! where HOME is `$VMAPPLE_HOME`, else `$XDG_DATA_HOME/vmapple`, else
//! `~/.local/share/vmapple`.
//!
//! A bundle may come from elsewhere (a copy, an archive), so the files
//! vmapple writes in it (`bundle.lock`, `vmapple.log`) are opened without
//! following symbolic links and must be plain files of their own: a link
//! planted there never makes vmapple truncate or append to its target.
//! What vmapple creates is private to the user (directories 0700, files
//! 0600) and on stable storage before `create`/`import` report success.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use crate::config::{
    ConfigError, DiskSpec, DisplayModes, Ecid, InvalidConfig, MacAddress, NetBackend, Network,
    SerialBackend, VmConfig,
};
use crate::hardware_model::{HardwareModel, HARDWARE_MODEL_FILE};
use crate::identity::{self, IdentityError, MACHINE_IDENTIFIER_FILE};

pub const CONFIG_FILE: &str = "config.toml";
pub const LOCK_FILE: &str = "bundle.lock";
pub const CONTROL_SOCKET: &str = "control.sock";
/// virtio-vsock's host socket (guest connections to host port P go to
/// `vsock.sock_P`).
pub const VSOCK_SOCKET: &str = "vsock.sock";
pub const LOG_FILE: &str = "vmapple.log";
/// A suspended VM (`vmapple suspend`), resumed by the next run.
pub const SUSPENDED_STATE: &str = "suspended.snap";
pub const AUX_IMAGE: &str = "aux.img";
pub const ROOT_IMAGE: &str = "root.img";
pub const BUNDLE_SUFFIX: &str = "vmapple";

/// Default size of a new aux image: what Virtualization.framework creates
/// (macosvm: "aux is typically 32M").
pub const DEFAULT_AUX_SIZE: u64 = 32 << 20;
pub const DEFAULT_ROOT_SIZE: u64 = 64 << 30;

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} already exists; refusing to overwrite it", path.display())]
    Exists { path: PathBuf },
    #[error("{} is not a vmapple bundle (no {CONFIG_FILE})", path.display())]
    NotABundle { path: PathBuf },
    #[error("no bundle at {} (`vmapple list` shows the bundles there are)", path.display())]
    NotFound { path: PathBuf },
    #[error("{name:?} is not a valid bundle name (letters, digits, '.', '_', '-'; not starting with '.')")]
    BadName { name: String },
    #[error("no bundle home: set VMAPPLE_HOME, XDG_DATA_HOME or HOME")]
    NoHome,
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    HardwareModel(#[from] crate::hardware_model::HardwareModelError),
    #[error("{}: config.toml says ecid {config} but {MACHINE_IDENTIFIER_FILE} says {file}", path.display())]
    EcidMismatch {
        path: PathBuf,
        config: u64,
        file: u64,
    },
    #[error("{}: {source}", path.display())]
    Invalid {
        path: PathBuf,
        #[source]
        source: InvalidConfig,
    },
    /// A bundle or image that cannot be used as it is (clone, pull).
    #[error("{}: {message}", path.display())]
    Unusable { path: PathBuf, message: String },
    #[error("{}: no ecid in {CONFIG_FILE} and no {MACHINE_IDENTIFIER_FILE}", path.display())]
    NoEcid { path: PathBuf },
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error("{}: not deleted: it is a symbolic link (give the bundle's own path)", path.display())]
    DeleteThroughLink { path: PathBuf },
    #[error("{}: not deleted: a bundle is a directory named NAME.{BUNDLE_SUFFIX}", path.display())]
    DeleteNotBundleDir { path: PathBuf },
    #[error("cannot delete bundle {}: its disk {}", bundle.display(), source)]
    DiskInUse {
        bundle: PathBuf,
        #[source]
        source: block::OpenError,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> BundleError + '_ {
    move |source| BundleError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("bundle {} is already in use by process {pid}", bundle.display())]
    InUse { bundle: PathBuf, pid: u32 },
    #[error("bundle {} is already in use by another process", bundle.display())]
    InUseUnknown { bundle: PathBuf },
    #[error("{}: cannot lock: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {why}; refusing to write to it (remove it if the bundle is not running)", path.display())]
    NotAPlainFile { path: PathBuf, why: &'static str },
}

/// What `vmapple create` asks for.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub cpus: u32,
    pub memory: u64,
    /// `None`: a random ECID (a new machine).
    pub ecid: Option<u64>,
    pub firmware: Option<PathBuf>,
    pub aux_size: u64,
    pub root_size: u64,
    pub network: Network,
    pub mac: Option<MacAddress>,
    pub display_modes: DisplayModes,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            cpus: 2,
            memory: 4 << 30,
            ecid: None,
            firmware: None,
            aux_size: DEFAULT_AUX_SIZE,
            root_size: DEFAULT_ROOT_SIZE,
            network: Network::default(),
            mac: None,
            display_modes: crate::config::DisplayConfig::default().modes,
        }
    }
}

/// An opened bundle.
#[derive(Debug, Clone)]
pub struct Bundle {
    dir: PathBuf,
    config: VmConfig,
}

/// One line of `vmapple list`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleSummary {
    pub name: String,
    pub path: PathBuf,
    /// `None` when the configuration could not be read (see `error`).
    pub cpus: Option<u32>,
    pub memory: Option<u64>,
    /// Pid of the process running it, if it is running.
    pub running: Option<u32>,
    pub error: Option<String>,
}

/// The bundles home from explicit values of `VMAPPLE_HOME`,
/// `XDG_DATA_HOME` and `HOME` (empty values count as unset, as the XDG
/// spec says).
pub fn bundles_home_from(
    vmapple_home: Option<&Path>,
    xdg_data_home: Option<&Path>,
    home: Option<&Path>,
) -> Option<PathBuf> {
    fn set(p: Option<&Path>) -> Option<&Path> {
        p.filter(|p| !p.as_os_str().is_empty())
    }
    if let Some(p) = set(vmapple_home) {
        return Some(p.to_path_buf());
    }
    if let Some(p) = set(xdg_data_home) {
        return Some(p.join("vmapple"));
    }
    set(home).map(|h| h.join(".local/share/vmapple"))
}

/// The bundles home from the environment.
pub fn bundles_home() -> Result<PathBuf, BundleError> {
    let var = |k| std::env::var_os(k).map(PathBuf::from);
    bundles_home_from(
        var("VMAPPLE_HOME").as_deref(),
        var("XDG_DATA_HOME").as_deref(),
        var("HOME").as_deref(),
    )
    .ok_or(BundleError::NoHome)
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name.len() <= 200
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// Where `spec` points: a bare name (one path component, no `.vmapple`
/// suffix) is looked up in `home`; anything else is a path.
pub fn resolve_in(home: &Path, spec: &Path) -> Result<PathBuf, BundleError> {
    let mut comps = spec.components();
    let single = match (comps.next(), comps.next()) {
        (Some(Component::Normal(c)), None) => Some(c),
        _ => None,
    };
    let has_suffix = spec.extension().is_some_and(|e| e == BUNDLE_SUFFIX);
    match single {
        Some(name) if !has_suffix => {
            let name =
                name.to_str()
                    .filter(|n| valid_name(n))
                    .ok_or_else(|| BundleError::BadName {
                        name: name.to_string_lossy().into_owned(),
                    })?;
            Ok(home.join(format!("{name}.{BUNDLE_SUFFIX}")))
        }
        _ => Ok(spec.to_path_buf()),
    }
}

pub(crate) fn random_u64() -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(u64::from_ne_bytes(b))
}

/// Mode of every file vmapple creates in a bundle: guest disks hold the
/// guest's data, which is the user's alone.
const FILE_MODE: u32 = 0o600;
/// Mode of the directories vmapple creates.
const DIR_MODE: u32 = 0o700;

/// A new file, private to the user; fails if anything is at `path`.
fn create_private(path: &Path) -> Result<File, BundleError> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(path)
        .map_err(io_err(path))
}

fn create_sparse(path: &Path, size: u64) -> Result<(), BundleError> {
    let f = create_private(path)?;
    f.set_len(size).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

pub(crate) fn write_new(path: &Path, data: &[u8]) -> Result<(), BundleError> {
    let mut f = create_private(path)?;
    f.write_all(data).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

/// Makes the entries of directory `dir` durable (a new file is only
/// reachable after a crash once its directory is synced too).
fn sync_dir(dir: &Path) -> Result<(), BundleError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// Opens a file vmapple writes inside a bundle (`bundle.lock`,
/// `vmapple.log`) without following a symbolic link, and only if it is a
/// plain file with no other name: a link or a hard link planted in a
/// bundle must not make vmapple truncate or append to another file. The
/// file is created 0600 if missing. `O_NONBLOCK` keeps a FIFO planted
/// there from blocking the open; it does not affect plain files.
pub fn open_bundle_file(path: &Path, options: &mut OpenOptions) -> Result<File, LockError> {
    let file = options
        .mode(FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| match source.raw_os_error() {
            Some(libc::ELOOP) => LockError::NotAPlainFile {
                path: path.to_path_buf(),
                why: "is a symbolic link",
            },
            _ => LockError::Io {
                path: path.to_path_buf(),
                source,
            },
        })?;
    let meta = file.metadata().map_err(|source| LockError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let why = if !meta.is_file() {
        "is not a regular file"
    } else if meta.nlink() > 1 {
        "has other names (hard links)"
    } else {
        return Ok(file);
    };
    Err(LockError::NotAPlainFile {
        path: path.to_path_buf(),
        why,
    })
}

impl Bundle {
    /// Creates a new bundle directory with sparse disks and a machine
    /// identifier. Refuses if `dir` exists; on failure removes what it made.
    pub fn create(dir: &Path, opts: CreateOptions) -> Result<Bundle, BundleError> {
        let ecid = match opts.ecid {
            Some(e) => e,
            None => random_u64().map_err(io_err(Path::new("/dev/urandom")))?,
        };
        let mut config = VmConfig::new(
            opts.cpus,
            opts.memory,
            DiskSpec::new(AUX_IMAGE),
            DiskSpec::new(ROOT_IMAGE),
        );
        config.ecid = Some(Ecid(ecid));
        config.firmware = opts.firmware;
        config.network = opts.network;
        config.mac = opts.mac;
        config.display.modes = opts.display_modes;
        config.validate().map_err(|source| BundleError::Invalid {
            path: dir.to_path_buf(),
            source,
        })?;
        Self::create_with(
            dir,
            config,
            ecid,
            None,
            &[(AUX_IMAGE, opts.aux_size), (ROOT_IMAGE, opts.root_size)],
        )
    }

    /// Creates a bundle around an imported VM: its config (whose disks
    /// point at the imported files, not copies) and its machine identifier.
    pub fn create_imported(
        dir: &Path,
        imported: &crate::import::ImportedVm,
    ) -> Result<Bundle, BundleError> {
        let model = imported.hardware_model.as_ref();
        Self::create_with(
            dir,
            imported.config.clone(),
            imported.ecid,
            model.map(HardwareModel::raw),
            &[],
        )
    }

    fn create_with(
        dir: &Path,
        config: VmConfig,
        ecid: u64,
        hardware_model: Option<&[u8]>,
        images: &[(&str, u64)],
    ) -> Result<Bundle, BundleError> {
        if fs::symlink_metadata(dir).is_ok() {
            return Err(BundleError::Exists {
                path: dir.to_path_buf(),
            });
        }
        let parent = dir
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        fs::DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(parent)
            .map_err(io_err(parent))?;
        // A non-recursive create fails on an existing path, so a race with
        // another creator cannot make us fill someone else's directory.
        fs::DirBuilder::new()
            .mode(DIR_MODE)
            .create(dir)
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    BundleError::Exists {
                        path: dir.to_path_buf(),
                    }
                } else {
                    io_err(dir)(e)
                }
            })?;
        let fill = || -> Result<(), BundleError> {
            write_new(
                &dir.join(MACHINE_IDENTIFIER_FILE),
                &identity::machine_identifier_plist(ecid),
            )?;
            if let Some(model) = hardware_model {
                write_new(&dir.join(HARDWARE_MODEL_FILE), model)?;
            }
            for (name, size) in images {
                create_sparse(&dir.join(name), *size)?;
            }
            write_new(&dir.join(CONFIG_FILE), config.to_toml().as_bytes())?;
            sync_dir(dir)?;
            sync_dir(parent)
        };
        if let Err(e) = fill() {
            let _ = fs::remove_dir_all(dir);
            return Err(e);
        }
        Ok(Bundle {
            dir: dir.to_path_buf(),
            config,
        })
    }

    /// Opens a bundle by path, or by name under [`bundles_home`].
    pub fn open(path_or_name: &Path) -> Result<Bundle, BundleError> {
        let needs_home = resolve_in(Path::new("/"), path_or_name)? != path_or_name;
        let dir = if needs_home {
            resolve_in(&bundles_home()?, path_or_name)?
        } else {
            path_or_name.to_path_buf()
        };
        Self::open_dir(&dir)
    }

    /// Opens a bundle by path, or by name under `home`.
    pub fn open_in(home: &Path, path_or_name: &Path) -> Result<Bundle, BundleError> {
        Self::open_dir(&resolve_in(home, path_or_name)?)
    }

    fn open_dir(dir: &Path) -> Result<Bundle, BundleError> {
        let config_path = dir.join(CONFIG_FILE);
        if !config_path.is_file() {
            if !dir.exists() {
                return Err(BundleError::NotFound {
                    path: dir.to_path_buf(),
                });
            }
            return Err(BundleError::NotABundle {
                path: dir.to_path_buf(),
            });
        }
        let config = VmConfig::load(&config_path)?;
        Ok(Bundle {
            dir: dir.to_path_buf(),
            config,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The bundle's name: its directory name without `.vmapple`.
    pub fn name(&self) -> String {
        bundle_name(&self.dir)
    }

    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// A path from config.toml, made absolute against the bundle directory.
    pub fn resolve(&self, p: &Path) -> PathBuf {
        self.dir.join(p)
    }

    /// The serial backend of config.toml, a relative `file:`/`unix:`
    /// path taken relative to the bundle directory (like every path
    /// there), not to wherever vmapple was started.
    pub fn serial(&self) -> SerialBackend {
        match &self.config.serial {
            SerialBackend::File(p) => SerialBackend::File(self.resolve(p)),
            SerialBackend::Unix(p) => SerialBackend::Unix(self.resolve(p)),
            other => other.clone(),
        }
    }

    /// The network of config.toml, a backend's relative socket paths
    /// taken relative to the bundle directory.
    pub fn network(&self) -> Network {
        match &self.config.network {
            Network::Nic(NetBackend::UnixStream(p)) => {
                Network::Nic(NetBackend::UnixStream(self.resolve(p)))
            }
            Network::Nic(NetBackend::UnixDgram { local, peer }) => {
                Network::Nic(NetBackend::UnixDgram {
                    local: self.resolve(local),
                    peer: self.resolve(peer),
                })
            }
            other => other.clone(),
        }
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join(CONFIG_FILE)
    }

    pub fn control_socket_path(&self) -> PathBuf {
        self.dir.join(CONTROL_SOCKET)
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join(LOG_FILE)
    }

    pub fn lock_path(&self) -> PathBuf {
        self.dir.join(LOCK_FILE)
    }

    /// The hardware model the bundle was imported or pulled with, if any.
    pub fn hardware_model(&self) -> Result<Option<HardwareModel>, BundleError> {
        Ok(crate::hardware_model::from_file(
            &self.dir.join(HARDWARE_MODEL_FILE),
        )?)
    }

    pub fn machine_identifier_path(&self) -> PathBuf {
        self.dir.join(MACHINE_IDENTIFIER_FILE)
    }

    /// The machine's ECID: config.toml's `ecid`, else the
    /// `MachineIdentifier` file; if both exist they must agree.
    pub fn ecid(&self) -> Result<u64, BundleError> {
        let ident = self.machine_identifier_path();
        let from_file = if ident.exists() {
            Some(identity::ecid_from_path(&ident)?)
        } else {
            None
        };
        match (self.config.ecid, from_file) {
            (Some(Ecid(c)), Some(f)) if c != f => Err(BundleError::EcidMismatch {
                path: self.dir.clone(),
                config: c,
                file: f,
            }),
            (Some(Ecid(c)), _) => Ok(c),
            (None, Some(f)) => Ok(f),
            (None, None) => Err(BundleError::NoEcid {
                path: self.dir.clone(),
            }),
        }
    }

    /// Takes the bundle's run lock: only one process may run a VM from a
    /// bundle at a time. Held until the returned guard drops (or the
    /// process dies: the kernel releases flocks).
    pub fn lock(&self) -> Result<BundleLock, LockError> {
        BundleLock::acquire(&self.dir)
    }
}

fn bundle_name(dir: &Path) -> String {
    let file = dir.file_name().map(|n| n.to_string_lossy().into_owned());
    let file = file.unwrap_or_else(|| dir.display().to_string());
    file.strip_suffix(&format!(".{BUNDLE_SUFFIX}"))
        .map(str::to_string)
        .unwrap_or(file)
}

/// The bundles in `home`, sorted by name. A bundle whose config cannot be
/// read is listed with its error, not left out.
pub fn list(home: &Path) -> Vec<BundleSummary> {
    let Ok(entries) = fs::read_dir(home) else {
        return Vec::new();
    };
    let mut out: Vec<BundleSummary> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == BUNDLE_SUFFIX) && p.is_dir())
        .map(|path| {
            let running = holder_pid(&path);
            let (cpus, memory, error) = match Bundle::open_dir(&path) {
                Ok(b) => (Some(b.config.cpus), Some(b.config.memory.0), None),
                Err(e) => (None, None, Some(e.to_string())),
            };
            BundleSummary {
                name: bundle_name(&path),
                path,
                cpus,
                memory,
                running,
                error,
            }
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Pid of the process running `dir`'s VM, if one does (0 if it cannot be
/// read). Only tests the lock, never takes it: a `run` that starts at the
/// same moment must not find the bundle locked by `list`.
fn holder_pid(dir: &Path) -> Option<u32> {
    let path = dir.join(LOCK_FILE);
    let mut file = open_bundle_file(&path, OpenOptions::new().read(true)).ok()?;
    if !run_marker_held(&file) {
        return None;
    }
    let mut text = String::new();
    let _ = Read::by_ref(&mut file).take(32).read_to_string(&mut text);
    Some(text.trim().parse().unwrap_or(0))
}

/// The byte-range lock a running VM holds on `bundle.lock` besides its
/// flock: unlike a flock, it can be tested without being taken
/// (`F_OFD_GETLK`). Open-file-description locks conflict between two
/// descriptors of one process too, as flocks do.
#[cfg(target_os = "linux")]
const MARKER_SET: libc::c_int = libc::F_OFD_SETLK;
#[cfg(target_os = "linux")]
const MARKER_GET: libc::c_int = libc::F_OFD_GETLK;
/// macOS has no open-file-description locks; there `F_GETLK` sees the
/// flock itself (BSD keeps flocks and fcntl locks in one list), so no
/// marker is taken.
#[cfg(not(target_os = "linux"))]
const MARKER_GET: libc::c_int = libc::F_GETLK;

/// A write lock on byte 0 (the lock `F_GETLK` tests for, or the marker).
// The lock-type constants are `c_int` on Linux and `c_short` on macOS.
#[allow(clippy::unnecessary_cast)]
fn marker_lock() -> libc::flock {
    // SAFETY: all-zero is a valid `flock` (l_pid 0, as OFD locks need).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = 0;
    fl.l_len = 1;
    fl
}

#[allow(clippy::unnecessary_cast)] // as in marker_lock
fn run_marker_held(file: &File) -> bool {
    let mut fl = marker_lock();
    // SAFETY: fcntl on a descriptor we own with a live `flock` it may
    // write.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), MARKER_GET, &mut fl) };
    rc == 0 && fl.l_type != libc::F_UNLCK as libc::c_short
}

#[cfg(target_os = "linux")]
fn take_run_marker(file: &File) -> std::io::Result<()> {
    let mut fl = marker_lock();
    // SAFETY: as in run_marker_held.
    if unsafe { libc::fcntl(file.as_raw_fd(), MARKER_SET, &mut fl) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn take_run_marker(_file: &File) -> std::io::Result<()> {
    Ok(())
}

/// Deletes a bundle directory. Only a real bundle: a directory (not a
/// link to one) named `*.vmapple` whose config.toml parses and whose
/// machine identity reads. Refused while the bundle runs, and while any
/// of its disks is in use (a VM started with `--root` on the bundle's
/// disk, or QEMU): both are held locked while the files go.
pub fn delete(path: &Path) -> Result<(), BundleError> {
    if !path.join(CONFIG_FILE).is_file() {
        return Err(BundleError::NotABundle {
            path: path.to_path_buf(),
        });
    }
    let meta = fs::symlink_metadata(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            BundleError::NotFound {
                path: path.to_path_buf(),
            }
        } else {
            io_err(path)(e)
        }
    })?;
    if meta.file_type().is_symlink() {
        return Err(BundleError::DeleteThroughLink {
            path: path.to_path_buf(),
        });
    }
    if !meta.is_dir() || path.extension().is_none_or(|e| e != BUNDLE_SUFFIX) {
        return Err(BundleError::DeleteNotBundleDir {
            path: path.to_path_buf(),
        });
    }
    let bundle = Bundle::open_dir(path)?;
    bundle.ecid()?;
    // Hold the lock while deleting so no VM starts in the middle.
    let _lock = BundleLock::acquire(path)?;
    let config = bundle.config();
    let mut held = Vec::new();
    for disk in [&config.aux, &config.root].into_iter().chain(&config.disks) {
        let image = bundle.resolve(&disk.path);
        match block::ImageLock::exclusive(&image) {
            Ok(lock) => held.push(lock),
            Err(source) => {
                return Err(BundleError::DiskInUse {
                    bundle: path.to_path_buf(),
                    source,
                })
            }
        }
    }
    fs::remove_dir_all(path).map_err(io_err(path))
}

/// The run lock of a bundle; released on drop.
#[derive(Debug)]
pub struct BundleLock {
    file: File,
    path: PathBuf,
}

impl BundleLock {
    fn acquire(dir: &Path) -> Result<BundleLock, LockError> {
        let path = dir.join(LOCK_FILE);
        let io = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        let mut file = open_bundle_file(
            &path,
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false),
        )?;
        // SAFETY: flock on a descriptor we own; no memory is passed.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let mut text = String::new();
                let _ = Read::by_ref(&mut file).take(32).read_to_string(&mut text);
                let bundle = dir.to_path_buf();
                return Err(match text.trim().parse::<u32>() {
                    Ok(pid) => LockError::InUse { bundle, pid },
                    Err(_) => LockError::InUseUnknown { bundle },
                });
            }
            return Err(io(err));
        }
        take_run_marker(&file).map_err(io)?;
        // Record who holds it, for the message other processes print.
        file.set_len(0).map_err(io)?;
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        writeln!(file, "{}", std::process::id()).map_err(io)?;
        Ok(BundleLock { file, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for BundleLock {
    fn drop(&mut self) {
        // A stale pid must not outlive the lock; the flock itself goes with
        // the descriptor.
        let _ = self.file.set_len(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn small() -> CreateOptions {
        CreateOptions {
            ecid: Some(1234567890123456789),
            root_size: 1 << 30,
            ..CreateOptions::default()
        }
    }

    #[test]
    fn create_then_open() {
        let home = tempfile::tempdir().unwrap();
        let dir = home.path().join("mac.vmapple");
        let b = Bundle::create(&dir, small()).unwrap();
        assert_eq!(b.name(), "mac");
        assert_eq!(b.ecid().unwrap(), 1234567890123456789);
        let root = fs::metadata(dir.join(ROOT_IMAGE)).unwrap();
        assert_eq!(root.len(), 1 << 30);
        // Sparse: nothing (or next to nothing) allocated.
        assert!(root.blocks() * 512 < 1 << 20);
        assert_eq!(
            fs::metadata(dir.join(AUX_IMAGE)).unwrap().len(),
            DEFAULT_AUX_SIZE
        );
        assert_eq!(
            identity::ecid_from_path(&dir.join(MACHINE_IDENTIFIER_FILE)).unwrap(),
            1234567890123456789
        );
        assert_eq!(identity::ecid_from_path(&dir).unwrap(), 1234567890123456789);

        let by_name = Bundle::open_in(home.path(), Path::new("mac")).unwrap();
        assert_eq!(by_name.config(), b.config());
        assert_eq!(by_name.config().cpus, 2);
        assert_eq!(
            by_name.resolve(&by_name.config().root.path),
            dir.join(ROOT_IMAGE)
        );
        let by_path = Bundle::open_in(Path::new("/nonexistent"), &dir).unwrap();
        assert_eq!(by_path.dir(), dir);
        assert_eq!(by_path.control_socket_path(), dir.join("control.sock"));
        assert_eq!(by_path.log_path(), dir.join("vmapple.log"));
    }

    #[test]
    fn opening_a_missing_bundle_says_there_is_none() {
        let home = tempfile::tempdir().unwrap();
        let e = Bundle::open_in(home.path(), Path::new("ghost"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("no bundle at "), "{e}");
        assert!(e.contains("ghost.vmapple"), "{e}");
        fs::create_dir(home.path().join("empty.vmapple")).unwrap();
        let e = Bundle::open_in(home.path(), Path::new("empty"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("is not a vmapple bundle"), "{e}");
    }

    #[test]
    fn create_refuses_to_overwrite() {
        let home = tempfile::tempdir().unwrap();
        let dir = home.path().join("a.vmapple");
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join("precious"), "x").unwrap();
        let e = Bundle::create(&dir, small()).unwrap_err();
        assert!(e.to_string().contains("already exists"), "{e}");
        assert!(dir.join("precious").exists());
    }

    #[test]
    fn create_with_bad_options_leaves_nothing() {
        let home = tempfile::tempdir().unwrap();
        let dir = home.path().join("bad.vmapple");
        let e = Bundle::create(&dir, CreateOptions { cpus: 0, ..small() }).unwrap_err();
        assert!(e.to_string().contains("cpus"), "{e}");
        assert!(!dir.exists());
    }

    #[test]
    fn random_ecids_differ() {
        let home = tempfile::tempdir().unwrap();
        let opts = CreateOptions {
            ecid: None,
            root_size: 4096,
            ..CreateOptions::default()
        };
        let a = Bundle::create(&home.path().join("a.vmapple"), opts.clone()).unwrap();
        let b = Bundle::create(&home.path().join("b.vmapple"), opts).unwrap();
        assert_ne!(a.ecid().unwrap(), b.ecid().unwrap());
    }

    #[test]
    fn ecid_mismatch_is_reported() {
        let home = tempfile::tempdir().unwrap();
        let dir = home.path().join("m.vmapple");
        Bundle::create(&dir, small()).unwrap();
        fs::write(
            dir.join(MACHINE_IDENTIFIER_FILE),
            identity::machine_identifier_plist(5),
        )
        .unwrap();
        let b = Bundle::open_in(home.path(), Path::new("m")).unwrap();
        let e = b.ecid().unwrap_err().to_string();
        assert!(e.contains("says ecid 1234567890123456789"), "{e}");
    }

    #[test]
    fn names_and_homes() {
        let home = Path::new("/h");
        assert_eq!(
            resolve_in(home, Path::new("mac")).unwrap(),
            Path::new("/h/mac.vmapple")
        );
        assert_eq!(
            resolve_in(home, Path::new("mac.vmapple")).unwrap(),
            Path::new("mac.vmapple")
        );
        assert_eq!(
            resolve_in(home, Path::new("./mac")).unwrap(),
            Path::new("./mac")
        );
        assert_eq!(
            resolve_in(home, Path::new("/x/y")).unwrap(),
            Path::new("/x/y")
        );
        assert!(matches!(
            resolve_in(home, Path::new("bad name")),
            Err(BundleError::BadName { .. })
        ));
        assert_eq!(
            bundles_home_from(
                Some(Path::new("/v")),
                Some(Path::new("/x")),
                Some(Path::new("/h"))
            ),
            Some(PathBuf::from("/v"))
        );
        assert_eq!(
            bundles_home_from(
                Some(Path::new("")),
                Some(Path::new("/x")),
                Some(Path::new("/h"))
            ),
            Some(PathBuf::from("/x/vmapple"))
        );
        assert_eq!(
            bundles_home_from(None, None, Some(Path::new("/h"))),
            Some(PathBuf::from("/h/.local/share/vmapple"))
        );
        assert_eq!(bundles_home_from(None, None, None), None);
    }

    #[test]
    fn open_errors() {
        let home = tempfile::tempdir().unwrap();
        let e = Bundle::open_in(home.path(), Path::new("nope")).unwrap_err();
        assert!(matches!(e, BundleError::NotFound { .. }), "{e}");
        fs::create_dir(home.path().join("empty.vmapple")).unwrap();
        let e = Bundle::open_in(home.path(), Path::new("empty")).unwrap_err();
        assert!(e.to_string().contains("not a vmapple bundle"), "{e}");
    }

    #[test]
    fn lock_contention_names_the_holder() {
        let home = tempfile::tempdir().unwrap();
        let dir = home.path().join("busy.vmapple");
        let b = Bundle::create(&dir, small()).unwrap();
        let held = b.lock().unwrap();
        assert_eq!(
            fs::read_to_string(held.path()).unwrap().trim(),
            std::process::id().to_string()
        );
        let e = b.lock().unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "bundle {} is already in use by process {}",
                dir.display(),
                std::process::id()
            )
        );
        // Deleting a running bundle is refused; the bundle stays.
        let e = delete(&dir).unwrap_err();
        assert!(e.to_string().contains("already in use"), "{e}");
        assert!(dir.join(CONFIG_FILE).exists());
        let listed = list(home.path());
        assert_eq!(listed[0].running, Some(std::process::id()));

        drop(held);
        assert_eq!(list(home.path())[0].running, None);
        let again = b.lock().unwrap();
        drop(again);
        delete(&dir).unwrap();
        assert!(!dir.exists());
    }

    #[test]
    fn delete_refuses_non_bundles() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("keep"), "x").unwrap();
        assert!(matches!(
            delete(dir.path()),
            Err(BundleError::NotABundle { .. })
        ));
        assert!(dir.path().join("keep").exists());
    }

    /// Defect: a `bundle.lock` or log planted as a link made list/run/
    /// delete truncate or append to the link's target.
    #[test]
    fn a_lock_file_that_is_a_link_is_never_written_through() {
        let home = tempfile::tempdir().unwrap();
        let dir = home.path().join("l.vmapple");
        let b = Bundle::create(&dir, small()).unwrap();
        let victim = home.path().join("precious.txt");
        fs::write(&victim, "precious\n").unwrap();
        std::os::unix::fs::symlink(&victim, dir.join(LOCK_FILE)).unwrap();

        let listed = list(home.path());
        assert_eq!(listed[0].running, None);
        let e = b.lock().unwrap_err().to_string();
        assert!(e.contains("is a symbolic link"), "{e}");
        let e = delete(&dir).unwrap_err().to_string();
        assert!(e.contains("is a symbolic link"), "{e}");
        let e = open_bundle_file(
            &dir.join(LOG_FILE),
            OpenOptions::new().append(true).create(true),
        )
        .map(|_| ())
        .and_then(|()| {
            fs::remove_file(dir.join(LOG_FILE)).unwrap();
            std::os::unix::fs::symlink(&victim, dir.join(LOG_FILE)).unwrap();
            open_bundle_file(
                &dir.join(LOG_FILE),
                OpenOptions::new().append(true).create(true),
            )
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("is a symbolic link"), "{e}");
        assert_eq!(fs::read_to_string(&victim).unwrap(), "precious\n");

        // A hard link to the victim is refused the same way.
        fs::remove_file(dir.join(LOCK_FILE)).unwrap();
        fs::hard_link(&victim, dir.join(LOCK_FILE)).unwrap();
        let e = b.lock().unwrap_err().to_string();
        assert!(e.contains("hard links"), "{e}");
        assert_eq!(fs::read_to_string(&victim).unwrap(), "precious\n");
    }

    /// Defect: `list` took each bundle's run lock for a moment (and wrote
    /// its own pid into bundle.lock), so a `run` starting then failed with
    /// "in use by process <list's pid>". Now it only tests the lock.
    #[test]
    fn list_tests_the_run_lock_without_taking_it() {
        let home = tempfile::tempdir().unwrap();
        let dir = home.path().join("s.vmapple");
        let b = Bundle::create(&dir, small()).unwrap();
        assert_eq!(list(home.path())[0].running, None);
        assert!(!dir.join(LOCK_FILE).exists(), "list created the lock file");
        // What a VM killed with SIGKILL leaves: its pid, no lock.
        fs::write(dir.join(LOCK_FILE), "4242\n").unwrap();
        let before = fs::metadata(dir.join(LOCK_FILE))
            .unwrap()
            .modified()
            .unwrap();
        assert_eq!(list(home.path())[0].running, None);
        assert_eq!(fs::read_to_string(dir.join(LOCK_FILE)).unwrap(), "4242\n");
        let after = fs::metadata(dir.join(LOCK_FILE))
            .unwrap()
            .modified()
            .unwrap();
        assert_eq!(before, after, "list wrote to bundle.lock");
        let held = b.lock().unwrap();
        assert_eq!(list(home.path())[0].running, Some(std::process::id()));
        drop(held);
    }

    /// Defect: `delete DIR` removed any directory holding a config.toml.
    #[test]
    fn delete_removes_only_real_bundles() {
        let home = tempfile::tempdir().unwrap();
        let real = home.path().join("real.vmapple");
        Bundle::create(&real, small()).unwrap();

        // A valid bundle's files in a directory not named *.vmapple.
        let plain = home.path().join("projects");
        fs::create_dir(&plain).unwrap();
        for f in [CONFIG_FILE, MACHINE_IDENTIFIER_FILE] {
            fs::copy(real.join(f), plain.join(f)).unwrap();
        }
        fs::write(plain.join("thesis.tex"), "x").unwrap();
        let e = delete(&plain).unwrap_err().to_string();
        assert!(e.contains("NAME.vmapple"), "{e}");
        assert!(plain.join("thesis.tex").exists());

        // A *.vmapple directory whose config.toml is not vmapple's.
        let fake = home.path().join("fake.vmapple");
        fs::create_dir(&fake).unwrap();
        fs::write(fake.join(CONFIG_FILE), "[package]\nname = \"x\"\n").unwrap();
        assert!(delete(&fake).is_err());
        assert!(fake.join(CONFIG_FILE).exists());

        // A config but no machine identity.
        let anon = home.path().join("anon.vmapple");
        fs::create_dir(&anon).unwrap();
        fs::write(anon.join(CONFIG_FILE), "cpus = 1\nmemory = \"1G\"\naux = { path = \"aux.img\" }\nroot = { path = \"root.img\" }\n").unwrap();
        let e = delete(&anon).unwrap_err().to_string();
        assert!(e.contains("ecid"), "{e}");
        assert!(anon.join(CONFIG_FILE).exists());

        // A link to a real bundle.
        let link = home.path().join("link.vmapple");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let e = delete(&link).unwrap_err().to_string();
        assert!(e.contains("symbolic link"), "{e}");
        assert!(real.join(CONFIG_FILE).exists());

        delete(&real).unwrap();
        assert!(!real.exists());
    }

    /// Defect: `delete` ignored disk locks, so a VM started with an
    /// explicit `--root` on the bundle's disk lost it while running.
    #[test]
    fn delete_refuses_while_a_disk_is_in_use() {
        let home = tempfile::tempdir().unwrap();
        let dir = home.path().join("d.vmapple");
        Bundle::create(&dir, small()).unwrap();
        let running = block::DiskImage::open(&dir.join(ROOT_IMAGE), false).unwrap();
        let e = delete(&dir).unwrap_err().to_string();
        assert!(e.contains("cannot delete bundle"), "{e}");
        assert!(e.contains("root.img"), "{e}");
        assert!(e.contains("is in use by"), "{e}");
        assert!(dir.join(ROOT_IMAGE).exists());
        drop(running);
        let reader = block::DiskImage::open(&dir.join(AUX_IMAGE), true).unwrap();
        assert!(delete(&dir).is_err(), "a reader holds the aux disk");
        drop(reader);
        delete(&dir).unwrap();
        assert!(!dir.exists());
    }

    /// Defect: bundles got umask permissions (guest disks world-readable).
    #[test]
    fn created_bundles_are_private_to_the_user() {
        let home = tempfile::tempdir().unwrap();
        let dir = home.path().join("new/home/p.vmapple");
        Bundle::create(&dir, small()).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&home.path().join("new/home")), 0o700);
        for f in [AUX_IMAGE, ROOT_IMAGE, CONFIG_FILE, MACHINE_IDENTIFIER_FILE] {
            assert_eq!(mode(&dir.join(f)), 0o600, "{f}");
        }
    }

    /// Defect: relative `file:`/`unix:` paths resolved against the
    /// directory vmapple was started from.
    #[test]
    fn relative_serial_and_network_paths_are_in_the_bundle() {
        let home = tempfile::tempdir().unwrap();
        let dir = home.path().join("r.vmapple");
        Bundle::create(&dir, small()).unwrap();
        let config = fs::read_to_string(dir.join(CONFIG_FILE)).unwrap();
        let edited = format!(
            "serial = \"file:console.log\"\nnetwork = \"unix:net/sock\"\n{}",
            config
                .lines()
                .filter(|l| !l.starts_with("network") && !l.starts_with("serial"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        fs::write(dir.join(CONFIG_FILE), edited).unwrap();
        let b = Bundle::open_in(home.path(), Path::new("r")).unwrap();
        assert_eq!(b.serial(), SerialBackend::File(dir.join("console.log")));
        assert_eq!(
            b.network(),
            Network::Nic(NetBackend::UnixStream(dir.join("net/sock")))
        );
        fs::write(
            dir.join(CONFIG_FILE),
            fs::read_to_string(dir.join(CONFIG_FILE))
                .unwrap()
                .replace("file:console.log", "unix:/tmp/abs.sock"),
        )
        .unwrap();
        let b = Bundle::open_in(home.path(), Path::new("r")).unwrap();
        assert_eq!(b.serial(), SerialBackend::Unix("/tmp/abs.sock".into()));
    }

    #[test]
    fn list_shows_broken_bundles_too() {
        let home = tempfile::tempdir().unwrap();
        Bundle::create(&home.path().join("b.vmapple"), small()).unwrap();
        Bundle::create(
            &home.path().join("a.vmapple"),
            CreateOptions { cpus: 8, ..small() },
        )
        .unwrap();
        let broken = home.path().join("c.vmapple");
        fs::create_dir(&broken).unwrap();
        fs::write(broken.join(CONFIG_FILE), "cpus = 1\nwat = 2\n").unwrap();
        fs::create_dir(home.path().join("not-a-bundle")).unwrap();

        let l = list(home.path());
        let names: Vec<_> = l.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"]);
        assert_eq!(l[0].cpus, Some(8));
        assert_eq!(l[1].memory, Some(4 << 30));
        assert!(l[2].error.as_deref().unwrap().contains("wat"));
        assert!(list(&home.path().join("missing")).is_empty());
    }
}
