//! SSE/SSE2 and MXCSR (FXSAVE/FXRSTOR and the x87 are in `x87.rs`).
//!
//! Floating-point and packed-integer arithmetic is executed by the *host* CPU (the only
//! supported host is x86-64, which has SSE2): the operands are loaded into host XMM
//! registers and the same instruction runs under the guest's MXCSR (rounding mode, FTZ,
//! DAZ) with all exceptions masked on the host; the exception flags it raises are merged
//! into the guest MXCSR, and an exception the guest left unmasked raises #XM (or #UD when
//! CR4.OSXMMEXCPT is clear) without writing the destination. Results — including rounding
//! modes, denormals, NaN propagation and RCPPS/RSQRTPS approximations — are therefore exactly
//! those of the host. Data movement, shuffles and conversions between integer registers are
//! done in Rust. The forms on MMX registers (and the MMX<->SSE conversions) are in
//! `mmx.rs`, which runs its packed-integer arithmetic through the host operations here.

use super::{Handler, Insn, KIMM, KMEM, KREG};
use crate::{Cpu, Exc, Stop, R};
use esvm_arch::bits::rflags::{AF, CF, OF, PF, SF, ZF};
use esvm_arch::bits::{cr0, cr4, vector};
use iced_x86::{Instruction, Mnemonic, OpKind};

/// MXCSR bits the vCPU implements (FZ, RC, masks, DAZ, flags).
pub(crate) const MXCSR_MASK: u32 = 0xffff;

/// A host-executed operation: `v[0]` = destination (in/out), `v[1]` = source; `mx` = the
/// MXCSR to run under (in) and the resulting MXCSR (out).
pub(crate) type XOp = fn(&mut [u128; 2], &mut u32);

macro_rules! xop {
    ($($name:ident = $ins:literal;)*) => {
        $(
            pub(crate) fn $name(v: &mut [u128; 2], mx: &mut u32) {
                let mut host: u32 = 0;
                // SAFETY: loads/stores only through the pointers to `v`, `mx` and `host`
                // (valid locals); the host MXCSR is saved and restored around the operation
                // and all exceptions are masked (callers force the mask bits), so the
                // instruction cannot trap.
                unsafe {
                    std::arch::asm!(
                        "stmxcsr [{h}]",
                        "ldmxcsr [{m}]",
                        "movdqu xmm0, [{v}]",
                        "movdqu xmm1, [{v} + 16]",
                        concat!($ins, " xmm0, xmm1"),
                        "movdqu [{v}], xmm0",
                        "stmxcsr [{m}]",
                        "ldmxcsr [{h}]",
                        v = in(reg) v.as_mut_ptr(),
                        m = in(reg) mx as *mut u32,
                        h = in(reg) &mut host as *mut u32,
                        out("xmm0") _,
                        out("xmm1") _,
                        options(nostack),
                    );
                }
            }
        )*
    };
}

