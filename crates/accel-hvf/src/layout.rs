//! What the framework demands of the guest-physical layout, checked before
//! any framework call so that the errors are clear and testable anywhere.
//!
//! Stage-2 mappings are made in host pages, 16 KiB on Apple silicon: every
//! RAM region's guest address, size and host address must be multiples of
//! that. The guest-physical (IPA) space is 36 bits by default; a VM whose
//! RAM ends above that needs a larger IPA size, which the hardware may not
//! offer.

use accel::AccelError;
use arch_arm64::SysReg;

/// Host page size of macOS on Apple silicon.
pub const HOST_PAGE_SIZE: u64 = 16 << 10;

/// One RAM region to map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRegion {
    pub guest: u64,
    pub len: u64,
    pub host: usize,
}

/// Checks every region and returns the top (exclusive) of guest RAM.
/// Guest addresses and sizes must be whole stage-2 pages (16 KiB); host
/// addresses whole host pages (`host_page`: 16 KiB on Apple silicon, the
/// host's own under the framework double).
pub fn check_ram(regions: &[RamRegion], host_page: u64) -> Result<u64, AccelError> {
    let aligned = |v: u64| v % HOST_PAGE_SIZE == 0;
    let host_aligned = |v: u64| host_page != 0 && v % host_page == 0;
    let mut spans: Vec<(u64, u64)> = Vec::with_capacity(regions.len());
    for r in regions {
        let Some(end) = r.guest.checked_add(r.len) else {
            return Err(AccelError::setup(format!(
                "RAM region at {:#x}+{:#x} wraps the address space",
                r.guest, r.len
            )));
        };
        if r.len == 0 || !aligned(r.guest) || !aligned(r.len) || !host_aligned(r.host as u64) {
            return Err(AccelError::setup(format!(
                "RAM region {:#x}..{end:#x} (host {:#x}) is not made of whole 16 KiB \
                 host pages, which Hypervisor.framework requires",
                r.guest, r.host
            )));
        }
        spans.push((r.guest, end));
    }
    spans.sort_unstable();
    for pair in spans.windows(2) {
        if pair[1].0 < pair[0].1 {
            return Err(AccelError::setup(format!(
                "RAM regions {:#x}..{:#x} and {:#x}..{:#x} overlap",
                pair[0].0, pair[0].1, pair[1].0, pair[1].1
            )));
        }
    }
    Ok(spans.last().map_or(0, |s| s.1))
}

/// Bits of IPA needed to address everything below `top` (exclusive).
pub fn required_ipa_bits(top: u64) -> u32 {
    match top {
        0 | 1 => 0,
        t => 64 - (t - 1).leading_zeros(),
    }
}

/// The IPA size to configure: `None` keeps the framework's default (which
/// suffices), `Some(bits)` asks for more. Fails if the host cannot.
pub fn choose_ipa_bits(
    ram_top: u64,
    default_bits: u32,
    max_bits: u32,
) -> Result<Option<u32>, AccelError> {
    let needed = required_ipa_bits(ram_top);
    if needed <= default_bits {
        Ok(None)
    } else if needed <= max_bits {
        Ok(Some(needed))
    } else {
        Err(AccelError::setup(format!(
            "guest RAM ends at {ram_top:#x}, which needs a {needed}-bit guest-physical \
             address space; this Mac offers at most {max_bits} bits (use less memory)"
        )))
    }
}

/// The framework's `hv_sys_reg_t` for a system register: the MSR/MRS
/// fields packed as op0:op1:CRn:CRm:op2 in 2:3:4:4:3 bits.
pub const fn hv_sys_reg(reg: SysReg) -> u16 {
    ((reg.op0() << 14) | (reg.op1() << 11) | (reg.crn() << 7) | (reg.crm() << 3) | reg.op2()) as u16
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exits::{SP_EL1, VBAR_EL1};
    use arch_arm64::sysreg::{CNTV_CTL_EL0, CNTV_CVAL_EL0, MPIDR_EL1};

    const MIB: u64 = 1 << 20;

    fn region(guest: u64, len: u64) -> RamRegion {
        RamRegion {
            guest,
            len,
            host: 0x1_0000_0000usize.wrapping_add(guest as usize),
        }
    }

    #[test]
    fn the_vmapple_layout_is_accepted() {
        let regions = [
            region(0x10_0000, MIB),
            region(0x40_0000, 64 << 10),
            region(0x7000_0000, 4096 * MIB),
        ];
        assert_eq!(check_ram(&regions, HOST_PAGE_SIZE).unwrap(), 0x1_7000_0000);
        assert_eq!(check_ram(&[], HOST_PAGE_SIZE).unwrap(), 0);
    }

    #[test]
    fn misaligned_or_overlapping_regions_are_refused() {
        // 4 KiB granule is fine for the software CPU but not here.
        let err = check_ram(&[region(0x7000_1000, MIB)], HOST_PAGE_SIZE).unwrap_err();
        assert!(err.to_string().contains("16 KiB"), "{err}");
        assert!(check_ram(&[region(0x7000_0000, MIB + 4096)], HOST_PAGE_SIZE).is_err());
        let mut r = region(0x7000_0000, MIB);
        r.host += 4096;
        assert!(check_ram(&[r], HOST_PAGE_SIZE).is_err());
        assert!(check_ram(&[region(0x7000_0000, 0)], HOST_PAGE_SIZE).is_err());
        assert!(check_ram(&[region(u64::MAX - 0x3fff, 0x8000)], HOST_PAGE_SIZE).is_err());
        let err = check_ram(
            &[region(0x7000_0000, 2 * MIB), region(0x7010_0000, MIB)],
            HOST_PAGE_SIZE,
        )
        .unwrap_err();
        assert!(err.to_string().contains("overlap"), "{err}");
    }

    #[test]
    fn ipa_size_grows_only_when_ram_needs_it() {
        assert_eq!(required_ipa_bits(1 << 36), 36);
        assert_eq!(required_ipa_bits((1 << 36) + 1), 37);
        assert_eq!(required_ipa_bits(0x7000_0000 + 128 * MIB), 31);
        assert_eq!(choose_ipa_bits(0x1_7000_0000, 36, 40).unwrap(), None);
        // 64 GiB of RAM from 0x7000_0000 ends above 2^36.
        assert_eq!(
            choose_ipa_bits(0x7000_0000 + (64 << 30), 36, 40).unwrap(),
            Some(37)
        );
        let err = choose_ipa_bits(1 << 41, 36, 40).unwrap_err();
        assert!(err.to_string().contains("at most 40 bits"), "{err}");
    }

    #[test]
    fn sysreg_numbers_match_the_framework_header() {
        // HV_SYS_REG_MPIDR_EL1, _CNTV_CTL_EL0, _CNTV_CVAL_EL0, _SP_EL1,
        // _VBAR_EL1 as Hypervisor/hv_vcpu_types.h defines them.
        assert_eq!(hv_sys_reg(MPIDR_EL1), 0xc005);
        assert_eq!(hv_sys_reg(CNTV_CTL_EL0), 0xdf19);
        assert_eq!(hv_sys_reg(CNTV_CVAL_EL0), 0xdf1a);
        assert_eq!(hv_sys_reg(SP_EL1), 0xe208);
        assert_eq!(hv_sys_reg(VBAR_EL1), 0xc600);
    }
}
