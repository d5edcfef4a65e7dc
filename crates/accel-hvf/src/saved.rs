//! A vCPU's state for snapshots: what the framework lets us read and
//! write (general, SIMD/FP and the EL0/EL1 system registers of
//! `hv_sys_reg_t`) and the loop's view of the virtual timer line.

use accel::AccelError;
use arch_arm64::sysreg::{CNTV_CTL_EL0, CNTV_CVAL_EL0};
use arch_arm64::SysReg;
use serde::{Deserialize, Serialize};

use crate::exits::Reg;
use crate::vcpu_loop::HvVcpu;
use crate::vtimer::VtimerLine;

/// FPCR, FPSR and Q0..Q31.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpState {
    pub fpcr: u64,
    pub fpsr: u64,
    pub q: Vec<[u8; 16]>,
}

/// One vCPU.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedVcpu {
    pub x: Vec<u64>,
    pub pc: u64,
    pub cpsr: u64,
    pub fp: FpState,
    /// `(encoding, value)` of each register of `SAVED_SYS_REGS` (vm.rs).
    pub sys: Vec<(u32, u64)>,
    pub vtimer: VtimerLine,
}

/// The VM's vCPUs (`None`: powered off, nothing to keep) and the guest's
/// count when they were saved.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SavedCpus {
    pub guest_count: u64,
    pub cpus: Vec<Option<SavedVcpu>>,
}

const S: fn(u32, u32, u32, u32, u32) -> SysReg = SysReg::new;

/// The guest-visible registers of `hv_sys_reg_t` that are state (the ID
/// registers are the framework's, MPIDR and ID_AA64PFR0's GIC field the
/// loop sets on every vCPU it creates).
pub fn saved_sys_regs() -> Vec<SysReg> {
    let mut regs = vec![
        S(3, 0, 1, 0, 0),  // SCTLR_EL1
        S(3, 0, 1, 0, 1),  // ACTLR_EL1
        S(3, 0, 1, 0, 2),  // CPACR_EL1
        S(3, 0, 2, 0, 0),  // TTBR0_EL1
        S(3, 0, 2, 0, 1),  // TTBR1_EL1
        S(3, 0, 2, 0, 2),  // TCR_EL1
        S(3, 0, 4, 0, 0),  // SPSR_EL1
        S(3, 0, 4, 0, 1),  // ELR_EL1
        S(3, 0, 4, 1, 0),  // SP_EL0
        S(3, 0, 5, 1, 0),  // AFSR0_EL1
        S(3, 0, 5, 1, 1),  // AFSR1_EL1
        S(3, 0, 5, 2, 0),  // ESR_EL1
        S(3, 0, 6, 0, 0),  // FAR_EL1
        S(3, 0, 7, 4, 0),  // PAR_EL1
        S(3, 0, 10, 2, 0), // MAIR_EL1
        S(3, 0, 10, 3, 0), // AMAIR_EL1
        S(3, 0, 12, 0, 0), // VBAR_EL1
        S(3, 0, 13, 0, 1), // CONTEXTIDR_EL1
        S(3, 0, 13, 0, 4), // TPIDR_EL1
        S(3, 0, 14, 1, 0), // CNTKCTL_EL1
        S(3, 2, 0, 0, 0),  // CSSELR_EL1
        S(3, 3, 13, 0, 2), // TPIDR_EL0
        S(3, 3, 13, 0, 3), // TPIDRRO_EL0
        CNTV_CVAL_EL0,
        CNTV_CTL_EL0,
        S(3, 4, 4, 1, 0), // SP_EL1
        S(2, 0, 0, 2, 2), // MDSCR_EL1
    ];
    // Pointer-authentication keys (APIA, APIB, APDA, APDB, APGA; lo, hi).
    for (crm, op2s) in [(1, 0..4), (2, 0..4), (3, 0..2)] {
        for op2 in op2s {
            regs.push(S(3, 0, 2, crm, op2));
        }
    }
    regs
}

/// Reads everything [`SavedVcpu`] holds from a stopped vCPU.
pub fn capture(v: &mut impl HvVcpu, vtimer: VtimerLine) -> Result<SavedVcpu, AccelError> {
    let mut x = Vec::with_capacity(31);
    for n in 0..31 {
        x.push(v.read(Reg::X(n))?);
    }
    let mut sys = Vec::new();
    for reg in saved_sys_regs() {
        sys.push((reg.bits(), v.read(Reg::Sys(reg))?));
    }
    Ok(SavedVcpu {
        x,
        pc: v.read(Reg::Pc)?,
        cpsr: v.read(Reg::Pstate)?,
        fp: v.read_fp()?,
        sys,
        vtimer,
    })
}

/// Writes `saved` into a fresh vCPU. Only registers of
/// [`saved_sys_regs`] are accepted, so a snapshot cannot reach others.
pub fn apply(v: &mut impl HvVcpu, saved: &SavedVcpu) -> Result<(), AccelError> {
    if saved.x.len() != 31 || saved.fp.q.len() != 32 {
        return Err(AccelError::setup("vCPU state of the wrong shape"));
    }
    let allowed = saved_sys_regs();
    for (encoding, value) in &saved.sys {
        let Some(reg) = allowed.iter().find(|r| r.bits() == *encoding) else {
            return Err(AccelError::setup(format!(
                "vCPU state names system register {encoding:#x}"
            )));
        };
        v.write(Reg::Sys(*reg), *value)?;
    }
    for (n, value) in (0u8..).zip(&saved.x) {
        v.write(Reg::X(n), *value)?;
    }
    v.write_fp(&saved.fp)?;
    v.write(Reg::Pc, saved.pc)?;
    v.write(Reg::Pstate, saved.cpsr)
}
