//! Exception exits of a hardware-virtualised vCPU, turned into the
//! machine's [`VcpuExit`] and back.
//!
//! Hypervisor.framework stops a vCPU on a trapped guest exception and gives
//! ESR_EL2, FAR_EL2 and the faulting IPA; the vCPU's PC is then ELR_EL2,
//! the preferred return address (the trapping instruction for aborts,
//! system-register traps, WFx and SMC; the instruction after it for HVC).
//! [`translate`] reads the syndrome with the shared decoder
//! ([`arch_arm64::esr::decode`]) and the registers it names, and
//! [`complete`] applies the machine's [`ExitResponse`]: Xt for loads and
//! MRS (sign extension, W-register truncation, XZR), x0 for HVC, PC past
//! the instruction.
//!
//! Nothing here calls the framework: registers come through
//! [`VcpuRegisters`], so the logic runs (and is tested) on any host.

use accel::{AccelError, AccessWidth, CpuSnapshot, ExitResponse, VcpuExit};
use arch_arm64::esr::{self, DataAccess, Syndrome};
use arch_arm64::SysReg;

/// ESR ISS bit: the abort happened on a stage-1 translation table walk.
const ISS_S1PTW: u64 = 1 << 7;
/// ESR ISS bit: the abort came from cache maintenance (DC/IC) by VA.
const ISS_CM: u64 = 1 << 8;
/// ESR ISS bit: FAR is not valid.
const ISS_FNV: u64 = 1 << 10;

/// ESR of an exception with unknown reason (EC 0) from a 32-bit instruction
/// (IL set): what the guest sees for an UNDEFINED instruction.
pub const ESR_UNDEFINED: u64 = 1 << 25;
/// PSTATE on exception entry to EL1: EL1h with D, A, I and F masked.
pub const PSTATE_EL1H_MASKED: u64 = 0x3c5;

pub const SPSR_EL1: SysReg = SysReg::new(3, 0, 4, 0, 0);
pub const ELR_EL1: SysReg = SysReg::new(3, 0, 4, 0, 1);
pub const SP_EL0: SysReg = SysReg::new(3, 0, 4, 1, 0);
pub const SP_EL1: SysReg = SysReg::new(3, 4, 4, 1, 0);
pub const ESR_EL1: SysReg = SysReg::new(3, 0, 5, 2, 0);
pub const FAR_EL1: SysReg = SysReg::new(3, 0, 6, 0, 0);
pub const VBAR_EL1: SysReg = SysReg::new(3, 0, 12, 0, 0);
pub const SCTLR_EL1: SysReg = SysReg::new(3, 0, 1, 0, 0);

/// OS Lock registers. Linux clears the OS Lock at boot; when the framework
/// traps debug-register accesses these arrive here and are answered
/// locally (the machine's handler knows nothing about debug state).
pub const OSLAR_EL1: SysReg = SysReg::new(2, 0, 1, 0, 4);
pub const OSLSR_EL1: SysReg = SysReg::new(2, 0, 1, 1, 4);
pub const OSDLR_EL1: SysReg = SysReg::new(2, 0, 1, 3, 4);
/// OSLSR_EL1.OSLM = 0b10: the OS Lock is implemented.
const OSLSR_OSLM_IMPLEMENTED: u64 = 1 << 3;
const OSLSR_OSLK: u64 = 1 << 1;

/// A vCPU register the exit logic reads or writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reg {
    /// X0..X30 (31 is never passed: it is XZR/WZR for these encodings).
    X(u8),
    Pc,
    /// PSTATE as SPSR_ELx lays it out (the framework's CPSR).
    Pstate,
    Sys(SysReg),
}

/// Access to a stopped vCPU's registers.
pub trait VcpuRegisters {
    fn read(&mut self, reg: Reg) -> Result<u64, AccelError>;
    fn write(&mut self, reg: Reg, value: u64) -> Result<(), AccelError>;
    /// SIMD/FP register V`n` (Q`n`), `n` < 32.
    fn read_simd(&mut self, n: u8) -> Result<u128, AccelError> {
        Err(AccelError::run(format!("no access to SIMD register V{n}")))
    }
    fn write_simd(&mut self, n: u8, value: u128) -> Result<(), AccelError> {
        let _ = value;
        Err(AccelError::run(format!("no access to SIMD register V{n}")))
    }
}

