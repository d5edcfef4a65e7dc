//! The Apple platform devices and the PrimeCell peripherals: MMIO access
//! sequences, plus host-side events (time passing, GPIO inputs, received
//! serial bytes, resets) as extras.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use block::MemoryDisk;
use devices::apple_aes::{self, AppleAes, FifoResetPolicy};
use devices::apple_bdif::{self, Bdif};
use devices::apple_cfg::{self, CfgParams};
use devices::clock::FakeClock;
use devices::pl011::{self, Pl011};
use devices::pl031::{self, Pl031};
use devices::pl061::{self, Pl061};
use devices::pvpanic::{PanicEvents, PvPanic};
use devices::serial::CaptureOutput;
use vm_core::{AccessWidth, MmioDevice, TestIrq};

use crate::doubles::WatchedDisk;
use crate::input::{self, Access, Input, RAM_BASE, RAM_SEED_LEN};
use crate::Report;

/// Fails unless the line is at the level the device's own status
/// registers say it must be at.
fn check_line(irq: &TestIrq, expected: bool, what: &str) {
    assert_eq!(
        irq.is_asserted(),
        expected,
        "{what}: interrupt line disagrees with the status registers"
    );
}

/// A guest write to RAM between accesses: the fuzzer changes what DMA
/// will find without having to guess a whole new RAM seed.
fn poke_ram(input: &mut Input, mem: &vm_core::GuestRam) {
    let at = u64::from(input.u16()) % RAM_SEED_LEN as u64;
    let len = usize::from(input.u8() % 32);
    let bytes = input.take(len);
    // RAM_SEED_LEN + 32 stays inside the fuzz RAM.
    vm_core::memory::write_all(mem, RAM_BASE + at, bytes).expect("poke inside RAM");
}

/// The AES engine, window 1 (registers and FIFO) with window 2 behind it.
pub fn aes(data: &[u8]) -> Report {
    let mut input = Input::new(data);
    let mem = input::guest_memory(&mut input);
    let irq = Arc::new(TestIrq::new());
    let policy = if input.u8() & 1 == 0 {
        FifoResetPolicy::QemuParity
    } else {
        FifoResetPolicy::ClearOnReset
    };
    let dev = AppleAes::new(mem.clone(), irq.clone(), policy);
    let w1 = dev.window1();
    let w2 = dev.window2();
    use apple_aes::reg::*;
    let regs = [
        STATUS, IRQ_STATUS, IRQ_ENABLE, WATERMARK, Q_STATUS, FLAG_INFO, FIFO, FIFO, FIFO, FIFO,
    ];
    let mut report = Report::default();
    let mut flag_seen = false;
    report.ops = input::drive_with(
        &mut input,
        w1.as_ref(),
        apple_aes::WINDOW_SIZE,
        &regs,
        |input| match input.u8() % 4 {
            0 => dev.reset(),
            1 => poke_ram(input, &mem),
            _ => {
                // Window 2 is inert: reads 0, writes ignored.
                let offset = u64::from(input.u16()) % apple_aes::WINDOW_SIZE;
                w2.write(offset, AccessWidth::Word, u64::from(input.u32()));
                assert_eq!(w2.read(offset, AccessWidth::Word), 0, "window 2 reads 0");
            }
        },
        |access, value| {
            if let (Access::Read { offset, width }, Some(v)) = (access, value) {
                if offset == STATUS && width == AccessWidth::Word {
                    assert_eq!(v, u64::from(apple_aes::reset_value::STATUS), "STATUS (Q6)");
                }
            }
            let status = w1.read(IRQ_STATUS, AccessWidth::Word) as u32;
            let enable = w1.read(IRQ_ENABLE, AccessWidth::Word) as u32;
            check_line(&irq, status & enable != 0, "apple-aes");
            let flag = status & apple_aes::irq::FLAG != 0;
            if flag && !flag_seen {
                report.completions += 1;
            }
            flag_seen = flag;
        },
    );
    report.interrupts = irq.rising_edges();
    report
}

/// Size of each fuzz disk: small, and not a multiple of the sector size
/// half of the time so the tail is exercised.
fn disk_image(input: &mut Input, salt: u8) -> Vec<u8> {
    let len = 16 * 1024 + usize::from(input.u8() % 2) * 300;
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13) ^ ((i >> 9) as u8) ^ salt)
        .collect()
}

