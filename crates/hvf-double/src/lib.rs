//! A behavioural double of Hypervisor.framework (arm64) for Linux hosts.
//!
//! It exports the C functions of `<Hypervisor/Hypervisor.h>` that
//! vmapple's `accel-hvf` calls, with the framework's observable behaviour
//! as `../shared/spec/hvf-semantics.md` records it, on the patched Unicorn
//! software CPU of crate `accel-tcg`. `accel-hvf` built with its
//! `hvf-double` feature links these symbols instead of the framework, so
//! the code every Mac user runs — its vCPU threads, run loop, exit
//! decoding, register sync, vtimer protocol, kicks — executes in CI.
//!
//! What it reproduces (§11 of the spec): one VM per process (`HV_BUSY`),
//! vCPUs bound to their creating thread with every per-vCPU call checked
//! (`HV_BAD_ARGUMENT` from another thread), one vCPU per thread, the exit
//! record at a fixed address, ESR-format syndromes (data aborts with and
//! without ISV, instruction aborts, trapped MRS/MSR with Rt, HVC/SMC with
//! their immediates, WFI/WFE), the PC rules, 16 KiB stage-2 granules with
//! overlap and alignment checks, the vtimer protocol (exit, auto-mask,
//! offset), pending IRQ/FIQ for one run, `hv_vcpus_exit` from any thread
//! (including before a run), a fresh vCPU's zero state.
//!
//! What it simplifies, each said where it happens: vCPUs take turns on one
//! engine (exact atomics; §11 allows it), mappings other than RWX are
//! refused with `HV_UNSUPPORTED`, `hv_gic_*`, SME, EL2 and SIMD register
//! calls are absent (vmapple does not call them), debug registers are
//! stored but do not act.
//!
//! Never part of a release build and never on macOS: enabling it there
//! is a compile error.

#[cfg(target_os = "macos")]
compile_error!("hvf-double stands in for Hypervisor.framework on Linux; macOS has the real one");
#[cfg(not(debug_assertions))]
compile_error!("hvf-double is a test double: build it only in debug/test profiles");

pub mod clock;
mod run;
pub mod sysregs;
mod vm;

use std::cell::Cell;
use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};

use accel_tcg::ffi::RegisterARM64 as Reg;

pub use vm::{DEFAULT_IPA_BITS, GRANULE, MAX_IPA_BITS, MAX_VCPUS};

pub type HvReturn = i32;

pub const HV_SUCCESS: HvReturn = 0;
pub const HV_ERROR: HvReturn = 0xfae9_4001_u32 as i32;
pub const HV_BUSY: HvReturn = 0xfae9_4002_u32 as i32;
pub const HV_BAD_ARGUMENT: HvReturn = 0xfae9_4003_u32 as i32;
pub const HV_ILLEGAL_GUEST_STATE: HvReturn = 0xfae9_4004_u32 as i32;
pub const HV_NO_RESOURCES: HvReturn = 0xfae9_4005_u32 as i32;
pub const HV_NO_DEVICE: HvReturn = 0xfae9_4006_u32 as i32;
pub const HV_UNSUPPORTED: HvReturn = 0xfae9_400f_u32 as i32;

pub const HV_MEMORY_READ: u64 = 1 << 0;
pub const HV_MEMORY_WRITE: u64 = 1 << 1;
pub const HV_MEMORY_EXEC: u64 = 1 << 2;

pub const HV_EXIT_REASON_CANCELED: u32 = 0;
pub const HV_EXIT_REASON_EXCEPTION: u32 = 1;
pub const HV_EXIT_REASON_VTIMER_ACTIVATED: u32 = 2;

pub const HV_INTERRUPT_TYPE_IRQ: u32 = 0;
pub const HV_INTERRUPT_TYPE_FIQ: u32 = 1;

/// `hv_reg_t` values past X30.
pub const HV_REG_PC: u32 = 31;
pub const HV_REG_FPCR: u32 = 32;
pub const HV_REG_FPSR: u32 = 33;
pub const HV_REG_CPSR: u32 = 34;

/// `hv_vcpu_exit_exception_t`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HvVcpuExitException {
    pub syndrome: u64,
    pub virtual_address: u64,
    pub physical_address: u64,
}

/// `hv_vcpu_exit_t`: 32 bytes, fields at 0, 8, 16, 24 (§4.2).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HvVcpuExit {
    pub reason: u32,
    pub exception: HvVcpuExitException,
}

