//! virtio-fs's FUSE server and virtio-vsock's packet path.
//!
//! `fuse_request`: the input is a sequence of FUSE requests (each as long
//! as the first 4 bytes of what is left say, cut at the input's end), each
//! preceded by a byte choosing the reply room, served by one share's
//! server. Every reply must frame itself correctly and fit the room, and
//! afterwards nothing beside the share may have changed.
//!
//! `vsock_packet`: the vsock device driven through the generic virtqueue
//! rig (guest packets written into its transmit ring), with a header
//! round trip on the first bytes.

use std::path::PathBuf;
use std::sync::OnceLock;

use virtio::fs::fuse;
use virtio::fs::Server;
use virtio::vsock::packet::{Header, HDR_LEN};
use virtio::vsock::VirtioVsock;

use crate::input::{self, Input};
use crate::Report;

/// The share (`share/`) and a sentinel beside it (`outside`), per process.
fn dirs() -> &'static (PathBuf, PathBuf) {
    static DIRS: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    DIRS.get_or_init(|| {
        let base = std::env::temp_dir().join(format!("vmapple-fuzz-fs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(base.join("share/dir")).expect("scratch directory");
        std::fs::write(base.join("share/file"), b"inside").expect("scratch file");
        std::fs::write(base.join("outside"), b"outside").expect("sentinel");
        std::os::unix::fs::symlink("../outside", base.join("share/link")).expect("symlink");
        (base.join("share"), base)
    })
}

/// Serves the requests in `data`.
pub fn fuse_request(data: &[u8]) -> Report {
    let (share, base) = dirs();
    let mut server = Server::new(share, data.first().is_some_and(|b| b & 1 != 0)).expect("share");
    let mut report = Report::default();
    let mut rest = data.get(1..).unwrap_or_default();
    let mut reply = Vec::new();
    while rest.len() > 1 && report.ops < 256 {
        let room = usize::from(rest[0]) * 64 + 16;
        rest = &rest[1..];
        let want = rest.get(..4).map_or(rest.len(), |b| {
            u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize
        });
        let take = want.clamp(1, rest.len());
        let (request, tail) = rest.split_at(take);
        rest = tail;
        report.ops += 1;
        if server.handle(request, room, &mut reply) {
            let len = u32::from_le_bytes(reply[0..4].try_into().expect("header")) as usize;
            assert_eq!(len, reply.len(), "reply framing");
            assert!(
                reply.len() <= room.max(fuse::OUT_HEADER_LEN),
                "{}-byte reply for {room} bytes of room",
                reply.len()
            );
            let error = i32::from_le_bytes(reply[4..8].try_into().expect("header"));
            assert!(error <= 0 && error > -4096, "error {error}");
            if error == 0 {
                report.completions += 1;
            }
        }
    }
    assert_eq!(
        std::fs::read(base.join("outside")).expect("sentinel"),
        b"outside"
    );
    let mut names: Vec<_> = std::fs::read_dir(base)
        .expect("base")
        .map(|e| e.expect("entry").file_name())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["outside", "share"],
        "something appeared beside the share"
    );
    report
}

/// The vsock device's transmit path with guest-written packets.
pub fn vsock_packet(data: &[u8]) -> Report {
    if let Some(h) = data.get(..HDR_LEN).and_then(Header::parse) {
        assert_eq!(Header::parse(&h.encode()), Some(h));
    }
    let mut input = Input::new(data);
    let mem = input::guest_memory(&mut input);
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!(
        "vmapple-fuzz-vsock-{}-{n}.sock",
        std::process::id()
    ));
    let mut dev = VirtioVsock::new(path, 3).expect("socket");
    let report = crate::virtio::run_device(&mut input, mem, &mut dev);
    drop(dev);
    report
}
