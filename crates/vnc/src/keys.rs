//! X keysyms (what RFB key events carry, RFC 6143 §7.5.4) as USB HID
//! keyboard usages (HID Usage Tables, page 0x07), for a US layout.

/// Left shift's usage.
pub const LEFT_SHIFT: u8 = 0xe1;

/// The key a keysym is typed with: its usage, and whether shift must be
/// held for it (an upper-case letter or a shifted symbol).
pub fn usage(keysym: u32) -> Option<(u8, bool)> {
    let plain = |u: u8| Some((u, false));
    let shifted = |u: u8| Some((u, true));
    match keysym {
        0x61..=0x7a => plain(0x04 + (keysym - 0x61) as u8),
        0x41..=0x5a => shifted(0x04 + (keysym - 0x41) as u8),
        0x31..=0x39 => plain(0x1e + (keysym - 0x31) as u8),
        0x30 => plain(0x27),
        0x21 => shifted(0x1e),
        0x40 => shifted(0x1f),
        0x23 => shifted(0x20),
        0x24 => shifted(0x21),
        0x25 => shifted(0x22),
        0x5e => shifted(0x23),
        0x26 => shifted(0x24),
        0x2a => shifted(0x25),
        0x28 => shifted(0x26),
        0x29 => shifted(0x27),
        0x20 => plain(0x2c),
        0x2d => plain(0x2d),
        0x5f => shifted(0x2d),
        0x3d => plain(0x2e),
        0x2b => shifted(0x2e),
        0x5b => plain(0x2f),
        0x7b => shifted(0x2f),
        0x5d => plain(0x30),
        0x7d => shifted(0x30),
        0x5c => plain(0x31),
        0x7c => shifted(0x31),
        0x3b => plain(0x33),
        0x3a => shifted(0x33),
        0x27 => plain(0x34),
        0x22 => shifted(0x34),
        0x60 => plain(0x35),
        0x7e => shifted(0x35),
        0x2c => plain(0x36),
        0x3c => shifted(0x36),
        0x2e => plain(0x37),
        0x3e => shifted(0x37),
        0x2f => plain(0x38),
        0x3f => shifted(0x38),
        0xff08 => plain(0x2a), // BackSpace
        0xff09 => plain(0x2b), // Tab
        0xff0d => plain(0x28), // Return
        0xff13 => plain(0x48), // Pause
        0xff14 => plain(0x47), // Scroll_Lock
        0xff1b => plain(0x29), // Escape
        0xff50 => plain(0x4a), // Home
        0xff51 => plain(0x50), // Left
        0xff52 => plain(0x52), // Up
        0xff53 => plain(0x4f), // Right
        0xff54 => plain(0x51), // Down
        0xff55 => plain(0x4b), // Prior
        0xff56 => plain(0x4e), // Next
        0xff57 => plain(0x4d), // End
        0xff61 => plain(0x46), // Print
        0xff63 => plain(0x49), // Insert
        0xff67 => plain(0x65), // Menu
        0xff7f => plain(0x53), // Num_Lock
        0xff8d => plain(0x58), // KP_Enter
        0xffaa => plain(0x55), // KP_Multiply
        0xffab => plain(0x57), // KP_Add
        0xffad => plain(0x56), // KP_Subtract
        0xffae => plain(0x63), // KP_Decimal
        0xffaf => plain(0x54), // KP_Divide
        0xffb0 => plain(0x62), // KP_0
        0xffb1..=0xffb9 => plain(0x59 + (keysym - 0xffb1) as u8),
        0xffbe..=0xffc9 => plain(0x3a + (keysym - 0xffbe) as u8), // F1..F12
        0xffca..=0xffd5 => plain(0x68 + (keysym - 0xffca) as u8), // F13..F24
        0xffe1 => plain(0xe1),                                    // Shift_L
        0xffe2 => plain(0xe5),                                    // Shift_R
        0xffe3 => plain(0xe0),                                    // Control_L
        0xffe4 => plain(0xe4),                                    // Control_R
        0xffe5 => plain(0x39),                                    // Caps_Lock
        0xffe7 | 0xffeb => plain(0xe3),                           // Meta_L, Super_L
        0xffe8 | 0xffec => plain(0xe7),                           // Meta_R, Super_R
        0xffe9 => plain(0xe2),                                    // Alt_L
        0xffea => plain(0xe6),                                    // Alt_R
        0xffff => plain(0x4c),                                    // Delete
        _ => None,
    }
}

/// Whether `usage` is one of the shift keys.
pub fn is_shift(usage: u8) -> bool {
    usage == 0xe1 || usage == 0xe5
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn letters_digits_and_symbols_map_to_us_keys() {
        assert_eq!(usage(u32::from(b'a')), Some((0x04, false)));
        assert_eq!(usage(u32::from(b'Z')), Some((0x1d, true)));
        assert_eq!(usage(u32::from(b'1')), Some((0x1e, false)));
        assert_eq!(usage(u32::from(b'0')), Some((0x27, false)));
        assert_eq!(usage(u32::from(b'!')), Some((0x1e, true)));
        assert_eq!(usage(u32::from(b'?')), Some((0x38, true)));
        assert_eq!(usage(u32::from(b' ')), Some((0x2c, false)));
    }

    #[test]
    fn function_and_modifier_keysyms_map() {
        assert_eq!(usage(0xff0d), Some((0x28, false)));
        assert_eq!(usage(0xffbe), Some((0x3a, false)));
        assert_eq!(usage(0xffc9), Some((0x45, false)));
        assert_eq!(usage(0xffe1), Some((LEFT_SHIFT, false)));
        assert_eq!(usage(0xffe3), Some((0xe0, false)));
        assert_eq!(usage(0xffb5), Some((0x5d, false)));
        assert!(is_shift(0xe5));
        assert_eq!(
            usage(0x1008_ff11),
            None,
            "XF86 keys have no USB keyboard key"
        );
        assert_eq!(usage(0xe9), None, "no US key types é");
    }
}
