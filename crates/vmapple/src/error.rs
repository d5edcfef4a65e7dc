//! The binary's errors: each keeps the error it comes from as its source,
//! and `main` prints the whole chain on one line (`a: b: c`).

use std::path::PathBuf;

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A mistake in what the user asked for, found by the binary itself.
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Machine(#[from] machine::MachineError),
    #[error(transparent)]
    Accel(#[from] accel::AccelError),
    #[error(transparent)]
    Bundle(#[from] bundle::BundleError),
    #[error(transparent)]
    Import(#[from] bundle::ImportError),
    #[error(transparent)]
    Identity(#[from] bundle::IdentityError),
    #[error(transparent)]
    Control(#[from] bundle::control::ClientError),
    #[error(transparent)]
    Request(#[from] bundle::control::ProtocolError),
    #[error("{}", path.display())]
    Path {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}")]
    Host {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// What the image and bundle-copy commands (pull, push, clone, set)
    /// report: one line, already with its cause.
    #[error("{0}")]
    Image(String),
    #[error("{}: not a usable device tree", path.display())]
    DeviceTree {
        path: PathBuf,
        #[source]
        source: machine::adt::AdtError,
    },
    #[error("--log {directives:?} is not a valid log filter")]
    LogFilter {
        directives: String,
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
}

impl Error {
    /// A usage mistake with this message.
    pub fn usage(message: impl Into<String>) -> Self {
        Error::Usage(message.into())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
