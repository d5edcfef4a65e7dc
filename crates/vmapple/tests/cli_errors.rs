//! User mistakes get one clear message and a non-zero status, never a
//! backtrace, and nothing is created on disk.

mod common;

use std::time::Duration;

use common::vmapple;

const LIMIT: Duration = Duration::from_secs(30);

fn assert_user_error(args: &[&str], expected: &str) {
    let run = vmapple(args, LIMIT);
    assert_eq!(
        run.code, 1,
        "{args:?} should exit 1; stderr: {}",
        run.stderr
    );
    assert!(
        run.stderr.contains(expected),
        "{args:?}: expected {expected:?} in stderr, got {}",
        run.stderr
    );
    assert!(
        !run.stderr.contains("panicked"),
        "no panics: {}",
        run.stderr
    );
    assert!(
        !run.stderr.contains("RUST_BACKTRACE"),
        "no backtrace hints: {}",
        run.stderr
    );
}

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("cli-errors");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

#[test]
fn missing_firmware_file() {
    assert_user_error(
        &[
            "run",
            "--firmware",
            "/nonexistent/fw.bin",
            "--serial",
            "none",
        ],
        "cannot read firmware '/nonexistent/fw.bin'",
    );
}

#[test]
fn firmware_one_byte_too_large() {
    let path = scratch("big.bin");
    std::fs::write(&path, vec![0u8; (1 << 20) + 1]).unwrap();
    assert_user_error(
        &[
            "run",
            "--firmware",
            path.to_str().unwrap(),
            "--serial",
            "none",
        ],
        "is 1048577 bytes; at most 1048576 fit",
    );
}

#[test]
fn cpu_count_out_of_range() {
    let path = scratch("tiny.bin");
    std::fs::write(&path, [0u8; 4]).unwrap();
    for n in ["0", "33"] {
        assert_user_error(
            &[
                "run",
                "--firmware",
                path.to_str().unwrap(),
                "--cpus",
                n,
                "--serial",
                "none",
            ],
            "out of range: the vmapple machine has 1 to 32 CPUs",
        );
    }
}

#[test]
fn memory_out_of_range() {
    let path = scratch("tiny2.bin");
    std::fs::write(&path, [0u8; 4]).unwrap();
    assert_user_error(
        &[
            "run",
            "--firmware",
            path.to_str().unwrap(),
            "--memory",
            "1M",
            "--serial",
            "none",
        ],
        "--memory 1048576 is out of range",
    );
}

#[test]
fn kernel_that_is_not_an_image() {
    let path = scratch("not-a-kernel");
    std::fs::write(&path, b"hello, I am not a kernel").unwrap();
    assert_user_error(
        &[
            "run",
            "--kernel",
            path.to_str().unwrap(),
            "--serial",
            "none",
        ],
        "is not an arm64 Linux Image",
    );
}

#[test]
fn syntax_errors_exit_2() {
    for args in [
        &["run", "--firmware", "a", "--kernel", "b"][..],
        &["run", "--firmware", "a", "--memory", "12Q"],
        &["run", "--firmware", "a", "--serial", "telnet:1234"],
        &["run", "--firmware", "a", "--initrd", "x"],
    ] {
        let run = vmapple(args, LIMIT);
        assert_eq!(run.code, 2, "{args:?}: {}", run.stderr);
        assert!(!run.stderr.contains("panicked"));
    }
}

#[test]
fn msi_takes_only_on_or_off() {
    let run = vmapple(&["run", "--firmware", "a", "--msi", "maybe"], LIMIT);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(
        run.stderr
            .contains("\"maybe\" is not an MSI setting (use on or off)"),
        "{}",
        run.stderr
    );
}

#[test]
fn run_without_anything_to_boot() {
    // Not a syntax error: a bundle could have supplied what to boot.
    assert_user_error(&["run"], "nothing to boot");
}

#[test]
fn unknown_accelerator() {
    let path = scratch("tiny3.bin");
    std::fs::write(&path, [0u8; 4]).unwrap();
    assert_user_error(
        &[
            "run",
            "--firmware",
            path.to_str().unwrap(),
            "--accel",
            "kvm",
            "--serial",
            "none",
        ],
        "--accel kvm: not available",
    );
}

#[test]
fn bad_display_modes() {
    assert_user_error(
        &["run", "--display-modes", "1920x", "--serial", "none"],
        "vmapple: error: --display-modes \"1920x\": display mode 1 \"1920x\": the height is missing",
    );
    assert_user_error(
        &["run", "--display-modes", "1920x1080@60,1920x1080@60"],
        "repeats mode 1",
    );
}

