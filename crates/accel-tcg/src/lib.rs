//! The portable software CPU: vmapple's accelerator on any host.
//!
//! It runs AArch64 guests on Unicorn's TCG (QEMU 5's binary translator),
//! which our build patches (`patches/`) so that it behaves as a system
//! CPU: exceptions are taken by the guest, an IRQ/FIQ line exists, chosen
//! system registers come to us, MMIO accesses arrive whole and another
//! thread can make it return between translated blocks
//! (`../shared/spec/software-cpu.md` has the findings behind each).
//!
//! **SMP.** All vCPUs share one Unicorn engine, scheduled round-robin on
//! one host thread: the engine holds the running vCPU's registers and the
//! others wait as saved contexts. One engine means one translation cache
//! and one copy of QEMU's self-modifying-code tracking, so code written by
//! one vCPU and run by another is always current, and the TLB is flushed on
//! every switch, so TLB maintenance by one vCPU needs no broadcast. Atomics
//! are exact because only one vCPU runs at any instant and switches happen
//! only between translated blocks.
//!
//! **Timer.** The generic timer is emulated here (see [`sysregs`]); a
//! ticker thread kicks the engine when a timer deadline or the end of a
//! time slice comes.
//!
//! Licence: this crate links Unicorn and is GPL-2.0-or-later; the rest of
//! vmapple is not, and does not depend on it unless built with it.

// The engine layer is public for the Hypervisor.framework double
// (crate `hvf-double`), which runs on the same patched Unicorn.
#[doc(hidden)]
pub mod engine;
#[doc(hidden)]
pub mod ffi;
pub mod sysregs;
#[doc(hidden)]
pub mod ticker;

use std::cell::{Cell, RefCell};
use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use accel::{
    AccelError, AccessWidth, CpuId, CpuPower, CpuSnapshot, ExitHandler, ExitResponse, Kick,
    RegisterWrites, StopReason, VcpuConfig, VcpuExit, Vm, VmControl,
};
use arch_arm64::sysreg::{ID_AA64ISAR1_EL1, ID_AA64PFR0_EL1, ID_AA64PFR1_EL1, MPIDR_EL1};
use arch_arm64::timer::Counter;
use arch_arm64::SysReg;
use vm_core::GuestRam;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use engine::{Context, Engine, KickHandle, UcError};
use ffi::RegisterARM64 as Reg;
use sysregs::{CpuTimers, IdRegisters, TimerAccess};
use ticker::Ticker;

/// Physical addresses Unicorn's `max` CPU can generate (48 bits). Whatever
/// is not RAM in this space is MMIO and reaches the machine.
const PHYS_ADDR_LIMIT: u64 = 1 << 48;

/// Translation buffer size. QEMU's system emulators default to 1 GiB; half
/// of that holds a Linux boot with room to spare, and when it fills QEMU
/// simply flushes it.
const TCG_BUFFER: u32 = 512 << 20;

/// SCR_EL3: NS=0 (single security state), RES1 bits, SMD (SMC is
/// UNDEFINED, the conduit is HVC), HCE (HVC reaches us), RW (EL2 is
/// AArch64), APK and API (pointer-authentication keys and instructions
/// do not trap to EL3). The guest never runs at EL3; Unicorn's CPU has
/// one, and this makes it inert.
const SCR_EL3: SysReg = SysReg::new(3, 6, 1, 1, 0);
const SCR_EL3_VALUE: u64 =
    (1 << 17) | (1 << 16) | (1 << 10) | (1 << 8) | (1 << 7) | (1 << 5) | (1 << 4);
/// HCR_EL2: only RW (EL1 is AArch64); no traps to the absent EL2.
const HCR_EL2: SysReg = SysReg::new(3, 4, 1, 1, 0);
const HCR_EL2_RW: u64 = 1 << 31;
/// PSTATE at reset and CPU_ON: EL1h with D, A, I and F masked.
const PSTATE_EL1H_MASKED: u64 = 0x3c5;

