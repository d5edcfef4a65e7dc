//! Host ends of the serial console: where the PL011's bytes go and where
//! its input comes from (`--serial stdio|file:PATH|unix:PATH|none`).
//!
//! - `stdio`: output to stdout; input from stdin, which is put in raw mode
//!   when it is a terminal (restored when the [`SerialConnection`] drops).
//!   `Ctrl-A x` asks the VMM to stop; `Ctrl-A Ctrl-A` sends one Ctrl-A.
//! - `file:PATH`: output appended to PATH (created 0600 if missing; never
//!   truncated, so nothing already there is lost); no input.
//! - `unix:PATH`: vmapple listens on a unix socket (mode 0600) and serves
//!   one client at a time, both directions. Output while no client is
//!   connected is discarded.
//! - `none`: output discarded, no input.
//!
//! Input threads hand bytes to the UART as the RX FIFO makes room: input
//! is never dropped and never spins.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::pl011::Pl011;

/// Where UART output goes.
pub trait SerialOutput: Send {
    fn write_bytes(&mut self, bytes: &[u8]);
}

/// A serial backend chosen on the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SerialBackend {
    Stdio,
    File(PathBuf),
    Unix(PathBuf),
    None,
}

impl FromStr for SerialBackend {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let path = |p: &str, kind: &str| {
            if p.is_empty() {
                Err(format!("{kind}: needs a path, e.g. {kind}:/tmp/console"))
            } else {
                Ok(PathBuf::from(p))
            }
        };
        match text.split_once(':') {
            None if text == "stdio" => Ok(Self::Stdio),
            None if text == "none" => Ok(Self::None),
            Some(("file", p)) => path(p, "file").map(Self::File),
            Some(("unix", p)) => path(p, "unix").map(Self::Unix),
            _ => Err(format!(
                "unknown serial backend {text:?}: use stdio, file:PATH, unix:PATH or none"
            )),
        }
    }
}

impl fmt::Display for SerialBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Stdio => f.write_str("stdio"),
            Self::File(p) => write!(f, "file:{}", p.display()),
            Self::Unix(p) => write!(f, "unix:{}", p.display()),
            Self::None => f.write_str("none"),
        }
    }
}

/// A sink that keeps everything, for tests.
#[derive(Clone, Default)]
pub struct CaptureOutput(Arc<Mutex<Vec<u8>>>);

impl CaptureOutput {
    pub fn bytes(&self) -> Vec<u8> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl SerialOutput for CaptureOutput {
    fn write_bytes(&mut self, bytes: &[u8]) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(bytes);
    }
}

struct Discard;

impl SerialOutput for Discard {
    fn write_bytes(&mut self, _bytes: &[u8]) {}
}

struct Stdout;

impl SerialOutput for Stdout {
    fn write_bytes(&mut self, bytes: &[u8]) {
        let mut out = io::stdout().lock();
        // A closed stdout (the reader went away) must not stop the guest.
        let _ = out.write_all(bytes).and_then(|()| out.flush());
    }
}

struct FileOutput(File);

impl SerialOutput for FileOutput {
    fn write_bytes(&mut self, bytes: &[u8]) {
        if let Err(e) = self.0.write_all(bytes) {
            vm_core::guest_error!("serial file output failed: {e}");
        }
    }
}

/// The connected client of a `unix:` backend, shared by the accept thread
/// (which replaces it) and the output (which writes to it).
type Client = Arc<Mutex<Option<UnixStream>>>;

struct SocketOutput(Client);

impl SerialOutput for SocketOutput {
    fn write_bytes(&mut self, bytes: &[u8]) {
        let mut client = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(stream) = client.as_mut() {
            if stream.write_all(bytes).is_err() {
                *client = None;
            }
        }
    }
}

/// The input half of an opened backend, waiting for its UART.
pub struct SerialInput(InputSource);

enum InputSource {
    None,
    Stdin,
    Socket {
        listener: UnixListener,
        client: Client,
        path: PathBuf,
    },
}

