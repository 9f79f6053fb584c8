//! Running a machine as a process does: `esvm run`, `esvm receive` and `esvm restore` all
//! end here. Serves the control API while the guest runs (if asked) and returns how the run
//! ended; the binary says so on stderr and maps it to the process's exit status
//! ([`Outcome::exit_status`]).
//!
//! # Stop signals
//!
//! With [`install_stop_signals`], SIGINT and SIGTERM stop the process's VM cleanly: a
//! migration in flight is cancelled (one already committing decides where the VM runs), a
//! snapshot being written finishes, then the run ends with [`Outcome::Signalled`] (exit
//! status 130 / 143) and [`run`] returns as for any other end: the API socket is removed and
//! the caller's guards (the raw terminal) drop. A second signal while the VM is stopping, or
//! a signal before a guest runs (e.g. `esvm receive` waiting for or receiving a VM, which
//! then never committed here and stays at its source), ends the process at once with the
//! same status, after removing the API socket and restoring the terminal.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use esvm_control::{ApiServer, ControlTarget, ServerError};
use thiserror::Error;

use crate::control::VmHandle;
use crate::lifecycle::LifecycleError;
use crate::machine::{Machine, MachineError};
use crate::outcome::{Outcome, StopSignal};
use crate::sev_launch::{PendingLaunch, PendingLaunchError};

/// How long a source whose VM migrated away (or ended during a migration) keeps its API
/// socket open so that a client following the migration (`esvm ctl migrate`) can read the
/// final status.
pub const MIGRATED_LINGER: Duration = Duration::from_secs(3);
/// How long a VM that ended keeps its API socket open while a client is connected, so that
/// a client polling `status` sees how it ended (`exit_status`, `end_reason`).
pub const ENDED_LINGER: Duration = Duration::from_secs(1);

