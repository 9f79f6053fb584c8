//! The GHCB MSR protocol: requests carried in the GHCB MSR itself.
//!
//! The low 12 bits (GHCBInfo) name the request, bits 63:12 (GHCBData) carry its data. The
//! hypervisor answers by writing a response code and data back into the MSR. The codes and
//! field positions are the guest ABI's ([`esvm_abi::msr_protocol`]).

use esvm_abi::msr_protocol::{
    self as mp, AP_RESET_HOLD_REQ, AP_RESET_HOLD_RESP, CPUID_REQ, DATA_SHIFT, HV_FT_REQ,
    HV_FT_RESP, INFO_MASK, REG_GPA_REQ, REG_GPA_RESP, SEV_INFO_REQ, TERM_REQ,
};

use super::services::{CpuidRequest, GhcbServices};
use super::{ApResetHold, GhcbError, GhcbState};

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

/// Handle an MSR-protocol request (`msr_value` with non-zero GHCBInfo).
pub fn handle_msr_protocol<S: GhcbServices + ?Sized>(
    msr_value: u64,
    services: &mut S,
    state: &mut GhcbState,
) -> MsrProtocolOutcome {
    let info = msr_value & INFO_MASK;
    let unsupported = || {
        MsrProtocolOutcome::Error(GhcbError::UnsupportedMsrRequest {
            info: info as u16,
            msr: msr_value,
        })
    };
    match info {
        SEV_INFO_REQ => MsrProtocolOutcome::Respond {
            msr: mp::sev_info_response(
                state.config.max_version,
                state.config.min_version,
                state.config.cbit_position,
            ),
        },
        CPUID_REQ => {
            let Some((function, register)) = mp::decode_cpuid_request(msr_value) else {
                return unsupported();
            };
            let request = CpuidRequest {
                function,
                index: 0,
                xcr0: None,
                xss: None,
            };
            match services.cpuid(request) {
                Ok(regs) => MsrProtocolOutcome::Respond {
                    msr: mp::encode_cpuid_response(register, regs[usize::from(register)]),
                },
                Err(e) => MsrProtocolOutcome::Error(GhcbError::MsrServiceFailed {
                    request: format!("CPUID {function:#x}"),
                    reason: e.to_string(),
                }),
            }
        }
        AP_RESET_HOLD_REQ => {
            state.ap_reset_hold = Some(ApResetHold::MsrProtocol);
            MsrProtocolOutcome::ApResetHold {
                msr: AP_RESET_HOLD_RESP,
            }
        }
        REG_GPA_REQ => {
            let gpa = msr_value & !INFO_MASK;
            state.registered_gpa = Some(gpa);
            MsrProtocolOutcome::Respond {
                msr: gpa | REG_GPA_RESP,
            }
        }
        HV_FT_REQ => MsrProtocolOutcome::Respond {
            msr: ((state.config.hv_features & super::HV_FEATURES_MASK) << DATA_SHIFT) | HV_FT_RESP,
        },
        TERM_REQ => {
            let Some((reason_set, reason_code)) = mp::decode_term_request(msr_value) else {
                return unsupported();
            };
            MsrProtocolOutcome::Terminate {
                reason_set,
                reason_code,
            }
        }
        _ => unsupported(),
    }
}
