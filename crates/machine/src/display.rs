//! The `apple-gfx-mmio` display on the vmapple board (vmapple-machine.md
//! §2, §3; apple-gfx.md §7) and what the host sees of it.
//!
//! The machine builds the device from any [`apple_gfx::Framework`]: on
//! macOS the ParavirtualizedGraphics glue, in tests the core's fake. The
//! host side of the device is a [`Screen`]: the last frame the core
//! published, kept for the control socket's `screenshot`.
//!
//! The PCI variant, `apple-gfx-pci` ([`apple_gfx::ApplePciGfx`]), is not
//! offered: it signals interrupts only by MSI, and vmapple as QEMU has it
//! has no MSI controller (vmapple-machine.md §7.5), which is why QEMU
//! refuses it there too. Built from this machine's PCI host without
//! `--msi on` ([`pci::PciHost::msi_sink`] is `None`) it fails with
//! [`apple_gfx::PciGfxError::NoMsi`]; with it the sink exists, but no
//! option attaches the function yet.

use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use vm_core::sync::{lock, wait_timeout};

use apple_gfx::cursor::CursorImage;
use apple_gfx::memory::VaSpace;
use apple_gfx::{AppleGfx, DisplaySink, Executor, Framework};

use crate::layout::{GFX_BASE, GFX_IOSFC_BASE, GFX_IOSFC_SIZE, GFX_SLOT, SPI_GFX, SPI_GFX_IOSFC};
use crate::platform::Core;
use crate::registry::{Attachment, Registry};
use crate::MachineError;

pub use apple_gfx::DisplayMode;

/// The display the user asked for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DisplayConfig {
    /// Modes offered to the guest, the first preferred; empty means
    /// apple-gfx's defaults.
    pub modes: Vec<DisplayMode>,
    /// A host window shows the display (`--display cocoa`). The display
    /// handlers then run on the main queue, and a device that cannot be
    /// created is an error instead of a warning.
    pub window: bool,
}

/// What the machine needs from the host to build the device: the binary
/// chooses it (ParavirtualizedGraphics on macOS), tests use the core's
/// fake.
pub struct GfxBackend {
    pub framework: Arc<dyn Framework>,
    /// Host address-space operations for the framework's task interface.
    pub va_space: Arc<dyn VaSpace>,
    pub page_size: u64,
    pub executor: Arc<dyn Executor>,
}

/// One frame as the guest drew it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub width: u32,
    pub height: u32,
    /// `width * height` pixels, `0xAARRGGBB`, row-major.
    pub pixels: Vec<u32>,
}

#[derive(Default)]
struct Grabbed {
    frame: Option<Frame>,
    /// `update_done` calls so far: a capture waits for the next one.
    updates: u64,
}

/// A [`DisplaySink`] that keeps the last published frame.
#[derive(Default)]
pub struct FrameGrabber {
    state: Mutex<Grabbed>,
    updated: Condvar,
}

impl FrameGrabber {
    pub fn last_frame(&self) -> Option<Frame> {
        lock(&self.state).frame.clone()
    }

    fn updates(&self) -> u64 {
        lock(&self.state).updates
    }

    /// Waits until more than `seen` updates were answered; false on
    /// timeout.
    fn wait_update(&self, seen: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = lock(&self.state);
        while st.updates <= seen {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            st = wait_timeout(&self.updated, st, left).0;
        }
        true
    }
}

// Called with the core's state lock held: only our own lock is taken, and
// nothing calls back into the core.
impl DisplaySink for FrameGrabber {
    fn resize(&self, _width: u32, _height: u32) {
        // The old frame no longer shows what the guest displays.
        lock(&self.state).frame = None;
    }

    fn present(&self, width: u32, height: u32, pixels: &[u32]) {
        lock(&self.state).frame = Some(Frame {
            width,
            height,
            pixels: pixels.to_vec(),
        });
    }

    fn update_done(&self) {
        lock(&self.state).updates += 1;
        self.updated.notify_all();
    }

    fn define_cursor(&self, _cursor: Option<&CursorImage>) {}

    fn move_cursor(&self, _x: u16, _y: u16, _visible: bool) {}
}

/// Why a screenshot failed.
#[derive(Debug, thiserror::Error)]
pub enum ScreenshotError {
    #[error("the guest has not shown anything on the display yet")]
    NoFrame,
    #[error("the display did not deliver a frame within {0:?}")]
    Timeout(Duration),
    #[error("{}: {error}", path.display())]
    Write {
        path: std::path::PathBuf,
        error: std::io::Error,
    },
}

/// The display as host-side clients (the control socket) see it.
#[derive(Clone)]
pub struct Screen {
    gfx: AppleGfx,
    grabber: Arc<FrameGrabber>,
}

