//! SEV-style status codes and the firmware's error type.
//!
//! Every failed command returns a [`PspError`]; [`PspError::status`] gives the
//! status code the AMD SEV API would return for it (the numeric values follow
//! the SEV API specification), and the `Display` text says what was wrong and
//! what to do about it.

use std::fmt;

use crate::cert::CertError;
use crate::memory::MemoryAccessError;
use crate::nv::StorageError;
use crate::session::SessionError;
use crate::{Command, GuestState, PlatformState};

/// Status codes of the SEV firmware API (subset used by this model).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum SevStatus {
    /// The command completed.
    Success = 0x0000,
    /// The platform state is invalid for this command.
    InvalidPlatformState = 0x0001,
    /// The guest state is invalid for this command.
    InvalidGuestState = 0x0002,
    /// The platform configuration is invalid.
    InvalidConfig = 0x0003,
    /// A buffer has the wrong length.
    InvalidLen = 0x0004,
    /// The platform is already owned.
    AlreadyOwned = 0x0005,
    /// A certificate is malformed or has the wrong usage.
    InvalidCertificate = 0x0006,
    /// The guest policy forbids the request.
    PolicyFailure = 0x0007,
    /// The guest is not active.
    Inactive = 0x0008,
    /// A guest-physical address range is invalid.
    InvalidAddress = 0x0009,
    /// A signature or MAC does not verify.
    BadSignature = 0x000A,
    /// A measurement does not verify.
    BadMeasurement = 0x000B,
    /// The ASID is owned by another guest.
    AsidOwned = 0x000C,
    /// The ASID is out of range.
    InvalidAsid = 0x000D,
    /// The guest handle is invalid.
    InvalidGuest = 0x0010,
    /// The command is invalid.
    InvalidCommand = 0x0011,
    /// The guest is active.
    Active = 0x0012,
    /// A platform (hardware / storage) condition occurred.
    HardwarePlatform = 0x0013,
    /// The feature is not supported.
    Unsupported = 0x0015,
    /// A parameter is invalid.
    InvalidParam = 0x0016,
    /// The firmware ran out of a resource.
    ResourceLimit = 0x0017,
    /// An integrity check on secure data failed.
    SecureDataInvalid = 0x0018,
}

impl SevStatus {
    /// The numeric status code.
    pub fn code(self) -> u32 {
        self as u32
    }

    /// The SEV API name of the status.
    pub fn name(self) -> &'static str {
        match self {
            SevStatus::Success => "SUCCESS",
            SevStatus::InvalidPlatformState => "INVALID_PLATFORM_STATE",
            SevStatus::InvalidGuestState => "INVALID_GUEST_STATE",
            SevStatus::InvalidConfig => "INVALID_CONFIG",
            SevStatus::InvalidLen => "INVALID_LENGTH",
            SevStatus::AlreadyOwned => "ALREADY_OWNED",
            SevStatus::InvalidCertificate => "INVALID_CERTIFICATE",
            SevStatus::PolicyFailure => "POLICY_FAILURE",
            SevStatus::Inactive => "INACTIVE",
            SevStatus::InvalidAddress => "INVALID_ADDRESS",
            SevStatus::BadSignature => "BAD_SIGNATURE",
            SevStatus::BadMeasurement => "BAD_MEASUREMENT",
            SevStatus::AsidOwned => "ASID_OWNED",
            SevStatus::InvalidAsid => "INVALID_ASID",
            SevStatus::InvalidGuest => "INVALID_GUEST",
            SevStatus::InvalidCommand => "INVALID_COMMAND",
            SevStatus::Active => "ACTIVE",
            SevStatus::HardwarePlatform => "HWERROR_PLATFORM",
            SevStatus::Unsupported => "UNSUPPORTED",
            SevStatus::InvalidParam => "INVALID_PARAM",
            SevStatus::ResourceLimit => "RESOURCE_LIMIT",
            SevStatus::SecureDataInvalid => "SECURE_DATA_INVALID",
        }
    }
}

impl fmt::Display for SevStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (0x{:04x})", self.name(), self.code())
    }
}

