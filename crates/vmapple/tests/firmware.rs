//! The aarch64 test firmware (guest/firmware, built from source here) on
//! the software CPU: every check of the CPU, GIC, timer, PSCI, UART and
//! SMP behaviour passes on two vCPUs, and a hostile guest that writes
//! garbage everywhere it can reach does not bring the VMM down.

#[macro_use]
mod common;

use std::time::Duration;

use common::{firmware_dir, vmapple};

const CHECKS: &[&str] = &[
    "uart",
    "psci-version",
    "gic-init",
    "timer-10",
    "timer-interval",
    "timer-istatus",
    "affinity-off",
    "cpu-on",
    "cpu-on-context",
    "cpu-on-mpidr",
    "affinity-on",
    "sgi",
    "atomics-exclusive",
    "atomics-lse",
    "mmu",
    "mmu-atomics",
    "smp-code",
    "smp-tlb",
    "cpu-off",
];

/// Boots `guest/firmware`'s program `name` on `cpus` vCPUs.
fn run_firmware(accel: &str, name: &str, cpus: &str, limit: Duration) -> common::Run {
    let firmware = firmware_dir().join(format!("{name}-vmapple.bin"));
    vmapple(
        &[
            "run",
            "--firmware",
            firmware.to_str().unwrap(),
            "--cpus",
            cpus,
            "--memory",
            "256M",
            "--accel",
            accel,
        ],
        limit,
    )
}

each_accel! {
fn test_firmware_passes_every_check_on_two_cpus(accel) {
    let run = run_firmware(accel, "fw", "2", Duration::from_secs(120));
    for check in CHECKS {
        run.assert_line(&format!("PASS {check}\r\n"));
    }
    assert!(!run.stdout.contains("FAIL"), "{}", run.stdout);
    run.assert_line("ALL CHECKS PASSED");
    assert_eq!(run.code, 0, "SYSTEM_OFF exits 0; stderr:\n{}", run.stderr);
}
}

each_accel! {
fn hostile_guest_does_not_crash_the_vmm(accel) {
    let run = run_firmware(accel, "chaos", "2", Duration::from_secs(300));
    let summary = run
        .stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("CHAOS DONE "))
        .unwrap_or_else(|| {
            panic!(
                "no summary; console:\n{}\nstderr:\n{}",
                run.stdout, run.stderr
            )
        });
    let count = |key: &str| -> u64 {
        summary
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(key))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{key} missing in {summary:?}"))
    };
    assert!(count("mmio=") > 1_000_000, "{summary}");
    // 2 x 8 x 16 x 16 x 8 = 32768 encodings read, all but 6 spared written.
    assert_eq!(count("sysregs="), 2 * 32768 - 6, "{summary}");
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
    assert_eq!(
        run.code, 0,
        "the guest reached SYSTEM_OFF; stderr:\n{}",
        run.stderr
    );
}
}

each_accel! {
/// SYSTEM_RESET reloads the firmware image the guest overwrote
/// (vmapple-machine.md §20.1 vector 3), and a guest that does nothing but
/// reset ends the run with the reset-loop status.
fn reset_restores_the_rom_and_a_reset_loop_ends_the_run(accel) {
    let run = run_firmware(accel, "reset", "1", Duration::from_secs(120));
    run.assert_line("boot 1: overwriting the ROM image");
    run.assert_line("PASS rom-restored");
    assert_eq!(run.code, 4, "reset loop status; stderr:\n{}", run.stderr);
    assert!(
        run.stderr.contains("reset 10 times in a row"),
        "{}",
        run.stderr
    );
}
}

/// What guest/firmware's msi program checks before its pair load.
const MSI_CHECKS: &[&str] = &[
    "v2m-typer",
    "v2m-iidr",
    "v2m-cidr",
    "gicd-mbis",
    "v2m-every-spi",
    "gicd-every-spi",
    "gicd-clrspi",
    "hostile-doorbells",
];

each_accel! {
fn with_msi_on_every_message_spi_is_taken_through_both_doorbells(accel) {
    let firmware = firmware_dir().join("msi-vmapple.bin");
    let run = vmapple(
        &[
            "run",
            "--firmware",
            firmware.to_str().unwrap(),
            "--memory",
            "256M",
            "--net",
            "none",
            "--accel",
            accel,
            "--msi",
            "on",
        ],
        Duration::from_secs(120),
    );
    for check in MSI_CHECKS {
        run.assert_line(&format!("PASS {check}\r\n"));
    }
    assert!(!run.stdout.contains("FAIL"), "{}", run.stdout);
    // Last, MSI_TYPER read with LDP as newer macOS kernels read it: the
    // software CPU performs it, and on Hypervisor.framework (no syndrome
    // for a pair load) the shared exit path decodes and emulates it.
    run.assert_line("PASS v2m-ldp\r\n");
    run.assert_line("ALL CHECKS PASSED");
    assert_eq!(run.code, 0, "{}", run.stderr);
}
}
