//! A thin safe layer over one Unicorn engine.
//!
//! Every `unsafe` call into Unicorn lives here. An [`Engine`] is not `Send`:
//! Unicorn keeps per-thread JIT state, so the engine must be created, run
//! and dropped on one thread. Only [`KickHandle`] crosses threads, and it
//! calls nothing but our patch's thread-safe `uc_kick`.

use std::ffi::{c_void, CStr};
use std::marker::PhantomData;
use std::ptr::NonNull;
use std::sync::{Arc, RwLock};
use vm_core::sync::{read_lock, write_lock};

use arch_arm64::SysReg;

use crate::ffi::{self, uc_context, uc_engine, uc_error, RegisterARM64, RegisterARM64CP};

/// A Unicorn error code with its message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UcError(pub uc_error);

impl std::fmt::Display for UcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // SAFETY: uc_strerror returns a pointer to a static NUL-terminated
        // string for every code.
        let message = unsafe { CStr::from_ptr(ffi::uc_strerror(self.0)) };
        write!(f, "{} ({:?})", message.to_string_lossy(), self.0)
    }
}

impl std::error::Error for UcError {}

fn check(err: uc_error) -> Result<(), UcError> {
    if err == uc_error::OK {
        Ok(())
    } else {
        Err(UcError(err))
    }
}

/// MMIO callbacks with the shape Unicorn calls.
pub type MmioRead = unsafe extern "C" fn(*mut uc_engine, u64, u32, *mut c_void) -> u64;
pub type MmioWrite = unsafe extern "C" fn(*mut uc_engine, u64, u32, u64, *mut c_void);
pub type IntrHook = unsafe extern "C" fn(*mut uc_engine, u32, *mut c_void);

/// What the engine knows about an abandoned access or a hooked exception.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrapInfo {
    /// For an abandoned load/store: ISV, SAS, SSE, SRT, SF and AR as
    /// ESR_ELx holds them (ISV clear if the instruction gives none). In an
    /// HVC/SMC hook: the whole ESR, immediate included.
    pub syndrome: u64,
    /// Virtual address of the abandoned access.
    pub va: u64,
    /// The abandoned access was an instruction fetch.
    pub fetch: bool,
}

/// One AArch64 Unicorn instance in system-emulation mode.
pub struct Engine {
    uc: NonNull<uc_engine>,
    kick_target: Arc<RwLock<Option<usize>>>,
    _not_send: PhantomData<*mut ()>,
}

impl Engine {
    /// Opens an engine with QEMU's `max` AArch64 CPU (LSE atomics and the
    /// other v8.x features a modern guest expects) and a translation
    /// buffer of `tcg_buffer` bytes.
    pub fn new(tcg_buffer: u32) -> Result<Self, UcError> {
        let mut uc: *mut uc_engine = std::ptr::null_mut();
        // SAFETY: uc_open writes a fresh engine pointer into `uc` on success.
        check(unsafe { ffi::uc_open(ffi::Arch::ARM64, ffi::Mode::ARM, &mut uc) })?;
        let uc = NonNull::new(uc).ok_or(UcError(uc_error::NOMEM))?;
        let engine = Self {
            uc,
            kick_target: Arc::new(RwLock::new(Some(uc.as_ptr() as usize))),
            _not_send: PhantomData,
        };
        // Both must come before anything that initialises the engine.
        // SAFETY: variadic controls with the argument types unicorn.h
        // documents for them (int model, uint32_t size).
        unsafe {
            check(ffi::uc_ctl(
                engine.raw(),
                ffi::ctl_write(ffi::ControlType::CPU_MODEL, 1),
                ffi::Arm64CpuModel::MAX as i32,
            ))?;
            check(ffi::uc_ctl(
                engine.raw(),
                ffi::ctl_write(ffi::ControlType::TCG_BUFFER_SIZE, 1),
                tcg_buffer,
            ))?;
            // No exit addresses at all: the guest may execute anywhere.
            check(ffi::uc_ctl(
                engine.raw(),
                ffi::ctl_write(ffi::ControlType::UC_USE_EXITS, 1),
                1i32,
            ))?;
        }
        Ok(engine)
    }

    fn raw(&self) -> *mut uc_engine {
        self.uc.as_ptr()
    }

    /// Switches on our patch's system emulation (guest exceptions, host
    /// system registers, WFx exits, whole MMIO accesses). Must precede MMIO
    /// mappings.
    ///
    /// # Safety
    /// `user_data` must stay valid for as long as the engine runs code, and
    /// the callbacks must tolerate being called with it on this thread.
    pub unsafe fn enable_sysemu(
        &self,
        filter: ffi::SysregFilter,
        handler: ffi::SysregHandler,
        user_data: *mut c_void,
    ) -> Result<(), UcError> {
        // SAFETY: forwarded contract; the engine pointer is valid.
        check(unsafe {
            ffi::uc_arm64_sysemu_enable(self.raw(), Some(filter), Some(handler), user_data)
        })
    }

