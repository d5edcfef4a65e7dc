//! ARM PrimeCell UART (PL011), the vmapple serial console.
//!
//! Placement (vmapple-machine.md §2, §3, §13.1): base `0x2001_0000` in a
//! 64 KiB slot of which the device decodes 4 KiB ([`Pl011::SIZE`]), level
//! interrupt on SPI 1 (INTID 33), the "arm" flavour of the cell with
//! PeriphID/CellID bytes `11 10 14 00 0D F0 05 B1` at 0xFE0–0xFFC.
//! Register behaviour follows the PrimeCell UART (PL011) Technical
//! Reference Manual (ARM DDI 0183); where the TRM leaves a choice open,
//! what a guest sees under QEMU wins, because vmapple guests have only ever
//! run there.
//!
//! # Model
//!
//! * **Transmit.** A byte written to `UARTDR` goes straight to the host
//!   [`SerialOutput`]: the transmit FIFO drains in zero time, so `FR.TXFE`
//!   is always 1 and `FR.TXFF`/`FR.BUSY` always 0. A driver that polls
//!   `TXFF` before each byte (Linux earlycon, firmware) therefore never
//!   waits, and Linux's `amba-pl011` pushes its whole buffer from
//!   `start_tx` without ever needing the transmit interrupt.
//! * **Transmit interrupt.** The TRM raises `TXRIS` when the transmit FIFO
//!   falls to its trigger level and clears it when it is refilled above the
//!   level or through `UARTICR`. A FIFO that empties instantly passes the
//!   level on every write, so here every accepted `UARTDR` write sets
//!   `TXRIS` and only `UARTICR` (or reset) clears it; the `TXIFLSEL` level
//!   is stored but cannot matter. It is 0 after reset: a driver that only
//!   unmasks `TXIM` and waits, without ever writing, gets no interrupt, as
//!   on hardware (whose transmit interrupt is edge-generated, which is why
//!   old Linux provoked it with a looped-back byte). This is exactly what
//!   QEMU does.
//! * **Receive.** Host bytes enter a 32-entry FIFO (1 entry while
//!   `LCR_H.FEN` is 0) through [`Pl011::receive`], which takes only what
//!   fits: the host side is flow-controlled, as if hardware flow control
//!   were honoured, so host input never overruns and is never lost. Each
//!   entry is 12 bits, data plus the FE/PE/BE/OE flags of `UARTDR`.
//! * **Receive interrupt.** `RXRIS` is set when a new character brings the
//!   FIFO up to the `RXIFLSEL` trigger level (1/8 … 7/8 of 32; 1 with the
//!   FIFO off) and cleared when reads take it below the level, or through
//!   `UARTICR`. QEMU instead triggers at one character; Linux enables both
//!   `RXIM` and `RTIM`, so it sees no difference.
//! * **Receive timeout.** Hardware raises `RTRIS` when characters sit in
//!   the FIFO for 32 bit periods with nothing new arriving. Host input
//!   arrives in bursts and no time passes on the wire here, so the timeout
//!   is taken to expire at once: after a host delivery or a guest read, if
//!   the FIFO still holds data that `RXRIS` does not already report (it is
//!   below the level, or the guest cleared `RXRIS` without draining),
//!   `RTRIS` is set. It is cleared when the FIFO empties or through
//!   `UARTICR`.
//! * **Overrun.** Only possible through loopback, since host input waits
//!   for room. A character arriving at a full FIFO is lost, the FIFO keeps
//!   its contents, `RSR.OE` and `OERIS` are set at once, and the next
//!   character that fits carries `DR.OE` (bit 11), as the TRM describes.
//! * **Loopback (`CR.LBE`).** Transmitted bytes go into the receive FIFO
//!   instead of to the host (as on a UART whose TXD is wired back to RXD),
//!   a break set through `LCR_H.BRK` arrives as a break character, and the
//!   modem inputs follow the outputs (CTS←RTS, DSR←DTR, DCD←Out1, RI←Out2),
//!   raising the modem-status interrupts when they change. Host input
//!   waits while loopback is on (the TRM disconnects UARTRXD).
//! * **Modem inputs.** Outside loopback, CTS, DSR, DCD and RI read 0, as
//!   under QEMU.
//! * **Enables.** `UARTEN`, `TXE` and `RXE` are stored; data still flows
//!   when they are clear (logged once as a guest error), because QEMU does
//!   the same and firmware relies on it. Word length, parity, stop bits,
//!   baud divisors, IrDA and DMA requests have no effect on the data.
//!
//! # Access widths
//!
//! Like QEMU, which declares this device as 32-bit only and lets its memory
//! core adapt other sizes: a byte or halfword access acts on the whole
//! register that holds the offset (a byte store to `UARTDR` transmits that
//! byte, a halfword store to `UARTCR` writes the register with the upper
//! half zero) and a load returns the low bits of that register whatever
//! the offset inside it (a byte load at `FR + 1` returns `FR[7:0]`, not
//! `FR[15:8]`; such accesses are logged). A 64-bit access is two 32-bit
//! accesses, low word first (a 64-bit load at 0 pops `UARTDR` and then
//! reads `UARTRSR` into bits 63:32), and is logged. Unknown offsets read 0
//! and ignore writes, with a guest error.

use std::collections::VecDeque;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;
use vm_core::sync::{lock, wait_timeout_while};

use vm_core::regs::{Narrow, RegisterFile, Wide};
use vm_core::{guest_error, AccessWidth, IrqLine, MmioDevice};

