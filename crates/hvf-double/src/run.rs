//! `hv_vcpu_run`: guest code on the software CPU until something the
//! framework reports (hvf-semantics.md §4.3), and the engine callbacks that
//! turn guest accesses into those exits.
//!
//! An access the framework would trap (an unmapped IPA, a trapped system
//! register) is abandoned by the engine (`uc_arm64_trap`): nothing of the
//! instruction happens and PC stays on it, as after a stage-2 fault. The
//! exit record then carries an ESR built from what QEMU's translator knows
//! about the instruction (ISV, SAS, SSE, SRT, SF, AR), the faulting VA and
//! the exact byte IPA. The double never advances PC for the VMM: HVC
//! returns past itself (it is an exception-generating instruction), every
//! other exit leaves PC on the instruction.

use std::ffi::c_void;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use accel_tcg::ffi::{self, uc_engine, RegisterARM64 as Reg};
use accel_tcg::sysregs::TimerAccess;
use arch_arm64::esr::{EC_DABT_LOWER, EC_IABT_LOWER, EC_SYSREG, EC_WFX};
use arch_arm64::SysReg;

use crate::sysregs::{self, Route};
use crate::vm::{self, lock, Shared, Trap, Vm, GATE, KICKS, SCR_EL3, SCR_EL3_VALUE};
use crate::{
    clock, HvReturn, HvVcpuExit, HV_ERROR, HV_EXIT_REASON_CANCELED, HV_EXIT_REASON_EXCEPTION,
    HV_EXIT_REASON_VTIMER_ACTIVATED, HV_ILLEGAL_GUEST_STATE, HV_SUCCESS,
};

/// How long one vCPU keeps the engine while others wait for it.
const TIME_SLICE: Duration = Duration::from_millis(2);
/// ESR.IL: a 32-bit instruction.
const IL: u64 = 1 << 25;
/// ESR ISS bits a load/store syndrome brings: ISV, SAS, SSE, SRT, SF, AR.
const ISS_INSN_BITS: u64 = 0x01ff_c000;
const ISS_ISV: u64 = 1 << 24;
const ISS_WNR: u64 = 1 << 6;
/// DFSC/IFSC: translation fault, level 2. The level real hardware gives
/// for an unmapped IPA depends on its stage-2 tables (UNCONFIRMED); VMMs
/// only test the fault kind.
const FSC_TRANSLATION_L2: u64 = 0x06;

/// One run of the unmapped physical space: every access there leaves the
/// guest.
pub struct Span {
    pub base: u64,
    pub size: u64,
    pub shared: *const Shared,
}

/// How a run ends.
enum Outcome {
    Exit(HvVcpuExit),
    Error(HvReturn),
}

fn exception(syndrome: u64, va: u64, ipa: u64) -> HvVcpuExit {
    let mut e = HvVcpuExit {
        reason: HV_EXIT_REASON_EXCEPTION,
        ..Default::default()
    };
    e.exception.syndrome = syndrome;
    e.exception.virtual_address = va;
    e.exception.physical_address = ipa;
    e
}

fn reason(reason: u32) -> HvVcpuExit {
    HvVcpuExit {
        reason,
        ..Default::default()
    }
}

/// `hv_vcpu_run(id)` for the calling thread.
pub fn run(id: u64) -> HvReturn {
    let me = std::thread::current().id();
    loop {
        let mut entered = vm::enter();
        let vm = match entered.vm() {
            Ok(vm) => vm,
            Err(e) => return e,
        };
        let index = match vm.owned(id, me) {
            Ok(i) => i,
            Err(e) => return e,
        };
        match run_slices(vm, index) {
            Some(Outcome::Exit(exit)) => {
                let v = vm.vcpus[index].as_mut().expect("owned");
                *v.exit = exit;
                // Pending lines hold for one run (§7).
                v.pending_irq = false;
                v.pending_fiq = false;
                return HV_SUCCESS;
            }
            Some(Outcome::Error(e)) => return e,
            // Another thread waits for the engine: leaving the gate here
            // queues this one behind it.
            None => {}
        }
    }
}

