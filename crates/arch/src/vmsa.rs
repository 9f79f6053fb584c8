//! The SEV-ES VM save area (VMSA): one 4 KiB page holding a protected vCPU's state.
//!
//! Offsets follow AMD APM vol. 2 table B-4 / Linux `struct sev_es_save_area` (see
//! ../shared/REFERENCE.md). [`Vmsa`] wraps the raw page so that a page read in and written
//! back is byte-identical, reserved bytes included; typed accessors read and write fields in
//! place. CR8 is deliberately absent from the architectural layout: its value lives in
//! `vintr_ctrl` bits 7:0 (V_TPR), which is where the software vCPU keeps it.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::{
    DebugRegs, DescriptorTable, FpuState, MsrState, Regs, Segment, SegmentAttributes, SpecialRegs,
};

pub const VMSA_SIZE: usize = 4096;

/// Byte offsets of VMSA fields.
pub mod offset {
    pub const ES: usize = 0x000;
    pub const CS: usize = 0x010;
    pub const SS: usize = 0x020;
    pub const DS: usize = 0x030;
    pub const FS: usize = 0x040;
    pub const GS: usize = 0x050;
    pub const GDTR: usize = 0x060;
    pub const LDTR: usize = 0x070;
    pub const IDTR: usize = 0x080;
    pub const TR: usize = 0x090;
    pub const CPL: usize = 0x0cb;
    pub const EFER: usize = 0x0d0;
    pub const XSS: usize = 0x140;
    pub const CR4: usize = 0x148;
    pub const CR3: usize = 0x150;
    pub const CR0: usize = 0x158;
    pub const DR7: usize = 0x160;
    pub const DR6: usize = 0x168;
    pub const RFLAGS: usize = 0x170;
    pub const RIP: usize = 0x178;
    pub const DR0: usize = 0x180;
    pub const DR1: usize = 0x188;
    pub const DR2: usize = 0x190;
    pub const DR3: usize = 0x198;
    pub const RSP: usize = 0x1d8;
    pub const RAX: usize = 0x1f8;
    pub const STAR: usize = 0x200;
    pub const LSTAR: usize = 0x208;
    pub const CSTAR: usize = 0x210;
    pub const SFMASK: usize = 0x218;
    pub const KERNEL_GS_BASE: usize = 0x220;
    pub const SYSENTER_CS: usize = 0x228;
    pub const SYSENTER_ESP: usize = 0x230;
    pub const SYSENTER_EIP: usize = 0x238;
    pub const CR2: usize = 0x240;
    pub const G_PAT: usize = 0x268;
    pub const PKRU: usize = 0x2e8;
    pub const TSC_AUX: usize = 0x2ec;
    pub const RCX: usize = 0x308;
    pub const RDX: usize = 0x310;
    pub const RBX: usize = 0x318;
    pub const RBP: usize = 0x328;
    pub const RSI: usize = 0x330;
    pub const RDI: usize = 0x338;
    pub const R8: usize = 0x340;
    pub const R15: usize = 0x378;
    pub const GUEST_EXIT_INFO_1: usize = 0x390;
    pub const GUEST_EXIT_INFO_2: usize = 0x398;
    pub const GUEST_EXIT_INT_INFO: usize = 0x3a0;
    pub const GUEST_NRIP: usize = 0x3a8;
    pub const SEV_FEATURES: usize = 0x3b0;
    /// Virtual interrupt control; bits 7:0 are V_TPR (the guest's CR8).
    pub const VINTR_CTRL: usize = 0x3b8;
    pub const GUEST_EXIT_CODE: usize = 0x3c0;
    pub const EVENT_INJ: usize = 0x3e0;
    pub const XCR0: usize = 0x3e8;
    pub const X87_DP: usize = 0x400;
    pub const MXCSR: usize = 0x408;
    pub const X87_FTW: usize = 0x40c;
    pub const X87_FSW: usize = 0x40e;
    pub const X87_FCW: usize = 0x410;
    pub const X87_FOP: usize = 0x412;
    pub const X87_DS: usize = 0x414;
    pub const X87_CS: usize = 0x416;
    pub const X87_RIP: usize = 0x418;
    /// ST0..ST7, 10 bytes each, packed.
    pub const FPREG_X87: usize = 0x420;
    /// XMM0..XMM15, 16 bytes each.
    pub const FPREG_XMM: usize = 0x470;
    /// Upper halves of YMM0..YMM15.
    pub const FPREG_YMM: usize = 0x570;
    /// First byte after the architectural save area (Linux: 1648 bytes).
    pub const END: usize = 0x670;

