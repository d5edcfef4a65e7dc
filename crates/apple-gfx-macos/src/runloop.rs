//! The macOS main-thread loops behind [`crate::main_thread`]: a plain
//! CFRunLoop that serves the main dispatch queue, or AppKit with one window
//! per head of the display model (`--display cocoa`).
//!
//! The window is a front end of the display model ([`crate::window`] has
//! its portable part): it shows whichever device feeds the model
//! (apple-gfx or virtio-gpu) and knows neither. A headless VMM keeps its
//! main thread.

use std::cell::{Cell, RefCell};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use dispatch2::DispatchQueue;
use display::{CursorImage, Display, Head, InputSink, Rect};
use objc2::rc::Retained;
use objc2::runtime::{NSObject, ProtocolObject};
use objc2::{
    define_class, msg_send, AnyThread, DefinedClass as _, MainThreadMarker, MainThreadOnly,
};
use objc2_app_kit::{
    NSApplication, NSApplicationActivationPolicy, NSBackingStoreType, NSBitmapFormat,
    NSBitmapImageRep, NSCursor, NSDeviceRGBColorSpace, NSEvent, NSEventModifierFlags, NSEventType,
    NSImage, NSResponder, NSView, NSWindow, NSWindowStyleMask,
};
use objc2_core_foundation::{kCFRunLoopDefaultMode, CFRunLoop, CGSize};
use objc2_foundation::{NSPoint, NSRect, NSSize, NSString};
use objc2_metal::{
    MTLBlitCommandEncoder, MTLCommandBuffer, MTLCommandEncoder, MTLCommandQueue,
    MTLCreateSystemDefaultDevice, MTLDevice, MTLOrigin, MTLPixelFormat, MTLRegion, MTLSize,
    MTLStorageMode, MTLTexture, MTLTextureDescriptor, MTLTextureUsage,
};
use objc2_quartz_core::{CAMetalDrawable, CAMetalLayer};

use crate::cursor::cursor_geometry;
use crate::input::{self, Modifiers, Wheel};
use crate::main_thread::{LoopStopper, PlatformLoop};
use crate::window::{cursor_rgba, HeadView, Pump};

/// CFRunLoop on the main thread: serves the main dispatch queue and
/// nothing else (QEMU's default on macOS without a UI).
pub struct CfLoop {
    stopped: Arc<AtomicBool>,
}

impl CfLoop {
    /// `None` unless called on the main thread.
    pub fn new() -> Option<Self> {
        MainThreadMarker::new()?;
        Some(Self {
            stopped: Arc::new(AtomicBool::new(false)),
        })
    }
}

impl PlatformLoop for CfLoop {
    fn run(&mut self) {
        // Short slices, not CFRunLoopRun: that returns at once while the
        // loop has no sources, and a stop that comes before it starts
        // would be lost.
        while !self.stopped.load(Ordering::SeqCst) {
            // SAFETY: the default mode constant is set by CoreFoundation.
            let mode = unsafe { kCFRunLoopDefaultMode };
            CFRunLoop::run_in_mode(mode, 0.25, false);
        }
    }

    fn stopper(&self) -> Box<dyn LoopStopper> {
        Box::new(CfStop(self.stopped.clone()))
    }
}

struct CfStop(Arc<AtomicBool>);

impl LoopStopper for CfStop {
    fn stop(&self) {
        self.0.store(true, Ordering::SeqCst);
        if let Some(main) = CFRunLoop::main() {
            main.stop();
            main.wake_up();
        }
    }
}

/// What the window's view keeps: where input goes, which modifiers it
/// reported down, and the guest's cursor.
struct ViewState {
    input: Option<Arc<dyn InputSink>>,
    modifiers: RefCell<Modifiers>,
    /// The buttons last sent, so only changes are.
    buttons: Cell<u8>,
    wheel: RefCell<Wheel>,
    /// The guest's glyph as a host cursor; the arrow until the guest sets
    /// one.
    cursor: RefCell<Option<Retained<NSCursor>>>,
    cursor_visible: Cell<bool>,
}

