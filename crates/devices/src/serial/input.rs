//! Host input on its way into the UART.
//!
//! Two threads per backend: a reader that takes bytes from the host (stdin
//! or a socket client) into an [`InputQueue`], and a feeder that moves them
//! into the UART's receive FIFO as the guest makes room. Splitting them
//! keeps the reader responsive while the guest is not reading (so `Ctrl-A x`
//! still quits a hung guest) and lets the feeder sleep on the UART's own
//! condition variable, so neither thread ever spins. No byte is dropped: the
//! reader stops taking host input while the queue is at its limit, which
//! pushes back on the host (a full pipe, a socket window, a terminal's
//! buffer).

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;
use vm_core::sync::{lock, wait};

use super::terminal::{EscapeFilter, ESCAPE_HELP};
use super::wake::{Poll, Waker, READABLE};
use super::QuitCallback;
use crate::pl011::Pl011;

/// Bytes the queue holds before the reader stops taking host input.
pub(crate) const QUEUE_LIMIT: usize = 16 * 1024;
/// Bytes the feeder takes out of the queue at a time.
const CHUNK: usize = 256;
/// How long the feeder sleeps on a full FIFO before checking for a stop.
const STOP_CHECK: Duration = Duration::from_millis(100);

#[derive(Default)]
struct QueueState {
    data: VecDeque<u8>,
    /// The host will send nothing more (EOF); the feeder exits once empty.
    closed: bool,
}

/// Host bytes waiting for room in the UART.
#[derive(Default)]
pub(crate) struct InputQueue {
    state: Mutex<QueueState>,
    changed: Condvar,
    stop: AtomicBool,
}

impl InputQueue {
    fn state(&self) -> MutexGuard<'_, QueueState> {
        lock(&self.state)
    }

    pub(crate) fn push(&self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        self.state().data.extend(bytes);
        self.changed.notify_all();
    }

    /// Whether the reader may take more host input.
    pub(crate) fn has_room(&self) -> bool {
        self.state().data.len() < QUEUE_LIMIT
    }

    pub(crate) fn close(&self) {
        self.state().closed = true;
        self.changed.notify_all();
    }

    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.changed.notify_all();
    }

    pub(crate) fn is_stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Waits for queued bytes and moves up to [`CHUNK`] of them into
    /// `chunk`; false once stopped, or closed and drained. `reader` is woken
    /// when this takes the queue back under its limit.
    fn take(&self, chunk: &mut Vec<u8>, reader: &Waker) -> bool {
        let mut state = self.state();
        while state.data.is_empty() && !state.closed && !self.is_stopped() {
            state = wait(&self.changed, state);
        }
        if self.is_stopped() || state.data.is_empty() {
            return false;
        }
        let was_full = state.data.len() >= QUEUE_LIMIT;
        let count = state.data.len().min(CHUNK);
        chunk.clear();
        chunk.extend(state.data.drain(..count));
        let resume_reader = was_full && state.data.len() < QUEUE_LIMIT;
        drop(state);
        if resume_reader {
            reader.wake();
        }
        true
    }
}

/// The feeder thread: queue to receive FIFO, waiting for room as needed.
pub(crate) fn feed(queue: &InputQueue, uart: &Pl011, reader: &Waker) {
    let mut chunk = Vec::with_capacity(CHUNK);
    while queue.take(&mut chunk, reader) {
        let mut rest = chunk.as_slice();
        loop {
            rest = &rest[uart.receive(rest)..];
            if rest.is_empty() {
                break;
            }
            while !uart.wait_for_rx_space(STOP_CHECK) {
                if queue.is_stopped() {
                    return;
                }
            }
        }
    }
}

/// The reader thread for a byte stream (stdin, or a pipe in tests): reads
/// until EOF, an error, a stop request or the quit escape. With `filter`
/// (an interactive terminal) the `Ctrl-A` escapes are interpreted.
pub(crate) fn read_stream(
    source: &File,
    queue: &InputQueue,
    waker: &Waker,
    mut filter: Option<EscapeFilter>,
    on_quit: &QuitCallback,
) {
    let mut buf = [0u8; 4096];
    let mut filtered = Vec::with_capacity(buf.len());
    loop {
        let room = queue.has_room();
        let mut poll = Poll::new();
        let wake = poll.add(waker.fd(), READABLE);
        let input = room.then(|| poll.add(source.as_fd(), READABLE));
        if let Err(e) = poll.wait() {
            tracing::warn!(target: "serial", "serial input stopped: poll failed: {e}");
            break;
        }
        if poll.ready(wake, READABLE) {
            waker.drain();
        }
        if queue.is_stopped() {
            return;
        }
        if !input.is_some_and(|i| poll.ready(i, READABLE)) {
            continue;
        }
        let n = match (&*source).read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                ) =>
            {
                continue
            }
            Err(e) => {
                tracing::warn!(target: "serial", "serial input stopped: read failed: {e}");
                break;
            }
        };
        let Some(filter) = filter.as_mut() else {
            queue.push(&buf[..n]);
            continue;
        };
        filtered.clear();
        let outcome = filter.feed(&buf[..n], &mut filtered);
        queue.push(&filtered);
        if outcome.help {
            // The terminal is raw, so lines need their carriage returns.
            let _ = io::stderr().write_all(ESCAPE_HELP.as_bytes());
        }
        if outcome.quit {
            on_quit();
            return;
        }
    }
    queue.close();
}
