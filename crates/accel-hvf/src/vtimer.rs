//! The EL1 virtual timer under Hypervisor.framework.
//!
//! The guest owns the real virtual timer (CNTV_*), so unlike the software
//! CPU nothing here emulates its registers. When the timer fires while the
//! guest runs, the framework masks it and exits with "vtimer activated";
//! the VMM must then raise the timer's PPI (INTID 27,
//! vmapple-machine.md §5) on its own interrupt controller, and may unmask
//! only once the guest has dealt with it — otherwise the vCPU would exit
//! again at once, forever. [`VtimerLine`] is that state machine.
//!
//! While a vCPU waits in WFI the VMM, not the hardware, must notice the
//! timer's deadline: [`wfi_wait`] computes it from CNTV_CTL/CNTV_CVAL.

use std::sync::Mutex;
use std::time::Duration;
use vm_core::sync::lock;

use arch_arm64::timer::{CTL_ENABLE, CTL_IMASK, CTL_ISTATUS};

/// The vtimer's PPI level and mask, as the vCPU loop tracks them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VtimerLine {
    /// The framework holds the timer masked since it last fired.
    masked: bool,
    /// Level last driven on the PPI.
    level: bool,
}

/// What the vCPU loop must do after [`VtimerLine::sync`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VtimerSync {
    /// Drive the PPI to this level (only when it changes).
    pub set_level: Option<bool>,
    /// Clear the framework's vtimer mask.
    pub unmask: bool,
}

/// The timer's output by its control register: enabled, condition met,
/// not masked by the guest.
pub fn output(cntv_ctl: u64) -> bool {
    cntv_ctl & (CTL_ENABLE | CTL_IMASK | CTL_ISTATUS) == (CTL_ENABLE | CTL_ISTATUS)
}

impl VtimerLine {
    /// A freshly started vCPU: unmasked, line low. Returns the level to
    /// drive if the line was high.
    pub fn reset(&mut self) -> Option<bool> {
        self.masked = false;
        std::mem::take(&mut self.level).then_some(false)
    }

    /// Whether [`Self::sync`] needs CNTV_CTL before the next run.
    pub fn masked(&self) -> bool {
        self.masked
    }

    /// The framework reported the timer firing (and masked it). Returns
    /// the level to drive, if it changed.
    pub fn activated(&mut self) -> Option<bool> {
        self.masked = true;
        (!std::mem::replace(&mut self.level, true)).then_some(true)
    }

    /// Before running a masked vCPU: the line follows the timer's output;
    /// once the guest has handled it (disabled, masked or re-armed the
    /// timer) the line drops and the framework's mask is lifted.
    pub fn sync(&mut self, cntv_ctl: u64) -> VtimerSync {
        if !self.masked {
            return VtimerSync::default();
        }
        let level = output(cntv_ctl);
        let set_level = (level != self.level).then_some(level);
        self.level = level;
        if !level {
            self.masked = false;
        }
        VtimerSync {
            set_level,
            unmask: !level,
        }
    }
}

/// How long a vCPU in WFI may sleep, as far as its virtual timer goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WfiWait {
    /// The timer will not fire: wait for an interrupt or a kick only.
    Indefinitely,
    /// The timer fires after this many counter ticks.
    Ticks(u64),
    /// The timer's condition already holds: do not sleep.
    NotAtAll,
}

/// The vtimer's deadline for a vCPU in WFI, from CNTV_CTL_EL0,
/// CNTV_CVAL_EL0 and the virtual count now.
pub fn wfi_wait(cntv_ctl: u64, cntv_cval: u64, now: u64) -> WfiWait {
    if cntv_ctl & CTL_ENABLE == 0 || cntv_ctl & CTL_IMASK != 0 {
        WfiWait::Indefinitely
    } else if now >= cntv_cval {
        WfiWait::NotAtAll
    } else {
        WfiWait::Ticks(cntv_cval - now)
    }
}

