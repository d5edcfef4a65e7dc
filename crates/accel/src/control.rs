//! State shared by the machine, the interrupt controller and the
//! accelerator while a VM runs.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::Instant;
use vm_core::sync::{lock, read_lock, wait, wait_timeout, write_lock};

use arch_arm64::psci::{AffinityState, PsciError};

use crate::CpuId;

/// Power state of one vCPU (PSCI's view).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum CpuPower {
    Off,
    /// Asked to start at `entry` with x0 = `context_id`; the accelerator
    /// has not picked it up yet.
    Starting {
        entry: u64,
        context_id: u64,
    },
    On,
}

/// Why a VM stopped running.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// PSCI SYSTEM_OFF (or pvpanic's orderly shutdown).
    PowerOff,
    /// PSCI SYSTEM_RESET: the machine resets and runs again.
    Reset,
    /// The guest reported a panic (pvpanic) and policy says stop.
    GuestPanic,
    /// The guest put a vCPU where it cannot continue (e.g. executing
    /// outside RAM). The string says what happened.
    GuestCrash(String),
    /// The host asked the VM to stop now (second SIGINT, `stop` command).
    HostStop,
    /// The machine wants the vCPUs back at an instruction boundary to save
    /// a snapshot, then runs them on. The weakest reason: any other one
    /// given before the VM runs again replaces it.
    Save,
}

/// Makes a running vCPU come back to its accelerator's loop soon, at an
/// instruction boundary. Must be callable from any thread.
pub trait Kick: Send + Sync {
    fn kick(&self, cpu: CpuId);
}

struct CpuSlot {
    power: Mutex<CpuPower>,
    irq: AtomicBool,
    fiq: AtomicBool,
}

/// The control block of a running VM.
pub struct VmControl {
    cpus: Box<[CpuSlot]>,
    stop_flag: AtomicBool,
    stop: Mutex<Option<StopReason>>,
    paused: AtomicBool,
    /// Bumped on every event a waiting vCPU may care about.
    generation: Mutex<u64>,
    changed: Condvar,
    kicker: RwLock<Option<Arc<dyn Kick>>>,
}

impl VmControl {
    /// A control block for `cpus` vCPUs, all powered off.
    pub fn new(cpus: usize) -> Self {
        Self {
            cpus: (0..cpus)
                .map(|_| CpuSlot {
                    power: Mutex::new(CpuPower::Off),
                    irq: AtomicBool::new(false),
                    fiq: AtomicBool::new(false),
                })
                .collect(),
            stop_flag: AtomicBool::new(false),
            stop: Mutex::new(None),
            paused: AtomicBool::new(false),
            generation: Mutex::new(0),
            changed: Condvar::new(),
            kicker: RwLock::new(None),
        }
    }

    pub fn cpu_count(&self) -> usize {
        self.cpus.len()
    }

    /// The accelerator registers how to kick its vCPUs before running.
    pub fn set_kicker(&self, kicker: Arc<dyn Kick>) {
        *write_lock(&self.kicker) = Some(kicker);
    }

    /// Makes every running vCPU come back to its accelerator's loop (which
    /// then re-reads lines, power states and the stop flag).
    pub fn kick_all(&self) {
        for cpu in 0..self.cpus.len() {
            self.kick(cpu);
        }
    }

    fn kick(&self, cpu: CpuId) {
        if let Some(k) = read_lock(&self.kicker).as_ref() {
            k.kick(cpu);
        }
    }

    fn notify(&self) {
        let mut g = lock(&self.generation);
        *g = g.wrapping_add(1);
        self.changed.notify_all();
    }

    /// Power-on state for a (re)boot: CPU 0 starts at `entry` with
    /// x0 = `x0` (0 for firmware, the DTB address for a Linux kernel), the
    /// others are off, the stop reason is cleared, interrupt lines drop.
    pub fn reset_for_boot(&self, entry: u64, x0: u64) {
        for (i, slot) in self.cpus.iter().enumerate() {
            *lock(&slot.power) = if i == 0 {
                CpuPower::Starting {
                    entry,
                    context_id: x0,
                }
            } else {
                CpuPower::Off
            };
            slot.irq.store(false, Ordering::SeqCst);
            slot.fiq.store(false, Ordering::SeqCst);
        }
        *lock(&self.stop) = None;
        self.stop_flag.store(false, Ordering::SeqCst);
        self.notify();
    }

    pub fn power(&self, cpu: CpuId) -> CpuPower {
        self.cpus
            .get(cpu)
            .map_or(CpuPower::Off, |s| *lock(&s.power))
    }

    /// PSCI CPU_ON.
    pub fn cpu_on(&self, cpu: CpuId, entry: u64, context_id: u64) -> Result<(), PsciError> {
        let slot = self.cpus.get(cpu).ok_or(PsciError::InvalidParameters)?;
        {
            let mut power = lock(&slot.power);
            match *power {
                CpuPower::On => return Err(PsciError::AlreadyOn),
                CpuPower::Starting { .. } => return Err(PsciError::OnPending),
                CpuPower::Off => *power = CpuPower::Starting { entry, context_id },
            }
        }
        self.notify();
        self.kick(cpu);
        Ok(())
    }

