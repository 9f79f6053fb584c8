//! `esvm`: run, inspect, snapshot and live-migrate confidential VMs.
//!
//! The binary is the command line only ([`cli`]): it parses the arguments, calls the `esvm`
//! library and maps how things ended to the process's exit status.

mod cli;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use std::process::ExitCode;

use cli::output::Format;
use cli::{bench, certs, ctl, guests, log, owner, platform, receive, restore, run};
use esvm::outcome::{EXIT_ESVM_ERROR, EXIT_PANIC, EXIT_USAGE};

#[derive(Parser)]
#[command(
    name = "esvm",
    version,
    about = "A hypervisor for encrypted-state (AMD SEV-ES style) confidential VMs",
    long_about = "esvm runs x86-64 guests on its own software vCPU (backend 'emu', the default: \
                  deterministic, no privileges needed) or on KVM (backend 'kvm'), models the AMD \
                  Secure Processor for SEV-ES launch and attestation, and live-migrates guests.\n\n\
                  SIGINT and SIGTERM stop a running VM cleanly (a migration in flight is \
                  cancelled first; the API socket is removed); a second one exits at once."
)]
struct Cli {
    /// Print what the command reports as one JSON document on stdout instead of text: `ctl`
    /// (status, pause, resume, cancel, snapshot, vcpus, migrate, migrate-set, shutdown,
    /// launch-measurement, inject-secret), `guests`, `platform`, `owner`, `bench`. Errors
    /// stay text on stderr; the exit status is the same.
    #[arg(long, global = true)]
    json: bool,
    /// Diagnostics on stderr: error, warn (the default), info, debug, trace, off, or a
    /// tracing filter such as `warn,esvm::migrate=debug`. Overrides the environment
    /// variable ESVM_LOG, which takes the same values. Colours only when stderr is a
    /// terminal.
    #[arg(long, global = true, value_name = "LEVEL", env = "ESVM_LOG",
          value_parser = log::parse_level)]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a guest: a built-in one (see `esvm guests`) or an ELF64 file.
    Run(run::RunArgs),
    /// List the built-in guests, or write one's ELF image to a file (--export).
    Guests(guests::GuestsArgs),
    /// The secure processor's persistent identity: create, inspect, export, rotate the PDH.
    #[command(subcommand)]
    Platform(platform::PlatformCommand),
    /// Guest-owner tools: launch sessions, attestation verification, secret packaging.
    #[command(subcommand)]
    Owner(owner::OwnerCommand),
    /// Control a running VM through its API socket (see `esvm run --api-socket`).
    Ctl(ctl::CtlArgs),
    /// Wait for one incoming live migration (`esvm ctl migrate`) and run the guest it brings.
    Receive(receive::ReceiveArgs),
    /// Run a VM from a snapshot directory (`esvm ctl snapshot`).
    Restore(restore::RestoreArgs),
    /// Make a test CA and host certificates for migrations over TLS (tests and labs only:
    /// unencrypted keys).
    Certs(certs::CertsArgs),
    /// Measure performance (figures for BENCHMARKS.md).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Print a shell completion script for esvm on stdout, e.g. `esvm completions bash >
    /// ~/.local/share/bash-completion/completions/esvm`.
    Completions {
        /// The shell to complete in.
        #[arg(value_name = "SHELL")]
        shell: clap_complete::Shell,
    },
}

