//! The apple-gfx device core shared by `apple-gfx-mmio` and `apple-gfx-pci`
//! (apple-gfx.md §3, §4, §5, §6, §9, §10, §12).
//!
//! [`AppleGfx`] creates the framework device and display, forwards register
//! accesses, answers the framework's callbacks and runs the frame and cursor
//! state machines, handing results to a [`DisplaySink`] (the UI side).
//!
//! # Locking discipline (§5, §12.3, re-entrant MMIO)
//!
//! The framework calls back into the core while a register access is in
//! progress, on the accessing thread or on a framework thread the access
//! waits for. QEMU survives that by making callbacks defer their work to
//! its big lock, which the waiting vCPU services. Here there is no big
//! lock; the equivalent rule is:
//!
//! 1. no core lock is ever held while calling into the framework
//!    (register accesses, `reset`, `cursorPosition`, rendering);
//! 2. callbacks take only the core's own short locks (`tasks`, `iosfc`,
//!    `state`), one at a time, never call the framework while holding one,
//!    and never wait for a register access to end;
//! 3. guest RAM ([`GuestRam`]) and interrupt lines need no lock at all,
//!    so `readMemory` and `raiseInterrupt` complete immediately on the
//!    calling thread, where QEMU needs a deferred job and a wait.
//!
//! So a callback can always make progress, whichever thread it arrives on,
//! and a register access can never deadlock against it. [`DisplaySink`]
//! methods are called with the `state` lock held (that keeps resize, frame
//! and cursor updates in order); a sink must not call back into the core
//! from inside them.
//!
//! Renders run on an [`Executor`], never on the thread that announced the
//! frame: encoding on a thread that holds framework-internal locks is what
//! deadlocks (§9.3).

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use vm_core::sync::lock;

use vm_core::GuestRam;

use crate::cursor::{convert_glyph, CursorImage, CursorState};
use crate::frame::{FrameAction, FrameState, RenderToken};
use crate::framework::{
    CursorGlyph, DeviceCallbacks, DeviceDescriptor, DisplayCallbacks, DisplayCoord,
    DisplayDescriptor, Framework, FrameworkError, IosfcCallbacks, MemoryInterface, MemorySetup,
    PgDevice, PgDisplay, PgIosfcDevice, PhysRange, TaskId,
};
use crate::irq::{IrqRoute, IrqRouter, MsiSender};
use crate::memory::{memory_map_ranges, IosfcMappings, TaskTable, VaSpace};
use crate::modes::{modes_or_default, DisplayMode};

/// Largest surface the core will allocate (pixels): 8192 × 8192, 256 MiB.
/// A mode change beyond it is refused; the guest's choice of mode is not a
/// licence to exhaust host memory.
pub const MAX_SURFACE_PIXELS: u64 = 8192 * 8192;

/// Name the display reports to the guest (the framework keeps 13 chars).
pub const DISPLAY_NAME: &str = "vmapple";
/// §9.1: a roughly 20-inch panel.
pub const DISPLAY_SIZE_MM: (u32, u32) = (400, 300);

/// Process-wide display serial numbers: the guest ignores displays that
/// share one, so every device gets the next (§3).
static NEXT_SERIAL: AtomicU32 = AtomicU32::new(1);

/// The next display serial number, starting at 1.
pub fn next_display_serial() -> u32 {
    NEXT_SERIAL.fetch_add(1, Ordering::Relaxed)
}

/// Runs renders off the calling thread (libdispatch's global queue in QEMU).
pub trait Executor: Send + Sync {
    fn spawn(&self, job: Box<dyn FnOnce() + Send>);
}

/// An [`Executor`] with one std thread per job.
#[derive(Debug, Default)]
pub struct ThreadExecutor;

impl Executor for ThreadExecutor {
    fn spawn(&self, job: Box<dyn FnOnce() + Send>) {
        std::thread::Builder::new()
            .name("apple-gfx-render".into())
            .spawn(job)
            .map(drop)
            .unwrap_or_else(|e| tracing::error!("apple-gfx: cannot start a render thread: {e}"));
    }
}

/// The host display (a console) that shows what the guest draws.
pub trait DisplaySink: Send + Sync {
    /// The surface changed size; its contents are undefined until the next
    /// [`Self::present`].
    fn resize(&self, width: u32, height: u32);
    /// A complete frame, `width * height` `0xAARRGGBB` words.
    fn present(&self, width: u32, height: u32, pixels: &[u32]);
    /// Answers the UI's last [`AppleGfx::ui_update`].
    fn update_done(&self);
    /// New cursor image; `None` removes it.
    fn define_cursor(&self, cursor: Option<&CursorImage>);
    fn move_cursor(&self, x: u16, y: u16, visible: bool);
}

/// Which front-end this core serves.
pub enum Variant {
    /// `apple-gfx-mmio`: two wired lines, GFX (SPI 0x11 on vmapple) and
    /// IOSFC (SPI 0x10), and the IOSurface host device.
    Mmio {
        gfx_irq: Arc<dyn vm_core::IrqLine>,
        iosfc_irq: Arc<dyn vm_core::IrqLine>,
    },
    /// `apple-gfx-pci`: MSI.
    Pci { msi: Arc<dyn MsiSender> },
}

