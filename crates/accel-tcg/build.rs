//! Builds Unicorn with vmapple's patch and links it into this crate.
//!
//! The repository holds only our patch, never Unicorn's sources. The
//! sources are the ones cargo downloaded from crates.io for the exact
//! `unicorn-engine-sys` version this crate depends on: we find them in
//! cargo's registry cache, copy them into `OUT_DIR`, apply `patches/*.patch`
//! (refusing to continue if a hunk does not apply), build the AArch64
//! target with CMake and link the result.
//!
//! `unicorn-engine-sys` itself would build stock Unicorn; the workspace's
//! `.cargo/config.toml` points its pkg-config probe at an empty placeholder
//! library (`unicorn-stub/`), so it only generates its Rust bindings.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Must equal the `unicorn-engine-sys` requirement in Cargo.toml: the
/// patch is written against exactly this release.
const UNICORN_VERSION: &str = "2.1.5";
const PATCHES: &[&str] = &[
    "patches/unicorn-2.1.5-arm64-sysemu.patch",
    "patches/unicorn-2.1.5-arm64-guest-fixes.patch",
    "patches/unicorn-2.1.5-arm64-mmio-fast-path.patch",
];

fn fail(message: &str) -> ! {
    eprintln!("\nerror: {message}\n");
    std::process::exit(1);
}

fn main() {
    for patch in PATCHES {
        println!("cargo:rerun-if-changed={patch}");
    }
    println!("cargo:rerun-if-changed=unicorn-stub");
    println!("cargo:rerun-if-env-changed=VMAPPLE_UNICORN_SRC");
    println!("cargo:rerun-if-env-changed=PKG_CONFIG_PATH");

    check_placeholder_in_use();

    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets it"));
    let pristine = locate_sources(&manifest_dir);

    let patches: Vec<(String, Vec<u8>)> = PATCHES
        .iter()
        .map(|p| {
            let path = manifest_dir.join(p);
            let bytes = fs::read(&path)
                .unwrap_or_else(|e| fail(&format!("cannot read {}: {e}", path.display())));
            (p.to_string(), bytes)
        })
        .collect();

    let src = out_dir.join("unicorn-src");
    let stamp = out_dir.join("unicorn-src.stamp");
    let wanted_stamp = stamp_contents(&pristine, &patches);
    if fs::read(&stamp).ok().as_deref() != Some(wanted_stamp.as_slice()) {
        if src.exists() {
            fs::remove_dir_all(&src)
                .unwrap_or_else(|e| fail(&format!("cannot clear {}: {e}", src.display())));
        }
        copy_tree(&pristine, &src)
            .unwrap_or_else(|e| fail(&format!("cannot copy Unicorn sources: {e}")));
        for (name, _) in &patches {
            apply_patch(&src, &manifest_dir.join(name));
        }
        fs::write(&stamp, &wanted_stamp)
            .unwrap_or_else(|e| fail(&format!("cannot write {}: {e}", stamp.display())));
    }

    // Always optimised: an unoptimised emulator is too slow to boot Linux
    // in the test suite.
    let dst = cmake::Config::new(&src)
        .profile("Release")
        .define("UNICORN_ARCH", "aarch64")
        .define("UNICORN_BUILD_TESTS", "OFF")
        .define("UNICORN_INSTALL", "ON")
        .define("UNICORN_LOGGING", "OFF")
        .build();

    let built = ["lib", "lib64"]
        .iter()
        .map(|d| dst.join(d).join("libunicorn.a"))
        .find(|p| p.exists())
        .unwrap_or_else(|| fail("the Unicorn build produced no libunicorn.a"));
    // A name of our own, so the archive cannot be mistaken for the
    // placeholder that unicorn-engine-sys links.
    let linked = out_dir.join("libvmapple_unicorn.a");
    fs::copy(&built, &linked)
        .unwrap_or_else(|e| fail(&format!("cannot copy {}: {e}", built.display())));

    println!("cargo:rustc-link-search=native={}", out_dir.display());
    println!("cargo:rustc-link-lib=static=vmapple_unicorn");
    println!("cargo:rustc-link-lib=dylib=pthread");
    println!("cargo:rustc-link-lib=dylib=m");
}

