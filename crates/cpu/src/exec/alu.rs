//! Integer data-processing instructions.

use super::{Handler, Insn, KIMM, KMEM, KREG};
use crate::flags::{mask, sign, sx, szp, F_ADC, F_ADD, F_DEC, F_INC, F_LOGIC, F_SBB, F_SUB};
use crate::mmu::cmpxchg_host;
use crate::{Cpu, Exc, R};
use esvm_arch::bits::rflags::{AF, CF, DF, OF, PF, SF, ZF};
use esvm_arch::bits::vector;
use iced_x86::{Instruction, Mnemonic};

pub(crate) const ADD: u8 = 0;
pub(crate) const OR: u8 = 1;
pub(crate) const ADC: u8 = 2;
pub(crate) const SBB: u8 = 3;
pub(crate) const AND: u8 = 4;
pub(crate) const SUB: u8 = 5;
pub(crate) const XOR: u8 = 6;
pub(crate) const CMP: u8 = 7;
pub(crate) const TEST: u8 = 8;

const FRR: u8 = 0;
const FRM: u8 = 1;
const FMR: u8 = 2;
const FRI: u8 = 3;
const FMI: u8 = 4;

#[inline(always)]
const fn writes(op: u8) -> bool {
    op != CMP && op != TEST
}

/// Result of `op` (truncated to `sz`).
#[inline(always)]
fn calc(op: u8, sz: u8, a: u64, b: u64, cin: u64) -> u64 {
    let r = match op {
        ADD => a.wrapping_add(b),
        OR => a | b,
        ADC => a.wrapping_add(b).wrapping_add(cin),
        SBB => a.wrapping_sub(b).wrapping_sub(cin),
        AND | TEST => a & b,
        SUB | CMP => a.wrapping_sub(b),
        _ => a ^ b,
    };
    r & mask(sz)
}

#[inline(always)]
fn setf(c: &mut Cpu, op: u8, sz: u8, a: u64, b: u64, r: u64, cin: u64) {
    let f = match op {
        ADD => F_ADD,
        ADC => F_ADC,
        SBB => F_SBB,
        SUB | CMP => F_SUB,
        _ => F_LOGIC,
    };
    c.lazy(f, sz, a, b, r);
    if op == ADC || op == SBB {
        c.f_cin = cin;
    }
}

#[inline(always)]
fn cin_of(c: &Cpu, op: u8) -> u64 {
    if op == ADC || op == SBB {
        c.cf() as u64
    } else {
        0
    }
}

fn alu<const OP: u8, const S: usize, const F: u8>(c: &mut Cpu, d: &Insn) -> R {
    let sz = S as u8;
    let cin = cin_of(c, OP);
    match F {
        FRR | FRM | FRI => {
            let a = c.rr(d.r0, S);
            let b = match F {
                FRR => c.rr(d.r1, S),
                FRM => {
                    let ea = c.ea(d);
                    c.rd::<S>(d.seg as usize, ea)?
                }
                _ => d.imm & mask(sz),
            };
            let r = calc(OP, sz, a, b, cin);
            if writes(OP) {
                c.rw(d.r0, S, r);
            }
            setf(c, OP, sz, a, b, r, cin);
        }
        _ => {
            let lin = c.mlin(d, S, writes(OP))?;
            let a = c.rd_lin::<S>(lin)?;
            let b = if F == FMR {
                c.rr(d.r1, S)
            } else {
                d.imm & mask(sz)
            };
            let r = calc(OP, sz, a, b, cin);
            if writes(OP) {
                c.wr_lin::<S>(lin, r)?;
            }
            setf(c, OP, sz, a, b, r, cin);
        }
    }
    Ok(())
}

/// Read `sz` bytes from a host pointer.
///
/// # Safety
/// `p..p + sz` (`sz` 1, 2, 4 or 8) must be readable guest memory, as
/// [`Cpu::host_rmw_ptr`] returns it for `sz` bytes.
#[inline(always)]
pub(crate) unsafe fn host_rd(p: *const u8, sz: usize) -> u64 {
    // SAFETY: the caller guarantees `sz` readable bytes at `p`; unaligned reads are fine.
    unsafe {
        match sz {
            1 => *p as u64,
            2 => (p as *const u16).read_unaligned() as u64,
            4 => (p as *const u32).read_unaligned() as u64,
            _ => (p as *const u64).read_unaligned(),
        }
    }
}

/// Run `f(old) -> new` as an atomic read-modify-write on the memory operand (LOCK prefix,
/// XCHG). Returns the old value. MMIO or page-crossing operands are read and written under
/// the process-wide split lock ([`crate::mmu::split_lock`]).
pub(crate) fn rmw(
    c: &mut Cpu,
    d: &Insn,
    sz: usize,
    mut f: impl FnMut(u64) -> Option<u64>,
) -> R<u64> {
    let lin = c.mlin(d, sz, true)?;
    if let Some((p, gpn)) = c.host_rmw_ptr(lin, sz)? {
        loop {
            // SAFETY: `p` is `host_rmw_ptr`'s pointer to `sz` bytes of guest memory.
            let old = unsafe { host_rd(p, sz) };
            let Some(new) = f(old) else {
                return Ok(old);
            };
            // SAFETY: as above; `gpn` is the RAM page `host_rmw_ptr` returned with `p`.
            unsafe {
                if cmpxchg_host(p, sz, old, new) == old {
                    c.note_rmw(gpn);
                    return Ok(old);
                }
            }
        }
    }
    let _bus = crate::mmu::split_lock();
    let old = c.rd_sz(d.seg as usize, c.ea(d), sz as u8)?;
    if let Some(new) = f(old) {
        c.wr_sz(d.seg as usize, c.ea(d), sz as u8, new)?;
    }
    Ok(old)
}

fn alu_lock<const OP: u8>(c: &mut Cpu, d: &Insn) -> R {
    let sz = d.sz as usize;
    let b = if d.k1 == KREG {
        c.rr(d.r1, sz)
    } else {
        d.imm & mask(d.sz)
    };
    let cin = cin_of(c, OP);
    let a = rmw(c, d, sz, |a| Some(calc(OP, d.sz, a, b, cin)))?;
    let r = calc(OP, d.sz, a, b, cin);
    setf(c, OP, d.sz, a, b, r, cin);
    Ok(())
}

macro_rules! by_size_form {
    ($sz:expr, $form:expr, $f:ident, $op:expr) => {
        match $form {
            FRR => by_size_f!($sz, $f, $op, FRR),
            FRM => by_size_f!($sz, $f, $op, FRM),
            FMR => by_size_f!($sz, $f, $op, FMR),
            FRI => by_size_f!($sz, $f, $op, FRI),
            _ => by_size_f!($sz, $f, $op, FMI),
        }
    };
}

