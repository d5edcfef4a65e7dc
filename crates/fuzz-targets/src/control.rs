//! The control-socket request parser: any bytes a local client sends.

use bundle::control::{parse_request, parse_server_line, ErrorClass, Response, ServerMessage};

use crate::Report;

/// Longest error text a reply may carry: errors echo at most a few dozen
/// characters of what the client sent, so a huge line must not come back
/// in full.
pub const MAX_ERROR_TEXT: usize = 1024;

/// `parse_request` on one line. A request that parses must survive a round
/// trip through its own serialisation; an error must become a one-line
/// reply a client can parse back to the same class.
pub fn control_request(data: &[u8]) -> Report {
    let mut report = Report {
        ops: 1,
        ..Report::default()
    };
    match parse_request(data) {
        Ok(req) => {
            let line = req.to_line();
            assert_eq!(line.matches('\n').count(), 1, "request line {line:?}");
            assert_eq!(parse_request(line.as_bytes()), Ok(req), "round trip");
            report.completions = 1;
        }
        Err(e) => {
            let class = e.class();
            assert_eq!(ErrorClass::from_name(class.name()), Some(class));
            let text = e.to_string();
            assert!(
                text.len() <= MAX_ERROR_TEXT,
                "{}-byte error for a {}-byte line",
                text.len(),
                data.len()
            );
            let reply = Response::from(e).to_line();
            assert_eq!(reply.matches('\n').count(), 1, "reply {reply:?}");
            match parse_server_line(reply.as_bytes()) {
                Ok(ServerMessage::Response(Response::Error { class: c, desc })) => {
                    assert_eq!((c, desc), (class, text), "reply round trip");
                }
                other => panic!("reply {reply:?} parsed as {other:?}"),
            }
        }
    }
    report
}
