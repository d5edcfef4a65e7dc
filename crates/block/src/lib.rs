//! Disk images behind vmapple's block devices (the boot ROM's backdoor
//! interface, virtio-blk).
//!
//! A [`DiskImage`] is opened once per VM. Read-write images take an
//! exclusive advisory lock (`flock`) so that a second VMM cannot open the
//! same image for writing; read-only images take a shared lock, which
//! still excludes a writer. On Linux they also take the byte-range locks
//! QEMU takes, so QEMU and vmapple exclude each other too (lock.rs).
//! Devices see only the [`BlockBackend`] trait, so they are testable
//! against an in-memory disk.

pub mod clone;
mod lock;
mod raw;

pub use lock::{Conflict, Holder, ImageLock, Perm};
pub use raw::{DiskImage, OpenError};

use std::io;

/// Sector size of every vmapple block interface.
pub const SECTOR_SIZE: u64 = 512;

/// What a block device needs from its storage.
pub trait BlockBackend: Send + Sync {
    /// Size in bytes.
    fn len(&self) -> u64;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn is_read_only(&self) -> bool;

    /// Fills `buf` from `offset`; an error if any part lies past the end.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// Writes all of `buf` at `offset`; an error if read-only or past the end.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;

    /// Makes every completed write durable (reaches stable storage).
    fn flush(&self) -> io::Result<()>;

    /// Tells the storage `len` bytes at `offset` are unused. A hint: the
    /// storage may free them (they then read as zeros) or do nothing, but
    /// never writes data for it.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;

    /// Makes `len` bytes at `offset` read as zeros. With `unmap` the
    /// storage may free the range instead of writing zeros.
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()>;
}

/// Largest piece [`write_zeros_in_steps`] hands to one write.
pub const ZERO_STEP: usize = 256 << 10;

/// Zeros for [`write_zeros_in_steps`]: shared and static, so zeroing a
/// range costs no allocation whatever its size.
static ZEROES: [u8; ZERO_STEP] = [0; ZERO_STEP];

/// Zeros `len` bytes from `offset` through `write(buf, at)`, at most
/// [`ZERO_STEP`] bytes per call: the fallback when storage cannot zero a
/// range itself.
pub fn write_zeros_in_steps(
    offset: u64,
    len: u64,
    mut write: impl FnMut(&[u8], u64) -> io::Result<()>,
) -> io::Result<()> {
    let mut done = 0;
    while done < len {
        let n = (len - done).min(ZERO_STEP as u64);
        write(&ZEROES[..n as usize], offset + done)?;
        done += n;
    }
    Ok(())
}

/// Checks that `[offset, offset + len)` lies inside a disk of `size` bytes.
pub fn check_range(size: u64, offset: u64, len: u64) -> io::Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("range {offset:#x}+{len:#x} is outside the {size:#x}-byte disk"),
        )),
    }
}

/// A disk in memory, for device tests.
#[derive(Debug, Default)]
pub struct MemoryDisk {
    data: std::sync::Mutex<Vec<u8>>,
    read_only: bool,
}

impl MemoryDisk {
    pub fn new(data: Vec<u8>, read_only: bool) -> Self {
        Self {
            data: std::sync::Mutex::new(data),
            read_only,
        }
    }

