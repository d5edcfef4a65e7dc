//! virtio-gpu in 2D mode (virtio 1.2 §5.7): scanouts fed from guest
//! resources into the machine's [`display::Display`].
//!
//! # Commands
//!
//! Control queue: GET_DISPLAY_INFO, GET_EDID, RESOURCE_CREATE_2D,
//! RESOURCE_UNREF, RESOURCE_ATTACH_BACKING, RESOURCE_DETACH_BACKING,
//! SET_SCANOUT, TRANSFER_TO_HOST_2D and RESOURCE_FLUSH. Cursor queue:
//! UPDATE_CURSOR and MOVE_CURSOR. 3D, blob and UUID commands answer
//! ERR_UNSPEC (their features are not offered).
//!
//! # Hostile input
//!
//! Every field comes from the guest. Resource ids must be new on create
//! and known elsewhere; formats must be one of the eight 32-bit 2D ones;
//! sizes are at most [`MAX_SIDE`] a side, and all resources of a device
//! together hold at most [`MAX_HOST_BYTES`] of host memory (a create past
//! that answers ERR_OUT_OF_MEMORY), at most [`MAX_RESOURCES`] of them.
//! Backing entries must lie in guest RAM (they may overlap: the device
//! only reads them) and are at most [`MAX_BACKING_ENTRIES`] per resource.
//! Rectangles must lie inside their resource. A bad command answers the
//! matching ERR_* and changes nothing. Each kick handles at most a queue's
//! worth of commands, each bounded by the memory cap.
//!
//! # Threading
//!
//! Commands run on the vCPU thread that kicked the queue, like
//! virtio-blk's: a transfer is a copy out of guest RAM, a flush a copy into
//! the display's head (front ends copy out of it under the same short
//! lock, never while they encode or send).

use std::collections::HashMap;
use std::sync::Arc;

use display::{CursorImage, Display, DisplayMode, Rect};
use virtio_queue::{Queue, QueueT};
use vm_core::memory::range_is_ram;
use vm_core::{guest_error, GuestRam};

use crate::block::chain::{self, read_stream, stream_len, write_stream, Chain, Segment};
use crate::device::{
    ActivateContext, ActivateError, PciIdentity, QueuePosition, SavedDevice, VirtioDevice,
    VirtioInterrupt, VIRTIO_F_VERSION_1,
};

/// virtio device type of a GPU.
pub const DEVICE_TYPE: u32 = 16;

/// Entries per queue.
pub const QUEUE_SIZE: u16 = 256;

/// Scanouts this device can have.
pub const MAX_SCANOUTS: usize = 4;

/// Largest side of a resource, in pixels.
pub const MAX_SIDE: u32 = 16384;

/// Host memory all resources of one device may hold together: four 4K
/// heads double-buffered (4 x 2 x 3840 x 2160 x 4 bytes) fit with room.
pub const MAX_HOST_BYTES: u64 = 384 << 20;

/// Resources one device may have at once.
pub const MAX_RESOURCES: usize = 4096;

/// Backing entries per resource (Linux sends one per page run).
pub const MAX_BACKING_ENTRIES: u32 = 1 << 16;

/// The cursor is a 64x64 resource (virtio 1.2 §5.7.6.7).
const CURSOR_SIDE: u32 = 64;

/// `VIRTIO_GPU_F_EDID`.
pub const F_EDID: u64 = 1 << 1;

/// Command and response types (virtio 1.2 §5.7.6.7).
pub mod cmd {
    pub const GET_DISPLAY_INFO: u32 = 0x0100;
    pub const RESOURCE_CREATE_2D: u32 = 0x0101;
    pub const RESOURCE_UNREF: u32 = 0x0102;
    pub const SET_SCANOUT: u32 = 0x0103;
    pub const RESOURCE_FLUSH: u32 = 0x0104;
    pub const TRANSFER_TO_HOST_2D: u32 = 0x0105;
    pub const RESOURCE_ATTACH_BACKING: u32 = 0x0106;
    pub const RESOURCE_DETACH_BACKING: u32 = 0x0107;
    pub const GET_EDID: u32 = 0x010a;
    pub const UPDATE_CURSOR: u32 = 0x0300;
    pub const MOVE_CURSOR: u32 = 0x0301;

