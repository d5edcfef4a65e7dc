//! AArch64 architecture facts shared by every vmapple accelerator.
//!
//! Nothing here knows a device or an accelerator: it is the Arm
//! Architecture Reference Manual (DDI 0487) and the PSCI specification
//! (DEN 0022) turned into types, so that the software CPU and
//! Hypervisor.framework decode and answer the guest the same way.

pub mod apple_hvc;
pub mod esr;
pub mod loadstore;
pub mod mpidr;
pub mod psci;
pub mod stage1;
pub mod sysreg;
pub mod timer;

pub use mpidr::Mpidr;
pub use sysreg::SysReg;