    /// PSCI CPU_OFF of `cpu` by itself.
    pub fn cpu_off(&self, cpu: CpuId) {
        if let Some(slot) = self.cpus.get(cpu) {
            *lock(&slot.power) = CpuPower::Off;
            self.notify();
        }
    }

    /// The accelerator takes a pending start: returns `(entry, context_id)`
    /// and marks the vCPU on.
    pub fn take_start(&self, cpu: CpuId) -> Option<(u64, u64)> {
        let slot = self.cpus.get(cpu)?;
        let mut power = lock(&slot.power);
        match *power {
            CpuPower::Starting { entry, context_id } => {
                *power = CpuPower::On;
                Some((entry, context_id))
            }
            _ => None,
        }
    }

    /// AFFINITY_INFO's answer for `cpu`.
    pub fn affinity_state(&self, cpu: CpuId) -> AffinityState {
        match self.power(cpu) {
            CpuPower::Off => AffinityState::Off,
            CpuPower::Starting { .. } => AffinityState::OnPending,
            CpuPower::On => AffinityState::On,
        }
    }

    /// The interrupt controller's outputs to `cpu`.
    pub fn set_interrupt_lines(&self, cpu: CpuId, irq: bool, fiq: bool) {
        let Some(slot) = self.cpus.get(cpu) else {
            return;
        };
        let irq_was = slot.irq.swap(irq, Ordering::SeqCst);
        let fiq_was = slot.fiq.swap(fiq, Ordering::SeqCst);
        if irq_was != irq || fiq_was != fiq {
            if irq || fiq {
                self.notify();
            }
            self.kick(cpu);
        }
    }

    /// `(irq, fiq)` levels into `cpu`.
    // This and the stop and pause flags are read after every MMIO access
    // of the software CPU: worth inlining.
    #[inline]
    pub fn interrupt_lines(&self, cpu: CpuId) -> (bool, bool) {
        self.cpus.get(cpu).map_or((false, false), |s| {
            (s.irq.load(Ordering::SeqCst), s.fiq.load(Ordering::SeqCst))
        })
    }

    /// Asks every vCPU to stop; the first reason given is kept.
    pub fn request_stop(&self, reason: StopReason) {
        {
            let mut stop = lock(&self.stop);
            if stop.is_none() || *stop == Some(StopReason::Save) {
                *stop = Some(reason);
            }
        }
        self.stop_flag.store(true, Ordering::SeqCst);
        self.notify();
        self.kick_all();
    }

    /// After a [`StopReason::Save`]: lets the vCPUs run on. Returns false
    /// (and changes nothing) if another stop reason came meanwhile.
    pub fn clear_save(&self) -> bool {
        let mut stop = lock(&self.stop);
        if *stop != Some(StopReason::Save) {
            return false;
        }
        *stop = None;
        self.stop_flag.store(false, Ordering::SeqCst);
        drop(stop);
        self.notify();
        true
    }

    /// Every vCPU's power state, for a snapshot.
    pub fn powers(&self) -> Vec<CpuPower> {
        self.cpus.iter().map(|s| *lock(&s.power)).collect()
    }

    /// Puts back what [`Self::powers`] returned (a restored VM: no boot,
    /// the vCPUs carry on from their saved registers). Interrupt lines
    /// are the GIC's to drive again.
    pub fn restore_powers(&self, powers: &[CpuPower]) -> Result<(), String> {
        if powers.len() != self.cpus.len() {
            return Err(format!(
                "{} vCPU power states for {} vCPUs",
                powers.len(),
                self.cpus.len()
            ));
        }
        for (slot, power) in self.cpus.iter().zip(powers) {
            *lock(&slot.power) = *power;
        }
        *lock(&self.stop) = None;
        self.stop_flag.store(false, Ordering::SeqCst);
        self.notify();
        Ok(())
    }

    /// Cheap check for the vCPU loops.
    #[inline]
    pub fn stop_requested(&self) -> bool {
        self.stop_flag.load(Ordering::SeqCst)
    }

    pub fn stop_reason(&self) -> Option<StopReason> {
        lock(&self.stop).clone()
    }

    /// Asks every vCPU to stop executing until [`Self::resume`]. The
    /// accelerator parks its vCPUs at an instruction boundary; devices and
    /// the guest's state are untouched. Whoever pauses also pauses the
    /// guest's clock (the machine does both).
    pub fn pause(&self) {
        self.paused.store(true, Ordering::SeqCst);
        self.notify();
        self.kick_all();
    }

