//! A VNC server (RFB 3.8, RFC 6143; 3.7 and 3.3 clients too) over the
//! display model.
//!
//! It serves one head of a [`display::Display`] and sends its keyboard and
//! pointer to the display's input sink. Security: None, or VNC
//! authentication with a password. Encodings: Raw and ZRLE, with the
//! DesktopSize and Cursor pseudo-encodings. Updates carry only the regions
//! the guest changed since the client's last one.
//!
//! # Threads and pace
//!
//! Each client has two threads: one reads its messages, one sends it
//! updates. The sender copies what changed out of the head under the
//! head's short lock and encodes and sends outside it, so a slow client
//! only falls behind (and then gets merged or whole-frame updates); it
//! never holds up the guest or another client.
//!
//! # Hostile clients
//!
//! A client that sends a bad version string, an unsupported pixel format,
//! an unknown message, a cut-text longer than [`MAX_CUT_TEXT`], that fails
//! authentication, takes longer than [`HANDSHAKE_TIMEOUT`] over the
//! handshake, or stops reading for [`WRITE_TIMEOUT`] is cut off with a log
//! line. At most [`MAX_CLIENTS`] are served at once.

pub mod encode;
pub mod keys;

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use display::{Display, Head, InputSink, Rect, Seen};
use encode::{encoding, PixelFormat, Zrle};
use vm_core::sync::{lock, wait_timeout};

/// Clients served at once; more are turned away.
pub const MAX_CLIENTS: usize = 16;
/// Longest ClientCutText a client may send (the text is dropped: the guest
/// has no clipboard channel).
pub const MAX_CUT_TEXT: u32 = 1 << 20;
/// Time a client has for the handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a client may leave an update unread before it is cut off.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Rectangles per update before they are merged into their bounding box.
const MAX_RECTS: usize = 512;
/// How often idle threads look for shutdown.
const POLL: Duration = Duration::from_millis(100);

/// Where the server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

/// What the server needs.
#[derive(Clone, Debug)]
pub struct VncConfig {
    pub listen: Listen,
    /// VNC authentication with this password (at most 8 bytes count, as
    /// the protocol's DES key); `None` for no authentication.
    pub password: Option<Vec<u8>>,
    /// The head shown.
    pub head: usize,
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum VncError {
    #[error("cannot listen on {what}")]
    Listen {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("the display has no head {0}")]
    NoHead(usize),
}

/// A running server; dropping it stops listening (clients already
/// connected are served until they leave or the process ends).
pub struct VncServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    addr: Option<SocketAddr>,
    unix: Option<PathBuf>,
}

impl VncServer {
    pub fn start(config: VncConfig, display: Arc<Display>) -> Result<Self, VncError> {
        let head = display
            .head(config.head)
            .cloned()
            .ok_or(VncError::NoHead(config.head))?;
        let listen_err = |source| VncError::Listen {
            what: match &config.listen {
                Listen::Tcp(a) => a.to_string(),
                Listen::Unix(p) => format!("unix:{}", p.display()),
            },
            source,
        };
        let (listener, addr, unix) = match &config.listen {
            Listen::Tcp(a) => {
                let l = TcpListener::bind(a).map_err(listen_err)?;
                let addr = l.local_addr().ok();
                (Listener::Tcp(l), addr, None)
            }
            Listen::Unix(p) => {
                // A socket file left by an earlier run would fail the bind.
                if std::fs::symlink_metadata(p)
                    .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
                {
                    let _ = std::fs::remove_file(p);
                }
                let l = UnixListener::bind(p).map_err(listen_err)?;
                (Listener::Unix(l), None, Some(p.clone()))
            }
        };
        listener.set_nonblocking().map_err(listen_err)?;
        let stop = Arc::new(AtomicBool::new(false));
        let ctx = Arc::new(Ctx {
            head,
            display,
            password: config.password,
            clients: AtomicUsize::new(0),
        });
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("vnc-listen".into())
            .spawn(move || accept_loop(listener, ctx, s))
            .map_err(listen_err)?;
        match (&addr, &unix) {
            (Some(a), _) => tracing::info!("VNC server on {a}"),
            (_, Some(p)) => tracing::info!("VNC server on unix:{}", p.display()),
            _ => {}
        }
        Ok(Self {
            stop,
            thread: Some(thread),
            addr,
            unix,
        })
    }

