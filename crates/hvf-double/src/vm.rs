//! The double's one VM: the software CPU, the stage-2 map, the vCPUs and
//! the rules the framework enforces on them.
//!
//! **Threads.** Every vCPU belongs to the thread that created it, and every
//! per-vCPU call checks that (hvf-semantics.md §2.3, §11.1). Underneath,
//! all vCPUs share one Unicorn engine, as the software CPU's accelerator
//! does, so atomics and code/TLB maintenance stay exact across vCPUs: a
//! vCPU's thread holds the engine while it runs guest code and hands it on
//! at the end of a time slice when another thread is waiting. The engine is
//! taken through a ticket [`Gate`] so that hand-over is fair, then through
//! the mutex that guards the state (never contended: only the ticket
//! holder locks it). `hv_vcpus_exit` needs neither: it uses [`KICKS`].

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::ThreadId;

use accel_tcg::engine::{Context, Engine, KickHandle};
use accel_tcg::ffi::RegisterARM64 as Reg;
use accel_tcg::sysregs::CpuTimers;
use accel_tcg::ticker::Ticker;
use arch_arm64::sysreg::MPIDR_EL1;
use arch_arm64::SysReg;

use crate::run::{self, Span};
use crate::sysregs::{
    self, ID_AA64DFR0_EL1, ID_AA64ISAR1_EL1, ID_AA64PFR0_EL1, ID_AA64PFR1_EL1, ID_AA64SMFR0_EL1,
    ID_AA64ZFR0_EL1, MIDR_EL1,
};
use crate::{
    HvReturn, HvVcpuExit, HV_BAD_ARGUMENT, HV_BUSY, HV_ERROR, HV_NO_DEVICE, HV_NO_RESOURCES,
    HV_SUCCESS, HV_UNSUPPORTED,
};

/// The stage-2 granule: 16 KiB, as on Apple silicon before macOS 26
/// (hvf-semantics.md §3.2). Guest addresses and sizes must be multiples.
pub const GRANULE: u64 = 16 << 10;
/// IPA width without a configuration, and the most the double offers
/// (§3.3: 36 bits by default, 40 on macOS 15 machines).
pub const DEFAULT_IPA_BITS: u32 = 36;
pub const MAX_IPA_BITS: u32 = 40;
/// The physical addresses the software CPU can produce; everything not
/// mapped below this is an unmapped IPA and aborts to the VMM.
const PHYS_LIMIT: u64 = 1 << 48;
/// The decompiled framework's vCPU table (§2.3; `HV_NO_RESOURCES` when
/// full).
pub const MAX_VCPUS: usize = 64;
/// Translation cache of the engine (as the software CPU uses).
const TCG_BUFFER: u32 = 512 << 20;

/// SCR_EL3 for the inert EL3 of the software CPU: RES1 bits, HCE (HVC
/// reaches the hook), RW, and APK/API (pointer authentication does not
/// trap to EL3). Unlike the software CPU's accelerator, SMC is left
/// enabled so it reaches the hook and exits with EC 0x17 as on HVF.
pub const SCR_EL3: SysReg = SysReg::new(3, 6, 1, 1, 0);
pub const SCR_EL3_VALUE: u64 = (1 << 17) | (1 << 16) | (1 << 10) | (1 << 8) | (1 << 5) | (1 << 4);
const HCR_EL2: SysReg = SysReg::new(3, 4, 1, 1, 0);
const HCR_EL2_RW: u64 = 1 << 31;
const SCTLR_EL1: SysReg = SysReg::new(3, 0, 1, 0, 0);

/// MIDR of a fresh vCPU: Apple's implementer code (0x61) and architecture
/// 0xf, as QEMU sets it (the exact value on real machines is UNCONFIRMED,
/// hvf-semantics.md §5.5).
pub const APPLE_MIDR: u64 = 0x610f_0000;

/// Locks a mutex, taking over a poisoned one: the double's state stays
/// consistent across a panic in a caller (each call leaves it whole).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A fair ticket lock: threads get the engine in the order they asked.
pub struct Gate {
    tickets: Mutex<(u64, u64)>,
    turn: Condvar,
}

impl Gate {
    const fn new() -> Self {
        Self {
            tickets: Mutex::new((0, 0)),
            turn: Condvar::new(),
        }
    }

