//! Register map of the XHCI BAR 0 (XHCI 1.2 chapter 5), laid out as QEMU's
//! `qemu-xhci` lays it out: capability registers at 0, operational at
//! 0x40 (ports from 0x440), runtime at 0x1000, doorbells at 0x2000, the
//! MSI-X table and PBA (if any) at 0x3000 and 0x3800, all in a 16 KiB BAR.

/// Size of BAR 0.
pub const BAR_SIZE: u64 = 0x4000;
/// The MSI-X table and PBA in BAR 0, when the controller has MSI-X
/// (QEMU's `OFF_MSIX_TABLE` and `OFF_MSIX_PBA`).
pub const MSIX_TABLE_OFFSET: u64 = 0x3000;
pub const MSIX_PBA_OFFSET: u64 = 0x3800;

/// Root-hub ports: 1..=4 are USB 3 (SuperSpeed), 5..=8 USB 2, as in QEMU
/// (which lists its USB 3 ports first).
pub const NUM_PORTS_USB3: usize = 4;
pub const NUM_PORTS_USB2: usize = 4;
pub const NUM_PORTS: usize = NUM_PORTS_USB3 + NUM_PORTS_USB2;
/// First USB 2 port, 1-based.
pub const FIRST_USB2_PORT: usize = NUM_PORTS_USB3 + 1;
/// Device slots (vmapple-machine.md §7.3).
pub const NUM_SLOTS: usize = 64;
/// Interrupters (vmapple-machine.md §7.3; macOS wants at least 4, §7.6).
pub const NUM_INTRS: usize = 16;
/// ERST Max as QEMU advertises it: 2^0 = one segment per event ring.
pub const ERST_MAX: u32 = 0;
/// Segment table entries the controller nonetheless follows (a guest that
/// uses more than it was offered still gets a working ring, up to this).
pub const MAX_ERST_ENTRIES: u32 = 16;

// Capability registers.
pub const CAP_LENGTH_VERSION: u64 = 0x00;
pub const CAP_HCSPARAMS1: u64 = 0x04;
pub const CAP_HCSPARAMS2: u64 = 0x08;
pub const CAP_HCSPARAMS3: u64 = 0x0c;
pub const CAP_HCCPARAMS1: u64 = 0x10;
pub const CAP_DBOFF: u64 = 0x14;
pub const CAP_RTSOFF: u64 = 0x18;
pub const CAP_HCCPARAMS2: u64 = 0x1c;
/// Supported Protocol capability for the USB 2 ports.
pub const CAP_XECP_USB2: u64 = 0x20;
/// Supported Protocol capability for the USB 3 ports.
pub const CAP_XECP_USB3: u64 = 0x30;

pub const CAP_LENGTH: u32 = 0x40;
pub const HCI_VERSION: u32 = 0x0100;
pub const OP_BASE: u64 = CAP_LENGTH as u64;
pub const RUNTIME_BASE: u64 = 0x1000;
pub const DOORBELL_BASE: u64 = 0x2000;

pub const HCSPARAMS1: u32 =
    ((NUM_PORTS as u32) << 24) | ((NUM_INTRS as u32) << 8) | NUM_SLOTS as u32;
/// IST 15 (frame-granular isochronous threshold), ERST Max, no scratchpad
/// buffers: 0x0000000F, QEMU's value.
pub const HCSPARAMS2: u32 = 0xf | (ERST_MAX << 4);
/// 64-bit addressing (AC64), 32-byte contexts (CSZ 0), no streams, no port
/// power control; extended capabilities at 0x20 (xECP in dwords).
pub const HCCPARAMS1: u32 = 0x1 | (((CAP_XECP_USB2 as u32) >> 2) << 16);

// Operational registers (offsets from OP_BASE).
pub const OP_USBCMD: u64 = 0x00;
pub const OP_USBSTS: u64 = 0x04;
pub const OP_PAGESIZE: u64 = 0x08;
pub const OP_DNCTRL: u64 = 0x14;
pub const OP_CRCR_LO: u64 = 0x18;
pub const OP_CRCR_HI: u64 = 0x1c;
pub const OP_DCBAAP_LO: u64 = 0x30;
pub const OP_DCBAAP_HI: u64 = 0x34;
pub const OP_CONFIG: u64 = 0x38;
pub const OP_PORT_BASE: u64 = 0x400;
pub const PORT_STRIDE: u64 = 0x10;
pub const PORT_SC: u64 = 0x0;
pub const PORT_PMSC: u64 = 0x4;
pub const PORT_LI: u64 = 0x8;
pub const PORT_HLPMC: u64 = 0xc;

pub const USBCMD_RS: u32 = 1 << 0;
pub const USBCMD_HCRST: u32 = 1 << 1;
pub const USBCMD_INTE: u32 = 1 << 2;
pub const USBCMD_HSEE: u32 = 1 << 3;
pub const USBCMD_LHCRST: u32 = 1 << 7;
pub const USBCMD_CSS: u32 = 1 << 8;
pub const USBCMD_CRS: u32 = 1 << 9;
pub const USBCMD_EWE: u32 = 1 << 10;
pub const USBCMD_EU3S: u32 = 1 << 11;
/// USBCMD bits that are stored as written.
pub const USBCMD_STORED: u32 = USBCMD_RS | USBCMD_INTE | USBCMD_HSEE | USBCMD_EWE | USBCMD_EU3S;

