//! System instructions: CPUID, MSRs, control/debug registers, descriptor tables, I/O,
//! interrupt flag, HLT, TSC.

use super::{Handler, Insn, KIMM, KMEM, KREG};
use crate::{gp0, ud, Cpu, Exc, Exit, Mode, Stop, R, SS};
use esvm_arch::bits::rflags::{IF, IOPL};
use esvm_arch::bits::{cr0, cr4, efer, vector};
use esvm_arch::msr::*;
use esvm_arch::{Segment, SegmentAttributes};
use iced_x86::{Instruction, Mnemonic};

pub(crate) mod sev_es;

pub(crate) fn h_ud(_c: &mut Cpu, _d: &Insn) -> R {
    ud()
}

fn need_cpl0(c: &Cpu) -> R {
    if c.cpl != 0 {
        return gp0();
    }
    Ok(())
}

// ---------------------------------------------------------------------- CPUID

fn cpuid(c: &mut Cpu, _d: &Insn) -> R {
    let f = c.gpr[0] as u32;
    let idx = c.gpr[1] as u32;
    let r = if c.config.cpuid_intercepts.contains(&f) {
        match c.compl.cpuid.take() {
            Some(r) => r,
            None => {
                c.compl.cpuid_awaiting = true;
                c.exit = Some(Exit::Cpuid {
                    function: f,
                    index: idx,
                });
                return Err(Stop::Exit);
            }
        }
    } else {
        let mut r = c.config.cpuid.lookup(f, idx);
        if f == 1 {
            r[1] = (r[1] & 0x00ff_ffff) | ((c.config.vcpu_id & 0xff) << 24);
            if c.cr4 & cr4::OSXSAVE != 0 {
                r[2] |= 1 << 27;
            } else {
                r[2] &= !(1 << 27);
            }
        }
        r
    };
    c.gpr[0] = r[0] as u64;
    c.gpr[3] = r[1] as u64;
    c.gpr[1] = r[2] as u64;
    c.gpr[2] = r[3] as u64;
    Ok(())
}

fn cpuid_has(c: &Cpu, leaf: u32, reg: usize, bit: u32) -> bool {
    c.config.cpuid.lookup(leaf, 0)[reg] & (1 << bit) != 0
}

// ---------------------------------------------------------------------- MSRs

/// Read an MSR the vCPU models.
///
/// Besides the architectural MSRs and the MTRRs, a few AMD model-specific ones exist,
/// presented as KVM presents them to an AMD guest ([`kvm_style_read`]: patch level, DE_CFG,
/// NB_CFG, SYSCFG). Other model-specific MSRs (LS_CFG, FP_CFG, the performance counters
/// 0xC001_0000-7, ...) raise #GP, as on KVM without a PMU; Linux reads those only through its
/// fault-tolerant accessors.
pub(crate) fn msr_read(c: &Cpu, idx: u32) -> Option<u64> {
    if let Some(v) = kvm_style_read(idx) {
        return Some(v);
    }
    Some(match idx {
        IA32_EFER => c.efer,
        IA32_TIME_STAMP_COUNTER => c.guest_tsc_read(),
        IA32_APIC_BASE => c.apic_base,
        IA32_FS_BASE => c.seg[crate::FS].base,
        IA32_GS_BASE => c.seg[crate::GS].base,
        _ => return c.msrs.get(idx),
    })
}

fn canonical(v: u64) -> bool {
    ((v as i64) << 16 >> 16) as u64 == v
}

