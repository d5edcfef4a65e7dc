//! virtio-net (virtio 1.2 §5.1): one receive and one transmit queue, a MAC
//! address and a link that is always up.
//!
//! Offered features are VERSION_1, MAC and STATUS only. Without CSUM, GSO
//! or MRG_RXBUF the guest computes every checksum and segments every
//! packet itself, and each received frame goes into one buffer chain, so
//! the device moves plain Ethernet frames and nothing it forwards can be
//! half-offloaded.
//!
//! Each buffer starts with the 12-byte `virtio_net_hdr` (VERSION_1 always
//! uses the `num_buffers` form, §5.1.6). On transmit it is stripped and its
//! offload fields ignored (none was negotiated); on receive it is written
//! as zeros except `num_buffers` = 1, which §5.1.6.4.1 requires when
//! MRG_RXBUF is not negotiated.
//!
//! # Threads
//!
//! Transmit runs on the vCPU thread in [`VirtioDevice::queue_notify`]. A
//! receive thread, started on activation and joined on reset, waits on the
//! backend with a short timeout, puts each frame into the next receive
//! chain and interrupts. When the guest has no receive buffer the thread
//! holds the frame and stops reading, so the backend (and through it the
//! host socket) is what queues or drops, not the device.
//!
//! # Backends
//!
//! A [`NetBackend`] sends frames and hands over a [`NetReceiver`] once, so
//! the transmit and receive directions never wait on each other:
//! [`passt::PasstBackend`], [`unix::UnixStreamBackend`],
//! [`unix::UnixDgramBackend`] and, on Linux, [`tap::TapBackend`].

pub mod framing;
pub mod passt;
#[cfg(target_os = "linux")]
pub mod tap;
pub mod unix;

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_core::{guest_error, GuestMemory};

use crate::block::chain::{read_stream, stream_len, write_stream, Chain};
use crate::device::{
    ActivateContext, ActivateError, PciIdentity, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1,
};

/// virtio device type of a network device.
pub const DEVICE_TYPE: u32 = 1;

/// Entries per queue.
pub const QUEUE_SIZE: u16 = 256;

/// Queue indices.
pub const RX_QUEUE: u16 = 0;
pub const TX_QUEUE: u16 = 1;

/// Largest Ethernet frame moved either way: 64 KiB of IP plus an Ethernet
/// header with a VLAN tag.
pub const MAX_FRAME_LEN: usize = 65550;
/// An Ethernet header.
pub const MIN_FRAME_LEN: usize = 14;

/// `struct virtio_net_hdr` with `num_buffers` (virtio 1.2 §5.1.6).
pub const HDR_LEN: usize = 12;
/// Offset of `num_buffers` in the header.
const HDR_NUM_BUFFERS: usize = 10;

/// How long the receive thread waits before rechecking for a stop.
const RX_POLL: Duration = Duration::from_millis(100);

/// Feature bits (virtio 1.2 §5.1.3).
pub mod feature {
    pub const MAC: u64 = 1 << 5;
    pub const STATUS: u64 = 1 << 16;
}

/// Device config space (virtio 1.2 §5.1.4).
pub mod cfg {
    pub const MAC: usize = 0;
    pub const STATUS: usize = 6;
    pub const LEN: usize = 8;
    /// `status` bit: the link is up.
    pub const S_LINK_UP: u16 = 1;
}

/// The host side of a network device.
pub trait NetBackend: Send {
    /// Sends one Ethernet frame (no virtio header).
    fn send(&mut self, frame: &[u8]) -> io::Result<()>;

    /// The receive side, for the device's receive thread; `None` once
    /// taken.
    fn take_receiver(&mut self) -> Option<Box<dyn NetReceiver>>;
}

