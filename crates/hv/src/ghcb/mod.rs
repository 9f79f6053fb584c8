//! The hypervisor side of the SEV-ES GHCB protocol.
//!
//! In an SEV-ES guest, events the hypervisor must emulate (CPUID, port and MMIO I/O, MSRs,
//! VMMCALL, RDTSC ...) raise #VC inside the guest. Its handler describes the request either in
//! the GHCB MSR itself (the *MSR protocol*, for a few simple requests) or in the GHCB page, a
//! 4 KiB page it shares with the hypervisor, and executes VMGEXIT. This module turns one such
//! VMGEXIT into calls on [`GhcbServices`] (the VMM's devices and MSRs) and writes the answer
//! back. It is pure and backend independent: no vCPU, no guest memory of its own.
//!
//! # Use from the VMM
//! On a VMGEXIT exit carrying the vCPU's GHCB MSR value, call [`handle_vmgexit`] with the
//! vCPU's [`GhcbState`] and a [`GhcbServices`] implementation, then act on the
//! [`VmgexitOutcome`]:
//! - `Msr(Respond { msr })`: write `msr` into the vCPU's GHCB MSR and resume;
//! - `Msr(ApResetHold { msr })` / `Ghcb(ApResetHold)`: write `msr` (MSR case), park the vCPU
//!   until INIT-SIPI, then [`GhcbState::release_ap_reset_hold`] and resume;
//! - `Ghcb(Resume(_))`: resume (the page, already written back, holds the result or the
//!   error the guest will see; log `Malformed` details if wanted);
//! - `Ghcb(NmiComplete)`: unblock NMIs, resume;
//! - `Msr(Terminate{..})`, `Ghcb(Terminate{..})`, `Ghcb(UnsupportedEvent{..})`,
//!   `Msr(Error(_))`, `Failed(_)`: stop the guest and report.
//!
//! [`handle_ghcb`] and [`handle_msr_protocol`] are the two halves, for a VMM that reads the
//! GHCB page itself.
//!
//! Facts follow the AMD GHCB specification (pub. 56421) as implemented by Linux
//! (arch/x86/kvm/svm/sev.c, arch/x86/include/asm/sev-common.h, arch/x86/include/asm/svm.h).

pub mod msr;
pub mod nae;
pub mod page;
pub mod services;
pub mod stats;

use esvm_abi::msr_protocol;
use thiserror::Error;

pub use esvm_abi::exit_code;
pub use esvm_abi::sev::MSR_GHCB;
pub use msr::{handle_msr_protocol, MsrProtocolOutcome};
pub use nae::{handle_ghcb, GhcbErrorCode, GhcbOutcome, GuestResponse, IoioInfo};
pub use page::{GhcbField, GhcbPage, GHCB_PAGE_SIZE};
pub use services::{CpuidRequest, GhcbServices, GhcbVmState, IoSize, ServiceError, VmmcallRegs};
pub use stats::{VmgexitCounts, VmgexitKind};

/// Default limit of a scratch area outside the GHCB page (16 pages, as KVM).
pub const DEFAULT_SCRATCH_LIMIT: u32 = 16 * 4096;
/// Hard upper bound on [`GhcbConfig::scratch_limit`] (1 MiB), whatever a config says.
pub const MAX_SCRATCH_LIMIT: u32 = 1 << 20;
/// Hypervisor feature bits fit `GHCBData[63:12]` (52 bits).
pub const HV_FEATURES_MASK: u64 = (1 << 52) - 1;

