//! What CPU 0 runs at power-on: Apple's boot ROM (or any firmware) at
//! 0x10_0000, or a Linux kernel booted directly with a generated device
//! tree (our addition: vmapple's own boot ROM uses no device tree).
//!
//! Images are read once at start-up and written into guest memory again on
//! every reset, so a guest that scribbles over its firmware or kernel gets
//! the original back (vmapple-machine.md §6.2, §6.7).

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use vm_core::memory::write_all;
use vm_core::GuestRam;

use crate::layout::{FIRMWARE_BASE, FIRMWARE_SIZE, RAM_BASE};

/// Errors in the user's boot files.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error(
        "no firmware specified: pass --firmware FILE (or --kernel FILE for a direct Linux boot)"
    )]
    NothingToBoot,
    #[error("cannot read {what} '{}': {source}", path.display())]
    Unreadable {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} '{}' is {size} bytes; at most {limit} fit", path.display())]
    TooLarge {
        what: &'static str,
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error("kernel '{}' is not an arm64 Linux Image: {reason}", path.display())]
    NotAnImage { path: PathBuf, reason: String },
    #[error("{0} MiB of RAM do not hold the kernel, initrd and device tree; give more --memory")]
    RamTooSmall(u64),
    #[error("the device tree could not be built")]
    DeviceTree(#[source] vm_fdt::Error),
    #[error("the device tree is {0} bytes, larger than its 2 MiB region")]
    DeviceTreeTooLarge(u64),
}

/// Reads a whole file, refusing anything larger than `limit` before
/// reading it.
fn read_bounded(what: &'static str, path: &Path, limit: u64) -> Result<Vec<u8>, BootError> {
    let unreadable = |source| BootError::Unreadable {
        what,
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(unreadable)?;
    let meta = file.metadata().map_err(unreadable)?;
    if !meta.is_file() {
        return Err(unreadable(std::io::Error::other("not a regular file")));
    }
    if meta.len() > limit {
        return Err(BootError::TooLarge {
            what,
            path: path.to_path_buf(),
            size: meta.len(),
            limit,
        });
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    // `take` bounds the read even if the file grows meanwhile.
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(unreadable)?;
    if bytes.len() as u64 > limit {
        return Err(BootError::TooLarge {
            what,
            path: path.to_path_buf(),
            size: bytes.len() as u64,
            limit,
        });
    }
    Ok(bytes)
}

/// The firmware image for the 1 MiB ROM region.
#[derive(Clone, Debug)]
pub struct Firmware {
    bytes: Vec<u8>,
}

impl Firmware {
    pub fn load(path: &Path) -> Result<Self, BootError> {
        Ok(Self {
            bytes: read_bounded("firmware", path, FIRMWARE_SIZE)?,
        })
    }

    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, BootError> {
        if bytes.len() as u64 > FIRMWARE_SIZE {
            return Err(BootError::TooLarge {
                what: "firmware",
                path: PathBuf::from("<memory>"),
                size: bytes.len() as u64,
                limit: FIRMWARE_SIZE,
            });
        }
        Ok(Self { bytes })
    }

    /// Fills the ROM region: the image, then zeros. QEMU re-copies only the
    /// image (whether it re-zeroes the rest is unconfirmed, §21); zeroing
    /// makes a reset look like power-on, which no firmware can object to.
    pub fn install(&self, memory: &GuestRam) {
        let mut region = vec![0u8; FIRMWARE_SIZE as usize];
        region[..self.bytes.len()].copy_from_slice(&self.bytes);
        write_all(memory, FIRMWARE_BASE, &region).expect("the firmware region is guest RAM");
    }
}

/// The fields of the arm64 Image header we use
/// (Linux Documentation/arch/arm64/booting.rst).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageHeader {
    pub text_offset: u64,
    /// Bytes the kernel occupies once running, BSS included.
    pub image_size: u64,
}

const IMAGE_MAGIC: u32 = 0x644d_5241; // "ARM\x64"

impl ImageHeader {
    pub fn parse(image: &[u8]) -> Result<Self, String> {
        let u64_at = |o: usize| u64::from_le_bytes(image[o..o + 8].try_into().expect("8 bytes"));
        if image.len() < 64 {
            return Err("shorter than the 64-byte Image header".into());
        }
        let magic = u32::from_le_bytes(image[0x38..0x3c].try_into().expect("4 bytes"));
        if magic != IMAGE_MAGIC {
            return Err(format!("bad magic {magic:#x} (a compressed vmlinuz? gzip is accepted, other formats are not)"));
        }
        let flags = u64_at(0x18);
        if flags & 1 != 0 {
            return Err("big-endian kernels are not supported".into());
        }
        let (text_offset, image_size) = match u64_at(0x10) {
            // Kernels before 3.17 leave image_size zero and expect 0x80000.
            0 => (0x80000, image.len() as u64),
            size => (u64_at(0x08), size),
        };
        if text_offset % 4096 != 0 || text_offset >= 1 << 30 {
            return Err(format!("implausible text_offset {text_offset:#x}"));
        }
        if image_size < image.len() as u64 {
            return Err("image_size is smaller than the file".into());
        }
        Ok(Self {
            text_offset,
            image_size,
        })
    }
}

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
const TWO_MIB: u64 = 2 << 20;

/// A kernel (and initramfs) to boot directly.
#[derive(Clone, Debug)]
pub struct LinuxImages {
    pub kernel: Vec<u8>,
    pub header: ImageHeader,
    pub initrd: Option<Vec<u8>>,
    pub cmdline: String,
}

/// Where [`LinuxImages::install`] put things.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinuxPlacement {
    pub entry: u64,
    pub dtb: u64,
    pub initrd: Option<(u64, u64)>,
}

