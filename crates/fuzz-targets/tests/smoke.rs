//! The bounded fuzz pass every `cargo test` runs: each target gets its
//! hand-written seeds (which must reach deep device states), mutations of
//! them, and inputs from a fixed-seed PRNG. Long runs use `scripts/fuzz.sh`.

use std::time::Duration;

use fuzz_targets::input::RAM_SEED_LEN;
use fuzz_targets::{seeds, Report, Target, TARGETS};

/// Multiplies the per-target input counts. At 40 the whole pass takes
/// about 4 s in a debug build on two busy cores, far inside CI's budget.
const SCALE: usize = 40;

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

/// Small mutations of the kinds libFuzzer makes: byte flips, overwrites
/// with interesting values, truncation, duplication of a slice.
fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..1 + rng.below(8) {
        if v.is_empty() {
            v.push(rng.next() as u8);
            continue;
        }
        let at = rng.below(v.len());
        match rng.below(5) {
            0 => v[at] ^= 1 << rng.below(8),
            1 => v[at] = [0, 1, 0x7f, 0x80, 0xff][rng.below(5)],
            2 => v.truncate(at.max(1)),
            3 => {
                let len = rng.below(16).min(v.len() - at);
                let piece = v[at..at + len].to_vec();
                let to = rng.below(v.len());
                v.splice(to..to, piece);
            }
            _ => v[at] = rng.next() as u8,
        }
    }
    v
}

fn target(name: &str) -> Target {
    TARGETS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, f)| *f)
        .expect("known target")
}

/// Seeds' reports summed, after the random and mutated inputs ran clean.
fn smoke(name: &str, random: usize, mutations: usize) -> Report {
    let f = target(name);
    let seeds = seeds::for_target(name);
    assert!(!seeds.is_empty(), "{name} has seeds");
    let mut total = Report::default();
    for s in &seeds {
        let r = f(s);
        total.ops += r.ops;
        total.completions += r.completions;
        total.interrupts += r.interrupts;
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ name.len() as u64);
    // Inputs for targets with RAM start with the RAM seed page.
    let ram = seeds[0].len() > RAM_SEED_LEN;
    for _ in 0..random {
        let len = if ram {
            RAM_SEED_LEN + rng.below(1024)
        } else {
            rng.below(1024)
        };
        f(&rng.bytes(len));
    }
    for i in 0..mutations {
        f(&mutate(&mut rng, &seeds[i % seeds.len()]));
    }
    total
}

#[test]
fn aes() {
    let r = smoke("aes", 200 * SCALE, 300 * SCALE);
    assert!(r.completions >= 2, "both FLAG commands completed: {r:?}");
    assert!(r.interrupts >= 2, "{r:?}");
}

#[test]
fn bdif() {
    let r = smoke("bdif", 200 * SCALE, 300 * SCALE);
    assert!(r.completions >= 4, "READ requests reached the disks: {r:?}");
}

#[test]
fn cfg() {
    let r = smoke("cfg", 200 * SCALE, 300 * SCALE);
    assert_eq!(r.completions, 2, "built, installed and restored: {r:?}");
}

#[test]
fn pvpanic() {
    let r = smoke("pvpanic", 300 * SCALE, 300 * SCALE);
    assert_eq!(r.completions, 3, "{r:?}");
}

#[test]
fn pl031() {
    let r = smoke("pl031", 300 * SCALE, 300 * SCALE);
    assert!(r.interrupts >= 1, "the alarm fired: {r:?}");
}

#[test]
fn pl061() {
    let r = smoke("pl061", 300 * SCALE, 300 * SCALE);
    assert!(r.interrupts >= 2, "edge and level interrupts: {r:?}");
}

#[test]
fn pl011() {
    let r = smoke("pl011", 300 * SCALE, 300 * SCALE);
    assert_eq!(r.completions, 2, "\"ok\" transmitted: {r:?}");
    assert!(r.interrupts >= 1, "receive interrupt: {r:?}");
}

#[test]
fn virtio_blk() {
    let r = smoke("virtio_blk", 150 * SCALE, 250 * SCALE);
    assert!(r.completions >= 6, "requests completed and written: {r:?}");
    assert!(r.interrupts >= 2, "{r:?}");
}

#[test]
fn virtio_blk_apple() {
    let r = smoke("virtio_blk_apple", 150 * SCALE, 250 * SCALE);
    assert!(r.completions >= 6, "requests completed and written: {r:?}");
}

#[test]
fn virtio_net() {
    let smoke_report = smoke("virtio_net", 100 * SCALE, 150 * SCALE);
    assert!(
        smoke_report.completions >= 1,
        "frame transmitted: {smoke_report:?}"
    );
    // Receive runs on the device's thread: wait for the looped-back frame.
    let seed = &seeds::virtio_net()[0];
    let r = fuzz_targets::virtio::virtio_net_settled(seed, Duration::from_secs(10));
    assert!(
        r.completions >= 2,
        "the transmitted frame came back into the receive ring: {r:?}"
    );
}

