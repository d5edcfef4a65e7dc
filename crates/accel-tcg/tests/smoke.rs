//! Runs a few hand-assembled AArch64 instructions on the software CPU and
//! checks what the VMM side observes: whole 64-bit MMIO, trapped system
//! registers, a guest-handled undefined instruction, WFI woken by the
//! emulated virtual timer, and PSCI SYSTEM_OFF over HVC.
//!
//! The firmware and Linux tests exercise far more; this one pins the
//! backend's contract without the machine.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use accel::{
    AccessWidth, CpuId, ExitHandler, ExitResponse, StopReason, VcpuConfig, VcpuExit, Vm, VmControl,
};
use accel_tcg::{TcgConfig, TcgVm};
use arch_arm64::psci::{self, PsciAction, PsciPlatform};
use arch_arm64::timer::{Counter, COUNTER_HZ};
use vm_core::memory::{create_guest_memory, write_all};
use vm_core::IrqLine;

const CODE: u64 = 0x1000;
const VECTORS: u64 = 0x2000;
const MMIO: u64 = 0x1000_0000;

/// Encodings from `aarch64-linux-gnu-as`.
const PROGRAM: &[u32] = &[
    0xd284_0000, // mov  x0, #0x2000
    0xd518_c000, // msr  vbar_el1, x0
    0xd503_3fdf, // isb
    0xd2a2_0001, // mov  x1, #0x10000000
    0xd28a_cf02, // mov  x2, #0x5678
    0xf2e2_4682, // movk x2, #0x1234, lsl #48
    0xf900_0022, // str  x2, [x1]
    0xf940_0423, // ldr  x3, [x1, #8]
    0xd538_00a4, // mrs  x4, mpidr_el1
    0xd538_0405, // mrs  x5, id_aa64pfr0_el1
    0xd280_0066, // mov  x6, #3
    0xd51b_e306, // msr  cntv_tval_el0, x6
    0xd280_0026, // mov  x6, #1
    0xd51b_e326, // msr  cntv_ctl_el0, x6
    0xd503_3fdf, // isb
    0xd503_207f, // wfi
    0xd53b_e32a, // mrs  x10, cntv_ctl_el0
    0x0000_0000, // udf  #0
    0x5280_0100, // mov  w0, #8
    0x72b0_8000, // movk w0, #0x8400, lsl #16  (PSCI SYSTEM_OFF)
    0xd400_0002, // hvc  #0
    0x1400_0000, // b    .
];

/// Synchronous exception, current EL with SPx (VBAR + 0x200): record
/// ESR/ELR in x8/x9 and skip the faulting instruction.
const SYNC_HANDLER: &[u32] = &[
    0xd538_5208, // mrs  x8, esr_el1
    0xd538_4029, // mrs  x9, elr_el1
    0x9100_1129, // add  x9, x9, #4
    0xd518_4029, // msr  elr_el1, x9
    0xd69f_03e0, // eret
];

#[derive(Default)]
struct Recorder {
    writes: Mutex<Vec<(u64, AccessWidth, u64)>>,
    reads: Mutex<Vec<(u64, AccessWidth)>>,
    control: Mutex<Option<Arc<VmControl>>>,
}

struct OneCpu;
impl PsciPlatform for OneCpu {
    fn cpu_count(&self) -> usize {
        1
    }
    fn cpu_on(&self, _: usize, _: u64, _: u64) -> Result<(), psci::PsciError> {
        Err(psci::PsciError::InvalidParameters)
    }
    fn cpu_state(&self, _: usize) -> psci::AffinityState {
        psci::AffinityState::On
    }
}

impl ExitHandler for Recorder {
    fn handle(&self, _cpu: CpuId, exit: VcpuExit) -> ExitResponse {
        match exit {
            VcpuExit::MmioWrite { addr, width, value } => {
                self.writes.lock().unwrap().push((addr, width, value));
                ExitResponse::Done
            }
            VcpuExit::MmioRead { addr, width } => {
                self.reads.lock().unwrap().push((addr, width));
                ExitResponse::Value(0xfeed_f00d_dead_beef)
            }
            VcpuExit::Hvc { args, .. } => match psci::dispatch(args, &OneCpu) {
                PsciAction::SystemOff => {
                    let control = self.control.lock().unwrap().clone().unwrap();
                    control.request_stop(StopReason::PowerOff);
                    ExitResponse::Done
                }
                PsciAction::Return(v) => ExitResponse::Value(v),
                other => panic!("unexpected PSCI action {other:?}"),
            },
            VcpuExit::SysRegRead { .. } | VcpuExit::SysRegWrite { .. } => ExitResponse::Undefined,
        }
    }
}

/// The timer's PPI wired straight to the vCPU's IRQ input, as a GIC with
/// only that interrupt enabled would.
struct TimerToIrq(Arc<VmControl>);
impl IrqLine for TimerToIrq {
    fn set_level(&self, asserted: bool) {
        self.0.set_interrupt_lines(0, asserted, false);
    }
}

/// A one-vCPU VM on `memory` whose timer drives the vCPU's IRQ line, with
/// its control block and a recording exit handler.
fn one_cpu_vm(memory: &vm_core::GuestRam) -> (TcgVm, Arc<VmControl>, Recorder) {
    let control = Arc::new(VmControl::new(1));
    let config = TcgConfig {
        cpus: vec![VcpuConfig {
            mpidr: 0x8000_0000,
            vtimer_irq: Arc::new(TimerToIrq(control.clone())),
            pointer_auth: false,
        }],
        counter: Arc::new(Counter::new(COUNTER_HZ)),
        time_slice: Duration::from_millis(2),
    };
    let vm = TcgVm::new(memory, config).unwrap();
    let handler = Recorder::default();
    *handler.control.lock().unwrap() = Some(control.clone());
    (vm, control, handler)
}