/// The backdoor block interface, ROOT and AUX windows on two small disks.
pub fn bdif(data: &[u8]) -> Report {
    let mut input = Input::new(data);
    let mem = input::guest_memory(&mut input);
    let root_image = disk_image(&mut input, 0x5a);
    let aux_image = disk_image(&mut input, 0xa5);
    let root = Arc::new(WatchedDisk::new(MemoryDisk::new(root_image.clone(), false)));
    let aux = Arc::new(WatchedDisk::new(MemoryDisk::new(aux_image.clone(), false)));
    let dev = Bdif::new(mem.clone(), root.clone(), aux.clone());
    use apple_bdif::{devid, reg};
    let regs: Vec<u64> = [devid::ROOT, devid::AUX, devid::USB]
        .iter()
        .flat_map(|w| {
            [
                reg::STATUS,
                reg::CFG,
                reg::BUSY,
                reg::CMD,
                reg::CMD,
                reg::NEXT_DEVICE,
            ]
            .map(|r| w | r)
        })
        .collect();
    let mut report = Report {
        ops: input::drive_with(
            &mut input,
            &dev,
            apple_bdif::SIZE,
            &regs,
            |input| poke_ram(input, &mem),
            |_, _| {},
        ),
        ..Report::default()
    };
    // Q8: the interface never writes an image, whatever the guest asks.
    for (disk, image) in [(&root, &root_image), (&aux, &aux_image)] {
        assert_eq!(disk.writes(), 0, "bdif wrote to a disk");
        assert_eq!(&disk.contents(), image, "bdif changed a disk image");
        report.completions += disk.reads();
    }
    report
}

/// The cfg region: the structure is built from guest-influenced-looking
/// properties (what a bundle's config could hold), installed, scribbled on
/// by the guest, and must come back intact on reset.
pub fn cfg(data: &[u8]) -> Report {
    let mut input = Input::new(data);
    let mem = input::guest_memory(&mut input);
    let text = |input: &mut Input| -> String {
        let len = usize::from(input.u8() % 40);
        String::from_utf8_lossy(input.take(len)).into_owned()
    };
    let mac = |input: &mut Input| -> [u8; 6] {
        let mut m = [0u8; 6];
        let raw = input.take(6);
        m[..raw.len()].copy_from_slice(raw);
        m
    };
    let params = CfgParams {
        nr_cpus: u32::from(input.u8()),
        ecid: input.u64(),
        ram_size: input.u64(),
        run_installer1: input.u32(),
        run_installer2: input.u32(),
        rnd: input.u32(),
        mac_en0: mac(&mut input),
        mac_en1: mac(&mut input),
        mac_wifi0: mac(&mut input),
        mac_bt0: mac(&mut input),
        serial: text(&mut input),
        model: text(&mut input),
        soc_name: text(&mut input),
    };
    let mut report = Report::default();
    // MAC strings from the command line go through the same parser.
    let mac_text = text(&mut input);
    if let Ok(m) = mac_text.parse::<vm_config::MacAddress>() {
        assert_eq!(m.to_string().parse(), Ok(m), "MAC round trip");
    }
    let image = match params.build() {
        Ok(image) => image,
        Err(_) => return report,
    };
    assert_eq!(image.len(), apple_cfg::STRUCT_SIZE);
    let base = RAM_BASE + 0x1_0000;
    let size = apple_cfg::REGION_SIZE;
    apple_cfg::install(&mem, base, size, &image).expect("window is RAM");
    report.completions += 1;
    while !input.is_empty() && report.ops < input::MAX_ACCESSES as u64 {
        report.ops += 1;
        let at = u64::from(input.u16()) % size;
        let len = usize::from(input.u8() % 64).min((size - at) as usize);
        let bytes = input.take(len);
        vm_core::memory::write_all(&mem, base + at, bytes).expect("inside the window");
        if input.u8() % 8 == 0 {
            apple_cfg::install(&mem, base, size, &image).expect("window is RAM");
            let mut back = vec![0u8; size as usize];
            vm_core::memory::read_exact(&mem, base, &mut back).expect("window is RAM");
            assert_eq!(
                back[..image.len()],
                image[..],
                "reset restores the structure"
            );
            assert!(
                back[image.len()..].iter().all(|&b| b == 0),
                "reset zeroes the rest"
            );
            report.completions += 1;
        }
    }
    report
}

#[derive(Default)]
struct PanicCount(AtomicU64);

