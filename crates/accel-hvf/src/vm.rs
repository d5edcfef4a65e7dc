//! [`HvfVm`]: the VM, its RAM mappings and one host thread per vCPU.
//!
//! The framework allows one VM per process and lets only a vCPU's creating
//! thread touch it, so each [`accel::Vm::run`] spawns a thread per vCPU;
//! each creates its vCPU when [`VmControl`] first starts it, recreates it
//! on every later PSCI CPU_ON (a fresh vCPU is the architectural reset
//! state), and destroys it when the run ends.

use std::ffi::c_void;
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vm_core::sync::lock;

use accel::{
    AccelError, CpuId, CpuSnapshot, ExitHandler, Kick, StopReason, VcpuConfig, Vm, VmControl,
};
use vm_core::GuestRam;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::exits::{Reg, VcpuRegisters};
use crate::ffi::{self, HvReturn, HvVcpu, HvVcpuExit, MachTimebaseInfo};
use crate::layout::{self, RamRegion};
use crate::vcpu_loop::{HostCounter, HvVcpu as VcpuOps, PendingKicks, RunExit, VcpuThread};
use crate::vtimer::{self, GuestClock};

/// The framework holds one VM per process.
static VM_EXISTS: AtomicBool = AtomicBool::new(false);

fn check(ret: HvReturn, what: impl FnOnce() -> String) -> Result<(), AccelError> {
    if ret == ffi::HV_SUCCESS {
        Ok(())
    } else {
        Err(AccelError::run(format!(
            "{}: {}",
            what(),
            ffi::describe(ret)
        )))
    }
}

fn setup_error(e: AccelError) -> AccelError {
    e.into_setup()
}

/// Configuration of the Hypervisor.framework accelerator.
pub struct HvfConfig {
    pub cpus: Vec<VcpuConfig>,
}

/// A VM on Hypervisor.framework.
pub struct HvfVm {
    /// Kept so the mapped host memory outlives the stage-2 mappings.
    memory: GuestRam,
    mapped: Vec<(u64, usize)>,
    cpus: Vec<VcpuConfig>,
    /// The guest's counter offset, shared by every vCPU.
    clock: GuestClock,
    host: MachCounter,
    snapshots: Vec<Mutex<Option<CpuSnapshot>>>,
    /// Each vCPU's state between a save stop and the next run.
    saved: Vec<Mutex<Option<crate::saved::SavedVcpu>>>,
}