    /// GPR offsets in x86 encoding order (RSP's slot is 0x1D8, not the reserved 0x320).
    pub const GPRS: [usize; 16] = [
        RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI, R8, 0x348, 0x350, 0x358, 0x360, 0x368, 0x370, R15,
    ];
}

/// The VMSA `sev_features` bit that marks a save area as an SEV-ES one (SNP would add more).
pub const SEV_FEATURE_ES: u64 = 0;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum VmsaError {
    #[error("a VMSA is exactly {VMSA_SIZE} bytes, got {0}; pass one whole 4 KiB page")]
    BadLength(usize),
}

/// A VMSA page. Cloning copies the page.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vmsa {
    #[serde(with = "page_serde")]
    page: Box<[u8; VMSA_SIZE]>,
}

impl std::fmt::Debug for Vmsa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vmsa")
            .field("rip", &format_args!("{:#x}", self.u64_at(offset::RIP)))
            .field("cr0", &format_args!("{:#x}", self.u64_at(offset::CR0)))
            .field("efer", &format_args!("{:#x}", self.u64_at(offset::EFER)))
            .finish_non_exhaustive()
    }
}

impl Default for Vmsa {
    fn default() -> Self {
        Vmsa {
            page: Box::new([0; VMSA_SIZE]),
        }
    }
}

mod page_serde {
    use super::VMSA_SIZE;
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(p: &[u8; VMSA_SIZE], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&p[..])
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Box<[u8; VMSA_SIZE]>, D::Error> {
        let v: Vec<u8> = Vec::deserialize(d)?;
        let len = v.len();
        v.into_boxed_slice().try_into().map_err(|_| {
            D::Error::custom(format!("VMSA page must be {VMSA_SIZE} bytes, got {len}"))
        })
    }
}