fn check_placeholder_in_use() {
    let path = env::var("PKG_CONFIG_PATH").unwrap_or_default();
    if !path.contains("unicorn-stub") {
        fail(
            "PKG_CONFIG_PATH does not point at crates/accel-tcg/unicorn-stub.\n\
             Build from inside the vmapple workspace, whose .cargo/config.toml sets it;\n\
             otherwise unicorn-engine-sys would build and link stock Unicorn beside ours.",
        );
    }
}

/// The directory cargo unpacked `unicorn-engine-sys` into: under
/// `$CARGO_HOME/registry/src/<index>/unicorn-engine-sys-<version>/`, which
/// exists before any build script runs because cargo downloads and unpacks
/// every package of the build first. `VMAPPLE_UNICORN_SRC` overrides this
/// (vendored or otherwise relocated sources).
fn locate_sources(_manifest_dir: &Path) -> PathBuf {
    let looks_right = |dir: &Path| dir.join("uc.c").exists() && dir.join("qemu").is_dir();
    if let Some(dir) = env::var_os("VMAPPLE_UNICORN_SRC") {
        let dir = PathBuf::from(dir);
        if !looks_right(&dir) {
            fail(&format!(
                "VMAPPLE_UNICORN_SRC={} does not hold Unicorn's sources (no uc.c)",
                dir.display()
            ));
        }
        return dir;
    }
    let cargo_home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| fail("neither CARGO_HOME nor HOME is set"));
    let registry = cargo_home.join("registry").join("src");
    let wanted = format!("unicorn-engine-sys-{UNICORN_VERSION}");
    let mut found: Vec<PathBuf> = fs::read_dir(&registry)
        .into_iter()
        .flatten()
        .flatten()
        .map(|index| index.path().join(&wanted))
        .filter(|dir| looks_right(dir))
        .collect();
    found.sort();
    match found.pop() {
        Some(dir) => {
            println!("cargo:rerun-if-changed={}", dir.join("uc.c").display());
            dir
        }
        None => fail(&format!(
            "cannot find {wanted} under {}; cargo should have unpacked it there \
             (set VMAPPLE_UNICORN_SRC to its directory if your sources live elsewhere)",
            registry.display()
        )),
    }
}

/// What the patched tree was made from; a change means rebuilding it.
fn stamp_contents(pristine: &Path, patches: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut stamp = format!("{}\n", pristine.display()).into_bytes();
    for (name, bytes) in patches {
        stamp.extend_from_slice(name.as_bytes());
        stamp.push(b'\n');
        stamp.extend_from_slice(bytes);
    }
    stamp
}

fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    fs::create_dir_all(to)?;
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        let kind = entry.file_type()?;
        if kind.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else if kind.is_file() {
            fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

fn apply_patch(tree: &Path, patch: &Path) {
    let run = |dry_run: bool| {
        let mut cmd = Command::new("patch");
        cmd.args(["-p1", "--forward", "--batch", "--silent", "-d"])
            .arg(tree)
            .arg("-i")
            .arg(patch);
        if dry_run {
            cmd.arg("--dry-run");
        }
        cmd.output().unwrap_or_else(|e| {
            fail(&format!(
                "cannot run `patch` ({e}); install it (Debian: apt-get install patch)"
            ))
        })
    };
    let check = run(true);
    if !check.status.success() {
        fail(&format!(
            "{} does not apply to unicorn-engine-sys {UNICORN_VERSION}:\n{}{}",
            patch.display(),
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        ));
    }
    let applied = run(false);
    if !applied.status.success() {
        fail(&format!(
            "applying {} failed:\n{}",
            patch.display(),
            String::from_utf8_lossy(&applied.stderr)
        ));
    }
}
