//! Guest-visible behaviour of the GIC through its MMIO frames, system
//! registers and device lines.

use std::sync::Mutex;

use arch_arm64::sysreg::*;

use super::*;

#[derive(Default)]
struct Cpus(Mutex<Vec<(bool, bool)>>);

impl Cpus {
    fn new(n: usize) -> Arc<Self> {
        Arc::new(Self(Mutex::new(vec![(false, false); n])))
    }
    fn get(&self, cpu: usize) -> (bool, bool) {
        self.0.lock().unwrap()[cpu]
    }
}

impl CpuInterruptOutputs for Cpus {
    fn set(&self, cpu: usize, irq: bool, fiq: bool) {
        self.0.lock().unwrap()[cpu] = (irq, fiq);
    }
}

const W: AccessWidth = AccessWidth::Word;
const D: AccessWidth = AccessWidth::Double;
const B: AccessWidth = AccessWidth::Byte;

struct Rig {
    gic: Arc<GicV3>,
    dist: Arc<dyn MmioDevice>,
    redist: Arc<dyn MmioDevice>,
    cpus: Arc<Cpus>,
}

fn rig(n: usize) -> Rig {
    let cpus = Cpus::new(n);
    let gic = GicV3::new(n, 256, cpus.clone());
    Rig {
        dist: gic.distributor(),
        redist: gic.redistributors(),
        gic,
        cpus,
    }
}

impl Rig {
    /// What Linux does: distributor groups 0 and 1 on, every interrupt
    /// group 1, CPU interfaces unmasked.
    fn enable_like_linux(&self, n: usize) {
        self.dist.write(distributor::CTLR, W, 0b11);
        for reg in 1..9u64 {
            self.dist
                .write(registers::IGROUPR + 4 * reg, W, 0xffff_ffff);
        }
        for cpu in 0..n {
            let sgi = cpu as u64 * GicV3::REDIST_STRIDE + redistributor::SGI_FRAME;
            self.redist.write(sgi + registers::IGROUPR, W, 0xffff_ffff);
            self.redist.write(
                cpu as u64 * GicV3::REDIST_STRIDE + redistributor::WAKER,
                W,
                0,
            );
            assert!(self.gic.write_sysreg(cpu, ICC_PMR_EL1, 0xf0));
            assert!(self.gic.write_sysreg(cpu, ICC_IGRPEN1_EL1, 1));
        }
    }
}

#[test]
fn identification_and_reset_values() {
    let r = rig(4);
    assert_eq!(
        r.dist.read(distributor::TYPER, W) & 0x1f,
        8,
        "ITLinesNumber for 288 INTIDs"
    );
    assert_eq!(r.dist.read(0xffe8, W) >> 4 & 0xf, 3, "PIDR2.ArchRev");
    assert_eq!(r.redist.read(0xffe8, W) >> 4 & 0xf, 3);
    assert_eq!(
        r.dist.read(distributor::CTLR, W),
        (1 << 4) | (1 << 6),
        "ARE and DS set, groups off"
    );
    for cpu in 0..4u64 {
        let typer = r
            .redist
            .read(cpu * GicV3::REDIST_STRIDE + redistributor::TYPER, D);
        assert_eq!(typer >> 32, cpu, "affinity value");
        assert_eq!(typer >> 8 & 0xffff, cpu, "processor number");
        assert_eq!(
            typer & (1 << 4) != 0,
            cpu == 3,
            "Last only on the last frame"
        );
        assert_eq!(
            r.redist
                .read(cpu * GicV3::REDIST_STRIDE + redistributor::WAKER, W),
            0b110,
            "asleep at reset"
        );
    }
    assert_eq!(
        r.redist
            .read(4 * GicV3::REDIST_STRIDE + redistributor::TYPER, D),
        0,
        "no fifth CPU"
    );
}

#[test]
fn waker_handshake() {
    let r = rig(1);
    r.redist.write(redistributor::WAKER, W, 0);
    assert_eq!(
        r.redist.read(redistributor::WAKER, W) & 0b100,
        0,
        "ChildrenAsleep clears"
    );
}

