//! A GICv3 interrupt controller in userspace (Arm IHI 0069), as the
//! vmapple machine has it (vmapple-machine.md §5): architecture revision 3,
//! one security state (GICD_CTLR.DS = 1), affinity routing always on, no
//! ITS or LPIs, up to 32 CPUs each with a redistributor, and the CPU
//! interface reached through the `ICC_*_EL1` system registers.
//!
//! With [`GicV3::enable_message_spis`] a block of SPIs also takes
//! message writes, through GICD_SETSPI_NSR and a GICv2m frame
//! ([`message`]).
//!
//! Group 0 interrupts are signalled as FIQ, group 1 as IRQ. Priorities have
//! five implemented bits (ICC_CTLR_EL1.PRIbits = 4), like QEMU's model.
//! GICR_WAKER's handshake completes at once; a sleeping redistributor
//! still forwards interrupts (nothing depends on it here).
//!
//! All state sits behind one lock. After every change the GIC recomputes
//! the affected CPUs' IRQ/FIQ outputs and reports them through
//! [`CpuInterruptOutputs`], while still holding the lock so that levels
//! reach the CPUs in the order they were decided.

mod cpu_interface;
mod distributor;
pub mod message;
mod redistributor;
mod registers;
mod state;

use std::sync::{Arc, Mutex, MutexGuard};
use vm_core::sync::lock;

use arch_arm64::SysReg;
use vm_core::{guest_error, AccessWidth, IrqLine, MmioDevice};

pub use state::State;
use state::{IROUTER_MASK, MIN_BPR0, PRIORITY_MASK, PRIVATE_IRQS};

/// Where the GIC's CPU outputs go.
pub trait CpuInterruptOutputs: Send + Sync {
    /// The IRQ and FIQ outputs to `cpu` may have changed (called with the
    /// current levels; repeating unchanged levels is allowed). Called while
    /// the GIC lock is held: implementations must not call back into the GIC.
    fn set(&self, cpu: usize, irq: bool, fiq: bool);
}

/// The interrupt controller.
pub struct GicV3 {
    state: Mutex<State>,
    outputs: Arc<dyn CpuInterruptOutputs>,
}

impl GicV3 {
    pub const DIST_SIZE: u64 = 0x1_0000;
    /// RD frame + SGI frame per CPU.
    pub const REDIST_STRIDE: u64 = redistributor::FRAME_STRIDE;
    /// The machine maps all 4 MiB (32 frames); frames past the last CPU
    /// are RAZ/WI.
    pub const REDIST_REGION_SIZE: u64 = 0x40_0000;

