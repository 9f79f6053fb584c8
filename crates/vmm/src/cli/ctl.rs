//! `esvm ctl`: control a running VM through the API socket of `esvm run --api-socket`.

use clap::{Args, Subcommand};
use esvm_control::protocol::{MAX_DOWNTIME_MS, MAX_TIMEOUT_S};
use esvm_control::{
    ApiClient, ClientError, MigrateRequest, MigrationPhase, MigrationStatus, OnTimeout, Reply,
    Request, VmState,
};
use indicatif::{BinaryBytes, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use thiserror::Error;

/// Exit status when the VM refused the request, or the migration failed or was cancelled.
pub const EXIT_REFUSED: u8 = 1;

/// How often `esvm ctl migrate` polls the VM's status.
const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// How long to wait for an answer to status, pause, resume, migrate and cancel.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for a snapshot to be written.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(600);
/// While following a migration, give up after this many failed status polls in a row.
const MAX_POLL_FAILURES: u32 = 5;
/// Without a terminal, print a progress line at least this often even if nothing changed.
const PLAIN_HEARTBEAT: Duration = Duration::from_secs(5);

const GUEST_PAGE: u64 = 4096;

#[derive(Args, Debug)]
#[command(
    after_help = "Exit status: 0 on success; 1 if the VM refused the request (the \
                        message says why) or the migration failed or was cancelled; 125 if \
                        esvm could not talk to the VM (no VM at --api-socket, timeout, \
                        protocol version mismatch)."
)]
pub struct CtlArgs {
    /// The VM's API socket: the path given to `esvm run --api-socket`.
    #[arg(long, value_name = "PATH")]
    pub api_socket: PathBuf,
    #[command(subcommand)]
    pub command: CtlCommand,
}

#[derive(Subcommand, Debug)]
pub enum CtlCommand {
    /// Print the VM's status as JSON: state, backend, VM type, memory, vCPUs, instructions
    /// executed, uptime and migration progress (phase, pass, bytes sent, dirty rate,
    /// bandwidth, estimated downtime).
    Status,
    /// Pause the guest (it keeps its state; see `resume`).
    Pause,
    /// Resume a paused guest.
    Resume,
    /// Write a snapshot of the VM into DIR (created if missing; a relative DIR is taken
    /// relative to this command's working directory). The guest pauses meanwhile and then
    /// runs on. An SEV-ES guest's snapshot is sealed to its platform (SEND_* to the
    /// platform's own PDH): only that platform can restore it (`esvm restore DIR --platform
    /// DIR`), and a guest whose policy has NOSEND cannot be snapshotted.
    Snapshot {
        /// Directory to write the snapshot to: a new or empty one (see --force).
        #[arg(value_name = "DIR")]
        dir: PathBuf,
        /// Write into DIR even if it exists and is not empty (its snapshot files are
        /// overwritten; other files stay). Without it such a DIR is refused.
        #[arg(long)]
        force: bool,
    },
    /// Live-migrate the VM to URL and show its progress until it completes or fails.
    ///
    /// Memory is copied while the guest runs, in passes, until the estimated downtime fits
    /// --downtime-ms; then the guest is paused and the rest is copied. Interrupting this
    /// command does not stop the migration: use `esvm ctl cancel` for that.
    Migrate(MigrateArgs),
    /// Cancel the running migration; the VM keeps running here.
    Cancel,
    /// Print each vCPU as the hypervisor sees it, as JSON: its control registers (for an
    /// SEV-ES vCPU only the values tracked from write traps), why reading its registers is
    /// refused, and for an SEV-ES guest whose policy allows debugging the same registers
    /// from its VMSA decrypted by the firmware (DBG_DECRYPT). Pause the VM first to compare
    /// them at one point.
    Vcpus,
}

