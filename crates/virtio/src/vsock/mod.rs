//! virtio-vsock (virtio 1.2 §5.10): stream sockets between the guest and
//! the host, with the host's end on Unix sockets.
//!
//! - The host connects to guest port P by connecting to the device's
//!   socket and writing `CONNECT P\n`; once the guest accepts, vmapple
//!   answers `OK <host port>\n` and the socket carries the stream. If the
//!   guest refuses, the socket is closed.
//! - A guest connection to host port P is connected to the Unix socket
//!   `<path>_P`; if nobody listens there, the guest's connection is reset.
//!
//! # Flow control and hostile guests
//!
//! Each connection advertises [`BUF_ALLOC`] bytes of receive buffer; what
//! the guest sends beyond it (ignoring credit) resets the connection. Bytes
//! for the host socket wait only in that buffer, written as the socket
//! takes them, never blocking. Towards the guest, a connection is read only
//! while the guest's credit allows and only into buffers the guest gave
//! on the receive queue; control replies the guest gives no room for are
//! bounded and then dropped. Malformed packets are logged and answered
//! with a reset or dropped. One worker thread, woken by kicks and by the
//! host sockets through `poll`, does all this: the vCPU only wakes it.

pub mod packet;

use std::collections::{HashMap, VecDeque};
use std::io::{self, ErrorKind, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_core::{guest_error, GuestRam};

use crate::block::chain::{
    pop_chain, read_stream, rings_in_ram, should_interrupt, stream_len, write_stream, Chain,
};
use crate::device::{
    ActivateContext, ActivateError, PciIdentity, QueuePosition, VirtioDevice, VirtioInterrupt,
    VIRTIO_F_VERSION_1,
};
use packet::{op, Header, HDR_LEN, HOST_CID, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};

/// virtio device type of a socket device.
pub const DEVICE_TYPE: u32 = 19;
/// Entries per queue.
pub const QUEUE_SIZE: u16 = 256;
pub const RX_QUEUE: u16 = 0;
pub const TX_QUEUE: u16 = 1;
pub const EVENT_QUEUE: u16 = 2;
/// `struct virtio_vsock_event`'s id: the guest must reset every
/// connection (virtio 1.2 §5.10.6.7).
pub const EVENT_TRANSPORT_RESET: u32 = 0;
/// Receive buffer each connection advertises to the guest.
pub const BUF_ALLOC: u32 = 256 << 10;
/// Largest payload of one packet from the guest.
pub const MAX_PAYLOAD: u32 = 64 << 10;
/// Connections at once; more are reset.
pub const MAX_CONNECTIONS: usize = 1024;
/// Host clients that have not said `CONNECT P` yet.
const MAX_HANDSHAKES: usize = 64;
/// How long a host client has to say it.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Control packets waiting for receive buffers; more are dropped.
const MAX_CONTROL: usize = 4096;
/// Host ports vmapple gives host-initiated connections start here, clear
/// of the ports guest connections name.
const FIRST_HOST_PORT: u32 = 0x4000_0000;

/// Where this process starts numbering host ports: a restored guest may
/// still hold connections from the process that saved it until it has
/// handled the transport reset, so each process starts at its own place
/// (by process id) in the host range.
fn first_host_port() -> u32 {
    FIRST_HOST_PORT + ((std::process::id() & 0x3_ffff) << 12)
}
/// Most bytes read from a host socket at once towards the guest.
const CHUNK: usize = 64 << 10;
const POLL: Duration = Duration::from_millis(100);

/// The device's socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("{}: in use by another program (a running VM?)", .0.display())]
    InUse(PathBuf),
    #[error("{}: exists and is not a socket", .0.display())]
    NotSocket(PathBuf),
    #[error("{}", .path.display())]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("guest CID {0} is reserved: give 3 or more")]
    Cid(u64),
}

/// Binds `path`, replacing a stale socket nobody serves.
fn bind(path: &Path) -> Result<UnixListener, VsockError> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(VsockError::NotSocket(path.to_owned()));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(VsockError::InUse(path.to_owned()));
        }
        let _ = std::fs::remove_file(path);
    }
    let l = UnixListener::bind(path).map_err(|source| VsockError::Bind {
        path: path.to_owned(),
        source,
    })?;
    l.set_nonblocking(true).map_err(|source| VsockError::Bind {
        path: path.to_owned(),
        source,
    })?;
    Ok(l)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Host-initiated, REQUEST sent, waiting for the guest.
    Connecting,
    Connected,
}

