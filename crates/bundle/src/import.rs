//! Importing VMs made by other tools: Tart VM directories and macosvm JSON
//! configurations.
//!
//! The field names follow the tools' own sources: cirruslabs/tart
//! `Sources/tart/VMConfig.swift` and `Platform/Darwin.swift` (config.json),
//! `VMDirectory.swift` (disk.img, nvram.bin); s-u/macosvm
//! `macosvm/VMInstance.m` (`readFromJSON:`). Every setting that does not map
//! onto vmapple is reported in [`ImportedVm::warnings`]; the mapping table is
//! in `docs/bundles.md`.
//!
//! Imported disks are referenced where they are, not copied: the aux file
//! keeps its 16 KiB Virtualization.framework header and is given
//! `offset = 16384` (vmapple-machine.md §16.2) instead of being trimmed.
//!
//! A VM description can come from anyone, and the bundle made from it
//! opens its disks read-write, so every file it references must lie
//! inside the source VM's directory (no absolute path, no `..`, no
//! symbolic link out of it) unless the user says otherwise
//! ([`OutsideFiles::Allow`], `vmapple import --allow-outside-files`).

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::config::{
    DiskSpec, DisplayMode, DisplayModes, MacAddress, NetBackend, Network, SerialBackend, Size,
    VmConfig, MAX_CPUS, MEMORY_ALIGN, VZ_AUX_HEADER,
};
use crate::hardware_model::{HardwareModel, HardwareModelError};
use crate::identity::{self, IdentityError};

/// The most guest RAM a Tart config may ask for (1 TiB): more is a broken
/// or hostile image, not a VM to run.
pub const MAX_TART_MEMORY: u64 = 1 << 40;

/// A VM description ready to become a bundle
/// ([`crate::Bundle::create_imported`]).
#[derive(Debug, Clone)]
pub struct ImportedVm {
    /// Disks point at the source files by absolute path.
    pub config: VmConfig,
    pub ecid: u64,
    /// The source's `hardwareModel`, kept in the bundle as
    /// `HardwareModel` (vmapple itself does not act on it).
    pub hardware_model: Option<HardwareModel>,
    /// Everything in the source that vmapple does not use or does
    /// differently, one sentence each.
    pub warnings: Vec<String>,
}

