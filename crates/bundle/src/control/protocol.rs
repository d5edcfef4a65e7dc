//! The control protocol's messages and their wire form: one JSON object
//! per line.

use std::io::{self, BufRead};
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
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

/// Heads a display can have (virtio-gpu's scanouts here).
pub const MAX_HEADS: u8 = 4;

fn is_zero(v: &u8) -> bool {
    *v == 0
}

/// One client request; on the wire `{"cmd":"NAME", ...args}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
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
    /// Save head `head` of the display (0 unless given) to `path`
    /// (absolute, on the VMM's host) as PNG.
    Screenshot {
        path: PathBuf,
        #[serde(skip_serializing_if = "is_zero")]
        head: u8,
    },
    /// Receive events on this connection from now on.
    Subscribe,
    /// Save a snapshot to `path` (absolute, on the VMM's host); stop the
    /// VM afterwards if `stop`; copy the disks beside it if `with_disks`.
    Save {
        path: PathBuf,
        stop: bool,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        with_disks: bool,
    },
}

/// A request as serde reads it: every command a struct variant, so an
/// argument a command does not take is refused for argumentless commands
/// too. Each argument is checked by its own function, whose error names
/// it.
#[derive(Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
enum WireRequest {
    Status {},
    Pause {},
    Resume {},
    Powerdown {},
    Stop {},
    Reset {},
    SendKeys {
        #[serde(deserialize_with = "args::keys")]
        keys: Vec<String>,
    },
    Pointer {
        #[serde(deserialize_with = "args::x")]
        x: u16,
        #[serde(deserialize_with = "args::y")]
        y: u16,
        #[serde(default, deserialize_with = "args::buttons")]
        buttons: Vec<Button>,
    },
    Screenshot {
        #[serde(deserialize_with = "args::path")]
        path: PathBuf,
        #[serde(default, deserialize_with = "args::head")]
        head: u8,
    },
    Subscribe {},
    Save {
        #[serde(deserialize_with = "args::path")]
        path: PathBuf,
        #[serde(default)]
        stop: bool,
        #[serde(default)]
        with_disks: bool,
    },
}

impl From<WireRequest> for Request {
    fn from(w: WireRequest) -> Request {
        match w {
            WireRequest::Status {} => Request::Status,
            WireRequest::Pause {} => Request::Pause,
            WireRequest::Resume {} => Request::Resume,
            WireRequest::Powerdown {} => Request::Powerdown,
            WireRequest::Stop {} => Request::Stop,
            WireRequest::Reset {} => Request::Reset,
            WireRequest::SendKeys { keys } => Request::SendKeys { keys },
            WireRequest::Pointer { x, y, buttons } => Request::Pointer { x, y, buttons },
            WireRequest::Screenshot { path, head } => Request::Screenshot { path, head },
            WireRequest::Subscribe {} => Request::Subscribe,
            WireRequest::Save {
                path,
                stop,
                with_disks,
            } => Request::Save {
                path,
                stop,
                with_disks,
            },
        }
    }
}

impl<'de> Deserialize<'de> for Request {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        WireRequest::deserialize(d).map(Request::from)
    }
}

