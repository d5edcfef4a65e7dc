//! The macOS main-thread loops behind [`crate::main_thread`]: a plain
//! CFRunLoop that serves the main dispatch queue, or AppKit with one window
//! per display.
//!
//! Only needed when display handlers run on the main queue
//! ([`DisplayQueue::Main`](crate::DisplayQueue)), i.e. with
//! `--display cocoa`; a headless VMM gives the framework a private queue
//! and keeps its main thread.

use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use dispatch2::DispatchQueue;
use objc2::rc::Retained;
use objc2::runtime::{NSObject, ProtocolObject};
use objc2::{
    define_class, msg_send, AnyThread, DefinedClass as _, MainThreadMarker, MainThreadOnly,
};
use objc2_app_kit::{
    NSApplication, NSApplicationActivationPolicy, NSBackingStoreType, NSBitmapImageRep, NSCursor,
    NSEvent, NSEventModifierFlags, NSEventType, NSImage, NSResponder, NSView, NSWindow,
    NSWindowStyleMask,
};
use objc2_core_foundation::{kCFRunLoopDefaultMode, CFRunLoop};
use objc2_foundation::{NSPoint, NSRect, NSSize, NSString};
use objc2_metal::MTLPixelFormat;
use objc2_quartz_core::CAMetalLayer;

use crate::cursor::cursor_geometry;
use crate::display::CursorTarget;
use crate::input::{self, InputSink, Modifiers};
use crate::main_thread::{LoopStopper, PlatformLoop};
use crate::MacFramework;

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
            let cursor = if state.cursor_visible.get() {
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
            sink.pointer(x, y, input::buttons(NSEvent::pressedMouseButtons()));
        }
    }
}

thread_local! {
    /// Each window's view and layer, by display index. Kept on the main
    /// thread, where AppKit objects live and die: the display owning a
    /// [`WindowCursor`] may be dropped on any thread, even while the main
    /// thread waits for it.
    static WINDOW_VIEWS: RefCell<Vec<(Retained<InputView>, Retained<CAMetalLayer>)>> =
        const { RefCell::new(Vec::new()) };
}

/// A window's view as the display's [`CursorTarget`]. The display's
/// handlers run on the main queue whenever a window exists
/// ([`DisplayQueue::Main`](crate::DisplayQueue)), so the view is reached
/// from the main thread only.
struct WindowCursor {
    index: usize,
}

impl WindowCursor {
    fn with_view(&self, f: impl FnOnce(&InputView, &CAMetalLayer)) {
        if MainThreadMarker::new().is_none() {
            tracing::warn!("apple-gfx: cursor event off the main thread ignored");
            return;
        }
        WINDOW_VIEWS.with(|views| {
            if let Some((view, layer)) = views.borrow().get(self.index) {
                f(view, layer);
            }
        });
    }
}

impl CursorTarget for WindowCursor {
    fn set_glyph(&self, glyph: &NSBitmapImageRep, hot_spot: (u16, u16)) {
        self.with_view(|view, layer| {
            let pixels = (
                u32::try_from(glyph.pixelsWide()).unwrap_or(0),
                u32::try_from(glyph.pixelsHigh()).unwrap_or(0),
            );
            // The glyph is scaled like the frame the layer shows.
            let frame_pixels = layer.drawableSize().width as u32;
            let Some(g) = cursor_geometry(pixels, hot_spot, view.bounds().size.width, frame_pixels)
            else {
                return;
            };
            let image = NSImage::initWithSize(NSImage::alloc(), NSSize::new(g.width, g.height));
            image.addRepresentation(glyph);
            let cursor = NSCursor::initWithImage_hotSpot(
                NSCursor::alloc(),
                &image,
                NSPoint::new(g.hot_x, g.hot_y),
            );
            *view.ivars().cursor.borrow_mut() = Some(cursor);
            if let Some(window) = view.window() {
                window.invalidateCursorRectsForView(view);
            }
        });
    }

