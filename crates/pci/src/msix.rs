//! MSI-X capability, vector table and pending-bit array (PCI Local Bus
//! Specification 3.0 §6.8.2).
//!
//! QEMU's vmapple has no MSI controller, so there no function offers MSI-X
//! (vmapple-machine.md §7.5). With `--msi on` the board has one (the
//! GIC's message-based SPIs), and functions built with a sink offer MSI-X
//! through [`Msix`]: the capability in their config space, the table and
//! PBA in one of their BARs, and the messages sent to the sink.
//!
//! # Model
//!
//! * **Message control**: bits 10:0 read table size − 1; bit 14 (function
//!   mask) and bit 15 (enable) are writable; the rest read 0.
//! * **Table**: 16 bytes per vector (address low, address high, data,
//!   vector control). Only bit 0 of vector control (mask) is writable, and
//!   every vector starts masked. Loads of any width return the bytes they
//!   cover; stores must be 4 or 8 bytes, naturally aligned (§6.8.2.9),
//!   other stores are ignored and logged.
//! * **PBA**: one bit per vector, read-only to the guest; the function
//!   sets and clears bits with [`MsixState::set_pending`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vm_core::regs::{Narrow, RegisterFile, Wide};
use vm_core::sync::lock;
use vm_core::AccessWidth;

use crate::capability::{CapabilityError, CapabilityList};
use crate::msi::MsiSink;

/// Capability ID of MSI-X.
pub use crate::capability::CAP_ID_MSIX;

/// Most vectors one function may have.
pub const MAX_VECTORS: u16 = 2048;
/// Bytes per table entry.
pub const ENTRY_SIZE: u64 = 16;
/// Offsets inside an entry.
pub const ENTRY_ADDR_LO: u64 = 0x0;
pub const ENTRY_ADDR_HI: u64 = 0x4;
pub const ENTRY_DATA: u64 = 0x8;
pub const ENTRY_VECTOR_CONTROL: u64 = 0xc;
pub const VECTOR_MASKED: u32 = 1 << 0;

/// Message-control bits.
pub const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
pub const CONTROL_ENABLE: u16 = 1 << 15;
/// Offset of message control from the capability's start.
pub const CONTROL_OFFSET: u16 = 2;

/// Where a function keeps its table and PBA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsixLayout {
    pub vectors: u16,
    pub table_bar: u8,
    /// Offset of the table in its BAR (8-byte aligned).
    pub table_offset: u32,
    pub pba_bar: u8,
    /// Offset of the PBA in its BAR (8-byte aligned).
    pub pba_offset: u32,
}

impl MsixLayout {
    /// The capability bytes after the ID and next pointer: message
    /// control, table offset/BIR, PBA offset/BIR.
    pub fn capability_body(&self) -> [u8; 10] {
        let control = self.vectors.clamp(1, MAX_VECTORS) - 1;
        let table = self.table_offset & !7 | u32::from(self.table_bar & 7);
        let pba = self.pba_offset & !7 | u32::from(self.pba_bar & 7);
        let mut body = [0u8; 10];
        body[0..2].copy_from_slice(&control.to_le_bytes());
        body[2..6].copy_from_slice(&table.to_le_bytes());
        body[6..10].copy_from_slice(&pba.to_le_bytes());
        body
    }

    /// Bytes the table occupies.
    pub fn table_size(&self) -> u64 {
        u64::from(self.vectors) * ENTRY_SIZE
    }

    /// Bytes the PBA occupies (whole qwords).
    pub fn pba_size(&self) -> u64 {
        u64::from(self.vectors).div_ceil(64) * 8
    }
}

/// One table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsixEntry {
    pub address: u64,
    pub data: u32,
    pub masked: bool,
}

/// The MSI-X state of one function.
#[derive(Clone, Debug)]
pub struct MsixState {
    control: u16,
    table: Vec<[u32; 4]>,
    pba: Vec<u64>,
}

impl MsixState {
    /// State for `vectors` vectors (clamped to 1..=2048), all masked.
    pub fn new(vectors: u16) -> Self {
        let n = vectors.clamp(1, MAX_VECTORS);
        Self {
            control: n - 1,
            table: vec![[0, 0, 0, VECTOR_MASKED]; usize::from(n)],
            pba: vec![0; usize::from(n).div_ceil(64)],
        }
    }

