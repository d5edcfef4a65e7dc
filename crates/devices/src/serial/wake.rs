//! Sleeping on several descriptors at once, and being woken from another
//! thread: what lets the serial I/O threads block with no timeout and
//! still stop promptly.

use std::io::{self, Read, Write};
use std::marker::PhantomData;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;

/// Wakes a thread sleeping in [`Poll::wait`] on [`Waker::fd`]. A socket
/// pair rather than a pipe because std creates one without `unsafe`.
#[derive(Debug)]
pub(crate) struct Waker {
    tx: UnixStream,
    rx: UnixStream,
}

impl Waker {
    pub(crate) fn new() -> io::Result<Self> {
        let (tx, rx) = UnixStream::pair()?;
        // A full buffer already means "wake up", so the writer must not
        // block; the reader drains without blocking.
        tx.set_nonblocking(true)?;
        rx.set_nonblocking(true)?;
        Ok(Self { tx, rx })
    }

    pub(crate) fn wake(&self) {
        match (&self.tx).write(&[1]) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => tracing::warn!(target: "serial", "cannot wake the serial I/O thread: {e}"),
        }
    }

    /// Consumes pending wake-ups so the next wait sleeps again.
    pub(crate) fn drain(&self) {
        let mut buf = [0u8; 64];
        while let Ok(n) = (&self.rx).read(&mut buf) {
            if n < buf.len() {
                break;
            }
        }
    }

    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.rx.as_fd()
    }
}

pub(crate) const READABLE: libc::c_short = libc::POLLIN;
pub(crate) const WRITABLE: libc::c_short = libc::POLLOUT;
/// Conditions poll(2) reports whether asked or not; a read or write then
/// tells which (EOF or an error).
const ALWAYS: libc::c_short = libc::POLLHUP | libc::POLLERR | libc::POLLNVAL;

/// One poll(2) call over descriptors borrowed for `'a`.
pub(crate) struct Poll<'a> {
    fds: Vec<libc::pollfd>,
    _borrows: PhantomData<BorrowedFd<'a>>,
}

impl<'a> Poll<'a> {
    pub(crate) fn new() -> Self {
        Self {
            fds: Vec::with_capacity(4),
            _borrows: PhantomData,
        }
    }

    /// Watches `fd` for `events`; returns its index for [`Poll::ready`].
    pub(crate) fn add(&mut self, fd: BorrowedFd<'a>, events: libc::c_short) -> usize {
        self.fds.push(libc::pollfd {
            fd: fd.as_raw_fd(),
            events,
            revents: 0,
        });
        self.fds.len() - 1
    }

    /// Sleeps until one descriptor is ready. A signal ends the wait early
    /// with nothing ready, which callers treat like a spurious wake-up.
    pub(crate) fn wait(&mut self) -> io::Result<()> {
        for fd in &mut self.fds {
            fd.revents = 0;
        }
        // A handful of descriptors (the set is built from fixed fields).
        let count = libc::nfds_t::try_from(self.fds.len())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: `fds` is a valid, initialised array of `count` pollfd
        // entries that poll(2) may write `revents` into, and every
        // descriptor in it is kept open by the borrows this value holds.
        let rc = unsafe { libc::poll(self.fds.as_mut_ptr(), count, -1) };
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
        Ok(())
    }

    /// Whether the descriptor at `index` reported any of `events`, or a
    /// hang-up or error.
    pub(crate) fn ready(&self, index: usize, events: libc::c_short) -> bool {
        self.fds
            .get(index)
            .is_some_and(|fd| fd.revents & (events | ALWAYS) != 0)
    }
}
