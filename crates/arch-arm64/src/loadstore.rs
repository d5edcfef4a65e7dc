//! Decoding and emulating the load/store instructions a data abort's
//! syndrome does not describe.
//!
//! A stage-2 abort on MMIO carries an instruction syndrome (ISV) only for
//! single-register loads and stores without writeback. Pairs, pre/post-
//! indexed forms, register-offset forms and SIMD/FP transfers arrive
//! without one (DDI 0487, ESR_EL2.ISV), and macOS 13+ kernels use them on
//! device memory (`str w9, [x8, #128]!` on the GIC redistributor). The VMM
//! must then read the instruction at PC, [`decode`] it and [`execute`] it:
//! the accesses through its bus, the base-register writeback, the loaded
//! registers.
//!
//! Covered (DDI 0487 C4.1.66, "Loads and Stores"): load/store register
//! (unsigned immediate, unscaled, unprivileged, pre- and post-indexed,
//! register offset), load/store pair (offset, non-temporal, pre- and
//! post-indexed, LDPSW), for general registers of every size and sign
//! extension and for SIMD/FP registers B, H, S, D and Q. Exclusive,
//! acquire/release, atomic, literal and tag instructions are not: they
//! either carry a syndrome or have no meaning on device memory.

/// Which register file the transfer uses, and how a load fills it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transfer {
    /// X/W registers: 31 is XZR/WZR.
    General {
        /// A load sign-extends the value read.
        sign_extend: bool,
        /// The destination is an X register (else W: the upper half is 0).
        sixty_four: bool,
    },
    /// SIMD/FP V registers: a load zeroes the bits above the access.
    Simd,
}

/// When the base register is updated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Index {
    /// Address = base + offset, base unchanged.
    Offset,
    /// Address = base + offset, then base = address.
    Pre,
    /// Address = base, then base = base + offset.
    Post,
}

/// How the index register of a register-offset form is extended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Extend {
    Uxtw,
    /// LSL: the whole X register.
    Uxtx,
    Sxtw,
    Sxtx,
}

/// The offset added to the base register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offset {
    Imm(i64),
    /// Register Rm (31 is XZR), extended, then shifted left by `shift`.
    Reg {
        rm: u8,
        extend: Extend,
        shift: u8,
    },
}

/// A decoded load or store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadStore {
    pub load: bool,
    /// Bytes per register: 1, 2, 4, 8 or 16.
    pub size: u8,
    pub transfer: Transfer,
    pub rt: u8,
    /// The second register of a pair.
    pub rt2: Option<u8>,
    /// Base register; 31 is SP.
    pub rn: u8,
    pub offset: Offset,
    pub index: Index,
}

fn sign_extend(value: u64, bits: u32) -> i64 {
    let shift = 64 - bits;
    ((value << shift) as i64) >> shift
}

fn field(insn: u32, lsb: u32, bits: u32) -> u32 {
    (insn >> lsb) & ((1 << bits) - 1)
}

/// Size and register kind of a single-register load/store from its
/// `size`, `V` and `opc` fields; `None` for prefetches and unallocated
/// encodings.
fn single_kind(size: u32, simd: bool, opc: u32) -> Option<(bool, u8, Transfer)> {
    if simd {
        let load = opc & 1 != 0;
        return match (opc >> 1, size) {
            (0, s) => Some((load, 1 << s, Transfer::Simd)),
            (1, 0) => Some((load, 16, Transfer::Simd)),
            _ => None,
        };
    }
    let bytes = 1u8 << size;
    let general = |sign_extend, sixty_four| Transfer::General {
        sign_extend,
        sixty_four,
    };
    match (opc, size) {
        (0, _) => Some((false, bytes, general(false, size == 3))),
        (1, _) => Some((true, bytes, general(false, size == 3))),
        // LDRSB/LDRSH/LDRSW to X; size 3 is PRFM.
        (2, 0..=2) => Some((true, bytes, general(true, true))),
        // LDRSB/LDRSH to W.
        (3, 0..=1) => Some((true, bytes, general(true, false))),
        _ => None,
    }
}

