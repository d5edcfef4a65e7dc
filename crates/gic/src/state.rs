//! The GIC's state and the rules that decide which interrupt a CPU sees
//! (IHI 0069 §4.1 interrupt states, §4.8 priorities and preemption).
//!
//! One [`State`] holds everything; the distributor, redistributor and CPU
//! interface modules are register views onto it. Single security state
//! (GICD_CTLR.DS = 1): group 0 is signalled as FIQ, group 1 as IRQ.

use arch_arm64::Mpidr;

/// INTIDs below this are banked per CPU (16 SGIs + 16 PPIs).
pub const PRIVATE_IRQS: u32 = 32;
/// The special INTID read from IAR when nothing can be acknowledged.
pub const INTID_SPURIOUS: u32 = 1023;
/// Priority bits implemented (ICC_CTLR_EL1.PRIbits + 1). Five, like
/// QEMU's model: 32 preemption levels, and only AP0R0/AP1R0 exist.
pub const PRIORITY_BITS: u32 = 5;
/// Mask of the implemented priority bits.
pub const PRIORITY_MASK: u8 = !((1u8 << (8 - PRIORITY_BITS)) - 1);
/// Smallest BPR0 with five priority bits; BPR1's is one more.
pub const MIN_BPR0: u8 = 7 - PRIORITY_BITS as u8;
/// "No priority": idle running priority, empty PMR comparisons.
pub const IDLE_PRIORITY: u8 = 0xff;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Group {
    G0,
    G1,
}

/// One interrupt's configuration and state.
#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Irq {
    pub enabled: bool,
    /// Software- or edge-set pending latch.
    pub pending_latch: bool,
    /// The input line's level (SPIs and PPIs from devices).
    pub level: bool,
    pub active: bool,
    /// Group 1 (IGROUPR bit set) rather than group 0.
    pub group1: bool,
    pub priority: u8,
    /// Edge-triggered (ICFGR = 0b10); level-sensitive otherwise.
    pub edge: bool,
}

impl Irq {
    /// Pending as the architecture defines it: the latch, or for a
    /// level-sensitive interrupt the asserted input.
    pub fn pending(&self) -> bool {
        self.pending_latch || (!self.edge && self.level)
    }

    pub fn group(&self) -> Group {
        if self.group1 {
            Group::G1
        } else {
            Group::G0
        }
    }

    /// Drives the input line. A rising edge latches an edge-triggered
    /// interrupt; a level-sensitive one simply follows the line.
    pub fn set_line(&mut self, level: bool) {
        if self.edge && level && !self.level {
            self.pending_latch = true;
        }
        self.level = level;
    }

    fn reset(edge: bool) -> Self {
        Self {
            edge,
            ..Self::default()
        }
    }
}

/// The CPU interface registers of one CPU (ICC_*_EL1).
#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize)]
pub struct CpuInterface {
    pub pmr: u8,
    pub bpr0: u8,
    pub bpr1: u8,
    /// ICC_CTLR_EL1.CBPR: BPR0 governs group 1 too.
    pub cbpr: bool,
    /// ICC_CTLR_EL1.EOImode: EOIR only drops priority, DIR deactivates.
    pub eoi_mode: bool,
    pub igrpen0: bool,
    pub igrpen1: bool,
    /// Active priorities: bit n set = an interrupt of group priority n*8
    /// (with five priority bits) is active. Index 0 group 0, 1 group 1.
    pub apr: [u32; 2],
}

impl Default for CpuInterface {
    fn default() -> Self {
        Self {
            pmr: 0,
            bpr0: MIN_BPR0,
            bpr1: MIN_BPR0 + 1,
            cbpr: false,
            eoi_mode: false,
            igrpen0: false,
            igrpen1: false,
            apr: [0; 2],
        }
    }
}

/// Per-CPU state: the banked SGIs/PPIs, redistributor and CPU interface.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Cpu {
    pub private: [Irq; PRIVATE_IRQS as usize],
    /// GICR_WAKER.ProcessorSleep.
    pub processor_sleep: bool,
    pub icc: CpuInterface,
    pub affinity: u64,
}

