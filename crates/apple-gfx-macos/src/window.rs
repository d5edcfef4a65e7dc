//! The Cocoa window as a front end of the display model: what it draws
//! and when, in portable code so that it is tested on every host.
//!
//! The window knows no device: it reads a [`display::Head`] like the VNC
//! server and screenshots do. A pump thread per head waits for the head to
//! change and wakes the main thread (at most one wake outstanding, at most
//! one per [`FRAME_INTERVAL`]); the main thread then asks [`HeadView`] for
//! the damaged rectangles as BGRA bytes, uploads just those into its
//! texture and presents it (`runloop`, macOS).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use display::{CursorImage, Head, Rect, Seen};
use vm_core::sync::lock;

/// Rectangles one repaint uploads at most (more are coarsened by the
/// model): each is one texture upload.
pub const MAX_RECTS: usize = 64;

/// Shortest time between two wakes of the main thread: a 60 Hz screen
/// shows no more.
pub const FRAME_INTERVAL: Duration = Duration::from_micros(16_667);

/// How long the pump waits for a change before looking at what the model
/// does not announce (the cursor's visibility) and at its stop flag.
const POLL: Duration = Duration::from_millis(50);

/// Damaged pixels ready for a texture upload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tile {
    pub rect: Rect,
    /// `rect.height` rows of `rect.width` BGRA pixels (alpha 0xff), the
    /// byte order of a `BGRA8Unorm` texture.
    pub bgra: Vec<u8>,
}

/// What the window must do to show a head as it is now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Repaint {
    pub width: u32,
    pub height: u32,
    /// The frame's size changed (or this is the first repaint): the
    /// texture is remade at the new size before the tiles go in.
    pub resized: bool,
    pub tiles: Vec<Tile>,
    /// `Some` when the cursor image changed (`Some(None)`: no image).
    pub cursor_image: Option<Option<Arc<CursorImage>>>,
    /// `Some` when the cursor was shown or hidden.
    pub cursor_visible: Option<bool>,
    /// What the window has seen once it applied this.
    pub now: Seen,
}

impl Repaint {
    /// Nothing to upload or present.
    pub fn is_empty(&self) -> bool {
        !self.resized
            && self.tiles.is_empty()
            && self.cursor_image.is_none()
            && self.cursor_visible.is_none()
    }
}

/// One window's view of a head: what it has shown so far.
#[derive(Debug, Default)]
pub struct HeadView {
    seen: Seen,
    size: Option<(u32, u32)>,
    cursor_visible: Option<bool>,
}

impl HeadView {
    /// What changed on `head` since the last call, read out of the model
    /// (whose lock is held only while each piece is copied).
    pub fn catch_up(&mut self, head: &Head) -> Repaint {
        let c = head.changes(self.seen, MAX_RECTS);
        let size = (c.width, c.height);
        let resized = c.full || self.size != Some(size);
        self.size = Some(size);
        let mut tiles = Vec::with_capacity(c.rects.len());
        for rect in &c.rects {
            // Read now, so clipped to the frame as it is now; a resize in
            // between is reported by the next call.
            let (rect, pixels) = head.read(*rect);
            if !rect.is_empty() {
                tiles.push(Tile {
                    rect,
                    bgra: to_bgra(&pixels),
                });
            }
        }
        let cursor = head.cursor();
        let cursor_image = c.cursor.then(|| cursor.image.clone());
        let cursor_visible =
            (self.cursor_visible != Some(cursor.visible)).then_some(cursor.visible);
        self.cursor_visible = Some(cursor.visible);
        self.seen = c.now;
        Repaint {
            width: c.width,
            height: c.height,
            resized,
            tiles,
            cursor_image,
            cursor_visible,
            now: c.now,
        }
    }
}

/// The model's `0x00RRGGBB` pixels as BGRA bytes with an opaque alpha.
pub fn to_bgra(pixels: &[u32]) -> Vec<u8> {
    pixels
        .iter()
        .flat_map(|&p| (p | 0xff00_0000).to_le_bytes())
        .collect()
}

