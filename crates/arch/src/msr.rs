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
/// AMD system configuration (memory encryption enables); KVM reads it as 0 to guests.
pub const AMD_SYSCFG: u32 = 0xc001_0010;
/// AMD hardware configuration (HWCR). Reads show TscFreqSel (bit 24: the TSC counts at the
/// P0 frequency), which Linux checks once the CPU reports an invariant TSC; writes are
/// accepted and ignored.
pub const AMD_HWCR: u32 = 0xc001_0015;
/// HWCR.TscFreqSel.
pub const AMD_HWCR_TSC_FREQ_SEL: u64 = 1 << 24;

/// The AMD model-specific MSRs the vCPU presents as KVM presents them to an AMD guest:
/// stateless, so snapshots need nothing for them. Reads: the patch level (a fixed family 17h
/// value, read-only), DE_CFG (LFENCE serialising), NB_CFG and SYSCFG (0). Used by the CPU
/// model for plain vCPUs and by the hypervisor's MSR emulation for SEV-ES vCPUs (whose
/// accesses to MSRs outside the VMSA are #VC events).
pub fn kvm_style_read(index: u32) -> Option<u64> {
    Some(match index {
        AMD_PATCH_LEVEL => MICROCODE_PATCH_LEVEL,
        AMD_DE_CFG => AMD_DE_CFG_LFENCE_SERIALIZE,
        AMD_NB_CFG | AMD_SYSCFG => 0,
        AMD_HWCR => AMD_HWCR_TSC_FREQ_SEL,
        _ => return None,
    })
}

/// A write to one of [`kvm_style_read`]'s MSRs: `Some(true)` accepted (and ignored, as KVM
/// does), `Some(false)` refused (#GP: the patch level is read-only; DE_CFG takes no bit but
/// LFENCE-serialising), `None` not one of them.
pub fn kvm_style_write(index: u32, value: u64) -> Option<bool> {
    Some(match index {
        AMD_PATCH_LEVEL => false,
        AMD_DE_CFG => value & !AMD_DE_CFG_LFENCE_SERIALIZE == 0,
        AMD_NB_CFG | AMD_SYSCFG | AMD_HWCR => true,
        _ => return None,
    })
}

/// The microcode patch level the vCPU reports in MSR 0x8B (a family 17h value; the model has
/// no microcode, the number only has to be stable).
pub const MICROCODE_PATCH_LEVEL: u64 = 0x0800_1250;

/// MTRR capabilities (read-only).
pub const IA32_MTRRCAP: u32 = 0xfe;
/// MTRR default type and enables.
pub const IA32_MTRR_DEF_TYPE: u32 = 0x2ff;
/// First variable-range MTRR (base/mask pairs from here).
pub const IA32_MTRR_PHYSBASE0: u32 = 0x200;
/// The fixed-range MTRRs, in address order.
pub const IA32_MTRR_FIXED: [u32; 11] = [
    0x250, 0x258, 0x259, 0x268, 0x269, 0x26a, 0x26b, 0x26c, 0x26d, 0x26e, 0x26f,
];
/// Variable-range MTRRs the vCPU offers.
pub const MTRR_VAR_RANGES: usize = 8;
/// MTRRCAP: VCNT = 8, fixed ranges (bit 8), write-combining (bit 10).
pub const MTRRCAP_VALUE: u64 = MTRR_VAR_RANGES as u64 | (1 << 8) | (1 << 10);
/// MTRR_DEF_TYPE: MTRRs enabled (bit 11), default type write-back (6). What firmware leaves
/// for an OS (the reset value, 0, means "MTRRs disabled", and Linux 6.1 then also turns PAT
/// off, which an SEV guest cannot live without).
pub const MTRR_DEF_TYPE_FIRMWARE: u64 = (1 << 11) | 6;

/// The memory-type range registers. An interpreter has no caches, so the types change no
/// behaviour; the registers hold what the guest wrote and refuse what hardware refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct MtrrState {
    pub def_type: u64,
    pub fixed: [u64; 11],
    /// (PHYSBASEn, PHYSMASKn).
    pub var: [(u64, u64); MTRR_VAR_RANGES],
}

fn valid_type(t: u64) -> bool {
    matches!(t, 0 | 1 | 4 | 5 | 6)
}

impl MtrrState {
    /// Whether `index` is one of the MTRR MSRs.
    pub fn holds(index: u32) -> bool {
        index == IA32_MTRRCAP
            || index == IA32_MTRR_DEF_TYPE
            || IA32_MTRR_FIXED.contains(&index)
            || (IA32_MTRR_PHYSBASE0..IA32_MTRR_PHYSBASE0 + 2 * MTRR_VAR_RANGES as u32)
                .contains(&index)
    }

