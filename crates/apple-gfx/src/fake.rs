//! A fake ParavirtualizedGraphics backend that behaves like a guest driver
//! talking to the framework, so the core can be tested on any host.
//!
//! Registers of the main window are plain storage, except a few command
//! registers ([`CMD_RAISE_IRQ`] …) whose writes make the fake call the
//! core's callbacks *from inside* `mmio_write`, as the real framework does
//! when its register handler waits on its own queues. With
//! [`FakeFramework::set_callbacks_on_worker`] the callbacks come from a
//! separate thread that the write joins, which is the other way the real
//! framework re-enters. Framework-side events that are not tied to a
//! register access (mode changes, frames, cursor) are triggered through
//! [`FakeFramework`] methods.
//!
//! The fake never holds one of its own locks while calling the core.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use vm_core::sync::lock;

use vm_core::memory::create_guest_memory;
use vm_core::{GuestRam, TestIrq};

use crate::cursor::CursorImage;
use crate::device::{AppleGfx, DisplaySink, Executor, GfxConfig, Variant};
use crate::framework::{
    CursorGlyph, DeviceCallbacks, DeviceDescriptor, DisplayCallbacks, DisplayCoord,
    DisplayDescriptor, Framework, FrameworkError, IosfcCallbacks, MemoryInterface, MemorySetup,
    PgDevice, PgDisplay, PgIosfcDevice, PhysRange, TaskId,
};
use crate::irq::MsiSender;
use crate::memory::VaSpace;
use crate::modes::DisplayMode;

/// `mmioLength` the fake reports (the header's recommended 16 KiB).
pub const FAKE_MMIO_LENGTH: u64 = 0x4000;
/// Page size the fake harness uses.
pub const FAKE_PAGE: u64 = 0x1000;

/// Write: `raiseInterrupt(value)`.
pub const CMD_RAISE_IRQ: u64 = 0x3000;
/// Write: low / high half of the address the next commands use.
pub const CMD_ADDR_LO: u64 = 0x3004;
pub const CMD_ADDR_HI: u64 = 0x3008;
/// Write `n` (1–4): `readMemory(addr, n)`; result in [`REG_DATA`], success
/// in [`REG_STATUS`].
pub const CMD_READ_MEMORY: u64 = 0x300c;
/// Write `size`: `createTask(size)`; handle in [`REG_TASK`].
pub const CMD_CREATE_TASK: u64 = 0x3010;
/// Write `offset`: `mapMemory(task, offset, rw, [addr, FAKE_PAGE])`.
pub const CMD_MAP_PAGE: u64 = 0x3014;
/// Write `offset`: `unmapMemory(task, offset, FAKE_PAGE)`.
pub const CMD_UNMAP_PAGE: u64 = 0x3018;
/// Write anything: `destroyTask(task)`.
pub const CMD_DESTROY_TASK: u64 = 0x301c;
/// Write anything: `newFrameEventHandler`.
pub const CMD_NEW_FRAME: u64 = 0x3020;
/// Write `x | y << 16`: move the cursor and call `cursorMoveHandler`.
pub const CMD_MOVE_CURSOR: u64 = 0x3024;
/// Read-only results.
pub const REG_DATA: u64 = 0x3100;
pub const REG_STATUS: u64 = 0x3104;
pub const REG_TASK: u64 = 0x3108;
/// IOSFC window: write `vector`: the IOSurface device's `raiseInterrupt`.
pub const IOSFC_CMD_RAISE_IRQ: u64 = 0x8000;

/// One register access the fake saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Access {
    pub window: &'static str,
    pub write: bool,
    pub offset: u64,
}

