//! The control socket of a running VM: JSON lines over a unix stream
//! socket, modelled on QMP.
//!
//! Each request is one JSON object on one line, `{"cmd":"NAME", ...args}`;
//! each reply is one line, `{"ok":VALUE}` or
//! `{"error":{"class":"...","desc":"..."}}`, in request order. After
//! `subscribe` the connection also receives asynchronous events,
//! `{"event":"NAME","timestamp":{"seconds":S,"microseconds":U}}` (plus
//! `"data"` for some), interleaved between replies; a client tells them
//! apart by the top-level key.
//!
//! Whoever can connect can stop the VM, so the socket is created mode 0600
//! and everything a client sends is treated as hostile: lines are bounded
//! ([`MAX_LINE`]), parsing never panics, arguments are range-checked, and a
//! client that stops reading is dropped rather than stalling the VM.

use std::collections::{HashMap, VecDeque};
use std::fs;
use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

/// Longest request line accepted (without its newline).
pub const MAX_LINE: usize = 64 << 10;
/// Absolute pointer coordinates run 0..=POINTER_MAX on each axis (the
/// USB tablet convention QEMU's input layer uses).
pub const POINTER_MAX: u64 = 32767;
/// Most keys pressed together by one `send-keys`.
pub const MAX_KEYS: usize = 16;
/// Longest screenshot path.
pub const MAX_PATH: usize = 4096;
/// Clients served at once; more are told so and disconnected.
pub const MAX_CLIENTS: usize = 16;
/// How long a write to a client may block before the client is dropped.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// Key names for `send-keys`: QEMU's QKeyCode names, so scripts written for
/// QMP's `send-key` carry over.
const NAMED_KEYS: &[&str] = &[
    "shift",
    "shift_r",
    "alt",
    "alt_r",
    "ctrl",
    "ctrl_r",
    "meta_l",
    "meta_r",
    "menu",
    "esc",
    "minus",
    "equal",
    "backspace",
    "tab",
    "bracket_left",
    "bracket_right",
    "ret",
    "semicolon",
    "apostrophe",
    "grave_accent",
    "backslash",
    "comma",
    "dot",
    "slash",
    "asterisk",
    "spc",
    "caps_lock",
    "num_lock",
    "scroll_lock",
    "print",
    "sysrq",
    "home",
    "end",
    "pgup",
    "pgdn",
    "left",
    "up",
    "down",
    "right",
    "insert",
    "delete",
    "power",
    "sleep",
    "wake",
    "audiomute",
    "volumeup",
    "volumedown",
    "kp_divide",
    "kp_multiply",
    "kp_subtract",
    "kp_add",
    "kp_enter",
    "kp_decimal",
    "kp_equals",
];

/// Whether `name` is a key `send-keys` accepts: a letter `a`-`z`, a digit
/// `0`-`9`, `f1`-`f24`, `kp_0`-`kp_9` or one of the named keys.
pub fn is_key_name(name: &str) -> bool {
    let b = name.as_bytes();
    match b {
        [c] => c.is_ascii_lowercase() || c.is_ascii_digit(),
        _ => {
            if let Some(n) = name.strip_prefix('f') {
                if (1..=24).any(|i: u8| i.to_string() == n) {
                    return true;
                }
            }
            if let Some(d) = name.strip_prefix("kp_") {
                if d.len() == 1 && d.as_bytes()[0].is_ascii_digit() {
                    return true;
                }
            }
            NAMED_KEYS.contains(&name)
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Button {
    Left,
    Right,
    Middle,
}

impl Button {
    pub fn name(self) -> &'static str {
        match self {
            Button::Left => "left",
            Button::Right => "right",
            Button::Middle => "middle",
        }
    }

    fn from_name(s: &str) -> Option<Button> {
        match s {
            "left" => Some(Button::Left),
            "right" => Some(Button::Right),
            "middle" => Some(Button::Middle),
            _ => None,
        }
    }
}

/// One client request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Run state of the VM.
    Status,
    Pause,
    Resume,
    /// Press the power button (the guest shuts down cleanly).
    Powerdown,
    /// Stop the VM at once.
    Stop,
    /// Reset the machine.
    Reset,
    /// Press these keys together, then release them in reverse order.
    SendKeys {
        keys: Vec<String>,
    },
    /// Absolute pointer position and the buttons held.
    Pointer {
        x: u16,
        y: u16,
        buttons: Vec<Button>,
    },
    /// Save the display to `path` (absolute, on the VMM's host) as PNG.
    Screenshot {
        path: PathBuf,
    },
    /// Receive events on this connection from now on.
    Subscribe,
}

impl Request {
    pub fn name(&self) -> &'static str {
        match self {
            Request::Status => "status",
            Request::Pause => "pause",
            Request::Resume => "resume",
            Request::Powerdown => "powerdown",
            Request::Stop => "stop",
            Request::Reset => "reset",
            Request::SendKeys { .. } => "send-keys",
            Request::Pointer { .. } => "pointer",
            Request::Screenshot { .. } => "screenshot",
            Request::Subscribe => "subscribe",
        }
    }

    pub fn to_json(&self) -> Value {
        let mut v = json!({ "cmd": self.name() });
        let obj = v.as_object_mut().expect("json! object");
        match self {
            Request::SendKeys { keys } => {
                obj.insert("keys".into(), json!(keys));
            }
            Request::Pointer { x, y, buttons } => {
                obj.insert("x".into(), json!(x));
                obj.insert("y".into(), json!(y));
                let names: Vec<_> = buttons.iter().map(|b| b.name()).collect();
                obj.insert("buttons".into(), json!(names));
            }
            Request::Screenshot { path } => {
                obj.insert("path".into(), json!(path.to_string_lossy()));
            }
            _ => {}
        }
        v
    }

    /// The request as one line, newline included.
    pub fn to_line(&self) -> String {
        let mut s = self.to_json().to_string();
        s.push('\n');
        s
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("line of {len} bytes exceeds the {MAX_LINE}-byte limit")]
    LineTooLong { len: usize },
    #[error("not valid JSON: {0}")]
    BadJson(String),
    #[error("not a JSON object")]
    NotAnObject,
    #[error("no \"cmd\" in request")]
    MissingCmd,
    #[error("unknown command {0:?}")]
    UnknownCommand(String),
    #[error("{cmd}: unknown argument {arg:?}")]
    UnknownArgument { cmd: String, arg: String },
    #[error("{cmd}: missing argument {arg:?}")]
    MissingArgument { cmd: String, arg: String },
    #[error("{cmd}: {arg} must be {expected}")]
    WrongType {
        cmd: String,
        arg: String,
        expected: String,
    },
    #[error("{cmd}: {arg} = {value} is out of range ({range})")]
    OutOfRange {
        cmd: String,
        arg: String,
        value: String,
        range: String,
    },
    #[error("{cmd}: {arg}: {reason}")]
    InvalidValue {
        cmd: String,
        arg: String,
        reason: String,
    },
}