xop! {
    x_addps = "addps"; x_addpd = "addpd"; x_addss = "addss"; x_addsd = "addsd";
    x_subps = "subps"; x_subpd = "subpd"; x_subss = "subss"; x_subsd = "subsd";
    x_mulps = "mulps"; x_mulpd = "mulpd"; x_mulss = "mulss"; x_mulsd = "mulsd";
    x_divps = "divps"; x_divpd = "divpd"; x_divss = "divss"; x_divsd = "divsd";
    x_minps = "minps"; x_minpd = "minpd"; x_minss = "minss"; x_minsd = "minsd";
    x_maxps = "maxps"; x_maxpd = "maxpd"; x_maxss = "maxss"; x_maxsd = "maxsd";
    x_sqrtps = "sqrtps"; x_sqrtpd = "sqrtpd"; x_sqrtss = "sqrtss"; x_sqrtsd = "sqrtsd";
    x_rcpps = "rcpps"; x_rcpss = "rcpss"; x_rsqrtps = "rsqrtps"; x_rsqrtss = "rsqrtss";
    x_andps = "andps"; x_andnps = "andnps"; x_orps = "orps"; x_xorps = "xorps";
    x_unpcklps = "unpcklps"; x_unpckhps = "unpckhps"; x_unpcklpd = "unpcklpd"; x_unpckhpd = "unpckhpd";
    x_cvtps2pd = "cvtps2pd"; x_cvtpd2ps = "cvtpd2ps"; x_cvtss2sd = "cvtss2sd"; x_cvtsd2ss = "cvtsd2ss";
    x_cvtdq2ps = "cvtdq2ps"; x_cvtps2dq = "cvtps2dq"; x_cvttps2dq = "cvttps2dq";
    x_cvtdq2pd = "cvtdq2pd"; x_cvtpd2dq = "cvtpd2dq"; x_cvttpd2dq = "cvttpd2dq";
    x_paddb = "paddb"; x_paddw = "paddw"; x_paddd = "paddd"; x_paddq = "paddq";
    x_psubb = "psubb"; x_psubw = "psubw"; x_psubd = "psubd"; x_psubq = "psubq";
    x_paddsb = "paddsb"; x_paddsw = "paddsw"; x_paddusb = "paddusb"; x_paddusw = "paddusw";
    x_psubsb = "psubsb"; x_psubsw = "psubsw"; x_psubusb = "psubusb"; x_psubusw = "psubusw";
    x_pand = "pand"; x_pandn = "pandn"; x_por = "por"; x_pxor = "pxor";
    x_pcmpeqb = "pcmpeqb"; x_pcmpeqw = "pcmpeqw"; x_pcmpeqd = "pcmpeqd";
    x_pcmpgtb = "pcmpgtb"; x_pcmpgtw = "pcmpgtw"; x_pcmpgtd = "pcmpgtd";
    x_pminub = "pminub"; x_pmaxub = "pmaxub"; x_pminsw = "pminsw"; x_pmaxsw = "pmaxsw";
    x_pavgb = "pavgb"; x_pavgw = "pavgw"; x_psadbw = "psadbw";
    x_pmullw = "pmullw"; x_pmulhw = "pmulhw"; x_pmulhuw = "pmulhuw"; x_pmuludq = "pmuludq";
    x_pmaddwd = "pmaddwd";
    x_punpcklbw = "punpcklbw"; x_punpcklwd = "punpcklwd"; x_punpckldq = "punpckldq"; x_punpcklqdq = "punpcklqdq";
    x_punpckhbw = "punpckhbw"; x_punpckhwd = "punpckhwd"; x_punpckhdq = "punpckhdq"; x_punpckhqdq = "punpckhqdq";
    x_packsswb = "packsswb"; x_packssdw = "packssdw"; x_packuswb = "packuswb";
    x_psllw = "psllw"; x_pslld = "pslld"; x_psllq = "psllq";
    x_psrlw = "psrlw"; x_psrld = "psrld"; x_psrlq = "psrlq";
    x_psraw = "psraw"; x_psrad = "psrad";
    x_cmpeqps = "cmpeqps"; x_cmpltps = "cmpltps"; x_cmpleps = "cmpleps"; x_cmpunordps = "cmpunordps";
    x_cmpneqps = "cmpneqps"; x_cmpnltps = "cmpnltps"; x_cmpnleps = "cmpnleps"; x_cmpordps = "cmpordps";
    x_cmpeqpd = "cmpeqpd"; x_cmpltpd = "cmpltpd"; x_cmplepd = "cmplepd"; x_cmpunordpd = "cmpunordpd";
    x_cmpneqpd = "cmpneqpd"; x_cmpnltpd = "cmpnltpd"; x_cmpnlepd = "cmpnlepd"; x_cmpordpd = "cmpordpd";
    x_cmpeqss = "cmpeqss"; x_cmpltss = "cmpltss"; x_cmpless = "cmpless"; x_cmpunordss = "cmpunordss";
    x_cmpneqss = "cmpneqss"; x_cmpnltss = "cmpnltss"; x_cmpnless = "cmpnless"; x_cmpordss = "cmpordss";
    x_cmpeqsd = "cmpeqsd"; x_cmpltsd = "cmpltsd"; x_cmplesd = "cmplesd"; x_cmpunordsd = "cmpunordsd";
    x_cmpneqsd = "cmpneqsd"; x_cmpnltsd = "cmpnltsd"; x_cmpnlesd = "cmpnlesd"; x_cmpordsd = "cmpordsd";
}

/// COMISS/UCOMISS/COMISD/UCOMISD: returns RFLAGS.
macro_rules! xcmp {
    ($($name:ident = $ins:literal;)*) => {
        $(
            fn $name(v: &[u128; 2], mx: &mut u32) -> u64 {
                let mut host: u32 = 0;
                let f: u64;
                // SAFETY: as in `xop!`; the flags are read with PUSHF/POP (stack use allowed).
                unsafe {
                    std::arch::asm!(
                        "stmxcsr [{h}]",
                        "ldmxcsr [{m}]",
                        "movdqu xmm0, [{v}]",
                        "movdqu xmm1, [{v} + 16]",
                        concat!($ins, " xmm0, xmm1"),
                        "pushfq",
                        "pop {f}",
                        "stmxcsr [{m}]",
                        "ldmxcsr [{h}]",
                        v = in(reg) v.as_ptr(),
                        m = in(reg) mx as *mut u32,
                        h = in(reg) &mut host as *mut u32,
                        f = out(reg) f,
                        out("xmm0") _,
                        out("xmm1") _,
                    );
                }
                f
            }
        )*
    };
}

xcmp! {
    x_comiss = "comiss"; x_ucomiss = "ucomiss"; x_comisd = "comisd"; x_ucomisd = "ucomisd";
}

