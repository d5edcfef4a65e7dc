//! ARM PrimeCell GPIO controller (PL061), the vmapple GPIO block.
//!
//! Placement (vmapple-machine.md §2, §3, §13.3): base `0x2006_0000`, 4 KiB
//! of registers ([`Pl061::SIZE`]), one combined level interrupt on SPI 5
//! (INTID 37), eight lines, PeriphID/CellID bytes
//! `00 00 00 00 61 10 04 00 0D F0 05 B1` at 0xFD0–0xFFC (the first four are
//! the reserved "PeriphID4–7" words). Line 3 is the power key
//! ([`crate::power_button`]). Registers follow the PrimeCell GPIO (PL061)
//! Technical Reference Manual (ARM DDI 0190); where QEMU, on which vmapple
//! guests have been run, differs, what the guest sees under QEMU wins and
//! the difference is noted.
//!
//! # Model
//!
//! * **Pins.** A line whose `GPIODIR` bit is 1 is an output: its pin
//!   carries the bit the guest wrote to `GPIODATA`. A line whose bit is 0
//!   is an input: its pin carries what an external driver last set through
//!   [`Pl061::set_input`], and 0 if nothing ever drove it, because the
//!   vmapple board pulls every line down (`pulldowns = 0xFF`,
//!   `pullups = 0x00`, §13.3). The level an external driver set is kept
//!   while the line is an output and shows again when it turns back into
//!   an input. (QEMU forgets a level that arrives while the line is an
//!   output; a guest can tell only by flipping the direction of a line that
//!   something drives, which no vmapple device does.)
//! * **GPIODATA.** The offset is the mask: bits \[9:2\] of the offset
//!   select the lines an access touches. A read returns the pins of the
//!   selected lines and 0 for the others; a write changes only the
//!   selected lines that are outputs. Bits written for inputs are dropped,
//!   as in QEMU.
//! * **Edge detection** (`GPIOIS` bit 0) applies to input lines: a change
//!   of the pin sets the `GPIORIS` bit if `GPIOIBE` selects both edges, or
//!   if the new level equals the `GPIOIEV` bit (1 = rising, 0 = falling).
//!   Raw edge bits stay set until `GPIOIC` clears them.
//! * **Level detection** (`GPIOIS` bit 1): whenever the device state
//!   changes, a line whose pin equals its `GPIOIEV` bit (1 = high,
//!   0 = low) sets its `GPIORIS` bit. Clearing it through `GPIOIC` while
//!   the level persists sets it again at once, so the bit reads as the
//!   level for as long as it lasts; once the level goes away the bit stays
//!   set until cleared. That is QEMU's behaviour (the TRM has the bit
//!   follow the level); Linux acks level interrupts after the source went
//!   away, so both look the same to it.
//! * **Interrupt output** is `GPIORIS & GPIOIE != 0`; `GPIOMIS` reads
//!   `GPIORIS & GPIOIE`.
//! * **GPIOAFSEL** is stored; there is no hardware-control mode to hand
//!   lines to, so it changes nothing else.
//! * **Reset** ([`Pl061::reset`]) zeroes every register and also forgets
//!   the levels external drivers set, as QEMU's PL061 reset does; a driver
//!   that still holds a line high is seen again the next time it calls
//!   `set_input`. This makes QEMU's gpio-key quirk (Q10, see
//!   [`crate::power_button`]) invisible to a rebooted guest, as under QEMU.
//!
//! # Access widths
//!
//! Registers are 32 bits at 4-byte aligned offsets, of which bits 7:0 are
//! used. In the `GPIODATA` window any offset works (only bits \[9:2\] are
//! decoded). Elsewhere a byte or halfword access at a register's offset
//! acts on the whole register, and an access at an offset inside a
//! register is logged, reads 0 and is ignored, as in QEMU. A 64-bit access
//! is two 32-bit accesses, low word first, and is logged. Reserved
//! offsets, the Luminary-only registers at 0x500–0x528 and writes to
//! read-only registers are logged and ignored.

use std::sync::{Arc, Mutex, MutexGuard};
use vm_core::sync::lock;

