//! The debug-exit port (0xf4): the guest asks the VMM to stop the VM with an exit status.

use std::convert::Infallible;

use serde::{Deserialize, Serialize};

use crate::bus::PortIoDevice;
use crate::device::{Access, Device, DeviceContext, Hooks, Persist, PortRegion};

/// Port of the debug-exit device.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// Registry id of the debug-exit port.
pub const DEBUG_EXIT_ID: &str = "debug-exit";

pub(crate) fn le_value(data: &[u8]) -> u32 {
    data.iter()
        .take(4)
        .enumerate()
        .fold(0u32, |v, (i, b)| v | (u32::from(*b) << (8 * i)))
}

/// Saved state of the debug-exit port.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DebugExitState {
    /// Exit status requested by the guest and not yet taken by the VMM.
    pub pending: Option<u8>,
}

/// Port 0xf4: a guest write of value `v` (1, 2 or 4 bytes) asks the VMM to stop the VM with
/// exit status `v & 0xff`. The first request wins until the VMM takes it. Reads return
/// all-ones.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DebugExit {
    pending: Option<u8>,
}

impl DebugExit {
    /// No exit requested.
    pub fn new() -> Self {
        Self::default()
    }

    /// Guest write of `value`.
    pub fn write_value(&mut self, value: u32) {
        if self.pending.is_none() {
            self.pending = Some((value & 0xff) as u8);
        }
    }

    /// The requested exit status, if any; clears the request.
    pub fn take_exit_request(&mut self) -> Option<u8> {
        self.pending.take()
    }

    /// Whether an exit is requested (without clearing it).
    pub fn exit_requested(&self) -> Option<u8> {
        self.pending
    }

    /// Saved state.
    pub fn state(&self) -> DebugExitState {
        DebugExitState {
            pending: self.pending,
        }
    }

    /// Rebuild from saved state.
    pub fn from_state(state: &DebugExitState) -> Self {
        Self {
            pending: state.pending,
        }
    }
}

impl PortIoDevice for DebugExit {
    fn read(&mut self, _offset: u16, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, _offset: u16, data: &[u8]) {
        self.write_value(le_value(data));
    }
}

impl Persist for DebugExit {
    type State = DebugExitState;
    type Error = Infallible;
    const STATE_VERSION: u32 = 1;

    fn save(&self) -> DebugExitState {
        self.state()
    }

    fn restore(&mut self, state: &DebugExitState) -> Result<(), Infallible> {
        *self = Self::from_state(state);
        Ok(())
    }
}

/// Port 0xf4 on the platform, taking 1-, 2- and 4-byte writes whole.
impl Device for DebugExit {
    fn id(&self) -> &str {
        DEBUG_EXIT_ID
    }

    fn port_regions(&self) -> Vec<PortRegion> {
        vec![PortRegion::whole(DEBUG_EXIT_PORT, 1)]
    }

    fn hooks(&self) -> Hooks {
        Hooks::REQUESTS
    }

    fn io_read(&mut self, _: u16, off: u16, data: &mut [u8], _: &mut DeviceContext<'_>) -> Access {
        PortIoDevice::read(self, off, data);
        Access::Handled
    }

    fn io_write(&mut self, _: u16, off: u16, data: &[u8], _: &mut DeviceContext<'_>) -> Access {
        PortIoDevice::write(self, off, data);
        Access::Handled
    }

    fn take_exit_request(&mut self) -> Option<u8> {
        DebugExit::take_exit_request(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_status_is_low_byte_of_any_width() {
        for (data, want) in [
            (&[0x05u8][..], 5u8),
            (&[0x34, 0x12][..], 0x34),
            (&[0xff, 0xee, 0xdd, 0xcc][..], 0xff),
        ] {
            let mut d = DebugExit::new();
            assert_eq!(d.take_exit_request(), None);
            d.write(0, data);
            assert_eq!(d.exit_requested(), Some(want));
            assert_eq!(d.take_exit_request(), Some(want));
            assert_eq!(d.take_exit_request(), None);
        }
    }

    #[test]
    fn first_exit_request_wins_and_state_round_trips() {
        let mut d = DebugExit::new();
        d.write_value(3);
        d.write_value(9);
        let st = d.state();
        let json = serde_json::to_string(&st).unwrap();
        let mut r = DebugExit::from_state(&serde_json::from_str(&json).unwrap());
        assert_eq!(r.take_exit_request(), Some(3));
        assert_eq!(d.take_exit_request(), Some(3));
        let mut b = [0u8; 2];
        d.read(0, &mut b);
        assert_eq!(b, [0xff, 0xff]);
    }
}
