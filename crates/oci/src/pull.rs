//! Pulling a Tart image into a directory: `config.json`, `nvram.bin` and a
//! sparse `disk.img` (tart-oci.md §4.2, §8.a), checking what Tart does
//! not: every blob's sha256, each disk layer's decoded length and digest.
//!
//! Disk layers are decoded by several threads at once, each writing its
//! own region of disk.img; zero runs are left as holes. A pull into a
//! directory that already holds a disk.img of the right size (an earlier,
//! interrupted pull) keeps every region whose content digest already
//! matches, and partial blob downloads continue where they stopped.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::applelz4::{self, Lz4Error};
use crate::cache::{BlobCache, CacheError, DownloadError};
use crate::digest::{Digest, Hasher};
use crate::reference::Reference;
use crate::registry::{Client, ClientOptions, FetchedManifest, RegistryError};
use crate::tart::{self, DiskLayer, LayoutError, TartImage};
use crate::Progress;

pub const CONFIG_FILE: &str = "config.json";
pub const DISK_FILE: &str = "disk.img";
pub const NVRAM_FILE: &str = "nvram.bin";

/// Bytes written at once; each 64 KiB piece of it that is all zeros is
/// skipped, leaving a hole.
const WRITE_PIECE: usize = 1 << 20;
const HOLE_GRAIN: usize = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("{reference}: {source}")]
    Layout {
        reference: String,
        #[source]
        source: LayoutError,
    },
    #[error(transparent)]
    Download(#[from] DownloadError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("disk layer {index} (blob {digest}): {source}")]
    Decode {
        index: usize,
        digest: Digest,
        #[source]
        source: Lz4Error,
    },
    #[error("disk layer {index} (blob {digest}): {message}")]
    Content {
        index: usize,
        digest: Digest,
        message: String,
    },
    #[error("the image's config.json: {0}")]
    Config(String),
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> PullError + '_ {
    move |source| PullError::Io {
        path: path.to_path_buf(),
        source,
    }
}

pub struct PullOptions {
    pub client: ClientOptions,
    /// The blob cache directory.
    pub cache: PathBuf,
    /// Disk layers decoded at once.
    pub concurrency: usize,
}

/// What a pull did.
#[derive(Debug)]
pub struct Pulled {
    pub manifest: FetchedManifest,
    pub image: TartImage,
    /// Disk layers already in place from an earlier, interrupted pull.
    pub layers_kept: usize,
    /// Blobs found in the cache (not downloaded).
    pub blobs_cached: usize,
}

/// Writes `data` to `path` through a temporary file and a rename, so the
/// file is either absent or whole.
fn write_whole(path: &Path, data: &[u8]) -> Result<(), PullError> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(io_at(&tmp))?;
    f.write_all(data).map_err(io_at(&tmp))?;
    f.sync_all().map_err(io_at(&tmp))?;
    fs::rename(&tmp, path).map_err(io_at(path))
}

/// Pulls `reference` into `dir` (created if needed). `check_config` sees
/// the image's config.json before any disk data is fetched and may refuse
/// it.
pub fn pull(
    reference: &Reference,
    dir: &Path,
    options: &PullOptions,
    progress: &dyn Progress,
    check_config: &dyn Fn(&[u8]) -> Result<(), String>,
) -> Result<Pulled, PullError> {
    let client = Client::new(reference, false, &options.client)?;
    let manifest = client.get_manifest(reference)?;
    let image = tart::parse_manifest(&manifest.bytes).map_err(|source| PullError::Layout {
        reference: reference.to_string(),
        source,
    })?;
    fs::create_dir_all(dir).map_err(io_at(dir))?;
    let cache = BlobCache::new(&options.cache);
    let blobs_cached = std::iter::once(&image.config)
        .chain(std::iter::once(&image.nvram))
        .chain(image.disks.iter().map(|d| &d.blob))
        .filter(|b| cache.get(b).is_some())
        .count();

    let total =
        image.config.size + image.nvram.size + image.disks.iter().map(|d| d.blob.size).sum::<u64>();
    progress.start(total);
    let advance = |n| progress.advance(n);

    let config_path = cache.fetch(&client, image.config, &advance)?;
    let config = fs::read(&config_path).map_err(io_at(&config_path))?;
    check_config(&config).map_err(PullError::Config)?;
    write_whole(&dir.join(CONFIG_FILE), &config)?;

    let nvram_path = cache.fetch(&client, image.nvram, &advance)?;
    let nvram_tmp = dir.join(NVRAM_FILE).with_extension("tmp");
    fs::copy(&nvram_path, &nvram_tmp).map_err(io_at(&nvram_tmp))?;
    fs::rename(&nvram_tmp, dir.join(NVRAM_FILE)).map_err(io_at(&nvram_tmp))?;

    let layers_kept = pull_disk(
        &client,
        &cache,
        &image,
        &dir.join(DISK_FILE),
        options,
        progress,
    )?;
    progress.finish();
    Ok(Pulled {
        manifest,
        image,
        layers_kept,
        blobs_cached,
    })
}

