//! [`PgDisplay`]: the framework's display, its handlers, and how frames
//! reach the screen.
//!
//! Frames reach the host through the core's CPU pipeline
//! ([`PgDisplay::render_frame`]): an offscreen BGRA8 texture, a
//! managed-storage sync on discrete GPUs, a wait for completion and
//! `getBytes`; the core writes the pixels into the display model, which
//! every front end (the Cocoa window included) reads. The cursor's glyph
//! and show/hide events go to the core the same way.

use std::ptr::NonNull;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use vm_core::sync::lock;

use apple_gfx::framework::{
    CursorGlyph, DisplayCallbacks, DisplayCoord, DisplayDescriptor, FrameworkError, PgDisplay,
};
use apple_gfx::DisplayMode;
use block2::RcBlock;
use objc2::rc::Retained;
use objc2::runtime::{AnyObject, Bool, ProtocolObject};
use objc2::{msg_send, sel};
use objc2_app_kit::NSBitmapImageRep;
use objc2_foundation::{NSArray, NSSize, NSString};
use objc2_metal::{
    MTLBlitCommandEncoder, MTLCommandBuffer, MTLCommandEncoder, MTLCommandQueue, MTLDevice,
    MTLOrigin, MTLPixelFormat, MTLRegion, MTLSize, MTLStorageMode, MTLTexture,
    MTLTextureDescriptor, MTLTextureUsage,
};

use crate::ffi::{class, responds, PgDisplayCoord};
use crate::framework::{FwShared, Shared};

/// Largest cursor image copied out of the framework (bytes). Cursor glyphs
/// are tiny; this only bounds what a confused guest driver can make us copy.
const MAX_GLYPH_BYTES: usize = 4 << 20;

/// One display of a device.
pub struct MacDisplay {
    pg: OnceLock<Shared<AnyObject>>,
    fw: Arc<FwShared>,
    callbacks: Arc<dyn DisplayCallbacks>,
    mode: Mutex<Option<(u16, u16)>>,
    port: u32,
    serial: u32,
}

fn whole(w: usize, h: usize) -> MTLRegion {
    MTLRegion {
        origin: MTLOrigin { x: 0, y: 0, z: 0 },
        size: MTLSize {
            width: w,
            height: h,
            depth: 1,
        },
    }
}

fn glyph_from(rep: &NSBitmapImageRep) -> Option<CursorGlyph> {
    let bpp = u32::try_from(rep.bitsPerPixel()).ok()?;
    let width = u32::try_from(rep.pixelsWide()).ok()?;
    let height = u32::try_from(rep.pixelsHigh()).ok()?;
    let stride = u32::try_from(rep.bytesPerRow()).ok()?;
    let len = (stride as usize).checked_mul(height as usize)?;
    if len > MAX_GLYPH_BYTES {
        return None;
    }
    let data = rep.bitmapData();
    if data.is_null() {
        return None;
    }
    // SAFETY: a meshed (non-planar) bitmap holds bytesPerRow × pixelsHigh
    // bytes at bitmapData, alive while `rep` is; we copy them out at once.
    let bytes = unsafe { std::slice::from_raw_parts(data, len) }.to_vec();
    Some(CursorGlyph {
        bits_per_pixel: bpp,
        width,
        height,
        bytes_per_row: stride,
        data: bytes,
    })
}

