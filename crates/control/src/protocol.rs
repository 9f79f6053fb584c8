//! The control protocol's messages and their wire encoding.
//!
//! One JSON object per line (`\n`-terminated, UTF-8) in each direction; every object carries
//! `"version": PROTOCOL_VERSION`. A request is `{"version":1,"command":"<name>", ...args}`;
//! a response is `{"version":1,"ok":{"kind":"<kind>", ...}}` or
//! `{"version":1,"error":{"code":"<code>","message":"..."}}`. See `docs/control-api.md`.
//!
//! Requests are parsed strictly (unknown commands and unknown fields are errors, so a typo is
//! not silently ignored); responses are parsed leniently (unknown fields are ignored, unknown
//! enum values map to `unknown`), so an older client can read a newer server's status.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::PathBuf;
use thiserror::Error;

/// The protocol version this crate speaks. Bumped on any incompatible change.
pub const PROTOCOL_VERSION: u32 = 1;

/// Default `downtime_ms` of a [`MigrateRequest`].
pub const DEFAULT_DOWNTIME_MS: u64 = 300;
/// Default `timeout_s` of a [`MigrateRequest`].
pub const DEFAULT_TIMEOUT_S: u64 = 120;

/// Largest accepted `downtime_ms` (one hour).
pub const MAX_DOWNTIME_MS: u64 = 3_600_000;
/// Largest accepted `timeout_s` (one week).
pub const MAX_TIMEOUT_S: u64 = 7 * 24 * 3600;
/// Smallest accepted bandwidth cap (64 KiB/s; 0 means no cap): below it a single frame
/// would outlast the destination's I/O timeout.
pub const MIN_MAX_BANDWIDTH: u64 = 64 << 10;

/// A request to a running VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Report the VM's [`VmStatus`].
    Status,
    /// Stop running guest code (the VM keeps its state).
    Pause,
    /// Continue running guest code after [`Request::Pause`].
    Resume,
    /// Write a snapshot of the VM into `dir` (an absolute path on the VM's host). An
    /// existing directory that is not empty is refused unless `force` (default false, and
    /// left out of the request when false: older servers read it unchanged).
    Snapshot {
        dir: PathBuf,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        force: bool,
    },
    /// Start a live migration in the background; follow it through [`Request::Status`].
    Migrate(MigrateRequest),
    /// Change the running migration's bandwidth cap and/or downtime limit (a field left out
    /// stays as it is); answered with the limits now in force.
    MigrateSet(MigrateSetRequest),
    /// Cancel the running migration (the source keeps running).
    Cancel,
    /// Switch the running migration to post-copy as soon as it can (it ends its current
    /// pre-copy pass): the guest then runs at the destination while the remaining pages
    /// follow. After the switch a failure loses the guest (neither side holds all of it).
    MigratePostcopy,
    /// Report each vCPU as the hypervisor sees it ([`VcpuView`]).
    Vcpus,
    /// Stop the VM (ACPI-less: the guest is not asked) and answer once it has ended, with
    /// its final [`VmStatus`]; the VMM process then ends.
    Shutdown,
    /// SEV-ES launch waiting for the owner (`esvm run --wait-for-secret`): report the launch
    /// measurement ([`LaunchMeasurement`]).
    LaunchMeasurement,
    /// SEV-ES launch waiting for the owner: run LAUNCH_SECRET with the owner's packet
    /// (`esvm owner secret`: the 52-byte header, then the ciphertext), as lower-case or
    /// upper-case hex, at most [`MAX_SECRET_PACKET_BYTES`] bytes.
    InjectSecret { packet_hex: String },
}

/// Largest secret packet [`Request::InjectSecret`] carries (its hex form fits a request line).
pub const MAX_SECRET_PACKET_BYTES: usize = 16 << 10;

impl Request {
    /// The command's wire name (`"status"`, `"migrate"`, ...).
    pub fn command_name(&self) -> &'static str {
        match self {
            Request::Status => "status",
            Request::Pause => "pause",
            Request::Resume => "resume",
            Request::Snapshot { .. } => "snapshot",
            Request::Migrate(_) => "migrate",
            Request::MigrateSet(_) => "migrate_set",
            Request::Cancel => "cancel",
            Request::MigratePostcopy => "migrate_postcopy",
            Request::Vcpus => "vcpus",
            Request::Shutdown => "shutdown",
            Request::LaunchMeasurement => "launch_measurement",
            Request::InjectSecret { .. } => "inject_secret",
        }
    }
}

/// What to do when a migration's timeout (or pass cap) is reached before the downtime
/// estimate fits the limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnTimeout {
    /// Give up; the source VM keeps running.
    #[default]
    Cancel,
    /// Pause the source anyway and copy what is left (downtime above the limit).
    Force,
}

impl fmt::Display for OnTimeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OnTimeout::Cancel => "cancel",
            OnTimeout::Force => "force",
        })
    }
}

/// Arguments of [`Request::Migrate`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// Where the destination listens, e.g. `tcp://10.0.0.2:7000` or `unix:/run/mig.sock`
    /// (the VMM decides which schemes it supports).
    pub url: String,
    /// Largest acceptable downtime (stop-and-copy) in milliseconds.
    #[serde(default = "default_downtime_ms")]
    pub downtime_ms: u64,
    /// Longest pre-copy phase in seconds before `on_timeout` applies.
    #[serde(default = "default_timeout_s")]
    pub timeout_s: u64,
    /// Most pre-copy passes (the VMM's default when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_passes: Option<u32>,
    /// What to do at the timeout or the pass cap.
    #[serde(default)]
    pub on_timeout: OnTimeout,
    /// SEV-ES: a file (on the VMM's host) with the root the destination platform's
    /// certificate chain must verify against — a chain as `esvm platform export` writes it,
    /// or a bare ARK certificate. Absent: the root the VM's own platform trusts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust: Option<PathBuf>,
    /// Bandwidth cap in bytes per second over everything the migration writes; absent or
    /// 0: no cap. At least [`MIN_MAX_BANDWIDTH`] otherwise. Changeable with
    /// [`Request::MigrateSet`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bandwidth_bytes_per_sec: Option<u64>,
    /// Run the migration over TLS 1.3 with these files (absent: plain, unauthenticated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<MigrateTls>,
    /// Switch to post-copy after this many pre-copy passes (0: at once, before any pass);
    /// absent: pre-copy only (a switch can still be asked for with
    /// [`Request::MigratePostcopy`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postcopy_after: Option<u32>,
}

