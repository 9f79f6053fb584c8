//! `esvm ctl`: control a running VM through the API socket of `esvm run --api-socket`.

use clap::{Args, Subcommand};
use esvm_control::protocol::{
    VcpuScheduling, VcpuView, VmStatus, VmType, MAX_DOWNTIME_MS, MAX_TIMEOUT_S, MIN_MAX_BANDWIDTH,
};
use esvm_control::{
    ApiClient, ClientError, MigrateRequest, MigrateSetRequest, MigrationPhase, MigrationStatus,
    OnTimeout, Reply, Request, VmState,
};
use indicatif::{BinaryBytes, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::fmt::Write as _;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use thiserror::Error;

use super::output::{Format, OutputError};

/// Exit status when the VM refused the request, or the migration failed or was cancelled.
pub const EXIT_REFUSED: u8 = 1;

/// How often `esvm ctl migrate` polls the VM's status.
const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// How long to wait for an answer to status, pause, resume, migrate and cancel.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for the VM to end after `shutdown` (it waits up to
/// [`esvm::control::SHUTDOWN_TIMEOUT`] for a snapshot or migration to finish).
const SHUTDOWN_REPLY_TIMEOUT: Duration = Duration::from_secs(90);
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
    /// The VM's API socket: the path given to `esvm run --api-socket`. May come before or
    /// after the subcommand.
    #[arg(long, value_name = "PATH", global = true, env = "ESVM_API_SOCKET")]
    pub api_socket: Option<PathBuf>,
    /// Wait up to SECS seconds for the API socket to accept connections: for a VM that was
    /// just started in the background and may not listen yet. Without it, a missing socket
    /// is an error at once.
    #[arg(long, value_name = "SECS", global = true)]
    pub wait: Option<u64>,
    #[command(subcommand)]
    pub command: CtlCommand,
}

