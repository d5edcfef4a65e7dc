//! The control socket of a running VM: JSON lines over a unix stream
//! socket, modelled on QMP.
//!
//! Each request is one JSON object on one line, `{"cmd":"NAME", ...args}`;
//! each reply is one line, `{"ok":VALUE}` or
//! `{"error":{"class":"...","desc":"..."}}`, in request order. After
//! `subscribe` the connection also receives asynchronous events,
//! `{"event":"NAME","timestamp":{"seconds":S,"microseconds":U}}` (plus
//! `"data"` for some), interleaved between replies; a client tells them
//! apart by the top-level key.
//!
//! Whoever can connect can stop the VM, so the socket is created mode 0600
//! and everything a client sends is treated as hostile: lines are bounded
//! ([`MAX_LINE`]), parsing never panics, arguments are range-checked, and a
//! client that stops reading is dropped rather than stalling the VM.
//!
//! [`protocol`] holds the messages and their wire form, [`server`] the
//! listening socket the VMM serves, [`client`] the `vmapple ctl` side.

pub mod client;
pub mod protocol;
pub mod server;

pub use client::{call, Client, ClientError};
pub use protocol::*;
pub use server::{ControlHandler, ControlServer, MAX_CLIENTS, WRITE_TIMEOUT};
