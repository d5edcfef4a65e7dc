//! MSI capability (PCI Local Bus Specification 3.0 §6.8.1) and the trait
//! through which a function's messages leave it.
//!
//! vmapple itself offers no MSI (no ITS, no GICv2m frame;
//! vmapple-machine.md §7.5), so no function on its bus uses this. It exists
//! for functions that cannot work without MSI (`apple-gfx-pci`) so that
//! they can be modelled and tested, and so that a machine with an MSI
//! controller only has to supply an [`MsiSink`].
//!
//! # Model
//!
//! The capability's registers live in the function's [`CapabilityList`]
//! image (the list owns the ID and next-pointer bytes); [`Msi`] knows where
//! they are and which bits a guest may change. Offsets from the
//! capability's start:
//!
//! | offset | register | writable |
//! |---|---|---|
//! | 2 | Message Control (16 bits) | bit 0 MSI Enable, bits 6:4 Multiple Message Enable |
//! | 4 | Message Address | bits 31:2 (bits 1:0 read 0: the address is dword-aligned) |
//! | 8 | Message Upper Address (64-bit form only) | all |
//! | 8 or 12 | Message Data (16 bits) | all |
//!
//! Message Control bits 3:1 (Multiple Message Capable) and bit 7 (64-bit
//! address capable) are fixed by the function; bit 8 (per-vector masking)
//! reads 0 because masking is not modelled. A Multiple Message Enable
//! larger than the capable value is clamped to it, as QEMU does, so the
//! guest can never believe it was granted more vectors than exist. Any
//! access width is accepted and acts on the bytes it covers.
//!
//! A message is a memory write by the function, so besides MSI Enable it
//! needs Bus Master Enable in the command register; that check belongs to
//! the function, which sees the command register through
//! [`PciDevice::command_written`](crate::PciDevice::command_written).

use vm_core::AccessWidth;

use crate::capability::{CapabilityError, CapabilityList};

pub use crate::capability::CAP_ID_MSI;

/// Message Control bits.
pub const CONTROL_ENABLE: u16 = 1 << 0;
pub const CONTROL_MMC_SHIFT: u16 = 1;
pub const CONTROL_MME_SHIFT: u16 = 4;
pub const CONTROL_MME_MASK: u16 = 0b111 << CONTROL_MME_SHIFT;
pub const CONTROL_64BIT: u16 = 1 << 7;

/// Offsets from the capability's start.
pub const CONTROL_OFFSET: u16 = 2;
pub const ADDRESS_OFFSET: u16 = 4;
pub const UPPER_ADDRESS_OFFSET: u16 = 8;

/// Most vectors MSI can give one function.
pub const MAX_VECTORS: u8 = 32;

/// Where a function's MSI writes go: the platform's MSI controller.
///
/// Called from whatever thread raises the interrupt, so an implementation
/// must be thread-safe and must not block on the caller's device.
pub trait MsiSink: Send + Sync {
    /// Performs the 32-bit memory write `data` to `address` that signals an
    /// MSI.
    fn send(&self, address: u64, data: u32);
}

/// The fixed properties of an MSI capability.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiConfig {
    /// Vectors the function can use; rounded up to a power of two and
    /// clamped to 1..=32.
    pub vectors: u8,
    /// The capability has a Message Upper Address register.
    pub address_64: bool,
}

impl MsiConfig {
    /// log2 of the vector count: the Multiple Message Capable field.
    fn log2_vectors(&self) -> u16 {
        let n = self.vectors.clamp(1, MAX_VECTORS).next_power_of_two();
        n.trailing_zeros() as u16
    }

    /// Message Control bits the guest cannot change.
    fn fixed_control(&self) -> u16 {
        let mut control = self.log2_vectors() << CONTROL_MMC_SHIFT;
        if self.address_64 {
            control |= CONTROL_64BIT;
        }
        control
    }

