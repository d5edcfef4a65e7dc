//! [`HvfVm`]: the VM, its RAM mappings and one host thread per vCPU.
//!
//! The framework allows one VM per process and lets only a vCPU's creating
//! thread touch it, so each [`accel::Vm::run`] spawns a thread per vCPU;
//! each creates its vCPU when [`VmControl`] first starts it, recreates it
//! on every later PSCI CPU_ON (a fresh vCPU is the architectural reset
//! state), and destroys it when the run ends.

use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use accel::{
    AccelError, CpuId, CpuPower, CpuSnapshot, ExitHandler, Kick, StopReason, VcpuConfig, Vm,
    VmControl,
};
use arch_arm64::sysreg::{CNTV_CTL_EL0, CNTV_CVAL_EL0, MPIDR_EL1};
use vm_core::GuestMemory;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::exits::{self, Completion, LocalState, Reg, Trap, VcpuRegisters, PSTATE_EL1H_MASKED};
use crate::ffi::{self, HvReturn, HvVcpu, HvVcpuExit, MachTimebaseInfo};
use crate::layout::{self, RamRegion};
use crate::vtimer::{self, VtimerLine, WfiWait};

/// The framework holds one VM per process.
static VM_EXISTS: AtomicBool = AtomicBool::new(false);

fn check(ret: HvReturn, what: impl FnOnce() -> String) -> Result<(), AccelError> {
    if ret == ffi::HV_SUCCESS {
        Ok(())
    } else {
        Err(AccelError::Run(format!(
            "{}: {}",
            what(),
            ffi::describe(ret)
        )))
    }
}

fn setup_error(e: AccelError) -> AccelError {
    match e {
        AccelError::Run(m) => AccelError::Setup(m),
        other => other,
    }
}

/// Configuration of the Hypervisor.framework accelerator.
pub struct HvfConfig {
    pub cpus: Vec<VcpuConfig>,
}

/// A VM on Hypervisor.framework.
pub struct HvfVm {
    /// Kept so the mapped host memory outlives the stage-2 mappings.
    _memory: GuestMemory,
    mapped: Vec<(u64, usize)>,
    cpus: Vec<VcpuConfig>,
    /// Host counter value at which every vCPU's CNTVCT reads 0.
    vtimer_offset: u64,
    timebase: MachTimebaseInfo,
    snapshots: Vec<Mutex<Option<CpuSnapshot>>>,
}

