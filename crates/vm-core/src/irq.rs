//! Interrupt lines from devices to the interrupt controller.
//!
//! Every device interrupt on the vmapple machine is level-sensitive
//! (vmapple-machine.md §3): a device states the level of its output and the
//! controller samples it. A device must call [`IrqLine::set_level`] whenever
//! the condition behind its output changes; repeating the same level is
//! allowed and cheap.

#[cfg(any(test, feature = "test-util"))]
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// One level-sensitive interrupt output of a device.
pub trait IrqLine: Send + Sync {
    /// Drives the line high (`true`) or low (`false`).
    fn set_level(&self, asserted: bool);
}

/// A line that goes nowhere, for devices whose interrupt is not wired.
#[derive(Debug, Default)]
pub struct NoIrq;

impl IrqLine for NoIrq {
    fn set_level(&self, _asserted: bool) {}
}

/// A line that remembers its level and counts rising edges, for tests
/// (feature `test-util`).
#[cfg(any(test, feature = "test-util"))]
#[derive(Debug, Default)]
pub struct TestIrq {
    level: AtomicBool,
    rising_edges: AtomicU64,
}

#[cfg(any(test, feature = "test-util"))]
impl TestIrq {
    pub fn new() -> Self {
        Self::default()
    }

    /// The level the device drives now.
    pub fn is_asserted(&self) -> bool {
        self.level.load(Ordering::SeqCst)
    }

    /// How many times the line went from low to high.
    pub fn rising_edges(&self) -> u64 {
        self.rising_edges.load(Ordering::SeqCst)
    }
}

#[cfg(any(test, feature = "test-util"))]
impl IrqLine for TestIrq {
    fn set_level(&self, asserted: bool) {
        let was = self.level.swap(asserted, Ordering::SeqCst);
        if asserted && !was {
            self.rising_edges.fetch_add(1, Ordering::SeqCst);
        }
    }
}
