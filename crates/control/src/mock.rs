//! A scripted, in-memory [`ControlTarget`] for tests and demos.
//!
//! Time does not pass on its own: every [`ControlTarget::status`] call advances the VM by a
//! fixed number of instructions and a running migration by one step, so tests are
//! deterministic. The migration's script is chosen by its URL:
//!
//! * a URL containing `fail`: setup, one pre-copy pass, then `failed` (the VM runs on);
//! * a URL containing `hang`: pre-copy passes forever, until cancelled;
//! * any other URL: setup, two pre-copy passes, stop-and-copy, committing, `completed`
//!   (the VM is then `migrated`).
//!
//! [`MockTarget::launch_pending`] is an SEV-ES VM whose launch waits for its owner: it
//! reports a fixed measurement, refuses a secret packet that starts with `bad` (as the
//! firmware refuses one whose MAC does not verify) and accepts one other packet, and
//! `resume` finishes the launch and starts it.

use crate::protocol::{
    ApiError, LaunchMeasurement, MigrateRequest, MigrateSetRequest, MigrationLimits,
    MigrationPhase, MigrationStatus, SnapshotInfo, VmState, VmStatus, VmType,
};
use crate::target::ControlTarget;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

/// Instructions "executed" per status call while running.
pub const MOCK_INSTRUCTIONS_PER_STATUS: u64 = 1000;
/// Pages of the mock guest.
pub const MOCK_PAGES: u64 = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Script {
    Complete,
    Fail,
    Hang,
}

#[derive(Debug)]
struct Migration {
    status: MigrationStatus,
    script: Script,
    /// State to return to when the migration fails or is cancelled.
    resume_to: VmState,
}

#[derive(Debug)]
struct State {
    state: VmState,
    vm_type: VmType,
    instructions: u64,
    status_calls: u64,
    migration: Option<Migration>,
    migrate_requests: Vec<MigrateRequest>,
    snapshots: Vec<PathBuf>,
    panic_on_snapshot: bool,
    /// Once the VM ended: its exit status and how it ended.
    ended: Option<(i32, String)>,
    /// A launch waiting for its owner: the secret packets accepted so far (at most one).
    launch: Option<Vec<Vec<u8>>>,
}

/// A fake VM; see the module documentation.
#[derive(Debug)]
pub struct MockTarget {
    inner: Mutex<State>,
}

impl Default for MockTarget {
    fn default() -> Self {
        Self::new(VmType::Plain)
    }
}

impl MockTarget {
    /// A running VM of the given type (1 vCPU, 1 MiB, backend "mock").
    pub fn new(vm_type: VmType) -> Self {
        MockTarget {
            inner: Mutex::new(State {
                state: VmState::Running,
                vm_type,
                instructions: 0,
                status_calls: 0,
                migration: None,
                migrate_requests: Vec::new(),
                snapshots: Vec::new(),
                panic_on_snapshot: false,
                ended: None,
                launch: None,
            }),
        }
    }

    /// An SEV-ES VM whose launch is measured and waits for its owner (state `starting`).
    pub fn launch_pending() -> Self {
        let t = Self::new(VmType::SevEs);
        {
            let mut st = t.lock();
            st.state = VmState::Starting;
            st.launch = Some(Vec::new());
        }
        t
    }

