//! Control of a run loop from other threads.
//!
//! A run loop (the machine's, [`Machine::run`](crate::machine::Machine::run)) owns the vCPUs
//! and the devices and runs on one thread. Other threads (the control API, a migration, a
//! snapshot) steer it through a shared [`RunControl`], which owns the VM's one
//! [`Lifecycle`] and applies every event to it under its lock. The control state does not
//! know the machine: it is generic over the target `M` its jobs run on (the machine module
//! uses `RunControl<Machine>`), so this module sits below the machine.
//!
//! * **Pauses.** A user pause ([`RunControl::pause`]) and any number of internal holds
//!   ([`Hold`], [`StoppedGuard`]) stop the guest; it runs again only when the user pause is
//!   lifted and every hold released, so a failed migration releasing its hold never undoes a
//!   user's pause.
//! * **Operations.** A snapshot ([`SnapshotTicket`]) or a migration ([`MigrationTicket`])
//!   is registered in the lifecycle for as long as it runs; the ticket ends it when dropped
//!   (or commits / leaves it in doubt).
//! * **Jobs.** A closure posted with [`RunControl::run_job`] runs on the run loop's thread
//!   with `&mut M`, between two exits, whether the guest is running or parked. That is how
//!   state is read (vCPU snapshots, device state) without sharing the vCPUs.
//! * **Death.** Once a migration's destination committed ([`MigrationTicket::commit`]), the
//!   run loop returns [`Outcome::Migrated`] and refuses to
//!   run again.
//!
//! The loop looks at the control state only at *clean points*: between exits that need no
//! completion from the VMM (not after an `IN`, MMIO read, CPUID or MSR exit, whose
//! instruction is still half done). A cheap atomic flag says whether there is anything to do,
//! and the boot vCPU is kicked so that it reaches the next clean point promptly.
//!
//! # Stopped guests
//!
//! A [`StoppedGuard`] is a hold taken when the lifecycle allows it, returned only once the
//! run loop is parked (or has not started): while it lives, no vCPU of the VM runs. It is
//! the proof the functions that see guest memory in place need (see
//! [`MachineHandle::stopped_ram`](crate::machine::MachineHandle::stopped_ram)).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use esvm_hv::Kicker;
use thiserror::Error;

use crate::lifecycle::{Event, Lifecycle, LifecycleError, LoopEnd, State};
use crate::outcome::Outcome;

/// Work done on the run loop's thread, on its target (the machine).
pub type Job<M> = Box<dyn FnOnce(&mut M) + Send>;

/// How long to wait for the vCPU to reach a clean point after a kick.
pub const PARK_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for a job (e.g. reading the vCPU state) to be done.
pub const JOB_TIMEOUT: Duration = Duration::from_secs(60);

/// Why the run loop could not be steered.
#[allow(missing_docs)] // Each variant is documented by its #[error] message.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ControlError {
    /// The lifecycle does not allow it now.
    #[error(transparent)]
    Lifecycle(#[from] LifecycleError),
    #[error(
        "the vCPU did not stop within {0:?}; the VMM may be stuck in a long device operation, \
         try again"
    )]
    Timeout(Duration),
    #[error("the run loop ended before it ran the request; the VM is not running any more")]
    LoopGone,
}

struct Inner<M> {
    life: Lifecycle,
    /// The run loop waits at a clean point (the guest is stopped).
    parked: bool,
    jobs: VecDeque<Job<M>>,
    /// The VM is to stop, ending the run this way ([`RunControl::request_stop`]).
    stop: Option<Outcome>,
}