impl MacDisplay {
    /// Builds the display descriptor with handlers forwarding to the core
    /// and creates the display on `dev`.
    pub(crate) fn create(
        dev: &AnyObject,
        fw: &Arc<FwShared>,
        desc: DisplayDescriptor,
        port: u32,
        serial: u32,
    ) -> Result<Arc<Self>, FrameworkError> {
        let this = Arc::new(Self {
            pg: OnceLock::new(),
            fw: fw.clone(),
            callbacks: desc.callbacks.clone(),
            mode: Mutex::new(None),
            port,
            serial,
        });
        let cls = class(c"PGDisplayDescriptor")
            .ok_or(FrameworkError::Unsupported("PGDisplayDescriptor"))?;
        // SAFETY: `new` on an NSObject subclass.
        let d: Option<Retained<AnyObject>> = unsafe { msg_send![cls, new] };
        let d = d.ok_or(FrameworkError::CreationFailed("display descriptor"))?;
        let name = NSString::from_str(&desc.name);
        let size = NSSize::new(f64::from(desc.size_mm.0), f64::from(desc.size_mm.1));
        // Handlers hold the display weakly: the framework keeps the
        // descriptor (and so the blocks) as long as the display lives.
        let w = Arc::downgrade(&this);
        let mode = RcBlock::new(move |size: PgDisplayCoord, format: u32| {
            if let Some(me) = w.upgrade() {
                me.on_mode(size, format);
            }
        });
        let w = Arc::downgrade(&this);
        let frame = RcBlock::new(move || {
            if let Some(me) = w.upgrade() {
                me.on_new_frame();
            }
        });
        let w = Arc::downgrade(&this);
        let glyph = RcBlock::new(move |rep: *mut NSBitmapImageRep, hot: PgDisplayCoord| {
            let Some(me) = w.upgrade() else { return };
            // SAFETY: the framework passes a live image for the call.
            let rep = unsafe { rep.as_ref() };
            let glyph = rep.and_then(glyph_from).unwrap_or(CursorGlyph {
                bits_per_pixel: 0,
                width: 0,
                height: 0,
                bytes_per_row: 0,
                data: Vec::new(),
            });
            me.callbacks.cursor_glyph(glyph, hot.into());
        });
        let w = Arc::downgrade(&this);
        let show = RcBlock::new(move |show: Bool| {
            if let Some(me) = w.upgrade() {
                me.callbacks.cursor_show(show.as_bool());
            }
        });
        let w: Weak<Self> = Arc::downgrade(&this);
        let moved = RcBlock::new(move || {
            if let Some(me) = w.upgrade() {
                me.callbacks.cursor_moved();
            }
        });
        // SAFETY: documented PGDisplayDescriptor properties (macOS 11.0;
        // the move handler 11.1, probed); blocks are copied, the queue and
        // the name retained or copied.
        unsafe {
            let () = msg_send![&*d, setName: &*name];
            let () = msg_send![&*d, setSizeInMillimeters: size];
            let () = msg_send![&*d, setQueue: fw.display_queue()];
            let () = msg_send![&*d, setModeChangeHandler: &*mode];
            let () = msg_send![&*d, setNewFrameEventHandler: &*frame];
            let () = msg_send![&*d, setCursorGlyphHandler: &*glyph];
            let () = msg_send![&*d, setCursorShowHandler: &*show];
            if responds(&d, sel!(setCursorMoveHandler:)) {
                let () = msg_send![&*d, setCursorMoveHandler: &*moved];
            }
        }
        // SAFETY: `new…` returns +1 or nil; port and serial are plain
        // integers (NSUInteger, uint32_t).
        let pg: Option<Retained<AnyObject>> = unsafe {
            msg_send![dev, newDisplayWithDescriptor: &*d, port: port as usize, serialNum: serial]
        };
        let pg = pg.ok_or(FrameworkError::CreationFailed("display"))?;
        let _ = this.pg.set(Shared(pg));
        Ok(this)
    }

    /// Port and serial number the display was created with.
    pub fn port_and_serial(&self) -> (u32, u32) {
        (self.port, self.serial)
    }

    /// The guest's current mode, once it set one.
    pub fn mode(&self) -> Option<(u16, u16)> {
        *lock(&self.mode)
    }

    fn on_mode(&self, size: PgDisplayCoord, format: u32) {
        *lock(&self.mode) = Some((size.x, size.y));
        self.callbacks.mode_changed(size.into(), format);
    }

    fn on_new_frame(&self) {
        self.callbacks.new_frame();
    }
}

