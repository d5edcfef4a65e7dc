//! Registry credentials and `WWW-Authenticate` challenges, the way
//! container tools find and use them (tart-oci.md §6.2):
//!
//! 1. `VMAPPLE_REGISTRY_USERNAME` and `VMAPPLE_REGISTRY_PASSWORD`, for the
//!    host in `VMAPPLE_REGISTRY_HOSTNAME` or, when that is unset, any host;
//! 2. the Docker CLI's `config.json` (`$DOCKER_CONFIG/config.json`, else
//!    `~/.docker/config.json`): `auths.HOST.auth` (base64 `user:password`),
//!    then `credHelpers.HOST`, then `credsStore`, each helper being the
//!    `docker-credential-NAME` program asked with `get`.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use base64::Engine;

#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "Credentials({}, <hidden>)", self.username)
    }
}

impl Credentials {
    pub fn basic_header(&self) -> String {
        let raw = format!("{}:{}", self.username, self.password);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("{path}: {message}")]
    DockerConfig { path: String, message: String },
    #[error("credential helper docker-credential-{helper}: {message}")]
    Helper { helper: String, message: String },
}

/// Where to look; the environment is passed in so tests need not change
/// the process's.
#[derive(Debug, Clone, Default)]
pub struct CredentialSources {
    pub env_username: Option<String>,
    pub env_password: Option<String>,
    pub env_hostname: Option<String>,
    pub docker_config: Option<PathBuf>,
}

impl CredentialSources {
    pub fn from_env() -> Self {
        let var = |k| std::env::var(k).ok().filter(|v: &String| !v.is_empty());
        let docker_config = var("DOCKER_CONFIG")
            .map(PathBuf::from)
            .or_else(|| var("HOME").map(|h| PathBuf::from(h).join(".docker")))
            .map(|d| d.join("config.json"));
        CredentialSources {
            env_username: var("VMAPPLE_REGISTRY_USERNAME"),
            env_password: var("VMAPPLE_REGISTRY_PASSWORD"),
            env_hostname: var("VMAPPLE_REGISTRY_HOSTNAME"),
            docker_config,
        }
    }

    /// The credentials for `host` (`host[:port]`), if any source has them.
    pub fn lookup(&self, host: &str) -> Result<Option<Credentials>, CredentialsError> {
        if let (Some(u), Some(p)) = (&self.env_username, &self.env_password) {
            if self.env_hostname.as_deref().is_none_or(|h| h == host) {
                return Ok(Some(Credentials {
                    username: u.clone(),
                    password: p.clone(),
                }));
            }
        }
        let Some(path) = &self.docker_config else {
            return Ok(None);
        };
        let text = match std::fs::read(path) {
            Ok(t) if t.len() <= 1 << 20 => t,
            Ok(_) => {
                return Err(CredentialsError::DockerConfig {
                    path: path.display().to_string(),
                    message: "larger than 1 MiB".into(),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(CredentialsError::DockerConfig {
                    path: path.display().to_string(),
                    message: e.to_string(),
                })
            }
        };
        let config: DockerConfig =
            serde_json::from_slice(&text).map_err(|e| CredentialsError::DockerConfig {
                path: path.display().to_string(),
                message: e.to_string(),
            })?;
        let bad = |message: String| CredentialsError::DockerConfig {
            path: path.display().to_string(),
            message,
        };
        // Docker keys entries by host, sometimes as a URL.
        let entry = config.auths.iter().find_map(|(k, v)| {
            let key = k
                .trim_start_matches("https://")
                .trim_start_matches("http://");
            let key = key.split('/').next().unwrap_or(key);
            (key == host).then_some(v)
        });
        if let Some(entry) = entry {
            if let Some(auth) = entry.auth.as_deref().filter(|a| !a.is_empty()) {
                let raw = base64::engine::general_purpose::STANDARD
                    .decode(auth.trim())
                    .map_err(|_| bad(format!("auths.{host}.auth is not base64")))?;
                let raw = String::from_utf8(raw)
                    .map_err(|_| bad(format!("auths.{host}.auth is not UTF-8")))?;
                let (u, p) = raw
                    .split_once(':')
                    .ok_or_else(|| bad(format!("auths.{host}.auth is not user:password")))?;
                return Ok(Some(Credentials {
                    username: u.into(),
                    password: p.into(),
                }));
            }
            if let (Some(u), Some(p)) = (&entry.username, &entry.password) {
                return Ok(Some(Credentials {
                    username: u.clone(),
                    password: p.clone(),
                }));
            }
        }
        let helper = config
            .cred_helpers
            .get(host)
            .or(config.creds_store.as_ref());
        match helper {
            Some(h) => run_helper(h, host),
            None => Ok(None),
        }
    }
}

#[derive(serde::Deserialize, Default)]
struct DockerConfig {
    #[serde(default)]
    auths: HashMap<String, AuthEntry>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: HashMap<String, String>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
}

#[derive(serde::Deserialize, Default)]
struct AuthEntry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
}

fn run_helper(helper: &str, host: &str) -> Result<Option<Credentials>, CredentialsError> {
    let err = |message: String| CredentialsError::Helper {
        helper: helper.into(),
        message,
    };
    if helper.is_empty()
        || !helper
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
    {
        return Err(err("not a helper name".into()));
    }
    let mut child = Command::new(format!("docker-credential-{helper}"))
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| err(e.to_string()))?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(host.as_bytes());
    }
    let out = child.wait_with_output().map_err(|e| err(e.to_string()))?;
    if !out.status.success() {
        let text = String::from_utf8_lossy(&out.stdout);
        // The protocol's answer for "no credentials for this host".
        if text.contains("credentials not found") {
            return Ok(None);
        }
        return Err(err(format!("exited with {}: {}", out.status, text.trim())));
    }
    #[derive(serde::Deserialize)]
    struct Reply {
        #[serde(rename = "Username")]
        username: String,
        #[serde(rename = "Secret")]
        secret: String,
    }
    let r: Reply = serde_json::from_slice(&out.stdout).map_err(|e| err(e.to_string()))?;
    Ok(Some(Credentials {
        username: r.username,
        password: r.secret,
    }))
}

