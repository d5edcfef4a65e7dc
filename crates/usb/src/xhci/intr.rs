//! Interrupters and their event rings (XHCI 1.2 §4.9.4, §4.17, §5.5.2).
//!
//! The controller is the producer of each event ring. The guest describes
//! the ring through the Event Ring Segment Table (ERSTBA/ERSTSZ); segment
//! entries are read lazily when the producer enters a segment, and every
//! guest-supplied value is checked: the table may hold 1..=16 entries
//! ([`MAX_ERST_ENTRIES`]), a segment 16..=4096 TRBs. A ring that breaks
//! those rules takes no events (they are dropped with a guest error); a
//! table or segment that is not guest RAM is a host system error.
//!
//! Enqueue == dequeue (ERDP) means empty, so one slot always stays free.
//! When a single event still fits, an Event Ring Full Error event is
//! written instead, and later events are dropped until the guest moves
//! ERDP past some events.

use std::sync::atomic::{fence, Ordering};
use std::time::Instant;

use vm_core::memory::{read_exact, write_all};
use vm_core::GuestRam;

use super::regs::*;
use super::trb::{Trb, CC_EVENT_RING_FULL, TRB_CYCLE, TRB_HOST_CONTROLLER_EVENT, TRB_SIZE};

/// Segment sizes the ring accepts (XHCI 1.2 Table 6-40).
const MIN_SEGMENT_TRBS: u32 = 16;
const MAX_SEGMENT_TRBS: u32 = 4096;

/// Why an event was not written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PostError {
    /// The guest set up no usable ring (ERSTSZ 0 or too big, bad segment
    /// size).
    NoRing,
    /// The ring is full; the event is lost.
    Full,
    /// The segment table or a segment is not guest RAM.
    Dma,
}

#[derive(Clone, Copy, Debug, Default)]
struct Segment {
    base: u64,
    size: u32,
}

/// An interrupter in a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedInterrupter {
    pub iman: u32,
    pub imod: u32,
    pub erstsz: u32,
    pub erstba: u64,
    pub erdp: u64,
    /// The segment the producer is in, once loaded: base and TRBs.
    pub segment: Option<(u64, u32)>,
    pub seg_index: u32,
    pub enq_index: u32,
    /// Producer cycle state.
    pub pcs: bool,
    /// Events posted that no interrupt announced yet.
    pub undelivered: bool,
}

/// One interrupter: its registers and the producer side of its ring.
#[derive(Debug)]
pub struct Interrupter {
    pub iman: u32,
    pub imod: u32,
    pub erstsz: u32,
    pub erstba: u64,
    pub erdp: u64,
    seg_index: u32,
    seg: Option<Segment>,
    enq_index: u32,
    pcs: bool,
    /// Events were posted that no interrupt has announced yet.
    pub undelivered: bool,
    pub last_irq: Option<Instant>,
    pub timer_armed: bool,
}

impl Default for Interrupter {
    fn default() -> Self {
        Self::new()
    }
}

impl Interrupter {
    pub fn new() -> Self {
        Self {
            iman: 0,
            imod: IMOD_RESET,
            erstsz: 0,
            erstba: 0,
            erdp: 0,
            seg_index: 0,
            seg: None,
            enq_index: 0,
            pcs: true,
            undelivered: false,
            last_irq: None,
            timer_armed: false,
        }
    }

    /// The interrupter's registers and producer position, for a snapshot.
    pub fn save(&self) -> SavedInterrupter {
        SavedInterrupter {
            iman: self.iman,
            imod: self.imod,
            erstsz: self.erstsz,
            erstba: self.erstba,
            erdp: self.erdp,
            segment: self.seg.map(|s| (s.base, s.size)),
            seg_index: self.seg_index,
            enq_index: self.enq_index,
            pcs: self.pcs,
            undelivered: self.undelivered,
        }
    }

    /// An interrupter as `saved` describes it, if the guest's register
    /// writes and the producer could have left it so: registers within
    /// their fields' masks, a loaded segment of a size the ring accepts,
    /// the producer inside it and inside the segment table. Moderation
    /// starts afresh.
    pub fn restored(saved: &SavedInterrupter) -> Result<Self, String> {
        let seg = match saved.segment {
            Some((base, size)) => {
                if !(MIN_SEGMENT_TRBS..=MAX_SEGMENT_TRBS).contains(&size)
                    || base & !ERSTBA_PTR_MASK != 0
                    || saved.enq_index >= size
                {
                    return Err(format!(
                        "event ring segment of {size} TRBs at {base:#x}, producer at {}",
                        saved.enq_index
                    ));
                }
                Some(Segment { base, size })
            }
            None if saved.enq_index == 0 => None,
            None => return Err("an event ring producer without a segment".into()),
        };
        if saved.erstsz & !0xffff != 0
            || saved.seg_index > MAX_ERST_ENTRIES
            || (seg.is_some() && saved.seg_index >= saved.erstsz)
            || saved.erstba & !ERSTBA_PTR_MASK != 0
        {
            return Err(format!(
                "event ring segment table of {} entries at {:#x}, producer in entry {}",
                saved.erstsz, saved.erstba, saved.seg_index
            ));
        }
        Ok(Self {
            iman: saved.iman & (IMAN_IP | IMAN_IE),
            imod: saved.imod,
            erstsz: saved.erstsz,
            erstba: saved.erstba,
            erdp: saved.erdp,
            seg_index: saved.seg_index,
            seg,
            enq_index: saved.enq_index,
            pcs: saved.pcs,
            undelivered: saved.undelivered,
            last_irq: None,
            timer_armed: false,
        })
    }

