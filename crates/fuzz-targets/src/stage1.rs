//! The guest's stage-1 page-table walker (`arch_arm64::stage1`): the VMM
//! walks the guest's own tables to read an instruction the framework gave
//! no syndrome for, so the registers and every descriptor are hostile.
//!
//! Input: SCTLR, TCR, TTBR0, TTBR1 (8 bytes each), a word count byte, that
//! many 8-byte descriptor words (descriptor memory repeats them every
//! `count` words below 1 TiB; above it reads fail as outside RAM), then
//! virtual addresses to translate.

use arch_arm64::stage1::{translate, Stage1Regs};

use crate::input::Input;
use crate::Report;

/// Virtual addresses per input at most.
const MAX_ADDRESSES: usize = 64;
/// Descriptor memory ends here; reads above are "not in RAM".
const RAM_END: u64 = 1 << 40;
/// A walk reads at most one descriptor per level (levels 0 to 3).
const MAX_LEVELS: u32 = 4;

/// Runs one input; `completions` counts addresses that translated.
pub fn stage1(data: &[u8]) -> Report {
    let mut input = Input::new(data);
    let regs = Stage1Regs {
        sctlr: input.u64(),
        tcr: input.u64(),
        ttbr0: input.u64(),
        ttbr1: input.u64(),
    };
    let count = usize::from(input.u8()).max(1);
    let words: Vec<u64> = (0..count).map(|_| input.u64()).collect();
    let mut report = Report::default();
    for _ in 0..MAX_ADDRESSES {
        if input.is_empty() {
            break;
        }
        let va = input.u64();
        report.ops += 1;
        let mut reads = 0;
        let result = translate(va, &regs, |pa| {
            reads += 1;
            (pa < RAM_END).then(|| words[(pa / 8) as usize % words.len()])
        });
        assert!(reads <= MAX_LEVELS, "{reads} descriptor reads for {va:#x}");
        if let Ok(pa) = result {
            report.completions += 1;
            if regs.sctlr & 1 == 0 {
                assert_eq!(pa, va, "with the MMU off the walk is the identity");
            }
            // Every granule is at least 4 KiB, so the offset in the
            // smallest page always comes through.
            assert_eq!(pa & 0xfff, va & 0xfff, "{va:#x} -> {pa:#x}");
        }
    }
    report
}