    /// Back to power-on state: disabled, every vector masked and idle.
    pub fn reset(&mut self) {
        *self = Self::new(self.table.len() as u16);
    }

    pub fn enabled(&self) -> bool {
        self.control & CONTROL_ENABLE != 0
    }

    pub fn function_masked(&self) -> bool {
        self.control & CONTROL_FUNCTION_MASK != 0
    }

    pub fn control(&self) -> u16 {
        self.control
    }

    /// A store to the message-control word.
    pub fn write_control(&mut self, value: u16) {
        let writable = CONTROL_ENABLE | CONTROL_FUNCTION_MASK;
        self.control = self.control & !writable | value & writable;
    }

    /// The entry of `vector`, if it exists.
    pub fn entry(&self, vector: u16) -> Option<MsixEntry> {
        let e = self.table.get(usize::from(vector))?;
        Some(MsixEntry {
            address: u64::from(e[1]) << 32 | u64::from(e[0]),
            data: e[2],
            masked: e[3] & VECTOR_MASKED != 0,
        })
    }

    /// Sets or clears `vector`'s pending bit.
    pub fn set_pending(&mut self, vector: u16, pending: bool) {
        let (word, bit) = (usize::from(vector) / 64, vector % 64);
        if let Some(w) = self.pba.get_mut(word) {
            if pending {
                *w |= 1 << bit;
            } else {
                *w &= !(1 << bit);
            }
        }
    }

    pub fn pending(&self, vector: u16) -> bool {
        self.pba
            .get(usize::from(vector) / 64)
            .is_some_and(|w| w & (1 << (vector % 64)) != 0)
    }

    fn table_dword(&self, offset: u64) -> u32 {
        let index = offset / ENTRY_SIZE;
        let field = (offset % ENTRY_SIZE / 4) as usize;
        usize::try_from(index)
            .ok()
            .and_then(|i| self.table.get(i))
            .map_or(0, |e| e[field])
    }

    /// The table's 32-bit registers: any load (no read side effects), and
    /// aligned 32- and 64-bit stores.
    fn table_registers(&self) -> RegisterFile<'static> {
        RegisterFile {
            name: "msix table",
            size: self.table.len() as u64 * ENTRY_SIZE,
            narrow: Narrow::Lanes,
            wide: Wide::Split,
        }
    }

    /// A load from the table at `offset` into it; 0 past its end.
    pub fn read_table(&self, offset: u64, width: AccessWidth) -> u64 {
        self.table_registers()
            .read(offset, width, |at| self.table_dword(at))
    }

    /// A store to the table at `offset` into it.
    pub fn write_table(&mut self, offset: u64, width: AccessWidth, value: u64) {
        self.table_registers().write(offset, width, value, |at, v| {
            let index = at / ENTRY_SIZE;
            let field = (at % ENTRY_SIZE / 4) as usize;
            if let Some(entry) = usize::try_from(index)
                .ok()
                .and_then(|i| self.table.get_mut(i))
            {
                entry[field] = if field == 3 { v & VECTOR_MASKED } else { v };
            }
        })
    }

    /// A load from the PBA at `offset` into it; 0 past its end.
    pub fn read_pba(&self, offset: u64, width: AccessWidth) -> u64 {
        let mut value = 0u64;
        for i in 0..width.bytes() {
            let Some(at) = offset.checked_add(i) else {
                break;
            };
            let byte = usize::try_from(at / 8)
                .ok()
                .and_then(|w| self.pba.get(w))
                .map_or(0, |w| (w >> (8 * (at % 8))) & 0xff);
            value |= byte << (8 * i);
        }
        value
    }
}

/// An MSI-X capability placed in a function's [`CapabilityList`], its
/// table and PBA, and where its messages go.
///
/// * **Sending** ([`Msix::notify`]): while MSI-X is enabled, a vector that
///   is masked (itself or by the function mask) gets its pending bit set;
///   one that is not is written to the sink at once. Unmasking a vector
///   with its pending bit set sends it and clears the bit (§6.8.2.8).
///   Whatever address and data the guest put in the table go to the sink
///   unchecked: deciding what they reach is the MSI controller's job.
/// * **Bus mastering**: a message is a memory write, which the function may
///   only make while its command register lets it. The function calls
///   `notify` only then, and tells [`Msix::set_bus_master`] of each change,
///   so that an unmask while it is off leaves pending vectors pending
///   (they go out when it is turned on).
pub struct Msix {
    offset: u16,
    layout: MsixLayout,
    state: Mutex<MsixState>,
    sink: Arc<dyn MsiSink>,
    bus_master: AtomicBool,
}

