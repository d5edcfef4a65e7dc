//! The GIC CPU interface through the `ICC_*_EL1` system registers
//! (IHI 0069 §12.2), as EL1 reaches it with no EL2 or EL3.
//!
//! Acknowledge (IAR) activates the highest-priority signalled interrupt and
//! raises the running priority; EOI drops it and, with EOImode 0, also
//! deactivates; with EOImode 1, DIR deactivates. SGIs are generated through
//! ICC_SGI0R/SGI1R/ASGI1R with affinity routing.

use arch_arm64::sysreg::*;
use arch_arm64::SysReg;
use vm_core::guest_error;

use crate::state::{Group, State, INTID_SPURIOUS, MIN_BPR0, PRIORITY_BITS, PRIORITY_MASK};

/// ICC_CTLR_EL1 fields.
const CTLR_CBPR: u64 = 1 << 0;
const CTLR_EOIMODE: u64 = 1 << 1;
const CTLR_PRIBITS_SHIFT: u32 = 8;
/// IDbits = 0: 16-bit INTIDs in the ICC registers.
const CTLR_A3V: u64 = 1 << 15;
/// ICC_SRE_EL1: SRE, DFB, DIB, all RAO/WI (system registers only).
const SRE_VALUE: u64 = 0b111;

/// Which CPUs a write affected beyond the caller (SGI targets).
pub type Targets = Vec<usize>;

fn intid_of(value: u64) -> u32 {
    (value & 0xff_ffff) as u32
}

/// Handles an MRS; `None` means UNDEFINED.
pub fn read(state: &mut State, cpu: usize, reg: SysReg) -> Option<u64> {
    let running = state.running_priority(cpu);
    let icc = state.cpus[cpu].icc;
    Some(match reg {
        ICC_PMR_EL1 => u64::from(icc.pmr),
        ICC_IAR0_EL1 => u64::from(acknowledge(state, cpu, Group::G0)),
        ICC_IAR1_EL1 => u64::from(acknowledge(state, cpu, Group::G1)),
        ICC_HPPIR0_EL1 => u64::from(highest_pending_of(state, cpu, Group::G0)),
        ICC_HPPIR1_EL1 => u64::from(highest_pending_of(state, cpu, Group::G1)),
        ICC_BPR0_EL1 => u64::from(icc.bpr0),
        ICC_BPR1_EL1 => u64::from(if icc.cbpr {
            // With CBPR set, reads of BPR1 return BPR0 + 1, saturated.
            (icc.bpr0 + 1).min(7)
        } else {
            icc.bpr1
        }),
        ICC_AP0R0_EL1 => u64::from(icc.apr[0]),
        ICC_AP1R0_EL1 => u64::from(icc.apr[1]),
        ICC_RPR_EL1 => u64::from(running),
        ICC_CTLR_EL1 => {
            let mut v = CTLR_A3V | (u64::from(PRIORITY_BITS - 1) << CTLR_PRIBITS_SHIFT);
            if icc.cbpr {
                v |= CTLR_CBPR;
            }
            if icc.eoi_mode {
                v |= CTLR_EOIMODE;
            }
            v
        }
        ICC_SRE_EL1 => SRE_VALUE,
        ICC_IGRPEN0_EL1 => u64::from(icc.igrpen0),
        ICC_IGRPEN1_EL1 => u64::from(icc.igrpen1),
        // Write-only registers, and AP0R1..3/AP1R1..3 which exist only
        // with six or more priority bits.
        _ => return None,
    })
}