macro_rules! by_size_f {
    ($sz:expr, $f:ident, $op:expr, $form:expr) => {
        match $sz {
            1 => $f::<$op, 1, $form> as Handler,
            2 => $f::<$op, 2, $form> as Handler,
            4 => $f::<$op, 4, $form> as Handler,
            _ => $f::<$op, 8, $form> as Handler,
        }
    };
}

/// CMP/TEST of a register with a register or an immediate, fused with the Jcc that follows
/// it in the block (64-bit mode): both retire in one dispatch. Installed only by
/// [`fuse_cmp_jcc`] on an entry whose next entry is that Jcc; the entry's `h1` is the plain
/// CMP/TEST. A taken branch to a non-canonical target runs the CMP/TEST alone (Ok), so the
/// Jcc's own entry raises the #GP.
fn cmp_jcc<const OP: u8, const S: usize, const F: u8, const CC: u8>(c: &mut Cpu, d: &Insn) -> R {
    let sz = S as u8;
    let a = c.rr(d.r0, S);
    let b = if F == FRR {
        c.rr(d.r1, S)
    } else {
        d.imm & mask(sz)
    };
    let r = calc(OP, sz, a, b, 0);
    setf(c, OP, sz, a, b, r, 0);
    // SAFETY: `fuse_cmp_jcc` installs this handler only on an entry followed by the Jcc in
    // the same instruction array.
    let j = unsafe { &*(d as *const Insn).add(1) };
    let after = c.next_rip.wrapping_add(j.len as u64);
    if c.cond(CC) {
        let t = after.wrapping_add(j.disp) & j.imm2;
        if ((t as i64) << 16 >> 16) as u64 != t {
            return Ok(());
        }
        c.next_rip = t;
        return Err(crate::Stop::FusedBranch);
    }
    c.next_rip = after;
    Err(crate::Stop::FusedNext)
}

macro_rules! cmp_jcc_cc {
    ($op:expr, $s:expr, $f:expr, $cc:expr) => {
        match $cc {
            0 => cmp_jcc::<$op, $s, $f, 0> as Handler,
            1 => cmp_jcc::<$op, $s, $f, 1>,
            2 => cmp_jcc::<$op, $s, $f, 2>,
            3 => cmp_jcc::<$op, $s, $f, 3>,
            4 => cmp_jcc::<$op, $s, $f, 4>,
            5 => cmp_jcc::<$op, $s, $f, 5>,
            6 => cmp_jcc::<$op, $s, $f, 6>,
            7 => cmp_jcc::<$op, $s, $f, 7>,
            8 => cmp_jcc::<$op, $s, $f, 8>,
            9 => cmp_jcc::<$op, $s, $f, 9>,
            10 => cmp_jcc::<$op, $s, $f, 10>,
            11 => cmp_jcc::<$op, $s, $f, 11>,
            12 => cmp_jcc::<$op, $s, $f, 12>,
            13 => cmp_jcc::<$op, $s, $f, 13>,
            14 => cmp_jcc::<$op, $s, $f, 14>,
            _ => cmp_jcc::<$op, $s, $f, 15>,
        }
    };
}

macro_rules! cmp_jcc_f {
    ($op:expr, $s:expr, $rr:expr, $cc:expr) => {
        if $rr {
            cmp_jcc_cc!($op, $s, FRR, $cc)
        } else {
            cmp_jcc_cc!($op, $s, FRI, $cc)
        }
    };
}

macro_rules! cmp_jcc_s {
    ($op:expr, $sz:expr, $rr:expr, $cc:expr) => {
        match $sz {
            1 => cmp_jcc_f!($op, 1, $rr, $cc),
            2 => cmp_jcc_f!($op, 2, $rr, $cc),
            4 => cmp_jcc_f!($op, 4, $rr, $cc),
            _ => cmp_jcc_f!($op, 8, $rr, $cc),
        }
    };
}

fn cmp_jcc_sel(cmp: bool, rr: bool, sz: u8, cc: u8) -> Handler {
    if cmp {
        cmp_jcc_s!(CMP, sz, rr, cc)
    } else {
        cmp_jcc_s!(TEST, sz, rr, cc)
    }
}

/// Fuse register CMP/TEST + Jcc pairs of a 64-bit-mode block (see [`cmp_jcc`]).
pub(crate) fn fuse_cmp_jcc(insns: &mut [Insn]) {
    for k in 0..insns.len().saturating_sub(1) {
        let (d, j) = (&insns[k], &insns[k + 1]);
        let m = d.i.mnemonic();
        if !matches!(m, Mnemonic::Cmp | Mnemonic::Test)
            || d.lock
            || d.k0 != KREG
            || !(d.k1 == KREG || d.k1 == KIMM)
            || d.r0 >= 16
            || (d.k1 == KREG && d.r1 >= 16)
            || !j.i.is_jcc_short_or_near()
            || !std::ptr::fn_addr_eq(d.h, d.h1)
        {
            continue;
        }
        let h = cmp_jcc_sel(m == Mnemonic::Cmp, d.k1 == KREG, d.sz, j.cc);
        insns[k].h = h;
    }
}

fn form(d: &Insn) -> Option<u8> {
    Some(match (d.k0, d.k1) {
        (KREG, KREG) => FRR,
        (KREG, KMEM) => FRM,
        (KMEM, KREG) => FMR,
        (KREG, KIMM) => FRI,
        (KMEM, KIMM) => FMI,
        _ => return None,
    })
}

fn alu_sel<const OP: u8>(d: &Insn) -> Option<Handler> {
    let f = form(d)?;
    if d.lock {
        return Some(alu_lock::<OP>);
    }
    Some(by_size_form!(d.sz, f, alu, OP))
}

// ---------------------------------------------------------------------- MOV family

fn mov<const S: usize, const F: u8>(c: &mut Cpu, d: &Insn) -> R {
    match F {
        FRR => {
            let v = c.rr(d.r1, S);
            c.rw(d.r0, S, v);
        }
        FRM => {
            let ea = c.ea(d);
            let v = c.rd::<S>(d.seg as usize, ea)?;
            c.rw(d.r0, S, v);
        }
        FMR => {
            let ea = c.ea(d);
            let v = c.rr(d.r1, S);
            c.wr::<S>(d.seg as usize, ea, v)?;
        }
        FRI => c.rw(d.r0, S, d.imm),
        _ => {
            let ea = c.ea(d);
            c.wr::<S>(d.seg as usize, ea, d.imm)?;
        }
    }
    Ok(())
}

