//! `avp,rtc`: the Apple Virtual Platform clock of Virtualization.framework
//! guests (`AppleVirtualPlatformRTC` in macOS).
//!
//! Placement: `0x3024_0000`, SPI 0x13, from the VirtualMac2,1 device tree
//! (`arm-io/avp-rtc`, reg 0x2024_0000 plus the bus's 0x1000_0000 range).
//! The boot ROM's iBoot reads the 32-bit word at +0x40 and keeps this clock
//! (dropping `pl031-rtc` from the tree it hands macOS) only if it reads
//! [`ID_VALUE`]; otherwise macOS uses the PL031. All register facts come
//! from reverse engineering of iBoot and the macOS driver published in
//! aquarat/experiment-macos-arm64-on-asahi-linux-arm64 (docs/NOTES.md);
//! nothing here is documented by Apple.
//!
//! # Model
//!
//! * `COUNTER` (+0x00, 64 bits, read-only): microseconds of the [`Clock`]
//!   handed in. With [`HostClock`](crate::clock::HostClock) that is time
//!   since the Unix epoch, as the QEMU fork of the same source does, so the
//!   guest's time is right before it has stored an offset in NVRAM
//!   (`com.apple.System.rtc-offset`, which the driver adds itself).
//! * `CONTROL` (+0x18), `INT_ENABLE` (+0x20): read back what was written
//!   (the driver sets bit 0 of the first, writes 6 to the second).
//! * `INT_STATUS` (+0x30): the driver reads it on an interrupt and writes
//!   the value back to `INT_ACK` (+0x38, write-one-to-clear). What raises a
//!   status bit is not known (UNCONFIRMED); this model, like the QEMU fork,
//!   never sets one and never raises its line.
//! * `ID` (+0x40): [`ID_VALUE`].
//!
//! Registers are 64 bits wide at 8-byte aligned offsets; narrower loads
//! return the bytes at their offset (so a 32-bit load at +0x40 reads
//! 0xF001 and at +0x04 the counter's high word), narrower stores replace
//! those bytes. Other offsets read 0 and ignore writes, with a guest error.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vm_core::{guest_error, AccessWidth, MmioDevice};

use crate::clock::Clock;

/// Register offsets.
pub mod reg {
    pub const COUNTER: u64 = 0x00;
    pub const CONTROL: u64 = 0x18;
    pub const INT_ENABLE: u64 = 0x20;
    pub const INT_STATUS: u64 = 0x30;
    pub const INT_ACK: u64 = 0x38;
    pub const ID: u64 = 0x40;
}

/// What iBoot checks at [`reg::ID`] before it prefers this clock.
pub const ID_VALUE: u64 = 0xf001;

const NANOS_PER_MICRO: u64 = 1_000;

/// The guest-written registers, for a snapshot. The counter is not here:
/// like the PL031, it reads the host's clock after a restore, as a real
/// clock does after sleep.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedAvpRtc {
    pub control: u64,
    pub int_enable: u64,
    pub int_status: u64,
}

/// The `avp,rtc` block.
pub struct AvpRtc {
    clock: Arc<dyn Clock>,
    control: AtomicU64,
    int_enable: AtomicU64,
    int_status: AtomicU64,
}

impl AvpRtc {
    /// Bytes of register space the machine maps (the size is not known;
    /// one page holds every register the driver uses).
    pub const SIZE: u64 = 0x1000;

    pub fn new(clock: Arc<dyn Clock>) -> Arc<Self> {
        Arc::new(Self {
            clock,
            control: AtomicU64::new(0),
            int_enable: AtomicU64::new(0),
            int_status: AtomicU64::new(0),
        })
    }

    /// Back to power-on: control, enable and status cleared; the counter is
    /// the clock's and runs on.
    pub fn reset(&self) {
        self.control.store(0, Ordering::SeqCst);
        self.int_enable.store(0, Ordering::SeqCst);
        self.int_status.store(0, Ordering::SeqCst);
    }

    /// The registers, for a snapshot.
    pub fn save_state(&self) -> SavedAvpRtc {
        SavedAvpRtc {
            control: self.control.load(Ordering::SeqCst),
            int_enable: self.int_enable.load(Ordering::SeqCst),
            int_status: self.int_status.load(Ordering::SeqCst),
        }
    }

    /// Puts back what [`AvpRtc::save_state`] returned; any value is one a
    /// guest could have written, so there is nothing to refuse.
    pub fn restore_state(&self, saved: SavedAvpRtc) {
        self.control.store(saved.control, Ordering::SeqCst);
        self.int_enable.store(saved.int_enable, Ordering::SeqCst);
        self.int_status.store(saved.int_status, Ordering::SeqCst);
    }

    fn register(&self, offset: u64) -> Option<u64> {
        Some(match offset {
            reg::COUNTER => self.clock.now_ns() / NANOS_PER_MICRO,
            reg::CONTROL => self.control.load(Ordering::SeqCst),
            reg::INT_ENABLE => self.int_enable.load(Ordering::SeqCst),
            reg::INT_STATUS => self.int_status.load(Ordering::SeqCst),
            reg::INT_ACK => 0,
            reg::ID => ID_VALUE,
            _ => return None,
        })
    }
}

