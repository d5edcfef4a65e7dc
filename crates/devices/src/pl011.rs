//! Arm PrimeCell UART (PL011), vmapple-machine.md §13.1: the console at
//! 0x2001_0000 on SPI 1. Register behaviour follows the PL011 Technical
//! Reference Manual (Arm DDI 0183).
//!
//! Model decisions, all invisible to a correct driver:
//! - transmission is instantaneous: a byte written to UARTDR goes to the
//!   host at once, so TXFF never sets, TXFE and the TX interrupt are always
//!   asserted after a write (cleared by UARTICR), as in QEMU's model;
//! - UARTEN, TXE and RXE do not gate data (Linux's earlycon writes before
//!   anyone enables the UART); baud rate and line control are stored only;
//! - the receive FIFO holds 32 entries (one when LCR_H.FEN is clear); the
//!   RX interrupt follows the IFLS trigger level, and the receive-timeout
//!   interrupt is raised as soon as a batch of host input leaves the FIFO
//!   below that level (there is no bit time to wait for);
//! - loopback (CR.LBE) feeds transmitted bytes to the receiver; a full FIFO
//!   then overruns (OE), the only way an overrun can happen, since host
//!   input waits for room instead of being dropped;
//! - accesses of 8, 16, 32 or 64 bits to a register's address behave alike
//!   (Linux's driver uses 16-bit accessors, its earlycon 8- or 32-bit).

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use vm_core::{guest_error, AccessWidth, IrqLine, MmioDevice};

use crate::serial::SerialOutput;

pub const UARTDR: u64 = 0x000;
pub const UARTRSR: u64 = 0x004;
pub const UARTFR: u64 = 0x018;
pub const UARTILPR: u64 = 0x020;
pub const UARTIBRD: u64 = 0x024;
pub const UARTFBRD: u64 = 0x028;
pub const UARTLCR_H: u64 = 0x02c;
pub const UARTCR: u64 = 0x030;
pub const UARTIFLS: u64 = 0x034;
pub const UARTIMSC: u64 = 0x038;
pub const UARTRIS: u64 = 0x03c;
pub const UARTMIS: u64 = 0x040;
pub const UARTICR: u64 = 0x044;
pub const UARTDMACR: u64 = 0x048;
/// UARTPeriphID0..3 and UARTPCellID0..3, one byte per word.
pub const ID_BASE: u64 = 0xfe0;
const ID_BYTES: [u8; 8] = [0x11, 0x10, 0x14, 0x00, 0x0d, 0xf0, 0x05, 0xb1];

pub const FR_BUSY: u32 = 1 << 3;
pub const FR_RXFE: u32 = 1 << 4;
pub const FR_TXFF: u32 = 1 << 5;
pub const FR_RXFF: u32 = 1 << 6;
pub const FR_TXFE: u32 = 1 << 7;

pub const INT_RX: u32 = 1 << 4;
pub const INT_TX: u32 = 1 << 5;
pub const INT_RT: u32 = 1 << 6;
pub const INT_OE: u32 = 1 << 10;
const INT_ALL: u32 = 0x7ff;

/// UARTDR / UARTRSR overrun error.
const DR_OE: u16 = 1 << 11;
const RSR_OE: u32 = 1 << 3;

const LCR_H_FEN: u32 = 1 << 4;
const CR_LBE: u32 = 1 << 7;
const CR_RESET: u32 = 0x0300;
const IFLS_RESET: u32 = 0x12;

const FIFO_DEPTH: usize = 32;

#[derive(Debug)]
struct Registers {
    rx: VecDeque<u16>,
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
}

impl Default for Registers {
    fn default() -> Self {
        Self {
            rx: VecDeque::with_capacity(FIFO_DEPTH),
            rsr: 0,
            ilpr: 0,
            ibrd: 0,
            fbrd: 0,
            lcr_h: 0,
            cr: CR_RESET,
            ifls: IFLS_RESET,
            imsc: 0,
            ris: 0,
            dmacr: 0,
        }
    }
}

impl Registers {
    fn capacity(&self) -> usize {
        if self.lcr_h & LCR_H_FEN != 0 {
            FIFO_DEPTH
        } else {
            1
        }
    }

