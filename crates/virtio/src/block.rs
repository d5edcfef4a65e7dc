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
//! Requests are processed synchronously in [`VirtioDevice::queue_notify`],
//! on the vCPU thread that kicked the queue. The guest's vCPU therefore
//! pays for its own I/O, which keeps the device free of threads and locks
//! and bounds the work a kick can cause to one pass over the ring (at most
//! the queue size of requests, each at most [`MAX_REQUEST_BYTES`]). An I/O
//! thread would only pay off with several vCPUs doing heavy I/O.
//!
//! # Hostile chains
//!
//! A chain that is malformed (buffer outside RAM, readable after writable,
//! too many descriptors) or whose data part does not fit the request gets
//! IOERR if a status byte can be written, and is otherwise returned with a
//! used length of 0; nothing is read from or written to the disk for it.
//! Data is copied through a bounded bounce buffer, never allocated at a
//! guest-chosen size.

use std::sync::Arc;

use block::{BlockBackend, SECTOR_SIZE};
use virtio_bindings::virtio_blk as vb;
use virtio_queue::{Queue, QueueT};
use vm_core::{guest_error, GuestMemory};

use crate::device::{
    ActivateContext, ActivateError, PciIdentity, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1,
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

/// `max_discard_sectors` / `max_write_zeroes_sectors`: 4 GiB - 512 in
/// sectors, the largest a u32 byte count in the backend path never needs.
pub const MAX_DISCARD_SECTORS: u32 = (u32::MAX as u64 / SECTOR_SIZE) as u32;

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
}

impl Default for BlockConfig {
    fn default() -> Self {
        Self {
            read_only: false,
            serial: None,
            num_queues: 1,
            apple_variant: None,
        }
    }
}

struct Active {
    memory: GuestMemory,
    queues: Vec<Queue>,
    interrupt: Arc<dyn VirtioInterrupt>,
}

/// The disk side of the device: everything a request needs.
struct Disk {
    backend: Arc<dyn BlockBackend>,
    config: BlockConfig,
    read_only: bool,
}

/// A virtio block device.
pub struct VirtioBlock {
    disk: Disk,
    active: Option<Active>,
}

impl VirtioBlock {
    pub fn new(backend: Arc<dyn BlockBackend>, mut config: BlockConfig) -> Self {
        config.num_queues = config.num_queues.max(1);
        let read_only = config.read_only || backend.is_read_only();
        Self {
            disk: Disk {
                backend,
                config,
                read_only,
            },
            active: None,
        }
    }

    fn process_queue(&mut self, index: u16) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let Some(queue) = active.queues.get_mut(usize::from(index)) else {
            guest_error!("virtio-blk: notify for missing queue {index}");
            return;
        };
        if !queue.ready() {
            return;
        }
        let mem = &active.memory;
        let mut used_any = false;
        // One pass: at most the queue size of requests per kick; requests
        // the guest adds meanwhile wait for its next kick.
        let mut budget = queue.size();
        while budget > 0 {
            let Some(dc) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            budget -= 1;
            let chain = Chain::walk(dc, mem);
            let len = self.disk.process(mem, &chain);
            if let Err(e) = queue.add_used(mem, chain.head, len) {
                guest_error!("virtio-blk: cannot return chain {}: {e}", chain.head);
                break;
            }
            used_any = true;
        }
        if used_any && queue.needs_notification(mem).unwrap_or(true) {
            active.interrupt.notify_queue(index);
        }
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
            put(cfg::MAX_WRITE_ZEROES_SECTORS, &MAX_DISCARD_SECTORS.to_le_bytes());
            put(cfg::MAX_WRITE_ZEROES_SEG, &MAX_DISCARD_SEGMENTS.to_le_bytes());
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
    fn process(&self, mem: &GuestMemory, chain: &Chain) -> u32 {
        let Some(status_seg) = chain.last_writable else {
            guest_error!("virtio-blk: request without a device-writable status byte");
            return 0;
        };
        // Last byte of the last writable buffer (len > 0 by construction).
        let status_addr = status_seg
            .addr
            .wrapping_add(u64::from(status_seg.len) - 1);
        let (status, written) = self.execute(mem, chain);
        if vm_core::memory::write_all(mem, status_addr, &[status]).is_err() {
            guest_error!("virtio-blk: status byte at {status_addr:#x} is outside RAM");
            return 0;
        }
        u32::try_from(written.saturating_add(1)).unwrap_or(u32::MAX)
    }

    /// Runs a request; returns its status and the data bytes written into
    /// the chain (not counting the status byte).
    fn execute(&self, mem: &GuestMemory, chain: &Chain) -> (u8, u64) {
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
        // Writable stream minus the status byte.
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
                    tracing::error!("virtio-blk: flush failed: {e}");
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

    fn read(
        &self,
        mem: &GuestMemory,
        segs: &[chain::Segment],
        offset: u64,
        len: u64,
    ) -> (u8, u64) {
        let mut buf = vec![0u8; (len as usize).min(CHUNK_BYTES)];
        let mut done = 0u64;
        while done < len {
            let n = ((len - done) as usize).min(buf.len());
            if let Err(e) = self.backend.read_at(&mut buf[..n], offset + done) {
                tracing::error!("virtio-blk: read at {:#x} failed: {e}", offset + done);
                return (status::IOERR, done);
            }
            if write_stream(mem, segs, done, &buf[..n]).is_err() {
                return (status::IOERR, done);
            }
            done += n as u64;
        }
        (status::OK, done)
    }

    fn write(&self, mem: &GuestMemory, segs: &[chain::Segment], offset: u64, len: u64) -> u8 {
        let mut buf = vec![0u8; (len as usize).min(CHUNK_BYTES)];
        let mut done = 0u64;
        while done < len {
            let n = ((len - done) as usize).min(buf.len());
            if read_stream(mem, segs, HEADER_LEN + done, &mut buf[..n]).is_err() {
                return status::IOERR;
            }
            if let Err(e) = self.backend.write_at(&buf[..n], offset + done) {
                tracing::error!("virtio-blk: write at {:#x} failed: {e}", offset + done);
                return status::IOERR;
            }
            done += n as u64;
        }
        status::OK
    }

    fn discard_or_zero(
        &self,
        mem: &GuestMemory,
        ty: u32,
        segs: &[chain::Segment],
        len: u64,
    ) -> u8 {
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
        let allowed = if ty == req::WRITE_ZEROES { WZ_FLAG_UNMAP } else { 0 };
        if flags & !allowed != 0 {
            guest_error!("virtio-blk: segment flags {flags:#x} not supported");
            return status::UNSUPP;
        }
        if num > MAX_DISCARD_SECTORS {
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
            // With or without UNMAP the range must read back as zeros;
            // the backend picks the cheapest way.
            self.backend.write_zeroes(offset, bytes)
        };
        match result {
            Ok(()) => status::OK,
            Err(e) => {
                tracing::error!("virtio-blk: discard/write-zeroes failed: {e}");
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
        let mut f = VIRTIO_F_VERSION_1
            | feature::FLUSH
            | feature::BLK_SIZE
            | feature::SEG_MAX;
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
            if q.ready() && !q.is_valid(&ctx.memory) {
                return Err(ActivateError::Other(format!(
                    "virtio-blk: queue {i} is not inside guest RAM"
                )));
            }
        }
        self.active = Some(Active {
            memory: ctx.memory,
            queues: ctx.queues,
            interrupt: ctx.interrupt,
        });
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
}
