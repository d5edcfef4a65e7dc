//! vmapple's platform devices, each in one module that follows one section
//! of `shared/spec/vmapple-machine.md`:
//!
//! - [`pl011`]: the PL011 UART console (§13.1), with its host ends in
//!   [`serial`].
//!
//! Devices reach the world only through `vm-core`'s traits: `MmioDevice`
//! for guest accesses, `IrqLine` for their interrupt output, guest memory
//! for DMA.

pub mod pl011;
pub mod serial;
