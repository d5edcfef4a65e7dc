//! Copies of disk images that share blocks with the original where the
//! filesystem can (`FICLONE` on Linux, `clonefile(2)` on macOS), else
//! copied sparsely (holes stay holes, zero runs are not written). Used by
//! `vmapple clone` and by snapshots that capture their disks.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// How one file was cloned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyKind {
    /// The filesystem shares the blocks (copy-on-write).
    Reflink,
    /// Copied byte by byte, data segments only.
    Sparse,
}

/// Asks the filesystem to share `src`'s blocks with a new file `dst`.
#[cfg(target_os = "linux")]
fn reflink(src: &Path, dst: &Path) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let from = File::open(src)?;
    let to = OpenOptions::new().write(true).create_new(true).open(dst)?;
    // SAFETY: FICLONE takes the source descriptor as its argument; both
    // descriptors are open files we own; no memory is passed.
    let r = unsafe { libc::ioctl(to.as_raw_fd(), libc::FICLONE, from.as_raw_fd()) };
    if r != 0 {
        let e = io::Error::last_os_error();
        drop(to);
        let _ = fs::remove_file(dst);
        return Err(e);
    }
    Ok(())
}

#[cfg(target_os = "macos")]
fn reflink(src: &Path, dst: &Path) -> io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let s = CString::new(src.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let d = CString::new(dst.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: both are NUL-terminated strings that live across the call.
    if unsafe { libc::clonefile(s.as_ptr(), d.as_ptr(), 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(not(any(target_os = "linux", target_os = "macos")))]
fn reflink(_: &Path, _: &Path) -> io::Result<()> {
    Err(io::Error::from(io::ErrorKind::Unsupported))
}

/// The data segments of `f` (offset, length), found with SEEK_DATA /
/// SEEK_HOLE; the whole file if the system cannot tell.
fn data_segments(f: &File, len: u64) -> Vec<(u64, u64)> {
    use std::os::fd::AsRawFd;
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut pos: u64 = 0;
    while pos < len {
        let Ok(at) = libc::off_t::try_from(pos) else {
            break;
        };
        // SAFETY: lseek on a descriptor we own; no memory involved.
        let data = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            // ENXIO: no data after pos. Anything else: cannot tell.
            if e.raw_os_error() != Some(libc::ENXIO) {
                return vec![(0, len)];
            }
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return vec![(0, len)];
        }
        let (d, h) = (data as u64, (hole as u64).min(len));
        if h > d {
            out.push((d, h - d));
        }
        pos = h.max(d + 1);
    }
    out
}

/// Where a clone failed: reading the source or writing the copy.
#[derive(Debug, thiserror::Error)]
pub enum CloneError {
    #[error("{}", path.display())]
    Source {
        path: std::path::PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}", path.display())]
    Target {
        path: std::path::PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Copies `src` to a new file `dst` (never overwriting one): shared
/// blocks if possible, else the data segments only, so holes stay holes.
/// `progress(done, total)` is called after each MiB of a sparse copy. On
/// failure no `dst` is left behind.
pub fn clone_file(
    src: &Path,
    dst: &Path,
    mut progress: impl FnMut(u64, u64),
) -> Result<CopyKind, CloneError> {
    if reflink(src, dst).is_ok() {
        return Ok(CopyKind::Reflink);
    }
    let source = |e| CloneError::Source {
        path: src.to_path_buf(),
        source: e,
    };
    let target = |e| CloneError::Target {
        path: dst.to_path_buf(),
        source: e,
    };
    let from = File::open(src).map_err(source)?;
    let len = from.metadata().map_err(source)?.len();
    let to = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dst)
        .map_err(target)?;
    let mut copy = || -> Result<(), CloneError> {
        to.set_len(len).map_err(target)?;
        let mut buf = vec![0u8; 1 << 20];
        for (start, seg_len) in data_segments(&from, len) {
            let mut done = 0;
            while done < seg_len {
                let n = (seg_len - done).min(buf.len() as u64) as usize;
                from.read_exact_at(&mut buf[..n], start + done)
                    .map_err(source)?;
                if buf[..n].iter().any(|&b| b != 0) {
                    to.write_all_at(&buf[..n], start + done).map_err(target)?;
                }
                done += n as u64;
                progress(start + done, len);
            }
        }
        to.sync_all().map_err(target)
    };
    if let Err(e) = copy() {
        drop(to);
        let _ = fs::remove_file(dst);
        return Err(e);
    }
    Ok(CopyKind::Sparse)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn a_sparse_copy_keeps_content_and_holes() {
        let dir = std::env::temp_dir().join(format!("block-clone-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let src = dir.join("src");
        let f = File::create(&src).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(b"start", 0).unwrap();
        f.write_all_at(b"middle", 32 << 20).unwrap();
        f.write_all_at(b"end", (64 << 20) - 3).unwrap();
        drop(f);
        let dst = dir.join("dst");
        let mut last = (0, 0);
        clone_file(&src, &dst, |done, total| last = (done, total)).unwrap();
        assert!(fs::read(&src).unwrap() == fs::read(&dst).unwrap());
        assert!(fs::metadata(&dst).unwrap().blocks() * 512 <= 4 << 20);
        assert!(
            clone_file(&src, &dst, |_, _| {}).is_err(),
            "an existing file is not overwritten"
        );
        assert!(matches!(
            clone_file(&dir.join("missing"), &dir.join("other"), |_, _| {}),
            Err(CloneError::Source { .. })
        ));
        assert!(!dir.join("other").exists());
        fs::remove_dir_all(&dir).unwrap();
        // A reflink reports no progress; a sparse copy ends at the end.
        assert!(last == (0, 0) || last.0 <= last.1);
    }
}
