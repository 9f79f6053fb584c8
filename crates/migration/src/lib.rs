//! Live migration of esvm guests between processes over a byte stream (a TCP or Unix
//! stream socket in practice, see [`stream`]).
//!
//! This crate is the transport-level part of live migration, independent of the concrete VMM:
//!
//! * [`protocol`]: the versioned, framed wire format (fixed 32-byte headers with magic,
//!   version, type, flags, length, sequence number and CRC32C checksums); every length is
//!   checked against a per-frame-type limit before anything is allocated.
//! * [`receiver`]: the destination's explicit state machine ([`ReceiverState`]), which
//!   refuses out-of-order frames, writes pages through a [`MigrationTarget`] and commits only
//!   at the end.
//! * [`sender`]: the source's pre-copy engine over a [`MigrationSource`]: a full pass, dirty
//!   passes until the estimated downtime fits the limit (or a timeout / pass cap cancels or
//!   forces), then stop-and-copy and the commit handshake.
//! * [`progress`]: progress snapshots for status APIs and an `indicatif` terminal renderer.
//! * [`mock`]: a Vec-backed guest, source and target used by the tests and the benchmark.
//!
//! The wire protocol is described in `docs/migration-protocol.md`.
//!
//! ## Failure semantics
//! Until the destination has committed, any failure (connection cut, bad frame, checksum or
//! MAC failure, timeout, cancel) leaves the source running as before — with every dirty bit
//! the sender consumed but did not get acknowledged put back into the source's dirty log —
//! and the destination discarding everything ([`MigrationTarget::abort`]). After the commit
//! the source is dead ([`MigrationSource::mark_dead`]). If the connection fails after the
//! sender handed over its `Complete` frame but before the commit acknowledgement arrived, the
//! sender cannot know whether the destination committed; it then leaves the source *paused*
//! (never running twice) and reports [`SendError::InDoubt`].
//!
//! ### Post-copy
//! A migration may switch to post-copy ([`SenderConfig::postcopy_after`],
//! [`LiveLimits::request_postcopy`]): the source pauses, sends the device and vCPU states and
//! the set of pages not yet transferred, and the destination starts the guest while those
//! pages follow (requested ones first). Before the switch (`PostcopyRun` written) the rules
//! above hold. After it, **neither side alone holds the whole guest**: the destination's
//! guest has run on (so the source's state is stale and must never run again), and the
//! destination lacks pages only the source has. Any failure after the switch — a cut
//! connection, a refused or corrupt page, a timeout, a cancel of the receiver (the sender
//! ignores cancel after the switch) — therefore ends both sides with an error: the
//! destination stops its guest for good ([`MigrationTarget::abort`]; a guest never runs on
//! with a missing or wrong page: a page is visible only after its checksum or MAC was
//! verified), and the source stays paused and reports [`SendError::PostcopyFailed`]. The guest is lost; post-copy trades that risk for a
//! bounded switch time with a guest that dirties memory faster than the link.

pub mod bitmap;
pub mod mock;
pub mod progress;
pub mod protocol;
pub mod rate;
pub mod receiver;
pub mod sender;
pub mod source;
pub mod stream;
pub mod target;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use thiserror::Error;

pub use bitmap::PageSet;
pub use progress::{Phase, Progress, TerminalProgress};
pub use protocol::{ErrorCode, ProtocolError, PROTOCOL_VERSION};
pub use rate::{LiveLimits, Pacer};
pub use receiver::{
    PostcopyReceived, ReceiveError, ReceiveOutcome, Receiver, ReceiverConfig, ReceiverState,
};
pub use sender::{LimitPolicy, PostcopySent, SendError, SendOutcome, Sender, SenderConfig};
pub use source::{MigrationSource, SourceError};
pub use stream::MigrationStream;
pub use target::{MigrationTarget, TargetError};

/// The kind of guest being migrated (the same distinction as `esvm_hv::VmType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum GuestType {
    /// Pages and vCPU state travel as plaintext.
    Plain,
    /// Pages travel as SEV transport packets, vCPU state as encrypted VMSA packets.
    SevEs,
}

/// Guest page size used throughout the protocol.
pub const PAGE_SIZE: u64 = 4096;

