//! A function's capability list: the linked structures after the header.
//!
//! PCI Local Bus Specification 3.0 §6.7: each capability starts with its
//! ID byte and the offset of the next one (0 ends the list); the header's
//! capabilities pointer names the first. The list here lives in the
//! standard 256-byte space from 0x40, each entry dword-aligned, in the
//! order the function adds them, so a later MSI-X capability
//! ([`crate::msix`]) appends without disturbing the others.
//!
//! The list is a byte image. Reads return it; which bytes a guest may
//! change is the owning function's business, through [`bytes_mut`].
//!
//! [`bytes_mut`]: CapabilityList::bytes_mut

use vm_core::AccessWidth;

/// Capability IDs used here.
pub const CAP_ID_MSI: u8 = 0x05;
pub const CAP_ID_VENDOR: u8 = 0x09;
pub const CAP_ID_MSIX: u8 = 0x11;

/// Where the list starts (the first byte after the type-0 header).
pub const CAP_START: u16 = 0x40;
/// Standard capabilities must sit in the first 256 bytes.
pub const CAP_END: u16 = 0x100;

/// Why a capability could not be added.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CapabilityError {
    #[error("capability of {0} bytes does not fit below 0x100")]
    NoRoom(usize),
}

/// A capability list image covering `0x40..0x100`.
#[derive(Clone, Debug)]
pub struct CapabilityList {
    bytes: Vec<u8>,
    first: u8,
    last: Option<u16>,
    next_free: u16,
}

impl Default for CapabilityList {
    fn default() -> Self {
        Self::new()
    }
}

impl CapabilityList {
    pub fn new() -> Self {
        Self {
            bytes: vec![0; usize::from(CAP_END - CAP_START)],
            first: 0,
            last: None,
            next_free: CAP_START,
        }
    }

    /// Appends a capability with ID `id` whose bytes after the ID and next
    /// pointer are `body`. Returns its config-space offset.
    pub fn add(&mut self, id: u8, body: &[u8]) -> Result<u16, CapabilityError> {
        let len = body.len() + 2;
        let offset = self.next_free;
        let end = usize::from(offset) + len;
        if end > usize::from(CAP_END) {
            return Err(CapabilityError::NoRoom(len));
        }
        let at = usize::from(offset - CAP_START);
        self.bytes[at] = id;
        self.bytes[at + 1] = 0;
        self.bytes[at + 2..at + len].copy_from_slice(body);
        match self.last {
            None => self.first = offset as u8,
            Some(prev) => self.bytes[usize::from(prev - CAP_START) + 1] = offset as u8,
        }
        self.last = Some(offset);
        // Round up to a dword for the next one; `end` < 0x100 so this fits.
        self.next_free = ((end + 3) & !3) as u16;
        Ok(offset)
    }

    /// The value of the header's capabilities pointer.
    pub fn pointer(&self) -> u8 {
        self.first
    }

    /// A load of `width` at config offset `offset`; 0 outside the list.
    pub fn read(&self, offset: u16, width: AccessWidth) -> u32 {
        let mut value = 0u32;
        let count = width.bytes().min(4) as u16;
        for i in 0..count {
            let byte = offset
                .checked_add(i)
                .and_then(|o| o.checked_sub(CAP_START))
                .and_then(|o| self.bytes.get(usize::from(o)))
                .copied()
                .unwrap_or(0);
            value |= u32::from(byte) << (8 * i);
        }
        value
    }

    /// The bytes `[offset, offset + len)` of the image, if inside it.
    pub fn bytes_mut(&mut self, offset: u16, len: usize) -> Option<&mut [u8]> {
        let start = usize::from(offset.checked_sub(CAP_START)?);
        self.bytes.get_mut(start..start.checked_add(len)?)
    }

    /// The bytes `[offset, offset + len)` of the image, if inside it.
    pub fn bytes(&self, offset: u16, len: usize) -> Option<&[u8]> {
        let start = usize::from(offset.checked_sub(CAP_START)?);
        self.bytes.get(start..start.checked_add(len)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_linked_in_order_and_dword_aligned() {
        let mut caps = CapabilityList::new();
        assert_eq!(caps.pointer(), 0);
        let a = caps
            .add(
                CAP_ID_VENDOR,
                &[14, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13],
            )
            .unwrap();
        let b = caps.add(CAP_ID_VENDOR, &[3, 0xaa]).unwrap();
        let c = caps.add(CAP_ID_MSIX, &[0; 10]).unwrap();
        assert_eq!((a, b, c), (0x40, 0x50, 0x54));
        assert_eq!(caps.pointer(), 0x40);
        assert_eq!(caps.read(0x40, AccessWidth::Half), 0x5009);
        assert_eq!(caps.read(0x50, AccessWidth::Word), 0xaa03_5409);
        assert_eq!(
            caps.read(0x54, AccessWidth::Half),
            0x0011,
            "last ends the list"
        );
        assert_eq!(caps.read(0x3e, AccessWidth::Word), 0x5009_0000);
        assert_eq!(caps.read(0xfe, AccessWidth::Word), 0);
        assert_eq!(caps.read(0xffe, AccessWidth::Double), 0);
    }

    #[test]
    fn refuses_what_does_not_fit() {
        let mut caps = CapabilityList::new();
        assert!(caps.add(CAP_ID_VENDOR, &[0; 0xbe]).is_ok());
        assert_eq!(
            caps.add(CAP_ID_VENDOR, &[0; 1]),
            Err(CapabilityError::NoRoom(3))
        );
        assert!(caps.bytes_mut(0xff, 2).is_none());
        assert!(caps.bytes_mut(0x10, 2).is_none());
        assert_eq!(caps.bytes_mut(0xfe, 2).map(|b| b.len()), Some(2));
    }
}
