//! MMX: the MMX instruction set, the SSE/SSE2 integer instructions on MMX registers
//! (PSHUFW, PINSRW, PEXTRW, PMOVMSKB, PMINUB/PMAXUB/PMINSW/PMAXSW, PAVGB/PAVGW, PSADBW,
//! PMULHUW, PADDQ/PSUBQ/PMULUDQ, MASKMOVQ, MOVNTQ), MOVQ2DQ/MOVDQ2Q, the MMX<->SSE
//! conversions (CVTPI2PS, CVTPS2PI, CVTTPS2PI, CVTPI2PD, CVTPD2PI, CVTTPD2PI) and EMMS.
//! (SSSE3 and 3DNow! forms on MMX registers are not advertised and raise #UD.)
//!
//! # State: MMn is the significand of x87 physical register Rn
//!
//! There is no separate MMX register file: MMn is bits 63:0 of physical register Rn of
//! [`X87`](super::x87::X87), independent of TOP. Every MMX instruction except EMMS
//! performs the x87-to-MMX transition (Intel SDM vol. 3 §12.2, table 12-2; AMD APM vol. 1
//! §5.3.2): TOP := 0 and every tag valid (abridged tag word 0xFF); other FSW bits, FCW and
//! the last-instruction pointers are left alone. Writing MMn also sets bits 79:64 of Rn
//! (sign and exponent) to 0xFFFF; reading leaves them. EMMS empties every tag and also sets
//! TOP := 0 (table 12-2; measured on the host). FXSAVE therefore stores MM0..MM7 as
//! ST(0)..ST(7) after any MMX instruction, and FNSTENV computes "special" tags for them.
//!
//! Exceptions, in order, before anything changes: #UD with CR0.EM; #NM with CR0.TS; #MF
//! when an unmasked x87 exception is pending (FSW.ES, reported as for waiting x87
//! instructions: only with CR0.NE); then the memory operand's faults. The instructions with
//! an XMM operand (MOVQ2DQ, MOVDQ2Q, the conversions) are SSE instructions and also raise
//! #UD when CR4.OSFXSR is clear; those on MMX registers only do not check OSFXSR (AMD APM
//! vol. 5, "64-bit media" exception tables; Intel lists PSHUFW and MOVNTQ). CVTPI2PS and
//! CVTPI2PD with a *memory* source touch no MMX register: they neither transition nor take
//! a pending x87 exception (Intel SDM, CVTPI2PD; measured on the host for both). An unmasked
//! SIMD floating-point exception of a conversion (#XM, or #UD without CR4.OSXMMEXCPT)
//! leaves the destination unchanged but the transition has happened, as measured on the
//! host. MASKMOVQ with an all-zero mask accesses no memory (the architecture leaves
//! faults implementation-dependent); otherwise it checks the whole quadword for writing and
//! then writes only the selected bytes.
//!
//! # Design: packed arithmetic on host XMM registers, data movement in Rust
//!
//! The element-wise arithmetic (PADD/PSUB with and without saturation, PMULLW/PMULHW/
//! PMULHUW/PMULUDQ, PMADDWD, the logic ops, PCMPEQ/PCMPGT, PMIN/PMAX, PAVG, PSADBW and the
//! shifts by register, memory or immediate count) runs on the *host* through the SSE2
//! operations of `sse.rs`: the two 64-bit operands go into the low halves of host XMM
//! registers (upper halves zero) and the SSE2 instruction of the same mnemonic runs; the low
//! 64 bits of its result are the MMX result. This is exact because each of these SSE2
//! instructions computes its low quadword from the low quadwords of its operands alone, by
//! the same per-element rule as the MMX form: per byte/word/dword lanes, PMULUDQ and PSADBW
//! per quadword, PMADDWD per dword (from two words), and the shifts take their count from
//! the low 64 bits of the source exactly as the MMX shifts do. The alternative — running
//! the MMX instruction itself on host MM registers — was rejected: it would load the host
//! x87 tag word and TOP, so every operation would need an EMMS (or a full FXSAVE/FXRSTOR of
//! the host state) to leave the host FPU as the Rust ABI requires, and it would add a
//! second set of `asm!` blocks whose safety arguments differ from the SSE ones, for no
//! difference in results (packed-integer results are fully defined by the architecture).
//! The conversions run the same way on the SSE2 instruction without the MMX operand
//! (CVTPI2PS = CVTDQ2PS, CVTPI2PD = CVTDQ2PD, CVT(T)PS2PI = CVT(T)PS2DQ, CVT(T)PD2PI =
//! CVT(T)PD2DQ; the unused upper lanes hold +0.0 or 0, which raise no flags) under the
//! guest's MXCSR, with the flags merged and unmasked exceptions raised as in `sse.rs`.
//! Packs, unpacks, PSHUFW, PINSRW/PEXTRW, PMOVMSKB and the moves are done in Rust: the
//! SSE2 packs and high unpacks do not compute their low quadword from the low quadwords.

