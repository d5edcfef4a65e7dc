//! virtio-blk (virtio 1.2 §5.2), plain and as Apple's `vmapple-virtio-blk`
//! root/aux variant (vmapple-machine.md §11).
//!
//! # Requests
//!
//! A request is a 16-byte header (`type`, `reserved`/`ioprio`, `sector`) in
//! the device-readable part of the chain, data, and a one-byte status that
//! is the last device-writable byte. Supported: IN, OUT, FLUSH (reaches
//! stable storage through [`BlockBackend::flush`]), GET_ID, DISCARD and
//! WRITE_ZEROES, and for the Apple variant the barrier (`0x0001_0000`, a
//! no-op that succeeds, §11.4). Anything else completes with UNSUPP.
//!
//! Types are matched exactly: the legacy barrier flag `0x8000_0000` belongs
//! to pre-1.0 virtio, which this modern-only device does not speak, so
//! `0x8000_0000 | IN` is UNSUPP rather than a read (QEMU would strip the
//! flag; no modern driver sets it). For the Apple barrier this is exactly
//! the observed behaviour (§20.5 item 52).
//!
//! # Threading
//!
//! By default requests are processed synchronously in
//! [`VirtioDevice::queue_notify`], on the vCPU thread that kicked the
//! queue: the guest's vCPU pays for its own I/O, and a kick's work is
//! bounded by one pass over the ring (at most the queue size of requests,
//! each at most [`MAX_REQUEST_BYTES`]).
//!
//! With [`BlockConfig::io_threads`] each queue gets its own I/O thread
//! while the device runs: a kick only wakes the queue's thread and
//! returns, so the vCPU goes back to the guest while the host reads or
//! writes the disk, and queues (one per vCPU) are served in parallel.
//! The thread does the same one pass per wake-up; kicks that arrive while
//! it works leave one pending wake-up, so the ring is looked at again.
//! Each queue's requests still complete in ring order on one thread, so
//! the ordering and durability rules above hold per queue exactly as
//! before (a FLUSH covers the writes whose completion the driver saw,
//! whatever queue they went through). Reset stops the threads and waits
//! for the pass in progress, so no request touches guest memory after the
//! device was reset.
//!
//! # Hostile chains
//!
//! A chain that is malformed (buffer outside RAM, readable after writable,
//! too many descriptors) or whose data part does not fit the request gets
//! IOERR if a status byte can be written, and is otherwise returned with a
//! used length of 0; nothing is read from or written to the disk for it.
//! Data is copied through a bounded bounce buffer, never allocated at a
//! guest-chosen size.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;

use block::{BlockBackend, SECTOR_SIZE};
use virtio_bindings::virtio_blk as vb;
use virtio_queue::{Queue, QueueT};
use vm_core::{guest_error, GuestRam};

use crate::device::{
    ActivateContext, ActivateError, PciIdentity, QueuePosition, VirtioDevice, VirtioInterrupt,
    VIRTIO_F_VERSION_1,
};

#[path = "chain.rs"]
pub(crate) mod chain;
#[cfg(test)]
#[path = "test_driver.rs"]
pub(crate) mod test_driver;

use chain::{read_stream, stream_len, write_stream, Chain};

/// virtio device type of a block device.
pub const DEVICE_TYPE: u32 = 2;

/// Entries per queue.
pub const QUEUE_SIZE: u16 = 256;

/// Largest data part of one IN/OUT request. Linux sends at most
/// `max_sectors_kb` (1280 KiB by default, 4 MiB on newer kernels); anything
/// beyond this is refused with IOERR rather than processed.
pub const MAX_REQUEST_BYTES: u64 = 64 << 20;

/// Bounce-buffer size for data copies.
const CHUNK_BYTES: usize = 256 << 10;

/// `max_discard_sectors`: just under 4 GiB per request. A discard never
/// writes data (the backend frees blocks or does nothing), so its size
/// costs the vCPU little.
pub const MAX_DISCARD_SECTORS: u32 = (u32::MAX as u64 / SECTOR_SIZE) as u32;

/// `max_write_zeroes_sectors`: as much as one OUT request. Where the host
/// cannot zero or free a range the backend writes real zeros, so one
/// request is held to the work of the largest write.
pub const MAX_WRITE_ZEROES_SECTORS: u32 = (MAX_REQUEST_BYTES / SECTOR_SIZE) as u32;

/// Segments per DISCARD / WRITE_ZEROES request.
pub const MAX_DISCARD_SEGMENTS: u32 = 1;

/// Feature bits (virtio 1.2 §5.2.3).
pub mod feature {
    pub const SEG_MAX: u64 = 1 << 2;
    pub const RO: u64 = 1 << 5;
    pub const BLK_SIZE: u64 = 1 << 6;
    pub const FLUSH: u64 = 1 << 9;
    pub const MQ: u64 = 1 << 12;
    pub const DISCARD: u64 = 1 << 13;
    pub const WRITE_ZEROES: u64 = 1 << 14;
    /// Offered by the Apple variant only to size the config space (§11.3).
    pub const ZONED: u64 = 1 << 17;
}

/// Request types (virtio 1.2 §5.2.6, vmapple-machine.md §11.4).
pub mod req {
    pub const IN: u32 = super::vb::VIRTIO_BLK_T_IN;
    pub const OUT: u32 = super::vb::VIRTIO_BLK_T_OUT;
    pub const FLUSH: u32 = super::vb::VIRTIO_BLK_T_FLUSH;
    pub const GET_ID: u32 = super::vb::VIRTIO_BLK_T_GET_ID;
    pub const DISCARD: u32 = super::vb::VIRTIO_BLK_T_DISCARD;
    pub const WRITE_ZEROES: u32 = super::vb::VIRTIO_BLK_T_WRITE_ZEROES;
    pub const APPLE_BARRIER: u32 = 0x0001_0000;
}

/// Status byte values.
pub mod status {
    pub const OK: u8 = super::vb::VIRTIO_BLK_S_OK as u8;
    pub const IOERR: u8 = super::vb::VIRTIO_BLK_S_IOERR as u8;
    pub const UNSUPP: u8 = super::vb::VIRTIO_BLK_S_UNSUPP as u8;
}

/// Device-specific config space offsets (virtio 1.2 §5.2.4, §11.3).
pub mod cfg {
    pub const CAPACITY: usize = 0x00;
    pub const SIZE_MAX: usize = 0x08;
    pub const SEG_MAX: usize = 0x0c;
    pub const BLK_SIZE: usize = 0x14;
    pub const NUM_QUEUES: usize = 0x22;
    pub const MAX_DISCARD_SECTORS: usize = 0x24;
    pub const MAX_DISCARD_SEG: usize = 0x28;
    pub const DISCARD_SECTOR_ALIGNMENT: usize = 0x2c;
    pub const MAX_WRITE_ZEROES_SECTORS: usize = 0x30;
    pub const MAX_WRITE_ZEROES_SEG: usize = 0x34;
    pub const WRITE_ZEROES_MAY_UNMAP: usize = 0x38;
    /// Apple's type word, over `max_secure_erase_sectors`.
    pub const APPLE_TYPE: usize = 0x3c;
    pub const ZONED_MODEL: usize = 0x5c;
    /// Size up to and including the write-zeroes fields.
    pub const STANDARD_LEN: usize = 0x3c;
    /// Size including the zoned fields (what ZONED makes the driver see).
    pub const ZONED_LEN: usize = 0x60;
}

/// Length of the request header.
const HEADER_LEN: u64 = 16;
/// Length of one DISCARD / WRITE_ZEROES segment.
const DISCARD_SEG_LEN: u64 = 16;
/// `flags` bit of a WRITE_ZEROES segment: the range may be deallocated.
const WZ_FLAG_UNMAP: u32 = 1;

/// Apple's block device roles (vmapple-machine.md §11.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AppleVariant {
    Root = 1,
    Aux = 2,
}

/// How a block device presents its disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockConfig {
    /// Refuse writes even if the backend allows them.
    pub read_only: bool,
    /// GET_ID answer; only the first 20 bytes are used.
    pub serial: Option<String>,
    /// Request queues (at least 1).
    pub num_queues: u16,
    /// `Some` for Apple's `vmapple-virtio-blk-pci`.
    pub apple_variant: Option<AppleVariant>,
    /// Serve each queue on an I/O thread of its own instead of the
    /// kicking vCPU's (see the module docs).
    pub io_threads: bool,
}

impl Default for BlockConfig {
    fn default() -> Self {
        Self {
            read_only: false,
            serial: None,
            num_queues: 1,
            apple_variant: None,
            io_threads: false,
        }
    }
}