    fn enter(&self) {
        let mut t = lock(&self.tickets);
        let mine = t.0;
        t.0 += 1;
        while t.1 != mine {
            t = self.turn.wait(t).unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn leave(&self) {
        let mut t = lock(&self.tickets);
        t.1 += 1;
        self.turn.notify_all();
    }

    /// Whether another thread is waiting for the engine.
    pub fn contended(&self) -> bool {
        let t = lock(&self.tickets);
        t.0 > t.1 + 1
    }
}

pub static GATE: Gate = Gate::new();
static STATE: Mutex<Option<VmCell>> = Mutex::new(None);

/// The VM state as the gate holder sees it.
pub struct Entered {
    guard: Option<MutexGuard<'static, Option<VmCell>>>,
}

impl Entered {
    pub fn vm(&mut self) -> Result<&mut Vm, HvReturn> {
        match self.guard.as_mut().and_then(|g| g.as_mut()) {
            Some(cell) => Ok(&mut cell.0),
            None => Err(HV_NO_DEVICE),
        }
    }

    pub fn slot(&mut self) -> &mut Option<VmCell> {
        self.guard.as_mut().expect("held until drop")
    }
}

impl Drop for Entered {
    fn drop(&mut self) {
        drop(self.guard.take());
        GATE.leave();
    }
}

/// Takes the engine (in turn) and the state.
pub fn enter() -> Entered {
    GATE.enter();
    Entered {
        guard: Some(lock(&STATE)),
    }
}

/// The VM behind the gate. Unicorn's engine and contexts are raw
/// pointers, hence not `Send` by themselves.
pub struct VmCell(pub Vm);

// SAFETY: the engine, its contexts and the callbacks' state are only ever
// touched by the thread that holds both the gate and the STATE mutex, one
// thread at a time, with the mutex providing the memory ordering between
// holders. Unicorn 2.1.5 keeps no per-thread state on Linux (its only
// thread-local is the seeded guest RNG, which this double never seeds),
// so moving the engine between serialised threads is sound.
unsafe impl Send for VmCell {}

/// Kicks and cancellation, reachable without the engine.
pub struct Kicks {
    pub handle: Option<KickHandle>,
    pub cancel: Vec<Option<Arc<AtomicBool>>>,
    /// The vCPU whose guest code the engine runs now.
    pub running: Option<usize>,
}

pub static KICKS: Mutex<Kicks> = Mutex::new(Kicks {
    handle: None,
    cancel: Vec::new(),
    running: None,
});

/// `hv_vcpus_exit` for one vCPU: its next or current run returns
/// CANCELED.
pub fn cancel(id: u64) -> HvReturn {
    let k = lock(&KICKS);
    let Some(Some(flag)) = usize::try_from(id).ok().and_then(|i| k.cancel.get(i)) else {
        return HV_BAD_ARGUMENT;
    };
    flag.store(true, Ordering::SeqCst);
    if k.running == usize::try_from(id).ok() {
        if let Some(h) = &k.handle {
            h.kick();
        }
    }
    HV_SUCCESS
}

/// One stage-2 mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub ipa: u64,
    pub size: u64,
    pub host: usize,
}

/// What the double keeps per vCPU for the callbacks.
pub struct Core {
    pub mpidr: u64,
    pub midr: u64,
    /// The ID register space as the guest reads it (writable by the VMM).
    pub ids: BTreeMap<SysReg, u64>,
    pub timers: CpuTimers,
    /// CNTVCT = host count − offset.
    pub offset: u64,
    /// Debug registers while their trap is off (stored, not acted on).
    pub debug: BTreeMap<SysReg, u64>,
    pub trap_debug_regs: bool,
}

/// An abandoned guest access or hooked exception, for the exit record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trap {
    Data { ipa: u64, write: bool },
    SysReg { iss: u64 },
    Hvc,
    Smc,
}

/// What the engine's callbacks reach through their user data.
pub struct Shared {
    pub cores: RefCell<Vec<Option<Core>>>,
    pub current: Cell<usize>,
    pub trap: Cell<Option<Trap>>,
    /// The ESR an HVC/SMC hook saw.
    pub hook_syndrome: Cell<u64>,
    pub kick: KickHandle,
}

