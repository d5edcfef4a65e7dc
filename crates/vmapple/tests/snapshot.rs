//! Snapshots with real guests: `vmapple ctl VM save` and `vmapple run
//! --restore` continue a Linux guest's process in a new vmapple process,
//! one snapshot runs twice at once, the test firmware's two-CPU atomic
//! count comes out exact across a save, and bad snapshots are refused
//! with one message and nothing changed. Every device the board attaches
//! for a Linux guest is saved and works after a restore: disks with I/O
//! threads and MSI-X, the NIC (DHCP and TCP through a new passt), XHCI
//! with its keyboard and tablet (events reach evdev), vsock, virtio-gpu
//! (the screenshot), and the serial console takes input.

#[macro_use]
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{
    clean_ext4_file, ctl, firmware_dir, linux_guest_devices, refs, run_tool, save_and_stop,
    vmapple_with_triggers, Action, LinuxGuest, Trigger,
};

const BOOT: Duration = Duration::from_secs(300);
/// `vmapple`'s exit status when the host stopped the VM (`save --stop`).
const HOST_STOPPED: i32 = 6;

/// A directory for sockets and snapshots, short enough for socket paths.
fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("vms").tempdir().unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The numbers of the guest's `VMAPPLE-GUEST: tick N` lines, in order.
fn ticks(console: &str) -> Vec<u64> {
    console
        .lines()
        .filter_map(|l| l.trim().strip_prefix("VMAPPLE-GUEST: tick "))
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

/// The Linux guest with the device initramfs on two vCPUs, `append` on
/// its kernel command line.
fn devices_guest(append: &str) -> LinuxGuest {
    LinuxGuest::new(&linux_guest_devices().expect("the Linux guest"), append).two_cpus()
}

/// `guest` on `accel`, served on `socket`, with `extra` (e.g.
/// `--restore`) at the end.
fn served(guest: LinuxGuest, accel: &str, socket: &Path, extra: &[&str]) -> Vec<String> {
    guest
        .args(["--accel", accel])
        .control(socket)
        .args(extra)
        .build()
}

/// `vmapple run` of the Linux guest with a heartbeat (a shell loop that
/// prints an incrementing counter) and power-button handling, on two
/// vCPUs, served on `socket`; `extra` is appended.
fn linux_args(socket: &Path, accel: &str, extra: &[&str]) -> Vec<String> {
    let guest = devices_guest("console=ttyAMA0 quiet vmapple.tick vmapple.powerkey")
        .args(["--serial", "stdio"])
        .no_usb_no_net();
    served(guest, accel, socket, extra)
}

/// Restores `snapshot` with `args` and presses the power button once the
/// counter is `after` past `from`; returns the restored run's ticks.
fn restore_and_power_off(args: &[String], socket: &Path, from: u64) -> Vec<u64> {
    let press = format!("tick {}\r", from + 3);
    let run = vmapple_with_triggers(
        &refs(args),
        BOOT,
        &[Trigger {
            when_console_shows: &press,
            action: Action::Call(Box::new(|| {
                ctl(socket, &["powerdown"]);
            })),
        }],
    );
    assert_eq!(run.code, 0, "restored run: {}\n{}", run.stdout, run.stderr);
    assert!(
        !run.stdout.contains("userspace up"),
        "a restored VM does not boot:\n{}",
        run.stdout
    );
    run.assert_line("VMAPPLE-GUEST: power button pressed");
    ticks(&run.stdout)
}

each_accel! {
fn a_linux_process_continues_after_restore_and_one_snapshot_runs_twice_at_once(accel) {
    if linux_guest_devices().is_none() {
        return;
    }
    let dir = scratch();
    let socket = dir.path().join("c.sock");
    let snapshot = dir.path().join("vm.snap");
    let first = vmapple_with_triggers(
        &refs(&linux_args(&socket, accel, &[])),
        BOOT,
        &[save_and_stop("tick 5\r", &socket, &snapshot)],
    );
    assert_eq!(
        first.code, HOST_STOPPED,
        "save --stop stops the VM: {}\n{}",
        first.stdout, first.stderr
    );
    let saved = *ticks(&first.stdout).last().expect("ticks before the save");
    assert!(snapshot.exists());

    // A new process, the same command line with --restore: the shell
    // loop carries on from its saved count, without a reboot.
    let args = linux_args(&socket, accel, &["--restore", s(&snapshot)]);
    let after = restore_and_power_off(&args, &socket, saved);
    let resumed = after[0];
    assert!(
        resumed == saved || resumed == saved + 1,
        "the counter continues from {saved}, got {after:?}"
    );
    assert!(
        after.windows(2).all(|w| w[1] == w[0] + 1),
        "one process counting on: {after:?}"
    );

    // Fork: two VMs from the same snapshot at once, each with its own
    // control socket.
    let forks: Vec<_> = (0..2)
        .map(|i| {
            let socket = dir.path().join(format!("f{i}.sock"));
            let args = linux_args(&socket, accel, &["--restore", s(&snapshot)]);
            std::thread::spawn(move || restore_and_power_off(&args, &socket, saved))
        })
        .collect();
    for fork in forks {
        let ticks = fork.join().expect("a forked VM");
        assert!(ticks[0] == saved || ticks[0] == saved + 1, "{ticks:?}");
    }
}
}

/// `vmapple run` of the test firmware's counting program on two vCPUs.
fn count_args(socket: &Path, accel: &str, extra: &[&str]) -> Vec<String> {
    let firmware = firmware_dir().join("count-vmapple.bin");
    let mut args: Vec<String> = [
        "run",
        "--firmware",
        s(&firmware),
        "--cpus",
        "2",
        "--memory",
        "256M",
        "--net",
        "none",
        "--accel",
        accel,
        "--control",
        s(socket),
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

const TOTAL: &str = "COUNT TOTAL 40000000\r\n";

/// Saves the counting program with `--stop` once its console shows
/// `when`; returns the snapshot's path.
fn saved_count(dir: &Path, accel: &str, when: &str) -> PathBuf {
    let socket = dir.join("count.sock");
    let snapshot = dir.join("count.snap");
    let run = vmapple_with_triggers(
        &refs(&count_args(&socket, accel, &["--no-usb"])),
        BOOT,
        &[save_and_stop(when, &socket, &snapshot)],
    );
    assert_eq!(run.code, HOST_STOPPED, "{}\n{}", run.stdout, run.stderr);
    assert!(
        !run.stdout.contains("COUNT TOTAL"),
        "saved in the middle of the loop:\n{}",
        run.stdout
    );
    snapshot
}

each_accel! {
fn the_two_cpu_atomic_count_is_exact_across_a_save_and_restore(accel) {
    let dir = scratch();
    let snapshot = saved_count(dir.path(), accel, "COUNT progress 3\r");
    let socket = dir.path().join("again.sock");
    let run = vmapple_with_triggers(
        &refs(&count_args(
            &socket,
            accel,
            &["--no-usb", "--restore", s(&snapshot)],
        )),
        BOOT,
        &[],
    );
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    assert!(!run.stdout.contains("COUNT start"), "{}", run.stdout);
    run.assert_line(TOTAL);
}
}

/// Runs `vmapple` to completion (for runs refused before the guest).
/// Its one message names `needle`.
fn refused(args: &[String], needle: &str) {
    let error = common::refused(args);
    assert!(error.contains(needle), "want {needle:?} in {error}");
}

#[test]
fn bad_snapshots_are_refused_with_one_message_and_nothing_changes() {
    let dir = scratch();
    let good = saved_count(dir.path(), "tcg", "COUNT progress 1\r");
    let bytes = std::fs::read(&good).unwrap();
    let socket = dir.path().join("bad.sock");
    let with = |path: &Path, extra: &[&str]| {
        let mut e = vec!["--restore", s(path)];
        e.extend_from_slice(extra);
        count_args(&socket, "tcg", &e)
    };
    let variant = |name: &str, content: &[u8]| {
        let path = dir.path().join(name);
        std::fs::write(&path, content).unwrap();
        path
    };

    let truncated = variant("truncated.snap", &bytes[..bytes.len() / 2]);
    refused(&with(&truncated, &["--no-usb"]), "truncated");
    let mut flipped = bytes.clone();
    flipped[200] ^= 0x10;
    let corrupted = variant("corrupted.snap", &flipped);
    refused(&with(&corrupted, &["--no-usb"]), "corrupted");
    let mut other = bytes.clone();
    other[8] = 9;
    let version = variant("version.snap", &other);
    refused(&with(&version, &["--no-usb"]), "snapshot format version 9");
    let text = variant("text.snap", b"hello, this is not a snapshot\n");
    refused(&with(&text, &["--no-usb"]), "not a vmapple snapshot");
    refused(
        &with(&dir.path().join("missing.snap"), &["--no-usb"]),
        "missing.snap",
    );

    // The right file with other options: each difference named.
    let mut cpus = with(&good, &["--no-usb"]);
    let at = cpus.iter().position(|a| a == "--cpus").unwrap();
    cpus[at + 1] = "1".into();
    refused(&cpus, "--cpus: the snapshot has 2, this run 1");
    let mut memory = with(&good, &["--no-usb"]);
    let at = memory.iter().position(|a| a == "--memory").unwrap();
    memory[at + 1] = "512M".into();
    refused(
        &memory,
        "--memory: the snapshot has 256 MiB, this run 512 MiB",
    );
    refused(&with(&good, &[]), "this run has xhci");
    if cfg!(feature = "hvf-double") {
        refused(
            &count_args(&socket, "hvf", &["--no-usb", "--restore", s(&good)]),
            "--accel: the snapshot was saved on tcg, this run uses hvf",
        );
    }

    assert!(
        std::fs::read(&good).unwrap() == bytes,
        "the snapshot is untouched"
    );
    assert!(!socket.exists());
}

#[test]
fn a_failed_save_leaves_the_vm_running_and_no_file() {
    let dir = scratch();
    let socket = dir.path().join("c.sock");
    let target = dir.path().join("missing-dir").join("vm.snap");
    let (sock, path) = (socket.clone(), target.clone());
    let outcome = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let seen = outcome.clone();
    let run = vmapple_with_triggers(
        &refs(&count_args(&socket, "tcg", &["--no-usb"])),
        BOOT,
        &[Trigger {
            when_console_shows: "COUNT progress 1\r",
            action: Action::Call(Box::new(move || {
                let out = Command::new(env!("CARGO_BIN_EXE_vmapple"))
                    .args(["ctl", s(&sock), "save", s(&path)])
                    .output()
                    .unwrap();
                *seen.lock().unwrap() = format!(
                    "{:?} {}",
                    out.status.code(),
                    String::from_utf8_lossy(&out.stdout)
                );
            })),
        }],
    );
    let outcome = outcome.lock().unwrap().clone();
    assert!(
        outcome.starts_with("Some(1)") && outcome.contains("missing-dir"),
        "{outcome}"
    );
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    run.assert_line(TOTAL);
    assert!(std::fs::read_dir(dir.path()).unwrap().all(|e| {
        let name = e.unwrap().file_name();
        !name.to_string_lossy().contains("snap")
    }));
}

each_accel! {
fn a_vm_with_a_device_that_cannot_save_is_refused_by_name_and_runs_on(accel) {
    let dir = scratch();
    let socket = dir.path().join("c.sock");
    let target = dir.path().join("vm.snap");
    let (sock, path) = (socket.clone(), target.clone());
    let outcome = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let seen = outcome.clone();
    // A virtio-fs share: the host's open files cannot be saved.
    let share = format!("snapshare:{}", s(dir.path()));
    let run = vmapple_with_triggers(
        &refs(&count_args(&socket, accel, &["--share", &share])),
        BOOT,
        &[Trigger {
            when_console_shows: "COUNT progress 1\r",
            action: Action::Call(Box::new(move || {
                let out = Command::new(env!("CARGO_BIN_EXE_vmapple"))
                    .args(["ctl", s(&sock), "save", s(&path)])
                    .output()
                    .unwrap();
                *seen.lock().unwrap() = String::from_utf8_lossy(&out.stdout).into_owned();
            })),
        }],
    );
    let outcome = outcome.lock().unwrap().clone();
    assert!(
        outcome.contains("unsupported")
            && outcome.contains("cannot save their state yet: virtio-fs0"),
        "{outcome}"
    );
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    run.assert_line(TOTAL);
    assert!(!target.exists());
}
}

/// The numbers of whole `VMAPPLE-GUEST: synced N` lines (a line a stop
/// cut in two is not counted).
fn synced(console: &str) -> Vec<u64> {
    console
        .split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .filter_map(|l| l.trim().strip_prefix("VMAPPLE-GUEST: synced "))
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

/// `vmapple run` of the Linux guest appending fsynced records to the ext4
/// disk `image` (the init's `vmapple.crash` loop), on two vCPUs.
fn disk_args(socket: &Path, image: &Path, accel: &str, extra: &[&str]) -> Vec<String> {
    let guest = devices_guest("console=ttyAMA0 quiet vmapple.crash=vda")
        .args(["--serial", "stdio"])
        .no_usb_no_net()
        .args(["--disk", s(image)]);
    served(guest, accel, socket, extra)
}

/// Runs `args` and stops the VM with `save --stop` into `stop_snapshot`
/// once its console shows `when`; returns the run.
fn run_until_saved(
    args: &[String],
    socket: &Path,
    when: &str,
    stop_snapshot: &Path,
) -> common::Run {
    let run = vmapple_with_triggers(
        &refs(args),
        BOOT,
        &[save_and_stop(when, socket, stop_snapshot)],
    );
    assert_eq!(
        run.code, HOST_STOPPED,
        "save --stop stops the VM: {}\n{}",
        run.stdout, run.stderr
    );
    run
}

each_accel! {
fn a_guest_writing_to_a_virtio_disk_continues_after_restore_and_ext4_stays_clean(accel) {
    if linux_guest_devices().is_none() {
        return;
    }
    let dir = scratch();
    let socket = dir.path().join("d.sock");
    let snapshot = dir.path().join("disk.snap");
    let image = dir.path().join("disk.img");
    std::fs::File::create(&image).unwrap().set_len(64 << 20).unwrap();
    let (code, text) = run_tool(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&image));
    assert_eq!(code, 0, "mkfs.ext4: {text}");

    // The guest appends a record, fsyncs it and says so, again and again;
    // the save comes while it does, after enough requests that the rings'
    // indices have gone round the 256-entry queues (a restore that lost
    // the queues' positions would then take nothing more from them).
    let first = run_until_saved(
        &disk_args(&socket, &image, accel, &[]),
        &socket,
        "synced 200\r",
        &snapshot,
    );
    let saved = *synced(&first.stdout).last().expect("records before the save");

    // A new process restores it: the same loop goes on writing, through
    // the restored queues, without a reboot or a new mount.
    let args = disk_args(&socket, &image, accel, &["--restore", s(&snapshot)]);
    let target = saved + 20;
    let second = run_until_saved(
        &args,
        &socket,
        &format!("synced {target}\r"),
        &dir.path().join("later.snap"),
    );
    assert!(
        !second.stdout.contains("crash start"),
        "a restored VM does not boot:\n{}",
        second.stdout
    );
    let after = synced(&second.stdout);
    assert!(
        after.first().is_some_and(|&n| n > saved && n <= saved + 2),
        "the writes continue from record {saved}: {after:?}\n{}",
        second.stderr
    );
    assert!(
        after.windows(2).all(|w| w[1] == w[0] + 1),
        "one loop writing on: {after:?}"
    );
    let last = *after.last().unwrap();
    assert!(last >= target);

    // On the host: the filesystem (its journal replayed, as the guest is
    // stopped with it mounted) is clean and holds every record the guest
    // fsynced, before and after the restore.
    let records = clean_ext4_file(&image, dir.path(), "/records");
    let lines: Vec<&str> = records.lines().filter(|l| l.starts_with("record ")).collect();
    assert!(lines.len() as u64 > last, "records 0..={last} on disk, found {}", lines.len());
    for (i, line) in lines.iter().enumerate().take(last as usize + 1) {
        assert_eq!(*line, format!("record {i}"), "record {i} on disk");
    }
}
}

/// The guest's serial console on `--serial unix:PATH`: what it printed so
/// far, and a way to type.
struct SerialConsole {
    stream: std::os::unix::net::UnixStream,
    seen: String,
    /// Where the last awaited text ended.
    cursor: usize,
}

impl SerialConsole {
    /// Connects once the VMM listens on `path` (the file of an earlier
    /// process may still be there, stale).
    fn connect(path: &Path) -> Self {
        let deadline = std::time::Instant::now() + BOOT;
        loop {
            if let Ok(stream) = std::os::unix::net::UnixStream::connect(path) {
                stream
                    .set_read_timeout(Some(Duration::from_millis(200)))
                    .unwrap();
                return Self {
                    stream,
                    seen: String::new(),
                    cursor: 0,
                };
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no serial socket at {}",
                path.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Reads until the console shows `needle` after the text last waited
    /// for; returns the console from there to the end of `needle`.
    fn wait_for(&mut self, needle: &str) -> String {
        use std::io::Read;
        let from = self.cursor;
        let deadline = std::time::Instant::now() + BOOT;
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(at) = self.seen[from..].find(needle) {
                self.cursor = from + at + needle.len();
                return self.seen[from..self.cursor].to_string();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{needle:?} never came; console:\n{}",
                self.seen
            );
            match self.stream.read(&mut chunk) {
                Ok(0) => panic!("console closed before {needle:?}:\n{}", self.seen),
                Ok(n) => self.seen.push_str(&String::from_utf8_lossy(&chunk[..n])),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => panic!("reading the console: {e}"),
            }
        }
    }

    /// Reads until the console shows every one of `needles`, in any
    /// order, after the text last waited for.
    fn wait_all(&mut self, needles: &[&str]) {
        let from = self.cursor;
        let mut end = from;
        for needle in needles {
            self.cursor = from;
            self.wait_for(needle);
            end = end.max(self.cursor);
        }
        self.cursor = end;
    }

    /// Types `line` and Enter at the guest's shell.
    fn type_line(&mut self, line: &str) {
        use std::io::Write;
        self.stream.write_all(line.as_bytes()).unwrap();
        self.stream.write_all(b"\r").unwrap();
    }
}

/// Waits until the VMM serves its control socket `socket` (it opens the
/// serial socket first).
fn wait_for_control(socket: &Path) {
    let deadline = std::time::Instant::now() + BOOT;
    loop {
        let status = Command::new(env!("CARGO_BIN_EXE_vmapple"))
            .args(["ctl", s(socket), "status"])
            .output()
            .unwrap();
        if status.status.success() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no control socket at {}",
            socket.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits for `child` to end within [`BOOT`]; its exit status and stderr.
fn finish(mut child: std::process::Child) -> (i32, String) {
    use std::io::Read;
    let deadline = std::time::Instant::now() + BOOT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("vmapple did not finish");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    (status.code().unwrap_or(-1), err)
}

fn spawn(args: &[String]) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_vmapple"))
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawning vmapple")
}

/// `vmapple run` of the Linux guest with a NIC on passt and its console on
/// `serial`: it takes a DHCP lease, downloads from the host's port `port`
/// and uploads to `port + 1`, then gives a shell on the console.
fn net_args(socket: &Path, serial: &Path, port: u16, accel: &str, extra: &[&str]) -> Vec<String> {
    let guest = devices_guest(&format!(
        "console=ttyAMA0 quiet vmapple.net={port} vmapple.demo"
    ))
    .args(["--serial", &format!("unix:{}", s(serial))])
    .args(["--no-usb", "--net", "passt", "--mac", "52:54:00:12:34:56"]);
    served(guest, accel, socket, extra)
}

fn md5_hex(data: &[u8]) -> String {
    let mut child = Command::new("md5sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        child.stdin.take().unwrap().write_all(data).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

each_accel! {
fn after_restore_the_guest_gets_dhcp_again_talks_tcp_through_passt_and_its_console_takes_input(accel) {
    use std::io::{Read, Write};
    if cfg!(target_os = "macos") {
        common::skip("passt, the host end of the network, runs only on Linux");
        return;
    }
    if linux_guest_devices().is_none() {
        return;
    }
    let dir = scratch();
    let socket = dir.path().join("c.sock");
    let serial = dir.path().join("s.sock");
    let snapshot = dir.path().join("net.snap");

    // The host's side: a download before the save, an upload, and a
    // second download (other bytes) after the restore.
    let download = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = download.local_addr().unwrap().port();
    let upload = std::net::TcpListener::bind(("127.0.0.1", port + 1))
        .expect("the port after an ephemeral one is usually free");
    let first: Vec<u8> = (0..300_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    let second: Vec<u8> = (0..200_000u32).map(|i| (i * 13 + 5) as u8).collect();
    let server = {
        let (first, second) = (first.clone(), second.clone());
        std::thread::spawn(move || {
            let (mut c, _) = download.accept().unwrap();
            c.write_all(&first).unwrap();
            drop(c);
            let (mut c, _) = upload.accept().unwrap();
            c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            let mut got = 0;
            let mut chunk = [0u8; 65536];
            while got < first.len() {
                match c.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got += n,
                }
            }
            drop(c);
            let (mut c, _) = download.accept().unwrap();
            c.write_all(&second).unwrap();
        })
    };

    let vm = spawn(&net_args(&socket, &serial, port, accel, &[]));
    let mut console = SerialConsole::connect(&serial);
    let before = console.wait_for("VMAPPLE-GUEST: demo shell");
    assert!(
        before.contains(&format!("net download {} {}", first.len(), md5_hex(&first))),
        "the network works before the save:\n{before}"
    );
    console.wait_for("# ");
    ctl(&socket, &["save", s(&snapshot), "--stop"]);
    let (code, err) = finish(vm);
    assert_eq!(code, HOST_STOPPED, "{err}");

    // A new process (a new passt): the guest's shell is where it was and
    // takes typed commands; a new lease, then a TCP download.
    let args = net_args(&socket, &serial, port, accel, &["--restore", s(&snapshot)]);
    let vm = spawn(&args);
    let mut console = SerialConsole::connect(&serial);
    // The markers are computed by the shell, so the echo of the typed line
    // does not match them.
    console.type_line(
        "udhcpc -i eth0 -f -q -n -t 10 -s /tmp/dhcp.sh >/dev/null 2>&1 && echo LEASE-$((40+2)) $(cat /tmp/gateway)",
    );
    let lease = console.wait_for("LEASE-42");
    assert!(!lease.contains("userspace up"), "no reboot:\n{lease}");
    console.type_line(&format!(
        "nc $(cat /tmp/gateway) {port} | md5sum; echo GOT-$((6*7))"
    ));
    let got = console.wait_for("GOT-42");
    assert!(
        got.contains(&md5_hex(&second)),
        "the download after the restore, byte for byte:\n{got}"
    );
    console.type_line("poweroff -f");
    let (code, err) = finish(vm);
    assert_eq!(code, 0, "{err}");
    server.join().unwrap();
}
}

/// `vmapple run` of the Linux guest with the USB keyboard and tablet (the
/// guest prints every event its evdev gets) and a shell on the console at
/// `serial`.
fn usb_args(socket: &Path, serial: &Path, accel: &str, extra: &[&str]) -> Vec<String> {
    let guest = devices_guest("console=ttyAMA0 quiet vmapple.usb=3 vmapple.demo")
        .args(["--serial", &format!("unix:{}", s(serial))])
        .args(["--net", "none"]);
    served(guest, accel, socket, extra)
}

each_accel! {
fn after_restore_usb_keyboard_and_tablet_events_reach_the_guests_evdev(accel) {
    if linux_guest_devices().is_none() {
        return;
    }
    let dir = scratch();
    let socket = dir.path().join("c.sock");
    let serial = dir.path().join("s.sock");
    let snapshot = dir.path().join("usb.snap");

    // XHCI with MSI-X (the default with --kernel), the keyboard and the
    // tablet enumerated by the guest, which watches their evdev nodes.
    let vm = spawn(&usb_args(&socket, &serial, accel, &[]));
    let mut console = SerialConsole::connect(&serial);
    console.wait_for("VMAPPLE-GUEST: usb ready");
    ctl(&socket, &["send-keys", "b"]);
    console.wait_for("USB Keyboard 1 48 0");
    console.wait_for("# ");
    ctl(&socket, &["save", s(&snapshot), "--stop"]);
    let (code, err) = finish(vm);
    assert_eq!(code, HOST_STOPPED, "{err}");

    // A new process: keys and a pointer move from its control socket
    // reach the same guest's evdev through the restored controller, and
    // the console takes a typed command.
    let vm = spawn(&usb_args(&socket, &serial, accel, &["--restore", s(&snapshot)]));
    let mut console = SerialConsole::connect(&serial);
    wait_for_control(&socket);
    ctl(&socket, &["send-keys", "shift", "a"]);
    // Each event is a line of its own (the guest's watchers print them
    // as evdev gives them); their order between devices is the guest's.
    for needle in [
        "USB Keyboard 1 42 1",
        "USB Keyboard 1 30 1",
        "USB Keyboard 1 30 0",
        "USB Keyboard 1 42 0",
    ] {
        console.wait_for(needle);
    }
    assert!(!console.seen.contains("userspace up"), "no reboot:\n{}", console.seen);
    ctl(&socket, &["pointer", "1000", "2000", "left"]);
    console.wait_all(&[
        "USB Tablet 3 0 1000",
        "USB Tablet 3 1 2000",
        "USB Tablet 1 272 1",
    ]);
    console.type_line("echo TYPED-$((6*7))");
    console.wait_for("TYPED-42");
    console.type_line("poweroff -f");
    let (code, err) = finish(vm);
    assert_eq!(code, 0, "{err}");
}
}

/// Connects to guest port `port` through the vsock socket `sock` and
/// echoes `data` through it (the guest's `vmapple-vsock echo`); returns
/// the stream, still open.
fn vsock_echo(sock: &Path, port: u32, data: &[u8]) -> std::os::unix::net::UnixStream {
    use std::io::{Read, Write};
    let s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(BOOT)).unwrap();
    (&s).write_all(format!("CONNECT {port}\n").as_bytes())
        .unwrap();
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while byte[0] != b'\n' {
        assert_eq!(
            (&s).read(&mut byte).unwrap(),
            1,
            "closed before OK ({} bytes to echo)",
            data.len()
        );
        line.push(byte[0]);
    }
    assert!(
        line.starts_with(b"OK "),
        "{}",
        String::from_utf8_lossy(&line)
    );
    (&s).write_all(data).unwrap();
    let mut back = vec![0u8; data.len()];
    (&s).read_exact(&mut back).unwrap();
    assert_eq!(back, data, "the echo");
    s
}

each_accel! {
fn after_restore_the_guest_serves_vsock_again(accel) {
    use std::io::Read;
    let Some(files) = common::linux_guest_share() else {
        return;
    };
    let dir = scratch();
    let socket = dir.path().join("c.sock");
    let serial = dir.path().join("s.sock");
    let vsock = dir.path().join("v.sock");
    let snapshot = dir.path().join("vsock.snap");
    let args = |extra: &[&str]| {
        let guest = LinuxGuest::new(&files, "console=ttyAMA0 quiet vmapple.demo")
            .two_cpus()
            .args(["--serial", &format!("unix:{}", s(&serial))])
            .no_usb_no_net()
            .args(["--vsock", s(&vsock)]);
        served(guest, accel, &socket, extra)
    };

    // The guest serves an echo on vsock port 5000; a host client talks
    // to it and stays connected through the save.
    let vm = spawn(&args(&[]));
    let mut console = SerialConsole::connect(&serial);
    console.wait_for("VMAPPLE-GUEST: demo shell");
    console.type_line("vmapple-vsock echo 5000 &");
    console.wait_for("VMAPPLE-GUEST: vsock listening 5000");
    let before = vsock_echo(&vsock, 5000, b"before the save");
    ctl(&socket, &["save", s(&snapshot), "--stop"]);
    let (code, err) = finish(vm);
    assert_eq!(code, HOST_STOPPED, "{err}");
    // The VMM is gone, and the connection with it.
    let mut rest = Vec::new();
    assert_eq!((&before).read_to_end(&mut rest).unwrap_or(0), 0);

    // A new process: the same guest process serves new connections.
    let vm = spawn(&args(&["--restore", s(&snapshot)]));
    let mut console = SerialConsole::connect(&serial);
    wait_for_control(&socket);
    let data: Vec<u8> = (0..100_000u32).map(|i| (i * 31 + 7) as u8).collect();
    drop(vsock_echo(&vsock, 5000, &data));
    console.type_line("echo TYPED-$((6*7))");
    let shown = console.wait_for("TYPED-42");
    assert!(!shown.contains("userspace up"), "no reboot:\n{shown}");
    console.type_line("poweroff -f");
    let (code, err) = finish(vm);
    assert_eq!(code, 0, "{err}");
}
}

/// The display test's pattern: every pixel distinct enough that a shifted
/// row, a swapped channel or a lost update shows.
fn fb_pattern(x: usize, y: usize) -> [u8; 3] {
    [
        ((x * 7 + y * 3) & 0xff) as u8,
        ((x ^ y) & 0xff) as u8,
        ((x + 2 * y) & 0xff) as u8,
    ]
}

/// How many pixels of the screenshot `png_path` differ from the pattern
/// (all of them if it is not `w`x`h`).
fn pixels_off_pattern(png_path: &Path, w: usize, h: usize) -> usize {
    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(png_path).unwrap(),
    ));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    if (info.width as usize, info.height as usize) != (w, h) {
        return w * h;
    }
    let channels = if info.color_type == png::ColorType::Rgba {
        4
    } else {
        3
    };
    (0..h)
        .flat_map(|y| (0..w).map(move |x| (x, y)))
        .filter(|&(x, y)| {
            let at = (y * w + x) * channels;
            [buf[at], buf[at + 1], buf[at + 2]] != fb_pattern(x, y)
        })
        .count()
}

each_accel! {
fn after_restore_the_virtio_gpu_shows_what_the_guest_drew(accel) {
    if linux_guest_devices().is_none() {
        return;
    }
    let (w, h) = (1024, 768);
    let dir = scratch();
    let socket = dir.path().join("c.sock");
    let serial = dir.path().join("s.sock");
    let snapshot = dir.path().join("gpu.snap");
    let disk = dir.path().join("pattern.img");
    let mut bytes = Vec::with_capacity(w * h * 4);
    for y in 0..h {
        for x in 0..w {
            let [r, g, b] = fb_pattern(x, y);
            bytes.extend_from_slice(&[b, g, r, 0]);
        }
    }
    std::fs::write(&disk, bytes).unwrap();
    let args = |extra: &[&str]| {
        let guest = devices_guest(
            "console=ttyAMA0 quiet vt.global_cursor_default=0 vmapple.fb=vda vmapple.demo",
        )
        .args(["--serial", &format!("unix:{}", s(&serial))])
        .no_usb_no_net()
        .args(["--disk", &format!("{},readonly", s(&disk))])
        .args(["--gpu", "virtio", "--display-modes", "1024x768@60", "--display", "none"]);
        served(guest, accel, &socket, extra)
    };

    // The guest copies the pattern to its framebuffer and sits at a shell.
    let vm = spawn(&args(&[]));
    let mut console = SerialConsole::connect(&serial);
    console.wait_for("VMAPPLE-GUEST: fb drawn");
    console.wait_for("VMAPPLE-GUEST: demo shell");
    let before = dir.path().join("before.png");
    ctl(&socket, &["screenshot", s(&before)]);
    assert_eq!(pixels_off_pattern(&before, w, h), 0, "drawn before the save");
    ctl(&socket, &["save", s(&snapshot), "--stop"]);
    let (code, err) = finish(vm);
    assert_eq!(code, HOST_STOPPED, "{err}");

    // A new process shows the same picture at once, without the guest
    // drawing anything.
    let vm = spawn(&args(&["--restore", s(&snapshot)]));
    let mut console = SerialConsole::connect(&serial);
    wait_for_control(&socket);
    let after = dir.path().join("after.png");
    ctl(&socket, &["screenshot", s(&after)]);
    assert_eq!(pixels_off_pattern(&after, w, h), 0, "shown after the restore");
    console.type_line("echo TYPED-$((6*7))");
    console.wait_for("TYPED-42");
    console.type_line("poweroff -f");
    let (code, err) = finish(vm);
    assert_eq!(code, 0, "{err}");
}
}