struct Conn {
    stream: UnixStream,
    state: State,
    /// The `OK <port>` line of a host-initiated connection, written
    /// before any guest byte and never counted as one.
    greeting: Vec<u8>,
    /// Guest bytes not yet taken by the host socket (at most BUF_ALLOC).
    to_host: VecDeque<u8>,
    /// Bytes given to the host socket (wrapping, as the spec counts).
    fwd_cnt: u32,
    fwd_reported: u32,
    /// Host bytes read but not yet in a guest buffer.
    to_guest: Vec<u8>,
    tx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    host_eof: bool,
    guest_shut_send: bool,
    /// The guest closed both ways: reset once `to_host` is written.
    closing: bool,
}

impl Conn {
    fn new(stream: UnixStream, state: State) -> Self {
        Conn {
            stream,
            state,
            greeting: Vec::new(),
            to_host: VecDeque::new(),
            fwd_cnt: 0,
            fwd_reported: 0,
            to_guest: Vec::new(),
            tx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            host_eof: false,
            guest_shut_send: false,
            closing: false,
        }
    }

    /// Bytes the guest can still take.
    fn peer_credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn wants_host_data(&self) -> bool {
        self.state == State::Connected
            && !self.host_eof
            && !self.closing
            && self.to_guest.is_empty()
            && self.peer_credit() > 0
    }
}

/// (host port, guest port)
type Key = (u32, u32);

struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
    since: Instant,
}

struct Engine {
    cid: u64,
    path: PathBuf,
    listener: UnixListener,
    wake: UnixStream,
    stop: Arc<AtomicBool>,
    mem: GuestRam,
    rx: Queue,
    tx: Queue,
    interrupt: Arc<dyn VirtioInterrupt>,
    conns: HashMap<Key, Conn>,
    handshakes: Vec<Handshake>,
    control: VecDeque<Header>,
    next_port: u32,
    buf: Vec<u8>,
    /// After a restore's transport reset: where the event queue's
    /// available index is and its value when the reset was written. The
    /// guest puts a new event buffer there once it has reset its
    /// connections; host clients wait until then, so a new connection
    /// is not reset with the old ones.
    reset_ack: Arc<Mutex<Option<(u64, u16)>>>,
}

impl Engine {
    /// Whether the guest has yet to handle a transport reset.
    fn awaiting_reset_ack(&self) -> bool {
        let mut ack = vm_core::sync::lock(&self.reset_ack);
        let Some((at, seen)) = *ack else {
            return false;
        };
        let mut idx = [0u8; 2];
        match vm_core::memory::read_exact(&self.mem, at, &mut idx) {
            Ok(()) if u16::from_le_bytes(idx) == seen => true,
            // A new buffer (or a ring no longer in RAM: nothing to wait
            // for).
            _ => {
                *ack = None;
                false
            }
        }
    }

    fn header(&self, key: Key, op: u16, conn: Option<&mut Conn>) -> Header {
        let mut h = Header {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: key.0,
            dst_port: key.1,
            typ: TYPE_STREAM,
            op,
            buf_alloc: BUF_ALLOC,
            ..Header::default()
        };
        if let Some(c) = conn {
            h.fwd_cnt = c.fwd_cnt;
            c.fwd_reported = c.fwd_cnt;
        }
        h
    }

    fn send_control(&mut self, h: Header) {
        if self.control.len() >= MAX_CONTROL {
            vm_core::log_limited!(
                warn,
                "virtio-vsock: the guest takes no control packets; dropping"
            );
            return;
        }
        self.control.push_back(h);
    }

    fn reset(&mut self, key: Key) {
        self.conns.remove(&key);
        let h = self.header(key, op::RST, None);
        self.send_control(h);
    }

    fn run(mut self) -> Self {
        while !self.stop.load(Ordering::Acquire) {
            self.wait();
            self.drain_wake();
            self.accept();
            self.handshake();
            self.process_tx();
            self.flush_to_host();
            self.read_host();
            self.fill_rx();
        }
        self
    }