impl LinuxImages {
    /// Reads the kernel (a raw Image, or one gzip-compressed as Debian
    /// ships it) and the initrd, none larger than RAM.
    pub fn load(
        kernel: &Path,
        initrd: Option<&Path>,
        cmdline: String,
        ram_size: u64,
    ) -> Result<Self, BootError> {
        let mut image = read_bounded("kernel", kernel, ram_size)?;
        if image.starts_with(&GZIP_MAGIC) {
            let mut raw = Vec::new();
            flate2::read::GzDecoder::new(image.as_slice())
                .take(ram_size + 1)
                .read_to_end(&mut raw)
                .map_err(|e| BootError::NotAnImage {
                    path: kernel.to_path_buf(),
                    reason: format!("gzip data is corrupt: {e}"),
                })?;
            if raw.len() as u64 > ram_size {
                return Err(BootError::TooLarge {
                    what: "decompressed kernel",
                    path: kernel.to_path_buf(),
                    size: raw.len() as u64,
                    limit: ram_size,
                });
            }
            image = raw;
        }
        let header = ImageHeader::parse(&image).map_err(|reason| BootError::NotAnImage {
            path: kernel.to_path_buf(),
            reason,
        })?;
        let initrd = initrd
            .map(|p| read_bounded("initrd", p, ram_size))
            .transpose()?;
        Ok(Self {
            kernel: image,
            header,
            initrd,
            cmdline,
        })
    }

