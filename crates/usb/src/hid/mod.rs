//! USB functions behind the emulated root hub: the [`UsbDevice`] contract
//! the XHCI controller drives, and the two HID devices vmapple attaches
//! (vmapple-machine.md §7.3: `usb-kbd` and `usb-tablet`).
//!
//! Requests follow USB 2.0 chapter 9 (standard device requests, descriptor
//! layouts) and HID 1.11 (class requests §7.2, HID descriptor §6.2.1, boot
//! keyboard report Appendix B.1). Both devices have one configuration with
//! one interface and one interrupt IN endpoint (0x81, 8-byte packets), and
//! present themselves as QEMU's default (`usb_version=2`) devices do on an
//! XHCI USB 2 port: high speed, bcdUSB 2.00, 64-byte EP0, bus powered with
//! remote wakeup, vendor `0x0627`, product `0x0001`, manufacturer "QEMU",
//! products "QEMU USB Keyboard" / "QEMU USB Tablet", serials "68284" /
//! "28754", configurations "HID Keyboard" / "HID Tablet", report endpoint
//! bInterval 7 (8 ms) / 4 (1 ms) (facts from QEMU `hw/usb/dev-hid.c`).
//!
//! Input reaches a device as an [`InputEvent`]; the device turns it into a
//! report and queues it (at most [`REPORT_QUEUE_LEN`] reports, later ones
//! merged into the newest so a flood of host input cannot grow memory).

use std::collections::VecDeque;
use std::time::Instant;

pub mod keyboard;
mod state;
pub mod tablet;

pub use keyboard::UsbKeyboard;
pub use state::{SavedDevice, SavedHid};
pub use tablet::UsbTablet;

/// Reports a HID device holds for the host before merging new input into
/// the newest one.
pub const REPORT_QUEUE_LEN: usize = 16;

/// wMaxPacketSize of the report endpoint.
pub const REPORT_MAX_PACKET: u16 = 8;

/// Vendor ID of QEMU's HID devices.
pub const HID_VENDOR_ID: u16 = 0x0627;
/// Product ID QEMU uses for its keyboard, mouse and tablet alike.
pub const HID_PRODUCT_ID: u16 = 0x0001;

// Standard requests (USB 2.0 Table 9-4).
pub const REQ_GET_STATUS: u8 = 0x00;
pub const REQ_CLEAR_FEATURE: u8 = 0x01;
pub const REQ_SET_FEATURE: u8 = 0x03;
pub const REQ_SET_ADDRESS: u8 = 0x05;
pub const REQ_GET_DESCRIPTOR: u8 = 0x06;
pub const REQ_GET_CONFIGURATION: u8 = 0x08;
pub const REQ_SET_CONFIGURATION: u8 = 0x09;
pub const REQ_GET_INTERFACE: u8 = 0x0a;
pub const REQ_SET_INTERFACE: u8 = 0x0b;

// HID class requests (HID 1.11 §7.2).
pub const HID_GET_REPORT: u8 = 0x01;
pub const HID_GET_IDLE: u8 = 0x02;
pub const HID_GET_PROTOCOL: u8 = 0x03;
pub const HID_SET_REPORT: u8 = 0x09;
pub const HID_SET_IDLE: u8 = 0x0a;
pub const HID_SET_PROTOCOL: u8 = 0x0b;

// Descriptor types (USB 2.0 Table 9-5, HID 1.11 §7.1).
pub const DESC_DEVICE: u8 = 1;
pub const DESC_CONFIGURATION: u8 = 2;
pub const DESC_STRING: u8 = 3;
pub const DESC_INTERFACE: u8 = 4;
pub const DESC_ENDPOINT: u8 = 5;
pub const DESC_HID: u8 = 0x21;
pub const DESC_REPORT: u8 = 0x22;

// Feature selectors (USB 2.0 Table 9-6).
pub const FEATURE_ENDPOINT_HALT: u16 = 0;
pub const FEATURE_DEVICE_REMOTE_WAKEUP: u16 = 1;