/// Integer → FP conversions: (xmm in/out, integer, mxcsr).
macro_rules! xcvt_from_int {
    ($($name:ident = $ins:literal, $r:literal;)*) => {
        $(
            fn $name(x: &mut u128, i: u64, mx: &mut u32) {
                let mut host: u32 = 0;
                // SAFETY: as in `xop!`.
                unsafe {
                    std::arch::asm!(
                        "stmxcsr [{h}]",
                        "ldmxcsr [{m}]",
                        "movdqu xmm0, [{x}]",
                        concat!($ins, " xmm0, {i", $r, "}"),
                        "movdqu [{x}], xmm0",
                        "stmxcsr [{m}]",
                        "ldmxcsr [{h}]",
                        x = in(reg) x as *mut u128,
                        i = in(reg) i,
                        m = in(reg) mx as *mut u32,
                        h = in(reg) &mut host as *mut u32,
                        out("xmm0") _,
                        options(nostack),
                    );
                }
            }
        )*
    };
}

xcvt_from_int! {
    x_cvtsi2ss32 = "cvtsi2ss", ":e"; x_cvtsi2ss64 = "cvtsi2ss", "";
    x_cvtsi2sd32 = "cvtsi2sd", ":e"; x_cvtsi2sd64 = "cvtsi2sd", "";
}

/// FP → integer conversions: (xmm source, mxcsr) -> integer.
macro_rules! xcvt_to_int {
    ($($name:ident = $ins:literal, $r:literal;)*) => {
        $(
            fn $name(x: u128, mx: &mut u32) -> u64 {
                let mut host: u32 = 0;
                let mut o: u64 = 0;
                // SAFETY: as in `xop!`.
                unsafe {
                    std::arch::asm!(
                        "stmxcsr [{h}]",
                        "ldmxcsr [{m}]",
                        "movdqu xmm0, [{x}]",
                        concat!($ins, " {o", $r, "}, xmm0"),
                        "stmxcsr [{m}]",
                        "ldmxcsr [{h}]",
                        x = in(reg) &x as *const u128,
                        o = inout(reg) o,
                        m = in(reg) mx as *mut u32,
                        h = in(reg) &mut host as *mut u32,
                        out("xmm0") _,
                        options(nostack),
                    );
                }
                o
            }
        )*
    };
}

xcvt_to_int! {
    x_cvtss2si32 = "cvtss2si", ":e"; x_cvtss2si64 = "cvtss2si", "";
    x_cvttss2si32 = "cvttss2si", ":e"; x_cvttss2si64 = "cvttss2si", "";
    x_cvtsd2si32 = "cvtsd2si", ":e"; x_cvtsd2si64 = "cvtsd2si", "";
    x_cvttsd2si32 = "cvttsd2si", ":e"; x_cvttsd2si64 = "cvttsd2si", "";
}

impl Cpu {
    /// #UD/#NM checks for SSE instructions.
    #[inline]
    pub(crate) fn sse_check(&self) -> R {
        if self.cr0 & cr0::EM != 0 || self.cr4 & cr4::OSFXSR == 0 {
            return crate::ud();
        }
        if self.cr0 & cr0::TS != 0 {
            return Err(Stop::Exc(Exc::new(vector::NM)));
        }
        Ok(())
    }

    /// MXCSR to run a host operation under: guest control bits, exceptions masked, flags
    /// clear.
    #[inline]
    pub(crate) fn host_mxcsr(&self) -> u32 {
        (self.mxcsr & !0x3f) | 0x1f80
    }

    /// Merge the flags a host operation raised; Err if one is unmasked in the guest.
    #[inline]
    pub(crate) fn merge_mxcsr(&mut self, out: u32) -> R {
        let raised = out & 0x3f;
        self.mxcsr |= raised;
        let unmasked = raised & !(self.mxcsr >> 7) & 0x3f;
        if unmasked != 0 {
            return if self.cr4 & cr4::OSXMMEXCPT != 0 {
                Err(Stop::Exc(Exc::new(vector::XM)))
            } else {
                crate::ud()
            };
        }
        Ok(())
    }

    /// Read the SSE source operand `n` (register or memory of the instruction's memory
    /// size; 16-byte memory operands must be aligned when `align`).
    fn xsrc(&mut self, d: &Insn, n: u8, align: bool) -> R<u128> {
        let (k, r) = if n == 1 { (d.k1, d.r1) } else { (d.k2, d.r2) };
        match k {
            KREG => Ok(self.xmm[(r & 15) as usize]),
            KMEM => self.xload(d, align),
            _ => Ok(0),
        }
    }

    fn xload(&mut self, d: &Insn, align: bool) -> R<u128> {
        let ea = self.ea(d);
        let seg = d.seg as usize;
        match d.imm2 {
            4 => self.rd::<4>(seg, ea).map(|v| v as u128),
            8 => self.rd::<8>(seg, ea).map(|v| v as u128),
            2 => self.rd::<2>(seg, ea).map(|v| v as u128),
            _ => {
                let lin = self.lin(seg, ea, 16, false)?;
                if align && lin & 15 != 0 {
                    return crate::gp0();
                }
                self.rd_slow(lin, 16, false)
            }
        }
    }