/// One vCPU as the API sees it.
pub struct Vcpu {
    pub owner: ThreadId,
    pub context: Context,
    /// The exit record whose address `hv_vcpu_create` hands out.
    pub exit: Box<HvVcpuExit>,
    pub pending_irq: bool,
    pub pending_fiq: bool,
    pub vtimer_masked: bool,
    pub trap_debug_exceptions: bool,
    pub cancel: Arc<AtomicBool>,
}

pub struct Vm {
    // Drop order: the engine before what its callbacks point at.
    pub engine: Box<Engine>,
    pub shared: Box<Shared>,
    #[allow(clippy::vec_box)] // Unicorn holds each span's address.
    pub spans: Vec<Box<Span>>,
    pub maps: Vec<Mapping>,
    /// RAM ranges currently mapped in the engine.
    engine_ram: Vec<(u64, u64)>,
    pub ipa_bits: u32,
    pub reset: Context,
    pub vcpus: Vec<Option<Vcpu>>,
    pub loaded: Option<usize>,
    pub ticker: Ticker,
    /// ID registers of a fresh vCPU.
    id_defaults: BTreeMap<SysReg, u64>,
}

fn field(value: u64, shift: u32, new: u64) -> u64 {
    (value & !(0xf << shift)) | ((new & 0xf) << shift)
}

impl Vm {
    /// `hv_vm_create`: opens the engine and makes all of the physical
    /// space unmapped.
    pub fn create(ipa_bits: u32) -> Result<Self, HvReturn> {
        let engine = Box::new(Engine::new(TCG_BUFFER).map_err(|e| {
            tracing::error!("hvf-double: opening the software CPU: {e}");
            HV_ERROR
        })?);
        let kick = engine.kick_handle();
        let shared = Box::new(Shared {
            cores: RefCell::new(Vec::new()),
            current: Cell::new(0),
            trap: Cell::new(None),
            hook_syndrome: Cell::new(0),
            kick: kick.clone(),
        });
        let user = (&*shared as *const Shared).cast_mut().cast::<c_void>();
        let fail = |what: &str, e: accel_tcg::engine::UcError| {
            tracing::error!("hvf-double: {what}: {e}");
            HV_ERROR
        };
        // SAFETY: `shared` is boxed and kept in the Vm next to the engine,
        // which is dropped first; callbacks run only inside Engine::run on
        // the gate holder's thread.
        unsafe {
            engine
                .enable_sysemu(run::sysreg_filter, run::sysreg_handler, user)
                .map_err(|e| fail("enabling system emulation", e))?;
            engine
                .hook_exceptions(run::exception_hook, user)
                .map_err(|e| fail("hooking HVC/SMC", e))?;
        }
        engine
            .write_sysreg(SCR_EL3, SCR_EL3_VALUE)
            .map_err(|e| fail("SCR_EL3", e))?;
        engine
            .write_sysreg(HCR_EL2, HCR_EL2_RW)
            .map_err(|e| fail("HCR_EL2", e))?;
        let id_defaults = Self::apple_ids(&engine);
        // A fresh vCPU: EL0t with everything zero (§5.5).
        engine.write(Reg::PSTATE, 0);
        engine
            .write_sysreg(SCTLR_EL1, 0)
            .map_err(|e| fail("SCTLR_EL1", e))?;
        engine
            .write_sysreg(SCR_EL3, SCR_EL3_VALUE)
            .map_err(|e| fail("SCR_EL3", e))?;
        let mut reset = engine.new_context().map_err(|e| fail("a context", e))?;
        engine.save(&mut reset);
        let ticker = Ticker::new(kick.clone());
        let mut vm = Self {
            engine,
            shared,
            spans: Vec::new(),
            maps: Vec::new(),
            engine_ram: Vec::new(),
            ipa_bits,
            reset,
            vcpus: Vec::new(),
            loaded: None,
            ticker,
            id_defaults,
        };
        vm.rebuild_memory()?;
        lock(&KICKS).handle = Some(kick);
        Ok(vm)
    }