/// Everything the core needs from the machine.
pub struct GfxConfig {
    pub memory: Arc<GuestRam>,
    /// Host VA operations for the task interface.
    pub va_space: Arc<dyn VaSpace>,
    /// Host page size (16 KiB on Apple Silicon).
    pub page_size: u64,
    pub sink: Arc<dyn DisplaySink>,
    pub executor: Arc<dyn Executor>,
    /// Configured modes; empty means the defaults.
    pub modes: Vec<DisplayMode>,
}

/// Why the device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum GfxError {
    #[error(transparent)]
    Framework(#[from] FrameworkError),
    #[error("{0} display modes given; the framework accepts at most 128")]
    TooManyModes(usize),
}

#[derive(Default)]
struct State {
    frame: FrameState,
    /// Contents of the current surface, `w * h` words.
    surface: Vec<u32>,
    cursor: CursorState,
}

struct Inner {
    memory: Arc<GuestRam>,
    tasks: Mutex<TaskTable>,
    iosfc_maps: Mutex<IosfcMappings>,
    state: Mutex<State>,
    interface: MemoryInterface,
    gfx_irq: IrqRouter,
    iosfc_irq: Option<IrqRouter>,
    sink: Arc<dyn DisplaySink>,
    executor: Arc<dyn Executor>,
    mmio_length: u64,
    device: OnceLock<Arc<dyn PgDevice>>,
    display: OnceLock<Arc<dyn PgDisplay>>,
    iosfc: OnceLock<Arc<dyn PgIosfcDevice>>,
    /// Written by `cursorShowHandler`, read when the cursor is refreshed.
    cursor_show: AtomicBool,
    serial: u32,
}

/// The device core. Cloning gives another handle to the same device.
#[derive(Clone)]
pub struct AppleGfx {
    inner: Arc<Inner>,
}

/// What the framework holds: callbacks must not keep the device alive.
struct Callbacks(Weak<Inner>);

impl AppleGfx {
    /// Realizes the device (§4.2, §7.3, §8.2): IOSurface host device for the
    /// MMIO variant, framework device, display, mode list (hot-plug).
    pub fn new(fw: &dyn Framework, variant: Variant, cfg: GfxConfig) -> Result<Self, GfxError> {
        if cfg.modes.len() > crate::modes::MAX_MODES {
            return Err(GfxError::TooManyModes(cfg.modes.len()));
        }
        let (gfx_route, iosfc_route) = match variant {
            Variant::Mmio { gfx_irq, iosfc_irq } => {
                (IrqRoute::Pulse(gfx_irq), Some(IrqRoute::Pulse(iosfc_irq)))
            }
            Variant::Pci { msi } => (IrqRoute::Msi(msi), None),
        };
        let is_mmio = iosfc_route.is_some();
        let interface = fw.memory_interface();
        let inner = Arc::new(Inner {
            tasks: Mutex::new(TaskTable::new(
                cfg.memory.clone(),
                cfg.va_space,
                cfg.page_size,
            )),
            iosfc_maps: Mutex::new(IosfcMappings::new(cfg.memory.clone())),
            memory: cfg.memory,
            state: Mutex::new(State::default()),
            interface,
            gfx_irq: IrqRouter::new("gfx", gfx_route),
            iosfc_irq: iosfc_route.map(|r| IrqRouter::new("iosfc", r)),
            sink: cfg.sink,
            executor: cfg.executor,
            mmio_length: fw.mmio_length(),
            device: OnceLock::new(),
            display: OnceLock::new(),
            iosfc: OnceLock::new(),
            cursor_show: AtomicBool::new(true),
            serial: next_display_serial(),
        });
        let callbacks = Arc::new(Callbacks(Arc::downgrade(&inner)));
        let memory = match interface {
            MemoryInterface::Tasks => MemorySetup::Tasks,
            MemoryInterface::MemoryMap => MemorySetup::MemoryMap(memory_map_ranges(&inner.memory)),
        };
        if is_mmio {
            let iosfc = fw.create_iosfc_device(callbacks.clone(), &memory)?;
            let _ = inner.iosfc.set(iosfc);
        }
        let device = fw.create_device(DeviceDescriptor {
            callbacks: callbacks.clone(),
            memory,
            using_iosurface_mapper: is_mmio,
        })?;
        let _ = inner.device.set(device.clone());
        let display = device.new_display(
            DisplayDescriptor {
                name: DISPLAY_NAME.into(),
                size_mm: DISPLAY_SIZE_MM,
                callbacks,
            },
            0,
            inner.serial,
        )?;
        let _ = inner.display.set(display.clone());
        let modes = modes_or_default(&cfg.modes);
        for (i, m) in modes.iter().enumerate() {
            tracing::debug!(target: "apple_gfx", i, width = m.width, height = m.height, "apple_gfx_display_mode");
        }
        display.set_mode_list(&modes);
        Ok(Self { inner })
    }

    /// Size of the main register window (the framework's `mmioLength`).
    pub fn mmio_length(&self) -> u64 {
        self.inner.mmio_length
    }

    /// The serial number the display was created with.
    pub fn display_serial(&self) -> u32 {
        self.inner.serial
    }

    /// Forwards a 32-bit register read (§5). Holds no lock: the framework
    /// may call back before it returns.
    pub fn read_register(&self, offset: u64) -> u32 {
        let value = self.inner.device.get().map_or(0, |d| d.mmio_read(offset));
        tracing::trace!(target: "apple_gfx", offset, value, "apple_gfx_read");
        value
    }

