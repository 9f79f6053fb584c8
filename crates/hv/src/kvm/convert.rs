//! Conversions between the esvm-arch state types and `kvm_bindings` structures.
//!
//! Everything here is pure data shuffling, so it is unit-tested without `/dev/kvm`.

use esvm_arch::bits::vector;
use esvm_arch::{
    DebugRegs, DescriptorTable, FpuState, PendingEvents, PendingException, Regs, Segment,
    SegmentAttributes, SpecialRegs,
};
use kvm_bindings::{
    kvm_debugregs, kvm_dtable, kvm_fpu, kvm_regs, kvm_segment, kvm_sregs, kvm_vcpu_events,
    KVM_VCPUEVENT_VALID_NMI_PENDING, KVM_VCPUEVENT_VALID_PAYLOAD, KVM_VCPUEVENT_VALID_SHADOW,
    KVM_X86_SHADOW_INT_STI,
};

/// esvm segment (VMCB attribute format) to `kvm_segment`.
///
/// KVM's `unusable` flag (a VMX notion) has no AMD counterpart; like KVM on SVM we treat a
/// not-present segment as unusable.
pub fn segment_to_kvm(s: &Segment) -> kvm_segment {
    let a = s.attrib;
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: a.seg_type(),
        present: a.present() as u8,
        dpl: a.dpl(),
        db: a.db() as u8,
        s: a.s() as u8,
        l: a.long() as u8,
        g: a.granularity() as u8,
        avl: a.avl() as u8,
        unusable: (!a.present()) as u8,
        padding: 0,
    }
}

/// `kvm_segment` to an esvm segment. An unusable segment is reported as not present.
pub fn segment_from_kvm(k: &kvm_segment) -> Segment {
    let present = k.present != 0 && k.unusable == 0;
    let attrib = (k.type_ as u16 & 0xf)
        | ((k.s != 0) as u16) << 4
        | ((k.dpl as u16) & 3) << 5
        | (present as u16) << 7
        | ((k.avl != 0) as u16) << 8
        | ((k.l != 0) as u16) << 9
        | ((k.db != 0) as u16) << 10
        | ((k.g != 0) as u16) << 11;
    Segment {
        selector: k.selector,
        base: k.base,
        limit: k.limit,
        attrib: SegmentAttributes(attrib),
    }
}

pub fn dtable_to_kvm(d: &DescriptorTable) -> kvm_dtable {
    kvm_dtable {
        base: d.base,
        limit: d.limit,
        padding: [0; 3],
    }
}

pub fn dtable_from_kvm(d: &kvm_dtable) -> DescriptorTable {
    DescriptorTable {
        base: d.base,
        limit: d.limit,
    }
}

pub fn regs_to_kvm(r: &Regs) -> kvm_regs {
    let g = &r.gpr;
    kvm_regs {
        rax: g[0],
        rcx: g[1],
        rdx: g[2],
        rbx: g[3],
        rsp: g[4],
        rbp: g[5],
        rsi: g[6],
        rdi: g[7],
        r8: g[8],
        r9: g[9],
        r10: g[10],
        r11: g[11],
        r12: g[12],
        r13: g[13],
        r14: g[14],
        r15: g[15],
        rip: r.rip,
        rflags: r.rflags,
    }
}

pub fn regs_from_kvm(k: &kvm_regs) -> Regs {
    Regs {
        gpr: [
            k.rax, k.rcx, k.rdx, k.rbx, k.rsp, k.rbp, k.rsi, k.rdi, k.r8, k.r9, k.r10, k.r11,
            k.r12, k.r13, k.r14, k.r15,
        ],
        rip: k.rip,
        rflags: k.rflags,
    }
}

