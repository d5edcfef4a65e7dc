//! Pixel formats and rectangle encodings (RFC 6143 §7.4, §7.7).

use flate2::{Compress, Compression, FlushCompress};

/// Encoding numbers (RFC 6143 §7.7).
pub mod encoding {
    pub const RAW: i32 = 0;
    pub const ZRLE: i32 = 16;
    pub const CURSOR: i32 = -239;
    pub const DESKTOP_SIZE: i32 = -223;
}

/// A client's pixel format (RFC 6143 §7.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PixelFormat {
    pub bpp: u8,
    pub depth: u8,
    pub big_endian: bool,
    pub true_colour: bool,
    pub max: [u16; 3],
    pub shift: [u8; 3],
}

impl Default for PixelFormat {
    /// What the server offers: 32 bits, 0x00RRGGBB little-endian, which
    /// is the display model's own layout.
    fn default() -> Self {
        Self {
            bpp: 32,
            depth: 24,
            big_endian: false,
            true_colour: true,
            max: [255; 3],
            shift: [16, 8, 0],
        }
    }
}

impl PixelFormat {
    pub fn to_wire(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0] = self.bpp;
        b[1] = self.depth;
        b[2] = u8::from(self.big_endian);
        b[3] = u8::from(self.true_colour);
        for i in 0..3 {
            b[4 + 2 * i..6 + 2 * i].copy_from_slice(&self.max[i].to_be_bytes());
            b[10 + i] = self.shift[i];
        }
        b
    }

    /// A client's format, if this server can produce it: true colour at 8,
    /// 16 or 32 bits per pixel, each channel inside the pixel.
    pub fn from_wire(b: &[u8; 16]) -> Option<Self> {
        let pf = Self {
            bpp: b[0],
            depth: b[1],
            big_endian: b[2] != 0,
            true_colour: b[3] != 0,
            max: [
                u16::from_be_bytes([b[4], b[5]]),
                u16::from_be_bytes([b[6], b[7]]),
                u16::from_be_bytes([b[8], b[9]]),
            ],
            shift: [b[10], b[11], b[12]],
        };
        let fits = (0..3).all(|i| {
            let bits = 16 - pf.max[i].leading_zeros();
            u32::from(pf.shift[i]) + bits <= u32::from(pf.bpp)
        });
        (pf.true_colour && matches!(pf.bpp, 8 | 16 | 32) && fits).then_some(pf)
    }

    pub fn bytes(self) -> usize {
        usize::from(self.bpp / 8)
    }

    fn is_native(self) -> bool {
        self == Self::default()
    }

    /// `0x00RRGGBB` as this format's pixel value.
    pub fn value(self, p: u32) -> u32 {
        let ch = [(p >> 16) & 0xff, (p >> 8) & 0xff, p & 0xff];
        (0..3).fold(0, |v, i| {
            let c = ch[i] * u32::from(self.max[i]) / 255;
            v | c << self.shift[i]
        })
    }

    /// Appends `p` in this format.
    pub fn put(self, out: &mut Vec<u8>, p: u32) {
        let v = self.value(p);
        match (self.bpp, self.big_endian) {
            (8, _) => out.push(v as u8),
            (16, false) => out.extend_from_slice(&(v as u16).to_le_bytes()),
            (16, true) => out.extend_from_slice(&(v as u16).to_be_bytes()),
            (_, false) => out.extend_from_slice(&v.to_le_bytes()),
            (_, true) => out.extend_from_slice(&v.to_be_bytes()),
        }
    }

    /// Appends `pixels` in this format.
    pub fn put_all(self, out: &mut Vec<u8>, pixels: &[u32]) {
        if self.is_native() {
            out.reserve(pixels.len() * 4);
            for p in pixels {
                out.extend_from_slice(&(p & 0xff_ffff).to_le_bytes());
            }
            return;
        }
        for &p in pixels {
            self.put(out, p);
        }
    }

    /// ZRLE's compressed pixel (RFC 6143 §7.7.6): three bytes when a
    /// 32-bit pixel's colour fits in three of them; which three.
    fn cpixel(self) -> CPixel {
        let mask = (0..3).fold(0u32, |m, i| m | u32::from(self.max[i]) << self.shift[i]);
        if self.bpp != 32 || self.depth > 24 {
            CPixel::Full
        } else if mask <= 0xff_ffff {
            CPixel::Low
        } else if mask & 0xff == 0 {
            CPixel::High
        } else {
            CPixel::Full
        }
    }

    fn put_cpixel(self, cp: CPixel, out: &mut Vec<u8>, p: u32) {
        let v = self.value(p);
        match cp {
            CPixel::Full => self.put(out, p),
            CPixel::Low => {
                let b = v.to_le_bytes();
                if self.big_endian {
                    out.extend_from_slice(&[b[2], b[1], b[0]]);
                } else {
                    out.extend_from_slice(&b[..3]);
                }
            }
            CPixel::High => {
                let b = v.to_le_bytes();
                if self.big_endian {
                    out.extend_from_slice(&[b[3], b[2], b[1]]);
                } else {
                    out.extend_from_slice(&b[1..]);
                }
            }
        }
    }
}