    /// Plans the layout for `ram_size` bytes of RAM: the kernel at the
    /// 2 MiB-aligned start of RAM plus text_offset, the device tree in the
    /// last 2 MiB block (booting.rst: 8-byte aligned, at most 2 MiB, in a
    /// 2 MiB region of its own), the initrd just below it.
    pub fn plan(&self, ram_size: u64, dtb_size: u64) -> Result<LinuxPlacement, BootError> {
        let too_small = || BootError::RamTooSmall(ram_size >> 20);
        let entry = RAM_BASE + self.header.text_offset;
        let kernel_end = entry + self.header.image_size;
        let ram_end = RAM_BASE + ram_size;
        if dtb_size > TWO_MIB {
            return Err(BootError::DeviceTreeTooLarge(dtb_size));
        }
        let dtb = (ram_end - TWO_MIB.min(ram_end - RAM_BASE)) & !(TWO_MIB - 1);
        let initrd = match &self.initrd {
            None => None,
            Some(bytes) => {
                let start = dtb.checked_sub(bytes.len() as u64).ok_or_else(too_small)? & !0xfff;
                Some((start, start + bytes.len() as u64))
            }
        };
        let lowest_above_kernel = initrd.map_or(dtb, |(start, _)| start);
        if kernel_end > lowest_above_kernel || dtb < RAM_BASE {
            return Err(too_small());
        }
        Ok(LinuxPlacement { entry, dtb, initrd })
    }

    /// Writes kernel, initrd and `dtb` where `placement` says.
    pub fn install(&self, memory: &GuestRam, placement: &LinuxPlacement, dtb: &[u8]) {
        write_all(memory, placement.entry, &self.kernel).expect("planned inside RAM");
        if let (Some(bytes), Some((start, _))) = (&self.initrd, placement.initrd) {
            write_all(memory, start, bytes).expect("planned inside RAM");
        }
        write_all(memory, placement.dtb, dtb).expect("planned inside RAM");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(text_offset: u64, image_size: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        v[0x08..0x10].copy_from_slice(&text_offset.to_le_bytes());
        v[0x10..0x18].copy_from_slice(&image_size.to_le_bytes());
        v[0x38..0x3c].copy_from_slice(&IMAGE_MAGIC.to_le_bytes());
        v
    }

    #[test]
    fn header_parsing() {
        assert_eq!(
            ImageHeader::parse(&image(0, 0x100_0000, 4096)),
            Ok(ImageHeader {
                text_offset: 0,
                image_size: 0x100_0000
            })
        );
        assert_eq!(
            ImageHeader::parse(&image(0, 0, 4096)).unwrap().text_offset,
            0x80000
        );
        assert!(ImageHeader::parse(&[0u8; 10]).is_err());
        let mut bad = image(0, 0x1000, 4096);
        bad[0x38] = 0;
        assert!(ImageHeader::parse(&bad).is_err());
        assert!(ImageHeader::parse(&image(0x123, 0x10000, 4096)).is_err());
        assert!(ImageHeader::parse(&image(0, 0x10, 4096)).is_err());
    }

    #[test]
    fn placement_fits_or_says_why() {
        let kernel = image(0, 30 << 20, 4096);
        let images = LinuxImages {
            header: ImageHeader::parse(&kernel).unwrap(),
            kernel,
            initrd: Some(vec![1; 5 << 20]),
            cmdline: String::new(),
        };
        let p = images.plan(512 << 20, 4096).unwrap();
        assert_eq!(p.entry, RAM_BASE);
        assert_eq!(p.dtb, RAM_BASE + (510 << 20));
        let (start, end) = p.initrd.unwrap();
        assert!(end <= p.dtb && start >= RAM_BASE + (30 << 20));
        assert_eq!(start % 4096, 0);
        assert!(matches!(
            images.plan(32 << 20, 4096),
            Err(BootError::RamTooSmall(32))
        ));
    }

    #[test]
    fn oversized_files_are_refused_before_reading() {
        let dir = std::env::temp_dir().join(format!("vmapple-boot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("fw.bin");
        std::fs::write(&path, vec![0u8; FIRMWARE_SIZE as usize + 1]).unwrap();
        assert!(matches!(
            Firmware::load(&path),
            Err(BootError::TooLarge { .. })
        ));
        std::fs::write(&path, vec![0u8; FIRMWARE_SIZE as usize]).unwrap();
        assert!(
            Firmware::load(&path).is_ok(),
            "exactly 1 MiB is accepted (§20.1 vector 4)"
        );
        assert!(matches!(
            Firmware::load(&dir.join("missing")),
            Err(BootError::Unreadable { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