fn pull_disk(
    client: &Client,
    cache: &BlobCache,
    image: &TartImage,
    path: &Path,
    options: &PullOptions,
    progress: &dyn Progress,
) -> Result<usize, PullError> {
    let disk = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(io_at(path))?;
    let len = disk.metadata().map_err(io_at(path))?.len();
    let resuming = len == image.disk_size;
    if !resuming {
        // A fresh, entirely sparse file.
        disk.set_len(0).map_err(io_at(path))?;
        disk.set_len(image.disk_size).map_err(io_at(path))?;
    }
    // Layers sharing a blob (equal chunks, all-zero ones above all) are
    // decoded one after the other, the later ones from the cache.
    let blob_locks: HashMap<Digest, Arc<Mutex<()>>> = image
        .disks
        .iter()
        .map(|d| (d.blob.digest, Arc::new(Mutex::new(()))))
        .collect();
    let next = AtomicUsize::new(0);
    let kept = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let first_error: Mutex<Option<PullError>> = Mutex::new(None);
    let workers = options.concurrency.clamp(1, 16).min(image.disks.len());
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if stop.load(Ordering::Relaxed) || index >= image.disks.len() {
                    return;
                }
                let layer = &image.disks[index];
                let result = (|| {
                    if resuming {
                        if region_matches(&disk, layer).map_err(io_at(path))? {
                            kept.fetch_add(1, Ordering::Relaxed);
                            progress.advance(layer.blob.size);
                            return Ok(());
                        }
                        zero_range(&disk, layer.offset, layer.size).map_err(io_at(path))?;
                    }
                    let _guard = blob_locks[&layer.blob.digest]
                        .lock()
                        .unwrap_or_else(|p| p.into_inner());
                    pull_layer(client, cache, &disk, index, layer, progress)
                })();
                if let Err(e) = result {
                    stop.store(true, Ordering::Relaxed);
                    first_error
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get_or_insert(e);
                    return;
                }
            });
        }
    });
    if let Some(e) = first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    disk.sync_all().map_err(io_at(path))?;
    Ok(kept.into_inner())
}

/// Counts bytes read into the progress display.
struct Counted<'a, R> {
    inner: R,
    progress: &'a dyn Progress,
}

impl<R: Read> Read for Counted<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.progress.advance(n as u64);
        Ok(n)
    }
}

fn pull_layer(
    client: &Client,
    cache: &BlobCache,
    disk: &File,
    index: usize,
    layer: &DiskLayer,
    progress: &dyn Progress,
) -> Result<(), PullError> {
    let mut writer = RegionWriter::new(disk, layer.offset);
    let decode_err = |source| PullError::Decode {
        index,
        digest: layer.blob.digest,
        source,
    };
    let decoded = if let Some(file) = cache.get(&layer.blob) {
        let input = Counted {
            inner: io::BufReader::with_capacity(1 << 20, file),
            progress,
        };
        applelz4::decode(input, layer.size, |b| writer.push(b)).map_err(decode_err)?
    } else {
        let mut download = cache.download(client, layer.blob)?;
        let result = applelz4::decode(
            Counted {
                inner: io::BufReader::with_capacity(1 << 20, &mut download),
                progress,
            },
            layer.size,
            |b| writer.push(b),
        );
        let decoded = match result {
            Ok(n) => n,
            // The registry's failure explains a broken stream better.
            Err(Lz4Error::Io(e)) => return Err(download.error(e).into()),
            Err(e) => {
                // A blob that does not decode is refused whatever its
                // digest says; check it so the message names the culprit.
                let _ = io::copy(&mut download, &mut io::sink());
                download.finish()?;
                return Err(decode_err(e));
            }
        };
        download.finish()?;
        decoded
    };
    let content = writer.finish().map_err(|source| PullError::Io {
        path: PathBuf::from(DISK_FILE),
        source,
    })?;
    if decoded != layer.size {
        return Err(PullError::Content {
            index,
            digest: layer.blob.digest,
            message: format!(
                "decodes to {decoded} bytes, the manifest says {}",
                layer.size
            ),
        });
    }
    if content != layer.content {
        return Err(PullError::Content {
            index,
            digest: layer.blob.digest,
            message: format!(
                "decodes to content with sha256 {content}, the manifest says {}",
                layer.content
            ),
        });
    }
    Ok(())
}

