//! The FUSE server of virtio-fs: answers the guest's requests from one
//! host directory, never from anywhere else.
//!
//! # How nodes are reached
//!
//! A directory node holds an open descriptor of the directory. Any other
//! node (file, symlink, FIFO) is its parent directory's node and its name:
//! each operation opens or stats that one name relative to the parent's
//! descriptor without following a symlink (see [`super::host`]), then
//! checks the object is still the one the guest looked up (device and
//! inode numbers), answering ESTALE if not. Names from the guest are one
//! component: never empty, `.`, `..` or containing `/`. So neither `..`,
//! nor a symlink (absolute or relative), nor something swapped in under a
//! name the guest looked up can lead outside the share; a file reached
//! only through a descriptor stays reachable after a rename without a path
//! ever being resolved.
//!
//! Requests are served one at a time by the device's worker thread, so a
//! guest cannot race its own requests against each other.
//!
//! # What the guest cannot do
//!
//! Create device nodes (MKNOD makes regular files and FIFOs only), set the
//! setuid or setgid bit (stripped from every mode), give files away
//! (owners stay the host user running vmapple; a chown to anyone else is
//! EPERM), set extended attributes outside the `user.` namespace (file
//! capabilities and `trusted.` attributes stay the host's), open anything
//! but regular files and directories, or exhaust memory or descriptors:
//! nodes, handles, directory listings, reads and writes are all bounded.
//! Unknown node ids and file handles are errors; FORGET of an unknown
//! node is ignored. A read-only share answers every change with EROFS.

// `struct stat`'s field types differ between Linux and macOS, so the
// casts that widen them are needed on one host and not on the other.
#![allow(clippy::unnecessary_cast)]

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, Stat, Timespec, Timestamps};
use rustix::io::Errno;

use super::fuse::{self, encode_dirent, encode_entry, fattr, init_flag, Attr, Op, Put};
use super::host;

/// Node id of the share's root (FUSE_ROOT_ID).
pub const ROOT_ID: u64 = 1;
/// Largest WRITE the server accepts (and tells the driver at INIT).
pub const MAX_WRITE: u32 = 1 << 20;
/// Largest READ it answers.
pub const MAX_READ: u32 = 1 << 20;
/// Nodes the guest may hold at once (looked up and not forgotten).
pub const MAX_NODES: usize = 1 << 20;
/// Directory nodes among them: each holds a host descriptor.
pub const MAX_DIR_NODES: usize = 1 << 15;
/// Open files and directories at once.
pub const MAX_HANDLES: usize = 1 << 14;
/// Entries of one directory listing kept; a larger directory lists only
/// this many.
pub const MAX_DIR_ENTRIES: usize = 1 << 20;
/// Largest extended attribute value or list.
pub const MAX_XATTR: usize = 64 << 10;
/// Seconds the guest may cache names and attributes.
const VALID_SECS: u64 = 1;

enum Kind {
    Dir(OwnedFd),
    Other,
}

struct Node {
    dev: u64,
    ino: u64,
    /// `st_mode`'s type bits: a freed inode number may come back as
    /// another kind of object.
    format: u32,
    kind: Kind,
    /// The directory node and the name the node was last seen under (the
    /// root's are its own id and an empty name).
    parent: u64,
    name: CString,
    lookups: u64,
}

struct DirEntry {
    ino: u64,
    typ: u32,
    name: Vec<u8>,
}

enum Handle {
    File {
        fd: OwnedFd,
        append: bool,
    },
    Dir {
        node: u64,
        fd: OwnedFd,
        entries: Vec<DirEntry>,
    },
}

/// One share's server.
pub struct Server {
    read_only: bool,
    nodes: HashMap<u64, Node>,
    by_inode: HashMap<(u64, u64), u64>,
    next_node: u64,
    handles: HashMap<u64, Handle>,
    next_handle: u64,
    dir_nodes: usize,
    uid: u32,
    gid: u32,
}

type R<T> = Result<T, Errno>;

