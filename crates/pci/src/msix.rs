//! MSI-X capability and table storage (PCI Local Bus Specification 3.0
//! §6.8.2), not yet wired to interrupts.
//!
//! vmapple has no ITS, so no function offers MSI-X (vmapple-machine.md
//! §7.5, §20.1 item 10). This module is here for when one does: it holds
//! placeholder text only until then.
