//! The control API of a running machine: [`VmHandle`] implements
//! [`esvm_control::ControlTarget`] (status, pause, resume, snapshot, migrate, cancel) on top
//! of the machine's [`VmControl`](crate::machine::VmControl), and runs live migrations on a
//! background thread.
//!
//! Whether a request is possible now is the lifecycle's decision ([`crate::lifecycle`]): a
//! refused transition is answered `invalid_state` with the lifecycle's reason. States as
//! `status` reports them ([`Status`]): `starting` (the run loop has not started), `running`,
//! `paused` (a user pause, a snapshot being written, or a migration left in doubt),
//! `migrating` (a migration is under way: the guest runs during pre-copy and is stopped
//! during stop-and-copy), `migrated` (the destination committed: dead here), `exited`, and
//! `failed` (the guest shut down or terminated, or the VMM failed).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use esvm_control::{
    ApiError, ControlRegs, ControlTarget, LaunchMeasurement, MigrateRequest, MigrateSetRequest,
    MigrationLimits, MigrationPhase, MigrationStatus, OnTimeout, PostcopyStatus, SnapshotInfo,
    VcpuView, VmState, VmStatus, VmType,
};
use esvm_migration::{
    CancelToken, LimitPolicy, LiveLimits, Phase, Progress, ProtocolError, SendError, Sender,
    SenderConfig, TerminalProgress,
};

use crate::lifecycle::{LifecycleError, State, Status};
use crate::machine::{Machine, MachineHandle};
use crate::migrate::{read_trusted_root, MachineSource};
use crate::outcome::{Outcome, StopSignal};
use crate::runctl::{ControlError, PARK_TIMEOUT};
use crate::sev_launch::{hex, PendingLaunch, PendingLaunchError};
use crate::transport::MigrationUrl;

/// How a VM ends that `shutdown` stopped while its SEV-ES launch waited for its owner.
pub const SHUT_DOWN_BEFORE_START: &str =
    "the VM was stopped by `esvm ctl shutdown` before its SEV-ES launch finished";

/// How long `shutdown` waits for the run loop to end (a snapshot being written or a
/// migration being cancelled finishes first).
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(60);

/// How long connecting to a migration destination may take.
pub use crate::transport::CONNECT_TIMEOUT;

/// The bookkeeping of the current or last migration (its place in the VM's lifecycle is the
/// lifecycle's). Its lock also orders the migration thread's end against `status` and
/// `resume`, so that they see the lifecycle and the migration's phase agree.
#[derive(Default)]
struct MigState {
    status: Option<MigrationStatus>,
    /// Present while the migration thread runs.
    cancel: Option<CancelToken>,
    /// The running migration's bandwidth cap and downtime limit (`migrate_set` changes
    /// them; the status's copies change with them, under this lock). Present while the
    /// migration thread runs.
    limits: Option<LiveLimits>,
    thread: Option<JoinHandle<()>>,
}

fn lock(m: &Mutex<MigState>) -> MutexGuard<'_, MigState> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A running machine as the control API sees it.
pub struct VmHandle {
    h: MachineHandle,
    mig: Arc<Mutex<MigState>>,
    /// A status reporting the VM as migrated (with the migration's final phase) was served.
    final_status_served: AtomicBool,
    /// An SEV-ES launch that waited (or waits) for its owner (`esvm run --wait-for-secret`).
    launch: Option<Arc<PendingLaunch>>,
    /// `shutdown` abandoned the launch before the guest started.
    shut_down_before_start: AtomicBool,
    /// The guest arrived by post-copy from this peer; its missing pages (for `status`).
    incoming: Option<(String, Arc<esvm_hv::MissingPages>)>,
}

/// A refusal of the launch that waits for its owner, as the API answers it.
fn launch_err(what: &str, e: PendingLaunchError) -> ApiError {
    let msg = format!("cannot {what}: {e}");
    match e {
        PendingLaunchError::Finished | PendingLaunchError::AlreadyInjected => {
            ApiError::invalid_state(msg)
        }
        PendingLaunchError::BadPacket(_)
        | PendingLaunchError::TooLarge { .. }
        | PendingLaunchError::Refused { .. } => ApiError::invalid_argument(msg),
        PendingLaunchError::Finish(_) | PendingLaunchError::Abandoned(_) => ApiError::failed(msg),
    }
}