/// HID report types in the high byte of GET_REPORT/SET_REPORT `wValue`.
pub const REPORT_TYPE_INPUT: u8 = 1;
pub const REPORT_TYPE_OUTPUT: u8 = 2;

/// Bus speed of a device, as its port reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UsbSpeed {
    Low,
    Full,
    High,
    Super,
}

impl UsbSpeed {
    /// The default Protocol Speed ID of an XHCI port (XHCI 1.2 §7.2, the
    /// mapping used when a Supported Protocol capability lists no PSIs).
    pub fn xhci_speed_id(self) -> u32 {
        match self {
            UsbSpeed::Full => 1,
            UsbSpeed::Low => 2,
            UsbSpeed::High => 3,
            UsbSpeed::Super => 4,
        }
    }
}

/// The 8-byte SETUP packet of a control transfer (USB 2.0 §9.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SetupPacket {
    pub request_type: u8,
    pub request: u8,
    pub value: u16,
    pub index: u16,
    pub length: u16,
}

impl SetupPacket {
    pub fn from_bytes(b: [u8; 8]) -> Self {
        Self {
            request_type: b[0],
            request: b[1],
            value: u16::from_le_bytes([b[2], b[3]]),
            index: u16::from_le_bytes([b[4], b[5]]),
            length: u16::from_le_bytes([b[6], b[7]]),
        }
    }

    pub fn to_bytes(&self) -> [u8; 8] {
        let v = self.value.to_le_bytes();
        let i = self.index.to_le_bytes();
        let l = self.length.to_le_bytes();
        [
            self.request_type,
            self.request,
            v[0],
            v[1],
            i[0],
            i[1],
            l[0],
            l[1],
        ]
    }

    /// Device-to-host data stage.
    pub fn is_in(&self) -> bool {
        self.request_type & 0x80 != 0
    }
}

/// How a device answered a control transfer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ControlResult {
    /// Accepted; for an IN request, the data to return (the host truncates
    /// it to `wLength`).
    Ok(Vec<u8>),
    /// The device stalled the request (unsupported or invalid).
    Stall,
}

/// How a device answered an interrupt or bulk transfer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransferResult {
    /// That many bytes moved.
    Data(usize),
    /// Nothing to say now; the host retries later.
    Nak,
    /// The endpoint is halted.
    Stall,
}

/// Host input for the HID devices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputEvent {
    /// A key, by HID usage (Keyboard/Keypad page 0x07; 0xE0–0xE7 are the
    /// modifiers).
    Key { usage: u8, pressed: bool },
    /// Absolute pointer position, 0..=32767 on each axis (larger values
    /// are clamped).
    PointerAbs { x: u16, y: u16 },
    /// Button state: bit 0 left, 1 right, 2 middle, 3 back, 4 forward.
    Buttons(u8),
    /// Wheel movement in detents, positive away from the user.
    Wheel(i8),
}

/// A USB function attached to a root-hub port.
///
/// Every argument comes from the guest; implementations must answer
/// anything (stalling what they do not understand) without panicking.
pub trait UsbDevice: Send {
    /// Speed the port reports once the device is connected.
    fn speed(&self) -> UsbSpeed;

    /// USB bus reset: back to the default state (unconfigured, address 0).
    fn reset(&mut self);

    /// A control transfer on endpoint 0. `data_out` holds the OUT data stage
    /// (empty for IN requests).
    fn control(&mut self, setup: &SetupPacket, data_out: &[u8]) -> ControlResult;

    /// An interrupt (or bulk) IN transfer on `endpoint` (number, without the
    /// direction bit) into `buf`.
    fn interrupt_in(&mut self, endpoint: u8, buf: &mut [u8]) -> TransferResult;

