//! Crash consistency of the block path, proved with a real guest: Linux
//! appends numbered records to a file on an ext4 virtio-blk disk and
//! prints each number once `fsync` has returned for it; the test kills
//! vmapple with SIGKILL at a random moment, then checks that the
//! filesystem is clean and that every record the guest reported as synced
//! is on the disk.
//!
//! Every round boots from the image the previous round's kill left, so
//! each boot also replays the journal of a killed run (as a user's next
//! boot would) and the records of all earlier rounds are checked again:
//! damage cannot hide behind a fresh copy. The host checks a copy of the
//! image with its journal replayed (`e2fsck -E journal_only`, what any
//! mount does first), so the guest's next mount is the one that replays
//! the original.
//!
//! The kill moments come from a seeded generator; the seed is printed, and
//! `VMAPPLE_CRASH_SEED=N` reruns the same moments (`VMAPPLE_CRASH_ROUNDS`
//! changes the number of rounds, 20 by default).

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::linux_guest_devices;

/// splitmix64: enough randomness for kill moments, reproducible by seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number"))
    })
}

fn run(cmd: &mut Command) -> (i32, String) {
    let out = cmd.output().expect("running an e2fsprogs tool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// What one run of the guest showed on its console before the kill.
struct Round {
    /// The record count the guest found when it started.
    start: u64,
    /// Records the guest reported as synced, in order.
    synced: Vec<u64>,
    console: String,
}

/// Boots the guest on `image`, kills vmapple `delay` after the guest
/// starts writing, and returns what the console showed.
fn boot_and_kill(image: &Path, delay: Duration) -> Round {
    let (kernel, initrd) = linux_guest_devices();
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmapple"))
        .args(["run", "--kernel"])
        .arg(&kernel)
        .arg("--initrd")
        .arg(&initrd)
        .args([
            "--append",
            "console=ttyAMA0 vmapple.crash=vda quiet",
            "--cpus",
            "1",
            "--memory",
            "256M",
            "--net",
            "none",
            "--disk",
        ])
        .arg(image)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawning vmapple");
    let mut stdout = child.stdout.take().unwrap();
    let (tx, lines) = mpsc::channel::<Vec<u8>>();
    let reader = std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n @ 1..) = stdout.read(&mut chunk) {
            if tx.send(chunk[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut console = Vec::new();
    // Safety net for a guest that never gets going; not a measure.
    let limit = Instant::now() + Duration::from_secs(300);
    let mut kill_at = None;
    loop {
        let now = Instant::now();
        if kill_at.is_some_and(|at| now >= at) || now >= limit {
            break;
        }
        let wait = kill_at.unwrap_or(limit).saturating_duration_since(now);
        match lines.recv_timeout(wait) {
            Ok(bytes) => console.extend_from_slice(&bytes),
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if kill_at.is_none()
            && String::from_utf8_lossy(&console).contains("VMAPPLE-GUEST: crash start")
        {
            kill_at = Some(Instant::now() + delay);
        }
    }
    // SIGKILL: no chance for vmapple to flush or finish anything.
    let _ = child.kill();
    let _ = child.wait();
    // What vmapple wrote before it died is still in the pipe.
    reader.join().unwrap();
    while let Ok(bytes) = lines.try_recv() {
        console.extend_from_slice(&bytes);
    }
    let console = String::from_utf8_lossy(&console).into_owned();
    assert!(
        kill_at.is_some(),
        "the guest never started writing records; console:\n{console}"
    );
    // Only whole lines count: a number cut off by the kill was not seen.
    let whole = &console[..console.rfind('\n').map_or(0, |i| i + 1)];
    let value = |l: &str, p: &str| l.trim().strip_prefix(p).map(|n| n.parse::<u64>().unwrap());
    Round {
        start: whole
            .lines()
            .find_map(|l| value(l, "VMAPPLE-GUEST: crash start "))
            .unwrap(),
        synced: whole
            .lines()
            .filter_map(|l| value(l, "VMAPPLE-GUEST: synced "))
            .collect(),
        console,
    }
}

/// Replays the journal of a copy of `image`, checks it with `e2fsck -fn`
/// and returns the records file.
fn check_copy(image: &Path, copy: &Path) -> String {
    std::fs::copy(image, copy).unwrap();
    let (code, text) = run(Command::new("e2fsck")
        .args(["-p", "-E", "journal_only"])
        .arg(copy));
    // 0: nothing to do, 1: journal replayed; more is an error.
    assert!(code <= 1, "journal replay (exit {code}):\n{text}");
    let (code, text) = run(Command::new("e2fsck").arg("-fn").arg(copy));
    assert_eq!(code, 0, "e2fsck -fn after the kill:\n{text}");
    let out = Command::new("debugfs")
        .args(["-R", "cat /records"])
        .arg(copy)
        .output()
        .expect("debugfs");
    String::from_utf8(out.stdout).expect("records are text")
}

#[test]
fn records_a_guest_fsynced_survive_sigkill_and_ext4_stays_clean() {
    let seed = env_u64("VMAPPLE_CRASH_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    });
    let rounds = env_u64("VMAPPLE_CRASH_ROUNDS").unwrap_or(20);
    eprintln!(
        "crash consistency: seed {seed}, {rounds} rounds (VMAPPLE_CRASH_SEED={seed} repeats them)"
    );
    let mut rng = Rng(seed);

    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("crash-consistency");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let image = dir.join("data.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    let (code, text) = run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&image));
    assert_eq!(
        code, 0,
        "mkfs.ext4 (e2fsprogs; scripts/setup.sh installs it): {text}"
    );

    let mut total_synced = 0;
    let mut on_disk_before = 0u64;
    for round in 0..rounds {
        // Up to 2 s of appending, so some kills land early in the first
        // records and some deep in the loop.
        let delay = Duration::from_millis(rng.next() % 2000);
        let r = boot_and_kill(&image, delay);
        let records = check_copy(&image, &dir.join("check.img"));

        let context = || {
            format!(
                "round {round} (seed {seed}), killed {delay:?} after the guest started at \
                 record {}; console:\n{}",
                r.start, r.console
            )
        };
        // The guest found every whole record of earlier rounds.
        assert_eq!(
            r.start,
            on_disk_before,
            "the guest found another record count than the host: {}",
            context()
        );
        // Whole records are 0, 1, 2, ... in order; at most one torn record
        // (written, not synced) follows them.
        let whole = &records[..records.rfind('\n').map_or(0, |i| i + 1)];
        for (i, line) in whole.lines().enumerate() {
            assert_eq!(
                line,
                format!("record {i}"),
                "record {i} damaged: {}",
                context()
            );
        }
        let count = whole.lines().count() as u64;
        let torn = &records[whole.len()..];
        assert!(
            format!("record {count}\n").starts_with(torn),
            "garbage after record {}: {torn:?}; {}",
            count.saturating_sub(1),
            context()
        );
        // Every record reported as synced is there.
        if let Some(&last) = r.synced.last() {
            assert!(
                last < count,
                "record {last} was synced but only {count} are on disk: {}",
                context()
            );
        }
        eprintln!(
            "round {round}: killed {delay:?} in, {} records synced, {count} on disk",
            r.synced.len()
        );
        total_synced += r.synced.len();
        on_disk_before = count;
    }
    // The test must have exercised something: records were synced and
    // kills found the guest writing.
    assert!(total_synced > 0, "no record was ever synced (seed {seed})");
}
