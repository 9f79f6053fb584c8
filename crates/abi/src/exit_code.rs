//! SW_EXITCODE values: the AMD APM vol. 2 SVM exit codes of the events an SEV-ES guest
//! reports through the GHCB, and the GHCB specification's software-defined ones
//! (0x8000_0000 and up).
//!
//! The #VC error code is the exit code of the event that raised it: the CPU model raises
//! #VC with these values, the guest's #VC handler dispatches on them, and the hypervisor
//! handles the GHCB requests they name. All fit in 32 bits.

/// MOV from DR7.
pub const DR7_READ: u64 = 0x27;
/// MOV to DR7.
pub const DR7_WRITE: u64 = 0x37;
/// RDTSC.
pub const RDTSC: u64 = 0x6E;
/// RDPMC.
pub const RDPMC: u64 = 0x6F;
/// CPUID.
pub const CPUID: u64 = 0x72;
/// INVD.
pub const INVD: u64 = 0x76;
/// IN, OUT, INS, OUTS.
pub const IOIO: u64 = 0x7B;
/// RDMSR, WRMSR.
pub const MSR: u64 = 0x7C;
/// VMMCALL.
pub const VMMCALL: u64 = 0x81;
/// RDTSCP.
pub const RDTSCP: u64 = 0x87;
/// WBINVD.
pub const WBINVD: u64 = 0x89;
/// MONITOR.
pub const MONITOR: u64 = 0x8A;
/// MWAIT.
pub const MWAIT: u64 = 0x8B;
/// Nested page fault: the #VC error code of an MMIO access (a C-bit-clear access to a
/// guest-physical address outside RAM).
pub const NPF: u64 = 0x400;

/// GHCB: MMIO read (SW_EXITINFO1 = GPA, SW_EXITINFO2 = size, data in SW_SCRATCH).
pub const MMIO_READ: u64 = 0x8000_0001;
/// GHCB: MMIO write.
pub const MMIO_WRITE: u64 = 0x8000_0002;
/// GHCB: the guest's NMI handler finished.
pub const NMI_COMPLETE: u64 = 0x8000_0003;
/// GHCB: AP reset hold (park the vCPU until INIT-SIPI).
pub const AP_HLT_LOOP: u64 = 0x8000_0004;
/// GHCB: AP jump table (set/get its GPA).
pub const AP_JUMP_TABLE: u64 = 0x8000_0005;
/// GHCB: hypervisor feature bitmap.
pub const HV_FEATURES: u64 = 0x8000_FFFD;
/// GHCB: termination request (SW_EXITINFO1 `[3:0]` reason set, `[11:4]` reason code).
pub const TERM_REQUEST: u64 = 0x8000_FFFE;
/// GHCB: the guest met an event it cannot handle.
pub const UNSUPPORTED_EVENT: u64 = 0x8000_FFFF;

/// Every exit code this ABI defines (the SVM exit codes and the GHCB NAE events).
pub const ALL: [u64; 22] = [
    DR7_READ,
    DR7_WRITE,
    RDTSC,
    RDPMC,
    CPUID,
    INVD,
    IOIO,
    MSR,
    VMMCALL,
    RDTSCP,
    WBINVD,
    MONITOR,
    MWAIT,
    NPF,
    MMIO_READ,
    MMIO_WRITE,
    NMI_COMPLETE,
    AP_HLT_LOOP,
    AP_JUMP_TABLE,
    HV_FEATURES,
    TERM_REQUEST,
    UNSUPPORTED_EVENT,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_are_distinct_and_fit_a_32_bit_error_code() {
        for (i, a) in ALL.iter().enumerate() {
            assert!(*a <= u64::from(u32::MAX), "{a:#x}");
            for b in &ALL[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }

    #[test]
    fn exit_codes_are_the_apm_and_ghcb_values() {
        // AMD APM vol. 2 appendix C (SVM intercept exit codes).
        assert_eq!(
            [CPUID, IOIO, MSR, VMMCALL, NPF],
            [0x72, 0x7B, 0x7C, 0x81, 0x400]
        );
        // GHCB specification, table 6 (software-defined exit codes).
        assert_eq!(
            [MMIO_READ, MMIO_WRITE, TERM_REQUEST, UNSUPPORTED_EVENT],
            [0x8000_0001, 0x8000_0002, 0x8000_FFFE, 0x8000_FFFF]
        );
    }
}
