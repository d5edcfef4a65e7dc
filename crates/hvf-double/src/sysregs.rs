//! System registers: which guest accesses leave the guest, which the
//! double answers itself, and which `hv_sys_reg_t` ids the API accepts.
//!
//! hvf-semantics.md §4.4 lists what traps to the VMM when the VMM models
//! the GIC itself (no `hv_gic`, EL2 off); §5.3 lists the ids
//! `hv_vcpu_get/set_sys_reg` take. Everything else the guest reaches runs
//! natively, here on the software CPU.

use arch_arm64::sysreg::{
    CNTFRQ_EL0, CNTPCT_EL0, CNTP_CTL_EL0, CNTP_CVAL_EL0, CNTP_TVAL_EL0, CNTVCT_EL0, CNTV_CTL_EL0,
    CNTV_CVAL_EL0, CNTV_TVAL_EL0, MPIDR_EL1,
};
use arch_arm64::SysReg;

pub const MIDR_EL1: SysReg = SysReg::new(3, 0, 0, 0, 0);
pub const CNTKCTL_EL1: SysReg = SysReg::new(3, 0, 14, 1, 0);
pub const OSLAR_EL1: SysReg = SysReg::new(2, 0, 1, 0, 4);
pub const OSLSR_EL1: SysReg = SysReg::new(2, 0, 1, 1, 4);
pub const OSDLR_EL1: SysReg = SysReg::new(2, 0, 1, 3, 4);
pub const LORC_EL1: SysReg = SysReg::new(3, 0, 10, 4, 3);
pub const MDCCINT_EL1: SysReg = SysReg::new(2, 0, 0, 2, 0);
pub const MDSCR_EL1: SysReg = SysReg::new(2, 0, 0, 2, 2);

pub const ID_AA64PFR0_EL1: SysReg = SysReg::new(3, 0, 0, 4, 0);
pub const ID_AA64PFR1_EL1: SysReg = SysReg::new(3, 0, 0, 4, 1);
pub const ID_AA64ZFR0_EL1: SysReg = SysReg::new(3, 0, 0, 4, 4);
pub const ID_AA64SMFR0_EL1: SysReg = SysReg::new(3, 0, 0, 4, 5);
pub const ID_AA64DFR0_EL1: SysReg = SysReg::new(3, 0, 0, 5, 0);
pub const ID_AA64ISAR1_EL1: SysReg = SysReg::new(3, 0, 0, 6, 1);

/// Debug breakpoint/watchpoint value and control registers
/// (`DBGBVRn/DBGBCRn/DBGWVRn/DBGWCRn_EL1`, n = CRm).
pub const fn is_debug_bp_wp(r: SysReg) -> bool {
    r.op0() == 2 && r.op1() == 0 && r.crn() == 0 && r.op2() >= 4
}

/// PMU registers (PMCR_EL0 and the CRn = 9, CRm = 12..14 group, the
/// PMINTEN and PMUSERENR registers, PMEVCNTRn/PMEVTYPERn).
pub const fn is_pmu(r: SysReg) -> bool {
    (r.op0() == 3 && r.crn() == 9 && r.crm() >= 12 && (r.op1() == 3 || r.op1() == 0))
        || (r.op0() == 3 && r.op1() == 3 && r.crn() == 14 && r.crm() >= 8)
}

/// Where a guest MRS/MSR of a register the translator hands us goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// Leaves the guest: an EC 0x18 exit to the VMM (§4.4).
    Vmm,
    /// Answered by the double's per-vCPU copy (identity, the virtual
    /// timer, the debug registers while their traps are off).
    Double,
    /// Neither: the software CPU keeps it.
    Native,
}

/// Route of `reg` for a vCPU whose debug-register trap is `trap_debug`.
pub fn route(reg: SysReg, trap_debug: bool) -> Route {
    if reg.is_gic_cpu_interface()
        || is_pmu(reg)
        || matches!(
            reg,
            OSLAR_EL1
                | OSLSR_EL1
                | OSDLR_EL1
                | LORC_EL1
                | CNTPCT_EL0
                | CNTP_CTL_EL0
                | CNTP_CVAL_EL0
                | CNTP_TVAL_EL0
        )
    {
        return Route::Vmm;
    }
    if reg == MDCCINT_EL1 {
        // libkrun forwards it; the framework traps it (§4.4).
        return Route::Vmm;
    }
    if is_debug_bp_wp(reg) || reg == MDSCR_EL1 {
        return if trap_debug {
            Route::Vmm
        } else {
            Route::Double
        };
    }
    if reg == MPIDR_EL1
        || reg == MIDR_EL1
        || reg.is_id_register()
        || matches!(
            reg,
            CNTFRQ_EL0 | CNTVCT_EL0 | CNTV_CTL_EL0 | CNTV_CVAL_EL0 | CNTV_TVAL_EL0 | CNTKCTL_EL1
        )
    {
        return Route::Double;
    }
    Route::Native
}