    fn wait(&mut self) {
        let mut fds = vec![
            libc::pollfd {
                fd: self.wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        for h in &self.handshakes {
            fds.push(libc::pollfd {
                fd: h.stream.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        for c in self.conns.values() {
            let mut events = 0;
            if c.wants_host_data() {
                events |= libc::POLLIN;
            }
            if !c.to_host.is_empty() || !c.greeting.is_empty() {
                events |= libc::POLLOUT;
            }
            if events != 0 {
                fds.push(libc::pollfd {
                    fd: c.stream.as_raw_fd(),
                    events,
                    revents: 0,
                });
            }
        }
        // SAFETY: `fds` is a valid array of pollfd of the length passed.
        unsafe {
            libc::poll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                POLL.as_millis() as i32,
            )
        };
    }

    fn drain_wake(&mut self) {
        let mut b = [0u8; 64];
        while matches!((&self.wake).read(&mut b), Ok(n) if n > 0) {}
    }

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.handshakes.len() >= MAX_HANDSHAKES
                        || stream.set_nonblocking(true).is_err()
                    {
                        vm_core::log_limited!(warn, "virtio-vsock: too many host clients waiting to connect; one was dropped");
                        continue;
                    }
                    self.handshakes.push(Handshake {
                        stream,
                        line: Vec::new(),
                        since: Instant::now(),
                    });
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => {
                    vm_core::log_limited!(
                        warn,
                        "virtio-vsock: accept on {}: {e}",
                        self.path.display()
                    );
                    break;
                }
            }
        }
    }

    /// Reads `CONNECT P\n` from waiting host clients, one byte at a time
    /// so nothing of the stream after the line is taken.
    fn handshake(&mut self) {
        if self.awaiting_reset_ack() {
            return;
        }
        let mut i = 0;
        while i < self.handshakes.len() {
            let h = &mut self.handshakes[i];
            let mut byte = [0u8; 1];
            let mut done = None;
            loop {
                match h.stream.read(&mut byte) {
                    Ok(1) if byte[0] == b'\n' => {
                        done = Some(parse_connect(&h.line));
                        break;
                    }
                    Ok(1) if h.line.len() < 32 => h.line.push(byte[0]),
                    Ok(_) => {
                        done = Some(None);
                        break;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(_) => {
                        done = Some(None);
                        break;
                    }
                }
            }
            if done.is_none() && h.since.elapsed() > HANDSHAKE_TIMEOUT {
                done = Some(None);
            }
            let Some(port) = done else {
                i += 1;
                continue;
            };
            let h = self.handshakes.swap_remove(i);
            let Some(port) = port else {
                let _ = (&h.stream).write_all(b"ERROR expected CONNECT PORT\n");
                continue;
            };
            if self.conns.len() >= MAX_CONNECTIONS {
                let _ = (&h.stream).write_all(b"ERROR too many connections\n");
                continue;
            }
            let key = (self.free_port(port), port);
            self.conns
                .insert(key, Conn::new(h.stream, State::Connecting));
            let req = self.header(key, op::REQUEST, None);
            self.send_control(req);
        }
    }

    fn free_port(&mut self, guest_port: u32) -> u32 {
        loop {
            let p = self.next_port;
            self.next_port = self.next_port.checked_add(1).unwrap_or(FIRST_HOST_PORT);
            if !self.conns.contains_key(&(p, guest_port)) {
                return p;
            }
        }
    }

    fn process_tx(&mut self) {
        let mut used = false;
        for _ in 0..self.tx.size() {
            let Some(dc) = pop_chain(&mut self.tx, &self.mem) else {
                break;
            };
            let chain = Chain::walk(dc, &self.mem);
            let len = stream_len(&chain.readable);
            let mut hdr = [0u8; HDR_LEN];
            let ok = chain.fault.is_none()
                && chain.head < self.tx.size()
                && read_stream(&self.mem, &chain.readable, 0, &mut hdr).ok() == Some(HDR_LEN);
            let packet = ok.then(|| Header::parse(&hdr)).flatten();
            match packet {
                Some(h) if h.len <= MAX_PAYLOAD && u64::from(h.len) <= len - HDR_LEN as u64 => {
                    self.buf.resize(h.len as usize, 0);
                    let mut payload = std::mem::take(&mut self.buf);
                    if read_stream(&self.mem, &chain.readable, HDR_LEN as u64, &mut payload).is_ok()
                    {
                        self.packet(h, &payload);
                    }
                    self.buf = payload;
                }
                Some(h) => {
                    guest_error!(
                        "virtio-vsock: packet claims {} payload bytes, chain has {}",
                        h.len,
                        len
                    );
                    if h.op != op::RST {
                        self.reset((h.dst_port, h.src_port));
                    }
                }
                None => guest_error!("virtio-vsock: malformed tx chain ({len} bytes)"),
            }
            if chain.head < self.tx.size() {
                if let Err(e) = self.tx.add_used(&self.mem, chain.head, 0) {
                    guest_error!("virtio-vsock: cannot return a tx chain: {e}");
                    break;
                }
                used = true;
            }
        }
        if used && should_interrupt(&mut self.tx, &self.mem) {
            self.interrupt.notify_queue(TX_QUEUE);
        }
    }

    fn packet(&mut self, h: Header, payload: &[u8]) {
        let key = (h.dst_port, h.src_port);
        tracing::trace!(target: "vsock", "guest: op {} {}->{} len {} credit {}/{}", h.op, h.src_port, h.dst_port, h.len, h.fwd_cnt, h.buf_alloc);
        if h.src_cid != self.cid || h.dst_cid != HOST_CID {
            guest_error!(
                "virtio-vsock: packet from CID {} to CID {}",
                h.src_cid,
                h.dst_cid
            );
            return;
        }
        if h.typ != TYPE_STREAM {
            if h.op != op::RST {
                self.reset(key);
            }
            return;
        }
        if let Some(c) = self.conns.get_mut(&key) {
            c.peer_buf_alloc = h.buf_alloc;
            c.peer_fwd_cnt = h.fwd_cnt;
        }
        match h.op {
            op::REQUEST => {
                if self.conns.contains_key(&key) || self.conns.len() >= MAX_CONNECTIONS {
                    self.reset(key);
                    return;
                }
                let target = PathBuf::from(format!("{}_{}", self.path.display(), h.dst_port));
                match UnixStream::connect(&target).and_then(|s| s.set_nonblocking(true).map(|()| s))
                {
                    Ok(stream) => {
                        let mut c = Conn::new(stream, State::Connected);
                        c.peer_buf_alloc = h.buf_alloc;
                        c.peer_fwd_cnt = h.fwd_cnt;
                        let resp = self.header(key, op::RESPONSE, Some(&mut c));
                        self.conns.insert(key, c);
                        self.send_control(resp);
                    }
                    Err(_) => self.reset(key),
                }
            }
            op::RESPONSE => match self.conns.get_mut(&key) {
                Some(c) if c.state == State::Connecting => {
                    c.state = State::Connected;
                    c.greeting = format!("OK {}\n", key.0).into_bytes();
                }
                _ => self.reset(key),
            },
            op::RW => {
                let Some(c) = self.conns.get_mut(&key) else {
                    self.reset(key);
                    return;
                };
                if c.state != State::Connected
                    || c.to_host.len() + payload.len() > BUF_ALLOC as usize + 64
                {
                    guest_error!("virtio-vsock: guest port {} sent past its credit", key.1);
                    self.reset(key);
                    return;
                }
                c.to_host.extend(payload);
            }
            op::CREDIT_UPDATE => {}
            op::CREDIT_REQUEST => {
                if let Some(mut c) = self.conns.remove(&key) {
                    let h = self.header(key, op::CREDIT_UPDATE, Some(&mut c));
                    self.conns.insert(key, c);
                    self.send_control(h);
                }
            }
            op::SHUTDOWN => {
                if let Some(c) = self.conns.get_mut(&key) {
                    if h.flags & SHUTDOWN_SEND != 0 {
                        c.guest_shut_send = true;
                    }
                    if h.flags & (SHUTDOWN_SEND | SHUTDOWN_RCV) == SHUTDOWN_SEND | SHUTDOWN_RCV {
                        c.closing = true;
                    }
                }
            }
            op::RST => {
                self.conns.remove(&key);
            }
            other => {
                guest_error!("virtio-vsock: unknown op {other}");
                self.reset(key);
            }
        }
    }

    /// Writes waiting guest bytes to the host sockets; finishes shutdowns.
    fn flush_to_host(&mut self) {
        let mut resets = Vec::new();
        let mut updates = Vec::new();
        for (&key, c) in &mut self.conns {
            while !c.greeting.is_empty() {
                match (&c.stream).write(&c.greeting) {
                    Ok(0) => break,
                    Ok(n) => drop(c.greeting.drain(..n)),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(_) => {
                        resets.push(key);
                        break;
                    }
                }
            }
            while c.greeting.is_empty() && !c.to_host.is_empty() {
                let (a, _) = c.to_host.as_slices();
                match (&c.stream).write(a) {
                    Ok(0) => break,
                    Ok(n) => {
                        c.to_host.drain(..n);
                        c.fwd_cnt = c.fwd_cnt.wrapping_add(n as u32);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(_) => {
                        resets.push(key);
                        break;
                    }
                }
            }
            if !c.to_host.is_empty() || !c.greeting.is_empty() {
                continue;
            }
            if c.closing || (c.guest_shut_send && c.host_eof) {
                resets.push(key);
            } else if c.guest_shut_send {
                let _ = c.stream.shutdown(std::net::Shutdown::Write);
            } else if c.fwd_cnt.wrapping_sub(c.fwd_reported) >= BUF_ALLOC / 4 {
                updates.push(key);
            }
        }
        for key in resets {
            self.reset(key);
        }
        for key in updates {
            if let Some(mut c) = self.conns.remove(&key) {
                let h = self.header(key, op::CREDIT_UPDATE, Some(&mut c));
                self.conns.insert(key, c);
                self.send_control(h);
            }
        }
    }

    /// Reads host bytes the guest has credit for.
    fn read_host(&mut self) {
        let mut eofs = Vec::new();
        let mut resets = Vec::new();
        let mut chunk = vec![0u8; CHUNK];
        for (&key, c) in &mut self.conns {
            if !c.wants_host_data() {
                continue;
            }
            let want = (c.peer_credit() as usize).min(CHUNK);
            match (&c.stream).read(&mut chunk[..want]) {
                Ok(0) => {
                    c.host_eof = true;
                    eofs.push(key);
                }
                Ok(n) => c.to_guest.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
                Err(_) => resets.push(key),
            }
        }
        for key in resets {
            self.reset(key);
        }
        for key in eofs {
            if let Some(mut c) = self.conns.remove(&key) {
                let mut h = self.header(key, op::SHUTDOWN, Some(&mut c));
                h.flags = SHUTDOWN_SEND;
                let done = c.guest_shut_send && c.to_host.is_empty();
                self.conns.insert(key, c);
                self.send_control(h);
                if done {
                    self.reset(key);
                }
            }
        }
    }

    /// Puts one packet into the next receive chain; false when the guest
    /// gave none (or a bad one, which is returned empty).
    fn deliver(&mut self, h: &Header, payload: &[u8]) -> bool {
        let Some(dc) = pop_chain(&mut self.rx, &self.mem) else {
            return false;
        };
        tracing::trace!(target: "vsock", "host: op {} {}->{} len {}", h.op, h.src_port, h.dst_port, h.len);
        let chain = Chain::walk(dc, &self.mem);
        if chain.head >= self.rx.size() {
            guest_error!("virtio-vsock: rx head {} out of range", chain.head);
            return false;
        }
        let room = stream_len(&chain.writable);
        let mut written = 0;
        if chain.fault.is_some() || room < (HDR_LEN + payload.len()) as u64 {
            guest_error!("virtio-vsock: unusable rx chain ({room} bytes)");
        } else if write_stream(&self.mem, &chain.writable, 0, &h.encode()).is_ok()
            && write_stream(&self.mem, &chain.writable, HDR_LEN as u64, payload).is_ok()
        {
            written = (HDR_LEN + payload.len()) as u32;
        }
        if let Err(e) = self.rx.add_used(&self.mem, chain.head, written) {
            guest_error!("virtio-vsock: cannot return an rx chain: {e}");
            return false;
        }
        written != 0
    }

    /// Room for payload in the next receive chain, without taking it.
    fn next_rx_room(&mut self) -> Option<u64> {
        let dc = pop_chain(&mut self.rx, &self.mem)?;
        let room = Chain::walk(dc, &self.mem)
            .writable
            .iter()
            .map(|s| u64::from(s.len))
            .sum();
        self.rx.go_to_previous_position();
        Some(room)
    }

    fn fill_rx(&mut self) {
        let mut used = false;
        while let Some(h) = self.control.front().copied() {
            if !self.deliver(&h, &[]) {
                if self.next_rx_room().is_none() {
                    break;
                }
                continue;
            }
            self.control.pop_front();
            used = true;
        }
        let keys: Vec<Key> = self
            .conns
            .iter()
            .filter(|(_, c)| !c.to_guest.is_empty())
            .map(|(k, _)| *k)
            .collect();
        'conns: for key in keys {
            loop {
                let Some(room) = self.next_rx_room() else {
                    break 'conns;
                };
                let Some(mut c) = self.conns.remove(&key) else {
                    continue 'conns;
                };
                let n = (room.saturating_sub(HDR_LEN as u64) as usize)
                    .min(c.to_guest.len())
                    .min(c.peer_credit() as usize);
                if n == 0 {
                    self.conns.insert(key, c);
                    if room < HDR_LEN as u64 + 1 {
                        // Useless buffer: return it empty.
                        let _ = self.deliver(&Header::default(), &[0; 0]);
                        continue;
                    }
                    continue 'conns;
                }
                let mut h = self.header(key, op::RW, Some(&mut c));
                h.len = n as u32;
                let payload: Vec<u8> = c.to_guest.drain(..n).collect();
                c.tx_cnt = c.tx_cnt.wrapping_add(n as u32);
                let empty = c.to_guest.is_empty();
                self.conns.insert(key, c);
                if self.deliver(&h, &payload) {
                    used = true;
                }
                if empty {
                    continue 'conns;
                }
            }
        }
        if used && should_interrupt(&mut self.rx, &self.mem) {
            self.interrupt.notify_queue(RX_QUEUE);
        }
    }
}

/// `CONNECT P` (without the newline) as a port.
fn parse_connect(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line).ok()?;
    text.strip_prefix("CONNECT ")?
        .trim_end_matches('\r')
        .parse()
        .ok()
}

struct Worker {
    stop: Arc<AtomicBool>,
    wake: UnixStream,
    handle: JoinHandle<Engine>,
}

impl Worker {
    /// Runs `engine` on its thread; `stop` and `wake` are the ends the
    /// engine does not hold.
    fn spawn(engine: Engine, stop: Arc<AtomicBool>, wake: UnixStream) -> io::Result<Self> {
        let handle = std::thread::Builder::new()
            .name("virtio-vsock".into())
            .spawn(move || engine.run())?;
        Ok(Self { stop, wake, handle })
    }

