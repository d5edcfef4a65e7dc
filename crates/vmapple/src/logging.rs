//! Logging: to stderr always and, while a bundle runs, to the bundle's
//! `vmapple.log` as well, so a VM started in the background leaves a
//! record of what happened to it. The file is rotated at a size cap
//! ([`crate::log_rotate`]).

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::{Mutex, OnceLock};

use crate::log_rotate::{RotatingLog, LOG_CAP};

use tracing_subscriber::filter::{filter_fn, EnvFilter};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::prelude::*;

/// Events with this target go to the log file only: the message is
/// already on stderr in another form (see [`file_only_error`]).
const FILE_ONLY: &str = "vmapple::file_only";

static LOG_FILE: OnceLock<Mutex<RotatingLog>> = OnceLock::new();

/// Writes to the bundle log once [`log_to_file`] has opened it, and
/// nowhere before: the subscriber is set up before the bundle is known
/// (and locked), and only the process holding the lock may write there.
struct BundleLog;

impl Write for BundleLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.write_all(buf).map(|()| buf.len())
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        match LOG_FILE.get() {
            // One write per event under the lock: lines of different
            // threads never interleave, and rotation never splits one.
            Some(file) => file
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .write_event(buf),
            None => Ok(()),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for BundleLog {
    type Writer = BundleLog;
    fn make_writer(&'a self) -> BundleLog {
        BundleLog
    }
}

/// Installs the subscriber: `--log` if given, else `RUST_LOG`, else
/// `info`.
pub fn init(level: Option<&str>) -> crate::error::Result<()> {
    let filter = match level {
        Some(directives) => {
            EnvFilter::try_new(directives).map_err(|source| crate::error::Error::LogFilter {
                directives: directives.to_owned(),
                source,
            })?
        }
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    let stderr = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_filter(filter_fn(|meta| meta.target() != FILE_ONLY));
    let file = tracing_subscriber::fmt::layer()
        .with_writer(BundleLog)
        .with_ansi(false)
        .with_target(false);
    tracing_subscriber::registry()
        .with(filter)
        .with(stderr)
        .with(file)
        .init();
    Ok(())
}

/// From now on, log to `path` too (appending: earlier runs stay, up to
/// the rotation cap).
pub fn log_to_file(path: &Path) -> crate::error::Result<()> {
    let log = RotatingLog::open(path, LOG_CAP, open_log_file).map_err(|source| {
        crate::error::Error::Path {
            path: path.to_path_buf(),
            source,
        }
    })?;
    LOG_FILE
        .set(Mutex::new(log))
        .map_err(|_| crate::error::Error::usage("the log file is already open"))
}

/// Opens the log file for appending, creating it private to the user. A
/// symbolic link or hard link there is refused, never written through.
fn open_log_file(path: &Path) -> std::io::Result<File> {
    use bundle::LockError;
    bundle::bundle::open_bundle_file(path, std::fs::OpenOptions::new().append(true).create(true))
        .map_err(|e| match e {
            LockError::Io { source, .. } => source,
            LockError::NotAPlainFile { why, .. } => {
                std::io::Error::other(format!("{why}; refusing to write to it"))
            }
            other => std::io::Error::other(other.to_string()),
        })
}

/// Records an error that is reported on stderr by other means in the log
/// file (if one is open), so the log tells why a run ended.
pub fn file_only_error(message: &str) {
    tracing::error!(target: FILE_ONLY, "{message}");
}