    /// The ID registers an Apple-silicon vCPU shows, from the software
    /// CPU's: no EL2/EL3 (EL2 is off), no GIC system-register field (the
    /// framework's default without `hv_gic` is UNCONFIRMED; QEMU sets it
    /// itself, which says it is 0), no SVE/SME/MTE/RAS/AMU, no pointer
    /// authentication (its keys would trap to the engine's absent EL2),
    /// and an IMPLEMENTATION DEFINED PMU (Apple cores have no PMUv3).
    fn apple_ids(engine: &Engine) -> BTreeMap<SysReg, u64> {
        let mut ids = BTreeMap::new();
        for crm in 1..8 {
            for op2 in 0..8 {
                let reg = SysReg::new(3, 0, 0, crm, op2);
                ids.insert(reg, engine.read_sysreg(reg).unwrap_or(0));
            }
        }
        let mut pfr0 = ids[&ID_AA64PFR0_EL1];
        for shift in [8, 12, 24, 28, 32, 36, 40, 44] {
            pfr0 = field(pfr0, shift, 0);
        }
        ids.insert(ID_AA64PFR0_EL1, pfr0);
        let pfr1 = ids[&ID_AA64PFR1_EL1] & 0xf0;
        ids.insert(ID_AA64PFR1_EL1, pfr1);
        let mut isar1 = ids[&ID_AA64ISAR1_EL1];
        for shift in [4, 8, 24, 28] {
            isar1 = field(isar1, shift, 0);
        }
        ids.insert(ID_AA64ISAR1_EL1, isar1);
        ids.insert(ID_AA64DFR0_EL1, field(ids[&ID_AA64DFR0_EL1], 8, 0xf));
        ids.insert(ID_AA64ZFR0_EL1, 0);
        ids.insert(ID_AA64SMFR0_EL1, 0);
        ids
    }

    /// Remaps the engine after the stage-2 map changed: RAM where mapped,
    /// aborting MMIO everywhere else.
    pub fn rebuild_memory(&mut self) -> Result<(), HvReturn> {
        let fail = |what: String, e: accel_tcg::engine::UcError| {
            tracing::error!("hvf-double: {what}: {e}");
            HV_ERROR
        };
        for span in self.spans.drain(..) {
            self.engine
                .unmap(span.base, span.size)
                .map_err(|e| fail(format!("unmapping {:#x}", span.base), e))?;
        }
        for (base, size) in self.engine_ram.drain(..) {
            self.engine
                .unmap(base, size)
                .map_err(|e| fail(format!("unmapping {base:#x}"), e))?;
        }
        let mut ram: Vec<Mapping> = self.maps.clone();
        ram.sort_unstable_by_key(|m| m.ipa);
        for m in &ram {
            // SAFETY: `hv_vm_map`'s caller promises the host range stays
            // mapped until `hv_vm_unmap`/`hv_vm_destroy` (the framework's
            // contract); the double drops it from the engine then.
            unsafe { self.engine.map_ram(m.ipa, m.size, m.host as *mut u8) }
                .map_err(|e| fail(format!("mapping RAM at {:#x}", m.ipa), e))?;
            self.engine_ram.push((m.ipa, m.size));
        }
        let shared: *const Shared = &*self.shared;
        let mut cursor = 0u64;
        let ends = ram
            .iter()
            .map(|m| (m.ipa, m.ipa + m.size))
            .chain(std::iter::once((PHYS_LIMIT, PHYS_LIMIT)));
        for (start, end) in ends {
            if start > cursor {
                let span = Box::new(Span {
                    base: cursor,
                    size: start - cursor,
                    shared,
                });
                // SAFETY: the span is boxed and kept in `spans` until it is
                // unmapped here or the engine is dropped.
                unsafe {
                    self.engine.map_mmio(
                        span.base,
                        span.size,
                        run::mmio_read,
                        run::mmio_write,
                        (&*span as *const Span).cast_mut().cast(),
                    )
                }
                .map_err(|e| fail(format!("mapping the unmapped space at {cursor:#x}"), e))?;
                self.spans.push(span);
            }
            cursor = cursor.max(end);
        }
        self.engine.flush_tlb();
        self.engine.flush_translations();
        Ok(())
    }

