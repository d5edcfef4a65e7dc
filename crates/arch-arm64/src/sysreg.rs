//! System-register encodings.
//!
//! A register is named by `(op0, op1, CRn, CRm, op2)`. [`SysReg`] packs the
//! five fields exactly where an MRS/MSR instruction holds them (bits 20:5),
//! so decoding an instruction is one mask, and decoding an ESR_EL2 ISS is a
//! shuffle (see [`crate::esr`]).

use std::fmt;

/// One AArch64 system register (or SYS instruction) encoding.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SysReg(u32);

impl SysReg {
    pub const fn new(op0: u32, op1: u32, crn: u32, crm: u32, op2: u32) -> Self {
        Self(
            ((op0 & 3) << 19)
                | ((op1 & 7) << 16)
                | ((crn & 15) << 12)
                | ((crm & 15) << 8)
                | ((op2 & 7) << 5),
        )
    }

    /// The register an MRS, MSR (register), SYS or SYSL instruction names.
    pub const fn from_instruction(insn: u32) -> Self {
        Self(insn & 0x001f_ffe0)
    }

    /// The bits as they sit in an instruction.
    pub const fn bits(self) -> u32 {
        self.0
    }

    pub const fn op0(self) -> u32 {
        (self.0 >> 19) & 3
    }
    pub const fn op1(self) -> u32 {
        (self.0 >> 16) & 7
    }
    pub const fn crn(self) -> u32 {
        (self.0 >> 12) & 15
    }
    pub const fn crm(self) -> u32 {
        (self.0 >> 8) & 15
    }
    pub const fn op2(self) -> u32 {
        (self.0 >> 5) & 7
    }

    /// True for the GICv3 CPU-interface registers accessible at EL1
    /// (`ICC_*_EL1`): op0=3, op1=0, CRn=12 or `ICC_PMR_EL1`.
    pub const fn is_gic_cpu_interface(self) -> bool {
        (self.op0() == 3 && self.op1() == 0 && self.crn() == 12 && self.crm() >= 8)
            || self.0 == ICC_PMR_EL1.0
    }

    /// True for the ID register space (op0=3, op1=0, CRn=0, CRm=1..7).
    pub const fn is_id_register(self) -> bool {
        self.op0() == 3 && self.op1() == 0 && self.crn() == 0 && self.crm() >= 1
    }
}

impl fmt::Debug for SysReg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match name(*self) {
            Some(n) => f.write_str(n),
            None => write!(
                f,
                "S{}_{}_C{}_C{}_{}",
                self.op0(),
                self.op1(),
                self.crn(),
                self.crm(),
                self.op2()
            ),
        }
    }
}

impl fmt::Display for SysReg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

macro_rules! sysregs {
    ($($name:ident = ($op0:expr, $op1:expr, $crn:expr, $crm:expr, $op2:expr);)*) => {
        $(pub const $name: SysReg = SysReg::new($op0, $op1, $crn, $crm, $op2);)*

        /// The architectural name of a register this crate knows.
        pub fn name(reg: SysReg) -> Option<&'static str> {
            match reg {
                $(r if r == $name => Some(stringify!($name)),)*
                _ => None,
            }
        }
    };
}

