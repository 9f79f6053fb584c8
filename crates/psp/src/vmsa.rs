//! VMSA facts the firmware needs, and the tracked-register extension carried
//! by SEND/RECEIVE_UPDATE_VMSA.
//!
//! Offsets come from `esvm_arch::vmsa::offset` (AMD's SEV-ES save area, Linux
//! `struct sev_es_save_area`): EFER 0x0D0, CR4 0x148, CR0 0x158, VINTR_CTRL
//! 0x3B8 (bits 7:0 = V_TPR). CR8 is not in the VMSA: it is the TPR, held in
//! V_TPR; only V_TPR[3:0] are architectural (CR8 is a 4-bit register), so
//! `cr8 = V_TPR & 0xF`, as `esvm_arch::vmsa::Vmsa::cr8` reads it.

/// Size of a VMSA page.
pub const VMSA_SIZE: usize = esvm_arch::vmsa::VMSA_SIZE;

/// The VMSA offsets this module reads.
pub mod offsets {
    pub use esvm_arch::vmsa::offset::{CR0, CR4, EFER, VINTR_CTRL};
}

fn rd64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

/// The register values a hypervisor tracks for a protected vCPU, as the
/// destination firmware derived them on RECEIVE_UPDATE_VMSA: CR0, CR4, EFER
/// and CR8 come from the authenticated, decrypted VMSA; APIC base from the
/// authenticated extension.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub struct TrackedRegisters {
    /// CR0 from the VMSA.
    pub cr0: u64,
    /// CR4 from the VMSA.
    pub cr4: u64,
    /// EFER from the VMSA.
    pub efer: u64,
    /// CR8 = V_TPR[3:0] from the VMSA.
    pub cr8: u64,
    /// APIC base MSR from the tracked extension.
    pub apic_base: u64,
}

impl TrackedRegisters {
    /// Reads CR0, CR4, EFER and CR8 from a plaintext VMSA.
    pub fn from_vmsa(vmsa: &[u8; VMSA_SIZE], apic_base: u64) -> TrackedRegisters {
        TrackedRegisters {
            cr0: rd64(vmsa, offsets::CR0),
            cr4: rd64(vmsa, offsets::CR4),
            efer: rd64(vmsa, offsets::EFER),
            cr8: rd64(vmsa, offsets::VINTR_CTRL) & 0xF,
            apic_base,
        }
    }
}

/// Values the source hypervisor tracks beside the VMSA, authenticated with
/// it in the SEND_UPDATE_VMSA packet.
///
/// Wire format (version 1, 32 bytes, little-endian):
/// ```text
/// 0x00 u32 version (= 1)     0x04 u32 ap_flags
/// 0x08 u64 apic_base         0x10 u64 ghcb_gpa     0x18 u64 reserved (0)
/// ```
/// `ap_flags` bit 0: the vCPU is an AP parked in AP-reset-hold (waiting for
/// the AP jump table / SIPI); bit 1: the vCPU is halted. Other bits must be 0.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub struct TrackedExtension {
    /// AP state flags (see type docs).
    pub ap_flags: u32,
    /// APIC base MSR.
    pub apic_base: u64,
    /// GHCB GPA registered through the GHCB MSR protocol (0 if none).
    pub ghcb_gpa: u64,
}

impl TrackedExtension {
    /// Current version.
    pub const VERSION: u32 = 1;
    /// Encoded length.
    pub const LEN: usize = 32;
    /// AP in reset hold.
    pub const AP_RESET_HOLD: u32 = 1 << 0;
    /// vCPU halted.
    pub const HALTED: u32 = 1 << 1;

    /// Encodes version 1.
    pub fn to_bytes(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0..4].copy_from_slice(&Self::VERSION.to_le_bytes());
        b[4..8].copy_from_slice(&self.ap_flags.to_le_bytes());
        b[8..16].copy_from_slice(&self.apic_base.to_le_bytes());
        b[16..24].copy_from_slice(&self.ghcb_gpa.to_le_bytes());
        b
    }

    /// Decodes, checking version and reserved fields.
    pub fn from_bytes(b: &[u8]) -> Result<TrackedExtension, String> {
        if b.len() != Self::LEN {
            return Err(format!(
                "tracked extension must be {} bytes, got {}",
                Self::LEN,
                b.len()
            ));
        }
        let version = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        if version != Self::VERSION {
            return Err(format!(
                "tracked extension version {version} is not supported (this firmware knows version {})",
                Self::VERSION
            ));
        }
        let ext = TrackedExtension {
            ap_flags: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            apic_base: rd64(b, 8),
            ghcb_gpa: rd64(b, 16),
        };
        if ext.ap_flags & !(Self::AP_RESET_HOLD | Self::HALTED) != 0 || rd64(b, 24) != 0 {
            return Err("tracked extension has reserved bits set".into());
        }
        Ok(ext)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracked_from_vmsa_reads_the_documented_offsets() {
        let mut v = [0u8; VMSA_SIZE];
        v[0x158..0x160].copy_from_slice(&0x8005_0033u64.to_le_bytes());
        v[0x148..0x150].copy_from_slice(&0x0000_06f0u64.to_le_bytes());
        v[0x0D0..0x0D8].copy_from_slice(&0x0000_1d01u64.to_le_bytes());
        v[0x3B8..0x3C0].copy_from_slice(&0x0000_0000_0000_00f9u64.to_le_bytes());
        let t = TrackedRegisters::from_vmsa(&v, 0xfee0_0900);
        assert_eq!(
            t,
            TrackedRegisters {
                cr0: 0x8005_0033,
                cr4: 0x6f0,
                efer: 0x1d01,
                cr8: 0x9,
                apic_base: 0xfee0_0900
            }
        );
    }

    #[test]
    fn tracked_registers_agree_with_esvm_arch() {
        let mut v = [0u8; VMSA_SIZE];
        for (i, b) in v.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(151).wrapping_add(7);
        }
        let arch = esvm_arch::vmsa::Vmsa::from_bytes(&v).unwrap();
        let t = TrackedRegisters::from_vmsa(&v, 0);
        assert_eq!(
            (t.cr0, t.cr4, t.efer, t.cr8),
            (arch.cr0(), arch.cr4(), arch.efer(), arch.cr8())
        );
    }

    #[test]
    fn extension_round_trip_and_validation() {
        let e = TrackedExtension {
            ap_flags: TrackedExtension::HALTED,
            apic_base: 0xfee0_0800,
            ghcb_gpa: 0x7000,
        };
        let b = e.to_bytes();
        assert_eq!(TrackedExtension::from_bytes(&b).unwrap(), e);
        let mut bad = b;
        bad[0] = 2;
        assert!(TrackedExtension::from_bytes(&bad).is_err());
        let mut bad = b;
        bad[30] = 1;
        assert!(TrackedExtension::from_bytes(&bad).is_err());
        let mut bad = b;
        bad[4] = 0x80;
        assert!(TrackedExtension::from_bytes(&bad).is_err());
    }
}
