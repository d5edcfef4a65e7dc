//! Declarations of what our patch adds to Unicorn's C API
//! (`patches/unicorn-2.1.5-arm64-sysemu.patch`, `include/unicorn/unicorn.h`).
//! Stock Unicorn's API comes from `unicorn-engine-sys`'s bindings.

use std::ffi::c_void;

pub use unicorn_engine_sys::*;

/// `(encoding, user_data) -> trap?`, asked when code is translated.
pub type SysregFilter =
    unsafe extern "C" fn(uc: *mut uc_engine, encoding: u32, user_data: *mut c_void) -> bool;

/// `(encoding, el, is_read, value, user_data) -> defined?`, on every access.
pub type SysregHandler = unsafe extern "C" fn(
    uc: *mut uc_engine,
    encoding: u32,
    el: i32,
    is_read: bool,
    value: *mut u64,
    user_data: *mut c_void,
) -> bool;

/// Values of `uc_arm64_last_exit()` the scheduler acts on (the others
/// are "stopped" and "kicked", which need nothing special).
pub const EXIT_WFI: i32 = 1;
pub const EXIT_YIELD: i32 = 2;
pub const EXIT_KICK: i32 = 3;
/// `uc_arm64_trap()` from a callback: the instruction was abandoned.
pub const EXIT_TRAP: i32 = 4;
pub const EXIT_WFE: i32 = 5;

/// QEMU's exception numbers for HVC and SMC as `UC_HOOK_INTR` reports them.
pub const EXCP_HVC: u32 = 11;
pub const EXCP_SMC: u32 = 13;

/// `UC_CTL(type, nr, UC_CTL_IO_WRITE)` from unicorn.h.
pub const fn ctl_write(control: ControlType, args: u32) -> ControlType {
    ControlType(control.0 | (args << 26) | (1 << 30))
}

unsafe extern "C" {
    pub fn uc_arm64_sysemu_enable(
        uc: *mut uc_engine,
        filter: Option<SysregFilter>,
        handler: Option<SysregHandler>,
        user_data: *mut c_void,
    ) -> uc_error;
    pub fn uc_arm64_set_irq_lines(uc: *mut uc_engine, irq: bool, fiq: bool) -> uc_error;
    pub fn uc_arm64_last_exit(uc: *mut uc_engine) -> i32;
    pub fn uc_kick(uc: *mut uc_engine);
    pub fn uc_arm64_trap(uc: *mut uc_engine) -> uc_error;
    pub fn uc_arm64_trap_info(
        uc: *mut uc_engine,
        syndrome: *mut u64,
        va: *mut u64,
        fetch: *mut bool,
    ) -> uc_error;
}