    /// Entries at or above which the RX interrupt is raised.
    fn rx_trigger(&self) -> usize {
        if self.lcr_h & LCR_H_FEN == 0 {
            return 1;
        }
        match (self.ifls >> 3) & 7 {
            0 => FIFO_DEPTH / 8,
            1 => FIFO_DEPTH / 4,
            2 => FIFO_DEPTH / 2,
            3 => FIFO_DEPTH * 3 / 4,
            _ => FIFO_DEPTH * 7 / 8,
        }
    }

    fn flags(&self) -> u32 {
        let mut fr = FR_TXFE;
        if self.rx.is_empty() {
            fr |= FR_RXFE;
        }
        if self.rx.len() >= self.capacity() {
            fr |= FR_RXFF;
        }
        fr
    }

    /// Adds a received character; false (and an overrun) if full.
    fn push(&mut self, byte: u8) -> bool {
        if self.rx.len() >= self.capacity() {
            self.rsr |= RSR_OE;
            self.ris |= INT_OE;
            if let Some(last) = self.rx.back_mut() {
                *last |= DR_OE;
            }
            return false;
        }
        self.rx.push_back(u16::from(byte));
        if self.rx.len() >= self.rx_trigger() {
            self.ris |= INT_RX;
        }
        true
    }

    /// After a batch of input: data left below the trigger level times out.
    fn end_of_input(&mut self) {
        if !self.rx.is_empty() && self.rx.len() < self.rx_trigger() {
            self.ris |= INT_RT;
        }
    }

    fn pop(&mut self) -> u16 {
        let value = self.rx.pop_front().unwrap_or(0);
        if self.rx.len() < self.rx_trigger() {
            self.ris &= !INT_RX;
        }
        if self.rx.is_empty() {
            self.ris &= !INT_RT;
        }
        value
    }
}

/// The PL011 device.
pub struct Pl011 {
    regs: Mutex<Registers>,
    /// Signalled when the RX FIFO gets room.
    room: Condvar,
    irq: Arc<dyn IrqLine>,
    output: Mutex<Box<dyn SerialOutput>>,
}

impl Pl011 {
    /// The register block the device decodes.
    pub const SIZE: u64 = 0x1000;

