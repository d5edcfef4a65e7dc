//! Registry behaviours the distribution registry does not show on its own,
//! against a scripted HTTP peer on loopback: the Bearer token dance, a
//! connection dropped in the middle of a blob (resumed with `Range`), a
//! registry that lies about a blob, 5xx retried then given up on.
//! The full pull/push paths against the real registry are in
//! crates/vmapple/tests/bundles.rs.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use oci::cache::{BlobCache, DownloadError};
use oci::registry::{Client, ClientOptions, RegistryError};
use oci::tart::Blob;
use oci::{Digest, Reference};

struct Request {
    method: String,
    path: String,
    headers: HashMap<String, String>,
}

/// What the scripted peer answers: status, headers, body; `cut` ends the
/// connection after that many body bytes (a dropped download).
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    cut: Option<usize>,
}

impl Reply {
    fn new(status: u16, body: impl Into<Vec<u8>>) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: body.into(),
            cut: None,
        }
    }

    fn header(mut self, k: &str, v: &str) -> Reply {
        self.headers.push((k.into(), v.into()));
        self
    }
}

type Handler = dyn Fn(&Request) -> Reply + Send + Sync;

/// A one-connection-at-a-time HTTP/1.1 peer on 127.0.0.1, logging every
/// request line it saw.
struct Peer {
    addr: String,
    log: Arc<Mutex<Vec<String>>>,
}

fn read_request(reader: &mut BufReader<TcpStream>) -> Option<Request> {
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let path = parts.next()?.to_string();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        reader.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let len: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body).ok()?;
    Some(Request {
        method,
        path,
        headers,
    })
}

impl Peer {
    fn start(handler: Box<Handler>) -> Peer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let log = Arc::new(Mutex::new(Vec::new()));
        let l = log.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut out = stream;
                while let Some(req) = read_request(&mut reader) {
                    let auth = req
                        .headers
                        .get("authorization")
                        .cloned()
                        .unwrap_or_default();
                    let range = req.headers.get("range").cloned().unwrap_or_default();
                    l.lock()
                        .unwrap()
                        .push(format!("{} {} [{auth}] [{range}]", req.method, req.path));
                    let reply = handler(&req);
                    let mut head = format!(
                        "HTTP/1.1 {} X\r\nContent-Length: {}\r\n",
                        reply.status,
                        reply.body.len()
                    );
                    for (k, v) in &reply.headers {
                        head.push_str(&format!("{k}: {v}\r\n"));
                    }
                    head.push_str("\r\n");
                    let _ = out.write_all(head.as_bytes());
                    let body = match reply.cut {
                        Some(n) => &reply.body[..n],
                        None => &reply.body[..],
                    };
                    let _ = out.write_all(body);
                    if reply.cut.is_some() {
                        break;
                    }
                }
            }
        });
        Peer { addr, log }
    }

    fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

fn options() -> ClientOptions {
    ClientOptions {
        insecure: true,
        credentials: Default::default(),
        backoff: Duration::from_millis(10),
    }
}