/// Register offsets from the start of the block (TRM table 3-1).
pub mod reg {
    /// Data register: read pops the receive FIFO, write transmits.
    pub const DR: u64 = 0x000;
    /// Receive status (read) / error clear (write).
    pub const RSR_ECR: u64 = 0x004;
    /// Flag register, read-only.
    pub const FR: u64 = 0x018;
    /// IrDA low-power counter.
    pub const ILPR: u64 = 0x020;
    /// Integer baud rate divisor.
    pub const IBRD: u64 = 0x024;
    /// Fractional baud rate divisor.
    pub const FBRD: u64 = 0x028;
    /// Line control.
    pub const LCR_H: u64 = 0x02C;
    /// Control.
    pub const CR: u64 = 0x030;
    /// Interrupt FIFO level select.
    pub const IFLS: u64 = 0x034;
    /// Interrupt mask set/clear (1 = enabled).
    pub const IMSC: u64 = 0x038;
    /// Raw interrupt status, read-only.
    pub const RIS: u64 = 0x03C;
    /// Masked interrupt status, read-only.
    pub const MIS: u64 = 0x040;
    /// Interrupt clear, write-only.
    pub const ICR: u64 = 0x044;
    /// DMA control.
    pub const DMACR: u64 = 0x048;
    /// `UARTPeriphID0`; PeriphID1–3 follow at 4-byte steps.
    pub const PERIPH_ID0: u64 = 0xFE0;
    /// `UARTPCellID0`; PCellID1–3 follow at 4-byte steps.
    pub const PCELL_ID0: u64 = 0xFF0;
}

/// `UARTDR` read bits: the character and its error flags.
pub mod dr {
    pub const DATA: u32 = 0xFF;
    pub const FE: u32 = 1 << 8;
    pub const PE: u32 = 1 << 9;
    pub const BE: u32 = 1 << 10;
    pub const OE: u32 = 1 << 11;
}

/// `UARTRSR` bits.
pub mod rsr {
    pub const FE: u32 = 1 << 0;
    pub const PE: u32 = 1 << 1;
    pub const BE: u32 = 1 << 2;
    pub const OE: u32 = 1 << 3;
}

/// `UARTFR` bits.
pub mod fr {
    pub const CTS: u32 = 1 << 0;
    pub const DSR: u32 = 1 << 1;
    pub const DCD: u32 = 1 << 2;
    pub const BUSY: u32 = 1 << 3;
    pub const RXFE: u32 = 1 << 4;
    pub const TXFF: u32 = 1 << 5;
    pub const RXFF: u32 = 1 << 6;
    pub const TXFE: u32 = 1 << 7;
    pub const RI: u32 = 1 << 8;
}

/// `UARTLCR_H` bits.
pub mod lcr_h {
    pub const BRK: u32 = 1 << 0;
    pub const PEN: u32 = 1 << 1;
    pub const EPS: u32 = 1 << 2;
    pub const STP2: u32 = 1 << 3;
    pub const FEN: u32 = 1 << 4;
    pub const WLEN: u32 = 3 << 5;
    pub const SPS: u32 = 1 << 7;
    /// Bits that exist.
    pub const MASK: u32 = 0xFF;
}

/// `UARTCR` bits.
pub mod cr {
    pub const UARTEN: u32 = 1 << 0;
    pub const SIREN: u32 = 1 << 1;
    pub const SIRLP: u32 = 1 << 2;
    pub const LBE: u32 = 1 << 7;
    pub const TXE: u32 = 1 << 8;
    pub const RXE: u32 = 1 << 9;
    pub const DTR: u32 = 1 << 10;
    pub const RTS: u32 = 1 << 11;
    pub const OUT1: u32 = 1 << 12;
    pub const OUT2: u32 = 1 << 13;
    pub const RTSEN: u32 = 1 << 14;
    pub const CTSEN: u32 = 1 << 15;
    /// Bits that exist (6:3 are reserved).
    pub const MASK: u32 = 0xFF87;
}

/// `UARTIFLS` fields.
pub mod ifls {
    /// Transmit trigger select, bits 2:0.
    pub const TXIFLSEL: u32 = 0x7;
    /// Receive trigger select, bits 5:3.
    pub const RXIFLSEL_SHIFT: u32 = 3;
    pub const RXIFLSEL: u32 = 0x7 << RXIFLSEL_SHIFT;
    /// Bits that exist.
    pub const MASK: u32 = 0x3F;
    /// Largest defined select value (7/8 full); 5–7 are reserved.
    pub const MAX_SELECT: u32 = 4;
}

/// Interrupt bits shared by `UARTIMSC`, `UARTRIS`, `UARTMIS` and `UARTICR`.
pub mod int {
    /// nUARTRI modem status.
    pub const RIM: u32 = 1 << 0;
    /// nUARTCTS modem status.
    pub const CTSM: u32 = 1 << 1;
    /// nUARTDCD modem status.
    pub const DCDM: u32 = 1 << 2;
    /// nUARTDSR modem status.
    pub const DSRM: u32 = 1 << 3;
    pub const RX: u32 = 1 << 4;
    pub const TX: u32 = 1 << 5;
    /// Receive timeout.
    pub const RT: u32 = 1 << 6;
    pub const FE: u32 = 1 << 7;
    pub const PE: u32 = 1 << 8;
    pub const BE: u32 = 1 << 9;
    pub const OE: u32 = 1 << 10;
    /// Every interrupt source.
    pub const ALL: u32 = 0x7FF;
}

/// `UARTDMACR` bits.
pub mod dmacr {
    pub const RXDMAE: u32 = 1 << 0;
    pub const TXDMAE: u32 = 1 << 1;
    pub const DMAONERR: u32 = 1 << 2;
    pub const MASK: u32 = 0x7;
}

/// Reset values that are not zero.
pub mod reset {
    /// Both FIFOs empty, no modem input asserted.
    pub const FR: u32 = super::fr::TXFE | super::fr::RXFE;
    /// `TXE | RXE`, UART itself disabled.
    pub const CR: u32 = 0x300;
    /// Both triggers at half full.
    pub const IFLS: u32 = 0x12;
}

/// Bytes of PeriphID0–3 and PCellID0–3 (spec §13.1): part number 0x011,
/// designer 0x41 (Arm), revision 1, then the PrimeCell signature
/// `0D F0 05 B1`. Linux infers a 16-entry FIFO from revision 1; that only
/// makes it transmit in smaller bursts, since transmission here never
/// fills a FIFO.
pub const ID_BYTES: [u8; 8] = [0x11, 0x10, 0x14, 0x00, 0x0D, 0xF0, 0x05, 0xB1];

