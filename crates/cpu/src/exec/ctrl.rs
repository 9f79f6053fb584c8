//! Control transfers and the stack.

use super::{Handler, Insn, KIMM, KMEM, KREG};
use crate::intr::Kind;
use crate::{gp0, ud, Cpu, Exc, Mode, Stop, CS, R, SS};
use esvm_arch::bits::rflags::{self, AC, DF, ID, IF, IOPL, NT, RF, TF, VIF, VIP, VM};
use esvm_arch::bits::{efer, vector};
use esvm_arch::{Segment, SegmentAttributes};
use iced_x86::{Instruction, Mnemonic, OpKind};

impl Cpu {
    /// Push `sz` bytes.
    #[inline(always)]
    pub(crate) fn push(&mut self, v: u64, sz: usize) -> R {
        if !self.legacy {
            let rsp = self.gpr[4].wrapping_sub(sz as u64);
            if sz == 8 {
                self.wr::<8>(SS, rsp, v)?;
            } else {
                self.wr_sz(SS, rsp, sz as u8, v)?;
            }
            self.gpr[4] = rsp;
            return Ok(());
        }
        let sm = self.stack_mask();
        let rsp = self.gpr[4].wrapping_sub(sz as u64) & sm;
        self.wr_sz(SS, rsp, sz as u8, v)?;
        self.gpr[4] = (self.gpr[4] & !sm) | rsp;
        Ok(())
    }

    #[inline(always)]
    pub(crate) fn pop(&mut self, sz: usize) -> R<u64> {
        let v = self.peek(0, sz)?;
        self.adjust_sp(sz as u64);
        Ok(v)
    }

    /// Read the stack at RSP + `off`.
    #[inline(always)]
    pub(crate) fn peek(&mut self, off: u64, sz: usize) -> R<u64> {
        let sm = self.stack_mask();
        let a = self.gpr[4].wrapping_add(off) & sm;
        if sz == 8 {
            self.rd::<8>(SS, a)
        } else {
            self.rd_sz(SS, a, sz as u8)
        }
    }

    #[inline(always)]
    pub(crate) fn adjust_sp(&mut self, n: u64) {
        let sm = self.stack_mask();
        let rsp = self.gpr[4].wrapping_add(n) & sm;
        self.gpr[4] = (self.gpr[4] & !sm) | rsp;
    }

    /// Mask for instruction pointers of operand size `sz`.
    pub(crate) fn ip_mask(sz: u8) -> u64 {
        match sz {
            2 => 0xffff,
            4 => 0xffff_ffff,
            _ => u64::MAX,
        }
    }

    /// Set RIP for a near branch, checking the CS limit (legacy) or canonicality (64-bit).
    #[inline(always)]
    pub(crate) fn branch(&mut self, target: u64) -> R {
        if self.legacy {
            if self.mode != Mode::Real && target > self.seg[CS].limit as u64 {
                return gp0();
            }
        } else if ((target as i64) << 16 >> 16) as u64 != target {
            return gp0();
        }
        self.next_rip = target;
        Ok(())
    }

    /// POPF/IRET flag update with the privilege rules.
    pub(crate) fn write_flags_priv(&mut self, v: u64, sz: usize) {
        let mut changeable = rflags::ARITH | TF | DF | NT | AC | ID | IF | IOPL;
        let iopl = (self.get_rflags() & IOPL) >> 12;
        if self.mode != Mode::Real && self.cpl > 0 {
            changeable &= !IOPL;
            if self.cpl as u64 > iopl {
                changeable &= !IF;
            }
        }
        if sz == 2 {
            changeable &= 0xffff;
        }
        let cur = self.get_rflags();
        let new = (cur & !changeable) | (v & changeable);
        self.set_rflags_raw(new & !RF);
    }
}

fn stack_size(i: &Instruction) -> usize {
    (i.stack_pointer_increment().unsigned_abs() as usize).clamp(2, 8)
}

// ---------------------------------------------------------------------- near branches

fn jmp_rel(c: &mut Cpu, d: &Insn) -> R {
    let t = c.next_rip.wrapping_add(d.disp) & d.imm2;
    c.branch(t)
}

/// Jcc: a taken branch leaves the block ([`Stop::Branch`]); Jcc does not end blocks.
fn jcc<const CC: u8>(c: &mut Cpu, d: &Insn) -> R {
    if c.cond(CC) {
        let t = c.next_rip.wrapping_add(d.disp) & d.imm2;
        c.branch(t)?;
        return Err(Stop::Branch);
    }
    Ok(())
}

