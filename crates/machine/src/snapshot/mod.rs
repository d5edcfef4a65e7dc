//! Snapshots of a running machine (design.md "Machine state"): the vCPUs,
//! every device in the registry, the guest counter and guest memory, in
//! one file ([`mod@format`]). Saving happens between two runs of the
//! accelerator, with every vCPU back at an instruction boundary; a device
//! without state of its own makes the save refuse, naming it, so none can
//! be forgotten.

pub mod disks;
pub mod format;
pub mod ram;

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub use format::{Header, RamRegion, SavedMachine, Section};

/// Why a snapshot could not be written or read. Each is one message for
/// the user; the path is added by whoever knows it.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("not a vmapple snapshot")]
    NotASnapshot,
    #[error("snapshot format version {0}; this vmapple reads version {ours}", ours = format::FORMAT_VERSION)]
    FormatVersion(u32),
    #[error("made by vmapple {0}; this is vmapple {ours}, and a snapshot is restored by the vmapple that saved it", ours = format::VMAPPLE_VERSION)]
    VmappleVersion(String),
    #[error("truncated: {len} bytes, the snapshot needs {need}")]
    Truncated { len: u64, need: u64 },
    #[error("corrupted: {0}")]
    Corrupt(String),
    #[error("cannot encode the snapshot: {0}")]
    Encode(String),
    #[error("this VM cannot be saved: {0}")]
    Unsupported(String),
    #[error("the snapshot does not fit this machine: {}", .0.join("; "))]
    Mismatch(Vec<String>),
    #[error("device {id}: {message}")]
    Device { id: String, message: String },
    #[error("vCPU state")]
    Accel(#[source] accel::AccelError),
    #[error("{}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the VM stopped before it could be saved")]
    Stopped,
    #[error("a save is already in progress")]
    Busy,
    // Disks (issue 13 point 4).
    #[error("{disk} changed since the snapshot was saved ({what}): the saved guest expects what it held then and would corrupt it; put the disk back as it was, use a snapshot saved with --with-disks, or give --force to restore anyway")]
    DiskChanged { disk: String, what: String },
    #[error("{disk} is in use by another VM: VMs restored from one snapshot cannot share a writable disk; give it read-only (`PATH,readonly`), or save the snapshot with --with-disks and give each VM a disk file of its own, which the restore fills from the snapshot's copy")]
    DiskInUse {
        disk: String,
        #[source]
        source: block::OpenError,
    },
    #[error("cannot open {disk}")]
    DiskOpen {
        disk: String,
        #[source]
        source: block::OpenError,
    },
    #[error("cannot copy {disk}")]
    DiskCopy {
        disk: String,
        #[source]
        source: block::clone::CloneError,
    },
}

/// What a finished save wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SaveReport {
    pub path: PathBuf,
    /// Size of the file's data (holes excluded).
    pub stored_bytes: u64,
    pub ram_bytes: u64,
    pub elapsed: Duration,
}

/// A save asked for from another thread (the control socket).
pub struct SaveRequest {
    pub path: PathBuf,
    /// Stop the VM once saved (`vmapple ctl VM save --stop`, suspend).
    pub stop: bool,
    /// Also copy the disks beside the snapshot (`--with-disks`).
    pub with_disks: bool,
    pub reply: Sender<Result<SaveReport, SnapshotError>>,
}

/// Where save requests wait for the machine's run loop, and why saving is
/// impossible when it is (known once the VM runs).
#[derive(Default)]
pub struct SaveSlot {
    pub(crate) request: Mutex<Option<SaveRequest>>,
    /// `Some(reason)` while saving cannot work; `None` before the VM runs
    /// means "not running".
    pub(crate) refusal: Mutex<Option<Option<String>>>,
}

/// Everything but memory, gathered with the VM stopped.
pub struct Captured {
    pub accelerator: String,
    pub machine: SavedMachine,
    pub counter: u64,
    pub powers: Vec<accel::CpuPower>,
    pub cpus: Vec<u8>,
    pub devices: Vec<(String, Vec<u8>)>,
    /// The disks' identities, and whether to copy them.
    pub disks: Vec<disks::SavedDisk>,
    pub with_disks: bool,
}