/// The bytes `width` covers at `byte` within a 64-bit register.
fn lane(byte: u64, width: AccessWidth) -> Option<(u32, u64)> {
    if byte + width.bytes() > 8 {
        return None;
    }
    Some((u32::try_from(byte * 8).ok()?, width.mask()))
}

impl MmioDevice for AvpRtc {
    fn read(&self, offset: u64, width: AccessWidth) -> u64 {
        let (base, byte) = (offset & !7, offset & 7);
        match (self.register(base), lane(byte, width)) {
            (Some(value), Some((shift, mask))) => (value >> shift) & mask,
            _ => {
                guest_error!("avp-rtc: {width} read at offset {offset:#x}");
                0
            }
        }
    }

    fn write(&self, offset: u64, width: AccessWidth, value: u64) {
        let (base, byte) = (offset & !7, offset & 7);
        let Some((shift, mask)) = lane(byte, width) else {
            guest_error!("avp-rtc: {width} write at offset {offset:#x}");
            return;
        };
        let merge = |cell: &AtomicU64| {
            let bits = (value & mask) << shift;
            let keep = !(mask << shift);
            let _ = cell.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |old| {
                Some((old & keep) | bits)
            });
        };
        match base {
            reg::CONTROL => merge(&self.control),
            reg::INT_ENABLE => merge(&self.int_enable),
            reg::INT_ACK => {
                self.int_status
                    .fetch_and(!((value & mask) << shift), Ordering::SeqCst);
            }
            _ => guest_error!("avp-rtc: {width} write of {value:#x} at offset {offset:#x}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::FakeClock;
    use AccessWidth::{Byte, Double, Word};

    fn rig() -> (Arc<AvpRtc>, Arc<FakeClock>) {
        let clock = Arc::new(FakeClock::new(1_767_225_600_123_456_789));
        (AvpRtc::new(clock.clone()), clock)
    }

    #[test]
    fn identifies_itself_as_iboot_expects() {
        let (rtc, _) = rig();
        assert_eq!(rtc.read(reg::ID, Word), 0xf001);
        assert_eq!(rtc.read(reg::ID, Double), 0xf001);
    }

    #[test]
    fn counter_is_the_clock_in_microseconds() {
        let (rtc, clock) = rig();
        assert_eq!(rtc.read(reg::COUNTER, Double), 1_767_225_600_123_456);
        clock.advance_ns(2_500);
        assert_eq!(rtc.read(reg::COUNTER, Double), 1_767_225_600_123_459);
        // 32-bit halves, low word first.
        let v = rtc.read(reg::COUNTER, Double);
        assert_eq!(rtc.read(reg::COUNTER, Word), v & 0xffff_ffff);
        assert_eq!(rtc.read(reg::COUNTER + 4, Word), v >> 32);
        // Read-only.
        rtc.write(reg::COUNTER, Double, 0);
        assert_eq!(rtc.read(reg::COUNTER, Double), v);
    }

    #[test]
    fn driver_setup_reads_back_and_ack_clears_status() {
        let (rtc, _) = rig();
        rtc.write(reg::CONTROL, Word, 1);
        rtc.write(reg::INT_ENABLE, Double, 6);
        rtc.write(reg::INT_ACK, Double, 0x00ff_ffff_ffff_ffff);
        assert_eq!(rtc.read(reg::CONTROL, Double), 1);
        assert_eq!(rtc.read(reg::INT_ENABLE, Double), 6);
        assert_eq!(rtc.read(reg::INT_STATUS, Double), 0);
        rtc.int_status.store(0b110, Ordering::SeqCst);
        rtc.write(reg::INT_ACK, Byte, 0b100);
        assert_eq!(rtc.read(reg::INT_STATUS, Double), 0b010);
        rtc.reset();
        assert_eq!(rtc.read(reg::CONTROL, Double), 0);
        assert_eq!(rtc.read(reg::INT_STATUS, Double), 0);
    }

    #[test]
    fn saved_registers_come_back_and_the_counter_keeps_the_clocks_time() {
        let (rtc, _) = rig();
        rtc.write(reg::CONTROL, AccessWidth::Word, 0x5);
        rtc.write(reg::INT_ENABLE, AccessWidth::Word, 0x1);
        let saved = rtc.save_state();
        let (other, other_clock) = rig();
        other.restore_state(saved);
        assert_eq!(other.read(reg::CONTROL, AccessWidth::Word), 0x5);
        assert_eq!(other.read(reg::INT_ENABLE, AccessWidth::Word), 0x1);
        assert_eq!(
            other.read(reg::COUNTER, AccessWidth::Double),
            other_clock.now_ns() / NANOS_PER_MICRO
        );
    }

    #[test]
    fn unknown_offsets_read_zero() {
        let (rtc, _) = rig();
        assert_eq!(rtc.read(0x48, Word), 0);
        assert_eq!(rtc.read(0x08, Double), 0);
        rtc.write(0x48, Word, 5);
        assert_eq!(rtc.read(0x48, Word), 0);
    }
}
