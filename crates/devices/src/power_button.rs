//! The vmapple power key: QEMU's "gpio-key" helper on PL061 line 3.
//!
//! vmapple-machine.md §6.8 and §13.3: a host power-down request (QEMU's
//! `system_powerdown`, the only host-to-guest shutdown path) drives GPIO
//! line [`LINE`] of the PL061 high and (re)arms a timer of
//! [`PULSE_NS`] = 100 ms of *virtual* time; when it expires the line goes
//! low. A second request before then re-arms the timer, so the pulse is
//! extended, never doubled. Whether the pulse interrupts the guest is up to
//! how the guest programmed the PL061 (edge/level, mask bit 3).
//!
//! Time comes from a [`Clock`] the machine supplies: its virtual clock,
//! which stands still while the VM is paused, so a request made while
//! paused is still a full 100 ms pulse to the guest. Expiry happens in
//! [`PowerButton::poll`] once the clock reaches [`PowerButton::deadline`];
//! the machine calls it from its ticker or from a
//! [`TimerThread`](crate::clock::TimerThread) (the button implements
//! [`Timed`] and wakes the thread when a press moves the deadline).
//!
//! **Reset (quirk Q10, reproduced).** [`PowerButton::reset`] cancels the
//! timer and leaves the line as it is, like QEMU's gpio-key. Reset in
//! mid-pulse therefore leaves the key driving line 3 high, but the guest
//! does not see it: a machine reset also resets the PL061, which forgets
//! external levels (see [`crate::pl061`]), so line 3 reads 0 after reset,
//! exactly as under QEMU; the next press raises it again and produces a
//! fresh rising edge.

use std::sync::{Arc, Mutex, MutexGuard};
use vm_core::sync::lock;

use crate::clock::{Clock, Timed, Waker};
use crate::pl061::Pl061;

/// PL061 line the key drives.
pub const LINE: u8 = 3;

/// Length of the pulse in nanoseconds of virtual time.
pub const PULSE_NS: u64 = 100_000_000;

/// The power key.
pub struct PowerButton {
    gpio: Arc<Pl061>,
    clock: Arc<dyn Clock>,
    /// Virtual time (ns) at which the line goes low, while a pulse runs.
    release_at: Mutex<Option<u64>>,
    waker: Waker,
}

impl std::fmt::Debug for PowerButton {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PowerButton")
            .field("release_at", &*self.release_at())
            .finish()
    }
}

impl PowerButton {
    /// A released key on `gpio` line [`LINE`], timed by `clock`. The line
    /// is not touched until the first press.
    pub fn new(gpio: Arc<Pl061>, clock: Arc<dyn Clock>) -> Arc<Self> {
        Arc::new(Self {
            gpio,
            clock,
            release_at: Mutex::new(None),
            waker: Waker::new(),
        })
    }

    fn release_at(&self) -> MutexGuard<'_, Option<u64>> {
        lock(&self.release_at)
    }

    /// A host power-down request: line high, release 100 ms from now.
    pub fn press(&self) {
        let mut release_at = self.release_at();
        *release_at = Some(self.clock.now_ns().saturating_add(PULSE_NS));
        self.gpio.set_input(LINE, true);
        drop(release_at);
        self.waker.wake();
    }

    /// Virtual time (ns) at which the running pulse ends, if one runs.
    pub fn deadline(&self) -> Option<u64> {
        *self.release_at()
    }

    /// Ends the pulse if its time has come.
    pub fn poll(&self) {
        let mut release_at = self.release_at();
        if release_at.is_some_and(|at| self.clock.now_ns() >= at) {
            *release_at = None;
            self.gpio.set_input(LINE, false);
        }
    }

    /// When a running pulse ends (virtual time, ns), for a snapshot; the
    /// line's level is the GPIO controller's.
    pub fn save_state(&self) -> Option<u64> {
        *self.release_at()
    }

    /// Puts back what [`PowerButton::save_state`] returned.
    pub fn restore_state(&self, release_at: Option<u64>) {
        *self.release_at() = release_at;
        self.waker.wake();
    }

    /// Cancels a running pulse without lowering the line (Q10, see the
    /// module doc).
    pub fn reset(&self) {
        *self.release_at() = None;
        self.waker.wake();
    }
}

impl Timed for PowerButton {
    fn deadline(&self) -> Option<u64> {
        PowerButton::deadline(self)
    }

    fn poll(&self) {
        PowerButton::poll(self);
    }