/// Runs vCPU `index` until an exit, or `None` at the end of a slice when
/// another thread wants the engine.
fn run_slices(vm: &mut Vm, index: usize) -> Option<Outcome> {
    let slice_end = Instant::now() + TIME_SLICE;
    loop {
        let v = vm.vcpus[index].as_mut().expect("owned");
        if v.cancel.swap(false, Ordering::SeqCst) {
            return Some(Outcome::Exit(reason(HV_EXIT_REASON_CANCELED)));
        }
        let (irq, fiq, masked) = (v.pending_irq, v.pending_fiq, v.vtimer_masked);
        let now = clock::now();
        let vtimer_deadline = {
            let cores = vm.shared.cores.borrow();
            let core = cores[index].as_ref().expect("owned");
            let count = core.virtual_count(now);
            if !masked && core.timers.virt.output(count) {
                None
            } else if masked {
                Some(None)
            } else {
                Some(
                    core.timers
                        .virt
                        .next_rise(count)
                        .and_then(|at| clock::instant_of(now.wrapping_add(at - count))),
                )
            }
        };
        let Some(vtimer_deadline) = vtimer_deadline else {
            // §6.2: the exit masks the timer until the VMM unmasks it.
            vm.vcpus[index].as_mut().expect("owned").vtimer_masked = true;
            return Some(Outcome::Exit(reason(HV_EXIT_REASON_VTIMER_ACTIVATED)));
        };

        vm.load(index);
        let pstate = vm.engine.read(Reg::PSTATE);
        if !legal_pstate(pstate) {
            return Some(Outcome::Error(HV_ILLEGAL_GUEST_STATE));
        }
        vm.engine.set_irq_lines(irq, fiq);
        {
            let mut k = lock(&KICKS);
            k.running = Some(index);
        }
        // A cancel that raced with marking the vCPU running.
        if vm.vcpus[index]
            .as_ref()
            .expect("owned")
            .cancel
            .load(Ordering::SeqCst)
        {
            lock(&KICKS).running = None;
            continue;
        }
        let deadline = match vtimer_deadline {
            Some(t) => t.min(slice_end),
            None => slice_end,
        };
        vm.ticker.arm(Some(deadline));
        vm.shared.trap.set(None);
        let result = vm.engine.run();
        vm.ticker.disarm();
        lock(&KICKS).running = None;

        if let Some(trap) = vm.shared.trap.take() {
            return Some(Outcome::Exit(trap_exit(vm, trap)));
        }
        if let Err(e) = result {
            let pc = vm.engine.read(Reg::PC);
            tracing::error!("hvf-double: the software CPU stopped at pc {pc:#x}: {e}");
            return Some(Outcome::Error(HV_ERROR));
        }
        match vm.engine.last_exit() {
            ffi::EXIT_WFI => return Some(Outcome::Exit(wfx_exit(vm, false))),
            ffi::EXIT_WFE => return Some(Outcome::Exit(wfx_exit(vm, true))),
            // YIELD, a kick (cancel, timer, slice end): look again.
            _ => {}
        }
        if Instant::now() >= slice_end && GATE.contended() {
            return None;
        }
    }
}

/// EL0t, EL1t or EL1h in AArch64: what a VM without EL2 may run in.
fn legal_pstate(pstate: u64) -> bool {
    matches!(pstate & 0x1f, 0b00000 | 0b00100 | 0b00101)
}

/// WFI/WFE: PC back on the instruction (the engine stops past it).
fn wfx_exit(vm: &mut Vm, wfe: bool) -> HvVcpuExit {
    let pc = vm.engine.read(Reg::PC);
    vm.engine.write(Reg::PC, pc.wrapping_sub(4));
    let esr = (u64::from(EC_WFX) << 26) | IL | u64::from(wfe);
    exception(esr, 0, 0)
}

