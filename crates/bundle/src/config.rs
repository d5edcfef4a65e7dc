//! `config.toml`: the human-editable description of one VM.
//!
//! Every field is documented in `docs/bundles.md`. Unknown keys are an
//! error naming the key, so a typo (`cpu = 4`) is never silently ignored.
//! Relative paths are relative to the bundle directory.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

/// Most vCPUs the vmapple machine accepts (vmapple-machine.md §6.4).
pub const MAX_CPUS: u32 = 32;

/// Guest RAM must be a whole number of the largest page size the host may
/// map it with.
pub const MEMORY_ALIGN: u64 = 64 << 10;

/// Largest config.toml read; a real one is well under 4 KiB.
pub const MAX_CONFIG_FILE: u64 = 1 << 20;

/// Virtualization.framework auxiliary-storage files carry a 16 KiB header
/// before the data the guest sees (vmapple-machine.md §16.2).
pub const VZ_AUX_HEADER: u64 = 0x4000;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: larger than {MAX_CONFIG_FILE} bytes", path.display())]
    TooLarge { path: PathBuf },
    #[error("{}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    #[error("{}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
}

/// The whole of `config.toml`.
///
/// Field order matters for serialisation: TOML needs plain values before
/// tables.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct VmConfig {
    /// Number of vCPUs, 1 to [`MAX_CPUS`].
    pub cpus: u32,
    /// Guest RAM in bytes; written as `"4G"`, `"512M"` or a byte count.
    pub memory: Size,
    /// The machine identifier. When absent the bundle's `MachineIdentifier`
    /// file is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ecid: Option<Ecid>,
    /// Boot ROM (e.g. Apple's `AVPBooter.vmapple2.bin`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<PathBuf>,
    #[serde(default)]
    pub serial: Serial,
    #[serde(default)]
    pub network: Network,
    /// MAC address of the network card; a random locally administered one
    /// is chosen at start when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<MacAddress>,
    #[serde(default)]
    pub on_panic: OnPanic,
    /// Auxiliary storage (macOS's NVRAM and boot policy).
    pub aux: Disk,
    /// The macOS system disk.
    pub root: Disk,
    /// Further disks, attached after root in this order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<Disk>,
    #[serde(default)]
    pub display: DisplayConfig,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Disk {
    pub path: PathBuf,
    #[serde(default, skip_serializing_if = "is_false")]
    pub read_only: bool,
    /// Bytes at the start of the file the guest does not see:
    /// [`VZ_AUX_HEADER`] for an untrimmed Virtualization.framework aux file.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub offset: u64,
}

impl Disk {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Disk {
            path: path.into(),
            read_only: false,
            offset: 0,
        }
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct DisplayConfig {
    /// Modes offered to the guest, preferred first. Empty: no display.
    #[serde(default)]
    pub modes: Vec<DisplayMode>,
}

impl Default for DisplayConfig {
    fn default() -> Self {
        DisplayConfig {
            modes: vec![DisplayMode {
                width: 1920,
                height: 1080,
            }],
        }
    }
}

/// What happens when the guest reports a panic through pvpanic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnPanic {
    /// Stop the VM; vmapple exits with status 5.
    #[default]
    Exit,
    /// Keep the VM paused for inspection (resume or stop over the control
    /// socket).
    Pause,
    /// Reset and boot again.
    Reset,
    /// Log it and let the guest run on (to its crash kernel, say).
    Continue,
}

macro_rules! string_serde {
    ($ty:ty, $expecting:expr) => {
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl de::Visitor<'_> for V {
                    type Value = $ty;
                    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                        f.write_str($expecting)
                    }
                    fn visit_str<E: de::Error>(self, v: &str) -> Result<$ty, E> {
                        v.parse().map_err(E::custom)
                    }
                }
                d.deserialize_str(V)
            }
        }
    };
}

/// Serial console backend.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Serial {
    #[default]
    Stdio,
    None,
    File(PathBuf),
    Unix(PathBuf),
}

impl FromStr for Serial {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "stdio" => Ok(Serial::Stdio),
            "none" => Ok(Serial::None),
            _ => {
                if let Some(p) = s.strip_prefix("file:").filter(|p| !p.is_empty()) {
                    Ok(Serial::File(p.into()))
                } else if let Some(p) = s.strip_prefix("unix:").filter(|p| !p.is_empty()) {
                    Ok(Serial::Unix(p.into()))
                } else {
                    Err(format!(
                        "serial {s:?}: expected stdio, none, file:PATH or unix:PATH"
                    ))
                }
            }
        }
    }
}

