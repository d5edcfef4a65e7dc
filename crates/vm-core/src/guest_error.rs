//! Rate-limited logging of guest mistakes.
//!
//! A hostile or broken guest can hit the same bad register millions of times
//! a second. Each [`guest_error!`](crate::guest_error!) call site logs at most
//! [`BURST`] lines per second and, when it speaks again, says how many it
//! held back. Logs go to the `guest` target at WARN level, so
//! `RUST_LOG=guest=off` silences them and `RUST_LOG=guest=debug` keeps them.
//!
//! [`log_limited!`](crate::log_limited!) is the same limit for other lines a
//! guest or a network peer can cause again and again (host I/O errors on
//! its requests, pvpanic events), at a level and target of the caller's
//! choosing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// Lines one call site may print per one-second window.
pub const BURST: u64 = 10;

fn process_seconds() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_secs()
}

/// The per-call-site state behind [`guest_error!`](crate::guest_error!).
#[derive(Debug)]
pub struct RateLimit {
    /// Second (since process start) of the current window, plus one so that
    /// zero means "never used".
    window: AtomicU64,
    printed: AtomicU64,
    suppressed: AtomicU64,
}

impl RateLimit {
    pub const fn new() -> Self {
        Self {
            window: AtomicU64::new(0),
            printed: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(held_back)` if this event may be logged, where `held_back` is
    /// how many earlier events were not; `None` if it must be dropped.
    pub fn check(&self) -> Option<u64> {
        self.check_at(process_seconds())
    }

    fn check_at(&self, now: u64) -> Option<u64> {
        let window = now + 1;
        if self.window.swap(window, Ordering::Relaxed) != window {
            self.printed.store(0, Ordering::Relaxed);
        }
        if self.printed.fetch_add(1, Ordering::Relaxed) < BURST {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

impl Default for RateLimit {
    fn default() -> Self {
        Self::new()
    }
}

/// Logs something a guest did wrong, rate-limited per call site.
///
/// ```
/// vm_core::guest_error!("pl011: write to read-only register {:#x}", 0x18);
/// ```
#[macro_export]
macro_rules! guest_error {
    ($($arg:tt)+) => {
        $crate::log_limited!(warn, target: "guest", $($arg)+)
    };
}

/// Logs at `level` (a `tracing` macro name), rate-limited per call site as
/// [`guest_error!`](crate::guest_error!) is; the target is the caller's
/// module unless given.
///
/// ```
/// let e = std::io::Error::other("no space left");
/// vm_core::log_limited!(error, "virtio-blk: write failed: {e}");
/// vm_core::log_limited!(info, target: "guest", "pvpanic: guest panicked");
/// ```
#[macro_export]
macro_rules! log_limited {
    ($level:ident, target: $target:expr, $($arg:tt)+) => {{
        static LIMIT: $crate::guest_error::RateLimit = $crate::guest_error::RateLimit::new();
        if let Some(held_back) = LIMIT.check() {
            if held_back > 0 {
                $crate::tracing::$level!(target: $target, "{} ({} similar held back)", format_args!($($arg)+), held_back);
            } else {
                $crate::tracing::$level!(target: $target, $($arg)+);
            }
        }
    }};
    ($level:ident, $($arg:tt)+) => {
        $crate::log_limited!($level, target: module_path!(), $($arg)+)
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_then_counts_what_it_held_back() {
        let limit = RateLimit::new();
        for _ in 0..BURST {
            assert_eq!(limit.check_at(5), Some(0));
        }
        for _ in 0..7 {
            assert_eq!(limit.check_at(5), None);
        }
        assert_eq!(limit.check_at(6), Some(7), "new window reports the backlog");
        assert_eq!(limit.check_at(6), Some(0));
    }

    #[test]
    fn macro_expands_with_and_without_arguments() {
        crate::guest_error!("plain");
        crate::guest_error!("formatted {:#x}", 0x10);
        crate::log_limited!(error, "plain");
        crate::log_limited!(info, target: "guest", "formatted {}", 1);
    }
}
