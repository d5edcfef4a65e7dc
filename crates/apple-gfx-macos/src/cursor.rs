//! Where the guest's cursor sits in a window, in AppKit points.
//!
//! The window shows the guest's frame scaled to the view (the layer fills
//! it), so the host cursor made from the guest's glyph must be scaled the
//! same way for the guest's pointer and the host's to line up. Portable so
//! that it is tested on every host.

/// A host cursor's image size and hot spot, in points, top-left origin (as
/// `NSCursor` takes them).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CursorGeometry {
    pub width: f64,
    pub height: f64,
    pub hot_x: f64,
    pub hot_y: f64,
}

/// Largest glyph side, in guest pixels, made into a host cursor: guests
/// draw 32–64 pixel pointers, and AppKit has no use for more.
pub const MAX_CURSOR_PIXELS: u32 = 256;

/// The geometry of a `glyph_px` glyph with its hot spot at `hot_px` (guest
/// pixels, guest-chosen) in a view `view_points` wide that shows a frame
/// `frame_pixels` wide. `None` for an empty or oversized glyph, or while
/// either width is unknown. A hot spot outside the glyph is pulled onto
/// its edge.
pub fn cursor_geometry(
    glyph_px: (u32, u32),
    hot_px: (u16, u16),
    view_points: f64,
    frame_pixels: u32,
) -> Option<CursorGeometry> {
    let (w, h) = glyph_px;
    if w == 0 || h == 0 || w > MAX_CURSOR_PIXELS || h > MAX_CURSOR_PIXELS {
        return None;
    }
    if frame_pixels == 0 || !view_points.is_finite() || view_points <= 0.0 {
        return None;
    }
    let scale = view_points / f64::from(frame_pixels);
    let hot_x = u32::from(hot_px.0).min(w - 1);
    let hot_y = u32::from(hot_px.1).min(h - 1);
    Some(CursorGeometry {
        width: f64::from(w) * scale,
        height: f64::from(h) * scale,
        hot_x: f64::from(hot_x) * scale,
        hot_y: f64::from(hot_y) * scale,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cursor_scales_with_the_frame() {
        // A 1920-pixel frame in a 960-point window (Retina: 1:1 pixels).
        let g = cursor_geometry((32, 32), (4, 6), 960.0, 1920).unwrap();
        assert_eq!(
            g,
            CursorGeometry {
                width: 16.0,
                height: 16.0,
                hot_x: 2.0,
                hot_y: 3.0
            }
        );
        // The window enlarged to twice the frame.
        let g = cursor_geometry((32, 16), (31, 15), 3840.0, 1920).unwrap();
        assert_eq!(
            (g.width, g.height, g.hot_x, g.hot_y),
            (64.0, 32.0, 62.0, 30.0)
        );
    }

    #[test]
    fn hostile_glyphs_and_hot_spots_are_contained() {
        let g = cursor_geometry((32, 32), (u16::MAX, 40), 1920.0, 1920).unwrap();
        assert_eq!((g.hot_x, g.hot_y), (31.0, 31.0));
        assert_eq!(cursor_geometry((0, 32), (0, 0), 1920.0, 1920), None);
        assert_eq!(cursor_geometry((32, 0), (0, 0), 1920.0, 1920), None);
        assert_eq!(cursor_geometry((257, 32), (0, 0), 1920.0, 1920), None);
        assert_eq!(cursor_geometry((32, u32::MAX), (0, 0), 1920.0, 1920), None);
    }

    #[test]
    fn no_geometry_before_the_window_and_the_mode_are_known() {
        assert_eq!(cursor_geometry((32, 32), (0, 0), 1920.0, 0), None);
        assert_eq!(cursor_geometry((32, 32), (0, 0), 0.0, 1920), None);
        assert_eq!(cursor_geometry((32, 32), (0, 0), f64::NAN, 1920), None);
    }
}
