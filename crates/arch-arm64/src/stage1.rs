//! The guest's own (EL1&0 stage-1) address translation, walked by the VMM.
//!
//! To emulate an instruction the framework gave no syndrome for, the VMM
//! reads it at the guest's PC, a virtual address. This walks the guest's
//! tables (DDI 0487 D8, VMSAv8-64) for 4 KiB, 16 KiB (what XNU uses) and
//! 64 KiB granules, reading descriptors through a caller-supplied reader
//! that bounds-checks every access. Permissions, attributes and 52-bit
//! addresses are not modelled: the walk only finds where the bytes are.

/// SCTLR_EL1.M: stage-1 translation on.
const SCTLR_M: u64 = 1;
/// Output-address bits of descriptors and TTBRs (48-bit).
const OA_MASK: u64 = 0x0000_ffff_ffff_ffff;

/// The registers that define the EL1&0 translation regime.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stage1Regs {
    pub sctlr: u64,
    pub tcr: u64,
    pub ttbr0: u64,
    pub ttbr1: u64,
}

/// Why a virtual address does not translate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WalkError {
    #[error("virtual address {0:#x} is outside both translation ranges")]
    OutOfRange(u64),
    #[error("translation table walks for this half of the address space are disabled")]
    Disabled,
    #[error("descriptor at {0:#x} is not in RAM")]
    TableNotInRam(u64),
    #[error("translation fault at level {level}")]
    Fault { level: u32 },
}

/// Granule size in address bits, from TCR.TG0 or TG1.
fn granule_bits(tcr: u64, upper: bool) -> u32 {
    if upper {
        match (tcr >> 30) & 3 {
            0b01 => 14,
            0b11 => 16,
            _ => 12,
        }
    } else {
        match (tcr >> 14) & 3 {
            0b01 => 16,
            0b10 => 14,
            _ => 12,
        }
    }
}