/// Decodes a load/store the emulation covers; `None` for anything else.
pub fn decode(insn: u32) -> Option<LoadStore> {
    let rt = field(insn, 0, 5) as u8;
    let rn = field(insn, 5, 5) as u8;
    let simd = insn & (1 << 26) != 0;

    if insn & 0x3a00_0000 == 0x2800_0000 {
        return decode_pair(insn, rt, rn, simd);
    }
    let (load, size, transfer) = single_kind(field(insn, 30, 2), simd, field(insn, 22, 2))?;
    let scale = size.trailing_zeros() as u8;
    let single = |offset, index| LoadStore {
        load,
        size,
        transfer,
        rt,
        rt2: None,
        rn,
        offset,
        index,
    };
    if insn & 0x3b00_0000 == 0x3900_0000 {
        // Unsigned immediate, scaled by the access size.
        let imm = i64::from(field(insn, 10, 12)) << scale;
        return Some(single(Offset::Imm(imm), Index::Offset));
    }
    if insn & 0x3b20_0000 == 0x3800_0000 {
        let imm = sign_extend(u64::from(field(insn, 12, 9)), 9);
        let index = match field(insn, 10, 2) {
            0b00 => Index::Offset,
            0b01 => Index::Post,
            // Unprivileged (LDTR/STTR): no SIMD form.
            0b10 if !simd => Index::Offset,
            0b11 => Index::Pre,
            _ => return None,
        };
        return Some(single(Offset::Imm(imm), index));
    }
    if insn & 0x3b20_0c00 == 0x3820_0800 {
        let extend = match field(insn, 13, 3) {
            0b010 => Extend::Uxtw,
            0b011 => Extend::Uxtx,
            0b110 => Extend::Sxtw,
            0b111 => Extend::Sxtx,
            _ => return None,
        };
        let shift = if insn & (1 << 12) != 0 { scale } else { 0 };
        let rm = field(insn, 16, 5) as u8;
        return Some(single(Offset::Reg { rm, extend, shift }, Index::Offset));
    }
    None
}

fn decode_pair(insn: u32, rt: u8, rn: u8, simd: bool) -> Option<LoadStore> {
    let opc = field(insn, 30, 2);
    let load = insn & (1 << 22) != 0;
    let (size, transfer): (u8, Transfer) = match (simd, opc) {
        (false, 0) => (
            4,
            Transfer::General {
                sign_extend: false,
                sixty_four: false,
            },
        ),
        // LDPSW; the store encoding is STGP (tags).
        (false, 1) if load => (
            4,
            Transfer::General {
                sign_extend: true,
                sixty_four: true,
            },
        ),
        (false, 2) => (
            8,
            Transfer::General {
                sign_extend: false,
                sixty_four: true,
            },
        ),
        (true, 0) => (4, Transfer::Simd),
        (true, 1) => (8, Transfer::Simd),
        (true, 2) => (16, Transfer::Simd),
        _ => return None,
    };
    let index = match field(insn, 23, 2) {
        // LDNP/STNP: no LDPSW form.
        0b00 if opc != 1 || simd => Index::Offset,
        0b01 => Index::Post,
        0b10 => Index::Offset,
        0b11 => Index::Pre,
        _ => return None,
    };
    let imm = sign_extend(u64::from(field(insn, 15, 7)), 7) << size.trailing_zeros();
    Some(LoadStore {
        load,
        size,
        transfer,
        rt,
        rt2: Some(field(insn, 10, 5) as u8),
        rn,
        offset: Offset::Imm(imm),
        index,
    })
}

/// What [`execute`] needs from the vCPU and the machine.
pub trait LoadStoreCpu {
    type Error;
    /// X0..X30.
    fn x(&mut self, n: u8) -> Result<u64, Self::Error>;
    fn set_x(&mut self, n: u8, value: u64) -> Result<(), Self::Error>;
    /// The stack pointer of the current exception level.
    fn sp(&mut self) -> Result<u64, Self::Error>;
    fn set_sp(&mut self, value: u64) -> Result<(), Self::Error>;
    fn v(&mut self, n: u8) -> Result<u128, Self::Error>;
    fn set_v(&mut self, n: u8, value: u128) -> Result<(), Self::Error>;
    /// A load of `size` bytes (1, 2, 4 or 8) at virtual address `va`.
    fn read(&mut self, va: u64, size: u8) -> Result<u64, Self::Error>;
    /// A store of the low `size` bytes of `value` at `va`.
    fn write(&mut self, va: u64, size: u8, value: u64) -> Result<(), Self::Error>;
}

fn read_x<C: LoadStoreCpu>(cpu: &mut C, n: u8) -> Result<u64, C::Error> {
    if n >= 31 {
        Ok(0)
    } else {
        cpu.x(n)
    }
}