impl Cpu {
    fn new(index: usize) -> Self {
        let mut private = [Irq::default(); PRIVATE_IRQS as usize];
        // SGIs are always edge-triggered; PPIs reset level-sensitive.
        for sgi in private.iter_mut().take(16) {
            *sgi = Irq::reset(true);
        }
        Self {
            private,
            processor_sleep: true,
            icc: CpuInterface::default(),
            affinity: Mpidr::for_cpu(index).affinity(),
        }
    }
}

impl Cpu {
    /// Aff3.Aff2.Aff1.Aff0 packed into 32 bits, as GICR_TYPER reports it.
    pub fn affinity_value(&self) -> u64 {
        (self.affinity & 0xff_ffff) | ((self.affinity >> 32) & 0xff) << 24
    }
}

/// The highest-priority pending interrupt a CPU could take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub intid: u32,
    pub priority: u8,
    pub group: Group,
}

/// The whole GIC.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct State {
    /// GICD_CTLR.EnableGrp0 / EnableGrp1.
    pub enable_grp0: bool,
    pub enable_grp1: bool,
    /// SPIs, index = INTID - 32.
    pub spis: Vec<Irq>,
    /// `GICD_IROUTER<n>` for each SPI (Aff3..Aff0 and IRM).
    pub routes: Vec<u64>,
    pub cpus: Vec<Cpu>,
    /// INTIDs that message writes may raise (GICD_SETSPI_NSR and the
    /// GICv2m frame); empty without message-based SPIs. Board wiring, so
    /// it survives reset.
    pub message_intids: std::ops::Range<u32>,
}

/// GICD_IROUTER.Interrupt_Routing_Mode: deliver to any participating CPU.
pub const IROUTER_IRM: u64 = 1 << 31;
/// Bits of GICD_IROUTER that hold state.
pub const IROUTER_MASK: u64 = Mpidr::AFFINITY_MASK | IROUTER_IRM;

impl State {
    pub fn new(cpus: usize, spis: u32) -> Self {
        Self {
            enable_grp0: false,
            enable_grp1: false,
            spis: vec![Irq::default(); spis as usize],
            routes: vec![0; spis as usize],
            cpus: (0..cpus).map(Cpu::new).collect(),
            message_intids: 0..0,
        }
    }

    pub fn reset(&mut self) {
        let message_intids = self.message_intids.clone();
        *self = Self::new(self.cpus.len(), self.spis.len() as u32);
        self.message_intids = message_intids;
    }

    pub fn num_irqs(&self) -> u32 {
        PRIVATE_IRQS + self.spis.len() as u32
    }

    /// The interrupt `intid` as seen from `cpu` (banked for INTIDs < 32).
    pub fn irq(&self, cpu: usize, intid: u32) -> Option<&Irq> {
        if intid < PRIVATE_IRQS {
            self.cpus.get(cpu)?.private.get(intid as usize)
        } else {
            self.spis.get((intid - PRIVATE_IRQS) as usize)
        }
    }

    pub fn irq_mut(&mut self, cpu: usize, intid: u32) -> Option<&mut Irq> {
        if intid < PRIVATE_IRQS {
            self.cpus.get_mut(cpu)?.private.get_mut(intid as usize)
        } else {
            self.spis.get_mut((intid - PRIVATE_IRQS) as usize)
        }
    }

    fn group_enabled_in_distributor(&self, group: Group) -> bool {
        match group {
            Group::G0 => self.enable_grp0,
            Group::G1 => self.enable_grp1,
        }
    }

