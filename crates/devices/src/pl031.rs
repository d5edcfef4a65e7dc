//! ARM PrimeCell real-time clock (PL031), the vmapple RTC.
//!
//! Placement (vmapple-machine.md §2, §3, §13.2): base `0x2005_0000`, 4 KiB
//! of registers ([`Pl031::SIZE`]), level interrupt on SPI 2 (INTID 34) that
//! is `RIS & IMSC`, PeriphID/CellID bytes `31 10 14 00 0D F0 05 B1` at
//! 0xFE0–0xFFC. Registers follow the PrimeCell RTC (PL031) Technical
//! Reference Manual (ARM DDI 0224); where QEMU, the only host vmapple
//! guests have been run on besides Apple's own, differs from the TRM, what
//! the guest sees under QEMU wins and the difference is noted below.
//!
//! # Model
//!
//! * **Counter.** `RTCDR` is the [`Clock`]'s whole seconds (seconds since
//!   the Unix epoch with [`HostClock`](crate::clock::HostClock): the host's
//!   time of day when the machine was built, counting on from there) plus
//!   an offset that starts at 0. Writing `RTCLR` with *v* changes the
//!   offset so that `RTCDR` reads *v* now and counts on from it; `RTCLR`
//!   reads back the last value written (0 after reset). All arithmetic is
//!   modulo 2³², like the 32-bit counter.
//! * **Start bit.** `RTCCR` always reads 1 and writes are ignored: the
//!   counter runs from creation, as under QEMU. The TRM resets `RTCCR` to 0
//!   with the counter stopped until the guest sets the bit, and once set
//!   the bit cannot be cleared, so a guest that starts the RTC (Linux does
//!   in its probe) sees no difference.
//! * **Alarm.** When `RTCDR` becomes equal to `RTCMR` the raw interrupt
//!   `RTCRIS` bit 0 is set; the line is `RTCRIS & RTCIMSC`. Writing `RTCMR`
//!   or `RTCLR` re-arms the comparison; if they are already equal the
//!   interrupt is raised at once (QEMU does the same). The match is found
//!   through [`Timed`]: [`Pl031::deadline`] is the clock time at which
//!   `RTCDR` next equals `RTCMR`, and [`Pl031::poll`] raises the interrupt
//!   once it has passed. The machine calls `poll` from a
//!   [`TimerThread`](crate::clock::TimerThread) (which sleeps until the
//!   deadline and is woken when it moves) or from its own ticker. Every
//!   register access also polls first, so a guest that reads `RTCRIS` after
//!   the match never sees a stale 0, whoever drives the timer. After a
//!   match the next one is 2³² seconds away, so no new deadline is set.
//! * **Interrupt clear.** Any write to `RTCICR` clears the raw interrupt.
//!   The PL031 TRM clears only when bit 0 is written as 1, the ARM926EJ-S
//!   documentation on any write; QEMU takes the latter, and so do we.
//!   Drivers write 1, which means the same under both readings.
//! * **Reset.** [`Pl031::reset`] clears `RTCMR`, `RTCLR`'s read-back,
//!   `RTCIMSC`, `RTCRIS` and any pending alarm and lowers the line, but
//!   keeps the time: the RTC stands for a battery-backed clock that a
//!   reboot does not reset, and a guest that set the time (through
//!   `RTCLR`) keeps it. (QEMU keeps every register across a system reset.)
//!
//! # Access widths
//!
//! Registers are 32 bits wide at 4-byte aligned offsets. A byte or
//! halfword access at a register's offset acts on the whole register (a
//! load returns its low bits, a store writes the value zero-extended); an
//! access at an offset inside a register is logged, reads 0 and is
//! ignored, as under QEMU. A 64-bit access is two 32-bit accesses, low word
//! first, and is logged. Unknown offsets read 0 and ignore writes, with a
//! guest error; so do writes to read-only registers.

use std::sync::{Arc, Mutex, MutexGuard};
use vm_core::sync::lock;

use vm_core::regs::{Narrow, RegisterFile, Wide};
use vm_core::{guest_error, AccessWidth, IrqLine, MmioDevice};

use crate::clock::{Clock, Timed, Waker, NANOS_PER_SEC};

