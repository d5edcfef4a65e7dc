//! A client for one repository of a registry speaking the OCI distribution
//! API (`/v2/...`), with the calls Tart makes (tart-oci.md §6): manifests
//! by tag or digest, blob HEAD/GET (with `Range` to resume), monolithic
//! uploads, and the auth dance after a 401.
//!
//! The registry is a network peer and may be hostile: every body read is
//! bounded, every digest checked by the callers, statuses other than the
//! expected ones become errors that say what the registry answered.

use std::io::{self, Read};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ureq::http::{Response, StatusCode};
use ureq::{Agent, Body};

use crate::auth::{parse_challenge, CredentialSources, Credentials};
use crate::digest::Digest;
use crate::reference::Reference;
use crate::tart::{INDEX_MEDIA_TYPE, MANIFEST_MEDIA_TYPE, MAX_MANIFEST};

/// Attempts of one request when the connection fails or the registry
/// answers 429 or 5xx.
pub const ATTEMPTS: u32 = 5;
const MAX_ERROR_BODY: u64 = 4096;
const MAX_TOKEN_REPLY: u64 = 1 << 20;
/// Longest wait a `Retry-After` may ask for before we give up instead.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{what}: cannot reach {registry}: {source}")]
    Transport {
        what: String,
        registry: String,
        #[source]
        source: Box<ureq::Error>,
    },
    #[error("{what}: {registry} wants credentials (401); log in with `docker login {registry}` or set VMAPPLE_REGISTRY_USERNAME and VMAPPLE_REGISTRY_PASSWORD")]
    Unauthorized { what: String, registry: String },
    #[error("{what}: {registry} refused access (403){detail}")]
    Forbidden {
        what: String,
        registry: String,
        detail: String,
    },
    #[error("{what}: not found on {registry} (404){detail}")]
    NotFound {
        what: String,
        registry: String,
        detail: String,
    },
    #[error("{what}: {registry} keeps answering 429 Too Many Requests; try again later")]
    RateLimited { what: String, registry: String },
    #[error("{what}: {registry} answered {status}{detail}")]
    Status {
        what: String,
        registry: String,
        status: u16,
        detail: String,
    },
    #[error("{what}: {registry} sent a bad reply: {message}")]
    Protocol {
        what: String,
        registry: String,
        message: String,
    },
    #[error(transparent)]
    Credentials(#[from] crate::auth::CredentialsError),
}

impl RegistryError {
    /// Worth another attempt later (the pull can resume).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            RegistryError::Transport { .. }
                | RegistryError::RateLimited { .. }
                | RegistryError::Status {
                    status: 500..=599,
                    ..
                }
        )
    }
}

/// How to reach a registry.
#[derive(Debug, Clone, Default)]
pub struct ClientOptions {
    /// Plain HTTP instead of HTTPS.
    pub insecure: bool,
    pub credentials: CredentialSources,
    /// Pause before the first retry; doubled for each later one.
    pub backoff: Duration,
}

impl ClientOptions {
    pub fn new(insecure: bool) -> Self {
        ClientOptions {
            insecure,
            credentials: CredentialSources::from_env(),
            backoff: Duration::from_millis(500),
        }
    }
}

/// A manifest as fetched: its exact bytes and their digest.
#[derive(Debug, Clone)]
pub struct FetchedManifest {
    pub bytes: Vec<u8>,
    pub digest: Digest,
}

/// Makes one attempt of a request, given the `Authorization` value to send.
pub type MakeRequest<'a> =
    dyn FnMut(&Agent, Option<&str>) -> Result<Response<Body>, ureq::Error> + 'a;

/// Makes the body of an upload afresh for each attempt.
pub type MakeBody<'a> = dyn FnMut() -> io::Result<Box<dyn Read + Send>> + 'a;

pub struct Client {
    agent: Agent,
    /// `http[s]://host[:port]`
    origin: String,
    registry: String,
    repository: String,
    push: bool,
    backoff: Duration,
    sources: CredentialSources,
    credentials: Mutex<Option<Option<Credentials>>>,
    /// The `Authorization` value to send, once a challenge set it.
    authorization: Mutex<Option<(String, Option<Instant>)>>,
}

fn header<'a>(r: &'a Response<Body>, name: &str) -> Option<&'a str> {
    r.headers().get(name).and_then(|v| v.to_str().ok())
}

