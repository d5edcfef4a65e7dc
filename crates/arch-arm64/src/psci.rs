//! PSCI 1.1 over HVC (Arm DEN 0022), as the vmapple machine offers it.
//!
//! The calls listed in vmapple-machine.md §4 plus PSCI_FEATURES and
//! SMCCC_VERSION (which Linux probes). [`dispatch`] decodes a call from
//! x0..x3 and asks a [`PsciPlatform`] to carry out what changes machine
//! state, so the software CPU and Hypervisor.framework answer identically.

use crate::mpidr::Mpidr;

pub const PSCI_VERSION: u32 = 0x8400_0000;
pub const CPU_SUSPEND_32: u32 = 0x8400_0001;
pub const CPU_SUSPEND_64: u32 = 0xc400_0001;
pub const CPU_OFF: u32 = 0x8400_0002;
pub const CPU_ON_32: u32 = 0x8400_0003;
pub const CPU_ON_64: u32 = 0xc400_0003;
pub const AFFINITY_INFO_32: u32 = 0x8400_0004;
pub const AFFINITY_INFO_64: u32 = 0xc400_0004;
pub const MIGRATE_32: u32 = 0x8400_0005;
pub const MIGRATE_64: u32 = 0xc400_0005;
pub const MIGRATE_INFO_TYPE: u32 = 0x8400_0006;
pub const SYSTEM_OFF: u32 = 0x8400_0008;
pub const SYSTEM_RESET: u32 = 0x8400_0009;
pub const PSCI_FEATURES: u32 = 0x8400_000a;
/// SMCCC_VERSION (Arm DEN 0028): not PSCI, but reached the same way.
pub const SMCCC_VERSION: u32 = 0x8000_0000;

/// PSCI 1.1.
pub const VERSION_1_1: u64 = 0x0001_0001;
/// SMCCC 1.1.
pub const SMCCC_VERSION_1_1: u64 = 0x0001_0001;
/// MIGRATE_INFO_TYPE: no Trusted OS, migration not required.
pub const MIGRATE_INFO_NOT_REQUIRED: u64 = 2;

/// PSCI return codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(i32)]
pub enum PsciError {
    NotSupported = -1,
    InvalidParameters = -2,
    Denied = -3,
    AlreadyOn = -4,
    OnPending = -5,
    InternalFailure = -6,
    NotPresent = -7,
    Disabled = -8,
    InvalidAddress = -9,
}

impl PsciError {
    /// The value the caller finds in x0 (sign-extended).
    pub fn to_x0(self) -> u64 {
        self as i32 as i64 as u64
    }
}

/// AFFINITY_INFO answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AffinityState {
    On = 0,
    Off = 1,
    OnPending = 2,
}

/// What the machine does for PSCI.
pub trait PsciPlatform {
    /// Number of CPUs of the machine.
    fn cpu_count(&self) -> usize;
    /// Starts powered-off CPU `target` at `entry` in EL1h with
    /// x0 = `context_id`. Fails with `AlreadyOn`/`OnPending` if it is not off
    /// and `InvalidAddress` if `entry` is not executable guest memory.
    fn cpu_on(&self, target: usize, entry: u64, context_id: u64) -> Result<(), PsciError>;
    /// Power state of CPU `target`.
    fn cpu_state(&self, target: usize) -> AffinityState;
}

/// What the caller must do after a PSCI call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PsciAction {
    /// Return to the guest with this x0 (x1..x3 unchanged).
    Return(u64),
    /// Power the calling CPU off; it does not return.
    CpuOff,
    /// Wait for an interrupt as WFI does, then return 0.
    Suspend,
    SystemOff,
    SystemReset,
}

fn is_supported(function: u32) -> bool {
    matches!(
        function,
        PSCI_VERSION
            | CPU_SUSPEND_32
            | CPU_SUSPEND_64
            | CPU_OFF
            | CPU_ON_32
            | CPU_ON_64
            | AFFINITY_INFO_32
            | AFFINITY_INFO_64
            | MIGRATE_INFO_TYPE
            | SYSTEM_OFF
            | SYSTEM_RESET
            | PSCI_FEATURES
            | SMCCC_VERSION
    )
}