/// Depth of the receive FIFO while `LCR_H.FEN` is set.
pub const FIFO_DEPTH: usize = 32;

const IBRD_MASK: u32 = 0xFFFF;
const FBRD_MASK: u32 = 0x3F;
const ILPR_MASK: u32 = 0xFF;

/// Where transmitted bytes go: a host backend (see [`crate::serial`]).
///
/// Called on the vCPU thread that wrote `UARTDR`, with the UART's output
/// lock held, so a sink should not block for long: a slow sink stalls the
/// guest, which is how a real line at a low baud rate behaves too.
pub trait SerialOutput: Send {
    fn write_bytes(&mut self, bytes: &[u8]);
    fn flush(&mut self) {}
}

/// Register file and receive FIFO, behind [`Pl011::regs`].
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct Regs {
    rsr: u32,
    ilpr: u32,
    ibrd: u32,
    fbrd: u32,
    lcr_h: u32,
    cr: u32,
    ifls: u32,
    imsc: u32,
    ris: u32,
    dmacr: u32,
    /// Receive FIFO entries: data in bits 7:0, `dr::FE..OE` above.
    rx: VecDeque<u16>,
    /// A character was lost to a full FIFO; the next one stored carries OE.
    overrun: bool,
    /// Whether "transmit while disabled" was already reported since the
    /// last `UARTCR` write, so a firmware that never enables the UART logs
    /// once rather than once per character.
    reported_tx_disabled: bool,
}

/// The receive FIFO entry of a break: the break flag on a NUL character
/// (the FIFO holds 8 data bits and 4 flags).
const BREAK_ENTRY: u16 = 1 << 10;
const _: () = assert!(BREAK_ENTRY as u32 == dr::BE);

impl Regs {
    fn new() -> Self {
        Self {
            rsr: 0,
            ilpr: 0,
            ibrd: 0,
            fbrd: 0,
            lcr_h: 0,
            cr: reset::CR,
            ifls: reset::IFLS,
            imsc: 0,
            ris: 0,
            dmacr: 0,
            rx: VecDeque::with_capacity(FIFO_DEPTH),
            overrun: false,
            reported_tx_disabled: false,
        }
    }

    fn fifo_enabled(&self) -> bool {
        self.lcr_h & lcr_h::FEN != 0
    }

    fn loopback(&self) -> bool {
        self.cr & cr::LBE != 0
    }

    fn depth(&self) -> usize {
        if self.fifo_enabled() {
            FIFO_DEPTH
        } else {
            1
        }
    }

    /// Receive FIFO fill at which `RXRIS` rises.
    fn rx_trigger(&self) -> usize {
        if !self.fifo_enabled() {
            return 1;
        }
        let eighths = match (self.ifls & ifls::RXIFLSEL) >> ifls::RXIFLSEL_SHIFT {
            0 => 1,
            1 => 2,
            3 => 6,
            4 => 7,
            // 2 is the reset value; reserved selects behave like it.
            _ => 4,
        };
        FIFO_DEPTH * eighths / 8
    }

    /// How many host bytes the receive path accepts now.
    fn rx_space(&self) -> usize {
        if self.loopback() {
            0
        } else {
            self.depth().saturating_sub(self.rx.len())
        }
    }

    /// Modem status inputs as `UARTFR` bits.
    fn modem_inputs(&self) -> u32 {
        if !self.loopback() {
            return 0;
        }
        let mut bits = 0;
        for (out, input) in [
            (cr::RTS, fr::CTS),
            (cr::DTR, fr::DSR),
            (cr::OUT1, fr::DCD),
            (cr::OUT2, fr::RI),
        ] {
            if self.cr & out != 0 {
                bits |= input;
            }
        }
        bits
    }

    fn fr(&self) -> u32 {
        let mut bits = fr::TXFE | self.modem_inputs();
        if self.rx.is_empty() {
            bits |= fr::RXFE;
        }
        if self.rx.len() >= self.depth() {
            bits |= fr::RXFF;
        }
        bits
    }

    fn irq_level(&self) -> bool {
        self.ris & self.imsc != 0
    }

    /// Stores one received character; false if the FIFO was full and the
    /// character was lost (an overrun).
    fn push_rx(&mut self, entry: u16) -> bool {
        if self.rx.len() >= self.depth() {
            self.overrun = true;
            self.rsr |= rsr::OE;
            self.ris |= int::OE;
            return false;
        }
        let mut entry = u32::from(entry);
        if self.overrun {
            entry |= dr::OE;
            self.overrun = false;
        }
        for (flag, interrupt) in [(dr::FE, int::FE), (dr::PE, int::PE), (dr::BE, int::BE)] {
            if entry & flag != 0 {
                self.ris |= interrupt;
            }
        }
        let trigger = self.rx_trigger();
        let before = self.rx.len();
        // Entries are 12 bits wide, so the narrowing cannot lose anything.
        self.rx.push_back((entry & 0xFFF) as u16);
        if before < trigger && self.rx.len() >= trigger {
            self.ris |= int::RX;
        }
        true
    }

    /// The receive timeout, which this model lets expire at once: data that
    /// the level interrupt does not report is reported by `RTRIS`.
    fn settle_rx_timeout(&mut self) {
        if self.rx.is_empty() {
            self.ris &= !int::RT;
        } else if self.ris & int::RX == 0 {
            self.ris |= int::RT;
        }
    }

    /// A guest read of `UARTDR`.
    fn pop_rx(&mut self) -> u32 {
        let Some(entry) = self.rx.pop_front() else {
            guest_error!("pl011: read of DR with the receive FIFO empty");
            return 0;
        };
        let entry = u32::from(entry);
        if self.rx.len() < self.rx_trigger() {
            self.ris &= !int::RX;
        }
        self.settle_rx_timeout();
        // FE/PE/BE describe the character just read; OE was raised when the
        // overrun happened and stays until the guest writes UARTECR.
        self.rsr = (self.rsr & rsr::OE) | ((entry >> 8) & (rsr::FE | rsr::PE | rsr::BE));
        entry
    }

