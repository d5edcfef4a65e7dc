//! pvpanic-mmio: the guest's way to tell the VMM it panicked, loaded a
//! crash kernel or wants to be shut down.
//!
//! vmapple-machine.md §12: a 2-byte window at `0x2007_0000`
//! ([`PvPanic::SIZE`]), no interrupt, no registers, nothing to reset.
//!
//! * A read of either byte returns the advertised `events` value,
//!   [`DEFAULT_EVENTS`] = PANICKED | CRASH_LOADED (0x03).
//! * A written byte is one event report. Only the first of its bits in the
//!   order PANICKED > CRASH_LOADED > SHUTDOWN is acted on, through
//!   [`PanicEvents`]; the machine decides what each means (for PANICKED:
//!   exit, pause or carry on, per `--on-panic`). SHUTDOWN is acted on even
//!   though the default `events` does not advertise it, as QEMU does. A
//!   byte of 0 does nothing.
//! * Bits above 0x07 are logged as a guest error once per VMM process, not
//!   once per device or per call site, again as QEMU does; the known bits
//!   of the same byte still act.
//!
//! Accesses are handled a byte at a time (spec §12, derived): a wider read
//! returns `events` in each byte that falls inside the window and 0 in the
//! others, and a wider write reports its bytes that fall inside the
//! window in address order (a 2-byte write of `0x0402` is a CRASH_LOADED
//! report and then a SHUTDOWN report). Offsets past the window are logged
//! and ignored.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vm_core::{guest_error, AccessWidth, MmioDevice};

/// Event bits, in a written byte and in `events`.
pub mod event {
    pub const PANICKED: u8 = 1 << 0;
    pub const CRASH_LOADED: u8 = 1 << 1;
    pub const SHUTDOWN: u8 = 1 << 2;
    /// Every bit the device knows.
    pub const ALL: u8 = PANICKED | CRASH_LOADED | SHUTDOWN;
}

/// What reads return unless the machine advertises otherwise.
pub const DEFAULT_EVENTS: u8 = event::PANICKED | event::CRASH_LOADED;

/// Where the device reports what the guest wrote. Called on the vCPU
/// thread that wrote, with no device lock held.
pub trait PanicEvents: Send + Sync {
    /// PANICKED: the guest kernel panicked.
    fn guest_panicked(&self);
    /// CRASH_LOADED: the guest panicked and is running its crash kernel.
    fn guest_crash_loaded(&self);
    /// SHUTDOWN: the guest asks for an orderly shutdown.
    fn guest_shutdown(&self);
}

/// Whether an unknown event was logged in this process (§12: once per
/// VMM process).
static UNKNOWN_REPORTED: AtomicBool = AtomicBool::new(false);

/// The pvpanic-mmio device.
pub struct PvPanic {
    events: u8,
    sink: Arc<dyn PanicEvents>,
    unknown_reported: &'static AtomicBool,
}

impl std::fmt::Debug for PvPanic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PvPanic")
            .field("events", &self.events)
            .finish()
    }
}

impl PvPanic {
    /// Bytes the device decodes.
    pub const SIZE: u64 = 2;

    /// The device with the default `events` (0x03).
    pub fn new(events: Arc<dyn PanicEvents>) -> Arc<Self> {
        Self::with_events(events, DEFAULT_EVENTS)
    }

    /// The device advertising `advertised` (QEMU's `events` property) to
    /// reads. Writes act on every known bit whatever is advertised.
    pub fn with_events(events: Arc<dyn PanicEvents>, advertised: u8) -> Arc<Self> {
        Arc::new(Self {
            events: advertised,
            sink: events,
            unknown_reported: &UNKNOWN_REPORTED,
        })
    }

    /// One written byte; returns whether it produced the unknown-event log
    /// line.
    fn handle_byte(&self, byte: u8) -> bool {
        let unknown = byte & !event::ALL;
        let logged = unknown != 0 && !self.unknown_reported.swap(true, Ordering::Relaxed);
        if logged {
            guest_error!("pvpanic: unknown event {byte:#x}");
        }
        if byte & event::PANICKED != 0 {
            self.sink.guest_panicked();
        } else if byte & event::CRASH_LOADED != 0 {
            self.sink.guest_crash_loaded();
        } else if byte & event::SHUTDOWN != 0 {
            self.sink.guest_shutdown();
        }
        logged
    }

    /// The window bytes an access of `width` at `offset` covers, as
    /// (position in the access, offset in the window).
    fn bytes(offset: u64, width: AccessWidth) -> impl Iterator<Item = (u64, u64)> {
        (0..width.bytes()).filter_map(move |i| {
            offset
                .checked_add(i)
                .filter(|&o| o < Self::SIZE)
                .map(|o| (i, o))
        })
    }
}

impl MmioDevice for PvPanic {
    fn read(&self, offset: u64, width: AccessWidth) -> u64 {
        if offset >= Self::SIZE {
            guest_error!("pvpanic: {width} read at offset {offset:#x} beyond the window");
            return 0;
        }
        Self::bytes(offset, width).fold(0, |acc, (i, _)| acc | u64::from(self.events) << (8 * i))
    }

