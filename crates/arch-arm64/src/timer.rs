//! The generic timer as an emulating accelerator presents it.
//!
//! Hypervisor.framework gives the guest the real counter and virtual timer;
//! the software CPU does not, so it traps every CNT* access and answers
//! from this model: one [`Counter`] per VM (CNTVCT = CNTPCT, CNTVOFF = 0)
//! and one [`TimerRegs`] per timer per vCPU, with ISTATUS computed on every
//! read. The counter runs at 24 MHz like Apple silicon's, so a guest sees
//! the frequency it would see on the production accelerator.

use std::sync::Mutex;
use std::time::{Duration, Instant};
use vm_core::sync::lock;

/// CNTFRQ_EL0 of the vmapple machine.
pub const COUNTER_HZ: u64 = 24_000_000;

pub const CTL_ENABLE: u64 = 1 << 0;
pub const CTL_IMASK: u64 = 1 << 1;
pub const CTL_ISTATUS: u64 = 1 << 2;

/// The system counter: guest ticks derived from host monotonic time, with
/// the time the VM spent paused taken out.
#[derive(Debug)]
pub struct Counter {
    hz: u64,
    origin: Instant,
    state: Mutex<CounterState>,
}

#[derive(Debug, Default)]
struct CounterState {
    /// Host time during which the counter did not run.
    stopped_for: Duration,
    paused_since: Option<Instant>,
    /// Ticks the count had when it was last set (a restored snapshot's).
    base: u64,
}

impl Counter {
    pub fn new(hz: u64) -> Self {
        Self {
            hz,
            origin: Instant::now(),
            state: Mutex::new(CounterState::default()),
        }
    }

    pub fn frequency(&self) -> u64 {
        self.hz
    }

    fn ticks_at(&self, state: &CounterState, at: Instant) -> u64 {
        let at = state.paused_since.map_or(at, |p| p.min(at));
        let running = at
            .saturating_duration_since(self.origin)
            .saturating_sub(state.stopped_for);
        let ticks = (running.as_nanos() * u128::from(self.hz) / 1_000_000_000) as u64;
        state.base.saturating_add(ticks)
    }

    /// The count now.
    pub fn now(&self) -> u64 {
        let state = lock(&self.state);
        self.ticks_at(&state, Instant::now())
    }

    /// The host instant at which the count reaches `ticks`, or `None` while
    /// paused (the count will not get there until resumed) or if it lies
    /// beyond any representable instant.
    pub fn instant_of(&self, ticks: u64) -> Option<Instant> {
        let state = lock(&self.state);
        if state.paused_since.is_some() {
            return None;
        }
        let ticks = ticks.saturating_sub(state.base);
        let nanos = u128::from(ticks) * 1_000_000_000 / u128::from(self.hz);
        let nanos = u64::try_from(nanos).ok()?;
        self.origin
            .checked_add(state.stopped_for)?
            .checked_add(Duration::from_nanos(nanos))
    }

    /// Stops the count (VM paused). Idempotent.
    pub fn pause(&self) {
        let mut state = lock(&self.state);
        state.paused_since.get_or_insert_with(Instant::now);
    }

    /// Makes the count `ticks` now and run on from there (paused or not as
    /// it was): a restored VM's counter continues where the saved one
    /// stopped, so the guest sees no jump.
    pub fn set(&self, ticks: u64) {
        let mut state = lock(&self.state);
        let now = Instant::now();
        state.base = ticks;
        state.stopped_for = now.saturating_duration_since(self.origin);
        if state.paused_since.is_some() {
            state.paused_since = Some(now);
        }
    }

    /// Lets the count run on from where it stopped. Idempotent.
    pub fn resume(&self) {
        let mut state = lock(&self.state);
        if let Some(since) = state.paused_since.take() {
            state.stopped_for += since.elapsed();
        }
    }
}

/// CNTx_CTL and CNTx_CVAL of one timer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TimerRegs {
    ctl: u64,
    cval: u64,
}

impl TimerRegs {
    /// The condition is met: enabled and the count has reached CVAL.
    pub fn condition_met(&self, now: u64) -> bool {
        self.ctl & CTL_ENABLE != 0 && now >= self.cval
    }

    /// The timer's interrupt output (ISTATUS and not IMASK).
    pub fn output(&self, now: u64) -> bool {
        self.condition_met(now) && self.ctl & CTL_IMASK == 0
    }