#[test]
fn virtio_gpu() {
    let r = smoke("virtio_gpu", 150 * SCALE, 250 * SCALE);
    assert!(
        r.completions >= 2 * 13,
        "every seed command answered: {r:?}"
    );
    // The first seed shows its 16x16 B8G8R8X8 pixels on head 0, their
    // middle 8x8 on head 1, and the cursor resource on head 1.
    let seeds = seeds::for_target("virtio_gpu");
    let (report, display) = fuzz_targets::virtio::virtio_gpu_display(&seeds[0]);
    assert_eq!(report.completions, 11 + 2, "{report:?}");
    let bytes = |x: u32, y: u32| {
        let i = (y * 16 + x) * 4;
        let b = |k: u32| u32::from(((i + k) * 7 + 1) as u8);
        b(2) << 16 | b(1) << 8 | b(0)
    };
    let frame = display.heads()[0].snapshot().expect("head 0 shows a frame");
    assert_eq!((frame.width, frame.height), (16, 16));
    let want: Vec<u32> = (0..16 * 16).map(|i| bytes(i % 16, i / 16)).collect();
    let got: Vec<u32> = frame.pixels.iter().map(|p| p & 0xff_ffff).collect();
    assert_eq!(got, want);
    let frame = display.heads()[1].snapshot().expect("head 1 shows a frame");
    assert_eq!((frame.width, frame.height), (8, 8));
    assert_eq!(frame.pixels[0] & 0xff_ffff, bytes(4, 4));
    let cursor = display.heads()[1].cursor();
    let image = cursor.image.expect("head 1 has a cursor");
    assert_eq!(
        (image.width, image.height, image.hot_x, image.hot_y),
        (16, 16, 3, 4)
    );
    assert_eq!((cursor.x, cursor.y, cursor.visible), (9, 9, true));
    // The second seed unrefs the shown resource: both heads go dark.
    let (_, display) = fuzz_targets::virtio::virtio_gpu_display(&seeds[1]);
    assert!(display.heads()[0].snapshot().is_none());
}

#[test]
fn vnc_client() {
    use fuzz_targets::vnc::Event::*;
    let r = smoke("vnc_client", 500 * SCALE, 1000 * SCALE);
    assert_eq!(r.completions, 13 + 7, "every seed message read: {r:?}");
    let seeds = seeds::for_target("vnc_client");
    let (_, events) = fuzz_targets::vnc::vnc_client_events(&seeds[0]);
    let (a, shift) = (0x04, 0xe1);
    let at = |x: u32, y: u32| Pointer((x * 32767 / 1023) as u16, (y * 32767 / 767) as u16);
    assert_eq!(
        events,
        vec![
            Key(a, true),
            Key(a, false),
            Key(shift, true),
            Key(a, true),
            Key(shift, false),
            Key(a, false),
            at(100, 200),
            at(110, 210),
            Buttons(1),
            Pointer(32767, 32767),
            Buttons(0),
            Pointer(32767, 32767),
            Wheel(1),
        ]
    );
}

#[test]
fn xhci() {
    let r = smoke("xhci", 150 * SCALE, 250 * SCALE);
    assert!(
        r.completions >= 4,
        "three commands and a control transfer succeeded: {r:?}"
    );
    assert!(r.interrupts >= 1, "{r:?}");
}

#[test]
fn control_request() {
    let r = smoke("control_request", 500 * SCALE, 1000 * SCALE);
    assert_eq!(r.completions, 6, "every valid request parsed: {r:?}");
}

#[test]
fn snapshot() {
    let r = smoke("snapshot", 200 * SCALE, 400 * SCALE);
    assert!(r.completions >= 13, "every seed decodes: {r:?}");
}

#[test]
fn fuse_request() {
    let r = smoke("fuse_request", 100 * SCALE, 200 * SCALE);
    assert!(r.completions >= 18, "the seeds' requests succeeded: {r:?}");
}

#[test]
fn vsock_packet() {
    smoke("vsock_packet", 5 * SCALE, 10 * SCALE);
}

#[test]
fn every_target_has_seeds() {
    for (name, _) in TARGETS {
        assert!(!seeds::for_target(name).is_empty(), "{name}");
    }
}

#[test]
fn msix() {
    let r = smoke("msix", 200 * SCALE, 300 * SCALE);
    assert_eq!(r.completions, 4, "0xA5, 0xB0, 0xC0 and 0xD0 pending: {r:?}");
    assert_eq!(r.interrupts, 3, "three messages reached a doorbell: {r:?}");
}

#[test]
fn loadstore() {
    let r = smoke("loadstore", 200 * SCALE, 300 * SCALE);
    assert!(
        r.completions >= 21,
        "every seed encoding decodes and executes: {r:?}"
    );
}

#[test]
fn stage1() {
    let r = smoke("stage1", 200 * SCALE, 300 * SCALE);
    assert_eq!(
        r.completions, 5,
        "the 4 KiB walk's two addresses, the 16 KiB walk and both MMU-off addresses translate: {r:?}"
    );
}

#[test]
fn apple_dt() {
    let r = smoke("apple_dt", 200 * SCALE, 300 * SCALE);
    assert_eq!(r.completions, 8, "both seeds parse to 4 nodes each: {r:?}");
}