#[derive(Clone, Copy)]
enum CPixel {
    Full,
    Low,
    High,
}

/// ZRLE's tile side.
const TILE: usize = 64;

/// One connection's ZRLE encoder: its zlib stream lives as long as the
/// connection (RFC 6143 §7.7.6).
pub struct Zrle {
    z: Compress,
}

/// zlib's level. With zlib-rs, level 2 compresses a full-HD frame about as
/// fast as miniz_oxide's level 1 did and to a sixth fewer bytes, and small
/// changes as tightly as level 6 (measured with the guest's benchmark
/// patterns; higher levels cost several times the time for full frames).
const ZLIB_LEVEL: u32 = 2;

impl Default for Zrle {
    fn default() -> Self {
        Self {
            z: Compress::new(Compression::new(ZLIB_LEVEL), true),
        }
    }
}

impl Zrle {
    /// The ZRLE data of a `width` x `height` rectangle of `pixels` (rows of
    /// `width`): its length and the zlib bytes.
    pub fn encode(
        &mut self,
        pf: PixelFormat,
        width: usize,
        height: usize,
        pixels: &[u32],
    ) -> Vec<u8> {
        let cp = pf.cpixel();
        let mut raw = Vec::with_capacity(width * height * 4 / 2 + 64);
        let mut tile = Vec::with_capacity(TILE * TILE);
        let mut palette: Vec<u32> = Vec::with_capacity(16);
        for ty in (0..height).step_by(TILE) {
            let th = TILE.min(height - ty);
            for tx in (0..width).step_by(TILE) {
                let tw = TILE.min(width - tx);
                tile.clear();
                for y in ty..ty + th {
                    let row = y * width + tx;
                    tile.extend(pixels[row..row + tw].iter().map(|p| p & 0xff_ffff));
                }
                palette.clear();
                for &p in &tile {
                    if !palette.contains(&p) {
                        if palette.len() == 16 {
                            palette.push(p);
                            break;
                        }
                        palette.push(p);
                    }
                }
                match palette.len() {
                    1 => {
                        raw.push(1);
                        pf.put_cpixel(cp, &mut raw, palette[0]);
                    }
                    n @ 2..=16 => {
                        raw.push(n as u8);
                        for &p in &palette {
                            pf.put_cpixel(cp, &mut raw, p);
                        }
                        let bits = match n {
                            2 => 1,
                            3..=4 => 2,
                            _ => 4,
                        };
                        for row in tile.chunks(tw) {
                            let (mut byte, mut used) = (0u8, 0);
                            for p in row {
                                let idx = palette.iter().position(|q| q == p).unwrap_or(0) as u8;
                                byte |= idx << (8 - bits - used);
                                used += bits;
                                if used == 8 {
                                    raw.push(byte);
                                    byte = 0;
                                    used = 0;
                                }
                            }
                            if used > 0 {
                                raw.push(byte);
                            }
                        }
                    }
                    _ => {
                        raw.push(0);
                        for &p in &tile {
                            pf.put_cpixel(cp, &mut raw, p);
                        }
                    }
                }
            }
        }
        let z = self.deflate(&raw);
        let mut out = Vec::with_capacity(4 + z.len());
        out.extend_from_slice(&(z.len() as u32).to_be_bytes());
        out.extend_from_slice(&z);
        out
    }

    fn deflate(&mut self, input: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(input.len() / 2 + 1024);
        let mut consumed = 0;
        loop {
            if out.capacity() - out.len() < 1024 {
                out.reserve(out.capacity().max(4096));
            }
            let before_in = self.z.total_in();
            let status = self
                .z
                .compress_vec(&input[consumed..], &mut out, FlushCompress::Sync);
            consumed += (self.z.total_in() - before_in) as usize;
            if status.is_err() {
                // Cannot happen with a live stream and room to write; an
                // empty result makes the client drop the connection.
                tracing::error!("vnc: zlib failed: {status:?}");
                return Vec::new();
            }
            // Done when all input is in and the flush left spare room.
            if consumed == input.len() && out.len() < out.capacity() {
                return out;
            }
        }
    }
}

