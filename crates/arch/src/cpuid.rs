//! CPUID tables: what a vCPU reports for each leaf/subleaf.

use serde::{Deserialize, Serialize};

/// One CPUID leaf (and subleaf, when `indexed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidEntry {
    pub function: u32,
    pub index: u32,
    /// Whether `index` (ECX on input) selects among several entries for `function`.
    pub indexed: bool,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// A configurable CPUID table. Lookups of absent leaves return zeros, as AMD CPUs do for
/// leaves beyond the reported maximum.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidTable {
    pub entries: Vec<CpuidEntry>,
}

fn regs_of(s: &[u8; 12]) -> (u32, u32, u32) {
    let w = |i: usize| u32::from_le_bytes(s[i..i + 4].try_into().unwrap());
    (w(0), w(4), w(8))
}

impl CpuidTable {
    /// Look up (eax, ebx, ecx, edx) for `function`/`index`.
    pub fn lookup(&self, function: u32, index: u32) -> [u32; 4] {
        self.entries
            .iter()
            .find(|e| e.function == function && (!e.indexed || e.index == index))
            .map(|e| [e.eax, e.ebx, e.ecx, e.edx])
            .unwrap_or([0; 4])
    }

    /// Insert or replace an entry.
    pub fn set(&mut self, entry: CpuidEntry) {
        self.entries
            .retain(|e| !(e.function == entry.function && (!e.indexed || e.index == entry.index)));
        self.entries.push(entry);
    }

    /// This table with a local APIC advertised (leaf 1 and 0x8000_0001 EDX bit 9), and
    /// optionally x2APIC (leaf 1 ECX bit 21) and the TSC-deadline timer (leaf 1 ECX bit 24):
    /// for machines whose VMM models them (`esvm_devices::lapic`).
    pub fn with_local_apic(mut self, x2apic: bool, tsc_deadline: bool) -> Self {
        for e in &mut self.entries {
            match e.function {
                1 => {
                    e.edx |= 1 << 9;
                    if x2apic {
                        e.ecx |= 1 << 21;
                    }
                    if tsc_deadline {
                        e.ecx |= 1 << 24;
                    }
                }
                0x8000_0001 => e.edx |= 1 << 9,
                _ => {}
            }
        }
        self
    }

    /// This table describing `vcpus` vCPUs as one package of `vcpus` cores with one thread
    /// each, the APIC ID being the core number, and a TSC that runs at the same rate on
    /// every vCPU (invariant TSC): for machines whose VMM starts APs (INIT-SIPI) and keeps
    /// the vCPUs' TSCs on one clock. Every place that tells the topology agrees: leaf 1
    /// EBX[23:16] (logical processors; HTT set, with AMD's CmpLegacy), leaf 0xB (x2APIC
    /// topology: an SMT level of 1 thread and a core level of `vcpus`), 0x8000_0008 ECX (NC =
    /// `vcpus` - 1, APIC ID core bits) and 0x8000_0007 EDX bit 8 (invariant TSC). The
    /// per-vCPU parts (the APIC IDs) come with [`CpuidTable::for_vcpu`].
    pub fn with_topology(mut self, vcpus: u32) -> Self {
        let n = vcpus.clamp(1, 255);
        // Bits of the APIC ID that number the cores.
        let core_bits = u32::BITS - (n - 1).leading_zeros();
        for e in &mut self.entries {
            match e.function {
                1 => {
                    e.ebx = (e.ebx & !0x00ff_0000) | (n << 16);
                    e.edx |= 1 << 28;
                }
                0x8000_0001 => e.ecx |= 1 << 1,
                0x8000_0008 => e.ecx = (core_bits << 12) | (n - 1),
                _ => {}
            }
        }
        self.entries
            .retain(|e| !matches!(e.function, 0xb | 0x8000_0007));
        // Leaf 0xB: subleaf 0 = SMT (type 1), 1 = core (type 2), 2 = invalid (type 0).
        self.entries.push(entry(0xb, 0, true, 0, 1, 1 << 8, 0));
        self.entries
            .push(entry(0xb, 1, true, core_bits, n, (2 << 8) | 1, 0));
        self.entries.push(entry(0xb, 2, true, 0, 0, 2, 0));
        self.entries
            .push(entry(0x8000_0007, 0, false, 0, 0, 0, 1 << 8));
        self
    }

    /// This table as vCPU `id` (its APIC ID) reports it: leaf 1 EBX[31:24] (initial APIC
    /// ID) and leaf 0xB EDX (x2APIC ID).
    pub fn for_vcpu(mut self, id: u32) -> Self {
        for e in &mut self.entries {
            match e.function {
                1 => e.ebx = (e.ebx & 0x00ff_ffff) | ((id & 0xff) << 24),
                0xb | 0x1f => e.edx = id,
                _ => {}
            }
        }
        self
    }

