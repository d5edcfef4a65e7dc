//! Display front ends chosen with `--display` (the Cocoa window, VNC) and
//! the display device with `--gpu`: how their option values read and how
//! the VNC servers start.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::ValueEnum;
use display::Display;
use vnc::{Listen, VncConfig, VncServer};

use crate::error::{Error, Result};

/// The default VNC address: localhost only, display 0.
pub const DEFAULT_VNC: &str = "127.0.0.1:5900";

/// One `--display` value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Front {
    /// A Cocoa window (macOS on Apple silicon).
    Cocoa,
    /// A VNC server showing head `head` (0 unless `,head=N` is given);
    /// `listen` `None` is the bundle's address, else [`DEFAULT_VNC`].
    Vnc { listen: Option<Listen>, head: usize },
    /// No front end.
    None,
}

impl std::str::FromStr for Front {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        // `,head=N` ends a vnc value (the last one: a socket path may hold
        // commas).
        let (value, head) = match s.rsplit_once(",head=") {
            Some((v, n)) if v == "vnc" || v.starts_with("vnc=") => {
                let head = n
                    .parse::<usize>()
                    .map_err(|e| format!("{s:?}: head {n:?}: {e}"))?;
                (v, head)
            }
            _ => (s, 0),
        };
        match value {
            "cocoa" => Ok(Front::Cocoa),
            "none" => Ok(Front::None),
            "vnc" => Ok(Front::Vnc { listen: None, head }),
            _ => match value.strip_prefix("vnc=") {
                Some(addr) => parse_listen(addr).map(|l| Front::Vnc {
                    listen: Some(l),
                    head,
                }),
                None => Err(format!(
                    "{s:?}: expected cocoa, none, vnc, vnc=HOST:PORT or vnc=unix:PATH, \
                     a vnc one optionally followed by ,head=N"
                )),
            },
        }
    }
}

/// `HOST:PORT` (an IP address or a name) or `unix:PATH`.
pub fn parse_listen(addr: &str) -> std::result::Result<Listen, String> {
    if let Some(path) = addr.strip_prefix("unix:") {
        if path.is_empty() {
            return Err("vnc=unix: needs a socket path".into());
        }
        return Ok(Listen::Unix(PathBuf::from(path)));
    }
    let first: Option<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|e| format!("VNC address {addr:?}: {e} (expected HOST:PORT or unix:PATH)"))?
        .next();
    first
        .map(Listen::Tcp)
        .ok_or_else(|| format!("VNC address {addr:?} resolves to nothing"))
}

/// `--gpu`: the display device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum GpuArg {
    /// apple-gfx-mmio, for macOS guests (ParavirtualizedGraphics; macOS
    /// on Apple silicon).
    Apple,
    /// apple-gfx-pci on the PCI bus (ParavirtualizedGraphics; needs
    /// `--msi on`: it signals only by MSI).
    #[value(name = "apple-pci")]
    ApplePci,
    /// virtio-gpu (2D), for Linux guests, on every host.
    Virtio,
    /// No display device.
    None,
}

/// The VNC password: the first line of `path`. VNC authentication keys
/// DES with at most 8 bytes; a longer password is cut (with a warning).
pub fn read_password(path: &Path) -> Result<Vec<u8>> {
    let text = std::fs::read(path).map_err(|source| Error::Path {
        path: path.to_path_buf(),
        source,
    })?;
    let first = text.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = first.strip_suffix(b"\r").unwrap_or(first).to_vec();
    if line.is_empty() {
        return Err(Error::usage(format!(
            "VNC password file {}: the first line is empty",
            path.display()
        )));
    }
    if line.len() > 8 {
        tracing::warn!(
            "VNC password file {}: VNC authentication uses only the first 8 bytes",
            path.display()
        );
    }
    Ok(line)
}

/// Where a VNC server listens and the head it shows.
pub type VncListen = (Listen, usize);

/// Starts one VNC server per `vnc` front end: where it listens and the
/// head of `screen` it shows.
pub fn start_vnc(
    listens: Vec<VncListen>,
    password: Option<Vec<u8>>,
    screen: Option<Arc<Display>>,
) -> Result<Vec<VncServer>> {
    if listens.is_empty() {
        return Ok(Vec::new());
    }
    let screen = screen.ok_or_else(|| {
        Error::usage(
            "--display vnc: the machine has no display device (use --gpu virtio, or apple-gfx on a macOS host)",
        )
    })?;
    if password.is_none() {
        tracing::warn!("VNC without a password: anyone who can reach the socket controls the VM");
    }
    listens
        .into_iter()
        .map(|(listen, head)| {
            let config = VncConfig {
                listen,
                password: password.clone(),
                head,
            };
            VncServer::start(config, screen.clone()).map_err(|e| {
                Error::usage(format!(
                    "--display vnc: {}",
                    vm_core::error_chain::Chain(&e)
                ))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_values_parse() {
        assert_eq!("cocoa".parse(), Ok(Front::Cocoa));
        let vnc = |listen, head| Ok(Front::Vnc { listen, head });
        assert_eq!("vnc".parse(), vnc(None, 0));
        let tcp = Some(Listen::Tcp("127.0.0.1:5901".parse().unwrap()));
        assert_eq!("vnc=127.0.0.1:5901".parse(), vnc(tcp.clone(), 0));
        assert_eq!("vnc=127.0.0.1:5901,head=2".parse(), vnc(tcp, 2));
        assert_eq!("vnc,head=1".parse(), vnc(None, 1));
        assert_eq!(
            "vnc=unix:/tmp/v,1.sock,head=3".parse(),
            vnc(Some(Listen::Unix("/tmp/v,1.sock".into())), 3)
        );
        assert!("vnc=5900".parse::<Front>().is_err());
        assert!("vnc=unix:".parse::<Front>().is_err());
        assert!("vnc=127.0.0.1:5901,head=x".parse::<Front>().is_err());
        assert!("vnc=127.0.0.1:5901,head=-1".parse::<Front>().is_err());
        assert!("cocoa,head=1".parse::<Front>().is_err());
        assert!("sdl".parse::<Front>().is_err());
    }

    #[test]
    fn the_password_is_the_first_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pw");
        std::fs::write(&p, "secret\r\nmore\n").unwrap();
        assert_eq!(read_password(&p).unwrap(), b"secret");
        std::fs::write(&p, "\n").unwrap();
        assert!(read_password(&p).is_err());
        assert!(read_password(&dir.path().join("missing")).is_err());
    }
}