/// The physical address of `va`, reading 8-byte descriptors with `read`.
pub fn translate(
    va: u64,
    regs: &Stage1Regs,
    mut read: impl FnMut(u64) -> Option<u64>,
) -> Result<u64, WalkError> {
    if regs.sctlr & SCTLR_M == 0 {
        return Ok(va);
    }
    let tcr = regs.tcr;
    let upper = va & (1 << 55) != 0;
    let (tsz, disabled, tbi, ttbr) = if upper {
        (
            (tcr >> 16) & 0x3f,
            tcr & (1 << 23),
            tcr & (1 << 38),
            regs.ttbr1,
        )
    } else {
        (tcr & 0x3f, tcr & (1 << 7), tcr & (1 << 37), regs.ttbr0)
    };
    if disabled != 0 {
        return Err(WalkError::Disabled);
    }
    // Input-address size, clamped to what the architecture allows.
    let ia_bits = 64 - tsz.clamp(16, 39) as u32;
    let top = if tbi != 0 { 56 } else { 64 };
    let high = if top > ia_bits {
        (va >> ia_bits) & ((1u64 << (top - ia_bits)) - 1)
    } else {
        0
    };
    let expected = if upper {
        (1u64 << (top - ia_bits)) - 1
    } else {
        0
    };
    if high != expected {
        return Err(WalkError::OutOfRange(va));
    }

    let g = granule_bits(tcr, upper);
    let stride = g - 3;
    let levels = (ia_bits - g).div_ceil(stride);
    let start = 4 - levels;
    let mut table = ttbr & OA_MASK & !1;
    for level in start..=3 {
        let shift = g + stride * (3 - level);
        let bits = if level == start {
            ia_bits - shift
        } else {
            stride
        };
        let index = (va >> shift) & ((1u64 << bits) - 1);
        let at = table.wrapping_add(index * 8);
        let desc = read(at).ok_or(WalkError::TableNotInRam(at))?;
        if desc & 1 == 0 {
            return Err(WalkError::Fault { level });
        }
        let block_mask = (1u64 << shift) - 1;
        let is_table = desc & 2 != 0;
        if level == 3 {
            if !is_table {
                return Err(WalkError::Fault { level });
            }
            return Ok((desc & OA_MASK & !block_mask) | (va & block_mask));
        }
        if !is_table {
            return Ok((desc & OA_MASK & !block_mask) | (va & block_mask));
        }
        table = desc & OA_MASK & !((1u64 << g) - 1);
    }
    Err(WalkError::Fault { level: 3 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Descriptor memory: 8-byte words by address.
    #[derive(Default)]
    struct Tables(HashMap<u64, u64>);

    impl Tables {
        fn set(&mut self, table: u64, index: u64, desc: u64) {
            self.0.insert(table + index * 8, desc);
        }
        fn walk(&self, va: u64, regs: &Stage1Regs) -> Result<u64, WalkError> {
            translate(va, regs, |pa| self.0.get(&pa).copied().or(Some(0)))
        }
    }

    const TABLE: u64 = 0b11;
    const PAGE: u64 = 0b11;
    const BLOCK: u64 = 0b01;

    #[test]
    fn mmu_off_is_the_identity() {
        let regs = Stage1Regs::default();
        assert_eq!(translate(0x1234_5678, &regs, |_| None), Ok(0x1234_5678));
    }

    #[test]
    fn four_kib_granule_low_half_pages_and_blocks() {
        // T0SZ = 25: 39-bit input, walk starts at level 1.
        let regs = Stage1Regs {
            sctlr: 1,
            tcr: 25,
            ttbr0: 0x10_0000,
            ..Default::default()
        };
        let mut t = Tables::default();
        let va = 0x40_2345_6789u64;
        // Level 1 index = va[38:30], level 2 = va[29:21], level 3 = va[20:12].
        t.set(0x10_0000, (va >> 30) & 0x1ff, 0x11_0000 | TABLE);
        t.set(0x11_0000, (va >> 21) & 0x1ff, 0x12_0000 | TABLE);
        t.set(
            0x12_0000,
            (va >> 12) & 0x1ff,
            0x7777_7000 | PAGE | (1 << 10),
        );
        assert_eq!(t.walk(va, &regs), Ok(0x7777_7789));
        // A 2 MiB block at level 2.
        let va2 = 0x40_0020_1234u64;
        t.set(0x11_0000, (va2 >> 21) & 0x1ff, 0x8000_0000 | BLOCK);
        assert_eq!(t.walk(va2, &regs), Ok(0x8000_1234));
        // An invalid entry faults at its level.
        assert_eq!(
            t.walk(0x80_0000_0000 - 0x1000, &regs),
            Err(WalkError::Fault { level: 1 })
        );
    }

    #[test]
    fn sixteen_kib_granule_upper_half_as_xnu_uses_it() {
        // T1SZ = 25 (39-bit), TG1 = 16 KiB: levels 1 (bit 36..38), 2, 3.
        let regs = Stage1Regs {
            sctlr: 1,
            tcr: (25 << 16) | (0b01 << 30) | (1 << 38),
            ttbr1: 0x20_0000,
            ..Default::default()
        };
        let mut t = Tables::default();
        let va = 0xffff_ffe0_0123_4567u64;
        let l1 = (va >> 36) & 0x7;
        let l2 = (va >> 25) & 0x7ff;
        let l3 = (va >> 14) & 0x7ff;
        t.set(0x20_0000, l1, 0x20_4000 | TABLE);
        t.set(0x20_4000, l2, 0x20_8000 | TABLE);
        t.set(0x20_8000, l3, 0x9000_c000 | PAGE);
        assert_eq!(t.walk(va, &regs), Ok(0x9000_c000 | (va & 0x3fff)));
        // Top-byte ignore: a tagged pointer translates the same.
        assert_eq!(
            t.walk(va & 0x00ff_ffff_ffff_ffff | (0x5a << 56), &regs),
            Ok(0x9000_c000 | (va & 0x3fff))
        );
        // Outside the 39-bit upper range.
        assert_eq!(
            t.walk(0xffff_0000_0000_0000, &regs),
            Err(WalkError::OutOfRange(0xffff_0000_0000_0000))
        );
    }

    #[test]
    fn descriptors_outside_ram_and_disabled_halves_are_errors() {
        let regs = Stage1Regs {
            sctlr: 1,
            tcr: 25 | (1 << 23),
            ttbr0: 0xdead_0000,
            ..Default::default()
        };
        assert_eq!(
            translate(0x1000, &regs, |_| None),
            Err(WalkError::TableNotInRam(0xdead_0000))
        );
        assert_eq!(
            translate(0xffff_ffff_ffff_f000, &regs, |_| Some(0)),
            Err(WalkError::Disabled)
        );
    }
}
