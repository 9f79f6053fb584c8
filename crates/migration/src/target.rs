//! What the receiver needs from the VM being migrated in.

use crate::{Incompatible, MigrationConfig};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum TargetError {
    /// The incoming configuration cannot be hosted here.
    #[error("incompatible: {0}")]
    Incompatible(String),
    /// The incoming configuration differs from this destination's
    /// ([`MigrationConfig::check_compatible`]).
    #[error("incompatible: {0}")]
    Config(#[from] Incompatible),
    /// Incoming data or state was refused (e.g. a transport packet failed authentication).
    #[error("refused: {0}")]
    Refused(String),
    /// `what` was refused because of `source` (an error of the VM's own layers).
    #[error("refused: {what}: {source}")]
    RefusedBy {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("the destination does not support {what}")]
    Unsupported { what: &'static str },
    #[error("{0}")]
    Failed(String),
    /// An error of the VM's own layers.
    #[error("{0}")]
    FailedBy(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl TargetError {
    /// `what` was refused because of `source`; the message is `"refused: {what}: {source}"`.
    pub fn refused_by(
        what: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        TargetError::RefusedBy {
            what: what.into(),
            source: source.into(),
        }
    }

    /// A failure caused by `source`; the message is its message.
    pub fn failed_by(source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        TargetError::FailedBy(source.into())
    }
}

/// The destination VM, as the [`Receiver`](crate::Receiver) drives it.
///
/// Call order: `accept_config`, (SEV-ES: `sev_receive_start`), any number of
/// `pages_mut`/`receive_page_packet` and `pass_end`, then `apply_device_state` and
/// `apply_vcpu_state` for every vCPU (any order), then (SEV-ES: `sev_receive_finish`)
/// `commit`. On any error before the
/// commit — including the source aborting or the connection breaking — `abort` is called
/// instead, and the target must discard everything it received.
///
/// Guest memory is expected to start zeroed: pages the source never sends stay zero.
pub trait MigrationTarget {
    /// Check the source's configuration (see
    /// [`MigrationConfig::check_compatible`](crate::MigrationConfig::check_compatible)) and
    /// prepare to receive. For SEV-ES return this platform's certificate chain (opaque; the
    /// source's firmware wraps the transport keys for it); for plain guests return an empty
    /// vector.
    fn accept_config(&mut self, config: &MigrationConfig) -> Result<Vec<u8>, TargetError>;

    /// SEV-ES: the source's session start blob (RECEIVE_START).
    fn sev_receive_start(&mut self, session: &[u8]) -> Result<(), TargetError> {
        let _ = session;
        Err(TargetError::Unsupported {
            what: "SEV-ES receive sessions",
        })
    }

    /// Guest memory of pages `first_page..first_page + count` (exactly `count * 4096`
    /// bytes) for the receiver to fill in place. The range was already checked against the
    /// accepted memory size. Plain guests only.
    fn pages_mut(&mut self, first_page: u64, count: u64) -> Result<&mut [u8], TargetError>;

    /// SEV-ES: one page's transport packet; decrypt and authenticate it into guest memory
    /// (RECEIVE_UPDATE_DATA), or refuse it.
    fn receive_page_packet(&mut self, page: u64, packet: &[u8]) -> Result<(), TargetError> {
        let _ = (page, packet);
        Err(TargetError::Unsupported {
            what: "SEV-ES page packets",
        })
    }

    /// A memory pass ended (informational).
    fn pass_end(&mut self, pass: u32, final_pass: bool) -> Result<(), TargetError> {
        let _ = (pass, final_pass);
        Ok(())
    }

    /// The device/VM state (opaque).
    fn apply_device_state(&mut self, state: &[u8]) -> Result<(), TargetError>;

    /// The state of one vCPU (opaque; for SEV-ES the encrypted VMSA packet plus the tracked
    /// register extension, to be authenticated by RECEIVE_UPDATE_VMSA).
    fn apply_vcpu_state(&mut self, vcpu: u32, state: &[u8]) -> Result<(), TargetError>;

    /// SEV-ES: the source's finish blob from the `Complete` frame (RECEIVE_FINISH: the
    /// firmware checks it against every packet it accepted). Called right before `commit`;
    /// an error aborts the migration.
    fn sev_receive_finish(&mut self, blob: &[u8]) -> Result<(), TargetError> {
        let _ = blob;
        Err(TargetError::Unsupported {
            what: "SEV-ES finish blobs",
        })
    }

    /// Everything arrived: make the VM this host's (RECEIVE_FINISH for SEV-ES). This is the
    /// point of no return; after it succeeds the destination owns the guest. If it fails,
    /// `abort` follows.
    fn commit(&mut self) -> Result<(), TargetError>;

    /// Discard everything received so far. Called at most once, on any failure before the
    /// commit. After [`postcopy_run`](Self::postcopy_run) the guest is already running
    /// here: `abort` must stop it for good (it must never run on with pages missing), and
    /// the VMM reports the migration failure.
    fn abort(&mut self);

    // --- Post-copy (see `crate::receiver` and docs/migration-protocol.md) -------------

    /// Whether this VM can run while pages are still missing (post-copy). If false (the
    /// default) the receiver does not offer post-copy and the source never switches.
    fn postcopy_supported(&self) -> bool {
        false
    }

    /// The switch: the pages in `pending` have not arrived with their final content. From
    /// now on none of them may be read or written — by the guest or the VMM — until it is
    /// published by [`postcopy_publish`](Self::postcopy_publish). Pages not in `pending`
    /// are final. Called once, before the device and vCPU states.
    fn postcopy_begin(&mut self, pending: &crate::PageSet) -> Result<(), TargetError> {
        let _ = pending;
        Err(TargetError::Unsupported { what: "post-copy" })
    }

    /// Start the guest (device and vCPU states are applied; pages are still missing).
    fn postcopy_run(&mut self) -> Result<(), TargetError> {
        Err(TargetError::Unsupported { what: "post-copy" })
    }

    /// Pages `first_page..first_page + count` were written (through `pages_mut`, after the
    /// frame's checksum was verified) or accepted (`receive_page_packet`) during post-copy:
    /// make them visible to the guest — bytes first, then the present mark with Release
    /// ordering, so that a vCPU that sees the page present (Acquire) sees its bytes.
    fn postcopy_publish(&mut self, first_page: u64, count: u64) -> Result<(), TargetError> {
        let _ = (first_page, count);
        Err(TargetError::Unsupported { what: "post-copy" })
    }

    /// Append pages the running guest (or the VMM) faulted on since the last call, for the
    /// receiver to request from the source. Pages may repeat; the receiver filters.
    fn postcopy_faults(&mut self, out: &mut Vec<u64>) {
        let _ = out;
    }
}
