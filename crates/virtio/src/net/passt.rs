//! User-mode networking through passt (<https://passt.top>).
//!
//! passt translates between the guest's Ethernet frames and ordinary host
//! sockets, without privileges. In its default mode it speaks QEMU's stream
//! protocol (4-byte big-endian length, then the frame; see
//! [`super::framing`]) over a unix stream socket, so this backend is a
//! [`UnixStreamBackend`] plus the passt process it started:
//!
//! * [`PasstBackend::spawn`] creates a socketpair and runs
//!   `passt --foreground --quiet --fd N` on one end; the child is killed
//!   when the backend is dropped.
//! * [`PasstBackend::connect`] attaches to a passt the user started
//!   (`passt --socket PATH`).

use std::ffi::OsString;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use super::unix::UnixStreamBackend;
use super::{NetBackend, NetReceiver};

/// The program [`PasstBackend::spawn`] runs, looked up in `PATH`.
pub const PASST_PROGRAM: &str = "passt";

/// A passt connection, possibly with the passt process we started.
pub struct PasstBackend {
    inner: UnixStreamBackend,
    child: Option<Child>,
}

impl PasstBackend {
    /// Starts `passt` from `PATH` with default options.
    pub fn spawn() -> io::Result<Self> {
        Self::spawn_with(Path::new(PASST_PROGRAM), &[])
    }

    /// Starts `program` as passt, with `extra_args` (port forwards, say)
    /// after ours.
    pub fn spawn_with(program: &Path, extra_args: &[OsString]) -> io::Result<Self> {
        let (ours, theirs) = UnixStream::pair()?;
        let fd = theirs.as_raw_fd();
        let mut cmd = Command::new(program);
        cmd.arg("--foreground")
            .arg("--quiet")
            .arg("--fd")
            .arg(fd.to_string())
            .args(extra_args)
            .stdin(Stdio::null());
        // SAFETY: the closure runs in the child between fork and exec and
        // only calls fcntl, which is async-signal-safe; `fd` is open in the
        // child because `theirs` is alive in the parent across the spawn.
        unsafe {
            cmd.pre_exec(move || {
                // std opens sockets close-on-exec; passt must inherit this one.
                if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!(
                        "passt not found as {:?}: install it (Debian/Ubuntu/Fedora package \
                         `passt`) or use another network backend",
                        program
                    ),
                )
            } else {
                io::Error::new(e.kind(), format!("cannot start {program:?}: {e}"))
            }
        })?;
        drop(theirs);
        let inner = UnixStreamBackend::from_stream(ours)?;
        Ok(Self {
            inner,
            child: Some(child),
        })
    }

    /// Connects to a running passt's socket (`passt --socket PATH`).
    pub fn connect(socket: &Path) -> io::Result<Self> {
        Ok(Self {
            inner: UnixStreamBackend::connect(socket)?,
            child: None,
        })
    }

    /// The process id of the passt we started.
    pub fn child_id(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

impl NetBackend for PasstBackend {
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        self.inner.send(frame)
    }

    fn take_receiver(&mut self) -> Option<Box<dyn NetReceiver>> {
        self.inner.take_receiver()
    }
}

impl Drop for PasstBackend {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::MAX_FRAME_LEN;
    use std::time::{Duration, Instant};

    #[test]
    fn missing_passt_is_a_clear_error() {
        let err = PasstBackend::spawn_with(Path::new("/nonexistent/passt"), &[])
            .err()
            .unwrap();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(err.to_string().contains("install"), "{err}");
    }

    /// Talks to a real passt, if this machine has one: an ARP request for
    /// an address on the guest's network gets passt's ARP reply.
    #[test]
    fn real_passt_answers_arp() {
        if !Path::new("/usr/bin/passt").exists() {
            eprintln!("passt not installed; skipping");
            return;
        }
        let mut backend = PasstBackend::spawn().unwrap();
        assert!(backend.child_id().is_some());
        let mut rx = backend.take_receiver().unwrap();
        let guest_mac = [0x52, 0x54, 0x00, 0xaa, 0xbb, 0xcc];
        let mut arp = Vec::new();
        arp.extend([0xff; 6]); // broadcast
        arp.extend(guest_mac);
        arp.extend([0x08, 0x06]); // ARP
        arp.extend([0, 1, 0x08, 0, 6, 4, 0, 1]); // Ethernet/IPv4 request
        arp.extend(guest_mac);
        arp.extend([0, 0, 0, 0]); // sender IP unknown (probe)
        arp.extend([0; 6]);
        arp.extend([192, 0, 2, 77]); // target
        arp.resize(60, 0);
        let mut buf = vec![0u8; MAX_FRAME_LEN + 1];
        let start = Instant::now();
        let mut answered = false;
        while !answered && start.elapsed() < Duration::from_secs(5) {
            backend.send(&arp).unwrap();
            while let Some(n) = rx.recv(&mut buf, Duration::from_millis(200)).unwrap() {
                let f = &buf[..n];
                // An ARP reply (opcode 2) sent to us.
                if n >= 42 && f[12..14] == [0x08, 0x06] && f[20..22] == [0, 2] {
                    assert_eq!(f[..6], guest_mac);
                    answered = true;
                    break;
                }
            }
        }
        assert!(answered, "passt did not answer ARP");
    }
}
