//! vmnet.framework in shared mode as network backend (macOS).
//!
//! Shared mode puts the guest behind the host's NAT on a private subnet
//! with DHCP and DNS served by macOS, like Virtualization.framework's NAT
//! attachment. Starting an interface needs either root or the
//! `com.apple.vm.networking` entitlement, which Apple grants only to
//! approved developers; an ad-hoc signature cannot carry it, so in
//! practice this backend runs as root (docs/macos.md).
//!
//! vmnet reports events on a dispatch queue: the start result once, then
//! "packets available" whenever the receive side has data. The event
//! handler only raises a flag and wakes [`NetReceiver::recv`], which reads
//! one frame per call with `vmnet_read`. `vmnet_write` sends one frame.
//!
//! Declarations are hand-written from `<vmnet/vmnet.h>` (macOS 10.10+);
//! this file has been type-checked for `aarch64-apple-darwin` but never run.

use std::ffi::{c_char, c_void, CStr};
use std::io;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;
use vm_core::sync::lock;

use block2::RcBlock;
use dispatch2::{DispatchQueue, DispatchRetained};

use super::{NetBackend, NetReceiver, MAX_FRAME_LEN};

type InterfaceRef = *mut c_void;
type XpcObject = *mut c_void;
type VmnetReturn = u32;

const VMNET_SUCCESS: VmnetReturn = 1000;
const VMNET_FAILURE: VmnetReturn = 1001;
const VMNET_INVALID_ACCESS: VmnetReturn = 1005;
const VMNET_SHARED_MODE: u64 = 1001;
const VMNET_INTERFACE_PACKETS_AVAILABLE: u32 = 1 << 0;

/// How long vmnet may take to report the start result.
const START_TIMEOUT: Duration = Duration::from_secs(30);

#[repr(C)]
struct VmPktDesc {
    vm_pkt_size: usize,
    vm_pkt_iov: *mut libc::iovec,
    vm_pkt_iovcnt: u32,
    vm_flags: u32,
}

#[link(name = "vmnet", kind = "framework")]
extern "C" {
    static vmnet_operation_mode_key: *const c_char;
    static vmnet_max_packet_size_key: *const c_char;
    static vmnet_mac_address_key: *const c_char;

    fn vmnet_start_interface(
        desc: XpcObject,
        queue: &DispatchQueue,
        handler: &block2::Block<dyn Fn(VmnetReturn, XpcObject)>,
    ) -> InterfaceRef;
    fn vmnet_interface_set_event_callback(
        iface: InterfaceRef,
        mask: u32,
        queue: &DispatchQueue,
        callback: &block2::Block<dyn Fn(u32, XpcObject)>,
    ) -> VmnetReturn;
    fn vmnet_stop_interface(
        iface: InterfaceRef,
        queue: &DispatchQueue,
        handler: &block2::Block<dyn Fn(VmnetReturn)>,
    ) -> VmnetReturn;
    fn vmnet_read(iface: InterfaceRef, packets: *mut VmPktDesc, count: *mut i32) -> VmnetReturn;
    fn vmnet_write(iface: InterfaceRef, packets: *mut VmPktDesc, count: *mut i32) -> VmnetReturn;
}

// libxpc lives in libSystem.
extern "C" {
    fn xpc_dictionary_create(
        keys: *const *const c_char,
        values: *const XpcObject,
        count: usize,
    ) -> XpcObject;
    fn xpc_dictionary_set_uint64(dict: XpcObject, key: *const c_char, value: u64);
    fn xpc_dictionary_get_uint64(dict: XpcObject, key: *const c_char) -> u64;
    fn xpc_dictionary_get_string(dict: XpcObject, key: *const c_char) -> *const c_char;
    fn xpc_release(obj: XpcObject);
}

/// The running interface, shared by the sending and receiving halves.
struct Interface {
    iface: InterfaceRef,
    queue: DispatchRetained<DispatchQueue>,
    /// Packets may be waiting (set by the event callback).
    readable: Mutex<bool>,
    wake: Condvar,
}

// SAFETY: vmnet interface references may be used from any thread; reads
// happen only on the receiver's thread and writes on the sender's, which
// vmnet allows concurrently. The dispatch queue is thread-safe.
unsafe impl Send for Interface {}
// SAFETY: as above.
unsafe impl Sync for Interface {}

impl Drop for Interface {
    fn drop(&mut self) {
        let done = RcBlock::new(|_status: VmnetReturn| {});
        // SAFETY: the interface was started and is stopped once; vmnet
        // copies the block.
        unsafe { vmnet_stop_interface(self.iface, &self.queue, &done) };
    }
}

/// A vmnet shared-mode interface.
pub struct VmnetBackend {
    iface: Arc<Interface>,
    receiver: Option<Box<dyn NetReceiver>>,
    /// The MAC address vmnet assigned to the interface, as text.
    pub assigned_mac: Option<String>,
}

fn start_error(status: VmnetReturn) -> io::Error {
    match status {
        VMNET_FAILURE | VMNET_INVALID_ACCESS => io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "vmnet_start_interface failed (status {status}): vmnet needs root or a binary \
                 signed with the com.apple.vm.networking entitlement"
            ),
        ),
        other => io::Error::other(format!("vmnet_start_interface failed (status {other})")),
    }
}

struct StartResult {
    status: Option<VmnetReturn>,
    max_packet: u64,
    mac: Option<String>,
}