impl ProtocolError {
    pub fn class(&self) -> ErrorClass {
        match self {
            ProtocolError::LineTooLong { .. }
            | ProtocolError::BadJson(_)
            | ProtocolError::NotAnObject
            | ProtocolError::MissingCmd => ErrorClass::BadRequest,
            ProtocolError::UnknownCommand(_) => ErrorClass::UnknownCommand,
            _ => ErrorClass::InvalidArgument,
        }
    }
}

fn strip_newline(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

fn parse_object(line: &[u8]) -> Result<Map<String, Value>, ProtocolError> {
    if line.len() > MAX_LINE + 2 {
        return Err(ProtocolError::LineTooLong { len: line.len() });
    }
    let line = strip_newline(line);
    if line.len() > MAX_LINE {
        return Err(ProtocolError::LineTooLong { len: line.len() });
    }
    // serde_json bounds nesting depth (128), so deep junk is an error, not
    // a stack overflow.
    match serde_json::from_slice::<Value>(line) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ProtocolError::NotAnObject),
        Err(e) => Err(ProtocolError::BadJson(e.to_string())),
    }
}

/// Parses one request line (with or without its newline).
pub fn parse_request(line: &[u8]) -> Result<Request, ProtocolError> {
    let obj = parse_object(line)?;
    let cmd = match obj.get("cmd") {
        None => return Err(ProtocolError::MissingCmd),
        Some(Value::String(s)) => s.as_str(),
        Some(_) => {
            return Err(ProtocolError::WrongType {
                cmd: "request".into(),
                arg: "cmd".into(),
                expected: "a string".into(),
            })
        }
    };
    let allowed: &[&str] = match cmd {
        "status" | "pause" | "resume" | "powerdown" | "stop" | "reset" | "subscribe" => &[],
        "send-keys" => &["keys"],
        "pointer" => &["x", "y", "buttons"],
        "screenshot" => &["path"],
        _ => {
            // Bound what an error echoes back.
            let shown: String = cmd.chars().take(64).collect();
            return Err(ProtocolError::UnknownCommand(shown));
        }
    };
    if let Some(arg) = obj
        .keys()
        .find(|k| *k != "cmd" && !allowed.contains(&k.as_str()))
    {
        return Err(ProtocolError::UnknownArgument {
            cmd: cmd.into(),
            arg: arg.chars().take(64).collect(),
        });
    }
    let missing = |arg: &str| ProtocolError::MissingArgument {
        cmd: cmd.into(),
        arg: arg.into(),
    };
    let wrong = |arg: &str, expected: &str| ProtocolError::WrongType {
        cmd: cmd.into(),
        arg: arg.into(),
        expected: expected.into(),
    };
    let invalid = |arg: &str, reason: String| ProtocolError::InvalidValue {
        cmd: cmd.into(),
        arg: arg.into(),
        reason,
    };
    Ok(match cmd {
        "status" => Request::Status,
        "pause" => Request::Pause,
        "resume" => Request::Resume,
        "powerdown" => Request::Powerdown,
        "stop" => Request::Stop,
        "reset" => Request::Reset,
        "subscribe" => Request::Subscribe,
        "send-keys" => {
            let list = obj
                .get("keys")
                .ok_or_else(|| missing("keys"))?
                .as_array()
                .ok_or_else(|| wrong("keys", "an array of key names"))?;
            if list.is_empty() || list.len() > MAX_KEYS {
                return Err(invalid(
                    "keys",
                    format!("give 1 to {MAX_KEYS} keys, not {}", list.len()),
                ));
            }
            let mut keys = Vec::with_capacity(list.len());
            for k in list {
                let name = k
                    .as_str()
                    .ok_or_else(|| wrong("keys", "an array of key names"))?;
                if !is_key_name(name) {
                    let shown: String = name.chars().take(32).collect();
                    return Err(invalid("keys", format!("unknown key {shown:?}")));
                }
                if keys.iter().any(|have| have == name) {
                    return Err(invalid("keys", format!("key {name:?} given twice")));
                }
                keys.push(name.to_string());
            }
            Request::SendKeys { keys }
        }
        "pointer" => {
            let coord = |arg: &str| -> Result<u16, ProtocolError> {
                let v = obj.get(arg).ok_or_else(|| missing(arg))?;
                let out_of_range = || ProtocolError::OutOfRange {
                    cmd: cmd.into(),
                    arg: arg.into(),
                    value: v.to_string().chars().take(32).collect(),
                    range: format!("0 to {POINTER_MAX}"),
                };
                match v {
                    Value::Number(n) if n.is_u64() => {
                        let n = n.as_u64().unwrap_or(u64::MAX);
                        if n > POINTER_MAX {
                            Err(out_of_range())
                        } else {
                            u16::try_from(n).map_err(|_| out_of_range())
                        }
                    }
                    Value::Number(n) if n.is_i64() => Err(out_of_range()),
                    _ => Err(wrong(arg, "an integer")),
                }
            };
            let x = coord("x")?;
            let y = coord("y")?;
            let mut buttons = Vec::new();
            if let Some(v) = obj.get("buttons") {
                let list = v
                    .as_array()
                    .ok_or_else(|| wrong("buttons", "an array of button names"))?;
                for b in list {
                    let name = b
                        .as_str()
                        .ok_or_else(|| wrong("buttons", "an array of button names"))?;
                    let button = Button::from_name(name).ok_or_else(|| {
                        let shown: String = name.chars().take(32).collect();
                        invalid(
                            "buttons",
                            format!("unknown button {shown:?} (left, right, middle)"),
                        )
                    })?;
                    if buttons.contains(&button) {
                        return Err(invalid("buttons", format!("{name} given twice")));
                    }
                    buttons.push(button);
                }
            }
            Request::Pointer { x, y, buttons }
        }
        "screenshot" => {
            let path = obj
                .get("path")
                .ok_or_else(|| missing("path"))?
                .as_str()
                .ok_or_else(|| wrong("path", "a string"))?;
            if path.is_empty() || path.len() > MAX_PATH {
                return Err(invalid("path", format!("must be 1 to {MAX_PATH} bytes")));
            }
            if path.contains('\0') {
                return Err(invalid("path", "contains a NUL character".into()));
            }
            if !path.starts_with('/') {
                return Err(invalid(
                    "path",
                    "must be absolute (the VM's working directory is not yours)".into(),
                ));
            }
            Request::Screenshot { path: path.into() }
        }
        _ => unreachable!("command list checked above"),
    })
}

