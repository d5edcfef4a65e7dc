//! What differs between Linux and macOS hosts under the FUSE server: how a
//! name is opened so it cannot lead out of its directory, and how the
//! guest's Linux numbers (errno, open flags, seek whence, rename flags)
//! map to the host's.
//!
//! Every open the server makes is of one name (never a path) relative to
//! a directory descriptor, with `O_NOFOLLOW`: the name cannot be `..` or
//! contain `/` (the server checks), and a symlink in its place is refused
//! rather than followed. On Linux `openat2` with `RESOLVE_BENEATH`,
//! `RESOLVE_NO_MAGICLINKS` and `RESOLVE_NO_SYMLINKS` makes the kernel
//! enforce the same, in case a check is ever missed.

use std::ffi::CStr;
use std::os::fd::{AsFd, OwnedFd};

use rustix::fs::{Mode, OFlags, RenameFlags};
use rustix::io::Errno;

/// Opens `name` in `dir` without following a symlink or leaving `dir`.
pub fn open_beneath(
    dir: impl AsFd,
    name: &CStr,
    flags: OFlags,
    mode: Mode,
) -> Result<OwnedFd, Errno> {
    let flags = flags | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    #[cfg(target_os = "linux")]
    {
        use rustix::fs::ResolveFlags;
        use std::sync::atomic::{AtomicBool, Ordering};
        // A kernel before 5.6 (or a seccomp filter) lacks openat2; once
        // seen, the plain descriptor-relative open is used.
        static NO_OPENAT2: AtomicBool = AtomicBool::new(false);
        if !NO_OPENAT2.load(Ordering::Relaxed) {
            let resolve =
                ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS | ResolveFlags::NO_SYMLINKS;
            match rustix::fs::openat2(dir.as_fd(), name, flags, mode, resolve) {
                Err(Errno::NOSYS) => NO_OPENAT2.store(true, Ordering::Relaxed),
                // A symlink refused by RESOLVE_NO_SYMLINKS: the same
                // answer O_NOFOLLOW gives.
                other => return other,
            }
        }
    }
    rustix::fs::openat(dir, name, flags, mode)
}

