//! Shared helpers of the guest tests: locating the guest artefacts,
//! building the test firmware from source, running `vmapple` with a
//! safety-net timeout.
#![allow(dead_code)]

/// Declares a guest test once per accelerator of this build, as a module
/// named after the scenario with a test per accelerator: `tcg` (the
/// software CPU) and, with the `hvf-double` feature, `hvf` (the
/// Hypervisor.framework accelerator running against its behavioural
/// double). The body gets the accelerator's name for `--accel`.
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

            #[cfg(feature = "hvf-double")]
            #[test]
            fn hvf() {
                scenario("hvf")
            }
        }
    };
}

use std::io::Read;
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

/// `guest/out` (built by scripts/setup.sh), or `VMAPPLE_GUEST_DIR`.
pub fn guest_out() -> PathBuf {
    std::env::var_os("VMAPPLE_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("guest/out"))
}

/// The Debian kernel and initramfs of guest/linux/build.sh. Missing files
/// fail the test with the command that makes them.
pub fn linux_guest() -> (PathBuf, PathBuf) {
    let dir = guest_out().join("linux");
    let kernel = dir.join("Image");
    let initrd = dir.join("initramfs.cpio.gz");
    assert!(
        kernel.exists() && initrd.exists(),
        "the Linux guest is not built: run scripts/setup.sh (or guest/linux/build.sh)"
    );
    (kernel, initrd)
}

/// The same kernel with the device initramfs (virtio, ext4, XHCI, HID
/// drivers as modules).
pub fn linux_guest_devices() -> (PathBuf, PathBuf) {
    let (kernel, _) = linux_guest();
    let initrd = guest_out().join("linux/initramfs-devices.cpio.gz");
    assert!(
        initrd.exists(),
        "the device initramfs is not built: run scripts/setup.sh (or guest/linux/build.sh)"
    );
    (kernel, initrd)
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
