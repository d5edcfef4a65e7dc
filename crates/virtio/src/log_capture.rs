//! Captures what a piece of test code logs, through `tracing` or (as
//! virtio-queue does) through `log`, to count the lines a guest can cause.

use std::io::Write;
use std::sync::{Arc, Mutex, Once};

use tracing_subscriber::fmt::MakeWriter;

#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        vm_core::sync::lock(&self.0).extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Sink {
    type Writer = Sink;
    fn make_writer(&'a self) -> Sink {
        self.clone()
    }
}

/// Runs `f` on this thread and returns its result and every line logged
/// meanwhile, at any level.
pub fn capture<R>(f: impl FnOnce() -> R) -> (R, Vec<String>) {
    static LOG_BRIDGE: Once = Once::new();
    // `log` records go to the thread's current subscriber, set below.
    LOG_BRIDGE.call_once(|| {
        let _ = tracing_log::LogTracer::init();
    });
    let sink = Sink::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(sink.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::TRACE)
        .finish();
    let result = tracing::subscriber::with_default(subscriber, || {
        // A callsite another test's thread hit first, with no subscriber
        // of its own, may have cached "never"; ask again now that this
        // one is live (the device's own threads log here too).
        tracing::callsite::rebuild_interest_cache();
        f()
    });
    let text = String::from_utf8_lossy(&vm_core::sync::lock(&sink.0)).into_owned();
    (result, text.lines().map(str::to_owned).collect())
}
