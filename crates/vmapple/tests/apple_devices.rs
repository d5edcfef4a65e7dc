//! The Apple platform devices driven by real aarch64 code on the software
//! CPU (guest/firmware/apple.c): the cfg region, a second stage loaded from
//! the aux disk through the backdoor block interface and run, the AES
//! engine's known ciphertexts and interrupt, the RTC, pvpanic, and the
//! power button pressed by SIGTERM to the VMM.

#[macro_use]
mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{firmware_dir, vmapple, vmapple_with_triggers, Action, Trigger};

const SECTOR: usize = 512;
/// Where the aux image keeps the second stage (apple.c reads the header
/// at sector 0 to find it).
const STAGE2_SECTOR: u32 = 8;

const CHECKS: &[&str] = &[
    "cfg-version",
    "cfg-nr-cpus",
    "cfg-unknown-words",
    "cfg-ecid",
    "cfg-ram-size",
    "cfg-cpu-ids",
    "cfg-strings",
    "cfg-tail-zero",
    "bdif-registers",
    "bdif-aux-header",
    "bdif-aux-payload",
    "bdif-stage2-ran",
    "bdif-root-read",
    "bdif-root-last-sector",
    "bdif-write-refused",
    "bdif-past-end",
    "bdif-dma-unmapped",
    "bdif-too-long",
    "aes-status",
    "aes-ecb-builtin-key",
    "aes-fips197",
    "aes-cbc-encrypt",
    "aes-cbc-decrypt",
    "aes-flag-irq",
    "aes-flag-info",
    "aes-irq-cleared",
    "rtc-wall-clock",
    "rtc-id",
    "rtc-match-irq",
    "pvpanic-events",
    "gpio-line-low",
    "power-button-irq",
    "power-button-high",
    "power-button-released",
];

/// An aux image the way apple.c expects it: a header naming the payload,
/// the payload (stage2.bin) at [`STAGE2_SECTOR`].
fn make_aux(dir: &Path) -> PathBuf {
    let stage2 = std::fs::read(firmware_dir().join("stage2.bin")).unwrap();
    let mut image = vec![0u8; 64 * 1024];
    image[..8].copy_from_slice(b"VMAPSTG2");
    image[8..12].copy_from_slice(&(stage2.len() as u32).to_le_bytes());
    image[12..16].copy_from_slice(&STAGE2_SECTOR.to_le_bytes());
    let at = STAGE2_SECTOR as usize * SECTOR;
    image[at..at + stage2.len()].copy_from_slice(&stage2);
    let path = dir.join("aux.img");
    std::fs::write(&path, image).unwrap();
    path
}

fn make_root(dir: &Path) -> PathBuf {
    let mut image = vec![0u8; 1024 * 1024];
    let text = b"vmapple root disk, sector 3";
    image[3 * SECTOR..3 * SECTOR + text.len()].copy_from_slice(text);
    let path = dir.join("root.img");
    std::fs::write(&path, image).unwrap();
    path
}

fn scratch_dir(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

each_accel! {
fn boot_rom_style_guest_uses_every_apple_device_and_powers_off_on_sigterm(accel) {
    let dir = scratch_dir(&format!("apple-devices-{accel}"));
    let aux = make_aux(&dir);
    let root = make_root(&dir);
    let root_before = std::fs::read(&root).unwrap();
    let firmware = firmware_dir().join("apple-vmapple.bin");
    let run = vmapple_with_triggers(
        &[
            "run",
            "--firmware",
            firmware.to_str().unwrap(),
            "--cpus",
            "2",
            "--memory",
            "256M",
            "--ecid",
            "0x1122334455667788",
            "--aux",
            aux.to_str().unwrap(),
            "--root",
            root.to_str().unwrap(),
            "--accel",
            accel,
        ],
        Duration::from_secs(120),
        &[Trigger {
            when_console_shows: "waiting for the power button",
            action: Action::Signal(libc::SIGTERM),
        }],
    );
    run.assert_line("stage 2: running, loaded from the aux disk");
    for check in CHECKS {
        run.assert_line(&format!("PASS {check}\r\n"));
    }
    assert!(!run.stdout.contains("FAIL"), "{}", run.stdout);
    run.assert_line("ALL CHECKS PASSED");
    assert!(
        run.stderr.contains("crash-loaded"),
        "the pvpanic event is logged: {}",
        run.stderr
    );
    assert!(
        run.stderr.contains("power button"),
        "the SIGTERM is logged as a button press: {}",
        run.stderr
    );
    assert_eq!(run.code, 0, "guest powered off; stderr:\n{}", run.stderr);
    assert_eq!(
        std::fs::read(&root).unwrap(),
        root_before,
        "the backdoor never writes a disk"
    );

    // The RTC started from the host's clock.
    let seconds: u64 = run
        .stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("rtc seconds "))
        .and_then(|s| s.parse().ok())
        .expect("rtc line");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        seconds.abs_diff(now) < 120,
        "guest RTC {seconds} vs host {now}"
    );
}
}

