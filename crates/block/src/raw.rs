//! Raw disk images: the file is the disk, byte for byte. Holes in a sparse
//! file read as zeros; discard punches holes again.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
#[cfg(target_os = "linux")]
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::lock::{self, Conflict, Holder, LockFailure};
use crate::{check_range, BlockBackend};

/// Why an image could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot open disk image '{}': {source}", path.display())]
    Open { path: PathBuf, source: io::Error },
    /// Another user holds a lock that conflicts with ours (see lock.rs).
    #[error("disk image '{}' is in use by {}: {conflict}", path.display(), named(holder))]
    Locked {
        path: PathBuf,
        conflict: Conflict,
        holder: Option<Holder>,
    },
    #[error("disk image '{}' is not a regular file", path.display())]
    NotAFile { path: PathBuf },
}

fn named(holder: &Option<Holder>) -> String {
    match holder {
        Some(h) if h.pid == std::process::id() => {
            "this process (is the image given twice?)".into()
        }
        Some(h) => format!("another process, pid {} ({})", h.pid, h.program),
        None if cfg!(target_os = "linux") => {
            "another process (the OS does not say which: an open-file-description lock has no owning pid, and /proc shows no readable holder)".into()
        }
        None => "another process".into(),
    }
}

/// The error for a failed lock of `file`, naming the holder if it can.
pub(crate) fn lock_error(file: &File, path: &Path, failure: LockFailure) -> OpenError {
    match failure {
        LockFailure::Conflict(conflict) => OpenError::Locked {
            path: path.to_path_buf(),
            conflict,
            holder: lock::holder(file, conflict),
        },
        LockFailure::Io(source) => OpenError::Open {
            path: path.to_path_buf(),
            source,
        },
    }
}

/// A raw image file opened for one VM.
#[derive(Debug)]
pub struct DiskImage {
    file: File,
    size: u64,
    read_only: bool,
    path: PathBuf,
}

impl DiskImage {
    /// Opens `path`, read-only or read-write, and locks it (lock.rs):
    /// exclusively for writing, shared for reading.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, OpenError> {
        let open_error = |source| OpenError::Open {
            path: path.to_path_buf(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(open_error)?;
        let meta = file.metadata().map_err(open_error)?;
        if !meta.is_file() {
            return Err(OpenError::NotAFile {
                path: path.to_path_buf(),
            });
        }
        lock::lock(&file, !read_only).map_err(|f| lock_error(&file, path, f))?;
        Ok(Self {
            size: meta.len(),
            file,
            read_only,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn writable(&self) -> io::Result<()> {
        if self.read_only {
            Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "the disk image is read-only",
            ))
        } else {
            Ok(())
        }
    }

    #[cfg(target_os = "linux")]
    fn fallocate(&self, mode: i32, offset: u64, len: u64) -> io::Result<()> {
        // SAFETY: fallocate on a descriptor we own, with a range checked
        // against the image size.
        let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, offset as i64, len as i64) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        #[cfg(target_os = "linux")]
        return self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        );
        // Other hosts fall back to writing zeros (macOS's F_PUNCHHOLE
        // would do, but is untested).
        #[cfg(not(target_os = "linux"))]
        {
            let _ = (offset, len);
            Err(io::Error::from(io::ErrorKind::Unsupported))
        }
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        #[cfg(target_os = "linux")]
        return self.fallocate(libc::FALLOC_FL_ZERO_RANGE, offset, len);
        #[cfg(not(target_os = "linux"))]
        {
            let _ = (offset, len);
            Err(io::Error::from(io::ErrorKind::Unsupported))
        }
    }
}

impl BlockBackend for DiskImage {
    fn len(&self) -> u64 {
        self.size
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_range(self.size, offset, buf.len() as u64)?;
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.writable()?;
        check_range(self.size, offset, buf.len() as u64)?;
        self.file.write_all_at(buf, offset)
    }

