//! Interrupt routing (apple-gfx.md §6.6, §7.4, §8.2).
//!
//! The framework's `raiseInterrupt(vector)` becomes, for the MMIO variant, a
//! pulse on a wired line (the vector is ignored): the GFX line for the
//! device descriptor's block, the IOSFC line for the IOSurface host
//! device's. For the PCI variant it becomes MSI `vector` if the guest has
//! enabled MSI, and is otherwise dropped — there is no INTx fallback, as in
//! QEMU — but drops are counted and logged.
//!
//! A pulse is raise-then-lower, which is how QEMU delivers these
//! interrupts; the GIC sees it only if the guest configured the SPI as
//! edge-triggered (a level-configured SPI follows the line and would miss
//! it). macOS guests work that way under QEMU; a third-party QEMU fork holds
//! the line up on a timer instead, so whether some guest versions need a
//! longer pulse is UNCONFIRMED. The pulse is driven at once, from whatever
//! thread the framework calls on, since [`IrqLine`] is thread-safe and takes
//! no device lock (QEMU has to defer it to its big lock instead).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vm_core::IrqLine;

/// The PCI function's MSI capability as the core needs it.
///
/// Called from framework threads, possibly while a vCPU is inside a BAR0
/// access that the framework is still processing: an implementation must
/// not wait for a lock that the PCI model holds while it dispatches BAR
/// accesses, or the two deadlock.
pub trait MsiSender: Send + Sync {
    /// Whether a message can go out: the guest has set MSI Enable (and Bus
    /// Master Enable, where the function models it).
    fn msi_enabled(&self) -> bool;
    /// Signals message `vector`; false if nothing went out (MSI was turned
    /// off meanwhile, or the guest granted no such vector).
    fn send_msi(&self, vector: u32) -> bool;
}

/// Where one framework interrupt source goes.
#[derive(Clone)]
pub enum IrqRoute {
    /// A wired line, pulsed; the vector is ignored.
    Pulse(Arc<dyn IrqLine>),
    /// PCI MSI, gated on MSI Enable.
    Msi(Arc<dyn MsiSender>),
}

/// One interrupt source with its counters.
pub struct IrqRouter {
    name: &'static str,
    route: IrqRoute,
    delivered: AtomicU64,
    dropped: AtomicU64,
}

impl IrqRouter {
    pub fn new(name: &'static str, route: IrqRoute) -> Self {
        Self {
            name,
            route,
            delivered: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    /// The framework raised `vector`.
    pub fn raise(&self, vector: u32) {
        tracing::trace!(target: "apple_gfx", source = self.name, vector, "apple_gfx_raise_irq");
        match &self.route {
            IrqRoute::Pulse(line) => {
                line.set_level(true);
                line.set_level(false);
            }
            IrqRoute::Msi(msi) => {
                if !msi.msi_enabled() || !msi.send_msi(vector) {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                    vm_core::guest_error!(
                        "apple-gfx: {} interrupt {vector} dropped: MSI is disabled",
                        self.name
                    );
                    return;
                }
            }
        }
        self.delivered.fetch_add(1, Ordering::Relaxed);
    }

    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Mutex;
    use vm_core::TestIrq;

    #[derive(Default)]
    struct Msi {
        enabled: AtomicBool,
        sent: Mutex<Vec<u32>>,
    }

    impl MsiSender for Msi {
        fn msi_enabled(&self) -> bool {
            self.enabled.load(Ordering::SeqCst)
        }
        fn send_msi(&self, vector: u32) -> bool {
            if vector > 3 {
                return false;
            }
            self.sent.lock().unwrap().push(vector);
            true
        }
    }

    #[test]
    fn wired_line_gets_a_pulse_per_raise() {
        let line = Arc::new(TestIrq::new());
        let r = IrqRouter::new("gfx", IrqRoute::Pulse(line.clone()));
        r.raise(0);
        r.raise(7);
        assert_eq!(line.rising_edges(), 2);
        assert!(!line.is_asserted(), "a pulse leaves the line low");
        assert_eq!(r.delivered(), 2);
    }

    #[test]
    fn msi_is_gated_and_drops_are_counted() {
        let msi = Arc::new(Msi::default());
        let r = IrqRouter::new("gfx", IrqRoute::Msi(msi.clone()));
        r.raise(0);
        assert_eq!(r.dropped(), 1);
        assert!(msi.sent.lock().unwrap().is_empty());
        msi.enabled.store(true, Ordering::SeqCst);
        r.raise(0);
        assert_eq!(*msi.sent.lock().unwrap(), vec![0]);
        assert_eq!((r.delivered(), r.dropped()), (1, 1));
        r.raise(4);
        assert_eq!(
            (r.delivered(), r.dropped()),
            (1, 2),
            "refused by the sender"
        );
    }
}