/// `mach_timebase_info_data_t`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct MachTimebaseInfo {
    pub numer: u32,
    pub denom: u32,
}

/// What `hv_vm_config_create` hands out (released with `os_release`).
struct VmConfig {
    ipa_bits: u32,
}

thread_local! {
    /// The vCPU this thread created, if any.
    static MY_VCPU: Cell<Option<u64>> = const { Cell::new(None) };
}

/// Runs an API call, turning a panic into `HV_ERROR` (unwinding into C is
/// not allowed).
fn api(f: impl FnOnce() -> HvReturn) -> HvReturn {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|_| {
        tracing::error!("hvf-double: internal panic");
        HV_ERROR
    })
}

/// The vCPU id as this thread's own, or the framework's refusal.
fn with_vcpu(vcpu: u64, f: impl FnOnce(&mut vm::Vm, usize) -> HvReturn) -> HvReturn {
    api(|| {
        let mut entered = vm::enter();
        let vm = match entered.vm() {
            Ok(vm) => vm,
            Err(e) => return e,
        };
        match vm.owned(vcpu, std::thread::current().id()) {
            Ok(index) => f(vm, index),
            Err(e) => e,
        }
    })
}

fn general(reg: u32) -> Option<Reg> {
    Some(match reg {
        0..=30 => accel_tcg::GENERAL_REGISTERS[reg as usize],
        HV_REG_PC => Reg::PC,
        HV_REG_FPCR => Reg::FPCR,
        HV_REG_FPSR => Reg::FPSR,
        HV_REG_CPSR => Reg::PSTATE,
        _ => return None,
    })
}

// ---- VM configuration ----------------------------------------------------

/// `hv_vm_config_create`.
#[no_mangle]
pub extern "C" fn hv_vm_config_create() -> *mut c_void {
    Box::into_raw(Box::new(VmConfig {
        ipa_bits: DEFAULT_IPA_BITS,
    }))
    .cast()
}

/// `os_release` for the objects this double hands out.
///
/// # Safety
/// `object` comes from `hv_vm_config_create` and is released once.
#[no_mangle]
pub unsafe extern "C" fn os_release(object: *mut c_void) {
    if !object.is_null() {
        // SAFETY: per the contract, a live Box<VmConfig> released once.
        drop(unsafe { Box::from_raw(object.cast::<VmConfig>()) });
    }
}

/// `hv_vm_config_get_max_ipa_size`.
///
/// # Safety
/// `bits` is null or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn hv_vm_config_get_max_ipa_size(bits: *mut u32) -> HvReturn {
    if bits.is_null() {
        return HV_BAD_ARGUMENT;
    }
    // SAFETY: checked non-null; valid per the contract.
    unsafe { *bits = MAX_IPA_BITS };
    HV_SUCCESS
}

/// `hv_vm_config_get_default_ipa_size`.
///
/// # Safety
/// `bits` is null or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn hv_vm_config_get_default_ipa_size(bits: *mut u32) -> HvReturn {
    if bits.is_null() {
        return HV_BAD_ARGUMENT;
    }
    // SAFETY: checked non-null; valid per the contract.
    unsafe { *bits = DEFAULT_IPA_BITS };
    HV_SUCCESS
}

/// `hv_vm_config_set_ipa_size`: above the maximum is `HV_UNSUPPORTED`;
/// 0 (the default) and anything up to it are kept (§2.2).
///
/// # Safety
/// `config` comes from `hv_vm_config_create` and is live.
#[no_mangle]
pub unsafe extern "C" fn hv_vm_config_set_ipa_size(config: *mut c_void, bits: u32) -> HvReturn {
    if config.is_null() {
        return HV_BAD_ARGUMENT;
    }
    if bits > MAX_IPA_BITS {
        return HV_UNSUPPORTED;
    }
    // SAFETY: a live VmConfig per the contract.
    unsafe { (*config.cast::<VmConfig>()).ipa_bits = bits };
    HV_SUCCESS
}

// ---- the VM --------------------------------------------------------------

