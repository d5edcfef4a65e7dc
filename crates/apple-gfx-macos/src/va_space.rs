//! [`VaSpace`] over Mach VM: the host side of the framework's task address
//! spaces (apple-gfx.md §6.1–§6.4).
//!
//! The core has already checked every offset, length and alignment against
//! the task and guest RAM before it calls in here; these are the raw
//! operations.

use apple_gfx::memory::VaSpace;

use crate::ffi::mach::*;

/// The calling process's address space.
#[derive(Debug, Default)]
pub struct MachVaSpace;

/// Host page size (16 KiB on Apple silicon): the granule of every alias.
pub fn host_page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(n).unwrap_or(16 << 10)
}

impl VaSpace for MachVaSpace {
    fn reserve(&self, len: u64) -> Option<u64> {
        let mut addr = 0u64;
        // SAFETY: ANYWHERE lets the kernel choose a free range; `addr` is a
        // valid out-pointer.
        let kr = unsafe { mach_vm_allocate(task_self(), &mut addr, len, VM_FLAGS_ANYWHERE) };
        (kr == KERN_SUCCESS).then_some(addr)
    }

    fn alias(&self, target: u64, source: usize, len: u64, read_only: bool) -> bool {
        let mut dest = target;
        let (mut cur, mut max) = (0, 0);
        // SAFETY: `target..target+len` lies inside a reservation this object
        // made (the core checks it), so FIXED|OVERWRITE replaces only our
        // own pages; `source..source+len` is guest RAM that outlives every
        // task. copy = false makes a shared alias, which is the point.
        let kr = unsafe {
            mach_vm_remap(
                task_self(),
                &mut dest,
                len,
                0,
                VM_FLAGS_FIXED | VM_FLAGS_OVERWRITE,
                task_self(),
                source as u64,
                0,
                &mut cur,
                &mut max,
                VM_INHERIT_COPY,
            )
        };
        if kr != KERN_SUCCESS || dest != target {
            tracing::warn!(target: "apple_gfx", kr, target, "apple_gfx_remap failed");
            return false;
        }
        if read_only {
            // SAFETY: protects only the alias just created; guest RAM's
            // own mapping keeps its protection.
            let kr = unsafe { mach_vm_protect(task_self(), target, len, 0, VM_PROT_READ) };
            if kr != KERN_SUCCESS {
                return false;
            }
        }
        true
    }

    fn zero(&self, target: u64, len: u64) -> bool {
        let mut addr = target;
        // SAFETY: as in `alias`, the range lies inside one of our
        // reservations; fresh zero pages replace an alias.
        let kr = unsafe {
            mach_vm_allocate(
                task_self(),
                &mut addr,
                len,
                VM_FLAGS_FIXED | VM_FLAGS_OVERWRITE,
            )
        };
        kr == KERN_SUCCESS
    }

    fn release(&self, base: u64, len: u64) {
        // SAFETY: `base..base+len` is a whole reservation from `reserve`
        // that the core forgets after this call.
        let kr = unsafe { mach_vm_deallocate(task_self(), base, len) };
        if kr != KERN_SUCCESS {
            tracing::warn!(target: "apple_gfx", kr, base, len, "mach_vm_deallocate failed");
        }
    }
}