#[derive(Default)]
struct Shared {
    regs: Mutex<HashMap<u64, u32>>,
    iosfc_regs: Mutex<HashMap<u64, u32>>,
    log: Mutex<Vec<Access>>,
    device_cb: Mutex<Option<Arc<dyn DeviceCallbacks>>>,
    display_cb: Mutex<Option<Arc<dyn DisplayCallbacks>>>,
    iosfc_cb: Mutex<Option<Arc<dyn IosfcCallbacks>>>,
    memory_setup: Mutex<Option<MemorySetup>>,
    iosfc_memory_setup: Mutex<Option<MemorySetup>>,
    using_iosurface_mapper: AtomicBool,
    display: Mutex<Option<(String, u32, u32)>>,
    modes: Mutex<Vec<DisplayMode>>,
    cursor: Mutex<DisplayCoord>,
    renders: AtomicU64,
    fail_render: AtomicBool,
    resets: AtomicU64,
    on_worker: AtomicBool,
    addr: AtomicU64,
    task: Mutex<Option<TaskId>>,
}

/// The fake framework. Clones share state.
#[derive(Clone)]
pub struct FakeFramework {
    shared: Arc<Shared>,
    interface: MemoryInterface,
    fail_device: bool,
}

impl FakeFramework {
    pub fn new(interface: MemoryInterface) -> Self {
        Self {
            shared: Arc::default(),
            interface,
            fail_device: false,
        }
    }

    /// A framework whose device constructor returns nil.
    pub fn failing() -> Self {
        Self {
            fail_device: true,
            ..Self::new(MemoryInterface::Tasks)
        }
    }

    /// Run command-register callbacks on a worker thread the write waits
    /// for, instead of on the writing thread.
    pub fn set_callbacks_on_worker(&self, on: bool) {
        self.shared.on_worker.store(on, Ordering::SeqCst);
    }

    /// Make renders fail (`encodeCurrentFrame…` returning false).
    pub fn set_render_fails(&self, fail: bool) {
        self.shared.fail_render.store(fail, Ordering::SeqCst);
    }

    pub fn register(&self, offset: u64) -> Option<u32> {
        lock(&self.shared.regs).get(&offset).copied()
    }

    pub fn iosfc_register(&self, offset: u64) -> Option<u32> {
        lock(&self.shared.iosfc_regs).get(&offset).copied()
    }

    pub fn access_log(&self) -> Vec<Access> {
        lock(&self.shared.log).clone()
    }

    /// The descriptor's callbacks, as the framework holds them.
    pub fn device_callbacks(&self) -> Arc<dyn DeviceCallbacks> {
        lock(&self.shared.device_cb)
            .clone()
            .expect("no device created")
    }

    pub fn iosfc_callbacks(&self) -> Arc<dyn IosfcCallbacks> {
        lock(&self.shared.iosfc_cb)
            .clone()
            .expect("no IOSurface device created")
    }

    fn display_callbacks(&self) -> Arc<dyn DisplayCallbacks> {
        lock(&self.shared.display_cb)
            .clone()
            .expect("no display created")
    }

    pub fn memory_setup(&self) -> Option<MemorySetup> {
        lock(&self.shared.memory_setup).clone()
    }

    /// What the IOSurface host device was created with.
    pub fn iosfc_memory_setup(&self) -> Option<MemorySetup> {
        lock(&self.shared.iosfc_memory_setup).clone()
    }

    pub fn using_iosurface_mapper(&self) -> bool {
        self.shared.using_iosurface_mapper.load(Ordering::SeqCst)
    }

    /// (name, port, serial) of the display created.
    pub fn display_info(&self) -> Option<(String, u32, u32)> {
        lock(&self.shared.display).clone()
    }

    /// The last mode list the core assigned.
    pub fn mode_list(&self) -> Vec<DisplayMode> {
        lock(&self.shared.modes).clone()
    }

    pub fn renders(&self) -> u64 {
        self.shared.renders.load(Ordering::SeqCst)
    }

    pub fn resets(&self) -> u64 {
        self.shared.resets.load(Ordering::SeqCst)
    }

    /// The guest switched to `width` × `height`.
    pub fn guest_mode_change(&self, width: u16, height: u16) {
        self.display_callbacks().mode_changed(
            DisplayCoord {
                x: width,
                y: height,
            },
            u32::from_be_bytes(*b"BGRA"),
        );
    }