impl Vmsa {
    /// Wrap raw page bytes (e.g. a decrypted page).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, VmsaError> {
        let page: [u8; VMSA_SIZE] = bytes
            .try_into()
            .map_err(|_| VmsaError::BadLength(bytes.len()))?;
        Ok(Vmsa {
            page: Box::new(page),
        })
    }

    pub fn as_bytes(&self) -> &[u8; VMSA_SIZE] {
        &self.page
    }

    pub fn to_bytes(&self) -> [u8; VMSA_SIZE] {
        *self.page
    }

    pub fn u8_at(&self, off: usize) -> u8 {
        self.page[off]
    }
    pub fn u16_at(&self, off: usize) -> u16 {
        u16::from_le_bytes(self.page[off..off + 2].try_into().unwrap())
    }
    pub fn u32_at(&self, off: usize) -> u32 {
        u32::from_le_bytes(self.page[off..off + 4].try_into().unwrap())
    }
    pub fn u64_at(&self, off: usize) -> u64 {
        u64::from_le_bytes(self.page[off..off + 8].try_into().unwrap())
    }
    pub fn set_u8(&mut self, off: usize, v: u8) {
        self.page[off] = v;
    }
    pub fn set_u16(&mut self, off: usize, v: u16) {
        self.page[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }
    pub fn set_u32(&mut self, off: usize, v: u32) {
        self.page[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }
    pub fn set_u64(&mut self, off: usize, v: u64) {
        self.page[off..off + 8].copy_from_slice(&v.to_le_bytes());
    }

    /// A segment in VMCB format: selector u16, attrib u16, limit u32, base u64.
    pub fn segment(&self, off: usize) -> Segment {
        Segment {
            selector: self.u16_at(off),
            attrib: SegmentAttributes(self.u16_at(off + 2)),
            limit: self.u32_at(off + 4),
            base: self.u64_at(off + 8),
        }
    }
    pub fn set_segment(&mut self, off: usize, s: &Segment) {
        self.set_u16(off, s.selector);
        self.set_u16(off + 2, s.attrib.0);
        self.set_u32(off + 4, s.limit);
        self.set_u64(off + 8, s.base);
    }
    fn table(&self, off: usize) -> DescriptorTable {
        DescriptorTable {
            base: self.u64_at(off + 8),
            limit: self.u32_at(off + 4) as u16,
        }
    }
    fn set_table(&mut self, off: usize, t: &DescriptorTable) {
        self.set_u16(off, 0);
        self.set_u16(off + 2, 0);
        self.set_u32(off + 4, t.limit as u32);
        self.set_u64(off + 8, t.base);
    }

    pub fn cr0(&self) -> u64 {
        self.u64_at(offset::CR0)
    }
    pub fn cr4(&self) -> u64 {
        self.u64_at(offset::CR4)
    }
    pub fn efer(&self) -> u64 {
        self.u64_at(offset::EFER)
    }
    /// CR8 as kept in V_TPR (vintr_ctrl bits 7:0 hold TPR bits 3:0 in the low nibble).
    pub fn cr8(&self) -> u64 {
        self.u64_at(offset::VINTR_CTRL) & 0xf
    }
    pub fn set_cr8(&mut self, cr8: u64) {
        let v = self.u64_at(offset::VINTR_CTRL) & !0xff;
        self.set_u64(offset::VINTR_CTRL, v | (cr8 & 0xf));
    }
    pub fn sev_features(&self) -> u64 {
        self.u64_at(offset::SEV_FEATURES)
    }

    pub fn regs(&self) -> Regs {
        let mut r = Regs::default();
        for (i, off) in offset::GPRS.iter().enumerate() {
            r.gpr[i] = self.u64_at(*off);
        }
        r.rip = self.u64_at(offset::RIP);
        r.rflags = self.u64_at(offset::RFLAGS);
        r
    }
    pub fn set_regs(&mut self, r: &Regs) {
        for (i, off) in offset::GPRS.iter().enumerate() {
            self.set_u64(*off, r.gpr[i]);
        }
        self.set_u64(offset::RIP, r.rip);
        self.set_u64(offset::RFLAGS, r.rflags);
    }

    /// Special registers; `apic_base` is not part of the VMSA and is returned as 0.
    pub fn sregs(&self) -> SpecialRegs {
        SpecialRegs {
            es: self.segment(offset::ES),
            cs: self.segment(offset::CS),
            ss: self.segment(offset::SS),
            ds: self.segment(offset::DS),
            fs: self.segment(offset::FS),
            gs: self.segment(offset::GS),
            ldt: self.segment(offset::LDTR),
            tr: self.segment(offset::TR),
            gdt: self.table(offset::GDTR),
            idt: self.table(offset::IDTR),
            cr0: self.cr0(),
            cr2: self.u64_at(offset::CR2),
            cr3: self.u64_at(offset::CR3),
            cr4: self.cr4(),
            cr8: self.cr8(),
            efer: self.efer(),
            apic_base: 0,
        }
    }
    pub fn set_sregs(&mut self, s: &SpecialRegs) {
        self.set_segment(offset::ES, &s.es);
        self.set_segment(offset::CS, &s.cs);
        self.set_segment(offset::SS, &s.ss);
        self.set_segment(offset::DS, &s.ds);
        self.set_segment(offset::FS, &s.fs);
        self.set_segment(offset::GS, &s.gs);
        self.set_segment(offset::LDTR, &s.ldt);
        self.set_segment(offset::TR, &s.tr);
        self.set_table(offset::GDTR, &s.gdt);
        self.set_table(offset::IDTR, &s.idt);
        self.set_u64(offset::CR0, s.cr0);
        self.set_u64(offset::CR2, s.cr2);
        self.set_u64(offset::CR3, s.cr3);
        self.set_u64(offset::CR4, s.cr4);
        self.set_cr8(s.cr8);
        self.set_u64(offset::EFER, s.efer);
        // CPL is the DPL of SS in protected/long mode.
        self.set_u8(offset::CPL, s.ss.attrib.dpl());
    }

    pub fn msrs(&self) -> MsrState {
        MsrState {
            star: self.u64_at(offset::STAR),
            lstar: self.u64_at(offset::LSTAR),
            cstar: self.u64_at(offset::CSTAR),
            sfmask: self.u64_at(offset::SFMASK),
            kernel_gs_base: self.u64_at(offset::KERNEL_GS_BASE),
            sysenter_cs: self.u64_at(offset::SYSENTER_CS),
            sysenter_esp: self.u64_at(offset::SYSENTER_ESP),
            sysenter_eip: self.u64_at(offset::SYSENTER_EIP),
            pat: self.u64_at(offset::G_PAT),
            tsc_aux: self.u32_at(offset::TSC_AUX) as u64,
            // Not in the VMSA: the hypervisor emulates the MTRRs of an SEV-ES guest.
            mtrr: Default::default(),
        }
    }
    pub fn set_msrs(&mut self, m: &MsrState) {
        self.set_u64(offset::STAR, m.star);
        self.set_u64(offset::LSTAR, m.lstar);
        self.set_u64(offset::CSTAR, m.cstar);
        self.set_u64(offset::SFMASK, m.sfmask);
        self.set_u64(offset::KERNEL_GS_BASE, m.kernel_gs_base);
        self.set_u64(offset::SYSENTER_CS, m.sysenter_cs);
        self.set_u64(offset::SYSENTER_ESP, m.sysenter_esp);
        self.set_u64(offset::SYSENTER_EIP, m.sysenter_eip);
        self.set_u64(offset::G_PAT, m.pat);
        self.set_u32(offset::TSC_AUX, m.tsc_aux as u32);
    }

    pub fn debug(&self) -> DebugRegs {
        DebugRegs {
            db: [
                self.u64_at(offset::DR0),
                self.u64_at(offset::DR1),
                self.u64_at(offset::DR2),
                self.u64_at(offset::DR3),
            ],
            dr6: self.u64_at(offset::DR6),
            dr7: self.u64_at(offset::DR7),
        }
    }
    pub fn set_debug(&mut self, d: &DebugRegs) {
        self.set_u64(offset::DR0, d.db[0]);
        self.set_u64(offset::DR1, d.db[1]);
        self.set_u64(offset::DR2, d.db[2]);
        self.set_u64(offset::DR3, d.db[3]);
        self.set_u64(offset::DR6, d.dr6);
        self.set_u64(offset::DR7, d.dr7);
    }

    /// x87/SSE state. The VMSA keeps the x87 registers packed (10 bytes each) and has no
    /// MXCSR_MASK; the mask is returned as the architectural default.
    pub fn fpu(&self) -> FpuState {
        let mut f = FpuState {
            fcw: self.u16_at(offset::X87_FCW),
            fsw: self.u16_at(offset::X87_FSW),
            ftw: self.u16_at(offset::X87_FTW) as u8,
            fop: self.u16_at(offset::X87_FOP),
            fip: self.u64_at(offset::X87_RIP),
            fdp: self.u64_at(offset::X87_DP),
            mxcsr: self.u32_at(offset::MXCSR),
            mxcsr_mask: FpuState::default().mxcsr_mask,
            ..FpuState::default()
        };
        for i in 0..8 {
            let o = offset::FPREG_X87 + 10 * i;
            f.st[i][..10].copy_from_slice(&self.page[o..o + 10]);
        }
        for i in 0..16 {
            let o = offset::FPREG_XMM + 16 * i;
            f.xmm[i].copy_from_slice(&self.page[o..o + 16]);
        }
        f
    }
    pub fn set_fpu(&mut self, f: &FpuState) {
        self.set_u16(offset::X87_FCW, f.fcw);
        self.set_u16(offset::X87_FSW, f.fsw);
        self.set_u16(offset::X87_FTW, f.ftw as u16);
        self.set_u16(offset::X87_FOP, f.fop);
        self.set_u64(offset::X87_RIP, f.fip);
        self.set_u64(offset::X87_DP, f.fdp);
        self.set_u32(offset::MXCSR, f.mxcsr);
        for i in 0..8 {
            let o = offset::FPREG_X87 + 10 * i;
            self.page[o..o + 10].copy_from_slice(&f.st[i][..10]);
        }
        for i in 0..16 {
            let o = offset::FPREG_XMM + 16 * i;
            self.page[o..o + 16].copy_from_slice(&f.xmm[i]);
        }
    }

    pub fn xcr0(&self) -> u64 {
        self.u64_at(offset::XCR0)
    }
    pub fn set_xcr0(&mut self, v: u64) {
        self.set_u64(offset::XCR0, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::VcpuSnapshot;

    /// The GHCB mirrors the save area for the registers it exchanges (GHCB specification:
    /// "the GHCB save area has the same layout as the VMSA").
    #[test]
    fn ghcb_register_offsets_are_the_vmsa_ones() {
        use esvm_abi::ghcb::save_area as g;
        for (ghcb, vmsa) in [
            (g::CPL, offset::CPL),
            (g::XSS, offset::XSS),
            (g::DR7, offset::DR7),
            (g::RAX, offset::RAX),
            (g::RCX, offset::RCX),
            (g::RDX, offset::RDX),
            (g::RBX, offset::RBX),
            (g::RSI, offset::RSI),
            (g::XCR0, offset::XCR0),
        ] {
            assert_eq!(ghcb, vmsa);
        }
    }

    /// Offsets as listed in ../shared/REFERENCE.md ("VMSA — selected offsets").
    #[test]
    fn offsets_match_reference() {
        let expected: &[(usize, usize)] = &[
            (offset::ES, 0x000),
            (offset::CS, 0x010),
            (offset::SS, 0x020),
            (offset::DS, 0x030),
            (offset::FS, 0x040),
            (offset::GS, 0x050),
            (offset::GDTR, 0x060),
            (offset::LDTR, 0x070),
            (offset::IDTR, 0x080),
            (offset::TR, 0x090),
            (offset::CPL, 0x0cb),
            (offset::EFER, 0x0d0),
            (offset::CR4, 0x148),
            (offset::CR3, 0x150),
            (offset::CR0, 0x158),
            (offset::DR7, 0x160),
            (offset::DR6, 0x168),
            (offset::RFLAGS, 0x170),
            (offset::RIP, 0x178),
            (offset::RSP, 0x1d8),
            (offset::RAX, 0x1f8),
            (offset::STAR, 0x200),
            (offset::LSTAR, 0x208),
            (offset::CSTAR, 0x210),
            (offset::SFMASK, 0x218),
            (offset::KERNEL_GS_BASE, 0x220),
            (offset::SYSENTER_CS, 0x228),
            (offset::SYSENTER_ESP, 0x230),
            (offset::SYSENTER_EIP, 0x238),
            (offset::CR2, 0x240),
            (offset::G_PAT, 0x268),
            (offset::RCX, 0x308),
            (offset::RDX, 0x310),
            (offset::RBX, 0x318),
            (offset::RBP, 0x328),
            (offset::RSI, 0x330),
            (offset::RDI, 0x338),
            (offset::R8, 0x340),
            (offset::R15, 0x378),
            (offset::SEV_FEATURES, 0x3b0),
            (offset::XCR0, 0x3e8),
        ];
        for (got, want) in expected {
            assert_eq!(got, want);
        }
        // R8..R15 are contiguous quadwords.
        for i in 8..16 {
            assert_eq!(offset::GPRS[i], offset::R8 + 8 * (i - 8));
        }
        assert_eq!(offset::END, 1648);
        assert_eq!(offset::FPREG_XMM, offset::FPREG_X87 + 80);
        assert_eq!(offset::FPREG_YMM, offset::FPREG_XMM + 256);
    }

    #[test]
    fn bytes_roundtrip_exactly() {
        let mut raw = [0u8; VMSA_SIZE];
        for (i, b) in raw.iter_mut().enumerate() {
            *b = (i * 7 + 3) as u8;
        }
        let v = Vmsa::from_bytes(&raw).unwrap();
        assert_eq!(v.to_bytes(), raw);
        assert_eq!(
            Vmsa::from_bytes(&raw[..100]).unwrap_err(),
            VmsaError::BadLength(100)
        );
    }

    #[test]
    fn state_roundtrips_through_the_page() {
        let mut s = VcpuSnapshot::reset();
        for (i, g) in s.regs.gpr.iter_mut().enumerate() {
            *g = 0x0111_0000_0000_0000u64.wrapping_mul(i as u64 + 1) + i as u64;
        }
        s.regs.rip = 0x20_1000;
        s.sregs.cr0 = 0x8005_0033;
        s.sregs.cr8 = 0x9;
        s.sregs.efer = 0xd01;
        s.msrs.lstar = 0xffff_8000_0000_1000;
        s.fpu.xmm[7] = [0x5a; 16];
        s.fpu.st[3][..10].copy_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
        s.debug.db[2] = 0x4000;
        let mut v = Vmsa::default();
        v.set_regs(&s.regs);
        v.set_sregs(&s.sregs);
        v.set_msrs(&s.msrs);
        v.set_fpu(&s.fpu);
        v.set_debug(&s.debug);
        assert_eq!(v.regs(), s.regs);
        let mut sr = s.sregs;
        sr.apic_base = 0;
        assert_eq!(v.sregs(), sr);
        assert_eq!(v.msrs(), s.msrs);
        assert_eq!(v.fpu(), s.fpu);
        assert_eq!(v.debug(), s.debug);
        assert_eq!(v.u64_at(0x1f8), s.regs.gpr[0]);
        assert_eq!(v.u64_at(0x1d8), s.regs.gpr[4]);
        assert_eq!(v.u64_at(0x3b8) & 0xff, 9);
        assert_eq!(v.u64_at(0x320), 0, "the reserved RSP slot stays untouched");
    }
}
