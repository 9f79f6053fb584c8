//! The device model: what every device of the platform implements, so that the
//! [`Devices`](crate::Devices) registry can route, clock, interrupt-wire and save it without
//! knowing what it is.
//!
//! A device is a [`Device`] (its port and MMIO ranges, access handlers, virtual-time hook,
//! requests to the VMM) and a [`Persist`] (its saved state, in the style of Firecracker's
//! `Persist` trait). [`Persist`] has an associated state type, so it is not object safe; the
//! registry reaches it through [`PersistDyn`], which every [`Persist`] type gets for free.
//!
//! Interrupts: a device drives its interrupt request lines through the [`DeviceContext`] it
//! is handed on every call ([`DeviceContext::set_irq`] for a level, [`DeviceContext::pulse_irq`]
//! for an edge). The lines go to the interrupt controller (the 8259A pair today), which
//! latches rising edges. A device must report its line levels after every call that may
//! change them; the level a device reports from its first [`Device::advance_to`] is its
//! power-on level and latches nothing.

use std::any::Any;
use std::error::Error as StdError;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::bus::AccessMode;

/// What a device's access handler did with an access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// The device answered it.
    Handled,
    /// Not the device's: the bus treats it as unclaimed (reads all-ones, writes dropped,
    /// both counted in the bus diagnostics).
    NotMine,
}

/// Where a device's interrupt request lines go: the interrupt controller.
pub trait IrqSink {
    /// Drive input `irq` to `level`. An edge-triggered input latches a request on a rising
    /// edge. Inputs the controller does not have are ignored.
    fn set_level(&mut self, irq: u8, level: bool);
}

/// What a device is handed on every call: the virtual time and its interrupt lines.
pub struct DeviceContext<'a> {
    now_ns: u64,
    irqs: &'a mut dyn IrqSink,
}

impl<'a> DeviceContext<'a> {
    /// A context at virtual time `now_ns` whose interrupt lines go to `irqs`.
    pub fn new(now_ns: u64, irqs: &'a mut dyn IrqSink) -> Self {
        Self { now_ns, irqs }
    }

    /// Virtual time of the call, in ns.
    pub fn now_ns(&self) -> u64 {
        self.now_ns
    }

    /// Drive interrupt line `irq` to `level`.
    pub fn set_irq(&mut self, irq: u8, level: bool) {
        self.irqs.set_level(irq, level);
    }

    /// An edge on line `irq` (low, high, low): a pulse-style interrupt such as COM1's.
    pub fn pulse_irq(&mut self, irq: u8) {
        self.irqs.set_level(irq, false);
        self.irqs.set_level(irq, true);
        self.irqs.set_level(irq, false);
    }
}

/// A range of I/O ports a device claims.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRegion {
    /// First port.
    pub base: u16,
    /// Number of ports (at least 1; the range must end at or below port 0xffff).
    pub len: u32,
    /// How wider accesses reach the device.
    pub mode: AccessMode,
}

impl PortRegion {
    /// `len` byte-wide registers from `base`: wide accesses are split into byte accesses.
    pub const fn bytewise(base: u16, len: u32) -> Self {
        Self {
            base,
            len,
            mode: AccessMode::Bytewise,
        }
    }

    /// `len` ports from `base` that take 1-, 2- and 4-byte accesses whole.
    pub const fn whole(base: u16, len: u32) -> Self {
        Self {
            base,
            len,
            mode: AccessMode::Whole,
        }
    }
}

/// A range of guest-physical addresses a device claims for MMIO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioRegion {
    /// First address.
    pub base: u64,
    /// Length in bytes (at least 1; the range must not wrap).
    pub len: u64,
}

/// Which of the registry's run-loop calls a device needs. The VMM's loop makes them on every
/// exit, so a device that has no use for one says so and is left out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hooks {
    /// [`Device::advance_to`] and [`Device::next_deadline_ns`]: the device has timers, or
    /// interrupt requests raised outside its own accesses.
    pub clock: bool,
    /// [`Device::take_exit_request`] and [`Device::take_reset_request`]: the device can ask
    /// the VMM to stop or reset the machine.
    pub requests: bool,
}

impl Hooks {
    /// Every call (the default: right for any device).
    pub const ALL: Hooks = Hooks {
        clock: true,
        requests: true,
    };
    /// No call: a device that only answers its accesses.
    pub const NONE: Hooks = Hooks {
        clock: false,
        requests: false,
    };
    /// The clock calls only.
    pub const CLOCK: Hooks = Hooks {
        clock: true,
        requests: false,
    };
    /// The request calls only.
    pub const REQUESTS: Hooks = Hooks {
        clock: false,
        requests: true,
    };
}