    /// The guest finished a frame.
    pub fn guest_new_frame(&self) {
        self.display_callbacks().new_frame();
    }

    pub fn guest_cursor_glyph(&self, glyph: CursorGlyph, hotspot: DisplayCoord) {
        self.display_callbacks().cursor_glyph(glyph, hotspot);
    }

    pub fn guest_cursor_show(&self, show: bool) {
        self.display_callbacks().cursor_show(show);
    }

    pub fn guest_cursor_move(&self, x: u16, y: u16) {
        *lock(&self.shared.cursor) = DisplayCoord { x, y };
        self.display_callbacks().cursor_moved();
    }

    fn run_command(shared: &Arc<Shared>, offset: u64, value: u32) {
        let fw = FakeFramework {
            shared: shared.clone(),
            interface: MemoryInterface::Tasks,
            fail_device: false,
        };
        let job = move || fw.command(offset, value);
        if shared.on_worker.load(Ordering::SeqCst) {
            // The framework waiting on its own queue while a callback runs.
            std::thread::spawn(job)
                .join()
                .expect("fake worker panicked");
        } else {
            job();
        }
    }

    fn set_result(&self, reg: u64, value: u32) {
        lock(&self.shared.regs).insert(reg, value);
    }

    fn command(&self, offset: u64, value: u32) {
        let addr = self.shared.addr.load(Ordering::SeqCst);
        let task = *lock(&self.shared.task);
        match offset {
            CMD_RAISE_IRQ => self.device_callbacks().raise_interrupt(value),
            CMD_ADDR_LO => {
                let hi = addr & !0xffff_ffff;
                self.shared
                    .addr
                    .store(hi | u64::from(value), Ordering::SeqCst);
            }
            CMD_ADDR_HI => {
                let lo = addr & 0xffff_ffff;
                self.shared
                    .addr
                    .store(u64::from(value) << 32 | lo, Ordering::SeqCst);
            }
            CMD_READ_MEMORY => {
                let mut buf = [0u8; 4];
                let n = (value as usize).min(4);
                let ok = self.device_callbacks().read_memory(addr, &mut buf[..n]);
                self.set_result(REG_DATA, u32::from_le_bytes(buf));
                self.set_result(REG_STATUS, ok.into());
            }
            CMD_CREATE_TASK => {
                let created = self.device_callbacks().create_task(u64::from(value));
                *lock(&self.shared.task) = created.map(|(t, _)| t);
                self.set_result(REG_TASK, created.map_or(0, |(t, _)| t.0 as u32));
                self.set_result(REG_STATUS, created.is_some().into());
            }
            CMD_MAP_PAGE => {
                let ok = task.is_some_and(|t| {
                    let range = PhysRange {
                        gpa: addr,
                        len: FAKE_PAGE,
                    };
                    self.device_callbacks()
                        .map_memory(t, u64::from(value), false, &[range])
                });
                self.set_result(REG_STATUS, ok.into());
            }
            CMD_UNMAP_PAGE => {
                let ok = task.is_some_and(|t| {
                    self.device_callbacks()
                        .unmap_memory(t, u64::from(value), FAKE_PAGE)
                });
                self.set_result(REG_STATUS, ok.into());
            }
            CMD_DESTROY_TASK => {
                if let Some(t) = lock(&self.shared.task).take() {
                    self.device_callbacks().destroy_task(t);
                }
            }
            CMD_NEW_FRAME => self.guest_new_frame(),
            CMD_MOVE_CURSOR => self.guest_cursor_move(value as u16, (value >> 16) as u16),
            _ => {}
        }
    }
}

impl Framework for FakeFramework {
    fn mmio_length(&self) -> u64 {
        FAKE_MMIO_LENGTH
    }

    fn memory_interface(&self) -> MemoryInterface {
        self.interface
    }

