//! Which CPU the interpreter models where the architecture leaves a result undefined.
//!
//! The vCPU reports itself as an AMD family 17h part (Zen; `CpuidTable::esvm_default`:
//! "AuthenticAMD", family 0x17, model 1). Wherever the Intel SDM or the AMD APM leaves a
//! flag or a result undefined, the interpreter produces what a family 17h part produces, as
//! measured by the differential tests on such a host (`tests::host`, and
//! `ESVM_DIFF_ALL_FLAGS=1` for the random programs of `esvm-native`). Other families and
//! vendors differ: AMD family 19h (Zen 3) leaves CF/PF/AF/SF/OF unchanged after BSF/BSR with a
//! non-zero source; Intel computes other values for most entries below. The test suites
//! therefore compare undefined flags and results only when [`host_is_modelled`] and mask or
//! avoid them on every other host.
//!
//! | instruction | undefined by the architecture | what the interpreter produces (family 17h) |
//! |---|---|---|
//! | AND, OR, XOR, TEST | AF | AF = 0 |
//! | SHL/SAL, SHR, SAR (masked count > 1) | OF, AF | AF = 1; OF = SHL: MSB(result) XOR CF, SHR: 0, SAR: 0 |
//! | SHL/SHR, 8/16-bit, count > operand width | CF | CF = 0 |
//! | ROL, ROR, RCL, RCR (count > 1) | OF | OF as for a count of 1, from the final result |
//! | SHLD, SHRD (count > 1) | OF, AF | AF = 1; OF from the final result as for a count of 1 |
//! | SHLD, SHRD 16-bit, count > 16 | result, CF, OF | the 48-bit value dst:src:src (SHLD) or src:src:dst (SHRD) is shifted; CF = 0; SHLD: OF = CF |
//! | MUL, IMUL (all forms) | SF, ZF, AF, PF | unchanged |
//! | DIV, IDIV | all six | CF, OF unchanged; AF = 1; SF, ZF, PF = 0 |
//! | BT, BTS, BTR, BTC | OF, SF, AF, PF (and ZF in older manuals) | unchanged |
//! | BSF, BSR, source 0 | destination, CF, OF, SF, AF, PF | destination unchanged (all 64 bits, also for 32-bit operands); ZF = PF = 1, the rest 0 |
//! | BSF, BSR, source ≠ 0 | CF, OF, SF, AF, PF | SF, PF from the result; CF, OF, AF = 0 |
//! | TZCNT, LZCNT | OF, SF, AF, PF | OF unchanged; SF, AF, PF = 0 |
//! | ANDN, BLSI, BLSMSK, BLSR, BEXTR | AF, PF | PF from the result, AF = 0; BEXTR: AF = 1, SF = 0 |
//! | REP string ops, 32-bit address size, ECX = 0 | (vendor-specific) | RCX, RSI, RDI untouched (Intel zero-extends ECX, ESI, EDI into them) |
//! | EMMS | TOP (AMD's APM is silent; Intel's SDM, table 9-3: 0) | TOP = 0, as measured on Intel; the MMX host tests compare it only on Intel hosts |
//! | CVTPI2PS, CVTPI2PD from memory | whether the x87 state switches to MMX mode (AMD silent) | it does not (Intel SDM); the MMX host tests start these in MMX mode |
//! | DAA, DAS, AAA, AAS, AAM, AAD | several flags | not implemented: #UD in every mode (they are #UD in 64-bit mode anyway) |
//!
//! The table is the interpreter's contract; [`undefined_flags`] lists the masked flags per
//! mnemonic for the tests.

use esvm_arch::bits::rflags::{AF, CF, OF, PF, SF, ZF};
use esvm_arch::cpuid::{CpuSignature, CpuidTable};

/// The CPU the interpreter reports (and models): vendor and family of its default CPUID.
pub fn modelled() -> CpuSignature {
    CpuidTable::esvm_default().signature()
}

/// Whether the host CPU is of the modelled vendor and family, so its undefined flags and
/// results can be expected to equal the interpreter's.
#[cfg(target_arch = "x86_64")]
pub fn host_is_modelled() -> bool {
    CpuSignature::host().same_family(&modelled())
}

/// The arithmetic flags the host differential tests mask after `mnemonic` (lower case) on
/// hosts that are not the modelled family: the flags the architecture leaves undefined in at
/// least one of its forms (counts are not distinguished: a shift by 1 defines OF, but OF is
/// masked for every count). Two undefined flags stay compared because every host seen so far
/// (AMD families 17h and 19h, Intel) agrees with the model on them: CF of an 8/16-bit SHL/SHR
/// by more than the operand width, and ZF of BT/BTS/BTR/BTC (unaffected in current Intel
/// manuals, undefined in the APM).
pub fn undefined_flags(mnemonic: &str) -> u64 {
    match mnemonic {
        "and" | "or" | "xor" | "test" => AF,
        "shl" | "sal" | "shr" | "sar" => AF | OF,
        "rol" | "ror" | "rcl" | "rcr" => OF,
        "shld" | "shrd" => AF | OF | CF,
        "mul" | "imul" => SF | ZF | AF | PF,
        "div" | "idiv" => CF | OF | SF | ZF | AF | PF,
        "bt" | "bts" | "btr" | "btc" => OF | SF | AF | PF,
        "bsf" | "bsr" => CF | OF | SF | AF | PF,
        "tzcnt" | "lzcnt" => OF | SF | AF | PF,
        "andn" | "bextr" | "blsi" | "blsmsk" | "blsr" => AF | PF,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_model_is_the_family_the_cpuid_reports() {
        let m = modelled();
        assert_eq!(&m.vendor, b"AuthenticAMD");
        assert_eq!(m.family, 0x17, "the table above documents family 17h");
    }

    #[test]
    fn defined_flags_are_never_masked() {
        // CF and OF of MUL/IMUL, ZF of BSF/BSR, CF of BT and the flags of ADD are defined.
        assert_eq!(undefined_flags("mul") & (CF | OF), 0);
        assert_eq!(undefined_flags("bsf") & ZF, 0);
        assert_eq!(undefined_flags("bt") & CF, 0);
        assert_eq!(undefined_flags("add"), 0);
    }
}
