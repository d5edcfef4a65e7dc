//! USB HID boot keyboard, the counterpart of QEMU's `usb-kbd`.
//!
//! Interface class 3, subclass 1 (boot), protocol 1 (keyboard); its report
//! descriptor is the boot keyboard layout of HID 1.11 Appendix B.1, so the
//! report protocol and the boot protocol carry the same 8-byte report:
//! modifier bits, a reserved byte, six key usages. More than six ordinary
//! keys down report ErrorRollOver (usage 0x01) in all six slots. The host's
//! SET_REPORT(Output) sets the LED byte (bit 0 Num Lock, 1 Caps Lock,
//! 2 Scroll Lock, 3 Compose, 4 Kana).

use super::{
    ControlResult, HidCore, HidIdentity, HidOutcome, InputEvent, SavedDevice, SetupPacket,
    TransferResult, UsbDevice, UsbSpeed, REPORT_TYPE_OUTPUT,
};

/// Boot keyboard report descriptor (HID 1.11 Appendix B.1).
pub const KEYBOARD_REPORT_DESCRIPTOR: [u8; 63] = [
    0x05, 0x01, // Usage Page (Generic Desktop)
    0x09, 0x06, // Usage (Keyboard)
    0xa1, 0x01, // Collection (Application)
    0x05, 0x07, //   Usage Page (Key Codes)
    0x19, 0xe0, //   Usage Minimum (224)
    0x29, 0xe7, //   Usage Maximum (231)
    0x15, 0x00, //   Logical Minimum (0)
    0x25, 0x01, //   Logical Maximum (1)
    0x75, 0x01, //   Report Size (1)
    0x95, 0x08, //   Report Count (8)
    0x81, 0x02, //   Input (Data, Variable, Absolute): modifier byte
    0x95, 0x01, //   Report Count (1)
    0x75, 0x08, //   Report Size (8)
    0x81, 0x01, //   Input (Constant): reserved byte
    0x95, 0x05, //   Report Count (5)
    0x75, 0x01, //   Report Size (1)
    0x05, 0x08, //   Usage Page (LEDs)
    0x19, 0x01, //   Usage Minimum (1)
    0x29, 0x05, //   Usage Maximum (5)
    0x91, 0x02, //   Output (Data, Variable, Absolute): LED report
    0x95, 0x01, //   Report Count (1)
    0x75, 0x03, //   Report Size (3)
    0x91, 0x01, //   Output (Constant): LED padding
    0x95, 0x06, //   Report Count (6)
    0x75, 0x08, //   Report Size (8)
    0x15, 0x00, //   Logical Minimum (0)
    0x25, 0x65, //   Logical Maximum (101)
    0x05, 0x07, //   Usage Page (Key Codes)
    0x19, 0x00, //   Usage Minimum (0)
    0x29, 0x65, //   Usage Maximum (101)
    0x81, 0x00, //   Input (Data, Array): key array
    0xc0, // End Collection
];

static IDENTITY: HidIdentity = HidIdentity {
    product: "QEMU USB Keyboard",
    serial: "68284",
    subclass: 1,
    protocol: 1,
    report_descriptor: &KEYBOARD_REPORT_DESCRIPTOR,
    report_len: 8,
    boot: true,
    interval: 7,
    config_name: "HID Keyboard",
};

/// Keys a boot report can name at once.
const ROLLOVER: usize = 6;
const USAGE_ERROR_ROLLOVER: u8 = 0x01;

/// The emulated keyboard.
pub struct UsbKeyboard {
    core: HidCore,
    modifiers: u8,
    /// Non-modifier keys down, in press order (at most 256 distinct usages).
    keys: Vec<u8>,
    leds: u8,
}

impl Default for UsbKeyboard {
    fn default() -> Self {
        Self::new()
    }
}

impl UsbKeyboard {
    pub fn new() -> Self {
        Self {
            core: HidCore::new(&IDENTITY),
            modifiers: 0,
            keys: Vec::new(),
            leds: 0,
        }
    }

