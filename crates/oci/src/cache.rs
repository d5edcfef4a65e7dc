//! The blob cache: verified blobs by digest (`DIR/sha256/HEX`), shared by
//! every pull, and partial downloads beside them (`HEX.partial`) that a
//! later pull continues with `Range`.
//!
//! A blob is renamed into place only after its sha256 matched, so a file
//! without the `.partial` suffix is always good content.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use ureq::BodyReader;

use crate::digest::{Digest, Hasher};
use crate::registry::{Client, RegistryError, ATTEMPTS};
use crate::tart::Blob;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is being downloaded by another vmapple process", path.display())]
    Busy { path: PathBuf },
}

pub struct BlobCache {
    dir: PathBuf,
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> CacheError + '_ {
    move |source| CacheError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl BlobCache {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        BlobCache { dir: dir.into() }
    }

    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.dir.join("sha256").join(digest.hex())
    }

    fn partial_path(&self, digest: &Digest) -> PathBuf {
        self.dir
            .join("sha256")
            .join(format!("{}.partial", digest.hex()))
    }

    /// The cached blob, if it is there whole.
    pub fn get(&self, blob: &Blob) -> Option<File> {
        let f = File::open(self.path(&blob.digest)).ok()?;
        (f.metadata().ok()?.len() == blob.size).then_some(f)
    }

    /// A reader of the blob that downloads what the cache lacks, appending
    /// it to the partial file; [`Download::finish`] checks the digest and
    /// moves the blob into the cache.
    pub fn download<'a>(&self, client: &'a Client, blob: Blob) -> Result<Download<'a>, CacheError> {
        let dir = self.dir.join("sha256");
        fs::create_dir_all(&dir).map_err(io_at(&dir))?;
        let path = self.partial_path(&blob.digest);
        let partial = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_at(&path))?;
        // SAFETY: flock on a descriptor we own; no memory is involved.
        if unsafe { libc::flock(partial.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(CacheError::Busy { path });
        }
        let have = partial.metadata().map_err(io_at(&path))?.len();
        if have > blob.size {
            partial.set_len(0).map_err(io_at(&path))?;
        }
        let local = File::open(&path).map_err(io_at(&path))?;
        Ok(Download {
            client,
            blob,
            final_path: self.path(&blob.digest),
            path,
            partial,
            local: Some(local),
            remote: None,
            hasher: Hasher::default(),
            pos: 0,
            failures: 0,
            last_error: None,
        })
    }

    /// Makes sure the blob is in the cache; returns its path.
    pub fn fetch(
        &self,
        client: &Client,
        blob: Blob,
        progress: &dyn Fn(u64),
    ) -> Result<PathBuf, DownloadError> {
        if self.get(&blob).is_some() {
            progress(blob.size);
            return Ok(self.path(&blob.digest));
        }
        let mut d = self.download(client, blob)?;
        let mut buf = vec![0u8; 256 << 10];
        loop {
            let n = d.read(&mut buf).map_err(|e| d.error(e))?;
            if n == 0 {
                break;
            }
            progress(n as u64);
        }
        d.finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("blob {digest}: {message}")]
    Failed { digest: Digest, message: String },
    #[error("blob {digest}: the registry sent data whose sha256 is {got}; refusing it")]
    DigestMismatch { digest: Digest, got: Digest },
}

/// See [`BlobCache::download`]. Yields exactly `blob.size` bytes: the
/// partial file's, then the registry's from where that ends. A connection
/// that drops is reopened with `Range` from the byte it stopped at.
pub struct Download<'a> {
    client: &'a Client,
    blob: Blob,
    path: PathBuf,
    final_path: PathBuf,
    partial: File,
    local: Option<File>,
    remote: Option<BodyReader<'static>>,
    hasher: Hasher,
    pos: u64,
    failures: u32,
    /// The registry error that ended the stream, kept for [`Download::error`].
    last_error: Option<RegistryError>,
}

impl Download<'_> {
    fn fail_remote(&mut self, e: RegistryError) -> io::Error {
        let msg = e.to_string();
        self.last_error = Some(e);
        io::Error::other(msg)
    }

    /// The error to report for an I/O error this reader returned: the
    /// registry's, if that is what ended it.
    pub fn error(&mut self, e: io::Error) -> DownloadError {
        if let Some(r) = self.last_error.take() {
            return DownloadError::Registry(r);
        }
        DownloadError::Failed {
            digest: self.blob.digest,
            message: e.to_string(),
        }
    }

    /// Checks the digest and moves the blob into the cache.
    pub fn finish(self) -> Result<PathBuf, DownloadError> {
        if self.pos != self.blob.size {
            return Err(DownloadError::Failed {
                digest: self.blob.digest,
                message: format!("ended after {} of {} bytes", self.pos, self.blob.size),
            });
        }
        let got = self.hasher.finish();
        if got != self.blob.digest {
            let _ = fs::remove_file(&self.path);
            return Err(DownloadError::DigestMismatch {
                digest: self.blob.digest,
                got,
            });
        }
        let io = |source| CacheError::Io {
            path: self.path.clone(),
            source,
        };
        self.partial.sync_all().map_err(io)?;
        fs::rename(&self.path, &self.final_path).map_err(io)?;
        Ok(self.final_path)
    }
}

impl Read for Download<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.blob.size - self.pos;
        if left == 0 || buf.is_empty() {
            return Ok(0);
        }
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        if let Some(local) = &mut self.local {
            let n = local.read(&mut buf[..want])?;
            if n > 0 {
                self.hasher.update(&buf[..n]);
                self.pos += n as u64;
                return Ok(n);
            }
            self.local = None;
        }
        loop {
            if self.remote.is_none() {
                match self.client.get_blob(&self.blob.digest, self.pos) {
                    Ok(resp) => self.remote = Some(resp.into_body().into_reader()),
                    Err(e) => return Err(self.fail_remote(e)),
                }
            }
            let remote = self.remote.as_mut().expect("opened above");
            let failure = match remote.read(&mut buf[..want]) {
                Ok(0) => "the connection ended early".to_string(),
                Ok(n) => {
                    self.partial.write_all(&buf[..n])?;
                    self.hasher.update(&buf[..n]);
                    self.pos += n as u64;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => e.to_string(),
            };
            self.remote = None;
            self.failures += 1;
            if self.failures >= ATTEMPTS {
                return Err(io::Error::other(format!(
                    "downloading from {}: {failure} at byte {} ({} attempts)",
                    self.client.registry(),
                    self.pos,
                    self.failures
                )));
            }
            tracing::warn!(
                "blob {}: {failure} at byte {}; resuming",
                self.blob.digest,
                self.pos
            );
            std::thread::sleep(std::time::Duration::from_millis(
                500 << self.failures.min(6),
            ));
        }
    }
}
