//! The machine's display device and what the host sees of it.
//!
//! Two devices feed the shared display model ([`display::Display`]):
//! `apple-gfx-mmio` on the vmapple board (vmapple-machine.md §2, §3;
//! apple-gfx.md §7), built from any [`apple_gfx::Framework`] (on macOS the
//! ParavirtualizedGraphics glue, in tests the core's fake), and virtio-gpu
//! on the PCI bus (attached by `pci_devices`), on any host. Front ends
//! (the window, screenshots, VNC) read the model and know no device.
//!
//! The PCI variant, `apple-gfx-pci` ([`apple_gfx::ApplePciGfx`],
//! `--gpu apple-pci`), signals interrupts only by MSI, and vmapple as QEMU
//! has it has no MSI controller (vmapple-machine.md §7.5), which is why
//! QEMU refuses it there. Here it is attached when the machine has
//! `--msi on` ([`pci::PciHost::msi_sink`]); without it the function
//! fails with [`apple_gfx::PciGfxError::NoMsi`] before the framework is
//! touched, and the machine refuses to start.

use std::sync::Arc;

use apple_gfx::cursor::CursorImage as GfxCursor;
use apple_gfx::memory::VaSpace;
use apple_gfx::{AppleGfx, DisplaySink, Executor, Framework};
use display::{CursorImage, Display, Head};

use crate::layout::{GFX_BASE, GFX_IOSFC_BASE, GFX_IOSFC_SIZE, GFX_SLOT, SPI_GFX, SPI_GFX_IOSFC};
use crate::platform::Core;
use crate::registry::{Attachment, Registry};
use crate::MachineError;

pub use apple_gfx::DisplayMode;
pub use display::{Frame, ScreenshotError};

/// Which device shows the guest's display.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GpuKind {
    /// apple-gfx-mmio, for macOS guests; needs ParavirtualizedGraphics.
    #[default]
    AppleGfx,
    /// virtio-gpu (2D) on the PCI bus, for Linux guests; on any host.
    Virtio,
    /// apple-gfx-pci on the PCI bus: needs ParavirtualizedGraphics and
    /// `--msi on` (it signals only by MSI).
    AppleGfxPci,
}

/// Heads virtio-gpu offers at most.
pub const MAX_HEADS: usize = virtio::gpu::MAX_SCANOUTS;

/// The display the user asked for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DisplayConfig {
    pub device: GpuKind,
    /// Modes offered on each head, the first preferred. No heads means
    /// one with the device's defaults; apple-gfx has exactly one.
    pub heads: Vec<Vec<DisplayMode>>,
    /// A host window shows the display (`--display cocoa`): an apple-gfx
    /// device that cannot be created is then an error instead of a
    /// warning.
    pub window: bool,
}

impl DisplayConfig {
    /// The heads with defaults filled in.
    pub(crate) fn head_modes(&self) -> Vec<Vec<DisplayMode>> {
        let mut heads = self.heads.clone();
        if heads.is_empty() {
            heads.push(Vec::new());
        }
        for h in &mut heads {
            if h.is_empty() {
                *h = apple_gfx::DEFAULT_MODES.to_vec();
            }
        }
        heads
    }
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

/// apple-gfx's [`DisplaySink`] as a head of the display model.
pub struct GfxSink(pub Arc<Head>);

// Called with the core's state lock held: only the head's lock is taken,
// and nothing calls back into the core.
impl DisplaySink for GfxSink {
    fn resize(&self, width: u32, height: u32) {
        self.0.set_size(width, height);
    }

    fn present(&self, width: u32, height: u32, pixels: &[u32]) {
        self.0.present(width, height, pixels);
    }

    fn update_done(&self) {
        self.0.frame_done();
    }

    fn define_cursor(&self, cursor: Option<&GfxCursor>) {
        self.0.set_cursor_image(cursor.map(|c| CursorImage {
            width: c.width,
            height: c.height,
            hot_x: u32::from(c.hotspot.x),
            hot_y: u32::from(c.hotspot.y),
            pixels: c.pixels.clone(),
        }));
    }