/// What the destination must be compatible with; sent in the `Config` frame.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MigrationConfig {
    /// Guest RAM size in bytes (a multiple of [`PAGE_SIZE`]).
    pub mem_size: u64,
    /// Number of vCPUs; the destination receives one vCPU state per vCPU.
    pub vcpus: u32,
    /// Plain or SEV-ES: decides whether pages travel as plaintext or as transport packets.
    pub vm_type: GuestType,
    /// Guest-visible feature bits (backend-neutral, defined by the VMM). The destination must
    /// offer every bit the source sets.
    pub features: u64,
    /// Opaque extra compatibility data for the VMM (e.g. a digest of the CPUID table),
    /// at most [`protocol::MAX_BLOB_LEN`] bytes.
    pub extra: Vec<u8>,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum Incompatible {
    #[error(
        "guest memory size differs: the source has {source_size} bytes, this destination \
         {local} bytes; start the destination with the same --mem"
    )]
    MemorySize { source_size: u64, local: u64 },
    #[error(
        "vCPU count differs: the source has {source_count}, this destination {local}; start \
         the destination with the same --vcpus"
    )]
    Vcpus { source_count: u32, local: u32 },
    #[error("VM type differs: the source is {source_type:?}, this destination {local:?}")]
    GuestType {
        source_type: GuestType,
        local: GuestType,
    },
    #[error("the source guest uses features {missing:#x} that this destination does not offer")]
    Features { missing: u64 },
    #[error("the VMM-specific compatibility data differs: {0}")]
    Extra(String),
}

impl MigrationConfig {
    /// Number of guest pages.
    pub fn pages(&self) -> u64 {
        self.mem_size / PAGE_SIZE
    }

    /// Check an incoming (source) configuration against this destination's: memory size,
    /// vCPU count and VM type must match; the source's features must be a subset of ours;
    /// `extra` must be identical.
    pub fn check_compatible(&self, incoming: &MigrationConfig) -> Result<(), Incompatible> {
        if incoming.mem_size != self.mem_size {
            return Err(Incompatible::MemorySize {
                source_size: incoming.mem_size,
                local: self.mem_size,
            });
        }
        if incoming.vcpus != self.vcpus {
            return Err(Incompatible::Vcpus {
                source_count: incoming.vcpus,
                local: self.vcpus,
            });
        }
        if incoming.vm_type != self.vm_type {
            return Err(Incompatible::GuestType {
                source_type: incoming.vm_type,
                local: self.vm_type,
            });
        }
        let missing = incoming.features & !self.features;
        if missing != 0 {
            return Err(Incompatible::Features { missing });
        }
        if incoming.extra != self.extra {
            return Err(Incompatible::Extra(format!(
                "{} bytes from the source, {} bytes here",
                incoming.extra.len(),
                self.extra.len()
            )));
        }
        Ok(())
    }
}

/// Cancels a running migration from another thread. The sender and receiver check it between
/// frames and while waiting for the peer; cancelling after the sender has handed over its
/// `Complete` frame has no effect (the commit outcome decides).
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> MigrationConfig {
        MigrationConfig {
            mem_size: 1 << 20,
            vcpus: 2,
            vm_type: GuestType::Plain,
            features: 0b101,
            extra: vec![1, 2],
        }
    }

    #[test]
    fn compatibility_rules() {
        let local = cfg();
        assert_eq!(local.check_compatible(&cfg()), Ok(()));
        let mut c = cfg();
        c.mem_size *= 2;
        assert!(matches!(
            local.check_compatible(&c),
            Err(Incompatible::MemorySize { .. })
        ));
        let mut c = cfg();
        c.vcpus = 3;
        assert!(matches!(
            local.check_compatible(&c),
            Err(Incompatible::Vcpus { .. })
        ));
        let mut c = cfg();
        c.vm_type = GuestType::SevEs;
        assert!(matches!(
            local.check_compatible(&c),
            Err(Incompatible::GuestType { .. })
        ));
        let mut c = cfg();
        c.features = 0b001; // subset: fine
        assert_eq!(local.check_compatible(&c), Ok(()));
        c.features = 0b011;
        assert_eq!(
            local.check_compatible(&c),
            Err(Incompatible::Features { missing: 0b010 })
        );
        let mut c = cfg();
        c.extra = vec![9];
        assert!(matches!(
            local.check_compatible(&c),
            Err(Incompatible::Extra(_))
        ));
    }

    #[test]
    fn cancel_token_is_shared() {
        let t = CancelToken::new();
        let u = t.clone();
        assert!(!u.is_cancelled());
        t.cancel();
        assert!(u.is_cancelled());
    }
}