    /// An interrupt (or bulk) OUT transfer on `endpoint`.
    fn data_out(&mut self, endpoint: u8, data: &[u8]) -> TransferResult {
        let _ = (endpoint, data);
        TransferResult::Stall
    }

    /// Offers host input to the device; true if it took it.
    fn handle_input(&mut self, event: &InputEvent) -> bool {
        let _ = event;
        false
    }

    /// Whether the host enabled remote wakeup (SET_FEATURE
    /// DEVICE_REMOTE_WAKEUP).
    fn remote_wakeup_enabled(&self) -> bool {
        false
    }

    /// Snapshots: the device's state, or `None` if it cannot give one
    /// (the controller then cannot be saved).
    fn save_state(&self) -> Option<SavedDevice> {
        None
    }

    /// Puts back what [`UsbDevice::save_state`] returned. The input is
    /// untrusted: a state the device could not have reached is refused
    /// whole, changing nothing.
    fn restore_state(&mut self, saved: &SavedDevice) -> Result<(), String> {
        let _ = saved;
        Err("this device cannot restore a state".into())
    }
}

/// Fixed facts of one HID device.
pub(crate) struct HidIdentity {
    pub product: &'static str,
    pub serial: &'static str,
    pub subclass: u8,
    pub protocol: u8,
    pub report_descriptor: &'static [u8],
    /// Length of one input report.
    pub report_len: u8,
    /// Boot-interface devices answer GET/SET_PROTOCOL.
    pub boot: bool,
    /// High-speed bInterval of the report endpoint (2^(n-1) microframes).
    pub interval: u8,
    /// Configuration string (iConfiguration 4).
    pub config_name: &'static str,
}

/// What the class-independent part of a HID device leaves to its owner.
pub(crate) enum HidOutcome {
    Done(ControlResult),
    /// A SET_REPORT with this report type and data.
    SetReport(u8, Vec<u8>),
    /// A GET_REPORT for a report type other than Input.
    GetReport(u8),
}

/// State and request handling shared by the HID devices.
pub(crate) struct HidCore {
    ident: &'static HidIdentity,
    configuration: u8,
    remote_wakeup: bool,
    /// HID idle rate in 4 ms units; 0 means report only on change.
    idle: u8,
    /// 0 boot, 1 report (HID 1.11 §7.2.6; report is the reset default).
    protocol: u8,
    halted: bool,
    queue: VecDeque<Vec<u8>>,
    /// The newest report, for GET_REPORT and idle repeats.
    current: Vec<u8>,
    last_sent: Option<Instant>,
}

impl HidCore {
    pub fn new(ident: &'static HidIdentity) -> Self {
        Self {
            ident,
            configuration: 0,
            remote_wakeup: false,
            idle: 0,
            protocol: 1,
            halted: false,
            queue: VecDeque::new(),
            current: vec![0; usize::from(ident.report_len)],
            last_sent: None,
        }
    }

    pub fn reset(&mut self) {
        self.configuration = 0;
        self.remote_wakeup = false;
        self.idle = 0;
        self.protocol = 1;
        self.halted = false;
        self.queue.clear();
        self.last_sent = None;
    }

    pub fn remote_wakeup(&self) -> bool {
        self.remote_wakeup
    }

    pub fn current_mut(&mut self) -> &mut [u8] {
        &mut self.current
    }

    /// Queues `report` as the new current report. When the queue is full,
    /// `merge` combines the newest queued report with the new one.
    pub fn push_report(&mut self, report: Vec<u8>, merge: impl FnOnce(&[u8], &mut Vec<u8>)) {
        self.current = report.clone();
        // An unconfigured device has no host listening: input from before
        // the guest's driver started must not replay later.
        if self.configuration == 0 {
            return;
        }
        if self.queue.len() >= REPORT_QUEUE_LEN {
            if let Some(last) = self.queue.back_mut() {
                let mut merged = report;
                merge(last, &mut merged);
                *last = merged;
            }
        } else {
            self.queue.push_back(report);
        }
    }