    /// Bytes of the capability, ID and next pointer included.
    pub fn len(&self) -> u16 {
        if self.address_64 {
            14
        } else {
            10
        }
    }

    /// Never true; every MSI capability has registers.
    pub fn is_empty(&self) -> bool {
        false
    }

    fn data_offset(&self) -> u16 {
        if self.address_64 {
            12
        } else {
            8
        }
    }
}

/// One message: a 32-bit write of `data` to `address`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

/// An MSI capability placed in a [`CapabilityList`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Msi {
    offset: u16,
    config: MsiConfig,
}

impl Msi {
    /// Appends an MSI capability to `caps`, disabled and with address and
    /// data 0.
    pub fn add(caps: &mut CapabilityList, config: MsiConfig) -> Result<Self, CapabilityError> {
        let mut body = vec![0u8; usize::from(config.len() - 2)];
        body[..2].copy_from_slice(&config.fixed_control().to_le_bytes());
        let offset = caps.add(CAP_ID_MSI, &body)?;
        Ok(Self { offset, config })
    }

    /// Config-space offset of the capability (its ID byte).
    pub fn offset(&self) -> u16 {
        self.offset
    }

    pub fn config(&self) -> MsiConfig {
        self.config
    }

    /// Writable bits of the byte at `rel` from the capability's start.
    fn writable(&self, rel: u16) -> u8 {
        let data = self.config.data_offset();
        match rel {
            // Enable and Multiple Message Enable.
            2 => (CONTROL_ENABLE | CONTROL_MME_MASK) as u8,
            4 => 0xfc,
            5..=7 => 0xff,
            8..=11 if self.config.address_64 => 0xff,
            r if r == data || r == data + 1 => 0xff,
            _ => 0,
        }
    }

    fn read_u16(&self, caps: &CapabilityList, rel: u16) -> u16 {
        caps.bytes(self.offset + rel, 2)
            .map_or(0, |b| u16::from_le_bytes([b[0], b[1]]))
    }

