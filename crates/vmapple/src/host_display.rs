//! The host's display backend for the machine's apple-gfx-mmio device:
//! ParavirtualizedGraphics on macOS (Apple silicon), nothing elsewhere.
//! The machine takes whatever backend it is given; choosing it is the
//! binary's business.

use machine::display::{DisplayConfig, GfxBackend};
use machine::MachineError;

/// The backend the machine builds its display on, and what the window code
/// needs of it afterwards.
pub struct HostDisplay {
    pub backend: Option<GfxBackend>,
    pub window: HostWindow,
}

/// What a host window needs of the display backend.
#[derive(Default)]
pub struct HostWindow {
    /// The framework behind the backend.
    #[cfg(all(target_os = "macos", target_arch = "aarch64"))]
    pub framework: Option<std::sync::Arc<apple_gfx_macos::MacFramework>>,
}

/// ParavirtualizedGraphics as the display backend: handlers on the main
/// queue for a window (its layer belongs to the main thread), on a private
/// queue otherwise so a headless VMM needs no main run loop. A framework
/// that cannot be set up fails a window display and only costs a
/// windowless one its display.
#[cfg(all(target_os = "macos", target_arch = "aarch64"))]
pub fn open(display: Option<&DisplayConfig>) -> Result<HostDisplay, MachineError> {
    use apple_gfx_macos::{host_page_size, DisplayQueue, MacFramework, MachVaSpace};
    use std::sync::Arc;
    let none = || HostDisplay {
        backend: None,
        window: HostWindow::default(),
    };
    let Some(display) = display else {
        return Ok(none());
    };
    let queue = if display.window {
        DisplayQueue::Main
    } else {
        DisplayQueue::Private
    };
    match MacFramework::new(queue) {
        Ok(fw) => {
            let fw = Arc::new(fw);
            Ok(HostDisplay {
                backend: Some(GfxBackend {
                    framework: fw.clone(),
                    va_space: Arc::new(MachVaSpace),
                    page_size: host_page_size(),
                    executor: Arc::new(apple_gfx::ThreadExecutor),
                }),
                window: HostWindow {
                    framework: Some(fw),
                },
            })
        }
        Err(e) if display.window => Err(MachineError::Display {
            what: "ParavirtualizedGraphics",
            source: Some(Box::new(e)),
        }),
        Err(e) => {
            tracing::warn!("ParavirtualizedGraphics: {e}; the guest has no display");
            Ok(none())
        }
    }
}

/// No ParavirtualizedGraphics here: the machine decides what a display
/// without a backend means (an error for a window, none otherwise).
#[cfg(not(all(target_os = "macos", target_arch = "aarch64")))]
pub fn open(_display: Option<&DisplayConfig>) -> Result<HostDisplay, MachineError> {
    Ok(HostDisplay {
        backend: None,
        window: HostWindow::default(),
    })
}
