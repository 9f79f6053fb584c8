//! How an SEV-ES guest identifies the platform: the SEV MSRs, the CPUID memory-encryption
//! leaf, the C-bit position the esvm "hardware" reports, the #VC vector, and the GHCB
//! protocol versions the esvm guest runtime speaks.

/// The C-bit position the esvm "hardware" reports (CPUID 0x8000_001F `EBX[5:0]`, and the
/// GHCB MSR protocol's SEV_INFO response `[31:24]`). The guest runtime does not rely on
/// this constant: it uses the position it negotiates and checks that both sources agree.
pub const C_BIT_POSITION: u8 = 47;

/// The GHCB MSR: MSR-protocol requests, or the GPA of the GHCB page. RDMSR/WRMSR of it
/// never raise #VC.
pub const MSR_GHCB: u32 = 0xC001_0130;
/// SEV_STATUS: bit 0 SEV enabled, bit 1 SEV-ES enabled.
pub const MSR_SEV_STATUS: u32 = 0xC001_0131;
/// SEV_STATUS bit 0.
pub const SEV_STATUS_SEV: u64 = 1 << 0;
/// SEV_STATUS bit 1.
pub const SEV_STATUS_SEV_ES: u64 = 1 << 1;

/// The CPUID leaf that describes the memory-encryption features.
pub const CPUID_SEV_LEAF: u32 = 0x8000_001F;
/// CPUID 0x8000_001F `EAX` bit 1: SEV supported.
pub const CPUID_SEV_EAX_SEV: u32 = 1 << 1;
/// CPUID 0x8000_001F `EAX` bit 3: SEV-ES supported.
pub const CPUID_SEV_EAX_SEV_ES: u32 = 1 << 3;
/// CPUID 0x8000_001F `EBX[5:0]`: the C-bit position.
pub const CPUID_SEV_EBX_CBIT_MASK: u32 = 0x3F;

/// Lowest GHCB protocol version the guest runtime speaks.
pub const GHCB_VERSION_MIN: u16 = 1;
/// Highest GHCB protocol version the guest runtime speaks.
pub const GHCB_VERSION_MAX: u16 = 2;

/// The #VC vector.
pub const VC_VECTOR: u8 = 29;

const _: () = assert!(C_BIT_POSITION >= 32 && C_BIT_POSITION <= 51);
const _: () = assert!(C_BIT_POSITION as u32 & !CPUID_SEV_EBX_CBIT_MASK == 0);
