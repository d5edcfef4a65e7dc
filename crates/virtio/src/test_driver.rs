//! The driver side of a split virtqueue, for device tests: it writes
//! descriptors and the available ring into guest memory the way a guest
//! would (including ways a hostile guest would) and reads the used ring.

use virtio_queue::{Queue, QueueT};
use vm_core::memory::{read_exact, write_all};
use vm_core::GuestRam;

pub(crate) const F_NEXT: u16 = 1;
pub(crate) const F_WRITE: u16 = 2;
pub(crate) const F_INDIRECT: u16 = 4;

pub(crate) struct TestQueue {
    mem: GuestRam,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    avail_idx: u16,
}

impl TestQueue {
    /// Lays out a queue of `size` entries at `base`.
    pub fn new(mem: &GuestRam, base: u64, size: u16) -> Self {
        let desc = base;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
        let q = Self {
            mem: mem.clone(),
            size,
            desc,
            avail,
            used,
            next_desc: 0,
            avail_idx: 0,
        };
        q.put_u16(avail, 0);
        q.put_u16(avail + 2, 0);
        q.put_u16(used, 0);
        q.put_u16(used + 2, 0);
        q
    }

    /// The device-side queue, as a transport would configure it.
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).unwrap();
        q.set_size(self.size);
        q.set_desc_table_address(Some(self.desc as u32), Some((self.desc >> 32) as u32));
        q.set_avail_ring_address(Some(self.avail as u32), Some((self.avail >> 32) as u32));
        q.set_used_ring_address(Some(self.used as u32), Some((self.used >> 32) as u32));
        q.set_ready(true);
        q
    }

    fn put_u16(&self, addr: u64, v: u16) {
        write_all(&self.mem, addr, &v.to_le_bytes()).unwrap();
    }

    fn get_u32(&self, addr: u64) -> u32 {
        let mut b = [0u8; 4];
        read_exact(&self.mem, addr, &mut b).unwrap();
        u32::from_le_bytes(b)
    }

    /// Writes descriptor `idx` of the table at `table` verbatim.
    pub fn write_desc_at(&self, table: u64, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        write_all(&self.mem, table + 16 * u64::from(idx), &raw).unwrap();
    }

    /// Writes descriptor `idx` of the queue's own table verbatim.
    pub fn write_desc(&self, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
        self.write_desc_at(self.desc, idx, addr, len, flags, next);
    }

    /// Makes the chain starting at `head` available.
    pub fn publish(&mut self, head: u16) {
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        self.put_u16(slot, head);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.put_u16(self.avail + 2, self.avail_idx);
    }

    /// Adds a well-linked chain of `(addr, len, device_writable)` buffers
    /// and makes it available; returns its head.
    pub fn add_chain(&mut self, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, writable)) in bufs.iter().enumerate() {
            let idx = (head + i as u16) % self.size;
            let mut flags = if writable { F_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= F_NEXT;
            }
            self.write_desc(idx, addr, len, flags, (idx + 1) % self.size);
        }
        self.next_desc = (head + bufs.len() as u16) % self.size;
        self.publish(head);
        head
    }

    /// How many chains the device has returned.
    pub fn used_idx(&self) -> u16 {
        (self.get_u32(self.used) >> 16) as u16
    }

    /// Used element `n`: `(head, length written)`.
    pub fn used_elem(&self, n: u16) -> (u32, u32) {
        let at = self.used + 4 + 8 * u64::from(n % self.size);
        (self.get_u32(at), self.get_u32(at + 4))
    }
}

/// Records interrupts.
#[derive(Default)]
pub(crate) struct TestInterrupt {
    pub queues: std::sync::Mutex<Vec<u16>>,
    pub config: std::sync::atomic::AtomicU32,
}

impl crate::VirtioInterrupt for TestInterrupt {
    fn notify_queue(&self, queue: u16) {
        self.queues.lock().unwrap().push(queue);
    }
    fn notify_config(&self) {
        self.config
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}