impl fmt::Display for Serial {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Serial::Stdio => f.write_str("stdio"),
            Serial::None => f.write_str("none"),
            Serial::File(p) => write!(f, "file:{}", p.display()),
            Serial::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}
string_serde!(Serial, "stdio, none, file:PATH or unix:PATH");

/// Network backend of the (single) virtio-net card.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Network {
    /// User-mode networking through passt (NAT, like QEMU's `-netdev user`).
    #[default]
    Passt,
    /// No network card.
    None,
    /// A qemu-style stream socket (length-prefixed frames) at PATH.
    Unix(PathBuf),
    /// A host tap interface.
    Tap(String),
}

impl FromStr for Network {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "passt" => Ok(Network::Passt),
            "none" => Ok(Network::None),
            _ => {
                if let Some(p) = s.strip_prefix("unix:").filter(|p| !p.is_empty()) {
                    Ok(Network::Unix(p.into()))
                } else if let Some(name) = s.strip_prefix("tap:") {
                    // IFNAMSIZ is 16 including the NUL.
                    if name.is_empty()
                        || name.len() > 15
                        || !name
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
                    {
                        Err(format!("network {s:?}: bad tap interface name"))
                    } else {
                        Ok(Network::Tap(name.into()))
                    }
                } else {
                    Err(format!(
                        "network {s:?}: expected passt, none, unix:PATH or tap:NAME"
                    ))
                }
            }
        }
    }
}

impl fmt::Display for Network {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Network::Passt => f.write_str("passt"),
            Network::None => f.write_str("none"),
            Network::Unix(p) => write!(f, "unix:{}", p.display()),
            Network::Tap(n) => write!(f, "tap:{n}"),
        }
    }
}
string_serde!(Network, "passt, none, unix:PATH or tap:NAME");

/// An Ethernet unicast address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MacAddress(pub [u8; 6]);

impl FromStr for MacAddress {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("MAC address {s:?}: expected six hex bytes like 52:54:00:12:34:56");
        let mut out = [0u8; 6];
        let mut parts = s.split([':', '-']);
        for byte in out.iter_mut() {
            let part = parts.next().ok_or_else(bad)?;
            if part.is_empty() || part.len() > 2 {
                return Err(bad());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        if out[0] & 1 != 0 {
            return Err(format!(
                "MAC address {s:?} is a multicast address; a network card needs a unicast one"
            ));
        }
        Ok(MacAddress(out))
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
string_serde!(MacAddress, "a MAC address like 52:54:00:12:34:56");

/// A display resolution `WIDTHxHEIGHT` in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DisplayMode {
    pub width: u32,
    pub height: u32,
}

impl DisplayMode {
    pub const MAX_SIDE: u32 = 16384;
}

impl FromStr for DisplayMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("display mode {s:?}: expected WIDTHxHEIGHT like 1920x1080");
        let (w, h) = s.split_once('x').ok_or_else(bad)?;
        let width: u32 = w.parse().map_err(|_| bad())?;
        let height: u32 = h.parse().map_err(|_| bad())?;
        if width == 0 || height == 0 || width > Self::MAX_SIDE || height > Self::MAX_SIDE {
            return Err(format!(
                "display mode {s:?}: each side must be 1 to {}",
                Self::MAX_SIDE
            ));
        }
        Ok(DisplayMode { width, height })
    }
}

impl fmt::Display for DisplayMode {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}x{}", self.width, self.height)
    }
}
string_serde!(DisplayMode, "a display mode like 1920x1080");

/// A byte count, written `"4G"`, `"512M"`, `"4GiB"` or as an integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Size(pub u64);

/// Parses `512M`, `4G`, `1024K`, `2T`, `4GiB` or a plain byte count
/// (binary units).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let digits_end = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (digits, unit) = trimmed.split_at(digits_end);
    if digits.is_empty() {
        return Err(format!("{text:?} is not a size (try 512M or 4G)"));
    }
    let number: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is too large"))?;
    let upper = unit.trim().to_ascii_uppercase();
    let shift = match upper.trim_end_matches("IB").trim_end_matches('B') {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        other => {
            return Err(format!(
                "{text:?}: unknown unit {other:?} (use K, M, G or T)"
            ))
        }
    };
    number
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let v = self.0;
        for (shift, unit) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
            if v != 0 && v % (1u64 << shift) == 0 {
                return write!(f, "{}{unit}", v >> shift);
            }
        }
        write!(f, "{v}")
    }
}

impl FromStr for Size {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        parse_size(s).map(Size)
    }
}