/// TLS for a migration's connection ([`MigrateRequest::tls`]). The paths are files on the
/// VMM's host (PEM); the VMM reads and checks them before it connects.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateTls {
    /// The CA the destination's certificate must chain to.
    pub ca: PathBuf,
    /// This VMM's client certificate (with `key`); a destination refuses a source without
    /// one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    /// The private key of `cert`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    /// The name the destination's certificate must hold, instead of the URL's host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// Arguments of [`Request::MigrateSet`]: the limits to change (at least one).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateSetRequest {
    /// The new bandwidth cap in bytes per second; 0 lifts the cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bandwidth_bytes_per_sec: Option<u64>,
    /// The new downtime limit in milliseconds (the next pass's estimate is compared with
    /// it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
}

fn check_downtime_ms(what: &str, ms: u64) -> Result<(), ApiError> {
    if ms == 0 || ms > MAX_DOWNTIME_MS {
        return Err(ApiError::invalid_argument(format!(
            "{what}: downtime_ms must be between 1 and {MAX_DOWNTIME_MS}, got {ms}"
        )));
    }
    Ok(())
}

fn check_bandwidth(what: &str, bytes_per_sec: Option<u64>) -> Result<(), ApiError> {
    match bytes_per_sec {
        Some(b) if b != 0 && b < MIN_MAX_BANDWIDTH => Err(ApiError::invalid_argument(format!(
            "{what}: max_bandwidth_bytes_per_sec must be 0 (no cap) or at least \
             {MIN_MAX_BANDWIDTH} (64 KiB/s), got {b}"
        ))),
        _ => Ok(()),
    }
}

impl MigrateSetRequest {
    /// Checks the arguments' ranges (the server does this before calling the target).
    pub fn validate(&self) -> Result<(), ApiError> {
        if self.max_bandwidth_bytes_per_sec.is_none() && self.downtime_ms.is_none() {
            return Err(ApiError::invalid_argument(
                "migrate_set: nothing to change; give max_bandwidth_bytes_per_sec and/or \
                 downtime_ms",
            ));
        }
        if let Some(ms) = self.downtime_ms {
            check_downtime_ms("migrate_set", ms)?;
        }
        check_bandwidth("migrate_set", self.max_bandwidth_bytes_per_sec)
    }
}

/// The limits of the running migration, as [`Request::MigrateSet`] answers them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationLimits {
    /// The bandwidth cap in bytes per second; absent: none.
    #[serde(default)]
    pub max_bandwidth_bytes_per_sec: Option<u64>,
    pub downtime_limit_ms: u64,
}

fn default_downtime_ms() -> u64 {
    DEFAULT_DOWNTIME_MS
}

fn default_timeout_s() -> u64 {
    DEFAULT_TIMEOUT_S
}

impl MigrateRequest {
    /// A request with the default downtime, timeout and policy.
    pub fn new(url: impl Into<String>) -> Self {
        MigrateRequest {
            url: url.into(),
            downtime_ms: DEFAULT_DOWNTIME_MS,
            timeout_s: DEFAULT_TIMEOUT_S,
            max_passes: None,
            on_timeout: OnTimeout::Cancel,
            trust: None,
            max_bandwidth_bytes_per_sec: None,
            tls: None,
            postcopy_after: None,
        }
    }

    /// Checks the arguments' ranges (the server does this before calling the target).
    pub fn validate(&self) -> Result<(), ApiError> {
        let url = &self.url;
        if url.trim().is_empty() {
            return Err(ApiError::invalid_argument(
                "migrate: the destination url is empty; give e.g. tcp://HOST:PORT",
            ));
        }
        if url.chars().any(char::is_control) || url.len() > 4096 {
            return Err(ApiError::invalid_argument(
                "migrate: the destination url contains control characters or is longer than \
                 4096 bytes",
            ));
        }
        check_downtime_ms("migrate", self.downtime_ms)?;
        check_bandwidth("migrate", self.max_bandwidth_bytes_per_sec)?;
        if self.timeout_s == 0 || self.timeout_s > MAX_TIMEOUT_S {
            return Err(ApiError::invalid_argument(format!(
                "migrate: timeout_s must be between 1 and {MAX_TIMEOUT_S}, got {}",
                self.timeout_s
            )));
        }
        if self.max_passes == Some(0) {
            return Err(ApiError::invalid_argument(
                "migrate: max_passes must be at least 1 (the first, full pass)",
            ));
        }
        if let Some(t) = &self.tls {
            if t.cert.is_some() != t.key.is_some() {
                return Err(ApiError::invalid_argument(
                    "migrate: tls.cert and tls.key go together (a certificate and its key)",
                ));
            }
        }
        Ok(())
    }
}

/// A response: success with a [`Reply`], or an [`ApiError`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
// One response lives per request and is not stored: its size does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Response {
    Ok(Reply),
    Error(ApiError),
}

impl Response {
    /// `Ok(reply)` or `Err(error)`.
    pub fn into_result(self) -> Result<Reply, ApiError> {
        match self {
            Response::Ok(r) => Ok(r),
            Response::Error(e) => Err(e),
        }
    }
}

impl From<Result<Reply, ApiError>> for Response {
    fn from(r: Result<Reply, ApiError>) -> Self {
        match r {
            Ok(r) => Response::Ok(r),
            Err(e) => Response::Error(e),
        }
    }
}