    /// Maps host memory as guest RAM.
    ///
    /// # Safety
    /// `host` must point at `size` bytes that stay mapped and writable for
    /// the engine's lifetime.
    pub unsafe fn map_ram(&self, base: u64, size: u64, host: *mut u8) -> Result<(), UcError> {
        const ALL: u32 = 7; // UC_PROT_READ | UC_PROT_WRITE | UC_PROT_EXEC
                            // SAFETY: forwarded contract.
        check(unsafe { ffi::uc_mem_map_ptr(self.raw(), base, size, ALL, host.cast()) })
    }

    /// Removes the RAM or MMIO mapping `[base, base + size)`.
    pub fn unmap(&self, base: u64, size: u64) -> Result<(), UcError> {
        // SAFETY: the engine is valid; Unicorn checks the range itself.
        check(unsafe { ffi::uc_mem_unmap(self.raw(), base, size) })
    }

    /// Maps `[base, base + size)` as MMIO served by the callbacks.
    ///
    /// # Safety
    /// `user_data` must stay valid while the engine can run.
    pub unsafe fn map_mmio(
        &self,
        base: u64,
        size: u64,
        read: MmioRead,
        write: MmioWrite,
        user_data: *mut c_void,
    ) -> Result<(), UcError> {
        // SAFETY: forwarded contract; the function pointers have the
        // signatures unicorn.h gives uc_cb_mmio_read_t/uc_cb_mmio_write_t.
        check(unsafe {
            ffi::uc_mmio_map(
                self.raw(),
                base,
                size,
                Some(read),
                user_data,
                Some(write),
                user_data,
            )
        })
    }

    /// Registers the exception hook that receives HVC and SMC.
    ///
    /// # Safety
    /// `user_data` must stay valid while the engine can run.
    pub unsafe fn hook_exceptions(
        &self,
        hook: IntrHook,
        user_data: *mut c_void,
    ) -> Result<(), UcError> {
        let mut handle: ffi::uc_hook = 0;
        // SAFETY: UC_HOOK_INTR callbacks have the IntrHook signature; the
        // range 1..0 means "everywhere" in Unicorn's convention.
        check(unsafe {
            ffi::uc_hook_add(
                self.raw(),
                &mut handle,
                ffi::HookType::INTR.0 as i32,
                hook as *mut c_void,
                user_data,
                1,
                0,
            )
        })
    }

    pub fn read(&self, reg: RegisterARM64) -> u64 {
        let mut value = 0u64;
        // SAFETY: every register we read is at most 64 bits wide and
        // `value` has room for that.
        let err =
            unsafe { ffi::uc_reg_read(self.raw(), reg as i32, (&mut value as *mut u64).cast()) };
        debug_assert_eq!(err, uc_error::OK, "reading {reg:?}");
        value
    }

    pub fn write(&self, reg: RegisterARM64, value: u64) {
        // SAFETY: as for `read`; registers narrower than 64 bits take the
        // low bytes of the little-endian value.
        let err =
            unsafe { ffi::uc_reg_write(self.raw(), reg as i32, (&value as *const u64).cast()) };
        debug_assert_eq!(err, uc_error::OK, "writing {reg:?}");
    }

    /// V`n` (SIMD/FP register, 128 bits), `n` < 32.
    pub fn read_vector(&self, n: u8) -> u128 {
        let mut halves = [0u64; 2];
        let reg = RegisterARM64::Q0 as i32 + i32::from(n & 31);
        // SAFETY: Q registers are read as two doublewords (float64[2]),
        // which `halves` holds.
        let err = unsafe { ffi::uc_reg_read(self.raw(), reg, halves.as_mut_ptr().cast()) };
        debug_assert_eq!(err, uc_error::OK, "reading V{n}");
        u128::from(halves[0]) | (u128::from(halves[1]) << 64)
    }

    /// Writes V`n`, `n` < 32.
    pub fn write_vector(&self, n: u8, value: u128) {
        let halves = [value as u64, (value >> 64) as u64];
        let reg = RegisterARM64::Q0 as i32 + i32::from(n & 31);
        // SAFETY: as for `read_vector`.
        let err = unsafe { ffi::uc_reg_write(self.raw(), reg, halves.as_ptr().cast()) };
        debug_assert_eq!(err, uc_error::OK, "writing V{n}");
    }