use super::sse::{self, XOp};
use super::{Handler, Insn, KIMM, KMEM, KREG};
use crate::{Cpu, Exc, Stop, R};
use esvm_arch::bits::{cr0, vector};
use iced_x86::{Instruction, Mnemonic, OpKind, Register};

#[cfg(test)]
mod tests;

/// FSW.TOP.
const FSW_TOP: u16 = 7 << 11;
/// The low quadword of an XMM register.
const LO: u128 = u64::MAX as u128;
/// MXCSR for the packed-integer host operations (they read and raise nothing).
const INT_MXCSR: u32 = 0x1f80;

impl Cpu {
    /// MMn: the significand of physical register Rn.
    #[inline]
    pub(crate) fn mm(&self, n: u8) -> u64 {
        let r = &self.x87.r[(n & 7) as usize];
        u64::from_le_bytes([r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7]])
    }

    /// Write MMn: the significand, and all ones in the sign and exponent.
    #[inline]
    fn set_mm(&mut self, n: u8, v: u64) {
        let r = &mut self.x87.r[(n & 7) as usize];
        r[..8].copy_from_slice(&v.to_le_bytes());
        r[8] = 0xff;
        r[9] = 0xff;
    }

    /// The x87-to-MMX transition: TOP = 0, every register valid.
    #[inline]
    fn mmx_enter(&mut self) {
        self.x87.fsw &= !FSW_TOP;
        self.x87.ftw = 0xff;
    }

    /// #UD (CR0.EM), #NM (CR0.TS), #MF (a pending unmasked x87 exception).
    #[inline]
    fn mmx_check(&self) -> R {
        if self.cr0 & cr0::EM != 0 {
            return crate::ud();
        }
        if self.cr0 & cr0::TS != 0 {
            return Err(Stop::Exc(Exc::new(vector::NM)));
        }
        self.fpu_wait()
    }

    /// Operand 1 of `op mm, mm/m64` (`d.imm2` = the memory operand's size, 4 or 8).
    #[inline]
    fn mm_src(&mut self, d: &Insn) -> R<u64> {
        match d.k1 {
            KREG => Ok(self.mm(d.r1)),
            KMEM => {
                let ea = self.ea(d);
                if d.imm2 == 4 {
                    self.rd::<4>(d.seg as usize, ea)
                } else {
                    self.rd::<8>(d.seg as usize, ea)
                }
            }
            _ => Ok(d.imm & 0xff),
        }
    }
}

fn op_of(d: &Insn) -> XOp {
    // `select` sets `xop` for every handler that calls this.
    d.xop.unwrap_or(r_nop)
}

fn r_nop(_v: &mut [u128; 2], _mx: &mut u32) {}

/// `op mm, mm/m64` and `op mm, imm8`: the operation is `d.xop` (host or Rust).
fn h_op(c: &mut Cpu, d: &Insn) -> R {
    c.mmx_check()?;
    let b = c.mm_src(d)?;
    let mut v = [u128::from(c.mm(d.r0)), u128::from(b)];
    let mut mx = INT_MXCSR;
    op_of(d)(&mut v, &mut mx);
    c.mmx_enter();
    c.set_mm(d.r0, v[0] as u64);
    Ok(())
}

// ---------------------------------------------------------------------- packs, unpacks

/// Interleave the low (`high` false) or high halves of the `bits`-bit elements of `a` and
/// `b`: a0 b0 a1 b1 ...
fn interleave(a: u64, b: u64, bits: u32, high: bool) -> u64 {
    let half = 32 / bits;
    let mask = (1u64 << bits) - 1;
    (0..half).fold(0, |r, i| {
        let k = if high { i + half } else { i };
        let ea = (a >> (k * bits)) & mask;
        let eb = (b >> (k * bits)) & mask;
        r | ea << (2 * i * bits) | eb << ((2 * i + 1) * bits)
    })
}