    pub const OK_NODATA: u32 = 0x1100;
    pub const OK_DISPLAY_INFO: u32 = 0x1101;
    pub const OK_EDID: u32 = 0x1104;
    pub const ERR_UNSPEC: u32 = 0x1200;
    pub const ERR_OUT_OF_MEMORY: u32 = 0x1201;
    pub const ERR_INVALID_SCANOUT_ID: u32 = 0x1202;
    pub const ERR_INVALID_RESOURCE_ID: u32 = 0x1203;
    pub const ERR_INVALID_PARAMETER: u32 = 0x1205;
}

/// `VIRTIO_GPU_FLAG_FENCE`.
const FLAG_FENCE: u32 = 1;

/// Size of `struct virtio_gpu_ctrl_hdr`.
const HDR_LEN: usize = 24;

/// Pixel formats (virtio 1.2 §5.7.6.8), named by byte order in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Bgra,
    Argb,
    Rgba,
    Abgr,
}

impl Format {
    fn from_wire(v: u32) -> Option<Self> {
        Some(match v {
            1 | 2 => Format::Bgra,    // B8G8R8A8, B8G8R8X8
            3 | 4 => Format::Argb,    // A8R8G8B8, X8R8G8B8
            67 | 134 => Format::Rgba, // R8G8B8A8, R8G8B8X8
            68 | 121 => Format::Abgr, // X8B8G8R8, A8B8G8R8
            _ => return None,
        })
    }

    /// A pixel's four bytes as `0xAARRGGBB`.
    fn argb(self, b: &[u8]) -> u32 {
        let (a, r, g, bl) = match self {
            Format::Bgra => (b[3], b[2], b[1], b[0]),
            Format::Argb => (b[0], b[1], b[2], b[3]),
            Format::Rgba => (b[3], b[0], b[1], b[2]),
            Format::Abgr => (b[0], b[3], b[2], b[1]),
        };
        u32::from_be_bytes([a, r, g, bl])
    }
}

struct Resource {
    format: Format,
    width: u32,
    height: u32,
    /// The host copy, `width * height * 4` bytes in `format`.
    data: Vec<u8>,
    backing: Vec<Segment>,
}

impl Resource {
    fn bytes(width: u32, height: u32) -> u64 {
        u64::from(width) * u64::from(height) * 4
    }

    fn contains(&self, r: &Rect) -> bool {
        u64::from(r.x) + u64::from(r.width) <= u64::from(self.width)
            && u64::from(r.y) + u64::from(r.height) <= u64::from(self.height)
    }

    /// `r` (inside the resource) as `0xAARRGGBB` rows.
    fn pixels(&self, r: &Rect) -> Vec<u32> {
        let mut out = Vec::with_capacity(r.width as usize * r.height as usize);
        let stride = self.width as usize * 4;
        for y in r.y..r.y + r.height {
            let at = y as usize * stride + r.x as usize * 4;
            let row = &self.data[at..at + r.width as usize * 4];
            out.extend(row.chunks_exact(4).map(|p| self.format.argb(p)));
        }
        out
    }
}

#[derive(Clone, Copy, Default)]
struct Scanout {
    resource: u32,
    rect: Rect,
}

/// The device's state apart from its queues.
struct Gpu {
    display: Arc<Display>,
    resources: HashMap<u32, Resource>,
    host_bytes: u64,
    scanouts: Vec<Scanout>,
}

/// A parsed command's little-endian fields after the header.
struct Fields<'a>(&'a [u8]);