fn blob_data() -> Vec<u8> {
    (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect()
}

#[test]
fn a_bearer_challenge_is_answered_with_a_token_from_the_realm() {
    let manifest = br#"{"schemaVersion":2}"#.to_vec();
    let realm = Arc::new(Mutex::new(String::new()));
    let r = realm.clone();
    let peer = Peer::start(Box::new(move |req| {
        if req.path.starts_with("/token?") {
            assert!(
                req.path.contains("scope=repository%3Ateam%2Fvm%3Apull"),
                "{}",
                req.path
            );
            assert!(req.path.contains("service=test-registry"), "{}", req.path);
            return Reply::new(200, r#"{"access_token":"tok123","expires_in":300}"#);
        }
        if req.headers.get("authorization").map(String::as_str) == Some("Bearer tok123") {
            return Reply::new(200, manifest.clone())
                .header("Content-Type", "application/vnd.oci.image.manifest.v1+json");
        }
        Reply::new(401, "{}").header(
            "WWW-Authenticate",
            &format!(
                r#"Bearer realm="{}",service="test-registry",scope="repository:team/vm:pull""#,
                r.lock().unwrap()
            ),
        )
    }));
    *realm.lock().unwrap() = format!("http://{}/token", peer.addr);
    let reference: Reference = format!("{}/team/vm:v1", peer.addr).parse().unwrap();
    let client = Client::new(&reference, false, &options()).unwrap();
    let got = client.get_manifest(&reference).unwrap();
    assert_eq!(got.bytes, br#"{"schemaVersion":2}"#);
    // The token is reused: one token request for two manifest fetches.
    client.get_manifest(&reference).unwrap();
    let log = peer.log();
    assert_eq!(
        log.iter().filter(|l| l.starts_with("GET /token")).count(),
        1,
        "{log:#?}"
    );
    assert!(log[0].contains("[]"), "first attempt anonymous: {log:#?}");
}

#[test]
fn a_download_cut_midway_resumes_with_range_and_lands_verified_in_the_cache() {
    let data = blob_data();
    let digest = Digest::of(&data);
    let d = data.clone();
    let peer = Peer::start(Box::new(move |req| match req.headers.get("range") {
        None => {
            let mut r = Reply::new(200, d.clone());
            r.cut = Some(100_000);
            r
        }
        Some(range) => {
            let from: usize = range
                .strip_prefix("bytes=")
                .and_then(|s| s.strip_suffix('-'))
                .unwrap()
                .parse()
                .unwrap();
            Reply::new(206, d[from..].to_vec()).header(
                "Content-Range",
                &format!("bytes {from}-{}/{}", d.len() - 1, d.len()),
            )
        }
    }));
    let reference: Reference = format!("{}/vm:v1", peer.addr).parse().unwrap();
    let client = Client::new(&reference, false, &options()).unwrap();
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = BlobCache::new(cache_dir.path());
    let blob = Blob {
        digest,
        size: data.len() as u64,
    };
    let path = cache.fetch(&client, blob, &|_| {}).unwrap();
    assert_eq!(std::fs::read(path).unwrap(), data);
    let log = peer.log();
    assert_eq!(log.len(), 2, "{log:#?}");
    assert!(log[1].contains("[bytes=100000-]"), "{log:#?}");
    assert!(cache.get(&blob).is_some());
}

#[test]
fn a_blob_whose_bytes_do_not_match_its_digest_never_enters_the_cache() {
    let data = blob_data();
    let digest = Digest::of(&data);
    let mut lie = data.clone();
    lie[12345] ^= 1;
    let peer = Peer::start(Box::new(move |_| Reply::new(200, lie.clone())));
    let reference: Reference = format!("{}/vm:v1", peer.addr).parse().unwrap();
    let client = Client::new(&reference, false, &options()).unwrap();
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = BlobCache::new(cache_dir.path());
    let blob = Blob {
        digest,
        size: data.len() as u64,
    };
    let err = cache.fetch(&client, blob, &|_| {}).unwrap_err();
    assert!(matches!(err, DownloadError::DigestMismatch { .. }), "{err}");
    assert!(cache.get(&blob).is_none());
    assert_eq!(
        std::fs::read_dir(cache_dir.path().join("sha256"))
            .unwrap()
            .count(),
        0
    );
}

#[test]
fn server_errors_are_retried_then_reported_with_the_registrys_words() {
    let peer = Peer::start(Box::new(|_| {
        Reply::new(
            503,
            r#"{"errors":[{"code":"UNAVAILABLE","message":"storage is down"}]}"#,
        )
    }));
    let reference: Reference = format!("{}/vm:v1", peer.addr).parse().unwrap();
    let client = Client::new(&reference, false, &options()).unwrap();
    let err = client.get_manifest(&reference).unwrap_err();
    assert!(
        matches!(err, RegistryError::Status { status: 503, .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains("UNAVAILABLE storage is down"),
        "{err}"
    );
    assert_eq!(peer.log().len(), oci::registry::ATTEMPTS as usize);
}

#[test]
fn a_manifest_larger_than_the_bound_is_refused() {
    let peer = Peer::start(Box::new(|_| Reply::new(200, vec![b' '; 5 << 20])));
    let reference: Reference = format!("{}/vm:v1", peer.addr).parse().unwrap();
    let client = Client::new(&reference, false, &options()).unwrap();
    let err = client.get_manifest(&reference).unwrap_err().to_string();
    assert!(err.contains("more than 4194304 bytes"), "{err}");
}
