//! The interactive terminal: raw mode that is always undone, and the
//! `Ctrl-A` escapes that let the user leave a VM whose console owns the
//! keyboard.

use std::io::{self, IsTerminal};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, Once, TryLockError};
use vm_core::sync::lock;

/// `Ctrl-A`, the escape character (as in QEMU's `mon:stdio`).
pub const ESCAPE: u8 = 0x01;

/// Printed (to stderr) for `Ctrl-A h`.
pub(crate) const ESCAPE_HELP: &str = "\r\nvmapple console escapes:\r\n  \
     C-a x    quit the VM\r\n  \
     C-a h    show this help\r\n  \
     C-a C-a  send C-a to the guest\r\n";

/// What one call to [`EscapeFilter::feed`] asks for besides guest bytes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct EscapeOutcome {
    /// `Ctrl-A x` was typed: quit. Input after it was not looked at.
    pub quit: bool,
    /// `Ctrl-A h` was typed: show the escape help.
    pub help: bool,
}

/// The `Ctrl-A` state machine. State survives between calls, so an escape
/// split across two reads works.
///
/// * `Ctrl-A x` quits; `Ctrl-A h` shows help;
/// * `Ctrl-A Ctrl-A` sends one `Ctrl-A` to the guest;
/// * `Ctrl-A` followed by anything else sends both bytes, so no keystroke
///   is ever lost to a mistyped escape.
#[derive(Debug, Default, Clone)]
pub struct EscapeFilter {
    after_escape: bool,
}

impl EscapeFilter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends to `out` the bytes of `input` meant for the guest.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> EscapeOutcome {
        let mut outcome = EscapeOutcome::default();
        for &byte in input {
            if !self.after_escape {
                if byte == ESCAPE {
                    self.after_escape = true;
                } else {
                    out.push(byte);
                }
                continue;
            }
            self.after_escape = false;
            match byte {
                b'x' => {
                    outcome.quit = true;
                    return outcome;
                }
                b'h' => outcome.help = true,
                ESCAPE => out.push(ESCAPE),
                other => out.extend_from_slice(&[ESCAPE, other]),
            }
        }
        outcome
    }
}

/// Terminals currently in raw mode: (guard id, descriptor, saved modes).
/// The panic hook and [`restore_terminal`] restore from here, since they
/// cannot reach the guards.
static RAW_TERMINALS: Mutex<Vec<(u64, RawFd, libc::termios)>> = Mutex::new(Vec::new());
static NEXT_GUARD_ID: AtomicU64 = AtomicU64::new(0);
static PANIC_HOOK: Once = Once::new();

fn get_attrs(fd: BorrowedFd<'_>) -> io::Result<libc::termios> {
    // SAFETY: termios is plain integers and arrays; all-zero is a valid
    // value, and tcgetattr overwrites it entirely on success.
    let mut attrs: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is an open descriptor for the duration of the call and
    // `attrs` is a valid termios to write to.
    if unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut attrs) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(attrs)
}

