//! Raw disk images: the file is the disk, byte for byte. Holes in a sparse
//! file read as zeros; discard punches holes again.

use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::lock::{self, Conflict, Holder, LockFailure};
use crate::{check_range, write_zeros_in_steps, BlockBackend};

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
    holes: Holes,
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
            holes: Holes::default(),
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

    /// Frees the file system blocks wholly inside `[offset, offset + len)`
    /// and returns the range freed (it reads as zeros now), or `None` if
    /// the host file system cannot free blocks. Never writes data.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<Option<Range<u64>>> {
        if !self.holes.can_punch.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let align = self.punch_alignment();
        let start = offset.div_ceil(align) * align;
        let end = (offset + len) / align * align;
        if start >= end {
            return Ok(Some(offset..offset));
        }
        match self.sys_punch(start, end - start) {
            Ok(()) => Ok(Some(start..end)),
            Err(e) => match e.raw_os_error() {
                Some(code)
                    if code == libc::EOPNOTSUPP
                        || code == libc::ENOTSUP
                        || code == libc::ENOSYS =>
                {
                    // Say it once; every later discard is a no-op.
                    tracing::info!(
                        "disk image '{}': the host file system cannot punch holes; \
                         discards are ignored",
                        self.path.display()
                    );
                    self.holes.can_punch.store(false, Ordering::Relaxed);
                    Ok(None)
                }
                // This range only (APFS refuses some ranges).
                Some(libc::EINVAL) => Ok(None),
                _ => Err(e),
            },
        }
    }

    /// Granule of hole punching: the range is trimmed inward to it.
    /// macOS wants whole file system blocks.
    #[cfg(target_os = "macos")]
    fn punch_alignment(&self) -> u64 {
        let mut st = std::mem::MaybeUninit::<libc::statfs>::uninit();
        // SAFETY: fstatfs on a descriptor we own writes the struct we pass;
        // it is read only when the call succeeded.
        if unsafe { libc::fstatfs(self.file.as_raw_fd(), st.as_mut_ptr()) } == 0 {
            // SAFETY: initialised by the successful fstatfs above.
            return u64::from(unsafe { st.assume_init() }.f_bsize).max(1);
        }
        4096
    }

    /// Granule of hole punching: Linux zeroes partial blocks itself.
    #[cfg(not(target_os = "macos"))]
    fn punch_alignment(&self) -> u64 {
        1
    }

    fn sys_punch(&self, offset: u64, len: u64) -> io::Result<()> {
        #[cfg(target_os = "linux")]
        return self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        );
        #[cfg(target_os = "macos")]
        {
            let args = libc::fpunchhole_t {
                fp_flags: 0,
                reserved: 0,
                fp_offset: offset as libc::off_t,
                fp_length: len as libc::off_t,
            };
            // SAFETY: F_PUNCHHOLE on a descriptor we own reads the
            // fpunchhole_t we pass and nothing else.
            let rc = unsafe { libc::fcntl(self.file.as_raw_fd(), libc::F_PUNCHHOLE, &args) };
            if rc == -1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        }
        #[cfg(not(any(target_os = "linux", target_os = "macos")))]
        {
            let _ = (offset, len);
            Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP))
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

    /// Writes real zeros, in bounded steps.
    fn write_zeros(&self, offset: u64, len: u64) -> io::Result<()> {
        write_zeros_in_steps(offset, len, |buf, at| self.file.write_all_at(buf, at))
    }

    /// As if the host file system could not punch holes.
    #[cfg(test)]
    fn without_hole_punching(self) -> Self {
        self.holes.can_punch.store(false, Ordering::Relaxed);
        self
    }
}

/// What the host file system can do about holes, learnt as we go.
#[derive(Debug)]
struct Holes {
    can_punch: AtomicBool,
}