/// Commands that only report end quietly when their reader goes away (`esvm guests | head
/// -1`), as Unix tools do: SIGPIPE gets back its default action, which Rust's runtime sets to
/// "ignore" (then every print fails and panics). Commands that run a guest keep ignoring it:
/// the guest's console going away must not kill the VM.
fn quiet_on_broken_pipe() {
    // SAFETY: at start-up, before any thread exists; only SIGPIPE's disposition changes.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// What `esvm --version` prints after the name: the version, the git revision it was built
/// from, and the versions of the formats and protocols it speaks (a peer, a snapshot or a
/// client of another esvm must match them).
fn long_version() -> String {
    format!(
        "{} (git {})\nsnapshot format {} (sealed SEV-ES snapshots: {})\n\
         migration protocol {} (accepts {} and later)\ncontrol API {}",
        env!("CARGO_PKG_VERSION"),
        env!("ESVM_GIT_REVISION"),
        esvm::snapshot::SNAPSHOT_VERSION,
        esvm::snapshot::SEALED_SNAPSHOT_VERSION,
        esvm_migration::PROTOCOL_VERSION,
        esvm_migration::protocol::MIN_PROTOCOL_VERSION,
        esvm_control::PROTOCOL_VERSION,
    )
}

/// The command line's definition: the derived one plus the texts made at run time.
fn command() -> clap::Command {
    // clap takes these texts as &'static str; they are made once per process.
    let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
    let table = leak(format!(
        "Exit status of `esvm run`, `esvm receive` and `esvm restore`:\n{}",
        esvm::outcome::exit_status_table()
    ));
    // The commands that run a guest show the table in their own --help too.
    ["run", "receive", "restore"].into_iter().fold(
        Cli::command()
            .long_version(leak(long_version()))
            .after_help(leak(format!(
                "{table}\nThe other commands exit 0 on success, {EXIT_USAGE} on a usage error, \
                 {EXIT_ESVM_ERROR} when they fail and {EXIT_PANIC} on a bug; `esvm ctl` exits \
                 1 when the VM refuses the request."
            ))),
        |cmd, name| cmd.mut_subcommand(name, |sub| sub.after_help(table)),
    )
}

/// Parse the command line. Help and version requests print and exit 0; a bad command line
/// prints clap's message and exits [`EXIT_USAGE`] (clap's own 2 would look like a guest
/// that exited 2).
fn parse() -> Result<Cli, ExitCode> {
    let parsed = command()
        .try_get_matches()
        .and_then(|m| Cli::from_arg_matches(&m));
    parsed.map_err(|e| {
        let _ = e.print();
        if e.use_stderr() {
            ExitCode::from(EXIT_USAGE)
        } else {
            ExitCode::SUCCESS
        }
    })
}

/// A usage error found after parsing: clap's message, status [`EXIT_USAGE`].
fn usage_error(kind: clap::error::ErrorKind, message: &str) -> ExitCode {
    let _ = command().error(kind, message).print();
    ExitCode::from(EXIT_USAGE)
}

/// A panic is a bug in esvm: after Rust's message, say so (on the main thread the process
/// then exits [`EXIT_PANIC`]; the control API answers a request that panicked `internal`).
fn report_panics_as_bugs() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        eprintln!(
            "esvm: this is a bug in esvm; please report it with the message above and the \
             command line (RUST_BACKTRACE=1 adds where it happened)"
        );
    }));
}

fn main() -> ExitCode {
    let cli = match parse() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    if let Command::Ctl(args) = &cli.command {
        if args.api_socket.is_none() {
            return usage_error(
                clap::error::ErrorKind::MissingRequiredArgument,
                ctl::NO_API_SOCKET,
            );
        }
    }
    if cli.json
        && matches!(
            cli.command,
            Command::Run(_)
                | Command::Receive(_)
                | Command::Restore(_)
                | Command::Completions { .. }
        )
    {
        return usage_error(
            clap::error::ErrorKind::ArgumentConflict,
            "--json is for the commands that report something (ctl, guests, platform, \
             owner, bench); this one prints a guest's console or a script",
        );
    }
    let format = Format::from_json_flag(cli.json);
    report_panics_as_bugs();
    if matches!(
        cli.command,
        Command::Run(_) | Command::Receive(_) | Command::Restore(_)
    ) {
        if let Err(e) = esvm::session::install_stop_signals() {
            eprintln!("esvm: error: {e}");
            return ExitCode::from(EXIT_ESVM_ERROR);
        }
    } else {
        quiet_on_broken_pipe();
    }
    // Diagnostics go to stderr (stdout is the guest's serial console).
    log::init(cli.log_level.as_deref());
    let result = match cli.command {
        Command::Run(args) => run::run(args),
        Command::Bench(cmd) => bench::run(cmd, format),
        Command::Ctl(args) => ctl::run(args, format),
        Command::Receive(args) => receive::run(args),
        Command::Restore(args) => restore::run(args),
        Command::Platform(cmd) => platform::run_platform(cmd, format).map(|()| 0),
        Command::Owner(cmd) => {
            owner::run_owner(cmd, Some(&esvm::sev_launch::LaunchPredictor), format).map(|()| 0)
        }
        Command::Guests(args) => guests::run(args, format),
        Command::Certs(args) => certs::run(args, format),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut command(), "esvm", &mut std::io::stdout());
            Ok(0)
        }
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            // Each cause once: many messages already end with their source's text.
            let mut printed = e.to_string();
            eprintln!("esvm: error: {printed}");
            let mut source = std::error::Error::source(&*e);
            while let Some(s) = source {
                let text = s.to_string();
                if !printed.contains(&text) {
                    eprintln!("  caused by: {text}");
                    printed.push_str(&text);
                }
                source = s.source();
            }
            // Options that contradict each other are found after parsing by some commands;
            // they are usage errors all the same.
            if e.downcast_ref::<run::RunError>()
                .is_some_and(run::RunError::is_usage)
            {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::from(EXIT_ESVM_ERROR)
            }
        }
    }
}
