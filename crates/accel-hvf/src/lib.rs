//! vmapple's accelerator on macOS/arm64 hosts: Apple's Hypervisor.framework.
//!
//! The guest runs natively at EL1 under the framework; the VMM sees only
//! what traps: MMIO (stage-2 data aborts outside RAM), the GIC CPU
//! interface (`ICC_*` system registers, since the interrupt controller is
//! our userspace model from crate `gic`), HVC (PSCI), WFI and the virtual
//! timer firing. `HvfVm` implements the same [`accel::Vm`] contract as
//! the software CPU and hands every exit to the same machine
//! [`accel::ExitHandler`], so a guest sees one machine whichever runs it.
//!
//! **Layout.** The framework glue (`HvfVm`, the FFI declarations) exists
//! when building for `aarch64-apple-darwin`, or on Linux with the
//! `hvf-double` feature, where the same code links the behavioural double
//! of the framework (crate `hvf-double`) and runs real guests in tests. On
//! other builds this crate holds just the platform-neutral logic, which is
//! unit-tested everywhere:
//! * [`exits`]: exception syndrome → [`accel::VcpuExit`] and the
//!   [`accel::ExitResponse`] back into registers (through a register-file
//!   trait), UNDEFINED injection;
//! * [`vtimer`]: the vtimer mask/PPI state machine and WFI deadlines;
//! * [`layout`]: 16 KiB page and IPA-size checks, `hv_sys_reg_t` numbers;
//! * [`vcpu_loop`]: a vCPU thread's life (power states, interrupt lines,
//!   exits, WFI) over a trait standing for the framework's vCPU calls.
//!
//! **Threads.** One host thread per vCPU, created inside [`accel::Vm::run`]:
//! the framework lets only the creating thread use a vCPU. `run` itself may
//! be called from any thread except that it should not be the process's
//! main thread on macOS, which belongs to the platform run loop
//! (apple-gfx.md §13.3).

pub mod emulate;
pub mod exits;
pub mod layout;
pub mod saved;
pub mod vcpu_loop;
pub mod vtimer;

// The framework glue: against Hypervisor.framework on macOS/arm64, or
// against its behavioural double (crate `hvf-double`) elsewhere.
#[cfg(any(
    all(target_os = "macos", target_arch = "aarch64"),
    feature = "hvf-double"
))]
mod ffi;
#[cfg(any(
    all(target_os = "macos", target_arch = "aarch64"),
    feature = "hvf-double"
))]
mod vm;

#[cfg(any(
    all(target_os = "macos", target_arch = "aarch64"),
    feature = "hvf-double"
))]
pub use vm::{HvfConfig, HvfKick, HvfVm};

// The double's symbols (`hv_*`, `mach_absolute_time`, `os_release`) are
// what `ffi` resolves to; naming the crate makes sure it is linked.
#[cfg(all(feature = "hvf-double", not(target_os = "macos")))]
use hvf_double as _;