fn mask(size: u8) -> u128 {
    if size >= 16 {
        u128::MAX
    } else {
        (1u128 << (u32::from(size) * 8)) - 1
    }
}

impl LoadStore {
    /// The virtual addresses of the registers' data and the base register's
    /// value after writeback, from the register values in `cpu`.
    pub fn addresses<C: LoadStoreCpu>(&self, cpu: &mut C) -> Result<(u64, u64), C::Error> {
        let base = if self.rn == 31 {
            cpu.sp()?
        } else {
            cpu.x(self.rn)?
        };
        let offset = match self.offset {
            Offset::Imm(imm) => imm as u64,
            Offset::Reg { rm, extend, shift } => {
                let raw = read_x(cpu, rm)?;
                let extended = match extend {
                    Extend::Uxtw => raw & 0xffff_ffff,
                    Extend::Sxtw => sign_extend(raw, 32) as u64,
                    Extend::Uxtx | Extend::Sxtx => raw,
                };
                extended << shift
            }
        };
        let moved = base.wrapping_add(offset);
        let address = match self.index {
            Index::Post => base,
            Index::Offset | Index::Pre => moved,
        };
        Ok((address, moved))
    }

    fn value_of<C: LoadStoreCpu>(&self, cpu: &mut C, reg: u8) -> Result<u128, C::Error> {
        Ok(match self.transfer {
            Transfer::General { .. } => u128::from(read_x(cpu, reg)?),
            Transfer::Simd => cpu.v(reg)?,
        } & mask(self.size))
    }

    fn load_into<C: LoadStoreCpu>(&self, cpu: &mut C, reg: u8, raw: u128) -> Result<(), C::Error> {
        match self.transfer {
            Transfer::Simd => cpu.set_v(reg, raw),
            Transfer::General {
                sign_extend: sign,
                sixty_four,
            } => {
                if reg >= 31 {
                    return Ok(());
                }
                let raw = raw as u64;
                let value = if sign && self.size < 8 {
                    sign_extend(raw, u32::from(self.size) * 8) as u64
                } else {
                    raw
                };
                let value = if sixty_four {
                    value
                } else {
                    value & 0xffff_ffff
                };
                cpu.set_x(reg, value)
            }
        }
    }
}

/// Reads `size` bytes at `va` as accesses of at most 8 bytes, lowest
/// address first (a Q register is two doublewords).
fn read_element<C: LoadStoreCpu>(cpu: &mut C, va: u64, size: u8) -> Result<u128, C::Error> {
    if size <= 8 {
        return Ok(u128::from(cpu.read(va, size)?));
    }
    let low = cpu.read(va, 8)?;
    let high = cpu.read(va.wrapping_add(8), 8)?;
    Ok(u128::from(low) | (u128::from(high) << 64))
}

fn write_element<C: LoadStoreCpu>(
    cpu: &mut C,
    va: u64,
    size: u8,
    value: u128,
) -> Result<(), C::Error> {
    if size <= 8 {
        return cpu.write(va, size, value as u64);
    }
    cpu.write(va, 8, value as u64)?;
    cpu.write(va.wrapping_add(8), 8, (value >> 64) as u64)
}

