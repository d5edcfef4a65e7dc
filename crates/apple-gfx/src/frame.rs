//! The frame pipeline's state machine (apple-gfx.md §9.2, §9.3) as a pure
//! reducer: each event returns the actions the device must perform.
//!
//! The guest announces frames (`newFrameEventHandler`); at most one render
//! is in flight and at most one more is queued behind it, which coalesces
//! every announcement made meanwhile. A finished render is kept as the
//! current frame if the surface still has the size it was rendered for, and
//! is handed to the UI when the UI asks (`gfx_update`) — immediately if the
//! UI is already waiting.
//!
//! Departures from QEMU (spec recommendations): frames announced before the
//! first mode change are ignored; a UI request left waiting when the
//! pipeline drains (failed or discarded render) is answered; renders started
//! before a [`FrameState::reset`] are recognised by their [`RenderToken`] and
//! ignored when they finish.

/// Identifies one started render.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RenderToken {
    generation: u64,
    pub width: u32,
    pub height: u32,
}

/// What the device must do after an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameAction {
    /// Create a new host surface of this size (and tell the UI).
    ReplaceSurface { width: u32, height: u32 },
    /// Render the guest's current frame at the token's size on a worker and
    /// report back with [`FrameState::render_completed`] or
    /// [`FrameState::render_failed`].
    StartRender(RenderToken),
    /// The finished render becomes the surface contents.
    KeepRender,
    /// Give the surface contents to the UI.
    Publish,
    /// Complete the UI's outstanding update request.
    UpdateDone,
}

/// Pipeline state; all transitions happen under the device's state lock.
#[derive(Clone, Debug, Default)]
pub struct FrameState {
    surface: Option<(u32, u32)>,
    /// Frames announced but not yet rendered or dropped: 0, 1 or 2.
    pending: u8,
    update_requested: bool,
    frame_ready: bool,
    generation: u64,
    dropped: u64,
}

/// The actions one event produces, in order.
pub type Actions = Vec<FrameAction>;

impl FrameState {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn surface_size(&self) -> Option<(u32, u32)> {
        self.surface
    }

    pub fn pending(&self) -> u8 {
        self.pending
    }

