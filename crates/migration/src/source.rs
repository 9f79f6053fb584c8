//! What the pre-copy sender needs from the VM being migrated away.

use crate::{MigrationConfig, PageSet};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum SourceError {
    #[error("the source VM does not support {what}")]
    Unsupported { what: &'static str },
    #[error("{0}")]
    Failed(String),
    /// `what` failed because of `source` (an error of the VM's own layers).
    #[error("{what}: {source}")]
    FailedBy {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl SourceError {
    pub fn failed(msg: impl Into<String>) -> Self {
        SourceError::Failed(msg.into())
    }

    /// `what` failed because of `source`; the message is `"{what}: {source}"`.
    pub fn failed_by(
        what: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        SourceError::FailedBy {
            what: what.into(),
            source: source.into(),
        }
    }
}

/// The VM being migrated, as the [`Sender`](crate::Sender) drives it.
///
/// Call order: `config`, (SEV-ES: `sev_send_start`), `start_dirty_log`, `written_pages`,
/// then per pass `read_pages`/`sev_page_packet` and `take_dirty_log`; for stop-and-copy
/// `pause`, `take_dirty_log`, pages, `device_state`, `vcpu_state` for each vCPU, (SEV-ES:
/// `sev_finish_blob`); then either
/// `mark_dead` (the destination committed) or, on failure, `restore_dirty_log`,
/// `sev_send_cancel` and `resume` (if it was paused).
///
/// The guest keeps running (and writing) during pre-copy, so page reads must be sound under
/// concurrent guest writes; torn pages are fine, because a page written after
/// `take_dirty_log` appears in the next log and is sent again.
pub trait MigrationSource {
    /// The compatibility data sent to the destination.
    fn config(&self) -> MigrationConfig;

    /// Begin (or restart) dirty logging. Pages written after this call returns must appear
    /// in a later [`take_dirty_log`](Self::take_dirty_log). VMM-side writes (device DMA,
    /// loaders) must be logged as well as guest writes.
    fn start_dirty_log(&mut self) -> Result<(), SourceError>;

    /// Pages that may differ from zero, if the source can tell (e.g. pages ever written);
    /// the first pass then sends only these (the destination's memory starts zeroed).
    /// `None` means "send all pages". Called after `start_dirty_log`.
    fn written_pages(&mut self) -> Result<Option<PageSet>, SourceError> {
        Ok(None)
    }

    /// Return and clear the pages dirtied since the previous call (or since
    /// `start_dirty_log`). The bitmap must cover all guest pages.
    fn take_dirty_log(&mut self) -> Result<PageSet, SourceError>;

    /// Put pages back into the dirty log (OR them in). Called when a migration fails with the
    /// pages whose dirty bits the sender had taken but whose transfer the destination never
    /// acknowledged, so the log again describes everything not yet transferred.
    fn restore_dirty_log(&mut self, pages: &PageSet) -> Result<(), SourceError>;

    /// Copy guest pages `first_page..first_page + buf.len() / 4096` into `buf` (plain guests).
    /// The guest may be running; the copy is what the sender checksums and sends.
    fn read_pages(&mut self, first_page: u64, buf: &mut [u8]) -> Result<(), SourceError>;

    /// Zero-copy view of pages `first_page..first_page + count`, used only while the source
    /// is paused (stop-and-copy), when no one writes guest memory. `None` (the default)
    /// makes the sender fall back to [`read_pages`](Self::read_pages).
    fn paused_pages(&self, first_page: u64, count: u64) -> Option<&[u8]> {
        let _ = (first_page, count);
        None
    }

    /// SEV-ES: start a send session for the destination platform whose certificate chain
    /// (opaque, from the destination's `ConfigAck`) is given; return the session start blob
    /// (opaque) the destination's firmware needs for RECEIVE_START.
    fn sev_send_start(&mut self, target_certs: &[u8]) -> Result<Vec<u8>, SourceError> {
        let _ = target_certs;
        Err(SourceError::Unsupported {
            what: "SEV-ES send sessions",
        })
    }

    /// SEV-ES: append the transport packet (header + ciphertext, opaque) of one page to
    /// `out`.
    fn sev_page_packet(&mut self, page: u64, out: &mut Vec<u8>) -> Result<(), SourceError> {
        let _ = (page, out);
        Err(SourceError::Unsupported {
            what: "SEV-ES page packets",
        })
    }

    /// SEV-ES: the finish blob (opaque, at most
    /// [`MAX_FINISH_LEN`](crate::protocol::MAX_FINISH_LEN) bytes) for the destination's
    /// RECEIVE_FINISH — the transcript tag of every packet sent — taken after the last vCPU
    /// state. The send session stays open: a failure after this still ends in
    /// `sev_send_cancel`; only `mark_dead` ends it for good (SEND_FINISH).
    fn sev_finish_blob(&mut self) -> Result<Vec<u8>, SourceError> {
        Err(SourceError::Unsupported {
            what: "SEV-ES finish blobs",
        })
    }

    /// SEV-ES: cancel the send session after a failure (SEND_CANCEL), so the guest can run
    /// again. Called only if `sev_send_start` succeeded.
    fn sev_send_cancel(&mut self) -> Result<(), SourceError> {
        Ok(())
    }

    /// Stop all vCPUs and VMM-side writers; no guest memory may change until `resume`.
    fn pause(&mut self) -> Result<(), SourceError>;

    /// Let the guest run again (after a failed migration). Also called after a `pause` that
    /// returned an error, to undo a partial pause; must then be harmless for vCPUs that were
    /// never stopped.
    fn resume(&mut self) -> Result<(), SourceError>;

    /// Device/VM state (opaque; serialised by the VMM), taken while paused.
    fn device_state(&mut self) -> Result<Vec<u8>, SourceError>;

    /// The state of one vCPU (opaque; for SEV-ES the encrypted VMSA packet plus the tracked
    /// register extension), taken while paused.
    fn vcpu_state(&mut self, vcpu: u32) -> Result<Vec<u8>, SourceError>;

    /// The destination committed: this VM must never run again.
    fn mark_dead(&mut self);
}
