//! Host ends of the serial console, chosen on the command line as
//! `--serial stdio|file:PATH|unix:PATH|none`.
//!
//! Connecting a backend takes two steps because the UART needs its output
//! sink when it is built, and the input threads need the built UART:
//!
//! ```no_run
//! use std::sync::Arc;
//! use devices::pl011::Pl011;
//! use devices::serial::{SerialBackend, SerialHost};
//! # let irq: Arc<dyn vm_core::IrqLine> = Arc::new(vm_core::NoIrq);
//! let backend: SerialBackend = "stdio".parse()?;
//! let mut host = SerialHost::open(&backend)?;         // files, sockets
//! let uart = Pl011::new(irq, host.take_output());      // the machine builds this
//! let console = host.attach(uart.clone(), || { /* ask the VMM to quit */ })?;
//! // ... run the VM; keep `console` alive until the VM has stopped ...
//! drop(console);                                       // threads stop, terminal restored
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! | backend | output | input |
//! |---|---|---|
//! | `stdio` | stdout, written through at once | stdin; raw mode and `Ctrl-A` escapes when it is a terminal |
//! | `file:PATH` | PATH, created or truncated (as QEMU's `file:` does), mode 0666 less umask | none |
//! | `unix:PATH` | the connected client, or the newest [`BACKLOG_LIMIT`] bytes while none is (or it is slow) | the connected client |
//! | `none` | discarded | none |
//!
//! Input never busy-waits and never drops a byte: it waits for the guest to
//! read, pushing back on the host (see `input.rs`). Output is written on the
//! vCPU thread that stored to `UARTDR`; stdout and files block it if the
//! host does (as a slow line would), the socket backend never does.

mod input;
mod terminal;
mod unix;
mod wake;

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, IsTerminal, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
#[cfg(any(test, feature = "test-util"))]
use vm_core::sync::lock;

use vm_core::IrqLine;

use crate::pl011::Pl011;
pub use crate::pl011::SerialOutput;
use input::InputQueue;
pub use terminal::{restore_terminal, EscapeFilter, EscapeOutcome, TerminalGuard, ESCAPE};
pub use unix::BACKLOG_LIMIT;
use wake::Waker;

/// Called from the input thread when the user types `Ctrl-A x`. It should
/// only ask the VMM to stop (set a flag, send on a channel); dropping the
/// [`SerialHandle`] from inside it is tolerated but cannot join the thread
/// that is running it.
pub type QuitCallback = Arc<dyn Fn() + Send + Sync>;

pub use vm_config::{SerialBackend, SerialSpecError, SERIAL_BACKEND_FORMS};

/// Why a serial backend could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    #[error("cannot open serial output file {}: {source}", path.display())]
    File { path: PathBuf, source: io::Error },
    #[error("cannot create serial socket {}: {source}", path.display())]
    Unix { path: PathBuf, source: io::Error },
    #[error("cannot create serial socket {}: a file that is not a socket is in the way", path.display())]
    NotASocket { path: PathBuf },
    #[error("cannot create serial socket {}: another process is listening on it", path.display())]
    SocketInUse { path: PathBuf },
    #[error("cannot put the terminal into raw mode: {0}")]
    Terminal(#[source] io::Error),
    #[error("cannot start a serial I/O thread: {0}")]
    Thread(#[source] io::Error),
}

/// Discards everything (`none`, and what [`SerialHost::take_output`] gives
/// after the first call).
#[derive(Debug, Default, Clone, Copy)]
pub struct NullOutput;

impl SerialOutput for NullOutput {
    fn write_bytes(&mut self, _bytes: &[u8]) {}
}

/// Collects output in memory, for tests (feature `test-util`). Clones
/// share one buffer.
#[cfg(any(test, feature = "test-util"))]
#[derive(Debug, Default, Clone)]
pub struct CaptureOutput(pub Arc<Mutex<Vec<u8>>>);

#[cfg(any(test, feature = "test-util"))]
impl CaptureOutput {
    pub fn new() -> Self {
        Self::default()
    }

    /// Everything written so far.
    pub fn contents(&self) -> Vec<u8> {
        lock(&self.0).clone()
    }
}

#[cfg(any(test, feature = "test-util"))]
impl SerialOutput for CaptureOutput {
    fn write_bytes(&mut self, bytes: &[u8]) {
        lock(&self.0).extend_from_slice(bytes);
    }
}

/// A host writer that reports its first failure and then discards, so a
/// closed stdout (`vmapple | head`) neither kills nor floods the VMM.
struct WriterOutput<W: Write + Send> {
    writer: W,
    what: String,
    failed: bool,
}

impl<W: Write + Send> SerialOutput for WriterOutput<W> {
    fn write_bytes(&mut self, bytes: &[u8]) {
        if self.failed {
            return;
        }
        // Flushed every time: console output must appear as it is written,
        // not when a line or buffer fills.
        if let Err(e) = self
            .writer
            .write_all(bytes)
            .and_then(|()| self.writer.flush())
        {
            self.failed = true;
            tracing::warn!(target: "serial", "serial output to {} failed, discarding from now on: {e}", self.what);
        }
    }

    fn flush(&mut self) {
        let _ = self.writer.flush();
    }
}

/// `io::Stdout` per write, so the sink holds no lock on stdout between
/// writes and other users of stdout interleave at byte boundaries.
struct Stdout;

impl Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        io::stdout().write(buf)
    }
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        io::stdout().write_all(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        io::stdout().flush()
    }
}