    /// Frames the guest announced while two were already pending.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    pub fn frame_ready(&self) -> bool {
        self.frame_ready
    }

    fn start(&self) -> FrameAction {
        let (width, height) = self.surface.unwrap_or((0, 0));
        FrameAction::StartRender(RenderToken {
            generation: self.generation,
            width,
            height,
        })
    }

    /// `modeChangeHandler`.
    pub fn mode_changed(&mut self, width: u32, height: u32) -> Actions {
        if self.surface == Some((width, height)) {
            return vec![];
        }
        self.surface = Some((width, height));
        self.frame_ready = false;
        vec![FrameAction::ReplaceSurface { width, height }]
    }

    /// `newFrameEventHandler`.
    pub fn new_frame(&mut self) -> Actions {
        if self.surface.is_none() {
            return vec![];
        }
        if self.pending >= 2 {
            self.dropped = self.dropped.wrapping_add(1);
            return vec![];
        }
        self.pending += 1;
        if self.pending == 1 {
            vec![self.start()]
        } else {
            vec![]
        }
    }

    fn is_current(&self, token: RenderToken) -> bool {
        token.generation == self.generation && self.pending > 0
    }

    /// After a render ended (either way): start the queued one, or answer a
    /// UI request nobody else will answer.
    fn finish(&mut self, out: &mut Actions) {
        self.pending -= 1;
        if self.pending > 0 {
            out.push(self.start());
        } else if self.update_requested {
            self.update_requested = false;
            out.push(FrameAction::UpdateDone);
        }
    }

    /// A render finished and its pixels are available.
    pub fn render_completed(&mut self, token: RenderToken) -> Actions {
        let mut out = Vec::new();
        if !self.is_current(token) {
            return out;
        }
        if self.surface == Some((token.width, token.height)) {
            out.push(FrameAction::KeepRender);
            if self.update_requested {
                self.update_requested = false;
                self.frame_ready = false;
                out.push(FrameAction::Publish);
                out.push(FrameAction::UpdateDone);
            } else {
                self.frame_ready = true;
            }
        }
        self.finish(&mut out);
        out
    }

    /// The framework refused to encode the frame.
    pub fn render_failed(&mut self, token: RenderToken) -> Actions {
        let mut out = Vec::new();
        if self.is_current(token) {
            self.finish(&mut out);
        }
        out
    }

    /// The UI asks for the next frame (asynchronous console update).
    pub fn ui_update(&mut self) -> Actions {
        if self.frame_ready {
            self.frame_ready = false;
            vec![FrameAction::Publish, FrameAction::UpdateDone]
        } else if self.pending > 0 {
            self.update_requested = true;
            vec![]
        } else {
            vec![FrameAction::UpdateDone]
        }
    }

    /// Device reset: forget pending and in-flight work; the surface stays.
    /// Returns an `UpdateDone` if the UI was waiting.
    pub fn reset(&mut self) -> Actions {
        self.generation = self.generation.wrapping_add(1);
        self.pending = 0;
        self.frame_ready = false;
        if std::mem::take(&mut self.update_requested) {
            vec![FrameAction::UpdateDone]
        } else {
            vec![]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use FrameAction::*;

    fn token(a: &Actions) -> RenderToken {
        match a.as_slice() {
            [StartRender(t)] => *t,
            other => panic!("expected one StartRender, got {other:?}"),
        }
    }

    fn with_surface() -> FrameState {
        let mut f = FrameState::new();
        assert_eq!(
            f.mode_changed(800, 600),
            vec![ReplaceSurface {
                width: 800,
                height: 600
            }]
        );
        f
    }

    #[test]
    fn frames_before_a_mode_are_ignored() {
        let mut f = FrameState::new();
        assert!(f.new_frame().is_empty());
        assert_eq!(f.pending(), 0);
        assert_eq!(f.ui_update(), vec![UpdateDone]);
    }

    #[test]
    fn requested_rendering_presented() {
        let mut f = with_surface();
        let t = token(&f.new_frame());
        assert_eq!((t.width, t.height), (800, 600));
        assert_eq!(f.render_completed(t), vec![KeepRender]);
        assert!(f.frame_ready());
        assert_eq!(f.ui_update(), vec![Publish, UpdateDone]);
        // Nothing new: answered at once, nothing published.
        assert_eq!(f.ui_update(), vec![UpdateDone]);
    }

    #[test]
    fn ui_waiting_is_answered_by_completion() {
        let mut f = with_surface();
        let t = token(&f.new_frame());
        assert!(f.ui_update().is_empty());
        assert_eq!(f.render_completed(t), vec![KeepRender, Publish, UpdateDone]);
        assert!(!f.frame_ready());
    }

    #[test]
    fn one_render_in_flight_and_one_queued() {
        let mut f = with_surface();
        let t1 = token(&f.new_frame());
        // Arrives while rendering: queued, not started.
        assert!(f.new_frame().is_empty());
        // Further ones coalesce into the queued one.
        assert!(f.new_frame().is_empty());
        assert!(f.new_frame().is_empty());
        assert_eq!(f.pending(), 2);
        assert_eq!(f.dropped(), 2);
        let a = f.render_completed(t1);
        assert_eq!(a[0], KeepRender);
        let t2 = match a.as_slice() {
            [KeepRender, StartRender(t)] => *t,
            other => panic!("{other:?}"),
        };
        assert_eq!(f.pending(), 1);
        assert_eq!(f.render_completed(t2), vec![KeepRender]);
        assert_eq!(f.pending(), 0);
    }

    #[test]
    fn resize_during_render_discards_the_frame() {
        let mut f = with_surface();
        let t = token(&f.new_frame());
        assert!(f.ui_update().is_empty());
        f.mode_changed(1024, 768);
        // Wrong size: discarded, and the waiting UI still gets an answer.
        assert_eq!(f.render_completed(t), vec![UpdateDone]);
        assert!(!f.frame_ready());
        let t = token(&f.new_frame());
        assert_eq!((t.width, t.height), (1024, 768));
    }

    #[test]
    fn same_mode_twice_keeps_the_surface() {
        let mut f = with_surface();
        assert!(f.mode_changed(800, 600).is_empty());
    }

    #[test]
    fn failed_render_moves_on() {
        let mut f = with_surface();
        let t = token(&f.new_frame());
        f.new_frame();
        let t2 = token(&f.render_failed(t));
        assert!(f.ui_update().is_empty());
        // QEMU never answers the UI here; we do.
        assert_eq!(f.render_failed(t2), vec![UpdateDone]);
        assert_eq!(f.pending(), 0);
    }

    #[test]
    fn stale_and_duplicate_completions_are_ignored() {
        let mut f = with_surface();
        let t = token(&f.new_frame());
        assert_eq!(f.render_completed(t), vec![KeepRender]);
        // A second report of the same render cannot push pending below 0.
        assert!(f.render_completed(t).is_empty());
        assert!(f.render_failed(t).is_empty());
        assert_eq!(f.pending(), 0);
        assert_eq!(f.ui_update(), vec![Publish, UpdateDone]);
        let t = token(&f.new_frame());
        assert!(f.ui_update().is_empty());
        assert_eq!(f.reset(), vec![UpdateDone]);
        assert!(f.render_completed(t).is_empty(), "render from before reset");
        assert_eq!(f.surface_size(), Some((800, 600)));
        token(&f.new_frame());
    }

    #[test]
    fn pending_stays_in_bounds_under_any_event_order() {
        // Every sequence of up to 7 events from a small alphabet.
        fn walk(f: &FrameState, inflight: &[RenderToken], depth: u32, waiting: bool) {
            assert!(f.pending() <= 2);
            assert!(inflight.len() <= 1, "two renders in flight");
            if depth == 0 {
                return;
            }
            for ev in 0..5 {
                let mut g = f.clone();
                let mut fl = inflight.to_vec();
                let mut w = waiting;
                let acts = match ev {
                    0 => g.new_frame(),
                    1 => match fl.pop() {
                        Some(t) => g.render_completed(t),
                        None => vec![],
                    },
                    2 => match fl.pop() {
                        Some(t) => g.render_failed(t),
                        None => vec![],
                    },
                    3 => {
                        if w {
                            vec![]
                        } else {
                            w = true;
                            g.ui_update()
                        }
                    }
                    _ => g.mode_changed(640 + depth, 480),
                };
                for a in &acts {
                    match a {
                        StartRender(t) => fl.push(*t),
                        UpdateDone => {
                            assert!(w, "update done without a request");
                            w = false;
                        }
                        _ => {}
                    }
                }
                // A waiting UI is never forgotten: once nothing is pending
                // it must have been answered.
                assert!(!(w && g.pending() == 0), "UI left waiting");
                walk(&g, &fl, depth - 1, w);
            }
        }
        walk(&with_surface(), &[], 7, false);
    }
}
