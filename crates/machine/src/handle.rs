//! What the host side (signals, the control socket, a UI) can do to a
//! running machine, from any thread, and the events it can watch.

use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use vm_core::sync::lock;

use accel::{StopReason, VmControl};
use arch_arm64::timer::Counter;

/// Something that happened to the VM that a host-side client may care
/// about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MachineEvent {
    /// pvpanic PANICKED; `action` is what the `--on-panic` policy did.
    GuestPanicked {
        action: &'static str,
    },
    /// pvpanic CRASH_LOADED: a crash kernel is loaded; the VM runs on.
    GuestCrashLoaded,
    /// The power button was pressed for the guest.
    PowerButton,
    Paused,
    Resumed,
    /// The guest reset the machine (PSCI SYSTEM_RESET or a host reset).
    Reset,
    /// A snapshot is being written to `path`.
    Saving {
        path: std::path::PathBuf,
    },
    /// The snapshot at `path` is complete.
    Saved {
        path: std::path::PathBuf,
    },
    /// The VM continues from the snapshot at `path`.
    Restored {
        path: std::path::PathBuf,
    },
    /// The guest powered off or the VM stopped; no more events follow.
    Stopped {
        reason: String,
    },
}

/// Events queued per subscriber before the slowest one starts losing
/// them (a client that stops reading must not grow our memory).
const SUBSCRIBER_BACKLOG: usize = 256;

/// Fan-out of [`MachineEvent`]s to any number of subscribers.
#[derive(Default)]
pub struct EventBus {
    subscribers: Mutex<Vec<SyncSender<MachineEvent>>>,
}

impl EventBus {
    pub fn subscribe(&self) -> Receiver<MachineEvent> {
        let (tx, rx) = sync_channel(SUBSCRIBER_BACKLOG);
        lock(&self.subscribers).push(tx);
        rx
    }

    pub fn publish(&self, event: MachineEvent) {
        tracing::debug!(?event, "machine event");
        lock(&self.subscribers).retain(|tx| match tx.try_send(event.clone()) {
            Ok(()) | Err(TrySendError::Full(_)) => true,
            Err(TrySendError::Disconnected(_)) => false,
        });
    }
}

/// A cheap, cloneable remote control for one machine.
#[derive(Clone)]
pub struct MachineHandle {
    pub(crate) control: Arc<VmControl>,
    pub(crate) counter: Arc<Counter>,
    pub(crate) events: Arc<EventBus>,
    pub(crate) power_button: Arc<dyn Fn() + Send + Sync>,
    pub(crate) saves: Arc<crate::snapshot::SaveSlot>,
}

impl MachineHandle {
    /// Presses the power button (GPIO line 3, §6.8): the guest decides
    /// what to do about it.
    pub fn power_button(&self) {
        tracing::info!("power button pressed");
        (self.power_button)();
        self.events.publish(MachineEvent::PowerButton);
    }

    /// Stops the VM now, as pulling the plug would.
    pub fn stop(&self) {
        self.control.request_stop(StopReason::HostStop);
    }

    /// Resets the machine, as the guest's SYSTEM_RESET would.
    pub fn reset(&self) {
        self.control.request_stop(StopReason::Reset);
    }

    /// Parks every vCPU and freezes the guest's clock.
    pub fn pause(&self) {
        if !self.control.is_paused() {
            self.counter.pause();
            self.control.pause();
            tracing::info!("VM paused");
            self.events.publish(MachineEvent::Paused);
        }
    }

    pub fn resume(&self) {
        if self.control.is_paused() {
            self.counter.resume();
            self.control.resume();
            tracing::info!("VM resumed");
            self.events.publish(MachineEvent::Resumed);
        }
    }

    pub fn is_paused(&self) -> bool {
        self.control.is_paused()
    }

    /// Virtual time in counter ticks (24 MHz), frozen while paused.
    pub fn guest_ticks(&self) -> u64 {
        self.counter.now()
    }

    /// Saves a snapshot to `path` (see [`crate::snapshot`]): the vCPUs
    /// stop at an instruction boundary, the machine is written, then they
    /// run on, or the VM stops if `stop`. Blocks until done. A VM that
    /// cannot be saved is refused before anything stops; a failed save
    /// leaves the VM running and no file at `path`.
    pub fn save(
        &self,
        path: std::path::PathBuf,
        stop: bool,
        with_disks: bool,
    ) -> Result<crate::snapshot::SaveReport, crate::snapshot::SnapshotError> {
        use crate::snapshot::{SaveRequest, SnapshotError};
        match &*lock(&self.saves.refusal) {
            None => return Err(SnapshotError::Stopped),
            Some(Some(reason)) => return Err(SnapshotError::Unsupported(reason.clone())),
            Some(None) => {}
        }
        let (reply, answer) = std::sync::mpsc::channel();
        {
            let mut slot = lock(&self.saves.request);
            if slot.is_some() {
                return Err(SnapshotError::Busy);
            }
            *slot = Some(SaveRequest {
                path: path.clone(),
                stop,
                with_disks,
                reply,
            });
        }
        tracing::info!("saving to {}", path.display());
        self.events.publish(MachineEvent::Saving { path });
        self.control.request_stop(StopReason::Save);
        answer.recv().unwrap_or(Err(SnapshotError::Stopped))
    }

    pub fn subscribe(&self) -> Receiver<MachineEvent> {
        self.events.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscribers_get_events_and_dead_ones_are_dropped() {
        let bus = EventBus::default();
        let a = bus.subscribe();
        let b = bus.subscribe();
        bus.publish(MachineEvent::Paused);
        assert_eq!(a.try_recv().unwrap(), MachineEvent::Paused);
        assert_eq!(b.try_recv().unwrap(), MachineEvent::Paused);
        drop(b);
        bus.publish(MachineEvent::Resumed);
        assert_eq!(bus.subscribers.lock().unwrap().len(), 1);
        assert_eq!(a.try_recv().unwrap(), MachineEvent::Resumed);
    }

    #[test]
    fn a_subscriber_that_never_reads_costs_bounded_memory() {
        let bus = EventBus::default();
        let slow = bus.subscribe();
        for _ in 0..10 * SUBSCRIBER_BACKLOG {
            bus.publish(MachineEvent::PowerButton);
        }
        assert_eq!(slow.try_iter().count(), SUBSCRIBER_BACKLOG);
    }

    #[test]
    fn pause_freezes_guest_time_and_resume_restarts_it() {
        let control = Arc::new(VmControl::new(1));
        let counter = Arc::new(Counter::new(arch_arm64::timer::COUNTER_HZ));
        let handle = MachineHandle {
            control: control.clone(),
            counter: counter.clone(),
            events: Arc::default(),
            power_button: Arc::new(|| {}),
            saves: Arc::default(),
        };
        let events = handle.subscribe();
        handle.pause();
        handle.pause();
        assert!(control.is_paused());
        let frozen = handle.guest_ticks();
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert_eq!(handle.guest_ticks(), frozen, "no time passes while paused");
        handle.resume();
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert!(handle.guest_ticks() > frozen);
        let seen: Vec<_> = events.try_iter().collect();
        assert_eq!(seen, vec![MachineEvent::Paused, MachineEvent::Resumed]);
    }
}