/// Pack the `2 * bits`-bit signed elements of `a` then `b` into `bits`-bit elements,
/// saturating to `lo..=hi`.
fn pack(a: u64, b: u64, bits: u32, lo: i64, hi: i64) -> u64 {
    let n = 32 / bits;
    let wide = 2 * bits;
    let mask = (1u64 << bits) - 1;
    let elem = |x: u64, k: u32| -> u64 {
        let raw = (x >> (k * wide)) & ((1u64 << wide) - 1);
        // Sign-extend the 2*bits-bit element.
        let s = ((raw << (64 - wide)) as i64) >> (64 - wide);
        (s.clamp(lo, hi) as u64) & mask
    };
    (0..n).fold(0, |r, k| {
        r | elem(a, k) << (k * bits) | elem(b, k) << ((k + n) * bits)
    })
}

macro_rules! rust_ops {
    ($($name:ident($a:ident, $b:ident) = $e:expr;)*) => {
        $(
            fn $name(v: &mut [u128; 2], _mx: &mut u32) {
                let ($a, $b) = (v[0] as u64, v[1] as u64);
                v[0] = u128::from($e);
            }
        )*
    };
}

rust_ops! {
    r_punpcklbw(a, b) = interleave(a, b, 8, false);
    r_punpcklwd(a, b) = interleave(a, b, 16, false);
    r_punpckldq(a, b) = interleave(a, b, 32, false);
    r_punpckhbw(a, b) = interleave(a, b, 8, true);
    r_punpckhwd(a, b) = interleave(a, b, 16, true);
    r_punpckhdq(a, b) = interleave(a, b, 32, true);
    r_packsswb(a, b) = pack(a, b, 8, -128, 127);
    r_packssdw(a, b) = pack(a, b, 16, -32768, 32767);
    r_packuswb(a, b) = pack(a, b, 8, 0, 255);
}

fn h_pshufw(c: &mut Cpu, d: &Insn) -> R {
    c.mmx_check()?;
    let s = c.mm_src(d)?;
    let imm = d.imm as u32;
    let r = (0..4).fold(0u64, |r, k| {
        let w = (s >> (16 * ((imm >> (2 * k)) & 3))) & 0xffff;
        r | w << (16 * k)
    });
    c.mmx_enter();
    c.set_mm(d.r0, r);
    Ok(())
}

fn h_pinsrw(c: &mut Cpu, d: &Insn) -> R {
    c.mmx_check()?;
    let w = c.opr(d, 1, 2)? & 0xffff;
    let sh = 16 * (d.imm & 3) as u32;
    let r = (c.mm(d.r0) & !(0xffff << sh)) | w << sh;
    c.mmx_enter();
    c.set_mm(d.r0, r);
    Ok(())
}

/// PEXTRW r32/r64, mm, imm8 (the word zero-extended).
fn h_pextrw(c: &mut Cpu, d: &Insn) -> R {
    c.mmx_check()?;
    let w = (c.mm(d.r1) >> (16 * (d.imm & 3))) & 0xffff;
    c.mmx_enter();
    c.rw(d.r0, 4, w);
    Ok(())
}

/// PMOVMSKB r32/r64, mm: the sign bits of the bytes.
fn h_pmovmskb(c: &mut Cpu, d: &Insn) -> R {
    c.mmx_check()?;
    let x = c.mm(d.r1);
    let m = (0..8).fold(0u64, |m, k| m | ((x >> (8 * k + 7)) & 1) << k);
    c.mmx_enter();
    c.rw(d.r0, 4, m);
    Ok(())
}

// ---------------------------------------------------------------------- moves

/// MOVD/MOVQ mm, r/m32/64 and MOVQ mm, mm/m64 (`d.cc` = 1: the source is an MMX register;
/// `d.imm2` = the transfer size). 32-bit sources are zero-extended.
fn h_mov_to_mm(c: &mut Cpu, d: &Insn) -> R {
    c.mmx_check()?;
    let sz = d.imm2 as usize;
    let v = match d.k1 {
        KREG if d.cc == 1 => c.mm(d.r1),
        KREG => c.rr(d.r1, sz),
        _ => {
            let ea = c.ea(d);
            c.rd_sz(d.seg as usize, ea, sz as u8)?
        }
    };
    c.mmx_enter();
    c.set_mm(d.r0, v);
    Ok(())
}