/// Why a firmware command failed.
#[derive(Debug, thiserror::Error)]
pub enum PspError {
    /// The platform is in the wrong state for the command.
    #[error("{command} is not allowed while the platform is {state}: {hint}")]
    InvalidPlatformState {
        /// The command that was refused.
        command: Command,
        /// The platform state at the time.
        state: PlatformState,
        /// What to do instead.
        hint: &'static str,
    },
    /// The guest is in the wrong state for the command.
    #[error(
        "{command} is not allowed for guest {handle} in state {state}; it is accepted only in {allowed}"
    )]
    InvalidGuestState {
        /// The command that was refused.
        command: Command,
        /// The guest handle.
        handle: u32,
        /// The guest's state.
        state: GuestState,
        /// The states in which the command is accepted.
        allowed: String,
    },
    /// A buffer or length argument is wrong.
    #[error("invalid length for {what}: expected {expected}, got {got}")]
    InvalidLen {
        /// Which argument.
        what: &'static str,
        /// What the firmware expects.
        expected: String,
        /// What it got.
        got: usize,
    },
    /// PEK_CERT_IMPORT on a platform that already has an external owner.
    #[error("the platform is already owned by an external OCA; run PEK_GEN to return it to self-owned before importing another OCA")]
    AlreadyOwned,
    /// A certificate is malformed, has the wrong usage, or is not the one expected.
    #[error("invalid certificate ({what}): {source}")]
    InvalidCertificate {
        /// Which certificate.
        what: &'static str,
        /// What is wrong with it.
        #[source]
        source: CertError,
    },
    /// A certificate does not match what the firmware expects.
    #[error("certificate mismatch: {0}")]
    CertificateMismatch(String),
    /// A certificate signature does not verify.
    #[error("bad signature on {what}: {source}")]
    BadCertSignature {
        /// Which certificate.
        what: &'static str,
        /// The verification failure.
        #[source]
        source: CertError,
    },
    /// A MAC does not verify.
    #[error("bad signature: {0}")]
    BadSignature(String),
    /// A session blob does not unwrap (its MACs do not verify, or it is malformed).
    #[error("bad signature: {0}")]
    BadSession(#[source] SessionError),
    /// A measurement-bound check failed.
    #[error("bad measurement: {0}")]
    BadMeasurement(String),
    /// The guest policy forbids the request.
    #[error("policy failure: {0}")]
    PolicyFailure(String),
    /// The guest is not active.
    #[error("guest {handle} is not active: ACTIVATE it with an ASID first")]
    Inactive {
        /// The guest handle.
        handle: u32,
    },
    /// The guest is active.
    #[error("guest {handle} is active (ASID {asid}): DEACTIVATE it first")]
    Active {
        /// The guest handle.
        handle: u32,
        /// Its ASID.
        asid: u32,
    },
    /// An address range is invalid.
    #[error("invalid guest address range 0x{gpa:x}+0x{len:x}: {why}")]
    InvalidAddress {
        /// Start of the range.
        gpa: u64,
        /// Its length.
        len: u64,
        /// Why it is invalid.
        why: String,
    },
    /// The ASID is in use by another guest.
    #[error(
        "ASID {asid} is already used by guest {owner}; pick a free ASID or DEACTIVATE that guest"
    )]
    AsidOwned {
        /// The ASID.
        asid: u32,
        /// The guest that holds it.
        owner: u32,
    },
    /// The ASID is out of range.
    #[error("ASID {asid} is out of range; valid ASIDs are 1..={max}")]
    InvalidAsid {
        /// The ASID.
        asid: u32,
        /// The largest valid ASID.
        max: u32,
    },
    /// No guest with this handle.
    #[error("no guest with handle {handle}: it was never started or has been decommissioned")]
    InvalidGuest {
        /// The handle.
        handle: u32,
    },
    /// The feature is not supported by this firmware.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A parameter is invalid.
    #[error("invalid parameter: {0}")]
    InvalidParam(String),
    /// The firmware ran out of a resource.
    #[error("resource limit: {0}")]
    ResourceLimit(String),
    /// An integrity check on a transport stream failed.
    #[error("secure data invalid: {0}")]
    SecureDataInvalid(String),
    /// The trusted guest-memory path failed.
    #[error("guest memory access failed: {0}")]
    Memory(#[from] MemoryAccessError),
    /// The non-volatile storage failed.
    #[error("platform storage: {0}")]
    Storage(#[from] StorageError),
}

impl PspError {
    /// The SEV status code for this error.
    pub fn status(&self) -> SevStatus {
        match self {
            PspError::InvalidPlatformState { .. } => SevStatus::InvalidPlatformState,
            PspError::InvalidGuestState { .. } => SevStatus::InvalidGuestState,
            PspError::InvalidLen { .. } => SevStatus::InvalidLen,
            PspError::AlreadyOwned => SevStatus::AlreadyOwned,
            PspError::InvalidCertificate { .. } | PspError::CertificateMismatch(_) => {
                SevStatus::InvalidCertificate
            }
            PspError::BadCertSignature { .. }
            | PspError::BadSignature(_)
            | PspError::BadSession(_) => SevStatus::BadSignature,
            PspError::BadMeasurement(_) => SevStatus::BadMeasurement,
            PspError::PolicyFailure(_) => SevStatus::PolicyFailure,
            PspError::Inactive { .. } => SevStatus::Inactive,
            PspError::Active { .. } => SevStatus::Active,
            PspError::InvalidAddress { .. } | PspError::Memory(_) => SevStatus::InvalidAddress,
            PspError::AsidOwned { .. } => SevStatus::AsidOwned,
            PspError::InvalidAsid { .. } => SevStatus::InvalidAsid,
            PspError::InvalidGuest { .. } => SevStatus::InvalidGuest,
            PspError::Unsupported(_) => SevStatus::Unsupported,
            PspError::InvalidParam(_) => SevStatus::InvalidParam,
            PspError::ResourceLimit(_) => SevStatus::ResourceLimit,
            PspError::SecureDataInvalid(_) => SevStatus::SecureDataInvalid,
            PspError::Storage(_) => SevStatus::HardwarePlatform,
        }
    }

    /// Wraps a certificate error: signature failures become `BAD_SIGNATURE`,
    /// everything else `INVALID_CERTIFICATE`.
    pub(crate) fn cert(what: &'static str, source: CertError) -> PspError {
        if source.is_signature_failure() {
            PspError::BadCertSignature { what, source }
        } else {
            PspError::InvalidCertificate { what, source }
        }
    }
}

/// Result of a firmware command.
pub type PspResult<T> = Result<T, PspError>;