    fn waker(&self) -> Waker {
        self.waker.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{FakeClock, TimerThread};
    use crate::pl061::reg;
    use std::time::{Duration, Instant};
    use vm_core::{AccessWidth, MmioDevice, TestIrq};

    const MS: u64 = 1_000_000;

    struct Rig {
        gpio: Arc<Pl061>,
        irq: Arc<TestIrq>,
        clock: Arc<FakeClock>,
        key: Arc<PowerButton>,
    }

    impl Rig {
        fn new() -> Self {
            let irq = Arc::new(TestIrq::new());
            let gpio = Pl061::new(irq.clone());
            let clock = Arc::new(FakeClock::new(5_000 * MS));
            let key = PowerButton::new(gpio.clone(), clock.clone());
            Self {
                gpio,
                irq,
                clock,
                key,
            }
        }

        /// GPIODATA bit 3, read the way a guest does.
        fn line3(&self) -> bool {
            self.gpio.read(0x3FC, AccessWidth::Word) & 0x08 != 0
        }

        fn w(&self, offset: u64, value: u64) {
            self.gpio.write(offset, AccessWidth::Word, value);
        }

        fn after_ms(&self, ms: u64) {
            self.clock.advance_ns(ms * MS);
            self.key.poll();
        }
    }

    /// §20.6 item 56.
    #[test]
    fn press_is_a_100ms_pulse_that_interrupts_on_the_rising_edge() {
        let rig = Rig::new();
        rig.w(reg::IS, 0);
        rig.w(reg::IEV, 0x08);
        rig.w(reg::IE, 0x08);
        assert!(!rig.line3());
        rig.key.press();
        assert!(rig.line3());
        assert!(rig.irq.is_asserted(), "SPI 5 on the rising edge");
        assert_eq!(rig.key.deadline(), Some(5_100 * MS));
        rig.w(reg::IC, 0x08);
        assert!(!rig.irq.is_asserted());
        rig.after_ms(99);
        assert!(rig.line3(), "still high at 99 ms");
        rig.after_ms(1);
        assert!(!rig.line3(), "low at 100 ms");
        assert_eq!(rig.key.deadline(), None);
        assert!(!rig.irq.is_asserted(), "falling edge not selected");
        assert_eq!(rig.irq.rising_edges(), 1);
    }

    #[test]
    fn second_press_extends_the_pulse() {
        let rig = Rig::new();
        rig.w(reg::IEV, 0x08);
        rig.w(reg::IE, 0x08);
        rig.key.press();
        rig.after_ms(60);
        rig.key.press();
        rig.after_ms(60);
        assert!(
            rig.line3(),
            "120 ms after the first press, 60 after the second"
        );
        rig.after_ms(39);
        assert!(rig.line3());
        rig.after_ms(1);
        assert!(!rig.line3());
        assert_eq!(rig.irq.rising_edges(), 1, "one continuous pulse");
    }

    #[test]
    fn poll_before_a_press_or_twice_does_nothing() {
        let rig = Rig::new();
        rig.gpio.set_input(LINE, true);
        rig.after_ms(1000);
        assert!(
            rig.line3(),
            "the key does not lower a line it is not pulsing"
        );
        rig.key.press();
        rig.after_ms(100);
        rig.gpio.set_input(LINE, true);
        rig.after_ms(100);
        assert!(rig.line3(), "an expired pulse does not expire again");
    }

    #[test]
    fn reset_cancels_the_timer_but_leaves_the_line_high() {
        let rig = Rig::new();
        rig.key.press();
        rig.after_ms(50);
        rig.key.reset();
        assert_eq!(rig.key.deadline(), None);
        rig.after_ms(1000);
        assert!(rig.line3(), "Q10: the key keeps driving the line");
    }

    #[test]
    fn machine_reset_in_mid_pulse_then_press_gives_a_fresh_pulse() {
        let rig = Rig::new();
        rig.key.press();
        rig.after_ms(50);
        rig.key.reset();
        rig.gpio.reset();
        assert!(!rig.line3(), "the PL061 forgot the level, as under QEMU");
        rig.w(reg::IEV, 0x08);
        rig.w(reg::IE, 0x08);
        rig.key.press();
        assert!(rig.irq.is_asserted());
        rig.after_ms(100);
        assert!(!rig.line3());
    }

    #[test]
    fn timer_thread_ends_the_pulse() {
        let rig = Rig::new();
        let _thread = TimerThread::spawn(
            "power-key-test",
            rig.clock.clone(),
            rig.key.clone(),
            Duration::from_millis(2),
        )
        .unwrap();
        rig.key.press();
        assert!(rig.line3());
        rig.clock.advance_ns(100 * MS);
        let start = Instant::now();
        while rig.line3() && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(!rig.line3());
    }

    #[test]
    fn press_at_the_end_of_time_does_not_overflow() {
        let rig = Rig::new();
        rig.clock.set_ns(u64::MAX - 10);
        rig.key.press();
        assert_eq!(rig.key.deadline(), Some(u64::MAX));
        rig.after_ms(1);
        assert!(!rig.line3());
    }
}
