//! Cursor state (apple-gfx.md §10): glyph, hotspot, position, visibility.
//!
//! The framework hands over an `NSBitmapImageRep`; only 32-bit R, G, B, A
//! images are understood (as in QEMU) and are converted to `0xAARRGGBB`
//! words, the host surface format. Any other depth clears the cursor. The
//! position `{0xffff, 0xffff}` means "not on this display" and hides the
//! cursor (QEMU passes it through as a position).

use crate::framework::{CursorGlyph, DisplayCoord};

/// Largest glyph side accepted; the framework's cursors are small, and the
/// bound keeps a bogus size from turning into a huge allocation.
pub const MAX_CURSOR_SIDE: u32 = 1024;

/// A converted cursor image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CursorImage {
    pub width: u32,
    pub height: u32,
    pub hotspot: DisplayCoord,
    /// Row-major `0xAARRGGBB` pixels, `width * height` of them.
    pub pixels: Vec<u32>,
}

/// Why a glyph was not turned into a cursor.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GlyphError {
    #[error("cursor glyph has {0} bits per pixel; only 32 is supported")]
    Depth(u32),
    #[error("cursor glyph of {width}x{height} is empty or larger than {MAX_CURSOR_SIDE}x{MAX_CURSOR_SIDE}")]
    Size { width: u32, height: u32 },
    #[error("cursor glyph rows of {bytes_per_row} bytes cannot hold {width} pixels")]
    Stride { bytes_per_row: u32, width: u32 },
    #[error("cursor glyph data is {have} bytes, {need} needed")]
    Short { have: usize, need: usize },
}

/// Converts an R, G, B, A glyph with row padding into ARGB words.
pub fn convert_glyph(
    glyph: &CursorGlyph,
    hotspot: DisplayCoord,
) -> Result<CursorImage, GlyphError> {
    let (w, h) = (glyph.width, glyph.height);
    if glyph.bits_per_pixel != 32 {
        return Err(GlyphError::Depth(glyph.bits_per_pixel));
    }
    if w == 0 || h == 0 || w > MAX_CURSOR_SIDE || h > MAX_CURSOR_SIDE {
        return Err(GlyphError::Size {
            width: w,
            height: h,
        });
    }
    // Both factors are at most 1024, so none of this arithmetic overflows.
    let row = w as usize * 4;
    let stride = glyph.bytes_per_row as usize;
    if stride < row {
        return Err(GlyphError::Stride {
            bytes_per_row: glyph.bytes_per_row,
            width: w,
        });
    }
    let need = stride * (h as usize - 1) + row;
    if glyph.data.len() < need {
        return Err(GlyphError::Short {
            have: glyph.data.len(),
            need,
        });
    }
    let mut pixels = Vec::with_capacity(w as usize * h as usize);
    for y in 0..h as usize {
        let line = &glyph.data[y * stride..y * stride + row];
        pixels.extend(line.chunks_exact(4).map(|p| {
            u32::from(p[3]) << 24 | u32::from(p[0]) << 16 | u32::from(p[1]) << 8 | u32::from(p[2])
        }));
    }
    Ok(CursorImage {
        width: w,
        height: h,
        hotspot,
        pixels,
    })
}

/// What the guest's cursor looks like now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CursorState {
    pub image: Option<CursorImage>,
    pub position: DisplayCoord,
    /// Last `cursorShowHandler` value; initially shown.
    pub shown: bool,
}

impl Default for CursorState {
    fn default() -> Self {
        Self {
            image: None,
            position: DisplayCoord::default(),
            shown: true,
        }
    }
}

impl CursorState {
    /// Whether the UI should draw the cursor.
    pub fn visible(&self) -> bool {
        self.shown && self.position != DisplayCoord::OFF_DISPLAY
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn glyph(w: u32, h: u32, stride: u32, data: Vec<u8>) -> CursorGlyph {
        CursorGlyph {
            bits_per_pixel: 32,
            width: w,
            height: h,
            bytes_per_row: stride,
            data,
        }
    }

    #[test]
    fn rgba_rows_with_padding_become_argb() {
        // 2x2, 12-byte rows: 8 bytes of pixels, 4 of padding.
        let data = vec![
            0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0xee, 0xee, 0xee, 0xee, //
            0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0xee, 0xee, 0xee, 0xee,
        ];
        let hot = DisplayCoord { x: 1, y: 0 };
        let img = convert_glyph(&glyph(2, 2, 12, data), hot).unwrap();
        assert_eq!(
            img.pixels,
            vec![0x4411_2233, 0x8855_6677, 0x0401_0203, 0x0805_0607]
        );
        assert_eq!((img.width, img.height, img.hotspot), (2, 2, hot));
    }

    #[test]
    fn last_row_needs_no_padding() {
        let img = convert_glyph(
            &glyph(1, 2, 8, vec![1, 2, 3, 4, 0, 0, 0, 0, 5, 6, 7, 8]),
            DisplayCoord::default(),
        );
        assert_eq!(img.unwrap().pixels, vec![0x0401_0203, 0x0805_0607]);
    }

    #[test]
    fn bad_glyphs_are_refused() {
        let mut g = glyph(2, 2, 8, vec![0; 16]);
        g.bits_per_pixel = 24;
        assert_eq!(
            convert_glyph(&g, DisplayCoord::default()),
            Err(GlyphError::Depth(24))
        );
        assert!(matches!(
            convert_glyph(&glyph(2, 2, 4, vec![0; 16]), DisplayCoord::default()),
            Err(GlyphError::Stride { .. })
        ));
        assert!(matches!(
            convert_glyph(&glyph(2, 2, 8, vec![0; 15]), DisplayCoord::default()),
            Err(GlyphError::Short { have: 15, need: 16 })
        ));
        assert!(matches!(
            convert_glyph(&glyph(0, 2, 8, vec![]), DisplayCoord::default()),
            Err(GlyphError::Size { .. })
        ));
        assert!(matches!(
            convert_glyph(
                &glyph(u32::MAX, u32::MAX, u32::MAX, vec![]),
                DisplayCoord::default()
            ),
            Err(GlyphError::Size { .. })
        ));
    }

    #[test]
    fn off_display_position_hides() {
        let mut c = CursorState::default();
        assert!(c.visible());
        c.position = DisplayCoord::OFF_DISPLAY;
        assert!(!c.visible());
        c.position = DisplayCoord { x: 0xffff, y: 3 };
        assert!(c.visible());
        c.shown = false;
        assert!(!c.visible());
    }
}
