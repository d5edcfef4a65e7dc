//! virtio-gpu's state in a snapshot: each resource (format, size, guest
//! backing), what each scanout shows, and the pending events.
//!
//! A resource's host copy of its pixels is not written to the snapshot
//! (up to [`MAX_HOST_BYTES`] of it): a restore reads every resource again
//! from its guest backing, as a full TRANSFER_TO_HOST_2D at offset 0 (the
//! layout Linux's DRM driver gives its framebuffers), and shows each
//! scanout from it. A guest that changed its backing after its last
//! transfer shows the newer pixels; a resource without backing comes back
//! black. The cursor image comes back with the guest's next cursor
//! update.

use super::*;

/// A resource in a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedResource {
    pub id: u32,
    /// The wire format (virtio 1.2 §5.7.6.8).
    pub format: u32,
    pub width: u32,
    pub height: u32,
    /// `(guest address, length)` of each backing entry.
    pub backing: Vec<(u64, u32)>,
}

/// A scanout in a snapshot: the resource it shows (0 for none) and where.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedScanout {
    pub resource: u32,
    pub rect: (u32, u32, u32, u32),
}

/// The GPU's state in a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedGpu {
    pub events_read: u32,
    pub resources: Vec<SavedResource>,
    pub scanouts: Vec<SavedScanout>,
}

impl Format {
    /// A wire value that means this format.
    fn to_wire(self) -> u32 {
        match self {
            Format::Bgra => 1,
            Format::Argb => 3,
            Format::Rgba => 67,
            Format::Abgr => 68,
        }
    }
}

impl VirtioGpu {
    pub(crate) fn save(&self) -> SavedGpu {
        let mut resources: Vec<SavedResource> = self
            .gpu
            .resources
            .iter()
            .map(|(&id, r)| SavedResource {
                id,
                format: r.format.to_wire(),
                width: r.width,
                height: r.height,
                backing: r.backing.iter().map(|s| (s.addr, s.len)).collect(),
            })
            .collect();
        resources.sort_by_key(|r| r.id);
        SavedGpu {
            events_read: self.events_read,
            resources,
            scanouts: self
                .gpu
                .scanouts
                .iter()
                .map(|s| SavedScanout {
                    resource: s.resource,
                    rect: (s.rect.x, s.rect.y, s.rect.width, s.rect.height),
                })
                .collect(),
        }
    }

    /// Puts back `saved`, checked as the commands that built it were
    /// (ids, formats, sizes, the memory cap, backing in RAM, scanouts
    /// inside their resources); refused whole, changing nothing,
    /// otherwise. Pixels are read again from the backing in `mem`.
    pub(crate) fn restore(&mut self, mem: &GuestRam, saved: &SavedGpu) -> Result<(), String> {
        if saved.scanouts.len() != self.gpu.scanouts.len() {
            return Err(format!(
                "{} scanouts; this GPU has {}",
                saved.scanouts.len(),
                self.gpu.scanouts.len()
            ));
        }
        if saved.resources.len() > MAX_RESOURCES {
            return Err(format!("{} resources", saved.resources.len()));
        }
        let mut resources = HashMap::new();
        let mut host_bytes = 0u64;
        for s in &saved.resources {
            let format = Format::from_wire(s.format)
                .ok_or_else(|| format!("resource {}: format {}", s.id, s.format))?;
            if s.id == 0
                || resources.contains_key(&s.id)
                || s.width == 0
                || s.height == 0
                || s.width > MAX_SIDE
                || s.height > MAX_SIDE
                || s.backing.len() > MAX_BACKING_ENTRIES as usize
            {
                return Err(format!(
                    "resource {} of {}x{} with {} backing entries",
                    s.id,
                    s.width,
                    s.height,
                    s.backing.len()
                ));
            }
            host_bytes += Resource::bytes(s.width, s.height);
            if host_bytes > MAX_HOST_BYTES {
                return Err(format!("resources over {} MiB", MAX_HOST_BYTES >> 20));
            }
            if let Some((addr, len)) = s
                .backing
                .iter()
                .find(|(addr, len)| !range_is_ram(mem, *addr, u64::from(*len)))
            {
                return Err(format!(
                    "resource {}: backing {addr:#x}+{len:#x} is not RAM",
                    s.id
                ));
            }
            resources.insert(
                s.id,
                Resource {
                    format,
                    width: s.width,
                    height: s.height,
                    data: Vec::new(),
                    backing: s
                        .backing
                        .iter()
                        .map(|&(addr, len)| Segment { addr, len })
                        .collect(),
                },
            );
        }
        let mut scanouts = Vec::with_capacity(saved.scanouts.len());
        for (i, s) in saved.scanouts.iter().enumerate() {
            let (x, y, width, height) = s.rect;
            let rect = Rect::new(x, y, width, height);
            if s.resource != 0 {
                let inside = resources
                    .get(&s.resource)
                    .is_some_and(|r: &Resource| !rect.is_empty() && r.contains(&rect));
                if !inside {
                    return Err(format!("scanout {i}: {rect:?} of resource {}", s.resource));
                }
            }
            scanouts.push(Scanout {
                resource: s.resource,
                rect,
            });
        }

        // Checked: build the host copies and show them.
        self.clear();
        for r in resources.values_mut() {
            r.data = vec![0; Resource::bytes(r.width, r.height) as usize];
            if !r.backing.is_empty() {
                let mut data = std::mem::take(&mut r.data);
                // Short backing leaves the rest black.
                let _ = read_stream(mem, &r.backing, 0, &mut data);
                r.data = data;
            }
        }
        self.gpu.resources = resources;
        self.gpu.host_bytes = host_bytes;
        self.events_read = saved.events_read;
        for (i, s) in scanouts.into_iter().enumerate() {
            self.gpu.scanouts[i] = s;
            if s.resource == 0 {
                continue;
            }
            if let (Some(h), Some(r)) = (
                self.gpu.display.head(i),
                self.gpu.resources.get(&s.resource),
            ) {
                h.set_size(s.rect.width, s.rect.height);
                h.write(
                    Rect::new(0, 0, s.rect.width, s.rect.height),
                    &r.pixels(&s.rect),
                );
            }
        }
        Ok(())
    }
}