/// A device of the platform. Every method but [`Device::id`] has a default, so a device
/// implements what it uses: a port-only device never sees MMIO, a device without timers
/// never sets a deadline.
///
/// Handlers get the device's own range base and the offset in it, so a device with several
/// ranges (the PIT owns 0x40-0x43 and 0x61) tells them apart. Guest input is arbitrary: a
/// handler must accept any offset, width and value without panicking.
pub trait Device: AsAny + PersistDyn + Send {
    /// Stable name of this device instance, the key of its saved state (e.g. `"rtc"`). Ids
    /// are unique within a registry.
    fn id(&self) -> &str;

    /// The I/O port ranges the device claims (read once, at registration).
    fn port_regions(&self) -> Vec<PortRegion> {
        Vec::new()
    }

    /// The MMIO ranges the device claims (read once, at registration).
    fn mmio_regions(&self) -> Vec<MmioRegion> {
        Vec::new()
    }

    /// Which run-loop calls the device needs (read once, at registration). The default is
    /// all of them; a device turns off what it does not use, for speed.
    fn hooks(&self) -> Hooks {
        Hooks::ALL
    }

    /// Guest `IN` at `offset` in the range starting at port `base`: fill `data` (1 byte for
    /// [`AccessMode::Bytewise`] ranges; 1, 2 or 4 for whole ones).
    fn io_read(
        &mut self,
        base: u16,
        offset: u16,
        data: &mut [u8],
        cx: &mut DeviceContext<'_>,
    ) -> Access {
        let _ = (base, offset, data, cx);
        Access::NotMine
    }

    /// Guest `OUT` of `data` (little-endian) at `offset` in the range starting at `base`.
    fn io_write(
        &mut self,
        base: u16,
        offset: u16,
        data: &[u8],
        cx: &mut DeviceContext<'_>,
    ) -> Access {
        let _ = (base, offset, data, cx);
        Access::NotMine
    }

    /// Guest MMIO read of `data.len()` bytes at `offset` in the region starting at `base`.
    fn mmio_read(
        &mut self,
        base: u64,
        offset: u64,
        data: &mut [u8],
        cx: &mut DeviceContext<'_>,
    ) -> Access {
        let _ = (base, offset, data, cx);
        Access::NotMine
    }

    /// Guest MMIO write of `data` (little-endian) at `offset` in the region at `base`.
    fn mmio_write(
        &mut self,
        base: u64,
        offset: u64,
        data: &[u8],
        cx: &mut DeviceContext<'_>,
    ) -> Access {
        let _ = (base, offset, data, cx);
        Access::NotMine
    }

    /// Bring the device to virtual time `now_ns` (never earlier than before) and report its
    /// interrupt line levels. Called with the vCPU's time before every access and before
    /// the VMM looks for interrupts.
    fn advance_to(&mut self, now_ns: u64, cx: &mut DeviceContext<'_>) {
        let _ = (now_ns, cx);
    }

    /// Virtual time (ns, after the device's current time) of the next event that can change
    /// an interrupt line, if one is scheduled: the VMM runs the vCPU no further than this.
    fn next_deadline_ns(&self) -> Option<u64> {
        None
    }

    /// An exit status the guest asked the VMM to stop with, if any (clears the request).
    /// Requests are latched during calls into the device (an access, `advance_to`); the
    /// registry asks after such calls, if [`Hooks::requests`] is set.
    fn take_exit_request(&mut self) -> Option<u8> {
        None
    }

    /// Whether the guest asked for a CPU reset (clears the request).
    fn take_reset_request(&mut self) -> bool {
        false
    }
}

/// `Any` access to a device, for typed lookups in the registry. Every `'static` type has it.
pub trait AsAny: Any {
    /// `self` as `&dyn Any`.
    fn as_any(&self) -> &dyn Any;
    /// `self` as `&mut dyn Any`.
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

impl<T: Any> AsAny for T {
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// Save and restore of one device, in the style of Firecracker's `Persist`: the state is a
/// plain serde type, versioned by [`Persist::STATE_VERSION`].
///
/// Restoring happens in place, so a device keeps what is not guest state (COM1 keeps its
/// output writer). State types must serialise to JSON (plain data; maps with string keys).
pub trait Persist {
    /// The saved state.
    type State: Serialize + DeserializeOwned;
    /// Why a state cannot be restored (`std::convert::Infallible` if it always can).
    type Error: StdError + Send + Sync + 'static;
    /// Version of [`Persist::State`]: bump it whenever the state changes shape or meaning;
    /// a saved state of another version is refused with a message naming the device.
    const STATE_VERSION: u32;

    /// The device's state.
    fn save(&self) -> Self::State;