    /// Stops the thread after its round; returns its engine and the ends
    /// to start it again with.
    fn join(self) -> Option<(Engine, Arc<AtomicBool>, UnixStream)> {
        self.stop.store(true, Ordering::Release);
        let _ = (&self.wake).write(&[1]);
        match self.handle.join() {
            Ok(engine) => Some((engine, self.stop, self.wake)),
            Err(_) => {
                tracing::error!("virtio-vsock: worker panicked");
                None
            }
        }
    }
}

/// The event queue, which the device writes only after a restore.
struct Events {
    queue: Queue,
    mem: GuestRam,
    interrupt: Arc<dyn VirtioInterrupt>,
    /// Shared with the engine ([`Engine::reset_ack`]).
    reset_ack: Arc<Mutex<Option<(u64, u16)>>>,
}

/// A virtio-vsock device with its host side on Unix sockets.
pub struct VirtioVsock {
    cid: u64,
    path: PathBuf,
    listener: Option<UnixListener>,
    worker: Option<Worker>,
    /// The worker's engine, connections and all, while quiesced.
    parked: Option<(Engine, Arc<AtomicBool>, UnixStream)>,
    events: Option<Events>,
}

impl VirtioVsock {
    /// Listens on `path` for host clients; the guest gets context id
    /// `cid`.
    pub fn new(path: PathBuf, cid: u64) -> Result<Self, VsockError> {
        if cid < 3 || cid >= u64::from(u32::MAX) {
            return Err(VsockError::Cid(cid));
        }
        let listener = bind(&path)?;
        Ok(Self {
            cid,
            path,
            listener: Some(listener),
            worker: None,
            parked: None,
            events: None,
        })
    }

