//! virtio-gpu and the VNC server against Debian's kernel (virtio_gpu with
//! its fbdev emulation) and a real VNC client (vncdotool), on each
//! accelerator.
//!
//! The guest copies a known pattern from a disk to /dev/fb0 and sets a
//! hardware cursor on head 1 through DRM; the VM serves each of its two heads on a
//! VNC server of its own (`--display vnc=...,head=N`), both with VNC
//! authentication (`--vnc-password-file`). The test reads the pattern back
//! through the control socket's screenshot and through vncdotool on each
//! head, pixel for pixel; sees a wrong password refused; has vncdotool
//! draw the guest's cursor from the Cursor pseudo-encoding (on head 1's
//! server, not on head 0's); types keys and
//! moves the pointer with vncdotool and finds them in the guest's evdev;
//! and has clients speak garbage to the VNC server first, which must cost
//! nothing but those clients.

#[macro_use]
mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{ctl, linux_guest_devices, refs, vmapple_with_triggers, Action, LinuxGuest, Trigger};

const PASSWORD: &str = "sesame";

const W: usize = 1024;
const H: usize = 768;

/// Linux's evdev codes.
const EV_KEY: u32 = 1;
const EV_ABS: u32 = 3;
const KEY_A: u32 = 30;
const KEY_LEFTSHIFT: u32 = 42;
const KEY_B: u32 = 48;
const BTN_LEFT: u32 = 272;
const ABS_X: u32 = 0;
const ABS_Y: u32 = 1;

/// The pattern: every pixel distinct enough that a shifted row, a swapped
/// channel or a lost update shows.
fn pattern(x: usize, y: usize) -> [u8; 3] {
    [
        ((x * 7 + y * 3) & 0xff) as u8,
        ((x ^ y) & 0xff) as u8,
        ((x + 2 * y) & 0xff) as u8,
    ]
}

/// The pattern as the framebuffer holds it: XRGB8888, little-endian.
fn pattern_disk(path: &Path) {
    let mut bytes = Vec::with_capacity(W * H * 4);
    for y in 0..H {
        for x in 0..W {
            let [r, g, b] = pattern(x, y);
            bytes.extend_from_slice(&[b, g, r, 0]);
        }
    }
    std::fs::write(path, bytes).unwrap();
}

/// The guest's cursor (guest/linux/drmcursor.c): 64x64 `0xAARRGGBB`,
/// hot spot (5, 7).
fn cursor_pixel(x: usize, y: usize) -> u32 {
    let alpha = if (x + y) % 3 == 0 { 0 } else { 0xff };
    (alpha << 24 | (x * 4) << 16 | (y * 4) << 8 | (0xa0 ^ x)) as u32
}
const CURSOR_SIDE: usize = 64;
const CURSOR_HOT: (usize, usize) = (5, 7);

/// Checks a PNG is the pattern, pixel for pixel.
fn assert_pattern(png_path: &Path, what: &str) {
    assert_pattern_under(png_path, what, (W, H), |_, _| None);
}

/// Checks a PNG is the pattern, pixel for pixel, except where `over`
/// gives another colour.
fn assert_pattern_under(
    png_path: &Path,
    what: &str,
    (w, h): (usize, usize),
    over: impl Fn(usize, usize) -> Option<[u8; 3]>,
) {
    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(png_path).unwrap_or_else(|e| panic!("{what}: {e}")),
    ));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(
        (info.width as usize, info.height as usize),
        (w, h),
        "{what}: size"
    );
    let channels = match info.color_type {
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        other => panic!("{what}: colour type {other:?}"),
    };
    let mut wrong = 0;
    let mut first = None;
    for y in 0..h {
        for x in 0..w {
            let at = (y * w + x) * channels;
            let got = [buf[at], buf[at + 1], buf[at + 2]];
            let want = over(x, y).unwrap_or(pattern(x, y));
            if got != want {
                wrong += 1;
                first.get_or_insert((x, y, got, want));
            }
        }
    }
    assert_eq!(wrong, 0, "{what}: {wrong} pixels differ, first {first:?}");
}

