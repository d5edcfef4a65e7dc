//! The board's fixed devices (vmapple-machine.md §2, §3): GIC, PL011,
//! backdoor block interface, PL031, PL061 with the power key, pvpanic and
//! the AES engine, each attached to the registry at its address.

use std::sync::Arc;
use std::time::Duration;

use accel::{StopReason, VmControl};
use arch_arm64::timer::{Counter, COUNTER_HZ};
use devices::apple_aes::AppleAes;
use devices::apple_bdif::Bdif;
use devices::avp_rtc::AvpRtc;
use devices::clock::{Clock, HostClock, TimerThread};
use devices::pl011::Pl011;
use devices::pl031::Pl031;
use devices::pl061::Pl061;
use devices::power_button::PowerButton;
use devices::pvpanic::{PanicEvents, PvPanic};
use devices::serial::SerialHandle;
use gic::GicV3;
use vm_core::GuestRam;

use crate::handle::{EventBus, MachineEvent};
use crate::layout::*;
use crate::registry::{Attachment, Registry, RegistryError};
use crate::{Disks, MachineConfig, MachineError, PanicPolicy};

/// What every construction step shares.
pub(crate) struct Core {
    pub memory: GuestRam,
    pub gic: Arc<GicV3>,
    pub control: Arc<VmControl>,
    pub counter: Arc<Counter>,
    pub events: Arc<EventBus>,
}

/// What the machine keeps of its platform devices besides the registry.
pub(crate) struct Platform {
    pub power_button: Arc<PowerButton>,
    /// Threads that fire the RTC alarm and end the power button's pulse.
    pub timers: Vec<TimerThread>,
    pub serial: SerialHandle,
}

/// Attaches the board's fixed devices.
pub(crate) fn attach(
    reg: &mut Registry,
    core: &Core,
    config: &MachineConfig,
    disks: &Disks,
) -> Result<Platform, MachineError> {
    let gic = &core.gic;
    reg.attach("gic", |_| {
        let attachment = Attachment::new(gic.clone())
            .mmio("gic-distributor", GICD_BASE, GICD_SIZE, gic.distributor())
            .mmio(
                "gic-redistributors",
                GICR_BASE,
                GICR_SIZE,
                gic.redistributors(),
            );
        if config.msi && gic.enable_message_spis(SPI_MSI_BASE, MSI_SPIS) {
            return Ok(attachment.mmio("gic-v2m", GIC_V2M_BASE, GIC_V2M_SIZE, gic.v2m_frame()));
        }
        Ok(attachment)
    })?;

    let mut serial = None;
    reg.attach("pl011", |wires| {
        let quit_control = core.control.clone();
        let (uart, handle) =
            devices::serial::connect(&config.serial, wires.spi(SPI_UART), move || {
                tracing::info!("console escape: stopping the VM");
                quit_control.request_stop(StopReason::HostStop)
            })?;
        serial = Some(handle);
        Ok(Attachment::new(uart.clone()).mmio("pl011", UART_BASE, Pl011::SIZE, uart))
    })?;
    let serial = serial.ok_or(RegistryError::NotBuilt("pl011"))?;

    reg.attach("bdif", |_| {
        let bdif = Arc::new(Bdif::new(
            core.memory.clone(),
            disks.root.clone(),
            disks.aux.clone(),
        ));
        Ok(Attachment::new(bdif.clone()).mmio("bdif", BDIF_BASE, BDIF_SIZE, bdif))
    })?;

    let rtc = reg.attach("pl031", |wires| {
        let rtc = Pl031::new(wires.spi(SPI_RTC), Arc::new(HostClock::new()));
        Ok(Attachment::new(rtc.clone()).mmio("pl031", RTC_BASE, RTC_SIZE, rtc))
    })?;
    // Its line is wired but never raised (devices::avp_rtc).
    reg.attach("avp-rtc", |wires| {
        let _line = wires.spi(SPI_AVP_RTC);
        let rtc = AvpRtc::new(Arc::new(HostClock::new()));
        Ok(Attachment::new(rtc.clone()).mmio("avp-rtc", AVP_RTC_BASE, AvpRtc::SIZE, rtc))
    })?;
    let gpio = reg.attach("pl061", |wires| {
        let gpio = Pl061::new(wires.spi(SPI_GPIO));
        Ok(Attachment::new(gpio.clone()).mmio("pl061", GPIO_BASE, GPIO_SIZE, gpio))
    })?;
    let virtual_clock: Arc<dyn Clock> = Arc::new(VirtualClock(core.counter.clone()));
    // Drives a PL061 line, not the GIC, and has no registers: only its
    // pulse to cancel at reset.
    let power_button = reg.attach("power-button", |_| {
        Ok(Attachment::new(PowerButton::new(
            gpio.clone(),
            virtual_clock.clone(),
        )))
    })?;
    reg.attach("pvpanic", |_| {
        let pvpanic = PvPanic::new(Arc::new(PanicActions {
            policy: config.on_panic,
            control: core.control.clone(),
            counter: core.counter.clone(),
            events: core.events.clone(),
        }));
        Ok(Attachment::new(pvpanic.clone()).mmio("pvpanic", PVPANIC_BASE, PVPANIC_SIZE, pvpanic))
    })?;
    reg.attach("aes", |wires| {
        let aes = AppleAes::new(
            core.memory.clone(),
            wires.spi(SPI_AES),
            config.aes_fifo_on_reset,
        );
        Ok(Attachment::new(aes.clone())
            .mmio("aes", AES1_BASE, AES_WINDOW_SIZE, aes.window1())
            .mmio("aes-2", AES2_BASE, AES_WINDOW_SIZE, aes.window2()))
    })?;

    let timer = |name: &str, clock: Arc<dyn Clock>, target, max_sleep| {
        TimerThread::spawn(name, clock, target, max_sleep).map_err(|source| MachineError::Thread {
            name: name.to_owned(),
            source,
        })
    };
    let timers = vec![
        timer(
            "rtc-alarm",
            Arc::new(HostClock::new()),
            rtc,
            Duration::from_secs(1),
        )?,
        // Virtual time may stop (pause): re-read it often.
        timer(
            "power-button",
            virtual_clock,
            power_button.clone(),
            Duration::from_millis(10),
        )?,
    ];
    Ok(Platform {
        power_button,
        timers,
        serial,
    })
}

