//! VM images in OCI registries, in the layout Tart uses
//! (`shared/spec/tart-oci.md`): a registry client for the OCI distribution
//! API, the Tart manifest layout, Apple's LZ4 framing of disk layers, a
//! blob cache, and pull/push of a Tart VM directory (`config.json`,
//! `disk.img`, `nvram.bin`).
//!
//! Registries are network peers and may be hostile: sizes read from them
//! are bounded (tart.rs), every blob's sha256 and every disk layer's
//! decoded length and digest are checked, and files are written only
//! under the directories the caller names.

pub mod applelz4;
pub mod auth;
pub mod cache;
pub mod digest;
pub mod pull;
pub mod push;
pub mod reference;
pub mod registry;
pub mod tart;

pub use digest::Digest;
pub use pull::{pull, PullError, PullOptions, Pulled};
pub use push::{push, PushError, PushOptions, PushSource, Pushed};
pub use reference::{Reference, Target};
pub use registry::ClientOptions;

/// Where a long transfer reports how far it is. Called from several
/// threads at once.
pub trait Progress: Sync {
    /// `total` units (bytes) of work lie ahead.
    fn start(&self, total: u64);
    fn advance(&self, done: u64);
    fn finish(&self);
}

/// For callers that show nothing.
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&self, _: u64) {}
    fn advance(&self, _: u64) {}
    fn finish(&self) {}
}
