//! Real registry peers for the image tests: Debian's `docker-registry`
//! (the CNCF distribution registry, `registry:2`) on a free loopback port
//! with a temporary storage directory, and `skopeo`. Tests skip, with one
//! line saying so, when the packages are not installed.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const REGISTRY_BIN: &str = "/usr/bin/docker-registry";
const SKOPEO_BIN: &str = "/usr/bin/skopeo";

/// bcrypt of "secret" (htpasswd's format), for the auth tests.
pub const HTPASSWD_LINE: &str = "vm:$2a$12$KdcV5l0K5Z3JAaW73xVcuOkKoXyjcwKIJ97Q9oi9GqW5AhRCG7fla";
pub const HTPASSWD_USER: &str = "vm";
pub const HTPASSWD_PASSWORD: &str = "secret";

/// Whether the registry and skopeo are installed; prints why not.
pub fn peers_installed(test: &str) -> bool {
    for bin in [REGISTRY_BIN, SKOPEO_BIN] {
        if !Path::new(bin).exists() {
            eprintln!(
                "{test}: skipped: {bin} is not installed (apt-get install docker-registry skopeo)"
            );
            return false;
        }
    }
    true
}

pub struct Registry {
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// `127.0.0.1:PORT`
    pub addr: String,
    htpasswd: bool,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// `GET /v2/` answers (any status): the registry is serving.
fn answers(addr: &str) -> bool {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /v2/ HTTP/1.0\r\n\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 12];
    s.read_exact(&mut buf).is_ok() && buf.starts_with(b"HTTP/1.")
}

impl Registry {
    /// A registry without auth.
    pub fn start() -> Registry {
        Self::start_with(false)
    }

    /// A registry that wants `HTPASSWD_USER`/`HTPASSWD_PASSWORD` (Basic).
    pub fn start_with_auth() -> Registry {
        Self::start_with(true)
    }

    fn start_with(htpasswd: bool) -> Registry {
        let dir = tempfile::Builder::new().prefix("reg").tempdir().unwrap();
        std::fs::create_dir(dir.path().join("data")).unwrap();
        std::fs::write(dir.path().join("htpasswd"), format!("{HTPASSWD_LINE}\n")).unwrap();
        let mut r = Registry {
            child: None,
            addr: String::new(),
            dir,
            htpasswd,
        };
        r.restart();
        r
    }

    /// The directory the registry keeps blobs in.
    pub fn storage(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The file holding blob `hex` (sha256) in the registry's storage.
    pub fn blob_file(&self, hex: &str) -> PathBuf {
        self.storage()
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// (Re)starts the registry on a new free port, same storage.
    pub fn restart(&mut self) {
        self.stop();
        for _ in 0..5 {
            let addr = format!("127.0.0.1:{}", free_port());
            let auth = if self.htpasswd {
                format!(
                    "auth:\n  htpasswd:\n    realm: vmapple-test\n    path: {}\n",
                    self.dir.path().join("htpasswd").display()
                )
            } else {
                String::new()
            };
            let config = format!(
                "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n{auth}http:\n  addr: {addr}\n",
                self.storage().display()
            );
            let config_path = self.dir.path().join("config.yml");
            std::fs::write(&config_path, config).unwrap();
            let log = std::fs::File::create(self.dir.path().join("registry.log")).unwrap();
            let mut child = Command::new(REGISTRY_BIN)
                .arg("serve")
                .arg(&config_path)
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("starting docker-registry");
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(20) {
                if answers(&addr) {
                    self.child = Some(child);
                    self.addr = addr;
                    return;
                }
                if child.try_wait().unwrap().is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!(
            "docker-registry did not start; its log:\n{}",
            std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
        );
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs skopeo (no signature policy, plain HTTP); panics if it fails.
pub fn skopeo(args: &[&str]) -> Output {
    let out = Command::new(SKOPEO_BIN)
        .arg("--insecure-policy")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running skopeo");
    assert!(
        out.status.success(),
        "skopeo {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}
