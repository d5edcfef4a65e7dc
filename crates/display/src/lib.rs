//! The display model every display device feeds and every front end reads.
//!
//! A [`Display`] has one or more [`Head`]s (a guest's connectors). Each head
//! has the modes offered to the guest, the current frame with the regions
//! the guest changed (damage), and a cursor (image, hot spot, position,
//! visibility). The display also carries the input sink that keyboard and
//! pointer events from any front end go to (the USB keyboard and tablet).
//!
//! Devices (apple-gfx, virtio-gpu) write frames and cursors; front ends
//! (the Cocoa window, screenshots, the VNC server) read them and know no
//! device. Readers never hold the head's lock while they encode or send,
//! so a slow front end never holds up the device (and the vCPU behind it).
//!
//! Damage is kept as a short history of `(serial, rects)`, each write's
//! rects being the [`tiles::TILE`]-pixel tiles whose pixels it changed:
//! each front end remembers the serial it last showed and asks for what
//! changed since, at its own pace, merged tile by tile into disjoint
//! rectangles (so what it sends is proportional to what changed). A front
//! end further behind than the history gets the whole frame.

pub mod tiles;

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use vm_core::sync::{lock, wait_timeout};

pub use tiles::{Tiles, TILE};
pub use vm_config::display::DisplayMode;

/// Largest frame side a head takes (pixels).
pub const MAX_SIDE: u32 = 16384;

/// Damage rectangles remembered per head. A front end further behind gets
/// the whole frame, which is what it would draw anyway.
const DAMAGE_HISTORY: usize = 1024;

/// Rectangles one write's damage is kept as at most (coarser beyond, see
/// [`Tiles::rects`]), bounding the history's memory.
const MAX_WRITE_RECTS: usize = 64;

/// A rectangle in frame coordinates.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rect {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

impl Rect {
    pub const fn new(x: u32, y: u32, width: u32, height: u32) -> Self {
        Self {
            x,
            y,
            width,
            height,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.width == 0 || self.height == 0
    }

    /// The part of `self` inside a `width` x `height` frame (empty if none).
    pub fn clip(&self, width: u32, height: u32) -> Rect {
        let x0 = self.x.min(width);
        let y0 = self.y.min(height);
        let x1 = self.x.saturating_add(self.width).min(width);
        let y1 = self.y.saturating_add(self.height).min(height);
        Rect::new(x0, y0, x1 - x0, y1 - y0)
    }

    /// The smallest rectangle holding both (an empty one holds nothing).
    pub fn union(&self, other: &Rect) -> Rect {
        if self.is_empty() {
            return *other;
        }
        if other.is_empty() {
            return *self;
        }
        let x0 = self.x.min(other.x);
        let y0 = self.y.min(other.y);
        let x1 = (self.x + self.width).max(other.x + other.width);
        let y1 = (self.y + self.height).max(other.y + other.height);
        Rect::new(x0, y0, x1 - x0, y1 - y0)
    }

    fn area(&self) -> u64 {
        u64::from(self.width) * u64::from(self.height)
    }
}

/// One frame as the guest drew it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub width: u32,
    pub height: u32,
    /// `width * height` pixels, `0x00RRGGBB` (the top byte is not
    /// meaningful), row-major.
    pub pixels: Vec<u32>,
}

/// A cursor image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CursorImage {
    pub width: u32,
    pub height: u32,
    pub hot_x: u32,
    pub hot_y: u32,
    /// Row-major `0xAARRGGBB` pixels, `width * height` of them.
    pub pixels: Vec<u32>,
}

/// The cursor of a head.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cursor {
    pub image: Option<Arc<CursorImage>>,
    pub x: u32,
    pub y: u32,
    pub visible: bool,
}

/// Where keyboard and pointer input from a front end goes.
pub trait InputSink: Send + Sync {
    /// A key by HID usage (page 0x07; 0xE0..=0xE7 are the modifiers).
    fn key(&self, usage: u8, pressed: bool);
    /// Absolute pointer position, 0..=32767 on each axis across the head.
    fn pointer(&self, x: u16, y: u16);
    /// Button state: bit 0 left, 1 right, 2 middle.
    fn buttons(&self, mask: u8);
    /// Wheel detents, positive away from the user.
    fn wheel(&self, delta: i8);
}

