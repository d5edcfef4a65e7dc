//! What macOS 13+ guests need from the machine and the CPU, checked by the
//! test firmware's `newmac` program (guest/firmware/newmac.c) on every
//! accelerator: loads and stores without an instruction syndrome on a
//! device register, Apple's pointer-authentication hypercalls, and the
//! `avp,rtc` clock.

#[macro_use]
mod common;

use machine::adt::{im4p, Node};
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

fn le64(values: &[u64]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// `vmapple inspect-ipsw` on a device tree in Apple's format, wrapped in an
/// IMG4 payload as in an IPSW: the `avp,rtc` where the published tree has
/// it matches vmapple's; a UART somewhere else is flagged; a truncated file
/// is one clear error.
#[test]
fn inspect_ipsw_compares_apple_device_tree_with_the_machine() {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("inspect-ipsw");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let interrupts: Vec<u8> = [51u32, 0].iter().flat_map(|v| v.to_le_bytes()).collect();
    let rtc = Node::new(
        &[
            ("name", b"avp-rtc\0"),
            ("compatible", b"avp,rtc\0"),
            ("reg", &le64(&[0x2024_0000, 0x4000])),
            ("interrupts", &interrupts),
        ],
        Vec::new(),
    );
    let uart = Node::new(
        &[
            ("name", b"uart0\0"),
            ("reg", &le64(&[0x1002_0000, 0x1000])),
            ("interrupts", &33u32.to_le_bytes()),
        ],
        Vec::new(),
    );
    let ranges = le64(&[
        0x1000_0000,
        0x2000_0000,
        0x1000_0000,
        0x2000_0000,
        0x3000_0000,
        0x1000_0000,
    ]);
    let arm_io = Node::new(
        &[("name", b"arm-io\0"), ("ranges", &ranges)],
        vec![rtc, uart],
    );
    let tree = Node::new(&[("name", b"device-tree\0")], vec![arm_io]).to_bytes();
    let file = im4p("dtre", "DeviceTree", &tree);
    let path = dir.join("DeviceTree.vma2ap.im4p");
    std::fs::write(&path, &file).unwrap();

    let run = vmapple(
        &["inspect-ipsw", path.to_str().unwrap()],
        Duration::from_secs(30),
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    let line = |node: &str| {
        run.stdout
            .lines()
            .find(|l| l.starts_with(node))
            .unwrap_or_else(|| panic!("no {node} in:\n{}", run.stdout))
            .to_owned()
    };
    let rtc = line("arm-io/avp-rtc");
    assert!(
        rtc.contains("0x30240000") && rtc.ends_with("avp-rtc at 0x30240000, INTID 51: same"),
        "{rtc}"
    );
    let uart = line("arm-io/uart0");
    assert!(
        uart.contains("0x20020000") && uart.ends_with("DIFFERS"),
        "{uart}"
    );

    let cut = dir.join("cut.bin");
    std::fs::write(&cut, &tree[..tree.len() - 6]).unwrap();
    let run = vmapple(
        &["inspect-ipsw", cut.to_str().unwrap()],
        Duration::from_secs(30),
    );
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(
        run.stderr
            .contains("not a usable device tree: the file ends inside"),
        "{}",
        run.stderr
    );
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
}
