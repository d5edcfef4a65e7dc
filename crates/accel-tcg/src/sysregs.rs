//! System registers the software CPU takes over from Unicorn.
//!
//! Unicorn models a generic `max` CPU; the guest must see the vmapple CPU:
//! a per-vCPU MPIDR, the GICv3 CPU interface (forwarded to the machine), a
//! 24 MHz generic timer whose ISTATUS and interrupt really work, and ID
//! registers that do not advertise what the machine lacks (EL2, EL3, SVE,
//! MTE, BTI; pointer authentication unless asked for). Everything else
//! stays with Unicorn.

use arch_arm64::sysreg::*;
use arch_arm64::timer::TimerRegs;
use arch_arm64::SysReg;

/// CNTKCTL_EL1: EL0 access controls for the counters and timers.
pub const CNTKCTL_EL1: SysReg = SysReg::new(3, 0, 14, 1, 0);
const CNTKCTL_EL0PCTEN: u64 = 1 << 0;
const CNTKCTL_EL0VCTEN: u64 = 1 << 1;
const CNTKCTL_EL0VTEN: u64 = 1 << 8;
const CNTKCTL_EL0PTEN: u64 = 1 << 9;
/// Bits of CNTKCTL_EL1 that hold state (EVNT* and the enables).
pub const CNTKCTL_WRITABLE: u64 = 0x3ff;

/// Registers whose accesses the translator routes to us.
pub fn is_trapped(reg: SysReg) -> bool {
    reg.is_gic_cpu_interface()
        || matches!(
            reg,
            MPIDR_EL1
                | ID_AA64PFR0_EL1
                | ID_AA64PFR1_EL1
                | ID_AA64ZFR0_EL1
                | ID_AA64ISAR1_EL1
                | CNTFRQ_EL0
                | CNTPCT_EL0
                | CNTVCT_EL0
                | CNTP_TVAL_EL0
                | CNTP_CTL_EL0
                | CNTP_CVAL_EL0
                | CNTV_TVAL_EL0
                | CNTV_CTL_EL0
                | CNTV_CVAL_EL0
                | CNTKCTL_EL1
        )
}

fn field(value: u64, shift: u32, new: u64) -> u64 {
    (value & !(0xf << shift)) | ((new & 0xf) << shift)
}

/// The ID register values the guest reads, derived once from Unicorn's.
#[derive(Clone, Copy, Debug)]
pub struct IdRegisters {
    pub pfr0: u64,
    pub pfr1: u64,
    pub isar1: u64,
}

impl IdRegisters {
    /// `pointer_auth` keeps the engine's pointer authentication (QARMA
    /// address and generic authentication, APA and GPA) visible.
    pub fn from_native(pfr0: u64, pfr1: u64, isar1: u64, pointer_auth: bool) -> Self {
        // ID_AA64PFR0_EL1: EL2 and EL3 absent (the guest owns EL1 only),
        // GIC system registers present, no RAS, SVE, Secure EL2, MPAM, AMU.
        let mut pfr0 = field(pfr0, 8, 0);
        pfr0 = field(pfr0, 12, 0);
        pfr0 = field(pfr0, 24, 1);
        for shift in [28, 32, 36, 40, 44] {
            pfr0 = field(pfr0, shift, 0);
        }
        // ID_AA64PFR1_EL1: keep SSBS only (no BTI, MTE, RAS_frac, SME...).
        let pfr1 = pfr1 & 0xf0;
        // ID_AA64ISAR1_EL1: pointer authentication (APA, API, GPA, GPI)
        // only when asked for.
        let mut isar1 = isar1;
        if !pointer_auth {
            for shift in [4, 8, 24, 28] {
                isar1 = field(isar1, shift, 0);
            }
        }
        Self { pfr0, pfr1, isar1 }
    }

