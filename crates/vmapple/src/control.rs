//! The control socket of a running VM (`bundle::control` speaks the
//! protocol; this maps requests onto the machine) and `vmapple ctl`, its
//! command-line client.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::time::Duration;

use bundle::control::{
    Button, ControlHandler, ControlServer, ErrorClass, Event, EventKind, Request, Response,
    RunState,
};
use clap::Args;

use crate::error::Error;
use display::Display;
use machine::handle::{MachineEvent, MachineHandle};

/// How long a screenshot waits for the display to render the frame.
const SCREENSHOT_TIMEOUT: Duration = Duration::from_secs(5);

/// Input a control client sends into the guest (keyboard and tablet).
pub trait InputTarget: Send + Sync {
    fn send_keys(&self, keys: &[String]) -> Result<(), String>;
    fn pointer(&self, x: u16, y: u16, buttons: &[Button]) -> Result<(), String>;
}

struct MachineControl {
    machine: MachineHandle,
    input: Option<Arc<dyn InputTarget>>,
    screen: Option<Arc<Display>>,
}

impl ControlHandler for MachineControl {
    fn handle(&self, req: Request) -> Response {
        tracing::debug!(command = req.name(), "control request");
        match req {
            Request::Status => Response::status(if self.machine.is_paused() {
                RunState::Paused
            } else {
                RunState::Running
            }),
            Request::Pause => {
                self.machine.pause();
                Response::ok()
            }
            Request::Resume => {
                self.machine.resume();
                Response::ok()
            }
            Request::Powerdown => {
                self.machine.power_button();
                Response::ok()
            }
            Request::Stop => {
                self.machine.stop();
                Response::ok()
            }
            Request::Reset => {
                self.machine.reset();
                Response::ok()
            }
            Request::SendKeys { keys } => match &self.input {
                Some(input) => result(input.send_keys(&keys)),
                None => no_input(),
            },
            Request::Pointer { x, y, buttons } => match &self.input {
                Some(input) => result(input.pointer(x, y, &buttons)),
                None => no_input(),
            },
            Request::Screenshot { path, head } => match &self.screen {
                Some(screen) => match screen.screenshot_png(
                    usize::from(head),
                    &path,
                    SCREENSHOT_TIMEOUT,
                ) {
                    Ok(()) => Response::ok(),
                    Err(e) => Response::error(ErrorClass::Failed, format!("screenshot: {e}")),
                },
                None => Response::error(
                    ErrorClass::Unsupported,
                    "this VM has no display (--gpu virtio gives one on any host; apple-gfx needs ParavirtualizedGraphics on a macOS host)",
                ),
            },
            Request::Save {
                path,
                stop,
                with_disks,
            } => match self.machine.save(path, stop, with_disks) {
                Ok(_) => Response::ok(),
                Err(e @ machine::snapshot::SnapshotError::Unsupported(_)) => {
                    Response::error(ErrorClass::Unsupported, vm_core::error_chain::Chain(&e).to_string())
                }
                Err(e) => Response::error(
                    ErrorClass::Failed,
                    format!("save: {}", vm_core::error_chain::Chain(&e)),
                ),
            },
            // The server answers subscriptions itself.
            Request::Subscribe => Response::ok(),
        }
    }
}

fn result(r: Result<(), String>) -> Response {
    match r {
        Ok(()) => Response::ok(),
        Err(e) => Response::error(ErrorClass::Failed, e),
    }
}

fn no_input() -> Response {
    Response::error(
        ErrorClass::Unsupported,
        "this VM has no USB keyboard or tablet (run it without --no-usb)",
    )
}

/// The control socket and the thread forwarding machine events to it.
/// Dropping it delivers the events already published (the run's last one,
/// `powered-off`, included), then closes the socket and removes its file,
/// before the process goes on to exit.
pub struct Control {
    server: Option<Arc<ControlServer>>,
    done: Arc<AtomicBool>,
    events: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Control {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Release);
        if let Some(thread) = self.events.take() {
            let _ = thread.join();
        }
        // The thread's clone is gone, so this is the last reference: the
        // server shuts down here, not at some point after exit began.
        self.server.take();
    }
}

