//! virtio-fs (virtio 1.2 §5.11): a host directory shared with the guest,
//! which mounts it by its tag (`mount -t virtiofs TAG /mnt` on Linux).
//!
//! The device has the high-priority queue (FORGET and INTERRUPT) and one
//! request queue; each chain carries one FUSE request in its
//! device-readable part and gets the reply in its device-writable part.
//! [`server::Server`] answers them from the shared directory; [`fuse`]
//! decodes and encodes the messages; [`host`] holds what differs between
//! Linux and macOS hosts.
//!
//! # Threads
//!
//! A kick only wakes the device's worker thread (started on activation,
//! joined on reset), which serves the queues: a slow host file system
//! never holds up a vCPU. The worker serves at most one ring's worth of
//! chains per queue before looking at the other queue and at a stop
//! request, so a flood on one queue cannot starve the other.

pub mod fuse;
pub mod host;
pub mod server;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use virtio_queue::{Queue, QueueT};
use vm_core::sync::lock;
use vm_core::{guest_error, GuestRam};

use crate::block::chain::{
    pop_chain, read_stream, rings_in_ram, should_interrupt, stream_len, write_stream, Chain,
};
use crate::device::{
    ActivateContext, ActivateError, PciIdentity, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1,
};
pub use server::{Server, ShareError};

/// virtio device type of a file-system device.
pub const DEVICE_TYPE: u32 = 26;
/// Entries per queue.
pub const QUEUE_SIZE: u16 = 1024;
/// Queue indices.
pub const HIPRIO_QUEUE: u16 = 0;
pub const REQUEST_QUEUE: u16 = 1;
/// Longest tag, in bytes (the config field's size).
pub const TAG_LEN: usize = 36;
/// Largest request read from a chain: a full WRITE and its headers.
pub const MAX_REQUEST: usize = server::MAX_WRITE as usize + 4096;

/// How long the worker sleeps before rechecking for a stop.
const POLL: Duration = Duration::from_millis(100);

struct Kick {
    pending: Mutex<bool>,
    cond: Condvar,
    stop: AtomicBool,
}

struct Worker {
    kick: Arc<Kick>,
    handle: JoinHandle<Server>,
}

/// A virtio-fs device serving one directory.
pub struct VirtioFs {
    tag: String,
    root: PathBuf,
    read_only: bool,
    /// The server while no worker owns it.
    server: Option<Server>,
    worker: Option<Worker>,
}

impl VirtioFs {
    /// A device for `root` under `tag` (at most [`TAG_LEN`] bytes; the
    /// configuration checks it).
    pub fn new(tag: &str, root: PathBuf, read_only: bool) -> Result<Self, ShareError> {
        let server = Server::new(&root, read_only)?;
        Ok(Self {
            tag: tag.to_owned(),
            root,
            read_only,
            server: Some(server),
            worker: None,
        })
    }

    fn stop(&mut self) {
        if let Some(w) = self.worker.take() {
            w.kick.stop.store(true, Ordering::Release);
            w.kick.cond.notify_all();
            match w.handle.join() {
                Ok(server) => self.server = Some(server),
                Err(_) => tracing::error!("virtio-fs {}: worker panicked", self.tag),
            }
        }
    }
}

