//! Reading a descriptor chain without trusting it.
//!
//! A chain is turned into two byte streams (virtio 1.2 §2.7.4: the device
//! must not assume any framing of the request into descriptors): the
//! device-readable buffers, then the device-writable ones. Everything about
//! the chain is guest-controlled, so the walk records what was wrong instead
//! of failing half-way, and every copy goes through the checked helpers of
//! `vm_core::memory`, which refuse ranges outside RAM.

use std::sync::atomic::Ordering;

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_core::memory::{range_is_ram, read_exact, write_all};
use vm_core::{guest_error, GuestRam};

/// Descriptors kept per chain. virtio-queue already bounds a chain by the
/// queue size (and an indirect table by its length, at most 65535); this
/// bounds what a device stores.
pub(crate) const MAX_SEGMENTS: usize = 1024;

/// One guest buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Segment {
    pub addr: u64,
    pub len: u32,
}

/// What a walk found wrong with a chain. The device still completes the
/// chain (with an error status where it has one) so the driver gets it back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ChainFault {
    /// A device-readable descriptor followed a device-writable one.
    ReadableAfterWritable,
    /// More than [`MAX_SEGMENTS`] non-empty descriptors.
    TooManySegments,
    /// A buffer is not wholly inside guest RAM.
    OutsideRam { addr: u64, len: u32 },
}

/// A walked chain.
#[derive(Debug)]
pub(crate) struct Chain {
    pub head: u16,
    pub readable: Vec<Segment>,
    pub writable: Vec<Segment>,
    /// The last non-empty device-writable descriptor, kept even when the
    /// lists were cut short so a status byte can still be found.
    pub last_writable: Option<Segment>,
    pub fault: Option<ChainFault>,
}

impl Chain {
    pub fn walk<M>(chain: DescriptorChain<M>, mem: &GuestRam) -> Self
    where
        M: std::ops::Deref,
        M::Target: vm_memory::GuestMemory,
    {
        let mut walked = Self {
            head: chain.head_index(),
            readable: Vec::new(),
            writable: Vec::new(),
            last_writable: None,
            fault: None,
        };
        let mut kept = 0usize;
        for desc in chain {
            if desc.len() == 0 {
                // Carries no bytes, so its address does not matter.
                continue;
            }
            let seg = Segment {
                addr: desc.addr().0,
                len: desc.len(),
            };
            if !range_is_ram(mem, seg.addr, u64::from(seg.len)) {
                walked.fault.get_or_insert(ChainFault::OutsideRam {
                    addr: seg.addr,
                    len: seg.len,
                });
            }
            if desc.is_write_only() {
                walked.last_writable = Some(seg);
            } else if walked.last_writable.is_some() {
                walked
                    .fault
                    .get_or_insert(ChainFault::ReadableAfterWritable);
            }
            if kept == MAX_SEGMENTS {
                walked.fault.get_or_insert(ChainFault::TooManySegments);
                continue;
            }
            kept += 1;
            if desc.is_write_only() {
                walked.writable.push(seg);
            } else {
                walked.readable.push(seg);
            }
        }
        walked
    }
}

/// The next chain the driver made available, if any.
///
/// The available index is checked here first: for an index more than a
/// ring ahead virtio-queue logs an error of its own, not rate-limited,
/// which a guest could repeat at every kick.
pub(crate) fn pop_chain<'m>(
    queue: &mut Queue,
    mem: &'m GuestRam,
) -> Option<DescriptorChain<&'m GuestRam>> {
    let Ok(avail) = queue.avail_idx(mem, Ordering::Acquire) else {
        guest_error!("virtio: available ring index is not readable");
        return None;
    };
    let pending = avail.0.wrapping_sub(queue.next_avail());
    if pending == 0 {
        return None;
    }
    if pending > queue.size() {
        guest_error!(
            "virtio: available index {} is {pending} entries ahead in a {}-entry ring",
            avail.0,
            queue.size()
        );
        return None;
    }
    queue.pop_descriptor_chain(mem)
}

/// Whether a queue's three rings lie in guest RAM: what
/// `QueueT::is_valid` checks (alignment was checked as the driver set the
/// addresses), without its unlimited error log.
pub(crate) fn rings_in_ram(queue: &Queue, mem: &GuestRam) -> bool {
    let n = u64::from(queue.size());
    range_is_ram(mem, queue.desc_table(), 16 * n)
        && range_is_ram(mem, queue.avail_ring(), 6 + 2 * n)
        && range_is_ram(mem, queue.used_ring(), 6 + 8 * n)
}

