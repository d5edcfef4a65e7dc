//! The virtqueue path of the virtio devices: queues laid out in the seeded
//! page of RAM (so the fuzzer writes descriptors and rings directly), then
//! a sequence of kicks, ring updates, config accesses and resets.
//!
//! Input after the RAM seed: one layout byte, then ops (see [`VirtOp`]).

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use vm_core::sync::{lock, wait_timeout_while};

use block::MemoryDisk;
use virtio::block::{AppleVariant, BlockConfig, VirtioBlock};
use virtio::net::{NetBackend, NetReceiver, VirtioNet, MAX_FRAME_LEN};
use virtio::{ActivateContext, VirtioDevice, VirtioInterrupt};
use virtio_queue::{Queue, QueueT};
use vm_core::memory::{read_exact, write_all};
use vm_core::GuestRam;

use crate::doubles::WatchedDisk;
use crate::input::{self, Input, RAM_BASE, RAM_SEED_LEN};
use crate::Report;

/// Bytes of the seeded page each queue's rings occupy.
pub const QUEUE_STRIDE: u64 = 0x400;
/// Offsets of a queue's parts from its base.
pub const DESC_OFF: u64 = 0;
pub const AVAIL_OFF: u64 = 0x100;
pub const USED_OFF: u64 = 0x200;
/// Largest queue the layout has room for (16 descriptors of 16 bytes).
pub const MAX_QUEUE: u16 = 16;
/// Where the rings of queue `q` live.
pub fn queue_base(q: u16) -> u64 {
    RAM_BASE + QUEUE_STRIDE * u64::from(q)
}

/// Op codes after the layout byte (first byte of each op, modulo 8).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum VirtOp {
    /// `q: u8`: the driver kicks queue `q % (queues + 1)`.
    Notify = 0,
    /// `q: u8, head: u16`: make `head` available on queue `q`.
    Publish = 1,
    /// `at: u16, len: u8, bytes`: a guest store into the seeded page.
    Poke = 2,
    /// `q: u8, idx: u8, addr (value), len: u32, flags: u16, next: u16`.
    Descriptor = 3,
    /// `offset: u8, len: u8`.
    ReadConfig = 4,
    /// `offset: u8, len: u8, bytes`.
    WriteConfig = 5,
    /// Reset, then activate again with the same layout.
    Reset = 6,
    /// net: `len: u16, bytes`: a frame arrives from the host side.
    Inject = 7,
}

/// Counts queue interrupts.
#[derive(Default)]
struct Interrupts {
    queue: AtomicU64,
    config: AtomicU64,
}

impl VirtioInterrupt for Interrupts {
    fn notify_queue(&self, _queue: u16) {
        self.queue.fetch_add(1, Ordering::Relaxed);
    }
    fn notify_config(&self) {
        self.config.fetch_add(1, Ordering::Relaxed);
    }
}

fn get_u16(mem: &GuestRam, addr: u64) -> u16 {
    let mut b = [0u8; 2];
    read_exact(mem, addr, &mut b).expect("ring inside RAM");
    u16::from_le_bytes(b)
}

/// Queue shapes and where they live.
struct Layout {
    sizes: Vec<u16>,
    /// Addresses the fuzzer chose (may overlap, be unaligned or miss RAM):
    /// only "no panic" is checked then.
    custom: Option<Vec<(u64, u64, u64)>>,
}

impl Layout {
    fn decode(input: &mut Input, queues: usize) -> Self {
        let b = input.u8();
        let size = 1u16 << (b % 5);
        let sizes = vec![size.min(MAX_QUEUE); queues];
        let custom = (b & 0x80 != 0).then(|| {
            (0..queues)
                .map(|_| {
                    (
                        input::value(input),
                        input::value(input),
                        input::value(input),
                    )
                })
                .collect()
        });
        Self { sizes, custom }
    }

    fn addrs(&self, q: u16) -> (u64, u64, u64) {
        match &self.custom {
            Some(a) => a[usize::from(q)],
            None => {
                let base = queue_base(q);
                (base + DESC_OFF, base + AVAIL_OFF, base + USED_OFF)
            }
        }
    }

    fn queues(&self, max: &[u16]) -> Vec<Queue> {
        max.iter()
            .enumerate()
            .map(|(i, &max)| {
                let mut q = Queue::new(max).expect("device queue size is valid");
                let (d, a, u) = self.addrs(i as u16);
                q.set_size(self.sizes[i]);
                q.set_desc_table_address(Some(d as u32), Some((d >> 32) as u32));
                q.set_avail_ring_address(Some(a as u32), Some((a >> 32) as u32));
                q.set_used_ring_address(Some(u as u32), Some((u >> 32) as u32));
                q.set_ready(true);
                q
            })
            .collect()
    }
}

