//! MPIDR_EL1 values of the vmapple machine (vmapple-machine.md §4).
//!
//! CPU *n* has Aff0 = n mod 16 and Aff1 = n div 16 (QEMU's GICv3 target-list
//! cluster of 16), Aff2 = Aff3 = 0. Bit 31 is RES1; U (bit 30) is 0 because
//! this is a multiprocessor system; MT (bit 24) is 0. What HVF shows for the
//! RES1/U/MT bits is unconfirmed in the spec; these are the architectural
//! values for such a system.

/// CPUs per Aff1 cluster.
pub const CLUSTER_SIZE: usize = 16;

/// The most CPUs a vmapple machine has.
pub const MAX_CPUS: usize = 32;

/// An MPIDR_EL1 value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Mpidr(pub u64);

impl Mpidr {
    const RES1: u64 = 1 << 31;
    /// The affinity fields (Aff3 in 39:32, Aff2..Aff0 in 23:0).
    pub const AFFINITY_MASK: u64 = 0xff_00ff_ffff;

    /// The MPIDR of linear CPU index `index`.
    pub const fn for_cpu(index: usize) -> Self {
        let aff0 = (index % CLUSTER_SIZE) as u64;
        let aff1 = ((index / CLUSTER_SIZE) & 0xff) as u64;
        Self(Self::RES1 | (aff1 << 8) | aff0)
    }

    /// The affinity bits only, as PSCI and the GIC compare them.
    pub const fn affinity(self) -> u64 {
        self.0 & Self::AFFINITY_MASK
    }

    pub const fn aff0(self) -> u8 {
        self.0 as u8
    }
    pub const fn aff1(self) -> u8 {
        (self.0 >> 8) as u8
    }
    pub const fn aff2(self) -> u8 {
        (self.0 >> 16) as u8
    }
    pub const fn aff3(self) -> u8 {
        (self.0 >> 32) as u8
    }

    /// The linear CPU index whose affinity is `affinity`, if any CPU of a
    /// machine with `cpus` CPUs has it.
    pub fn cpu_index(affinity: u64, cpus: usize) -> Option<usize> {
        (0..cpus).find(|&i| Self::for_cpu(i).affinity() == affinity & Self::AFFINITY_MASK)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_vectors() {
        assert_eq!(Mpidr::for_cpu(0).affinity(), 0x000);
        assert_eq!(Mpidr::for_cpu(15).affinity(), 0x00f);
        assert_eq!(Mpidr::for_cpu(16).affinity(), 0x100);
        // vmapple-machine.md §20.1 vector 2: CPU 17 is Aff1=1, Aff0=1.
        assert_eq!(Mpidr::for_cpu(17).affinity(), 0x101);
        assert_eq!(Mpidr::for_cpu(31).affinity(), 0x10f);
        assert_eq!(Mpidr::for_cpu(3).0, 0x8000_0003);
    }

    #[test]
    fn reverse_lookup() {
        assert_eq!(Mpidr::cpu_index(0x101, 32), Some(17));
        assert_eq!(Mpidr::cpu_index(0x8000_0101, 32), Some(17));
        assert_eq!(Mpidr::cpu_index(0x101, 17), None);
        assert_eq!(Mpidr::cpu_index(0x10, 32), None, "Aff0 never exceeds 15");
    }
}