fn mov_dummy<const OP: u8, const S: usize, const F: u8>(c: &mut Cpu, d: &Insn) -> R {
    mov::<S, F>(c, d)
}

/// MOVZX/MOVSX/MOVSXD: source size in `imm2`, SIGNED selects sign extension.
fn movx<const SIGNED: bool, const SS: usize>(c: &mut Cpu, d: &Insn) -> R {
    let v = if d.k1 == KMEM {
        let ea = c.ea(d);
        c.rd::<SS>(d.seg as usize, ea)?
    } else {
        c.rr(d.r1, SS)
    };
    let v = if SIGNED { sx(v, SS as u8) } else { v };
    c.rw(d.r0, d.sz as usize, v);
    Ok(())
}

fn lea(c: &mut Cpu, d: &Insn) -> R {
    let ea = c.ea(d);
    c.rw(d.r0, d.sz as usize, ea);
    Ok(())
}

fn xchg(c: &mut Cpu, d: &Insn) -> R {
    let sz = d.sz as usize;
    if d.k0 == KMEM {
        let v = c.rr(d.r1, sz);
        let old = rmw(c, d, sz, |_| Some(v))?;
        c.rw(d.r1, sz, old);
    } else {
        let a = c.rr(d.r0, sz);
        let b = c.rr(d.r1, sz);
        c.rw(d.r0, sz, b);
        c.rw(d.r1, sz, a);
    }
    Ok(())
}

fn cmpxchg(c: &mut Cpu, d: &Insn) -> R {
    let sz = d.sz as usize;
    let acc = c.rr(0, sz);
    let src = c.rr(d.r1, sz);
    let old = if d.k0 == KMEM {
        if d.lock {
            rmw(c, d, sz, |o| if o == acc { Some(src) } else { None })?
        } else {
            let lin = c.mlin(d, sz, true)?;
            let o = c.rd_sz_lin(lin, sz)?;
            // The destination is always written (with itself when the compare fails).
            c.wr_sz_lin(lin, sz, if o == acc { src } else { o })?;
            o
        }
    } else {
        let o = c.rr(d.r0, sz);
        if o == acc {
            c.rw(d.r0, sz, src);
        }
        o
    };
    if old != acc {
        c.rw(0, sz, old);
    }
    let r = acc.wrapping_sub(old) & mask(d.sz);
    c.lazy(F_SUB, d.sz, acc, old, r);
    Ok(())
}

fn cmpxchg8b(c: &mut Cpu, d: &Insn) -> R {
    let wide = d.i.mnemonic() == Mnemonic::Cmpxchg16b;
    let lin = c.mlin(d, if wide { 16 } else { 8 }, true)?;
    let (zf, old_lo, old_hi);
    if wide {
        if lin & 15 != 0 {
            return crate::gp0();
        }
        let exp = (c.gpr[0] as u128) | ((c.gpr[2] as u128) << 64);
        let new = (c.gpr[3] as u128) | ((c.gpr[1] as u128) << 64);
        let old = match c.host_rmw_ptr(lin, 16)? {
            // SAFETY: `host_rmw_ptr`'s pointer to 16 bytes of guest memory, 16-byte aligned
            // (`lin` is, checked above, and so are both backings' bases), and its RAM page.
            Some((p, gpn)) => unsafe {
                let o = crate::mmu::cmpxchg16_host(p, exp, new);
                c.note_rmw(gpn);
                o
            },
            None => {
                let _bus = crate::mmu::split_lock();
                let o = c.rd_slow(lin, 16, false)?;
                c.wr_slow(lin, 16, if o == exp { new } else { o }, false)?;
                o
            }
        };
        zf = old == exp;
        old_lo = old as u64;
        old_hi = (old >> 64) as u64;
        if !zf {
            c.gpr[0] = old_lo;
            c.gpr[2] = old_hi;
        }
    } else {
        let exp = (c.gpr[0] & 0xffff_ffff) | (c.gpr[2] << 32);
        let new = (c.gpr[3] & 0xffff_ffff) | (c.gpr[1] << 32);
        let old = match c.host_rmw_ptr(lin, 8)? {
            // SAFETY: `host_rmw_ptr`'s pointer to 8 bytes of guest memory and its RAM page.
            Some((p, gpn)) => unsafe {
                let o = cmpxchg_host(p, 8, exp, new);
                c.note_rmw(gpn);
                o
            },
            None => {
                let _bus = crate::mmu::split_lock();
                let o = c.rd_sz_lin(lin, 8)?;
                c.wr_sz_lin(lin, 8, if o == exp { new } else { o })?;
                o
            }
        };
        zf = old == exp;
        if !zf {
            c.gpr[0] = old & 0xffff_ffff;
            c.gpr[2] = old >> 32;
        }
    }
    c.set_some(ZF, if zf { ZF } else { 0 });
    Ok(())
}

fn xadd(c: &mut Cpu, d: &Insn) -> R {
    let sz = d.sz as usize;
    let b = c.rr(d.r1, sz);
    let a = if d.k0 == KMEM {
        if d.lock {
            rmw(c, d, sz, |a| Some(a.wrapping_add(b) & mask(d.sz)))?
        } else {
            let lin = c.mlin(d, sz, true)?;
            let a = c.rd_sz_lin(lin, sz)?;
            c.wr_sz_lin(lin, sz, a.wrapping_add(b))?;
            a
        }
    } else {
        let a = c.rr(d.r0, sz);
        c.rw(d.r1, sz, a);
        c.rw(d.r0, sz, a.wrapping_add(b));
        a
    };
    if d.k0 == KMEM {
        c.rw(d.r1, sz, a);
    }
    let r = a.wrapping_add(b) & mask(d.sz);
    c.lazy(F_ADD, d.sz, a, b, r);
    Ok(())
}

impl Cpu {
    pub(crate) fn rd_sz_lin(&mut self, lin: u64, sz: usize) -> R<u64> {
        match sz {
            1 => self.rd_lin::<1>(lin),
            2 => self.rd_lin::<2>(lin),
            4 => self.rd_lin::<4>(lin),
            _ => self.rd_lin::<8>(lin),
        }
    }
    pub(crate) fn wr_sz_lin(&mut self, lin: u64, sz: usize, v: u64) -> R {
        match sz {
            1 => self.wr_lin::<1>(lin, v),
            2 => self.wr_lin::<2>(lin, v),
            4 => self.wr_lin::<4>(lin, v),
            _ => self.wr_lin::<8>(lin, v),
        }
    }
}