    pub fn read(&self, reg: SysReg) -> Option<u64> {
        match reg {
            ID_AA64PFR0_EL1 => Some(self.pfr0),
            ID_AA64PFR1_EL1 => Some(self.pfr1),
            ID_AA64ISAR1_EL1 => Some(self.isar1),
            ID_AA64ZFR0_EL1 => Some(0),
            _ => None,
        }
    }
}

/// Per-vCPU generic-timer state.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuTimers {
    pub virt: TimerRegs,
    pub phys: TimerRegs,
    pub cntkctl: u64,
}

/// Outcome of a timer-register access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimerAccess {
    Value(u64),
    Written,
    Undefined,
    NotATimerRegister,
}

impl CpuTimers {
    /// Emulates a counter/timer register access from exception level `el`
    /// at count `now` (counter frequency `hz`).
    pub fn access(
        &mut self,
        reg: SysReg,
        el: i32,
        write: Option<u64>,
        now: u64,
        hz: u64,
    ) -> TimerAccess {
        let el0_allowed = |bits: u64| el > 0 || self.cntkctl & bits != 0;
        let read_only = |value: u64| match write {
            None => TimerAccess::Value(value),
            Some(_) => TimerAccess::Undefined,
        };
        match reg {
            CNTFRQ_EL0 => {
                if !el0_allowed(CNTKCTL_EL0PCTEN | CNTKCTL_EL0VCTEN) {
                    return TimerAccess::Undefined;
                }
                // Writable only at the highest EL, which the guest never has.
                read_only(hz)
            }
            CNTPCT_EL0 if el0_allowed(CNTKCTL_EL0PCTEN) => read_only(now),
            CNTVCT_EL0 if el0_allowed(CNTKCTL_EL0VCTEN) => read_only(now),
            CNTKCTL_EL1 if el > 0 => match write {
                None => TimerAccess::Value(self.cntkctl),
                Some(v) => {
                    self.cntkctl = v & CNTKCTL_WRITABLE;
                    TimerAccess::Written
                }
            },
            CNTV_CTL_EL0 | CNTV_CVAL_EL0 | CNTV_TVAL_EL0 if el0_allowed(CNTKCTL_EL0VTEN) => {
                Self::timer_access(&mut self.virt, reg, write, now)
            }
            CNTP_CTL_EL0 | CNTP_CVAL_EL0 | CNTP_TVAL_EL0 if el0_allowed(CNTKCTL_EL0PTEN) => {
                Self::timer_access(&mut self.phys, reg, write, now)
            }
            CNTPCT_EL0 | CNTVCT_EL0 | CNTKCTL_EL1 | CNTV_CTL_EL0 | CNTV_CVAL_EL0
            | CNTV_TVAL_EL0 | CNTP_CTL_EL0 | CNTP_CVAL_EL0 | CNTP_TVAL_EL0 => {
                TimerAccess::Undefined
            }
            _ => TimerAccess::NotATimerRegister,
        }
    }