impl Serialize for Size {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size like \"4G\" or a byte count")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Size, E> {
                v.parse().map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Size, E> {
                u64::try_from(v)
                    .map(Size)
                    .map_err(|_| E::custom("a size cannot be negative"))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Size, E> {
                Ok(Size(v))
            }
        }
        d.deserialize_any(V)
    }
}

/// An ECID. Written as a string because TOML integers stop at 2^63 - 1;
/// decimal or `0x` hex, and a bare integer is accepted too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ecid(pub u64);

impl FromStr for Ecid {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let parsed = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
            Some(hex) => u64::from_str_radix(hex, 16),
            None => t.parse(),
        };
        parsed
            .map(Ecid)
            .map_err(|_| format!("ecid {s:?}: expected a decimal or 0x-hex 64-bit number"))
    }
}

impl fmt::Display for Ecid {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl Serialize for Ecid {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Ecid {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Ecid;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an ECID as a decimal or 0x-hex string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Ecid, E> {
                v.parse().map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Ecid, E> {
                u64::try_from(v)
                    .map(Ecid)
                    .map_err(|_| E::custom("an ECID cannot be negative"))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Ecid, E> {
                Ok(Ecid(v))
            }
        }
        d.deserialize_any(V)
    }
}

const HEADER: &str = "\
# vmapple VM configuration. Every field is described in docs/bundles.md.
# Relative paths are relative to this bundle directory.
";

impl VmConfig {
    /// A configuration with the given disks and defaults elsewhere.
    pub fn new(cpus: u32, memory: u64, aux: Disk, root: Disk) -> Self {
        VmConfig {
            cpus,
            memory: Size(memory),
            ecid: None,
            firmware: None,
            serial: Serial::default(),
            network: Network::default(),
            mac: None,
            on_panic: OnPanic::default(),
            aux,
            root,
            disks: Vec::new(),
            display: DisplayConfig::default(),
        }
    }

    /// Parses and validates TOML text.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        let config: VmConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        config.validate()?;
        Ok(config)
    }

    /// TOML text with a short header comment.
    pub fn to_toml(&self) -> String {
        let body = toml::to_string(self).expect("VmConfig always serialises to TOML");
        format!("{HEADER}\n{body}")
    }

