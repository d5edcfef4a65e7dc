//! The disks of a snapshot (issue 13 point 4). The disks are not in the
//! snapshot's memory image: the saved guest's page cache and filesystem
//! state expect each disk to hold exactly what it held at the save. So
//! the snapshot records each disk's identity (size, device, inode,
//! modification time) and a restore onto a disk that changed since is
//! refused, naming it, unless forced. A save `--with-disks` also takes a
//! copy of each writable disk beside the snapshot (copy-on-write where the
//! filesystem can); a restore of such a snapshot puts the copy in place of
//! the run's disk file first, so the snapshot is a full restore point.
//!
//! A restore puts copies back atomically and only once nothing else can
//! refuse it: each is cloned to a temporary file beside its target, which
//! the machine opens; [`Prepared::commit`] renames them over their
//! targets as the vCPUs are about to run. Until then (and on every error)
//! the targets are untouched and the temporary files are removed.

use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};
use vm_config::DiskSpec;

use super::SnapshotError;

/// Copies at least this large show progress on stderr.
const SHOW_PROGRESS: u64 = 1 << 30;

/// What the filesystem says about a disk file; any change means the file
/// may hold something other than what the saved guest expects.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskIdentity {
    pub size: u64,
    pub dev: u64,
    pub inode: u64,
    pub mtime_sec: i64,
    pub mtime_nsec: i64,
}

impl DiskIdentity {
    pub fn of(path: &Path) -> std::io::Result<DiskIdentity> {
        let m = std::fs::metadata(path)?;
        Ok(DiskIdentity {
            size: m.size(),
            dev: m.dev(),
            inode: m.ino(),
            mtime_sec: m.mtime(),
            mtime_nsec: m.mtime_nsec(),
        })
    }

    /// What differs between `self` (saved) and `now`, in words.
    fn changes(&self, now: &DiskIdentity) -> Vec<&'static str> {
        let mut out = Vec::new();
        if (self.dev, self.inode) != (now.dev, now.inode) {
            out.push("another file");
        }
        if self.size != now.size {
            out.push("size");
        }
        if (self.mtime_sec, self.mtime_nsec) != (now.mtime_sec, now.mtime_nsec) {
            out.push("modification time");
        }
        out
    }
}

/// One disk of the saved machine.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedDisk {
    /// `aux`, `root`, `disk0`, `disk1`... (the option and its place).
    pub id: String,
    /// The path the VM had open.
    pub path: PathBuf,
    pub read_only: bool,
    pub identity: DiskIdentity,
    /// The copy taken with `--with-disks`: a file name in the snapshot's
    /// directory.
    #[serde(default)]
    pub copy: Option<String>,
}

/// The machine's disks, by id: `--aux`, `--root`, then each `--disk`.
pub fn listed(
    aux: Option<&DiskSpec>,
    root: Option<&DiskSpec>,
    disks: &[DiskSpec],
) -> Vec<(String, DiskSpec)> {
    let mut out = Vec::new();
    out.extend(aux.map(|d| ("aux".to_string(), d.clone())));
    out.extend(root.map(|d| ("root".to_string(), d.clone())));
    out.extend(
        disks
            .iter()
            .enumerate()
            .map(|(i, d)| (format!("disk{i}"), d.clone())),
    );
    out
}

/// [`listed`], for changing the paths.
pub fn listed_mut<'a>(
    aux: Option<&'a mut DiskSpec>,
    root: Option<&'a mut DiskSpec>,
    disks: &'a mut [DiskSpec],
) -> Vec<(String, &'a mut DiskSpec)> {
    let mut out = Vec::new();
    out.extend(aux.map(|d| ("aux".to_string(), d)));
    out.extend(root.map(|d| ("root".to_string(), d)));
    out.extend(
        disks
            .iter_mut()
            .enumerate()
            .map(|(i, d)| (format!("disk{i}"), d)),
    );
    out
}

/// How the user named a disk: the option and the path.
pub fn label(id: &str, path: &Path) -> String {
    let option = match id {
        "aux" => "--aux",
        "root" => "--root",
        _ => "--disk",
    };
    format!("{option} {}", path.display())
}