/// The receive side of a backend.
pub trait NetReceiver: Send {
    /// Waits up to `timeout` for the next frame and copies it into `buf`
    /// (at least `MAX_FRAME_LEN + 1` bytes); returns its length, which is
    /// more than [`MAX_FRAME_LEN`] for a frame that did not fit. `Ok(None)`
    /// when none arrived in time; an error when the backend is gone.
    fn recv(&mut self, buf: &mut [u8], timeout: Duration) -> io::Result<Option<usize>>;
}

/// Waits until `fd` is readable or `timeout` passes.
pub(crate) fn wait_readable(fd: RawFd, timeout: Duration) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: `pfd` is a valid pollfd and we pass a count of exactly one.
    let r = unsafe { libc::poll(&mut pfd, 1, ms) };
    match r {
        -1 => {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(e)
            }
        }
        0 => Ok(false),
        // POLLHUP/POLLERR count as readable: the read reports them.
        _ => Ok(true),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// State the vCPU and the receive thread share.
struct RxShared {
    queue: Mutex<Queue>,
    /// Signalled when the driver kicks the receive queue or on stop.
    kicked: Condvar,
    stop: AtomicBool,
}

struct RxThread {
    shared: Arc<RxShared>,
    handle: JoinHandle<Box<dyn NetReceiver>>,
}

struct Active {
    memory: GuestMemory,
    tx: Queue,
    interrupt: Arc<dyn VirtioInterrupt>,
    rx: Option<RxThread>,
}

/// A virtio network device.
pub struct VirtioNet {
    mac: [u8; 6],
    backend: Box<dyn NetBackend>,
    /// The backend's receive side while no receive thread owns it.
    receiver: Option<Box<dyn NetReceiver>>,
    active: Option<Active>,
    tx_buf: Vec<u8>,
}

/// What happened to a frame offered to the receive queue.
#[derive(Debug, PartialEq, Eq)]
enum Delivery {
    Delivered,
    /// No buffer: keep the frame and wait for a kick.
    NoBuffer,
    /// A bad chain was consumed: try again with the same frame.
    Retry,
    /// The frame does not fit the buffer; it is dropped, the buffer kept.
    Dropped,
}

fn deliver(queue: &mut Queue, mem: &GuestMemory, frame: &[u8]) -> Delivery {
    let Some(dc) = queue.pop_descriptor_chain(mem) else {
        return Delivery::NoBuffer;
    };
    let chain = Chain::walk(dc, mem);
    if chain.head >= queue.size() {
        guest_error!("virtio-net: rx head {} out of range", chain.head);
        return Delivery::Retry;
    }
    if chain.fault.is_some() || !chain.readable.is_empty() {
        guest_error!("virtio-net: malformed rx chain: {:?}", chain.fault);
        if queue.add_used(mem, chain.head, 0).is_err() {
            return Delivery::NoBuffer;
        }
        return Delivery::Retry;
    }
    let total = HDR_LEN + frame.len();
    if stream_len(&chain.writable) < total as u64 {
        guest_error!(
            "virtio-net: {}-byte rx buffer too small for a {}-byte frame; frame dropped",
            stream_len(&chain.writable),
            frame.len()
        );
        queue.go_to_previous_position();
        return Delivery::Dropped;
    }
    let mut hdr = [0u8; HDR_LEN];
    hdr[HDR_NUM_BUFFERS..].copy_from_slice(&1u16.to_le_bytes());
    let ok = write_stream(mem, &chain.writable, 0, &hdr).is_ok()
        && write_stream(mem, &chain.writable, HDR_LEN as u64, frame).is_ok();
    // The walk checked every buffer is RAM, so this cannot fail short of
    // a bug; the chain still goes back.
    let len = if ok { total as u32 } else { 0 };
    if let Err(e) = queue.add_used(mem, chain.head, len) {
        guest_error!("virtio-net: cannot return rx chain: {e}");
        return Delivery::NoBuffer;
    }
    if ok {
        Delivery::Delivered
    } else {
        Delivery::Retry
    }
}

