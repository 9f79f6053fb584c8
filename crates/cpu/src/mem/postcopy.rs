//! Post-copy: guest pages that have not arrived yet (live migration, destination side).
//!
//! A [`MissingPages`] set is attached to a [`PhysMemory`] once, before the guest starts with
//! pages still at the source ([`PhysMemory::begin_postcopy`]). Until a page is published it
//! is neither readable nor writable — by the vCPU or by the VMM:
//!
//! * the software vCPU checks it where it resolves a guest-physical page, which is where the
//!   software TLB is filled and host pointers are produced (`Cpu::translate`, the page
//!   walk's table reads, and in SEV-ES mode `Cpu::sev_view`, which every private or shared
//!   access goes through). A TLB hit never needs the check: entries are only filled for
//!   present pages, and a page never becomes missing again. So the hot path (TLB hits) is
//!   unchanged and a miss costs one atomic load while no post-copy runs;
//! * the VMM's accessors ([`PhysMemory::read`], [`PhysMemory::write`],
//!   [`PhysMemory::read_host`], [`PhysMemory::write_host`]: GHCB, loaders, tools) check it
//!   too.
//!
//! A vCPU (or VMM thread) touching a missing page records a demand fault and **waits in
//! place** until the page is published, so the instruction needs no restart and never sees a
//! zero or stale page. If the migration fails instead ([`MissingPages::fail`]), the wait ends
//! with the failure, which the vCPU turns into a shutdown exit: the guest never runs on with
//! a page missing.
//!
//! Publishing ([`MissingPages::publish`]) happens after the page's bytes were written (and,
//! by the migration layer, verified): the missing bit is cleared with Release ordering, and
//! the check loads it with Acquire, so a thread that sees the page present sees its bytes.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// How long a waiting thread sleeps between checks of its page (it is also woken at once
/// by every publish and by a failure).
const WAIT_SLICE: Duration = Duration::from_millis(20);

/// The set of guest pages not yet arrived, with the demand faults on them.
#[derive(Debug)]
pub struct MissingPages {
    /// Bit set = page missing.
    words: Box<[AtomicU64]>,
    pages: u64,
    /// Pages missing at the start.
    initial: u64,
    remaining: AtomicU64,
    /// Some page is still missing (cleared with Release when the last one is published).
    active: AtomicBool,
    failed: AtomicBool,
    reason: Mutex<Option<String>>,
    /// Pages faulted on and not yet taken by [`MissingPages::take_faults`].
    faults: Mutex<Vec<u64>>,
    wake: Condvar,
    wake_lock: Mutex<()>,
    demand_faults: AtomicU64,
    wait_ns: AtomicU64,
}

/// Demand-fault figures for status displays.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MissingStats {
    /// Pages missing when post-copy started.
    pub initial: u64,
    /// Pages still missing.
    pub remaining: u64,
    /// Accesses (vCPU or VMM) that had to wait for a page.
    pub demand_faults: u64,
    /// Total time spent waiting for pages, nanoseconds.
    pub wait_ns: u64,
}

impl MissingPages {
    /// The set of `pages` pages with `missing` (dirty-log layout: bit `i % 64` of word
    /// `i / 64` is page `i`) missing; bits beyond `pages` are ignored.
    pub fn new(pages: u64, missing: &[u64]) -> MissingPages {
        let n = pages.div_ceil(64) as usize;
        let mut count = 0u64;
        let words: Box<[AtomicU64]> = (0..n)
            .map(|i| {
                let mut w = missing.get(i).copied().unwrap_or(0);
                if i == n - 1 && !pages.is_multiple_of(64) {
                    w &= (1u64 << (pages % 64)) - 1;
                }
                count += w.count_ones() as u64;
                AtomicU64::new(w)
            })
            .collect();
        MissingPages {
            words,
            pages,
            initial: count,
            remaining: AtomicU64::new(count),
            active: AtomicBool::new(count > 0),
            failed: AtomicBool::new(false),
            reason: Mutex::new(None),
            faults: Mutex::new(Vec::new()),
            wake: Condvar::new(),
            wake_lock: Mutex::new(()),
            demand_faults: AtomicU64::new(0),
            wait_ns: AtomicU64::new(0),
        }
    }