use vm_core::regs::{Narrow, RegisterFile, Wide};
use vm_core::{guest_error, AccessWidth, IrqLine, MmioDevice};

/// Register offsets from the start of the block (TRM table 3-1).
pub mod reg {
    /// Start of the 256-word `GPIODATA` window; offset bits \[9:2\] are the
    /// line mask.
    pub const DATA: u64 = 0x000;
    /// Last offset of the `GPIODATA` window.
    pub const DATA_END: u64 = 0x3FF;
    /// Direction, 1 = output.
    pub const DIR: u64 = 0x400;
    /// Interrupt sense, 1 = level.
    pub const IS: u64 = 0x404;
    /// Interrupt on both edges.
    pub const IBE: u64 = 0x408;
    /// Interrupt event: 1 = rising edge / high level.
    pub const IEV: u64 = 0x40C;
    /// Interrupt mask (1 = enabled).
    pub const IE: u64 = 0x410;
    /// Raw interrupt status, read-only.
    pub const RIS: u64 = 0x414;
    /// Masked interrupt status, read-only.
    pub const MIS: u64 = 0x418;
    /// Interrupt clear, write-only.
    pub const IC: u64 = 0x41C;
    /// Mode control select (hardware control).
    pub const AFSEL: u64 = 0x420;
    /// First ID register (`GPIOPeriphID4`, reserved, reads 0).
    pub const ID_FIRST: u64 = 0xFD0;
    /// `GPIOPeriphID0`.
    pub const PERIPH_ID0: u64 = 0xFE0;
    /// `GPIOPCellID0`.
    pub const PCELL_ID0: u64 = 0xFF0;
    /// Last ID register.
    pub const PCELL_ID3: u64 = 0xFFC;
}

/// Number of GPIO lines.
pub const LINES: u8 = 8;

/// Lines the vmapple board pulls up when nothing drives them (§13.3).
pub const PULLUPS: u8 = 0x00;
/// Lines the vmapple board pulls down when nothing drives them (§13.3).
pub const PULLDOWNS: u8 = 0xFF;

/// Bytes of the twelve ID registers from 0xFD0 (spec §13.3): four
/// reserved zero words, part number 0x061, designer 0x41 (Arm), revision
/// 0, then the PrimeCell signature.
pub const ID_BYTES: [u8; 12] = [
    0x00, 0x00, 0x00, 0x00, 0x61, 0x10, 0x04, 0x00, 0x0D, 0xF0, 0x05, 0xB1,
];

#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
struct Regs {
    /// Bits the guest wrote for output lines.
    data: u8,
    /// Levels external drivers set, whatever the direction.
    external: u8,
    dir: u8,
    is: u8,
    ibe: u8,
    iev: u8,
    ie: u8,
    ris: u8,
    afsel: u8,
    /// Pins as the edge detector last saw them.
    last_pins: u8,
}

impl Regs {
    fn pins(&self) -> u8 {
        (self.data & self.dir) | (self.external & !self.dir)
    }

    /// Runs interrupt detection after any change.
    fn detect(&mut self) {
        let pins = self.pins();
        let changed = (self.last_pins ^ pins) & !self.dir & !self.is;
        self.last_pins = pins;
        let matching = !(pins ^ self.iev);
        self.ris |= changed & (self.ibe | matching);
        self.ris |= matching & self.is;
    }

    fn level(&self) -> bool {
        self.ris & self.ie != 0
    }
}

/// A PL061's state in a snapshot, external line levels included.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct SavedPl061(Regs);

/// The PL061 GPIO controller.
pub struct Pl061 {
    regs: Mutex<Regs>,
    irq: Arc<dyn IrqLine>,
}

impl std::fmt::Debug for Pl061 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pl061")
            .field("regs", &*self.regs())
            .finish()
    }
}

impl Pl061 {
    /// Bytes of register space the device decodes.
    pub const SIZE: u64 = 0x1000;

    /// A controller in its reset state (all lines inputs, nothing
    /// driven), line low.
    pub fn new(irq: Arc<dyn IrqLine>) -> Arc<Self> {
        irq.set_level(false);
        Arc::new(Self {
            regs: Mutex::new(Regs::default()),
            irq,
        })
    }