impl Fields<'_> {
    fn u32(&self, at: usize) -> u32 {
        self.0
            .get(HDR_LEN + at..HDR_LEN + at + 4)
            .map_or(0, |b| u32::from_le_bytes(b.try_into().unwrap_or([0; 4])))
    }
    fn u64(&self, at: usize) -> u64 {
        u64::from(self.u32(at)) | u64::from(self.u32(at + 4)) << 32
    }
    fn rect(&self, at: usize) -> Rect {
        Rect::new(
            self.u32(at),
            self.u32(at + 4),
            self.u32(at + 8),
            self.u32(at + 12),
        )
    }
}

/// A command's answer: its type and payload after the header.
struct Reply {
    kind: u32,
    body: Vec<u8>,
}

impl Reply {
    fn ok() -> Self {
        Self::err(cmd::OK_NODATA)
    }
    fn err(kind: u32) -> Self {
        Self {
            kind,
            body: Vec::new(),
        }
    }
}

/// Bytes each command needs after its header.
fn body_len(kind: u32) -> usize {
    match kind {
        cmd::GET_EDID | cmd::RESOURCE_UNREF | cmd::RESOURCE_DETACH_BACKING => 8,
        cmd::RESOURCE_CREATE_2D => 16,
        cmd::SET_SCANOUT | cmd::RESOURCE_FLUSH => 24,
        cmd::TRANSFER_TO_HOST_2D => 32,
        cmd::RESOURCE_ATTACH_BACKING => 8,
        cmd::UPDATE_CURSOR | cmd::MOVE_CURSOR => 32,
        _ => 0,
    }
}

impl Gpu {
    fn handle(&mut self, mem: &GuestRam, chain: &Chain) -> Reply {
        let mut req = [0u8; HDR_LEN + 32];
        let got = read_stream(mem, &chain.readable, 0, &mut req).unwrap_or(0);
        if got < HDR_LEN {
            guest_error!("virtio-gpu: command of {got} bytes has no header");
            return Reply::err(cmd::ERR_UNSPEC);
        }
        let kind = u32::from_le_bytes([req[0], req[1], req[2], req[3]]);
        if got < HDR_LEN + body_len(kind) {
            guest_error!("virtio-gpu: command {kind:#x} is {got} bytes, too short");
            return Reply::err(cmd::ERR_INVALID_PARAMETER);
        }
        let f = Fields(&req);
        tracing::trace!(
            "virtio-gpu: command {kind:#x} {:?}",
            (
                f.u32(0),
                f.u32(4),
                f.u32(8),
                f.u32(12),
                f.u32(16),
                f.u32(20)
            )
        );
        match kind {
            cmd::GET_DISPLAY_INFO => self.display_info(),
            cmd::GET_EDID => self.edid(f.u32(0)),
            cmd::RESOURCE_CREATE_2D => self.create(f.u32(0), f.u32(4), f.u32(8), f.u32(12)),
            cmd::RESOURCE_UNREF => self.unref(f.u32(0)),
            cmd::RESOURCE_ATTACH_BACKING => self.attach(mem, chain, f.u32(0), f.u32(4)),
            cmd::RESOURCE_DETACH_BACKING => match self.resources.get_mut(&f.u32(0)) {
                Some(r) => {
                    r.backing = Vec::new();
                    Reply::ok()
                }
                None => self.no_resource("detach", f.u32(0)),
            },
            cmd::SET_SCANOUT => self.set_scanout(f.rect(0), f.u32(16), f.u32(20)),
            cmd::TRANSFER_TO_HOST_2D => self.transfer(mem, f.rect(0), f.u64(16), f.u32(24)),
            cmd::RESOURCE_FLUSH => self.flush(f.rect(0), f.u32(16)),
            cmd::UPDATE_CURSOR | cmd::MOVE_CURSOR => self.cursor(
                kind,
                f.u32(0),
                f.u32(4),
                f.u32(8),
                f.u32(16),
                f.u32(20),
                f.u32(24),
            ),
            _ => {
                guest_error!("virtio-gpu: unsupported command {kind:#x}");
                Reply::err(cmd::ERR_UNSPEC)
            }
        }
    }