    fn create_device(&self, desc: DeviceDescriptor) -> Result<Arc<dyn PgDevice>, FrameworkError> {
        if self.fail_device {
            return Err(FrameworkError::CreationFailed("device"));
        }
        *lock(&self.shared.device_cb) = Some(desc.callbacks);
        *lock(&self.shared.memory_setup) = Some(desc.memory);
        self.shared
            .using_iosurface_mapper
            .store(desc.using_iosurface_mapper, Ordering::SeqCst);
        Ok(Arc::new(FakeDevice {
            shared: self.shared.clone(),
        }))
    }

    fn create_iosfc_device(
        &self,
        callbacks: Arc<dyn IosfcCallbacks>,
        memory: &MemorySetup,
    ) -> Result<Arc<dyn PgIosfcDevice>, FrameworkError> {
        *lock(&self.shared.iosfc_cb) = Some(callbacks);
        *lock(&self.shared.iosfc_memory_setup) = Some(memory.clone());
        Ok(Arc::new(FakeIosfc {
            shared: self.shared.clone(),
        }))
    }
}

struct FakeDevice {
    shared: Arc<Shared>,
}

impl PgDevice for FakeDevice {
    fn mmio_read(&self, offset: u64) -> u32 {
        lock(&self.shared.log).push(Access {
            window: "gfx",
            write: false,
            offset,
        });
        lock(&self.shared.regs).get(&offset).copied().unwrap_or(0)
    }

    fn mmio_write(&self, offset: u64, value: u32) {
        lock(&self.shared.log).push(Access {
            window: "gfx",
            write: true,
            offset,
        });
        lock(&self.shared.regs).insert(offset, value);
        FakeFramework::run_command(&self.shared, offset, value);
    }

    fn new_display(
        &self,
        desc: DisplayDescriptor,
        port: u32,
        serial: u32,
    ) -> Result<Arc<dyn PgDisplay>, FrameworkError> {
        *lock(&self.shared.display) = Some((desc.name, port, serial));
        *lock(&self.shared.display_cb) = Some(desc.callbacks);
        Ok(Arc::new(FakeDisplay {
            shared: self.shared.clone(),
        }))
    }

    fn reset(&self) {
        self.shared.resets.fetch_add(1, Ordering::SeqCst);
    }
}

struct FakeDisplay {
    shared: Arc<Shared>,
}

impl PgDisplay for FakeDisplay {
    fn set_mode_list(&self, modes: &[DisplayMode]) {
        *lock(&self.shared.modes) = modes.to_vec();
    }

    fn cursor_position(&self) -> DisplayCoord {
        *lock(&self.shared.cursor)
    }

    fn render_frame(&self, _width: u32, _height: u32, pixels: &mut [u32]) -> bool {
        let n = self.shared.renders.fetch_add(1, Ordering::SeqCst) + 1;
        if self.shared.fail_render.load(Ordering::SeqCst) {
            return false;
        }
        pixels.fill(0xff00_0000 | n as u32);
        true
    }
}

struct FakeIosfc {
    shared: Arc<Shared>,
}

impl PgIosfcDevice for FakeIosfc {
    fn mmio_read(&self, offset: u64) -> u32 {
        lock(&self.shared.log).push(Access {
            window: "iosfc",
            write: false,
            offset,
        });
        lock(&self.shared.iosfc_regs)
            .get(&offset)
            .copied()
            .unwrap_or(0)
    }

    fn mmio_write(&self, offset: u64, value: u32) {
        lock(&self.shared.log).push(Access {
            window: "iosfc",
            write: true,
            offset,
        });
        lock(&self.shared.iosfc_regs).insert(offset, value);
        if offset == IOSFC_CMD_RAISE_IRQ {
            let cb = lock(&self.shared.iosfc_cb).clone();
            if let Some(cb) = cb {
                cb.raise_interrupt(value);
            }
        }
    }
}

/// A host address space that only keeps books.
#[derive(Default)]
pub struct FakeVaSpace {
    next: Mutex<u64>,
    aliases: Mutex<BTreeMap<u64, (usize, u64, bool)>>,
    zeroed: Mutex<Vec<(u64, u64)>>,
    released: Mutex<Vec<(u64, u64)>>,
    fail_reserve: AtomicBool,
    fail_alias: AtomicBool,
}