/// X0..X30 in order (register dumps; the Hypervisor.framework double maps
/// `hv_reg_t` through it too).
#[doc(hidden)]
pub const GENERAL_REGISTERS: [Reg; 31] = [
    Reg::X0,
    Reg::X1,
    Reg::X2,
    Reg::X3,
    Reg::X4,
    Reg::X5,
    Reg::X6,
    Reg::X7,
    Reg::X8,
    Reg::X9,
    Reg::X10,
    Reg::X11,
    Reg::X12,
    Reg::X13,
    Reg::X14,
    Reg::X15,
    Reg::X16,
    Reg::X17,
    Reg::X18,
    Reg::X19,
    Reg::X20,
    Reg::X21,
    Reg::X22,
    Reg::X23,
    Reg::X24,
    Reg::X25,
    Reg::X26,
    Reg::X27,
    Reg::X28,
    Reg::X29,
    Reg::X30,
];

/// Configuration of the software CPU.
pub struct TcgConfig {
    pub cpus: Vec<VcpuConfig>,
    /// The guest's counter (shared so the VMM can pause it).
    pub counter: Arc<Counter>,
    /// How long one vCPU runs before the next gets its turn.
    pub time_slice: Duration,
}

impl TcgConfig {
    pub const DEFAULT_TIME_SLICE: Duration = Duration::from_millis(2);
}

/// Per-vCPU state the callbacks touch.
struct CpuState {
    mpidr: u64,
    timers: CpuTimers,
    vtimer_irq: Arc<dyn vm_core::IrqLine>,
    /// Level last driven on `vtimer_irq`.
    vtimer_level: bool,
    /// Stopped in WFI (or CPU_SUSPEND) until an interrupt arrives.
    halted: bool,
}

/// The vCPUs as a snapshot stores them: the engine's register state and
/// what this crate emulates beside it. Tied to this build of the engine
/// (the register block's layout is QEMU's); the machine refuses a
/// snapshot of another vmapple version before it gets here.
#[derive(serde::Serialize, serde::Deserialize)]
struct SavedCpus {
    cpus: Vec<SavedCpu>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct SavedCpu {
    registers: Vec<u8>,
    virt: arch_arm64::timer::TimerRegs,
    phys: arch_arm64::timer::TimerRegs,
    cntkctl: u64,
    vtimer_level: bool,
    halted: bool,
}

/// Why a hook asked the run loop to take the current vCPU off the engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HookStop {
    CpuOff,
    Suspend,
}

/// Everything callbacks reach through their `user_data` pointer. Lives in
/// a `Box` so its address is stable, and is only ever shared (`&`): the
/// callbacks run inside `Engine::run`, so all mutation goes through cells.
struct Shared {
    counter: Arc<Counter>,
    ids: IdRegisters,
    cpus: RefCell<Vec<CpuState>>,
    current: Cell<CpuId>,
    /// The handler and control block of the `run` in progress. The
    /// lifetimes are erased; `run` clears both before returning.
    handler: Cell<Option<*const (dyn ExitHandler + 'static)>>,
    control: Cell<Option<*const VmControl>>,
    /// IRQ/FIQ levels last given to the engine.
    applied_lines: Cell<(bool, bool)>,
    hook_stop: Cell<Option<HookStop>>,
    /// A panic caught in a callback: the VMM has a bug, stop.
    host_error: RefCell<Option<String>>,
    kick: KickHandle,
    engine: Cell<*const Engine>,
}

impl Shared {
    fn handler(&self) -> &dyn ExitHandler {
        // SAFETY: set by `run` from a reference that outlives the engine
        // run during which callbacks happen, and cleared before `run`
        // returns; callbacks only happen inside it.
        unsafe { &*self.handler.get().expect("callback outside run") }
    }

    fn control(&self) -> &VmControl {
        // SAFETY: as for `handler`.
        unsafe { &*self.control.get().expect("callback outside run") }
    }

    fn engine(&self) -> &Engine {
        // SAFETY: points into the `Box<Engine>` owned by the same `TcgVm`,
        // which outlives every callback.
        unsafe { &*self.engine.get() }
    }

    /// Gives the engine the current vCPU's interrupt lines if they moved.
    fn sync_irq_lines(&self) {
        let lines = self.control().interrupt_lines(self.current.get());
        if lines != self.applied_lines.get() {
            self.engine().set_irq_lines(lines.0, lines.1);
            self.applied_lines.set(lines);
        }
    }