define_class!(
    // SAFETY: NSView may be subclassed; the class has no Drop, and each
    // override has the signature of the NSResponder method it replaces.
    #[unsafe(super(NSView, NSResponder, NSObject))]
    #[thread_kind = MainThreadOnly]
    #[ivars = ViewState]
    struct InputView;

    impl InputView {
        // Without this, key events go to the window, not to us.
        #[unsafe(method(acceptsFirstResponder))]
        fn accepts_first_responder(&self) -> bool {
            true
        }

        #[unsafe(method(keyDown:))]
        fn key_down(&self, event: &NSEvent) {
            // The guest repeats keys itself.
            if !event.isARepeat() {
                self.key(event.keyCode(), true);
            }
        }

        #[unsafe(method(keyUp:))]
        fn key_up(&self, event: &NSEvent) {
            self.key(event.keyCode(), false);
        }

        #[unsafe(method(flagsChanged:))]
        fn flags_changed(&self, event: &NSEvent) {
            let code = event.keyCode();
            let flags = event.modifierFlags();
            let family = match input::hid_usage(code) {
                Some(0xe0 | 0xe4) => NSEventModifierFlags::Control,
                Some(0xe1 | 0xe5) => NSEventModifierFlags::Shift,
                Some(0xe2 | 0xe6) => NSEventModifierFlags::Option,
                Some(0xe3 | 0xe7) => NSEventModifierFlags::Command,
                _ => NSEventModifierFlags::CapsLock,
            };
            let changes = self
                .ivars()
                .modifiers
                .borrow_mut()
                .changed(code, flags.contains(family));
            self.send_keys(&changes);
        }

        #[unsafe(method(resignFirstResponder))]
        fn resign_first_responder(&self) -> bool {
            // Keys held while focus leaves would stay down in the guest.
            let changes = self.ivars().modifiers.borrow_mut().release_all();
            self.send_keys(&changes);
            // SAFETY: NSResponder's method, same signature.
            unsafe { msg_send![super(self), resignFirstResponder] }
        }

        // AppKit asks again after invalidateCursorRectsForView:, which is
        // how a new glyph or a show/hide takes effect.
        #[unsafe(method(resetCursorRects))]
        fn reset_cursor_rects(&self) {
            let state = self.ivars();
            // A guest that never set a cursor image draws its own pointer,
            // or none (a console): the host's arrow stays.
            let shown = state.cursor_visible.get() || state.cursor.borrow().is_none();
            let cursor = if shown {
                state.cursor.borrow().clone()
            } else {
                // An image with no representation draws nothing.
                let blank = NSImage::initWithSize(NSImage::alloc(), NSSize::new(1.0, 1.0));
                Some(NSCursor::initWithImage_hotSpot(
                    NSCursor::alloc(),
                    &blank,
                    NSPoint::new(0.0, 0.0),
                ))
            };
            if let Some(cursor) = cursor {
                self.addCursorRect_cursor(self.bounds(), &cursor);
            }
        }

        #[unsafe(method(mouseMoved:))]
        fn mouse_moved(&self, event: &NSEvent) {
            self.pointer(event);
        }

        #[unsafe(method(mouseDragged:))]
        fn mouse_dragged(&self, event: &NSEvent) {
            self.pointer(event);
        }

        #[unsafe(method(rightMouseDragged:))]
        fn right_mouse_dragged(&self, event: &NSEvent) {
            self.pointer(event);
        }

        #[unsafe(method(otherMouseDragged:))]
        fn other_mouse_dragged(&self, event: &NSEvent) {
            self.pointer(event);
        }

        #[unsafe(method(mouseDown:))]
        fn mouse_down(&self, event: &NSEvent) {
            self.pointer(event);
        }

        #[unsafe(method(mouseUp:))]
        fn mouse_up(&self, event: &NSEvent) {
            self.pointer(event);
        }

        #[unsafe(method(rightMouseDown:))]
        fn right_mouse_down(&self, event: &NSEvent) {
            self.pointer(event);
        }

        #[unsafe(method(rightMouseUp:))]
        fn right_mouse_up(&self, event: &NSEvent) {
            self.pointer(event);
        }

        #[unsafe(method(otherMouseDown:))]
        fn other_mouse_down(&self, event: &NSEvent) {
            self.pointer(event);
        }

        #[unsafe(method(otherMouseUp:))]
        fn other_mouse_up(&self, event: &NSEvent) {
            self.pointer(event);
        }

        #[unsafe(method(scrollWheel:))]
        fn scroll_wheel(&self, event: &NSEvent) {
            let detents = self
                .ivars()
                .wheel
                .borrow_mut()
                .scrolled(event.scrollingDeltaY(), event.hasPreciseScrollingDeltas());
            if let (Some(sink), false) = (&self.ivars().input, detents == 0) {
                sink.wheel(detents);
            }
        }
    }
);

