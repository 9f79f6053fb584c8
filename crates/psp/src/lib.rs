//! esvm-psp: a software model of the AMD Secure Processor's SEV firmware.
//!
//! The [`Psp`] object is the firmware: it holds the platform identity (chip
//! id, CEK, PEK, OCA, PDH and the *emulated* ARK/ASK, see [`nv`]) and the
//! guest contexts, and implements the SEV API commands as methods. Crypto is
//! real (RustCrypto): P-384 ECDSA/ECDH certificates in AMD's layout
//! ([`cert`]), the session key schedule and key wrapping ([`session`]),
//! AES-128-CTR + HMAC-SHA256 transport packets ([`transport`]), and a
//! per-guest XTS-AES memory key tweaked by guest-physical address
//! ([`memkey`]). Errors carry SEV status codes ([`SevStatus`]).
//!
//! The hypervisor is untrusted: it reaches a guest's private memory only
//! through firmware commands, which use the trusted memory path
//! [`GuestMemoryAccess`] that the hypervisor layer implements over the
//! private backing.

pub mod bench;
pub mod cert;
pub mod crypto;
mod error;
pub mod memkey;
pub mod memory;
pub mod nv;
mod platform;
pub mod session;
pub mod transport;
pub mod vmsa;

pub use error::{PspError, PspResult, SevStatus};
pub use memkey::{MemoryKey, PAGE_SIZE};
pub use memory::{FlatMemory, GuestMemoryAccess, MemoryAccessError};
pub use nv::{EmulatedAmdCa, FirmwareVersion, StorageError};
pub use platform::{
    GuestStatus, HostView, LaunchStart, OwnerSession, PlatformStatus, Psp, SendStartOut,
    ES_MIN_API, MAX_ASID, MAX_GUESTS,
};
pub use session::{Build, Measurement, PacketHeader, Policy, SessionBlob, TransportKeys};
pub use transport::{ReceiveWorker, ReceivedVmsa, SendWorker};
pub use vmsa::{TrackedExtension, TrackedRegisters, VMSA_SIZE};

use std::fmt;

/// Platform states (SEV API).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum PlatformState {
    /// Not initialised: only INIT, PLATFORM_STATUS, PLATFORM_RESET, GET_ID, SHUTDOWN.
    Uninit,
    /// Initialised, no guests.
    Init,
    /// Initialised, at least one guest.
    Working,
}

impl PlatformState {
    /// SEV API numeric value.
    pub fn code(self) -> u8 {
        match self {
            PlatformState::Uninit => 0,
            PlatformState::Init => 1,
            PlatformState::Working => 2,
        }
    }
}

impl fmt::Display for PlatformState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PlatformState::Uninit => "UNINIT",
            PlatformState::Init => "INIT",
            PlatformState::Working => "WORKING",
        })
    }
}

/// Guest states (SEV API). `Uninit` is the state of a handle before
/// LAUNCH_START / RECEIVE_START (no context exists yet).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum GuestState {
    /// No context (LAUNCH_START and RECEIVE_START create one).
    Uninit = 0,
    /// Launch in progress: LAUNCH_UPDATE_DATA/VMSA, LAUNCH_MEASURE.
    Lupdate = 1,
    /// Measured: LAUNCH_SECRET, LAUNCH_FINISH.
    Lsecret = 2,
    /// Running: SEND_START.
    Running = 3,
    /// Sending: SEND_UPDATE_DATA/VMSA, SEND_FINISH, SEND_CANCEL.
    Supdate = 4,
    /// Receiving: RECEIVE_UPDATE_DATA/VMSA, RECEIVE_FINISH.
    Rupdate = 5,
    /// Sent: the guest's state left with SEND_FINISH; it must not run again.
    Sent = 6,
}

impl GuestState {
    /// All states with a context.
    pub const WITH_CONTEXT: [GuestState; 6] = [
        GuestState::Lupdate,
        GuestState::Lsecret,
        GuestState::Running,
        GuestState::Supdate,
        GuestState::Rupdate,
        GuestState::Sent,
    ];

    pub(crate) fn from_u8(v: u8) -> GuestState {
        match v {
            1 => GuestState::Lupdate,
            2 => GuestState::Lsecret,
            3 => GuestState::Running,
            4 => GuestState::Supdate,
            5 => GuestState::Rupdate,
            6 => GuestState::Sent,
            _ => GuestState::Uninit,
        }
    }
}