    /// Drives `cpu`'s virtual-timer output from its registers at `now`.
    fn update_vtimer(&self, cpu: CpuId, now: u64) {
        let (line, level) = {
            let mut cpus = self.cpus.borrow_mut();
            let Some(state) = cpus.get_mut(cpu) else {
                return;
            };
            let level = state.timers.virt.output(now);
            if level == state.vtimer_level {
                return;
            }
            state.vtimer_level = level;
            (state.vtimer_irq.clone(), level)
        };
        // Outside the borrow: the GIC may call back into the control block.
        line.set_level(level);
    }

    /// After any callback: apply interrupt changes, and leave the engine
    /// soon if the VM must stop.
    fn after_callback(&self) {
        self.sync_irq_lines();
        if self.control().stop_requested() || self.control().is_paused() {
            self.kick.kick();
        }
    }

    /// Runs `f` with a panic turned into a recorded host error (unwinding
    /// into C is not allowed).
    fn guard<T>(&self, fallback: T, f: impl FnOnce() -> T) -> T {
        match catch_unwind(AssertUnwindSafe(f)) {
            Ok(v) => v,
            Err(panic) => {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                self.host_error.borrow_mut().get_or_insert(message);
                self.kick.kick();
                fallback
            }
        }
    }

    fn sysreg(&self, reg: SysReg, el: i32, write: Option<u64>) -> Option<u64> {
        let cpu = self.current.get();
        if reg == MPIDR_EL1 {
            return match (el, write) {
                (1.., None) => Some(self.cpus.borrow()[cpu].mpidr),
                _ => None,
            };
        }
        if let Some(value) = self.ids.read(reg) {
            return (el >= 1 && write.is_none()).then_some(value);
        }
        if reg.is_gic_cpu_interface() {
            if el < 1 {
                return None;
            }
            let exit = match write {
                None => VcpuExit::SysRegRead { reg },
                Some(value) => VcpuExit::SysRegWrite { reg, value },
            };
            return match self.handler().handle(cpu, exit) {
                ExitResponse::Value(v) => Some(v),
                ExitResponse::Done => Some(0),
                _ => None,
            };
        }
        let now = self.counter.now();
        let access = self.cpus.borrow_mut()[cpu].timers.access(
            reg,
            el,
            write,
            now,
            self.counter.frequency(),
        );
        match access {
            TimerAccess::Value(v) => Some(v),
            TimerAccess::Written => {
                self.update_vtimer(cpu, now);
                Some(0)
            }
            TimerAccess::Undefined | TimerAccess::NotATimerRegister => None,
        }
    }
}

/// Kicks from other threads; on the vCPU thread there is nothing to do,
/// since the run loop re-reads every line and flag after each callback.
struct TcgKick {
    handle: KickHandle,
    vcpu_thread: ThreadId,
}

impl Kick for TcgKick {
    fn kick(&self, _cpu: CpuId) {
        if std::thread::current().id() != self.vcpu_thread {
            self.handle.kick();
        }
    }
}

/// One MMIO span's callback data: which span, and the shared state.
struct MmioSpan {
    base: u64,
    shared: *const Shared,
}

/// A VM on the software CPU.
pub struct TcgVm {
    // Field order matters for drop: the engine goes before what its
    // callbacks point at.
    engine: Box<Engine>,
    shared: Box<Shared>,
    // Boxed: Unicorn holds each span's address, which must not move when
    // the vector grows.
    #[allow(clippy::vec_box)]
    _spans: Vec<Box<MmioSpan>>,
    reset_context: Context,
    /// Saved state of each vCPU that is not on the engine.
    contexts: Vec<Context>,
    /// The vCPU whose registers the engine holds.
    loaded: Option<CpuId>,
    ticker: Ticker,
    time_slice: Duration,
}

impl TcgVm {
    /// Creates the engine, maps `memory` as RAM and everything else as
    /// MMIO, and prepares one context per vCPU.
    pub fn new(memory: &GuestRam, config: TcgConfig) -> Result<Self, AccelError> {
        let setup = |what: &str, e: UcError| AccelError::setup_from(what, e);
        if config.cpus.is_empty() {
            return Err(AccelError::setup("a VM needs at least one vCPU"));
        }
        let engine = Box::new(Engine::new(TCG_BUFFER).map_err(|e| setup("opening Unicorn", e))?);

        let native = |reg| {
            engine
                .read_sysreg(reg)
                .ok_or_else(|| AccelError::setup(format!("Unicorn lacks {reg}")))
        };
        let ids = IdRegisters::from_native(
            native(ID_AA64PFR0_EL1)?,
            native(ID_AA64PFR1_EL1)?,
            native(ID_AA64ISAR1_EL1)?,
            config.cpus.iter().any(|c| c.pointer_auth),
        );

        let shared = Box::new(Shared {
            counter: config.counter.clone(),
            ids,
            cpus: RefCell::new(
                config
                    .cpus
                    .iter()
                    .map(|c| CpuState {
                        mpidr: c.mpidr,
                        timers: CpuTimers::default(),
                        vtimer_irq: c.vtimer_irq.clone(),
                        vtimer_level: false,
                        halted: false,
                    })
                    .collect(),
            ),
            current: Cell::new(0),
            handler: Cell::new(None),
            control: Cell::new(None),
            applied_lines: Cell::new((false, false)),
            hook_stop: Cell::new(None),
            host_error: RefCell::new(None),
            kick: engine.kick_handle(),
            engine: Cell::new(&*engine),
        });
        let user_data = (&*shared as *const Shared).cast_mut().cast::<c_void>();

        // SAFETY: `shared` is boxed and owned by the TcgVm next to the
        // engine, which is dropped first; callbacks run on this thread.
        unsafe {
            engine
                .enable_sysemu(sysreg_filter, sysreg_handler, user_data)
                .map_err(|e| setup("enabling system emulation", e))?;
            engine
                .hook_exceptions(exception_hook, user_data)
                .map_err(|e| setup("hooking HVC", e))?;
        }

        let mut ram: Vec<(u64, u64)> = Vec::new();
        for region in memory.iter() {
            let base = region.start_addr().0;
            let size = region.len();
            let host = region.as_ptr();
            // SAFETY: the region's mapping lives as long as `memory`'s
            // regions, which the machine keeps for the VM's lifetime (the
            // Arc'd regions are never unmapped while the VM exists).
            unsafe { engine.map_ram(base, size, host) }
                .map_err(|e| setup(&format!("mapping RAM at {base:#x}+{size:#x}"), e))?;
            ram.push((base, base + size));
        }
        ram.sort_unstable();

        let mut spans = Vec::new();
        let mut cursor = 0u64;
        for &(start, end) in ram
            .iter()
            .chain(std::iter::once(&(PHYS_ADDR_LIMIT, PHYS_ADDR_LIMIT)))
        {
            if start > cursor {
                let span = Box::new(MmioSpan {
                    base: cursor,
                    shared: &*shared,
                });
                // SAFETY: the span is boxed and kept in `_spans` for the
                // engine's lifetime.
                unsafe {
                    engine.map_mmio(
                        cursor,
                        start - cursor,
                        mmio_read,
                        mmio_write,
                        (&*span as *const MmioSpan).cast_mut().cast(),
                    )
                }
                .map_err(|e| setup(&format!("mapping MMIO at {cursor:#x}..{start:#x}"), e))?;
                spans.push(span);
            }
            cursor = cursor.max(end);
        }

        engine
            .write_sysreg(SCR_EL3, SCR_EL3_VALUE)
            .map_err(|e| setup("setting SCR_EL3", e))?;
        engine
            .write_sysreg(HCR_EL2, HCR_EL2_RW)
            .map_err(|e| setup("setting HCR_EL2", e))?;
        let mut reset_context = engine
            .new_context()
            .map_err(|e| setup("allocating a context", e))?;
        engine.save(&mut reset_context);

        let mut contexts = (0..config.cpus.len())
            .map(|_| engine.new_context())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| setup("allocating vCPU contexts", e))?;
        // Defined contents from the start (a snapshot of a VM whose
        // secondary vCPUs never ran stores them too).
        for ctx in &mut contexts {
            engine.save(ctx);
        }
        let ticker = Ticker::new(engine.kick_handle());
        Ok(Self {
            engine,
            shared,
            _spans: spans,
            reset_context,
            contexts,
            loaded: None,
            ticker,
            time_slice: config.time_slice,
        })
    }

