//! `esvm restore`: run a VM from a snapshot written by `esvm ctl snapshot`.

use std::path::PathBuf;

use clap::Args;
use esvm_hv::BackendKind;

#[derive(Args, Debug)]
#[command(
    after_help = "The snapshot is checked completely before the guest runs; a corrupt or \
                  truncated snapshot is refused (exit status 125) with a message naming the \
                  file and the problem. The guest continues where it was snapshotted: its \
                  serial console on stdout, its exit status as for `esvm run`.\n\n\
                  A snapshot of an SEV-ES guest is sealed to the platform the guest ran on: \
                  its pages and vCPUs are the secure processor's transport packets, keyed for \
                  that platform's PDH. Restore it with --platform naming that platform; any \
                  other platform (or the same one after `esvm platform rotate-pdh`) cannot open \
                  it, and the firmware refuses any altered page or vCPU."
)]
pub struct RestoreArgs {
    /// The snapshot directory.
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
    /// The secure processor's platform directory (`esvm platform init`) that an SEV-ES
    /// snapshot is sealed to: the platform the guest ran on. Needed for SEV-ES snapshots,
    /// ignored for plain ones.
    #[arg(long, value_name = "DIR")]
    pub platform: Option<PathBuf>,
    /// Serve the control API on this Unix socket while the guest runs.
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// Start with the guest paused until `esvm ctl resume` (needs --api-socket).
    #[arg(long, requires = "api_socket")]
    pub start_paused: bool,
    /// Backend: 'emu' (default) or 'kvm'.
    #[arg(long, default_value = "emu", value_parser = parse_backend)]
    pub backend: BackendKind,
    /// Where the guest's serial input (COM1) comes from: `stdin` or `none` (the default), as
    /// for `esvm run --console`.
    #[arg(long, value_name = "stdin|none", value_parser = crate::cli::run::parse_console,
          default_value = "none")]
    pub console: crate::cli::run::ConsoleSource,
    #[command(flatten)]
    pub scheduling: crate::cli::run::SchedulingChoice,
}

fn parse_backend(s: &str) -> Result<BackendKind, String> {
    s.parse().map_err(|e: esvm_hv::HvError| e.to_string())
}

pub fn run(args: RestoreArgs) -> Result<u8, Box<dyn std::error::Error>> {
    let mut machine = esvm::snapshot::restore(
        &args.dir,
        args.backend,
        args.platform.as_deref(),
        Box::new(std::io::stdout()),
    )?;
    args.scheduling.apply(&mut machine);
    let _raw = crate::cli::run::attach_console(&mut machine, args.console);
    crate::cli::run_session(
        &format!("restored from {}", args.dir.display()),
        &mut machine,
        &esvm::session::RunOptions {
            api_socket: args.api_socket.clone(),
            start_paused: args.start_paused,
            incoming_postcopy: None,
        },
    )
}
