//! [`Framework`], [`PgDevice`] and [`PgIosfcDevice`] over
//! ParavirtualizedGraphics.framework.
//!
//! Every descriptor block forwards to the core's callbacks at once, on the
//! framework's thread: the core's locking rules (crate `apple-gfx`,
//! `device` module) make that safe, so nothing here queues work or takes a
//! lock of its own.

use std::ffi::c_void;
use std::ptr;
use std::sync::{Arc, Mutex};
use vm_core::sync::lock;

use apple_gfx::framework::{
    DeviceCallbacks, DeviceDescriptor, DisplayDescriptor, Framework, FrameworkError,
    IosfcCallbacks, MemoryInterface, MemoryMapRange, MemorySetup, PgDevice, PgDisplay,
    PgIosfcDevice, PhysRange, TaskId,
};
use block2::RcBlock;
use dispatch2::{DispatchQueue, DispatchRetained};
use objc2::rc::Retained;
use objc2::runtime::{AnyObject, ProtocolObject};
use objc2::{msg_send, sel};
use objc2_metal::{MTLCommandQueue, MTLCopyAllDevices, MTLCreateSystemDefaultDevice, MTLDevice};

use crate::display::MacDisplay;
use crate::ffi::{
    self, class, responds, CBool, PgGuestPhysicalRange, PgPhysicalMemoryRange, PgTask,
};
use crate::gpu::{self, GpuInfo};

/// An Objective-C object shared between threads.
///
/// The framework's device, display and IOSurface host device, Metal
/// devices and command queues are documented as callable from any thread
/// (PVG's own callbacks arrive on its dispatch queues, Metal objects other
/// than encoders are thread-safe); objc2 cannot know that, so this one
/// wrapper says it.
pub(crate) struct Shared<T: ?Sized>(pub(crate) Retained<T>);

// SAFETY: see the type's documentation; only thread-safe framework objects
// are wrapped.
unsafe impl<T: ?Sized> Send for Shared<T> {}
// SAFETY: as above.
unsafe impl<T: ?Sized> Sync for Shared<T> {}

impl<T: ?Sized> std::ops::Deref for Shared<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// Where the display handlers run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DisplayQueue {
    /// The main dispatch queue, as QEMU does: needs the main thread to run
    /// its run loop (crate::runloop). Nothing of ours needs it since the
    /// window reads the display model; kept for the framework's sake
    /// should a private queue turn out not to do (see below).
    Main,
    /// A private serial queue, so a headless VMM needs no main run loop.
    /// UNCONFIRMED that the framework has no other need of the main queue
    /// (apple-gfx.md §19 q. 3).
    Private,
}

/// What devices and displays share: the GPU and where handlers run.
pub(crate) struct FwShared {
    pub(crate) mtl: Shared<ProtocolObject<dyn MTLDevice>>,
    pub(crate) queue: Shared<ProtocolObject<dyn MTLCommandQueue>>,
    display_queue: Option<DispatchRetained<DispatchQueue>>,
    displays: Mutex<Vec<Arc<MacDisplay>>>,
}

// SAFETY: a dispatch queue is thread-safe by design; the rest is Send +
// Sync already.
unsafe impl Send for FwShared {}
// SAFETY: as above.
unsafe impl Sync for FwShared {}

impl FwShared {
    pub(crate) fn display_queue(&self) -> &DispatchQueue {
        self.display_queue
            .as_deref()
            .unwrap_or(DispatchQueue::main())
    }
}

/// ParavirtualizedGraphics.framework on this host.
pub struct MacFramework {
    shared: Arc<FwShared>,
    interface: MemoryInterface,
    mmio_length: u64,
}

fn new_object(class_name: &std::ffi::CStr) -> Result<Retained<AnyObject>, FrameworkError> {
    let cls = class(class_name).ok_or(FrameworkError::Unsupported("a class it needs"))?;
    // SAFETY: `new` on an NSObject subclass returns a retained instance.
    let obj: Option<Retained<AnyObject>> = unsafe { msg_send![cls, new] };
    obj.ok_or(FrameworkError::CreationFailed("descriptor"))
}

fn pick_metal_device() -> Option<Retained<ProtocolObject<dyn MTLDevice>>> {
    let all = MTLCopyAllDevices();
    let infos: Vec<GpuInfo> = all
        .iter()
        .map(|d| GpuInfo {
            unified: d.hasUnifiedMemory(),
            removable: d.isRemovable(),
        })
        .collect();
    match gpu::pick(&infos) {
        Some(i) => Some(all.objectAtIndex(i)),
        None => MTLCreateSystemDefaultDevice(),
    }
}

