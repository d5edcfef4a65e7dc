//! PCIe and virtio proved against Debian's arm64 kernel on the software
//! CPU: the guest enumerates the devices with the right IDs (Apple's
//! virtio-blk variant included), mounts an ext4 image we made over
//! virtio-blk, writes to it and powers off (the host then checks the files
//! and that e2fsck finds the filesystem clean), and talks TCP to a server
//! on the host's loopback through passt, byte for byte; and that the
//! guest's discards free the image file's blocks.

#[macro_use]
mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{linux_guest_devices, refs, vmapple, LinuxGuest};

fn scratch_dir(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn sparse_file(path: &Path, size: u64) {
    std::fs::File::create(path).unwrap().set_len(size).unwrap();
}

fn mkfs_ext4(path: &Path) {
    sparse_file(path, 64 << 20);
    let status = Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(path)
        .status()
        .expect("mkfs.ext4 (e2fsprogs; scripts/setup.sh installs it)");
    assert!(status.success());
}

fn debugfs_cat(image: &Path, file: &str) -> Vec<u8> {
    let out = Command::new("debugfs")
        .args(["-R", &format!("cat {file}")])
        .arg(image)
        .output()
        .expect("debugfs");
    out.stdout
}

/// A payload no two offsets of which look alike, so a shifted or
/// truncated copy cannot pass.
fn payload() -> Vec<u8> {
    (0..300_000u32)
        .map(|i| ((i * 7 + 3) % 251) as u8 ^ (i >> 11) as u8)
        .collect()
}

fn md5_hex(bytes: &[u8]) -> String {
    let mut child = Command::new("md5sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(bytes).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

fn guest_value<'a>(stdout: &'a str, prefix: &str) -> &'a str {
    stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} line in:\n{stdout}"))
}

each_accel! {
fn linux_sees_the_pci_devices_uses_virtio_blk_and_talks_tcp_through_passt(accel) {
    if cfg!(target_os = "macos") {
        common::skip("passt, the host end of its network check, runs only on Linux");
        return;
    }
    let Some(files) = linux_guest_devices() else { return };
    let dir = scratch_dir(&format!("pci-virtio-{accel}"));
    let aux = dir.join("aux.img");
    let root = dir.join("root.img");
    let data = dir.join("data.img");
    sparse_file(&aux, 4 << 20);
    sparse_file(&root, 8 << 20);
    mkfs_ext4(&data);

    // The host's side of the network test: one port to download from, the
    // next to upload to.
    let download = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = download.local_addr().unwrap().port();
    let upload = TcpListener::bind(("127.0.0.1", port + 1))
        .expect("the port after an ephemeral one is usually free");
    let sent = payload();
    let server = {
        let sent = sent.clone();
        std::thread::spawn(move || {
            let (mut c, _) = download.accept().unwrap();
            c.write_all(&sent).unwrap();
            drop(c);
            let (mut c, _) = upload.accept().unwrap();
            c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            let mut got = Vec::new();
            let mut chunk = [0u8; 65536];
            while got.len() < sent.len() {
                match c.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&chunk[..n]),
                }
            }
            got
        })
    };

    let append = format!("console=ttyAMA0 vmapple.pci vmapple.blk=vda vmapple.net={port} quiet");
    let args = LinuxGuest::new(&files, &append)
        .args(["--accel", accel])
        .two_cpus()
        .args([
            "--aux",
            aux.to_str().unwrap(),
            "--root",
            root.to_str().unwrap(),
            "--disk",
            data.to_str().unwrap(),
            "--net",
            "passt",
            "--mac",
            "52:54:00:12:34:56",
        ])
        .build();
    let run = vmapple(&refs(&args), Duration::from_secs(300));
    assert_eq!(run.code, 0, "guest powered off; stderr:\n{}", run.stderr);

    // Enumeration: IDs as the guest's sysfs shows them.
    let pci: Vec<&str> = run
        .stdout
        .lines()
        .filter_map(|l| l.trim().strip_prefix("VMAPPLE-GUEST: pci "))
        .collect();
    let has = |vendor: &str, device: &str| {
        pci.iter()
            .filter(|l| l.contains(&format!(" {vendor} {device} ")))
            .count()
    };
    assert_eq!(has("0x1b36", "0x0008"), 1, "host bridge: {pci:?}");
    assert_eq!(has("0x106b", "0x1a00"), 2, "Apple aux + root: {pci:?}");
    assert_eq!(has("0x1af4", "0x1041"), 1, "virtio-net: {pci:?}");
    assert_eq!(has("0x1af4", "0x1042"), 1, "virtio-blk: {pci:?}");
    // Slots as vmapple-machine.md §7.4 lays them out.
    for (slot, ids) in [
        ("01.0", "0x1b36 0x000d 0x0c0330"),
        ("02.0", "0x106b 0x1a00 0x010000"),
        ("03.0", "0x106b 0x1a00 0x010000"),
        ("04.0", "0x1af4 0x1041 0x020000"),
    ] {
        let line = format!("0000:00:{slot} {ids}");
        assert!(
            pci.iter().any(|l| l.starts_with(&line)),
            "{line} (XHCI, aux, root, then the NIC): {pci:?}"
        );
    }

    // Block: the guest's files are on the image, intact, and the
    // filesystem is clean.
    run.assert_line("VMAPPLE-GUEST: blk done");
    assert_eq!(
        debugfs_cat(&data, "/hello.txt"),
        b"written by the vmapple guest\n"
    );
    let lines = String::from_utf8(debugfs_cat(&data, "/lines.txt")).unwrap();
    assert_eq!(lines.lines().count(), 64);
    assert_eq!(
        lines.lines().last(),
        Some("line 63 of the vmapple guest's file")
    );
    let random = debugfs_cat(&data, "/random.bin");
    assert_eq!(random.len(), 1 << 20);
    assert_eq!(
        md5_hex(&random),
        guest_value(&run.stdout, "VMAPPLE-GUEST: blk random.bin ")
    );
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "e2fsck -fn: {}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );

    // Network: DHCP from passt, then the payload both ways, byte for byte.
    let address = guest_value(&run.stdout, "VMAPPLE-GUEST: net address ");
    assert!(address.contains("gateway"), "{address}");
    let download_line = guest_value(&run.stdout, "VMAPPLE-GUEST: net download ");
    assert_eq!(
        download_line,
        format!("{} {}", sent.len(), md5_hex(&sent)),
        "what the guest received"
    );
    run.assert_line("VMAPPLE-GUEST: net upload done");
    assert!(server.join().unwrap() == sent, "what the guest sent back");
}
}

