//! Unix-socket network backends.
//!
//! * [`UnixStreamBackend`]: a connected stream socket carrying frames with
//!   a 4-byte big-endian length prefix ([`super::framing`]), the protocol of
//!   QEMU's `-netdev stream` and of passt.
//! * [`UnixDgramBackend`]: a datagram socket, one frame per datagram (as
//!   QEMU's `-netdev dgram` and vde-style switches use).
//!
//! The receive side is a duplicate of the socket.
//!
//! # Never blocking the vCPU
//!
//! Frames are sent from the vCPU thread, so both sockets are nonblocking:
//! when the peer does not read (or is gone) a frame is refused with an
//! error, which the device counts as a drop, as a NIC drops frames its
//! link cannot take. On a stream a frame must still reach the peer whole,
//! or every later one would be misread: when the socket takes only part of
//! one, the rest waits in a one-frame buffer and goes out first, from the
//! next send or from the receive thread once the socket has room; until it
//! has, new frames are dropped.

use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vm_core::sync::lock;

use super::framing::{self, FrameDecoder};
use super::{wait_readable, NetBackend, NetReceiver};

/// Frames over a unix stream socket, length-prefixed.
pub struct UnixStreamBackend {
    stream: UnixStream,
    receiver: Option<Box<dyn NetReceiver>>,
    tail: Arc<Mutex<Tail>>,
}

/// The unsent rest of a frame the socket took only part of.
#[derive(Default)]
struct Tail {
    bytes: Vec<u8>,
    sent: usize,
}

impl Tail {
    fn is_empty(&self) -> bool {
        self.sent == self.bytes.len()
    }

    /// Writes what the socket takes without blocking; `Ok(true)` once
    /// nothing is left.
    fn push(&mut self, mut stream: &UnixStream) -> io::Result<bool> {
        while !self.is_empty() {
            match stream.write(&self.bytes[self.sent..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => {
                    // The stream is broken; nothing more of it can go out.
                    self.sent = self.bytes.len();
                    return Err(e);
                }
            }
        }
        Ok(true)
    }
}

/// The error for a frame dropped because the peer is not reading.
fn peer_full() -> io::Error {
    io::Error::new(
        io::ErrorKind::WouldBlock,
        "the peer is not reading; frame dropped",
    )
}

impl UnixStreamBackend {
    /// Connects to a listening socket at `path`.
    pub fn connect(path: &Path) -> io::Result<Self> {
        let stream = UnixStream::connect(path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot connect to {}: {e}", path.display()),
            )
        })?;
        Self::from_stream(stream)
    }

    /// Uses an already connected stream (one end of a socketpair, say).
    pub fn from_stream(stream: UnixStream) -> io::Result<Self> {
        // Also makes the duplicate nonblocking: both share one open file.
        stream.set_nonblocking(true)?;
        let reader = stream.try_clone()?;
        let tail = Arc::new(Mutex::new(Tail::default()));
        Ok(Self {
            stream,
            receiver: Some(Box::new(StreamReceiver {
                stream: reader,
                decoder: FrameDecoder::new(),
                tail: tail.clone(),
            })),
            tail,
        })
    }
}

impl NetBackend for UnixStreamBackend {
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        let mut tail = lock(&self.tail);
        if !tail.push(&self.stream)? {
            return Err(peer_full());
        }
        // One write per frame where the socket has room, so a peer never
        // sees a prefix without its frame because of how we split writes.
        framing::encode(frame, &mut tail.bytes)?;
        tail.sent = 0;
        match tail.push(&self.stream) {
            Ok(true) => Ok(()),
            // Part of it went: the rest follows before anything else.
            Ok(false) if tail.sent > 0 => Ok(()),
            Ok(false) => {
                tail.sent = tail.bytes.len();
                Err(peer_full())
            }
            Err(e) => Err(e),
        }
    }

    fn take_receiver(&mut self) -> Option<Box<dyn NetReceiver>> {
        self.receiver.take()
    }
}

struct StreamReceiver {
    stream: UnixStream,
    decoder: FrameDecoder,
    /// Shared with the sender: the receive thread finishes a partly sent
    /// frame when the socket has room again.
    tail: Arc<Mutex<Tail>>,
}

impl StreamReceiver {
    /// Sends what is left of a partly sent frame; `true` if some is still
    /// waiting for room.
    fn push_tail(&self) -> bool {
        let mut tail = lock(&self.tail);
        // An error is the sender's to report, with its next frame.
        !matches!(tail.push(&self.stream), Ok(true) | Err(_))
    }
}

impl NetReceiver for StreamReceiver {
    fn recv(&mut self, buf: &mut [u8], timeout: Duration) -> io::Result<Option<usize>> {
        if let Some(n) = self.decoder.next_frame(buf) {
            return Ok(Some(n));
        }
        let waiting = self.push_tail();
        let (readable, writable) = wait(self.stream.as_raw_fd(), waiting, timeout)?;
        if writable {
            self.push_tail();
        }
        if !readable {
            return Ok(None);
        }
        match self.decoder.fill_from(&mut self.stream) {
            Ok(0) => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the network backend closed its socket",
            )),
            Ok(_) => Ok(self.decoder.next_frame(buf)),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}