    /// `hv_vm_map` after its argument checks.
    pub fn map(&mut self, host: usize, ipa: u64, size: u64, flags: u64) -> HvReturn {
        const ALL: u64 = crate::HV_MEMORY_READ | crate::HV_MEMORY_WRITE | crate::HV_MEMORY_EXEC;
        if host == 0 || host as u64 % host_page() != 0 {
            return HV_BAD_ARGUMENT;
        }
        if ipa % GRANULE != 0 || size == 0 || size % GRANULE != 0 || flags & !ALL != 0 {
            return HV_BAD_ARGUMENT;
        }
        let Some(end) = ipa.checked_add(size) else {
            return HV_BAD_ARGUMENT;
        };
        if end > 1u64 << self.ipa_bits {
            return HV_BAD_ARGUMENT;
        }
        if flags != ALL {
            // Permission faults would need the engine to abort on them;
            // vmapple maps everything RWX. Refused, not ignored.
            tracing::warn!("hvf-double: mappings other than RWX are not modelled");
            return HV_UNSUPPORTED;
        }
        if self
            .maps
            .iter()
            .any(|m| ipa < m.ipa + m.size && m.ipa < end)
        {
            // §3.4 double choice: the old mapping stays.
            return HV_BAD_ARGUMENT;
        }
        self.maps.push(Mapping { ipa, size, host });
        match self.rebuild_memory() {
            Ok(()) => HV_SUCCESS,
            Err(e) => {
                self.maps.pop();
                let _ = self.rebuild_memory();
                e
            }
        }
    }

    /// `hv_vm_unmap`: the range must be mapped, wholly; parts of larger
    /// mappings may be unmapped (§3.4).
    pub fn unmap(&mut self, ipa: u64, size: u64) -> HvReturn {
        if ipa % GRANULE != 0 || size == 0 || size % GRANULE != 0 {
            return HV_BAD_ARGUMENT;
        }
        let Some(end) = ipa.checked_add(size) else {
            return HV_BAD_ARGUMENT;
        };
        // Every granule of the range must be mapped.
        let mut covered = 0u64;
        for m in &self.maps {
            let lo = m.ipa.max(ipa);
            let hi = (m.ipa + m.size).min(end);
            if lo < hi {
                covered += hi - lo;
            }
        }
        if covered != size {
            return HV_BAD_ARGUMENT;
        }
        let mut kept = Vec::with_capacity(self.maps.len() + 1);
        for m in self.maps.drain(..) {
            let m_end = m.ipa + m.size;
            if m_end <= ipa || end <= m.ipa {
                kept.push(m);
                continue;
            }
            if m.ipa < ipa {
                kept.push(Mapping {
                    ipa: m.ipa,
                    size: ipa - m.ipa,
                    host: m.host,
                });
            }
            if end < m_end {
                let skip = usize::try_from(end - m.ipa).unwrap_or(usize::MAX);
                kept.push(Mapping {
                    ipa: end,
                    size: m_end - end,
                    host: m.host.wrapping_add(skip),
                });
            }
        }
        self.maps = kept;
        match self.rebuild_memory() {
            Ok(()) => HV_SUCCESS,
            Err(e) => e,
        }
    }

    /// `hv_vcpu_create` on thread `owner`.
    pub fn create_vcpu(&mut self, owner: ThreadId) -> Result<(u64, *const HvVcpuExit), HvReturn> {
        if self.vcpus.iter().flatten().any(|v| v.owner == owner) {
            // §2.3: one vCPU per thread (double choice of code).
            return Err(HV_BUSY);
        }
        let id = match self.vcpus.iter().position(Option::is_none) {
            Some(free) => free,
            None if self.vcpus.len() < MAX_VCPUS => {
                self.vcpus.push(None);
                self.vcpus.len() - 1
            }
            None => return Err(HV_NO_RESOURCES),
        };
        let mut context = self.engine.new_context().map_err(|e| {
            tracing::error!("hvf-double: a vCPU context: {e}");
            HV_ERROR
        })?;
        // The reset state, taken from the saved copy through the engine.
        self.park();
        self.engine.restore(&self.reset);
        self.engine.save(&mut context);
        let cancel = Arc::new(AtomicBool::new(false));
        let exit = Box::new(HvVcpuExit::default());
        let exit_ptr: *const HvVcpuExit = &*exit;
        self.vcpus[id] = Some(Vcpu {
            owner,
            context,
            exit,
            pending_irq: false,
            pending_fiq: false,
            vtimer_masked: false,
            trap_debug_exceptions: false,
            cancel: cancel.clone(),
        });
        {
            let mut cores = self.shared.cores.borrow_mut();
            if cores.len() <= id {
                cores.resize_with(id + 1, || None);
            }
            cores[id] = Some(Core {
                mpidr: 0,
                midr: APPLE_MIDR,
                ids: self.id_defaults.clone(),
                timers: CpuTimers::default(),
                offset: 0,
                debug: BTreeMap::new(),
                trap_debug_regs: false,
            });
        }
        let mut k = lock(&KICKS);
        if k.cancel.len() <= id {
            k.cancel.resize(id + 1, None);
        }
        k.cancel[id] = Some(cancel);
        Ok((id as u64, exit_ptr))
    }