/// Write an MSR the vCPU models: Ok(false) = not modelled, Err = invalid value (#GP).
pub(crate) fn msr_write(c: &mut Cpu, idx: u32, v: u64) -> Result<bool, ()> {
    if let Some(ok) = kvm_style_write(idx, v) {
        return if ok { Ok(true) } else { Err(()) };
    }
    if MtrrState::holds(idx) {
        return c.msrs.mtrr.set(idx, v, crate::mmu::walk::MAXPHY);
    }
    match idx {
        IA32_EFER => {
            let allowed = efer::SCE | efer::LME | efer::LMA | efer::NXE | efer::FFXSR;
            if v & !allowed != 0 {
                return Err(());
            }
            // LME cannot change while paging is on.
            if c.cr0 & cr0::PG != 0 && (v ^ c.efer) & efer::LME != 0 {
                return Err(());
            }
            c.efer = (v & !efer::LMA) | (c.efer & efer::LMA);
            c.mode_changed();
        }
        IA32_TIME_STAMP_COUNTER => c.set_tsc(v),
        IA32_APIC_BASE => c.apic_base = v,
        IA32_FS_BASE | IA32_GS_BASE | IA32_KERNEL_GS_BASE | IA32_LSTAR | IA32_CSTAR
        | IA32_SYSENTER_ESP | IA32_SYSENTER_EIP => {
            if !canonical(v) {
                return Err(());
            }
            match idx {
                IA32_FS_BASE => c.seg[crate::FS].base = v,
                IA32_GS_BASE => c.seg[crate::GS].base = v,
                _ => {
                    c.msrs.set(idx, v);
                }
            }
            c.update_seg_bases();
        }
        IA32_PAT => {
            for b in v.to_le_bytes() {
                if !matches!(b, 0 | 1 | 4 | 5 | 6 | 7) {
                    return Err(());
                }
            }
            c.msrs.pat = v;
        }
        IA32_TSC_AUX => {
            if v >> 32 != 0 {
                return Err(());
            }
            c.msrs.tsc_aux = v;
        }
        _ => return Ok(c.msrs.set(idx, v)),
    }
    Ok(true)
}

fn rdmsr(c: &mut Cpu, _d: &Insn) -> R {
    need_cpl0(c)?;
    let idx = c.gpr[1] as u32;
    let v = if c.config.msr_intercepts.contains(&idx) {
        match c.compl.rdmsr.take() {
            Some(Some(v)) => v,
            Some(None) => return gp0(),
            None => {
                c.compl.rdmsr_awaiting = true;
                c.exit = Some(Exit::RdMsr { index: idx });
                return Err(Stop::Exit);
            }
        }
    } else {
        match msr_read(c, idx) {
            Some(v) => v,
            None => return gp0(),
        }
    };
    c.gpr[0] = v & 0xffff_ffff;
    c.gpr[2] = v >> 32;
    Ok(())
}

fn wrmsr(c: &mut Cpu, _d: &Insn) -> R {
    need_cpl0(c)?;
    let idx = c.gpr[1] as u32;
    let v = (c.gpr[0] & 0xffff_ffff) | (c.gpr[2] << 32);
    if c.config.msr_intercepts.contains(&idx) {
        return match c.compl.wrmsr.take() {
            Some(true) => Err(Stop::Retire),
            Some(false) => gp0(),
            None => {
                c.compl.wrmsr_awaiting = true;
                c.exit = Some(Exit::WrMsr {
                    index: idx,
                    value: v,
                });
                Err(Stop::Exit)
            }
        };
    }
    match msr_write(c, idx, v) {
        Ok(true) => Err(Stop::Retire),
        _ => gp0(),
    }
}

fn swapgs(c: &mut Cpu, _d: &Insn) -> R {
    if c.mode != Mode::Long64 {
        return ud();
    }
    need_cpl0(c)?;
    std::mem::swap(&mut c.msrs.kernel_gs_base, &mut c.seg[crate::GS].base);
    c.update_seg_bases();
    Ok(())
}

// ---------------------------------------------------------------------- descriptor tables

