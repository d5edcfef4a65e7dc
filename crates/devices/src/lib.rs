//! Platform devices of the vmapple machine.
//!
//! | device | module | where (vmapple-machine.md) |
//! |---|---|---|
//! | ARM PL011 UART, the serial console | [`pl011`] | §2 (`0x2001_0000`, 4 KiB), §3 (SPI 1), §13.1 |
//! | host ends of the console: stdio, file, unix socket, none | [`serial`] | §13.1 ("backend: the first serial port") |
//! | configuration region `vmapple-cfg` (guest RAM, not MMIO) | [`apple_cfg`] | §2 (`0x0040_0000`, 64 KiB), §8 |
//! | backdoor block interface `vmapple-bdif` | [`apple_bdif`] | §2 (`0x3000_0000`, 2 MiB), §9 |
//! | AES engine `apple-aes` | [`apple_aes`] | §2 (`0x3022_0000` and `0x3023_0000`, 16 KiB each), §3 (SPI 0x12), §10 |
//! | ARM PL031 real-time clock | [`pl031`] | §2 (`0x2005_0000`, 4 KiB), §3 (SPI 2), §13.2 |
//! | ARM PL061 GPIO controller | [`pl061`] | §2 (`0x2006_0000`, 4 KiB), §3 (SPI 5), §13.3 |
//! | power key ("gpio-key") pulsing GPIO line 3 | [`power_button`] | §6.8, §13.3, quirk Q10 |
//! | pvpanic-mmio guest panic/shutdown notifier | [`pvpanic`] | §2 (`0x2007_0000`, 2 bytes), §12 |
//! | `avp,rtc` clock at 0x3024_0000 that iBoot prefers to the PL031 | [`avp_rtc`] | docs/macos.md |
//! | clocks and deadline timers for the RTC and the power key | [`clock`] | §6.8, §13.2 |
//!
//! Devices reach the rest of the VMM only through `vm-core`: they answer
//! MMIO through [`vm_core::MmioDevice`], drive a level-sensitive
//! [`vm_core::IrqLine`], and report guest mistakes with
//! [`vm_core::guest_error!`]. Nothing here knows an accelerator or the
//! machine, so each device is tested on its own with a `TestIrq`.

// A device narrows guest values all the time; each narrowing here is
// spelled out (`try_from`, `to_le_bytes`) so an accidental one stands out.
// Tests cast known constants freely.
#![cfg_attr(not(test), warn(clippy::cast_possible_truncation))]

pub mod apple_aes;
pub mod apple_bdif;
pub mod apple_cfg;
pub mod avp_rtc;
pub mod clock;
pub mod pl011;
pub mod pl031;
pub mod pl061;
pub mod power_button;
pub mod pvpanic;
pub mod serial;