#[test]
fn level_spi_from_a_device_reaches_its_routed_cpu() {
    let r = rig(32);
    r.enable_like_linux(32);
    let intid = 32 + 5;
    // Route to CPU 17 (Aff1 = 1, Aff0 = 1) and enable.
    r.dist.write(distributor::IROUTER + 8 * intid, D, 0x101);
    assert_eq!(r.dist.read(distributor::IROUTER + 8 * intid, D), 0x101);
    r.dist.write(registers::IPRIORITYR + intid, B, 0xa0);
    r.dist.write(registers::ISENABLER + 4, W, 1 << 5);
    let line = r.gic.spi(5);

    line.set_level(true);
    assert_eq!(r.cpus.get(17), (true, false));
    assert_eq!(r.cpus.get(0), (false, false));
    assert_eq!(r.gic.read_sysreg(17, ICC_IAR1_EL1), Some(intid));
    assert_eq!(
        r.cpus.get(17),
        (false, false),
        "active: no longer signalled"
    );
    line.set_level(false);
    assert!(r.gic.write_sysreg(17, ICC_EOIR1_EL1, intid));
    assert_eq!(
        r.gic.read_sysreg(17, ICC_IAR1_EL1),
        Some(1023),
        "line went low before EOI"
    );
}

#[test]
fn edge_spi_latches_one_rising_edge() {
    let r = rig(1);
    r.enable_like_linux(1);
    r.dist.write(registers::ICFGR + 8, W, 0b10 << 2); // INTID 33 edge
    r.dist.write(registers::ISENABLER + 4, W, 1 << 1);
    let line = r.gic.spi(1);
    line.set_level(true);
    line.set_level(false);
    assert_eq!(
        r.dist.read(registers::ISPENDR + 4, W),
        1 << 1,
        "latched after the pulse"
    );
    assert_eq!(r.gic.read_sysreg(0, ICC_IAR1_EL1), Some(33));
    assert!(r.gic.write_sysreg(0, ICC_EOIR1_EL1, 33));
    assert_eq!(r.gic.read_sysreg(0, ICC_IAR1_EL1), Some(1023));
}

#[test]
fn pending_and_active_registers() {
    let r = rig(2);
    r.enable_like_linux(2);
    // Software-pend PPI 27 on CPU 1 via its SGI frame.
    let sgi1 = GicV3::REDIST_STRIDE + redistributor::SGI_FRAME;
    r.redist.write(sgi1 + registers::ISENABLER, W, 1 << 27);
    r.redist.write(sgi1 + registers::ISPENDR, W, 1 << 27);
    assert_eq!(r.cpus.get(1), (true, false));
    assert_eq!(r.cpus.get(0), (false, false), "banked: CPU 0 unaffected");
    r.redist.write(sgi1 + registers::ICPENDR, W, 1 << 27);
    assert_eq!(r.cpus.get(1), (false, false));
    r.redist.write(sgi1 + registers::ISACTIVER, W, 1 << 27);
    assert_eq!(r.redist.read(sgi1 + registers::ICACTIVER, W), 1 << 27);
    assert_eq!(
        r.redist.read(sgi1 + registers::ICFGR, W),
        0xaaaa_aaaa,
        "SGIs are edge"
    );
    r.redist.write(sgi1 + registers::ICFGR, W, 0);
    assert_eq!(
        r.redist.read(sgi1 + registers::ICFGR, W),
        0xaaaa_aaaa,
        "and stay edge"
    );
}

#[test]
fn timer_ppi_wakes_only_its_cpu() {
    let r = rig(2);
    r.enable_like_linux(2);
    for cpu in 0..2u64 {
        let sgi = cpu * GicV3::REDIST_STRIDE + redistributor::SGI_FRAME;
        r.redist.write(sgi + registers::ISENABLER, W, 1 << 27);
    }
    r.gic.ppi(1, 27).set_level(true);
    assert_eq!(r.cpus.get(1), (true, false));
    assert_eq!(r.cpus.get(0), (false, false));
    assert_eq!(r.gic.read_sysreg(1, ICC_IAR1_EL1), Some(27));
}

#[test]
fn distributor_group_enable_gates_everything() {
    let r = rig(1);
    r.enable_like_linux(1);
    r.dist.write(registers::ISENABLER + 4, W, 1);
    r.dist.write(registers::ISPENDR + 4, W, 1);
    assert_eq!(r.cpus.get(0), (true, false));
    r.dist.write(distributor::CTLR, W, 0b01);
    assert_eq!(
        r.cpus.get(0),
        (false, false),
        "group 1 disabled in the distributor"
    );
}

