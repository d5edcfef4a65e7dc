//! `vmapple pull` and `vmapple push`: bundles to and from OCI registries
//! in Tart's image layout (the `oci` crate; docs/bundles.md); and `vmapple
//! clone`, the local way to a second copy of an image.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use bundle::Bundle;
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use oci::{ClientOptions, Reference};

use crate::status;

#[derive(Args, Debug)]
pub struct PullArgs {
    /// The image: `HOST[:PORT]/NAME[:TAG|@sha256:HEX]`, e.g.
    /// ghcr.io/cirruslabs/macos-sonoma-base:latest.
    #[arg(value_name = "REF")]
    pub reference: String,
    /// Name or path of the bundle to create [default: the image's last
    /// name component].
    #[arg(value_name = "NAME")]
    pub name: Option<PathBuf>,
    /// Speak plain HTTP to the registry instead of HTTPS.
    #[arg(long)]
    pub insecure: bool,
    /// Disk layers downloaded and decompressed at once.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=16))]
    pub concurrency: u16,
}

#[derive(Args, Debug)]
pub struct PushArgs {
    /// The bundle (name or path) to push; it must not be running.
    #[arg(value_name = "NAME")]
    pub name: PathBuf,
    /// Where to: `HOST[:PORT]/NAME[:TAG]`; several tags may be given.
    #[arg(value_name = "REF", required = true)]
    pub references: Vec<String>,
    /// Speak plain HTTP to the registry instead of HTTPS.
    #[arg(long)]
    pub insecure: bool,
    /// Disk chunks compressed and uploaded at once.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=16))]
    pub concurrency: u16,
    /// A label for the image's OCI config (`KEY=VALUE`), as `tart push
    /// --label`; repeatable.
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
    /// Bytes of disk per layer (Tart uses 512M; for tests).
    #[arg(long, hide = true, value_parser = parse_size)]
    pub chunk_size: Option<u64>,
}

#[derive(Args, Debug)]
pub struct CloneArgs {
    /// The bundle (name or path) to copy.
    #[arg(value_name = "SRC")]
    pub source: PathBuf,
    /// Name or path of the new bundle.
    #[arg(value_name = "DST")]
    pub dest: PathBuf,
    /// Give the clone a new random ECID (a new machine) instead of the
    /// source's.
    #[arg(long)]
    pub new_identity: bool,
}

/// A size such as `64G` or `512M` (vm-config's syntax), in bytes.
fn parse_size(text: &str) -> Result<u64, String> {
    text.parse::<vm_config::Size>()
        .map(vm_config::Size::bytes)
        .map_err(|e| e.to_string())
}

pub fn clone(args: CloneArgs) -> Result<u8, String> {
    let src = Bundle::open(&args.source).map_err(|e| e.to_string())?;
    let home = bundle::bundles_home().map_err(|e| e.to_string())?;
    let dst = bundle::bundle::resolve_in(&home, &args.dest).map_err(|e| e.to_string())?;
    let cloned = bundle::clone::clone_bundle(
        &src,
        &dst,
        bundle::clone::CloneOptions {
            new_identity: args.new_identity,
        },
    )
    .map_err(|e| e.to_string())?;
    for w in &cloned.warnings {
        eprintln!("vmapple: clone: {w}");
    }
    println!(
        "cloned {} as {} ({} disk(s) copy-on-write, {} copied)",
        src.name(),
        cloned.bundle.dir().display(),
        cloned.shared,
        cloned.copied
    );
    Ok(status::POWERED_OFF)
}

#[derive(Args, Debug)]
pub struct SetArgs {
    /// The bundle (name or path); it must not be running.
    #[arg(value_name = "NAME")]
    pub name: PathBuf,
    /// Grow the root disk to SIZE (sparsely); shrinking is refused.
    #[arg(long, value_parser = parse_size, value_name = "SIZE")]
    pub disk_size: Option<u64>,
    /// vCPUs (1 to 32).
    #[arg(long, value_name = "N")]
    pub cpus: Option<u32>,
    /// Guest RAM, e.g. 8G.
    #[arg(long, value_parser = parse_size, value_name = "SIZE")]
    pub memory: Option<u64>,
}