    /// The TCP address listened on (with the port the system chose for 0).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.addr
    }
}

impl Drop for VncServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some(p) = &self.unix {
            let _ = std::fs::remove_file(p);
        }
    }
}

struct Ctx {
    head: Arc<Head>,
    display: Arc<Display>,
    password: Option<Vec<u8>>,
    clients: AtomicUsize,
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    fn set_nonblocking(&self) -> io::Result<()> {
        match self {
            Listener::Tcp(l) => l.set_nonblocking(true),
            Listener::Unix(l) => l.set_nonblocking(true),
        }
    }

    fn accept(&self) -> io::Result<(Stream, String)> {
        match self {
            Listener::Tcp(l) => l.accept().map(|(s, a)| (Stream::Tcp(s), a.to_string())),
            Listener::Unix(l) => l
                .accept()
                .map(|(s, _)| (Stream::Unix(s), "unix".to_string())),
        }
    }
}

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }
    fn setup(&self, read: Option<Duration>, write: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => {
                s.set_nonblocking(false)?;
                // Updates are whole messages: send each at once.
                s.set_nodelay(true)?;
                s.set_read_timeout(read)?;
                s.set_write_timeout(write)
            }
            Stream::Unix(s) => {
                s.set_nonblocking(false)?;
                s.set_read_timeout(read)?;
                s.set_write_timeout(write)
            }
        }
    }
    fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
        }
    }
}

fn accept_loop(listener: Listener, ctx: Arc<Ctx>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, peer)) => {
                if ctx.clients.fetch_add(1, Ordering::AcqRel) >= MAX_CLIENTS {
                    ctx.clients.fetch_sub(1, Ordering::AcqRel);
                    tracing::warn!("vnc: {peer} turned away: {MAX_CLIENTS} clients already");
                    stream.shutdown();
                    continue;
                }
                let c = ctx.clone();
                let spawned =
                    std::thread::Builder::new()
                        .name("vnc-client".into())
                        .spawn(move || {
                            if let Err(reason) = serve(stream, &c, &peer) {
                                tracing::warn!("vnc: client {peer} cut off: {reason}");
                            } else {
                                tracing::info!("vnc: client {peer} left");
                            }
                            c.clients.fetch_sub(1, Ordering::AcqRel);
                        });
                if let Err(e) = spawned {
                    ctx.clients.fetch_sub(1, Ordering::AcqRel);
                    tracing::warn!("vnc: no thread for a client: {e}");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(POLL),
            Err(e) => {
                tracing::warn!("vnc: accept: {e}");
                std::thread::sleep(POLL);
            }
        }
    }
}

/// Why a client is cut off.
pub type Cut = String;

fn io_cut(what: &'static str) -> impl Fn(io::Error) -> Cut {
    move |e| format!("{what}: {e}")
}

/// Security types (RFC 6143 §7.1.2).
const SEC_NONE: u8 = 1;
const SEC_VNC: u8 = 2;

