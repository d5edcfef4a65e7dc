//! Image locks: who else may use an image while a VM has it open.
//!
//! Two kinds, both advisory and both released by the kernel when the
//! descriptor closes (so a killed VMM leaves none behind):
//!
//! - `flock(2)`, exclusive for a writer and shared for a reader: what
//!   vmapple has always taken, and all it takes on hosts without
//!   open-file-description locks (macOS).
//! - On Linux, the open-file-description byte-range locks QEMU's `raw`
//!   and `file` drivers take (QEMU `block/file-posix.c`), so QEMU, UTM's
//!   QEMU backend and `qemu-img` see vmapple's use of an image and vmapple
//!   sees theirs. QEMU describes a user of an image by two sets of its
//!   block permissions: what the user does (a read lock on byte
//!   `100 + bit`) and what it does not let others do (a read lock on byte
//!   `200 + bit`). Before using an image, each side tests for conflicting
//!   locks: on `200 + bit` for each permission it wants, on `100 + bit` for
//!   each it does not share. Every lock is a read lock, so users that agree
//!   coexist; the test (`F_OFD_GETLK` for a write lock) finds any holder.

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// Who holds a lock that stopped us, when the OS tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    /// The program's name (its `argv[0]` without directories).
    pub program: String,
}

/// A lock that another user of the image holds against us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conflict {
    /// vmapple's own `flock(2)` (or any other flock user's).
    Flock,
    /// QEMU's lock byte for a permission we want and the holder does not
    /// share (QEMU's message: `Failed to get "<perm>" lock`).
    Unshared(Perm),
    /// QEMU's lock byte for a permission the holder uses and we do not
    /// share (QEMU's message: `Failed to get shared "<perm>" lock`).
    InUse(Perm),
}

impl std::fmt::Display for Conflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Conflict::Flock => write!(f, "it holds a flock(2) lock on the image"),
            Conflict::Unshared(p) => write!(
                f,
                "it does not share the \"{}\" permission (QEMU lock byte {})",
                p.name(),
                SHARED_BYTES + p.bit()
            ),
            Conflict::InUse(p) => write!(
                f,
                "it holds the \"{}\" permission (QEMU lock byte {})",
                p.name(),
                PERM_BYTES + p.bit()
            ),
        }
    }
}

/// The QEMU block permissions vmapple takes part in (QEMU's
/// `BLK_PERM_*`, by bit number).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Perm {
    ConsistentRead,
    Write,
    Resize,
}

impl Perm {
    fn bit(self) -> i64 {
        match self {
            Perm::ConsistentRead => 0,
            Perm::Write => 1,
            Perm::Resize => 3,
        }
    }

    /// QEMU's name of the permission, as in its error messages.
    pub fn name(self) -> &'static str {
        match self {
            Perm::ConsistentRead => "consistent read",
            Perm::Write => "write",
            Perm::Resize => "resize",
        }
    }
}

/// First lock byte of the permissions a user has.
const PERM_BYTES: i64 = 100;
/// First lock byte of the permissions a user does not share.
const SHARED_BYTES: i64 = 200;

/// What a user of an image does and what it refuses others, as a QEMU
/// guest disk does: a writer reads and writes and lets others neither
/// write nor resize; a reader reads and lets others neither write nor
/// resize (vmapple's read-only disks have always excluded writers).
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
fn plan(write: bool) -> (&'static [Perm], &'static [Perm]) {
    let unshared: &[Perm] = &[Perm::Write, Perm::Resize];
    if write {
        (&[Perm::ConsistentRead, Perm::Write], unshared)
    } else {
        (&[Perm::ConsistentRead], unshared)
    }
}

/// Why an image could not be locked.
#[derive(Debug)]
pub(crate) enum LockFailure {
    Conflict(Conflict),
    Io(io::Error),
}

