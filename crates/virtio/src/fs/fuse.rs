//! The FUSE wire protocol as virtio-fs carries it (virtio 1.2 §5.11.6;
//! the message layouts are Linux's `include/uapi/linux/fuse.h`, protocol
//! 7.31): decoding requests without trusting them and encoding replies.
//!
//! [`parse`] takes the device-readable bytes of one request and returns
//! its header and a typed [`Op`], or why it is malformed. It never panics
//! and never allocates beyond the request itself.

/// The protocol version this server speaks.
pub const KERNEL_VERSION: u32 = 7;
/// The minor version it offers (the driver may ask for less).
pub const KERNEL_MINOR_VERSION: u32 = 31;

/// Request opcodes.
pub mod opcode {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const READLINK: u32 = 5;
    pub const SYMLINK: u32 = 6;
    pub const MKNOD: u32 = 8;
    pub const MKDIR: u32 = 9;
    pub const UNLINK: u32 = 10;
    pub const RMDIR: u32 = 11;
    pub const RENAME: u32 = 12;
    pub const LINK: u32 = 13;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const SETXATTR: u32 = 21;
    pub const GETXATTR: u32 = 22;
    pub const LISTXATTR: u32 = 23;
    pub const REMOVEXATTR: u32 = 24;
    pub const FLUSH: u32 = 25;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const FSYNCDIR: u32 = 30;
    pub const ACCESS: u32 = 34;
    pub const CREATE: u32 = 35;
    pub const INTERRUPT: u32 = 36;
    pub const DESTROY: u32 = 38;
    pub const BATCH_FORGET: u32 = 42;
    pub const FALLOCATE: u32 = 43;
    pub const READDIRPLUS: u32 = 44;
    pub const RENAME2: u32 = 45;
    pub const LSEEK: u32 = 46;
}

/// INIT flags (`fuse_init_in.flags` / `fuse_init_out.flags`).
pub mod init_flag {
    pub const ASYNC_READ: u32 = 1 << 0;
    pub const ATOMIC_O_TRUNC: u32 = 1 << 3;
    pub const BIG_WRITES: u32 = 1 << 5;
    pub const DO_READDIRPLUS: u32 = 1 << 13;
    pub const READDIRPLUS_AUTO: u32 = 1 << 14;
    pub const PARALLEL_DIROPS: u32 = 1 << 18;
    pub const MAX_PAGES: u32 = 1 << 22;
}

/// `fuse_setattr_in.valid` bits.
pub mod fattr {
    pub const MODE: u32 = 1 << 0;
    pub const UID: u32 = 1 << 1;
    pub const GID: u32 = 1 << 2;
    pub const SIZE: u32 = 1 << 3;
    pub const ATIME: u32 = 1 << 4;
    pub const MTIME: u32 = 1 << 5;
    pub const FH: u32 = 1 << 6;
    pub const ATIME_NOW: u32 = 1 << 7;
    pub const MTIME_NOW: u32 = 1 << 8;
}

/// `fuse_getattr_in.getattr_flags`: `fh` names an open file.
pub const GETATTR_FH: u32 = 1;

/// Size of `fuse_in_header`.
pub const IN_HEADER_LEN: usize = 40;
/// Size of `fuse_out_header`.
pub const OUT_HEADER_LEN: usize = 16;
/// Size of `fuse_attr`.
pub const ATTR_LEN: usize = 88;
/// Size of `fuse_entry_out`.
pub const ENTRY_OUT_LEN: usize = 40 + ATTR_LEN;
/// Size of `fuse_write_in`, which precedes a WRITE's data.
pub const WRITE_IN_LEN: usize = 40;
/// Most forgets one BATCH_FORGET carries that are looked at; the rest of
/// a longer batch is ignored (the guest leaks its own lookups).
pub const MAX_BATCH_FORGET: usize = 1 << 16;

/// `fuse_in_header`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InHeader {
    pub len: u32,
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