    fn cpu_count(&self) -> usize {
        self.contexts.len()
    }

    /// Saves the vCPU on the engine, if any, into its context.
    fn save_loaded(&mut self) {
        if let Some(old) = self.loaded.take() {
            self.engine.save(&mut self.contexts[old]);
        }
    }

    /// Makes `cpu` the vCPU on the engine, with its lines forced low until
    /// the next sync programs them.
    fn make_loaded(&mut self, cpu: CpuId) {
        // The TLB holds the previous vCPU's translations.
        self.engine.flush_tlb();
        self.loaded = Some(cpu);
        self.shared.current.set(cpu);
        self.shared.applied_lines.set((false, false));
        self.engine.set_irq_lines(false, false);
    }

    /// Saves the loaded vCPU (if another) and loads `cpu`'s saved state.
    fn switch_to(&mut self, cpu: CpuId) {
        if self.loaded != Some(cpu) {
            self.save_loaded();
            self.engine.restore(&self.contexts[cpu]);
            self.make_loaded(cpu);
        }
    }

    /// Architectural reset state, then PSCI's entry conditions: PC at
    /// `entry`, x0 = `context_id`, EL1h with DAIF masked, MMU off. The
    /// started vCPU is left on the engine.
    fn start_cpu(&mut self, cpu: CpuId, entry: u64, context_id: u64) -> Result<(), AccelError> {
        if self.loaded != Some(cpu) {
            self.save_loaded();
        }
        self.engine.restore(&self.reset_context);
        self.engine.write(Reg::PC, entry);
        self.engine.write(Reg::X0, context_id);
        self.engine.write(Reg::PSTATE, PSTATE_EL1H_MASKED);
        // A PSTATE write does not refresh Unicorn's cached mode flags; a
        // system-register write does.
        self.engine
            .write_sysreg(SCR_EL3, SCR_EL3_VALUE)
            .map_err(|e| AccelError::run_from(format!("resetting vCPU {cpu}"), e))?;
        self.make_loaded(cpu);
        {
            let mut cpus = self.shared.cpus.borrow_mut();
            cpus[cpu].timers = CpuTimers::default();
            cpus[cpu].halted = false;
        }
        self.shared.update_vtimer(cpu, self.shared.counter.now());
        tracing::debug!(
            cpu,
            entry = format_args!("{entry:#x}"),
            context_id,
            "vCPU started"
        );
        Ok(())
    }