impl InputView {
    fn new(
        mtm: MainThreadMarker,
        frame: NSRect,
        input: Option<Arc<dyn InputSink>>,
    ) -> Retained<Self> {
        let this = Self::alloc(mtm).set_ivars(ViewState {
            input,
            modifiers: RefCell::new(Modifiers::default()),
            buttons: Cell::new(0),
            wheel: RefCell::new(Wheel::default()),
            cursor: RefCell::new(None),
            cursor_visible: Cell::new(true),
        });
        // SAFETY: NSView's designated initialiser on a fresh allocation.
        unsafe { msg_send![super(this), initWithFrame: frame] }
    }

    fn key(&self, code: u16, pressed: bool) {
        if let Some(usage) = input::hid_usage(code) {
            self.send_keys(&[(usage, pressed)]);
        }
    }

    fn send_keys(&self, keys: &[(u8, bool)]) {
        if let Some(sink) = &self.ivars().input {
            for &(usage, pressed) in keys {
                sink.key(usage, pressed);
            }
        }
    }

    fn pointer(&self, event: &NSEvent) {
        let Some(sink) = &self.ivars().input else {
            return;
        };
        let at = self.convertPoint_fromView(event.locationInWindow(), None);
        let size = self.bounds().size;
        if let Some((x, y)) = input::tablet_position(at.x, at.y, size.width, size.height) {
            sink.pointer(x, y);
            let buttons = input::buttons(NSEvent::pressedMouseButtons());
            if self.ivars().buttons.replace(buttons) != buttons {
                sink.buttons(buttons);
            }
        }
    }

    /// AppKit asks for the cursor rectangles again, with the new cursor.
    fn cursor_changed(&self) {
        if let Some(window) = self.window() {
            window.invalidateCursorRectsForView(self);
        }
    }
}

/// One head's window on the main thread: its view and layer, the texture
/// the head's frame is kept in, and what it has shown.
struct HeadWindow {
    head: Arc<Head>,
    view: Retained<InputView>,
    layer: Retained<CAMetalLayer>,
    device: Retained<ProtocolObject<dyn MTLDevice>>,
    queue: Retained<ProtocolObject<dyn MTLCommandQueue>>,
    texture: RefCell<Option<Retained<ProtocolObject<dyn MTLTexture>>>>,
    shown: RefCell<HeadView>,
    pump: Arc<Pump>,
}

thread_local! {
    /// The windows, by head index. Kept on the main thread, where AppKit
    /// objects live and die; the pump threads only name an index.
    static WINDOWS: RefCell<Vec<HeadWindow>> = const { RefCell::new(Vec::new()) };
}

fn region(r: Rect) -> MTLRegion {
    MTLRegion {
        origin: MTLOrigin {
            x: r.x as usize,
            y: r.y as usize,
            z: 0,
        },
        size: MTLSize {
            width: r.width as usize,
            height: r.height as usize,
            depth: 1,
        },
    }
}