/// What a front end has shown of a head.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Seen {
    pub serial: u64,
    pub cursor_serial: u64,
}

/// What changed on a head since a [`Seen`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// The frame's size changed (or the front end is too far behind to be
    /// told what changed): redraw everything.
    pub full: bool,
    pub width: u32,
    pub height: u32,
    /// Changed regions, clipped to the frame; all of it when `full`.
    pub rects: Vec<Rect>,
    /// The cursor image changed.
    pub cursor: bool,
    /// What the front end has seen after drawing these changes.
    pub now: Seen,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        !self.full && self.rects.is_empty() && !self.cursor
    }
}

#[derive(Default)]
struct HeadState {
    enabled: bool,
    width: u32,
    height: u32,
    pixels: Vec<u32>,
    serial: u64,
    /// Serial of the last size change.
    size_serial: u64,
    damage: VecDeque<(u64, Vec<Rect>)>,
    cursor: Cursor,
    cursor_serial: u64,
    /// Frames the device said it finished (apple-gfx's update_done).
    frames_done: u64,
}

/// One output of a display.
pub struct Head {
    modes: Vec<DisplayMode>,
    state: Mutex<HeadState>,
    changed: Condvar,
}

impl Head {
    fn new(modes: Vec<DisplayMode>) -> Self {
        Self {
            modes,
            state: Mutex::new(HeadState::default()),
            changed: Condvar::new(),
        }
    }

    /// The modes offered to the guest on this head, the first preferred.
    pub fn modes(&self) -> &[DisplayMode] {
        &self.modes
    }

    fn bump(&self, st: &mut HeadState, rects: Option<Vec<Rect>>) {
        st.serial += 1;
        if let Some(r) = rects {
            if st.damage.len() == DAMAGE_HISTORY {
                st.damage.pop_front();
            }
            st.damage.push_back((st.serial, r));
        }
        self.changed.notify_all();
    }

    /// The guest shows a `width` x `height` frame on this head; a new size
    /// starts black. Sizes above [`MAX_SIDE`] are clamped (devices check
    /// their guest's sizes before this).
    pub fn set_size(&self, width: u32, height: u32) {
        let (width, height) = (width.min(MAX_SIDE), height.min(MAX_SIDE));
        let mut st = lock(&self.state);
        if st.enabled && st.width == width && st.height == height {
            return;
        }
        st.enabled = true;
        st.width = width;
        st.height = height;
        st.pixels = vec![0; width as usize * height as usize];
        st.damage.clear();
        self.bump(&mut st, None);
        st.size_serial = st.serial;
    }

    /// The guest stopped showing anything on this head.
    pub fn disable(&self) {
        let mut st = lock(&self.state);
        if !st.enabled {
            return;
        }
        st.enabled = false;
        st.width = 0;
        st.height = 0;
        st.pixels = Vec::new();
        st.damage.clear();
        self.bump(&mut st, None);
        st.size_serial = st.serial;
    }

    /// Writes `rect` from `src` (rows of `rect.width` pixels) and marks
    /// damaged the tiles whose pixels changed: guests declare damage
    /// coarsely (a framebuffer console's whole rows, say), and front ends
    /// send what is damaged. The part outside the frame is dropped.
    pub fn write(&self, rect: Rect, src: &[u32]) {
        let mut st = lock(&self.state);
        let clipped = rect.clip(st.width, st.height);
        if clipped.is_empty() || src.len() < rect.area() as usize {
            return;
        }
        let (fw, sw) = (st.width as usize, rect.width as usize);
        let dx = (clipped.x - rect.x) as usize;
        let dy = (clipped.y - rect.y) as usize;
        let n = clipped.width as usize;
        let mut tiles = Tiles::new(st.width, st.height, clipped);
        for row in 0..clipped.height as usize {
            let s = (dy + row) * sw + dx;
            let d = (clipped.y as usize + row) * fw + clipped.x as usize;
            let (new, old) = (&src[s..s + n], &mut st.pixels[d..d + n]);
            if new == old {
                continue;
            }
            // Compare along the frame's tile grid: the first piece ends at
            // the first tile boundary after the rectangle's left edge.
            let y = clipped.y + row as u32;
            let mut at = 0;
            while at < n {
                let x = clipped.x + at as u32;
                let end = (((x / TILE + 1) * TILE - clipped.x) as usize).min(n);
                if new[at..end] != old[at..end] {
                    tiles.mark_pixel(x, y);
                }
                at = end;
            }
            old.copy_from_slice(new);
        }
        let rects = tiles.rects(MAX_WRITE_RECTS);
        if !rects.is_empty() {
            self.bump(&mut st, Some(rects));
        }
    }

