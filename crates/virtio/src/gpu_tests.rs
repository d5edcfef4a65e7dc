use super::*;
use crate::block::test_driver::{TestInterrupt, TestQueue};
use vm_core::memory::{create_guest_memory, read_exact, write_all};

const RAM: usize = 0x80_0000;
const QUEUE_BASE: u64 = 0x1000;
const CMD: u64 = 0x1_0000;
const RESP: u64 = 0x2_0000;
const BACKING: u64 = 0x10_0000;
const OUTSIDE: u64 = 0x1_0000_0000;

struct Rig {
    mem: GuestRam,
    ctrl: TestQueue,
    cursor: TestQueue,
    dev: VirtioGpu,
    display: Arc<Display>,
}

fn rig(heads: usize) -> Rig {
    let mem = create_guest_memory(&[(0, RAM)]).unwrap();
    let modes = (0..heads)
        .map(|i| vec![DisplayMode::new(640 + 16 * i as u16, 480, 60)])
        .collect();
    let display = Display::new(modes);
    let mut dev = VirtioGpu::new(display.clone());
    let ctrl = TestQueue::new(&mem, QUEUE_BASE, 16);
    let cursor = TestQueue::new(&mem, QUEUE_BASE + 0x1000, 16);
    dev.activate(ActivateContext {
        memory: mem.clone(),
        queues: vec![ctrl.queue(), cursor.queue()],
        acked_features: dev.features(),
        interrupt: Arc::new(TestInterrupt::default()),
    })
    .unwrap();
    Rig {
        mem,
        ctrl,
        cursor,
        dev,
        display,
    }
}

fn hdr(kind: u32) -> Vec<u8> {
    let mut h = vec![0u8; HDR_LEN];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h
}

fn words(kind: u32, w: &[u32]) -> Vec<u8> {
    let mut c = hdr(kind);
    for v in w {
        c.extend_from_slice(&v.to_le_bytes());
    }
    c
}

impl Rig {
    /// Sends `cmd` on queue `q`; returns the response type and bytes.
    fn send_on(&mut self, q: u16, cmd: &[u8]) -> (u32, Vec<u8>) {
        write_all(&self.mem, CMD, cmd).unwrap();
        write_all(&self.mem, RESP, &[0xee; 2048]).unwrap();
        let tq = if q == 0 {
            &mut self.ctrl
        } else {
            &mut self.cursor
        };
        let before = tq.used_idx();
        tq.add_chain(&[(CMD, cmd.len() as u32, false), (RESP, 2048, true)]);
        self.dev.queue_notify(q);
        let tq = if q == 0 { &self.ctrl } else { &self.cursor };
        assert_eq!(tq.used_idx(), before.wrapping_add(1), "command answered");
        let (_, len) = tq.used_elem(before);
        let mut out = vec![0u8; len as usize];
        read_exact(&self.mem, RESP, &mut out).unwrap();
        let kind = u32::from_le_bytes(out[0..4].try_into().unwrap());
        (kind, out)
    }

    fn send(&mut self, cmd: &[u8]) -> u32 {
        self.send_on(0, cmd).0
    }

    /// A `w`x`h` B8G8R8X8 resource `id` backed at BACKING in two pieces.
    fn make_resource(&mut self, id: u32, w: u32, h: u32) {
        assert_eq!(
            self.send(&words(cmd::RESOURCE_CREATE_2D, &[id, 2, w, h])),
            cmd::OK_NODATA
        );
        let len = w * h * 4;
        let half = len / 2;
        let mut c = words(cmd::RESOURCE_ATTACH_BACKING, &[id, 2]);
        for (addr, l) in [(BACKING, half), (BACKING + 0x20_0000, len - half)] {
            c.extend_from_slice(&addr.to_le_bytes());
            c.extend_from_slice(&l.to_le_bytes());
            c.extend_from_slice(&0u32.to_le_bytes());
        }
        assert_eq!(self.send(&c), cmd::OK_NODATA);
    }

    fn fill_backing(&self, w: u32, h: u32, pixel: impl Fn(u32, u32) -> [u8; 4]) {
        let len = w * h * 4;
        let half = len / 2;
        let mut bytes = Vec::new();
        for y in 0..h {
            for x in 0..w {
                bytes.extend_from_slice(&pixel(x, y));
            }
        }
        write_all(&self.mem, BACKING, &bytes[..half as usize]).unwrap();
        write_all(&self.mem, BACKING + 0x20_0000, &bytes[half as usize..]).unwrap();
    }
}

