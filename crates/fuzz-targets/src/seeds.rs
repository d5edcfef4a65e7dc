//! Hand-written inputs that drive each device the way a working driver
//! does, so the smoke pass (and a fuzzer's initial corpus) starts deep
//! inside every device rather than at its first sanity check.

use devices::apple_aes::{self, cmd, opcode};
use devices::apple_bdif::{desc, devid, op, reg as bdif_reg, sector_block};
use devices::{pl011, pl031, pl061};
use usb::xhci::regs::*;
use usb::xhci::trb::*;
use vm_core::AccessWidth;
use vm_core::AccessWidth::{Double, Half, Word};

use crate::input::{Encoder, RAM_BASE, RAM_SEED_LEN};
use crate::virtio::{queue_base, AVAIL_OFF, DESC_OFF};
use crate::xhci::ir;

/// Seeds per target name (the names of [`crate::TARGETS`]).
pub fn for_target(name: &str) -> Vec<Vec<u8>> {
    match name {
        "aes" => aes(),
        "bdif" => bdif(),
        "cfg" => cfg(),
        "pvpanic" => pvpanic(),
        "pl031" => pl031(),
        "pl061" => pl061(),
        "pl011" => pl011(),
        "virtio_blk" => virtio_blk(false),
        "virtio_blk_apple" => virtio_blk(true),
        "virtio_net" => virtio_net(),
        "virtio_gpu" => virtio_gpu(),
        "xhci" => xhci(),
        "control_request" => control_request(),
        "snapshot" => snapshot(),
        "msix" => msix(),
        "loadstore" => loadstore(),
        "fuse_request" => fuse_request(),
        // The generic rig's queue layout and descriptors.
        "vsock_packet" => virtio_net(),
        "stage1" => stage1(),
        "apple_dt" => apple_dt(),
        "vnc_client" => vnc_client(),
        _ => Vec::new(),
    }
}

/// One FUSE request: header (unique 1) and body.
fn fuse(opcode: u32, nodeid: u64, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.push(0xff); // reply room
    v.extend_from_slice(&((40 + body.len()) as u32).to_le_bytes());
    v.extend_from_slice(&opcode.to_le_bytes());
    v.extend_from_slice(&1u64.to_le_bytes());
    v.extend_from_slice(&nodeid.to_le_bytes());
    v.extend_from_slice(&[0; 16]);
    v.extend_from_slice(body);
    v
}

/// INIT, lookups of the file, the directory and the symlink, GETATTR,
/// OPEN and READ of the file (node 2), READLINK, OPENDIR and READDIRPLUS.
pub fn fuse_request() -> Vec<Vec<u8>> {
    use virtio::fs::fuse::opcode::*;
    let mut s = vec![0u8]; // writable share
    s.extend(fuse(INIT, 0, &words(&[7, 31, 0x20000, 0xffff_ffff])));
    s.extend(fuse(LOOKUP, 1, b"file\0"));
    s.extend(fuse(LOOKUP, 1, b"dir\0"));
    s.extend(fuse(LOOKUP, 1, b"link\0"));
    s.extend(fuse(GETATTR, 2, &[0; 16]));
    s.extend(fuse(OPEN, 2, &[0; 8]));
    let mut read = 1u64.to_le_bytes().to_vec();
    read.extend_from_slice(&[0; 8]);
    read.extend_from_slice(&100u32.to_le_bytes());
    read.extend_from_slice(&[0; 20]);
    s.extend(fuse(READ, 2, &read));
    s.extend(fuse(READLINK, 4, &[]));
    s.extend(fuse(OPENDIR, 1, &[0; 8]));
    let mut rd = 2u64.to_le_bytes().to_vec();
    rd.extend_from_slice(&[0; 8]);
    rd.extend_from_slice(&4096u32.to_le_bytes());
    rd.extend_from_slice(&[0; 20]);
    s.extend(fuse(READDIRPLUS, 1, &rd));
    let mut ro = s.clone();
    ro[0] = 1;
    vec![s, ro]
}