    pub fn device_descriptor(&self) -> Vec<u8> {
        let mut d = vec![18, DESC_DEVICE];
        d.extend_from_slice(&0x0200u16.to_le_bytes()); // bcdUSB
        d.extend_from_slice(&[0, 0, 0, 64]); // class, subclass, protocol, bMaxPacketSize0
        d.extend_from_slice(&HID_VENDOR_ID.to_le_bytes());
        d.extend_from_slice(&HID_PRODUCT_ID.to_le_bytes());
        d.extend_from_slice(&0u16.to_le_bytes()); // bcdDevice
        d.extend_from_slice(&[1, 2, 3, 1]); // strings, bNumConfigurations
        d
    }

    fn hid_descriptor(&self) -> [u8; 9] {
        let len = (self.ident.report_descriptor.len() as u16).to_le_bytes();
        [9, DESC_HID, 0x11, 0x01, 0, 1, DESC_REPORT, len[0], len[1]]
    }

    pub fn configuration_descriptor(&self) -> Vec<u8> {
        let total: u16 = 9 + 9 + 9 + 7;
        let t = total.to_le_bytes();
        // Bus powered with remote wakeup, 100 mA.
        let mut d = vec![9, DESC_CONFIGURATION, t[0], t[1], 1, 1, 4, 0xa0, 50];
        d.extend_from_slice(&[
            9,
            DESC_INTERFACE,
            0,
            0,
            1,
            3, // HID
            self.ident.subclass,
            self.ident.protocol,
            0,
        ]);
        d.extend_from_slice(&self.hid_descriptor());
        let mps = REPORT_MAX_PACKET.to_le_bytes();
        d.extend_from_slice(&[
            7,
            DESC_ENDPOINT,
            0x81,
            0x03, // interrupt
            mps[0],
            mps[1],
            self.ident.interval,
        ]);
        d
    }

    fn string_descriptor(&self, index: u8) -> Option<Vec<u8>> {
        let s = match index {
            0 => return Some(vec![4, DESC_STRING, 0x09, 0x04]), // en-US
            1 => "QEMU",
            2 => self.ident.product,
            3 => self.ident.serial,
            4 => self.ident.config_name,
            _ => return None,
        };
        let mut d = vec![0, DESC_STRING];
        for unit in s.encode_utf16() {
            d.extend_from_slice(&unit.to_le_bytes());
        }
        d[0] = d.len() as u8;
        Some(d)
    }