/// The payload of a successful response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Reply {
    /// Answer to [`Request::Status`].
    Status(VmStatus),
    /// Answer to [`Request::Pause`].
    Paused,
    /// Answer to [`Request::Resume`].
    Resumed,
    /// Answer to [`Request::Snapshot`].
    SnapshotSaved(SnapshotInfo),
    /// Answer to [`Request::Migrate`]: the migration runs in the background.
    MigrationStarted { url: String },
    /// Answer to [`Request::MigrateSet`]: the limits now in force.
    MigrationLimitsSet(MigrationLimits),
    /// Answer to [`Request::Cancel`]: cancel was requested; the migration's status turns
    /// `cancelled` once the engine has stopped.
    MigrationCancelled,
    /// Answer to [`Request::MigratePostcopy`]: the switch was requested; the migration's
    /// status turns `post_copy` once the guest runs at the destination.
    PostcopyRequested,
    /// Answer to [`Request::Vcpus`].
    Vcpus { vcpus: Vec<VcpuView> },
    /// Answer to [`Request::Shutdown`]: the VM has ended; its final status
    /// (`exit_status`, `end_reason`).
    ShutDown(VmStatus),
    /// Answer to [`Request::LaunchMeasurement`].
    LaunchMeasurement(LaunchMeasurement),
    /// Answer to [`Request::InjectSecret`]: LAUNCH_SECRET accepted the packet.
    SecretInjected,
}

/// An SEV-ES launch's measurement (LAUNCH_MEASURE) and what the guest owner needs beside it
/// to verify it (`esvm owner verify`) and bind a secret to it (`esvm owner secret`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchMeasurement {
    /// HMAC-SHA256 under the session's TIK over the firmware version, the policy, the launch
    /// digest and the mnonce: 64 hex digits.
    pub measurement: String,
    /// The firmware's nonce of this launch: 32 hex digits (new on every launch).
    pub mnonce: String,
    /// The guest policy of the launch.
    pub policy: u32,
    /// The firmware's API version and build bound into the measurement.
    pub api_major: u8,
    pub api_minor: u8,
    pub build: u8,
    /// The launch digest as the host computed it from the plaintext it measured (SHA-256
    /// over the LAUNCH_UPDATE_DATA regions and the initial VMSAs), 64 hex digits. For
    /// information: the owner computes it from the launch inputs (`esvm owner verify
    /// --guest/--kernel`) rather than trusting the host's.
    pub launch_digest: String,
    /// The platform: the fingerprint of its PDH certificate, as `esvm owner session` prints
    /// it for the chain it verified (`esvm platform export`).
    pub pdh_fingerprint: String,
    /// The platform's chip id (GET_ID), hex.
    pub chip_id: String,
    /// Whether a secret was injected already (one is accepted per launch).
    #[serde(default)]
    pub secret_injected: bool,
}

/// CR0, CR4, CR8 and EFER.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlRegs {
    pub cr0: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
}

/// One vCPU as the hypervisor sees it, at a clean point between runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuView {
    pub id: u32,
    /// An SEV-ES vCPU whose state is encrypted.
    pub protected: bool,
    /// The control registers the hypervisor sees (for a protected vCPU: the values it
    /// tracks from the write-trap exits).
    pub control: ControlRegs,
    pub apic_base: u64,
    /// Why reading the general registers was refused (always, for a protected vCPU).
    #[serde(default)]
    pub registers_refused: Option<String>,
    /// Protected vCPU: the control registers in its VMSA, decrypted by the firmware's
    /// DBG_DECRYPT (a guest policy that allows debugging only).
    #[serde(default)]
    pub debug_vmsa: Option<ControlRegs>,
    /// Why `debug_vmsa` is missing for a protected vCPU (e.g. the policy has NODBG).
    #[serde(default)]
    pub debug_vmsa_refused: Option<String>,
    /// Where the vCPU stands: `running`, `halted`, `wait-for-sipi` (an AP not started yet,
    /// or after INIT) or `ap-reset-hold` (an SEV-ES AP parked in the AP stub until a SIPI);
    /// absent from VMMs that do not report it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_state: Option<String>,
}

/// What a snapshot wrote.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// The directory the snapshot was written to.
    pub dir: PathBuf,
    /// Bytes written, if the VMM counts them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_written: Option<u64>,
}

impl SnapshotInfo {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        SnapshotInfo {
            dir: dir.into(),
            bytes_written: None,
        }
    }
}

/// Why a request failed. Also the error type of [`crate::ControlTarget`]'s methods.
#[derive(Debug, Clone, PartialEq, Eq, Error, Serialize, Deserialize)]
#[error("{message} ({code})")]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
        }
    }
    /// The request cannot be served in the VM's current state (pause while paused,
    /// migrate while migrating, cancel with no migration, ...).
    pub fn invalid_state(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidState, message)
    }
    /// An argument is out of range or malformed.
    pub fn invalid_argument(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidArgument, message)
    }
    /// This VM (backend, VM type, build) does not support the operation.
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unsupported, message)
    }
    /// The operation was attempted and failed (I/O error, ...).
    pub fn failed(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Failed, message)
    }
}

/// Machine-readable error class of an [`ApiError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request line is not valid JSON (or not UTF-8).
    BadJson,
    /// Valid JSON, but not a valid request: not an object, unknown command, unknown or
    /// missing field, wrong type.
    BadRequest,
    /// The request's `version` is not one the server speaks.
    UnsupportedVersion,
    /// The request line is longer than the server accepts.
    LineTooLong,
    /// The server has too many open connections.
    Busy,
    /// Not possible in the VM's current state.
    InvalidState,
    /// An argument is out of range or malformed.
    InvalidArgument,
    /// Not supported by this VM.
    Unsupported,
    /// The operation was attempted and failed.
    Failed,
    /// A bug in the VMM (it panicked while serving the request).
    Internal,
    /// A code this client does not know (sent by a newer server).
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// The wire name (`"bad_json"`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadJson => "bad_json",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::LineTooLong => "line_too_long",
            ErrorCode::Busy => "busy",
            ErrorCode::InvalidState => "invalid_state",
            ErrorCode::InvalidArgument => "invalid_argument",
            ErrorCode::Unsupported => "unsupported",
            ErrorCode::Failed => "failed",
            ErrorCode::Internal => "internal",
            ErrorCode::Unknown => "unknown",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The lifecycle state of a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// Created, not yet running guest code (loading, launch measurement, ...).
    Starting,
    /// Running guest code.
    Running,
    /// Paused by [`Request::Pause`] (or left paused by an in-doubt migration).
    Paused,
    /// A live migration is in progress (the guest runs during pre-copy and is stopped
    /// during stop-and-copy); see [`VmStatus::migration`].
    Migrating,
    /// Migrated away: the destination committed and this VM is dead; it never runs again.
    Migrated,
    /// The guest exited (see [`VmStatus::exit_status`]).
    Exited,
    /// The guest shut down abnormally (triple fault) or the VMM failed.
    Failed,
    /// A state this client does not know (sent by a newer server).
    #[serde(other)]
    Unknown,
}