/// The protocol minor version spoken (3, 7 or 8).
fn handshake(s: &mut Stream, ctx: &Ctx) -> Result<u8, Cut> {
    s.write_all(b"RFB 003.008\n")
        .map_err(io_cut("sending the version"))?;
    let mut v = [0u8; 12];
    s.read_exact(&mut v)
        .map_err(io_cut("reading the version"))?;
    let minor = parse_version(&v)
        .ok_or_else(|| format!("bad version string {:?}", String::from_utf8_lossy(&v)))?;
    let sec = if ctx.password.is_some() {
        SEC_VNC
    } else {
        SEC_NONE
    };
    if minor == 3 {
        s.write_all(&u32::from(sec).to_be_bytes())
            .map_err(io_cut("sending security"))?;
    } else {
        s.write_all(&[1, sec])
            .map_err(io_cut("sending security types"))?;
        let mut pick = [0u8; 1];
        s.read_exact(&mut pick)
            .map_err(io_cut("reading the security type"))?;
        if pick[0] != sec {
            return Err(format!(
                "asked for security type {} (offered {sec})",
                pick[0]
            ));
        }
    }
    if let Some(password) = &ctx.password {
        let challenge = random16().map_err(io_cut("no random challenge"))?;
        s.write_all(&challenge)
            .map_err(io_cut("sending the challenge"))?;
        let mut response = [0u8; 16];
        s.read_exact(&mut response)
            .map_err(io_cut("reading the response"))?;
        if vnc_auth_response(password, &challenge) != response {
            let _ = s.write_all(&1u32.to_be_bytes());
            if minor == 8 {
                let reason = b"authentication failed";
                let _ = s.write_all(&(reason.len() as u32).to_be_bytes());
                let _ = s.write_all(reason);
            }
            return Err("wrong password".into());
        }
        s.write_all(&0u32.to_be_bytes())
            .map_err(io_cut("sending the result"))?;
    } else if minor == 8 {
        s.write_all(&0u32.to_be_bytes())
            .map_err(io_cut("sending the result"))?;
    }
    let mut shared = [0u8; 1];
    s.read_exact(&mut shared)
        .map_err(io_cut("reading ClientInit"))?;
    Ok(minor)
}

/// The minor version a client's 12-byte ProtocolVersion asks for (3, 7
/// or 8), or `None` if it is not one.
pub fn parse_version(v: &[u8; 12]) -> Option<u8> {
    let text = std::str::from_utf8(v).ok()?;
    let rest = text.strip_prefix("RFB 003.")?.strip_suffix('\n')?;
    if rest.len() != 3 || !rest.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(match rest.parse::<u16>().ok()? {
        7 => 7,
        8.. => 8,
        _ => 3,
    })
}

fn random16() -> io::Result<[u8; 16]> {
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(b)
}

/// The response a client with `password` gives to `challenge` (RFC 6143
/// §7.2.2): the challenge DES-encrypted with the password as key, each
/// key byte's bits mirrored (as every VNC implementation does).
pub fn vnc_auth_response(password: &[u8], challenge: &[u8; 16]) -> [u8; 16] {
    use des::cipher::{generic_array::GenericArray, BlockEncrypt, KeyInit};
    let mut key = [0u8; 8];
    for (k, p) in key.iter_mut().zip(password) {
        *k = p.reverse_bits();
    }
    let cipher = des::Des::new(GenericArray::from_slice(&key));
    let mut out = *challenge;
    for block in out.chunks_exact_mut(8) {
        cipher.encrypt_block(GenericArray::from_mut_slice(block));
    }
    out
}

/// What the reader tells the sender.
struct Shared {
    closed: Option<Cut>,
    pf: PixelFormat,
    zrle: bool,
    cursor: bool,
    desktop_size: bool,
    /// A pending FramebufferUpdateRequest: incremental or not.
    request: Option<bool>,
}

struct Client {
    shared: Mutex<Shared>,
    wake: Condvar,
}

impl Client {
    fn close(&self, why: Cut) {
        lock(&self.shared).closed.get_or_insert(why);
        self.wake.notify_all();
    }
}