    // A panic while the lock was held (a bug) must not wedge the device:
    // the register file is always consistent.
    fn regs(&self) -> MutexGuard<'_, Regs> {
        lock(&self.regs)
    }

    /// The registers and line levels, for a snapshot.
    pub fn save_state(&self) -> SavedPl061 {
        SavedPl061(self.regs().clone())
    }

    /// Puts back what [`Pl061::save_state`] returned and drives the
    /// interrupt line from it (no edge is detected: the pins are as saved).
    pub fn restore_state(&self, saved: SavedPl061) -> Result<(), String> {
        let mut regs = self.regs();
        *regs = saved.0;
        self.irq.set_level(regs.level());
        Ok(())
    }

    fn settle(&self, regs: &mut Regs) {
        regs.detect();
        self.irq.set_level(regs.level());
    }

    /// An external device drives `line` (0–7) to `level`. Lines outside
    /// 0–7 do not exist; that is a wiring bug of the caller and is ignored.
    pub fn set_input(&self, line: u8, level: bool) {
        if line >= LINES {
            tracing::warn!("pl061: set_input on nonexistent line {line}");
            return;
        }
        let mut regs = self.regs();
        let bit = 1u8 << line;
        if level {
            regs.external |= bit;
        } else {
            regs.external &= !bit;
        }
        self.settle(&mut regs);
    }

    /// What the controller presents to devices on its lines: the data bit
    /// for outputs, the board's pull for inputs (so 0 on vmapple).
    pub fn outputs(&self) -> u8 {
        let regs = self.regs();
        (regs.data & regs.dir) | (PULLUPS & !regs.dir)
    }

    /// Every register to 0, external levels forgotten (see the module
    /// doc), line low.
    pub fn reset(&self) {
        let mut regs = self.regs();
        *regs = Regs::default();
        self.irq.set_level(false);
    }

    fn read_word(&self, offset: u64) -> u32 {
        let regs = self.regs();
        let value = match offset {
            reg::DATA..=reg::DATA_END => regs.pins() & data_mask(offset),
            reg::DIR => regs.dir,
            reg::IS => regs.is,
            reg::IBE => regs.ibe,
            reg::IEV => regs.iev,
            reg::IE => regs.ie,
            reg::RIS => regs.ris,
            reg::MIS => regs.ris & regs.ie,
            reg::AFSEL => regs.afsel,
            reg::ID_FIRST..=reg::PCELL_ID3 if offset & 3 == 0 => {
                ID_BYTES[((offset - reg::ID_FIRST) >> 2) as usize]
            }
            reg::IC => {
                guest_error!("pl061: read of write-only GPIOIC");
                0
            }
            _ => {
                guest_error!("pl061: read at bad offset {offset:#x}");
                0
            }
        };
        u32::from(value)
    }

    fn write_word(&self, offset: u64, value: u32) {
        let mut regs = self.regs();
        // Every register holds 8 bits; the rest of the word is ignored.
        let [byte, ..] = value.to_le_bytes();
        match offset {
            reg::DATA..=reg::DATA_END => {
                let mask = data_mask(offset) & regs.dir;
                regs.data = (regs.data & !mask) | (byte & mask);
            }
            reg::DIR => regs.dir = byte,
            reg::IS => regs.is = byte,
            reg::IBE => regs.ibe = byte,
            reg::IEV => regs.iev = byte,
            reg::IE => regs.ie = byte,
            reg::IC => regs.ris &= !byte,
            reg::AFSEL => regs.afsel = byte,
            reg::RIS | reg::MIS => {
                guest_error!("pl061: write {value:#x} to read-only register at {offset:#x}");
                return;
            }
            reg::ID_FIRST..=reg::PCELL_ID3 => {
                guest_error!("pl061: write {value:#x} to ID register at {offset:#x}");
                return;
            }
            _ => {
                guest_error!("pl061: write {value:#x} at bad offset {offset:#x}");
                return;
            }
        }
        self.settle(&mut regs);
    }
}