impl<M> Inner<M> {
    fn wants_attention(&self) -> bool {
        self.life.pauses().any()
            || !self.jobs.is_empty()
            || self.life.migrated_to().is_some()
            || self.stop.is_some()
    }
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
                life: Lifecycle::new(),
                parked: false,
                jobs: VecDeque::new(),
                stop: None,
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
        if self.publish(g) && g.life.loop_running() && !g.parked {
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

    /// Apply `event` to the lifecycle and publish the change.
    fn apply(&self, event: Event) -> Result<(), LifecycleError> {
        let mut g = self.lock();
        g.life.apply(event)?;
        self.changed(&g);
        Ok(())
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

    /// The VM's lifecycle now (a copy).
    pub fn lifecycle(&self) -> Lifecycle {
        self.lock().life.clone()
    }

    /// The user pauses the guest. Does not wait; see [`RunControl::wait_stopped`].
    pub fn pause(&self) -> Result<(), LifecycleError> {
        self.apply(Event::Pause)
    }

    /// The user resumes the guest (on a VM in doubt: the operator decided that the
    /// destination did not commit; the doubt's hold is released).
    pub fn resume(&self) -> Result<(), LifecycleError> {
        self.apply(Event::Resume)
    }

    /// Take an internal hold: the guest stops (soon) until the hold is dropped.
    pub fn hold(self: &Arc<Self>) -> Result<Hold<M>, LifecycleError> {
        self.apply(Event::Hold)?;
        Ok(Hold {
            control: Some(self.clone()),
        })
    }

    /// Take a hold and wait until the run loop is parked (or has not started): the returned
    /// guard proves that no vCPU runs while it lives. On failure the hold is released.
    pub fn stop(self: &Arc<Self>, timeout: Duration) -> Result<StoppedGuard<M>, ControlError> {
        let hold = self.hold()?;
        self.wait_stopped(timeout)?;
        Ok(StoppedGuard { hold })
    }

    /// Wait until the guest is stopped (the run loop parked or not started yet). Fails if
    /// the loop ended or the VM migrated away meanwhile.
    pub fn wait_stopped(&self, timeout: Duration) -> Result<(), ControlError> {
        let deadline = Instant::now() + timeout;
        let mut g = self.lock();
        loop {
            g.life.alive()?;
            if g.parked || !g.life.started() {
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

    /// Register a snapshot in the lifecycle; it ends when the ticket is dropped.
    pub fn begin_snapshot(
        self: &Arc<Self>,
        sev_es: bool,
    ) -> Result<SnapshotTicket<M>, LifecycleError> {
        self.apply(Event::SnapshotStarted { sev_es })?;
        Ok(SnapshotTicket {
            control: self.clone(),
        })
    }

    /// Register a live migration in the lifecycle; see [`MigrationTicket`] for how it ends.
    pub fn begin_migration(self: &Arc<Self>) -> Result<MigrationTicket<M>, LifecycleError> {
        self.apply(Event::MigrationStarted)?;
        Ok(MigrationTicket {
            control: Some(self.clone()),
        })
    }

    /// Stop the VM: the run loop ends with `how` (e.g. [`Outcome::Stopped`]) at its next
    /// clean point, paused or not. A snapshot or migration under way finishes first (the
    /// guest stays stopped meanwhile; cancel a migration to make it quick): if the
    /// migration commits, the run ends as migrated instead. The first request wins.
    /// Refused once the VM ended or migrated away.
    pub fn request_stop(&self, how: Outcome) -> Result<(), LifecycleError> {
        let mut g = self.lock();
        g.life.alive()?;
        if g.stop.is_none() {
            g.stop = Some(how);
        }
        self.changed(&g);
        Ok(())
    }

    /// Wait until the run loop has ended (or the VM migrated away); returns the lifecycle
    /// then, or `None` after `timeout`.
    pub fn wait_ended(&self, timeout: Duration) -> Option<Lifecycle> {
        let deadline = Instant::now() + timeout;
        let mut g = self.lock();
        loop {
            let over = matches!(
                g.life.state(),
                State::Ended(_)
                    | State::Migrated {
                        loop_running: false,
                        ..
                    }
            );
            if over {
                return Some(g.life.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
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
            g.life.alive()?;
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
                self.lock().life.alive()?;
                Err(ControlError::LoopGone)
            }
        }
    }

    // ---------------------------------------------------------------- run-loop side

    /// The run loop starts. Refused if the VM migrated away (it must never run here again)
    /// or already ended.
    pub(crate) fn loop_started(&self) -> Result<(), LifecycleError> {
        let mut g = self.lock();
        g.life.apply(Event::LoopStarted)?;
        g.parked = false;
        self.publish(&g);
        Ok(())
    }

    /// The run loop ended; pending jobs are dropped (their callers get an error).
    pub(crate) fn loop_ended(&self, end: LoopEnd) {
        let jobs = {
            let mut g = self.lock();
            if let Err(e) = g.life.apply(Event::LoopEnded(end)) {
                tracing::warn!("the run loop ended in an unexpected state: {e}");
            }
            g.parked = false;
            let jobs = std::mem::take(&mut g.jobs);
            self.publish(&g);
            jobs
        };
        drop(jobs);
    }

    /// Serve the control state at a clean point: run jobs, park while paused. Returns
    /// `Some(Outcome::Migrated)` if the VM migrated away.
    pub(crate) fn service(&self, m: &mut M) -> Option<Outcome> {
        let mut g = self.lock();
        loop {
            if let Some(url) = g.life.migrated_to() {
                return Some(Outcome::Migrated(url.to_string()));
            }
            if let Some(job) = g.jobs.pop_front() {
                self.publish(&g);
                drop(g);
                job(m);
                g = self.lock();
                continue;
            }
            let stopping = g.stop.is_some();
            if stopping && g.life.stoppable() {
                g.parked = false;
                return g.stop.take();
            }
            // A VM being stopped does not run on while a snapshot or migration ends.
            if g.life.pauses().any() || stopping {
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

/// An internal hold on the guest ([`RunControl::hold`]): it does not run while any hold
/// lives. Dropping it releases the hold.
pub struct Hold<M> {
    /// `None` once the hold passed to the lifecycle (an in-doubt migration).
    control: Option<Arc<RunControl<M>>>,
}

impl<M> Hold<M> {
    /// The hold is now the lifecycle's (it keeps the VM in doubt): do not release it.
    fn hand_over(mut self) {
        self.control = None;
    }
}

impl<M> Drop for Hold<M> {
    fn drop(&mut self) {
        if let Some(c) = self.control.take() {
            if let Err(e) = c.apply(Event::Release) {
                tracing::warn!("releasing a hold: {e}");
            }
        }
    }
}

/// A hold on a guest whose run loop is parked or not started ([`RunControl::stop`]): no
/// vCPU of the VM runs while it lives. Dropping it releases the hold.
pub struct StoppedGuard<M> {
    hold: Hold<M>,
}

impl<M> StoppedGuard<M> {
    /// Whether this guard stops the run loop of `control`.
    pub fn stops(&self, control: &Arc<RunControl<M>>) -> bool {
        self.hold
            .control
            .as_ref()
            .is_some_and(|c| Arc::ptr_eq(c, control))
    }
}

/// A snapshot registered in the lifecycle ([`RunControl::begin_snapshot`]); dropping it
/// ends the snapshot (written or not).
pub struct SnapshotTicket<M> {
    control: Arc<RunControl<M>>,
}

impl<M> Drop for SnapshotTicket<M> {
    fn drop(&mut self) {
        if let Err(e) = self.control.apply(Event::SnapshotEnded) {
            tracing::warn!("ending a snapshot: {e}");
        }
    }
}

/// A live migration registered in the lifecycle ([`RunControl::begin_migration`]). It ends
/// in one of three ways: [`MigrationTicket::commit`] (the destination committed: the VM is
/// dead here), [`MigrationTicket::in_doubt`] (the outcome is unknown: the guest stays
/// stopped until the operator resumes it), or dropping the ticket (the migration failed or
/// was cancelled: the guest runs on, unless paused otherwise).
pub struct MigrationTicket<M> {
    control: Option<Arc<RunControl<M>>>,
}

impl<M> MigrationTicket<M> {
    /// The destination committed: the VM must never run here again.
    pub fn commit(mut self, url: &str) {
        if let Some(c) = self.control.take() {
            if let Err(e) = c.apply(Event::MigrationCommitted {
                url: url.to_string(),
            }) {
                tracing::warn!("committing a migration: {e}");
            }
        }
    }

    /// The outcome is in doubt: the hold of `stopped` passes to the lifecycle, which keeps
    /// the guest stopped until the operator resumes it. `stopped` must stop this ticket's VM
    /// (otherwise it is released and the VM stays in doubt without a hold of its own).
    pub fn in_doubt(mut self, stopped: StoppedGuard<M>) {
        let Some(c) = self.control.take() else {
            return;
        };
        if !stopped.stops(&c) {
            tracing::error!("an in-doubt migration handed over the hold of another VM");
        }
        let handed_over = {
            let mut g = c.lock();
            let r = g.life.apply(Event::MigrationInDoubt);
            c.changed(&g);
            match r {
                Ok(()) => g.life.in_doubt(),
                Err(e) => {
                    tracing::warn!("leaving a migration in doubt: {e}");
                    false
                }
            }
        };
        if handed_over {
            // The state owns the hold now; Resume releases it.
            stopped.hold.hand_over();
        }
        // Otherwise (absorbed: the VM ended meanwhile) the guard releases its hold as usual.
    }
}

impl<M> Drop for MigrationTicket<M> {
    fn drop(&mut self) {
        if let Some(c) = self.control.take() {
            if let Err(e) = c.apply(Event::MigrationEnded) {
                tracing::warn!("ending a migration: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::{Ending, State, Status};

    struct NoKick;
    impl Kicker for NoKick {
        fn kick(&self) {}
    }

    fn control() -> Arc<RunControl<()>> {
        Arc::new(RunControl::new(Arc::new(NoKick)))
    }

    #[test]
    fn holds_and_user_pause_combine() {
        let c = control();
        assert!(!c.attention());
        c.pause().unwrap();
        let hold = c.hold().unwrap();
        assert!(c.attention());
        drop(hold);
        assert!(c.attention(), "the user's pause still holds");
        c.resume().unwrap();
        assert!(!c.attention());
        let l = c.lifecycle();
        assert!(!l.started() && l.status() == Status::Starting);
        // Not started counts as stopped.
        c.wait_stopped(Duration::from_millis(1)).unwrap();
        let g = c.stop(Duration::from_millis(1)).unwrap();
        assert!(g.stops(&c) && !g.stops(&control()));
        assert_eq!(c.lifecycle().pauses().holds, 1);
        drop(g);
        assert_eq!(c.lifecycle().pauses().holds, 0);
    }

    /// The run loop's side, on a thread: serve until something ends the run.
    fn serve(c: &Arc<RunControl<()>>) -> std::thread::JoinHandle<Option<Outcome>> {
        let c = c.clone();
        std::thread::spawn(move || c.service(&mut ()))
    }

    #[test]
    fn a_stop_ends_a_paused_loop() {
        let c = control();
        c.loop_started().unwrap();
        c.pause().unwrap();
        let l = serve(&c);
        c.wait_stopped(PARK_TIMEOUT).unwrap();
        c.request_stop(Outcome::Stopped("by a test".into()))
            .unwrap();
        // A later request does not change how it ends.
        c.request_stop(Outcome::PowerOff(crate::outcome::HALTED_OFF.into()))
            .unwrap();
        assert_eq!(
            l.join().unwrap(),
            Some(Outcome::Stopped("by a test".into()))
        );
        c.loop_ended(LoopEnd::Finished(Ending {
            exit_status: 0,
            failed: false,
            what: "stopped".into(),
        }));
        assert!(matches!(
            c.wait_ended(Duration::from_millis(1)).unwrap().state(),
            State::Ended(_)
        ));
        assert!(matches!(
            c.request_stop(Outcome::PowerOff(crate::outcome::HALTED_OFF.into())),
            Err(LifecycleError::Ended { .. })
        ));
    }

    #[test]
    fn a_stop_waits_for_a_migration_to_end() {
        use crate::outcome::StopSignal;
        let c = control();
        c.loop_started().unwrap();
        let ticket = c.begin_migration().unwrap();
        c.request_stop(Outcome::Signalled(StopSignal::Terminate))
            .unwrap();
        let l = serve(&c);
        // The guest is parked (not running on) while the migration ends.
        c.wait_stopped(PARK_TIMEOUT).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert!(!l.is_finished(), "the stop did not wait for the migration");
        assert!(c.wait_ended(Duration::from_millis(1)).is_none());
        drop(ticket); // cancelled: the VM is back to running here, and stops
        assert_eq!(
            l.join().unwrap(),
            Some(Outcome::Signalled(StopSignal::Terminate))
        );

        // A migration that commits ends the run as migrated: the VM runs there, not twice.
        let c = control();
        c.loop_started().unwrap();
        let ticket = c.begin_migration().unwrap();
        c.request_stop(Outcome::Stopped("x".into())).unwrap();
        let l = serve(&c);
        c.wait_stopped(PARK_TIMEOUT).unwrap();
        ticket.commit("tcp:h:1");
        assert_eq!(l.join().unwrap(), Some(Outcome::Migrated("tcp:h:1".into())));
    }

    #[test]
    fn dead_vm_refuses_everything() {
        let c = control();
        c.begin_migration().unwrap().commit("tcp://h:1");
        assert!(matches!(c.hold(), Err(LifecycleError::Migrated { .. })));
        assert!(matches!(c.pause(), Err(LifecycleError::Migrated { .. })));
        assert!(matches!(
            c.loop_started(),
            Err(LifecycleError::Migrated { url }) if url == "tcp://h:1"
        ));
        assert!(matches!(
            c.run_job(|_| ()),
            Err(ControlError::Lifecycle(LifecycleError::Migrated { .. }))
        ));
    }

    #[test]
    fn ended_loop_drops_jobs_with_an_error() {
        let c = control();
        c.loop_started().unwrap();
        let c2 = c.clone();
        let t = std::thread::spawn(move || c2.run_job(|_| 1));
        // Wait until the job is queued, then end the loop without serving it.
        while !c.attention() {
            std::thread::yield_now();
        }
        c.loop_ended(LoopEnd::Finished(Ending {
            exit_status: 0,
            failed: false,
            what: "the guest exited with status 0".into(),
        }));
        let r = t.join().unwrap();
        assert!(
            matches!(
                r,
                Err(ControlError::Lifecycle(LifecycleError::Ended { .. }))
            ),
            "{r:?}"
        );
        assert_eq!(c.lifecycle().status(), Status::Exited);
    }

    #[test]
    fn migrations_end_three_ways() {
        let c = control();
        c.loop_started().unwrap();
        // Failed: the guest runs on.
        let t = c.begin_migration().unwrap();
        let stopped = c.stop(Duration::from_millis(1));
        assert!(
            matches!(stopped, Err(ControlError::Timeout(_))),
            "not parked"
        );
        assert_eq!(
            c.lifecycle().pauses().holds,
            0,
            "a failed stop releases its hold"
        );
        drop(t);
        assert_eq!(c.lifecycle().state(), &State::Running);
        // In doubt: the state keeps the hold until the operator resumes.
        let t = c.begin_migration().unwrap();
        let h = c.hold().unwrap();
        t.in_doubt(StoppedGuard { hold: h });
        let l = c.lifecycle();
        assert!(l.in_doubt() && l.pauses().holds == 1 && l.status() == Status::Paused);
        assert!(matches!(
            c.begin_migration(),
            Err(LifecycleError::MigrateInDoubt)
        ));
        c.resume().unwrap();
        assert_eq!(c.lifecycle().state(), &State::Running);
        assert_eq!(c.lifecycle().pauses().holds, 0);
        // Committed: dead for good.
        c.begin_migration().unwrap().commit("tcp://h:2");
        assert_eq!(c.lifecycle().migrated_to(), Some("tcp://h:2"));
    }
}