impl FakeVaSpace {
    pub fn new() -> Self {
        Self {
            next: Mutex::new(0x1_0000_0000),
            ..Self::default()
        }
    }

    pub fn fail_reserve(&self, fail: bool) {
        self.fail_reserve.store(fail, Ordering::SeqCst);
    }

    pub fn fail_alias(&self, fail: bool) {
        self.fail_alias.store(fail, Ordering::SeqCst);
    }

    /// Aliases currently in place.
    pub fn aliases(&self) -> usize {
        lock(&self.aliases).len()
    }

    pub fn is_aliased(&self, target: u64) -> bool {
        lock(&self.aliases).contains_key(&target)
    }

    pub fn zeroed(&self) -> Vec<(u64, u64)> {
        lock(&self.zeroed).clone()
    }

    pub fn released(&self) -> Vec<(u64, u64)> {
        lock(&self.released).clone()
    }
}

impl VaSpace for FakeVaSpace {
    fn reserve(&self, len: u64) -> Option<u64> {
        if self.fail_reserve.load(Ordering::SeqCst) {
            return None;
        }
        let mut next = lock(&self.next);
        let base = *next;
        // Keep fake reservations apart by a guard page.
        *next = next.checked_add(len)?.checked_add(FAKE_PAGE)? & !(FAKE_PAGE - 1);
        Some(base)
    }

    fn alias(&self, target: u64, source: usize, len: u64, read_only: bool) -> bool {
        if self.fail_alias.load(Ordering::SeqCst) {
            return false;
        }
        lock(&self.aliases).insert(target, (source, len, read_only));
        true
    }

    fn zero(&self, target: u64, len: u64) -> bool {
        let end = target.saturating_add(len);
        lock(&self.aliases).retain(|&t, _| t < target || t >= end);
        lock(&self.zeroed).push((target, len));
        true
    }

    fn release(&self, base: u64, len: u64) {
        let end = base.saturating_add(len);
        lock(&self.aliases).retain(|&t, _| t < base || t >= end);
        lock(&self.released).push((base, len));
    }
}

/// An executor whose jobs run only when the test says so.
#[derive(Default)]
pub struct ManualExecutor {
    jobs: Mutex<VecDeque<Box<dyn FnOnce() + Send>>>,
}

impl ManualExecutor {
    pub fn queued(&self) -> usize {
        lock(&self.jobs).len()
    }

    /// Runs the oldest job; false if there was none.
    pub fn run_one(&self) -> bool {
        let job = lock(&self.jobs).pop_front();
        match job {
            Some(job) => {
                job();
                true
            }
            None => false,
        }
    }

    /// Runs jobs, including ones queued meanwhile, until none is left.
    pub fn run_all(&self) {
        while self.run_one() {}
    }
}

impl Executor for ManualExecutor {
    fn spawn(&self, job: Box<dyn FnOnce() + Send>) {
        lock(&self.jobs).push_back(job);
    }
}

/// What the UI side was told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SinkEvent {
    Resize(u32, u32),
    /// Size and the first pixel of the frame.
    Present(u32, u32, u32),
    UpdateDone,
    DefineCursor(Option<CursorImage>),
    MoveCursor(u16, u16, bool),
}

/// A [`DisplaySink`] that records.
#[derive(Default)]
pub struct RecordingSink {
    events: Mutex<Vec<SinkEvent>>,
}

impl RecordingSink {
    /// Everything recorded since the last call.
    pub fn take(&self) -> Vec<SinkEvent> {
        std::mem::take(&mut lock(&self.events))
    }
}

impl DisplaySink for RecordingSink {
    fn resize(&self, width: u32, height: u32) {
        lock(&self.events).push(SinkEvent::Resize(width, height));
    }

    fn present(&self, width: u32, height: u32, pixels: &[u32]) {
        assert_eq!(pixels.len(), width as usize * height as usize);
        let first = pixels.first().copied().unwrap_or(0);
        lock(&self.events).push(SinkEvent::Present(width, height, first));
    }