    pub fn contents(&self) -> Vec<u8> {
        self.data.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl BlockBackend for MemoryDisk {
    fn len(&self) -> u64 {
        self.data.lock().unwrap_or_else(|e| e.into_inner()).len() as u64
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let data = self.data.lock().unwrap_or_else(|e| e.into_inner());
        check_range(data.len() as u64, offset, buf.len() as u64)?;
        buf.copy_from_slice(&data[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "read-only disk",
            ));
        }
        let mut data = self.data.lock().unwrap_or_else(|e| e.into_inner());
        check_range(data.len() as u64, offset, buf.len() as u64)?;
        data[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.write_zeroes(offset, len, true)
    }

    fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "read-only disk",
            ));
        }
        let mut data = self.data.lock().unwrap_or_else(|e| e.into_inner());
        check_range(data.len() as u64, offset, len)?;
        data[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert!(check_range(1024, 512, 512).is_ok());
        assert!(check_range(1024, 512, 513).is_err());
        assert!(check_range(1024, u64::MAX, 2).is_err(), "no overflow");
        assert!(check_range(0, 0, 0).is_ok());
    }

    #[test]
    fn memory_disk() {
        let d = MemoryDisk::new(vec![7; 1024], false);
        let mut b = [0u8; 4];
        d.read_at(&mut b, 1020).unwrap();
        assert_eq!(b, [7; 4]);
        assert!(d.read_at(&mut b, 1021).is_err());
        d.write_zeroes(0, 512, false).unwrap();
        assert_eq!(d.contents()[..512], [0; 512]);
        let ro = MemoryDisk::new(vec![0; 16], true);
        assert!(ro.write_at(&[1], 0).is_err());
    }

    #[test]
    fn zeros_are_written_in_bounded_steps_that_cover_the_range() {
        let mut steps = Vec::new();
        let len = 3 * ZERO_STEP as u64 + 1234;
        write_zeros_in_steps(4096, len, |buf, at| {
            assert!(buf.iter().all(|&b| b == 0));
            steps.push((at, buf.len() as u64));
            Ok(())
        })
        .unwrap();
        assert!(steps.iter().all(|&(_, n)| n <= ZERO_STEP as u64 && n > 0));
        let mut next = 4096;
        for &(at, n) in &steps {
            assert_eq!(at, next, "contiguous");
            next += n;
        }
        assert_eq!(next, 4096 + len, "the whole range");
        // An error stops the loop and is returned.
        let mut calls = 0;
        let err = write_zeros_in_steps(0, len, |_, _| {
            calls += 1;
            Err(io::Error::other("disk full"))
        });
        assert!(err.is_err());
        assert_eq!(calls, 1);
    }
}

/// A disk that starts `offset` bytes into another: how an untrimmed
/// Virtualization.framework aux file (16 KiB of metadata first,
/// vmapple-machine.md §16.2) is served without copying it.
pub struct OffsetDisk {
    inner: std::sync::Arc<dyn BlockBackend>,
    offset: u64,
}

impl OffsetDisk {
    /// Fails if `offset` lies past the end of `inner`.
    pub fn new(inner: std::sync::Arc<dyn BlockBackend>, offset: u64) -> io::Result<Self> {
        if offset > inner.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "offset {offset:#x} is past the end of the {:#x}-byte image",
                    inner.len()
                ),
            ));
        }
        Ok(Self { inner, offset })
    }

    fn outer(&self, offset: u64, len: u64) -> io::Result<u64> {
        check_range(self.len(), offset, len)?;
        Ok(offset + self.offset)
    }
}

impl BlockBackend for OffsetDisk {
    fn len(&self) -> u64 {
        self.inner.len().saturating_sub(self.offset)
    }

    fn is_read_only(&self) -> bool {
        self.inner.is_read_only()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let at = self.outer(offset, buf.len() as u64)?;
        self.inner.read_at(buf, at)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let at = self.outer(offset, buf.len() as u64)?;
        self.inner.write_at(buf, at)
    }

    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let at = self.outer(offset, len)?;
        self.inner.discard(at, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        let at = self.outer(offset, len)?;
        self.inner.write_zeroes(at, len, unmap)
    }
}

#[cfg(test)]
mod offset_tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn offset_disk_hides_the_header_and_stays_inside() {
        let data: Vec<u8> = (0..64u8).collect();
        let inner = Arc::new(MemoryDisk::new(data, false));
        let disk = OffsetDisk::new(inner.clone(), 16).unwrap();
        assert_eq!(disk.len(), 48);
        let mut buf = [0u8; 4];
        disk.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, [16, 17, 18, 19]);
        assert!(disk.read_at(&mut buf, 46).is_err(), "past the end");
        assert!(disk.read_at(&mut buf, u64::MAX - 1).is_err(), "overflow");
        disk.write_at(&[0xaa], 0).unwrap();
        assert_eq!(inner.contents()[16], 0xaa);
        assert_eq!(inner.contents()[15], 15, "the header is untouched");
        assert!(OffsetDisk::new(inner, 65).is_err());
    }
}