/// MOVD/MOVQ r/m32/64, mm, MOVQ m64, mm and MOVNTQ m64, mm (MOVQ mm, mm is
/// `h_mov_to_mm`). A 32-bit GPR destination is zero-extended.
fn h_mov_from_mm(c: &mut Cpu, d: &Insn) -> R {
    c.mmx_check()?;
    let sz = d.imm2 as usize;
    let v = c.mm(d.r1);
    match d.k0 {
        KREG => c.rw(d.r0, sz, v),
        _ => {
            let ea = c.ea(d);
            c.wr_sz(d.seg as usize, ea, sz as u8, v)?;
        }
    }
    c.mmx_enter();
    Ok(())
}

/// MOVQ2DQ xmm, mm: zero-extended into the XMM register.
fn h_movq2dq(c: &mut Cpu, d: &Insn) -> R {
    c.sse_check()?;
    c.fpu_wait()?;
    let v = c.mm(d.r1);
    c.mmx_enter();
    c.xmm[(d.r0 & 15) as usize] = u128::from(v);
    Ok(())
}

/// MOVDQ2Q mm, xmm: the low quadword.
fn h_movdq2q(c: &mut Cpu, d: &Insn) -> R {
    c.sse_check()?;
    c.fpu_wait()?;
    let v = c.xmm[(d.r1 & 15) as usize] as u64;
    c.mmx_enter();
    c.set_mm(d.r0, v);
    Ok(())
}

/// MASKMOVQ mm1, mm2: the bytes of mm1 whose mm2 byte has its sign bit set go to
/// seg:rDI (`d.seg`; the address size masks rDI).
fn h_maskmovq(c: &mut Cpu, d: &Insn) -> R {
    c.mmx_check()?;
    let data = c.mm(d.r1);
    let mask = c.mm(d.r2);
    let sel = (0..8).fold(0u8, |s, k| s | (((mask >> (8 * k + 7)) & 1) as u8) << k);
    if sel != 0 {
        let seg = d.seg as usize;
        let ea = c.gpr[7] & d.amask;
        let lin = c.lin(seg, ea, 8, true)?;
        c.probe_write(lin, 8)?;
        let mut k = 0;
        while k < 8 {
            if sel & (1 << k) == 0 {
                k += 1;
                continue;
            }
            let start = k;
            while k < 8 && sel & (1 << k) != 0 {
                k += 1;
            }
            let n = k - start;
            let a = c.lin(seg, ea.wrapping_add(start as u64) & d.amask, n, true)?;
            c.wr_slow(a, n, u128::from(data >> (8 * start)), false)?;
        }
    }
    c.mmx_enter();
    Ok(())
}

// ---------------------------------------------------------------------- conversions

/// CVTPI2PS/CVTPI2PD xmm, mm/m64 (`d.xop`: CVTDQ2PS/CVTDQ2PD; `d.cc` = 1: only the low
/// quadword of the destination is written). A memory source does not transition.
fn h_cvt_to_xmm(c: &mut Cpu, d: &Insn) -> R {
    c.sse_check()?;
    let mmx = d.k1 == KREG;
    let s = if mmx {
        c.fpu_wait()?;
        c.mm(d.r1)
    } else {
        let ea = c.ea(d);
        c.rd::<8>(d.seg as usize, ea)?
    };
    let mut v = [0, u128::from(s)];
    let mut mx = c.host_mxcsr();
    op_of(d)(&mut v, &mut mx);
    if mmx {
        c.mmx_enter();
    }
    c.merge_mxcsr(mx)?;
    let x = &mut c.xmm[(d.r0 & 15) as usize];
    *x = if d.cc == 1 {
        (*x & !LO) | (v[0] & LO)
    } else {
        v[0]
    };
    Ok(())
}