impl PanicEvents for PanicCount {
    fn guest_panicked(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    fn guest_crash_loaded(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    fn guest_shutdown(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// pvpanic-mmio: every access, and exactly one event per written byte
/// that carries a known event bit.
pub fn pvpanic(data: &[u8]) -> Report {
    let mut input = Input::new(data);
    let advertised = input.u8();
    let sink = Arc::new(PanicCount::default());
    let dev = PvPanic::with_events(sink.clone(), advertised);
    let mut report = Report::default();
    let mut expected = 0u64;
    report.ops = input::drive_with(
        &mut input,
        dev.as_ref(),
        // Past the 2-byte window too: the device must refuse those.
        16,
        &[0, 1],
        |_| {},
        |access, value| match (access, value) {
            (Access::Read { offset, width }, Some(v)) => {
                let want = (0..width.bytes())
                    .filter(|i| offset < PvPanic::SIZE && offset + i < PvPanic::SIZE)
                    .fold(0, |acc, i| acc | u64::from(advertised) << (8 * i));
                assert_eq!(v, want, "pvpanic read at {offset:#x}");
            }
            (
                Access::Write {
                    offset,
                    width,
                    value,
                },
                _,
            ) => {
                if offset < PvPanic::SIZE {
                    expected += (0..width.bytes())
                        .filter(|i| offset + i < PvPanic::SIZE)
                        .filter(|i| (value >> (8 * i)) as u8 & devices::pvpanic::event::ALL != 0)
                        .count() as u64;
                }
                assert_eq!(sink.0.load(Ordering::Relaxed), expected, "pvpanic events");
            }
            _ => {}
        },
    );
    report.completions = expected;
    report
}

/// The PL031 RTC on a fake clock the fuzzer moves.
pub fn pl031(data: &[u8]) -> Report {
    let mut input = Input::new(data);
    let clock = Arc::new(FakeClock::new(input.u64() >> 8));
    let irq = Arc::new(TestIrq::new());
    let dev = Pl031::new(irq.clone(), clock.clone());
    use pl031::reg::*;
    let regs = [DR, MR, LR, CR, IMSC, RIS, MIS, ICR, PERIPH_ID0, PCELL_ID3];
    let ops = input::drive_with(
        &mut input,
        dev.as_ref(),
        Pl031::SIZE,
        &regs,
        |input| match input.u8() % 4 {
            0 => dev.reset(),
            1 => clock.advance_ns(u64::from(input.u32()) * 1_000),
            2 => {
                // Straight to the deadline, as the timer thread would.
                if let Some(at) = dev.deadline() {
                    clock.set_ns(at);
                }
                dev.poll();
            }
            _ => dev.poll(),
        },
        |_, _| {
            let mis = dev.read(MIS, AccessWidth::Word);
            check_line(&irq, mis != 0, "pl031");
        },
    );
    Report {
        ops,
        interrupts: irq.rising_edges(),
        ..Report::default()
    }
}

/// The PL061 GPIO controller with the fuzzer driving its input pins.
pub fn pl061(data: &[u8]) -> Report {
    let mut input = Input::new(data);
    let irq = Arc::new(TestIrq::new());
    let dev = Pl061::new(irq.clone());
    use pl061::reg::*;
    let regs = [
        DATA, 0x3FC, DIR, IS, IBE, IEV, IE, RIS, MIS, IC, AFSEL, PERIPH_ID0,
    ];
    let ops = input::drive_with(
        &mut input,
        dev.as_ref(),
        Pl061::SIZE,
        &regs,
        |input| match input.u8() % 8 {
            0 => dev.reset(),
            // Lines 8+ do not exist; the device must ignore them.
            n => dev.set_input(input.u8() % 10, n & 1 == 1),
        },
        |_, _| {
            let mis = dev.read(MIS, AccessWidth::Word);
            check_line(&irq, mis != 0, "pl061");
        },
    );
    Report {
        ops,
        interrupts: irq.rising_edges(),
        ..Report::default()
    }
}

/// The PL011 UART with host input arriving between accesses.
pub fn pl011(data: &[u8]) -> Report {
    let mut input = Input::new(data);
    let irq = Arc::new(TestIrq::new());
    let out = CaptureOutput::new();
    let dev = Pl011::new(irq.clone(), Box::new(out.clone()));
    use pl011::reg::*;
    let regs = [
        DR, DR, RSR_ECR, FR, ILPR, IBRD, FBRD, LCR_H, CR, IFLS, IMSC, RIS, MIS, ICR, DMACR,
        PERIPH_ID0, PCELL_ID0,
    ];
    let ops = input::drive_with(
        &mut input,
        dev.as_ref(),
        Pl011::SIZE,
        &regs,
        |input| match input.u8() % 4 {
            0 => dev.reset(),
            _ => {
                let len = usize::from(input.u8() % 48);
                let bytes = input.take(len).to_vec();
                let space = dev.rx_space();
                let took = dev.receive(&bytes);
                assert!(took <= bytes.len() && took <= space, "pl011 took too much");
            }
        },
        |_, _| {
            let mis = dev.read(MIS, AccessWidth::Word);
            check_line(&irq, mis != 0, "pl011");
        },
    );
    Report {
        ops,
        completions: out.contents().len() as u64,
        interrupts: irq.rising_edges(),
    }
}