/// Waits until `fd` is readable or, if `for_write`, writable, or `timeout`
/// passes; returns `(readable, writable)`.
fn wait(fd: RawFd, for_write: bool, timeout: Duration) -> io::Result<(bool, bool)> {
    if !for_write {
        return Ok((wait_readable(fd, timeout)?, false));
    }
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN | libc::POLLOUT,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: `pfd` is a valid pollfd and we pass a count of exactly one.
    match unsafe { libc::poll(&mut pfd, 1, ms) } {
        -1 => {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                Ok((false, false))
            } else {
                Err(e)
            }
        }
        0 => Ok((false, false)),
        // POLLHUP/POLLERR count as readable: the read reports them.
        _ => Ok((
            pfd.revents & !libc::POLLOUT != 0,
            pfd.revents & libc::POLLOUT != 0,
        )),
    }
}

/// One frame per datagram over a unix datagram socket.
pub struct UnixDgramBackend {
    socket: UnixDatagram,
    receiver: Option<Box<dyn NetReceiver>>,
}

impl UnixDgramBackend {
    /// Binds `local` (the peer sends its frames there) and sends to `peer`.
    pub fn bind_connect(local: &Path, peer: &Path) -> io::Result<Self> {
        let socket = UnixDatagram::bind(local).map_err(|e| {
            io::Error::new(e.kind(), format!("cannot bind {}: {e}", local.display()))
        })?;
        socket.connect(peer).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot connect to {}: {e}", peer.display()),
            )
        })?;
        Self::from_socket(socket)
    }

    /// Uses an already connected socket (one end of a socketpair, say).
    pub fn from_socket(socket: UnixDatagram) -> io::Result<Self> {
        // A full or missing peer refuses the datagram instead of blocking.
        socket.set_nonblocking(true)?;
        let reader = socket.try_clone()?;
        Ok(Self {
            socket,
            receiver: Some(Box::new(DgramReceiver { socket: reader })),
        })
    }
}

impl NetBackend for UnixDgramBackend {
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        self.socket.send(frame).map(|_| ())
    }

    fn take_receiver(&mut self) -> Option<Box<dyn NetReceiver>> {
        self.receiver.take()
    }
}

struct DgramReceiver {
    socket: UnixDatagram,
}