fn api_err(what: &str, e: ControlError) -> ApiError {
    match e {
        ControlError::Timeout(_) => ApiError::failed(format!("{what}: {e}")),
        _ => ApiError::invalid_state(format!("cannot {what}: {e}")),
    }
}

/// A request the lifecycle refused.
fn refused(what: &str, e: LifecycleError) -> ApiError {
    ApiError::invalid_state(format!("cannot {what}: {e}"))
}

fn phase_of(p: Phase) -> MigrationPhase {
    match p {
        Phase::Handshake => MigrationPhase::Setup,
        Phase::PreCopy => MigrationPhase::PreCopy,
        Phase::StopAndCopy => MigrationPhase::StopAndCopy,
        Phase::PostCopy => MigrationPhase::PostCopy,
        Phase::Committing => MigrationPhase::Committing,
        Phase::Completed => MigrationPhase::Completed,
        Phase::Failed => MigrationPhase::Failed,
    }
}

fn apply_progress(s: &mut MigrationStatus, p: &Progress) {
    // The terminal phases are set by the migration thread together with the outcome
    // (error, downtime), so that a client never sees a terminal phase without them.
    if !phase_of(p.phase).is_terminal() {
        s.phase = phase_of(p.phase);
    }
    s.pass = p.pass;
    s.bytes_sent = p.bytes_sent;
    s.pages_sent = p.pages_sent;
    s.pages_remaining = p.pages_remaining;
    s.total_pages = p.mem_pages;
    s.dirty_rate_pages_per_sec = p.dirty_pages_per_sec;
    s.bandwidth_bytes_per_sec = p.bandwidth_bytes_per_sec;
    s.estimated_downtime_ms = p.estimated_downtime_ms;
    s.elapsed_ms = p.elapsed_ms;
    if let Some(switch_ms) = p.postcopy_switch_ms {
        let pc = s.postcopy.get_or_insert_with(PostcopyStatus::default);
        if pc.switch_ms.is_none() {
            pc.pages_at_switch = p.pass_pages_total;
        }
        pc.switch_ms = Some(switch_ms);
        pc.page_requests = p.postcopy_requests;
    }
}

/// The phase a failed migration ends in.
fn failure_phase(e: &SendError) -> MigrationPhase {
    match e {
        e if e.is_postcopy_lost() => MigrationPhase::Lost,
        e if e.is_in_doubt() => MigrationPhase::InDoubt,
        SendError::RecoveryFailed { cause, .. } if cause.is_in_doubt() => MigrationPhase::InDoubt,
        SendError::Cancelled | SendError::NotConverged { .. } => MigrationPhase::Cancelled,
        _ => MigrationPhase::Failed,
    }
}

impl VmHandle {
    /// The control API target of the machine behind `h`.
    pub fn new(h: MachineHandle) -> Self {
        VmHandle {
            h,
            mig: Arc::new(Mutex::new(MigState::default())),
            final_status_served: AtomicBool::new(false),
            launch: None,
            shut_down_before_start: AtomicBool::new(false),
            incoming: None,
        }
    }

    /// The VM arrives by post-copy from `peer` and `missing` are its pages still at the
    /// source: `status` reports that incoming migration (phase `post_copy` while pages are
    /// missing, then `completed`, or `lost` if it failed), its pages remaining, the demand
    /// faults and the time the guest waited for pages.
    pub fn with_incoming_postcopy(
        mut self,
        peer: &str,
        missing: Arc<esvm_hv::MissingPages>,
    ) -> Self {
        self.incoming = Some((format!("incoming from {peer}"), missing));
        self
    }

    /// Refuse `what` (a snapshot, a migration) while the guest's pages are still arriving by
    /// post-copy: they read guest memory wholesale, and the missing pages are not here yet.
    fn refuse_while_pages_arrive(&self, what: &str) -> Result<(), ApiError> {
        match &self.incoming {
            Some((_, missing)) if missing.active() => Err(ApiError::invalid_state(format!(
                "cannot {what}: the VM arrived by post-copy and {} of its pages are still \
                 arriving; try again once `esvm ctl status` shows the incoming migration \
                 completed",
                missing.stats().remaining
            ))),
            _ => Ok(()),
        }
    }

