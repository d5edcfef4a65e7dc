//! Bundles and Tart images (the registry side is the `oci` crate): making
//! a bundle out of a pulled Tart VM directory, and the Tart `config.json`
//! a bundle is pushed with.
//!
//! A pulled bundle keeps the image's own config.json as
//! `tart-config.json`, so a push of it gives back the image's keys
//! (`hardwareModel` above all) with vmapple's settings brought up to date,
//! and `image-source` records the reference and manifest digest pulled.

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::bundle::{
    random_u64, write_new, Bundle, BundleError, AUX_IMAGE, CONFIG_FILE, ROOT_IMAGE,
};
use crate::config::{DiskSpec, VZ_AUX_HEADER};
use crate::hardware_model::HARDWARE_MODEL_FILE;
use crate::identity::{self, MACHINE_IDENTIFIER_FILE};
use crate::import::{tart_vm, ImportError, ImportedVm};

/// The Tart config.json an image came with.
pub const TART_CONFIG_FILE: &str = "tart-config.json";
/// `REFERENCE@DIGEST` of the image a bundle was pulled from.
pub const IMAGE_SOURCE_FILE: &str = "image-source";

/// The Tart VM directory's file names (tart-oci.md §2).
pub const TART_CONFIG_JSON: &str = "config.json";
pub const TART_DISK: &str = "disk.img";
pub const TART_NVRAM: &str = "nvram.bin";

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> BundleError + '_ {
    move |source| BundleError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn import_err(e: ImportError) -> BundleError {
    match e {
        ImportError::Io { path, source } => BundleError::Io { path, source },
        ImportError::Identity(i) => BundleError::Identity(i),
        ImportError::HardwareModel(h) => BundleError::HardwareModel(h),
        ImportError::Invalid { path, message } => BundleError::Unusable { path, message },
        // A pulled image's files are all in the staging directory.
        e @ ImportError::Outside { .. } => BundleError::Unusable {
            path: PathBuf::new(),
            message: e.to_string(),
        },
    }
}

/// Checks a Tart config.json the way [`adopt_pulled`] will use it, before
/// anything else of the image is fetched.
pub fn check_tart_config(json: &[u8]) -> Result<ImportedVm, String> {
    tart_vm(
        json,
        Path::new(TART_CONFIG_JSON),
        AUX_IMAGE,
        DiskSpec::new(ROOT_IMAGE),
    )
    .map_err(|e| e.to_string())
}

/// Turns `staging`, a directory holding a pulled Tart VM (config.json,
/// disk.img, nvram.bin), into the bundle `dir`: files renamed in place
/// (nothing copied), a config.toml and MachineIdentifier written, then the
/// directory renamed to `dir`. `dir` must not exist. Returns the bundle
/// and the import's warnings.
pub fn adopt_pulled(
    staging: &Path,
    dir: &Path,
    source: &str,
) -> Result<(Bundle, Vec<String>), BundleError> {
    if fs::symlink_metadata(dir).is_ok() {
        return Err(BundleError::Exists {
            path: dir.to_path_buf(),
        });
    }
    let config_path = staging.join(TART_CONFIG_JSON);
    let json = identity::read_bounded(&config_path)?;
    let vm =
        tart_vm(&json, &config_path, AUX_IMAGE, DiskSpec::new(ROOT_IMAGE)).map_err(import_err)?;
    debug_assert_eq!(vm.config.aux.offset, VZ_AUX_HEADER);
    for (from, to) in [
        (TART_DISK, ROOT_IMAGE),
        (TART_NVRAM, AUX_IMAGE),
        (TART_CONFIG_JSON, TART_CONFIG_FILE),
    ] {
        let from = staging.join(from);
        fs::rename(&from, staging.join(to)).map_err(io_err(&from))?;
    }
    if let Some(model) = &vm.hardware_model {
        let path = staging.join(HARDWARE_MODEL_FILE);
        let _ = fs::remove_file(&path);
        write_new(&path, model.raw())?;
    }
    for (name, data) in [
        (
            MACHINE_IDENTIFIER_FILE,
            identity::machine_identifier_plist(vm.ecid),
        ),
        (IMAGE_SOURCE_FILE, format!("{source}\n").into_bytes()),
        (CONFIG_FILE, vm.config.to_toml().into_bytes()),
    ] {
        let path = staging.join(name);
        let _ = fs::remove_file(&path);
        write_new(&path, &data)?;
    }
    // rename(2) would replace an empty directory made meanwhile; check
    // once more right before.
    if fs::symlink_metadata(dir).is_ok() {
        return Err(BundleError::Exists {
            path: dir.to_path_buf(),
        });
    }
    fs::rename(staging, dir).map_err(io_err(dir))?;
    let bundle = Bundle::open(dir)?;
    Ok((bundle, vm.warnings))
}