    fn write(&self, offset: u64, width: AccessWidth, value: u64) {
        if offset >= Self::SIZE {
            guest_error!(
                "pvpanic: {width} write {value:#x} at offset {offset:#x} beyond the window"
            );
            return;
        }
        let bytes = value.to_le_bytes();
        for (i, _) in Self::bytes(offset, width) {
            // `i` is below the width, at most 8.
            if let Some(&byte) = usize::try_from(i).ok().and_then(|i| bytes.get(i)) {
                self.handle_byte(byte);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use AccessWidth::{Byte, Double, Half, Word};

    #[derive(Default)]
    struct Recorder(Mutex<Vec<&'static str>>);

    impl Recorder {
        fn take(&self) -> Vec<&'static str> {
            std::mem::take(&mut *self.0.lock().unwrap())
        }
    }

    impl PanicEvents for Recorder {
        fn guest_panicked(&self) {
            self.0.lock().unwrap().push("panicked");
        }
        fn guest_crash_loaded(&self) {
            self.0.lock().unwrap().push("crash_loaded");
        }
        fn guest_shutdown(&self) {
            self.0.lock().unwrap().push("shutdown");
        }
    }

    /// A device with its own "already logged" flag, so tests do not depend
    /// on each other through the process-wide one.
    fn rig() -> (Arc<PvPanic>, Arc<Recorder>) {
        let rec = Arc::new(Recorder::default());
        let dev = Arc::new(PvPanic {
            events: DEFAULT_EVENTS,
            sink: rec.clone(),
            unknown_reported: Box::leak(Box::new(AtomicBool::new(false))),
        });
        (dev, rec)
    }

    /// §20.6 item 54.
    #[test]
    fn both_bytes_read_the_events() {
        let (dev, rec) = rig();
        assert_eq!(dev.read(0, Byte), 0x03);
        assert_eq!(dev.read(1, Byte), 0x03);
        assert_eq!(dev.read(0, Half), 0x0303);
        assert_eq!(rec.take(), Vec::<&str>::new(), "reads report nothing");
        let custom = PvPanic::with_events(rec.clone(), 0x07);
        assert_eq!(custom.read(1, Byte), 0x07);
    }

    /// §20.6 item 55.
    #[test]
    fn each_event_reaches_the_machine_with_priority() {
        let (dev, rec) = rig();
        for (byte, expected) in [
            (0x01, vec!["panicked"]),
            (0x02, vec!["crash_loaded"]),
            (0x04, vec!["shutdown"]),
            (0x03, vec!["panicked"]),
            (0x06, vec!["crash_loaded"]),
            (0x07, vec!["panicked"]),
            (0x00, vec![]),
        ] {
            dev.write(0, Byte, byte);
            assert_eq!(rec.take(), expected, "byte {byte:#x}");
        }
        dev.write(1, Byte, 0x04);
        assert_eq!(rec.take(), ["shutdown"], "the second byte works alike");
        assert_eq!(dev.read(0, Byte), 0x03, "no state");
    }

    /// §20.6 item 55, last clause.
    #[test]
    fn unknown_bits_are_logged_once_and_known_bits_still_act() {
        let (dev, rec) = rig();
        assert!(dev.handle_byte(0x08), "first unknown event is logged");
        assert!(!dev.handle_byte(0x10), "later ones are not");
        assert!(!dev.handle_byte(0x08));
        assert_eq!(rec.take(), Vec::<&str>::new());
        assert!(!dev.handle_byte(0x01), "known bits are never logged");
        dev.write(0, Byte, 0x81);
        assert_eq!(rec.take(), ["panicked", "panicked"]);
    }

    #[test]
    fn the_process_wide_flag_is_shared_by_all_devices() {
        let rec = Arc::new(Recorder::default());
        let a = PvPanic::new(rec.clone());
        let b = PvPanic::new(rec.clone());
        a.write(0, Byte, 0x40);
        assert!(UNKNOWN_REPORTED.load(Ordering::Relaxed));
        assert!(!b.handle_byte(0x40), "already logged by another device");
    }

    #[test]
    fn wide_writes_are_bytes_in_address_order() {
        let (dev, rec) = rig();
        dev.write(0, Half, 0x0402);
        assert_eq!(rec.take(), ["crash_loaded", "shutdown"]);
        // Bytes past the window are dropped.
        dev.write(0, Word, 0x0101_0402);
        assert_eq!(rec.take(), ["crash_loaded", "shutdown"]);
        dev.write(1, Half, 0x0201);
        assert_eq!(rec.take(), ["panicked"]);
        dev.write(0, Double, u64::MAX);
        assert_eq!(rec.take(), ["panicked", "panicked"]);
        assert_eq!(dev.read(0, Double), 0x0303);
        assert_eq!(dev.read(1, Word), 0x03);
    }

    #[test]
    fn hostile_accesses_do_not_panic() {
        let (dev, rec) = rig();
        for offset in (0..0x1000).chain([u64::MAX - 1, u64::MAX]) {
            for width in [Byte, Half, Word, Double] {
                dev.write(offset, width, 0);
                let value = dev.read(offset, width);
                if offset >= PvPanic::SIZE {
                    assert_eq!(value, 0);
                }
            }
        }
        assert_eq!(rec.take(), Vec::<&str>::new(), "zero bytes report nothing");
        dev.write(2, Byte, 0x01);
        dev.write(u64::MAX, Double, 0x01);
        assert_eq!(rec.take(), Vec::<&str>::new(), "outside the window");
    }
}
