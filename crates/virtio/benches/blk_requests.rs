//! Request rate of the virtio-blk device alone: a driver-side split queue in
//! mock guest memory, a RAM-backed image, and nothing between them but the
//! device (no vCPU, no transport, no interrupt controller).
//!
//!   cargo bench -p virtio --bench blk_requests
//!
//! Each figure is set against a host `memcpy` of the same bytes, the cost a
//! request cannot go below. Figures are printed, never checked.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use block::MemoryDisk;
use virtio::block::{BlockConfig, VirtioBlock};
use virtio::device::{ActivateContext, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};
use virtio_queue::{Queue, QueueT};
use vm_core::memory::{create_guest_memory, read_exact, write_all};
use vm_core::GuestRam;

const RAM: u64 = 0x7000_0000;
const RAM_SIZE: usize = 96 << 20;
const IMAGE_SIZE: usize = 64 << 20;
const QUEUE_SIZE: u16 = 256;
/// Chains per kick: three descriptors each, so the table has room.
const BATCH: u16 = 64;
const DESC_TABLE: u64 = RAM;
const AVAIL: u64 = RAM + 0x1000;
const USED: u64 = RAM + 0x2000;
const HEADERS: u64 = RAM + 0x4000;
const STATUS: u64 = RAM + 0x8000;
const DATA: u64 = RAM + 0x10_0000;
const MEASURE: Duration = Duration::from_secs(2);

const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_T_OUT: u32 = 1;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

#[derive(Default)]
struct CountingInterrupt(AtomicU64);

impl VirtioInterrupt for CountingInterrupt {
    fn notify_queue(&self, _queue: u16) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    fn notify_config(&self) {}
}

fn put(mem: &GuestRam, addr: u64, bytes: &[u8]) {
    write_all(mem, addr, bytes).unwrap();
}

fn put_desc(mem: &GuestRam, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
    let mut d = [0u8; 16];
    d[0..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..16].copy_from_slice(&next.to_le_bytes());
    put(mem, DESC_TABLE + 16 * u64::from(index), &d);
}

fn used_idx(mem: &GuestRam) -> u16 {
    let mut b = [0u8; 2];
    read_exact(mem, USED + 2, &mut b).unwrap();
    u16::from_le_bytes(b)
}

/// Requests/s of `BATCH`-deep 'write' (guest → disk) or read requests of
/// `len` bytes each.
fn device_rate(len: u32, write: bool) -> f64 {
    let mem = create_guest_memory(&[(RAM, RAM_SIZE)]).unwrap();
    let disk = Arc::new(MemoryDisk::new(vec![0x3C; IMAGE_SIZE], false));
    let mut dev = VirtioBlock::new(disk, BlockConfig::default());
    let mut queue = Queue::new(QUEUE_SIZE).unwrap();
    queue.set_size(QUEUE_SIZE);
    queue.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
    queue.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    queue.set_used_ring_address(Some(USED as u32), Some(0));
    queue.set_ready(true);
    let interrupts = Arc::new(CountingInterrupt::default());
    dev.activate(ActivateContext {
        memory: mem.clone(),
        queues: vec![queue],
        acked_features: VIRTIO_F_VERSION_1,
        interrupt: interrupts.clone(),
    })
    .unwrap();

    let data_flags = if write { 0 } else { F_WRITE };
    let kind = if write {
        VIRTIO_BLK_T_OUT
    } else {
        VIRTIO_BLK_T_IN
    };
    let sectors = u64::from(len) / 512;
    let slots = (IMAGE_SIZE as u64 / u64::from(len)).max(1);
    for i in 0..BATCH {
        let head = 3 * i;
        let header = HEADERS + 16 * u64::from(i);
        let data = DATA + u64::from(i) * u64::from(len);
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&((u64::from(i) % slots) * sectors).to_le_bytes());
        put(&mem, header, &h);
        put_desc(&mem, head, header, 16, F_NEXT, head + 1);
        put_desc(&mem, head + 1, data, len, data_flags | F_NEXT, head + 2);
        put_desc(&mem, head + 2, STATUS + u64::from(i), 1, F_WRITE, 0);
    }

    let mut avail_idx: u16 = 0;
    let mut kick = || {
        for i in 0..BATCH {
            let slot = AVAIL + 4 + 2 * u64::from(avail_idx.wrapping_add(i) % QUEUE_SIZE);
            put(&mem, slot, &(3 * i).to_le_bytes());
        }
        avail_idx = avail_idx.wrapping_add(BATCH);
        put(&mem, AVAIL + 2, &avail_idx.to_le_bytes());
        dev.queue_notify(0);
        assert_eq!(used_idx(&mem), avail_idx, "the device left requests");
    };
    kick();
    let start = Instant::now();
    let mut requests = 0u64;
    while start.elapsed() < MEASURE {
        kick();
        requests += u64::from(BATCH);
    }
    let mut status = [0xFFu8];
    read_exact(&mem, STATUS, &mut status).unwrap();
    assert_eq!(status[0], 0, "requests failed");
    assert!(interrupts.0.load(Ordering::Relaxed) > 0);
    requests as f64 / start.elapsed().as_secs_f64()
}

/// Copies/s of `len` bytes from a RAM image into a buffer, as one request
/// must at least do.
fn memcpy_rate(len: u32) -> f64 {
    let image = vec![0x3Cu8; IMAGE_SIZE];
    let mut buf = vec![0u8; len as usize * usize::from(BATCH)];
    let slots = IMAGE_SIZE / len as usize;
    let start = Instant::now();
    let mut copies = 0u64;
    while start.elapsed() < MEASURE {
        for i in 0..usize::from(BATCH) {
            let from = (i % slots) * len as usize;
            let to = i * len as usize;
            buf[to..to + len as usize].copy_from_slice(&image[from..from + len as usize]);
        }
        std::hint::black_box(&buf);
        copies += u64::from(BATCH);
    }
    copies as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    // `cargo test --benches` runs this with --bench absent: stay quick then.
    if !std::env::args().any(|a| a == "--bench") {
        println!("blk_requests: run with `cargo bench -p virtio --bench blk_requests`");
        return;
    }
    println!(
        "{:28} {:>12} {:>12} {:>9} {:>12} {:>7}",
        "request", "device req/s", "device MiB/s", "", "memcpy /s", "ratio"
    );
    for (len, write) in [
        (4096, false),
        (4096, true),
        (65536, false),
        (1 << 20, false),
    ] {
        let dev = device_rate(len, write);
        let copy = memcpy_rate(len);
        let mib = dev * f64::from(len) / (1 << 20) as f64;
        println!(
            "{:28} {dev:12.0} {mib:12.0} {:>9} {copy:12.0} {:7.3}",
            format!("{} {} KiB", if write { "write" } else { "read" }, len >> 10),
            "",
            dev / copy
        );
    }
}
