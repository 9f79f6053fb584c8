//! Running a machine as a process does: `esvm run`, `esvm receive` and `esvm restore` all
//! end here. Serves the control API while the guest runs (if asked), maps how the run
//! ended to the process's exit status, and says so on stderr.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use esvm_control::{ApiServer, ControlTarget};

use crate::control::VmHandle;
use crate::machine::{Machine, Outcome};

/// How long a source whose VM migrated away keeps its API socket open so that a client
/// following the migration (`esvm ctl migrate`) can read the final status.
pub const MIGRATED_LINGER: Duration = Duration::from_secs(3);

/// The exit status of `esvm run` / `receive` / `restore` for a run that ended this way.
/// A VM that migrated away exits 0: the guest lives on at the destination.
pub fn exit_status(o: &Outcome) -> u8 {
    match o {
        Outcome::Exited(code) => *code,
        Outcome::Shutdown(_) => crate::EXIT_GUEST_SHUTDOWN,
        Outcome::Terminated(_) => crate::EXIT_GUEST_TERMINATED,
        Outcome::InstructionLimit(_) => crate::EXIT_INSTRUCTION_LIMIT,
        Outcome::Migrated(_) => 0,
    }
}

/// Whether the run ended badly (the guest did not exit by itself nor move away).
pub fn is_failure(o: &Outcome) -> bool {
    matches!(o, Outcome::Shutdown(_) | Outcome::Terminated(_))
}

/// A short description of how the run ended.
pub fn describe(o: &Outcome) -> String {
    match o {
        Outcome::Exited(code) => format!("the guest exited with status {code}"),
        Outcome::Shutdown(reason) => format!("the guest shut down: {reason}"),
        Outcome::Terminated(reason) => format!("the guest terminated: {reason}"),
        Outcome::InstructionLimit(n) => {
            format!("the guest stopped after {n} instructions (--max-instructions)")
        }
        Outcome::Migrated(url) => format!("the VM migrated to {url}"),
    }
}

/// Say on stderr how the run of guest `name` ended (nothing for a normal exit) and return
/// the process's exit status.
pub fn report(name: &str, o: &Outcome) -> u8 {
    match o {
        Outcome::Exited(_) => {}
        Outcome::Shutdown(reason) => eprintln!("esvm: guest {name} shut down: {reason}"),
        Outcome::Terminated(reason) => eprintln!("esvm: guest {name} terminated: {reason}"),
        Outcome::InstructionLimit(n) => {
            eprintln!("esvm: guest {name} stopped after {n} instructions (--max-instructions)")
        }
        Outcome::Migrated(url) => eprintln!(
            "esvm: guest {name} migrated to {url}; it runs there now and will not run here \
             again"
        ),
    }
    exit_status(o)
}

/// How to run a machine.
#[derive(Debug, Default, Clone)]
pub struct RunOptions {
    /// Serve the control API on this Unix socket while the guest runs.
    pub api_socket: Option<PathBuf>,
    /// Start with the guest paused (until `esvm ctl resume`).
    pub start_paused: bool,
}

/// Run `machine` to its end with the control API (if asked), then report. Returns the
/// process's exit status.
pub fn run(
    name: &str,
    machine: &mut Machine,
    opts: &RunOptions,
) -> Result<u8, Box<dyn std::error::Error>> {
    let handle = Arc::new(VmHandle::new(machine.handle()));
    if opts.start_paused {
        if opts.api_socket.is_none() {
            return Err("--start-paused needs --api-socket (to resume the guest)".into());
        }
        // Before the socket exists: a client can never see the VM unpaused.
        machine.control().set_user_paused(true)?;
    }
    let mut server = match &opts.api_socket {
        Some(path) => Some(ApiServer::spawn(
            path,
            handle.clone() as Arc<dyn ControlTarget + Send + Sync>,
        )?),
        None => None,
    };
    let outcome = machine.run();
    // A migration still running when the guest ended is cancelled; one that committed has
    // finished its bookkeeping (status `completed`) once the thread is joined.
    handle.finish_migration();
    if let (Ok(Outcome::Migrated(_)), Some(_)) = (&outcome, &server) {
        handle.linger_for_final_status(MIGRATED_LINGER);
    }
    if let Some(s) = server.as_mut() {
        s.shutdown();
    }
    let outcome = outcome?;
    Ok(report(name, &outcome))
}