    /// Writing ERSTBA (re)starts the ring at entry 0 with cycle state 1.
    pub fn set_erstba(&mut self, value: u64) {
        self.erstba = value & ERSTBA_PTR_MASK;
        self.seg_index = 0;
        self.seg = None;
        self.enq_index = 0;
        self.pcs = true;
    }

    pub fn dequeue(&self) -> u64 {
        self.erdp & ERDP_PTR_MASK
    }

    /// Whether events sit between the guest's dequeue pointer and ours.
    pub fn has_unconsumed_events(&self) -> bool {
        match self.seg {
            Some(seg) => self.enqueue_addr(seg) != self.dequeue(),
            None => false,
        }
    }

    fn enqueue_addr(&self, seg: Segment) -> u64 {
        seg.base
            .wrapping_add(u64::from(self.enq_index).wrapping_mul(TRB_SIZE))
    }

    fn load_segment(&self, mem: &GuestRam, index: u32) -> Result<Segment, PostError> {
        if self.erstsz == 0 || self.erstsz > MAX_ERST_ENTRIES || index >= self.erstsz {
            return Err(PostError::NoRing);
        }
        let addr = self
            .erstba
            .checked_add(u64::from(index) * 16)
            .ok_or(PostError::Dma)?;
        let mut e = [0u8; 16];
        read_exact(mem, addr, &mut e).map_err(|_| PostError::Dma)?;
        let mut b = [0u8; 8];
        b.copy_from_slice(&e[0..8]);
        let base = u64::from_le_bytes(b) & ERSTBA_PTR_MASK;
        let size = u32::from_le_bytes([e[8], e[9], e[10], e[11]]) & 0xffff;
        if !(MIN_SEGMENT_TRBS..=MAX_SEGMENT_TRBS).contains(&size) {
            vm_core::guest_error!("xhci: event ring segment {index} has {size} TRBs");
            return Err(PostError::NoRing);
        }
        Ok(Segment { base, size })
    }

    /// The producer position after `pos`, loading the next segment entry
    /// when `pos` is the last TRB of its segment.
    fn step(&self, mem: &GuestRam, pos: Position) -> Result<Position, PostError> {
        if pos.enq + 1 < pos.seg.size {
            return Ok(Position {
                enq: pos.enq + 1,
                ..pos
            });
        }
        let wrap = pos.seg_index + 1 >= self.erstsz;
        let seg_index = if wrap { 0 } else { pos.seg_index + 1 };
        Ok(Position {
            seg_index,
            seg: self.load_segment(mem, seg_index)?,
            enq: 0,
            pcs: pos.pcs ^ wrap,
        })
    }

    /// Writes `event` at the enqueue position with the producer cycle bit.
    ///
    /// One slot always stays empty so that enqueue == dequeue means an
    /// empty ring. When only one more event fits, an Event Ring Full Error
    /// takes its place; after that events are dropped until the guest
    /// consumes some.
    pub fn post(&mut self, mem: &GuestRam, event: Trb) -> Result<(), PostError> {
        let seg = match self.seg {
            Some(s) => s,
            None => {
                let s = self.load_segment(mem, self.seg_index)?;
                self.seg = Some(s);
                s
            }
        };
        let here = Position {
            seg_index: self.seg_index,
            seg,
            enq: self.enq_index,
            pcs: self.pcs,
        };
        let deq = self.dequeue();
        let next = self.step(mem, here)?;
        if next.addr() == deq {
            return Err(PostError::Full);
        }
        let full = self.step(mem, next)?.addr() == deq;
        let mut event = event;
        if full {
            event = Trb {
                parameter: 0,
                status: u32::from(CC_EVENT_RING_FULL) << 24,
                control: TRB_HOST_CONTROLLER_EVENT << 10,
            };
        }
        event.control = (event.control & !TRB_CYCLE) | u32::from(here.pcs);
        let bytes = event.to_bytes();
        let addr = here.addr();
        // The cycle bit hands the TRB to the guest, so it goes last.
        write_all(mem, addr, &bytes[..12]).map_err(|_| PostError::Dma)?;
        fence(Ordering::Release);
        write_all(mem, addr.wrapping_add(12), &bytes[12..]).map_err(|_| PostError::Dma)?;
        self.seg_index = next.seg_index;
        self.enq_index = next.enq;
        self.pcs = next.pcs;
        self.seg = Some(next.seg);
        if full {
            return Err(PostError::Full);
        }
        Ok(())
    }
}

/// A producer position on the ring.
#[derive(Clone, Copy, Debug)]
struct Position {
    seg_index: u32,
    seg: Segment,
    enq: u32,
    pcs: bool,
}

impl Position {
    fn addr(&self) -> u64 {
        self.seg
            .base
            .wrapping_add(u64::from(self.enq).wrapping_mul(TRB_SIZE))
    }
}