fn activate(
    dev: &mut dyn VirtioDevice,
    mem: &GuestRam,
    layout: &Layout,
    irq: &Arc<Interrupts>,
) -> bool {
    let queues = layout.queues(&dev.queue_max_sizes());
    dev.activate(ActivateContext {
        memory: mem.clone(),
        queues,
        acked_features: dev.features(),
        interrupt: irq.clone(),
    })
    .is_ok()
}

/// What the generic loop needs besides the device.
struct Rig<'a> {
    mem: GuestRam,
    layout: Layout,
    irq: Arc<Interrupts>,
    dev: &'a mut dyn VirtioDevice,
    active: bool,
    /// Used entries the device produced, summed over kicks (fixed layout
    /// only).
    used: u64,
    /// Queues the device serves on the kicking thread: only their used
    /// rings are counted right after a kick.
    sync_queues: u16,
}

impl Rig<'_> {
    fn used_idx(&self, q: u16) -> u16 {
        get_u16(&self.mem, self.layout.addrs(q).2 + 2)
    }

    fn avail_idx(&self, q: u16) -> u16 {
        get_u16(&self.mem, self.layout.addrs(q).1 + 2)
    }

    /// Kicks `q` and counts the chains the device returned. The used ring
    /// is guest memory: a guest may point a data buffer at it or reset the
    /// device under it, so a jump larger than the queue is counted as
    /// nothing rather than treated as a device bug (virtio-queue already
    /// refuses out-of-range heads).
    fn notify(&mut self, q: u16) {
        let n = self.layout.sizes.len() as u16;
        let counted = self.active
            && self.layout.custom.is_none()
            && q < n
            && self.sync_queues & (1 << q) != 0;
        let before = if counted { self.used_idx(q) } else { 0 };
        self.dev.queue_notify(q);
        if counted {
            let added = self.used_idx(q).wrapping_sub(before);
            if added <= self.layout.sizes[usize::from(q)] {
                self.used += u64::from(added);
            }
        }
    }

    fn publish(&mut self, q: u16, head: u16) {
        let (_, avail, _) = self.layout.addrs(q);
        let idx = self.avail_idx(q);
        let size = self.layout.sizes[usize::from(q)];
        let slot = avail + 4 + 2 * u64::from(idx % size);
        // Custom layouts may point anywhere; a store outside RAM is just
        // lost, as it would be for a guest.
        let _ = write_all(&self.mem, slot, &head.to_le_bytes());
        let _ = write_all(&self.mem, avail + 2, &idx.wrapping_add(1).to_le_bytes());
    }

    /// Runs one op; `inject` handles [`VirtOp::Inject`].
    fn step(&mut self, input: &mut Input, inject: &mut dyn FnMut(&mut Input)) {
        let n = self.layout.sizes.len() as u16;
        match input.u8() % 8 {
            0 => {
                let q = u16::from(input.u8()) % (n + 1);
                self.notify(q);
            }
            1 => {
                let q = u16::from(input.u8()) % n;
                let head = input.u16();
                if self.layout.custom.is_none() {
                    self.publish(q, head);
                }
            }
            2 => {
                let at = u64::from(input.u16()) % RAM_SEED_LEN as u64;
                let len = usize::from(input.u8() % 64);
                let bytes = input.take(len);
                write_all(&self.mem, RAM_BASE + at, bytes).expect("inside RAM");
            }
            3 => {
                let q = u16::from(input.u8()) % n;
                let idx = u64::from(input.u8()) % u64::from(MAX_QUEUE);
                let mut raw = [0u8; 16];
                raw[0..8].copy_from_slice(&input::value(input).to_le_bytes());
                raw[8..12].copy_from_slice(&input.u32().to_le_bytes());
                raw[12..14].copy_from_slice(&input.u16().to_le_bytes());
                raw[14..16].copy_from_slice(&input.u16().to_le_bytes());
                let (desc, _, _) = self.layout.addrs(q);
                let _ = write_all(&self.mem, desc.wrapping_add(16 * idx), &raw);
            }
            4 => {
                let offset = u64::from(input.u8());
                let mut buf = vec![0xee; usize::from(input.u8() % 9)];
                self.dev.read_config(offset, &mut buf);
            }
            5 => {
                let offset = u64::from(input.u8());
                let len = usize::from(input.u8() % 9);
                let bytes = input.take(len).to_vec();
                self.dev.write_config(offset, &bytes);
            }
            6 => {
                self.dev.reset();
                self.active = activate(self.dev, &self.mem, &self.layout, &self.irq);
            }
            _ => inject(input),
        }
    }
}