/// `fuse_setattr_in`, the fields this server uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SetAttr {
    pub valid: u32,
    pub fh: u64,
    pub size: u64,
    pub atime: u64,
    pub mtime: u64,
    pub atimensec: u32,
    pub mtimensec: u32,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// A decoded request. Names are raw bytes without their NUL; the server
/// checks them.
#[derive(Debug, PartialEq, Eq)]
pub enum Op<'a> {
    Init {
        major: u32,
        minor: u32,
        max_readahead: u32,
        flags: u32,
    },
    Destroy,
    Lookup {
        name: &'a [u8],
    },
    Forget {
        nlookup: u64,
    },
    /// `(nodeid, nlookup)` pairs, 16 bytes each, at most [`MAX_BATCH_FORGET`].
    BatchForget {
        raw: &'a [u8],
    },
    GetAttr {
        flags: u32,
        fh: u64,
    },
    SetAttr(SetAttr),
    ReadLink,
    Symlink {
        name: &'a [u8],
        target: &'a [u8],
    },
    Mknod {
        name: &'a [u8],
        mode: u32,
        rdev: u32,
        umask: u32,
    },
    Mkdir {
        name: &'a [u8],
        mode: u32,
        umask: u32,
    },
    Unlink {
        name: &'a [u8],
    },
    Rmdir {
        name: &'a [u8],
    },
    Rename {
        newdir: u64,
        flags: u32,
        old: &'a [u8],
        new: &'a [u8],
    },
    Link {
        oldnodeid: u64,
        name: &'a [u8],
    },
    Open {
        flags: u32,
    },
    Read {
        fh: u64,
        offset: u64,
        size: u32,
    },
    Write {
        fh: u64,
        offset: u64,
        data: &'a [u8],
    },
    StatFs,
    Release {
        fh: u64,
    },
    Fsync {
        fh: u64,
        datasync: bool,
    },
    Flush {
        fh: u64,
    },
    SetXattr {
        name: &'a [u8],
        value: &'a [u8],
        flags: u32,
    },
    GetXattr {
        name: &'a [u8],
        size: u32,
    },
    ListXattr {
        size: u32,
    },
    RemoveXattr {
        name: &'a [u8],
    },
    OpenDir {
        flags: u32,
    },
    ReadDir {
        fh: u64,
        offset: u64,
        size: u32,
        plus: bool,
    },
    ReleaseDir {
        fh: u64,
    },
    FsyncDir {
        fh: u64,
        datasync: bool,
    },
    Access {
        mask: u32,
    },
    Create {
        name: &'a [u8],
        flags: u32,
        mode: u32,
        umask: u32,
    },
    Interrupt,
    Fallocate {
        fh: u64,
        offset: u64,
        length: u64,
        mode: u32,
    },
    Lseek {
        fh: u64,
        offset: u64,
        whence: u32,
    },
    /// An opcode this server does not implement.
    Unsupported,
}

