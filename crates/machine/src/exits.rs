//! The one place where every accelerator's exits are handled.
//!
//! MMIO goes to the bus, `ICC_*` system registers to the GIC CPU interface,
//! HVC to PSCI or Apple's CPU-service calls (pointer-authentication keys). The software CPU calls this from inside its engine, the
//! Hypervisor.framework backend from its vCPU threads: the behaviour a
//! guest sees cannot differ between them.

use std::sync::Arc;

use accel::{CpuId, ExitHandler, ExitResponse, StopReason, VcpuExit, VmControl};
use arch_arm64::apple_hvc;
use arch_arm64::psci::{self, AffinityState, PsciAction, PsciError, PsciPlatform};
use gic::GicV3;
use vm_core::bus::BusError;
use vm_core::{guest_error, GuestRam, MmioBus};

/// The machine's [`ExitHandler`].
pub struct MachineExits {
    pub bus: Arc<MmioBus>,
    pub gic: Arc<GicV3>,
    pub control: Arc<VmControl>,
    pub memory: GuestRam,
}

impl MachineExits {
    fn mmio_error(&self, error: BusError, what: &str) {
        match error {
            BusError::Unmapped(addr) => {
                // Unmapped space reads as zero and ignores writes, as
                // QEMU+HVF appears to do (vmapple-machine.md §2).
                guest_error!("{what} at unmapped address {addr:#x}");
            }
            other => guest_error!("{what}: {other}"),
        }
    }
}

impl ExitHandler for MachineExits {
    fn handle(&self, cpu: CpuId, exit: VcpuExit) -> ExitResponse {
        match exit {
            VcpuExit::MmioRead { addr, width } => match self.bus.read(addr, width) {
                Ok(value) => ExitResponse::Value(value),
                Err(e) => {
                    self.mmio_error(e, &format!("vCPU {cpu}: {width} read"));
                    ExitResponse::Value(0)
                }
            },
            VcpuExit::MmioWrite { addr, width, value } => {
                if let Err(e) = self.bus.write(addr, width, value) {
                    self.mmio_error(e, &format!("vCPU {cpu}: {width} write of {value:#x}"));
                }
                ExitResponse::Done
            }
            VcpuExit::SysRegRead { reg } => match self.gic.read_sysreg(cpu, reg) {
                Some(value) => ExitResponse::Value(value),
                None => {
                    guest_error!("vCPU {cpu}: read of unimplemented system register {reg}");
                    ExitResponse::Undefined
                }
            },
            VcpuExit::SysRegWrite { reg, value } => {
                if self.gic.write_sysreg(cpu, reg, value) {
                    ExitResponse::Done
                } else {
                    guest_error!(
                        "vCPU {cpu}: write of {value:#x} to unimplemented system register {reg}"
                    );
                    ExitResponse::Undefined
                }
            }
            VcpuExit::Hvc { imm, args } => self.hvc(cpu, imm, args),
        }
    }
}

impl MachineExits {
    fn hvc(&self, cpu: CpuId, imm: u16, args: [u64; 4]) -> ExitResponse {
        if imm != 0 {
            guest_error!("vCPU {cpu}: HVC #{imm} (only HVC #0 calls exist)");
            return ExitResponse::Value(PsciError::NotSupported.to_x0());
        }
        if apple_hvc::is_apple_call(args[0]) {
            return ExitResponse::Registers(apple_hvc::dispatch(args));
        }
        if !psci::is_psci_call(args[0]) {
            // SMCCC services other than PSCI (TRNG, vendor hypervisor
            // calls, ARCH_FEATURES): kernels probe them at boot and take
            // NOT_SUPPORTED as the answer, so this is not a guest error.
            tracing::debug!("vCPU {cpu}: SMCCC function {:#x} not implemented", args[0]);
            return ExitResponse::Value(PsciError::NotSupported.to_x0());
        }
        match psci::dispatch(args, self) {
            PsciAction::Return(x0) => ExitResponse::Value(x0),
            PsciAction::CpuOff => {
                self.control.cpu_off(cpu);
                ExitResponse::CpuOff
            }
            PsciAction::Suspend => ExitResponse::Suspend,
            PsciAction::SystemOff => {
                tracing::info!("guest requested power off (PSCI SYSTEM_OFF)");
                self.control.request_stop(StopReason::PowerOff);
                ExitResponse::Done
            }
            PsciAction::SystemReset => {
                tracing::info!("guest requested reset (PSCI SYSTEM_RESET)");
                self.control.request_stop(StopReason::Reset);
                ExitResponse::Done
            }
        }
    }
}

impl PsciPlatform for MachineExits {
    fn cpu_count(&self) -> usize {
        self.control.cpu_count()
    }

    fn cpu_on(&self, target: usize, entry: u64, context_id: u64) -> Result<(), PsciError> {
        if entry % 4 != 0 || !vm_core::memory::range_is_ram(&self.memory, entry, 4) {
            guest_error!("PSCI CPU_ON of CPU {target} at non-RAM entry {entry:#x}");
            return Err(PsciError::InvalidAddress);
        }
        self.control.cpu_on(target, entry, context_id)
    }

    fn cpu_state(&self, target: usize) -> AffinityState {
        self.control.affinity_state(target)
    }
}