/// Register offsets from the start of the block (TRM table 3-1).
pub mod reg {
    /// Data register: the counter, read-only.
    pub const DR: u64 = 0x000;
    /// Match register.
    pub const MR: u64 = 0x004;
    /// Load register: a write sets the counter.
    pub const LR: u64 = 0x008;
    /// Control register, bit 0 = RTC start.
    pub const CR: u64 = 0x00C;
    /// Interrupt mask set/clear, bit 0 (1 = enabled).
    pub const IMSC: u64 = 0x010;
    /// Raw interrupt status, read-only.
    pub const RIS: u64 = 0x014;
    /// Masked interrupt status, read-only.
    pub const MIS: u64 = 0x018;
    /// Interrupt clear, write-only.
    pub const ICR: u64 = 0x01C;
    /// `RTCPeriphID0`; PeriphID1–3 follow at 4-byte steps.
    pub const PERIPH_ID0: u64 = 0xFE0;
    /// `RTCPCellID0`; PCellID1–3 follow at 4-byte steps.
    pub const PCELL_ID0: u64 = 0xFF0;
    /// Last ID register.
    pub const PCELL_ID3: u64 = 0xFFC;
}

/// The only interrupt bit of `RTCIMSC`, `RTCRIS`, `RTCMIS` and `RTCICR`.
pub const INT_ALARM: u32 = 1;

/// `RTCCR` bit 0: the counter is running.
pub const CR_START: u32 = 1;

/// Bytes of PeriphID0–3 and PCellID0–3 (spec §13.2): part number 0x031,
/// designer 0x41 (Arm), revision 1, then the PrimeCell signature.
pub const ID_BYTES: [u8; 8] = [0x31, 0x10, 0x14, 0x00, 0x0D, 0xF0, 0x05, 0xB1];

#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
struct Regs {
    /// Added (mod 2³²) to the clock's seconds to give `RTCDR`.
    offset: u32,
    mr: u32,
    lr: u32,
    imsc: u32,
    ris: u32,
    /// Clock time (ns) at which `RTCDR` next equals `RTCMR`, if armed.
    alarm_at: Option<u64>,
}

impl Regs {
    fn count(&self, now_ns: u64) -> u32 {
        // The counter is 32 bits: the clock's seconds wrap like it does.
        let [s0, s1, s2, s3, ..] = (now_ns / NANOS_PER_SEC).to_le_bytes();
        u32::from_le_bytes([s0, s1, s2, s3]).wrapping_add(self.offset)
    }

    /// Recomputes when `RTCDR` next equals `RTCMR`; raises the interrupt
    /// now if it already does.
    fn arm(&mut self, now_ns: u64) {
        let ticks = self.mr.wrapping_sub(self.count(now_ns));
        if ticks == 0 {
            self.alarm_at = None;
            self.ris |= INT_ALARM;
        } else {
            // The counter steps on whole seconds of the clock, so the match
            // happens at a second boundary, `ticks` boundaries from now.
            let second = now_ns / NANOS_PER_SEC;
            self.alarm_at = Some(
                second
                    .saturating_add(u64::from(ticks))
                    .saturating_mul(NANOS_PER_SEC),
            );
        }
    }

    /// Raises the interrupt if the armed match time has passed.
    fn catch_up(&mut self, now_ns: u64) {
        if self.alarm_at.is_some_and(|at| now_ns >= at) {
            self.alarm_at = None;
            self.ris |= INT_ALARM;
        }
    }

    fn level(&self) -> bool {
        self.ris & self.imsc != 0
    }
}

/// A PL031's state in a snapshot: the guest's offset from the clock (so
/// after a restore the RTC reads the host's time plus the same offset, as
/// a real RTC does after sleep), its match, mask and status registers.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct SavedPl031(Regs);

/// The PL031 RTC.
pub struct Pl031 {
    regs: Mutex<Regs>,
    irq: Arc<dyn IrqLine>,
    clock: Arc<dyn Clock>,
    waker: Waker,
}

impl std::fmt::Debug for Pl031 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pl031")
            .field("regs", &*self.regs())
            .finish()
    }
}

impl Pl031 {
    /// Bytes of register space the device decodes.
    pub const SIZE: u64 = 0x1000;

    /// An RTC that reads the clock's seconds, no alarm armed, line low.
    pub fn new(irq: Arc<dyn IrqLine>, clock: Arc<dyn Clock>) -> Arc<Self> {
        irq.set_level(false);
        Arc::new(Self {
            regs: Mutex::new(Regs::default()),
            irq,
            clock,
            waker: Waker::new(),
        })
    }

