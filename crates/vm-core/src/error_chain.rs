//! One line for an error and its causes: `a: b: c`.
//!
//! Errors keep their cause as [`Error::source`] instead of pasting it into
//! their own message; what the user reads is the whole chain on one line.
//! Some errors (from dependencies, or older ones here) do repeat their
//! cause in their message: a cause whose text the line already ends with
//! is not written again.

use std::error::Error;
use std::fmt;

/// Displays `error` and each of its sources, joined by `": "`.
pub struct Chain<'a>(pub &'a (dyn Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut line = self.0.to_string();
        let mut cause = self.0.source();
        // Bounded: a source chain that loops back on itself must not hang
        // the error path.
        for _ in 0..32 {
            let Some(e) = cause else { break };
            let text = e.to_string();
            if !text.is_empty() && !line.ends_with(&text) {
                line.push_str(": ");
                line.push_str(&text);
            }
            cause = e.source();
        }
        f.write_str(&line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot open the disk")]
    struct Open(#[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("--root")]
    struct Root(#[source] Open);

    #[derive(Debug, thiserror::Error)]
    #[error("serial: {0}")]
    struct Pasted(#[source] std::io::Error);

    #[test]
    fn causes_are_joined_on_one_line() {
        let e = Root(Open(std::io::Error::other("no such file")));
        assert_eq!(
            Chain(&e).to_string(),
            "--root: cannot open the disk: no such file"
        );
    }

    #[test]
    fn a_cause_already_in_the_message_is_not_repeated() {
        let e = Pasted(std::io::Error::other("denied"));
        assert_eq!(Chain(&e).to_string(), "serial: denied");
    }
}