/// Handles an MSR; `None` means UNDEFINED, otherwise the other CPUs whose
/// pending state changed.
pub fn write(state: &mut State, cpu: usize, reg: SysReg, value: u64) -> Option<Targets> {
    let icc = &mut state.cpus[cpu].icc;
    match reg {
        ICC_PMR_EL1 => icc.pmr = value as u8 & PRIORITY_MASK,
        ICC_BPR0_EL1 => icc.bpr0 = (value as u8 & 7).max(MIN_BPR0),
        ICC_BPR1_EL1 => {
            // Ignored while CBPR makes BPR0 govern group 1.
            if !icc.cbpr {
                icc.bpr1 = (value as u8 & 7).max(MIN_BPR0 + 1);
            }
        }
        ICC_AP0R0_EL1 => icc.apr[0] = value as u32,
        ICC_AP1R0_EL1 => icc.apr[1] = value as u32,
        ICC_CTLR_EL1 => {
            icc.cbpr = value & CTLR_CBPR != 0;
            icc.eoi_mode = value & CTLR_EOIMODE != 0;
        }
        ICC_SRE_EL1 => {}
        ICC_IGRPEN0_EL1 => icc.igrpen0 = value & 1 != 0,
        ICC_IGRPEN1_EL1 => icc.igrpen1 = value & 1 != 0,
        ICC_EOIR0_EL1 => end_of_interrupt(state, cpu, Group::G0, intid_of(value)),
        ICC_EOIR1_EL1 => end_of_interrupt(state, cpu, Group::G1, intid_of(value)),
        ICC_DIR_EL1 => deactivate_by_dir(state, cpu, intid_of(value)),
        ICC_SGI0R_EL1 => return Some(generate_sgi(state, cpu, value, Group::G0)),
        // With a single security state both generate group 1 SGIs.
        ICC_SGI1R_EL1 | ICC_ASGI1R_EL1 => return Some(generate_sgi(state, cpu, value, Group::G1)),
        _ => return None,
    }
    Some(Vec::new())
}

fn highest_pending_of(state: &State, cpu: usize, group: Group) -> u32 {
    match state.highest_pending(cpu) {
        Some(c) if c.group == group => c.intid,
        _ => INTID_SPURIOUS,
    }
}

/// ICC_IAR: take the signalled interrupt of `group`, if it is that group's.
fn acknowledge(state: &mut State, cpu: usize, group: Group) -> u32 {
    let Some(candidate) = state.signalled(cpu).filter(|c| c.group == group) else {
        return INTID_SPURIOUS;
    };
    let bit = candidate.priority >> (8 - PRIORITY_BITS);
    let icc = &mut state.cpus[cpu].icc;
    icc.apr[group as usize] |= 1 << bit;
    let irq = state
        .irq_mut(cpu, candidate.intid)
        .expect("the candidate exists");
    irq.pending_latch = false;
    irq.active = true;
    candidate.intid
}

fn end_of_interrupt(state: &mut State, cpu: usize, group: Group, intid: u32) {
    if intid >= state.num_irqs() {
        // 1020-1023 and out-of-range INTIDs: no effect.
        if intid < 1020 {
            guest_error!("gic: CPU {cpu} EOI of nonexistent INTID {intid}");
        }
        return;
    }
    // Priority drop applies to the running priority, which must belong to
    // the EOIR's group (IHI 0069 §4.1.1); otherwise the write is ignored.
    if state.running_group(cpu) != Some(group) {
        guest_error!("gic: CPU {cpu} EOI of INTID {intid} with no active group-{group:?} priority");
        return;
    }
    let icc = &mut state.cpus[cpu].icc;
    let apr = &mut icc.apr[group as usize];
    *apr &= *apr - 1;
    if !icc.eoi_mode {
        deactivate(state, cpu, intid);
    }
}

fn deactivate_by_dir(state: &mut State, cpu: usize, intid: u32) {
    if !state.cpus[cpu].icc.eoi_mode {
        guest_error!("gic: CPU {cpu} wrote ICC_DIR_EL1 with EOImode 0");
        return;
    }
    if intid < state.num_irqs() {
        deactivate(state, cpu, intid);
    }
}

fn deactivate(state: &mut State, cpu: usize, intid: u32) {
    match state.irq_mut(cpu, intid) {
        Some(irq) if irq.active => irq.active = false,
        _ => guest_error!("gic: CPU {cpu} deactivated INTID {intid}, which was not active"),
    }
}

