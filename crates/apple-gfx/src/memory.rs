//! How the framework reaches guest RAM: task address spaces, IOSurface
//! mappings and the static memory map.
//!
//! Follows apple-gfx.md §6.1–§6.5 (task blocks), §7.3 (IOSurface mapper) and
//! §2.6 (memory-map descriptor). The bookkeeping here decides everything;
//! the host address-space operations themselves (Mach VM on macOS) sit
//! behind [`VaSpace`].
//!
//! Departures from QEMU, all from the spec's recommendations or the brief:
//!
//! * a `mapMemory` call whose ranges would not fit inside the task is refused
//!   as a whole before anything is mapped (QEMU remaps past the reservation
//!   and clobbers unrelated host memory);
//! * a range that overlaps an existing alias is refused (QEMU overwrites it
//!   silently); whether the framework ever relies on overwriting is
//!   UNCONFIRMED;
//! * read-only ranges are aliased read-only;
//! * ranges not aligned to the host page size, and failed host mapping
//!   calls, fail the range instead of aborting the process;
//! * guest RAM is never released while the VM runs, so QEMU's per-task RAM
//!   region references have nothing to protect and are not modelled.
//!
//! The framework's requests are derived from guest driver commands, so every
//! size and offset is checked arithmetic and every table is bounded.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use vm_core::memory::range_is_ram;
use vm_core::GuestRam;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use crate::framework::{MemoryMapRange, PhysRange, TaskId};

/// Most tasks alive at once.
pub const MAX_TASKS: usize = 4096;
/// Most aliases in one task.
pub const MAX_MAPPINGS_PER_TASK: usize = 1 << 16;
/// Most IOSurface mappings outstanding at once.
pub const MAX_IOSFC_MAPPINGS: usize = 1 << 16;

/// Host virtual-address operations behind tasks (Mach VM on macOS).
pub trait VaSpace: Send + Sync {
    /// Reserves `len` zero-filled bytes anywhere; returns the base.
    fn reserve(&self, len: u64) -> Option<u64>;
    /// Makes `[target, target + len)` a shared alias of the host memory at
    /// `source`, replacing what was there.
    fn alias(&self, target: u64, source: usize, len: u64, read_only: bool) -> bool;
    /// Replaces `[target, target + len)` with fresh zero pages.
    fn zero(&self, target: u64, len: u64) -> bool;
    /// Gives back a whole reservation.
    fn release(&self, base: u64, len: u64);
}

/// Why a memory request was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    #[error("the framework asked for an empty range")]
    Empty,
    #[error("unknown task {0:?}")]
    UnknownTask(TaskId),
    #[error("too many tasks (at most {MAX_TASKS})")]
    TooManyTasks,
    #[error("too many mappings in task (at most {MAX_MAPPINGS_PER_TASK})")]
    TooManyMappings,
    #[error("host address space reservation of {0:#x} bytes failed")]
    ReserveFailed(u64),
    #[error("task range {offset:#x}+{len:#x} lies outside the task ({task_len:#x} bytes)")]
    OutsideTask {
        offset: u64,
        len: u64,
        task_len: u64,
    },
    #[error("guest range {gpa:#x}+{len:#x} is not inside one guest RAM region")]
    NotRam { gpa: u64, len: u64 },
    #[error("{what} {value:#x} is not aligned to the host page size {page:#x}")]
    Unaligned {
        what: &'static str,
        value: u64,
        page: u64,
    },
    #[error("task range {offset:#x}+{len:#x} overlaps an existing mapping at {existing:#x}")]
    Overlap {
        offset: u64,
        len: u64,
        existing: u64,
    },
    #[error("task offset {0:#x} is not mapped")]
    Unmapped(u64),
    #[error("host mapping of task range {offset:#x}+{len:#x} failed")]
    HostMapFailed { offset: u64, len: u64 },
    #[error("no IOSurface mapping at host address {0:#x}")]
    UnknownHostAddress(usize),
    #[error("too many IOSurface mappings (at most {MAX_IOSFC_MAPPINGS})")]
    TooManyIosfcMappings,
}