    /// Stops the worker and drops its connections (host clients see their
    /// sockets close); the listener stays.
    fn stop(&mut self) {
        let parked = self.worker.take().and_then(Worker::join);
        if let Some((engine, _, _)) = parked.or_else(|| self.parked.take()) {
            self.listener = Some(engine.listener);
        }
        self.events = None;
    }

    /// Tells the guest its connections are gone (a restore: the host
    /// sockets behind them were not saved): a transport reset event in
    /// the next event buffer.
    fn transport_reset(&mut self) {
        let Some(ev) = self.events.as_mut() else {
            return;
        };
        let Some(dc) = pop_chain(&mut ev.queue, &ev.mem) else {
            guest_error!("virtio-vsock: no event buffer for the transport reset");
            return;
        };
        let chain = Chain::walk(dc, &ev.mem);
        if chain.head >= ev.queue.size() {
            guest_error!("virtio-vsock: event head {} out of range", chain.head);
            return;
        }
        let event = EVENT_TRANSPORT_RESET.to_le_bytes();
        let written = if chain.fault.is_none()
            && write_stream(&ev.mem, &chain.writable, 0, &event).is_ok_and(|n| n == event.len())
        {
            event.len() as u32
        } else {
            guest_error!("virtio-vsock: unusable event buffer");
            0
        };
        if let Err(e) = ev.queue.add_used(&ev.mem, chain.head, written) {
            guest_error!("virtio-vsock: cannot return an event buffer: {e}");
            return;
        }
        let at = ev.queue.avail_ring().wrapping_add(2);
        if let Ok(seen) = ev.queue.avail_idx(&ev.mem, Ordering::Acquire) {
            *vm_core::sync::lock(&ev.reset_ack) = Some((at, seen.0));
        }
        if should_interrupt(&mut ev.queue, &ev.mem) {
            ev.interrupt.notify_queue(EVENT_QUEUE);
        }
    }
}

impl Drop for VirtioVsock {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_file(&self.path);
    }
}