    fn flush_rx(&mut self) {
        self.rx.clear();
        self.overrun = false;
        self.ris &= !(int::RX | int::RT);
    }

    /// Raises the modem-status interrupts for inputs that changed.
    fn note_modem_change(&mut self, before: u32) {
        let changed = before ^ self.modem_inputs();
        for (input, interrupt) in [
            (fr::RI, int::RIM),
            (fr::CTS, int::CTSM),
            (fr::DCD, int::DCDM),
            (fr::DSR, int::DSRM),
        ] {
            if changed & input != 0 {
                self.ris |= interrupt;
            }
        }
    }
}

/// A PL011's state in a snapshot.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct SavedPl011(Regs);

/// The PL011 UART. Shared between vCPU threads (MMIO) and the host input
/// thread ([`Pl011::receive`]).
pub struct Pl011 {
    regs: Mutex<Regs>,
    /// `UARTFR` as `regs` last left it, kept by [`RegsGuard`], so that
    /// polling it (what a driver does around every character) takes no
    /// lock. A read sees the state as of the last unlock: the same as if it
    /// had taken the lock just then.
    fr: AtomicU32,
    /// Signalled whenever the receive path may have gained room.
    rx_space: Condvar,
    /// Taken while `regs` is still held and released after the write, so
    /// bytes reach the host in the order the guest wrote them while host
    /// input is not held up by a slow sink.
    output: Mutex<Box<dyn SerialOutput>>,
    irq: Arc<dyn IrqLine>,
}

impl std::fmt::Debug for Pl011 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pl011")
            .field("regs", &*self.regs())
            .finish()
    }
}

/// The locked registers; on release, stores the flag register they now
/// give into [`Pl011::fr`] (with the lock still held, so stores happen in
/// the order of the changes).
struct RegsGuard<'a> {
    regs: MutexGuard<'a, Regs>,
    fr: &'a AtomicU32,
}

impl Deref for RegsGuard<'_> {
    type Target = Regs;
    fn deref(&self) -> &Regs {
        &self.regs
    }
}

impl DerefMut for RegsGuard<'_> {
    fn deref_mut(&mut self) -> &mut Regs {
        &mut self.regs
    }
}

impl Drop for RegsGuard<'_> {
    fn drop(&mut self) {
        self.fr.store(self.regs.fr(), Ordering::Release);
    }
}

/// What a register write asks the caller to do after the state update.
enum Effect {
    None,
    Transmit(u8),
}

impl Pl011 {
    /// Bytes of register space the device decodes.
    pub const SIZE: u64 = 0x1000;

    /// A UART in its reset state, interrupt line low.
    pub fn new(irq: Arc<dyn IrqLine>, output: Box<dyn SerialOutput>) -> Arc<Self> {
        irq.set_level(false);
        let regs = Regs::new();
        Arc::new(Self {
            fr: AtomicU32::new(regs.fr()),
            regs: Mutex::new(regs),
            rx_space: Condvar::new(),
            output: Mutex::new(output),
            irq,
        })
    }