impl HvfVm {
    /// Creates the VM and maps every region of `memory` as guest RAM.
    pub fn new(memory: &GuestMemory, config: HvfConfig) -> Result<Self, AccelError> {
        if config.cpus.is_empty() {
            return Err(AccelError::Setup("a VM needs at least one vCPU".into()));
        }
        let regions: Vec<RamRegion> = memory
            .iter()
            .map(|r| RamRegion {
                guest: r.start_addr().0,
                len: r.len(),
                host: r.as_ptr() as usize,
            })
            .collect();
        let ram_top = layout::check_ram(&regions)?;

        let mut default_bits = 0u32;
        let mut max_bits = 0u32;
        // SAFETY: both calls only write the u32 they are given.
        check(
            unsafe { ffi::hv_vm_config_get_default_ipa_size(&mut default_bits) },
            || "reading the default IPA size".into(),
        )
        .map_err(setup_error)?;
        check(
            unsafe { ffi::hv_vm_config_get_max_ipa_size(&mut max_bits) },
            || "reading the maximum IPA size".into(),
        )
        .map_err(setup_error)?;
        let ipa_bits = layout::choose_ipa_bits(ram_top, default_bits, max_bits)?;

        if VM_EXISTS.swap(true, Ordering::SeqCst) {
            return Err(AccelError::Setup(
                "Hypervisor.framework allows one VM per process and one exists".into(),
            ));
        }
        let created = Self::create_vm(ipa_bits);
        if let Err(e) = created {
            VM_EXISTS.store(false, Ordering::SeqCst);
            return Err(e);
        }

        let mut vm = Self {
            _memory: memory.clone(),
            mapped: Vec::with_capacity(regions.len()),
            cpus: config.cpus,
            vtimer_offset: 0,
            timebase: MachTimebaseInfo::default(),
            snapshots: Vec::new(),
        };
        // From here on, dropping `vm` unmaps and destroys the VM.
        for r in &regions {
            let len = usize::try_from(r.len).map_err(|_| {
                AccelError::Setup(format!("RAM region at {:#x} too large", r.guest))
            })?;
            // SAFETY: the region is a live mapping of `len` bytes owned by
            // `memory`, a clone of which `vm` keeps until after it unmaps.
            check(
                unsafe {
                    ffi::hv_vm_map(
                        r.host as *mut c_void,
                        r.guest,
                        len,
                        ffi::HV_MEMORY_READ | ffi::HV_MEMORY_WRITE | ffi::HV_MEMORY_EXEC,
                    )
                },
                || format!("mapping RAM at {:#x}+{:#x}", r.guest, r.len),
            )
            .map_err(setup_error)?;
            vm.mapped.push((r.guest, len));
        }
        // SAFETY: writes the two u32 of the struct given.
        let ret = unsafe { ffi::mach_timebase_info(&mut vm.timebase) };
        if ret != 0 || vm.timebase.denom == 0 {
            return Err(AccelError::Setup(format!(
                "mach_timebase_info failed ({ret})"
            )));
        }
        // SAFETY: no arguments, reads the host counter.
        vm.vtimer_offset = unsafe { ffi::mach_absolute_time() };
        vm.snapshots = vm.cpus.iter().map(|_| Mutex::new(None)).collect();
        tracing::info!(
            cpus = vm.cpus.len(),
            ram_top = format_args!("{ram_top:#x}"),
            ipa_bits = ipa_bits.unwrap_or(default_bits),
            "Hypervisor.framework VM created"
        );
        Ok(vm)
    }

    fn create_vm(ipa_bits: Option<u32>) -> Result<(), AccelError> {
        let Some(bits) = ipa_bits else {
            // SAFETY: a null configuration asks for the defaults.
            return check(unsafe { ffi::hv_vm_create(ptr::null_mut()) }, || {
                "creating the VM (is the com.apple.security.hypervisor entitlement signed in?)"
                    .into()
            })
            .map_err(setup_error);
        };
        // SAFETY: returns a new os_object or null.
        let config = unsafe { ffi::hv_vm_config_create() };
        if config.is_null() {
            return Err(AccelError::Setup("hv_vm_config_create failed".into()));
        }
        // SAFETY: `config` is the live object created above; released
        // exactly once after its last use.
        let result = check(
            unsafe { ffi::hv_vm_config_set_ipa_size(config, bits) },
            || format!("setting a {bits}-bit IPA size"),
        )
        .and_then(|()| {
            check(unsafe { ffi::hv_vm_create(config) }, || {
                "creating the VM (is the com.apple.security.hypervisor entitlement signed in?)"
                    .into()
            })
        });
        // SAFETY: see above.
        unsafe { ffi::os_release(config) };
        result.map_err(setup_error)
    }
}

impl Drop for HvfVm {
    fn drop(&mut self) {
        for &(ipa, len) in &self.mapped {
            // SAFETY: unmaps a range this VM mapped; no vCPU runs (run()
            // joined its threads before returning).
            let ret = unsafe { ffi::hv_vm_unmap(ipa, len) };
            if ret != ffi::HV_SUCCESS {
                tracing::warn!("unmapping {ipa:#x}: {}", ffi::describe(ret));
            }
        }
        // SAFETY: every vCPU was destroyed by its thread before run()
        // returned; the VM was created by `new`.
        let ret = unsafe { ffi::hv_vm_destroy() };
        if ret != ffi::HV_SUCCESS {
            tracing::warn!("destroying the VM: {}", ffi::describe(ret));
        }
        VM_EXISTS.store(false, Ordering::SeqCst);
    }
}