impl fmt::Display for GuestState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            GuestState::Uninit => "UNINIT",
            GuestState::Lupdate => "LUPDATE",
            GuestState::Lsecret => "LSECRET",
            GuestState::Running => "RUNNING",
            GuestState::Supdate => "SUPDATE",
            GuestState::Rupdate => "RUPDATE",
            GuestState::Sent => "SENT",
        })
    }
}

/// SEV API commands.
#[allow(missing_docs)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum Command {
    Init,
    Shutdown,
    PlatformReset,
    PlatformStatus,
    PekGen,
    PekCsr,
    PekCertImport,
    PdhCertExport,
    PdhGen,
    GetId,
    Decommission,
    Activate,
    Deactivate,
    GuestStatus,
    LaunchStart,
    LaunchUpdateData,
    LaunchUpdateVmsa,
    LaunchMeasure,
    LaunchSecret,
    LaunchFinish,
    SendStart,
    SendUpdateData,
    SendUpdateVmsa,
    SendFinish,
    SendCancel,
    ReceiveStart,
    ReceiveUpdateData,
    ReceiveUpdateVmsa,
    ReceiveFinish,
    DbgDecrypt,
    DbgEncrypt,
}

impl Command {
    /// Every guest command (those that take a guest handle or create one).
    pub const GUEST: [Command; 21] = [
        Command::Decommission,
        Command::Activate,
        Command::Deactivate,
        Command::GuestStatus,
        Command::LaunchStart,
        Command::LaunchUpdateData,
        Command::LaunchUpdateVmsa,
        Command::LaunchMeasure,
        Command::LaunchSecret,
        Command::LaunchFinish,
        Command::SendStart,
        Command::SendUpdateData,
        Command::SendUpdateVmsa,
        Command::SendFinish,
        Command::SendCancel,
        Command::ReceiveStart,
        Command::ReceiveUpdateData,
        Command::ReceiveUpdateVmsa,
        Command::ReceiveFinish,
        Command::DbgDecrypt,
        Command::DbgEncrypt,
    ];

    /// The SEV API command id.
    pub fn id(self) -> u32 {
        match self {
            Command::Init => 0x01,
            Command::Shutdown => 0x02,
            Command::PlatformReset => 0x03,
            Command::PlatformStatus => 0x04,
            Command::PekGen => 0x05,
            Command::PekCsr => 0x06,
            Command::PekCertImport => 0x07,
            Command::PdhCertExport => 0x08,
            Command::PdhGen => 0x09,
            Command::GetId => 0x0C,
            Command::Decommission => 0x20,
            Command::Activate => 0x21,
            Command::Deactivate => 0x22,
            Command::GuestStatus => 0x23,
            Command::LaunchStart => 0x30,
            Command::LaunchUpdateData => 0x31,
            Command::LaunchUpdateVmsa => 0x32,
            Command::LaunchMeasure => 0x33,
            Command::LaunchSecret => 0x34,
            Command::LaunchFinish => 0x35,
            Command::SendStart => 0x40,
            Command::SendUpdateData => 0x41,
            Command::SendUpdateVmsa => 0x42,
            Command::SendFinish => 0x43,
            Command::SendCancel => 0x44,
            Command::ReceiveStart => 0x50,
            Command::ReceiveUpdateData => 0x51,
            Command::ReceiveUpdateVmsa => 0x52,
            Command::ReceiveFinish => 0x53,
            Command::DbgDecrypt => 0x60,
            Command::DbgEncrypt => 0x61,
        }
    }