fn bswap(c: &mut Cpu, d: &Insn) -> R {
    let v = c.rr(d.r0, d.sz as usize);
    let r = match d.sz {
        4 => (v as u32).swap_bytes() as u64,
        8 => v.swap_bytes(),
        _ => 0,
    };
    c.rw(d.r0, d.sz as usize, r);
    Ok(())
}

fn movbe(c: &mut Cpu, d: &Insn) -> R {
    let sz = d.sz as usize;
    let swap = |v: u64| match sz {
        2 => (v as u16).swap_bytes() as u64,
        4 => (v as u32).swap_bytes() as u64,
        _ => v.swap_bytes(),
    };
    if d.k0 == KREG {
        let v = c.opr(d, 1, sz)?;
        c.rw(d.r0, sz, swap(v));
    } else {
        let v = c.rr(d.r1, sz);
        c.opw(d, 0, sz, swap(v))?;
    }
    Ok(())
}

fn cbw(c: &mut Cpu, d: &Insn) -> R {
    // CBW/CWDE/CDQE: sz is the destination size.
    let sz = d.sz;
    let half = sz / 2;
    let v = sx(c.rr(0, half as usize), half);
    c.rw(0, sz as usize, v);
    Ok(())
}

fn cwd(c: &mut Cpu, d: &Insn) -> R {
    let sz = d.sz;
    let v = c.rr(0, sz as usize);
    let hi = if v & sign(sz) != 0 { u64::MAX } else { 0 };
    c.rw(2, sz as usize, hi);
    Ok(())
}

// ---------------------------------------------------------------------- INC/DEC/NEG/NOT

fn incdec_r<const DEC: bool, const S: usize>(c: &mut Cpu, d: &Insn) -> R {
    let a = c.rr(d.r0, S);
    let r = if DEC {
        a.wrapping_sub(1)
    } else {
        a.wrapping_add(1)
    } & mask(S as u8);
    c.rw(d.r0, S, r);
    let cf = c.cf() as u64;
    c.lazy(if DEC { F_DEC } else { F_INC }, S as u8, a, 1, r);
    c.f_cin = cf;
    Ok(())
}

/// INC/DEC of a memory operand without LOCK.
fn incdec_m<const DEC: bool, const S: usize>(c: &mut Cpu, d: &Insn) -> R {
    let lin = c.mlin(d, S, true)?;
    let a = c.rd_lin::<S>(lin)?;
    let r = if DEC {
        a.wrapping_sub(1)
    } else {
        a.wrapping_add(1)
    } & mask(S as u8);
    c.wr_lin::<S>(lin, r)?;
    let cf = c.cf() as u64;
    c.lazy(if DEC { F_DEC } else { F_INC }, S as u8, a, 1, r);
    c.f_cin = cf;
    Ok(())
}

fn incdec(c: &mut Cpu, d: &Insn) -> R {
    let dec = d.i.mnemonic() == Mnemonic::Dec;
    let sz = d.sz as usize;
    let f = |a: u64| if dec { a.wrapping_sub(1) } else { a.wrapping_add(1) } & mask(d.sz);
    let a = if d.lock {
        rmw(c, d, sz, |a| Some(f(a)))?
    } else {
        let lin = c.mlin(d, sz, true)?;
        let a = c.rd_sz_lin(lin, sz)?;
        c.wr_sz_lin(lin, sz, f(a))?;
        a
    };
    let cf = c.cf() as u64;
    c.lazy(if dec { F_DEC } else { F_INC }, d.sz, a, 1, f(a));
    c.f_cin = cf;
    Ok(())
}

fn neg(c: &mut Cpu, d: &Insn) -> R {
    let sz = d.sz as usize;
    let f = |a: u64| 0u64.wrapping_sub(a) & mask(d.sz);
    let a = if d.lock {
        rmw(c, d, sz, |a| Some(f(a)))?
    } else {
        let a = c.opr(d, 0, sz)?;
        c.opw(d, 0, sz, f(a))?;
        a
    };
    c.lazy(F_SUB, d.sz, 0, a, f(a));
    Ok(())
}