    /// Vendor and family/model/stepping this table reports.
    pub fn signature(&self) -> CpuSignature {
        CpuSignature::from_leaves(self.lookup(0, 0), self.lookup(1, 0)[0])
    }

    /// The CPU esvm's software vCPU models: an "AuthenticAMD" family 17h x86-64 part with the
    /// integer ISA, x87, SSE/SSE2, FXSR (+FFXSR), CX8/CX16, POPCNT, LZCNT, MOVBE, BMI1
    /// (TZCNT), RDRAND/RDSEED, CLFLUSHOPT/CLWB, PREFETCHW, SYSCALL, NX, RDTSCP and 1 GiB
    /// pages, and nothing it does not implement (no local APIC: that is the VMM's, see
    /// [`CpuidTable::with_local_apic`]; no AVX, no XSAVE beyond XCR0 access).
    pub fn esvm_default() -> Self {
        let (b, d, c) = {
            // Vendor string order is EBX, EDX, ECX.
            let (x, y, z) = regs_of(b"AuthenticAMD");
            (x, y, z)
        };
        let mut entries = vec![
            entry(0, 0, false, 0xd, b, c, d),
            // Family 0x17 (0xf + ext 0x8), model 1, stepping 0.
            entry(
                1,
                0,
                false,
                0x0080_0f10,
                0x0001_0800, // CLFLUSH line 8*8 = 64 bytes, 1 logical processor
                ecx1(),
                edx1(),
            ),
            // BMI1 (3), RDSEED (18), CLFLUSHOPT (23), CLWB (24).
            entry(
                7,
                0,
                true,
                0,
                (1 << 3) | (1 << 18) | (1 << 23) | (1 << 24),
                0,
                0,
            ),
            entry(0xd, 0, true, 0x3, 512 + 64, 512 + 64, 0),
            entry(0x8000_0000, 0, false, 0x8000_0021, b, c, d),
            entry(
                0x8000_0001,
                0,
                false,
                0x0080_0f10,
                0,
                // LAHF/SAHF in 64-bit, ABM (LZCNT), PREFETCH/PREFETCHW (8); SSE4A (6) off.
                (1 << 0) | (1 << 5) | (1 << 8),
                // SYSCALL, NX, FFXSR (25), 1 GiB pages, RDTSCP, LM.
                (1 << 11)
                    | (1 << 20)
                    | (1 << 25)
                    | (1 << 26)
                    | (1 << 27)
                    | (1 << 29)
                    | edx1_shared(),
            ),
            // Address sizes: 48 virtual, 48 physical. EBX bit 2 (XSaveErPtr, as on every Zen
            // part): FXSAVE always stores the x87 error pointers; without it Linux works around
            // the "FXSAVE leak" with `fnclex; emms; fild` on every FPU restore. EBX bit 26
            // (SSB_NO): an interpreter has no speculative store bypass.
            entry(0x8000_0008, 0, false, 0x3030, (1 << 2) | (1 << 26), 0, 0),
            // AMD memory encryption (SEV): nothing on a plain vCPU. For an SEV-ES guest the
            // hypervisor answers this leaf (the guest's CPUID is a #VC event) with EAX bit 1
            // (SEV) and bit 3 (SEV-ES), EBX[5:0] = the C-bit position and EBX[11:6] = the
            // physical-address bits lost to it.
            entry(0x8000_001f, 0, false, 0, 0, 0, 0),
            // Extended feature 2: SRSO_NO (EAX bit 29). An interpreter does not speculate, so
            // no speculative-return-stack attack applies (KVM reports the bit the same way on
            // unaffected hosts); without it Linux warns about missing microcode.
            entry(0x8000_0021, 0, false, 1 << 29, 0, 0, 0),
        ];
        let brand = b"esvm software vCPU (emulated)\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0";
        for i in 0..3u32 {
            let chunk = &brand[16 * i as usize..16 * i as usize + 16];
            let w = |j: usize| u32::from_le_bytes(chunk[j..j + 4].try_into().unwrap());
            entries.push(entry(0x8000_0002 + i, 0, false, w(0), w(4), w(8), w(12)));
        }
        CpuidTable { entries }
    }
}

/// Vendor and family/model/stepping as CPUID leaves 0 and 1 report them (AMD APM vol. 3,
/// "CPUID Fn0000_0001_EAX"; Intel SDM vol. 2, CPUID leaf 1): the displayed family adds the
/// extended family only when the base family is 0xF; the displayed model takes the extended
/// model when the base family is 0xF (both vendors) or 6 (Intel's family 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuSignature {
    /// The 12-byte vendor string ("AuthenticAMD", "GenuineIntel", ...).
    pub vendor: [u8; 12],
    pub family: u32,
    pub model: u32,
    pub stepping: u32,
}

