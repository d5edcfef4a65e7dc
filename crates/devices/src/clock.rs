//! Time sources and deadline timers for devices that act on their own:
//! the PL031 alarm ([`crate::pl031`]) and the power key's 100 ms pulse
//! ([`crate::power_button`]).
//!
//! A device never reads the time itself; it is handed a [`Clock`]. That
//! lets the machine choose the time base (host wall clock for the RTC,
//! the VM's virtual clock for the power key, vmapple-machine.md §6.8) and
//! lets tests move time by hand with a `FakeClock` (feature `test-util`)
//! instead of sleeping.
//!
//! A device with a pending deadline implements [`Timed`]: it says when it
//! next needs attention and does its work in [`Timed::poll`]. Who calls
//! `poll` is the machine's choice: its own ticker, or one [`TimerThread`]
//! per device, which sleeps until the deadline and is woken early through
//! the device's [`Waker`] whenever the deadline moves.

use std::io;
#[cfg(any(test, feature = "test-util"))]
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use vm_core::sync::{lock, wait_timeout_while};

/// Nanoseconds in one second.
pub const NANOS_PER_SEC: u64 = 1_000_000_000;

/// A source of "now" in nanoseconds. What the zero point is depends on the
/// clock: the Unix epoch for [`HostClock`], VM start for a virtual clock.
/// It must never go backwards.
pub trait Clock: Send + Sync {
    fn now_ns(&self) -> u64;
}

/// Host wall-clock time, read once at creation and then advanced by the
/// host's monotonic clock.
///
/// Anchoring on the monotonic clock means that an NTP step or a manual
/// change of the host's date while the VM runs does not make the guest's
/// RTC jump (or run backwards): the guest sees a clock that started at
/// the host's time of day and keeps counting, and it corrects itself the
/// way it would on hardware, by writing the RTC.
#[derive(Debug)]
pub struct HostClock {
    epoch_ns_at_start: u64,
    start: Instant,
}

impl HostClock {
    pub fn new() -> Self {
        let start = Instant::now();
        // A host clock set before 1970 is nonsense; count from the epoch.
        let since_epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Self {
            epoch_ns_at_start: u64::try_from(since_epoch.as_nanos()).unwrap_or(u64::MAX),
            start,
        }
    }
}

impl Default for HostClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for HostClock {
    fn now_ns(&self) -> u64 {
        let elapsed = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.epoch_ns_at_start.saturating_add(elapsed)
    }
}

/// A clock that moves only when told to, for tests (here and in the
/// machine).
#[cfg(any(test, feature = "test-util"))]
#[derive(Debug, Default)]
pub struct FakeClock {
    now: AtomicU64,
}

#[cfg(any(test, feature = "test-util"))]
impl FakeClock {
    pub fn new(start_ns: u64) -> Self {
        Self {
            now: AtomicU64::new(start_ns),
        }
    }

    /// Sets the time; a value before the current one is ignored, because a
    /// [`Clock`] never goes backwards.
    pub fn set_ns(&self, ns: u64) {
        self.now.fetch_max(ns, Ordering::SeqCst);
    }

    pub fn advance_ns(&self, delta: u64) {
        // fetch_add would wrap; time saturates instead.
        let _ = self
            .now
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |t| {
                Some(t.saturating_add(delta))
            });
    }
}

#[cfg(any(test, feature = "test-util"))]
impl Clock for FakeClock {
    fn now_ns(&self) -> u64 {
        self.now.load(Ordering::SeqCst)
    }
}

/// A device that must act when its clock reaches a deadline.
pub trait Timed: Send + Sync {
    /// Clock time (ns) at which [`Timed::poll`] has work to do, if any.
    fn deadline(&self) -> Option<u64>;
    /// Does whatever became due; harmless to call early or repeatedly.
    fn poll(&self);
    /// Woken by the device whenever its deadline changes.
    fn waker(&self) -> Waker;
}

#[derive(Debug, Default)]
struct WakeState {
    /// Bumped by every wake so a sleeper can tell it was woken.
    generation: u64,
    stop: bool,
}

/// Wakes a [`TimerThread`] so it re-reads the deadline. Cheap to clone and
/// to call when no thread listens.
#[derive(Clone, Debug, Default)]
pub struct Waker {
    inner: Arc<(Mutex<WakeState>, Condvar)>,
}

impl Waker {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn wake(&self) {
        let (state, cond) = &*self.inner;
        lock(state).generation += 1;
        cond.notify_all();
    }
}