/// True if x0 names a function this module answers (so the HVC is PSCI or
/// SMCCC architecture business rather than something else).
pub fn is_psci_call(x0: u64) -> bool {
    x0 >> 32 == 0 && is_supported(x0 as u32)
}

/// Answers one call; `args` are x0..x3 at the HVC.
///
/// 32-bit calling-convention functions see only the low 32 bits of their
/// arguments, as SMCCC requires.
pub fn dispatch(args: [u64; 4], platform: &dyn PsciPlatform) -> PsciAction {
    use PsciAction::Return;
    let ok = Return(0);
    if args[0] >> 32 != 0 {
        return Return(PsciError::NotSupported.to_x0());
    }
    let function = args[0] as u32;
    let smc32 = function & 0x4000_0000 == 0;
    let arg = |i: usize| {
        if smc32 {
            args[i] & 0xffff_ffff
        } else {
            args[i]
        }
    };

    match function {
        PSCI_VERSION => Return(VERSION_1_1),
        SMCCC_VERSION => Return(SMCCC_VERSION_1_1),
        PSCI_FEATURES => {
            let queried = arg(1);
            if queried >> 32 == 0 && is_supported(queried as u32) {
                // For CPU_SUSPEND, 0 says: original power-state format,
                // no OS-initiated mode.
                ok
            } else {
                Return(PsciError::NotSupported.to_x0())
            }
        }
        CPU_SUSPEND_32 | CPU_SUSPEND_64 => PsciAction::Suspend,
        CPU_OFF => PsciAction::CpuOff,
        CPU_ON_32 | CPU_ON_64 => {
            let Some(target) = Mpidr::cpu_index(arg(1), platform.cpu_count()) else {
                return Return(PsciError::InvalidParameters.to_x0());
            };
            if arg(1) & !Mpidr::AFFINITY_MASK != 0 {
                return Return(PsciError::InvalidParameters.to_x0());
            }
            match platform.cpu_on(target, arg(2), arg(3)) {
                Ok(()) => ok,
                Err(e) => Return(e.to_x0()),
            }
        }
        AFFINITY_INFO_32 | AFFINITY_INFO_64 => {
            let level = arg(2);
            if level > 3 {
                return Return(PsciError::InvalidParameters.to_x0());
            }
            let affinity = arg(1) & Mpidr::AFFINITY_MASK;
            if level > 0 {
                // The machine is one always-on cluster set: any existing
                // higher-level node is on.
                let cpus = platform.cpu_count();
                let shift = match level {
                    1 => 8,
                    2 => 16,
                    _ => 32,
                };
                let mask = Mpidr::AFFINITY_MASK & !((1u64 << shift) - 1);
                let exists =
                    (0..cpus).any(|i| Mpidr::for_cpu(i).affinity() & mask == affinity & mask);
                return if exists {
                    Return(AffinityState::On as u64)
                } else {
                    Return(PsciError::InvalidParameters.to_x0())
                };
            }
            match Mpidr::cpu_index(affinity, platform.cpu_count()) {
                Some(cpu) => Return(platform.cpu_state(cpu) as u64),
                None => Return(PsciError::InvalidParameters.to_x0()),
            }
        }
        MIGRATE_INFO_TYPE => Return(MIGRATE_INFO_NOT_REQUIRED),
        SYSTEM_OFF => PsciAction::SystemOff,
        SYSTEM_RESET => PsciAction::SystemReset,
        _ => Return(PsciError::NotSupported.to_x0()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    struct Fake {
        states: RefCell<Vec<AffinityState>>,
        started: RefCell<Vec<(usize, u64, u64)>>,
    }

    impl Fake {
        fn new(cpus: usize) -> Self {
            let mut states = vec![AffinityState::Off; cpus];
            states[0] = AffinityState::On;
            Self {
                states: RefCell::new(states),
                started: RefCell::new(vec![]),
            }
        }
    }

    impl PsciPlatform for Fake {
        fn cpu_count(&self) -> usize {
            self.states.borrow().len()
        }
        fn cpu_on(&self, target: usize, entry: u64, ctx: u64) -> Result<(), PsciError> {
            let mut s = self.states.borrow_mut();
            match s[target] {
                AffinityState::On => Err(PsciError::AlreadyOn),
                AffinityState::OnPending => Err(PsciError::OnPending),
                AffinityState::Off => {
                    s[target] = AffinityState::On;
                    self.started.borrow_mut().push((target, entry, ctx));
                    Ok(())
                }
            }
        }
        fn cpu_state(&self, target: usize) -> AffinityState {
            self.states.borrow()[target]
        }
    }

    fn call(p: &Fake, x: [u64; 4]) -> PsciAction {
        dispatch(x, p)
    }

    #[test]
    fn version_features_and_unknown_calls() {
        let p = Fake::new(2);
        assert_eq!(
            call(&p, [PSCI_VERSION as u64, 0, 0, 0]),
            PsciAction::Return(0x10001)
        );
        assert_eq!(
            call(&p, [PSCI_FEATURES as u64, CPU_ON_64 as u64, 0, 0]),
            PsciAction::Return(0)
        );
        assert_eq!(
            call(&p, [PSCI_FEATURES as u64, MIGRATE_64 as u64, 0, 0]),
            PsciAction::Return(u64::MAX)
        );
        assert_eq!(
            call(&p, [MIGRATE_32 as u64, 0, 0, 0]),
            PsciAction::Return(u64::MAX)
        );
        assert_eq!(
            call(&p, [0xc200_0000, 0, 0, 0]),
            PsciAction::Return(u64::MAX)
        );
        assert_eq!(
            call(&p, [(1 << 32) | PSCI_VERSION as u64, 0, 0, 0]),
            PsciAction::Return(u64::MAX),
            "upper bits of a function id must be zero"
        );
    }

    #[test]
    fn cpu_on_then_affinity_info() {
        // vmapple-machine.md §20.1 vector 1.
        let p = Fake::new(4);
        let info = |p: &Fake| call(p, [AFFINITY_INFO_64 as u64, 1, 0, 0]);
        assert_eq!(info(&p), PsciAction::Return(1));
        assert_eq!(
            call(&p, [CPU_ON_64 as u64, 1, 0x7000_0000, 42]),
            PsciAction::Return(0)
        );
        assert_eq!(p.started.borrow()[0], (1, 0x7000_0000, 42));
        assert_eq!(info(&p), PsciAction::Return(0));
        assert_eq!(
            call(&p, [CPU_ON_64 as u64, 1, 0x7000_0000, 42]),
            PsciAction::Return(PsciError::AlreadyOn.to_x0())
        );
        assert_eq!(
            call(&p, [CPU_ON_64 as u64, 0x10, 0, 0]),
            PsciAction::Return(PsciError::InvalidParameters.to_x0())
        );
        assert_eq!(
            call(&p, [AFFINITY_INFO_64 as u64, 0, 1, 0]),
            PsciAction::Return(0),
            "level 1 reports on"
        );
        assert_eq!(
            call(&p, [AFFINITY_INFO_64 as u64, 0, 4, 0]),
            PsciAction::Return(PsciError::InvalidParameters.to_x0())
        );
    }

    #[test]
    fn smc32_arguments_are_truncated() {
        let p = Fake::new(2);
        assert_eq!(
            call(
                &p,
                [
                    CPU_ON_32 as u64,
                    0xffff_ffff_0000_0001,
                    0xffff_ffff_7000_0000,
                    7
                ]
            ),
            PsciAction::Return(0)
        );
        assert_eq!(p.started.borrow()[0], (1, 0x7000_0000, 7));
    }

    #[test]
    fn power_actions() {
        let p = Fake::new(1);
        assert_eq!(
            call(&p, [SYSTEM_OFF as u64, 0, 0, 0]),
            PsciAction::SystemOff
        );
        assert_eq!(
            call(&p, [SYSTEM_RESET as u64, 0, 0, 0]),
            PsciAction::SystemReset
        );
        assert_eq!(call(&p, [CPU_OFF as u64, 0, 0, 0]), PsciAction::CpuOff);
        assert_eq!(
            call(&p, [CPU_SUSPEND_64 as u64, 0, 0, 0]),
            PsciAction::Suspend
        );
        assert!(is_psci_call(SYSTEM_OFF as u64));
        assert!(!is_psci_call(0xc600_0000));
    }
}