/// The Cursor pseudo-encoding's data (RFC 6143 §7.8.1): pixels, then a
/// bitmask of the opaque ones, rows padded to bytes.
pub fn cursor_data(pf: PixelFormat, width: usize, height: usize, argb: &[u32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(width * height * pf.bytes() + height * width.div_ceil(8));
    pf.put_all(&mut out, argb);
    for row in argb.chunks(width.max(1)).take(height) {
        let mut mask = vec![0u8; width.div_ceil(8)];
        for (x, p) in row.iter().enumerate() {
            if p >> 24 >= 0x80 {
                mask[x / 8] |= 0x80 >> (x % 8);
            }
        }
        out.extend_from_slice(&mask);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::{Decompress, FlushDecompress};

    #[test]
    fn the_server_format_round_trips_and_converts() {
        let pf = PixelFormat::default();
        assert_eq!(PixelFormat::from_wire(&pf.to_wire()), Some(pf));
        let mut out = Vec::new();
        pf.put(&mut out, 0x12_3456);
        assert_eq!(out, [0x56, 0x34, 0x12, 0]);
        let rgb565 = PixelFormat {
            bpp: 16,
            depth: 16,
            big_endian: false,
            true_colour: true,
            max: [31, 63, 31],
            shift: [11, 5, 0],
        };
        assert_eq!(rgb565.value(0xff_ffff), 0xffff);
        assert_eq!(rgb565.value(0xff_0000), 0xf800);
    }

    #[test]
    fn impossible_formats_are_refused() {
        let mut w = PixelFormat::default().to_wire();
        w[3] = 0; // colour map
        assert!(PixelFormat::from_wire(&w).is_none());
        let mut w = PixelFormat::default().to_wire();
        w[0] = 24;
        assert!(PixelFormat::from_wire(&w).is_none());
        let mut w = PixelFormat::default().to_wire();
        w[10] = 30; // red past the pixel
        assert!(PixelFormat::from_wire(&w).is_none());
    }

    /// Decodes ZRLE tiles (solid, packed palette, raw) with 3-byte pixels.
    fn decode(z: &mut Decompress, data: &[u8], w: usize, h: usize) -> Vec<u32> {
        let len = u32::from_be_bytes(data[..4].try_into().unwrap()) as usize;
        assert_eq!(len, data.len() - 4);
        let mut raw = Vec::with_capacity(1 << 20);
        z.decompress_vec(&data[4..], &mut raw, FlushDecompress::Sync)
            .unwrap();
        let mut at;
        let mut out = vec![0u32; w * h];
        let mut tiles = Vec::new();
        for ty in (0..h).step_by(TILE) {
            for tx in (0..w).step_by(TILE) {
                tiles.push((tx, ty, TILE.min(w - tx), TILE.min(h - ty)));
            }
        }
        let mut pos = 0usize;
        for (tx, ty, tw, th) in tiles {
            at = pos;
            let sub = raw[at];
            at += 1;
            let mut set = |x: usize, y: usize, p: u32| out[(ty + y) * w + tx + x] = p;
            match sub {
                0 => {
                    for y in 0..th {
                        for x in 0..tw {
                            let p = u32::from_le_bytes([raw[at], raw[at + 1], raw[at + 2], 0]);
                            at += 3;
                            set(x, y, p);
                        }
                    }
                }
                1 => {
                    let p = u32::from_le_bytes([raw[at], raw[at + 1], raw[at + 2], 0]);
                    at += 3;
                    for y in 0..th {
                        for x in 0..tw {
                            set(x, y, p);
                        }
                    }
                }
                n @ 2..=16 => {
                    let pal: Vec<u32> = (0..n)
                        .map(|_| {
                            let p = u32::from_le_bytes([raw[at], raw[at + 1], raw[at + 2], 0]);
                            at += 3;
                            p
                        })
                        .collect();
                    let bits = match n {
                        2 => 1,
                        3..=4 => 2,
                        _ => 4,
                    };
                    for y in 0..th {
                        let mut used = 8;
                        let mut byte = 0u8;
                        for x in 0..tw {
                            if used == 8 {
                                byte = raw[at];
                                at += 1;
                                used = 0;
                            }
                            let idx = (byte >> (8 - bits - used)) & ((1 << bits) - 1);
                            used += bits;
                            set(x, y, pal[idx as usize]);
                        }
                    }
                }
                other => panic!("subencoding {other}"),
            }
            pos = at;
        }
        assert_eq!(pos, raw.len(), "no bytes left over");
        out
    }

    #[test]
    fn zrle_tiles_decode_to_the_pixels() {
        let (w, h) = (130, 70);
        let mut frames = Vec::new();
        // Solid, few-colour and many-colour content across partial tiles.
        frames.push(vec![0x11_2233; w * h]);
        frames.push(
            (0..w * h)
                .map(|i| if i % 7 == 0 { 0xff } else { 0xff_0000 })
                .collect(),
        );
        frames.push(
            (0..w * h)
                .map(|i| (i as u32).wrapping_mul(2_654_435_761) & 0xff_ffff)
                .collect(),
        );
        let mut enc = Zrle::default();
        let mut dec = Decompress::new(true);
        for f in frames {
            let data = enc.encode(PixelFormat::default(), w, h, &f);
            assert_eq!(decode(&mut dec, &data, w, h), f);
        }
    }

    #[test]
    fn cursor_mask_marks_opaque_pixels() {
        let d = cursor_data(PixelFormat::default(), 9, 1, &[0xff00_0000; 9]);
        assert_eq!(&d[36..], &[0xff, 0x80]);
        let d = cursor_data(PixelFormat::default(), 2, 1, &[0, 0x80ff_ffff]);
        assert_eq!(&d[8..], &[0x40]);
    }
}