fn lgdt_lidt(c: &mut Cpu, d: &Insn) -> R {
    need_cpl0(c)?;
    if d.k0 != KMEM {
        return ud();
    }
    let ea = c.ea(d);
    let seg = d.seg as usize;
    let limit = c.rd::<2>(seg, ea)? as u16;
    let base = if c.mode == Mode::Long64 {
        c.rd::<8>(seg, ea.wrapping_add(2) & d.amask)?
    } else {
        let b = c.rd::<4>(seg, ea.wrapping_add(2) & d.amask)?;
        if d.i.code() == iced_x86::Code::Lgdt_m1632_16
            || d.i.code() == iced_x86::Code::Lidt_m1632_16
        {
            b & 0x00ff_ffff
        } else {
            b
        }
    };
    let t = esvm_arch::DescriptorTable { base, limit };
    if d.i.mnemonic() == Mnemonic::Lgdt {
        c.gdtr = t;
    } else {
        c.idtr = t;
    }
    Ok(())
}

fn sgdt_sidt(c: &mut Cpu, d: &Insn) -> R {
    if d.k0 != KMEM {
        return ud();
    }
    let t = if d.i.mnemonic() == Mnemonic::Sgdt {
        c.gdtr
    } else {
        c.idtr
    };
    let ea = c.ea(d);
    let seg = d.seg as usize;
    c.wr::<2>(seg, ea, t.limit as u64)?;
    if c.mode == Mode::Long64 {
        c.wr::<8>(seg, ea.wrapping_add(2) & d.amask, t.base)
    } else {
        c.wr::<4>(seg, ea.wrapping_add(2) & d.amask, t.base & 0xffff_ffff)
    }
}

fn ltr(c: &mut Cpu, d: &Insn) -> R {
    if c.mode == Mode::Real {
        return ud();
    }
    need_cpl0(c)?;
    let sel = c.opr(d, 0, 2)? as u16;
    if sel & !3 == 0 || sel & 4 != 0 {
        return Err(Stop::Exc(Exc::ec(vector::GP, (sel & !3) as u32)));
    }
    let desc = c.read_descriptor(sel)?;
    let long = c.efer & efer::LMA != 0;
    let high = if long {
        Some(c.read_descriptor_high(sel)?)
    } else {
        None
    };
    let s = Segment::from_descriptor(sel, desc.0, high);
    let ty = s.attrib.seg_type();
    if s.attrib.s() || !(ty == 9 || (!long && ty == 1)) {
        return Err(Stop::Exc(Exc::ec(vector::GP, (sel & !3) as u32)));
    }
    if !s.attrib.present() {
        return Err(Stop::Exc(Exc::ec(vector::NP, (sel & !3) as u32)));
    }
    // Mark busy.
    c.wr_sys(desc.1 + 5, 1, ((desc.0 >> 40) as u8 | 2) as u64)?;
    let mut s = s;
    s.attrib = SegmentAttributes(s.attrib.0 | 2);
    c.tr = s;
    Ok(())
}

fn lldt(c: &mut Cpu, d: &Insn) -> R {
    if c.mode == Mode::Real {
        return ud();
    }
    need_cpl0(c)?;
    let sel = c.opr(d, 0, 2)? as u16;
    if sel & !3 == 0 {
        c.ldtr = Segment {
            selector: sel,
            ..Segment::default()
        };
        return Ok(());
    }
    if sel & 4 != 0 {
        return Err(Stop::Exc(Exc::ec(vector::GP, (sel & !3) as u32)));
    }
    let desc = c.read_descriptor(sel)?;
    let long = c.efer & efer::LMA != 0;
    let high = if long {
        Some(c.read_descriptor_high(sel)?)
    } else {
        None
    };
    let s = Segment::from_descriptor(sel, desc.0, high);
    if s.attrib.s() || s.attrib.seg_type() != 2 {
        return Err(Stop::Exc(Exc::ec(vector::GP, (sel & !3) as u32)));
    }
    if !s.attrib.present() {
        return Err(Stop::Exc(Exc::ec(vector::NP, (sel & !3) as u32)));
    }
    c.ldtr = s;
    Ok(())
}