    /// A whole new frame; only the tiles that differ from the last one are
    /// marked damaged.
    pub fn present(&self, width: u32, height: u32, pixels: &[u32]) {
        if pixels.len() != width as usize * height as usize {
            return;
        }
        self.set_size(width, height);
        self.write(Rect::new(0, 0, width, height), pixels);
    }

    /// The device finished a frame a front end asked for (see
    /// [`Display::set_refresher`]).
    pub fn frame_done(&self) {
        lock(&self.state).frames_done += 1;
        self.changed.notify_all();
    }

    /// A new cursor image; `None` hides the cursor.
    pub fn set_cursor_image(&self, image: Option<CursorImage>) {
        let mut st = lock(&self.state);
        st.cursor.image = image.map(Arc::new);
        st.cursor_serial += 1;
        self.changed.notify_all();
    }

    pub fn move_cursor(&self, x: u32, y: u32, visible: bool) {
        let mut st = lock(&self.state);
        st.cursor.x = x;
        st.cursor.y = y;
        st.cursor.visible = visible;
    }

    pub fn cursor(&self) -> Cursor {
        lock(&self.state).cursor.clone()
    }

    /// The current frame; `None` while the guest shows nothing here.
    pub fn snapshot(&self) -> Option<Frame> {
        let st = lock(&self.state);
        (st.enabled && st.width > 0 && st.height > 0).then(|| Frame {
            width: st.width,
            height: st.height,
            pixels: st.pixels.clone(),
        })
    }

    /// Current size; (0, 0) while disabled.
    pub fn size(&self) -> (u32, u32) {
        let st = lock(&self.state);
        (st.width, st.height)
    }

    /// Pixels of `rect` (clipped to the frame) as rows of the clipped
    /// width, with the clipped rectangle.
    pub fn read(&self, rect: Rect) -> (Rect, Vec<u32>) {
        let st = lock(&self.state);
        let r = rect.clip(st.width, st.height);
        let mut out = Vec::with_capacity(r.area() as usize);
        for row in r.y..r.y + r.height {
            let at = row as usize * st.width as usize + r.x as usize;
            out.extend_from_slice(&st.pixels[at..at + r.width as usize]);
        }
        (r, out)
    }

    /// What changed since `seen`, as disjoint tile-aligned rectangles
    /// (clipped to the frame). At most `max_rects` of them: more are
    /// coarsened (see [`Tiles::rects`]).
    pub fn changes(&self, seen: Seen, max_rects: usize) -> Changes {
        let st = lock(&self.state);
        let now = Seen {
            serial: st.serial,
            cursor_serial: st.cursor_serial,
        };
        let mut c = Changes {
            width: st.width,
            height: st.height,
            cursor: seen.cursor_serial != st.cursor_serial,
            now,
            ..Changes::default()
        };
        if seen.serial == st.serial {
            return c;
        }
        // Every serial after the last resize has a history entry, so the
        // history covers the front end if its next serial is still there.
        let covered = st.damage.front().is_some_and(|d| d.0 <= seen.serial + 1);
        let behind =
            seen.serial == 0 || seen.serial < st.size_serial || seen.serial > st.serial || !covered;
        if behind {
            c.full = true;
            c.rects = vec![Rect::new(0, 0, st.width, st.height)];
            return c;
        }
        let damaged: Vec<Rect> = st
            .damage
            .iter()
            .filter(|d| d.0 > seen.serial)
            .flat_map(|d| d.1.iter().copied())
            .collect();
        drop(st);
        // Merged outside the lock: the device never waits for it.
        let mut tiles = Tiles::new(c.width, c.height, Rect::new(0, 0, c.width, c.height));
        for r in damaged {
            tiles.mark(r);
        }
        c.rects = tiles.rects(max_rects);
        c
    }

