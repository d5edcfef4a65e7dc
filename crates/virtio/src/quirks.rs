//! Guest driver bugs the transport works around.

/// Page size the relocated used ring is aligned to.
const PAGE: u64 = 4096;

/// macOS 26's AppleVirtIO driver can give a queue a used ring (device
/// area) that overlaps its available ring (driver area); the device's
/// used-ring writes then corrupt the available ring and I/O stalls. The
/// QEMU fork of aquarat/experiment-macos-arm64-on-asahi-linux-arm64
/// (docs/NOTES.md, "x-fix-overlapping-used": stalls 17/203 → 0/200)
/// moves the used ring to the first page boundary after the available
/// ring, where the legacy split-ring layout puts it. That the driver then
/// reads it there is what their result implies (UNCONFIRMED otherwise).
///
/// Returns the address to use instead of `used`, only when the two rings
/// overlap; `None` leaves the driver's choice alone.
pub fn relocated_used_ring(avail: u64, used: u64, size: u16) -> Option<u64> {
    let n = u64::from(size);
    let avail_end = avail.checked_add(6 + 2 * n)?;
    let used_end = used.checked_add(6 + 8 * n)?;
    let overlap = used < avail_end && avail < used_end;
    if !overlap {
        return None;
    }
    avail_end.checked_next_multiple_of(PAGE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_used_ring_inside_the_available_ring_moves_past_it() {
        // 256 entries: the available ring is 6 + 512 bytes.
        assert_eq!(
            relocated_used_ring(0x7000_1000, 0x7000_1100, 256),
            Some(0x7000_2000)
        );
        // Starting before it and running into it.
        assert_eq!(
            relocated_used_ring(0x7000_1000, 0x7000_0800, 256),
            Some(0x7000_2000)
        );
    }

    #[test]
    fn separate_rings_are_left_alone() {
        // The legacy layout and a modern driver's choice.
        assert_eq!(relocated_used_ring(0x7000_1000, 0x7000_2000, 256), None);
        assert_eq!(relocated_used_ring(0x7000_1000, 0x7000_0000, 128), None);
        // Adjacent, not overlapping.
        assert_eq!(
            relocated_used_ring(0x7000_1000, 0x7000_1000 + 6 + 512, 256),
            None
        );
    }

    #[test]
    fn addresses_at_the_top_do_not_wrap() {
        assert_eq!(relocated_used_ring(u64::MAX - 4, 0, 256), None);
        assert_eq!(
            relocated_used_ring(u64::MAX - 0x300, u64::MAX - 0x300, 256),
            None
        );
    }
}