    /// Forwards a 32-bit register write (§5).
    pub fn write_register(&self, offset: u64, value: u32) {
        tracing::trace!(target: "apple_gfx", offset, value, "apple_gfx_write");
        if let Some(d) = self.inner.device.get() {
            d.mmio_write(offset, value);
        }
    }

    /// IOSFC window read (§7.2); 0 for the PCI variant.
    pub fn iosfc_read(&self, offset: u64) -> u32 {
        let value = self.inner.iosfc.get().map_or(0, |d| d.mmio_read(offset));
        tracing::trace!(target: "apple_gfx", offset, value, "apple_gfx_mmio_iosfc_read");
        value
    }

    /// IOSFC window write (§7.2).
    pub fn iosfc_write(&self, offset: u64, value: u32) {
        tracing::trace!(target: "apple_gfx", offset, value, "apple_gfx_mmio_iosfc_write");
        if let Some(d) = self.inner.iosfc.get() {
            d.mmio_write(offset, value);
        }
    }

    /// Device reset (§4.4): the framework's `reset` is called with no lock
    /// held (it drains work that may call back), then frame state is
    /// cleared. Tasks belong to the framework and stay.
    pub fn reset(&self) {
        if let Some(d) = self.inner.device.get() {
            d.reset();
        }
        self.inner.step(None, FrameState::reset);
    }

    /// The UI wants the next frame (asynchronous console update, §9.3);
    /// answered through [`DisplaySink::update_done`], now or later.
    pub fn ui_update(&self) {
        self.inner.step(None, FrameState::ui_update);
    }

    /// Renders the guest's current frame again and publishes it once done,
    /// answered through [`DisplaySink::update_done`] like
    /// [`Self::ui_update`]. For a screenshot of a screen the guest no
    /// longer redraws, and for a window that takes frames on the GPU,
    /// which leaves the CPU pipeline unfed: a guest that sent no frame
    /// since the last publish would otherwise give nothing. It goes
    /// through the same state machine as a guest announcement, so it
    /// coalesces with frames in flight.
    pub fn refresh(&self) {
        self.inner.step(None, FrameState::new_frame);
        self.inner.step(None, FrameState::ui_update);
    }

    /// A snapshot of the cursor.
    pub fn cursor(&self) -> CursorState {
        lock(&self.inner.state).cursor.clone()
    }

    /// Current surface size, if a mode was set.
    pub fn surface_size(&self) -> Option<(u32, u32)> {
        lock(&self.inner.state).frame.surface_size()
    }

    /// Frames announced but not yet finished (0–2).
    pub fn pending_frames(&self) -> u8 {
        lock(&self.inner.state).frame.pending()
    }

    /// Interrupts delivered on the GFX source and on the IOSFC source.
    pub fn interrupts_delivered(&self) -> (u64, u64) {
        (
            self.inner.gfx_irq.delivered(),
            self.inner.iosfc_irq.as_ref().map_or(0, |r| r.delivered()),
        )
    }

    /// Interrupts dropped because MSI was disabled.
    pub fn interrupts_dropped(&self) -> u64 {
        self.inner.gfx_irq.dropped()
    }

    /// Runs `f` on the task table (inspection, tests).
    pub fn with_tasks<R>(&self, f: impl FnOnce(&TaskTable) -> R) -> R {
        f(&lock(&self.inner.tasks))
    }

    /// IOSurface host pointers currently handed out.
    pub fn iosfc_mappings(&self) -> usize {
        lock(&self.inner.iosfc_maps).outstanding()
    }
}

impl Inner {
    /// Carries out frame actions with the state lock held. `rendered` holds
    /// the pixels of a just-finished render for `KeepRender`.
    fn apply(
        &self,
        st: &mut State,
        actions: Vec<FrameAction>,
        mut rendered: Option<Vec<u32>>,
    ) -> Option<RenderToken> {
        let mut start = None;
        for a in actions {
            match a {
                FrameAction::ReplaceSurface { width, height } => {
                    st.surface = vec![0; width as usize * height as usize];
                    self.sink.resize(width, height);
                }
                FrameAction::StartRender(token) => start = Some(token),
                FrameAction::KeepRender => {
                    if let Some(px) = rendered.take() {
                        st.surface = px;
                    }
                }
                FrameAction::Publish => {
                    if let Some((w, h)) = st.frame.surface_size() {
                        self.sink.present(w, h, &st.surface);
                    }
                }
                FrameAction::UpdateDone => self.sink.update_done(),
            }
        }
        start
    }

    /// Runs one frame-state transition under the state lock, carries out
    /// its actions, and starts a render (if one is due) after unlocking, so
    /// that an executor which runs jobs at once cannot deadlock.
    fn step(
        self: &Arc<Self>,
        rendered: Option<Vec<u32>>,
        event: impl FnOnce(&mut FrameState) -> Vec<FrameAction>,
    ) {
        let start = {
            let mut st = lock(&self.state);
            let actions = event(&mut st.frame);
            self.apply(&mut st, actions, rendered)
        };
        if let Some(token) = start {
            self.start_render(token);
        }
    }