/// esvm special registers to `kvm_sregs`. The interrupt bitmap stays empty: a pending
/// external interrupt travels in the vCPU events instead.
pub fn sregs_to_kvm(s: &SpecialRegs) -> kvm_sregs {
    kvm_sregs {
        cs: segment_to_kvm(&s.cs),
        ds: segment_to_kvm(&s.ds),
        es: segment_to_kvm(&s.es),
        fs: segment_to_kvm(&s.fs),
        gs: segment_to_kvm(&s.gs),
        ss: segment_to_kvm(&s.ss),
        tr: segment_to_kvm(&s.tr),
        ldt: segment_to_kvm(&s.ldt),
        gdt: dtable_to_kvm(&s.gdt),
        idt: dtable_to_kvm(&s.idt),
        cr0: s.cr0,
        cr2: s.cr2,
        cr3: s.cr3,
        cr4: s.cr4,
        cr8: s.cr8,
        efer: s.efer,
        apic_base: s.apic_base,
        interrupt_bitmap: [0; 4],
    }
}

pub fn sregs_from_kvm(k: &kvm_sregs) -> SpecialRegs {
    SpecialRegs {
        cs: segment_from_kvm(&k.cs),
        ds: segment_from_kvm(&k.ds),
        es: segment_from_kvm(&k.es),
        fs: segment_from_kvm(&k.fs),
        gs: segment_from_kvm(&k.gs),
        ss: segment_from_kvm(&k.ss),
        tr: segment_from_kvm(&k.tr),
        ldt: segment_from_kvm(&k.ldt),
        gdt: dtable_from_kvm(&k.gdt),
        idt: dtable_from_kvm(&k.idt),
        cr0: k.cr0,
        cr2: k.cr2,
        cr3: k.cr3,
        cr4: k.cr4,
        cr8: k.cr8,
        efer: k.efer,
        apic_base: k.apic_base,
    }
}

/// esvm FPU state to `kvm_fpu`. `kvm_fpu` has no MXCSR_MASK: it is a read-only property of
/// the (virtual) CPU and cannot be set.
pub fn fpu_to_kvm(f: &FpuState) -> kvm_fpu {
    kvm_fpu {
        fpr: f.st,
        fcw: f.fcw,
        fsw: f.fsw,
        ftwx: f.ftw,
        pad1: 0,
        last_opcode: f.fop,
        last_ip: f.fip,
        last_dp: f.fdp,
        xmm: f.xmm,
        mxcsr: f.mxcsr,
        pad2: 0,
    }
}

/// `kvm_fpu` to esvm FPU state; `mxcsr_mask` is what the vCPU's FXSAVE would report.
pub fn fpu_from_kvm(k: &kvm_fpu, mxcsr_mask: u32) -> FpuState {
    FpuState {
        fcw: k.fcw,
        fsw: k.fsw,
        ftw: k.ftwx,
        fop: k.last_opcode,
        fip: k.last_ip,
        fdp: k.last_dp,
        mxcsr: k.mxcsr,
        mxcsr_mask,
        st: k.fpr,
        xmm: k.xmm,
    }
}

pub fn debugregs_to_kvm(d: &DebugRegs) -> kvm_debugregs {
    kvm_debugregs {
        db: d.db,
        dr6: d.dr6,
        dr7: d.dr7,
        ..Default::default()
    }
}

pub fn debugregs_from_kvm(k: &kvm_debugregs) -> DebugRegs {
    DebugRegs {
        db: k.db,
        dr6: k.dr6,
        dr7: k.dr7,
    }
}

/// KVM vCPU events to esvm pending events (without `halted`, which comes from the MP state,
/// and without an interrupt queued in userspace).
///
/// An exception KVM holds as `pending` (not yet delivered) or `injected` (delivery under way)
/// is reported alike; a #PF payload is its CR2 value. An NMI being injected counts as pending.
pub fn events_from_kvm(k: &kvm_vcpu_events) -> PendingEvents {
    let ex = &k.exception;
    let exception = (ex.pending != 0 || ex.injected != 0).then(|| PendingException {
        vector: ex.nr,
        error_code: (ex.has_error_code != 0).then_some(ex.error_code),
        cr2: (k.exception_has_payload != 0 && ex.nr == vector::PF).then_some(k.exception_payload),
    });
    PendingEvents {
        exception,
        interrupt: (k.interrupt.injected != 0 && k.interrupt.soft == 0).then_some(k.interrupt.nr),
        nmi_pending: k.nmi.pending != 0 || k.nmi.injected != 0,
        nmi_masked: k.nmi.masked != 0,
        interrupt_shadow: k.interrupt.shadow != 0,
        halted: false,
    }
}