fn trap_exit(vm: &mut Vm, trap: Trap) -> HvVcpuExit {
    let info = vm.engine.trap_info();
    match trap {
        Trap::Data { ipa, write } if info.fetch => {
            let esr = (u64::from(EC_IABT_LOWER) << 26) | IL | FSC_TRANSLATION_L2;
            let _ = write;
            exception(esr, info.va, ipa)
        }
        Trap::Data { ipa, write } => {
            let insn = if info.syndrome & ISS_ISV != 0 {
                info.syndrome & ISS_INSN_BITS
            } else {
                0
            };
            let wnr = if write { ISS_WNR } else { 0 };
            let esr = (u64::from(EC_DABT_LOWER) << 26) | IL | insn | wnr | FSC_TRANSLATION_L2;
            exception(esr, info.va, ipa)
        }
        Trap::SysReg { iss } => exception((u64::from(EC_SYSREG) << 26) | IL | iss, 0, 0),
        // The hook saw QEMU's whole ESR, immediate included. HVC leaves
        // PC past itself; a trapped SMC returns on the instruction.
        Trap::Hvc => exception(vm.shared.hook_syndrome.get(), 0, 0),
        Trap::Smc => {
            let pc = vm.engine.read(Reg::PC);
            vm.engine.write(Reg::PC, pc.wrapping_sub(4));
            exception(vm.shared.hook_syndrome.get(), 0, 0)
        }
    }
}

/// Writes PSTATE and makes the engine's cached mode follow (a PSTATE
/// write alone does not; a system-register write does).
pub fn write_pstate(vm: &mut Vm, value: u64) {
    // A mode change moves the live SP between banks, as an exception
    // return would.
    let old = crate::vm::selected_sp(vm.engine.read(Reg::PSTATE));
    let new = crate::vm::selected_sp(value);
    if old != new {
        vm.engine.write(old, vm.engine.read(Reg::SP));
    }
    vm.engine.write(Reg::PSTATE, value);
    if old != new {
        vm.engine.write(Reg::SP, vm.engine.read(new));
    }
    if let Err(e) = vm.engine.write_sysreg(SCR_EL3, SCR_EL3_VALUE) {
        tracing::error!("hvf-double: refreshing the CPU mode: {e}");
    }
}

// ---- engine callbacks: they run inside `Engine::run`, on the thread that
// holds the gate, and only record what happened.

/// # Safety
/// `user` is the boxed `Shared` registered with the engine.
pub unsafe extern "C" fn sysreg_filter(
    _uc: *mut uc_engine,
    encoding: u32,
    _user: *mut c_void,
) -> bool {
    sysregs::intercepted(SysReg::from_instruction(encoding))
}

/// # Safety
/// `user` is the boxed `Shared` registered with the engine; `value`
/// points at the helper's u64.
pub unsafe extern "C" fn sysreg_handler(
    uc: *mut uc_engine,
    encoding: u32,
    el: i32,
    is_read: bool,
    value: *mut u64,
    user: *mut c_void,
) -> bool {
    // SAFETY: per the contract above; both live for the callback.
    let shared = unsafe { &*user.cast::<Shared>() };
    // SAFETY: the helper's u64, live for the callback.
    let value = unsafe { &mut *value };
    let reg = SysReg::from_instruction(encoding);
    let rt = encoding & 31;
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        sysreg_access(shared, reg, rt, el, is_read, value)
    }));
    match outcome {
        Ok(Access::Done) => true,
        Ok(Access::Undefined) => false,
        Ok(Access::Exit(iss)) => {
            shared.trap.set(Some(Trap::SysReg { iss }));
            // SAFETY: `uc` is the engine calling us, on its own thread.
            unsafe { ffi::uc_arm64_trap(uc) };
            true
        }
        Err(_) => {
            tracing::error!("hvf-double: panic while emulating {reg}");
            false
        }
    }
}

enum Access {
    Done,
    Undefined,
    Exit(u64),
}

