//! `vmapple suspend NAME` and the resume of a suspended bundle by `vmapple
//! run NAME`: the running VM saves itself into the bundle's
//! `suspended.snap` and stops; the next run restores it instead of
//! booting, and removes the file once the VM runs again (as Tart does
//! with its `state.vzvmsave`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bundle::control::{Request, Response};
use clap::Args;

use crate::error::{Error, Result};

/// How long `suspend` waits for the stopped VM's process to let go of
/// the bundle after the save.
const RELEASE_WAIT: Duration = Duration::from_secs(60);

#[derive(Args, Debug)]
pub struct SuspendArgs {
    /// The running bundle (name or path).
    #[arg(value_name = "NAME")]
    pub name: PathBuf,
}

/// Where a bundle keeps its suspended VM.
pub fn state_path(b: &bundle::Bundle) -> PathBuf {
    b.dir().join(bundle::SUSPENDED_STATE)
}

pub fn suspend(args: SuspendArgs) -> Result<u8> {
    let b = bundle::Bundle::open(&args.name)?;
    let name = b.name();
    let socket = b.control_socket_path();
    let mut client = bundle::control::Client::connect(&socket).map_err(|e| {
        if std::fs::symlink_metadata(&socket).is_err() {
            Error::usage(format!("bundle {name} is not running"))
        } else {
            Error::Control(e)
        }
    })?;
    // Writing the memory takes as long as it takes.
    client.set_timeout(None)?;
    let path = state_path(&b);
    let response = client.call(&Request::Save {
        path: path.clone(),
        stop: true,
        with_disks: false,
    })?;
    if let Response::Error { desc, .. } = &response {
        return Err(Error::usage(format!("bundle {name}: {desc}")));
    }
    drop(client);
    // The VM's process exits after the save; a `run` right after this
    // must find the bundle free.
    let started = Instant::now();
    while b.lock().is_err() {
        if started.elapsed() > RELEASE_WAIT {
            return Err(Error::usage(format!(
                "bundle {name}: saved to {} but its VM did not stop within {} s",
                path.display(),
                RELEASE_WAIT.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("vmapple: bundle {name} suspended; `vmapple run {name}` resumes it");
    Ok(crate::status::POWERED_OFF)
}

/// The suspended state a run of bundle `b` resumes, if any.
pub fn pending(b: &bundle::Bundle) -> Option<PathBuf> {
    let path = state_path(b);
    path.is_file().then_some(path)
}

/// Removes `state` once the machine reports that it runs the restored
/// VM: from then on the state is stale (the guest moved on, and its disks
/// with it). Its memory stays mapped, so removing the file is safe.
pub fn discard_when_running(handle: &machine::handle::MachineHandle, state: &Path) {
    let events = handle.subscribe();
    let watched = state.to_path_buf();
    let spawned = std::thread::Builder::new()
        .name("suspend-discard".into())
        .spawn(move || {
            for event in events {
                if matches!(event, machine::handle::MachineEvent::Restored { .. }) {
                    match std::fs::remove_file(&watched) {
                        Ok(()) => tracing::info!(
                            "resumed; removed the suspended state {}",
                            watched.display()
                        ),
                        Err(e) => tracing::warn!(
                            "resumed, but cannot remove the suspended state {}: {e}",
                            watched.display()
                        ),
                    }
                    return;
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(
            "cannot watch for the resume: {e}; {} stays",
            state.display()
        );
    }
}