impl HeadWindow {
    /// Brings the window up to date with its head: the damaged tiles into
    /// the texture, the texture onto the layer, the cursor into the view.
    fn repaint(&self) {
        let r = self.shown.borrow_mut().catch_up(&self.head);
        self.pump.shown(r.now);
        if r.is_empty() {
            return;
        }
        if r.resized {
            *self.texture.borrow_mut() = self.make_texture(r.width, r.height);
            self.layer
                .setDrawableSize(CGSize::new(f64::from(r.width), f64::from(r.height)));
        }
        let texture = self.texture.borrow().clone();
        if let Some(texture) = &texture {
            for tile in &r.tiles {
                let Some(bytes) = NonNull::new(tile.bgra.as_ptr().cast_mut().cast()) else {
                    continue;
                };
                // SAFETY: the tile lies inside the frame the texture was
                // made for (the model clips it, and a resize remakes the
                // texture first), and `bgra` holds its rows of 4·width
                // bytes; Metal copies them before returning.
                unsafe {
                    texture.replaceRegion_mipmapLevel_withBytes_bytesPerRow(
                        region(tile.rect),
                        0,
                        bytes,
                        4 * tile.rect.width as usize,
                    );
                }
            }
            if r.resized || !r.tiles.is_empty() {
                self.present(texture);
            }
        }
        if let Some(image) = r.cursor_image {
            *self.view.ivars().cursor.borrow_mut() =
                image.and_then(|i| host_cursor(&i, &self.view, r.width));
            self.view.cursor_changed();
        }
        if let Some(visible) = r.cursor_visible {
            self.view.ivars().cursor_visible.set(visible);
            self.view.cursor_changed();
        }
    }

    /// A shared-storage texture the size of the frame (Apple silicon has
    /// unified memory: uploads need no synchronise).
    fn make_texture(
        &self,
        width: u32,
        height: u32,
    ) -> Option<Retained<ProtocolObject<dyn MTLTexture>>> {
        if width == 0 || height == 0 {
            return None;
        }
        // SAFETY: a valid pixel format and a non-zero size.
        let td = unsafe {
            MTLTextureDescriptor::texture2DDescriptorWithPixelFormat_width_height_mipmapped(
                MTLPixelFormat::BGRA8Unorm,
                width as usize,
                height as usize,
                false,
            )
        };
        td.setStorageMode(MTLStorageMode::Shared);
        td.setUsage(MTLTextureUsage::ShaderRead);
        self.device.newTextureWithDescriptor(&td)
    }

    /// Copies the texture into the layer's next drawable and presents it.
    fn present(&self, texture: &ProtocolObject<dyn MTLTexture>) {
        let Some(drawable) = self.layer.nextDrawable() else {
            return;
        };
        let Some(cmd) = self.queue.commandBuffer() else {
            return;
        };
        let Some(blit) = cmd.blitCommandEncoder() else {
            return;
        };
        let target = drawable.texture();
        if target.width() != texture.width() || target.height() != texture.height() {
            // The drawable size follows the texture; a drawable of the old
            // size is skipped, the next repaint shows the frame.
            blit.endEncoding();
            return;
        }
        // SAFETY: both textures are alive for the call (retained here) and
        // of the same size and pixel format; Metal tracks their hazards.
        unsafe { blit.copyFromTexture_toTexture(texture, &target) };
        blit.endEncoding();
        cmd.presentDrawable(ProtocolObject::from_ref(&*drawable));
        cmd.commit();
    }
}

