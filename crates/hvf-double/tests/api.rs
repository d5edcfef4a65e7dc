//! The double through its C API, as a VMM calls it: what it refuses (the
//! framework's rules on threads, VMs and mappings) and what a guest's
//! instructions turn into (exits, syndromes, PC, the vtimer protocol).
//!
//! The framework allows one VM per process, so the tests take turns.

use std::ffi::c_void;
use std::ptr;
use std::sync::{Mutex, MutexGuard, PoisonError};

use hvf_double::*;

static ONE_VM: Mutex<()> = Mutex::new(());

/// Where the tests' RAM sits in the guest, and its size.
const RAM_IPA: u64 = 0x4000_0000;
const RAM_SIZE: usize = 64 << 10;
/// An address with nothing mapped: MMIO as far as the VMM is concerned.
const MMIO: u64 = 0x0900_0010;

const HV_SYS_REG_MPIDR_EL1: u16 = 0xc005;
const HV_SYS_REG_SCTLR_EL1: u16 = 0xc080;
const HV_SYS_REG_CNTV_CTL_EL0: u16 = 0xdf19;
const HV_SYS_REG_CNTV_CVAL_EL0: u16 = 0xdf1a;
const CPSR_EL1H_MASKED: u64 = 0x3c5;

// A64 encodings used by the guest programs.
const LDR_W1_X0: u32 = 0xb940_0001;
const STR_W1_X0: u32 = 0xb900_0001;
const LDRSB_X3_X0: u32 = 0x3980_0003;
const LDP_X1_X2_X0: u32 = 0xa940_0801;
const HVC_0X1234: u32 = 0xd400_0002 | (0x1234 << 5);
const SMC_0X55: u32 = 0xd400_0003 | (0x55 << 5);
const WFI: u32 = 0xd503_207f;
const MRS_X5_ICC_IAR1: u32 = 0xd538_cc05;
const B_SELF: u32 = 0x1400_0000;

/// A VM with RAM mapped at [`RAM_IPA`], destroyed (with its memory) on
/// drop; holds the one-VM turn.
struct Vm {
    ram: *mut u8,
    _turn: MutexGuard<'static, ()>,
}

