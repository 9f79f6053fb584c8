//! The benchmark marker port (0xf5): the guest marks points of a benchmark; the VMM reads
//! the marks with their virtual and host times.

use std::convert::Infallible;
use std::time::Instant;

use thiserror::Error;

use crate::bus::PortIoDevice;
use crate::debug::le_value;
use crate::device::{Access, Device, DeviceContext, Hooks, Persist, PortRegion};

/// Port of the benchmark marker.
pub const BENCH_MARKER_PORT: u16 = 0xf5;
/// Registry id of the benchmark marker.
pub const BENCH_MARKER_ID: &str = "bench-marker";
/// At most this many benchmark marks are kept before further ones are dropped (and counted).
pub const MAX_BENCH_MARKS: usize = 1 << 16;

/// Errors of the benchmark marker.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum BenchError {
    /// The benchmark log is full; reading it with `take_marks` empties it.
    #[error("benchmark marker log is full ({MAX_BENCH_MARKS} marks); call take_marks to drain it")]
    MarkLogFull,
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
    pub fn mark(&mut self, value: u32, virtual_ns: u64) -> Result<(), BenchError> {
        if self.marks.len() >= MAX_BENCH_MARKS {
            self.dropped += 1;
            return Err(BenchError::MarkLogFull);
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

impl Persist for BenchMarker {
    /// Marks are host-side diagnostics: nothing of the marker is guest state.
    type State = ();
    type Error = Infallible;
    const STATE_VERSION: u32 = 1;

    fn save(&self) {}

    fn restore(&mut self, _state: &()) -> Result<(), Infallible> {
        Ok(())
    }
}

/// Port 0xf5 on the platform, taking 1-, 2- and 4-byte writes whole; marks carry the
/// virtual time of the write.
impl Device for BenchMarker {
    fn id(&self) -> &str {
        BENCH_MARKER_ID
    }

    fn port_regions(&self) -> Vec<PortRegion> {
        vec![PortRegion::whole(BENCH_MARKER_PORT, 1)]
    }

    fn hooks(&self) -> Hooks {
        Hooks::NONE
    }

    fn io_read(&mut self, _: u16, _: u16, data: &mut [u8], _: &mut DeviceContext<'_>) -> Access {
        data.fill(0xff);
        Access::Handled
    }

    fn io_write(&mut self, _: u16, _: u16, data: &[u8], cx: &mut DeviceContext<'_>) -> Access {
        // A full log is counted in `dropped`; the guest is not disturbed.
        let _ = self.mark(le_value(data), cx.now_ns());
        Access::Handled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(m.mark(0, 0), Err(BenchError::MarkLogFull));
        m.write(0, &[1]);
        assert_eq!(m.dropped(), 2);
        assert_eq!(m.take_marks().len(), MAX_BENCH_MARKS);
        assert!(m.mark(0, 0).is_ok());
    }
}