/// Host address of `[gpa, gpa + len)` if that range lies wholly inside one
/// guest RAM region (a task alias and an IOSurface pointer need host memory
/// that is contiguous, which only a single region guarantees).
pub fn host_address(mem: &GuestRam, gpa: u64, len: u64) -> Result<usize, MapError> {
    if len == 0 {
        return Err(MapError::Empty);
    }
    let not_ram = MapError::NotRam { gpa, len };
    if !range_is_ram(mem, gpa, len) {
        return Err(not_ram);
    }
    let region = mem.find_region(GuestAddress(gpa)).ok_or(not_ram.clone())?;
    let offset = gpa - region.start_addr().0;
    let end = offset.checked_add(len).ok_or(not_ram.clone())?;
    if end > region.len() {
        return Err(not_ram);
    }
    let ptr = region
        .get_host_address(MemoryRegionAddress(offset))
        .map_err(|_| not_ram)?;
    Ok(ptr as usize)
}

/// Every guest RAM region, for a `PGMemoryMapDescriptor`.
pub fn memory_map_ranges(mem: &GuestRam) -> Vec<MemoryMapRange> {
    mem.iter()
        .filter_map(|r| {
            let host = r.get_host_address(MemoryRegionAddress(0)).ok()?;
            Some(MemoryMapRange {
                gpa: r.start_addr().0,
                len: r.len(),
                host_addr: host as usize,
            })
        })
        .collect()
}

/// One alias inside a task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub len: u64,
    pub gpa: u64,
    pub read_only: bool,
}

#[derive(Debug)]
struct Task {
    base: u64,
    len: u64,
    /// Keyed by task offset; never overlapping.
    mappings: BTreeMap<u64, Mapping>,
}

impl Task {
    /// The first mapping that intersects `[offset, end)`, as (offset, mapping).
    fn first_overlap(&self, offset: u64, end: u64) -> Option<(u64, Mapping)> {
        if let Some((&o, m)) = self.mappings.range(..=offset).next_back() {
            if o.saturating_add(m.len) > offset {
                return Some((o, *m));
            }
        }
        self.mappings
            .range(offset..end)
            .next()
            .map(|(&o, m)| (o, *m))
    }
}

/// The task table of §6: host reservations and the guest ranges aliased
/// into them.
pub struct TaskTable {
    mem: Arc<GuestRam>,
    va: Arc<dyn VaSpace>,
    page_size: u64,
    tasks: HashMap<TaskId, Task>,
    next_id: u64,
}

impl TaskTable {
    /// `page_size` is the host page size (16 KiB on Apple Silicon) and must
    /// be a power of two.
    pub fn new(mem: Arc<GuestRam>, va: Arc<dyn VaSpace>, page_size: u64) -> Self {
        debug_assert!(page_size.is_power_of_two());
        Self {
            mem,
            va,
            page_size: page_size.max(1),
            tasks: HashMap::new(),
            next_id: 1,
        }
    }

    fn aligned(&self, what: &'static str, value: u64) -> Result<(), MapError> {
        if value & (self.page_size - 1) == 0 {
            Ok(())
        } else {
            Err(MapError::Unaligned {
                what,
                value,
                page: self.page_size,
            })
        }
    }

    pub fn task_count(&self) -> usize {
        self.tasks.len()
    }

    /// Base address and size of a task.
    pub fn task_extent(&self, task: TaskId) -> Option<(u64, u64)> {
        self.tasks.get(&task).map(|t| (t.base, t.len))
    }

    /// The aliases of a task, as (task offset, mapping), in offset order.
    pub fn mappings(&self, task: TaskId) -> Vec<(u64, Mapping)> {
        self.tasks
            .get(&task)
            .map(|t| t.mappings.iter().map(|(&o, &m)| (o, m)).collect())
            .unwrap_or_default()
    }

