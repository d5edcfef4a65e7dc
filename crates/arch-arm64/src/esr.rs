//! Exception syndromes (ESR_ELx) that a hypervisor sees from an EL1 guest.
//!
//! Hypervisor.framework reports a trapped guest exception as an ESR_EL2
//! value; [`decode`] turns it into a [`Syndrome`]. Only the classes a VMM
//! acts on are decoded; anything else is [`Syndrome::Other`].

use crate::sysreg::SysReg;

pub const EC_UNKNOWN: u32 = 0x00;
pub const EC_WFX: u32 = 0x01;
pub const EC_HVC64: u32 = 0x16;
pub const EC_SMC64: u32 = 0x17;
pub const EC_SYSREG: u32 = 0x18;
pub const EC_IABT_LOWER: u32 = 0x20;
pub const EC_DABT_LOWER: u32 = 0x24;
pub const EC_BRK64: u32 = 0x3c;

/// A data abort the VMM can emulate: ISV was set, so the syndrome names
/// the access completely.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataAccess {
    pub is_write: bool,
    /// Access size in bytes: 1, 2, 4 or 8.
    pub size: u8,
    /// Sign-extend a load to the register width.
    pub sign_extend: bool,
    /// Transfer register (31 means XZR/WZR for this class).
    pub rt: u8,
    /// The register is 64-bit (X) rather than 32-bit (W).
    pub sixty_four: bool,
    /// Load-acquire / store-release semantics.
    pub acquire_release: bool,
}

/// The decoded syndrome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Syndrome {
    /// WFI (or WFE if `wfe`).
    Wfx {
        wfe: bool,
    },
    Hvc {
        imm: u16,
    },
    Smc {
        imm: u16,
    },
    SysReg {
        reg: SysReg,
        rt: u8,
        is_read: bool,
    },
    /// Data abort with a valid instruction syndrome.
    DataAbort(DataAccess),
    /// Data abort without ISV: the VMM cannot tell what the instruction
    /// wanted (e.g. a load pair or a post-indexed access to MMIO).
    DataAbortNoSyndrome {
        is_write: bool,
        dfsc: u8,
    },
    InstructionAbort {
        ifsc: u8,
    },
    Other {
        ec: u32,
        iss: u32,
    },
}

pub const fn exception_class(esr: u64) -> u32 {
    ((esr >> 26) & 0x3f) as u32
}

pub const fn iss(esr: u64) -> u32 {
    (esr & 0x01ff_ffff) as u32
}

/// Decodes an ESR_EL2 value taken from an AArch64 EL1/EL0 guest.
pub fn decode(esr: u64) -> Syndrome {
    let ec = exception_class(esr);
    let iss = iss(esr);
    let bit = |n: u32| (iss >> n) & 1 != 0;
    match ec {
        EC_WFX => Syndrome::Wfx { wfe: iss & 1 != 0 },
        EC_HVC64 => Syndrome::Hvc { imm: iss as u16 },
        EC_SMC64 => Syndrome::Smc { imm: iss as u16 },
        EC_SYSREG => {
            let op0 = (iss >> 20) & 3;
            let op2 = (iss >> 17) & 7;
            let op1 = (iss >> 14) & 7;
            let crn = (iss >> 10) & 15;
            let rt = ((iss >> 5) & 31) as u8;
            let crm = (iss >> 1) & 15;
            Syndrome::SysReg {
                reg: SysReg::new(op0, op1, crn, crm, op2),
                rt,
                is_read: bit(0),
            }
        }
        EC_DABT_LOWER => {
            let is_write = bit(6);
            if !bit(24) {
                return Syndrome::DataAbortNoSyndrome {
                    is_write,
                    dfsc: (iss & 0x3f) as u8,
                };
            }
            Syndrome::DataAbort(DataAccess {
                is_write,
                size: 1 << ((iss >> 22) & 3),
                sign_extend: bit(21),
                rt: ((iss >> 16) & 31) as u8,
                sixty_four: bit(15),
                acquire_release: bit(14),
            })
        }
        EC_IABT_LOWER => Syndrome::InstructionAbort {
            ifsc: (iss & 0x3f) as u8,
        },
        _ => Syndrome::Other { ec, iss },
    }
}

impl DataAccess {
    /// The register value a load of `raw` (zero-extended from memory)
    /// leaves in Rt.
    pub fn load_result(&self, raw: u64) -> u64 {
        let bits = u32::from(self.size) * 8;
        let value = if self.sign_extend && bits < 64 {
            let shift = 64 - bits;
            (((raw << shift) as i64) >> shift) as u64
        } else {
            raw
        };
        if self.sixty_four {
            value
        } else {
            value & 0xffff_ffff
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sysreg::{CNTVCT_EL0, ICC_SGI1R_EL1};

    #[test]
    fn data_aborts() {
        // str w1, [x0] to MMIO: EC=0x24, IL, ISV, SAS=2, SRT=1, WnR, DFSC=6.
        let esr = 0x9380_0046u64 | (1 << 16);
        assert_eq!(
            decode(esr),
            Syndrome::DataAbort(DataAccess {
                is_write: true,
                size: 4,
                sign_extend: false,
                rt: 1,
                sixty_four: false,
                acquire_release: false
            })
        );
        // ldrsh x3, [x2]: SAS=1, SSE, SRT=3, SF, read.
        let esr = (0x24u64 << 26)
            | (1 << 25)
            | (1 << 24)
            | (1 << 22)
            | (1 << 21)
            | (3 << 16)
            | (1 << 15)
            | 0x06;
        let Syndrome::DataAbort(access) = decode(esr) else {
            panic!()
        };
        assert_eq!(access.size, 2);
        assert_eq!(access.load_result(0x8001), 0xffff_ffff_ffff_8001);
        // ldp x0, x1, [x2] gives no syndrome.
        assert_eq!(
            decode(0x9200_0006),
            Syndrome::DataAbortNoSyndrome {
                is_write: false,
                dfsc: 6
            }
        );
    }

    #[test]
    fn sysreg_hvc_wfi() {
        // msr icc_sgi1r_el1, x2 trapped: Op0=3 Op2=5 Op1=0 CRn=12 Rt=2 CRm=11 write.
        let iss = (3 << 20) | (5 << 17) | (12 << 10) | (2 << 5) | (11 << 1);
        let esr = (0x18u64 << 26) | (1 << 25) | iss;
        assert_eq!(
            decode(esr),
            Syndrome::SysReg {
                reg: ICC_SGI1R_EL1,
                rt: 2,
                is_read: false
            }
        );
        // mrs x5, cntvct_el0.
        let iss = (3 << 20) | (2 << 17) | (3 << 14) | (14 << 10) | (5 << 5) | 1;
        assert_eq!(
            decode((0x18u64 << 26) | iss),
            Syndrome::SysReg {
                reg: CNTVCT_EL0,
                rt: 5,
                is_read: true
            }
        );
        assert_eq!(decode(0x5a00_0000), Syndrome::Hvc { imm: 0 });
        assert_eq!(decode(0x5e00_1234), Syndrome::Smc { imm: 0x1234 });
        assert_eq!(decode(0x0600_0000), Syndrome::Wfx { wfe: false });
        assert_eq!(decode(0x0600_0001), Syndrome::Wfx { wfe: true });
        assert_eq!(decode(0xf200_0000), Syndrome::Other { ec: 0x3c, iss: 0 });
    }
}