fn call_rel(c: &mut Cpu, d: &Insn) -> R {
    let t = c.next_rip.wrapping_add(d.disp) & d.imm2;
    let ret = c.next_rip;
    c.branch(t)?;
    c.push(ret, d.sz as usize)
}

fn jmp_rm(c: &mut Cpu, d: &Insn) -> R {
    let t = c.opr(d, 0, d.sz as usize)?;
    c.branch(t)
}

fn call_rm(c: &mut Cpu, d: &Insn) -> R {
    let t = c.opr(d, 0, d.sz as usize)?;
    let ret = c.next_rip;
    c.branch(t)?;
    c.push(ret, d.sz as usize)
}

fn ret(c: &mut Cpu, d: &Insn) -> R {
    let sz = d.sz as usize;
    let t = c.peek(0, sz)?;
    c.branch(t)?;
    c.adjust_sp(sz as u64 + d.imm);
    Ok(())
}

fn loop_(c: &mut Cpu, d: &Insn) -> R {
    let asz = d.asz as usize;
    let cnt = c.rr(1, asz).wrapping_sub(1) & Cpu::ip_mask(d.asz);
    c.rw(1, asz, cnt);
    let take = cnt != 0
        && match d.i.mnemonic() {
            Mnemonic::Loope => c.zf(),
            Mnemonic::Loopne => !c.zf(),
            _ => true,
        };
    if take {
        let t = c.next_rip.wrapping_add(d.disp) & d.imm2;
        return c.branch(t);
    }
    Ok(())
}

fn jcxz(c: &mut Cpu, d: &Insn) -> R {
    let sz = match d.i.mnemonic() {
        Mnemonic::Jcxz => 2,
        Mnemonic::Jecxz => 4,
        _ => 8,
    };
    if c.rr(1, sz) == 0 {
        let t = c.next_rip.wrapping_add(d.disp) & d.imm2;
        return c.branch(t);
    }
    Ok(())
}

// ---------------------------------------------------------------------- stack

fn push_r<const S: usize>(c: &mut Cpu, d: &Insn) -> R {
    let v = c.rr(d.r0, S);
    c.push(v, S)
}

fn pop_r<const S: usize>(c: &mut Cpu, d: &Insn) -> R {
    let v = c.pop(S)?;
    c.rw(d.r0, S, v);
    Ok(())
}

fn push_generic(c: &mut Cpu, d: &Insn) -> R {
    let sz = d.sz as usize;
    let v = match d.k0 {
        KIMM => d.imm,
        _ => c.opr(d, 0, sz)?,
    };
    c.push(v, sz)
}

fn pop_m(c: &mut Cpu, d: &Insn) -> R {
    let sz = d.sz as usize;
    let v = c.peek(0, sz)?;
    // The address is computed with RSP already incremented.
    let saved = c.gpr[4];
    c.adjust_sp(sz as u64);
    if let Err(e) = c.opw(d, 0, sz, v) {
        c.gpr[4] = saved;
        return Err(e);
    }
    Ok(())
}

fn push_seg(c: &mut Cpu, d: &Insn) -> R {
    let v = c.seg[d.r0 as usize].selector as u64;
    let sz = d.sz as usize;
    if sz > 2 && c.legacy {
        // A 32-bit push of a segment register writes only 16 bits (the rest unchanged).
        let sm = c.stack_mask();
        let rsp = c.gpr[4].wrapping_sub(sz as u64) & sm;
        c.wr_sz(SS, rsp, 2, v)?;
        c.gpr[4] = (c.gpr[4] & !sm) | rsp;
        return Ok(());
    }
    c.push(v, sz)
}

fn pop_seg(c: &mut Cpu, d: &Insn) -> R {
    let sz = d.sz as usize;
    let v = c.peek(0, sz)?;
    c.load_data_seg(d.r0 as usize, v as u16)?;
    c.adjust_sp(sz as u64);
    if d.r0 as usize == SS {
        c.shadow = true;
        return Err(Stop::Retire);
    }
    Ok(())
}

fn pushf(c: &mut Cpu, d: &Insn) -> R {
    let f = c.get_rflags() & !(VM | RF);
    c.push(f, d.sz as usize)
}