fn transfer(x: u32, y: u32, w: u32, h: u32, offset: u64, id: u32) -> Vec<u8> {
    words(
        cmd::TRANSFER_TO_HOST_2D,
        &[x, y, w, h, offset as u32, (offset >> 32) as u32, id, 0],
    )
}

#[test]
fn display_info_lists_each_heads_preferred_mode() {
    let mut r = rig(2);
    let (kind, out) = r.send_on(0, &hdr(cmd::GET_DISPLAY_INFO));
    assert_eq!(kind, cmd::OK_DISPLAY_INFO);
    let field = |i: usize, f: usize| {
        let at = HDR_LEN + i * 24 + f * 4;
        u32::from_le_bytes(out[at..at + 4].try_into().unwrap())
    };
    assert_eq!((field(0, 2), field(0, 3), field(0, 4)), (640, 480, 1));
    assert_eq!((field(1, 2), field(1, 3), field(1, 4)), (656, 480, 1));
    assert_eq!(field(2, 4), 0, "no third head");
    let mut cfg = [0u8; 4];
    r.dev.read_config(8, &mut cfg);
    assert_eq!(u32::from_le_bytes(cfg), 2, "num_scanouts");
}

#[test]
fn a_transferred_and_flushed_resource_shows_on_its_head() {
    let mut r = rig(1);
    let (w, h) = (48, 32);
    r.make_resource(1, w, h);
    // B8G8R8X8: bytes B, G, R, X.
    r.fill_backing(w, h, |x, y| [x as u8, y as u8, 0x80, 0xff]);
    assert_eq!(r.send(&transfer(0, 0, w, h, 0, 1)), cmd::OK_NODATA);
    assert_eq!(
        r.send(&words(cmd::SET_SCANOUT, &[0, 0, w, h, 0, 1])),
        cmd::OK_NODATA
    );
    let head = r.display.heads()[0].clone();
    let frame = head.snapshot().unwrap();
    assert_eq!((frame.width, frame.height), (w, h));
    assert_eq!(frame.pixels[3 * w as usize + 5] & 0xff_ffff, 0x80_0305);

    // A partial update: transfer and flush one pixel, only its 16x16
    // tile is damaged.
    let seen = head.changes(Default::default(), 8).now;
    r.fill_backing(w, h, |_, _| [1, 2, 3, 0]);
    let off = u64::from(18 * w * 4 + 38 * 4);
    assert_eq!(r.send(&transfer(38, 18, 1, 1, off, 1)), cmd::OK_NODATA);
    assert_eq!(
        r.send(&words(cmd::RESOURCE_FLUSH, &[38, 18, 1, 1, 1, 0])),
        cmd::OK_NODATA
    );
    let c = head.changes(seen, 8);
    assert_eq!(c.rects, vec![Rect::new(32, 16, 16, 16)]);
    let frame = head.snapshot().unwrap();
    assert_eq!(frame.pixels[18 * w as usize + 38] & 0xff_ffff, 0x03_0201);
    assert_eq!(
        frame.pixels[18 * w as usize + 37] & 0xff_ffff,
        0x80_1225,
        "untouched"
    );
}

#[test]
fn formats_convert_to_rgb() {
    let px = [0x11, 0x22, 0x33, 0x44];
    assert_eq!(Format::from_wire(2).unwrap().argb(&px), 0x4433_2211);
    assert_eq!(Format::from_wire(4).unwrap().argb(&px), 0x1122_3344);
    assert_eq!(Format::from_wire(67).unwrap().argb(&px), 0x4411_2233);
    assert_eq!(Format::from_wire(121).unwrap().argb(&px), 0x1144_3322);
    assert!(Format::from_wire(0).is_none());
    assert!(Format::from_wire(5).is_none());
}