    fn move_cursor(&self, x: u16, y: u16, visible: bool) {
        self.0.move_cursor(u32::from(x), u32::from(y), visible);
    }
}

/// apple-gfx renders on demand: a screenshot asks it for a frame.
struct GfxRefresh(AppleGfx);

impl display::Refresher for GfxRefresh {
    fn refresh(&self) {
        self.0.refresh();
    }
}

/// apple-gfx-pci as a function of the machine's PCI host, its MSIs into
/// the host's sink (the GIC's message doorbells). No saved state: a
/// snapshot refuses it by name, as it does the MMIO variant.
fn attach_pci(
    reg: &mut Registry,
    pci: &crate::pci_devices::PciBus,
    backend: &GfxBackend,
    config: apple_gfx::GfxConfig,
) -> Result<Arc<AppleGfx>, MachineError> {
    let function = apple_gfx::ApplePciGfx::new(&*backend.framework, config, pci.host.msi_sink())
        .map_err(|e| MachineError::Display {
            what: "cannot create the apple-gfx-pci display device",
            source: Some(Box::new(e)),
        })?;
    let core = function.core().clone();
    reg.attach_pci(
        crate::pci_devices::HOST,
        &pci.host,
        "apple-gfx-pci",
        Arc::new(function),
        None,
    )?;
    Ok(Arc::new(core))
}

/// The USB keyboard and tablet as the display's input sink.
pub(crate) struct UsbInput(pub usb::InputSink);

impl UsbInput {
    fn send(&self, event: usb::InputEvent) {
        if !self.0.send(event) {
            tracing::debug!("display input dropped: the USB device did not take {event:?}");
        }
    }
}

impl display::InputSink for UsbInput {
    fn key(&self, usage: u8, pressed: bool) {
        self.send(usb::InputEvent::Key { usage, pressed });
    }
    fn pointer(&self, x: u16, y: u16) {
        self.send(usb::InputEvent::PointerAbs { x, y });
    }
    fn buttons(&self, mask: u8) {
        self.send(usb::InputEvent::Buttons(mask));
    }
    fn wheel(&self, delta: i8) {
        self.send(usb::InputEvent::Wheel(delta));
    }
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
    pci: &crate::pci_devices::PciBus,
) -> Result<Option<Arc<Display>>, MachineError> {
    let Some(display) =
        display.filter(|d| matches!(d.device, GpuKind::AppleGfx | GpuKind::AppleGfxPci))
    else {
        return Ok(None);
    };
    if display.device == GpuKind::AppleGfxPci && pci.host.msi_sink().is_none() {
        // Refused whatever the front ends: the user asked for this device.
        return Err(MachineError::Display {
            what: "--gpu apple-pci signals only by MSI: add --msi on (or use --gpu apple, the MMIO display)",
            source: None,
        });
    }
    if display.heads.len() > 1 {
        return Err(MachineError::Display {
            what: "apple-gfx has one head: give one mode list, or use --gpu virtio",
            source: None,
        });
    }
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
    let model = Display::new(display.head_modes());
    let head = model.heads()[0].clone();
    let config = |backend: &GfxBackend| apple_gfx::GfxConfig {
        memory: Arc::new(core.memory.clone()),
        va_space: backend.va_space.clone(),
        page_size: backend.page_size,
        sink: Arc::new(GfxSink(head.clone())),
        executor: backend.executor.clone(),
        modes: display.heads.first().cloned().unwrap_or_default(),
    };
    let attached = if display.device == GpuKind::AppleGfxPci {
        attach_pci(reg, pci, &backend, config(&backend))
    } else {
        reg.attach("apple-gfx", |wires| {
            let variant = apple_gfx::Variant::Mmio {
                gfx_irq: wires.spi(SPI_GFX),
                iosfc_irq: wires.spi(SPI_GFX_IOSFC),
            };
            let gfx =
                AppleGfx::new(&*backend.framework, variant, config(&backend)).map_err(|e| {
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
        })
    };
    match attached {
        Ok(gfx) => {
            model.set_refresher(Arc::new(GfxRefresh((*gfx).clone())));
            Ok(Some(model))
        }
        // Only the device's creation fails with this error.
        Err(e @ MachineError::Display { .. }) => refuse(e),
        Err(e) => Err(e),
    }
}