/// Whether an import may reference files outside the source VM's
/// directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutsideFiles {
    #[default]
    Refuse,
    Allow,
}

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{what} {} is outside {} (the directory of the VM being imported); refusing to point a disk there: pass --allow-outside-files if you trust this VM", file.display(), dir.display())]
    Outside {
        what: String,
        file: PathBuf,
        dir: PathBuf,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    HardwareModel(#[from] HardwareModelError),
    #[error("{}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
}

fn invalid(path: &Path, message: impl Into<String>) -> ImportError {
    ImportError::Invalid {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

fn read_json(path: &Path) -> Result<Map<String, Value>, ImportError> {
    let data = identity::read_bounded(path)?;
    match serde_json::from_slice(&data) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(invalid(path, "top level is not a JSON object")),
        Err(e) => Err(invalid(path, format!("not valid JSON: {e}"))),
    }
}

fn absolute(path: &Path) -> Result<PathBuf, ImportError> {
    std::path::absolute(path).map_err(|source| ImportError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Checks that `file` (as named in the source, relative to `dir`) stays
/// inside `dir`: not absolute, no `..`, and no symbolic link on the way
/// that leads out (the deepest part of the path that exists is resolved).
fn confine(
    dir: &Path,
    file: &Path,
    what: &str,
    policy: OutsideFiles,
) -> Result<PathBuf, ImportError> {
    let joined = absolute(&dir.join(file))?;
    if policy == OutsideFiles::Allow {
        return Ok(joined);
    }
    let outside = || ImportError::Outside {
        what: what.to_string(),
        file: joined.clone(),
        dir: dir.to_path_buf(),
    };
    let lexical_escape = file.components().any(|c| {
        matches!(
            c,
            std::path::Component::ParentDir
                | std::path::Component::RootDir
                | std::path::Component::Prefix(_)
        )
    });
    if lexical_escape {
        return Err(outside());
    }
    let root = fs::canonicalize(dir).map_err(|source| ImportError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut existing = joined.as_path();
    loop {
        match fs::canonicalize(existing) {
            Ok(real) if real.starts_with(&root) => return Ok(joined),
            Ok(_) => return Err(outside()),
            Err(_) => match existing.parent() {
                Some(p) => existing = p,
                None => return Err(outside()),
            },
        }
    }
}

fn cpus_from(path: &Path, key: &str, v: &Value) -> Result<u32, ImportError> {
    v.as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .filter(|n| (1..=MAX_CPUS).contains(n))
        .ok_or_else(|| {
            invalid(
                path,
                format!("{key} = {v}: vmapple runs 1 to {MAX_CPUS} CPUs"),
            )
        })
}

fn memory_from(path: &Path, key: &str, v: &Value) -> Result<u64, ImportError> {
    v.as_u64()
        .filter(|n| *n != 0 && n % MEMORY_ALIGN == 0)
        .ok_or_else(|| {
            invalid(
                path,
                format!("{key} = {v}: expected a non-zero byte count, a multiple of 64 KiB"),
            )
        })
}

fn require_file(dir: &Path, name: &str, policy: OutsideFiles) -> Result<PathBuf, ImportError> {
    let path = dir.join(name);
    let (path, what) = (path.as_path(), name);
    match fs::metadata(path) {
        Ok(m) if m.is_file() => confine(dir, Path::new(name), name, policy),
        Ok(_) => Err(invalid(path, format!("{what} is not a regular file"))),
        Err(source) => Err(ImportError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Imports a Tart VM directory (`~/.tart/vms/NAME`): `config.json`,
/// `disk.img` (root disk), `nvram.bin` (auxiliary storage).
pub fn import_tart(dir: &Path, policy: OutsideFiles) -> Result<ImportedVm, ImportError> {
    let config_path = dir.join("config.json");
    let json = identity::read_bounded(&config_path)?;
    // Configuration errors first: they say more than a missing disk.
    let mut vm = tart_vm(&json, &config_path, "nvram.bin", DiskSpec::new("disk.img"))?;
    vm.config.root.path = require_file(dir, "disk.img", policy)?;
    vm.config.aux.path = require_file(dir, "nvram.bin", policy)?;
    let warnings = &mut vm.warnings;
    warnings.push(
        "Tart chooses networking at `tart run` time; the imported VM uses network = \"passt\" (user-mode NAT)"
            .into(),
    );
    if let Ok(entries) = fs::read_dir(dir) {
        let mut extra: Vec<String> = entries
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !matches!(n.as_str(), "config.json" | "disk.img" | "nvram.bin"))
            .collect();
        extra.sort();
        for name in extra {
            let why = match name.as_str() {
                "state.vzvmsave" => {
                    "a suspended VM state cannot be resumed by vmapple; the VM cold-boots"
                }
                _ => "not used by vmapple",
            };
            warnings.push(format!("{name}: {why}"));
        }
    }
    Ok(vm)
}

/// The vmapple view of a Tart `config.json` (its bytes; `config_path`
/// names it in messages) whose disks are `aux_path` (nvram.bin, a
/// Virtualization.framework aux file with its header) and `root`
/// (disk.img). Refuses what vmapple cannot run; everything it runs
/// differently is a warning.
pub fn tart_vm(
    json: &[u8],
    config_path: &Path,
    aux_path: &str,
    root: DiskSpec,
) -> Result<ImportedVm, ImportError> {
    let aux = DiskSpec {
        path: aux_path.into(),
        read_only: false,
        offset: VZ_AUX_HEADER,
    };
    let p = config_path;
    let json = match serde_json::from_slice(json) {
        Ok(Value::Object(m)) => m,
        Ok(_) => return Err(invalid(p, "top level is not a JSON object")),
        Err(e) => return Err(invalid(p, format!("not valid JSON: {e}"))),
    };
    let mut warnings = Vec::new();
    let mut hardware_model = None;
    let os = json.get("os").and_then(Value::as_str).unwrap_or("darwin");
    if os != "darwin" {
        return Err(invalid(
            p,
            format!("os = {os:?}: vmapple runs macOS guests only"),
        ));
    }
    let arch = json.get("arch").and_then(Value::as_str).unwrap_or("arm64");
    if arch != "arm64" {
        return Err(invalid(
            p,
            format!("arch = {arch:?}: vmapple runs arm64 guests only"),
        ));
    }
    let cpus = cpus_from(p, "cpuCount", json.get("cpuCount").unwrap_or(&Value::Null))?;
    let memory = memory_from(
        p,
        "memorySize",
        json.get("memorySize").unwrap_or(&Value::Null),
    )?;
    if memory > MAX_TART_MEMORY {
        return Err(invalid(
            p,
            format!("memorySize = {memory}: more than the {MAX_TART_MEMORY} bytes vmapple accepts"),
        ));
    }
    let ecid = identity::ecid_from_tart_config(
        &serde_json::to_vec(&json).unwrap_or_default(),
        &config_path.display().to_string(),
    )?;

    let mut config = VmConfig::new(cpus, memory, aux, root);
    config.ecid = Some(crate::config::Ecid(ecid));

    for (key, value) in &json {
        match key.as_str() {
            "os" | "arch" | "cpuCount" | "memorySize" | "ecid" => {}
            "version" => {
                if value.as_u64() != Some(1) {
                    warnings.push(format!(
                        "Tart config version {value} is newer than the version 1 this importer knows; check the result"
                    ));
                }
            }
            "cpuCountMin" => {
                if value.as_u64().is_some_and(|min| u64::from(cpus) < min) {
                    warnings.push(format!(
                        "cpuCount {cpus} is below the image's cpuCountMin {value}; macOS may refuse to boot"
                    ));
                }
            }
            "memorySizeMin" => {
                if value.as_u64().is_some_and(|min| memory < min) {
                    warnings.push(format!(
                        "memorySize {memory} is below the image's memorySizeMin {value}; macOS may refuse to boot"
                    ));
                }
            }
            "macAddress" => match value.as_str().map(str::parse::<MacAddress>) {
                Some(Ok(mac)) => config.mac = Some(mac),
                _ => warnings.push(format!(
                    "macAddress {value} is not a usable MAC address; a random one will be used"
                )),
            },
            "display" => {
                let w = value.get("width").and_then(Value::as_u64);
                let h = value.get("height").and_then(Value::as_u64);
                match w.zip(h).and_then(|(w, h)| display_mode(w, h)) {
                    Some(m) => config.display.modes = DisplayModes::new(vec![m]).expect("one mode"),
                    None => warnings.push(format!(
                        "display {value} is not a usable WIDTHxHEIGHT; the default mode is used"
                    )),
                }
                if let Some(obj) = value.as_object() {
                    for k in obj.keys().filter(|k| *k != "width" && *k != "height") {
                        warnings.push(format!("display.{k} is not supported and was ignored"));
                    }
                }
            }
            // A model vmapple cannot read refuses the import: it is kept
            // and pushed as the VM's own, so it must at least be one.
            "hardwareModel" => {
                hardware_model = crate::hardware_model::from_json(&json, &p.display().to_string())?
            }
            "sync" => {
                if value.as_str() != Some("full") {
                    warnings.push(format!(
                        "sync = {value} not supported: vmapple flushes to disk whenever the guest asks"
                    ));
                }
            }
            other => warnings.push(format!(
                "{other} = {value} is not supported and was ignored"
            )),
        }
    }
    note_hardware_model(hardware_model.as_ref(), &mut warnings);
    Ok(ImportedVm {
        config,
        ecid,
        hardware_model,
        warnings,
    })
}

/// Imports a macosvm JSON configuration. Relative disk paths are taken
/// relative to the JSON file's directory.
pub fn import_macosvm(json_path: &Path, policy: OutsideFiles) -> Result<ImportedVm, ImportError> {
    let json = read_json(json_path)?;
    let base = json_path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    import_macosvm_value(&json, json_path, base, policy)
}

fn import_macosvm_value(
    json: &Map<String, Value>,
    p: &Path,
    base: &Path,
    policy: OutsideFiles,
) -> Result<ImportedVm, ImportError> {
    let mut warnings = Vec::new();
    let mut hardware_model = None;
    let os = json.get("os").and_then(Value::as_str).unwrap_or("macos");
    if os != "macos" {
        return Err(invalid(
            p,
            format!("os = {os:?}: vmapple runs macOS guests only"),
        ));
    }
    let cpus = cpus_from(p, "cpus", json.get("cpus").unwrap_or(&Value::Null))?;
    let memory = memory_from(p, "ram", json.get("ram").unwrap_or(&Value::Null))?;
    let ecid = identity::ecid_from_macosvm_json(
        &serde_json::to_vec(json).unwrap_or_default(),
        &p.display().to_string(),
    )?;

    let storage = json
        .get("storage")
        .and_then(Value::as_array)
        .ok_or_else(|| {
            invalid(
                p,
                "no storage array: a macOS VM needs a disk and an aux entry",
            )
        })?;
    let mut aux: Option<DiskSpec> = None;
    let mut disks: Vec<DiskSpec> = Vec::new();
    for (i, entry) in storage.iter().enumerate() {
        let Some(obj) = entry.as_object() else {
            warnings.push(format!("storage[{i}] is not an object and was ignored"));
            continue;
        };
        let kind = obj.get("type").and_then(Value::as_str).unwrap_or("");
        let Some(file) = obj.get("file").and_then(Value::as_str) else {
            warnings.push(format!(
                "storage[{i}] ({kind}) has no file (URL-backed storage is not supported) and was ignored"
            ));
            continue;
        };
        let read_only = obj
            .get("readOnly")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        for (k, v) in obj {
            match k.as_str() {
                "type" | "file" | "readOnly" => {}
                _ => warnings.push(format!(
                    "storage[{i}].{k} = {v} is not supported and was ignored"
                )),
            }
        }
        let path = confine(base, Path::new(file), &format!("storage[{i}] file"), policy)?;
        if !path.is_file() {
            warnings.push(format!("storage[{i}]: {} does not exist", path.display()));
        }
        match kind {
            "disk" => disks.push(DiskSpec {
                path,
                read_only,
                offset: 0,
            }),
            "aux" if aux.is_none() => {
                aux = Some(DiskSpec {
                    path,
                    read_only,
                    offset: VZ_AUX_HEADER,
                })
            }
            "aux" => warnings.push(format!("storage[{i}]: a second aux entry was ignored")),
            other => warnings.push(format!(
                "storage[{i}]: type {other:?} is not supported and was ignored"
            )),
        }
    }
    let aux = aux.ok_or_else(|| invalid(p, "storage has no \"aux\" entry"))?;
    if disks.is_empty() {
        return Err(invalid(p, "storage has no \"disk\" entry"));
    }
    let root = disks.remove(0);
    let mut config = VmConfig::new(cpus, memory, aux, root);
    config.disks = disks;
    config.ecid = Some(crate::config::Ecid(ecid));
    config.memory = Size(memory);

    for (key, value) in json {
        match key.as_str() {
            "os" | "cpus" | "ram" | "machineId" | "storage" | "version" => {}
            // A model vmapple cannot read refuses the import: it is kept
            // and pushed as the VM's own, so it must at least be one.
            "hardwareModel" => {
                hardware_model = crate::hardware_model::from_json(json, &p.display().to_string())?
            }
            "displays" => {
                let list = value.as_array().map(Vec::as_slice).unwrap_or(&[]);
                let mut modes = Vec::new();
                for (i, d) in list.iter().enumerate() {
                    let w = d.get("width").and_then(Value::as_u64);
                    let h = d.get("height").and_then(Value::as_u64);
                    match w.zip(h).and_then(|(w, h)| display_mode(w, h)) {
                        // Two displays of one size are one mode.
                        Some(m) if modes.contains(&m) => {}
                        Some(_) if modes.len() == crate::config::display::MAX_MODES => {
                            warnings.push(format!("displays[{i}]: too many displays, ignored"))
                        }
                        Some(m) => modes.push(m),
                        None => warnings.push(format!("displays[{i}] has no usable width/height")),
                    }
                    if d.get("dpi").is_some() {
                        warnings.push(format!(
                            "displays[{i}].dpi is not supported (vmapple has no pixel-density setting)"
                        ));
                    }
                }
                if list.len() > 1 {
                    warnings.push(format!(
                        "{} displays: vmapple has one display; their sizes become modes of it",
                        list.len()
                    ));
                }
                if !modes.is_empty() {
                    config.display.modes =
                        DisplayModes::new(modes).expect("distinct modes, at most MAX_MODES");
                }
            }
            "networks" => {
                let list = value.as_array().map(Vec::as_slice).unwrap_or(&[]);
                if list.is_empty() {
                    config.network = Network::None;
                }
                for (i, n) in list.iter().enumerate() {
                    if i > 0 {
                        warnings.push(format!(
                            "networks[{i}] ignored: vmapple has one network card"
                        ));
                        continue;
                    }
                    if let Some(mac) = n.get("mac") {
                        match mac.as_str().map(str::parse::<MacAddress>) {
                            Some(Ok(m)) => config.mac = Some(m),
                            _ => warnings.push(format!("networks[0].mac {mac} is not usable")),
                        }
                    }
                    // macosvm treats a missing type as NAT.
                    config.network = Network::Nic(NetBackend::Passt);
                    match n.get("type").and_then(Value::as_str) {
                        None | Some("nat") => {}
                        Some("unix") => warnings.push(
                            "networks[0] type unix (macosvm's datagram socket to a slirp proxy) is not supported; using passt (user-mode NAT)"
                                .into(),
                        ),
                        Some(other) => warnings.push(format!(
                            "networks[0] type {other} is not supported; using passt (user-mode NAT)"
                        )),
                    }
                    if let Some(obj) = n.as_object() {
                        for k in obj.keys().filter(|k| !matches!(k.as_str(), "type" | "mac")) {
                            warnings
                                .push(format!("networks[0].{k} is not supported and was ignored"));
                        }
                    }
                }
            }
            "serial" => {
                if value.as_bool() == Some(false) || value.as_u64() == Some(0) {
                    config.serial = SerialBackend::None;
                }
            }
            "audio" => {
                if value.as_bool() == Some(true) || value.as_u64().is_some_and(|v| v != 0) {
                    warnings.push("audio is not supported by vmapple and was dropped".into());
                }
            }
            "shares" => {
                if value.as_array().is_some_and(|a| !a.is_empty()) {
                    warnings.push(
                        "shares (virtio-fs directories) are not supported and were dropped".into(),
                    );
                }
            }
            other => warnings.push(format!("{other} is not supported and was ignored")),
        }
    }
    note_hardware_model(hardware_model.as_ref(), &mut warnings);
    Ok(ImportedVm {
        config,
        ecid,
        hardware_model,
        warnings,
    })
}

/// What the user should know about a source's hardware model: vmapple
/// keeps it but runs its one machine whatever it says, and what a guest
/// needs of a version-2 model is unknown.
fn note_hardware_model(model: Option<&HardwareModel>, warnings: &mut Vec<String>) {
    let Some(model) = model else {
        warnings.push("no hardwareModel: the bundle has none (push makes one up)".into());
        return;
    };
    let mut note = format!("hardware model {model}: kept in the bundle; vmapple emulates one fixed machine whatever it says");
    if model.representation == crate::hardware_model::Representation::V2 {
        note.push_str(
            " (version 2 models come with macOS 26 restore images; whether a guest on vmapple needs anything of them is unknown)",
        );
    }
    warnings.push(note);
}

/// A display size from an imported VM as a mode at the usual 60 Hz; `None`
/// if a side is 0 or past what a mode can hold.
fn display_mode(width: u64, height: u64) -> Option<DisplayMode> {
    let side = |v: u64| u16::try_from(v).ok().filter(|&v| v > 0);
    Some(DisplayMode::new(
        side(width)?,
        side(height)?,
        vm_config::display::LEGACY_REFRESH_HZ,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hardware_model::{tests::model_plist, Representation, HARDWARE_MODEL_FILE};
    use crate::identity::{encode_base64, machine_identifier_plist};

    const ECID: u64 = 1234567890123456789;

    /// The Tart fixtures' hardware model: version 1, binary.
    fn tart_model() -> Vec<u8> {
        model_plist(1, 2, [13, 0, 0], true)
    }

    fn tart_dir(extra: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let ecid = encode_base64(&machine_identifier_plist(ECID));
        let model = encode_base64(&tart_model());
        let config = format!(
            r#"{{
  "version" : 1,
  "os" : "darwin",
  "arch" : "arm64",
  "ecid" : "{ecid}",
  "hardwareModel" : "{model}",
  "cpuCountMin" : 4,
  "cpuCount" : 6,
  "memorySizeMin" : 8589934592,
  "memorySize" : 17179869184,
  "macAddress" : "7a:65:e4:3c:2b:01",
  "display" : {{ "width" : 1024, "height" : 768 }},
  "sync" : "full"{extra}
}}"#
        );
        fs::write(dir.path().join("config.json"), config).unwrap();
        fs::File::create(dir.path().join("disk.img"))
            .unwrap()
            .set_len(50 << 30)
            .unwrap();
        fs::File::create(dir.path().join("nvram.bin"))
            .unwrap()
            .set_len(32 << 20)
            .unwrap();
        dir
    }

    #[test]
    fn tart_import_maps_every_field() {
        let dir = tart_dir("");
        let vm = import_tart(dir.path(), OutsideFiles::Refuse).unwrap();
        let c = &vm.config;
        assert_eq!(c.cpus, 6);
        assert_eq!(c.memory, Size(16 << 30));
        assert_eq!(vm.ecid, ECID);
        assert_eq!(c.ecid, Some(crate::config::Ecid(ECID)));
        assert_eq!(c.root.path, dir.path().join("disk.img"));
        assert_eq!(c.aux.path, dir.path().join("nvram.bin"));
        assert_eq!(c.aux.offset, 0x4000);
        assert_eq!(c.root.offset, 0);
        assert_eq!(c.mac.unwrap().to_string(), "7a:65:e4:3c:2b:01");
        assert_eq!(c.display.modes[0].to_string(), "1024x768@60");
        let model = vm.hardware_model.as_ref().unwrap();
        assert_eq!(model.representation, Representation::V1);
        assert_eq!(model.minimum_os, [13, 0, 0]);
        assert!(vm.warnings.iter().any(|w| w.contains(
            "hardware model DataRepresentationVersion 1, PlatformVersion 2, MinimumSupportedOS 13.0.0: kept"
        )));
        assert!(vm.warnings.iter().any(|w| w.contains("passt")));
        assert!(!vm.warnings.iter().any(|w| w.contains("cpuCountMin")));
        c.validate().unwrap();
    }

    #[test]
    fn tart_unknowns_become_warnings() {
        let dir = tart_dir(r#", "diskFormat" : "asif", "sync" : "none""#);
        fs::write(dir.path().join("state.vzvmsave"), "x").unwrap();
        let vm = import_tart(dir.path(), OutsideFiles::Refuse).unwrap();
        let w = vm.warnings.join("\n");
        assert!(w.contains("diskFormat = \"asif\" is not supported"), "{w}");
        assert!(w.contains("sync = \"none\""), "{w}");
        assert!(w.contains("state.vzvmsave: a suspended VM state"), "{w}");
    }

    #[test]
    fn tart_refusals() {
        let dir = tart_dir("");
        let cfg = dir.path().join("config.json");
        let text = fs::read_to_string(&cfg).unwrap();

        fs::write(&cfg, text.replace("\"darwin\"", "\"linux\"")).unwrap();
        let e = import_tart(dir.path(), OutsideFiles::Refuse)
            .unwrap_err()
            .to_string();
        assert!(e.contains("macOS guests only"), "{e}");

        fs::write(&cfg, text.replace("\"cpuCount\" : 6", "\"cpuCount\" : 64")).unwrap();
        let e = import_tart(dir.path(), OutsideFiles::Refuse)
            .unwrap_err()
            .to_string();
        assert!(e.contains("cpuCount = 64"), "{e}");

        fs::write(&cfg, text.replace("\"cpuCount\" : 6", "\"cpuCount\" : 2")).unwrap();
        let vm = import_tart(dir.path(), OutsideFiles::Refuse).unwrap();
        assert!(vm
            .warnings
            .iter()
            .any(|w| w.contains("below the image's cpuCountMin")));

        let model = encode_base64(&tart_model());
        for (bad, why) in [
            (
                encode_base64(&model_plist(3, 2, [13, 0, 0], true)),
                "DataRepresentationVersion 3 is unknown",
            ),
            (
                encode_base64(b"bplist00"),
                "hardwareModel is not a property list",
            ),
            ("not base64!".into(), "hardwareModel is not a base64 string"),
        ] {
            fs::write(&cfg, text.replace(&model, &bad)).unwrap();
            let e = import_tart(dir.path(), OutsideFiles::Refuse)
                .unwrap_err()
                .to_string();
            assert!(e.contains(why), "{e}");
            assert!(e.contains("config.json"), "{e}");
        }

        fs::write(&cfg, &text).unwrap();
        fs::remove_file(dir.path().join("nvram.bin")).unwrap();
        let e = import_tart(dir.path(), OutsideFiles::Refuse)
            .unwrap_err()
            .to_string();
        assert!(e.contains("nvram.bin"), "{e}");
    }

    #[test]
    fn tart_import_becomes_a_bundle() {
        let dir = tart_dir("");
        let vm = import_tart(dir.path(), OutsideFiles::Refuse).unwrap();
        let home = tempfile::tempdir().unwrap();
        crate::Bundle::create_imported(&home.path().join("t.vmapple"), &vm).unwrap();
        let b = crate::Bundle::open_in(home.path(), Path::new("t")).unwrap();
        assert_eq!(b.ecid().unwrap(), ECID);
        assert_eq!(b.config().cpus, 6);
        // The model is kept byte for byte, and pushed as it came.
        assert_eq!(
            fs::read(b.dir().join(HARDWARE_MODEL_FILE)).unwrap(),
            tart_model()
        );
        assert_eq!(b.hardware_model().unwrap().unwrap().minimum_os, [13, 0, 0]);
        let (json, warnings) = crate::tart::tart_config_for_push(&b).unwrap();
        let json: Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(json["hardwareModel"], encode_base64(&tart_model()));
        assert!(
            !warnings.iter().any(|w| w.contains("made up")),
            "{warnings:?}"
        );
        assert_eq!(
            b.resolve(&b.config().root.path),
            dir.path().join("disk.img")
        );
    }

    fn macosvm_json(dir: &Path, extra: &str) -> PathBuf {
        fs::write(dir.join("disk.img"), "").unwrap();
        fs::write(dir.join("aux.img"), "").unwrap();
        let id = encode_base64(&machine_identifier_plist(ECID));
        let model = encode_base64(&model_plist(2, 2, [26, 0, 0], false));
        let text = format!(
            r#"{{
  "hardwareModel":"{model}",
  "storage":[
    {{"type":"disk", "file":"disk.img", "readOnly":false}},
    {{"type":"aux", "file":"aux.img", "readOnly":false}},
    {{"type":"disk", "file":"/data/extra.img", "readOnly":true}}
  ],
  "ram":4294967296,
  "machineId":"{id}",
  "displays":[{{"dpi":200, "width":2560, "height":1600}}],
  "version":1,
  "cpus":2,
  "networks":[{{"type":"nat", "mac":"52:54:00:00:00:09"}}],
  "audio":false{extra}
}}"#
        );
        let p = dir.join("macosvm.json");
        fs::write(&p, text).unwrap();
        p
    }

    /// A disk named outside the macosvm JSON's directory (absolute, `..`,
    /// or through a symbolic link) is refused unless allowed, and the
    /// error names the file.
    #[test]
    fn macosvm_files_outside_the_vm_directory_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = macosvm_json(dir.path(), "");
        let e = import_macosvm(&p, OutsideFiles::Refuse)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("storage[2] file /data/extra.img is outside"),
            "{e}"
        );
        assert!(e.contains("--allow-outside-files"), "{e}");

        let text = fs::read_to_string(&p).unwrap();
        let victim = tempfile::tempdir().unwrap();
        fs::write(victim.path().join("secret.img"), "x").unwrap();
        std::os::unix::fs::symlink(victim.path(), dir.path().join("link")).unwrap();
        for (file, shown) in [
            ("../escape.img", "../escape.img"),
            ("sub/../../escape.img", "escape.img"),
            ("link/secret.img", "link/secret.img"),
            ("link/missing.img", "link/missing.img"),
        ] {
            fs::write(&p, text.replace("/data/extra.img", file)).unwrap();
            let e = import_macosvm(&p, OutsideFiles::Refuse)
                .unwrap_err()
                .to_string();
            assert!(e.contains("is outside") && e.contains(shown), "{file}: {e}");
        }
        fs::create_dir(dir.path().join("sub")).unwrap();
        fs::write(dir.path().join("sub/extra.img"), "").unwrap();
        fs::write(&p, text.replace("/data/extra.img", "sub/extra.img")).unwrap();
        let vm = import_macosvm(&p, OutsideFiles::Refuse).unwrap();
        assert_eq!(vm.config.disks[0].path, dir.path().join("sub/extra.img"));
    }

    #[test]
    fn tart_disks_linked_out_of_the_vm_directory_are_refused() {
        let dir = tart_dir("");
        let victim = tempfile::tempdir().unwrap();
        fs::write(victim.path().join("home.img"), "x").unwrap();
        fs::remove_file(dir.path().join("disk.img")).unwrap();
        std::os::unix::fs::symlink(victim.path().join("home.img"), dir.path().join("disk.img"))
            .unwrap();
        let e = import_tart(dir.path(), OutsideFiles::Refuse)
            .unwrap_err()
            .to_string();
        assert!(e.contains("disk.img"), "{e}");
        assert!(e.contains("is outside"), "{e}");
        let vm = import_tart(dir.path(), OutsideFiles::Allow).unwrap();
        assert_eq!(vm.config.root.path, dir.path().join("disk.img"));
    }

    #[test]
    fn macosvm_import() {
        let dir = tempfile::tempdir().unwrap();
        let vm = import_macosvm(&macosvm_json(dir.path(), ""), OutsideFiles::Allow).unwrap();
        let c = &vm.config;
        assert_eq!(vm.ecid, ECID);
        assert_eq!(c.cpus, 2);
        assert_eq!(c.memory, Size(4 << 30));
        assert_eq!(c.root.path, dir.path().join("disk.img"));
        assert_eq!(c.aux.path, dir.path().join("aux.img"));
        assert_eq!(c.aux.offset, 0x4000);
        assert_eq!(c.disks.len(), 1);
        assert!(c.disks[0].read_only);
        assert_eq!(c.network, Network::Nic(NetBackend::Passt));
        let model = vm.hardware_model.as_ref().unwrap();
        assert_eq!(model.representation, Representation::V2);
        assert_eq!(model.minimum_os, [26, 0, 0]);
        assert!(vm.warnings.iter().any(|w| w.contains("version 2 models")));
        assert_eq!(c.mac.unwrap().to_string(), "52:54:00:00:00:09");
        assert_eq!(c.display.modes[0].to_string(), "2560x1600@60");
        let w = vm.warnings.join("\n");
        assert!(w.contains("dpi"), "{w}");
        assert!(w.contains("/data/extra.img does not exist"), "{w}");
        assert!(!w.contains("audio"), "{w}");
    }

    #[test]
    fn macosvm_unsupported_settings_warn() {
        let dir = tempfile::tempdir().unwrap();
        let p = macosvm_json(
            dir.path(),
            r#", "audio":true, "shares":[{"path":"/x"}], "serial":false, "spice":1"#,
        );
        let text = fs::read_to_string(&p).unwrap().replace(
            r#"[{"type":"nat", "mac":"52:54:00:00:00:09"}]"#,
            r#"[{"type":"bridge","interface":"en0"},{"type":"nat"}]"#,
        );
        fs::write(&p, text).unwrap();
        let vm = import_macosvm(&p, OutsideFiles::Allow).unwrap();
        let w = vm.warnings.join("\n");
        for want in [
            "audio",
            "shares",
            "spice is not supported",
            "bridge is not supported",
            "networks[0].interface",
            "networks[1] ignored",
        ] {
            assert!(w.contains(want), "{want}: {w}");
        }
        assert_eq!(vm.config.serial, SerialBackend::None);
    }

    #[test]
    fn macosvm_networks() {
        let dir = tempfile::tempdir().unwrap();
        let p = macosvm_json(dir.path(), "");
        let text = fs::read_to_string(&p).unwrap();
        let nat = r#"[{"type":"nat", "mac":"52:54:00:00:00:09"}]"#;

        fs::write(
            &p,
            text.replace(nat, r#"[{"type":"unix","path":"/tmp/slirp"}]"#),
        )
        .unwrap();
        let vm = import_macosvm(&p, OutsideFiles::Allow).unwrap();
        assert_eq!(vm.config.network, Network::Nic(NetBackend::Passt));
        let w = vm.warnings.join("\n");
        assert!(w.contains("datagram socket"), "{w}");
        assert!(w.contains("networks[0].path"), "{w}");

        fs::write(&p, text.replace(nat, "[]")).unwrap();
        assert_eq!(
            import_macosvm(&p, OutsideFiles::Allow)
                .unwrap()
                .config
                .network,
            Network::None
        );

        fs::write(&p, text.replace(nat, "[{}]")).unwrap();
        let vm = import_macosvm(&p, OutsideFiles::Allow).unwrap();
        assert_eq!(vm.config.network, Network::Nic(NetBackend::Passt));
        assert!(!vm.warnings.iter().any(|w| w.contains("network")));
    }

    #[test]
    fn macosvm_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let p = macosvm_json(dir.path(), "");
        let text = fs::read_to_string(&p).unwrap();
        let cases = [
            (r#""type":"aux""#, r#""type":"usb""#, "no \"aux\" entry"),
            (r#""cpus":2"#, r#""cpus":"two""#, "cpus = \"two\""),
            (r#""ram":4294967296"#, r#""ram":5"#, "ram = 5"),
            (
                r#""machineId":""#,
                r#""machineId":"!!"#,
                "machineId is not base64",
            ),
        ];
        for (from, to, want) in cases {
            fs::write(&p, text.replace(from, to)).unwrap();
            let e = import_macosvm(&p, OutsideFiles::Allow)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{to}: {e}");
        }
    }
}
