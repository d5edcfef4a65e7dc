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
use vm_core::sync::lock;

use accel::{AccelError, CpuId, CpuPower, CpuSnapshot, ExitHandler, StopReason, VmControl};
use arch_arm64::sysreg::{CNTV_CTL_EL0, CNTV_CVAL_EL0, ID_AA64PFR0_EL1, MPIDR_EL1};
use vm_core::{GuestRam, IrqLine};

use crate::exits::{self, Completion, LocalState, Reg, Trap, VcpuRegisters, PSTATE_EL1H_MASKED};
use crate::vtimer::{self, GuestClock, VtimerLine, WfiWait};

/// ID_AA64PFR0_EL1.GIC, bits 27:24: 1 = GICv3/v4 system registers.
const PFR0_GIC_MASK: u64 = 0xf << 24;
const PFR0_GIC_SYSREGS: u64 = 1 << 24;

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
    /// CNTVCT_EL0 = host count − `offset` from now on.
    fn set_counter_offset(&mut self, offset: u64) -> Result<(), AccelError>;
    /// FPCR, FPSR and the SIMD/FP registers, for snapshots.
    fn read_fp(&mut self) -> Result<crate::saved::FpState, AccelError> {
        Err(AccelError::run("this vCPU cannot read SIMD/FP registers"))
    }
    fn write_fp(&mut self, fp: &crate::saved::FpState) -> Result<(), AccelError> {
        let _ = fp;
        Err(AccelError::run("this vCPU cannot write SIMD/FP registers"))
    }
}

