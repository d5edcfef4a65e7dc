//! USB for vmapple: an emulated XHCI host controller ([`xhci::Xhci`], a
//! `pci::PciDevice` with QEMU's `qemu-xhci` identity) and the HID keyboard
//! and tablet the machine attaches to it (vmapple-machine.md §7.3).
//!
//! Host input enters through [`xhci::InputSink`], obtained from
//! [`xhci::Xhci::input_sink`].

pub mod hid;
pub mod xhci;

pub use hid::{InputEvent, UsbDevice, UsbKeyboard, UsbTablet};
pub use xhci::{InputSink, Xhci, XhciConfig};
