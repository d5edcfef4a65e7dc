//! Pushing a VM in Tart's layout (tart-oci.md §8.b): config layer, disk
//! cut into 512 MiB chunks each compressed with Apple's LZ4 framing,
//! NVRAM layer, the stub OCI config, then the manifest under each tag.
//!
//! Memory stays bounded whatever the disk size: a chunk is read twice,
//! once to learn its digests (the registry may have it already) and once
//! more, compressed on the fly, as the upload's body.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::applelz4::EncodeReader;
use crate::digest::{digest_reader, Digest, Hasher};
use crate::reference::{Reference, Target};
use crate::registry::{Client, ClientOptions, MakeBody, RegistryError};
use crate::tart::{self, Blob, DiskLayer, ManifestParts};
use crate::Progress;

#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0}: push needs a tag, not a digest")]
    DigestTarget(String),
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> PushError + '_ {
    move |source| PushError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What to push.
pub struct PushSource {
    /// Tart's config.json, pushed as it is.
    pub config_json: Vec<u8>,
    pub disk: PathBuf,
    pub nvram: PathBuf,
    /// For the stub OCI config: `arm64`, `darwin`.
    pub arch: String,
    pub os: String,
    pub labels: Vec<(String, String)>,
}

pub struct PushOptions {
    pub client: ClientOptions,
    /// Chunks compressed and uploaded at once.
    pub concurrency: usize,
    /// Bytes per disk layer; Tart's 512 MiB unless a test wants small
    /// layers.
    pub chunk_size: u64,
}

#[derive(Debug)]
pub struct Pushed {
    pub manifest: Vec<u8>,
    pub digest: Digest,
    pub blobs_uploaded: usize,
    pub blobs_present: usize,
}

/// Yields `len` bytes of a file from `offset`.
fn region(path: &Path, offset: u64, len: u64) -> io::Result<io::Take<File>> {
    let mut f = File::open(path)?;
    f.seek(SeekFrom::Start(offset))?;
    Ok(f.take(len))
}

struct Hashing<'a, R> {
    inner: R,
    hasher: &'a mut Hasher,
    progress: &'a dyn Progress,
}

impl<R: Read> Read for Hashing<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.progress.advance(n as u64);
        Ok(n)
    }
}

/// Whether `len` bytes at `offset` are one hole (read as zeros without
/// being stored): then their digests need not be computed again.
fn is_hole(path: &Path, offset: u64, len: u64) -> bool {
    use std::os::fd::AsRawFd;
    let (Ok(f), Ok(off)) = (File::open(path), libc::off_t::try_from(offset)) else {
        return false;
    };
    // SAFETY: lseek on a descriptor we own; no memory involved.
    let data = unsafe { libc::lseek(f.as_raw_fd(), off, libc::SEEK_DATA) };
    if data < 0 {
        // ENXIO: no data from offset to the end of the file.
        return io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
    }
    data as u64 >= offset.saturating_add(len)
}

/// Runs `work(i)` for i in 0..n on up to `threads` threads; the first
/// error stops the others and is returned.
fn parallel<T: Send, E: Send>(
    n: usize,
    threads: usize,
    work: &(dyn Fn(usize) -> Result<T, E> + Sync),
) -> Result<Vec<T>, E> {
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let results: Mutex<Vec<Option<T>>> = Mutex::new((0..n).map(|_| None).collect());
    let error: Mutex<Option<E>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..threads.clamp(1, 16).min(n.max(1)) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n || stop.load(Ordering::Relaxed) {
                    return;
                }
                match work(i) {
                    Ok(v) => results.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(v),
                    Err(e) => {
                        stop.store(true, Ordering::Relaxed);
                        error
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .get_or_insert(e);
                        return;
                    }
                }
            });
        }
    });
    if let Some(e) = error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    Ok(results
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
        .into_iter()
        .flatten()
        .collect())
}

