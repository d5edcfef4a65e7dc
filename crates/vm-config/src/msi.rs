//! Whether the machine offers message-signalled interrupts.

use std::fmt;
use std::str::FromStr;

use crate::{quote, serde_as_string};

/// `--msi on|off`: the GIC's message-based SPIs, the GICv2m frame and
/// MSI-X on the PCI functions, or legacy INTx lines only as QEMU's
/// vmapple has it (vmapple-machine.md §7.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Msi {
    On,
    Off,
}

impl Msi {
    pub fn name(self) -> &'static str {
        match self {
            Self::On => "on",
            Self::Off => "off",
        }
    }

    pub fn is_on(self) -> bool {
        self == Self::On
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0} is not an MSI setting (use on or off)")]
pub struct MsiError(String);

impl FromStr for Msi {
    type Err = MsiError;
    fn from_str(text: &str) -> Result<Self, MsiError> {
        match text {
            "on" => Ok(Self::On),
            "off" => Ok(Self::Off),
            _ => Err(MsiError(quote(text))),
        }
    }
}

impl fmt::Display for Msi {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(self.name())
    }
}

serde_as_string!(Msi, "on or off");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_and_off_round_trip_and_nothing_else_parses() {
        for m in [Msi::On, Msi::Off] {
            assert_eq!(m.to_string().parse(), Ok(m));
            let json = serde_json::to_string(&m).unwrap();
            assert_eq!(serde_json::from_str::<Msi>(&json).unwrap(), m);
        }
        let e = "yes".parse::<Msi>().unwrap_err().to_string();
        assert!(e.contains("\"yes\" is not an MSI setting"), "{e}");
        assert!("ON".parse::<Msi>().is_err());
        assert!("".parse::<Msi>().is_err());
    }
}