    /// The incoming post-copy migration as a migration status.
    fn incoming_status(&self) -> Option<MigrationStatus> {
        let (peer, missing) = self.incoming.as_ref()?;
        let st = missing.stats();
        let mut s = MigrationStatus::new(peer.clone(), 0);
        s.total_pages = self.h.config.mem_size / esvm_migration::PAGE_SIZE;
        s.pages_remaining = st.remaining;
        s.phase = if let Some(why) = missing.failure() {
            s.error = Some(why);
            MigrationPhase::Lost
        } else if missing.active() {
            MigrationPhase::PostCopy
        } else {
            MigrationPhase::Completed
        };
        s.pages_sent = st.initial - st.remaining;
        s.postcopy = Some(PostcopyStatus {
            pages_at_switch: st.initial,
            demand_faults: Some(st.demand_faults),
            fault_wait_ms: Some(st.wait_ns as f64 / 1e6),
            ..PostcopyStatus::default()
        });
        Some(s)
    }

    /// The control API target of a machine whose SEV-ES launch waits for its owner: it
    /// serves `launch_measurement` and `inject_secret`, and `resume` finishes the launch.
    pub fn with_launch(mut self, launch: Arc<PendingLaunch>) -> Self {
        self.launch = Some(launch);
        self
    }

    /// Whether an SEV-ES launch waits for its owner (no guest runs yet).
    pub fn launch_waiting(&self) -> bool {
        self.launch.as_ref().is_some_and(|l| l.is_waiting())
    }

    /// Whether `shutdown` ended the VM while its launch waited for its owner.
    pub fn shut_down_before_start(&self) -> bool {
        self.shut_down_before_start.load(Ordering::SeqCst)
    }

    /// Refuse `what` while the launch waits for its owner: the guest has not started (no run
    /// loop to stop, nothing to save or move yet).
    fn refuse_while_waiting(&self, what: &str) -> Result<(), ApiError> {
        match &self.launch {
            Some(l) if l.is_waiting() => Err(ApiError::invalid_state(format!(
                "cannot {what}: the guest has not started, its SEV-ES launch waits for its \
                 owner (`esvm ctl launch-measurement`, `esvm ctl inject-secret PACKET`, then \
                 `esvm ctl resume` starts it)"
            ))),
            _ => Ok(()),
        }
    }

    /// The launch that waits for its owner, or why there is none.
    fn waiting_launch(&self, what: &str) -> Result<&PendingLaunch, ApiError> {
        if self.h.config.vm_type != esvm_hv::VmType::SevEs {
            return Err(ApiError::unsupported(format!(
                "cannot {what}: the VM is not an SEV-ES guest (it has no launch measurement \
                 and no launch secret; run it with `esvm run --sev-es`)"
            )));
        }
        match &self.launch {
            None => Err(ApiError::invalid_state(format!(
                "cannot {what}: this SEV-ES VM did not wait for its owner; its launch finished \
                 before the guest started (start it with `esvm run --sev-es ... --api-socket \
                 PATH --wait-for-secret`; without waiting, `--measurement-out` writes the \
                 measurement)"
            ))),
            Some(l) if !l.is_waiting() => Err(launch_err(what, PendingLaunchError::Finished)),
            Some(l) => Ok(l),
        }
    }

    /// Wait for the migration thread (if any) to end. If the guest ended while a migration
    /// was running (`ended` says how), the migration is cancelled first and its status says
    /// why: `cancelled`, "the guest ended during the migration (...)". Returns whether a
    /// running migration was cancelled that way.
    pub fn finish_migration(&self, ended: &str) -> bool {
        let (thread, cancelled) = {
            let mut m = lock(&self.mig);
            let mut cancelled = false;
            if let Some(c) = &m.cancel {
                if self.h.control.lifecycle().migrated_to().is_none() {
                    c.cancel();
                    cancelled = true;
                }
            }
            (m.thread.take(), cancelled)
        };
        if let Some(t) = thread {
            let _ = t.join();
        }
        if cancelled {
            let mut m = lock(&self.mig);
            if let Some(s) = m.status.as_mut() {
                if !matches!(s.phase, MigrationPhase::Completed | MigrationPhase::InDoubt) {
                    s.phase = MigrationPhase::Cancelled;
                    s.error = Some(format!(
                        "the guest ended during the migration ({ended}), so the migration was \
                         cancelled; the destination discarded what it received"
                    ));
                }
            }
        }
        cancelled
    }

