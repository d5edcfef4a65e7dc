//! Hand-written declarations for ParavirtualizedGraphics.framework and the
//! Mach VM calls behind task address spaces.
//!
//! The framework's classes are looked up by name at run time
//! ([`class`]) rather than linked as class symbols: two of them are
//! private (`PGIOSurfaceHostDevice*`, `PGMemoryMapDescriptor`), and which
//! selectors a class answers differs between macOS releases, so every
//! message goes through `msg_send!` on `AnyObject` after a
//! `respondsToSelector:` probe where a release may lack it. Only
//! `PGNewDeviceWithDescriptor` is linked.
//!
//! Struct layouts are from `PGDevice.h`/`PGDisplay.h` (macOS 12.1 SDK) and,
//! for the memory-map range, from the QEMU patch series that adopted
//! `PGMemoryMapDescriptor` (apple-gfx.md §2.6; UNCONFIRMED by any Apple
//! header). Encodings must match the framework's: objc2 checks them in
//! debug builds.

use std::ffi::{c_void, CStr};

use objc2::encode::{Encode, Encoding, RefEncode};
use objc2::runtime::{AnyClass, AnyObject, Sel};
use objc2::{msg_send, sel};

/// `PGTask_t`: opaque to everyone; the glue passes a core task id through
/// the pointer value and never dereferences it.
#[repr(C)]
pub struct PgTask {
    _private: [u8; 0],
}

// SAFETY: an opaque struct, only ever used behind a pointer.
unsafe impl RefEncode for PgTask {
    const ENCODING_REF: Encoding = Encoding::Pointer(&Encoding::Struct("PGTask_s", &[]));
}

/// `PGPhysicalMemoryRange_t`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PgPhysicalMemoryRange {
    pub physical_address: u64,
    pub physical_length: u64,
}

// SAFETY: matches the C struct: two uint64_t fields, tag PGPhysicalMemoryRange_s.
unsafe impl Encode for PgPhysicalMemoryRange {
    const ENCODING: Encoding =
        Encoding::Struct("PGPhysicalMemoryRange_s", &[u64::ENCODING, u64::ENCODING]);
}
// SAFETY: pointer to the struct above.
unsafe impl RefEncode for PgPhysicalMemoryRange {
    const ENCODING_REF: Encoding = Encoding::Pointer(&Self::ENCODING);
}

/// `PGGuestPhysicalRange_s`, the argument of `-[PGMemoryMapDescriptor addRange:]`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PgGuestPhysicalRange {
    pub physical_address: u64,
    pub physical_length: u64,
    pub host_address: *mut c_void,
}

// SAFETY: two uint64_t and a pointer, as the range struct is declared by
// the code that uses the private class.
unsafe impl Encode for PgGuestPhysicalRange {
    const ENCODING: Encoding = Encoding::Struct(
        "PGGuestPhysicalRange_s",
        &[u64::ENCODING, u64::ENCODING, <*mut c_void>::ENCODING],
    );
}

/// `PGDisplayCoord_t` (an anonymous struct in the header, hence `?`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PgDisplayCoord {
    pub x: u16,
    pub y: u16,
}

// SAFETY: two uint16_t fields, declared as an untagged struct.
unsafe impl Encode for PgDisplayCoord {
    const ENCODING: Encoding = Encoding::Struct("?", &[u16::ENCODING, u16::ENCODING]);
}

impl From<PgDisplayCoord> for apple_gfx::framework::DisplayCoord {
    fn from(c: PgDisplayCoord) -> Self {
        Self { x: c.x, y: c.y }
    }
}

#[cfg_attr(
    target_os = "macos",
    link(name = "ParavirtualizedGraphics", kind = "framework")
)]
extern "C" {
    /// Returns the device for a filled-in descriptor, or nil.
    pub fn PGNewDeviceWithDescriptor(descriptor: *mut AnyObject) -> *mut AnyObject;
}

// Linking Metal and AppKit comes with the objc2 crates; nothing else to
// name here.

/// A framework class by name, if this macOS has it.
pub fn class(name: &CStr) -> Option<&'static AnyClass> {
    AnyClass::get(name)
}

/// Whether `obj` answers `sel` (the run-time probe for release
/// differences).
pub fn responds(obj: &AnyObject, sel: Sel) -> bool {
    // SAFETY: respondsToSelector: is NSObject API taking a SEL, returning BOOL.
    unsafe { msg_send![obj, respondsToSelector: sel] }
}

/// The selectors whose presence decides the guest-memory interface.
pub fn sel_set_create_task() -> Sel {
    sel!(setCreateTask:)
}
pub fn sel_set_memory_map() -> Sel {
    sel!(setMemoryMapDescriptor:)
}

/// Mach VM (`<mach/mach_vm.h>`), in libSystem. `mach2` would do, but it
/// refuses to compile off Apple targets and we need five calls.
pub mod mach {
    pub type KernReturn = i32;
    pub type MachPort = u32;
    pub type VmProt = i32;

    pub const KERN_SUCCESS: KernReturn = 0;
    pub const VM_FLAGS_FIXED: i32 = 0;
    pub const VM_FLAGS_ANYWHERE: i32 = 1;
    pub const VM_FLAGS_OVERWRITE: i32 = 0x4000;
    pub const VM_PROT_READ: VmProt = 1;
    pub const VM_INHERIT_COPY: u32 = 1;

    extern "C" {
        pub static mach_task_self_: MachPort;
        pub fn mach_vm_allocate(
            target: MachPort,
            addr: *mut u64,
            size: u64,
            flags: i32,
        ) -> KernReturn;
        pub fn mach_vm_deallocate(target: MachPort, addr: u64, size: u64) -> KernReturn;
        pub fn mach_vm_protect(
            target: MachPort,
            addr: u64,
            size: u64,
            set_maximum: i32,
            prot: VmProt,
        ) -> KernReturn;
        #[allow(clippy::too_many_arguments)]
        pub fn mach_vm_remap(
            target: MachPort,
            target_addr: *mut u64,
            size: u64,
            mask: u64,
            flags: i32,
            src_task: MachPort,
            src_addr: u64,
            copy: i32,
            cur_prot: *mut VmProt,
            max_prot: *mut VmProt,
            inheritance: u32,
        ) -> KernReturn;
    }

    /// `mach_task_self()`, a macro over the global in C.
    pub fn task_self() -> MachPort {
        // SAFETY: the kernel sets this global before main and never
        // changes it.
        unsafe { mach_task_self_ }
    }
}

/// C99 `bool` in block signatures. objc2 gives Rust's `bool` no encoding
/// (a Rust `bool` must never hold anything but 0 or 1, which C code does
/// not promise), so blocks take and return this byte instead.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CBool(u8);

impl CBool {
    pub const fn new(b: bool) -> Self {
        Self(b as u8)
    }
    pub const fn get(self) -> bool {
        self.0 != 0
    }
}

// SAFETY: one byte, passed like C99 `_Bool`, encoded as `B`.
unsafe impl Encode for CBool {
    const ENCODING: Encoding = Encoding::Bool;
}