enum HostInput {
    None,
    Stdio,
    Unix {
        listener: std::os::unix::net::UnixListener,
        shared: Arc<Mutex<unix::Shared>>,
        socket: unix::SocketFile,
    },
}

/// An opened backend, before the UART exists: hand [`take_output`] to
/// [`Pl011::new`], then [`attach`] the UART.
///
/// [`take_output`]: SerialHost::take_output
/// [`attach`]: SerialHost::attach
pub struct SerialHost {
    output: Option<Box<dyn SerialOutput>>,
    input: HostInput,
    waker: Arc<Waker>,
}

impl fmt::Debug for SerialHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SerialHost").finish_non_exhaustive()
    }
}

impl SerialHost {
    /// Opens the host side of `backend`: creates the file or the listening
    /// socket. No thread starts and the terminal is untouched until
    /// [`SerialHost::attach`].
    pub fn open(backend: &SerialBackend) -> Result<SerialHost, SerialError> {
        let waker = Arc::new(Waker::new().map_err(SerialError::Thread)?);
        let (output, input): (Box<dyn SerialOutput>, HostInput) = match backend {
            SerialBackend::Stdio => (
                Box::new(WriterOutput {
                    writer: Stdout,
                    what: "stdout".into(),
                    failed: false,
                }),
                HostInput::Stdio,
            ),
            SerialBackend::File(path) => (Box::new(open_file(path)?), HostInput::None),
            SerialBackend::Unix(path) => {
                let (listener, socket) = unix::listen(path)?;
                let shared = Arc::new(Mutex::new(unix::Shared::default()));
                let output = unix::UnixOutput {
                    shared: shared.clone(),
                    waker: waker.clone(),
                };
                (
                    Box::new(output),
                    HostInput::Unix {
                        listener,
                        shared,
                        socket,
                    },
                )
            }
            SerialBackend::None => (Box::new(NullOutput), HostInput::None),
        };
        Ok(SerialHost {
            output: Some(output),
            input,
            waker,
        })
    }
}

fn open_file(path: &Path) -> Result<WriterOutput<File>, SerialError> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|source| SerialError::File {
            path: path.to_owned(),
            source,
        })?;
    Ok(WriterOutput {
        writer: file,
        what: path.display().to_string(),
        failed: false,
    })
}

impl SerialHost {
    /// The sink for [`Pl011::new`]. A second call gets a [`NullOutput`].
    pub fn take_output(&mut self) -> Box<dyn SerialOutput> {
        self.output.take().unwrap_or_else(|| Box::new(NullOutput))
    }