fn popf(c: &mut Cpu, d: &Insn) -> R {
    let sz = d.sz as usize;
    let v = c.peek(0, sz)?;
    c.adjust_sp(sz as u64);
    let was_if = c.rflags & IF;
    c.write_flags_priv(v, sz);
    let _ = was_if;
    // IF may have changed: end the block so pending interrupts are checked.
    Err(Stop::Retire)
}

fn enter(c: &mut Cpu, d: &Insn) -> R {
    let sz = d.sz as usize;
    let size = d.imm & 0xffff;
    let level = d.imm2 & 0x1f;
    let sm = c.stack_mask();
    let saved_rsp = c.gpr[4];
    let saved_rbp = c.gpr[5];
    let r = (|| -> R {
        let rbp = c.rr(5, sz);
        c.push(rbp, sz)?;
        let frame = c.gpr[4] & sm;
        if level > 0 {
            let mut bp = c.gpr[5];
            for _ in 1..level {
                bp = bp.wrapping_sub(sz as u64);
                let v = c.rd_sz(SS, bp & sm, sz as u8)?;
                c.push(v, sz)?;
            }
            c.push(frame, sz)?;
        }
        c.rw(5, sz, frame);
        c.adjust_sp(0u64.wrapping_sub(size));
        // Touch the new stack top (the processor checks it is writable).
        let top = c.gpr[4] & sm;
        let l = c.lin(SS, top, 1, true)?;
        c.probe_write(l, 1)
    })();
    if r.is_err() {
        c.gpr[4] = saved_rsp;
        c.gpr[5] = saved_rbp;
    }
    r
}

fn leave(c: &mut Cpu, d: &Insn) -> R {
    let sz = d.sz as usize;
    let sm = c.stack_mask();
    let saved = c.gpr[4];
    c.gpr[4] = (c.gpr[4] & !sm) | (c.gpr[5] & sm);
    match c.pop(sz) {
        Ok(v) => {
            c.rw(5, sz, v);
            Ok(())
        }
        Err(e) => {
            c.gpr[4] = saved;
            Err(e)
        }
    }
}

fn pusha(c: &mut Cpu, d: &Insn) -> R {
    let sz = d.sz as usize;
    let saved = c.gpr[4];
    let sp = c.rr(4, sz);
    for r in 0..8u8 {
        let v = if r == 4 { sp } else { c.rr(r, sz) };
        if let Err(e) = c.push(v, sz) {
            c.gpr[4] = saved;
            return Err(e);
        }
    }
    Ok(())
}

fn popa(c: &mut Cpu, d: &Insn) -> R {
    let sz = d.sz as usize;
    let mut vals = [0u64; 8];
    for (k, v) in vals.iter_mut().enumerate() {
        *v = c.peek((k * sz) as u64, sz)?;
    }
    for (k, v) in vals.iter().enumerate() {
        let r = 7 - k as u8;
        if r != 4 {
            c.rw(r, sz, *v);
        }
    }
    c.adjust_sp(8 * sz as u64);
    Ok(())
}

// ---------------------------------------------------------------------- far transfers

impl Cpu {
    /// Load CS for a far JMP/CALL/RET (no gates, no task switches). `rpl_cpl` is the new CPL.
    pub(crate) fn far_cs(&mut self, sel: u16, ret_to: Option<u8>) -> R<(Segment, u8)> {
        if self.mode == Mode::Real {
            let mut s = self.seg[CS];
            s.selector = sel;
            s.base = (sel as u64) << 4;
            return Ok((s, 0));
        }
        if sel & !3 == 0 {
            return gp0();
        }
        let desc = self.read_descriptor(sel)?;
        let s = Segment::from_descriptor(sel, desc.0, None);
        let a = s.attrib;
        let err = Err(Stop::Exc(Exc::ec(vector::GP, (sel & !3) as u32)));
        if !a.is_code() {
            // Gates and TSS descriptors (call gates, task switches) are not supported.
            return err;
        }
        let rpl = (sel & 3) as u8;
        let conforming = a.seg_type() & 4 != 0;
        let new_cpl = match ret_to {
            Some(r) => {
                if r < self.cpl {
                    return err;
                }
                if conforming {
                    if a.dpl() > r {
                        return err;
                    }
                } else if a.dpl() != r {
                    return err;
                }
                r
            }
            None => {
                if conforming {
                    if a.dpl() > self.cpl {
                        return err;
                    }
                } else if rpl > self.cpl || a.dpl() != self.cpl {
                    return err;
                }
                self.cpl
            }
        };
        if !a.present() {
            return Err(Stop::Exc(Exc::ec(vector::NP, (sel & !3) as u32)));
        }
        if self.efer & efer::LMA != 0 && a.long() && a.db() {
            return err;
        }
        self.set_accessed(sel, desc)?;
        let mut s = s;
        s.selector = (sel & !3) | new_cpl as u16;
        s.attrib = SegmentAttributes(s.attrib.0 | 1);
        Ok((s, new_cpl))
    }

