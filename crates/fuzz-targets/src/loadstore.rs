//! The decoder and executor of loads and stores that trapped without an
//! instruction syndrome (`arch_arm64::loadstore`): on Hypervisor.framework
//! the word comes from guest memory at PC, so every bit pattern is hostile.
//!
//! Input: 31 X registers, SP and 32 V registers' low halves (8 bytes each),
//! then instruction words. Each word is decoded; a decodable one runs
//! against a CPU whose memory accesses only record address and size.

use arch_arm64::loadstore::{decode, execute, LoadStoreCpu};

use crate::input::Input;
use crate::Report;

/// Words per input at most.
const MAX_WORDS: usize = 256;

struct FakeCpu {
    x: [u64; 31],
    sp: u64,
    v: [u128; 32],
}

impl LoadStoreCpu for FakeCpu {
    type Error = ();
    fn x(&mut self, n: u8) -> Result<u64, ()> {
        self.x.get(usize::from(n)).copied().ok_or(())
    }
    fn set_x(&mut self, n: u8, value: u64) -> Result<(), ()> {
        *self.x.get_mut(usize::from(n)).ok_or(())? = value;
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
        self.v.get(usize::from(n)).copied().ok_or(())
    }
    fn set_v(&mut self, n: u8, value: u128) -> Result<(), ()> {
        *self.v.get_mut(usize::from(n)).ok_or(())? = value;
        Ok(())
    }
    fn read(&mut self, va: u64, size: u8) -> Result<u64, ()> {
        assert!(matches!(size, 1 | 2 | 4 | 8), "load of {size} bytes");
        Ok(va.rotate_left(u32::from(size)))
    }
    fn write(&mut self, _va: u64, size: u8, _value: u64) -> Result<(), ()> {
        assert!(matches!(size, 1 | 2 | 4 | 8), "store of {size} bytes");
        Ok(())
    }
}

/// Runs one input; `completions` counts words that decoded and executed.
pub fn loadstore(data: &[u8]) -> Report {
    let mut input = Input::new(data);
    let mut cpu = FakeCpu {
        x: [0; 31],
        sp: 0,
        v: [0; 32],
    };
    for x in &mut cpu.x {
        *x = input.u64();
    }
    cpu.sp = input.u64();
    for v in &mut cpu.v {
        *v = u128::from(input.u64());
    }
    let mut report = Report::default();
    for _ in 0..MAX_WORDS {
        if input.is_empty() {
            break;
        }
        let word = input.u32();
        report.ops += 1;
        if let Some(insn) = decode(word) {
            if execute(&insn, &mut cpu).is_ok() {
                report.completions += 1;
            }
        }
    }
    report
}