/// The host's view of the counter the guest's derives from.
pub trait HostCounter: Sync {
    /// The host count now.
    fn now(&self) -> u64;
    /// Host time for `ticks` of the counter.
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
    /// Guest RAM, for reading the instructions of syndrome-less aborts.
    pub memory: &'a GuestRam,
    pub control: &'a VmControl,
    pub kicks: &'a PendingKicks,
    pub clock: &'a GuestClock,
    pub host: &'a dyn HostCounter,
    /// Where the registers are left when the thread ends or the guest
    /// crashes.
    pub snapshot: &'a Mutex<Option<CpuSnapshot>>,
    /// The vCPU's whole state across a [`StopReason::Save`] stop: filled
    /// when the thread ends for one, taken (and the vCPU created from it)
    /// when the next run starts.
    pub saved: &'a Mutex<Option<crate::saved::SavedVcpu>>,
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
                Err(AccelError::run(format!(
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
            Ok(snap) => *lock(self.snapshot) = Some(snap),
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
        // Our GIC's CPU interface is reached through the ICC_* system
        // registers (trapped to it), which ID_AA64PFR0_EL1.GIC = 1 tells
        // the guest. Without its own GIC the framework leaves the field 0
        // (QEMU sets it the same way); Linux then runs without the
        // system-register GIC feature (found by the framework double).
        let pfr0 = v.read(Reg::Sys(ID_AA64PFR0_EL1))?;
        v.write(
            Reg::Sys(ID_AA64PFR0_EL1),
            (pfr0 & !PFR0_GIC_MASK) | PFR0_GIC_SYSREGS,
        )?;
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
        // The offset the vCPU has, if any.
        let mut offset = None;
        if let Some(saved) = lock(self.saved).take() {
            if control.power(cpu) == CpuPower::On {
                vcpu = Some(self.resume(&mut create, &saved)?);
                vtimer = saved.vtimer;
            }
        }
        loop {
            if control.stop_requested() {
                break;
            }
            if control.is_paused() {
                self.clock.pause(self.host.now());
                control.wait_while_paused();
                self.clock.resume(self.host.now());
                continue;
            }
            if let Some((entry, context_id)) = control.take_start(cpu) {
                // A new vCPU is the reset state; the old one goes first.
                drop(vcpu.take());
                vcpu = Some(self.start(&mut create, entry, context_id)?);
                offset = None;
                local = LocalState::default();
                self.drive_vtimer(vtimer.reset());
                continue;
            }
            let on = control.power(cpu) == CpuPower::On;
            let Some(v) = vcpu.as_mut().filter(|_| on) else {
                if on {
                    return Err(AccelError::run(format!(
                        "vCPU {cpu} is marked on but was never started"
                    )));
                }
                control.wait(None, || {
                    control.power(cpu) != CpuPower::Off || control.is_paused()
                });
                continue;
            };

            let current = self.clock.offset();
            if offset != Some(current) {
                v.set_counter_offset(current)?;
                offset = Some(current);
            }

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
                        Trap::Emulate { far, ipa } => {
                            let handler = self.handler;
                            let mut mmio = |exit| handler.handle(cpu, exit);
                            if let Some(report) = crate::emulate::without_syndrome(
                                far,
                                ipa,
                                v,
                                self.memory,
                                &mut mmio,
                            )? {
                                let report = format!("vCPU {cpu}: {report}");
                                tracing::error!("{report}");
                                self.save_snapshot(v);
                                control.request_stop(StopReason::GuestCrash(report));
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
                    return Err(AccelError::run(format!(
                        "vCPU {cpu}: unexpected exit reason {reason}"
                    )))
                }
            }
        }
        if let Some(v) = vcpu.as_mut() {
            if control.stop_reason() == Some(StopReason::Save) && control.power(cpu) == CpuPower::On
            {
                *lock(self.saved) = Some(crate::saved::capture(v, vtimer)?);
            }
            if lock(self.snapshot).is_none() {
                self.save_snapshot(v);
            }
        }
        Ok(())
    }

    /// A new vCPU carrying on from `saved` (after a save, or a restore).
    fn resume<V: HvVcpu>(
        &self,
        create: &mut impl FnMut() -> Result<V, AccelError>,
        saved: &crate::saved::SavedVcpu,
    ) -> Result<V, AccelError> {
        let mut v = self.start(create, saved.pc, 0)?;
        crate::saved::apply(&mut v, saved)?;
        v.set_vtimer_mask(saved.vtimer.masked())?;
        Ok(v)
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
            irq || fiq || control.power(cpu) != CpuPower::On || control.is_paused()
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
            let now = self.host.now().wrapping_sub(self.clock.offset());
            vtimer::wfi_wait(ctl, cval, now)
        };
        let deadline = match wait {
            WfiWait::NotAtAll => return Ok(()),
            WfiWait::Indefinitely => None,
            WfiWait::Ticks(t) => Instant::now().checked_add(self.host.ticks_to_duration(t)),
        };
        control.wait(deadline, pending);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use accel::{ExitResponse, Kick, VcpuExit};
    use arch_arm64::timer::{CTL_ENABLE, CTL_ISTATUS};
    use arch_arm64::SysReg;
    use std::collections::{HashMap, VecDeque};
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;
    use vm_core::{AccessWidth, TestIrq};

    /// What the scripted guest sees and changes.
    #[derive(Default)]
    struct Guest {
        x: [u64; 31],
        pc: u64,
        pstate: u64,
        sys: HashMap<SysReg, u64>,
        /// The framework's vtimer mask.
        masked: bool,
        /// IRQ/FIQ pending for the run in progress.
        lines: (bool, bool),
        /// The counter offset the loop gave the vCPU.
        offset: Option<u64>,
        /// Make the next `set_pending_interrupts` look kicked.
        kick_during_set_lines: bool,
        runs: usize,
    }

    type Step = Box<dyn FnMut(&mut Guest) -> RunExit + Send>;

    /// The steps every created vCPU of one test plays in turn; when they
    /// run out the VM stops.
    struct Script {
        steps: Mutex<VecDeque<Step>>,
        created: AtomicUsize,
        control: Arc<VmControl>,
        kicks: Arc<PendingKicks>,
    }

    struct FakeVcpu<'a> {
        guest: Guest,
        script: &'a Script,
    }

    impl VcpuRegisters for FakeVcpu<'_> {
        fn read(&mut self, reg: Reg) -> Result<u64, AccelError> {
            let g = &self.guest;
            Ok(match reg {
                Reg::X(n) => g.x[usize::from(n)],
                Reg::Pc => g.pc,
                Reg::Pstate => g.pstate,
                Reg::Sys(r) => g.sys.get(&r).copied().unwrap_or(0),
            })
        }
        fn write(&mut self, reg: Reg, value: u64) -> Result<(), AccelError> {
            let g = &mut self.guest;
            match reg {
                Reg::X(n) => g.x[usize::from(n)] = value,
                Reg::Pc => g.pc = value,
                Reg::Pstate => g.pstate = value,
                Reg::Sys(r) => {
                    g.sys.insert(r, value);
                }
            }
            Ok(())
        }
    }

