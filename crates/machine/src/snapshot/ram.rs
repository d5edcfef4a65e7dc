//! Guest memory in a snapshot: written sparse, mapped back lazily.

use std::fs::File;
use std::os::unix::fs::FileExt;

use vm_core::GuestRam;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

use super::format::RamRegion;

/// Granule of the zero-page scan: holes are at least this big.
pub const PAGE: usize = 4096;

/// What writing memory cost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RamStats {
    pub total_pages: u64,
    /// Pages with a non-zero byte: the ones stored.
    pub stored_pages: u64,
}

/// Writes `bytes` (one region's image) at `offset` in `file`, skipping
/// zero pages (the file must already be sized: they read back as holes).
/// `progress` is told the bytes done so far.
pub fn write_sparse(
    file: &File,
    offset: u64,
    bytes: &[u8],
    mut progress: impl FnMut(u64),
) -> std::io::Result<RamStats> {
    let mut stats = RamStats::default();
    let mut run: Option<usize> = None;
    let flush =
        |start: usize, end: usize| file.write_all_at(&bytes[start..end], offset + start as u64);
    for (i, page) in bytes.chunks(PAGE).enumerate() {
        stats.total_pages += 1;
        let at = i * PAGE;
        if is_zero(page) {
            if let Some(start) = run.take() {
                flush(start, at)?;
            }
        } else {
            stats.stored_pages += 1;
            run.get_or_insert(at);
        }
        if at % (256 << 20) == 0 && at > 0 {
            progress(at as u64);
        }
    }
    if let Some(start) = run {
        flush(start, bytes.len())?;
    }
    progress(bytes.len() as u64);
    Ok(stats)
}

fn is_zero(page: &[u8]) -> bool {
    // Word-wise: the compiler vectorises this, so scanning runs at memory
    // speed.
    let (head, words, tail) = {
        // SAFETY: any bytes are valid u64s; align_to returns the aligned
        // middle and the unaligned ends.
        unsafe { page.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// Guest memory whose regions are private, copy-on-write mappings of the
/// snapshot file: pages are read on first touch and the guest's writes
/// never reach the file, so any number of VMs can run from one snapshot.
/// Mapping costs the same whatever the memory size.
pub fn map_private(file: &File, regions: &[RamRegion]) -> Result<GuestRam, String> {
    let mut mapped = Vec::new();
    for r in regions {
        let size =
            usize::try_from(r.size).map_err(|_| format!("region {:#x} too large", r.base))?;
        let fd = file
            .try_clone()
            .map_err(|e| format!("cannot share the snapshot file: {e}"))?;
        let mapping = vm_memory::MmapRegion::build(
            Some(FileOffset::new(fd, r.offset)),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        )
        .map_err(|e| {
            format!(
                "cannot map guest memory at {:#x} from the snapshot: {e}",
                r.base
            )
        })?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(r.base))
            .ok_or_else(|| format!("guest region {:#x}+{:#x} overflows", r.base, r.size))?;
        mapped.push(region);
    }
    GuestRam::from_regions(mapped).map_err(|e| format!("guest memory layout: {e}"))
}

/// Each region of `memory` as `(base, host bytes)`.
///
/// # Safety
/// Nothing may write guest memory while the slices live: the vCPUs are
/// parked and no device has work in flight (the machine saves only then).
pub unsafe fn regions(memory: &GuestRam) -> Vec<(u64, &[u8])> {
    memory
        .iter()
        .map(|region| {
            let len = region.len() as usize;
            // SAFETY: the region maps `len` bytes at `as_ptr()` for as long
            // as `memory` lives; the caller guarantees no writer.
            let bytes = unsafe { std::slice::from_raw_parts(region.as_ptr().cast_const(), len) };
            (region.start_addr().0, bytes)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_pages_become_holes_and_map_back_as_zero() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ram");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let mut image = vec![0u8; 64 * PAGE];
        image[5 * PAGE + 7] = 0xaa;
        image[6 * PAGE] = 0xbb;
        image[63 * PAGE + PAGE - 1] = 0xcc;
        let offset = 64 << 10;
        file.set_len(offset + image.len() as u64).unwrap();
        let stats = write_sparse(&file, offset, &image, |_| {}).unwrap();
        assert_eq!(
            stats,
            RamStats {
                total_pages: 64,
                stored_pages: 3
            }
        );

        let regions = [RamRegion {
            base: 0x4000_0000,
            size: image.len() as u64,
            offset,
        }];
        let ram = map_private(&file, &regions).unwrap();
        let mut back = vec![0u8; image.len()];
        vm_core::memory::read_exact(&ram, 0x4000_0000, &mut back).unwrap();
        assert!(back == image);
        // Guest writes stay private to the mapping.
        vm_core::memory::write_all(&ram, 0x4000_0000, &[1, 2, 3]).unwrap();
        let mut on_disk = [0u8; 3];
        file.read_exact_at(&mut on_disk, offset).unwrap();
        assert_eq!(on_disk, [0, 0, 0]);
    }
}