impl CpuSignature {
    /// Decode leaf 0 (EBX, EDX, ECX: the vendor) and leaf 1 EAX (the signature).
    pub fn from_leaves(leaf0: [u32; 4], leaf1_eax: u32) -> Self {
        let mut vendor = [0u8; 12];
        for (i, r) in [leaf0[1], leaf0[3], leaf0[2]].iter().enumerate() {
            vendor[4 * i..4 * i + 4].copy_from_slice(&r.to_le_bytes());
        }
        let base_family = (leaf1_eax >> 8) & 0xf;
        let base_model = (leaf1_eax >> 4) & 0xf;
        let family = if base_family == 0xf {
            base_family + ((leaf1_eax >> 20) & 0xff)
        } else {
            base_family
        };
        let model = if base_family == 0xf || base_family == 6 {
            base_model | (((leaf1_eax >> 16) & 0xf) << 4)
        } else {
            base_model
        };
        CpuSignature {
            vendor,
            family,
            model,
            stepping: leaf1_eax & 0xf,
        }
    }

    /// The signature of the CPU this process runs on.
    #[cfg(target_arch = "x86_64")]
    pub fn host() -> Self {
        use core::arch::x86_64::__cpuid;
        let l0 = __cpuid(0);
        let l1 = __cpuid(1);
        Self::from_leaves([l0.eax, l0.ebx, l0.ecx, l0.edx], l1.eax)
    }

    /// The vendor string, lossily as text.
    pub fn vendor_str(&self) -> String {
        String::from_utf8_lossy(&self.vendor).into_owned()
    }

    /// Same vendor and family (the unit whose undefined results esvm models).
    pub fn same_family(&self, other: &CpuSignature) -> bool {
        self.vendor == other.vendor && self.family == other.family
    }
}

impl std::fmt::Display for CpuSignature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} family {:#x} model {:#x} stepping {}",
            self.vendor_str(),
            self.family,
            self.model,
            self.stepping
        )
    }
}

fn entry(
    function: u32,
    index: u32,
    indexed: bool,
    eax: u32,
    ebx: u32,
    ecx: u32,
    edx: u32,
) -> CpuidEntry {
    CpuidEntry {
        function,
        index,
        indexed,
        eax,
        ebx,
        ecx,
        edx,
    }
}

/// Leaf 1 ECX: SSE3 off, CX16 (13), MOVBE (22), POPCNT (23), RDRAND (30), hypervisor
/// present (31).
fn ecx1() -> u32 {
    (1 << 13) | (1 << 22) | (1 << 23) | (1 << 30) | (1 << 31)
}

/// Leaf 1 EDX: FPU, DE, PSE, TSC, MSR, PAE, MCE, CX8, SEP, MTRR, PGE, CMOV, PAT, CLFSH,
/// MMX, FXSR, SSE, SSE2. No APIC (bit 9) here: the vCPU itself has no local APIC; a VMM that
/// models one adds the bit with [`CpuidTable::with_local_apic`] (without it a guest keeps the
/// 8259, Linux: "APIC: Keep in PIC mode(8259)"). The
/// MTRRs (bit 12) hold what the guest writes (no caches, no effect); Linux 6.1 sets up PAT
/// only with MTRRs enabled, and an SEV guest needs PAT's write-protect type.
fn edx1() -> u32 {
    (1 << 0)
        | (1 << 2)
        | (1 << 3)
        | (1 << 4)
        | (1 << 5)
        | (1 << 6)
        | (1 << 7)
        | (1 << 8)
        | (1 << 11)
        | (1 << 12)
        | (1 << 13)
        | (1 << 15)
        | (1 << 16)
        | (1 << 19)
        | (1 << 23)
        | (1 << 24)
        | (1 << 25)
        | (1 << 26)
}