/// Locks `file` (opened from `path`) for reading or for writing: flock,
/// then on Linux QEMU's byte locks. A descriptor opened read-only can take
/// a writer's locks: all of them are flocks or read locks.
pub(crate) fn lock(file: &File, write: bool) -> Result<(), LockFailure> {
    let op = if write { libc::LOCK_EX } else { libc::LOCK_SH };
    // SAFETY: flock on a descriptor we own; no memory is involved.
    if unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } != 0 {
        let err = io::Error::last_os_error();
        return Err(if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            LockFailure::Conflict(Conflict::Flock)
        } else {
            LockFailure::Io(err)
        });
    }
    #[cfg(target_os = "linux")]
    qemu_locks(file, write)?;
    Ok(())
}

/// Takes QEMU's lock bytes for this use, then tests for anyone whose use
/// conflicts with it (QEMU takes first and tests after too: two users that
/// race both see each other).
#[cfg(target_os = "linux")]
fn qemu_locks(file: &File, write: bool) -> Result<(), LockFailure> {
    let (perms, unshared) = plan(write);
    let bytes = perms
        .iter()
        .map(|p| PERM_BYTES + p.bit())
        .chain(unshared.iter().map(|p| SHARED_BYTES + p.bit()));
    for byte in bytes {
        match ofd(file, libc::F_OFD_SETLK, libc::F_RDLCK, byte) {
            Ok(_) => {}
            // Only a write lock blocks a read lock; QEMU takes none, but
            // whoever does, holds the image.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)) => {
                return Err(LockFailure::Conflict(Conflict::InUse(Perm::Write)))
            }
            // A file system without byte-range locks (QEMU refuses these
            // unless told `locking=off`): the flock still guards vmapple
            // against itself.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ENOLCK | libc::EINVAL | libc::EOPNOTSUPP | libc::ENOSYS)
                ) =>
            {
                tracing::warn!("no QEMU-compatible image lock (byte-range locks: {e}); QEMU will not see this VM's use of the image");
                return Ok(());
            }
            Err(e) => return Err(LockFailure::Io(e)),
        }
    }
    for perm in perms {
        if ofd(
            file,
            libc::F_OFD_GETLK,
            libc::F_WRLCK,
            SHARED_BYTES + perm.bit(),
        )
        .map_err(LockFailure::Io)?
        {
            return Err(LockFailure::Conflict(Conflict::Unshared(*perm)));
        }
    }
    for perm in unshared {
        if ofd(
            file,
            libc::F_OFD_GETLK,
            libc::F_WRLCK,
            PERM_BYTES + perm.bit(),
        )
        .map_err(LockFailure::Io)?
        {
            return Err(LockFailure::Conflict(Conflict::InUse(*perm)));
        }
    }
    Ok(())
}

/// One open-file-description lock command on one byte. For `F_OFD_GETLK`,
/// true if someone else holds a conflicting lock there.
#[cfg(target_os = "linux")]
fn ofd(file: &File, cmd: libc::c_int, kind: libc::c_int, byte: i64) -> io::Result<bool> {
    // SAFETY: all-zero is a valid `flock` (l_pid must be 0 for OFD locks).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte;
    fl.l_len = 1;
    // SAFETY: fcntl with a lock command on a descriptor we own and a
    // pointer to a live, initialised `flock` the call may write.
    if unsafe { libc::fcntl(file.as_raw_fd(), cmd, &mut fl) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cmd == libc::F_OFD_GETLK && fl.l_type != libc::F_UNLCK as libc::c_short)
}