    /// Every MTRR MSR but the read-only MTRRCAP (for saving and restoring them).
    pub fn writable_indices() -> impl Iterator<Item = u32> {
        std::iter::once(IA32_MTRR_DEF_TYPE)
            .chain(IA32_MTRR_FIXED)
            .chain(IA32_MTRR_PHYSBASE0..IA32_MTRR_PHYSBASE0 + 2 * MTRR_VAR_RANGES as u32)
    }

    pub fn get(&self, index: u32) -> Option<u64> {
        if index == IA32_MTRRCAP {
            return Some(MTRRCAP_VALUE);
        }
        if index == IA32_MTRR_DEF_TYPE {
            return Some(self.def_type);
        }
        if let Some(i) = IA32_MTRR_FIXED.iter().position(|&f| f == index) {
            return Some(self.fixed[i]);
        }
        let n = index.checked_sub(IA32_MTRR_PHYSBASE0)? as usize;
        let pair = self.var.get(n / 2)?;
        Some(if n.is_multiple_of(2) { pair.0 } else { pair.1 })
    }

    /// Store `value`: `Ok(true)` done, `Ok(false)` not an MTRR MSR, `Err(())` a value
    /// hardware refuses with #GP (a reserved bit, an invalid memory type, a write to
    /// MTRRCAP). `phys_bits` is MAXPHYADDR: base and mask bits above it are reserved.
    #[allow(clippy::result_unit_err)]
    pub fn set(&mut self, index: u32, value: u64, phys_bits: u32) -> Result<bool, ()> {
        let addr_mask = ((1u64 << phys_bits) - 1) & !0xfff;
        if index == IA32_MTRRCAP {
            return Err(());
        }
        if index == IA32_MTRR_DEF_TYPE {
            if value & !0xcff != 0 || !valid_type(value & 0xff) {
                return Err(());
            }
            self.def_type = value;
            return Ok(true);
        }
        if let Some(i) = IA32_MTRR_FIXED.iter().position(|&f| f == index) {
            if !value
                .to_le_bytes()
                .iter()
                .all(|&b| valid_type(u64::from(b)))
            {
                return Err(());
            }
            self.fixed[i] = value;
            return Ok(true);
        }
        let Some(n) = index.checked_sub(IA32_MTRR_PHYSBASE0).map(|n| n as usize) else {
            return Ok(false);
        };
        let Some(pair) = self.var.get_mut(n / 2) else {
            return Ok(false);
        };
        if n.is_multiple_of(2) {
            if value & !(addr_mask | 0xff) != 0 || !valid_type(value & 0xff) {
                return Err(());
            }
            pair.0 = value;
        } else {
            if value & !(addr_mask | (1 << 11)) != 0 {
                return Err(());
            }
            pair.1 = value;
        }
        Ok(true)
    }
}

/// SEV-ES: the GHCB MSR (MSR protocol values or the GHCB's guest-physical address).
pub const SEV_GHCB: u32 = esvm_abi::sev::MSR_GHCB;
/// Reads report which SEV features are active (bit 0 SEV, bit 1 SEV-ES).
pub const SEV_STATUS: u32 = esvm_abi::sev::MSR_SEV_STATUS;

/// Power-on value of IA32_PAT.
pub const PAT_DEFAULT: u64 = 0x0007_0406_0007_0406;
/// IA32_APIC_BASE's BSP flag (bit 8): this processor is the bootstrap processor.
pub const APIC_BASE_BSP: u64 = 1 << 8;
/// Power-on value of IA32_APIC_BASE for the bootstrap processor: the local APIC at its
/// place in the memory map, xAPIC enabled (bit 11), BSP flag (bit 8).
pub const APIC_BASE_DEFAULT_BSP: u64 = crate::layout::LAPIC_ADDR | (1 << 11) | APIC_BASE_BSP;

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
    /// The MTRRs (absent in snapshots of esvm versions before them: disabled).
    #[serde(default)]
    pub mtrr: MtrrState,
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
            mtrr: MtrrState::default(),
        }
    }
}

impl MsrState {
    /// The MSRs this struct holds, for enumerating them (e.g. KVM get/set lists): the
    /// architectural ones below, then the writable MTRRs ([`MtrrState::writable_indices`]).
    pub fn indices() -> Vec<u32> {
        Self::INDICES
            .iter()
            .copied()
            .chain(MtrrState::writable_indices())
            .collect()
    }