    // A panic while the lock was held (a bug) must not take the console
    // down with it: the register file is always in a usable state.
    fn regs(&self) -> RegsGuard<'_> {
        RegsGuard {
            regs: lock(&self.regs),
            fr: &self.fr,
        }
    }

    fn output(&self) -> MutexGuard<'_, Box<dyn SerialOutput>> {
        lock(&self.output)
    }

    fn update_irq(&self, regs: &Regs) {
        self.irq.set_level(regs.irq_level());
    }

    /// Offers bytes from the host; returns how many the receive FIFO
    /// accepted (0 when it is full, or while the guest has loopback on).
    /// The caller keeps the rest and offers it again later, see
    /// [`Pl011::wait_for_rx_space`].
    pub fn receive(&self, bytes: &[u8]) -> usize {
        let mut regs = self.regs();
        let count = bytes.len().min(regs.rx_space());
        if count == 0 {
            return 0;
        }
        for &byte in &bytes[..count] {
            regs.push_rx(u16::from(byte));
        }
        regs.settle_rx_timeout();
        self.update_irq(&regs);
        count
    }

    /// How many bytes [`Pl011::receive`] would accept now.
    pub fn rx_space(&self) -> usize {
        self.regs().rx_space()
    }

    /// Blocks until the receive path has room or `timeout` passes; returns
    /// whether there is room. An input thread calls this in a loop, checking
    /// its own stop flag between calls, so `timeout` bounds how long it
    /// takes to notice a stop request.
    pub fn wait_for_rx_space(&self, timeout: Duration) -> bool {
        // Only reads: the bare lock, which the condition variable needs.
        let regs = lock(&self.regs);
        let (regs, _) = wait_timeout_while(&self.rx_space, regs, timeout, |r| r.rx_space() == 0);
        regs.rx_space() > 0
    }

    /// The registers and the receive FIFO, for a snapshot.
    pub fn save_state(&self) -> SavedPl011 {
        SavedPl011(self.regs().clone())
    }

    /// Puts back what [`Pl011::save_state`] returned and drives the
    /// interrupt line from it. A FIFO longer than the UART's is refused.
    pub fn restore_state(&self, saved: SavedPl011) -> Result<(), String> {
        if saved.0.rx.len() > FIFO_DEPTH {
            return Err(format!(
                "receive FIFO of {} entries (the UART has {FIFO_DEPTH})",
                saved.0.rx.len()
            ));
        }
        let mut regs = self.regs();
        *regs = saved.0;
        self.update_irq(&regs);
        self.rx_space.notify_all();
        Ok(())
    }

    /// Returns every register and the FIFO to the reset state and lowers
    /// the interrupt line. The output sink is flushed, not replaced.
    pub fn reset(&self) {
        let mut regs = self.regs();
        *regs = Regs::new();
        self.update_irq(&regs);
        self.rx_space.notify_all();
        let mut output = self.output();
        drop(regs);
        output.flush();
    }

    /// Pushes anything the output sink buffers to the host.
    pub fn flush_output(&self) {
        self.output().flush();
    }

    /// A 32-bit read of the register holding `offset`.
    fn read_word(&self, offset: u64) -> u32 {
        if offset & !3 == reg::FR {
            // The register drivers poll: no lock (see `fr`).
            return self.fr.load(Ordering::Acquire);
        }
        let mut regs = self.regs();
        match offset & !3 {
            reg::DR => {
                let value = regs.pop_rx();
                self.update_irq(&regs);
                self.rx_space.notify_all();
                value
            }
            reg::RSR_ECR => regs.rsr,
            // Answered above without the lock; the same value.
            reg::FR => regs.fr(),
            reg::ILPR => regs.ilpr,
            reg::IBRD => regs.ibrd,
            reg::FBRD => regs.fbrd,
            reg::LCR_H => regs.lcr_h,
            reg::CR => regs.cr,
            reg::IFLS => regs.ifls,
            reg::IMSC => regs.imsc,
            reg::RIS => regs.ris,
            reg::MIS => regs.ris & regs.imsc,
            reg::DMACR => regs.dmacr,
            id @ reg::PERIPH_ID0..=0xFFC => {
                u32::from(ID_BYTES[((id - reg::PERIPH_ID0) >> 2) as usize])
            }
            reg::ICR => {
                guest_error!("pl011: read of write-only ICR");
                0
            }
            other => {
                guest_error!("pl011: read of unknown register at offset {other:#x}");
                0
            }
        }
    }

    /// A 32-bit write of the register holding `offset`.
    fn write_word(&self, offset: u64, value: u32) {
        let mut regs = self.regs();
        let effect = match offset & !3 {
            reg::DR => {
                let byte = (value & dr::DATA) as u8;
                if regs.cr & (cr::UARTEN | cr::TXE) != (cr::UARTEN | cr::TXE)
                    && !regs.reported_tx_disabled
                {
                    regs.reported_tx_disabled = true;
                    guest_error!(
                        "pl011: transmit with the UART or transmitter disabled (CR={:#x}); sent anyway",
                        regs.cr
                    );
                }
                regs.ris |= int::TX;
                if regs.loopback() {
                    regs.push_rx(u16::from(byte));
                    regs.settle_rx_timeout();
                    Effect::None
                } else {
                    Effect::Transmit(byte)
                }
            }
            // Any write to UARTECR clears every error flag.
            reg::RSR_ECR => {
                regs.rsr = 0;
                Effect::None
            }
            reg::ILPR => {
                regs.ilpr = value & ILPR_MASK;
                Effect::None
            }
            reg::IBRD => {
                regs.ibrd = value & IBRD_MASK;
                Effect::None
            }
            reg::FBRD => {
                regs.fbrd = value & FBRD_MASK;
                Effect::None
            }
            reg::LCR_H => {
                let new = value & lcr_h::MASK;
                let old = regs.lcr_h;
                regs.lcr_h = new;
                // Switching the FIFOs on or off empties them (as QEMU does);
                // the depth the entries were stored under no longer holds.
                if (old ^ new) & lcr_h::FEN != 0 {
                    regs.flush_rx();
                    self.rx_space.notify_all();
                }
                if regs.loopback() && new & lcr_h::BRK != 0 && old & lcr_h::BRK == 0 {
                    // A break is a NUL character with the break flag.
                    regs.push_rx(BREAK_ENTRY);
                    regs.settle_rx_timeout();
                }
                Effect::None
            }
            reg::CR => {
                let modem_before = regs.modem_inputs();
                let was_loopback = regs.loopback();
                regs.cr = value & cr::MASK;
                regs.reported_tx_disabled = false;
                regs.note_modem_change(modem_before);
                if was_loopback && !regs.loopback() {
                    self.rx_space.notify_all();
                }
                Effect::None
            }
            reg::IFLS => {
                let new = value & ifls::MASK;
                if new & ifls::TXIFLSEL > ifls::MAX_SELECT
                    || (new & ifls::RXIFLSEL) >> ifls::RXIFLSEL_SHIFT > ifls::MAX_SELECT
                {
                    guest_error!("pl011: reserved FIFO level select in IFLS={new:#x}");
                }
                regs.ifls = new;
                Effect::None
            }
            reg::IMSC => {
                regs.imsc = value & int::ALL;
                Effect::None
            }
            reg::ICR => {
                regs.ris &= !(value & int::ALL);
                Effect::None
            }
            reg::DMACR => {
                regs.dmacr = value & dmacr::MASK;
                if value & (dmacr::RXDMAE | dmacr::TXDMAE) != 0 {
                    guest_error!(
                        "pl011: DMA enabled (DMACR={value:#x}) but no DMA controller is wired"
                    );
                }
                Effect::None
            }
            reg::FR | reg::RIS | reg::MIS | reg::PERIPH_ID0..=0xFFC => {
                guest_error!("pl011: write {value:#x} to read-only register at offset {offset:#x}");
                Effect::None
            }
            other => {
                guest_error!("pl011: write {value:#x} to unknown register at offset {other:#x}");
                Effect::None
            }
        };
        self.update_irq(&regs);
        if let Effect::Transmit(byte) = effect {
            let mut output = self.output();
            drop(regs);
            output.write_bytes(&[byte]);
        }
    }
}

/// 32-bit registers; other widths as QEMU's model takes them.
const REGISTERS: RegisterFile = RegisterFile {
    name: "pl011",
    size: Pl011::SIZE,
    narrow: Narrow::WholeRegister,
    wide: Wide::Halves,
};

impl MmioDevice for Pl011 {
    fn read(&self, offset: u64, width: AccessWidth) -> u64 {
        REGISTERS.read(offset, width, |offset| self.read_word(offset))
    }