/// The process that holds a lock on `file` (some other descriptor of the
/// same file with a lock of the `conflict` kind), if the OS tells.
/// `F_OFD_GETLK` reports no pid for open-file-description locks (it says
/// -1), so on Linux the holder is found in `/proc/PID/fdinfo`, which lists
/// each descriptor's locks; processes of other users stay unreadable.
#[cfg(target_os = "linux")]
pub(crate) fn holder(file: &File, conflict: Conflict) -> Option<Holder> {
    let ours = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())).ok()?;
    let me = std::process::id();
    let byte = match conflict {
        Conflict::Flock => None,
        Conflict::Unshared(p) => Some(SHARED_BYTES + p.bit()),
        Conflict::InUse(p) => Some(PERM_BYTES + p.bit()),
    };
    for proc_entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = proc_entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(proc_entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if pid == me && fd.file_name().to_str() == Some(&file.as_raw_fd().to_string()) {
                continue;
            }
            // Comparing link texts never touches the file system the
            // image is on (a stat could hang on a dead network mount).
            if std::fs::read_link(fd.path()).ok().as_deref() != Some(ours.as_path()) {
                continue;
            }
            let info = proc_entry.path().join("fdinfo").join(fd.file_name());
            let Ok(info) = std::fs::read_to_string(info) else {
                continue;
            };
            if holds_lock(&info, byte) {
                return Some(Holder {
                    pid,
                    program: program_name(&proc_entry.path()),
                });
            }
        }
    }
    None
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn holder(_file: &File, _conflict: Conflict) -> Option<Holder> {
    None
}

/// Whether a `/proc/PID/fdinfo/FD` text lists a lock of the kind that
/// conflicts: a flock (`byte` None), else a byte-range lock covering
/// `byte`. Lines look like `lock:\t1: OFDLCK ADVISORY READ -1 fd:01:42 100 100`.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
fn holds_lock(fdinfo: &str, byte: Option<i64>) -> bool {
    fdinfo
        .lines()
        .filter_map(|l| l.strip_prefix("lock:"))
        .any(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            match byte {
                None => fields.contains(&"FLOCK"),
                Some(b) => {
                    let [.., start, end] = fields[..] else {
                        return false;
                    };
                    let start = start.parse::<i64>();
                    let end = if end == "EOF" {
                        Ok(i64::MAX)
                    } else {
                        end.parse::<i64>()
                    };
                    !fields.contains(&"FLOCK")
                        && matches!((start, end), (Ok(s), Ok(e)) if s <= b && b <= e)
                }
            }
        })
}

#[cfg(target_os = "linux")]
fn program_name(proc_dir: &Path) -> String {
    let cmdline = std::fs::read(proc_dir.join("cmdline")).unwrap_or_default();
    let argv0 = cmdline.split(|&b| b == 0).next().unwrap_or_default();
    use std::os::unix::ffi::OsStrExt;
    let name = Path::new(std::ffi::OsStr::from_bytes(argv0))
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| !n.is_empty());
    name.unwrap_or_else(|| {
        std::fs::read_to_string(proc_dir.join("comm"))
            .map(|c| c.trim().to_string())
            .unwrap_or_else(|_| "?".into())
    })
}

/// Holds an image as a writer would, without opening it for writing:
/// while a bundle is deleted, no VM (vmapple or QEMU) can start on its
/// disks, and a VM that has one open makes the deletion fail.
#[derive(Debug)]
pub struct ImageLock {
    _file: File,
}

impl ImageLock {
    /// `Ok(None)` if there is no file at `path`.
    pub fn exclusive(path: &Path) -> Result<Option<ImageLock>, crate::OpenError> {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(crate::OpenError::Open {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        lock(&file, true).map_err(|f| crate::raw::lock_error(&file, path, f))?;
        Ok(Some(ImageLock { _file: file }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fdinfo_lock_lines_are_matched_by_kind_and_byte() {
        let ofd = "pos:\t0\nflags:\t02\nlock:\t1: OFDLCK ADVISORY  READ -1 fd:01:42 101 101\n";
        assert!(holds_lock(ofd, Some(101)));
        assert!(!holds_lock(ofd, Some(100)));
        assert!(!holds_lock(ofd, None), "not a flock");
        let flock = "lock:\t1: FLOCK  ADVISORY  WRITE 77 fd:01:42 0 EOF\n";
        assert!(holds_lock(flock, None));
        assert!(!holds_lock(flock, Some(101)), "a flock is not a byte lock");
        let posix = "lock:\t1: POSIX  ADVISORY  READ 77 fd:01:42 200 EOF\n";
        assert!(holds_lock(posix, Some(201)));
        assert!(!holds_lock("lock:\tgarbage\n", Some(1)));
        assert!(!holds_lock("", None));
    }
}
