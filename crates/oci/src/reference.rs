//! Image references: `host[:port]/name[/name...][:tag|@sha256:hex]`, the
//! grammar Tart and container tools share (tart-oci.md §7). The host part
//! is required: vmapple has no default registry.

use std::fmt;
use std::str::FromStr;

use crate::digest::Digest;

/// A tag or a manifest digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Tag(String),
    Digest(Digest),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// `host` or `host:port`.
    pub registry: String,
    /// The repository path, e.g. `cirruslabs/macos-sonoma-base`.
    pub repository: String,
    pub target: Target,
}

#[derive(Debug, thiserror::Error)]
#[error("{text:?} is not an image reference ({why}); expected HOST[:PORT]/NAME[:TAG|@sha256:HEX], e.g. ghcr.io/cirruslabs/macos-sonoma-base:latest")]
pub struct ReferenceError {
    text: String,
    why: &'static str,
}

const MAX_LEN: usize = 4096;

fn is_component(s: &str) -> bool {
    // Distribution's path-component grammar: lowercase alphanumerics
    // separated by `.`, `_`, `__` or runs of `-`.
    let b = s.as_bytes();
    !b.is_empty()
        && b[0].is_ascii_lowercase() | b[0].is_ascii_digit()
        && b[b.len() - 1].is_ascii_lowercase() | b[b.len() - 1].is_ascii_digit()
        && b.iter()
            .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"._-".contains(&c))
        && !s.contains("..")
}

fn is_tag(s: &str) -> bool {
    let b = s.as_bytes();
    (1..=128).contains(&b.len())
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|&c| c.is_ascii_alphanumeric() || b"._-".contains(&c))
}

fn is_host(s: &str) -> bool {
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (s, None),
    };
    let host_ok = !host.is_empty()
        && host
            .split('.')
            .all(|l| !l.is_empty() && l.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-'));
    let port_ok = port.is_none_or(|p| p.parse::<u16>().is_ok_and(|n| n != 0));
    host_ok && port_ok
}

impl FromStr for Reference {
    type Err = ReferenceError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let err = |why| ReferenceError {
            text: text.into(),
            why,
        };
        if text.len() > MAX_LEN {
            return Err(err("too long"));
        }
        let (registry, rest) = text
            .split_once('/')
            .ok_or_else(|| err("no registry host"))?;
        if !(registry.contains('.') || registry.contains(':') || registry == "localhost") {
            return Err(err("the first component is not a registry host"));
        }
        if !is_host(registry) {
            return Err(err("bad registry host"));
        }
        let (name, target) = if let Some((name, digest)) = rest.split_once('@') {
            let d = digest
                .parse::<Digest>()
                .map_err(|_| err("bad digest (sha256:<64 lowercase hex>)"))?;
            (name, Target::Digest(d))
        } else {
            match rest.rsplit_once(':') {
                Some((name, tag)) if !tag.contains('/') => {
                    if !is_tag(tag) {
                        return Err(err("bad tag"));
                    }
                    (name, Target::Tag(tag.into()))
                }
                _ => (rest, Target::Tag("latest".into())),
            }
        };
        if !name.split('/').all(is_component) {
            return Err(err("bad repository name"));
        }
        Ok(Reference {
            registry: registry.into(),
            repository: name.into(),
            target,
        })
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        match &self.target {
            Target::Tag(t) => write!(f, ":{t}"),
            Target::Digest(d) => write!(f, "@{d}"),
        }
    }
}

impl Reference {
    /// The tag or digest as it appears in a manifest URL.
    pub fn target_str(&self) -> String {
        match &self.target {
            Target::Tag(t) => t.clone(),
            Target::Digest(d) => d.to_string(),
        }
    }

    /// True for registries on this machine, which may be spoken to over
    /// plain HTTP only when the user says `--insecure`.
    pub fn is_loopback(&self) -> bool {
        let host = self
            .registry
            .rsplit_once(':')
            .map_or(self.registry.as_str(), |(h, _)| h);
        host == "localhost" || host.starts_with("127.")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse_into_registry_repository_and_target() {
        let r: Reference = "ghcr.io/cirruslabs/macos-sonoma-base:latest"
            .parse()
            .unwrap();
        assert_eq!(r.registry, "ghcr.io");
        assert_eq!(r.repository, "cirruslabs/macos-sonoma-base");
        assert_eq!(r.target, Target::Tag("latest".into()));

        let r: Reference = "127.0.0.1:5000/a/b/c".parse().unwrap();
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.repository, "a/b/c");
        assert_eq!(r.to_string(), "127.0.0.1:5000/a/b/c:latest");

        let hex = "ab".repeat(32);
        let r: Reference = format!("localhost:5000/vm@sha256:{hex}").parse().unwrap();
        assert_eq!(r.target_str(), format!("sha256:{hex}"));
        assert!(r.is_loopback());
    }

    #[test]
    fn bad_references_say_what_is_wrong() {
        for (text, why) in [
            ("ubuntu", "no registry host"),
            ("library/ubuntu:22.04", "not a registry host"),
            ("ghcr.io/UPPER", "bad repository name"),
            ("ghcr.io/a:b:c", "bad repository name"),
            ("ghcr.io/a:-x", "bad tag"),
            ("ghcr.io/a@sha256:12", "bad digest"),
            ("ghcr.io:99999/a", "bad registry host"),
            ("ghcr.io/a//b", "bad repository name"),
            ("ghcr.io/../etc", "bad repository name"),
        ] {
            let e = text.parse::<Reference>().unwrap_err().to_string();
            assert!(e.contains(why), "{text}: {e}");
        }
    }
}
