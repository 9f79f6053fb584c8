//! The GHCB MSR protocol: requests and responses carried in the GHCB MSR itself, for the
//! few exchanges a guest makes before it has a GHCB page (GHCB specification, section 2.3.1).
//!
//! The low 12 bits (GHCBInfo, [`INFO_MASK`]) name the request or response; bits 63:12
//! (GHCBData) carry its data, in the field positions below.

/// Mask of GHCBInfo, the request/response code in bits 11:0.
pub const INFO_MASK: u64 = 0xFFF;
/// GHCBData starts at bit 12.
pub const DATA_SHIFT: u32 = 12;

/// SEV information response: `[63:48]` max version, `[47:32]` min version, `[31:24]` C-bit.
pub const SEV_INFO_RESP: u64 = 0x001;
/// SEV information request.
pub const SEV_INFO_REQ: u64 = 0x002;
/// CPUID request: `[31:30]` register (0 EAX, 1 EBX, 2 ECX, 3 EDX), `[63:32]` function.
pub const CPUID_REQ: u64 = 0x004;
/// CPUID response: `[31:30]` the register echoed, `[63:32]` its value.
pub const CPUID_RESP: u64 = 0x005;
/// AP reset hold request.
pub const AP_RESET_HOLD_REQ: u64 = 0x006;
/// AP reset hold response: GHCBData non-zero once the AP is released.
pub const AP_RESET_HOLD_RESP: u64 = 0x007;
/// GHCB GPA registration request (SEV-SNP): GHCBData = the GFN.
pub const REG_GPA_REQ: u64 = 0x012;
/// GHCB GPA registration response: GHCBData = the GFN, or all ones on failure.
pub const REG_GPA_RESP: u64 = 0x013;
/// Hypervisor features request.
pub const HV_FT_REQ: u64 = 0x080;
/// Hypervisor features response: GHCBData = the feature bitmap.
pub const HV_FT_RESP: u64 = 0x081;
/// Termination request: `[15:12]` reason set, `[23:16]` reason code.
pub const TERM_REQ: u64 = 0x100;

/// SEV_INFO response: position of the highest supported version.
pub const SEV_INFO_MAX_SHIFT: u32 = 48;
/// SEV_INFO response: position of the lowest supported version.
pub const SEV_INFO_MIN_SHIFT: u32 = 32;
/// SEV_INFO response: position of the C-bit position.
pub const SEV_INFO_CBIT_SHIFT: u32 = 24;
/// CPUID request/response: position of the 2-bit register number.
pub const CPUID_REG_SHIFT: u32 = 30;
/// CPUID request: position of the function; CPUID response: position of the value.
pub const CPUID_VALUE_SHIFT: u32 = 32;
/// Termination request: position of the 4-bit reason set.
pub const TERM_SET_SHIFT: u32 = 12;
/// Termination request: position of the 8-bit reason code.
pub const TERM_CODE_SHIFT: u32 = 16;

/// Encodes a CPUID request for `register` (0..=3 = EAX..EDX) of `function`.
pub const fn cpuid_request(function: u32, register: u8) -> u64 {
    ((function as u64) << CPUID_VALUE_SHIFT)
        | (((register & 3) as u64) << CPUID_REG_SHIFT)
        | CPUID_REQ
}

/// Decodes a CPUID request into (function, register); `None` if `msr` is not one.
pub const fn decode_cpuid_request(msr: u64) -> Option<(u32, u8)> {
    if msr & INFO_MASK != CPUID_REQ {
        return None;
    }
    Some((
        (msr >> CPUID_VALUE_SHIFT) as u32,
        ((msr >> CPUID_REG_SHIFT) & 3) as u8,
    ))
}

/// Encodes the CPUID response carrying `value` of `register`.
pub const fn encode_cpuid_response(register: u8, value: u32) -> u64 {
    ((value as u64) << CPUID_VALUE_SHIFT)
        | (((register & 3) as u64) << CPUID_REG_SHIFT)
        | CPUID_RESP
}

/// Decodes a CPUID response to a request for `register`; `None` if `msr` is not such a
/// response.
pub const fn cpuid_response(msr: u64, register: u8) -> Option<u32> {
    if msr & INFO_MASK != CPUID_RESP || (msr >> CPUID_REG_SHIFT) & 3 != (register & 3) as u64 {
        return None;
    }
    Some((msr >> CPUID_VALUE_SHIFT) as u32)
}