/// vCPU state the exit logic keeps between exits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LocalState {
    /// OSLAR_EL1.OSLK as last written.
    pub os_lock: bool,
}

/// What to finish once the machine has answered an exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pending {
    MmioRead(DataAccess),
    MmioWrite,
    SysRegRead { rt: u8 },
    SysRegWrite,
    Hvc,
}

/// What the vCPU loop does with an exception exit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Trap {
    /// Give `exit` to the machine's handler, then call [`complete`].
    Exit { exit: VcpuExit, pending: Pending },
    /// A load/store on MMIO without syndrome: emulate the instruction at PC
    /// ([`crate::emulate::without_syndrome`]). `far` is the faulting VA
    /// when the syndrome says it is valid.
    Emulate { far: Option<u64>, ipa: u64 },
    /// WFI (PC already past it): wait for an interrupt or the vtimer.
    WaitForInterrupt,
    /// Fully handled here (WFE, SMC, OS Lock, cache maintenance on MMIO);
    /// just run again.
    Handled,
    /// The guest cannot continue; the string says why.
    Crash(String),
}

/// How the vCPU goes on after [`complete`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Completion {
    Continue,
    /// PSCI CPU_OFF: stop running this vCPU.
    CpuOff,
    /// PSCI CPU_SUSPEND (x0 already 0): wait as for WFI.
    Suspend,
}

fn read_xt(regs: &mut impl VcpuRegisters, rt: u8) -> Result<u64, AccelError> {
    if rt >= 31 {
        Ok(0)
    } else {
        regs.read(Reg::X(rt))
    }
}

fn write_xt(regs: &mut impl VcpuRegisters, rt: u8, value: u64) -> Result<(), AccelError> {
    if rt >= 31 {
        Ok(())
    } else {
        regs.write(Reg::X(rt), value)
    }
}

/// Moves PC past the trapping (always 32-bit) instruction.
pub fn skip_instruction(regs: &mut impl VcpuRegisters) -> Result<(), AccelError> {
    let pc = regs.read(Reg::Pc)?;
    regs.write(Reg::Pc, pc.wrapping_add(4))
}

/// Offset of the synchronous-exception vector an exception taken to EL1
/// from `pstate` uses.
pub fn sync_vector_offset(pstate: u64) -> u64 {
    if pstate & 0x10 != 0 {
        // Lower EL in AArch32 (never the case for a vmapple guest).
        return 0x600;
    }
    match (pstate >> 2) & 3 {
        0 => 0x400,
        _ if pstate & 1 != 0 => 0x200,
        _ => 0x000,
    }
}

/// Makes the guest take an Undefined Instruction exception at PC, as the
/// CPU would for an instruction it does not implement.
pub fn inject_undefined(regs: &mut impl VcpuRegisters) -> Result<(), AccelError> {
    let pc = regs.read(Reg::Pc)?;
    let pstate = regs.read(Reg::Pstate)?;
    let vbar = regs.read(Reg::Sys(VBAR_EL1))?;
    regs.write(Reg::Sys(ELR_EL1), pc)?;
    regs.write(Reg::Sys(SPSR_EL1), pstate)?;
    regs.write(Reg::Sys(ESR_EL1), ESR_UNDEFINED)?;
    regs.write(Reg::Pstate, PSTATE_EL1H_MASKED)?;
    regs.write(Reg::Pc, vbar.wrapping_add(sync_vector_offset(pstate)))
}

