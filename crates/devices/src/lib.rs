//! Platform devices of the vmapple machine.
//!
//! | device | module | where (vmapple-machine.md) |
//! |---|---|---|
//! | ARM PL011 UART, the serial console | [`pl011`] | §2 (`0x2001_0000`, 4 KiB), §3 (SPI 1), §13.1 |
//! | host ends of the console: stdio, file, unix socket, none | [`serial`] | §13.1 ("backend: the first serial port") |
//!
//! Devices reach the rest of the VMM only through `vm-core`: they answer
//! MMIO through [`vm_core::MmioDevice`], drive a level-sensitive
//! [`vm_core::IrqLine`], and report guest mistakes with
//! [`vm_core::guest_error!`]. Nothing here knows an accelerator or the
//! machine, so each device is tested on its own with a `TestIrq`.

pub mod pl011;
pub mod serial;