fn rx_loop(
    shared: Arc<RxShared>,
    mut receiver: Box<dyn NetReceiver>,
    memory: GuestMemory,
    interrupt: Arc<dyn VirtioInterrupt>,
) -> Box<dyn NetReceiver> {
    let mut buf = vec![0u8; MAX_FRAME_LEN + 1];
    let mut pending: Option<usize> = None;
    let mut owe_interrupt = false;
    let notify = |queue: &mut Queue| {
        if queue.needs_notification(&memory).unwrap_or(true) {
            interrupt.notify_queue(RX_QUEUE);
        }
    };
    while !shared.stop.load(Ordering::Acquire) {
        if pending.is_none() {
            // Batch: while frames keep coming, interrupt once at the end.
            let timeout = if owe_interrupt { Duration::ZERO } else { RX_POLL };
            match receiver.recv(&mut buf, timeout) {
                Ok(Some(n)) if (MIN_FRAME_LEN..=MAX_FRAME_LEN).contains(&n) => pending = Some(n),
                Ok(Some(n)) => {
                    tracing::warn!("virtio-net: dropping a {n}-byte frame from the backend");
                    continue;
                }
                Ok(None) => {
                    if owe_interrupt {
                        notify(&mut lock(&shared.queue));
                        owe_interrupt = false;
                    }
                    continue;
                }
                Err(e) => {
                    tracing::error!("virtio-net: backend receive failed, receive stopped: {e}");
                    if owe_interrupt {
                        notify(&mut lock(&shared.queue));
                    }
                    let mut q = lock(&shared.queue);
                    while !shared.stop.load(Ordering::Acquire) {
                        q = shared
                            .kicked
                            .wait_timeout(q, RX_POLL)
                            .unwrap_or_else(PoisonError::into_inner)
                            .0;
                    }
                    break;
                }
            }
        }
        let Some(n) = pending else { continue };
        let mut q = lock(&shared.queue);
        match deliver(&mut q, &memory, &buf[..n]) {
            Delivery::Delivered => {
                pending = None;
                owe_interrupt = true;
            }
            Delivery::Dropped => pending = None,
            Delivery::Retry => owe_interrupt = true,
            Delivery::NoBuffer => {
                if owe_interrupt {
                    notify(&mut q);
                    owe_interrupt = false;
                }
                drop(
                    shared
                        .kicked
                        .wait_timeout(q, RX_POLL)
                        .unwrap_or_else(PoisonError::into_inner),
                );
            }
        }
    }
    receiver
}

impl VirtioNet {
    pub fn new(mut backend: Box<dyn NetBackend>, mac: [u8; 6]) -> Self {
        let receiver = backend.take_receiver();
        Self {
            mac,
            backend,
            receiver,
            active: None,
            tx_buf: vec![0; HDR_LEN + MAX_FRAME_LEN],
        }
    }

    fn process_tx(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mem = &active.memory;
        let queue = &mut active.tx;
        if !queue.ready() {
            return;
        }
        let mut used_any = false;
        let mut budget = queue.size();
        while budget > 0 {
            let Some(dc) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            budget -= 1;
            let chain = Chain::walk(dc, mem);
            if chain.head >= queue.size() {
                guest_error!("virtio-net: tx head {} out of range", chain.head);
                continue;
            }
            let total = stream_len(&chain.readable);
            if chain.fault.is_some() {
                guest_error!("virtio-net: malformed tx chain: {:?}", chain.fault);
            } else if total < (HDR_LEN + MIN_FRAME_LEN) as u64
                || total > (HDR_LEN + MAX_FRAME_LEN) as u64
            {
                guest_error!("virtio-net: dropping a tx packet of {total} bytes");
            } else {
                let buf = &mut self.tx_buf[..total as usize];
                if read_stream(mem, &chain.readable, 0, buf).is_ok() {
                    if let Err(e) = self.backend.send(&buf[HDR_LEN..]) {
                        tracing::warn!("virtio-net: backend send failed: {e}");
                    }
                }
            }
            // Transmit buffers are only read: used length 0.
            if let Err(e) = queue.add_used(mem, chain.head, 0) {
                guest_error!("virtio-net: cannot return tx chain: {e}");
                break;
            }
            used_any = true;
        }
        if used_any && queue.needs_notification(mem).unwrap_or(true) {
            active.interrupt.notify_queue(TX_QUEUE);
        }
    }