/// Why a request could not be decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParseError {
    /// Shorter than a `fuse_in_header`.
    NoHeader,
    /// The header's `len` disagrees with the bytes the chain carries.
    Length { header: u32, actual: usize },
    /// The body is too short for its opcode, or a name lacks its NUL.
    Body { opcode: u32 },
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.buf.len() < n {
            return None;
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Some(head)
    }
    fn u16(&mut self) -> Option<u16> {
        self.bytes(2).map(|b| u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.bytes(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Option<u64> {
        self.bytes(8)
            .map(|b| u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
    }
    fn skip(&mut self, n: usize) -> Option<()> {
        self.bytes(n).map(drop)
    }
    /// A NUL-terminated string, without its NUL.
    fn cstr(&mut self) -> Option<&'a [u8]> {
        let end = self.buf.iter().position(|&b| b == 0)?;
        let s = &self.buf[..end];
        self.buf = &self.buf[end + 1..];
        Some(s)
    }
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }
}

/// Decodes only the header, so a reply can name the request even when its
/// body is bad.
pub fn parse_header(buf: &[u8]) -> Option<InHeader> {
    let mut r = Reader { buf };
    let h = InHeader {
        len: r.u32()?,
        opcode: r.u32()?,
        unique: r.u64()?,
        nodeid: r.u64()?,
        uid: r.u32()?,
        gid: r.u32()?,
        pid: r.u32()?,
    };
    let _total_extlen = r.u16()?;
    let _padding = r.u16()?;
    Some(h)
}

/// Decodes one request.
pub fn parse(buf: &[u8]) -> Result<(InHeader, Op<'_>), ParseError> {
    let header = parse_header(buf).ok_or(ParseError::NoHeader)?;
    if header.len as usize != buf.len() {
        return Err(ParseError::Length {
            header: header.len,
            actual: buf.len(),
        });
    }
    let op = parse_body(header.opcode, &buf[IN_HEADER_LEN..]).ok_or(ParseError::Body {
        opcode: header.opcode,
    })?;
    Ok((header, op))
}

fn parse_body(opcode: u32, body: &[u8]) -> Option<Op<'_>> {
    use opcode::*;
    let mut r = Reader { buf: body };
    Some(match opcode {
        INIT => {
            let major = r.u32()?;
            let minor = r.u32()?;
            let max_readahead = r.u32()?;
            let flags = r.u32()?;
            Op::Init {
                major,
                minor,
                max_readahead,
                flags,
            }
        }
        DESTROY => Op::Destroy,
        LOOKUP => Op::Lookup { name: r.cstr()? },
        FORGET => Op::Forget { nlookup: r.u64()? },
        BATCH_FORGET => {
            let count = r.u32()? as usize;
            r.skip(4)?;
            let n = count.min(MAX_BATCH_FORGET).min(r.buf.len() / 16);
            Op::BatchForget {
                raw: r.bytes(n * 16)?,
            }
        }
        GETATTR => {
            let flags = r.u32()?;
            r.skip(4)?;
            Op::GetAttr {
                flags,
                fh: r.u64()?,
            }
        }
        SETATTR => {
            let valid = r.u32()?;
            r.skip(4)?;
            let fh = r.u64()?;
            let size = r.u64()?;
            let _lock_owner = r.u64()?;
            let atime = r.u64()?;
            let mtime = r.u64()?;
            let _ctime = r.u64()?;
            let atimensec = r.u32()?;
            let mtimensec = r.u32()?;
            let _ctimensec = r.u32()?;
            let mode = r.u32()?;
            r.skip(4)?;
            let uid = r.u32()?;
            let gid = r.u32()?;
            Op::SetAttr(SetAttr {
                valid,
                fh,
                size,
                atime,
                mtime,
                atimensec,
                mtimensec,
                mode,
                uid,
                gid,
            })
        }
        READLINK => Op::ReadLink,
        SYMLINK => {
            let name = r.cstr()?;
            Op::Symlink {
                name,
                target: r.cstr()?,
            }
        }
        MKNOD => {
            let mode = r.u32()?;
            let rdev = r.u32()?;
            let umask = r.u32()?;
            r.skip(4)?;
            Op::Mknod {
                name: r.cstr()?,
                mode,
                rdev,
                umask,
            }
        }
        MKDIR => {
            let mode = r.u32()?;
            let umask = r.u32()?;
            Op::Mkdir {
                name: r.cstr()?,
                mode,
                umask,
            }
        }
        UNLINK => Op::Unlink { name: r.cstr()? },
        RMDIR => Op::Rmdir { name: r.cstr()? },
        RENAME | RENAME2 => {
            let newdir = r.u64()?;
            let flags = if opcode == RENAME2 {
                let f = r.u32()?;
                r.skip(4)?;
                f
            } else {
                0
            };
            let old = r.cstr()?;
            Op::Rename {
                newdir,
                flags,
                old,
                new: r.cstr()?,
            }
        }
        LINK => {
            let oldnodeid = r.u64()?;
            Op::Link {
                oldnodeid,
                name: r.cstr()?,
            }
        }
        OPEN | OPENDIR => {
            let flags = r.u32()?;
            r.skip(4)?;
            if opcode == OPEN {
                Op::Open { flags }
            } else {
                Op::OpenDir { flags }
            }
        }
        READ | READDIR | READDIRPLUS => {
            let fh = r.u64()?;
            let offset = r.u64()?;
            let size = r.u32()?;
            if opcode == READ {
                Op::Read { fh, offset, size }
            } else {
                Op::ReadDir {
                    fh,
                    offset,
                    size,
                    plus: opcode == READDIRPLUS,
                }
            }
        }
        WRITE => {
            let fh = r.u64()?;
            let offset = r.u64()?;
            let size = r.u32()? as usize;
            r.skip(WRITE_IN_LEN - 20)?;
            Op::Write {
                fh,
                offset,
                data: r.bytes(size)?,
            }
        }
        STATFS => Op::StatFs,
        RELEASE | RELEASEDIR => {
            let fh = r.u64()?;
            if opcode == RELEASE {
                Op::Release { fh }
            } else {
                Op::ReleaseDir { fh }
            }
        }
        FSYNC | FSYNCDIR => {
            let fh = r.u64()?;
            let datasync = r.u32()? & 1 != 0;
            if opcode == FSYNC {
                Op::Fsync { fh, datasync }
            } else {
                Op::FsyncDir { fh, datasync }
            }
        }
        FLUSH => Op::Flush { fh: r.u64()? },
        SETXATTR => {
            let size = r.u32()? as usize;
            let flags = r.u32()?;
            let name = r.cstr()?;
            Op::SetXattr {
                name,
                value: r.bytes(size)?,
                flags,
            }
        }
        GETXATTR => {
            let size = r.u32()?;
            r.skip(4)?;
            Op::GetXattr {
                name: r.cstr()?,
                size,
            }
        }
        LISTXATTR => Op::ListXattr { size: r.u32()? },
        REMOVEXATTR => Op::RemoveXattr { name: r.cstr()? },
        ACCESS => Op::Access { mask: r.u32()? },
        CREATE => {
            let flags = r.u32()?;
            let mode = r.u32()?;
            let umask = r.u32()?;
            r.skip(4)?;
            Op::Create {
                name: r.cstr()?,
                flags,
                mode,
                umask,
            }
        }
        INTERRUPT => Op::Interrupt,
        FALLOCATE => {
            let fh = r.u64()?;
            let offset = r.u64()?;
            let length = r.u64()?;
            Op::Fallocate {
                fh,
                offset,
                length,
                mode: r.u32()?,
            }
        }
        LSEEK => {
            let fh = r.u64()?;
            let offset = r.u64()?;
            Op::Lseek {
                fh,
                offset,
                whence: r.u32()?,
            }
        }
        _ => {
            let _ = r.rest();
            Op::Unsupported
        }
    })
}