pub fn set(args: SetArgs) -> Result<u8, String> {
    let bundle = Bundle::open(&args.name).map_err(|e| e.to_string())?;
    let _lock = bundle.lock().map_err(|e| e.to_string())?;
    let mut config = bundle.config().clone();
    if let Some(c) = args.cpus {
        config.cpus = c;
    }
    if let Some(m) = args.memory {
        config.memory = bundle::config::Size(m);
    }
    config
        .validate()
        .map_err(|e| format!("{}: {e}", bundle.dir().display()))?;
    let root = bundle.resolve(&config.root.path);
    if let Some(size) = args.disk_size {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&root)
            .map_err(|e| format!("{}: {e}", root.display()))?;
        let now = f
            .metadata()
            .map_err(|e| format!("{}: {e}", root.display()))?
            .len();
        if size < now {
            return Err(format!(
                "{}: the disk is {now} bytes; shrinking it to {size} would cut off data the guest's file system may use (grow only)",
                root.display()
            ));
        }
        if config.root.read_only {
            return Err(format!("{}: the root disk is read-only", root.display()));
        }
        // Extending a file adds a hole: no data is written.
        f.set_len(size)
            .map_err(|e| format!("{}: {e}", root.display()))?;
    }
    let path = bundle.config_path();
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, config.to_toml())
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    println!(
        "{}: {} vCPUs, {} MiB, root disk {} bytes",
        bundle.name(),
        config.cpus,
        config.memory.0 >> 20,
        std::fs::metadata(&root).map(|m| m.len()).unwrap_or(0)
    );
    Ok(status::POWERED_OFF)
}

/// A progress bar on stderr when it is a terminal; silent otherwise.
struct Bar(ProgressBar);

impl Bar {
    fn new(what: &str) -> Bar {
        let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}, {eta} left",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_message(what.to_string());
        Bar(bar)
    }
}

impl oci::Progress for Bar {
    fn start(&self, total: u64) {
        self.0.set_length(total);
    }
    fn advance(&self, done: u64) {
        self.0.inc(done);
    }
    fn finish(&self) {
        self.0.finish_and_clear();
    }
}

fn parse_ref(text: &str) -> Result<Reference, String> {
    text.parse::<Reference>().map_err(|e| e.to_string())
}

/// `bundles home/cache/blobs`: blobs shared by every pull.
fn cache_dir() -> Result<PathBuf, String> {
    Ok(bundle::bundles_home()
        .map_err(|e| e.to_string())?
        .join("cache")
        .join("blobs"))
}

/// Locks `dir` against a second pull into it (flock on the directory).
fn lock_dir(dir: &Path) -> Result<File, String> {
    let f = File::open(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    // SAFETY: flock on a descriptor we own; no memory is involved.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(format!(
            "{} is in use by another `vmapple pull`",
            dir.display()
        ));
    }
    Ok(f)
}

