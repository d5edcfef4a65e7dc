//! Unix-socket network backends.
//!
//! * [`UnixStreamBackend`]: a connected stream socket carrying frames with
//!   a 4-byte big-endian length prefix ([`super::framing`]), the protocol of
//!   QEMU's `-netdev stream` and of passt.
//! * [`UnixDgramBackend`]: a datagram socket, one frame per datagram (as
//!   QEMU's `-netdev dgram` and vde-style switches use).
//!
//! The receive side is a duplicate of the socket, so a transmit blocked on
//! a full socket never holds up receiving.

use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::Path;
use std::time::Duration;

use super::framing::{self, FrameDecoder};
use super::{wait_readable, NetBackend, NetReceiver};

/// Frames over a unix stream socket, length-prefixed.
pub struct UnixStreamBackend {
    stream: UnixStream,
    receiver: Option<Box<dyn NetReceiver>>,
    scratch: Vec<u8>,
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
        let reader = stream.try_clone()?;
        Ok(Self {
            stream,
            receiver: Some(Box::new(StreamReceiver {
                stream: reader,
                decoder: FrameDecoder::new(),
            })),
            scratch: Vec::new(),
        })
    }
}

impl NetBackend for UnixStreamBackend {
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        // One write per frame, so a peer never sees a prefix without its
        // frame because of how we split writes.
        framing::encode(frame, &mut self.scratch)?;
        self.stream.write_all(&self.scratch)
    }

    fn take_receiver(&mut self) -> Option<Box<dyn NetReceiver>> {
        self.receiver.take()
    }
}

struct StreamReceiver {
    stream: UnixStream,
    decoder: FrameDecoder,
}

impl NetReceiver for StreamReceiver {
    fn recv(&mut self, buf: &mut [u8], timeout: Duration) -> io::Result<Option<usize>> {
        if let Some(n) = self.decoder.next_frame(buf) {
            return Ok(Some(n));
        }
        if !wait_readable(self.stream.as_raw_fd(), timeout)? {
            return Ok(None);
        }
        // Readable: this single read does not block.
        match self.decoder.fill_from(&mut self.stream) {
            Ok(0) => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the network backend closed its socket",
            )),
            Ok(_) => Ok(self.decoder.next_frame(buf)),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(None),
            Err(e) => Err(e),
        }
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
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(None),
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