/// `VRING_AVAIL_F_NO_INTERRUPT` in the available ring's flags.
const AVAIL_F_NO_INTERRUPT: u16 = 1;

/// Whether to interrupt the driver after adding used buffers.
///
/// virtio-queue decides with EVENT_IDX but ignores the older
/// `VRING_AVAIL_F_NO_INTERRUPT` flag, which the device SHOULD honour when
/// EVENT_IDX is not negotiated (virtio 1.2 §2.7.7.2); this adds it.
pub(crate) fn should_interrupt(queue: &mut Queue, mem: &GuestRam) -> bool {
    let needed = queue.needs_notification(mem).unwrap_or(true);
    if !needed || queue.event_idx_enabled() {
        return needed;
    }
    let mut flags = [0u8; 2];
    match read_exact(mem, queue.avail_ring(), &mut flags) {
        Ok(()) => u16::from_le_bytes(flags) & AVAIL_F_NO_INTERRUPT == 0,
        Err(_) => true,
    }
}

/// Total length of a stream.
pub(crate) fn stream_len(segs: &[Segment]) -> u64 {
    segs.iter().map(|s| u64::from(s.len)).sum()
}

/// The part of each segment that overlaps `[skip, skip + len)` of the stream,
/// as `(guest address, offset in the window, length)`.
fn window(segs: &[Segment], skip: u64, len: u64) -> impl Iterator<Item = (u64, usize, usize)> + '_ {
    let end = skip.saturating_add(len);
    let mut pos = 0u64;
    segs.iter().filter_map(move |s| {
        let seg_start = pos;
        let seg_end = pos + u64::from(s.len);
        pos = seg_end;
        let from = seg_start.max(skip);
        let to = seg_end.min(end);
        (from < to).then(|| {
            (
                s.addr.wrapping_add(from - seg_start),
                (from - skip) as usize,
                (to - from) as usize,
            )
        })
    })
}

/// Copies bytes `[skip, skip + buf.len())` of a readable stream into `buf`;
/// returns how many bytes the stream had there.
pub(crate) fn read_stream(
    mem: &GuestRam,
    segs: &[Segment],
    skip: u64,
    buf: &mut [u8],
) -> Result<usize, vm_core::memory::MemoryError> {
    let mut copied = 0;
    for (addr, at, n) in window(segs, skip, buf.len() as u64) {
        read_exact(mem, addr, &mut buf[at..at + n])?;
        copied = at + n;
    }
    Ok(copied)
}

/// Copies `data` to bytes `[skip, skip + data.len())` of a writable stream;
/// returns how many bytes fitted.
pub(crate) fn write_stream(
    mem: &GuestRam,
    segs: &[Segment],
    skip: u64,
    data: &[u8],
) -> Result<usize, vm_core::memory::MemoryError> {
    let mut copied = 0;
    for (addr, at, n) in window(segs, skip, data.len() as u64) {
        write_all(mem, addr, &data[at..at + n])?;
        copied = at + n;
    }
    Ok(copied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_span_segments() {
        let mem = vm_core::memory::create_guest_memory(&[(0, 0x10000)]).unwrap();
        let segs = [
            Segment {
                addr: 0x100,
                len: 3,
            },
            Segment {
                addr: 0x200,
                len: 5,
            },
        ];
        assert_eq!(stream_len(&segs), 8);
        assert_eq!(write_stream(&mem, &segs, 2, b"abcdefghij").unwrap(), 6);
        let mut out = [0u8; 8];
        assert_eq!(read_stream(&mem, &segs, 0, &mut out).unwrap(), 8);
        assert_eq!(&out, b"\0\0abcdef");
        let mut tail = [0u8; 4];
        assert_eq!(read_stream(&mem, &segs, 6, &mut tail).unwrap(), 2);
        assert_eq!(&tail[..2], b"ef");
        assert_eq!(read_stream(&mem, &segs, u64::MAX, &mut tail).unwrap(), 0);
    }

    #[test]
    fn outside_ram_fails_without_writing() {
        let mem = vm_core::memory::create_guest_memory(&[(0, 0x1000)]).unwrap();
        let segs = [Segment {
            addr: 0xff0,
            len: 0x20,
        }];
        assert!(write_stream(&mem, &segs, 0, &[1; 0x20]).is_err());
        let mut b = [9u8; 0x10];
        read_exact(&mem, 0xff0, &mut b).unwrap();
        assert_eq!(b, [0; 0x10]);
    }
}
