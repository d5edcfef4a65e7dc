//! Test doubles the targets build devices against.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use vm_core::sync::lock;

use block::{BlockBackend, MemoryDisk, SECTOR_SIZE};

/// An in-memory disk that counts what the device asks of it and fails
/// the run if a request is not whole sectors inside the disk: every
/// vmapple block device validates that before touching storage.
pub struct WatchedDisk {
    inner: MemoryDisk,
    reads: AtomicU64,
    writes: AtomicU64,
    /// Set for devices that must never write (read-only configurations).
    pub forbid_writes: bool,
    /// `(offset, len)` of every write, discard and write-zeroes.
    written: Mutex<Vec<(u64, u64)>>,
}

impl WatchedDisk {
    pub fn new(inner: MemoryDisk) -> Self {
        Self {
            inner,
            reads: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            forbid_writes: false,
            written: Mutex::new(Vec::new()),
        }
    }

    /// Successful reads of at least one byte.
    pub fn reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    /// Calls that could change the disk (write, discard, write-zeroes).
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    pub fn contents(&self) -> Vec<u8> {
        self.inner.contents()
    }

    /// Ranges the device asked to change, in order.
    pub fn written(&self) -> Vec<(u64, u64)> {
        lock(&self.written).clone()
    }

    fn check_sectors(&self, what: &str, offset: u64, len: u64) {
        let end = offset.checked_add(len).expect("range overflows");
        let capacity = self.inner.len() / SECTOR_SIZE * SECTOR_SIZE;
        assert!(
            offset % SECTOR_SIZE == 0 && len % SECTOR_SIZE == 0 && end <= capacity,
            "{what} of {len:#x} bytes at {offset:#x} is not whole sectors of the {capacity:#x}-byte disk"
        );
    }

    fn record_write(&self, what: &str, offset: u64, len: u64) {
        assert!(!self.forbid_writes, "{what} on a read-only disk");
        self.check_sectors(what, offset, len);
        self.writes.fetch_add(1, Ordering::Relaxed);
        lock(&self.written).push((offset, len));
    }
}

impl BlockBackend for WatchedDisk {
    fn len(&self) -> u64 {
        self.inner.len()
    }

    fn is_read_only(&self) -> bool {
        self.inner.is_read_only()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)?;
        if !buf.is_empty() {
            self.reads.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.record_write("write", offset, buf.len() as u64);
        self.inner.write_at(buf, offset)
    }

    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.record_write("discard", offset, len);
        self.inner.discard(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        self.record_write("write-zeroes", offset, len);
        self.inner.write_zeroes(offset, len, unmap)
    }
}