/// A cursor image's `0xAARRGGBB` pixels as RGBA bytes, alpha not
/// premultiplied (as an `NSBitmapImageRep` made with
/// `NSBitmapFormatAlphaNonpremultiplied` takes them).
pub fn cursor_rgba(image: &CursorImage) -> Vec<u8> {
    image
        .pixels
        .iter()
        .flat_map(|&p| {
            let [b, g, r, a] = p.to_le_bytes();
            [r, g, b, a]
        })
        .collect()
}

/// How long to wait before waking the main thread again, the last wake
/// having been at `last` (time handed in).
pub fn wake_delay(last: Option<Instant>, now: Instant) -> Duration {
    last.map_or(Duration::ZERO, |l| {
        FRAME_INTERVAL.saturating_sub(now.saturating_duration_since(l))
    })
}

/// What a pump thread and the main thread share for one head.
#[derive(Debug, Default)]
pub struct Pump {
    /// A wake is queued on the main thread and not yet handled.
    pending: AtomicBool,
    /// What the window showed last (set by the main thread).
    shown: Mutex<Seen>,
    stopped: AtomicBool,
}

impl Pump {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// The main thread applied a repaint showing `now`; the pump may wake
    /// it again.
    pub fn shown(&self, now: Seen) {
        *lock(&self.shown) = now;
        self.pending.store(false, Ordering::SeqCst);
    }