#[test]
fn hostile_resource_commands_get_errors_and_change_nothing() {
    let mut r = rig(1);
    let create = |id, fmt, w, h| words(cmd::RESOURCE_CREATE_2D, &[id, fmt, w, h]);
    assert_eq!(r.send(&create(0, 2, 4, 4)), cmd::ERR_INVALID_RESOURCE_ID);
    assert_eq!(r.send(&create(1, 99, 4, 4)), cmd::ERR_INVALID_PARAMETER);
    assert_eq!(r.send(&create(1, 2, 0, 4)), cmd::ERR_INVALID_PARAMETER);
    assert_eq!(
        r.send(&create(1, 2, MAX_SIDE + 1, 1)),
        cmd::ERR_INVALID_PARAMETER
    );
    assert_eq!(
        r.send(&create(1, 2, u32::MAX, u32::MAX)),
        cmd::ERR_INVALID_PARAMETER
    );
    assert_eq!(r.send(&create(1, 2, 4, 4)), cmd::OK_NODATA);
    assert_eq!(
        r.send(&create(1, 2, 4, 4)),
        cmd::ERR_INVALID_RESOURCE_ID,
        "in use"
    );
    // The memory cap: 16384 x 4096 x 4 = 256 MiB fits once, not twice.
    assert_eq!(r.send(&create(2, 2, MAX_SIDE, 4096)), cmd::OK_NODATA);
    assert_eq!(
        r.send(&create(3, 2, MAX_SIDE, 4096)),
        cmd::ERR_OUT_OF_MEMORY
    );
    assert_eq!(r.send(&words(cmd::RESOURCE_UNREF, &[2, 0])), cmd::OK_NODATA);
    assert_eq!(
        r.send(&create(3, 2, MAX_SIDE, 4096)),
        cmd::OK_NODATA,
        "unref freed it"
    );
    assert_eq!(
        r.send(&words(cmd::RESOURCE_UNREF, &[77, 0])),
        cmd::ERR_INVALID_RESOURCE_ID
    );

    // Backing outside RAM, too many entries, entries past the command.
    let mut c = words(cmd::RESOURCE_ATTACH_BACKING, &[1, 1]);
    c.extend_from_slice(&OUTSIDE.to_le_bytes());
    c.extend_from_slice(&[64, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(r.send(&c), cmd::ERR_UNSPEC);
    assert_eq!(
        r.send(&words(cmd::RESOURCE_ATTACH_BACKING, &[1, u32::MAX])),
        cmd::ERR_INVALID_PARAMETER
    );
    assert_eq!(
        r.send(&words(cmd::RESOURCE_ATTACH_BACKING, &[1, 100])),
        cmd::ERR_INVALID_PARAMETER
    );
    assert_eq!(
        r.send(&transfer(0, 0, 4, 4, 0, 1)),
        cmd::ERR_UNSPEC,
        "no backing"
    );
    // A backing shorter than the resource: the transfer fails, no panic.
    let mut c = words(cmd::RESOURCE_ATTACH_BACKING, &[1, 2]);
    for _ in 0..2 {
        c.extend_from_slice(&BACKING.to_le_bytes()); // overlapping entries
        c.extend_from_slice(&[8, 0, 0, 0, 0, 0, 0, 0]);
    }
    assert_eq!(r.send(&c), cmd::OK_NODATA);
    assert_eq!(
        r.send(&transfer(0, 0, 4, 4, 0, 1)),
        cmd::ERR_INVALID_PARAMETER
    );
    assert_eq!(
        r.send(&transfer(0, 0, 4, 2, 0, 1)),
        cmd::ERR_INVALID_PARAMETER
    );
    assert_eq!(
        r.send(&transfer(0, 0, 4, 1, 0, 1)),
        cmd::OK_NODATA,
        "16 bytes fit"
    );
    assert_eq!(
        r.send(&transfer(0, 0, 2, 1, u64::MAX, 1)),
        cmd::ERR_INVALID_PARAMETER
    );
    // Rectangles outside the resource, with overflowing sums.
    for (x, y, w, h) in [
        (3, 0, 2, 1),
        (0, 0, 5, 4),
        (u32::MAX, 0, 2, 1),
        (0, 1, 1, u32::MAX),
    ] {
        assert_eq!(
            r.send(&transfer(x, y, w, h, 0, 1)),
            cmd::ERR_INVALID_PARAMETER
        );
        assert_eq!(
            r.send(&words(cmd::RESOURCE_FLUSH, &[x, y, w, h, 1, 0])),
            cmd::ERR_INVALID_PARAMETER
        );
        assert_eq!(
            r.send(&words(cmd::SET_SCANOUT, &[x, y, w, h, 0, 1])),
            cmd::ERR_INVALID_PARAMETER
        );
    }
    assert_eq!(
        r.send(&words(cmd::SET_SCANOUT, &[0, 0, 4, 4, 4, 1])),
        cmd::ERR_INVALID_SCANOUT_ID
    );
    assert_eq!(
        r.send(&words(cmd::SET_SCANOUT, &[0, 0, 4, 4, 0, 9])),
        cmd::ERR_INVALID_RESOURCE_ID
    );
    assert_eq!(
        r.send(&words(cmd::GET_EDID, &[7, 0])),
        cmd::ERR_INVALID_SCANOUT_ID
    );
    assert_eq!(r.send(&hdr(0x0200)), cmd::ERR_UNSPEC, "3D is not offered");
    assert_eq!(
        r.send(&hdr(cmd::RESOURCE_CREATE_2D)),
        cmd::ERR_INVALID_PARAMETER,
        "short"
    );
    assert_eq!(r.send(&[1, 2, 3]), cmd::ERR_UNSPEC, "no header");
    assert!(r.display.heads()[0].snapshot().is_none(), "nothing shown");
}

#[test]
fn unref_of_a_shown_resource_blanks_its_head() {
    let mut r = rig(1);
    r.make_resource(5, 4, 4);
    assert_eq!(
        r.send(&words(cmd::SET_SCANOUT, &[0, 0, 4, 4, 0, 5])),
        cmd::OK_NODATA
    );
    assert!(r.display.heads()[0].snapshot().is_some());
    assert_eq!(r.send(&words(cmd::RESOURCE_UNREF, &[5, 0])), cmd::OK_NODATA);
    assert!(r.display.heads()[0].snapshot().is_none());
    assert_eq!(
        r.send(&words(cmd::RESOURCE_FLUSH, &[0, 0, 4, 4, 5, 0])),
        cmd::ERR_INVALID_RESOURCE_ID
    );
}

#[test]
fn fences_are_echoed() {
    let mut r = rig(1);
    let mut c = hdr(cmd::GET_DISPLAY_INFO);
    c[4] = FLAG_FENCE as u8;
    c[8..16].copy_from_slice(&0x1234_5678_9abc_u64.to_le_bytes());
    let (_, out) = r.send_on(0, &c);
    assert_eq!(out[4], FLAG_FENCE as u8);
    assert_eq!(
        u64::from_le_bytes(out[8..16].try_into().unwrap()),
        0x1234_5678_9abc
    );
}

#[test]
fn the_cursor_queue_sets_image_and_position() {
    let mut r = rig(2);
    r.make_resource(9, 64, 64);
    r.fill_backing(64, 64, |x, _| [0, 0, x as u8, 0xff]);
    assert_eq!(r.send(&transfer(0, 0, 64, 64, 0, 9)), cmd::OK_NODATA);
    let update = words(cmd::UPDATE_CURSOR, &[1, 10, 20, 0, 9, 3, 4, 0]);
    assert_eq!(r.send_on(1, &update).0, cmd::OK_NODATA);
    let c = r.display.heads()[1].cursor();
    let img = c.image.unwrap();
    assert_eq!((img.width, img.hot_x, img.hot_y), (64, 3, 4));
    assert_eq!(img.pixels[7], 0xff07_0000);
    assert_eq!((c.x, c.y, c.visible), (10, 20, true));
    let mv = words(cmd::MOVE_CURSOR, &[1, 30, 40, 0, 0, 0, 0, 0]);
    assert_eq!(r.send_on(1, &mv).0, cmd::OK_NODATA);
    assert_eq!(r.display.heads()[1].cursor().x, 30);
    let bad = words(cmd::MOVE_CURSOR, &[9, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(r.send_on(1, &bad).0, cmd::ERR_INVALID_SCANOUT_ID);
}

#[test]
fn edid_is_a_valid_base_block_with_the_preferred_mode() {
    let mut r = rig(1);
    let (kind, out) = r.send_on(0, &words(cmd::GET_EDID, &[0, 0]));
    assert_eq!(kind, cmd::OK_EDID);
    let size = u32::from_le_bytes(out[HDR_LEN..HDR_LEN + 4].try_into().unwrap());
    assert_eq!(size, 128);
    let e = &out[HDR_LEN + 8..HDR_LEN + 8 + 128];
    assert_eq!(&e[0..8], &[0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0]);
    assert_eq!(e.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0, "checksum");
    let d = &e[54..72];
    let w = u32::from(d[2]) | (u32::from(d[4] >> 4) << 8);
    let h = u32::from(d[5]) | (u32::from(d[7] >> 4) << 8);
    assert_eq!((w, h), (640, 480));
}

#[test]
fn a_full_ring_of_commands_is_answered_in_one_kick() {
    let mut r = rig(1);
    write_all(&r.mem, CMD, &hdr(cmd::GET_DISPLAY_INFO)).unwrap();
    for _ in 0..8 {
        r.ctrl
            .add_chain(&[(CMD, HDR_LEN as u32, false), (RESP, 1024, true)]);
    }
    r.dev.queue_notify(0);
    assert_eq!(r.ctrl.used_idx(), 8);
}

#[test]
fn reset_drops_resources_and_blanks_heads() {
    let mut r = rig(1);
    r.make_resource(1, 4, 4);
    assert_eq!(
        r.send(&words(cmd::SET_SCANOUT, &[0, 0, 4, 4, 0, 1])),
        cmd::OK_NODATA
    );
    r.dev.reset();
    assert!(r.display.heads()[0].snapshot().is_none());
    assert_eq!(r.dev.gpu.host_bytes, 0);
    assert!(r.dev.gpu.resources.is_empty());
}

#[test]
fn a_restored_gpu_shows_its_scanout_again_from_the_guests_backing() {
    let mut r = rig(1);
    let (w, h) = (8, 4);
    r.make_resource(1, w, h);
    r.fill_backing(w, h, |x, y| [x as u8, y as u8, 0x80, 0xff]);
    assert_eq!(r.send(&transfer(0, 0, w, h, 0, 1)), cmd::OK_NODATA);
    assert_eq!(
        r.send(&words(cmd::SET_SCANOUT, &[0, 0, w, h, 0, 1])),
        cmd::OK_NODATA
    );
    let saved = r.dev.save_device().unwrap();

    // A new GPU and display on the same memory, as a restore has them.
    let display = Display::new(vec![vec![DisplayMode::new(640, 480, 60)]]);
    let mut dev = VirtioGpu::new(display.clone());
    dev.restore_device(&r.mem, &saved).unwrap();
    assert_eq!(dev.save_device().unwrap(), saved);
    let frame = display.heads()[0].snapshot().unwrap();
    assert_eq!((frame.width, frame.height), (w, h));
    assert_eq!(frame.pixels[3 * w as usize + 5] & 0xff_ffff, 0x80_0305);

    // Hostile states are refused and change nothing.
    let SavedDevice::Gpu(good) = saved else {
        panic!("a GPU saves a GPU state");
    };
    let bad: Vec<(&str, SavedGpu)> = vec![
        ("resource 0", {
            let mut s = good.clone();
            s.resources[0].id = 0;
            s
        }),
        ("unknown format", {
            let mut s = good.clone();
            s.resources[0].format = 9;
            s
        }),
        ("too big", {
            let mut s = good.clone();
            s.resources[0].width = MAX_SIDE + 1;
            s
        }),
        ("over the memory cap", {
            let mut s = good.clone();
            let r = s.resources[0].clone();
            s.resources = (1..=8)
                .map(|id| SavedResource {
                    id,
                    width: MAX_SIDE,
                    height: MAX_SIDE,
                    ..r.clone()
                })
                .collect();
            s
        }),
        ("backing outside RAM", {
            let mut s = good.clone();
            s.resources[0].backing[0].0 = OUTSIDE;
            s
        }),
        ("scanout past its resource", {
            let mut s = good.clone();
            s.scanouts[0].rect = (4, 0, w, h);
            s
        }),
        ("scanout of a missing resource", {
            let mut s = good.clone();
            s.scanouts[0].resource = 7;
            s
        }),
        ("two scanouts on a one-head GPU", {
            let mut s = good.clone();
            s.scanouts.push(s.scanouts[0]);
            s
        }),
    ];
    for (what, s) in bad {
        let display = Display::new(vec![vec![DisplayMode::new(640, 480, 60)]]);
        let mut dev = VirtioGpu::new(display);
        let before = dev.save_device();
        assert!(
            dev.restore_device(&r.mem, &SavedDevice::Gpu(s)).is_err(),
            "{what}: accepted"
        );
        assert_eq!(dev.save_device(), before, "{what}");
    }
}