/// Whether a request gets no reply (FORGET, BATCH_FORGET, INTERRUPT).
pub fn is_one_way(opcode: u32) -> bool {
    matches!(
        opcode,
        opcode::FORGET | opcode::BATCH_FORGET | opcode::INTERRUPT
    )
}

/// File attributes as `fuse_attr` carries them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub size: u64,
    pub blocks: u64,
    pub atime: u64,
    pub mtime: u64,
    pub ctime: u64,
    pub atimensec: u32,
    pub mtimensec: u32,
    pub ctimensec: u32,
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub blksize: u32,
}

/// Little-endian appenders for reply bodies.
pub trait Put {
    fn put_u32(&mut self, v: u32);
    fn put_u64(&mut self, v: u64);
}

impl Put for Vec<u8> {
    fn put_u32(&mut self, v: u32) {
        self.extend_from_slice(&v.to_le_bytes());
    }
    fn put_u64(&mut self, v: u64) {
        self.extend_from_slice(&v.to_le_bytes());
    }
}

impl Attr {
    pub fn encode(&self, out: &mut Vec<u8>) {
        for v in [
            self.ino,
            self.size,
            self.blocks,
            self.atime,
            self.mtime,
            self.ctime,
        ] {
            out.put_u64(v);
        }
        for v in [
            self.atimensec,
            self.mtimensec,
            self.ctimensec,
            self.mode,
            self.nlink,
            self.uid,
            self.gid,
            self.rdev,
            self.blksize,
            0,
        ] {
            out.put_u32(v);
        }
    }
}