/// Opens `backend`: the output sink for the UART and the input to connect
/// once the UART exists.
pub fn open(backend: &SerialBackend) -> io::Result<(Box<dyn SerialOutput>, SerialInput)> {
    Ok(match backend {
        SerialBackend::None => (Box::new(Discard), SerialInput(InputSource::None)),
        SerialBackend::Stdio => (Box::new(Stdout), SerialInput(InputSource::Stdin)),
        SerialBackend::File(path) => {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| {
                    io::Error::new(e.kind(), format!("cannot open {}: {e}", path.display()))
                })?;
            (Box::new(FileOutput(file)), SerialInput(InputSource::None))
        }
        SerialBackend::Unix(path) => {
            let listener = listen(path)?;
            let client: Client = Arc::default();
            (
                Box::new(SocketOutput(client.clone())),
                SerialInput(InputSource::Socket {
                    listener,
                    client,
                    path: path.clone(),
                }),
            )
        }
    })
}

fn listen(path: &Path) -> io::Result<UnixListener> {
    let context = |e: io::Error, what: &str| {
        io::Error::new(e.kind(), format!("cannot {what} {}: {e}", path.display()))
    };
    match std::fs::symlink_metadata(path) {
        // A socket left by an earlier run may go; anything else is the
        // user's file and stays.
        Ok(meta) if meta.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(|e| context(e, "remove the stale socket"))?
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{} exists and is not a socket; refusing to replace it",
                    path.display()
                ),
            ))
        }
        Err(_) => {}
    }
    let listener = UnixListener::bind(path).map_err(|e| context(e, "listen on"))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| context(e, "restrict"))?;
    Ok(listener)
}

/// Keeps a connected backend alive: restores the terminal and removes the
/// socket when dropped.
pub struct SerialConnection {
    raw_mode: Option<RawMode>,
    socket_path: Option<PathBuf>,
}

