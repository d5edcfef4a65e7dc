//! Hand-written declarations of the Hypervisor.framework calls we use
//! (arm64 flavour, `<Hypervisor/hv_vm.h>`, `hv_vcpu.h`, `hv_vcpu_types.h`,
//! `hv_vm_config.h`, `hv_gic.h`).
//!
//! Why not the `applevisor-sys` crate: we need about twenty functions; that
//! crate selects macOS versions through cargo features and links every
//! declared symbol strongly, whereas the macOS 15 GIC calls must be looked
//! up at run time so one binary still starts on older systems. A short
//! file we can audit line by line is the smaller risk.
//!
//! Everything here is a raw declaration: callers hold the safety contract
//! (the owning-thread rule for vCPU calls, valid pointers).

use std::ffi::{c_char, c_void};

pub type HvReturn = i32;
pub type HvVcpu = u64;
pub type HvIpa = u64;
/// `hv_vm_config_t` / `hv_vcpu_config_t` / `hv_gic_config_t`: os_objects.
pub type OsObject = *mut c_void;

pub const HV_SUCCESS: HvReturn = 0;

pub const HV_MEMORY_READ: u64 = 1 << 0;
pub const HV_MEMORY_WRITE: u64 = 1 << 1;
pub const HV_MEMORY_EXEC: u64 = 1 << 2;

pub const HV_EXIT_REASON_CANCELED: u32 = 0;
pub const HV_EXIT_REASON_EXCEPTION: u32 = 1;
pub const HV_EXIT_REASON_VTIMER_ACTIVATED: u32 = 2;

pub const HV_INTERRUPT_TYPE_IRQ: u32 = 0;
pub const HV_INTERRUPT_TYPE_FIQ: u32 = 1;

/// `hv_simd_fp_uchar16_t`'s 16 bytes, lowest lane first. The framework's
/// type is a Clang vector passed by value in a SIMD register, which Rust
/// cannot declare in an `extern` block on stable (`simd_ffi`):
/// [`hv_vcpu_set_simd_fp_reg`] therefore makes that call itself on macOS.
/// The double (other hosts) takes this struct as it is.
#[repr(C, align(16))]
#[derive(Clone, Copy)]
pub struct SimdFp(pub [u8; 16]);

/// A V register's 128 bits as the framework's vector bytes.
pub fn simd_from_u128(value: u128) -> SimdFp {
    SimdFp(value.to_le_bytes())
}

/// The framework's vector bytes as a V register's 128 bits.
pub fn simd_to_u128(value: SimdFp) -> u128 {
    u128::from_le_bytes(value.0)
}

/// `hv_simd_fp_reg_t`: Q0..Q31 are 0..31.
pub const HV_SIMD_FP_REG_Q0: u32 = 0;

/// `hv_reg_t`: X0..X30 are 0..30.
pub const HV_REG_PC: u32 = 31;
pub const HV_REG_FPCR: u32 = 32;
pub const HV_REG_FPSR: u32 = 33;
pub const HV_REG_CPSR: u32 = 34;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct HvVcpuExitException {
    pub syndrome: u64,
    pub virtual_address: u64,
    pub physical_address: HvIpa,
}

/// `hv_vcpu_exit_t`: owned by the framework, valid for the vCPU's life,
/// rewritten by every `hv_vcpu_run`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct HvVcpuExit {
    pub reason: u32,
    pub exception: HvVcpuExitException,
}