    /// Whether any page is still missing (Acquire: when false, every page's bytes are
    /// visible).
    #[inline(always)]
    pub fn active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    /// Whether `page` is missing (Acquire). Pages outside the set are never missing.
    #[inline]
    pub fn is_missing(&self, page: u64) -> bool {
        if page >= self.pages {
            return false;
        }
        self.words[(page / 64) as usize].load(Ordering::Acquire) & (1 << (page % 64)) != 0
    }

    /// The bytes of pages `first..first + count` are in place: make them visible. Pages not
    /// missing are left alone (returns how many were published).
    pub fn publish(&self, first: u64, count: u64) -> u64 {
        let mut done = 0;
        for page in first..first.saturating_add(count).min(self.pages) {
            let bit = 1u64 << (page % 64);
            let old = self.words[(page / 64) as usize].fetch_and(!bit, Ordering::Release);
            if old & bit != 0 {
                done += 1;
            }
        }
        if done > 0 {
            let before = self.remaining.fetch_sub(done, Ordering::AcqRel);
            if before == done {
                self.active.store(false, Ordering::Release);
            }
            let _g = self
                .wake_lock
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            self.wake.notify_all();
        }
        done
    }

    /// The migration failed: every waiting access (and every later one on a missing page)
    /// fails with `reason`.
    pub fn fail(&self, reason: impl Into<String>) {
        {
            let mut r = self.reason.lock().unwrap_or_else(PoisonError::into_inner);
            if r.is_none() {
                *r = Some(reason.into());
            }
        }
        self.failed.store(true, Ordering::SeqCst);
        let _g = self
            .wake_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.wake.notify_all();
    }

    fn failure_or_default(&self) -> String {
        self.failure()
            .unwrap_or_else(|| "the post-copy migration failed".into())
    }