sysregs! {
    MIDR_EL1 = (3, 0, 0, 0, 0);
    MPIDR_EL1 = (3, 0, 0, 0, 5);
    REVIDR_EL1 = (3, 0, 0, 0, 6);
    ID_AA64PFR0_EL1 = (3, 0, 0, 4, 0);
    ID_AA64PFR1_EL1 = (3, 0, 0, 4, 1);
    ID_AA64ZFR0_EL1 = (3, 0, 0, 4, 4);
    ID_AA64DFR0_EL1 = (3, 0, 0, 5, 0);
    ID_AA64ISAR0_EL1 = (3, 0, 0, 6, 0);
    ID_AA64ISAR1_EL1 = (3, 0, 0, 6, 1);
    ID_AA64MMFR0_EL1 = (3, 0, 0, 7, 0);
    ID_AA64MMFR1_EL1 = (3, 0, 0, 7, 1);
    ID_AA64MMFR2_EL1 = (3, 0, 0, 7, 2);

    ICC_PMR_EL1 = (3, 0, 4, 6, 0);
    ICC_IAR0_EL1 = (3, 0, 12, 8, 0);
    ICC_EOIR0_EL1 = (3, 0, 12, 8, 1);
    ICC_HPPIR0_EL1 = (3, 0, 12, 8, 2);
    ICC_BPR0_EL1 = (3, 0, 12, 8, 3);
    ICC_AP0R0_EL1 = (3, 0, 12, 8, 4);
    ICC_AP0R1_EL1 = (3, 0, 12, 8, 5);
    ICC_AP0R2_EL1 = (3, 0, 12, 8, 6);
    ICC_AP0R3_EL1 = (3, 0, 12, 8, 7);
    ICC_AP1R0_EL1 = (3, 0, 12, 9, 0);
    ICC_AP1R1_EL1 = (3, 0, 12, 9, 1);
    ICC_AP1R2_EL1 = (3, 0, 12, 9, 2);
    ICC_AP1R3_EL1 = (3, 0, 12, 9, 3);
    ICC_DIR_EL1 = (3, 0, 12, 11, 1);
    ICC_RPR_EL1 = (3, 0, 12, 11, 3);
    ICC_SGI1R_EL1 = (3, 0, 12, 11, 5);
    ICC_ASGI1R_EL1 = (3, 0, 12, 11, 6);
    ICC_SGI0R_EL1 = (3, 0, 12, 11, 7);
    ICC_IAR1_EL1 = (3, 0, 12, 12, 0);
    ICC_EOIR1_EL1 = (3, 0, 12, 12, 1);
    ICC_HPPIR1_EL1 = (3, 0, 12, 12, 2);
    ICC_BPR1_EL1 = (3, 0, 12, 12, 3);
    ICC_CTLR_EL1 = (3, 0, 12, 12, 4);
    ICC_SRE_EL1 = (3, 0, 12, 12, 5);
    ICC_IGRPEN0_EL1 = (3, 0, 12, 12, 6);
    ICC_IGRPEN1_EL1 = (3, 0, 12, 12, 7);

    CNTFRQ_EL0 = (3, 3, 14, 0, 0);
    CNTPCT_EL0 = (3, 3, 14, 0, 1);
    CNTVCT_EL0 = (3, 3, 14, 0, 2);
    CNTPCTSS_EL0 = (3, 3, 14, 0, 5);
    CNTVCTSS_EL0 = (3, 3, 14, 0, 6);
    CNTP_TVAL_EL0 = (3, 3, 14, 2, 0);
    CNTP_CTL_EL0 = (3, 3, 14, 2, 1);
    CNTP_CVAL_EL0 = (3, 3, 14, 2, 2);
    CNTV_TVAL_EL0 = (3, 3, 14, 3, 0);
    CNTV_CTL_EL0 = (3, 3, 14, 3, 1);
    CNTV_CVAL_EL0 = (3, 3, 14, 3, 2);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_like_the_instruction() {
        // mrs x0, mpidr_el1 = 0xd53800a0
        assert_eq!(SysReg::from_instruction(0xd538_00a0), MPIDR_EL1);
        // msr icc_sgi1r_el1, x1 = 0xd518cba1
        assert_eq!(SysReg::from_instruction(0xd518_cba1), ICC_SGI1R_EL1);
        // mrs x2, cntvct_el0 = 0xd53be042
        assert_eq!(SysReg::from_instruction(0xd53b_e042), CNTVCT_EL0);
        let r = ICC_IGRPEN1_EL1;
        assert_eq!(
            (r.op0(), r.op1(), r.crn(), r.crm(), r.op2()),
            (3, 0, 12, 12, 7)
        );
    }

    #[test]
    fn classifies() {
        assert!(ICC_PMR_EL1.is_gic_cpu_interface());
        assert!(ICC_EOIR1_EL1.is_gic_cpu_interface());
        assert!(!CNTV_CTL_EL0.is_gic_cpu_interface());
        assert!(ID_AA64PFR0_EL1.is_id_register());
        assert!(!MPIDR_EL1.is_id_register());
        assert_eq!(
            format!("{:?}", SysReg::new(3, 1, 15, 2, 0)),
            "S3_1_C15_C2_0"
        );
        assert_eq!(format!("{}", ICC_SRE_EL1), "ICC_SRE_EL1");
    }
}