/// Decodes an exception exit. `ipa` is the faulting guest-physical address
/// (meaningful for data aborts), `far` the faulting virtual address (for
/// reports only).
pub fn translate(
    esr: u64,
    far: u64,
    ipa: u64,
    regs: &mut impl VcpuRegisters,
    local: &mut LocalState,
) -> Result<Trap, AccelError> {
    match esr::decode(esr) {
        Syndrome::DataAbort(access) => {
            if esr & ISS_S1PTW != 0 {
                return crash(
                    regs,
                    format!("page-table walk at {ipa:#x} (va {far:#x}) is not in RAM"),
                );
            }
            let Some(width) = AccessWidth::from_bytes(u64::from(access.size)) else {
                return crash(regs, format!("data abort of size {}", access.size));
            };
            if access.is_write {
                let value = read_xt(regs, access.rt)? & width.mask();
                Ok(Trap::Exit {
                    exit: VcpuExit::MmioWrite {
                        addr: ipa,
                        width,
                        value,
                    },
                    pending: Pending::MmioWrite,
                })
            } else {
                Ok(Trap::Exit {
                    exit: VcpuExit::MmioRead { addr: ipa, width },
                    pending: Pending::MmioRead(access),
                })
            }
        }
        Syndrome::DataAbortNoSyndrome { is_write, dfsc } => {
            if esr & ISS_CM != 0 {
                // DC/IC by VA on device memory: nothing to maintain.
                skip_instruction(regs)?;
                return Ok(Trap::Handled);
            }
            if esr & ISS_S1PTW != 0 {
                return crash(
                    regs,
                    format!("page-table walk at {ipa:#x} (va {far:#x}) is not in RAM"),
                );
            }
            // Only translation faults are MMIO: anything else (permission,
            // alignment, external abort) has no emulation.
            if dfsc & 0x3c != 0x04 {
                let kind = if is_write { "store" } else { "load" };
                return crash(
                    regs,
                    format!("{kind} at {ipa:#x} (va {far:#x}) aborted with DFSC {dfsc:#x}"),
                );
            }
            Ok(Trap::Emulate {
                far: (esr & ISS_FNV == 0).then_some(far),
                ipa,
            })
        }
        Syndrome::SysReg { reg, rt, is_read } => {
            if let Some(trap) = local_sysreg(reg, rt, is_read, regs, local)? {
                return Ok(trap);
            }
            if is_read {
                Ok(Trap::Exit {
                    exit: VcpuExit::SysRegRead { reg },
                    pending: Pending::SysRegRead { rt },
                })
            } else {
                let value = read_xt(regs, rt)?;
                Ok(Trap::Exit {
                    exit: VcpuExit::SysRegWrite { reg, value },
                    pending: Pending::SysRegWrite,
                })
            }
        }
        Syndrome::Hvc { imm } => {
            let mut args = [0u64; 4];
            for (n, arg) in (0u8..).zip(args.iter_mut()) {
                *arg = regs.read(Reg::X(n))?;
            }
            Ok(Trap::Exit {
                exit: VcpuExit::Hvc { imm, args },
                pending: Pending::Hvc,
            })
        }
        Syndrome::Smc { .. } => {
            // The PSCI conduit is HVC; SMC is UNDEFINED (vmapple-machine.md §4).
            inject_undefined(regs)?;
            Ok(Trap::Handled)
        }
        Syndrome::Wfx { wfe } => {
            skip_instruction(regs)?;
            // WFE waits for an event another vCPU's SEV sends; running on
            // at once is always allowed (a spurious wake-up).
            Ok(if wfe {
                Trap::Handled
            } else {
                Trap::WaitForInterrupt
            })
        }
        Syndrome::InstructionAbort { ifsc } => crash(
            regs,
            format!("instruction fetch at {ipa:#x} (va {far:#x}) outside RAM, IFSC {ifsc:#x}"),
        ),
        Syndrome::Other { ec, iss } => crash(
            regs,
            format!("unexpected exception class {ec:#x} (ISS {iss:#x}), FAR {far:#x}"),
        ),
    }
}

fn crash(regs: &mut impl VcpuRegisters, what: String) -> Result<Trap, AccelError> {
    let pc = regs.read(Reg::Pc)?;
    Ok(Trap::Crash(format!("{what} at pc {pc:#x}")))
}