#[derive(Args, Debug)]
pub struct MigrateArgs {
    /// Where the destination listens: tcp://HOST:PORT as `esvm receive` prints it, e.g.
    /// tcp://127.0.0.1:7000 (tcp:HOST:PORT is read the same).
    #[arg(value_name = "URL", value_parser = parse_url)]
    pub url: String,
    /// Largest acceptable downtime (the final stop-and-copy), in milliseconds.
    #[arg(long, value_name = "N", default_value_t = 300,
          value_parser = clap::value_parser!(u64).range(1..=MAX_DOWNTIME_MS))]
    pub downtime_ms: u64,
    /// Longest pre-copy phase, in seconds, the handshake included (a destination that does
    /// not answer fails the migration then); then the migration is cancelled (or forced with
    /// --force-on-timeout).
    #[arg(long, value_name = "N", default_value_t = 120,
          value_parser = clap::value_parser!(u64).range(1..=MAX_TIMEOUT_S))]
    pub timeout_s: u64,
    /// Most pre-copy passes (the VM's default if not given); reaching it acts like the
    /// timeout.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_passes: Option<u32>,
    /// At the timeout or pass cap, pause the guest and copy what is left anyway (downtime
    /// above --downtime-ms) instead of cancelling.
    #[arg(long)]
    pub force_on_timeout: bool,
    /// Start the migration and return at once; follow it with `esvm ctl status`.
    #[arg(long)]
    pub detach: bool,
    /// SEV-ES guests: the root of trust for the destination's platform certificate chain —
    /// a chain file (`esvm platform export`) or an ARK certificate. The migration is refused
    /// unless the destination's chain verifies against it. Default: the root the VM's own
    /// platform trusts.
    #[arg(long, value_name = "CHAIN")]
    pub trust: Option<PathBuf>,
}

/// A migration URL in its canonical form (`tcp://HOST:PORT`), refused here if malformed.
fn parse_url(s: &str) -> Result<String, String> {
    esvm::migrate::canonical_tcp_url(s).map_err(|e| e.to_string())
}

/// What went wrong talking to the VM (as opposed to the VM refusing a request).
#[derive(Debug, Error)]
pub enum CtlError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("cannot resolve the snapshot directory {dir:?}: {source}")]
    SnapshotDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot resolve the trusted root {path:?}: {source}")]
    TrustPath {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "lost contact with the VM while its migration was in phase {phase}: {source}; the \
         outcome is unknown — check the destination VM"
    )]
    LostContact {
        phase: MigrationPhase,
        source: ClientError,
    },
    #[error("the VM accepted the migration but reports none in its status (a VMM bug)")]
    NoMigration,
    #[error("cannot encode the status as JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// Runs `esvm ctl`. Returns the exit status (0 success, [`EXIT_REFUSED`] if the VM refused
/// or the migration did not complete); `Err` if the VM could not be reached.
pub fn run(args: CtlArgs) -> Result<u8, Box<dyn std::error::Error>> {
    run_with(args, POLL_INTERVAL).map_err(Into::into)
}

fn run_with(args: CtlArgs, poll: Duration) -> Result<u8, CtlError> {
    let mut client = ApiClient::connect_with_timeout(&args.api_socket, REPLY_TIMEOUT)?;
    let (name, request) = match args.command {
        CtlCommand::Status => {
            let status = client.status()?;
            println!("{}", serde_json::to_string_pretty(&status)?);
            return Ok(0);
        }
        CtlCommand::Pause => ("pause", Request::Pause),
        CtlCommand::Resume => ("resume", Request::Resume),
        CtlCommand::Cancel => ("cancel", Request::Cancel),
        CtlCommand::Vcpus => ("vcpus", Request::Vcpus),
        CtlCommand::Snapshot { dir, force } => {
            let dir = std::path::absolute(&dir)
                .map_err(|source| CtlError::SnapshotDir { dir, source })?;
            client.set_timeout(SNAPSHOT_TIMEOUT)?;
            ("snapshot", Request::Snapshot { dir, force })
        }
        CtlCommand::Migrate(m) => {
            let detach = m.detach;
            let trust = match m.trust {
                Some(t) => Some(
                    std::path::absolute(&t)
                        .map_err(|source| CtlError::TrustPath { path: t, source })?,
                ),
                None => None,
            };
            let req = MigrateRequest {
                trust,
                url: m.url,
                downtime_ms: m.downtime_ms,
                timeout_s: m.timeout_s,
                max_passes: m.max_passes,
                on_timeout: if m.force_on_timeout {
                    OnTimeout::Force
                } else {
                    OnTimeout::Cancel
                },
            };
            return migrate(&mut client, req, detach, poll);
        }
    };
    match call(&mut client, name, &request)? {
        Err(code) => Ok(code),
        Ok(reply) => {
            match reply {
                Reply::Paused => println!("paused"),
                Reply::Resumed => println!("resumed"),
                Reply::MigrationCancelled => println!("migration cancel requested"),
                Reply::Vcpus { vcpus } => println!("{}", serde_json::to_string_pretty(&vcpus)?),
                Reply::SnapshotSaved(info) => match info.bytes_written {
                    Some(n) => println!(
                        "snapshot written to {} ({})",
                        info.dir.display(),
                        BinaryBytes(n)
                    ),
                    None => println!("snapshot written to {}", info.dir.display()),
                },
                other => println!("{other:?}"),
            }
            Ok(0)
        }
    }
}