    /// A GIC for `cpus` CPUs (1..=32) and `spis` shared interrupts (a
    /// multiple of 32, at most 988).
    pub fn new(cpus: usize, spis: u32, outputs: Arc<dyn CpuInterruptOutputs>) -> Arc<Self> {
        let cpus = cpus.clamp(1, 32);
        let spis = (spis / 32 * 32).min(988 / 32 * 32);
        Arc::new(Self {
            state: Mutex::new(State::new(cpus, spis)),
            outputs,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn update(&self, state: &State, cpu: usize) {
        let (irq, fiq) = state.outputs(cpu);
        self.outputs.set(cpu, irq, fiq);
    }

    fn update_all(&self, state: &State) {
        for cpu in 0..state.cpus.len() {
            self.update(state, cpu);
        }
    }

    pub fn distributor(self: &Arc<Self>) -> Arc<dyn MmioDevice> {
        Arc::new(Distributor(self.clone()))
    }

    pub fn redistributors(self: &Arc<Self>) -> Arc<dyn MmioDevice> {
        Arc::new(Redistributors(self.clone()))
    }

    /// Lets `count` SPIs from SPI `first_spi` (INTID 32 + `first_spi`) be
    /// raised by message writes: GICD_TYPER.MBIS reads 1 and the doorbells
    /// of [`message`] act on them. Board wiring, called once before the
    /// guest runs; a range past the implemented SPIs is refused (`false`).
    pub fn enable_message_spis(&self, first_spi: u32, count: u32) -> bool {
        let mut state = self.lock();
        let Some(start) = first_spi.checked_add(PRIVATE_IRQS) else {
            return false;
        };
        match start.checked_add(count) {
            Some(end) if count > 0 && end <= state.num_irqs() => {
                state.message_intids = start..end;
                true
            }
            _ => {
                tracing::error!(
                    "gic: the machine asked for {count} message SPIs from SPI {first_spi}, \
                     past the implemented SPIs; none enabled"
                );
                false
            }
        }
    }

    /// The INTIDs message writes may raise; empty without them.
    pub fn message_intids(&self) -> std::ops::Range<u32> {
        self.lock().message_intids.clone()
    }

    /// Raises message SPI `intid`, as a write of `intid` to a doorbell
    /// does (what a PCI function's MSI write to GICD_SETSPI_NSR or the v2m
    /// frame ends in). Outside the message range: ignored and logged.
    pub fn signal_message(&self, intid: u32) {
        let mut state = self.lock();
        if let Some(cpu) = message::ring(&mut state, intid, message::Doorbell::Set, "MSI") {
            self.update(&state, cpu);
        }
    }

    /// The GICv2m MSI frame ([`message`]), to be mapped for
    /// [`message::V2M_FRAME_SIZE`] bytes.
    pub fn v2m_frame(self: &Arc<Self>) -> Arc<dyn MmioDevice> {
        Arc::new(message::V2mFrame(self.clone()))
    }

    /// SPI `spi` (INTID 32 + spi), a level-sensitive input from a device.
    pub fn spi(self: &Arc<Self>, spi: u32) -> Arc<dyn IrqLine> {
        let intid = spi + PRIVATE_IRQS;
        if intid >= self.lock().num_irqs() {
            tracing::error!("gic: the machine wired nonexistent SPI {spi}; it stays unconnected");
            return Arc::new(vm_core::NoIrq);
        }
        Arc::new(Line {
            gic: self.clone(),
            cpu: 0,
            intid,
        })
    }

    /// PPI `intid` (16..=31) of `cpu`.
    pub fn ppi(self: &Arc<Self>, cpu: usize, intid: u32) -> Arc<dyn IrqLine> {
        if !(16..PRIVATE_IRQS).contains(&intid) || cpu >= self.lock().cpus.len() {
            tracing::error!(
                "gic: the machine wired nonexistent PPI {intid} of CPU {cpu}; it stays unconnected"
            );
            return Arc::new(vm_core::NoIrq);
        }
        Arc::new(Line {
            gic: self.clone(),
            cpu,
            intid,
        })
    }

    /// MRS of an `ICC_*` register by `cpu`; `None` = UNDEFINED.
    pub fn read_sysreg(&self, cpu: usize, reg: SysReg) -> Option<u64> {
        let mut state = self.lock();
        if cpu >= state.cpus.len() {
            return None;
        }
        let value = cpu_interface::read(&mut state, cpu, reg)?;
        // Acknowledging changes what the CPU is signalled.
        self.update(&state, cpu);
        Some(value)
    }

    /// MSR of an `ICC_*` register by `cpu`; `false` = UNDEFINED.
    pub fn write_sysreg(&self, cpu: usize, reg: SysReg, value: u64) -> bool {
        let mut state = self.lock();
        if cpu >= state.cpus.len() {
            return false;
        }
        let Some(targets) = cpu_interface::write(&mut state, cpu, reg, value) else {
            return false;
        };
        self.update(&state, cpu);
        for target in targets {
            self.update(&state, target);
        }
        true
    }

    /// Everything the GIC holds (distributor, redistributors, CPU
    /// interfaces with their active priorities, line levels), for a
    /// snapshot.
    pub fn save_state(&self) -> State {
        self.lock().clone()
    }

    /// Puts back what [`GicV3::save_state`] returned and drives the CPU
    /// outputs from it. A state for another shape of GIC is refused and
    /// changes nothing.
    pub fn restore_state(&self, saved: State) -> Result<(), String> {
        let mut state = self.lock();
        if saved.cpus.len() != state.cpus.len()
            || saved.spis.len() != state.spis.len()
            || saved.routes.len() != state.spis.len()
        {
            return Err(format!(
                "saved GIC has {} CPUs and {} SPIs, this one {} and {}",
                saved.cpus.len(),
                saved.spis.len(),
                state.cpus.len(),
                state.spis.len()
            ));
        }
        let affinities: Vec<u64> = state.cpus.iter().map(|c| c.affinity).collect();
        *state = saved;
        // The CPUs' identities are the machine's, not the file's.
        for (cpu, affinity) in state.cpus.iter_mut().zip(affinities) {
            cpu.affinity = affinity;
        }
        for route in &mut state.routes {
            *route &= IROUTER_MASK;
        }
        // Through the same masks as the guest's register writes: a file
        // cannot give a field a value the registers could not hold.
        let sanitize = |irq: &mut state::Irq| irq.priority &= PRIORITY_MASK;
        state.spis.iter_mut().for_each(sanitize);
        for cpu in &mut state.cpus {
            cpu.private.iter_mut().for_each(sanitize);
            let icc = &mut cpu.icc;
            icc.pmr &= PRIORITY_MASK;
            icc.bpr0 = (icc.bpr0 & 7).max(MIN_BPR0);
            icc.bpr1 = (icc.bpr1 & 7).max(MIN_BPR0 + 1);
        }
        self.update_all(&state);
        Ok(())
    }

    /// Drives every CPU output from the current state again.
    pub fn refresh_outputs(&self) {
        let state = self.lock();
        self.update_all(&state);
    }

    /// System reset: every register back to its reset value.
    pub fn reset(&self) {
        let mut state = self.lock();
        state.reset();
        self.update_all(&state);
    }
}

struct Distributor(Arc<GicV3>);

impl MmioDevice for Distributor {
    fn read(&self, offset: u64, width: AccessWidth) -> u64 {
        distributor::read(&self.0.lock(), offset, width)
    }

    fn write(&self, offset: u64, width: AccessWidth, value: u64) {
        let mut state = self.0.lock();
        distributor::write(&mut state, offset, width, value);
        // Routing, enables and group changes can move SPIs between CPUs.
        self.0.update_all(&state);
    }
}

struct Redistributors(Arc<GicV3>);

impl MmioDevice for Redistributors {
    fn read(&self, offset: u64, width: AccessWidth) -> u64 {
        redistributor::read(&self.0.lock(), offset, width)
    }

    fn write(&self, offset: u64, width: AccessWidth, value: u64) {
        let mut state = self.0.lock();
        if let Some(cpu) = redistributor::write(&mut state, offset, width, value) {
            self.0.update(&state, cpu);
        }
    }
}

/// A device's input to one interrupt.
struct Line {
    gic: Arc<GicV3>,
    /// The CPU whose banked PPI this is (ignored for SPIs).
    cpu: usize,
    intid: u32,
}

impl IrqLine for Line {
    fn set_level(&self, asserted: bool) {
        let mut state = self.gic.lock();
        let Some(irq) = state.irq_mut(self.cpu, self.intid) else {
            guest_error!("gic: line for INTID {} vanished", self.intid);
            return;
        };
        if irq.level == asserted {
            return;
        }
        irq.set_line(asserted);
        let target = if self.intid < PRIVATE_IRQS {
            Some(self.cpu)
        } else {
            state.spi_target((self.intid - PRIVATE_IRQS) as usize)
        };
        if let Some(cpu) = target {
            self.gic.update(&state, cpu);
        }
    }
}

#[cfg(test)]
mod tests;