    // A panic while the lock was held (a bug) must not wedge the device:
    // the register file is always consistent.
    fn regs(&self) -> MutexGuard<'_, Regs> {
        lock(&self.regs)
    }

    /// Locks the registers with any due alarm already raised.
    fn current(&self) -> (MutexGuard<'_, Regs>, u64) {
        let mut regs = self.regs();
        let now = self.clock.now_ns();
        regs.catch_up(now);
        (regs, now)
    }

    /// The registers, for a snapshot.
    pub fn save_state(&self) -> SavedPl031 {
        SavedPl031(self.current().0.clone())
    }

    /// Puts back what [`Pl031::save_state`] returned. The alarm is armed
    /// again from the match register against the clock now, so one that
    /// came due while the VM was saved fires at once.
    pub fn restore_state(&self, saved: SavedPl031) -> Result<(), String> {
        let mut regs = self.regs();
        *regs = saved.0;
        let now = self.clock.now_ns();
        if regs.alarm_at.is_some() {
            regs.arm(now);
        }
        self.irq.set_level(regs.level());
        drop(regs);
        self.waker.wake();
        Ok(())
    }

    /// Clock time (ns) at which the counter next reaches the match value,
    /// if an alarm is armed.
    pub fn deadline(&self) -> Option<u64> {
        self.regs().alarm_at
    }

    /// Raises the alarm interrupt if its time has come.
    pub fn poll(&self) {
        let (regs, _) = self.current();
        self.irq.set_level(regs.level());
    }

    /// What `RTCDR` reads now.
    pub fn counter(&self) -> u32 {
        let now = self.clock.now_ns();
        self.regs().count(now)
    }

    /// Back to the reset state except for the time (see the module doc);
    /// the line goes low.
    pub fn reset(&self) {
        let mut regs = self.regs();
        let offset = regs.offset;
        *regs = Regs {
            offset,
            ..Regs::default()
        };
        self.irq.set_level(false);
        drop(regs);
        self.waker.wake();
    }

    fn read_word(&self, offset: u64) -> u32 {
        let (regs, now) = self.current();
        self.irq.set_level(regs.level());
        match offset {
            reg::DR => regs.count(now),
            reg::MR => regs.mr,
            reg::LR => regs.lr,
            reg::CR => CR_START,
            reg::IMSC => regs.imsc,
            reg::RIS => regs.ris,
            reg::MIS => regs.ris & regs.imsc,
            reg::PERIPH_ID0..=reg::PCELL_ID3 if offset & 3 == 0 => {
                u32::from(ID_BYTES[((offset - reg::PERIPH_ID0) >> 2) as usize])
            }
            reg::ICR => {
                guest_error!("pl031: read of write-only RTCICR");
                0
            }
            _ => {
                guest_error!("pl031: read at bad offset {offset:#x}");
                0
            }
        }
    }

    fn write_word(&self, offset: u64, value: u32) {
        let (mut regs, now) = self.current();
        let mut rearmed = false;
        match offset {
            reg::MR => {
                regs.mr = value;
                regs.arm(now);
                rearmed = true;
            }
            reg::LR => {
                regs.lr = value;
                let delta = value.wrapping_sub(regs.count(now));
                regs.offset = regs.offset.wrapping_add(delta);
                regs.arm(now);
                rearmed = true;
            }
            // Always running; see the module doc.
            reg::CR => {}
            reg::IMSC => regs.imsc = value & INT_ALARM,
            reg::ICR => regs.ris = 0,
            reg::DR | reg::RIS | reg::MIS => {
                guest_error!("pl031: write {value:#x} to read-only register at {offset:#x}");
            }
            reg::PERIPH_ID0..=reg::PCELL_ID3 => {
                guest_error!("pl031: write {value:#x} to ID register at {offset:#x}");
            }
            _ => guest_error!("pl031: write {value:#x} at bad offset {offset:#x}"),
        }
        self.irq.set_level(regs.level());
        drop(regs);
        if rearmed {
            self.waker.wake();
        }
    }
}

impl Timed for Pl031 {
    fn deadline(&self) -> Option<u64> {
        Pl031::deadline(self)
    }

    fn poll(&self) {
        Pl031::poll(self);
    }

    fn waker(&self) -> Waker {
        self.waker.clone()
    }
}