#[test]
fn reset_clears_state_and_outputs() {
    let r = rig(1);
    r.enable_like_linux(1);
    r.dist.write(registers::ISENABLER + 4, W, 1);
    r.dist.write(registers::ISPENDR + 4, W, 1);
    r.gic.reset();
    assert_eq!(r.cpus.get(0), (false, false));
    assert_eq!(r.dist.read(registers::ISENABLER + 4, W), 0);
    assert_eq!(r.gic.read_sysreg(0, ICC_PMR_EL1), Some(0));
}

#[test]
fn out_of_range_wiring_is_harmless() {
    let r = rig(2);
    r.gic.spi(4000).set_level(true);
    r.gic.ppi(5, 27).set_level(true);
    r.gic.ppi(0, 40).set_level(true);
    assert_eq!(r.gic.read_sysreg(9, ICC_IAR1_EL1), None);
}

/// A hostile guest: every offset of both regions with every width and
/// pseudo-random values, interleaved with system-register writes. Nothing
/// may panic, and the GIC must still work afterwards.
#[test]
fn hostile_accesses_then_still_working() {
    let r = rig(3);
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let widths = [AccessWidth::Byte, AccessWidth::Half, W, D];
    for offset in (0..GicV3::DIST_SIZE).step_by(4) {
        let w = widths[(next() % 4) as usize];
        let o = offset & !(w.bytes() - 1);
        r.dist.write(o, w, next());
        r.dist.read(o, w);
    }
    for offset in (0..GicV3::REDIST_REGION_SIZE).step_by(4) {
        let w = widths[(next() % 4) as usize];
        let o = offset & !(w.bytes() - 1);
        r.redist.write(o, w, next());
        r.redist.read(o, w);
    }
    for _ in 0..20_000 {
        let reg = SysReg::new(3, 0, 12, (next() % 16) as u32, (next() % 8) as u32);
        let cpu = (next() % 4) as usize;
        if next() % 2 == 0 {
            r.gic.write_sysreg(cpu, reg, next());
        } else {
            r.gic.read_sysreg(cpu, reg);
        }
        r.gic.spi((next() % 300) as u32).set_level(next() % 2 == 0);
    }

    r.gic.reset();
    r.enable_like_linux(3);
    r.dist.write(registers::ISENABLER + 4, W, 1 << 3);
    r.gic.spi(3).set_level(true);
    assert_eq!(r.gic.read_sysreg(0, ICC_IAR1_EL1), Some(35));
}

// Message-based SPIs: the GICv2m frame and GICD_SETSPI_NSR/CLRSPI_NSR.

/// SPI 0x80 onwards, 128 of them: INTIDs 0xA0..0x120, as vmapple wires it.
fn message_rig(n: usize) -> (Rig, Arc<dyn MmioDevice>) {
    let r = rig(n);
    assert!(r.gic.enable_message_spis(0x80, 128));
    r.enable_like_linux(n);
    let frame = r.gic.v2m_frame();
    (r, frame)
}

/// Enables INTID `intid` (an SPI) edge-triggered, routed to `cpu`.
fn enable_edge_spi(r: &Rig, intid: u64, cpu: u64) {
    r.dist.write(distributor::IROUTER + 8 * intid, D, cpu);
    let cfg = registers::ICFGR + intid / 16 * 4;
    let old = r.dist.read(cfg, W);
    r.dist.write(cfg, W, old | 0b10 << (2 * (intid % 16)));
    r.dist
        .write(registers::ISENABLER + intid / 32 * 4, W, 1 << (intid % 32));
}

#[test]
fn the_v2m_frame_reports_its_spi_block_and_identity() {
    let (_r, frame) = message_rig(1);
    assert_eq!(frame.read(message::V2M_MSI_TYPER, W), 0x00a0_0080);
    // An `ldp w0, w1` or `ldp x0, x1` arrives as two loads of the pair.
    assert_eq!(frame.read(0x0, D), 0);
    assert_eq!(frame.read(0x8, D), 0x00a0_0080);
    assert_eq!(frame.read(0xa, AccessWidth::Half), 0x00a0, "any width");
    assert_eq!(frame.read(message::V2M_MSI_IIDR, W), 0x43b);
    assert_eq!(frame.read(0xff0, W), 0x0d, "CIDR0");
    assert_eq!(frame.read(0xffc, W), 0xb1, "CIDR3");
    assert_eq!(
        frame.read(message::V2M_MSI_SETSPI_NS, W),
        0,
        "doorbell is write-only"
    );
    assert_eq!(frame.read(0x1000, W), 0, "past the frame");
}

