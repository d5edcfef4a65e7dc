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
//! Damage is kept as a short history of `(serial, rect)`: each front end
//! remembers the serial it last showed and asks for what changed since, at
//! its own pace. A front end further behind than the history gets the
//! whole frame.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use vm_core::sync::{lock, wait_timeout};

pub use vm_config::display::DisplayMode;

/// Largest frame side a head takes (pixels).
pub const MAX_SIDE: u32 = 16384;

/// Damage rectangles remembered per head. A front end further behind gets
/// the whole frame, which is what it would draw anyway.
const DAMAGE_HISTORY: usize = 1024;

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
    damage: VecDeque<(u64, Rect)>,
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

    fn bump(&self, st: &mut HeadState, rect: Option<Rect>) {
        st.serial += 1;
        if let Some(r) = rect {
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
    /// damaged the part that changed: guests declare damage coarsely (a
    /// framebuffer console's whole rows, say), and front ends send what is
    /// damaged. The part outside the frame is dropped.
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
        let mut changed = Rect::default();
        for row in 0..clipped.height as usize {
            let s = (dy + row) * sw + dx;
            let d = (clipped.y as usize + row) * fw + clipped.x as usize;
            let (new, old) = (&src[s..s + n], &mut st.pixels[d..d + n]);
            if new == old {
                continue;
            }
            let first = new
                .iter()
                .zip(old.iter())
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            let last = new
                .iter()
                .zip(old.iter())
                .rposition(|(a, b)| a != b)
                .unwrap_or(first);
            old.copy_from_slice(new);
            let y = clipped.y + row as u32;
            let x = clipped.x + first as u32;
            changed = changed.union(&Rect::new(x, y, (last - first + 1) as u32, 1));
        }
        if !changed.is_empty() {
            self.bump(&mut st, Some(changed));
        }
    }

    /// A whole new frame; only the rows and columns that differ from the
    /// last one are marked damaged.
    pub fn present(&self, width: u32, height: u32, pixels: &[u32]) {
        if pixels.len() != width as usize * height as usize {
            return;
        }
        self.set_size(width, height);
        let mut st = lock(&self.state);
        if st.width != width || st.height != height {
            return;
        }
        let w = width as usize;
        let mut damage = Rect::default();
        for (y, (new, old)) in pixels
            .chunks(w.max(1))
            .zip(st.pixels.chunks(w.max(1)))
            .enumerate()
        {
            if new == old {
                continue;
            }
            let first = new.iter().zip(old).position(|(a, b)| a != b).unwrap_or(0);
            let last = new
                .iter()
                .zip(old)
                .rposition(|(a, b)| a != b)
                .unwrap_or(first);
            damage = damage.union(&Rect::new(
                first as u32,
                y as u32,
                (last - first + 1) as u32,
                1,
            ));
        }
        if damage.is_empty() {
            return;
        }
        st.pixels.copy_from_slice(pixels);
        self.bump(&mut st, Some(damage));
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

    /// What changed since `seen`. At most `max_rects` rectangles: more are
    /// merged into their bounding box.
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
        for &(_, r) in st.damage.iter().filter(|d| d.0 > seen.serial) {
            let r = r.clip(st.width, st.height);
            if !r.is_empty() {
                c.rects.push(r);
            }
        }
        if c.rects.len() > max_rects.max(1) {
            let all = c.rects.iter().fold(Rect::default(), |a, r| a.union(r));
            c.rects = vec![all];
        }
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

    #[test]
    fn writes_are_damage_seen_once_per_front_end() {
        let h = head();
        h.set_size(4, 3);
        let a = h.changes(Seen::default(), 8).now;
        let b = a;
        h.write(Rect::new(1, 1, 2, 1), &[7, 8]);
        let ca = h.changes(a, 8);
        assert!(!ca.full);
        assert_eq!(ca.rects, vec![Rect::new(1, 1, 2, 1)]);
        assert!(h.changes(ca.now, 8).is_empty(), "seen already");
        h.write(Rect::new(0, 0, 1, 1), &[9]);
        let cb = h.changes(b, 8);
        assert_eq!(cb.rects.len(), 2, "a slower front end gets both");
        let (r, px) = h.read(Rect::new(0, 0, 4, 2));
        assert_eq!(r, Rect::new(0, 0, 4, 2));
        assert_eq!(px, vec![9, 0, 0, 0, 0, 7, 8, 0]);
    }

    #[test]
    fn writes_outside_the_frame_are_clipped() {
        let h = head();
        h.set_size(2, 2);
        let s = h.changes(Seen::default(), 8).now;
        h.write(Rect::new(1, 1, 3, 3), &[1; 9]);
        h.write(Rect::new(u32::MAX, u32::MAX, 5, 5), &[1; 25]);
        h.write(Rect::new(0, 0, 2, 2), &[0, 0, 0, 1]); // what is there already
        h.write(Rect::new(0, 0, 2, 2), &[1; 3]); // too few pixels: ignored
        assert_eq!(h.changes(s, 8).rects, vec![Rect::new(1, 1, 1, 1)]);
        assert_eq!(h.snapshot().unwrap().pixels, vec![0, 0, 0, 1]);
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
    fn only_the_changed_part_of_a_write_is_damage() {
        let h = head();
        h.set_size(8, 4);
        let s = h.changes(Seen::default(), 8).now;
        let mut rows = vec![0u32; 8 * 4];
        rows[8 + 3] = 5;
        rows[2 * 8 + 5] = 6;
        h.write(Rect::new(0, 0, 8, 4), &rows);
        assert_eq!(h.changes(s, 8).rects, vec![Rect::new(3, 1, 3, 2)]);
        let s = h.changes(s, 8).now;
        h.write(Rect::new(0, 0, 8, 4), &rows);
        assert!(h.changes(s, 8).is_empty(), "nothing changed");
    }

    #[test]
    fn many_rects_merge_into_their_bounding_box() {
        let h = head();
        h.set_size(8, 8);
        let s = h.changes(Seen::default(), 8).now;
        h.write(Rect::new(1, 1, 1, 1), &[1]);
        h.write(Rect::new(5, 6, 1, 1), &[1]);
        assert_eq!(h.changes(s, 1).rects, vec![Rect::new(1, 1, 5, 6)]);
    }

    #[test]
    fn present_damages_only_what_differs() {
        let h = head();
        let mut px = vec![0u32; 16];
        h.present(4, 4, &px);
        let s = h.changes(Seen::default(), 8).now;
        px[6] = 5;
        px[9] = 5;
        h.present(4, 4, &px);
        assert_eq!(h.changes(s, 8).rects, vec![Rect::new(1, 1, 2, 2)]);
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