    fn read_u32(&self, caps: &CapabilityList, rel: u16) -> u32 {
        caps.bytes(self.offset + rel, 4)
            .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn set_control(&self, caps: &mut CapabilityList, control: u16) {
        if let Some(b) = caps.bytes_mut(self.offset + CONTROL_OFFSET, 2) {
            b.copy_from_slice(&control.to_le_bytes());
        }
    }

    /// A guest store of `width` at config offset `offset`. Only the bits of
    /// this capability that the table in the module docs calls writable
    /// change; bytes outside the capability are left alone.
    pub fn write(&self, caps: &mut CapabilityList, offset: u16, width: AccessWidth, value: u32) {
        let end = self.offset + self.config.len();
        for i in 0..width.bytes().min(4) as u16 {
            let Some(at) = offset.checked_add(i) else {
                break;
            };
            if at < self.offset || at >= end {
                continue;
            }
            let mask = self.writable(at - self.offset);
            if let Some(b) = caps.bytes_mut(at, 1) {
                b[0] = b[0] & !mask | (value >> (8 * i)) as u8 & mask;
            }
        }
        let control = self.control(caps);
        let log2_max = self.config.log2_vectors();
        if (control & CONTROL_MME_MASK) >> CONTROL_MME_SHIFT > log2_max {
            let clamped = control & !CONTROL_MME_MASK | log2_max << CONTROL_MME_SHIFT;
            self.set_control(caps, clamped);
        }
    }

    /// Whether the guest has set MSI Enable.
    pub fn enabled(&self, caps: &CapabilityList) -> bool {
        self.control(caps) & CONTROL_ENABLE != 0
    }

    pub fn control(&self, caps: &CapabilityList) -> u16 {
        self.read_u16(caps, CONTROL_OFFSET)
    }

    /// Vectors the guest granted (Multiple Message Enable).
    pub fn vectors_enabled(&self, caps: &CapabilityList) -> u32 {
        1 << ((self.control(caps) & CONTROL_MME_MASK) >> CONTROL_MME_SHIFT)
    }

    /// The programmed message address.
    pub fn address(&self, caps: &CapabilityList) -> u64 {
        let lo = u64::from(self.read_u32(caps, ADDRESS_OFFSET));
        let hi = if self.config.address_64 {
            u64::from(self.read_u32(caps, UPPER_ADDRESS_OFFSET))
        } else {
            0
        };
        hi << 32 | lo
    }

    /// The programmed message data.
    pub fn data(&self, caps: &CapabilityList) -> u16 {
        self.read_u16(caps, self.config.data_offset())
    }

    /// The message that signals `vector`, or `None` when MSI is disabled
    /// or the guest did not grant that many vectors. With several vectors
    /// granted the function puts the vector number in the low bits of the
    /// data (§6.8.1.6).
    pub fn message(&self, caps: &CapabilityList, vector: u32) -> Option<MsiMessage> {
        if !self.enabled(caps) {
            return None;
        }
        let granted = self.vectors_enabled(caps);
        if vector >= granted {
            return None;
        }
        let data = u32::from(self.data(caps)) & !(granted - 1) | vector;
        Some(MsiMessage {
            address: self.address(caps),
            data,
        })
    }

    /// Power-on state: disabled, one vector granted, address and data 0.
    pub fn reset(&self, caps: &mut CapabilityList) {
        let len = usize::from(self.config.len() - CONTROL_OFFSET);
        if let Some(b) = caps.bytes_mut(self.offset + CONTROL_OFFSET, len) {
            b.fill(0);
        }
        self.set_control(caps, self.config.fixed_control());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capability::CAP_ID_VENDOR;
    use AccessWidth::*;

    const ONE_64: MsiConfig = MsiConfig {
        vectors: 1,
        address_64: true,
    };

    fn placed(config: MsiConfig) -> (CapabilityList, Msi) {
        let mut caps = CapabilityList::new();
        let msi = Msi::add(&mut caps, config).unwrap();
        (caps, msi)
    }

    #[test]
    fn layout_of_the_64_and_32_bit_forms() {
        let (mut caps, msi) = placed(ONE_64);
        assert_eq!(msi.offset(), 0x40);
        assert_eq!(caps.pointer(), 0x40);
        assert_eq!(caps.read(0x40, Word), 0x0080_0005, "ID 5, last, 64-bit");
        let next = caps.add(CAP_ID_VENDOR, &[3, 0]).unwrap();
        assert_eq!(next, 0x50, "14 bytes, rounded up to a dword");
        assert_eq!(caps.read(0x41, Byte), 0x50);

        let (mut caps, msi) = placed(MsiConfig {
            vectors: 3,
            address_64: false,
        });
        assert_eq!(caps.read(0x40, Word), 0x0004_0005, "4 vectors capable");
        assert_eq!(msi.vectors_enabled(&caps), 1);
        assert_eq!(caps.add(CAP_ID_VENDOR, &[3, 0]).unwrap(), 0x4c);
        let mmc = |vectors| (MsiConfig { vectors, ..ONE_64 }.fixed_control() >> 1) & 7;
        assert_eq!((mmc(200), mmc(0), mmc(32), mmc(5)), (5, 0, 5, 3));
    }

    #[test]
    fn only_writable_bits_change() {
        let (mut caps, msi) = placed(ONE_64);
        for reg in (0x40..0x50).step_by(4) {
            msi.write(&mut caps, reg, Word, 0xffff_ffff);
        }
        assert_eq!(caps.read(0x40, Word), 0x0081_0005, "enable; MME clamped");
        assert_eq!(caps.read(0x44, Word), 0xffff_fffc);
        assert_eq!(caps.read(0x48, Word), 0xffff_ffff);
        assert_eq!(caps.read(0x4c, Word), 0x0000_ffff, "16-bit data");
        assert_eq!(msi.address(&caps), 0xffff_ffff_ffff_fffc);
        assert_eq!(msi.data(&caps), 0xffff);
        msi.write(&mut caps, 0x40, Word, 0);
        assert_eq!(
            caps.read(0x40, Word),
            0x0080_0005,
            "ID and capable bits stay"
        );
    }

    #[test]
    fn multiple_message_enable_is_clamped_to_capable() {
        let (mut caps, msi) = placed(MsiConfig {
            vectors: 4,
            address_64: false,
        });
        msi.write(&mut caps, 0x42, Half, 0x0071);
        assert_eq!(msi.control(&caps), 0x0025);
        assert_eq!(msi.vectors_enabled(&caps), 4);
        msi.write(&mut caps, 0x42, Half, 0x0011);
        assert_eq!(msi.vectors_enabled(&caps), 2);
    }

    #[test]
    fn messages_need_enable_and_a_granted_vector() {
        let (mut caps, msi) = placed(ONE_64);
        msi.write(&mut caps, 0x44, Word, 0xfee0_1004);
        msi.write(&mut caps, 0x48, Word, 0x1);
        msi.write(&mut caps, 0x4c, Half, 0x4321);
        assert_eq!(msi.message(&caps, 0), None, "disabled");
        msi.write(&mut caps, 0x42, Byte, 1);
        let want = MsiMessage {
            address: 0x1_fee0_1004,
            data: 0x4321,
        };
        assert_eq!(msi.message(&caps, 0), Some(want));
        assert_eq!(msi.message(&caps, 1), None, "only one vector");
        assert_eq!(msi.message(&caps, u32::MAX), None);

        let (mut caps, msi) = placed(MsiConfig {
            vectors: 8,
            address_64: false,
        });
        msi.write(&mut caps, 0x44, Word, 0x0804_0000);
        msi.write(&mut caps, 0x48, Half, 0x00a7);
        msi.write(&mut caps, 0x42, Half, 0x0021);
        let m = msi.message(&caps, 2).unwrap();
        assert_eq!(
            (m.address, m.data),
            (0x0804_0000, 0x00a6),
            "low bits = vector"
        );
        assert_eq!(msi.message(&caps, 4), None);
        // The 32-bit form has no upper address: offset 8 is the data.
        assert_eq!(msi.address(&caps) >> 32, 0);
    }

    #[test]
    fn narrow_and_straddling_stores_act_on_the_bytes_they_cover() {
        let (mut caps, msi) = placed(ONE_64);
        msi.write(&mut caps, 0x45, Byte, 0xab);
        msi.write(&mut caps, 0x46, Half, 0x1234);
        assert_eq!(msi.address(&caps), 0x1234_ab00);
        // A dword starting inside the capability and running past its end.
        msi.write(&mut caps, 0x4c, Word, 0xdead_beef);
        assert_eq!(caps.read(0x4e, Half), 0, "past the end: untouched");
        msi.write(&mut caps, 0x41, Word, 0x0000_01ff);
        assert!(msi.enabled(&caps), "the covered control byte changed");
        assert_eq!(caps.read(0x40, Half), 0x0005, "the next pointer did not");
        for offset in [0u16, 0x3f, 0x50, 0xff, 0xfff, u16::MAX - 1, u16::MAX] {
            for width in [Byte, Half, Word, Double] {
                msi.write(&mut caps, offset, width, u32::MAX);
            }
        }
        assert_eq!(caps.read(0x40, Half), 0x0005);
    }

    #[test]
    fn reset_returns_to_power_on() {
        let (mut caps, msi) = placed(ONE_64);
        for reg in (0x40..0x50).step_by(4) {
            msi.write(&mut caps, reg, Word, 0xffff_ffff);
        }
        msi.reset(&mut caps);
        assert_eq!(caps.read(0x40, Word), 0x0080_0005);
        for reg in [0x44, 0x48, 0x4c] {
            assert_eq!(caps.read(reg, Word), 0);
        }
        assert!(!msi.enabled(&caps));
    }
}