    /// Starts feeding host input to `uart` and returns the handle that
    /// owns the threads, the raw terminal and the socket file. `on_quit`
    /// runs on the input thread when the user types `Ctrl-A x` (stdio on
    /// a terminal only).
    pub fn attach(
        self,
        uart: Arc<Pl011>,
        on_quit: impl Fn() + Send + Sync + 'static,
    ) -> Result<SerialHandle, SerialError> {
        let on_quit: QuitCallback = Arc::new(on_quit);
        let mut handle = SerialHandle {
            queue: Arc::new(InputQueue::default()),
            waker: self.waker,
            threads: Vec::new(),
            terminal: None,
            socket: None,
        };
        match self.input {
            HostInput::None => {}
            HostInput::Stdio => {
                let stdin = io::stdin();
                let interactive = stdin.is_terminal();
                if interactive {
                    handle.terminal =
                        TerminalGuard::raw(stdin.as_fd()).map_err(SerialError::Terminal)?;
                }
                match stdin.as_fd().try_clone_to_owned() {
                    Ok(fd) => handle.start_stream(File::from(fd), interactive, on_quit, uart)?,
                    // A VMM started with stdin closed still has a console
                    // to print to; it just takes no input.
                    Err(e) => {
                        tracing::info!(target: "serial", "no serial input: stdin unusable: {e}")
                    }
                }
            }
            HostInput::Unix {
                listener,
                shared,
                socket,
            } => {
                handle.socket = Some(socket);
                let (queue, waker) = (handle.queue.clone(), handle.waker.clone());
                handle.spawn("serial-socket", move || {
                    unix::serve(&listener, &shared, &queue, &waker)
                })?;
                handle.start_feeder(uart)?;
            }
        }
        Ok(handle)
    }
}

/// Opens `backend`, builds the UART on it and attaches: the whole setup
/// for a caller that builds the UART itself.
pub fn connect(
    backend: &SerialBackend,
    irq: Arc<dyn IrqLine>,
    on_quit: impl Fn() + Send + Sync + 'static,
) -> Result<(Arc<Pl011>, SerialHandle), SerialError> {
    let mut host = SerialHost::open(backend)?;
    let uart = Pl011::new(irq, host.take_output());
    let handle = host.attach(uart.clone(), on_quit)?;
    Ok((uart, handle))
}

/// The running host side of the console. Keep it alive while the VM runs;
/// dropping it stops and joins the I/O threads, restores the terminal and
/// removes the socket file.
pub struct SerialHandle {
    queue: Arc<InputQueue>,
    waker: Arc<Waker>,
    threads: Vec<JoinHandle<()>>,
    terminal: Option<TerminalGuard>,
    socket: Option<unix::SocketFile>,
}

impl fmt::Debug for SerialHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SerialHandle")
            .field("threads", &self.threads.len())
            .field("raw_terminal", &self.terminal.is_some())
            .finish_non_exhaustive()
    }
}

impl SerialHandle {
    /// Whether stdin was a terminal now in raw mode.
    pub fn is_raw_terminal(&self) -> bool {
        self.terminal.is_some()
    }

    fn spawn(
        &mut self,
        name: &str,
        body: impl FnOnce() + Send + 'static,
    ) -> Result<(), SerialError> {
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(body)
            .map_err(SerialError::Thread)?;
        self.threads.push(thread);
        Ok(())
    }

    fn start_feeder(&mut self, uart: Arc<Pl011>) -> Result<(), SerialError> {
        let (queue, waker) = (self.queue.clone(), self.waker.clone());
        self.spawn("serial-feed", move || input::feed(&queue, &uart, &waker))
    }

    /// Reader and feeder threads for a byte stream.
    fn start_stream(
        &mut self,
        source: File,
        interactive: bool,
        on_quit: QuitCallback,
        uart: Arc<Pl011>,
    ) -> Result<(), SerialError> {
        let (queue, waker) = (self.queue.clone(), self.waker.clone());
        let filter = interactive.then(EscapeFilter::new);
        self.spawn("serial-input", move || {
            input::read_stream(&source, &queue, &waker, filter, &on_quit)
        })?;
        self.start_feeder(uart)
    }
}

impl Drop for SerialHandle {
    fn drop(&mut self) {
        self.queue.stop();
        self.waker.wake();
        let me = std::thread::current().id();
        for thread in self.threads.drain(..) {
            if thread.thread().id() != me {
                let _ = thread.join();
            }
        }
        // Explicitly last: the terminal goes back to cooked mode only after
        // nothing reads from it any more.
        self.terminal.take();
        self.socket.take();
    }
}

#[cfg(test)]
mod tests;