impl Default for Holes {
    fn default() -> Self {
        Self {
            can_punch: AtomicBool::new(true),
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
        // A hint (virtio 1.2 §5.2.6.2): free what the file system can and
        // never write data, which on a file system without holes would
        // fill a sparse image and keep the vCPU busy for nothing.
        self.punch_hole(offset, len).map(|_| ())
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        self.writable()?;
        check_range(self.size, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        if unmap {
            if let Some(freed) = self.punch_hole(offset, len)? {
                // Partial blocks at either end are written.
                self.write_zeros(offset, freed.start - offset)?;
                return self.write_zeros(freed.end, offset + len - freed.end);
            }
        }
        if self.zero_range(offset, len).is_ok() {
            return Ok(());
        }
        self.write_zeros(offset, len)
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
        disk.write_zeroes(0, 512, false).unwrap();
        disk.write_zeroes(512, 512, true).unwrap();
        disk.flush().unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 4096, "size kept");
        assert!(bytes[..1024].iter().all(|&b| b == 0));
        assert_eq!(bytes[1024], 0xab);
    }

    const MIB: u64 = 1 << 20;

    /// A 4 MiB image whose every block is allocated and holds data.
    fn allocated_image(name: &str) -> (PathBuf, DiskImage) {
        let path = image(name, 4 * MIB as usize);
        std::fs::File::open(&path).unwrap().sync_all().unwrap();
        (path.clone(), DiskImage::open(&path, false).unwrap())
    }

    /// Bytes the file occupies on the host.
    fn allocated(path: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).unwrap().blocks() * 512
    }

    fn read(disk: &DiskImage, offset: u64, len: u64) -> Vec<u8> {
        let mut buf = vec![0u8; len as usize];
        disk.read_at(&mut buf, offset).unwrap();
        buf
    }

    #[test]
    fn discard_frees_blocks_which_then_read_as_zeros() {
        let (path, disk) = allocated_image("discard.img");
        let before = allocated(&path);
        assert!(before >= 4 * MIB, "the image starts fully allocated");
        disk.discard(MIB, 2 * MIB).unwrap();
        assert!(
            allocated(&path) <= before - 2 * MIB,
            "{} bytes allocated after discarding 2 MiB of {before}",
            allocated(&path)
        );
        assert!(read(&disk, MIB, 2 * MIB).iter().all(|&b| b == 0));
        assert!(read(&disk, 0, MIB).iter().all(|&b| b == 0xab));
        assert!(read(&disk, 3 * MIB, MIB).iter().all(|&b| b == 0xab));
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            4 * MIB,
            "size kept"
        );
    }

    #[test]
    fn write_zeroes_with_unmap_frees_blocks_and_zeros_exactly_the_range() {
        let (path, disk) = allocated_image("wz-unmap.img");
        let before = allocated(&path);
        // Unaligned at both ends: partial blocks are zeroed, not freed.
        disk.write_zeroes(MIB - 100, 2 * MIB + 200, true).unwrap();
        assert!(
            allocated(&path) <= before - 2 * MIB + 8192,
            "{} bytes allocated after unmapping 2 MiB of {before}",
            allocated(&path)
        );
        assert!(read(&disk, MIB - 100, 2 * MIB + 200)
            .iter()
            .all(|&b| b == 0));
        assert_eq!(read(&disk, MIB - 101, 1), [0xab]);
        assert_eq!(read(&disk, 3 * MIB + 100, 1), [0xab]);
    }

    #[test]
    fn write_zeroes_without_unmap_zeros_the_range() {
        let (_path, disk) = allocated_image("wz.img");
        disk.write_zeroes(100, MIB, false).unwrap();
        assert!(read(&disk, 100, MIB).iter().all(|&b| b == 0));
        assert_eq!(read(&disk, 99, 1), [0xab]);
        assert_eq!(read(&disk, MIB + 100, 1), [0xab]);
    }

    #[test]
    fn without_holes_discard_writes_nothing_and_write_zeroes_still_zeros() {
        // A sparse image on a file system that cannot punch holes (macOS
        // HFS+, say): a discard must not fill it with zeros.
        let path = image("noholes.img", 0);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(8 * MIB)
            .unwrap();
        let disk = DiskImage::open(&path, false)
            .unwrap()
            .without_hole_punching();
        let before = allocated(&path);
        disk.discard(0, 8 * MIB).unwrap();
        disk.flush().unwrap();
        assert_eq!(allocated(&path), before, "nothing written for a discard");
        disk.write_at(&[0x5a; 4096], MIB).unwrap();
        disk.write_zeroes(MIB, 4096, true).unwrap();
        assert!(read(&disk, MIB, 4096).iter().all(|&b| b == 0));
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
            let ret = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_SETLK, &mut fl) };
            assert_eq!(ret, 0);
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
            let ret = unsafe { libc::fcntl(probe.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
            assert_eq!(ret, 0);
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