/// Makes running vCPUs leave `hv_vcpu_run` (`hv_vcpus_exit`).
pub struct HvfKick {
    /// The framework handle of each vCPU that currently exists. The lock is
    /// held across `hv_vcpus_exit` so a handle is never used after its
    /// thread destroyed it.
    vcpus: Mutex<Vec<Option<HvVcpu>>>,
    /// Set by every kick, cleared by the vCPU just before it programs its
    /// interrupt lines: a kick that lands between then and `hv_vcpu_run`
    /// is seen without relying on how the framework treats an exit request
    /// for a vCPU that is not running.
    pending: Box<[AtomicBool]>,
}

impl HvfKick {
    fn new(cpus: usize) -> Self {
        Self {
            vcpus: Mutex::new(vec![None; cpus]),
            pending: (0..cpus).map(|_| AtomicBool::new(false)).collect(),
        }
    }

    fn clear_pending(&self, cpu: CpuId) {
        if let Some(p) = self.pending.get(cpu) {
            p.store(false, Ordering::SeqCst);
        }
    }

    fn is_pending(&self, cpu: CpuId) -> bool {
        self.pending
            .get(cpu)
            .is_some_and(|p| p.load(Ordering::SeqCst))
    }

    fn set(&self, cpu: CpuId, handle: Option<HvVcpu>) {
        let mut vcpus = self.vcpus.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = vcpus.get_mut(cpu) {
            *slot = handle;
        }
    }
}

impl Kick for HvfKick {
    fn kick(&self, cpu: CpuId) {
        if let Some(p) = self.pending.get(cpu) {
            p.store(true, Ordering::SeqCst);
        }
        let vcpus = self.vcpus.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(Some(handle)) = vcpus.get(cpu) {
            // SAFETY: `handle` names a live vCPU (removed under this lock
            // before destruction); hv_vcpus_exit may be called from any
            // thread.
            let ret = unsafe { ffi::hv_vcpus_exit(handle, 1) };
            if ret != ffi::HV_SUCCESS {
                tracing::warn!(cpu, "kicking the vCPU: {}", ffi::describe(ret));
            }
        }
    }
}

/// A vCPU, owned by the thread that created it (hence neither Send nor
/// Sync: it holds a raw pointer).
struct Vcpu<'a> {
    handle: HvVcpu,
    exit: *const HvVcpuExit,
    cpu: CpuId,
    kick: &'a HvfKick,
}

impl<'a> Vcpu<'a> {
    fn create(cpu: CpuId, kick: &'a HvfKick) -> Result<Self, AccelError> {
        let mut handle: HvVcpu = 0;
        let mut exit: *const HvVcpuExit = ptr::null();
        // SAFETY: out-pointers to locals; a null configuration asks for
        // the default vCPU.
        check(
            unsafe { ffi::hv_vcpu_create(&mut handle, &mut exit, ptr::null_mut()) },
            || format!("creating vCPU {cpu}"),
        )?;
        let vcpu = Self {
            handle,
            exit,
            cpu,
            kick,
        };
        if exit.is_null() {
            return Err(AccelError::Run(format!("vCPU {cpu} has no exit record")));
        }
        kick.set(cpu, Some(handle));
        Ok(vcpu)
    }

    fn hv(&self, ret: HvReturn, what: &str) -> Result<(), AccelError> {
        check(ret, || format!("vCPU {}: {what}", self.cpu))
    }

    fn sys(&self, reg: arch_arm64::SysReg) -> Result<u64, AccelError> {
        let mut value = 0;
        // SAFETY: owning thread; out-pointer to a local.
        let ret =
            unsafe { ffi::hv_vcpu_get_sys_reg(self.handle, layout::hv_sys_reg(reg), &mut value) };
        self.hv(ret, &format!("reading {reg}"))?;
        Ok(value)
    }

    fn set_sys(&self, reg: arch_arm64::SysReg, value: u64) -> Result<(), AccelError> {
        // SAFETY: owning thread.
        let ret = unsafe { ffi::hv_vcpu_set_sys_reg(self.handle, layout::hv_sys_reg(reg), value) };
        self.hv(ret, &format!("writing {reg}"))
    }