fn str_sldt(c: &mut Cpu, d: &Insn) -> R {
    if c.mode == Mode::Real {
        return ud();
    }
    let v = if d.i.mnemonic() == Mnemonic::Str {
        c.tr.selector
    } else {
        c.ldtr.selector
    } as u64;
    let sz = if d.k0 == KREG { d.sz as usize } else { 2 };
    c.opw(d, 0, sz, v)
}

fn smsw(c: &mut Cpu, d: &Insn) -> R {
    let sz = if d.k0 == KREG { d.sz as usize } else { 2 };
    let v = c.cr0;
    c.opw(d, 0, sz, if sz == 2 { v & 0xffff } else { v })
}

fn lmsw(c: &mut Cpu, d: &Insn) -> R {
    need_cpl0(c)?;
    let v = c.opr(d, 0, 2)?;
    // PE can be set but not cleared.
    let new = (c.cr0 & !0xe) | (v & 0xf) | (c.cr0 & cr0::PE);
    write_cr0(c, new)?;
    Err(Stop::Retire)
}

fn clts(c: &mut Cpu, _d: &Insn) -> R {
    need_cpl0(c)?;
    c.cr0 &= !cr0::TS;
    Ok(())
}

// ---------------------------------------------------------------------- control registers

pub(crate) fn write_cr0(c: &mut Cpu, v: u64) -> R {
    if v >> 32 != 0 {
        return gp0();
    }
    if v & cr0::PG != 0 && v & cr0::PE == 0 {
        return gp0();
    }
    if v & cr0::NW != 0 && v & cr0::CD == 0 {
        return gp0();
    }
    if v & cr0::PG != 0 && c.cr0 & cr0::PG == 0 && c.efer & efer::LME != 0 {
        if c.cr4 & cr4::PAE == 0 {
            return gp0();
        }
        if c.seg[crate::CS].attrib.long() {
            return gp0();
        }
    }
    if v & cr0::PG == 0 && c.mode == Mode::Long64 {
        return gp0();
    }
    c.cr0 = v | cr0::ET;
    c.mode_changed();
    Ok(())
}

fn cr4_allowed(c: &Cpu) -> u64 {
    let mut a = cr4::TSD
        | cr4::DE
        | cr4::PSE
        | cr4::PAE
        | cr4::MCE
        | cr4::PGE
        | cr4::PCE
        | cr4::OSFXSR
        | cr4::OSXMMEXCPT;
    if cpuid_has(c, 1, 2, 26) {
        a |= cr4::OSXSAVE;
    }
    a
}

pub(crate) fn write_cr4(c: &mut Cpu, v: u64) -> R {
    if v & !cr4_allowed(c) != 0 {
        return gp0();
    }
    if v & cr4::PAE == 0 && c.efer & efer::LMA != 0 {
        return gp0();
    }
    c.cr4 = v;
    c.mode_changed();
    Ok(())
}

fn mov_cr(c: &mut Cpu, d: &Insn) -> R {
    need_cpl0(c)?;
    let to_cr = d.i.op0_register().is_cr();
    let sz = if c.mode == Mode::Long64 { 8 } else { 4 };
    if to_cr {
        let n = d.r0;
        let v = c.rr(d.r1, sz);
        match n {
            0 => write_cr0(c, v)?,
            2 => c.cr2 = v,
            3 => {
                if v >> 52 != 0 {
                    return gp0();
                }
                c.cr3 = v;
                if c.cr4 & cr4::PGE != 0 {
                    c.tlb.flush_nonglobal();
                    c.cache.flush_lookup_nonglobal();
                } else {
                    c.tlb.flush();
                    c.cache.flush_lookup();
                }
            }
            4 => write_cr4(c, v)?,
            8 => {
                if v & !0xf != 0 {
                    return gp0();
                }
                c.cr8 = v;
            }
            _ => return ud(),
        }
        Err(Stop::Retire)
    } else {
        let n = d.r1;
        let v = match n {
            0 => c.cr0,
            2 => c.cr2,
            3 => c.cr3,
            4 => c.cr4,
            8 => c.cr8,
            _ => return ud(),
        };
        c.rw(d.r0, sz, v);
        Ok(())
    }
}

