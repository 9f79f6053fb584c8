//! Termination reasons: what a guest sends with a GHCB TERM_REQUEST (`SW_EXITINFO1[3:0]`
//! set, `[11:4]` code, SW_EXITINFO2 extra information) or an MSR-protocol termination
//! request (`[15:12]` set, `[23:16]` code). Set 0 is the GHCB specification's; set 1 is the
//! esvm guest runtime's (`docs/sev-es-guest.md`).

/// SW_EXITINFO1 of a GHCB TERM_REQUEST: `[3:0]` reason set, `[11:4]` reason code. (The
/// MSR-protocol request is [`crate::msr_protocol::term_request`].)
pub const fn ghcb_exit_info1(reason_set: u8, reason_code: u8) -> u64 {
    ((reason_set & 0xF) as u64) | ((reason_code as u64) << 4)
}

/// Decodes the SW_EXITINFO1 of a GHCB TERM_REQUEST into (reason set, reason code).
pub const fn decode_ghcb_exit_info1(info1: u64) -> (u8, u8) {
    ((info1 & 0xF) as u8, ((info1 >> 4) & 0xFF) as u8)
}

/// Reason set 0: the GHCB specification's general reasons.
pub const SET_GENERAL: u8 = 0;
/// Set 0, code 0: general termination request (what `sev-smoke` sends at its end).
pub const GENERAL: u8 = 0;
/// Set 0, code 1: the hypervisor's GHCB protocol version range is not supported.
pub const PROTOCOL_UNSUPPORTED: u8 = 1;

/// Reason set 1: the esvm guest runtime.
pub const SET_ESVM: u8 = 1;
/// SEV_INFO request answered with something else than a SEV_INFO response.
pub const BAD_SEV_INFO: u8 = 1;
/// A MSR-protocol CPUID request answered with something else than its response.
pub const BAD_CPUID_RESPONSE: u8 = 2;
/// SEV_INFO, CPUID 0x8000_001F and CR3 disagree about the C-bit (or it is invalid).
pub const C_BIT_MISMATCH: u8 = 3;
/// CPUID 0x8000_001F or SEV_STATUS lack SEV / SEV-ES.
pub const NOT_SEV_ES: u8 = 4;
/// The GHCB page could not be made shared (page-table split failed).
pub const GHCB_SETUP: u8 = 5;
/// A #VC other than CPUID arrived before the GHCB page existed (info: exit code).
pub const EARLY_VC_UNSUPPORTED: u8 = 6;
/// A #VC with an exit code the handler does not handle (info: exit code).
pub const VC_UNSUPPORTED_EXIT: u8 = 7;
/// The instruction at RIP is not one the handler decodes for that exit code (info:
/// the first 8 instruction bytes, little endian).
pub const VC_DECODE: u8 = 8;
/// The hypervisor answered SW_EXITINFO1 = 2 (info: SW_EXITINFO2, its error code).
pub const GHCB_MALFORMED: u8 = 9;
/// The hypervisor's answer is not usable: SW_EXITINFO1 missing or unknown, an output
/// field not marked valid, or an event that is not an exception (info: exit code).
pub const GHCB_BAD_RESPONSE: u8 = 10;
/// The GHCB was needed while a request on it was in flight (a #VC or an exception
/// inside a GHCB transaction).
pub const GHCB_BUSY: u8 = 11;
/// #VC nested deeper than the runtime's IST budget allows.
pub const VC_NESTING: u8 = 12;
/// An MMIO access the handler cannot perform: unmapped address, C-bit set, FS/GS
/// segment, or crossing a page (info: the linear address).
pub const MMIO_UNSUPPORTED: u8 = 13;
/// A guest asked for termination through `esvm_rt::sev::terminate` (info: its own).
pub const GUEST_REQUEST: u8 = 14;

/// A short description of a reason, for logs.
pub const fn describe(set: u8, code: u8) -> &'static str {
    match (set, code) {
        (SET_GENERAL, GENERAL) => "general termination request",
        (SET_GENERAL, PROTOCOL_UNSUPPORTED) => "GHCB protocol version range not supported",
        (SET_ESVM, BAD_SEV_INFO) => "bad SEV_INFO response",
        (SET_ESVM, BAD_CPUID_RESPONSE) => "bad MSR-protocol CPUID response",
        (SET_ESVM, C_BIT_MISMATCH) => "C-bit position inconsistent",
        (SET_ESVM, NOT_SEV_ES) => "SEV-ES not reported by CPUID/SEV_STATUS",
        (SET_ESVM, GHCB_SETUP) => "cannot map the GHCB page shared",
        (SET_ESVM, EARLY_VC_UNSUPPORTED) => "#VC before the GHCB exists",
        (SET_ESVM, VC_UNSUPPORTED_EXIT) => "#VC with an unsupported exit code",
        (SET_ESVM, VC_DECODE) => "#VC on an instruction the handler cannot decode",
        (SET_ESVM, GHCB_MALFORMED) => "hypervisor reported a malformed GHCB request",
        (SET_ESVM, GHCB_BAD_RESPONSE) => "unusable GHCB response",
        (SET_ESVM, GHCB_BUSY) => "GHCB needed while in use",
        (SET_ESVM, VC_NESTING) => "#VC nested too deeply",
        (SET_ESVM, MMIO_UNSUPPORTED) => "unsupported MMIO access",
        (SET_ESVM, GUEST_REQUEST) => "guest request",
        _ => "unknown reason",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ghcb_exit_info1_round_trips() {
        assert_eq!(ghcb_exit_info1(SET_ESVM, VC_DECODE), 0x81);
        assert_eq!(ghcb_exit_info1(0x1F, 0xFF), 0xFFF);
        for (set, code) in [(0, 0), (1, 14), (15, 255)] {
            assert_eq!(
                decode_ghcb_exit_info1(ghcb_exit_info1(set, code)),
                (set, code)
            );
        }
    }
}