    /// After the VM ended or migrated away: keep answering `status` until a client has seen
    /// the final state or `timeout` passed, so that `esvm ctl migrate` (or a client polling
    /// `status`) sees the outcome.
    pub fn linger_for_final_status(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.final_status_served.load(Ordering::SeqCst) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stop the VM because of `signal` (the process is being stopped): a migration in
    /// flight is cancelled (unless it is committing: then its outcome decides), and the run
    /// loop ends with [`Outcome::Signalled`] once nothing is under way. Returns false if the
    /// VM had already ended.
    pub fn stop_for_signal(&self, signal: StopSignal) -> bool {
        {
            let m = lock(&self.mig);
            if let (Some(c), Some(s)) = (&m.cancel, &m.status) {
                if s.phase != MigrationPhase::Committing {
                    c.cancel();
                }
            }
        }
        self.h
            .control
            .request_stop(Outcome::Signalled(signal))
            .is_ok()
    }

    fn vm_type(&self) -> VmType {
        match self.h.config.vm_type {
            esvm_hv::VmType::Plain => VmType::Plain,
            esvm_hv::VmType::SevEs => VmType::SevEs,
        }
    }
}

impl ControlTarget for VmHandle {
    fn status(&self) -> VmStatus {
        let m = lock(&self.mig);
        let life = self.h.control.lifecycle();
        let (exit_status, end_reason) = match life.state() {
            State::Ended(e) => (Some(i32::from(e.exit_status)), Some(e.what.clone())),
            State::Migrated { url, .. } => {
                let o = Outcome::Migrated(url.clone());
                (Some(i32::from(o.exit_status())), Some(o.describe()))
            }
            _ => (None, None),
        };
        let state = match life.status() {
            Status::Starting => VmState::Starting,
            Status::Running => VmState::Running,
            Status::Paused => VmState::Paused,
            Status::Migrating => VmState::Migrating,
            Status::Migrated => VmState::Migrated,
            Status::Exited => VmState::Exited,
            Status::Failed => VmState::Failed,
        };
        let migration = m.status.clone().or_else(|| self.incoming_status());
        let final_status = match state {
            VmState::Migrated => migration.as_ref().is_some_and(|s| s.phase.is_terminal()),
            // A migration the end interrupted is final only once it reads as ended
            // (`cancelled`): a client following it must see that, not just the exit.
            VmState::Exited | VmState::Failed => {
                migration.as_ref().is_none_or(|s| s.phase.is_terminal())
            }
            _ => false,
        };
        if final_status {
            self.final_status_served.store(true, Ordering::SeqCst);
        }
        VmStatus {
            state,
            backend: self.h.config.backend.to_string(),
            vm_type: self.vm_type(),
            memory_bytes: self.h.config.mem_size,
            vcpus: self.h.config.vcpus,
            vcpu_scheduling: self.h.vcpu_scheduling,
            instructions: match self.h.config.backend {
                esvm_hv::BackendKind::Emu => Some(self.h.control.instructions()),
                esvm_hv::BackendKind::Kvm => None,
            },
            uptime_ms: self.h.control.uptime().as_millis() as u64,
            exit_status,
            end_reason,
            migration,
            launch_pending: self.launch.as_ref().is_some_and(|l| l.is_waiting()),
        }
    }

    fn pause(&self) -> Result<(), ApiError> {
        self.refuse_while_waiting("pause")?;
        self.h.control.pause().map_err(|e| refused("pause", e))?;
        self.h
            .control
            .wait_stopped(PARK_TIMEOUT)
            .map_err(|e| api_err("pause", e))
    }

    fn resume(&self) -> Result<(), ApiError> {
        if let Some(launch) = self.launch.as_ref().filter(|l| l.is_waiting()) {
            // LAUNCH_FINISH; the thread waiting for it starts the guest.
            return launch
                .finish()
                .map(|_| ())
                .map_err(|e| launch_err("resume", e));
        }
        // Under the migration lock: the migration thread cannot end meanwhile, and two
        // resumes of a VM in doubt do not both cancel its send session.
        let mut m = lock(&self.mig);
        if self.h.control.lifecycle().in_doubt() {
            // The operator resolved the doubt: the destination did not commit.
            if self.h.config.vm_type == esvm_hv::VmType::SevEs {
                // The send session is still open (SEND_FINISH comes only after a commit).
                if let Some(sev) = self.h.vm.sev() {
                    sev.send_cancel().map_err(|e| {
                        ApiError::failed(format!(
                            "cannot resume: SEND_CANCEL of the open send session failed: {e}"
                        ))
                    })?;
                }
            }
            self.h.control.resume().map_err(|e| refused("resume", e))?;
            if let Some(s) = &mut m.status {
                let note = "resumed by the operator after an in-doubt migration";
                s.error = Some(match s.error.take() {
                    Some(e) => format!("{e}; {note}"),
                    None => note.into(),
                });
            }
            return Ok(());
        }
        self.h.control.resume().map_err(|e| refused("resume", e))
    }