    fn no_resource(&self, what: &str, id: u32) -> Reply {
        guest_error!("virtio-gpu: {what}: no resource {id}");
        Reply::err(cmd::ERR_INVALID_RESOURCE_ID)
    }

    fn display_info(&self) -> Reply {
        let mut body = vec![0u8; 16 * 24];
        for (i, head) in self.display.heads().iter().enumerate().take(MAX_SCANOUTS) {
            let Some(m) = head.modes().first() else {
                continue;
            };
            let e = &mut body[i * 24..i * 24 + 24];
            e[8..12].copy_from_slice(&u32::from(m.width).to_le_bytes());
            e[12..16].copy_from_slice(&u32::from(m.height).to_le_bytes());
            e[16..20].copy_from_slice(&1u32.to_le_bytes());
        }
        Reply {
            kind: cmd::OK_DISPLAY_INFO,
            body,
        }
    }

    fn edid(&self, scanout: u32) -> Reply {
        let Some(head) = self.display.head(scanout as usize) else {
            guest_error!("virtio-gpu: EDID of scanout {scanout}");
            return Reply::err(cmd::ERR_INVALID_SCANOUT_ID);
        };
        let edid = edid(head.modes(), scanout);
        let mut body = vec![0u8; 8 + 1024];
        body[0..4].copy_from_slice(&(edid.len() as u32).to_le_bytes());
        body[8..8 + edid.len()].copy_from_slice(&edid);
        Reply {
            kind: cmd::OK_EDID,
            body,
        }
    }

    fn create(&mut self, id: u32, format: u32, width: u32, height: u32) -> Reply {
        if id == 0 || self.resources.contains_key(&id) {
            guest_error!("virtio-gpu: create: resource id {id} is 0 or in use");
            return Reply::err(cmd::ERR_INVALID_RESOURCE_ID);
        }
        let Some(format) = Format::from_wire(format) else {
            guest_error!("virtio-gpu: create: unknown format {format}");
            return Reply::err(cmd::ERR_INVALID_PARAMETER);
        };
        if width == 0 || height == 0 || width > MAX_SIDE || height > MAX_SIDE {
            guest_error!("virtio-gpu: create: bad size {width}x{height}");
            return Reply::err(cmd::ERR_INVALID_PARAMETER);
        }
        let bytes = Resource::bytes(width, height);
        if self.host_bytes + bytes > MAX_HOST_BYTES || self.resources.len() >= MAX_RESOURCES {
            guest_error!(
                "virtio-gpu: create: {width}x{height} would pass the device's {} MiB / {MAX_RESOURCES} resources",
                MAX_HOST_BYTES >> 20
            );
            return Reply::err(cmd::ERR_OUT_OF_MEMORY);
        }
        self.host_bytes += bytes;
        self.resources.insert(
            id,
            Resource {
                format,
                width,
                height,
                data: vec![0; bytes as usize],
                backing: Vec::new(),
            },
        );
        Reply::ok()
    }

    fn unref(&mut self, id: u32) -> Reply {
        let Some(r) = self.resources.remove(&id) else {
            return self.no_resource("unref", id);
        };
        self.host_bytes -= Resource::bytes(r.width, r.height);
        for (i, s) in self.scanouts.iter_mut().enumerate() {
            if s.resource == id {
                *s = Scanout::default();
                if let Some(h) = self.display.head(i) {
                    h.disable();
                }
            }
        }
        Reply::ok()
    }