/// Whether the translator must hand accesses of `reg` to us at all (the
/// answer may not depend on per-vCPU state: translations are shared).
pub fn intercepted(reg: SysReg) -> bool {
    route(reg, true) != Route::Native || route(reg, false) != Route::Native
}

/// The ESR ISS of a trapped MRS/MSR (EC 0x18 layout, §4.3).
pub fn trap_iss(reg: SysReg, rt: u32, is_read: bool) -> u64 {
    (u64::from(reg.op0()) << 20)
        | (u64::from(reg.op2()) << 17)
        | (u64::from(reg.op1()) << 14)
        | (u64::from(reg.crn()) << 10)
        | (u64::from(rt & 31) << 5)
        | (u64::from(reg.crm()) << 1)
        | u64::from(is_read)
}

/// `hv_sys_reg_t` (op0<<14 | op1<<11 | CRn<<7 | CRm<<3 | op2) to the
/// register, if the id is one the API accepts in a VM without EL2 and
/// without `hv_gic` (§5.3); anything else is `HV_BAD_ARGUMENT`.
pub fn from_hv_id(id: u16) -> Option<SysReg> {
    let id = u32::from(id);
    let reg = SysReg::new(
        (id >> 14) & 3,
        (id >> 11) & 7,
        (id >> 7) & 15,
        (id >> 3) & 15,
        id & 7,
    );
    accepted(reg).then_some(reg)
}

/// The register as a `hv_sys_reg_t`.
pub fn to_hv_id(reg: SysReg) -> u16 {
    let id =
        (reg.op0() << 14) | (reg.op1() << 11) | (reg.crn() << 7) | (reg.crm() << 3) | reg.op2();
    // Five fields of 2+3+4+4+3 bits: always fits.
    (id & 0xffff) as u16
}