/// Errors that stop the guest (everything else is answered to the guest itself).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum GhcbError {
    #[error(
        "the guest made GHCB MSR-protocol request {info:#05x} (GHCB MSR {msr:#018x}), which \
         esvm does not support (it speaks the SEV-ES GHCB protocol, versions 1-2, without \
         SEV-SNP); the guest cannot continue"
    )]
    UnsupportedMsrRequest { info: u16, msr: u64 },
    #[error(
        "the VMM could not serve the guest's GHCB MSR-protocol {request}: {reason}; the guest \
         cannot continue"
    )]
    MsrServiceFailed { request: String, reason: String },
    #[error(
        "the guest executed VMGEXIT with GHCB MSR = 0 (no GHCB and no MSR-protocol request); \
         its #VC handling is broken"
    )]
    NoGhcb,
    #[error(
        "the guest's GHCB at {gpa:#x} is not accessible shared memory ({reason}); the guest \
         must map its GHCB page shared (C-bit clear) inside guest RAM"
    )]
    GhcbInaccessible { gpa: u64, reason: String },
}

/// Static parameters of the GHCB protocol for a VM.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GhcbConfig {
    /// Lowest GHCB protocol version accepted.
    pub min_version: u16,
    /// Highest GHCB protocol version offered.
    pub max_version: u16,
    /// Position of the C-bit in guest page-table entries (CPUID 0x8000001F `EBX[5:0]`).
    pub cbit_position: u8,
    /// Hypervisor feature bitmap (HV_FEATURES; 0: none of the SEV-SNP features).
    pub hv_features: u64,
    /// Largest scratch area accepted outside the GHCB page, in bytes.
    pub scratch_limit: u32,
}

impl Default for GhcbConfig {
    fn default() -> Self {
        GhcbConfig {
            min_version: 1,
            max_version: 2,
            cbit_position: 51,
            hv_features: 0,
            scratch_limit: DEFAULT_SCRATCH_LIMIT,
        }
    }
}

impl GhcbConfig {
    /// The effective scratch limit (bounded by [`MAX_SCRATCH_LIMIT`]).
    pub fn scratch_limit(&self) -> usize {
        self.scratch_limit.min(MAX_SCRATCH_LIMIT) as usize
    }
}

/// Why a vCPU is parked in AP reset hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ApResetHold {
    /// Through the MSR protocol (request 0x006).
    MsrProtocol,
    /// Through the AP_HLT_LOOP event of the GHCB at `gpa`.
    Ghcb { gpa: u64 },
}

/// What [`GhcbState::release_ap_reset_hold`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApHoldRelease {
    /// The vCPU was not in AP reset hold.
    NotHeld,
    /// Write this value into the vCPU's GHCB MSR before resuming it.
    SetMsr(u64),
    /// The GHCB page was updated (SW_EXITINFO2 = 1) through the services.
    GhcbUpdated,
}

/// Per-vCPU GHCB protocol state. It migrates with the vCPU.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GhcbState {
    pub config: GhcbConfig,
    /// The protocol version of the last GHCB page accepted.
    pub negotiated_version: Option<u16>,
    /// The GHCB GPA registered through the MSR protocol; once set, only it is accepted.
    pub registered_gpa: Option<u64>,
    /// Set while the vCPU is parked in AP reset hold.
    pub ap_reset_hold: Option<ApResetHold>,
    /// DR7 as last written through the GHCB (architectural reset value 0x400).
    pub dr7: u64,
}

impl Default for GhcbState {
    fn default() -> Self {
        GhcbState::new(GhcbConfig::default())
    }
}

impl GhcbState {
    pub fn new(config: GhcbConfig) -> Self {
        GhcbState {
            config,
            negotiated_version: None,
            registered_gpa: None,
            ap_reset_hold: None,
            dr7: 0x400,
        }
    }