    fn attach(&mut self, mem: &GuestRam, chain: &Chain, id: u32, entries: u32) -> Reply {
        if !self.resources.contains_key(&id) {
            return self.no_resource("attach", id);
        }
        if entries == 0 || entries > MAX_BACKING_ENTRIES {
            guest_error!("virtio-gpu: attach: {entries} backing entries");
            return Reply::err(cmd::ERR_INVALID_PARAMETER);
        }
        let need = HDR_LEN as u64 + 8 + u64::from(entries) * 16;
        if stream_len(&chain.readable) < need {
            guest_error!("virtio-gpu: attach: {entries} entries do not fit the command");
            return Reply::err(cmd::ERR_INVALID_PARAMETER);
        }
        let mut raw = vec![0u8; entries as usize * 16];
        if read_stream(mem, &chain.readable, HDR_LEN as u64 + 8, &mut raw).is_err() {
            return Reply::err(cmd::ERR_UNSPEC);
        }
        let mut backing = Vec::with_capacity(entries as usize);
        for e in raw.chunks_exact(16) {
            let addr = u64::from_le_bytes(e[0..8].try_into().unwrap_or([0; 8]));
            let len = u32::from_le_bytes(e[8..12].try_into().unwrap_or([0; 4]));
            if !range_is_ram(mem, addr, u64::from(len)) {
                guest_error!("virtio-gpu: attach: backing {addr:#x}+{len:#x} is not RAM");
                return Reply::err(cmd::ERR_UNSPEC);
            }
            backing.push(Segment { addr, len });
        }
        if let Some(r) = self.resources.get_mut(&id) {
            r.backing = backing;
        }
        Reply::ok()
    }

    fn set_scanout(&mut self, rect: Rect, scanout: u32, id: u32) -> Reply {
        let index = scanout as usize;
        if index >= self.scanouts.len() {
            guest_error!("virtio-gpu: set_scanout: no scanout {scanout}");
            return Reply::err(cmd::ERR_INVALID_SCANOUT_ID);
        }
        if id == 0 {
            self.scanouts[index] = Scanout::default();
            if let Some(h) = self.display.head(index) {
                h.disable();
            }
            return Reply::ok();
        }
        let Some(r) = self.resources.get(&id) else {
            return self.no_resource("set_scanout", id);
        };
        if rect.is_empty() || !r.contains(&rect) {
            guest_error!("virtio-gpu: set_scanout: {rect:?} is not inside resource {id}");
            return Reply::err(cmd::ERR_INVALID_PARAMETER);
        }
        self.scanouts[index] = Scanout { resource: id, rect };
        if let Some(h) = self.display.head(index) {
            h.set_size(rect.width, rect.height);
            h.write(Rect::new(0, 0, rect.width, rect.height), &r.pixels(&rect));
        }
        Reply::ok()
    }

    fn transfer(&mut self, mem: &GuestRam, rect: Rect, offset: u64, id: u32) -> Reply {
        let Some(r) = self.resources.get_mut(&id) else {
            return self.no_resource("transfer", id);
        };
        if !r.contains(&rect) {
            guest_error!("virtio-gpu: transfer: {rect:?} is not inside resource {id}");
            return Reply::err(cmd::ERR_INVALID_PARAMETER);
        }
        if r.backing.is_empty() {
            guest_error!("virtio-gpu: transfer: resource {id} has no backing");
            return Reply::err(cmd::ERR_UNSPEC);
        }
        let stride = u64::from(r.width) * 4;
        let row_bytes = rect.width as usize * 4;
        for row in 0..u64::from(rect.height) {
            // The offset locates the rectangle's first pixel in the backing;
            // rows follow at the resource's stride.
            let src = offset.saturating_add(row * stride);
            let dst = ((u64::from(rect.y) + row) * stride + u64::from(rect.x) * 4) as usize;
            let out = &mut r.data[dst..dst + row_bytes];
            match read_stream(mem, &r.backing, src, out) {
                Ok(n) if n == row_bytes => {}
                _ => {
                    guest_error!("virtio-gpu: transfer: row {row} is past resource {id}'s backing");
                    return Reply::err(cmd::ERR_INVALID_PARAMETER);
                }
            }
        }
        Reply::ok()
    }