    /// Install a new CS (and CPL) and recompute the mode.
    pub(crate) fn set_cs(&mut self, s: Segment, cpl: u8) {
        self.seg[CS] = s;
        self.cpl = cpl;
        self.mode_changed_keep_cpl();
    }

    /// `mode_changed` but with `self.cpl` authoritative.
    /// After CS (and CPL) changed through a far transfer, interrupt, SYSCALL/SYSRET: paging
    /// state is unchanged, so the TLB stays; decoded-block lookups are dropped only if the
    /// code size changed (jump-cache entries are per privilege already).
    pub(crate) fn mode_changed_keep_cpl(&mut self) {
        let cpl = self.cpl;
        let old = self.mode;
        self.recompute_mode();
        if self.mode != Mode::Real {
            self.set_cpl(cpl);
        }
        if self.mode != old {
            self.cache.flush_lookup();
        }
        self.pending |= crate::P_FLUSH;
    }
}

fn far_operand(c: &mut Cpu, d: &Insn) -> R<(u16, u64, usize)> {
    let i = &d.i;
    if matches!(i.op0_kind(), OpKind::FarBranch16 | OpKind::FarBranch32) {
        let sz = if i.op0_kind() == OpKind::FarBranch16 {
            2
        } else {
            4
        };
        return Ok((d.imm2 as u16, d.imm, sz));
    }
    // m16:16, m16:32 or m16:64.
    let total = i.memory_size().size();
    if !matches!(total, 4 | 6 | 10) {
        return crate::ud();
    }
    let osz = total - 2;
    let ea = c.ea(d);
    let off = c.rd_sz(d.seg as usize, ea, osz as u8)?;
    let sel = c.rd::<2>(d.seg as usize, ea.wrapping_add(osz as u64) & d.amask)?;
    Ok((sel as u16, off, osz))
}

fn jmp_far(c: &mut Cpu, d: &Insn) -> R {
    let (sel, off, _) = far_operand(c, d)?;
    let (s, cpl) = c.far_cs(sel, None)?;
    let old_cs = c.seg[CS];
    let old_cpl = c.cpl;
    c.set_cs(s, cpl);
    if let Err(e) = c.branch(off) {
        c.set_cs(old_cs, old_cpl);
        return Err(e);
    }
    Err(Stop::Retire)
}

fn call_far(c: &mut Cpu, d: &Insn) -> R {
    let (sel, off, osz) = far_operand(c, d)?;
    let (s, cpl) = c.far_cs(sel, None)?;
    let old_cs = c.seg[CS];
    let old_cpl = c.cpl;
    let saved_rsp = c.gpr[4];
    let ret = c.next_rip;
    let r = (|| -> R {
        c.push(old_cs.selector as u64, osz)?;
        c.push(ret, osz)?;
        c.set_cs(s, cpl);
        c.branch(off)
    })();
    if let Err(e) = r {
        c.gpr[4] = saved_rsp;
        c.set_cs(old_cs, old_cpl);
        return Err(e);
    }
    Err(Stop::Retire)
}

