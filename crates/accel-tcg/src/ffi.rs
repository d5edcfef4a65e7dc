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

/// QEMU's exception number for HVC as `UC_HOOK_INTR` reports it.
pub const EXCP_HVC: u32 = 11;

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
}
