//! Transfer Request Blocks (XHCI 1.2 §6.4), completion codes (§6.4.5) and
//! a bounded reader for producer/consumer TRB rings (§4.9).

use vm_core::memory::read_exact;
use vm_core::GuestRam;

pub const TRB_SIZE: u64 = 16;

// TRB types.
pub const TRB_NORMAL: u32 = 1;
pub const TRB_SETUP_STAGE: u32 = 2;
pub const TRB_DATA_STAGE: u32 = 3;
pub const TRB_STATUS_STAGE: u32 = 4;
pub const TRB_ISOCH: u32 = 5;
pub const TRB_LINK: u32 = 6;
pub const TRB_EVENT_DATA: u32 = 7;
pub const TRB_NOOP: u32 = 8;
pub const TRB_ENABLE_SLOT: u32 = 9;
pub const TRB_DISABLE_SLOT: u32 = 10;
pub const TRB_ADDRESS_DEVICE: u32 = 11;
pub const TRB_CONFIGURE_ENDPOINT: u32 = 12;
pub const TRB_EVALUATE_CONTEXT: u32 = 13;
pub const TRB_RESET_ENDPOINT: u32 = 14;
pub const TRB_STOP_ENDPOINT: u32 = 15;
pub const TRB_SET_TR_DEQUEUE: u32 = 16;
pub const TRB_RESET_DEVICE: u32 = 17;
pub const TRB_NOOP_COMMAND: u32 = 23;
pub const TRB_TRANSFER_EVENT: u32 = 32;
pub const TRB_COMMAND_COMPLETION: u32 = 33;
pub const TRB_PORT_STATUS_CHANGE: u32 = 34;
pub const TRB_HOST_CONTROLLER_EVENT: u32 = 37;

// Control-word flags.
pub const TRB_CYCLE: u32 = 1 << 0;
/// Link TRB: toggle cycle.
pub const TRB_TC: u32 = 1 << 1;
/// Transfer event: the parameter is Event Data.
pub const TRB_ED: u32 = 1 << 2;
pub const TRB_ISP: u32 = 1 << 2;
pub const TRB_CH: u32 = 1 << 4;
pub const TRB_IOC: u32 = 1 << 5;
pub const TRB_IDT: u32 = 1 << 6;
/// Address Device: block SET_ADDRESS; Configure Endpoint: deconfigure;
/// Reset Endpoint: transfer state preserve.
pub const TRB_BSR: u32 = 1 << 9;
pub const TRB_DC: u32 = 1 << 9;
/// Data Stage TRB direction (1 = IN).
pub const TRB_DIR_IN: u32 = 1 << 16;

// Completion codes.
pub const CC_SUCCESS: u8 = 1;
pub const CC_USB_TRANSACTION_ERROR: u8 = 4;
pub const CC_TRB_ERROR: u8 = 5;
pub const CC_STALL_ERROR: u8 = 6;
pub const CC_NO_SLOTS_AVAILABLE: u8 = 9;
pub const CC_SLOT_NOT_ENABLED: u8 = 11;
pub const CC_EP_NOT_ENABLED: u8 = 12;
pub const CC_SHORT_PACKET: u8 = 13;
pub const CC_PARAMETER_ERROR: u8 = 17;
pub const CC_CONTEXT_STATE_ERROR: u8 = 19;
pub const CC_EVENT_RING_FULL: u8 = 21;
pub const CC_COMMAND_RING_STOPPED: u8 = 24;

/// One 16-byte TRB.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Trb {
    pub parameter: u64,
    pub status: u32,
    pub control: u32,
}

impl Trb {
    pub fn from_bytes(b: &[u8; 16]) -> Self {
        let mut p = [0u8; 8];
        p.copy_from_slice(&b[0..8]);
        Self {
            parameter: u64::from_le_bytes(p),
            status: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            control: u32::from_le_bytes([b[12], b[13], b[14], b[15]]),
        }
    }

    pub fn to_bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&self.parameter.to_le_bytes());
        b[8..12].copy_from_slice(&self.status.to_le_bytes());
        b[12..16].copy_from_slice(&self.control.to_le_bytes());
        b
    }

    pub fn trb_type(&self) -> u32 {
        (self.control >> 10) & 0x3f
    }

    pub fn cycle(&self) -> bool {
        self.control & TRB_CYCLE != 0
    }

    pub fn flag(&self, f: u32) -> bool {
        self.control & f != 0
    }

    /// TRB Transfer Length (17 bits).
    pub fn transfer_length(&self) -> u32 {
        self.status & 0x1_ffff
    }

    pub fn interrupter_target(&self) -> usize {
        (self.status >> 22) as usize
    }

    pub fn slot_id(&self) -> u8 {
        (self.control >> 24) as u8
    }

    /// Endpoint ID (device context index) of endpoint commands.
    pub fn endpoint_id(&self) -> u8 {
        ((self.control >> 16) & 0x1f) as u8
    }
}

