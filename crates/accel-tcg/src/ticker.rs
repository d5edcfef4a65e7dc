//! A thread that kicks the engine at a deadline.
//!
//! The engine only returns to the scheduler when something makes it: the
//! guest (WFI, an exception the host handles) or a kick. Timer interrupts
//! and the end of a time slice are deadlines in host time, so this thread
//! sleeps until the earliest one and kicks.

use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;
use vm_core::sync::{lock, wait, wait_timeout};

use crate::engine::KickHandle;

#[derive(Default)]
struct State {
    deadline: Option<Instant>,
    quit: bool,
}

pub struct Ticker {
    shared: Arc<(Mutex<State>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl Ticker {
    pub fn new(kick: KickHandle) -> Self {
        let shared = Arc::new((Mutex::new(State::default()), Condvar::new()));
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("vcpu-ticker".into())
            .spawn(move || {
                precise_sleeps();
                Self::main(&thread_shared, &kick)
            })
            .expect("spawning the vCPU ticker thread");
        Self {
            shared,
            thread: Some(thread),
        }
    }

    fn main(shared: &(Mutex<State>, Condvar), kick: &KickHandle) {
        let (state_lock, wake) = shared;
        let mut state = lock(state_lock);
        loop {
            if state.quit {
                return;
            }
            match state.deadline {
                None => state = wait(wake, state),
                Some(deadline) => {
                    let now = Instant::now();
                    if now >= deadline {
                        state.deadline = None;
                        kick.kick();
                    } else {
                        state = wait_timeout(wake, state, deadline - now).0;
                    }
                }
            }
        }
    }

    /// Kick at `deadline` (replacing any earlier one); `None` disarms.
    pub fn arm(&self, deadline: Option<Instant>) {
        let (state_lock, wake) = &*self.shared;
        lock(state_lock).deadline = deadline;
        wake.notify_one();
    }

    pub fn disarm(&self) {
        let (state_lock, _) = &*self.shared;
        lock(state_lock).deadline = None;
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        let (state_lock, wake) = &*self.shared;
        lock(state_lock).quit = true;
        wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Timed waits of the calling thread wake when asked rather than up to
/// Linux's default 50 us timer slack later: guest timer interrupts are due
/// at exact instants (QEMU does the same for its threads).
pub fn precise_sleeps() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_TIMERSLACK takes an integer and affects only the
    // calling thread.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0);
    }
}