    /// PSCI's entry state: PC at `entry`, x0 = `context_id`, EL1h with
    /// DAIF masked, the machine's MPIDR, the VM-wide counter offset, and
    /// debug exceptions left to the guest.
    fn start(
        &self,
        entry: u64,
        context_id: u64,
        mpidr: u64,
        vtimer_offset: u64,
    ) -> Result<(), AccelError> {
        let mut regs = HvfRegs(self);
        regs.write(Reg::Pc, entry)?;
        regs.write(Reg::X(0), context_id)?;
        regs.write(Reg::Pstate, PSTATE_EL1H_MASKED)?;
        self.set_sys(MPIDR_EL1, mpidr)?;
        // SAFETY (all four): owning thread, plain values.
        self.hv(
            unsafe { ffi::hv_vcpu_set_vtimer_offset(self.handle, vtimer_offset) },
            "setting the vtimer offset",
        )?;
        self.hv(
            unsafe { ffi::hv_vcpu_set_vtimer_mask(self.handle, false) },
            "unmasking the vtimer",
        )?;
        self.hv(
            unsafe { ffi::hv_vcpu_set_trap_debug_exceptions(self.handle, false) },
            "leaving debug exceptions to the guest",
        )?;
        self.hv(
            unsafe { ffi::hv_vcpu_set_trap_debug_reg_accesses(self.handle, false) },
            "leaving debug registers to the guest",
        )
    }

    fn vtimer_offset(&self) -> Result<u64, AccelError> {
        let mut offset = 0;
        // SAFETY: owning thread; out-pointer to a local.
        let ret = unsafe { ffi::hv_vcpu_get_vtimer_offset(self.handle, &mut offset) };
        self.hv(ret, "reading the vtimer offset")?;
        Ok(offset)
    }

    fn set_vtimer_mask(&self, masked: bool) -> Result<(), AccelError> {
        // SAFETY: owning thread.
        let ret = unsafe { ffi::hv_vcpu_set_vtimer_mask(self.handle, masked) };
        self.hv(ret, "setting the vtimer mask")
    }

    /// The framework forgets pending interrupts when `hv_vcpu_run`
    /// returns, so the GIC's outputs are given again before every run.
    fn set_lines(&self, irq: bool, fiq: bool) -> Result<(), AccelError> {
        // SAFETY: owning thread.
        let ret = unsafe {
            ffi::hv_vcpu_set_pending_interrupt(self.handle, ffi::HV_INTERRUPT_TYPE_IRQ, irq)
        };
        self.hv(ret, "setting IRQ")?;
        // SAFETY: owning thread.
        let ret = unsafe {
            ffi::hv_vcpu_set_pending_interrupt(self.handle, ffi::HV_INTERRUPT_TYPE_FIQ, fiq)
        };
        self.hv(ret, "setting FIQ")
    }

    fn run(&self) -> Result<HvVcpuExit, AccelError> {
        // SAFETY: owning thread.
        self.hv(unsafe { ffi::hv_vcpu_run(self.handle) }, "running")?;
        // SAFETY: the exit record belongs to this vCPU, lives as long as
        // it does, and is only written during hv_vcpu_run on this thread.
        Ok(unsafe { *self.exit })
    }
}

impl Drop for Vcpu<'_> {
    fn drop(&mut self) {
        self.kick.set(self.cpu, None);
        // SAFETY: owning thread; the handle is no longer reachable by kicks.
        let ret = unsafe { ffi::hv_vcpu_destroy(self.handle) };
        if ret != ffi::HV_SUCCESS {
            tracing::warn!(
                cpu = self.cpu,
                "destroying the vCPU: {}",
                ffi::describe(ret)
            );
        }
    }
}

/// The register file of a vCPU, for the platform-neutral exit logic.
struct HvfRegs<'v, 'a>(&'v Vcpu<'a>);

