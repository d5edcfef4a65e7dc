//! What a guest panic does.

use std::fmt;
use std::str::FromStr;

use crate::{quote, serde_as_string};

/// What a guest panic reported through pvpanic does
/// (vmapple-machine.md §12).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum PanicPolicy {
    /// Stop the VM; `vmapple` exits with the guest-panic status (QEMU's
    /// default action, `shutdown`).
    #[default]
    Exit,
    /// Pause the VM so its state can be inspected; resume or stop it from
    /// the control socket or with a signal.
    Pause,
    /// Log it and let the guest go on (to its crash kernel, say).
    Continue,
    /// Reset the machine and boot again.
    Reset,
}

impl PanicPolicy {
    pub const ALL: [PanicPolicy; 4] = [Self::Exit, Self::Pause, Self::Continue, Self::Reset];

    pub fn name(self) -> &'static str {
        match self {
            Self::Exit => "exit",
            Self::Pause => "pause",
            Self::Continue => "continue",
            Self::Reset => "reset",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0} is not a panic policy (use exit, pause, continue or reset)")]
pub struct PanicPolicyError(String);

impl FromStr for PanicPolicy {
    type Err = PanicPolicyError;
    fn from_str(text: &str) -> Result<Self, PanicPolicyError> {
        Self::ALL
            .into_iter()
            .find(|p| p.name() == text)
            .ok_or_else(|| PanicPolicyError(quote(text)))
    }
}

impl fmt::Display for PanicPolicy {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(self.name())
    }
}

serde_as_string!(PanicPolicy, "exit, pause, continue or reset");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_policy_round_trips() {
        for p in PanicPolicy::ALL {
            assert_eq!(p.to_string().parse(), Ok(p));
            let json = serde_json::to_string(&p).unwrap();
            assert_eq!(serde_json::from_str::<PanicPolicy>(&json).unwrap(), p);
        }
        let e = "explode".parse::<PanicPolicy>().unwrap_err().to_string();
        assert!(e.contains("\"explode\" is not a panic policy"), "{e}");
        assert!("Exit".parse::<PanicPolicy>().is_err());
    }
}
