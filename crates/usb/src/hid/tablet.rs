//! USB HID tablet (absolute pointer), the counterpart of QEMU's
//! `usb-tablet`.
//!
//! Not a boot device (interface subclass 0, protocol 0): absolute
//! coordinates have no boot-mouse form. Its 6-byte report is
//! `buttons, X (LE16), Y (LE16), wheel`: five buttons, X and Y absolute in
//! 0..=32767 (Generic Desktop / Pointer), and a relative wheel in -127..=127.

use super::{
    ControlResult, HidCore, HidIdentity, HidOutcome, InputEvent, SavedDevice, SetupPacket,
    TransferResult, UsbDevice, UsbSpeed,
};

/// Largest coordinate on either axis.
pub const TABLET_MAX: u16 = 0x7fff;

/// Report descriptor: Generic Desktop Mouse application holding a Pointer
/// with absolute X/Y, five buttons and a relative wheel.
pub const TABLET_REPORT_DESCRIPTOR: [u8; 74] = [
    0x05, 0x01, // Usage Page (Generic Desktop)
    0x09, 0x02, // Usage (Mouse)
    0xa1, 0x01, // Collection (Application)
    0x09, 0x01, //   Usage (Pointer)
    0xa1, 0x00, //   Collection (Physical)
    0x05, 0x09, //     Usage Page (Button)
    0x19, 0x01, //     Usage Minimum (1)
    0x29, 0x05, //     Usage Maximum (5)
    0x15, 0x00, //     Logical Minimum (0)
    0x25, 0x01, //     Logical Maximum (1)
    0x95, 0x05, //     Report Count (5)
    0x75, 0x01, //     Report Size (1)
    0x81, 0x02, //     Input (Data, Variable, Absolute)
    0x95, 0x01, //     Report Count (1)
    0x75, 0x03, //     Report Size (3)
    0x81, 0x01, //     Input (Constant): padding
    0x05, 0x01, //     Usage Page (Generic Desktop)
    0x09, 0x30, //     Usage (X)
    0x09, 0x31, //     Usage (Y)
    0x15, 0x00, //     Logical Minimum (0)
    0x26, 0xff, 0x7f, // Logical Maximum (32767)
    0x35, 0x00, //     Physical Minimum (0)
    0x46, 0xff, 0x7f, // Physical Maximum (32767)
    0x75, 0x10, //     Report Size (16)
    0x95, 0x02, //     Report Count (2)
    0x81, 0x02, //     Input (Data, Variable, Absolute)
    0x05, 0x01, //     Usage Page (Generic Desktop)
    0x09, 0x38, //     Usage (Wheel)
    0x15, 0x81, //     Logical Minimum (-127)
    0x25, 0x7f, //     Logical Maximum (127)
    0x35, 0x00, //     Physical Minimum (0)
    0x45, 0x00, //     Physical Maximum (0)
    0x75, 0x08, //     Report Size (8)
    0x95, 0x01, //     Report Count (1)
    0x81, 0x06, //     Input (Data, Variable, Relative)
    0xc0, //   End Collection
    0xc0, // End Collection
];

static IDENTITY: HidIdentity = HidIdentity {
    product: "QEMU USB Tablet",
    serial: "28754",
    subclass: 0,
    protocol: 0,
    report_descriptor: &TABLET_REPORT_DESCRIPTOR,
    report_len: 6,
    boot: false,
    interval: 4,
    config_name: "HID Tablet",
};

/// The emulated tablet.
pub struct UsbTablet {
    core: HidCore,
    x: u16,
    y: u16,
    buttons: u8,
}

impl Default for UsbTablet {
    fn default() -> Self {
        Self::new()
    }
}

impl UsbTablet {
    pub fn new() -> Self {
        Self {
            core: HidCore::new(&IDENTITY),
            x: 0,
            y: 0,
            buttons: 0,
        }
    }

    fn queue(&mut self, wheel: i8) {
        let [xl, xh] = self.x.to_le_bytes();
        let [yl, yh] = self.y.to_le_bytes();
        let report = vec![self.buttons, xl, xh, yl, yh, wheel as u8];
        // Merging into the newest queued report keeps its wheel movement.
        self.core.push_report(report, |old, new| {
            let sum = (old[5] as i8).saturating_add(new[5] as i8).clamp(-127, 127);
            new[5] = sum as u8;
        });
        // The wheel is relative: GET_REPORT and idle repeats must not
        // replay the movement.
        self.core.current_mut()[5] = 0;
    }
}

impl UsbDevice for UsbTablet {
    fn speed(&self) -> UsbSpeed {
        UsbSpeed::High
    }

    fn reset(&mut self) {
        self.core.reset();
    }

    fn control(&mut self, setup: &SetupPacket, data_out: &[u8]) -> ControlResult {
        match self.core.control(setup, data_out) {
            HidOutcome::Done(r) => r,
            // Input reports only.
            HidOutcome::SetReport(..) | HidOutcome::GetReport(_) => ControlResult::Stall,
        }
    }

