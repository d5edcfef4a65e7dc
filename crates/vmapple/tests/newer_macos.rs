//! What macOS 13+ guests need from the machine and the CPU, checked by the
//! test firmware's `newmac` program (guest/firmware/newmac.c) on every
//! accelerator: loads and stores without an instruction syndrome on a
//! device register, Apple's pointer-authentication hypercalls, and the
//! `avp,rtc` clock.

#[macro_use]
mod common;

use std::time::Duration;

use common::{firmware_dir, vmapple};

/// The forms in guest/firmware/forms.S, in the order the program runs them.
const FORMS: &[&str] = &[
    "ldr_x",
    "str_w_pre",
    "str_x_post",
    "ldr_w_pre",
    "ldr_x_post",
    "strb_post",
    "strh_pre",
    "ldrb_pre",
    "ldrh_post",
    "ldrsb_x_post",
    "ldrsb_w_pre",
    "ldrsh_x_pre",
    "ldrsh_w_post",
    "ldrsw_post",
    "ldr_x_reg_lsl",
    "ldr_w_reg_sxtw",
    "strb_reg",
    "ldrsh_reg_uxtw",
    "str_x_reg_sxtx",
    "ldp_x",
    "ldp_w_pre",
    "ldp_x_post",
    "stp_x",
    "stp_w_pre",
    "stp_x_post",
    "ldpsw",
    "ldnp_x",
    "stnp_w",
    "ldr_b_post",
    "str_h_pre",
    "ldr_s",
    "str_d_post",
    "ldr_q_pre",
    "str_q",
    "ldr_d_reg",
    "ldp_s",
    "ldp_d_pre",
    "stp_q_post",
    "ldp_q",
    "stp_d",
];

const CHECKS: &[&str] = &[
    "hvc-nop",
    "hvc-set-initial-state",
    "hvc-initial-keys",
    "hvc-get-default-keys",
    "pac-initial-keys",
    "hvc-set-a-keys",
    "pac-a-keys-changed",
    "pac-b-key-kept",
    "hvc-set-b-keys",
    "pac-b-keys-changed",
    "hvc-set-g-key",
    "pac-g-key-changed",
    "hvc-set-el0-diversifier",
    "hvc-set-el0-diversifier-at-el1",
    "hvc-unknown",
    "hvc-uid",
    "avp-rtc-id",
    "avp-rtc-epoch-us",
    "avp-rtc-matches-pl031",
    "avp-rtc-advances",
    "avp-rtc-halves",
];

each_accel! {
/// Every syndrome-less form leaves the same registers, writeback and
/// memory on a window of GIC priority bytes as on RAM, with the MMU off
/// and on; the hypercalls load the key registers and signed pointers
/// authenticate with them; `avp,rtc` answers iBoot's probe and counts
/// microseconds.
fn newer_macos_guest_contract(accel) {
    let firmware = firmware_dir().join("newmac-vmapple.bin");
    let run = vmapple(
        &[
            "run",
            "--firmware",
            firmware.to_str().unwrap(),
            "--cpus",
            "1",
            "--memory",
            "256M",
            "--accel",
            accel,
        ],
        Duration::from_secs(120),
    );
    for phase in ["", "-mmu"] {
        for form in FORMS {
            run.assert_line(&format!("PASS mmio-{form}{phase}\r\n"));
        }
    }
    for check in CHECKS {
        run.assert_line(&format!("PASS {check}\r\n"));
    }
    assert!(!run.stdout.contains("FAIL"), "{}", run.stdout);
    run.assert_line("ALL CHECKS PASSED");
    assert_eq!(run.code, 0, "SYSTEM_OFF exits 0; stderr:\n{}", run.stderr);
}
}
