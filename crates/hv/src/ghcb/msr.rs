//! The GHCB MSR protocol: requests carried in the GHCB MSR itself.
//!
//! The low 12 bits (GHCBInfo) name the request, bits 63:12 (GHCBData) carry its data. The
//! hypervisor answers by writing a response code and data back into the MSR.

use super::services::{CpuidRequest, GhcbServices};
use super::{ApResetHold, GhcbError, GhcbState};

/// Mask of the GHCBInfo field.
pub const MSR_INFO_MASK: u64 = 0xFFF;

/// SEV information response: `GHCBData[63:48]` max version, `[47:32]` min version, `[31:24]`
/// C-bit position.
pub const MSR_SEV_INFO_RESP: u64 = 0x001;
/// SEV information request.
pub const MSR_SEV_INFO_REQ: u64 = 0x002;
/// CPUID request: `GHCBData[31:30]` register (0 EAX, 1 EBX, 2 ECX, 3 EDX), `[63:32]` function.
pub const MSR_CPUID_REQ: u64 = 0x004;
/// CPUID response: `[31:30]` register echoed, `[63:32]` value.
pub const MSR_CPUID_RESP: u64 = 0x005;
/// AP reset hold request.
pub const MSR_AP_RESET_HOLD_REQ: u64 = 0x006;
/// AP reset hold response: `GHCBData[63:12]` non-zero once the AP is released.
pub const MSR_AP_RESET_HOLD_RESP: u64 = 0x007;
/// GHCB GPA registration request: `GHCBData[63:12]` = GFN.
pub const MSR_REG_GPA_REQ: u64 = 0x012;
/// GHCB GPA registration response: `GHCBData[63:12]` = the GFN, or all ones on failure.
pub const MSR_REG_GPA_RESP: u64 = 0x013;
/// Hypervisor features request.
pub const MSR_HV_FT_REQ: u64 = 0x080;
/// Hypervisor features response: `GHCBData[63:12]` = feature bitmap.
pub const MSR_HV_FT_RESP: u64 = 0x081;
/// Termination request: `GHCBData[15:12]` reason set, `[23:16]` reason code.
pub const MSR_TERM_REQ: u64 = 0x100;

/// What the VMM must do after an MSR-protocol VMGEXIT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MsrProtocolOutcome {
    /// Write `msr` into the vCPU's GHCB MSR and resume the guest.
    Respond { msr: u64 },
    /// The AP parks itself: write `msr` (the "not yet released" response) into the GHCB MSR
    /// and do not run the vCPU until it is woken (INIT-SIPI); then call
    /// [`GhcbState::release_ap_reset_hold`] and resume.
    ApResetHold { msr: u64 },
    /// The guest asks to be terminated. Stop it and report the reason.
    Terminate { reason_set: u8, reason_code: u8 },
    /// The request could not be served; stop the guest and report the error.
    Error(GhcbError),
}

/// Encode a CPUID request (guest side; for tests and test guests).
pub const fn cpuid_request(function: u32, register: u8) -> u64 {
    ((function as u64) << 32) | (((register & 3) as u64) << 30) | MSR_CPUID_REQ
}

/// Encode a termination request (guest side).
pub const fn term_request(reason_set: u8, reason_code: u8) -> u64 {
    (((reason_set & 0xF) as u64) << 12) | ((reason_code as u64) << 16) | MSR_TERM_REQ
}

/// Encode the SEV information response.
pub const fn sev_info_response(max_version: u16, min_version: u16, cbit_position: u8) -> u64 {
    ((max_version as u64) << 48)
        | ((min_version as u64) << 32)
        | ((cbit_position as u64) << 24)
        | MSR_SEV_INFO_RESP
}

/// Handle an MSR-protocol request (`msr_value` with non-zero GHCBInfo).
pub fn handle_msr_protocol<S: GhcbServices + ?Sized>(
    msr_value: u64,
    services: &mut S,
    state: &mut GhcbState,
) -> MsrProtocolOutcome {
    let info = msr_value & MSR_INFO_MASK;
    match info {
        MSR_SEV_INFO_REQ => MsrProtocolOutcome::Respond {
            msr: sev_info_response(
                state.config.max_version,
                state.config.min_version,
                state.config.cbit_position,
            ),
        },
        MSR_CPUID_REQ => {
            let function = (msr_value >> 32) as u32;
            let register = (msr_value >> 30) & 3;
            let request = CpuidRequest {
                function,
                index: 0,
                xcr0: None,
                xss: None,
            };
            match services.cpuid(request) {
                Ok(regs) => {
                    let value = regs[register as usize];
                    MsrProtocolOutcome::Respond {
                        msr: (u64::from(value) << 32) | (register << 30) | MSR_CPUID_RESP,
                    }
                }
                Err(e) => MsrProtocolOutcome::Error(GhcbError::MsrServiceFailed {
                    request: format!("CPUID {function:#x}"),
                    reason: e.to_string(),
                }),
            }
        }
        MSR_AP_RESET_HOLD_REQ => {
            state.ap_reset_hold = Some(ApResetHold::MsrProtocol);
            MsrProtocolOutcome::ApResetHold {
                msr: MSR_AP_RESET_HOLD_RESP,
            }
        }
        MSR_REG_GPA_REQ => {
            let gpa = msr_value & !MSR_INFO_MASK;
            state.registered_gpa = Some(gpa);
            MsrProtocolOutcome::Respond {
                msr: gpa | MSR_REG_GPA_RESP,
            }
        }
        MSR_HV_FT_REQ => MsrProtocolOutcome::Respond {
            msr: ((state.config.hv_features & super::HV_FEATURES_MASK) << 12) | MSR_HV_FT_RESP,
        },
        MSR_TERM_REQ => MsrProtocolOutcome::Terminate {
            reason_set: ((msr_value >> 12) & 0xF) as u8,
            reason_code: ((msr_value >> 16) & 0xFF) as u8,
        },
        _ => MsrProtocolOutcome::Error(GhcbError::UnsupportedMsrRequest {
            info: info as u16,
            msr: msr_value,
        }),
    }
}