    fn xstore(&mut self, d: &Insn, v: u128, align: bool) -> R {
        let ea = self.ea(d);
        let seg = d.seg as usize;
        match d.imm2 {
            4 => self.wr::<4>(seg, ea, v as u64),
            8 => self.wr::<8>(seg, ea, v as u64),
            _ => {
                let lin = self.lin(seg, ea, 16, true)?;
                if align && lin & 15 != 0 {
                    return crate::gp0();
                }
                self.wr_slow(lin, 16, v, false)
            }
        }
    }
}

/// Generic host-executed `op xmm, xmm/m` (the operation is `d.xop`).
fn h_xop(c: &mut Cpu, d: &Insn) -> R {
    c.sse_check()?;
    let b = c.xsrc(d, 1, true)?;
    let a = c.xmm[(d.r0 & 15) as usize];
    let mut v = [a, b];
    let mut mx = c.host_mxcsr();
    let f = xop_of(d);
    f(&mut v, &mut mx);
    c.merge_mxcsr(mx)?;
    c.xmm[(d.r0 & 15) as usize] = v[0];
    Ok(())
}

/// Shifts by an immediate: run the register-count form with the count in the source.
fn h_xop_imm(c: &mut Cpu, d: &Insn) -> R {
    c.sse_check()?;
    let a = c.xmm[(d.r0 & 15) as usize];
    let mut v = [a, (d.imm & 0xff) as u128];
    let mut mx = c.host_mxcsr();
    xop_of(d)(&mut v, &mut mx);
    c.xmm[(d.r0 & 15) as usize] = v[0];
    Ok(())
}

fn xop_of(d: &Insn) -> XOp {
    // `select` sets `xop` whenever it chooses a handler that calls this.
    d.xop.unwrap_or(x_pxor_none)
}

fn x_pxor_none(_v: &mut [u128; 2], _mx: &mut u32) {}

fn h_comis(c: &mut Cpu, d: &Insn) -> R {
    c.sse_check()?;
    let b = c.xsrc(d, 1, true)?;
    let a = c.xmm[(d.r0 & 15) as usize];
    let mut mx = c.host_mxcsr();
    let f = match d.i.mnemonic() {
        Mnemonic::Comiss => x_comiss(&[a, b], &mut mx),
        Mnemonic::Ucomiss => x_ucomiss(&[a, b], &mut mx),
        Mnemonic::Comisd => x_comisd(&[a, b], &mut mx),
        _ => x_ucomisd(&[a, b], &mut mx),
    };
    c.merge_mxcsr(mx)?;
    c.set_arith(f & (ZF | PF | CF) & !(OF | SF | AF));
    Ok(())
}

fn h_cvt_from_int(c: &mut Cpu, d: &Insn) -> R {
    c.sse_check()?;
    let wide = d.imm2 == 8;
    let i = c.opr(d, 1, if wide { 8 } else { 4 })?;
    let mut x = c.xmm[(d.r0 & 15) as usize];
    let mut mx = c.host_mxcsr();
    match (d.i.mnemonic() == Mnemonic::Cvtsi2sd, wide) {
        (false, false) => x_cvtsi2ss32(&mut x, i, &mut mx),
        (false, true) => x_cvtsi2ss64(&mut x, i, &mut mx),
        (true, false) => x_cvtsi2sd32(&mut x, i, &mut mx),
        (true, true) => x_cvtsi2sd64(&mut x, i, &mut mx),
    }
    c.merge_mxcsr(mx)?;
    c.xmm[(d.r0 & 15) as usize] = x;
    Ok(())
}

fn h_cvt_to_int(c: &mut Cpu, d: &Insn) -> R {
    c.sse_check()?;
    let x = c.xsrc(d, 1, false)?;
    let wide = d.sz == 8;
    let mut mx = c.host_mxcsr();
    let v = match (d.i.mnemonic(), wide) {
        (Mnemonic::Cvtss2si, false) => x_cvtss2si32(x, &mut mx),
        (Mnemonic::Cvtss2si, true) => x_cvtss2si64(x, &mut mx),
        (Mnemonic::Cvttss2si, false) => x_cvttss2si32(x, &mut mx),
        (Mnemonic::Cvttss2si, true) => x_cvttss2si64(x, &mut mx),
        (Mnemonic::Cvtsd2si, false) => x_cvtsd2si32(x, &mut mx),
        (Mnemonic::Cvtsd2si, true) => x_cvtsd2si64(x, &mut mx),
        (Mnemonic::Cvttsd2si, false) => x_cvttsd2si32(x, &mut mx),
        _ => x_cvttsd2si64(x, &mut mx),
    };
    c.merge_mxcsr(mx)?;
    c.rw(d.r0, d.sz as usize, v);
    Ok(())
}