fn serve(mut s: Stream, ctx: &Ctx, peer: &str) -> Result<(), Cut> {
    s.setup(Some(HANDSHAKE_TIMEOUT), Some(HANDSHAKE_TIMEOUT))
        .map_err(io_cut("socket setup"))?;
    handshake(&mut s, ctx)?;
    let (mut w, mut h) = ctx.head.size();
    if w == 0 || h == 0 {
        // Nothing shown yet: the preferred mode, resized once it is.
        let m = ctx.head.modes().first().copied();
        (w, h) = m.map_or((640, 480), |m| (u32::from(m.width), u32::from(m.height)));
    }
    let mut init = Vec::new();
    init.extend_from_slice(&(w as u16).to_be_bytes());
    init.extend_from_slice(&(h as u16).to_be_bytes());
    init.extend_from_slice(&PixelFormat::default().to_wire());
    let name = b"vmapple";
    init.extend_from_slice(&(name.len() as u32).to_be_bytes());
    init.extend_from_slice(name);
    s.write_all(&init).map_err(io_cut("sending ServerInit"))?;
    tracing::info!("vnc: client {peer} connected");
    s.setup(None, Some(WRITE_TIMEOUT))
        .map_err(io_cut("socket setup"))?;

    let client = Arc::new(Client {
        shared: Mutex::new(Shared {
            closed: None,
            pf: PixelFormat::default(),
            zrle: false,
            cursor: false,
            desktop_size: false,
            request: None,
        }),
        wake: Condvar::new(),
    });
    let reader_stream = s.try_clone().map_err(io_cut("socket clone"))?;
    let c = client.clone();
    let input = ctx.display.input().cloned();
    let head = ctx.head.clone();
    let reader = std::thread::Builder::new()
        .name("vnc-read".into())
        .spawn(move || {
            let why = read_loop(reader_stream, &c, input.as_deref(), &head);
            c.close(why);
        })
        .map_err(io_cut("no reader thread"))?;
    let result = send_loop(&mut s, ctx, &client, (w, h));
    if let Err(e) = &result {
        client.close(e.clone());
    }
    s.shutdown();
    let _ = reader.join();
    let why = lock(&client.shared).closed.clone();
    match (result, why) {
        (Err(e), _) => Err(e),
        (Ok(()), Some(why)) if why != "closed" => Err(why),
        _ => Ok(()),
    }
}

fn read_loop(mut s: Stream, c: &Client, input: Option<&dyn InputSink>, head: &Head) -> Cut {
    let mut state = InputState::default();
    loop {
        let msg = match read_message(&mut s) {
            Ok(Some(m)) => m,
            Ok(None) => return "closed".into(),
            Err(why) => return why,
        };
        if lock(&c.shared).closed.is_some() {
            return "closed".into();
        }
        match msg {
            ClientMsg::SetPixelFormat(pf) => lock(&c.shared).pf = pf,
            ClientMsg::SetEncodings(list) => {
                let mut sh = lock(&c.shared);
                sh.zrle = list.contains(&encoding::ZRLE);
                sh.cursor = list.contains(&encoding::CURSOR);
                sh.desktop_size = list.contains(&encoding::DESKTOP_SIZE);
            }
            ClientMsg::UpdateRequest { incremental, .. } => {
                let mut sh = lock(&c.shared);
                // A full request wins over an incremental one still pending.
                sh.request = Some(incremental && sh.request.unwrap_or(true));
                c.wake.notify_all();
            }
            ClientMsg::CutText(_) => {}
            other => {
                if let Some(input) = input {
                    state.apply(input, head.size(), &other);
                }
            }
        }
    }
}

/// A client-to-server message (RFC 6143 §7.5).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientMsg {
    SetPixelFormat(PixelFormat),
    SetEncodings(Vec<i32>),
    /// The area asked for is not kept: updates cover the whole frame.
    UpdateRequest {
        incremental: bool,
        rect: Rect,
    },
    Key {
        down: bool,
        keysym: u32,
    },
    Pointer {
        mask: u8,
        x: u16,
        y: u16,
    },
    /// ClientCutText of this many bytes, read and dropped.
    CutText(u32),
}