impl Vm {
    fn new() -> Self {
        let turn = ONE_VM.lock().unwrap_or_else(PoisonError::into_inner);
        // SAFETY: a fresh anonymous mapping, unmapped in Drop.
        let ram = unsafe {
            libc::mmap(
                ptr::null_mut(),
                RAM_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(ram, libc::MAP_FAILED);
        // SAFETY: null config = defaults.
        assert_eq!(unsafe { hv_vm_create(ptr::null_mut()) }, HV_SUCCESS);
        let all = HV_MEMORY_READ | HV_MEMORY_WRITE | HV_MEMORY_EXEC;
        // SAFETY: the mapping lives until Drop, after hv_vm_destroy.
        let ret = unsafe { hv_vm_map(ram, RAM_IPA, RAM_SIZE, all) };
        assert_eq!(ret, HV_SUCCESS);
        Self {
            ram: ram.cast(),
            _turn: turn,
        }
    }

    fn program(&self, code: &[u32]) {
        for (i, insn) in code.iter().enumerate() {
            // SAFETY: within the RAM_SIZE mapping.
            unsafe { self.ram.cast::<u32>().add(i).write(*insn) };
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        assert_eq!(hv_vm_unmap(RAM_IPA, RAM_SIZE), HV_SUCCESS);
        assert_eq!(hv_vm_destroy(), HV_SUCCESS);
        // SAFETY: our own mapping, no longer in the VM.
        unsafe { libc::munmap(self.ram.cast(), RAM_SIZE) };
    }
}

/// A vCPU of the calling thread, destroyed on drop.
struct Vcpu {
    id: u64,
    exit: *const HvVcpuExit,
}

impl Vcpu {
    fn new() -> Self {
        let mut id = 0;
        let mut exit = ptr::null();
        // SAFETY: out-pointers to locals.
        let ret = unsafe { hv_vcpu_create(&mut id, &mut exit, ptr::null_mut()) };
        assert_eq!(ret, HV_SUCCESS);
        assert!(!exit.is_null());
        Self { id, exit }
    }

    /// Ready to run the program at the start of RAM at EL1h.
    fn at_ram(self) -> Self {
        self.set(HV_REG_PC, RAM_IPA);
        self.set(HV_REG_CPSR, CPSR_EL1H_MASKED);
        self
    }

    fn set(&self, reg: u32, value: u64) {
        assert_eq!(hv_vcpu_set_reg(self.id, reg, value), HV_SUCCESS);
    }

    fn get(&self, reg: u32) -> u64 {
        let mut v = 0;
        // SAFETY: out-pointer to a local.
        assert_eq!(unsafe { hv_vcpu_get_reg(self.id, reg, &mut v) }, HV_SUCCESS);
        v
    }

    fn sys(&self, reg: u16) -> u64 {
        let mut v = 0;
        // SAFETY: out-pointer to a local.
        let ret = unsafe { hv_vcpu_get_sys_reg(self.id, reg, &mut v) };
        assert_eq!(ret, HV_SUCCESS);
        v
    }

    fn run(&self) -> HvVcpuExit {
        assert_eq!(hv_vcpu_run(self.id), HV_SUCCESS);
        // SAFETY: the record lives as long as the vCPU.
        unsafe { *self.exit }
    }
}

impl Drop for Vcpu {
    fn drop(&mut self) {
        assert_eq!(hv_vcpu_destroy(self.id), HV_SUCCESS);
    }
}

fn ec(exit: &HvVcpuExit) -> u64 {
    assert_eq!(exit.reason, HV_EXIT_REASON_EXCEPTION, "{exit:?}");
    exit.exception.syndrome >> 26
}

#[test]
fn one_vm_per_process_and_destroy_waits_for_the_vcpus() {
    let _vm = Vm::new();
    // SAFETY: null config.
    assert_eq!(unsafe { hv_vm_create(ptr::null_mut()) }, HV_BUSY);
    let vcpu = Vcpu::new();
    assert_eq!(hv_vm_destroy(), HV_BUSY, "a vCPU still exists");
    drop(vcpu);
}

#[test]
fn vcpu_calls_from_another_thread_are_refused() {
    let _vm = Vm::new();
    let vcpu = Vcpu::new();
    let id = vcpu.id;
    std::thread::scope(|s| {
        s.spawn(move || {
            let mut v = 0;
            assert_eq!(hv_vcpu_run(id), HV_BAD_ARGUMENT);
            assert_eq!(hv_vcpu_set_reg(id, 0, 1), HV_BAD_ARGUMENT);
            // SAFETY: out-pointer to a local.
            assert_eq!(unsafe { hv_vcpu_get_reg(id, 0, &mut v) }, HV_BAD_ARGUMENT);
            assert_eq!(
                hv_vcpu_set_sys_reg(id, HV_SYS_REG_MPIDR_EL1, 1),
                HV_BAD_ARGUMENT
            );
            assert_eq!(
                hv_vcpu_set_pending_interrupt(id, HV_INTERRUPT_TYPE_IRQ, true),
                HV_BAD_ARGUMENT
            );
            assert_eq!(hv_vcpu_destroy(id), HV_BAD_ARGUMENT);
            // The one call any thread may make.
            // SAFETY: one id.
            assert_eq!(unsafe { hv_vcpus_exit(&id, 1) }, HV_SUCCESS);
        })
        .join()
        .unwrap();
    });
    // The kick from the other thread makes the next run return at once.
    let exit = vcpu.run();
    assert_eq!(exit.reason, HV_EXIT_REASON_CANCELED);
}

#[test]
fn a_thread_holds_one_vcpu() {
    let _vm = Vm::new();
    let _vcpu = Vcpu::new();
    let mut id = 0;
    let mut exit = ptr::null();
    // SAFETY: out-pointers to locals.
    let ret = unsafe { hv_vcpu_create(&mut id, &mut exit, ptr::null_mut()) };
    assert_eq!(ret, HV_BUSY);
}

#[test]
fn mappings_are_16k_granular_and_never_overlap() {
    let vm = Vm::new();
    let all = HV_MEMORY_READ | HV_MEMORY_WRITE | HV_MEMORY_EXEC;
    let host: *mut c_void = vm.ram.cast();
    let map = |host: *mut c_void, ipa: u64, size: usize, flags: u64| {
        // SAFETY: `host` points into the test's live mapping.
        unsafe { hv_vm_map(host, ipa, size, flags) }
    };
    // 4 KiB-aligned guest address or size: refused.
    assert_eq!(map(host, 0x8000_1000, 0x4000, all), HV_BAD_ARGUMENT);
    assert_eq!(map(host, 0x8000_0000, 0x1000, all), HV_BAD_ARGUMENT);
    assert_eq!(map(host, 0x8000_0000, 0, all), HV_BAD_ARGUMENT);
    // A host address off its page.
    // SAFETY: still inside the mapping.
    let off = unsafe { vm.ram.add(8) }.cast();
    assert_eq!(map(off, 0x8000_0000, 0x4000, all), HV_BAD_ARGUMENT);
    // Overlapping the RAM mapping, partly or wholly.
    assert_eq!(map(host, RAM_IPA + 0x4000, 0x4000, all), HV_BAD_ARGUMENT);
    assert_eq!(map(host, RAM_IPA - 0x4000, 0x8000, all), HV_BAD_ARGUMENT);
    // Beyond the 36-bit default IPA space.
    assert_eq!(map(host, 1 << 36, 0x4000, all), HV_BAD_ARGUMENT);
    // Unknown flag bits; permissions the double does not model.
    assert_eq!(map(host, 0x8000_0000, 0x4000, 8), HV_BAD_ARGUMENT);
    assert_eq!(
        map(host, 0x8000_0000, 0x4000, HV_MEMORY_READ),
        HV_UNSUPPORTED
    );
    // Unmapping what was never mapped, or off the granule.
    assert_eq!(hv_vm_unmap(0x8000_0000, 0x4000), HV_BAD_ARGUMENT);
    assert_eq!(hv_vm_unmap(RAM_IPA + 0x1000, 0x4000), HV_BAD_ARGUMENT);
    // A second, aliasing mapping elsewhere is fine, and so is taking
    // part of it away again.
    assert_eq!(map(host, 0x8000_0000, 0x8000, all), HV_SUCCESS);
    assert_eq!(hv_vm_unmap(0x8000_4000, 0x4000), HV_SUCCESS);
    assert_eq!(hv_vm_unmap(0x8000_4000, 0x4000), HV_BAD_ARGUMENT);
    assert_eq!(hv_vm_unmap(0x8000_0000, 0x4000), HV_SUCCESS);
}

#[test]
fn a_destroyed_vcpu_cannot_run_and_unknown_registers_are_refused() {
    let _vm = Vm::new();
    let vcpu = Vcpu::new();
    let id = vcpu.id;
    assert_eq!(hv_vcpu_set_reg(id, 35, 0), HV_BAD_ARGUMENT);
    assert_eq!(hv_vcpu_set_sys_reg(id, 0xffff, 0), HV_BAD_ARGUMENT);
    // CNTVCT_EL0 has no hv_sys_reg_t.
    assert_eq!(hv_vcpu_set_sys_reg(id, 0xdf02, 0), HV_BAD_ARGUMENT);
    drop(vcpu);
    assert_eq!(hv_vcpu_run(id), HV_BAD_ARGUMENT);
    // SAFETY: one id.
    assert_eq!(unsafe { hv_vcpus_exit(&id, 1) }, HV_BAD_ARGUMENT);
}

#[test]
fn a_fresh_vcpu_is_all_zero() {
    let _vm = Vm::new();
    let vcpu = Vcpu::new();
    assert_eq!(vcpu.get(HV_REG_CPSR), 0, "EL0t");
    assert_eq!(vcpu.sys(HV_SYS_REG_MPIDR_EL1), 0);
    assert_eq!(vcpu.sys(HV_SYS_REG_SCTLR_EL1), 0);
    let mut pending = true;
    // SAFETY: out-pointer to a local.
    let ret =
        unsafe { hv_vcpu_get_pending_interrupt(vcpu.id, HV_INTERRUPT_TYPE_IRQ, &mut pending) };
    assert_eq!(ret, HV_SUCCESS);
    assert!(!pending);
}

#[test]
fn unmapped_accesses_exit_with_their_syndrome_and_pc_on_the_instruction() {
    let vm = Vm::new();
    vm.program(&[LDR_W1_X0, STR_W1_X0, LDRSB_X3_X0, LDP_X1_X2_X0, B_SELF]);
    let vcpu = Vcpu::new().at_ram();
    vcpu.set(0, MMIO);
    vcpu.set(1, 0xdead_beef_0000_0000);

    // ldr w1, [x0]: ISV, SAS = word, SRT = 1, SF = 0, a read.
    let exit = vcpu.run();
    assert_eq!(ec(&exit), 0x24);
    let esr = exit.exception.syndrome;
    assert_eq!(esr & (1 << 24), 1 << 24, "ISV: {esr:#x}");
    assert_eq!((esr >> 22) & 3, 2, "SAS");
    assert_eq!((esr >> 16) & 31, 1, "SRT");
    assert_eq!(esr & (1 << 15), 0, "SF");
    assert_eq!(esr & (1 << 6), 0, "WnR");
    assert_eq!(exit.exception.physical_address, MMIO, "exact byte IPA");
    assert_eq!(vcpu.get(HV_REG_PC), RAM_IPA, "PC stays on the load");
    assert_eq!(vcpu.get(1), 0xdead_beef_0000_0000, "nothing loaded");

    // The VMM completes it: the value into x1, PC past it.
    vcpu.set(1, 0x42);
    vcpu.set(HV_REG_PC, RAM_IPA + 4);
    // str w1, [x0]: a write of x1.
    let exit = vcpu.run();
    let esr = exit.exception.syndrome;
    assert_eq!(ec(&exit), 0x24);
    assert_eq!(esr & (1 << 6), 1 << 6, "WnR");
    assert_eq!((esr >> 16) & 31, 1);
    assert_eq!(vcpu.get(HV_REG_PC), RAM_IPA + 4);

    // ldrsb x3, [x0]: sign-extending byte load into a 64-bit register.
    vcpu.set(HV_REG_PC, RAM_IPA + 8);
    let esr = vcpu.run().exception.syndrome;
    assert_eq!((esr >> 22) & 3, 0, "SAS = byte");
    assert_eq!(esr & (1 << 21), 1 << 21, "SSE");
    assert_eq!(esr & (1 << 15), 1 << 15, "SF");
    assert_eq!((esr >> 16) & 31, 3);

    // ldp gives no instruction syndrome.
    vcpu.set(HV_REG_PC, RAM_IPA + 12);
    let exit = vcpu.run();
    assert_eq!(ec(&exit), 0x24);
    assert_eq!(exit.exception.syndrome & (1 << 24), 0, "no ISV for ldp");
    assert_eq!(vcpu.get(HV_REG_PC), RAM_IPA + 12);
}

#[test]
fn hvc_returns_past_itself_and_smc_on_itself() {
    let vm = Vm::new();
    vm.program(&[HVC_0X1234, SMC_0X55, B_SELF]);
    let vcpu = Vcpu::new().at_ram();
    let exit = vcpu.run();
    assert_eq!(ec(&exit), 0x16);
    assert_eq!(exit.exception.syndrome & 0xffff, 0x1234, "immediate");
    assert_eq!(vcpu.get(HV_REG_PC), RAM_IPA + 4, "HVC: PC already past");
    let exit = vcpu.run();
    assert_eq!(ec(&exit), 0x17);
    assert_eq!(exit.exception.syndrome & 0xffff, 0x55);
    assert_eq!(vcpu.get(HV_REG_PC), RAM_IPA + 4, "SMC: PC on it");
}

#[test]
fn wfi_and_trapped_gic_registers_exit_on_the_instruction() {
    let vm = Vm::new();
    vm.program(&[WFI, MRS_X5_ICC_IAR1, B_SELF]);
    let vcpu = Vcpu::new().at_ram();
    let exit = vcpu.run();
    assert_eq!(ec(&exit), 0x01);
    assert_eq!(exit.exception.syndrome & 1, 0, "TI = WFI");
    assert_eq!(vcpu.get(HV_REG_PC), RAM_IPA);
    vcpu.set(HV_REG_PC, RAM_IPA + 4);
    let exit = vcpu.run();
    assert_eq!(ec(&exit), 0x18);
    let iss = exit.exception.syndrome & 0x01ff_ffff;
    assert_eq!(iss & 1, 1, "a read");
    assert_eq!((iss >> 5) & 31, 5, "Rt");
    assert_eq!(((iss >> 10) & 15, (iss >> 1) & 15), (12, 12), "CRn, CRm");
    assert_eq!(vcpu.get(HV_REG_PC), RAM_IPA + 4);
}

#[test]
fn the_vtimer_exits_once_and_stays_masked_until_unmasked() {
    let vm = Vm::new();
    vm.program(&[B_SELF]);
    let vcpu = Vcpu::new().at_ram();
    assert_eq!(hv_vcpu_set_vtimer_offset(vcpu.id, 0), HV_SUCCESS);
    // Fire at once: CVAL = 0, enabled, not IMASKed.
    assert_eq!(
        hv_vcpu_set_sys_reg(vcpu.id, HV_SYS_REG_CNTV_CVAL_EL0, 0),
        HV_SUCCESS
    );
    assert_eq!(
        hv_vcpu_set_sys_reg(vcpu.id, HV_SYS_REG_CNTV_CTL_EL0, 1),
        HV_SUCCESS
    );
    let exit = vcpu.run();
    assert_eq!(exit.reason, HV_EXIT_REASON_VTIMER_ACTIVATED);
    let mut masked = false;
    // SAFETY: out-pointer to a local.
    let ret = unsafe { hv_vcpu_get_vtimer_mask(vcpu.id, &mut masked) };
    assert_eq!(ret, HV_SUCCESS);
    assert!(masked, "the exit masks the timer");
    assert_eq!(vcpu.sys(HV_SYS_REG_CNTV_CTL_EL0) & 4, 4, "ISTATUS");

    // Masked: the guest spins without another timer exit until a kick.
    let id = vcpu.id;
    let kicker = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(50));
        // SAFETY: one id.
        assert_eq!(unsafe { hv_vcpus_exit(&id, 1) }, HV_SUCCESS);
    });
    assert_eq!(vcpu.run().reason, HV_EXIT_REASON_CANCELED);
    kicker.join().unwrap();

    // Unmasked while the condition still holds: it fires again.
    assert_eq!(hv_vcpu_set_vtimer_mask(vcpu.id, false), HV_SUCCESS);
    assert_eq!(vcpu.run().reason, HV_EXIT_REASON_VTIMER_ACTIVATED);
}

#[test]
fn the_counter_is_host_time_minus_the_offset() {
    let mut info = MachTimebaseInfo::default();
    // SAFETY: out-pointer to a local.
    assert_eq!(unsafe { mach_timebase_info(&mut info) }, 0);
    assert_eq!((info.numer, info.denom), (125, 3), "24 MHz");
    let a = mach_absolute_time();
    let b = mach_absolute_time();
    assert!(b >= a);
}