// ---------------------------------------------------------------------- moves

/// MOVAPS/MOVUPS/MOVDQA/MOVDQU/... : full 128-bit moves (`d.cc` = 1 when aligned).
fn h_mov128(c: &mut Cpu, d: &Insn) -> R {
    c.sse_check()?;
    let align = d.cc == 1;
    match (d.k0, d.k1) {
        (KREG, KREG) => c.xmm[(d.r0 & 15) as usize] = c.xmm[(d.r1 & 15) as usize],
        (KREG, _) => c.xmm[(d.r0 & 15) as usize] = c.xload(d, align)?,
        _ => {
            let v = c.xmm[(d.r1 & 15) as usize];
            c.xstore(d, v, align)?
        }
    }
    Ok(())
}

/// MOVSS/MOVSD (SSE): reg-reg merges the low element, loads zero the rest.
fn h_movs(c: &mut Cpu, d: &Insn) -> R {
    c.sse_check()?;
    let m: u128 = if d.imm2 == 4 {
        0xffff_ffff
    } else {
        u64::MAX as u128
    };
    match (d.k0, d.k1) {
        (KREG, KREG) => {
            let s = c.xmm[(d.r1 & 15) as usize] & m;
            let dst = &mut c.xmm[(d.r0 & 15) as usize];
            *dst = (*dst & !m) | s;
        }
        (KREG, _) => c.xmm[(d.r0 & 15) as usize] = c.xload(d, false)? & m,
        _ => {
            let v = c.xmm[(d.r1 & 15) as usize];
            c.xstore(d, v, false)?
        }
    }
    Ok(())
}

/// MOVD/MOVQ between XMM and GPR/memory, and MOVQ xmm, xmm/m64.
fn h_movdq(c: &mut Cpu, d: &Insn) -> R {
    c.sse_check()?;
    let sz = d.imm2 as usize;
    let m: u128 = if sz == 4 {
        0xffff_ffff
    } else {
        u64::MAX as u128
    };
    if d.k0 == KREG && d.i.op0_register().is_xmm() {
        let v = if d.k1 == KREG && d.i.op1_register().is_xmm() {
            c.xmm[(d.r1 & 15) as usize]
        } else {
            c.opr(d, 1, sz)? as u128
        };
        c.xmm[(d.r0 & 15) as usize] = v & m;
    } else {
        let v = c.xmm[(d.r1 & 15) as usize] as u64;
        c.opw(d, 0, sz, v)?;
    }
    Ok(())
}

/// MOVLPS/MOVLPD/MOVHPS/MOVHPD/MOVHLPS/MOVLHPS.
fn h_movhl(c: &mut Cpu, d: &Insn) -> R {
    c.sse_check()?;
    let lo: u128 = u64::MAX as u128;
    let high = matches!(d.i.mnemonic(), Mnemonic::Movhps | Mnemonic::Movhpd);
    match d.i.mnemonic() {
        Mnemonic::Movhlps => {
            let s = c.xmm[(d.r1 & 15) as usize] >> 64;
            let x = &mut c.xmm[(d.r0 & 15) as usize];
            *x = (*x & !lo) | s;
        }
        Mnemonic::Movlhps => {
            let s = c.xmm[(d.r1 & 15) as usize] & lo;
            let x = &mut c.xmm[(d.r0 & 15) as usize];
            *x = (*x & lo) | (s << 64);
        }
        _ => {
            if d.k0 == KREG {
                let v = c.xload(d, false)? & lo;
                let x = &mut c.xmm[(d.r0 & 15) as usize];
                *x = if high {
                    (*x & lo) | (v << 64)
                } else {
                    (*x & !lo) | v
                };
            } else {
                let x = c.xmm[(d.r1 & 15) as usize];
                let v = if high { x >> 64 } else { x & lo };
                c.xstore(d, v, false)?;
            }
        }
    }
    Ok(())
}

fn h_movmsk(c: &mut Cpu, d: &Insn) -> R {
    c.sse_check()?;
    let x = c.xmm[(d.r1 & 15) as usize];
    let v = match d.i.mnemonic() {
        Mnemonic::Movmskps => (0..4)
            .map(|i| (((x >> (32 * i + 31)) & 1) as u64) << i)
            .sum(),
        Mnemonic::Movmskpd => (0..2)
            .map(|i| (((x >> (64 * i + 63)) & 1) as u64) << i)
            .sum(),
        _ => (0..16)
            .map(|i| (((x >> (8 * i + 7)) & 1) as u64) << i)
            .sum::<u64>(),
    };
    c.rw(d.r0, d.sz.max(4) as usize, v);
    Ok(())
}

fn lanes32(x: u128) -> [u32; 4] {
    [
        x as u32,
        (x >> 32) as u32,
        (x >> 64) as u32,
        (x >> 96) as u32,
    ]
}