/// Registers answered without the machine.
fn local_sysreg(
    reg: SysReg,
    rt: u8,
    is_read: bool,
    regs: &mut impl VcpuRegisters,
    local: &mut LocalState,
) -> Result<Option<Trap>, AccelError> {
    match (reg, is_read) {
        (r, false) if r == OSLAR_EL1 => {
            local.os_lock = read_xt(regs, rt)? & 1 != 0;
        }
        (r, true) if r == OSLSR_EL1 => {
            let lock = if local.os_lock { OSLSR_OSLK } else { 0 };
            write_xt(regs, rt, OSLSR_OSLM_IMPLEMENTED | lock)?;
        }
        // The OS Double Lock only matters with a powered-down debug
        // domain, which a VM does not have: reads 0, writes are ignored.
        (r, true) if r == OSDLR_EL1 => write_xt(regs, rt, 0)?,
        (r, false) if r == OSDLR_EL1 => {}
        _ => return Ok(None),
    }
    skip_instruction(regs)?;
    Ok(Some(Trap::Handled))
}

/// Applies the machine's answer to an exit from [`translate`].
pub fn complete(
    pending: Pending,
    response: ExitResponse,
    regs: &mut impl VcpuRegisters,
) -> Result<Completion, AccelError> {
    match response {
        ExitResponse::CpuOff => return Ok(Completion::CpuOff),
        ExitResponse::Suspend => {
            if pending == Pending::Hvc {
                regs.write(Reg::X(0), 0)?;
            } else {
                skip_instruction(regs)?;
            }
            return Ok(Completion::Suspend);
        }
        ExitResponse::Undefined => {
            if pending == Pending::Hvc {
                // As the software CPU does: an unknown SMCCC call's -1.
                regs.write(Reg::X(0), u64::MAX)?;
            } else {
                inject_undefined(regs)?;
            }
            return Ok(Completion::Continue);
        }
        ExitResponse::Registers(writes) => {
            for (n, value) in (0u8..).zip(writes.x) {
                if let Some(v) = value {
                    regs.write(Reg::X(n), v)?;
                }
            }
            for (reg, value) in writes.system_registers() {
                regs.write(Reg::Sys(reg), value)?;
            }
            if pending != Pending::Hvc {
                skip_instruction(regs)?;
            }
            return Ok(Completion::Continue);
        }
        ExitResponse::Done | ExitResponse::Value(_) => {}
    }
    let value = match response {
        ExitResponse::Value(v) => Some(v),
        _ => None,
    };
    match pending {
        Pending::MmioRead(access) => {
            let raw = value.unwrap_or(0) & width_mask(access.size);
            write_xt(regs, access.rt, access.load_result(raw))?;
            skip_instruction(regs)?;
        }
        Pending::SysRegRead { rt } => {
            write_xt(regs, rt, value.unwrap_or(0))?;
            skip_instruction(regs)?;
        }
        Pending::MmioWrite | Pending::SysRegWrite => skip_instruction(regs)?,
        // HVC's PC is already past the instruction.
        Pending::Hvc => {
            if let Some(x0) = value {
                regs.write(Reg::X(0), x0)?;
            }
        }
    }
    Ok(Completion::Continue)
}

fn width_mask(size: u8) -> u64 {
    AccessWidth::from_bytes(u64::from(size)).map_or(u64::MAX, AccessWidth::mask)
}

/// The registers a crash report shows.
pub fn capture(regs: &mut impl VcpuRegisters) -> Result<CpuSnapshot, AccelError> {
    let mut snap = CpuSnapshot {
        pc: regs.read(Reg::Pc)?,
        pstate: regs.read(Reg::Pstate)?,
        sp_el0: regs.read(Reg::Sys(SP_EL0))?,
        sp_el1: regs.read(Reg::Sys(SP_EL1))?,
        elr_el1: regs.read(Reg::Sys(ELR_EL1))?,
        esr_el1: regs.read(Reg::Sys(ESR_EL1))?,
        far_el1: regs.read(Reg::Sys(FAR_EL1))?,
        vbar_el1: regs.read(Reg::Sys(VBAR_EL1))?,
        sctlr_el1: regs.read(Reg::Sys(SCTLR_EL1))?,
        ..Default::default()
    };
    for (n, x) in (0u8..).zip(snap.x.iter_mut()) {
        *x = regs.read(Reg::X(n))?;
    }
    Ok(snap)
}

#[cfg(test)]
pub(crate) mod tests_support {
    use super::*;
    use std::collections::HashMap;