impl VirtioDevice for VirtioVsock {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; 3]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let cfg = self.cid.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|at| cfg.get(at))
                .copied()
                .unwrap_or(0);
        }
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.stop();
        let mut queues = ctx.queues.into_iter();
        let (Some(rx), Some(tx), Some(event)) = (queues.next(), queues.next(), queues.next())
        else {
            return Err(ActivateError::MissingQueue(TX_QUEUE));
        };
        for (i, q) in [(RX_QUEUE, &rx), (TX_QUEUE, &tx)] {
            if !q.ready() {
                return Err(ActivateError::MissingQueue(i));
            }
            if !rings_in_ram(q, &ctx.memory) {
                return Err(ActivateError::Other(format!(
                    "queue {i}'s rings are not in RAM"
                )));
            }
        }
        let listener = self
            .listener
            .take()
            .ok_or_else(|| ActivateError::Other("the socket was lost".into()))?;
        let (wake_tx, wake_rx) =
            UnixStream::pair().map_err(|e| ActivateError::Other(e.to_string()))?;
        for s in [&wake_tx, &wake_rx] {
            s.set_nonblocking(true)
                .map_err(|e| ActivateError::Other(e.to_string()))?;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let reset_ack = Arc::new(Mutex::new(None));
        let engine = Engine {
            cid: self.cid,
            path: self.path.clone(),
            listener,
            wake: wake_rx,
            stop: stop.clone(),
            mem: ctx.memory.clone(),
            rx,
            tx,
            interrupt: ctx.interrupt.clone(),
            conns: HashMap::new(),
            handshakes: Vec::new(),
            control: VecDeque::new(),
            next_port: first_host_port(),
            buf: Vec::new(),
            reset_ack: reset_ack.clone(),
        };
        let _ = wake_tx.as_fd();
        let worker = Worker::spawn(engine, stop, wake_tx)
            .map_err(|e| ActivateError::Other(format!("cannot start the worker: {e}")))?;
        self.worker = Some(worker);
        self.events = event.ready().then_some(Events {
            queue: event,
            mem: ctx.memory,
            interrupt: ctx.interrupt,
            reset_ack,
        });
        Ok(())
    }

    fn queue_notify(&mut self, _queue: u16) {
        if let Some(w) = &self.worker {
            // A full pipe already holds a wakeup.
            let _ = (&w.wake).write(&[1]);
        }
    }

    fn reset(&mut self) {
        // Connections die with the device; host clients see their
        // sockets close.
        self.stop();
    }

    fn pci_identity(&self) -> PciIdentity {
        // Class: communication controller, other.
        PciIdentity::standard(DEVICE_TYPE, 0x07_8000)
    }

    /// The worker is quiesced between two rounds (no chain half taken);
    /// the queues' positions are all a snapshot keeps. Connections are
    /// host sockets and are not saved: a restored device starts without
    /// any and tells the guest so ([`VirtioDevice::restored`]).
    fn saves_state(&self) -> bool {
        true
    }

    /// Empty while the worker holds the queues (not quiesced).
    fn queue_positions(&self) -> Vec<QueuePosition> {
        match (&self.parked, &self.events) {
            (Some((engine, _, _)), events) => vec![
                QueuePosition::of(&engine.rx),
                QueuePosition::of(&engine.tx),
                events
                    .as_ref()
                    .map_or_else(QueuePosition::default, |e| QueuePosition::of(&e.queue)),
            ],
            (None, _) => Vec::new(),
        }
    }

    fn quiesce(&mut self) {
        self.parked = self.worker.take().and_then(Worker::join);
    }

    fn resume(&mut self) {
        let Some((engine, stop, wake)) = self.parked.take() else {
            return;
        };
        stop.store(false, Ordering::Release);
        match Worker::spawn(engine, stop, wake) {
            Ok(worker) => self.worker = Some(worker),
            Err(e) => tracing::error!("virtio-vsock: worker not restarted: {e}"),
        }
    }

    fn restored(&mut self) {
        self.transport_reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 5000"), Some(5000));
        assert_eq!(parse_connect(b"CONNECT 5000\r"), Some(5000));
        assert_eq!(parse_connect(b"CONNECT -1"), None);
        assert_eq!(parse_connect(b"connect 1"), None);
        assert_eq!(parse_connect(&[0xff; 20]), None);
    }

    #[test]
    fn a_socket_in_use_is_refused_and_a_stale_one_replaced() {
        let dir = std::env::temp_dir().join(format!("vmapple-vsock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("v.sock");
        let _ = std::fs::remove_file(&path);
        let a = VirtioVsock::new(path.clone(), 3).unwrap();
        let e = VirtioVsock::new(path.clone(), 3).err().unwrap().to_string();
        assert!(e.contains("in use"), "{e}");
        drop(a);
        // A socket left behind by a killed VMM.
        drop(UnixListener::bind(&path).unwrap());
        assert!(VirtioVsock::new(path.clone(), 3).is_ok());
        std::fs::write(&path, "x").unwrap();
        let e = VirtioVsock::new(path.clone(), 3).err().unwrap().to_string();
        assert!(e.contains("not a socket"), "{e}");
        assert!(VirtioVsock::new(dir.join("w.sock"), 2).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn quiesced_the_worker_gives_its_queues_back_and_a_restore_resets_the_transport() {
        use crate::block::test_driver::{TestInterrupt, TestQueue};
        use vm_core::memory::{create_guest_memory, read_exact};
        let dir = std::env::temp_dir().join(format!("vmapple-vsockq-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("v.sock");
        let _ = std::fs::remove_file(&path);
        let mem = create_guest_memory(&[(0, 0x10_0000)]).unwrap();
        let mut rxq = TestQueue::new(&mem, 0x1000, 16);
        let txq = TestQueue::new(&mem, 0x2000, 16);
        let mut evq = TestQueue::new(&mem, 0x3000, 16);
        let irq = Arc::new(TestInterrupt::default());
        let mut dev = VirtioVsock::new(path.clone(), 3).unwrap();
        dev.activate(ActivateContext {
            memory: mem.clone(),
            queues: vec![rxq.queue(), txq.queue(), evq.queue()],
            acked_features: VIRTIO_F_VERSION_1,
            interrupt: irq.clone(),
        })
        .unwrap();
        assert!(dev.queue_positions().is_empty(), "the worker has them");
        // A host client asks for guest port 5: the worker sends the
        // guest a REQUEST through a receive buffer.
        rxq.add_chain(&[(0x1_0000, 256, true)]);
        dev.queue_notify(RX_QUEUE);
        let mut client = UnixStream::connect(&path).unwrap();
        client.write_all(b"CONNECT 5\n").unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while rxq.used_idx() != 1 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(rxq.used_idx(), 1);
        dev.quiesce();
        let at = |avail, used| QueuePosition {
            next_avail: avail,
            next_used: used,
        };
        assert_eq!(
            dev.queue_positions(),
            [at(1, 1), at(0, 0), at(0, 0)],
            "the REQUEST taken and returned"
        );
        dev.resume();
        // As after a restore: the guest learns its connections are gone.
        evq.add_chain(&[(0x2_0000, 4, true)]);
        write_all_u32(&mem, 0x2_0000, 0xffff_ffff);
        dev.restored();
        assert_eq!(evq.used_idx(), 1);
        assert_eq!(evq.used_elem(0), (0, 4));
        let mut id = [0u8; 4];
        read_exact(&mem, 0x2_0000, &mut id).unwrap();
        assert_eq!(u32::from_le_bytes(id), EVENT_TRANSPORT_RESET);
        assert!(irq.queues.lock().unwrap().contains(&EVENT_QUEUE));
        // A host client waits until the guest has handled the reset: it
        // gives the event buffer back.
        rxq.add_chain(&[(0x1_1000, 256, true)]);
        dev.queue_notify(RX_QUEUE);
        let mut second = UnixStream::connect(&path).unwrap();
        second.write_all(b"CONNECT 6\n").unwrap();
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(rxq.used_idx(), 1, "no REQUEST before the guest's reset");
        evq.add_chain(&[(0x2_0000, 4, true)]);
        dev.queue_notify(EVENT_QUEUE);
        let deadline = Instant::now() + Duration::from_secs(30);
        while rxq.used_idx() != 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(rxq.used_idx(), 2, "the REQUEST once the guest is ready");
        drop(dev);
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn write_all_u32(mem: &GuestRam, addr: u64, v: u32) {
        vm_core::memory::write_all(mem, addr, &v.to_le_bytes()).unwrap();
    }
}
