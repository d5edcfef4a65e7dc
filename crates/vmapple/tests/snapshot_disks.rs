//! Snapshots and their disks, with real guests: a restore onto a disk
//! that changed since the save is refused (naming it, nothing changed)
//! unless `--force`; `save --with-disks` copies the disks (checked with
//! `qemu-img compare`) and a restore puts the copy back, so the guest's
//! ext4 stays clean; two VMs from one snapshot cannot share a writable
//! disk (the second is refused, the first runs on) but share a read-only
//! one.

#[macro_use]
mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{
    clean_ext4_file, ctl, linux_guest_devices, refs, refused, run_tool, save_and_stop, stop_when,
    vmapple_with_triggers, Action, LinuxGuest, Trigger,
};

const BOOT: Duration = Duration::from_secs(300);
/// `vmapple`'s exit status when the host stopped the VM.
const HOST_STOPPED: i32 = 6;

fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("vmd").tempdir().unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The numbers of whole `VMAPPLE-GUEST: <word> N` lines.
fn numbers(console: &str, word: &str) -> Vec<u64> {
    let prefix = format!("VMAPPLE-GUEST: {word} ");
    console
        .split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .filter_map(|l| l.trim().strip_prefix(prefix.as_str()))
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

/// `vmapple run` of the Linux guest on two vCPUs with `append` on the
/// kernel command line and `disk` attached; `extra` appended.
fn guest_args(socket: &Path, append: &str, disk: &str, extra: &[&str]) -> Vec<String> {
    LinuxGuest::new(&linux_guest_devices().expect("the Linux guest"), append)
        .two_cpus()
        .args(["--serial", "stdio"])
        .no_usb_no_net()
        .args(["--disk", disk, "--msi", "off", "--accel", "tcg"])
        .control(socket)
        .args(extra)
        .build()
}

/// The guest appending fsynced records to the ext4 `image`.
fn writer_args(socket: &Path, image: &Path, extra: &[&str]) -> Vec<String> {
    guest_args(
        socket,
        "console=ttyAMA0 quiet vmapple.crash=vda",
        s(image),
        extra,
    )
}

fn mkfs(image: &Path) {
    std::fs::File::create(image)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let (code, text) = run_tool(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(image));
    assert_eq!(code, 0, "mkfs.ext4: {text}");
}

/// The file names in `dir`.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Journal replayed on a copy of `image`, `e2fsck -fn` must pass; returns
/// the copy's `/records` lines.
fn clean_records(image: &Path, dir: &Path) -> Vec<String> {
    clean_ext4_file(image, dir, "/records")
        .lines()
        .filter(|l| l.starts_with("record "))
        .map(str::to_string)
        .collect()
}

/// The restored writer's run: it must continue (no new mount) from a
/// record after `saved` and at most `saved + slack`; stopped by `ctl stop`
/// ten records later.
fn restore_writer(args: &[String], socket: &Path, saved: u64, slack: u64) -> Vec<u64> {
    let until = format!("synced {}\r", saved + slack + 10);
    let run = vmapple_with_triggers(&refs(args), BOOT, &[stop_when(&until, socket)]);
    assert_eq!(run.code, HOST_STOPPED, "{}\n{}", run.stdout, run.stderr);
    assert!(
        !run.stdout.contains("crash start"),
        "a restored VM does not boot:\n{}",
        run.stdout
    );
    let after = numbers(&run.stdout, "synced");
    assert!(
        after
            .first()
            .is_some_and(|&n| n > saved && n <= saved + slack),
        "the writes continue from record {saved}: {after:?}\n{}",
        run.stderr
    );
    after
}

#[test]
fn a_changed_disk_is_refused_unless_forced_and_a_snapshot_with_disks_puts_them_back() {
    if linux_guest_devices().is_none() {
        return;
    }
    let dir = scratch();
    let socket = dir.path().join("w.sock");
    let image = dir.path().join("disk.img");
    mkfs(&image);
    let plain = dir.path().join("plain.snap");
    let full = dir.path().join("full.snap");

    // One run, two saves: `plain` at record 10 (the VM runs on and keeps
    // writing the disk), `full` with the disks at record 30, stopping.
    let (sock1, sock2) = (socket.clone(), socket.clone());
    let (p, f) = (plain.clone(), full.clone());
    let first = vmapple_with_triggers(
        &refs(&writer_args(&socket, &image, &[])),
        BOOT,
        &[
            Trigger {
                when_console_shows: "synced 10\r",
                action: Action::Call(Box::new(move || {
                    ctl(&sock1, &["save", s(&p)]);
                })),
            },
            Trigger {
                when_console_shows: "synced 30\r",
                action: Action::Call(Box::new(move || {
                    ctl(&sock2, &["save", s(&f), "--with-disks", "--stop"]);
                })),
            },
        ],
    );
    assert_eq!(
        first.code, HOST_STOPPED,
        "{}\n{}",
        first.stdout, first.stderr
    );
    let synced = numbers(&first.stdout, "synced");
    let at_full = *synced.last().unwrap();

    // The copy is the disk as it was at the save, which the stopped VM
    // left alone: QEMU's qemu-img agrees, byte for byte.
    let copy = dir.path().join("full.snap.disk0.img");
    let (code, text) = run_tool(Command::new("qemu-img").args([
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        s(&copy),
        s(&image),
    ]));
    assert_eq!(code, 0, "qemu-img compare copy disk: {text}");

    // The disk changed after `plain` (the guest wrote 20 more records):
    // refused, naming the disk, and nothing changes.
    let before = std::fs::read(&image).unwrap();
    let mtime = std::fs::metadata(&image).unwrap().modified().unwrap();
    let listing = names(dir.path());
    let plain_args = writer_args(&socket, &image, &["--restore", s(&plain)]);
    let e = refused(&plain_args);
    assert!(
        e.contains(&format!(
            "--disk {} changed since the snapshot was saved",
            image.display()
        )) && e.contains("--force"),
        "{e}"
    );
    assert!(
        std::fs::read(&image).unwrap() == before,
        "the disk is untouched"
    );
    assert_eq!(
        std::fs::metadata(&image).unwrap().modified().unwrap(),
        mtime
    );
    assert_eq!(names(dir.path()), listing, "no file made or left");

    let e = refused(&writer_args(&socket, &image, &["--force"]));
    assert!(e.contains("--force needs --restore"), "{e}");

    // --force restores anyway: the guest writes on from where it was
    // saved, past record 10 (onto a disk its cache no longer matches).
    let mut forced = plain_args.clone();
    forced.push("--force".into());
    restore_writer(&forced, &socket, 10, at_full - 10);

    // `full` puts its copy back in place of the (now damaged) disk and
    // carries on from record `at_full`: the filesystem is clean and holds
    // exactly the records written before the save and after the restore.
    let after = restore_writer(
        &writer_args(&socket, &image, &["--restore", s(&full)]),
        &socket,
        at_full,
        2,
    );
    let last = *after.last().unwrap();
    let records = clean_records(&image, dir.path());
    assert!(
        records.len() as u64 > last,
        "records 0..={last}: {records:?}"
    );
    for (i, line) in records.iter().enumerate().take(last as usize + 1) {
        assert_eq!(*line, format!("record {i}"), "record {i} on disk");
    }
    // The copy itself is kept, unchanged, for the next restore.
    let (code, _) = run_tool(Command::new("qemu-img").args([
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        s(&copy),
        s(&image),
    ]));
    assert_eq!(code, 1, "the restored guest wrote the disk, not the copy");
    assert!(!names(dir.path())
        .iter()
        .any(|n| n.contains(".restore-") || n.contains(".partial-")));
}

/// The heartbeat guest with `disk` attached (which it does not use).
fn ticker_args(socket: &Path, disk: &str, extra: &[&str]) -> Vec<String> {
    guest_args(
        socket,
        "console=ttyAMA0 quiet vmapple.tick vmapple.powerkey",
        disk,
        extra,
    )
}

/// Saves the heartbeat guest with `--stop` at tick 5; returns the tick.
fn saved_ticker(socket: &Path, disk: &str, snapshot: &Path) -> u64 {
    let run = vmapple_with_triggers(
        &refs(&ticker_args(socket, disk, &[])),
        BOOT,
        &[save_and_stop("tick 5\r", socket, snapshot)],
    );
    assert_eq!(run.code, HOST_STOPPED, "{}\n{}", run.stdout, run.stderr);
    *numbers(&run.stdout, "tick").last().unwrap()
}

/// Restores the heartbeat guest; once it ticked past `from`, runs
/// `meanwhile` and powers it off. Returns its ticks.
fn restored_ticker(args: &[String], socket: &Path, from: u64, meanwhile: &dyn Fn()) -> Vec<u64> {
    let press = format!("tick {}\r", from + 3);
    let sock = socket.to_path_buf();
    let run = vmapple_with_triggers(
        &refs(args),
        BOOT,
        &[Trigger {
            when_console_shows: &press,
            action: Action::Call(Box::new(move || {
                meanwhile();
                ctl(&sock, &["powerdown"]);
            })),
        }],
    );
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    run.assert_line("VMAPPLE-GUEST: power button pressed");
    let ticks = numbers(&run.stdout, "tick");
    assert!(
        ticks.first().is_some_and(|&t| t == from || t == from + 1),
        "continues from {from}: {ticks:?}"
    );
    ticks
}

#[test]
fn two_vms_from_one_snapshot_cannot_share_a_writable_disk_but_share_a_read_only_one() {
    if linux_guest_devices().is_none() {
        return;
    }
    let dir = scratch();
    let image = dir.path().join("shared.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();

    // A writable disk: the second VM is refused with the way out, the
    // first runs on, each on its own control socket.
    let snapshot = dir.path().join("rw.snap");
    let base = dir.path().join("base.sock");
    let saved = saved_ticker(&base, s(&image), &snapshot);
    let one = dir.path().join("one.sock");
    let two = dir.path().join("two.sock");
    let second = ticker_args(&two, s(&image), &["--restore", s(&snapshot)]);
    let message = std::sync::Mutex::new(String::new());
    let one_sock = one.clone();
    restored_ticker(
        &ticker_args(&one, s(&image), &["--restore", s(&snapshot)]),
        &one,
        saved,
        &|| {
            *message.lock().unwrap() = refused(&second);
            // The first VM's own socket answers.
            assert!(ctl(&one_sock, &["status"]).contains("running"));
        },
    );
    let e = message.into_inner().unwrap();
    assert!(
        e.contains(&format!(
            "--disk {} is in use by another VM",
            image.display()
        )) && e.contains("readonly")
            && e.contains("--with-disks"),
        "{e}"
    );
    assert!(!two.exists());

    // A read-only disk: both run at once.
    let ro = format!("{},readonly", s(&image));
    let snapshot = dir.path().join("ro.snap");
    let saved = saved_ticker(&base, &ro, &snapshot);
    let forks: Vec<_> = ["a", "b"]
        .iter()
        .map(|name| {
            let socket = dir.path().join(format!("{name}.sock"));
            let args = ticker_args(&socket, &ro, &["--restore", s(&snapshot)]);
            std::thread::spawn(move || restored_ticker(&args, &socket, saved, &|| {}))
        })
        .collect();
    for fork in forks {
        fork.join().expect("a VM on the read-only disk");
    }
}

/// One `VMAPPLE-GUEST: count N pid P uptime S tmpfs ok` line.
#[derive(Debug, Clone, PartialEq)]
struct Count {
    n: u64,
    pid: u64,
    uptime: f64,
    tmpfs_ok: bool,
}

fn counts(console: &str) -> Vec<Count> {
    console
        .split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .filter_map(|l| l.trim().strip_prefix("VMAPPLE-GUEST: count "))
        .filter_map(|rest| {
            let w: Vec<&str> = rest.split_whitespace().collect();
            match w[..] {
                [n, "pid", pid, "uptime", up, "tmpfs", ok] => Some(Count {
                    n: n.parse().ok()?,
                    pid: pid.parse().ok()?,
                    uptime: up.parse().ok()?,
                    tmpfs_ok: ok == "ok",
                }),
                _ => None,
            }
        })
        .collect()
}

/// The guest's counting program (guest/linux/vmapple-counter.c) is saved
/// mid-run (`--with-disks`), its VMM killed, and the VM restored in a new
/// process: the same process (PID) counts on from the saved value, its
/// uptime continues without the time the VM spent on disk, its tmpfs data
/// is intact, and its appends through the file it kept open land on the
/// disk, which e2fsck finds clean.
#[test]
fn a_process_continues_with_its_pid_tmpfs_and_open_file_after_kill_and_restore() {
    if linux_guest_devices().is_none() {
        return;
    }
    let dir = scratch();
    let socket = dir.path().join("p.sock");
    let image = dir.path().join("disk.img");
    mkfs(&image);
    let snapshot = dir.path().join("p.snap");
    let args = |extra: &[&str]| {
        guest_args(
            &socket,
            "console=ttyAMA0 quiet vmapple.counter=vda",
            s(&image),
            extra,
        )
    };
    let (sock, snap) = (socket.clone(), snapshot.clone());
    let first = vmapple_with_triggers(
        &refs(&args(&[])),
        BOOT,
        &[
            Trigger {
                when_console_shows: "count 10 ",
                action: Action::Call(Box::new(move || {
                    ctl(&sock, &["save", s(&snap), "--with-disks"]);
                })),
            },
            // At once after the save: the VMM dies without a word.
            Trigger {
                when_console_shows: "count 10 ",
                action: Action::Signal(libc::SIGKILL),
            },
        ],
    );
    assert!(
        !first.stdout.contains("counter failed"),
        "the guest lacks vmapple-counter (rebuild guest/out with guest/linux/build.sh):\n{}",
        first.stdout
    );
    assert_eq!(first.code, -1, "killed: {}", first.stderr);
    let before = counts(&first.stdout);
    let last_before = before.last().expect("counts before the kill").n;
    assert!(before.iter().all(|c| c.tmpfs_ok), "{before:?}");

    // Long enough that an uptime following the host's clock would show it.
    std::thread::sleep(Duration::from_secs(6));
    let until = format!("count {} ", last_before + 12);
    let second = vmapple_with_triggers(
        &refs(&args(&["--restore", s(&snapshot)])),
        BOOT,
        &[stop_when(&until, &socket)],
    );
    assert_eq!(
        second.code, HOST_STOPPED,
        "{}\n{}",
        second.stdout, second.stderr
    );
    let after = counts(&second.stdout);
    let resumed = after.first().expect("counts after the restore");
    // The save came after count 10 and before the kill.
    assert!(
        resumed.n > 10 && resumed.n <= last_before + 1,
        "continues from the saved count (10..={last_before}): {after:?}"
    );
    assert!(after.windows(2).all(|w| w[1].n == w[0].n + 1), "{after:?}");
    assert!(
        after.iter().all(|c| c.pid == before[0].pid),
        "the same process, pid {}: {after:?}",
        before[0].pid
    );
    assert!(after.iter().all(|c| c.tmpfs_ok), "tmpfs intact: {after:?}");
    let saved = before.iter().find(|c| c.n == resumed.n - 1).unwrap();
    let gap = resumed.uptime - saved.uptime;
    assert!(
        gap > 0.0 && gap < 5.0,
        "uptime continues ({} then {}): the guest does not see the time on disk",
        saved.uptime,
        resumed.uptime
    );

    // The disk: clean, and the log the process kept open holds exactly
    // the counts up to the save and those after the restore.
    let last = after.last().unwrap().n;
    let log = clean_ext4_file(&image, dir.path(), "/counter.log");
    let lines: Vec<&str> = log.lines().filter(|l| l.starts_with("count ")).collect();
    assert!(
        lines.len() as u64 > last && lines.len() as u64 <= last + 2,
        "{lines:?}"
    );
    for (i, line) in lines.iter().enumerate().take(last as usize + 1) {
        assert_eq!(*line, format!("count {i} pid {}", before[0].pid));
    }
}
