use super::*;
use crate::pl011::{fr, reg};
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use vm_core::sync::lock;
use vm_core::{AccessWidth, MmioDevice, NoIrq, TestIrq};

/// A scratch directory removed on drop (no tempfile dependency).
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static COUNT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "vmapple-serial-{}-{}",
            std::process::id(),
            COUNT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const PATIENCE: Duration = Duration::from_secs(10);

fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Reads `count` bytes the way a polling guest driver does.
fn guest_read(uart: &Pl011, count: usize) -> Vec<u8> {
    let mut got = Vec::with_capacity(count);
    let deadline = Instant::now() + PATIENCE;
    while got.len() < count {
        if uart.read(reg::FR, AccessWidth::Word) as u32 & fr::RXFE == 0 {
            got.push(uart.read(reg::DR, AccessWidth::Word) as u8);
            continue;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {} of {count} bytes",
            got.len()
        );
        std::thread::sleep(Duration::from_micros(100));
    }
    got
}

fn guest_write(uart: &Pl011, bytes: &[u8]) {
    for &b in bytes {
        uart.write(reg::DR, AccessWidth::Word, u64::from(b));
    }
}

fn uart_with_fifo() -> Arc<Pl011> {
    let uart = Pl011::new(Arc::new(NoIrq), Box::new(NullOutput));
    uart.write(reg::LCR_H, AccessWidth::Word, 0x70);
    uart
}

fn handle_for_stream(
    uart: Arc<Pl011>,
    source: File,
    interactive: bool,
    on_quit: QuitCallback,
) -> SerialHandle {
    let mut handle = SerialHandle {
        queue: Arc::new(InputQueue::default()),
        waker: Arc::new(Waker::new().unwrap()),
        threads: Vec::new(),
        terminal: None,
        socket: None,
    };
    handle
        .start_stream(source, interactive, on_quit, uart)
        .unwrap();
    handle
}

fn no_quit() -> QuitCallback {
    Arc::new(|| panic!("unexpected quit"))
}

#[test]
fn parses_every_backend_form_and_round_trips() {
    for (spec, backend) in [
        ("stdio", SerialBackend::Stdio),
        ("none", SerialBackend::None),
        (
            "file:/tmp/console.log",
            SerialBackend::File("/tmp/console.log".into()),
        ),
        (
            "file:rel/with:colon",
            SerialBackend::File("rel/with:colon".into()),
        ),
        (
            "unix:/run/vm.sock",
            SerialBackend::Unix("/run/vm.sock".into()),
        ),
    ] {
        let parsed: SerialBackend = spec.parse().unwrap();
        assert_eq!(parsed, backend);
        assert_eq!(parsed.to_string(), spec);
    }
}

#[test]
fn rejects_bad_backends_with_a_reason() {
    for (spec, reason) in [
        ("", "empty"),
        ("file:", "needs a path"),
        ("unix:", "needs a path"),
        ("file", "needs a path"),
        ("stdio:x", "takes no argument"),
        ("mon:stdio", "monitor"),
        ("tcp:localhost:4444", "unknown backend kind \"tcp\""),
        ("Stdio", "unknown backend"),
        ("pty", "unknown backend"),
    ] {
        let err = spec.parse::<SerialBackend>().unwrap_err();
        let message = err.to_string();
        assert!(message.contains(reason), "{spec:?}: {message}");
        assert!(
            message.contains(SERIAL_BACKEND_FORMS),
            "{spec:?}: {message}"
        );
        assert!(
            message.contains(&format!("{spec:?}")),
            "{spec:?}: {message}"
        );
    }
}

#[test]
fn escape_filter_quits_escapes_and_passes_everything_else() {
    let mut filter = EscapeFilter::new();
    let mut out = Vec::new();
    assert_eq!(filter.feed(b"ls\r", &mut out), EscapeOutcome::default());
    // Ctrl-A Ctrl-A is one literal Ctrl-A; Ctrl-A + other sends both.
    filter.feed(b"a\x01\x01b\x01c", &mut out);
    assert_eq!(out, b"ls\ra\x01b\x01c");
    // An escape split across reads.
    out.clear();
    assert_eq!(filter.feed(b"q\x01", &mut out), EscapeOutcome::default());
    let outcome = filter.feed(b"h\x01", &mut out);
    assert!(outcome.help && !outcome.quit);
    let outcome = filter.feed(b"xignored", &mut out);
    assert!(outcome.quit);
    assert_eq!(out, b"q");
}

