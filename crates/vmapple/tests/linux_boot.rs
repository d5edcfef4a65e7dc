//! Debian's arm64 kernel boots to userspace with two vCPUs and powers off
//! cleanly, on the software CPU and (with the `hvf-double` feature) on the
//! Hypervisor.framework accelerator over its double; its init (guest/linux/init) reports what
//! it saw on the PL011 console.

#[macro_use]
mod common;

use std::time::Duration;

use common::{linux_guest, refs, vmapple, LinuxGuest};

each_accel! {
fn linux_reaches_userspace_on_two_cpus_and_powers_off(accel) {
    let Some(files) = linux_guest() else { return };
    let args = LinuxGuest::new(&files, "console=ttyAMA0 earlycon=pl011,0x20010000")
        .two_cpus()
        .args(["--serial", "stdio", "--accel", accel])
        .build();
    let run = vmapple(&refs(&args), Duration::from_secs(300));
    run.assert_line("VMAPPLE-GUEST: userspace up");
    // ID_AA64PFR0_EL1.GIC: the guest knows its GIC CPU interface is
    // system registers (the framework double's default is 0).
    run.assert_line("CPU features: detected: GIC system register CPU interface");
    run.assert_line("VMAPPLE-GUEST: cpus-online 0-1");
    run.assert_line("VMAPPLE-GUEST: psci PSCIv1.1 detected in firmware");
    run.assert_line("VMAPPLE-GUEST: gic GICv3: 256 SPIs implemented");
    run.assert_line("VMAPPLE-GUEST: ran on cpu 1");
    run.assert_line("VMAPPLE-GUEST: uart uart:PL011 rev");

    let ticks: Vec<u64> = run
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("VMAPPLE-GUEST: timer-irqs "))
        .expect("timer line")
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect();
    // A tickless kernel takes few interrupts while idle, but waking from
    // `sleep 1` needs at least one.
    assert!(
        ticks[1] > ticks[0],
        "timer interrupts during sleep: {ticks:?}"
    );

    run.assert_line("VMAPPLE-GUEST: powering off");
    assert_eq!(
        run.code, 0,
        "clean power-off exits 0; stderr:\n{}",
        run.stderr
    );
}
}
