//! The host's display backend for the machine's apple-gfx-mmio device:
//! ParavirtualizedGraphics on macOS (Apple silicon), nothing elsewhere.
//! The machine takes whatever backend it is given; choosing it is the
//! binary's business. The window (`--display cocoa`) does not use it: it
//! reads the display model like every front end.

use machine::display::{DisplayConfig, GfxBackend};
use machine::MachineError;

/// ParavirtualizedGraphics as the display backend, its handlers on a
/// private queue (nothing of it belongs to the main thread: the window
/// reads the frames the device writes into the display model). A
/// framework that cannot be set up fails a window display and only costs
/// a windowless one its display.
#[cfg(all(target_os = "macos", target_arch = "aarch64"))]
pub fn open(display: Option<&DisplayConfig>) -> Result<Option<GfxBackend>, MachineError> {
    use apple_gfx_macos::{host_page_size, DisplayQueue, MacFramework, MachVaSpace};
    use machine::display::GpuKind;
    use std::sync::Arc;
    let Some(display) =
        display.filter(|d| matches!(d.device, GpuKind::AppleGfx | GpuKind::AppleGfxPci))
    else {
        return Ok(None);
    };
    match MacFramework::new(DisplayQueue::Private) {
        Ok(fw) => Ok(Some(GfxBackend {
            framework: Arc::new(fw),
            va_space: Arc::new(MachVaSpace),
            page_size: host_page_size(),
            executor: Arc::new(apple_gfx::ThreadExecutor),
        })),
        Err(e) if display.window => Err(MachineError::Display {
            what: "ParavirtualizedGraphics",
            source: Some(Box::new(e)),
        }),
        Err(e) => {
            tracing::warn!("ParavirtualizedGraphics: {e}; the guest has no display");
            Ok(None)
        }
    }
}

/// No ParavirtualizedGraphics here: the machine decides what a display
/// without a backend means (an error for a window, none otherwise).
#[cfg(not(all(target_os = "macos", target_arch = "aarch64")))]
pub fn open(_display: Option<&DisplayConfig>) -> Result<Option<GfxBackend>, MachineError> {
    Ok(None)
}