impl HvfVm {
    /// Creates the VM and maps every region of `memory` as guest RAM.
    pub fn new(memory: &GuestRam, config: HvfConfig) -> Result<Self, AccelError> {
        if config.cpus.is_empty() {
            return Err(AccelError::setup("a VM needs at least one vCPU"));
        }
        let regions: Vec<RamRegion> = memory
            .iter()
            .map(|r| RamRegion {
                guest: r.start_addr().0,
                len: r.len(),
                host: r.as_ptr() as usize,
            })
            .collect();
        // SAFETY: sysconf has no preconditions.
        let host_page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(0);
        let ram_top = layout::check_ram(&regions, host_page)?;

        let mut default_bits = 0u32;
        let mut max_bits = 0u32;
        // SAFETY: the call only writes the u32 it is given.
        let status = unsafe { ffi::hv_vm_config_get_default_ipa_size(&mut default_bits) };
        check(status, || "reading the default IPA size".into()).map_err(setup_error)?;
        // SAFETY: likewise.
        let status = unsafe { ffi::hv_vm_config_get_max_ipa_size(&mut max_bits) };
        check(status, || "reading the maximum IPA size".into()).map_err(setup_error)?;
        let ipa_bits = layout::choose_ipa_bits(ram_top, default_bits, max_bits)?;

        if VM_EXISTS.swap(true, Ordering::SeqCst) {
            return Err(AccelError::setup(
                "Hypervisor.framework allows one VM per process and one exists",
            ));
        }
        let created = Self::create_vm(ipa_bits);
        if let Err(e) = created {
            VM_EXISTS.store(false, Ordering::SeqCst);
            return Err(e);
        }

        let mut vm = Self {
            memory: memory.clone(),
            mapped: Vec::with_capacity(regions.len()),
            cpus: config.cpus,
            clock: GuestClock::new(0),
            host: MachCounter(MachTimebaseInfo::default()),
            snapshots: Vec::new(),
            saved: Vec::new(),
        };
        // From here on, dropping `vm` unmaps and destroys the VM.
        for r in &regions {
            let len = usize::try_from(r.len).map_err(|_| {
                AccelError::setup(format!("RAM region at {:#x} too large", r.guest))
            })?;
            // SAFETY: the region is a live mapping of `len` bytes owned by
            // `memory`, a clone of which `vm` keeps until after it unmaps.
            let status = unsafe {
                ffi::hv_vm_map(
                    r.host as *mut c_void,
                    r.guest,
                    len,
                    ffi::HV_MEMORY_READ | ffi::HV_MEMORY_WRITE | ffi::HV_MEMORY_EXEC,
                )
            };
            check(status, || {
                format!("mapping RAM at {:#x}+{:#x}", r.guest, r.len)
            })
            .map_err(setup_error)?;
            vm.mapped.push((r.guest, len));
        }
        // SAFETY: writes the two u32 of the struct given.
        let ret = unsafe { ffi::mach_timebase_info(&mut vm.host.0) };
        if ret != 0 || vm.host.0.denom == 0 {
            return Err(AccelError::setup(format!(
                "mach_timebase_info failed ({ret})"
            )));
        }
        // The guest's count starts at 0 now.
        vm.clock = GuestClock::new(vm.host.now());
        vm.snapshots = vm.cpus.iter().map(|_| Mutex::new(None)).collect();
        vm.saved = vm.cpus.iter().map(|_| Mutex::new(None)).collect();
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
            return Err(AccelError::setup("hv_vm_config_create failed"));
        }
        // SAFETY: `config` is the live object created above; released
        // exactly once after its last use.
        let status = unsafe { ffi::hv_vm_config_set_ipa_size(config, bits) };
        let result = check(status, || format!("setting a {bits}-bit IPA size")).and_then(|()| {
            // SAFETY: as above.
            let status = unsafe { ffi::hv_vm_create(config) };
            check(status, || {
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
    pending: PendingKicks,
}

impl HvfKick {
    fn new(cpus: usize) -> Self {
        Self {
            vcpus: Mutex::new(vec![None; cpus]),
            pending: PendingKicks::new(cpus),
        }
    }

    fn set(&self, cpu: CpuId, handle: Option<HvVcpu>) {
        let mut vcpus = lock(&self.vcpus);
        if let Some(slot) = vcpus.get_mut(cpu) {
            *slot = handle;
        }
    }
}

impl Kick for HvfKick {
    fn kick(&self, cpu: CpuId) {
        self.pending.set(cpu);
        let vcpus = lock(&self.vcpus);
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
        let status = unsafe { ffi::hv_vcpu_create(&mut handle, &mut exit, ptr::null_mut()) };
        check(status, || format!("creating vCPU {cpu}"))?;
        let vcpu = Self {
            handle,
            exit,
            cpu,
            kick,
        };
        if exit.is_null() {
            return Err(AccelError::run(format!("vCPU {cpu} has no exit record")));
        }
        kick.set(cpu, Some(handle));
        Ok(vcpu)
    }

    fn hv(&self, ret: HvReturn, what: &str) -> Result<(), AccelError> {
        check(ret, || format!("vCPU {}: {what}", self.cpu))
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

fn hv_reg(reg: Reg) -> Result<u32, AccelError> {
    match reg {
        Reg::X(n) if n < 31 => Ok(u32::from(n)),
        Reg::Pc => Ok(ffi::HV_REG_PC),
        Reg::Pstate => Ok(ffi::HV_REG_CPSR),
        other => Err(AccelError::run(format!("no general register {other:?}"))),
    }
}

impl VcpuRegisters for Vcpu<'_> {
    fn read(&mut self, reg: Reg) -> Result<u64, AccelError> {
        let mut value = 0;
        let ret = match reg {
            // SAFETY: owning thread; out-pointer to a local.
            Reg::Sys(r) => unsafe {
                ffi::hv_vcpu_get_sys_reg(self.handle, layout::hv_sys_reg(r), &mut value)
            },
            // SAFETY: as above.
            _ => unsafe { ffi::hv_vcpu_get_reg(self.handle, hv_reg(reg)?, &mut value) },
        };
        self.hv(ret, &format!("reading {reg:?}"))?;
        Ok(value)
    }

    fn write(&mut self, reg: Reg, value: u64) -> Result<(), AccelError> {
        let ret = match reg {
            // SAFETY: owning thread.
            Reg::Sys(r) => unsafe {
                ffi::hv_vcpu_set_sys_reg(self.handle, layout::hv_sys_reg(r), value)
            },
            // SAFETY: owning thread.
            _ => unsafe { ffi::hv_vcpu_set_reg(self.handle, hv_reg(reg)?, value) },
        };
        self.hv(ret, &format!("writing {reg:?}"))
    }

    fn read_simd(&mut self, n: u8) -> Result<u128, AccelError> {
        let mut value = ffi::simd_from_u128(0);
        // SAFETY: owning thread; out-pointer to a local of the declared type.
        let ret = unsafe {
            ffi::hv_vcpu_get_simd_fp_reg(
                self.handle,
                ffi::HV_SIMD_FP_REG_Q0 + u32::from(n & 31),
                &mut value,
            )
        };
        self.hv(ret, &format!("reading Q{n}"))?;
        Ok(ffi::simd_to_u128(value))
    }

    fn write_simd(&mut self, n: u8, value: u128) -> Result<(), AccelError> {
        // SAFETY: owning thread; the value is passed by copy.
        let ret = unsafe {
            ffi::hv_vcpu_set_simd_fp_reg(
                self.handle,
                ffi::HV_SIMD_FP_REG_Q0 + u32::from(n & 31),
                ffi::simd_from_u128(value),
            )
        };
        self.hv(ret, &format!("writing Q{n}"))
    }
}

impl VcpuOps for Vcpu<'_> {
    /// Debug exceptions and debug registers are left to the guest.
    fn init(&mut self) -> Result<(), AccelError> {
        // SAFETY: owning thread, plain values.
        let status = unsafe { ffi::hv_vcpu_set_trap_debug_exceptions(self.handle, false) };
        self.hv(status, "leaving debug exceptions to the guest")?;
        // SAFETY: likewise.
        let status = unsafe { ffi::hv_vcpu_set_trap_debug_reg_accesses(self.handle, false) };
        self.hv(status, "leaving debug registers to the guest")?;
        self.set_vtimer_mask(false)
    }

    fn set_vtimer_mask(&mut self, masked: bool) -> Result<(), AccelError> {
        // SAFETY: owning thread.
        let ret = unsafe { ffi::hv_vcpu_set_vtimer_mask(self.handle, masked) };
        self.hv(ret, "setting the vtimer mask")
    }

    /// The framework forgets pending interrupts when `hv_vcpu_run`
    /// returns, so the GIC's outputs are given again before every run.
    fn set_pending_interrupts(&mut self, irq: bool, fiq: bool) -> Result<(), AccelError> {
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

    fn run(&mut self) -> Result<RunExit, AccelError> {
        // SAFETY: owning thread.
        self.hv(unsafe { ffi::hv_vcpu_run(self.handle) }, "running")?;
        // SAFETY: the exit record belongs to this vCPU, lives as long as
        // it does, and is only written during hv_vcpu_run on this thread.
        let exit = unsafe { *self.exit };
        Ok(match exit.reason {
            ffi::HV_EXIT_REASON_CANCELED => RunExit::Canceled,
            ffi::HV_EXIT_REASON_EXCEPTION => RunExit::Exception {
                syndrome: exit.exception.syndrome,
                far: exit.exception.virtual_address,
                ipa: exit.exception.physical_address,
            },
            ffi::HV_EXIT_REASON_VTIMER_ACTIVATED => RunExit::VtimerActivated,
            other => RunExit::Unknown(other),
        })
    }

    fn read_fp(&mut self) -> Result<crate::saved::FpState, AccelError> {
        let mut fp = crate::saved::FpState::default();
        for (reg, out) in [
            (ffi::HV_REG_FPCR, &mut fp.fpcr),
            (ffi::HV_REG_FPSR, &mut fp.fpsr),
        ] {
            // SAFETY: owning thread; out-pointer to a local.
            let ret = unsafe { ffi::hv_vcpu_get_reg(self.handle, reg, out) };
            self.hv(ret, "reading FPCR/FPSR")?;
        }
        for n in 0..32 {
            let mut value = ffi::SimdFp([0; 16]);
            // SAFETY: owning thread; out-pointer to a local.
            let ret = unsafe { ffi::hv_vcpu_get_simd_fp_reg(self.handle, n, &mut value) };
            self.hv(ret, "reading a SIMD/FP register")?;
            fp.q.push(value.0);
        }
        Ok(fp)
    }

    fn write_fp(&mut self, fp: &crate::saved::FpState) -> Result<(), AccelError> {
        for (reg, value) in [(ffi::HV_REG_FPCR, fp.fpcr), (ffi::HV_REG_FPSR, fp.fpsr)] {
            // SAFETY: owning thread.
            let ret = unsafe { ffi::hv_vcpu_set_reg(self.handle, reg, value) };
            self.hv(ret, "writing FPCR/FPSR")?;
        }
        for (n, q) in (0u32..).zip(&fp.q) {
            // SAFETY: owning thread; the value is passed by copy.
            let ret = unsafe { ffi::hv_vcpu_set_simd_fp_reg(self.handle, n, ffi::SimdFp(*q)) };
            self.hv(ret, "writing a SIMD/FP register")?;
        }
        Ok(())
    }

    fn set_counter_offset(&mut self, offset: u64) -> Result<(), AccelError> {
        // SAFETY: owning thread.
        let ret = unsafe { ffi::hv_vcpu_set_vtimer_offset(self.handle, offset) };
        self.hv(ret, "setting the vtimer offset")
    }
}

/// `mach_absolute_time`, which on Apple silicon reads the counter the
/// guest's CNTVCT derives from.
struct MachCounter(MachTimebaseInfo);

impl HostCounter for MachCounter {
    fn now(&self) -> u64 {
        // SAFETY: no arguments, reads the host counter.
        unsafe { ffi::mach_absolute_time() }
    }

    fn ticks_to_duration(&self, ticks: u64) -> Duration {
        vtimer::ticks_to_duration(ticks, self.0.numer, self.0.denom)
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
            return Err(AccelError::setup(format!(
                "control block has {} vCPUs, the VM {cpus}",
                control.cpu_count()
            )));
        }
        for s in &self.snapshots {
            *lock(s) = None;
        }
        // After a save or a restore the guest's count runs on from here.
        self.clock.resume(self.host.now());
        let kick = Arc::new(HvfKick::new(cpus));
        control.set_kicker(kick.clone());
        let this = &*self;
        let mut first_error: Option<AccelError> = None;
        std::thread::scope(|scope| {
            let mut threads = Vec::with_capacity(cpus);
            for cpu in 0..cpus {
                let kick = &kick;
                let config = &this.cpus[cpu];
                let snapshot = &this.snapshots[cpu];
                let saved = &this.saved[cpu];
                let spawned = std::thread::Builder::new()
                    .name(format!("vcpu{cpu}"))
                    .spawn_scoped(scope, move || {
                        let worker = VcpuThread {
                            cpu,
                            mpidr: config.mpidr,
                            vtimer_irq: &*config.vtimer_irq,
                            handler,
                            memory: &this.memory,
                            control,
                            kicks: &kick.pending,
                            clock: &this.clock,
                            host: &this.host,
                            snapshot,
                            saved,
                        };
                        worker.main(|| Vcpu::create(cpu, kick))
                    });
                match spawned {
                    Ok(t) => threads.push(t),
                    Err(e) => {
                        first_error.get_or_insert(AccelError::setup_from(
                            format!("spawning the thread of vCPU {cpu}"),
                            e,
                        ));
                        control.request_stop(StopReason::HostStop);
                        break;
                    }
                }
            }
            for t in threads {
                let result = t.join().unwrap_or_else(|_| {
                    Err(AccelError::run("a vCPU thread panicked outside its guard"))
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
        lock(self.snapshots.get(cpu)?).clone()
    }

    fn cannot_save(&self) -> Option<String> {
        None
    }

    /// The vCPU threads left their state behind when they stopped for the
    /// save; the guest's count is frozen until the next run.
    fn save_cpus(&mut self) -> Result<Vec<u8>, AccelError> {
        let now = self.host.now();
        self.clock.pause(now);
        let saved = crate::saved::SavedCpus {
            guest_count: self.clock.count(now),
            cpus: self.saved.iter().map(|s| lock(s).clone()).collect(),
        };
        let mut bytes = Vec::new();
        ciborium::into_writer(&saved, &mut bytes)
            .map_err(|e| AccelError::run_from("encoding vCPU state", e))?;
        Ok(bytes)
    }

    fn restore_cpus(&mut self, bytes: &[u8]) -> Result<(), AccelError> {
        let saved: crate::saved::SavedCpus = ciborium::from_reader(bytes)
            .map_err(|e| AccelError::setup_from("decoding vCPU state", e))?;
        if saved.cpus.len() != self.saved.len() {
            return Err(AccelError::setup(format!(
                "the snapshot has {} vCPUs, the VM {}",
                saved.cpus.len(),
                self.saved.len()
            )));
        }
        let now = self.host.now();
        self.clock.pause(now);
        self.clock.set(saved.guest_count, now);
        for (slot, cpu) in self.saved.iter().zip(saved.cpus) {
            *lock(slot) = cpu;
        }
        Ok(())
    }
}