fn words(code: &[u32]) -> Vec<u8> {
    code.iter().flat_map(|w| w.to_le_bytes()).collect()
}

#[test]
fn runs_guest_code_through_the_accelerator_contract() {
    let memory = create_guest_memory(&[(0, 0x10000)]).unwrap();
    write_all(&memory, CODE, &words(PROGRAM)).unwrap();
    write_all(&memory, VECTORS + 0x200, &words(SYNC_HANDLER)).unwrap();

    let (mut vm, control, handler) = one_cpu_vm(&memory);

    control.reset_for_boot(CODE, 0);
    let reason = vm.run(&handler, &control).unwrap();
    assert_eq!(reason, StopReason::PowerOff);

    assert_eq!(
        *handler.writes.lock().unwrap(),
        [(MMIO, AccessWidth::Double, 0x1234_0000_0000_5678)],
        "one whole 64-bit store"
    );
    assert_eq!(
        *handler.reads.lock().unwrap(),
        [(MMIO + 8, AccessWidth::Double)]
    );

    let regs = vm.snapshot(0).expect("the only vCPU is loaded");
    assert_eq!(regs.x[3], 0xfeed_f00d_dead_beef, "MMIO load result");
    assert_eq!(regs.x[4], 0x8000_0000, "MPIDR from the vCPU config");
    assert_eq!((regs.x[5] >> 8) & 0xff, 0, "EL2/EL3 hidden");
    assert_eq!(
        (regs.x[5] >> 24) & 0xf,
        1,
        "GIC system registers advertised"
    );
    assert_eq!(
        regs.x[10] & 0b111,
        0b101,
        "ENABLE and ISTATUS after the WFI wake-up"
    );
    assert_eq!(
        regs.x[8] >> 26,
        0,
        "UDF taken by the guest with EC=0 (unknown)"
    );
    let udf = CODE + 4 * PROGRAM.iter().position(|&w| w == 0).unwrap() as u64;
    assert_eq!(regs.x[9], udf + 4, "ELR pointed at the UDF");
}

/// An outer loop of 2000 passes, each adding i to buffer[i] for i < 512
/// and then storing its pass number to MMIO.
const COUNTING: &[u32] = &[
    0xd280_0005, // mov  x5, #0
    0xd2a2_0006, // mov  x6, #0x10000000
    0xd280_0000, // outer: mov x0, #0
    0xd288_0001, // mov  x1, #0x4000
    0xd280_4002, // mov  x2, #512
    0xf860_7823, // inner: ldr x3, [x1, x0, lsl #3]
    0x8b00_0063, // add  x3, x3, x0
    0xf820_7823, // str  x3, [x1, x0, lsl #3]
    0x9100_0400, // add  x0, x0, #1
    0xeb02_001f, // cmp  x0, x2
    0x54ff_ff61, // b.ne inner
    0xf900_00c5, // str  x5, [x6]
    0x9100_04a5, // add  x5, x5, #1
    0xd280_fa07, // mov  x7, #2000
    0xeb07_00bf, // cmp  x5, x7
    0x54ff_fe61, // b.ne outer
    0x5280_0100, // mov  w0, #8
    0x72b0_8000, // movk w0, #0x8400, lsl #16
    0xd400_0002, // hvc  #0
    0x1400_0000, // b    .
];

/// Kicks from another thread, as the ticker and device threads send them,
/// must never make an instruction run twice or not at all: every MMIO
/// store arrives exactly once and in order, and memory holds the exact
/// sums.
#[test]
fn kicks_from_another_thread_lose_and_repeat_nothing() {
    let memory = create_guest_memory(&[(0, 0x10000)]).unwrap();
    write_all(&memory, CODE, &words(COUNTING)).unwrap();

    let (mut vm, control, handler) = one_cpu_vm(&memory);
    control.reset_for_boot(CODE, 0);

    let kicker_control = control.clone();
    let kicker = std::thread::spawn(move || {
        let mut kicks = 0u64;
        while !kicker_control.stop_requested() {
            kicker_control.kick_all();
            kicks += 1;
            std::thread::sleep(Duration::from_micros(20));
        }
        kicks
    });
    assert_eq!(vm.run(&handler, &control).unwrap(), StopReason::PowerOff);
    assert!(
        kicker.join().unwrap() > 10,
        "the run must actually have been kicked"
    );

    let writes = handler.writes.lock().unwrap();
    let passes: Vec<u64> = writes.iter().map(|w| w.2).collect();
    let expected: Vec<u64> = (0..2000).collect();
    if let Some(i) = passes.iter().zip(&expected).position(|(a, b)| a != b) {
        panic!(
            "MMIO store {i} carried {} instead of {}",
            passes[i], expected[i]
        );
    }
    assert_eq!(passes.len(), expected.len(), "MMIO store count");
    let mut buffer = vec![0u8; 512 * 8];
    vm_core::memory::read_exact(&memory, 0x4000, &mut buffer).unwrap();
    for (i, chunk) in buffer.chunks(8).enumerate() {
        let value = u64::from_le_bytes(chunk.try_into().unwrap());
        assert_eq!(value, 2000 * i as u64, "buffer[{i}]");
    }
}