/// Reads at most `limit` bytes of a body; more is an error.
fn read_bounded(resp: &mut Response<Body>, limit: u64) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    resp.body_mut()
        .as_reader()
        .take(limit + 1)
        .read_to_end(&mut out)?;
    if out.len() as u64 > limit {
        return Err(io::Error::other(format!("more than {limit} bytes")));
    }
    Ok(out)
}

/// The registry's own words for an error, from the distribution spec's
/// `{"errors":[{"code","message"}]}` body, bounded and on one line.
fn error_detail(resp: &mut Response<Body>) -> String {
    let Ok(body) = read_bounded(resp, MAX_ERROR_BODY) else {
        return String::new();
    };
    let text = match serde_json::from_slice::<serde_json::Value>(&body) {
        Ok(v) => v["errors"]
            .as_array()
            .map(|errs| {
                errs.iter()
                    .filter_map(|e| {
                        let code = e["code"].as_str().unwrap_or("");
                        let msg = e["message"].as_str().unwrap_or("");
                        (!code.is_empty() || !msg.is_empty()).then(|| format!("{code} {msg}"))
                    })
                    .collect::<Vec<_>>()
                    .join("; ")
            })
            .unwrap_or_default(),
        Err(_) => String::new(),
    };
    let text: String = text.chars().filter(|c| !c.is_control()).take(300).collect();
    if text.trim().is_empty() {
        String::new()
    } else {
        format!(": {}", text.trim())
    }
}

/// Joins a `Location` header (absolute, or relative to the registry) and
/// appends the digest to its query.
fn upload_url(origin: &str, location: &str, digest: &Digest) -> String {
    let base = if location.starts_with("http://") || location.starts_with("https://") {
        location.to_string()
    } else if location.starts_with('/') {
        format!("{origin}{location}")
    } else {
        format!("{origin}/{location}")
    };
    let sep = if base.contains('?') { '&' } else { '?' };
    format!("{base}{sep}digest=sha256%3A{}", digest.hex())
}

impl Client {
    pub fn new(
        reference: &Reference,
        push: bool,
        options: &ClientOptions,
    ) -> Result<Client, RegistryError> {
        let scheme = if options.insecure { "http" } else { "https" };
        let config = Agent::config_builder()
            .tls_config(tls_config())
            .http_status_as_error(false)
            .user_agent(concat!("vmapple/", env!("CARGO_PKG_VERSION")))
            .timeout_connect(Some(Duration::from_secs(30)))
            .timeout_recv_response(Some(Duration::from_secs(120)))
            .timeout_per_read(Some(Duration::from_secs(120)))
            .max_redirects(5)
            .build();
        Ok(Client {
            agent: Agent::new_with_config(config),
            origin: format!("{scheme}://{}", reference.registry),
            registry: reference.registry.clone(),
            repository: reference.repository.clone(),
            push,
            backoff: options.backoff,
            sources: options.credentials.clone(),
            credentials: Mutex::new(None),
            authorization: Mutex::new(None),
        })
    }

    pub fn registry(&self) -> &str {
        &self.registry
    }

    fn url(&self, tail: &str) -> String {
        format!("{}/v2/{}/{tail}", self.origin, self.repository)
    }

    fn credentials(&self) -> Result<Option<Credentials>, RegistryError> {
        let mut c = self.credentials.lock().unwrap_or_else(|p| p.into_inner());
        if c.is_none() {
            *c = Some(self.sources.lookup(&self.registry)?);
        }
        Ok(c.clone().flatten())
    }

    fn current_authorization(&self) -> Option<String> {
        let a = self.authorization.lock().unwrap_or_else(|p| p.into_inner());
        match &*a {
            Some((value, expiry)) if expiry.is_none_or(|t| Instant::now() < t) => {
                Some(value.clone())
            }
            _ => None,
        }
    }

    fn protocol(&self, what: &str, message: impl Into<String>) -> RegistryError {
        RegistryError::Protocol {
            what: what.into(),
            registry: self.registry.clone(),
            message: message.into(),
        }
    }