    fn cp(reg: SysReg, val: u64) -> RegisterARM64CP {
        RegisterARM64CP {
            crn: reg.crn(),
            crm: reg.crm(),
            op0: reg.op0(),
            op1: reg.op1(),
            op2: reg.op2(),
            val,
        }
    }

    /// Reads a system register Unicorn implements; `None` if it does not.
    pub fn read_sysreg(&self, reg: SysReg) -> Option<u64> {
        let mut cp = Self::cp(reg, 0);
        // SAFETY: UC_ARM64_REG_CP_REG takes a uc_arm64_cp_reg.
        let err = unsafe {
            ffi::uc_reg_read(
                self.raw(),
                RegisterARM64::CP_REG as i32,
                (&mut cp as *mut RegisterARM64CP).cast(),
            )
        };
        (err == uc_error::OK).then_some(cp.val)
    }

    /// Writes a system register Unicorn implements; this also rebuilds the
    /// CPU's cached mode flags, which a PSTATE write alone does not.
    pub fn write_sysreg(&self, reg: SysReg, value: u64) -> Result<(), UcError> {
        let cp = Self::cp(reg, value);
        // SAFETY: UC_ARM64_REG_CP_REG takes a uc_arm64_cp_reg.
        check(unsafe {
            ffi::uc_reg_write(
                self.raw(),
                RegisterARM64::CP_REG as i32,
                (&cp as *const RegisterARM64CP).cast(),
            )
        })
    }

    /// Drives the CPU's IRQ and FIQ inputs.
    pub fn set_irq_lines(&self, irq: bool, fiq: bool) {
        // SAFETY: called on the engine's thread (Engine is !Send).
        let err = unsafe { ffi::uc_arm64_set_irq_lines(self.raw(), irq, fiq) };
        debug_assert_eq!(err, uc_error::OK);
    }

    /// Runs from the current PC until something makes Unicorn return.
    pub fn run(&self) -> Result<(), UcError> {
        let pc = self.read(RegisterARM64::PC);
        // SAFETY: the engine is valid; until/timeout/count of 0 mean none.
        check(unsafe { ffi::uc_emu_start(self.raw(), pc, 0, 0, 0) })
    }

    /// From inside a hook: return from `run` once the hook completes. Safe
    /// only where the current instruction has fully retired (exception
    /// hooks), unlike from MMIO callbacks.
    pub fn stop_from_exception_hook(&self) {
        // SAFETY: the engine is valid; we are on its thread.
        unsafe { ffi::uc_emu_stop(self.raw()) };
    }

    /// From an MMIO callback or the system-register handler: abandon the
    /// instruction (nothing of it happens; PC stays on it) and make `run`
    /// return with [`ffi::EXIT_TRAP`].
    pub fn trap(&self) {
        // SAFETY: the engine is valid; we are on its thread, in a callback.
        let err = unsafe { ffi::uc_arm64_trap(self.raw()) };
        debug_assert_eq!(err, uc_error::OK);
    }

    /// After [`ffi::EXIT_TRAP`] or inside an exception hook: the syndrome
    /// QEMU keeps for the instruction (see [`TrapInfo`]).
    pub fn trap_info(&self) -> TrapInfo {
        let mut info = TrapInfo::default();
        // SAFETY: three out-pointers to the locals of `info`.
        let err = unsafe {
            ffi::uc_arm64_trap_info(
                self.raw(),
                &mut info.syndrome,
                &mut info.va,
                &mut info.fetch,
            )
        };
        debug_assert_eq!(err, uc_error::OK);
        info
    }

    /// Why the last `run` returned (`ffi::EXIT_*`).
    pub fn last_exit(&self) -> i32 {
        // SAFETY: the engine is valid.
        unsafe { ffi::uc_arm64_last_exit(self.raw()) }
    }

    pub fn flush_tlb(&self) {
        // SAFETY: TLB_FLUSH takes no arguments.
        let err =
            unsafe { ffi::uc_ctl(self.raw(), ffi::ctl_write(ffi::ControlType::TLB_FLUSH, 0)) };
        debug_assert_eq!(err, uc_error::OK);
    }

    /// Drops every translated block (after guest code changed behind the
    /// engine's back, e.g. firmware reloaded at reset).
    pub fn flush_translations(&self) {
        // SAFETY: TB_FLUSH takes no arguments.
        let err = unsafe { ffi::uc_ctl(self.raw(), ffi::ctl_write(ffi::ControlType::TB_FLUSH, 0)) };
        debug_assert_eq!(err, uc_error::OK);
    }

    pub fn new_context(&self) -> Result<Context, UcError> {
        let mut ctx: *mut uc_context = std::ptr::null_mut();
        // SAFETY: uc_context_alloc writes a fresh context on success.
        check(unsafe { ffi::uc_context_alloc(self.raw(), &mut ctx) })?;
        Ok(Context(NonNull::new(ctx).ok_or(UcError(uc_error::NOMEM))?))
    }

