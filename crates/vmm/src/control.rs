//! The control API of a running machine: [`VmHandle`] implements
//! [`esvm_control::ControlTarget`] (status, pause, resume, snapshot, migrate, cancel) on top
//! of the machine's [`VmControl`](crate::machine::VmControl), and runs live migrations on a
//! background thread.
//!
//! States as `status` reports them: `starting` (the run loop has not started), `running`,
//! `paused` (a user pause, a snapshot being written, or a migration left in doubt),
//! `migrating` (a migration is under way: the guest runs during pre-copy and is stopped
//! during stop-and-copy), `migrated` (the destination committed: dead here), `exited`, and
//! `failed` (the guest shut down or terminated, or the VMM failed).

use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use esvm_control::{
    ApiError, ControlTarget, MigrateRequest, MigrationPhase, MigrationStatus, OnTimeout,
    SnapshotInfo, VmState, VmStatus, VmType,
};
use esvm_migration::{
    CancelToken, LimitPolicy, Phase, Progress, ProtocolError, SendError, Sender, SenderConfig,
    TerminalProgress,
};

use crate::machine::MachineHandle;
use crate::migrate::{parse_tcp_url, read_trusted_root, MachineSource};
use crate::runctl::{ControlError, LoopEnd, PARK_TIMEOUT};

/// How long connecting to a migration destination may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Default)]
struct MigState {
    status: Option<MigrationStatus>,
    active: bool,
    cancel: Option<CancelToken>,
    thread: Option<JoinHandle<()>>,
    /// The last migration ended in doubt and left the guest stopped under its hold.
    in_doubt_hold: bool,
    snapshot_running: bool,
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
}

fn api_err(what: &str, e: ControlError) -> ApiError {
    match e {
        ControlError::Timeout(_) => ApiError::failed(format!("{what}: {e}")),
        _ => ApiError::invalid_state(format!("cannot {what}: {e}")),
    }
}

fn phase_of(p: Phase) -> MigrationPhase {
    match p {
        Phase::Handshake => MigrationPhase::Setup,
        Phase::PreCopy => MigrationPhase::PreCopy,
        Phase::StopAndCopy => MigrationPhase::StopAndCopy,
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
}

/// The phase a failed migration ends in.
fn failure_phase(e: &SendError) -> MigrationPhase {
    match e {
        e if e.is_in_doubt() => MigrationPhase::InDoubt,
        SendError::RecoveryFailed { cause, .. } if cause.is_in_doubt() => MigrationPhase::InDoubt,
        SendError::Cancelled | SendError::NotConverged { .. } => MigrationPhase::Cancelled,
        _ => MigrationPhase::Failed,
    }
}

fn connect(addr: &str, cancel: &CancelToken) -> Result<TcpStream, String> {
    let addrs: Vec<_> = addr
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {addr}: {e}"))?
        .collect();
    let mut last = format!("{addr} resolves to no address");
    for a in addrs {
        if cancel.is_cancelled() {
            return Err("cancelled before connecting".into());
        }
        match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
            Ok(s) => return Ok(s),
            Err(e) => last = format!("{a}: {e}"),
        }
    }
    Err(last)
}

impl VmHandle {
    pub fn new(h: MachineHandle) -> Self {
        VmHandle {
            h,
            mig: Arc::new(Mutex::new(MigState::default())),
            final_status_served: AtomicBool::new(false),
        }
    }

    /// Wait for the migration thread (if any) to end. If the guest ended while a migration
    /// was running, the migration is cancelled first.
    pub fn finish_migration(&self) {
        let thread = {
            let mut m = lock(&self.mig);
            if let Some(c) = &m.cancel {
                if m.active && self.h.control.view().dead.is_none() {
                    c.cancel();
                }
            }
            m.thread.take()
        };
        if let Some(t) = thread {
            let _ = t.join();
        }
    }