    /// The SEV API name.
    pub fn name(self) -> &'static str {
        match self {
            Command::Init => "INIT",
            Command::Shutdown => "SHUTDOWN",
            Command::PlatformReset => "PLATFORM_RESET",
            Command::PlatformStatus => "PLATFORM_STATUS",
            Command::PekGen => "PEK_GEN",
            Command::PekCsr => "PEK_CSR",
            Command::PekCertImport => "PEK_CERT_IMPORT",
            Command::PdhCertExport => "PDH_CERT_EXPORT",
            Command::PdhGen => "PDH_GEN",
            Command::GetId => "GET_ID",
            Command::Decommission => "DECOMMISSION",
            Command::Activate => "ACTIVATE",
            Command::Deactivate => "DEACTIVATE",
            Command::GuestStatus => "GUEST_STATUS",
            Command::LaunchStart => "LAUNCH_START",
            Command::LaunchUpdateData => "LAUNCH_UPDATE_DATA",
            Command::LaunchUpdateVmsa => "LAUNCH_UPDATE_VMSA",
            Command::LaunchMeasure => "LAUNCH_MEASURE",
            Command::LaunchSecret => "LAUNCH_SECRET",
            Command::LaunchFinish => "LAUNCH_FINISH",
            Command::SendStart => "SEND_START",
            Command::SendUpdateData => "SEND_UPDATE_DATA",
            Command::SendUpdateVmsa => "SEND_UPDATE_VMSA",
            Command::SendFinish => "SEND_FINISH",
            Command::SendCancel => "SEND_CANCEL",
            Command::ReceiveStart => "RECEIVE_START",
            Command::ReceiveUpdateData => "RECEIVE_UPDATE_DATA",
            Command::ReceiveUpdateVmsa => "RECEIVE_UPDATE_VMSA",
            Command::ReceiveFinish => "RECEIVE_FINISH",
            Command::DbgDecrypt => "DBG_DECRYPT",
            Command::DbgEncrypt => "DBG_ENCRYPT",
        }
    }

    /// The guest states in which this command is accepted (empty for
    /// platform commands). This is the firmware's gate; the table follows
    /// the SEV API: UNINIT (LAUNCH_START, RECEIVE_START); LUPDATE
    /// (LAUNCH_UPDATE_DATA/VMSA, LAUNCH_MEASURE); LSECRET (LAUNCH_SECRET,
    /// LAUNCH_FINISH); RUNNING (SEND_START); SUPDATE (SEND_UPDATE_DATA/VMSA,
    /// SEND_FINISH, SEND_CANCEL); RUPDATE (RECEIVE_UPDATE_DATA/VMSA,
    /// RECEIVE_FINISH). DBG_* work on any guest with live memory (not SENT);
    /// ACTIVATE, DEACTIVATE, GUEST_STATUS and DECOMMISSION on any guest.
    pub fn allowed_states(self) -> &'static [GuestState] {
        use GuestState::*;
        match self {
            Command::LaunchStart | Command::ReceiveStart => &[Uninit],
            Command::LaunchUpdateData | Command::LaunchUpdateVmsa | Command::LaunchMeasure => {
                &[Lupdate]
            }
            Command::LaunchSecret | Command::LaunchFinish => &[Lsecret],
            Command::SendStart => &[Running],
            Command::SendUpdateData
            | Command::SendUpdateVmsa
            | Command::SendFinish
            | Command::SendCancel => &[Supdate],
            Command::ReceiveUpdateData | Command::ReceiveUpdateVmsa | Command::ReceiveFinish => {
                &[Rupdate]
            }
            Command::DbgDecrypt | Command::DbgEncrypt => {
                &[Lupdate, Lsecret, Running, Supdate, Rupdate]
            }
            Command::Activate
            | Command::Deactivate
            | Command::GuestStatus
            | Command::Decommission => &[Lupdate, Lsecret, Running, Supdate, Rupdate, Sent],
            _ => &[],
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

pub(crate) fn allowed_list(c: Command) -> String {
    let v: Vec<String> = c.allowed_states().iter().map(|s| s.to_string()).collect();
    v.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send_sync<T: Send + Sync>() {}

    #[test]
    fn shared_types_are_send_and_sync() {
        send_sync::<Psp>();
        send_sync::<SendWorker>();
        send_sync::<ReceiveWorker>();
        send_sync::<HostView>();
        send_sync::<MemoryKey>();
    }

    #[test]
    fn command_ids_follow_the_sev_api() {
        assert_eq!(Command::LaunchStart.id(), 0x30);
        assert_eq!(Command::ReceiveFinish.id(), 0x53);
        assert_eq!(Command::DbgEncrypt.id(), 0x61);
        assert_eq!(Command::GuestStatus.id(), 0x23);
        assert_eq!(SevStatus::PolicyFailure.code(), 7);
        assert_eq!(SevStatus::BadMeasurement.code(), 0xB);
    }
}