#[test]
fn without_message_spis_there_is_no_mbis_and_doorbells_do_nothing() {
    let r = rig(1);
    r.enable_like_linux(1);
    assert_eq!(
        r.dist.read(distributor::TYPER, W) & u64::from(message::TYPER_MBIS),
        0
    );
    enable_edge_spi(&r, 0xa0, 0);
    r.dist.write(message::GICD_SETSPI_NSR, W, 0xa0);
    r.gic.v2m_frame().write(message::V2M_MSI_SETSPI_NS, W, 0xa0);
    assert_eq!(r.cpus.get(0), (false, false));
    assert!(r.gic.message_intids().is_empty());
}

#[test]
fn a_v2m_doorbell_raises_its_spi_once() {
    let (r, frame) = message_rig(2);
    enable_edge_spi(&r, 0xa5, 1);
    frame.write(message::V2M_MSI_SETSPI_NS, W, 0xa5);
    assert_eq!(r.cpus.get(1), (true, false));
    assert_eq!(r.cpus.get(0), (false, false));
    assert_eq!(r.gic.read_sysreg(1, ICC_IAR1_EL1), Some(0xa5));
    assert!(r.gic.write_sysreg(1, ICC_EOIR1_EL1, 0xa5));
    assert_eq!(
        r.gic.read_sysreg(1, ICC_IAR1_EL1),
        Some(1023),
        "an edge: taken once"
    );
    // A 64-bit store covering the doorbell rings it with its low word.
    frame.write(message::V2M_MSI_SETSPI_NS, D, 0xffff_ffff_0000_00a5);
    assert_eq!(r.gic.read_sysreg(1, ICC_IAR1_EL1), Some(0xa5));
}

#[test]
fn every_message_spi_can_be_taken_through_both_doorbells() {
    let (r, frame) = message_rig(1);
    for intid in 0xa0..0x120u64 {
        enable_edge_spi(&r, intid, 0);
    }
    for (i, intid) in (0xa0..0x120u64).enumerate() {
        if i % 2 == 0 {
            frame.write(message::V2M_MSI_SETSPI_NS, W, intid);
        } else {
            r.dist.write(message::GICD_SETSPI_NSR, W, intid);
        }
        assert_eq!(r.gic.read_sysreg(0, ICC_IAR1_EL1), Some(intid));
        assert!(r.gic.write_sysreg(0, ICC_EOIR1_EL1, intid));
    }
    assert_eq!(r.gic.read_sysreg(0, ICC_IAR1_EL1), Some(1023));
}

#[test]
fn gicd_mbis_setspi_and_clrspi() {
    let (r, _frame) = message_rig(1);
    assert_ne!(
        r.dist.read(distributor::TYPER, W) & u64::from(message::TYPER_MBIS),
        0
    );
    enable_edge_spi(&r, 0x100, 0);
    r.dist.write(message::GICD_SETSPI_NSR, W, 0x100);
    assert_eq!(r.cpus.get(0), (true, false));
    r.dist.write(message::GICD_CLRSPI_NSR, W, 0x100);
    assert_eq!(r.cpus.get(0), (false, false), "cleared before it was taken");
    assert_eq!(r.dist.read(message::GICD_SETSPI_NSR, W), 0);
    // Bits above the INTID field are not part of it.
    r.dist
        .write(message::GICD_SETSPI_NSR, W, 0xffff_0000 | 0x100);
    assert_eq!(r.gic.read_sysreg(0, ICC_IAR1_EL1), Some(0x100));
}