#[test]
fn stream_input_reaches_the_guest_in_order_without_loss() {
    let uart = uart_with_fifo();
    let (mut host, source) = UnixStream::pair().unwrap();
    let handle = handle_for_stream(
        uart.clone(),
        File::from(OwnedFd::from(source)),
        false,
        no_quit(),
    );
    // More than the queue holds, so the reader must throttle and resume.
    let data: Vec<u8> = (0..40_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let writer = {
        let data = data.clone();
        std::thread::spawn(move || {
            host.write_all(&data).unwrap();
            // EOF ends input; queued bytes are still delivered.
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(guest_read(&uart, data.len()), data);
    writer.join().unwrap();
    drop(handle);
}

#[test]
fn interactive_stream_interprets_escapes() {
    let uart = uart_with_fifo();
    let (mut host, source) = UnixStream::pair().unwrap();
    let quits = Arc::new(AtomicUsize::new(0));
    let on_quit: QuitCallback = {
        let quits = quits.clone();
        Arc::new(move || {
            quits.fetch_add(1, Ordering::SeqCst);
        })
    };
    let handle = handle_for_stream(
        uart.clone(),
        File::from(OwnedFd::from(source)),
        true,
        on_quit,
    );
    host.write_all(b"ab\x01\x01c").unwrap();
    assert_eq!(guest_read(&uart, 4), b"ab\x01c");
    // Quitting works even while the guest is not reading and the FIFO is
    // full: the reader is not stuck behind the guest.
    host.write_all(&[b'z'; 40]).unwrap();
    eventually("a full FIFO", || uart.rx_space() == 0);
    host.write_all(b"\x01x").unwrap();
    eventually("the quit callback", || quits.load(Ordering::SeqCst) == 1);
    drop(handle);
}

#[test]
fn file_backend_truncates_and_writes_output() {
    let dir = TempDir::new();
    let path = dir.0.join("console.log");
    std::fs::write(&path, b"old run\n").unwrap();
    let (uart, handle) =
        connect(&SerialBackend::File(path.clone()), Arc::new(NoIrq), || {}).unwrap();
    guest_write(&uart, b"boot\r\n");
    assert_eq!(std::fs::read(&path).unwrap(), b"boot\r\n");
    drop(handle);

    let missing = dir.0.join("no/such/dir/console.log");
    let err = SerialHost::open(&SerialBackend::File(missing.clone())).unwrap_err();
    assert!(matches!(err, SerialError::File { .. }));
    assert!(
        err.to_string().contains(&missing.display().to_string()),
        "{err}"
    );
}

#[test]
fn none_backend_discards_and_starts_nothing() {
    let irq = Arc::new(TestIrq::new());
    let (uart, handle) = connect(&SerialBackend::None, irq, || {}).unwrap();
    guest_write(&uart, b"into the void");
    assert!(handle.threads.is_empty());
    assert!(!handle.is_raw_terminal());
}

#[test]
fn unix_socket_round_trip() {
    let dir = TempDir::new();
    let path = dir.0.join("console.sock");
    let mut host = SerialHost::open(&SerialBackend::Unix(path.clone())).unwrap();
    let meta = std::fs::symlink_metadata(&path).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);

    let uart = Pl011::new(Arc::new(NoIrq), host.take_output());
    uart.write(reg::LCR_H, AccessWidth::Word, 0x70);
    // Output before any client is kept for the first one.
    guest_write(&uart, b"early boot\n");
    let handle = host.attach(uart.clone(), || {}).unwrap();

    let mut client = UnixStream::connect(&path).unwrap();
    client.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut early = [0u8; 11];
    client.read_exact(&mut early).unwrap();
    assert_eq!(&early, b"early boot\n");

    client.write_all(b"root\r").unwrap();
    assert_eq!(guest_read(&uart, 5), b"root\r");
    guest_write(&uart, b"# ");
    let mut prompt = [0u8; 2];
    client.read_exact(&mut prompt).unwrap();
    assert_eq!(&prompt, b"# ");

    // One client at a time: the second is told and disconnected.
    let mut second = UnixStream::connect(&path).unwrap();
    second.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut busy = Vec::new();
    second.read_to_end(&mut busy).unwrap();
    assert!(String::from_utf8_lossy(&busy).contains("already has a client"));

    // After the first leaves, a new client takes over.
    drop(client);
    guest_write(&uart, b"after\n");
    let mut third = UnixStream::connect(&path).unwrap();
    third.set_read_timeout(Some(PATIENCE)).unwrap();
    third.write_all(b"hi").unwrap();
    assert_eq!(guest_read(&uart, 2), b"hi");
    let mut after = Vec::new();
    guest_write(&uart, b"!");
    while !after.ends_with(b"!") {
        let mut byte = [0u8; 1];
        third.read_exact(&mut byte).unwrap();
        after.push(byte[0]);
    }
    // Whatever the departed client did not take arrives here, in order.
    assert!(after.ends_with(b"after\n!"), "{after:?}");

    drop(handle);
    assert!(!path.exists(), "socket removed on shutdown");
}

#[test]
fn unix_socket_input_is_never_dropped() {
    let dir = TempDir::new();
    let path = dir.0.join("s");
    let (uart, handle) =
        connect(&SerialBackend::Unix(path.clone()), Arc::new(NoIrq), || {}).unwrap();
    uart.write(reg::LCR_H, AccessWidth::Word, 0x70);
    let mut client = UnixStream::connect(&path).unwrap();
    let data: Vec<u8> = (0..50_000u32).map(|i| (i % 253) as u8).collect();
    let writer = {
        let data = data.clone();
        std::thread::spawn(move || client.write_all(&data).map(|()| client))
    };
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(guest_read(&uart, data.len()), data);
    drop(writer.join().unwrap());
    drop(handle);
}

#[test]
fn unix_socket_replaces_only_stale_sockets() {
    let dir = TempDir::new();
    let path = dir.0.join("console.sock");

    // A socket nobody listens on any more is replaced.
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let host = SerialHost::open(&SerialBackend::Unix(path.clone())).unwrap();

    // A live one is not.
    let err = SerialHost::open(&SerialBackend::Unix(path.clone())).unwrap_err();
    assert!(matches!(err, SerialError::SocketInUse { .. }), "{err}");
    drop(host);
    assert!(!path.exists());

    // Nor is anything that is not a socket.
    std::fs::write(&path, b"precious").unwrap();
    let err = SerialHost::open(&SerialBackend::Unix(path.clone())).unwrap_err();
    assert!(matches!(err, SerialError::NotASocket { .. }), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");

    let long = dir.0.join("x".repeat(200));
    let err = SerialHost::open(&SerialBackend::Unix(long)).unwrap_err();
    assert!(matches!(err, SerialError::Unix { .. }), "{err}");
}

/// Raw-mode tests run one at a time: a panic hook or `restore_terminal`
/// restores every raw terminal in the process, including another test's.
static TERMINAL_TESTS: Mutex<()> = Mutex::new(());

fn terminal_test() -> std::sync::MutexGuard<'static, ()> {
    lock(&TERMINAL_TESTS)
}

/// A pseudo-terminal pair: (controller, terminal).
fn pty() -> (OwnedFd, OwnedFd) {
    let (mut controller, mut terminal) = (-1, -1);
    // SAFETY: openpty writes two descriptors into the provided ints; the
    // name, termios and winsize pointers may be null.
    let rc = unsafe {
        libc::openpty(
            &mut controller,
            &mut terminal,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty: {}", io::Error::last_os_error());
    // SAFETY: both descriptors were just opened by openpty and are owned
    // by nothing else.
    unsafe {
        (
            OwnedFd::from_raw_fd(controller),
            OwnedFd::from_raw_fd(terminal),
        )
    }
}

fn attrs(fd: &OwnedFd) -> libc::termios {
    // SAFETY: all-zero termios is valid; tcgetattr fills it on success.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is open and `t` is a valid termios to write.
    assert_eq!(unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut t) }, 0);
    t
}

fn same_modes(a: &libc::termios, b: &libc::termios) -> bool {
    a.c_iflag == b.c_iflag
        && a.c_oflag == b.c_oflag
        && a.c_cflag == b.c_cflag
        && a.c_lflag == b.c_lflag
        && a.c_cc == b.c_cc
}

#[test]
fn raw_mode_guard_restores_the_terminal() {
    let _serial = terminal_test();
    let (_controller, terminal) = pty();
    let before = attrs(&terminal);
    assert_ne!(before.c_lflag & libc::ICANON, 0, "a fresh pty is cooked");

    let guard = TerminalGuard::raw(terminal.as_fd())
        .unwrap()
        .expect("a pty is a terminal");
    let raw = attrs(&terminal);
    assert_eq!(raw.c_lflag & (libc::ICANON | libc::ECHO | libc::ISIG), 0);
    assert_eq!(raw.c_iflag & (libc::ICRNL | libc::IXON), 0);
    assert_eq!(raw.c_oflag, before.c_oflag, "output processing untouched");
    assert_eq!(raw.c_cc[libc::VMIN], 1);
    assert!(same_modes(guard.saved(), &before));
    drop(guard);
    assert!(same_modes(&attrs(&terminal), &before));

    // The emergency path restores while the guard still lives, and the
    // guard's own restore afterwards is harmless.
    let guard = TerminalGuard::raw(terminal.as_fd()).unwrap().unwrap();
    assert!(!same_modes(&attrs(&terminal), &before));
    restore_terminal();
    assert!(same_modes(&attrs(&terminal), &before));
    drop(guard);
    assert!(same_modes(&attrs(&terminal), &before));
}

#[test]
fn raw_mode_is_undone_when_a_panic_unwinds() {
    let _serial = terminal_test();
    let (_controller, terminal) = pty();
    let before = attrs(&terminal);
    let fd = terminal.as_fd().try_clone_to_owned().unwrap();
    let result = std::thread::spawn(move || {
        let _guard = TerminalGuard::raw(fd.as_fd()).unwrap().unwrap();
        panic!("deliberate panic with the terminal raw");
    })
    .join();
    assert!(result.is_err());
    assert!(same_modes(&attrs(&terminal), &before));
}

#[test]
fn non_terminals_are_left_alone() {
    let (a, _b) = UnixStream::pair().unwrap();
    assert!(TerminalGuard::raw(a.as_fd()).unwrap().is_none());
}

/// The stdio backend is tested in a child process (this test binary run
/// again for [`stdio_child`]) whose stdin the parent controls, so the
/// developer's own terminal is never touched.
const CHILD_MODE: &str = "VMAPPLE_SERIAL_STDIO_CHILD";
const PIPE_INPUT: &[u8] = b"hello from the host\n";

fn run_child(mode: &str, stdin: std::process::Stdio) -> std::process::Child {
    std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "serial::tests::stdio_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_MODE, mode)
        .stdin(stdin)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn stdio_child() {
    let Ok(mode) = std::env::var(CHILD_MODE) else {
        return; // only meaningful when spawned by the tests below
    };
    let quits = Arc::new(AtomicUsize::new(0));
    let on_quit = {
        let quits = quits.clone();
        move || {
            quits.fetch_add(1, Ordering::SeqCst);
        }
    };
    let (uart, handle) = connect(&SerialBackend::Stdio, Arc::new(NoIrq), on_quit).unwrap();
    uart.write(reg::LCR_H, AccessWidth::Word, 0x70);
    match mode.as_str() {
        "pipe" => {
            // Enabling the FIFO empties it (as on hardware), so the parent
            // sends its input only once the FIFO is on.
            guest_write(&uart, b"fifo-on\n");
            assert!(!handle.is_raw_terminal());
            let got = guest_read(&uart, PIPE_INPUT.len());
            guest_write(&uart, b"echo:");
            guest_write(&uart, &got);
        }
        "pty" => {
            assert!(handle.is_raw_terminal());
            assert_eq!(guest_read(&uart, 2), b"ab");
            eventually("Ctrl-A x", || quits.load(Ordering::SeqCst) == 1);
            guest_write(&uart, b"quit-seen\n");
        }
        other => panic!("unknown child mode {other}"),
    }
    drop(handle);
}

#[test]
fn stdio_backend_reads_a_pipe_until_eof_without_raw_mode() {
    let mut child = run_child("pipe", std::process::Stdio::piped());
    let mut stdin = child.stdin.take().unwrap();
    let mut child_out = child.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut byte = [0u8];
    while !String::from_utf8_lossy(&seen).contains("fifo-on\n") {
        assert_eq!(child_out.read(&mut byte).unwrap(), 1, "child ended early");
        seen.push(byte[0]);
    }
    stdin.write_all(PIPE_INPUT).unwrap();
    drop(stdin); // EOF
    child_out.read_to_end(&mut seen).unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&seen);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("echo:hello from the host\n"), "{stdout}");
}

#[test]
fn stdio_backend_on_a_terminal_goes_raw_quits_and_restores() {
    let _serial = terminal_test();
    let (controller, terminal) = pty();
    let before = attrs(&terminal);
    let child_stdin = std::process::Stdio::from(terminal.try_clone().unwrap());
    let child = run_child("pty", child_stdin);
    eventually("raw mode in the child", || {
        attrs(&terminal).c_lflag & libc::ICANON == 0
    });
    File::from(controller.try_clone().unwrap())
        .write_all(b"ab\x01x")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("quit-seen\n"), "{stdout}");
    assert!(same_modes(&attrs(&terminal), &before), "terminal restored");
}