/// AMD repeats some leaf-1 EDX bits in 0x8000_0001 EDX.
fn edx1_shared() -> u32 {
    edx1() & 0x0183_f3ff
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vendor_and_long_mode() {
        let t = CpuidTable::esvm_default();
        let [_, b, c, d] = t.lookup(0, 0);
        let mut v = Vec::new();
        for r in [b, d, c] {
            v.extend_from_slice(&r.to_le_bytes());
        }
        assert_eq!(&v, b"AuthenticAMD");
        let [_, _, _, edx] = t.lookup(0x8000_0001, 0);
        assert_ne!(edx & (1 << 29), 0, "LM");
        assert_ne!(edx & (1 << 20), 0, "NX");
        assert_eq!(t.lookup(0x4000_0000, 0), [0; 4]);
        // The SEV leaf exists (within the reported range) for the hypervisor to fill.
        assert!(t.lookup(0x8000_0000, 0)[0] >= 0x8000_001f);
        assert!(t.entries.iter().any(|e| e.function == 0x8000_001f));
        // No local APIC is modelled: neither leaf advertises one.
        assert_eq!(t.lookup(1, 0)[3] & (1 << 9), 0);
        assert_eq!(t.lookup(0x8000_0001, 0)[3] & (1 << 9), 0);
    }

    #[test]
    fn the_default_table_is_an_amd_family_17h_part() {
        let s = CpuidTable::esvm_default().signature();
        assert_eq!(&s.vendor, b"AuthenticAMD");
        assert_eq!((s.family, s.model, s.stepping), (0x17, 1, 0));
        assert_eq!(
            s.to_string(),
            "AuthenticAMD family 0x17 model 0x1 stepping 0"
        );
    }

    #[test]
    fn signatures_decode_extended_family_only_for_base_family_f() {
        let amd = [0xd, 0x6874_7541, 0x444d_4163, 0x6974_6e65];
        // Zen 3 (EPYC 7003): family 0x19, model 0x01.
        let z3 = CpuSignature::from_leaves(amd, 0x00a0_0f11);
        assert_eq!((z3.family, z3.model, z3.stepping), (0x19, 0x01, 1));
        // An Intel family-6 part (Sapphire Rapids, model 0x8f): the extended model counts.
        let intel =
            CpuSignature::from_leaves([0x1b, 0x756e_6547, 0x6c65_746e, 0x4965_6e69], 0x0008_06f8);
        assert_eq!(&intel.vendor, b"GenuineIntel");
        assert_eq!((intel.family, intel.model), (6, 0x8f));
        assert!(!intel.same_family(&z3));
    }

    #[test]
    fn local_apic_bits() {
        let t = CpuidTable::esvm_default().with_local_apic(true, false);
        assert_ne!(t.lookup(1, 0)[3] & (1 << 9), 0);
        assert_ne!(t.lookup(0x8000_0001, 0)[3] & (1 << 9), 0);
        assert_ne!(t.lookup(1, 0)[2] & (1 << 21), 0);
        assert_eq!(t.lookup(1, 0)[2] & (1 << 24), 0);
        let t = CpuidTable::esvm_default().with_local_apic(false, true);
        assert_eq!(t.lookup(1, 0)[2] & (1 << 21), 0);
        assert_ne!(t.lookup(1, 0)[2] & (1 << 24), 0);
    }

    #[test]
    fn set_replaces() {
        let mut t = CpuidTable::esvm_default();
        t.set(entry(1, 0, false, 1, 2, 3, 4));
        assert_eq!(t.lookup(1, 0), [1, 2, 3, 4]);
        assert_eq!(t.entries.iter().filter(|e| e.function == 1).count(), 1);
    }

    #[test]
    fn topology_of_four_vcpus_agrees_everywhere() {
        let t = CpuidTable::esvm_default()
            .with_local_apic(true, true)
            .with_topology(4);
        let v = t.clone().for_vcpu(3);
        let l1 = v.lookup(1, 0);
        assert_eq!(l1[1] >> 24, 3, "initial APIC ID");
        assert_eq!((l1[1] >> 16) & 0xff, 4, "logical processors");
        assert_ne!(l1[3] & (1 << 28), 0, "HTT");
        assert_ne!(v.lookup(0x8000_0001, 0)[2] & (1 << 1), 0, "CmpLegacy");
        assert_eq!(v.lookup(0xb, 0), [0, 1, 0x100, 3]);
        assert_eq!(v.lookup(0xb, 1), [2, 4, 0x201, 3]);
        assert_eq!(v.lookup(0xb, 2)[2] >> 8 & 0xff, 0, "no third level");
        assert_eq!(v.lookup(0x8000_0008, 0)[2], (2 << 12) | 3);
        assert_ne!(v.lookup(0x8000_0007, 0)[3] & (1 << 8), 0, "invariant TSC");
        assert!(v.lookup(0, 0)[0] >= 0xb, "leaf 0xB is in range");
        assert!(v.lookup(0x8000_0000, 0)[0] >= 0x8000_0008);
        // Other vCPUs differ only in their APIC IDs.
        assert_eq!(t.clone().for_vcpu(0).lookup(0xb, 1)[3], 0);
        assert_eq!(t.for_vcpu(0).lookup(1, 0)[1] >> 24, 0);
        // Two vCPUs: one core bit; the table stays idempotent.
        let two = CpuidTable::esvm_default().with_topology(4).with_topology(2);
        assert_eq!(two.lookup(0xb, 1), [1, 2, 0x201, 0]);
        assert_eq!(two.lookup(0x8000_0008, 0)[2], (1 << 12) | 1);
        assert_eq!(two.entries.iter().filter(|e| e.function == 0xb).count(), 3);
    }
}