/// Encodes a termination request.
pub const fn term_request(reason_set: u8, reason_code: u8) -> u64 {
    (((reason_set & 0xF) as u64) << TERM_SET_SHIFT)
        | ((reason_code as u64) << TERM_CODE_SHIFT)
        | TERM_REQ
}

/// Decodes a termination request into (reason set, reason code); `None` if `msr` is not
/// one.
pub const fn decode_term_request(msr: u64) -> Option<(u8, u8)> {
    if msr & INFO_MASK != TERM_REQ {
        return None;
    }
    Some((
        ((msr >> TERM_SET_SHIFT) & 0xF) as u8,
        ((msr >> TERM_CODE_SHIFT) & 0xFF) as u8,
    ))
}

/// A decoded SEV_INFO response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SevInfo {
    /// Highest protocol version the hypervisor supports.
    pub max_version: u16,
    /// Lowest protocol version the hypervisor supports.
    pub min_version: u16,
    /// C-bit position.
    pub c_bit: u8,
}

/// Encodes the SEV_INFO response.
pub const fn sev_info_response(max_version: u16, min_version: u16, c_bit: u8) -> u64 {
    ((max_version as u64) << SEV_INFO_MAX_SHIFT)
        | ((min_version as u64) << SEV_INFO_MIN_SHIFT)
        | ((c_bit as u64) << SEV_INFO_CBIT_SHIFT)
        | SEV_INFO_RESP
}

/// Decodes a SEV_INFO response; `None` if `msr` is not one.
pub const fn sev_info(msr: u64) -> Option<SevInfo> {
    if msr & INFO_MASK != SEV_INFO_RESP {
        return None;
    }
    Some(SevInfo {
        max_version: (msr >> SEV_INFO_MAX_SHIFT) as u16,
        min_version: (msr >> SEV_INFO_MIN_SHIFT) as u16,
        c_bit: (msr >> SEV_INFO_CBIT_SHIFT) as u8,
    })
}

/// The protocol version the guest runtime uses with a hypervisor offering
/// `[info.min_version, info.max_version]`: the highest version both support (the runtime's
/// range is [`crate::sev::GHCB_VERSION_MIN`]..=[`crate::sev::GHCB_VERSION_MAX`]), or `None`
/// if the ranges do not overlap.
pub const fn negotiate(info: SevInfo) -> Option<u16> {
    use crate::sev::{GHCB_VERSION_MAX, GHCB_VERSION_MIN};
    let v = if info.max_version < GHCB_VERSION_MAX {
        info.max_version
    } else {
        GHCB_VERSION_MAX
    };
    if v < GHCB_VERSION_MIN || v < info.min_version {
        None
    } else {
        Some(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_the_ghcb_specification_values() {
        assert_eq!(
            [SEV_INFO_RESP, SEV_INFO_REQ, CPUID_REQ, CPUID_RESP],
            [1, 2, 4, 5]
        );
        assert_eq!([AP_RESET_HOLD_REQ, AP_RESET_HOLD_RESP], [6, 7]);
        assert_eq!(
            [REG_GPA_REQ, REG_GPA_RESP, HV_FT_REQ, HV_FT_RESP],
            [0x12, 0x13, 0x80, 0x81]
        );
        assert_eq!(TERM_REQ, 0x100);
        assert_eq!(INFO_MASK, (1 << DATA_SHIFT) - 1);
    }

    #[test]
    fn encoders_and_decoders_round_trip() {
        for reg in 0..4u8 {
            let req = cpuid_request(0x8000_001F, reg);
            assert_eq!(decode_cpuid_request(req), Some((0x8000_001F, reg)));
            let resp = encode_cpuid_response(reg, 0xDEAD_BEEF);
            assert_eq!(cpuid_response(resp, reg), Some(0xDEAD_BEEF));
            assert_eq!(cpuid_response(resp, (reg + 1) & 3), None);
            assert_eq!(decode_cpuid_request(resp), None);
        }
        assert_eq!(decode_term_request(term_request(1, 0x42)), Some((1, 0x42)));
        assert_eq!(decode_term_request(SEV_INFO_REQ), None);
        let info = sev_info(sev_info_response(2, 1, 47)).unwrap();
        assert_eq!((info.max_version, info.min_version, info.c_bit), (2, 1, 47));
        assert_eq!(sev_info(SEV_INFO_REQ), None);
    }
}