#[derive(Subcommand, Debug)]
pub enum CtlCommand {
    /// Print the VM's status: state, backend, VM type, memory, vCPUs, instructions
    /// executed, uptime, exit status and migration progress (phase, pass, bytes sent, dirty
    /// rate, bandwidth, estimated downtime). With --json, the API's status object.
    Status,
    /// Pause the guest (it keeps its state; see `resume`).
    Pause,
    /// Resume a paused guest; on an SEV-ES launch that waits for its owner (`esvm run
    /// --wait-for-secret`), run LAUNCH_FINISH and start the guest.
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
    /// command does not stop the migration: use `esvm ctl cancel` for that. With --json no
    /// progress is shown and the migration's final status is printed as one JSON object
    /// (also when it failed or was cancelled; the exit status says which).
    Migrate(MigrateArgs),
    /// Change the running migration's bandwidth cap and/or downtime limit; it applies them
    /// at once (the cap from the next frame, the downtime limit from the next pass's
    /// estimate). `esvm ctl status` shows the limits in force.
    MigrateSet(MigrateSetArgs),
    /// Cancel the running migration; the VM keeps running here.
    Cancel,
    /// Switch the running migration to post-copy now (it ends its current pre-copy pass):
    /// the guest pauses here, its vCPU and device state go to the destination, which runs
    /// it at once while the remaining pages follow — pages the guest touches are fetched
    /// first. For a guest that dirties memory faster than the link, whose pre-copy cannot
    /// converge. RISK: after the switch neither side holds the whole guest; if the
    /// connection or either host fails before the last page arrived, the guest is lost
    /// (both VMs end with an error, exit status 125). The destination must run the emu
    /// backend (a recent esvm `receive`); otherwise the migration fails before the switch
    /// and the guest keeps running here.
    Postcopy,
    /// Print each vCPU as the hypervisor sees it (with --json, as a JSON list): its control registers (for an
    /// SEV-ES vCPU only the values tracked from write traps), why reading its registers is
    /// refused, and for an SEV-ES guest whose policy allows debugging the same registers
    /// from its VMSA decrypted by the firmware (DBG_DECRYPT). Pause the VM first to compare
    /// them at one point.
    Vcpus,
    /// Stop the VM now, without asking the guest (no ACPI power-button event): like pulling
    /// the plug, but clean for esvm (a migration in pre-copy is cancelled, a snapshot being
    /// written finishes first). Prints how the VM ended once it has; its `esvm run` (`receive`,
    /// `restore`) exits 0 with the message "the VM was stopped by `esvm ctl shutdown`".
    /// Refused while a migration is in stop-and-copy or committing: its outcome decides
    /// where the VM runs.
    Shutdown,
    /// Print the measurement of an SEV-ES launch that waits for its owner (`esvm run
    /// --wait-for-secret`): the measurement and mnonce, the policy, the firmware's API
    /// version and build, the launch digest the host computed, and the platform's identity
    /// (its PDH fingerprint, as `esvm owner session` printed it for the chain it verified,
    /// and its chip id).
    LaunchMeasurement {
        /// Also write the measurement file `esvm owner verify --measurement` and `esvm owner
        /// secret --measurement` read (51 bytes: measurement, mnonce, API version, build).
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Inject the owner's secret into an SEV-ES launch that waits for its owner
    /// (LAUNCH_SECRET): PACKET is the file `esvm owner secret` wrote for this launch's
    /// measurement. Accepted once; a packet the firmware refuses leaves the launch waiting.
    /// Then `esvm ctl resume` starts the guest, which finds the secret at 0x4000.
    InjectSecret {
        /// The secret packet file (read here and sent through the socket).
        #[arg(value_name = "PACKET")]
        packet: PathBuf,
    },
}

#[derive(Args, Debug)]
pub struct MigrateArgs {
    /// Where the destination listens, as `esvm receive` prints it: tcp://HOST:PORT, e.g.
    /// tcp://127.0.0.1:7000 (tcp:HOST:PORT is read the same), or unix:PATH, a Unix socket
    /// on this host, e.g. unix:/run/esvm/mig.sock (a relative PATH is made absolute here).
    /// fd:N is refused: it is for `esvm receive --listen`.
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
    /// Cap the migration's bandwidth at RATE per second: a size, where a bare number means
    /// MiB (`--max-bandwidth 100` is 100 MiB/s) and K, M, G say otherwise (`50M`, `1G`,
    /// `512K`; a trailing `/s` is allowed), at least 64K; `0` or `unlimited`: no cap (the
    /// default). The downtime estimate then assumes at most RATE, so a low cap makes
    /// convergence harder. Change it while the migration runs with `esvm ctl migrate-set`.
    #[arg(long, value_name = "RATE", value_parser = parse_bandwidth)]
    pub max_bandwidth: Option<u64>,
    /// Migrate over TLS 1.3 (tcp:// only), refusing a destination whose certificate does
    /// not chain to this CA (PEM) or does not hold the URL's host (a DNS name, or an IP
    /// address matched against the certificate's IP SANs; see --tls-name). The VM's process
    /// reads the files (paths are made absolute here) before it connects. Without --tls-*
    /// the migration is plain TCP: unencrypted and unauthenticated.
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// This host's certificate (PEM, chaining to the CA the destination trusts), presented
    /// to the destination: `esvm receive --tls-*` refuses sources without one. Needs
    /// --tls-key and --tls-ca. Test certificates: `esvm certs`.
    #[arg(long, value_name = "FILE", requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Check the destination's certificate against NAME instead of the URL's host (e.g. the
    /// URL has an address, the certificate a host name).
    #[arg(long, value_name = "NAME", requires = "tls_ca")]
    pub tls_name: Option<String>,
    /// Switch to post-copy after PASSES pre-copy passes (0: at once) instead of waiting
    /// for the downtime estimate to fit: the guest then runs at the destination while the
    /// remaining pages follow, those it touches first. Bounds the time to switch for a guest
    /// that dirties memory faster than the link. RISK: after the switch a failure (cut
    /// connection, either host) loses the guest — neither side holds all of it; both VMs end
    /// with an error (exit status 125). Needs a destination on the emu backend. See also
    /// `esvm ctl postcopy` to switch by hand.
    #[arg(long, value_name = "PASSES")]
    pub postcopy_after: Option<u32>,
}

#[derive(Args, Debug)]
#[command(group(
    clap::ArgGroup::new("limits")
        .required(true)
        .multiple(true)
        .args(["max_bandwidth", "downtime_ms"])
))]
pub struct MigrateSetArgs {
    /// The new bandwidth cap per second, as for `esvm ctl migrate --max-bandwidth` (a bare
    /// number means MiB/s; `50M`, `1G`; `0` or `unlimited` lifts the cap).
    #[arg(long, value_name = "RATE", value_parser = parse_bandwidth)]
    pub max_bandwidth: Option<u64>,
    /// The new downtime limit in milliseconds: the next pass's downtime estimate is
    /// compared with it.
    #[arg(long, value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..=MAX_DOWNTIME_MS))]
    pub downtime_ms: Option<u64>,
}

