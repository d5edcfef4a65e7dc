//! Damage at tile granularity: which [`TILE`] x [`TILE`] squares of a frame
//! changed, and those squares as few non-overlapping rectangles.
//!
//! A guest's declared damage is coarse (a framebuffer console flushes whole
//! rows, a flush covers everything drawn since the last one) and damage
//! from several writes overlaps. Front ends send bytes for every damaged
//! pixel, so damage is kept as the tiles whose pixels really changed, and
//! overlapping damage is merged tile by tile before it is sent.

use crate::Rect;

/// A tile's side in pixels (QEMU's VNC server compares 16-pixel blocks
/// too; smaller tiles cost more rectangles than they save in pixels).
pub const TILE: u32 = 16;

/// A set of tiles of a `width` x `height` frame (on the frame's tile grid),
/// limited to the tiles of one area of it.
#[derive(Clone, Debug)]
pub struct Tiles {
    width: u32,
    height: u32,
    /// The area's first tile column and row.
    col0: u32,
    row0: u32,
    cols: u32,
    rows: u32,
    dirty: Vec<bool>,
}

impl Tiles {
    /// No tiles yet, able to hold the tiles of `area` (clipped to the
    /// frame); tiles outside it are ignored.
    pub fn new(width: u32, height: u32, area: Rect) -> Self {
        let a = area.clip(width, height);
        let (col0, row0) = (a.x / TILE, a.y / TILE);
        let (cols, rows) = if a.is_empty() {
            (0, 0)
        } else {
            (
                (a.x + a.width).div_ceil(TILE) - col0,
                (a.y + a.height).div_ceil(TILE) - row0,
            )
        };
        Self {
            width,
            height,
            col0,
            row0,
            cols,
            rows,
            dirty: vec![false; cols as usize * rows as usize],
        }
    }

    /// Marks the tile holding pixel (`x`, `y`).
    pub fn mark_pixel(&mut self, x: u32, y: u32) {
        let (c, r) = (x / TILE, y / TILE);
        if c >= self.col0
            && r >= self.row0
            && c - self.col0 < self.cols
            && r - self.row0 < self.rows
        {
            let i = (r - self.row0) as usize * self.cols as usize + (c - self.col0) as usize;
            self.dirty[i] = true;
        }
    }