    fn stop_rx(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        if let Some(rx) = active.rx.take() {
            rx.shared.stop.store(true, Ordering::Release);
            rx.shared.kicked.notify_all();
            match rx.handle.join() {
                Ok(receiver) => self.receiver = Some(receiver),
                Err(_) => tracing::error!("virtio-net: receive thread panicked"),
            }
        }
    }
}

impl Drop for VirtioNet {
    fn drop(&mut self) {
        self.stop_rx();
    }
}

impl VirtioDevice for VirtioNet {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; 2]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | feature::MAC | feature::STATUS
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut space = [0u8; cfg::LEN];
        space[cfg::MAC..cfg::MAC + 6].copy_from_slice(&self.mac);
        space[cfg::STATUS..cfg::STATUS + 2].copy_from_slice(&cfg::S_LINK_UP.to_le_bytes());
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = offset
                .checked_add(i as u64)
                .and_then(|at| usize::try_from(at).ok())
                .and_then(|at| space.get(at).copied())
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // virtio 1.x: the MAC is set by the device (changing it needs the
        // control queue, not offered).
        guest_error!(
            "virtio-net: write of {} bytes to read-only config at {offset:#x}",
            data.len()
        );
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.stop_rx();
        let mut queues = ctx.queues.into_iter();
        let (Some(rx), Some(tx)) = (queues.next(), queues.next()) else {
            return Err(ActivateError::MissingQueue(TX_QUEUE));
        };
        for (i, q) in [(RX_QUEUE, &rx), (TX_QUEUE, &tx)] {
            if !q.ready() {
                return Err(ActivateError::MissingQueue(i));
            }
            if !q.is_valid(&ctx.memory) {
                return Err(ActivateError::Other(format!(
                    "virtio-net: queue {i} is not inside guest RAM"
                )));
            }
        }
        let rx_thread = match self.receiver.take() {
            Some(receiver) => {
                let shared = Arc::new(RxShared {
                    queue: Mutex::new(rx),
                    kicked: Condvar::new(),
                    stop: AtomicBool::new(false),
                });
                let (s, mem, irq) = (shared.clone(), ctx.memory.clone(), ctx.interrupt.clone());
                let handle = std::thread::Builder::new()
                    .name("virtio-net-rx".into())
                    .spawn(move || rx_loop(s, receiver, mem, irq))
                    .map_err(|e| ActivateError::Other(format!("virtio-net: rx thread: {e}")))?;
                Some(RxThread { shared, handle })
            }
            None => {
                tracing::warn!("virtio-net: backend has no receive side; receive disabled");
                None
            }
        };
        self.active = Some(Active {
            memory: ctx.memory,
            tx,
            interrupt: ctx.interrupt,
            rx: rx_thread,
        });
        Ok(())
    }

    fn queue_notify(&mut self, queue: u16) {
        match queue {
            RX_QUEUE => {
                if let Some(rx) = self.active.as_ref().and_then(|a| a.rx.as_ref()) {
                    // Taking the lock orders the kick after a wait began.
                    drop(lock(&rx.shared.queue));
                    rx.shared.kicked.notify_all();
                }
            }
            TX_QUEUE => self.process_tx(),
            _ => guest_error!("virtio-net: notify for missing queue {queue}"),
        }
    }

    fn reset(&mut self) {
        self.stop_rx();
        self.active = None;
    }

    fn pci_identity(&self) -> PciIdentity {
        // Network controller, Ethernet.
        PciIdentity::standard(DEVICE_TYPE, 0x02_00_00)
    }
}
