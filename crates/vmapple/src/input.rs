//! Keyboard and pointer input from the control socket to the USB
//! keyboard and tablet: QEMU's key names (QKeyCode, as QMP's `send-key`
//! takes them) turned into HID keyboard usages (HID Usage Tables, page
//! 0x07).

use bundle::control::Button;
use usb::{InputEvent, InputSink};

use crate::control::InputTarget;

/// The HID usage of a QKeyCode name, if a USB keyboard has that key.
pub fn hid_usage(name: &str) -> Option<u8> {
    let b = name.as_bytes();
    if let [c] = b {
        return match c {
            b'a'..=b'z' => Some(0x04 + (c - b'a')),
            b'1'..=b'9' => Some(0x1e + (c - b'1')),
            b'0' => Some(0x27),
            _ => None,
        };
    }
    if let Some(n) = name.strip_prefix("kp_").and_then(|d| d.parse::<u8>().ok()) {
        return match n {
            1..=9 => Some(0x59 + n - 1),
            0 => Some(0x62),
            _ => None,
        };
    }
    if let Some(n) = name.strip_prefix('f').and_then(|d| d.parse::<u8>().ok()) {
        return match n {
            1..=12 => Some(0x3a + n - 1),
            13..=24 => Some(0x68 + n - 13),
            _ => None,
        };
    }
    Some(match name {
        "ret" => 0x28,
        "esc" => 0x29,
        "backspace" => 0x2a,
        "tab" => 0x2b,
        "spc" => 0x2c,
        "minus" => 0x2d,
        "equal" => 0x2e,
        "bracket_left" => 0x2f,
        "bracket_right" => 0x30,
        "backslash" => 0x31,
        "semicolon" => 0x33,
        "apostrophe" => 0x34,
        "grave_accent" => 0x35,
        "comma" => 0x36,
        "dot" => 0x37,
        "slash" => 0x38,
        "caps_lock" => 0x39,
        "print" | "sysrq" => 0x46,
        "scroll_lock" => 0x47,
        "insert" => 0x49,
        "home" => 0x4a,
        "pgup" => 0x4b,
        "delete" => 0x4c,
        "end" => 0x4d,
        "pgdn" => 0x4e,
        "right" => 0x4f,
        "left" => 0x50,
        "down" => 0x51,
        "up" => 0x52,
        "num_lock" => 0x53,
        "kp_divide" => 0x54,
        "kp_multiply" | "asterisk" => 0x55,
        "kp_subtract" => 0x56,
        "kp_add" => 0x57,
        "kp_enter" => 0x58,
        "kp_decimal" => 0x63,
        "menu" => 0x65,
        "power" => 0x66,
        "kp_equals" => 0x67,
        "audiomute" => 0x7f,
        "volumeup" => 0x80,
        "volumedown" => 0x81,
        "ctrl" => 0xe0,
        "shift" => 0xe1,
        "alt" => 0xe2,
        "meta_l" => 0xe3,
        "ctrl_r" => 0xe4,
        "shift_r" => 0xe5,
        "alt_r" => 0xe6,
        "meta_r" => 0xe7,
        _ => return None,
    })
}

/// The USB keyboard and tablet as the control socket's input target.
pub struct UsbInput(pub InputSink);

impl UsbInput {
    fn send(&self, event: InputEvent) -> Result<(), String> {
        if self.0.send(event) {
            Ok(())
        } else {
            Err("the USB input device did not take the event (queue full or device gone)".into())
        }
    }
}

impl InputTarget for UsbInput {
    fn send_keys(&self, keys: &[String]) -> Result<(), String> {
        let usages = keys
            .iter()
            .map(|k| hid_usage(k).ok_or_else(|| format!("a USB keyboard has no key {k:?}")))
            .collect::<Result<Vec<u8>, String>>()?;
        for &usage in &usages {
            self.send(InputEvent::Key {
                usage,
                pressed: true,
            })?;
        }
        for &usage in usages.iter().rev() {
            self.send(InputEvent::Key {
                usage,
                pressed: false,
            })?;
        }
        Ok(())
    }

    fn pointer(&self, x: u16, y: u16, buttons: &[Button]) -> Result<(), String> {
        let mask = buttons.iter().fold(0u8, |m, b| {
            m | match b {
                Button::Left => 1,
                Button::Right => 2,
                Button::Middle => 4,
            }
        });
        self.send(InputEvent::PointerAbs { x, y })?;
        self.send(InputEvent::Buttons(mask))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_names_map_to_hid_usages() {
        assert_eq!(hid_usage("a"), Some(0x04));
        assert_eq!(hid_usage("z"), Some(0x1d));
        assert_eq!(hid_usage("1"), Some(0x1e));
        assert_eq!(hid_usage("0"), Some(0x27));
        assert_eq!(hid_usage("ret"), Some(0x28));
        assert_eq!(hid_usage("f1"), Some(0x3a));
        assert_eq!(hid_usage("f12"), Some(0x45));
        assert_eq!(hid_usage("f13"), Some(0x68));
        assert_eq!(hid_usage("kp_0"), Some(0x62));
        assert_eq!(hid_usage("shift"), Some(0xe1));
        assert_eq!(hid_usage("meta_r"), Some(0xe7));
        assert_eq!(hid_usage("f25"), None);
        assert_eq!(
            hid_usage("sleep"),
            None,
            "a system-control key, not a keyboard one"
        );
        assert_eq!(hid_usage(""), None);
    }

    #[test]
    fn every_key_name_the_protocol_accepts_but_system_keys_has_a_usage() {
        let mut names: Vec<String> = ('a'..='z').chain('0'..='9').map(String::from).collect();
        names.extend((1..=24).map(|n| format!("f{n}")));
        names.extend((0..=9).map(|n| format!("kp_{n}")));
        for name in names {
            assert!(bundle::control::is_key_name(&name), "{name}");
            assert!(hid_usage(&name).is_some(), "{name}");
        }
    }
}