    fn timer_access(
        timer: &mut TimerRegs,
        reg: SysReg,
        write: Option<u64>,
        now: u64,
    ) -> TimerAccess {
        let ctl = reg == CNTV_CTL_EL0 || reg == CNTP_CTL_EL0;
        let cval = reg == CNTV_CVAL_EL0 || reg == CNTP_CVAL_EL0;
        match write {
            None if ctl => TimerAccess::Value(timer.read_ctl(now)),
            None if cval => TimerAccess::Value(timer.read_cval()),
            None => TimerAccess::Value(timer.read_tval(now)),
            Some(v) => {
                if ctl {
                    timer.write_ctl(v);
                } else if cval {
                    timer.write_cval(v);
                } else {
                    timer.write_tval(now, v);
                }
                TimerAccess::Written
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arch_arm64::timer::{CTL_ENABLE, CTL_ISTATUS};

    #[test]
    fn trapped_set() {
        assert!(is_trapped(ICC_IAR1_EL1));
        assert!(is_trapped(ICC_PMR_EL1));
        assert!(is_trapped(CNTV_CTL_EL0));
        assert!(is_trapped(MPIDR_EL1));
        assert!(
            !is_trapped(SysReg::new(3, 0, 1, 0, 0)),
            "SCTLR_EL1 stays native"
        );
        assert!(
            !is_trapped(SysReg::new(1, 3, 7, 4, 1)),
            "DC ZVA stays native"
        );
    }

    #[test]
    fn id_registers_hide_what_the_machine_lacks() {
        // A `max`-like PFR0: EL0-EL3 AArch64, FP, AdvSIMD, GIC 0, RAS 1, SVE 1.
        let ids = IdRegisters::from_native(0x0000_0001_1000_1111, 0x21, 0xffff_ffff, false);
        assert_eq!(ids.pfr0 & 0xffff, 0x0011, "EL2/EL3 not implemented");
        assert_eq!((ids.pfr0 >> 24) & 0xf, 1, "GICv3 sysregs");
        assert_eq!((ids.pfr0 >> 32) & 0xf, 0, "no SVE");
        assert_eq!(ids.pfr1, 0x20, "SSBS kept, BTI dropped");
        assert_eq!(ids.isar1 & 0xff00_0ff0, 0, "no pointer authentication");
        assert_eq!(
            ids.isar1 & 0x00ff_f00f,
            0x00ff_f00f,
            "other ISAR1 fields untouched"
        );
        assert_eq!(ids.read(ID_AA64ZFR0_EL1), Some(0));
    }

    #[test]
    fn pointer_authentication_is_offered_when_asked_for() {
        // Unicorn's `max`: APA = 1 (QARMA), GPA = 1.
        let ids = IdRegisters::from_native(0x11, 0, 0x0100_0010, true);
        assert_eq!(ids.isar1, 0x0100_0010);
    }

    #[test]
    fn el0_access_follows_cntkctl() {
        let mut t = CpuTimers::default();
        let hz = 24_000_000;
        assert_eq!(t.access(CNTVCT_EL0, 0, None, 5, hz), TimerAccess::Undefined);
        assert_eq!(
            t.access(CNTKCTL_EL1, 0, Some(2), 5, hz),
            TimerAccess::Undefined
        );
        assert_eq!(
            t.access(CNTKCTL_EL1, 1, Some(2), 5, hz),
            TimerAccess::Written
        );
        assert_eq!(t.access(CNTVCT_EL0, 0, None, 5, hz), TimerAccess::Value(5));
        assert_eq!(t.access(CNTFRQ_EL0, 0, None, 5, hz), TimerAccess::Value(hz));
        assert_eq!(
            t.access(CNTFRQ_EL0, 1, Some(1), 5, hz),
            TimerAccess::Undefined
        );
        assert_eq!(
            t.access(CNTV_CTL_EL0, 0, None, 5, hz),
            TimerAccess::Undefined
        );
        assert_eq!(
            t.access(CNTVCT_EL0, 1, Some(0), 5, hz),
            TimerAccess::Undefined
        );
    }

    #[test]
    fn virtual_timer_through_registers() {
        let mut t = CpuTimers::default();
        let hz = 24_000_000;
        t.access(CNTV_TVAL_EL0, 1, Some(100), 1000, hz);
        t.access(CNTV_CTL_EL0, 1, Some(CTL_ENABLE), 1000, hz);
        assert_eq!(
            t.access(CNTV_CVAL_EL0, 1, None, 1000, hz),
            TimerAccess::Value(1100)
        );
        assert_eq!(
            t.access(CNTV_CTL_EL0, 1, None, 1099, hz),
            TimerAccess::Value(CTL_ENABLE)
        );
        assert_eq!(
            t.access(CNTV_CTL_EL0, 1, None, 1100, hz),
            TimerAccess::Value(CTL_ENABLE | CTL_ISTATUS)
        );
        assert!(t.virt.output(1100));
        assert!(!t.phys.output(1100), "the two timers are independent");
    }
}