    fn write(&self, offset: u64, width: AccessWidth, value: u64) {
        REGISTERS.write(offset, width, value, |offset, value| {
            self.write_word(offset, value)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serial::CaptureOutput;
    use vm_core::TestIrq;
    use AccessWidth::{Byte, Double, Half, Word};

    struct Rig {
        uart: Arc<Pl011>,
        irq: Arc<TestIrq>,
        out: CaptureOutput,
    }

    impl Rig {
        fn new() -> Self {
            let irq = Arc::new(TestIrq::new());
            let out = CaptureOutput::new();
            let uart = Pl011::new(irq.clone(), Box::new(out.clone()));
            Self { uart, irq, out }
        }

        /// Reset state plus FIFOs on, UART enabled: what Linux programs.
        fn enabled() -> Self {
            let rig = Self::new();
            rig.w(reg::LCR_H, lcr_h::FEN | lcr_h::WLEN);
            rig.w(reg::CR, cr::UARTEN | cr::TXE | cr::RXE);
            rig
        }

        fn r(&self, offset: u64) -> u32 {
            self.uart.read(offset, Word) as u32
        }

        fn w(&self, offset: u64, value: u32) {
            self.uart.write(offset, Word, u64::from(value));
        }

        fn ris(&self) -> u32 {
            self.r(reg::RIS)
        }

        fn fill(&self, count: usize) {
            let bytes: Vec<u8> = (0..count).map(|i| b'a' + (i % 26) as u8).collect();
            assert_eq!(self.uart.receive(&bytes), count);
        }
    }

    #[test]
    fn reset_values_and_id_bytes() {
        let rig = Rig::new();
        assert_eq!(rig.r(reg::FR), 0x90, "TXFE and RXFE, no modem input");
        assert_eq!(rig.r(reg::CR), 0x300);
        assert_eq!(rig.r(reg::IFLS), 0x12);
        for offset in [
            reg::RSR_ECR,
            reg::ILPR,
            reg::IBRD,
            reg::FBRD,
            reg::LCR_H,
            reg::IMSC,
            reg::RIS,
            reg::MIS,
            reg::DMACR,
        ] {
            assert_eq!(rig.r(offset), 0, "offset {offset:#x}");
        }
        let ids: Vec<u32> = (0..8).map(|i| rig.r(reg::PERIPH_ID0 + 4 * i)).collect();
        assert_eq!(ids, [0x11, 0x10, 0x14, 0x00, 0x0D, 0xF0, 0x05, 0xB1]);
        assert!(!rig.irq.is_asserted());
    }

    #[test]
    fn registers_keep_only_their_defined_bits() {
        let rig = Rig::new();
        for (offset, mask) in [
            (reg::ILPR, 0xFF),
            (reg::IBRD, 0xFFFF),
            (reg::FBRD, 0x3F),
            (reg::LCR_H, 0xFF),
            (reg::CR, 0xFF87),
            (reg::IFLS, 0x3F),
            (reg::IMSC, 0x7FF),
            (reg::DMACR, 0x7),
        ] {
            rig.w(offset, 0xFFFF_FFFF);
            assert_eq!(rig.r(offset), mask, "offset {offset:#x}");
        }
    }

    #[test]
    fn transmit_reaches_the_sink_byte_exact() {
        let rig = Rig::enabled();
        let message: Vec<u8> = (0..=255u8).collect();
        for &byte in &message {
            // Upper bits of the store are not data.
            rig.w(reg::DR, 0xABCD_EF00 | u32::from(byte));
            assert_eq!(rig.r(reg::FR) & (fr::TXFF | fr::BUSY), 0);
            assert_ne!(rig.r(reg::FR) & fr::TXFE, 0);
        }
        // Byte and halfword stores transmit too (Linux earlycon uses writeb,
        // the amba-pl011 driver writew).
        rig.uart.write(reg::DR, Byte, u64::from(b'!'));
        rig.uart.write(reg::DR, Half, 0x0A0D);
        let mut expected = message;
        expected.extend_from_slice(b"!\x0D");
        assert_eq!(rig.out.contents(), expected);
    }

    #[test]
    fn transmit_interrupt_follows_writes_icr_and_mask() {
        let rig = Rig::enabled();
        assert_eq!(
            rig.ris() & int::TX,
            0,
            "no transmit interrupt before any write"
        );
        rig.w(reg::IMSC, int::TX);
        assert!(!rig.irq.is_asserted());
        rig.w(reg::DR, u32::from(b'x'));
        assert_ne!(rig.ris() & int::TX, 0);
        assert_eq!(rig.r(reg::MIS), int::TX);
        assert!(rig.irq.is_asserted());
        rig.w(reg::ICR, int::TX);
        assert_eq!(rig.ris() & int::TX, 0);
        assert!(!rig.irq.is_asserted());
        rig.w(reg::DR, u32::from(b'y'));
        assert!(rig.irq.is_asserted());
        // Masking drops the line but not the raw status.
        rig.w(reg::IMSC, 0);
        assert!(!rig.irq.is_asserted());
        assert_ne!(rig.ris() & int::TX, 0);
        assert_eq!(rig.r(reg::MIS), 0);
    }

    #[test]
    fn receive_fifo_fills_to_32_then_refuses() {
        let rig = Rig::enabled();
        assert_eq!(rig.uart.receive(b"0123456789"), 10);
        assert_eq!(rig.r(reg::FR) & (fr::RXFE | fr::RXFF), 0);
        let more = [b'z'; 40];
        assert_eq!(rig.uart.receive(&more), 22, "only what fits");
        assert_ne!(rig.r(reg::FR) & fr::RXFF, 0);
        assert_eq!(rig.uart.receive(b"!"), 0);
        assert_eq!(rig.uart.rx_space(), 0);
        assert_eq!(rig.r(reg::DR), u32::from(b'0'));
        assert_eq!(rig.r(reg::FR) & fr::RXFF, 0);
        assert_eq!(rig.uart.receive(b"!!"), 1);
        let mut got = Vec::new();
        while rig.r(reg::FR) & fr::RXFE == 0 {
            got.push(rig.r(reg::DR) as u8);
        }
        assert_eq!(got.len(), 32);
        assert_eq!(&got[..9], b"123456789");
        assert_eq!(got[31], b'!');
        assert_eq!(rig.r(reg::RSR_ECR), 0, "no errors from host input");
    }

    #[test]
    fn loopback_overrun_keeps_fifo_and_flags_oe() {
        let rig = Rig::enabled();
        rig.w(reg::CR, cr::UARTEN | cr::TXE | cr::RXE | cr::LBE);
        assert_eq!(
            rig.uart.receive(b"host"),
            0,
            "host input waits during loopback"
        );
        for i in 0..32u32 {
            rig.w(reg::DR, i);
        }
        assert!(rig.out.contents().is_empty(), "looped back, not sent");
        assert_eq!(rig.r(reg::RSR_ECR), 0);
        // Two more characters arrive at a full FIFO and are lost.
        rig.w(reg::DR, 0xEE);
        rig.w(reg::DR, 0xEF);
        assert_eq!(rig.r(reg::RSR_ECR), rsr::OE, "overrun is reported at once");
        assert_ne!(rig.ris() & int::OE, 0);
        // The FIFO contents are intact.
        assert_eq!(rig.r(reg::DR), 0);
        assert_eq!(rig.r(reg::RSR_ECR), rsr::OE, "stays until ECR is written");
        // The next character that fits carries DR.OE.
        rig.w(reg::DR, 0x55);
        for i in 1..32u32 {
            assert_eq!(rig.r(reg::DR), i);
        }
        assert_eq!(rig.r(reg::DR), dr::OE | 0x55);
        assert_eq!(rig.r(reg::FR) & fr::RXFE, fr::RXFE);
        rig.w(reg::RSR_ECR, 0);
        assert_eq!(rig.r(reg::RSR_ECR), 0);
        rig.w(reg::ICR, int::OE);
        assert_eq!(rig.ris() & int::OE, 0);
    }

    #[test]
    fn loopback_break_modem_lines_and_release() {
        let rig = Rig::enabled();
        rig.w(reg::CR, cr::UARTEN | cr::LBE);
        rig.w(reg::LCR_H, lcr_h::FEN | lcr_h::BRK);
        assert_ne!(rig.ris() & int::BE, 0);
        assert_eq!(rig.r(reg::DR), dr::BE);
        assert_eq!(rig.r(reg::RSR_ECR), rsr::BE);
        rig.w(reg::ICR, int::ALL);
        rig.w(reg::CR, cr::UARTEN | cr::LBE | cr::RTS | cr::OUT2);
        assert_eq!(
            rig.r(reg::FR) & (fr::CTS | fr::RI | fr::DSR | fr::DCD),
            fr::CTS | fr::RI
        );
        assert_eq!(
            rig.ris() & (int::CTSM | int::RIM | int::DSRM | int::DCDM),
            int::CTSM | int::RIM
        );
        // Host input flows again once loopback is off, and modem inputs drop.
        rig.w(reg::CR, cr::UARTEN | cr::RXE);
        assert_eq!(rig.r(reg::FR) & (fr::CTS | fr::RI), 0);
        assert_eq!(rig.uart.receive(b"ok"), 2);
    }

    #[test]
    fn receive_interrupt_at_ifls_level_and_timeout_below_it() {
        let rig = Rig::enabled();
        // RX trigger 1/4 of 32 = 8.
        rig.w(reg::IFLS, 1 << ifls::RXIFLSEL_SHIFT);
        rig.w(reg::IMSC, int::RX);
        rig.fill(7);
        assert_eq!(
            rig.ris() & (int::RX | int::RT),
            int::RT,
            "below the level: timeout"
        );
        assert!(!rig.irq.is_asserted(), "RT is masked");
        rig.w(reg::IMSC, int::RX | int::RT);
        assert!(rig.irq.is_asserted());
        rig.fill(1);
        assert_ne!(rig.ris() & int::RX, 0, "level reached");
        rig.fill(4);
        // Reading back below the level clears RX; the data left behind is
        // reported by the timeout.
        for _ in 0..5 {
            rig.r(reg::DR);
        }
        assert_eq!(rig.ris() & (int::RX | int::RT), int::RT);
        for _ in 0..7 {
            rig.r(reg::DR);
        }
        assert_eq!(rig.ris() & (int::RX | int::RT), 0, "empty FIFO clears both");
        assert!(!rig.irq.is_asserted());
    }

    #[test]
    fn level_reached_in_one_delivery_reports_rx_only() {
        let rig = Rig::enabled(); // reset IFLS: half full = 16
        rig.fill(20);
        assert_eq!(rig.ris() & (int::RX | int::RT), int::RX);
        // Cleared through ICR with the FIFO still above the level: new data
        // is then reported by the timeout, since no level crossing happens.
        rig.w(reg::ICR, int::RX);
        assert_eq!(rig.ris() & (int::RX | int::RT), 0);
        rig.fill(1);
        assert_eq!(rig.ris() & (int::RX | int::RT), int::RT);
        rig.w(reg::ICR, int::RT);
        assert_eq!(rig.ris() & int::RT, 0);
    }

    #[test]
    fn interrupt_clear_and_mask_drive_the_line() {
        let rig = Rig::enabled();
        rig.fill(1);
        rig.w(reg::DR, u32::from(b'x'));
        assert_eq!(rig.ris() & (int::RT | int::TX), int::RT | int::TX);
        assert!(!rig.irq.is_asserted(), "all masked after reset");
        rig.w(reg::IMSC, int::RT);
        assert!(rig.irq.is_asserted());
        assert_eq!(rig.r(reg::MIS), int::RT);
        let edges = rig.irq.rising_edges();
        rig.w(reg::IMSC, int::RT | int::TX);
        assert_eq!(rig.irq.rising_edges(), edges, "still high, no new edge");
        rig.w(reg::ICR, int::RT);
        assert!(rig.irq.is_asserted(), "TX still pending");
        rig.w(reg::ICR, int::TX);
        assert!(!rig.irq.is_asserted());
        // RIS is read-only.
        rig.w(reg::RIS, int::ALL);
        assert_eq!(rig.ris() & int::TX, 0);
    }

    #[test]
    fn fifo_disabled_is_one_deep() {
        let rig = Rig::new(); // FEN = 0 after reset
        rig.w(reg::IMSC, int::RX);
        assert_eq!(rig.uart.receive(b"ab"), 1);
        assert_eq!(rig.r(reg::FR) & (fr::RXFF | fr::RXFE), fr::RXFF);
        assert_ne!(rig.ris() & int::RX, 0, "every character interrupts");
        assert!(rig.irq.is_asserted());
        assert_eq!(rig.r(reg::DR), u32::from(b'a'));
        assert!(!rig.irq.is_asserted());
        assert_eq!(rig.uart.receive(b"b"), 1);
        assert!(rig.irq.is_asserted());
        // Turning the FIFO on empties it.
        rig.w(reg::LCR_H, lcr_h::FEN);
        assert_eq!(rig.r(reg::FR) & fr::RXFE, fr::RXFE);
        assert_eq!(rig.ris() & (int::RX | int::RT), 0);
        assert_eq!(rig.uart.rx_space(), FIFO_DEPTH);
    }

    #[test]
    fn narrow_and_wide_accesses_behave_like_qemu() {
        let rig = Rig::enabled();
        // A byte load inside FR returns FR's low byte.
        assert_eq!(rig.uart.read(reg::FR + 1, Byte), 0x90);
        assert_eq!(rig.uart.read(reg::CR, Half), u64::from(rig.r(reg::CR)));
        // A halfword store writes the whole register, upper half zero.
        rig.w(reg::IBRD, 0x1234);
        rig.uart.write(reg::IBRD + 2, Half, 0x5678);
        assert_eq!(rig.r(reg::IBRD), 0x5678);
        // 64-bit: two 32-bit accesses, low word first.
        rig.uart.receive(b"Q");
        rig.w(reg::IFLS, 0);
        assert_eq!(rig.uart.read(reg::DR, Double), u64::from(b'Q'));
        rig.uart.write(reg::IBRD, Double, 0x0000_0015_0000_0007);
        assert_eq!((rig.r(reg::IBRD), rig.r(reg::FBRD)), (7, 0x15));
        assert_eq!(
            rig.uart.read(reg::IMSC, Double),
            u64::from(rig.r(reg::RIS)) << 32 | u64::from(rig.r(reg::IMSC))
        );
        // The last word of the block still reads as 64 bits, upper half 0.
        assert_eq!(rig.uart.read(0xFFC, Double), 0xB1);
        assert_eq!(rig.uart.read(0x1000, Word), 0);
        assert_eq!(rig.uart.read(u64::MAX, Double), 0);
    }

    #[test]
    fn flag_register_follows_a_restored_state() {
        let rig = Rig::enabled();
        rig.fill(FIFO_DEPTH);
        let saved = rig.uart.save_state();
        rig.uart.reset();
        assert_eq!(rig.r(reg::FR) & (fr::RXFE | fr::RXFF), fr::RXFE);
        rig.uart.restore_state(saved).unwrap();
        assert_eq!(rig.r(reg::FR) & (fr::RXFE | fr::RXFF), fr::RXFF);
        assert_eq!(rig.r(reg::DR), u32::from(b'a'));
        assert_eq!(rig.r(reg::FR) & (fr::RXFE | fr::RXFF), 0);
    }

    #[test]
    fn reset_restores_everything_and_lowers_the_line() {
        let rig = Rig::enabled();
        rig.w(reg::IMSC, int::ALL);
        rig.fill(5);
        rig.w(reg::IBRD, 26);
        assert!(rig.irq.is_asserted());
        rig.uart.reset();
        assert!(!rig.irq.is_asserted());
        assert_eq!(rig.r(reg::FR), 0x90);
        assert_eq!(
            (rig.r(reg::IBRD), rig.r(reg::IMSC), rig.r(reg::RIS)),
            (0, 0, 0)
        );
        assert_eq!(rig.r(reg::CR), 0x300);
        assert_eq!(rig.uart.rx_space(), 1, "FIFO off again");
    }

    #[test]
    fn waiting_for_space_wakes_on_a_guest_read() {
        let rig = Rig::enabled();
        rig.fill(32);
        assert!(!rig.uart.wait_for_rx_space(Duration::from_millis(20)));
        let uart = rig.uart.clone();
        let reader = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            uart.read(reg::DR, Word)
        });
        assert!(rig.uart.wait_for_rx_space(Duration::from_secs(10)));
        assert_eq!(reader.join().unwrap(), u64::from(b'a'));
    }

    /// xorshift64*, so the hostile test needs no dependency and replays.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
    }