impl VcpuRegisters for HvfRegs<'_, '_> {
    fn read(&mut self, reg: Reg) -> Result<u64, AccelError> {
        let v = self.0;
        let hv_reg = match reg {
            Reg::X(n) if n < 31 => u32::from(n),
            Reg::X(n) => return Err(AccelError::Run(format!("no register x{n}"))),
            Reg::Pc => ffi::HV_REG_PC,
            Reg::Pstate => ffi::HV_REG_CPSR,
            Reg::Sys(r) => return v.sys(r),
        };
        let mut value = 0;
        // SAFETY: owning thread; out-pointer to a local.
        let ret = unsafe { ffi::hv_vcpu_get_reg(v.handle, hv_reg, &mut value) };
        v.hv(ret, &format!("reading {reg:?}"))?;
        Ok(value)
    }

    fn write(&mut self, reg: Reg, value: u64) -> Result<(), AccelError> {
        let v = self.0;
        let hv_reg = match reg {
            Reg::X(n) if n < 31 => u32::from(n),
            Reg::X(n) => return Err(AccelError::Run(format!("no register x{n}"))),
            Reg::Pc => ffi::HV_REG_PC,
            Reg::Pstate => ffi::HV_REG_CPSR,
            Reg::Sys(r) => return v.set_sys(r, value),
        };
        // SAFETY: owning thread.
        let ret = unsafe { ffi::hv_vcpu_set_reg(v.handle, hv_reg, value) };
        v.hv(ret, &format!("writing {reg:?}"))
    }
}

/// What one vCPU thread works with.
struct VcpuThread<'a> {
    cpu: CpuId,
    config: &'a VcpuConfig,
    handler: &'a dyn ExitHandler,
    control: &'a VmControl,
    kick: &'a HvfKick,
    vtimer_offset: u64,
    timebase: MachTimebaseInfo,
    snapshot: &'a Mutex<Option<CpuSnapshot>>,
}