/// Reads the next client message: `None` when the client closed the
/// connection between messages; an error (why the client is cut off) for
/// an unknown message, an impossible pixel format, a cut text over
/// [`MAX_CUT_TEXT`] or a stream ending inside a message.
pub fn read_message(r: &mut impl Read) -> Result<Option<ClientMsg>, Cut> {
    let mut kind = [0u8; 1];
    loop {
        match r.read(&mut kind) {
            Ok(0) => return Ok(None),
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("reading: {e}")),
        }
    }
    let msg = match kind[0] {
        0 => {
            let b = read_n::<19>(r)?;
            let mut wire = [0u8; 16];
            wire.copy_from_slice(&b[3..19]);
            let pf = PixelFormat::from_wire(&wire)
                .ok_or_else(|| format!("unsupported pixel format {wire:?}"))?;
            ClientMsg::SetPixelFormat(pf)
        }
        2 => {
            let b = read_n::<3>(r)?;
            // At most 65535 encodings: 256 KiB, bounded by the u16.
            let n = usize::from(u16::from_be_bytes([b[1], b[2]]));
            let mut raw = vec![0u8; n * 4];
            r.read_exact(&mut raw)
                .map_err(|e| format!("reading encodings: {e}"))?;
            ClientMsg::SetEncodings(
                raw.chunks_exact(4)
                    .map(|e| i32::from_be_bytes([e[0], e[1], e[2], e[3]]))
                    .collect(),
            )
        }
        3 => {
            let b = read_n::<9>(r)?;
            let v = |i: usize| u32::from(u16::from_be_bytes([b[i], b[i + 1]]));
            ClientMsg::UpdateRequest {
                incremental: b[0] != 0,
                rect: Rect::new(v(1), v(3), v(5), v(7)),
            }
        }
        4 => {
            let b = read_n::<7>(r)?;
            ClientMsg::Key {
                down: b[0] != 0,
                keysym: u32::from_be_bytes([b[3], b[4], b[5], b[6]]),
            }
        }
        5 => {
            let b = read_n::<5>(r)?;
            ClientMsg::Pointer {
                mask: b[0],
                x: u16::from_be_bytes([b[1], b[2]]),
                y: u16::from_be_bytes([b[3], b[4]]),
            }
        }
        6 => {
            let b = read_n::<7>(r)?;
            // A negative length is the extended clipboard's; its size is
            // the absolute value.
            let len = i32::from_be_bytes([b[3], b[4], b[5], b[6]]).unsigned_abs();
            if len > MAX_CUT_TEXT {
                return Err(format!("cut text of {len} bytes"));
            }
            let got = io::copy(&mut r.take(u64::from(len)), &mut io::sink())
                .map_err(|e| format!("reading cut text: {e}"))?;
            if got < u64::from(len) {
                return Err("reading cut text: the stream ended".into());
            }
            ClientMsg::CutText(len)
        }
        other => return Err(format!("unknown message type {other}")),
    };
    Ok(Some(msg))
}

fn read_n<const N: usize>(s: &mut impl Read) -> Result<[u8; N], Cut> {
    let mut b = [0u8; N];
    s.read_exact(&mut b)
        .map_err(|e| format!("reading a message: {e}"))?;
    Ok(b)
}

/// One client's keyboard and pointer state, turning its key and pointer
/// messages into input-sink calls.
#[derive(Default)]
pub struct InputState {
    keys: KeyState,
    buttons: u8,
}

impl InputState {
    /// Sends `msg` (a key or pointer message; others are ignored) to
    /// `input`, for a head of `size` pixels.
    pub fn apply(&mut self, input: &dyn InputSink, size: (u32, u32), msg: &ClientMsg) {
        match *msg {
            ClientMsg::Key { down, keysym } => self.keys.event(input, keysym, down),
            ClientMsg::Pointer { mask, x, y } => {
                let scale = |v: u16, side: u32| {
                    (u32::from(v) * 32767 / side.saturating_sub(1).max(1)).min(32767) as u16
                };
                input.pointer(scale(x, size.0), scale(y, size.1));
                // RFB: 1 left, 2 middle, 4 right, 8/16 wheel up/down.
                let hid = (mask & 1) | (mask & 4) >> 1 | (mask & 2) << 1;
                if hid != self.buttons & 7 {
                    input.buttons(hid);
                }
                if mask & 8 != 0 && self.buttons & 8 == 0 {
                    input.wheel(1);
                }
                if mask & 16 != 0 && self.buttons & 16 == 0 {
                    input.wheel(-1);
                }
                self.buttons = mask;
            }
            _ => {}
        }
    }
}

/// Shift state of one client, to type shifted keysyms when it is not held.
#[derive(Default)]
struct KeyState {
    shift_held: u8,
}