/// The image a bundle was pulled from, if it was.
pub fn image_source(bundle: &Bundle) -> Option<String> {
    let text = fs::read_to_string(bundle.dir().join(IMAGE_SOURCE_FILE)).ok()?;
    let line = text.lines().next()?.trim();
    (!line.is_empty() && line.len() < 4096).then(|| line.to_string())
}

/// A `hardwareModel` for bundles that never had one: the keys observed in
/// Virtualization.framework's own (tart-oci.md §2.1). Whether VZ accepts
/// one not made by VZ is unconfirmed; pulled and imported bundles keep
/// their source's.
fn synthetic_hardware_model() -> Vec<u8> {
    let mut d = plist::Dictionary::new();
    d.insert(
        "DataRepresentationVersion".into(),
        plist::Value::Integer(1.into()),
    );
    d.insert(
        "MinimumSupportedOS".into(),
        plist::Value::Array(vec![
            plist::Value::Integer(12.into()),
            plist::Value::Integer(0.into()),
            plist::Value::Integer(0.into()),
        ]),
    );
    d.insert("PlatformVersion".into(), plist::Value::Integer(2.into()));
    let mut out = Vec::new();
    // Writing to a Vec cannot fail.
    let _ = plist::Value::Dictionary(d).to_writer_binary(&mut out);
    out
}

/// The Tart config.json to push `bundle` with: its `tart-config.json` if
/// it was pulled, else a new one; either way with the bundle's CPUs,
/// memory, MAC, display and ECID. Returns it and what the user should know.
pub fn tart_config_for_push(bundle: &Bundle) -> Result<(Vec<u8>, Vec<String>), BundleError> {
    let mut warnings = Vec::new();
    let config = bundle.config();
    let kept = bundle.dir().join(TART_CONFIG_FILE);
    let mut json: Map<String, Value> = match identity::read_bounded(&kept) {
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(Value::Object(m)) => m,
            _ => {
                return Err(BundleError::Unusable {
                    path: kept,
                    message: "not a JSON object".into(),
                })
            }
        },
        Err(_) => {
            // An imported bundle keeps its source's model byte for byte.
            let model = match bundle.hardware_model()? {
                Some(model) => model.raw().to_vec(),
                None => {
                    warnings.push(
                        "the bundle has no hardware model (made by `vmapple create`): its hardwareModel is made up by vmapple, which Tart's Virtualization.framework may refuse"
                            .into(),
                    );
                    synthetic_hardware_model()
                }
            };
            let mut m = Map::new();
            m.insert("version".into(), 1.into());
            m.insert("os".into(), "darwin".into());
            m.insert("arch".into(), "arm64".into());
            m.insert("cpuCountMin".into(), config.cpus.into());
            m.insert("memorySizeMin".into(), config.memory.0.into());
            m.insert(
                "hardwareModel".into(),
                identity::encode_base64(&model).into(),
            );
            m
        }
    };
    json.insert("cpuCount".into(), config.cpus.into());
    json.insert("memorySize".into(), config.memory.0.into());
    let mac = match config.mac {
        Some(m) => m.0,
        None => match json
            .get("macAddress")
            .and_then(Value::as_str)
            .map(str::parse)
        {
            Some(Ok(crate::config::MacAddress(m))) => m,
            _ => {
                let r = random_u64().map_err(io_err(Path::new("/dev/urandom")))?;
                let b = r.to_le_bytes();
                // Locally administered, unicast.
                [(b[0] & 0xfc) | 0x02, b[1], b[2], b[3], b[4], b[5]]
            }
        },
    };
    json.insert(
        "macAddress".into(),
        mac.iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
            .into(),
    );
    if let Some(mode) = config.display.modes.first() {
        let display = json
            .entry("display")
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(d) = display {
            d.insert("width".into(), mode.width.into());
            d.insert("height".into(), mode.height.into());
        }
    }
    json.insert(
        "ecid".into(),
        identity::encode_base64(&identity::machine_identifier_plist(bundle.ecid()?)).into(),
    );
    if config.aux.offset != VZ_AUX_HEADER {
        warnings.push(format!(
            "aux disk has offset {} (not {VZ_AUX_HEADER}): it is pushed as nvram.bin as it is, but Tart expects a Virtualization.framework aux file with its 16 KiB header",
            config.aux.offset
        ));
    }
    if !config.disks.is_empty() {
        warnings.push(format!(
            "{} extra disk(s) are not pushed: a Tart image has one disk",
            config.disks.len()
        ));
    }
    Ok((
        serde_json::to_vec(&Value::Object(json)).unwrap_or_default(),
        warnings,
    ))
}