fn from32(l: [u32; 4]) -> u128 {
    l[0] as u128 | (l[1] as u128) << 32 | (l[2] as u128) << 64 | (l[3] as u128) << 96
}

fn h_shuffle(c: &mut Cpu, d: &Insn) -> R {
    c.sse_check()?;
    let src = c.xsrc(d, 1, true)?;
    let dst = c.xmm[(d.r0 & 15) as usize];
    let imm = d.imm as u32;
    let r = match d.i.mnemonic() {
        Mnemonic::Pshufd => {
            let s = lanes32(src);
            from32([0, 1, 2, 3].map(|i| s[((imm >> (2 * i)) & 3) as usize]))
        }
        Mnemonic::Pshuflw | Mnemonic::Pshufhw => {
            let hi = d.i.mnemonic() == Mnemonic::Pshufhw;
            let half = if hi { (src >> 64) as u64 } else { src as u64 };
            let w = |k: u32| (half >> (16 * ((imm >> (2 * k)) & 3))) & 0xffff;
            let n = (0..4).fold(0u64, |acc, k| acc | (w(k) << (16 * k)));
            if hi {
                (src & u64::MAX as u128) | ((n as u128) << 64)
            } else {
                (src & !(u64::MAX as u128)) | n as u128
            }
        }
        Mnemonic::Shufps => {
            let a = lanes32(dst);
            let b = lanes32(src);
            from32([
                a[(imm & 3) as usize],
                a[((imm >> 2) & 3) as usize],
                b[((imm >> 4) & 3) as usize],
                b[((imm >> 6) & 3) as usize],
            ])
        }
        _ => {
            // SHUFPD
            let a = [dst as u64, (dst >> 64) as u64];
            let b = [src as u64, (src >> 64) as u64];
            a[(imm & 1) as usize] as u128 | (b[((imm >> 1) & 1) as usize] as u128) << 64
        }
    };
    c.xmm[(d.r0 & 15) as usize] = r;
    Ok(())
}

fn h_byteshift(c: &mut Cpu, d: &Insn) -> R {
    c.sse_check()?;
    let n = (d.imm & 0xff).min(16) as u32 * 8;
    let x = &mut c.xmm[(d.r0 & 15) as usize];
    *x = if n >= 128 {
        0
    } else if d.i.mnemonic() == Mnemonic::Pslldq {
        *x << n
    } else {
        *x >> n
    };
    Ok(())
}

fn h_pextrw(c: &mut Cpu, d: &Insn) -> R {
    c.sse_check()?;
    let x = c.xmm[(d.r1 & 15) as usize];
    let v = ((x >> (16 * (d.imm & 7))) & 0xffff) as u64;
    c.rw(d.r0, d.sz.max(4) as usize, v);
    Ok(())
}

fn h_pinsrw(c: &mut Cpu, d: &Insn) -> R {
    c.sse_check()?;
    let v = c.opr(d, 1, 2)? as u128 & 0xffff;
    let sh = 16 * (d.imm & 7) as u32;
    let x = &mut c.xmm[(d.r0 & 15) as usize];
    *x = (*x & !(0xffffu128 << sh)) | (v << sh);
    Ok(())
}

fn h_cmp_imm(c: &mut Cpu, d: &Insn) -> R {
    // CMPPS/CMPPD/CMPSS/CMPSD xmm, xmm/m, imm8: pick the predicate's host op.
    let p = (d.imm & 7) as usize;
    const PS: [XOp; 8] = [
        x_cmpeqps,
        x_cmpltps,
        x_cmpleps,
        x_cmpunordps,
        x_cmpneqps,
        x_cmpnltps,
        x_cmpnleps,
        x_cmpordps,
    ];
    const PD: [XOp; 8] = [
        x_cmpeqpd,
        x_cmpltpd,
        x_cmplepd,
        x_cmpunordpd,
        x_cmpneqpd,
        x_cmpnltpd,
        x_cmpnlepd,
        x_cmpordpd,
    ];
    const SS: [XOp; 8] = [
        x_cmpeqss,
        x_cmpltss,
        x_cmpless,
        x_cmpunordss,
        x_cmpneqss,
        x_cmpnltss,
        x_cmpnless,
        x_cmpordss,
    ];
    const SD: [XOp; 8] = [
        x_cmpeqsd,
        x_cmpltsd,
        x_cmplesd,
        x_cmpunordsd,
        x_cmpneqsd,
        x_cmpnltsd,
        x_cmpnlesd,
        x_cmpordsd,
    ];
    let f = match d.i.mnemonic() {
        Mnemonic::Cmpps => PS[p],
        Mnemonic::Cmppd => PD[p],
        Mnemonic::Cmpss => SS[p],
        _ => SD[p],
    };
    c.sse_check()?;
    let b = c.xsrc(d, 1, true)?;
    let mut v = [c.xmm[(d.r0 & 15) as usize], b];
    let mut mx = c.host_mxcsr();
    f(&mut v, &mut mx);
    c.merge_mxcsr(mx)?;
    c.xmm[(d.r0 & 15) as usize] = v[0];
    Ok(())
}

