//! Debian's fio against vmapple's virtio-blk: two jobs keep 32 direct
//! requests each in flight, random 4 KiB writes over their own part of
//! the disk, every block stamped with its crc32c, then read everything
//! back and check it. With `--msi on` the disk has a queue per vCPU, each
//! served on its own I/O thread and completed by its own MSI-X vector;
//! with `--msi off` the first wave's single-threaded model on INTx. Both
//! must hand back exactly what was written.

#[macro_use]
mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{linux_guest_fio, refs, vmapple, LinuxGuest};

/// The 8 MiB the jobs cover (2 x 4 MiB) and a margin past it.
const DISK_BYTES: u64 = 16 << 20;
const WRITTEN_KIB: u64 = 2 * 4096;

/// Runs fio's verify job on 2 vCPUs; returns the guest's output.
fn fio_verify(accel: &str, msi: &str) -> common::Run {
    let files = linux_guest_fio().expect("the Linux guest");
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("fio-{accel}-msi-{msi}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let disk = dir.join("disk.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(DISK_BYTES)
        .unwrap();
    let args = LinuxGuest::new(&files, "console=ttyAMA0 quiet vmapple.fio=vda vmapple.irqs")
        .args(["--accel", accel])
        .two_cpus()
        .args(["--disk", disk.to_str().unwrap()])
        .no_usb_no_net()
        .args(["--msi", msi])
        .build();
    let run = vmapple(&refs(&args), Duration::from_secs(300));
    assert_eq!(run.code, 0, "guest powered off; stderr:\n{}", run.stderr);
    run
}

/// fio's line: `(error, read KiB, written KiB, exit status)`.
fn verify_line(run: &common::Run) -> (String, u64, u64, String) {
    let line = run
        .stdout
        .lines()
        .filter_map(|l| l.trim().strip_prefix("VMAPPLE-GUEST: fio verify "))
        .next()
        .unwrap_or_else(|| panic!("no fio line; guest output:\n{}", run.stdout));
    let f: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(f.len(), 4, "fio line: {line}");
    let kib = |s: &str| s.parse().unwrap_or_else(|_| panic!("fio line: {line}"));
    (f[0].to_owned(), kib(f[1]), kib(f[2]), f[3].to_owned())
}

/// Every block written was read back and matched its checksum: fio
/// stops at the first mismatch (`--verify_fatal`) with an error and a
/// failing exit status, so a full read count means no block was wrong.
fn assert_verified(run: &common::Run) {
    let (error, read, written, status) = verify_line(run);
    assert_eq!(
        (error.as_str(), status.as_str()),
        ("0", "0"),
        "fio reported an error; guest output:\n{}",
        run.stdout
    );
    assert_eq!(written, WRITTEN_KIB, "every block written once");
    assert_eq!(read, WRITTEN_KIB, "every block read back and checked");
}

/// MSI-X vectors of the disk's request queues, with their counts.
fn request_vectors(run: &common::Run) -> Vec<u64> {
    run.stdout
        .lines()
        .filter_map(|l| l.trim().strip_prefix("VMAPPLE-GUEST: irq "))
        .filter_map(|l| {
            let mut f = l.split(' ');
            let name = f.next()?;
            name.contains("-req.").then(|| f.next()?.parse().ok())?
        })
        .collect()
}

each_accel! {
fn verified_random_writes_at_depth_32_with_msi(accel) {
    if linux_guest_fio().is_none() {
        return;
    }
    let run = fio_verify(accel, "on");
    assert_verified(&run);
    // Two queues (one per vCPU), each completing through its own vector.
    let vectors = request_vectors(&run);
    assert_eq!(vectors.len(), 2, "a vector per queue: {}", run.stdout);
    assert!(vectors.iter().sum::<u64>() > 0, "completions by MSI-X: {vectors:?}");
}
}

each_accel! {
fn verified_random_writes_at_depth_32_without_msi(accel) {
    if linux_guest_fio().is_none() {
        return;
    }
    let run = fio_verify(accel, "off");
    assert_verified(&run);
    assert!(request_vectors(&run).is_empty(), "no MSI: {}", run.stdout);
}
}