    fn snapshot(&self, dir: &Path) -> Result<SnapshotInfo, ApiError> {
        self.refuse_while_waiting("snapshot")?;
        self.refuse_while_pages_arrive("snapshot")?;
        // The lifecycle refuses a snapshot while another one or a migration runs, and of an
        // SEV-ES VM in doubt (its send session is still open; a sealed snapshot needs one of
        // its own).
        match crate::snapshot::save(&self.h, dir) {
            Ok(bytes) => Ok(SnapshotInfo {
                dir: dir.to_path_buf(),
                bytes_written: Some(bytes),
            }),
            Err(crate::snapshot::SnapshotError::Control(e)) => Err(api_err("snapshot", e)),
            Err(e) => Err(ApiError::failed(format!("snapshot: {e}"))),
        }
    }

    fn start_migration(&self, mut req: MigrateRequest) -> Result<(), ApiError> {
        self.refuse_while_waiting("migrate")?;
        self.refuse_while_pages_arrive("migrate")?;
        // tcp: or an absolute unix: path (fd: is for `esvm receive` only).
        let dest = req
            .url
            .parse::<MigrationUrl>()
            .and_then(MigrationUrl::for_migrate)
            .map_err(|e| ApiError::invalid_argument(e.to_string()))?;
        // Status, messages and the VM's end say where it went in one form.
        req.url = dest.to_string();
        // TLS files are read and checked now, so a wrong one is this call's error.
        let tls = match &req.tls {
            Some(t) => {
                crate::tls::check_url(&dest)
                    .map_err(|e| ApiError::invalid_argument(format!("migrate: {e}")))?;
                Some(
                    crate::tls::load_client(t)
                        .map_err(|e| ApiError::invalid_argument(format!("migrate: {e}")))?,
                )
            }
            None => None,
        };
        let trust = match &req.trust {
            Some(path) => Some(
                read_trusted_root(path).map_err(|e| ApiError::invalid_argument(e.to_string()))?,
            ),
            None => None,
        };
        let mut m = lock(&self.mig);
        // Registers the migration in the lifecycle, or says why it cannot start now.
        let mut source = MachineSource::new(self.h.clone(), req.url.clone())
            .map_err(|e| refused("migrate", e))?
            .with_trust(trust);
        if let Some(t) = m.thread.take() {
            // The previous migration thread has finished (not active); reap it.
            let _ = t.join();
        }
        let max_bandwidth = req.max_bandwidth_bytes_per_sec.filter(|&b| b > 0);
        let mut sender = Sender::new(SenderConfig {
            downtime_limit: Duration::from_millis(req.downtime_ms),
            max_bandwidth,
            timeout: Some(Duration::from_secs(req.timeout_s)),
            max_passes: req.max_passes.unwrap_or(SenderConfig::default().max_passes),
            postcopy_after: req.postcopy_after,
            on_limit: match req.on_timeout {
                OnTimeout::Cancel => LimitPolicy::Cancel,
                OnTimeout::Force => LimitPolicy::Force,
            },
            ..SenderConfig::default()
        });
        let cancel = sender.cancel_token();
        let mut status = MigrationStatus::new(&req.url, req.downtime_ms);
        status.total_pages = self.h.config.mem_size / esvm_migration::PAGE_SIZE;
        status.max_bandwidth_bytes_per_sec = max_bandwidth;
        m.status = Some(status);
        m.cancel = Some(cancel.clone());
        m.limits = Some(sender.limits());

        let shared = self.mig.clone();
        // Progress on this process's terminal too (drawn only if stderr is one).
        let bar = TerminalProgress::new();
        {
            let shared = shared.clone();
            let bar = bar.clone();
            sender.on_progress(move |p| {
                bar.update(p);
                if let Some(s) = lock(&shared).status.as_mut() {
                    apply_progress(s, p);
                }
            });
        }
        let url = req.url.clone();
        let control = self.h.control.clone();
        // The source moves to the thread (if the thread cannot start, it is dropped with the
        // closure, which ends the migration in the lifecycle).
        let thread = std::thread::Builder::new()
            .name("esvm-migrate".into())
            .spawn(move || {
                let connected = crate::tls::connect(&dest, tls.as_ref(), &|| cancel.is_cancelled());
                let result = match connected {
                    Ok(stream) => sender.run_stream(&mut source, stream),
                    Err(e) => Err(SendError::Protocol(ProtocolError::Io(
                        std::io::Error::other(e.to_string()),
                    ))),
                };
                bar.finish(&result);
                let mut m = lock(&shared);
                let s = m
                    .status
                    .get_or_insert_with(|| MigrationStatus::new(&url, 0));
                match &result {
                    Ok(o) => {
                        s.phase = MigrationPhase::Completed;
                        s.pass = o.passes;
                        s.bytes_sent = o.bytes_sent;
                        s.pages_sent = o.pages_sent;
                        s.pages_remaining = 0;
                        s.downtime_ms = Some(o.downtime.as_secs_f64() * 1e3);
                        s.elapsed_ms = o.total_time.as_millis() as u64;
                    }
                    Err(e) => {
                        s.phase = failure_phase(e);
                        s.error = Some(e.to_string());
                    }
                }
                if let Ok(o) = &result {
                    if let Some(pc) = &o.postcopy {
                        let st = s.postcopy.get_or_insert_with(PostcopyStatus::default);
                        st.switch_ms = Some(pc.switch_time.as_millis() as u64);
                        st.pages_at_switch = pc.pages_at_switch;
                        st.page_requests = pc.requests;
                    }
                }
                let lost = result.as_ref().err().filter(|e| e.is_postcopy_lost());
                let lost = lost.map(|e| e.to_string());
                // Ends the migration in the lifecycle together with its final status: a
                // failed one lets the guest run on; one that left the guest stopped stays in
                // doubt (committed ones ended at the commit).
                source.finish();
                m.cancel = None;
                m.limits = None;
                if let Some(why) = lost {
                    // The guest ran on at the destination: this copy is stale and must
                    // never run again. The VM ends here with the loss.
                    if let Err(e) = control.request_stop(Outcome::MigrationLost(why)) {
                        tracing::warn!("ending the VM after a lost post-copy migration: {e}");
                    }
                }
            });
        match thread {
            Ok(t) => {
                m.thread = Some(t);
                Ok(())
            }
            Err(e) => {
                m.cancel = None;
                m.limits = None;
                if let Some(s) = m.status.as_mut() {
                    s.phase = MigrationPhase::Failed;
                    s.error = Some(format!("cannot start the migration thread: {e}"));
                }
                Err(ApiError::failed(format!(
                    "cannot start the migration thread: {e}"
                )))
            }
        }
    }

