//! Portable core of the apple-gfx paravirtualised display.
//!
//! macOS guests drive a paravirtual GPU whose host side is Apple's closed
//! ParavirtualizedGraphics.framework. This crate holds everything about the
//! `apple-gfx-mmio` (vmapple) and `apple-gfx-pci` devices that is not a
//! literal Objective-C, Metal or Mach call (apple-gfx.md §17): display-mode
//! configuration, guest-memory bookkeeping for the framework, register
//! forwarding with its re-entrancy rules, interrupt routing, the frame and
//! cursor state machines, the MMIO variant's register windows ([`mmio`])
//! and the PCI variant as a PCI function ([`pci`]; it needs MSI, so it is
//! not attachable on vmapple). The framework is reached
//! through the traits in [`framework`]; a macOS glue crate implements them,
//! and `fake` implements them for tests on any host.
//!
//! Spec: `apple-gfx.md` (whole), `vmapple-machine.md` §2, §3, §15.

pub mod cursor;
pub mod device;
pub mod frame;
pub mod framework;
pub mod irq;
pub mod memory;
pub mod mmio;
pub mod modes;
pub mod pci;

#[cfg(any(test, feature = "fake"))]
pub mod fake;

pub use self::pci::{ApplePciGfx, PciGfxError};
pub use device::{AppleGfx, DisplaySink, Executor, GfxConfig, GfxError, ThreadExecutor, Variant};
pub use framework::{Framework, MemoryInterface};
pub use mmio::{GfxWindow, IosfcWindow};
pub use modes::{parse_mode_list, DisplayMode, ModeError, ModeSyntax, DEFAULT_MODES};