impl KeyState {
    fn event(&mut self, input: &dyn InputSink, sym: u32, down: bool) {
        let Some((usage, needs_shift)) = keys::usage(sym) else {
            tracing::debug!("vnc: keysym {sym:#x} has no USB key");
            return;
        };
        if keys::is_shift(usage) {
            self.shift_held = if down {
                self.shift_held.saturating_add(1)
            } else {
                self.shift_held.saturating_sub(1)
            };
        }
        if down && needs_shift && self.shift_held == 0 {
            input.key(keys::LEFT_SHIFT, true);
            input.key(usage, true);
            input.key(keys::LEFT_SHIFT, false);
        } else {
            input.key(usage, down);
        }
    }
}

fn send_loop(s: &mut Stream, ctx: &Ctx, c: &Client, mut size: (u32, u32)) -> Result<(), Cut> {
    let mut seen = Seen::default();
    let mut zrle = Zrle::default();
    loop {
        let (incremental, pf, use_zrle, cursor_ok, resize_ok) = {
            let sh = lock(&c.shared);
            if sh.closed.is_some() {
                return Ok(());
            }
            let Some(incremental) = sh.request else {
                drop(wait_timeout(&c.wake, sh, POLL));
                continue;
            };
            (incremental, sh.pf, sh.zrle, sh.cursor, sh.desktop_size)
        };
        if !incremental {
            seen = Seen::default();
        }
        let ch = ctx.head.changes(seen, MAX_RECTS);
        if ch.is_empty() || ch.width == 0 || ch.height == 0 {
            ctx.head.wait_change(seen, POLL);
            continue;
        }
        {
            let mut sh = lock(&c.shared);
            // Answered now; a full request that came meanwhile stays.
            if !(incremental && sh.request == Some(false)) {
                sh.request = None;
            }
        }
        let mut rects: Vec<(Rect, i32, Vec<u8>)> = Vec::new();
        if (ch.width, ch.height) != size && resize_ok {
            size = (ch.width, ch.height);
            rects.push((
                Rect::new(0, 0, size.0, size.1),
                encoding::DESKTOP_SIZE,
                Vec::new(),
            ));
        }
        if ch.cursor && cursor_ok {
            let cur = ctx.head.cursor();
            match cur.image {
                Some(img) => rects.push((
                    Rect::new(img.hot_x, img.hot_y, img.width, img.height),
                    encoding::CURSOR,
                    encode::cursor_data(pf, img.width as usize, img.height as usize, &img.pixels),
                )),
                // An empty cursor: the client draws none.
                None => rects.push((Rect::default(), encoding::CURSOR, Vec::new())),
            }
        }
        for r in &ch.rects {
            let (r, px) = ctx.head.read(r.clip(size.0, size.1));
            if r.is_empty() {
                continue;
            }
            let (w, h) = (r.width as usize, r.height as usize);
            if use_zrle {
                rects.push((r, encoding::ZRLE, zrle.encode(pf, w, h, &px)));
            } else {
                let mut data = Vec::with_capacity(w * h * pf.bytes());
                pf.put_all(&mut data, &px);
                rects.push((r, encoding::RAW, data));
            }
        }
        seen = ch.now;
        if rects.is_empty() {
            continue;
        }
        let total: usize = rects.iter().map(|r| 12 + r.2.len()).sum();
        let mut msg = Vec::with_capacity(4 + total);
        msg.extend_from_slice(&[0, 0]);
        msg.extend_from_slice(&(rects.len() as u16).to_be_bytes());
        for (r, enc, data) in &rects {
            for v in [r.x, r.y, r.width, r.height] {
                msg.extend_from_slice(&(v.min(u32::from(u16::MAX)) as u16).to_be_bytes());
            }
            msg.extend_from_slice(&enc.to_be_bytes());
            msg.extend_from_slice(data);
        }
        s.write_all(&msg)
            .map_err(|e| format!("sending an update (stalled or gone): {e}"))?;
    }
}

#[cfg(test)]
mod tests;
