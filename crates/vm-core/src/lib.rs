//! The small world every vmapple device lives in.
//!
//! Devices never see an accelerator or a machine. They are reached through
//! [`MmioDevice`] on an [`MmioBus`], touch guest RAM only through
//! [`GuestRam`] (every access bounds-checked by `vm-memory`), and signal
//! the interrupt controller through an [`IrqLine`]. That keeps each device
//! testable on its own with a fake line and a scratch memory.

pub mod bus;
pub mod error_chain;
pub mod guest_error;
pub mod irq;
pub mod memory;
pub mod regs;
pub mod sync;

pub use bus::{AccessWidth, BusError, MmioBus, MmioDevice};
#[cfg(any(test, feature = "test-util"))]
pub use irq::TestIrq;
pub use irq::{IrqLine, NoIrq};
pub use memory::GuestRam;

/// Re-exported so that [`guest_error!`] works in crates without their own
/// `tracing` dependency.
#[doc(hidden)]
pub use tracing;
