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
            io::Error::new(e.kind(), format!("cannot connect to {}: {e}", path.display()))
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
            io::Error::new(e.kind(), format!("cannot connect to {}: {e}", peer.display()))
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