/// Sends a request; a refusal by the VM is reported on stderr and becomes
/// `Ok(Err(EXIT_REFUSED))`.
fn call(
    client: &mut ApiClient,
    name: &str,
    request: &Request,
) -> Result<Result<Reply, u8>, CtlError> {
    match client.call(request) {
        Ok(reply) => Ok(Ok(reply)),
        Err(ClientError::Api(e)) => {
            eprintln!("esvm ctl {name}: {} ({})", e.message, e.code);
            Ok(Err(EXIT_REFUSED))
        }
        Err(e) => Err(e.into()),
    }
}

fn migrate(
    client: &mut ApiClient,
    req: MigrateRequest,
    detach: bool,
    poll: Duration,
) -> Result<u8, CtlError> {
    let url = req.url.clone();
    if let Err(code) = call(client, "migrate", &Request::Migrate(req))? {
        return Ok(code);
    }
    if detach {
        println!("migration to {url} started; follow it with `esvm ctl status`");
        return Ok(0);
    }
    let path = client.path().to_path_buf();
    let mut display = ProgressDisplay::new(std::io::stderr().is_terminal());
    let mut last_phase = MigrationPhase::Setup;
    let mut failures = 0;
    let outcome = loop {
        std::thread::sleep(poll);
        let status = match client.status() {
            Ok(s) => {
                failures = 0;
                s
            }
            Err(e) => {
                failures += 1;
                let gone = matches!(
                    e,
                    ClientError::NoServer { .. } | ClientError::ConnectionRefused { .. }
                );
                if gone || failures >= MAX_POLL_FAILURES {
                    display.finish();
                    return Err(CtlError::LostContact {
                        phase: last_phase,
                        source: e,
                    });
                }
                // The connection is unusable after an error: open a new one.
                match ApiClient::connect_with_timeout(&path, REPLY_TIMEOUT) {
                    Ok(c) => *client = c,
                    Err(e) => {
                        display.finish();
                        return Err(CtlError::LostContact {
                            phase: last_phase,
                            source: e,
                        });
                    }
                }
                continue;
            }
        };
        let vm_state = status.state;
        let Some(m) = status.migration else {
            display.finish();
            return Err(CtlError::NoMigration);
        };
        last_phase = m.phase;
        display.update(&m);
        if m.phase.is_terminal() {
            break (m, vm_state);
        }
    };
    let (outcome, vm_state) = outcome;
    // Where the guest is now, after a migration that did not complete.
    let here = match vm_state {
        VmState::Exited | VmState::Failed => "the VM has ended here",
        _ => "the VM keeps running here",
    };
    display.finish();
    if outcome.phase == MigrationPhase::Completed {
        let downtime = outcome
            .downtime_ms
            .map(|d| format!(", downtime {d:.1} ms"))
            .unwrap_or_default();
        println!(
            "migration to {} completed: {} pass(es), {} sent in {:.1} s{downtime}",
            outcome.url,
            outcome.pass,
            BinaryBytes(outcome.bytes_sent),
            outcome.elapsed_ms as f64 / 1000.0
        );
        return Ok(0);
    }
    let why = outcome.error.as_deref().unwrap_or("no reason given");
    match outcome.phase {
        MigrationPhase::Cancelled => {
            eprintln!("esvm ctl migrate: migration cancelled: {why}; {here}")
        }
        MigrationPhase::InDoubt => eprintln!(
            "esvm ctl migrate: migration outcome unknown: {why}; the VM stays paused here — \
             check whether the destination runs it before resuming"
        ),
        _ => eprintln!("esvm ctl migrate: migration failed: {why}; {here}"),
    }
    Ok(EXIT_REFUSED)
}