/// 32-bit registers; other widths as QEMU's model takes them.
const REGISTERS: RegisterFile = RegisterFile {
    name: "pl031",
    size: Pl031::SIZE,
    narrow: Narrow::WholeRegister,
    wide: Wide::Halves,
};

impl MmioDevice for Pl031 {
    fn read(&self, offset: u64, width: AccessWidth) -> u64 {
        REGISTERS.read(offset, width, |offset| self.read_word(offset))
    }

    fn write(&self, offset: u64, width: AccessWidth, value: u64) {
        REGISTERS.write(offset, width, value, |offset, value| {
            self.write_word(offset, value)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{FakeClock, HostClock, TimerThread};
    use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
    use vm_core::TestIrq;
    use AccessWidth::{Byte, Double, Half, Word};

    /// 2026-01-01T00:00:00Z plus a quarter second, so that second
    /// boundaries are visible.
    const T0: u64 = 1_767_225_600 * NANOS_PER_SEC + 250_000_000;
    const T0_SECS: u32 = 1_767_225_600;

    struct Rig {
        rtc: Arc<Pl031>,
        irq: Arc<TestIrq>,
        clock: Arc<FakeClock>,
    }

    impl Rig {
        fn new() -> Self {
            let irq = Arc::new(TestIrq::new());
            let clock = Arc::new(FakeClock::new(T0));
            let rtc = Pl031::new(irq.clone(), clock.clone());
            Self { rtc, irq, clock }
        }

        fn r(&self, offset: u64) -> u32 {
            self.rtc.read(offset, Word) as u32
        }

        fn w(&self, offset: u64, value: u32) {
            self.rtc.write(offset, Word, u64::from(value));
        }

        fn secs(&self, s: u64) {
            self.clock.advance_ns(s * NANOS_PER_SEC);
        }
    }

    #[test]
    fn reset_values_and_id_bytes() {
        let rig = Rig::new();
        assert_eq!(rig.r(reg::DR), T0_SECS);
        assert_eq!(rig.r(reg::CR), 1, "always running");
        for offset in [reg::MR, reg::LR, reg::IMSC, reg::RIS, reg::MIS, reg::ICR] {
            assert_eq!(rig.r(offset), 0, "offset {offset:#x}");
        }
        let ids: Vec<u8> = (0..8)
            .map(|i| rig.r(reg::PERIPH_ID0 + 4 * i) as u8)
            .collect();
        assert_eq!(ids, [0x31, 0x10, 0x14, 0x00, 0x0D, 0xF0, 0x05, 0xB1]);
        assert_eq!(rig.r(reg::PCELL_ID0), 0x0D);
        assert!(!rig.irq.is_asserted());
        assert_eq!(rig.rtc.deadline(), None);
    }

    #[test]
    fn data_register_counts_seconds_of_the_clock() {
        let rig = Rig::new();
        rig.clock.advance_ns(749_999_999);
        assert_eq!(rig.r(reg::DR), T0_SECS, "still the same second");
        rig.clock.advance_ns(1);
        assert_eq!(rig.r(reg::DR), T0_SECS + 1);
        rig.secs(100);
        assert_eq!(rig.r(reg::DR), T0_SECS + 101);
        assert_eq!(rig.rtc.counter(), T0_SECS + 101);
    }

    #[test]
    fn host_clock_rtc_reads_the_host_time_of_day() {
        let rtc = Pl031::new(Arc::new(TestIrq::new()), Arc::new(HostClock::new()));
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as u32;
        let dr = rtc.read(reg::DR, Word) as u32;
        assert!(dr.wrapping_sub(wall) <= 2 || wall.wrapping_sub(dr) <= 2);
    }

    #[test]
    fn load_register_sets_the_time_and_reads_back() {
        let rig = Rig::new();
        rig.w(reg::LR, 1000);
        assert_eq!(rig.r(reg::DR), 1000);
        assert_eq!(rig.r(reg::LR), 1000);
        rig.secs(5);
        assert_eq!(rig.r(reg::DR), 1005, "counts on from the loaded value");
        assert_eq!(rig.r(reg::LR), 1000, "LR is not the counter");
        // Near the top of the counter, arithmetic wraps like the hardware.
        rig.w(reg::LR, u32::MAX);
        rig.secs(2);
        assert_eq!(rig.r(reg::DR), 1);
    }

    #[test]
    fn match_raises_the_alarm_at_the_second_the_counter_reaches_it() {
        let rig = Rig::new();
        rig.w(reg::IMSC, 1);
        rig.w(reg::MR, T0_SECS + 10);
        // The counter steps at whole seconds of the clock.
        assert_eq!(
            rig.rtc.deadline(),
            Some((u64::from(T0_SECS) + 10) * NANOS_PER_SEC)
        );
        rig.secs(9);
        rig.rtc.poll();
        assert_eq!(rig.r(reg::RIS), 0);
        assert!(!rig.irq.is_asserted());
        rig.clock.set_ns((u64::from(T0_SECS) + 10) * NANOS_PER_SEC);
        assert_eq!(rig.r(reg::DR), T0_SECS + 10);
        rig.rtc.poll();
        assert!(rig.irq.is_asserted());
        assert_eq!(rig.r(reg::RIS), 1);
        assert_eq!(rig.r(reg::MIS), 1);
        assert_eq!(rig.rtc.deadline(), None, "fires once");
        rig.w(reg::ICR, 1);
        assert!(!rig.irq.is_asserted());
        assert_eq!(rig.r(reg::RIS), 0);
        assert_eq!(rig.irq.rising_edges(), 1);
    }

    #[test]
    fn a_register_read_after_the_match_sees_it_without_a_poll() {
        let rig = Rig::new();
        rig.w(reg::MR, T0_SECS + 3);
        rig.secs(3);
        assert_eq!(rig.r(reg::RIS), 1);
        assert_eq!(rig.r(reg::MIS), 0, "masked");
        assert!(!rig.irq.is_asserted());
        rig.w(reg::IMSC, 1);
        assert!(
            rig.irq.is_asserted(),
            "unmasking a pending alarm raises the line"
        );
        rig.w(reg::IMSC, 0);
        assert!(!rig.irq.is_asserted());
    }

    #[test]
    fn match_equal_to_the_counter_fires_at_once() {
        let rig = Rig::new();
        rig.w(reg::IMSC, 1);
        rig.w(reg::MR, T0_SECS);
        assert!(rig.irq.is_asserted());
        assert_eq!(rig.rtc.deadline(), None);
    }

    #[test]
    fn loading_the_counter_rearms_the_match() {
        let rig = Rig::new();
        rig.w(reg::IMSC, 1);
        rig.w(reg::MR, 500);
        rig.w(reg::LR, 498);
        let second = T0 / NANOS_PER_SEC;
        assert_eq!(rig.rtc.deadline(), Some((second + 2) * NANOS_PER_SEC));
        rig.secs(2);
        rig.rtc.poll();
        assert!(rig.irq.is_asserted());
        rig.w(reg::ICR, 1);
        rig.w(reg::LR, 500);
        assert!(rig.irq.is_asserted(), "loading the match value matches");
    }

    #[test]
    fn match_in_the_past_waits_for_the_counter_to_wrap() {
        let rig = Rig::new();
        rig.w(reg::MR, T0_SECS - 1);
        let second = T0 / NANOS_PER_SEC;
        assert_eq!(
            rig.rtc.deadline(),
            Some((second + u64::from(u32::MAX)) * NANOS_PER_SEC)
        );
    }

    #[test]
    fn any_icr_write_clears_and_other_bits_are_masked() {
        let rig = Rig::new();
        rig.w(reg::IMSC, 0xFFFF_FFFF);
        assert_eq!(rig.r(reg::IMSC), 1);
        rig.w(reg::MR, T0_SECS);
        assert!(rig.irq.is_asserted());
        rig.w(reg::ICR, 0);
        assert_eq!(rig.r(reg::RIS), 0);
        assert!(!rig.irq.is_asserted());
    }

    #[test]
    fn read_only_and_id_registers_ignore_writes() {
        let rig = Rig::new();
        rig.w(reg::DR, 5);
        assert_eq!(rig.r(reg::DR), T0_SECS);
        rig.w(reg::RIS, 1);
        rig.w(reg::MIS, 1);
        assert_eq!(rig.r(reg::RIS), 0);
        rig.w(reg::CR, 0);
        assert_eq!(rig.r(reg::CR), 1, "cannot be stopped");
        rig.w(reg::PERIPH_ID0, 0xFF);
        assert_eq!(rig.r(reg::PERIPH_ID0), 0x31);
        rig.w(0x20, 0xFFFF_FFFF);
        assert_eq!(rig.r(0x20), 0);
    }

    #[test]
    fn widths() {
        let rig = Rig::new();
        rig.w(reg::MR, 0x1234_5678);
        assert_eq!(rig.rtc.read(reg::MR, Byte), 0x78);
        assert_eq!(rig.rtc.read(reg::MR, Half), 0x5678);
        assert_eq!(rig.rtc.read(reg::MR + 1, Byte), 0, "inside a register");
        rig.rtc.write(reg::MR, Half, 0xABCD);
        assert_eq!(rig.r(reg::MR), 0xABCD, "zero-extended");
        rig.rtc.write(reg::MR + 2, Half, 0xFFFF);
        assert_eq!(rig.r(reg::MR), 0xABCD, "ignored inside a register");
        // DR and MR in one 64-bit read, DR low.
        let both = rig.rtc.read(reg::DR, Double);
        assert_eq!(both as u32, T0_SECS);
        assert_eq!((both >> 32) as u32, 0xABCD);
        rig.rtc.write(reg::MR, Double, 0x0000_0001_0000_0042);
        assert_eq!(rig.r(reg::MR), 0x42);
        assert_eq!(rig.r(reg::LR), 1, "high word went to LR");
        assert_eq!(rig.r(reg::DR), 1);
        assert_eq!(
            rig.rtc.read(reg::PCELL_ID3, Double),
            0xB1,
            "nothing past the end"
        );
    }

    #[test]
    fn reset_keeps_the_time_and_clears_the_rest() {
        let rig = Rig::new();
        rig.w(reg::LR, 7777);
        rig.w(reg::IMSC, 1);
        rig.w(reg::MR, 7777);
        assert!(rig.irq.is_asserted());
        rig.w(reg::MR, 9999);
        rig.rtc.reset();
        assert!(!rig.irq.is_asserted());
        assert_eq!(rig.r(reg::DR), 7777);
        for offset in [reg::MR, reg::LR, reg::IMSC, reg::RIS, reg::MIS] {
            assert_eq!(rig.r(offset), 0, "offset {offset:#x}");
        }
        assert_eq!(rig.rtc.deadline(), None);
        rig.secs(10_000);
        rig.rtc.poll();
        assert_eq!(rig.r(reg::RIS), 0, "the old alarm is gone");
    }

    #[test]
    fn hostile_accesses_do_not_panic() {
        let rig = Rig::new();
        for offset in (0..Pl031::SIZE).chain([Pl031::SIZE, u64::MAX - 3, u64::MAX]) {
            for width in [Byte, Half, Word, Double] {
                rig.rtc.write(offset, width, u64::MAX);
                let _ = rig.rtc.read(offset, width);
                rig.rtc.write(offset, width, 0);
            }
        }
        assert_eq!(rig.r(reg::CR), 1);
        assert_eq!(rig.r(reg::PCELL_ID3), 0xB1);
    }

    #[test]
    fn extreme_clock_values_do_not_overflow() {
        let irq = Arc::new(TestIrq::new());
        let clock = Arc::new(FakeClock::new(u64::MAX - 1));
        let rtc = Pl031::new(irq.clone(), clock.clone());
        rtc.write(reg::IMSC, Word, 1);
        rtc.write(reg::MR, Word, 0);
        rtc.write(reg::LR, Word, 1);
        rtc.poll();
        assert!(rtc.deadline().is_some());
        clock.advance_ns(u64::MAX);
        rtc.poll();
        assert!(irq.is_asserted(), "a saturated deadline is reached");
    }

    #[test]
    fn timer_thread_raises_the_alarm_without_register_accesses() {
        let irq = Arc::new(TestIrq::new());
        let clock = Arc::new(FakeClock::new(T0));
        let rtc = Pl031::new(irq.clone(), clock.clone());
        let _thread = TimerThread::spawn(
            "pl031-test",
            clock.clone(),
            rtc.clone(),
            Duration::from_millis(2),
        )
        .unwrap();
        rtc.write(reg::IMSC, Word, 1);
        rtc.write(reg::MR, Word, u64::from(T0_SECS + 60));
        clock.advance_ns(60 * NANOS_PER_SEC);
        let start = Instant::now();
        while !irq.is_asserted() && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(irq.is_asserted());
    }
}