pub fn pull(args: PullArgs) -> Result<u8, String> {
    let reference = parse_ref(&args.reference)?;
    let name = match &args.name {
        Some(n) => n.clone(),
        None => PathBuf::from(
            reference
                .repository
                .rsplit('/')
                .next()
                .unwrap_or(&reference.repository),
        ),
    };
    let home = bundle::bundles_home().map_err(|e| e.to_string())?;
    let dir = bundle::bundle::resolve_in(&home, &name).map_err(|e| e.to_string())?;
    if std::fs::symlink_metadata(&dir).is_ok() {
        return Err(format!(
            "{} already exists; refusing to overwrite it",
            dir.display()
        ));
    }
    // The download goes to a hidden directory beside the bundle, named
    // after it, so an interrupted pull of the same NAME resumes there and
    // the bundle appears only whole.
    let file_name = dir
        .file_name()
        .ok_or_else(|| format!("{}: not a bundle path", dir.display()))?;
    let staging = dir.with_file_name(format!(".{}.pull", file_name.to_string_lossy()));
    std::fs::create_dir_all(&staging).map_err(|e| format!("{}: {e}", staging.display()))?;
    let _lock = lock_dir(&staging)?;

    let options = oci::PullOptions {
        client: ClientOptions::new(args.insecure),
        cache: cache_dir()?,
        concurrency: args.concurrency.into(),
    };
    let bar = Bar::new(&format!("pulling {reference}"));
    let pulled = oci::pull(&reference, &staging, &options, &bar, &|json| {
        bundle::tart::check_tart_config(json).map(|_| ())
    })
    .map_err(|e| {
        bar.0.abandon();
        let mut text = error_chain(&e);
        if !args.insecure && reference.is_loopback() && matches!(e, oci::PullError::Registry(_)) {
            text.push_str(" (a plain-HTTP registry? add --insecure)");
        }
        match e {
            // The image itself is wrong: pulling again will not help.
            oci::PullError::Config(_) | oci::PullError::Layout { .. } => {
                let _ = std::fs::remove_dir_all(&staging);
                text
            }
            _ => format!("{text}; run the same pull again to resume"),
        }
    })?;
    let source = format!("{reference}@{}", pulled.manifest.digest);
    let (created, warnings) =
        bundle::tart::adopt_pulled(&staging, &dir, &source).map_err(|e| e.to_string())?;
    for w in &warnings {
        eprintln!("vmapple: pull: {w}");
    }
    let layers = pulled.image.disks.len();
    println!(
        "pulled {source} as {} ({} vCPUs, {} MiB, disk {} bytes in {layers} layers; {} already on disk, {} blobs from the cache)",
        created.dir().display(),
        created.config().cpus,
        created.config().memory.0 >> 20,
        pulled.image.disk_size,
        pulled.layers_kept,
        pulled.blobs_cached,
    );
    Ok(status::POWERED_OFF)
}

/// An error with its causes, for one line on stderr.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

pub fn push(args: PushArgs) -> Result<u8, String> {
    let references = args
        .references
        .iter()
        .map(|r| parse_ref(r))
        .collect::<Result<Vec<_>, _>>()?;
    let labels = args
        .labels
        .iter()
        .map(|l| {
            l.split_once('=')
                .filter(|(k, _)| !k.is_empty())
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| format!("--label {l:?}: expected KEY=VALUE"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let bundle = Bundle::open(&args.name).map_err(|e| e.to_string())?;
    // Held for the whole push: a VM writing the disk meanwhile would make
    // the pushed layers disagree with their digests.
    let _lock = bundle.lock().map_err(|e| e.to_string())?;
    let (config_json, warnings) =
        bundle::tart::tart_config_for_push(&bundle).map_err(|e| e.to_string())?;
    for w in &warnings {
        eprintln!("vmapple: push: {w}");
    }
    let config = bundle.config();
    let source = oci::PushSource {
        config_json,
        disk: bundle.resolve(&config.root.path),
        nvram: bundle.resolve(&config.aux.path),
        arch: "arm64".into(),
        os: "darwin".into(),
        labels,
    };
    let options = oci::PushOptions {
        client: ClientOptions::new(args.insecure),
        concurrency: args.concurrency.into(),
        chunk_size: args.chunk_size.unwrap_or(oci::tart::DISK_CHUNK),
    };
    let bar = Bar::new(&format!("pushing {}", bundle.name()));
    let pushed = oci::push(&source, &references, &options, &bar).map_err(|e| {
        bar.0.abandon();
        error_chain(&e)
    })?;
    for r in &references {
        println!("pushed {} as {r}@{}", bundle.name(), pushed.digest);
    }
    println!(
        "{} blobs uploaded, {} already in the registry",
        pushed.blobs_uploaded, pushed.blobs_present
    );
    Ok(status::POWERED_OFF)
}