/// Why a share cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    #[error("{}: no such directory", .0.display())]
    Missing(std::path::PathBuf),
    #[error("{}: not a directory", .0.display())]
    NotDirectory(std::path::PathBuf),
    #[error("{}", .path.display())]
    Open {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn mode_bits(mode: u32) -> Mode {
    // No setuid/setgid, ever; the sticky bit is harmless.
    Mode::from_raw_mode((mode & 0o1777) as _)
}

/// `S_IFMT` (the same on Linux and macOS).
const FORMAT: u32 = 0o170000;

fn dev_ino(st: &Stat) -> (u64, u64) {
    (st.st_dev as u64, st.st_ino as u64)
}

fn file_type(st: &Stat) -> FileType {
    FileType::from_raw_mode(st.st_mode as _)
}

fn attr(st: &Stat) -> Attr {
    Attr {
        ino: st.st_ino as u64,
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: st.st_atime as u64,
        mtime: st.st_mtime as u64,
        ctime: st.st_ctime as u64,
        atimensec: st.st_atime_nsec as u32,
        mtimensec: st.st_mtime_nsec as u32,
        ctimensec: st.st_ctime_nsec as u32,
        mode: st.st_mode as u32,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: 0,
        blksize: st.st_blksize as u32,
    }
}

/// `d_type` of a file type (the same numbers on Linux and macOS).
fn dirent_type(t: FileType) -> u32 {
    match t {
        FileType::Fifo => 1,
        FileType::CharacterDevice => 2,
        FileType::Directory => 4,
        FileType::BlockDevice => 6,
        FileType::RegularFile => 8,
        FileType::Symlink => 10,
        FileType::Socket => 12,
        _ => 0,
    }
}

/// A guest name as one path component, or EINVAL.
fn component(name: &[u8]) -> R<CString> {
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') {
        return Err(Errno::INVAL);
    }
    if name.len() > 255 {
        return Err(Errno::NAMETOOLONG);
    }
    CString::new(name).map_err(|_| Errno::INVAL)
}

fn check_offset(offset: u64) -> R<u64> {
    if offset > i64::MAX as u64 {
        Err(Errno::INVAL)
    } else {
        Ok(offset)
    }
}