    /// Reads, parses and validates a config.toml.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        use std::io::Read;
        let io = |source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        let mut text = String::new();
        file.take(MAX_CONFIG_FILE + 1)
            .read_to_string(&mut text)
            .map_err(io)?;
        if text.len() as u64 > MAX_CONFIG_FILE {
            return Err(ConfigError::TooLarge {
                path: path.to_path_buf(),
            });
        }
        let config: VmConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        config.validate().map_err(|message| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        })?;
        Ok(config)
    }

    /// Checks the rules serde cannot express.
    pub fn validate(&self) -> Result<(), String> {
        if self.cpus == 0 || self.cpus > MAX_CPUS {
            return Err(format!("cpus = {}: must be 1 to {MAX_CPUS}", self.cpus));
        }
        if self.memory.0 == 0 || self.memory.0 % MEMORY_ALIGN != 0 {
            return Err(format!(
                "memory = {}: must be a non-zero multiple of 64K",
                self.memory
            ));
        }
        for (name, disk) in [("aux", &self.aux), ("root", &self.root)]
            .into_iter()
            .chain(self.disks.iter().map(|d| ("disks", d)))
        {
            if disk.path.as_os_str().is_empty() {
                return Err(format!("{name}: path is empty"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
cpus = 4
memory = "4G"
ecid = "1234567890123456789"
firmware = "/usr/share/vmapple/AVPBooter.vmapple2.bin"
serial = "unix:/tmp/console.sock"
network = "tap:tap0"
mac = "52:54:00:12:34:56"
on-panic = "pause"

[aux]
path = "aux.img"
offset = 16384

[root]
path = "root.img"

[[disks]]
path = "/data/extra.img"
read-only = true

[display]
modes = ["2560x1600", "1920x1080"]
"#;

    #[test]
    fn full_config_parses() {
        let c = VmConfig::from_toml(FULL).unwrap();
        assert_eq!(c.cpus, 4);
        assert_eq!(c.memory, Size(4 << 30));
        assert_eq!(c.ecid, Some(Ecid(1234567890123456789)));
        assert_eq!(c.serial, Serial::Unix("/tmp/console.sock".into()));
        assert_eq!(c.network, Network::Tap("tap0".into()));
        assert_eq!(c.mac, Some(MacAddress([0x52, 0x54, 0, 0x12, 0x34, 0x56])));
        assert_eq!(c.on_panic, OnPanic::Pause);
        assert_eq!(c.aux.offset, VZ_AUX_HEADER);
        assert!(c.disks[0].read_only);
        assert_eq!(
            c.display.modes,
            vec![
                DisplayMode {
                    width: 2560,
                    height: 1600
                },
                DisplayMode {
                    width: 1920,
                    height: 1080
                }
            ]
        );
        // Serialising and parsing again gives the same configuration.
        assert_eq!(VmConfig::from_toml(&c.to_toml()).unwrap(), c);
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = VmConfig::from_toml(
            "cpus = 1\nmemory = 1073741824\n[aux]\npath = \"a\"\n[root]\npath = \"r\"\n",
        )
        .unwrap();
        assert_eq!(c.memory, Size(1 << 30));
        assert_eq!(c.network, Network::Passt);
        assert_eq!(c.serial, Serial::Stdio);
        assert_eq!(c.on_panic, OnPanic::Exit);
        assert_eq!(c.ecid, None);
        assert_eq!(c.display.modes.len(), 1);
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = VmConfig::from_toml(&FULL.replace("cpus = 4", "cpus = 4\ncpu = 4")).unwrap_err();
        assert!(e.contains("unknown field `cpu`"), "{e}");
        let e = VmConfig::from_toml(&FULL.replace("offset = 16384", "ofset = 1")).unwrap_err();
        assert!(e.contains("unknown field `ofset`"), "{e}");
        let e = VmConfig::from_toml(&FULL.replace("[display]", "[display]\nmode = 1")).unwrap_err();
        assert!(e.contains("unknown field `mode`"), "{e}");
    }

    #[test]
    fn bad_values_are_explained() {
        let cases = [
            ("cpus = 4", "cpus = 0", "must be 1 to 32"),
            ("cpus = 4", "cpus = 33", "must be 1 to 32"),
            ("memory = \"4G\"", "memory = \"4Q\"", "unknown unit"),
            ("memory = \"4G\"", "memory = 1000", "multiple of 64K"),
            ("memory = \"4G\"", "memory = -1", "negative"),
            (
                "network = \"tap:tap0\"",
                "network = \"slirp\"",
                "expected passt",
            ),
            ("network = \"tap:tap0\"", "network = \"tap:\"", "bad tap"),
            (
                "mac = \"52:54:00:12:34:56\"",
                "mac = \"01:00:5e:00:00:01\"",
                "multicast",
            ),
            (
                "mac = \"52:54:00:12:34:56\"",
                "mac = \"52:54:00:12:34\"",
                "six hex",
            ),
            (
                "on-panic = \"pause\"",
                "on-panic = \"explode\"",
                "unknown variant",
            ),
            ("ecid = \"1234567890123456789\"", "ecid = \"12x\"", "ecid"),
            ("\"2560x1600\"", "\"0x1600\"", "each side"),
            (
                "serial = \"unix:/tmp/console.sock\"",
                "serial = \"pty\"",
                "expected stdio",
            ),
        ];
        for (from, to, want) in cases {
            let text = FULL.replace(from, to);
            assert_ne!(text, FULL, "{from}");
            let e = VmConfig::from_toml(&text).unwrap_err();
            assert!(e.contains(want), "{to}: {e}");
        }
    }

    #[test]
    fn ecid_forms() {
        assert_eq!(
            "0x112210f47de98115".parse::<Ecid>(),
            Ok(Ecid(1234567890123456789))
        );
        assert_eq!("18446744073709551615".parse::<Ecid>(), Ok(Ecid(u64::MAX)));
        let c = VmConfig::from_toml(&FULL.replace("\"1234567890123456789\"", "42")).unwrap();
        assert_eq!(c.ecid, Some(Ecid(42)));
        // Values above i64::MAX survive a save/load through TOML.
        let mut c = c;
        c.ecid = Some(Ecid(u64::MAX));
        assert_eq!(
            VmConfig::from_toml(&c.to_toml()).unwrap().ecid,
            Some(Ecid(u64::MAX))
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("4GiB"), Ok(4 << 30));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        assert!(parse_size("99999999999T").is_err());
        assert!(parse_size("").is_err());
        assert_eq!(Size(4 << 30).to_string(), "4G");
        assert_eq!(Size(1536 << 20).to_string(), "1536M");
        assert_eq!(Size(1000).to_string(), "1000");
    }

    #[test]
    fn load_reports_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.toml");
        std::fs::write(&p, "cpus = 2\nbogus = 1\n").unwrap();
        let e = VmConfig::load(&p).unwrap_err().to_string();
        assert!(e.starts_with(&p.display().to_string()), "{e}");
        assert!(e.contains("bogus"), "{e}");
    }
}
