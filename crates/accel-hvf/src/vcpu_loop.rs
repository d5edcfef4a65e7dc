//! The life of one vCPU thread, independent of the framework calls.
//!
//! A vCPU thread starts its vCPU when [`VmControl`] says so (boot, PSCI
//! CPU_ON), programs the GIC's IRQ/FIQ outputs before each run, turns each
//! exit into machine work ([`crate::exits`], [`crate::vtimer`]) and waits
//! while powered off or in WFI. The framework is behind [`HvVcpu`], so
//! the whole loop is exercised on any host with a scripted vCPU.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use accel::{AccelError, CpuId, CpuPower, CpuSnapshot, ExitHandler, StopReason, VmControl};
use arch_arm64::sysreg::{CNTV_CTL_EL0, CNTV_CVAL_EL0, MPIDR_EL1};
use vm_core::IrqLine;

use crate::exits::{self, Completion, LocalState, Reg, Trap, VcpuRegisters, PSTATE_EL1H_MASKED};
use crate::vtimer::{self, VtimerLine, WfiWait};

/// Why `hv_vcpu_run` returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunExit {
    /// `hv_vcpus_exit` (a kick).
    Canceled,
    /// A trapped guest exception: ESR_EL2, FAR_EL2, faulting IPA.
    Exception { syndrome: u64, far: u64, ipa: u64 },
    /// The virtual timer fired; the framework has masked it.
    VtimerActivated,
    /// Anything else the framework may report.
    Unknown(u32),
}

/// One framework vCPU, used only by the thread that created it.
pub trait HvVcpu: VcpuRegisters {
    /// Framework-specific setup of a fresh vCPU (counter offset, debug
    /// traps); the architectural entry state is written by the loop.
    fn init(&mut self) -> Result<(), AccelError>;
    fn set_vtimer_mask(&mut self, masked: bool) -> Result<(), AccelError>;
    /// Pending IRQ/FIQ for the next run only.
    fn set_pending_interrupts(&mut self, irq: bool, fiq: bool) -> Result<(), AccelError>;
    fn run(&mut self) -> Result<RunExit, AccelError>;
    /// CNTVCT_EL0 as the guest would read it now.
    fn virtual_count(&mut self) -> Result<u64, AccelError>;
    /// Host time for `ticks` of the guest counter.
    fn ticks_to_duration(&self, ticks: u64) -> Duration;
}

/// Kicks not yet seen by their vCPU thread, one flag per vCPU.
///
/// Set by every kick, cleared by the vCPU just before it programs its
/// interrupt lines: a kick that lands between then and `hv_vcpu_run` is
/// seen without relying on how the framework treats an exit request for a
/// vCPU that is not running.
pub struct PendingKicks(Box<[AtomicBool]>);

impl PendingKicks {
    pub fn new(cpus: usize) -> Self {
        Self((0..cpus).map(|_| AtomicBool::new(false)).collect())
    }

    pub fn set(&self, cpu: CpuId) {
        if let Some(p) = self.0.get(cpu) {
            p.store(true, Ordering::SeqCst);
        }
    }

    fn clear(&self, cpu: CpuId) {
        if let Some(p) = self.0.get(cpu) {
            p.store(false, Ordering::SeqCst);
        }
    }

    fn is_set(&self, cpu: CpuId) -> bool {
        self.0.get(cpu).is_some_and(|p| p.load(Ordering::SeqCst))
    }
}

/// What one vCPU thread works with.
pub struct VcpuThread<'a> {
    pub cpu: CpuId,
    pub mpidr: u64,
    pub vtimer_irq: &'a dyn IrqLine,
    pub handler: &'a dyn ExitHandler,
    pub control: &'a VmControl,
    pub kicks: &'a PendingKicks,
    /// Where the registers are left when the thread ends or the guest
    /// crashes.
    pub snapshot: &'a Mutex<Option<CpuSnapshot>>,
}

