//! ParavirtualizedGraphics.framework as the portable core needs it.
//!
//! Follows apple-gfx.md §2 (framework API surface), §6 (descriptor blocks)
//! and §9–§10 (display handlers). The macOS glue implements [`Framework`],
//! [`PgDevice`], [`PgDisplay`] and [`PgIosfcDevice`] with objc2; tests use
//! the fake in `crate::fake`. In the other direction the core implements
//! [`DeviceCallbacks`], [`DisplayCallbacks`] and [`IosfcCallbacks`]: the glue
//! wraps them in the Objective-C blocks of the descriptors.
//!
//! # Threading contract
//!
//! Every callback may arrive on any thread, including the thread that is
//! inside a [`PgDevice::mmio_write`] / [`PgDevice::mmio_read`] call (the
//! framework waits on its own queues during register accesses, and those
//! queues call back, §5). The core therefore never holds one of its locks
//! while it calls into the framework, and a callback never waits for a
//! register access to finish. Framework objects must be `Send + Sync`: the
//! glue wraps the Objective-C protocol objects, which the framework is
//! designed to have called from pool threads (§18.3).
//!
//! # Two ways to reach guest RAM
//!
//! Up to macOS 26 the device descriptor carries `createTask`,
//! `destroyTask`, `mapMemory` and `unmapMemory` blocks, and the host builds
//! task address spaces on request (§6.1–§6.4). The macOS 27 SDK marks
//! `PGTask_t` and `createTask` "obsoleted in macOS 27.0 – No longer
//! supported" (`API_OBSOLETED(…, macos(11.0, 27.0, 27.0))` in `PGDevice.h`,
//! quoted in MacPorts' qemu build-failure PR #34686). The replacement seen
//! in QEMU-derived code is a `PGMemoryMapDescriptor`, filled once through
//! `addRange:` with every guest RAM range as `{physicalAddress,
//! physicalLength, virtualAddress}` and assigned to the descriptor's
//! `memoryMapDescriptor` property (on the device descriptor, and on the
//! IOSurface host device descriptor, whose map/unmap blocks disappeared
//! earlier); the framework then resolves guest addresses itself. It is
//! private API, absent from the public headers, so its details are
//! UNCONFIRMED. The glue chooses at run time (e.g. by probing whether the
//! descriptor still responds to `setCreateTask:`) and reports the result
//! through [`Framework::memory_interface`]; the core then builds a
//! [`MemorySetup`]: either the task bookkeeping behind [`DeviceCallbacks`]
//! or the static RAM map. `readMemory` and `raiseInterrupt` stay in both.

use std::sync::Arc;

use crate::modes::DisplayMode;

/// A guest-physical range as the framework passes it
/// (`PGPhysicalMemoryRange_t`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PhysRange {
    pub gpa: u64,
    pub len: u64,
}

/// One entry of a `PGMemoryMapDescriptor`: a guest RAM range and where it
/// lives in the host address space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryMapRange {
    pub gpa: u64,
    pub len: u64,
    pub host_addr: usize,
}

/// How the framework reaches guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryInterface {
    /// macOS 11–26: `createTask`/`destroyTask`/`mapMemory`/`unmapMemory`
    /// blocks; the host builds task address spaces on request (§6.1–§6.4).
    Tasks,
    /// `PGMemoryMapDescriptor`: the host lists all guest RAM up front and the
    /// task blocks are never called.
    MemoryMap,
}

/// What the core hands the framework for guest memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemorySetup {
    /// Install the task blocks; they forward to [`DeviceCallbacks`].
    Tasks,
    /// Fill a memory-map descriptor with these ranges.
    MemoryMap(Vec<MemoryMapRange>),
}

/// Opaque task handle the core gives the framework (the `PGTask_t *` the
/// glue returns is this number, never dereferenced by the framework).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TaskId(pub u64);

/// `PGDisplayCoord_t`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DisplayCoord {
    pub x: u16,
    pub y: u16,
}

impl DisplayCoord {
    /// `cursorPosition` value meaning "the cursor is not on this display"
    /// (§2.4).
    pub const OFF_DISPLAY: DisplayCoord = DisplayCoord {
        x: 0xffff,
        y: 0xffff,
    };
}

/// A cursor image as the framework hands it over (an `NSBitmapImageRep`'s
/// properties and bytes, §10).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CursorGlyph {
    pub bits_per_pixel: u32,
    pub width: u32,
    pub height: u32,
    pub bytes_per_row: u32,
    /// Pixel bytes, rows of `bytes_per_row`; for 32 bpp each pixel is R, G,
    /// B, A.
    pub data: Vec<u8>,
}

/// The `PGDeviceDescriptor` the core builds (§2.1, §7.3).
pub struct DeviceDescriptor {
    /// Receives `createTask` … `raiseInterrupt`.
    pub callbacks: Arc<dyn DeviceCallbacks>,
    pub memory: MemorySetup,
    /// The private `usingIOSurfaceMapper` flag: set by the MMIO variant,
    /// whose surfaces go through the IOSFC window.
    pub using_iosurface_mapper: bool,
}

/// The `PGDisplayDescriptor` the core builds (§9.1).
pub struct DisplayDescriptor {
    /// Guest-visible name; the framework truncates it to 13 characters.
    pub name: String,
    pub size_mm: (u32, u32),
    pub callbacks: Arc<dyn DisplayCallbacks>,
}