    fn flush(&mut self, rect: Rect, id: u32) -> Reply {
        let Some(r) = self.resources.get(&id) else {
            return self.no_resource("flush", id);
        };
        if !r.contains(&rect) {
            guest_error!("virtio-gpu: flush: {rect:?} is not inside resource {id}");
            return Reply::err(cmd::ERR_INVALID_PARAMETER);
        }
        for (i, s) in self.scanouts.iter().enumerate() {
            if s.resource != id {
                continue;
            }
            // The flushed part of what this scanout shows.
            let x0 = rect.x.max(s.rect.x);
            let y0 = rect.y.max(s.rect.y);
            let x1 = (rect.x + rect.width).min(s.rect.x + s.rect.width);
            let y1 = (rect.y + rect.height).min(s.rect.y + s.rect.height);
            if x0 >= x1 || y0 >= y1 {
                continue;
            }
            let part = Rect::new(x0, y0, x1 - x0, y1 - y0);
            if let Some(h) = self.display.head(i) {
                let at = Rect::new(x0 - s.rect.x, y0 - s.rect.y, part.width, part.height);
                h.write(at, &r.pixels(&part));
            }
        }
        Reply::ok()
    }

    #[allow(clippy::too_many_arguments)]
    fn cursor(
        &mut self,
        kind: u32,
        scanout: u32,
        x: u32,
        y: u32,
        id: u32,
        hot_x: u32,
        hot_y: u32,
    ) -> Reply {
        let Some(head) = self
            .display
            .head(scanout as usize)
            .filter(|_| (scanout as usize) < self.scanouts.len())
        else {
            guest_error!("virtio-gpu: cursor on scanout {scanout}");
            return Reply::err(cmd::ERR_INVALID_SCANOUT_ID);
        };
        if kind == cmd::UPDATE_CURSOR {
            if id == 0 {
                head.set_cursor_image(None);
                head.move_cursor(x, y, false);
                return Reply::ok();
            }
            let Some(r) = self.resources.get(&id) else {
                return self.no_resource("update_cursor", id);
            };
            let side = Rect::new(0, 0, r.width.min(CURSOR_SIDE), r.height.min(CURSOR_SIDE));
            head.set_cursor_image(Some(CursorImage {
                width: side.width,
                height: side.height,
                hot_x: hot_x.min(side.width.saturating_sub(1)),
                hot_y: hot_y.min(side.height.saturating_sub(1)),
                pixels: r.pixels(&side),
            }));
        }
        head.move_cursor(x, y, true);
        Reply::ok()
    }
}

