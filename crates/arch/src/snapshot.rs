//! Special registers, debug registers, pending events and the whole-vCPU snapshot.

use serde::{Deserialize, Serialize};

use crate::bits::{cr0, efer};
use crate::msr::APIC_BASE_DEFAULT_BSP;
use crate::{DescriptorTable, FpuState, MsrState, Regs, Segment, SegmentAttributes};

/// Segment, descriptor-table and control registers (KVM's `kvm_sregs` shape).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SpecialRegs {
    pub cs: Segment,
    pub ds: Segment,
    pub es: Segment,
    pub fs: Segment,
    pub gs: Segment,
    pub ss: Segment,
    pub tr: Segment,
    pub ldt: Segment,
    pub gdt: DescriptorTable,
    pub idt: DescriptorTable,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    /// Task-priority register (CR8 = APIC TPR bits 7:4).
    pub cr8: u64,
    pub efer: u64,
    pub apic_base: u64,
}

impl SpecialRegs {
    /// Architectural state after RESET: real mode, CS:IP = F000:FFF0 with CS base FFFF0000.
    pub fn reset() -> Self {
        let data = Segment {
            selector: 0,
            base: 0,
            limit: 0xffff,
            // present, read/write, accessed data segment
            attrib: SegmentAttributes::new(0x3, true, 0, true, false, false, false),
        };
        SpecialRegs {
            cs: Segment {
                selector: 0xf000,
                base: 0xffff_0000,
                limit: 0xffff,
                // present, execute/read, accessed code segment
                attrib: SegmentAttributes::new(0xb, true, 0, true, false, false, false),
            },
            ds: data,
            es: data,
            fs: data,
            gs: data,
            ss: data,
            tr: Segment {
                selector: 0,
                base: 0,
                limit: 0xffff,
                attrib: SegmentAttributes::new(0xb, false, 0, true, false, false, false),
            },
            ldt: Segment {
                selector: 0,
                base: 0,
                limit: 0xffff,
                attrib: SegmentAttributes::new(0x2, false, 0, true, false, false, false),
            },
            gdt: DescriptorTable {
                base: 0,
                limit: 0xffff,
            },
            idt: DescriptorTable {
                base: 0,
                limit: 0xffff,
            },
            cr0: cr0::ET | cr0::CD | cr0::NW,
            cr2: 0,
            cr3: 0,
            cr4: 0,
            cr8: 0,
            efer: 0,
            apic_base: APIC_BASE_DEFAULT_BSP,
        }
    }

    /// Long mode active (EFER.LMA).
    pub fn long_mode(&self) -> bool {
        self.efer & efer::LMA != 0
    }

    /// Protected mode enabled (CR0.PE).
    pub fn protected_mode(&self) -> bool {
        self.cr0 & cr0::PE != 0
    }
}

/// DR0-DR3, DR6, DR7.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DebugRegs {
    pub db: [u64; 4],
    pub dr6: u64,
    pub dr7: u64,
}

impl Default for DebugRegs {
    fn default() -> Self {
        DebugRegs {
            db: [0; 4],
            dr6: 0xffff_0ff0,
            dr7: 0x400,
        }
    }
}

/// An exception raised but not yet delivered (e.g. injected by the hypervisor).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingException {
    pub vector: u8,
    pub error_code: Option<u32>,
    /// For #PF: the faulting address, written to CR2 on delivery.
    pub cr2: Option<u64>,
}

/// Events in flight between instructions; part of the state a snapshot must carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PendingEvents {
    pub exception: Option<PendingException>,
    /// External interrupt vector accepted by the vCPU but not yet delivered.
    pub interrupt: Option<u8>,
    pub nmi_pending: bool,
    /// NMIs blocked (between NMI delivery and the next IRET).
    pub nmi_masked: bool,
    /// Interrupt shadow after STI or MOV SS: interrupts are held off for one instruction.
    pub interrupt_shadow: bool,
    /// The vCPU executed HLT and waits for an interrupt.
    pub halted: bool,
}

/// Everything a vCPU is, in a backend-neutral form: what a snapshot or a cross-backend move
/// carries. `version` guards the serialised form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuSnapshot {
    pub version: u32,
    pub regs: Regs,
    pub sregs: SpecialRegs,
    pub fpu: FpuState,
    pub xcr0: u64,
    pub msrs: MsrState,
    pub debug: DebugRegs,
    pub events: PendingEvents,
    /// Guest time-stamp counter.
    pub tsc: u64,
    /// State of the vCPU's RDRAND/RDSEED generator, for backends that have one (the software
    /// vCPU's is deterministic); None from others (KVM uses the host's hardware generator).
    /// Restoring None keeps the target vCPU's current state. Absent in older snapshots.
    #[serde(default)]
    pub rdrand: Option<u64>,
}

impl VcpuSnapshot {
    pub const VERSION: u32 = 1;

    /// A vCPU at RESET.
    pub fn reset() -> Self {
        VcpuSnapshot {
            version: Self::VERSION,
            regs: Regs {
                rip: 0xfff0,
                ..Regs::default()
            },
            sregs: SpecialRegs::reset(),
            fpu: FpuState::default(),
            xcr0: 1,
            msrs: MsrState::default(),
            debug: DebugRegs::default(),
            events: PendingEvents::default(),
            tsc: 0,
            rdrand: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_state_is_real_mode_at_reset_vector() {
        let s = VcpuSnapshot::reset();
        assert_eq!(s.sregs.cs.base + s.regs.rip, 0xffff_fff0);
        assert!(!s.sregs.protected_mode());
        assert!(!s.sregs.long_mode());
        assert_eq!(s.regs.rflags, 2);
    }

    #[test]
    fn snapshot_serde_roundtrip() {
        let mut s = VcpuSnapshot::reset();
        s.regs.gpr[3] = 0xdead_beef;
        s.fpu.xmm[2] = [7; 16];
        s.events.exception = Some(PendingException {
            vector: 14,
            error_code: Some(2),
            cr2: Some(0x1000),
        });
        s.rdrand = Some(0x1234_5678_9abc_def0);
        let j = serde_json::to_string(&s).unwrap();
        let back: VcpuSnapshot = serde_json::from_str(&j).unwrap();
        assert_eq!(s, back);
    }

    #[test]
    fn snapshot_without_rdrand_state_parses() {
        let mut j = serde_json::to_value(VcpuSnapshot::reset()).unwrap();
        j.as_object_mut().unwrap().remove("rdrand");
        let back: VcpuSnapshot = serde_json::from_value(j).unwrap();
        assert_eq!(back.rdrand, None);
    }
}
