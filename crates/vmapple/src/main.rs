//! `vmapple`: run Apple's vmapple arm64 machine.
//!
//! Exit status (also in `vmapple --help` and the README):
//! 0 the guest powered off; 1 a host error or bad configuration; 2 bad
//! command-line syntax; 3 the guest crashed a vCPU; 4 the guest was stuck
//! in a reset loop; 5 the guest panicked (pvpanic); 6 the host stopped the
//! VM before the guest powered off.

mod bundles;
mod cli;
mod control;
mod error;
mod fronts;
mod host_display;
mod images;
mod input;
mod log_rotate;
mod logging;
mod signals;
mod suspend;

use std::process::ExitCode;

use clap::Parser;
use machine::adt;
use vm_core::error_chain::Chain;

use cli::{Cli, Command};

/// Process exit statuses.
pub mod status {
    pub const POWERED_OFF: u8 = 0;
    pub const HOST_ERROR: u8 = 1;
    pub const GUEST_CRASHED: u8 = 3;
    pub const RESET_LOOP: u8 = 4;
    pub const GUEST_PANICKED: u8 = 5;
    pub const HOST_STOPPED: u8 = 6;
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Run(args) = &cli.command {
        if let Err(e) = args.check() {
            e.exit();
        }
    }
    if let Err(e) = logging::init(cli.log.as_deref()) {
        eprintln!("vmapple: error: {}", Chain(&e));
        return ExitCode::from(status::HOST_ERROR);
    }
    let result = match cli.command {
        Command::Run(args) => cli::run(*args),
        Command::Create(args) => bundles::create(args),
        Command::Import(args) => bundles::import(args),
        Command::List => bundles::list(),
        Command::Delete(args) => bundles::delete(args),
        Command::Identity(args) => bundles::identity(args),
        Command::Ctl(args) => control::ctl(args),
        Command::Suspend(args) => suspend::suspend(args),
        Command::Pull(args) => images::pull(args).map_err(error::Error::Image),
        Command::Push(args) => images::push(args).map_err(error::Error::Image),
        Command::Clone(args) => images::clone(args).map_err(error::Error::Image),
        Command::Set(args) => images::set(args).map_err(error::Error::Image),
        Command::InspectIpsw(args) => inspect_ipsw(&args.path),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            let message = Chain(&e).to_string();
            logging::file_only_error(&message);
            eprintln!("vmapple: error: {message}");
            ExitCode::from(status::HOST_ERROR)
        }
    }
}

/// `vmapple inspect-ipsw FILE`.
fn inspect_ipsw(path: &std::path::Path) -> error::Result<u8> {
    use std::io::Read;
    let io = |source| error::Error::Path {
        path: path.to_path_buf(),
        source,
    };
    let mut data = Vec::new();
    std::fs::File::open(path)
        .map_err(io)?
        .take(adt::MAX_FILE)
        .read_to_end(&mut data)
        .map_err(io)?;
    let tree = adt::device_tree_bytes(&data)
        .and_then(adt::parse)
        .map_err(|source| error::Error::DeviceTree {
            path: path.to_path_buf(),
            source,
        })?;
    print!("{}", adt::report(&tree));
    Ok(status::POWERED_OFF)
}
