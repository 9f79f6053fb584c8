//! Model-specific registers the vCPU models, and their indices.

use serde::{Deserialize, Serialize};

pub const IA32_TIME_STAMP_COUNTER: u32 = 0x10;
pub const IA32_APIC_BASE: u32 = 0x1b;
pub const IA32_SYSENTER_CS: u32 = 0x174;
pub const IA32_SYSENTER_ESP: u32 = 0x175;
pub const IA32_SYSENTER_EIP: u32 = 0x176;
pub const IA32_PAT: u32 = 0x277;
pub const IA32_EFER: u32 = 0xc000_0080;
pub const IA32_STAR: u32 = 0xc000_0081;
pub const IA32_LSTAR: u32 = 0xc000_0082;
pub const IA32_CSTAR: u32 = 0xc000_0083;
pub const IA32_FMASK: u32 = 0xc000_0084;
pub const IA32_FS_BASE: u32 = 0xc000_0100;
pub const IA32_GS_BASE: u32 = 0xc000_0101;
pub const IA32_KERNEL_GS_BASE: u32 = 0xc000_0102;
pub const IA32_TSC_AUX: u32 = 0xc000_0103;
/// AMD microcode patch level (read-only).
pub const AMD_PATCH_LEVEL: u32 = 0x8b;
/// AMD northbridge configuration (family 10h-17h; Linux sets EnableCf8ExtCfg through it).
pub const AMD_NB_CFG: u32 = 0xc001_001f;
/// AMD decode configuration; bit 1 makes LFENCE dispatch-serialising.
pub const AMD_DE_CFG: u32 = 0xc001_1029;
/// DE_CFG bit 1: LFENCE is dispatch-serialising.
pub const AMD_DE_CFG_LFENCE_SERIALIZE: u64 = 1 << 1;
/// SEV-ES: the GHCB MSR (MSR protocol values or the GHCB's guest-physical address).
pub const SEV_GHCB: u32 = esvm_abi::sev::MSR_GHCB;
/// Reads report which SEV features are active (bit 0 SEV, bit 1 SEV-ES).
pub const SEV_STATUS: u32 = esvm_abi::sev::MSR_SEV_STATUS;

/// Power-on value of IA32_PAT.
pub const PAT_DEFAULT: u64 = 0x0007_0406_0007_0406;
/// Power-on value of IA32_APIC_BASE for the bootstrap processor: the local APIC at its
/// place in the memory map, xAPIC enabled (bit 11), BSP flag (bit 8).
pub const APIC_BASE_DEFAULT_BSP: u64 = crate::layout::LAPIC_ADDR | (1 << 11) | (1 << 8);

/// MSRs outside [`crate::SpecialRegs`] (EFER, APIC base, FS/GS base live there).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsrState {
    pub star: u64,
    pub lstar: u64,
    pub cstar: u64,
    pub sfmask: u64,
    pub kernel_gs_base: u64,
    pub sysenter_cs: u64,
    pub sysenter_esp: u64,
    pub sysenter_eip: u64,
    pub pat: u64,
    pub tsc_aux: u64,
}

impl Default for MsrState {
    fn default() -> Self {
        MsrState {
            star: 0,
            lstar: 0,
            cstar: 0,
            sfmask: 0,
            kernel_gs_base: 0,
            sysenter_cs: 0,
            sysenter_esp: 0,
            sysenter_eip: 0,
            pat: PAT_DEFAULT,
            tsc_aux: 0,
        }
    }
}

impl MsrState {
    /// The MSRs this struct holds, for enumerating them (e.g. KVM get/set lists).
    pub const INDICES: [u32; 10] = [
        IA32_STAR,
        IA32_LSTAR,
        IA32_CSTAR,
        IA32_FMASK,
        IA32_KERNEL_GS_BASE,
        IA32_SYSENTER_CS,
        IA32_SYSENTER_ESP,
        IA32_SYSENTER_EIP,
        IA32_PAT,
        IA32_TSC_AUX,
    ];

    pub fn get(&self, index: u32) -> Option<u64> {
        Some(match index {
            IA32_STAR => self.star,
            IA32_LSTAR => self.lstar,
            IA32_CSTAR => self.cstar,
            IA32_FMASK => self.sfmask,
            IA32_KERNEL_GS_BASE => self.kernel_gs_base,
            IA32_SYSENTER_CS => self.sysenter_cs,
            IA32_SYSENTER_ESP => self.sysenter_esp,
            IA32_SYSENTER_EIP => self.sysenter_eip,
            IA32_PAT => self.pat,
            IA32_TSC_AUX => self.tsc_aux,
            _ => return None,
        })
    }

    /// Store `value`; returns false if this struct does not hold `index`.
    pub fn set(&mut self, index: u32, value: u64) -> bool {
        let slot = match index {
            IA32_STAR => &mut self.star,
            IA32_LSTAR => &mut self.lstar,
            IA32_CSTAR => &mut self.cstar,
            IA32_FMASK => &mut self.sfmask,
            IA32_KERNEL_GS_BASE => &mut self.kernel_gs_base,
            IA32_SYSENTER_CS => &mut self.sysenter_cs,
            IA32_SYSENTER_ESP => &mut self.sysenter_esp,
            IA32_SYSENTER_EIP => &mut self.sysenter_eip,
            IA32_PAT => &mut self.pat,
            IA32_TSC_AUX => &mut self.tsc_aux,
            _ => return false,
        };
        *slot = value;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_index_roundtrips() {
        let mut m = MsrState::default();
        for (i, idx) in MsrState::INDICES.iter().enumerate() {
            assert!(m.set(*idx, 0x1000 + i as u64));
        }
        for (i, idx) in MsrState::INDICES.iter().enumerate() {
            assert_eq!(m.get(*idx), Some(0x1000 + i as u64));
        }
        assert_eq!(m.get(IA32_EFER), None);
        assert!(!m.set(0x1234, 1));
    }

    #[test]
    fn sev_msrs_and_apic_base_keep_their_values() {
        assert_eq!(SEV_GHCB, 0xc001_0130);
        assert_eq!(SEV_STATUS, 0xc001_0131);
        assert_eq!(APIC_BASE_DEFAULT_BSP, 0xfee0_0900);
    }
}
