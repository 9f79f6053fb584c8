//! Guest-to-host signalling ports: the debug-exit port (0xf4) and the benchmark marker (0xf5).

use std::time::Instant;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::bus::PortIoDevice;

/// Port of the debug-exit device.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// Port of the benchmark marker.
pub const BENCH_MARKER_PORT: u16 = 0xf5;
/// At most this many benchmark marks are kept before further ones are dropped (and counted).
pub const MAX_BENCH_MARKS: usize = 1 << 16;

/// Errors of the debug ports.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DebugError {
    /// The benchmark log is full; reading it with `take_marks` empties it.
    #[error("benchmark marker log is full ({MAX_BENCH_MARKS} marks); call take_marks to drain it")]
    MarkLogFull,
}

fn le_value(data: &[u8]) -> u32 {
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

/// One benchmark mark: the value the guest wrote, the virtual time of the write, and the host
/// time at which the VMM handled it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BenchMark {
    /// Value written (zero-extended).
    pub value: u32,
    /// Virtual time in nanoseconds.
    pub virtual_ns: u64,
    /// Host time.
    pub host: Instant,
}

/// Port 0xf5: records `(value, virtual time, host Instant)` for each guest write, for
/// benchmarks. Marks are host-side diagnostics, not guest-visible state: they are not part of
/// snapshots. Reads return all-ones.
#[derive(Debug, Clone, Default)]
pub struct BenchMarker {
    now_ns: u64,
    marks: Vec<BenchMark>,
    dropped: u64,
}

impl BenchMarker {
    /// An empty log.
    pub fn new() -> Self {
        Self::default()
    }

    /// Set the virtual time used for marks recorded through the port interface.
    pub fn advance_to(&mut self, now_ns: u64) {
        self.now_ns = self.now_ns.max(now_ns);
    }

    /// Record a mark of `value` at virtual time `virtual_ns`.
    pub fn mark(&mut self, value: u32, virtual_ns: u64) -> Result<(), DebugError> {
        if self.marks.len() >= MAX_BENCH_MARKS {
            self.dropped += 1;
            return Err(DebugError::MarkLogFull);
        }
        self.marks.push(BenchMark {
            value,
            virtual_ns,
            host: Instant::now(),
        });
        Ok(())
    }

    /// Marks recorded so far.
    pub fn marks(&self) -> &[BenchMark] {
        &self.marks
    }

    /// Drain the marks.
    pub fn take_marks(&mut self) -> Vec<BenchMark> {
        std::mem::take(&mut self.marks)
    }

    /// Marks dropped because the log was full.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

impl PortIoDevice for BenchMarker {
    fn read(&mut self, _offset: u16, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, _offset: u16, data: &[u8]) {
        // A full log is counted in `dropped`; the guest is not disturbed.
        let _ = self.mark(le_value(data), self.now_ns);
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

    #[test]
    fn bench_marks_record_virtual_time_in_order() {
        let mut m = BenchMarker::new();
        m.advance_to(1_000);
        m.write(0, &[1]);
        m.advance_to(500); // time never goes back
        m.advance_to(2_500);
        m.write(0, &[0x02, 0x01, 0, 0]);
        let marks = m.take_marks();
        assert_eq!(marks.len(), 2);
        assert_eq!((marks[0].value, marks[0].virtual_ns), (1, 1_000));
        assert_eq!((marks[1].value, marks[1].virtual_ns), (0x102, 2_500));
        assert!(marks[1].host >= marks[0].host);
        assert!(m.marks().is_empty());
    }

    #[test]
    fn bench_log_is_bounded() {
        let mut m = BenchMarker::new();
        for i in 0..MAX_BENCH_MARKS {
            m.mark(i as u32, 0).unwrap();
        }
        assert_eq!(m.mark(0, 0), Err(DebugError::MarkLogFull));
        m.write(0, &[1]);
        assert_eq!(m.dropped(), 2);
        assert_eq!(m.take_marks().len(), MAX_BENCH_MARKS);
        assert!(m.mark(0, 0).is_ok());
    }
}