each_accel! {
fn the_cfg_random_word_differs_between_launches(accel) {
    let dir = scratch_dir(&format!("apple-rnd-{accel}"));
    let aux = make_aux(&dir);
    let root = make_root(&dir);
    let firmware = firmware_dir().join("apple-vmapple.bin");
    let rnd = || {
        let run = vmapple_with_triggers(
            &[
                "run",
                "--firmware",
                firmware.to_str().unwrap(),
                "--memory",
                "256M",
                "--cpus",
                "2",
                "--ecid",
                "0x1122334455667788",
                "--aux",
                aux.to_str().unwrap(),
                "--root",
                root.to_str().unwrap(),
                "--accel",
                accel,
            ],
            Duration::from_secs(120),
            &[Trigger {
                when_console_shows: "waiting for the power button",
                action: Action::Signal(libc::SIGINT),
            }],
        );
        assert_eq!(run.code, 0, "{}", run.stderr);
        run.stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix("cfg rnd ").map(str::to_owned))
            .expect("rnd line")
    };
    assert_ne!(rnd(), rnd(), "32 random bits per launch (§6.6)");
}
}

fn run_panic(accel: &str, policy: Option<&str>) -> common::Run {
    let firmware = firmware_dir().join("panic-vmapple.bin");
    let mut args = vec![
        "run",
        "--firmware",
        firmware.to_str().unwrap(),
        "--accel",
        accel,
    ];
    if let Some(policy) = policy {
        args.extend(["--on-panic", policy]);
    }
    vmapple(&args, Duration::from_secs(60))
}

each_accel! {
fn guest_panic_ends_the_run_with_status_5_by_default(accel) {
    let run = run_panic(accel, None);
    run.assert_line("reporting a panic");
    assert!(!run.stdout.contains("still running"), "{}", run.stdout);
    assert_eq!(run.code, 5, "stderr:\n{}", run.stderr);
    assert!(run.stderr.contains("guest panicked"), "{}", run.stderr);
}
}

each_accel! {
fn guest_panic_with_continue_policy_keeps_running(accel) {
    let run = run_panic(accel, Some("continue"));
    run.assert_line("still running after the panic report");
    assert_eq!(run.code, 0, "stderr:\n{}", run.stderr);
    assert!(run.stderr.contains("guest panicked"), "{}", run.stderr);
}
}

each_accel! {
fn guest_panic_with_pause_policy_pauses_until_stopped(accel) {
    let firmware = firmware_dir().join("panic-vmapple.bin");
    // The VM sits paused after the report; a first SIGTERM presses the
    // power button (nobody is running to see it), the second stops hard.
    let run = vmapple_with_triggers(
        &[
            "run",
            "--firmware",
            firmware.to_str().unwrap(),
            "--on-panic",
            "pause",
            "--accel",
            accel,
        ],
        Duration::from_secs(60),
        &[
            Trigger {
                when_console_shows: "reporting a panic",
                action: Action::Signal(libc::SIGTERM),
            },
            Trigger {
                when_console_shows: "reporting a panic",
                action: Action::Signal(libc::SIGTERM),
            },
        ],
    );
    assert!(!run.stdout.contains("still running"), "{}", run.stdout);
    assert!(run.stderr.contains("paused"), "{}", run.stderr);
    assert_eq!(run.code, 6, "host stop; stderr:\n{}", run.stderr);
}
}
