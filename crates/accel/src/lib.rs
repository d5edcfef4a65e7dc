//! The contract between the machine and an accelerator.
//!
//! An accelerator (the software CPU, Hypervisor.framework) runs vCPUs and
//! reports what they do that needs the VMM as a [`VcpuExit`]. It hands each
//! one to the machine's [`ExitHandler`] and applies the [`ExitResponse`].
//! The handler is the only place where MMIO dispatch, the GIC CPU interface
//! and PSCI are implemented, so every accelerator behaves the same.
//!
//! State that both sides touch — which vCPUs are powered, their interrupt
//! lines, why the VM must stop — lives in [`VmControl`], shared by the
//! machine, the interrupt controller and the accelerator.

mod control;

pub use control::{CpuPower, Kick, StopReason, VmControl};

pub use arch_arm64::apple_hvc::RegisterWrites;
use arch_arm64::SysReg;
pub use vm_core::AccessWidth;

/// Linear vCPU index (0-based): the order of cfg `cpu_ids` and of GIC
/// redistributors; the MPIDR follows from it.
pub type CpuId = usize;

/// Something a vCPU did that the VMM must complete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuExit {
    /// A load from an address outside guest RAM.
    MmioRead { addr: u64, width: AccessWidth },
    /// A store to an address outside guest RAM.
    MmioWrite {
        addr: u64,
        width: AccessWidth,
        value: u64,
    },
    /// MRS of a register the accelerator does not implement itself.
    SysRegRead { reg: SysReg },
    /// MSR of a register the accelerator does not implement itself.
    SysRegWrite { reg: SysReg, value: u64 },
    /// HVC #imm with x0..x3.
    Hvc { imm: u16, args: [u64; 4] },
}

/// How the VMM completed an exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitResponse {
    /// Nothing to hand back (stores, handled writes).
    Done,
    /// The value of a load or MRS; for an HVC, the new x0.
    Value(u64),
    /// The access is UNDEFINED: the guest takes an Undefined Instruction
    /// exception at the instruction.
    Undefined,
    /// The calling vCPU powered itself off (PSCI CPU_OFF): stop running it.
    CpuOff,
    /// Return 0 in x0 and wait for an interrupt as WFI does (CPU_SUSPEND).
    Suspend,
    /// For an HVC: set these registers (x0..x4, system registers such as
    /// the pointer-authentication keys) on the calling vCPU.
    Registers(RegisterWrites),
}

/// The machine side of every exit.
pub trait ExitHandler: Send + Sync {
    fn handle(&self, cpu: CpuId, exit: VcpuExit) -> ExitResponse;
}

/// Per-vCPU wiring an accelerator needs from the machine.
#[derive(Clone)]
pub struct VcpuConfig {
    /// MPIDR_EL1 the guest reads.
    pub mpidr: u64,
    /// Where the EL1 virtual timer's output goes (PPI 27 of this vCPU's
    /// redistributor). Used by accelerators that emulate the timer.
    pub vtimer_irq: std::sync::Arc<dyn vm_core::IrqLine>,
    /// Advertise pointer authentication in ID_AA64ISAR1_EL1 where the
    /// accelerator chooses what the guest sees (the software CPU).
    pub pointer_auth: bool,
}

/// Register state of a stopped vCPU, for diagnostics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CpuSnapshot {
    pub pc: u64,
    pub pstate: u64,
    pub x: [u64; 31],
    pub sp_el0: u64,
    pub sp_el1: u64,
    pub elr_el1: u64,
    pub esr_el1: u64,
    pub far_el1: u64,
    pub vbar_el1: u64,
    pub sctlr_el1: u64,
}