/// Fill `k` (as read from KVM_GET_VCPU_EVENTS, so SMM and other state KVM tracks is kept)
/// from esvm pending events.
///
/// With `payload` (KVM_CAP_EXCEPTION_PAYLOAD enabled) the exception is set as *pending*, so KVM
/// delivers it with the full exception checks and writes a #PF's CR2 at delivery; without it,
/// as *injected* (the only form older KVMs accept), and CR2 must already hold the address.
/// `interrupt` is the vector to place in KVM's interrupt-injection slot (None clears it).
pub fn events_to_kvm(
    e: &PendingEvents,
    interrupt: Option<u8>,
    payload: bool,
    k: &mut kvm_vcpu_events,
) {
    set_exception(k, e.exception.as_ref(), payload);
    k.interrupt.injected = interrupt.is_some() as u8;
    k.interrupt.nr = interrupt.unwrap_or(0);
    k.interrupt.soft = 0;
    k.interrupt.shadow = if e.interrupt_shadow {
        KVM_X86_SHADOW_INT_STI as u8
    } else {
        0
    };
    k.nmi.injected = 0;
    k.nmi.pending = e.nmi_pending as u8;
    k.nmi.masked = e.nmi_masked as u8;
    k.flags = KVM_VCPUEVENT_VALID_NMI_PENDING | KVM_VCPUEVENT_VALID_SHADOW;
    if payload {
        k.flags |= KVM_VCPUEVENT_VALID_PAYLOAD;
    }
}