fn event_line(event: MachineEvent) -> Option<Event> {
    let kind = match event {
        MachineEvent::GuestPanicked { .. } => EventKind::GuestPanicked,
        MachineEvent::GuestCrashLoaded => EventKind::CrashLoaded,
        MachineEvent::Paused => EventKind::Paused,
        MachineEvent::Resumed => EventKind::Resumed,
        MachineEvent::Reset => EventKind::Reset,
        MachineEvent::Stopped { .. } => EventKind::PoweredOff,
        MachineEvent::PowerButton => return None,
        MachineEvent::Saving { .. } => EventKind::Saving,
        MachineEvent::Saved { .. } => EventKind::Saved,
        MachineEvent::Restored { .. } => EventKind::Restored,
    };
    let mut e = Event::now(kind);
    if let MachineEvent::GuestPanicked { action } = event {
        e.data = Some(serde_json::json!({ "action": action }));
    }
    if let MachineEvent::Saving { path }
    | MachineEvent::Saved { path }
    | MachineEvent::Restored { path } = &event
    {
        e.data = Some(serde_json::json!({ "path": path }));
    }
    if let MachineEvent::Stopped { reason } = event {
        e.data = Some(serde_json::json!({ "reason": reason }));
    }
    Some(e)
}

/// Serves the control socket at `path` until the returned value drops.
pub fn serve(
    path: &Path,
    machine: MachineHandle,
    input: Option<Arc<dyn InputTarget>>,
    screen: Option<Arc<Display>>,
) -> crate::error::Result<Control> {
    let events = machine.subscribe();
    let handler = Arc::new(MachineControl {
        machine,
        input,
        screen,
    });
    let server = Arc::new(
        ControlServer::bind(path, handler).map_err(|source| Error::Path {
            path: path.to_path_buf(),
            source,
        })?,
    );
    tracing::info!("control socket at {}", path.display());
    let forward = server.clone();
    let done = Arc::new(AtomicBool::new(false));
    let finished = done.clone();
    let thread = std::thread::Builder::new()
        .name("control-events".into())
        .spawn(move || loop {
            // The machine's event bus outlives the run, so the channel
            // does not disconnect when the VM stops: poll for the drop.
            match events.recv_timeout(Duration::from_millis(50)) {
                Ok(event) => {
                    if let Some(e) = event_line(event) {
                        forward.broadcast(&e);
                    }
                }
                Err(RecvTimeoutError::Timeout) if !finished.load(Ordering::Acquire) => {}
                Err(_) => break,
            }
        })
        .map_err(|source| Error::Host {
            what: "cannot start the control thread",
            source,
        })?;
    Ok(Control {
        server: Some(server),
        done,
        events: Some(thread),
    })
}

#[derive(Args, Debug)]
pub struct CtlArgs {
    /// The VM: a bundle name or path, or the path of a control socket.
    #[arg(value_name = "VM")]
    pub vm: PathBuf,

