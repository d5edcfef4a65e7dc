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

/// One boot of the Linux guest from a bundle, driven the way a user would:
/// control socket (status, pause, resume, hostile input, powerdown), a
/// second `run` of the same bundle, an event follower, the log file.
#[test]
fn a_running_bundle_is_controlled_through_its_socket() {
    let home = Home::new();
    create_small(&home, "vm");
    let dir = home.bundle("vm");
    let (kernel, initrd) = linux_guest_devices();
    let run_args = [
        "run",
        "vm",
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--append",
        "console=ttyAMA0 quiet vmapple.tick vmapple.powerkey",
    ];
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
        "hardwareModel": base64(b"bplist00 not used by vmapple"),
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

    assert_eq!(
        home.ok(&["identity", tart.path().to_str().unwrap()]).trim(),
        ECID.to_string()
    );
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
        "vmapple: import: hardwareModel ignored",
    ] {
        assert!(stderr.contains(want), "{want} in:\n{stderr}");
    }
    assert_eq!(home.ok(&["identity", "fromtart"]).trim(), ECID.to_string());
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
        "hardwareModel": base64(b"bplist00"),
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
    for want in ["displays[0].dpi is not supported", "audio is not supported"] {
        assert!(stderr.contains(want), "{want} in:\n{stderr}");
    }
    assert_eq!(
        home.ok(&["identity", "frommacosvm"]).trim(),
        ECID.to_string()
    );
    boot_rom_checks_pass(&home, "frommacosvm");
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

    let (kernel, _) = common::linux_guest();
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
    let (kernel, _) = common::linux_guest();
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