fn ret_far(c: &mut Cpu, d: &Insn) -> R {
    let osz = d.sz as usize;
    let off = c.peek(0, osz)?;
    let sel = c.peek(osz as u64, osz)? as u16;
    let rpl = if c.mode == Mode::Real {
        0
    } else {
        (sel & 3) as u8
    };
    let (s, cpl) = c.far_cs(sel, Some(rpl))?;
    let old_cs = c.seg[CS];
    let old_cpl = c.cpl;
    if cpl > old_cpl {
        // Return to an outer level: pop SS:RSP too.
        let n = 2 * osz as u64 + d.imm;
        let new_sp = c.peek(n, osz)?;
        let new_ss = c.peek(n + osz as u64, osz)? as u16;
        c.set_cs(s, cpl);
        if let Err(e) = c.load_ss_for(new_ss, cpl).and_then(|_| c.branch(off)) {
            c.set_cs(old_cs, old_cpl);
            return Err(e);
        }
        c.gpr[4] = new_sp.wrapping_add(d.imm);
        c.drop_invalid_data_segs();
    } else {
        c.set_cs(s, cpl);
        if let Err(e) = c.branch(off) {
            c.set_cs(old_cs, old_cpl);
            return Err(e);
        }
        c.adjust_sp(2 * osz as u64 + d.imm);
    }
    Err(Stop::Retire)
}

// ---------------------------------------------------------------------- interrupts

fn int_n(c: &mut Cpu, d: &Insn) -> R {
    let (vec, kind) = match d.i.mnemonic() {
        Mnemonic::Int3 => (3u8, Kind::SoftException),
        Mnemonic::Int1 => (1, Kind::Privileged),
        Mnemonic::Into => {
            if !c.cond(0) {
                return Ok(());
            }
            (4, Kind::SoftException)
        }
        _ => (d.imm as u8, Kind::Software),
    };
    let ret = c.next_rip;
    c.deliver_event(vec, None, kind, ret)?;
    c.next_rip = c.rip;
    Err(Stop::Retire)
}

fn iret(c: &mut Cpu, d: &Insn) -> R {
    let osz = d.sz as usize;
    c.nmi_masked = false;
    if c.mode == Mode::Real {
        let ip = c.peek(0, osz)?;
        let cs = c.peek(osz as u64, osz)? as u16;
        let fl = c.peek(2 * osz as u64, osz)?;
        c.adjust_sp(3 * osz as u64);
        let mut s = c.seg[CS];
        s.selector = cs;
        s.base = (cs as u64) << 4;
        c.seg[CS] = s;
        c.update_seg_bases();
        c.write_flags_priv(fl, osz);
        c.next_rip = ip & Cpu::ip_mask(osz as u8);
        c.cache.flush_lookup();
        return Err(Stop::Retire);
    }
    if c.get_rflags() & NT != 0 && c.efer & efer::LMA == 0 {
        // Task return: not supported.
        return gp0();
    }
    let ip = c.peek(0, osz)?;
    let cs = c.peek(osz as u64, osz)? as u16;
    let fl = c.peek(2 * osz as u64, osz)?;
    let rpl = (cs & 3) as u8;
    let long = c.mode == Mode::Long64;
    let (s, cpl) = c.far_cs(cs, Some(rpl))?;
    let old_cs = c.seg[CS];
    let old_cpl = c.cpl;
    let old_flags = c.get_rflags();
    let outer = cpl > old_cpl || long;
    if outer {
        let sp = c.peek(3 * osz as u64, osz)?;
        let ss = c.peek(4 * osz as u64, osz)? as u16;
        c.write_flags_priv(fl, osz);
        c.set_cs(s, cpl);
        let r = c
            .load_ss_for(ss, cpl)
            .and_then(|_| c.branch(ip & Cpu::ip_mask(osz as u8)));
        if let Err(e) = r {
            c.set_cs(old_cs, old_cpl);
            c.set_rflags_raw(old_flags);
            return Err(e);
        }
        if osz == 8 || c.mode == Mode::Long64 {
            c.gpr[4] = sp;
        } else {
            let sm = c.stack_mask();
            c.gpr[4] = (c.gpr[4] & !sm) | (sp & sm);
        }
        if cpl > old_cpl {
            c.drop_invalid_data_segs();
        }
    } else {
        c.write_flags_priv(fl, osz);
        c.set_cs(s, cpl);
        if let Err(e) = c.branch(ip & Cpu::ip_mask(osz as u8)) {
            c.set_cs(old_cs, old_cpl);
            c.set_rflags_raw(old_flags);
            return Err(e);
        }
        c.adjust_sp(3 * osz as u64);
    }
    // VIF/VIP are not modelled; keep them clear.
    c.rflags &= !(VIF | VIP | VM);
    Err(Stop::Retire)
}

