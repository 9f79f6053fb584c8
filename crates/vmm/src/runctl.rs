//! Control of a machine's run loop from other threads.
//!
//! A run loop (the machine's, [`Machine::run`](crate::machine::Machine::run)) owns the vCPUs
//! and the devices and runs on one thread. Other threads (the control API, a migration, a
//! snapshot) steer it through a shared [`RunControl`]. The control state does not know the
//! machine: it is generic over the target `M` its jobs run on (the machine module uses
//! `RunControl<Machine>`), so this module sits below the machine.
//!
//! * **Pauses.** A user pause (`esvm ctl pause`) and any number of internal *holds*
//!   (stop-and-copy, snapshot) stop the guest; it runs again only when the user pause is
//!   lifted and every hold released, so a failed migration's `resume` never undoes a user's
//!   pause.
//! * **Jobs.** A closure posted with [`RunControl::run_job`] runs on the run loop's thread
//!   with `&mut M`, between two exits, whether the guest is running or parked. That is
//!   how state is read (vCPU snapshots, device state) without sharing the vCPUs.
//! * **Death.** [`RunControl::mark_dead`] (the migration's destination committed) makes the
//!   run loop return [`Outcome::Migrated`](crate::outcome::Outcome::Migrated) and refuse to
//!   run again.
//!
//! The loop looks at the control state only at *clean points*: between exits that need no
//! completion from the VMM (not after an `IN`, MMIO read, CPUID or MSR exit, whose
//! instruction is still half done). A cheap atomic flag says whether there is anything to do,
//! and the boot vCPU is kicked so that it reaches the next clean point promptly.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use esvm_hv::Kicker;
use thiserror::Error;

use crate::outcome::Outcome;

/// Work done on the run loop's thread, on its target (the machine).
pub type Job<M> = Box<dyn FnOnce(&mut M) + Send>;

/// How long to wait for the vCPU to reach a clean point after a kick.
pub const PARK_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for a job (e.g. reading the vCPU state) to be done.
pub const JOB_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ControlError {
    #[error("the VM is not running any more: {0}")]
    Stopped(String),
    #[error("the VM migrated to {0}: it runs there now and can never run here again")]
    Migrated(String),
    #[error(
        "the vCPU did not stop within {0:?}; the VMM may be stuck in a long device operation, \
         try again"
    )]
    Timeout(Duration),
}

/// How the run loop ended, for status reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoopEnd {
    /// The guest ended (or the run loop failed); `exit_status` is what `esvm` exits with.
    Finished {
        exit_status: u8,
        failed: bool,
        what: String,
    },
    /// The VM migrated away.
    Migrated(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum LoopState {
    NotStarted,
    Running,
    Ended(LoopEnd),
}

struct Inner<M> {
    user_paused: bool,
    holds: u32,
    parked: bool,
    loop_state: LoopState,
    dead: Option<String>,
    jobs: VecDeque<Job<M>>,
}

impl<M> Inner<M> {
    fn wants_attention(&self) -> bool {
        self.user_paused || self.holds > 0 || !self.jobs.is_empty() || self.dead.is_some()
    }
}

/// What the control state looks like from outside (for status reports).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlView {
    pub user_paused: bool,
    pub holds: u32,
    /// The guest is stopped: the loop is parked, has not started, or has ended.
    pub stopped: bool,
    pub started: bool,
    pub ended: Option<LoopEnd>,
    pub dead: Option<String>,
}

/// The shared control state of one run loop whose jobs run on an `M`; see the module
/// documentation.
pub struct RunControl<M> {
    inner: Mutex<Inner<M>>,
    cond: Condvar,
    attention: AtomicBool,
    kicker: Arc<dyn Kicker>,
    instructions: AtomicU64,
    created: Instant,
}

