//! Running VMs the way users do: `vmapple create`, `list`, `run NAME`,
//! `ctl NAME ...`, `import` of Tart and macosvm VMs, and the bundle's
//! log file, all against a throwaway `VMAPPLE_HOME`.
//!
//! Each test asserts what a user (or a script) sees: command output, exit
//! statuses, the guest's console, files in the bundle.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{firmware_dir, linux_guest_devices};

/// Generous bound for anything the software CPU has to boot.
const BOOT: Duration = Duration::from_secs(300);

/// A bundles home of its own, removed at the end of the test. Under /tmp:
/// a unix socket path must fit in 108 bytes.
struct Home(tempfile::TempDir);

impl Home {
    fn new() -> Home {
        Home(tempfile::Builder::new().prefix("vmh").tempdir().unwrap())
    }

    fn path(&self) -> &Path {
        self.0.path()
    }

    fn bundle(&self, name: &str) -> PathBuf {
        self.path().join(format!("{name}.vmapple"))
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_vmapple"));
        c.args(args)
            .env("VMAPPLE_HOME", self.path())
            .env_remove("RUST_LOG")
            .stdin(Stdio::null());
        c
    }

    /// Runs a short command to completion.
    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("running vmapple")
    }

    /// Runs a short command that must succeed; returns its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "vmapple {args:?} failed ({:?}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn spawn(&self, args: &[&str]) -> Running {
        Running::spawn(self.command(args), args)
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A user error: status 1, one `vmapple: error:` line, no panic.
fn assert_user_error(out: &Output, needle: &str) {
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr:\n{stderr}");
    assert!(stderr.contains(needle), "want {needle:?} in:\n{stderr}");
    assert!(
        stderr.contains("vmapple: error:") && !stderr.contains("panicked at"),
        "{stderr}"
    );
}

/// A background `vmapple` whose stdout and stderr are collected as they
/// come. Killed if the test ends without waiting for it.
struct Running {
    child: Child,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    what: String,
}

fn collect(mut from: impl Read + Send + 'static) -> Arc<Mutex<Vec<u8>>> {
    let sink = Arc::new(Mutex::new(Vec::new()));
    let s = sink.clone();
    std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n @ 1..) = from.read(&mut chunk) {
            s.lock().unwrap().extend_from_slice(&chunk[..n]);
        }
    });
    sink
}

impl Running {
    fn spawn(mut command: Command, args: &[&str]) -> Running {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning vmapple");
        let stdout = collect(child.stdout.take().unwrap());
        let stderr = collect(child.stderr.take().unwrap());
        Running {
            child,
            stdout,
            stderr,
            what: format!("vmapple {args:?}"),
        }
    }

    fn stdout(&self) -> String {
        text(&self.stdout.lock().unwrap())
    }

    fn stderr(&self) -> String {
        text(&self.stderr.lock().unwrap())
    }

