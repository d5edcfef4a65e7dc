//! `vmapple clone`: a new bundle with copies of a bundle's disks, sharing
//! blocks with them where the filesystem can (`FICLONE` on Linux,
//! `clonefile(2)` on macOS), else copied sparsely (holes stay holes).
//!
//! The clone gets a new MAC address and keeps the machine identity (a
//! macOS guest boots only on the ECID it was installed for) unless asked
//! for a new one. Disks outside the bundle (an imported VM's) are copied
//! into it, except read-only ones, which the clone may share.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

pub use block::clone::CopyKind;

use crate::bundle::{random_u64, write_new, Bundle, BundleError, LockError, CONFIG_FILE};
use crate::config::{DiskSpec, Ecid, MacAddress};
use crate::hardware_model::HARDWARE_MODEL_FILE;
use crate::identity::{self, MACHINE_IDENTIFIER_FILE};
use crate::tart::{IMAGE_SOURCE_FILE, TART_CONFIG_FILE};

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> BundleError + '_ {
    move |source| BundleError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Debug, Default, Clone, Copy)]
pub struct CloneOptions {
    /// A new random ECID: a new machine (a macOS guest installed for the
    /// old one will not boot on it).
    pub new_identity: bool,
}

#[derive(Debug)]
pub struct Cloned {
    pub bundle: Bundle,
    /// Disks whose blocks are shared with the source (copy-on-write).
    pub shared: usize,
    /// Disks copied byte by byte (sparsely): the filesystem cannot share.
    pub copied: usize,
    pub warnings: Vec<String>,
}

/// Copies `src` to a new file `dst`: shared blocks if possible, else
/// the data segments only (see [`block::clone`]).
pub fn clone_file(src: &Path, dst: &Path) -> Result<CopyKind, BundleError> {
    block::clone::clone_file(src, dst, |_, _| {}).map_err(|e| match e {
        block::clone::CloneError::Source { path, source }
        | block::clone::CloneError::Target { path, source } => BundleError::Io { path, source },
    })
}

fn random_mac() -> Result<MacAddress, BundleError> {
    let b = random_u64()
        .map_err(io_err(Path::new("/dev/urandom")))?
        .to_le_bytes();
    // Locally administered, unicast.
    Ok(MacAddress([
        (b[0] & 0xfc) | 0x02,
        b[1],
        b[2],
        b[3],
        b[4],
        b[5],
    ]))
}

/// Clones `src` into the new bundle directory `dst`. Refused while `src`
/// runs, unless all its disks are read-only (nothing can change under the
/// copy then). On failure nothing is left under `dst`.
pub fn clone_bundle(src: &Bundle, dst: &Path, opts: CloneOptions) -> Result<Cloned, BundleError> {
    if fs::symlink_metadata(dst).is_ok() {
        return Err(BundleError::Exists {
            path: dst.to_path_buf(),
        });
    }
    let config = src.config();
    let all_read_only =
        config.aux.read_only && config.root.read_only && config.disks.iter().all(|d| d.read_only);
    let _lock = match src.lock() {
        Ok(l) => Some(l),
        Err(e @ (LockError::InUse { .. } | LockError::InUseUnknown { .. })) => {
            if !all_read_only {
                return Err(BundleError::Unusable {
                    path: src.dir().to_path_buf(),
                    message: format!(
                        "{e}; stop it first (its disks are writable, a copy would be torn)"
                    ),
                });
            }
            None
        }
        Err(e) => return Err(e.into()),
    };
    let name = dst
        .file_name()
        .ok_or_else(|| BundleError::Unusable {
            path: dst.to_path_buf(),
            message: "not a bundle path".into(),
        })?
        .to_string_lossy()
        .into_owned();
    let staging = dst.with_file_name(format!(".{name}.clone"));
    let _ = fs::remove_dir_all(&staging);
    fs::create_dir_all(&staging).map_err(io_err(&staging))?;
    let result = (|| {
        let mut new = config.clone();
        let mut shared = 0;
        let mut copied = 0;
        let mut warnings = Vec::new();
        let mut used_names: Vec<PathBuf> = Vec::new();
        let mut disks: Vec<&mut DiskSpec> = vec![&mut new.aux, &mut new.root];
        disks.extend(new.disks.iter_mut());
        for (i, disk) in disks.into_iter().enumerate() {
            let from = src.resolve(&disk.path);
            if disk.path.is_absolute() && disk.read_only {
                // Shared as it is: nothing writes it.
                continue;
            }
            // Inside the bundle keep the name; from outside, a name of
            // its own.
            let rel = if disk.path.is_relative()
                && disk
                    .path
                    .components()
                    .all(|c| matches!(c, std::path::Component::Normal(_)))
            {
                disk.path.clone()
            } else {
                let file = from
                    .file_name()
                    .map(|f| f.to_string_lossy().into_owned())
                    .unwrap_or_default();
                PathBuf::from(format!("disk{i}-{file}"))
            };
            if used_names.contains(&rel) {
                return Err(BundleError::Unusable {
                    path: from,
                    message: "two disks of the bundle are the same file".into(),
                });
            }
            let to = staging.join(&rel);
            if let Some(parent) = to.parent() {
                fs::create_dir_all(parent).map_err(io_err(parent))?;
            }
            match clone_file(&from, &to)? {
                CopyKind::Reflink => shared += 1,
                CopyKind::Sparse => copied += 1,
            }
            used_names.push(rel.clone());
            disk.path = rel;
        }
        if copied > 0 {
            warnings.push(format!(
                "{copied} disk(s) copied (sparsely): the filesystem cannot share blocks (copy-on-write needs btrfs, XFS or APFS)"
            ));
        }
        let ecid = if opts.new_identity {
            random_u64().map_err(io_err(Path::new("/dev/urandom")))?
        } else {
            src.ecid()?
        };
        new.ecid = Some(Ecid(ecid));
        new.mac = Some(random_mac()?);
        write_new(
            &staging.join(MACHINE_IDENTIFIER_FILE),
            &identity::machine_identifier_plist(ecid),
        )?;
        // The hardware model goes along even with --new-identity: the
        // clone is the same kind of machine.
        for extra in [TART_CONFIG_FILE, IMAGE_SOURCE_FILE, HARDWARE_MODEL_FILE] {
            let from = src.dir().join(extra);
            if from.is_file() {
                fs::copy(&from, staging.join(extra)).map_err(io_err(&from))?;
            }
        }
        write_new(&staging.join(CONFIG_FILE), new.to_toml().as_bytes())?;
        if fs::symlink_metadata(dst).is_ok() {
            return Err(BundleError::Exists {
                path: dst.to_path_buf(),
            });
        }
        fs::rename(&staging, dst).map_err(io_err(dst))?;
        Ok(Cloned {
            bundle: Bundle::open(dst)?,
            shared,
            copied,
            warnings,
        })
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(&staging);
    }
    result
}
