//! Data aborts on MMIO that come without an instruction syndrome.
//!
//! The framework reports ISV = 0 for pairs, writeback forms, register
//! offsets and SIMD/FP transfers; macOS 13+ kernels use them on device
//! memory. The instruction is read at the guest's PC (through its stage-1
//! tables when its MMU is on, every read checked against guest RAM),
//! decoded and performed by the shared [`arch_arm64::loadstore`] code:
//! each access goes to the machine (or to RAM, for the half of a pair
//! that lies there), then writeback, loaded registers and PC move as the
//! CPU would have moved them. Anything else ends the guest with a report
//! naming PC and the instruction word.

use accel::{AccelError, AccessWidth, ExitResponse, VcpuExit};
use arch_arm64::loadstore::{self, LoadStoreCpu};
use arch_arm64::stage1::{self, Stage1Regs};
use arch_arm64::SysReg;
use vm_core::GuestRam;

use crate::exits::{skip_instruction, Reg, VcpuRegisters, SCTLR_EL1, SP_EL0, SP_EL1};

pub const TTBR0_EL1: SysReg = SysReg::new(3, 0, 2, 0, 0);
pub const TTBR1_EL1: SysReg = SysReg::new(3, 0, 2, 0, 1);
pub const TCR_EL1: SysReg = SysReg::new(3, 0, 2, 0, 2);

/// Granule the fault's IPA is known to share with its VA: the smallest
/// one, so that it holds whatever the guest uses.
const PAGE_SHIFT: u32 = 12;

/// Why the emulation stopped.
enum Stop {
    Host(AccelError),
    /// The guest cannot go on; the string says why.
    Guest(String),
}

impl From<AccelError> for Stop {
    fn from(e: AccelError) -> Self {
        Stop::Host(e)
    }
}

fn read_u64(memory: &GuestRam, pa: u64) -> Option<u64> {
    let mut bytes = [0u8; 8];
    vm_core::memory::read_exact(memory, pa, &mut bytes).ok()?;
    Some(u64::from_le_bytes(bytes))
}

struct Emulation<'a, R> {
    regs: &'a mut R,
    memory: &'a GuestRam,
    mmio: &'a mut dyn FnMut(VcpuExit) -> ExitResponse,
    stage1: Stage1Regs,
    /// The faulting VA and IPA, when the syndrome says FAR is valid.
    fault: Option<(u64, u64)>,
    pstate: u64,
}

impl<R: VcpuRegisters> Emulation<'_, R> {
    /// The IPA of `va`: from the fault's own IPA when on its page, else by
    /// walking the guest's tables.
    fn ipa_of(&self, va: u64) -> Result<u64, Stop> {
        if let Some((far, ipa)) = self.fault {
            if va >> PAGE_SHIFT == far >> PAGE_SHIFT {
                return Ok(ipa.wrapping_add(va.wrapping_sub(far)));
            }
        }
        stage1::translate(va, &self.stage1, |pa| read_u64(self.memory, pa))
            .map_err(|e| Stop::Guest(format!("data address {va:#x} does not translate: {e}")))
    }

    fn sp_reg(&self) -> Reg {
        // EL0, or EL1 with SPSel = 0, uses SP_EL0.
        if (self.pstate >> 2) & 3 != 0 && self.pstate & 1 != 0 {
            Reg::Sys(SP_EL1)
        } else {
            Reg::Sys(SP_EL0)
        }
    }
}

impl<R: VcpuRegisters> LoadStoreCpu for Emulation<'_, R> {
    type Error = Stop;

    fn x(&mut self, n: u8) -> Result<u64, Stop> {
        Ok(self.regs.read(Reg::X(n))?)
    }
    fn set_x(&mut self, n: u8, value: u64) -> Result<(), Stop> {
        Ok(self.regs.write(Reg::X(n), value)?)
    }
    fn sp(&mut self) -> Result<u64, Stop> {
        let reg = self.sp_reg();
        Ok(self.regs.read(reg)?)
    }
    fn set_sp(&mut self, value: u64) -> Result<(), Stop> {
        let reg = self.sp_reg();
        Ok(self.regs.write(reg, value)?)
    }
    fn v(&mut self, n: u8) -> Result<u128, Stop> {
        Ok(self.regs.read_simd(n)?)
    }
    fn set_v(&mut self, n: u8, value: u128) -> Result<(), Stop> {
        Ok(self.regs.write_simd(n, value)?)
    }

    fn read(&mut self, va: u64, size: u8) -> Result<u64, Stop> {
        let addr = self.ipa_of(va)?;
        let width = width(size);
        if vm_core::memory::range_is_ram(self.memory, addr, u64::from(size)) {
            let mut bytes = [0u8; 8];
            let part = &mut bytes[..usize::from(size)];
            vm_core::memory::read_exact(self.memory, addr, part)
                .map_err(|e| Stop::Guest(format!("load from RAM at {addr:#x}: {e}")))?;
            return Ok(u64::from_le_bytes(bytes));
        }
        Ok(match (self.mmio)(VcpuExit::MmioRead { addr, width }) {
            ExitResponse::Value(v) => v & width.mask(),
            _ => 0,
        })
    }

    fn write(&mut self, va: u64, size: u8, value: u64) -> Result<(), Stop> {
        let addr = self.ipa_of(va)?;
        let width = width(size);
        let value = value & width.mask();
        if vm_core::memory::range_is_ram(self.memory, addr, u64::from(size)) {
            let bytes = value.to_le_bytes();
            return vm_core::memory::write_all(self.memory, addr, &bytes[..usize::from(size)])
                .map_err(|e| Stop::Guest(format!("store to RAM at {addr:#x}: {e}")));
        }
        (self.mmio)(VcpuExit::MmioWrite { addr, width, value });
        Ok(())
    }
}

