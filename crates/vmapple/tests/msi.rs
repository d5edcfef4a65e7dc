//! Message-signalled interrupts proved against Debian's kernel: with
//! `--msi on` the guest's GICv3 driver finds the distributor's
//! message-based SPIs through the device tree, and every virtio queue, the
//! virtio configuration change and the XHCI get an MSI-X vector of their
//! own; the disk round trip through those vectors leaves a clean ext4.
//! With `--msi off` the same guest sees QEMU's machine: no MSI anywhere,
//! shared INTx lines, and the same disk round trip.

#[macro_use]
mod common;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{linux_guest_devices, refs, vmapple, LinuxGuest, Run};

fn scratch_dir(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn mkfs_ext4(path: &Path) {
    std::fs::File::create(path)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let status = Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(path)
        .status()
        .expect("mkfs.ext4 (e2fsprogs; scripts/setup.sh installs it)");
    assert!(status.success());
}

fn assert_fsck_clean(image: &Path) {
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(image)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "e2fsck -fn: {}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
}

/// `(name, count)` of every MSI the guest listed ("irq NAME COUNT HWIRQ").
fn msis(run: &Run) -> Vec<(String, u64)> {
    run.stdout
        .lines()
        .filter_map(|l| l.trim().strip_prefix("VMAPPLE-GUEST: irq "))
        .filter_map(|l| {
            let mut f = l.split(' ');
            Some((f.next()?.to_owned(), f.next()?.parse().ok()?))
        })
        .collect()
}

/// Boots the device guest with a NIC, a disk and the XHCI, writes files to
/// the disk and powers off.
fn boot(accel: &str, msi: &str, dir: &Path) -> (Run, PathBuf) {
    let Some(files) = linux_guest_devices() else {
        panic!("the Linux guest is missing: run guest/linux/build.sh");
    };
    let data = dir.join("data.img");
    mkfs_ext4(&data);
    // The NIC's far end: a datagram socket nothing is sent to; the guest
    // brings the interface up, which is all the vectors need.
    let peer_path = dir.join("peer.sock");
    let _peer = UnixDatagram::bind(&peer_path).unwrap();
    let net = format!(
        "unix-dgram:{},{}",
        dir.join("vm.sock").display(),
        peer_path.display()
    );
    let args = LinuxGuest::new(
        &files,
        "console=ttyAMA0 quiet vmapple.pci vmapple.blk=vda vmapple.irqs",
    )
    .args(["--accel", accel])
    .two_cpus()
    .args([
        "--disk",
        data.to_str().unwrap(),
        "--net",
        &net,
        "--msi",
        msi,
    ])
    .build();
    let run = vmapple(&refs(&args), Duration::from_secs(300));
    assert_eq!(run.code, 0, "guest powered off; stderr:\n{}", run.stderr);
    run.assert_line("VMAPPLE-GUEST: blk done");
    (run, data)
}

each_accel! {
fn with_msi_on_every_queue_has_its_own_vector(accel) {
    if linux_guest_devices().is_none() {
        return;
    }
    let dir = scratch_dir(&format!("msi-on-{accel}"));
    let (run, data) = boot(accel, "on", &dir);
    let msis = msis(&run);
    let count = |suffix: &str| {
        msis.iter()
            .filter(|(name, _)| name.ends_with(suffix))
            .map(|(_, n)| *n)
            .collect::<Vec<_>>()
    };
    // virtio-blk: one queue per vCPU, each with a vector, plus config.
    let req0 = count("-req.0");
    let req1 = count("-req.1");
    assert!(req0.len() == 1 && req1.len() == 1, "one vector per queue: {msis:?}");
    assert!(req0[0] + req1[0] > 0, "completions arrived by MSI-X: {msis:?}");
    assert_eq!(count("-config").len(), 2, "blk and net config vectors: {msis:?}");
    // virtio-net: a receive and a transmit vector.
    assert_eq!(count("-input.0").len(), 1, "{msis:?}");
    assert_eq!(count("-output.0").len(), 1, "{msis:?}");
    // XHCI: its interrupters' vectors, and the enumeration of the
    // keyboard and tablet came through them.
    let xhci = count("xhci_hcd");
    assert!(!xhci.is_empty() && xhci.iter().sum::<u64>() > 0, "{msis:?}");
    assert_fsck_clean(&data);
}
}

each_accel! {
fn with_msi_off_the_guest_sees_only_intx(accel) {
    if linux_guest_devices().is_none() {
        return;
    }
    let dir = scratch_dir(&format!("msi-off-{accel}"));
    let (run, data) = boot(accel, "off", &dir);
    assert!(msis(&run).is_empty(), "no MSI: {:?}", msis(&run));
    // Every PCI function has a legacy interrupt line.
    let pci: Vec<&str> = run
        .stdout
        .lines()
        .filter_map(|l| l.trim().strip_prefix("VMAPPLE-GUEST: pci "))
        .filter(|l| !l.contains(" 0x060000 "))
        .collect();
    assert_eq!(pci.len(), 3, "XHCI, NIC, disk: {pci:?}");
    assert!(pci.iter().all(|l| !l.ends_with("irq 0")), "{pci:?}");
    assert_fsck_clean(&data);
}
}