/// Writes a snapshot of `captured` and `memory` to `path` atomically: a
/// temporary file beside it, synced, then renamed over it. On failure no
/// file is left under either name.
pub fn write(
    path: &Path,
    captured: Captured,
    memory: &vm_core::GuestRam,
) -> Result<SaveReport, SnapshotError> {
    let started = Instant::now();
    let io = |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    };
    let name = path
        .file_name()
        .ok_or_else(|| io(std::io::Error::other("not a file name")))?;
    let temp = path.with_file_name(format!(
        ".{}.partial-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = write_to(&temp, path, captured, memory, started);
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
}

fn write_to(
    temp: &Path,
    path: &Path,
    captured: Captured,
    memory: &vm_core::GuestRam,
    started: Instant,
) -> Result<SaveReport, SnapshotError> {
    let io = |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut captured = captured;
    let copies = if captured.with_disks {
        Some(disks::Copies::take(path, &mut captured.disks)?)
    } else {
        None
    };
    // SAFETY: the machine calls this only with every vCPU parked and the
    // devices quiesced: nothing writes guest memory meanwhile.
    let regions = unsafe { ram::regions(memory) };
    let mut header = Header {
        vmapple_version: format::VMAPPLE_VERSION.into(),
        accelerator: captured.accelerator,
        machine: captured.machine,
        counter: captured.counter,
        powers: captured.powers,
        cpus: Section::new("cpus", captured.cpus),
        devices: captured
            .devices
            .into_iter()
            .map(|(id, bytes)| Section::new(id, bytes))
            .collect(),
        ram: regions
            .iter()
            .map(|(base, bytes)| RamRegion {
                base: *base,
                size: bytes.len() as u64,
                offset: 0,
            })
            .collect(),
        file_len: 0,
        disks: captured.disks,
    };
    // Offsets are placed after a first encoding; CBOR integers grow by at
    // most 8 bytes each, which the slack covers.
    let first = header.encode()?.len() as u64;
    let slack = 16 * (header.ram.len() as u64 + 2);
    let mut offset = align(first + slack);
    for r in &mut header.ram {
        r.offset = offset;
        offset = align(offset + r.size);
    }
    header.file_len = offset;
    let head = header.encode()?;
    if head.len() as u64 > header.ram.first().map_or(offset, |r| r.offset) {
        return Err(SnapshotError::Encode("header outgrew its space".into()));
    }

    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(temp)
        .map_err(io)?;
    file.write_all(&head).map_err(io)?;
    file.set_len(header.file_len).map_err(io)?;
    let ram_bytes: u64 = header.ram.iter().map(|r| r.size).sum();
    let show = ram_bytes >= 1 << 30;
    let mut done_before = 0u64;
    let mut stored = head.len() as u64;
    for (r, (_, bytes)) in header.ram.iter().zip(&regions) {
        let stats = ram::write_sparse(&file, r.offset, bytes, |done| {
            if show {
                eprint!(
                    "\rvmapple: saving memory: {} of {} MiB",
                    (done_before + done) >> 20,
                    ram_bytes >> 20
                );
            }
        })
        .map_err(io)?;
        done_before += r.size;
        stored += stats.stored_pages * ram::PAGE as u64;
    }
    if show {
        eprintln!();
    }
    file.sync_all().map_err(io)?;
    drop(file);
    if let Some(copies) = copies {
        copies.commit()?;
    }
    std::fs::rename(temp, path).map_err(io)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        // The rename itself must survive a crash.
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(SaveReport {
        path: path.to_path_buf(),
        stored_bytes: stored,
        ram_bytes,
        elapsed: started.elapsed(),
    })
}

fn align(v: u64) -> u64 {
    v.div_ceil(format::RAM_ALIGN) * format::RAM_ALIGN
}

/// An opened, checked snapshot: its header and the file memory maps from.
pub struct Snapshot {
    pub path: PathBuf,
    pub header: Header,
    pub file: File,
    /// Restore onto disks that changed since the save (`--force`).
    pub force: bool,
}

impl Snapshot {
    /// Opens and checks `path` (see [`Header::decode`]); nothing is
    /// written, here or later: memory is mapped privately.
    pub fn open(path: &Path) -> Result<Snapshot, SnapshotError> {
        let io = |source| SnapshotError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let header = Header::decode(std::io::BufReader::new(&file), len)?;
        Ok(Snapshot {
            path: path.to_path_buf(),
            header,
            file,
            force: false,
        })
    }

    /// The device sections as `(id, bytes)`.
    pub fn device_sections(&self) -> Vec<(String, Vec<u8>)> {
        self.header
            .devices
            .iter()
            .map(|s| (s.id.clone(), s.bytes.clone()))
            .collect()
    }
}