fn mov_dr(c: &mut Cpu, d: &Insn) -> R {
    need_cpl0(c)?;
    let to_dr = d.i.op0_register().is_dr();
    let sz = if c.mode == Mode::Long64 { 8 } else { 4 };
    let mut n = if to_dr { d.r0 } else { d.r1 };
    if n == 4 || n == 5 {
        if c.cr4 & cr4::DE != 0 {
            return ud();
        }
        n += 2;
    }
    if to_dr {
        let v = c.rr(d.r1, sz);
        match n {
            0..=3 => c.dr.db[n as usize] = v,
            6 => {
                if v >> 32 != 0 {
                    return gp0();
                }
                c.dr.dr6 = (v & 0xf00f) | 0xffff_0ff0;
            }
            7 => {
                if v >> 32 != 0 {
                    return gp0();
                }
                c.dr.dr7 = (v & 0xffff_2bff) | 0x400;
            }
            _ => return ud(),
        }
        Err(Stop::Retire)
    } else {
        let v = match n {
            0..=3 => c.dr.db[n as usize],
            6 => c.dr.dr6,
            7 => c.dr.dr7,
            _ => return ud(),
        };
        c.rw(d.r0, sz, v);
        Ok(())
    }
}

fn mov_sreg(c: &mut Cpu, d: &Insn) -> R {
    if d.k0 == KREG && d.i.op0_register().is_segment_register() {
        let sel = c.opr(d, 1, 2)? as u16;
        let s = d.r0 as usize;
        c.load_data_seg(s, sel)?;
        if s == SS {
            c.shadow = true;
        }
        Err(Stop::Retire)
    } else {
        let v = c.seg[d.r1 as usize].selector as u64;
        // To a register: zero-extended to the operand size; to memory: 16 bits.
        let sz = if d.k0 == KREG { d.sz as usize } else { 2 };
        c.opw(d, 0, sz, v)
    }
}

// ---------------------------------------------------------------------- interrupt flag, HLT

fn iopl_ok(c: &mut Cpu) -> bool {
    c.mode == Mode::Real || (c.cpl as u64) <= (c.rflags & IOPL) >> 12
}

fn cli(c: &mut Cpu, _d: &Insn) -> R {
    if !iopl_ok(c) {
        return gp0();
    }
    c.rflags &= !IF;
    Ok(())
}

fn sti(c: &mut Cpu, _d: &Insn) -> R {
    if !iopl_ok(c) {
        return gp0();
    }
    if c.rflags & IF == 0 {
        c.rflags |= IF;
        c.shadow = true;
    }
    Err(Stop::Retire)
}

fn hlt(c: &mut Cpu, _d: &Insn) -> R {
    need_cpl0(c)?;
    c.halted = true;
    Err(Stop::Retire)
}

