//! Which optional integer instructions the host CPU executes, so the generator only emits what
//! the native side can run (an unsupported TZCNT/LZCNT would silently execute as BSF/BSR), and
//! whether the host is the CPU family the interpreter models, so the generator only emits
//! vendor-specific cases where host and interpreter are meant to agree.

use esvm_arch::cpuid::{CpuSignature, CpuidTable};

/// Optional instruction-set extensions relevant to the generator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostFeatures {
    /// LZCNT (CPUID 8000_0001h ECX bit 5, "ABM").
    pub lzcnt: bool,
    /// TZCNT (part of BMI1, CPUID 7 EBX bit 3).
    pub bmi1: bool,
    /// POPCNT (CPUID 1 ECX bit 23).
    pub popcnt: bool,
    /// MOVBE (CPUID 1 ECX bit 22).
    pub movbe: bool,
    /// LAHF/SAHF in 64-bit mode (CPUID 8000_0001h ECX bit 0).
    pub lahf_lm: bool,
    /// CMPXCHG16B (CPUID 1 ECX bit 13).
    pub cx16: bool,
    /// The host is the vendor and family the interpreter models (its default CPUID; see
    /// `esvm_cpu::model`): cases whose outcome differs between vendors or families (e.g. a
    /// REP string instruction with a 32-bit address size and ECX = 0, which Intel ends by
    /// zero-extending ECX, ESI and EDI and AMD leaves alone) are generated only then.
    pub modelled_family: bool,
}

impl HostFeatures {
    /// Reads the features of the CPU this process runs on (via CPUID).
    pub fn detect() -> Self {
        let ext_max = core::arch::x86_64::__cpuid(0x8000_0000).eax;
        let ext1_ecx = if ext_max >= 0x8000_0001 {
            core::arch::x86_64::__cpuid(0x8000_0001).ecx
        } else {
            0
        };
        HostFeatures {
            lzcnt: std::arch::is_x86_feature_detected!("lzcnt"),
            bmi1: std::arch::is_x86_feature_detected!("bmi1"),
            popcnt: std::arch::is_x86_feature_detected!("popcnt"),
            movbe: std::arch::is_x86_feature_detected!("movbe"),
            lahf_lm: ext1_ecx & 1 != 0,
            cx16: std::arch::is_x86_feature_detected!("cmpxchg16b"),
            modelled_family: CpuSignature::host()
                .same_family(&CpuidTable::esvm_default().signature()),
        }
    }

    /// Only the baseline x86-64 instructions (for interpreters or hosts without extensions).
    pub fn baseline() -> Self {
        HostFeatures {
            lzcnt: false,
            bmi1: false,
            popcnt: false,
            movbe: false,
            lahf_lm: false,
            cx16: false,
            modelled_family: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detect_is_consistent_with_std() {
        let f = HostFeatures::detect();
        assert_eq!(f.popcnt, std::arch::is_x86_feature_detected!("popcnt"));
        assert!(!HostFeatures::baseline().lzcnt);
    }
}