fn syscall(c: &mut Cpu, _d: &Insn) -> R {
    if c.efer & efer::SCE == 0 {
        return ud();
    }
    let star = c.msrs.star;
    let sel = ((star >> 32) & 0xfffc) as u16;
    let fl = c.get_rflags();
    if c.efer & efer::LMA != 0 {
        c.gpr[1] = c.next_rip;
        c.gpr[11] = fl & !RF;
        c.set_rflags_raw(fl & !c.msrs.sfmask & !RF);
        let target = if c.mode == Mode::Long64 {
            c.msrs.lstar
        } else {
            c.msrs.cstar
        };
        c.seg[CS] = Segment {
            selector: sel,
            base: 0,
            limit: 0xffff_ffff,
            attrib: SegmentAttributes::new(0xb, true, 0, true, true, false, true),
        };
        c.seg[SS] = Segment {
            selector: sel + 8,
            base: 0,
            limit: 0xffff_ffff,
            attrib: SegmentAttributes::new(0x3, true, 0, true, false, true, true),
        };
        c.cpl = 0;
        c.mode_changed_keep_cpl();
        c.next_rip = target;
    } else {
        c.gpr[1] = c.next_rip & 0xffff_ffff;
        c.set_rflags_raw(fl & !(VM | IF | RF));
        c.seg[CS] = Segment {
            selector: sel,
            base: 0,
            limit: 0xffff_ffff,
            attrib: SegmentAttributes::new(0xb, true, 0, true, false, true, true),
        };
        c.seg[SS] = Segment {
            selector: sel + 8,
            base: 0,
            limit: 0xffff_ffff,
            attrib: SegmentAttributes::new(0x3, true, 0, true, false, true, true),
        };
        c.cpl = 0;
        c.mode_changed_keep_cpl();
        c.next_rip = star & 0xffff_ffff;
    }
    Err(Stop::Retire)
}

fn sysret(c: &mut Cpu, d: &Insn) -> R {
    if c.efer & efer::SCE == 0 {
        return ud();
    }
    if c.cpl != 0 || c.cr0 & esvm_arch::bits::cr0::PE == 0 {
        return gp0();
    }
    let base = ((c.msrs.star >> 48) & 0xffff) as u16;
    let wide = d.sz == 8;
    if c.efer & efer::LMA != 0 {
        let (cs_sel, long) = if wide {
            (base + 16, true)
        } else {
            (base, false)
        };
        c.seg[CS] = Segment {
            selector: cs_sel | 3,
            base: 0,
            limit: 0xffff_ffff,
            attrib: SegmentAttributes::new(0xb, true, 3, true, long, !long, true),
        };
        let r11 = c.gpr[11];
        c.set_rflags_raw((r11 & !RF) | rflags::FIXED);
        c.next_rip = if wide {
            c.gpr[1]
        } else {
            c.gpr[1] & 0xffff_ffff
        };
    } else {
        c.seg[CS] = Segment {
            selector: base | 3,
            base: 0,
            limit: 0xffff_ffff,
            attrib: SegmentAttributes::new(0xb, true, 3, true, false, true, true),
        };
        c.rflags |= IF;
        c.next_rip = c.gpr[1] & 0xffff_ffff;
    }
    c.seg[SS] = Segment {
        selector: (base + 8) | 3,
        base: 0,
        limit: 0xffff_ffff,
        attrib: SegmentAttributes::new(0x3, true, 3, true, false, true, true),
    };
    c.cpl = 3;
    c.mode_changed_keep_cpl();
    Err(Stop::Retire)
}