    /// status, pause, resume, powerdown, stop, reset,
    /// `send-keys KEY...` (QEMU key names, pressed together),
    /// `pointer X Y [BUTTON...]` (0..32767), `screenshot PATH [--head N]`,
    /// `save PATH [--stop] [--with-disks]` (a snapshot; `--stop` stops the
    /// VM once it is written; `--with-disks` also copies the writable
    /// disks beside it, copy-on-write where the filesystem can), or `events` (print events until the VM stops).
    #[arg(value_name = "COMMAND", num_args = 1.., required = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

/// The control socket of `vm`, and the bundle's name when `vm` is a
/// bundle.
fn socket_of(vm: &Path) -> crate::error::Result<(PathBuf, Option<String>)> {
    use std::os::unix::fs::FileTypeExt;
    if std::fs::metadata(vm).is_ok_and(|m| m.file_type().is_socket()) {
        return Ok((vm.to_path_buf(), None));
    }
    let bundle = bundle::Bundle::open(vm)?;
    Ok((bundle.control_socket_path(), Some(bundle.name())))
}

/// Connecting failed: for a bundle whose socket is missing or dead, the
/// VM is simply not running, which is what the user needs to hear.
fn connect_error(e: bundle::control::ClientError, bundle: Option<&str>) -> Error {
    use std::io::ErrorKind;
    match (&e, bundle) {
        (bundle::control::ClientError::Io { source, .. }, Some(name))
            if matches!(
                source.kind(),
                ErrorKind::NotFound | ErrorKind::ConnectionRefused
            ) =>
        {
            Error::usage(format!(
                "bundle {name} is not running (start it with `vmapple run {name}`)"
            ))
        }
        _ => Error::Control(e),
    }
}

/// Builds the request line from `vmapple ctl`'s words; the VM validates it
/// again.
fn request_from_words(words: &[String]) -> crate::error::Result<Request> {
    let (cmd, rest) = words
        .split_first()
        .ok_or_else(|| Error::usage("no command given"))?;
    let json = match (cmd.as_str(), rest) {
        ("events", []) => serde_json::json!({ "cmd": "subscribe" }),
        ("send-keys", keys) if !keys.is_empty() => {
            serde_json::json!({ "cmd": "send-keys", "keys": keys })
        }
        ("pointer", [x, y, buttons @ ..]) => {
            let coordinate = |v: &str| {
                v.parse::<u16>().map_err(|_| {
                    Error::usage(format!("pointer coordinate {v:?} is not a number 0..32767"))
                })
            };
            serde_json::json!({
                "cmd": "pointer", "x": coordinate(x)?, "y": coordinate(y)?, "buttons": buttons
            })
        }
        ("save", [path, flags @ ..])
            if flags.iter().all(|f| f == "--stop" || f == "--with-disks") =>
        {
            let path = std::path::absolute(path).map_err(|source| Error::Path {
                path: path.into(),
                source,
            })?;
            let has = |flag: &str| flags.iter().any(|f| f == flag);
            serde_json::json!({
                "cmd": "save", "path": path, "stop": has("--stop"), "with_disks": has("--with-disks")
            })
        }
        ("screenshot", [path]) | ("screenshot", [path, _, _]) => {
            let head = match rest {
                [_, flag, n] if flag == "--head" => n.parse::<u8>().map_err(|_| {
                    Error::usage(format!("screenshot --head {n:?}: not a head number"))
                })?,
                [_] => 0,
                _ => return Err(Error::usage("screenshot PATH [--head N]")),
            };
            let path = std::path::absolute(path).map_err(|source| Error::Path {
                path: path.into(),
                source,
            })?;
            serde_json::json!({ "cmd": "screenshot", "path": path, "head": head })
        }
        (cmd, []) => serde_json::json!({ "cmd": cmd }),
        (cmd, _) => return Err(Error::usage(format!("unexpected arguments after {cmd:?}"))),
    };
    // Every arm above builds an object.
    let obj = match json {
        serde_json::Value::Object(obj) => obj,
        _ => serde_json::Map::new(),
    };
    Ok(bundle::control::request_from_object(obj)?)
}

pub fn ctl(args: CtlArgs) -> crate::error::Result<u8> {
    let (socket, bundle) = socket_of(&args.vm)?;
    let request = request_from_words(&args.command)?;
    let mut client = bundle::control::Client::connect(&socket)
        .map_err(|e| connect_error(e, bundle.as_deref()))?;
    if matches!(request, Request::Save { .. }) {
        // A save of a large VM takes as long as writing its memory.
        client.set_timeout(None)?;
    }
    let response = client.call(&request)?;
    print!("{}", response.to_line());
    if !response.is_ok() {
        return Ok(crate::status::HOST_ERROR);
    }
    if request == Request::Subscribe {
        client.set_timeout(None)?;
        loop {
            match client.next_event() {
                Ok(event) => {
                    print!("{}", event.to_line());
                    if event.kind == EventKind::PoweredOff {
                        break;
                    }
                }
                Err(bundle::control::ClientError::Closed { .. }) => break,
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(crate::status::POWERED_OFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(w: &[&str]) -> Vec<String> {
        w.iter().map(|s| s.to_string()).collect()
    }

    /// The smallest machine: one CPU, a 16-byte ROM written into `dir`, no
    /// USB.
    fn bare_config(dir: &Path) -> machine::MachineConfig {
        let rom = dir.join("rom.bin");
        std::fs::write(&rom, [0u8; 16]).unwrap();
        let mut config = machine::MachineConfig::new(
            1,
            machine::MIN_RAM,
            machine::BootSource::Firmware(rom),
            devices::serial::SerialBackend::None,
        );
        config.usb = false;
        config
    }

    /// A machine whose display is the core's fake framework, serving its
    /// control socket; the fake and the socket path come back too.
    fn machine_with_fake_display(
        dir: &Path,
    ) -> (
        machine::Machine,
        apple_gfx::fake::FakeFramework,
        Control,
        PathBuf,
    ) {
        use apple_gfx::fake::{FakeFramework, FakeVaSpace, FAKE_PAGE};
        let mut config = bare_config(dir);
        config.display = Some(machine::display::DisplayConfig::default());
        let fake = FakeFramework::new(apple_gfx::MemoryInterface::Tasks);
        let backend = machine::display::GfxBackend {
            framework: Arc::new(fake.clone()),
            va_space: Arc::new(FakeVaSpace::new()),
            page_size: FAKE_PAGE,
            executor: Arc::new(apple_gfx::ThreadExecutor),
        };
        let m = machine::Machine::new(config, Some(backend)).unwrap();
        let socket = dir.join("control.sock");
        let control = serve(&socket, m.handle(), None, m.screen()).unwrap();
        (m, fake, control, socket)
    }

    fn screenshot(socket: &Path, png: &Path) -> Response {
        bundle::control::call(
            socket,
            &Request::Screenshot {
                path: png.to_path_buf(),
                head: 0,
            },
        )
        .unwrap()
    }

    #[test]
    fn screenshot_over_the_control_socket_writes_the_guest_frame() {
        let dir = tempfile::tempdir().unwrap();
        let (_machine, fake, _control, socket) = machine_with_fake_display(dir.path());
        let png = dir.path().join("shot.png");
        match screenshot(&socket, &png) {
            Response::Error { class, desc } => {
                assert_eq!(class, ErrorClass::Failed);
                assert!(desc.contains("not shown anything"), "{desc}");
            }
            ok => panic!("a display without a mode gave {ok:?}"),
        }
        assert!(!png.exists());
        fake.guest_mode_change(640, 480);
        fake.guest_new_frame();
        assert!(screenshot(&socket, &png).is_ok());
        let bytes = std::fs::read(&png).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        // IHDR: width and height.
        assert_eq!(&bytes[16..24], &[0, 0, 2, 128, 0, 0, 1, 224]);
    }

    #[test]
    fn screenshot_without_a_display_is_unsupported() {
        let dir = tempfile::tempdir().unwrap();
        let m = machine::Machine::new(bare_config(dir.path()), None).unwrap();
        let socket = dir.path().join("control.sock");
        let _control = serve(&socket, m.handle(), None, m.screen()).unwrap();
        let r = screenshot(&socket, &dir.path().join("x.png"));
        assert!(
            matches!(&r, Response::Error { class: ErrorClass::Unsupported, desc } if desc.contains("no display")),
            "{r:?}"
        );
    }

    #[test]
    fn ctl_words_become_valid_requests() {
        for (w, want) in [
            (words(&["status"]), Request::Status),
            (words(&["events"]), Request::Subscribe),
            (
                words(&["send-keys", "ctrl", "a"]),
                Request::SendKeys {
                    keys: words(&["ctrl", "a"]),
                },
            ),
        ] {
            assert_eq!(request_from_words(&w).unwrap(), want);
        }
        assert!(matches!(
            request_from_words(&words(&["pointer", "100", "200", "left"])).unwrap(),
            Request::Pointer { x: 100, y: 200, .. }
        ));
        let e = request_from_words(&words(&["send-keys", "nope"])).unwrap_err();
        assert!(e.to_string().contains("unknown key \"nope\""), "{e}");
        assert!(request_from_words(&words(&["pointer", "x", "1"])).is_err());
        assert!(request_from_words(&words(&["status", "now"])).is_err());
        assert!(request_from_words(&[]).is_err());
    }

    #[test]
    fn save_takes_stop_and_with_disks_in_any_order() {
        let save = |w: &[&str]| match request_from_words(&words(w)) {
            Ok(Request::Save {
                path,
                stop,
                with_disks,
            }) => Some((path.is_absolute(), stop, with_disks)),
            _ => None,
        };
        assert_eq!(save(&["save", "v.snap"]), Some((true, false, false)));
        assert_eq!(
            save(&["save", "/v.snap", "--with-disks", "--stop"]),
            Some((true, true, true))
        );
        assert_eq!(
            save(&["save", "/v.snap", "--with-disks"]),
            Some((true, false, true))
        );
        assert_eq!(save(&["save", "/v.snap", "--disks"]), None);
        // Older clients send no with_disks.
        let r =
            bundle::control::parse_request(br#"{"cmd":"save","path":"/v","stop":true}"#).unwrap();
        assert!(matches!(
            r,
            Request::Save {
                with_disks: false,
                stop: true,
                ..
            }
        ));
    }
}