    impl HvVcpu for FakeVcpu<'_> {
        fn init(&mut self) -> Result<(), AccelError> {
            Ok(())
        }
        fn set_vtimer_mask(&mut self, masked: bool) -> Result<(), AccelError> {
            self.guest.masked = masked;
            Ok(())
        }
        fn set_pending_interrupts(&mut self, irq: bool, fiq: bool) -> Result<(), AccelError> {
            self.guest.lines = (irq, fiq);
            if std::mem::take(&mut self.guest.kick_during_set_lines) {
                // Another thread's device raises a line (and kicks) just
                // after the loop read the lines for this run.
                self.script.control.set_interrupt_lines(0, true, true);
            }
            Ok(())
        }
        fn run(&mut self) -> Result<RunExit, AccelError> {
            self.guest.runs += 1;
            let step = self.script.steps.lock().unwrap().pop_front();
            Ok(match step {
                Some(mut step) => step(&mut self.guest),
                None => {
                    self.script.control.request_stop(StopReason::PowerOff);
                    RunExit::Canceled
                }
            })
        }
        fn set_counter_offset(&mut self, offset: u64) -> Result<(), AccelError> {
            self.guest.offset = Some(offset);
            Ok(())
        }
    }

    /// A host counter ticking once a millisecond.
    struct MsCounter(Instant);
    impl HostCounter for MsCounter {
        fn now(&self) -> u64 {
            self.0.elapsed().as_millis() as u64
        }
        fn ticks_to_duration(&self, ticks: u64) -> Duration {
            Duration::from_millis(ticks)
        }
    }

    struct KickFlags(Arc<PendingKicks>);
    impl Kick for KickFlags {
        fn kick(&self, cpu: CpuId) {
            self.0.set(cpu);
        }
    }

    type Answer = Box<dyn Fn(&VmControl, CpuId, VcpuExit) -> ExitResponse + Send + Sync>;

    /// Records every exit and answers with a test-given function.
    struct Handler {
        seen: Mutex<Vec<VcpuExit>>,
        answer: Answer,
        control: Arc<VmControl>,
    }
    impl ExitHandler for Handler {
        fn handle(&self, cpu: CpuId, exit: VcpuExit) -> ExitResponse {
            self.seen.lock().unwrap().push(exit);
            (self.answer)(&self.control, cpu, exit)
        }
    }

    struct Rig {
        script: Script,
        handler: Handler,
        vtimer: Arc<TestIrq>,
        snapshot: Mutex<Option<CpuSnapshot>>,
        saved: Mutex<Option<crate::saved::SavedVcpu>>,
        clock: GuestClock,
        host: Arc<MsCounter>,
    }

    const ENTRY: u64 = 0x10_0000;
    const DTB: u64 = 0x4800_0000;
    const MPIDR: u64 = 0x8000_0001;

    fn dabt(sas: u64, srt: u64, write: bool) -> u64 {
        (0x24 << 26)
            | (1 << 25)
            | (1 << 24)
            | (sas << 22)
            | (srt << 16)
            | (u64::from(write) << 6)
            | 6
    }
    const WFI: u64 = 0x0600_0000;
    const HVC0: u64 = 0x5a00_0000;

    fn rig(cpus: usize, steps: Vec<Step>, answer: Answer) -> Rig {
        let control = Arc::new(VmControl::new(cpus));
        let kicks = Arc::new(PendingKicks::new(cpus));
        control.set_kicker(Arc::new(KickFlags(kicks.clone())));
        Rig {
            script: Script {
                steps: Mutex::new(steps.into()),
                created: AtomicUsize::new(0),
                control: control.clone(),
                kicks,
            },
            handler: Handler {
                seen: Mutex::new(Vec::new()),
                answer,
                control: control.clone(),
            },
            vtimer: Arc::new(TestIrq::new()),
            snapshot: Mutex::new(None),
            saved: Mutex::new(None),
            clock: GuestClock::new(0),
            host: Arc::new(MsCounter(Instant::now())),
        }
    }

    impl Rig {
        fn control(&self) -> &VmControl {
            &self.script.control
        }

        fn push(&self, s: Step) {
            self.script.steps.lock().unwrap().push_back(s);
        }

        /// Runs vCPU `cpu`'s thread to the end on this thread.
        fn run(&self, cpu: CpuId) -> Result<(), AccelError> {
            let memory = vm_core::memory::create_guest_memory(&[(0x7000_0000, 0x1000)])
                .expect("a page of RAM");
            let thread = VcpuThread {
                cpu,
                mpidr: MPIDR,
                vtimer_irq: &*self.vtimer,
                handler: &self.handler,
                memory: &memory,
                control: self.control(),
                kicks: &self.script.kicks,
                clock: &self.clock,
                host: &*self.host,
                snapshot: &self.snapshot,
                saved: &self.saved,
            };
            thread.main(|| {
                self.script.created.fetch_add(1, Ordering::SeqCst);
                Ok(FakeVcpu {
                    guest: Guest::default(),
                    script: &self.script,
                })
            })
        }

        fn final_registers(&self) -> CpuSnapshot {
            self.snapshot.lock().unwrap().clone().expect("a snapshot")
        }
    }

    fn step(f: impl FnMut(&mut Guest) -> RunExit + Send + 'static) -> Step {
        Box::new(f)
    }

    fn mmio_answers() -> Answer {
        Box::new(|_, _, exit| match exit {
            VcpuExit::MmioRead { .. } => ExitResponse::Value(0x30),
            _ => ExitResponse::Done,
        })
    }

    #[test]
    fn boots_at_the_entry_point_and_completes_mmio() {
        let r = rig(
            1,
            vec![
                step(|g| {
                    assert_eq!((g.pc, g.x[0], g.pstate), (ENTRY, DTB, PSTATE_EL1H_MASKED));
                    assert_eq!(g.sys[&MPIDR_EL1], MPIDR);
                    // The guest is told it has the GIC system registers.
                    assert_eq!((g.sys[&ID_AA64PFR0_EL1] >> 24) & 0xf, 1);
                    // ldr w1, [x0] to the UART.
                    RunExit::Exception {
                        syndrome: dabt(2, 1, false),
                        far: 0,
                        ipa: 0x2001_0018,
                    }
                }),
                step(|g| {
                    assert_eq!((g.x[1], g.pc), (0x30, ENTRY + 4));
                    // str w1, [x0]
                    RunExit::Exception {
                        syndrome: dabt(2, 1, true),
                        far: 0,
                        ipa: 0x2001_0000,
                    }
                }),
            ],
            mmio_answers(),
        );
        r.control().reset_for_boot(ENTRY, DTB);
        r.run(0).unwrap();
        assert_eq!(r.control().stop_reason(), Some(StopReason::PowerOff));
        assert_eq!(
            *r.handler.seen.lock().unwrap(),
            vec![
                VcpuExit::MmioRead {
                    addr: 0x2001_0018,
                    width: AccessWidth::Word
                },
                VcpuExit::MmioWrite {
                    addr: 0x2001_0000,
                    width: AccessWidth::Word,
                    value: 0x30
                },
            ]
        );
        assert_eq!(r.final_registers().pc, ENTRY + 8);
    }

    #[test]
    fn gic_outputs_are_injected_before_every_run() {
        let r = rig(1, vec![], mmio_answers());
        let gic = r.script.control.clone();
        r.push(step(move |g| {
            assert_eq!(g.lines, (true, false));
            // The GIC's outputs move while the guest runs (and kick it).
            gic.set_interrupt_lines(0, false, true);
            RunExit::Canceled
        }));
        r.push(step(|g| {
            assert_eq!(g.lines, (false, true));
            // A line moves while the next run is being prepared.
            g.kick_during_set_lines = true;
            RunExit::Canceled
        }));
        r.push(step(|g| {
            assert_eq!(g.lines, (true, true), "ran with stale interrupt lines");
            assert_eq!(g.runs, 3);
            RunExit::Canceled
        }));
        r.control().reset_for_boot(ENTRY, 0);
        r.control().set_interrupt_lines(0, true, false);
        r.run(0).unwrap();
        assert_eq!(r.control().stop_reason(), Some(StopReason::PowerOff));
    }

    #[test]
    fn cpu_off_then_cpu_on_starts_a_fresh_vcpu() {
        let r = rig(
            2,
            vec![
                step(|g| {
                    assert_eq!((g.pc, g.x[0]), (0x7000_0000, 5));
                    g.x[5] = 77;
                    g.x[0] = u64::from(arch_arm64::psci::CPU_OFF);
                    RunExit::Exception {
                        syndrome: HVC0,
                        far: 0,
                        ipa: 0,
                    }
                }),
                step(|g| {
                    assert_eq!((g.pc, g.x[0], g.x[5]), (0x7100_0000, 9, 0));
                    RunExit::Canceled
                }),
            ],
            // As the machine's PSCI handler does.
            Box::new(|control, cpu, _| {
                control.cpu_off(cpu);
                ExitResponse::CpuOff
            }),
        );
        let control = r.script.control.clone();
        control.cpu_on(1, 0x7000_0000, 5).unwrap();
        std::thread::scope(|s| {
            let t = s.spawn(|| r.run(1));
            while control.power(1) != CpuPower::Off {
                std::thread::sleep(Duration::from_millis(1));
            }
            std::thread::sleep(Duration::from_millis(20));
            assert_eq!(r.script.created.load(Ordering::SeqCst), 1);
            control.cpu_on(1, 0x7100_0000, 9).unwrap();
            t.join().unwrap().unwrap();
        });
        assert_eq!(r.script.created.load(Ordering::SeqCst), 2);
        assert_eq!(control.stop_reason(), Some(StopReason::PowerOff));
    }

    #[test]
    fn vtimer_line_stays_up_until_the_guest_handles_it() {
        let r = rig(1, vec![], mmio_answers());
        let ppi = r.vtimer.clone();
        r.push(step(move |g| {
            assert!(!ppi.is_asserted());
            g.sys.insert(CNTV_CTL_EL0, CTL_ENABLE | CTL_ISTATUS);
            g.masked = true; // the framework masks as it exits
            RunExit::VtimerActivated
        }));
        let ppi = r.vtimer.clone();
        r.push(step(move |g| {
            assert!(ppi.is_asserted());
            assert!(g.masked, "guest has not handled it yet");
            RunExit::Canceled
        }));
        let ppi = r.vtimer.clone();
        r.push(step(move |g| {
            assert!(ppi.is_asserted() && g.masked, "still pending");
            // The guest's handler re-arms the timer: the condition clears.
            g.sys.insert(CNTV_CTL_EL0, CTL_ENABLE);
            RunExit::Canceled
        }));
        let ppi = r.vtimer.clone();
        r.push(step(move |g| {
            assert!(!ppi.is_asserted());
            assert!(!g.masked, "unmasked once handled");
            RunExit::Canceled
        }));
        r.control().reset_for_boot(ENTRY, 0);
        r.run(0).unwrap();
        assert_eq!(r.control().stop_reason(), Some(StopReason::PowerOff));
        assert_eq!(r.vtimer.rising_edges(), 1);
    }

    #[test]
    fn wfi_sleeps_until_the_vtimer_deadline() {
        let r = rig(1, vec![], mmio_answers());
        let started = Arc::new(Mutex::new(None::<Instant>));
        let (s1, s2) = (started.clone(), started.clone());
        let host = r.host.clone();
        r.push(step(move |g| {
            assert_eq!(g.offset, Some(0));
            g.sys.insert(CNTV_CTL_EL0, CTL_ENABLE);
            g.sys.insert(CNTV_CVAL_EL0, host.now() + 30);
            *s1.lock().unwrap() = Some(Instant::now());
            RunExit::Exception {
                syndrome: WFI,
                far: 0,
                ipa: 0,
            }
        }));
        r.push(step(move |g| {
            let slept = s2.lock().unwrap().unwrap().elapsed();
            assert!(slept >= Duration::from_millis(29), "woke after {slept:?}");
            assert_eq!(g.pc, ENTRY + 4);
            RunExit::Canceled
        }));
        r.control().reset_for_boot(ENTRY, 0);
        r.run(0).unwrap();
        assert_eq!(r.control().stop_reason(), Some(StopReason::PowerOff));
    }

    #[test]
    fn pausing_parks_the_vcpu_and_stops_the_guest_count() {
        let r = rig(1, vec![], mmio_answers());
        let control = r.script.control.clone();
        r.push(step(move |g| {
            assert_eq!(g.offset, Some(0));
            control.pause();
            let c = control.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(40));
                c.resume();
            });
            RunExit::Canceled
        }));
        r.push(step(|g| {
            // 40 ms paused at one tick per ms: the guest lost ~40 ticks.
            let offset = g.offset.unwrap();
            assert!((35..5000).contains(&offset), "offset {offset}");
            RunExit::Canceled
        }));
        r.control().reset_for_boot(ENTRY, 0);
        r.run(0).unwrap();
        assert_eq!(r.control().stop_reason(), Some(StopReason::PowerOff));
    }

    #[test]
    fn wfi_with_an_interrupt_pending_does_not_sleep() {
        let started = Arc::new(Mutex::new(None::<Instant>));
        let (s1, s2) = (started.clone(), started.clone());
        let r = rig(
            1,
            vec![
                step(move |g| {
                    g.sys.insert(CNTV_CTL_EL0, CTL_ENABLE);
                    g.sys.insert(CNTV_CVAL_EL0, 100_000); // 100 s away
                    *s1.lock().unwrap() = Some(Instant::now());
                    RunExit::Exception {
                        syndrome: WFI,
                        far: 0,
                        ipa: 0,
                    }
                }),
                step(move |_| {
                    let slept = s2.lock().unwrap().unwrap().elapsed();
                    assert!(slept < Duration::from_secs(10), "slept {slept:?}");
                    RunExit::Canceled
                }),
            ],
            mmio_answers(),
        );
        r.control().reset_for_boot(ENTRY, 0);
        r.control().set_interrupt_lines(0, true, false);
        r.run(0).unwrap();
    }

    #[test]
    fn an_access_without_syndrome_from_code_outside_ram_stops_the_vm_with_a_report() {
        let r = rig(
            1,
            vec![step(|_| RunExit::Exception {
                // ldp x0, x1, [x2] on MMIO
                syndrome: 0x9200_0006,
                far: 0xffff_0000_3000_0000,
                ipa: 0x3000_0000,
            })],
            mmio_answers(),
        );
        r.control().reset_for_boot(ENTRY, 0);
        r.run(0).unwrap();
        let Some(StopReason::GuestCrash(report)) = r.control().stop_reason() else {
            panic!("no crash: {:?}", r.control().stop_reason());
        };
        assert!(
            report.starts_with("vCPU 0:")
                && report.contains("0x30000000")
                && report.contains("not in RAM"),
            "{report}"
        );
        assert_eq!(r.final_registers().pc, ENTRY);
        assert!(r.handler.seen.lock().unwrap().is_empty());
    }

    #[test]
    fn a_panicking_handler_stops_the_vm_instead_of_unwinding() {
        let r = rig(
            1,
            vec![step(|_| RunExit::Exception {
                syndrome: dabt(0, 0, false),
                far: 0,
                ipa: 0x2001_0000,
            })],
            Box::new(|_, _, _| panic!("device bug")),
        );
        r.control().reset_for_boot(ENTRY, 0);
        let err = r.run(0).unwrap_err();
        assert!(err.to_string().contains("device bug"), "{err}");
        assert_eq!(r.control().stop_reason(), Some(StopReason::HostStop));
    }

    #[test]
    fn unknown_exit_reasons_are_host_errors() {
        let r = rig(1, vec![step(|_| RunExit::Unknown(3))], mmio_answers());
        r.control().reset_for_boot(ENTRY, 0);
        assert!(r.run(0).is_err());
        assert_eq!(r.control().stop_reason(), Some(StopReason::HostStop));
    }
}
