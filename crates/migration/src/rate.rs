//! Bandwidth cap and live-changeable limits of an outgoing migration.
//!
//! * [`LiveLimits`]: the bandwidth cap and the downtime limit, shared between the sender and
//!   whoever controls the migration (the VMM's control API), so that both can be changed
//!   while the migration runs. The sender reads them before every frame and at every pass
//!   end.
//! * [`Pacer`]: the bandwidth cap's arithmetic. Each frame of `n` bytes occupies the link
//!   for `n / rate` seconds, starting when the previous frame's slot ended or now, whichever
//!   is later; the frame is written at the *end* of its slot. So at every moment, the bytes
//!   written since the pacer started are at most `rate x elapsed` (idle time earns no credit:
//!   there are no bursts above the cap), and a pass's measured bandwidth (bytes / time) can
//!   never exceed the cap. The pacer takes the current time as an argument, so it is tested
//!   without sleeping.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Longest sleep of a paced sender between checks for cancel and for a changed cap.
pub const PACE_CHECK_INTERVAL: Duration = Duration::from_millis(20);

/// The limits of a running migration that may change while it runs (cheap to clone: all
/// clones share the values).
#[derive(Debug, Clone)]
pub struct LiveLimits(Arc<Shared>);

#[derive(Debug)]
struct Shared {
    /// Bytes per second; 0 = unlimited.
    max_bandwidth: AtomicU64,
    /// Nanoseconds.
    downtime_limit_ns: AtomicU64,
    /// Someone asked for the switch to post-copy (`esvm ctl postcopy`).
    postcopy: AtomicBool,
}

impl LiveLimits {
    /// Limits starting at `max_bandwidth` bytes per second (`None` or 0: unlimited) and
    /// `downtime_limit`.
    pub fn new(max_bandwidth: Option<u64>, downtime_limit: Duration) -> Self {
        let l = LiveLimits(Arc::new(Shared {
            max_bandwidth: AtomicU64::new(0),
            downtime_limit_ns: AtomicU64::new(0),
            postcopy: AtomicBool::new(false),
        }));
        l.set_max_bandwidth(max_bandwidth);
        l.set_downtime_limit(downtime_limit);
        l
    }

    /// The bandwidth cap in bytes per second, `None` if unlimited.
    pub fn max_bandwidth(&self) -> Option<u64> {
        match self.0.max_bandwidth.load(Ordering::Relaxed) {
            0 => None,
            r => Some(r),
        }
    }

    /// Changes the bandwidth cap (`None` or 0: unlimited); the sender applies it from its
    /// next frame on (a frame waiting for its slot is re-timed at once).
    pub fn set_max_bandwidth(&self, bytes_per_sec: Option<u64>) {
        self.0
            .max_bandwidth
            .store(bytes_per_sec.unwrap_or(0), Ordering::Relaxed);
    }

    /// The largest acceptable downtime estimate for stop-and-copy.
    pub fn downtime_limit(&self) -> Duration {
        Duration::from_nanos(self.0.downtime_limit_ns.load(Ordering::Relaxed))
    }

    /// Changes the downtime limit; the sender compares the next pass's estimate with it.
    pub fn set_downtime_limit(&self, limit: Duration) {
        let ns = u64::try_from(limit.as_nanos()).unwrap_or(u64::MAX);
        self.0.downtime_limit_ns.store(ns, Ordering::Relaxed);
    }
}

impl LiveLimits {
    /// Ask the sender to switch to post-copy as soon as it can: it ends the current pre-copy
    /// pass early and switches (see [`crate::sender`]). It has no effect once the sender is
    /// in stop-and-copy, and fails the migration (before any switch, so the source keeps
    /// running) if the destination cannot do post-copy.
    pub fn request_postcopy(&self) {
        self.0.postcopy.store(true, Ordering::SeqCst);
    }

    /// Whether [`request_postcopy`](Self::request_postcopy) was called.
    pub fn postcopy_requested(&self) -> bool {
        self.0.postcopy.load(Ordering::SeqCst)
    }
}

/// The bandwidth cap's clock-free arithmetic (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct Pacer {
    /// When the last paced frame's slot ended.
    free_at: Option<Instant>,
}

impl Pacer {
    pub fn new() -> Self {
        Pacer::default()
    }