/// Drives a device whose queues a worker thread serves (virtio-fs,
/// virtio-vsock): nothing is counted right after a kick.
pub(crate) fn run_device(input: &mut Input, mem: GuestRam, dev: &mut dyn VirtioDevice) -> Report {
    run(input, mem, dev, 0, &mut |_| {}).0
}

fn run(
    input: &mut Input,
    mem: GuestRam,
    dev: &mut dyn VirtioDevice,
    sync_queues: u16,
    inject: &mut dyn FnMut(&mut Input),
) -> (Report, Layout) {
    let queues = dev.queue_max_sizes().len();
    let layout = Layout::decode(input, queues);
    let irq = Arc::new(Interrupts::default());
    let active = activate(dev, &mem, &layout, &irq);
    assert!(
        active || layout.custom.is_some(),
        "activation refused a queue layout inside RAM"
    );
    let mut rig = Rig {
        mem,
        layout,
        irq,
        dev,
        active,
        used: 0,
        sync_queues,
    };
    let mut report = Report::default();
    while !input.is_empty() && report.ops < input::MAX_ACCESSES as u64 {
        report.ops += 1;
        rig.step(input, inject);
    }
    report.completions = rig.used;
    report.interrupts = rig.irq.queue.load(Ordering::Relaxed);
    let Rig { layout, .. } = rig;
    (report, layout)
}

fn block_target(data: &[u8], apple: Option<AppleVariant>) -> Report {
    let mut input = Input::new(data);
    let mem = input::guest_memory(&mut input);
    let shape = input.u8();
    let read_only = shape & 1 != 0;
    let backend_read_only = shape & 2 != 0;
    let len = 32 * 1024 + usize::from(shape >> 2 & 3) * 100;
    let image: Vec<u8> = (0..len).map(|i| (i as u8) ^ ((i >> 9) as u8)).collect();
    let mut disk = WatchedDisk::new(MemoryDisk::new(image.clone(), backend_read_only));
    disk.forbid_writes = read_only || backend_read_only;
    let disk = Arc::new(disk);
    let config = BlockConfig {
        read_only,
        serial: (shape & 0x10 != 0).then(|| "fuzz-serial-number-longer-than-20".to_owned()),
        num_queues: if shape & 0x20 != 0 { 2 } else { 1 },
        apple_variant: apple,
        // Synchronous, so each run is deterministic.
        io_threads: false,
    };
    let mut dev = VirtioBlock::new(disk.clone(), config);
    let (mut report, _) = run(&mut input, mem, &mut dev, u16::MAX, &mut |_| {});
    if disk.forbid_writes {
        assert_eq!(disk.contents(), image, "read-only disk changed");
    }
    report.completions += disk.writes();
    report
}

/// virtio-blk.
pub fn virtio_blk(data: &[u8]) -> Report {
    block_target(data, None)
}

/// Apple's `vmapple-virtio-blk` (root, or aux when the first op byte
/// after the RAM seed is odd).
pub fn virtio_blk_apple(data: &[u8]) -> Report {
    let variant = if data.get(RAM_SEED_LEN).is_some_and(|b| b & 0x40 != 0) {
        AppleVariant::Aux
    } else {
        AppleVariant::Root
    };
    block_target(data, Some(variant))
}

/// virtio-gpu (2D, two heads) on a display model: every command field is
/// the input's. Checks that the device's host memory stays under its cap
/// and that every head's frame matches its size.
pub fn virtio_gpu(data: &[u8]) -> Report {
    virtio_gpu_display(data).0
}

/// [`virtio_gpu`], with the display it drew on (for the smoke pass to
/// check what the seeds showed).
pub fn virtio_gpu_display(data: &[u8]) -> (Report, Arc<display::Display>) {
    let mut input = Input::new(data);
    let mem = input::guest_memory(&mut input);
    let modes = vec![vm_config::display::DisplayMode::new(64, 48, 60)];
    let display = display::Display::new(vec![modes.clone(), modes]);
    let mut dev = virtio::gpu::VirtioGpu::new(display.clone());
    let (report, _) = run(&mut input, mem, &mut dev, u16::MAX, &mut |_| {});
    for head in display.heads() {
        if let Some(frame) = head.snapshot() {
            assert_eq!(
                frame.pixels.len(),
                frame.width as usize * frame.height as usize,
                "a head's frame matches its size"
            );
        }
    }
    (report, display)
}