    fn set_visible(&self, visible: bool) {
        self.with_view(|view, _| {
            view.ivars().cursor_visible.set(visible);
            if let Some(window) = view.window() {
                window.invalidateCursorRectsForView(view);
            }
        });
    }
}

/// `NSApplication` with one window per display; each window's content is a
/// `CAMetalLayer` the framework renders into directly.
pub struct AppKitLoop {
    app: Retained<NSApplication>,
    /// Kept alive: closing a window hides it, the VM goes on.
    _windows: Vec<Retained<NSWindow>>,
}

/// Window size in points for a display with no mode yet.
const DEFAULT_POINTS: (f64, f64) = (1024.0, 640.0);

impl AppKitLoop {
    /// [`Self::new`] if called on the main thread, else `None`; spares
    /// callers a dependency on objc2 for the marker.
    pub fn on_main_thread(fw: &MacFramework, input: Option<Arc<dyn InputSink>>) -> Option<Self> {
        MainThreadMarker::new().map(|mtm| Self::new(mtm, fw, input))
    }

    /// Creates the application and a window for every display of `fw`;
    /// keys and the mouse in a window go to `input`.
    pub fn new(
        mtm: MainThreadMarker,
        fw: &MacFramework,
        input: Option<Arc<dyn InputSink>>,
    ) -> Self {
        let app = NSApplication::sharedApplication(mtm);
        // A regular app: Dock icon, key windows, a visible host cursor.
        app.setActivationPolicy(NSApplicationActivationPolicy::Regular);
        let windows = fw
            .displays()
            .iter()
            .enumerate()
            .map(|(i, display)| {
                // Half the guest's pixels in points: one guest pixel per
                // device pixel on a Retina screen.
                let (w, h) = display.mode().map_or(DEFAULT_POINTS, |(w, h)| {
                    (f64::from(w) / 2.0, f64::from(h) / 2.0)
                });
                let rect = NSRect::new(NSPoint::new(0.0, 0.0), NSSize::new(w, h));
                let style = NSWindowStyleMask::Titled
                    | NSWindowStyleMask::Closable
                    | NSWindowStyleMask::Miniaturizable
                    | NSWindowStyleMask::Resizable;
                // SAFETY: designated initialiser on the main thread
                // (`mtm`); the window is kept in `_windows`.
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
                layer.setDevice(Some(ProtocolObject::from_ref(fw.metal_device())));
                layer.setPixelFormat(MTLPixelFormat::BGRA8Unorm);
                // The framework writes the drawable's texture itself (its
                // display pass, not a render pass of ours), which a
                // framebuffer-only texture may not allow.
                layer.setFramebufferOnly(false);
                let view = InputView::new(mtm, rect, input.clone());
                // Layer-hosting view: set the layer before asking for one.
                view.setLayer(Some(&layer));
                view.setWantsLayer(true);
                window.setContentView(Some(&view));
                // Moves without a button held reach the first responder
                // only when the window asks for them.
                window.setAcceptsMouseMovedEvents(true);
                window.makeFirstResponder(Some(&view));
                window.setTitle(&NSString::from_str(&format!("vmapple display {i}")));
                window.center();
                window.makeKeyAndOrderFront(None);
                let index = WINDOW_VIEWS.with(|views| {
                    let mut views = views.borrow_mut();
                    views.push((view.clone(), layer.clone()));
                    views.len() - 1
                });
                display.attach_cursor(Arc::new(WindowCursor { index }));
                // SAFETY: from here the layer's properties are changed only
                // by the display's handlers, which run on the main queue.
                unsafe { display.attach_layer(layer) };
                window
            })
            .collect();
        Self {
            app,
            _windows: windows,
        }
    }
}

impl PlatformLoop for AppKitLoop {
    fn run(&mut self) {
        #[allow(deprecated)]
        self.app.activateIgnoringOtherApps(true);
        self.app.run();
    }

    fn stopper(&self) -> Box<dyn LoopStopper> {
        Box::new(AppKitStop)
    }
}

struct AppKitStop;

impl LoopStopper for AppKitStop {
    fn stop(&self) {
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