    /// Answers a 401: Basic with the stored credentials, or a token from
    /// the Bearer challenge's realm.
    fn authenticate(&self, what: &str, resp: &Response<Body>) -> Result<(), RegistryError> {
        let unauthorized = || RegistryError::Unauthorized {
            what: what.into(),
            registry: self.registry.clone(),
        };
        let challenge = header(resp, "www-authenticate")
            .and_then(parse_challenge)
            .ok_or_else(unauthorized)?;
        let creds = self.credentials()?;
        let value = match challenge.scheme.as_str() {
            "basic" => (creds.ok_or_else(unauthorized)?.basic_header(), None),
            "bearer" => self.fetch_token(what, &challenge.params, creds.as_ref())?,
            other => {
                return Err(self.protocol(what, format!("unknown auth scheme {other:?}")));
            }
        };
        *self.authorization.lock().unwrap_or_else(|p| p.into_inner()) = Some((value.0, value.1));
        Ok(())
    }

    fn fetch_token(
        &self,
        what: &str,
        params: &std::collections::HashMap<String, String>,
        creds: Option<&Credentials>,
    ) -> Result<(String, Option<Instant>), RegistryError> {
        let realm = params
            .get("realm")
            .filter(|r| r.starts_with("https://") || r.starts_with("http://"))
            .ok_or_else(|| self.protocol(what, "a Bearer challenge without an http(s) realm"))?;
        if realm.starts_with("http://") && creds.is_some() && self.origin.starts_with("https://") {
            return Err(self.protocol(
                what,
                format!("the token service {realm} is plain HTTP; not sending credentials there"),
            ));
        }
        let actions = if self.push { "pull,push" } else { "pull" };
        let scope = params
            .get("scope")
            .cloned()
            .unwrap_or_else(|| format!("repository:{}:{actions}", self.repository));
        let mut req = self.agent.get(realm.as_str()).query("scope", &scope);
        if let Some(service) = params.get("service") {
            req = req.query("service", service);
        }
        if let Some(c) = creds {
            req = req.header("Authorization", c.basic_header());
        }
        let mut resp = req.call().map_err(|e| RegistryError::Transport {
            what: format!("{what} (token from {realm})"),
            registry: self.registry.clone(),
            source: Box::new(e),
        })?;
        match resp.status().as_u16() {
            200 => {}
            401 => {
                return Err(RegistryError::Unauthorized {
                    what: what.into(),
                    registry: self.registry.clone(),
                })
            }
            s => {
                return Err(RegistryError::Status {
                    what: format!("{what} (token from {realm})"),
                    registry: self.registry.clone(),
                    status: s,
                    detail: error_detail(&mut resp),
                })
            }
        }
        let body = read_bounded(&mut resp, MAX_TOKEN_REPLY)
            .map_err(|e| self.protocol(what, format!("token reply: {e}")))?;
        #[derive(serde::Deserialize)]
        struct Reply {
            token: Option<String>,
            access_token: Option<String>,
            expires_in: Option<u64>,
        }
        let r: Reply = serde_json::from_slice(&body)
            .map_err(|e| self.protocol(what, format!("token reply: {e}")))?;
        let token = r
            .token
            .or(r.access_token)
            .filter(|t| !t.is_empty() && !t.contains(['\r', '\n']))
            .ok_or_else(|| self.protocol(what, "token reply without a token"))?;
        // Renew a little early; the spec's default lifetime is 60 s.
        let life = Duration::from_secs(r.expires_in.unwrap_or(60).clamp(10, 86_400));
        Ok((
            format!("Bearer {token}"),
            Some(Instant::now() + life - Duration::from_secs(5)),
        ))
    }