struct Active {
    memory: GuestRam,
    queues: Vec<Queue>,
    interrupt: Arc<dyn VirtioInterrupt>,
    /// With I/O threads: one per queue, and the queues are theirs.
    workers: Vec<QueueWorker>,
}

impl Active {
    /// Hands every queue to an I/O thread of its own.
    fn start_workers(&mut self, disk: &Arc<Disk>) -> std::io::Result<()> {
        for (i, queue) in std::mem::take(&mut self.queues).into_iter().enumerate() {
            let worker = QueueWorker::start(
                i as u16,
                disk.clone(),
                self.memory.clone(),
                queue,
                self.interrupt.clone(),
            )?;
            self.workers.push(worker);
        }
        Ok(())
    }
}

/// A queue's I/O thread and the way to wake it.
struct QueueWorker {
    /// One slot: a wake-up already pending covers later kicks.
    wake: Option<SyncSender<()>>,
    /// Ends the thread's passes at the next boundary (reset: the queue
    /// is dropped with the device's activation).
    halt: Arc<AtomicBool>,
    /// Gives the queue back when it ends.
    thread: Option<JoinHandle<Queue>>,
}

impl QueueWorker {
    fn start(
        index: u16,
        disk: Arc<Disk>,
        memory: GuestRam,
        queue: Queue,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> std::io::Result<Self> {
        let (wake, woken): (SyncSender<()>, Receiver<()>) = sync_channel(1);
        let mut queue = queue;
        let halt = Arc::new(AtomicBool::new(false));
        let halted = halt.clone();
        let thread = std::thread::Builder::new()
            .name(format!("virtio-blk-q{index}"))
            .spawn(move || {
                // Ends when the device drops the sender (reset, quiesce),
                // after serving a wake-up still pending: no kick is lost.
                while woken.recv().is_ok() {
                    // While this thread works the driver need not kick
                    // (VRING_USED_F_NO_NOTIFY): each kick is an exit on
                    // its vCPU. Passes go on until the ring is found
                    // empty with kicks asked for again (so a quiesce
                    // leaves nothing published unserved), or a reset.
                    loop {
                        if !queue.ready() || queue.disable_notification(&memory).is_err() {
                            break;
                        }
                        serve(&disk, &memory, &mut queue, index, interrupt.as_ref());
                        let more = queue.enable_notification(&memory).unwrap_or(false);
                        if !more || halted.load(Ordering::Acquire) {
                            break;
                        }
                    }
                }
                queue
            })?;
        Ok(Self {
            wake: Some(wake),
            halt,
            thread: Some(thread),
        })
    }

    fn kick(&self) {
        if let Some(wake) = &self.wake {
            match wake.try_send(()) {
                Ok(()) | Err(TrySendError::Full(())) => {}
                Err(TrySendError::Disconnected(())) => {
                    guest_error!("virtio-blk: a queue's I/O thread is gone")
                }
            }
        }
    }

    /// Stops the thread once the ring is empty (and after one more pass
    /// if a kick is pending); returns its queue.
    fn stop(&mut self) -> Option<Queue> {
        self.wake = None;
        let thread = self.thread.take()?;
        match thread.join() {
            Ok(queue) => Some(queue),
            Err(_) => {
                tracing::error!("virtio-blk: a queue's I/O thread panicked");
                None
            }
        }
    }
}

impl Drop for QueueWorker {
    /// A reset: the thread ends at its next pass boundary.
    fn drop(&mut self) {
        self.halt.store(true, Ordering::Release);
        self.stop();
    }
}

/// One pass over `queue`: every request available now (at most the queue
/// size), completed in order, then one notification if the driver wants
/// it.
fn serve(
    disk: &Disk,
    mem: &GuestRam,
    queue: &mut Queue,
    index: u16,
    interrupt: &dyn VirtioInterrupt,
) {
    if !queue.ready() {
        return;
    }
    let mut used_any = false;
    // Requests the guest adds meanwhile wait for its next kick.
    let mut budget = queue.size();
    while budget > 0 {
        let Some(dc) = chain::pop_chain(queue, mem) else {
            break;
        };
        budget -= 1;
        let chain = Chain::walk(dc, mem);
        if chain.head >= queue.size() {
            // Cannot be named in the used ring; the driver lost it.
            guest_error!("virtio-blk: available head {} out of range", chain.head);
            continue;
        }
        let len = disk.process(mem, &chain);
        if let Err(e) = queue.add_used(mem, chain.head, len) {
            guest_error!("virtio-blk: cannot return chain {}: {e}", chain.head);
            break;
        }
        used_any = true;
    }
    if used_any && chain::should_interrupt(queue, mem) {
        interrupt.notify_queue(index);
    }
}

/// The disk side of the device: everything a request needs.
struct Disk {
    backend: Arc<dyn BlockBackend>,
    config: BlockConfig,
    read_only: bool,
}

/// A virtio block device.
pub struct VirtioBlock {
    disk: Arc<Disk>,
    active: Option<Active>,
}

impl VirtioBlock {
    pub fn new(backend: Arc<dyn BlockBackend>, mut config: BlockConfig) -> Self {
        config.num_queues = config.num_queues.max(1);
        let read_only = config.read_only || backend.is_read_only();
        Self {
            disk: Arc::new(Disk {
                backend,
                config,
                read_only,
            }),
            active: None,
        }
    }

    fn process_queue(&mut self, index: u16) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        if !active.workers.is_empty() {
            match active.workers.get(usize::from(index)) {
                Some(worker) => worker.kick(),
                None => guest_error!("virtio-blk: notify for missing queue {index}"),
            }
            return;
        }
        let Some(queue) = active.queues.get_mut(usize::from(index)) else {
            guest_error!("virtio-blk: notify for missing queue {index}");
            return;
        };
        serve(
            &self.disk,
            &active.memory,
            queue,
            index,
            active.interrupt.as_ref(),
        );
    }
}

impl Disk {
    fn capacity_sectors(&self) -> u64 {
        self.backend.len() / SECTOR_SIZE
    }

    fn config_space(&self) -> ([u8; cfg::ZONED_LEN], usize) {
        let mut c = [0u8; cfg::ZONED_LEN];
        let mut put = |at: usize, bytes: &[u8]| c[at..at + bytes.len()].copy_from_slice(bytes);
        put(cfg::CAPACITY, &self.capacity_sectors().to_le_bytes());
        put(cfg::SIZE_MAX, &0u32.to_le_bytes());
        put(cfg::SEG_MAX, &u32::from(QUEUE_SIZE - 2).to_le_bytes());
        put(cfg::BLK_SIZE, &(SECTOR_SIZE as u32).to_le_bytes());
        put(cfg::NUM_QUEUES, &self.config.num_queues.to_le_bytes());
        if !self.read_only {
            put(cfg::MAX_DISCARD_SECTORS, &MAX_DISCARD_SECTORS.to_le_bytes());
            put(cfg::MAX_DISCARD_SEG, &MAX_DISCARD_SEGMENTS.to_le_bytes());
            put(cfg::DISCARD_SECTOR_ALIGNMENT, &1u32.to_le_bytes());
            put(
                cfg::MAX_WRITE_ZEROES_SECTORS,
                &MAX_WRITE_ZEROES_SECTORS.to_le_bytes(),
            );
            put(
                cfg::MAX_WRITE_ZEROES_SEG,
                &MAX_DISCARD_SEGMENTS.to_le_bytes(),
            );
            put(cfg::WRITE_ZEROES_MAY_UNMAP, &[1]);
        }
        match self.config.apple_variant {
            Some(v) => {
                put(cfg::APPLE_TYPE, &(v as u32).to_le_bytes());
                // ZONED_MODEL stays VIRTIO_BLK_Z_NONE (0).
                (c, cfg::ZONED_LEN)
            }
            None => (c, cfg::STANDARD_LEN),
        }
    }

    /// Handles one request; returns the used length.
    fn process(&self, mem: &GuestRam, chain: &Chain) -> u32 {
        let Some(status_seg) = chain.last_writable else {
            guest_error!("virtio-blk: request without a device-writable status byte");
            return 0;
        };
        // Last byte of the last writable buffer (len > 0 by construction).
        let status_addr = status_seg.addr.wrapping_add(u64::from(status_seg.len) - 1);
        let (status, written) = self.execute(mem, chain);
        if vm_core::memory::write_all(mem, status_addr, &[status]).is_err() {
            guest_error!("virtio-blk: status byte at {status_addr:#x} is outside RAM");
            return 0;
        }
        u32::try_from(written.saturating_add(1)).unwrap_or(u32::MAX)
    }

