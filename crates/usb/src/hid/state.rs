//! The HID devices' state in a snapshot: what the host's driver set
//! (configuration, idle rate, protocol, halt), the reports waiting for it
//! and each device's own (keys down, LEDs; pointer position, buttons).
//! Idle repeats start afresh after a restore (the time of the last report
//! sent is not kept).

use super::{HidCore, REPORT_QUEUE_LEN};

/// The class-independent part of a HID device's state.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedHid {
    pub configuration: u8,
    pub remote_wakeup: bool,
    pub idle: u8,
    pub protocol: u8,
    pub halted: bool,
    /// Reports not yet taken by the host, oldest first.
    pub queue: Vec<Vec<u8>>,
    /// The newest report.
    pub current: Vec<u8>,
}

/// A USB device's state, by kind.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SavedDevice {
    Keyboard {
        hid: SavedHid,
        modifiers: u8,
        /// Non-modifier usages down, in press order.
        keys: Vec<u8>,
        leds: u8,
    },
    Tablet {
        hid: SavedHid,
        x: u16,
        y: u16,
        buttons: u8,
    },
}

impl HidCore {
    pub(crate) fn save(&self) -> SavedHid {
        SavedHid {
            configuration: self.configuration,
            remote_wakeup: self.remote_wakeup,
            idle: self.idle,
            protocol: self.protocol,
            halted: self.halted,
            queue: self.queue.iter().cloned().collect(),
            current: self.current.clone(),
        }
    }

    /// Why `saved` is not a state the host's requests could have left,
    /// if it is not.
    pub(crate) fn check(&self, saved: &SavedHid) -> Result<(), String> {
        let len = usize::from(self.ident.report_len);
        if saved.configuration > 1 {
            return Err(format!("configuration {}", saved.configuration));
        }
        // Only a boot device lets the host choose the protocol.
        if saved.protocol > 1 || (!self.ident.boot && saved.protocol != 1) {
            return Err(format!("protocol {}", saved.protocol));
        }
        if saved.queue.len() > REPORT_QUEUE_LEN {
            return Err(format!("{} queued reports", saved.queue.len()));
        }
        if saved.current.len() != len || saved.queue.iter().any(|r| r.len() != len) {
            return Err(format!("reports are {len} bytes long"));
        }
        Ok(())
    }

    /// Puts back a state [`HidCore::check`] accepted.
    pub(crate) fn restore(&mut self, saved: &SavedHid) {
        self.configuration = saved.configuration;
        self.remote_wakeup = saved.remote_wakeup;
        self.idle = saved.idle;
        self.protocol = saved.protocol;
        self.halted = saved.halted;
        self.queue = saved.queue.iter().cloned().collect();
        self.current.clone_from(&saved.current);
        self.last_sent = None;
    }
}