impl Server {
    /// Serves the directory `root`.
    pub fn new(root: &Path, read_only: bool) -> Result<Self, ShareError> {
        let meta = std::fs::metadata(root).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                ShareError::Missing(root.to_path_buf())
            } else {
                ShareError::Open {
                    path: root.to_path_buf(),
                    source,
                }
            }
        })?;
        if !meta.is_dir() {
            return Err(ShareError::NotDirectory(root.to_path_buf()));
        }
        let open = |source: Errno| ShareError::Open {
            path: root.to_path_buf(),
            source: source.into(),
        };
        let fd = rustix::fs::open(
            root,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(open)?;
        let st = rustix::fs::fstat(&fd).map_err(open)?;
        host::raise_fd_limit((MAX_DIR_NODES + MAX_HANDLES + 1024) as u64);
        let mut s = Server {
            read_only,
            nodes: HashMap::new(),
            by_inode: HashMap::new(),
            next_node: ROOT_ID + 1,
            handles: HashMap::new(),
            next_handle: 1,
            dir_nodes: 1,
            uid: rustix::process::geteuid().as_raw(),
            gid: rustix::process::getegid().as_raw(),
        };
        s.by_inode.insert(dev_ino(&st), ROOT_ID);
        s.nodes.insert(
            ROOT_ID,
            Node {
                dev: st.st_dev as u64,
                ino: st.st_ino as u64,
                format: st.st_mode as u32 & FORMAT,
                kind: Kind::Dir(fd),
                parent: ROOT_ID,
                name: CString::default(),
                lookups: 1,
            },
        );
        Ok(s)
    }

    /// Nodes currently known (for tests and logs).
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// Answers one request (the device-readable bytes of a chain) into
    /// `reply`, using at most `room` bytes; returns false when the request
    /// takes no reply.
    pub fn handle(&mut self, request: &[u8], room: usize, reply: &mut Vec<u8>) -> bool {
        reply.clear();
        let (header, op) = match fuse::parse(request) {
            Ok(parsed) => parsed,
            Err(e) => {
                vm_core::guest_error!("virtio-fs: malformed request: {e:?}");
                let Some(h) = fuse::parse_header(request) else {
                    return false;
                };
                if fuse::is_one_way(h.opcode) {
                    return false;
                }
                *reply = fuse::reply(h.unique, -(libc::EINVAL), &[]);
                return true;
            }
        };
        if fuse::is_one_way(header.opcode) {
            self.one_way(header.nodeid, &op);
            return false;
        }
        let room = room.saturating_sub(fuse::OUT_HEADER_LEN);
        let mut body = Vec::new();
        let error = match self.dispatch(header.nodeid, op, room, &mut body) {
            Ok(()) if body.len() <= room => 0,
            Ok(()) => {
                vm_core::guest_error!(
                    "virtio-fs: reply of {} bytes does not fit the guest's {room}-byte buffer",
                    body.len()
                );
                body.clear();
                -(libc::EOVERFLOW)
            }
            Err(e) => {
                body.clear();
                -host::linux_errno(e)
            }
        };
        *reply = fuse::reply(header.unique, error, &body);
        true
    }

    fn one_way(&mut self, nodeid: u64, op: &Op) {
        match *op {
            Op::Forget { nlookup } => self.forget(nodeid, nlookup),
            Op::BatchForget { raw } => {
                for pair in raw.chunks_exact(16) {
                    let mut id = [0u8; 8];
                    let mut n = [0u8; 8];
                    id.copy_from_slice(&pair[..8]);
                    n.copy_from_slice(&pair[8..]);
                    self.forget(u64::from_le_bytes(id), u64::from_le_bytes(n));
                }
            }
            _ => {}
        }
    }

    fn forget(&mut self, id: u64, n: u64) {
        if id == ROOT_ID {
            return;
        }
        let Some(node) = self.nodes.get_mut(&id) else {
            return;
        };
        node.lookups = node.lookups.saturating_sub(n);
        if node.lookups == 0 {
            let node = self.nodes.remove(&id).expect("present");
            if self.by_inode.get(&(node.dev, node.ino)) == Some(&id) {
                self.by_inode.remove(&(node.dev, node.ino));
            }
            if matches!(node.kind, Kind::Dir(_)) {
                self.dir_nodes -= 1;
            }
        }
    }

    fn node(&self, id: u64) -> R<&Node> {
        self.nodes.get(&id).ok_or(Errno::NOENT)
    }

    fn dir_fd(&self, id: u64) -> R<BorrowedFd<'_>> {
        match &self.node(id)?.kind {
            Kind::Dir(fd) => Ok(fd.as_fd()),
            Kind::Other => Err(Errno::NOTDIR),
        }
    }

    /// The parent's descriptor and the name of a non-directory node.
    fn place(&self, id: u64) -> R<(BorrowedFd<'_>, &CStr)> {
        let node = self.node(id)?;
        let parent = self.dir_fd(node.parent).map_err(|_| Errno::STALE)?;
        Ok((parent, node.name.as_c_str()))
    }

    /// Whether `st` is still the object node `id` stands for.
    fn same(&self, id: u64, st: &Stat) -> R<()> {
        let node = self.node(id)?;
        if dev_ino(st) == (node.dev, node.ino) && st.st_mode as u32 & FORMAT == node.format {
            Ok(())
        } else {
            Err(Errno::STALE)
        }
    }

    fn stat_node(&self, id: u64) -> R<Stat> {
        let node = self.node(id)?;
        let st = match &node.kind {
            Kind::Dir(fd) => rustix::fs::fstat(fd)?,
            Kind::Other => {
                let (dir, name) = self.place(id)?;
                rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)?
            }
        };
        self.same(id, &st)?;
        Ok(st)
    }

    /// Opens a regular-file or directory node.
    fn open_node(&self, id: u64, flags: OFlags) -> R<OwnedFd> {
        let fd = match &self.node(id)?.kind {
            Kind::Dir(fd) => {
                host::open_beneath(fd, c".", flags | OFlags::DIRECTORY, Mode::empty())?
            }
            Kind::Other => {
                let (dir, name) = self.place(id)?;
                // NONBLOCK: a FIFO put in the file's place must not hang
                // the worker.
                host::open_beneath(dir, name, flags | OFlags::NONBLOCK, Mode::empty())?
            }
        };
        let st = rustix::fs::fstat(&fd)?;
        self.same(id, &st)?;
        match file_type(&st) {
            FileType::RegularFile | FileType::Directory => Ok(fd),
            _ => Err(Errno::INVAL),
        }
    }

    /// Looks `name` up in directory node `parent` and counts a lookup.
    fn lookup(&mut self, parent: u64, name: &[u8]) -> R<(u64, Stat)> {
        let name = component(name)?;
        let dir = self.dir_fd(parent)?;
        let st = rustix::fs::statat(dir, &name, AtFlags::SYMLINK_NOFOLLOW)?;
        let key = dev_ino(&st);
        let format = st.st_mode as u32 & FORMAT;
        if let Some(&id) = self
            .by_inode
            .get(&key)
            .filter(|id| self.nodes.get(id).is_some_and(|n| n.format == format))
        {
            let node = self.nodes.get_mut(&id).expect("indexed nodes exist");
            node.lookups += 1;
            if matches!(node.kind, Kind::Other) {
                node.parent = parent;
                node.name = name;
            }
            return Ok((id, st));
        }
        if self.nodes.len() >= MAX_NODES {
            return Err(Errno::NFILE);
        }
        let kind = if file_type(&st) == FileType::Directory {
            if self.dir_nodes >= MAX_DIR_NODES {
                return Err(Errno::NFILE);
            }
            let fd = host::open_beneath(
                dir,
                &name,
                OFlags::RDONLY | OFlags::DIRECTORY,
                Mode::empty(),
            )?;
            if dev_ino(&rustix::fs::fstat(&fd)?) != key {
                return Err(Errno::STALE);
            }
            self.dir_nodes += 1;
            Kind::Dir(fd)
        } else {
            Kind::Other
        };
        let id = self.next_node;
        self.next_node += 1;
        self.by_inode.insert(key, id);
        self.nodes.insert(
            id,
            Node {
                dev: key.0,
                ino: key.1,
                format: st.st_mode as u32 & FORMAT,
                kind,
                parent,
                name,
                lookups: 1,
            },
        );
        Ok((id, st))
    }

    fn entry(&mut self, parent: u64, name: &[u8], out: &mut Vec<u8>) -> R<()> {
        let (id, st) = self.lookup(parent, name)?;
        encode_entry(out, id, &attr(&st), VALID_SECS);
        Ok(())
    }

    fn writable(&self) -> R<()> {
        if self.read_only {
            Err(Errno::ROFS)
        } else {
            Ok(())
        }
    }

    fn add_handle(&mut self, h: Handle) -> R<u64> {
        if self.handles.len() >= MAX_HANDLES {
            return Err(Errno::MFILE);
        }
        let fh = self.next_handle;
        self.next_handle += 1;
        self.handles.insert(fh, h);
        Ok(fh)
    }

    fn file(&self, fh: u64) -> R<(BorrowedFd<'_>, bool)> {
        match self.handles.get(&fh) {
            Some(Handle::File { fd, append }) => Ok((fd.as_fd(), *append)),
            Some(Handle::Dir { .. }) => Err(Errno::ISDIR),
            None => Err(Errno::BADF),
        }
    }

    /// A descriptor for extended-attribute calls on a node.
    fn xattr_fd(&self, id: u64) -> R<OwnedFd> {
        self.open_node(id, OFlags::RDONLY).map_err(|e| match e {
            Errno::LOOP | Errno::INVAL => Errno::PERM,
            e => e,
        })
    }

    /// Renames the node known as `old` in `olddir` (and, for an exchange,
    /// the one known as `new` in `newdir`).
    fn renamed(&mut self, olddir: u64, old: &CStr, newdir: u64, new: &CStr, exchange: bool) {
        for node in self.nodes.values_mut() {
            if matches!(node.kind, Kind::Dir(_)) {
                continue;
            }
            if node.parent == olddir && node.name.as_c_str() == old {
                node.parent = newdir;
                node.name = new.to_owned();
            } else if exchange && node.parent == newdir && node.name.as_c_str() == new {
                node.parent = olddir;
                node.name = old.to_owned();
            }
        }
    }

    fn dispatch(&mut self, nodeid: u64, op: Op, room: usize, out: &mut Vec<u8>) -> R<()> {
        match op {
            Op::Init {
                major,
                minor,
                max_readahead,
                flags,
            } => {
                if major < fuse::KERNEL_VERSION {
                    return Err(Errno::PROTO);
                }
                let minor = minor.min(fuse::KERNEL_MINOR_VERSION);
                let ours = init_flag::ASYNC_READ
                    | init_flag::ATOMIC_O_TRUNC
                    | init_flag::BIG_WRITES
                    | init_flag::DO_READDIRPLUS
                    | init_flag::READDIRPLUS_AUTO
                    | init_flag::PARALLEL_DIROPS
                    | init_flag::MAX_PAGES;
                out.put_u32(fuse::KERNEL_VERSION);
                out.put_u32(minor);
                out.put_u32(max_readahead);
                out.put_u32(flags & ours);
                out.extend_from_slice(&64u16.to_le_bytes()); // max_background
                out.extend_from_slice(&48u16.to_le_bytes()); // congestion_threshold
                out.put_u32(MAX_WRITE);
                out.put_u32(1); // time_gran: nanoseconds
                if minor >= 23 {
                    out.extend_from_slice(&((MAX_WRITE / 4096) as u16).to_le_bytes());
                    out.extend_from_slice(&0u16.to_le_bytes()); // map_alignment
                    out.extend_from_slice(&[0; 32]); // flags2, unused
                }
                Ok(())
            }
            Op::Destroy => {
                self.handles.clear();
                self.nodes.retain(|&id, _| id == ROOT_ID);
                self.by_inode.retain(|_, id| *id == ROOT_ID);
                self.dir_nodes = 1;
                Ok(())
            }
            Op::Lookup { name } => self.entry(nodeid, name, out),
            Op::Forget { .. } | Op::BatchForget { .. } | Op::Interrupt => Ok(()),
            Op::GetAttr { flags, fh } => {
                let st = if flags & fuse::GETATTR_FH != 0 && self.handles.contains_key(&fh) {
                    match &self.handles[&fh] {
                        Handle::File { fd, .. } | Handle::Dir { fd, .. } => rustix::fs::fstat(fd)?,
                    }
                } else {
                    self.stat_node(nodeid)?
                };
                out.put_u64(VALID_SECS);
                out.put_u32(0);
                out.put_u32(0);
                attr(&st).encode(out);
                Ok(())
            }
            Op::SetAttr(sa) => self.setattr(nodeid, sa, out),
            Op::ReadLink => {
                let st = self.stat_node(nodeid)?;
                if file_type(&st) != FileType::Symlink {
                    return Err(Errno::INVAL);
                }
                let (dir, name) = self.place(nodeid)?;
                let target = rustix::fs::readlinkat(dir, name, Vec::new())?;
                out.extend_from_slice(target.as_bytes());
                Ok(())
            }
            Op::Symlink { name, target } => {
                self.writable()?;
                let cname = component(name)?;
                if target.is_empty() || target.len() >= 4096 {
                    return Err(Errno::INVAL);
                }
                let target = CString::new(target).map_err(|_| Errno::INVAL)?;
                rustix::fs::symlinkat(&target, self.dir_fd(nodeid)?, &cname)?;
                self.entry(nodeid, name, out)
            }
            Op::Mknod {
                name, mode, umask, ..
            } => {
                self.writable()?;
                let cname = component(name)?;
                let perm = mode_bits(mode & !umask);
                let dir = self.dir_fd(nodeid)?;
                match FileType::from_raw_mode(mode as _) {
                    FileType::RegularFile => {
                        host::open_beneath(
                            dir,
                            &cname,
                            OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY,
                            perm,
                        )?;
                    }
                    FileType::Fifo => host::mkfifo_at(dir, &cname, perm)?,
                    _ => return Err(Errno::PERM),
                }
                self.entry(nodeid, name, out)
            }
            Op::Mkdir { name, mode, umask } => {
                self.writable()?;
                let cname = component(name)?;
                rustix::fs::mkdirat(self.dir_fd(nodeid)?, &cname, mode_bits(mode & !umask))?;
                self.entry(nodeid, name, out)
            }
            Op::Unlink { name } | Op::Rmdir { name } => {
                self.writable()?;
                let cname = component(name)?;
                let flags = if matches!(op, Op::Rmdir { .. }) {
                    AtFlags::REMOVEDIR
                } else {
                    AtFlags::empty()
                };
                rustix::fs::unlinkat(self.dir_fd(nodeid)?, &cname, flags)?;
                Ok(())
            }
            Op::Rename {
                newdir,
                flags,
                old,
                new,
            } => {
                self.writable()?;
                let old = component(old)?;
                let new = component(new)?;
                let host_flags = host::rename_flags(flags).ok_or(Errno::INVAL)?;
                let from = self.dir_fd(nodeid)?;
                let to = self.dir_fd(newdir)?;
                if host_flags.is_empty() {
                    rustix::fs::renameat(from, &old, to, &new)?;
                } else {
                    rustix::fs::renameat_with(from, &old, to, &new, host_flags)?;
                }
                self.renamed(nodeid, &old, newdir, &new, flags == 2);
                Ok(())
            }
            Op::Link { oldnodeid, name } => {
                self.writable()?;
                let cname = component(name)?;
                let st = self.stat_node(oldnodeid)?;
                if file_type(&st) == FileType::Directory {
                    return Err(Errno::PERM);
                }
                let (odir, oname) = self.place(oldnodeid)?;
                rustix::fs::linkat(odir, oname, self.dir_fd(nodeid)?, &cname, AtFlags::empty())?;
                self.entry(nodeid, name, out)
            }
            Op::Open { flags } => {
                if host::open_writes(flags) {
                    self.writable()?;
                }
                if matches!(self.node(nodeid)?.kind, Kind::Dir(_)) {
                    return Err(Errno::ISDIR);
                }
                let fd = self.open_node(nodeid, host::open_flags(flags))?;
                let append = flags & host::linux_open::APPEND != 0;
                let fh = self.add_handle(Handle::File { fd, append })?;
                out.put_u64(fh);
                out.put_u32(0);
                out.put_u32(0);
                Ok(())
            }
            Op::Read { fh, offset, size } => {
                let (fd, _) = self.file(fh)?;
                let offset = check_offset(offset)?;
                let size = (size.min(MAX_READ) as usize).min(room);
                out.resize(size, 0);
                let mut done = 0;
                while done < size {
                    match rustix::io::pread(fd, &mut out[done..], offset + done as u64) {
                        Ok(0) => break,
                        Ok(n) => done += n,
                        Err(Errno::INTR) => continue,
                        Err(e) if done == 0 => return Err(e),
                        Err(_) => break,
                    }
                }
                out.truncate(done);
                Ok(())
            }
            Op::Write { fh, offset, data } => {
                self.writable()?;
                if data.len() > MAX_WRITE as usize {
                    return Err(Errno::FBIG);
                }
                let (fd, append) = self.file(fh)?;
                let offset = check_offset(offset)?;
                offset
                    .checked_add(data.len() as u64)
                    .filter(|&e| e <= i64::MAX as u64)
                    .ok_or(Errno::FBIG)?;
                let n = if append {
                    rustix::io::write(fd, data)?
                } else {
                    rustix::io::pwrite(fd, data, offset)?
                };
                out.put_u32(n as u32);
                out.put_u32(0);
                Ok(())
            }
            Op::StatFs => {
                let s = rustix::fs::fstatvfs(self.dir_fd(ROOT_ID)?)?;
                for v in [s.f_blocks, s.f_bfree, s.f_bavail, s.f_files, s.f_ffree] {
                    out.put_u64(v);
                }
                out.put_u32(s.f_bsize as u32);
                out.put_u32(s.f_namemax as u32);
                out.put_u32(s.f_frsize as u32);
                out.put_u32(0);
                out.extend_from_slice(&[0; 24]);
                Ok(())
            }
            Op::Release { fh } | Op::ReleaseDir { fh } => {
                self.handles.remove(&fh);
                Ok(())
            }
            Op::Flush { fh } => self.file(fh).map(drop),
            Op::Fsync { fh, datasync } | Op::FsyncDir { fh, datasync } => {
                let fd = match self.handles.get(&fh) {
                    Some(Handle::File { fd, .. } | Handle::Dir { fd, .. }) => fd,
                    None => return Err(Errno::BADF),
                };
                sync(fd, datasync)
            }
            Op::SetXattr { name, value, flags } => {
                self.writable()?;
                let name = xattr_name(name)?;
                if value.len() > MAX_XATTR {
                    return Err(Errno::TOOBIG);
                }
                let flags = rustix::fs::XattrFlags::from_bits(flags & 3)
                    .unwrap_or(rustix::fs::XattrFlags::empty());
                rustix::fs::fsetxattr(self.xattr_fd(nodeid)?, &name, value, flags)
            }
            Op::RemoveXattr { name } => {
                self.writable()?;
                let name = xattr_name(name)?;
                rustix::fs::fremovexattr(self.xattr_fd(nodeid)?, &name)
            }
            Op::GetXattr { name, size } => {
                let name = CString::new(name).map_err(|_| Errno::INVAL)?;
                let fd = self.xattr_fd(nodeid)?;
                xattr_reply(size, room, out, |buf| {
                    rustix::fs::fgetxattr(&fd, &name, buf)
                })
            }
            Op::ListXattr { size } => {
                let fd = self.xattr_fd(nodeid)?;
                xattr_reply(size, room, out, |buf| rustix::fs::flistxattr(&fd, buf))
            }
            Op::OpenDir { .. } => {
                if !matches!(self.node(nodeid)?.kind, Kind::Dir(_)) {
                    return Err(Errno::NOTDIR);
                }
                let fd = self.open_node(nodeid, OFlags::RDONLY)?;
                let fh = self.add_handle(Handle::Dir {
                    node: nodeid,
                    fd,
                    entries: Vec::new(),
                })?;
                out.put_u64(fh);
                out.put_u32(0);
                out.put_u32(0);
                Ok(())
            }
            Op::ReadDir {
                fh,
                offset,
                size,
                plus,
            } => self.readdir(
                fh,
                offset,
                (size.min(MAX_READ) as usize).min(room),
                plus,
                out,
            ),
            Op::Access { mask } => {
                if mask & 2 != 0 {
                    self.writable()?;
                }
                let st = self.stat_node(nodeid)?;
                let access = rustix::fs::Access::from_bits_truncate((mask & 7) as _);
                match &self.node(nodeid)?.kind {
                    Kind::Dir(fd) => rustix::fs::accessat(fd, c".", access, AtFlags::empty()),
                    // A symlink's own permissions mean nothing.
                    Kind::Other if file_type(&st) == FileType::Symlink => Ok(()),
                    Kind::Other => {
                        let (dir, name) = self.place(nodeid)?;
                        rustix::fs::accessat(dir, name, access, AtFlags::empty())
                    }
                }
            }
            Op::Create {
                name,
                flags,
                mode,
                umask,
            } => {
                self.writable()?;
                let cname = component(name)?;
                let mut oflags = host::open_flags(flags) | OFlags::CREATE | OFlags::NONBLOCK;
                if flags & 0o200 != 0 {
                    oflags |= OFlags::EXCL;
                }
                let fd = host::open_beneath(
                    self.dir_fd(nodeid)?,
                    &cname,
                    oflags,
                    mode_bits(mode & !umask),
                )?;
                let st = rustix::fs::fstat(&fd)?;
                if file_type(&st) != FileType::RegularFile {
                    return Err(Errno::INVAL);
                }
                let (id, lst) = self.lookup(nodeid, name)?;
                if dev_ino(&lst) != dev_ino(&st) {
                    self.forget(id, 1);
                    return Err(Errno::STALE);
                }
                let append = flags & host::linux_open::APPEND != 0;
                let fh = match self.add_handle(Handle::File { fd, append }) {
                    Ok(fh) => fh,
                    Err(e) => {
                        self.forget(id, 1);
                        return Err(e);
                    }
                };
                encode_entry(out, id, &attr(&st), VALID_SECS);
                out.put_u64(fh);
                out.put_u32(0);
                out.put_u32(0);
                Ok(())
            }
            Op::Fallocate {
                fh,
                offset,
                length,
                mode,
            } => {
                self.writable()?;
                let (fd, _) = self.file(fh)?;
                let flags = host::fallocate_flags(mode).ok_or(Errno::OPNOTSUPP)?;
                let end = offset.checked_add(length).ok_or(Errno::FBIG)?;
                check_offset(end).map_err(|_| Errno::FBIG)?;
                rustix::fs::fallocate(fd, flags, offset, length)
            }
            Op::Lseek { fh, offset, whence } => {
                let (fd, _) = self.file(fh)?;
                let pos = host::seek_from(whence, check_offset(offset)?).ok_or(Errno::INVAL)?;
                out.put_u64(rustix::fs::seek(fd, pos)?);
                Ok(())
            }
            Op::Unsupported => Err(Errno::NOSYS),
        }
    }

    fn setattr(&mut self, nodeid: u64, sa: fuse::SetAttr, out: &mut Vec<u8>) -> R<()> {
        self.writable()?;
        let st = self.stat_node(nodeid)?;
        let is_dir = file_type(&st) == FileType::Directory;
        let is_link = file_type(&st) == FileType::Symlink;
        let handle = if sa.valid & fattr::FH != 0 {
            Some(self.file(sa.fh)?.0)
        } else {
            None
        };
        if (sa.valid & fattr::UID != 0 && sa.uid != st.st_uid)
            || (sa.valid & fattr::GID != 0 && sa.gid != st.st_gid)
        {
            // Files belong to the host user running vmapple.
            let _ = (self.uid, self.gid);
            return Err(Errno::PERM);
        }
        if sa.valid & fattr::MODE != 0 {
            let mode = mode_bits(sa.mode);
            match (handle, &self.node(nodeid)?.kind) {
                (Some(fd), _) => rustix::fs::fchmod(fd, mode)?,
                (None, Kind::Dir(fd)) => rustix::fs::fchmod(fd, mode)?,
                (None, Kind::Other) if is_link => return Err(Errno::OPNOTSUPP),
                (None, Kind::Other) => {
                    // Not a symlink a moment ago and the worker is the only
                    // one acting for the guest.
                    let (dir, name) = self.place(nodeid)?;
                    rustix::fs::chmodat(dir, name, mode, AtFlags::empty())?;
                }
            }
        }
        if sa.valid & fattr::SIZE != 0 {
            if is_dir {
                return Err(Errno::ISDIR);
            }
            let size = check_offset(sa.size).map_err(|_| Errno::FBIG)?;
            match handle {
                Some(fd) => rustix::fs::ftruncate(fd, size)?,
                None => rustix::fs::ftruncate(self.open_node(nodeid, OFlags::WRONLY)?, size)?,
            }
        }
        let time = |set: bool, now: bool, secs: u64, nsecs: u32| Timespec {
            tv_sec: if set && !now {
                secs.min(i64::MAX as u64) as _
            } else {
                0
            },
            tv_nsec: if !set {
                rustix::fs::UTIME_OMIT
            } else if now {
                rustix::fs::UTIME_NOW
            } else {
                nsecs.min(999_999_999) as _
            },
        };
        if sa.valid & (fattr::ATIME | fattr::MTIME) != 0 {
            let times = Timestamps {
                last_access: time(
                    sa.valid & fattr::ATIME != 0,
                    sa.valid & fattr::ATIME_NOW != 0,
                    sa.atime,
                    sa.atimensec,
                ),
                last_modification: time(
                    sa.valid & fattr::MTIME != 0,
                    sa.valid & fattr::MTIME_NOW != 0,
                    sa.mtime,
                    sa.mtimensec,
                ),
            };
            match (handle, &self.node(nodeid)?.kind) {
                (Some(fd), _) => rustix::fs::futimens(fd, &times)?,
                (None, Kind::Dir(fd)) => rustix::fs::futimens(fd, &times)?,
                (None, Kind::Other) => {
                    let (dir, name) = self.place(nodeid)?;
                    rustix::fs::utimensat(dir, name, &times, AtFlags::SYMLINK_NOFOLLOW)?;
                }
            }
        }
        let st = match handle {
            Some(fd) => rustix::fs::fstat(fd)?,
            None => self.stat_node(nodeid)?,
        };
        out.put_u64(VALID_SECS);
        out.put_u32(0);
        out.put_u32(0);
        attr(&st).encode(out);
        Ok(())
    }

    fn readdir(
        &mut self,
        fh: u64,
        offset: u64,
        limit: usize,
        plus: bool,
        out: &mut Vec<u8>,
    ) -> R<()> {
        let Some(Handle::Dir { node, fd, entries }) = self.handles.get_mut(&fh) else {
            return Err(Errno::BADF);
        };
        let dir_node = *node;
        if offset == 0 || entries.is_empty() {
            entries.clear();
            let mut dir = rustix::fs::Dir::read_from(&*fd)?;
            while let Some(entry) = dir.read() {
                let entry = entry?;
                if entries.len() >= MAX_DIR_ENTRIES {
                    vm_core::log_limited!(
                        warn,
                        "virtio-fs: a directory lists only its first {MAX_DIR_ENTRIES} entries"
                    );
                    break;
                }
                entries.push(DirEntry {
                    ino: entry.ino(),
                    typ: dirent_type(entry.file_type()),
                    name: entry.file_name().to_bytes().to_vec(),
                });
            }
        }
        let Some(Handle::Dir { entries, .. }) = self.handles.get(&fh) else {
            return Err(Errno::BADF);
        };
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let listed: Vec<(u64, u32, Vec<u8>)> = entries
            .iter()
            .skip(start)
            .map(|e| (e.ino, e.typ, e.name.clone()))
            .take(limit / 24 + 1)
            .collect();
        for (i, (ino, typ, name)) in listed.into_iter().enumerate() {
            let off = (start + i + 1) as u64;
            if !plus {
                if !encode_dirent(out, limit, ino, off, typ, &name) {
                    break;
                }
                continue;
            }
            let need = fuse::ENTRY_OUT_LEN + (24 + name.len()).next_multiple_of(8);
            if out.len() + need > limit {
                break;
            }
            let at = out.len();
            if name == b"." || name == b".." {
                encode_entry(out, 0, &Attr::default(), 0);
            } else {
                match self.lookup(dir_node, &name) {
                    Ok((id, st)) => encode_entry(out, id, &attr(&st), VALID_SECS),
                    // Gone since the listing was read.
                    Err(_) => continue,
                }
            }
            encode_dirent(out, usize::MAX, ino, off, typ, &name);
            debug_assert_eq!(out.len() - at, need);
        }
        Ok(())
    }
}

