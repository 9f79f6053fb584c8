//! The interface a VMM implements to be controlled through the API.

use crate::protocol::{
    ApiError, ErrorCode, LaunchMeasurement, MigrateRequest, MigrateSetRequest, MigrationLimits,
    SnapshotInfo, VcpuView, VmStatus,
};
use std::path::Path;

/// A running VM as the control API sees it.
///
/// The server calls these methods from its connection threads, possibly several at once
/// (one per connected client), so implementations synchronise internally. Methods should
/// return promptly: long work (a migration) runs in the background and reports progress
/// through [`ControlTarget::status`]. Errors are [`ApiError`]s whose message is shown to the
/// user as is; pick the code that says why (`invalid_state`, `unsupported`, `failed`, ...).
/// A panic inside a method is caught and answered with an `internal` error.
pub trait ControlTarget: Send + Sync {
    /// The VM's current status (and the current or last migration's progress).
    fn status(&self) -> VmStatus;

    /// Stops running guest code. `invalid_state` if the VM is not running.
    fn pause(&self) -> Result<(), ApiError>;

    /// Continues running guest code. `invalid_state` if the VM is not paused.
    fn resume(&self) -> Result<(), ApiError>;

    /// Writes a snapshot into `dir` (an absolute path; the server rejects relative ones).
    /// May take a while (the connection waits); the VMM decides whether it pauses the VM.
    fn snapshot(&self, dir: &Path) -> Result<SnapshotInfo, ApiError>;

    /// Starts a live migration in the background and returns once it has started.
    /// `req` has already passed [`MigrateRequest::validate`]. Contract: once this returns
    /// `Ok`, [`ControlTarget::status`] reports *this* migration in
    /// [`VmStatus::migration`] (not an earlier one), until it ends and beyond.
    /// `invalid_state` if a migration is already running or the VM cannot migrate now.
    fn start_migration(&self, req: MigrateRequest) -> Result<(), ApiError>;

    /// Asks the running migration to stop; it ends in phase `cancelled` (or, if it was
    /// already past the point of no return, completes). `invalid_state` if none is running.
    fn cancel_migration(&self) -> Result<(), ApiError>;

    /// Asks the running migration to switch to post-copy as soon as it can (see
    /// [`Request::MigratePostcopy`](crate::Request::MigratePostcopy)). `invalid_state` if no
    /// migration is running or it is past pre-copy.
    fn switch_to_postcopy(&self) -> Result<(), ApiError> {
        Err(ApiError::unsupported(
            "this VMM cannot switch a migration to post-copy",
        ))
    }

    /// Changes the running migration's bandwidth cap and/or downtime limit (`req` has
    /// passed [`MigrateSetRequest::validate`]; a field it leaves out stays) and returns the
    /// limits now in force; [`ControlTarget::status`] reports them from then on.
    /// `invalid_state` if no migration is running.
    fn set_migration_limits(&self, req: &MigrateSetRequest) -> Result<MigrationLimits, ApiError> {
        let _ = req;
        Err(ApiError::unsupported(
            "this VMM cannot change a running migration's limits",
        ))
    }

    /// Stops the VM (ACPI-less: the guest is not asked) and returns its final status once
    /// it has ended (`exit_status`, `end_reason`). `invalid_state` if it cannot be stopped
    /// now (it already ended, or a migration is past the point where it can be cancelled).
    fn shutdown(&self) -> Result<VmStatus, ApiError> {
        Err(ApiError::new(
            ErrorCode::Unsupported,
            "this VMM cannot be shut down through the API",
        ))
    }

    /// Each vCPU as the hypervisor sees it. `unsupported` where the VMM does not offer it.
    fn vcpus(&self) -> Result<Vec<VcpuView>, ApiError> {
        Err(ApiError::new(
            ErrorCode::Unsupported,
            "this VMM does not report its vCPUs",
        ))
    }

    /// The measurement of an SEV-ES launch that waits for its owner (measured, not yet
    /// finished). `unsupported` for a VM that is not SEV-ES or a VMM without the feature;
    /// `invalid_state` when the VM does not wait (launched without waiting, or resumed).
    fn launch_measurement(&self) -> Result<LaunchMeasurement, ApiError> {
        Err(ApiError::unsupported(
            "this VMM has no SEV launch waiting for its owner",
        ))
    }

    /// LAUNCH_SECRET of the owner's `packet` (header then ciphertext) into a launch that
    /// waits for its owner. `invalid_state` if none waits or a secret was injected already;
    /// `invalid_argument` if the firmware refuses the packet (the launch keeps waiting).
    fn inject_secret(&self, packet: &[u8]) -> Result<(), ApiError> {
        let _ = packet;
        Err(ApiError::unsupported(
            "this VMM has no SEV launch waiting for its owner",
        ))
    }
}