fn sysreg_access(
    shared: &Shared,
    reg: SysReg,
    rt: u32,
    el: i32,
    is_read: bool,
    value: &mut u64,
) -> Access {
    let index = shared.current.get();
    let mut cores = shared.cores.borrow_mut();
    let Some(core) = cores.get_mut(index).and_then(Option::as_mut) else {
        return Access::Undefined;
    };
    match sysregs::route(reg, core.trap_debug_regs) {
        Route::Vmm if el >= 1 => Access::Exit(sysregs::trap_iss(reg, rt, is_read)),
        // EL0 may not touch these at all: UNDEFINED at EL1.
        Route::Vmm | Route::Native => Access::Undefined,
        Route::Double => {
            let host = clock::now();
            let count = core.virtual_count(host);
            let write = (!is_read).then_some(*value);
            match core.timers.access(reg, el, write, count, clock::HZ) {
                TimerAccess::Value(v) => {
                    *value = v;
                    return Access::Done;
                }
                TimerAccess::Written => {
                    // The timer may now fire (or later): let the run loop
                    // look at it again.
                    shared.kick.kick();
                    return Access::Done;
                }
                TimerAccess::Undefined => return Access::Undefined,
                TimerAccess::NotATimerRegister => {}
            }
            if el < 1 {
                return Access::Undefined;
            }
            if is_read {
                match vm::double_sys(core, reg) {
                    Some(v) => {
                        *value = v;
                        Access::Done
                    }
                    None => Access::Undefined,
                }
            } else if sysregs::is_debug_bp_wp(reg) || reg == sysregs::MDSCR_EL1 {
                core.debug.insert(reg, *value);
                Access::Done
            } else {
                // Identity registers are read-only to the guest.
                Access::Undefined
            }
        }
    }
}

/// HVC and SMC reach the host here (everything else the guest takes
/// itself).
///
/// # Safety
/// `user` is the boxed `Shared` registered with the engine.
pub unsafe extern "C" fn exception_hook(uc: *mut uc_engine, intno: u32, user: *mut c_void) {
    // SAFETY: per the contract above.
    let shared = unsafe { &*user.cast::<Shared>() };
    let mut syndrome = 0u64;
    let mut va = 0u64;
    let mut fetch = false;
    // SAFETY: `uc` is the engine calling us; three out-pointers to locals.
    unsafe { ffi::uc_arm64_trap_info(uc, &mut syndrome, &mut va, &mut fetch) };
    shared.hook_syndrome.set(syndrome);
    let trap = match intno {
        ffi::EXCP_HVC => Trap::Hvc,
        ffi::EXCP_SMC => Trap::Smc,
        other => {
            tracing::error!("hvf-double: unexpected exception {other} reached the host");
            return;
        }
    };
    shared.trap.set(Some(trap));
    // SAFETY: the instruction has retired (an exception hook), so
    // stopping here repeats nothing.
    unsafe { ffi::uc_emu_stop(uc) };
}

/// # Safety
/// `user` is a boxed [`Span`] registered with the engine.
pub unsafe extern "C" fn mmio_read(
    uc: *mut uc_engine,
    offset: u64,
    _size: u32,
    user: *mut c_void,
) -> u64 {
    // SAFETY: per the contract above.
    unsafe { abort_access(uc, offset, false, user) };
    0
}

/// # Safety
/// `user` is a boxed [`Span`] registered with the engine.
pub unsafe extern "C" fn mmio_write(
    uc: *mut uc_engine,
    offset: u64,
    _size: u32,
    _value: u64,
    user: *mut c_void,
) {
    // SAFETY: per the contract above.
    unsafe { abort_access(uc, offset, true, user) };
}

/// An access to an unmapped IPA: a stage-2 fault for the VMM.
///
/// # Safety
/// `user` is a boxed [`Span`]; `uc` the engine calling us.
unsafe fn abort_access(uc: *mut uc_engine, offset: u64, write: bool, user: *mut c_void) {
    // SAFETY: per the contract above; the span's `shared` is the VM's.
    let span = unsafe { &*user.cast::<Span>() };
    // SAFETY: a span points at its VM's boxed Shared, which outlives it.
    let shared = unsafe { &*span.shared };
    shared.trap.set(Some(Trap::Data {
        ipa: span.base.wrapping_add(offset),
        write,
    }));
    // SAFETY: `uc` is the engine calling us, inside an MMIO callback.
    unsafe { ffi::uc_arm64_trap(uc) };
}