pub(crate) fn select(m: Mnemonic, i: &Instruction, d: &mut Insn, mode: Mode) -> Option<Handler> {
    use Mnemonic as M;
    // Near-branch targets wrap at the operand size.
    let bmask = match i.op0_kind() {
        OpKind::NearBranch16 => 0xffff,
        OpKind::NearBranch32 => 0xffff_ffff,
        _ => u64::MAX,
    };
    let h: Handler = match m {
        M::Jmp => {
            if matches!(i.op0_kind(), OpKind::FarBranch16 | OpKind::FarBranch32)
                || (d.k0 == KMEM && i.is_jmp_far_indirect())
            {
                jmp_far
            } else if d.k0 == KIMM {
                d.imm2 = bmask;
                jmp_rel
            } else {
                jmp_rm
            }
        }
        M::Call => {
            if matches!(i.op0_kind(), OpKind::FarBranch16 | OpKind::FarBranch32)
                || (d.k0 == KMEM && i.is_call_far_indirect())
            {
                call_far
            } else if d.k0 == KIMM {
                d.imm2 = bmask;
                d.sz = stack_size(i) as u8;
                call_rel
            } else {
                call_rm
            }
        }
        M::Ret => {
            d.sz = match i.code() {
                iced_x86::Code::Retnw | iced_x86::Code::Retnw_imm16 => 2,
                iced_x86::Code::Retnd | iced_x86::Code::Retnd_imm16 => 4,
                _ => 8,
            };
            if d.k0 != KIMM {
                d.imm = 0;
            }
            ret
        }
        M::Retf => {
            d.sz = match i.code() {
                iced_x86::Code::Retfw | iced_x86::Code::Retfw_imm16 => 2,
                iced_x86::Code::Retfd | iced_x86::Code::Retfd_imm16 => 4,
                _ => 8,
            };
            if d.k0 != KIMM {
                d.imm = 0;
            }
            ret_far
        }
        M::Jo
        | M::Jno
        | M::Jb
        | M::Jae
        | M::Je
        | M::Jne
        | M::Jbe
        | M::Ja
        | M::Js
        | M::Jns
        | M::Jp
        | M::Jnp
        | M::Jl
        | M::Jge
        | M::Jle
        | M::Jg => {
            d.imm2 = bmask;
            match d.cc {
                0 => jcc::<0>,
                1 => jcc::<1>,
                2 => jcc::<2>,
                3 => jcc::<3>,
                4 => jcc::<4>,
                5 => jcc::<5>,
                6 => jcc::<6>,
                7 => jcc::<7>,
                8 => jcc::<8>,
                9 => jcc::<9>,
                10 => jcc::<10>,
                11 => jcc::<11>,
                12 => jcc::<12>,
                13 => jcc::<13>,
                14 => jcc::<14>,
                _ => jcc::<15>,
            }
        }
        M::Loop | M::Loope | M::Loopne => {
            d.imm2 = bmask;
            loop_
        }
        M::Jcxz | M::Jecxz | M::Jrcxz => {
            d.imm2 = bmask;
            jcxz
        }
        M::Push => {
            let sz = stack_size(i);
            d.sz = sz as u8;
            if d.k0 == KREG && i.op0_register().is_segment_register() {
                push_seg
            } else if d.k0 == KREG {
                match sz {
                    8 => push_r::<8>,
                    4 => push_r::<4>,
                    _ => push_r::<2>,
                }
            } else {
                push_generic
            }
        }
        M::Pop => {
            let sz = stack_size(i);
            d.sz = sz as u8;
            if d.k0 == KREG && i.op0_register().is_segment_register() {
                pop_seg
            } else if d.k0 == KREG {
                match sz {
                    8 => pop_r::<8>,
                    4 => pop_r::<4>,
                    _ => pop_r::<2>,
                }
            } else {
                pop_m
            }
        }
        M::Pushf | M::Pushfd | M::Pushfq => {
            d.sz = stack_size(i) as u8;
            pushf
        }
        M::Popf | M::Popfd | M::Popfq => {
            d.sz = stack_size(i) as u8;
            popf
        }
        M::Enter => {
            d.sz = match i.code() {
                iced_x86::Code::Enterw_imm16_imm8 => 2,
                iced_x86::Code::Enterd_imm16_imm8 => 4,
                _ => 8,
            };
            enter
        }
        M::Leave => {
            d.sz = match i.code() {
                iced_x86::Code::Leavew => 2,
                iced_x86::Code::Leaved => 4,
                _ => 8,
            };
            leave
        }
        M::Pusha | M::Pushad => {
            d.sz = if m == M::Pusha { 2 } else { 4 };
            pusha
        }
        M::Popa | M::Popad => {
            d.sz = if m == M::Popa { 2 } else { 4 };
            popa
        }
        M::Int | M::Int3 | M::Int1 | M::Into => int_n,
        M::Iret | M::Iretd | M::Iretq => {
            d.sz = match m {
                M::Iret => 2,
                M::Iretd => 4,
                _ => 8,
            };
            iret
        }
        M::Syscall => syscall,
        M::Sysret | M::Sysretq => {
            d.sz = if m == M::Sysretq || i.code() == iced_x86::Code::Sysretq {
                8
            } else {
                4
            };
            sysret
        }
        _ => return None,
    };
    let _ = (mode, AC, ID, TF, DF);
    Some(h)
}