/// The lines a GPIODATA access at `offset` covers: address bits 9:2.
fn data_mask(offset: u64) -> u8 {
    let [mask, ..] = (offset >> 2).to_le_bytes();
    mask
}

/// 32-bit registers; other widths as QEMU's model takes them.
const REGISTERS: RegisterFile = RegisterFile {
    name: "pl061",
    size: Pl061::SIZE,
    narrow: Narrow::WholeRegister,
    wide: Wide::Halves,
};

impl MmioDevice for Pl061 {
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
    use vm_core::TestIrq;
    use AccessWidth::{Byte, Double, Half, Word};

    struct Rig {
        gpio: Arc<Pl061>,
        irq: Arc<TestIrq>,
    }

    impl Rig {
        fn new() -> Self {
            let irq = Arc::new(TestIrq::new());
            let gpio = Pl061::new(irq.clone());
            Self { gpio, irq }
        }

        fn r(&self, offset: u64) -> u32 {
            self.gpio.read(offset, Word) as u32
        }

        fn w(&self, offset: u64, value: u32) {
            self.gpio.write(offset, Word, u64::from(value));
        }

        /// `GPIODATA` with every line selected.
        fn data(&self) -> u32 {
            self.r(0x3FC)
        }
    }

    /// Offset of `GPIODATA` selecting the lines in `mask`.
    fn data_at(mask: u8) -> u64 {
        u64::from(mask) << 2
    }

    #[test]
    fn reset_values_and_id_bytes() {
        let rig = Rig::new();
        for offset in [
            0x3FC,
            reg::DIR,
            reg::IS,
            reg::IBE,
            reg::IEV,
            reg::IE,
            reg::RIS,
            reg::MIS,
            reg::IC,
            reg::AFSEL,
        ] {
            assert_eq!(rig.r(offset), 0, "offset {offset:#x}");
        }
        let ids: Vec<u8> = (0..12)
            .map(|i| rig.r(reg::ID_FIRST + 4 * i) as u8)
            .collect();
        assert_eq!(
            ids,
            [0x00, 0x00, 0x00, 0x00, 0x61, 0x10, 0x04, 0x00, 0x0D, 0xF0, 0x05, 0xB1]
        );
        assert_eq!(rig.r(reg::PERIPH_ID0), 0x61);
        assert_eq!(rig.r(reg::PCELL_ID0), 0x0D);
        assert!(!rig.irq.is_asserted());
        assert_eq!(rig.gpio.outputs(), 0, "pulled down");
    }

    #[test]
    fn data_offset_is_the_line_mask() {
        let rig = Rig::new();
        rig.w(reg::DIR, 0xFF);
        rig.w(data_at(0xFF), 0xA5);
        assert_eq!(rig.data(), 0xA5);
        assert_eq!(rig.r(data_at(0x0F)), 0x05, "only the selected lines");
        assert_eq!(rig.r(data_at(0x00)), 0);
        // A write through a mask leaves the other lines alone.
        rig.w(data_at(0x03), 0xFF);
        assert_eq!(rig.data(), 0xA7);
        rig.w(data_at(0x80), 0x00);
        assert_eq!(rig.data(), 0x27);
        rig.w(data_at(0x00), 0xFF);
        assert_eq!(rig.data(), 0x27, "empty mask writes nothing");
        assert_eq!(rig.gpio.outputs(), 0x27);
    }

    #[test]
    fn writes_to_input_lines_are_dropped_and_inputs_read_the_pin() {
        let rig = Rig::new();
        rig.w(reg::DIR, 0x0F);
        rig.w(data_at(0xFF), 0xFF);
        assert_eq!(rig.data(), 0x0F, "undriven inputs read 0");
        rig.gpio.set_input(6, true);
        assert_eq!(rig.data(), 0x4F);
        // A level set while the line is an output appears once it is an input.
        rig.gpio.set_input(1, false);
        rig.gpio.set_input(2, true);
        assert_eq!(rig.data(), 0x4F, "outputs show the written bits");
        rig.w(reg::DIR, 0x00);
        assert_eq!(rig.data(), 0x44);
        assert_eq!(rig.gpio.outputs(), 0, "inputs are presented pulled down");
    }