/// Why the framework refused to create something.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameworkError {
    #[error("ParavirtualizedGraphics did not create the {0}")]
    CreationFailed(&'static str),
    #[error("this framework build does not provide the {0}")]
    Unsupported(&'static str),
}

/// The framework itself: constructors and build-dependent facts.
pub trait Framework: Send + Sync {
    /// `mmioLength` of a fresh `PGDeviceDescriptor`: the size of the main
    /// register window.
    fn mmio_length(&self) -> u64;
    /// Which guest-memory interface this build of the framework takes.
    fn memory_interface(&self) -> MemoryInterface;
    /// `PGNewDeviceWithDescriptor` / `PGCreateDeviceWithDescriptor`.
    fn create_device(&self, desc: DeviceDescriptor) -> Result<Arc<dyn PgDevice>, FrameworkError>;
    /// The private `PGIOSurfaceHostDevice` behind the MMIO variant's second
    /// window (§2.6, §7.3). With [`MemorySetup::Tasks`] the glue installs
    /// the descriptor's `mapMemory`/`unmapMemory` blocks (forwarding to
    /// `callbacks`); with [`MemorySetup::MemoryMap`] it sets the
    /// descriptor's `memoryMapDescriptor` instead, because newer framework
    /// builds no longer have those blocks. `raiseInterrupt` is installed
    /// either way.
    fn create_iosfc_device(
        &self,
        callbacks: Arc<dyn IosfcCallbacks>,
        memory: &MemorySetup,
    ) -> Result<Arc<dyn PgIosfcDevice>, FrameworkError>;
}

/// `id<PGDevice>`.
pub trait PgDevice: Send + Sync {
    /// `mmioReadAtOffset:`. May call back into the core before returning.
    fn mmio_read(&self, offset: u64) -> u32;
    /// `mmioWriteAtOffset:value:`. May call back into the core before
    /// returning.
    fn mmio_write(&self, offset: u64, value: u32);
    /// `newDisplayWithDescriptor:port:serialNum:`.
    fn new_display(
        &self,
        desc: DisplayDescriptor,
        port: u32,
        serial: u32,
    ) -> Result<Arc<dyn PgDisplay>, FrameworkError>;
    /// `reset` (macOS 12+): blocks until outstanding work has drained.
    fn reset(&self);
}

/// `id<PGDisplay>`.
pub trait PgDisplay: Send + Sync {
    /// Assigns `modeList`; the first assignment hot-plugs the display.
    fn set_mode_list(&self, modes: &[DisplayMode]);
    /// `cursorPosition`.
    fn cursor_position(&self) -> DisplayCoord;
    /// Renders the current guest frame into `pixels` (`width * height`
    /// words, `0xAARRGGBB`, row-major). In the glue this is
    /// `encodeCurrentFrameToCommandBuffer:` into a BGRA8 texture, the
    /// managed-storage sync, commit, wait, and `getBytes`. `false` when the
    /// framework refused to encode.
    fn render_frame(&self, width: u32, height: u32, pixels: &mut [u32]) -> bool;
}

/// The private `PGIOSurfaceHostDevice`.
pub trait PgIosfcDevice: Send + Sync {
    fn mmio_read(&self, offset: u64) -> u32;
    fn mmio_write(&self, offset: u64, value: u32);
}

/// The descriptor blocks (§6): implemented by the core.
pub trait DeviceCallbacks: Send + Sync {
    /// `createTask`: reserve `vm_size` bytes; `None` on failure. Returns
    /// the handle and the host base address the framework will use.
    fn create_task(&self, vm_size: u64) -> Option<(TaskId, u64)>;
    fn destroy_task(&self, task: TaskId);
    /// `mapMemory`: alias `ranges`, packed back to back, at
    /// `virtual_offset` in the task. `true` only if every range was mapped.
    fn map_memory(
        &self,
        task: TaskId,
        virtual_offset: u64,
        read_only: bool,
        ranges: &[PhysRange],
    ) -> bool;
    fn unmap_memory(&self, task: TaskId, virtual_offset: u64, length: u64) -> bool;
    /// `readMemory`: copy guest memory at `gpa` into `dst`.
    fn read_memory(&self, gpa: u64, dst: &mut [u8]) -> bool;
    /// `raiseInterrupt`.
    fn raise_interrupt(&self, vector: u32);
}

/// The display handlers (§9.1): implemented by the core.
pub trait DisplayCallbacks: Send + Sync {
    fn mode_changed(&self, size: DisplayCoord, pixel_format: u32);
    fn new_frame(&self);
    fn cursor_glyph(&self, glyph: CursorGlyph, hotspot: DisplayCoord);
    fn cursor_show(&self, show: bool);
    fn cursor_moved(&self);
}

/// The IOSurface host device's blocks (§2.6, §7.3): implemented by the core.
pub trait IosfcCallbacks: Send + Sync {
    /// Host address of the guest range, if it lies in one RAM region.
    fn map_memory(&self, gpa: u64, len: u64, read_only: bool) -> Option<usize>;
    fn unmap_memory(&self, host_addr: usize) -> bool;
    fn raise_interrupt(&self, vector: u32) -> bool;
}
