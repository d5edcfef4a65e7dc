//! macOS glue of the apple-gfx display: ParavirtualizedGraphics.framework
//! behind the core's `Framework`/`PgDevice`/`PgDisplay`/`PgIosfcDevice`
//! traits, Metal presentation, Mach VM task address spaces, and the
//! main-thread run loop (apple-gfx.md §17.2, §13).
//!
//! Nothing here decides anything the core (crate `apple-gfx`) can decide:
//! each framework block converts its arguments and calls the core at once.
//!
//! * `MacFramework` probes the framework at run time: classes are looked
//!   up by name (two are private), and whether guest memory is described by
//!   a `PGMemoryMapDescriptor` or reached through the legacy task blocks is
//!   decided by `respondsToSelector:` and reported through
//!   `Framework::memory_interface`.
//! * `MacDisplay` copies each frame out of the framework (`render_frame`)
//!   for the core, which writes it into the display model.
//! * The Cocoa window (`runloop`, its portable part in [`window`]) is a
//!   front end of the display model like VNC and screenshots: one window
//!   per head, whichever device feeds it (apple-gfx or virtio-gpu).
//! * [`main_thread::run_vmm`] moves the VMM's loop off the main thread
//!   when a platform loop must own it; `runloop` has the loops.
//!
//! * [`input`] translates the window's keyboard and mouse events for the
//!   display model's input sink; [`cursor`] scales the guest's cursor
//!   image into the window's host cursor.
//!
//! On other hosts only the portable parts ([`cursor`], [`gpu`], [`input`],
//! [`main_thread`], [`window`]) exist. Everything Apple-specific has been type-checked and linted for
//! `aarch64-apple-darwin` but never run (docs/macos.md).

pub mod cursor;
pub mod gpu;
pub mod input;
pub mod main_thread;
pub mod window;

#[cfg(target_os = "macos")]
mod display;
#[cfg(target_os = "macos")]
mod ffi;
#[cfg(target_os = "macos")]
mod framework;
#[cfg(target_os = "macos")]
pub mod runloop;
#[cfg(target_os = "macos")]
mod va_space;

#[cfg(target_os = "macos")]
pub use display::MacDisplay;
#[cfg(target_os = "macos")]
pub use framework::{DisplayQueue, MacDevice, MacFramework, MacIosfcDevice};
#[cfg(target_os = "macos")]
pub use va_space::{host_page_size, MachVaSpace};