    /// Queues a render on the executor; it reports back under the lock.
    fn start_render(self: &Arc<Self>, token: RenderToken) {
        let Some(display) = self.display.get().cloned() else {
            return;
        };
        let weak = Arc::downgrade(self);
        self.executor.spawn(Box::new(move || {
            let mut px = vec![0u32; token.width as usize * token.height as usize];
            let ok = display.render_frame(token.width, token.height, &mut px);
            let Some(inner) = weak.upgrade() else {
                return;
            };
            if !ok {
                vm_core::guest_error!("apple-gfx: the framework could not encode a frame");
            }
            inner.step(ok.then_some(px), |f| {
                if ok {
                    f.render_completed(token)
                } else {
                    f.render_failed(token)
                }
            });
        }));
    }

    /// Reads `cursorPosition` (no lock held) and updates the UI's cursor.
    fn refresh_cursor(self: &Arc<Self>, image: Option<Option<CursorImage>>) {
        let pos = self
            .display
            .get()
            .map_or(DisplayCoord::OFF_DISPLAY, |d| d.cursor_position());
        let mut st = lock(&self.state);
        if let Some(image) = image {
            st.cursor.image = image;
            self.sink.define_cursor(st.cursor.image.as_ref());
        }
        st.cursor.position = pos;
        st.cursor.shown = self.cursor_show.load(Ordering::SeqCst);
        let visible = st.cursor.visible();
        self.sink.move_cursor(pos.x, pos.y, visible);
    }
}

impl Callbacks {
    fn inner(&self) -> Option<Arc<Inner>> {
        self.0.upgrade()
    }
}

impl DeviceCallbacks for Callbacks {
    fn create_task(&self, vm_size: u64) -> Option<(TaskId, u64)> {
        let inner = self.inner()?;
        if inner.interface != MemoryInterface::Tasks {
            vm_core::guest_error!("apple-gfx: createTask called although a memory map was given");
            return None;
        }
        let result = lock(&inner.tasks).create(vm_size);
        result
            .map_err(|e| vm_core::guest_error!("apple-gfx: createTask({vm_size:#x}): {e}"))
            .ok()
    }

    fn destroy_task(&self, task: TaskId) {
        if let Some(inner) = self.inner() {
            if let Err(e) = lock(&inner.tasks).destroy(task) {
                vm_core::guest_error!("apple-gfx: destroyTask: {e}");
            }
        }
    }

    fn map_memory(
        &self,
        task: TaskId,
        virtual_offset: u64,
        read_only: bool,
        ranges: &[PhysRange],
    ) -> bool {
        let Some(inner) = self.inner() else {
            return false;
        };
        let result = lock(&inner.tasks).map(task, virtual_offset, read_only, ranges);
        result
            .map_err(|e| vm_core::guest_error!("apple-gfx: mapMemory: {e}"))
            .is_ok()
    }

    fn unmap_memory(&self, task: TaskId, virtual_offset: u64, length: u64) -> bool {
        let Some(inner) = self.inner() else {
            return false;
        };
        let result = lock(&inner.tasks).unmap(task, virtual_offset, length);
        result
            .map_err(|e| vm_core::guest_error!("apple-gfx: unmapMemory: {e}"))
            .is_ok()
    }

    fn read_memory(&self, gpa: u64, dst: &mut [u8]) -> bool {
        tracing::trace!(target: "apple_gfx", gpa, len = dst.len(), "apple_gfx_read_memory");
        let Some(inner) = self.inner() else {
            return false;
        };
        vm_core::memory::read_exact(&inner.memory, gpa, dst)
            .map_err(|e| vm_core::guest_error!("apple-gfx: readMemory: {e}"))
            .is_ok()
    }

    fn raise_interrupt(&self, vector: u32) {
        if let Some(inner) = self.inner() {
            inner.gfx_irq.raise(vector);
        }
    }
}

impl DisplayCallbacks for Callbacks {
    fn mode_changed(&self, size: DisplayCoord, _pixel_format: u32) {
        tracing::debug!(target: "apple_gfx", x = size.x, y = size.y, "apple_gfx_mode_change");
        let Some(inner) = self.inner() else {
            return;
        };
        let (w, h) = (u32::from(size.x), u32::from(size.y));
        if w == 0 || h == 0 || u64::from(w) * u64::from(h) > MAX_SURFACE_PIXELS {
            vm_core::guest_error!("apple-gfx: refusing a {w}x{h} display mode");
            return;
        }
        inner.step(None, |f| f.mode_changed(w, h));
    }

    fn new_frame(&self) {
        tracing::trace!(target: "apple_gfx", "apple_gfx_new_frame");
        let Some(inner) = self.inner() else {
            return;
        };
        inner.step(None, FrameState::new_frame);
    }

    fn cursor_glyph(&self, glyph: CursorGlyph, hotspot: DisplayCoord) {
        tracing::trace!(target: "apple_gfx", bpp = glyph.bits_per_pixel, w = glyph.width, h = glyph.height, "apple_gfx_cursor_set");
        let Some(inner) = self.inner() else {
            return;
        };
        let image = convert_glyph(&glyph, hotspot)
            .map_err(|e| vm_core::guest_error!("apple-gfx: {e}"))
            .ok();
        inner.refresh_cursor(Some(image));
    }

    fn cursor_show(&self, show: bool) {
        tracing::trace!(target: "apple_gfx", show, "apple_gfx_cursor_show");
        if let Some(inner) = self.inner() {
            inner.cursor_show.store(show, Ordering::SeqCst);
            inner.refresh_cursor(None);
        }
    }