fn not(c: &mut Cpu, d: &Insn) -> R {
    let sz = d.sz as usize;
    if d.lock {
        rmw(c, d, sz, |a| Some(!a & mask(d.sz)))?;
    } else {
        let a = c.opr(d, 0, sz)?;
        c.opw(d, 0, sz, !a)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------- shifts

fn shift(c: &mut Cpu, d: &Insn) -> R {
    let sz = d.sz;
    let bits = sz as u32 * 8;
    let m = d.i.mnemonic();
    let raw = if d.k1 == KREG {
        c.gpr[1] & 0xff
    } else {
        d.imm & 0xff
    };
    let count = (raw & if sz == 8 { 0x3f } else { 0x1f }) as u32;
    let lin = if d.k0 == KMEM {
        Some(c.mlin(d, sz as usize, true)?)
    } else {
        None
    };
    let a = match lin {
        Some(l) => c.rd_sz_lin(l, sz as usize)?,
        None => c.rr(d.r0, sz as usize),
    };
    let msk = mask(sz);
    let sgn = sign(sz);
    if count == 0 {
        // No flags change; a 32-bit register destination is still zero-extended.
        if lin.is_none() {
            c.rw(d.r0, sz as usize, a);
        }
        return Ok(());
    }
    let oldf = c.get_rflags();
    let old_cf = oldf & CF;
    let (r, f): (u64, u64) = match m {
        Mnemonic::Shl | Mnemonic::Sal => {
            let r = if count >= 64 { 0 } else { (a << count) & msk };
            let cf = if count <= bits {
                (a >> (bits - count)) & 1
            } else {
                0
            };
            let of = ((r & sgn != 0) as u64) ^ cf;
            (r, szp(r, sz) | AF | cf | (of * OF))
        }
        Mnemonic::Shr => {
            let r = if count >= 64 { 0 } else { a >> count };
            let cf = if count <= bits {
                (a >> (count - 1)) & 1
            } else {
                0
            };
            // OF as computed by the last 1-bit step (AMD): the MSB before it.
            let of = (count == 1 && a & sgn != 0) as u64;
            (r, szp(r, sz) | AF | cf | (of * OF))
        }
        Mnemonic::Sar => {
            let s = sx(a, sz) as i64;
            let r = (s >> count.min(63)) as u64 & msk;
            let cf = ((s >> (count - 1).min(63)) & 1) as u64;
            (r, szp(r, sz) | AF | cf)
        }
        Mnemonic::Rol => {
            let n = count % bits;
            let r = if n == 0 {
                a
            } else {
                ((a << n) | (a >> (bits - n))) & msk
            };
            let cf = r & 1;
            let of = ((r & sgn != 0) as u64) ^ cf;
            (r, (oldf & !(CF | OF)) | cf | (of * OF))
        }
        Mnemonic::Ror => {
            let n = count % bits;
            let r = if n == 0 {
                a
            } else {
                ((a >> n) | (a << (bits - n))) & msk
            };
            let cf = (r & sgn != 0) as u64;
            let of = cf ^ ((r >> (bits - 2)) & 1);
            (r, (oldf & !(CF | OF)) | cf | (of * OF))
        }
        Mnemonic::Rcl => {
            let n = count % (bits + 1);
            let wide = (a as u128) | ((old_cf as u128) << bits);
            let w = bits + 1;
            let rot = if n == 0 {
                wide
            } else {
                ((wide << n) | (wide >> (w - n))) & ((1u128 << w) - 1)
            };
            let r = (rot as u64) & msk;
            let cf = ((rot >> bits) & 1) as u64;
            let of = ((r & sgn != 0) as u64) ^ cf;
            (r, (oldf & !(CF | OF)) | cf | (of * OF))
        }
        Mnemonic::Rcr => {
            let n = count % (bits + 1);
            let wide = (a as u128) | ((old_cf as u128) << bits);
            let w = bits + 1;
            let rot = if n == 0 {
                wide
            } else {
                ((wide >> n) | (wide << (w - n))) & ((1u128 << w) - 1)
            };
            let r = (rot as u64) & msk;
            let cf = ((rot >> bits) & 1) as u64;
            let of = ((r & sgn != 0) as u64) ^ ((r >> (bits - 2)) & 1);
            (r, (oldf & !(CF | OF)) | cf | (of * OF))
        }
        _ => return crate::ud(),
    };
    match lin {
        Some(l) => c.wr_sz_lin(l, sz as usize, r)?,
        None => c.rw(d.r0, sz as usize, r),
    }
    c.set_arith(f);
    Ok(())
}

const K_SHL: u8 = 0;
const K_SHR: u8 = 1;
const K_SAR: u8 = 2;
const K_ROL: u8 = 3;
const K_ROR: u8 = 4;

/// Fast path: SHL/SHR/SAR/ROL/ROR of a register by an immediate (same results and flags as
/// `shift`).
fn shift_ri<const K: u8, const S: usize>(c: &mut Cpu, d: &Insn) -> R {
    let sz = S as u8;
    let bits = S as u32 * 8;
    let count = (d.imm & if S == 8 { 0x3f } else { 0x1f }) as u32;
    let a = c.rr(d.r0, S);
    if count == 0 {
        c.rw(d.r0, S, a);
        return Ok(());
    }
    let msk = mask(sz);
    let sgn = sign(sz);
    match K {
        K_SHL => {
            let r = if count >= 64 { 0 } else { (a << count) & msk };
            let cf = if count <= bits {
                (a >> (bits - count)) & 1
            } else {
                0
            };
            let of = ((r & sgn != 0) as u64) ^ cf;
            c.rw(d.r0, S, r);
            c.set_arith(szp(r, sz) | AF | cf | (of * OF));
        }
        K_SHR => {
            let r = if count >= 64 { 0 } else { a >> count };
            let cf = if count <= bits {
                (a >> (count - 1)) & 1
            } else {
                0
            };
            let of = (count == 1 && a & sgn != 0) as u64;
            c.rw(d.r0, S, r);
            c.set_arith(szp(r, sz) | AF | cf | (of * OF));
        }
        K_SAR => {
            let sa = sx(a, sz) as i64;
            let r = (sa >> count.min(63)) as u64 & msk;
            let cf = ((sa >> (count - 1).min(63)) & 1) as u64;
            c.rw(d.r0, S, r);
            c.set_arith(szp(r, sz) | AF | cf);
        }
        _ => {
            let n = count % bits;
            let r = if n == 0 {
                a
            } else if K == K_ROL {
                ((a << n) | (a >> (bits - n))) & msk
            } else {
                ((a >> n) | (a << (bits - n))) & msk
            };
            let (cf, of) = if K == K_ROL {
                let cf = r & 1;
                (cf, ((r & sgn != 0) as u64) ^ cf)
            } else {
                let cf = (r & sgn != 0) as u64;
                (cf, cf ^ ((r >> (bits - 2)) & 1))
            };
            c.rw(d.r0, S, r);
            c.set_some(CF | OF, cf | (of * OF));
        }
    }
    Ok(())
}

macro_rules! shift_ri_sel {
    ($k:expr, $sz:expr) => {
        match $sz {
            1 => shift_ri::<$k, 1> as Handler,
            2 => shift_ri::<$k, 2> as Handler,
            4 => shift_ri::<$k, 4> as Handler,
            _ => shift_ri::<$k, 8> as Handler,
        }
    };
}

/// IMUL r, r/m with register operands (fast path of `imul_n`).
fn imul_rr<const S: usize>(c: &mut Cpu, d: &Insn) -> R {
    let sz = S as u8;
    let a = c.rr(d.r0, S);
    let b = if d.k2 == KIMM {
        let v = c.rr(d.r1, S);
        let p = (sx(v, sz) as i64 as i128) * (sx(d.imm & mask(sz), sz) as i64 as i128);
        return imul_finish::<S>(c, d, p);
    } else {
        c.rr(d.r1, S)
    };
    let p = (sx(a, sz) as i64 as i128) * (sx(b, sz) as i64 as i128);
    imul_finish::<S>(c, d, p)
}

#[inline(always)]
fn imul_finish<const S: usize>(c: &mut Cpu, d: &Insn, p: i128) -> R {
    let sz = S as u8;
    let lo = (p as u64) & mask(sz);
    let ovf = sx(lo, sz) as i64 as i128 != p;
    c.rw(d.r0, S, lo);
    c.set_some(CF | OF, if ovf { CF | OF } else { 0 });
    Ok(())
}

fn shxd(c: &mut Cpu, d: &Insn) -> R {
    let sz = d.sz;
    let bits = sz as u32 * 8;
    let left = d.i.mnemonic() == Mnemonic::Shld;
    let raw = if d.k2 == KREG {
        c.gpr[1] & 0xff
    } else {
        d.imm & 0xff
    };
    let count = (raw & if sz == 8 { 0x3f } else { 0x1f }) as u32;
    let lin = if d.k0 == KMEM {
        Some(c.mlin(d, sz as usize, true)?)
    } else {
        None
    };
    let a = match lin {
        Some(l) => c.rd_sz_lin(l, sz as usize)?,
        None => c.rr(d.r0, sz as usize),
    };
    let b = c.rr(d.r1, sz as usize);
    if count == 0 {
        if lin.is_none() {
            c.rw(d.r0, sz as usize, a);
        }
        return Ok(());
    }
    let msk = mask(sz);
    // Build a 2*bits-wide value and shift it (counts above `bits` for 16-bit operands
    // shift the source pattern through, as AMD does).
    let (r, cf) = if left {
        let wide: u128 = ((a as u128) << bits) | b as u128;
        // 16-bit operands with counts above 16: AMD shifts the 48-bit value a:b:b.
        let wide = if bits == 16 {
            (wide << 16) | b as u128
        } else {
            wide
        };
        let total = if bits == 16 { 48 } else { 2 * bits };
        let sh = wide << count;
        let r = ((sh >> (total - bits)) as u64) & msk;
        let cf = ((wide >> (total - count)) & 1) as u64;
        (r, cf)
    } else {
        let wide: u128 = ((b as u128) << bits) | a as u128;
        let wide = if bits == 16 {
            wide | ((b as u128) << 32)
        } else {
            wide
        };
        let r = ((wide >> count) as u64) & msk;
        let cf = ((wide >> (count - 1)) & 1) as u64;
        (r, cf)
    };
    // OF as the last 1-bit step computes it (AMD Zen); AF is set.
    let mut of = if left {
        ((r & sign(sz) != 0) as u64) ^ cf
    } else {
        ((r & sign(sz) != 0) as u64) ^ ((r >> (bits - 2)) & 1)
    };
    let mut cf = cf;
    if bits == 16 && count >= 16 {
        // AMD Zen: CF clear above 16; SHLD sets OF = CF (architecturally undefined).
        if count > 16 {
            cf = 0;
        }
        if left {
            of = cf;
        }
    }
    match lin {
        Some(l) => c.wr_sz_lin(l, sz as usize, r)?,
        None => c.rw(d.r0, sz as usize, r),
    }
    c.set_arith(szp(r, sz) | AF | cf | (of * OF));
    Ok(())
}

// ---------------------------------------------------------------------- MUL/DIV

fn mul1(c: &mut Cpu, d: &Insn) -> R {
    let sz = d.sz;
    let signed = d.i.mnemonic() == Mnemonic::Imul;
    let src = c.opr(d, 0, sz as usize)?;
    let acc = c.rr(0, sz as usize);
    let bits = sz as u32 * 8;
    let (lo, hi, ovf) = if signed {
        let p = (sx(acc, sz) as i64 as i128) * (sx(src, sz) as i64 as i128);
        let lo = (p as u64) & mask(sz);
        let hi = ((p >> bits) as u64) & mask(sz);
        let fits = sx(lo, sz) as i64 as i128 == p;
        (lo, hi, !fits)
    } else {
        let p = (acc as u128) * (src as u128);
        let lo = (p as u64) & mask(sz);
        let hi = ((p >> bits) as u64) & mask(sz);
        (lo, hi, hi != 0)
    };
    if sz == 1 {
        c.rw(0, 2, lo | (hi << 8));
    } else {
        c.rw(0, sz as usize, lo);
        c.rw(2, sz as usize, hi);
    }
    // AMD leaves SF/ZF/AF/PF unchanged (architecturally undefined).
    c.set_some(CF | OF, if ovf { CF | OF } else { 0 });
    Ok(())
}

fn imul_n(c: &mut Cpu, d: &Insn) -> R {
    // IMUL r, r/m (2 operands) or IMUL r, r/m, imm (3 operands).
    let sz = d.sz;
    let (a, b) = if d.k2 == KIMM {
        (c.opr(d, 1, sz as usize)?, d.imm & mask(sz))
    } else {
        (c.rr(d.r0, sz as usize), c.opr(d, 1, sz as usize)?)
    };
    let p = (sx(a, sz) as i64 as i128) * (sx(b, sz) as i64 as i128);
    let lo = (p as u64) & mask(sz);
    let ovf = sx(lo, sz) as i64 as i128 != p;
    c.rw(d.r0, sz as usize, lo);
    c.set_some(CF | OF, if ovf { CF | OF } else { 0 });
    Ok(())
}

fn div(c: &mut Cpu, d: &Insn) -> R {
    let sz = d.sz;
    let signed = d.i.mnemonic() == Mnemonic::Idiv;
    let src = c.opr(d, 0, sz as usize)?;
    let bits = sz as u32 * 8;
    let de = Err(crate::Stop::Exc(Exc::new(vector::DE)));
    if src & mask(sz) == 0 {
        return de;
    }
    let (lo, hi) = if sz == 1 {
        (c.gpr[0] & 0xff, (c.gpr[0] >> 8) & 0xff)
    } else {
        (c.rr(0, sz as usize), c.rr(2, sz as usize))
    };
    let dividend: u128 = ((hi as u128) << bits) | lo as u128;
    let (q, r) = if signed {
        // Sign-extend the 2*bits-wide dividend.
        let sh = 128 - 2 * bits;
        let n = ((dividend << sh) as i128) >> sh;
        let dv = sx(src, sz) as i64 as i128;
        // i128::MIN / -1 (possible for 64-bit operands) overflows: that is a #DE too.
        let (Some(q), Some(r)) = (n.checked_div(dv), n.checked_rem(dv)) else {
            return de;
        };
        let min = -(1i128 << (bits - 1));
        let max = (1i128 << (bits - 1)) - 1;
        if q < min || q > max {
            return de;
        }
        ((q as u64) & mask(sz), (r as u64) & mask(sz))
    } else {
        let q = dividend / src as u128;
        let r = dividend % src as u128;
        if q > mask(sz) as u128 {
            return de;
        }
        (q as u64, r as u64)
    };
    if sz == 1 {
        c.rw(0, 2, q | (r << 8));
    } else {
        c.rw(0, sz as usize, q);
        c.rw(2, sz as usize, r);
    }
    // Architecturally undefined; AMD Zen keeps CF/OF, sets AF and clears SF/ZF/PF.
    let old = c.get_rflags();
    c.set_arith((old & (CF | OF)) | AF);
    Ok(())
}

// ---------------------------------------------------------------------- bit ops

fn bt(c: &mut Cpu, d: &Insn) -> R {
    let sz = d.sz as usize;
    let bits = sz as u64 * 8;
    let m = d.i.mnemonic();
    let off = if d.k1 == KREG { c.rr(d.r1, sz) } else { d.imm };
    let apply = |v: u64, bit: u64| -> Option<u64> {
        match m {
            Mnemonic::Bts => Some(v | (1 << bit)),
            Mnemonic::Btr => Some(v & !(1 << bit)),
            Mnemonic::Btc => Some(v ^ (1 << bit)),
            _ => None,
        }
    };
    let cf;
    if d.k0 == KREG {
        let bit = off & (bits - 1);
        let v = c.rr(d.r0, sz);
        cf = (v >> bit) & 1;
        if let Some(n) = apply(v, bit) {
            c.rw(d.r0, sz, n);
        }
    } else {
        // Memory: a register offset is signed and may address outside the operand.
        let (delta, bit) = if d.k1 == KREG {
            let s = sx(off, sz as u8) as i64;
            (
                s.div_euclid(bits as i64) * sz as i64,
                s.rem_euclid(bits as i64) as u64,
            )
        } else {
            (0, off & (bits - 1))
        };
        let ea = c.ea(d).wrapping_add(delta as u64) & d.amask;
        let seg = d.seg as usize;
        if m == Mnemonic::Bt {
            let v = c.rd_sz(seg, ea, sz as u8)?;
            cf = (v >> bit) & 1;
        } else if d.lock {
            let mut dd = d.clone();
            dd.disp = ea;
            dd.base = super::B_NONE;
            dd.index = super::B_NONE;
            let old = rmw(c, &dd, sz, |v| apply(v, bit))?;
            cf = (old >> bit) & 1;
        } else {
            let lin = c.lin(seg, ea, sz, true)?;
            let v = c.rd_sz_lin(lin, sz)?;
            cf = (v >> bit) & 1;
            c.wr_sz_lin(lin, sz, apply(v, bit).unwrap_or(v))?;
        }
    }
    c.set_some(CF, cf);
    Ok(())
}

fn bitscan(c: &mut Cpu, d: &Insn) -> R {
    let sz = d.sz;
    let bits = sz as u64 * 8;
    let src = c.opr(d, 1, sz as usize)?;
    let m = d.i.mnemonic();
    let oldf = c.get_rflags();
    match m {
        Mnemonic::Bsf | Mnemonic::Bsr => {
            if src == 0 {
                // Destination unchanged (AMD documents it; Intel does the same). The
                // undefined flags follow AMD Zen: ZF and PF set, the rest clear.
                c.set_arith(ZF | PF);
            } else {
                let r = if m == Mnemonic::Bsf {
                    src.trailing_zeros() as u64
                } else {
                    63 - src.leading_zeros() as u64
                };
                c.rw(d.r0, sz as usize, r);
                c.set_arith(szp(r, sz) & !ZF);
            }
        }
        Mnemonic::Tzcnt | Mnemonic::Lzcnt => {
            let r = if src == 0 {
                bits
            } else if m == Mnemonic::Tzcnt {
                src.trailing_zeros() as u64
            } else {
                src.leading_zeros() as u64 - (64 - bits)
            };
            c.rw(d.r0, sz as usize, r);
            // Undefined flags as on AMD Zen: OF kept, SF/AF/PF cleared.
            let f = (if src == 0 { CF } else { 0 }) | (if r == 0 { ZF } else { 0 });
            c.set_arith(f | (oldf & OF));
        }
        _ => {
            let r = src.count_ones() as u64;
            c.rw(d.r0, sz as usize, r);
            c.set_arith(if src == 0 { ZF } else { 0 });
        }
    }
    Ok(())
}

fn cmov(c: &mut Cpu, d: &Insn) -> R {
    let sz = d.sz as usize;
    let v = c.opr(d, 1, sz)?;
    if c.cond(d.cc) {
        c.rw(d.r0, sz, v);
    } else if sz == 4 {
        let o = c.rr(d.r0, 4);
        c.rw(d.r0, 4, o);
    }
    Ok(())
}

fn setcc(c: &mut Cpu, d: &Insn) -> R {
    let v = c.cond(d.cc) as u64;
    c.opw(d, 0, 1, v)
}

fn lahf(c: &mut Cpu, _d: &Insn) -> R {
    let f = c.get_rflags();
    let ah = (f & (SF | ZF | AF | PF | CF)) | 2;
    c.rw(16, 1, ah);
    Ok(())
}

fn sahf(c: &mut Cpu, _d: &Insn) -> R {
    let ah = c.rr(16, 1);
    c.set_some(SF | ZF | AF | PF | CF, ah);
    Ok(())
}

fn flagop(c: &mut Cpu, d: &Insn) -> R {
    c.flush_flags();
    match d.i.mnemonic() {
        Mnemonic::Clc => c.rflags &= !CF,
        Mnemonic::Stc => c.rflags |= CF,
        Mnemonic::Cmc => c.rflags ^= CF,
        Mnemonic::Cld => c.rflags &= !DF,
        _ => c.rflags |= DF,
    }
    Ok(())
}

fn nop(_c: &mut Cpu, _d: &Insn) -> R {
    Ok(())
}

fn xlat(c: &mut Cpu, d: &Insn) -> R {
    let ea = c.gpr[3].wrapping_add(c.gpr[0] & 0xff) & d.amask;
    let seg = d.seg as usize;
    let v = c.rd::<1>(seg, ea)?;
    c.rw(0, 1, v);
    Ok(())
}

// BMI1 (advertised in CPUID leaf 7).
fn bmi(c: &mut Cpu, d: &Insn) -> R {
    let sz = d.sz;
    let m = d.i.mnemonic();
    let msk = mask(sz);
    let (r, cf) = match m {
        Mnemonic::Andn => {
            let a = c.rr(d.r1, sz as usize);
            let b = c.opr(d, 2, sz as usize)?;
            (!a & b & msk, 0)
        }
        Mnemonic::Bextr => {
            let src = c.opr(d, 1, sz as usize)?;
            let ctl = c.rr(d.r2, sz as usize);
            let start = ctl & 0xff;
            let len = (ctl >> 8) & 0xff;
            let v = if start >= 64 { 0 } else { src >> start };
            let v = if len >= 64 {
                v
            } else {
                v & ((1u64 << len) - 1)
            };
            (v & msk, 0)
        }
        Mnemonic::Blsi => {
            let s = c.opr(d, 1, sz as usize)?;
            (s & s.wrapping_neg() & msk, (s != 0) as u64)
        }
        Mnemonic::Blsmsk => {
            let s = c.opr(d, 1, sz as usize)?;
            ((s ^ s.wrapping_sub(1)) & msk, (s == 0) as u64)
        }
        _ => {
            let s = c.opr(d, 1, sz as usize)?;
            (s & s.wrapping_sub(1) & msk, (s == 0) as u64)
        }
    };
    c.rw(d.r0, sz as usize, r);
    // ZF/SF/PF from the result, OF clear; AF clear except for BEXTR (AMD Zen for the
    // undefined AF/PF).
    let mut f = szp(r, sz) | cf;
    if m == Mnemonic::Bextr {
        f = (f & !SF) | AF;
    }
    if m == Mnemonic::Blsmsk {
        f &= !ZF;
    }
    c.set_arith(f);
    Ok(())
}

pub(crate) fn select(m: Mnemonic, i: &Instruction, d: &mut Insn) -> Option<Handler> {
    use Mnemonic as M;
    let h: Handler = match m {
        M::Add => alu_sel::<ADD>(d)?,
        M::Or => alu_sel::<OR>(d)?,
        M::Adc => alu_sel::<ADC>(d)?,
        M::Sbb => alu_sel::<SBB>(d)?,
        M::And => alu_sel::<AND>(d)?,
        M::Sub => alu_sel::<SUB>(d)?,
        M::Xor => alu_sel::<XOR>(d)?,
        M::Cmp => alu_sel::<CMP>(d)?,
        M::Test => {
            let f = form(d)?;
            by_size_form!(d.sz, f, alu, TEST)
        }
        M::Mov => {
            // Segment, control and debug register moves are system instructions.
            if d.k0 == KREG && !i.op0_register().is_gpr()
                || d.k1 == KREG && !i.op1_register().is_gpr()
            {
                return None;
            }
            let f = form(d)?;
            by_size_form!(d.sz, f, mov_dummy, 0)
        }
        M::Movzx | M::Movsx | M::Movsxd => {
            let ss = if d.k1 == KMEM {
                i.memory_size().size() as u8
            } else {
                i.op1_register().size() as u8
            };
            let signed = m != M::Movzx;
            match (signed, ss) {
                (false, 1) => movx::<false, 1>,
                (false, 2) => movx::<false, 2>,
                (false, 4) => movx::<false, 4>,
                (true, 1) => movx::<true, 1>,
                (true, 2) => movx::<true, 2>,
                (true, 4) => movx::<true, 4>,
                _ => return None,
            }
        }
        M::Lea => {
            if d.k1 != KMEM {
                return Some(super::system::h_ud);
            }
            lea
        }
        M::Xchg => xchg,
        M::Cmpxchg => cmpxchg,
        M::Cmpxchg8b | M::Cmpxchg16b => cmpxchg8b,
        M::Xadd => xadd,
        M::Bswap => bswap,
        M::Movbe => movbe,
        M::Cbw | M::Cwde | M::Cdqe => {
            d.sz = match m {
                M::Cbw => 2,
                M::Cwde => 4,
                _ => 8,
            };
            cbw
        }
        M::Cwd | M::Cdq | M::Cqo => {
            d.sz = match m {
                M::Cwd => 2,
                M::Cdq => 4,
                _ => 8,
            };
            cwd
        }
        M::Inc | M::Dec => {
            if d.k0 == KREG {
                let dec = m == M::Dec;
                match (dec, d.sz) {
                    (false, 1) => incdec_r::<false, 1>,
                    (false, 2) => incdec_r::<false, 2>,
                    (false, 4) => incdec_r::<false, 4>,
                    (false, _) => incdec_r::<false, 8>,
                    (true, 1) => incdec_r::<true, 1>,
                    (true, 2) => incdec_r::<true, 2>,
                    (true, 4) => incdec_r::<true, 4>,
                    (true, _) => incdec_r::<true, 8>,
                }
            } else if d.lock {
                incdec
            } else {
                let dec = m == M::Dec;
                match (dec, d.sz) {
                    (false, 1) => incdec_m::<false, 1>,
                    (false, 2) => incdec_m::<false, 2>,
                    (false, 4) => incdec_m::<false, 4>,
                    (false, _) => incdec_m::<false, 8>,
                    (true, 1) => incdec_m::<true, 1>,
                    (true, 2) => incdec_m::<true, 2>,
                    (true, 4) => incdec_m::<true, 4>,
                    (true, _) => incdec_m::<true, 8>,
                }
            }
        }
        M::Neg => neg,
        M::Not => not,
        M::Shl | M::Sal | M::Shr | M::Sar | M::Rol | M::Ror if d.k0 == KREG && d.k1 == KIMM => {
            match m {
                M::Shl | M::Sal => shift_ri_sel!(K_SHL, d.sz),
                M::Shr => shift_ri_sel!(K_SHR, d.sz),
                M::Sar => shift_ri_sel!(K_SAR, d.sz),
                M::Rol => shift_ri_sel!(K_ROL, d.sz),
                _ => shift_ri_sel!(K_ROR, d.sz),
            }
        }
        M::Shl | M::Sal | M::Shr | M::Sar | M::Rol | M::Ror | M::Rcl | M::Rcr => shift,
        M::Shld | M::Shrd => shxd,
        M::Mul => mul1,
        M::Imul => {
            if i.op_count() == 1 {
                mul1
            } else if d.k1 == KREG {
                match d.sz {
                    2 => imul_rr::<2>,
                    4 => imul_rr::<4>,
                    _ => imul_rr::<8>,
                }
            } else {
                imul_n
            }
        }
        M::Div | M::Idiv => div,
        M::Bt | M::Bts | M::Btr | M::Btc => bt,
        M::Bsf | M::Bsr | M::Tzcnt | M::Lzcnt | M::Popcnt => bitscan,
        M::Cmovo
        | M::Cmovno
        | M::Cmovb
        | M::Cmovae
        | M::Cmove
        | M::Cmovne
        | M::Cmovbe
        | M::Cmova
        | M::Cmovs
        | M::Cmovns
        | M::Cmovp
        | M::Cmovnp
        | M::Cmovl
        | M::Cmovge
        | M::Cmovle
        | M::Cmovg => cmov,
        M::Seto
        | M::Setno
        | M::Setb
        | M::Setae
        | M::Sete
        | M::Setne
        | M::Setbe
        | M::Seta
        | M::Sets
        | M::Setns
        | M::Setp
        | M::Setnp
        | M::Setl
        | M::Setge
        | M::Setle
        | M::Setg => setcc,
        M::Lahf => lahf,
        M::Sahf => sahf,
        M::Clc | M::Stc | M::Cmc | M::Cld | M::Std => flagop,
        M::Nop => nop,
        M::Xlatb => xlat,
        M::Andn | M::Bextr | M::Blsi | M::Blsmsk | M::Blsr => bmi,
        _ => return None,
    };
    Some(h)
}
