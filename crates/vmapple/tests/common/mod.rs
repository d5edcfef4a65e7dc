//! Shared helpers of the guest tests: locating the guest artefacts,
//! building the test firmware from source, running `vmapple` with a
//! safety-net timeout.
#![allow(dead_code)]

/// Declares a guest test once per accelerator of this build, as a module
/// named after the scenario with a test per accelerator: `tcg` (the
/// software CPU) and `hvf` (the Hypervisor.framework accelerator): on
/// macOS/arm64 the real framework (the test binary must be signed,
/// scripts/test.sh does it), elsewhere, with the `hvf-double` feature, its
/// behavioural double. The body gets the accelerator's name for `--accel`.
#[allow(unused_macros)]
macro_rules! each_accel {
    ($(#[$meta:meta])* fn $name:ident($accel:ident) $body:block) => {
        $(#[$meta])*
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            fn scenario($accel: &'static str) $body

            #[test]
            fn tcg() {
                scenario("tcg")
            }

            #[cfg(any(
                all(target_os = "macos", target_arch = "aarch64"),
                feature = "hvf-double"
            ))]
            #[test]
            fn hvf() {
                scenario("hvf")
            }
        }
    };
}

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// The Linux guest's directory, as guest/linux/build.sh makes it:
/// `VMAPPLE_GUEST_DIR` when set (e.g. a copy of one built on a Debian
/// machine), else guest/out/linux (built by scripts/setup.sh).
pub fn linux_guest_dir() -> PathBuf {
    std::env::var_os("VMAPPLE_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("guest/out/linux"))
}

/// The Debian kernel and initramfs of guest/linux/build.sh, or `None` when
/// the test is to be skipped (see [`linux_guest_files`]).
pub fn linux_guest() -> Option<(PathBuf, PathBuf)> {
    linux_guest_files("initramfs.cpio.gz")
}

/// The same kernel with the device initramfs (virtio, ext4, XHCI, HID
/// drivers as modules).
pub fn linux_guest_devices() -> Option<(PathBuf, PathBuf)> {
    linux_guest_files("initramfs-devices.cpio.gz")
}

/// The same kernel with the sharing initramfs (virtio-fs and
/// virtio-vsock drivers, the vmapple-fs and vmapple-vsock programs).
pub fn linux_guest_share() -> Option<(PathBuf, PathBuf)> {
    linux_guest_files("initramfs-share.cpio.gz")
}

/// The same kernel with the fio initramfs (Debian's fio with its
/// libraries, virtio-blk drivers).
pub fn linux_guest_fio() -> Option<(PathBuf, PathBuf)> {
    linux_guest_files("initramfs-fio.cpio.zst")
}

/// The kernel and `initramfs` in [`linux_guest_dir`]. Missing files fail
/// the test with the command that makes them, except on macOS without
/// `VMAPPLE_GUEST_DIR`: a Mac cannot build them (build.sh needs apt), so
/// there the test is skipped with a line saying so.
fn linux_guest_files(initramfs: &str) -> Option<(PathBuf, PathBuf)> {
    let dir = linux_guest_dir();
    let kernel = dir.join("Image");
    let initrd = dir.join(initramfs);
    if kernel.exists() && initrd.exists() {
        return Some((kernel, initrd));
    }
    if cfg!(target_os = "macos") && std::env::var_os("VMAPPLE_GUEST_DIR").is_none() {
        skip("no Linux guest: set VMAPPLE_GUEST_DIR to a directory made by guest/linux/build.sh on a Debian machine");
        return None;
    }
    panic!(
        "the Linux guest is not in {} (no Image or {initramfs}): run scripts/setup.sh, or guest/linux/build.sh DIR and set VMAPPLE_GUEST_DIR=DIR",
        dir.display()
    );
}

/// Reports that the calling test does nothing on this host and why, as one
/// line on stderr. Written to the stream itself, past the harness's output
/// capture, so that it shows although the test passes; in one write, so
/// that parallel tests do not interleave inside it.
pub fn skip(reason: &str) {
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("a test");
    let line = format!("skipped: {test}: {reason}\n");
    let _ = std::io::stderr().write_all(line.as_bytes());
}

/// Builds guest/firmware once per test process into the test target dir
/// and returns the output directory.
pub fn firmware_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("firmware");
        let status = Command::new("make")
            .arg("-s")
            .arg("-C")
            .arg(workspace_root().join("guest/firmware"))
            .arg(format!("OUT={}", out.display()))
            .status()
            .expect("running make for the test firmware (is `make` installed?)");
        assert!(
            status.success(),
            "building the test firmware failed (see above)"
        );
        out
    })
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn assert_line(&self, needle: &str) {
        assert!(
            self.stdout.contains(needle),
            "expected {needle:?} on the console; got:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
    }
}

/// Runs `vmapple` with `args`; kills it after `limit` (a hang must fail
/// the test, not the CI job) and reports what it printed.
pub fn vmapple(args: &[&str], limit: Duration) -> Run {
    vmapple_with_triggers(args, limit, &[])
}

/// Something a test does to a running `vmapple` once its console shows a
/// line.
pub struct Trigger<'a> {
    pub when_console_shows: &'a str,
    pub action: Action<'a>,
}