/// CVT(T)PS2PI mm, xmm/m64 and CVT(T)PD2PI mm, xmm/m128 (`d.xop`: CVT(T)PS2DQ or
/// CVT(T)PD2DQ; `d.imm2` = the source size, 8 or 16; 16-byte memory must be aligned).
fn h_cvt_to_mm(c: &mut Cpu, d: &Insn) -> R {
    c.sse_check()?;
    c.fpu_wait()?;
    let wide = d.imm2 == 16;
    let s = match d.k1 {
        KREG => {
            let x = c.xmm[(d.r1 & 15) as usize];
            if wide {
                x
            } else {
                x & LO
            }
        }
        _ => {
            let ea = c.ea(d);
            if wide {
                let lin = c.lin(d.seg as usize, ea, 16, false)?;
                if lin & 15 != 0 {
                    return crate::gp0();
                }
                c.rd_slow(lin, 16, false)?
            } else {
                u128::from(c.rd::<8>(d.seg as usize, ea)?)
            }
        }
    };
    let mut v = [0, s];
    let mut mx = c.host_mxcsr();
    op_of(d)(&mut v, &mut mx);
    c.mmx_enter();
    c.merge_mxcsr(mx)?;
    c.set_mm(d.r0, v[0] as u64);
    Ok(())
}

/// EMMS: every register empty, TOP = 0.
fn h_emms(c: &mut Cpu, _d: &Insn) -> R {
    c.mmx_check()?;
    c.x87.fsw &= !FSW_TOP;
    c.x87.ftw = 0;
    Ok(())
}

// ---------------------------------------------------------------------- decoding

fn seg_of(r: Register) -> u8 {
    match r {
        Register::ES => crate::ES as u8,
        Register::CS => crate::CS as u8,
        Register::SS => crate::SS as u8,
        Register::FS => crate::FS as u8,
        Register::GS => crate::GS as u8,
        _ => crate::DS as u8,
    }
}

/// The packed-integer operations run on the host (see the module docs).
fn host_op(m: Mnemonic) -> Option<XOp> {
    use Mnemonic as M;
    Some(match m {
        M::Paddb => sse::x_paddb,
        M::Paddw => sse::x_paddw,
        M::Paddd => sse::x_paddd,
        M::Paddq => sse::x_paddq,
        M::Psubb => sse::x_psubb,
        M::Psubw => sse::x_psubw,
        M::Psubd => sse::x_psubd,
        M::Psubq => sse::x_psubq,
        M::Paddsb => sse::x_paddsb,
        M::Paddsw => sse::x_paddsw,
        M::Paddusb => sse::x_paddusb,
        M::Paddusw => sse::x_paddusw,
        M::Psubsb => sse::x_psubsb,
        M::Psubsw => sse::x_psubsw,
        M::Psubusb => sse::x_psubusb,
        M::Psubusw => sse::x_psubusw,
        M::Pmullw => sse::x_pmullw,
        M::Pmulhw => sse::x_pmulhw,
        M::Pmulhuw => sse::x_pmulhuw,
        M::Pmuludq => sse::x_pmuludq,
        M::Pmaddwd => sse::x_pmaddwd,
        M::Pand => sse::x_pand,
        M::Pandn => sse::x_pandn,
        M::Por => sse::x_por,
        M::Pxor => sse::x_pxor,
        M::Pcmpeqb => sse::x_pcmpeqb,
        M::Pcmpeqw => sse::x_pcmpeqw,
        M::Pcmpeqd => sse::x_pcmpeqd,
        M::Pcmpgtb => sse::x_pcmpgtb,
        M::Pcmpgtw => sse::x_pcmpgtw,
        M::Pcmpgtd => sse::x_pcmpgtd,
        M::Pminub => sse::x_pminub,
        M::Pmaxub => sse::x_pmaxub,
        M::Pminsw => sse::x_pminsw,
        M::Pmaxsw => sse::x_pmaxsw,
        M::Pavgb => sse::x_pavgb,
        M::Pavgw => sse::x_pavgw,
        M::Psadbw => sse::x_psadbw,
        M::Psllw => sse::x_psllw,
        M::Pslld => sse::x_pslld,
        M::Psllq => sse::x_psllq,
        M::Psrlw => sse::x_psrlw,
        M::Psrld => sse::x_psrld,
        M::Psrlq => sse::x_psrlq,
        M::Psraw => sse::x_psraw,
        M::Psrad => sse::x_psrad,
        _ => return None,
    })
}