    /// Put the device in `state`. On error the device is unchanged.
    fn restore(&mut self, state: &Self::State) -> Result<(), Self::Error>;
}

/// One device's saved state as the registry stores it: the version and the state as JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedDevice {
    /// The device's [`Persist::STATE_VERSION`] when it was saved.
    pub version: u32,
    /// The device's [`Persist::State`], as JSON.
    pub state: serde_json::Value,
}

/// Why a saved device state cannot be restored.
#[derive(Debug, Error)]
pub enum StateError {
    /// The state is not this device's state type.
    #[error("the saved state cannot be decoded: {0}")]
    Decode(#[source] serde_json::Error),
    /// The device refuses the state.
    #[error("the saved state is invalid: {0}")]
    Invalid(#[source] Box<dyn StdError + Send + Sync>),
}

/// The object-safe face of [`Persist`], implemented for every [`Persist`] type.
pub trait PersistDyn {
    /// [`Persist::STATE_VERSION`].
    fn state_version(&self) -> u32;
    /// [`Persist::save`], as JSON.
    fn save_state(&self) -> SavedDevice;
    /// Decode `saved` and [`Persist::restore`] it (the version is the caller's to check).
    /// On error the device is unchanged.
    fn restore_state(&mut self, saved: &SavedDevice) -> Result<(), StateError>;
}

impl<T: Persist> PersistDyn for T {
    fn state_version(&self) -> u32 {
        T::STATE_VERSION
    }

    fn save_state(&self) -> SavedDevice {
        let state = match serde_json::to_value(self.save()) {
            Ok(v) => v,
            // Only a state type that breaks the documented rule (maps with non-string keys)
            // gets here; the restore then fails with this message instead of a panic now.
            Err(e) => serde_json::Value::String(format!("state not representable as JSON: {e}")),
        };
        SavedDevice {
            version: T::STATE_VERSION,
            state,
        }
    }

    fn restore_state(&mut self, saved: &SavedDevice) -> Result<(), StateError> {
        let state: T::State =
            serde_json::from_value(saved.state.clone()).map_err(StateError::Decode)?;
        self.restore(&state)
            .map_err(|e| StateError::Invalid(Box::new(e)))
    }
}

/// Records the last level each line was driven to, for the power-on levels of devices.
#[derive(Debug, Default)]
pub(crate) struct LevelRecorder {
    pub(crate) levels: Vec<(u8, bool)>,
}

impl IrqSink for LevelRecorder {
    fn set_level(&mut self, irq: u8, level: bool) {
        self.levels.retain(|(i, _)| *i != irq);
        self.levels.push((irq, level));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Log(Vec<(u8, bool)>);
    impl IrqSink for Log {
        fn set_level(&mut self, irq: u8, level: bool) {
            self.0.push((irq, level));
        }
    }

    #[test]
    fn context_pulses_are_edges() {
        let mut log = Log::default();
        let mut cx = DeviceContext::new(7, &mut log);
        assert_eq!(cx.now_ns(), 7);
        cx.pulse_irq(4);
        cx.set_irq(8, true);
        assert_eq!(log.0, [(4, false), (4, true), (4, false), (8, true)]);
        let mut rec = LevelRecorder::default();
        rec.set_level(0, false);
        rec.set_level(1, true);
        rec.set_level(0, true);
        assert_eq!(rec.levels, [(1, true), (0, true)]);
    }

    struct Counter(u32);
    #[derive(Debug, Error)]
    #[error("odd counts are refused")]
    struct Odd;
    impl Persist for Counter {
        type State = u32;
        type Error = Odd;
        const STATE_VERSION: u32 = 3;
        fn save(&self) -> u32 {
            self.0
        }
        fn restore(&mut self, state: &u32) -> Result<(), Odd> {
            if state % 2 == 1 {
                return Err(Odd);
            }
            self.0 = *state;
            Ok(())
        }
    }

    #[test]
    fn persist_dyn_round_trips_and_reports_errors() {
        let mut c = Counter(4);
        let saved = c.save_state();
        assert_eq!(saved.version, 3);
        assert_eq!(c.state_version(), 3);
        c.0 = 10;
        c.restore_state(&saved).unwrap();
        assert_eq!(c.0, 4);
        let bad = SavedDevice {
            version: 3,
            state: serde_json::json!("four"),
        };
        assert!(matches!(c.restore_state(&bad), Err(StateError::Decode(_))));
        let odd = SavedDevice {
            version: 3,
            state: serde_json::json!(5),
        };
        let e = c.restore_state(&odd).unwrap_err();
        assert!(e.to_string().contains("odd counts"), "{e}");
        assert!(e.source().is_some());
        assert_eq!(c.0, 4, "failed restores change nothing");
    }
}
