//! Fuzz target bodies for vmapple's devices, one public function per
//! target. `fuzz/` (cargo-fuzz, libFuzzer) calls them with mutated inputs;
//! `tests/smoke.rs` calls them with fixed seeds and a fixed-seed PRNG on
//! every `cargo test`.
//!
//! Each target builds its device against test doubles (scratch guest RAM,
//! an in-memory disk, a recording interrupt line, a loopback network),
//! replays what [`input`] decodes as a hostile guest's actions, and
//! panics if the device breaks an invariant the guest could observe. A
//! target returns a [`Report`] of what the input reached, so tests can
//! tell seeds that get deep into a device from ones that bounce.

pub mod apple_dt;
pub mod control;
pub mod doubles;
pub mod input;
pub mod loadstore;
pub mod msix;
pub mod platform;
pub mod seeds;
pub mod share;
pub mod snapshot;
pub mod stage1;
pub mod virtio;
pub mod vnc;
pub mod xhci;

pub use apple_dt::apple_dt;
pub use control::control_request;
pub use loadstore::loadstore;
pub use msix::msix;
pub use platform::{aes, bdif, cfg, pl011, pl031, pl061, pvpanic};
pub use share::{fuse_request, vsock_packet};
pub use snapshot::snapshot;
pub use stage1::stage1;
pub use virtio::{virtio_blk, virtio_blk_apple, virtio_gpu, virtio_net};
pub use vnc::vnc_client;
pub use xhci::xhci;

/// What one input reached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Ops (accesses, kicks, host events) replayed.
    pub ops: u64,
    /// Units of real work the device finished, per target: AES FLAG
    /// commands (which run only after every earlier command completed),
    /// disk reads and writes, used-ring entries, successful XHCI events,
    /// bytes sent by the UART, parsed control requests, cfg installs,
    /// pvpanic events.
    pub completions: u64,
    /// Interrupts raised: rising edges of the line, or virtio queue
    /// notifications.
    pub interrupts: u64,
}

/// A fuzz target.
pub type Target = fn(&[u8]) -> Report;

/// Every target by name, as `fuzz/fuzz_targets/<name>.rs` calls it.
pub const TARGETS: &[(&str, Target)] = &[
    ("aes", aes),
    ("bdif", bdif),
    ("cfg", cfg),
    ("pvpanic", pvpanic),
    ("pl031", pl031),
    ("pl061", pl061),
    ("pl011", pl011),
    ("virtio_blk", virtio_blk),
    ("virtio_blk_apple", virtio_blk_apple),
    ("virtio_net", virtio_net),
    ("virtio_gpu", virtio_gpu),
    ("xhci", xhci),
    ("control_request", control_request),
    ("snapshot", snapshot),
    ("msix", msix),
    ("loadstore", loadstore),
    ("fuse_request", fuse_request),
    ("vsock_packet", vsock_packet),
    ("stage1", stage1),
    ("apple_dt", apple_dt),
    ("vnc_client", vnc_client),
];