    fn update_done(&self) {
        lock(&self.events).push(SinkEvent::UpdateDone);
    }

    fn define_cursor(&self, cursor: Option<&CursorImage>) {
        lock(&self.events).push(SinkEvent::DefineCursor(cursor.cloned()));
    }

    fn move_cursor(&self, x: u16, y: u16, visible: bool) {
        lock(&self.events).push(SinkEvent::MoveCursor(x, y, visible));
    }
}

/// A PCI function's MSI state, for tests.
#[derive(Default)]
pub struct FakeMsi {
    pub enabled: AtomicBool,
    sent: Mutex<Vec<u32>>,
}

impl FakeMsi {
    pub fn sent(&self) -> Vec<u32> {
        lock(&self.sent).clone()
    }
}

impl MsiSender for FakeMsi {
    fn msi_enabled(&self) -> bool {
        self.enabled.load(Ordering::SeqCst)
    }

    fn send_msi(&self, vector: u32) -> bool {
        lock(&self.sent).push(vector);
        true
    }
}

/// Guest RAM of the harness: two regions with a hole between them.
pub const HARNESS_RAM: [(u64, usize); 2] = [(0x7000_0000, 0x10_0000), (0x8000_0000, 0x10_0000)];

/// A realized device on the fake framework with everything observable.
pub struct Harness {
    pub gfx: AppleGfx,
    pub fake: FakeFramework,
    pub va: Arc<FakeVaSpace>,
    pub memory: Arc<GuestRam>,
    pub gfx_irq: Arc<TestIrq>,
    pub iosfc_irq: Arc<TestIrq>,
    pub msi: Arc<FakeMsi>,
    pub sink: Arc<RecordingSink>,
    pub executor: Arc<ManualExecutor>,
}

impl Harness {
    fn build(fake: FakeFramework, pci: bool, modes: Vec<DisplayMode>) -> Self {
        let memory = Arc::new(create_guest_memory(&HARNESS_RAM).expect("guest memory"));
        let va = Arc::new(FakeVaSpace::new());
        let gfx_irq = Arc::new(TestIrq::new());
        let iosfc_irq = Arc::new(TestIrq::new());
        let msi = Arc::new(FakeMsi::default());
        let sink = Arc::new(RecordingSink::default());
        let executor = Arc::new(ManualExecutor::default());
        let variant = if pci {
            Variant::Pci { msi: msi.clone() }
        } else {
            Variant::Mmio {
                gfx_irq: gfx_irq.clone(),
                iosfc_irq: iosfc_irq.clone(),
            }
        };
        let gfx = AppleGfx::new(
            &fake,
            variant,
            GfxConfig {
                memory: memory.clone(),
                va_space: va.clone(),
                page_size: FAKE_PAGE,
                sink: sink.clone(),
                executor: executor.clone(),
                modes,
            },
        )
        .expect("realize");
        Self {
            gfx,
            fake,
            va,
            memory,
            gfx_irq,
            iosfc_irq,
            msi,
            sink,
            executor,
        }
    }

    /// The MMIO variant on a task-interface framework, default modes.
    pub fn mmio() -> Self {
        Self::build(FakeFramework::new(MemoryInterface::Tasks), false, vec![])
    }

    /// The MMIO variant with a memory-map framework (macOS 27 style).
    pub fn mmio_memory_map() -> Self {
        Self::build(
            FakeFramework::new(MemoryInterface::MemoryMap),
            false,
            vec![],
        )
    }

    pub fn pci() -> Self {
        Self::build(FakeFramework::new(MemoryInterface::Tasks), true, vec![])
    }

    pub fn with_modes(modes: Vec<DisplayMode>) -> Self {
        Self::build(FakeFramework::new(MemoryInterface::Tasks), false, modes)
    }

    /// Points the fake's address register at `addr` through the window.
    pub fn set_addr(&self, addr: u64) {
        self.gfx.write_register(CMD_ADDR_LO, addr as u32);
        self.gfx.write_register(CMD_ADDR_HI, (addr >> 32) as u32);
    }
}