/// A bandwidth cap in bytes per second from a size per second (`50M`, `1G`, `100` = 100
/// MiB/s, `50M/s`); 0 (also `unlimited`) means no cap.
fn parse_bandwidth(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("unlimited") {
        return Ok(0);
    }
    let t = t
        .strip_suffix("/s")
        .or_else(|| t.strip_suffix("/S"))
        .unwrap_or(t);
    let rate = esvm::size::parse_size(t).map_err(|e| format!("{e} (per second)"))?;
    if rate != 0 && rate < MIN_MAX_BANDWIDTH {
        return Err(format!(
            "{rate} bytes per second is below the smallest cap, 64K (per second); give e.g. \
             64K, 50M or 1G, or 0 for no cap"
        ));
    }
    Ok(rate)
}

/// A migration URL in its canonical form (`tcp://HOST:PORT`, `unix:/ABSOLUTE/PATH`),
/// refused here if malformed or `fd:N`.
fn parse_url(s: &str) -> Result<String, String> {
    s.parse::<esvm::migrate::MigrationUrl>()
        .and_then(esvm::migrate::MigrationUrl::absolute)
        .and_then(esvm::migrate::MigrationUrl::for_migrate)
        .map(|u| u.to_string())
        .map_err(|e| e.to_string())
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
    #[error("cannot make the TLS file path {path:?} absolute: {source}")]
    TlsPath {
        path: PathBuf,
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
    #[error(transparent)]
    Output(#[from] OutputError),
    #[error("{NO_API_SOCKET}")]
    NoApiSocket,
    #[error("cannot read the secret packet {path:?}: {source}")]
    ReadPacket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the secret packet {path:?} is {len} bytes; a packet of `esvm owner secret` for the \
         launch secret page is at most {max} bytes"
    )]
    PacketSize { path: PathBuf, len: u64, max: usize },
    #[error("the VM sent a malformed measurement: {0}")]
    BadMeasurement(String),
    #[error("cannot write the measurement file {path:?}: {source}")]
    WriteMeasurement {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What to say when `esvm ctl` has no API socket.
pub const NO_API_SOCKET: &str = "which VM? give its API socket with --api-socket PATH (before or \
                                 after the subcommand) or in the environment variable \
                                 ESVM_API_SOCKET";

/// Runs `esvm ctl`. Returns the exit status (0 success, [`EXIT_REFUSED`] if the VM refused
/// or the migration did not complete); `Err` if the VM could not be reached.
/// `format` says how the reply is printed (refusals and errors go to stderr as text).
pub fn run(args: CtlArgs, format: Format) -> Result<u8, Box<dyn std::error::Error>> {
    run_with(args, format, POLL_INTERVAL).map_err(Into::into)
}

fn run_with(args: CtlArgs, format: Format, poll: Duration) -> Result<u8, CtlError> {
    let socket = args.api_socket.ok_or(CtlError::NoApiSocket)?;
    let mut client = connect(&socket, args.wait.map(Duration::from_secs))?;
    let (name, request) = match args.command {
        CtlCommand::Status => {
            let status = client.status()?;
            format.emit(&status, status_text)?;
            return Ok(0);
        }
        CtlCommand::Pause => ("pause", Request::Pause),
        CtlCommand::Resume => ("resume", Request::Resume),
        CtlCommand::Cancel => ("cancel", Request::Cancel),
        CtlCommand::Postcopy => ("postcopy", Request::MigratePostcopy),
        CtlCommand::MigrateSet(a) => (
            "migrate-set",
            Request::MigrateSet(MigrateSetRequest {
                max_bandwidth_bytes_per_sec: a.max_bandwidth,
                downtime_ms: a.downtime_ms,
            }),
        ),
        CtlCommand::Vcpus => ("vcpus", Request::Vcpus),
        CtlCommand::Shutdown => {
            client.set_timeout(SHUTDOWN_REPLY_TIMEOUT)?;
            ("shutdown", Request::Shutdown)
        }
        CtlCommand::LaunchMeasurement { out } => {
            return launch_measurement(&mut client, format, out.as_deref());
        }
        CtlCommand::InjectSecret { packet } => {
            let max = esvm_control::protocol::MAX_SECRET_PACKET_BYTES;
            let len = std::fs::metadata(&packet)
                .map_err(|source| CtlError::ReadPacket {
                    path: packet.clone(),
                    source,
                })?
                .len();
            if len > max as u64 {
                return Err(CtlError::PacketSize {
                    path: packet,
                    len,
                    max,
                });
            }
            let bytes = std::fs::read(&packet).map_err(|source| CtlError::ReadPacket {
                path: packet.clone(),
                source,
            })?;
            (
                "inject-secret",
                Request::InjectSecret {
                    packet_hex: esvm_control::protocol::to_hex(&bytes),
                },
            )
        }
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
            let abs = |p: PathBuf| {
                std::path::absolute(&p).map_err(|source| CtlError::TlsPath { path: p, source })
            };
            let tls = match m.tls_ca {
                Some(ca) => Some(esvm_control::MigrateTls {
                    ca: abs(ca)?,
                    cert: m.tls_cert.map(abs).transpose()?,
                    key: m.tls_key.map(abs).transpose()?,
                    name: m.tls_name,
                }),
                None => None,
            };
            let req = MigrateRequest {
                tls,
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
                max_bandwidth_bytes_per_sec: m.max_bandwidth.filter(|&b| b > 0),
                postcopy_after: m.postcopy_after,
            };
            return migrate(&mut client, req, detach, format, poll);
        }
    };
    match call(&mut client, name, &request)? {
        Err(code) => Ok(code),
        Ok(Reply::Vcpus { vcpus }) => {
            format.emit(&vcpus, |v| vcpus_text(v))?;
            Ok(0)
        }
        Ok(reply) => {
            format.emit(&reply, reply_text)?;
            Ok(0)
        }
    }
}

/// A reply to pause, resume, cancel, snapshot or migrate as a line of text.
fn reply_text(reply: &Reply) -> String {
    match reply {
        Reply::Paused => "paused".into(),
        Reply::Resumed => "resumed".into(),
        Reply::SecretInjected => {
            "secret injected (LAUNCH_SECRET); `esvm ctl resume` starts the guest".into()
        }
        Reply::MigrationCancelled => "migration cancel requested".into(),
        Reply::PostcopyRequested => {
            "switch to post-copy requested; `esvm ctl status` shows phase post_copy once the \
             guest runs at the destination"
                .into()
        }
        Reply::MigrationLimitsSet(l) => format!(
            "migration limits now: bandwidth {}, downtime limit {} ms",
            cap_text(l.max_bandwidth_bytes_per_sec),
            l.downtime_limit_ms
        ),
        Reply::MigrationStarted { url } => {
            format!("migration to {url} started; follow it with `esvm ctl status`")
        }
        Reply::SnapshotSaved(info) => match info.bytes_written {
            Some(n) => format!(
                "snapshot written to {} ({})",
                info.dir.display(),
                BinaryBytes(n)
            ),
            None => format!("snapshot written to {}", info.dir.display()),
        },
        Reply::Status(s) => status_text(s),
        Reply::Vcpus { vcpus } => vcpus_text(vcpus),
        Reply::LaunchMeasurement(m) => format!("measurement {}", m.measurement),
        Reply::ShutDown(s) => format!(
            "the VM ended: {} (exit status {})",
            s.end_reason.as_deref().unwrap_or("reason unknown"),
            s.exit_status
                .map_or_else(|| "unknown".to_string(), |c| c.to_string())
        ),
    }
}

/// The VM's status as a few aligned lines.
fn status_text(s: &VmStatus) -> String {
    let vm_type = match s.vm_type {
        VmType::Plain => "plain",
        VmType::SevEs => "SEV-ES",
        VmType::Unknown => "unknown",
    };
    let mut t = String::new();
    let _ = writeln!(t, "state         {}", s.state);
    let _ = writeln!(t, "VM            {vm_type}, backend {}", s.backend);
    let scheduling = match s.vcpu_scheduling {
        Some(VcpuScheduling::Parallel) => ", in parallel",
        Some(VcpuScheduling::Deterministic) => ", in turns (deterministic)",
        Some(VcpuScheduling::Unknown) | None => "",
    };
    let _ = writeln!(
        t,
        "size          {} memory, {} vCPU(s){scheduling}",
        BinaryBytes(s.memory_bytes),
        s.vcpus
    );
    match s.instructions {
        Some(n) => {
            let _ = writeln!(t, "instructions  {n}");
        }
        None => {
            let _ = writeln!(t, "instructions  not counted by this backend");
        }
    }
    let _ = writeln!(t, "uptime        {:.1} s", s.uptime_ms as f64 / 1000.0);
    if let Some(reason) = &s.end_reason {
        let _ = writeln!(t, "ended         {reason}");
    }
    if let Some(code) = s.exit_status {
        let _ = writeln!(t, "exit status   {code}");
    }
    match &s.migration {
        None => {
            let _ = writeln!(t, "migration     none");
        }
        Some(m) => {
            if m.postcopy
                .as_ref()
                .is_some_and(|p| p.demand_faults.is_some())
            {
                // A VM that arrived by post-copy: the incoming migration's figures.
                let _ = writeln!(
                    t,
                    "migration     {}: {} | {} left",
                    m.url,
                    m.phase,
                    BinaryBytes(m.pages_remaining.saturating_mul(GUEST_PAGE))
                );
            } else {
                let _ = writeln!(t, "migration     to {}: {}", m.url, progress_line(m));
            }
            if let Some(d) = m.downtime_ms {
                let _ = writeln!(t, "  downtime    {d:.1} ms");
            }
            if let Some(pc) = &m.postcopy {
                let _ = writeln!(t, "  post-copy   {}", postcopy_line(pc));
            }
            if let Some(e) = &m.error {
                let _ = writeln!(t, "  why         {e}");
            }
        }
    }
    t
}

fn regs_text(r: &esvm_control::protocol::ControlRegs) -> String {
    format!(
        "cr0 {:#x} cr4 {:#x} cr8 {:#x} efer {:#x}",
        r.cr0, r.cr4, r.cr8, r.efer
    )
}

/// Each vCPU as a line of its control registers and, indented, what was refused or what
/// the firmware decrypted.
fn vcpus_text(vcpus: &[VcpuView]) -> String {
    let mut t = String::new();
    for v in vcpus {
        let kind = if v.protected { "protected" } else { "plain" };
        let state = v
            .run_state
            .as_deref()
            .map(|s| format!(", {s}"))
            .unwrap_or_default();
        let _ = writeln!(
            t,
            "vCPU {} ({kind}{state}): {} apic_base {:#x}",
            v.id,
            regs_text(&v.control),
            v.apic_base
        );
        if let Some(why) = &v.registers_refused {
            let _ = writeln!(t, "  registers refused: {why}");
        }
        if let Some(r) = &v.debug_vmsa {
            let _ = writeln!(t, "  VMSA (DBG_DECRYPT): {}", regs_text(r));
        }
        if let Some(why) = &v.debug_vmsa_refused {
            let _ = writeln!(t, "  VMSA not decrypted: {why}");
        }
    }
    t
}

/// Connect to the VM's API socket; with `wait`, keep trying while nothing listens there yet
/// (the socket does not exist or refuses), until `wait` has passed.
fn connect(socket: &std::path::Path, wait: Option<Duration>) -> Result<ApiClient, ClientError> {
    let deadline = Instant::now() + wait.unwrap_or_default();
    loop {
        match ApiClient::connect_with_timeout(socket, REPLY_TIMEOUT) {
            Err(ClientError::NoServer { .. } | ClientError::ConnectionRefused { .. })
                if Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            result => return result,
        }
    }
}

/// `esvm ctl launch-measurement`: print the measurement (human-readable or JSON) and write
/// the owner's measurement file if asked.
fn launch_measurement(
    client: &mut ApiClient,
    format: Format,
    out: Option<&std::path::Path>,
) -> Result<u8, CtlError> {
    let m = match call(client, "launch-measurement", &Request::LaunchMeasurement)? {
        Err(code) => return Ok(code),
        Ok(Reply::LaunchMeasurement(m)) => m,
        Ok(other) => {
            return Err(CtlError::BadMeasurement(format!(
                "unexpected reply {other:?}"
            )))
        }
    };
    if let Some(path) = out {
        let file = measurement_file(&m)?;
        std::fs::write(path, file).map_err(|source| CtlError::WriteMeasurement {
            path: path.to_path_buf(),
            source,
        })?;
    }
    if format.is_json() {
        format.emit(&m, |_| String::new())?;
    } else {
        println!("measurement     {}", m.measurement);
        println!("mnonce          {}", m.mnonce);
        println!("policy          {:#x}", m.policy);
        println!(
            "firmware        API {}.{}, build {}",
            m.api_major, m.api_minor, m.build
        );
        println!(
            "launch digest   {} (as the host computed it)",
            m.launch_digest
        );
        println!("platform PDH    {}", m.pdh_fingerprint);
        println!("chip id         {}", m.chip_id);
        println!(
            "secret          {}",
            if m.secret_injected {
                "injected"
            } else {
                "not injected"
            }
        );
        if let Some(path) = out {
            println!("measurement file written to {}", path.display());
        }
    }
    Ok(0)
}

/// The measurement file of `esvm run --measurement-out` (what `esvm owner verify` reads)
/// from the API's measurement.
fn measurement_file(
    m: &esvm_control::LaunchMeasurement,
) -> Result<[u8; esvm_psp::session::MEASUREMENT_FILE_LEN], CtlError> {
    let bytes = |what: &str, hex: &str, len: usize| {
        esvm_control::protocol::from_hex(hex)
            .ok()
            .filter(|b| b.len() == len)
            .ok_or_else(|| CtlError::BadMeasurement(format!("{what} is not {len} bytes of hex")))
    };
    let measure: [u8; 32] = bytes("the measurement", &m.measurement, 32)?
        .try_into()
        .expect("length checked");
    let mnonce: [u8; 16] = bytes("the mnonce", &m.mnonce, 16)?
        .try_into()
        .expect("length checked");
    Ok(esvm_psp::Measurement {
        measure,
        mnonce,
        build: esvm_psp::Build {
            api_major: m.api_major,
            api_minor: m.api_minor,
            build: m.build,
        },
    }
    .to_file_bytes())
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
    format: Format,
    poll: Duration,
) -> Result<u8, CtlError> {
    let started = match call(client, "migrate", &Request::Migrate(req))? {
        Err(code) => return Ok(code),
        Ok(reply) => reply,
    };
    if detach {
        format.emit(&started, reply_text)?;
        return Ok(0);
    }
    let path = client.path().to_path_buf();
    let mut display = if format.is_json() {
        ProgressDisplay::Silent
    } else {
        ProgressDisplay::new(std::io::stderr().is_terminal())
    };
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
    // The final status: as JSON whatever the end; as text only a completed migration (the
    // others are told on stderr below).
    format.emit(&outcome, completed_text)?;
    if outcome.phase == MigrationPhase::Completed {
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
        MigrationPhase::Lost => eprintln!(
            "esvm ctl migrate: migration failed after the switch to post-copy: {why}; the VM \
             ends here and at the destination"
        ),
        _ => eprintln!("esvm ctl migrate: migration failed: {why}; {here}"),
    }
    Ok(EXIT_REFUSED)
}

/// The line that says a migration completed; nothing for one that did not.
fn completed_text(m: &MigrationStatus) -> String {
    if m.phase != MigrationPhase::Completed {
        return String::new();
    }
    let downtime = m
        .downtime_ms
        .map(|d| format!(", downtime {d:.1} ms"))
        .unwrap_or_default();
    format!(
        "migration to {} completed: {} pass(es), {} sent in {:.1} s{downtime}",
        m.url,
        m.pass,
        BinaryBytes(m.bytes_sent),
        m.elapsed_ms as f64 / 1000.0
    )
}

/// A bandwidth cap as text: `capped at 32 MiB/s` or `not capped`.
fn cap_text(cap: Option<u64>) -> String {
    match cap {
        Some(b) => format!("capped at {}/s", esvm::size::format_size(b)),
        None => "not capped".into(),
    }
}

/// One line describing a migration's progress.
/// Post-copy figures in one line.
fn postcopy_line(pc: &esvm_control::PostcopyStatus) -> String {
    let mut parts = Vec::new();
    if let Some(ms) = pc.switch_ms {
        parts.push(format!("switched after {:.1} s", ms as f64 / 1000.0));
    }
    parts.push(format!(
        "{} pages missing at the switch",
        pc.pages_at_switch
    ));
    parts.push(format!("{} page requests", pc.page_requests));
    if let Some(n) = pc.demand_faults {
        parts.push(format!("{n} demand faults"));
    }
    if let Some(ms) = pc.fault_wait_ms {
        parts.push(format!("{ms:.1} ms waiting for pages"));
    }
    parts.join(" | ")
}

fn progress_line(m: &MigrationStatus) -> String {
    let est = match m.estimated_downtime_ms {
        Some(ms) => format!("{ms:.1} ms"),
        None => "?".into(),
    };
    let cap = match m.max_bandwidth_bytes_per_sec {
        Some(b) => format!(" (cap {}/s)", esvm::size::format_size(b)),
        None => String::new(),
    };
    format!(
        "{} pass {} | sent {} | {} left | {}/s{cap} | dirty {:.0} pages/s | est. downtime \
         {est} (limit {} ms) | {:.1} s",
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
/// whenever the phase or pass changes (and every few seconds); none with --json.
enum ProgressDisplay {
    Silent,
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
            ProgressDisplay::Silent => {}
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
        assert_eq!(a.api_socket, Some(PathBuf::from("/s")));
        // The socket may follow the subcommand too.
        let b = parse(&["status", "--api-socket", "/t"]).unwrap();
        assert_eq!(b.api_socket, Some(PathBuf::from("/t")));
        assert!(matches!(b.command, CtlCommand::Status));
        let b = parse(&["migrate", "tcp://h:1", "--api-socket", "/u", "--detach"]).unwrap();
        assert_eq!(b.api_socket, Some(PathBuf::from("/u")));
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
        let CtlCommand::Migrate(m) = parse(&["--api-socket", "/s", "migrate", "unix:m.sock"])
            .unwrap()
            .command
        else {
            panic!("not migrate")
        };
        let abs = std::env::current_dir().unwrap().join("m.sock");
        assert_eq!(m.url, format!("unix:{}", abs.display()));
        let e = parse(&["--api-socket", "/s", "migrate", "fd:3"]).unwrap_err();
        assert!(e.to_string().contains("cannot take a descriptor"), "{e}");
        assert!(parse(&["--api-socket", "/s", "snapshot"]).is_err());
        assert!(parse(&["--api-socket", "/s"]).is_err());
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
        ctl_as(vm, argv, Format::Human)
    }

    fn ctl_as(vm: &Vm, argv: &[&str], format: Format) -> Result<u8, CtlError> {
        let mut full = vec!["--api-socket", vm.path.to_str().unwrap()];
        full.extend_from_slice(argv);
        run_with(parse(&full).unwrap(), format, Duration::from_millis(1))
    }

    #[test]
    fn without_a_socket_it_says_how_to_give_one() {
        let args = CtlArgs {
            api_socket: None,
            wait: None,
            command: CtlCommand::Status,
        };
        let err = run_with(args, Format::Human, Duration::from_millis(1)).unwrap_err();
        assert!(matches!(err, CtlError::NoApiSocket));
        assert!(err.to_string().contains("ESVM_API_SOCKET"), "{err}");
    }

    #[test]
    fn json_runs_every_command_with_the_same_exit_statuses() {
        let vm = vm();
        for argv in [&["status"][..], &["pause"], &["resume"]] {
            assert_eq!(ctl_as(&vm, argv, Format::Json).unwrap(), 0, "{argv:?}");
        }
        assert_eq!(
            ctl_as(&vm, &["cancel"], Format::Json).unwrap(),
            EXIT_REFUSED
        );
        assert_eq!(
            ctl_as(&vm, &["migrate", "tcp://ok:1"], Format::Json).unwrap(),
            0
        );
        let vm = self::vm();
        assert_eq!(
            ctl_as(&vm, &["migrate", "tcp://fail:1"], Format::Json).unwrap(),
            EXIT_REFUSED
        );
    }

    #[test]
    fn the_status_text_is_a_readable_summary_not_json() {
        let vm = vm();
        let mut client = ApiClient::connect(&vm.path).unwrap();
        let mut status = client.status().unwrap();
        let text = status_text(&status);
        assert!(serde_json::from_str::<serde_json::Value>(&text).is_err());
        assert!(text.starts_with("state         running\n"), "{text}");
        assert!(text.contains("SEV-ES"), "{text}");
        assert!(text.contains("migration     none"), "{text}");
        let mut m = MigrationStatus::new("tcp://h:1", 300);
        m.phase = MigrationPhase::Failed;
        m.error = Some("the destination went away".into());
        status.migration = Some(m);
        status.exit_status = Some(3);
        let text = status_text(&status);
        assert!(
            text.contains("migration     to tcp://h:1: failed pass"),
            "{text}"
        );
        assert!(text.contains("the destination went away"), "{text}");
        assert!(text.contains("exit status   3"), "{text}");
        let json: serde_json::Value =
            serde_json::from_str(&Format::Json.render(&status, status_text).unwrap()).unwrap();
        assert_eq!(json["state"], "running");
        assert_eq!(json["exit_status"], 3);
        assert_eq!(json["migration"]["phase"], "failed");
    }

    #[test]
    fn the_vcpus_text_shows_registers_and_refusals() {
        let regs = esvm_control::protocol::ControlRegs {
            cr0: 0x8000_0011,
            cr4: 0x20,
            cr8: 0,
            efer: 0xd00,
        };
        let v = VcpuView {
            id: 0,
            protected: true,
            control: regs,
            apic_base: 0xfee0_0900,
            registers_refused: Some("encrypted VMSA".into()),
            debug_vmsa: None,
            debug_vmsa_refused: Some("policy has NODBG".into()),
            run_state: None,
        };
        let text = vcpus_text(std::slice::from_ref(&v));
        assert!(
            text.starts_with("vCPU 0 (protected): cr0 0x80000011 cr4 0x20 cr8 0x0 efer 0xd00"),
            "{text}"
        );
        assert!(text.contains("registers refused: encrypted VMSA"), "{text}");
        assert!(
            text.contains("VMSA not decrypted: policy has NODBG"),
            "{text}"
        );
        let held = VcpuView {
            id: 1,
            run_state: Some("ap-reset-hold".into()),
            ..v.clone()
        };
        let text = vcpus_text(std::slice::from_ref(&held));
        assert!(
            text.starts_with("vCPU 1 (protected, ap-reset-hold): cr0"),
            "{text}"
        );
        let json: serde_json::Value =
            serde_json::from_str(&Format::Json.render(&vec![v], |v| vcpus_text(v)).unwrap())
                .unwrap();
        assert_eq!(json[0]["control"]["efer"], 0xd00);
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

    /// `--wait` reaches a VM whose socket appears later, and gives up after its time when
    /// none does.
    #[test]
    fn wait_reaches_a_socket_that_appears_later() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("late.sock");
        let late = path.clone();
        let server = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            ApiServer::spawn(
                &late,
                Arc::new(MockTarget::new(VmType::Plain)) as Arc<dyn ControlTarget + Send + Sync>,
            )
            .unwrap()
        });
        let p = path.to_str().unwrap();
        let args = parse(&["--api-socket", p, "status", "--wait", "10"]).unwrap();
        assert_eq!(
            run_with(args, Format::Json, Duration::from_millis(1)).unwrap(),
            0
        );
        drop(server.join().unwrap());

        let none = dir.path().join("never.sock");
        let args = parse(&[
            "--wait",
            "1",
            "--api-socket",
            none.to_str().unwrap(),
            "status",
        ]);
        let start = Instant::now();
        let err = run_with(args.unwrap(), Format::Json, Duration::from_millis(1)).unwrap_err();
        assert!(start.elapsed() >= Duration::from_secs(1), "{err}");
        assert!(err.to_string().contains("no API socket"), "{err}");
    }

    #[test]
    fn no_vm_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("none.sock");
        let args = parse(&["--api-socket", path.to_str().unwrap(), "status"]).unwrap();
        let err = run(args, Format::Json).unwrap_err();
        assert!(err.to_string().contains("no API socket"), "{err}");
    }

    #[test]
    fn bandwidth_options() {
        for (arg, want) in [
            ("100", 100 << 20),
            ("50M", 50 << 20),
            ("1G", 1 << 30),
            ("64K", 64 << 10),
            ("50M/s", 50 << 20),
            ("0", 0),
            ("unlimited", 0),
        ] {
            assert_eq!(parse_bandwidth(arg), Ok(want), "{arg}");
        }
        for bad in ["", "fast", "1K", "-5M", "4096B"] {
            assert!(parse_bandwidth(bad).is_err(), "{bad}");
        }
        let a = parse(&[
            "--api-socket",
            "/s",
            "migrate",
            "tcp://h:1",
            "--max-bandwidth",
            "20M",
        ])
        .unwrap();
        let CtlCommand::Migrate(m) = a.command else {
            panic!("not migrate")
        };
        assert_eq!(m.max_bandwidth, Some(20 << 20));
        let a = parse(&["--api-socket", "/s", "migrate-set", "--downtime-ms", "40"]).unwrap();
        let CtlCommand::MigrateSet(m) = a.command else {
            panic!("not migrate-set")
        };
        assert_eq!((m.max_bandwidth, m.downtime_ms), (None, Some(40)));
        // Nothing to change, or out of range: usage errors.
        assert!(parse(&["--api-socket", "/s", "migrate-set"]).is_err());
        assert!(parse(&["--api-socket", "/s", "migrate-set", "--downtime-ms", "0"]).is_err());
        assert!(parse(&["--api-socket", "/s", "migrate-set", "--max-bandwidth", "1K"]).is_err());
    }

    #[test]
    fn migrate_set_changes_the_limits_the_status_shows() {
        let vm = vm();
        // No migration runs: refused.
        assert_eq!(
            ctl(&vm, &["migrate-set", "--max-bandwidth", "10M"]).unwrap(),
            EXIT_REFUSED
        );
        assert_eq!(
            ctl(
                &vm,
                &[
                    "migrate",
                    "tcp://hang:1",
                    "--detach",
                    "--max-bandwidth",
                    "8M"
                ]
            )
            .unwrap(),
            0
        );
        let m = vm.target.migrate_requests().pop().unwrap();
        assert_eq!(m.max_bandwidth_bytes_per_sec, Some(8 << 20));
        assert_eq!(
            ctl(
                &vm,
                &[
                    "migrate-set",
                    "--max-bandwidth",
                    "1G",
                    "--downtime-ms",
                    "30"
                ]
            )
            .unwrap(),
            0
        );
        let s = vm.target.status().migration.unwrap();
        assert_eq!(s.max_bandwidth_bytes_per_sec, Some(1 << 30));
        assert_eq!(s.downtime_limit_ms, 30);
        assert_eq!(
            ctl(&vm, &["migrate-set", "--max-bandwidth", "0"]).unwrap(),
            0
        );
        assert_eq!(
            vm.target
                .status()
                .migration
                .unwrap()
                .max_bandwidth_bytes_per_sec,
            None
        );
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
        assert!(!line.contains("cap"), "{line}");
        m.max_bandwidth_bytes_per_sec = Some(32 << 20);
        let line = progress_line(&m);
        assert!(line.contains("(cap 32 MiB/s)"), "{line}");
    }
}