// On Linux with the `hvf-double` feature the same symbols come from the
// double (crate `hvf-double`), linked by lib.rs.
#[cfg_attr(target_os = "macos", link(name = "Hypervisor", kind = "framework"))]
extern "C" {
    pub fn hv_vm_config_create() -> OsObject;
    pub fn hv_vm_config_get_max_ipa_size(ipa_bit_length: *mut u32) -> HvReturn;
    pub fn hv_vm_config_get_default_ipa_size(ipa_bit_length: *mut u32) -> HvReturn;
    pub fn hv_vm_config_set_ipa_size(config: OsObject, ipa_bit_length: u32) -> HvReturn;

    pub fn hv_vm_create(config: OsObject) -> HvReturn;
    pub fn hv_vm_destroy() -> HvReturn;
    pub fn hv_vm_map(addr: *mut c_void, ipa: HvIpa, size: usize, flags: u64) -> HvReturn;
    pub fn hv_vm_unmap(ipa: HvIpa, size: usize) -> HvReturn;

    pub fn hv_vcpu_create(
        vcpu: *mut HvVcpu,
        exit: *mut *const HvVcpuExit,
        config: OsObject,
    ) -> HvReturn;
    pub fn hv_vcpu_destroy(vcpu: HvVcpu) -> HvReturn;
    pub fn hv_vcpu_run(vcpu: HvVcpu) -> HvReturn;
    pub fn hv_vcpus_exit(vcpus: *const HvVcpu, vcpu_count: u32) -> HvReturn;

    pub fn hv_vcpu_get_reg(vcpu: HvVcpu, reg: u32, value: *mut u64) -> HvReturn;
    pub fn hv_vcpu_set_reg(vcpu: HvVcpu, reg: u32, value: u64) -> HvReturn;
    pub fn hv_vcpu_get_sys_reg(vcpu: HvVcpu, reg: u16, value: *mut u64) -> HvReturn;
    pub fn hv_vcpu_set_sys_reg(vcpu: HvVcpu, reg: u16, value: u64) -> HvReturn;
    pub fn hv_vcpu_get_simd_fp_reg(vcpu: HvVcpu, reg: u32, value: *mut SimdFp) -> HvReturn;
    #[cfg(not(target_os = "macos"))]
    pub fn hv_vcpu_set_simd_fp_reg(vcpu: HvVcpu, reg: u32, value: SimdFp) -> HvReturn;
    /// Only its address is used (see [`hv_vcpu_set_simd_fp_reg`]).
    #[cfg(target_os = "macos")]
    #[link_name = "hv_vcpu_set_simd_fp_reg"]
    fn hv_vcpu_set_simd_fp_reg_symbol();

    pub fn hv_vcpu_set_pending_interrupt(vcpu: HvVcpu, kind: u32, pending: bool) -> HvReturn;
    pub fn hv_vcpu_set_vtimer_mask(vcpu: HvVcpu, vtimer_is_masked: bool) -> HvReturn;
    // Unused: offsets come from our GuestClock and are never read back.
    #[allow(dead_code)]
    pub fn hv_vcpu_get_vtimer_offset(vcpu: HvVcpu, vtimer_offset: *mut u64) -> HvReturn;
    pub fn hv_vcpu_set_vtimer_offset(vcpu: HvVcpu, vtimer_offset: u64) -> HvReturn;
    pub fn hv_vcpu_set_trap_debug_exceptions(vcpu: HvVcpu, value: bool) -> HvReturn;
    pub fn hv_vcpu_set_trap_debug_reg_accesses(vcpu: HvVcpu, value: bool) -> HvReturn;
}

/// `hv_vcpu_set_simd_fp_reg(vcpu, reg, value)` with `value` in v0 as the
/// AAPCS64 passes a 16-byte short vector.
///
/// # Safety
/// As for every vCPU call: on the vCPU's owning thread.
#[cfg(target_os = "macos")]
pub unsafe fn hv_vcpu_set_simd_fp_reg(vcpu: HvVcpu, reg: u32, value: SimdFp) -> HvReturn {
    // SAFETY: both are 16 plain bytes, lane 0 first.
    let vector: core::arch::aarch64::uint8x16_t = unsafe { std::mem::transmute(value) };
    let ret: u64;
    // SAFETY: a plain AAPCS64 call of the framework function with x0, w1
    // and v0 as its three arguments; clobber_abi covers what it may change.
    unsafe {
        core::arch::asm!(
            "bl {f}",
            f = sym hv_vcpu_set_simd_fp_reg_symbol,
            inout("x0") vcpu => ret,
            in("x1") u64::from(reg),
            in("v0") vector,
            clobber_abi("C"),
        );
    }
    ret as u32 as HvReturn
}