    /// Answers standard and HID class requests.
    pub fn control(&mut self, setup: &SetupPacket, data_out: &[u8]) -> HidOutcome {
        let stall = HidOutcome::Done(ControlResult::Stall);
        let ok = |v: Vec<u8>| HidOutcome::Done(ControlResult::Ok(v));
        let [value_lo, value_hi] = setup.value.to_le_bytes();
        match (setup.request_type, setup.request) {
            (0x80, REQ_GET_DESCRIPTOR) => match value_hi {
                DESC_DEVICE => ok(self.device_descriptor()),
                DESC_CONFIGURATION if value_lo == 0 => ok(self.configuration_descriptor()),
                DESC_STRING => match self.string_descriptor(value_lo) {
                    Some(d) => ok(d),
                    None => stall,
                },
                _ => stall,
            },
            (0x81, REQ_GET_DESCRIPTOR) if setup.index == 0 => match value_hi {
                DESC_HID => ok(self.hid_descriptor().to_vec()),
                DESC_REPORT => ok(self.ident.report_descriptor.to_vec()),
                _ => stall,
            },
            (0x80, REQ_GET_STATUS) => ok(vec![u8::from(self.remote_wakeup) << 1, 0]),
            (0x81, REQ_GET_STATUS) => ok(vec![0, 0]),
            (0x82, REQ_GET_STATUS) => match setup.index & 0xff {
                0 | 0x80 => ok(vec![0, 0]),
                0x81 => ok(vec![u8::from(self.halted), 0]),
                _ => stall,
            },
            (0x00, REQ_SET_FEATURE | REQ_CLEAR_FEATURE)
                if setup.value == FEATURE_DEVICE_REMOTE_WAKEUP =>
            {
                self.remote_wakeup = setup.request == REQ_SET_FEATURE;
                ok(Vec::new())
            }
            (0x02, REQ_SET_FEATURE | REQ_CLEAR_FEATURE)
                if setup.value == FEATURE_ENDPOINT_HALT && setup.index & 0xff == 0x81 =>
            {
                self.halted = setup.request == REQ_SET_FEATURE;
                ok(Vec::new())
            }
            (0x00, REQ_SET_ADDRESS) => ok(Vec::new()),
            (0x80, REQ_GET_CONFIGURATION) => ok(vec![self.configuration]),
            (0x00, REQ_SET_CONFIGURATION) if setup.value <= 1 => {
                self.configuration = setup.value as u8;
                self.halted = false;
                ok(Vec::new())
            }
            (0x81, REQ_GET_INTERFACE) if setup.index == 0 => ok(vec![0]),
            (0x01, REQ_SET_INTERFACE) if setup.index == 0 && setup.value == 0 => ok(Vec::new()),
            (0xa1, HID_GET_REPORT) if value_hi == REPORT_TYPE_INPUT => ok(self.current.clone()),
            (0xa1, HID_GET_REPORT) => HidOutcome::GetReport(value_hi),
            (0xa1, HID_GET_IDLE) => ok(vec![self.idle]),
            (0x21, HID_SET_IDLE) => {
                self.idle = value_hi;
                ok(Vec::new())
            }
            (0xa1, HID_GET_PROTOCOL) if self.ident.boot => ok(vec![self.protocol]),
            (0x21, HID_SET_PROTOCOL) if self.ident.boot && setup.value <= 1 => {
                self.protocol = setup.value as u8;
                ok(Vec::new())
            }
            (0x21, HID_SET_REPORT) => HidOutcome::SetReport(value_hi, data_out.to_vec()),
            _ => stall,
        }
    }

    /// Interrupt IN on the report endpoint.
    pub fn interrupt_in(&mut self, endpoint: u8, buf: &mut [u8]) -> TransferResult {
        if endpoint != 1 || self.halted {
            return TransferResult::Stall;
        }
        if self.configuration == 0 {
            return TransferResult::Nak;
        }
        let report = match self.queue.pop_front() {
            Some(r) => r,
            None => {
                // A non-zero idle rate repeats the current report once the
                // period passed (HID 1.11 §7.2.4).
                let period = std::time::Duration::from_millis(4 * u64::from(self.idle));
                match self.last_sent {
                    Some(t) if self.idle != 0 && t.elapsed() >= period => self.current.clone(),
                    _ => return TransferResult::Nak,
                }
            }
        };
        let n = report.len().min(buf.len());
        buf[..n].copy_from_slice(&report[..n]);
        self.last_sent = Some(Instant::now());
        TransferResult::Data(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setup_packet_round_trips() {
        let s = SetupPacket {
            request_type: 0x80,
            request: 6,
            value: 0x0100,
            index: 0,
            length: 18,
        };
        assert_eq!(s.to_bytes(), [0x80, 6, 0, 1, 0, 0, 18, 0]);
        assert_eq!(SetupPacket::from_bytes(s.to_bytes()), s);
        assert!(s.is_in());
    }

    #[test]
    fn speed_ids_are_the_xhci_defaults() {
        assert_eq!(UsbSpeed::Full.xhci_speed_id(), 1);
        assert_eq!(UsbSpeed::Low.xhci_speed_id(), 2);
        assert_eq!(UsbSpeed::High.xhci_speed_id(), 3);
        assert_eq!(UsbSpeed::Super.xhci_speed_id(), 4);
    }
}