impl VcpuThread<'_> {
    /// Runs the vCPU until the VM stops. `create` makes a fresh vCPU on
    /// this thread (dropping one destroys it). A host failure or a panic
    /// stops the whole VM and is returned.
    pub fn main<V: HvVcpu>(
        &self,
        create: impl FnMut() -> Result<V, AccelError>,
    ) -> Result<(), AccelError> {
        let result = match catch_unwind(AssertUnwindSafe(|| self.run_loop(create))) {
            Ok(r) => r,
            Err(panic) => {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                Err(AccelError::Run(format!(
                    "vCPU {} thread panicked: {message}",
                    self.cpu
                )))
            }
        };
        if result.is_err() {
            self.control.request_stop(StopReason::HostStop);
        }
        result
    }

    fn save_snapshot(&self, vcpu: &mut impl HvVcpu) {
        match exits::capture(vcpu) {
            Ok(snap) => *self.snapshot.lock().unwrap_or_else(|e| e.into_inner()) = Some(snap),
            Err(e) => tracing::warn!(cpu = self.cpu, "no register snapshot: {e}"),
        }
    }

    fn drive_vtimer(&self, level: Option<bool>) {
        if let Some(level) = level {
            self.vtimer_irq.set_level(level);
        }
    }

    fn start<V: HvVcpu>(
        &self,
        create: &mut impl FnMut() -> Result<V, AccelError>,
        entry: u64,
        context_id: u64,
    ) -> Result<V, AccelError> {
        let mut v = create()?;
        v.init()?;
        v.write(Reg::Pc, entry)?;
        v.write(Reg::X(0), context_id)?;
        v.write(Reg::Pstate, PSTATE_EL1H_MASKED)?;
        v.write(Reg::Sys(MPIDR_EL1), self.mpidr)?;
        tracing::debug!(
            cpu = self.cpu,
            entry = format_args!("{entry:#x}"),
            context_id,
            "vCPU started"
        );
        Ok(v)
    }

    fn run_loop<V: HvVcpu>(
        &self,
        mut create: impl FnMut() -> Result<V, AccelError>,
    ) -> Result<(), AccelError> {
        let cpu = self.cpu;
        let control = self.control;
        let mut vcpu: Option<V> = None;
        let mut local = LocalState::default();
        let mut vtimer = VtimerLine::default();
        loop {
            if control.stop_requested() {
                break;
            }
            if let Some((entry, context_id)) = control.take_start(cpu) {
                // A new vCPU is the reset state; the old one goes first.
                drop(vcpu.take());
                vcpu = Some(self.start(&mut create, entry, context_id)?);
                local = LocalState::default();
                self.drive_vtimer(vtimer.reset());
                continue;
            }
            let on = control.power(cpu) == CpuPower::On;
            let Some(v) = vcpu.as_mut().filter(|_| on) else {
                if on {
                    return Err(AccelError::Run(format!(
                        "vCPU {cpu} is marked on but was never started"
                    )));
                }
                control.wait(None, || control.power(cpu) != CpuPower::Off);
                continue;
            };

            if vtimer.masked() {
                let sync = vtimer.sync(v.read(Reg::Sys(CNTV_CTL_EL0))?);
                self.drive_vtimer(sync.set_level);
                if sync.unmask {
                    v.set_vtimer_mask(false)?;
                }
            }
            self.kicks.clear(cpu);
            let (irq, fiq) = control.interrupt_lines(cpu);
            v.set_pending_interrupts(irq, fiq)?;
            if self.kicks.is_set(cpu) {
                // Lines, power or the stop flag moved meanwhile: re-read.
                continue;
            }
            match v.run()? {
                // A kick: the top of the loop re-reads stop, power and lines.
                RunExit::Canceled => {}
                RunExit::VtimerActivated => self.drive_vtimer(vtimer.activated()),
                RunExit::Exception { syndrome, far, ipa } => {
                    match exits::translate(syndrome, far, ipa, v, &mut local)? {
                        Trap::Exit { exit, pending } => {
                            let response = self.handler.handle(cpu, exit);
                            match exits::complete(pending, response, v)? {
                                Completion::Continue => {}
                                // The handler has marked the vCPU off.
                                Completion::CpuOff => tracing::debug!(cpu, "vCPU powered off"),
                                Completion::Suspend => self.wait_for_interrupt(v, &vtimer)?,
                            }
                        }
                        Trap::WaitForInterrupt => self.wait_for_interrupt(v, &vtimer)?,
                        Trap::Handled => {}
                        Trap::Crash(report) => {
                            let report = format!("vCPU {cpu}: {report}");
                            tracing::error!("{report}");
                            self.save_snapshot(v);
                            control.request_stop(StopReason::GuestCrash(report));
                        }
                    }
                }
                RunExit::Unknown(reason) => {
                    return Err(AccelError::Run(format!(
                        "vCPU {cpu}: unexpected exit reason {reason}"
                    )))
                }
            }
        }
        if let Some(v) = vcpu.as_mut() {
            if self
                .snapshot
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_none()
            {
                self.save_snapshot(v);
            }
        }
        Ok(())
    }

    /// WFI or CPU_SUSPEND: sleep until an interrupt line rises, the vtimer
    /// would fire, the vCPU's power changes or the VM stops.
    fn wait_for_interrupt(
        &self,
        v: &mut impl HvVcpu,
        vtimer: &VtimerLine,
    ) -> Result<(), AccelError> {
        let cpu = self.cpu;
        let control = self.control;
        let pending = || {
            let (irq, fiq) = control.interrupt_lines(cpu);
            irq || fiq || control.power(cpu) != CpuPower::On
        };
        if pending() {
            return Ok(());
        }
        // While the framework holds the vtimer masked its line is already
        // up at the GIC: only an interrupt delivery can wake us.
        let wait = if vtimer.masked() {
            WfiWait::Indefinitely
        } else {
            let ctl = v.read(Reg::Sys(CNTV_CTL_EL0))?;
            let cval = v.read(Reg::Sys(CNTV_CVAL_EL0))?;
            vtimer::wfi_wait(ctl, cval, v.virtual_count()?)
        };
        let deadline = match wait {
            WfiWait::NotAtAll => return Ok(()),
            WfiWait::Indefinitely => None,
            WfiWait::Ticks(t) => Instant::now().checked_add(v.ticks_to_duration(t)),
        };
        control.wait(deadline, pending);
        Ok(())
    }
}