/// The argument checks: each takes the argument as JSON and says what is
/// wrong with it in words that name it.
mod args {
    use std::path::PathBuf;

    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer};
    use serde_json::Value;

    use super::{is_key_name, Button, MAX_KEYS, MAX_PATH, POINTER_MAX};

    fn check<'de, D: Deserializer<'de>, T>(
        d: D,
        f: impl FnOnce(Value) -> Result<T, String>,
    ) -> Result<T, D::Error> {
        f(Value::deserialize(d)?).map_err(D::Error::custom)
    }

    /// Quotes at most `max` characters of what the client sent.
    fn shown(text: &str, max: usize) -> String {
        text.chars().take(max).collect()
    }

    pub fn keys<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
        check(d, |v| {
            let wrong = || "keys must be an array of key names".to_string();
            let list = v.as_array().ok_or_else(wrong)?;
            if list.is_empty() || list.len() > MAX_KEYS {
                return Err(format!(
                    "keys: give 1 to {MAX_KEYS} keys, not {}",
                    list.len()
                ));
            }
            let mut keys = Vec::with_capacity(list.len());
            for k in list {
                let name = k.as_str().ok_or_else(wrong)?;
                if !is_key_name(name) {
                    return Err(format!("keys: unknown key {:?}", shown(name, 32)));
                }
                if keys.iter().any(|have| have == name) {
                    return Err(format!("keys: key {name:?} given twice"));
                }
                keys.push(name.to_string());
            }
            Ok(keys)
        })
    }

    fn coordinate(arg: &str, v: Value) -> Result<u16, String> {
        let out_of_range = || {
            format!(
                "{arg} = {} is out of range (0 to {POINTER_MAX})",
                shown(&v.to_string(), 32)
            )
        };
        match &v {
            Value::Number(n) if n.is_u64() => n
                .as_u64()
                .filter(|&n| n <= POINTER_MAX)
                .and_then(|n| u16::try_from(n).ok())
                .ok_or_else(out_of_range),
            Value::Number(n) if n.is_i64() => Err(out_of_range()),
            _ => Err(format!("{arg} must be an integer")),
        }
    }

    pub fn x<'de, D: Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
        check(d, |v| coordinate("x", v))
    }

    pub fn y<'de, D: Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
        check(d, |v| coordinate("y", v))
    }

    pub fn buttons<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Button>, D::Error> {
        check(d, |v| {
            let wrong = || "buttons must be an array of button names".to_string();
            let mut buttons = Vec::new();
            for b in v.as_array().ok_or_else(wrong)? {
                let name = b.as_str().ok_or_else(wrong)?;
                let button = Button::from_name(name).ok_or_else(|| {
                    format!(
                        "buttons: unknown button {:?} (left, right, middle)",
                        shown(name, 32)
                    )
                })?;
                if buttons.contains(&button) {
                    return Err(format!("buttons: {name} given twice"));
                }
                buttons.push(button);
            }
            Ok(buttons)
        })
    }

    pub fn head<'de, D: Deserializer<'de>>(d: D) -> Result<u8, D::Error> {
        check(d, |v| {
            v.as_u64()
                .filter(|&n| n < u64::from(super::MAX_HEADS))
                .map(|n| n as u8)
                .ok_or_else(|| {
                    format!(
                        "head = {} is not a head number (0 to {})",
                        shown(&v.to_string(), 32),
                        super::MAX_HEADS - 1
                    )
                })
        })
    }

    pub fn path<'de, D: Deserializer<'de>>(d: D) -> Result<PathBuf, D::Error> {
        check(d, |v| {
            let path = v.as_str().ok_or("path must be a string")?;
            if path.is_empty() || path.len() > MAX_PATH {
                return Err(format!("path: must be 1 to {MAX_PATH} bytes"));
            }
            if path.contains('\0') {
                return Err("path: contains a NUL character".into());
            }
            if !path.starts_with('/') {
                return Err(
                    "path: must be absolute (the VM's working directory is not yours)".into(),
                );
            }
            Ok(path.into())
        })
    }
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
            Request::Save { .. } => "save",
        }
    }

    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or_else(|_| json!({ "cmd": self.name() }))
    }

    /// The request as one line, newline included.
    pub fn to_line(&self) -> String {
        to_line(self)
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
    /// An argument of the wrong type or value; the reason names it.
    #[error("{cmd}: {reason}")]
    InvalidArgument { cmd: String, reason: String },
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
    request_from_object(parse_object(line)?)
}

/// A request given as a JSON object (what a request line holds), checked
/// as a line from a client is.
pub fn request_from_object(obj: Map<String, Value>) -> Result<Request, ProtocolError> {
    let cmd = match obj.get("cmd") {
        None => return Err(ProtocolError::MissingCmd),
        Some(Value::String(s)) => s.chars().take(64).collect::<String>(),
        Some(_) => {
            return Err(ProtocolError::InvalidArgument {
                cmd: "request".into(),
                reason: "cmd must be a string".into(),
            })
        }
    };
    serde_json::from_value(Value::Object(obj)).map_err(|e| request_error(cmd, &e))
}

/// serde's verdict on a request as the protocol's error. Its messages for
/// the structure (`unknown variant`, `unknown field`, `missing field`) are
/// the documented forms of serde's `de::Error` constructors; anything else
/// is an argument check's own message.
fn request_error(cmd: String, e: &serde_json::Error) -> ProtocolError {
    let text = e.to_string();
    // The name serde quotes: between the first backtick and the last one
    // before its own trailer, so a name with backticks stays whole.
    let quoted = |prefix: &str| -> Option<String> {
        let rest = text.strip_prefix(prefix)?;
        let end = rest
            .rfind("`, expected")
            .or_else(|| rest.rfind("`, there are no fields"))
            .or_else(|| rest.rfind('`'))?;
        Some(rest[..end].chars().take(64).collect())
    };
    if text.starts_with("unknown variant `") {
        ProtocolError::UnknownCommand(cmd)
    } else if let Some(arg) = quoted("unknown field `") {
        ProtocolError::UnknownArgument { cmd, arg }
    } else if let Some(arg) = quoted("missing field `") {
        ProtocolError::MissingArgument { cmd, arg }
    } else {
        ProtocolError::InvalidArgument { cmd, reason: text }
    }
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

/// A reply to one request: `{"ok":VALUE}` or
/// `{"error":{"class":"...","desc":"..."}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
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
        serde_json::to_value(self).unwrap_or_else(|_| json!({ "ok": {} }))
    }

    pub fn to_line(&self) -> String {
        to_line(self)
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
    /// A snapshot is being written.
    Saving,
    /// The snapshot is complete.
    Saved,
    /// The VM continues from a snapshot.
    Restored,
}