/// Runs vncdo against `port` with `password`: whether it succeeded, and
/// what it printed.
fn try_vncdo(port: u16, password: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new("vncdo")
        .arg("-s")
        .arg(format!("127.0.0.1::{port}"))
        .args(["-p", password, "-t", "120"])
        .args(args)
        .output()
        .expect("running vncdo (vncdotool from PyPI: pip install vncdotool)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn vncdo(port: u16, args: &[&str]) {
    let (ok, text) = try_vncdo(port, PASSWORD, args);
    assert!(ok, "vncdo {args:?}: {text}");
}

/// A free TCP port on localhost.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A client that speaks garbage after the version, then one that logs in
/// and asks for a gigabyte of cut text: both must be cut off.
fn hostile_clients(port: u16) {
    let read = |s: &mut TcpStream, n: usize| {
        let mut b = vec![0u8; n];
        s.read_exact(&mut b).unwrap();
        b
    };
    for logged_in in [false, true] {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        assert_eq!(read(&mut s, 12), b"RFB 003.008\n");
        if logged_in {
            s.write_all(b"RFB 003.008\n").unwrap();
            assert_eq!(read(&mut s, 2), [1, 2], "VNC authentication only");
            s.write_all(&[2]).unwrap();
            let challenge: [u8; 16] = read(&mut s, 16).try_into().unwrap();
            s.write_all(&vnc::vnc_auth_response(PASSWORD.as_bytes(), &challenge))
                .unwrap();
            assert_eq!(read(&mut s, 4), [0, 0, 0, 0], "logged in");
            s.write_all(&[1]).unwrap();
            let init = read(&mut s, 24);
            read(
                &mut s,
                u32::from_be_bytes(init[20..24].try_into().unwrap()) as usize,
            );
            s.write_all(b"\x06\x00\x00\x00\x40\x00\x00\x00").unwrap();
        } else {
            s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        }
        let mut rest = Vec::new();
        // The server closes the connection (a reset counts too).
        let _ = s.read_to_end(&mut rest);
        assert!(rest.len() < 64, "no framebuffer for a hostile client");
    }
}

each_accel! {
fn virtio_gpu_framebuffer_and_input_through_vnc(accel) {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("display-{accel}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let Some(files) = linux_guest_devices() else {
        return;
    };
    let disk = dir.join("pattern.img");
    pattern_disk(&disk);
    let password_file = dir.join("vnc-password");
    std::fs::write(&password_file, format!("{PASSWORD}\n")).unwrap();
    let socket = dir.join("control.sock");
    let ports = [free_port(), free_port()];
    let (s, d) = (socket.clone(), dir.clone());
    let args = LinuxGuest::new(
        &files,
        "console=ttyAMA0 quiet vt.global_cursor_default=0 vmapple.usb=3 vmapple.fb=vda vmapple.cursor=1 vmapple.powerkey",
    )
    .args(["--accel", accel])
    .two_cpus()
    .args([
        "--net",
        "none",
        "--disk",
        &format!("{},readonly", disk.display()),
        "--gpu",
        "virtio",
        "--display-modes",
        "1024x768@60;1024x768@60",
        "--display",
        &format!("vnc=127.0.0.1:{}", ports[0]),
        "--display",
        &format!("vnc=127.0.0.1:{},head=1", ports[1]),
        "--vnc-password-file",
        password_file.to_str().unwrap(),
    ])
    .control(&socket)
    .build();
    let run = vmapple_with_triggers(
        &refs(&args),
        Duration::from_secs(600),
        &[Trigger {
            when_console_shows: "waiting for the power button",
            action: Action::Call(Box::new(move || {
                let refused = d.join("refused.png");
                let (ok, text) = try_vncdo(ports[0], "wrong", &["capture", refused.to_str().unwrap()]);
                assert!(!ok, "a wrong password is refused: {text}");
                assert!(text.contains("authentication failed"), "{text}");
                assert!(!refused.exists(), "nothing captured");
                hostile_clients(ports[0]);
                assert!(ctl(&s, &["status"]).contains("running"));
                for head in ["0", "1"] {
                    let png = d.join(format!("head{head}.png"));
                    ctl(&s, &["screenshot", png.to_str().unwrap(), "--head", head]);
                }
                for (head, port) in ports.iter().enumerate() {
                    let png = d.join(format!("vnc{head}.png"));
                    vncdo(*port, &["capture", png.to_str().unwrap()]);
                }
                // vncdotool draws the cursor the server sends where its
                // own pointer is, less the hot spot. The guest set one on
                // head 1 only.
                for (head, port) in ports.iter().enumerate() {
                    let png = d.join(format!("cursor{head}.png"));
                    vncdo(
                        *port,
                        &["--localcursor", "move", "300", "200", "capture", png.to_str().unwrap()],
                    );
                }
                vncdo(ports[0], &["key", "a", "key", "shift-b"]);
                vncdo(ports[0], &["move", "100", "200", "click", "1"]);
                // Let the guest print the events before it powers off.
                std::thread::sleep(Duration::from_secs(3));
                ctl(&s, &["powerdown"]);
            })),
        }],
    );
    assert_eq!(run.code, 0, "guest powered off; stderr:\n{}", run.stderr);
    run.assert_line("VMAPPLE-GUEST: fb 1024,768 stride 4096 bpp 32");
    run.assert_line("VMAPPLE-GUEST: fb drawn");
    run.assert_line("VMAPPLE-GUEST: cursor set");
    let connected: Vec<&str> = run
        .stdout
        .lines()
        .filter(|l| l.contains("VMAPPLE-GUEST: drm card") && l.contains(" connected"))
        .collect();
    assert_eq!(connected.len(), 2, "two heads, two outputs: {connected:?}");
    assert!(run.stderr.contains("cut off"), "hostile clients logged");
    assert!(run.stderr.contains("wrong password"), "the refusal logged");

    assert_pattern(&dir.join("head0.png"), "control socket, head 0");
    assert_pattern(&dir.join("head1.png"), "control socket, head 1");
    assert_pattern(&dir.join("vnc0.png"), "vncdotool capture, head 0");
    assert_pattern(&dir.join("vnc1.png"), "vncdotool capture, head 1");
    let (cx, cy) = (300 - CURSOR_HOT.0, 200 - CURSOR_HOT.1);
    assert_pattern(&dir.join("cursor0.png"), "vncdotool, head 0 without a cursor");
    assert_pattern_under(&dir.join("cursor1.png"), "vncdotool, head 1 with its cursor", (W, H), |x, y| {
        let (dx, dy) = (x.checked_sub(cx)?, y.checked_sub(cy)?);
        if dx >= CURSOR_SIDE || dy >= CURSOR_SIDE {
            return None;
        }
        let p = cursor_pixel(dx, dy);
        (p >> 24 != 0).then_some([(p >> 16) as u8, (p >> 8) as u8, p as u8])
    });

    let events: Vec<(String, u32, u32, i64)> = run
        .stdout
        .lines()
        .filter_map(|l| l.trim().strip_prefix("VMAPPLE-GUEST: event "))
        .filter_map(|l| {
            let f: Vec<&str> = l.rsplitn(4, ' ').collect();
            Some((
                f.get(3)?.to_string(),
                f[2].parse().ok()?,
                f[1].parse().ok()?,
                f[0].parse().ok()?,
            ))
        })
        .collect();
    let keyboard: Vec<(u32, i64)> = events
        .iter()
        .filter(|e| e.0.ends_with("USB Keyboard") && e.1 == EV_KEY)
        .map(|e| (e.2, e.3))
        .collect();
    assert_eq!(
        keyboard,
        vec![
            (KEY_A, 1),
            (KEY_A, 0),
            (KEY_LEFTSHIFT, 1),
            (KEY_B, 1),
            (KEY_B, 0),
            (KEY_LEFTSHIFT, 0),
        ],
        "{events:?}"
    );
    let tablet = |kind: u32, code: u32| {
        events
            .iter()
            .filter(|e| e.0.ends_with("USB Tablet") && e.1 == kind && e.2 == code)
            .map(|e| e.3)
            .collect::<Vec<_>>()
    };
    // Pixel 100 of 1024 and 200 of 768 on the tablet's 0..32767 scale.
    assert_eq!(
        tablet(EV_ABS, ABS_X).last(),
        Some(&(100 * 32767 / 1023)),
        "{events:?}"
    );
    assert_eq!(
        tablet(EV_ABS, ABS_Y).last(),
        Some(&(200 * 32767 / 767)),
        "{events:?}"
    );
    assert_eq!(tablet(EV_KEY, BTN_LEFT), vec![1, 0], "{events:?}");
}
}