// ---------------------------------------------------------------------- MXCSR

fn h_ldmxcsr(c: &mut Cpu, d: &Insn) -> R {
    c.sse_check()?;
    let ea = c.ea(d);
    let v = c.rd::<4>(d.seg as usize, ea)? as u32;
    if v & !MXCSR_MASK != 0 {
        return crate::gp0();
    }
    c.mxcsr = v;
    Ok(())
}

fn h_stmxcsr(c: &mut Cpu, d: &Insn) -> R {
    c.sse_check()?;
    let ea = c.ea(d);
    let v = c.mxcsr as u64;
    c.wr::<4>(d.seg as usize, ea, v)
}

fn h_movnti(c: &mut Cpu, d: &Insn) -> R {
    let v = c.rr(d.r1, d.sz as usize);
    c.opw(d, 0, d.sz as usize, v)
}

pub(crate) fn select(m: Mnemonic, i: &Instruction, d: &mut Insn) -> Option<Handler> {
    use Mnemonic as M;
    // MMX forms are handled by `mmx.rs` (selected first); nothing here takes them.
    for op in 0..i.op_count() {
        if i.op_kind(op) == OpKind::Register && i.op_register(op).is_mm() {
            return None;
        }
    }
    // Memory operand size (for partial loads/stores).
    d.imm2 = if d.k0 == KMEM || d.k1 == KMEM {
        i.memory_size().size() as u64
    } else {
        16
    };
    let x: Option<XOp> = match m {
        M::Addps => Some(x_addps),
        M::Addpd => Some(x_addpd),
        M::Addss => Some(x_addss),
        M::Addsd => Some(x_addsd),
        M::Subps => Some(x_subps),
        M::Subpd => Some(x_subpd),
        M::Subss => Some(x_subss),
        M::Subsd => Some(x_subsd),
        M::Mulps => Some(x_mulps),
        M::Mulpd => Some(x_mulpd),
        M::Mulss => Some(x_mulss),
        M::Mulsd => Some(x_mulsd),
        M::Divps => Some(x_divps),
        M::Divpd => Some(x_divpd),
        M::Divss => Some(x_divss),
        M::Divsd => Some(x_divsd),
        M::Minps => Some(x_minps),
        M::Minpd => Some(x_minpd),
        M::Minss => Some(x_minss),
        M::Minsd => Some(x_minsd),
        M::Maxps => Some(x_maxps),
        M::Maxpd => Some(x_maxpd),
        M::Maxss => Some(x_maxss),
        M::Maxsd => Some(x_maxsd),
        M::Sqrtps => Some(x_sqrtps),
        M::Sqrtpd => Some(x_sqrtpd),
        M::Sqrtss => Some(x_sqrtss),
        M::Sqrtsd => Some(x_sqrtsd),
        M::Rcpps => Some(x_rcpps),
        M::Rcpss => Some(x_rcpss),
        M::Rsqrtps => Some(x_rsqrtps),
        M::Rsqrtss => Some(x_rsqrtss),
        M::Andps | M::Andpd => Some(x_andps),
        M::Andnps | M::Andnpd => Some(x_andnps),
        M::Orps | M::Orpd => Some(x_orps),
        M::Xorps | M::Xorpd => Some(x_xorps),
        M::Unpcklps => Some(x_unpcklps),
        M::Unpckhps => Some(x_unpckhps),
        M::Unpcklpd => Some(x_unpcklpd),
        M::Unpckhpd => Some(x_unpckhpd),
        M::Cvtps2pd => Some(x_cvtps2pd),
        M::Cvtpd2ps => Some(x_cvtpd2ps),
        M::Cvtss2sd => Some(x_cvtss2sd),
        M::Cvtsd2ss => Some(x_cvtsd2ss),
        M::Cvtdq2ps => Some(x_cvtdq2ps),
        M::Cvtps2dq => Some(x_cvtps2dq),
        M::Cvttps2dq => Some(x_cvttps2dq),
        M::Cvtdq2pd => Some(x_cvtdq2pd),
        M::Cvtpd2dq => Some(x_cvtpd2dq),
        M::Cvttpd2dq => Some(x_cvttpd2dq),
        M::Paddb => Some(x_paddb),
        M::Paddw => Some(x_paddw),
        M::Paddd => Some(x_paddd),
        M::Paddq => Some(x_paddq),
        M::Psubb => Some(x_psubb),
        M::Psubw => Some(x_psubw),
        M::Psubd => Some(x_psubd),
        M::Psubq => Some(x_psubq),
        M::Paddsb => Some(x_paddsb),
        M::Paddsw => Some(x_paddsw),
        M::Paddusb => Some(x_paddusb),
        M::Paddusw => Some(x_paddusw),
        M::Psubsb => Some(x_psubsb),
        M::Psubsw => Some(x_psubsw),
        M::Psubusb => Some(x_psubusb),
        M::Psubusw => Some(x_psubusw),
        M::Pand => Some(x_pand),
        M::Pandn => Some(x_pandn),
        M::Por => Some(x_por),
        M::Pxor => Some(x_pxor),
        M::Pcmpeqb => Some(x_pcmpeqb),
        M::Pcmpeqw => Some(x_pcmpeqw),
        M::Pcmpeqd => Some(x_pcmpeqd),
        M::Pcmpgtb => Some(x_pcmpgtb),
        M::Pcmpgtw => Some(x_pcmpgtw),
        M::Pcmpgtd => Some(x_pcmpgtd),
        M::Pminub => Some(x_pminub),
        M::Pmaxub => Some(x_pmaxub),
        M::Pminsw => Some(x_pminsw),
        M::Pmaxsw => Some(x_pmaxsw),
        M::Pavgb => Some(x_pavgb),
        M::Pavgw => Some(x_pavgw),
        M::Psadbw => Some(x_psadbw),
        M::Pmullw => Some(x_pmullw),
        M::Pmulhw => Some(x_pmulhw),
        M::Pmulhuw => Some(x_pmulhuw),
        M::Pmuludq => Some(x_pmuludq),
        M::Pmaddwd => Some(x_pmaddwd),
        M::Punpcklbw => Some(x_punpcklbw),
        M::Punpcklwd => Some(x_punpcklwd),
        M::Punpckldq => Some(x_punpckldq),
        M::Punpcklqdq => Some(x_punpcklqdq),
        M::Punpckhbw => Some(x_punpckhbw),
        M::Punpckhwd => Some(x_punpckhwd),
        M::Punpckhdq => Some(x_punpckhdq),
        M::Punpckhqdq => Some(x_punpckhqdq),
        M::Packsswb => Some(x_packsswb),
        M::Packssdw => Some(x_packssdw),
        M::Packuswb => Some(x_packuswb),
        M::Psllw => Some(x_psllw),
        M::Pslld => Some(x_pslld),
        M::Psllq => Some(x_psllq),
        M::Psrlw => Some(x_psrlw),
        M::Psrld => Some(x_psrld),
        M::Psrlq => Some(x_psrlq),
        M::Psraw => Some(x_psraw),
        M::Psrad => Some(x_psrad),
        _ => None,
    };
    if let Some(x) = x {
        // Every form here is `op xmm, xmm/m` (or `op xmm, imm8` for the shifts).
        if d.k0 != KREG || !i.op0_register().is_xmm() {
            return None;
        }
        d.xop = Some(x);
        return Some(if d.k1 == KIMM { h_xop_imm } else { h_xop });
    }
    let xmm0 = d.k0 == KREG && i.op0_register().is_xmm();
    let h: Handler = match m {
        M::Comiss | M::Ucomiss | M::Comisd | M::Ucomisd => h_comis,
        M::Cvtsi2ss | M::Cvtsi2sd => {
            d.imm2 = if d.k1 == KREG {
                i.op1_register().size() as u64
            } else {
                i.memory_size().size() as u64
            };
            h_cvt_from_int
        }
        M::Cvtss2si | M::Cvttss2si | M::Cvtsd2si | M::Cvttsd2si => h_cvt_to_int,
        M::Movaps | M::Movapd | M::Movdqa | M::Movntps | M::Movntpd | M::Movntdq => {
            d.cc = 1;
            h_mov128
        }
        M::Movups | M::Movupd | M::Movdqu | M::Lddqu => {
            d.cc = 0;
            h_mov128
        }
        M::Movss => {
            d.imm2 = 4;
            h_movs
        }
        M::Movsd if !i.is_string_instruction() => {
            d.imm2 = 8;
            h_movs
        }
        M::Movd | M::Movq => {
            // Transfer size: 4 for MOVD, 8 for MOVQ.
            d.imm2 = if m == M::Movd { 4 } else { 8 };
            h_movdq
        }
        M::Movlps | M::Movlpd | M::Movhps | M::Movhpd | M::Movhlps | M::Movlhps => h_movhl,
        M::Movmskps | M::Movmskpd | M::Pmovmskb => h_movmsk,
        M::Pshufd | M::Pshuflw | M::Pshufhw | M::Shufps | M::Shufpd => h_shuffle,
        M::Pslldq | M::Psrldq => h_byteshift,
        M::Pextrw if xmm0 || i.op1_register().is_xmm() => h_pextrw,
        M::Pinsrw => h_pinsrw,
        M::Cmpps | M::Cmppd | M::Cmpss => h_cmp_imm,
        M::Cmpsd if !i.is_string_instruction() => h_cmp_imm,
        M::Ldmxcsr => h_ldmxcsr,
        M::Stmxcsr => h_stmxcsr,
        M::Movnti => h_movnti,
        _ => return None,
    };
    let _ = (AF, OF, SF);
    Some(h)
}
