//! virtio-gpu and the VNC server against Debian's kernel (virtio_gpu with
//! its fbdev emulation) and a real VNC client (vncdotool), on the
//! software CPU.
//!
//! The guest copies a known pattern from a disk to /dev/fb0; the test
//! reads it back through the control socket's screenshot (each head) and
//! through vncdotool, pixel for pixel; types keys and moves the pointer
//! with vncdotool and finds them in the guest's evdev; and has a client
//! speak garbage to the VNC server first, which must cost nothing but
//! that client.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{ctl, linux_guest_devices, vmapple_with_triggers, Action, Trigger};

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

/// Checks a PNG is the pattern, pixel for pixel.
fn assert_pattern(png_path: &Path, what: &str) {
    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(png_path).unwrap_or_else(|e| panic!("{what}: {e}")),
    ));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(
        (info.width as usize, info.height as usize),
        (W, H),
        "{what}: size"
    );
    let channels = match info.color_type {
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        other => panic!("{what}: colour type {other:?}"),
    };
    let mut wrong = 0;
    let mut first = None;
    for y in 0..H {
        for x in 0..W {
            let at = (y * W + x) * channels;
            let got = [buf[at], buf[at + 1], buf[at + 2]];
            if got != pattern(x, y) {
                wrong += 1;
                first.get_or_insert((x, y, got, pattern(x, y)));
            }
        }
    }
    assert_eq!(wrong, 0, "{what}: {wrong} pixels differ, first {first:?}");
}

fn vncdo(port: u16, args: &[&str]) {
    let out = Command::new("vncdo")
        .arg("-s")
        .arg(format!("127.0.0.1::{port}"))
        .args(args)
        .output()
        .expect("running vncdo (vncdotool from PyPI: pip install vncdotool)");
    assert!(
        out.status.success(),
        "vncdo {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A free TCP port on localhost.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A client that speaks garbage after the version, then one that asks for
/// a gigabyte of cut text: both must be cut off.
fn hostile_clients(port: u16) {
    for garbage in [
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        &b"RFB 003.008\n\x01\x01\x06\x00\x00\x00\x40\x00\x00\x00"[..],
    ] {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut version = [0u8; 12];
        s.read_exact(&mut version).unwrap();
        assert_eq!(&version, b"RFB 003.008\n");
        s.write_all(garbage).unwrap();
        let mut rest = Vec::new();
        // The server closes the connection (a reset counts too).
        let _ = s.read_to_end(&mut rest);
        assert!(rest.len() < 64, "no framebuffer for a hostile client");
    }
}

#[test]
fn virtio_gpu_framebuffer_and_input_through_vnc() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("display");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let Some((kernel, initrd)) = linux_guest_devices() else {
        return;
    };
    let disk = dir.join("pattern.img");
    pattern_disk(&disk);
    let socket = dir.join("control.sock");
    let port = free_port();
    let (s, d) = (socket.clone(), dir.clone());
    let run = vmapple_with_triggers(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
            "--append",
            "console=ttyAMA0 quiet vt.global_cursor_default=0 vmapple.usb=3 vmapple.fb=vda vmapple.powerkey",
            "--cpus",
            "2",
            "--memory",
            "512M",
            "--net",
            "none",
            "--disk",
            &format!("{},readonly", disk.display()),
            "--gpu",
            "virtio",
            "--display-modes",
            "1024x768@60;1024x768@60",
            "--display",
            &format!("vnc=127.0.0.1:{port}"),
            "--control",
            socket.to_str().unwrap(),
        ],
        Duration::from_secs(600),
        &[Trigger {
            when_console_shows: "waiting for the power button",
            action: Action::Call(Box::new(move || {
                hostile_clients(port);
                assert!(ctl(&s, &["status"]).contains("running"));
                for head in ["0", "1"] {
                    let png = d.join(format!("head{head}.png"));
                    ctl(&s, &["screenshot", png.to_str().unwrap(), "--head", head]);
                }
                let vnc_png = d.join("vnc.png");
                vncdo(port, &["capture", vnc_png.to_str().unwrap()]);
                vncdo(port, &["key", "a", "key", "shift-b"]);
                vncdo(port, &["move", "100", "200", "click", "1"]);
                // Let the guest print the events before it powers off.
                std::thread::sleep(Duration::from_secs(3));
                ctl(&s, &["powerdown"]);
            })),
        }],
    );
    assert_eq!(run.code, 0, "guest powered off; stderr:\n{}", run.stderr);
    run.assert_line("VMAPPLE-GUEST: fb 1024,768 stride 4096 bpp 32");
    run.assert_line("VMAPPLE-GUEST: fb drawn");
    let connected: Vec<&str> = run
        .stdout
        .lines()
        .filter(|l| l.contains("VMAPPLE-GUEST: drm card") && l.contains(" connected"))
        .collect();
    assert_eq!(connected.len(), 2, "two heads, two outputs: {connected:?}");
    assert!(run.stderr.contains("cut off"), "hostile clients logged");

    assert_pattern(&dir.join("head0.png"), "control socket, head 0");
    assert_pattern(&dir.join("head1.png"), "control socket, head 1");
    assert_pattern(&dir.join("vnc.png"), "vncdotool capture");

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