/// A parsed `WWW-Authenticate` header: the scheme and its parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    pub scheme: String,
    pub params: HashMap<String, String>,
}

/// Parses `Bearer realm="https://x/token",service="x",scope="a:b:pull,push"`.
/// Parameter names are lowercased; quoted values may hold commas and
/// backslash escapes.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, mut rest) = match header.split_once(char::is_whitespace) {
        Some((s, r)) => (s, r.trim_start()),
        None => (header, ""),
    };
    if scheme.is_empty() {
        return None;
    }
    let mut params = HashMap::new();
    while !rest.is_empty() {
        let eq = rest.find('=')?;
        let key = rest[..eq].trim().to_ascii_lowercase();
        rest = rest[eq + 1..].trim_start();
        let value;
        if let Some(quoted) = rest.strip_prefix('"') {
            let mut v = String::new();
            let mut chars = quoted.char_indices();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, n)) = chars.next() {
                            v.push(n);
                        }
                    }
                    '"' => {
                        end = Some(i);
                        break;
                    }
                    c => v.push(c),
                }
            }
            let end = end?;
            value = v;
            rest = quoted[end + 1..].trim_start();
        } else {
            let end = rest.find(',').unwrap_or(rest.len());
            value = rest[..end].trim().to_string();
            rest = &rest[end..];
        }
        rest = rest
            .trim_start()
            .strip_prefix(',')
            .unwrap_or(rest)
            .trim_start();
        params.insert(key, value);
    }
    Some(Challenge {
        scheme: scheme.to_ascii_lowercase(),
        params,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_parse_with_quoted_commas() {
        let c = parse_challenge(
            r#"Bearer realm="https://ghcr.io/token",service="ghcr.io",scope="repository:a/b:pull,push""#,
        )
        .unwrap();
        assert_eq!(c.scheme, "bearer");
        assert_eq!(c.params["realm"], "https://ghcr.io/token");
        assert_eq!(c.params["service"], "ghcr.io");
        assert_eq!(c.params["scope"], "repository:a/b:pull,push");

        let c = parse_challenge(r#"Basic realm="Registry Realm""#).unwrap();
        assert_eq!(c.scheme, "basic");
        assert_eq!(c.params["realm"], "Registry Realm");

        let c = parse_challenge("Bearer realm=https://x/t, service=x").unwrap();
        assert_eq!(c.params["realm"], "https://x/t");
        assert_eq!(c.params["service"], "x");
        assert!(parse_challenge(r#"Bearer realm="unterminated"#).is_none());
    }

    fn sources(dir: &std::path::Path, json: &str) -> CredentialSources {
        let path = dir.join("config.json");
        std::fs::write(&path, json).unwrap();
        CredentialSources {
            docker_config: Some(path),
            ..Default::default()
        }
    }

    #[test]
    fn docker_config_auths_are_found_by_host() {
        let dir = tempfile::tempdir().unwrap();
        let s = sources(
            dir.path(),
            r#"{"auths":{"127.0.0.1:5000":{"auth":"dXNlcjpwYTpzcw=="},
                "https://index.docker.io/v1/":{"username":"hub","password":"pw"}}}"#,
        );
        assert_eq!(
            s.lookup("127.0.0.1:5000").unwrap(),
            Some(Credentials {
                username: "user".into(),
                password: "pa:ss".into()
            })
        );
        assert_eq!(
            s.lookup("index.docker.io").unwrap().unwrap().username,
            "hub"
        );
        assert_eq!(s.lookup("ghcr.io").unwrap(), None);
    }

    #[test]
    fn environment_credentials_win_for_their_host() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = sources(dir.path(), r#"{"auths":{"a.io":{"auth":"dTpw"}}}"#);
        s.env_username = Some("env".into());
        s.env_password = Some("secret".into());
        assert_eq!(s.lookup("a.io").unwrap().unwrap().username, "env");
        s.env_hostname = Some("b.io".into());
        assert_eq!(s.lookup("a.io").unwrap().unwrap().username, "u");
        assert_eq!(s.lookup("b.io").unwrap().unwrap().username, "env");
    }

    #[test]
    fn a_broken_docker_config_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let s = sources(dir.path(), "{not json");
        let e = s.lookup("a.io").unwrap_err().to_string();
        assert!(e.contains("config.json"), "{e}");
        let s = sources(
            dir.path(),
            r#"{"credHelpers":{"a.io":"no-such-helper-xyz"}}"#,
        );
        let e = s.lookup("a.io").unwrap_err().to_string();
        assert!(e.contains("docker-credential-no-such-helper-xyz"), "{e}");
    }
}
