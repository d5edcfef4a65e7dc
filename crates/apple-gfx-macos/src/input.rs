//! Host keyboard and mouse input from a display window, translated for the
//! guest's USB keyboard and tablet.
//!
//! AppKit reports keys as virtual key codes (the `kVK_*` values of Carbon's
//! `Events.h`, which name physical key positions on an ANSI/ISO keyboard)
//! and modifiers only as "something changed" (`flagsChanged:`); the guest
//! wants HID keyboard usages (HID Usage Tables, page 0x07) with explicit
//! presses and releases, and a tablet position in 0..=32767. The
//! translation is portable and tested here; the window's view
//! (`runloop`, macOS) only feeds it, into the display model's
//! [`display::InputSink`].

/// The HID usage of a macOS virtual key code; `None` for keys a USB
/// keyboard lacks (fn, the JIS and media keys we leave out).
pub fn hid_usage(keycode: u16) -> Option<u8> {
    Some(match keycode {
        0x00 => 0x04, // A
        0x0b => 0x05, // B
        0x08 => 0x06, // C
        0x02 => 0x07, // D
        0x0e => 0x08, // E
        0x03 => 0x09, // F
        0x05 => 0x0a, // G
        0x04 => 0x0b, // H
        0x22 => 0x0c, // I
        0x26 => 0x0d, // J
        0x28 => 0x0e, // K
        0x25 => 0x0f, // L
        0x2e => 0x10, // M
        0x2d => 0x11, // N
        0x1f => 0x12, // O
        0x23 => 0x13, // P
        0x0c => 0x14, // Q
        0x0f => 0x15, // R
        0x01 => 0x16, // S
        0x11 => 0x17, // T
        0x20 => 0x18, // U
        0x09 => 0x19, // V
        0x0d => 0x1a, // W
        0x07 => 0x1b, // X
        0x10 => 0x1c, // Y
        0x06 => 0x1d, // Z
        0x12 => 0x1e, // 1
        0x13 => 0x1f, // 2
        0x14 => 0x20, // 3
        0x15 => 0x21, // 4
        0x17 => 0x22, // 5
        0x16 => 0x23, // 6
        0x1a => 0x24, // 7
        0x1c => 0x25, // 8
        0x19 => 0x26, // 9
        0x1d => 0x27, // 0
        0x24 => 0x28, // Return
        0x35 => 0x29, // Escape
        0x33 => 0x2a, // Delete (backspace)
        0x30 => 0x2b, // Tab
        0x31 => 0x2c, // Space
        0x1b => 0x2d, // -
        0x18 => 0x2e, // =
        0x21 => 0x2f, // [
        0x1e => 0x30, // ]
        0x2a => 0x31, // backslash
        0x29 => 0x33, // ;
        0x27 => 0x34, // '
        0x32 => 0x35, // `
        0x2b => 0x36, // ,
        0x2f => 0x37, // .
        0x2c => 0x38, // /
        0x39 => 0x39, // Caps Lock
        0x7a => 0x3a, // F1
        0x78 => 0x3b, // F2
        0x63 => 0x3c, // F3
        0x76 => 0x3d, // F4
        0x60 => 0x3e, // F5
        0x61 => 0x3f, // F6
        0x62 => 0x40, // F7
        0x64 => 0x41, // F8
        0x65 => 0x42, // F9
        0x6d => 0x43, // F10
        0x67 => 0x44, // F11
        0x6f => 0x45, // F12
        0x72 => 0x49, // Help, where PC keyboards have Insert
        0x73 => 0x4a, // Home
        0x74 => 0x4b, // Page Up
        0x75 => 0x4c, // Forward Delete
        0x77 => 0x4d, // End
        0x79 => 0x4e, // Page Down
        0x7c => 0x4f, // Right
        0x7b => 0x50, // Left
        0x7d => 0x51, // Down
        0x7e => 0x52, // Up
        0x47 => 0x53, // keypad Clear, in Num Lock's place
        0x4b => 0x54, // keypad /
        0x43 => 0x55, // keypad *
        0x4e => 0x56, // keypad -
        0x45 => 0x57, // keypad +
        0x4c => 0x58, // keypad Enter
        0x53 => 0x59, // keypad 1
        0x54 => 0x5a, // keypad 2
        0x55 => 0x5b, // keypad 3
        0x56 => 0x5c, // keypad 4
        0x57 => 0x5d, // keypad 5
        0x58 => 0x5e, // keypad 6
        0x59 => 0x5f, // keypad 7
        0x5b => 0x60, // keypad 8
        0x5c => 0x61, // keypad 9
        0x52 => 0x62, // keypad 0
        0x41 => 0x63, // keypad .
        0x0a => 0x64, // ISO § key, the non-US backslash position
        0x6e => 0x65, // context menu
        0x51 => 0x67, // keypad =
        0x69 => 0x68, // F13
        0x6b => 0x69, // F14
        0x71 => 0x6a, // F15
        0x6a => 0x6b, // F16
        0x40 => 0x6c, // F17
        0x4f => 0x6d, // F18
        0x50 => 0x6e, // F19
        0x5a => 0x6f, // F20
        0x3b => 0xe0, // Control
        0x38 => 0xe1, // Shift
        0x3a => 0xe2, // Option
        0x37 => 0xe3, // Command
        0x3e => 0xe4, // right Control
        0x3c => 0xe5, // right Shift
        0x3d => 0xe6, // right Option
        0x36 => 0xe7, // right Command
        _ => return None,
    })
}