/// Set (or clear) the exception part of `k`; see [`events_to_kvm`] for `payload`. The caller
/// must add `KVM_VCPUEVENT_VALID_PAYLOAD` to `k.flags` when `payload` is true.
pub fn set_exception(k: &mut kvm_vcpu_events, ex: Option<&PendingException>, payload: bool) {
    k.exception.injected = 0;
    k.exception.pending = 0;
    k.exception.nr = 0;
    k.exception.has_error_code = 0;
    k.exception.error_code = 0;
    k.exception_has_payload = 0;
    k.exception_payload = 0;
    if let Some(ex) = ex {
        if payload {
            k.exception.pending = 1;
            if let Some(cr2) = ex.cr2 {
                k.exception_has_payload = 1;
                k.exception_payload = cr2;
            }
        } else {
            k.exception.injected = 1;
        }
        k.exception.nr = ex.vector;
        if let Some(code) = ex.error_code {
            k.exception.has_error_code = 1;
            k.exception.error_code = code;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The attribute bits the AMD compressed format defines (type, S, DPL, P, AVL, L, D/B, G).
    const ATTRIB_MASK: u16 = 0x0fff;

    fn any_segment() -> impl Strategy<Value = Segment> {
        (any::<u16>(), any::<u64>(), any::<u32>(), 0u16..=ATTRIB_MASK).prop_map(
            |(selector, base, limit, attrib)| Segment {
                selector,
                base,
                limit,
                attrib: SegmentAttributes(attrib),
            },
        )
    }

    proptest! {
        #[test]
        fn segment_roundtrip(s in any_segment()) {
            let k = segment_to_kvm(&s);
            prop_assert_eq!(segment_from_kvm(&k), s);
            prop_assert_eq!(k.unusable != 0, !s.attrib.present());
        }

        #[test]
        fn kvm_segment_fields_match_attributes(s in any_segment()) {
            let k = segment_to_kvm(&s);
            let a = s.attrib;
            prop_assert_eq!(k.type_, a.seg_type());
            prop_assert_eq!(k.s != 0, a.s());
            prop_assert_eq!(k.dpl, a.dpl());
            prop_assert_eq!(k.present != 0, a.present());
            prop_assert_eq!(k.avl != 0, a.avl());
            prop_assert_eq!(k.l != 0, a.long());
            prop_assert_eq!(k.db != 0, a.db());
            prop_assert_eq!(k.g != 0, a.granularity());
        }

        #[test]
        fn regs_roundtrip(gpr in proptest::array::uniform16(any::<u64>()), rip: u64, rflags: u64) {
            let r = Regs { gpr, rip, rflags };
            prop_assert_eq!(regs_from_kvm(&regs_to_kvm(&r)), r);
        }

        #[test]
        fn sregs_roundtrip(
            segs in proptest::collection::vec(any_segment(), 8),
            crs in proptest::array::uniform7(any::<u64>()),
            gdt: (u64, u16),
            idt: (u64, u16),
        ) {
            let s = SpecialRegs {
                cs: segs[0], ds: segs[1], es: segs[2], fs: segs[3],
                gs: segs[4], ss: segs[5], tr: segs[6], ldt: segs[7],
                gdt: DescriptorTable { base: gdt.0, limit: gdt.1 },
                idt: DescriptorTable { base: idt.0, limit: idt.1 },
                cr0: crs[0], cr2: crs[1], cr3: crs[2], cr4: crs[3],
                cr8: crs[4], efer: crs[5], apic_base: crs[6],
            };
            let k = sregs_to_kvm(&s);
            prop_assert_eq!(k.interrupt_bitmap, [0; 4]);
            prop_assert_eq!(sregs_from_kvm(&k), s);
        }

        #[test]
        fn fpu_roundtrip(img in proptest::collection::vec(any::<u8>(), 416), mask: u32) {
            let mut b = [0u8; esvm_arch::fpu::FXSAVE_SIZE];
            b[..416].copy_from_slice(&img);
            let mut f = FpuState::from_fxsave(&b);
            f.mxcsr_mask = mask;
            prop_assert_eq!(fpu_from_kvm(&fpu_to_kvm(&f), mask), f);
        }

        #[test]
        fn events_roundtrip(
            exc in proptest::option::of((0u8..32, proptest::option::of(any::<u32>()),
                                         proptest::option::of(any::<u64>()))),
            interrupt in proptest::option::of(any::<u8>()),
            nmi_pending: bool, nmi_masked: bool, shadow: bool,
        ) {
            let e = PendingEvents {
                exception: exc.map(|(vector, error_code, cr2)| PendingException {
                    vector,
                    error_code,
                    cr2: if vector == vector::PF { cr2 } else { None },
                }),
                interrupt,
                nmi_pending,
                nmi_masked,
                interrupt_shadow: shadow,
                halted: false,
            };
            let mut k = kvm_vcpu_events::default();
            events_to_kvm(&e, e.interrupt, true, &mut k);
            prop_assert_eq!(events_from_kvm(&k), e);
        }
    }

    #[test]
    fn long_mode_code_segment_to_kvm() {
        let s = Segment::from_descriptor(0x08, 0x00af_9b00_0000_ffff, None);
        let k = segment_to_kvm(&s);
        assert_eq!(
            (k.type_, k.s, k.dpl, k.present, k.l, k.db, k.g, k.unusable),
            (0xb, 1, 0, 1, 1, 0, 1, 0)
        );
        assert_eq!(k.limit, 0xffff_ffff);
    }

    #[test]
    fn unusable_kvm_segment_is_not_present() {
        let k = kvm_segment {
            type_: 3,
            s: 1,
            present: 1,
            unusable: 1,
            ..Default::default()
        };
        let s = segment_from_kvm(&k);
        assert!(!s.attrib.present());
        assert_eq!(s.attrib.seg_type(), 3);
        assert!(s.attrib.s());
    }

    #[test]
    fn exception_without_payload_is_injected() {
        let e = PendingEvents {
            exception: Some(PendingException {
                vector: 13,
                error_code: Some(0x18),
                cr2: None,
            }),
            ..Default::default()
        };
        let mut k = kvm_vcpu_events::default();
        events_to_kvm(&e, None, false, &mut k);
        assert_eq!(
            (k.exception.injected, k.exception.pending, k.exception.nr),
            (1, 0, 13)
        );
        assert_eq!(
            (k.exception.has_error_code, k.exception.error_code),
            (1, 0x18)
        );
        assert_eq!(k.flags & KVM_VCPUEVENT_VALID_PAYLOAD, 0);
        assert_eq!(events_from_kvm(&k), e);
    }
}