/// Host time for `ticks` of the counter, given the host timebase
/// (`mach_timebase_info`: nanoseconds = ticks × numer / denom).
pub fn ticks_to_duration(ticks: u64, numer: u32, denom: u32) -> Duration {
    let nanos = u128::from(ticks) * u128::from(numer) / u128::from(denom.max(1));
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

/// The guest's counter: CNTVCT_EL0 = host count − offset, one offset for
/// every vCPU. Pausing the VM stops the guest's count by growing the
/// offset by the time spent paused, as the software CPU's counter does.
#[derive(Debug)]
pub struct GuestClock {
    state: Mutex<ClockState>,
}

#[derive(Debug)]
struct ClockState {
    offset: u64,
    paused_at: Option<u64>,
}

impl GuestClock {
    /// A clock whose count is 0 at host count `origin`.
    pub fn new(origin: u64) -> Self {
        Self {
            state: Mutex::new(ClockState {
                offset: origin,
                paused_at: None,
            }),
        }
    }

    pub fn offset(&self) -> u64 {
        lock(&self.state).offset
    }

    /// The VM is paused since host count `now` (the first caller of a
    /// pause decides; later ones change nothing).
    pub fn pause(&self, now: u64) {
        let mut s = lock(&self.state);
        s.paused_at.get_or_insert(now);
    }

    /// The guest's count at host count `now` (frozen while paused).
    pub fn count(&self, now: u64) -> u64 {
        let s = lock(&self.state);
        s.paused_at.unwrap_or(now).wrapping_sub(s.offset)
    }

    /// Makes the guest's count `count` at host count `now`, paused or not
    /// as it was (a restored VM's counter continues from its snapshot).
    pub fn set(&self, count: u64, now: u64) {
        let mut s = lock(&self.state);
        s.offset = now.wrapping_sub(count);
        if s.paused_at.is_some() {
            s.paused_at = Some(now);
        }
    }

    /// The VM runs again at host count `now`: the guest's count carries on
    /// from where it stopped. Idempotent.
    pub fn resume(&self, now: u64) {
        let mut s = lock(&self.state);
        if let Some(since) = s.paused_at.take() {
            s.offset = s.offset.wrapping_add(now.saturating_sub(since));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_stays_up_and_masked_until_the_guest_handles_the_timer() {
        let mut v = VtimerLine::default();
        assert_eq!(
            v.sync(CTL_ENABLE | CTL_ISTATUS),
            VtimerSync::default(),
            "not masked: hardware's business"
        );
        assert_eq!(v.activated(), Some(true));
        assert!(v.masked());
        // Guest has not acknowledged yet: line high, still masked.
        assert_eq!(
            v.sync(CTL_ENABLE | CTL_ISTATUS),
            VtimerSync {
                set_level: None,
                unmask: false
            }
        );
        // The guest masked the timer in its handler: line drops, unmask.
        assert_eq!(
            v.sync(CTL_ENABLE | CTL_IMASK | CTL_ISTATUS),
            VtimerSync {
                set_level: Some(false),
                unmask: true
            }
        );
        assert!(!v.masked());
        // Fires again; this time the guest re-arms (ISTATUS clears).
        assert_eq!(v.activated(), Some(true));
        assert_eq!(
            v.sync(CTL_ENABLE),
            VtimerSync {
                set_level: Some(false),
                unmask: true
            }
        );
        // Firing twice without an unmask in between drives the line once.
        v.activated();
        assert_eq!(v.activated(), None);
        assert_eq!(v.reset(), Some(false));
        assert_eq!(v.reset(), None);
        assert!(!v.masked());
    }

    #[test]
    fn the_guest_count_stands_still_while_paused() {
        let c = GuestClock::new(1000);
        let guest = |host: u64| host - c.offset();
        assert_eq!(guest(1500), 500);
        c.pause(1500);
        c.pause(1700); // a second vCPU noticing later
        c.resume(2500);
        c.resume(2600); // and resuming later
        assert_eq!(guest(2500), 500, "the count resumes where it stopped");
        assert_eq!(guest(2600), 600);
        c.resume(9000);
        assert_eq!(c.offset(), 2000, "resume without pause changes nothing");
    }

    #[test]
    fn wfi_sleeps_until_cval() {
        assert_eq!(wfi_wait(0, 100, 0), WfiWait::Indefinitely);
        assert_eq!(
            wfi_wait(CTL_ENABLE | CTL_IMASK, 100, 0),
            WfiWait::Indefinitely
        );
        assert_eq!(wfi_wait(CTL_ENABLE, 100, 40), WfiWait::Ticks(60));
        assert_eq!(wfi_wait(CTL_ENABLE, 100, 100), WfiWait::NotAtAll);
        assert_eq!(wfi_wait(CTL_ENABLE, u64::MAX, 0), WfiWait::Ticks(u64::MAX));
    }

    #[test]
    fn apple_silicon_timebase_is_24_mhz() {
        // numer/denom = 125/3 on Apple silicon: 24 ticks per microsecond.
        assert_eq!(
            ticks_to_duration(24_000_000, 125, 3),
            Duration::from_secs(1)
        );
        assert_eq!(ticks_to_duration(24, 125, 3), Duration::from_micros(1));
        assert_eq!(ticks_to_duration(1000, 1, 1), Duration::from_nanos(1000));
        // Absurd deadlines saturate instead of overflowing.
        assert_eq!(
            ticks_to_duration(u64::MAX, u32::MAX, 1),
            Duration::from_nanos(u64::MAX)
        );
        assert_eq!(ticks_to_duration(5, 1, 0), Duration::from_nanos(5));
    }
}
