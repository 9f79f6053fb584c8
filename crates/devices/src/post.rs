//! Port 0x80, the POST-code port: firmware writes progress codes there and Linux writes to it
//! as an I/O delay (`outb %al, $0x80` in `slow_down_io`). A sink: writes are taken and the
//! last byte is kept, as a POST card shows it ([`PostCode::last_code`]); reads return 0xff,
//! as on QEMU's chipsets. Nothing is signalled to the VMM.

use std::convert::Infallible;

use serde::{Deserialize, Serialize};

use crate::device::{Access, Device, DeviceContext, Hooks, Persist, PortRegion};

/// The POST-code port.
pub const POST_PORT: u16 = 0x80;
/// Registry id of the port.
pub const POST_ID: &str = "post";

/// Saved state of the POST-code port.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostCodeState {
    /// The last byte written, if any.
    pub last: Option<u8>,
}

/// Port 0x80. See the module documentation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PostCode {
    last: Option<u8>,
}

impl PostCode {
    /// No code written yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The last byte the guest wrote, if any.
    pub fn last_code(&self) -> Option<u8> {
        self.last
    }
}

impl Persist for PostCode {
    type State = PostCodeState;
    type Error = Infallible;
    const STATE_VERSION: u32 = 1;

    fn save(&self) -> PostCodeState {
        PostCodeState { last: self.last }
    }

    fn restore(&mut self, state: &PostCodeState) -> Result<(), Infallible> {
        self.last = state.last;
        Ok(())
    }
}

/// Port 0x80 on the platform, taking accesses whole (a wider write keeps its low byte).
impl Device for PostCode {
    fn id(&self) -> &str {
        POST_ID
    }

    fn port_regions(&self) -> Vec<PortRegion> {
        vec![PortRegion::whole(POST_PORT, 1)]
    }

    fn hooks(&self) -> Hooks {
        Hooks::NONE
    }

    fn io_read(&mut self, _: u16, _: u16, data: &mut [u8], _: &mut DeviceContext<'_>) -> Access {
        data.fill(0xff);
        Access::Handled
    }

    fn io_write(&mut self, _: u16, _: u16, data: &[u8], _: &mut DeviceContext<'_>) -> Access {
        if let Some(&v) = data.first() {
            self.last = Some(v);
        }
        Access::Handled
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::IrqSink;

    struct NoIrq;
    impl IrqSink for NoIrq {
        fn set_level(&mut self, irq: u8, _level: bool) {
            panic!("port 0x80 drove IRQ {irq}");
        }
    }

    #[test]
    fn a_sink_that_remembers_the_last_code() {
        let mut p = PostCode::new();
        let mut irq = NoIrq;
        let mut cx = DeviceContext::new(0, &mut irq);
        assert_eq!(p.last_code(), None);
        for v in [0x00, 0x55, 0xaa] {
            assert_eq!(p.io_write(POST_PORT, 0, &[v], &mut cx), Access::Handled);
        }
        assert_eq!(p.last_code(), Some(0xaa));
        let mut b = [0u8];
        p.io_read(POST_PORT, 0, &mut b, &mut cx);
        assert_eq!(b, [0xff]);
        let json = serde_json::to_string(&Persist::save(&p)).unwrap();
        let mut r = PostCode::new();
        Persist::restore(&mut r, &serde_json::from_str(&json).unwrap()).unwrap();
        assert_eq!(r, p);
    }
}
