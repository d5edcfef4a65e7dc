//! `vmapple create`, `import`, `list`, `delete` and `identity`: the
//! bundle commands (the formats live in the `bundle` crate and
//! docs/bundles.md).

use std::path::{Path, PathBuf};

use bundle::config::{MacAddress, Network};
use bundle::{Bundle, CreateOptions};
use clap::Args;

use crate::cli::{parse_ecid, parse_size};
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
    #[arg(long, default_value = "4G", value_parser = parse_size)]
    pub memory: u64,
    /// Size of the (sparse) root disk, e.g. 64G.
    #[arg(long, default_value = "64G", value_parser = parse_size)]
    pub disk_size: u64,
    /// Size of the (sparse) aux disk.
    #[arg(long, value_parser = parse_size)]
    pub aux_size: Option<u64>,
    /// Boot ROM the bundle boots (kept as a path, not copied).
    #[arg(long, value_name = "FILE")]
    pub firmware: Option<PathBuf>,
    /// ECID of the new machine [default: a random one].
    #[arg(long, value_parser = parse_ecid)]
    pub ecid: Option<u64>,
    /// Network: passt, none, unix:PATH or tap:NAME.
    #[arg(long, default_value = "passt")]
    pub net: String,
    /// MAC address of the NIC [default: chosen at each start].
    #[arg(long)]
    pub mac: Option<String>,
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
fn new_bundle_dir(name: &Path) -> Result<PathBuf, String> {
    let home = bundle::bundles_home().map_err(|e| e.to_string())?;
    bundle::bundle::resolve_in(&home, name).map_err(|e| e.to_string())
}

fn network(text: &str) -> Result<Network, String> {
    Ok(match text.split_once(':') {
        None if text == "passt" => Network::Passt,
        None if text == "none" => Network::None,
        Some(("unix", path)) if !path.is_empty() => Network::Unix(path.into()),
        Some(("tap", name)) if !name.is_empty() => Network::Tap(name.into()),
        _ => {
            return Err(format!(
                "{text:?} is not a network (passt, none, unix:PATH, tap:NAME)"
            ))
        }
    })
}

pub fn create(args: CreateArgs) -> Result<u8, String> {
    let dir = new_bundle_dir(&args.name)?;
    let mac = args
        .mac
        .as_deref()
        .map(|m| devices::apple_cfg::parse_mac(m).map(MacAddress))
        .transpose()
        .map_err(|e| e.to_string())?;
    let firmware = args
        .firmware
        .map(|f| std::path::absolute(&f).map_err(|e| format!("{}: {e}", f.display())))
        .transpose()?;
    let defaults = CreateOptions::default();
    let options = CreateOptions {
        cpus: args.cpus,
        memory: args.memory,
        ecid: args.ecid,
        firmware,
        aux_size: args.aux_size.unwrap_or(defaults.aux_size),
        root_size: args.disk_size,
        network: network(&args.net)?,
        mac,
        ..defaults
    };
    let created = Bundle::create(&dir, options).map_err(|e| e.to_string())?;
    println!("created {}", created.dir().display());
    Ok(status::POWERED_OFF)
}

pub fn import(args: ImportArgs) -> Result<u8, String> {
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
    }
    .map_err(|e| e.to_string())?;
    for warning in &imported.warnings {
        eprintln!("vmapple: import: {warning}");
    }
    let dir = new_bundle_dir(&args.name)?;
    let created = Bundle::create_imported(&dir, &imported).map_err(|e| e.to_string())?;
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

pub fn list() -> Result<u8, String> {
    let home = bundle::bundles_home().map_err(|e| e.to_string())?;
    for b in bundle::list(&home) {
        let state = match (b.running, &b.error) {
            (_, Some(e)) => format!("broken: {e}"),
            (Some(pid), None) => format!("running (pid {pid})"),
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

pub fn delete(args: DeleteArgs) -> Result<u8, String> {
    let home = bundle::bundles_home().map_err(|e| e.to_string())?;
    let dir = bundle::bundle::resolve_in(&home, &args.name).map_err(|e| e.to_string())?;
    bundle::delete(&dir).map_err(|e| e.to_string())?;
    println!("deleted {}", dir.display());
    Ok(status::POWERED_OFF)
}

pub fn identity(args: IdentityArgs) -> Result<u8, String> {
    // A file of that name here (say `MachineIdentifier`) wins; otherwise a
    // bare name is a bundle in the bundles home, as for `run` and `ctl`.
    let path = if args.path.exists() {
        args.path
    } else {
        let home = bundle::bundles_home().map_err(|e| e.to_string())?;
        bundle::bundle::resolve_in(&home, &args.path).unwrap_or(args.path)
    };
    let ecid = bundle::identity::ecid_from_path(&path).map_err(|e| e.to_string())?;
    println!("{ecid}");
    Ok(status::POWERED_OFF)
}