    /// Ends [`Self::run`] within `POLL`.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
    }

    /// Whether the window must be woken: no wake is outstanding and
    /// `head` changed since what the window showed (waiting up to
    /// [`POLL`] for that), or the cursor's visibility differs from
    /// `visible`, which is updated.
    fn due(&self, head: &Head, visible: &mut bool) -> bool {
        if self.pending.load(Ordering::SeqCst) {
            return false;
        }
        let seen = *lock(&self.shown);
        let changed = head.wait_change(seen, POLL);
        let now_visible = head.cursor().visible;
        let flipped = now_visible != *visible;
        *visible = now_visible;
        changed || flipped
    }

    /// Calls `wake` whenever the window is due, at most once
    /// per [`FRAME_INTERVAL`]; returns once stopped. A main thread that
    /// falls behind gets one wake, not a queue of them.
    pub fn run(&self, head: &Head, wake: impl Fn()) {
        let mut last_wake: Option<Instant> = None;
        let mut visible = head.cursor().visible;
        while !self.stopped.load(Ordering::SeqCst) {
            if !self.due(head, &mut visible) {
                if self.pending.load(Ordering::SeqCst) {
                    std::thread::sleep(FRAME_INTERVAL / 4);
                }
                continue;
            }
            let delay = wake_delay(last_wake, Instant::now());
            if !delay.is_zero() {
                std::thread::sleep(delay);
            }
            if self.stopped.load(Ordering::SeqCst) {
                break;
            }
            self.pending.store(true, Ordering::SeqCst);
            last_wake = Some(Instant::now());
            wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use display::Display;
    use std::sync::mpsc;

    fn head(w: u32, h: u32) -> Arc<Head> {
        let d = Display::new(vec![vec![]]);
        let head = d.heads()[0].clone();
        head.set_size(w, h);
        head
    }

    #[test]
    fn the_first_repaint_is_the_whole_frame_in_bgra() {
        let h = head(2, 1);
        h.write(Rect::new(0, 0, 2, 1), &[0x00112233, 0x00445566]);
        let r = HeadView::default().catch_up(&h);
        assert!(r.resized);
        assert_eq!((r.width, r.height), (2, 1));
        assert_eq!(
            r.tiles,
            vec![Tile {
                rect: Rect::new(0, 0, 2, 1),
                bgra: vec![0x33, 0x22, 0x11, 0xff, 0x66, 0x55, 0x44, 0xff],
            }]
        );
    }

    #[test]
    fn later_repaints_carry_only_the_damaged_tiles() {
        let h = head(64, 48);
        let mut v = HeadView::default();
        v.catch_up(&h);
        assert!(v.catch_up(&h).is_empty(), "nothing changed");
        h.write(Rect::new(40, 30, 1, 1), &[0x00ff0000]);
        let r = v.catch_up(&h);
        assert!(!r.resized);
        assert_eq!(r.tiles.len(), 1);
        let t = &r.tiles[0];
        assert_eq!(t.rect, Rect::new(32, 16, 16, 16));
        assert_eq!(t.bgra.len(), 16 * 16 * 4);
        // Pixel (40, 30) is row 14, column 8 of the tile.
        let at = (14 * 16 + 8) * 4;
        assert_eq!(&t.bgra[at..at + 4], &[0, 0, 0xff, 0xff]);
        assert_eq!(&t.bgra[..4], &[0, 0, 0, 0xff], "the rest is black");
    }

    #[test]
    fn a_resize_remakes_the_texture() {
        let h = head(8, 8);
        let mut v = HeadView::default();
        v.catch_up(&h);
        h.set_size(16, 4);
        let r = v.catch_up(&h);
        assert!(r.resized);
        assert_eq!((r.width, r.height), (16, 4));
        assert_eq!(
            r.tiles.iter().map(|t| t.bgra.len()).sum::<usize>(),
            16 * 4 * 4
        );
    }

    #[test]
    fn cursor_image_and_visibility_changes_are_reported_once() {
        let h = head(8, 8);
        let mut v = HeadView::default();
        let first = v.catch_up(&h);
        assert_eq!(first.cursor_visible, Some(false), "the model starts hidden");
        h.set_cursor_image(Some(CursorImage {
            width: 1,
            height: 1,
            hot_x: 0,
            hot_y: 0,
            pixels: vec![0x80112233],
        }));
        h.move_cursor(1, 1, true);
        let r = v.catch_up(&h);
        let image = r.cursor_image.clone().flatten().expect("the new image");
        assert_eq!(cursor_rgba(&image), vec![0x11, 0x22, 0x33, 0x80]);
        assert_eq!(r.cursor_visible, Some(true));
        assert!(v.catch_up(&h).is_empty());
        h.set_cursor_image(None);
        assert_eq!(v.catch_up(&h).cursor_image, Some(None));
    }

    #[test]
    fn wakes_are_spaced_by_a_frame() {
        let t = Instant::now();
        assert_eq!(wake_delay(None, t), Duration::ZERO);
        assert_eq!(wake_delay(Some(t), t), FRAME_INTERVAL);
        let later = t + Duration::from_millis(5);
        assert_eq!(
            wake_delay(Some(t), later),
            FRAME_INTERVAL - Duration::from_millis(5)
        );
        assert_eq!(wake_delay(Some(t), t + FRAME_INTERVAL * 2), Duration::ZERO);
    }

    #[test]
    fn a_window_is_due_once_until_it_has_shown_the_change() {
        let h = head(16, 16);
        let p = Pump::new();
        let mut visible = false;
        let mut v = HeadView::default();
        // The window has seen nothing yet: the first frame is due at once.
        assert!(p.due(&h, &mut visible));
        p.pending.store(true, Ordering::SeqCst); // as `run` does on a wake
        h.write(Rect::new(0, 0, 1, 1), &[1]);
        assert!(!p.due(&h, &mut visible), "one wake outstanding at most");
        p.shown(v.catch_up(&h).now);
        h.write(Rect::new(1, 0, 1, 1), &[2]);
        assert!(p.due(&h, &mut visible), "the next change");
        p.shown(v.catch_up(&h).now);
        h.move_cursor(0, 0, true);
        assert!(p.due(&h, &mut visible), "the cursor was shown");
        assert!(visible);
    }

    #[test]
    fn the_pump_wakes_the_window_and_stops() {
        let h = head(16, 16);
        let p = Pump::new();
        let (tx, rx) = mpsc::channel();
        let (p2, h2) = (p.clone(), h.clone());
        let t = std::thread::spawn(move || p2.run(&h2, move || tx.send(()).unwrap()));
        rx.recv_timeout(Duration::from_secs(10))
            .expect("a wake for the first frame");
        p.stop();
        t.join().unwrap();
    }
}
