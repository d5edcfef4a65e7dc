//! `unix:PATH`: the console on a listening unix socket.
//!
//! * The socket is created owner-only (0600) before it starts listening,
//!   so there is no moment in which another local user could connect.
//! * A file already at PATH is replaced only if it is a socket nobody is
//!   listening on (a leftover from a VMM that died); anything else is an
//!   error. The socket is removed again when the backend shuts down, if it
//!   is still the one this process created.
//! * One client at a time. Another client that connects meanwhile is told
//!   the console is busy and disconnected.
//! * Output never blocks the guest: it is written without blocking, and
//!   what the client does not take at once, or what the guest prints while
//!   no client is connected, waits in a backlog of the most recent
//!   [`BACKLOG_LIMIT`] bytes (older bytes are dropped) that is sent when the
//!   client can take it. A client that connects late therefore sees the
//!   recent boot log.

use std::collections::VecDeque;
use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vm_core::sync::lock;

use super::input::InputQueue;
use super::wake::{Poll, Waker, READABLE, WRITABLE};
use super::SerialError;
use crate::pl011::SerialOutput;

/// Output bytes kept for a client that is absent or slow.
pub const BACKLOG_LIMIT: usize = 64 * 1024;

const BUSY_MESSAGE: &[u8] = b"vmapple: the serial console already has a client\r\n";

/// The socket file this process created; removed on drop if still ours.
#[derive(Debug)]
pub(crate) struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        // Someone may have replaced it since; leave anything else alone.
        if let Ok(meta) = fs::symlink_metadata(&self.path) {
            if meta.file_type().is_socket() && meta.dev() == self.dev && meta.ino() == self.ino {
                let _ = fs::remove_file(&self.path);
            }
        }
    }
}

/// Creates the listening socket at `path`, mode 0600.
pub(crate) fn listen(path: &Path) -> Result<(UnixListener, SocketFile), SerialError> {
    let fail = |source: io::Error| SerialError::Unix {
        path: path.to_owned(),
        source,
    };
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(SerialError::SocketInUse {
                    path: path.to_owned(),
                });
            }
            tracing::info!(target: "serial", "removing stale serial socket {}", path.display());
            fs::remove_file(path).map_err(fail)?;
        }
        Ok(_) => {
            return Err(SerialError::NotASocket {
                path: path.to_owned(),
            })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(fail(e)),
    }
    let listener = bind_owner_only(path).map_err(fail)?;
    let meta = fs::symlink_metadata(path).map_err(fail)?;
    let file = SocketFile {
        path: path.to_owned(),
        dev: meta.dev(),
        ino: meta.ino(),
    };
    listener.set_nonblocking(true).map_err(fail)?;
    Ok((listener, file))
}