    pub fn read_ctl(&self, now: u64) -> u64 {
        let istatus = if self.condition_met(now) {
            CTL_ISTATUS
        } else {
            0
        };
        self.ctl | istatus
    }

    /// ISTATUS is read-only; bits above IMASK are RES0.
    pub fn write_ctl(&mut self, value: u64) {
        self.ctl = value & (CTL_ENABLE | CTL_IMASK);
    }

    pub fn read_cval(&self) -> u64 {
        self.cval
    }

    pub fn write_cval(&mut self, value: u64) {
        self.cval = value;
    }

    /// TVAL reads as the signed 32-bit distance to CVAL.
    pub fn read_tval(&self, now: u64) -> u64 {
        self.cval.wrapping_sub(now) & 0xffff_ffff
    }

    /// Writing TVAL sets CVAL to now plus the sign-extended value.
    pub fn write_tval(&mut self, now: u64, value: u64) {
        self.cval = now.wrapping_add(value as u32 as i32 as i64 as u64);
    }

    /// The count at which the output will rise, if it is low now and
    /// will rise on its own.
    pub fn next_rise(&self, now: u64) -> Option<u64> {
        (self.ctl & CTL_ENABLE != 0 && self.ctl & CTL_IMASK == 0 && now < self.cval)
            .then_some(self.cval)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_set_counter_continues_from_the_given_count() {
        let c = Counter::new(COUNTER_HZ);
        c.pause();
        c.set(5_000_000_000);
        assert_eq!(c.now(), 5_000_000_000, "paused: exactly the count set");
        assert!(c.instant_of(5_000_000_000).is_none());
        c.resume();
        std::thread::sleep(Duration::from_millis(2));
        let later = c.now();
        assert!(later > 5_000_000_000 && later < 5_000_000_000 + COUNTER_HZ * 10);
        let at = c.instant_of(5_000_000_000 + COUNTER_HZ).unwrap();
        let wait = at.saturating_duration_since(Instant::now());
        assert!(wait <= Duration::from_secs(1), "{wait:?}");
    }

    #[test]
    fn istatus_follows_the_count() {
        let mut t = TimerRegs::default();
        t.write_cval(100);
        assert_eq!(t.read_ctl(200), 0, "disabled timers never fire");
        t.write_ctl(CTL_ENABLE | CTL_ISTATUS | 0xf0);
        assert_eq!(t.read_ctl(99), CTL_ENABLE);
        assert_eq!(t.read_ctl(100), CTL_ENABLE | CTL_ISTATUS);
        assert!(t.output(100));
        t.write_ctl(CTL_ENABLE | CTL_IMASK);
        assert_eq!(t.read_ctl(100), CTL_ENABLE | CTL_IMASK | CTL_ISTATUS);
        assert!(!t.output(100), "IMASK hides the output but not ISTATUS");
        assert_eq!(t.next_rise(50), None);
    }

    #[test]
    fn tval_is_signed_32_bits() {
        let mut t = TimerRegs::default();
        t.write_tval(1000, 500);
        assert_eq!(t.read_cval(), 1500);
        assert_eq!(t.read_tval(1200), 300);
        assert_eq!(t.read_tval(1600), 0xffff_ff9c, "-100");
        t.write_tval(1000, 0xffff_ffff);
        assert_eq!(t.read_cval(), 999);
        t.write_ctl(CTL_ENABLE);
        assert_eq!(t.next_rise(10), Some(999));
    }

    #[test]
    fn counter_runs_stops_and_maps_back_to_instants() {
        let c = Counter::new(COUNTER_HZ);
        let a = c.now();
        std::thread::sleep(Duration::from_millis(2));
        let b = c.now();
        assert!(b > a);
        c.pause();
        let p = c.now();
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(c.now(), p, "paused counter holds still");
        assert!(c.instant_of(p + 1).is_none());
        c.resume();
        let target = c.now() + COUNTER_HZ / 1000;
        let when = c.instant_of(target).unwrap();
        std::thread::sleep(when.saturating_duration_since(Instant::now()));
        assert!(c.now() >= target);
        // Far-future deadlines must not overflow instant arithmetic.
        let _ = c.instant_of(u64::MAX);
    }
}
