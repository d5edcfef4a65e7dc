//! The macOS main-thread loops behind [`crate::main_thread`]: a plain
//! CFRunLoop that serves the main dispatch queue, or AppKit with one window
//! per display.
//!
//! Only needed when display handlers run on the main queue
//! ([`DisplayQueue::Main`](crate::DisplayQueue)), i.e. with
//! `--display cocoa`; a headless VMM gives the framework a private queue
//! and keeps its main thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use dispatch2::DispatchQueue;
use objc2::rc::Retained;
use objc2::runtime::ProtocolObject;
use objc2::{MainThreadMarker, MainThreadOnly as _};
use objc2_app_kit::{
    NSApplication, NSApplicationActivationPolicy, NSBackingStoreType, NSEvent,
    NSEventModifierFlags, NSEventType, NSView, NSWindow, NSWindowStyleMask,
};
use objc2_core_foundation::{kCFRunLoopDefaultMode, CFRunLoop};
use objc2_foundation::{NSPoint, NSRect, NSSize, NSString};
use objc2_metal::MTLPixelFormat;
use objc2_quartz_core::CAMetalLayer;

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
    pub fn on_main_thread(fw: &MacFramework) -> Option<Self> {
        MainThreadMarker::new().map(|mtm| Self::new(mtm, fw))
    }

    /// Creates the application and a window for every display of `fw`.
    pub fn new(mtm: MainThreadMarker, fw: &MacFramework) -> Self {
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
                let view = NSView::initWithFrame(NSView::alloc(mtm), rect);
                // Layer-hosting view: set the layer before asking for one.
                view.setLayer(Some(&layer));
                view.setWantsLayer(true);
                window.setContentView(Some(&view));
                window.setTitle(&NSString::from_str(&format!("vmapple display {i}")));
                window.center();
                window.makeKeyAndOrderFront(None);
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