    /// After the VM migrated away: keep answering `status` until a client has seen the
    /// final state or `timeout` passed, so that `esvm ctl migrate` sees the outcome.
    pub fn linger_for_final_status(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.final_status_served.load(Ordering::SeqCst) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn vm_type(&self) -> VmType {
        match self.h.config.vm_type {
            esvm_hv::VmType::Plain => VmType::Plain,
            esvm_hv::VmType::SevEs => VmType::SevEs,
        }
    }

    /// Refuse if the VM cannot be operated any more (dead or ended).
    fn check_alive(&self, what: &str) -> Result<(), ApiError> {
        let v = self.h.control.view();
        if let Some(url) = v.dead.or(match &v.ended {
            Some(LoopEnd::Migrated(u)) => Some(u.clone()),
            _ => None,
        }) {
            return Err(ApiError::invalid_state(format!(
                "cannot {what}: the VM migrated to {url}; it runs there now and can never run \
                 here again"
            )));
        }
        if let Some(LoopEnd::Finished { what: how, .. }) = v.ended {
            return Err(ApiError::invalid_state(format!(
                "cannot {what}: the VM is not running any more ({how})"
            )));
        }
        Ok(())
    }
}

impl ControlTarget for VmHandle {
    fn status(&self) -> VmStatus {
        let v = self.h.control.view();
        let m = lock(&self.mig);
        let mut exit_status = None;
        let state = if v.dead.is_some() || matches!(v.ended, Some(LoopEnd::Migrated(_))) {
            VmState::Migrated
        } else if let Some(LoopEnd::Finished {
            exit_status: code,
            failed,
            ..
        }) = &v.ended
        {
            exit_status = Some(i32::from(*code));
            if *failed {
                VmState::Failed
            } else {
                VmState::Exited
            }
        } else if m.active {
            VmState::Migrating
        } else if v.user_paused || v.holds > 0 {
            VmState::Paused
        } else if !v.started {
            VmState::Starting
        } else {
            VmState::Running
        };
        let migration = m.status.clone();
        if state == VmState::Migrated && migration.as_ref().is_some_and(|s| s.phase.is_terminal()) {
            self.final_status_served.store(true, Ordering::SeqCst);
        }
        VmStatus {
            state,
            backend: self.h.config.backend.to_string(),
            vm_type: self.vm_type(),
            memory_bytes: self.h.config.mem_size,
            vcpus: self.h.config.vcpus,
            instructions: match self.h.config.backend {
                esvm_hv::BackendKind::Emu => Some(self.h.control.instructions()),
                esvm_hv::BackendKind::Kvm => None,
            },
            uptime_ms: self.h.control.uptime().as_millis() as u64,
            exit_status,
            migration,
        }
    }

    fn pause(&self) -> Result<(), ApiError> {
        self.check_alive("pause")?;
        {
            let m = lock(&self.mig);
            if m.active {
                return Err(ApiError::invalid_state(
                    "cannot pause: a migration is in progress (it pauses the guest itself for \
                     stop-and-copy); cancel it first with `esvm ctl cancel`",
                ));
            }
            if m.in_doubt_hold {
                return Err(ApiError::invalid_state(
                    "cannot pause: the VM is paused (left stopped by a migration whose outcome \
                     is in doubt)",
                ));
            }
            if self.h.control.view().user_paused {
                return Err(ApiError::invalid_state("cannot pause: the VM is paused"));
            }
            self.h
                .control
                .set_user_paused(true)
                .map_err(|e| api_err("pause", e))?;
        }
        self.h
            .control
            .wait_stopped(PARK_TIMEOUT)
            .map_err(|e| api_err("pause", e))
    }

    fn resume(&self) -> Result<(), ApiError> {
        self.check_alive("resume")?;
        let mut m = lock(&self.mig);
        if m.active {
            return Err(ApiError::invalid_state(
                "cannot resume: a migration is in progress; it resumes the guest itself if it \
                 fails",
            ));
        }
        if m.in_doubt_hold {
            // The operator resolved the doubt: the destination did not commit.
            if self.h.config.vm_type == esvm_hv::VmType::SevEs {
                // The send session is still open (SEND_FINISH comes only after a commit).
                if let Some(emu) = &self.h.emu {
                    emu.sev_send_cancel().map_err(|e| {
                        ApiError::failed(format!(
                            "cannot resume: SEND_CANCEL of the open send session failed: {e}"
                        ))
                    })?;
                }
            }
            m.in_doubt_hold = false;
            self.h.control.release();
            if let Some(s) = &mut m.status {
                let note = "resumed by the operator after an in-doubt migration";
                s.error = Some(match s.error.take() {
                    Some(e) => format!("{e}; {note}"),
                    None => note.into(),
                });
            }
            return Ok(());
        }
        if m.snapshot_running || !self.h.control.view().user_paused {
            return Err(ApiError::invalid_state(
                "cannot resume: the VM is not paused",
            ));
        }
        self.h
            .control
            .set_user_paused(false)
            .map_err(|e| api_err("resume", e))
    }

