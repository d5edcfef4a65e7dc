//! The network card: its backend and its MAC address.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::{quote, serde_as_string};

/// Longest TAP interface name: IFNAMSIZ is 16 with the NUL.
pub const MAX_TAP_NAME: usize = 15;

/// Where a virtio-net device's frames go.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum NetBackend {
    /// User-mode networking through a `passt` process vmapple starts (NAT,
    /// like QEMU's `-netdev user`).
    Passt,
    /// A unix stream socket speaking passt's framing (4-byte big-endian
    /// length before each frame), e.g. one `passt --socket` listens on.
    UnixStream(PathBuf),
    /// A unix datagram socket: one frame per datagram, bound at `local`,
    /// sending to `peer`.
    UnixDgram { local: PathBuf, peer: PathBuf },
    /// A TAP interface (Linux).
    Tap(String),
    /// vmnet.framework's shared (NAT) mode (macOS; needs root or the
    /// com.apple.vm.networking entitlement).
    Vmnet,
}

impl NetBackend {
    /// Whether this host can have the backend at all; `Err` says why not.
    /// Parsing accepts every backend on every host, so a config file
    /// reads the same everywhere.
    pub fn host_supported(&self) -> Result<(), &'static str> {
        match self {
            Self::Vmnet if !cfg!(target_os = "macos") => {
                Err("needs a macOS host (vmnet.framework); use passt, unix:PATH or tap:NAME here")
            }
            Self::Tap(_) if !cfg!(target_os = "linux") => {
                Err("needs a Linux host; use passt, unix:PATH or vmnet here")
            }
            _ => Ok(()),
        }
    }
}

/// The network of a VM: a card on a backend, or none.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Network {
    /// No network card.
    None,
    Nic(NetBackend),
}

impl Default for Network {
    /// passt, the one backend that needs no setup.
    fn default() -> Self {
        Network::Nic(NetBackend::Passt)
    }
}

impl Network {
    pub fn backend(&self) -> Option<&NetBackend> {
        match self {
            Network::None => None,
            Network::Nic(b) => Some(b),
        }
    }
}

impl From<NetBackend> for Network {
    fn from(b: NetBackend) -> Self {
        Network::Nic(b)
    }
}

const NET_FORMS: &str = "passt, none, unix:PATH, unix-dgram:LOCAL,PEER, tap:NAME or vmnet";

/// Why a network backend was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetError {
    #[error("network {0}: expected {NET_FORMS}")]
    Syntax(String),
    #[error("network {0}: bad tap interface name (1 to {MAX_TAP_NAME} letters, digits, '-', '_' or '.')")]
    TapName(String),
    #[error("network {0}: none is no backend")]
    NoneIsNoBackend(String),
}

impl FromStr for NetBackend {
    type Err = NetError;
    fn from_str(text: &str) -> Result<Self, NetError> {
        match Network::from_str(text)? {
            Network::Nic(b) => Ok(b),
            Network::None => Err(NetError::NoneIsNoBackend(quote(text))),
        }
    }
}

impl FromStr for Network {
    type Err = NetError;
    fn from_str(text: &str) -> Result<Self, NetError> {
        let bad = || NetError::Syntax(quote(text));
        let backend = match text.split_once(':') {
            None if text == "none" => return Ok(Network::None),
            None if text == "passt" => NetBackend::Passt,
            None if text == "vmnet" => NetBackend::Vmnet,
            Some(("unix", path)) if !path.is_empty() => NetBackend::UnixStream(path.into()),
            Some(("unix-dgram", paths)) => match paths.split_once(',') {
                Some((local, peer)) if !local.is_empty() && !peer.is_empty() => {
                    NetBackend::UnixDgram {
                        local: local.into(),
                        peer: peer.into(),
                    }
                }
                _ => return Err(bad()),
            },
            Some(("tap", name)) => {
                if name.is_empty()
                    || name.len() > MAX_TAP_NAME
                    || !name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
                {
                    return Err(NetError::TapName(quote(text)));
                }
                NetBackend::Tap(name.into())
            }
            _ => return Err(bad()),
        };
        Ok(Network::Nic(backend))
    }
}

impl fmt::Display for NetBackend {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Self::Passt => f.write_str("passt"),
            Self::UnixStream(p) => write!(f, "unix:{}", p.display()),
            Self::UnixDgram { local, peer } => {
                write!(f, "unix-dgram:{},{}", local.display(), peer.display())
            }
            Self::Tap(name) => write!(f, "tap:{name}"),
            Self::Vmnet => f.write_str("vmnet"),
        }
    }
}

impl fmt::Display for Network {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Network::None => f.write_str("none"),
            Network::Nic(b) => b.fmt(f),
        }
    }
}

serde_as_string!(NetBackend, NET_FORMS);
serde_as_string!(Network, NET_FORMS);

/// An Ethernet unicast address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddress(pub [u8; 6]);