/// Frames the guest sent, fed back to it as received frames, plus frames
/// the input injects. Bounded so a guest cannot make it grow.
#[derive(Default)]
struct Loopback {
    frames: Mutex<VecDeque<Vec<u8>>>,
    arrived: Condvar,
    sent: AtomicU64,
}

const LOOPBACK_FRAMES: usize = 32;

impl Loopback {
    fn push(&self, frame: Vec<u8>) {
        let mut q = lock(&self.frames);
        if q.len() < LOOPBACK_FRAMES {
            q.push_back(frame);
            self.arrived.notify_all();
        }
    }
}

struct LoopBackend {
    shared: Arc<Loopback>,
    receiver: Option<Box<dyn NetReceiver>>,
}

impl NetBackend for LoopBackend {
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        assert!(
            (virtio::net::MIN_FRAME_LEN..=MAX_FRAME_LEN).contains(&frame.len()),
            "virtio-net sent a {}-byte frame",
            frame.len()
        );
        self.shared.sent.fetch_add(1, Ordering::Relaxed);
        self.shared.push(frame.to_vec());
        Ok(())
    }

    fn take_receiver(&mut self) -> Option<Box<dyn NetReceiver>> {
        self.receiver.take()
    }
}

struct LoopReceiver(Arc<Loopback>);

/// Longest the receive thread blocks in the backend: it bounds how long
/// stopping the device (every reset, every run's end) waits for it.
const RECV_SLICE: Duration = Duration::from_millis(1);

impl NetReceiver for LoopReceiver {
    fn recv(&mut self, buf: &mut [u8], timeout: Duration) -> io::Result<Option<usize>> {
        let q = lock(&self.0.frames);
        let (mut q, _) = wait_timeout_while(&self.0.arrived, q, timeout.min(RECV_SLICE), |q| {
            q.is_empty()
        });
        Ok(q.pop_front().map(|frame| {
            let n = frame.len().min(buf.len());
            buf[..n].copy_from_slice(&frame[..n]);
            frame.len().min(MAX_FRAME_LEN + 1)
        }))
    }
}

/// virtio-net on a loopback backend. Receive and transmit run on the
/// device's own threads, so what reaches the receive ring is
/// timing-dependent; the transmitted chains are counted once a reset has
/// waited for the transmit thread's last pass.
pub fn virtio_net(data: &[u8]) -> Report {
    virtio_net_settled(data, Duration::ZERO)
}

/// [`virtio_net`], then waits up to `settle` for the receive thread to
/// put a frame into the receive ring (for tests that want to see it).
/// `Report::interrupts` then includes receive interrupts and
/// `Report::completions` counts receive-ring entries too.
pub fn virtio_net_settled(data: &[u8], settle: Duration) -> Report {
    let mut input = Input::new(data);
    let mem = input::guest_memory(&mut input);
    let shared = Arc::new(Loopback::default());
    let backend = LoopBackend {
        shared: shared.clone(),
        receiver: Some(Box::new(LoopReceiver(shared.clone()))),
    };
    let mut dev = VirtioNet::new(Box::new(backend), [0x52, 0x54, 0, 0x12, 0x34, 0x56]);
    let injector = shared.clone();
    let mut inject = move |input: &mut Input| {
        let want = usize::from(input.u16());
        // Mostly ordinary frames; now and then one too big for any ring.
        let len = if want & 0x8000 != 0 {
            MAX_FRAME_LEN + 1 + want % 64
        } else {
            want % 2048
        };
        let mut frame = input.take(len).to_vec();
        frame.resize(len, 0xa5);
        injector.push(frame);
    };
    let (mut report, layout) = run(&mut input, mem.clone(), &mut dev, 0, &mut inject);
    if layout.custom.is_none() {
        let rx_used = || get_u16(&mem, layout.addrs(virtio::net::RX_QUEUE).2 + 2);
        let start = Instant::now();
        while rx_used() == 0 && start.elapsed() < settle {
            std::thread::sleep(Duration::from_millis(1));
        }
        if !settle.is_zero() {
            report.completions += u64::from(rx_used());
        }
        // A reset joins the transmit thread: every kick has been served,
        // and the used index counts the chains it returned (the ring is
        // guest memory, so an input that scribbles on it only skews this
        // figure).
        dev.reset();
        report.completions += u64::from(get_u16(&mem, layout.addrs(virtio::net::TX_QUEUE).2 + 2));
    }
    drop(dev);
    report
}