    fn interrupt_in(&mut self, endpoint: u8, buf: &mut [u8]) -> TransferResult {
        self.core.interrupt_in(endpoint, buf)
    }

    fn handle_input(&mut self, event: &InputEvent) -> bool {
        match *event {
            InputEvent::PointerAbs { x, y } => {
                self.x = x.min(TABLET_MAX);
                self.y = y.min(TABLET_MAX);
                self.queue(0);
            }
            InputEvent::Buttons(b) => {
                self.buttons = b & 0x1f;
                self.queue(0);
            }
            InputEvent::Wheel(w) => self.queue(w.max(-127)),
            InputEvent::Key { .. } => return false,
        }
        true
    }

    fn remote_wakeup_enabled(&self) -> bool {
        self.core.remote_wakeup()
    }

    fn save_state(&self) -> Option<SavedDevice> {
        Some(SavedDevice::Tablet {
            hid: self.core.save(),
            x: self.x,
            y: self.y,
            buttons: self.buttons,
        })
    }

    fn restore_state(&mut self, saved: &SavedDevice) -> Result<(), String> {
        let SavedDevice::Tablet { hid, x, y, buttons } = saved else {
            return Err("not a tablet's state".into());
        };
        self.core.check(hid)?;
        if *x > TABLET_MAX || *y > TABLET_MAX || buttons & !0x1f != 0 {
            return Err(format!("pointer at ({x}, {y}), buttons {buttons:#x}"));
        }
        self.core.restore(hid);
        self.x = *x;
        self.y = *y;
        self.buttons = *buttons;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hid::{REQ_GET_DESCRIPTOR, REQ_SET_CONFIGURATION};

    fn setup(request_type: u8, request: u8, value: u16, index: u16, length: u16) -> SetupPacket {
        SetupPacket {
            request_type,
            request,
            value,
            index,
            length,
        }
    }

    fn next(t: &mut UsbTablet) -> Option<[u8; 6]> {
        let mut buf = [0u8; 6];
        match t.interrupt_in(1, &mut buf) {
            TransferResult::Data(6) => Some(buf),
            TransferResult::Nak => None,
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn reports_absolute_position_buttons_and_wheel() {
        let mut t = UsbTablet::new();
        t.control(&setup(0, REQ_SET_CONFIGURATION, 1, 0, 0), &[]);
        t.handle_input(&InputEvent::PointerAbs {
            x: 0x1234,
            y: 0xffff,
        });
        t.handle_input(&InputEvent::Buttons(0x05));
        t.handle_input(&InputEvent::Wheel(-3));
        assert_eq!(next(&mut t), Some([0, 0x34, 0x12, 0xff, 0x7f, 0]));
        assert_eq!(next(&mut t), Some([5, 0x34, 0x12, 0xff, 0x7f, 0]));
        assert_eq!(next(&mut t), Some([5, 0x34, 0x12, 0xff, 0x7f, 0xfd]));
        assert_eq!(next(&mut t), None);
        assert!(!t.handle_input(&InputEvent::Key {
            usage: 4,
            pressed: true
        }));
    }

    #[test]
    fn full_queue_merges_wheel_movement() {
        let mut t = UsbTablet::new();
        t.control(&setup(0, REQ_SET_CONFIGURATION, 1, 0, 0), &[]);
        for _ in 0..crate::hid::REPORT_QUEUE_LEN {
            t.handle_input(&InputEvent::PointerAbs { x: 1, y: 1 });
        }
        t.handle_input(&InputEvent::Wheel(100));
        t.handle_input(&InputEvent::Wheel(100));
        let mut last = None;
        while let Some(r) = next(&mut t) {
            last = Some(r);
        }
        assert_eq!(last.unwrap()[5], 127, "saturated, not lost or wrapped");
    }

    #[test]
    fn descriptors_name_an_absolute_pointer_and_boot_requests_stall() {
        let mut t = UsbTablet::new();
        let ControlResult::Ok(cfg) =
            t.control(&setup(0x80, REQ_GET_DESCRIPTOR, 0x0200, 0, 255), &[])
        else {
            panic!("stalled")
        };
        assert_eq!(&cfg[9 + 5..9 + 8], &[3, 0, 0]);
        assert_eq!(
            u16::from_le_bytes([cfg[18 + 7], cfg[18 + 8]]) as usize,
            TABLET_REPORT_DESCRIPTOR.len()
        );
        assert_eq!(
            t.control(&setup(0x81, REQ_GET_DESCRIPTOR, 0x2200, 0, 255), &[]),
            ControlResult::Ok(TABLET_REPORT_DESCRIPTOR.to_vec())
        );
        assert_eq!(
            t.control(&setup(0xa1, 0x03, 0, 0, 1), &[]),
            ControlResult::Stall
        );
    }
}