/// PAUSE: a NOP that ends its block (so spin-wait loops see kicks at every iteration) but
/// not the run of blocks, unless the VMM asked PAUSE to end the budget
/// ([`crate::CpuConfig::pause_ends_budget`]): then it raises its own attention flag.
fn pause(c: &mut Cpu, _d: &Insn) -> R {
    if c.config.pause_ends_budget {
        c.pauses += 1;
        if c.pauses >= crate::PAUSES_PER_YIELD {
            c.kick
                .fetch_or(crate::KICK_PAUSE, std::sync::atomic::Ordering::Relaxed);
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------- I/O

pub(crate) fn io_allowed(c: &Cpu) -> R {
    if c.mode != Mode::Real && (c.cpl as u64) > (c.rflags & IOPL) >> 12 {
        return gp0();
    }
    Ok(())
}

fn in_(c: &mut Cpu, d: &Insn) -> R {
    io_allowed(c)?;
    let port = if d.k1 == KIMM {
        d.imm as u16
    } else {
        c.gpr[2] as u16
    };
    let sz = d.sz;
    match c.compl.io_in.take() {
        Some(v) => {
            c.rw(0, sz as usize, v as u64);
            Ok(())
        }
        None => {
            c.compl.io_awaiting = true;
            c.exit = Some(Exit::IoIn { port, size: sz });
            Err(Stop::Exit)
        }
    }
}

fn out(c: &mut Cpu, d: &Insn) -> R {
    io_allowed(c)?;
    let port = if d.k0 == KIMM {
        d.imm as u16
    } else {
        c.gpr[2] as u16
    };
    let sz = op_size_of_reg(&d.i, 1);
    let data = c.rr(0, sz as usize) as u32;
    c.exit = Some(Exit::IoOut {
        port,
        size: sz,
        data,
    });
    Err(Stop::ExitRetire)
}

fn op_size_of_reg(i: &Instruction, op: u32) -> u8 {
    i.op_register(op).size() as u8
}

// ---------------------------------------------------------------------- TSC, XCR0, misc

fn rdtsc(c: &mut Cpu, d: &Insn) -> R {
    if c.cr4 & cr4::TSD != 0 && c.cpl != 0 {
        return gp0();
    }
    let t = c.guest_tsc_read();
    c.gpr[0] = t & 0xffff_ffff;
    c.gpr[2] = t >> 32;
    if d.i.mnemonic() == Mnemonic::Rdtscp {
        c.gpr[1] = c.msrs.tsc_aux & 0xffff_ffff;
    }
    Ok(())
}

fn xgetbv(c: &mut Cpu, _d: &Insn) -> R {
    if c.cr4 & cr4::OSXSAVE == 0 {
        return ud();
    }
    if c.gpr[1] as u32 != 0 {
        return gp0();
    }
    c.gpr[0] = c.xcr0 & 0xffff_ffff;
    c.gpr[2] = c.xcr0 >> 32;
    Ok(())
}

fn xsetbv(c: &mut Cpu, _d: &Insn) -> R {
    if c.cr4 & cr4::OSXSAVE == 0 {
        return ud();
    }
    need_cpl0(c)?;
    let v = (c.gpr[0] & 0xffff_ffff) | (c.gpr[2] << 32);
    if c.gpr[1] as u32 != 0 || v & 1 == 0 || v & !3 != 0 {
        return gp0();
    }
    c.xcr0 = v;
    Ok(())
}

fn invlpg(c: &mut Cpu, d: &Insn) -> R {
    need_cpl0(c)?;
    let lin = c.mlin(d, 1, false)?;
    c.tlb.flush_page(lin);
    c.cache.flush_lookup();
    Err(Stop::Retire)
}

fn priv_nop(c: &mut Cpu, _d: &Insn) -> R {
    need_cpl0(c)?;
    Err(Stop::Retire)
}

/// LAR/LSL/VERR/VERW: descriptor checks that report through ZF.
fn lar_lsl(c: &mut Cpu, d: &Insn) -> R {
    if c.mode == Mode::Real {
        return ud();
    }
    let m = d.i.mnemonic();
    let src_op = if matches!(m, Mnemonic::Verr | Mnemonic::Verw) {
        0
    } else {
        1
    };
    let sel = c.opr(d, src_op, 2)? as u16;
    let long = c.efer & efer::LMA != 0;
    // Out-of-table selectors clear ZF (no fault); memory faults reading the table do fault.
    let idx_end = (sel & !7) as u64 + 7;
    let limit = if sel & 4 != 0 {
        if c.ldtr.selector & !3 == 0 {
            0
        } else {
            c.ldtr.limit as u64
        }
    } else {
        c.gdtr.limit as u64
    };
    let mut ok = false;
    let mut desc = 0u64;
    if sel & !3 != 0 && idx_end <= limit {
        desc = c.read_descriptor(sel)?.0;
        let a = esvm_arch::SegmentAttributes::from_descriptor(desc);
        let rpl = (sel & 3) as u8;
        let conforming = a.is_code() && a.seg_type() & 4 != 0;
        let priv_ok = conforming || (a.dpl() >= c.cpl && a.dpl() >= rpl);
        ok = if a.s() {
            match m {
                Mnemonic::Verr => priv_ok && (!a.is_code() || a.seg_type() & 2 != 0),
                Mnemonic::Verw => priv_ok && !a.is_code() && a.seg_type() & 2 != 0,
                _ => priv_ok,
            }
        } else {
            let ty = a.seg_type();
            let valid = match (m, long) {
                (Mnemonic::Lar, false) => matches!(ty, 1 | 2 | 3 | 4 | 5 | 9 | 0xb | 0xc),
                (Mnemonic::Lar, true) => matches!(ty, 2 | 9 | 0xb | 0xc),
                (Mnemonic::Lsl, false) => matches!(ty, 1 | 2 | 3 | 9 | 0xb),
                (Mnemonic::Lsl, true) => matches!(ty, 2 | 9 | 0xb),
                _ => false,
            };
            valid && a.dpl() >= c.cpl && a.dpl() >= rpl
        };
    }
    if ok {
        let sz = d.sz.max(2) as usize;
        match m {
            Mnemonic::Lar => c.rw(d.r0, sz, (desc >> 32) & 0x00ff_ff00 & mask_for(sz)),
            Mnemonic::Lsl => {
                let s = esvm_arch::Segment::from_descriptor(sel, desc, None);
                c.rw(d.r0, sz, s.limit as u64)
            }
            _ => {}
        }
    }
    c.set_some(
        esvm_arch::bits::rflags::ZF,
        if ok { esvm_arch::bits::rflags::ZF } else { 0 },
    );
    Ok(())
}

fn mask_for(sz: usize) -> u64 {
    crate::flags::mask(sz as u8)
}

fn ud2(_c: &mut Cpu, _d: &Insn) -> R {
    ud()
}

pub(crate) fn select(m: Mnemonic, i: &Instruction, d: &mut Insn, _mode: Mode) -> Option<Handler> {
    use Mnemonic as M;
    let h: Handler = match m {
        M::Cpuid => cpuid,
        M::Rdmsr => rdmsr,
        M::Wrmsr => wrmsr,
        M::Swapgs => swapgs,
        M::Lgdt | M::Lidt => lgdt_lidt,
        M::Sgdt | M::Sidt => sgdt_sidt,
        M::Ltr => ltr,
        M::Lldt => lldt,
        M::Str | M::Sldt => str_sldt,
        M::Smsw => smsw,
        M::Lmsw => lmsw,
        M::Clts => clts,
        M::Mov => {
            let r0 = if d.k0 == KREG {
                i.op0_register()
            } else {
                iced_x86::Register::None
            };
            let r1 = if d.k1 == KREG {
                i.op1_register()
            } else {
                iced_x86::Register::None
            };
            if r0.is_cr() || r1.is_cr() {
                mov_cr
            } else if r0.is_dr() || r1.is_dr() {
                mov_dr
            } else if r0.is_segment_register() || r1.is_segment_register() {
                mov_sreg
            } else {
                return None;
            }
        }
        M::Cli => cli,
        M::Sti => sti,
        M::Hlt => hlt,
        M::Pause => pause,
        M::In => {
            d.sz = i.op0_register().size() as u8;
            in_
        }
        M::Out => out,
        M::Rdtsc | M::Rdtscp => rdtsc,
        M::Xgetbv => xgetbv,
        M::Xsetbv => xsetbv,
        M::Invlpg => invlpg,
        M::Wbinvd | M::Invd => priv_nop,
        M::Ud2 | M::Ud0 | M::Ud1 => ud2,
        M::Lar | M::Lsl | M::Verr | M::Verw => lar_lsl,
        _ => return None,
    };
    Some(h)
}