    /// `createTask` (§6.1).
    pub fn create(&mut self, vm_size: u64) -> Result<(TaskId, u64), MapError> {
        if vm_size == 0 {
            return Err(MapError::Empty);
        }
        if self.tasks.len() >= MAX_TASKS {
            return Err(MapError::TooManyTasks);
        }
        let base = self
            .va
            .reserve(vm_size)
            .ok_or(MapError::ReserveFailed(vm_size))?;
        let id = TaskId(self.next_id);
        self.next_id = self.next_id.wrapping_add(1);
        self.tasks.insert(
            id,
            Task {
                base,
                len: vm_size,
                mappings: BTreeMap::new(),
            },
        );
        tracing::trace!(target: "apple_gfx", vm_size, base, "apple_gfx_create_task");
        Ok((id, base))
    }

    /// `destroyTask` (§6.2): drops every alias and the reservation.
    pub fn destroy(&mut self, task: TaskId) -> Result<(), MapError> {
        let t = self
            .tasks
            .remove(&task)
            .ok_or(MapError::UnknownTask(task))?;
        tracing::trace!(target: "apple_gfx", ?task, mappings = t.mappings.len(), "apple_gfx_destroy_task");
        self.va.release(t.base, t.len);
        Ok(())
    }

    /// `mapMemory` (§6.3). Ranges are packed back to back from
    /// `virtual_offset`; a refused range leaves a hole of its length and the
    /// others are still mapped, as in QEMU. Returns the first error.
    pub fn map(
        &mut self,
        task: TaskId,
        virtual_offset: u64,
        read_only: bool,
        ranges: &[PhysRange],
    ) -> Result<(), MapError> {
        let t = self.tasks.get(&task).ok_or(MapError::UnknownTask(task))?;
        let (base, task_len) = (t.base, t.len);
        tracing::trace!(target: "apple_gfx", ?task, count = ranges.len(), virtual_offset, read_only, "apple_gfx_map_memory");
        // The whole request must fit before anything is touched.
        let total = ranges
            .iter()
            .try_fold(0u64, |acc, r| acc.checked_add(r.len));
        let fits = total
            .and_then(|total| virtual_offset.checked_add(total))
            .is_some_and(|end| end <= task_len);
        if !fits {
            return Err(MapError::OutsideTask {
                offset: virtual_offset,
                len: total.unwrap_or(u64::MAX),
                task_len,
            });
        }
        let mut first_error = None;
        let mut cursor = virtual_offset;
        for (i, r) in ranges.iter().enumerate() {
            let offset = cursor;
            // Cannot overflow: the sum was checked above.
            cursor += r.len;
            tracing::trace!(target: "apple_gfx", i, gpa = r.gpa, len = r.len, "apple_gfx_map_memory_range");
            let result = self.map_one(task, base, offset, *r, read_only);
            if let Err(e) = result {
                vm_core::guest_error!(
                    "apple-gfx: mapMemory range {i} ({:#x}+{:#x}): {e}",
                    r.gpa,
                    r.len
                );
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn map_one(
        &mut self,
        task: TaskId,
        base: u64,
        offset: u64,
        r: PhysRange,
        read_only: bool,
    ) -> Result<(), MapError> {
        if r.len == 0 {
            return Err(MapError::Empty);
        }
        self.aligned("task offset", offset)?;
        self.aligned("guest address", r.gpa)?;
        self.aligned("length", r.len)?;
        let host = host_address(&self.mem, r.gpa, r.len)?;
        self.aligned("host address", host as u64)?;
        let end = offset + r.len;
        let t = self
            .tasks
            .get_mut(&task)
            .ok_or(MapError::UnknownTask(task))?;
        if let Some((existing, _)) = t.first_overlap(offset, end) {
            return Err(MapError::Overlap {
                offset,
                len: r.len,
                existing,
            });
        }
        if t.mappings.len() >= MAX_MAPPINGS_PER_TASK {
            return Err(MapError::TooManyMappings);
        }
        let target = base.wrapping_add(offset);
        let ok = self.va.alias(target, host, r.len, read_only);
        tracing::trace!(target: "apple_gfx", ok, source = host, target, "apple_gfx_remap");
        if !ok {
            return Err(MapError::HostMapFailed { offset, len: r.len });
        }
        t.mappings.insert(
            offset,
            Mapping {
                len: r.len,
                gpa: r.gpa,
                read_only,
            },
        );
        Ok(())
    }

    /// `unmapMemory` (§6.4): the range becomes zero pages again. Aliases that
    /// straddle its edges keep their outside parts.
    pub fn unmap(&mut self, task: TaskId, offset: u64, length: u64) -> Result<(), MapError> {
        tracing::trace!(target: "apple_gfx", ?task, offset, length, "apple_gfx_unmap_memory");
        let t = self.tasks.get(&task).ok_or(MapError::UnknownTask(task))?;
        let (base, task_len) = (t.base, t.len);
        if length == 0 {
            return Err(MapError::Empty);
        }
        let end = offset
            .checked_add(length)
            .filter(|&end| end <= task_len)
            .ok_or(MapError::OutsideTask {
                offset,
                len: length,
                task_len,
            })?;
        self.aligned("task offset", offset)?;
        self.aligned("length", length)?;
        if !self.va.zero(base.wrapping_add(offset), length) {
            return Err(MapError::HostMapFailed {
                offset,
                len: length,
            });
        }
        let t = self
            .tasks
            .get_mut(&task)
            .ok_or(MapError::UnknownTask(task))?;
        while let Some((o, m)) = t.first_overlap(offset, end) {
            t.mappings.remove(&o);
            if o < offset {
                t.mappings.insert(
                    o,
                    Mapping {
                        len: offset - o,
                        ..m
                    },
                );
            }
            let m_end = o + m.len;
            if m_end > end {
                t.mappings.insert(
                    end,
                    Mapping {
                        len: m_end - end,
                        gpa: m.gpa + (end - o),
                        read_only: m.read_only,
                    },
                );
            }
        }
        Ok(())
    }

    /// The guest address behind a task offset.
    pub fn translate(&self, task: TaskId, offset: u64) -> Result<u64, MapError> {
        let t = self.tasks.get(&task).ok_or(MapError::UnknownTask(task))?;
        match t.mappings.range(..=offset).next_back() {
            Some((&o, m)) if offset - o < m.len => Ok(m.gpa + (offset - o)),
            _ => Err(MapError::Unmapped(offset)),
        }
    }

    /// Reads task memory through its aliases, as the framework would see
    /// it; fails at the first byte that is not mapped.
    pub fn read(&self, task: TaskId, offset: u64, buf: &mut [u8]) -> Result<(), MapError> {
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset
                .checked_add(done as u64)
                .ok_or(MapError::Unmapped(u64::MAX))?;
            let t = self.tasks.get(&task).ok_or(MapError::UnknownTask(task))?;
            let (o, m) = match t.mappings.range(..=at).next_back() {
                Some((&o, m)) if at - o < m.len => (o, *m),
                _ => return Err(MapError::Unmapped(at)),
            };
            let avail = m.len - (at - o);
            let n = usize::try_from(avail)
                .unwrap_or(usize::MAX)
                .min(buf.len() - done);
            let gpa = m.gpa + (at - o);
            vm_core::memory::read_exact(&self.mem, gpa, &mut buf[done..done + n])
                .map_err(|_| MapError::NotRam { gpa, len: n as u64 })?;
            done += n;
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug)]
struct IosfcEntry {
    refs: u64,
    gpa: u64,
    len: u64,
}

/// Host pointers handed to the IOSurface mapper (§7.3).
pub struct IosfcMappings {
    mem: Arc<GuestRam>,
    by_host: HashMap<usize, IosfcEntry>,
}

impl IosfcMappings {
    pub fn new(mem: Arc<GuestRam>) -> Self {
        Self {
            mem,
            by_host: HashMap::new(),
        }
    }

    /// `mapMemory`: the host address of a guest range inside one RAM region.
    /// `read_only` only matters to the framework: no alias is created.
    pub fn map(&mut self, gpa: u64, len: u64, _read_only: bool) -> Result<usize, MapError> {
        let host = host_address(&self.mem, gpa, len)?;
        match self.by_host.get_mut(&host) {
            Some(e) => e.refs = e.refs.saturating_add(1),
            None => {
                if self.by_host.len() >= MAX_IOSFC_MAPPINGS {
                    return Err(MapError::TooManyIosfcMappings);
                }
                self.by_host.insert(host, IosfcEntry { refs: 1, gpa, len });
            }
        }
        Ok(host)
    }

    /// `unmapMemory`: releases one use of a pointer from [`Self::map`].
    pub fn unmap(&mut self, host: usize) -> Result<(u64, u64), MapError> {
        let e = self
            .by_host
            .get_mut(&host)
            .ok_or(MapError::UnknownHostAddress(host))?;
        let found = (e.gpa, e.len);
        e.refs -= 1;
        if e.refs == 0 {
            self.by_host.remove(&host);
        }
        Ok(found)
    }

    /// Distinct host addresses currently handed out.
    pub fn outstanding(&self) -> usize {
        self.by_host.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::FakeVaSpace;
    use vm_core::memory::{create_guest_memory, write_all};

    const PAGE: u64 = 0x1000;
    const RAM: u64 = 0x7000_0000;
    const RAM2: u64 = 0x8000_0000;

    fn setup() -> (TaskTable, Arc<FakeVaSpace>, Arc<GuestRam>) {
        let mem = Arc::new(create_guest_memory(&[(RAM, 0x10_0000), (RAM2, 0x10_0000)]).unwrap());
        let va = Arc::new(FakeVaSpace::new());
        (TaskTable::new(mem.clone(), va.clone(), PAGE), va, mem)
    }

    fn r(gpa: u64, len: u64) -> PhysRange {
        PhysRange { gpa, len }
    }

    #[test]
    fn mapped_ranges_read_back_packed_in_task_space() {
        let (mut tt, va, mem) = setup();
        write_all(&mem, RAM + 0x3000, &[0xaa; 0x1000]).unwrap();
        write_all(&mem, RAM2, &[0xbb; 0x1000]).unwrap();
        let (task, base) = tt.create(0x10_0000).unwrap();
        assert_eq!(tt.task_extent(task), Some((base, 0x10_0000)));
        // Two discontiguous guest ranges land back to back at 0x2000.
        tt.map(
            task,
            0x2000,
            false,
            &[r(RAM + 0x3000, 0x1000), r(RAM2, 0x1000)],
        )
        .unwrap();
        let mut buf = [0u8; 0x2000];
        tt.read(task, 0x2000, &mut buf).unwrap();
        assert!(buf[..0x1000].iter().all(|&b| b == 0xaa));
        assert!(buf[0x1000..].iter().all(|&b| b == 0xbb));
        assert_eq!(tt.translate(task, 0x3010), Ok(RAM2 + 0x10));
        assert_eq!(va.aliases(), 2);
        assert!(va.is_aliased(base + 0x2000));
    }

    #[test]
    fn unmapped_reads_fail() {
        let (mut tt, _va, _mem) = setup();
        let (task, _) = tt.create(0x4000).unwrap();
        let mut buf = [0u8; 4];
        assert_eq!(tt.read(task, 0, &mut buf), Err(MapError::Unmapped(0)));
        tt.map(task, 0, false, &[r(RAM, 0x1000)]).unwrap();
        let mut buf = [0u8; 0x1004];
        assert_eq!(tt.read(task, 0, &mut buf), Err(MapError::Unmapped(0x1000)));
        assert_eq!(tt.translate(task, 0x1000), Err(MapError::Unmapped(0x1000)));
        assert_eq!(
            tt.read(TaskId(999), 0, &mut [0]),
            Err(MapError::UnknownTask(TaskId(999)))
        );
    }

    #[test]
    fn overlapping_maps_are_refused() {
        let (mut tt, va, _mem) = setup();
        let (task, _) = tt.create(0x10000).unwrap();
        tt.map(task, 0x2000, false, &[r(RAM, 0x2000)]).unwrap();
        for (offset, len) in [
            (0x2000, 0x1000),
            (0x1000, 0x2000),
            (0x3000, 0x1000),
            (0x0, 0x8000),
        ] {
            assert!(matches!(
                tt.map(task, offset, false, &[r(RAM + 0x8000, len)]),
                Err(MapError::Overlap {
                    existing: 0x2000,
                    ..
                })
            ));
        }
        // Adjacent is fine.
        tt.map(task, 0x4000, false, &[r(RAM + 0x8000, 0x1000)])
            .unwrap();
        tt.map(task, 0x1000, false, &[r(RAM + 0x9000, 0x1000)])
            .unwrap();
        assert_eq!(tt.mappings(task).len(), 3);
        assert_eq!(va.aliases(), 3);
    }

    #[test]
    fn ranges_outside_ram_or_task_are_refused() {
        let (mut tt, va, _mem) = setup();
        let (task, _) = tt.create(0x10000).unwrap();
        // Not RAM at all, straddling the end of RAM, spanning two regions,
        // wrapping around.
        for (gpa, len) in [
            (0x1000, 0x1000),
            (RAM + 0xf_f000, 0x2000),
            (RAM2 - 0x1000, 0x2000),
            (u64::MAX - 0xfff, 0x1000),
        ] {
            assert!(
                matches!(
                    tt.map(task, 0, false, &[r(gpa, len)]),
                    Err(MapError::NotRam { .. })
                ),
                "{gpa:#x}+{len:#x}"
            );
        }
        // Past the end of the task, and a length sum that overflows.
        assert!(matches!(
            tt.map(task, 0xf000, false, &[r(RAM, 0x2000)]),
            Err(MapError::OutsideTask { .. })
        ));
        assert!(matches!(
            tt.map(task, 0, false, &[r(RAM, u64::MAX), r(RAM, 0x2000)]),
            Err(MapError::OutsideTask { .. })
        ));
        assert!(matches!(
            tt.map(task, u64::MAX, false, &[r(RAM, 0x1000)]),
            Err(MapError::OutsideTask { .. })
        ));
        assert!(matches!(
            tt.map(task, 0, false, &[r(RAM + 0x800, 0x1000)]),
            Err(MapError::Unaligned { .. })
        ));
        assert_eq!(tt.map(task, 0, false, &[r(RAM, 0)]), Err(MapError::Empty));
        assert_eq!(va.aliases(), 0, "nothing reached the host");
        assert!(tt.mappings(task).is_empty());
    }

    #[test]
    fn a_bad_range_leaves_a_hole_and_the_rest_is_mapped() {
        let (mut tt, _va, _mem) = setup();
        let (task, _) = tt.create(0x10000).unwrap();
        let res = tt.map(
            task,
            0,
            true,
            &[r(RAM, 0x1000), r(0x1000, 0x1000), r(RAM2, 0x1000)],
        );
        assert!(matches!(res, Err(MapError::NotRam { gpa: 0x1000, .. })));
        let offsets: Vec<u64> = tt.mappings(task).iter().map(|(o, _)| *o).collect();
        assert_eq!(offsets, vec![0, 0x2000]);
        assert!(tt.mappings(task)[0].1.read_only);
    }

    #[test]
    fn unmap_zeroes_and_splits() {
        let (mut tt, va, _mem) = setup();
        let (task, base) = tt.create(0x10000).unwrap();
        tt.map(task, 0, false, &[r(RAM, 0x4000)]).unwrap();
        tt.unmap(task, 0x1000, 0x2000).unwrap();
        assert_eq!(
            tt.mappings(task),
            vec![
                (
                    0,
                    Mapping {
                        len: 0x1000,
                        gpa: RAM,
                        read_only: false
                    }
                ),
                (
                    0x3000,
                    Mapping {
                        len: 0x1000,
                        gpa: RAM + 0x3000,
                        read_only: false
                    }
                ),
            ]
        );
        assert_eq!(va.zeroed(), vec![(base + 0x1000, 0x2000)]);
        assert_eq!(tt.translate(task, 0x1800), Err(MapError::Unmapped(0x1800)));
        // The hole can be mapped again; unmapping nothing is fine.
        tt.map(task, 0x1000, false, &[r(RAM2, 0x2000)]).unwrap();
        tt.unmap(task, 0x8000, 0x1000).unwrap();
        assert!(matches!(
            tt.unmap(task, 0xf000, 0x2000),
            Err(MapError::OutsideTask { .. })
        ));
        assert!(matches!(
            tt.unmap(task, u64::MAX, 2),
            Err(MapError::OutsideTask { .. })
        ));
        tt.unmap(task, 0, 0x10000).unwrap();
        assert!(tt.mappings(task).is_empty());
    }

    #[test]
    fn destroy_releases_and_forgets() {
        let (mut tt, va, _mem) = setup();
        let (task, base) = tt.create(0x8000).unwrap();
        tt.map(task, 0, false, &[r(RAM, 0x1000)]).unwrap();
        tt.destroy(task).unwrap();
        assert_eq!(va.released(), vec![(base, 0x8000)]);
        assert_eq!(tt.destroy(task), Err(MapError::UnknownTask(task)));
        assert_eq!(
            tt.map(task, 0, false, &[r(RAM, 0x1000)]),
            Err(MapError::UnknownTask(task))
        );
        assert_eq!(tt.task_count(), 0);
        assert_eq!(tt.create(0), Err(MapError::Empty));
    }

    #[test]
    fn host_failures_are_errors() {
        let (mut tt, va, _mem) = setup();
        va.fail_reserve(true);
        assert_eq!(tt.create(0x1000), Err(MapError::ReserveFailed(0x1000)));
        va.fail_reserve(false);
        let (task, _) = tt.create(0x4000).unwrap();
        va.fail_alias(true);
        assert!(matches!(
            tt.map(task, 0, false, &[r(RAM, 0x1000)]),
            Err(MapError::HostMapFailed { .. })
        ));
        assert!(tt.mappings(task).is_empty());
    }

    #[test]
    fn task_count_is_bounded() {
        let (mut tt, _va, _mem) = setup();
        for _ in 0..MAX_TASKS {
            tt.create(0x1000).unwrap();
        }
        assert_eq!(tt.create(0x1000), Err(MapError::TooManyTasks));
    }

    #[test]
    fn iosfc_pointers_are_counted() {
        let (_tt, _va, mem) = setup();
        let mut io = IosfcMappings::new(mem.clone());
        let a = io.map(RAM + 0x10, 0x100, false).unwrap();
        assert_eq!(a, host_address(&mem, RAM + 0x10, 1).unwrap());
        assert_eq!(io.map(RAM + 0x10, 0x100, true).unwrap(), a);
        assert_eq!(io.outstanding(), 1);
        assert_eq!(io.unmap(a), Ok((RAM + 0x10, 0x100)));
        assert_eq!(io.unmap(a), Ok((RAM + 0x10, 0x100)));
        assert_eq!(io.unmap(a), Err(MapError::UnknownHostAddress(a)));
        assert!(matches!(
            io.map(RAM2 - 0x10, 0x20, false),
            Err(MapError::NotRam { .. })
        ));
        assert_eq!(io.outstanding(), 0);
    }

    #[test]
    fn memory_map_lists_every_region() {
        let (_tt, _va, mem) = setup();
        let ranges = memory_map_ranges(&mem);
        assert_eq!(ranges.len(), 2);
        assert_eq!((ranges[0].gpa, ranges[0].len), (RAM, 0x10_0000));
        assert_eq!((ranges[1].gpa, ranges[1].len), (RAM2, 0x10_0000));
        assert_eq!(ranges[1].host_addr, host_address(&mem, RAM2, 1).unwrap());
    }
}