impl VcpuThread<'_> {
    fn main(&self) -> Result<(), AccelError> {
        let result = match catch_unwind(AssertUnwindSafe(|| self.run_loop())) {
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

    fn save_snapshot(&self, vcpu: &Vcpu<'_>) {
        match exits::capture(&mut HvfRegs(vcpu)) {
            Ok(snap) => {
                *self.snapshot.lock().unwrap_or_else(|e| e.into_inner()) = Some(snap);
            }
            Err(e) => tracing::warn!(cpu = self.cpu, "no register snapshot: {e}"),
        }
    }

    fn set_vtimer_level(&self, level: Option<bool>) {
        if let Some(level) = level {
            self.config.vtimer_irq.set_level(level);
        }
    }

    fn run_loop(&self) -> Result<(), AccelError> {
        let cpu = self.cpu;
        let control = self.control;
        let mut vcpu: Option<Vcpu<'_>> = None;
        let mut local = LocalState::default();
        let mut vtimer = VtimerLine::default();
        loop {
            if control.stop_requested() {
                break;
            }
            if let Some((entry, context_id)) = control.take_start(cpu) {
                // A new vCPU is the reset state; the old one goes first
                // (its handle leaves the kick table in Drop).
                drop(vcpu.take());
                let fresh = Vcpu::create(cpu, self.kick)?;
                fresh.start(entry, context_id, self.config.mpidr, self.vtimer_offset)?;
                local = LocalState::default();
                self.set_vtimer_level(vtimer.reset());
                tracing::debug!(
                    cpu,
                    entry = format_args!("{entry:#x}"),
                    context_id,
                    "vCPU started"
                );
                vcpu = Some(fresh);
                continue;
            }
            let on = control.power(cpu) == CpuPower::On;
            let Some(v) = vcpu.as_ref().filter(|_| on) else {
                if on {
                    return Err(AccelError::Run(format!(
                        "vCPU {cpu} is marked on but was never started"
                    )));
                }
                control.wait(None, || control.power(cpu) != CpuPower::Off);
                continue;
            };

            if vtimer.masked() {
                let sync = vtimer.sync(v.sys(CNTV_CTL_EL0)?);
                self.set_vtimer_level(sync.set_level);
                if sync.unmask {
                    v.set_vtimer_mask(false)?;
                }
            }
            self.kick.clear_pending(cpu);
            let (irq, fiq) = control.interrupt_lines(cpu);
            v.set_lines(irq, fiq)?;
            if self.kick.is_pending(cpu) {
                // Lines, power or the stop flag moved meanwhile: re-read.
                continue;
            }
            let exit = v.run()?;
            match exit.reason {
                // A kick: the top of the loop re-reads stop, power and lines.
                ffi::HV_EXIT_REASON_CANCELED => {}
                ffi::HV_EXIT_REASON_VTIMER_ACTIVATED => self.set_vtimer_level(vtimer.activated()),
                ffi::HV_EXIT_REASON_EXCEPTION => {
                    let e = exit.exception;
                    let mut regs = HvfRegs(v);
                    let trap = exits::translate(
                        e.syndrome,
                        e.virtual_address,
                        e.physical_address,
                        &mut regs,
                        &mut local,
                    )?;
                    match trap {
                        Trap::Exit { exit, pending } => {
                            let response = self.handler.handle(cpu, exit);
                            match exits::complete(pending, response, &mut regs)? {
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
                other => {
                    return Err(AccelError::Run(format!(
                        "vCPU {cpu}: unexpected exit reason {other}"
                    )))
                }
            }
        }
        if let Some(v) = &vcpu {
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
    fn wait_for_interrupt(&self, v: &Vcpu<'_>, vtimer: &VtimerLine) -> Result<(), AccelError> {
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
            let ctl = v.sys(CNTV_CTL_EL0)?;
            let cval = v.sys(CNTV_CVAL_EL0)?;
            // SAFETY: no arguments, reads the host counter.
            let host_now = unsafe { ffi::mach_absolute_time() };
            let now = host_now.wrapping_sub(v.vtimer_offset()?);
            vtimer::wfi_wait(ctl, cval, now)
        };
        let deadline = match wait {
            WfiWait::NotAtAll => return Ok(()),
            WfiWait::Indefinitely => None,
            WfiWait::Ticks(t) => Instant::now().checked_add(vtimer::ticks_to_duration(
                t,
                self.timebase.numer,
                self.timebase.denom,
            )),
        };
        control.wait(deadline, pending);
        Ok(())
    }
}

impl Vm for HvfVm {
    fn name(&self) -> &'static str {
        "hvf"
    }

    fn run(
        &mut self,
        handler: &dyn ExitHandler,
        control: &VmControl,
    ) -> Result<StopReason, AccelError> {
        let cpus = self.cpus.len();
        if control.cpu_count() != cpus {
            return Err(AccelError::Setup(format!(
                "control block has {} vCPUs, the VM {cpus}",
                control.cpu_count()
            )));
        }
        for s in &self.snapshots {
            *s.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
        let kick = Arc::new(HvfKick::new(cpus));
        control.set_kicker(kick.clone());
        let this = &*self;
        let mut first_error: Option<AccelError> = None;
        std::thread::scope(|scope| {
            let mut threads = Vec::with_capacity(cpus);
            for cpu in 0..cpus {
                let worker = VcpuThread {
                    cpu,
                    config: &this.cpus[cpu],
                    handler,
                    control,
                    kick: &kick,
                    vtimer_offset: this.vtimer_offset,
                    timebase: this.timebase,
                    snapshot: &this.snapshots[cpu],
                };
                let spawned = std::thread::Builder::new()
                    .name(format!("vcpu{cpu}"))
                    .spawn_scoped(scope, move || worker.main());
                match spawned {
                    Ok(t) => threads.push(t),
                    Err(e) => {
                        first_error.get_or_insert(AccelError::Setup(format!(
                            "spawning the thread of vCPU {cpu}: {e}"
                        )));
                        control.request_stop(StopReason::HostStop);
                        break;
                    }
                }
            }
            for t in threads {
                let result = t.join().unwrap_or_else(|_| {
                    Err(AccelError::Run(
                        "a vCPU thread panicked outside its guard".into(),
                    ))
                });
                if let Err(e) = result {
                    first_error.get_or_insert(e);
                }
            }
        });
        match first_error {
            Some(e) => Err(e),
            None => Ok(control.stop_reason().unwrap_or(StopReason::HostStop)),
        }
    }

    fn snapshot(&self, cpu: CpuId) -> Option<CpuSnapshot> {
        self.snapshots
            .get(cpu)?
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}