/// Each disk's identity now, for a save.
pub fn identify(disks: &[(String, DiskSpec)]) -> Result<Vec<SavedDisk>, SnapshotError> {
    disks
        .iter()
        .map(|(id, spec)| {
            let path = std::path::absolute(&spec.path).unwrap_or_else(|_| spec.path.clone());
            let identity = DiskIdentity::of(&path).map_err(|source| SnapshotError::Io {
                path: path.clone(),
                source,
            })?;
            Ok(SavedDisk {
                id: id.clone(),
                path,
                read_only: spec.read_only,
                identity,
                copy: None,
            })
        })
        .collect()
}

/// A file that is removed when dropped unless kept.
struct Temp(Option<PathBuf>);

impl Temp {
    fn keep(&mut self) -> Option<PathBuf> {
        self.0.take()
    }
}

impl Drop for Temp {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Clones `from` to the new file `to`, with progress on stderr for large
/// files and a warning when the filesystem cannot share blocks.
fn copy(from: &Path, to: &Path, what: &str) -> Result<(), SnapshotError> {
    let mut shown = false;
    let kind = block::clone::clone_file(from, to, |done, total| {
        if total >= SHOW_PROGRESS {
            shown = true;
            eprint!(
                "\rvmapple: copying {what}: {} of {} MiB",
                done >> 20,
                total >> 20
            );
        }
    })
    .map_err(|e| SnapshotError::DiskCopy {
        disk: what.to_string(),
        source: e,
    })?;
    if shown {
        eprintln!();
    }
    if kind == block::clone::CopyKind::Sparse {
        tracing::warn!(
            "{what}: copied in full (sparsely): this filesystem cannot share blocks (copy-on-write needs btrfs, XFS or APFS)"
        );
    }
    Ok(())
}

/// Copies taken for a save, under temporary names until the snapshot is
/// in place; removed on drop unless committed.
pub(crate) struct Copies(Vec<(Temp, PathBuf)>);

impl Copies {
    /// Copies each writable disk of `disks` beside `snapshot` and records
    /// the copy's name. A read-only disk is not copied: the VM cannot
    /// change it, and its identity is checked at restore.
    pub(crate) fn take(snapshot: &Path, disks: &mut [SavedDisk]) -> Result<Copies, SnapshotError> {
        let name = snapshot
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut out = Vec::new();
        for disk in disks.iter_mut().filter(|d| !d.read_only) {
            let file = format!("{name}.{}.img", disk.id);
            let target = snapshot.with_file_name(&file);
            let temp = snapshot.with_file_name(format!(".{file}.partial-{}", std::process::id()));
            let guard = Temp(Some(temp.clone()));
            copy(&disk.path, &temp, &label(&disk.id, &disk.path))?;
            out.push((guard, target));
            disk.copy = Some(file);
        }
        Ok(Copies(out))
    }

