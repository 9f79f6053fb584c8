//! Translating an esvm [`CpuidTable`] into what KVM_SET_CPUID2 takes.
//!
//! Policy (the esvm table is the specification; the host decides what can be honoured):
//! - Only leaves in the esvm table are exposed. Leaves absent from it (KVM's paravirt leaves
//!   0x4000_00xx included) read as zeros, as the emu backend answers.
//! - Feature-flag words are intersected with KVM_GET_SUPPORTED_CPUID, so the guest is never
//!   told about a feature the host's KVM cannot run (on the software-assisted KVM here that
//!   drops e.g. MOVBE, POPCNT, BMI1, RDTSCP). The words treated as feature flags: leaf 1
//!   ECX/EDX, leaf 7 EBX/ECX/EDX (all subleaves), leaf 0xD subleaf 0 EAX/EDX (XCR0 bits) and
//!   subleaf 1 EAX, leaf 0x8000_0001 ECX/EDX, leaf 0x8000_0007 EDX, leaf 0x8000_0008 EBX.
//!   A feature-flag leaf the host does not list at all is dropped entirely (all flags zero).
//! - Identification and informational values are taken from the esvm table as they are:
//!   vendor and maximum leaves (0, 0x8000_0000), family/model (1 EAX), brand string, cache
//!   and XSAVE-size words. Leaf 1 EBX bits 31:24 (initial APIC ID) are set to the vCPU id.
//! - Leaf 0x8000_0008 EAX: the physical and virtual address widths are clamped to the host's.
//! - Every dropped feature bit is reported in [`CpuidTranslation::dropped`] so callers (and
//!   differential tests against the emu backend) know how the KVM guest's CPU differs.

use esvm_arch::cpuid::{CpuidEntry, CpuidTable};
use kvm_bindings::{kvm_cpuid_entry2, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

/// A CPUID register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuidReg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

/// Feature bits of the esvm table the host's KVM does not support.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DroppedBits {
    pub function: u32,
    pub index: u32,
    pub reg: CpuidReg,
    pub mask: u32,
}

/// The result of [`translate`].
#[derive(Debug, Clone)]
pub struct CpuidTranslation {
    pub entries: Vec<kvm_cpuid_entry2>,
    pub dropped: Vec<DroppedBits>,
}

/// Which registers of a leaf carry feature flags to intersect with the host.
fn feature_regs(function: u32, index: u32) -> &'static [CpuidReg] {
    use CpuidReg::*;
    match (function, index) {
        (1, _) => &[Ecx, Edx],
        (7, _) => &[Ebx, Ecx, Edx],
        (0xd, 0) => &[Eax, Edx],
        (0xd, 1) => &[Eax],
        (0x8000_0001, _) => &[Ecx, Edx],
        (0x8000_0007, _) => &[Edx],
        (0x8000_0008, _) => &[Ebx],
        _ => &[],
    }
}

fn reg(e: &kvm_cpuid_entry2, r: CpuidReg) -> u32 {
    match r {
        CpuidReg::Eax => e.eax,
        CpuidReg::Ebx => e.ebx,
        CpuidReg::Ecx => e.ecx,
        CpuidReg::Edx => e.edx,
    }
}

fn reg_mut(e: &mut kvm_cpuid_entry2, r: CpuidReg) -> &mut u32 {
    match r {
        CpuidReg::Eax => &mut e.eax,
        CpuidReg::Ebx => &mut e.ebx,
        CpuidReg::Ecx => &mut e.ecx,
        CpuidReg::Edx => &mut e.edx,
    }
}

fn find_supported(
    supported: &[kvm_cpuid_entry2],
    function: u32,
    index: u32,
) -> Option<&kvm_cpuid_entry2> {
    supported.iter().find(|s| {
        s.function == function
            && (s.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0 || s.index == index)
    })
}

fn to_kvm(e: &CpuidEntry) -> kvm_cpuid_entry2 {
    kvm_cpuid_entry2 {
        function: e.function,
        index: if e.indexed { e.index } else { 0 },
        flags: if e.indexed {
            KVM_CPUID_FLAG_SIGNIFCANT_INDEX
        } else {
            0
        },
        eax: e.eax,
        ebx: e.ebx,
        ecx: e.ecx,
        edx: e.edx,
        ..Default::default()
    }
}