fn accepted(r: SysReg) -> bool {
    const S: fn(u32, u32, u32, u32, u32) -> SysReg = SysReg::new;
    // Debug: DBGB/W{V,C}Rn_EL1 n = 0..15, MDCCINT_EL1, MDSCR_EL1.
    if is_debug_bp_wp(r) || r == MDCCINT_EL1 || r == MDSCR_EL1 {
        return true;
    }
    let list = [
        MIDR_EL1,
        MPIDR_EL1,
        ID_AA64PFR0_EL1,
        ID_AA64PFR1_EL1,
        ID_AA64ZFR0_EL1,
        ID_AA64SMFR0_EL1,
        ID_AA64DFR0_EL1,
        S(3, 0, 0, 5, 1), // ID_AA64DFR1_EL1
        S(3, 0, 0, 6, 0), // ID_AA64ISAR0_EL1
        ID_AA64ISAR1_EL1,
        S(3, 0, 0, 7, 0),  // ID_AA64MMFR0_EL1
        S(3, 0, 0, 7, 1),  // ID_AA64MMFR1_EL1
        S(3, 0, 0, 7, 2),  // ID_AA64MMFR2_EL1
        S(3, 0, 1, 0, 0),  // SCTLR_EL1
        S(3, 0, 1, 0, 1),  // ACTLR_EL1
        S(3, 0, 1, 0, 2),  // CPACR_EL1
        S(3, 0, 2, 0, 0),  // TTBR0_EL1
        S(3, 0, 2, 0, 1),  // TTBR1_EL1
        S(3, 0, 2, 0, 2),  // TCR_EL1
        S(3, 0, 2, 1, 0),  // APIAKEYLO_EL1
        S(3, 0, 2, 1, 1),  // APIAKEYHI_EL1
        S(3, 0, 2, 1, 2),  // APIBKEYLO_EL1
        S(3, 0, 2, 1, 3),  // APIBKEYHI_EL1
        S(3, 0, 2, 2, 0),  // APDAKEYLO_EL1
        S(3, 0, 2, 2, 1),  // APDAKEYHI_EL1
        S(3, 0, 2, 2, 2),  // APDBKEYLO_EL1
        S(3, 0, 2, 2, 3),  // APDBKEYHI_EL1
        S(3, 0, 2, 3, 0),  // APGAKEYLO_EL1
        S(3, 0, 2, 3, 1),  // APGAKEYHI_EL1
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
        CNTKCTL_EL1,
        S(3, 2, 0, 0, 0),  // CSSELR_EL1
        S(3, 3, 13, 0, 2), // TPIDR_EL0
        S(3, 3, 13, 0, 3), // TPIDRRO_EL0
        CNTV_CTL_EL0,
        CNTV_CVAL_EL0,
        S(3, 4, 4, 1, 0), // SP_EL1
    ];
    list.contains(&r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arch_arm64::sysreg::{ICC_EOIR1_EL1, ICC_IAR1_EL1, ICC_PMR_EL1};

    #[test]
    fn header_ids_decode_to_their_registers() {
        // hv_vcpu_types.h: MPIDR_EL1 0xc005, CNTV_CTL_EL0 0xdf19, SP_EL1 0xe208.
        assert_eq!(from_hv_id(0xc005), Some(MPIDR_EL1));
        assert_eq!(from_hv_id(0xdf19), Some(CNTV_CTL_EL0));
        assert_eq!(from_hv_id(0xe208), Some(SysReg::new(3, 4, 4, 1, 0)));
        assert_eq!(to_hv_id(CNTV_CVAL_EL0), 0xdf1a);
        assert_eq!(from_hv_id(0x8004), Some(SysReg::new(2, 0, 0, 0, 4)));
    }

    #[test]
    fn registers_outside_the_api_are_refused() {
        // CNTVCT_EL0, CNTFRQ_EL0 and the ICC registers have no id.
        for r in [CNTVCT_EL0, CNTFRQ_EL0, ICC_IAR1_EL1, CNTP_CTL_EL0] {
            assert_eq!(from_hv_id(to_hv_id(r)), None, "{r}");
        }
        assert_eq!(from_hv_id(0xffff), None);
    }

    #[test]
    fn gic_pmu_os_lock_and_physical_timer_leave_the_guest() {
        for r in [
            ICC_IAR1_EL1,
            ICC_EOIR1_EL1,
            ICC_PMR_EL1,
            OSLAR_EL1,
            CNTPCT_EL0,
            CNTP_CTL_EL0,
        ] {
            assert_eq!(route(r, false), Route::Vmm, "{r}");
        }
        // PMCR_EL0, PMUSERENR_EL0, PMCCNTR_EL0, PMEVCNTR3_EL0.
        for r in [
            SysReg::new(3, 3, 9, 12, 0),
            SysReg::new(3, 3, 9, 14, 0),
            SysReg::new(3, 3, 9, 13, 0),
            SysReg::new(3, 3, 14, 8, 3),
        ] {
            assert_eq!(route(r, false), Route::Vmm, "{r}");
        }
    }

    #[test]
    fn debug_registers_trap_only_when_asked() {
        let bvr0 = SysReg::new(2, 0, 0, 0, 4);
        assert_eq!(route(bvr0, false), Route::Double);
        assert_eq!(route(bvr0, true), Route::Vmm);
        assert_eq!(route(MDSCR_EL1, true), Route::Vmm);
        assert!(intercepted(bvr0));
    }

    #[test]
    fn translation_and_context_registers_run_natively() {
        let sctlr = SysReg::new(3, 0, 1, 0, 0);
        assert_eq!(route(sctlr, false), Route::Native);
        assert!(!intercepted(sctlr));
        assert_eq!(route(CNTV_CTL_EL0, false), Route::Double);
        assert_eq!(route(MPIDR_EL1, true), Route::Double);
    }

    #[test]
    fn trapped_syndrome_follows_the_ec_0x18_layout() {
        // MRS x3, ICC_IAR1_EL1 (3, 0, 12, 12, 0): direction bit set.
        let iss = trap_iss(ICC_IAR1_EL1, 3, true);
        assert_eq!(iss & 1, 1);
        assert_eq!((iss >> 5) & 31, 3);
        assert_eq!((iss >> 10) & 15, 12);
        assert_eq!((iss >> 1) & 15, 12);
        assert_eq!((iss >> 20) & 3, 3);
    }
}