    fn set_migration_limits(&self, req: &MigrateSetRequest) -> Result<MigrationLimits, ApiError> {
        let mut m = lock(&self.mig);
        let Some(limits) = m.limits.clone() else {
            return Err(ApiError::invalid_state(
                "cannot change the migration's limits: no migration is in progress (give \
                 them to `esvm ctl migrate` with --max-bandwidth and --downtime-ms)",
            ));
        };
        if let Some(b) = req.max_bandwidth_bytes_per_sec {
            limits.set_max_bandwidth(Some(b));
        }
        if let Some(ms) = req.downtime_ms {
            limits.set_downtime_limit(Duration::from_millis(ms));
        }
        let now = MigrationLimits {
            max_bandwidth_bytes_per_sec: limits.max_bandwidth(),
            downtime_limit_ms: limits.downtime_limit().as_millis() as u64,
        };
        if let Some(s) = m.status.as_mut() {
            s.max_bandwidth_bytes_per_sec = now.max_bandwidth_bytes_per_sec;
            s.downtime_limit_ms = now.downtime_limit_ms;
        }
        Ok(now)
    }

    fn cancel_migration(&self) -> Result<(), ApiError> {
        let m = lock(&self.mig);
        if m.cancel.is_none() {
            return Err(ApiError::invalid_state(
                "cannot cancel: no migration is in progress",
            ));
        }
        if m.status
            .as_ref()
            .is_some_and(|s| s.phase == MigrationPhase::PostCopy)
        {
            return Err(ApiError::invalid_state(
                "cannot cancel: the migration switched to post-copy; the guest runs at the \
                 destination, which still lacks pages only this VM has, so stopping now would \
                 lose it — the migration runs to its end",
            ));
        }
        if m.status
            .as_ref()
            .is_some_and(|s| s.phase == MigrationPhase::Committing)
        {
            return Err(ApiError::invalid_state(
                "cannot cancel: the migration is committing (everything was sent); its outcome \
                 is up to the destination now",
            ));
        }
        if let Some(c) = &m.cancel {
            c.cancel();
        }
        Ok(())
    }