impl VmState {
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Migrating => "migrating",
            VmState::Migrated => "migrated",
            VmState::Exited => "exited",
            VmState::Failed => "failed",
            VmState::Unknown => "unknown",
        }
    }
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The kind of VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmType {
    /// Guest memory and registers visible to the host.
    Plain,
    /// SEV-ES: private memory encrypted, register state in the encrypted VMSA.
    SevEs,
    #[serde(other)]
    Unknown,
}

/// How a VM with several vCPUs runs them (emu backend).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VcpuScheduling {
    /// A host thread per vCPU, side by side.
    Parallel,
    /// In turns on one host thread, a fixed quantum each (`--deterministic`): runs replay
    /// exactly.
    Deterministic,
    #[serde(other)]
    Unknown,
}

/// A VM's status, as [`Request::Status`] reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmStatus {
    pub state: VmState,
    /// Execution backend (`"emu"`, `"kvm"`, ...).
    pub backend: String,
    pub vm_type: VmType,
    /// Guest memory size in bytes.
    pub memory_bytes: u64,
    pub vcpus: u32,
    /// How the vCPUs run, for a VM where that choice matters (several vCPUs on the emu
    /// backend); absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpu_scheduling: Option<VcpuScheduling>,
    /// Guest instructions executed so far (all vCPUs), if the backend counts them.
    #[serde(default)]
    pub instructions: Option<u64>,
    /// Time since the VM was created, in milliseconds.
    pub uptime_ms: u64,
    /// The VMM's exit status once the VM ended (`exited`, `failed`, `migrated`).
    #[serde(default)]
    pub exit_status: Option<i32>,
    /// How the VM ended, once it did ("the guest exited with status 0", "the VM was
    /// stopped by SIGTERM", "the VM migrated to tcp:H:P", ...).
    #[serde(default)]
    pub end_reason: Option<String>,
    /// The current or most recent migration, if any was started.
    #[serde(default)]
    pub migration: Option<MigrationStatus>,
    /// SEV-ES: the launch is measured and waits for the owner (`esvm run
    /// --wait-for-secret`): `launch_measurement`, `inject_secret`, then `resume` runs
    /// LAUNCH_FINISH and starts the guest. `state` is `starting` meanwhile.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub launch_pending: bool,
}

impl VmStatus {
    /// Replaces non-finite floating-point figures (which JSON cannot carry) with 0 / none.
    pub fn sanitize(&mut self) {
        if let Some(m) = &mut self.migration {
            m.sanitize();
        }
    }
}

/// Where a migration is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrationPhase {
    /// Connecting to the destination and agreeing on the configuration (and, for SEV-ES,
    /// the transport keys).
    Setup,
    /// Copying memory while the guest runs (pass 1 is the full pass).
    PreCopy,
    /// The guest is stopped; the last dirty pages and the vCPU state are sent.
    StopAndCopy,
    /// Everything was sent; waiting for the destination to commit.
    Committing,
    /// The destination committed: success. The source VM is dead.
    Completed,
    /// Failed before the destination committed: the source VM keeps running.
    Failed,
    /// Cancelled (by request or by the timeout policy): the source VM keeps running.
    Cancelled,
    /// The connection failed after everything was sent but before the commit was
    /// confirmed: the destination may or may not run the guest. The source stays paused
    /// (it must never run twice).
    InDoubt,
    /// Post-copy: the guest runs at the destination while the remaining pages follow
    /// (requested ones first). The source is paused and can never resume.
    PostCopy,
    /// Failed after the switch to post-copy: neither side holds the whole guest, so both
    /// VMs end with an error; the guest is lost.
    Lost,
    /// A phase this client does not know (sent by a newer server).
    #[serde(other)]
    Unknown,
}

impl MigrationPhase {
    /// Whether the migration has ended (successfully or not).
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            MigrationPhase::Completed
                | MigrationPhase::Failed
                | MigrationPhase::Cancelled
                | MigrationPhase::InDoubt
                | MigrationPhase::Lost
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            MigrationPhase::Setup => "setup",
            MigrationPhase::PreCopy => "pre_copy",
            MigrationPhase::StopAndCopy => "stop_and_copy",
            MigrationPhase::Committing => "committing",
            MigrationPhase::Completed => "completed",
            MigrationPhase::Failed => "failed",
            MigrationPhase::Cancelled => "cancelled",
            MigrationPhase::InDoubt => "in_doubt",
            MigrationPhase::PostCopy => "post_copy",
            MigrationPhase::Lost => "lost",
            MigrationPhase::Unknown => "unknown",
        }
    }
}

impl fmt::Display for MigrationPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Progress of a live migration (the current one, or the last one once it has ended).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationStatus {
    pub phase: MigrationPhase,
    /// The destination.
    pub url: String,
    /// Current memory pass, from 1 (the full pass); 0 during setup.
    pub pass: u32,
    /// Bytes written to the destination so far.
    pub bytes_sent: u64,
    /// Pages sent so far (all passes).
    pub pages_sent: u64,
    /// Dirty pages known and not yet sent.
    pub pages_remaining: u64,
    /// Guest memory size in pages.
    pub total_pages: u64,
    /// Pages the guest dirtied per second during the last pass.
    pub dirty_rate_pages_per_sec: f64,
    /// Measured transfer bandwidth, bytes per second (0 until measured).
    pub bandwidth_bytes_per_sec: f64,
    /// Estimated downtime if stop-and-copy started now, if it can be estimated yet.
    #[serde(default)]
    pub estimated_downtime_ms: Option<f64>,
    /// The downtime limit the migration aims for (it may change during the migration:
    /// [`Request::MigrateSet`]).
    pub downtime_limit_ms: u64,
    /// The bandwidth cap in bytes per second, if any (changeable like the downtime limit).
    /// `bandwidth_bytes_per_sec` stays at or below it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bandwidth_bytes_per_sec: Option<u64>,
    /// Time since the migration started, in milliseconds.
    pub elapsed_ms: u64,
    /// The measured downtime, once the migration has completed.
    #[serde(default)]
    pub downtime_ms: Option<f64>,
    /// Why the migration failed (phase `failed`, `cancelled`, `in_doubt` or `lost`).
    #[serde(default)]
    pub error: Option<String>,
    /// Post-copy figures, once the migration switched to post-copy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postcopy: Option<PostcopyStatus>,
}