    /// Why the migration failed, if it did ([`MissingPages::fail`]).
    pub fn failure(&self) -> Option<String> {
        self.reason
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Move the pages faulted on since the last call into `out` (the migration layer
    /// requests them from the source).
    pub fn take_faults(&self, out: &mut Vec<u64>) {
        out.append(&mut self.faults.lock().unwrap_or_else(PoisonError::into_inner));
    }

    pub fn stats(&self) -> MissingStats {
        MissingStats {
            initial: self.initial,
            remaining: self.remaining.load(Ordering::Relaxed),
            demand_faults: self.demand_faults.load(Ordering::Relaxed),
            wait_ns: self.wait_ns.load(Ordering::Relaxed),
        }
    }

    /// Wait until `page` is present; `Err(reason)` if the migration failed first.
    #[cold]
    pub fn wait(&self, page: u64) -> Result<(), String> {
        if !self.is_missing(page) {
            return Ok(());
        }
        if self.failed.load(Ordering::SeqCst) {
            return Err(self.failure_or_default());
        }
        let start = Instant::now();
        self.demand_faults.fetch_add(1, Ordering::Relaxed);
        self.faults
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(page);
        let mut g = self
            .wake_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let result = loop {
            if !self.is_missing(page) {
                break Ok(());
            }
            if self.failed.load(Ordering::SeqCst) {
                break Err(self.failure_or_default());
            }
            g = self
                .wake
                .wait_timeout(g, WAIT_SLICE)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        };
        drop(g);
        self.wait_ns
            .fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Exit;
    use std::sync::Arc;

    #[test]
    fn publish_wakes_waiters_and_ends_post_copy() {
        let m = Arc::new(MissingPages::new(70, &[0b110, 1 << 5]));
        assert!(m.active());
        assert!(m.is_missing(1) && m.is_missing(2) && m.is_missing(69) && !m.is_missing(0));
        let w = {
            let m = m.clone();
            std::thread::spawn(move || m.wait(2))
        };
        // The waiter registers its fault before it sleeps.
        let mut faults = Vec::new();
        while faults.is_empty() {
            m.take_faults(&mut faults);
            std::thread::yield_now();
        }
        assert_eq!(faults, vec![2]);
        assert_eq!(m.publish(2, 1), 1);
        assert_eq!(w.join().unwrap(), Ok(()));
        assert_eq!(m.publish(0, 3), 1, "page 1 only; 0 and 2 are not missing");
        assert!(m.active());
        m.publish(69, 1);
        assert!(!m.active());
        let s = m.stats();
        assert_eq!((s.remaining, s.demand_faults), (0, 1));
    }

    /// The vCPU touching a missing page waits (recording a demand fault) until the page is
    /// published, then reads its bytes — never the zeroes that were there before.
    #[test]
    fn the_vcpu_waits_for_a_missing_page_and_reads_it() {
        let mut h = crate::testutil::Harness::new(16 << 20);
        // mov rax, [0x800000]; hlt
        h.load(&[0x48, 0x8b, 0x04, 0x25, 0x00, 0x00, 0x80, 0x00, 0xf4]);
        let mem = h.mem().clone();
        let mut missing = vec![0u64; 4096 / 64];
        missing[0x800 / 64] = 1 << (0x800 % 64);
        let set = mem.begin_postcopy(&missing).unwrap();
        let filler = {
            let (mem, set) = (mem.clone(), set.clone());
            std::thread::spawn(move || {
                let mut faults = Vec::new();
                while faults.is_empty() {
                    set.take_faults(&mut faults);
                    std::thread::yield_now();
                }
                // SAFETY: the only slice of page 0x800, dropped before it is published.
                let page = unsafe { mem.missing_pages_mut(0x800, 1) }.unwrap();
                page[..8].copy_from_slice(&0x1122_3344_5566_7788u64.to_le_bytes());
                set.publish(0x800, 1);
                faults
            })
        };
        let x = h.run();
        assert_eq!(x, Exit::Hlt, "run ended with {x:?}");
        assert_eq!(h.cpu.regs().gpr[0], 0x1122_3344_5566_7788);
        assert_eq!(filler.join().unwrap(), vec![0x800]);
        let st = set.stats();
        assert_eq!((st.initial, st.remaining, st.demand_faults), (1, 0, 1));
        assert!(!set.active());
        // Pages that are not missing cannot be handed out for filling.
        // SAFETY: refused before any slice exists.
        assert!(unsafe { mem.missing_pages_mut(0x800, 1) }.is_err());
    }

    /// A migration that fails while the vCPU waits stops it with a shutdown naming the
    /// failure: the guest never runs on with the page missing.
    #[test]
    fn a_failed_migration_stops_the_waiting_vcpu() {
        let mut h = crate::testutil::Harness::new(16 << 20);
        h.load(&[0x48, 0x8b, 0x04, 0x25, 0x00, 0x00, 0x80, 0x00, 0xf4]);
        let mut missing = vec![0u64; 4096 / 64];
        missing[0x800 / 64] = 1 << (0x800 % 64);
        let set = h.mem().begin_postcopy(&missing).unwrap();
        let failer = {
            let set = set.clone();
            std::thread::spawn(move || {
                let mut faults = Vec::new();
                while faults.is_empty() {
                    set.take_faults(&mut faults);
                    std::thread::yield_now();
                }
                set.fail("the source went away");
            })
        };
        let x = h.run();
        failer.join().unwrap();
        match x {
            Exit::Shutdown { reason } => {
                assert!(
                    reason.contains("0x800000") && reason.contains("the source went away"),
                    "{reason}"
                )
            }
            other => panic!("expected a shutdown, got {other:?}"),
        }
        assert_eq!(h.cpu.regs().gpr[0], 0, "nothing was read");
        // The VMM's accessors refuse too.
        let mut b = [0u8; 8];
        assert!(h.mem().read(0x800000, &mut b).is_err());
    }

    #[test]
    fn failure_ends_every_wait() {
        let m = Arc::new(MissingPages::new(8, &[0xff]));
        let w = {
            let m = m.clone();
            std::thread::spawn(move || m.wait(3))
        };
        m.fail("the source went away");
        assert_eq!(w.join().unwrap(), Err("the source went away".into()));
        assert_eq!(m.wait(4), Err("the source went away".into()));
        assert_eq!(m.wait(100), Ok(()), "outside the set: never missing");
    }
}