/// `hv_vm_create`: one VM per process; a second is `HV_BUSY`.
///
/// # Safety
/// `config` is null or a live object from `hv_vm_config_create`.
#[no_mangle]
pub unsafe extern "C" fn hv_vm_create(config: *mut c_void) -> HvReturn {
    let bits = if config.is_null() {
        DEFAULT_IPA_BITS
    } else {
        // SAFETY: a live VmConfig per the contract.
        match unsafe { (*config.cast::<VmConfig>()).ipa_bits } {
            0 => DEFAULT_IPA_BITS,
            b => b,
        }
    };
    api(|| {
        let mut entered = vm::enter();
        let slot = entered.slot();
        if slot.is_some() {
            return HV_BUSY;
        }
        match vm::Vm::create(bits) {
            Ok(vm) => {
                *slot = Some(vm::VmCell(vm));
                tracing::info!("hvf-double: VM created ({bits}-bit IPA)");
                HV_SUCCESS
            }
            Err(e) => e,
        }
    })
}

/// `hv_vm_destroy`: every vCPU must be gone first (`HV_BUSY`).
#[no_mangle]
pub extern "C" fn hv_vm_destroy() -> HvReturn {
    api(|| {
        let mut entered = vm::enter();
        match entered.vm() {
            Err(e) => return e,
            Ok(vm) if vm.any_vcpu() => return HV_BUSY,
            Ok(_) => {}
        }
        *entered.slot() = None;
        let mut k = vm::lock(&vm::KICKS);
        k.handle = None;
        k.cancel.clear();
        k.running = None;
        HV_SUCCESS
    })
}

/// `hv_vm_map`: page-aligned host memory at a 16 KiB-aligned IPA.
///
/// # Safety
/// `addr` points at `size` bytes of host memory that stay mapped until
/// they are unmapped from the VM or the VM is destroyed.
#[no_mangle]
pub unsafe extern "C" fn hv_vm_map(
    addr: *mut c_void,
    ipa: u64,
    size: usize,
    flags: u64,
) -> HvReturn {
    api(|| match vm::enter().vm() {
        Ok(vm) => vm.map(addr as usize, ipa, size as u64, flags),
        Err(e) => e,
    })
}

/// `hv_vm_unmap`.
#[no_mangle]
pub extern "C" fn hv_vm_unmap(ipa: u64, size: usize) -> HvReturn {
    api(|| match vm::enter().vm() {
        Ok(vm) => vm.unmap(ipa, size as u64),
        Err(e) => e,
    })
}

// ---- vCPUs ---------------------------------------------------------------

/// `hv_vcpu_create`: a vCPU bound to the calling thread.
///
/// # Safety
/// `vcpu` and `exit` are valid for writes; `config` is ignored (null).
#[no_mangle]
pub unsafe extern "C" fn hv_vcpu_create(
    vcpu: *mut u64,
    exit: *mut *const HvVcpuExit,
    _config: *mut c_void,
) -> HvReturn {
    if vcpu.is_null() || exit.is_null() {
        return HV_BAD_ARGUMENT;
    }
    api(|| {
        let mut entered = vm::enter();
        let vm = match entered.vm() {
            Ok(vm) => vm,
            Err(e) => return e,
        };
        match vm.create_vcpu(std::thread::current().id()) {
            Ok((id, record)) => {
                MY_VCPU.with(|c| c.set(Some(id)));
                // SAFETY: checked non-null; valid per the contract.
                unsafe {
                    *vcpu = id;
                    *exit = record;
                }
                HV_SUCCESS
            }
            Err(e) => e,
        }
    })
}

/// `hv_vcpu_destroy`, on the owning thread.
#[no_mangle]
pub extern "C" fn hv_vcpu_destroy(vcpu: u64) -> HvReturn {
    let r = with_vcpu(vcpu, |vm, index| {
        vm.destroy_vcpu(index);
        HV_SUCCESS
    });
    if r == HV_SUCCESS {
        MY_VCPU.with(|c| c.set(None));
    }
    r
}

/// `hv_vcpu_run`, on the owning thread.
#[no_mangle]
pub extern "C" fn hv_vcpu_run(vcpu: u64) -> HvReturn {
    api(|| run::run(vcpu))
}

/// `hv_vcpus_exit`, from any thread: a running vCPU returns CANCELED, one
/// that is not running does so on its next run.
///
/// # Safety
/// `vcpus` points at `count` ids.
#[no_mangle]
pub unsafe extern "C" fn hv_vcpus_exit(vcpus: *const u64, count: u32) -> HvReturn {
    if vcpus.is_null() && count != 0 {
        return HV_BAD_ARGUMENT;
    }
    let ids = if count == 0 {
        &[][..]
    } else {
        // SAFETY: `count` ids per the contract.
        unsafe { std::slice::from_raw_parts(vcpus, count as usize) }
    };
    api(|| {
        for &id in ids {
            let r = vm::cancel(id);
            if r != HV_SUCCESS {
                return r;
            }
        }
        HV_SUCCESS
    })
}