    /// The LED state the host last set.
    pub fn leds(&self) -> u8 {
        self.leds
    }

    fn report(&self) -> Vec<u8> {
        let mut r = vec![self.modifiers, 0, 0, 0, 0, 0, 0, 0];
        if self.keys.len() > ROLLOVER {
            r[2..].fill(USAGE_ERROR_ROLLOVER);
        } else {
            r[2..2 + self.keys.len()].copy_from_slice(&self.keys);
        }
        r
    }

    fn key(&mut self, usage: u8, pressed: bool) {
        if (0xe0..=0xe7).contains(&usage) {
            let bit = 1 << (usage - 0xe0);
            if pressed {
                self.modifiers |= bit;
            } else {
                self.modifiers &= !bit;
            }
        } else if usage != 0 {
            let pos = self.keys.iter().position(|&k| k == usage);
            match (pressed, pos) {
                (true, None) => self.keys.push(usage),
                (false, Some(i)) => {
                    self.keys.remove(i);
                }
                _ => return, // repeat of the same state: nothing changed
            }
        } else {
            return;
        }
        let report = self.report();
        // Each report is a full snapshot, so a full queue keeps the newest.
        self.core.push_report(report, |_, _| {});
    }
}

impl UsbDevice for UsbKeyboard {
    fn speed(&self) -> UsbSpeed {
        UsbSpeed::High
    }

    fn reset(&mut self) {
        self.core.reset();
    }

    fn control(&mut self, setup: &SetupPacket, data_out: &[u8]) -> ControlResult {
        match self.core.control(setup, data_out) {
            HidOutcome::Done(r) => r,
            HidOutcome::SetReport(REPORT_TYPE_OUTPUT, data) => match data.first() {
                Some(&leds) => {
                    self.leds = leds & 0x1f;
                    ControlResult::Ok(Vec::new())
                }
                None => ControlResult::Stall,
            },
            HidOutcome::SetReport(..) => ControlResult::Stall,
            HidOutcome::GetReport(REPORT_TYPE_OUTPUT) => ControlResult::Ok(vec![self.leds]),
            HidOutcome::GetReport(_) => ControlResult::Stall,
        }
    }

    fn interrupt_in(&mut self, endpoint: u8, buf: &mut [u8]) -> TransferResult {
        self.core.interrupt_in(endpoint, buf)
    }

    fn handle_input(&mut self, event: &InputEvent) -> bool {
        match *event {
            InputEvent::Key { usage, pressed } => {
                self.key(usage, pressed);
                true
            }
            _ => false,
        }
    }

    fn remote_wakeup_enabled(&self) -> bool {
        self.core.remote_wakeup()
    }

    fn save_state(&self) -> Option<SavedDevice> {
        Some(SavedDevice::Keyboard {
            hid: self.core.save(),
            modifiers: self.modifiers,
            keys: self.keys.clone(),
            leds: self.leds,
        })
    }

