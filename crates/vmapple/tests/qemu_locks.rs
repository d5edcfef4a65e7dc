//! vmapple and QEMU see each other's use of a raw disk image: QEMU's own
//! tools and machines refuse an image a running vmapple holds, and
//! vmapple refuses an image a running `qemu-system-aarch64` holds, naming
//! the process. Real `qemu-img` and `qemu-system-aarch64` (Debian's
//! qemu-utils and qemu-system-arm, installed by scripts/setup.sh).
#![cfg(target_os = "linux")]

mod common;

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Generous bound for a process to get its disks open.
const START: Duration = Duration::from_secs(120);

fn scratch(name: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::Builder::new().prefix("vmq").tempdir().unwrap();
    let image = dir.path().join(name);
    File::create(&image).unwrap().set_len(1 << 20).unwrap();
    (dir, image)
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A child killed when the test ends, however it ends.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether someone holds a lock on byte `byte` of `image`: the test QEMU
/// itself makes (a write-lock probe with `F_OFD_GETLK`).
fn byte_locked(image: &Path, byte: i64) -> bool {
    let f = File::open(image).unwrap();
    // SAFETY: all-zero is a valid flock.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte;
    fl.l_len = 1;
    // SAFETY: fcntl on our descriptor with a live flock it may write.
    let ret = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    assert_eq!(ret, 0);
    fl.l_type != libc::F_UNLCK as libc::c_short
}

/// Waits (bounded) for `ready`, failing early if `child` exits.
fn wait(what: &str, child: &mut Child, ready: impl Fn() -> bool) {
    let start = Instant::now();
    while !ready() {
        let exited = child.try_wait().unwrap();
        assert!(
            exited.is_none() && start.elapsed() < START,
            "waited for {what}: {exited:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn qemu_img(args: &[&str]) -> Output {
    Command::new("qemu-img")
        .args(args)
        .output()
        .expect("running qemu-img (install qemu-utils: scripts/setup.sh)")
}

fn qemu_system(image: &Path) -> Command {
    let mut c = Command::new("qemu-system-aarch64");
    c.args(["-M", "virt", "-cpu", "max", "-display", "none", "-S"])
        .args(["-nic", "none", "-serial", "none", "-monitor", "none"])
        .arg("-drive")
        .arg(format!("file={},format=raw", image.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

#[test]
fn qemu_refuses_an_image_vmapple_runs() {
    let (dir, image) = scratch("held.img");
    let control = dir.path().join("c.sock");
    let (kernel, _) = common::linux_guest();
    let vmapple = Command::new(env!("CARGO_BIN_EXE_vmapple"))
        .arg("run")
        .arg("--kernel")
        .arg(&kernel)
        .arg("--root")
        .arg(&image)
        .args(["--net", "none", "--paused", "--control"])
        .arg(&control)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut vmapple = Killed(vmapple);
    // Its control socket is served once the machine (disks and all) is
    // built.
    wait("vmapple's control socket", &mut vmapple.0, || {
        control.exists()
    });

    let copy = dir.path().join("copy.img");
    let out = qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        image.to_str().unwrap(),
        copy.to_str().unwrap(),
    ]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Failed to get shared \"write\" lock"),
        "{}",
        text(&out)
    );
    let out = qemu_img(&["resize", "-f", "raw", image.to_str().unwrap(), "2M"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Failed to get \""),
        "{}",
        text(&out)
    );
    assert_eq!(std::fs::metadata(&image).unwrap().len(), 1 << 20);

    let out = qemu_system(&image).output().unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Failed to get \"write\" lock"),
        "{}",
        text(&out)
    );

    // The locks go with the process.
    drop(vmapple);
    let out = qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        image.to_str().unwrap(),
        copy.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn vmapple_refuses_an_image_qemu_runs_and_names_it() {
    let (_dir, image) = scratch("qemu.img");
    let mut qemu = Killed(qemu_system(&image).spawn().unwrap());
    let qemu_pid = qemu.0.id();
    // QEMU holds "write" (byte 101) once its disk is attached.
    wait("QEMU's write lock", &mut qemu.0, || {
        byte_locked(&image, 101)
    });

    let (kernel, _) = common::linux_guest();
    let kernel = kernel.to_str().unwrap();
    let image_arg = image.to_str().unwrap();
    // Bounded: a vmapple that wrongly starts is killed, failing the test.
    let out = common::vmapple(
        &[
            "run", "--kernel", kernel, "--root", image_arg, "--net", "none",
        ],
        START,
    );
    let stderr = &out.stderr;
    assert_eq!(out.code, 1, "{stderr}");
    assert!(
        stderr.contains(&format!(
            "is in use by another process, pid {qemu_pid} (qemu-system-aarch64)"
        )),
        "{stderr}"
    );
    assert!(stderr.contains("\"write\""), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    // Read-only is refused too: QEMU writes to it.
    let readonly = format!("{image_arg},readonly");
    let out = common::vmapple(
        &[
            "run", "--kernel", kernel, "--root", &readonly, "--net", "none",
        ],
        START,
    );
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stderr.contains("in use by another process"),
        "{}",
        out.stderr
    );
}