/// Makes a FIFO `name` in `dir`.
pub fn mkfifo_at(dir: impl AsFd, name: &CStr, mode: Mode) -> Result<(), Errno> {
    #[cfg(target_os = "linux")]
    {
        rustix::fs::mknodat(dir, name, rustix::fs::FileType::Fifo, mode, 0)
    }
    #[cfg(not(target_os = "linux"))]
    {
        use std::os::fd::AsRawFd;
        // rustix has no mkfifoat for Apple targets.
        // SAFETY: the descriptor is borrowed for the call and `name` is a
        // NUL-terminated string that outlives it.
        let r = unsafe {
            libc::mkfifoat(
                dir.as_fd().as_raw_fd(),
                name.as_ptr(),
                mode.bits() as libc::mode_t,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(Errno::from_io_error(&std::io::Error::last_os_error()).unwrap_or(Errno::IO))
        }
    }
}

/// Linux's number for a host errno, for the reply's `error` field.
pub fn linux_errno(e: Errno) -> i32 {
    #[cfg(target_os = "linux")]
    {
        e.raw_os_error()
    }
    #[cfg(not(target_os = "linux"))]
    {
        // The BSD numbers above 34 differ from Linux's.
        let table: &[(Errno, i32)] = &[
            (Errno::AGAIN, 11),
            (Errno::NAMETOOLONG, 36),
            (Errno::NOLCK, 37),
            (Errno::NOSYS, 38),
            (Errno::NOTEMPTY, 39),
            (Errno::LOOP, 40),
            (Errno::NOATTR, 61),
            (Errno::NOTSUP, 95),
            (Errno::OPNOTSUPP, 95),
            (Errno::DQUOT, 122),
            (Errno::STALE, 116),
            (Errno::OVERFLOW, 75),
            (Errno::ILSEQ, 84),
            (Errno::TIMEDOUT, 110),
            (Errno::CANCELED, 125),
        ];
        let raw = e.raw_os_error();
        if raw <= 34 {
            return raw;
        }
        table
            .iter()
            .find(|(h, _)| *h == e)
            .map_or(5, |&(_, linux)| linux)
    }
}

/// Linux open-flag values the guest sends.
pub mod linux_open {
    pub const ACCMODE: u32 = 0o3;
    pub const WRONLY: u32 = 0o1;
    pub const RDWR: u32 = 0o2;
    pub const TRUNC: u32 = 0o1000;
    pub const APPEND: u32 = 0o2000;
    pub const DSYNC: u32 = 0o10000;
    /// `O_SYNC` includes `O_DSYNC`'s bit.
    pub const SYNC: u32 = 0o4010000;
}

/// The host flags for the guest's open flags: access mode, append,
/// truncate and the sync modes; anything else (creation, `O_DIRECT`,
/// `O_NOATIME`, ...) is the server's business or dropped.
pub fn open_flags(linux: u32) -> OFlags {
    use linux_open::*;
    let mut f = match linux & ACCMODE {
        WRONLY => OFlags::WRONLY,
        RDWR => OFlags::RDWR,
        _ => OFlags::RDONLY,
    };
    if linux & TRUNC != 0 {
        f |= OFlags::TRUNC;
    }
    if linux & APPEND != 0 {
        f |= OFlags::APPEND;
    }
    if linux & SYNC == SYNC {
        f |= OFlags::SYNC;
    } else if linux & DSYNC != 0 {
        f |= OFlags::DSYNC;
    }
    f
}

/// Whether the guest's open flags ask to change the file.
pub fn open_writes(linux: u32) -> bool {
    use linux_open::*;
    linux & ACCMODE != 0 || linux & TRUNC != 0
}

/// The host rename flags for RENAME2's Linux ones (NOREPLACE 1,
/// EXCHANGE 2); `None` for anything else (WHITEOUT is for overlay file
/// systems, not for a guest).
pub fn rename_flags(linux: u32) -> Option<RenameFlags> {
    match linux {
        0 => Some(RenameFlags::empty()),
        1 => Some(RenameFlags::NOREPLACE),
        2 => Some(RenameFlags::EXCHANGE),
        _ => None,
    }
}

/// LSEEK's Linux whence values with their offset.
pub fn seek_from(whence: u32, offset: u64) -> Option<rustix::fs::SeekFrom> {
    use rustix::fs::SeekFrom;
    Some(match whence {
        0 => SeekFrom::Start(offset),
        1 => SeekFrom::Current(offset as i64),
        2 => SeekFrom::End(offset as i64),
        3 => SeekFrom::Data(offset),
        4 => SeekFrom::Hole(offset),
        _ => return None,
    })
}

/// FALLOCATE's Linux mode bits this host carries out (KEEP_SIZE 1 and
/// PUNCH_HOLE 2 on Linux; only plain allocation elsewhere).
pub fn fallocate_flags(linux: u32) -> Option<rustix::fs::FallocateFlags> {
    use rustix::fs::FallocateFlags;
    match linux {
        0 => Some(FallocateFlags::empty()),
        #[cfg(target_os = "linux")]
        1 => Some(FallocateFlags::KEEP_SIZE),
        #[cfg(target_os = "linux")]
        3 => Some(FallocateFlags::KEEP_SIZE | FallocateFlags::PUNCH_HOLE),
        _ => None,
    }
}

/// Raises the soft limit on open descriptors towards the hard one (at
/// most `want`): every directory the guest has looked up holds one.
pub fn raise_fd_limit(want: u64) {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut lim = getrlimit(Resource::Nofile);
    let hard = lim.maximum.unwrap_or(want);
    let target = want.min(hard);
    if lim.current.is_some_and(|cur| cur < target) {
        lim.current = Some(target);
        if let Err(e) = setrlimit(Resource::Nofile, lim) {
            tracing::debug!("virtio-fs: cannot raise the descriptor limit: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_flags_translate_access_and_modes() {
        assert_eq!(open_flags(0), OFlags::RDONLY);
        assert!(open_flags(linux_open::RDWR | linux_open::APPEND)
            .contains(OFlags::RDWR | OFlags::APPEND));
        assert!(open_writes(linux_open::TRUNC));
        assert!(!open_writes(0o100000));
    }

    #[test]
    fn symlinks_are_not_followed() {
        let dir = std::env::temp_dir().join(format!("vmapple-host-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let _ = std::fs::remove_file(dir.join("l"));
        std::os::unix::fs::symlink("/etc/hostname", dir.join("l")).unwrap();
        let d = rustix::fs::open(&dir, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()).unwrap();
        let e = open_beneath(&d, c"l", OFlags::RDONLY, Mode::empty()).unwrap_err();
        assert!(e == Errno::LOOP || e == Errno::XDEV, "{e:?}");
        assert!(
            open_beneath(&d, c"..", OFlags::RDONLY, Mode::empty()).is_err()
                || !cfg!(target_os = "linux")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