    fn cursor_moved(&self) {
        tracing::trace!(target: "apple_gfx", "apple_gfx_cursor_move");
        if let Some(inner) = self.inner() {
            inner.refresh_cursor(None);
        }
    }
}

impl IosfcCallbacks for Callbacks {
    fn map_memory(&self, gpa: u64, len: u64, read_only: bool) -> Option<usize> {
        let inner = self.inner()?;
        let result = lock(&inner.iosfc_maps).map(gpa, len, read_only);
        tracing::trace!(target: "apple_gfx", gpa, len, read_only, ok = result.is_ok(), "apple_gfx_iosfc_map_memory");
        result
            .map_err(|e| vm_core::guest_error!("apple-gfx: IOSFC mapMemory: {e}"))
            .ok()
    }

    fn unmap_memory(&self, host_addr: usize) -> bool {
        let Some(inner) = self.inner() else {
            return false;
        };
        let result = lock(&inner.iosfc_maps).unmap(host_addr);
        result
            .map_err(|e| vm_core::guest_error!("apple-gfx: IOSFC unmapMemory: {e}"))
            .is_ok()
    }

    fn raise_interrupt(&self, vector: u32) -> bool {
        tracing::trace!(target: "apple_gfx", vector, "apple_gfx_iosfc_raise_irq");
        let Some(inner) = self.inner() else {
            return false;
        };
        match &inner.iosfc_irq {
            Some(r) => {
                r.raise(vector);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::*;
    use crate::framework::MemoryMapRange;
    use crate::memory::host_address;
    use std::sync::mpsc;
    use std::time::Duration;

    const RAM: u64 = HARNESS_RAM[0].0;

    fn glyph_2x1() -> CursorGlyph {
        CursorGlyph {
            bits_per_pixel: 32,
            width: 2,
            height: 1,
            bytes_per_row: 8,
            data: vec![0x10, 0x20, 0x30, 0xff, 0x40, 0x50, 0x60, 0x80],
        }
    }

    /// Runs `f` on a thread and fails the test if it does not finish: a
    /// deadlock shows up as a failure, not a hung test run.
    fn within_deadline<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(Duration::from_secs(20))
            .expect("deadlock: register access did not complete")
    }

    #[test]
    fn realize_creates_device_display_and_hot_plugs_default_modes() {
        let h = Harness::mmio();
        assert_eq!(h.fake.mode_list(), DEFAULT_MODES_VEC.to_vec());
        let (name, port, serial) = h.fake.display_info().unwrap();
        assert_eq!((name.as_str(), port), (DISPLAY_NAME, 0));
        assert_eq!(serial, h.gfx.display_serial());
        assert!(serial >= 1);
        assert!(h.fake.using_iosurface_mapper());
        assert_eq!(h.fake.memory_setup(), Some(MemorySetup::Tasks));
        assert_eq!(h.fake.iosfc_memory_setup(), Some(MemorySetup::Tasks));
        assert_eq!(h.gfx.mmio_length(), FAKE_MMIO_LENGTH);
        // Nothing is shown before the guest picks a mode.
        assert_eq!(h.gfx.surface_size(), None);
    }

    const DEFAULT_MODES_VEC: [DisplayMode; 3] = crate::modes::DEFAULT_MODES;

    #[test]
    fn configured_modes_replace_the_defaults_and_serials_differ() {
        let modes = vec![
            DisplayMode::new(3840, 2160, 60),
            DisplayMode::new(800, 600, 60),
        ];
        let a = Harness::with_modes(modes.clone());
        let b = Harness::mmio();
        assert_eq!(a.fake.mode_list(), modes);
        assert_ne!(a.gfx.display_serial(), b.gfx.display_serial());
    }

    #[test]
    fn realize_failures_are_errors() {
        let h = Harness::mmio();
        let cfg = || GfxConfig {
            memory: h.memory.clone(),
            va_space: h.va.clone(),
            page_size: FAKE_PAGE,
            sink: h.sink.clone(),
            executor: h.executor.clone(),
            modes: vec![],
        };
        let variant = || Variant::Pci { msi: h.msi.clone() };
        let err = AppleGfx::new(&FakeFramework::failing(), variant(), cfg())
            .err()
            .unwrap();
        assert!(matches!(
            err,
            GfxError::Framework(FrameworkError::CreationFailed("device"))
        ));
        let mut too_many = cfg();
        too_many.modes = vec![DisplayMode::new(1, 1, 1); 129];
        let fw = FakeFramework::new(MemoryInterface::Tasks);
        assert!(matches!(
            AppleGfx::new(&fw, variant(), too_many),
            Err(GfxError::TooManyModes(129))
        ));
    }

    #[test]
    fn pci_variant_has_no_iosurface_device() {
        let h = Harness::pci();
        assert!(!h.fake.using_iosurface_mapper());
        h.gfx.iosfc_write(0x10, 5);
        assert_eq!(h.gfx.iosfc_read(0x10), 0);
        assert!(h.fake.access_log().is_empty());
    }

    #[test]
    fn memory_map_framework_gets_all_ram_and_no_tasks() {
        let h = Harness::mmio_memory_map();
        let want: Vec<MemoryMapRange> = HARNESS_RAM
            .iter()
            .map(|&(gpa, len)| MemoryMapRange {
                gpa,
                len: len as u64,
                host_addr: host_address(&h.memory, gpa, 1).unwrap(),
            })
            .collect();
        assert_eq!(
            h.fake.memory_setup(),
            Some(MemorySetup::MemoryMap(want.clone()))
        );
        assert_eq!(
            h.fake.iosfc_memory_setup(),
            Some(MemorySetup::MemoryMap(want))
        );
        h.gfx.write_register(CMD_CREATE_TASK, 0x4000);
        assert_eq!(h.fake.register(REG_STATUS), Some(0));
        assert_eq!(h.gfx.with_tasks(|t| t.task_count()), 0);
    }

    /// Every callback the framework can make from inside a register write,
    /// on the writing thread and on a worker the write waits for.
    fn reentrant_session(on_worker: bool) {
        let h = Harness::mmio();
        h.fake.set_callbacks_on_worker(on_worker);
        h.fake.guest_mode_change(640, 480);
        memory_write(&h, RAM + 0x2000, &0x1234_5678u32.to_le_bytes());
        let h = Arc::new(h);
        let hh = h.clone();
        within_deadline(move || {
            let g = &hh.gfx;
            g.write_register(CMD_CREATE_TASK, 0x10000);
            assert_eq!(g.read_register(REG_STATUS), 1);
            hh.set_addr(RAM + 0x2000);
            g.write_register(CMD_MAP_PAGE, 0x3000);
            assert_eq!(g.read_register(REG_STATUS), 1, "mapMemory");
            g.write_register(CMD_READ_MEMORY, 4);
            assert_eq!(g.read_register(REG_STATUS), 1);
            assert_eq!(g.read_register(REG_DATA), 0x1234_5678);
            g.write_register(CMD_RAISE_IRQ, 3);
            g.write_register(CMD_NEW_FRAME, 0);
            g.write_register(CMD_MOVE_CURSOR, 5 | 7 << 16);
            g.write_register(CMD_UNMAP_PAGE, 0x3000);
            assert_eq!(g.read_register(REG_STATUS), 1, "unmapMemory");
            g.write_register(CMD_DESTROY_TASK, 0);
        });
        assert_eq!(h.gfx_irq.rising_edges(), 1);
        assert_eq!(h.iosfc_irq.rising_edges(), 0);
        assert_eq!(h.executor.queued(), 1, "frame render queued");
        assert_eq!(h.gfx.cursor().position, DisplayCoord { x: 5, y: 7 });
        assert_eq!(h.gfx.with_tasks(|t| t.task_count()), 0);
        assert_eq!(h.va.released().len(), 1);
    }

    fn memory_write(h: &Harness, gpa: u64, bytes: &[u8]) {
        vm_core::memory::write_all(&h.memory, gpa, bytes).unwrap();
    }

    #[test]
    fn callbacks_from_inside_a_register_write_do_not_deadlock() {
        reentrant_session(false);
    }

    #[test]
    fn callbacks_from_a_framework_thread_during_a_write_do_not_deadlock() {
        reentrant_session(true);
    }

    #[test]
    fn concurrent_vcpus_with_reentrant_callbacks() {
        let h = Arc::new(Harness::mmio());
        h.fake.set_callbacks_on_worker(true);
        h.fake.guest_mode_change(64, 64);
        let hh = h.clone();
        within_deadline(move || {
            let threads: Vec<_> = (0..4)
                .map(|i| {
                    let h = hh.clone();
                    std::thread::spawn(move || {
                        for n in 0..50u32 {
                            h.gfx.write_register(CMD_RAISE_IRQ, n);
                            h.gfx.write_register(CMD_NEW_FRAME, 0);
                            h.gfx.write_register(CMD_MOVE_CURSOR, i);
                            h.gfx.write_register(0x100 + u64::from(i) * 4, n);
                            // Renders finishing on this thread while others
                            // announce frames and move the cursor.
                            h.executor.run_one();
                            h.gfx.ui_update();
                        }
                    })
                })
                .collect();
            for t in threads {
                t.join().unwrap();
            }
        });
        assert_eq!(h.gfx_irq.rising_edges(), 200);
        for i in 0..4 {
            assert_eq!(h.fake.register(0x100 + i * 4), Some(49));
        }
        h.executor.run_all();
        assert_eq!(h.gfx.pending_frames(), 0);
    }

    #[test]
    fn guest_memory_reads_outside_ram_fail() {
        let h = Harness::mmio();
        for addr in [0x1000, RAM + 0x10_0000 - 2, u64::MAX - 1] {
            h.set_addr(addr);
            h.gfx.write_register(CMD_READ_MEMORY, 4);
            assert_eq!(h.gfx.read_register(REG_STATUS), 0, "{addr:#x}");
        }
        let mut buf = [0u8; 8];
        assert!(!h
            .fake
            .device_callbacks()
            .read_memory(RAM + 0x10_0000 - 4, &mut buf));
    }

    #[test]
    fn out_of_ram_maps_are_refused_through_the_callbacks() {
        let h = Harness::mmio();
        let cb = h.fake.device_callbacks();
        let (task, _) = cb.create_task(0x8000).unwrap();
        let hole = PhysRange {
            gpa: RAM + 0x10_0000,
            len: FAKE_PAGE,
        };
        assert!(!cb.map_memory(task, 0, false, &[hole]));
        let ok = PhysRange {
            gpa: RAM,
            len: FAKE_PAGE,
        };
        assert!(cb.map_memory(task, 0, false, &[ok]));
        assert!(!cb.map_memory(task, 0, false, &[ok]), "overlap");
        assert!(!cb.map_memory(task, 0x8000, false, &[ok]), "past the task");
        assert!(!cb.unmap_memory(task, 0x8000, FAKE_PAGE));
        assert!(!cb.map_memory(TaskId(77), 0, false, &[ok]));
        cb.destroy_task(TaskId(77));
        assert_eq!(h.va.aliases(), 1);
    }

    #[test]
    fn frame_requested_rendered_presented() {
        let h = Harness::mmio();
        h.fake.guest_mode_change(320, 200);
        assert_eq!(h.sink.take(), vec![SinkEvent::Resize(320, 200)]);
        assert_eq!(h.gfx.surface_size(), Some((320, 200)));
        h.fake.guest_new_frame();
        assert_eq!(h.executor.queued(), 1);
        // A second frame while the first renders: queued behind it, not
        // rendered concurrently; a third coalesces.
        h.fake.guest_new_frame();
        h.fake.guest_new_frame();
        assert_eq!(h.executor.queued(), 1);
        assert_eq!(h.gfx.pending_frames(), 2);
        // The UI asks while rendering: answered by the completion.
        h.gfx.ui_update();
        assert!(h.sink.take().is_empty());
        assert!(h.executor.run_one());
        assert_eq!(
            h.sink.take(),
            vec![
                SinkEvent::Present(320, 200, 0xff00_0001),
                SinkEvent::UpdateDone
            ]
        );
        // The queued frame started when the first finished.
        assert_eq!(h.executor.queued(), 1);
        h.executor.run_all();
        assert_eq!(h.fake.renders(), 2);
        assert!(h.sink.take().is_empty(), "kept until the UI asks");
        h.gfx.ui_update();
        assert_eq!(
            h.sink.take(),
            vec![
                SinkEvent::Present(320, 200, 0xff00_0002),
                SinkEvent::UpdateDone
            ]
        );
        h.gfx.ui_update();
        assert_eq!(h.sink.take(), vec![SinkEvent::UpdateDone]);
    }

    /// An executor that runs each job before `spawn` returns.
    struct InlineExecutor;

    impl Executor for InlineExecutor {
        fn spawn(&self, job: Box<dyn FnOnce() + Send>) {
            job();
        }
    }

    #[test]
    fn an_executor_that_runs_at_once_does_not_deadlock() {
        let h = Harness::mmio();
        let fw = FakeFramework::new(MemoryInterface::Tasks);
        let gfx = AppleGfx::new(
            &fw,
            Variant::Pci { msi: h.msi.clone() },
            GfxConfig {
                memory: h.memory.clone(),
                va_space: h.va.clone(),
                page_size: FAKE_PAGE,
                sink: h.sink.clone(),
                executor: Arc::new(InlineExecutor),
                modes: vec![],
            },
        )
        .unwrap();
        fw.guest_mode_change(8, 8);
        within_deadline(move || {
            fw.guest_new_frame();
            gfx.ui_update();
        });
        assert_eq!(
            h.sink.take(),
            vec![
                SinkEvent::Resize(8, 8),
                SinkEvent::Present(8, 8, 0xff00_0001),
                SinkEvent::UpdateDone
            ]
        );
    }

    #[test]
    fn refresh_renders_a_frame_the_guest_did_not_announce() {
        let h = Harness::mmio();
        h.gfx.refresh();
        assert_eq!(h.sink.take(), vec![SinkEvent::UpdateDone], "no mode yet");
        assert_eq!(h.executor.queued(), 0);
        h.fake.guest_mode_change(24, 16);
        h.fake.guest_new_frame();
        h.executor.run_all();
        h.gfx.ui_update();
        h.sink.take();
        // The guest stays quiet; a refresh still yields a fresh render.
        h.gfx.refresh();
        assert!(h.sink.take().is_empty(), "waits for the render");
        h.executor.run_all();
        assert_eq!(
            h.sink.take(),
            vec![
                SinkEvent::Present(24, 16, 0xff00_0002),
                SinkEvent::UpdateDone
            ]
        );
        assert_eq!(h.fake.renders(), 2);
    }

    #[test]
    fn failed_render_still_answers_the_ui() {
        let h = Harness::mmio();
        h.fake.guest_mode_change(16, 16);
        h.fake.set_render_fails(true);
        h.fake.guest_new_frame();
        h.gfx.ui_update();
        h.sink.take();
        h.executor.run_all();
        assert_eq!(h.sink.take(), vec![SinkEvent::UpdateDone]);
        assert_eq!(h.gfx.pending_frames(), 0);
    }

    #[test]
    fn frames_before_a_mode_and_hostile_modes_are_ignored() {
        let h = Harness::mmio();
        h.fake.guest_new_frame();
        assert_eq!(h.executor.queued(), 0);
        h.fake.guest_mode_change(0, 1080);
        h.fake.guest_mode_change(65535, 65535);
        assert!(h.sink.take().is_empty());
        assert_eq!(h.gfx.surface_size(), None);
        h.fake.guest_mode_change(8192, 8192);
        assert_eq!(h.sink.take(), vec![SinkEvent::Resize(8192, 8192)]);
    }

    #[test]
    fn resize_while_rendering_discards_the_stale_frame() {
        let h = Harness::mmio();
        h.fake.guest_mode_change(32, 32);
        h.fake.guest_new_frame();
        h.fake.guest_mode_change(64, 48);
        h.sink.take();
        h.executor.run_all();
        h.gfx.ui_update();
        assert_eq!(
            h.sink.take(),
            vec![SinkEvent::UpdateDone],
            "nothing stale shown"
        );
    }

    #[test]
    fn cursor_glyph_show_and_move() {
        let h = Harness::mmio();
        h.fake.guest_cursor_move(10, 20);
        assert_eq!(h.sink.take(), vec![SinkEvent::MoveCursor(10, 20, true)]);
        let hot = DisplayCoord { x: 1, y: 0 };
        h.fake.guest_cursor_glyph(glyph_2x1(), hot);
        let img = CursorImage {
            width: 2,
            height: 1,
            hotspot: hot,
            pixels: vec![0xff10_2030, 0x8040_5060],
        };
        assert_eq!(
            h.sink.take(),
            vec![
                SinkEvent::DefineCursor(Some(img.clone())),
                SinkEvent::MoveCursor(10, 20, true)
            ]
        );
        assert_eq!(h.gfx.cursor().image, Some(img));
        h.fake.guest_cursor_show(false);
        assert_eq!(h.sink.take(), vec![SinkEvent::MoveCursor(10, 20, false)]);
        h.fake.guest_cursor_show(true);
        h.fake.guest_cursor_move(0xffff, 0xffff);
        assert_eq!(
            h.sink.take(),
            vec![
                SinkEvent::MoveCursor(10, 20, true),
                SinkEvent::MoveCursor(0xffff, 0xffff, false)
            ]
        );
        // A glyph the core cannot use clears the cursor.
        let mut bad = glyph_2x1();
        bad.bits_per_pixel = 8;
        h.fake.guest_cursor_glyph(bad, hot);
        assert_eq!(h.sink.take()[0], SinkEvent::DefineCursor(None));
        assert_eq!(h.gfx.cursor().image, None);
    }

    #[test]
    fn interrupts_reach_the_right_lines() {
        let h = Harness::mmio();
        h.gfx.write_register(CMD_RAISE_IRQ, 9);
        assert_eq!(
            (h.gfx_irq.rising_edges(), h.iosfc_irq.rising_edges()),
            (1, 0)
        );
        h.gfx.iosfc_write(IOSFC_CMD_RAISE_IRQ, 2);
        assert_eq!(
            (h.gfx_irq.rising_edges(), h.iosfc_irq.rising_edges()),
            (1, 1)
        );
        assert!(h.fake.iosfc_callbacks().raise_interrupt(0));
        assert_eq!(h.iosfc_irq.rising_edges(), 2);
        assert!(!h.gfx_irq.is_asserted() && !h.iosfc_irq.is_asserted());
        assert_eq!(h.gfx.interrupts_delivered(), (1, 2));
    }

    #[test]
    fn pci_interrupts_need_msi_enabled() {
        let h = Harness::pci();
        h.gfx.write_register(CMD_RAISE_IRQ, 0);
        assert!(h.msi.sent().is_empty());
        assert_eq!(h.gfx.interrupts_dropped(), 1);
        h.msi
            .enabled
            .store(true, std::sync::atomic::Ordering::SeqCst);
        h.gfx.write_register(CMD_RAISE_IRQ, 0);
        assert_eq!(h.msi.sent(), vec![0]);
    }

    #[test]
    fn iosfc_mappings_hand_out_guest_ram_only() {
        let h = Harness::mmio();
        let cb = h.fake.iosfc_callbacks();
        let va = cb.map_memory(RAM + 0x100, 0x40, true).unwrap();
        assert_eq!(va, host_address(&h.memory, RAM + 0x100, 1).unwrap());
        assert_eq!(cb.map_memory(0x1000, 0x40, false), None);
        assert_eq!(cb.map_memory(RAM + 0xf_fff0, 0x20, false), None);
        assert_eq!(h.gfx.iosfc_mappings(), 1);
        assert!(cb.unmap_memory(va));
        assert!(!cb.unmap_memory(va));
        assert!(!cb.unmap_memory(0xdead_0000));
        assert_eq!(h.gfx.iosfc_mappings(), 0);
    }

    #[test]
    fn reset_drains_the_framework_and_the_frame_pipeline() {
        let h = Harness::mmio();
        h.fake.guest_mode_change(16, 16);
        h.fake.guest_new_frame();
        h.gfx.ui_update();
        h.sink.take();
        h.gfx.reset();
        assert_eq!(h.fake.resets(), 1);
        assert_eq!(h.sink.take(), vec![SinkEvent::UpdateDone]);
        assert_eq!(h.gfx.pending_frames(), 0);
        // The render from before the reset finishes: ignored.
        h.executor.run_all();
        assert!(h.sink.take().is_empty());
        assert_eq!(h.gfx.surface_size(), Some((16, 16)));
    }

    #[test]
    fn callbacks_after_the_device_is_gone_are_refused() {
        let h = Harness::mmio();
        let cb = h.fake.device_callbacks();
        let Harness { gfx, .. } = h;
        drop(gfx);
        assert_eq!(cb.create_task(0x1000), None);
        let mut b = [0u8; 4];
        assert!(!cb.read_memory(RAM, &mut b));
    }
}