impl NetReceiver for DgramReceiver {
    fn recv(&mut self, buf: &mut [u8], timeout: Duration) -> io::Result<Option<usize>> {
        if !wait_readable(self.socket.as_raw_fd(), timeout)? {
            return Ok(None);
        }
        // A datagram longer than `buf` is truncated to `buf.len()`, which
        // is more than MAX_FRAME_LEN, so the device still sees it as too
        // long and drops it.
        match self.socket.recv(buf) {
            Ok(n) => Ok(Some(n)),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::MAX_FRAME_LEN;
    use std::io::Read;

    const WAIT: Duration = Duration::from_secs(5);

    fn frame(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| seed.wrapping_add(i as u8)).collect()
    }

    #[test]
    fn stream_socketpair_both_directions() {
        let (ours, mut peer) = UnixStream::pair().unwrap();
        let mut backend = UnixStreamBackend::from_stream(ours).unwrap();
        let mut rx = backend.take_receiver().unwrap();
        assert!(backend.take_receiver().is_none(), "taken once");

        backend.send(&frame(60, 1)).unwrap();
        let mut got = vec![0u8; 64];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(got[..4], [0, 0, 0, 60]);
        assert_eq!(got[4..], frame(60, 1));

        let mut buf = vec![0u8; MAX_FRAME_LEN + 1];
        assert_eq!(rx.recv(&mut buf, Duration::ZERO).unwrap(), None);
        // The peer writes a frame in pieces, then two frames at once.
        let mut wire = Vec::new();
        framing::encode(&frame(100, 2), &mut wire).unwrap();
        peer.write_all(&wire[..3]).unwrap();
        assert_eq!(rx.recv(&mut buf, Duration::from_millis(20)).unwrap(), None);
        peer.write_all(&wire[3..50]).unwrap();
        assert_eq!(rx.recv(&mut buf, Duration::from_millis(20)).unwrap(), None);
        peer.write_all(&wire[50..]).unwrap();
        assert_eq!(rx.recv(&mut buf, WAIT).unwrap(), Some(100));
        assert_eq!(buf[..100], frame(100, 2));
        let mut two = Vec::new();
        framing::encode(&frame(14, 3), &mut wire).unwrap();
        two.extend_from_slice(&wire);
        framing::encode(&frame(1514, 4), &mut wire).unwrap();
        two.extend_from_slice(&wire);
        peer.write_all(&two).unwrap();
        let mut frames = Vec::new();
        while frames.len() < 2 {
            if let Some(n) = rx.recv(&mut buf, WAIT).unwrap() {
                frames.push(buf[..n].to_vec());
            }
        }
        assert_eq!(frames, vec![frame(14, 3), frame(1514, 4)]);
        // The peer going away is an error, not a hang or an empty frame.
        drop(peer);
        let err = loop {
            match rx.recv(&mut buf, WAIT) {
                Ok(None) => continue,
                Ok(Some(n)) => panic!("unexpected {n}-byte frame"),
                Err(e) => break e,
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn a_full_stream_drops_whole_frames_and_finishes_a_cut_one_first() {
        let (ours, mut peer) = UnixStream::pair().unwrap();
        let mut backend = UnixStreamBackend::from_stream(ours).unwrap();
        let mut rx = backend.take_receiver().unwrap();
        // Frames of 60000 bytes overflow the socket within a few sends;
        // none of these calls may block.
        let mut accepted = Vec::new();
        let mut dropped = 0;
        for i in 0..64u8 {
            match backend.send(&frame(60000, i)) {
                Ok(()) => accepted.push(i),
                Err(e) => {
                    assert_eq!(e.kind(), io::ErrorKind::WouldBlock, "{e}");
                    dropped += 1;
                }
            }
        }
        assert!(dropped > 0 && !accepted.is_empty());
        // The peer reads; the receive side alone (no further send) finishes
        // any frame the socket took only in part. Every accepted frame
        // arrives whole and in order, and nothing else does.
        peer.set_nonblocking(true).unwrap();
        let mut decoder = FrameDecoder::new();
        let mut buf = vec![0u8; MAX_FRAME_LEN + 1];
        let mut got = Vec::new();
        let mut idle = 0;
        while got.len() < accepted.len() {
            assert!(idle < 500, "got {} of {} frames", got.len(), accepted.len());
            if let Some(n) = decoder.next_frame(&mut buf) {
                assert_eq!(n, 60000);
                got.push(buf[0]);
                assert_eq!(buf[..n], frame(60000, buf[0]), "frame {} intact", buf[0]);
                continue;
            }
            match decoder.fill_from(&mut peer) {
                Ok(0) => panic!("stream ended"),
                Ok(_) => idle = 0,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    idle += 1;
                    assert_eq!(rx.recv(&mut buf, Duration::from_millis(10)).unwrap(), None);
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(got, accepted);
        assert!(matches!(
            decoder.fill_from(&mut peer),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock
        ));
        // The stream is in step: the next frame goes through as usual.
        backend.send(&frame(100, 7)).unwrap();
        peer.set_nonblocking(false).unwrap();
        let mut wire = [0u8; 104];
        peer.read_exact(&mut wire).unwrap();
        assert_eq!(wire[..4], [0, 0, 0, 100]);
        assert_eq!(wire[4..], frame(100, 7));
    }

    #[test]
    fn stream_connect_to_path() {
        let dir = std::env::temp_dir().join(format!("virtio-net-us-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let mut backend = UnixStreamBackend::connect(&path).unwrap();
        let (mut peer, _) = listener.accept().unwrap();
        backend.send(&frame(20, 0)).unwrap();
        let mut got = [0u8; 24];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(got[..4], [0, 0, 0, 20]);
        std::fs::remove_dir_all(&dir).unwrap();
        let err = UnixStreamBackend::connect(&dir.join("sock")).err().unwrap();
        assert!(err.to_string().contains("cannot connect"), "{err}");
    }

    #[test]
    fn dgram_one_frame_per_datagram() {
        let (ours, peer) = UnixDatagram::pair().unwrap();
        let mut backend = UnixDgramBackend::from_socket(ours).unwrap();
        let mut rx = backend.take_receiver().unwrap();
        backend.send(&frame(60, 5)).unwrap();
        let mut got = vec![0u8; 100];
        assert_eq!(peer.recv(&mut got).unwrap(), 60);
        assert_eq!(got[..60], frame(60, 5));

        let mut buf = vec![0u8; MAX_FRAME_LEN + 1];
        peer.send(&frame(42, 6)).unwrap();
        peer.send(&frame(43, 7)).unwrap();
        assert_eq!(rx.recv(&mut buf, WAIT).unwrap(), Some(42));
        assert_eq!(buf[..42], frame(42, 6));
        assert_eq!(rx.recv(&mut buf, WAIT).unwrap(), Some(43));
        assert_eq!(rx.recv(&mut buf, Duration::ZERO).unwrap(), None);
    }

    #[test]
    fn dgram_bind_connect_paths() {
        let dir = std::env::temp_dir().join(format!("virtio-net-ud-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (local, remote) = (dir.join("vm"), dir.join("switch"));
        let switch = UnixDatagram::bind(&remote).unwrap();
        let mut backend = UnixDgramBackend::bind_connect(&local, &remote).unwrap();
        let mut rx = backend.take_receiver().unwrap();
        backend.send(&frame(30, 1)).unwrap();
        let mut got = [0u8; 64];
        let (n, from) = switch.recv_from(&mut got).unwrap();
        assert_eq!(n, 30);
        switch
            .send_to(&frame(31, 2), from.as_pathname().unwrap())
            .unwrap();
        let mut buf = vec![0u8; MAX_FRAME_LEN + 1];
        assert_eq!(rx.recv(&mut buf, WAIT).unwrap(), Some(31));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