    /// Earliest host instant at which some vCPU's timer output rises.
    fn next_timer_deadline(&self, control: &VmControl, now: u64) -> Option<Instant> {
        let cpus = self.shared.cpus.borrow();
        cpus.iter()
            .enumerate()
            .filter(|(i, _)| control.power(*i) == CpuPower::On)
            .filter_map(|(_, c)| c.timers.virt.next_rise(now))
            .min()
            .and_then(|ticks| self.shared.counter.instant_of(ticks))
    }

    fn runnable(&self, control: &VmControl, cpu: CpuId) -> bool {
        if control.power(cpu) != CpuPower::On {
            return false;
        }
        let (irq, fiq) = control.interrupt_lines(cpu);
        !self.shared.cpus.borrow()[cpu].halted || irq || fiq
    }

    fn crash_report(&self, cpu: CpuId, error: &UcError) -> String {
        let pc = self.engine.read(Reg::PC);
        format!("vCPU {cpu} stopped by the CPU emulator at pc {pc:#x}: {error}")
    }

    fn schedule(&mut self, control: &VmControl) -> Result<StopReason, AccelError> {
        let cpus = self.cpu_count();
        let mut slice_end = Instant::now();
        loop {
            if let Some(error) = self.shared.host_error.borrow_mut().take() {
                return Err(AccelError::run(format!(
                    "a device handler panicked: {error}"
                )));
            }
            if control.stop_requested() {
                return Ok(control.stop_reason().unwrap_or(StopReason::HostStop));
            }
            if control.is_paused() {
                tracing::debug!("vCPUs parked: VM paused");
                control.wait_while_paused();
                continue;
            }

            let now = self.shared.counter.now();
            for cpu in 0..cpus {
                if control.power(cpu) == CpuPower::On {
                    self.shared.update_vtimer(cpu, now);
                }
            }
            for cpu in 0..cpus {
                if let Some((entry, context_id)) = control.take_start(cpu) {
                    self.start_cpu(cpu, entry, context_id)?;
                }
            }

            // Keep the loaded vCPU for the rest of its slice unless it
            // cannot run or another was just woken by an interrupt.
            let current = self.loaded.filter(|&c| self.runnable(control, c));
            let woken = (0..cpus).any(|c| {
                Some(c) != current
                    && self.shared.cpus.borrow()[c].halted
                    && self.runnable(control, c)
            });
            let keep = current.filter(|_| Instant::now() < slice_end && !woken);
            let next = keep.or_else(|| {
                let start = self.loaded.map_or(0, |c| c + 1);
                (0..cpus)
                    .map(|i| (start + i) % cpus)
                    .find(|&c| self.runnable(control, c))
            });
            let Some(cpu) = next else {
                let deadline = self.next_timer_deadline(control, now);
                control.wait(deadline, || {
                    (0..cpus).any(|c| {
                        matches!(control.power(c), CpuPower::Starting { .. })
                            || self.runnable(control, c)
                    })
                });
                continue;
            };
            if keep.is_none() {
                slice_end = Instant::now() + self.time_slice;
            }
            self.switch_to(cpu);
            self.shared.cpus.borrow_mut()[cpu].halted = false;
            self.shared.sync_irq_lines();

            let others_on = (0..cpus).any(|c| c != cpu && control.power(c) != CpuPower::Off);
            let timer = self.next_timer_deadline(control, now);
            let deadline = match (others_on.then_some(slice_end), timer) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            self.ticker.arm(deadline);
            let result = self.engine.run();
            self.ticker.disarm();

            if let Err(error) = result {
                if control.stop_requested() || self.shared.host_error.borrow().is_some() {
                    continue;
                }
                let report = self.crash_report(cpu, &error);
                tracing::error!("{report}");
                control.request_stop(StopReason::GuestCrash(report));
                continue;
            }
            match self.shared.hook_stop.take() {
                Some(HookStop::CpuOff) => {
                    tracing::debug!(cpu, "vCPU powered off");
                    continue;
                }
                Some(HookStop::Suspend) => {
                    self.shared.cpus.borrow_mut()[cpu].halted = true;
                    continue;
                }
                None => {}
            }
            match self.engine.last_exit() {
                ffi::EXIT_WFI => self.shared.cpus.borrow_mut()[cpu].halted = true,
                // WFE/YIELD: a spinning vCPU waits for another; let it run.
                ffi::EXIT_YIELD | ffi::EXIT_WFE => slice_end = Instant::now(),
                _ => {}
            }
        }
    }
}