/// Post-copy figures of a migration ([`MigrationStatus::postcopy`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PostcopyStatus {
    /// Time from the start of the migration to the switch (the guest runs at the
    /// destination from then on), milliseconds.
    #[serde(default)]
    pub switch_ms: Option<u64>,
    /// Pages that were missing at the destination when its guest started.
    #[serde(default)]
    pub pages_at_switch: u64,
    /// Pages the destination requested because its guest faulted on them (source side).
    #[serde(default)]
    pub page_requests: u64,
    /// Guest (or VMM) accesses that waited for a missing page (destination side).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub demand_faults: Option<u64>,
    /// Total time spent waiting for missing pages, milliseconds (destination side).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault_wait_ms: Option<f64>,
}

impl MigrationStatus {
    /// A migration to `url` that has just started (phase `setup`, all counters 0).
    pub fn new(url: impl Into<String>, downtime_limit_ms: u64) -> Self {
        MigrationStatus {
            phase: MigrationPhase::Setup,
            url: url.into(),
            pass: 0,
            bytes_sent: 0,
            pages_sent: 0,
            pages_remaining: 0,
            total_pages: 0,
            dirty_rate_pages_per_sec: 0.0,
            bandwidth_bytes_per_sec: 0.0,
            estimated_downtime_ms: None,
            downtime_limit_ms,
            max_bandwidth_bytes_per_sec: None,
            elapsed_ms: 0,
            downtime_ms: None,
            error: None,
            postcopy: None,
        }
    }

    /// Replaces non-finite floating-point figures (which JSON cannot carry) with 0 / none.
    pub fn sanitize(&mut self) {
        fn finite(x: f64) -> f64 {
            if x.is_finite() {
                x
            } else {
                0.0
            }
        }
        self.dirty_rate_pages_per_sec = finite(self.dirty_rate_pages_per_sec);
        self.bandwidth_bytes_per_sec = finite(self.bandwidth_bytes_per_sec);
        self.estimated_downtime_ms = self.estimated_downtime_ms.filter(|x| x.is_finite());
        self.downtime_ms = self.downtime_ms.filter(|x| x.is_finite());
    }
}

/// A response as it travels: the version and the response side by side.
#[derive(Serialize, Deserialize)]
struct ResponseEnvelope {
    version: u32,
    #[serde(flatten)]
    response: Response,
}

const COMMANDS: &str = "status, pause, resume, snapshot, migrate, migrate_set, cancel, \
                        migrate_postcopy, vcpus, shutdown, launch_measurement, inject_secret";

/// Lower-case hex of `bytes` (the wire form of binary fields).
pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bytes of a hex string (either case, no separators); the error says what is wrong.
pub fn from_hex(s: &str) -> Result<Vec<u8>, String> {
    if !s.len().is_multiple_of(2) {
        return Err(format!(
            "{} hex digits: an odd number (each byte is two digits)",
            s.len()
        ));
    }
    s.as_bytes()
        .chunks(2)
        .enumerate()
        .map(|(i, pair)| {
            std::str::from_utf8(pair)
                .ok()
                .and_then(|p| u8::from_str_radix(p, 16).ok())
                .ok_or_else(|| format!("not a hex digit pair at position {}", 2 * i))
        })
        .collect()
}

/// Encodes a request as one wire line (without the trailing newline).
pub fn encode_request(req: &Request) -> Result<Vec<u8>, serde_json::Error> {
    let mut value = serde_json::to_value(req)?;
    if let serde_json::Value::Object(map) = &mut value {
        map.insert("version".into(), PROTOCOL_VERSION.into());
    }
    serde_json::to_vec(&value)
}

/// Decodes one request line as the server sees it. Errors are what the server answers.
pub fn decode_request(line: &[u8]) -> Result<Request, ApiError> {
    let value: serde_json::Value = serde_json::from_slice(line).map_err(|e| {
        ApiError::new(
            ErrorCode::BadJson,
            format!("the request is not valid JSON: {e}; send one JSON object per line"),
        )
    })?;
    let serde_json::Value::Object(mut map) = value else {
        return Err(ApiError::new(
            ErrorCode::BadRequest,
            "the request must be a JSON object like {\"version\":1,\"command\":\"status\"}",
        ));
    };
    match map.remove("version") {
        None => {
            return Err(ApiError::new(
                ErrorCode::BadRequest,
                format!("the request has no \"version\" field; add \"version\":{PROTOCOL_VERSION}"),
            ))
        }
        Some(v) => match v.as_u64() {
            Some(v) if v == u64::from(PROTOCOL_VERSION) => {}
            Some(v) => {
                return Err(ApiError::new(
                    ErrorCode::UnsupportedVersion,
                    format!(
                        "protocol version {v} is not supported: this VM speaks control \
                         protocol version {PROTOCOL_VERSION}; use an esvm of the same release"
                    ),
                ))
            }
            None => {
                return Err(ApiError::new(
                    ErrorCode::BadRequest,
                    format!("\"version\" must be an unsigned integer, got {v}"),
                ))
            }
        },
    }
    let command = match map.get("command") {
        None => {
            return Err(ApiError::new(
                ErrorCode::BadRequest,
                format!("the request has no \"command\" field; commands: {COMMANDS}"),
            ))
        }
        Some(serde_json::Value::String(c)) => c.as_str(),
        Some(other) => {
            return Err(ApiError::new(
                ErrorCode::BadRequest,
                format!("\"command\" must be a string, got {other}"),
            ))
        }
    };
    let allowed: &[&str] = match command {
        "status" | "pause" | "resume" | "cancel" | "migrate_postcopy" | "vcpus" | "shutdown"
        | "launch_measurement" => &[],
        "inject_secret" => &["packet_hex"],
        "snapshot" => &["dir", "force"],
        "migrate" => &[
            "url",
            "downtime_ms",
            "timeout_s",
            "max_passes",
            "on_timeout",
            "trust",
            "max_bandwidth_bytes_per_sec",
            "tls",
            "postcopy_after",
        ],
        "migrate_set" => &["max_bandwidth_bytes_per_sec", "downtime_ms"],
        other => {
            return Err(ApiError::new(
                ErrorCode::BadRequest,
                format!("unknown command {other:?}; commands: {COMMANDS}"),
            ))
        }
    };
    // serde's deny_unknown_fields does not cover unit variants of a tagged enum: check here.
    if let Some(field) = map
        .keys()
        .find(|k| *k != "command" && !allowed.contains(&k.as_str()))
    {
        let allowed = if allowed.is_empty() {
            "none".to_string()
        } else {
            allowed.join(", ")
        };
        return Err(ApiError::new(
            ErrorCode::BadRequest,
            format!(
                "unknown field {field:?} for command {command:?} (fields it takes besides \
                 version and command: {allowed})"
            ),
        ));
    }
    Request::deserialize(serde_json::Value::Object(map))
        .map_err(|e| ApiError::new(ErrorCode::BadRequest, format!("invalid request: {e}")))
}