    #[test]
    fn plain_registers_store_eight_bits() {
        let rig = Rig::new();
        for offset in [reg::DIR, reg::IS, reg::IBE, reg::IEV, reg::IE, reg::AFSEL] {
            rig.w(offset, 0xFFFF_FF5A);
            assert_eq!(rig.r(offset), 0x5A, "offset {offset:#x}");
        }
    }

    #[test]
    fn rising_edge_interrupt() {
        let rig = Rig::new();
        rig.w(reg::IEV, 0x08);
        rig.w(reg::IE, 0x08);
        assert!(!rig.irq.is_asserted());
        rig.gpio.set_input(3, true);
        assert!(rig.irq.is_asserted());
        assert_eq!(rig.r(reg::RIS), 0x08);
        assert_eq!(rig.r(reg::MIS), 0x08);
        rig.gpio.set_input(3, false);
        assert!(rig.irq.is_asserted(), "edge stays latched");
        rig.w(reg::IC, 0x08);
        assert!(!rig.irq.is_asserted());
        assert_eq!(rig.r(reg::RIS), 0);
        rig.gpio.set_input(3, false);
        assert_eq!(rig.r(reg::RIS), 0, "no change, no edge");
        assert_eq!(rig.irq.rising_edges(), 1);
    }

    #[test]
    fn falling_and_both_edges() {
        let rig = Rig::new();
        rig.w(reg::IE, 0xFF);
        rig.gpio.set_input(0, true);
        assert_eq!(rig.r(reg::RIS), 0, "IEV=0 selects falling edges");
        rig.gpio.set_input(0, false);
        assert_eq!(rig.r(reg::RIS), 0x01);
        rig.w(reg::IC, 0xFF);
        rig.w(reg::IBE, 0x02);
        rig.gpio.set_input(1, true);
        assert_eq!(rig.r(reg::RIS), 0x02);
        rig.w(reg::IC, 0x02);
        rig.gpio.set_input(1, false);
        assert_eq!(rig.r(reg::RIS), 0x02);
    }

    #[test]
    fn masked_edges_are_recorded_but_do_not_interrupt() {
        let rig = Rig::new();
        rig.w(reg::IEV, 0xFF);
        rig.gpio.set_input(5, true);
        assert_eq!(rig.r(reg::RIS), 0x20);
        assert_eq!(rig.r(reg::MIS), 0);
        assert!(!rig.irq.is_asserted());
        rig.w(reg::IE, 0x20);
        assert!(rig.irq.is_asserted(), "unmasking a pending edge interrupts");
    }

    #[test]
    fn output_lines_do_not_make_edges() {
        let rig = Rig::new();
        rig.w(reg::IEV, 0xFF);
        rig.w(reg::IBE, 0xFF);
        rig.w(reg::IE, 0xFF);
        rig.w(reg::DIR, 0x01);
        rig.w(data_at(0x01), 1);
        assert_eq!(rig.r(reg::RIS), 0);
        assert!(!rig.irq.is_asserted());
    }

    #[test]
    fn level_interrupt_follows_the_level_until_cleared() {
        let rig = Rig::new();
        // IEV before IS: with IEV=0 the low line would match at once.
        rig.w(reg::IEV, 0x10);
        rig.w(reg::IS, 0x10);
        rig.w(reg::IE, 0x10);
        assert!(!rig.irq.is_asserted());
        rig.gpio.set_input(4, true);
        assert!(rig.irq.is_asserted());
        rig.w(reg::IC, 0x10);
        assert!(rig.irq.is_asserted(), "level still there: set again");
        assert_eq!(rig.r(reg::RIS), 0x10);
        rig.gpio.set_input(4, false);
        rig.w(reg::IC, 0x10);
        assert!(!rig.irq.is_asserted());
        assert_eq!(rig.r(reg::RIS), 0);
    }

    #[test]
    fn low_level_interrupt_fires_on_an_undriven_line() {
        let rig = Rig::new();
        rig.w(reg::IE, 0x80);
        assert!(!rig.irq.is_asserted());
        rig.w(reg::IS, 0x80);
        assert!(
            rig.irq.is_asserted(),
            "IEV=0: low level, and the line is low"
        );
    }

