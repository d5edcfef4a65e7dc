//! Device slots and their contexts (XHCI 1.2 §4.5, §6.2).
//!
//! The controller keeps its own copy of what it needs from each slot (state,
//! port, endpoint states and ring cursors) and writes state changes back to
//! the guest's Output Device Context, whose address it takes from the DCBAA
//! at Address Device time. Contexts are 32 bytes (HCCPARAMS1.CSZ = 0): the
//! device context is the slot context followed by 31 endpoint contexts
//! indexed by DCI; the input context has an Input Control Context in front.

use super::trb::RingCursor;

pub const CTX_SIZE: u64 = 32;
/// Device contexts (slot + 31 endpoints) in an input context after the
/// control context.
pub const NUM_DCI: usize = 31;
pub const INPUT_CTX_SIZE: usize = 32 * (NUM_DCI + 2);

// Slot states (slot context dword 3, bits 31:27).
pub const SLOT_ENABLED: u8 = 0;
pub const SLOT_DEFAULT: u8 = 1;
pub const SLOT_ADDRESSED: u8 = 2;
pub const SLOT_CONFIGURED: u8 = 3;

// Endpoint states (endpoint context dword 0, bits 2:0).
pub const EP_DISABLED: u8 = 0;
pub const EP_RUNNING: u8 = 1;
pub const EP_HALTED: u8 = 2;
pub const EP_STOPPED: u8 = 3;
pub const EP_ERROR: u8 = 4;

// Endpoint types (endpoint context dword 1, bits 5:3).
pub const EP_TYPE_ISOCH_OUT: u8 = 1;
pub const EP_TYPE_BULK_OUT: u8 = 2;
pub const EP_TYPE_INT_OUT: u8 = 3;
pub const EP_TYPE_CONTROL: u8 = 4;
pub const EP_TYPE_ISOCH_IN: u8 = 5;
pub const EP_TYPE_BULK_IN: u8 = 6;
pub const EP_TYPE_INT_IN: u8 = 7;

/// Little-endian dword `i` of a context held in `buf`.
pub fn dword(buf: &[u8], i: usize) -> u32 {
    let o = i * 4;
    match buf.get(o..o + 4) {
        Some(b) => u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        None => 0,
    }
}

pub fn set_dword(buf: &mut [u8], i: usize, v: u32) {
    let o = i * 4;
    if let Some(b) = buf.get_mut(o..o + 4) {
        b.copy_from_slice(&v.to_le_bytes());
    }
}

/// Endpoint type of an endpoint context.
pub fn ep_ctx_type(ctx: &[u8]) -> u8 {
    ((dword(ctx, 1) >> 3) & 7) as u8
}

/// TR Dequeue Pointer and DCS of an endpoint context.
pub fn ep_ctx_ring(ctx: &[u8]) -> RingCursor {
    let lo = u64::from(dword(ctx, 2));
    let hi = u64::from(dword(ctx, 3));
    let v = (hi << 32) | lo;
    RingCursor::new(v & !0xf, v & 1 != 0)
}

/// The controller's view of one endpoint.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Endpoint {
    pub state: u8,
    pub ep_type: u8,
    pub ring: RingCursor,
}

/// The controller's view of one device slot.
#[derive(Clone, Debug, Default)]
pub struct Slot {
    pub enabled: bool,
    pub state: u8,
    /// Root hub port, 1-based; 0 before Address Device.
    pub port: u8,
    pub address: u8,
    pub output_ctx: u64,
    /// Indexed by DCI - 1.
    pub eps: [Endpoint; NUM_DCI],
}

impl Slot {
    pub fn endpoint(&self, dci: u8) -> Option<&Endpoint> {
        self.eps.get(usize::from(dci).checked_sub(1)?)
    }

    pub fn endpoint_mut(&mut self, dci: u8) -> Option<&mut Endpoint> {
        self.eps.get_mut(usize::from(dci).checked_sub(1)?)
    }
}