fn words(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// KEY (built-in key 1, CBC, encrypt), IV, DATA, FLAG; then a payload
/// key in ECB, DATA, STORE_IV, FLAG.
pub fn aes() -> Vec<Vec<u8>> {
    use apple_aes::reg::*;
    const SRC: u64 = RAM_BASE + 0x100;
    const DST: u64 = RAM_BASE + 0x200;
    const IV_OUT: u64 = RAM_BASE + 0x300;
    let mut e = Encoder::new();
    e.ram(SRC, &[0x11; 32]);
    e.raw(&[0]); // FIFO policy: QEMU parity
    e.w32(
        IRQ_ENABLE,
        apple_aes::irq::FLAG | apple_aes::irq::INVALID_CMD,
    );
    let key_builtin = (opcode::KEY << opcode::SHIFT)
        | (1 << cmd::KEY_SELECT_SHIFT)
        | cmd::KEY_ENCRYPT
        | (1 << cmd::KEY_MODE_SHIFT);
    let fifo = [
        key_builtin,
        opcode::IV << opcode::SHIFT,
        0x0302_0100,
        0x0706_0504,
        0x0B0A_0908,
        0x0F0E_0D0C,
        (opcode::DATA << opcode::SHIFT) | 32,
        0,
        SRC as u32,
        DST as u32,
        (opcode::FLAG << opcode::SHIFT) | cmd::FLAG_RAISE | 0x42,
    ];
    for w in fifo {
        e.w32(FIFO, w);
    }
    e.read(FLAG_INFO, Word)
        .read(IRQ_STATUS, Double)
        .w32(IRQ_STATUS, apple_aes::irq::FLAG);
    // A 16-byte payload key, ECB decrypt, back over the ciphertext.
    let key_payload = (opcode::KEY << opcode::SHIFT) | (1 << cmd::KEY_SLOT_SHIFT);
    let fifo = [
        key_payload,
        1,
        2,
        3,
        4,
        (opcode::DATA << opcode::SHIFT) | (1 << cmd::DATA_KEY_SLOT_SHIFT) | 32,
        0,
        DST as u32,
        SRC as u32,
        opcode::STORE_IV << opcode::SHIFT,
        IV_OUT as u32,
        (opcode::FLAG << opcode::SHIFT) | cmd::FLAG_RAISE | 0x43,
    ];
    for w in fifo {
        e.w32(FIFO, w);
    }
    e.read(STATUS, Word)
        .read(Q_STATUS, Word)
        .read(FLAG_INFO, Word);
    let full = e.finish();
    // The same with an invalid command wedging the FIFO first (quirk Q4),
    // then a reset that clears it (second policy).
    let mut wedged = Encoder::new();
    wedged.raw(&[1]);
    wedged
        .w32(IRQ_ENABLE, u32::MAX)
        .w32(FIFO, 0xF000_0000)
        .w32(FIFO, (opcode::FLAG << opcode::SHIFT) | cmd::FLAG_RAISE)
        .extra(&[0])
        .w32(IRQ_ENABLE, apple_aes::irq::FLAG)
        .w32(FIFO, (opcode::FLAG << opcode::SHIFT) | cmd::FLAG_RAISE);
    vec![full, wedged.finish()]
}

/// READ requests through the ROOT and AUX windows, and a refused WRITE.
pub fn bdif() -> Vec<Vec<u8>> {
    const DESC: u64 = RAM_BASE + 0x100;
    const SECTOR: u64 = RAM_BASE + 0x200;
    const RETVAL: u64 = RAM_BASE + 0x300;
    const DATA: u64 = RAM_BASE + 0x400;
    let request = |flags: u32, len: u32| {
        let mut d = [0u8; desc::SIZE];
        d[desc::SECTOR_ADDR..][..8].copy_from_slice(&SECTOR.to_le_bytes());
        d[desc::SECTOR_LEN..][..4].copy_from_slice(&(sector_block::SIZE as u32).to_le_bytes());
        d[desc::DATA_ADDR..][..8].copy_from_slice(&DATA.to_le_bytes());
        d[desc::DATA_LEN..][..4].copy_from_slice(&len.to_le_bytes());
        d[desc::DATA_FLAGS..][..4].copy_from_slice(&flags.to_le_bytes());
        d[desc::RETVAL_ADDR..][..8].copy_from_slice(&RETVAL.to_le_bytes());
        d
    };
    let mut sector = [0u8; sector_block::SIZE];
    sector[sector_block::SECTOR..][..4].copy_from_slice(&3u32.to_le_bytes());
    let mut e = Encoder::new();
    e.ram(DESC, &request(op::READ, 1024)).ram(SECTOR, &sector);
    e.raw(&[0, 1]); // disk shapes
    e.read(devid::ROOT | bdif_reg::STATUS, Word)
        .read(devid::AUX | bdif_reg::NEXT_DEVICE, Word)
        .w32(devid::ROOT | bdif_reg::CMD, DESC as u32)
        .w32(devid::AUX | bdif_reg::CMD, DESC as u32)
        .write(devid::ROOT | bdif_reg::CMD, Double, DESC);
    let reads = e.finish();
    let mut w = Encoder::new();
    w.ram(DESC, &request(op::WRITE, 512)).ram(SECTOR, &sector);
    w.raw(&[1, 0]);
    w.w32(devid::ROOT | bdif_reg::CMD, DESC as u32)
        // The descriptor (at +0x100) turned into a 12 KiB READ.
        .extra(&[0x18, 0x01, 8, 0, 0x30, 0, 0, 1, 0, 3, 0])
        .w32(devid::AUX | bdif_reg::CMD, DESC as u32);
    vec![reads, w.finish()]
}

/// A valid configuration, guest scribbles and resets.
pub fn cfg() -> Vec<Vec<u8>> {
    let mut e = Encoder::new();
    e.raw(&[4]);
    e.raw(&0x1122_3344_5566_7788u64.to_le_bytes());
    e.raw(&(4u64 << 30).to_le_bytes());
    e.raw(&[0; 12]);
    e.raw(&[0x52, 0x54, 0, 1, 2, 3]);
    e.raw(&[0; 18]);
    for s in [
        "C02XYZ",
        "VM0001",
        "Apple M1 (Virtual)",
        "52:54:00:12:34:56",
    ] {
        e.raw(&[s.len() as u8]).raw(s.as_bytes());
    }
    // Scribble over the structure, then reset (every 8th trailing byte 0).
    e.raw(&[0x10, 0, 8]).raw(&[0xff; 8]).raw(&[1]);
    e.raw(&[0x00, 0x05, 4]).raw(b"evil").raw(&[0]);
    vec![e.finish()]
}

/// Panic, crash-loaded and shutdown events, and reads of the window.
pub fn pvpanic() -> Vec<Vec<u8>> {
    let mut e = vec![0x03]; // advertised events
    let mut enc = Encoder::new();
    enc.read(0, vm_core::AccessWidth::Byte)
        .write(0, vm_core::AccessWidth::Byte, 1)
        .write(0, Half, 0x0402)
        .write(1, vm_core::AccessWidth::Byte, 0x80)
        .read(0, Double);
    // pvpanic has no RAM: drop the seed page the encoder starts with.
    e.extend_from_slice(&enc.finish()[RAM_SEED_LEN..]);
    vec![e]
}

/// Set the time, arm the alarm, let the clock reach it.
pub fn pl031() -> Vec<Vec<u8>> {
    use pl031::reg::*;
    let mut e = Encoder::new();
    let mut out = (1_000_000u64 << 8).to_le_bytes().to_vec();
    e.w32(LR, 1000)
        .w32(MR, 1003)
        .w32(IMSC, 1)
        .read(DR, Word)
        .extra(&[2])
        .read(MIS, Word)
        .w32(ICR, 1)
        .extra(&[1, 0, 0, 0x10, 0])
        .extra(&[0]);
    out.extend_from_slice(&e.finish()[RAM_SEED_LEN..]);
    vec![out]
}

/// Edge and level interrupts on input lines, outputs through DATA.
pub fn pl061() -> Vec<Vec<u8>> {
    use pl061::reg::*;
    let mut e = Encoder::new();
    e.w32(IEV, 0x08)
        .w32(IE, 0x08)
        .extra(&[1, 3])
        .read(MIS, Word)
        .w32(IC, 0x08)
        .w32(DIR, 0xf0)
        .w32(0x3FC, 0xa0)
        .read(0x3FC, Word)
        .w32(IS, 0x04)
        .w32(IEV, 0x04)
        .w32(IE, 0x04)
        .extra(&[3, 2])
        .extra(&[2, 2])
        .read(RIS, Word);
    vec![e.finish()[RAM_SEED_LEN..].to_vec()]
}

/// Enable, transmit, receive with the RX interrupt unmasked.
pub fn pl011() -> Vec<Vec<u8>> {
    use pl011::reg::*;
    let mut e = Encoder::new();
    e.w32(CR, 0x301)
        .w32(IMSC, 0x50)
        .w32(DR, u32::from(b'o'))
        .w32(DR, u32::from(b'k'))
        .extra(&[1, 3])
        .raw(b"abc")
        .read(FR, Word)
        .read(DR, Word)
        .read(MIS, Word)
        .w32(LCR_H, 0x70)
        .extra(&[1, 20])
        .raw(&[b'x'; 20])
        .read(DR, Word)
        .w32(ICR, 0x7ff);
    vec![e.finish()[RAM_SEED_LEN..].to_vec()]
}

fn put_desc(e: &mut Encoder, table: u64, idx: u64, addr: u64, len: u32, flags: u16, next: u16) {
    let mut raw = [0u8; 16];
    raw[0..8].copy_from_slice(&addr.to_le_bytes());
    raw[8..12].copy_from_slice(&len.to_le_bytes());
    raw[12..14].copy_from_slice(&flags.to_le_bytes());
    raw[14..16].copy_from_slice(&next.to_le_bytes());
    e.ram(table + 16 * idx, &raw);
}

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

/// OUT, IN, GET_ID (and the Apple barrier) on an 8-entry queue, a reset
/// that replays them, and a WRITE_ZEROES published afterwards.
pub fn virtio_blk(apple: bool) -> Vec<Vec<u8>> {
    let table = queue_base(0) + DESC_OFF;
    let avail = queue_base(0) + AVAIL_OFF;
    let hdr = |ty: u32, sector: u64| {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&ty.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        h
    };
    let mut e = Encoder::new();
    e.ram(RAM_BASE + 0x800, &hdr(1, 4))
        .ram(RAM_BASE + 0x810, &hdr(0, 4))
        .ram(RAM_BASE + 0x820, &hdr(8, 0))
        .ram(RAM_BASE + 0x830, &hdr(if apple { 0x1_0000 } else { 4 }, 0))
        .ram(RAM_BASE + 0x840, &hdr(13, 0))
        .ram(
            RAM_BASE + 0x850,
            &[6, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0],
        )
        .ram(RAM_BASE + 0xA00, &[0xC3; 512]);
    // OUT: header, 512 bytes, status.
    put_desc(&mut e, table, 0, RAM_BASE + 0x800, 16, F_NEXT, 1);
    put_desc(&mut e, table, 1, RAM_BASE + 0xA00, 512, F_NEXT, 2);
    put_desc(&mut e, table, 2, RAM_BASE + 0xE00, 1, F_WRITE, 0);
    // IN: header, 512 bytes, status.
    put_desc(&mut e, table, 3, RAM_BASE + 0x810, 16, F_NEXT, 4);
    put_desc(&mut e, table, 4, RAM_BASE + 0xC00, 512, F_WRITE | F_NEXT, 5);
    put_desc(&mut e, table, 5, RAM_BASE + 0xE01, 1, F_WRITE, 0);
    // GET_ID: header, 20 bytes of id plus status in one buffer.
    put_desc(&mut e, table, 6, RAM_BASE + 0x820, 16, F_NEXT, 7);
    put_desc(&mut e, table, 7, RAM_BASE + 0xE10, 21, F_WRITE, 0);
    let mut ring = Vec::new();
    for head in [0u16, 3, 6] {
        ring.extend_from_slice(&head.to_le_bytes());
    }
    e.ram(avail, &[0, 0, 3, 0]).ram(avail + 4, &ring);
    // Shape: read-write 32 KiB disk, one queue, serial; Aux for Apple.
    e.raw(&[0x10 | if apple { 0x40 } else { 0 }]);
    // Layout: 8 entries, fixed addresses.
    e.raw(&[3]);
    // Notify q0, read capacity, reset + re-activate, notify again.
    e.raw(&[0, 0]).raw(&[4, 0, 8]).raw(&[6]).raw(&[0, 0]);
    // Barrier (Apple) or UNSUPP, and WRITE_ZEROES of sectors 2..4, each
    // a header+status chain written with descriptor ops and published.
    let desc_op = |e: &mut Encoder, idx: u8, addr: u64, len: u32, flags: u16, next: u16| {
        e.raw(&[3, 0, idx, 0]).raw(&addr.to_le_bytes());
        e.raw(&len.to_le_bytes())
            .raw(&flags.to_le_bytes())
            .raw(&next.to_le_bytes());
    };
    desc_op(&mut e, 0, RAM_BASE + 0x830, 16, F_NEXT, 1);
    desc_op(&mut e, 1, RAM_BASE + 0xE20, 1, F_WRITE, 0);
    e.raw(&[1, 0, 0, 0]);
    desc_op(&mut e, 2, RAM_BASE + 0x840, 16, F_NEXT, 3);
    desc_op(&mut e, 3, RAM_BASE + 0x850, 16, F_NEXT, 4);
    desc_op(&mut e, 4, RAM_BASE + 0xE21, 1, F_WRITE, 0);
    e.raw(&[1, 0, 2, 0]).raw(&[0, 0]);
    vec![e.finish()]
}

/// A virtio-gpu command: the control header (type, fence flag, fence id)
/// and little-endian words after it.
fn gpu_cmd(kind: u32, fence: bool, body: &[u32]) -> Vec<u8> {
    let mut c = vec![0u8; 24];
    c[0..4].copy_from_slice(&kind.to_le_bytes());
    if fence {
        c[4..8].copy_from_slice(&1u32.to_le_bytes());
        c[8..16].copy_from_slice(&7u64.to_le_bytes());
    }
    c.extend(words(body));
    c
}

/// What Linux's virtio-gpu driver sends to show a frame and a cursor:
/// GET_DISPLAY_INFO, GET_EDID, a 16x16 resource with its backing in the
/// seeded RAM, transferred, shown on head 0 (and part of it on head 1) and
/// flushed; a cursor resource, UPDATE_CURSOR and MOVE_CURSOR on the cursor
/// queue. Control chains are a command and a shared reply buffer; cursor
/// chains a command alone. The second seed kicks the cursor queue first
/// (its resource does not exist yet), ends the control queue with
/// DETACH_BACKING, UNREF and a flush of the gone resource, then resets
/// and replays everything.
pub fn virtio_gpu() -> Vec<Vec<u8>> {
    vec![gpu_seed(false), gpu_seed(true)]
}

fn gpu_seed(second: bool) -> Vec<u8> {
    use virtio::gpu::cmd::*;
    const PIXELS: u64 = RAM_BASE + 0xC00;
    const PIXEL_BYTES: u32 = 16 * 16 * 4;
    const REPLY: u64 = RAM_BASE + 0x2000;
    let (x8r8g8b8, a8r8g8b8) = (2, 1); // B8G8R8X8 and B8G8R8A8
    let pixels: Vec<u8> = (0..PIXEL_BYTES).map(|i| (i * 7 + 1) as u8).collect();
    let (lo, hi) = (PIXELS as u32, (PIXELS >> 32) as u32);
    let mut control = vec![
        gpu_cmd(GET_DISPLAY_INFO, false, &[]),
        gpu_cmd(GET_EDID, false, &[0, 0]),
        gpu_cmd(RESOURCE_CREATE_2D, true, &[1, x8r8g8b8, 16, 16]),
        gpu_cmd(
            RESOURCE_ATTACH_BACKING,
            false,
            &[1, 1, lo, hi, PIXEL_BYTES, 0],
        ),
        gpu_cmd(TRANSFER_TO_HOST_2D, true, &[0, 0, 16, 16, 0, 0, 1, 0]),
        gpu_cmd(SET_SCANOUT, false, &[0, 0, 16, 16, 0, 1]),
        gpu_cmd(RESOURCE_FLUSH, true, &[0, 0, 16, 16, 1, 0]),
        gpu_cmd(SET_SCANOUT, false, &[4, 4, 8, 8, 1, 1]),
        gpu_cmd(RESOURCE_CREATE_2D, false, &[2, a8r8g8b8, 16, 16]),
        gpu_cmd(
            RESOURCE_ATTACH_BACKING,
            false,
            &[2, 1, lo, hi, PIXEL_BYTES, 0],
        ),
        gpu_cmd(TRANSFER_TO_HOST_2D, false, &[0, 0, 16, 16, 0, 0, 2, 0]),
    ];
    if second {
        control.extend([
            gpu_cmd(RESOURCE_DETACH_BACKING, false, &[1, 0]),
            gpu_cmd(RESOURCE_UNREF, false, &[1, 0]),
            gpu_cmd(RESOURCE_FLUSH, false, &[0, 0, 16, 16, 1, 0]),
        ]);
    }
    let cursor = [
        gpu_cmd(UPDATE_CURSOR, false, &[1, 5, 6, 0, 2, 3, 4, 0]),
        gpu_cmd(MOVE_CURSOR, false, &[1, 9, 9, 0, 0, 0, 0, 0]),
    ];
    let mut e = Encoder::new();
    e.ram(PIXELS, &pixels);
    let mut at = RAM_BASE + 0x800;
    let mut lay_out = |e: &mut Encoder, q: u16, cmds: &[Vec<u8>], reply: Option<u16>| {
        let table = queue_base(q) + DESC_OFF;
        let mut ring = Vec::new();
        for (i, c) in cmds.iter().enumerate() {
            e.ram(at, c);
            let (flags, next) = reply.map_or((0, 0), |r| (F_NEXT, r));
            put_desc(e, table, i as u64, at, c.len() as u32, flags, next);
            ring.extend_from_slice(&(i as u16).to_le_bytes());
            at += c.len() as u64;
        }
        if let Some(r) = reply {
            // Room for the largest reply, GET_EDID's.
            put_desc(e, table, u64::from(r), REPLY, 24 + 8 + 1024, F_WRITE, 0);
        }
        let avail = queue_base(q) + AVAIL_OFF;
        e.ram(avail, &[0, 0, cmds.len() as u8, 0])
            .ram(avail + 4, &ring);
    };
    lay_out(&mut e, 0, &control, Some(15));
    lay_out(&mut e, 1, &cursor, None);
    assert!(at <= PIXELS, "commands fit before the pixels");
    // Layout: 16 entries, fixed addresses.
    e.raw(&[4]);
    if second {
        e.raw(&[0, 1])
            .raw(&[0, 0])
            .raw(&[6])
            .raw(&[0, 0])
            .raw(&[0, 1]);
    } else {
        // The control queue, then the cursor queue.
        e.raw(&[0, 0]).raw(&[0, 1]);
    }
    e.finish()
}

/// A VNC client's session as vncviewer and vncdotool open one: version,
/// a 1024x768 head, its pixel format, encodings (ZRLE, Raw, Cursor,
/// DesktopSize), update requests, `a`, `A` (shift typed for it), a
/// pointer drag with the left button and a wheel step, and a cut text.
/// The second: a 3.3 client asking for RGB565, an extended-clipboard cut
/// text (negative length) and keys with shift held.
pub fn vnc_client() -> Vec<Vec<u8>> {
    use vnc::encode::{encoding, PixelFormat};
    let key = |down: bool, sym: u32| {
        let mut m = vec![4, u8::from(down), 0, 0];
        m.extend_from_slice(&sym.to_be_bytes());
        m
    };
    let pointer = |mask: u8, x: u16, y: u16| {
        let mut m = vec![5, mask];
        m.extend_from_slice(&x.to_be_bytes());
        m.extend_from_slice(&y.to_be_bytes());
        m
    };
    let request = |incremental: bool| {
        let mut m = vec![3, u8::from(incremental)];
        for v in [0u16, 0, 1024, 768] {
            m.extend_from_slice(&v.to_be_bytes());
        }
        m
    };
    let cut = |len: i32, text: &[u8]| {
        let mut m = vec![6, 0, 0, 0];
        m.extend_from_slice(&len.to_be_bytes());
        m.extend_from_slice(text);
        m
    };
    let mut s = b"RFB 003.008\n".to_vec();
    s.extend_from_slice(&[4, 0, 3, 0]); // 1024x768
    s.extend_from_slice(&[0, 0, 0, 0]);
    s.extend_from_slice(&PixelFormat::default().to_wire());
    let encs = [
        encoding::ZRLE,
        encoding::RAW,
        encoding::CURSOR,
        encoding::DESKTOP_SIZE,
    ];
    s.extend_from_slice(&[2, 0, 0, encs.len() as u8]);
    for e in encs {
        s.extend_from_slice(&e.to_be_bytes());
    }
    s.extend(request(false));
    s.extend(key(true, u32::from(b'a')));
    s.extend(key(false, u32::from(b'a')));
    s.extend(key(true, u32::from(b'A')));
    s.extend(key(false, u32::from(b'A')));
    s.extend(pointer(0, 100, 200));
    s.extend(pointer(1, 110, 210));
    s.extend(pointer(0, 1023, 767));
    s.extend(pointer(8, 1023, 767));
    s.extend(request(true));
    s.extend(cut(2, b"hi"));

    let mut old = b"RFB 003.003\n".to_vec();
    old.extend_from_slice(&[0, 64, 0, 48]);
    let rgb565 = PixelFormat {
        bpp: 16,
        depth: 16,
        big_endian: false,
        true_colour: true,
        max: [31, 63, 31],
        shift: [11, 5, 0],
    };
    old.extend_from_slice(&[0, 0, 0, 0]);
    old.extend_from_slice(&rgb565.to_wire());
    old.extend(cut(-4, &[0, 0, 0, 1]));
    old.extend(key(true, 0xffe1)); // Shift_L
    old.extend(key(true, u32::from(b'!')));
    old.extend(key(false, u32::from(b'!')));
    old.extend(key(false, 0xffe1));
    old.extend(pointer(16, 0, 0));
    vec![s, old]
}

/// Two receive buffers, one transmitted frame that loops back, one
/// injected frame.
pub fn virtio_net() -> Vec<Vec<u8>> {
    let rx = queue_base(0);
    let tx = queue_base(1);
    let mut e = Encoder::new();
    put_desc(
        &mut e,
        rx + DESC_OFF,
        0,
        RAM_BASE + 0x800,
        0x100,
        F_WRITE,
        0,
    );
    put_desc(
        &mut e,
        rx + DESC_OFF,
        1,
        RAM_BASE + 0x900,
        0x100,
        F_WRITE,
        0,
    );
    e.ram(rx + AVAIL_OFF, &[0, 0, 2, 0, 0, 0, 1, 0]);
    // 12-byte header, then a 60-byte frame split over two buffers.
    let mut frame = vec![0u8; 12];
    frame.extend((0..60u8).map(|i| i ^ 0x5a));
    e.ram(RAM_BASE + 0xA00, &frame);
    put_desc(&mut e, tx + DESC_OFF, 0, RAM_BASE + 0xA00, 30, F_NEXT, 1);
    put_desc(&mut e, tx + DESC_OFF, 1, RAM_BASE + 0xA00 + 30, 42, 0, 0);
    e.ram(tx + AVAIL_OFF, &[0, 0, 1, 0, 0, 0]);
    e.raw(&[3]); // layout: 8 entries
    e.raw(&[0, 0]).raw(&[0, 1]); // kick rx, kick tx
    e.raw(&[7]).raw(&80u16.to_le_bytes()).raw(&[0x77; 80]);
    e.raw(&[4, 0, 8]).raw(&[5, 0, 2, 1, 2]);
    vec![e.finish()]
}

fn trb_bytes(parameter: u64, status: u32, control: u32) -> [u8; 16] {
    Trb {
        parameter,
        status,
        control,
    }
    .to_bytes()
}

/// Bring-up, Enable Slot + Address Device + No-Op commands, then a
/// GET_DESCRIPTOR control transfer to the keyboard.
pub fn xhci() -> Vec<Vec<u8>> {
    const DCBAA: u64 = RAM_BASE;
    const ERST: u64 = RAM_BASE + 0x240;
    const CMD_RING: u64 = RAM_BASE + 0x280;
    const EP0_RING: u64 = RAM_BASE + 0x300;
    const INPUT_CTX: u64 = RAM_BASE + 0x400;
    const BUF: u64 = RAM_BASE + 0x900;
    const EVENT_RING: u64 = RAM_BASE + 0x1000;
    const OUT_CTX: u64 = RAM_BASE + 0x2000;
    let c = TRB_CYCLE;
    let portsc =
        OP_BASE + OP_PORT_BASE + PORT_STRIDE * (usb::xhci::KEYBOARD_PORT as u64 - 1) + PORT_SC;
    let mut e = Encoder::new();
    e.ram(DCBAA + 8, &OUT_CTX.to_le_bytes());
    let mut erst = [0u8; 16];
    erst[0..8].copy_from_slice(&EVENT_RING.to_le_bytes());
    erst[8..12].copy_from_slice(&64u32.to_le_bytes());
    e.ram(ERST, &erst);
    let cmds = [
        trb_bytes(0, 0, (TRB_ENABLE_SLOT << 10) | c),
        trb_bytes(INPUT_CTX, 0, (TRB_ADDRESS_DEVICE << 10) | (1 << 24) | c),
        trb_bytes(0, 0, (TRB_NOOP_COMMAND << 10) | c),
    ];
    for (i, t) in cmds.iter().enumerate() {
        e.ram(CMD_RING + 16 * i as u64, t);
    }
    e.ram(
        CMD_RING + 16 * 7,
        &trb_bytes(CMD_RING, 0, (TRB_LINK << 10) | TRB_TC),
    );
    let mut ictx = [0u32; 21];
    ictx[1] = 0b11;
    ictx[8] = (1 << 27) | (1 << 20);
    ictx[9] = (usb::xhci::KEYBOARD_PORT as u32) << 16;
    ictx[17] = (3 << 1) | (4 << 3) | (8 << 16);
    ictx[18] = EP0_RING as u32 | 1;
    ictx[20] = 8;
    e.ram(INPUT_CTX, &words(&ictx));
    let setup = u64::from_le_bytes([0x80, 6, 0, 1, 0, 0, 18, 0]);
    let xfer = [
        trb_bytes(setup, 8, (TRB_SETUP_STAGE << 10) | TRB_IDT | (3 << 16) | c),
        trb_bytes(BUF, 18, (TRB_DATA_STAGE << 10) | TRB_DIR_IN | c),
        trb_bytes(0, 0, (TRB_STATUS_STAGE << 10) | TRB_IOC | c),
    ];
    for (i, t) in xfer.iter().enumerate() {
        e.ram(EP0_RING + 16 * i as u64, t);
    }
    e.w32(OP_BASE + OP_USBCMD, USBCMD_HCRST)
        .w32(OP_BASE + OP_CONFIG, 64)
        .write(OP_BASE + OP_DCBAAP_LO, Double, DCBAA)
        .write(OP_BASE + OP_CRCR_LO, Double, CMD_RING | CRCR_RCS)
        .w32(ir(0, IR_ERSTSZ), 1)
        .write(ir(0, IR_ERDP_LO), Double, EVENT_RING)
        .write(ir(0, IR_ERSTBA_LO), Double, ERST)
        .w32(ir(0, IR_IMOD), 0)
        .w32(ir(0, IR_IMAN), IMAN_IE)
        .w32(OP_BASE + OP_USBCMD, USBCMD_RS | USBCMD_INTE)
        // A USB 2 port is enabled by a port reset.
        .w32(portsc, PORTSC_PP | PORTSC_PR)
        .w32(DOORBELL_BASE, 0)
        .w32(DOORBELL_BASE + 4, 1)
        .read(OP_BASE + OP_USBSTS, Word)
        .read(portsc, Word)
        .w32(ir(0, IR_IMAN), IMAN_IP | IMAN_IE)
        .write(ir(0, IR_ERDP_LO), Double, (EVENT_RING + 0x40) | ERDP_EHB)
        .extra(&[0, 4, 1])
        .extra(&[1, 0, 0x40, 0, 0x40]);
    vec![e.finish()]
}

/// One of every request, and some near misses.
pub fn control_request() -> Vec<Vec<u8>> {
    [
        r#"{"cmd":"status"}"#,
        r#"{"cmd":"pause"}"#,
        r#"{"cmd":"send-keys","keys":["ctrl","alt","delete"]}"#,
        r#"{"cmd":"pointer","x":100,"y":32767,"buttons":["left","middle"]}"#,
        r#"{"cmd":"screenshot","path":"/tmp/s.png"}"#,
        "{\"cmd\":\"subscribe\"}\r\n",
        r#"{"cmd":"pointer","x":-1,"y":0}"#,
        r#"{"cmd":"send-keys","keys":["a","a"]}"#,
        r#"{"cmd":"screenshot","path":"relative"}"#,
        r#"[{"cmd":"status"}]"#,
        r#"{"cmd":"nope","x":1}"#,
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

/// A valid header and every device state the target decodes, as saved
/// from devices the guest programmed.
pub fn snapshot() -> Vec<Vec<u8>> {
    use crate::snapshot as s;
    use machine::registry::DeviceState;
    use machine::snapshot::{Header, RamRegion, SavedMachine, Section};
    let header = Header {
        vmapple_version: machine::snapshot::format::VMAPPLE_VERSION.into(),
        accelerator: "tcg".into(),
        machine: SavedMachine {
            cpus: 2,
            ram_size: 16 << 20,
            devices: vec!["gic".into(), "pl011".into()],
            platform: String::new(),
            msi: false,
            pointer_auth: false,
        },
        counter: 1234,
        powers: vec![accel::CpuPower::On, accel::CpuPower::Off],
        cpus: Section::new("cpus", vec![7; 64]),
        devices: vec![Section::new("gic", vec![1, 2, 3])],
        // The decoder checks memory images against the file's length,
        // which here is the input's: one image that fits in it.
        ram: vec![RamRegion {
            base: 0x7000_0000,
            size: 0x10,
            offset: 0,
        }],
        file_len: 0x10,
        disks: Vec::new(),
    };
    let mut out = Vec::new();
    let mut h = vec![s::HEADER];
    h.extend(header.encode().expect("the sample header encodes"));
    out.push(h);
    let seed = |which: u8, device: &dyn DeviceState| {
        let mut v = vec![which];
        v.extend(device.save().expect("a device saves"));
        v
    };
    let gic = s::gic();
    gic.write_sysreg(0, arch_arm64::sysreg::ICC_PMR_EL1, 0xf0);
    out.push(seed(s::GIC, &*gic));
    let uart = s::pl011();
    uart.receive(b"typed ahead");
    out.push(seed(s::PL011, &*uart));
    let gpio = s::pl061();
    gpio.set_input(3, true);
    out.push(seed(s::PL061, &*gpio));
    out.push(seed(s::AES, &*s::aes()));
    out.push(seed(s::PCI_HOST, &s::pci_host()));
    out.push(seed(s::VIRTIO_BLK, &s::virtio_blk()));
    // A running one: queue 0 enabled, its rings in RAM, part-way round.
    use virtio::transport::pci::{SavedQueue, SavedVirtioPci};
    let running = s::virtio_blk();
    running
        .restore_state(&SavedVirtioPci {
            device_feature_select: 0,
            driver_feature_select: 1,
            driver_features: virtio::device::VIRTIO_F_VERSION_1,
            status: 0xf,
            queue_select: 0,
            queues: vec![SavedQueue {
                size: 16,
                enabled: true,
                desc: s::VIRTIO_RAM + 0x1000,
                driver: s::VIRTIO_RAM + 0x2000,
                device: s::VIRTIO_RAM + 0x3000,
            }],
            positions: vec![(300, 298)],
            live: true,
            bus_master: true,
            isr: 1,
            config_generation: 2,
            pci_cfg_window: vec![0; 16],
            config_vector: virtio::transport::pci::NO_VECTOR,
            queue_vectors: vec![virtio::transport::pci::NO_VECTOR],
            msix: None,
            device: None,
        })
        .expect("a running virtio-blk state restores");
    out.push(seed(s::VIRTIO_BLK, &running));
    // The same with MSI-X: vectors chosen, the table programmed, MSI-X
    // enabled with one message pending under a mask.
    let mut saved = running.save_state().expect("it saves");
    saved.isr = 0;
    saved.config_vector = 0;
    saved.queue_vectors = vec![1];
    saved.msix = Some(pci::msix::SavedMsix {
        control: pci::msix::CONTROL_ENABLE,
        table: vec![[0x1fff_0040, 0, 0xa0, 1], [0x1fff_0040, 0, 0xa1, 0]],
        pba: vec![1],
    });
    let msix = s::virtio_blk_msix();
    msix.restore_state(&saved)
        .expect("a running virtio-blk state with MSI-X restores");
    msix.quiesce();
    out.push(seed(s::VIRTIO_BLK_MSIX, &msix));
    out.push(seed(s::VIRTIO_GPU, &s::virtio_gpu()));
    // A running GPU: a 16x16 resource backed in RAM, shown on its head.
    let mut gpu = running.save_state().expect("it saves");
    gpu.queues.push(gpu.queues[0].clone());
    gpu.queues[1].driver += 0x800;
    gpu.queues[1].device += 0x800;
    gpu.queues[1].desc += 0x4000;
    gpu.positions = vec![(3, 3), (1, 1)];
    gpu.queue_vectors.push(virtio::transport::pci::NO_VECTOR);
    gpu.device = Some(virtio::device::SavedDevice::Gpu(virtio::gpu::SavedGpu {
        events_read: 0,
        resources: vec![virtio::gpu::SavedResource {
            id: 1,
            format: 2,
            width: 16,
            height: 16,
            backing: vec![(s::VIRTIO_RAM + 0x8000, 16 * 16 * 4)],
        }],
        scanouts: vec![virtio::gpu::SavedScanout {
            resource: 1,
            rect: (0, 0, 16, 16),
        }],
    }));
    let running_gpu = s::virtio_gpu();
    running_gpu
        .restore_state(&gpu)
        .expect("a running virtio-gpu state restores");
    out.push(seed(s::VIRTIO_GPU, &running_gpu));
    out.push(seed(s::XHCI, &s::xhci()));
    out.push(seed(s::XHCI, &running_xhci()));
    out
}

/// The fuzz target's XHCI running, with an event ring part-way round,
/// the tablet in slot 1 with its interrupt endpoint and a report queued.
fn running_xhci() -> usb::Xhci {
    use crate::snapshot::{xhci, XHCI_RAM};
    use usb::xhci::SavedXhci;
    let x = xhci();
    let mut saved: SavedXhci = x.save_state().expect("it saves");
    saved.usbcmd = 0x5; // RS | INTE
    saved.usbsts &= !0x1; // running
    saved.dcbaap = XHCI_RAM;
    saved.config = 4;
    saved.bus_master = true;
    saved.command_ring.dequeue = XHCI_RAM + 0x1000;
    saved.command_ring.cycle = true;
    saved.crr = true;
    let ir = &mut saved.interrupters[0];
    ir.iman = 2;
    ir.erstsz = 1;
    ir.erstba = XHCI_RAM + 0x2000;
    ir.erdp = XHCI_RAM + 0x3000 + 5 * 16;
    ir.segment = Some((XHCI_RAM + 0x3000, 64));
    ir.enq_index = 7;
    let slot = &mut saved.slots[0];
    slot.enabled = true;
    slot.state = 3;
    slot.port = usb::xhci::TABLET_PORT as u8;
    slot.address = 1;
    slot.output_ctx = XHCI_RAM + 0x9000;
    slot.endpoints[0].state = 1;
    slot.endpoints[0].ep_type = 4;
    slot.endpoints[0].ring.dequeue = XHCI_RAM + 0x1_0000;
    slot.endpoints[2].state = 1;
    slot.endpoints[2].ep_type = 7;
    slot.endpoints[2].ring.dequeue = XHCI_RAM + 0x1_1000;
    slot.endpoints[2].ring.cycle = true;
    if let Some(usb::hid::SavedDevice::Tablet { hid, x, .. }) =
        &mut saved.ports[usb::xhci::TABLET_PORT - 1].device
    {
        hid.configuration = 1;
        hid.queue = vec![vec![0, 1, 0, 2, 0, 0]];
        *x = 1;
    }
    x.restore_state(&saved)
        .expect("a running XHCI state restores");
    x
}

/// MSI-X enabled, vector 0 aimed at the v2m doorbell and vector 1 at the
/// distributor's, both unmasked, each signalled; then a masked vector that
/// is signalled and unmasked, and a doorbell rung directly.
pub fn msix() -> Vec<Vec<u8>> {
    use crate::msix::*;
    use pci::msix::{ENTRY_DATA, ENTRY_SIZE, ENTRY_VECTOR_CONTROL};
    let cap = u64::from(pci::capability::CAP_START);
    let mut e = Encoder::new();
    e.write(CONFIG + cap + 2, AccessWidth::Half, 0x8000);
    for (vector, address, data) in [
        (0u64, DOORBELLS.v2m_base + 0x40, 0xa5u32),
        (1, DOORBELLS.gicd_base + 0x40, 0xb0),
        (2, DOORBELLS.v2m_base + 0x40, 0xc0),
    ] {
        let entry = TABLE + vector * ENTRY_SIZE;
        e.write(entry, AccessWidth::Double, address);
        e.w32(entry + ENTRY_DATA, data);
        if vector < 2 {
            e.w32(entry + ENTRY_VECTOR_CONTROL, 0);
        }
    }
    e.extra(&0u16.to_le_bytes()).extra(&1u16.to_le_bytes());
    e.extra(&2u16.to_le_bytes());
    e.w32(TABLE + 2 * ENTRY_SIZE + ENTRY_VECTOR_CONTROL, 0);
    e.w32(V2M + 0x40, 0xd0);
    // Hostile: an address that is no doorbell, an INTID outside the block.
    e.write(TABLE + 3 * ENTRY_SIZE, AccessWidth::Double, 0x7000_0000);
    e.w32(TABLE + 3 * ENTRY_SIZE + ENTRY_DATA, 0xa1);
    e.w32(TABLE + 3 * ENTRY_SIZE + ENTRY_VECTOR_CONTROL, 0);
    e.extra(&3u16.to_le_bytes());
    e.w32(GICD + 0x40, 33);
    vec![e.finish()]
}

/// Registers pointing at plausible addresses, then real encodings of every
/// form the decoder takes (the words of arch-arm64's decoder tests) and
/// two it must refuse (a branch and an all-ones word).
pub fn loadstore() -> Vec<Vec<u8>> {
    let mut v = Vec::new();
    for i in 0..31u64 {
        v.extend((0x7000_0000 + i * 0x100).to_le_bytes());
    }
    v.extend(0x7010_0000u64.to_le_bytes());
    for i in 0..32u64 {
        v.extend(i.to_le_bytes());
    }
    for word in [
        0xb808_0d09u32,
        0xb85f_cc41,
        0xf841_0483,
        0x381f_f4c5,
        0x7840_2d07,
        0x3880_1549,
        0x38c0_1d8b,
        0x7880_25cd,
        0x78df_ee0f,
        0xb880_4651,
        0x7900_0e93,
        0xf840_8ff5,
        0xb85f_d2f6,
        0xf800_8b38,
        0xf940_0020,
        0xb863_6841,
        0xf866_78a4,
        0x3869_4907,
        0x78ac_d96a,
        0xb82f_f9cd,
        0xb8b2_5a30,
        0x1400_0000,
        0xffff_ffff,
    ] {
        v.extend(word.to_le_bytes());
    }
    vec![v]
}

/// A 4 KiB-granule walk through levels 1 to 3 to a page, a 16 KiB
/// upper-half walk as XNU sets it up, and the MMU off; descriptor memory
/// is 255 words repeating, so each table's entries land on distinct words.
pub fn stage1() -> Vec<Vec<u8>> {
    const VALID_TABLE: u64 = 0b11;
    const WORDS: usize = 255;
    let seed =
        |sctlr: u64, tcr: u64, ttbr0: u64, ttbr1: u64, words: &[(usize, u64)], vas: &[u64]| {
            let mut v = Vec::new();
            for r in [sctlr, tcr, ttbr0, ttbr1] {
                v.extend(r.to_le_bytes());
            }
            let mut memory = [0u64; WORDS];
            for &(i, w) in words {
                memory[i] = w;
            }
            v.push(WORDS as u8);
            for w in memory {
                v.extend(w.to_le_bytes());
            }
            for va in vas {
                v.extend(va.to_le_bytes());
            }
            v
        };
    // Which word of descriptor memory a table entry reads.
    let at = |table: u64, index: u64| ((table + index * 8) / 8 % WORDS as u64) as usize;
    // T0SZ 25: a 39-bit space, 4 KiB granule, walk from level 1.
    let va = (1u64 << 30) | (2 << 21) | (3 << 12) | 0x789;
    let l2 = 0x1000u64;
    let l3 = 0x2000u64;
    let four_k = seed(
        1,
        25,
        0,
        0,
        &[
            (at(0, 1), l2 | VALID_TABLE),
            (at(l2, 2), l3 | VALID_TABLE),
            (at(l3, 3), 0x7777_7000 | VALID_TABLE | (1 << 10)),
        ],
        &[va, va + 0x10, 0x7f_ffff_f000],
    );
    // T1SZ 25 with TG1 = 16 KiB and TBI1, as XNU configures it: levels
    // 1 (VA bits 36-38), 2 (25-35) and 3 (14-24).
    let va = 0xffff_ffe0_0123_4567u64;
    let (l1, l2, l3) = (0x4000u64, 0x8000u64, 0xc000u64);
    let upper = seed(
        1,
        (25 << 16) | (0b01 << 30) | (1 << 38),
        0,
        l1,
        &[
            (at(l1, (va >> 36) & 7), l2 | VALID_TABLE),
            (at(l2, (va >> 25) & 0x7ff), l3 | VALID_TABLE),
            (at(l3, (va >> 14) & 0x7ff), 0x7000_4000 | VALID_TABLE),
        ],
        &[va, 0xff00_0000_0000_1000],
    );
    let off = seed(0, 0, 0, 0, &[], &[0x4000_1234, u64::MAX]);
    vec![four_k, upper, off]
}

/// A VirtualMac2,1-like tree (arm-io with `ranges`, the AVP RTC, a PL031)
/// raw, and wrapped in an IM4P as an IPSW carries it.
pub fn apple_dt() -> Vec<Vec<u8>> {
    use machine::adt::{im4p, Node};
    let u64s = |v: &[u64]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let leaf = |name: &[u8], compatible: &[u8], reg: &[u64], irq: u32| {
        Node::new(
            &[
                ("name", name),
                ("compatible", compatible),
                ("reg", &u64s(reg)),
                ("interrupts", &irq.to_le_bytes()),
            ],
            Vec::new(),
        )
    };
    let ranges = u64s(&[
        0x1000_0000,
        0x2000_0000,
        0x1000_0000,
        0x2000_0000,
        0x3000_0000,
        0x1000_0000,
    ]);
    let arm_io = Node::new(
        &[
            ("name", b"arm-io\0"),
            ("#address-cells", &2u32.to_le_bytes()),
            ("ranges", &ranges),
        ],
        vec![
            leaf(b"avp-rtc\0", b"avp,rtc\0", &[0x2024_0000, 0x4000], 51),
            leaf(b"pl031-rtc\0", b"ARM,pl031\0", &[0x1005_0000, 0x1000], 40),
        ],
    );
    let tree = Node::new(&[("name", b"device-tree\0")], vec![arm_io]).to_bytes();
    let wrapped = im4p("dtre", "seed", &tree);
    vec![tree, wrapped]
}