impl Drop for VirtioFs {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Serves up to one ring's worth of chains of `queue`; returns whether
/// any was used.
fn serve(
    queue: &mut Queue,
    mem: &GuestRam,
    server: &mut Server,
    req: &mut Vec<u8>,
    reply: &mut Vec<u8>,
) -> bool {
    let mut used = false;
    for _ in 0..queue.size() {
        let Some(dc) = pop_chain(queue, mem) else {
            break;
        };
        let chain = Chain::walk(dc, mem);
        if chain.head >= queue.size() {
            guest_error!("virtio-fs: chain head {} out of range", chain.head);
            continue;
        }
        let mut written = 0u32;
        let len = stream_len(&chain.readable);
        if let Some(fault) = chain.fault {
            guest_error!("virtio-fs: malformed chain: {fault:?}");
        } else if len > MAX_REQUEST as u64 {
            guest_error!("virtio-fs: {len}-byte request is larger than {MAX_REQUEST}");
        } else {
            req.resize(len as usize, 0);
            let room = stream_len(&chain.writable).min(MAX_REQUEST as u64) as usize;
            if read_stream(mem, &chain.readable, 0, req).is_ok() && server.handle(req, room, reply)
            {
                if let Ok(n) = write_stream(mem, &chain.writable, 0, reply) {
                    written = n as u32;
                }
            }
        }
        if let Err(e) = queue.add_used(mem, chain.head, written) {
            guest_error!("virtio-fs: cannot return a chain: {e}");
            break;
        }
        used = true;
    }
    used
}

fn work(
    kick: Arc<Kick>,
    mut server: Server,
    mut queues: Vec<(u16, Queue)>,
    mem: GuestRam,
    interrupt: Arc<dyn VirtioInterrupt>,
) -> Server {
    let mut req = Vec::new();
    let mut reply = Vec::new();
    loop {
        {
            let mut pending = lock(&kick.pending);
            while !*pending && !kick.stop.load(Ordering::Acquire) {
                pending = kick
                    .cond
                    .wait_timeout(pending, POLL)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            *pending = false;
        }
        if kick.stop.load(Ordering::Acquire) {
            return server;
        }
        // Until a pass finds nothing to do: a kick that came while the
        // queues were being served has its chains seen here.
        let mut again = true;
        while again && !kick.stop.load(Ordering::Acquire) {
            again = false;
            for (index, queue) in &mut queues {
                if serve(queue, &mem, &mut server, &mut req, &mut reply) {
                    again = true;
                    if should_interrupt(queue, &mem) {
                        interrupt.notify_queue(*index);
                    }
                }
            }
        }
        // A 1 MiB WRITE's buffer is not kept while idle.
        if req.capacity() > 1 << 16 {
            req = Vec::new();
        }
    }
}

impl VirtioDevice for VirtioFs {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; 2]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_fs_config { u8 tag[36]; le32 num_request_queues; }
        let mut cfg = [0u8; TAG_LEN + 4];
        let tag = self.tag.as_bytes();
        let n = tag.len().min(TAG_LEN);
        cfg[..n].copy_from_slice(&tag[..n]);
        cfg[TAG_LEN..].copy_from_slice(&1u32.to_le_bytes());
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|at| cfg.get(at))
                .copied()
                .unwrap_or(0);
        }
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.stop();
        let mut queues = Vec::new();
        for (i, q) in ctx.queues.into_iter().enumerate() {
            if !q.ready() {
                continue;
            }
            if !rings_in_ram(&q, &ctx.memory) {
                return Err(ActivateError::Other(format!(
                    "queue {i}'s rings are not in RAM"
                )));
            }
            queues.push((i as u16, q));
        }
        if !queues.iter().any(|(i, _)| *i == REQUEST_QUEUE) {
            return Err(ActivateError::MissingQueue(REQUEST_QUEUE));
        }
        let Some(server) = self.server.take() else {
            return Err(ActivateError::Other("the file server was lost".into()));
        };
        let kick = Arc::new(Kick {
            pending: Mutex::new(true),
            cond: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let k = kick.clone();
        let (mem, interrupt) = (ctx.memory, ctx.interrupt);
        let handle = std::thread::Builder::new()
            .name(format!("virtio-fs {}", self.tag))
            .spawn(move || work(k, server, queues, mem, interrupt))
            .map_err(|e| ActivateError::Other(format!("cannot start the worker: {e}")))?;
        self.worker = Some(Worker { kick, handle });
        Ok(())
    }

    fn queue_notify(&mut self, _queue: u16) {
        if let Some(w) = &self.worker {
            *lock(&w.kick.pending) = true;
            w.kick.cond.notify_one();
        }
    }

    fn reset(&mut self) {
        self.stop();
        // The guest's nodes and handles die with the device.
        match Server::new(&self.root, self.read_only) {
            Ok(s) => self.server = Some(s),
            Err(e) => tracing::error!("virtio-fs {}: cannot reopen the share: {e}", self.tag),
        }
    }

    fn pci_identity(&self) -> PciIdentity {
        // Class: mass storage, other.
        PciIdentity::standard(DEVICE_TYPE, 0x01_8000)
    }
}

#[cfg(test)]
mod tests;
