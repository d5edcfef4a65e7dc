//! `vmapple clone`: a new bundle with copies of a bundle's disks, sharing
//! blocks with them where the filesystem can (`FICLONE` on Linux,
//! `clonefile(2)` on macOS), else copied sparsely (holes stay holes).
//!
//! The clone gets a new MAC address and keeps the machine identity (a
//! macOS guest boots only on the ECID it was installed for) unless asked
//! for a new one. Disks outside the bundle (an imported VM's) are copied
//! into it, except read-only ones, which the clone may share.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

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

/// How one file was cloned.
#[derive(Debug, PartialEq, Eq)]
pub enum CopyKind {
    Reflink,
    Sparse,
}

/// Asks the filesystem to share `src`'s blocks with a new file `dst`.
#[cfg(target_os = "linux")]
fn reflink(src: &Path, dst: &Path) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let from = File::open(src)?;
    let to = OpenOptions::new().write(true).create_new(true).open(dst)?;
    // SAFETY: FICLONE takes the source descriptor as its argument; both
    // descriptors are open files we own; no memory is passed.
    let r = unsafe { libc::ioctl(to.as_raw_fd(), libc::FICLONE, from.as_raw_fd()) };
    if r != 0 {
        let e = io::Error::last_os_error();
        drop(to);
        let _ = fs::remove_file(dst);
        return Err(e);
    }
    Ok(())
}

#[cfg(target_os = "macos")]
fn reflink(src: &Path, dst: &Path) -> io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let s = CString::new(src.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let d = CString::new(dst.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: both are NUL-terminated strings that live across the call.
    if unsafe { libc::clonefile(s.as_ptr(), d.as_ptr(), 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(not(any(target_os = "linux", target_os = "macos")))]
fn reflink(_: &Path, _: &Path) -> io::Result<()> {
    Err(io::Error::from(io::ErrorKind::Unsupported))
}

/// The data segments of `f` (offset, length), found with SEEK_DATA /
/// SEEK_HOLE; the whole file if the system cannot tell.
fn data_segments(f: &File, len: u64) -> Vec<(u64, u64)> {
    use std::os::fd::AsRawFd;
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut pos: u64 = 0;
    while pos < len {
        let Ok(at) = libc::off_t::try_from(pos) else {
            break;
        };
        // SAFETY: lseek on a descriptor we own; no memory involved.
        let data = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            // ENXIO: no data after pos. Anything else: cannot tell.
            if e.raw_os_error() != Some(libc::ENXIO) {
                return vec![(0, len)];
            }
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return vec![(0, len)];
        }
        let (d, h) = (data as u64, (hole as u64).min(len));
        if h > d {
            out.push((d, h - d));
        }
        pos = h.max(d + 1);
    }
    out
}

/// Copies `src` to a new file `dst`: shared blocks if possible, else the
/// data segments only, skipping zero runs, so holes stay holes.
pub fn clone_file(src: &Path, dst: &Path) -> Result<CopyKind, BundleError> {
    if reflink(src, dst).is_ok() {
        return Ok(CopyKind::Reflink);
    }
    let from = File::open(src).map_err(io_err(src))?;
    let len = from.metadata().map_err(io_err(src))?.len();
    let to = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dst)
        .map_err(io_err(dst))?;
    to.set_len(len).map_err(io_err(dst))?;
    let mut buf = vec![0u8; 1 << 20];
    for (start, seg_len) in data_segments(&from, len) {
        let mut done = 0;
        while done < seg_len {
            let n = (seg_len - done).min(buf.len() as u64) as usize;
            from.read_exact_at(&mut buf[..n], start + done)
                .map_err(io_err(src))?;
            if buf[..n].iter().any(|&b| b != 0) {
                to.write_all_at(&buf[..n], start + done)
                    .map_err(io_err(dst))?;
            }
            done += n as u64;
        }
    }
    to.sync_all().map_err(io_err(dst))?;
    Ok(CopyKind::Sparse)
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn a_sparse_copy_keeps_content_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let f = File::create(&src).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(b"start", 0).unwrap();
        f.write_all_at(b"middle", 32 << 20).unwrap();
        f.write_all_at(b"end", (64 << 20) - 3).unwrap();
        drop(f);
        let dst = dir.path().join("dst");
        clone_file(&src, &dst).unwrap();
        assert!(fs::read(&src).unwrap() == fs::read(&dst).unwrap());
        assert!(fs::metadata(&dst).unwrap().blocks() * 512 <= 4 << 20);
        assert!(
            clone_file(&src, &dst).is_err(),
            "an existing file is not overwritten"
        );
    }
}