    /// Waits up to `timeout` for anything to change after `seen`; true if
    /// something did.
    pub fn wait_change(&self, seen: Seen, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = lock(&self.state);
        loop {
            if st.serial != seen.serial || st.cursor_serial != seen.cursor_serial {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            st = wait_timeout(&self.changed, st, left).0;
        }
    }

    fn frames_done(&self) -> u64 {
        lock(&self.state).frames_done
    }

    fn wait_frame_done(&self, seen: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = lock(&self.state);
        while st.frames_done <= seen {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            st = wait_timeout(&self.changed, st, left).0;
        }
        true
    }
}

/// Asks a device to render its current frame afresh (apple-gfx renders on
/// demand); it answers with [`Head::frame_done`].
pub trait Refresher: Send + Sync {
    fn refresh(&self);
}

/// Why a screenshot failed.
#[derive(Debug, thiserror::Error)]
pub enum ScreenshotError {
    #[error("the guest has not shown anything on the display yet")]
    NoFrame,
    #[error("the display has no head {0}")]
    NoHead(usize),
    #[error("the display did not deliver a frame within {0:?}")]
    Timeout(Duration),
    #[error("{}: {error}", path.display())]
    Write {
        path: std::path::PathBuf,
        #[source]
        error: std::io::Error,
    },
}

/// A machine's display: its heads and its input.
pub struct Display {
    heads: Vec<Arc<Head>>,
    input: OnceLock<Arc<dyn InputSink>>,
    refresher: OnceLock<Arc<dyn Refresher>>,
}

impl Display {
    /// A display with one head per entry of `heads` (the modes offered on
    /// it); at least one head.
    pub fn new(heads: Vec<Vec<DisplayMode>>) -> Arc<Self> {
        let mut heads: Vec<Arc<Head>> = heads.into_iter().map(|m| Arc::new(Head::new(m))).collect();
        if heads.is_empty() {
            heads.push(Arc::new(Head::new(Vec::new())));
        }
        Arc::new(Self {
            heads,
            input: OnceLock::new(),
            refresher: OnceLock::new(),
        })
    }

    pub fn heads(&self) -> &[Arc<Head>] {
        &self.heads
    }

    pub fn head(&self, index: usize) -> Option<&Arc<Head>> {
        self.heads.get(index)
    }

    /// Connects the input devices (once; later calls are ignored).
    pub fn set_input(&self, sink: Arc<dyn InputSink>) {
        let _ = self.input.set(sink);
    }

    /// Where front ends send input; `None` on a machine without USB input.
    pub fn input(&self) -> Option<&Arc<dyn InputSink>> {
        self.input.get()
    }

    /// Sets the device's refresher (once): screenshots then ask for a fresh
    /// frame instead of taking the last one.
    pub fn set_refresher(&self, refresher: Arc<dyn Refresher>) {
        let _ = self.refresher.set(refresher);
    }

    /// Head `head`'s current frame. A device that renders on demand is
    /// asked for it and waited for up to `timeout`.
    pub fn capture(&self, head: usize, timeout: Duration) -> Result<Frame, ScreenshotError> {
        let h = self.head(head).ok_or(ScreenshotError::NoHead(head))?;
        if let Some(r) = self.refresher.get() {
            let seen = h.frames_done();
            r.refresh();
            if !h.wait_frame_done(seen, timeout) {
                return Err(ScreenshotError::Timeout(timeout));
            }
        }
        h.snapshot().ok_or(ScreenshotError::NoFrame)
    }