    fn snapshot(&self, dir: &Path) -> Result<SnapshotInfo, ApiError> {
        self.check_alive("snapshot")?;
        {
            let mut m = lock(&self.mig);
            if m.in_doubt_hold && self.h.config.vm_type == esvm_hv::VmType::SevEs {
                // Its send session is still open: a sealed snapshot needs one of its own.
                return Err(ApiError::invalid_state(
                    "cannot snapshot: the last migration's outcome is in doubt and its send \
                     session is still open; if the destination does not run the VM, `esvm ctl \
                     resume` first",
                ));
            }
            if m.active {
                return Err(ApiError::invalid_state(
                    "cannot snapshot: a migration is in progress",
                ));
            }
            if m.snapshot_running {
                return Err(ApiError::invalid_state(
                    "cannot snapshot: another snapshot is being written",
                ));
            }
            m.snapshot_running = true;
        }
        let result = crate::snapshot::save(&self.h, dir);
        lock(&self.mig).snapshot_running = false;
        match result {
            Ok(bytes) => Ok(SnapshotInfo {
                dir: dir.to_path_buf(),
                bytes_written: Some(bytes),
            }),
            Err(crate::snapshot::SnapshotError::Control(e)) => Err(api_err("snapshot", e)),
            Err(e) => Err(ApiError::failed(format!("snapshot: {e}"))),
        }
    }

    fn start_migration(&self, req: MigrateRequest) -> Result<(), ApiError> {
        let addr =
            parse_tcp_url(&req.url).map_err(|e| ApiError::invalid_argument(e.to_string()))?;
        let trust = match &req.trust {
            Some(path) => Some(
                read_trusted_root(path).map_err(|e| ApiError::invalid_argument(e.to_string()))?,
            ),
            None => None,
        };
        self.check_alive("migrate")?;
        let mut m = lock(&self.mig);
        if m.active {
            return Err(ApiError::invalid_state(
                "cannot migrate: a migration is already in progress",
            ));
        }
        if m.in_doubt_hold {
            return Err(ApiError::invalid_state(
                "cannot migrate: the last migration's outcome is in doubt and the VM stays \
                 paused; if the destination does not run the VM, `esvm ctl resume` first",
            ));
        }
        if m.snapshot_running {
            return Err(ApiError::invalid_state(
                "cannot migrate: a snapshot is being written",
            ));
        }
        if let Some(t) = m.thread.take() {
            // The previous migration thread has finished (not active); reap it.
            let _ = t.join();
        }
        let mut sender = Sender::new(SenderConfig {
            downtime_limit: Duration::from_millis(req.downtime_ms),
            timeout: Some(Duration::from_secs(req.timeout_s)),
            max_passes: req.max_passes.unwrap_or(SenderConfig::default().max_passes),
            on_limit: match req.on_timeout {
                OnTimeout::Cancel => LimitPolicy::Cancel,
                OnTimeout::Force => LimitPolicy::Force,
            },
            ..SenderConfig::default()
        });
        let cancel = sender.cancel_token();
        let mut status = MigrationStatus::new(&req.url, req.downtime_ms);
        status.total_pages = self.h.config.mem_size / esvm_migration::PAGE_SIZE;
        m.status = Some(status);
        m.active = true;
        m.cancel = Some(cancel.clone());

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
        let h = self.h.clone();
        let url = req.url.clone();
        let thread = std::thread::Builder::new()
            .name("esvm-migrate".into())
            .spawn(move || {
                let (result, held) = match connect(&addr, &cancel) {
                    Ok(stream) => {
                        let mut source = MachineSource::new(h, url.clone()).with_trust(trust);
                        let r = sender.run_tcp(&mut source, stream);
                        (r, source.still_held())
                    }
                    Err(e) => (
                        Err(SendError::Protocol(ProtocolError::Io(
                            std::io::Error::other(format!(
                                "cannot connect to the destination {url}: {e}"
                            )),
                        ))),
                        false,
                    ),
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
                m.in_doubt_hold = held;
                m.active = false;
                m.cancel = None;
            });
        match thread {
            Ok(t) => {
                m.thread = Some(t);
                Ok(())
            }
            Err(e) => {
                m.active = false;
                m.cancel = None;
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

    fn cancel_migration(&self) -> Result<(), ApiError> {
        let m = lock(&self.mig);
        if !m.active {
            return Err(ApiError::invalid_state(
                "cannot cancel: no migration is in progress",
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
}