    /// Where the slot of a frame that is ready at `now` starts: now, or when the previous
    /// slot ends if that is later.
    pub fn slot_start(&self, now: Instant) -> Instant {
        self.free_at.map_or(now, |f| f.max(now))
    }

    /// When a frame of `bytes` whose slot starts at `start` may be written at `rate` bytes
    /// per second (a rate of 0 is treated as 1).
    pub fn slot_end(start: Instant, bytes: u64, rate: u64) -> Instant {
        let secs = bytes as f64 / rate.max(1) as f64;
        start
            .checked_add(Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX))
            .unwrap_or(start + Duration::from_secs(365 * 24 * 3600))
    }

    /// The frame whose slot ends at `end` was written: the next slot starts there.
    pub fn sent(&mut self, end: Instant) {
        self.free_at = Some(end);
    }

    /// Forget the last slot (the cap was lifted: the next capped frame starts afresh).
    pub fn reset(&mut self) {
        self.free_at = None;
    }

    /// How long a frame of `bytes` that is ready at `now` waits at `rate`, and records it
    /// as sent at the end of its slot: the whole pacing step for a fixed rate.
    pub fn delay(&mut self, now: Instant, bytes: u64, rate: u64) -> Duration {
        let end = Self::slot_end(self.slot_start(now), bytes, rate);
        self.sent(end);
        end.saturating_duration_since(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// Writing frames back to back as fast as the pacer allows: the bytes written by any
    /// moment never exceed rate x elapsed, and the whole transfer takes exactly bytes / rate.
    #[test]
    fn back_to_back_frames_never_exceed_the_rate() {
        let t0 = Instant::now();
        let mut p = Pacer::new();
        let rate = 32 * MIB;
        let mut now = t0;
        let mut written = 0u64;
        for _ in 0..16 {
            now += p.delay(now, 4 * MIB, rate);
            written += 4 * MIB;
            let allowed = rate as f64 * now.duration_since(t0).as_secs_f64();
            assert!(written as f64 <= allowed + 1.0, "{written} > {allowed}");
        }
        let secs = now.duration_since(t0).as_secs_f64();
        assert!((secs - 2.0).abs() < 1e-6, "{secs}");
    }

    /// Idle time earns no credit: after a pause, the next frame still waits its own slot.
    #[test]
    fn idle_time_earns_no_burst() {
        let t0 = Instant::now();
        let mut p = Pacer::new();
        assert_eq!(p.delay(t0, MIB, MIB), Duration::from_secs(1));
        let later = t0 + Duration::from_secs(10);
        assert_eq!(p.delay(later, MIB / 2, MIB), Duration::from_millis(500));
        // A frame ready before the previous slot ended waits for it, then its own slot.
        let early = later + Duration::from_millis(100);
        assert_eq!(p.delay(early, MIB, MIB), Duration::from_millis(1400));
    }

    /// A frame that was waiting is re-timed when the cap changes (its slot start stays).
    #[test]
    fn a_raised_cap_shortens_the_wait() {
        let t0 = Instant::now();
        let p = Pacer::new();
        let start = p.slot_start(t0);
        assert_eq!(
            Pacer::slot_end(start, 4 * MIB, MIB),
            t0 + Duration::from_secs(4)
        );
        assert_eq!(
            Pacer::slot_end(start, 4 * MIB, 64 * MIB),
            t0 + Duration::from_millis(62) + Duration::from_micros(500)
        );
        // A reset pacer starts from `now` again.
        let mut p = Pacer::new();
        p.sent(t0 + Duration::from_secs(100));
        p.reset();
        assert_eq!(p.slot_start(t0), t0);
        // Absurd sizes do not overflow.
        assert!(Pacer::slot_end(t0, u64::MAX, 1) > t0);
    }

    #[test]
    fn live_limits_are_shared_and_changeable() {
        let a = LiveLimits::new(Some(0), Duration::from_millis(300));
        let b = a.clone();
        assert_eq!(a.max_bandwidth(), None);
        b.set_max_bandwidth(Some(5 * MIB));
        assert_eq!(a.max_bandwidth(), Some(5 * MIB));
        b.set_downtime_limit(Duration::from_millis(20));
        assert_eq!(a.downtime_limit(), Duration::from_millis(20));
        b.set_max_bandwidth(None);
        assert_eq!(a.max_bandwidth(), None);
        b.set_downtime_limit(Duration::MAX);
        assert_eq!(a.downtime_limit(), Duration::from_nanos(u64::MAX));
    }
}