fn width(size: u8) -> AccessWidth {
    // The executor splits every access into 1, 2, 4 or 8 bytes.
    AccessWidth::from_bytes(u64::from(size)).unwrap_or(AccessWidth::Double)
}

/// Emulates the load/store at PC that aborted at `ipa` without a syndrome.
/// `far` is the faulting VA when the syndrome says it is valid. `mmio`
/// performs one device access (the machine's exit handler). Returns
/// `Some(report)` when the guest cannot go on.
pub fn without_syndrome(
    far: Option<u64>,
    ipa: u64,
    regs: &mut impl VcpuRegisters,
    memory: &GuestRam,
    mmio: &mut dyn FnMut(VcpuExit) -> ExitResponse,
) -> Result<Option<String>, AccelError> {
    let pc = regs.read(Reg::Pc)?;
    let pstate = regs.read(Reg::Pstate)?;
    let stage1 = Stage1Regs {
        sctlr: regs.read(Reg::Sys(SCTLR_EL1))?,
        tcr: regs.read(Reg::Sys(TCR_EL1))?,
        ttbr0: regs.read(Reg::Sys(TTBR0_EL1))?,
        ttbr1: regs.read(Reg::Sys(TTBR1_EL1))?,
    };
    let pc_pa = match stage1::translate(pc, &stage1, |pa| read_u64(memory, pa)) {
        Ok(pa) => pa,
        Err(e) => {
            return Ok(Some(format!(
                "load/store without syndrome at {ipa:#x}: pc {pc:#x} does not translate: {e}"
            )))
        }
    };
    let mut word = [0u8; 4];
    if vm_core::memory::read_exact(memory, pc_pa, &mut word).is_err() {
        return Ok(Some(format!(
            "load/store without syndrome at {ipa:#x}: its instruction at pc {pc:#x} \
             (pa {pc_pa:#x}) is not in RAM"
        )));
    }
    let word = u32::from_le_bytes(word);
    let Some(insn) = loadstore::decode(word) else {
        return Ok(Some(format!(
            "access at {ipa:#x} without syndrome by instruction {word:#010x} at pc {pc:#x}, \
             which vmapple cannot emulate"
        )));
    };
    tracing::trace!("emulating {word:#010x} at pc {pc:#x} for an abort at {ipa:#x}: {insn:?}");
    let mut emulation = Emulation {
        regs,
        memory,
        mmio,
        stage1,
        fault: far.map(|f| (f, ipa)),
        pstate,
    };
    match loadstore::execute(&insn, &mut emulation) {
        Ok(()) => {}
        Err(Stop::Host(e)) => return Err(e),
        Err(Stop::Guest(why)) => {
            return Ok(Some(format!(
                "instruction {word:#010x} at pc {pc:#x}: {why}"
            )))
        }
    }
    skip_instruction(regs)?;
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exits::tests_support::FakeRegs;

    fn ram() -> GuestRam {
        vm_core::memory::create_guest_memory(&[(0x7000_0000, 0x10_0000)]).unwrap()
    }

    fn put(memory: &GuestRam, addr: u64, word: u32) {
        vm_core::memory::write_all(memory, addr, &word.to_le_bytes()).unwrap();
    }

    #[test]
    fn pre_index_store_to_mmio_goes_to_the_machine_and_writes_back() {
        let memory = ram();
        put(&memory, 0x7000_0100, 0xb808_0d09); // str w9, [x8, #128]!
        let mut regs = FakeRegs {
            pc: 0x7000_0100,
            pstate: 0x3c5,
            ..Default::default()
        };
        regs.x[8] = 0x1008_0000;
        regs.x[9] = 0xffff_ffff_0000_0042;
        let mut seen = Vec::new();
        let report = without_syndrome(
            Some(0x1008_0080),
            0x1008_0080,
            &mut regs,
            &memory,
            &mut |exit| {
                seen.push(exit);
                ExitResponse::Done
            },
        )
        .unwrap();
        assert_eq!(report, None);
        assert_eq!(
            seen,
            [VcpuExit::MmioWrite {
                addr: 0x1008_0080,
                width: AccessWidth::Word,
                value: 0x42
            }]
        );
        assert_eq!(regs.x[8], 0x1008_0080);
        assert_eq!(regs.pc, 0x7000_0104);
    }

    #[test]
    fn load_pair_reads_both_registers_through_the_machine() {
        let memory = ram();
        put(&memory, 0x7000_0000, 0xa940_0440); // ldp x0, x1, [x2]
        let mut regs = FakeRegs {
            pc: 0x7000_0000,
            ..Default::default()
        };
        regs.x[2] = 0x2000_0000;
        let report = without_syndrome(
            Some(0x2000_0000),
            0x2000_0000,
            &mut regs,
            &memory,
            &mut |exit| match exit {
                VcpuExit::MmioRead { addr, .. } => ExitResponse::Value(addr + 1),
                _ => ExitResponse::Done,
            },
        )
        .unwrap();
        assert_eq!(report, None);
        assert_eq!((regs.x[0], regs.x[1]), (0x2000_0001, 0x2000_0009));
        assert_eq!(regs.pc, 0x7000_0004);
    }

    #[test]
    fn instruction_fetch_walks_the_guest_tables() {
        let memory = ram();
        // 4 KiB granule, T0SZ = 25: L1 at 0x7000_1000 -> L2 at 0x7000_2000
        // -> L3 at 0x7000_3000 mapping VA 0x4000_0000 to PA 0x7000_5000.
        let va = 0x4000_0000u64;
        let desc = |pa: u64| (pa | 3).to_le_bytes();
        vm_core::memory::write_all(&memory, 0x7000_1000 + 8, &desc(0x7000_2000)).unwrap();
        vm_core::memory::write_all(&memory, 0x7000_2000, &desc(0x7000_3000)).unwrap();
        vm_core::memory::write_all(&memory, 0x7000_3000, &desc(0x7000_5000)).unwrap();
        put(&memory, 0x7000_5010, 0x3c1f_fdac); // str b12, [x13, #-1]!
        let mut regs = FakeRegs {
            pc: va + 0x10,
            ..Default::default()
        };
        regs.sys.insert(SCTLR_EL1, 1);
        regs.sys.insert(TCR_EL1, 25);
        regs.sys.insert(TTBR0_EL1, 0x7000_1000);
        regs.v[12] = 0xabcd;
        regs.x[13] = 0x3000_0001;
        let mut seen = Vec::new();
        let report = without_syndrome(None, 0x3000_0000, &mut regs, &memory, &mut |exit| {
            seen.push(exit);
            ExitResponse::Done
        });
        // x13 - 1 = 0x3000_0000 is outside the tables' one mapping.
        assert!(
            matches!(&report, Ok(Some(r)) if r.contains("0x3c1ffdac") && r.contains("does not translate")),
            "{report:?}"
        );
        // With FAR valid the fault's page is known and no walk is needed.
        let report = without_syndrome(
            Some(0x3000_0000),
            0x3000_0000,
            &mut regs,
            &memory,
            &mut |exit| {
                seen.push(exit);
                ExitResponse::Done
            },
        )
        .unwrap();
        assert_eq!(report, None);
        assert_eq!(
            seen,
            [VcpuExit::MmioWrite {
                addr: 0x3000_0000,
                width: AccessWidth::Byte,
                value: 0xcd
            }]
        );
        assert_eq!(regs.x[13], 0x3000_0000);
        assert_eq!(regs.pc, va + 0x14);
    }

    #[test]
    fn undecodable_instructions_are_reported_with_pc_and_word() {
        let memory = ram();
        put(&memory, 0x7000_0020, 0xc85f_7c20); // ldxr x0, [x1]
        let mut regs = FakeRegs {
            pc: 0x7000_0020,
            ..Default::default()
        };
        let report = without_syndrome(Some(0x1000), 0x1000, &mut regs, &memory, &mut |_| {
            ExitResponse::Done
        })
        .unwrap()
        .expect("a crash report");
        assert!(
            report.contains("0xc85f7c20") && report.contains("pc 0x70000020"),
            "{report}"
        );
        assert_eq!(regs.pc, 0x7000_0020, "PC stays on the instruction");
        // A PC outside RAM is a report too, not a host error.
        regs.pc = 0x10;
        let report = without_syndrome(Some(0x1000), 0x1000, &mut regs, &memory, &mut |_| {
            ExitResponse::Done
        })
        .unwrap()
        .expect("a crash report");
        assert!(report.contains("not in RAM"), "{report}");
    }
}
