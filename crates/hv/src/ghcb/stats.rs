//! What VMGEXITs asked for, counted: by SVM exit code (SW_EXITCODE) for GHCB-page requests,
//! by request code (GHCBInfo) for MSR-protocol ones. The hypervisor counts each VMGEXIT once,
//! when its handling completes; the VMM reads the counts through
//! [`SevVcpu::vmgexits`](crate::sev::SevVcpu::vmgexits).

use std::collections::BTreeMap;
use std::fmt;

use esvm_abi::{exit_code as ec, msr_protocol as mp};

/// What one VMGEXIT asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum VmgexitKind {
    /// A GHCB-page request with this SW_EXITCODE.
    Ghcb(u64),
    /// An MSR-protocol request with this GHCBInfo (the GHCB MSR's bits 11:0).
    Msr(u16),
    /// No request could be read: the GHCB MSR held 0, the page was refused (private or
    /// outside RAM), or its SW_EXITCODE was not marked valid.
    Unreadable,
}

impl VmgexitKind {
    /// The exit code's or request's name in the AMD APM / GHCB specification ("IOIO",
    /// "MMIO_READ", "CPUID_REQ"); None for a code esvm does not know.
    pub fn name(self) -> Option<&'static str> {
        match self {
            VmgexitKind::Ghcb(code) => exit_code_name(code),
            VmgexitKind::Msr(info) => msr_request_name(info),
            VmgexitKind::Unreadable => None,
        }
    }
}

impl fmt::Display for VmgexitKind {
    /// "IOIO (0x7b)", "MSR protocol CPUID_REQ (0x004)", "unknown (0x1234)",
    /// "unreadable GHCB".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = self.name().unwrap_or("unknown");
        match *self {
            VmgexitKind::Ghcb(code) => write!(f, "{name} ({code:#x})"),
            VmgexitKind::Msr(info) => write!(f, "MSR protocol {name} ({info:#05x})"),
            VmgexitKind::Unreadable => f.write_str("unreadable GHCB"),
        }
    }
}

/// The name of SVM exit code `code` as a GHCB SW_EXITCODE.
pub fn exit_code_name(code: u64) -> Option<&'static str> {
    Some(match code {
        ec::DR7_READ => "DR7_READ",
        ec::DR7_WRITE => "DR7_WRITE",
        ec::RDTSC => "RDTSC",
        ec::RDPMC => "RDPMC",
        ec::CPUID => "CPUID",
        ec::INVD => "INVD",
        ec::IOIO => "IOIO",
        ec::MSR => "MSR",
        ec::VMMCALL => "VMMCALL",
        ec::RDTSCP => "RDTSCP",
        ec::WBINVD => "WBINVD",
        ec::MONITOR => "MONITOR",
        ec::MWAIT => "MWAIT",
        ec::NPF => "NPF",
        ec::MMIO_READ => "MMIO_READ",
        ec::MMIO_WRITE => "MMIO_WRITE",
        ec::NMI_COMPLETE => "NMI_COMPLETE",
        ec::AP_HLT_LOOP => "AP_HLT_LOOP",
        ec::AP_JUMP_TABLE => "AP_JUMP_TABLE",
        ec::HV_FEATURES => "HV_FEATURES",
        ec::TERM_REQUEST => "TERM_REQUEST",
        ec::UNSUPPORTED_EVENT => "UNSUPPORTED_EVENT",
        _ => return None,
    })
}

/// The name of MSR-protocol request `info` (GHCBInfo).
pub fn msr_request_name(info: u16) -> Option<&'static str> {
    Some(match u64::from(info) {
        mp::SEV_INFO_REQ => "SEV_INFO_REQ",
        mp::CPUID_REQ => "CPUID_REQ",
        mp::AP_RESET_HOLD_REQ => "AP_RESET_HOLD_REQ",
        mp::REG_GPA_REQ => "REG_GPA_REQ",
        mp::HV_FT_REQ => "HV_FT_REQ",
        mp::TERM_REQ => "TERM_REQ",
        _ => return None,
    })
}

/// VMGEXITs counted by what they asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmgexitCounts {
    counts: BTreeMap<VmgexitKind, u64>,
}

impl VmgexitCounts {
    /// Count one VMGEXIT of `kind`.
    pub fn record(&mut self, kind: VmgexitKind) {
        *self.counts.entry(kind).or_insert(0) += 1;
    }

    /// Add `other`'s counts (e.g. another vCPU's).
    pub fn add(&mut self, other: &VmgexitCounts) {
        for (&k, &n) in &other.counts {
            *self.counts.entry(k).or_insert(0) += n;
        }
    }

    /// The VMGEXITs of `kind`.
    pub fn get(&self, kind: VmgexitKind) -> u64 {
        self.counts.get(&kind).copied().unwrap_or(0)
    }

    /// All VMGEXITs.
    pub fn total(&self) -> u64 {
        self.counts.values().sum()
    }

    /// The kinds seen, most frequent first (ties in kind order).
    pub fn by_count(&self) -> Vec<(VmgexitKind, u64)> {
        let mut v: Vec<_> = self.counts.iter().map(|(&k, &n)| (k, n)).collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_named_after_the_specifications() {
        assert_eq!(VmgexitKind::Ghcb(0x7b).to_string(), "IOIO (0x7b)");
        assert_eq!(
            VmgexitKind::Ghcb(0x8000_0001).to_string(),
            "MMIO_READ (0x80000001)"
        );
        assert_eq!(
            VmgexitKind::Msr(0x004).to_string(),
            "MSR protocol CPUID_REQ (0x004)"
        );
        assert_eq!(VmgexitKind::Ghcb(0x1234).to_string(), "unknown (0x1234)");
        assert_eq!(VmgexitKind::Ghcb(0x1234).name(), None);
        assert_eq!(VmgexitKind::Unreadable.to_string(), "unreadable GHCB");
        // Every exit code and request the ABI defines has a name.
        for code in ec::ALL {
            assert!(exit_code_name(code).is_some(), "{code:#x}");
        }
        for info in [
            mp::SEV_INFO_REQ,
            mp::CPUID_REQ,
            mp::AP_RESET_HOLD_REQ,
            mp::REG_GPA_REQ,
            mp::HV_FT_REQ,
            mp::TERM_REQ,
        ] {
            assert!(msr_request_name(info as u16).is_some(), "{info:#x}");
        }
        // Responses are not requests.
        assert_eq!(msr_request_name(mp::CPUID_RESP as u16), None);
    }

    #[test]
    fn counts_add_up_and_sort_by_frequency() {
        let mut a = VmgexitCounts::default();
        for _ in 0..3 {
            a.record(VmgexitKind::Ghcb(ec::IOIO));
        }
        a.record(VmgexitKind::Msr(mp::CPUID_REQ as u16));
        let mut b = VmgexitCounts::default();
        b.record(VmgexitKind::Ghcb(ec::CPUID));
        b.record(VmgexitKind::Ghcb(ec::IOIO));
        a.add(&b);
        assert_eq!(a.get(VmgexitKind::Ghcb(ec::IOIO)), 4);
        assert_eq!(a.get(VmgexitKind::Ghcb(ec::MSR)), 0);
        assert_eq!(a.total(), 6);
        assert_eq!(
            a.by_count(),
            vec![
                (VmgexitKind::Ghcb(ec::IOIO), 4),
                (VmgexitKind::Ghcb(ec::CPUID), 1),
                (VmgexitKind::Msr(mp::CPUID_REQ as u16), 1),
            ]
        );
    }
}