/// ICC_SGI*R: TargetList[15:0], Aff1[23:16], INTID[27:24], Aff2[39:32],
/// IRM[40], RS[47:44], Aff3[55:48].
fn generate_sgi(state: &mut State, cpu: usize, value: u64, group: Group) -> Targets {
    let sgi = ((value >> 24) & 0xf) as u32;
    let all_but_self = value & (1 << 40) != 0;
    let target_list = value & 0xffff;
    let range_selector = (value >> 44) & 0xf;
    let upper =
        ((value >> 16) & 0xff) << 8 | ((value >> 32) & 0xff) << 16 | ((value >> 48) & 0xff) << 32;
    let mut targets = Vec::new();
    for target in 0..state.cpus.len() {
        let affinity = state.cpus[target].affinity;
        let chosen = if all_but_self {
            target != cpu
        } else {
            let aff0 = affinity & 0xff;
            affinity & !0xff == upper
                && aff0 >> 4 == range_selector
                && target_list & (1 << (aff0 & 0xf)) != 0
        };
        if !chosen {
            continue;
        }
        let irq = &mut state.cpus[target].private[sgi as usize];
        // An SGI is delivered only in the group it is configured for.
        if irq.group() == group {
            irq.pending_latch = true;
            targets.push(target);
        }
    }
    targets
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gic(cpus: usize) -> State {
        let mut s = State::new(cpus, 64);
        s.enable_grp0 = true;
        s.enable_grp1 = true;
        for c in 0..cpus {
            let icc = &mut s.cpus[c].icc;
            icc.pmr = 0xff;
            icc.igrpen0 = true;
            icc.igrpen1 = true;
        }
        s
    }

    fn pend_spi(s: &mut State, intid: u32, priority: u8, group1: bool) {
        let irq = s.irq_mut(0, intid).unwrap();
        irq.enabled = true;
        irq.priority = priority;
        irq.group1 = group1;
        irq.pending_latch = true;
    }

    #[test]
    fn acknowledge_eoi_and_running_priority() {
        let mut s = gic(1);
        pend_spi(&mut s, 40, 0x80, true);
        assert_eq!(s.outputs(0), (true, false));
        assert_eq!(read(&mut s, 0, ICC_HPPIR1_EL1), Some(40));
        assert_eq!(
            read(&mut s, 0, ICC_IAR0_EL1),
            Some(1023),
            "group 0 IAR sees no group 1 interrupt"
        );
        assert_eq!(read(&mut s, 0, ICC_IAR1_EL1), Some(40));
        assert_eq!(read(&mut s, 0, ICC_RPR_EL1), Some(0x80));
        assert_eq!(s.outputs(0), (false, false));
        assert_eq!(read(&mut s, 0, ICC_IAR1_EL1), Some(1023), "nothing left");
        write(&mut s, 0, ICC_EOIR1_EL1, 40).unwrap();
        assert_eq!(read(&mut s, 0, ICC_RPR_EL1), Some(0xff));
        assert!(!s.irq(0, 40).unwrap().active);
    }

    #[test]
    fn pmr_masks_and_preemption_follows_bpr() {
        let mut s = gic(1);
        s.cpus[0].icc.pmr = 0x40;
        pend_spi(&mut s, 40, 0x40, true);
        assert_eq!(
            s.outputs(0),
            (false, false),
            "priority must be strictly higher than PMR"
        );
        write(&mut s, 0, ICC_PMR_EL1, 0x48).unwrap();
        assert_eq!(read(&mut s, 0, ICC_IAR1_EL1), Some(40));
        // A second interrupt only 8 higher preempts with the minimum BPR1
        // (group priority [7:3]) but not with BPR1 = 7 (group priority
        // [7:7], where 0x38 and 0x40 are equal); with BPR1 = 6 ([7:6]) it
        // does again.
        pend_spi(&mut s, 41, 0x38, true);
        assert_eq!(s.outputs(0), (true, false));
        write(&mut s, 0, ICC_BPR1_EL1, 7).unwrap();
        assert_eq!(s.outputs(0), (false, false));
        write(&mut s, 0, ICC_BPR1_EL1, 6).unwrap();
        assert_eq!(read(&mut s, 0, ICC_IAR1_EL1), Some(41));
    }

    #[test]
    fn eoimode1_splits_drop_and_deactivate() {
        let mut s = gic(1);
        write(&mut s, 0, ICC_CTLR_EL1, CTLR_EOIMODE).unwrap();
        pend_spi(&mut s, 50, 0x20, true);
        assert_eq!(read(&mut s, 0, ICC_IAR1_EL1), Some(50));
        write(&mut s, 0, ICC_EOIR1_EL1, 50).unwrap();
        assert_eq!(read(&mut s, 0, ICC_RPR_EL1), Some(0xff), "priority dropped");
        assert!(s.irq(0, 50).unwrap().active, "still active until DIR");
        s.irq_mut(0, 50).unwrap().pending_latch = true;
        assert_eq!(
            read(&mut s, 0, ICC_IAR1_EL1),
            Some(1023),
            "active interrupts are not re-taken"
        );
        write(&mut s, 0, ICC_DIR_EL1, 50).unwrap();
        assert_eq!(read(&mut s, 0, ICC_IAR1_EL1), Some(50));
    }

    #[test]
    fn level_interrupt_stays_pending_while_the_line_is_high() {
        let mut s = gic(1);
        {
            let irq = s.irq_mut(0, 33).unwrap();
            irq.enabled = true;
            irq.group1 = true;
            irq.set_line(true);
        }
        assert_eq!(read(&mut s, 0, ICC_IAR1_EL1), Some(33));
        write(&mut s, 0, ICC_EOIR1_EL1, 33).unwrap();
        assert_eq!(read(&mut s, 0, ICC_IAR1_EL1), Some(33), "line still high");
        write(&mut s, 0, ICC_EOIR1_EL1, 33).unwrap();
        s.irq_mut(0, 33).unwrap().set_line(false);
        assert_eq!(read(&mut s, 0, ICC_IAR1_EL1), Some(1023));
    }

    #[test]
    fn sgis_by_target_list_range_and_irm() {
        let mut s = gic(20);
        for c in 0..20 {
            s.cpus[c].private[3].enabled = true;
            s.cpus[c].private[3].group1 = true;
        }
        // CPU 0 sends SGI 3 to Aff1=1, Aff0=1 (CPU 17): TargetList bit 1.
        let targets = write(&mut s, 0, ICC_SGI1R_EL1, (3 << 24) | (1 << 16) | 0b10).unwrap();
        assert_eq!(targets, vec![17]);
        assert_eq!(read(&mut s, 17, ICC_IAR1_EL1), Some(3));
        // IRM: everyone but the sender.
        let targets = write(&mut s, 5, ICC_SGI1R_EL1, (3 << 24) | (1 << 40)).unwrap();
        assert_eq!(targets.len(), 19);
        assert!(!targets.contains(&5));
        // SGI0R does not deliver an SGI configured as group 1.
        s.cpus[1].private[3].pending_latch = false;
        assert!(write(&mut s, 0, ICC_SGI0R_EL1, (3 << 24) | 0b10)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn group0_is_fiq_and_register_identity() {
        let mut s = gic(1);
        pend_spi(&mut s, 60, 0x00, false);
        assert_eq!(s.outputs(0), (false, true));
        assert_eq!(read(&mut s, 0, ICC_IAR0_EL1), Some(60));
        assert_eq!(read(&mut s, 0, ICC_SRE_EL1), Some(7));
        assert_eq!(
            read(&mut s, 0, ICC_CTLR_EL1).unwrap() >> 8 & 7,
            4,
            "PRIbits = 5 bits"
        );
        assert_eq!(
            read(&mut s, 0, ICC_AP0R1_EL1),
            None,
            "AP0R1 needs 6 priority bits"
        );
        assert_eq!(read(&mut s, 0, ICC_EOIR1_EL1), None, "write-only");
        assert_eq!(write(&mut s, 0, ICC_IAR1_EL1, 0), None, "read-only");
        write(&mut s, 0, ICC_BPR0_EL1, 0).unwrap();
        assert_eq!(
            read(&mut s, 0, ICC_BPR0_EL1),
            Some(MIN_BPR0 as u64),
            "clamped to the minimum"
        );
    }
}