/// The class of an error reply, for programs to branch on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The line was not a request at all.
    BadRequest,
    UnknownCommand,
    InvalidArgument,
    /// Valid, but this VM cannot do it (e.g. screenshot without a display).
    Unsupported,
    /// Valid, but not now (e.g. resume while running).
    InvalidState,
    /// The VMM tried and failed.
    Failed,
    /// Too many clients.
    Busy,
}

impl ErrorClass {
    pub fn name(self) -> &'static str {
        match self {
            ErrorClass::BadRequest => "bad-request",
            ErrorClass::UnknownCommand => "unknown-command",
            ErrorClass::InvalidArgument => "invalid-argument",
            ErrorClass::Unsupported => "unsupported",
            ErrorClass::InvalidState => "invalid-state",
            ErrorClass::Failed => "failed",
            ErrorClass::Busy => "busy",
        }
    }

    pub fn from_name(s: &str) -> Option<ErrorClass> {
        [
            ErrorClass::BadRequest,
            ErrorClass::UnknownCommand,
            ErrorClass::InvalidArgument,
            ErrorClass::Unsupported,
            ErrorClass::InvalidState,
            ErrorClass::Failed,
            ErrorClass::Busy,
        ]
        .into_iter()
        .find(|c| c.name() == s)
    }
}

/// Run state reported by `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    Running,
    Paused,
    Panicked,
    PoweredOff,
}

impl RunState {
    pub fn name(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::Panicked => "panicked",
            RunState::PoweredOff => "powered-off",
        }
    }
}

/// A reply to one request.
#[derive(Debug, Clone, PartialEq)]
pub enum Response {
    Ok(Value),
    Error { class: ErrorClass, desc: String },
}

impl Response {
    /// `{"ok":{}}`.
    pub fn ok() -> Response {
        Response::Ok(json!({}))
    }

    /// `{"ok":{"state":"running"}}` and so on.
    pub fn status(state: RunState) -> Response {
        Response::Ok(json!({ "state": state.name() }))
    }

    pub fn error(class: ErrorClass, desc: impl Into<String>) -> Response {
        Response::Error {
            class,
            desc: desc.into(),
        }
    }

    pub fn is_ok(&self) -> bool {
        matches!(self, Response::Ok(_))
    }

    pub fn to_json(&self) -> Value {
        match self {
            Response::Ok(v) => json!({ "ok": v }),
            Response::Error { class, desc } => {
                json!({ "error": { "class": class.name(), "desc": desc } })
            }
        }
    }

    pub fn to_line(&self) -> String {
        let mut s = self.to_json().to_string();
        s.push('\n');
        s
    }
}

impl From<ProtocolError> for Response {
    fn from(e: ProtocolError) -> Response {
        Response::error(e.class(), e.to_string())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// The guest reported a panic (pvpanic "panicked").
    GuestPanicked,
    /// The guest loaded a crash kernel after a panic (pvpanic
    /// "crash-loaded").
    CrashLoaded,
    PoweredOff,
    Reset,
    Paused,
    Resumed,
}

impl EventKind {
    pub const ALL: [EventKind; 6] = [
        EventKind::GuestPanicked,
        EventKind::CrashLoaded,
        EventKind::PoweredOff,
        EventKind::Reset,
        EventKind::Paused,
        EventKind::Resumed,
    ];

    pub fn name(self) -> &'static str {
        match self {
            EventKind::GuestPanicked => "guest-panicked",
            EventKind::CrashLoaded => "crash-loaded",
            EventKind::PoweredOff => "powered-off",
            EventKind::Reset => "reset",
            EventKind::Paused => "paused",
            EventKind::Resumed => "resumed",
        }
    }

    pub fn from_name(s: &str) -> Option<EventKind> {
        Self::ALL.into_iter().find(|k| k.name() == s)
    }
}

/// Wall-clock time of an event, split like QMP's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timestamp {
    pub seconds: u64,
    pub microseconds: u32,
}

impl Timestamp {
    pub fn now() -> Timestamp {
        let d = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Timestamp {
            seconds: d.as_secs(),
            microseconds: d.subsec_micros(),
        }
    }
}

/// An asynchronous notification to subscribed clients.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub kind: EventKind,
    pub timestamp: Timestamp,
    pub data: Option<Value>,
}

impl Event {
    pub fn now(kind: EventKind) -> Event {
        Event {
            kind,
            timestamp: Timestamp::now(),
            data: None,
        }
    }

    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "event": self.kind.name(),
            "timestamp": {
                "seconds": self.timestamp.seconds,
                "microseconds": self.timestamp.microseconds,
            },
        });
        if let Some(d) = &self.data {
            v.as_object_mut()
                .expect("json! object")
                .insert("data".into(), d.clone());
        }
        v
    }

    pub fn to_line(&self) -> String {
        let mut s = self.to_json().to_string();
        s.push('\n');
        s
    }
}