impl VmnetBackend {
    /// Starts a shared-mode (NAT) interface.
    pub fn start() -> io::Result<Self> {
        let queue = DispatchQueue::new("vmapple.vmnet", None);
        let result = Arc::new((
            Mutex::new(StartResult {
                status: None,
                max_packet: 0,
                mac: None,
            }),
            Condvar::new(),
        ));
        let r = result.clone();
        let handler = RcBlock::new(move |status: VmnetReturn, params: XpcObject| {
            let mut res = lock(&r.0);
            res.status = Some(status);
            if status == VMNET_SUCCESS && !params.is_null() {
                // SAFETY: `params` is the interface's parameter dictionary,
                // valid during the handler; the keys are vmnet's constants.
                unsafe {
                    res.max_packet = xpc_dictionary_get_uint64(params, vmnet_max_packet_size_key);
                    let mac = xpc_dictionary_get_string(params, vmnet_mac_address_key);
                    if !mac.is_null() {
                        res.mac = Some(CStr::from_ptr(mac).to_string_lossy().into_owned());
                    }
                }
            }
            r.1.notify_all();
        });
        // SAFETY: an empty dictionary, then one uint64 entry under vmnet's
        // mode key; released after vmnet_start_interface copied it.
        let iface = unsafe {
            let desc = xpc_dictionary_create(std::ptr::null(), std::ptr::null(), 0);
            if desc.is_null() {
                return Err(io::Error::other("cannot create the vmnet configuration"));
            }
            xpc_dictionary_set_uint64(desc, vmnet_operation_mode_key, VMNET_SHARED_MODE);
            let iface = vmnet_start_interface(desc, &queue, &handler);
            xpc_release(desc);
            iface
        };
        let (m, c) = &*result;
        let (res, timeout) = c
            .wait_timeout_while(lock(m), START_TIMEOUT, |r| r.status.is_none())
            .unwrap_or_else(PoisonError::into_inner);
        if timeout.timed_out() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "vmnet did not answer vmnet_start_interface",
            ));
        }
        match res.status {
            Some(VMNET_SUCCESS) if !iface.is_null() => {}
            Some(status) => return Err(start_error(status)),
            None => unreachable!("waited for a status"),
        }
        if res.max_packet != 0 && res.max_packet < MAX_FRAME_LEN as u64 {
            tracing::debug!(
                "vmnet: frames above {} bytes will be refused",
                res.max_packet
            );
        }
        let interface = Arc::new(Interface {
            iface,
            queue,
            readable: Mutex::new(true),
            wake: Condvar::new(),
        });
        // The callback must not own the interface (it would never drop).
        let weak = Arc::downgrade(&interface);
        let events = RcBlock::new(move |mask: u32, _event: XpcObject| {
            if mask & VMNET_INTERFACE_PACKETS_AVAILABLE == 0 {
                return;
            }
            if let Some(i) = weak.upgrade() {
                *lock(&i.readable) = true;
                i.wake.notify_all();
            }
        });
        // SAFETY: a started interface; vmnet copies the block and calls it
        // on `queue`.
        let status = unsafe {
            vmnet_interface_set_event_callback(
                interface.iface,
                VMNET_INTERFACE_PACKETS_AVAILABLE,
                &interface.queue,
                &events,
            )
        };
        if status != VMNET_SUCCESS {
            return Err(io::Error::other(format!(
                "vmnet_interface_set_event_callback failed (status {status})"
            )));
        }
        let mac = res.mac.clone();
        drop(res);
        Ok(Self {
            receiver: Some(Box::new(VmnetReceiver(interface.clone()))),
            iface: interface,
            assigned_mac: mac,
        })
    }
}

/// One packet descriptor over one buffer.
fn one_packet(iov: &mut libc::iovec) -> VmPktDesc {
    VmPktDesc {
        vm_pkt_size: iov.iov_len,
        vm_pkt_iov: iov,
        vm_pkt_iovcnt: 1,
        vm_flags: 0,
    }
}

impl NetBackend for VmnetBackend {
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        let mut iov = libc::iovec {
            iov_base: frame.as_ptr().cast_mut().cast(),
            iov_len: frame.len(),
        };
        let mut pkt = one_packet(&mut iov);
        let mut count = 1;
        // SAFETY: one descriptor over `frame`, which vmnet only reads and
        // which outlives the call.
        let status = unsafe { vmnet_write(self.iface.iface, &mut pkt, &mut count) };
        if status != VMNET_SUCCESS || count != 1 {
            return Err(io::Error::other(format!(
                "vmnet_write failed (status {status})"
            )));
        }
        Ok(())
    }

    fn take_receiver(&mut self) -> Option<Box<dyn NetReceiver>> {
        self.receiver.take()
    }
}

struct VmnetReceiver(Arc<Interface>);

impl NetReceiver for VmnetReceiver {
    fn recv(&mut self, buf: &mut [u8], timeout: Duration) -> io::Result<Option<usize>> {
        let i = &self.0;
        {
            let (mut ready, _) = i
                .wake
                .wait_timeout_while(lock(&i.readable), timeout, |r| !*r)
                .unwrap_or_else(PoisonError::into_inner);
            if !*ready {
                return Ok(None);
            }
            // Cleared before reading: an event arriving meanwhile sets it
            // again, so no packet is left unread.
            *ready = false;
        }
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let mut pkt = one_packet(&mut iov);
        let mut count = 1;
        // SAFETY: one descriptor over `buf`, writable for its length.
        let status = unsafe { vmnet_read(i.iface, &mut pkt, &mut count) };
        if status != VMNET_SUCCESS {
            return Err(io::Error::other(format!(
                "vmnet_read failed (status {status})"
            )));
        }
        if count < 1 {
            return Ok(None);
        }
        // More may be queued behind this one.
        *lock(&i.readable) = true;
        Ok(Some(pkt.vm_pkt_size))
    }
}