    fn restore_state(&mut self, saved: &SavedDevice) -> Result<(), String> {
        let SavedDevice::Keyboard {
            hid,
            modifiers,
            keys,
            leds,
        } = saved
        else {
            return Err("not a keyboard's state".into());
        };
        self.core.check(hid)?;
        // As key presses leave them: distinct usages, none a modifier.
        let distinct = keys.iter().enumerate().all(|(i, k)| !keys[..i].contains(k));
        if !distinct || keys.iter().any(|&k| k == 0 || (0xe0..=0xe7).contains(&k)) {
            return Err(format!("keys down {keys:?}"));
        }
        if leds & !0x1f != 0 {
            return Err(format!("LEDs {leds:#x}"));
        }
        self.core.restore(hid);
        self.modifiers = *modifiers;
        self.keys.clone_from(keys);
        self.leds = *leds;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hid::{HID_SET_PROTOCOL, HID_SET_REPORT, REQ_GET_DESCRIPTOR, REQ_SET_CONFIGURATION};

    fn setup(request_type: u8, request: u8, value: u16, index: u16, length: u16) -> SetupPacket {
        SetupPacket {
            request_type,
            request,
            value,
            index,
            length,
        }
    }

    fn configured() -> UsbKeyboard {
        let mut k = UsbKeyboard::new();
        assert_eq!(
            k.control(&setup(0, REQ_SET_CONFIGURATION, 1, 0, 0), &[]),
            ControlResult::Ok(vec![])
        );
        k
    }

    fn next_report(k: &mut UsbKeyboard) -> Option<[u8; 8]> {
        let mut buf = [0u8; 8];
        match k.interrupt_in(1, &mut buf) {
            TransferResult::Data(8) => Some(buf),
            TransferResult::Nak => None,
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn descriptors_describe_a_boot_keyboard() {
        let mut k = UsbKeyboard::new();
        let ControlResult::Ok(dev) =
            k.control(&setup(0x80, REQ_GET_DESCRIPTOR, 0x0100, 0, 18), &[])
        else {
            panic!("stalled")
        };
        assert_eq!(dev.len(), 18);
        assert_eq!(&dev[8..12], &[0x27, 0x06, 0x01, 0x00]);
        let ControlResult::Ok(cfg) =
            k.control(&setup(0x80, REQ_GET_DESCRIPTOR, 0x0200, 0, 255), &[])
        else {
            panic!("stalled")
        };
        assert_eq!(cfg.len(), 34);
        assert_eq!(u16::from_le_bytes([cfg[2], cfg[3]]), 34);
        assert_eq!(
            &cfg[9 + 5..9 + 8],
            &[3, 1, 1],
            "HID boot keyboard interface"
        );
        assert_eq!(cfg[18 + 1], 0x21);
        assert_eq!(&cfg[27..], &[7, 5, 0x81, 3, 8, 0, 7]);
        let ControlResult::Ok(rd) =
            k.control(&setup(0x81, REQ_GET_DESCRIPTOR, 0x2200, 0, 255), &[])
        else {
            panic!("stalled")
        };
        assert_eq!(rd, KEYBOARD_REPORT_DESCRIPTOR.to_vec());
        let ControlResult::Ok(s) =
            k.control(&setup(0x80, REQ_GET_DESCRIPTOR, 0x0302, 0x409, 255), &[])
        else {
            panic!("stalled")
        };
        let text: Vec<u16> = s[2..]
            .chunks(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        assert_eq!(String::from_utf16(&text).unwrap(), "QEMU USB Keyboard");
        assert_eq!(
            k.control(&setup(0x80, REQ_GET_DESCRIPTOR, 0x0309, 0, 255), &[]),
            ControlResult::Stall
        );
    }

    #[test]
    fn keys_and_modifiers_make_boot_reports() {
        let mut k = configured();
        assert_eq!(next_report(&mut k), None);
        k.handle_input(&InputEvent::Key {
            usage: 0xe1,
            pressed: true,
        });
        k.handle_input(&InputEvent::Key {
            usage: 0x04,
            pressed: true,
        });
        k.handle_input(&InputEvent::Key {
            usage: 0x04,
            pressed: false,
        });
        assert_eq!(next_report(&mut k), Some([0x02, 0, 0, 0, 0, 0, 0, 0]));
        assert_eq!(next_report(&mut k), Some([0x02, 0, 0x04, 0, 0, 0, 0, 0]));
        assert_eq!(next_report(&mut k), Some([0x02, 0, 0, 0, 0, 0, 0, 0]));
        assert_eq!(next_report(&mut k), None);
    }

    #[test]
    fn input_before_configuration_is_not_replayed() {
        let mut k = UsbKeyboard::new();
        k.handle_input(&InputEvent::Key {
            usage: 0x04,
            pressed: true,
        });
        k.control(&setup(0, REQ_SET_CONFIGURATION, 1, 0, 0), &[]);
        assert_eq!(next_report(&mut k), None);
        // GET_REPORT still tells the current state.
        assert_eq!(
            k.control(&setup(0xa1, 0x01, 0x0100, 0, 8), &[]),
            ControlResult::Ok(vec![0, 0, 0x04, 0, 0, 0, 0, 0])
        );
    }

    #[test]
    fn seven_keys_roll_over() {
        let mut k = configured();
        for usage in 4..11 {
            k.handle_input(&InputEvent::Key {
                usage,
                pressed: true,
            });
        }
        let mut last = None;
        while let Some(r) = next_report(&mut k) {
            last = Some(r);
        }
        assert_eq!(last, Some([0, 0, 1, 1, 1, 1, 1, 1]));
    }

    #[test]
    fn a_flood_of_input_is_bounded_and_keeps_the_newest_state() {
        let mut k = configured();
        for i in 0..1000u32 {
            k.handle_input(&InputEvent::Key {
                usage: 4,
                pressed: i % 2 == 0,
            });
        }
        k.handle_input(&InputEvent::Key {
            usage: 5,
            pressed: true,
        });
        let mut n = 0;
        let mut last = None;
        while let Some(r) = next_report(&mut k) {
            n += 1;
            last = Some(r);
        }
        assert!(n <= crate::hid::REPORT_QUEUE_LEN);
        assert_eq!(last, Some([0, 0, 5, 0, 0, 0, 0, 0]));
    }

    #[test]
    fn leds_protocol_idle_and_remote_wakeup() {
        let mut k = configured();
        assert_eq!(
            k.control(&setup(0x21, HID_SET_REPORT, 0x0200, 0, 1), &[0x02]),
            ControlResult::Ok(vec![])
        );
        assert_eq!(k.leds(), 0x02);
        assert_eq!(
            k.control(&setup(0xa1, 0x01, 0x0200, 0, 1), &[]),
            ControlResult::Ok(vec![0x02])
        );
        assert_eq!(
            k.control(&setup(0xa1, 0x03, 0, 0, 1), &[]),
            ControlResult::Ok(vec![1])
        );
        k.control(&setup(0x21, HID_SET_PROTOCOL, 0, 0, 0), &[]);
        assert_eq!(
            k.control(&setup(0xa1, 0x03, 0, 0, 1), &[]),
            ControlResult::Ok(vec![0])
        );
        k.control(&setup(0x21, 0x0a, 0x7d00, 0, 0), &[]);
        assert_eq!(
            k.control(&setup(0xa1, 0x02, 0, 0, 1), &[]),
            ControlResult::Ok(vec![0x7d])
        );
        assert!(!k.remote_wakeup_enabled());
        k.control(&setup(0, 0x03, 1, 0, 0), &[]);
        assert!(k.remote_wakeup_enabled());
        assert_eq!(
            k.control(&setup(0x80, 0, 0, 0, 2), &[]),
            ControlResult::Ok(vec![2, 0])
        );
        k.handle_input(&InputEvent::Key {
            usage: 0x39,
            pressed: true,
        });
        assert_eq!(
            k.control(&setup(0xa1, 0x01, 0x0100, 0, 8), &[]),
            ControlResult::Ok(vec![0, 0, 0x39, 0, 0, 0, 0, 0])
        );
        k.reset();
        assert!(!k.remote_wakeup_enabled());
        assert_eq!(next_report(&mut k), None, "reset drops queued reports");
    }

    #[test]
    fn unknown_requests_stall() {
        let mut k = configured();
        for (rt, req) in [(0x80, 0xff), (0x21, 0x77), (0xc0, 0x06), (0x00, 0x09)] {
            assert_eq!(
                k.control(&setup(rt, req, 0x55, 0, 0), &[]),
                ControlResult::Stall
            );
        }
        assert_eq!(
            k.control(&setup(0x21, HID_SET_REPORT, 0x0200, 0, 0), &[]),
            ControlResult::Stall
        );
        assert_eq!(k.interrupt_in(2, &mut [0; 8]), TransferResult::Stall);
    }
}