    /// The architectural MSRs this struct holds besides the MTRRs.
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
            _ => return self.mtrr.get(index),
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
            // Unchecked (a restore of saved state): any 52-bit physical address is kept.
            _ => return self.mtrr.set(index, value, 52).unwrap_or(false),
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
        for idx in MsrState::indices()
            .into_iter()
            .skip(MsrState::INDICES.len())
        {
            let v = match idx {
                IA32_MTRR_DEF_TYPE => MTRR_DEF_TYPE_FIRMWARE,
                i if IA32_MTRR_FIXED.contains(&i) => 0x0606_0606_0606_0606,
                i if (i - IA32_MTRR_PHYSBASE0).is_multiple_of(2) => 0x1000_0006,
                _ => 0xff_f000_0800,
            };
            assert!(m.set(idx, v), "{idx:#x}");
            assert_eq!(m.get(idx), Some(v));
        }
    }

    #[test]
    fn sev_msrs_and_apic_base_keep_their_values() {
        assert_eq!(SEV_GHCB, 0xc001_0130);
        assert_eq!(SEV_STATUS, 0xc001_0131);
        assert_eq!(APIC_BASE_DEFAULT_BSP, 0xfee0_0900);
    }

    #[test]
    fn mtrrs_keep_valid_writes_and_refuse_what_hardware_refuses() {
        let mut m = MtrrState::default();
        assert_eq!(m.get(IA32_MTRRCAP), Some(0x508));
        assert_eq!(m.set(IA32_MTRRCAP, 0, 48), Err(()), "MTRRCAP is read-only");
        assert_eq!(
            m.set(IA32_MTRR_DEF_TYPE, MTRR_DEF_TYPE_FIRMWARE, 48),
            Ok(true)
        );
        assert_eq!(m.get(IA32_MTRR_DEF_TYPE), Some(0x806));
        assert_eq!(
            m.set(IA32_MTRR_DEF_TYPE, 0x802, 48),
            Err(()),
            "type 2 is reserved"
        );
        assert_eq!(
            m.set(IA32_MTRR_DEF_TYPE, 0x1806, 48),
            Err(()),
            "bit 12 is reserved"
        );
        // Fixed ranges: every byte a valid type.
        assert_eq!(m.set(0x250, 0x0606_0606_0606_0606, 48), Ok(true));
        assert_eq!(m.set(0x258, 0x0606_0606_0606_0607, 48), Err(()));
        // Variable ranges: base/mask bits above MAXPHYADDR are reserved.
        assert_eq!(m.set(0x200, 0x8000_0006, 43), Ok(true));
        assert_eq!(m.set(0x201, 0x7ff_ffff_f800, 43), Ok(true));
        assert_eq!(m.set(0x201, 0xfff_ffff_f800, 43), Err(()));
        assert_eq!(m.set(0x200, 0x1000_0000_0006, 43), Err(()));
        assert_eq!(
            (m.get(0x200), m.get(0x201)),
            (Some(0x8000_0006), Some(0x7ff_ffff_f800))
        );
        assert_eq!(m.set(0x20f, 0, 43), Ok(true), "the last of eight pairs");
        assert_eq!(m.set(0x210, 0, 43), Ok(false), "not an MTRR");
        assert_eq!(m.get(0x210), None);
        // Variable range 3 (base 0x206, mask 0x207) at MAXPHYADDR 48.
        assert_eq!(m.set(0x26f, 0x0606_0606_0606_0603, 48), Err(()));
        assert_eq!(m.set(0x206, 0x8000_0006, 48), Ok(true));
        assert_eq!(m.set(0x207, 0xffff_8000_0800, 48), Ok(true));
        assert_eq!(
            m.set(0x207, 0x1_0000_0000_0800, 48),
            Err(()),
            "above MAXPHYADDR"
        );
        assert_eq!(m.set(0x206, 0x8000_0106, 48), Err(()), "reserved base bits");
        assert_eq!(m.get(0x206), Some(0x8000_0006));
        assert!(MtrrState::holds(0x20f) && !MtrrState::holds(0x210));
        assert_eq!(kvm_style_read(AMD_SYSCFG), Some(0));
        assert_eq!(kvm_style_read(AMD_HWCR), Some(1 << 24), "TscFreqSel");
        assert_eq!(kvm_style_write(AMD_HWCR, 0), Some(true));
        assert_eq!(kvm_style_write(AMD_PATCH_LEVEL, 0), Some(false));
        assert_eq!(kvm_style_write(AMD_DE_CFG, 2), Some(true));
        assert_eq!(kvm_style_write(0x1234, 0), None);
        assert!(MtrrState::writable_indices().all(MtrrState::holds));
        assert_eq!(MtrrState::writable_indices().count(), 1 + 11 + 16);
    }
}
