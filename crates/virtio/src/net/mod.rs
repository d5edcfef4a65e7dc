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
//! Transmit runs on a thread of its own, started on activation and joined
//! on reset: a kick of the transmit queue only wakes it and returns, so the
//! vCPU goes back to the guest while the frames are copied out and sent
//! (the model of virtio-blk's I/O threads). Each wake-up is one pass over
//! the ring (at most the queue size of chains); kicks during a pass leave
//! one pending wake-up. A backend's `send` still never blocks: a frame the
//! backend cannot take now (a peer that does not read, or is gone) is
//! dropped and counted, as a NIC drops what its link cannot carry. The
//! count is logged when it reaches 1, 2, 4, 8, ..., so a dead peer costs a
//! few log lines, not one per frame. Reset waits for the pass in progress
//! (and a wake-up already pending), so no chain is touched afterwards.
//! A receive thread, started on activation and joined on reset, waits on the
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
//! [`unix::UnixDgramBackend`], on Linux [`tap::TapBackend`] and on macOS
//! `vmnet::VmnetBackend`.

pub mod framing;
pub mod passt;
#[cfg(target_os = "linux")]
pub mod tap;
pub mod unix;
#[cfg(target_os = "macos")]
pub mod vmnet;

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;
use vm_core::sync::lock;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_core::{guest_error, GuestRam};

