//! The `vmapple run` command line of a Linux guest, built once: the
//! kernel and initramfs, the kernel's command line, and whatever devices
//! and options a test adds.

use std::path::{Path, PathBuf};

/// `vmapple run --kernel K --initrd I --append WORDS` and what a test adds.
pub struct LinuxGuest {
    args: Vec<String>,
}

impl LinuxGuest {
    /// The guest of `files` (a kernel and an initramfs, as
    /// [`super::linux_guest`] and its siblings give them) with `append` on
    /// its kernel command line.
    pub fn new(files: &(PathBuf, PathBuf), append: &str) -> Self {
        Self { args: vec![] }.arg("run").guest(files, append)
    }

    /// The same, run as the bundle `name` (`vmapple run NAME --kernel
    /// ...`).
    pub fn bundle(name: &str, files: &(PathBuf, PathBuf), append: &str) -> Self {
        Self { args: vec![] }
            .args(["run", name])
            .guest(files, append)
    }

    fn guest(self, (kernel, initrd): &(PathBuf, PathBuf), append: &str) -> Self {
        self.args([
            "--kernel",
            path(kernel),
            "--initrd",
            path(initrd),
            "--append",
            append,
        ])
    }

    /// Two vCPUs and 512 MiB, the guest tests' usual machine.
    pub fn two_cpus(self) -> Self {
        self.args(["--cpus", "2", "--memory", "512M"])
    }

    /// Neither the XHCI nor a NIC.
    pub fn no_usb_no_net(self) -> Self {
        self.args(["--no-usb", "--net", "none"])
    }

    /// Served on the control socket `socket`.
    pub fn control(self, socket: &Path) -> Self {
        self.args(["--control", path(socket)])
    }

    pub fn arg(mut self, arg: impl AsRef<str>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    pub fn args<S: AsRef<str>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// The command line, to change further or to hand to several runs.
    pub fn build(self) -> Vec<String> {
        self.args
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 path")
}