    fn switch_to_postcopy(&self) -> Result<(), ApiError> {
        let m = lock(&self.mig);
        let Some(limits) = m.limits.clone() else {
            return Err(ApiError::invalid_state(
                "cannot switch to post-copy: no migration is in progress (start one with \
                 `esvm ctl migrate`, optionally with --postcopy-after PASSES)",
            ));
        };
        let phase = m.status.as_ref().map(|s| s.phase);
        if !matches!(phase, Some(MigrationPhase::Setup | MigrationPhase::PreCopy)) {
            return Err(ApiError::invalid_state(format!(
                "cannot switch to post-copy: the migration is in phase {} (only during setup \
                 or pre-copy)",
                phase.map_or("unknown", |p| p.as_str())
            )));
        }
        limits.request_postcopy();
        Ok(())
    }

    fn shutdown(&self) -> Result<VmStatus, ApiError> {
        if let Some(l) = self.launch.as_ref().filter(|l| l.is_waiting()) {
            // No run loop yet: the launch is given up and the process ends (status 0).
            self.shut_down_before_start.store(true, Ordering::SeqCst);
            l.abandon(SHUT_DOWN_BEFORE_START);
            let mut s = self.status();
            s.state = VmState::Exited;
            s.exit_status = Some(0);
            s.end_reason = Some(SHUT_DOWN_BEFORE_START.into());
            return Ok(s);
        }
        {
            let m = lock(&self.mig);
            if let (Some(c), Some(s)) = (&m.cancel, &m.status) {
                match s.phase {
                    MigrationPhase::StopAndCopy | MigrationPhase::Committing => {
                        return Err(ApiError::invalid_state(format!(
                            "cannot shut down: the migration to {} is in its {} phase (the \
                             guest's last state is on its way to the destination, which may \
                             already run it); wait for it to end (`esvm ctl status`)",
                            s.url,
                            s.phase.as_str().replace('_', "-")
                        )))
                    }
                    // Pre-copy (or setup): the guest still runs here; the migration is
                    // cancelled and the VM stops once it has ended.
                    _ => c.cancel(),
                }
            }
        }
        self.h
            .control
            .request_stop(Outcome::Stopped("by `esvm ctl shutdown`".into()))
            .map_err(|e| refused("shut down", e))?;
        if self.h.control.wait_ended(SHUTDOWN_TIMEOUT).is_none() {
            return Err(ApiError::failed(format!(
                "the VM is stopping but its run loop did not end within {SHUTDOWN_TIMEOUT:?} \
                 (a snapshot or migration may still be finishing); see `esvm ctl status`"
            )));
        }
        Ok(self.status())
    }

    fn launch_measurement(&self) -> Result<LaunchMeasurement, ApiError> {
        let launch = self.waiting_launch("report the launch measurement")?;
        let info = launch.info();
        let m = &info.measurement;
        Ok(LaunchMeasurement {
            measurement: hex(&m.measure),
            mnonce: hex(&m.mnonce),
            policy: info.policy.0,
            api_major: m.build.api_major,
            api_minor: m.build.api_minor,
            build: m.build.build,
            launch_digest: hex(&info.digest),
            pdh_fingerprint: info.pdh_fingerprint.clone(),
            chip_id: hex(&info.chip_id),
            secret_injected: launch.secret_injected(),
        })
    }

    fn inject_secret(&self, packet: &[u8]) -> Result<(), ApiError> {
        self.waiting_launch("inject the secret")?
            .inject_secret(packet)
            .map_err(|e| launch_err("inject the secret", e))
    }