    pub fn save(&self, ctx: &mut Context) {
        // SAFETY: both pointers are valid; contexts come from this engine.
        let err = unsafe { ffi::uc_context_save(self.raw(), ctx.0.as_ptr()) };
        debug_assert_eq!(err, uc_error::OK);
    }

    pub fn restore(&self, ctx: &Context) {
        // SAFETY: both pointers are valid; contexts come from this engine.
        let err = unsafe { ffi::uc_context_restore(self.raw(), ctx.0.as_ptr()) };
        debug_assert_eq!(err, uc_error::OK);
    }

    /// The CPU state a context holds that a snapshot carries: QEMU's
    /// `CPUARMState` up to its `end_reset_fields` marker (every register,
    /// system register, the exclusive monitor and the cached flags). What
    /// follows in the context (CPU features, which the engine sets itself,
    /// and host pointers) is never taken from outside.
    pub fn context_state<'a>(&self, ctx: &'a Context) -> &'a [u8] {
        let (data, len) = self.context_data(ctx);
        // SAFETY: `data` points at the context's `len` bytes of CPU state,
        // allocated by uc_context_alloc for this engine and alive with
        // `ctx`.
        unsafe { std::slice::from_raw_parts(data, len) }
    }

    /// Puts state from [`Engine::context_state`] into `ctx`; it must be
    /// exactly as long as this engine's.
    pub fn set_context_state(&self, ctx: &mut Context, state: &[u8]) -> Result<(), String> {
        let (data, len) = self.context_data(ctx);
        if state.len() != len {
            return Err(format!(
                "CPU state of {} bytes, this CPU emulator's is {len}",
                state.len()
            ));
        }
        // SAFETY: `data` points at `len` writable bytes of the context we
        // hold exclusively; they are plain register values (no pointer
        // lies before `end_reset_fields`).
        unsafe { std::ptr::copy_nonoverlapping(state.as_ptr(), data, len) };
        Ok(())
    }

    /// Where a context's CPU state starts, and how much of it a snapshot
    /// carries.
    fn context_data(&self, ctx: &Context) -> (*mut u8, usize) {
        // SAFETY: the engine is valid.
        let total = unsafe { ffi::uc_context_size(self.raw()) };
        // `struct uc_context` starts with the size of the CPU state that
        // follows its header (uc_priv.h), so header = total - that.
        // SAFETY: the context was allocated by uc_context_alloc, whose
        // first field is a size_t.
        let state_size = unsafe { ctx.0.as_ptr().cast::<usize>().read() };
        let header = total.saturating_sub(state_size);
        // SAFETY: the header lies within the context's allocation.
        let data = unsafe { ctx.0.as_ptr().cast::<u8>().add(header) };
        (data, state_size.saturating_sub(CPU_STATE_TAIL))
    }

    /// A handle other threads may use to kick this engine.
    pub fn kick_handle(&self) -> KickHandle {
        KickHandle(self.kick_target.clone())
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // Kicks arriving from now on must not touch a closed engine.
        *write_lock(&self.kick_target) = None;
        // SAFETY: the engine is valid and closed exactly once.
        unsafe { ffi::uc_close(self.raw()) };
    }
}

/// Bytes of `CPUARMState` (QEMU 5, 64-bit host) from `end_reset_fields` to
/// `cpu_watchpoint`, where Unicorn's context ends: `features` (8), the
/// PMSAv7 (3 pointers, 2 words), PMSAv8 (4 pointers, 4 words) and SAU
/// (2 pointers, 2 words) blocks, three pointers and 16 breakpoint
/// pointers.
const CPU_STATE_TAIL: usize = 8 + (24 + 8) + (32 + 16) + (16 + 8) + 24 + 128;

/// Saved CPU state (registers, system registers, exclusive monitor).
pub struct Context(NonNull<uc_context>);

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: allocated by uc_context_alloc and freed once.
        unsafe { ffi::uc_context_free(self.0.as_ptr()) };
    }
}

/// Thread-safe "return from `run` soon".
#[derive(Clone)]
pub struct KickHandle(Arc<RwLock<Option<usize>>>);

impl KickHandle {
    pub fn kick(&self) {
        let target = read_lock(&self.0);
        if let Some(uc) = *target {
            // SAFETY: the engine is alive while `target` is Some (Drop
            // clears it under the write lock before closing), and uc_kick
            // is safe from any thread by our patch's contract.
            unsafe { ffi::uc_kick(uc as *mut uc_engine) };
        }
    }
}