    /// The secret packets the waiting launch accepted.
    pub fn injected_secrets(&self) -> Vec<Vec<u8>> {
        self.lock().launch.clone().unwrap_or_default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The VM's state, without advancing anything.
    pub fn state(&self) -> VmState {
        self.lock().state
    }

    /// The migrate requests received, in order.
    pub fn migrate_requests(&self) -> Vec<MigrateRequest> {
        self.lock().migrate_requests.clone()
    }

    /// The directories snapshots were written to, in order.
    pub fn snapshots(&self) -> Vec<PathBuf> {
        self.lock().snapshots.clone()
    }

    /// Makes `snapshot` panic (to exercise the server's panic handling).
    pub fn set_panic_on_snapshot(&self, on: bool) {
        self.lock().panic_on_snapshot = on;
    }

    fn advance(st: &mut State) {
        st.status_calls += 1;
        if matches!(st.state, VmState::Running | VmState::Migrating) {
            st.instructions += MOCK_INSTRUCTIONS_PER_STATUS;
        }
        let Some(m) = &mut st.migration else {
            return;
        };
        if m.status.phase.is_terminal() {
            return;
        }
        let s = &mut m.status;
        s.elapsed_ms += 10;
        use MigrationPhase::*;
        let next = match (m.script, s.phase, s.pass) {
            (_, Setup, _) => PreCopy,
            (Script::Fail, PreCopy, _) => Failed,
            (Script::Hang, PreCopy, _) => PreCopy,
            (Script::Complete, PreCopy, p) if p < 2 => PreCopy,
            (Script::Complete, PreCopy, _) => StopAndCopy,
            (_, StopAndCopy, _) => Committing,
            (_, Committing, _) => Completed,
            (_, phase, _) => phase,
        };
        match next {
            PreCopy => {
                s.pass += 1;
                let pages = if s.pass == 1 { MOCK_PAGES } else { 16 };
                s.pages_sent += pages;
                s.bytes_sent += pages * 4096;
                s.pages_remaining = 16;
                s.dirty_rate_pages_per_sec = 1600.0;
                s.bandwidth_bytes_per_sec = 100.0 * 1024.0 * 1024.0;
                s.estimated_downtime_ms = Some(0.6);
            }
            StopAndCopy => {
                st.state = VmState::Migrating;
                s.pages_sent += s.pages_remaining;
                s.bytes_sent += s.pages_remaining * 4096;
                s.pages_remaining = 0;
            }
            Committing => {}
            Completed => {
                s.downtime_ms = Some(0.7);
                st.state = VmState::Migrated;
            }
            Failed => {
                s.error = Some(format!(
                    "mock: the destination closed the connection during pass {}",
                    s.pass
                ));
                st.state = m.resume_to;
            }
            _ => {}
        }
        s.phase = next;
    }
}

impl ControlTarget for MockTarget {
    fn status(&self) -> VmStatus {
        let mut st = self.lock();
        Self::advance(&mut st);
        VmStatus {
            state: st.state,
            backend: "mock".into(),
            vm_type: st.vm_type,
            memory_bytes: MOCK_PAGES * 4096,
            vcpus: 1,
            vcpu_scheduling: None,
            instructions: Some(st.instructions),
            uptime_ms: st.status_calls * 10,
            exit_status: st.ended.as_ref().map(|e| e.0),
            end_reason: st.ended.as_ref().map(|e| e.1.clone()),
            migration: st.migration.as_ref().map(|m| m.status.clone()),
            launch_pending: st.launch.is_some(),
        }
    }

    fn pause(&self) -> Result<(), ApiError> {
        let mut st = self.lock();
        if st.state != VmState::Running {
            return Err(ApiError::invalid_state(format!(
                "cannot pause: the VM is {}",
                st.state
            )));
        }
        st.state = VmState::Paused;
        Ok(())
    }

    fn resume(&self) -> Result<(), ApiError> {
        let mut st = self.lock();
        if st.launch.take().is_some() {
            st.state = VmState::Running;
            return Ok(());
        }
        if st.state != VmState::Paused {
            return Err(ApiError::invalid_state(format!(
                "cannot resume: the VM is {}, not paused",
                st.state
            )));
        }
        st.state = VmState::Running;
        Ok(())
    }

    fn snapshot(&self, dir: &Path) -> Result<SnapshotInfo, ApiError> {
        let mut st = self.lock();
        if st.panic_on_snapshot {
            drop(st);
            panic!("mock: snapshot exploded");
        }
        if !matches!(st.state, VmState::Running | VmState::Paused) {
            return Err(ApiError::invalid_state(format!(
                "cannot snapshot: the VM is {}",
                st.state
            )));
        }
        let write = || -> std::io::Result<u64> {
            std::fs::create_dir_all(dir)?;
            let body = format!(
                "{{\"state\":\"{}\",\"instructions\":{}}}\n",
                st.state, st.instructions
            );
            std::fs::write(dir.join("mock-snapshot.json"), &body)?;
            Ok(body.len() as u64)
        };
        let bytes = write()
            .map_err(|e| ApiError::failed(format!("cannot write the snapshot to {dir:?}: {e}")))?;
        st.snapshots.push(dir.to_path_buf());
        Ok(SnapshotInfo {
            dir: dir.to_path_buf(),
            bytes_written: Some(bytes),
        })
    }