/// A 128-byte EDID 1.4 base block naming `modes` (the first preferred) in
/// detailed timing descriptors; modes a descriptor cannot express (a side
/// over 4095) are left out.
pub fn edid(modes: &[DisplayMode], scanout: u32) -> Vec<u8> {
    let mut e = vec![0u8; 128];
    e[0..8].copy_from_slice(&[0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0]);
    // Manufacturer "VMA" as three 5-bit letters, big-endian.
    let id: u16 =
        (u16::from(b'V' - b'@') << 10) | (u16::from(b'M' - b'@') << 5) | u16::from(b'A' - b'@');
    e[8..10].copy_from_slice(&id.to_be_bytes());
    e[10..12].copy_from_slice(&0x1234u16.to_le_bytes());
    e[12..16].copy_from_slice(&scanout.to_le_bytes());
    e[16] = 1; // week
    e[17] = 34; // 2024
    e[18] = 1;
    e[19] = 4;
    e[20] = 0xa5; // digital, 8 bits per colour, DisplayPort
    e[21] = 53; // 53x30 cm
    e[22] = 30;
    e[23] = 120; // gamma 2.2
    e[24] = 0x06; // RGB 4:4:4, sRGB default, preferred timing is native
                  // sRGB chromaticity.
    e[25..35].copy_from_slice(&[0xee, 0x91, 0xa3, 0x54, 0x4c, 0x99, 0x26, 0x0f, 0x50, 0x54]);
    for st in e[38..54].chunks_exact_mut(2) {
        st.copy_from_slice(&[1, 1]); // unused standard timing
    }
    let mut slot = 0;
    for m in modes
        .iter()
        .filter(|m| m.width <= 4095 && m.height <= 4095)
        .take(3)
    {
        let d = &mut e[54 + slot * 18..72 + slot * 18];
        let (w, h) = (u32::from(m.width), u32::from(m.height));
        let (hb, vb) = (160u32, 40u32.max(h / 20));
        let clock = u64::from(w + hb) * u64::from(h + vb) * u64::from(m.refresh_hz.max(1)) / 10_000;
        let clock = clock.clamp(1, 0xffff) as u16;
        d[0..2].copy_from_slice(&clock.to_le_bytes());
        d[2] = w as u8;
        d[3] = hb as u8;
        d[4] = (((w >> 8) as u8) << 4) | (hb >> 8) as u8;
        d[5] = h as u8;
        d[6] = vb as u8;
        d[7] = (((h >> 8) as u8) << 4) | (vb >> 8) as u8;
        d[8] = 48; // h front porch
        d[9] = 32; // h sync
        d[10] = (3 << 4) | 5; // v front porch 3, v sync 5
        d[11] = 0;
        d[12] = 0x12; // 530 x 300 mm
        d[13] = 0x2c;
        d[14] = 0x21;
        d[17] = 0x1a; // digital separate sync, +hsync -vsync
        slot += 1;
    }
    // Monitor name.
    let d = &mut e[54 + slot * 18..72 + slot * 18];
    d[3] = 0xfc;
    d[5..18].copy_from_slice(b"vmapple\n     ");
    slot += 1;
    for s in slot..4 {
        e[54 + s * 18 + 3] = 0x10; // dummy descriptor
    }
    let sum = e[..127].iter().fold(0u8, |a, b| a.wrapping_add(*b));
    e[127] = 0u8.wrapping_sub(sum);
    e
}

struct Active {
    memory: GuestRam,
    queues: Vec<Queue>,
    interrupt: Arc<dyn VirtioInterrupt>,
}

/// The virtio-gpu device.
pub struct VirtioGpu {
    gpu: Gpu,
    events_read: u32,
    active: Option<Active>,
}

impl VirtioGpu {
    /// A GPU with one scanout per head of `display` (at most
    /// [`MAX_SCANOUTS`]).
    pub fn new(display: Arc<Display>) -> Self {
        let n = display.heads().len().clamp(1, MAX_SCANOUTS);
        Self {
            gpu: Gpu {
                display,
                resources: HashMap::new(),
                host_bytes: 0,
                scanouts: vec![Scanout::default(); n],
            },
            events_read: 0,
            active: None,
        }
    }

    fn config(&self) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[0..4].copy_from_slice(&self.events_read.to_le_bytes());
        c[8..12].copy_from_slice(&(self.gpu.scanouts.len() as u32).to_le_bytes());
        c
    }

    fn clear(&mut self) {
        self.gpu.resources.clear();
        self.gpu.host_bytes = 0;
        for (i, s) in self.gpu.scanouts.iter_mut().enumerate() {
            *s = Scanout::default();
            if let Some(h) = self.gpu.display.head(i) {
                h.disable();
                h.set_cursor_image(None);
            }
        }
    }

    fn process_queue(&mut self, index: u16) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let Some(queue) = active.queues.get_mut(usize::from(index)) else {
            guest_error!("virtio-gpu: notify for missing queue {index}");
            return;
        };
        if !queue.ready() {
            return;
        }
        let mem = &active.memory;
        let mut used_any = false;
        let mut budget = queue.size();
        while budget > 0 {
            let Some(dc) = chain::pop_chain(queue, mem) else {
                break;
            };
            budget -= 1;
            let chain = Chain::walk(dc, mem);
            if chain.head >= queue.size() {
                guest_error!("virtio-gpu: available head {} out of range", chain.head);
                continue;
            }
            let reply = if chain.fault.is_some() {
                guest_error!("virtio-gpu: malformed chain: {:?}", chain.fault);
                Reply::err(cmd::ERR_UNSPEC)
            } else {
                self.gpu.handle(mem, &chain)
            };
            let len = respond(mem, &chain, reply);
            if let Err(e) = queue.add_used(mem, chain.head, len) {
                guest_error!("virtio-gpu: cannot return chain {}: {e}", chain.head);
                break;
            }
            used_any = true;
        }
        if used_any && chain::should_interrupt(queue, mem) {
            active.interrupt.notify_queue(index);
        }
    }
}

