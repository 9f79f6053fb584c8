//! Running a machine as a process does: `esvm run`, `esvm receive` and `esvm restore` all
//! end here. Serves the control API while the guest runs (if asked) and returns how the run
//! ended; the binary says so on stderr and maps it to the process's exit status
//! ([`Outcome::exit_status`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use esvm_control::{ApiServer, ControlTarget, ServerError};
use thiserror::Error;

use crate::control::VmHandle;
use crate::lifecycle::LifecycleError;
use crate::machine::{Machine, MachineError};
use crate::outcome::Outcome;

/// How long a source whose VM migrated away (or ended during a migration) keeps its API
/// socket open so that a client following the migration (`esvm ctl migrate`) can read the
/// final status.
pub const MIGRATED_LINGER: Duration = Duration::from_secs(3);

/// How to run a machine.
#[derive(Debug, Default, Clone)]
pub struct RunOptions {
    /// Serve the control API on this Unix socket while the guest runs.
    pub api_socket: Option<PathBuf>,
    /// Start with the guest paused (until `esvm ctl resume`).
    pub start_paused: bool,
}

/// Why a machine could not be run as a process.
#[allow(missing_docs)] // Each variant is documented by its #[error] message.
#[derive(Debug, Error)]
pub enum SessionError {
    #[error("--start-paused needs --api-socket (to resume the guest)")]
    StartPausedWithoutSocket,
    #[error("cannot start the guest paused: {0}")]
    StartPaused(#[source] LifecycleError),
    #[error(transparent)]
    Api(#[from] ServerError),
    #[error(transparent)]
    Machine(#[from] MachineError),
}

/// Run `machine` to its end with the control API (if asked). Returns how the run ended.
pub fn run(machine: &mut Machine, opts: &RunOptions) -> Result<Outcome, SessionError> {
    let handle = Arc::new(VmHandle::new(machine.handle()));
    if opts.start_paused {
        if opts.api_socket.is_none() {
            return Err(SessionError::StartPausedWithoutSocket);
        }
        // Before the socket exists: a client can never see the VM unpaused.
        machine
            .control()
            .pause()
            .map_err(SessionError::StartPaused)?;
    }
    let mut server = match &opts.api_socket {
        Some(path) => {
            let server =
                ApiServer::spawn(path, handle.clone() as Arc<dyn ControlTarget + Send + Sync>)?;
            // One line a script or a person can wait for.
            eprintln!("esvm: API socket ready at {}", path.display());
            Some(server)
        }
        None => None,
    };
    let outcome = machine.run();
    if let (Ok(o), Some(n)) = (&outcome, machine.instructions()) {
        // Deterministic on the emu backend: the same inputs retire the same count.
        tracing::info!(instructions = n, "{}", o.describe());
    }
    // A migration still running when the guest ended is cancelled; one that committed has
    // finished its bookkeeping (status `completed`) once the thread is joined.
    let ended = match &outcome {
        Ok(o) => o.describe(),
        Err(e) => format!("the VMM failed: {e}"),
    };
    let cancelled = handle.finish_migration(&ended);
    // A client following the migration (`esvm ctl migrate`) reads how it ended.
    if server.is_some() && (cancelled || matches!(outcome, Ok(Outcome::Migrated(_)))) {
        handle.linger_for_final_status(MIGRATED_LINGER);
    }
    if let Some(s) = server.as_mut() {
        s.shutdown();
    }
    Ok(outcome?)
}