    fn start_migration(&self, req: MigrateRequest) -> Result<(), ApiError> {
        let mut st = self.lock();
        if let Some(m) = &st.migration {
            if !m.status.phase.is_terminal() {
                return Err(ApiError::invalid_state(format!(
                    "a migration to {} is already running; cancel it first",
                    m.status.url
                )));
            }
        }
        if !matches!(st.state, VmState::Running | VmState::Paused) {
            return Err(ApiError::invalid_state(format!(
                "cannot migrate: the VM is {}",
                st.state
            )));
        }
        let script = if req.url.contains("fail") {
            Script::Fail
        } else if req.url.contains("hang") {
            Script::Hang
        } else {
            Script::Complete
        };
        let mut status = MigrationStatus::new(req.url.clone(), req.downtime_ms);
        status.total_pages = MOCK_PAGES;
        status.max_bandwidth_bytes_per_sec = req.max_bandwidth_bytes_per_sec.filter(|&b| b > 0);
        st.migration = Some(Migration {
            status,
            script,
            resume_to: st.state,
        });
        st.state = VmState::Migrating;
        st.migrate_requests.push(req);
        Ok(())
    }

    fn launch_measurement(&self) -> Result<LaunchMeasurement, ApiError> {
        let st = self.lock();
        let Some(secrets) = &st.launch else {
            return Err(ApiError::invalid_state(
                "no launch waits for its owner (mock)",
            ));
        };
        Ok(LaunchMeasurement {
            measurement: "11".repeat(32),
            mnonce: "22".repeat(16),
            policy: 0x4,
            api_major: 0,
            api_minor: 24,
            build: 1,
            launch_digest: "33".repeat(32),
            pdh_fingerprint: "mock-pdh".into(),
            chip_id: "44".repeat(64),
            secret_injected: !secrets.is_empty(),
        })
    }

    fn inject_secret(&self, packet: &[u8]) -> Result<(), ApiError> {
        let mut st = self.lock();
        let Some(secrets) = &mut st.launch else {
            return Err(ApiError::invalid_state(
                "no launch waits for its owner (mock)",
            ));
        };
        if !secrets.is_empty() {
            return Err(ApiError::invalid_state(
                "a secret was injected already (mock)",
            ));
        }
        if packet.starts_with(b"bad") {
            return Err(ApiError::invalid_argument(
                "the secret's MAC does not verify (mock)",
            ));
        }
        secrets.push(packet.to_vec());
        Ok(())
    }

    fn set_migration_limits(&self, req: &MigrateSetRequest) -> Result<MigrationLimits, ApiError> {
        let mut st = self.lock();
        match &mut st.migration {
            Some(m) if !m.status.phase.is_terminal() => {
                if let Some(b) = req.max_bandwidth_bytes_per_sec {
                    m.status.max_bandwidth_bytes_per_sec = (b > 0).then_some(b);
                }
                if let Some(ms) = req.downtime_ms {
                    m.status.downtime_limit_ms = ms;
                }
                Ok(MigrationLimits {
                    max_bandwidth_bytes_per_sec: m.status.max_bandwidth_bytes_per_sec,
                    downtime_limit_ms: m.status.downtime_limit_ms,
                })
            }
            _ => Err(ApiError::invalid_state(
                "cannot change the migration's limits: no migration is running",
            )),
        }
    }