    /// Runs a request; returns its status and the data bytes written into
    /// the chain (not counting the status byte).
    fn execute(&self, mem: &GuestRam, chain: &Chain) -> (u8, u64) {
        if let Some(fault) = chain.fault {
            guest_error!("virtio-blk: malformed chain: {fault:?}");
            return (status::IOERR, 0);
        }
        let mut header = [0u8; HEADER_LEN as usize];
        match read_stream(mem, &chain.readable, 0, &mut header) {
            Ok(n) if n == header.len() => {}
            _ => {
                guest_error!("virtio-blk: request header shorter than 16 bytes");
                return (status::IOERR, 0);
            }
        }
        let ty = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let sector = u64::from_le_bytes([
            header[8], header[9], header[10], header[11], header[12], header[13], header[14],
            header[15],
        ]);
        // Data the driver supplies (after the header) and room for data
        // from the device (before the status byte).
        let out_len = stream_len(&chain.readable) - HEADER_LEN;
        let in_len = stream_len(&chain.writable).saturating_sub(1);
        let in_segs = &chain.writable;

        match ty {
            req::IN => match self.check_rw(sector, in_len) {
                Some(offset) => self.read(mem, in_segs, offset, in_len),
                None => (status::IOERR, 0),
            },
            req::OUT => {
                if self.read_only {
                    return (status::IOERR, 0);
                }
                match self.check_rw(sector, out_len) {
                    Some(offset) => (self.write(mem, &chain.readable, offset, out_len), 0),
                    None => (status::IOERR, 0),
                }
            }
            req::FLUSH => match self.backend.flush() {
                Ok(()) => (status::OK, 0),
                Err(e) => {
                    vm_core::log_limited!(error, "virtio-blk: flush failed: {e}");
                    (status::IOERR, 0)
                }
            },
            req::GET_ID => {
                let mut id = [0u8; vb::VIRTIO_BLK_ID_BYTES as usize];
                if let Some(serial) = &self.config.serial {
                    let n = serial.len().min(id.len());
                    id[..n].copy_from_slice(&serial.as_bytes()[..n]);
                }
                let n = (id.len() as u64).min(in_len) as usize;
                match write_stream(mem, in_segs, 0, &id[..n]) {
                    Ok(done) => (status::OK, done as u64),
                    Err(_) => (status::IOERR, 0),
                }
            }
            req::DISCARD | req::WRITE_ZEROES => {
                (self.discard_or_zero(mem, ty, &chain.readable, out_len), 0)
            }
            req::APPLE_BARRIER if self.config.apple_variant.is_some() => {
                tracing::debug!("virtio-blk: Apple barrier requests are no-ops");
                (status::OK, 0)
            }
            _ => {
                guest_error!("virtio-blk: unsupported request type {ty:#x}");
                (status::UNSUPP, 0)
            }
        }
    }

    /// Validates an IN/OUT range; returns its byte offset on the disk.
    fn check_rw(&self, sector: u64, len: u64) -> Option<u64> {
        if len % SECTOR_SIZE != 0 {
            guest_error!("virtio-blk: data length {len:#x} is not a whole number of sectors");
            return None;
        }
        if len > MAX_REQUEST_BYTES {
            guest_error!("virtio-blk: request of {len:#x} bytes exceeds the per-request cap");
            return None;
        }
        let offset = sector.checked_mul(SECTOR_SIZE)?;
        let end = offset.checked_add(len)?;
        if end > self.capacity_sectors() * SECTOR_SIZE {
            guest_error!("virtio-blk: sectors {sector:#x}+{len:#x} bytes are past the end");
            return None;
        }
        Some(offset)
    }

    fn read(&self, mem: &GuestRam, segs: &[chain::Segment], offset: u64, len: u64) -> (u8, u64) {
        let mut buf = vec![0u8; (len as usize).min(CHUNK_BYTES)];
        let mut done = 0u64;
        while done < len {
            let n = ((len - done) as usize).min(buf.len());
            if let Err(e) = self.backend.read_at(&mut buf[..n], offset + done) {
                vm_core::log_limited!(
                    error,
                    "virtio-blk: read at {:#x} failed: {e}",
                    offset + done
                );
                return (status::IOERR, done);
            }
            if write_stream(mem, segs, done, &buf[..n]).is_err() {
                return (status::IOERR, done);
            }
            done += n as u64;
        }
        (status::OK, done)
    }

    fn write(&self, mem: &GuestRam, segs: &[chain::Segment], offset: u64, len: u64) -> u8 {
        let mut buf = vec![0u8; (len as usize).min(CHUNK_BYTES)];
        let mut done = 0u64;
        while done < len {
            let n = ((len - done) as usize).min(buf.len());
            if read_stream(mem, segs, HEADER_LEN + done, &mut buf[..n]).is_err() {
                return status::IOERR;
            }
            if let Err(e) = self.backend.write_at(&buf[..n], offset + done) {
                vm_core::log_limited!(
                    error,
                    "virtio-blk: write at {:#x} failed: {e}",
                    offset + done
                );
                return status::IOERR;
            }
            done += n as u64;
        }
        status::OK
    }

    fn discard_or_zero(&self, mem: &GuestRam, ty: u32, segs: &[chain::Segment], len: u64) -> u8 {
        if self.read_only {
            return status::IOERR;
        }
        if len == 0 || len % DISCARD_SEG_LEN != 0 {
            guest_error!("virtio-blk: discard/write-zeroes payload of {len} bytes");
            return status::IOERR;
        }
        if len / DISCARD_SEG_LEN > u64::from(MAX_DISCARD_SEGMENTS) {
            guest_error!("virtio-blk: too many discard/write-zeroes segments");
            return status::UNSUPP;
        }
        let mut raw = [0u8; DISCARD_SEG_LEN as usize];
        // One segment only (MAX_DISCARD_SEGMENTS); validate all before acting.
        if read_stream(mem, segs, HEADER_LEN, &mut raw).ok() != Some(raw.len()) {
            return status::IOERR;
        }
        let sector = u64::from_le_bytes(raw[0..8].try_into().unwrap_or_default());
        let num = u32::from_le_bytes(raw[8..12].try_into().unwrap_or_default());
        let flags = u32::from_le_bytes(raw[12..16].try_into().unwrap_or_default());
        // §5.2.6.2: unknown flags, or UNMAP on a discard, are UNSUPP.
        let allowed = if ty == req::WRITE_ZEROES {
            WZ_FLAG_UNMAP
        } else {
            0
        };
        if flags & !allowed != 0 {
            guest_error!("virtio-blk: segment flags {flags:#x} not supported");
            return status::UNSUPP;
        }
        let max = if ty == req::DISCARD {
            MAX_DISCARD_SECTORS
        } else {
            MAX_WRITE_ZEROES_SECTORS
        };
        if num > max {
            guest_error!("virtio-blk: discard/write-zeroes of {num} sectors exceeds {max}");
            return status::IOERR;
        }
        let Some(offset) = sector.checked_mul(SECTOR_SIZE) else {
            return status::IOERR;
        };
        let bytes = u64::from(num) * SECTOR_SIZE;
        if block::check_range(self.capacity_sectors() * SECTOR_SIZE, offset, bytes).is_err() {
            guest_error!("virtio-blk: discard/write-zeroes past the end of the disk");
            return status::IOERR;
        }
        let result = if ty == req::DISCARD {
            self.backend.discard(offset, bytes)
        } else {
            self.backend
                .write_zeroes(offset, bytes, flags & WZ_FLAG_UNMAP != 0)
        };
        match result {
            Ok(()) => status::OK,
            Err(e) => {
                vm_core::log_limited!(error, "virtio-blk: discard/write-zeroes failed: {e}");
                status::IOERR
            }
        }
    }
}

