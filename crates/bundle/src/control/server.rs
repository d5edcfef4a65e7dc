//! The listening control socket a running VM serves.

use std::collections::HashMap;
use std::fs;
use std::io::{self, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::protocol::{
    parse_request, read_line_bounded, ErrorClass, Event, LineRead, ProtocolError, Request,
    Response, MAX_LINE,
};

/// Clients served at once; more are told so and disconnected.
pub const MAX_CLIENTS: usize = 16;
/// How long a write to a client may block before the client is dropped.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// What the VMM does with requests. Called on the socket's client
/// threads, possibly several at once. `subscribe` is handled by the server
/// and never reaches the handler.
pub trait ControlHandler: Send + Sync {
    fn handle(&self, req: Request) -> Response;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::client::{call, Client, ClientError};
    use crate::control::protocol::{EventKind, RunState};
    use serde_json::Value;
    use std::io::{BufRead, Read};

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
