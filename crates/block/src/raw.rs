//! Raw disk images: the file is the disk, byte for byte. Holes in a sparse
//! file read as zeros; discard punches holes again.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::{check_range, BlockBackend};

/// Why an image could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot open disk image '{}': {source}", path.display())]
    Open { path: PathBuf, source: io::Error },
    #[error("disk image '{}' is in use by another process (it holds a lock on it)", path.display())]
    Locked { path: PathBuf },
    #[error("disk image '{}' is not a regular file", path.display())]
    NotAFile { path: PathBuf },
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
    /// Opens `path`, read-only or read-write, and locks it: exclusively
    /// for writing, shared for reading.
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
        let lock = if read_only {
            libc::LOCK_SH
        } else {
            libc::LOCK_EX
        };
        // SAFETY: flock on a descriptor we own; no memory is involved.
        if unsafe { libc::flock(file.as_raw_fd(), lock | libc::LOCK_NB) } != 0 {
            let err = io::Error::last_os_error();
            return Err(if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                OpenError::Locked {
                    path: path.to_path_buf(),
                }
            } else {
                open_error(err)
            });
        }
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