/// One line describing a migration's progress.
fn progress_line(m: &MigrationStatus) -> String {
    let est = match m.estimated_downtime_ms {
        Some(ms) => format!("{ms:.1} ms"),
        None => "?".into(),
    };
    format!(
        "{} pass {} | sent {} | {} left | {}/s | dirty {:.0} pages/s | est. downtime {est} \
         (limit {} ms) | {:.1} s",
        m.phase,
        m.pass,
        BinaryBytes(m.bytes_sent),
        BinaryBytes(m.pages_remaining.saturating_mul(GUEST_PAGE)),
        BinaryBytes(m.bandwidth_bytes_per_sec as u64),
        m.dirty_rate_pages_per_sec,
        m.downtime_limit_ms,
        m.elapsed_ms as f64 / 1000.0
    )
}

/// Migration progress on stderr: a live spinner line on a terminal, otherwise a plain line
/// whenever the phase or pass changes (and every few seconds).
enum ProgressDisplay {
    Bar(ProgressBar),
    Plain {
        last: Option<(MigrationPhase, u32)>,
        printed: Instant,
    },
}

impl ProgressDisplay {
    fn new(terminal: bool) -> Self {
        if terminal {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            if let Ok(style) = ProgressStyle::with_template("{spinner} {msg}") {
                bar.set_style(style);
            }
            bar.enable_steady_tick(Duration::from_millis(100));
            ProgressDisplay::Bar(bar)
        } else {
            ProgressDisplay::Plain {
                last: None,
                printed: Instant::now(),
            }
        }
    }

    fn update(&mut self, m: &MigrationStatus) {
        match self {
            ProgressDisplay::Bar(bar) => bar.set_message(progress_line(m)),
            ProgressDisplay::Plain { last, printed } => {
                let key = (m.phase, m.pass);
                if *last != Some(key) || printed.elapsed() >= PLAIN_HEARTBEAT {
                    eprintln!("{}", progress_line(m));
                    *last = Some(key);
                    *printed = Instant::now();
                }
            }
        }
    }