pub const USBSTS_HCH: u32 = 1 << 0;
pub const USBSTS_HSE: u32 = 1 << 2;
pub const USBSTS_EINT: u32 = 1 << 3;
pub const USBSTS_PCD: u32 = 1 << 4;
pub const USBSTS_SSS: u32 = 1 << 8;
pub const USBSTS_RSS: u32 = 1 << 9;
pub const USBSTS_SRE: u32 = 1 << 10;
pub const USBSTS_CNR: u32 = 1 << 11;
pub const USBSTS_HCE: u32 = 1 << 12;
pub const USBSTS_RW1C: u32 = USBSTS_HSE | USBSTS_EINT | USBSTS_PCD | USBSTS_SRE;

/// 4 KiB pages only.
pub const PAGESIZE: u32 = 1;

pub const CRCR_RCS: u64 = 1 << 0;
pub const CRCR_CS: u64 = 1 << 1;
pub const CRCR_CA: u64 = 1 << 2;
pub const CRCR_CRR: u64 = 1 << 3;
pub const CRCR_PTR_MASK: u64 = !0x3f;

pub const CONFIG_MAX_SLOTS_EN: u32 = 0xff;

pub const PORTSC_CCS: u32 = 1 << 0;
pub const PORTSC_PED: u32 = 1 << 1;
pub const PORTSC_OCA: u32 = 1 << 3;
pub const PORTSC_PR: u32 = 1 << 4;
pub const PORTSC_PLS_SHIFT: u32 = 5;
pub const PORTSC_PLS_MASK: u32 = 0xf << PORTSC_PLS_SHIFT;
pub const PORTSC_PP: u32 = 1 << 9;
pub const PORTSC_SPEED_SHIFT: u32 = 10;
pub const PORTSC_SPEED_MASK: u32 = 0xf << PORTSC_SPEED_SHIFT;
pub const PORTSC_PIC_MASK: u32 = 0x3 << 14;
pub const PORTSC_LWS: u32 = 1 << 16;
pub const PORTSC_CSC: u32 = 1 << 17;
pub const PORTSC_PEC: u32 = 1 << 18;
pub const PORTSC_WRC: u32 = 1 << 19;
pub const PORTSC_OCC: u32 = 1 << 20;
pub const PORTSC_PRC: u32 = 1 << 21;
pub const PORTSC_PLC: u32 = 1 << 22;
pub const PORTSC_CEC: u32 = 1 << 23;
pub const PORTSC_CAS: u32 = 1 << 24;
pub const PORTSC_WCE: u32 = 1 << 25;
pub const PORTSC_WDE: u32 = 1 << 26;
pub const PORTSC_WOE: u32 = 1 << 27;
pub const PORTSC_DR: u32 = 1 << 30;
pub const PORTSC_WPR: u32 = 1 << 31;
pub const PORTSC_CHANGE: u32 =
    PORTSC_CSC | PORTSC_PEC | PORTSC_WRC | PORTSC_OCC | PORTSC_PRC | PORTSC_PLC | PORTSC_CEC;
pub const PORTSC_WAKE: u32 = PORTSC_WCE | PORTSC_WDE | PORTSC_WOE;

pub const PLS_U0: u32 = 0;
pub const PLS_U3: u32 = 3;
pub const PLS_DISABLED: u32 = 4;
pub const PLS_RXDETECT: u32 = 5;
pub const PLS_POLLING: u32 = 7;
pub const PLS_RESUME: u32 = 15;

// Runtime registers (offsets from RUNTIME_BASE).
pub const RT_MFINDEX: u64 = 0x00;
pub const RT_IR_BASE: u64 = 0x20;
pub const IR_STRIDE: u64 = 0x20;
pub const IR_IMAN: u64 = 0x00;
pub const IR_IMOD: u64 = 0x04;
pub const IR_ERSTSZ: u64 = 0x08;
pub const IR_ERSTBA_LO: u64 = 0x10;
pub const IR_ERSTBA_HI: u64 = 0x14;
pub const IR_ERDP_LO: u64 = 0x18;
pub const IR_ERDP_HI: u64 = 0x1c;

pub const IMAN_IP: u32 = 1 << 0;
pub const IMAN_IE: u32 = 1 << 1;
/// Interval 0xFA0 × 250 ns = 1 ms (XHCI 1.2 §5.5.2.2 reset value).
pub const IMOD_RESET: u32 = 0x0000_0fa0;
pub const ERDP_DESI_MASK: u64 = 0x7;
pub const ERDP_EHB: u64 = 1 << 3;
pub const ERDP_PTR_MASK: u64 = !0xf;
pub const ERSTBA_PTR_MASK: u64 = !0x3f;
pub const DCBAAP_PTR_MASK: u64 = !0x3f;

/// Supported Protocol capability dwords (XHCI 1.2 §7.2): USB 2.0 then
/// USB 3.0, port offsets/counts matching the port numbering above.
pub const fn supported_protocol_dword(offset: u64) -> u32 {
    const NAME: u32 = 0x2042_5355; // "USB "
    match offset {
        // Revision 2.00, next capability 4 dwords on, ID 2.
        0x20 => 0x0200_0402,
        0x24 => NAME,
        0x28 => ((NUM_PORTS_USB2 as u32) << 8) | FIRST_USB2_PORT as u32,
        // Revision 3.00, last capability.
        0x30 => 0x0300_0002,
        0x34 => NAME,
        0x38 => ((NUM_PORTS_USB3 as u32) << 8) | 1,
        _ => 0,
    }
}
