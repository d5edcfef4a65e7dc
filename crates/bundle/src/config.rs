//! `config.toml`: the human-editable description of one VM.
//!
//! Every field is documented in `docs/bundles.md`. Unknown keys are an
//! error naming the key, so a typo (`cpu = 4`) is never silently ignored.
//! Relative paths are relative to the bundle directory.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use vm_config::display;
pub use vm_config::{
    DiskSpec, DisplayMode, DisplayModes, Ecid, MacAddress, Msi, NetBackend, Network, PanicPolicy,
    SerialBackend, ShareSpec, Size,
};

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
    #[error("{}: {}", path.display(), source.to_string().trim_end())]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("{}: {source}", path.display())]
    Invalid {
        path: PathBuf,
        #[source]
        source: InvalidConfig,
    },
}

/// A rule of `config.toml` that serde cannot express, broken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidConfig {
    #[error("cpus = {0}: must be 1 to {MAX_CPUS}")]
    Cpus(u32),
    #[error("memory = {0}: must be a non-zero multiple of 64K")]
    Memory(Size),
    #[error("{0}: path is empty")]
    EmptyPath(&'static str),
    #[error("shares: tag {0:?} is used twice")]
    ShareTagTwice(String),
}

/// Why TOML text is not a configuration.
#[derive(Debug, thiserror::Error)]
pub enum TomlError {
    #[error(transparent)]
    Parse(#[from] toml::de::Error),
    #[error(transparent)]
    Invalid(#[from] InvalidConfig),
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
    pub serial: SerialBackend,
    #[serde(default)]
    pub network: Network,
    /// MAC address of the network card; a random locally administered one
    /// is chosen at start when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<MacAddress>,
    #[serde(default)]
    pub on_panic: PanicPolicy,
    /// Model name the boot ROM reports in the cfg region (a newer guest
    /// may check it); absent: vmapple's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// SoC name the boot ROM reports, e.g. "Apple M4 (Virtual)" as
    /// Virtualization.framework does on an M4; absent: vmapple's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub soc_name: Option<String>,
    /// Message-signalled interrupts (`--msi`); absent: the machine's
    /// default for the boot source (off for a boot ROM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub msi: Option<Msi>,
    /// Auxiliary storage (macOS's NVRAM and boot policy).
    pub aux: DiskSpec,
    /// The macOS system disk.
    pub root: DiskSpec,
    /// Further disks, attached after root in this order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskSpec>,
    /// Host directories shared with the guest over virtio-fs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shares: Vec<ShareSpec>,
    #[serde(default)]
    pub display: DisplayConfig,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct DisplayConfig {
    /// Modes offered to the guest, preferred first. Empty: no display.
    #[serde(default)]
    pub modes: DisplayModes,
    /// Where `--display vnc` listens: `HOST:PORT` or `unix:PATH`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vnc: Option<String>,
    /// The VNC password's file (first line), relative to the bundle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vnc_password_file: Option<std::path::PathBuf>,
}

impl Default for DisplayConfig {
    fn default() -> Self {
        DisplayConfig {
            modes: DisplayModes::new(vec![DisplayMode::new(1920, 1080, 60)])
                .expect("one mode is a valid list"),
            vnc: None,
            vnc_password_file: None,
        }
    }
}

const HEADER: &str = "\
# vmapple VM configuration. Every field is described in docs/bundles.md.
# Relative paths are relative to this bundle directory.
";

impl VmConfig {
    /// A configuration with the given disks and defaults elsewhere.
    pub fn new(cpus: u32, memory: u64, aux: DiskSpec, root: DiskSpec) -> Self {
        VmConfig {
            cpus,
            memory: Size(memory),
            ecid: None,
            firmware: None,
            serial: SerialBackend::default(),
            network: Network::default(),
            mac: None,
            on_panic: PanicPolicy::default(),
            model: None,
            soc_name: None,
            msi: None,
            aux,
            root,
            disks: Vec::new(),
            shares: Vec::new(),
            display: DisplayConfig::default(),
        }
    }

    /// Parses and validates TOML text.
    pub fn from_toml(text: &str) -> Result<Self, TomlError> {
        let config: VmConfig = toml::from_str(text)?;
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
        let config: VmConfig = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
        config.validate().map_err(|source| ConfigError::Invalid {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(config)
    }

    /// Checks the rules serde cannot express.
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        if self.cpus == 0 || self.cpus > MAX_CPUS {
            return Err(InvalidConfig::Cpus(self.cpus));
        }
        if self.memory.0 == 0 || self.memory.0 % MEMORY_ALIGN != 0 {
            return Err(InvalidConfig::Memory(self.memory));
        }
        for (name, disk) in [("aux", &self.aux), ("root", &self.root)]
            .into_iter()
            .chain(self.disks.iter().map(|d| ("disks", d)))
        {
            if disk.path.as_os_str().is_empty() {
                return Err(InvalidConfig::EmptyPath(name));
            }
        }
        for (i, share) in self.shares.iter().enumerate() {
            if self.shares[..i].iter().any(|s| s.tag == share.tag) {
                return Err(InvalidConfig::ShareTagTwice(share.tag.clone()));
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
model = "VM0001"
soc-name = "Apple M4 (Virtual)"
msi = "on"

[aux]
path = "aux.img"
offset = 16384

[root]
path = "root.img"

[[disks]]
path = "/data/extra.img"
read-only = true

[[shares]]
tag = "home"
path = "/Users/me"
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
        assert_eq!(c.serial, SerialBackend::Unix("/tmp/console.sock".into()));
        assert_eq!(c.network, Network::Nic(NetBackend::Tap("tap0".into())));
        assert_eq!(c.mac, Some(MacAddress([0x52, 0x54, 0, 0x12, 0x34, 0x56])));
        assert_eq!(c.on_panic, PanicPolicy::Pause);
        assert_eq!(c.model.as_deref(), Some("VM0001"));
        assert_eq!(c.soc_name.as_deref(), Some("Apple M4 (Virtual)"));
        assert_eq!(c.msi, Some(Msi::On));
        assert_eq!(c.aux.offset, VZ_AUX_HEADER);
        assert!(c.disks[0].read_only);
        assert_eq!(
            c.shares,
            [ShareSpec::new("home".into(), "/Users/me".into(), true).unwrap()]
        );
        assert_eq!(
            c.display.modes.as_slice(),
            [
                DisplayMode::new(2560, 1600, 60),
                DisplayMode::new(1920, 1080, 60)
            ]
        );
        // Serialising and parsing again gives the same configuration.
        assert_eq!(VmConfig::from_toml(&c.to_toml()).unwrap(), c);
    }

    #[test]
    fn a_share_tag_used_twice_is_refused() {
        let text = FULL.replace(
            "[display]",
            "[[shares]]\ntag = \"home\"\npath = \"/elsewhere\"\n\n[display]",
        );
        let e = VmConfig::from_toml(&text).unwrap_err().to_string();
        assert!(e.contains("tag \"home\" is used twice"), "{e}");
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = VmConfig::from_toml(
            "cpus = 1\nmemory = 1073741824\n[aux]\npath = \"a\"\n[root]\npath = \"r\"\n",
        )
        .unwrap();
        assert_eq!(c.memory, Size(1 << 30));
        assert_eq!(c.network, Network::Nic(NetBackend::Passt));
        assert_eq!(c.serial, SerialBackend::Stdio);
        assert_eq!(c.on_panic, PanicPolicy::Exit);
        assert_eq!(c.ecid, None);
        assert_eq!((c.model, c.soc_name), (None, None));
        assert_eq!(c.msi, None);
        assert_eq!(c.display.modes.len(), 1);
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = |text: String| VmConfig::from_toml(&text).unwrap_err().to_string();
        let e = err(FULL.replace("cpus = 4", "cpus = 4\ncpu = 4"));
        assert!(e.contains("unknown field `cpu`"), "{e}");
        let e = err(FULL.replace("offset = 16384", "ofset = 1"));
        assert!(e.contains("unknown field `ofset`"), "{e}");
        let e = err(FULL.replace("[display]", "[display]\nmode = 1"));
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
                "not a panic policy",
            ),
            ("ecid = \"1234567890123456789\"", "ecid = \"12x\"", "ecid"),
            ("\"2560x1600\"", "\"0x1600\"", "width must be at least 1"),
            ("\"1920x1080\"", "\"2560x1600@60\"", "repeats mode 1"),
            (
                "serial = \"unix:/tmp/console.sock\"",
                "serial = \"pty\"",
                "expected stdio",
            ),
        ];
        for (from, to, want) in cases {
            let text = FULL.replace(from, to);
            assert_ne!(text, FULL, "{from}");
            let e = VmConfig::from_toml(&text).unwrap_err().to_string();
            assert!(e.contains(want), "{to}: {e}");
        }
    }

    #[test]
    fn ecids_past_i64_survive_a_save() {
        let c = VmConfig::from_toml(&FULL.replace("\"1234567890123456789\"", "42")).unwrap();
        assert_eq!(c.ecid, Some(Ecid(42)));
        let mut c = c;
        c.ecid = Some(Ecid(u64::MAX));
        assert_eq!(
            VmConfig::from_toml(&c.to_toml()).unwrap().ecid,
            Some(Ecid(u64::MAX))
        );
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