    /// Release the vCPU from AP reset hold (call when it receives its wake-up SIPI).
    ///
    /// For the MSR protocol, returns the GHCB MSR value to set (response 0x007 with a non-zero
    /// result). For AP_HLT_LOOP, writes SW_EXITINFO2 = 1 into the GHCB page through
    /// `services`. A failure leaves the vCPU held.
    pub fn release_ap_reset_hold<S: GhcbServices + ?Sized>(
        &mut self,
        services: &mut S,
    ) -> Result<ApHoldRelease, GhcbError> {
        match self.ap_reset_hold {
            None => Ok(ApHoldRelease::NotHeld),
            Some(ApResetHold::MsrProtocol) => {
                self.ap_reset_hold = None;
                Ok(ApHoldRelease::SetMsr(
                    (1 << msr_protocol::DATA_SHIFT) | msr_protocol::AP_RESET_HOLD_RESP,
                ))
            }
            Some(ApResetHold::Ghcb { gpa }) => {
                let mut bytes = [0u8; GHCB_PAGE_SIZE];
                let inaccessible = |e: ServiceError| GhcbError::GhcbInaccessible {
                    gpa,
                    reason: e.to_string(),
                };
                services
                    .read_shared(gpa, &mut bytes)
                    .map_err(inaccessible)?;
                GhcbPage::new(&mut bytes).set_sw_exit_info2(1);
                services.write_shared(gpa, &bytes).map_err(inaccessible)?;
                self.ap_reset_hold = None;
                Ok(ApHoldRelease::GhcbUpdated)
            }
        }
    }
}

/// What the VMM must do after a VMGEXIT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmgexitOutcome {
    /// An MSR-protocol request was handled.
    Msr(MsrProtocolOutcome),
    /// A GHCB-page request was handled and the page written back.
    Ghcb(GhcbOutcome),
    /// Nothing could be answered to the guest; stop it and report.
    Failed(GhcbError),
}

/// Handle a VMGEXIT given the vCPU's GHCB MSR value.
///
/// A value with non-zero low 12 bits is an MSR-protocol request; otherwise it is the GHCB's
/// GPA, which is read through [`GhcbServices::read_shared`], handled by [`handle_ghcb`] and
/// written back through [`GhcbServices::write_shared`].
pub fn handle_vmgexit<S: GhcbServices + ?Sized>(
    ghcb_msr: u64,
    services: &mut S,
    state: &mut GhcbState,
) -> VmgexitOutcome {
    handle_vmgexit_of_kind(ghcb_msr, services, state).1
}

/// [`handle_vmgexit`], also saying what the VMGEXIT asked for (for [`VmgexitCounts`]).
pub fn handle_vmgexit_of_kind<S: GhcbServices + ?Sized>(
    ghcb_msr: u64,
    services: &mut S,
    state: &mut GhcbState,
) -> (VmgexitKind, VmgexitOutcome) {
    let info = ghcb_msr & msr_protocol::INFO_MASK;
    if info != 0 {
        return (
            VmgexitKind::Msr(info as u16),
            VmgexitOutcome::Msr(handle_msr_protocol(ghcb_msr, services, state)),
        );
    }
    let failed = |e| (VmgexitKind::Unreadable, VmgexitOutcome::Failed(e));
    if ghcb_msr == 0 {
        return failed(GhcbError::NoGhcb);
    }
    let gpa = ghcb_msr;
    let inaccessible = |e: ServiceError| GhcbError::GhcbInaccessible {
        gpa,
        reason: e.to_string(),
    };
    if gpa.checked_add(GHCB_PAGE_SIZE as u64).is_none() {
        return failed(inaccessible(ServiceError::refused(
            "the page ends beyond the physical address space",
        )));
    }
    let mut page = [0u8; GHCB_PAGE_SIZE];
    if let Err(e) = services.read_shared(gpa, &mut page) {
        return failed(inaccessible(e));
    }
    let kind = GhcbPage::new(&mut page)
        .sw_exit_code()
        .map_or(VmgexitKind::Unreadable, VmgexitKind::Ghcb);
    let outcome = handle_ghcb(&mut page, gpa, services, state);
    if let Err(e) = services.write_shared(gpa, &page) {
        return (kind, VmgexitOutcome::Failed(inaccessible(e)));
    }
    (kind, VmgexitOutcome::Ghcb(outcome))
}

#[cfg(test)]
mod tests;