/// Performs `insn` as the CPU would have: every access in address order,
/// then the base-register writeback, then the loaded registers. PC is the
/// caller's to advance.
///
/// Where the architecture leaves a choice (a load with writeback into its
/// own base, a pair loading one register twice: CONSTRAINED UNPREDICTABLE)
/// the loaded value wins. Stores use register values from before the
/// writeback.
pub fn execute<C: LoadStoreCpu>(insn: &LoadStore, cpu: &mut C) -> Result<(), C::Error> {
    let (address, moved) = insn.addresses(cpu)?;
    let size = insn.size;
    let second = address.wrapping_add(u64::from(size));
    let mut loaded = [0u128; 2];
    if insn.load {
        loaded[0] = read_element(cpu, address, size)?;
        if insn.rt2.is_some() {
            loaded[1] = read_element(cpu, second, size)?;
        }
    } else {
        let first = insn.value_of(cpu, insn.rt)?;
        let other = match insn.rt2 {
            Some(rt2) => Some(insn.value_of(cpu, rt2)?),
            None => None,
        };
        write_element(cpu, address, size, first)?;
        if let Some(value) = other {
            write_element(cpu, second, size, value)?;
        }
    }
    if insn.index != Index::Offset {
        if insn.rn == 31 {
            cpu.set_sp(moved)?;
        } else {
            cpu.set_x(insn.rn, moved)?;
        }
    }
    if insn.load {
        insn.load_into(cpu, insn.rt, loaded[0])?;
        if let Some(rt2) = insn.rt2 {
            insn.load_into(cpu, rt2, loaded[1])?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    const GEN_W: Transfer = Transfer::General {
        sign_extend: false,
        sixty_four: false,
    };
    const GEN_X: Transfer = Transfer::General {
        sign_extend: false,
        sixty_four: true,
    };
    const SIGN_X: Transfer = Transfer::General {
        sign_extend: true,
        sixty_four: true,
    };
    const SIGN_W: Transfer = Transfer::General {
        sign_extend: true,
        sixty_four: false,
    };

    fn single(
        load: bool,
        size: u8,
        transfer: Transfer,
        rt: u8,
        rn: u8,
        offset: Offset,
        index: Index,
    ) -> LoadStore {
        LoadStore {
            load,
            size,
            transfer,
            rt,
            rt2: None,
            rn,
            offset,
            index,
        }
    }

    fn imm(v: i64) -> Offset {
        Offset::Imm(v)
    }

    /// Words from `aarch64-linux-gnu-as` (binutils 2.40) for each source line.
    #[test]
    fn decodes_single_register_immediate_forms() {
        use Index::*;
        let cases = [
            // str w9, [x8, #128]!  (what XNU 13+ does to the redistributor)
            (0xb808_0d09, single(false, 4, GEN_W, 9, 8, imm(128), Pre)),
            // ldr w1, [x2, #-4]!
            (0xb85f_cc41, single(true, 4, GEN_W, 1, 2, imm(-4), Pre)),
            // ldr x3, [x4], #16
            (0xf841_0483, single(true, 8, GEN_X, 3, 4, imm(16), Post)),
            // strb w5, [x6], #-1
            (0x381f_f4c5, single(false, 1, GEN_W, 5, 6, imm(-1), Post)),
            // ldrh w7, [x8, #2]!
            (0x7840_2d07, single(true, 2, GEN_W, 7, 8, imm(2), Pre)),
            // ldrsb x9, [x10], #1
            (0x3880_1549, single(true, 1, SIGN_X, 9, 10, imm(1), Post)),
            // ldrsb w11, [x12, #1]!
            (0x38c0_1d8b, single(true, 1, SIGN_W, 11, 12, imm(1), Pre)),
            // ldrsh x13, [x14], #2
            (0x7880_25cd, single(true, 2, SIGN_X, 13, 14, imm(2), Post)),
            // ldrsh w15, [x16, #-2]!
            (0x78df_ee0f, single(true, 2, SIGN_W, 15, 16, imm(-2), Pre)),
            // ldrsw x17, [x18], #4
            (0xb880_4651, single(true, 4, SIGN_X, 17, 18, imm(4), Post)),
            // strh w19, [x20, #6]
            (0x7900_0e93, single(false, 2, GEN_W, 19, 20, imm(6), Offset)),
            // ldr x21, [sp, #8]!
            (0xf840_8ff5, single(true, 8, GEN_X, 21, 31, imm(8), Pre)),
            // ldur w22, [x23, #-3]
            (0xb85f_d2f6, single(true, 4, GEN_W, 22, 23, imm(-3), Offset)),
            // sttr x24, [x25, #8]
            (0xf800_8b38, single(false, 8, GEN_X, 24, 25, imm(8), Offset)),
            // ldr x0, [x1]
            (0xf940_0020, single(true, 8, GEN_X, 0, 1, imm(0), Offset)),
        ];
        for (word, expected) in cases {
            assert_eq!(decode(word), Some(expected), "{word:#010x}");
        }
    }

    #[test]
    fn decodes_register_offset_forms() {
        let reg = |rm, extend, shift| Offset::Reg { rm, extend, shift };
        let cases = [
            // ldr w1, [x2, x3]
            (0xb863_6841, 1, 2, 4, GEN_W, true, reg(3, Extend::Uxtx, 0)),
            // ldr x4, [x5, x6, lsl #3]
            (0xf866_78a4, 4, 5, 8, GEN_X, true, reg(6, Extend::Uxtx, 3)),
            // ldrb w7, [x8, w9, uxtw]
            (0x3869_4907, 7, 8, 1, GEN_W, true, reg(9, Extend::Uxtw, 0)),
            // ldrsh x10, [x11, w12, sxtw #1]
            (
                0x78ac_d96a,
                10,
                11,
                2,
                SIGN_X,
                true,
                reg(12, Extend::Sxtw, 1),
            ),
            // str w13, [x14, x15, sxtx #2]
            (
                0xb82f_f9cd,
                13,
                14,
                4,
                GEN_W,
                false,
                reg(15, Extend::Sxtx, 2),
            ),
            // ldrsw x16, [x17, w18, uxtw #2]
            (
                0xb8b2_5a30,
                16,
                17,
                4,
                SIGN_X,
                true,
                reg(18, Extend::Uxtw, 2),
            ),
        ];
        for (word, rt, rn, size, transfer, load, offset) in cases {
            assert_eq!(
                decode(word),
                Some(single(load, size, transfer, rt, rn, offset, Index::Offset)),
                "{word:#010x}"
            );
        }
    }

    #[test]
    fn decodes_pairs() {
        use Index::*;
        let pair = |load, size, transfer, rt, rt2, rn, offset, index| LoadStore {
            load,
            size,
            transfer,
            rt,
            rt2: Some(rt2),
            rn,
            offset: super::Offset::Imm(offset),
            index,
        };
        let s = Transfer::Simd;
        let cases = [
            // ldp x0, x1, [x2]
            (0xa940_0440, pair(true, 8, GEN_X, 0, 1, 2, 0, Offset)),
            // ldp w3, w4, [x5, #8]!
            (0x29c1_10a3, pair(true, 4, GEN_W, 3, 4, 5, 8, Pre)),
            // stp x6, x7, [x8], #-16
            (0xa8bf_1d06, pair(false, 8, GEN_X, 6, 7, 8, -16, Post)),
            // stp w9, w10, [x11, #-8]
            (0x293f_2969, pair(false, 4, GEN_W, 9, 10, 11, -8, Offset)),
            // ldpsw x12, x13, [x14, #8]
            (0x6941_35cc, pair(true, 4, SIGN_X, 12, 13, 14, 8, Offset)),
            // ldnp x15, x16, [x17, #16]
            (0xa841_422f, pair(true, 8, GEN_X, 15, 16, 17, 16, Offset)),
            // ldp x18, x19, [sp], #16
            (0xa8c1_4ff2, pair(true, 8, GEN_X, 18, 19, 31, 16, Post)),
            // ldp s0, s1, [x2]
            (0x2d40_0440, pair(true, 4, s, 0, 1, 2, 0, Offset)),
            // ldp d3, d4, [x5, #16]!
            (0x6dc1_10a3, pair(true, 8, s, 3, 4, 5, 16, Pre)),
            // stp q6, q7, [x8], #32
            (0xac81_1d06, pair(false, 16, s, 6, 7, 8, 32, Post)),
            // ldp q9, q10, [x11, #-32]
            (0xad7f_2969, pair(true, 16, s, 9, 10, 11, -32, Offset)),
        ];
        for (word, expected) in cases {
            assert_eq!(decode(word), Some(expected), "{word:#010x}");
        }
    }

    #[test]
    fn decodes_simd_single_registers() {
        use Index::*;
        let s = Transfer::Simd;
        let reg = super::Offset::Reg {
            rm: 14,
            extend: Extend::Uxtx,
            shift: 3,
        };
        let cases = [
            // ldr b0, [x1]
            (0x3d40_0020, single(true, 1, s, 0, 1, imm(0), Offset)),
            // ldr h2, [x3, #2]!
            (0x7c40_2c62, single(true, 2, s, 2, 3, imm(2), Pre)),
            // ldr s4, [x5], #4
            (0xbc40_44a4, single(true, 4, s, 4, 5, imm(4), Post)),
            // str d6, [x7, #8]
            (0xfd00_04e6, single(false, 8, s, 6, 7, imm(8), Offset)),
            // ldr q8, [x9, #16]
            (0x3dc0_0528, single(true, 16, s, 8, 9, imm(16), Offset)),
            // str q10, [x11], #32
            (0x3c82_056a, single(false, 16, s, 10, 11, imm(32), Post)),
            // ldr d12, [x13, x14, lsl #3]
            (0xfc6e_79ac, single(true, 8, s, 12, 13, reg, Offset)),
            // str b12, [x13, #-1]!
            (0x3c1f_fdac, single(false, 1, s, 12, 13, imm(-1), Pre)),
        ];
        for (word, expected) in cases {
            assert_eq!(decode(word), Some(expected), "{word:#010x}");
        }
    }

    #[test]
    fn leaves_other_memory_instructions_undecoded() {
        for word in [
            0xc85f_7c20u32, // ldxr x0, [x1]
            0xf820_0041,    // ldadd x0, x1, [x2]
            0xf980_0000,    // prfm pldl1keep, [x0]
            0x6900_0440,    // stgp x0, x1, [x2]
            0xf820_0420,    // ldraa x0, [x1]
            0xc8df_fc20,    // ldar x0, [x1]
            0x5800_0020,    // ldr x0, <literal>
            0xd503_201f,    // nop
            0x0000_0000,    // udf #0
        ] {
            assert_eq!(decode(word), None, "{word:#010x}");
        }
    }

    /// Registers and a byte-addressed memory.
    #[derive(Default)]
    struct Machine {
        x: [u64; 31],
        sp: u64,
        v: [u128; 32],
        memory: BTreeMap<u64, u8>,
        accesses: Vec<(u64, u8, bool)>,
    }

    impl LoadStoreCpu for Machine {
        type Error = ();
        fn x(&mut self, n: u8) -> Result<u64, ()> {
            Ok(self.x[usize::from(n)])
        }
        fn set_x(&mut self, n: u8, value: u64) -> Result<(), ()> {
            self.x[usize::from(n)] = value;
            Ok(())
        }
        fn sp(&mut self) -> Result<u64, ()> {
            Ok(self.sp)
        }
        fn set_sp(&mut self, value: u64) -> Result<(), ()> {
            self.sp = value;
            Ok(())
        }
        fn v(&mut self, n: u8) -> Result<u128, ()> {
            Ok(self.v[usize::from(n)])
        }
        fn set_v(&mut self, n: u8, value: u128) -> Result<(), ()> {
            self.v[usize::from(n)] = value;
            Ok(())
        }
        fn read(&mut self, va: u64, size: u8) -> Result<u64, ()> {
            self.accesses.push((va, size, false));
            Ok((0..u64::from(size)).fold(0, |acc, i| {
                acc | u64::from(*self.memory.get(&(va + i)).unwrap_or(&0)) << (8 * i)
            }))
        }
        fn write(&mut self, va: u64, size: u8, value: u64) -> Result<(), ()> {
            self.accesses.push((va, size, true));
            for i in 0..u64::from(size) {
                self.memory.insert(va + i, (value >> (8 * i)) as u8);
            }
            Ok(())
        }
    }

    fn run(word: u32, m: &mut Machine) {
        execute(&decode(word).expect("decodes"), m).unwrap();
    }

    #[test]
    fn pre_index_store_writes_then_moves_the_base() {
        let mut m = Machine::default();
        m.x[8] = 0x1000;
        m.x[9] = 0xdead_beef_1234_5678;
        run(0xb808_0d09, &mut m); // str w9, [x8, #128]!
        assert_eq!(m.accesses, [(0x1080, 4, true)]);
        assert_eq!(m.read(0x1080, 4), Ok(0x1234_5678));
        assert_eq!(m.x[8], 0x1080);
    }

    #[test]
    fn post_index_load_reads_at_the_old_base() {
        let mut m = Machine::default();
        m.x[4] = 0x2000;
        m.write(0x2000, 8, 0x0102_0304_0506_0708).unwrap();
        run(0xf841_0483, &mut m); // ldr x3, [x4], #16
        assert_eq!(m.x[3], 0x0102_0304_0506_0708);
        assert_eq!(m.x[4], 0x2010);
    }

    #[test]
    fn loads_sign_and_zero_extend_as_the_register_width_says() {
        let mut m = Machine::default();
        m.x[10] = 0x3000;
        m.x[12] = 0x2fff;
        m.write(0x3000, 1, 0x80).unwrap();
        run(0x3880_1549, &mut m); // ldrsb x9, [x10], #1
        assert_eq!(m.x[9], 0xffff_ffff_ffff_ff80);
        m.x[11] = u64::MAX;
        run(0x38c0_1d8b, &mut m); // ldrsb w11, [x12, #1]!
        assert_eq!(m.x[11], 0xffff_ff80, "W destination clears bits 63:32");
        m.x[2] = 0x3004;
        m.write(0x3000, 4, 0x8000_0001).unwrap();
        m.x[1] = u64::MAX;
        run(0xb85f_cc41, &mut m); // ldr w1, [x2, #-4]!
        assert_eq!(m.x[1], 0x8000_0001);
        m.x[18] = 0x3000;
        run(0xb880_4651, &mut m); // ldrsw x17, [x18], #4
        assert_eq!(m.x[17], 0xffff_ffff_8000_0001);
    }

    #[test]
    fn register_offsets_extend_and_scale_the_index() {
        let mut m = Machine::default();
        m.x[11] = 0x4000;
        m.x[12] = 0xffff_ffff_ffff_fffe; // w12 = -2
        m.write(0x3ffc, 2, 0x8001).unwrap();
        run(0x78ac_d96a, &mut m); // ldrsh x10, [x11, w12, sxtw #1]
        assert_eq!(m.x[10], 0xffff_ffff_ffff_8001);
        m.x[8] = 0x4000;
        m.x[9] = 0x1_0000_0010; // uxtw keeps 0x10
        m.write(0x4010, 1, 0xab).unwrap();
        run(0x3869_4907, &mut m); // ldrb w7, [x8, w9, uxtw]
        assert_eq!(m.x[7], 0xab);
        m.x[14] = 0x5000;
        m.x[15] = 3;
        m.x[13] = 0x1122_3344;
        run(0xb82f_f9cd, &mut m); // str w13, [x14, x15, sxtx #2]
        assert_eq!(m.accesses.last(), Some(&(0x500c, 4, true)));
    }

    #[test]
    fn pairs_access_both_halves_in_order_and_write_back() {
        let mut m = Machine::default();
        m.x[8] = 0x6000;
        m.x[6] = 0x1111;
        m.x[7] = 0x2222;
        run(0xa8bf_1d06, &mut m); // stp x6, x7, [x8], #-16
        assert_eq!(m.accesses, [(0x6000, 8, true), (0x6008, 8, true)]);
        assert_eq!(m.x[8], 0x5ff0);
        m.x[14] = 0x5ff8;
        run(0x6941_35cc, &mut m); // ldpsw x12, x13, [x14, #8]
        assert_eq!((m.x[12], m.x[13]), (0x1111, 0));
        m.write(0x6004, 4, 0x9000_0000).unwrap();
        run(0x6941_35cc, &mut m);
        assert_eq!((m.x[12], m.x[13]), (0x1111, 0xffff_ffff_9000_0000));
        m.sp = 0x6000;
        run(0xa8c1_4ff2, &mut m); // ldp x18, x19, [sp], #16
        assert_eq!(m.x[18], 0x9000_0000_0000_1111);
        assert_eq!(m.sp, 0x6010);
    }

    #[test]
    fn simd_loads_clear_the_upper_bits_and_q_is_two_doublewords() {
        let mut m = Machine::default();
        m.x[1] = 0x7000;
        m.v[0] = u128::MAX;
        m.write(0x7000, 8, 0x8877_6655_4433_2211).unwrap();
        m.write(0x7008, 8, 0xffee_ddcc_bbaa_9988).unwrap();
        run(0x3d40_0020, &mut m); // ldr b0, [x1]
        assert_eq!(m.v[0], 0x11);
        m.x[9] = 0x6ff0;
        m.accesses.clear();
        run(0x3dc0_0528, &mut m); // ldr q8, [x9, #16]
        assert_eq!(m.accesses, [(0x7000, 8, false), (0x7008, 8, false)]);
        assert_eq!(m.v[8], 0xffee_ddcc_bbaa_9988_8877_6655_4433_2211);
        m.x[8] = 0x8000;
        m.v[6] = 1;
        m.v[7] = 2 << 64;
        run(0xac81_1d06, &mut m); // stp q6, q7, [x8], #32
        assert_eq!(m.read(0x8000, 8), Ok(1));
        assert_eq!(m.read(0x8018, 8), Ok(2));
        assert_eq!(m.x[8], 0x8020);
    }

    #[test]
    fn zero_register_stores_zero_and_loads_nowhere() {
        let mut m = Machine::default();
        m.x[2] = 0x9000;
        m.write(0x9000, 4, 0xffff_ffff).unwrap();
        // str wzr, [x2], #4
        run(0xb800_445f, &mut m);
        assert_eq!(m.read(0x9000, 4), Ok(0));
        assert_eq!(m.x[2], 0x9004);
    }
}