    /// Waits until stdout satisfies `cond`; fails the test after `limit`
    /// or if the process ends first.
    fn wait_until(&mut self, what: &str, limit: Duration, cond: impl Fn(&str) -> bool) {
        let start = Instant::now();
        loop {
            if cond(&self.stdout()) {
                return;
            }
            let exited = self.child.try_wait().unwrap();
            assert!(
                exited.is_none() && start.elapsed() < limit,
                "{}: waited for {what} ({}); stdout:\n{}\nstderr:\n{}",
                self.what,
                match exited {
                    Some(s) => format!("it exited with {s}"),
                    None => format!("not within {limit:?}"),
                },
                self.stdout(),
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn wait_for(&mut self, needle: &str, limit: Duration) {
        self.wait_until(&format!("{needle:?}"), limit, |out| out.contains(needle));
    }

    /// Waits for the process to end on its own; returns its exit code.
    fn wait_exit(&mut self, limit: Duration) -> i32 {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Let the collectors take the last output.
                std::thread::sleep(Duration::from_millis(200));
                return status.code().unwrap_or(-1);
            }
            if start.elapsed() > limit {
                let _ = self.child.kill();
                panic!(
                    "{} did not exit within {limit:?}; stdout:\n{}\nstderr:\n{}",
                    self.what,
                    self.stdout(),
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The largest `VMAPPLE-GUEST: tick N` on the console.
fn last_tick(console: &str) -> Option<u64> {
    console
        .lines()
        .filter_map(|l| l.trim().strip_prefix("VMAPPLE-GUEST: tick "))
        .filter_map(|n| n.trim().parse().ok())
        .max()
}

/// Bytes of `path` actually allocated on disk.
fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// Creates bundle `name` small enough for the Linux guest.
fn create_small(home: &Home, name: &str) {
    home.ok(&[
        "create",
        name,
        "--cpus",
        "2",
        "--memory",
        "512M",
        "--disk-size",
        "1G",
        "--net",
        "none",
    ]);
}

#[test]
fn create_makes_a_listed_bundle_with_what_was_asked_and_sparse_disks() {
    let home = Home::new();
    let out = home.ok(&[
        "create",
        "work",
        "--cpus",
        "3",
        "--memory",
        "768M",
        "--disk-size",
        "8G",
        "--ecid",
        "0x1122334455667788",
        "--net",
        "none",
    ]);
    let dir = home.bundle("work");
    assert!(out.contains(&dir.display().to_string()), "{out}");

    let list = home.ok(&["list"]);
    let line = list
        .lines()
        .find(|l| l.starts_with("work\t"))
        .unwrap_or_else(|| panic!("work is not listed:\n{list}"));
    assert!(line.contains("3 vCPUs, 768 MiB"), "{line}");
    assert!(line.contains("stopped"), "{line}");

    let config = std::fs::read_to_string(dir.join("config.toml")).unwrap();
    for want in [
        "cpus = 3",
        "memory = \"768M\"",
        "network = \"none\"",
        "ecid = \"1234605616436508552\"",
    ] {
        assert!(
            config.lines().any(|l| l.trim() == want),
            "{want} in:\n{config}"
        );
    }
    assert_eq!(
        home.ok(&["identity", "work"]).trim(),
        0x1122_3344_5566_7788u64.to_string()
    );

    let root = dir.join("root.img");
    let aux = dir.join("aux.img");
    assert_eq!(std::fs::metadata(&root).unwrap().len(), 8 << 30);
    assert_eq!(std::fs::metadata(&aux).unwrap().len(), 32 << 20);
    assert!(allocated(&root) < 1 << 20, "root.img is not sparse");
    assert!(allocated(&aux) < 1 << 20, "aux.img is not sparse");

    // A second create of the same name changes nothing.
    let again = home.run(&["create", "work", "--cpus", "1"]);
    assert_user_error(&again, "already exists");
    assert!(std::fs::read_to_string(dir.join("config.toml"))
        .unwrap()
        .contains("cpus = 3"));

    home.ok(&["delete", "work"]);
    assert!(!dir.exists());
    assert!(!home.ok(&["list"]).contains("work"));
}

#[test]
fn ctl_on_a_bundle_that_is_not_running_says_so() {
    let home = Home::new();
    create_small(&home, "idle");
    let out = home.run(&["ctl", "idle", "status"]);
    assert_user_error(&out, "is not running");
    let out = home.run(&["ctl", "nosuchvm", "status"]);
    assert_user_error(&out, "no bundle at");
    assert!(text(&out.stderr).contains("nosuchvm.vmapple"));
}

#[test]
fn a_run_that_fails_leaves_its_reason_in_the_bundle_log() {
    let home = Home::new();
    create_small(&home, "broken");
    let out = home.run(&["run", "broken", "--kernel", "/nonexistent/Image"]);
    assert_user_error(&out, "/nonexistent/Image");
    let log = std::fs::read_to_string(home.bundle("broken").join("vmapple.log")).unwrap();
    assert!(log.contains("running bundle broken"), "{log}");
    assert!(
        log.lines()
            .any(|l| l.contains("ERROR") && l.contains("/nonexistent/Image")),
        "{log}"
    );
    // The error is on stderr once, not once per sink.
    assert_eq!(text(&out.stderr).matches("/nonexistent/Image").count(), 1);
}

/// `vmapple run NAME` of the Linux guest of `files` with a heartbeat (a
/// shell loop printing a counter) and power-button handling.
fn ticker_run_args(name: &str, files: &(PathBuf, PathBuf)) -> Vec<String> {
    let append = "console=ttyAMA0 quiet vmapple.tick vmapple.powerkey";
    common::LinuxGuest::bundle(name, files, append).build()
}

/// One boot of the Linux guest from a bundle, driven the way a user would:
/// control socket (status, pause, resume, hostile input, powerdown), a
/// second `run` of the same bundle, an event follower, the log file.
#[test]
fn a_running_bundle_is_controlled_through_its_socket() {
    let home = Home::new();
    create_small(&home, "vm");
    let dir = home.bundle("vm");
    let Some(files) = linux_guest_devices() else {
        return;
    };
    let run_args = ticker_run_args("vm", &files);
    let run_args = common::refs(&run_args);
    let mut vm = home.spawn(&run_args);
    vm.wait_for("waiting for the power button", BOOT);
    vm.wait_until("a few ticks", BOOT, |c| last_tick(c) >= Some(3));

    let socket = dir.join("control.sock");
    let mode = std::fs::symlink_metadata(&socket)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "only the owner may control the VM");
    assert!(home.ok(&["ctl", "vm", "status"]).contains("\"running\""));
    let pid = vm.child.id();
    let list = home.ok(&["list"]);
    assert!(
        list.lines()
            .any(|l| l.starts_with("vm\t") && l.contains(&format!("running (pid {pid})"))),
        "{list}"
    );

    // A second run of the same bundle is refused and harms nothing.
    let second = home.run(&run_args);
    assert_user_error(&second, "already in use");
    assert!(text(&second.stderr).contains(&pid.to_string()));
    assert!(socket.exists(), "the refused run left the socket alone");
    assert!(home.ok(&["ctl", "vm", "status"]).contains("\"running\""));

    // Hostile requests over the real socket: each gets an error reply on
    // the same connection, which stays usable.
    let stream = UnixStream::connect(&socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    let mut ask = |line: &[u8]| {
        writer.write_all(line).unwrap();
        let mut reply = String::new();
        reader.read_line(&mut reply).unwrap();
        reply
    };
    let mut huge = vec![b'x'; 1 << 20];
    huge.push(b'\n');
    for (request, want) in [
        (&huge[..], "exceeds"),
        (b"{\"cmd\": \"status\"\n" as &[u8], "\"error\""),
        (b"\xff\xfe\x00garbage\n", "\"error\""),
        (b"[1,2,3]\n", "\"error\""),
        (b"{\"cmd\":\"self-destruct\"}\n", "self-destruct"),
        (b"{\"cmd\":\"pointer\",\"x\":99999,\"y\":0}\n", "\"error\""),
        (b"{\"cmd\":\"status\"}\n", "\"running\""),
    ] {
        let reply = ask(request);
        assert!(
            reply.contains(want),
            "{:?}: {reply}",
            String::from_utf8_lossy(&request[..request.len().min(40)])
        );
    }
    let unknown = home.run(&["ctl", "vm", "self-destruct"]);
    assert_user_error(&unknown, "self-destruct");
    assert!(vm.is_running());

    // An event follower for the rest of the run.
    let mut events = home.spawn(&["ctl", "vm", "events"]);
    events.wait_for("{\"ok\"", Duration::from_secs(30));

    // Pause: the guest's heartbeat stops until resume.
    assert!(home.ok(&["ctl", "vm", "pause"]).contains("\"ok\""));
    assert!(home.ok(&["ctl", "vm", "status"]).contains("\"paused\""));
    // A vCPU may finish the instruction slice it was in when the pause
    // came; after that nothing of the guest runs.
    std::thread::sleep(Duration::from_secs(1));
    let frozen = last_tick(&vm.stdout());
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        last_tick(&vm.stdout()),
        frozen,
        "the guest made progress while paused"
    );
    assert!(vm.is_running());
    assert!(home.ok(&["ctl", "vm", "resume"]).contains("\"ok\""));
    assert!(home.ok(&["ctl", "vm", "status"]).contains("\"running\""));
    let frozen = frozen.unwrap();
    vm.wait_until("ticks after resume", BOOT, |c| {
        last_tick(c) >= Some(frozen + 3)
    });

    // Powerdown presses the power button; the guest powers off.
    assert!(home.ok(&["ctl", "vm", "powerdown"]).contains("\"ok\""));
    assert_eq!(vm.wait_exit(BOOT), 0, "stderr:\n{}", vm.stderr());
    assert!(vm.stdout().contains("VMAPPLE-GUEST: power button pressed"));
    assert!(!socket.exists(), "the socket goes with the VM");
    assert!(home.ok(&["list"]).contains("stopped"));

    // The follower saw pause, resume and the power-off, then ended.
    assert_eq!(events.wait_exit(Duration::from_secs(30)), 0);
    let seen: Vec<String> = events
        .stdout()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v.get("event")?.as_str().map(str::to_owned))
        .collect();
    assert_eq!(seen, ["paused", "resumed", "powered-off"], "{seen:?}");

    // The log file has this run in plain text, and nothing of the
    // refused one.
    let log = std::fs::read_to_string(dir.join("vmapple.log")).unwrap();
    for want in [
        "running bundle vm",
        "VM paused",
        "VM resumed",
        "power button pressed",
        "guest powered off",
    ] {
        assert!(log.contains(want), "{want} in the log:\n{log}");
    }
    assert!(!log.contains('\x1b'), "no terminal colours in the log");
    assert!(!log.contains("already in use"), "{log}");
    let first = log.lines().next().unwrap();
    assert!(
        first.starts_with(|c: char| c.is_ascii_digit()),
        "lines start with a timestamp: {first}"
    );
}

/// The panic firmware from a bundle, started paused so the event
/// follower is subscribed before the guest's first instruction.
#[test]
fn a_guest_panic_reaches_event_subscribers() {
    let home = Home::new();
    home.ok(&[
        "create",
        "p",
        "--cpus",
        "1",
        "--memory",
        "256M",
        "--disk-size",
        "1M",
        "--net",
        "none",
    ]);
    let firmware = firmware_dir().join("panic-vmapple.bin");
    let mut vm = home.spawn(&[
        "run",
        "p",
        "--firmware",
        firmware.to_str().unwrap(),
        "--on-panic",
        "pause",
        "--no-usb",
        "--paused",
    ]);
    let socket = home.bundle("p").join("control.sock");
    let start = Instant::now();
    while !socket.exists() {
        assert!(
            vm.is_running() && start.elapsed() < Duration::from_secs(60),
            "no control socket; stderr:\n{}",
            vm.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(home.ok(&["ctl", "p", "status"]).contains("\"paused\""));
    assert!(!vm.stdout().contains("reporting a panic"), "it runs paused");

    let mut events = home.spawn(&["ctl", "p", "events"]);
    events.wait_for("{\"ok\"", Duration::from_secs(30));
    home.ok(&["ctl", "p", "resume"]);
    events.wait_for("guest-panicked", Duration::from_secs(60));
    let panic_event: serde_json::Value = events
        .stdout()
        .lines()
        .find(|l| l.contains("guest-panicked"))
        .and_then(|l| serde_json::from_str(l).ok())
        .expect("the event is one JSON line");
    assert_eq!(panic_event["data"]["action"], "pause", "{panic_event}");
    assert!(panic_event["timestamp"]["seconds"].as_u64().unwrap() > 0);

    vm.wait_for("reporting a panic", Duration::from_secs(30));
    assert!(home.ok(&["ctl", "p", "status"]).contains("\"paused\""));
    assert!(!vm.stdout().contains("still running"), "{}", vm.stdout());

    home.ok(&["ctl", "p", "stop"]);
    assert_eq!(vm.wait_exit(Duration::from_secs(60)), 6, "{}", vm.stderr());
    assert_eq!(events.wait_exit(Duration::from_secs(30)), 0);
    let log = std::fs::read_to_string(home.bundle("p").join("vmapple.log")).unwrap();
    assert!(log.contains("guest panic"), "{log}");
}

#[test]
fn paused_without_a_control_socket_is_a_usage_error() {
    let firmware = firmware_dir().join("panic-vmapple.bin");
    let home = Home::new();
    let out = home.run(&["run", "--firmware", firmware.to_str().unwrap(), "--paused"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("--paused needs a control socket"));
}

// ---- imports -------------------------------------------------------------

const ECID: u64 = 0x1122_3344_5566_7788;
const SECTOR: usize = 512;
/// Virtualization.framework's header in front of an aux file.
const VZ_AUX_HEADER: usize = 16384;

/// `{ECID: ecid}` as a binary property list, written out by hand so the
/// test does not share an encoder with the code under test.
fn machine_identifier(ecid: u64) -> Vec<u8> {
    let mut p = b"bplist00".to_vec();
    let offsets = [p.len(), p.len() + 3, p.len() + 8];
    p.extend_from_slice(&[0xd1, 1, 2]); // dict of one: key obj 1, value obj 2
    p.extend_from_slice(b"\x54ECID"); // ASCII string of 4
    p.push(0x13); // 8-byte integer
    p.extend_from_slice(&ecid.to_be_bytes());
    let table = p.len() as u64;
    p.extend(offsets.iter().map(|&o| o as u8));
    p.extend_from_slice(&[0; 6]);
    p.extend_from_slice(&[1, 1]); // offset size, object ref size
    p.extend_from_slice(&3u64.to_be_bytes()); // objects
    p.extend_from_slice(&0u64.to_be_bytes()); // top object
    p.extend_from_slice(&table.to_be_bytes());
    p
}

/// A `VZMacHardwareModel` data representation as an XML plist (vmapple
/// reads XML and binary alike; VZ writes binary).
fn hardware_model(version: u32, min_major: u32) -> Vec<u8> {
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">
<plist version="1.0"><dict>
<key>DataRepresentationVersion</key><integer>{version}</integer>
<key>MinimumSupportedOS</key><array><integer>{min_major}</integer><integer>0</integer><integer>0</integer></array>
<key>PlatformVersion</key><integer>2</integer>
</dict></plist>
"#
    )
    .into_bytes()
}

fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// An aux file as Virtualization.framework keeps it (a 16 KiB header of
/// its own) holding what guest/firmware/apple.c loads: a header naming the
/// second stage, the second stage at sector 8.
fn write_vz_aux(path: &Path) {
    let stage2 = std::fs::read(firmware_dir().join("stage2.bin")).unwrap();
    let mut image = vec![0xa5u8; VZ_AUX_HEADER];
    let mut aux = vec![0u8; 64 * 1024];
    aux[..8].copy_from_slice(b"VMAPSTG2");
    aux[8..12].copy_from_slice(&(stage2.len() as u32).to_le_bytes());
    aux[12..16].copy_from_slice(&8u32.to_le_bytes());
    aux[8 * SECTOR..8 * SECTOR + stage2.len()].copy_from_slice(&stage2);
    image.extend_from_slice(&aux);
    std::fs::write(path, image).unwrap();
}

/// A root disk with the text apple.c reads at sector 3.
fn write_root(path: &Path) {
    let mut image = vec![0u8; 1 << 20];
    let text = b"vmapple root disk, sector 3";
    image[3 * SECTOR..3 * SECTOR + text.len()].copy_from_slice(text);
    std::fs::write(path, image).unwrap();
}

/// Runs the imported bundle on guest/firmware/apple.c, which checks the
/// vCPU count, RAM size and ECID it is given, loads its second stage from
/// the aux disk and reads the root disk: the import got all of them right
/// only if every check passes.
fn boot_rom_checks_pass(home: &Home, name: &str) {
    let firmware = firmware_dir().join("apple-vmapple.bin");
    let mut vm = home.spawn(&[
        "run",
        name,
        "--firmware",
        firmware.to_str().unwrap(),
        "--net",
        "none",
    ]);
    vm.wait_for("waiting for the power button", Duration::from_secs(120));
    home.ok(&["ctl", name, "powerdown"]);
    assert_eq!(vm.wait_exit(Duration::from_secs(120)), 0, "{}", vm.stderr());
    let console = vm.stdout();
    assert!(
        console.contains("stage 2: running, loaded from the aux disk"),
        "{console}"
    );
    for check in ["cfg-nr-cpus", "cfg-ecid", "cfg-ram-size", "bdif-root-read"] {
        assert!(
            console.contains(&format!("PASS {check}")),
            "{check}: {console}"
        );
    }
    assert!(console.contains("ALL CHECKS PASSED"), "{console}");
}

/// `vmapple identity` prints the ECID in decimal, as uuid.sh's
/// `plutil -extract ECID raw` does, from a MachineIdentifier plist file,
/// from a Virtualization.framework bundle holding one, and from a macosvm
/// JSON carrying it base64-encoded.
#[test]
fn identity_prints_the_ecid_of_a_machine_identifier() {
    let home = Home::new();
    let dir = tempfile::tempdir().unwrap();
    let plist = dir.path().join("MachineIdentifier.plist");
    std::fs::write(&plist, machine_identifier(ECID)).unwrap();
    assert_eq!(
        home.ok(&["identity", plist.to_str().unwrap()]).trim(),
        "1234605616436508552"
    );

    let vz = dir.path().join("VM.bundle");
    std::fs::create_dir(&vz).unwrap();
    std::fs::write(
        vz.join("MachineIdentifier"),
        machine_identifier(i64::MAX as u64),
    )
    .unwrap();
    assert_eq!(
        home.ok(&["identity", vz.to_str().unwrap()]).trim(),
        "9223372036854775807"
    );
    // A Virtualization.framework bundle's HardwareModel is shown on
    // stderr; stdout stays the ECID alone.
    std::fs::write(vz.join("HardwareModel"), hardware_model(2, 26)).unwrap();
    let out = home.run(&["identity", vz.to_str().unwrap()]);
    assert_eq!(text(&out.stdout), "9223372036854775807\n");
    assert_eq!(
        text(&out.stderr),
        "vmapple: identity: hardware model DataRepresentationVersion 2, PlatformVersion 2, MinimumSupportedOS 26.0.0\n"
    );
    std::fs::write(vz.join("HardwareModel"), b"bplist00 garbage").unwrap();
    let out = home.run(&["identity", vz.to_str().unwrap()]);
    assert!(out.status.success());
    assert_eq!(text(&out.stdout), "9223372036854775807\n");
    let err = text(&out.stderr);
    assert!(
        err.contains("hardware model unreadable") && err.contains("HardwareModel"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");

    let macosvm = dir.path().join("vm.json");
    let json = serde_json::json!({ "machineId": base64(&machine_identifier(7)) });
    std::fs::write(&macosvm, json.to_string()).unwrap();
    assert_eq!(
        home.ok(&["identity", macosvm.to_str().unwrap()]).trim(),
        "7"
    );

    let broken = dir.path().join("broken.plist");
    std::fs::write(&broken, b"bplist00 truncated").unwrap();
    let out = home.run(&["identity", broken.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("broken.plist"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn a_tart_vm_imports_with_its_cpus_memory_identity_and_disks() {
    let home = Home::new();
    let tart = tempfile::tempdir().unwrap();
    let config = serde_json::json!({
        "version": 1,
        "os": "darwin",
        "arch": "arm64",
        "ecid": base64(&machine_identifier(ECID)),
        "hardwareModel": base64(&hardware_model(1, 13)),
        "cpuCountMin": 2,
        "cpuCount": 2,
        "memorySizeMin": 268435456u64,
        "memorySize": 268435456u64,
        "macAddress": "7a:65:e4:3c:2b:01",
        "display": { "width": 1024, "height": 768 },
        "diskFormat": "asif",
    });
    std::fs::write(tart.path().join("config.json"), config.to_string()).unwrap();
    write_vz_aux(&tart.path().join("nvram.bin"));
    write_root(&tart.path().join("disk.img"));

    let model_line = "vmapple: identity: hardware model DataRepresentationVersion 1, PlatformVersion 2, MinimumSupportedOS 13.0.0\n";
    let out = home.run(&["identity", tart.path().to_str().unwrap()]);
    assert_eq!(text(&out.stdout), format!("{ECID}\n"));
    assert_eq!(text(&out.stderr), model_line);
    let out = home.run(&["import", tart.path().to_str().unwrap(), "fromtart"]);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        text(&out.stdout).contains(&format!("2 vCPUs, 256 MiB, ECID {ECID}")),
        "{}",
        text(&out.stdout)
    );
    for want in [
        "vmapple: import: diskFormat = \"asif\" is not supported and was ignored",
        "vmapple: import: hardware model DataRepresentationVersion 1, PlatformVersion 2, MinimumSupportedOS 13.0.0: kept in the bundle",
    ] {
        assert!(stderr.contains(want), "{want} in:\n{stderr}");
    }
    // The bundle keeps the model byte for byte and shows it.
    assert_eq!(
        std::fs::read(home.bundle("fromtart").join("HardwareModel")).unwrap(),
        hardware_model(1, 13)
    );
    let out = home.run(&["identity", "fromtart"]);
    assert_eq!(text(&out.stdout), format!("{ECID}\n"));
    assert_eq!(text(&out.stderr), model_line);
    let config = std::fs::read_to_string(home.bundle("fromtart").join("config.toml")).unwrap();
    assert!(config.contains("mac = \"7a:65:e4:3c:2b:01\""), "{config}");
    assert!(config.contains("1024x768"), "{config}");
    boot_rom_checks_pass(&home, "fromtart");
}

#[test]
fn a_macosvm_vm_imports_with_its_cpus_memory_identity_and_disks() {
    let home = Home::new();
    let src = tempfile::tempdir().unwrap();
    write_vz_aux(&src.path().join("aux.img"));
    write_root(&src.path().join("disk.img"));
    let json = serde_json::json!({
        "version": 1,
        "hardwareModel": base64(&hardware_model(2, 26)),
        "machineId": base64(&machine_identifier(ECID)),
        "cpus": 2,
        "ram": 268435456u64,
        "storage": [
            { "type": "disk", "file": "disk.img", "readOnly": false },
            { "type": "aux", "file": "aux.img", "readOnly": false },
        ],
        "displays": [{ "dpi": 200, "width": 2560, "height": 1600 }],
        "networks": [{ "type": "nat" }],
        "audio": true,
    });
    let json_path = src.path().join("vm.json");
    std::fs::write(&json_path, json.to_string()).unwrap();

    let out = home.run(&["import", json_path.to_str().unwrap(), "frommacosvm"]);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    for want in [
        "displays[0].dpi is not supported",
        "audio is not supported",
        "hardware model DataRepresentationVersion 2, PlatformVersion 2, MinimumSupportedOS 26.0.0: kept",
    ] {
        assert!(stderr.contains(want), "{want} in:\n{stderr}");
    }
    assert_eq!(
        home.ok(&["identity", "frommacosvm"]).trim(),
        ECID.to_string()
    );
    boot_rom_checks_pass(&home, "frommacosvm");
}

/// A hardware model vmapple cannot read (an unknown representation
/// version) refuses the import with one message naming it; no bundle.
#[test]
fn an_unknown_hardware_model_version_refuses_the_import() {
    let home = Home::new();
    let tart = tempfile::tempdir().unwrap();
    let config = serde_json::json!({
        "os": "darwin",
        "ecid": base64(&machine_identifier(ECID)),
        "hardwareModel": base64(&hardware_model(3, 27)),
        "cpuCount": 2,
        "memorySize": 268435456u64,
    });
    std::fs::write(tart.path().join("config.json"), config.to_string()).unwrap();
    write_vz_aux(&tart.path().join("nvram.bin"));
    write_root(&tart.path().join("disk.img"));
    let out = home.run(&["import", tart.path().to_str().unwrap(), "x"]);
    assert_user_error(
        &out,
        "hardwareModel: DataRepresentationVersion 3 is unknown (vmapple knows 1 and 2)",
    );
    assert!(!home.bundle("x").exists());
}

#[test]
fn importing_something_that_is_not_a_vm_is_one_clear_error() {
    let home = Home::new();
    let src = tempfile::tempdir().unwrap();
    let out = home.run(&["import", src.path().to_str().unwrap(), "x"]);
    assert_user_error(&out, "config.json");
    assert!(!home.bundle("x").exists());
}

/// A hostile macosvm JSON points a read-write disk at a file of the user's
/// outside its directory: the import is refused, names the file, creates
/// nothing; `--allow-outside-files` lets a trusted one through.
#[test]
fn an_import_that_points_outside_the_vm_directory_is_refused() {
    let home = Home::new();
    let src = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    write_vz_aux(&src.path().join("aux.img"));
    let victim = elsewhere.path().join("documents.img");
    std::fs::write(&victim, "the user's data").unwrap();
    let json = serde_json::json!({
        "machineId": base64(&machine_identifier(ECID)),
        "cpus": 2,
        "ram": 268435456u64,
        "storage": [
            { "type": "disk", "file": victim.to_str().unwrap() },
            { "type": "aux", "file": "aux.img" },
        ],
    });
    let json_path = src.path().join("vm.json");
    std::fs::write(&json_path, json.to_string()).unwrap();
    let out = home.run(&["import", json_path.to_str().unwrap(), "hostile"]);
    assert_user_error(
        &out,
        &format!("storage[0] file {} is outside", victim.display()),
    );
    assert!(!home.bundle("hostile").exists());

    // The same through a symbolic link in a Tart directory.
    let tart = tempfile::tempdir().unwrap();
    let config = serde_json::json!({
        "version": 1, "os": "darwin", "arch": "arm64",
        "ecid": base64(&machine_identifier(ECID)),
        "cpuCount": 2, "memorySize": 268435456u64,
    });
    std::fs::write(tart.path().join("config.json"), config.to_string()).unwrap();
    write_vz_aux(&tart.path().join("nvram.bin"));
    std::os::unix::fs::symlink(&victim, tart.path().join("disk.img")).unwrap();
    let out = home.run(&["import", tart.path().to_str().unwrap(), "linked"]);
    assert_user_error(&out, "disk.img is outside");
    assert!(!home.bundle("linked").exists());

    home.ok(&[
        "import",
        json_path.to_str().unwrap(),
        "trusted",
        "--allow-outside-files",
    ]);
    let config = std::fs::read_to_string(home.bundle("trusted").join("config.toml")).unwrap();
    assert!(config.contains(victim.to_str().unwrap()), "{config}");
    assert_eq!(std::fs::read(&victim).unwrap(), b"the user's data");
}

/// `bundle.lock` and `vmapple.log` planted as symbolic links to a file of
/// the user's: `list`, `run` and `delete` never write through them.
#[test]
fn links_planted_in_a_bundle_are_never_written_through() {
    let home = Home::new();
    create_small(&home, "planted");
    let dir = home.bundle("planted");
    let victim = home.path().join("precious.txt");
    std::fs::write(&victim, "precious\n").unwrap();
    std::os::unix::fs::symlink(&victim, dir.join("bundle.lock")).unwrap();

    assert!(home.ok(&["list"]).contains("planted"));
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
    let out = home.run(&["run", "planted", "--kernel", "/nonexistent/Image"]);
    assert_user_error(&out, "bundle.lock: is a symbolic link");
    let out = home.run(&["delete", "planted"]);
    assert_user_error(&out, "is a symbolic link");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");

    std::fs::remove_file(dir.join("bundle.lock")).unwrap();
    let _ = std::fs::remove_file(dir.join("vmapple.log"));
    std::os::unix::fs::symlink(&victim, dir.join("vmapple.log")).unwrap();
    let out = home.run(&["run", "planted", "--kernel", "/nonexistent/Image"]);
    assert_user_error(&out, "vmapple.log: is a symbolic link");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
}

/// Waits (bounded) until `path` exists: a paused VM has opened its disks
/// once its control socket is there.
fn wait_for_file(path: &Path, vm: &mut Running) {
    let start = Instant::now();
    while !path.exists() {
        assert!(
            vm.is_running() && start.elapsed() < BOOT,
            "{} never appeared; stderr:\n{}",
            path.display(),
            vm.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `delete` removes only a real bundle, and not while a VM runs on one of
/// its disks even without the bundle (`run --root DIR/root.img`).
#[test]
fn delete_refuses_non_bundles_and_disks_in_use() {
    let home = Home::new();
    create_small(&home, "keep");
    let dir = home.bundle("keep");

    let plain = home.path().join("work");
    std::fs::create_dir(&plain).unwrap();
    std::fs::copy(dir.join("config.toml"), plain.join("config.toml")).unwrap();
    std::fs::write(plain.join("notes.txt"), "x").unwrap();
    let out = home.run(&["delete", plain.to_str().unwrap()]);
    assert_user_error(&out, "not deleted");
    assert!(plain.join("notes.txt").exists());

    let Some((kernel, _)) = common::linux_guest() else {
        return;
    };
    let control = home.path().join("c.sock");
    let root = dir.join("root.img");
    let mut vm = home.spawn(&[
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--root",
        root.to_str().unwrap(),
        "--net",
        "none",
        "--paused",
        "--control",
        control.to_str().unwrap(),
    ]);
    wait_for_file(&control, &mut vm);
    let out = home.run(&["delete", "keep"]);
    assert_user_error(&out, "cannot delete bundle");
    assert!(
        text(&out.stderr).contains("root.img"),
        "{}",
        text(&out.stderr)
    );
    assert!(root.exists() && dir.join("config.toml").exists());
    drop(vm);
    home.ok(&["delete", "keep"]);
    assert!(!dir.exists());
}

/// What `create` makes is private to the user: guest disks hold the
/// guest's data.
#[test]
fn a_created_bundle_is_private_to_the_user() {
    let home = Home::new();
    create_small(&home, "private");
    let dir = home.bundle("private");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    for f in ["root.img", "aux.img", "config.toml", "MachineIdentifier"] {
        assert_eq!(mode(&dir.join(f)), 0o600, "{f}");
    }
}

/// A relative `serial = "file:..."` in config.toml is a file in the
/// bundle, wherever vmapple is started from.
#[test]
fn a_relative_serial_file_is_in_the_bundle() {
    let home = Home::new();
    create_small(&home, "ser");
    let dir = home.bundle("ser");
    let config = std::fs::read_to_string(dir.join("config.toml")).unwrap();
    std::fs::write(
        dir.join("config.toml"),
        config.replace("serial = \"stdio\"", "serial = \"file:console.log\""),
    )
    .unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let Some((kernel, _)) = common::linux_guest() else {
        return;
    };
    let mut command = home.command(&[
        "run",
        "ser",
        "--kernel",
        kernel.to_str().unwrap(),
        "--paused",
    ]);
    command.current_dir(elsewhere.path());
    let mut vm = Running::spawn(command, &["run", "ser"]);
    wait_for_file(&dir.join("control.sock"), &mut vm);
    assert!(dir.join("console.log").exists());
    assert!(!elsewhere.path().join("console.log").exists());
    drop(vm);
}

/// `create` makes every file it writes, the bundle directory and the
/// bundles home durable before it reports success: seen in the system
/// calls it makes (strace), since a crash cannot be staged here.
#[test]
fn create_syncs_its_files_and_directories() {
    if cfg!(target_os = "macos") {
        common::skip("strace runs only on Linux");
        return;
    }
    let home = Home::new();
    let trace = home.path().join("create.trace");
    let out = Command::new("strace")
        .args(["-f", "-qq", "-e", "trace=openat,fsync,fdatasync", "-o"])
        .arg(&trace)
        .arg(env!("CARGO_BIN_EXE_vmapple"))
        .args(["create", "durable", "--disk-size", "1G", "--net", "none"])
        .env("VMAPPLE_HOME", home.path())
        .stdin(Stdio::null())
        .output()
        .expect("running strace (scripts/setup.sh installs it)");
    assert!(out.status.success(), "{}", text(&out.stderr));
    // Which path each descriptor number last named, and which were synced.
    let mut open: std::collections::HashMap<String, String> = Default::default();
    let mut synced = Vec::new();
    for line in std::fs::read_to_string(&trace).unwrap().lines() {
        let result = line.rsplit_once(" = ").map(|(_, r)| r.trim());
        if let Some(rest) = line.split_once("openat(").map(|(_, r)| r) {
            let path = rest.split('"').nth(1).unwrap_or_default();
            if let Some(fd) = result.filter(|r| r.parse::<u32>().is_ok()) {
                open.insert(fd.to_string(), path.to_string());
            }
        } else if let Some(rest) = line
            .split_once("fsync(")
            .or_else(|| line.split_once("fdatasync("))
            .map(|(_, r)| r)
        {
            let fd = rest.split(')').next().unwrap_or_default();
            if result == Some("0") {
                synced.extend(open.get(fd).cloned());
            }
        }
    }
    let dir = home.bundle("durable");
    for want in [
        dir.join("MachineIdentifier"),
        dir.join("aux.img"),
        dir.join("root.img"),
        dir.join("config.toml"),
        dir.clone(),
        home.path().to_path_buf(),
    ] {
        assert!(
            synced.iter().any(|s| Path::new(s) == want),
            "{} not synced; synced: {synced:?}",
            want.display()
        );
    }
}

// ---- images: pull and push through a real registry -------------------------
//
// Against Debian's docker-registry (the CNCF distribution registry) and
// skopeo, started per test on loopback (tests/common/registry.rs).

use common::registry::{peers_installed, skopeo, Registry};
use sha2::Digest as _;

fn sha256_hex(data: &[u8]) -> String {
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Apple's LZ4 framing written by the test itself (not vmapple's encoder):
/// all-zero 64 KiB blocks as one hand-made LZ4 block (a zero literal, then
/// a match at distance 1), everything else as stored `bv4-` blocks.
fn apple_lz4_by_hand(data: &[u8]) -> Vec<u8> {
    const BLOCK: usize = 65536;
    let mut out = Vec::new();
    for block in data.chunks(BLOCK) {
        if block.len() == BLOCK && block.iter().all(|&b| b == 0) {
            // Literal 1 byte; match length 65530 = 4 + 15 + 255*256 + 231;
            // then the last 5 bytes as literals.
            let mut lz = vec![0x1f, 0x00, 0x01, 0x00];
            lz.extend(std::iter::repeat_n(0xffu8, 256));
            lz.push(231);
            lz.extend_from_slice(&[0x50, 0, 0, 0, 0, 0]);
            out.extend_from_slice(b"bv41");
            out.extend_from_slice(&(BLOCK as u32).to_le_bytes());
            out.extend_from_slice(&(lz.len() as u32).to_le_bytes());
            out.extend_from_slice(&lz);
        } else {
            out.extend_from_slice(b"bv4-");
            out.extend_from_slice(&(block.len() as u32).to_le_bytes());
            out.extend_from_slice(block);
        }
    }
    out.extend_from_slice(b"bv4$");
    out
}

/// A Tart VM in pieces: config.json, nvram.bin and disk.img, the disk cut
/// into layers of uneven sizes (as Tart 2.0–2.10 made them).
struct TartFixture {
    config: Vec<u8>,
    nvram: Vec<u8>,
    disk: Vec<u8>,
    cuts: Vec<usize>,
}

impl TartFixture {
    fn new() -> TartFixture {
        let dir = tempfile::tempdir().unwrap();
        write_vz_aux(&dir.path().join("nvram.bin"));
        write_root(&dir.path().join("root"));
        let nvram = std::fs::read(dir.path().join("nvram.bin")).unwrap();
        // Layer 0: the root disk's first MiB, then zeros to 4 MiB;
        // layer 1: 32 MiB of zeros (a hole when pulled); layer 2: noise
        // with an odd tail.
        let mut disk = std::fs::read(dir.path().join("root")).unwrap();
        disk.resize(36 << 20, 0);
        let mut x: u32 = 0x2545_f491;
        disk.extend((0..(1 << 20) + 123).map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        }));
        // Swift's JSONEncoder escapes '/', so real configs carry "\/".
        let config = format!(
            r#"{{"version":1,"os":"darwin","arch":"arm64","ecid":"{}","hardwareModel":"{}","cpuCountMin":2,"cpuCount":2,"memorySizeMin":268435456,"memorySize":268435456,"macAddress":"7a:65:e4:3c:2b:01","display":{{"width":1024,"height":768}}}}"#,
            base64(&machine_identifier(ECID)).replace('/', "\\/"),
            base64(&hardware_model(1, 13)).replace('/', "\\/"),
        )
        .into_bytes();
        TartFixture {
            config,
            nvram,
            disk,
            cuts: vec![4 << 20, 36 << 20],
        }
    }

    fn layers(&self) -> Vec<&[u8]> {
        let mut out = Vec::new();
        let mut start = 0;
        for &end in self.cuts.iter().chain(std::iter::once(&self.disk.len())) {
            out.push(&self.disk[start..end]);
            start = end;
        }
        out
    }

    /// Writes the image as an OCI layout directory (what `skopeo copy
    /// oci:DIR:TAG` reads), by hand from the spec; returns the compressed
    /// disk blobs.
    fn write_oci_layout(&self, dir: &Path, tag: &str) -> Vec<Vec<u8>> {
        let blobs = dir.join("blobs/sha256");
        std::fs::create_dir_all(&blobs).unwrap();
        let put = |data: &[u8]| -> serde_json::Value {
            let hex = sha256_hex(data);
            std::fs::write(blobs.join(&hex), data).unwrap();
            serde_json::json!({ "digest": format!("sha256:{hex}"), "size": data.len() })
        };
        let descriptor = |media: &str, data: &[u8]| {
            let mut d = put(data);
            d["mediaType"] = media.into();
            d
        };
        let stub = br#"{"architecture":"arm64","config":{"Labels":{"org.cirruslabs.tart.disk.format":"raw"}},"os":"darwin"}"#;
        let mut layers = vec![descriptor(
            "application/vnd.cirruslabs.tart.config.v1",
            &self.config,
        )];
        let mut compressed = Vec::new();
        for chunk in self.layers() {
            let lz = apple_lz4_by_hand(chunk);
            let mut d = descriptor("application/vnd.cirruslabs.tart.disk.v2", &lz);
            d["annotations"] = serde_json::json!({
                "org.cirruslabs.tart.uncompressed-size": chunk.len().to_string(),
                "org.cirruslabs.tart.uncompressed-content-digest": format!("sha256:{}", sha256_hex(chunk)),
            });
            layers.push(d);
            compressed.push(lz);
        }
        layers.push(descriptor(
            "application/vnd.cirruslabs.tart.nvram.v1",
            &self.nvram,
        ));
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": descriptor("application/vnd.oci.image.config.v1+json", stub),
            "layers": layers,
            "annotations": {
                "org.cirruslabs.tart.uncompressed-disk-size": self.disk.len().to_string(),
                "org.cirruslabs.tart.upload-time": "2026-01-02T03:04:05Z",
            },
        });
        let mut m = descriptor(
            "application/vnd.oci.image.manifest.v1+json",
            manifest.to_string().as_bytes(),
        );
        m["annotations"] = serde_json::json!({ "org.opencontainers.image.ref.name": tag });
        std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        std::fs::write(
            dir.join("index.json"),
            serde_json::json!({ "schemaVersion": 2, "manifests": [m] }).to_string(),
        )
        .unwrap();
        compressed
    }

    /// Puts the image into the registry with skopeo; returns its
    /// compressed disk blobs.
    fn push_with_skopeo(&self, registry: &Registry, name: &str) -> Vec<Vec<u8>> {
        let layout = tempfile::tempdir().unwrap();
        let blobs = self.write_oci_layout(layout.path(), "v1");
        skopeo(&[
            "copy",
            "--dest-tls-verify=false",
            &format!("oci:{}:v1", layout.path().display()),
            &format!("docker://{}/{name}", registry.addr),
        ]);
        blobs
    }
}

/// The pulled bundle holds exactly the image's files, its root disk sparse.
fn assert_pulled(home: &Home, name: &str, image: &TartFixture) {
    let dir = home.bundle(name);
    let root = std::fs::read(dir.join("root.img")).unwrap();
    assert!(root == image.disk, "root.img differs from the image's disk");
    assert!(std::fs::read(dir.join("aux.img")).unwrap() == image.nvram);
    assert_eq!(home.ok(&["identity", name]).trim(), ECID.to_string());
    // The image's hardware model, byte for byte (through an import and a
    // push too: vmapple's own would be a binary plist).
    assert_eq!(
        std::fs::read(dir.join("HardwareModel")).unwrap(),
        hardware_model(1, 13)
    );
    // The 32 MiB zero layer and the zeros after the root text are holes.
    let used = allocated(&dir.join("root.img"));
    assert!(
        used < 4 << 20,
        "root.img not sparse: {used} bytes allocated"
    );
    assert!(!dir.with_file_name(format!(".{name}.vmapple.pull")).exists());
}

#[test]
fn a_tart_image_made_without_vmapple_pulls_and_boots() {
    if !peers_installed("a_tart_image_made_without_vmapple_pulls_and_boots") {
        return;
    }
    let registry = Registry::start();
    let image = TartFixture::new();
    image.push_with_skopeo(&registry, "tart/vm:v1");
    let home = Home::new();
    let reference = format!("{}/tart/vm:v1", registry.addr);

    let out = home.run(&["pull", &reference, "pulled"]);
    assert_user_error(&out, "--insecure");

    let out = home.ok(&["pull", "--insecure", &reference, "pulled"]);
    assert!(out.contains("2 vCPUs, 256 MiB"), "{out}");
    assert!(out.contains("in 3 layers"), "{out}");
    assert_pulled(&home, "pulled", &image);
    assert_eq!(
        std::fs::read(home.bundle("pulled").join("tart-config.json")).unwrap(),
        image.config
    );
    let config = std::fs::read_to_string(home.bundle("pulled").join("config.toml")).unwrap();
    assert!(config.contains("offset = 16384"), "{config}");
    boot_rom_checks_pass(&home, "pulled");

    // The same image again, under another name: every blob comes from the
    // cache, the bundle is the same.
    let out = home.ok(&["pull", "--insecure", &reference, "again"]);
    assert!(out.contains("5 blobs from the cache"), "{out}");
    assert_pulled(&home, "again", &image);

    // An existing bundle is never overwritten.
    let out = home.run(&["pull", "--insecure", &reference, "again"]);
    assert_user_error(&out, "already exists");
}

#[test]
fn a_pushed_bundle_has_tarts_layout_and_pulls_back_identical() {
    if !peers_installed("a_pushed_bundle_has_tarts_layout_and_pulls_back_identical") {
        return;
    }
    let registry = Registry::start();
    let home = Home::new();
    let image = TartFixture::new();
    let tart = tempfile::tempdir().unwrap();
    std::fs::write(tart.path().join("config.json"), &image.config).unwrap();
    std::fs::write(tart.path().join("nvram.bin"), &image.nvram).unwrap();
    std::fs::write(tart.path().join("disk.img"), &image.disk).unwrap();
    home.ok(&["import", tart.path().to_str().unwrap(), "src"]);

    let a = format!("{}/vm/roundtrip:a", registry.addr);
    let b = format!("{}/vm/roundtrip:b", registry.addr);
    let out = home.ok(&["push", "--insecure", "--chunk-size", "16M", "src", &a, &b]);
    assert!(out.contains("blobs uploaded"), "{out}");

    // What Tart reads: media types, layer order, annotations (skopeo's view).
    let raw = skopeo(&[
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{a}"),
    ]);
    let manifest: serde_json::Value = serde_json::from_slice(&raw.stdout).unwrap();
    assert_eq!(
        manifest["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    let layers = manifest["layers"].as_array().unwrap();
    let types: Vec<&str> = layers
        .iter()
        .map(|l| l["mediaType"].as_str().unwrap())
        .collect();
    let disk_type = "application/vnd.cirruslabs.tart.disk.v2";
    assert_eq!(
        types.first(),
        Some(&"application/vnd.cirruslabs.tart.config.v1")
    );
    assert_eq!(
        types.last(),
        Some(&"application/vnd.cirruslabs.tart.nvram.v1")
    );
    // 37 MiB + 123 bytes in 16 MiB chunks.
    assert_eq!(types.iter().filter(|t| **t == disk_type).count(), 3);
    let mut offset = 0usize;
    for l in &layers[1..4] {
        let size: usize = l["annotations"]["org.cirruslabs.tart.uncompressed-size"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        let chunk = &image.disk[offset..offset + size];
        assert_eq!(
            l["annotations"]["org.cirruslabs.tart.uncompressed-content-digest"],
            format!("sha256:{}", sha256_hex(chunk))
        );
        offset += size;
    }
    assert_eq!(offset, image.disk.len());
    assert_eq!(
        manifest["annotations"]["org.cirruslabs.tart.uncompressed-disk-size"],
        image.disk.len().to_string()
    );
    let info = skopeo(&["inspect", "--tls-verify=false", &format!("docker://{b}")]);
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["Architecture"], "arm64");
    assert_eq!(info["Os"], "darwin");
    assert_eq!(info["Labels"]["org.cirruslabs.tart.disk.format"], "raw");

    let out = home.ok(&["pull", "--insecure", &b, "copy"]);
    assert!(out.contains("in 3 layers"), "{out}");
    assert_pulled(&home, "copy", &image);
    boot_rom_checks_pass(&home, "copy");

    // Pushing the pulled bundle again uploads nothing new but its config
    // (same keys, possibly another order) and makes the same disk layers.
    let out = home.ok(&["push", "--insecure", "--chunk-size", "16M", "copy", &a]);
    let again = skopeo(&[
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{a}"),
    ]);
    let again: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(
        again["layers"].as_array().unwrap()[1..4],
        manifest["layers"].as_array().unwrap()[1..4],
        "{out}"
    );
}

#[test]
fn a_tampered_blob_is_refused_and_the_pull_resumes_after() {
    if !peers_installed("a_tampered_blob_is_refused_and_the_pull_resumes_after") {
        return;
    }
    let registry = Registry::start();
    let image = TartFixture::new();
    let blobs = image.push_with_skopeo(&registry, "tart/vm:v1");
    let home = Home::new();
    let reference = format!("{}/tart/vm:v1", registry.addr);

    // The last disk layer's blob, one byte changed, same size.
    let file = registry.blob_file(&sha256_hex(&blobs[2]));
    let good = std::fs::read(&file).unwrap();
    let mut bad = good.clone();
    bad[1000] ^= 0xff;
    std::fs::write(&file, &bad).unwrap();

    let out = home.run(&["pull", "--insecure", "--concurrency", "1", &reference, "vm"]);
    assert_user_error(&out, "refusing it");
    assert!(
        text(&out.stderr).contains(&sha256_hex(&blobs[2])),
        "{}",
        text(&out.stderr)
    );
    assert!(!home.bundle("vm").exists());
    assert!(!home.ok(&["list"]).contains("vm"));

    // Repaired, the same pull resumes: the two layers already written are
    // kept, only the last one is fetched again.
    std::fs::write(&file, &good).unwrap();
    let out = home.ok(&["pull", "--insecure", "--concurrency", "1", &reference, "vm"]);
    assert!(out.contains("2 already on disk"), "{out}");
    assert_pulled(&home, "vm", &image);
}

#[test]
fn a_registry_with_password_auth_takes_docker_credentials() {
    if !peers_installed("a_registry_with_password_auth_takes_docker_credentials") {
        return;
    }
    use common::registry::{HTPASSWD_PASSWORD, HTPASSWD_USER};
    let registry = Registry::start_with_auth();
    let home = Home::new();
    let image = TartFixture::new();
    let tart = tempfile::tempdir().unwrap();
    std::fs::write(tart.path().join("config.json"), &image.config).unwrap();
    std::fs::write(tart.path().join("nvram.bin"), &image.nvram).unwrap();
    std::fs::write(tart.path().join("disk.img"), &image.disk).unwrap();
    home.ok(&["import", tart.path().to_str().unwrap(), "src"]);
    let reference = format!("{}/private/vm:v1", registry.addr);
    let docker = tempfile::tempdir().unwrap();

    let run = |args: &[&str]| {
        home.command(args)
            .env("DOCKER_CONFIG", docker.path())
            .env_remove("VMAPPLE_REGISTRY_USERNAME")
            .env_remove("VMAPPLE_REGISTRY_PASSWORD")
            .output()
            .unwrap()
    };
    let out = run(&["push", "--insecure", "src", &reference]);
    assert_user_error(&out, "wants credentials (401)");

    let auth = base64(format!("{HTPASSWD_USER}:wrong").as_bytes());
    std::fs::write(
        docker.path().join("config.json"),
        format!(r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}}}}"#, registry.addr),
    )
    .unwrap();
    let out = run(&["push", "--insecure", "src", &reference]);
    assert_user_error(&out, "401");

    let auth = base64(format!("{HTPASSWD_USER}:{HTPASSWD_PASSWORD}").as_bytes());
    std::fs::write(
        docker.path().join("config.json"),
        format!(r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}}}}"#, registry.addr),
    )
    .unwrap();
    let out = run(&["push", "--insecure", "src", &reference]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = run(&["pull", "--insecure", &reference, "copy"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_pulled(&home, "copy", &image);
}

// ---- clone ----------------------------------------------------------------

use std::os::unix::fs::FileExt;

/// Holds `bundle.lock` the way a running VM does, until dropped.
fn hold_lock(dir: &Path) -> std::fs::File {
    use std::os::fd::AsRawFd;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(dir.join("bundle.lock"))
        .unwrap();
    // SAFETY: flock on a descriptor the test owns.
    let ret = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    assert_eq!(ret, 0);
    f
}

#[test]
fn a_clone_has_its_own_sparse_disks_and_mac_the_same_identity_and_boots() {
    let home = Home::new();
    let image = TartFixture::new();
    let tart = tempfile::tempdir().unwrap();
    std::fs::write(tart.path().join("config.json"), &image.config).unwrap();
    std::fs::write(tart.path().join("nvram.bin"), &image.nvram).unwrap();
    // The source disk sparse too, as a pulled or created one is.
    let disk = std::fs::File::create(tart.path().join("disk.img")).unwrap();
    disk.set_len(image.disk.len() as u64).unwrap();
    for (i, chunk) in image.disk.chunks(65536).enumerate() {
        if chunk.iter().any(|&b| b != 0) {
            disk.write_all_at(chunk, i as u64 * 65536).unwrap();
        }
    }
    drop(disk);
    home.ok(&["import", tart.path().to_str().unwrap(), "src"]);

    let out = home.run(&["clone", "src", "twin"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    // On a filesystem without shared blocks (ext4, tmpfs) a sparse copy,
    // and a warning that says so.
    assert!(
        said.contains("2 disk(s) copy-on-write") || said.contains("copied (sparsely)"),
        "{said}"
    );
    let twin = home.bundle("twin");
    assert!(std::fs::read(twin.join("disk1-disk.img")).unwrap() == image.disk);
    assert!(std::fs::read(twin.join("disk0-nvram.bin")).unwrap() == image.nvram);
    let used = allocated(&twin.join("disk1-disk.img"));
    assert!(used < 4 << 20, "clone not sparse: {used} bytes");
    assert_eq!(home.ok(&["identity", "twin"]).trim(), ECID.to_string());
    assert_eq!(
        std::fs::read(twin.join("HardwareModel")).unwrap(),
        hardware_model(1, 13)
    );
    let config = std::fs::read_to_string(twin.join("config.toml")).unwrap();
    assert!(!config.contains("7a:65:e4:3c:2b:01"), "same MAC:\n{config}");
    assert!(config.contains("mac = "), "{config}");
    boot_rom_checks_pass(&home, "twin");
    // The clone's disk is its own.
    std::fs::OpenOptions::new()
        .write(true)
        .open(twin.join("disk1-disk.img"))
        .unwrap()
        .write_all_at(b"changed", 0)
        .unwrap();
    assert!(std::fs::read(tart.path().join("disk.img")).unwrap() == image.disk);

    let out = home.ok(&["clone", "src", "other", "--new-identity"]);
    assert!(out.contains("other"), "{out}");
    assert_ne!(home.ok(&["identity", "other"]).trim(), ECID.to_string());

    // Not while the source runs (its disks are writable); nothing made.
    let _lock = hold_lock(&home.bundle("src"));
    let out = home.run(&["clone", "src", "busy"]);
    assert_user_error(&out, "stop it first");
    assert!(!home.bundle("busy").exists());
    assert!(!home.path().join(".busy.vmapple.clone").exists());
    let out = home.run(&["clone", "src", "twin"]);
    assert_user_error(&out, "already exists");
}

#[test]
fn set_grows_the_disk_sparsely_changes_cpus_and_memory_and_refuses_to_shrink() {
    let home = Home::new();
    create_small(&home, "vm");
    let root = home.bundle("vm").join("root.img");
    let out = home.ok(&[
        "set",
        "vm",
        "--disk-size",
        "3G",
        "--cpus",
        "3",
        "--memory",
        "1G",
    ]);
    assert!(
        out.contains("3 vCPUs, 1024 MiB, root disk 3221225472 bytes"),
        "{out}"
    );
    assert_eq!(std::fs::metadata(&root).unwrap().len(), 3 << 30);
    assert!(allocated(&root) < 1 << 20, "grown disk not sparse");
    let list = home.ok(&["list"]);
    assert!(list.contains("3 vCPUs, 1024 MiB"), "{list}");

    let out = home.run(&["set", "vm", "--disk-size", "1G"]);
    assert_user_error(&out, "grow only");
    assert_eq!(std::fs::metadata(&root).unwrap().len(), 3 << 30);
    let out = home.run(&["set", "vm", "--cpus", "99"]);
    assert_user_error(&out, "cpus = 99");
    let _lock = hold_lock(&home.bundle("vm"));
    let out = home.run(&["set", "vm", "--cpus", "2"]);
    assert_user_error(&out, "in use");
    assert!(
        std::fs::read_to_string(home.bundle("vm").join("config.toml"))
            .unwrap()
            .contains("cpus = 3")
    );
}

#[test]
fn an_image_with_an_absurd_config_is_refused_before_its_disk_is_fetched() {
    if !peers_installed("an_image_with_an_absurd_config_is_refused_before_its_disk_is_fetched") {
        return;
    }
    let registry = Registry::start();
    let mut image = TartFixture::new();
    image.config = String::from_utf8(image.config)
        .unwrap()
        .replace("\"cpuCount\":2", "\"cpuCount\":100000")
        .into_bytes();
    image.push_with_skopeo(&registry, "bad/vm:v1");
    let home = Home::new();
    let out = home.run(&[
        "pull",
        "--insecure",
        &format!("{}/bad/vm:v1", registry.addr),
        "vm",
    ]);
    assert_user_error(&out, "cpuCount = 100000");
    assert!(
        !text(&out.stderr).contains("resume"),
        "{}",
        text(&out.stderr)
    );
    assert!(!home.bundle("vm").exists());
    assert!(!home.path().join(".vm.vmapple.pull").exists());
    // Nothing of the disk was fetched: only the config blob is cached.
    let cached = std::fs::read_dir(home.path().join("cache/blobs/sha256"))
        .unwrap()
        .count();
    assert_eq!(cached, 1);
}

/// The ticks of a console, in order.
fn all_ticks(console: &str) -> Vec<u64> {
    console
        .lines()
        .filter_map(|l| l.trim().strip_prefix("VMAPPLE-GUEST: tick "))
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

/// `vmapple suspend` saves a running bundle into itself and stops it;
/// `vmapple run` of the bundle continues the guest's counting process
/// (no boot), then drops the saved state.
#[test]
fn a_suspended_bundle_resumes_where_it_stopped() {
    let home = Home::new();
    create_small(&home, "s");
    let dir = home.bundle("s");
    let Some(files) = linux_guest_devices() else {
        return;
    };
    let run_args = ticker_run_args("s", &files);
    let run_args = common::refs(&run_args);
    let mut vm = home.spawn(&run_args);
    vm.wait_until("a few ticks", BOOT, |c| last_tick(c) >= Some(5));
    let out = home.run(&["suspend", "s"]);
    assert!(out.status.success(), "suspend: {}", text(&out.stderr));
    assert!(text(&out.stderr).contains("bundle s suspended"));
    // The VM stopped, and the bundle is free (suspend waited for it).
    assert_eq!(vm.wait_exit(BOOT), 6, "{}", vm.stderr());
    assert!(dir.join("suspended.snap").is_file());
    let list = home.ok(&["list"]);
    assert!(
        list.lines()
            .any(|l| l.starts_with("s\t") && l.contains("\tsuspended\t")),
        "{list}"
    );
    let saved = last_tick(&vm.stdout()).unwrap();

    // The same run resumes it: the counter goes on from the saved value.
    let mut resumed = home.spawn(&run_args);
    resumed.wait_until("ticks after the resume", BOOT, |c| {
        last_tick(c) >= Some(saved + 3)
    });
    let ticks = all_ticks(&resumed.stdout());
    assert!(
        ticks[0] == saved || ticks[0] == saved + 1,
        "continues from {saved}: {ticks:?}"
    );
    assert!(
        !resumed.stdout().contains("waiting for the power button"),
        "no boot:\n{}",
        resumed.stdout()
    );
    // Once running, the saved state is gone: the next run boots afresh.
    let start = Instant::now();
    while dir.join("suspended.snap").exists() {
        assert!(start.elapsed() < BOOT, "suspended.snap stays");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(home.ok(&["ctl", "s", "powerdown"]).contains("\"ok\""));
    assert_eq!(resumed.wait_exit(BOOT), 0, "{}", resumed.stderr());
    assert!(resumed.stdout().contains("power button pressed"));

    // Suspending a bundle that does not run says so.
    let out = home.run(&["suspend", "s"]);
    assert_user_error(&out, "not running");
}