    /// Sends a request made by `make` (called again for each attempt, with
    /// the `Authorization` value to use), authenticating after a 401 and
    /// retrying transport errors, 429 and 5xx with backoff. Returns the
    /// first response of any other status.
    pub fn send(
        &self,
        what: &str,
        make: &mut MakeRequest,
    ) -> Result<Response<Body>, RegistryError> {
        let mut authenticated = false;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let auth = self.current_authorization();
            let mut wait = self.backoff * 2u32.saturating_pow(attempt - 1);
            match make(&self.agent, auth.as_deref()) {
                Err(e) => {
                    if attempt >= ATTEMPTS || !transient(&e) {
                        return Err(RegistryError::Transport {
                            what: what.into(),
                            registry: self.registry.clone(),
                            source: Box::new(e),
                        });
                    }
                    tracing::warn!("{what}: {e}; retrying");
                }
                Ok(resp) if resp.status() == StatusCode::UNAUTHORIZED && !authenticated => {
                    authenticated = true;
                    self.authenticate(what, &resp)?;
                    attempt -= 1;
                    continue;
                }
                Ok(mut resp) => {
                    let status = resp.status().as_u16();
                    let retry = status == 429 || (500..=599).contains(&status);
                    if !retry {
                        return Ok(resp);
                    }
                    if let Some(after) = header(&resp, "retry-after")
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(Duration::from_secs)
                    {
                        wait = wait.max(after);
                    }
                    if attempt >= ATTEMPTS || wait > MAX_RETRY_AFTER {
                        if status == 429 {
                            return Err(RegistryError::RateLimited {
                                what: what.into(),
                                registry: self.registry.clone(),
                            });
                        }
                        return Ok(resp);
                    }
                    let detail = error_detail(&mut resp);
                    tracing::warn!(
                        "{what}: {} answered {status}{detail}; retrying",
                        self.registry
                    );
                }
            }
            std::thread::sleep(wait);
        }
    }

    /// Turns a non-success response into the error that says why.
    pub fn status_error(&self, what: &str, mut resp: Response<Body>) -> RegistryError {
        let registry = self.registry.clone();
        let what = what.to_string();
        let detail = error_detail(&mut resp);
        match resp.status().as_u16() {
            401 => RegistryError::Unauthorized { what, registry },
            403 => RegistryError::Forbidden {
                what,
                registry,
                detail,
            },
            404 => RegistryError::NotFound {
                what,
                registry,
                detail,
            },
            429 => RegistryError::RateLimited { what, registry },
            status => RegistryError::Status {
                what,
                registry,
                status,
                detail,
            },
        }
    }

    /// GETs a manifest by tag or digest; bounded, and checked against the
    /// digest when fetched by one.
    pub fn get_manifest(&self, reference: &Reference) -> Result<FetchedManifest, RegistryError> {
        let target = reference.target_str();
        let what = format!("manifest {reference}");
        let url = self.url(&format!("manifests/{target}"));
        let mut resp = self.send(&what, &mut |agent, auth| {
            let mut r = agent.get(&url).header(
                "Accept",
                format!("{MANIFEST_MEDIA_TYPE}, {INDEX_MEDIA_TYPE}"),
            );
            if let Some(a) = auth {
                r = r.header("Authorization", a);
            }
            r.call()
        })?;
        if resp.status() != StatusCode::OK {
            return Err(self.status_error(&what, resp));
        }
        let bytes = read_bounded(&mut resp, MAX_MANIFEST)
            .map_err(|e| self.protocol(&what, format!("reading the manifest: {e}")))?;
        let digest = Digest::of(&bytes);
        if let crate::reference::Target::Digest(want) = &reference.target {
            if *want != digest {
                return Err(self.protocol(
                    &what,
                    format!("the manifest's sha256 is {digest}, not the {want} asked for"),
                ));
            }
        }
        Ok(FetchedManifest { bytes, digest })
    }

    /// Whether the repository has the blob.
    pub fn has_blob(&self, digest: &Digest) -> Result<bool, RegistryError> {
        let what = format!("blob {digest}");
        let url = self.url(&format!("blobs/{digest}"));
        let resp = self.send(&what, &mut |agent, auth| {
            let mut r = agent.head(&url);
            if let Some(a) = auth {
                r = r.header("Authorization", a);
            }
            r.call()
        })?;
        match resp.status().as_u16() {
            200 => Ok(true),
            404 => Ok(false),
            _ => Err(self.status_error(&what, resp)),
        }
    }

    /// GETs a blob from byte `from` on. Returns the body positioned at
    /// `from`: a registry that ignores `Range` and answers 200 is refused
    /// for `from > 0` (the caller then starts over).
    pub fn get_blob(&self, digest: &Digest, from: u64) -> Result<Response<Body>, RegistryError> {
        let what = format!("blob {digest}");
        let url = self.url(&format!("blobs/{digest}"));
        let resp = self.send(&what, &mut |agent, auth| {
            let mut r = agent.get(&url);
            if from > 0 {
                r = r.header("Range", format!("bytes={from}-"));
            }
            if let Some(a) = auth {
                r = r.header("Authorization", a);
            }
            r.call()
        })?;
        match (resp.status().as_u16(), from) {
            (200, 0) => Ok(resp),
            (206, f) if f > 0 => {
                let start = header(&resp, "content-range")
                    .and_then(|v| v.strip_prefix("bytes "))
                    .and_then(|v| v.split('-').next())
                    .and_then(|s| s.parse::<u64>().ok());
                if start != Some(from) {
                    return Err(self.protocol(
                        &what,
                        format!("asked for bytes from {from}, got Content-Range {start:?}"),
                    ));
                }
                Ok(resp)
            }
            (200, _) => Err(self.protocol(
                &what,
                "the registry does not resume downloads (no 206 for Range)",
            )),
            _ => Err(self.status_error(&what, resp)),
        }
    }

    /// Uploads a blob of `size` bytes in one PUT (POST, then PUT to the
    /// returned location with the digest). `body` makes the bytes afresh
    /// for each attempt.
    pub fn upload_blob(
        &self,
        digest: &Digest,
        size: u64,
        body: &mut MakeBody,
    ) -> Result<(), RegistryError> {
        let what = format!("uploading blob {digest}");
        let start_url = self.url("blobs/uploads/");
        let mut attempt = 0;
        loop {
            attempt += 1;
            let resp = self.send(&what, &mut |agent, auth| {
                let mut r = agent.post(&start_url).header("Content-Length", "0");
                if let Some(a) = auth {
                    r = r.header("Authorization", a);
                }
                r.send_empty()
            })?;
            if resp.status() != StatusCode::ACCEPTED {
                return Err(self.status_error(&what, resp));
            }
            let location = header(&resp, "location")
                .ok_or_else(|| self.protocol(&what, "202 without a Location"))?;
            let url = upload_url(&self.origin, location, digest);
            let mut io_error = None;
            let result = self.send(&what, &mut |agent, auth| {
                let reader = match body() {
                    Ok(r) => r,
                    Err(e) => {
                        let msg = e.to_string();
                        io_error = Some(e);
                        return Err(ureq::Error::Io(io::Error::other(msg)));
                    }
                };
                let mut r = agent
                    .put(&url)
                    .header("Content-Type", "application/octet-stream")
                    .header("Content-Length", size.to_string());
                if let Some(a) = auth {
                    r = r.header("Authorization", a);
                }
                r.send(ureq::SendBody::from_owned_reader(reader))
            });
            if let Some(e) = io_error {
                return Err(self.protocol(&what, format!("reading the data to upload: {e}")));
            }
            let resp = result?;
            match resp.status().as_u16() {
                201 => return Ok(()),
                // An upload session the registry forgot (it restarted, say):
                // start a new one.
                404 if attempt < ATTEMPTS => continue,
                _ => return Err(self.status_error(&what, resp)),
            }
        }
    }

    /// PUTs a manifest under a tag; returns the digest the registry has it
    /// under.
    pub fn put_manifest(&self, tag: &str, bytes: &[u8]) -> Result<Digest, RegistryError> {
        let what = format!("manifest {}/{}:{tag}", self.registry, self.repository);
        let url = self.url(&format!("manifests/{tag}"));
        let resp = self.send(&what, &mut |agent, auth| {
            let mut r = agent.put(&url).header("Content-Type", MANIFEST_MEDIA_TYPE);
            if let Some(a) = auth {
                r = r.header("Authorization", a);
            }
            r.send(bytes)
        })?;
        if resp.status() != StatusCode::CREATED {
            return Err(self.status_error(&what, resp));
        }
        Ok(Digest::of(bytes))
    }
}