    /// Gives the copies their names.
    pub(crate) fn commit(mut self) -> Result<(), SnapshotError> {
        for (temp, target) in &mut self.0 {
            if let Some(path) = temp.0.as_deref() {
                std::fs::rename(path, &*target).map_err(|source| SnapshotError::Io {
                    path: target.clone(),
                    source,
                })?;
                temp.keep();
            }
        }
        Ok(())
    }
}

/// What a restore does to the run's disks once it is sure to go ahead.
#[derive(Default)]
pub struct Prepared {
    reverts: Vec<Revert>,
}

struct Revert {
    temp: Temp,
    target: PathBuf,
    what: String,
    /// The target, opened and locked so no other VM uses it meanwhile.
    _lock: Option<block::DiskImage>,
}

/// Checks the run's disks (`run`, by id) against the snapshot's and
/// prepares the copies of a `--with-disks` snapshot: each is cloned beside
/// its target and `run`'s path pointed at the clone, for the machine to
/// open. A disk that changed since the save is refused unless `force`.
/// Nothing outside the temporary files is written.
pub fn prepare(
    snapshot: &Path,
    saved: &[SavedDisk],
    run: &mut [(String, &mut DiskSpec)],
    force: bool,
) -> Result<Prepared, SnapshotError> {
    // Every check first, so a refusal costs no copy.
    let mut copies = Vec::new();
    for disk in saved {
        let Some(at) = run.iter().position(|(id, _)| *id == disk.id) else {
            // The device lists differ: the machine names that.
            continue;
        };
        let spec = &run[at].1;
        let what = label(&disk.id, &spec.path);
        if let Some(name) = &disk.copy {
            let plain = Path::new(name)
                .components()
                .all(|c| matches!(c, Component::Normal(_)))
                && Path::new(name).components().count() == 1;
            if !plain {
                return Err(SnapshotError::Corrupt(format!(
                    "the copy of {what} is not a file name: {name:?}"
                )));
            }
            let from = snapshot.with_file_name(name);
            let now = DiskIdentity::of(&from).map_err(|source| SnapshotError::DiskCopy {
                disk: what.clone(),
                source: block::clone::CloneError::Source {
                    path: from.clone(),
                    source,
                },
            })?;
            if now.size != disk.identity.size {
                return Err(SnapshotError::Corrupt(format!(
                    "the copy of {what} ({}) has {} bytes, the disk had {}",
                    from.display(),
                    now.size,
                    disk.identity.size
                )));
            }
            copies.push((at, from, what));
            continue;
        }
        let now = DiskIdentity::of(&spec.path).map_err(|source| SnapshotError::Io {
            path: spec.path.clone(),
            source,
        })?;
        let changes = disk.identity.changes(&now);
        if !changes.is_empty() {
            if force {
                tracing::warn!(
                    "{what} changed since the snapshot was saved ({}); restoring anyway (--force)",
                    changes.join(", ")
                );
            } else {
                return Err(SnapshotError::DiskChanged {
                    disk: what,
                    what: changes.join(", "),
                });
            }
        }
    }
    let mut prepared = Prepared::default();
    for (at, from, what) in copies {
        let spec = &mut run[at].1;
        let target = spec.path.clone();
        let lock = if target.exists() {
            Some(
                block::DiskImage::open(&target, false).map_err(|source| match source {
                    block::OpenError::Locked { .. } => SnapshotError::DiskInUse {
                        disk: what.clone(),
                        source,
                    },
                    source => SnapshotError::DiskOpen {
                        disk: what.clone(),
                        source,
                    },
                })?,
            )
        } else {
            None
        };
        let file = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let temp = target.with_file_name(format!(".{file}.restore-{}", std::process::id()));
        let guard = Temp(Some(temp.clone()));
        copy(&from, &temp, &what)?;
        spec.path = temp;
        prepared.reverts.push(Revert {
            temp: guard,
            target,
            what,
            _lock: lock,
        });
    }
    Ok(prepared)
}

impl Prepared {
    /// Puts each copy in place of its disk file (an atomic rename each).
    pub fn commit(mut self) -> Result<(), SnapshotError> {
        for revert in &mut self.reverts {
            let Some(temp) = revert.temp.0.clone() else {
                continue;
            };
            std::fs::rename(&temp, &revert.target).map_err(|source| SnapshotError::Io {
                path: revert.target.clone(),
                source,
            })?;
            revert.temp.keep();
            if let Some(dir) = revert.target.parent().filter(|d| !d.as_os_str().is_empty()) {
                if let Ok(d) = std::fs::File::open(dir) {
                    let _ = d.sync_all();
                }
            }
            eprintln!(
                "vmapple: {}: put back as it was at the save, from the snapshot's copy",
                revert.what
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(dir: &Path, name: &str, content: &[u8]) -> DiskSpec {
        let path = dir.join(name);
        std::fs::write(&path, content).unwrap();
        DiskSpec::new(path)
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_changed_disk_is_refused_by_name_unless_forced() {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = disk(dir.path(), "d.img", b"saved");
        let saved = identify(&[("disk0".into(), spec.clone())]).unwrap();
        let snap = dir.path().join("s.snap");
        let mut run = vec![("disk0".to_string(), &mut spec)];
        prepare(&snap, &saved, &mut run, false).expect("unchanged");

        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(dir.path().join("d.img"), b"later!").unwrap();
        let e = prepare(&snap, &saved, &mut run, false).err().unwrap();
        let text = e.to_string();
        assert!(
            text.starts_with(&format!("--disk {}", dir.path().join("d.img").display())),
            "{text}"
        );
        assert!(text.contains("size") && text.contains("--force"), "{text}");
        prepare(&snap, &saved, &mut run, true).expect("forced");
        assert_eq!(run[0].1.path, dir.path().join("d.img"));
    }

    #[test]
    fn copies_are_named_after_the_snapshot_and_put_back_only_on_commit() {
        let dir = tempfile::tempdir().unwrap();
        let rw = disk(dir.path(), "rw.img", b"at the save");
        let ro = DiskSpec {
            read_only: true,
            ..disk(dir.path(), "ro.img", b"base")
        };
        let snap = dir.path().join("s.snap");
        let mut saved =
            identify(&[("disk0".into(), rw.clone()), ("disk1".into(), ro.clone())]).unwrap();
        // Not committed: nothing stays.
        drop(Copies::take(&snap, &mut saved.clone()).unwrap());
        assert_eq!(names(dir.path()), ["ro.img", "rw.img"]);
        Copies::take(&snap, &mut saved).unwrap().commit().unwrap();
        assert_eq!(saved[0].copy.as_deref(), Some("s.snap.disk0.img"));
        assert_eq!(saved[1].copy, None, "a read-only disk is not copied");
        assert_eq!(
            std::fs::read(dir.path().join("s.snap.disk0.img")).unwrap(),
            b"at the save"
        );

        std::fs::write(dir.path().join("rw.img"), b"changed since").unwrap();
        let (mut a, mut b) = (rw.clone(), ro.clone());
        let mut run = vec![("disk0".to_string(), &mut a), ("disk1".to_string(), &mut b)];
        let prepared = prepare(&snap, &saved, &mut run, false).unwrap();
        let temp = run[0].1.path.clone();
        assert_ne!(temp, rw.path, "the machine opens the copy's clone");
        assert_eq!(std::fs::read(&temp).unwrap(), b"at the save");
        assert_eq!(std::fs::read(&rw.path).unwrap(), b"changed since");
        // Refused later (another check): the disk stays as it was.
        drop(prepared);
        assert!(!temp.exists());
        assert_eq!(std::fs::read(&rw.path).unwrap(), b"changed since");

        let mut a = rw.clone();
        let mut run = vec![("disk0".to_string(), &mut a)];
        prepare(&snap, &saved[..1], &mut run, false)
            .unwrap()
            .commit()
            .unwrap();
        assert_eq!(std::fs::read(&rw.path).unwrap(), b"at the save");
        assert_eq!(
            names(dir.path()),
            ["ro.img", "rw.img", "s.snap.disk0.img"],
            "no temporary file left"
        );

        // A fork gives a disk file of its own, which need not exist: the
        // restore makes it from the copy.
        let mut fork = DiskSpec::new(dir.path().join("fork.img"));
        let mut run = vec![("disk0".to_string(), &mut fork)];
        prepare(&snap, &saved[..1], &mut run, false)
            .unwrap()
            .commit()
            .unwrap();
        assert_eq!(
            std::fs::read(dir.path().join("fork.img")).unwrap(),
            b"at the save"
        );

        // Without its copy the snapshot is refused, naming the disk.
        std::fs::remove_file(dir.path().join("s.snap.disk0.img")).unwrap();
        let mut a = rw.clone();
        let mut run = vec![("disk0".to_string(), &mut a)];
        let e = prepare(&snap, &saved[..1], &mut run, false).err().unwrap();
        assert!(e.to_string().starts_with("cannot copy --disk"), "{e}");
    }

    #[test]
    fn a_copy_name_outside_the_snapshot_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = disk(dir.path(), "d.img", b"x");
        let mut saved = identify(&[("disk0".into(), spec.clone())]).unwrap();
        for bad in ["../d.img", "/etc/passwd", "a/b", ".."] {
            saved[0].copy = Some(bad.into());
            let mut run = vec![("disk0".to_string(), &mut spec)];
            let e = prepare(&dir.path().join("s.snap"), &saved, &mut run, false);
            assert!(
                matches!(e, Err(SnapshotError::Corrupt(_))),
                "{bad}: {:?}",
                e.err()
            );
        }
        assert_eq!(names(dir.path()), ["d.img"]);
    }
}
