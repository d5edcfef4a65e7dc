//! A Linux TAP interface as network backend.
//!
//! Opens `/dev/net/tun` and attaches it to the TAP interface `name`
//! (creating it if the process may) with `IFF_TAP | IFF_NO_PI`: every
//! `read` returns one Ethernet frame and every `write` sends one, with no
//! extra header. Needs CAP_NET_ADMIN, or an interface created beforehand
//! for this user (`ip tuntap add NAME mode tap user USER`).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::time::Duration;

use super::{wait_readable, NetBackend, NetReceiver};

/// The clone device.
pub const TUN_DEVICE: &str = "/dev/net/tun";

/// A TAP interface.
pub struct TapBackend {
    file: File,
    receiver: Option<Box<dyn NetReceiver>>,
}

impl TapBackend {
    /// Attaches to (or creates) the TAP interface `name`.
    pub fn open(name: &str) -> io::Result<Self> {
        let bytes = name.as_bytes();
        if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid interface name {name:?} (1 to 15 bytes, no NUL)"),
            ));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(TUN_DEVICE)
            .map_err(|e| io::Error::new(e.kind(), format!("cannot open {TUN_DEVICE}: {e}")))?;
        // SAFETY: ifreq is plain old data; all-zero is a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, &src) in ifr.ifr_name.iter_mut().zip(bytes) {
            *dst = src as libc::c_char;
        }
        ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `ifr`
        // is, on a tun fd we own; the name is NUL-terminated (checked above,
        // and the array was zeroed).
        let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF as _, &mut ifr) };
        if r == -1 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("cannot attach to TAP interface {name:?}: {e}"),
            ));
        }
        let reader = file.try_clone()?;
        Ok(Self {
            file,
            receiver: Some(Box::new(TapReceiver { file: reader })),
        })
    }
}

impl NetBackend for TapBackend {
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        // A tap write takes the whole frame or fails; it never splits one.
        self.file.write(frame).map(|_| ())
    }

    fn take_receiver(&mut self) -> Option<Box<dyn NetReceiver>> {
        self.receiver.take()
    }
}

struct TapReceiver {
    file: File,
}

impl NetReceiver for TapReceiver {
    fn recv(&mut self, buf: &mut [u8], timeout: Duration) -> io::Result<Option<usize>> {
        if !wait_readable(self.file.as_raw_fd(), timeout)? {
            return Ok(None);
        }
        match self.file.read(buf) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(None),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_names_are_refused_before_any_syscall() {
        for name in ["", "0123456789abcdef", "a\0b"] {
            let err = TapBackend::open(name).err().expect(name);
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{name:?}");
        }
    }
}