    /// The vCPU `id`, if it exists and belongs to `owner`.
    pub fn owned(&mut self, id: u64, owner: ThreadId) -> Result<usize, HvReturn> {
        let index = usize::try_from(id).map_err(|_| HV_BAD_ARGUMENT)?;
        match self.vcpus.get(index) {
            Some(Some(v)) if v.owner == owner => Ok(index),
            Some(Some(v)) => {
                // §10 double choice: refused, and said loudly.
                tracing::error!(
                    "hvf-double: vCPU {id} used from thread {owner:?}, but it belongs to {:?}",
                    v.owner
                );
                Err(HV_BAD_ARGUMENT)
            }
            _ => Err(HV_BAD_ARGUMENT),
        }
    }

    pub fn destroy_vcpu(&mut self, index: usize) {
        if self.loaded == Some(index) {
            self.loaded = None;
        }
        self.vcpus[index] = None;
        self.shared.cores.borrow_mut()[index] = None;
        let mut k = lock(&KICKS);
        if let Some(slot) = k.cancel.get_mut(index) {
            *slot = None;
        }
    }

    /// Saves the vCPU on the engine, if any.
    pub fn park(&mut self) {
        if let Some(old) = self.loaded.take() {
            if let Some(v) = self.vcpus[old].as_mut() {
                self.engine.save(&mut v.context);
            }
        }
    }

    /// Puts vCPU `index` on the engine.
    pub fn load(&mut self, index: usize) {
        if self.loaded == Some(index) {
            return;
        }
        self.park();
        if let Some(v) = self.vcpus[index].as_ref() {
            self.engine.restore(&v.context);
        }
        // The TLB holds the previous vCPU's translations.
        self.engine.flush_tlb();
        self.engine.set_irq_lines(false, false);
        self.loaded = Some(index);
        self.shared.current.set(index);
    }

    pub fn any_vcpu(&self) -> bool {
        self.vcpus.iter().any(Option::is_some)
    }

    /// Reads system register `reg` (already checked against the API's
    /// list) of vCPU `index`.
    pub fn read_sys(&mut self, index: usize, reg: SysReg) -> u64 {
        {
            let cores = self.shared.cores.borrow();
            let core = cores[index].as_ref().expect("checked by owned()");
            if let Some(v) = double_sys(core, reg) {
                return v;
            }
        }
        self.load(index);
        match native_register(reg) {
            // The selected stack pointer lives in SP, its bank is stale.
            Some(r) if r == selected_sp(self.engine.read(Reg::PSTATE)) => self.engine.read(Reg::SP),
            Some(r) => self.engine.read(r),
            None => self.engine.read_sysreg(reg).unwrap_or(0),
        }
    }

    /// Writes system register `reg` of vCPU `index`.
    pub fn write_sys(&mut self, index: usize, reg: SysReg, value: u64) -> HvReturn {
        {
            let mut cores = self.shared.cores.borrow_mut();
            let core = cores[index].as_mut().expect("checked by owned()");
            if write_double_sys(core, reg, value) {
                return HV_SUCCESS;
            }
        }
        self.load(index);
        match native_register(reg) {
            Some(r) => {
                self.engine.write(r, value);
                if r == selected_sp(self.engine.read(Reg::PSTATE)) {
                    self.engine.write(Reg::SP, value);
                }
            }
            None => {
                if self.engine.write_sysreg(reg, value).is_err() {
                    // A register the software CPU lacks (e.g. ACTLR bits):
                    // accepted and dropped, as RAZ/WI.
                    tracing::debug!("hvf-double: {reg} is not modelled; write dropped");
                }
            }
        }
        HV_SUCCESS
    }
}