impl Msix {
    /// Appends the capability for `layout` to `caps`; messages go to `sink`.
    pub fn add(
        caps: &mut CapabilityList,
        layout: MsixLayout,
        sink: Arc<dyn MsiSink>,
    ) -> Result<Self, CapabilityError> {
        let offset = caps.add(CAP_ID_MSIX, &layout.capability_body())?;
        Ok(Self {
            offset,
            layout,
            state: Mutex::new(MsixState::new(layout.vectors)),
            sink,
            bus_master: AtomicBool::new(false),
        })
    }

    /// Config-space offset of the capability (its ID byte).
    pub fn offset(&self) -> u16 {
        self.offset
    }

    pub fn layout(&self) -> MsixLayout {
        self.layout
    }

    pub fn enabled(&self) -> bool {
        lock(&self.state).enabled()
    }

    /// A guest store to config space at `offset`: the bytes it covers of
    /// this capability's message-control word take effect (the rest of the
    /// capability is read-only); others are left alone.
    pub fn write_config(
        &self,
        caps: &mut CapabilityList,
        offset: u16,
        width: AccessWidth,
        value: u32,
    ) {
        let control_at = self.offset + CONTROL_OFFSET;
        let mut state = lock(&self.state);
        let mut control = state.control().to_le_bytes();
        let mut touched = false;
        for i in 0..width.bytes().min(4) as u16 {
            let Some(at) = offset.checked_add(i) else {
                break;
            };
            if (control_at..control_at + 2).contains(&at) {
                control[usize::from(at - control_at)] = (value >> (8 * i)) as u8;
                touched = true;
            }
        }
        if !touched {
            return;
        }
        state.write_control(u16::from_le_bytes(control));
        let now = state.control().to_le_bytes();
        if let Some(b) = caps.bytes_mut(control_at, 2) {
            b.copy_from_slice(&now);
        }
        self.flush(&mut state);
    }

    /// Sends `vector` (or marks it pending while masked). `false` when
    /// MSI-X is disabled (the function signals INTx instead) or the vector
    /// does not exist (logged).
    pub fn notify(&self, vector: u16) -> bool {
        let mut state = lock(&self.state);
        if !state.enabled() {
            return false;
        }
        let Some(entry) = state.entry(vector) else {
            vm_core::guest_error!(
                "msix: vector {vector} beyond the table's {}",
                self.layout.vectors
            );
            return false;
        };
        if entry.masked || state.function_masked() {
            state.set_pending(vector, true);
        } else {
            self.sink.send(entry.address, entry.data);
        }
        true
    }

    /// The function's command register turned bus mastering on or off;
    /// turning it on sends what is pending and unmasked.
    pub fn set_bus_master(&self, on: bool) {
        let mut state = lock(&self.state);
        self.bus_master.store(on, Ordering::SeqCst);
        self.flush(&mut state);
    }

    /// Sends every pending vector that is no longer masked, if the
    /// function may write memory.
    fn flush(&self, state: &mut MsixState) {
        if !state.enabled() || state.function_masked() || !self.bus_master.load(Ordering::SeqCst) {
            return;
        }
        for vector in 0..self.layout.vectors {
            if !state.pending(vector) {
                continue;
            }
            if let Some(entry) = state.entry(vector).filter(|e| !e.masked) {
                state.set_pending(vector, false);
                self.sink.send(entry.address, entry.data);
            }
        }
    }

    /// A guest load from the table at `offset` into it.
    pub fn read_table(&self, offset: u64, width: AccessWidth) -> u64 {
        lock(&self.state).read_table(offset, width)
    }

    /// A guest store to the table at `offset` into it.
    pub fn write_table(&self, offset: u64, width: AccessWidth, value: u64) {
        let mut state = lock(&self.state);
        state.write_table(offset, width, value);
        self.flush(&mut state);
    }

    /// A guest load from the PBA at `offset` into it.
    pub fn read_pba(&self, offset: u64, width: AccessWidth) -> u64 {
        lock(&self.state).read_pba(offset, width)
    }