    fn vcpus(&self) -> Result<Vec<VcpuView>, ApiError> {
        self.refuse_while_waiting("report the vCPUs")?;
        self.h
            .control
            .run_job(|m: &mut Machine| {
                (0..m.config().vcpus)
                    .map(|id| {
                        let mut view = vcpu_view(id, m.clean_vcpu(id)?);
                        view.run_state = m
                            .vcpu_run_states()
                            .get(id as usize)
                            .map(|s| s.name().to_string());
                        Ok(view)
                    })
                    .collect::<Result<Vec<_>, crate::machine::MachineError>>()
            })
            .map_err(|e| api_err("report the vCPUs", e))?
            .map_err(|e| ApiError::failed(format!("cannot report the vCPUs: {e}")))
    }
}

/// vCPU `id` as the hypervisor sees it; for a protected vCPU also its VMSA's control
/// registers as the firmware's DBG_DECRYPT shows them (where the policy allows).
fn vcpu_view(id: u32, v: &dyn esvm_hv::Vcpu) -> VcpuView {
    let regs = |cr0, cr4, cr8, efer| ControlRegs {
        cr0,
        cr4,
        cr8,
        efer,
    };
    let (control, apic_base) = match v.get_sregs_view() {
        Ok(s) => (regs(s.cr0(), s.cr4(), s.cr8(), s.efer()), s.apic_base()),
        Err(_) => (regs(0, 0, 0, 0), 0),
    };
    let protected = v.is_protected();
    let (mut debug_vmsa, mut debug_vmsa_refused) = (None, None);
    if protected {
        match v.sev().map(|s| s.debug_vmsa()) {
            Some(Ok(page)) => match esvm_arch::Vmsa::from_bytes(&page[..]) {
                Ok(vmsa) => {
                    debug_vmsa = Some(regs(vmsa.cr0(), vmsa.cr4(), vmsa.cr8(), vmsa.efer()))
                }
                Err(e) => debug_vmsa_refused = Some(e.to_string()),
            },
            Some(Err(e)) => debug_vmsa_refused = Some(e.to_string()),
            None => debug_vmsa_refused = Some("the backend has no SEV-ES support".into()),
        }
    }
    VcpuView {
        id,
        protected,
        control,
        apic_base,
        registers_refused: v.get_regs().err().map(|e| e.to_string()),
        debug_vmsa,
        debug_vmsa_refused,
        run_state: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::MachineConfig;
    use esvm_control::ErrorCode;

    /// The control API names run states as snapshots spell them.
    #[test]
    fn run_state_names_are_the_serialized_ones() {
        use crate::machine::VcpuRunState as S;
        for s in [S::Running, S::Halted, S::WaitForSipi, S::ApResetHold] {
            assert_eq!(
                serde_json::to_value(s).unwrap(),
                serde_json::Value::String(s.name().into())
            );
        }
    }

    fn machine() -> Machine {
        let config = MachineConfig {
            backend: esvm_hv::BackendKind::Emu,
            vm_type: esvm_hv::VmType::Plain,
            mem_size: 2 << 20,
            vcpus: 1,
            max_instructions: None,
        };
        Machine::new(&config, Box::new(std::io::sink())).unwrap()
    }

    /// A migration past pre-copy cannot be shut down (its outcome decides where the VM
    /// runs); nothing is cancelled or stopped by the refusal.
    #[test]
    fn shutdown_is_refused_during_stop_and_copy_and_commit() {
        let m = machine();
        let vm = VmHandle::new(m.handle());
        for phase in [MigrationPhase::StopAndCopy, MigrationPhase::Committing] {
            let token = CancelToken::new();
            {
                let mut mig = lock(&vm.mig);
                let mut s = MigrationStatus::new("tcp:h:1", 300);
                s.phase = phase;
                mig.status = Some(s);
                mig.cancel = Some(token.clone());
            }
            let e = vm.shutdown().unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidState);
            assert!(e.message.contains(&phase.as_str().replace('_', "-")), "{e}");
            assert!(!token.is_cancelled());
            assert!(m.control().lifecycle().alive().is_ok());
        }
    }

    /// Once the VM ended, a shutdown says so.
    #[test]
    fn shutdown_of_an_ended_vm_is_refused() {
        let mut m = machine();
        let vm = VmHandle::new(m.handle());
        m.control()
            .request_stop(Outcome::Stopped("by a test".into()))
            .unwrap();
        assert_eq!(m.run().unwrap(), Outcome::Stopped("by a test".into()));
        let s = vm.status();
        assert_eq!(s.state, VmState::Exited);
        assert_eq!(s.exit_status, Some(0));
        assert_eq!(
            s.end_reason.as_deref(),
            Some("the VM was stopped by a test")
        );
        let e = vm.shutdown().unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidState);
        assert!(e.message.starts_with("cannot shut down: "), "{e}");
    }
}