/// How to run a machine.
#[derive(Debug, Default, Clone)]
pub struct RunOptions {
    /// Serve the control API on this Unix socket while the guest runs.
    pub api_socket: Option<PathBuf>,
    /// Start with the guest paused (until `esvm ctl resume`).
    pub start_paused: bool,
    /// The guest arrives by post-copy from this peer and these pages are still missing:
    /// `status` shows the incoming migration's progress.
    pub incoming_postcopy: Option<(String, Arc<esvm_hv::MissingPages>)>,
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
    #[error("cannot handle SIGINT and SIGTERM (to stop the VM cleanly): {0}")]
    Signals(#[source] std::io::Error),
    #[error("--wait-for-secret needs --api-socket (the owner reads the measurement and sends the secret through it)")]
    WaitWithoutSocket,
    #[error("the SEV-ES launch did not finish: {0}")]
    Launch(#[source] PendingLaunchError),
}

/// What a stop signal acts on: the VM this process runs (once it runs), its API socket,
/// and whether a signal already came.
#[derive(Default)]
struct StopSlot {
    vm: Option<Arc<VmHandle>>,
    socket: Option<PathBuf>,
    stopping: bool,
}

static STOP_SLOT: OnceLock<Arc<Mutex<StopSlot>>> = OnceLock::new();

fn with_slot(f: impl FnOnce(&mut StopSlot)) {
    if let Some(slot) = STOP_SLOT.get() {
        f(&mut slot.lock().unwrap_or_else(PoisonError::into_inner));
    }
}

/// Handle SIGINT and SIGTERM for the rest of the process's life as the module documentation
/// says: on a thread of their own, through `signal-hook` (the handler only writes to a
/// pipe). Call it once, early (before the guest is loaded); later calls do nothing.
pub fn install_stop_signals() -> Result<(), SessionError> {
    if STOP_SLOT.get().is_some() {
        return Ok(());
    }
    let mut signals = signal_hook::iterator::Signals::new(StopSignal::ALL.map(|s| s.number()))
        .map_err(SessionError::Signals)?;
    let slot = STOP_SLOT.get_or_init(Default::default).clone();
    std::thread::Builder::new()
        .name("esvm-signals".into())
        .spawn(move || {
            for n in signals.forever() {
                if let Some(signal) = StopSignal::from_number(n) {
                    on_stop_signal(&slot, signal);
                }
            }
        })
        .map_err(SessionError::Signals)?;
    Ok(())
}

fn on_stop_signal(slot: &Mutex<StopSlot>, signal: StopSignal) {
    let mut s = slot.lock().unwrap_or_else(PoisonError::into_inner);
    let name = signal.name();
    match (s.vm.clone(), s.stopping) {
        // An SEV-ES launch still waiting for its owner has no guest running yet.
        (Some(vm), false) if vm.launch_waiting() => {
            eprintln!("esvm: stopped by {name} while the SEV-ES launch waited for its owner");
            exit_now(&s, signal);
        }
        (Some(vm), false) => {
            s.stopping = true;
            if vm.stop_for_signal(signal) {
                eprintln!("esvm: {name}: stopping the VM (send it again to exit at once)");
            }
        }
        (Some(_), true) => {
            eprintln!("esvm: {name} again: exiting at once");
            exit_now(&s, signal);
        }
        (None, _) => {
            eprintln!("esvm: stopped by {name} before a guest ran");
            exit_now(&s, signal);
        }
    }
}

/// End the process at once: what a clean stop would have cleaned up, then the status.
fn exit_now(s: &StopSlot, signal: StopSignal) -> ! {
    if let Some(path) = &s.socket {
        let _ = std::fs::remove_file(path);
    }
    crate::console::restore_terminal();
    std::process::exit(i32::from(signal.exit_status()));
}

/// Run `machine` to its end with the control API (if asked). Returns how the run ended.
pub fn run(machine: &mut Machine, opts: &RunOptions) -> Result<Outcome, SessionError> {
    run_inner(machine, opts, None)
}

/// [`run`] for a machine whose SEV-ES launch is measured and waits for its owner
/// (`esvm run --wait-for-secret`): the control API serves the launch (`launch_measurement`,
/// `inject_secret`) and the guest starts once `resume` has run LAUNCH_FINISH.
pub fn run_with_launch(
    machine: &mut Machine,
    opts: &RunOptions,
    launch: Arc<PendingLaunch>,
) -> Result<Outcome, SessionError> {
    if opts.api_socket.is_none() {
        return Err(SessionError::WaitWithoutSocket);
    }
    run_inner(machine, opts, Some(launch))
}

fn run_inner(
    machine: &mut Machine,
    opts: &RunOptions,
    launch: Option<Arc<PendingLaunch>>,
) -> Result<Outcome, SessionError> {
    let mut handle = VmHandle::new(machine.handle());
    if let Some((peer, missing)) = &opts.incoming_postcopy {
        handle = handle.with_incoming_postcopy(peer, missing.clone());
    }
    if let Some(l) = &launch {
        handle = handle.with_launch(l.clone());
    }
    let handle = Arc::new(handle);
    with_slot(|s| s.vm = Some(handle.clone()));
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
            with_slot(|s| s.socket = Some(path.clone()));
            // One line a script or a person can wait for.
            eprintln!("esvm: API socket ready at {}", path.display());
            Some(server)
        }
        None => None,
    };
    if let Some(l) = &launch {
        eprintln!(
            "esvm: the SEV-ES launch waits for its owner: `esvm ctl launch-measurement`, \
             `esvm ctl inject-secret PACKET`, then `esvm ctl resume` starts the guest"
        );
        if let Err(e) = l.wait() {
            if let Some(s) = server.as_mut() {
                s.shutdown();
            }
            with_slot(|s| s.socket = None);
            if handle.shut_down_before_start() {
                return Ok(Outcome::Stopped(
                    "by `esvm ctl shutdown` before its SEV-ES launch finished".into(),
                ));
            }
            return Err(SessionError::Launch(e));
        }
    }
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
    // A client following the migration (`esvm ctl migrate`) or polling `status` reads how
    // it ended.
    match (&outcome, &server) {
        (Ok(Outcome::Migrated(_)), Some(_)) => handle.linger_for_final_status(MIGRATED_LINGER),
        (_, Some(_)) if cancelled => handle.linger_for_final_status(MIGRATED_LINGER),
        (_, Some(s)) if s.connections() > 0 => handle.linger_for_final_status(ENDED_LINGER),
        _ => {}
    }
    if let Some(s) = server.as_mut() {
        s.shutdown();
    }
    with_slot(|s| s.socket = None);
    Ok(outcome?)
}