/// Encodes a response as one wire line (without the trailing newline).
pub fn encode_response(resp: &Response) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(&ResponseEnvelope {
        version: PROTOCOL_VERSION,
        response: resp.clone(),
    })
}

/// Why a response line could not be decoded.
#[derive(Debug, Error)]
pub enum DecodeResponseError {
    #[error(
        "control protocol version mismatch: this esvm speaks version {ours}, the VM answered \
         with version {theirs}; use the same esvm release for `esvm ctl` and `esvm run`"
    )]
    VersionMismatch { ours: u32, theirs: u64 },
    #[error("the VM sent a malformed response: {0}")]
    Malformed(#[source] MalformedResponse),
}

/// What is wrong with a response line, and the JSON error behind it if there is one.
#[derive(Debug, Error)]
#[error("{what}")]
pub struct MalformedResponse {
    what: String,
    #[source]
    json: Option<serde_json::Error>,
}

impl MalformedResponse {
    /// A malformed response with no underlying error.
    pub fn new(what: impl Into<String>) -> Self {
        MalformedResponse {
            what: what.into(),
            json: None,
        }
    }

    /// A response that JSON refused: `what` already names the error.
    fn json(what: String, json: serde_json::Error) -> Self {
        MalformedResponse {
            what,
            json: Some(json),
        }
    }
}