    #[test]
    fn hostile_accesses_never_panic() {
        let rig = Rig::new();
        let widths = [Byte, Half, Word, Double];
        for offset in 0..0x1010u64 {
            for width in widths {
                rig.uart.read(offset, width);
                rig.uart.write(offset, width, u64::MAX);
                rig.uart.write(offset, width, 0);
            }
        }
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for _ in 0..200_000 {
            let choice = rng.next();
            let offset = match choice % 4 {
                0 => rng.next(),
                1 => rng.next() % 0x1010,
                _ => (rng.next() % 0x50) & !3,
            };
            let width = widths[(choice >> 8) as usize % 4];
            match (choice >> 16) % 5 {
                0 => {
                    rig.uart.read(offset, width);
                }
                1 => {
                    let bytes = rng.next().to_le_bytes();
                    rig.uart.receive(&bytes[..(choice >> 24) as usize % 9]);
                }
                _ => rig.uart.write(offset, width, rng.next()),
            }
            let fr_value = rig.r(reg::FR);
            let space = rig.uart.rx_space();
            assert!(space <= FIFO_DEPTH);
            assert_ne!(fr_value & fr::TXFE, 0);
            assert_eq!(fr_value & fr::TXFF, 0);
            assert_eq!(rig.irq.is_asserted(), rig.r(reg::MIS) != 0);
        }
    }
}