    pub fn new(irq: Arc<dyn IrqLine>, output: Box<dyn SerialOutput>) -> Arc<Self> {
        Arc::new(Self {
            regs: Mutex::new(Registers::default()),
            room: Condvar::new(),
            irq,
            output: Mutex::new(output),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Registers> {
        self.regs.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn update_irq(&self, regs: &Registers) {
        self.irq.set_level(regs.ris & regs.imsc != 0);
    }

    /// Offers bytes from the host; returns how many the RX FIFO took
    /// (0 when it is full: wait with [`Self::wait_for_rx_space`]).
    pub fn receive(&self, bytes: &[u8]) -> usize {
        let mut regs = self.lock();
        let room = regs.capacity().saturating_sub(regs.rx.len());
        let taken = room.min(bytes.len());
        for &b in &bytes[..taken] {
            regs.push(b);
        }
        regs.end_of_input();
        self.update_irq(&regs);
        taken
    }

    /// Waits up to `timeout` for room in the RX FIFO; true if there is.
    pub fn wait_for_rx_space(&self, timeout: Duration) -> bool {
        let regs = self.lock();
        let (regs, _) = self
            .room
            .wait_timeout_while(regs, timeout, |r| r.rx.len() >= r.capacity())
            .unwrap_or_else(|e| e.into_inner());
        regs.rx.len() < regs.capacity()
    }

    pub fn reset(&self) {
        let mut regs = self.lock();
        *regs = Registers::default();
        self.update_irq(&regs);
        self.room.notify_all();
    }

    fn transmit(&self, regs: &mut Registers, byte: u8) {
        if regs.cr & CR_LBE != 0 {
            regs.push(byte);
            regs.end_of_input();
        } else {
            self.output
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .write_bytes(&[byte]);
        }
        regs.ris |= INT_TX;
    }
}

impl MmioDevice for Pl011 {
    fn read(&self, offset: u64, _width: AccessWidth) -> u64 {
        if offset % 4 != 0 {
            guest_error!("pl011: read at unaligned offset {offset:#x}");
            return 0;
        }
        let mut regs = self.lock();
        let value = match offset {
            UARTDR => {
                let v = u32::from(regs.pop());
                self.update_irq(&regs);
                self.room.notify_all();
                v
            }
            UARTRSR => regs.rsr,
            UARTFR => regs.flags(),
            UARTILPR => regs.ilpr,
            UARTIBRD => regs.ibrd,
            UARTFBRD => regs.fbrd,
            UARTLCR_H => regs.lcr_h,
            UARTCR => regs.cr,
            UARTIFLS => regs.ifls,
            UARTIMSC => regs.imsc,
            UARTRIS => regs.ris,
            UARTMIS => regs.ris & regs.imsc,
            UARTDMACR => regs.dmacr,
            ID_BASE..=0xffc => u32::from(ID_BYTES[((offset - ID_BASE) / 4) as usize]),
            UARTICR => {
                guest_error!("pl011: read of write-only UARTICR");
                0
            }
            _ => {
                guest_error!("pl011: read of reserved offset {offset:#x}");
                0
            }
        };
        u64::from(value)
    }

    fn write(&self, offset: u64, _width: AccessWidth, value: u64) {
        if offset % 4 != 0 {
            guest_error!("pl011: write at unaligned offset {offset:#x}");
            return;
        }
        let value = value as u32;
        let mut regs = self.lock();
        match offset {
            UARTDR => self.transmit(&mut regs, value as u8),
            // Any write clears the error flags.
            UARTRSR => regs.rsr = 0,
            UARTILPR => regs.ilpr = value & 0xff,
            UARTIBRD => regs.ibrd = value & 0xffff,
            UARTFBRD => regs.fbrd = value & 0x3f,
            UARTLCR_H => {
                let fifo_was = regs.lcr_h & LCR_H_FEN;
                regs.lcr_h = value & 0xff;
                if fifo_was != regs.lcr_h & LCR_H_FEN {
                    // Switching FIFO mode flushes it (as QEMU does).
                    regs.rx.clear();
                    regs.ris &= !(INT_RX | INT_RT);
                    self.room.notify_all();
                }
            }
            UARTCR => regs.cr = value & 0xff87,
            UARTIFLS => regs.ifls = value & 0x3f,
            UARTIMSC => regs.imsc = value & INT_ALL,
            UARTICR => regs.ris &= !value,
            UARTDMACR => regs.dmacr = value & 0x7,
            UARTFR | UARTRIS | UARTMIS | ID_BASE..=0xffc => {
                guest_error!("pl011: write of {value:#x} to read-only offset {offset:#x}")
            }
            _ => guest_error!("pl011: write of {value:#x} to reserved offset {offset:#x}"),
        }
        self.update_irq(&regs);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serial::CaptureOutput;
    use vm_core::TestIrq;

    const W: AccessWidth = AccessWidth::Word;

    fn uart() -> (Arc<Pl011>, Arc<TestIrq>, CaptureOutput) {
        let irq = Arc::new(TestIrq::new());
        let capture = CaptureOutput::default();
        (
            Pl011::new(irq.clone(), Box::new(capture.clone())),
            irq,
            capture,
        )
    }

    #[test]
    fn reset_values_and_ids() {
        let (u, irq, _) = uart();
        assert_eq!(u.read(UARTFR, W), u64::from(FR_TXFE | FR_RXFE));
        assert_eq!(u.read(UARTCR, W), 0x300);
        assert_eq!(u.read(UARTIFLS, W), 0x12);
        let ids: Vec<u64> = (0..8).map(|i| u.read(ID_BASE + 4 * i, W)).collect();
        assert_eq!(ids, [0x11, 0x10, 0x14, 0x00, 0x0d, 0xf0, 0x05, 0xb1]);
        assert!(!irq.is_asserted());
    }

    #[test]
    fn transmit_reaches_the_host_byte_exact() {
        let (u, irq, out) = uart();
        for b in b"hi\n\xff" {
            u.write(UARTDR, AccessWidth::Half, u64::from(*b) | 0xa00);
        }
        assert_eq!(out.bytes(), b"hi\n\xff");
        assert_eq!(u.read(UARTRIS, W) as u32 & INT_TX, INT_TX);
        assert!(!irq.is_asserted(), "TX interrupt masked");
        u.write(UARTIMSC, W, u64::from(INT_TX));
        assert!(irq.is_asserted());
        u.write(UARTICR, W, u64::from(INT_TX));
        assert!(!irq.is_asserted());
    }

    #[test]
    fn rx_fifo_trigger_timeout_and_full() {
        let (u, irq, _) = uart();
        u.write(UARTLCR_H, W, u64::from(LCR_H_FEN));
        u.write(UARTIMSC, W, u64::from(INT_RX | INT_RT));
        // Trigger 1/2 = 16 entries: 3 bytes only time out.
        assert_eq!(u.receive(b"abc"), 3);
        assert_eq!(u.read(UARTMIS, W) as u32, INT_RT);
        assert!(irq.is_asserted());
        assert_eq!(u.receive(&[b'x'; 40]), 29, "32 entries in all");
        assert_eq!(u.read(UARTFR, W) as u32 & FR_RXFF, FR_RXFF);
        assert_eq!(u.read(UARTMIS, W) as u32 & INT_RX, INT_RX);
        assert_eq!(u.receive(b"z"), 0, "no room, nothing dropped");
        let first: Vec<u8> = (0..3).map(|_| u.read(UARTDR, W) as u8).collect();
        assert_eq!(first, b"abc");
        for _ in 0..29 {
            assert_eq!(u.read(UARTDR, W), u64::from(b'x'));
        }
        assert_eq!(u.read(UARTFR, W) as u32 & FR_RXFE, FR_RXFE);
        assert!(!irq.is_asserted(), "drained FIFO lowers RX and RT");
        assert_eq!(u.read(UARTRSR, W), 0, "no overrun from host input");
    }

    #[test]
    fn fifo_disabled_holds_one_character() {
        let (u, _, _) = uart();
        assert_eq!(u.receive(b"ab"), 1);
        assert_eq!(
            u.read(UARTRIS, W) as u32 & INT_RX,
            INT_RX,
            "trigger level is 1"
        );
        assert_eq!(u.read(UARTDR, W), u64::from(b'a'));
        assert!(u.wait_for_rx_space(Duration::from_millis(1)));
    }

    #[test]
    fn loopback_overruns_a_full_fifo() {
        let (u, irq, out) = uart();
        u.write(UARTCR, W, u64::from(CR_RESET | CR_LBE | 1));
        u.write(UARTIMSC, W, u64::from(INT_OE));
        u.write(UARTDR, W, u64::from(b'1'));
        u.write(UARTDR, W, u64::from(b'2'));
        assert!(out.bytes().is_empty(), "loopback keeps data inside");
        assert!(irq.is_asserted());
        assert_eq!(u.read(UARTRSR, W) as u32 & RSR_OE, RSR_OE);
        assert_eq!(u.read(UARTDR, W), u64::from(DR_OE | u16::from(b'1')));
        u.write(UARTRSR, W, 0);
        assert_eq!(u.read(UARTRSR, W), 0);
    }

    #[test]
    fn interrupt_mask_and_clear() {
        let (u, irq, _) = uart();
        u.receive(b"q");
        assert!(!irq.is_asserted());
        u.write(UARTIMSC, W, u64::from(INT_RX));
        assert!(irq.is_asserted());
        u.write(UARTIMSC, W, 0);
        assert!(!irq.is_asserted());
        u.reset();
        assert_eq!(u.read(UARTRIS, W), 0);
    }

    #[test]
    fn hostile_accesses_never_panic() {
        let (u, _, _) = uart();
        let mut x = 0x1234_5678_9abc_def1u64;
        for offset in 0..Pl011::SIZE {
            for width in [AccessWidth::Byte, AccessWidth::Half, W, AccessWidth::Double] {
                x = x.rotate_left(13) ^ 0x9e37_79b9;
                u.write(offset, width, x);
                u.read(offset, width);
            }
        }
        u.reset();
        assert_eq!(u.read(UARTFR, W), u64::from(FR_TXFE | FR_RXFE));
    }
}