impl MacAddress {
    pub const fn octets(self) -> [u8; 6] {
        self.0
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MacError {
    #[error("MAC address {0}: expected six hex bytes like 52:54:00:12:34:56")]
    Syntax(String),
    #[error("MAC address {0} is a multicast address; a network card needs a unicast one")]
    Multicast(String),
}

impl FromStr for MacAddress {
    type Err = MacError;
    /// Six two-digit hex bytes separated by `:` or `-`.
    fn from_str(s: &str) -> Result<Self, MacError> {
        let bad = || MacError::Syntax(quote(s));
        let b = s.as_bytes();
        if b.len() != 17 {
            return Err(bad());
        }
        let mut mac = [0u8; 6];
        for (i, byte) in mac.iter_mut().enumerate() {
            let pos = i * 3;
            if i < 5 && !matches!(b[pos + 2], b':' | b'-') {
                return Err(bad());
            }
            // Bytes, not `&str` slices: a multi-byte character must not
            // panic.
            let hi = char::from(b[pos]).to_digit(16).ok_or_else(bad)?;
            let lo = char::from(b[pos + 1]).to_digit(16).ok_or_else(bad)?;
            *byte = u8::try_from(hi * 16 + lo).map_err(|_| bad())?;
        }
        if mac[0] & 1 != 0 {
            return Err(MacError::Multicast(quote(s)));
        }
        Ok(MacAddress(mac))
    }
}

impl fmt::Display for MacAddress {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

serde_as_string!(MacAddress, "a MAC address like 52:54:00:12:34:56");

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn network_syntax() {
        let net = |s: &str| s.parse::<Network>();
        assert_eq!(net("none"), Ok(Network::None));
        assert_eq!(net("passt"), Ok(NetBackend::Passt.into()));
        assert_eq!(net("vmnet"), Ok(NetBackend::Vmnet.into()));
        assert_eq!(
            net("unix:/tmp/s"),
            Ok(NetBackend::UnixStream("/tmp/s".into()).into())
        );
        assert_eq!(
            net("unix-dgram:/a,/b"),
            Ok(NetBackend::UnixDgram {
                local: "/a".into(),
                peer: "/b".into()
            }
            .into())
        );
        assert_eq!(net("tap:tap0"), Ok(NetBackend::Tap("tap0".into()).into()));
        assert_eq!(Network::default(), NetBackend::Passt.into());
        for (bad, want) in [
            ("", "expected passt"),
            ("unix:", "expected passt"),
            ("unix-dgram:/a", "expected passt"),
            ("unix-dgram:,/b", "expected passt"),
            ("slirp", "expected passt"),
            ("passt:x", "expected passt"),
            ("tap:", "bad tap"),
            ("tap:a/b", "bad tap"),
            ("tap:sixteen-chars-xy", "bad tap"),
        ] {
            let e = net(bad).unwrap_err().to_string();
            assert!(e.contains(want), "{bad:?}: {e}");
        }
        assert!("none".parse::<NetBackend>().is_err());
        let e = net(&"x".repeat(1 << 20)).unwrap_err().to_string();
        assert!(e.len() < 200, "{}", e.len());
    }

    #[test]
    fn host_support_is_checked_apart_from_syntax() {
        let vmnet = NetBackend::Vmnet.host_supported();
        assert_eq!(vmnet.is_ok(), cfg!(target_os = "macos"));
        assert!(NetBackend::Passt.host_supported().is_ok());
    }

    #[test]
    fn mac_syntax() {
        assert_eq!(
            "ab-BB-cc-00-01-ff".parse::<MacAddress>().unwrap_err(),
            MacError::Multicast("\"ab-BB-cc-00-01-ff\"".into())
        );
        assert_eq!(
            "52:54:00:12:34:56".parse(),
            Ok(MacAddress([0x52, 0x54, 0, 0x12, 0x34, 0x56]))
        );
        assert_eq!(
            "52-54-00-AB-cd-Ef".parse(),
            Ok(MacAddress([0x52, 0x54, 0, 0xab, 0xcd, 0xef]))
        );
        for bad in [
            "",
            "52:54:00:12:34",
            "52:54:00:12:34:56:78",
            "52:54:00:12:34:5",
            "52:54:00:12:34:5g",
            "52.54.00.12.34.56",
            "+2:54:00:12:34:56",
            "525:4:00:12:34:56",
            "52:54:00:12:34:56:",
            "52:54:00:12:34:5\u{e9}",
            "\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}x",
        ] {
            let e = bad.parse::<MacAddress>().unwrap_err().to_string();
            assert!(e.contains("six hex bytes"), "{bad:?}: {e}");
        }
        let e = "01:00:5e:00:00:01".parse::<MacAddress>().unwrap_err();
        assert!(e.to_string().contains("multicast"), "{e}");
    }

    fn backend() -> impl Strategy<Value = NetBackend> {
        prop_oneof![
            Just(NetBackend::Passt),
            Just(NetBackend::Vmnet),
            "[^\0]{1,40}".prop_map(|p| NetBackend::UnixStream(p.into())),
            ("[^\0,]{1,40}", "[^\0]{1,40}").prop_map(|(l, p)| NetBackend::UnixDgram {
                local: l.into(),
                peer: p.into()
            }),
            "[a-z0-9._-]{1,15}".prop_map(NetBackend::Tap),
        ]
    }

    proptest! {
        #[test]
        fn backends_round_trip(b in backend()) {
            let n = Network::Nic(b.clone());
            prop_assert_eq!(b.to_string().parse::<NetBackend>(), Ok(b.clone()));
            prop_assert_eq!(n.to_string().parse::<Network>(), Ok(n.clone()));
            let json = serde_json::to_string(&n).unwrap();
            prop_assert_eq!(serde_json::from_str::<Network>(&json).unwrap(), n);
        }

        #[test]
        fn macs_round_trip(mut m in any::<[u8; 6]>()) {
            m[0] &= !1;
            let mac = MacAddress(m);
            prop_assert_eq!(mac.to_string().parse::<MacAddress>(), Ok(mac));
            let json = serde_json::to_string(&mac).unwrap();
            prop_assert_eq!(serde_json::from_str::<MacAddress>(&json).unwrap(), mac);
        }

        #[test]
        fn any_text_parses_or_fails_cleanly(s in ".{0,40}") {
            let _ = s.parse::<Network>();
            let _ = s.parse::<MacAddress>();
        }
    }
}