impl PgDisplay for MacDisplay {
    fn set_mode_list(&self, modes: &[DisplayMode]) {
        let Some(pg) = self.pg.get() else { return };
        let Some(cls) = class(c"PGDisplayMode") else {
            return;
        };
        let objs: Vec<Retained<AnyObject>> = modes
            .iter()
            .filter_map(|m| {
                let size = PgDisplayCoord {
                    x: m.width,
                    y: m.height,
                };
                // SAFETY: alloc + the designated initialiser; nil for a mode
                // the framework refuses, which is left out.
                unsafe {
                    let a: objc2::rc::Allocated<AnyObject> = msg_send![cls, alloc];
                    msg_send![a, initWithSizeInPixels: size, refreshRateInHz: f64::from(m.refresh_hz)]
                }
            })
            .collect();
        let list = NSArray::from_retained_slice(&objs);
        // SAFETY: modeList is a copied NSArray<PGDisplayMode*> property.
        let () = unsafe { msg_send![&*pg.0, setModeList: &*list] };
    }

    fn cursor_position(&self) -> DisplayCoord {
        let Some(pg) = self.pg.get() else {
            return DisplayCoord::OFF_DISPLAY;
        };
        // SAFETY: cursorPosition returns PGDisplayCoord_t by value.
        let c: PgDisplayCoord = unsafe { msg_send![&*pg.0, cursorPosition] };
        c.into()
    }

    fn render_frame(&self, width: u32, height: u32, pixels: &mut [u32]) -> bool {
        let (w, h) = (width as usize, height as usize);
        if w == 0 || h == 0 || w.checked_mul(h).is_none_or(|n| pixels.len() < n) {
            return false;
        }
        let Some(pg) = self.pg.get() else {
            return false;
        };
        let mtl = &self.fw.mtl;
        // SAFETY: minimumTextureUsage is an MTLTextureUsage property.
        let usage: MTLTextureUsage = unsafe { msg_send![&*pg.0, minimumTextureUsage] };
        // SAFETY: valid pixel format and non-zero size (checked).
        let td = unsafe {
            MTLTextureDescriptor::texture2DDescriptorWithPixelFormat_width_height_mipmapped(
                MTLPixelFormat::BGRA8Unorm,
                w,
                h,
                false,
            )
        };
        td.setUsage(usage);
        // Discrete GPUs keep a VRAM copy: the CPU sees the frame only after
        // an explicit synchronise.
        let managed = !mtl.hasUnifiedMemory();
        td.setStorageMode(if managed {
            MTLStorageMode::Managed
        } else {
            MTLStorageMode::Shared
        });
        let Some(tex) = mtl.newTextureWithDescriptor(&td) else {
            return false;
        };
        let Some(cmd) = self.fw.queue.commandBuffer() else {
            return false;
        };
        let region = whole(w, h);
        // SAFETY: the command buffer and the texture come from the
        // framework's own Metal device; the texture is ours and BGRA8, the
        // region all of it.
        let ok: bool = unsafe {
            msg_send![&*pg.0, encodeCurrentFrameToCommandBuffer: &*cmd, texture: &*tex, region: region]
        };
        if !ok {
            return false;
        }
        if managed {
            let Some(blit) = cmd.blitCommandEncoder() else {
                return false;
            };
            blit.synchronizeResource(ProtocolObject::from_ref(&*tex));
            blit.endEncoding();
        }
        cmd.commit();
        cmd.waitUntilCompleted();
        let Some(dst) = NonNull::new(pixels.as_mut_ptr().cast()) else {
            return false;
        };
        // SAFETY: `pixels` holds at least w × h u32 words (checked), which
        // is exactly what a w × h BGRA8 region with 4·w bytes per row needs;
        // little-endian BGRA bytes read as 0xAARRGGBB words.
        unsafe { tex.getBytes_bytesPerRow_fromRegion_mipmapLevel(dst, 4 * w, region, 0) };
        true
    }
}