#[cfg(not(target_os = "macos"))]
#[test]
fn macos_only_display_and_network_are_refused_elsewhere() {
    assert_user_error(
        &["run", "--display", "cocoa", "--serial", "none"],
        "--display cocoa needs a macOS host",
    );
    let path = scratch("tiny-vmnet.bin");
    std::fs::write(&path, [0u8; 4]).unwrap();
    assert_user_error(
        &[
            "run",
            "--firmware",
            path.to_str().unwrap(),
            "--net",
            "vmnet",
            "--serial",
            "none",
        ],
        "--net vmnet needs a macOS host",
    );
}

#[test]
fn causes_are_printed_on_one_line() {
    let path = scratch("tiny-chain.bin");
    std::fs::write(&path, [0u8; 4]).unwrap();
    let run = vmapple(
        &[
            "run",
            "--firmware",
            path.to_str().unwrap(),
            "--root",
            "/nonexistent/root.img",
            "--net",
            "none",
            "--serial",
            "none",
        ],
        LIMIT,
    );
    assert_eq!(run.code, 1, "{}", run.stderr);
    let line = run
        .stderr
        .lines()
        .find(|l| l.starts_with("vmapple: error: "))
        .unwrap_or_else(|| panic!("no error line: {}", run.stderr));
    // What failed, then why, from the machine down to the OS.
    assert!(
        line.starts_with("vmapple: error: --root: ")
            && line.contains("/nonexistent/root.img")
            && line.contains("No such file or directory"),
        "{line}"
    );
}

#[test]
fn vnc_needs_a_display_device_a_free_address_and_a_password_file() {
    let path = scratch("tiny-vnc.bin");
    std::fs::write(&path, [0u8; 4]).unwrap();
    let fw = path.to_str().unwrap();
    assert_user_error(
        &[
            "run",
            "--firmware",
            fw,
            "--gpu",
            "none",
            "--display",
            "vnc",
            "--serial",
            "none",
        ],
        "--gpu none leaves out the display device",
    );
    if !cfg!(all(target_os = "macos", target_arch = "aarch64")) {
        assert_user_error(
            &[
                "run",
                "--firmware",
                fw,
                "--display",
                "vnc",
                "--serial",
                "none",
                "--net",
                "none",
            ],
            "--display vnc: the machine has no display device",
        );
    }
    assert_user_error(
        &[
            "run",
            "--firmware",
            fw,
            "--gpu",
            "virtio",
            "--display",
            "vnc=127.0.0.1:0",
            "--vnc-password-file",
            "/nonexistent/pw",
            "--serial",
            "none",
        ],
        "/nonexistent/pw",
    );
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("vnc={}", taken.local_addr().unwrap());
    assert_user_error(
        &[
            "run",
            "--firmware",
            fw,
            "--gpu",
            "virtio",
            "--display",
            &addr,
            "--serial",
            "none",
            "--net",
            "none",
        ],
        "--display vnc: cannot listen on",
    );
    // One head (the default modes): there is no head 1 to serve.
    assert_user_error(
        &[
            "run",
            "--firmware",
            fw,
            "--gpu",
            "virtio",
            "--display",
            "vnc=127.0.0.1:0,head=1",
            "--serial",
            "none",
            "--net",
            "none",
        ],
        "--display vnc: the display has no head 1",
    );
}

#[test]
fn share_and_vsock_mistakes() {
    let fw = scratch("share-fw.bin");
    std::fs::write(&fw, [0u8; 16]).unwrap();
    let file = scratch("not-a-dir");
    std::fs::write(&file, "x").unwrap();
    let dir = scratch("a-dir");
    std::fs::create_dir_all(&dir).unwrap();
    let run = |extra: &[&str], expected: &str| {
        let mut args = vec![
            "run",
            "--firmware",
            fw.to_str().unwrap(),
            "--serial",
            "none",
            "--net",
            "none",
        ];
        args.extend_from_slice(extra);
        assert_user_error(&args, expected);
    };
    run(
        &["--share", "t:/nonexistent/dir"],
        "/nonexistent/dir: no such directory",
    );
    run(
        &["--share", &format!("t:{}", file.display())],
        "not-a-dir: not a directory",
    );
    let twice = [
        "--share".to_owned(),
        format!("t:{}", dir.display()),
        "--share".to_owned(),
        format!("t:{},readonly", dir.display()),
    ];
    let twice: Vec<&str> = twice.iter().map(String::as_str).collect();
    run(&twice, "share tag \"t\" is used twice");
    let sock = scratch("busy.sock");
    let _ = std::fs::remove_file(&sock);
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    run(
        &["--vsock", sock.to_str().unwrap()],
        "busy.sock: in use by another program",
    );
    run(
        &[
            "--vsock",
            scratch("cid.sock").to_str().unwrap(),
            "--vsock-cid",
            "2",
        ],
        "guest CID 2 is reserved",
    );
}