impl std::fmt::Display for CpuSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "pc {:#018x} pstate {:#010x} sctlr {:#x} vbar {:#x}",
            self.pc, self.pstate, self.sctlr_el1, self.vbar_el1
        )?;
        writeln!(
            f,
            "elr_el1 {:#x} esr_el1 {:#x} far_el1 {:#x} sp_el0 {:#x} sp_el1 {:#x}",
            self.elr_el1, self.esr_el1, self.far_el1, self.sp_el0, self.sp_el1
        )?;
        for (i, pair) in self.x.chunks(4).enumerate() {
            for (j, v) in pair.iter().enumerate() {
                write!(f, "x{:<2} {:#018x}  ", i * 4 + j, v)?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

/// Errors an accelerator reports to the VMM (not guest errors).
#[derive(Debug, thiserror::Error)]
pub enum AccelError {
    #[error("accelerator setup failed: {what}")]
    Setup {
        what: String,
        #[source]
        source: Option<BoxError>,
    },
    #[error("accelerator failed while running: {what}")]
    Run {
        what: String,
        #[source]
        source: Option<BoxError>,
    },
}

/// The host's own error under an [`AccelError`] (Unicorn's, an I/O
/// error), whatever its type.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl AccelError {
    /// Setting the VM up failed: `what` says which step.
    pub fn setup(what: impl Into<String>) -> Self {
        AccelError::Setup {
            what: what.into(),
            source: None,
        }
    }

    /// Setting the VM up failed in `what`, because of `source`.
    pub fn setup_from(what: impl Into<String>, source: impl Into<BoxError>) -> Self {
        AccelError::Setup {
            what: what.into(),
            source: Some(source.into()),
        }
    }

    /// Running the VM failed: `what` says how.
    pub fn run(what: impl Into<String>) -> Self {
        AccelError::Run {
            what: what.into(),
            source: None,
        }
    }

    /// Running the VM failed in `what`, because of `source`.
    pub fn run_from(what: impl Into<String>, source: impl Into<BoxError>) -> Self {
        AccelError::Run {
            what: what.into(),
            source: Some(source.into()),
        }
    }

    /// The same failure, reported as part of setting up (a call that can
    /// fail either way failed while the VM was being built).
    pub fn into_setup(self) -> Self {
        match self {
            AccelError::Run { what, source } => AccelError::Setup { what, source },
            setup => setup,
        }
    }
}

/// A VM on some accelerator: its vCPUs, its memory map.
pub trait Vm {
    /// Short name for logs ("tcg", "hvf").
    fn name(&self) -> &'static str;

    /// Runs the vCPUs until `control` holds a stop reason, then returns it.
    ///
    /// vCPUs start when [`VmControl`] marks them pending (CPU 0 at boot,
    /// others through PSCI CPU_ON), each from the architectural reset state
    /// with the given entry point and context id.
    fn run(
        &mut self,
        handler: &dyn ExitHandler,
        control: &VmControl,
    ) -> Result<StopReason, AccelError>;

    /// Register state of a vCPU, if the accelerator can tell.
    fn snapshot(&self, cpu: CpuId) -> Option<CpuSnapshot>;

    /// Why this accelerator cannot save its vCPUs, if it cannot.
    fn cannot_save(&self) -> Option<String> {
        Some(format!(
            "the {} accelerator cannot save vCPU state",
            self.name()
        ))
    }

    /// Every vCPU's state (registers, system registers, timers, whether it
    /// waits for an interrupt), in the accelerator's own encoding, between
    /// two [`Vm::run`]s. The next `run` continues from the same state.
    fn save_cpus(&mut self) -> Result<Vec<u8>, AccelError> {
        Err(AccelError::run(
            self.cannot_save().unwrap_or_else(|| "cannot save".into()),
        ))
    }

    /// Puts back what [`Vm::save_cpus`] returned, before the first `run`;
    /// the vCPUs then carry on from it instead of booting.
    fn restore_cpus(&mut self, bytes: &[u8]) -> Result<(), AccelError> {
        let _ = bytes;
        Err(AccelError::setup(
            self.cannot_save()
                .unwrap_or_else(|| "cannot restore".into()),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn errors_keep_their_cause() {
        let e = AccelError::setup_from("mapping RAM", std::io::Error::other("no memory"));
        assert_eq!(e.to_string(), "accelerator setup failed: mapping RAM");
        assert_eq!(e.source().unwrap().to_string(), "no memory");
        let run = AccelError::run_from("vCPU 0", std::io::Error::other("gone"));
        let setup = run.into_setup();
        assert!(matches!(setup, AccelError::Setup { .. }));
        assert_eq!(setup.source().unwrap().to_string(), "gone");
        assert!(AccelError::run("x").source().is_none());
    }
}