/// The bank of the stack pointer PSTATE selects (EL1h: SP_EL1; EL1t and
/// EL0: SP_EL0). The software CPU keeps the selected one in SP and
/// refreshes the banks only on exception entry and return; the framework's
/// SP_EL0/SP_EL1 are always the real ones.
pub fn selected_sp(pstate: u64) -> Reg {
    if (pstate >> 2) & 3 >= 1 && pstate & 1 == 1 {
        Reg::SP_EL1
    } else {
        Reg::SP_EL0
    }
}

/// Registers the software CPU names directly (banked or live copies that a
/// raw system-register access would miss).
fn native_register(reg: SysReg) -> Option<Reg> {
    Some(
        match (reg.op0(), reg.op1(), reg.crn(), reg.crm(), reg.op2()) {
            (3, 0, 4, 1, 0) => Reg::SP_EL0,
            (3, 4, 4, 1, 0) => Reg::SP_EL1,
            (3, 0, 4, 0, 1) => Reg::ELR_EL1,
            (3, 0, 5, 2, 0) => Reg::ESR_EL1,
            (3, 0, 6, 0, 0) => Reg::FAR_EL1,
            (3, 0, 12, 0, 0) => Reg::VBAR_EL1,
            (3, 0, 13, 0, 4) => Reg::TPIDR_EL1,
            (3, 3, 13, 0, 2) => Reg::TPIDR_EL0,
            (3, 3, 13, 0, 3) => Reg::TPIDRRO_EL0,
            (3, 0, 7, 4, 0) => Reg::PAR_EL1,
            (3, 0, 10, 2, 0) => Reg::MAIR_EL1,
            (3, 0, 2, 0, 0) => Reg::TTBR0_EL1,
            _ => return None,
        },
    )
}

/// The double's own copy of `reg`, if it keeps one.
pub fn double_sys(core: &Core, reg: SysReg) -> Option<u64> {
    use arch_arm64::sysreg::{CNTV_CTL_EL0, CNTV_CVAL_EL0};
    Some(match reg {
        MPIDR_EL1 => core.mpidr,
        MIDR_EL1 => core.midr,
        r if r.is_id_register() => core.ids.get(&r).copied().unwrap_or(0),
        // ISTATUS as the guest would read it now.
        CNTV_CTL_EL0 => core
            .timers
            .virt
            .read_ctl(core.virtual_count(crate::clock::now())),
        CNTV_CVAL_EL0 => core.timers.virt.read_cval(),
        sysregs::CNTKCTL_EL1 => core.cntkctl(),
        r if sysregs::is_debug_bp_wp(r) || r == sysregs::MDSCR_EL1 || r == sysregs::MDCCINT_EL1 => {
            core.debug.get(&r).copied().unwrap_or(0)
        }
        _ => return None,
    })
}

fn write_double_sys(core: &mut Core, reg: SysReg, value: u64) -> bool {
    use arch_arm64::sysreg::{CNTV_CTL_EL0, CNTV_CVAL_EL0};
    match reg {
        MPIDR_EL1 => core.mpidr = value,
        MIDR_EL1 => core.midr = value,
        r if r.is_id_register() => {
            core.ids.insert(r, value);
        }
        CNTV_CTL_EL0 => core.timers.virt.write_ctl(value),
        CNTV_CVAL_EL0 => core.timers.virt.write_cval(value),
        sysregs::CNTKCTL_EL1 => core.timers.cntkctl = value & 0x3ff,
        r if sysregs::is_debug_bp_wp(r) || r == sysregs::MDSCR_EL1 || r == sysregs::MDCCINT_EL1 => {
            core.debug.insert(r, value);
        }
        _ => return false,
    }
    true
}

impl Core {
    fn cntkctl(&self) -> u64 {
        self.timers.cntkctl
    }

    /// The guest's virtual count at host count `host`.
    pub fn virtual_count(&self, host: u64) -> u64 {
        host.wrapping_sub(self.offset)
    }
}

/// The host page size (host addresses given to `hv_vm_map` must be
/// aligned to it; on Apple silicon it equals the 16 KiB granule).
pub fn host_page() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(page).ok().filter(|&p| p > 0).unwrap_or(4096)
}