use crate::block::chain::{
    pop_chain, read_stream, rings_in_ram, should_interrupt, stream_len, write_stream, Chain,
};
use crate::device::{
    ActivateContext, ActivateError, PciIdentity, QueuePosition, SavedDevice, VirtioDevice,
    VirtioInterrupt, VIRTIO_F_VERSION_1,
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

/// The transmit thread and the way to wake it.
struct TxThread {
    /// One slot: a wake-up already pending covers later kicks.
    wake: Option<SyncSender<()>>,
    /// The thread gives its queue back when it ends.
    handle: Option<JoinHandle<Queue>>,
}

impl TxThread {
    fn kick(&self) {
        if let Some(wake) = &self.wake {
            match wake.try_send(()) {
                Ok(()) | Err(TrySendError::Full(())) => {}
                Err(TrySendError::Disconnected(())) => {
                    guest_error!("virtio-net: the transmit thread is gone")
                }
            }
        }
    }

    /// Stops the thread after the pass in progress and a pending one, so
    /// every chain kicked before is sent; returns its queue.
    fn stop(&mut self) -> Option<Queue> {
        self.wake = None;
        match self.handle.take()?.join() {
            Ok(queue) => Some(queue),
            Err(_) => {
                tracing::error!("virtio-net: transmit thread panicked");
                None
            }
        }
    }
}

impl Drop for TxThread {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Active {
    memory: GuestRam,
    interrupt: Arc<dyn VirtioInterrupt>,
    tx: Option<TxThread>,
    /// The transmit queue while no thread has it (quiesced).
    tx_parked: Option<Queue>,
    rx: Option<RxThread>,
    /// The receive queue while no thread has it: quiesced, or a backend
    /// without a receive side.
    rx_parked: Option<Queue>,
}

/// What the device and its transmit thread share.
struct Tx {
    backend: Mutex<Box<dyn NetBackend>>,
    dropped: AtomicU64,
}

/// A virtio network device.
pub struct VirtioNet {
    mac: [u8; 6],
    /// The MAC was derived, not asked for: a restore takes the saved one,
    /// which the guest's driver already uses.
    mac_from_snapshot: bool,
    tx: Arc<Tx>,
    /// The backend's receive side while no receive thread owns it.
    receiver: Option<Box<dyn NetReceiver>>,
    active: Option<Active>,
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

fn deliver(queue: &mut Queue, mem: &GuestRam, frame: &[u8]) -> Delivery {
    let Some(dc) = pop_chain(queue, mem) else {
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
    memory: GuestRam,
    interrupt: Arc<dyn VirtioInterrupt>,
) -> Box<dyn NetReceiver> {
    let mut buf = vec![0u8; MAX_FRAME_LEN + 1];
    let mut pending: Option<usize> = None;
    let mut owe_interrupt = false;
    let notify = |queue: &mut Queue| {
        if should_interrupt(queue, &memory) {
            interrupt.notify_queue(RX_QUEUE);
        }
    };
    while !shared.stop.load(Ordering::Acquire) {
        if pending.is_none() {
            // Batch: while frames keep coming, interrupt once at the end.
            let timeout = if owe_interrupt {
                Duration::ZERO
            } else {
                RX_POLL
            };
            match receiver.recv(&mut buf, timeout) {
                Ok(Some(n)) if (MIN_FRAME_LEN..=MAX_FRAME_LEN).contains(&n) => pending = Some(n),
                Ok(Some(n)) => {
                    vm_core::log_limited!(
                        warn,
                        "virtio-net: dropping a {n}-byte frame from the backend"
                    );
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
                    // Once per activation, which the guest can repeat.
                    vm_core::log_limited!(
                        error,
                        "virtio-net: backend receive failed, receive stopped: {e}"
                    );
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

/// The transmit thread: one pass over the ring per wake-up, until the
/// device drops the sender (reset or quiesce); then the queue goes back.
fn tx_loop(
    woken: Receiver<()>,
    tx: Arc<Tx>,
    mut queue: Queue,
    memory: GuestRam,
    interrupt: Arc<dyn VirtioInterrupt>,
) -> Queue {
    let mut buf = vec![0u8; HDR_LEN + MAX_FRAME_LEN];
    while woken.recv().is_ok() {
        transmit(&tx, &mut queue, &memory, &mut buf, interrupt.as_ref());
    }
    queue
}

/// One pass: every chain available now (at most the queue size) is sent
/// and returned, then one notification if the driver wants it.
fn transmit(
    tx: &Tx,
    queue: &mut Queue,
    mem: &GuestRam,
    buf: &mut [u8],
    interrupt: &dyn VirtioInterrupt,
) {
    if !queue.ready() {
        return;
    }
    let mut backend = lock(&tx.backend);
    let mut used_any = false;
    let mut budget = queue.size();
    while budget > 0 {
        let Some(dc) = pop_chain(queue, mem) else {
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
            let packet = &mut buf[..total as usize];
            if read_stream(mem, &chain.readable, 0, packet).is_ok() {
                if let Err(e) = backend.send(&packet[HDR_LEN..]) {
                    let dropped = tx.dropped.fetch_add(1, Ordering::AcqRel) + 1;
                    if dropped.is_power_of_two() {
                        tracing::warn!(
                            "virtio-net: {dropped} transmitted frame(s) dropped so far: {e}"
                        );
                    }
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
    if used_any && should_interrupt(queue, mem) {
        interrupt.notify_queue(TX_QUEUE);
    }
}

impl VirtioNet {
    pub fn new(mut backend: Box<dyn NetBackend>, mac: [u8; 6]) -> Self {
        let receiver = backend.take_receiver();
        Self {
            mac,
            mac_from_snapshot: false,
            tx: Arc::new(Tx {
                backend: Mutex::new(backend),
                dropped: AtomicU64::new(0),
            }),
            receiver,
            active: None,
        }
    }

    /// Lets a restore replace `mac` with the one in the snapshot (`mac`
    /// was a default, not the user's choice).
    pub fn with_mac_from_snapshot(mut self) -> Self {
        self.mac_from_snapshot = true;
        self
    }

    /// Frames the backend refused so far (a full or dead peer).
    pub fn tx_dropped(&self) -> u64 {
        self.tx.dropped.load(Ordering::Acquire)
    }

    /// Stops both threads; the device keeps nothing of the activation.
    fn stop(&mut self) {
        self.stop_threads();
        self.active = None;
    }

    /// Stops both threads (transmit after what was kicked, receive after
    /// the frame it is delivering) and parks their queues; the backend's
    /// receive side comes back.
    fn stop_threads(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        if let Some(mut tx) = active.tx.take() {
            active.tx_parked = tx.stop();
        }
        if let Some(rx) = active.rx.take() {
            rx.shared.stop.store(true, Ordering::Release);
            rx.shared.kicked.notify_all();
            match rx.handle.join() {
                Ok(receiver) => self.receiver = Some(receiver),
                Err(_) => tracing::error!("virtio-net: receive thread panicked"),
            }
            // The thread is gone: the queue is the device's again.
            let parked = Queue::new(1).expect("1 is a valid queue size");
            active.rx_parked = Some(std::mem::replace(&mut *lock(&rx.shared.queue), parked));
        }
    }

    /// Hands the parked queues to new threads: transmit always, receive
    /// if the backend has a receive side.
    fn start_threads(&mut self) -> Result<(), ActivateError> {
        let Some(active) = self.active.as_mut() else {
            return Ok(());
        };
        if let Some(queue) = active.tx_parked.take() {
            let (wake, woken) = sync_channel(1);
            let (shared, mem, irq) = (
                self.tx.clone(),
                active.memory.clone(),
                active.interrupt.clone(),
            );
            // The thread logs where the starting thread does.
            let dispatch = tracing::dispatcher::get_default(|d| d.clone());
            let handle = std::thread::Builder::new()
                .name("virtio-net-tx".into())
                .spawn(move || {
                    tracing::dispatcher::with_default(&dispatch, || {
                        tx_loop(woken, shared, queue, mem, irq)
                    })
                })
                .map_err(|e| ActivateError::Other(format!("virtio-net: tx thread: {e}")))?;
            active.tx = Some(TxThread {
                wake: Some(wake),
                handle: Some(handle),
            });
        }
        let Some(receiver) = self.receiver.take() else {
            vm_core::log_limited!(
                warn,
                "virtio-net: backend has no receive side; receive disabled"
            );
            return Ok(());
        };
        let Some(queue) = active.rx_parked.take() else {
            self.receiver = Some(receiver);
            return Ok(());
        };
        let shared = Arc::new(RxShared {
            queue: Mutex::new(queue),
            kicked: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let (s, mem, irq) = (
            shared.clone(),
            active.memory.clone(),
            active.interrupt.clone(),
        );
        let handle = std::thread::Builder::new()
            .name("virtio-net-rx".into())
            .spawn(move || rx_loop(s, receiver, mem, irq))
            .map_err(|e| ActivateError::Other(format!("virtio-net: rx thread: {e}")))?;
        active.rx = Some(RxThread { shared, handle });
        Ok(())
    }
}

impl Drop for VirtioNet {
    fn drop(&mut self) {
        self.stop();
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
        self.stop();
        let mut queues = ctx.queues.into_iter();
        let (Some(rx), Some(tx)) = (queues.next(), queues.next()) else {
            return Err(ActivateError::MissingQueue(TX_QUEUE));
        };
        for (i, q) in [(RX_QUEUE, &rx), (TX_QUEUE, &tx)] {
            if !q.ready() {
                return Err(ActivateError::MissingQueue(i));
            }
            if !rings_in_ram(q, &ctx.memory) {
                return Err(ActivateError::Other(format!(
                    "virtio-net: queue {i} is not inside guest RAM"
                )));
            }
        }
        self.active = Some(Active {
            memory: ctx.memory,
            interrupt: ctx.interrupt,
            tx: None,
            tx_parked: Some(tx),
            rx: None,
            rx_parked: Some(rx),
        });
        if let Err(e) = self.start_threads() {
            // Whatever started is stopped again.
            self.stop();
            return Err(e);
        }
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
            TX_QUEUE => {
                if let Some(tx) = self.active.as_ref().and_then(|a| a.tx.as_ref()) {
                    tx.kick();
                }
            }
            _ => guest_error!("virtio-net: notify for missing queue {queue}"),
        }
    }

    fn reset(&mut self) {
        self.stop();
    }

    fn pci_identity(&self) -> PciIdentity {
        // Network controller, Ethernet.
        PciIdentity::standard(DEVICE_TYPE, 0x02_00_00)
    }

    /// Both queues run on threads of their own, which
    /// [`VirtioDevice::quiesce`] stops: transmit after sending every chain
    /// kicked before, receive after the frame it is placing. The backend
    /// comes from the command line (a restore opens it anew); the MAC the
    /// device showed is the device's own state. A frame the receive
    /// thread had read but could not place yet is dropped at the quiesce,
    /// as a NIC drops what arrives while it has no buffer.
    fn saves_state(&self) -> bool {
        true
    }

    /// Empty while the threads hold the queues (not quiesced).
    fn queue_positions(&self) -> Vec<QueuePosition> {
        let Some(active) = &self.active else {
            return Vec::new();
        };
        match (&active.rx, &active.rx_parked, &active.tx, &active.tx_parked) {
            (None, Some(rx), None, Some(tx)) => vec![QueuePosition::of(rx), QueuePosition::of(tx)],
            _ => Vec::new(),
        }
    }

    fn quiesce(&mut self) {
        self.stop_threads();
    }

    fn resume(&mut self) {
        if let Err(e) = self.start_threads() {
            tracing::error!("virtio-net: not restarted: {e}");
        }
    }

    fn save_device(&self) -> Option<SavedDevice> {
        Some(SavedDevice::Net { mac: self.mac })
    }

    /// A Linux driver reads the MAC once, at probe, and virtio has no way
    /// to make it read a new one; so without a `--mac` of its own a
    /// restored device shows the address the guest uses, and with one it
    /// shows the new address, which the guest takes when its driver next
    /// starts.
    fn restore_device(&mut self, _memory: &GuestRam, saved: &SavedDevice) -> Result<(), String> {
        let &SavedDevice::Net { mac } = saved else {
            return Err(format!("a virtio-net cannot take {saved:?}"));
        };
        if self.mac_from_snapshot {
            self.mac = mac;
        } else if mac != self.mac {
            tracing::info!(
                "virtio-net: the device now shows MAC {}; the restored guest uses {} until its driver starts again",
                vm_config::MacAddress(self.mac),
                vm_config::MacAddress(mac)
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::test_driver::{TestInterrupt, TestQueue};
    use std::sync::mpsc;
    use std::time::Instant;
    use vm_core::memory::{create_guest_memory, read_exact, write_all};

    const RAM: usize = 0x10_0000;
    const RXQ: u64 = 0x1000;
    const TXQ: u64 = 0x3000;
    const BUF: u64 = 0x1_0000;
    const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

    /// Records what is sent; receives what the test pushes.
    struct FakeBackend {
        sent: Arc<Mutex<Vec<Vec<u8>>>>,
        receiver: Option<Box<dyn NetReceiver>>,
    }

    struct FakeReceiver(mpsc::Receiver<Vec<u8>>);

    impl NetReceiver for FakeReceiver {
        fn recv(&mut self, buf: &mut [u8], timeout: Duration) -> io::Result<Option<usize>> {
            match self.0.recv_timeout(timeout) {
                Ok(frame) => {
                    let n = frame.len().min(buf.len());
                    buf[..n].copy_from_slice(&frame[..n]);
                    Ok(Some(frame.len().min(MAX_FRAME_LEN + 1)))
                }
                Err(mpsc::RecvTimeoutError::Timeout) => Ok(None),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    Err(io::Error::from(io::ErrorKind::UnexpectedEof))
                }
            }
        }
    }

    impl NetBackend for FakeBackend {
        fn send(&mut self, frame: &[u8]) -> io::Result<()> {
            self.sent.lock().unwrap().push(frame.to_vec());
            Ok(())
        }
        fn take_receiver(&mut self) -> Option<Box<dyn NetReceiver>> {
            self.receiver.take()
        }
    }

    struct Rig {
        mem: GuestRam,
        rxq: TestQueue,
        txq: TestQueue,
        dev: VirtioNet,
        irq: Arc<TestInterrupt>,
        sent: Arc<Mutex<Vec<Vec<u8>>>>,
        inject: mpsc::Sender<Vec<u8>>,
    }

    fn rig() -> Rig {
        let mem = create_guest_memory(&[(0, RAM)]).unwrap();
        let sent = Arc::new(Mutex::new(Vec::new()));
        let (inject, rx) = mpsc::channel();
        let backend = FakeBackend {
            sent: sent.clone(),
            receiver: Some(Box::new(FakeReceiver(rx))),
        };
        let mut dev = VirtioNet::new(Box::new(backend), MAC);
        let rxq = TestQueue::new(&mem, RXQ, 16);
        let txq = TestQueue::new(&mem, TXQ, 16);
        let irq = Arc::new(TestInterrupt::default());
        activate(&mut dev, &mem, &rxq, &txq, &irq);
        Rig {
            mem,
            rxq,
            txq,
            dev,
            irq,
            sent,
            inject,
        }
    }

    fn activate(
        dev: &mut VirtioNet,
        mem: &GuestRam,
        rxq: &TestQueue,
        txq: &TestQueue,
        irq: &Arc<TestInterrupt>,
    ) {
        dev.activate(ActivateContext {
            memory: mem.clone(),
            queues: vec![rxq.queue(), txq.queue()],
            acked_features: dev.features(),
            interrupt: irq.clone(),
        })
        .unwrap();
    }

    fn frame(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| seed.wrapping_add(i as u8)).collect()
    }

    fn wait_until(what: &str, f: impl Fn() -> bool) {
        let start = Instant::now();
        while !f() {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "timed out: {what}"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn guest(mem: &GuestRam, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        read_exact(mem, addr, &mut v).unwrap();
        v
    }

    #[test]
    fn identity_features_and_config() {
        let r = rig();
        assert_eq!(r.dev.device_type(), 1);
        assert_eq!(r.dev.features(), (1 << 32) | (1 << 5) | (1 << 16));
        assert_eq!(r.dev.queue_max_sizes().len(), 2);
        let mut c = [0xee; 10];
        r.dev.read_config(0, &mut c);
        assert_eq!(c, [0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 1, 0, 0, 0]);
        let mut b = [0xee; 2];
        r.dev.read_config(u64::MAX, &mut b);
        assert_eq!(b, [0, 0]);
        let id = r.dev.pci_identity();
        assert_eq!(
            (id.vendor, id.device, id.class_code),
            (0x1af4, 0x1041, 0x020000)
        );
    }

    #[test]
    fn tx_strips_header_and_returns_buffers() {
        let mut r = rig();
        let f = frame(60, 3);
        write_all(&r.mem, BUF, &[0xab; HDR_LEN]).unwrap();
        write_all(&r.mem, BUF + 0x100, &f).unwrap();
        r.txq
            .add_chain(&[(BUF, HDR_LEN as u32, false), (BUF + 0x100, 60, false)]);
        // Header and frame in one buffer.
        let mut packet = vec![0u8; HDR_LEN];
        packet.extend(frame(1514, 9));
        write_all(&r.mem, BUF + 0x1000, &packet).unwrap();
        r.txq
            .add_chain(&[(BUF + 0x1000, packet.len() as u32, false)]);
        r.dev.queue_notify(TX_QUEUE);
        wait_until("tx used", || r.txq.used_idx() == 2);
        wait_until("tx interrupt", || !r.irq.queues.lock().unwrap().is_empty());
        assert_eq!(*r.sent.lock().unwrap(), vec![f, frame(1514, 9)]);
        assert_eq!(r.txq.used_elem(0), (0, 0));
        assert_eq!(r.txq.used_elem(1), (2, 0));
        assert_eq!(*r.irq.queues.lock().unwrap(), vec![TX_QUEUE]);
    }

    /// A backend whose `send` waits until the test lets it go.
    struct GatedBackend {
        gate: mpsc::Receiver<()>,
        sent: Arc<Mutex<Vec<Vec<u8>>>>,
    }

    impl NetBackend for GatedBackend {
        fn send(&mut self, frame: &[u8]) -> io::Result<()> {
            let _ = self.gate.recv();
            self.sent.lock().unwrap().push(frame.to_vec());
            Ok(())
        }
        fn take_receiver(&mut self) -> Option<Box<dyn NetReceiver>> {
            None
        }
    }

    #[test]
    fn a_tx_kick_returns_before_the_frame_is_sent() {
        let (open, gate) = mpsc::channel();
        let sent = Arc::new(Mutex::new(Vec::new()));
        let backend = GatedBackend {
            gate,
            sent: sent.clone(),
        };
        // The kick comes back while the backend is still busy with the
        // frame: the vCPU does not wait for the host side of transmit.
        let mut rig = must_not_hang(move || {
            let mut rig = TxRig::new(Box::new(backend));
            let mut packet = vec![0u8; HDR_LEN];
            packet.extend(numbered_frame(0));
            write_all(&rig.mem, BUF, &packet).unwrap();
            rig.txq.add_chain(&[(BUF, packet.len() as u32, false)]);
            rig.dev.queue_notify(TX_QUEUE);
            rig
        });
        assert_eq!(rig.txq.used_idx(), 0, "not returned before it is sent");
        open.send(()).unwrap();
        wait_until("tx used", || rig.txq.used_idx() == 1);
        assert_eq!(*sent.lock().unwrap(), vec![numbered_frame(0)]);
        rig.dev.reset();
    }

    #[test]
    fn tx_drops_bad_packets_but_returns_them() {
        let mut r = rig();
        // Runt: header plus 13 bytes.
        r.txq.add_chain(&[(BUF, (HDR_LEN + 13) as u32, false)]);
        // Giant: header plus MAX_FRAME_LEN + 1.
        r.txq
            .add_chain(&[(BUF, (HDR_LEN + MAX_FRAME_LEN + 1) as u32, false)]);
        // Outside RAM, and a huge length.
        r.txq
            .add_chain(&[(BUF, 12, false), (0x1_0000_0000, 60, false)]);
        r.txq
            .add_chain(&[(BUF, 12, false), (BUF, u32::MAX - 100, false)]);
        // Only writable buffers.
        r.txq.add_chain(&[(BUF, 100, true)]);
        r.dev.queue_notify(TX_QUEUE);
        wait_until("tx used", || r.txq.used_idx() == 5);
        assert!(r.sent.lock().unwrap().is_empty());
        // The smallest and largest legal frames go through.
        r.txq
            .add_chain(&[(BUF, (HDR_LEN + MIN_FRAME_LEN) as u32, false)]);
        r.txq
            .add_chain(&[(BUF, (HDR_LEN + MAX_FRAME_LEN) as u32, false)]);
        r.dev.queue_notify(TX_QUEUE);
        wait_until("tx used", || r.txq.used_idx() == 7);
        let sent = r.sent.lock().unwrap();
        assert_eq!(sent.len(), 2);
        assert_eq!(
            (sent[0].len(), sent[1].len()),
            (MIN_FRAME_LEN, MAX_FRAME_LEN)
        );
    }

    #[test]
    fn rx_frame_lands_with_header() {
        let mut r = rig();
        guest(&r.mem, BUF, 1);
        write_all(&r.mem, BUF, &[0xcc; 1600]).unwrap();
        r.rxq.add_chain(&[(BUF, 1526, true)]);
        r.dev.queue_notify(RX_QUEUE);
        let f = frame(98, 1);
        r.inject.send(f.clone()).unwrap();
        wait_until("rx used", || r.rxq.used_idx() == 1);
        assert_eq!(r.rxq.used_elem(0), (0, (HDR_LEN + 98) as u32));
        let mut want_hdr = [0u8; HDR_LEN];
        want_hdr[10] = 1; // num_buffers
        assert_eq!(guest(&r.mem, BUF, HDR_LEN), want_hdr);
        assert_eq!(guest(&r.mem, BUF + HDR_LEN as u64, 98), f);
        assert_eq!(
            guest(&r.mem, BUF + 110, 1),
            [0xcc],
            "nothing past the frame"
        );
        wait_until("rx interrupt", || {
            r.irq.queues.lock().unwrap().contains(&RX_QUEUE)
        });
    }

    #[test]
    fn rx_waits_for_buffers_and_drops_what_cannot_fit() {
        let mut r = rig();
        // A frame arrives before any buffer.
        r.inject.send(frame(60, 1)).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(r.rxq.used_idx(), 0);
        // A 40-byte buffer split in two: too small for 12 + 60.
        r.rxq.add_chain(&[(BUF, 20, true), (BUF + 0x100, 20, true)]);
        r.dev.queue_notify(RX_QUEUE);
        // Runt and giant frames from the backend are dropped too.
        r.inject.send(frame(13, 0)).unwrap();
        r.inject.send(frame(MAX_FRAME_LEN + 1, 0)).unwrap();
        // 12 + 28 fits exactly, across both buffers.
        let f = frame(28, 7);
        r.inject.send(f.clone()).unwrap();
        wait_until("rx used", || r.rxq.used_idx() == 1);
        assert_eq!(r.rxq.used_elem(0), (0, 40));
        let mut got = guest(&r.mem, BUF + HDR_LEN as u64, 8);
        got.extend(guest(&r.mem, BUF + 0x100, 20));
        assert_eq!(got, f);
    }

    #[test]
    fn rx_skips_malformed_chains() {
        let mut r = rig();
        // Readable buffer, outside RAM, then a good one.
        r.rxq.add_chain(&[(BUF, 100, false)]);
        r.rxq.add_chain(&[(0x1_0000_0000, 100, true)]);
        r.rxq.add_chain(&[(BUF + 0x1000, 100, true)]);
        r.dev.queue_notify(RX_QUEUE);
        r.inject.send(frame(60, 2)).unwrap();
        wait_until("rx used", || r.rxq.used_idx() == 3);
        assert_eq!(r.rxq.used_elem(0), (0, 0));
        assert_eq!(r.rxq.used_elem(1), (1, 0));
        assert_eq!(r.rxq.used_elem(2), (2, 72));
        assert_eq!(guest(&r.mem, BUF + 0x1000 + 12, 60), frame(60, 2));
    }

    fn config_mac(dev: &VirtioNet) -> [u8; 6] {
        let mut mac = [0; 6];
        dev.read_config(cfg::MAC as u64, &mut mac);
        mac
    }

    #[test]
    fn a_restore_shows_the_guests_mac_unless_one_was_asked_for() {
        let saved_mac = [0x52, 0x54, 0, 0xaa, 0xbb, 0xcc];
        let saved = SavedDevice::Net { mac: saved_mac };
        let fake = || FakeBackend {
            sent: Arc::default(),
            receiver: None,
        };
        let mem = create_guest_memory(&[(0, RAM)]).unwrap();
        // A derived MAC gives way to the one the guest's driver read.
        let mut derived = VirtioNet::new(Box::new(fake()), MAC).with_mac_from_snapshot();
        derived.restore_device(&mem, &saved).unwrap();
        assert_eq!(config_mac(&derived), saved_mac);
        assert_eq!(derived.save_device(), Some(saved.clone()));
        // An asked-for MAC (a fork's --mac) stays.
        let mut given = VirtioNet::new(Box::new(fake()), MAC);
        given.restore_device(&mem, &saved).unwrap();
        assert_eq!(config_mac(&given), MAC);
    }

    #[test]
    fn quiesced_nothing_is_received_and_resumed_it_receives_on() {
        let mut r = rig();
        assert!(r.dev.queue_positions().is_empty(), "the thread has rx");
        r.rxq.add_chain(&[(BUF, 1526, true)]);
        r.rxq.add_chain(&[(BUF + 0x1000, 1526, true)]);
        r.dev.queue_notify(RX_QUEUE);
        r.inject.send(frame(60, 1)).unwrap();
        wait_until("rx used", || r.rxq.used_idx() == 1);
        r.txq.add_chain(&[(BUF + 0x2000, 100, false)]);
        r.dev.queue_notify(TX_QUEUE);
        r.dev.quiesce();
        let at = |avail, used| QueuePosition {
            next_avail: avail,
            next_used: used,
        };
        assert_eq!(r.dev.queue_positions(), [at(1, 1), at(1, 1)]);
        // A frame that arrives meanwhile waits in the backend.
        r.inject.send(frame(70, 2)).unwrap();
        assert_eq!(r.rxq.used_idx(), 1);
        r.dev.resume();
        wait_until("rx used after resume", || r.rxq.used_idx() == 2);
        assert_eq!(r.rxq.used_elem(1), (1, (HDR_LEN + 70) as u32));
        assert_eq!(guest(&r.mem, BUF + 0x1000 + 12, 70), frame(70, 2));
    }

    #[test]
    fn reset_stops_and_reactivation_resumes_receive() {
        let mut r = rig();
        r.dev.reset();
        r.dev.queue_notify(RX_QUEUE);
        r.dev.queue_notify(TX_QUEUE);
        r.dev.queue_notify(7);
        let rxq = TestQueue::new(&r.mem, RXQ, 16);
        let txq = TestQueue::new(&r.mem, TXQ, 16);
        r.rxq = rxq;
        r.txq = txq;
        activate(&mut r.dev, &r.mem, &r.rxq, &r.txq, &r.irq);
        r.rxq.add_chain(&[(BUF, 1526, true)]);
        r.inject.send(frame(64, 4)).unwrap();
        wait_until("rx after reset", || r.rxq.used_idx() == 1);
        // A missing queue refuses activation.
        r.dev.reset();
        let err = r.dev.activate(ActivateContext {
            memory: r.mem.clone(),
            queues: vec![r.rxq.queue()],
            acked_features: 0,
            interrupt: r.irq.clone(),
        });
        assert!(matches!(err, Err(ActivateError::MissingQueue(1))));
    }

    #[test]
    fn backend_gone_does_not_hang_reset() {
        let mut r = rig();
        let (dead, _) = mpsc::channel::<Vec<u8>>();
        r.inject = dead; // drops the only sender: the receiver sees EOF
        std::thread::sleep(Duration::from_millis(20));
        r.dev.reset();
    }

    /// A device on `backend` with a transmit queue the test fills.
    struct TxRig {
        mem: GuestRam,
        txq: TestQueue,
        dev: VirtioNet,
        sent: u32,
    }

    impl TxRig {
        fn new(backend: Box<dyn NetBackend>) -> Self {
            let mem = create_guest_memory(&[(0, RAM)]).unwrap();
            let mut dev = VirtioNet::new(backend, MAC);
            let rxq = TestQueue::new(&mem, RXQ, 16);
            let txq = TestQueue::new(&mem, TXQ, 16);
            activate(
                &mut dev,
                &mem,
                &rxq,
                &txq,
                &Arc::new(TestInterrupt::default()),
            );
            Self {
                mem,
                txq,
                dev,
                sent: 0,
            }
        }

        /// The guest transmits one numbered 1514-byte frame and waits
        /// for its buffer to come back before it reuses it.
        fn send_next(&mut self) {
            let at = BUF + 0x1000 * u64::from(self.sent % 8);
            let mut packet = vec![0u8; HDR_LEN];
            packet.extend(numbered_frame(self.sent));
            write_all(&self.mem, at, &packet).unwrap();
            self.txq.add_chain(&[(at, packet.len() as u32, false)]);
            self.dev.queue_notify(TX_QUEUE);
            self.sent += 1;
            let sent = self.sent as u16;
            wait_until("tx used", || self.txq.used_idx() == sent);
        }
    }

    fn numbered_frame(n: u32) -> Vec<u8> {
        let mut f = n.to_be_bytes().to_vec();
        f.extend(frame(1510, n as u8));
        f
    }

    /// Runs `f` on another thread; a send that blocks fails the test
    /// instead of hanging it (the limit is a safety net, not a measure).
    fn must_not_hang<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (done, result) = mpsc::channel();
        std::thread::spawn(move || done.send(f()).unwrap());
        result
            .recv_timeout(Duration::from_secs(120))
            .expect("transmit blocked on a peer that does not read")
    }

    const FRAMES: u32 = 2000;

    /// Held by the tests whose transmit threads hit the drop warning: one
    /// logging with no subscriber while another captures could leave the
    /// warning's callsite cached as uninteresting mid-capture.
    static DROP_WARNINGS: Mutex<()> = Mutex::new(());

    #[test]
    fn a_stream_peer_that_stops_reading_costs_dropped_frames_not_a_hung_vcpu() {
        let _serial = lock(&DROP_WARNINGS);
        let (ours, mut peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let backend = unix::UnixStreamBackend::from_stream(ours).unwrap();
        // The peer reads nothing while the guest sends 3 MB.
        let (mut rig, lines) = must_not_hang(move || {
            // Activated inside the capture: the transmit thread logs there.
            crate::log_capture::capture(|| {
                let mut rig = TxRig::new(Box::new(backend));
                for _ in 0..FRAMES {
                    rig.send_next();
                }
                rig
            })
        });
        assert_eq!(rig.txq.used_idx(), FRAMES as u16, "every frame returned");
        let dropped = rig.dev.tx_dropped();
        assert!(
            dropped > 0 && dropped < u64::from(FRAMES),
            "{dropped} dropped"
        );
        // Logged at 1, 2, 4, ... drops: a handful of lines, not one each.
        let drop_lines = lines.iter().filter(|l| l.contains("dropped")).count();
        assert!(drop_lines >= 1, "{lines:?}");
        assert!(
            drop_lines <= 1 + dropped.ilog2() as usize,
            "{drop_lines} lines for {dropped} drops"
        );

        // The peer starts reading: every frame it gets is whole, in order
        // (a frame cut by a full socket was finished, not garbled), and a
        // new frame still arrives intact after the drops.
        peer.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut decoder = framing::FrameDecoder::new();
        let mut buf = vec![0u8; MAX_FRAME_LEN];
        let mut got = Vec::new();
        rig.send_next();
        while got.last() != Some(&(rig.sent - 1)) {
            if let Some(n) = decoder.next_frame(&mut buf) {
                let seq = u32::from_be_bytes(buf[..4].try_into().unwrap());
                assert_eq!(buf[..n], numbered_frame(seq), "frame {seq} intact");
                got.push(seq);
                continue;
            }
            // Everything sent was received or dropped: the last frame was
            // dropped while the socket was still full; send another.
            if got.len() as u64 + rig.dev.tx_dropped() >= u64::from(rig.sent) {
                rig.send_next();
            }
            match decoder.fill_from(&mut peer) {
                Ok(0) => panic!("the stream ended"),
                Ok(_) => {}
                Err(e) => panic!("reading the stream: {e}"),
            }
        }
        assert!(got.windows(2).all(|w| w[0] < w[1]), "in order");
        assert_eq!(decoder.dropped(), 0);
    }

    #[test]
    fn a_datagram_peer_that_is_full_or_gone_costs_dropped_frames_not_a_hung_vcpu() {
        let _serial = lock(&DROP_WARNINGS);
        let (ours, peer) = std::os::unix::net::UnixDatagram::pair().unwrap();
        let backend = unix::UnixDgramBackend::from_socket(ours).unwrap();
        let (mut rig, peer) = must_not_hang(move || {
            let mut rig = TxRig::new(Box::new(backend));
            for _ in 0..FRAMES {
                rig.send_next();
            }
            (rig, peer)
        });
        assert_eq!(rig.txq.used_idx(), FRAMES as u16);
        let full = rig.dev.tx_dropped();
        assert!(full > 0 && full < u64::from(FRAMES), "{full} dropped");
        let mut buf = vec![0u8; MAX_FRAME_LEN];
        let n = peer.recv(&mut buf).unwrap();
        assert_eq!(buf[..n], numbered_frame(0), "the first frames went out");
        // The peer goes away: every frame is dropped, none blocks.
        drop(peer);
        let mut rig = must_not_hang(move || {
            for _ in 0..100 {
                rig.send_next();
            }
            rig
        });
        assert_eq!(rig.dev.tx_dropped(), full + 100);
        rig.dev.reset();
    }
}