impl Screen {
    pub(crate) fn new(gfx: AppleGfx, grabber: Arc<FrameGrabber>) -> Self {
        Self { gfx, grabber }
    }

    /// The device, for the machine's bus and reset.
    pub fn device(&self) -> &AppleGfx {
        &self.gfx
    }

    /// The guest's current frame: renders it afresh and waits up to
    /// `timeout` for it.
    pub fn capture(&self, timeout: Duration) -> Result<Frame, ScreenshotError> {
        let seen = self.grabber.updates();
        self.gfx.refresh();
        if !self.grabber.wait_update(seen, timeout) {
            return Err(ScreenshotError::Timeout(timeout));
        }
        self.grabber.last_frame().ok_or(ScreenshotError::NoFrame)
    }

    /// Captures the current frame into a PNG file at `path`.
    pub fn screenshot_png(&self, path: &Path, timeout: Duration) -> Result<(), ScreenshotError> {
        let frame = self.capture(timeout)?;
        std::fs::write(path, encode_png(&frame)).map_err(|error| ScreenshotError::Write {
            path: path.to_path_buf(),
            error,
        })
    }
}

/// Encodes `frame` as an 8-bit RGB PNG. Alpha is dropped: a screen is
/// opaque, and guest frames need not fill the alpha byte.
pub fn encode_png(frame: &Frame) -> Vec<u8> {
    let rgb: Vec<u8> = frame
        .pixels
        .iter()
        .flat_map(|&p| [(p >> 16) as u8, (p >> 8) as u8, p as u8])
        .collect();
    let mut png = Vec::new();
    let mut encoder = png::Encoder::new(&mut png, frame.width, frame.height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_compression(png::Compression::Fast);
    // Into a Vec only a frame whose pixel count disagrees with its size can
    // fail; the core never publishes one, and an empty file says so.
    let written = encoder
        .write_header()
        .and_then(|mut writer| writer.write_image_data(&rgb));
    if let Err(e) = written {
        tracing::error!("screenshot: PNG encoding failed: {e}");
        png.clear();
    }
    png
}

/// Attaches the apple-gfx-mmio device on `backend`'s framework, its
/// interrupts on the GIC (§3), if `display` asks for one. A window display
/// without a backend, or whose device cannot be created, is an error; a
/// windowless one is left out with a warning, and the guest then has no
/// display.
pub(crate) fn attach(
    reg: &mut Registry,
    core: &Core,
    display: Option<&DisplayConfig>,
    backend: Option<GfxBackend>,
) -> Result<Option<Screen>, MachineError> {
    let Some(display) = display else {
        return Ok(None);
    };
    let refuse = |e: MachineError| {
        if display.window {
            Err(e)
        } else {
            tracing::warn!(
                "{}; the guest has no display",
                vm_core::error_chain::Chain(&e)
            );
            Ok(None)
        }
    };
    let Some(backend) = backend else {
        if display.window {
            return Err(MachineError::Display {
                what: "this host has no ParavirtualizedGraphics.framework",
                source: None,
            });
        }
        tracing::debug!("no display device: this host has no ParavirtualizedGraphics.framework");
        return Ok(None);
    };
    let grabber = Arc::new(FrameGrabber::default());
    let attached = reg.attach("apple-gfx", |wires| {
        let variant = apple_gfx::Variant::Mmio {
            gfx_irq: wires.spi(SPI_GFX),
            iosfc_irq: wires.spi(SPI_GFX_IOSFC),
        };
        let config = apple_gfx::GfxConfig {
            memory: Arc::new(core.memory.clone()),
            va_space: backend.va_space,
            page_size: backend.page_size,
            sink: grabber.clone(),
            executor: backend.executor,
            modes: display.modes.clone(),
        };
        let gfx = AppleGfx::new(&*backend.framework, variant, config).map_err(|e| {
            MachineError::Display {
                what: "cannot create the apple-gfx display device",
                source: Some(Box::new(e)),
            }
        })?;
        let main = apple_gfx::GfxWindow::new(gfx.clone());
        // The window decodes the framework's mmioLength, at most the
        // 64 KiB slot; the rest of the slot stays unmapped.
        let size = main.size().min(GFX_SLOT);
        let iosfc = apple_gfx::IosfcWindow::new(gfx.clone());
        Ok(Attachment::new(Arc::new(gfx))
            .mmio("apple-gfx", GFX_BASE, size, Arc::new(main))
            .mmio(
                "apple-gfx-iosfc",
                GFX_IOSFC_BASE,
                GFX_IOSFC_SIZE,
                Arc::new(iosfc),
            ))
    });
    match attached {
        Ok(gfx) => Ok(Some(Screen::new((*gfx).clone(), grabber))),
        // Only the device's creation fails with this error.
        Err(e @ MachineError::Display { .. }) => refuse(e),
        Err(e) => Err(e),
    }
}
