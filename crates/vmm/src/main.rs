//! `esvm`: run, inspect, snapshot and live-migrate confidential VMs.
//!
//! The binary is the command line only ([`cli`]): it parses the arguments, calls the `esvm`
//! library and maps how things ended to the process's exit status.

mod cli;

use clap::{CommandFactory, Parser, Subcommand};
use std::process::ExitCode;

use cli::output::Format;
use cli::{bench, ctl, guests, log, owner, platform, receive, restore, run};
use esvm::outcome::EXIT_ESVM_ERROR;

#[derive(Parser)]
#[command(
    name = "esvm",
    version,
    about = "A hypervisor for encrypted-state (AMD SEV-ES style) confidential VMs",
    long_about = "esvm runs x86-64 guests on its own software vCPU (backend 'emu', the default: \
                  deterministic, no privileges needed) or on KVM (backend 'kvm'), models the AMD \
                  Secure Processor for SEV-ES launch and attestation, and live-migrates guests.\n\n\
                  Exit status of `esvm run`: the guest's own status (the value it wrote to the \
                  debug-exit port 0xF4, & 0xff); 124 if the guest shut down (triple fault); \
                  123 if --max-instructions ran out; 122 if an SEV-ES guest terminated itself through \
                  the GHCB (the reason is printed); 125 if esvm itself failed; 0 with a message when the guest \
                  reset itself (a reboot) or powered off, when the VM was stopped from the console \
                  (Ctrl-A x) or live-migrated away (it runs at the destination now). `esvm receive` and \
                  `esvm restore` exit the same way."
)]
struct Cli {
    /// Print what the command reports as one JSON document on stdout instead of text: `ctl`
    /// (status, pause, resume, cancel, snapshot, vcpus, migrate), `guests`, `platform`,
    /// `owner`. Errors stay text on stderr; the exit status is the same.
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Ctl(args) = &cli.command {
        if args.api_socket.is_none() {
            Cli::command()
                .error(
                    clap::error::ErrorKind::MissingRequiredArgument,
                    ctl::NO_API_SOCKET,
                )
                .exit();
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
        Cli::command()
            .error(
                clap::error::ErrorKind::ArgumentConflict,
                "--json is for the commands that report something (ctl, guests, platform, \
                 owner); this one prints a guest's console or a script",
            )
            .exit();
    }
    let format = Format::from_json_flag(cli.json);
    if !matches!(
        cli.command,
        Command::Run(_) | Command::Receive(_) | Command::Restore(_)
    ) {
        quiet_on_broken_pipe();
    }
    // Diagnostics go to stderr (stdout is the guest's serial console).
    log::init(cli.log_level.as_deref());
    let result = match cli.command {
        Command::Run(args) => run::run(args),
        Command::Bench(cmd) => bench::run(cmd),
        Command::Ctl(args) => ctl::run(args, format),
        Command::Receive(args) => receive::run(args),
        Command::Restore(args) => restore::run(args),
        Command::Platform(cmd) => platform::run_platform(cmd, format).map(|()| 0),
        Command::Owner(cmd) => {
            owner::run_owner(cmd, Some(&esvm::sev_launch::LaunchPredictor), format).map(|()| 0)
        }
        Command::Guests(args) => guests::run(args, format),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "esvm", &mut std::io::stdout());
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
            ExitCode::from(EXIT_ESVM_ERROR)
        }
    }
}