/// Writes a layer's decoded bytes at its offset, hashing them and leaving
/// holes for zero runs.
struct RegionWriter<'a> {
    file: &'a File,
    offset: u64,
    buf: Vec<u8>,
    hasher: Hasher,
}

impl<'a> RegionWriter<'a> {
    fn new(file: &'a File, offset: u64) -> Self {
        RegionWriter {
            file,
            offset,
            buf: Vec::with_capacity(WRITE_PIECE),
            hasher: Hasher::default(),
        }
    }

    fn push(&mut self, mut data: &[u8]) -> io::Result<()> {
        self.hasher.update(data);
        while !data.is_empty() {
            let take = (WRITE_PIECE - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.buf.len() == WRITE_PIECE {
                self.flush()?;
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        let mut run_start: Option<usize> = None;
        let mut pos = 0;
        while pos < self.buf.len() {
            let end = (pos + HOLE_GRAIN).min(self.buf.len());
            let zero = self.buf[pos..end].iter().all(|&b| b == 0);
            match (zero, run_start) {
                (false, None) => run_start = Some(pos),
                (true, Some(s)) => {
                    self.file
                        .write_all_at(&self.buf[s..pos], self.offset + s as u64)?;
                    run_start = None;
                }
                _ => {}
            }
            pos = end;
        }
        if let Some(s) = run_start {
            self.file
                .write_all_at(&self.buf[s..], self.offset + s as u64)?;
        }
        self.offset += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }

    fn finish(mut self) -> io::Result<Digest> {
        self.flush()?;
        Ok(self.hasher.finish())
    }
}

/// Whether disk.img already holds the layer's content.
fn region_matches(disk: &File, layer: &DiskLayer) -> io::Result<bool> {
    let mut h = Hasher::default();
    let mut buf = vec![0u8; 4 << 20];
    let mut done = 0u64;
    while done < layer.size {
        let n = (layer.size - done).min(buf.len() as u64) as usize;
        disk.read_exact_at(&mut buf[..n], layer.offset + done)?;
        h.update(&buf[..n]);
        done += n as u64;
    }
    Ok(h.finish() == layer.content)
}

/// Makes a region read as zeros: a hole where the filesystem can punch
/// one, written zeros elsewhere.
fn zero_range(file: &File, offset: u64, len: u64) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        if let (Ok(off), Ok(l)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) {
            // SAFETY: fallocate on a descriptor we own; no memory involved.
            let r = unsafe {
                libc::fallocate(
                    file.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    off,
                    l,
                )
            };
            if r == 0 {
                return Ok(());
            }
        }
    }
    let zeros = vec![0u8; WRITE_PIECE];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn zero_runs_become_holes_and_data_lands_at_its_offset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d");
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.set_len(16 << 20).unwrap();
        let mut data = vec![0u8; 8 << 20];
        data[5 << 20..(5 << 20) + 3].copy_from_slice(b"abc");
        let mut w = RegionWriter::new(&f, 4 << 20);
        for chunk in data.chunks(65_000) {
            w.push(chunk).unwrap();
        }
        assert_eq!(w.finish().unwrap(), Digest::of(&data));
        let mut back = vec![0u8; 8 << 20];
        f.read_exact_at(&mut back, 4 << 20).unwrap();
        assert_eq!(back, data);
        // One 64 KiB piece of data, the rest holes (allow for fs blocks).
        assert!(f.metadata().unwrap().blocks() * 512 <= 256 << 10);

        zero_range(&f, 4 << 20, 8 << 20).unwrap();
        f.read_exact_at(&mut back, 4 << 20).unwrap();
        assert!(back.iter().all(|&b| b == 0));
    }
}