/// Writes `reply` (header echoing the request's fence) to the chain's
/// writable part; returns the bytes written.
fn respond(mem: &GuestRam, chain: &Chain, reply: Reply) -> u32 {
    let mut req = [0u8; HDR_LEN];
    let got = read_stream(mem, &chain.readable, 0, &mut req).unwrap_or(0);
    let mut out = vec![0u8; HDR_LEN];
    out[0..4].copy_from_slice(&reply.kind.to_le_bytes());
    if got == HDR_LEN {
        let flags = u32::from_le_bytes([req[4], req[5], req[6], req[7]]);
        if flags & FLAG_FENCE != 0 {
            // Done synchronously, so the fence is signalled with the reply.
            out[4..8].copy_from_slice(&FLAG_FENCE.to_le_bytes());
            out[8..20].copy_from_slice(&req[8..20]);
        }
    }
    out.extend_from_slice(&reply.body);
    write_stream(mem, &chain.writable, 0, &out).unwrap_or(0) as u32
}

impl VirtioDevice for VirtioGpu {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | F_EDID
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let c = self.config();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| c.get(o).copied())
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // events_clear (offset 4) clears the events it names.
        if offset == 4 && data.len() == 4 {
            let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            self.events_read &= !v;
        }
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if !ctx.queues.first().is_some_and(|q| q.ready()) {
            return Err(ActivateError::MissingQueue(0));
        }
        for (i, q) in ctx.queues.iter().enumerate() {
            if q.ready() && !chain::rings_in_ram(q, &ctx.memory) {
                return Err(ActivateError::Other(format!(
                    "virtio-gpu: queue {i} is not inside guest RAM"
                )));
            }
        }
        self.active = Some(Active {
            memory: ctx.memory,
            queues: ctx.queues,
            interrupt: ctx.interrupt,
        });
        Ok(())
    }

    fn queue_notify(&mut self, queue: u16) {
        self.process_queue(queue);
    }

    fn reset(&mut self) {
        self.active = None;
        self.clear();
    }

    fn pci_identity(&self) -> PciIdentity {
        // Display controller, "other" sub-class, as QEMU's virtio-gpu-pci.
        PciIdentity::standard(DEVICE_TYPE, 0x03_80_00)
    }

    /// Commands complete within the kick, on the vCPU thread; resources
    /// and scanouts are the device's own state ([`SavedGpu`]).
    fn saves_state(&self) -> bool {
        true
    }

    fn queue_positions(&self) -> Vec<QueuePosition> {
        self.active
            .as_ref()
            .map(|a| a.queues.iter().map(QueuePosition::of).collect())
            .unwrap_or_default()
    }

    fn save_device(&self) -> Option<SavedDevice> {
        Some(SavedDevice::Gpu(self.save()))
    }

    fn restore_device(&mut self, memory: &GuestRam, saved: &SavedDevice) -> Result<(), String> {
        match saved {
            SavedDevice::Gpu(saved) => self.restore(memory, saved),
            other => Err(format!("a virtio-gpu cannot take {other:?}")),
        }
    }
}

#[path = "gpu_state.rs"]
mod state;
pub use state::{SavedGpu, SavedResource, SavedScanout};

#[cfg(test)]
#[path = "gpu_tests.rs"]
mod tests;