/// Decodes one response line as the client sees it.
pub fn decode_response(line: &[u8]) -> Result<Response, DecodeResponseError> {
    let value: serde_json::Value = serde_json::from_slice(line).map_err(|e| {
        DecodeResponseError::Malformed(MalformedResponse::json(format!("not valid JSON: {e}"), e))
    })?;
    let version = value
        .get("version")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| {
            DecodeResponseError::Malformed(MalformedResponse::new("no numeric \"version\" field"))
        })?;
    if version != u64::from(PROTOCOL_VERSION) {
        return Err(DecodeResponseError::VersionMismatch {
            ours: PROTOCOL_VERSION,
            theirs: version,
        });
    }
    let env: ResponseEnvelope = serde_json::from_value(value)
        .map_err(|e| DecodeResponseError::Malformed(MalformedResponse::json(e.to_string(), e)))?;
    Ok(env.response)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_status() -> VmStatus {
        let mut m = MigrationStatus::new("tcp://127.0.0.1:7000", 300);
        m.phase = MigrationPhase::PreCopy;
        m.pass = 2;
        m.bytes_sent = 123_456;
        m.dirty_rate_pages_per_sec = 12.5;
        m.estimated_downtime_ms = Some(4.25);
        VmStatus {
            state: VmState::Migrating,
            backend: "emu".into(),
            vm_type: VmType::SevEs,
            memory_bytes: 64 << 20,
            vcpus: 1,
            vcpu_scheduling: None,
            instructions: Some(42),
            uptime_ms: 1000,
            exit_status: None,
            end_reason: None,
            migration: Some(m),
            launch_pending: false,
        }
    }

    fn sample_measurement() -> LaunchMeasurement {
        LaunchMeasurement {
            measurement: "ab".repeat(32),
            mnonce: "cd".repeat(16),
            policy: 0x4,
            api_major: 0,
            api_minor: 24,
            build: 21,
            launch_digest: "ef".repeat(32),
            pdh_fingerprint: "sha256:12".into(),
            chip_id: "00".repeat(64),
            secret_injected: false,
        }
    }

    #[test]
    fn hex_round_trips_and_refuses_what_is_not_hex() {
        let bytes = [0u8, 1, 0x7f, 0x80, 0xfe, 0xff];
        assert_eq!(to_hex(&bytes), "00017f80feff");
        assert_eq!(from_hex("00017F80FEff").unwrap(), bytes);
        assert_eq!(from_hex("").unwrap(), Vec::<u8>::new());
        assert!(from_hex("abc").unwrap_err().contains("odd"));
        assert!(from_hex("zz").unwrap_err().contains("position 0"));
        assert!(from_hex("00é0").is_err());
    }

    #[test]
    fn a_pending_launch_shows_in_the_status_only_when_set() {
        let mut s = sample_status();
        let line = encode_response(&Response::Ok(Reply::Status(s.clone()))).unwrap();
        assert!(!String::from_utf8_lossy(&line).contains("launch_pending"));
        s.launch_pending = true;
        let line = encode_response(&Response::Ok(Reply::Status(s.clone()))).unwrap();
        assert!(String::from_utf8_lossy(&line).contains("\"launch_pending\":true"));
        assert_eq!(
            decode_response(&line).unwrap(),
            Response::Ok(Reply::Status(s))
        );
    }

    #[test]
    fn every_request_round_trips() {
        let reqs = [
            Request::Status,
            Request::Pause,
            Request::Resume,
            Request::Snapshot {
                dir: "/tmp/snap".into(),
                force: false,
            },
            Request::Snapshot {
                dir: "/tmp/snap".into(),
                force: true,
            },
            Request::Migrate(MigrateRequest {
                url: "tcp://h:1".into(),
                downtime_ms: 50,
                timeout_s: 9,
                max_passes: Some(4),
                on_timeout: OnTimeout::Force,
                trust: Some("/etc/esvm/ark.cert".into()),
                max_bandwidth_bytes_per_sec: Some(50 << 20),
                tls: Some(MigrateTls {
                    ca: "/etc/esvm/ca.pem".into(),
                    cert: Some("/etc/esvm/src.pem".into()),
                    key: Some("/etc/esvm/src-key.pem".into()),
                    name: Some("dst".into()),
                }),
                postcopy_after: Some(2),
            }),
            Request::MigrateSet(MigrateSetRequest {
                max_bandwidth_bytes_per_sec: Some(0),
                downtime_ms: Some(20),
            }),
            Request::MigrateSet(MigrateSetRequest {
                max_bandwidth_bytes_per_sec: None,
                downtime_ms: Some(20),
            }),
            Request::Migrate(MigrateRequest::new("tcp://h:2")),
            Request::Cancel,
            Request::MigratePostcopy,
            Request::Shutdown,
            Request::Vcpus,
            Request::LaunchMeasurement,
            Request::InjectSecret {
                packet_hex: "00ff".into(),
            },
        ];
        for r in reqs {
            let line = encode_request(&r).unwrap();
            assert!(!line.contains(&b'\n'));
            assert_eq!(decode_request(&line).unwrap(), r, "{}", r.command_name());
        }
    }

    #[test]
    fn request_wire_form() {
        let line = encode_request(&Request::Pause).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v, serde_json::json!({"version": 1, "command": "pause"}));
    }

    #[test]
    fn snapshot_force_defaults_to_false() {
        let r = decode_request(br#"{"version":1,"command":"snapshot","dir":"/s"}"#).unwrap();
        assert_eq!(
            r,
            Request::Snapshot {
                dir: "/s".into(),
                force: false
            }
        );
        let line = encode_request(&r).unwrap();
        assert!(!String::from_utf8(line).unwrap().contains("force"));
    }

    #[test]
    fn migrate_defaults_apply() {
        let r = decode_request(br#"{"version":1,"command":"migrate","url":"tcp://x:1"}"#);
        assert_eq!(
            r.unwrap(),
            Request::Migrate(MigrateRequest::new("tcp://x:1"))
        );
    }

    #[test]
    fn malformed_requests_get_the_right_codes() {
        let cases: &[(&[u8], ErrorCode)] = &[
            (b"{not json", ErrorCode::BadJson),
            (b"\xff\xfe", ErrorCode::BadJson),
            (b"[1,2]", ErrorCode::BadRequest),
            (br#"{"command":"status"}"#, ErrorCode::BadRequest),
            (
                br#"{"version":"1","command":"status"}"#,
                ErrorCode::BadRequest,
            ),
            (
                br#"{"version":2,"command":"status"}"#,
                ErrorCode::UnsupportedVersion,
            ),
            (br#"{"version":1}"#, ErrorCode::BadRequest),
            (
                br#"{"version":1,"command":"reboot"}"#,
                ErrorCode::BadRequest,
            ),
            (
                br#"{"version":1,"command":"status","verbose":true}"#,
                ErrorCode::BadRequest,
            ),
            (
                br#"{"version":1,"command":"migrate","url":"tcp://x:1","speed":9}"#,
                ErrorCode::BadRequest,
            ),
            (
                br#"{"version":1,"command":"migrate","downtime_ms":5}"#,
                ErrorCode::BadRequest,
            ),
            (
                br#"{"version":1,"command":"migrate","url":"u","on_timeout":"explode"}"#,
                ErrorCode::BadRequest,
            ),
            (
                br#"{"version":1,"command":"snapshot","dir":7}"#,
                ErrorCode::BadRequest,
            ),
            (
                br#"{"version":1,"command":"inject_secret"}"#,
                ErrorCode::BadRequest,
            ),
            (
                br#"{"version":1,"command":"launch_measurement","packet_hex":"00"}"#,
                ErrorCode::BadRequest,
            ),
        ];
        for (line, code) in cases {
            let err = decode_request(line).unwrap_err();
            assert_eq!(
                err.code,
                *code,
                "{}: {}",
                String::from_utf8_lossy(line),
                err.message
            );
            assert!(!err.message.is_empty());
        }
    }

    #[test]
    fn bandwidth_fields_are_optional_and_checked() {
        // An older client's request (no cap) is read as uncapped, and written back without
        // the field, so an older server reads a request without a cap unchanged.
        let r = MigrateRequest::new("tcp://h:1");
        let line = String::from_utf8(encode_request(&Request::Migrate(r.clone())).unwrap());
        assert!(!line.unwrap().contains("max_bandwidth"));
        let capped = MigrateRequest {
            max_bandwidth_bytes_per_sec: Some(MIN_MAX_BANDWIDTH),
            ..r.clone()
        };
        assert!(capped.validate().is_ok());
        let lifted = MigrateRequest {
            max_bandwidth_bytes_per_sec: Some(0),
            ..r
        };
        assert!(lifted.validate().is_ok());
        // The status of an older server (no cap field) reads as uncapped; an uncapped
        // status does not carry the field.
        let s = MigrationStatus::new("tcp://h:1", 300);
        let json = serde_json::to_value(&s).unwrap();
        assert!(json.get("max_bandwidth_bytes_per_sec").is_none(), "{json}");
        let back: MigrationStatus = serde_json::from_value(json).unwrap();
        assert_eq!(back.max_bandwidth_bytes_per_sec, None);

        let set = |line: &[u8]| {
            decode_request(line).and_then(|r| match r {
                Request::MigrateSet(m) => m.validate().map(|_| m),
                other => panic!("not migrate_set: {other:?}"),
            })
        };
        let m = set(br#"{"version":1,"command":"migrate_set","downtime_ms":40}"#).unwrap();
        assert_eq!(m.downtime_ms, Some(40));
        assert_eq!(m.max_bandwidth_bytes_per_sec, None);
        for (line, code) in [
            (
                &br#"{"version":1,"command":"migrate_set"}"#[..],
                ErrorCode::InvalidArgument,
            ),
            (
                br#"{"version":1,"command":"migrate_set","downtime_ms":0}"#,
                ErrorCode::InvalidArgument,
            ),
            (
                br#"{"version":1,"command":"migrate_set","max_bandwidth_bytes_per_sec":100}"#,
                ErrorCode::InvalidArgument,
            ),
            (
                br#"{"version":1,"command":"migrate_set","downtime_ms":5,"url":"x"}"#,
                ErrorCode::BadRequest,
            ),
            (
                br#"{"version":1,"command":"migrate_set","downtime_ms":-1}"#,
                ErrorCode::BadRequest,
            ),
        ] {
            let e = set(line).unwrap_err();
            assert_eq!(e.code, code, "{}: {e}", String::from_utf8_lossy(line));
        }
    }

    #[test]
    fn migrate_validation() {
        let ok = MigrateRequest::new("tcp://h:1");
        assert!(ok.validate().is_ok());
        for bad in [
            MigrateRequest::new("  "),
            MigrateRequest::new("tcp://h:1\n"),
            MigrateRequest {
                downtime_ms: 0,
                ..ok.clone()
            },
            MigrateRequest {
                timeout_s: 0,
                ..ok.clone()
            },
            MigrateRequest {
                timeout_s: MAX_TIMEOUT_S + 1,
                ..ok.clone()
            },
            MigrateRequest {
                max_passes: Some(0),
                ..ok.clone()
            },
            MigrateRequest {
                max_bandwidth_bytes_per_sec: Some(MIN_MAX_BANDWIDTH - 1),
                ..ok.clone()
            },
            MigrateRequest {
                tls: Some(MigrateTls {
                    ca: "/ca.pem".into(),
                    cert: Some("/c.pem".into()),
                    key: None,
                    name: None,
                }),
                ..ok.clone()
            },
        ] {
            assert_eq!(
                bad.validate().unwrap_err().code,
                ErrorCode::InvalidArgument,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn every_response_round_trips() {
        let resps = [
            Response::Ok(Reply::Status(sample_status())),
            Response::Ok(Reply::Paused),
            Response::Ok(Reply::Resumed),
            Response::Ok(Reply::SnapshotSaved(SnapshotInfo {
                dir: "/s".into(),
                bytes_written: Some(9),
            })),
            Response::Ok(Reply::MigrationStarted {
                url: "tcp://a".into(),
            }),
            Response::Ok(Reply::MigrationCancelled),
            Response::Ok(Reply::MigrationLimitsSet(MigrationLimits {
                max_bandwidth_bytes_per_sec: Some(1 << 30),
                downtime_limit_ms: 50,
            })),
            Response::Ok(Reply::LaunchMeasurement(sample_measurement())),
            Response::Ok(Reply::SecretInjected),
            Response::Error(ApiError::invalid_state("already paused")),
        ];
        for r in resps {
            let line = encode_response(&r).unwrap();
            assert_eq!(decode_response(&line).unwrap(), r);
        }
    }

    #[test]
    fn response_wire_form() {
        let line = encode_response(&Response::Error(ApiError::failed("disk full"))).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"version":1,"error":{"code":"failed","message":"disk full"}})
        );
        let line = encode_response(&Response::Ok(Reply::Paused)).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v, serde_json::json!({"version":1,"ok":{"kind":"paused"}}));
    }

    #[test]
    fn responses_are_read_leniently() {
        // A newer server: extra fields and unknown enum values.
        let line = br#"{"version":1,"extra":0,"ok":{"kind":"status","state":"hibernating",
            "backend":"emu","vm_type":"tdx","memory_bytes":1,"vcpus":1,"uptime_ms":0,
            "future":true}}"#;
        let Response::Ok(Reply::Status(s)) = decode_response(line).unwrap() else {
            panic!("not a status reply");
        };
        assert_eq!(s.state, VmState::Unknown);
        assert_eq!(s.vm_type, VmType::Unknown);
        assert_eq!(s.migration, None);
        let line = br#"{"version":1,"error":{"code":"quota","message":"m"}}"#;
        let Response::Error(e) = decode_response(line).unwrap() else {
            panic!("not an error");
        };
        assert_eq!(e.code, ErrorCode::Unknown);
    }

    #[test]
    fn response_version_is_checked() {
        let err = decode_response(br#"{"version":2,"ok":{"kind":"paused"}}"#).unwrap_err();
        assert!(matches!(
            err,
            DecodeResponseError::VersionMismatch { ours: 1, theirs: 2 }
        ));
        assert!(matches!(
            decode_response(br#"{"ok":{"kind":"paused"}}"#),
            Err(DecodeResponseError::Malformed(_))
        ));
        assert!(matches!(
            decode_response(br#"{"version":1,"ok":{"kind":"teleported"}}"#),
            Err(DecodeResponseError::Malformed(_))
        ));
    }

    #[test]
    fn malformed_responses_keep_the_json_error_as_their_source() {
        use std::error::Error as _;
        let err = decode_response(br#"{"version":1,"ok":{"kind":"teleported"}}"#).unwrap_err();
        let json = err
            .source()
            .and_then(|m| m.source())
            .and_then(|j| j.downcast_ref::<serde_json::Error>());
        assert!(json.is_some(), "{err}");
        let err = decode_response(br#"{"ok":{"kind":"paused"}}"#).unwrap_err();
        assert!(err.source().unwrap().source().is_none(), "{err}");
    }

    #[test]
    fn non_finite_figures_are_sanitized() {
        let mut s = sample_status();
        let m = s.migration.as_mut().unwrap();
        m.bandwidth_bytes_per_sec = f64::NAN;
        m.dirty_rate_pages_per_sec = f64::INFINITY;
        m.estimated_downtime_ms = Some(f64::INFINITY);
        s.sanitize();
        let line = encode_response(&Response::Ok(Reply::Status(s))).unwrap();
        let Response::Ok(Reply::Status(back)) = decode_response(&line).unwrap() else {
            panic!("not a status reply");
        };
        let m = back.migration.unwrap();
        assert_eq!(m.bandwidth_bytes_per_sec, 0.0);
        assert_eq!(m.dirty_rate_pages_per_sec, 0.0);
        assert_eq!(m.estimated_downtime_ms, None);
    }

    #[test]
    fn terminal_phases() {
        assert!(MigrationPhase::Completed.is_terminal());
        assert!(MigrationPhase::InDoubt.is_terminal());
        assert!(!MigrationPhase::PreCopy.is_terminal());
        assert!(!MigrationPhase::Unknown.is_terminal());
    }
}