impl EventKind {
    pub const ALL: [EventKind; 9] = [
        EventKind::Saving,
        EventKind::Saved,
        EventKind::Restored,
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
            EventKind::Saving => "saving",
            EventKind::Saved => "saved",
            EventKind::Restored => "restored",
        }
    }

    pub fn from_name(s: &str) -> Option<EventKind> {
        Self::ALL.into_iter().find(|k| k.name() == s)
    }
}

/// Serde through `name` and `from_name`, the one list of wire names.
macro_rules! serde_by_name {
    ($ty:ty, $what:expr) => {
        impl Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.name())
            }
        }
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let name = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                <$ty>::from_name(&name)
                    .ok_or_else(|| serde::de::Error::custom(format!("unknown {}", $what)))
            }
        }
    };
}

serde_by_name!(ErrorClass, "error class");
serde_by_name!(EventKind, "event");

/// Wall-clock time of an event, split like QMP's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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

/// An asynchronous notification to subscribed clients:
/// `{"event":"NAME","timestamp":{...}}`, with `"data"` for some.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    #[serde(rename = "event")]
    pub kind: EventKind,
    pub timestamp: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
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
        serde_json::to_value(self).unwrap_or_else(|_| json!({ "event": self.kind.name() }))
    }

    pub fn to_line(&self) -> String {
        to_line(self)
    }
}

/// One line from the server: a reply or an event, told apart by the
/// top-level key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ServerMessage {
    Response(Response),
    Event(Event),
}

/// A message as one line: compact JSON (which escapes every newline in
/// a string) and a newline.
fn to_line(message: &impl Serialize) -> String {
    // Every message type serialises: string keys, no maps with other keys.
    let mut s = serde_json::to_string(message).unwrap_or_default();
    s.push('\n');
    s
}

/// Parses one line the server sent.
pub fn parse_server_line(line: &[u8]) -> Result<ServerMessage, ProtocolError> {
    let obj = parse_object(line)?;
    serde_json::from_value(Value::Object(obj)).map_err(|_| {
        ProtocolError::BadJson("unexpected server message: neither a reply nor an event".into())
    })
}

pub(crate) enum LineRead {
    Line(Vec<u8>),
    TooLong(usize),
    Eof,
}

/// Reads one line without ever buffering more than `max` bytes of it; an
/// over-long line is consumed up to its newline and reported.
pub(crate) fn read_line_bounded<R: BufRead>(r: &mut R, max: usize) -> io::Result<LineRead> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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
                path: "/tmp/s.png".into(),
                head: 0
            })
        );
    }

    #[test]
    fn screenshot_takes_a_head_number() {
        assert_eq!(
            parse(r#"{"cmd":"screenshot","path":"/s.png","head":3}"#),
            Ok(Request::Screenshot {
                path: "/s.png".into(),
                head: 3
            })
        );
        for bad in [r#""head":4"#, r#""head":-1"#, r#""head":"1""#] {
            let line = format!(r#"{{"cmd":"screenshot","path":"/s.png",{bad}}}"#);
            assert!(parse(&line).is_err(), "{line}");
        }
        let r = Request::Screenshot {
            path: "/s.png".into(),
            head: 0,
        };
        assert_eq!(
            r.to_json(),
            serde_json::json!({"cmd":"screenshot","path":"/s.png"})
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
    fn argument_errors_name_the_argument_and_have_its_class() {
        let e = parse(r#"{"cmd":"pause","a`b, expected x":1}"#).unwrap_err();
        assert_eq!(
            e,
            ProtocolError::UnknownArgument {
                cmd: "pause".into(),
                arg: "a`b, expected x".into()
            }
        );
        assert_eq!(e.class(), ErrorClass::InvalidArgument);
        let e = parse(r#"{"cmd":"screenshot"}"#).unwrap_err();
        assert_eq!(
            e,
            ProtocolError::MissingArgument {
                cmd: "screenshot".into(),
                arg: "path".into()
            }
        );
        let e = parse(r#"{"cmd":"pointer","x":1,"y":2,"buttons":7}"#).unwrap_err();
        assert_eq!(e.class(), ErrorClass::InvalidArgument);
        assert_eq!(
            e.to_string(),
            "pointer: buttons must be an array of button names"
        );
        let long = format!(r#"{{"cmd":"stop","{}":1}}"#, "k".repeat(10_000));
        assert!(parse(&long).unwrap_err().to_string().len() < 200);
        assert_eq!(
            parse(r#"{"cmd":"stop-it"}"#).unwrap_err().class(),
            ErrorClass::UnknownCommand
        );
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
            "/[a-zA-Z0-9 ._/-]{0,100}".prop_map(|p| Request::Screenshot {
                path: p.into(),
                head: 0,
            }),
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
}