    /// Power-on state: disabled, every vector masked, nothing pending; the
    /// control word in `caps` follows.
    pub fn reset(&self, caps: &mut CapabilityList) {
        let mut state = lock(&self.state);
        state.reset();
        self.bus_master.store(false, Ordering::SeqCst);
        if let Some(b) = caps.bytes_mut(self.offset + CONTROL_OFFSET, 2) {
            b.copy_from_slice(&state.control().to_le_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capability::CapabilityList;
    use AccessWidth::*;

    #[test]
    fn capability_body_encodes_size_and_locations() {
        let layout = MsixLayout {
            vectors: 3,
            table_bar: 1,
            table_offset: 0x2000,
            pba_bar: 1,
            pba_offset: 0x3000,
        };
        let mut caps = CapabilityList::new();
        let at = caps.add(CAP_ID_MSIX, &layout.capability_body()).unwrap();
        assert_eq!(caps.read(at, Word), 0x0002_0011);
        assert_eq!(caps.read(at + 4, Word), 0x2001);
        assert_eq!(caps.read(at + 8, Word), 0x3001);
        assert_eq!(layout.table_size(), 48);
        assert_eq!(layout.pba_size(), 8);
    }

    #[test]
    fn control_keeps_only_enable_and_function_mask() {
        let mut msix = MsixState::new(3);
        assert_eq!(msix.control(), 2);
        msix.write_control(0xffff);
        assert_eq!(msix.control(), 0xc002);
        assert!(msix.enabled() && msix.function_masked());
        msix.reset();
        assert_eq!(msix.control(), 2);
    }

    #[test]
    fn table_entries_start_masked_and_store_dwords_and_qwords() {
        let mut msix = MsixState::new(2);
        assert_eq!(msix.read_table(0x0c, Word), 1);
        assert!(msix.entry(1).unwrap().masked);
        msix.write_table(0x10, Double, 0x0000_0001_0804_0000);
        msix.write_table(0x18, Word, 0x41);
        msix.write_table(0x1c, Word, 0xffff_fffe);
        assert_eq!(
            msix.entry(1),
            Some(MsixEntry {
                address: 0x1_0804_0000,
                data: 0x41,
                masked: false
            })
        );
        assert_eq!(msix.read_table(0x12, Half), 0x0804);
        msix.write_table(0x10, Byte, 0xff);
        msix.write_table(0x14, Double, 0);
        assert_eq!(msix.read_table(0x10, Double), 0x0000_0001_0804_0000);
        msix.write_table(0x20, Word, 5);
        msix.write_table(u64::MAX - 3, Word, 5);
        assert_eq!(msix.read_table(0x20, Double), 0);
        assert_eq!(msix.read_table(u64::MAX, Double), 0);
        assert_eq!(msix.entry(2), None);
    }

    #[test]
    fn pending_bits_show_in_the_pba() {
        let mut msix = MsixState::new(70);
        msix.set_pending(1, true);
        msix.set_pending(65, true);
        msix.set_pending(2000, true);
        assert_eq!(msix.read_pba(0, Double), 2);
        assert_eq!(msix.read_pba(8, Byte), 2);
        assert!(msix.pending(65) && !msix.pending(64) && !msix.pending(2000));
        msix.set_pending(1, false);
        assert_eq!(msix.read_pba(0, Word), 0);
        assert_eq!(msix.read_pba(16, Word), 0);
    }

    #[derive(Default)]
    struct Recorder(Mutex<Vec<(u64, u32)>>);

    impl MsiSink for Recorder {
        fn send(&self, address: u64, data: u32) {
            self.0.lock().unwrap().push((address, data));
        }
    }

    fn placed(vectors: u16) -> (CapabilityList, Msix, Arc<Recorder>) {
        let layout = MsixLayout {
            vectors,
            table_bar: 0,
            table_offset: 0x1000,
            pba_bar: 0,
            pba_offset: 0x1800,
        };
        let mut caps = CapabilityList::new();
        let sink = Arc::new(Recorder::default());
        let msix = Msix::add(&mut caps, layout, sink.clone()).unwrap();
        msix.set_bus_master(true);
        (caps, msix, sink)
    }

    fn program(msix: &Msix, vector: u64, address: u64, data: u32) {
        msix.write_table(vector * ENTRY_SIZE, Double, address);
        msix.write_table(vector * ENTRY_SIZE + ENTRY_DATA, Word, u64::from(data));
        msix.write_table(vector * ENTRY_SIZE + ENTRY_VECTOR_CONTROL, Word, 0);
    }

    #[test]
    fn a_disabled_function_sends_nothing() {
        let (_caps, msix, sink) = placed(2);
        program(&msix, 0, 0x1000_0040, 0xa0);
        assert!(!msix.notify(0), "INTx instead");
        assert!(sink.0.lock().unwrap().is_empty());
    }

    #[test]
    fn enabling_through_config_space_sends_programmed_vectors() {
        let (mut caps, msix, sink) = placed(2);
        let at = msix.offset();
        msix.write_config(&mut caps, at, Word, 0x8000_0000);
        assert!(msix.enabled());
        assert_eq!(caps.read(at, Word) >> 16, 0x8001, "enable | size - 1");
        program(&msix, 1, 0x1fff_0040, 0xa1);
        assert!(msix.notify(1));
        assert_eq!(*sink.0.lock().unwrap(), vec![(0x1fff_0040, 0xa1)]);
        assert!(!msix.notify(2), "no such vector");
        // A store that misses the control word changes nothing.
        msix.write_config(&mut caps, at + 4, Word, 0);
        assert!(msix.enabled());
    }

    #[test]
    fn masked_vectors_pend_and_go_out_when_unmasked() {
        let (mut caps, msix, sink) = placed(2);
        let at = msix.offset();
        msix.write_config(&mut caps, at + 2, Half, u32::from(CONTROL_ENABLE));
        // Vector 0 stays masked (its reset state).
        msix.write_table(0, Double, 0x1000_0040);
        msix.write_table(ENTRY_DATA, Word, 0xa0);
        assert!(msix.notify(0));
        assert!(sink.0.lock().unwrap().is_empty());
        assert_eq!(msix.read_pba(0, Word), 1);
        msix.write_table(ENTRY_VECTOR_CONTROL, Word, 0);
        assert_eq!(*sink.0.lock().unwrap(), vec![(0x1000_0040, 0xa0)]);
        assert_eq!(msix.read_pba(0, Word), 0);
        // The function mask holds every vector back until it is cleared.
        msix.write_config(
            &mut caps,
            at + 2,
            Half,
            u32::from(CONTROL_ENABLE | CONTROL_FUNCTION_MASK),
        );
        assert!(msix.notify(0));
        assert_eq!(sink.0.lock().unwrap().len(), 1);
        msix.write_config(&mut caps, at + 3, Byte, u32::from(CONTROL_ENABLE >> 8));
        assert_eq!(sink.0.lock().unwrap().len(), 2);
        msix.reset(&mut caps);
        assert!(!msix.enabled());
        assert_eq!(caps.read(at + 2, Half), 1, "size - 1 only");
    }

    #[test]
    fn an_unmask_without_bus_mastering_keeps_the_vector_pending() {
        let (mut caps, msix, sink) = placed(2);
        let at = msix.offset();
        msix.write_config(&mut caps, at + 2, Half, u32::from(CONTROL_ENABLE));
        msix.write_table(0, Double, 0x1000_0040);
        msix.write_table(ENTRY_DATA, Word, 0xa0);
        assert!(msix.notify(0), "pends: vector 0 is masked");
        // The driver turns bus mastering off, then unmasks: no memory
        // write may leave the function, so the vector stays pending.
        msix.set_bus_master(false);
        msix.write_table(ENTRY_VECTOR_CONTROL, Word, 0);
        assert!(
            sink.0.lock().unwrap().is_empty(),
            "sent without bus mastering"
        );
        assert_eq!(msix.read_pba(0, Word), 1);
        // Clearing the function mask does not send it either.
        msix.write_config(&mut caps, at + 2, Half, u32::from(CONTROL_ENABLE));
        assert!(sink.0.lock().unwrap().is_empty());
        // Bus mastering back on: the pending message goes out, once.
        msix.set_bus_master(true);
        assert_eq!(*sink.0.lock().unwrap(), vec![(0x1000_0040, 0xa0)]);
        assert_eq!(msix.read_pba(0, Word), 0);
        msix.set_bus_master(true);
        assert_eq!(sink.0.lock().unwrap().len(), 1);
    }
}