/// Reads the TRB at `addr`.
pub fn read_trb(mem: &GuestRam, addr: u64) -> Option<Trb> {
    let mut b = [0u8; 16];
    read_exact(mem, addr, &mut b).ok()?;
    Some(Trb::from_bytes(&b))
}

/// Why a ring walk stopped without a TRB.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingError {
    /// The dequeue pointer is not guest RAM.
    Dma(u64),
    /// Too many Link TRBs in a row: a loop.
    LinkLoop(u64),
    /// This doorbell's TRB budget is spent.
    Budget,
}

/// Link TRBs followed in a row before the ring is declared a loop.
pub const MAX_CONSECUTIVE_LINKS: u32 = 64;

/// The consumer side of a TRB ring: dequeue pointer and cycle state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingCursor {
    pub dequeue: u64,
    pub cycle: bool,
}

impl RingCursor {
    pub fn new(dequeue: u64, cycle: bool) -> Self {
        Self {
            dequeue: dequeue & !0xf,
            cycle,
        }
    }

    /// The TRB at the dequeue pointer if the producer owns it to us,
    /// following Link TRBs (each costs one unit of `budget`). The cursor
    /// stays on the returned TRB; [`RingCursor::advance`] moves past it.
    pub fn peek(&mut self, mem: &GuestRam, budget: &mut u32) -> Result<Option<Trb>, RingError> {
        let mut links = 0;
        loop {
            if *budget == 0 {
                return Err(RingError::Budget);
            }
            let trb = read_trb(mem, self.dequeue).ok_or(RingError::Dma(self.dequeue))?;
            if trb.cycle() != self.cycle {
                return Ok(None);
            }
            if trb.trb_type() != TRB_LINK {
                return Ok(Some(trb));
            }
            *budget -= 1;
            links += 1;
            if links > MAX_CONSECUTIVE_LINKS {
                return Err(RingError::LinkLoop(self.dequeue));
            }
            if trb.flag(TRB_TC) {
                self.cycle = !self.cycle;
            }
            self.dequeue = trb.parameter & !0xf;
        }
    }

    /// Steps past the TRB at the dequeue pointer, charging one unit of
    /// `budget`.
    pub fn advance(&mut self, budget: &mut u32) {
        self.dequeue = self.dequeue.wrapping_add(TRB_SIZE);
        *budget = budget.saturating_sub(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_core::memory::{create_guest_memory, write_all};

    fn put(mem: &GuestRam, addr: u64, trb: Trb) {
        write_all(mem, addr, &trb.to_bytes()).unwrap();
    }

    #[test]
    fn link_with_toggle_flips_the_cycle_state() {
        let mem = create_guest_memory(&[(0x1000, 0x1000)]).unwrap();
        put(
            &mem,
            0x1000,
            Trb {
                parameter: 0x1800,
                status: 0,
                control: (TRB_LINK << 10) | TRB_TC | TRB_CYCLE,
            },
        );
        put(
            &mem,
            0x1800,
            Trb {
                parameter: 7,
                status: 0,
                control: TRB_NORMAL << 10,
            },
        );
        let mut c = RingCursor::new(0x1000, true);
        let mut budget = 10;
        let t = c.peek(&mem, &mut budget).unwrap().unwrap();
        assert_eq!(t.parameter, 7);
        assert_eq!(c, RingCursor::new(0x1800, false));
        c.advance(&mut budget);
        // The producer still owns the next TRB (its cycle bit is the old one).
        put(
            &mem,
            0x1810,
            Trb {
                parameter: 0,
                status: 0,
                control: (TRB_NORMAL << 10) | TRB_CYCLE,
            },
        );
        assert_eq!(c.peek(&mem, &mut budget), Ok(None));
    }

    #[test]
    fn link_loops_and_bad_pointers_stop_the_walk() {
        let mem = create_guest_memory(&[(0x1000, 0x1000)]).unwrap();
        put(
            &mem,
            0x1000,
            Trb {
                parameter: 0x1000,
                status: 0,
                control: (TRB_LINK << 10) | TRB_CYCLE,
            },
        );
        let mut c = RingCursor::new(0x1000, true);
        let mut budget = 4096;
        assert_eq!(c.peek(&mem, &mut budget), Err(RingError::LinkLoop(0x1000)));
        let mut budget = 3;
        let mut c = RingCursor::new(0x1000, true);
        assert_eq!(c.peek(&mem, &mut budget), Err(RingError::Budget));
        let mut c = RingCursor::new(0xffff_fff0, true);
        let mut budget = 3;
        assert_eq!(c.peek(&mem, &mut budget), Err(RingError::Dma(0xffff_fff0)));
    }
}