/// One line from the server: a reply or an event.
#[derive(Debug, Clone, PartialEq)]
pub enum ServerMessage {
    Response(Response),
    Event(Event),
}

fn bad(what: &str) -> ProtocolError {
    ProtocolError::BadJson(format!("unexpected server message: {what}"))
}

/// Parses one line the server sent.
pub fn parse_server_line(line: &[u8]) -> Result<ServerMessage, ProtocolError> {
    let mut obj = parse_object(line)?;
    if let Some(v) = obj.remove("ok") {
        return Ok(ServerMessage::Response(Response::Ok(v)));
    }
    if let Some(e) = obj.get("error") {
        let class = e
            .get("class")
            .and_then(Value::as_str)
            .and_then(ErrorClass::from_name)
            .ok_or_else(|| bad("error without a known class"))?;
        let desc = e
            .get("desc")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        return Ok(ServerMessage::Response(Response::Error { class, desc }));
    }
    if let Some(name) = obj.get("event").and_then(Value::as_str) {
        let kind = EventKind::from_name(name).ok_or_else(|| bad("unknown event"))?;
        let ts = obj.get("timestamp");
        let field = |k: &str| ts.and_then(|t| t.get(k)).and_then(Value::as_u64);
        let timestamp = Timestamp {
            seconds: field("seconds").ok_or_else(|| bad("event without timestamp"))?,
            microseconds: field("microseconds")
                .and_then(|u| u32::try_from(u).ok())
                .ok_or_else(|| bad("event without timestamp"))?,
        };
        return Ok(ServerMessage::Event(Event {
            kind,
            timestamp,
            data: obj.remove("data"),
        }));
    }
    Err(bad("neither ok, error nor event"))
}

/// What the VMM does with requests. Called on the socket's client
/// threads, possibly several at once. `subscribe` is handled by the server
/// and never reaches the handler.
pub trait ControlHandler: Send + Sync {
    fn handle(&self, req: Request) -> Response;
}

enum LineRead {
    Line(Vec<u8>),
    TooLong(usize),
    Eof,
}

/// Reads one line without ever buffering more than `max` bytes of it; an
/// over-long line is consumed up to its newline and reported.
fn read_line_bounded<R: BufRead>(r: &mut R, max: usize) -> io::Result<LineRead> {
    let mut line = Vec::new();
    let mut total: usize = 0;
    loop {
        let avail = match r.fill_buf() {
            Ok(a) => a,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if avail.is_empty() {
            // EOF: a final unterminated line still counts.
            return Ok(if total == 0 {
                LineRead::Eof
            } else if total > max {
                LineRead::TooLong(total)
            } else {
                LineRead::Line(line)
            });
        }
        let (chunk, done) = match avail.iter().position(|&b| b == b'\n') {
            Some(i) => (&avail[..i], true),
            None => (avail, false),
        };
        total = total.saturating_add(chunk.len());
        if total <= max {
            line.extend_from_slice(chunk);
        } else {
            line = Vec::new();
        }
        let used = chunk.len() + usize::from(done);
        r.consume(used);
        if done {
            return Ok(if total > max {
                LineRead::TooLong(total)
            } else {
                LineRead::Line(line)
            });
        }
    }
}

struct Conn {
    writer: Mutex<UnixStream>,
    subscribed: AtomicBool,
}

impl Conn {
    fn send(&self, line: &str) -> io::Result<()> {
        let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let r = w.write_all(line.as_bytes());
        if r.is_err() {
            // A client that cannot take a line is gone or stuck: cut it off
            // so its reader thread ends too.
            let _ = w.shutdown(std::net::Shutdown::Both);
        }
        r
    }
}

struct Shared {
    handler: Arc<dyn ControlHandler>,
    clients: Mutex<HashMap<u64, Arc<Conn>>>,
    next_id: AtomicU64,
    shutdown: AtomicBool,
}

/// A listening control socket.
pub struct ControlServer {
    path: PathBuf,
    inode: (u64, u64),
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

fn refuse(path: &Path, kind: io::ErrorKind, what: &str) -> io::Error {
    io::Error::new(kind, format!("{}: {what}", path.display()))
}

/// Makes `path` free for a new socket: absent, or a stale socket nobody
/// listens on (removed). Anything else is refused.
fn clear_socket_path(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
        Ok(m) if m.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(refuse(
                    path,
                    io::ErrorKind::AddrInUse,
                    "another process is serving this control socket",
                ));
            }
            fs::remove_file(path)
        }
        Ok(_) => Err(refuse(
            path,
            io::ErrorKind::AlreadyExists,
            "exists and is not a socket; refusing to replace it",
        )),
    }
}