/// The VM's virtual time (the generic timer's count, which stops while
/// the VM is paused) as a device clock: the power button's 100 ms pulse
/// is measured in it (§13.3).
struct VirtualClock(Arc<Counter>);

impl Clock for VirtualClock {
    fn now_ns(&self) -> u64 {
        let ticks = u128::from(self.0.now());
        u64::try_from(ticks * 1_000_000_000 / u128::from(COUNTER_HZ)).unwrap_or(u64::MAX)
    }
}

/// pvpanic's events, acted on as `--on-panic` says.
struct PanicActions {
    policy: PanicPolicy,
    control: Arc<VmControl>,
    counter: Arc<Counter>,
    events: Arc<EventBus>,
}

impl PanicEvents for PanicActions {
    fn guest_panicked(&self) {
        // The guest can write pvpanic as often as it likes.
        vm_core::log_limited!(
            error,
            "guest panicked (pvpanic); --on-panic {}",
            self.policy.name()
        );
        match self.policy {
            PanicPolicy::Exit => self.control.request_stop(StopReason::GuestPanic),
            PanicPolicy::Pause => {
                self.counter.pause();
                self.control.pause();
                vm_core::log_limited!(warn, "VM paused after the guest panic");
            }
            PanicPolicy::Continue => {}
            PanicPolicy::Reset => self.control.request_stop(StopReason::Reset),
        }
        self.events.publish(MachineEvent::GuestPanicked {
            action: self.policy.name(),
        });
    }

    fn guest_crash_loaded(&self) {
        vm_core::log_limited!(
            warn,
            "guest reports a crash-loaded event (pvpanic): its crash kernel runs"
        );
        self.events.publish(MachineEvent::GuestCrashLoaded);
    }

    fn guest_shutdown(&self) {
        vm_core::log_limited!(info, "guest asked for an orderly shutdown (pvpanic)");
        self.control.request_stop(StopReason::PowerOff);
    }
}
