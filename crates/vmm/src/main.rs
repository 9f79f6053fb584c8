//! `esvm`: run, inspect, snapshot and live-migrate confidential VMs.
//!
//! The binary is the command line only ([`cli`]): it parses the arguments, calls the `esvm`
//! library and maps how things ended to the process's exit status.

mod cli;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

use cli::{bench, ctl, owner, platform, receive, restore, run};
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
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a guest: a built-in one (see `esvm guests`) or an ELF64 file.
    Run(run::RunArgs),
    /// List the built-in guests.
    Guests,
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
    if !matches!(
        cli.command,
        Command::Run(_) | Command::Receive(_) | Command::Restore(_)
    ) {
        quiet_on_broken_pipe();
    }
    // Diagnostics go to stderr (stdout is the guest's serial console); ESVM_LOG=debug etc.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ESVM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: a log file or a pipe gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        Command::Run(args) => run::run(args),
        Command::Bench(cmd) => bench::run(cmd),
        Command::Ctl(args) => ctl::run(args),
        Command::Receive(args) => receive::run(args),
        Command::Restore(args) => restore::run(args),
        Command::Platform(cmd) => platform::run_platform(cmd).map(|()| 0),
        Command::Owner(cmd) => {
            owner::run_owner(cmd, Some(&esvm::sev_launch::LaunchPredictor)).map(|()| 0)
        }
        Command::Guests => {
            run::list_guests();
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