#[cfg(not(target_os = "macos"))]
fn tls_config() -> ureq::tls::TlsConfig {
    ureq::tls::TlsConfig::default()
}

#[cfg(target_os = "macos")]
fn tls_config() -> ureq::tls::TlsConfig {
    ureq::tls::TlsConfig::builder()
        .provider(ureq::tls::TlsProvider::NativeTls)
        .root_certs(ureq::tls::RootCerts::PlatformVerifier)
        .build()
}

/// Connection-level failures worth another attempt.
fn transient(e: &ureq::Error) -> bool {
    matches!(
        e,
        ureq::Error::Io(_)
            | ureq::Error::Timeout(_)
            | ureq::Error::ConnectionFailed
            | ureq::Error::HostNotFound
            | ureq::Error::Protocol(_)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_locations_resolve_and_carry_the_digest() {
        let d = Digest::of(b"x");
        let hex = d.hex();
        assert_eq!(
            upload_url("http://h:5000", "/v2/a/blobs/uploads/u1?_state=s", &d),
            format!("http://h:5000/v2/a/blobs/uploads/u1?_state=s&digest=sha256%3A{hex}")
        );
        assert_eq!(
            upload_url("http://h:5000", "https://s3.example/up", &d),
            format!("https://s3.example/up?digest=sha256%3A{hex}")
        );
    }
}