/// The guest's cursor image as a host cursor, scaled like the frame.
fn host_cursor(
    image: &CursorImage,
    view: &InputView,
    frame_pixels: u32,
) -> Option<Retained<NSCursor>> {
    let g = cursor_geometry(
        (image.width, image.height),
        (
            u16::try_from(image.hot_x).unwrap_or(u16::MAX),
            u16::try_from(image.hot_y).unwrap_or(u16::MAX),
        ),
        view.bounds().size.width,
        frame_pixels,
    )?;
    let (w, h) = (image.width as isize, image.height as isize);
    let rgba = cursor_rgba(image);
    if rgba.len() != (w * h * 4) as usize {
        return None;
    }
    // SAFETY: null planes make the image allocate its own buffer of
    // 4·w × h bytes (meshed RGBA, 8 bits per sample), which is then
    // filled below; the colour space name is AppKit's constant.
    let rep = unsafe {
        NSBitmapImageRep::initWithBitmapDataPlanes_pixelsWide_pixelsHigh_bitsPerSample_samplesPerPixel_hasAlpha_isPlanar_colorSpaceName_bitmapFormat_bytesPerRow_bitsPerPixel(
            NSBitmapImageRep::alloc(),
            std::ptr::null_mut(),
            w,
            h,
            8,
            4,
            true,
            false,
            NSDeviceRGBColorSpace,
            NSBitmapFormat::AlphaNonpremultiplied,
            w * 4,
            32,
        )
    }?;
    let data = rep.bitmapData();
    if data.is_null() {
        return None;
    }
    // SAFETY: the image's own buffer holds 4·w × h bytes (made above) and
    // nothing else refers to it yet.
    unsafe { std::ptr::copy_nonoverlapping(rgba.as_ptr(), data, rgba.len()) };
    let ns_image = NSImage::initWithSize(NSImage::alloc(), NSSize::new(g.width, g.height));
    ns_image.addRepresentation(&rep);
    Some(NSCursor::initWithImage_hotSpot(
        NSCursor::alloc(),
        &ns_image,
        NSPoint::new(g.hot_x, g.hot_y),
    ))
}

/// Repaints head `index`'s window; queued on the main queue by its pump.
fn repaint(index: usize) {
    if MainThreadMarker::new().is_none() {
        return;
    }
    WINDOWS.with(|w| {
        if let Some(w) = w.borrow().get(index) {
            w.repaint();
        }
    });
}

/// `NSApplication` with one window per head of the display model. Each
/// window keeps its head's frame in a Metal texture, updated by damaged
/// tiles, and presents it on its `CAMetalLayer`.
pub struct AppKitLoop {
    app: Retained<NSApplication>,
    /// Kept alive: closing a window hides it, the VM goes on.
    _windows: Vec<Retained<NSWindow>>,
    pumps: Vec<Arc<Pump>>,
}

/// Window size in points for a head with no mode.
const DEFAULT_POINTS: (f64, f64) = (1024.0, 640.0);

