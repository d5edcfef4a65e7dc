//! virtio-fs proved against Debian's arm64 kernel and its `virtiofs`
//! module: the guest mounts a host directory, reads host-made files byte
//! for byte, changes the share (files, directories, a rename, a symlink,
//! an unlink), copies 256 MiB each way, makes and lists 10,000 files,
//! fsyncs a file the host then reads while the guest still runs, and
//! cannot get out of the share (guest/linux/vmapple-fs.c tries; the host
//! then checks nothing outside the share changed and nothing inside it is
//! setuid, a device or someone else's). A read-only share refuses every
//! change.

#[macro_use]
mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{linux_guest_share, refs, vmapple_with_triggers, Action, LinuxGuest, Trigger};

fn scratch_dir(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `n` bytes of a fixed pseudo-random sequence.
fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(n);
    out
}

fn md5(path: &Path) -> String {
    let out = if cfg!(target_os = "macos") {
        Command::new("md5").arg("-q").arg(path).output()
    } else {
        Command::new("md5sum").arg(path).output()
    }
    .expect("md5sum");
    assert!(out.status.success(), "md5 of {}", path.display());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

/// Every path under `dir` with its type, mode and contents (for files).
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (u32, Vec<u8>)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let body = if m.is_file() {
                std::fs::read(&p).unwrap()
            } else {
                Vec::new()
            };
            if m.is_dir() {
                stack.push(p.clone());
            }
            out.insert(p, (m.mode(), body));
        }
    }
    out
}

fn guest_values<'a>(stdout: &'a str, prefix: &str) -> Vec<&'a str> {
    stdout
        .lines()
        .filter_map(|l| l.trim().strip_prefix(prefix))
        .collect()
}

each_accel! {
fn a_linux_guest_uses_a_share_and_cannot_leave_it(accel) {
    let Some(files) = linux_guest_share() else { return };
    let dir = scratch_dir(&format!("shares-{accel}"));
    let share = dir.join("share");
    let outside = dir.join("outside");
    let ro = dir.join("ro");
    for d in [&share.join("host"), &outside, &ro] {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(share.join("host/a.txt"), "made on the host\n").unwrap();
    std::fs::write(share.join("host/b.bin"), noise(100_003, 7)).unwrap();
    std::fs::write(share.join("host/delete-me"), "x").unwrap();
    std::fs::write(share.join("big.bin"), noise(256 << 20, 11)).unwrap();
    std::fs::write(outside.join("secret.txt"), "outside the share\n").unwrap();
    std::fs::write(ro.join("readme.txt"), "read-only share\n").unwrap();
    let expected_host_files: Vec<String> = ["a.txt", "b.bin", "delete-me"]
        .iter()
        .map(|f| format!("{f} {}", md5(&share.join("host").join(f))))
        .collect();
    let outside_before = snapshot(&outside);
    let ro_before = snapshot(&ro);

    // While the guest holds the fsynced file open, the host reads it.
    let synced = Arc::new(Mutex::new(None));
    let seen = synced.clone();
    let synced_path = share.join("synced.txt");
    let triggers = [Trigger {
        when_console_shows: "VMAPPLE-GUEST: fsync done",
        action: Action::Call(Box::new(move || {
            *seen.lock().unwrap() = std::fs::read_to_string(&synced_path).ok();
        })),
    }];

    let append = format!(
        "console=ttyAMA0 quiet vmapple.share=work vmapple.share-ro=docs vmapple.outside={}",
        outside.display()
    );
    let args = LinuxGuest::new(&files, &append)
        .args(["--accel", accel, "--cpus", "2", "--memory", "1G", "--net", "none"])
        .args(["--share", &format!("work:{}", share.display())])
        .args(["--share", &format!("docs:{},readonly", ro.display())])
        .build();
    let run = vmapple_with_triggers(
        &refs(&args),
        Duration::from_secs(1200),
        &triggers,
    );
    assert_eq!(run.code, 0, "guest powered off; stderr:\n{}", run.stderr);
    run.assert_line("VMAPPLE-GUEST: share mounted");
    let out = &run.stdout;

    // Host files, byte for byte.
    assert_eq!(
        guest_values(out, "VMAPPLE-GUEST: share host-file "),
        expected_host_files.iter().map(String::as_str).collect::<Vec<_>>(),
        "{out}"
    );

    // The guest's changes, seen on the host.
    assert_eq!(
        std::fs::read_to_string(share.join("guest.txt")).unwrap(),
        "written by the vmapple guest\n"
    );
    run.assert_line("VMAPPLE-GUEST: share ops moved b a.txt b.bin");
    assert_eq!(std::fs::read_to_string(share.join("gdir/b")).unwrap(), "moved\n");
    assert!(!share.join("gdir/a").exists());
    assert!(!share.join("gdir/empty").exists());
    assert_eq!(std::fs::read_link(share.join("gdir/link")).unwrap(), Path::new("b"));
    assert!(!share.join("host/delete-me").exists());

    // 256 MiB each way.
    assert_eq!(
        guest_values(out, "VMAPPLE-GUEST: share big-in "),
        [md5(&share.join("big.bin")).as_str()],
        "{out}"
    );
    run.assert_line("VMAPPLE-GUEST: share big-out copied");
    let guest_big = share.join("guest-big.bin");
    assert_eq!(std::fs::metadata(&guest_big).unwrap().len(), 256 << 20);
    assert_eq!(
        guest_values(out, "VMAPPLE-GUEST: share big-out "),
        [md5(&guest_big).as_str(), "copied"],
        "{out}"
    );

    // 10,000 files.
    run.assert_line("VMAPPLE-GUEST: many listed 10000");
    assert_eq!(std::fs::read_dir(share.join("many")).unwrap().count(), 10_000);

    // fsync: on the host before the guest closed the file.
    assert_eq!(
        synced.lock().unwrap().as_deref(),
        Some("synced by the vmapple guest\n")
    );

    // The escape attempts: each refused, nothing outside touched.
    let attempts = guest_values(out, "VMAPPLE-GUEST: escape ");
    assert!(attempts.len() >= 18, "{out}");
    assert!(!out.contains("ESCAPED"), "{out}");
    run.assert_line("VMAPPLE-GUEST: escape done 0");
    assert_eq!(snapshot(&outside), outside_before, "the directory outside the share changed");
    let euid = std::fs::metadata(&share).unwrap().uid();
    for (path, _) in snapshot(&share) {
        let m = std::fs::symlink_metadata(&path).unwrap();
        let t = m.file_type();
        assert!(!t.is_block_device() && !t.is_char_device(), "{} is a device", path.display());
        assert_eq!(m.permissions().mode() & 0o6000, 0, "{} is setuid/setgid", path.display());
        assert_eq!(m.uid(), euid, "{} belongs to someone else", path.display());
    }

    // The read-only share.
    run.assert_line("VMAPPLE-GUEST: share ro-read read-only share");
    let refused = guest_values(out, "VMAPPLE-GUEST: share ro refused ");
    assert_eq!(refused.len(), 6, "{out}");
    assert!(refused.iter().all(|l| l.contains("Read-only file system")), "{out}");
    assert!(!out.contains("share ro WRITABLE"), "{out}");
    assert_eq!(snapshot(&ro), ro_before);
    run.assert_line("VMAPPLE-GUEST: share done");
    let _ = std::fs::remove_dir_all(&dir);
}
}
