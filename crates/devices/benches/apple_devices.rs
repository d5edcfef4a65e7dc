//! Throughput of the Apple platform devices against what bounds them.
//!
//!   cargo bench -p devices --bench apple_devices
//!
//! * The backdoor block interface reading an image file into guest RAM,
//!   1 MiB per request as AVPBooter does for large reads, against `dd`
//!   reading the same (page-cached) file on the host.
//! * The AES engine doing AES-256-CBC DATA commands through its FIFO,
//!   against RustCrypto's `cbc` + `aes` on the same bytes (copy in, encrypt,
//!   copy out, as the engine's DMA does).
//!
//! Figures are printed, never checked: timing must not gate tests.

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aes::cipher::{BlockEncryptMut, KeyIvInit};
use block::DiskImage;
use devices::apple_aes::{self, AppleAes, FifoResetPolicy};
use devices::apple_bdif::{self, Bdif};
use vm_core::memory::{create_guest_memory, read_exact, write_all};
use vm_core::{AccessWidth, MmioDevice, TestIrq};

const RAM: u64 = 0x7000_0000;
const RAM_SIZE: usize = 64 << 20;
const IMAGE_SIZE: u64 = 512 << 20;
/// How long each measurement runs at least.
const MEASURE: Duration = Duration::from_secs(2);

fn rate(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / elapsed.as_secs_f64() / (1 << 20) as f64
}

/// Runs `step` (which moves `bytes_per_step` bytes) until [`MEASURE`] has
/// passed; returns MiB/s.
fn measure(bytes_per_step: u64, mut step: impl FnMut()) -> f64 {
    step(); // warm caches and page in buffers
    let start = Instant::now();
    let mut moved = 0;
    while start.elapsed() < MEASURE {
        step();
        moved += bytes_per_step;
    }
    rate(moved, start.elapsed())
}

fn make_image(path: &Path) {
    let mut file = std::fs::File::create(path).expect("create the bench image");
    let chunk: Vec<u8> = (0..1 << 20).map(|i| (i * 7 % 251) as u8).collect();
    for _ in 0..IMAGE_SIZE >> 20 {
        file.write_all(&chunk).expect("write the bench image");
    }
    file.sync_all().ok();
}

/// MiB/s of `dd` reading the whole image with 1 MiB blocks.
fn dd_rate(path: &Path) -> Option<f64> {
    let mut best: Option<f64> = None;
    for _ in 0..3 {
        let start = Instant::now();
        let status = Command::new("dd")
            .arg(format!("if={}", path.display()))
            .args(["of=/dev/null", "bs=1M"])
            .stderr(std::process::Stdio::null())
            .status()
            .ok()?;
        if !status.success() {
            return None;
        }
        let r = rate(IMAGE_SIZE, start.elapsed());
        best = Some(best.map_or(r, |b: f64| b.max(r)));
    }
    best
}

fn bdif_rate(path: &Path, request_len: u32) -> f64 {
    const DESC: u64 = RAM + 0x1000;
    const SECTOR: u64 = RAM + 0x2000;
    const RETVAL: u64 = RAM + 0x3000;
    const DATA: u64 = RAM + 0x10_0000;
    let mem = create_guest_memory(&[(RAM, RAM_SIZE)]).unwrap();
    let root: Arc<dyn block::BlockBackend> = Arc::new(DiskImage::open(path, true).unwrap());
    let aux: Arc<dyn block::BlockBackend> = Arc::new(block::MemoryDisk::new(vec![0; 512], true));
    let bdif = Bdif::new(mem.clone(), root, aux);

    let mut desc = [0u8; apple_bdif::desc::SIZE];
    desc[0x00..0x08].copy_from_slice(&SECTOR.to_le_bytes());
    desc[0x08..0x0C].copy_from_slice(&16u32.to_le_bytes());
    desc[0x10..0x18].copy_from_slice(&DATA.to_le_bytes());
    desc[0x18..0x1C].copy_from_slice(&request_len.to_le_bytes());
    desc[0x1C..0x20].copy_from_slice(&apple_bdif::op::READ.to_le_bytes());
    desc[0x20..0x28].copy_from_slice(&RETVAL.to_le_bytes());
    write_all(&mem, DESC, &desc).unwrap();

    let sectors_per_request = u64::from(request_len) / 512;
    let requests_per_image = IMAGE_SIZE / u64::from(request_len);
    let mut n = 0u64;
    let cmd = apple_bdif::devid::ROOT | apple_bdif::reg::CMD;
    measure(u64::from(request_len), || {
        let sector = (n % requests_per_image) * sectors_per_request;
        n += 1;
        let mut block = [0u8; 16];
        block[8..12].copy_from_slice(&(sector as u32).to_le_bytes());
        write_all(&mem, SECTOR, &block).unwrap();
        bdif.write(cmd, AccessWidth::Word, DESC);
        let mut status = [0xFFu8];
        read_exact(&mem, RETVAL, &mut status).unwrap();
        assert_eq!(status[0], apple_bdif::status::SUCCESS, "bdif read failed");
    })
}