/// `hv_vcpu_get_reg`.
///
/// # Safety
/// `value` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn hv_vcpu_get_reg(vcpu: u64, reg: u32, value: *mut u64) -> HvReturn {
    if value.is_null() {
        return HV_BAD_ARGUMENT;
    }
    with_vcpu(vcpu, |vm, index| {
        let Some(r) = general(reg) else {
            return HV_BAD_ARGUMENT;
        };
        vm.load(index);
        let v = vm.engine.read(r);
        // SAFETY: checked non-null; valid per the contract.
        unsafe { *value = v };
        HV_SUCCESS
    })
}

/// `hv_vcpu_set_reg`.
#[no_mangle]
pub extern "C" fn hv_vcpu_set_reg(vcpu: u64, reg: u32, value: u64) -> HvReturn {
    with_vcpu(vcpu, |vm, index| {
        let Some(r) = general(reg) else {
            return HV_BAD_ARGUMENT;
        };
        vm.load(index);
        if reg == HV_REG_CPSR {
            run::write_pstate(vm, value);
        } else {
            vm.engine.write(r, value);
        }
        HV_SUCCESS
    })
}

/// `hv_vcpu_get_sys_reg`.
///
/// # Safety
/// `value` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn hv_vcpu_get_sys_reg(vcpu: u64, reg: u16, value: *mut u64) -> HvReturn {
    if value.is_null() {
        return HV_BAD_ARGUMENT;
    }
    with_vcpu(vcpu, |vm, index| {
        let Some(r) = sysregs::from_hv_id(reg) else {
            return HV_BAD_ARGUMENT;
        };
        let v = vm.read_sys(index, r);
        // SAFETY: checked non-null; valid per the contract.
        unsafe { *value = v };
        HV_SUCCESS
    })
}

/// `hv_vcpu_set_sys_reg`.
#[no_mangle]
pub extern "C" fn hv_vcpu_set_sys_reg(vcpu: u64, reg: u16, value: u64) -> HvReturn {
    with_vcpu(vcpu, |vm, index| match sysregs::from_hv_id(reg) {
        Some(r) => vm.write_sys(index, r, value),
        None => HV_BAD_ARGUMENT,
    })
}

/// `hv_simd_fp_uchar16_t` as accel-hvf declares it off macOS: the 16
/// bytes, lowest lane first.
#[repr(C, align(16))]
#[derive(Clone, Copy)]
pub struct SimdFp(pub [u8; 16]);

/// `hv_vcpu_get_simd_fp_reg`: Q0..Q31 are 0..31.
///
/// # Safety
/// `value` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn hv_vcpu_get_simd_fp_reg(
    vcpu: u64,
    reg: u32,
    value: *mut SimdFp,
) -> HvReturn {
    if value.is_null() || reg > 31 {
        return HV_BAD_ARGUMENT;
    }
    with_vcpu(vcpu, |vm, index| {
        vm.load(index);
        let v = vm.engine.read_vector(reg as u8);
        // SAFETY: checked non-null; valid per the contract.
        unsafe { *value = SimdFp(v.to_le_bytes()) };
        HV_SUCCESS
    })
}

/// `hv_vcpu_set_simd_fp_reg`.
#[no_mangle]
pub extern "C" fn hv_vcpu_set_simd_fp_reg(vcpu: u64, reg: u32, value: SimdFp) -> HvReturn {
    if reg > 31 {
        return HV_BAD_ARGUMENT;
    }
    let v = u128::from_le_bytes(value.0);
    with_vcpu(vcpu, |vm, index| {
        vm.load(index);
        vm.engine.write_vector(reg as u8, v);
        HV_SUCCESS
    })
}

/// `hv_vcpu_set_pending_interrupt`: a level for the next run only.
#[no_mangle]
pub extern "C" fn hv_vcpu_set_pending_interrupt(vcpu: u64, kind: u32, pending: bool) -> HvReturn {
    with_vcpu(vcpu, |vm, index| {
        let v = vm.vcpus[index].as_mut().expect("owned");
        match kind {
            HV_INTERRUPT_TYPE_IRQ => v.pending_irq = pending,
            HV_INTERRUPT_TYPE_FIQ => v.pending_fiq = pending,
            _ => return HV_BAD_ARGUMENT,
        }
        HV_SUCCESS
    })
}