impl VirtioDevice for VirtioBlock {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; usize::from(self.disk.config.num_queues)]
    }

    fn features(&self) -> u64 {
        let mut f = VIRTIO_F_VERSION_1 | feature::FLUSH | feature::BLK_SIZE | feature::SEG_MAX;
        if self.disk.read_only {
            f |= feature::RO;
        } else {
            f |= feature::DISCARD | feature::WRITE_ZEROES;
        }
        if self.disk.config.num_queues > 1 {
            f |= feature::MQ;
        }
        if self.disk.config.apple_variant.is_some() {
            f |= feature::ZONED;
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let (space, len) = self.disk.config_space();
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = offset
                .checked_add(i as u64)
                .and_then(|at| usize::try_from(at).ok())
                .filter(|&at| at < len)
                .map_or(0, |at| space[at]);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `wce` is writable, and only with CONFIG_WCE, not offered.
        guest_error!(
            "virtio-blk: write of {} bytes to read-only config at {offset:#x}",
            data.len()
        );
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if !ctx.queues.first().is_some_and(|q| q.ready()) {
            return Err(ActivateError::MissingQueue(0));
        }
        for (i, q) in ctx.queues.iter().enumerate() {
            if q.ready() && !chain::rings_in_ram(q, &ctx.memory) {
                return Err(ActivateError::Other(format!(
                    "virtio-blk: queue {i} is not inside guest RAM"
                )));
            }
        }
        let mut active = Active {
            memory: ctx.memory,
            queues: ctx.queues,
            interrupt: ctx.interrupt,
            workers: Vec::new(),
        };
        if self.disk.config.io_threads {
            active
                .start_workers(&self.disk)
                .map_err(|e| ActivateError::Other(format!("virtio-blk: no I/O thread: {e}")))?;
        }
        self.active = Some(active);
        Ok(())
    }

    fn queue_notify(&mut self, queue: u16) {
        self.process_queue(queue);
    }

    fn reset(&mut self) {
        self.active = None;
    }

    fn pci_identity(&self) -> PciIdentity {
        match self.disk.config.apple_variant {
            // vmapple-machine.md §11.1.
            Some(_) => PciIdentity {
                vendor: 0x106b,
                device: 0x1a00,
                subsystem_vendor: 0x1af4,
                subsystem_device: 0x1100,
                class_code: 0x01_00_00,
                revision: 1,
            },
            // Mass storage, "other" sub-class, as QEMU's virtio-blk-pci.
            None => PciIdentity::standard(DEVICE_TYPE, 0x01_80_00),
        }
    }

    /// Without I/O threads every request completes within the notify that
    /// submitted it (on the vCPU thread), so a parked machine has none in
    /// flight; with them, [`VirtioDevice::quiesce`] lets each thread
    /// finish its requests and hand its queue back. The configuration
    /// comes from the command line: the queues' positions are all there
    /// is.
    fn saves_state(&self) -> bool {
        true
    }

    /// Empty while I/O threads hold the queues (not quiesced): the
    /// transport then refuses to save rather than guess.
    fn queue_positions(&self) -> Vec<QueuePosition> {
        self.active
            .as_ref()
            .filter(|a| a.workers.is_empty())
            .map(|a| a.queues.iter().map(QueuePosition::of).collect())
            .unwrap_or_default()
    }

    fn quiesce(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        // Threads stop in index order and each gives its queue back; a
        // queue whose thread panicked is lost, and a save then refuses.
        let queues: Vec<Queue> = active
            .workers
            .drain(..)
            .filter_map(|mut w| w.stop())
            .collect();
        if !queues.is_empty() {
            active.queues = queues;
        }
    }

    fn resume(&mut self) {
        if !self.disk.config.io_threads {
            return;
        }
        if let Some(active) = self.active.as_mut().filter(|a| a.workers.is_empty()) {
            if let Err(e) = active.start_workers(&self.disk) {
                // The queues stay on the vCPU thread, served in the kick.
                tracing::error!("virtio-blk: I/O threads not restarted: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_driver::{TestInterrupt, TestQueue, F_INDIRECT, F_NEXT, F_WRITE};
    use super::*;
    use block::MemoryDisk;
    use std::io;
    use std::sync::atomic::{AtomicU32, Ordering};
    use vm_core::memory::{create_guest_memory, read_exact, write_all};

    const RAM: usize = 0x10_0000;
    const QUEUE_BASE: u64 = 0x1000;
    const HDR: u64 = 0x1_0000;
    const DATA: u64 = 0x2_0000;
    const STATUS: u64 = 0x3_0000;
    const OUTSIDE: u64 = 0x1_0000_0000;
    const DISK_SECTORS: u64 = 64;

    /// A memory disk that counts flushes.
    struct CountingDisk {
        inner: MemoryDisk,
        flushes: AtomicU32,
    }

    impl BlockBackend for CountingDisk {
        fn len(&self) -> u64 {
            self.inner.len()
        }
        fn is_read_only(&self) -> bool {
            self.inner.is_read_only()
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            self.inner.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
            self.inner.write_at(buf, offset)
        }
        fn flush(&self) -> io::Result<()> {
            self.flushes.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
            self.inner.discard(offset, len)
        }
        fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
            self.inner.write_zeroes(offset, len, unmap)
        }
    }

    struct Rig {
        mem: GuestRam,
        tq: TestQueue,
        dev: VirtioBlock,
        disk: Arc<CountingDisk>,
        irq: Arc<TestInterrupt>,
    }

    fn disk_pattern() -> Vec<u8> {
        (0..DISK_SECTORS * SECTOR_SIZE)
            .map(|i| (i % 251) as u8)
            .collect()
    }

    fn rig_with(config: BlockConfig, backend_read_only: bool) -> Rig {
        let mem = create_guest_memory(&[(0, RAM)]).unwrap();
        let disk = Arc::new(CountingDisk {
            inner: MemoryDisk::new(disk_pattern(), backend_read_only),
            flushes: AtomicU32::new(0),
        });
        let mut dev = VirtioBlock::new(disk.clone(), config);
        let tq = TestQueue::new(&mem, QUEUE_BASE, 16);
        let irq = Arc::new(TestInterrupt::default());
        let n = dev.queue_max_sizes().len();
        let mut queues = vec![tq.queue()];
        for i in 1..n {
            queues.push(TestQueue::new(&mem, QUEUE_BASE + 0x1000 * i as u64, 16).queue());
        }
        dev.activate(ActivateContext {
            memory: mem.clone(),
            queues,
            acked_features: dev.features(),
            interrupt: irq.clone(),
        })
        .unwrap();
        Rig {
            mem,
            tq,
            dev,
            disk,
            irq,
        }
    }

    fn rig(config: BlockConfig) -> Rig {
        rig_with(config, false)
    }

    fn apple(variant: AppleVariant) -> BlockConfig {
        BlockConfig {
            apple_variant: Some(variant),
            ..Default::default()
        }
    }

    impl Rig {
        fn header(&self, ty: u32, sector: u64) {
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&ty.to_le_bytes());
            h[8..16].copy_from_slice(&sector.to_le_bytes());
            write_all(&self.mem, HDR, &h).unwrap();
        }

        /// Submits a chain on queue 0; returns `(status byte, used length)`.
        fn submit(&mut self, bufs: &[(u64, u32, bool)]) -> (u8, u32) {
            write_all(&self.mem, STATUS, &[0xaa]).unwrap();
            let before = self.tq.used_idx();
            let head = self.tq.add_chain(bufs);
            self.dev.queue_notify(0);
            assert_eq!(self.tq.used_idx(), before.wrapping_add(1), "chain returned");
            let (id, len) = self.tq.used_elem(before);
            assert_eq!(id, u32::from(head));
            (self.byte(STATUS), len)
        }

        /// A standard three-part request.
        fn request(&mut self, ty: u32, sector: u64, data_len: u32, writable: bool) -> (u8, u32) {
            self.header(ty, sector);
            self.submit(&[
                (HDR, 16, false),
                (DATA, data_len, writable),
                (STATUS, 1, true),
            ])
        }

        fn byte(&self, addr: u64) -> u8 {
            let mut b = [0u8];
            read_exact(&self.mem, addr, &mut b).unwrap();
            b[0]
        }

        fn guest(&self, addr: u64, len: usize) -> Vec<u8> {
            let mut v = vec![0u8; len];
            read_exact(&self.mem, addr, &mut v).unwrap();
            v
        }

        fn segment(&self, sector: u64, num: u32, flags: u32) {
            let mut s = [0u8; 16];
            s[0..8].copy_from_slice(&sector.to_le_bytes());
            s[8..12].copy_from_slice(&num.to_le_bytes());
            s[12..16].copy_from_slice(&flags.to_le_bytes());
            write_all(&self.mem, DATA, &s).unwrap();
        }

        fn config(&self, offset: u64, len: usize) -> Vec<u8> {
            let mut v = vec![0xeeu8; len];
            self.dev.read_config(offset, &mut v);
            v
        }

        fn config_u32(&self, offset: u64) -> u32 {
            u32::from_le_bytes(self.config(offset, 4).try_into().unwrap())
        }
    }

    #[test]
    fn standard_identity_features_and_config() {
        let r = rig(BlockConfig::default());
        assert_eq!(r.dev.device_type(), 2);
        let f = r.dev.features();
        for bit in [32, 9, 6, 2, 13, 14] {
            assert_ne!(f & (1 << bit), 0, "bit {bit}");
        }
        for bit in [5, 12, 17] {
            assert_eq!(f & (1 << bit), 0, "bit {bit}");
        }
        let id = r.dev.pci_identity();
        assert_eq!((id.vendor, id.device), (0x1af4, 0x1042));
        assert_eq!((id.class_code, id.revision), (0x018000, 1));
        assert_eq!(
            u64::from_le_bytes(r.config(0, 8).try_into().unwrap()),
            DISK_SECTORS
        );
        assert_eq!(r.config_u32(cfg::BLK_SIZE as u64), 512);
        assert_eq!(r.config_u32(cfg::SEG_MAX as u64), 254);
        assert_eq!(r.config_u32(cfg::MAX_DISCARD_SEG as u64), 1);
        assert_eq!(r.config(cfg::NUM_QUEUES as u64, 2), [1, 0]);
        assert_eq!(
            r.config(0x3c, 8),
            [0; 8],
            "nothing past the standard fields"
        );
        assert_eq!(r.config(u64::MAX, 4), [0; 4]);
        assert_eq!(r.dev.queue_max_sizes(), vec![QUEUE_SIZE]);
    }

    #[test]
    fn apple_variants_type_word_identity_and_zoned_size() {
        for (variant, word) in [(AppleVariant::Root, 1), (AppleVariant::Aux, 2)] {
            let r = rig(apple(variant));
            assert_eq!(r.config_u32(0x3c), word);
            let id = r.dev.pci_identity();
            assert_eq!((id.vendor, id.device, id.revision), (0x106b, 0x1a00, 1));
            assert_eq!(id.class_code, 0x010000);
            assert_eq!((id.subsystem_vendor, id.subsystem_device), (0x1af4, 0x1100));
            assert_ne!(r.dev.features() & (1 << 17), 0, "ZONED offered");
            assert_eq!(r.config(cfg::ZONED_MODEL as u64, 1), [0]);
            // 96 bytes are defined; reads past them are zero.
            assert_eq!(r.config(0x5f, 4), [0; 4]);
            // A byte-wise read of the word matches.
            let bytes: Vec<u8> = (0x3c..0x40).map(|o| r.config(o, 1)[0]).collect();
            assert_eq!(bytes, [word as u8, 0, 0, 0]);
        }
    }

    #[test]
    fn multiqueue() {
        let mut r = rig(BlockConfig {
            num_queues: 2,
            ..Default::default()
        });
        assert_ne!(r.dev.features() & feature::MQ, 0);
        assert_eq!(r.dev.queue_max_sizes().len(), 2);
        assert_eq!(r.config(cfg::NUM_QUEUES as u64, 2), [2, 0]);
        // A kick on queue 1 with an empty ring does nothing; queue 0 still works.
        r.dev.queue_notify(1);
        assert_eq!(r.request(req::IN, 0, 512, true).0, status::OK);
    }

    #[test]
    fn io_threads_serve_each_queue_and_stop_at_reset() {
        let mem = create_guest_memory(&[(0, RAM)]).unwrap();
        let disk = Arc::new(CountingDisk {
            inner: MemoryDisk::new(disk_pattern(), false),
            flushes: AtomicU32::new(0),
        });
        let mut dev = VirtioBlock::new(
            disk.clone(),
            BlockConfig {
                num_queues: 2,
                io_threads: true,
                ..Default::default()
            },
        );
        let mut q0 = TestQueue::new(&mem, QUEUE_BASE, 16);
        let mut q1 = TestQueue::new(&mem, QUEUE_BASE + 0x1000, 16);
        let irq = Arc::new(TestInterrupt::default());
        dev.activate(ActivateContext {
            memory: mem.clone(),
            queues: vec![q0.queue(), q1.queue()],
            acked_features: dev.features(),
            interrupt: irq.clone(),
        })
        .unwrap();
        // Queue 0 reads sector 2; queue 1 writes sector 5 then flushes.
        let header = |at: u64, ty: u32, sector: u64| {
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&ty.to_le_bytes());
            h[8..16].copy_from_slice(&sector.to_le_bytes());
            write_all(&mem, at, &h).unwrap();
        };
        header(HDR, req::IN, 2);
        q0.add_chain(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
        header(HDR + 0x100, req::OUT, 5);
        write_all(&mem, DATA + 0x1000, &[0x5a; 512]).unwrap();
        q1.add_chain(&[
            (HDR + 0x100, 16, false),
            (DATA + 0x1000, 512, false),
            (STATUS + 1, 1, true),
        ]);
        header(HDR + 0x200, req::FLUSH, 0);
        q1.add_chain(&[(HDR + 0x200, 16, false), (STATUS + 2, 1, true)]);
        dev.queue_notify(0);
        dev.queue_notify(1);
        dev.queue_notify(1);
        // The kicks returned; the threads complete the requests.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while (q0.used_idx() != 1 || q1.used_idx() != 2) && std::time::Instant::now() < deadline {
            std::thread::yield_now();
        }
        assert_eq!((q0.used_idx(), q1.used_idx()), (1, 2));
        let mut status = [0u8; 3];
        read_exact(&mem, STATUS, &mut status).unwrap();
        assert_eq!(status, [status::OK; 3]);
        let mut data = vec![0u8; 512];
        read_exact(&mem, DATA, &mut data).unwrap();
        assert_eq!(data, disk_pattern()[1024..1536]);
        let mut sector = vec![0u8; 512];
        disk.read_at(&mut sector, 5 * 512).unwrap();
        assert_eq!(sector, vec![0x5a; 512]);
        assert_eq!(disk.flushes.load(Ordering::SeqCst), 1);
        let mut seen = irq.queues.lock().unwrap().clone();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen, vec![0, 1], "each queue notified");
        // Reset joins the threads: a request added afterwards is never
        // touched, even when kicked.
        dev.reset();
        header(HDR, req::IN, 0);
        q0.add_chain(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
        dev.queue_notify(0);
        assert_eq!(q0.used_idx(), 1);
    }

    #[test]
    fn quiesce_completes_every_kicked_request_and_resume_serves_on() {
        let mem = create_guest_memory(&[(0, RAM)]).unwrap();
        let disk = Arc::new(CountingDisk {
            inner: MemoryDisk::new(disk_pattern(), false),
            flushes: AtomicU32::new(0),
        });
        let mut dev = VirtioBlock::new(
            disk.clone(),
            BlockConfig {
                io_threads: true,
                ..Default::default()
            },
        );
        let mut q = TestQueue::new(&mem, QUEUE_BASE, 16);
        dev.activate(ActivateContext {
            memory: mem.clone(),
            queues: vec![q.queue()],
            acked_features: dev.features(),
            interrupt: Arc::new(TestInterrupt::default()),
        })
        .unwrap();
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&req::FLUSH.to_le_bytes());
        write_all(&mem, HDR, &h).unwrap();
        let flush = [(HDR, 16, false), (STATUS, 1, true)];
        assert!(dev.queue_positions().is_empty(), "the thread has the queue");
        for _ in 0..3 {
            q.add_chain(&flush);
        }
        dev.queue_notify(0);
        // No waiting: quiescing itself finishes what was kicked.
        dev.quiesce();
        assert_eq!(q.used_idx(), 3);
        assert_eq!(disk.flushes.load(Ordering::SeqCst), 3);
        assert_eq!(
            dev.queue_positions(),
            [QueuePosition {
                next_avail: 3,
                next_used: 3
            }]
        );
        // Quiesced, nothing moves; resumed, the thread serves the next kick.
        q.add_chain(&flush);
        assert_eq!(q.used_idx(), 3);
        dev.resume();
        dev.queue_notify(0);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while q.used_idx() != 4 && std::time::Instant::now() < deadline {
            std::thread::yield_now();
        }
        assert_eq!(q.used_idx(), 4);
        dev.quiesce();
        assert_eq!(dev.queue_positions()[0].next_used, 4);
    }

    #[test]
    fn read_returns_disk_contents_and_interrupts() {
        let mut r = rig(BlockConfig::default());
        let (st, len) = r.request(req::IN, 2, 1024, true);
        assert_eq!(st, status::OK);
        assert_eq!(len, 1025);
        assert_eq!(r.guest(DATA, 1024), disk_pattern()[1024..2048]);
        assert_eq!(*r.irq.queues.lock().unwrap(), vec![0]);
    }

    #[test]
    fn request_framing_is_free() {
        let mut r = rig(BlockConfig::default());
        r.header(req::IN, 1);
        // Data split unevenly over two buffers.
        let (st, len) = r.submit(&[
            (HDR, 16, false),
            (DATA, 300, true),
            (DATA + 0x1000, 212, true),
            (STATUS, 1, true),
        ]);
        assert_eq!((st, len), (status::OK, 513));
        let mut got = r.guest(DATA, 300);
        got.extend(r.guest(DATA + 0x1000, 212));
        assert_eq!(got, disk_pattern()[512..1024]);
        // Header split in two, status sharing a buffer with the data.
        write_all(&r.mem, STATUS, &[0xaa]).unwrap();
        let before = r.tq.used_idx();
        r.tq.add_chain(&[(HDR, 5, false), (HDR + 5, 11, false), (DATA, 513, true)]);
        r.dev.queue_notify(0);
        assert_eq!(r.tq.used_elem(before).1, 513);
        assert_eq!(r.guest(DATA, 512), disk_pattern()[512..1024]);
        assert_eq!(r.byte(DATA + 512), status::OK);
    }

    #[test]
    fn driver_can_suppress_interrupts() {
        let mut r = rig(BlockConfig::default());
        // VRING_AVAIL_F_NO_INTERRUPT in avail.flags.
        write_all(&r.mem, QUEUE_BASE + 16 * 16, &1u16.to_le_bytes()).unwrap();
        assert_eq!(r.request(req::IN, 0, 512, true).0, status::OK);
        assert!(r.irq.queues.lock().unwrap().is_empty());
    }

    #[test]
    fn write_reaches_disk() {
        let mut r = rig(BlockConfig::default());
        write_all(&r.mem, DATA, &[0x5a; 512]).unwrap();
        let (st, len) = r.request(req::OUT, 3, 512, false);
        assert_eq!((st, len), (status::OK, 1));
        assert_eq!(r.disk.inner.contents()[3 * 512..4 * 512], [0x5a; 512]);
        assert_eq!(
            r.disk.inner.contents()[..3 * 512],
            disk_pattern()[..3 * 512]
        );
    }

    #[test]
    fn flush_calls_backend() {
        let mut r = rig(BlockConfig::default());
        r.header(req::FLUSH, 0);
        let (st, len) = r.submit(&[(HDR, 16, false), (STATUS, 1, true)]);
        assert_eq!((st, len), (status::OK, 1));
        assert_eq!(r.disk.flushes.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn get_id_serial_padded_and_truncated() {
        let mut r = rig(BlockConfig {
            serial: Some("disk-0".into()),
            ..Default::default()
        });
        write_all(&r.mem, DATA, &[0xff; 20]).unwrap();
        let (st, len) = r.request(req::GET_ID, 0, 20, true);
        assert_eq!((st, len), (status::OK, 21));
        let mut want = [0u8; 20];
        want[..6].copy_from_slice(b"disk-0");
        assert_eq!(r.guest(DATA, 20), want);

        let mut r = rig(BlockConfig {
            serial: Some("0123456789abcdefghijKLMN".into()),
            ..Default::default()
        });
        let (st, len) = r.request(req::GET_ID, 0, 8, true);
        assert_eq!((st, len), (status::OK, 9));
        assert_eq!(r.guest(DATA, 8), b"01234567");
        let (st, _) = r.request(req::GET_ID, 0, 64, true);
        assert_eq!(st, status::OK);
        assert_eq!(r.guest(DATA, 20), b"0123456789abcdefghij");
    }

    #[test]
    fn discard_and_write_zeroes() {
        for ty in [req::DISCARD, req::WRITE_ZEROES] {
            let mut r = rig(BlockConfig::default());
            r.segment(4, 2, 0);
            assert_eq!(r.request(ty, 0, 16, false), (status::OK, 1));
            let disk = r.disk.inner.contents();
            assert_eq!(disk[4 * 512..6 * 512], [0; 1024]);
            assert_eq!(disk[6 * 512..7 * 512], disk_pattern()[6 * 512..7 * 512]);

            r.segment(DISK_SECTORS - 1, 2, 0);
            assert_eq!(r.request(ty, 0, 16, false).0, status::IOERR, "past end");
            r.segment(u64::MAX / 2, 1, 0);
            assert_eq!(r.request(ty, 0, 16, false).0, status::IOERR, "overflow");
            r.segment(0, 1, 0x80);
            assert_eq!(r.request(ty, 0, 16, false).0, status::UNSUPP, "flags");
            assert_eq!(r.request(ty, 0, 32, false).0, status::UNSUPP, "2 segments");
            assert_eq!(r.request(ty, 0, 15, false).0, status::IOERR, "length");
            r.header(ty, 0);
            let (st, _) = r.submit(&[(HDR, 16, false), (STATUS, 1, true)]);
            assert_eq!(st, status::IOERR, "no segment");
        }
        let mut r = rig(BlockConfig::default());
        r.segment(0, 1, WZ_FLAG_UNMAP);
        assert_eq!(r.request(req::DISCARD, 0, 16, false).0, status::UNSUPP);
        assert_eq!(r.disk.inner.contents()[..512], disk_pattern()[..512]);
        assert_eq!(r.request(req::WRITE_ZEROES, 0, 16, false).0, status::OK);
        assert_eq!(r.disk.inner.contents()[..512], [0; 512]);
    }

    #[test]
    fn read_only_disk_refuses_writes() {
        for (config, backend_ro) in [
            (
                BlockConfig {
                    read_only: true,
                    ..Default::default()
                },
                false,
            ),
            (BlockConfig::default(), true),
        ] {
            let mut r = rig_with(config, backend_ro);
            let f = r.dev.features();
            assert_ne!(f & feature::RO, 0);
            assert_eq!(f & (feature::DISCARD | feature::WRITE_ZEROES), 0);
            write_all(&r.mem, DATA, &[0x11; 512]).unwrap();
            assert_eq!(r.request(req::OUT, 0, 512, false).0, status::IOERR);
            r.segment(0, 1, 0);
            assert_eq!(r.request(req::DISCARD, 0, 16, false).0, status::IOERR);
            assert_eq!(r.request(req::WRITE_ZEROES, 0, 16, false).0, status::IOERR);
            assert_eq!(r.disk.inner.contents(), disk_pattern(), "disk unchanged");
            assert_eq!(r.request(req::IN, 0, 512, true).0, status::OK);
        }
    }

    #[test]
    fn apple_barrier_exact_type_only() {
        // §20.5 item 52.
        let mut r = rig(apple(AppleVariant::Root));
        write_all(&r.mem, DATA, &[0x77; 512]).unwrap();
        assert_eq!(r.request(0x0001_0000, 0, 512, false), (status::OK, 1));
        assert_eq!(r.disk.inner.contents(), disk_pattern(), "no I/O");
        assert_eq!(r.request(0x0001_0001, 0, 512, false).0, status::UNSUPP);
        assert_eq!(r.request(0x8001_0000, 0, 512, false).0, status::UNSUPP);
        assert_eq!(r.disk.inner.contents(), disk_pattern());
        // Not a request type of the plain device.
        let mut r = rig(BlockConfig::default());
        assert_eq!(r.request(0x0001_0000, 0, 512, false).0, status::UNSUPP);
    }

    #[test]
    fn bad_requests_get_errors() {
        let mut r = rig(BlockConfig::default());
        assert_eq!(r.request(0x1234, 0, 512, true).0, status::UNSUPP);
        assert_eq!(r.request(req::IN, DISK_SECTORS, 512, true).0, status::IOERR);
        assert_eq!(r.request(req::IN, u64::MAX, 512, true).0, status::IOERR);
        assert_eq!(r.request(req::IN, 0, 100, true).0, status::IOERR);
        assert_eq!(
            r.request(req::OUT, DISK_SECTORS - 1, 1024, false).0,
            status::IOERR
        );
        // IN of the last sector works, one past does not.
        assert_eq!(
            r.request(req::IN, DISK_SECTORS - 1, 512, true).0,
            status::OK
        );
        // A short header.
        r.header(req::IN, 0);
        let (st, len) = r.submit(&[(HDR, 8, false), (STATUS, 1, true)]);
        assert_eq!((st, len), (status::IOERR, 1));
    }

    #[test]
    fn request_cap_is_checked_before_io() {
        /// Claims to be huge; any data access is a test failure.
        struct Huge;
        impl BlockBackend for Huge {
            fn len(&self) -> u64 {
                1 << 40
            }
            fn is_read_only(&self) -> bool {
                false
            }
            fn read_at(&self, _: &mut [u8], _: u64) -> io::Result<()> {
                panic!("read must not happen")
            }
            fn write_at(&self, _: &[u8], _: u64) -> io::Result<()> {
                panic!("write must not happen")
            }
            fn flush(&self) -> io::Result<()> {
                Ok(())
            }
            fn discard(&self, _: u64, _: u64) -> io::Result<()> {
                Ok(())
            }
            fn write_zeroes(&self, _: u64, _: u64, _: bool) -> io::Result<()> {
                Ok(())
            }
        }
        let mem = create_guest_memory(&[(0, RAM), (0x1000_0000, 0x500_0000)]).unwrap();
        let mut dev = VirtioBlock::new(Arc::new(Huge), BlockConfig::default());
        let mut tq = TestQueue::new(&mem, QUEUE_BASE, 16);
        dev.activate(ActivateContext {
            memory: mem.clone(),
            queues: vec![tq.queue()],
            acked_features: 0,
            interrupt: Arc::new(TestInterrupt::default()),
        })
        .unwrap();
        let mut h = [0u8; 16];
        h[0] = req::IN as u8;
        write_all(&mem, HDR, &h).unwrap();
        // 64 MiB + 512 of valid RAM, one sector over the cap.
        let big = (MAX_REQUEST_BYTES + 512) as u32;
        tq.add_chain(&[
            (HDR, 16, false),
            (0x1000_0000, big, true),
            (STATUS, 1, true),
        ]);
        dev.queue_notify(0);
        let mut st = [0u8];
        read_exact(&mem, STATUS, &mut st).unwrap();
        assert_eq!(st[0], status::IOERR);
        assert_eq!(tq.used_elem(0).1, 1);
    }

    #[test]
    fn hostile_data_buffers() {
        let mut r = rig(BlockConfig::default());
        r.header(req::IN, 0);
        // Outside RAM.
        let (st, len) = r.submit(&[(HDR, 16, false), (OUTSIDE, 512, true), (STATUS, 1, true)]);
        assert_eq!((st, len), (status::IOERR, 1));
        // Straddling the end of RAM.
        let (st, _) = r.submit(&[
            (HDR, 16, false),
            (RAM as u64 - 256, 512, true),
            (STATUS, 1, true),
        ]);
        assert_eq!(st, status::IOERR);
        // Huge length.
        let (st, _) = r.submit(&[
            (HDR, 16, false),
            (DATA, u32::MAX - 32, true),
            (STATUS, 1, true),
        ]);
        assert_eq!(st, status::IOERR);
        // A chain of 2^32 bytes or more is cut short by virtio-queue before
        // the status: nothing can be reported.
        let (st, len) = r.submit(&[
            (HDR, 16, false),
            (DATA, u32::MAX - 15, true),
            (STATUS, 1, true),
        ]);
        assert_eq!((st, len), (0xaa, 0));
        // Address wrapping around.
        let (st, _) = r.submit(&[
            (HDR, 16, false),
            (u64::MAX - 8, 512, true),
            (STATUS, 1, true),
        ]);
        assert_eq!(st, status::IOERR);
        // Zero-length descriptors carry nothing, wherever they point.
        let (st, len) = r.submit(&[
            (HDR, 16, false),
            (OUTSIDE, 0, true),
            (DATA, 512, true),
            (OUTSIDE, 0, true),
            (STATUS, 1, true),
        ]);
        assert_eq!((st, len), (status::OK, 513));
        // Header outside RAM.
        let (st, _) = r.submit(&[(OUTSIDE, 16, false), (STATUS, 1, true)]);
        assert_eq!(st, status::IOERR);
    }

    #[test]
    fn hostile_status_descriptors() {
        let mut r = rig(BlockConfig::default());
        r.header(req::IN, 0);
        // Status read-only and nothing writable: nothing can be reported.
        let (st, len) = r.submit(&[(HDR, 16, false), (STATUS, 1, false)]);
        assert_eq!((st, len), (0xaa, 0), "status untouched");
        // Missing status.
        let (st, len) = r.submit(&[(HDR, 16, false)]);
        assert_eq!((st, len), (0xaa, 0));
        // Status outside RAM.
        let (_, len) = r.submit(&[(HDR, 16, false), (DATA, 512, true), (OUTSIDE, 1, true)]);
        assert_eq!(len, 0);
        // Readable status after writable data: malformed; the error lands in
        // the last writable byte and nothing is read from the disk into DATA.
        write_all(&r.mem, DATA, &[0x33; 512]).unwrap();
        let (st, len) = r.submit(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, false)]);
        assert_eq!((st, len), (0xaa, 1));
        assert_eq!(r.byte(DATA + 511), status::IOERR);
        assert_eq!(r.guest(DATA, 511), vec![0x33; 511]);
        // The device keeps working afterwards.
        assert_eq!(r.request(req::IN, 0, 512, true), (status::OK, 513));
    }

    #[test]
    fn hostile_chain_shapes() {
        let mut r = rig(BlockConfig::default());
        r.header(req::IN, 0);
        // A loop of readable descriptors: 0 -> 1 -> 0.
        r.tq.write_desc(0, HDR, 16, F_NEXT, 1);
        r.tq.write_desc(1, DATA, 512, F_NEXT, 0);
        r.tq.publish(0);
        // A loop through a writable status: readable follows writable.
        r.tq.write_desc(2, HDR, 16, F_NEXT, 3);
        r.tq.write_desc(3, STATUS, 1, F_NEXT | F_WRITE, 2);
        r.tq.publish(2);
        // `next` out of the table.
        r.tq.write_desc(4, HDR, 16, F_NEXT, 0xffff);
        r.tq.publish(4);
        // Indirect table outside RAM, and one that loops on itself.
        r.tq.write_desc(5, OUTSIDE, 64, F_INDIRECT, 0);
        r.tq.publish(5);
        let table = 0x4_0000;
        r.tq.write_desc_at(table, 0, HDR, 16, F_NEXT, 1);
        r.tq.write_desc_at(table, 1, STATUS, 1, F_WRITE | F_NEXT, 0);
        // Head index out of range: cannot be returned, and does not stop
        // the chains behind it.
        r.tq.publish(0xfff0);
        r.tq.write_desc(6, table, 48, F_INDIRECT, 0);
        r.tq.publish(6);
        write_all(&r.mem, STATUS, &[0xaa]).unwrap();
        r.dev.queue_notify(0);
        assert_eq!(r.tq.used_idx(), 5, "every nameable chain returned");
        assert_eq!(r.tq.used_elem(0), (0, 0));
        assert_eq!(r.tq.used_elem(1), (2, 1));
        assert_eq!(r.tq.used_elem(2), (4, 0));
        assert_eq!(r.tq.used_elem(3), (5, 0));
        assert_eq!(r.tq.used_elem(4), (6, 1));
        assert_eq!(r.byte(STATUS), status::IOERR);
    }

    #[test]
    fn runaway_avail_index_and_stray_kicks() {
        let mut r = rig(BlockConfig::default());
        r.dev.queue_notify(9);
        r.dev.queue_notify(u16::MAX);
        // avail.idx claims 1000 new chains in a 16-entry ring.
        let avail = QUEUE_BASE + 16 * 16;
        write_all(&r.mem, avail + 2, &1000u16.to_le_bytes()).unwrap();
        r.dev.queue_notify(0);
        assert_eq!(r.tq.used_idx(), 0);
        assert!(r.irq.queues.lock().unwrap().is_empty());
    }

    #[test]
    fn a_flood_of_bad_guest_input_logs_a_bounded_number_of_lines() {
        use vm_core::guest_error::BURST;
        const TIMES: u64 = 5000;
        let start = std::time::Instant::now();
        let ((), lines) = crate::log_capture::capture(|| {
            // A runaway available index, kicked again and again.
            let mut r = rig(BlockConfig::default());
            let avail = QUEUE_BASE + 16 * 16;
            write_all(&r.mem, avail + 2, &1000u16.to_le_bytes()).unwrap();
            for _ in 0..TIMES {
                r.dev.queue_notify(0);
            }
            // Activation with a used ring outside RAM, again and again.
            for _ in 0..TIMES {
                let mut q = r.tq.queue();
                q.try_set_used_ring_address(vm_memory::GuestAddress(OUTSIDE))
                    .unwrap();
                r.dev.reset();
                let err = r.dev.activate(ActivateContext {
                    memory: r.mem.clone(),
                    queues: vec![q],
                    acked_features: 0,
                    interrupt: r.irq.clone(),
                });
                assert!(err.is_err());
            }
        });
        // Each call site speaks at most BURST times per second.
        let seconds = start.elapsed().as_secs() + 1;
        assert!(
            lines.len() as u64 <= 2 * BURST * seconds,
            "{} lines in {seconds} s for {} bad inputs:\n{}",
            lines.len(),
            2 * TIMES,
            lines[..lines.len().min(20)].join("\n")
        );
    }

    #[test]
    fn inactive_and_reset_device_ignores_kicks() {
        let mut r = rig(BlockConfig::default());
        r.dev.reset();
        r.header(req::IN, 0);
        r.tq.add_chain(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
        r.dev.queue_notify(0);
        assert_eq!(r.tq.used_idx(), 0);
        let mut dev = VirtioBlock::new(r.disk.clone(), BlockConfig::default());
        dev.queue_notify(0);
        let err = dev.activate(ActivateContext {
            memory: r.mem.clone(),
            queues: vec![],
            acked_features: 0,
            interrupt: r.irq.clone(),
        });
        assert!(matches!(err, Err(ActivateError::MissingQueue(0))));
    }

    /// A device on an image file, driven request by request.
    struct FileRig {
        mem: GuestRam,
        tq: TestQueue,
        dev: VirtioBlock,
    }

    impl FileRig {
        fn new(path: &std::path::Path) -> Self {
            let image = Arc::new(block::DiskImage::open(path, false).unwrap());
            let mem = create_guest_memory(&[(0, RAM)]).unwrap();
            let mut dev = VirtioBlock::new(image, BlockConfig::default());
            let tq = TestQueue::new(&mem, QUEUE_BASE, 16);
            dev.activate(ActivateContext {
                memory: mem.clone(),
                queues: vec![tq.queue()],
                acked_features: dev.features(),
                interrupt: Arc::new(TestInterrupt::default()),
            })
            .unwrap();
            Self { mem, tq, dev }
        }

        /// DISCARD or WRITE_ZEROES of one segment; returns the status.
        fn zero(&mut self, ty: u32, sector: u64, num: u32, flags: u32) -> u8 {
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&ty.to_le_bytes());
            write_all(&self.mem, HDR, &h).unwrap();
            let mut seg = [0u8; 16];
            seg[0..8].copy_from_slice(&sector.to_le_bytes());
            seg[8..12].copy_from_slice(&num.to_le_bytes());
            seg[12..16].copy_from_slice(&flags.to_le_bytes());
            write_all(&self.mem, DATA, &seg).unwrap();
            write_all(&self.mem, STATUS, &[0xaa]).unwrap();
            self.tq
                .add_chain(&[(HDR, 16, false), (DATA, 16, false), (STATUS, 1, true)]);
            self.dev.queue_notify(0);
            let mut st = [0u8];
            read_exact(&self.mem, STATUS, &mut st).unwrap();
            st[0]
        }

        /// Reads `len` bytes from `sector` the way the guest would.
        fn read(&mut self, sector: u64, len: u32) -> Vec<u8> {
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&req::IN.to_le_bytes());
            h[8..16].copy_from_slice(&sector.to_le_bytes());
            write_all(&self.mem, HDR, &h).unwrap();
            self.tq
                .add_chain(&[(HDR, 16, false), (DATA, len, true), (STATUS, 1, true)]);
            self.dev.queue_notify(0);
            let mut st = [0u8];
            read_exact(&self.mem, STATUS, &mut st).unwrap();
            assert_eq!(st[0], status::OK);
            let mut v = vec![0u8; len as usize];
            read_exact(&self.mem, DATA, &mut v).unwrap();
            v
        }
    }

    fn scratch_image(name: &str, fill: u8, len: u64) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("virtio-blk-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("disk.img");
        if fill == 0 {
            std::fs::File::create(&path).unwrap().set_len(len).unwrap();
        } else {
            std::fs::write(&path, vec![fill; len as usize]).unwrap();
            std::fs::File::open(&path).unwrap().sync_all().unwrap();
        }
        path
    }

    fn allocated(path: &std::path::Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).unwrap().blocks() * 512
    }

    #[test]
    fn discard_and_unmapping_write_zeroes_free_an_image_files_blocks() {
        const MIB: u64 = 1 << 20;
        let path = scratch_image("holes", 0x6d, 4 * MIB);
        let mut r = FileRig::new(&path);
        let full = allocated(&path);
        assert!(full >= 4 * MIB);

        // DISCARD of 1 MiB..3 MiB: the file is sparse there and the guest
        // reads zeros back.
        assert_eq!(r.zero(req::DISCARD, 2048, 4096, 0), status::OK);
        let after_discard = allocated(&path);
        assert!(
            after_discard <= full - 2 * MIB,
            "{after_discard} of {full} bytes still allocated"
        );
        assert!(r.read(2048, 64 << 10).iter().all(|&b| b == 0));
        assert!(r.read(6143, 512).iter().all(|&b| b == 0));
        assert!(r.read(2047, 512).iter().all(|&b| b == 0x6d));

        // WRITE_ZEROES with UNMAP frees too; without it the range still
        // reads as zeros.
        assert_eq!(
            r.zero(req::WRITE_ZEROES, 6144, 2048, WZ_FLAG_UNMAP),
            status::OK
        );
        let after_unmap = allocated(&path);
        assert!(
            after_unmap <= after_discard - MIB,
            "{after_unmap} of {after_discard} bytes still allocated"
        );
        assert!(r.read(6144, 64 << 10).iter().all(|&b| b == 0));
        assert_eq!(r.zero(req::WRITE_ZEROES, 1, 8, 0), status::OK);
        assert!(r.read(1, 4096).iter().all(|&b| b == 0));
        assert!(r.read(0, 512).iter().all(|&b| b == 0x6d));
        assert!(r.read(9, 512).iter().all(|&b| b == 0x6d));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 4 * MIB);
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn write_zeroes_is_held_to_the_size_of_one_write() {
        // Where the host can neither free nor zero a range, zeros are
        // written: one request must cost no more than the largest OUT.
        let path = scratch_image("wz-cap", 0, 2 * MAX_REQUEST_BYTES);
        let mut r = FileRig::new(&path);
        let mut max = [0u8; 4];
        r.dev
            .read_config(cfg::MAX_WRITE_ZEROES_SECTORS as u64, &mut max);
        let max = u32::from_le_bytes(max);
        assert!(max > 0 && u64::from(max) * SECTOR_SIZE <= MAX_REQUEST_BYTES);
        assert_eq!(r.zero(req::WRITE_ZEROES, 0, max + 1, 0), status::IOERR);
        assert_eq!(r.zero(req::WRITE_ZEROES, 0, max, 0), status::OK);
        // Discards write nothing, so they keep their large limit.
        let mut dmax = [0u8; 4];
        r.dev
            .read_config(cfg::MAX_DISCARD_SECTORS as u64, &mut dmax);
        assert_eq!(u32::from_le_bytes(dmax), MAX_DISCARD_SECTORS);
        assert_eq!(
            r.zero(
                req::DISCARD,
                0,
                (2 * MAX_REQUEST_BYTES / SECTOR_SIZE) as u32,
                0
            ),
            status::OK
        );
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn disk_image_backend_end_to_end() {
        let dir = std::env::temp_dir().join(format!("virtio-blk-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("disk.img");
        std::fs::write(&path, vec![0u8; 8192]).unwrap();
        let image = Arc::new(block::DiskImage::open(&path, false).unwrap());
        let mem = create_guest_memory(&[(0, RAM)]).unwrap();
        let mut dev = VirtioBlock::new(image, BlockConfig::default());
        let mut tq = TestQueue::new(&mem, QUEUE_BASE, 16);
        dev.activate(ActivateContext {
            memory: mem.clone(),
            queues: vec![tq.queue()],
            acked_features: 0,
            interrupt: Arc::new(TestInterrupt::default()),
        })
        .unwrap();
        let mut h = [0u8; 16];
        h[0] = req::OUT as u8;
        h[8] = 1;
        write_all(&mem, HDR, &h).unwrap();
        write_all(&mem, DATA, &[0xc3; 512]).unwrap();
        tq.add_chain(&[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)]);
        h[0] = req::FLUSH as u8;
        write_all(&mem, HDR + 0x100, &h).unwrap();
        tq.add_chain(&[(HDR + 0x100, 16, false), (STATUS + 1, 1, true)]);
        dev.queue_notify(0);
        let mut st = [9u8; 2];
        read_exact(&mem, STATUS, &mut st).unwrap();
        assert_eq!(st, [status::OK, status::OK]);
        drop(dev);
        let file = std::fs::read(&path).unwrap();
        assert_eq!(file[512..1024], [0xc3; 512]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