impl Drop for SerialConnection {
    fn drop(&mut self) {
        self.raw_mode.take();
        if let Some(path) = self.socket_path.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl SerialInput {
    /// Starts feeding `uart`; `on_quit` runs when the user types the
    /// escape sequence (stdio only).
    pub fn connect(
        self,
        uart: Arc<Pl011>,
        on_quit: Box<dyn Fn() + Send>,
    ) -> io::Result<SerialConnection> {
        let mut connection = SerialConnection {
            raw_mode: None,
            socket_path: None,
        };
        match self.0 {
            InputSource::None => {}
            InputSource::Stdin => {
                connection.raw_mode = RawMode::enter()?;
                spawn("serial-stdin", move || {
                    let mut escape = EscapeFilter::default();
                    pump(io::stdin().lock(), &uart, |bytes| {
                        let (out, quit) = escape.filter(bytes);
                        if quit {
                            on_quit();
                        }
                        out
                    });
                })?;
            }
            InputSource::Socket {
                listener,
                client,
                path,
            } => {
                connection.socket_path = Some(path);
                spawn("serial-socket", move || {
                    for stream in listener.incoming().flatten() {
                        let Ok(reader) = stream.try_clone() else {
                            continue;
                        };
                        *client.lock().unwrap_or_else(|e| e.into_inner()) = Some(stream);
                        pump(reader, &uart, |bytes| bytes.to_vec());
                        *client.lock().unwrap_or_else(|e| e.into_inner()) = None;
                    }
                })?;
            }
        }
        Ok(connection)
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> io::Result<()> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map(|_| ())
}

/// Copies `reader` into the UART until EOF, waiting for FIFO room.
fn pump(mut reader: impl Read, uart: &Pl011, mut transform: impl FnMut(&[u8]) -> Vec<u8>) {
    let mut buf = [0u8; 256];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let data = transform(&buf[..n]);
        let mut rest = &data[..];
        while !rest.is_empty() {
            let taken = uart.receive(rest);
            rest = &rest[taken..];
            if !rest.is_empty() {
                uart.wait_for_rx_space(Duration::from_millis(100));
            }
        }
    }
}

/// The `Ctrl-A x` escape of the stdio console.
#[derive(Debug, Default)]
pub struct EscapeFilter {
    after_ctrl_a: bool,
}

const CTRL_A: u8 = 0x01;

impl EscapeFilter {
    /// Returns the bytes for the guest and whether the user asked to quit.
    pub fn filter(&mut self, input: &[u8]) -> (Vec<u8>, bool) {
        let mut out = Vec::with_capacity(input.len());
        let mut quit = false;
        for &b in input {
            if self.after_ctrl_a {
                self.after_ctrl_a = false;
                match b {
                    b'x' | b'X' => quit = true,
                    CTRL_A => out.push(CTRL_A),
                    other => out.extend_from_slice(&[CTRL_A, other]),
                }
            } else if b == CTRL_A {
                self.after_ctrl_a = true;
            } else {
                out.push(b);
            }
        }
        (out, quit)
    }
}

/// Terminal raw mode on stdin for as long as this lives.
struct RawMode {
    saved: libc::termios,
}

impl RawMode {
    /// Enters raw mode if stdin is a terminal; `None` otherwise.
    fn enter() -> io::Result<Option<Self>> {
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(libc::STDIN_FILENO) } != 1 {
            return Ok(None);
        }
        // SAFETY: termios is plain data; tcgetattr fills it.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: valid descriptor and pointer.
        if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut saved) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw only edits the struct it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        // Keep output post-processing so host-side logs still start lines
        // at column 0; the guest's own CR/LF pass through unchanged.
        raw.c_oflag = saved.c_oflag;
        // SAFETY: valid descriptor and pointer.
        if unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Some(Self { saved }))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restores the attributes read in `enter`.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &self.saved) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pl011::{FR_RXFE, UARTDR, UARTFR};
    use vm_core::{AccessWidth, MmioDevice, NoIrq};

    #[test]
    fn parses_backends_and_explains_mistakes() {
        assert_eq!("stdio".parse(), Ok(SerialBackend::Stdio));
        assert_eq!("none".parse(), Ok(SerialBackend::None));
        assert_eq!(
            "file:/tmp/x".parse(),
            Ok(SerialBackend::File("/tmp/x".into()))
        );
        assert_eq!(
            "unix:/tmp/s".parse(),
            Ok(SerialBackend::Unix("/tmp/s".into()))
        );
        assert!("file:"
            .parse::<SerialBackend>()
            .unwrap_err()
            .contains("needs a path"));
        assert!("tcp:1"
            .parse::<SerialBackend>()
            .unwrap_err()
            .contains("unknown serial backend"));
        assert_eq!(SerialBackend::Unix("/a".into()).to_string(), "unix:/a");
    }

    #[test]
    fn escape_sequence() {
        let mut f = EscapeFilter::default();
        assert_eq!(f.filter(b"ab\x01"), (b"ab".to_vec(), false));
        assert_eq!(
            f.filter(b"\x01c"),
            (b"\x01c".to_vec(), false),
            "Ctrl-A Ctrl-A sends one"
        );
        assert_eq!(
            f.filter(b"\x01q"),
            (b"\x01q".to_vec(), false),
            "unknown escapes pass through"
        );
        assert_eq!(f.filter(b"\x01x"), (Vec::new(), true));
    }

    fn temp_path(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vmapple-serial-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join(name)
    }

    #[test]
    fn unix_socket_round_trip() {
        let path = temp_path("console.sock");
        let (output, input) = open(&SerialBackend::Unix(path.clone())).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "owner-only socket");
        let uart = Pl011::new(Arc::new(NoIrq), output);
        let connection = input.connect(uart.clone(), Box::new(|| {})).unwrap();

        let mut client = UnixStream::connect(&path).unwrap();
        client.write_all(b"hello").unwrap();
        let mut got = Vec::new();
        for _ in 0..500 {
            while uart.read(UARTFR, AccessWidth::Word) as u32 & FR_RXFE == 0 {
                got.push(uart.read(UARTDR, AccessWidth::Word) as u8);
            }
            if got.len() == 5 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(got, b"hello");

        // Output reaches the client once the server has registered it.
        uart.write(UARTDR, AccessWidth::Word, u64::from(b'!'));
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut byte = [0u8; 1];
        client.read_exact(&mut byte).unwrap();
        assert_eq!(&byte, b"!");

        drop(connection);
        assert!(!path.exists(), "socket removed on shutdown");
    }

    #[test]
    fn refuses_to_replace_a_regular_file() {
        let path = temp_path("not-a-socket");
        std::fs::write(&path, b"precious").unwrap();
        let err = open(&SerialBackend::Unix(path.clone())).err().unwrap();
        assert!(err.to_string().contains("is not a socket"));
        assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    }

    #[test]
    fn file_output_appends() {
        let path = temp_path("console.log");
        std::fs::write(&path, b"old\n").unwrap();
        let (mut output, _) = open(&SerialBackend::File(path.clone())).unwrap();
        output.write_bytes(b"new\n");
        assert_eq!(std::fs::read(&path).unwrap(), b"old\nnew\n");
        assert!(open(&SerialBackend::File("/nonexistent/dir/x".into())).is_err());
    }
}
