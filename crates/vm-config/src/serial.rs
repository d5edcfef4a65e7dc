//! The serial console's host end.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::{quote, serde_as_string};

/// Where the console goes on the host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub enum SerialBackend {
    /// The terminal vmapple runs in.
    #[default]
    Stdio,
    /// A file, created or truncated.
    File(PathBuf),
    /// A unix stream socket vmapple listens on.
    Unix(PathBuf),
    /// Discarded.
    None,
}

/// The accepted forms, for error messages and `--help`.
pub const SERIAL_BACKEND_FORMS: &str = "stdio, file:PATH, unix:PATH or none";

/// Why a serial backend was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid serial backend {spec}: {reason} (expected {SERIAL_BACKEND_FORMS})")]
pub struct SerialSpecError {
    spec: String,
    reason: String,
}

impl FromStr for SerialBackend {
    type Err = SerialSpecError;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let fail = |reason: &str| SerialSpecError {
            spec: quote(spec),
            reason: reason.to_owned(),
        };
        let path = |rest: &str, kind: &str| {
            if rest.is_empty() {
                Err(fail(&format!("{kind}: needs a path after the colon")))
            } else {
                Ok(PathBuf::from(rest))
            }
        };
        match spec.split_once(':') {
            None => match spec {
                "stdio" => Ok(Self::Stdio),
                "none" => Ok(Self::None),
                "" => Err(fail("empty")),
                "file" | "unix" => Err(fail(&format!("{spec} needs a path: {spec}:PATH"))),
                _ => Err(fail("unknown backend")),
            },
            Some(("file", rest)) => path(rest, "file").map(Self::File),
            Some(("unix", rest)) => path(rest, "unix").map(Self::Unix),
            Some(("stdio" | "none", _)) => Err(fail("takes no argument")),
            Some(("mon", _)) => Err(fail(
                "QEMU's monitor multiplexer is not supported; `stdio` has the Ctrl-A escapes",
            )),
            Some((kind, _)) => Err(fail(&format!("unknown backend kind {}", quote(kind)))),
        }
    }
}

impl fmt::Display for SerialBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Stdio => f.write_str("stdio"),
            Self::File(path) => write!(f, "file:{}", path.display()),
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
            Self::None => f.write_str("none"),
        }
    }
}

serde_as_string!(SerialBackend, "stdio, file:PATH, unix:PATH or none");

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn every_form_parses_and_round_trips() {
        for (spec, backend) in [
            ("stdio", SerialBackend::Stdio),
            ("none", SerialBackend::None),
            ("file:/tmp/c.log", SerialBackend::File("/tmp/c.log".into())),
            (
                "file:rel/with:colon",
                SerialBackend::File("rel/with:colon".into()),
            ),
            (
                "unix:/run/vm.sock",
                SerialBackend::Unix("/run/vm.sock".into()),
            ),
        ] {
            let parsed: SerialBackend = spec.parse().unwrap();
            assert_eq!(parsed, backend);
            assert_eq!(parsed.to_string(), spec);
            let json = serde_json::to_string(&parsed).unwrap();
            assert_eq!(
                serde_json::from_str::<SerialBackend>(&json).unwrap(),
                backend
            );
        }
    }

    #[test]
    fn bad_backends_say_why() {
        for (spec, reason) in [
            ("", "empty"),
            ("file:", "needs a path"),
            ("unix:", "needs a path"),
            ("file", "needs a path"),
            ("stdio:x", "takes no argument"),
            ("mon:stdio", "monitor"),
            ("tcp:localhost:4444", "unknown backend kind \"tcp\""),
            ("Stdio", "unknown backend"),
            ("pty", "unknown backend"),
        ] {
            let message = spec.parse::<SerialBackend>().unwrap_err().to_string();
            assert!(message.contains(reason), "{spec:?}: {message}");
            assert!(message.contains(SERIAL_BACKEND_FORMS), "{message}");
            assert!(message.contains(&format!("{spec:?}")), "{message}");
        }
        let huge = format!("{}:x", "k".repeat(100_000));
        let message = huge.parse::<SerialBackend>().unwrap_err().to_string();
        assert!(message.len() < 300, "{}", message.len());
    }

    proptest! {
        #[test]
        fn paths_round_trip(path in "[^\0]{1,64}", unix in any::<bool>()) {
            let b = if unix {
                SerialBackend::Unix(path.into())
            } else {
                SerialBackend::File(path.into())
            };
            prop_assert_eq!(b.to_string().parse::<SerialBackend>(), Ok(b.clone()));
            let json = serde_json::to_string(&b).unwrap();
            prop_assert_eq!(serde_json::from_str::<SerialBackend>(&json).unwrap(), b);
        }
    }
}