fn aes_engine_rate(len: u32) -> f64 {
    const SRC: u64 = RAM + 0x10_0000;
    const DST: u64 = RAM + 0x200_0000;
    let mem = create_guest_memory(&[(RAM, RAM_SIZE)]).unwrap();
    let aes = AppleAes::new(
        mem.clone(),
        Arc::new(TestIrq::new()),
        FifoResetPolicy::default(),
    );
    let fifo = aes.window1();
    let push = |words: &[u32]| {
        for &w in words {
            fifo.write(apple_aes::reg::FIFO, AccessWidth::Word, u64::from(w));
        }
    };
    // Built-in key 1 (AES-256), CBC, encrypt; then an IV.
    push(&[
        0x1111_0000,
        0x2000_0000,
        0x0302_0100,
        0x0706_0504,
        0x0B0A_0908,
        0x0F0E_0D0C,
    ]);
    write_all(&mem, SRC, &vec![0x5A; len as usize]).unwrap();
    let rate = measure(u64::from(len), || {
        push(&[0x5000_0000 | len, 0, SRC as u32, DST as u32]);
    });
    let mut out = [0u8; 16];
    read_exact(&mem, DST, &mut out).unwrap();
    assert_ne!(out, [0x5A; 16], "the engine did not encrypt");
    rate
}

fn raw_aes_rate(len: u32) -> f64 {
    type Enc = cbc::Encryptor<aes::Aes256>;
    let mut key = [0u8; 32];
    key[0] = 1;
    let iv: [u8; 16] = core::array::from_fn(|i| i as u8);
    let src = vec![0x5Au8; len as usize];
    let mut dst = vec![0u8; len as usize];
    measure(u64::from(len), || {
        let mut buf = src.clone();
        Enc::new(&key.into(), &iv.into())
            .encrypt_padded_mut::<aes::cipher::block_padding::NoPadding>(&mut buf, len as usize)
            .unwrap();
        dst.copy_from_slice(&buf);
        std::hint::black_box(&dst);
    })
}

fn main() {
    // `cargo test --benches` runs this with --bench absent: stay quick then.
    if !std::env::args().any(|a| a == "--bench") {
        println!("apple_devices: run with `cargo bench -p devices --bench apple_devices`");
        return;
    }
    let dir = std::env::temp_dir().join(format!("vmapple-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let image = dir.join("image.raw");
    make_image(&image);

    println!(
        "{:44} {:>10} {:>10} {:>7}",
        "workload (MiB/s)", "device", "host", "ratio"
    );
    let dd = dd_rate(&image);
    for len in [64 << 10, 1 << 20] {
        let dev = bdif_rate(&image, len);
        match dd {
            Some(dd) => println!(
                "{:44} {dev:10.0} {dd:10.0} {:7.2}",
                format!("bdif read {} KiB/request vs dd bs=1M", len >> 10),
                dev / dd
            ),
            None => println!(
                "bdif read {} KiB/request: {dev:.0} (dd unavailable)",
                len >> 10
            ),
        }
    }
    for len in [4u32 << 10, 64 << 10, 1 << 20] {
        let dev = aes_engine_rate(len);
        let raw = raw_aes_rate(len);
        println!(
            "{:44} {dev:10.0} {raw:10.0} {:7.2}",
            format!("AES-256-CBC encrypt {} KiB DATA vs aes+cbc", len >> 10),
            dev / raw
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}