impl<M> RunControl<M> {
    /// Control for a run loop whose running vCPU is stopped by `kicker`.
    pub fn new(kicker: Arc<dyn Kicker>) -> Self {
        RunControl {
            inner: Mutex::new(Inner {
                user_paused: false,
                holds: 0,
                parked: false,
                loop_state: LoopState::NotStarted,
                dead: None,
                jobs: VecDeque::new(),
            }),
            cond: Condvar::new(),
            attention: AtomicBool::new(false),
            kicker,
            instructions: AtomicU64::new(0),
            created: Instant::now(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner<M>> {
        // The state stays consistent under panics (every update is a single assignment).
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Publish a change: recompute the attention flag, wake waiters and (from threads other
    /// than the run loop's) kick the vCPU so that it reaches a clean point soon.
    fn changed(&self, g: &Inner<M>) {
        if self.publish(g) && g.loop_state == LoopState::Running && !g.parked {
            self.kicker.kick();
        }
    }

    /// [`RunControl::changed`] without the kick (for the run loop itself); returns whether
    /// the loop has something to do.
    fn publish(&self, g: &Inner<M>) -> bool {
        let want = g.wants_attention();
        self.attention.store(want, Ordering::SeqCst);
        self.cond.notify_all();
        want
    }

    /// Whether the run loop has something to do at its next clean point.
    pub fn attention(&self) -> bool {
        self.attention.load(Ordering::Relaxed)
    }

    /// Time since the machine was created.
    pub fn uptime(&self) -> Duration {
        self.created.elapsed()
    }

    /// Guest instructions retired (all vCPUs, carried across migrations), as last published
    /// by the run loop.
    pub fn instructions(&self) -> u64 {
        self.instructions.load(Ordering::Relaxed)
    }

    pub(crate) fn publish_instructions(&self, n: u64) {
        self.instructions.store(n, Ordering::Relaxed);
    }

    pub fn view(&self) -> ControlView {
        let g = self.lock();
        ControlView {
            user_paused: g.user_paused,
            holds: g.holds,
            stopped: g.parked || !matches!(g.loop_state, LoopState::Running),
            started: g.loop_state != LoopState::NotStarted,
            ended: match &g.loop_state {
                LoopState::Ended(e) => Some(e.clone()),
                _ => None,
            },
            dead: g.dead.clone(),
        }
    }

    fn usable(g: &Inner<M>) -> Result<(), ControlError> {
        if let Some(url) = &g.dead {
            return Err(ControlError::Migrated(url.clone()));
        }
        match &g.loop_state {
            LoopState::Ended(LoopEnd::Migrated(url)) => Err(ControlError::Migrated(url.clone())),
            LoopState::Ended(LoopEnd::Finished { what, .. }) => {
                Err(ControlError::Stopped(what.clone()))
            }
            _ => Ok(()),
        }
    }

    /// Set or lift the user's pause. Does not wait; see [`RunControl::wait_stopped`].
    pub fn set_user_paused(&self, paused: bool) -> Result<(), ControlError> {
        let mut g = self.lock();
        Self::usable(&g)?;
        g.user_paused = paused;
        self.changed(&g);
        Ok(())
    }

    /// Take an internal hold (the guest stops until every hold is released).
    pub fn hold(&self) -> Result<(), ControlError> {
        let mut g = self.lock();
        Self::usable(&g)?;
        g.holds += 1;
        self.changed(&g);
        Ok(())
    }

    /// Release a hold taken with [`RunControl::hold`].
    pub fn release(&self) {
        let mut g = self.lock();
        g.holds = g.holds.saturating_sub(1);
        self.changed(&g);
    }

    /// Wait until the guest is stopped (the run loop parked, not started yet, or ended).
    /// Fails if the loop ended or the VM died meanwhile.
    pub fn wait_stopped(&self, timeout: Duration) -> Result<(), ControlError> {
        let deadline = Instant::now() + timeout;
        let mut g = self.lock();
        loop {
            Self::usable(&g)?;
            if g.parked || g.loop_state == LoopState::NotStarted {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(ControlError::Timeout(timeout));
            }
            g = self
                .cond
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Run `f` on the run loop's thread (between two exits) and return its result.
    pub fn run_job<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut M) -> R + Send + 'static,
    ) -> Result<R, ControlError> {
        let (tx, rx) = mpsc::channel();
        {
            let mut g = self.lock();
            Self::usable(&g)?;
            g.jobs.push_back(Box::new(move |m: &mut M| {
                let _ = tx.send(f(m));
            }));
            self.changed(&g);
        }
        match rx.recv_timeout(JOB_TIMEOUT) {
            Ok(r) => Ok(r),
            Err(mpsc::RecvTimeoutError::Timeout) => Err(ControlError::Timeout(JOB_TIMEOUT)),
            // The loop ended and dropped the job.
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let g = self.lock();
                Self::usable(&g)?;
                Err(ControlError::Stopped("the run loop ended".into()))
            }
        }
    }

    /// The destination committed: the VM must never run here again.
    pub fn mark_dead(&self, url: &str) {
        let mut g = self.lock();
        if g.dead.is_none() {
            g.dead = Some(url.to_string());
        }
        self.changed(&g);
    }

    // ---------------------------------------------------------------- run-loop side

    /// The run loop starts. Returns the death URL if the VM already migrated away.
    pub(crate) fn loop_started(&self) -> Option<String> {
        let mut g = self.lock();
        if let Some(url) = &g.dead {
            return Some(url.clone());
        }
        if let LoopState::Ended(LoopEnd::Migrated(url)) = &g.loop_state {
            return Some(url.clone());
        }
        g.loop_state = LoopState::Running;
        g.parked = false;
        self.publish(&g);
        None
    }

    /// The run loop ended; pending jobs are dropped (their callers get an error).
    pub(crate) fn loop_ended(&self, end: LoopEnd) {
        let jobs = {
            let mut g = self.lock();
            g.loop_state = LoopState::Ended(end);
            g.parked = false;
            let jobs = std::mem::take(&mut g.jobs);
            self.publish(&g);
            jobs
        };
        drop(jobs);
    }

    /// Serve the control state at a clean point: run jobs, park while paused. Returns
    /// `Some(Outcome::Migrated)` if the VM died.
    pub(crate) fn service(&self, m: &mut M) -> Option<Outcome> {
        let mut g = self.lock();
        loop {
            if let Some(url) = &g.dead {
                return Some(Outcome::Migrated(url.clone()));
            }
            if let Some(job) = g.jobs.pop_front() {
                self.publish(&g);
                drop(g);
                job(m);
                g = self.lock();
                continue;
            }
            if g.user_paused || g.holds > 0 {
                if !g.parked {
                    g.parked = true;
                    self.cond.notify_all();
                }
                g = self.cond.wait(g).unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            g.parked = false;
            self.publish(&g);
            return None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct NoKick;
    impl Kicker for NoKick {
        fn kick(&self) {}
    }

    #[test]
    fn holds_and_user_pause_combine() {
        let c = RunControl::<()>::new(Arc::new(NoKick));
        assert!(!c.attention());
        c.set_user_paused(true).unwrap();
        c.hold().unwrap();
        assert!(c.attention());
        c.release();
        assert!(c.attention(), "the user's pause still holds");
        c.set_user_paused(false).unwrap();
        assert!(!c.attention());
        let v = c.view();
        assert!(v.stopped && !v.started, "not started counts as stopped");
        c.wait_stopped(Duration::from_millis(1)).unwrap();
    }

    #[test]
    fn dead_vm_refuses_everything() {
        let c = RunControl::<()>::new(Arc::new(NoKick));
        c.mark_dead("tcp://h:1");
        assert!(matches!(c.hold(), Err(ControlError::Migrated(_))));
        assert!(matches!(
            c.set_user_paused(true),
            Err(ControlError::Migrated(_))
        ));
        assert_eq!(c.loop_started(), Some("tcp://h:1".into()));
        assert!(matches!(c.run_job(|_| ()), Err(ControlError::Migrated(_))));
    }

    #[test]
    fn ended_loop_drops_jobs_with_an_error() {
        let c = Arc::new(RunControl::<()>::new(Arc::new(NoKick)));
        assert_eq!(c.loop_started(), None);
        let c2 = c.clone();
        let t = std::thread::spawn(move || c2.run_job(|_| 1));
        // Wait until the job is queued, then end the loop without serving it.
        while !c.attention() {
            std::thread::yield_now();
        }
        c.loop_ended(LoopEnd::Finished {
            exit_status: 0,
            failed: false,
            what: "the guest exited with status 0".into(),
        });
        let r = t.join().unwrap();
        assert!(matches!(r, Err(ControlError::Stopped(_))), "{r:?}");
        assert!(c.view().ended.is_some());
    }
}
