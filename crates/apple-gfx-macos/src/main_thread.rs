//! Who owns the process's main thread (apple-gfx.md §13.3).
//!
//! AppKit must run on the initial thread, and the main dispatch queue (where
//! display handlers land when a window shows them) is served only while
//! that thread runs its run loop. So with a window the VMM's own loop moves
//! to a spawned thread and the main thread runs the platform loop until the
//! VMM is done. This module is the portable hand-off; `runloop` (macOS)
//! supplies the platform loop. Tests drive it with a fake loop.

use std::sync::mpsc;

/// The platform's main-thread loop.
pub trait PlatformLoop {
    /// Runs until [`LoopStopper::stop`] is called (from any thread).
    fn run(&mut self);
    /// A thread-safe way to end [`Self::run`].
    fn stopper(&self) -> Box<dyn LoopStopper>;
}

/// Ends a [`PlatformLoop::run`] from another thread.
pub trait LoopStopper: Send {
    fn stop(&self);
}

/// Runs `vmm` to completion and returns its result.
///
/// Without a platform loop `vmm` runs right here. With one, `vmm` runs on a
/// thread named `vmm-main` while this (the main) thread runs the loop; when
/// `vmm` returns the loop is stopped and its result handed back, so the
/// caller's clean-up runs on the main thread as usual. A panic in `vmm`
/// stops the loop and is re-raised here.
pub fn run_vmm<T, F>(platform: Option<&mut dyn PlatformLoop>, vmm: F) -> T
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let Some(platform) = platform else {
        return vmm();
    };
    let stopper = platform.stopper();
    let (tx, rx) = mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("vmm-main".into())
        .spawn(move || {
            // Stop the loop however `vmm` ends, panics included.
            struct StopOnDrop(Box<dyn LoopStopper>);
            impl Drop for StopOnDrop {
                fn drop(&mut self) {
                    self.0.stop();
                }
            }
            let _stop = StopOnDrop(stopper);
            let _ = tx.send(vmm());
        })
        .expect("cannot start the VMM thread");
    // A stop may arrive before the loop starts; the loop must then return
    // at once (see the implementations).
    platform.run();
    match rx.recv() {
        Ok(v) => {
            let _ = thread.join();
            v
        }
        Err(_) => match thread.join() {
            Err(panic) => std::panic::resume_unwind(panic),
            Ok(()) => unreachable!("the VMM thread sends its result before ending"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Condvar, Mutex};

    /// A loop that just waits for its stop flag and records its thread.
    #[derive(Default)]
    struct FakeLoop {
        stopped: Arc<(Mutex<bool>, Condvar)>,
        ran_on: Option<std::thread::ThreadId>,
    }

    struct FakeStop(Arc<(Mutex<bool>, Condvar)>);

    impl LoopStopper for FakeStop {
        fn stop(&self) {
            *self.0 .0.lock().unwrap() = true;
            self.0 .1.notify_all();
        }
    }

    impl PlatformLoop for FakeLoop {
        fn run(&mut self) {
            self.ran_on = Some(std::thread::current().id());
            let (m, c) = &*self.stopped;
            let _g = c.wait_while(m.lock().unwrap(), |s| !*s).unwrap();
        }
        fn stopper(&self) -> Box<dyn LoopStopper> {
            Box::new(FakeStop(self.stopped.clone()))
        }
    }

    #[test]
    fn without_a_loop_the_vmm_runs_here() {
        let here = std::thread::current().id();
        assert!(run_vmm(None, move || std::thread::current().id() == here));
    }

    #[test]
    fn with_a_loop_the_vmm_moves_off_the_calling_thread() {
        let here = std::thread::current().id();
        let mut lp = FakeLoop::default();
        let (id, name) = run_vmm(Some(&mut lp), || {
            let t = std::thread::current();
            (t.id(), t.name().map(str::to_owned))
        });
        assert_ne!(id, here);
        assert_eq!(name.as_deref(), Some("vmm-main"));
        assert_eq!(lp.ran_on, Some(here), "the loop ran on the caller's thread");
    }

    #[test]
    fn a_vmm_that_ends_at_once_still_stops_the_loop() {
        let mut lp = FakeLoop::default();
        assert_eq!(run_vmm(Some(&mut lp), || 7), 7);
    }

    #[test]
    fn a_vmm_panic_stops_the_loop_and_reaches_the_caller() {
        let mut lp = FakeLoop::default();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_vmm(Some(&mut lp), || -> u8 { panic!("boom") })
        }));
        assert!(r.is_err());
    }
}
