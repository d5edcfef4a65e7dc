//! Everything about vmapple VMs at rest and at arm's length: bundles
//! (`NAME.vmapple/` directories with a `config.toml`), the machine
//! identity (ECID) a macOS guest is tied to, importing Tart and macosvm
//! VMs, and the JSON-lines control-socket protocol a running VM serves.
//!
//! Pure library code: nothing here knows about the machine model or an
//! accelerator; the `vmapple` binary wires it up.

pub mod bundle;
pub mod clone;
pub mod config;
pub mod control;
pub mod hardware_model;
pub mod identity;
pub mod import;
pub mod tart;

pub use bundle::{
    bundles_home, delete, list, Bundle, BundleError, BundleLock, BundleSummary, CreateOptions,
    LockError, SUSPENDED_STATE, VSOCK_SOCKET,
};
pub use config::VmConfig;
pub use hardware_model::{HardwareModel, HardwareModelError};
pub use identity::{ecid_from_path, machine_identifier_plist, IdentityError};
pub use import::{import_macosvm, import_tart, ImportError, ImportedVm};