/// Bytes a file occupies on the host.
fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

#[test]
fn a_linux_guests_discards_free_the_image_files_blocks() {
    let Some(files) = linux_guest_devices() else {
        return;
    };
    let dir = scratch_dir("trim");
    let data = dir.join("data.img");
    mkfs_ext4(&data);
    let before = allocated(&data);
    // The guest writes 16 MiB, deletes it on a `-o discard` mount (ext4
    // sends DISCARD for the freed blocks) and unmounts.
    let args = LinuxGuest::new(&files, "console=ttyAMA0 vmapple.trim=vda quiet")
        .args(["--memory", "256M", "--net", "none"])
        .args(["--disk", data.to_str().unwrap()])
        .build();
    let run = vmapple(&refs(&args), Duration::from_secs(300));
    assert_eq!(run.code, 0, "guest powered off; stderr:\n{}", run.stderr);
    run.assert_line("VMAPPLE-GUEST: trim done");
    // Without holes the image would have grown by the 16 MiB (and a
    // zero-writing discard would add more); the journal accounts for at
    // most 4 MiB of growth.
    let after = allocated(&data);
    assert!(
        after < before + (8 << 20),
        "image allocation went from {before} to {after} bytes"
    );
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "e2fsck -fn: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );
}

#[test]
fn a_disk_another_process_holds_is_refused_with_a_clear_message() {
    let dir = scratch_dir("pci-virtio-lock");
    let disk = dir.join("busy.img");
    sparse_file(&disk, 1 << 20);
    let holder = std::fs::File::open(&disk).unwrap();
    // SAFETY: flock on a descriptor we own.
    assert_eq!(unsafe { libc::flock(holder.as_raw_fd(), libc::LOCK_EX) }, 0);
    let firmware = common::firmware_dir().join("fw-vmapple.bin");
    let run = vmapple(
        &[
            "run",
            "--firmware",
            firmware.to_str().unwrap(),
            "--disk",
            disk.to_str().unwrap(),
            "--net",
            "none",
        ],
        Duration::from_secs(60),
    );
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(
        run.stderr.contains("in use by another process"),
        "{}",
        run.stderr
    );
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
}
