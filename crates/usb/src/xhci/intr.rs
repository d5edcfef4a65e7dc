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
//! The ring is full when the next enqueue position is the guest's dequeue
//! pointer (ERDP); the producer then writes an Event Ring Full Error event
//! in the last free slot and drops events until the guest moves ERDP.

use std::sync::atomic::{fence, Ordering};
use std::time::Instant;

use vm_core::memory::{read_exact, write_all};
use vm_core::GuestMemory;

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
    full: bool,
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
            full: false,
            undelivered: false,
            last_irq: None,
            timer_armed: false,
        }
    }

    /// Writing ERSTBA (re)starts the ring at entry 0 with cycle state 1.
    pub fn set_erstba(&mut self, value: u64) {
        self.erstba = value & ERSTBA_PTR_MASK;
        self.seg_index = 0;
        self.seg = None;
        self.enq_index = 0;
        self.pcs = true;
        self.full = false;
    }

    pub fn dequeue(&self) -> u64 {
        self.erdp & ERDP_PTR_MASK
    }

    /// A new dequeue pointer from the guest lifts a full condition.
    pub fn dequeue_moved(&mut self) {
        self.full = false;
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

    fn load_segment(&self, mem: &GuestMemory, index: u32) -> Result<Segment, PostError> {
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

    /// Writes `event` at the enqueue position with the producer cycle bit.
    pub fn post(&mut self, mem: &GuestMemory, event: Trb) -> Result<(), PostError> {
        if self.full {
            return Err(PostError::Full);
        }
        let seg = match self.seg {
            Some(s) => s,
            None => {
                let s = self.load_segment(mem, self.seg_index)?;
                self.seg = Some(s);
                s
            }
        };
        let here = self.enqueue_addr(seg);
        // Where the producer goes next.
        let (next_index, next_enq, next_pcs, next_seg) = if self.enq_index + 1 < seg.size {
            (self.seg_index, self.enq_index + 1, self.pcs, seg)
        } else {
            let wrap = self.seg_index + 1 >= self.erstsz;
            let ni = if wrap { 0 } else { self.seg_index + 1 };
            let ns = self.load_segment(mem, ni)?;
            (ni, 0, self.pcs ^ wrap, ns)
        };
        let next_addr = next_seg
            .base
            .wrapping_add(u64::from(next_enq).wrapping_mul(TRB_SIZE));
        let mut event = event;
        let full = next_addr == self.dequeue();
        if full {
            event = Trb {
                parameter: 0,
                status: u32::from(CC_EVENT_RING_FULL) << 24,
                control: TRB_HOST_CONTROLLER_EVENT << 10,
            };
        }
        event.control = (event.control & !TRB_CYCLE) | u32::from(self.pcs);
        let bytes = event.to_bytes();
        // The cycle bit hands the TRB to the guest, so it goes last.
        write_all(mem, here, &bytes[..12]).map_err(|_| PostError::Dma)?;
        fence(Ordering::Release);
        write_all(mem, here.wrapping_add(12), &bytes[12..]).map_err(|_| PostError::Dma)?;
        self.seg_index = next_index;
        self.enq_index = next_enq;
        self.pcs = next_pcs;
        self.seg = Some(next_seg);
        if full {
            self.full = true;
            return Err(PostError::Full);
        }
        Ok(())
    }
}