/// Turns `flagsChanged:` events into modifier presses and releases.
///
/// AppKit says which modifier key changed but, for keys that come in
/// left/right pairs, only whether the pair's flag is still set. So the
/// tracker remembers which keys it reported down: a change of a key it
/// holds is a release, otherwise a press; a cleared flag releases the key
/// whatever we thought (a release we missed, e.g. while the window was not
/// key, then heals).
#[derive(Debug, Default)]
pub struct Modifiers {
    /// HID usages 0xe0..=0xe7 currently reported down, bit per usage.
    down: u8,
}

impl Modifiers {
    /// `keycode` changed; `flag_set` is whether its modifier flag
    /// (Shift, Control, Option, Command or Caps Lock) is now set.
    pub fn changed(&mut self, keycode: u16, flag_set: bool) -> Vec<(u8, bool)> {
        let Some(usage) = hid_usage(keycode) else {
            return Vec::new();
        };
        if usage == 0x39 {
            // Caps Lock toggles: the host reports each toggle once; the
            // guest needs a whole key stroke to toggle its own state.
            return vec![(usage, true), (usage, false)];
        }
        if !(0xe0..=0xe7).contains(&usage) {
            return Vec::new();
        }
        let bit = 1u8 << (usage - 0xe0);
        let pressed = flag_set && self.down & bit == 0;
        if pressed {
            self.down |= bit;
        } else {
            self.down &= !bit;
        }
        vec![(usage, pressed)]
    }

    /// Releases for every modifier reported down (the window lost focus).
    pub fn release_all(&mut self) -> Vec<(u8, bool)> {
        let down = std::mem::take(&mut self.down);
        (0..8)
            .filter(|i| down & (1 << i) != 0)
            .map(|i| (0xe0 + i, false))
            .collect()
    }
}

/// The tablet position of a point in a view `width` × `height` (AppKit's
/// coordinates: origin bottom left), clamped to the view's edges so a drag
/// that leaves the window still ends with its button release; `None` for
/// an empty view or a coordinate that is not a number.
pub fn tablet_position(x: f64, y: f64, width: f64, height: f64) -> Option<(u16, u16)> {
    // Written so that a NaN size fails too.
    let usable = width > 0.0 && height > 0.0 && !x.is_nan() && !y.is_nan();
    if !usable {
        return None;
    }
    let scale = |v: f64| (v * 32767.0).round().clamp(0.0, 32767.0) as u16;
    Some((scale(x / width), scale(1.0 - y / height)))
}

/// The tablet's button mask from AppKit's `pressedMouseButtons` (bit 0
/// left, 1 right, 2 middle: already the HID order).
pub fn buttons(pressed_mouse_buttons: usize) -> u8 {
    (pressed_mouse_buttons & 0b111) as u8
}

/// Pixels of a precise (trackpad) scroll that make one wheel detent.
const PIXELS_PER_DETENT: f64 = 16.0;

/// Turns AppKit scroll deltas into wheel detents (positive away from the
/// user). A mouse wheel reports lines, each event at least one detent; a
/// trackpad reports pixels, summed until they make a detent.
#[derive(Debug, Default)]
pub struct Wheel {
    pixels: f64,
}