/// Encodes `fuse_entry_out` for `nodeid` with `attr`, valid for
/// `valid_secs`.
pub fn encode_entry(out: &mut Vec<u8>, nodeid: u64, attr: &Attr, valid_secs: u64) {
    out.put_u64(nodeid);
    out.put_u64(0); // generation: node ids are never reused
    out.put_u64(valid_secs);
    out.put_u64(valid_secs);
    out.put_u32(0);
    out.put_u32(0);
    attr.encode(out);
}

/// Appends a `fuse_dirent` (without the entry part of a direntplus);
/// returns false, appending nothing, when it would pass `limit` bytes.
pub fn encode_dirent(
    out: &mut Vec<u8>,
    limit: usize,
    ino: u64,
    off: u64,
    typ: u32,
    name: &[u8],
) -> bool {
    let len = (24 + name.len()).next_multiple_of(8);
    if out.len() + len > limit {
        return false;
    }
    out.put_u64(ino);
    out.put_u64(off);
    out.put_u32(name.len() as u32);
    out.put_u32(typ);
    out.extend_from_slice(name);
    out.resize(out.len() + (len - 24 - name.len()), 0);
    true
}

/// The out header followed by `body`, for request `unique`; `error` is a
/// negative Linux errno or 0.
pub fn reply(unique: u64, error: i32, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(OUT_HEADER_LEN + body.len());
    out.put_u32((OUT_HEADER_LEN + body.len()) as u32);
    out.put_u32(error as u32);
    out.put_u64(unique);
    out.extend_from_slice(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(opcode: u32, body: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.put_u32((IN_HEADER_LEN + body.len()) as u32);
        v.put_u32(opcode);
        v.put_u64(7);
        v.put_u64(1);
        v.extend_from_slice(&[0; 16]);
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn lookup_name_is_the_bytes_before_its_nul() {
        let r = request(opcode::LOOKUP, b"a.txt\0");
        let (h, op) = parse(&r).unwrap();
        assert_eq!((h.unique, h.nodeid), (7, 1));
        assert_eq!(op, Op::Lookup { name: b"a.txt" });
    }

    #[test]
    fn a_name_without_nul_is_malformed() {
        let r = request(opcode::LOOKUP, b"abc");
        assert_eq!(parse(&r), Err(ParseError::Body { opcode: 1 }));
    }

    #[test]
    fn header_length_must_match_the_chain() {
        let mut r = request(opcode::STATFS, b"");
        r.push(0);
        assert!(matches!(parse(&r), Err(ParseError::Length { .. })));
        assert_eq!(parse(&r[..10]), Err(ParseError::NoHeader));
    }

    #[test]
    fn write_data_must_be_as_long_as_its_size_says() {
        let mut body = Vec::new();
        body.put_u64(3);
        body.put_u64(0);
        body.put_u32(100);
        body.extend_from_slice(&[0; 20]);
        body.extend_from_slice(&[1; 10]);
        assert!(parse(&request(opcode::WRITE, &body)).is_err());
    }

    #[test]
    fn batch_forget_counts_only_what_is_there() {
        let mut body = Vec::new();
        body.put_u32(u32::MAX);
        body.put_u32(0);
        body.extend_from_slice(&[0; 40]);
        let r = request(opcode::BATCH_FORGET, &body);
        let (_, op) = parse(&r).unwrap();
        assert!(matches!(op, Op::BatchForget { raw } if raw.len() == 32));
    }

    #[test]
    fn dirents_are_padded_and_bounded() {
        let mut out = Vec::new();
        assert!(encode_dirent(&mut out, 32, 5, 1, 8, b"abc"));
        assert_eq!(out.len(), 32);
        assert!(!encode_dirent(&mut out, 40, 5, 2, 8, b"x"));
        assert_eq!(out.len(), 32);
    }
}