/// `2026-01-02T03:04:05Z` for `secs` after the epoch.
pub fn rfc3339_utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Pushes `source` to every reference (each a tag; several may share a
/// repository, whose blobs are then uploaded once).
pub fn push(
    source: &PushSource,
    references: &[Reference],
    options: &PushOptions,
    progress: &dyn Progress,
) -> Result<Pushed, PushError> {
    for r in references {
        if let Target::Digest(_) = r.target {
            return Err(PushError::DigestTarget(r.to_string()));
        }
    }
    let disk_size = std::fs::metadata(&source.disk)
        .map_err(io_at(&source.disk))?
        .len();
    let chunk = options.chunk_size.max(1);
    let chunks = disk_size.div_ceil(chunk).max(1);
    let nvram_size = std::fs::metadata(&source.nvram)
        .map_err(io_at(&source.nvram))?
        .len();
    progress.start(2 * disk_size + nvram_size);

    // Pass 1: digests of every chunk, compressed and not. Chunks that are
    // holes all have the digests of zeros of their size, computed once.
    let zero_chunks: Mutex<Vec<(u64, DiskLayer)>> = Mutex::new(Vec::new());
    let disks = parallel(chunks as usize, options.concurrency, &|i| {
        let offset = i as u64 * chunk;
        let size = chunk.min(disk_size - offset);
        let hole = is_hole(&source.disk, offset, size);
        if hole {
            let known = zero_chunks
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .find(|(s, _)| *s == size)
                .map(|(_, d)| *d);
            if let Some(d) = known {
                progress.advance(size);
                return Ok(DiskLayer { offset, ..d });
            }
        }
        let mut content = Hasher::default();
        let input = region(&source.disk, offset, size).map_err(io_at(&source.disk))?;
        let (digest, compressed) = digest_reader(EncodeReader::new(Hashing {
            inner: io::BufReader::with_capacity(1 << 20, input),
            hasher: &mut content,
            progress,
        }))
        .map_err(io_at(&source.disk))?;
        if content.len() != size {
            return Err(PushError::Io {
                path: source.disk.clone(),
                source: io::Error::new(io::ErrorKind::UnexpectedEof, "the disk shrank while read"),
            });
        }
        let layer = DiskLayer {
            blob: Blob {
                digest,
                size: compressed,
            },
            offset,
            size,
            content: content.finish(),
        };
        if hole {
            zero_chunks
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((size, layer));
        }
        Ok(layer)
    })?;
    let (nvram_digest, nvram_len) = File::open(&source.nvram)
        .and_then(digest_reader)
        .map_err(io_at(&source.nvram))?;
    progress.advance(nvram_len);
    let nvram = Blob {
        digest: nvram_digest,
        size: nvram_len,
    };
    let config = Blob {
        digest: Digest::of(&source.config_json),
        size: source.config_json.len() as u64,
    };
    let stub_bytes = tart::stub_config(&source.arch, &source.os, &source.labels);
    let stub = Blob {
        digest: Digest::of(&stub_bytes),
        size: stub_bytes.len() as u64,
    };
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let manifest = tart::build_manifest(&ManifestParts {
        stub_config: stub,
        config,
        disks: &disks,
        nvram,
        disk_size,
        upload_time: Some(rfc3339_utc(secs)),
    });

    // Pass 2, per repository: whatever blobs it lacks, then the tags.
    let uploaded = AtomicUsize::new(0);
    let present = AtomicUsize::new(0);
    let mut done_repos: Vec<(String, String)> = Vec::new();
    for reference in references {
        let repo = (reference.registry.clone(), reference.repository.clone());
        if !done_repos.contains(&repo) {
            let client = Client::new(reference, true, &options.client)?;
            let upload = |blob: Blob, body: &mut MakeBody| {
                if client.has_blob(&blob.digest)? {
                    present.fetch_add(1, Ordering::Relaxed);
                } else {
                    client.upload_blob(&blob.digest, blob.size, body)?;
                    uploaded.fetch_add(1, Ordering::Relaxed);
                }
                Ok::<(), PushError>(())
            };
            upload(config, &mut || {
                Ok(Box::new(io::Cursor::new(source.config_json.clone())))
            })?;
            // Equal chunks (all-zero ones above all) share a blob: upload
            // each distinct one once, in parallel.
            let mut distinct: Vec<&DiskLayer> = Vec::new();
            for d in &disks {
                if !distinct.iter().any(|e| e.blob == d.blob) {
                    distinct.push(d);
                }
            }
            parallel(distinct.len(), options.concurrency, &|i| {
                let d = distinct[i];
                let path = source.disk.clone();
                upload(d.blob, &mut || {
                    Ok(Box::new(EncodeReader::new(io::BufReader::with_capacity(
                        1 << 20,
                        region(&path, d.offset, d.size)?,
                    ))))
                })?;
                let same = disks
                    .iter()
                    .filter(|e| e.blob == d.blob)
                    .map(|e| e.size)
                    .sum();
                progress.advance(same);
                Ok::<(), PushError>(())
            })?;
            let nvram_path = source.nvram.clone();
            upload(nvram, &mut || Ok(Box::new(File::open(&nvram_path)?)))?;
            upload(stub, &mut || {
                Ok(Box::new(io::Cursor::new(stub_bytes.clone())))
            })?;
            done_repos.push(repo);
        }
        let client = Client::new(reference, true, &options.client)?;
        client.put_manifest(&reference.target_str(), &manifest)?;
    }
    progress.finish();
    Ok(Pushed {
        digest: Digest::of(&manifest),
        manifest,
        blobs_uploaded: uploaded.into_inner(),
        blobs_present: present.into_inner(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_times_are_rfc3339_utc() {
        assert_eq!(rfc3339_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339_utc(1_767_323_045), "2026-01-02T03:04:05Z");
    }
}