/// socket, bind, chmod 0600, then listen. std's `UnixListener::bind` does
/// bind and listen in one step, which would leave the socket connectable
/// with umask permissions until a later chmod; changing the umask instead
/// would affect every thread of the process.
fn bind_owner_only(path: &Path) -> io::Result<UnixListener> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain integers and arrays; all-zero is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    // Room for the terminating NUL the kernel expects.
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "a socket path must be 1 to {} bytes long",
                addr.sun_path.len() - 1
            ),
        ));
    }
    addr.sun_family = libc::sa_family_t::try_from(libc::AF_UNIX)
        .map_err(|_| io::Error::from(io::ErrorKind::Unsupported))?;
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    let len = std::mem::offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1;
    #[cfg(any(
        target_os = "macos",
        target_os = "ios",
        target_os = "freebsd",
        target_os = "netbsd",
        target_os = "openbsd"
    ))]
    {
        addr.sun_len =
            u8::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    }

    #[cfg(any(target_os = "linux", target_os = "android"))]
    let kind = libc::SOCK_STREAM | libc::SOCK_CLOEXEC;
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let kind = libc::SOCK_STREAM;
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let raw = unsafe { libc::socket(libc::AF_UNIX, kind, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a descriptor socket(2) just returned, owned by
    // nothing else.
    let socket = unsafe { OwnedFd::from_raw_fd(raw) };
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        // SAFETY: F_SETFD on a descriptor we own; no pointers involved.
        if unsafe { libc::fcntl(socket.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    let len =
        libc::socklen_t::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `addr` is an initialised sockaddr_un that outlives the call
    // and `len` is within its size (checked against sun_path above).
    let rc = unsafe {
        libc::bind(
            socket.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast::<libc::sockaddr>(),
            len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // Nobody can connect before listen(2), so this leaves no window.
    if let Err(e) = fs::set_permissions(path, fs::Permissions::from_mode(0o600)) {
        let _ = fs::remove_file(path);
        return Err(e);
    }
    // SAFETY: listen(2) on a bound socket we own; no pointers involved.
    if unsafe { libc::listen(socket.as_raw_fd(), 4) } < 0 {
        let err = io::Error::last_os_error();
        let _ = fs::remove_file(path);
        return Err(err);
    }
    Ok(UnixListener::from(socket))
}

/// State the output sink and the serving thread share.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    /// The connected client's write side (non-blocking), if any.
    client: Option<UnixStream>,
    backlog: VecDeque<u8>,
    /// Bytes dropped from the backlog since the last client connected.
    dropped: u64,
}

impl Shared {
    fn keep(&mut self, bytes: &[u8]) {
        self.backlog.extend(bytes);
        let excess = self.backlog.len().saturating_sub(BACKLOG_LIMIT);
        if excess > 0 {
            self.backlog.drain(..excess);
            self.dropped += excess as u64;
        }
    }

    /// Writes as much backlog as the client takes; false if the client is
    /// gone.
    fn flush(&mut self) -> bool {
        let Some(client) = self.client.as_ref() else {
            return true;
        };
        while !self.backlog.is_empty() {
            let (front, _) = self.backlog.as_slices();
            match (&*client).write(front) {
                Ok(0) => return false,
                Ok(n) => {
                    self.backlog.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        true
    }
}

/// The UART's output sink for `unix:PATH`.
pub(crate) struct UnixOutput {
    pub(crate) shared: Arc<Mutex<Shared>>,
    pub(crate) waker: Arc<Waker>,
}

impl SerialOutput for UnixOutput {
    fn write_bytes(&mut self, mut bytes: &[u8]) {
        let mut shared = lock(&self.shared);
        let mut wake = false;
        if shared.backlog.is_empty() {
            if let Some(client) = shared.client.as_ref() {
                // On an error (full, or the client is gone) the bytes are
                // kept; the serving thread sends them or notices the hang-up.
                if let Ok(n) = (&*client).write(bytes) {
                    bytes = &bytes[n..];
                }
                // The serving thread must start watching for room.
                wake = !bytes.is_empty();
            }
        }
        shared.keep(bytes);
        drop(shared);
        if wake {
            self.waker.wake();
        }
    }
}

/// The serving thread: accepts clients, reads their input into `queue`,
/// and sends the backlog when a client can take it.
pub(crate) fn serve(
    listener: &UnixListener,
    shared: &Mutex<Shared>,
    queue: &InputQueue,
    waker: &Waker,
) {
    let mut client: Option<UnixStream> = None;
    let mut buf = [0u8; 4096];
    loop {
        let room = queue.has_room();
        let pending_output = client.is_some() && !lock(shared).backlog.is_empty();
        // Readiness is copied out so the poll set's borrow of the client
        // ends before the client may change.
        let (woken, incoming, writable, readable) = {
            let mut poll = Poll::new();
            let wake = poll.add(waker.fd(), READABLE);
            let accept = poll.add(listener.as_fd(), READABLE);
            // Watch the client only for what can be acted on: while the
            // queue is full its input waits in the socket, and a hang-up
            // reported then would wake this loop with nothing to do.
            let events =
                if room { READABLE } else { 0 } | if pending_output { WRITABLE } else { 0 };
            let conn = client
                .as_ref()
                .filter(|_| events != 0)
                .map(|c| poll.add(c.as_fd(), events));
            if let Err(e) = poll.wait() {
                tracing::warn!(target: "serial", "serial socket stopped: poll failed: {e}");
                break;
            }
            (
                poll.ready(wake, READABLE),
                poll.ready(accept, READABLE),
                conn.is_some_and(|c| pending_output && poll.ready(c, WRITABLE)),
                conn.is_some_and(|c| room && poll.ready(c, READABLE)),
            )
        };
        if woken {
            waker.drain();
        }
        if queue.is_stopped() {
            break;
        }
        let mut gone = false;
        if writable {
            gone = !lock(shared).flush();
        }
        if !gone && readable {
            if let Some(stream) = client.as_ref() {
                match (&*stream).read(&mut buf) {
                    Ok(0) => gone = true,
                    Ok(n) => queue.push(&buf[..n]),
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                        ) => {}
                    Err(_) => gone = true,
                }
            }
        }
        if gone {
            client = None;
            lock(shared).client = None;
            tracing::info!(target: "serial", "serial socket client disconnected");
        }
        // After the current client's hang-up is seen, so a client that
        // reconnects at once is not turned away as a second one.
        if incoming {
            accept_client(listener, shared, &mut client);
        }
    }
    lock(shared).client = None;
}

fn accept_client(listener: &UnixListener, shared: &Mutex<Shared>, client: &mut Option<UnixStream>) {
    let stream = match listener.accept() {
        Ok((stream, _)) => stream,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            ) =>
        {
            return
        }
        Err(e) => {
            // Out of descriptors and the like: the listener stays readable,
            // so pause rather than spin until it clears.
            tracing::warn!(target: "serial", "serial socket accept failed: {e}");
            std::thread::sleep(Duration::from_millis(100));
            return;
        }
    };
    if client.is_some() {
        // A fresh socket's buffer takes this short message without
        // blocking; if not, the client learns by the disconnect alone.
        let _ = stream.set_nonblocking(true);
        let _ = (&stream).write(BUSY_MESSAGE);
        return;
    }
    let writer = match stream
        .set_nonblocking(true)
        .and_then(|()| stream.try_clone())
    {
        Ok(writer) => writer,
        Err(e) => {
            tracing::warn!(target: "serial", "cannot set up serial socket client: {e}");
            return;
        }
    };
    let mut state = lock(shared);
    if state.dropped > 0 {
        tracing::info!(
            target: "serial",
            "serial socket client connected; {} older output bytes were dropped",
            state.dropped
        );
    } else {
        tracing::info!(target: "serial", "serial socket client connected");
    }
    state.dropped = 0;
    state.client = Some(writer);
    *client = Some(stream);
}
