//! The VNC server's reading of a client: the 12-byte version string, then
//! client messages (RFC 6143 §7.5) as any network peer may send them, the
//! key and pointer ones turned into input for a head whose size the input
//! chooses.
//!
//! Input: 12 version bytes, the head's width and height (2 bytes each,
//! big-endian, 0 being a head that shows nothing), then messages.

use std::sync::Mutex;

use display::InputSink;
use vm_core::sync::lock;
use vnc::{read_message, ClientMsg, InputState, MAX_CUT_TEXT};

use crate::Report;

/// What the input sink was told, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Key(u8, bool),
    Pointer(u16, u16),
    Buttons(u8),
    Wheel(i8),
}

#[derive(Default)]
struct Recorder(Mutex<Vec<Event>>);

impl InputSink for Recorder {
    fn key(&self, usage: u8, pressed: bool) {
        lock(&self.0).push(Event::Key(usage, pressed));
    }
    fn pointer(&self, x: u16, y: u16) {
        lock(&self.0).push(Event::Pointer(x, y));
    }
    fn buttons(&self, mask: u8) {
        lock(&self.0).push(Event::Buttons(mask));
    }
    fn wheel(&self, delta: i8) {
        lock(&self.0).push(Event::Wheel(delta));
    }
}

/// The target: see the module documentation.
pub fn vnc_client(data: &[u8]) -> Report {
    vnc_client_events(data).0
}

/// [`vnc_client`], with the input events the messages produced. Checks
/// that every message read is within the protocol's bounds, that input
/// stays in the tablet's range and a few calls per message, and that the
/// reader never reads past what the client sent.
pub fn vnc_client_events(data: &[u8]) -> (Report, Vec<Event>) {
    let mut report = Report::default();
    if data.len() < 16 {
        return (report, Vec::new());
    }
    let version: [u8; 12] = data[..12].try_into().expect("12 bytes");
    if let Some(minor) = vnc::parse_version(&version) {
        assert!(matches!(minor, 3 | 7 | 8), "minor {minor}");
        assert!(version.starts_with(b"RFB 003."), "{version:?}");
    }
    let size = (
        u32::from(u16::from_be_bytes([data[12], data[13]])),
        u32::from(u16::from_be_bytes([data[14], data[15]])),
    );
    let mut rest = &data[16..];
    let sink = Recorder::default();
    let mut state = InputState::default();
    while report.ops < crate::input::MAX_ACCESSES as u64 {
        let before = rest.len();
        let msg = match read_message(&mut rest) {
            Ok(Some(m)) => m,
            Ok(None) | Err(_) => break,
        };
        report.ops += 1;
        assert!(rest.len() < before, "a message consumed bytes");
        let calls = lock(&sink.0).len();
        match &msg {
            ClientMsg::SetEncodings(list) => assert!(list.len() <= usize::from(u16::MAX)),
            ClientMsg::CutText(len) => {
                assert!(*len <= MAX_CUT_TEXT);
                assert!(
                    before - rest.len() >= 8 + *len as usize,
                    "the text was read"
                );
            }
            ClientMsg::SetPixelFormat(pf) => {
                assert!(pf.true_colour && matches!(pf.bpp, 8 | 16 | 32), "{pf:?}");
            }
            _ => {}
        }
        state.apply(&sink, size, &msg);
        let events = lock(&sink.0);
        let new = &events[calls..];
        assert!(new.len() <= 4, "{msg:?} made {new:?}");
        for e in new {
            match *e {
                Event::Pointer(x, y) => assert!(x <= 32767 && y <= 32767, "{e:?}"),
                Event::Buttons(m) => assert!(m <= 7, "{e:?}"),
                Event::Wheel(d) => assert!(d == 1 || d == -1, "{e:?}"),
                Event::Key(..) => {}
            }
        }
        report.completions += 1;
    }
    let events = sink.0.into_inner().unwrap_or_else(|e| e.into_inner());
    (report, events)
}