fn set_attrs(fd: RawFd, attrs: &libc::termios) -> io::Result<()> {
    // TCSANOW rather than TCSADRAIN: draining waits for the terminal to
    // take pending output, which a stopped pty reader would make endless.
    // SAFETY: tcsetattr only reads `attrs`; an fd that is not a terminal
    // (or not open) makes it fail with an error, never misbehave.
    if unsafe { libc::tcsetattr(fd, libc::TCSANOW, attrs) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The modes a serial console needs: every byte as typed, immediately,
/// unechoed; `Ctrl-C`, `Ctrl-Z` and `Ctrl-\` go to the guest rather than
/// signalling the VMM (quit with `Ctrl-A x`); flow-control keys and CR/NL
/// translation off. Output processing is left as it was, as QEMU does, so
/// a guest that prints bare `\n` still starts lines at the left margin.
fn make_raw(attrs: &mut libc::termios) {
    attrs.c_iflag &= !(libc::IGNBRK
        | libc::BRKINT
        | libc::PARMRK
        | libc::ISTRIP
        | libc::INLCR
        | libc::IGNCR
        | libc::ICRNL
        | libc::IXON);
    attrs.c_lflag &= !(libc::ECHO | libc::ECHONL | libc::ICANON | libc::ISIG | libc::IEXTEN);
    attrs.c_cflag &= !(libc::CSIZE | libc::PARENB);
    attrs.c_cflag |= libc::CS8;
    attrs.c_cc[libc::VMIN] = 1;
    attrs.c_cc[libc::VTIME] = 0;
}

fn raw_terminals() -> std::sync::MutexGuard<'static, Vec<(u64, RawFd, libc::termios)>> {
    lock(&RAW_TERMINALS)
}

/// Puts every terminal a [`TerminalGuard`] made raw back the way it was.
///
/// For paths that skip destructors: call it before `std::process::exit`,
/// or from the thread that handles termination signals if it will not let
/// the guard drop. It is not async-signal-safe (it takes a lock), so do
/// not call it from inside a signal handler. Calling it more than once, or
/// before the guard drops, is harmless.
pub fn restore_terminal() {
    for (_, fd, saved) in raw_terminals().drain(..).rev() {
        let _ = set_attrs(fd, &saved);
    }
}

fn install_panic_hook() {
    PANIC_HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            // Restore first so the panic message lands on a sane terminal.
            // try_lock: a panic while the list is locked must not deadlock.
            let terminals = match RAW_TERMINALS.try_lock() {
                Ok(guard) => Some(guard),
                Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
                Err(TryLockError::WouldBlock) => None,
            };
            if let Some(mut terminals) = terminals {
                for (_, fd, saved) in terminals.drain(..).rev() {
                    let _ = set_attrs(fd, &saved);
                }
            }
            previous(info);
        }));
    });
}

/// Raw mode on one terminal for as long as the guard lives.
///
/// The modes are restored when the guard drops (including while a panic
/// unwinds), by a panic hook (for panics on other threads, or with
/// `panic = "abort"`), and by [`restore_terminal`].
#[derive(Debug)]
pub struct TerminalGuard {
    /// A duplicate, so the guard does not depend on the caller keeping its
    /// descriptor open.
    fd: OwnedFd,
    saved: libc::termios,
    id: u64,
}

impl TerminalGuard {
    /// Puts the terminal behind `fd` into raw mode. `Ok(None)` if `fd` is
    /// not a terminal (a pipe, a file, `/dev/null`): nothing to do.
    pub fn raw(fd: BorrowedFd<'_>) -> io::Result<Option<Self>> {
        if !fd.is_terminal() {
            return Ok(None);
        }
        let fd = fd.try_clone_to_owned()?;
        let saved = get_attrs(fd.as_fd())?;
        let mut raw = saved;
        make_raw(&mut raw);
        install_panic_hook();
        let id = NEXT_GUARD_ID.fetch_add(1, Ordering::Relaxed);
        // Registered before the switch, so no moment exists in which the
        // terminal is raw and nothing knows how to undo it.
        raw_terminals().push((id, fd.as_raw_fd(), saved));
        let guard = Self { fd, saved, id };
        set_attrs(guard.fd.as_raw_fd(), &raw)?;
        Ok(Some(guard))
    }

    /// The modes that will be restored.
    pub fn saved(&self) -> &libc::termios {
        &self.saved
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        // Unregister under the lock before the descriptor closes, so
        // restore_terminal never touches a closed or reused descriptor.
        let mut terminals = raw_terminals();
        terminals.retain(|entry| entry.0 != self.id);
        if let Err(e) = set_attrs(self.fd.as_raw_fd(), &self.saved) {
            tracing::warn!(target: "serial", "cannot restore the terminal: {e}");
        }
    }
}