/// `hv_vcpu_get_pending_interrupt`.
///
/// # Safety
/// `pending` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn hv_vcpu_get_pending_interrupt(
    vcpu: u64,
    kind: u32,
    pending: *mut bool,
) -> HvReturn {
    if pending.is_null() {
        return HV_BAD_ARGUMENT;
    }
    with_vcpu(vcpu, |vm, index| {
        let v = vm.vcpus[index].as_ref().expect("owned");
        let value = match kind {
            HV_INTERRUPT_TYPE_IRQ => v.pending_irq,
            HV_INTERRUPT_TYPE_FIQ => v.pending_fiq,
            _ => return HV_BAD_ARGUMENT,
        };
        // SAFETY: checked non-null; valid per the contract.
        unsafe { *pending = value };
        HV_SUCCESS
    })
}

/// `hv_vcpu_set_vtimer_mask`.
#[no_mangle]
pub extern "C" fn hv_vcpu_set_vtimer_mask(vcpu: u64, masked: bool) -> HvReturn {
    with_vcpu(vcpu, |vm, index| {
        vm.vcpus[index].as_mut().expect("owned").vtimer_masked = masked;
        HV_SUCCESS
    })
}

/// `hv_vcpu_get_vtimer_mask`.
///
/// # Safety
/// `masked` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn hv_vcpu_get_vtimer_mask(vcpu: u64, masked: *mut bool) -> HvReturn {
    if masked.is_null() {
        return HV_BAD_ARGUMENT;
    }
    with_vcpu(vcpu, |vm, index| {
        let value = vm.vcpus[index].as_ref().expect("owned").vtimer_masked;
        // SAFETY: checked non-null; valid per the contract.
        unsafe { *masked = value };
        HV_SUCCESS
    })
}

/// `hv_vcpu_set_vtimer_offset`: CNTVCT = `mach_absolute_time()` − offset.
#[no_mangle]
pub extern "C" fn hv_vcpu_set_vtimer_offset(vcpu: u64, offset: u64) -> HvReturn {
    with_vcpu(vcpu, |vm, index| {
        if let Some(core) = vm.shared.cores.borrow_mut()[index].as_mut() {
            core.offset = offset;
        }
        HV_SUCCESS
    })
}

/// `hv_vcpu_get_vtimer_offset`.
///
/// # Safety
/// `offset` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn hv_vcpu_get_vtimer_offset(vcpu: u64, offset: *mut u64) -> HvReturn {
    if offset.is_null() {
        return HV_BAD_ARGUMENT;
    }
    with_vcpu(vcpu, |vm, index| {
        let value = vm.shared.cores.borrow()[index]
            .as_ref()
            .map_or(0, |c| c.offset);
        // SAFETY: checked non-null; valid per the contract.
        unsafe { *offset = value };
        HV_SUCCESS
    })
}

/// `hv_vcpu_set_trap_debug_exceptions`: kept (the double's guests take
/// their own debug exceptions either way).
#[no_mangle]
pub extern "C" fn hv_vcpu_set_trap_debug_exceptions(vcpu: u64, value: bool) -> HvReturn {
    with_vcpu(vcpu, |vm, index| {
        vm.vcpus[index]
            .as_mut()
            .expect("owned")
            .trap_debug_exceptions = value;
        HV_SUCCESS
    })
}

/// `hv_vcpu_set_trap_debug_reg_accesses`: DBG*/MDSCR_EL1 accesses exit
/// (EC 0x18) while set.
#[no_mangle]
pub extern "C" fn hv_vcpu_set_trap_debug_reg_accesses(vcpu: u64, value: bool) -> HvReturn {
    with_vcpu(vcpu, |vm, index| {
        if let Some(core) = vm.shared.cores.borrow_mut()[index].as_mut() {
            core.trap_debug_regs = value;
        }
        HV_SUCCESS
    })
}

// ---- libSystem -------------------------------------------------------------

/// `mach_absolute_time`: the 24 MHz host count.
#[no_mangle]
pub extern "C" fn mach_absolute_time() -> u64 {
    clock::now()
}

/// `mach_timebase_info`.
///
/// # Safety
/// `info` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn mach_timebase_info(info: *mut MachTimebaseInfo) -> i32 {
    if info.is_null() {
        return 4; // KERN_INVALID_ARGUMENT
    }
    // SAFETY: checked non-null; valid per the contract.
    unsafe {
        *info = MachTimebaseInfo {
            numer: clock::TIMEBASE_NUMER,
            denom: clock::TIMEBASE_DENOM,
        }
    };
    0
}