fn sync(fd: &OwnedFd, datasync: bool) -> R<()> {
    #[cfg(target_os = "macos")]
    {
        let _ = datasync;
        // fsync alone leaves the data in the drive's cache on macOS.
        rustix::fs::fcntl_fullfsync(fd)
    }
    #[cfg(not(target_os = "macos"))]
    {
        if datasync {
            rustix::fs::fdatasync(fd)
        } else {
            rustix::fs::fsync(fd)
        }
    }
}

/// A name the guest may set or remove: `user.` attributes only.
fn xattr_name(name: &[u8]) -> R<CString> {
    if !name.starts_with(b"user.") || name.len() > 255 {
        return Err(Errno::PERM);
    }
    CString::new(name).map_err(|_| Errno::INVAL)
}

/// GETXATTR/LISTXATTR: with size 0 the length, else the bytes (ERANGE
/// when they do not fit `size`).
fn xattr_reply(
    size: u32,
    room: usize,
    out: &mut Vec<u8>,
    get: impl FnOnce(&mut [u8]) -> R<usize>,
) -> R<()> {
    let mut buf = vec![0u8; MAX_XATTR];
    let n = get(&mut buf)?;
    if size == 0 {
        out.put_u32(n as u32);
        out.put_u32(0);
    } else if n > size as usize || n > room {
        return Err(Errno::RANGE);
    } else {
        out.extend_from_slice(&buf[..n]);
    }
    Ok(())
}