#[test]
fn doorbells_outside_the_message_range_are_ignored() {
    let (r, frame) = message_rig(1);
    // The UART's SPI and a PCI INTx line: level SPIs a doorbell must not
    // reach, and INTIDs that do not exist.
    for intid in [33u64, 64, 0x9f] {
        r.dist
            .write(registers::ISENABLER + intid / 32 * 4, W, 1 << (intid % 32));
    }
    for intid in [0u32, 27, 33, 64, 0x9f, 0x120, 0x3ff, 1023, u32::MAX] {
        frame.write(message::V2M_MSI_SETSPI_NS, W, u64::from(intid));
        r.dist.write(message::GICD_SETSPI_NSR, W, u64::from(intid));
        r.gic.signal_message(intid);
    }
    assert_eq!(r.cpus.get(0), (false, false));
    assert_eq!(r.gic.read_sysreg(0, ICC_IAR1_EL1), Some(1023));
    // Stores to read-only registers and narrow stores change nothing.
    frame.write(message::V2M_MSI_TYPER, W, 0);
    frame.write(message::V2M_MSI_SETSPI_NS, B, 0xa0);
    frame.write(u64::MAX - 3, W, 0xa0);
    assert_eq!(frame.read(message::V2M_MSI_TYPER, W), 0x00a0_0080);
    assert_eq!(r.gic.read_sysreg(0, ICC_IAR1_EL1), Some(1023));
}

#[test]
fn message_spis_past_the_implemented_ones_are_refused_and_reset_keeps_them() {
    let r = rig(1);
    assert!(!r.gic.enable_message_spis(0x80, 129));
    assert!(!r.gic.enable_message_spis(u32::MAX, 1));
    assert!(!r.gic.enable_message_spis(0, 0));
    assert!(r.gic.message_intids().is_empty());
    assert!(r.gic.enable_message_spis(0x80, 128));
    r.gic.reset();
    assert_eq!(r.gic.message_intids(), 0xa0..0x120);
}

#[test]
fn a_restored_state_drives_the_outputs_and_keeps_active_priorities() {
    let cpus = Cpus::new(2);
    let gic = GicV3::new(2, 64, cpus.clone());
    // The guest's programming: SPI 3 enabled, group 1, pending; CPU 0's
    // interface on with a priority mask, and one interrupt active.
    let mut state = gic.save_state();
    state.enable_grp1 = true;
    state.spis[3].enabled = true;
    state.spis[3].group1 = true;
    state.spis[3].pending_latch = true;
    state.spis[3].priority = 0x40;
    state.cpus[0].icc.igrpen1 = true;
    state.cpus[0].icc.pmr = 0xf0;
    state.cpus[0].icc.apr[1] = 1 << 20;
    state.cpus[0].processor_sleep = false;
    let other = GicV3::new(2, 64, cpus.clone());
    other.restore_state(state.clone()).unwrap();
    assert_eq!(cpus.get(0), (true, false), "the pending SPI is signalled");
    assert_eq!(other.read_sysreg(0, ICC_AP1R0_EL1), Some(1 << 20));
    assert_eq!(other.save_state().spis[3].priority, 0x40);
    // Another shape of GIC is refused and changes nothing.
    let small = GicV3::new(1, 64, Cpus::new(1));
    assert!(small.restore_state(state).is_err());
    assert_eq!(small.save_state().cpus.len(), 1);
}

#[test]
fn restored_fields_go_through_the_register_masks() {
    let gic = GicV3::new(1, 32, Cpus::new(1));
    let mut state = gic.save_state();
    // Values no register write could produce (a damaged or crafted file).
    state.cpus[0].icc.bpr0 = 0xff;
    state.cpus[0].icc.bpr1 = 0xff;
    state.cpus[0].icc.pmr = 0xff;
    state.cpus[0].icc.apr[0] = u32::MAX;
    state.spis[0].priority = 0xff;
    state.routes[0] = u64::MAX;
    gic.restore_state(state).unwrap();
    // The interface computes with them without overflowing.
    for reg in [
        ICC_IAR1_EL1,
        ICC_HPPIR1_EL1,
        ICC_RPR_EL1,
        ICC_BPR0_EL1,
        ICC_BPR1_EL1,
    ] {
        let _ = gic.read_sysreg(0, reg);
    }
    let s = gic.save_state();
    assert!(s.cpus[0].icc.bpr0 <= 7 && s.cpus[0].icc.bpr1 <= 7);
    assert_eq!(s.cpus[0].icc.pmr & !state::PRIORITY_MASK, 0);
    assert_eq!(s.routes[0] & !state::IROUTER_MASK, 0);
}