impl ControlServer {
    /// Listens on `path` (mode 0600) and serves clients on background
    /// threads until dropped.
    pub fn bind(path: &Path, handler: Arc<dyn ControlHandler>) -> io::Result<ControlServer> {
        clear_socket_path(path)?;
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        // Bind inside a private directory, tighten the mode, then link the
        // socket into place: it is never reachable with looser permissions,
        // and link(2) fails rather than replace whatever may have appeared
        // at `path` meanwhile.
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let tmp = parent.join(format!(
            ".ctl{}.{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        fs::DirBuilder::new().mode(0o700).create(&tmp)?;
        let tmp_sock = tmp.join("s");
        let bound = (|| {
            let listener = UnixListener::bind(&tmp_sock)?;
            fs::set_permissions(&tmp_sock, fs::Permissions::from_mode(0o600))?;
            fs::hard_link(&tmp_sock, path)?;
            Ok::<_, io::Error>(listener)
        })();
        let _ = fs::remove_file(&tmp_sock);
        let _ = fs::remove_dir(&tmp);
        let listener = bound?;
        let meta = fs::symlink_metadata(path)?;
        let inode = (meta.dev(), meta.ino());

        let shared = Arc::new(Shared {
            handler,
            clients: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            shutdown: AtomicBool::new(false),
        });
        let s = shared.clone();
        let accept = std::thread::Builder::new()
            .name("control-accept".into())
            .spawn(move || accept_loop(listener, s))?;
        Ok(ControlServer {
            path: path.to_path_buf(),
            inode,
            shared,
            accept: Some(accept),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sends `event` to every subscribed client. Clients that cannot take
    /// it within [`WRITE_TIMEOUT`] are disconnected.
    pub fn broadcast(&self, event: &Event) {
        let line = event.to_line();
        let subscribers: Vec<Arc<Conn>> = self
            .shared
            .clients
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|c| c.subscribed.load(Ordering::Acquire))
            .cloned()
            .collect();
        for c in subscribers {
            let _ = c.send(&line);
        }
    }

    /// Number of connected clients.
    pub fn client_count(&self) -> usize {
        self.shared
            .clients
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::Release);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        for c in self
            .shared
            .clients
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            let w = c.writer.lock().unwrap_or_else(|e| e.into_inner());
            let _ = w.shutdown(std::net::Shutdown::Both);
        }
        // Only remove the socket if it is still ours, not a successor's.
        if let Ok(m) = fs::symlink_metadata(&self.path) {
            if (m.dev(), m.ino()) == self.inode {
                let _ = fs::remove_file(&self.path);
            }
        }
    }
}

fn accept_loop(listener: UnixListener, shared: Arc<Shared>) {
    if listener.set_nonblocking(true).is_err() {
        return;
    }
    while !shared.shutdown.load(Ordering::Acquire) {
        let mut pfd = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call. The
        // timeout bounds how long a drop waits for this thread.
        unsafe { libc::poll(&mut pfd, 1, 100) };
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(_) => {
                // E.g. out of descriptors: poll would report the pending
                // connection again at once, so back off instead of spinning.
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
        let Ok(writer) = stream.try_clone() else {
            continue;
        };
        let conn = Arc::new(Conn {
            writer: Mutex::new(writer),
            subscribed: AtomicBool::new(false),
        });
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut clients = shared.clients.lock().unwrap_or_else(|e| e.into_inner());
            if clients.len() >= MAX_CLIENTS {
                drop(clients);
                let _ = conn.send(
                    &Response::error(
                        ErrorClass::Busy,
                        format!("too many clients (at most {MAX_CLIENTS})"),
                    )
                    .to_line(),
                );
                continue;
            }
            clients.insert(id, conn.clone());
        }
        let s = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("control-client".into())
            .spawn(move || {
                serve_client(stream, &conn, &s);
                s.clients
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
            });
        if spawned.is_err() {
            shared
                .clients
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
        }
    }
}

fn serve_client(stream: UnixStream, conn: &Conn, shared: &Shared) {
    let mut reader = BufReader::new(stream);
    loop {
        if shared.shutdown.load(Ordering::Acquire) {
            return;
        }
        let reply = match read_line_bounded(&mut reader, MAX_LINE) {
            Err(_) | Ok(LineRead::Eof) => return,
            Ok(LineRead::TooLong(len)) => Response::from(ProtocolError::LineTooLong { len }),
            Ok(LineRead::Line(line)) => {
                if line.iter().all(|b| b.is_ascii_whitespace()) {
                    continue;
                }
                match parse_request(&line) {
                    Ok(Request::Subscribe) => {
                        conn.subscribed.store(true, Ordering::Release);
                        Response::ok()
                    }
                    Ok(req) => shared.handler.handle(req),
                    Err(e) => Response::from(e),
                }
            }
        };
        if conn.send(&reply.to_line()).is_err() {
            return;
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: the VM closed the control connection", path.display())]
    Closed { path: PathBuf },
    #[error("{}: {source}", path.display())]
    Protocol {
        path: PathBuf,
        #[source]
        source: ProtocolError,
    },
}

/// A blocking control-socket client (`vmapple ctl`).
pub struct Client {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    events: VecDeque<Event>,
}

impl Client {
    pub fn connect(path: &Path) -> Result<Client, ClientError> {
        let io = |source| ClientError::Io {
            path: path.to_path_buf(),
            source,
        };
        let stream = UnixStream::connect(path).map_err(io)?;
        let writer = stream.try_clone().map_err(io)?;
        Ok(Client {
            path: path.to_path_buf(),
            reader: BufReader::new(stream),
            writer,
            events: VecDeque::new(),
        })
    }

    /// Bounds how long `call` and `next_event` wait (`None`: forever).
    pub fn set_timeout(&self, t: Option<Duration>) -> Result<(), ClientError> {
        self.reader
            .get_ref()
            .set_read_timeout(t)
            .map_err(|source| ClientError::Io {
                path: self.path.clone(),
                source,
            })
    }

    fn read_message(&mut self) -> Result<ServerMessage, ClientError> {
        let path = self.path.clone();
        match read_line_bounded(&mut self.reader, MAX_LINE) {
            Err(source) => Err(ClientError::Io { path, source }),
            Ok(LineRead::Eof) => Err(ClientError::Closed { path }),
            Ok(LineRead::TooLong(len)) => Err(ClientError::Protocol {
                path,
                source: ProtocolError::LineTooLong { len },
            }),
            Ok(LineRead::Line(line)) => {
                parse_server_line(&line).map_err(|source| ClientError::Protocol { path, source })
            }
        }
    }

    /// Sends `req` and waits for its reply; events arriving meanwhile are
    /// kept for [`Client::next_event`].
    pub fn call(&mut self, req: &Request) -> Result<Response, ClientError> {
        self.writer
            .write_all(req.to_line().as_bytes())
            .map_err(|source| ClientError::Io {
                path: self.path.clone(),
                source,
            })?;
        loop {
            match self.read_message()? {
                ServerMessage::Response(r) => return Ok(r),
                ServerMessage::Event(e) => self.events.push_back(e),
            }
        }
    }

    /// The next event (after a successful `subscribe`).
    pub fn next_event(&mut self) -> Result<Event, ClientError> {
        if let Some(e) = self.events.pop_front() {
            return Ok(e);
        }
        loop {
            match self.read_message()? {
                ServerMessage::Event(e) => return Ok(e),
                ServerMessage::Response(_) => continue,
            }
        }
    }
}

/// Connects, sends one request, returns its reply.
pub fn call(socket: &Path, req: &Request) -> Result<Response, ClientError> {
    let mut c = Client::connect(socket)?;
    c.set_timeout(Some(Duration::from_secs(30)))?;
    c.call(req)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::Read;

    fn parse(s: &str) -> Result<Request, ProtocolError> {
        parse_request(s.as_bytes())
    }

    #[test]
    fn simple_commands() {
        for (name, req) in [
            ("status", Request::Status),
            ("pause", Request::Pause),
            ("resume", Request::Resume),
            ("powerdown", Request::Powerdown),
            ("stop", Request::Stop),
            ("reset", Request::Reset),
            ("subscribe", Request::Subscribe),
        ] {
            assert_eq!(parse(&format!("{{\"cmd\":\"{name}\"}}\n")), Ok(req.clone()));
            assert_eq!(parse(&format!(" {{ \"cmd\" : \"{name}\" }}\r\n")), Ok(req));
        }
    }

    #[test]
    fn commands_with_arguments() {
        assert_eq!(
            parse(r#"{"cmd":"send-keys","keys":["ctrl","alt","delete"]}"#),
            Ok(Request::SendKeys {
                keys: vec!["ctrl".into(), "alt".into(), "delete".into()]
            })
        );
        assert_eq!(
            parse(r#"{"cmd":"pointer","x":0,"y":32767,"buttons":["left","middle"]}"#),
            Ok(Request::Pointer {
                x: 0,
                y: 32767,
                buttons: vec![Button::Left, Button::Middle]
            })
        );
        assert_eq!(
            parse(r#"{"cmd":"pointer","x":10,"y":20}"#),
            Ok(Request::Pointer {
                x: 10,
                y: 20,
                buttons: vec![]
            })
        );
        assert_eq!(
            parse(r#"{"cmd":"screenshot","path":"/tmp/s.png"}"#),
            Ok(Request::Screenshot {
                path: "/tmp/s.png".into()
            })
        );
    }

    #[test]
    fn key_names() {
        for k in [
            "a", "z", "0", "9", "f1", "f12", "f24", "kp_5", "ret", "meta_l", "spc",
        ] {
            assert!(is_key_name(k), "{k}");
        }
        for k in [
            "", "A", "f0", "f25", "f01", "kp_", "kp_10", "control", "ctrl ", "ä",
        ] {
            assert!(!is_key_name(k), "{k}");
        }
    }

    #[test]
    fn hostile_requests_are_refused_with_the_reason() {
        let cases: &[(&str, &str)] = &[
            ("", "not valid JSON"),
            ("{", "not valid JSON"),
            ("null", "not a JSON object"),
            ("[1,2]", "not a JSON object"),
            ("\"status\"", "not a JSON object"),
            ("{}", "no \"cmd\""),
            (r#"{"cmd":5}"#, "cmd must be a string"),
            (
                r#"{"cmd":"launch-missiles"}"#,
                "unknown command \"launch-missiles\"",
            ),
            (
                r#"{"cmd":"status","force":true}"#,
                "unknown argument \"force\"",
            ),
            (r#"{"cmd":"send-keys"}"#, "missing argument \"keys\""),
            (
                r#"{"cmd":"send-keys","keys":"ctrl"}"#,
                "keys must be an array",
            ),
            (r#"{"cmd":"send-keys","keys":[]}"#, "give 1 to 16 keys"),
            (r#"{"cmd":"send-keys","keys":[1]}"#, "keys must be an array"),
            (
                r#"{"cmd":"send-keys","keys":["ctrl","ctrl"]}"#,
                "given twice",
            ),
            (
                r#"{"cmd":"send-keys","keys":["nope"]}"#,
                "unknown key \"nope\"",
            ),
            (
                r#"{"cmd":"pointer","x":32768,"y":0}"#,
                "x = 32768 is out of range",
            ),
            (
                r#"{"cmd":"pointer","x":0,"y":-1}"#,
                "y = -1 is out of range",
            ),
            (r#"{"cmd":"pointer","x":1.5,"y":0}"#, "x must be an integer"),
            (r#"{"cmd":"pointer","x":"1","y":0}"#, "x must be an integer"),
            (
                r#"{"cmd":"pointer","x":1e30,"y":0}"#,
                "x must be an integer",
            ),
            (
                r#"{"cmd":"pointer","x":18446744073709551616,"y":0}"#,
                "x must be an integer",
            ),
            (r#"{"cmd":"pointer","y":0}"#, "missing argument \"x\""),
            (
                r#"{"cmd":"pointer","x":0,"y":0,"buttons":["left","left"]}"#,
                "given twice",
            ),
            (
                r#"{"cmd":"pointer","x":0,"y":0,"buttons":["thumb"]}"#,
                "unknown button",
            ),
            (
                r#"{"cmd":"pointer","x":0,"y":0,"buttons":{"left":1}}"#,
                "buttons must be",
            ),
            (
                r#"{"cmd":"screenshot","path":"rel.png"}"#,
                "must be absolute",
            ),
            (r#"{"cmd":"screenshot","path":""}"#, "must be 1 to"),
            (r#"{"cmd":"screenshot","path":"/a\u0000b"}"#, "NUL"),
            (
                r#"{"cmd":"screenshot","path":["/x"]}"#,
                "path must be a string",
            ),
            ("{\"cmd\":\"status\"}\0", "not valid JSON"),
            ("{\"cmd\":\"sta\0tus\"}", "not valid JSON"),
            (r#"{"cmd":"status"} {"cmd":"stop"}"#, "not valid JSON"),
        ];
        for (line, want) in cases {
            let e = parse(line).expect_err(line).to_string();
            assert!(e.contains(want), "{line:?}: {e}");
        }
    }

    #[test]
    fn nesting_and_size_limits() {
        let deep = format!(
            "{{\"cmd\":\"status\",\"x\":{}{}}}",
            "[".repeat(10_000),
            "]".repeat(10_000)
        );
        assert!(matches!(parse(&deep), Err(ProtocolError::BadJson(_))));

        let pad = " ".repeat(MAX_LINE);
        let long = format!("{{\"cmd\":\"status\"}}{pad}");
        assert!(matches!(
            parse(&long),
            Err(ProtocolError::LineTooLong { .. })
        ));
        // Exactly at the limit is fine.
        let fits = format!("{{\"cmd\":\"status\"}}{}", &pad[..MAX_LINE - 16]);
        assert_eq!(fits.len(), MAX_LINE);
        assert_eq!(parse(&fits), Ok(Request::Status));

        // Unknown-command errors do not echo an attacker's megabytes.
        let e = parse(&format!("{{\"cmd\":\"{}\"}}", "x".repeat(10_000))).unwrap_err();
        assert!(e.to_string().len() < 200);
    }

    #[test]
    fn replies_and_events_serialise_as_one_line() {
        assert_eq!(Response::ok().to_line(), "{\"ok\":{}}\n");
        assert_eq!(
            Response::status(RunState::Paused).to_line(),
            "{\"ok\":{\"state\":\"paused\"}}\n"
        );
        let e = Response::from(parse("{\"cmd\":\"x\\ny\"}").unwrap_err()).to_line();
        assert_eq!(e.matches('\n').count(), 1, "{e}");
        let v: Value = serde_json::from_str(&e).unwrap();
        assert_eq!(v["error"]["class"], "unknown-command");

        let ev = Event {
            kind: EventKind::GuestPanicked,
            timestamp: Timestamp {
                seconds: 1700000000,
                microseconds: 5,
            },
            data: None,
        };
        let line = ev.to_line();
        assert!(line.ends_with('\n') && line.matches('\n').count() == 1);
        assert_eq!(
            serde_json::from_str::<Value>(&line).unwrap(),
            json!({"event": "guest-panicked", "timestamp": {"seconds": 1700000000u64, "microseconds": 5}})
        );
        for kind in EventKind::ALL {
            let mut ev = Event::now(kind);
            ev.data = Some(json!({"why": "test"}));
            assert_eq!(
                parse_server_line(ev.to_line().as_bytes()),
                Ok(ServerMessage::Event(ev))
            );
        }
        for r in [
            Response::ok(),
            Response::status(RunState::Running),
            Response::error(ErrorClass::InvalidState, "already running"),
        ] {
            assert_eq!(
                parse_server_line(r.to_line().as_bytes()),
                Ok(ServerMessage::Response(r))
            );
        }
    }

    fn key_strategy() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z0-9]".prop_map(String::from),
            (1u8..=24).prop_map(|n| format!("f{n}")),
            proptest::sample::select(NAMED_KEYS).prop_map(String::from),
        ]
    }

    fn request_strategy() -> impl Strategy<Value = Request> {
        prop_oneof![
            Just(Request::Status),
            Just(Request::Pause),
            Just(Request::Resume),
            Just(Request::Powerdown),
            Just(Request::Stop),
            Just(Request::Reset),
            Just(Request::Subscribe),
            proptest::collection::hash_set(key_strategy(), 1..=MAX_KEYS).prop_map(|k| {
                Request::SendKeys {
                    keys: k.into_iter().collect(),
                }
            }),
            (
                0..=POINTER_MAX as u16,
                0..=POINTER_MAX as u16,
                proptest::sample::subsequence(
                    vec![Button::Left, Button::Right, Button::Middle],
                    0..=3
                )
            )
                .prop_map(|(x, y, buttons)| Request::Pointer { x, y, buttons }),
            "/[a-zA-Z0-9 ._/-]{0,100}".prop_map(|p| Request::Screenshot { path: p.into() }),
        ]
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_request(&bytes);
            let _ = parse_server_line(&bytes);
        }

        #[test]
        fn json_shaped_junk_never_panics(
            cmd in "(status|pointer|send-keys|screenshot|[a-z-]{0,12})",
            key in "(x|y|keys|buttons|path|[a-z]{1,6})",
            val in prop_oneof![
                any::<i64>().prop_map(|v| v.to_string()),
                any::<f64>().prop_map(|v| format!("{v:?}")),
                "\"[^\"\\\\]{0,20}\"",
                Just("null".to_string()),
                Just("[[[]]]".to_string()),
                Just("{\"a\":{}}".to_string()),
            ],
        ) {
            let line = format!("{{\"cmd\":\"{cmd}\",\"{key}\":{val}}}");
            let _ = parse_request(line.as_bytes());
        }

        #[test]
        fn valid_requests_round_trip(req in request_strategy()) {
            let line = req.to_line();
            prop_assert_eq!(line.matches('\n').count(), 1);
            prop_assert_eq!(parse_request(line.as_bytes()), Ok(req));
        }
    }

    #[test]
    fn bounded_line_reader() {
        let data = b"short\nxxxxxxxxxxxxxxxxxxxx\nlast";
        let mut r = io::BufReader::with_capacity(4, &data[..]);
        assert!(
            matches!(read_line_bounded(&mut r, 10).unwrap(), LineRead::Line(l) if l == b"short")
        );
        assert!(matches!(
            read_line_bounded(&mut r, 10).unwrap(),
            LineRead::TooLong(20)
        ));
        assert!(
            matches!(read_line_bounded(&mut r, 10).unwrap(), LineRead::Line(l) if l == b"last")
        );
        assert!(matches!(
            read_line_bounded(&mut r, 10).unwrap(),
            LineRead::Eof
        ));
    }

    /// Records requests; answers status with a state it can be told.
    struct Fake {
        seen: Mutex<Vec<Request>>,
    }

    impl ControlHandler for Fake {
        fn handle(&self, req: Request) -> Response {
            self.seen.lock().unwrap().push(req.clone());
            match req {
                Request::Status => Response::status(RunState::Running),
                Request::Resume => Response::error(ErrorClass::InvalidState, "not paused"),
                _ => Response::ok(),
            }
        }
    }

    fn server() -> (tempfile::TempDir, Arc<Fake>, ControlServer) {
        let dir = tempfile::tempdir().unwrap();
        let fake = Arc::new(Fake {
            seen: Mutex::new(Vec::new()),
        });
        let s = ControlServer::bind(&dir.path().join("control.sock"), fake.clone()).unwrap();
        (dir, fake, s)
    }

    fn wait_for(mut cond: impl FnMut() -> bool) {
        for _ in 0..500 {
            if cond() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("condition not reached");
    }

    #[test]
    fn socket_server_and_client() {
        let (dir, fake, server) = server();
        let sock = dir.path().join("control.sock");
        let meta = fs::symlink_metadata(&sock).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        // No temporary directory is left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);

        assert_eq!(
            call(&sock, &Request::Status).unwrap(),
            Response::status(RunState::Running)
        );
        let r = call(&sock, &Request::Resume).unwrap();
        assert_eq!(r, Response::error(ErrorClass::InvalidState, "not paused"));
        let keys = Request::SendKeys {
            keys: vec!["ctrl".into(), "a".into()],
        };
        assert!(call(&sock, &keys).unwrap().is_ok());
        assert_eq!(
            *fake.seen.lock().unwrap(),
            vec![Request::Status, Request::Resume, keys]
        );

        // Events go to subscribers only, interleaved with replies.
        let mut sub = Client::connect(&sock).unwrap();
        sub.set_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut other = Client::connect(&sock).unwrap();
        other.set_timeout(Some(Duration::from_millis(300))).unwrap();
        assert!(sub.call(&Request::Subscribe).unwrap().is_ok());
        assert!(other.call(&Request::Status).unwrap().is_ok());
        wait_for(|| server.client_count() == 2);
        server.broadcast(&Event::now(EventKind::GuestPanicked));
        server.broadcast(&Event::now(EventKind::PoweredOff));
        assert_eq!(
            sub.call(&Request::Status).unwrap(),
            Response::status(RunState::Running)
        );
        assert_eq!(sub.next_event().unwrap().kind, EventKind::GuestPanicked);
        assert_eq!(sub.next_event().unwrap().kind, EventKind::PoweredOff);
        assert!(matches!(other.next_event(), Err(ClientError::Io { .. })));
        // Subscribe never reaches the handler.
        assert!(!fake.seen.lock().unwrap().contains(&Request::Subscribe));

        drop(sub);
        drop(other);
        wait_for(|| server.client_count() == 0);
        drop(server);
        assert!(!sock.exists());
    }

    #[test]
    fn hostile_client_gets_errors_and_the_connection_survives() {
        let (dir, fake, _server) = server();
        let sock = dir.path().join("control.sock");
        let mut s = UnixStream::connect(&sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut huge = vec![b'a'; MAX_LINE * 3];
        huge.push(b'\n');
        s.write_all(&huge).unwrap();
        s.write_all(b"\0\0\0\n{\"cmd\":\"nope\"}\n\n{\"cmd\":\"status\"}\n")
            .unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut lines = Vec::new();
        for _ in 0..4 {
            let mut l = String::new();
            r.read_line(&mut l).unwrap();
            lines.push(serde_json::from_str::<Value>(&l).unwrap());
        }
        assert_eq!(lines[0]["error"]["class"], "bad-request");
        assert!(lines[0]["error"]["desc"]
            .as_str()
            .unwrap()
            .contains("exceeds"));
        assert_eq!(lines[1]["error"]["class"], "bad-request");
        assert_eq!(lines[2]["error"]["class"], "unknown-command");
        assert_eq!(lines[3]["ok"]["state"], "running");
        assert_eq!(*fake.seen.lock().unwrap(), vec![Request::Status]);
        // Half-close: the server answers the unterminated last line, then
        // closes.
        s.write_all(b"{\"cmd\":\"stop\"}").unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut rest = String::new();
        r.read_to_string(&mut rest).unwrap();
        assert_eq!(rest, "{\"ok\":{}}\n");
    }

    #[test]
    fn too_many_clients_are_turned_away() {
        let (dir, _fake, server) = server();
        let sock = dir.path().join("control.sock");
        let held: Vec<_> = (0..MAX_CLIENTS)
            .map(|_| UnixStream::connect(&sock).unwrap())
            .collect();
        wait_for(|| server.client_count() == MAX_CLIENTS);
        let mut c = Client::connect(&sock).unwrap();
        c.set_timeout(Some(Duration::from_secs(5))).unwrap();
        match c.call(&Request::Status) {
            Ok(Response::Error { class, .. }) => assert_eq!(class, ErrorClass::Busy),
            // The server may close before our request is even written.
            Err(ClientError::Io { .. }) | Err(ClientError::Closed { .. }) => {}
            other => panic!("{other:?}"),
        }
        drop(held);
    }

    #[test]
    fn bind_refuses_non_sockets_and_live_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let fake = Arc::new(Fake {
            seen: Mutex::new(Vec::new()),
        });
        let file = dir.path().join("file.sock");
        fs::write(&file, "keep me").unwrap();
        let e = ControlServer::bind(&file, fake.clone()).err().unwrap();
        assert!(e.to_string().contains("not a socket"), "{e}");
        assert_eq!(fs::read_to_string(&file).unwrap(), "keep me");

        let target = dir.path().join("target");
        fs::write(&target, "t").unwrap();
        let link = dir.path().join("link.sock");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(ControlServer::bind(&link, fake.clone()).is_err());
        assert_eq!(fs::read_to_string(&target).unwrap(), "t");

        let sock = dir.path().join("c.sock");
        let first = ControlServer::bind(&sock, fake.clone()).unwrap();
        let e = ControlServer::bind(&sock, fake.clone()).err().unwrap();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
        drop(first);

        // A stale socket (its server gone without cleaning up) is replaced.
        let stale = UnixListener::bind(&sock).unwrap();
        drop(stale);
        let again = ControlServer::bind(&sock, fake).unwrap();
        assert_eq!(
            call(&sock, &Request::Status).unwrap(),
            Response::status(RunState::Running)
        );
        drop(again);
    }
}