    fn flush(&self) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.writable()?;
        check_range(self.size, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.punch_hole(offset, len)
            .or_else(|_| self.write_zeroes(offset, len))
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.writable()?;
        check_range(self.size, offset, len)?;
        if len == 0 || self.zero_range(offset, len).is_ok() {
            return Ok(());
        }
        // The file system cannot zero a range: write zeros, a chunk at a
        // time so a huge request costs no huge buffer.
        let chunk = vec![0u8; 1 << 20];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(chunk.len() as u64);
            self.file
                .write_all_at(&chunk[..n as usize], offset + done)?;
            done += n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(name: &str, size: usize) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vmapple-block-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, vec![0xabu8; size]).unwrap();
        path
    }

    #[test]
    fn read_write_bounds() {
        let path = image("rw.img", 4096);
        let disk = DiskImage::open(&path, false).unwrap();
        disk.write_at(&[1, 2, 3], 4093).unwrap();
        assert!(disk.write_at(&[1, 2, 3, 4], 4093).is_err(), "past the end");
        let mut buf = [0u8; 3];
        disk.read_at(&mut buf, 4093).unwrap();
        assert_eq!(buf, [1, 2, 3]);
        disk.write_zeroes(0, 512).unwrap();
        disk.discard(512, 512).unwrap();
        disk.flush().unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 4096, "size kept");
        assert!(bytes[..1024].iter().all(|&b| b == 0));
        assert_eq!(bytes[1024], 0xab);
    }

    #[test]
    fn locking() {
        let path = image("locked.img", 512);
        let first = DiskImage::open(&path, false).unwrap();
        assert!(matches!(
            DiskImage::open(&path, false),
            Err(OpenError::Locked { .. })
        ));
        assert!(matches!(
            DiskImage::open(&path, true),
            Err(OpenError::Locked { .. })
        ));
        drop(first);
        let a = DiskImage::open(&path, true).unwrap();
        let b = DiskImage::open(&path, true).unwrap();
        assert!(b.write_at(&[0], 0).is_err(), "read-only");
        drop((a, b));
    }

    /// Takes, on a descriptor of its own, the lock bytes a QEMU guest disk
    /// opened read-write holds (file-posix.c: 100+perm for what it uses,
    /// 200+perm for what it does not share), as QEMU does: read locks only.
    #[cfg(target_os = "linux")]
    fn hold_like_qemu(path: &Path, bytes: &[i64]) -> File {
        let f = File::open(path).unwrap();
        for &byte in bytes {
            // SAFETY: all-zero is a valid flock; fcntl on our descriptor.
            let mut fl: libc::flock = unsafe { std::mem::zeroed() };
            fl.l_type = libc::F_RDLCK as libc::c_short;
            fl.l_whence = libc::SEEK_SET as libc::c_short;
            fl.l_start = byte;
            fl.l_len = 1;
            // SAFETY: as above; `fl` outlives the call.
            assert_eq!(
                unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_SETLK, &mut fl) },
                0
            );
        }
        f
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_qemu_writer_keeps_us_out_and_is_named() {
        let path = image("qemu-held.img", 512);
        // QEMU's guest disk: consistent read + write used, write + resize
        // not shared.
        let qemu = hold_like_qemu(&path, &[100, 101, 201, 203]);
        let err = DiskImage::open(&path, false).unwrap_err();
        let OpenError::Locked {
            conflict, holder, ..
        } = &err
        else {
            panic!("{err}");
        };
        assert_eq!(*conflict, Conflict::Unshared(crate::Perm::Write));
        let holder = holder.as_ref().expect("the holder is found in /proc");
        assert_eq!(holder.pid, std::process::id());
        let text = err.to_string();
        assert!(text.contains("in use by this process"), "{text}");
        assert!(text.contains("\"write\""), "{text}");
        // A reader is refused too: QEMU writes.
        assert!(matches!(
            DiskImage::open(&path, true),
            Err(OpenError::Locked {
                conflict: Conflict::InUse(crate::Perm::Write),
                ..
            })
        ));
        drop(qemu);
        // A QEMU reader (qemu-img info: reads, shares no write) lets a
        // vmapple reader in but not a writer.
        let reader = hold_like_qemu(&path, &[100, 201, 203]);
        DiskImage::open(&path, true).unwrap();
        assert!(matches!(
            DiskImage::open(&path, false),
            Err(OpenError::Locked {
                conflict: Conflict::Unshared(crate::Perm::Write),
                ..
            })
        ));
        drop(reader);
        DiskImage::open(&path, false).unwrap();
    }

    /// What QEMU tests before it opens an image read-write (does anyone
    /// refuse "write"?) and read-only (does anyone hold "write"?), asked
    /// of an image vmapple has open.
    #[cfg(target_os = "linux")]
    #[test]
    fn our_locks_are_the_bytes_qemu_tests() {
        let path = image("ours.img", 512);
        let probe = File::open(&path).unwrap();
        let held = |byte: i64| {
            // SAFETY: all-zero is a valid flock; fcntl on our descriptor.
            let mut fl: libc::flock = unsafe { std::mem::zeroed() };
            fl.l_type = libc::F_WRLCK as libc::c_short;
            fl.l_whence = libc::SEEK_SET as libc::c_short;
            fl.l_start = byte;
            fl.l_len = 1;
            // SAFETY: as above; `fl` outlives the call.
            assert_eq!(
                unsafe { libc::fcntl(probe.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) },
                0
            );
            fl.l_type != libc::F_UNLCK as libc::c_short
        };
        let disk = DiskImage::open(&path, false).unwrap();
        let bytes: Vec<i64> = (100..=104).chain(200..=204).filter(|&b| held(b)).collect();
        assert_eq!(bytes, [100, 101, 201, 203]);
        drop(disk);
        assert!((100..=204).all(|b| !held(b)), "released on close");
        let disk = DiskImage::open(&path, true).unwrap();
        let bytes: Vec<i64> = (100..=104).chain(200..=204).filter(|&b| held(b)).collect();
        assert_eq!(bytes, [100, 201, 203]);
        drop(disk);
    }

    #[test]
    fn an_exclusive_hold_keeps_every_opener_out() {
        let path = image("held.img", 512);
        let lock = crate::ImageLock::exclusive(&path).unwrap().unwrap();
        assert!(matches!(
            DiskImage::open(&path, true),
            Err(OpenError::Locked { .. })
        ));
        let running = DiskImage::open(&image("running.img", 512), false).unwrap();
        assert!(matches!(
            crate::ImageLock::exclusive(running.path()),
            Err(OpenError::Locked { .. })
        ));
        drop(lock);
        DiskImage::open(&path, false).unwrap();
        assert!(crate::ImageLock::exclusive(Path::new("/nonexistent/x.img"))
            .unwrap()
            .is_none());
    }

    #[test]
    fn clear_errors() {
        let err = DiskImage::open(Path::new("/nonexistent/disk.img"), true).unwrap_err();
        assert!(err
            .to_string()
            .contains("cannot open disk image '/nonexistent/disk.img'"));
        let err = DiskImage::open(Path::new("/tmp"), true).unwrap_err();
        assert!(matches!(err, OpenError::NotAFile { .. }) || matches!(err, OpenError::Open { .. }));
    }
}