impl MacFramework {
    /// Finds the framework's classes, decides the guest-memory interface
    /// and picks the GPU.
    pub fn new(display_queue: DisplayQueue) -> Result<Self, FrameworkError> {
        let probe = new_object(c"PGDeviceDescriptor")?;
        // SAFETY: mmioLength is a size_t property of every release.
        let mmio_length: usize = unsafe { msg_send![&*probe, mmioLength] };
        let interface = memory_interface(&probe)?;
        let mtl = pick_metal_device().ok_or(FrameworkError::CreationFailed("Metal device"))?;
        let queue = mtl
            .newCommandQueue()
            .ok_or(FrameworkError::CreationFailed("Metal command queue"))?;
        let display_queue = match display_queue {
            DisplayQueue::Main => None,
            DisplayQueue::Private => Some(DispatchQueue::new("vmapple.apple-gfx.display", None)),
        };
        tracing::info!(
            target: "apple_gfx",
            ?interface,
            mmio_length,
            "ParavirtualizedGraphics ready"
        );
        Ok(Self {
            shared: Arc::new(FwShared {
                mtl: Shared(mtl),
                queue: Shared(queue),
                display_queue,
                displays: Mutex::new(Vec::new()),
            }),
            interface,
            mmio_length: mmio_length as u64,
        })
    }

    /// Every display created so far.
    pub fn displays(&self) -> Vec<Arc<MacDisplay>> {
        lock(&self.shared.displays).clone()
    }

    /// The GPU the framework renders with.
    pub fn metal_device(&self) -> &ProtocolObject<dyn MTLDevice> {
        &self.shared.mtl
    }
}

/// The memory map whenever this release has it (it is what newer releases
/// require, and the IOSurface mapper lost its map/unmap blocks in it first,
/// macOS 15.4 per the QEMU patches), else the task blocks.
fn memory_interface(desc: &AnyObject) -> Result<MemoryInterface, FrameworkError> {
    let map_class = class(c"PGMemoryMapDescriptor").is_some();
    let iosfc_ok = class(c"PGIOSurfaceHostDeviceDescriptor").is_none_or(|cls| {
        // SAFETY: as in `new_object`.
        let d: Option<Retained<AnyObject>> = unsafe { msg_send![cls, new] };
        d.is_some_and(|d| responds(&d, ffi::sel_set_memory_map()))
    });
    if map_class && iosfc_ok && responds(desc, ffi::sel_set_memory_map()) {
        Ok(MemoryInterface::MemoryMap)
    } else if responds(desc, ffi::sel_set_create_task()) {
        Ok(MemoryInterface::Tasks)
    } else {
        Err(FrameworkError::Unsupported(
            "guest-memory interface (neither task blocks nor a memory map)",
        ))
    }
}

fn memory_map(ranges: &[MemoryMapRange]) -> Result<Retained<AnyObject>, FrameworkError> {
    let map = new_object(c"PGMemoryMapDescriptor")?;
    for r in ranges {
        let range = PgGuestPhysicalRange {
            physical_address: r.gpa,
            physical_length: r.len,
            host_address: r.host_addr as *mut c_void,
        };
        // SAFETY: addRange: takes the struct by value; the host range is
        // guest RAM, which stays mapped for the life of the VM.
        let () = unsafe { msg_send![&*map, addRange: range] };
    }
    Ok(map)
}

fn set_memory_map(desc: &AnyObject, ranges: &[MemoryMapRange]) -> Result<(), FrameworkError> {
    let map = memory_map(ranges)?;
    // SAFETY: probed by `memory_interface`; the property copies or retains.
    let () = unsafe { msg_send![desc, setMemoryMapDescriptor: &*map] };
    Ok(())
}

/// Installs createTask … unmapMemory, which forward to the core.
fn install_task_blocks(desc: &AnyObject, cb: &Arc<dyn DeviceCallbacks>) {
    let c = cb.clone();
    let create = RcBlock::new(move |size: u64, base: *mut *mut c_void| -> *mut PgTask {
        let made = c.create_task(size);
        if !base.is_null() {
            let addr = made.map_or(0, |(_, a)| a as usize);
            // SAFETY: the framework passes a pointer to its base-address
            // variable; null was checked.
            unsafe { *base = ptr::without_provenance_mut(addr) };
        }
        // Task ids start at 1, so a created task is never null.
        made.map_or(ptr::null_mut(), |(id, _)| {
            ptr::without_provenance_mut(id.0 as usize)
        })
    });
    let c = cb.clone();
    let destroy = RcBlock::new(move |task: *mut PgTask| {
        c.destroy_task(TaskId(task as usize as u64));
    });
    let c = cb.clone();
    let map = RcBlock::new(
        move |task: *mut PgTask,
              count: u32,
              offset: u64,
              read_only: CBool,
              ranges: *mut PgPhysicalMemoryRange|
              -> CBool {
            if ranges.is_null() && count != 0 {
                return CBool::new(false);
            }
            let ranges: Vec<PhysRange> = if count == 0 {
                Vec::new()
            } else {
                // SAFETY: the framework passes `count` ranges at `ranges`
                // (non-null, checked), valid for this call.
                unsafe { std::slice::from_raw_parts(ranges, count as usize) }
                    .iter()
                    .map(|r| PhysRange {
                        gpa: r.physical_address,
                        len: r.physical_length,
                    })
                    .collect()
            };
            CBool::new(c.map_memory(
                TaskId(task as usize as u64),
                offset,
                read_only.get(),
                &ranges,
            ))
        },
    );
    let c = cb.clone();
    let unmap = RcBlock::new(move |task: *mut PgTask, offset: u64, len: u64| -> CBool {
        CBool::new(c.unmap_memory(TaskId(task as usize as u64), offset, len))
    });
    // SAFETY: each setter exists when the descriptor answers setCreateTask:
    // (probed); the properties copy the blocks.
    unsafe {
        let () = msg_send![desc, setCreateTask: &*create];
        let () = msg_send![desc, setDestroyTask: &*destroy];
        let () = msg_send![desc, setMapMemory: &*map];
        let () = msg_send![desc, setUnmapMemory: &*unmap];
    }
}