    fn cancel_migration(&self) -> Result<(), ApiError> {
        let mut st = self.lock();
        let st = &mut *st;
        match &mut st.migration {
            Some(m) if !m.status.phase.is_terminal() => {
                if matches!(m.status.phase, MigrationPhase::Committing) {
                    return Err(ApiError::invalid_state(
                        "the migration is committing and can no longer be cancelled",
                    ));
                }
                m.status.phase = MigrationPhase::Cancelled;
                m.status.error = Some("cancelled by request".into());
                st.state = m.resume_to;
                Ok(())
            }
            _ => Err(ApiError::invalid_state("no migration is running")),
        }
    }

    /// Refused during stop-and-copy and commit; cancels a migration in pre-copy; the VM
    /// ends with status 0.
    fn shutdown(&self) -> Result<VmStatus, ApiError> {
        {
            let mut st = self.lock();
            let st = &mut *st;
            if !matches!(
                st.state,
                VmState::Running | VmState::Paused | VmState::Migrating
            ) {
                return Err(ApiError::invalid_state(format!(
                    "cannot shut down: the VM is {}",
                    st.state
                )));
            }
            if let Some(m) = &mut st.migration {
                match m.status.phase {
                    MigrationPhase::StopAndCopy | MigrationPhase::Committing => {
                        return Err(ApiError::invalid_state(
                            "cannot shut down: the migration is past pre-copy",
                        ))
                    }
                    p if !p.is_terminal() => m.status.phase = MigrationPhase::Cancelled,
                    _ => {}
                }
            }
            st.state = VmState::Exited;
            st.ended = Some((0, "the VM was stopped by `esvm ctl shutdown`".into()));
        }
        Ok(self.status())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_to_end(t: &MockTarget) -> Vec<MigrationPhase> {
        let mut phases = Vec::new();
        for _ in 0..20 {
            let m = t.status().migration.unwrap();
            phases.push(m.phase);
            if m.phase.is_terminal() {
                return phases;
            }
        }
        panic!("the mock migration did not end: {phases:?}");
    }

    #[test]
    fn scripts() {
        use MigrationPhase::*;
        let t = MockTarget::default();
        t.start_migration(MigrateRequest::new("tcp://ok")).unwrap();
        assert_eq!(
            run_to_end(&t),
            [PreCopy, PreCopy, StopAndCopy, Committing, Completed]
        );
        assert_eq!(t.state(), VmState::Migrated);
        assert!(t.pause().is_err());
        assert!(t.start_migration(MigrateRequest::new("tcp://ok")).is_err());

        let t = MockTarget::default();
        t.pause().unwrap();
        t.start_migration(MigrateRequest::new("tcp://fail"))
            .unwrap();
        assert_eq!(run_to_end(&t), [PreCopy, Failed]);
        assert_eq!(t.state(), VmState::Paused);

        let t = MockTarget::default();
        t.start_migration(MigrateRequest::new("tcp://hang"))
            .unwrap();
        assert!(t.start_migration(MigrateRequest::new("tcp://x")).is_err());
        for _ in 0..5 {
            assert_eq!(t.status().migration.unwrap().phase, PreCopy);
        }
        t.cancel_migration().unwrap();
        assert_eq!(t.status().migration.unwrap().phase, Cancelled);
        assert_eq!(t.state(), VmState::Running);
        assert!(t.cancel_migration().is_err());
    }

    #[test]
    fn shutdown_ends_the_vm() {
        let t = MockTarget::default();
        t.start_migration(MigrateRequest::new("tcp://hang"))
            .unwrap();
        let end = t.shutdown().unwrap();
        assert_eq!(end.state, VmState::Exited);
        assert_eq!(end.exit_status, Some(0));
        assert!(end.end_reason.unwrap().contains("shutdown"));
        assert_eq!(
            t.status().migration.unwrap().phase,
            MigrationPhase::Cancelled
        );
        assert_eq!(
            t.shutdown().unwrap_err().code,
            crate::ErrorCode::InvalidState
        );

        let t = MockTarget::default();
        t.start_migration(MigrateRequest::new("tcp://ok")).unwrap();
        while t.status().migration.unwrap().phase != MigrationPhase::StopAndCopy {}
        let e = t.shutdown().unwrap_err();
        assert_eq!(e.code, crate::ErrorCode::InvalidState);
        assert!(e.message.contains("pre-copy"), "{e}");
    }
}