    /// Lets paused vCPUs run again.
    pub fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
        self.notify();
    }

    /// True between [`Self::pause`] and [`Self::resume`].
    #[inline]
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    /// Parks the caller while the VM is paused; returns at once if it is
    /// not, and early if a stop is requested.
    pub fn wait_while_paused(&self) {
        self.wait(None, || !self.is_paused());
    }

    /// Wakes any thread in [`Self::wait`] so it re-checks its condition.
    pub fn wake(&self) {
        self.notify();
    }

    /// Blocks until `ready()` holds, a stop is requested, or `deadline`
    /// passes. `ready` is re-evaluated after every event.
    pub fn wait(&self, deadline: Option<Instant>, mut ready: impl FnMut() -> bool) {
        let mut generation = lock(&self.generation);
        loop {
            if ready() || self.stop_requested() {
                return;
            }
            let seen = *generation;
            while *generation == seen {
                match deadline {
                    None => {
                        generation = wait(&self.changed, generation);
                    }
                    Some(d) => {
                        let now = Instant::now();
                        if now >= d {
                            return;
                        }
                        generation = wait_timeout(&self.changed, generation, d - now).0;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    #[derive(Default)]
    struct CountKicks(AtomicUsize);
    impl Kick for CountKicks {
        fn kick(&self, _cpu: CpuId) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn boot_and_cpu_on_lifecycle() {
        let c = VmControl::new(2);
        c.reset_for_boot(0x10_0000, 0);
        assert_eq!(c.affinity_state(1), AffinityState::Off);
        assert_eq!(c.take_start(0), Some((0x10_0000, 0)));
        assert_eq!(c.take_start(0), None);
        assert_eq!(c.cpu_on(0, 0, 0), Err(PsciError::AlreadyOn));
        c.cpu_on(1, 0x7000_0000, 9).unwrap();
        assert_eq!(c.affinity_state(1), AffinityState::OnPending);
        assert_eq!(c.cpu_on(1, 0, 0), Err(PsciError::OnPending));
        assert_eq!(c.take_start(1), Some((0x7000_0000, 9)));
        c.cpu_off(1);
        assert_eq!(c.affinity_state(1), AffinityState::Off);
        assert_eq!(c.cpu_on(5, 0, 0), Err(PsciError::InvalidParameters));
    }

    #[test]
    fn first_stop_reason_wins_and_kicks_everyone() {
        let c = VmControl::new(3);
        let kicks = Arc::new(CountKicks::default());
        c.set_kicker(kicks.clone());
        c.request_stop(StopReason::PowerOff);
        c.request_stop(StopReason::Reset);
        assert!(c.stop_requested());
        assert_eq!(c.stop_reason(), Some(StopReason::PowerOff));
        assert_eq!(kicks.0.load(Ordering::SeqCst), 6);
        c.reset_for_boot(0, 0);
        assert!(!c.stop_requested());
    }

    #[test]
    fn a_save_stop_gives_way_to_any_other_and_clears_alone() {
        let c = VmControl::new(1);
        c.request_stop(StopReason::Save);
        assert!(c.stop_requested());
        assert!(c.clear_save());
        assert!(!c.stop_requested());
        c.request_stop(StopReason::Save);
        c.request_stop(StopReason::PowerOff);
        assert!(!c.clear_save(), "a power-off during a save is kept");
        assert_eq!(c.stop_reason(), Some(StopReason::PowerOff));
        c.request_stop(StopReason::Save);
        assert_eq!(c.stop_reason(), Some(StopReason::PowerOff));
    }

    #[test]
    fn powers_round_trip() {
        let c = VmControl::new(2);
        c.reset_for_boot(0x1000, 0);
        c.take_start(0);
        c.cpu_on(1, 0x2000, 7).unwrap();
        let saved = c.powers();
        let d = VmControl::new(2);
        d.restore_powers(&saved).unwrap();
        assert_eq!(d.powers(), saved);
        assert_eq!(d.take_start(1), Some((0x2000, 7)));
        assert!(VmControl::new(3).restore_powers(&saved).is_err());
    }

    #[test]
    fn interrupt_wakes_a_waiter() {
        let c = Arc::new(VmControl::new(1));
        let c2 = c.clone();
        let t = std::thread::spawn(move || {
            c2.wait(Some(Instant::now() + Duration::from_secs(20)), || {
                c2.interrupt_lines(0).0
            });
            c2.interrupt_lines(0).0
        });
        std::thread::sleep(Duration::from_millis(20));
        c.set_interrupt_lines(0, true, false);
        assert!(t.join().unwrap());
    }

    #[test]
    fn pause_parks_until_resume_or_stop() {
        let c = Arc::new(VmControl::new(1));
        let kicks = Arc::new(CountKicks::default());
        c.set_kicker(kicks.clone());
        c.pause();
        assert!(c.is_paused());
        assert_eq!(
            kicks.0.load(Ordering::SeqCst),
            1,
            "running vCPUs are kicked"
        );
        let c2 = c.clone();
        let t = std::thread::spawn(move || {
            c2.wait_while_paused();
            c2.is_paused()
        });
        std::thread::sleep(Duration::from_millis(20));
        assert!(!t.is_finished(), "a paused VM stays parked");
        c.resume();
        assert!(!t.join().unwrap());

        c.pause();
        let c3 = c.clone();
        let t = std::thread::spawn(move || c3.wait_while_paused());
        c.request_stop(StopReason::HostStop);
        t.join().unwrap();
    }

    #[test]
    fn wait_honours_deadline() {
        let c = VmControl::new(1);
        let start = Instant::now();
        c.wait(Some(start + Duration::from_millis(10)), || false);
        assert!(start.elapsed() >= Duration::from_millis(10));
    }
}