fn install_common_blocks(desc: &AnyObject, cb: &Arc<dyn DeviceCallbacks>) {
    let c = cb.clone();
    let read = RcBlock::new(move |gpa: u64, len: u64, dst: *mut c_void| -> CBool {
        let Ok(len) = usize::try_from(len) else {
            return CBool::new(false);
        };
        if dst.is_null() || len > isize::MAX as usize {
            return CBool::new(false);
        }
        // SAFETY: the framework hands a destination buffer of `len` bytes,
        // valid and unaliased for the duration of the call.
        let buf = unsafe { std::slice::from_raw_parts_mut(dst.cast::<u8>(), len) };
        CBool::new(c.read_memory(gpa, buf))
    });
    let c = cb.clone();
    let irq = RcBlock::new(move |vector: u32| c.raise_interrupt(vector));
    // SAFETY: readMemory and raiseInterrupt exist in every release; the
    // properties copy the blocks.
    unsafe {
        let () = msg_send![desc, setReadMemory: &*read];
        let () = msg_send![desc, setRaiseInterrupt: &*irq];
    }
}

impl Framework for MacFramework {
    fn mmio_length(&self) -> u64 {
        self.mmio_length
    }

    fn memory_interface(&self) -> MemoryInterface {
        self.interface
    }

    fn create_device(&self, d: DeviceDescriptor) -> Result<Arc<dyn PgDevice>, FrameworkError> {
        let desc = new_object(c"PGDeviceDescriptor")?;
        // SAFETY: `device` is an id<MTLDevice> property.
        let () = unsafe { msg_send![&*desc, setDevice: &*self.shared.mtl] };
        match &d.memory {
            MemorySetup::Tasks => install_task_blocks(&desc, &d.callbacks),
            MemorySetup::MemoryMap(ranges) => set_memory_map(&desc, ranges)?,
        }
        install_common_blocks(&desc, &d.callbacks);
        if d.using_iosurface_mapper {
            if !responds(&desc, sel!(setUsingIOSurfaceMapper:)) {
                return Err(FrameworkError::Unsupported("IOSurface mapper (arm64 only)"));
            }
            // SAFETY: private bool property, probed just above.
            let () = unsafe { msg_send![&*desc, setUsingIOSurfaceMapper: true] };
        }
        // SAFETY: a fully set-up descriptor. The result's ownership is not
        // documented (apple-gfx.md §19 q. 8): retaining it costs at worst
        // one leaked device per VM, releasing it wrongly would crash.
        let dev = unsafe {
            let raw = ffi::PGNewDeviceWithDescriptor(Retained::as_ptr(&desc).cast_mut());
            Retained::retain(raw)
        }
        .ok_or(FrameworkError::CreationFailed("device"))?;
        Ok(Arc::new(MacDevice {
            dev: Shared(dev),
            fw: self.shared.clone(),
        }))
    }

