//! virtio-vsock proved against Debian's arm64 kernel and its
//! `vmw_vsock_virtio_transport` module, with guest/linux/vmapple-vsock.c:
//! echoes both ways, host-initiated (`CONNECT P` on the VM's socket) and
//! guest-initiated (to a host listener at `<socket>_P`), 64 MiB checked
//! end to end, 32 connections at once each way, and a connection to a
//! host port nobody serves refused.

#[macro_use]
mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{linux_guest_share, refs, vmapple_with_triggers, Action, LinuxGuest, Trigger};

const PORT: u32 = 5000;

fn pattern(i: u64, seed: u32) -> u8 {
    ((i.wrapping_mul(2654435761).wrapping_add(u64::from(seed))) >> 7) as u8
}

/// Connects to guest port `port` through the VM's socket; returns the
/// stream after `OK <host port>`.
fn connect(sock: &Path, port: u32) -> UnixStream {
    let s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
    (&s).write_all(format!("CONNECT {port}\n").as_bytes())
        .unwrap();
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while byte[0] != b'\n' {
        assert_eq!(
            (&s).read(&mut byte).unwrap(),
            1,
            "vmapple closed the socket before OK"
        );
        line.push(byte[0]);
    }
    let line = String::from_utf8(line).unwrap();
    assert!(
        line.starts_with("OK ") && line[3..].trim().parse::<u32>().is_ok(),
        "{line:?}"
    );
    s
}

/// Sends `bytes` of pattern `seed` to the guest's echo and checks what
/// comes back; returns the bytes received.
fn echo_through_guest(sock: &Path, bytes: u64, seed: u32) -> u64 {
    let s = connect(sock, PORT);
    let writer = {
        let s = s.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            let mut sent = 0u64;
            while sent < bytes {
                let n = (bytes - sent).min(buf.len() as u64) as usize;
                for (i, b) in buf[..n].iter_mut().enumerate() {
                    *b = pattern(sent + i as u64, seed);
                }
                (&s).write_all(&buf[..n]).unwrap();
                sent += n as u64;
            }
            s.shutdown(std::net::Shutdown::Write).unwrap();
        })
    };
    let mut got = 0u64;
    let mut buf = vec![0u8; 65536];
    loop {
        let n = (&s).read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        for (i, &b) in buf[..n].iter().enumerate() {
            assert_eq!(
                b,
                pattern(got + i as u64, seed),
                "byte {} of connection {seed}",
                got + i as u64
            );
        }
        got += n as u64;
    }
    writer.join().unwrap();
    got
}

/// The host's echo for guest connections to host port PORT+1.
fn serve_echo(listener: UnixListener) {
    std::thread::spawn(move || {
        for c in listener.incoming() {
            let Ok(mut c) = c else { break };
            std::thread::spawn(move || {
                let mut r = c.try_clone().unwrap();
                let _ = std::io::copy(&mut r, &mut c);
                let _ = c.shutdown(std::net::Shutdown::Write);
            });
        }
    });
}

each_accel! {
fn a_linux_guest_echoes_over_vsock_both_ways(accel) {
    let Some(files) = linux_guest_share() else { return };
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("vsock-{accel}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("v.sock");
    serve_echo(UnixListener::bind(format!("{}_{}", sock.display(), PORT + 1)).unwrap());

    let results = Arc::new(Mutex::new(None));
    let done = results.clone();
    let host_sock = sock.clone();
    let release_sock = sock.clone();
    let finished = results.clone();
    let triggers = [Trigger {
        when_console_shows: "VMAPPLE-GUEST: vsock listening",
        action: Action::Call(Box::new(move || {
            let sock = host_sock.clone();
            let done = done.clone();
            std::thread::spawn(move || {
                let big = echo_through_guest(&sock, 64 << 20, 1000);
                let many: Vec<_> = (0..32)
                    .map(|i| {
                        let sock = sock.clone();
                        std::thread::spawn(move || echo_through_guest(&sock, 256 << 10, i))
                    })
                    .collect();
                let many: Vec<u64> = many.into_iter().map(|t| t.join().unwrap()).collect();
                *done.lock().unwrap() = Some((big, many));
            });
        })),
    }, Trigger {
        // The guest's own part is done; once the host's is too, let the
        // guest finish.
        when_console_shows: "VMAPPLE-GUEST: vsock waiting",
        action: Action::Call(Box::new(move || {
            let sock = release_sock.clone();
            let finished = finished.clone();
            std::thread::spawn(move || {
                while finished.lock().unwrap().is_none() {
                    std::thread::sleep(Duration::from_millis(100));
                }
                drop(connect(&sock, PORT + 3));
            });
        })),
    }];
    let append = format!("console=ttyAMA0 quiet vmapple.vsock={PORT}");
    let args = LinuxGuest::new(&files, &append)
        .args(["--accel", accel])
        .two_cpus()
        .args(["--net", "none", "--vsock", sock.to_str().unwrap()])
        .build();
    let run = vmapple_with_triggers(
        &refs(&args),
        Duration::from_secs(900),
        &triggers,
    );
    assert_eq!(run.code, 0, "guest powered off; stderr:\n{}", run.stderr);
    let out = &run.stdout;
    // Host-initiated.
    let (big, many) = results.lock().unwrap().take().expect("the host's echoes finished");
    assert_eq!(big, 64 << 20);
    assert_eq!(many, vec![256 << 10; 32]);
    // Guest-initiated: the guest compares what it sent with the echo.
    let sent: Vec<&str> = out
        .lines()
        .filter_map(|l| l.trim().strip_prefix("VMAPPLE-GUEST: vsock sent "))
        .collect();
    assert_eq!(sent.len(), 33, "{out}");
    for line in &sent {
        let w: Vec<&str> = line.split(' ').collect();
        assert_eq!((w[1], w[2]), (w[4], w[5]), "{line}");
    }
    assert!(sent.iter().any(|l| l.starts_with("0 67108864 ")), "{out}");
    assert_eq!(out.matches("VMAPPLE-GUEST: vsock send done 0 failed").count(), 2, "{out}");
    run.assert_line("VMAPPLE-GUEST: vsock refused Connection reset by peer");
    run.assert_line("VMAPPLE-GUEST: vsock done");
    let _ = std::fs::remove_dir_all(&dir);
}
}