    /// Marks every tile `rect` touches.
    pub fn mark(&mut self, rect: Rect) {
        let r = rect.clip(self.width, self.height);
        if r.is_empty() || self.cols == 0 {
            return;
        }
        let c0 = (r.x / TILE).max(self.col0);
        let c1 = (r.x + r.width).div_ceil(TILE).min(self.col0 + self.cols);
        let r0 = (r.y / TILE).max(self.row0);
        let r1 = (r.y + r.height).div_ceil(TILE).min(self.row0 + self.rows);
        for row in r0..r1 {
            let at = (row - self.row0) as usize * self.cols as usize;
            if c0 < c1 {
                self.dirty[at + (c0 - self.col0) as usize..at + (c1 - self.col0) as usize]
                    .fill(true);
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        !self.dirty.contains(&true)
    }

    /// The marked tiles as non-overlapping rectangles clipped to the frame:
    /// each row's runs of marked tiles, a run extended down while the rows
    /// below have the same run. More than `max` of those become each tile
    /// row's span merged the same way, and more than `max` of those their
    /// bounding box.
    pub fn rects(&self, max: usize) -> Vec<Rect> {
        let max = max.max(1);
        let exact = self.merge(|row| self.runs(row));
        if exact.len() <= max {
            return exact;
        }
        let spans = self.merge(|row| {
            let r = self.runs(row);
            match (r.first(), r.last()) {
                (Some(a), Some(b)) => vec![(a.0, b.1)],
                _ => Vec::new(),
            }
        });
        if spans.len() <= max {
            return spans;
        }
        vec![spans.iter().fold(Rect::default(), |a, r| a.union(r))]
    }

    /// Runs of marked tiles in a row of the area: `(first, past_last)`
    /// columns relative to the area.
    fn runs(&self, row: u32) -> Vec<(u32, u32)> {
        let at = row as usize * self.cols as usize;
        let line = &self.dirty[at..at + self.cols as usize];
        let mut out = Vec::new();
        let mut col = 0;
        while col < self.cols {
            if !line[col as usize] {
                col += 1;
                continue;
            }
            let start = col;
            while col < self.cols && line[col as usize] {
                col += 1;
            }
            out.push((start, col));
        }
        out
    }

    /// Rectangles from each row's runs, a run merged with the identical
    /// run of the row above.
    fn merge(&self, runs_of: impl Fn(u32) -> Vec<(u32, u32)>) -> Vec<Rect> {
        // Rectangles in tiles: (first col, past-last col, first row, rows).
        let mut out: Vec<(u32, u32, u32, u32)> = Vec::new();
        // Indices into `out` of the rectangles the row above ended in.
        let mut open: Vec<usize> = Vec::new();
        for row in 0..self.rows {
            let mut next = Vec::new();
            for (c0, c1) in runs_of(row) {
                match open.iter().find(|&&i| out[i].0 == c0 && out[i].1 == c1) {
                    Some(&i) => {
                        out[i].3 += 1;
                        next.push(i);
                    }
                    None => {
                        out.push((c0, c1, row, 1));
                        next.push(out.len() - 1);
                    }
                }
            }
            open = next;
        }
        out.into_iter()
            .map(|(c0, c1, r0, n)| {
                Rect::new(
                    (self.col0 + c0) * TILE,
                    (self.row0 + r0) * TILE,
                    (c1 - c0) * TILE,
                    n * TILE,
                )
                .clip(self.width, self.height)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn area(r: &[Rect]) -> u64 {
        r.iter()
            .map(|r| u64::from(r.width) * u64::from(r.height))
            .sum()
    }

    #[test]
    fn overlapping_marks_become_disjoint_tile_rectangles() {
        let mut t = Tiles::new(100, 50, Rect::new(0, 0, 100, 50));
        t.mark(Rect::new(1, 1, 10, 10));
        t.mark(Rect::new(5, 5, 10, 10));
        assert_eq!(t.rects(8), vec![Rect::new(0, 0, 16, 16)]);
        t.mark(Rect::new(90, 40, 10, 10));
        // The last tile column and row are clipped to the frame.
        assert_eq!(
            t.rects(8),
            vec![Rect::new(0, 0, 16, 16), Rect::new(80, 32, 20, 18)]
        );
    }

    #[test]
    fn identical_runs_merge_down_and_others_stay_apart() {
        let mut t = Tiles::new(64, 64, Rect::new(0, 0, 64, 64));
        t.mark(Rect::new(0, 0, 32, 32)); // 2x2 tiles
        t.mark(Rect::new(48, 0, 1, 1));
        t.mark(Rect::new(16, 48, 1, 1));
        assert_eq!(
            t.rects(8),
            vec![
                Rect::new(0, 0, 32, 32),
                Rect::new(48, 0, 16, 16),
                Rect::new(16, 48, 16, 16)
            ]
        );
    }

    #[test]
    fn too_many_rectangles_coarsen_to_spans_then_a_box() {
        let mut t = Tiles::new(64, 64, Rect::new(0, 0, 64, 64));
        for i in 0..4 {
            t.mark_pixel(i * 16 * (i % 2), i * 16);
        }
        let exact = t.rects(8);
        assert_eq!(exact.len(), 4);
        assert_eq!(area(&exact), 4 * 256);
        let mut chequer = Tiles::new(64, 32, Rect::new(0, 0, 64, 32));
        for (x, y) in [(0, 0), (32, 0), (16, 16), (48, 16)] {
            chequer.mark_pixel(x, y);
        }
        assert_eq!(
            chequer.rects(2),
            vec![Rect::new(0, 0, 48, 16), Rect::new(16, 16, 48, 16)]
        );
        assert_eq!(chequer.rects(1), vec![Rect::new(0, 0, 64, 32)]);
    }

    #[test]
    fn tiles_outside_the_area_or_frame_are_ignored() {
        let mut t = Tiles::new(64, 64, Rect::new(16, 16, 16, 16));
        t.mark(Rect::new(0, 0, 64, 64));
        t.mark_pixel(0, 0);
        t.mark_pixel(1000, 1000);
        t.mark(Rect::new(u32::MAX, u32::MAX, 9, 9));
        assert_eq!(t.rects(8), vec![Rect::new(16, 16, 16, 16)]);
        let empty = Tiles::new(64, 64, Rect::new(70, 0, 5, 5));
        assert!(empty.is_empty());
        assert!(empty.rects(8).is_empty());
    }
}