/// The data-reordering operations done in Rust.
fn rust_op(m: Mnemonic) -> Option<XOp> {
    use Mnemonic as M;
    Some(match m {
        M::Punpcklbw => r_punpcklbw,
        M::Punpcklwd => r_punpcklwd,
        M::Punpckldq => r_punpckldq,
        M::Punpckhbw => r_punpckhbw,
        M::Punpckhwd => r_punpckhwd,
        M::Punpckhdq => r_punpckhdq,
        M::Packsswb => r_packsswb,
        M::Packssdw => r_packssdw,
        M::Packuswb => r_packuswb,
        _ => return None,
    })
}

/// Choose the handler of an instruction with an MMX operand (and of EMMS and CVTPI2PS/
/// CVTPI2PD with a memory source); None: not an MMX instruction (or not an implemented one:
/// the caller's fallback raises #UD).
pub(crate) fn select(m: Mnemonic, i: &Instruction, d: &mut Insn) -> Option<Handler> {
    use Mnemonic as M;
    let is_mm = |op: u32| i.op_kind(op) == OpKind::Register && i.op_register(op).is_mm();
    let is_xmm = |op: u32| i.op_kind(op) == OpKind::Register && i.op_register(op).is_xmm();
    if m == M::Emms {
        return Some(h_emms);
    }
    let conversion = matches!(m, M::Cvtpi2ps | M::Cvtpi2pd);
    if !conversion && !(0..i.op_count()).any(is_mm) {
        return None;
    }
    // The memory operand's size (partial loads: MOVD m32, PUNPCKLxx m32, PINSRW m16).
    d.imm2 = if d.k0 == KMEM || d.k1 == KMEM {
        i.memory_size().size() as u64
    } else {
        8
    };
    let mm0 = is_mm(0);
    let src_ok = d.k1 == KMEM || is_mm(1) || d.k1 == KIMM;
    if let Some(x) = host_op(m).or_else(|| rust_op(m)) {
        if !mm0 || !src_ok || i.op_count() != 2 {
            return None;
        }
        d.xop = Some(x);
        return Some(h_op);
    }
    let h: Handler = match m {
        M::Movd | M::Movq => {
            d.imm2 = if m == M::Movd { 4 } else { 8 };
            if mm0 {
                d.cc = u8::from(is_mm(1));
                h_mov_to_mm
            } else if is_mm(1) {
                h_mov_from_mm
            } else {
                return None;
            }
        }
        M::Movntq if d.k0 == KMEM && is_mm(1) => {
            d.imm2 = 8;
            h_mov_from_mm
        }
        M::Pshufw if mm0 && src_ok => h_pshufw,
        M::Pinsrw if mm0 => h_pinsrw,
        M::Pextrw if is_mm(1) => h_pextrw,
        M::Pmovmskb if is_mm(1) => h_pmovmskb,
        M::Maskmovq if is_mm(1) && is_mm(2) => {
            d.seg = seg_of(i.memory_segment());
            h_maskmovq
        }
        M::Movq2dq if is_xmm(0) && is_mm(1) => h_movq2dq,
        M::Movdq2q if mm0 && is_xmm(1) => h_movdq2q,
        M::Cvtpi2ps | M::Cvtpi2pd if is_xmm(0) && (is_mm(1) || d.k1 == KMEM) => {
            let ps = m == M::Cvtpi2ps;
            d.xop = Some(if ps { sse::x_cvtdq2ps } else { sse::x_cvtdq2pd });
            d.cc = u8::from(ps);
            h_cvt_to_xmm
        }
        M::Cvtps2pi | M::Cvttps2pi | M::Cvtpd2pi | M::Cvttpd2pi
            if mm0 && (is_xmm(1) || d.k1 == KMEM) =>
        {
            d.xop = Some(match m {
                M::Cvtps2pi => sse::x_cvtps2dq,
                M::Cvttps2pi => sse::x_cvttps2dq,
                M::Cvtpd2pi => sse::x_cvtpd2dq,
                _ => sse::x_cvttpd2dq,
            });
            d.imm2 = if matches!(m, M::Cvtpd2pi | M::Cvttpd2pi) {
                16
            } else {
                8
            };
            h_cvt_to_mm
        }
        _ => return None,
    };
    Some(h)
}