/// Why the window cannot be shown.
#[derive(Debug, thiserror::Error)]
pub enum WindowError {
    #[error("AppKit needs the process's main thread")]
    NotMainThread,
    #[error("this Mac has no Metal device")]
    NoMetal,
    #[error("cannot create a Metal command queue")]
    NoQueue,
    #[error("cannot start the window's pump thread")]
    Thread(#[source] std::io::Error),
}

impl AppKitLoop {
    /// Creates the application and a window for every head of `display`;
    /// keys and the mouse in a window go to the display's input sink. Must
    /// be called on the main thread.
    pub fn new(display: &Arc<Display>) -> Result<Self, WindowError> {
        let mtm = MainThreadMarker::new().ok_or(WindowError::NotMainThread)?;
        let device = MTLCreateSystemDefaultDevice().ok_or(WindowError::NoMetal)?;
        let app = NSApplication::sharedApplication(mtm);
        // A regular app: Dock icon, key windows, a visible host cursor.
        app.setActivationPolicy(NSApplicationActivationPolicy::Regular);
        let mut windows = Vec::new();
        let mut pumps = Vec::new();
        for (i, head) in display.heads().iter().enumerate() {
            let queue = device.newCommandQueue().ok_or(WindowError::NoQueue)?;
            // Half the guest's pixels in points: one guest pixel per device
            // pixel on a Retina screen.
            let (w, h) = head.modes().first().map_or(DEFAULT_POINTS, |m| {
                (f64::from(m.width) / 2.0, f64::from(m.height) / 2.0)
            });
            let rect = NSRect::new(NSPoint::new(0.0, 0.0), NSSize::new(w, h));
            let style = NSWindowStyleMask::Titled
                | NSWindowStyleMask::Closable
                | NSWindowStyleMask::Miniaturizable
                | NSWindowStyleMask::Resizable;
            // SAFETY: designated initialiser on the main thread (`mtm`);
            // the window is kept in `_windows`.
            let window = unsafe {
                NSWindow::initWithContentRect_styleMask_backing_defer(
                    NSWindow::alloc(mtm),
                    rect,
                    style,
                    NSBackingStoreType::Buffered,
                    false,
                )
            };
            // SAFETY: we own the window; AppKit must not free it on close.
            unsafe { window.setReleasedWhenClosed(false) };
            let layer = CAMetalLayer::new();
            layer.setDevice(Some(&device));
            layer.setPixelFormat(MTLPixelFormat::BGRA8Unorm);
            layer.setOpaque(true);
            // The drawable is a blit destination, which a framebuffer-only
            // texture may not be.
            layer.setFramebufferOnly(false);
            let view = InputView::new(mtm, rect, display.input().cloned());
            // Layer-hosting view: set the layer before asking for one.
            view.setLayer(Some(&layer));
            view.setWantsLayer(true);
            window.setContentView(Some(&view));
            // Moves without a button held reach the first responder only
            // when the window asks for them.
            window.setAcceptsMouseMovedEvents(true);
            window.makeFirstResponder(Some(&view));
            window.setTitle(&NSString::from_str(&format!("vmapple display {i}")));
            window.center();
            window.makeKeyAndOrderFront(None);
            let pump = Pump::new();
            WINDOWS.with(|ws| {
                ws.borrow_mut().push(HeadWindow {
                    head: head.clone(),
                    view,
                    layer,
                    device: device.clone(),
                    queue,
                    texture: RefCell::new(None),
                    shown: RefCell::new(HeadView::default()),
                    pump: pump.clone(),
                })
            });
            let (p, h) = (pump.clone(), head.clone());
            std::thread::Builder::new()
                .name(format!("window-pump-{i}"))
                .spawn(move || {
                    p.run(&h, move || {
                        DispatchQueue::main().exec_async(move || repaint(i))
                    });
                })
                .map_err(WindowError::Thread)?;
            pumps.push(pump);
            windows.push(window);
        }
        Ok(Self {
            app,
            _windows: windows,
            pumps,
        })
    }
}

impl PlatformLoop for AppKitLoop {
    fn run(&mut self) {
        #[allow(deprecated)]
        self.app.activateIgnoringOtherApps(true);
        self.app.run();
    }

    fn stopper(&self) -> Box<dyn LoopStopper> {
        Box::new(AppKitStop(self.pumps.clone()))
    }
}

struct AppKitStop(Vec<Arc<Pump>>);

impl LoopStopper for AppKitStop {
    fn stop(&self) {
        for pump in &self.0 {
            pump.stop();
        }
        // Through the main queue: AppKit objects belong to the main thread,
        // and a stop queued before `run` starts is served once it does.
        DispatchQueue::main().exec_async(|| {
            // SAFETY: blocks on the main queue run on the main thread.
            let mtm = unsafe { MainThreadMarker::new_unchecked() };
            let app = NSApplication::sharedApplication(mtm);
            app.stop(None);
            // `stop:` takes effect after the next event; make sure there is one.
            let event = NSEvent::otherEventWithType_location_modifierFlags_timestamp_windowNumber_context_subtype_data1_data2(
                NSEventType::ApplicationDefined,
                NSPoint::new(0.0, 0.0),
                NSEventModifierFlags::empty(),
                0.0,
                0,
                None,
                0,
                0,
                0,
            );
            if let Some(event) = event {
                app.postEvent_atStart(&event, true);
            }
        });
    }
}