impl Vm for TcgVm {
    fn name(&self) -> &'static str {
        "tcg"
    }

    fn run(
        &mut self,
        handler: &dyn ExitHandler,
        control: &VmControl,
    ) -> Result<StopReason, AccelError> {
        if control.cpu_count() != self.cpu_count() {
            return Err(AccelError::setup(format!(
                "control block has {} vCPUs, the VM {}",
                control.cpu_count(),
                self.cpu_count()
            )));
        }
        let handler: *const (dyn ExitHandler + '_) = handler;
        // SAFETY: lifetime erasure; both pointers are cleared below before
        // this function returns, and only callbacks during `schedule` use
        // them.
        let handler: *const (dyn ExitHandler + 'static) = unsafe { std::mem::transmute(handler) };
        self.shared.handler.set(Some(handler));
        self.shared.control.set(Some(control));
        ticker::precise_sleeps();
        control.set_kicker(Arc::new(TcgKick {
            handle: self.engine.kick_handle(),
            vcpu_thread: std::thread::current().id(),
        }));
        // A reboot starts every vCPU afresh, and the firmware region was
        // rewritten behind the engine's back; a run after a save carries
        // on from the contexts.
        self.save_loaded();
        self.engine.flush_translations();
        let result = self.schedule(control);
        self.shared.handler.set(None);
        self.shared.control.set(None);
        result
    }

    fn cannot_save(&self) -> Option<String> {
        None
    }

    fn save_cpus(&mut self) -> Result<Vec<u8>, AccelError> {
        self.save_loaded();
        let cpus = self.shared.cpus.borrow();
        let saved = SavedCpus {
            cpus: self
                .contexts
                .iter()
                .zip(cpus.iter())
                .map(|(ctx, cpu)| SavedCpu {
                    registers: self.engine.context_state(ctx).to_vec(),
                    virt: cpu.timers.virt,
                    phys: cpu.timers.phys,
                    cntkctl: cpu.timers.cntkctl,
                    vtimer_level: cpu.vtimer_level,
                    halted: cpu.halted,
                })
                .collect(),
        };
        let mut bytes = Vec::new();
        ciborium::into_writer(&saved, &mut bytes)
            .map_err(|e| AccelError::run_from("encoding vCPU state", e))?;
        Ok(bytes)
    }

    fn restore_cpus(&mut self, bytes: &[u8]) -> Result<(), AccelError> {
        let saved: SavedCpus = ciborium::from_reader(bytes)
            .map_err(|e| AccelError::setup_from("decoding vCPU state", e))?;
        if saved.cpus.len() != self.contexts.len() {
            return Err(AccelError::setup(format!(
                "the snapshot has {} vCPUs, the VM {}",
                saved.cpus.len(),
                self.contexts.len()
            )));
        }
        self.save_loaded();
        let mut cpus = self.shared.cpus.borrow_mut();
        for (i, cpu) in saved.cpus.into_iter().enumerate() {
            self.engine
                .set_context_state(&mut self.contexts[i], &cpu.registers)
                .map_err(|e| AccelError::setup(format!("vCPU {i}: {e}")))?;
            let state = &mut cpus[i];
            state.timers = CpuTimers {
                virt: cpu.virt,
                phys: cpu.phys,
                cntkctl: cpu.cntkctl & sysregs::CNTKCTL_WRITABLE,
            };
            state.vtimer_level = cpu.vtimer_level;
            state.halted = cpu.halted;
        }
        Ok(())
    }

    fn snapshot(&self, cpu: CpuId) -> Option<CpuSnapshot> {
        if self.loaded != Some(cpu) {
            // Only the loaded vCPU's registers are readable without
            // disturbing the engine.
            return None;
        }
        let e = &self.engine;
        let mut snap = CpuSnapshot {
            pc: e.read(Reg::PC),
            pstate: e.read(Reg::PSTATE),
            sp_el0: e.read(Reg::SP_EL0),
            sp_el1: e.read(Reg::SP_EL1),
            elr_el1: e.read(Reg::ELR_EL1),
            esr_el1: e.read(Reg::ESR_EL1),
            far_el1: e.read(Reg::FAR_EL1),
            vbar_el1: e.read(Reg::VBAR_EL1),
            sctlr_el1: e.read_sysreg(SysReg::new(3, 0, 1, 0, 0)).unwrap_or(0),
            ..Default::default()
        };
        for (x, reg) in snap.x.iter_mut().zip(GENERAL_REGISTERS) {
            *x = e.read(reg);
        }
        Some(snap)
    }
}

unsafe extern "C" fn sysreg_filter(
    _uc: *mut ffi::uc_engine,
    encoding: u32,
    _user: *mut c_void,
) -> bool {
    sysregs::is_trapped(SysReg::from_instruction(encoding))
}

unsafe extern "C" fn sysreg_handler(
    _uc: *mut ffi::uc_engine,
    encoding: u32,
    el: i32,
    is_read: bool,
    value: *mut u64,
    user: *mut c_void,
) -> bool {
    // SAFETY: `user` is the boxed Shared given at registration, alive for
    // the engine's lifetime; `value` points at a u64 owned by the helper.
    let shared = unsafe { &*user.cast::<Shared>() };
    // SAFETY: `value` points at a u64 the helper owns for this call.
    let value = unsafe { &mut *value };
    shared.guard(false, || {
        let reg = SysReg::from_instruction(encoding);
        let write = (!is_read).then_some(*value);
        let result = shared.sysreg(reg, el, write);
        if let Some(v) = result {
            if is_read {
                *value = v;
            }
        }
        shared.after_callback();
        result.is_some()
    })
}

unsafe extern "C" fn exception_hook(_uc: *mut ffi::uc_engine, intno: u32, user: *mut c_void) {
    // SAFETY: as in `sysreg_handler`.
    let shared = unsafe { &*user.cast::<Shared>() };
    shared.guard((), || {
        let engine = shared.engine();
        if intno != ffi::EXCP_HVC {
            // SMC is UNDEFINED by SCR_EL3.SMD and never arrives; anything
            // else would be a patch bug. Answer as for an unknown call.
            tracing::warn!(intno, "unexpected exception reached the host");
            engine.write(Reg::X0, u64::MAX);
            return;
        }
        let args = [
            engine.read(Reg::X0),
            engine.read(Reg::X1),
            engine.read(Reg::X2),
            engine.read(Reg::X3),
        ];
        let cpu = shared.current.get();
        // ESR_ELx.ISS[15:0] of HVC is its immediate.
        let imm = (engine.trap_info().syndrome & 0xffff) as u16;
        match shared.handler().handle(cpu, VcpuExit::Hvc { imm, args }) {
            ExitResponse::Value(v) => engine.write(Reg::X0, v),
            ExitResponse::Done => {}
            ExitResponse::Registers(writes) => apply_writes(engine, &writes),
            ExitResponse::Undefined => engine.write(Reg::X0, u64::MAX),
            ExitResponse::CpuOff => {
                shared.hook_stop.set(Some(HookStop::CpuOff));
                engine.stop_from_exception_hook();
            }
            ExitResponse::Suspend => {
                engine.write(Reg::X0, 0);
                shared.hook_stop.set(Some(HookStop::Suspend));
                engine.stop_from_exception_hook();
            }
        }
        shared.after_callback();
    })
}

/// An HVC answer that sets several registers.
fn apply_writes(engine: &Engine, writes: &RegisterWrites) {
    for (reg, value) in GENERAL_REGISTERS.iter().zip(writes.x) {
        if let Some(v) = value {
            engine.write(*reg, v);
        }
    }
    for (reg, value) in writes.system_registers() {
        if let Err(e) = engine.write_sysreg(reg, value) {
            tracing::error!("setting {reg} for a hypercall: {e}");
        }
    }
}

unsafe extern "C" fn mmio_read(
    _uc: *mut ffi::uc_engine,
    offset: u64,
    size: u32,
    user: *mut c_void,
) -> u64 {
    // SAFETY: `user` is a boxed MmioSpan kept alive with the engine, whose
    // `shared` points at the boxed Shared.
    let span = unsafe { &*user.cast::<MmioSpan>() };
    // SAFETY: `span.shared` points at the boxed Shared, alive with the
    // engine.
    let shared = unsafe { &*span.shared };
    shared.guard(0, || {
        let Some(width) = AccessWidth::from_bytes(u64::from(size)) else {
            vm_core::guest_error!("MMIO read of unsupported size {size}");
            return 0;
        };
        let addr = span.base + offset;
        let value = match shared
            .handler()
            .handle(shared.current.get(), VcpuExit::MmioRead { addr, width })
        {
            ExitResponse::Value(v) => v & width.mask(),
            _ => 0,
        };
        shared.after_callback();
        value
    })
}

unsafe extern "C" fn mmio_write(
    _uc: *mut ffi::uc_engine,
    offset: u64,
    size: u32,
    value: u64,
    user: *mut c_void,
) {
    // SAFETY: as in `mmio_read`.
    let span = unsafe { &*user.cast::<MmioSpan>() };
    // SAFETY: `span.shared` points at the boxed Shared, alive with the
    // engine.
    let shared = unsafe { &*span.shared };
    shared.guard((), || {
        let Some(width) = AccessWidth::from_bytes(u64::from(size)) else {
            vm_core::guest_error!("MMIO write of unsupported size {size}");
            return;
        };
        let addr = span.base + offset;
        shared.handler().handle(
            shared.current.get(),
            VcpuExit::MmioWrite {
                addr,
                width,
                value: value & width.mask(),
            },
        );
        shared.after_callback();
    })
}