    /// The CPU an SPI is delivered to. IRM = 1 ("any participating CPU")
    /// picks the lowest-numbered CPU whose interface has the interrupt's
    /// group enabled, else CPU 0: deterministic, and Linux never sets IRM.
    pub fn spi_target(&self, spi_index: usize) -> Option<usize> {
        let route = *self.routes.get(spi_index)?;
        if route & IROUTER_IRM != 0 {
            let group = self.spis[spi_index].group();
            let enabled = |c: &Cpu| match group {
                Group::G0 => c.icc.igrpen0,
                Group::G1 => c.icc.igrpen1,
            };
            return Some(self.cpus.iter().position(enabled).unwrap_or(0));
        }
        let affinity = route & Mpidr::AFFINITY_MASK;
        self.cpus.iter().position(|c| c.affinity == affinity)
    }

    /// The highest-priority interrupt pending for `cpu` that the
    /// distributor forwards (enabled, pending, not active, group enabled).
    /// Equal priorities go to the lowest INTID.
    pub fn highest_pending(&self, cpu: usize) -> Option<Candidate> {
        let mut best: Option<Candidate> = None;
        let mut consider = |intid: u32, irq: &Irq| {
            if irq.enabled
                && irq.pending()
                && !irq.active
                && self.group_enabled_in_distributor(irq.group())
            {
                let priority = irq.priority & PRIORITY_MASK;
                if best.is_none_or(|b| priority < b.priority) {
                    best = Some(Candidate {
                        intid,
                        priority,
                        group: irq.group(),
                    });
                }
            }
        };
        let state = self.cpus.get(cpu)?;
        for (intid, irq) in state.private.iter().enumerate() {
            consider(intid as u32, irq);
        }
        for (index, irq) in self.spis.iter().enumerate() {
            if irq.enabled && irq.pending() && self.spi_target(index) == Some(cpu) {
                consider(PRIVATE_IRQS + index as u32, irq);
            }
        }
        best
    }

    /// Running priority: that of the highest active group priority, or
    /// idle.
    pub fn running_priority(&self, cpu: usize) -> u8 {
        let apr = self.cpus[cpu].icc.apr;
        let bits = apr[0] | apr[1];
        if bits == 0 {
            IDLE_PRIORITY
        } else {
            (bits.trailing_zeros() << (8 - PRIORITY_BITS)) as u8
        }
    }

    /// The group whose active priority is the running priority.
    pub fn running_group(&self, cpu: usize) -> Option<Group> {
        let apr = self.cpus[cpu].icc.apr;
        match (apr[0].trailing_zeros(), apr[1].trailing_zeros()) {
            (32, 32) => None,
            (g0, g1) if g0 <= g1 => Some(Group::G0),
            _ => Some(Group::G1),
        }
    }

    /// Mask selecting the group-priority bits of a priority for `group`
    /// (ICC_BPR0/1; group 1 uses BPR0 when CBPR is set).
    pub fn group_priority_mask(&self, cpu: usize, group: Group) -> u8 {
        let icc = &self.cpus[cpu].icc;
        let shift = match group {
            Group::G1 if !icc.cbpr => icc.bpr1,
            _ => icc.bpr0 + 1,
        };
        (0xffu32 << shift.min(8)) as u8
    }

    /// The candidate `cpu`'s interface signals now, if any: it must beat
    /// the priority mask and, by group priority, the running priority, and
    /// its group must be enabled at the interface.
    pub fn signalled(&self, cpu: usize) -> Option<Candidate> {
        let candidate = self.highest_pending(cpu)?;
        let icc = &self.cpus[cpu].icc;
        let enabled = match candidate.group {
            Group::G0 => icc.igrpen0,
            Group::G1 => icc.igrpen1,
        };
        if !enabled || candidate.priority >= icc.pmr & PRIORITY_MASK {
            return None;
        }
        let running = self.running_priority(cpu);
        if running != IDLE_PRIORITY {
            let mask = self.group_priority_mask(cpu, candidate.group);
            if candidate.priority & mask >= running & mask {
                return None;
            }
        }
        Some(candidate)
    }

    /// `(irq, fiq)` outputs to `cpu`.
    pub fn outputs(&self, cpu: usize) -> (bool, bool) {
        match self.signalled(cpu).map(|c| c.group) {
            Some(Group::G1) => (true, false),
            Some(Group::G0) => (false, true),
            None => (false, false),
        }
    }
}