// libSystem: os_object reference counting and the host counter.
extern "C" {
    pub fn os_release(object: *mut c_void);
    pub fn mach_absolute_time() -> u64;
    pub fn mach_timebase_info(info: *mut MachTimebaseInfo) -> i32;
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct MachTimebaseInfo {
    pub numer: u32,
    pub denom: u32,
}

/// The in-kernel GICv3 of macOS 15 (`hv_gic_*`), resolved at run time.
///
/// Not used yet: vmapple's interrupt controller is the userspace model
/// (crate `gic`), whose CPU interface the vCPUs reach by trapping `ICC_*`
/// accesses, and whose IRQ/FIQ outputs we inject with
/// `hv_vcpu_set_pending_interrupt`. With these calls the framework would
/// emulate distributor, redistributors and CPU interface itself: the GIC
/// MMIO ranges would leave our bus, `ICC_*` traps and pending-interrupt
/// injection would stop, device lines would go through `hv_gic_set_spi`
/// and the vtimer PPI would be wired by the framework (no VTIMER exits).
type FnConfigCreate = unsafe extern "C" fn() -> OsObject;
type FnConfigSetBase = unsafe extern "C" fn(OsObject, HvIpa) -> HvReturn;
type FnCreate = unsafe extern "C" fn(OsObject) -> HvReturn;
type FnReset = unsafe extern "C" fn() -> HvReturn;
type FnSetSpi = unsafe extern "C" fn(u32, bool) -> HvReturn;
type FnGetSize = unsafe extern "C" fn(*mut usize) -> HvReturn;
type FnGetRange = unsafe extern "C" fn(*mut u32, *mut u32) -> HvReturn;

#[allow(dead_code)]
pub struct GicApi {
    pub config_create: FnConfigCreate,
    pub config_set_distributor_base: FnConfigSetBase,
    pub config_set_redistributor_base: FnConfigSetBase,
    pub create: FnCreate,
    pub reset: FnReset,
    pub set_spi: FnSetSpi,
    pub get_distributor_size: FnGetSize,
    pub get_redistributor_size: FnGetSize,
    pub get_redistributor_region_size: FnGetSize,
    pub get_spi_interrupt_range: FnGetRange,
}

/// Looks up a symbol in the already-loaded images.
fn lookup(name: &'static [u8]) -> Option<*mut c_void> {
    debug_assert_eq!(name.last(), Some(&0));
    // SAFETY: `name` is a NUL-terminated static string; RTLD_DEFAULT
    // searches the images already loaded (Hypervisor.framework is linked).
    let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr().cast::<c_char>()) };
    (!p.is_null()).then_some(p)
}

macro_rules! symbol {
    ($name:literal, $ty:ty) => {{
        let p = lookup(concat!($name, "\0").as_bytes())?;
        // SAFETY: the symbol is the framework function of that name, whose
        // C signature (hv_gic.h, macOS 15) is `$ty`.
        unsafe { std::mem::transmute::<*mut c_void, $ty>(p) }
    }};
}

impl GicApi {
    /// The macOS 15 GIC calls, if this system has them.
    #[allow(dead_code)]
    pub fn load() -> Option<Self> {
        Some(Self {
            config_create: symbol!("hv_gic_config_create", FnConfigCreate),
            config_set_distributor_base: symbol!(
                "hv_gic_config_set_distributor_base",
                FnConfigSetBase
            ),
            config_set_redistributor_base: symbol!(
                "hv_gic_config_set_redistributor_base",
                FnConfigSetBase
            ),
            create: symbol!("hv_gic_create", FnCreate),
            reset: symbol!("hv_gic_reset", FnReset),
            set_spi: symbol!("hv_gic_set_spi", FnSetSpi),
            get_distributor_size: symbol!("hv_gic_get_distributor_size", FnGetSize),
            get_redistributor_size: symbol!("hv_gic_get_redistributor_size", FnGetSize),
            get_redistributor_region_size: symbol!(
                "hv_gic_get_redistributor_region_size",
                FnGetSize
            ),
            get_spi_interrupt_range: symbol!("hv_gic_get_spi_interrupt_range", FnGetRange),
        })
    }
}

/// A framework status as an error message.
pub fn describe(ret: HvReturn) -> String {
    let name = match ret as u32 {
        0xfae9_4001 => "HV_ERROR",
        0xfae9_4002 => "HV_BUSY",
        0xfae9_4003 => "HV_BAD_ARGUMENT",
        0xfae9_4004 => "HV_ILLEGAL_GUEST_STATE",
        0xfae9_4005 => "HV_NO_RESOURCES",
        0xfae9_4006 => "HV_NO_DEVICE",
        0xfae9_4007 => "HV_DENIED",
        0xfae9_400f => "HV_UNSUPPORTED",
        _ => "unknown status",
    };
    format!("{name} ({:#010x})", ret as u32)
}