    /// Captures head `head` into a PNG file at `path`.
    pub fn screenshot_png(
        &self,
        head: usize,
        path: &std::path::Path,
        timeout: Duration,
    ) -> Result<(), ScreenshotError> {
        let frame = self.capture(head, timeout)?;
        std::fs::write(path, encode_png(&frame)).map_err(|error| ScreenshotError::Write {
            path: path.to_path_buf(),
            error,
        })
    }
}

/// Encodes `frame` as an 8-bit RGB PNG. Alpha is dropped: a screen is
/// opaque, and guest frames need not fill the alpha byte.
pub fn encode_png(frame: &Frame) -> Vec<u8> {
    let rgb: Vec<u8> = frame
        .pixels
        .iter()
        .flat_map(|&p| [(p >> 16) as u8, (p >> 8) as u8, p as u8])
        .collect();
    let mut png = Vec::new();
    let mut encoder = png::Encoder::new(&mut png, frame.width, frame.height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_compression(png::Compression::Fast);
    // Into a Vec only a frame whose pixel count disagrees with its size can
    // fail; heads never hold one, and an empty file says so.
    let written = encoder
        .write_header()
        .and_then(|mut writer| writer.write_image_data(&rgb));
    if let Err(e) = written {
        tracing::error!("screenshot: PNG encoding failed: {e}");
        png.clear();
    }
    png
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head() -> Arc<Head> {
        Display::new(vec![vec![]]).heads()[0].clone()
    }

    #[test]
    fn a_new_front_end_redraws_everything() {
        let h = head();
        h.set_size(4, 3);
        let c = h.changes(Seen::default(), 8);
        assert!(c.full);
        assert_eq!(c.rects, vec![Rect::new(0, 0, 4, 3)]);
    }

    fn area(rects: &[Rect]) -> u64 {
        rects.iter().map(Rect::area).sum()
    }

    #[test]
    fn writes_are_damage_seen_once_per_front_end() {
        let h = head();
        h.set_size(64, 48);
        let a = h.changes(Seen::default(), 8).now;
        let b = a;
        h.write(Rect::new(1, 1, 2, 1), &[7, 8]);
        let ca = h.changes(a, 8);
        assert!(!ca.full);
        assert_eq!(ca.rects, vec![Rect::new(0, 0, 16, 16)], "its tile");
        assert!(h.changes(ca.now, 8).is_empty(), "seen already");
        h.write(Rect::new(40, 30, 1, 1), &[9]);
        let cb = h.changes(b, 8);
        assert_eq!(
            cb.rects,
            vec![Rect::new(0, 0, 16, 16), Rect::new(32, 16, 16, 16)],
            "a slower front end gets both"
        );
        let (r, px) = h.read(Rect::new(0, 0, 4, 2));
        assert_eq!(r, Rect::new(0, 0, 4, 2));
        assert_eq!(px, vec![0, 0, 0, 0, 0, 7, 8, 0]);
    }

    #[test]
    fn writes_outside_the_frame_are_clipped() {
        let h = head();
        h.set_size(40, 40);
        let s = h.changes(Seen::default(), 8).now;
        h.write(Rect::new(33, 33, 10, 10), &[1; 100]);
        h.write(Rect::new(u32::MAX, u32::MAX, 5, 5), &[1; 25]);
        h.write(Rect::new(0, 0, 2, 2), &[0; 4]); // what is there already
        h.write(Rect::new(0, 0, 2, 2), &[1; 3]); // too few pixels: ignored
        assert_eq!(h.changes(s, 8).rects, vec![Rect::new(32, 32, 8, 8)]);
        let f = h.snapshot().unwrap();
        assert_eq!(f.pixels.iter().filter(|&&p| p == 1).count(), 7 * 7);
        assert_eq!(f.pixels[39 * 40 + 39], 1);
    }

    #[test]
    fn a_front_end_behind_the_history_redraws_everything() {
        let h = head();
        h.set_size(8, 8);
        let s = h.changes(Seen::default(), 8).now;
        for i in 0..DAMAGE_HISTORY as u32 + 2 {
            h.write(Rect::new(i % 8, 0, 1, 1), &[i]);
        }
        assert!(h.changes(s, 8).full);
    }

    #[test]
    fn only_the_changed_tiles_of_a_write_are_damage() {
        let h = head();
        h.set_size(64, 48);
        let s = h.changes(Seen::default(), 8).now;
        let mut rows = vec![0u32; 64 * 48];
        rows[64 + 3] = 5;
        rows[20 * 64 + 37] = 6;
        h.write(Rect::new(0, 0, 64, 48), &rows);
        assert_eq!(
            h.changes(s, 8).rects,
            vec![Rect::new(0, 0, 16, 16), Rect::new(32, 16, 16, 16)]
        );
        let s = h.changes(s, 8).now;
        h.write(Rect::new(0, 0, 64, 48), &rows);
        assert!(h.changes(s, 8).is_empty(), "nothing changed");
    }

    #[test]
    fn a_small_change_in_a_big_frame_is_damage_proportional_to_it() {
        // As the benchmark's guest: 64x64 squares drawn at new places, a
        // flush covering the whole rows of the three drawn since the last
        // (fbdev's deferred I/O).
        let h = head();
        let (w, hh) = (1920u32, 1080u32);
        h.set_size(w, hh);
        let mut fb = vec![0u32; (w * hh) as usize];
        let s = h.changes(Seen::default(), 8).now;
        let mut last = s;
        let mut frame = 0;
        for flush in 0..4u32 {
            let mut top = hh;
            let mut bottom = 0;
            for _ in 0..3 {
                frame += 1;
                let (ox, oy) = ((frame * 64 * 7) % (w - 64), (frame * 16 * 5) % (hh - 64));
                for y in oy..oy + 64 {
                    fb[(y * w + ox) as usize..(y * w + ox + 64) as usize].fill(frame);
                }
                (top, bottom) = (top.min(oy), bottom.max(oy + 64));
            }
            let rows = Rect::new(0, top, w, bottom - top);
            let at = (top * w) as usize;
            h.write(rows, &fb[at..(bottom * w) as usize]);
            let c = h.changes(last, 512);
            assert_eq!(area(&c.rects), 3 * 64 * 64, "flush {flush}: {:?}", c.rects);
            last = c.now;
        }
        // The same square drawn over twice: a front end that saw neither
        // gets it once.
        for colour in [100, 101] {
            for y in 0..64 {
                fb[(y * w) as usize..(y * w + 64) as usize].fill(colour);
            }
            h.write(Rect::new(0, 0, w, 64), &fb[..(64 * w) as usize]);
        }
        assert_eq!(area(&h.changes(last, 512).rects), 64 * 64);
        // Drawn again with the same pixels: nothing to send.
        let last = h.changes(last, 512).now;
        h.write(Rect::new(0, 0, w, hh), &fb);
        assert!(h.changes(last, 512).is_empty());
    }

    #[test]
    fn many_rects_are_coarsened() {
        let h = head();
        h.set_size(64, 64);
        let s = h.changes(Seen::default(), 8).now;
        h.write(Rect::new(1, 1, 1, 1), &[1]);
        h.write(Rect::new(50, 60, 1, 1), &[1]);
        assert_eq!(h.changes(s, 8).rects.len(), 2);
        assert_eq!(h.changes(s, 1).rects, vec![Rect::new(0, 0, 64, 64)]);
    }

    #[test]
    fn present_damages_only_what_differs() {
        let h = head();
        let mut px = vec![0u32; 64 * 32];
        h.present(64, 32, &px);
        let s = h.changes(Seen::default(), 8).now;
        px[64 + 5] = 5;
        px[17 * 64 + 20] = 5;
        h.present(64, 32, &px);
        assert_eq!(
            h.changes(s, 8).rects,
            vec![Rect::new(0, 0, 16, 16), Rect::new(16, 16, 16, 16)]
        );
    }

    #[test]
    fn a_resize_is_a_full_redraw_and_disable_hides_the_frame() {
        let h = head();
        h.set_size(2, 2);
        let s = h.changes(Seen::default(), 8).now;
        h.set_size(3, 3);
        let c = h.changes(s, 8);
        assert!(c.full);
        assert_eq!((c.width, c.height), (3, 3));
        h.disable();
        assert!(h.snapshot().is_none());
    }

    #[test]
    fn cursor_changes_are_reported() {
        let h = head();
        let s = h.changes(Seen::default(), 8).now;
        h.set_cursor_image(Some(CursorImage {
            width: 1,
            height: 1,
            hot_x: 0,
            hot_y: 0,
            pixels: vec![0xff00_0000],
        }));
        assert!(h.changes(s, 8).cursor);
    }

    #[test]
    fn capture_without_a_frame_or_head_fails() {
        let d = Display::new(vec![vec![], vec![]]);
        assert!(matches!(
            d.capture(0, Duration::ZERO),
            Err(ScreenshotError::NoFrame)
        ));
        assert!(matches!(
            d.capture(2, Duration::ZERO),
            Err(ScreenshotError::NoHead(2))
        ));
        d.heads()[1].set_size(1, 1);
        d.heads()[1].write(Rect::new(0, 0, 1, 1), &[0x123456]);
        assert_eq!(d.capture(1, Duration::ZERO).unwrap().pixels, vec![0x123456]);
        assert!(!encode_png(&d.capture(1, Duration::ZERO).unwrap()).is_empty());
    }
}
