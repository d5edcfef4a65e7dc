//! `vmapple create`, `import`, `list`, `delete` and `identity`: the
//! bundle commands (the formats live in the `bundle` crate and
//! docs/bundles.md).

use std::path::{Path, PathBuf};

use bundle::{Bundle, CreateOptions};
use clap::Args;
use vm_config::{Ecid, MacAddress, Network, Size};

use crate::error::{Error, Result};
use crate::status;

#[derive(Args, Debug)]
pub struct CreateArgs {
    /// Bundle name (created in the bundles home) or a path ending in a
    /// new directory.
    #[arg(value_name = "NAME")]
    pub name: PathBuf,
    /// vCPUs (1 to 32).
    #[arg(long, default_value_t = 2)]
    pub cpus: u32,
    /// Guest RAM, e.g. 4G.
    #[arg(long, default_value = "4G")]
    pub memory: Size,
    /// Size of the (sparse) root disk, e.g. 64G.
    #[arg(long, default_value = "64G")]
    pub disk_size: Size,
    /// Size of the (sparse) aux disk.
    #[arg(long)]
    pub aux_size: Option<Size>,
    /// Boot ROM the bundle boots (kept as a path, not copied).
    #[arg(long, value_name = "FILE")]
    pub firmware: Option<PathBuf>,
    /// ECID of the new machine [default: a random one].
    #[arg(long)]
    pub ecid: Option<Ecid>,
    /// Network: passt, none, unix:PATH, unix-dgram:LOCAL,PEER, tap:NAME or
    /// vmnet.
    #[arg(long, default_value = "passt")]
    pub net: Network,
    /// MAC address of the NIC [default: chosen at each start].
    #[arg(long)]
    pub mac: Option<MacAddress>,
}

#[derive(Args, Debug)]
pub struct ImportArgs {
    /// A Tart VM directory (config.json, disk.img, nvram.bin) or a
    /// macosvm JSON file.
    #[arg(value_name = "SOURCE")]
    pub source: PathBuf,
    /// Name or path of the bundle to create.
    #[arg(value_name = "NAME")]
    pub name: PathBuf,
    /// Let the VM description reference disk files outside its own
    /// directory (absolute paths, `..`, symbolic links out). Only for a
    /// source you trust: the bundle opens those files read-write.
    #[arg(long)]
    pub allow_outside_files: bool,
}

#[derive(Args, Debug)]
pub struct DeleteArgs {
    #[arg(value_name = "NAME")]
    pub name: PathBuf,
}

#[derive(Args, Debug)]
pub struct IdentityArgs {
    /// A bundle (name or path), Tart VM, macosvm JSON,
    /// Virtualization.framework bundle or MachineIdentifier plist.
    #[arg(value_name = "PATH")]
    pub path: PathBuf,
}

/// Where a new bundle goes: a bare name in the bundles home, else the
/// path as given.
fn new_bundle_dir(name: &Path) -> Result<PathBuf> {
    let home = bundle::bundles_home()?;
    Ok(bundle::bundle::resolve_in(&home, name)?)
}

pub fn create(args: CreateArgs) -> Result<u8> {
    let dir = new_bundle_dir(&args.name)?;
    let firmware = args
        .firmware
        .map(|f| std::path::absolute(&f).map_err(|source| Error::Path { path: f, source }))
        .transpose()?;
    let defaults = CreateOptions::default();
    let options = CreateOptions {
        cpus: args.cpus,
        memory: args.memory.bytes(),
        ecid: args.ecid.map(|e| e.0),
        firmware,
        aux_size: args.aux_size.map_or(defaults.aux_size, Size::bytes),
        root_size: args.disk_size.bytes(),
        network: args.net,
        mac: args.mac,
        ..defaults
    };
    let created = Bundle::create(&dir, options)?;
    println!("created {}", created.dir().display());
    Ok(status::POWERED_OFF)
}

pub fn import(args: ImportArgs) -> Result<u8> {
    let source = &args.source;
    let policy = if args.allow_outside_files {
        bundle::import::OutsideFiles::Allow
    } else {
        bundle::import::OutsideFiles::Refuse
    };
    let imported = if source.is_dir() {
        bundle::import::import_tart(source, policy)
    } else {
        bundle::import::import_macosvm(source, policy)
    }?;
    for warning in &imported.warnings {
        eprintln!("vmapple: import: {warning}");
    }
    let dir = new_bundle_dir(&args.name)?;
    let created = Bundle::create_imported(&dir, &imported)?;
    println!(
        "imported {} as {} ({} vCPUs, {} MiB, ECID {})",
        source.display(),
        created.dir().display(),
        imported.config.cpus,
        imported.config.memory.0 >> 20,
        imported.ecid
    );
    Ok(status::POWERED_OFF)
}

pub fn list() -> Result<u8> {
    let home = bundle::bundles_home()?;
    for b in bundle::list(&home) {
        let state = match (b.running, &b.error) {
            (_, Some(e)) => format!("broken: {e}"),
            (Some(pid), None) => format!("running (pid {pid})"),
            // `vmapple suspend`: the next run resumes it.
            (None, None) if b.path.join(bundle::SUSPENDED_STATE).is_file() => "suspended".into(),
            (None, None) => "stopped".into(),
        };
        let size = match (b.cpus, b.memory) {
            (Some(c), Some(m)) => format!("{c} vCPUs, {} MiB", m >> 20),
            _ => "-".into(),
        };
        println!("{}\t{size}\t{state}\t{}", b.name, b.path.display());
    }
    Ok(status::POWERED_OFF)
}

pub fn delete(args: DeleteArgs) -> Result<u8> {
    let home = bundle::bundles_home()?;
    let dir = bundle::bundle::resolve_in(&home, &args.name)?;
    bundle::delete(&dir)?;
    println!("deleted {}", dir.display());
    Ok(status::POWERED_OFF)
}

pub fn identity(args: IdentityArgs) -> Result<u8> {
    // A file of that name here (say `MachineIdentifier`) wins; otherwise a
    // bare name is a bundle in the bundles home, as for `run` and `ctl`.
    let path = if args.path.exists() {
        args.path
    } else {
        let home = bundle::bundles_home()?;
        bundle::bundle::resolve_in(&home, &args.path).unwrap_or(args.path)
    };
    let ecid = bundle::identity::ecid_from_path(&path)?;
    // stdout stays the ECID alone, so `uuid=$(vmapple identity X)` keeps
    // working; the hardware model is for the reader.
    println!("{ecid}");
    match bundle::hardware_model::from_path(&path) {
        Ok(Some(model)) => eprintln!("vmapple: identity: hardware model {model}"),
        Ok(None) => {}
        Err(e) => eprintln!("vmapple: identity: hardware model unreadable: {e}"),
    }
    Ok(status::POWERED_OFF)
}