/// Translate `table` for vCPU `apic_id` given KVM's supported CPUID.
pub fn translate(
    table: &CpuidTable,
    supported: &[kvm_cpuid_entry2],
    apic_id: u32,
) -> CpuidTranslation {
    let mut entries = Vec::with_capacity(table.entries.len());
    let mut dropped = Vec::new();
    for e in &table.entries {
        let mut k = to_kvm(e);
        let host = find_supported(supported, e.function, e.index);
        for &r in feature_regs(e.function, e.index) {
            let host_bits = host.map(|h| reg(h, r)).unwrap_or(0);
            let want = reg(&k, r);
            if want & !host_bits != 0 {
                dropped.push(DroppedBits {
                    function: e.function,
                    index: e.index,
                    reg: r,
                    mask: want & !host_bits,
                });
            }
            *reg_mut(&mut k, r) = want & host_bits;
        }
        if e.function == 1 {
            k.ebx = (k.ebx & 0x00ff_ffff) | ((apic_id & 0xff) << 24);
        }
        if e.function == 0x8000_0008 {
            let host_eax = host.map(|h| h.eax).unwrap_or(0);
            let phys = (k.eax & 0xff).min(host_eax & 0xff);
            let virt = ((k.eax >> 8) & 0xff).min((host_eax >> 8) & 0xff);
            k.eax = (k.eax & !0xffff) | phys | (virt << 8);
        }
        entries.push(k);
    }
    CpuidTranslation { entries, dropped }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(function: u32, index: u32, indexed: bool, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            flags: if indexed {
                KVM_CPUID_FLAG_SIGNIFCANT_INDEX
            } else {
                0
            },
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    #[test]
    fn features_are_intersected_and_reported() {
        let t = CpuidTable::esvm_default();
        let supported = vec![
            host(0, 0, false, [0x1c, 1, 2, 3]),
            // Host lacks MOVBE (ECX 22) but has everything else esvm asks for in leaf 1.
            host(1, 0, false, [0xa10f11, 0x01020800, !(1 << 22), !0]),
            host(7, 0, true, [1, 0, 0, 0]), // no BMI1
            host(0xd, 0, true, [0xe7, 0, 0, 0]),
            host(0x8000_0001, 0, false, [0, 0, !0, !0]),
            host(0x8000_0008, 0, false, [0x302b, 0, 0, 0]),
        ];
        let tr = translate(&t, &supported, 3);
        let get = |f: u32| tr.entries.iter().find(|e| e.function == f).unwrap();
        let esvm1 = t.lookup(1, 0);
        assert_eq!(get(1).ecx, esvm1[2] & !(1 << 22));
        assert_eq!(get(1).edx, esvm1[3]);
        assert_eq!(get(1).eax, esvm1[0], "family/model from the esvm table");
        assert_eq!(get(1).ebx >> 24, 3, "APIC ID");
        assert_eq!(get(7).ebx, 0);
        assert_eq!(get(7).flags, KVM_CPUID_FLAG_SIGNIFCANT_INDEX);
        assert_eq!(get(0xd).eax, 0x3);
        assert_eq!(get(0).ebx, t.lookup(0, 0)[1], "vendor kept");
        assert_eq!(
            get(0x8000_0008).eax & 0xffff,
            0x302b,
            "physical bits clamped to 43"
        );
        assert!(tr.dropped.contains(&DroppedBits {
            function: 1,
            index: 0,
            reg: CpuidReg::Ecx,
            mask: 1 << 22
        }));
        assert!(tr.dropped.iter().any(|d| d.function == 7
            && d.index == 0
            && d.reg == CpuidReg::Ebx
            && d.mask & (1 << 3) != 0));
        // Brand leaves are informational: kept although the host list lacks them.
        assert_eq!(get(0x8000_0002).eax, t.lookup(0x8000_0002, 0)[0]);
        assert_eq!(tr.entries.len(), t.entries.len());
    }

    #[test]
    fn missing_host_feature_leaf_zeroes_flags() {
        let t = CpuidTable::esvm_default();
        let tr = translate(&t, &[], 0);
        let e1 = tr.entries.iter().find(|e| e.function == 1).unwrap();
        assert_eq!((e1.ecx, e1.edx), (0, 0));
        assert!(!tr.dropped.is_empty());
    }
}
