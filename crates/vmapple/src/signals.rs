//! SIGINT and SIGTERM: the first one presses the guest's power button so
//! it can shut down cleanly (vmapple-machine.md §6.8); a second one stops
//! the VM at once.

use std::thread::JoinHandle;

use machine::handle::MachineHandle;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::{Handle, Signals};

/// Forwards signals to `machine` until dropped.
pub struct SignalForwarder {
    handle: Handle,
    thread: Option<JoinHandle<()>>,
}

pub fn forward_to(machine: MachineHandle) -> std::io::Result<SignalForwarder> {
    let mut signals = Signals::new([SIGINT, SIGTERM])?;
    let handle = signals.handle();
    let thread = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut pressed = false;
            for signal in signals.forever() {
                let name = if signal == SIGINT {
                    "SIGINT"
                } else {
                    "SIGTERM"
                };
                if pressed {
                    tracing::warn!("{name} again: stopping the VM now");
                    machine.stop();
                } else {
                    tracing::info!(
                        "{name}: pressing the power button; send it again to stop at once"
                    );
                    machine.power_button();
                    pressed = true;
                }
            }
        })?;
    Ok(SignalForwarder {
        handle,
        thread: Some(thread),
    })
}

impl Drop for SignalForwarder {
    fn drop(&mut self) {
        self.handle.close();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