    fn finish(&mut self) {
        if let ProgressDisplay::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};
    use esvm_control::mock::MockTarget;
    use esvm_control::{ApiServer, ControlTarget, VmState, VmType};
    use std::sync::Arc;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        args: CtlArgs,
    }

    fn parse(argv: &[&str]) -> Result<CtlArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("ctl").chain(argv.iter().copied())).map(|c| c.args)
    }

    #[test]
    fn command_line() {
        Cli::command().debug_assert();
        let a = parse(&["--api-socket", "/s", "migrate", "tcp://h:1"]).unwrap();
        assert_eq!(a.api_socket, PathBuf::from("/s"));
        let CtlCommand::Migrate(m) = a.command else {
            panic!("not migrate")
        };
        assert_eq!((m.downtime_ms, m.timeout_s), (300, 120));
        assert!(!m.force_on_timeout && !m.detach && m.max_passes.is_none());
        let a = parse(&[
            "--api-socket",
            "/s",
            "migrate",
            "tcp://h:1",
            "--downtime-ms",
            "50",
            "--timeout-s",
            "9",
            "--force-on-timeout",
        ])
        .unwrap();
        let CtlCommand::Migrate(m) = a.command else {
            panic!("not migrate")
        };
        assert_eq!((m.downtime_ms, m.timeout_s), (50, 9));
        assert!(m.force_on_timeout);
        assert!(parse(&["--api-socket", "/s", "migrate", "u", "--downtime-ms", "0"]).is_err());
        // Both spellings, sent in the canonical one; other schemes are refused up front.
        for url in ["tcp:h:1", "tcp://h:1"] {
            let CtlCommand::Migrate(m) = parse(&["--api-socket", "/s", "migrate", url])
                .unwrap()
                .command
            else {
                panic!("not migrate")
            };
            assert_eq!(m.url, "tcp://h:1");
        }
        let e = parse(&["--api-socket", "/s", "migrate", "http://h:1"]).unwrap_err();
        assert!(e.to_string().contains("use tcp://HOST:PORT"), "{e}");
        assert!(parse(&["--api-socket", "/s", "snapshot"]).is_err());
        assert!(parse(&["status"]).is_err());
        assert!(matches!(
            parse(&["--api-socket", "/s", "snapshot", "d"])
                .unwrap()
                .command,
            CtlCommand::Snapshot { .. }
        ));
    }

    struct Vm {
        _dir: tempfile::TempDir,
        path: PathBuf,
        target: Arc<MockTarget>,
        _server: ApiServer,
    }

    fn vm() -> Vm {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let target = Arc::new(MockTarget::new(VmType::SevEs));
        let server = ApiServer::spawn(
            &path,
            target.clone() as Arc<dyn ControlTarget + Send + Sync>,
        )
        .unwrap();
        Vm {
            _dir: dir,
            path,
            target,
            _server: server,
        }
    }

    fn ctl(vm: &Vm, argv: &[&str]) -> Result<u8, CtlError> {
        let mut full = vec!["--api-socket", vm.path.to_str().unwrap()];
        full.extend_from_slice(argv);
        run_with(parse(&full).unwrap(), Duration::from_millis(1))
    }

    #[test]
    fn simple_commands() {
        let vm = vm();
        assert_eq!(ctl(&vm, &["status"]).unwrap(), 0);
        assert_eq!(ctl(&vm, &["pause"]).unwrap(), 0);
        assert_eq!(vm.target.state(), VmState::Paused);
        assert_eq!(ctl(&vm, &["pause"]).unwrap(), EXIT_REFUSED);
        assert_eq!(ctl(&vm, &["resume"]).unwrap(), 0);
        assert_eq!(ctl(&vm, &["cancel"]).unwrap(), EXIT_REFUSED);
        let snap = vm._dir.path().join("snap");
        assert_eq!(ctl(&vm, &["snapshot", snap.to_str().unwrap()]).unwrap(), 0);
        assert_eq!(vm.target.snapshots(), vec![snap]);
    }

    #[test]
    fn migrate_follows_progress_to_the_end() {
        let vm = vm();
        let code = ctl(
            &vm,
            &[
                "migrate",
                "tcp://ok:1",
                "--downtime-ms",
                "20",
                "--force-on-timeout",
            ],
        )
        .unwrap();
        assert_eq!(code, 0);
        assert_eq!(vm.target.state(), VmState::Migrated);
        let req = &vm.target.migrate_requests()[0];
        assert_eq!(req.downtime_ms, 20);
        assert_eq!(req.on_timeout, OnTimeout::Force);

        let vm2 = self::vm();
        assert_eq!(
            ctl(&vm2, &["migrate", "tcp://fail:1"]).unwrap(),
            EXIT_REFUSED
        );
        assert_eq!(vm2.target.state(), VmState::Running);
    }

    #[test]
    fn migrate_reports_a_cancel_from_another_client() {
        let vm = vm();
        let path = vm.path.clone();
        let canceller = std::thread::spawn(move || {
            let mut c = ApiClient::connect(&path).unwrap();
            for _ in 0..10_000 {
                if c.call(&Request::Cancel).is_ok() {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            false
        });
        assert_eq!(
            ctl(&vm, &["migrate", "tcp://hang:1"]).unwrap(),
            EXIT_REFUSED
        );
        assert!(canceller.join().unwrap());
        assert_eq!(vm.target.state(), VmState::Running);
    }

    #[test]
    fn no_vm_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("none.sock");
        let args = parse(&["--api-socket", path.to_str().unwrap(), "status"]).unwrap();
        let err = run(args).unwrap_err();
        assert!(err.to_string().contains("no API socket"), "{err}");
    }

    #[test]
    fn progress_line_mentions_the_figures() {
        let mut m = MigrationStatus::new("tcp://h:1", 300);
        m.phase = MigrationPhase::PreCopy;
        m.pass = 3;
        m.bytes_sent = 2 << 20;
        m.estimated_downtime_ms = Some(12.5);
        let line = progress_line(&m);
        assert!(line.starts_with("pre_copy pass 3"), "{line}");
        assert!(line.contains("2.00 MiB"), "{line}");
        assert!(line.contains("12.5 ms"), "{line}");
    }
}