pub enum Action<'a> {
    /// Send the VMM this signal.
    Signal(i32),
    /// Run this (e.g. `vmapple ctl ...`).
    Call(Box<dyn Fn() + 'a>),
}

/// Runs `vmapple ctl SOCKET WORDS...` and returns its stdout; fails the
/// test if it fails.
pub fn ctl(socket: &Path, words: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_vmapple"))
        .arg("ctl")
        .arg(socket)
        .args(words)
        .output()
        .expect("running vmapple ctl");
    assert!(
        out.status.success(),
        "vmapple ctl {words:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A trigger that saves the VM served on `socket` into `snapshot` and
/// stops it (`vmapple ctl SOCKET save SNAPSHOT --stop`) once the console
/// shows `when`.
pub fn save_and_stop<'a>(when: &'a str, socket: &Path, snapshot: &Path) -> Trigger<'a> {
    let (socket, snapshot) = (socket.to_path_buf(), snapshot.to_path_buf());
    Trigger {
        when_console_shows: when,
        action: Action::Call(Box::new(move || {
            let snapshot = snapshot.to_str().expect("a UTF-8 path");
            ctl(&socket, &["save", snapshot, "--stop"]);
        })),
    }
}

/// A trigger that stops the VM served on `socket` (`vmapple ctl SOCKET
/// stop`) once the console shows `when`.
pub fn stop_when<'a>(when: &'a str, socket: &Path) -> Trigger<'a> {
    let socket = socket.to_path_buf();
    Trigger {
        when_console_shows: when,
        action: Action::Call(Box::new(move || {
            ctl(&socket, &["stop"]);
        })),
    }
}

/// Like [`vmapple`], but sends each trigger's signal once, as soon as the
/// console output contains its text (triggers fire in order).
pub fn vmapple_with_triggers(args: &[&str], limit: Duration, triggers: &[Trigger]) -> Run {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmapple"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning vmapple");
    let console = Arc::new(Mutex::new(Vec::new()));
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let sink = console.clone();
    let out_thread = std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n @ 1..) = stdout.read(&mut chunk) {
            sink.lock().unwrap().extend_from_slice(&chunk[..n]);
        }
    });
    let err_thread = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = stderr.read_to_end(&mut s);
        s
    });
    let start = Instant::now();
    let mut pending = triggers.iter().peekable();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if let Some(trigger) = pending.peek() {
            let seen = String::from_utf8_lossy(&console.lock().unwrap())
                .contains(trigger.when_console_shows);
            if seen {
                match &trigger.action {
                    // SAFETY: kill(2) on our own child's pid has no memory
                    // effects.
                    Action::Signal(signal) => unsafe {
                        libc::kill(child.id() as i32, *signal);
                    },
                    Action::Call(f) => f(),
                }
                pending.next();
            }
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    out_thread.join().unwrap();
    let stdout = String::from_utf8_lossy(&console.lock().unwrap()).into_owned();
    let run = Run {
        code: status.and_then(|s| s.code()).unwrap_or(-1),
        stdout,
        stderr: String::from_utf8_lossy(&err_thread.join().unwrap()).into_owned(),
    };
    assert!(
        status.is_some(),
        "vmapple {args:?} did not finish within {limit:?}; console so far:\n{}\nstderr:\n{}",
        run.stdout,
        run.stderr
    );
    run
}
pub mod linux;
pub mod registry;

#[allow(unused_imports)]
pub use linux::LinuxGuest;

/// Borrows a built command line for [`vmapple`] and its kin.
pub fn refs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// Runs `cmd` (a host tool, e.g. from e2fsprogs); returns its exit status
/// and its output, stdout then stderr.
pub fn run_tool(cmd: &mut Command) -> (i32, String) {
    let out = cmd.output().expect("running a host tool");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Checks the ext4 image `image` as the host finds it after a guest was
/// stopped with it mounted: on a copy in `dir`, the journal replayed, then
/// `e2fsck -fn` must pass. Returns the copy's `file` (debugfs `cat`).
pub fn clean_ext4_file(image: &Path, dir: &Path, file: &str) -> String {
    let copy = dir.join("check.img");
    let _ = std::fs::remove_file(&copy);
    std::fs::copy(image, &copy).unwrap();
    let (code, text) = run_tool(
        Command::new("e2fsck")
            .args(["-p", "-E", "journal_only"])
            .arg(&copy),
    );
    assert!(code <= 1, "journal replay (exit {code}):\n{text}");
    let (code, text) = run_tool(Command::new("e2fsck").arg("-fn").arg(&copy));
    assert_eq!(code, 0, "e2fsck -fn:\n{text}");
    let (_, content) = run_tool(
        Command::new("debugfs")
            .args(["-R", &format!("cat {file}")])
            .arg(&copy),
    );
    std::fs::remove_file(&copy).unwrap();
    content
}

/// Runs `vmapple` to completion, for runs refused before the guest: exit
/// status 1, one error message (returned), no panic, no console output.
pub fn refused(args: &[String]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_vmapple"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("vmapple: error:"))
        .collect();
    assert_eq!(errors.len(), 1, "one message: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(out.stdout.is_empty(), "nothing ran: {:?}", out.stdout);
    errors[0].to_string()
}
