//! The FUSE server against raw requests, as a hostile guest would send
//! them (past what a kernel's VFS would ever let through), and the device
//! over a virtqueue.

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::fuse::{self, opcode, Put};
use super::server::{Server, ROOT_ID};
use super::*;

const EINVAL: i32 = -22;
const EPERM: i32 = -1;
const ELOOP: i32 = -40;
const EROFS: i32 = -30;
const ENOENT: i32 = -2;
const EBADF: i32 = -9;
const ESTALE: i32 = -116;

struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("vmapple-fs-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(p.join("share")).unwrap();
        std::fs::create_dir_all(p.join("outside")).unwrap();
        std::fs::write(p.join("outside/secret"), "secret").unwrap();
        Dir(p)
    }
    fn share(&self) -> PathBuf {
        self.0.join("share")
    }
    fn outside(&self) -> PathBuf {
        self.0.join("outside")
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn request(opcode: u32, nodeid: u64, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.put_u32((fuse::IN_HEADER_LEN + body.len()) as u32);
    v.put_u32(opcode);
    v.put_u64(99);
    v.put_u64(nodeid);
    v.extend_from_slice(&[0; 16]);
    v.extend_from_slice(body);
    v
}

/// Sends a request; returns (error, body).
fn call(s: &mut Server, opcode: u32, nodeid: u64, body: &[u8]) -> (i32, Vec<u8>) {
    let mut reply = Vec::new();
    assert!(s.handle(&request(opcode, nodeid, body), 2 << 20, &mut reply));
    let len = u32::from_le_bytes(reply[0..4].try_into().unwrap()) as usize;
    assert_eq!(len, reply.len());
    let err = i32::from_le_bytes(reply[4..8].try_into().unwrap());
    assert_eq!(u64::from_le_bytes(reply[8..16].try_into().unwrap()), 99);
    (err, reply[16..].to_vec())
}

fn cstr(name: &str) -> Vec<u8> {
    let mut v = name.as_bytes().to_vec();
    v.push(0);
    v
}

fn lookup(s: &mut Server, parent: u64, name: &str) -> Result<u64, i32> {
    match call(s, opcode::LOOKUP, parent, &cstr(name)) {
        (0, body) => Ok(u64::from_le_bytes(body[0..8].try_into().unwrap())),
        (e, _) => Err(e),
    }
}

fn open(s: &mut Server, node: u64, flags: u32) -> Result<u64, i32> {
    let mut b = Vec::new();
    b.put_u32(flags);
    b.put_u32(0);
    match call(s, opcode::OPEN, node, &b) {
        (0, body) => Ok(u64::from_le_bytes(body[0..8].try_into().unwrap())),
        (e, _) => Err(e),
    }
}

fn read(s: &mut Server, node: u64, fh: u64, offset: u64, size: u32) -> (i32, Vec<u8>) {
    let mut b = Vec::new();
    b.put_u64(fh);
    b.put_u64(offset);
    b.put_u32(size);
    b.extend_from_slice(&[0; 20]);
    call(s, opcode::READ, node, &b)
}

fn create(s: &mut Server, parent: u64, name: &str, mode: u32) -> (i32, Vec<u8>) {
    let mut b = Vec::new();
    b.put_u32(0o1 | 0o100); // O_WRONLY | O_CREAT
    b.put_u32(mode);
    b.put_u32(0);
    b.put_u32(0);
    b.extend_from_slice(&cstr(name));
    call(s, opcode::CREATE, parent, &b)
}

fn mknod(s: &mut Server, name: &str, mode: u32) -> i32 {
    let mut b = Vec::new();
    b.put_u32(mode);
    b.put_u32(0x0103);
    b.put_u32(0);
    b.put_u32(0);
    b.extend_from_slice(&cstr(name));
    call(s, opcode::MKNOD, ROOT_ID, &b).0
}

#[test]
fn names_that_leave_the_directory_are_refused() {
    let d = Dir::new("names");
    let mut s = Server::new(&d.share(), false).unwrap();
    assert_eq!(lookup(&mut s, ROOT_ID, ".."), Err(EINVAL));
    assert_eq!(lookup(&mut s, ROOT_ID, "."), Err(EINVAL));
    assert_eq!(lookup(&mut s, ROOT_ID, "../outside/secret"), Err(EINVAL));
    assert_eq!(lookup(&mut s, ROOT_ID, "/etc"), Err(EINVAL));
    assert_eq!(create(&mut s, ROOT_ID, "../outside/new", 0o644).0, EINVAL);
    assert!(!d.outside().join("new").exists());
}

#[test]
fn symlinks_pointing_out_are_never_followed() {
    let d = Dir::new("symlinks");
    std::os::unix::fs::symlink(d.outside().join("secret"), d.share().join("abs")).unwrap();
    std::os::unix::fs::symlink("../outside/secret", d.share().join("rel")).unwrap();
    std::os::unix::fs::symlink(d.outside(), d.share().join("dirlink")).unwrap();
    let mut s = Server::new(&d.share(), false).unwrap();
    for name in ["abs", "rel"] {
        let node = lookup(&mut s, ROOT_ID, name).unwrap();
        assert_eq!(open(&mut s, node, 0), Err(ELOOP), "{name}");
    }
    // A symlink to a directory is a symlink node, never a directory to
    // create in.
    let node = lookup(&mut s, ROOT_ID, "dirlink").unwrap();
    assert_eq!(create(&mut s, node, "new", 0o644).0, -20); // ENOTDIR
    assert!(!d.outside().join("new").exists());
    // Creating over a symlink does not follow it.
    let mut b = Vec::new();
    b.put_u32(0o1 | 0o100 | 0o1000);
    b.put_u32(0o644);
    b.put_u32(0);
    b.put_u32(0);
    b.extend_from_slice(&cstr("abs"));
    assert_ne!(call(&mut s, opcode::CREATE, ROOT_ID, &b).0, 0);
    assert_eq!(
        std::fs::read_to_string(d.outside().join("secret")).unwrap(),
        "secret"
    );
}

#[test]
fn a_file_swapped_for_a_symlink_after_lookup_is_stale() {
    let d = Dir::new("swap");
    std::fs::write(d.share().join("f"), "inside").unwrap();
    std::fs::create_dir(d.share().join("sub")).unwrap();
    std::fs::write(d.share().join("sub/g"), "inside").unwrap();
    let mut s = Server::new(&d.share(), false).unwrap();
    let f = lookup(&mut s, ROOT_ID, "f").unwrap();
    let sub = lookup(&mut s, ROOT_ID, "sub").unwrap();
    std::fs::remove_file(d.share().join("f")).unwrap();
    std::os::unix::fs::symlink(d.outside().join("secret"), d.share().join("f")).unwrap();
    assert_eq!(open(&mut s, f, 0), Err(ELOOP));
    assert_eq!(call(&mut s, opcode::GETATTR, f, &[0; 16]).0, ESTALE);
    // The directory node keeps its descriptor: after a swap it still
    // means the directory that was looked up, wherever it went.
    std::fs::rename(d.share().join("sub"), d.share().join("moved")).unwrap();
    std::os::unix::fs::symlink(d.outside(), d.share().join("sub")).unwrap();
    let g = lookup(&mut s, sub, "g").unwrap();
    let fh = open(&mut s, g, 0).unwrap();
    assert_eq!(read(&mut s, g, fh, 0, 100).1, b"inside");
    assert_eq!(lookup(&mut s, sub, "secret"), Err(ENOENT));
}

#[test]
fn hard_links_are_made_only_from_nodes_inside() {
    let d = Dir::new("links");
    std::fs::create_dir(d.share().join("d")).unwrap();
    let mut s = Server::new(&d.share(), false).unwrap();
    let dnode = lookup(&mut s, ROOT_ID, "d").unwrap();
    let mut b = Vec::new();
    b.put_u64(dnode);
    b.extend_from_slice(&cstr("dirlink"));
    assert_eq!(call(&mut s, opcode::LINK, ROOT_ID, &b).0, EPERM);
    let mut b = Vec::new();
    b.put_u64(12345);
    b.extend_from_slice(&cstr("x"));
    assert_eq!(call(&mut s, opcode::LINK, ROOT_ID, &b).0, ENOENT);
}

#[test]
fn no_device_nodes_and_no_setuid() {
    let d = Dir::new("devices");
    let mut s = Server::new(&d.share(), false).unwrap();
    assert_eq!(mknod(&mut s, "chr", 0o020666), EPERM);
    assert_eq!(mknod(&mut s, "blk", 0o060666), EPERM);
    assert_eq!(mknod(&mut s, "sock", 0o140666), EPERM);
    assert_eq!(mknod(&mut s, "fifo", 0o010644), 0);
    assert!(std::fs::symlink_metadata(d.share().join("fifo"))
        .unwrap()
        .file_type()
        .is_fifo());
    assert_eq!(mknod(&mut s, "reg", 0o106755), 0);
    let m = std::fs::metadata(d.share().join("reg")).unwrap();
    assert_eq!(m.permissions().mode() & 0o6000, 0);
    // Opening the FIFO through the server does not block.
    let fifo = lookup(&mut s, ROOT_ID, "fifo").unwrap();
    assert_eq!(open(&mut s, fifo, 0), Err(EINVAL));
    // SETATTR cannot add the bits back, nor give the file away.
    let reg = lookup(&mut s, ROOT_ID, "reg").unwrap();
    let mut sa = vec![0u8; 88];
    sa[0..4].copy_from_slice(&fuse::fattr::MODE.to_le_bytes());
    sa[68..72].copy_from_slice(&0o106777u32.to_le_bytes());
    assert_eq!(call(&mut s, opcode::SETATTR, reg, &sa).0, 0);
    let m = std::fs::metadata(d.share().join("reg")).unwrap();
    assert_eq!(m.permissions().mode() & 0o7777, 0o777);
    let mut sa = vec![0u8; 88];
    sa[0..4].copy_from_slice(&fuse::fattr::UID.to_le_bytes());
    sa[76..80].copy_from_slice(&(m.uid() + 1).to_le_bytes());
    assert_eq!(call(&mut s, opcode::SETATTR, reg, &sa).0, EPERM);
    // Only user. attributes may be set.
    let mut b = Vec::new();
    b.put_u32(1);
    b.put_u32(0);
    b.extend_from_slice(b"security.capability\0x");
    assert_eq!(call(&mut s, opcode::SETXATTR, reg, &b).0, EPERM);
}

#[test]
fn unknown_nodes_and_handles_are_errors_and_forget_storms_are_harmless() {
    let d = Dir::new("stale");
    std::fs::write(d.share().join("f"), "x").unwrap();
    let mut s = Server::new(&d.share(), false).unwrap();
    assert_eq!(call(&mut s, opcode::GETATTR, 777, &[0; 16]).0, ENOENT);
    assert_eq!(read(&mut s, ROOT_ID, 555, 0, 10).0, EBADF);
    let f = lookup(&mut s, ROOT_ID, "f").unwrap();
    let fh = open(&mut s, f, 0).unwrap();
    // Absurd sizes and offsets.
    let (e, body) = read(&mut s, f, fh, 0, u32::MAX);
    assert_eq!((e, body.len()), (0, 1));
    assert_eq!(read(&mut s, f, fh, u64::MAX, 10).0, EINVAL);
    // A storm of forgets, of known and unknown nodes, many times over.
    let mut b = Vec::new();
    b.put_u32(100_000);
    b.put_u32(0);
    for i in 0..100_000u64 {
        b.put_u64(if i % 2 == 0 { f } else { i + 1000 });
        b.put_u64(u64::MAX);
    }
    let mut reply = Vec::new();
    assert!(!s.handle(&request(opcode::BATCH_FORGET, 0, &b), 1 << 20, &mut reply));
    assert!(!s.handle(
        &request(opcode::FORGET, ROOT_ID, &u64::MAX.to_le_bytes()),
        1 << 20,
        &mut reply
    ));
    assert_eq!(s.node_count(), 1, "only the root is left, and it stays");
    assert_eq!(call(&mut s, opcode::GETATTR, f, &[0; 16]).0, ENOENT);
    assert_eq!(call(&mut s, opcode::GETATTR, ROOT_ID, &[0; 16]).0, 0);
    // The handle outlives the node.
    assert_eq!(read(&mut s, f, fh, 0, 10).1, b"x");
}

#[test]
fn a_read_only_share_refuses_every_change() {
    let d = Dir::new("ro");
    std::fs::write(d.share().join("f"), "x").unwrap();
    let mut s = Server::new(&d.share(), true).unwrap();
    let f = lookup(&mut s, ROOT_ID, "f").unwrap();
    assert_eq!(open(&mut s, f, 1), Err(EROFS));
    assert_eq!(open(&mut s, f, 0o1000), Err(EROFS));
    assert_eq!(create(&mut s, ROOT_ID, "n", 0o644).0, EROFS);
    assert_eq!(mknod(&mut s, "n", 0o100644), EROFS);
    assert_eq!(call(&mut s, opcode::UNLINK, ROOT_ID, &cstr("f")).0, EROFS);
    let mut b = Vec::new();
    b.put_u32(0o755);
    b.put_u32(0);
    b.extend_from_slice(&cstr("d"));
    assert_eq!(call(&mut s, opcode::MKDIR, ROOT_ID, &b).0, EROFS);
    assert_eq!(call(&mut s, opcode::SETATTR, f, &[0; 88]).0, EROFS);
    let fh = open(&mut s, f, 0).unwrap();
    let mut w = Vec::new();
    w.put_u64(fh);
    w.put_u64(0);
    w.put_u32(1);
    w.extend_from_slice(&[0; 20]);
    w.push(b'y');
    assert_eq!(call(&mut s, opcode::WRITE, f, &w).0, EROFS);
    assert_eq!(std::fs::read_to_string(d.share().join("f")).unwrap(), "x");
    assert_eq!(std::fs::read_dir(d.share()).unwrap().count(), 1);
}

#[test]
fn malformed_requests_get_einval_or_nothing() {
    let d = Dir::new("malformed");
    let mut s = Server::new(&d.share(), false).unwrap();
    let mut reply = Vec::new();
    assert!(!s.handle(&[1, 2, 3], 100, &mut reply));
    let mut r = request(opcode::LOOKUP, ROOT_ID, b"no-nul");
    assert!(s.handle(&r, 100, &mut reply));
    assert_eq!(i32::from_le_bytes(reply[4..8].try_into().unwrap()), EINVAL);
    r[0] = 0xff;
    assert!(s.handle(&r, 100, &mut reply));
    // A reply that does not fit the guest's buffer is not written past it.
    std::fs::write(d.share().join("f"), vec![1u8; 4096]).unwrap();
    let f = lookup(&mut s, ROOT_ID, "f").unwrap();
    let fh = open(&mut s, f, 0).unwrap();
    let mut b = Vec::new();
    b.put_u64(fh);
    b.put_u64(0);
    b.put_u32(4096);
    b.extend_from_slice(&[0; 20]);
    assert!(s.handle(&request(opcode::READ, f, &b), 16 + 100, &mut reply));
    assert_eq!(reply.len(), 116);
}

#[test]
fn missing_or_non_directory_shares_are_clear_errors() {
    let d = Dir::new("errors");
    let e = Server::new(&d.0.join("nope"), false)
        .err()
        .unwrap()
        .to_string();
    assert!(e.ends_with("nope: no such directory"), "{e}");
    let e = Server::new(&d.outside().join("secret"), false)
        .err()
        .unwrap()
        .to_string();
    assert!(e.ends_with("secret: not a directory"), "{e}");
}

fn file_count(p: &Path) -> usize {
    std::fs::read_dir(p).unwrap().count()
}

#[test]
fn readdirplus_lists_every_entry_across_calls() {
    let d = Dir::new("readdir");
    for i in 0..300 {
        std::fs::write(d.share().join(format!("file-with-a-longish-name-{i}")), "").unwrap();
    }
    assert_eq!(file_count(&d.share()), 300);
    let mut s = Server::new(&d.share(), false).unwrap();
    let mut b = Vec::new();
    b.put_u32(0);
    b.put_u32(0);
    let (e, body) = call(&mut s, opcode::OPENDIR, ROOT_ID, &b);
    assert_eq!(e, 0);
    let fh = u64::from_le_bytes(body[0..8].try_into().unwrap());
    let mut names = Vec::new();
    let mut offset = 0u64;
    loop {
        let mut b = Vec::new();
        b.put_u64(fh);
        b.put_u64(offset);
        b.put_u32(4096);
        b.extend_from_slice(&[0; 20]);
        let (e, body) = call(&mut s, opcode::READDIRPLUS, ROOT_ID, &b);
        assert_eq!(e, 0);
        if body.is_empty() {
            break;
        }
        let mut at = 0;
        while at < body.len() {
            let d = at + fuse::ENTRY_OUT_LEN;
            let off = u64::from_le_bytes(body[d + 8..d + 16].try_into().unwrap());
            let len = u32::from_le_bytes(body[d + 16..d + 20].try_into().unwrap()) as usize;
            names.push(String::from_utf8(body[d + 24..d + 24 + len].to_vec()).unwrap());
            offset = off;
            at = d + (24 + len).next_multiple_of(8);
        }
    }
    names.sort();
    assert_eq!(names.len(), 302);
    assert_eq!(&names[..2], [".", ".."]);
    assert_eq!(s.node_count(), 301);
}

#[test]
fn the_device_serves_a_request_from_its_queue() {
    use crate::block::test_driver::{TestInterrupt, TestQueue};
    let d = Dir::new("device");
    std::fs::write(d.share().join("hello"), "hi").unwrap();
    let mut dev = VirtioFs::new("tag", d.share(), false).unwrap();
    let mut cfg = [0u8; 40];
    dev.read_config(0, &mut cfg);
    assert_eq!(&cfg[..4], b"tag\0");
    assert_eq!(u32::from_le_bytes(cfg[36..].try_into().unwrap()), 1);
    let mem = vm_core::memory::create_guest_memory(&[(0, 0x100000)]).unwrap();
    let hi = TestQueue::new(&mem, 0x1000, 16);
    let mut rq = TestQueue::new(&mem, 0x4000, 16);
    let irq = Arc::new(TestInterrupt::default());
    dev.activate(ActivateContext {
        memory: mem.clone(),
        queues: vec![hi.queue(), rq.queue()],
        acked_features: VIRTIO_F_VERSION_1,
        interrupt: irq.clone(),
    })
    .unwrap();
    let req = request(opcode::LOOKUP, ROOT_ID, b"hello\0");
    vm_core::memory::write_all(&mem, 0x10000, &req).unwrap();
    rq.add_chain(&[(0x10000, req.len() as u32, false), (0x20000, 4096, true)]);
    dev.queue_notify(REQUEST_QUEUE);
    let t = std::time::Instant::now();
    while rq.used_idx() == 0 && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let (_, len) = rq.used_elem(0);
    assert_eq!(len as usize, fuse::OUT_HEADER_LEN + fuse::ENTRY_OUT_LEN);
    let mut out = [0u8; 16];
    vm_core::memory::read_exact(&mem, 0x20000, &mut out).unwrap();
    assert_eq!(i32::from_le_bytes(out[4..8].try_into().unwrap()), 0);
    assert_eq!(irq.queues.lock().unwrap().as_slice(), [REQUEST_QUEUE]);
    dev.reset();
}