    fn create_iosfc_device(
        &self,
        cb: Arc<dyn IosfcCallbacks>,
        memory: &MemorySetup,
    ) -> Result<Arc<dyn PgIosfcDevice>, FrameworkError> {
        let desc = new_object(c"PGIOSurfaceHostDeviceDescriptor")
            .map_err(|_| FrameworkError::Unsupported("IOSurface host device (arm64 only)"))?;
        match memory {
            MemorySetup::Tasks => {
                if !responds(&desc, sel!(setMapMemory:)) {
                    return Err(FrameworkError::Unsupported("IOSurface map blocks"));
                }
                let c = cb.clone();
                // The last two arguments' meaning is unknown (§19 q. 2).
                let map = RcBlock::new(
                    move |gpa: u64,
                          len: u64,
                          ro: CBool,
                          va: *mut *mut c_void,
                          _e: *mut c_void,
                          _f: *mut c_void|
                          -> CBool {
                        let host = c.map_memory(gpa, len, ro.get());
                        if !va.is_null() {
                            // SAFETY: out-pointer from the framework,
                            // non-null (checked).
                            unsafe { *va = ptr::without_provenance_mut(host.unwrap_or(0)) };
                        }
                        CBool::new(host.is_some())
                    },
                );
                let c = cb.clone();
                let unmap = RcBlock::new(
                    move |va: *mut c_void,
                          _b: *mut c_void,
                          _c: *mut c_void,
                          _d: *mut c_void,
                          _e: *mut c_void,
                          _f: *mut c_void|
                          -> CBool { CBool::new(c.unmap_memory(va as usize)) },
                );
                // SAFETY: probed above; the properties copy the blocks.
                unsafe {
                    let () = msg_send![&*desc, setMapMemory: &*map];
                    let () = msg_send![&*desc, setUnmapMemory: &*unmap];
                }
            }
            MemorySetup::MemoryMap(ranges) => {
                set_memory_map(&desc, ranges)?;
                // Releases with the memory map size the IOSurface window from
                // the descriptor (QEMU's 2026 port sets it); ours is the
                // fixed 64 KiB slot at 0x3021_0000.
                if responds(&desc, sel!(setMmioLength:)) {
                    // SAFETY: probed just above; a size_t property.
                    let () = unsafe {
                        msg_send![&*desc, setMmioLength: apple_gfx::mmio::IOSFC_SIZE as usize]
                    };
                }
            }
        }
        let c = cb.clone();
        let irq =
            RcBlock::new(move |vector: u32| -> CBool { CBool::new(c.raise_interrupt(vector)) });
        // SAFETY: raiseInterrupt is present in every release seen.
        let () = unsafe { msg_send![&*desc, setRaiseInterrupt: &*irq] };
        let cls = class(c"PGIOSurfaceHostDevice").ok_or(FrameworkError::Unsupported(
            "IOSurface host device (arm64 only)",
        ))?;
        // SAFETY: alloc + initWithDescriptor: is how the class is built;
        // init consumes the allocation and returns +1 or nil.
        let dev: Option<Retained<AnyObject>> = unsafe {
            let alloc: objc2::rc::Allocated<AnyObject> = msg_send![cls, alloc];
            msg_send![alloc, initWithDescriptor: &*desc]
        };
        let dev = dev.ok_or(FrameworkError::CreationFailed("IOSurface host device"))?;
        Ok(Arc::new(MacIosfcDevice(Shared(dev))))
    }
}

/// `id<PGDevice>`.
pub struct MacDevice {
    dev: Shared<AnyObject>,
    fw: Arc<FwShared>,
}

// Register accesses are made directly on the vCPU thread. QEMU moves them
// to a dispatch queue only because its vCPU holds the big lock that the
// framework's callbacks need; the core holds no lock across these calls
// and its callbacks never wait for one, so there is nothing to avoid.
impl PgDevice for MacDevice {
    fn mmio_read(&self, offset: u64) -> u32 {
        // SAFETY: mmioReadAtOffset: takes a size_t offset inside the
        // window (the bus only routes offsets below mmioLength).
        unsafe { msg_send![&*self.dev, mmioReadAtOffset: offset as usize] }
    }

    fn mmio_write(&self, offset: u64, value: u32) {
        // SAFETY: as for the read.
        unsafe { msg_send![&*self.dev, mmioWriteAtOffset: offset as usize, value: value] }
    }

    fn new_display(
        &self,
        desc: DisplayDescriptor,
        port: u32,
        serial: u32,
    ) -> Result<Arc<dyn PgDisplay>, FrameworkError> {
        let display = MacDisplay::create(&self.dev, &self.fw, desc, port, serial)?;
        lock(&self.fw.displays).push(display.clone());
        Ok(display)
    }

    fn reset(&self) {
        if responds(&self.dev, sel!(reset)) {
            // SAFETY: macOS 12+ method, probed.
            let () = unsafe { msg_send![&*self.dev, reset] };
        }
    }
}

/// The private `PGIOSurfaceHostDevice`.
pub struct MacIosfcDevice(Shared<AnyObject>);

impl PgIosfcDevice for MacIosfcDevice {
    fn mmio_read(&self, offset: u64) -> u32 {
        // SAFETY: same shape as PGDevice's register read.
        unsafe { msg_send![&*self.0, mmioReadAtOffset: offset as usize] }
    }

    fn mmio_write(&self, offset: u64, value: u32) {
        // SAFETY: same shape as PGDevice's register write.
        unsafe { msg_send![&*self.0, mmioWriteAtOffset: offset as usize, value: value] }
    }
}