    #[test]
    fn read_only_registers_and_ids_ignore_writes() {
        let rig = Rig::new();
        rig.w(reg::IEV, 0x01);
        rig.gpio.set_input(0, true);
        rig.w(reg::RIS, 0);
        rig.w(reg::MIS, 0);
        assert_eq!(rig.r(reg::RIS), 0x01);
        rig.w(reg::PERIPH_ID0, 0);
        assert_eq!(rig.r(reg::PERIPH_ID0), 0x61);
        rig.w(0x500, 0xFF);
        assert_eq!(rig.r(0x500), 0, "Luminary registers are not there");
    }

    #[test]
    fn widths() {
        let rig = Rig::new();
        rig.w(reg::DIR, 0xFF);
        rig.gpio.write(data_at(0xFF), Byte, 0x3C);
        assert_eq!(rig.gpio.read(data_at(0xFF), Byte), 0x3C);
        // Unaligned offsets in the data window still decode bits [9:2].
        assert_eq!(rig.gpio.read(data_at(0x0F) + 1, Byte), 0x0C);
        rig.gpio.write(data_at(0xF0) + 3, Byte, 0x00);
        assert_eq!(rig.data(), 0x0C);
        rig.gpio.write(reg::IEV, Half, 0x1234);
        assert_eq!(rig.r(reg::IEV), 0x34);
        rig.gpio.write(reg::IEV + 1, Byte, 0xFF);
        assert_eq!(rig.r(reg::IEV), 0x34, "inside a register: ignored");
        assert_eq!(rig.gpio.read(reg::IEV + 1, Byte), 0);
        // DIR and IS in one 64-bit access, DIR low.
        rig.gpio.write(reg::DIR, Double, 0x0000_0001_0000_00F0);
        assert_eq!(rig.r(reg::DIR), 0xF0);
        assert_eq!(rig.r(reg::IS), 0x01);
        assert_eq!(rig.gpio.read(reg::DIR, Double), 0x0000_0001_0000_00F0);
        assert_eq!(rig.gpio.read(reg::PCELL_ID3, Double), 0xB1);
    }

    #[test]
    fn reset_clears_registers_and_external_levels() {
        let rig = Rig::new();
        rig.w(reg::IEV, 0x08);
        rig.w(reg::IE, 0x08);
        rig.w(reg::DIR, 0x01);
        rig.w(data_at(0x01), 1);
        rig.gpio.set_input(3, true);
        assert!(rig.irq.is_asserted());
        rig.gpio.reset();
        assert!(!rig.irq.is_asserted());
        assert_eq!(rig.data(), 0, "the level driven before reset is forgotten");
        for offset in [reg::DIR, reg::IEV, reg::IE, reg::RIS] {
            assert_eq!(rig.r(offset), 0, "offset {offset:#x}");
        }
        // The driver is seen again when it next drives the line.
        rig.w(reg::IEV, 0x08);
        rig.w(reg::IE, 0x08);
        rig.gpio.set_input(3, true);
        assert!(rig.irq.is_asserted());
    }

    #[test]
    fn nonexistent_lines_are_ignored() {
        let rig = Rig::new();
        rig.w(reg::IEV, 0xFF);
        rig.w(reg::IE, 0xFF);
        for line in [8, 9, 200, u8::MAX] {
            rig.gpio.set_input(line, true);
        }
        assert_eq!(rig.data(), 0);
        assert!(!rig.irq.is_asserted());
    }

    #[test]
    fn hostile_accesses_do_not_panic() {
        let rig = Rig::new();
        for offset in (0..Pl061::SIZE).chain([Pl061::SIZE, u64::MAX - 3, u64::MAX]) {
            for width in [Byte, Half, Word, Double] {
                rig.gpio.write(offset, width, u64::MAX);
                let _ = rig.gpio.read(offset, width);
                rig.gpio.write(offset, width, 0);
            }
        }
        assert_eq!(rig.r(reg::PCELL_ID3), 0xB1);
    }
}