/// A host thread that calls [`Timed::poll`] when the device's deadline
/// passes. Stopped and joined when dropped.
#[derive(Debug)]
pub struct TimerThread {
    waker: Waker,
    handle: Option<JoinHandle<()>>,
}

impl TimerThread {
    /// Starts the thread. The deadline is in `clock` time; the thread
    /// converts the distance to it into a host sleep, so `clock` must run
    /// at the host's rate (or be a [`FakeClock`] whose changes are
    /// followed by a [`Waker::wake`] or noticed within `max_sleep`).
    /// `max_sleep` bounds every sleep, so a clock that runs at a different
    /// rate than the host is still followed to within that much.
    pub fn spawn(
        name: &str,
        clock: Arc<dyn Clock>,
        target: Arc<dyn Timed>,
        max_sleep: Duration,
    ) -> io::Result<Self> {
        let waker = target.waker();
        let thread_waker = waker.clone();
        let handle = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || run_timer(&*clock, &*target, &thread_waker, max_sleep))?;
        Ok(Self {
            waker,
            handle: Some(handle),
        })
    }
}

fn run_timer(clock: &dyn Clock, target: &dyn Timed, waker: &Waker, max_sleep: Duration) {
    let (state, cond) = &*waker.inner;
    loop {
        let seen = {
            let s = lock(state);
            if s.stop {
                return;
            }
            s.generation
        };
        let sleep = match target.deadline() {
            Some(deadline) => {
                let now = clock.now_ns();
                if now >= deadline {
                    target.poll();
                    // A device that leaves a passed deadline in place would
                    // otherwise be polled in a tight loop.
                    if target.deadline() != Some(deadline) {
                        continue;
                    }
                    max_sleep
                } else {
                    Duration::from_nanos(deadline - now).min(max_sleep)
                }
            }
            None => max_sleep,
        };
        let s = lock(state);
        // A wake between reading the generation and here must not be lost.
        let _ = wait_timeout_while(cond, s, sleep, |s| !s.stop && s.generation == seen);
    }
}

impl Drop for TimerThread {
    fn drop(&mut self) {
        let (state, cond) = &*self.waker.inner;
        lock(state).stop = true;
        cond.notify_all();
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_clock_starts_at_the_wall_clock_and_moves_forward() {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let clock = HostClock::new();
        let first = clock.now_ns();
        assert!(first / NANOS_PER_SEC >= wall && first / NANOS_PER_SEC <= wall + 5);
        assert!(clock.now_ns() >= first);
    }

    #[test]
    fn fake_clock_moves_only_forward() {
        let clock = FakeClock::new(100);
        clock.advance_ns(50);
        assert_eq!(clock.now_ns(), 150);
        clock.set_ns(10);
        assert_eq!(clock.now_ns(), 150, "never backwards");
        clock.set_ns(u64::MAX);
        clock.advance_ns(1);
        assert_eq!(clock.now_ns(), u64::MAX, "saturates");
    }

    struct Counter {
        deadline: Mutex<Option<u64>>,
        polls: AtomicU64,
        waker: Waker,
    }

    impl Timed for Counter {
        fn deadline(&self) -> Option<u64> {
            *self.deadline.lock().unwrap()
        }
        fn poll(&self) {
            *self.deadline.lock().unwrap() = None;
            self.polls.fetch_add(1, Ordering::SeqCst);
        }
        fn waker(&self) -> Waker {
            self.waker.clone()
        }
    }

    fn wait_for(cond: impl Fn() -> bool) -> bool {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if cond() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }

    #[test]
    fn timer_thread_polls_once_the_clock_passes_the_deadline() {
        let clock = Arc::new(FakeClock::new(0));
        let target = Arc::new(Counter {
            deadline: Mutex::new(None),
            polls: AtomicU64::new(0),
            waker: Waker::new(),
        });
        // A long max_sleep: only a wake can make the thread look again.
        let thread = TimerThread::spawn(
            "test-timer",
            clock.clone(),
            target.clone(),
            Duration::from_secs(3600),
        )
        .unwrap();
        *target.deadline.lock().unwrap() = Some(1_000);
        target.waker.wake();
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(target.polls.load(Ordering::SeqCst), 0, "not due yet");
        clock.set_ns(1_000);
        target.waker.wake();
        assert!(wait_for(|| target.polls.load(Ordering::SeqCst) == 1));
        drop(thread);
    }
}
