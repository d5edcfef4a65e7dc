//! XHCI with the USB keyboard and tablet, proved against Debian's kernel
//! (xhci-pci, usbhid, hid-generic, evdev) on the software CPU: the guest
//! lists the devices with their IDs, key presses and absolute pointer
//! moves sent through the control socket arrive in the guest's evdev, and
//! the control socket's powerdown presses the GPIO power button, which the
//! guest answers by powering off.
//!
//! It runs twice: with `--msi off` (QEMU's machine, §7.5), the INTx path of
//! §7.6, where every event must reach ring 0 and raise INTA (Linux uses one
//! interrupter without MSI; the ring-2 routing itself is covered by the
//! XHCI unit tests); and with `--msi on`, where the controller's MSI-X
//! vectors carry the events and the guest's /proc/interrupts shows them.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{ctl, linux_guest_devices, refs, vmapple_with_triggers, Action, LinuxGuest, Trigger};

/// Linux's evdev codes.
const EV_KEY: u32 = 1;
const EV_ABS: u32 = 3;
const KEY_A: u32 = 30;
const KEY_LEFTSHIFT: u32 = 42;
const BTN_LEFT: u32 = 272;
const ABS_X: u32 = 0;
const ABS_Y: u32 = 1;

#[test]
fn keys_and_pointer_from_the_control_socket_reach_linux_evdev() {
    input_reaches_evdev("off");
}

#[test]
fn with_msi_on_input_reaches_evdev_through_msix() {
    input_reaches_evdev("on");
}

fn input_reaches_evdev(msi: &str) {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("usb-input-msi-{msi}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("control.sock");
    let Some(files) = linux_guest_devices() else {
        return;
    };
    let s = socket.clone();
    let args = LinuxGuest::new(
        &files,
        "console=ttyAMA0 quiet vmapple.usb=3 vmapple.powerkey vmapple.irqs",
    )
    .two_cpus()
    .args(["--net", "none"])
    .control(&socket)
    .args(["--msi", msi])
    .build();
    let run = vmapple_with_triggers(
        &refs(&args),
        Duration::from_secs(300),
        &[Trigger {
            when_console_shows: "waiting for the power button",
            action: Action::Call(Box::new(move || {
                assert!(ctl(&s, &["status"]).contains("running"));
                ctl(&s, &["send-keys", "shift", "a"]);
                ctl(&s, &["pointer", "1000", "2000", "left"]);
                // Let the guest print the events before it powers off.
                std::thread::sleep(Duration::from_secs(2));
                ctl(&s, &["powerdown"]);
            })),
        }],
    );
    assert_eq!(run.code, 0, "guest powered off; stderr:\n{}", run.stderr);

    let usb: Vec<&str> = run
        .stdout
        .lines()
        .filter_map(|l| l.trim().strip_prefix("VMAPPLE-GUEST: usb "))
        .collect();
    for needle in [
        "0627:0001 QEMU USB Keyboard",
        "0627:0001 QEMU USB Tablet",
        "1d6b:0002 xHCI Host Controller",
        "1d6b:0003 xHCI Host Controller",
    ] {
        assert!(usb.iter().any(|l| l.contains(needle)), "{needle}: {usb:?}");
    }
    run.assert_line("input event1 QEMU QEMU USB Keyboard");
    run.assert_line("input event2 QEMU QEMU USB Tablet");

    let events: Vec<(String, u32, u32, i64)> = run
        .stdout
        .lines()
        .filter_map(|l| l.trim().strip_prefix("VMAPPLE-GUEST: event "))
        .filter_map(|l| {
            let f: Vec<&str> = l.rsplitn(4, ' ').collect();
            Some((
                f.get(3)?.to_string(),
                f[2].parse().ok()?,
                f[1].parse().ok()?,
                f[0].parse().ok()?,
            ))
        })
        .collect();
    let keyboard: Vec<(u32, u32, i64)> = events
        .iter()
        .filter(|e| e.0.ends_with("USB Keyboard") && e.1 == EV_KEY)
        .map(|e| (e.1, e.2, e.3))
        .collect();
    assert_eq!(
        keyboard,
        vec![
            (EV_KEY, KEY_LEFTSHIFT, 1),
            (EV_KEY, KEY_A, 1),
            (EV_KEY, KEY_A, 0),
            (EV_KEY, KEY_LEFTSHIFT, 0),
        ],
        "shift+a pressed together, released in reverse: {events:?}"
    );
    let tablet = |kind: u32, code: u32| {
        events
            .iter()
            .filter(|e| e.0.ends_with("USB Tablet") && e.1 == kind && e.2 == code)
            .map(|e| e.3)
            .collect::<Vec<_>>()
    };
    assert_eq!(tablet(EV_ABS, ABS_X), vec![1000], "{events:?}");
    assert_eq!(tablet(EV_ABS, ABS_Y), vec![2000], "{events:?}");
    assert_eq!(tablet(EV_KEY, BTN_LEFT), vec![1], "{events:?}");
    run.assert_line("VMAPPLE-GUEST: power button pressed");

    // How the events were signalled: "irq NAME COUNT HWIRQ" per MSI.
    let xhci_msis: Vec<u64> = run
        .stdout
        .lines()
        .filter_map(|l| l.trim().strip_prefix("VMAPPLE-GUEST: irq xhci_hcd "))
        .filter_map(|l| l.split(' ').next()?.parse().ok())
        .collect();
    if msi == "on" {
        assert!(
            xhci_msis.iter().sum::<u64>() > 0,
            "events through MSI-X vectors: {xhci_msis:?}\n{}",
            run.stdout
        );
    } else {
        assert!(xhci_msis.is_empty(), "INTx only: {xhci_msis:?}");
    }
}