impl Wheel {
    /// Detents for a `scrollingDeltaY` of `delta` (`precise`: in pixels).
    pub fn scrolled(&mut self, delta: f64, precise: bool) -> i8 {
        if !delta.is_finite() || delta == 0.0 {
            return 0;
        }
        if !precise {
            let lines = delta.abs().ceil().min(127.0) as i8;
            return if delta > 0.0 { lines } else { -lines };
        }
        // A change of direction drops what the other way had gathered.
        if self.pixels * delta < 0.0 {
            self.pixels = 0.0;
        }
        self.pixels += delta;
        let detents = (self.pixels / PIXELS_PER_DETENT)
            .trunc()
            .clamp(-127.0, 127.0);
        self.pixels -= detents * PIXELS_PER_DETENT;
        detents as i8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_codes_map_to_usages() {
        assert_eq!(hid_usage(0x00), Some(0x04), "A");
        assert_eq!(hid_usage(0x06), Some(0x1d), "Z");
        assert_eq!(hid_usage(0x1d), Some(0x27), "0");
        assert_eq!(hid_usage(0x24), Some(0x28), "Return");
        assert_eq!(hid_usage(0x7a), Some(0x3a), "F1");
        assert_eq!(hid_usage(0x6f), Some(0x45), "F12");
        assert_eq!(hid_usage(0x7e), Some(0x52), "Up");
        assert_eq!(hid_usage(0x37), Some(0xe3), "Command is the GUI key");
        assert_eq!(hid_usage(0x3f), None, "fn has no usage");
        assert_eq!(hid_usage(0xffff), None);
    }

    #[test]
    fn the_table_is_one_to_one() {
        let mut seen = std::collections::HashMap::new();
        for code in 0..=0x7fu16 {
            if let Some(u) = hid_usage(code) {
                if let Some(other) = seen.insert(u, code) {
                    panic!("usage {u:#x} from {other:#x} and {code:#x}");
                }
            }
        }
        // All 26 letters, 10 digits, 20 function keys and 8 modifiers.
        assert!(seen.len() >= 64, "{}", seen.len());
    }

    #[test]
    fn paired_modifiers_press_and_release() {
        let mut m = Modifiers::default();
        assert_eq!(m.changed(0x38, true), vec![(0xe1, true)], "left Shift");
        assert_eq!(m.changed(0x3c, true), vec![(0xe5, true)], "right Shift");
        // Left released while right still holds the Shift flag.
        assert_eq!(m.changed(0x38, true), vec![(0xe1, false)]);
        assert_eq!(m.changed(0x3c, false), vec![(0xe5, false)]);
        // A cleared flag is a release even if the press was missed.
        assert_eq!(m.changed(0x3b, false), vec![(0xe0, false)]);
        assert_eq!(m.changed(0x39, true), vec![(0x39, true), (0x39, false)]);
        assert!(m.changed(0x00, true).is_empty(), "not a modifier");
        m.changed(0x37, true);
        m.changed(0x3a, true);
        assert_eq!(m.release_all(), vec![(0xe2, false), (0xe3, false)]);
        assert!(m.release_all().is_empty());
    }

    #[test]
    fn positions_scale_and_flip() {
        assert_eq!(tablet_position(0.0, 100.0, 200.0, 100.0), Some((0, 0)));
        assert_eq!(
            tablet_position(200.0, 0.0, 200.0, 100.0),
            Some((32767, 32767))
        );
        assert_eq!(
            tablet_position(100.0, 50.0, 200.0, 100.0),
            Some((16384, 16384))
        );
        assert_eq!(tablet_position(-1.0, 5.0, 200.0, 100.0), Some((0, 31129)));
        assert_eq!(
            tablet_position(500.0, 101.0, 200.0, 100.0),
            Some((32767, 0))
        );
        assert_eq!(tablet_position(0.0, 0.0, 0.0, 100.0), None);
        assert_eq!(tablet_position(f64::NAN, 0.0, 10.0, 10.0), None);
        assert_eq!(tablet_position(1.0, 1.0, f64::NAN, 10.0), None);
        assert_eq!(buttons(0b1011), 0b011);
    }

    #[test]
    fn scrolls_become_detents() {
        let mut w = Wheel::default();
        assert_eq!(w.scrolled(0.3, false), 1, "a wheel click is a detent");
        assert_eq!(w.scrolled(-2.0, false), -2);
        assert_eq!(w.scrolled(1e9, false), 127);
        assert_eq!(w.scrolled(f64::NAN, true), 0);
        assert_eq!(w.scrolled(10.0, true), 0, "not a detent yet");
        assert_eq!(w.scrolled(10.0, true), 1);
        assert_eq!(w.scrolled(-10.0, true), 0, "the other way starts afresh");
        assert_eq!(w.scrolled(-30.0, true), -2);
    }
}