    /// A register file that remembers every write.
    #[derive(Default)]
    pub struct FakeRegs {
        pub x: [u64; 31],
        pub v: [u128; 32],
        pub pc: u64,
        pub pstate: u64,
        pub sys: HashMap<SysReg, u64>,
    }

    impl VcpuRegisters for FakeRegs {
        fn read(&mut self, reg: Reg) -> Result<u64, AccelError> {
            Ok(match reg {
                Reg::X(n) => self.x[usize::from(n)],
                Reg::Pc => self.pc,
                Reg::Pstate => self.pstate,
                Reg::Sys(r) => self.sys.get(&r).copied().unwrap_or(0),
            })
        }
        fn write(&mut self, reg: Reg, value: u64) -> Result<(), AccelError> {
            match reg {
                Reg::X(n) => self.x[usize::from(n)] = value,
                Reg::Pc => self.pc = value,
                Reg::Pstate => self.pstate = value,
                Reg::Sys(r) => {
                    self.sys.insert(r, value);
                }
            }
            Ok(())
        }
        fn read_simd(&mut self, n: u8) -> Result<u128, AccelError> {
            Ok(self.v[usize::from(n & 31)])
        }
        fn write_simd(&mut self, n: u8, value: u128) -> Result<(), AccelError> {
            self.v[usize::from(n & 31)] = value;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::FakeRegs;
    use super::*;
    use arch_arm64::sysreg::{CNTV_CTL_EL0, ICC_EOIR1_EL1, ICC_IAR1_EL1, ICC_SGI1R_EL1};

    const PC: u64 = 0x7000_1000;
    const MMIO: u64 = 0x2001_0018;

    fn regs() -> FakeRegs {
        let mut r = FakeRegs {
            pc: PC,
            pstate: 0x3c5,
            ..Default::default()
        };
        for (i, x) in r.x.iter_mut().enumerate() {
            *x = 0x1111_1111_1111_1111 * (i as u64 % 15 + 1);
        }
        r
    }

    /// ESR_EL2 of a data abort with a valid syndrome from a lower EL:
    /// EC 0x24, IL, ISV, SAS, SSE, SRT, SF, WnR, DFSC = level-2 translation
    /// fault (what a stage-2 miss on MMIO reports).
    fn dabt(sas: u64, sse: bool, srt: u64, sf: bool, write: bool) -> u64 {
        (0x24 << 26)
            | (1 << 25)
            | (1 << 24)
            | (sas << 22)
            | (u64::from(sse) << 21)
            | (srt << 16)
            | (u64::from(sf) << 15)
            | (u64::from(write) << 6)
            | 0x06
    }

    /// ESR_EL2 of a trapped MSR/MRS (EC 0x18).
    fn sysreg_esr(reg: SysReg, rt: u64, read: bool) -> u64 {
        let iss = (u64::from(reg.op0()) << 20)
            | (u64::from(reg.op2()) << 17)
            | (u64::from(reg.op1()) << 14)
            | (u64::from(reg.crn()) << 10)
            | (rt << 5)
            | (u64::from(reg.crm()) << 1)
            | u64::from(read);
        (0x18 << 26) | (1 << 25) | iss
    }

    /// Runs one exit through translate → handler answer → complete.
    fn roundtrip(
        esr: u64,
        regs: &mut FakeRegs,
        answer: ExitResponse,
    ) -> (Option<VcpuExit>, Completion) {
        let mut local = LocalState::default();
        match translate(esr, 0xffff_0000_0000_1234, MMIO, regs, &mut local).unwrap() {
            Trap::Exit { exit, pending } => (Some(exit), complete(pending, answer, regs).unwrap()),
            other => panic!("not an exit: {other:?}"),
        }
    }

    #[test]
    fn mmio_loads_of_every_width_fill_the_register() {
        // (SAS, SSE, SF, loaded value, expected Xt)
        let cases = [
            (0, false, false, 0xab, 0xab),                       // ldrb w
            (0, true, true, 0x80, 0xffff_ffff_ffff_ff80),        // ldrsb x
            (0, true, false, 0x80, 0xffff_ff80),                 // ldrsb w
            (1, false, false, 0x1234, 0x1234),                   // ldrh w
            (1, true, true, 0x8001, 0xffff_ffff_ffff_8001),      // ldrsh x
            (2, false, false, 0xdead_beef, 0xdead_beef),         // ldr w
            (2, true, true, 0x8000_0000, 0xffff_ffff_8000_0000), // ldrsw
            (3, false, true, 0x0123_4567_89ab_cdef, 0x0123_4567_89ab_cdef), // ldr x
        ];
        for (sas, sse, sf, loaded, want) in cases {
            let mut r = regs();
            let (exit, done) = roundtrip(
                dabt(sas, sse, 5, sf, false),
                &mut r,
                ExitResponse::Value(loaded),
            );
            let width = AccessWidth::from_bytes(1 << sas).unwrap();
            assert_eq!(exit, Some(VcpuExit::MmioRead { addr: MMIO, width }));
            assert_eq!(done, Completion::Continue);
            assert_eq!(r.x[5], want, "SAS {sas} SSE {sse} SF {sf}");
            assert_eq!(r.pc, PC + 4);
        }
    }

    #[test]
    fn device_bits_above_the_access_width_do_not_leak_into_the_register() {
        let mut r = regs();
        roundtrip(
            dabt(0, false, 2, false, false),
            &mut r,
            ExitResponse::Value(0xffff_ff42),
        );
        assert_eq!(r.x[2], 0x42);
    }

    #[test]
    fn mmio_stores_take_the_low_bytes_of_the_register() {
        for sas in 0..4u64 {
            let mut r = regs();
            r.x[7] = 0x8877_6655_4433_2211;
            let (exit, done) = roundtrip(
                dabt(sas, false, 7, sas == 3, true),
                &mut r,
                ExitResponse::Done,
            );
            let width = AccessWidth::from_bytes(1 << sas).unwrap();
            assert_eq!(
                exit,
                Some(VcpuExit::MmioWrite {
                    addr: MMIO,
                    width,
                    value: 0x8877_6655_4433_2211 & width.mask()
                })
            );
            assert_eq!(done, Completion::Continue);
            assert_eq!(r.pc, PC + 4);
            assert_eq!(r.x[7], 0x8877_6655_4433_2211, "stores leave Xt alone");
        }
    }

    #[test]
    fn register_31_is_the_zero_register() {
        // str wzr, [x0]
        let mut r = regs();
        let before = r.x;
        let (exit, _) = roundtrip(dabt(2, false, 31, false, true), &mut r, ExitResponse::Done);
        assert_eq!(
            exit,
            Some(VcpuExit::MmioWrite {
                addr: MMIO,
                width: AccessWidth::Word,
                value: 0
            })
        );
        // ldr wzr, [x0]: the value is discarded, nothing else changes.
        roundtrip(
            dabt(2, false, 31, false, false),
            &mut r,
            ExitResponse::Value(7),
        );
        assert_eq!(r.x, before);
        assert_eq!(r.pc, PC + 8);
        // msr icc_eoir1_el1, xzr
        let (exit, _) = roundtrip(
            sysreg_esr(ICC_EOIR1_EL1, 31, false),
            &mut r,
            ExitResponse::Done,
        );
        assert_eq!(
            exit,
            Some(VcpuExit::SysRegWrite {
                reg: ICC_EOIR1_EL1,
                value: 0
            })
        );
        assert_eq!(r.x, before);
    }

    #[test]
    fn gic_and_timer_sysreg_traps() {
        // mrs x3, icc_iar1_el1 → the INTID lands in x3.
        let mut r = regs();
        let (exit, _) = roundtrip(
            sysreg_esr(ICC_IAR1_EL1, 3, true),
            &mut r,
            ExitResponse::Value(27),
        );
        assert_eq!(exit, Some(VcpuExit::SysRegRead { reg: ICC_IAR1_EL1 }));
        assert_eq!((r.x[3], r.pc), (27, PC + 4));

        // msr icc_eoir1_el1, x4
        r.x[4] = 27;
        let (exit, _) = roundtrip(
            sysreg_esr(ICC_EOIR1_EL1, 4, false),
            &mut r,
            ExitResponse::Done,
        );
        assert_eq!(
            exit,
            Some(VcpuExit::SysRegWrite {
                reg: ICC_EOIR1_EL1,
                value: 27
            })
        );
        assert_eq!(r.pc, PC + 8);

        // msr icc_sgi1r_el1, x1 (SGI 1 to CPU 1)
        r.x[1] = (1 << 24) | 0b10;
        let (exit, _) = roundtrip(
            sysreg_esr(ICC_SGI1R_EL1, 1, false),
            &mut r,
            ExitResponse::Done,
        );
        assert_eq!(
            exit,
            Some(VcpuExit::SysRegWrite {
                reg: ICC_SGI1R_EL1,
                value: (1 << 24) | 0b10
            })
        );

        // mrs x0, cntv_ctl_el0 (trapped only if the framework chose to):
        // it reaches the machine like any other register.
        let (exit, _) = roundtrip(
            sysreg_esr(CNTV_CTL_EL0, 0, true),
            &mut r,
            ExitResponse::Value(5),
        );
        assert_eq!(exit, Some(VcpuExit::SysRegRead { reg: CNTV_CTL_EL0 }));
        assert_eq!(r.x[0], 5);
    }

    #[test]
    fn an_undefined_register_raises_an_exception_at_the_instruction() {
        let mut r = regs();
        r.pstate = 0x3c5; // EL1h
        r.sys.insert(VBAR_EL1, 0x7010_0000);
        let (_, done) = roundtrip(
            sysreg_esr(CNTV_CTL_EL0, 2, false),
            &mut r,
            ExitResponse::Undefined,
        );
        assert_eq!(done, Completion::Continue);
        assert_eq!(r.pc, 0x7010_0200, "current EL with SP_ELx, synchronous");
        assert_eq!(r.sys[&ELR_EL1], PC, "return address is the MSR itself");
        assert_eq!(r.sys[&ESR_EL1], ESR_UNDEFINED);
        assert_eq!(r.sys[&SPSR_EL1], 0x3c5);
        assert_eq!(r.pstate, PSTATE_EL1H_MASKED);

        // From EL0 the lower-EL vector is used.
        assert_eq!(sync_vector_offset(0x0), 0x400);
        assert_eq!(sync_vector_offset(0x4), 0x000, "EL1t");
    }

    #[test]
    fn hvc_passes_x0_to_x3_and_returns_in_x0() {
        let mut r = regs();
        r.x[..4].copy_from_slice(&[0xc400_0003, 1, 0x7008_0000, 42]);
        // hvc #0: EC 0x16, IL, imm 0. PC is already past it.
        let (exit, done) = roundtrip(0x5a00_0000, &mut r, ExitResponse::Value(0));
        assert_eq!(
            exit,
            Some(VcpuExit::Hvc {
                imm: 0,
                args: [0xc400_0003, 1, 0x7008_0000, 42]
            })
        );
        assert_eq!(done, Completion::Continue);
        assert_eq!((r.x[0], r.x[1], r.pc), (0, 1, PC));

        let mut r = regs();
        assert_eq!(
            roundtrip(0x5a00_0000, &mut r, ExitResponse::Undefined).1,
            Completion::Continue
        );
        assert_eq!(r.x[0], u64::MAX, "unknown SMCCC call returns -1");

        let mut r = regs();
        assert_eq!(
            roundtrip(0x5a00_0000, &mut r, ExitResponse::Suspend).1,
            Completion::Suspend
        );
        assert_eq!(r.x[0], 0);

        let mut r = regs();
        let x0 = r.x[0];
        assert_eq!(
            roundtrip(0x5a00_0000, &mut r, ExitResponse::CpuOff).1,
            Completion::CpuOff
        );
        assert_eq!((r.x[0], r.pc), (x0, PC));
    }

    #[test]
    fn wfi_waits_and_wfe_runs_on() {
        let mut local = LocalState::default();
        let mut r = regs();
        assert_eq!(
            translate(0x0600_0000, 0, 0, &mut r, &mut local).unwrap(),
            Trap::WaitForInterrupt
        );
        assert_eq!(r.pc, PC + 4);
        assert_eq!(
            translate(0x0600_0001, 0, 0, &mut r, &mut local).unwrap(),
            Trap::Handled
        );
        assert_eq!(r.pc, PC + 8);
    }

    #[test]
    fn smc_is_undefined() {
        let mut local = LocalState::default();
        let mut r = regs();
        r.sys.insert(VBAR_EL1, 0x8000);
        assert_eq!(
            translate(0x5e00_0000, 0, 0, &mut r, &mut local).unwrap(),
            Trap::Handled
        );
        assert_eq!(r.pc, 0x8200);
        assert_eq!(r.sys[&ELR_EL1], PC);
    }

    #[test]
    fn aborts_without_syndrome_are_emulated_unless_they_are_not_mmio() {
        let mut local = LocalState::default();
        let mut r = regs();
        // ldp x0, x1, [x2] into MMIO: EC 0x24, IL, no ISV, DFSC 6.
        assert_eq!(
            translate(0x9200_0006, 0xffff_8000_1000, MMIO, &mut r, &mut local).unwrap(),
            Trap::Emulate {
                far: Some(0xffff_8000_1000),
                ipa: MMIO
            }
        );
        // FnV: FAR is not valid, the emulation must walk.
        assert_eq!(
            translate(0x9200_0406, 0xffff_8000_1000, MMIO, &mut r, &mut local).unwrap(),
            Trap::Emulate {
                far: None,
                ipa: MMIO
            }
        );
        // A permission fault (DFSC 0x0f) is no MMIO access.
        let Trap::Crash(report) =
            translate(0x9200_000f, 0xffff_8000_1000, MMIO, &mut r, &mut local).unwrap()
        else {
            panic!("expected a crash");
        };
        assert!(
            report.contains("0x20010018") && report.contains("pc 0x70001000"),
            "{report}"
        );
        assert_eq!(r.pc, PC, "nothing was executed");
        // Instruction fetch from MMIO (EC 0x20).
        assert!(matches!(
            translate(0x8200_000f, 0, MMIO, &mut r, &mut local).unwrap(),
            Trap::Crash(_)
        ));
        // A stage-1 walk into MMIO, even with ISV.
        assert!(matches!(
            translate(
                dabt(3, false, 0, true, false) | ISS_S1PTW,
                0,
                MMIO,
                &mut r,
                &mut local
            )
            .unwrap(),
            Trap::Crash(_)
        ));
        // dc civac on MMIO: CM set, no ISV: skipped.
        assert_eq!(
            translate(0x9200_0146, 0, MMIO, &mut r, &mut local).unwrap(),
            Trap::Handled
        );
        assert_eq!(r.pc, PC + 4);
    }

    #[test]
    fn snapshot_reads_the_register_file() {
        let mut r = regs();
        r.sys.insert(ESR_EL1, 0x9600_0045);
        r.sys.insert(SP_EL1, 0xffff_8000_0001_0000);
        let snap = capture(&mut r).unwrap();
        assert_eq!((snap.pc, snap.pstate), (PC, 0x3c5));
        assert_eq!(snap.x, r.x);
        assert_eq!(
            (snap.esr_el1, snap.sp_el1),
            (0x9600_0045, 0xffff_8000_0001_0000)
        );
    }

    #[test]
    fn os_lock_is_answered_locally() {
        let mut local = LocalState::default();
        let mut r = regs();
        r.x[0] = 1;
        let esr = sysreg_esr(OSLAR_EL1, 0, false);
        assert_eq!(
            translate(esr, 0, 0, &mut r, &mut local).unwrap(),
            Trap::Handled
        );
        let esr = sysreg_esr(OSLSR_EL1, 6, true);
        assert_eq!(
            translate(esr, 0, 0, &mut r, &mut local).unwrap(),
            Trap::Handled
        );
        assert_eq!(r.x[6], OSLSR_OSLM_IMPLEMENTED | OSLSR_OSLK);
        r.x[0] = 0;
        translate(sysreg_esr(OSLAR_EL1, 0, false), 0, 0, &mut r, &mut local).unwrap();
        translate(sysreg_esr(OSLSR_EL1, 6, true), 0, 0, &mut r, &mut local).unwrap();
        assert_eq!(r.x[6], OSLSR_OSLM_IMPLEMENTED);
        assert_eq!(r.pc, PC + 16);
    }
}
