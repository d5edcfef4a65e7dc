//! Which Metal device renders (apple-gfx.md §4.3), as a pure choice so it
//! is tested on every host.

/// What the picker needs to know about one GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GpuInfo {
    /// `hasUnifiedMemory`: Apple silicon, or an Intel iGPU.
    pub unified: bool,
    /// `isRemovable`: an eGPU, which may vanish under a running guest.
    pub removable: bool,
}

/// Index of the GPU to use in `MTLCopyAllDevices()` order, or `None` to
/// fall back to `MTLCreateSystemDefaultDevice()`.
///
/// The first unified-memory GPU wins (no copies between VRAM and system
/// memory); otherwise the last built-in one, as QEMU does; never an eGPU.
pub fn pick(gpus: &[GpuInfo]) -> Option<usize> {
    gpus.iter()
        .position(|g| g.unified)
        .or_else(|| gpus.iter().rposition(|g| !g.removable))
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn g(unified: bool, removable: bool) -> GpuInfo {
        GpuInfo { unified, removable }
    }

    #[test]
    fn choices() {
        assert_eq!(pick(&[]), None);
        assert_eq!(pick(&[g(true, false)]), Some(0));
        assert_eq!(pick(&[g(false, false), g(true, false)]), Some(1));
        assert_eq!(
            pick(&[g(false, false), g(false, false), g(false, true)]),
            Some(1)
        );
        assert_eq!(pick(&[g(false, true)]), None);
    }
}
