//! The x87 FPU: register stack, control/status/tag words, the last-instruction pointers,
//! the FNSTENV/FNSAVE/FXSAVE memory formats and exception delivery (MMX and EMMS, which
//! share this state, are in `mmx.rs`).
//!
//! # Design: the arithmetic runs on the host FPU
//!
//! Like SSE arithmetic (`sse.rs`), every x87 instruction that computes — loads and stores
//! with conversion (m32/m64/m80 floats, m16/m32/m64 integers, packed BCD), arithmetic,
//! compares, FXAM/FTST, constants, FXCH/FFREE/FFREEP/FINCSTP/FDECSTP, FCMOVcc, and the
//! transcendentals — is executed by the *host* x87 (the only supported host is x86-64): the
//! guest's whole x87 state is loaded into the host FPU with FRSTOR, the same instruction
//! (same escape byte and ModRM; a memory operand is redirected to a buffer holding the
//! guest's bytes) runs under the guest's control word — its precision and rounding control
//! *and* its exception masks — and FNSAVE brings the state back (see `x87/host.rs`). The
//! results, the status word (C0-C3, TOP, the exception flags including SF and C1 on stack
//! faults), the tags, the masked responses (QNaN indefinite, integer indefinite, ...) and the
//! unmasked ones (destination left unchanged, no pop, re-biased results on overflow and
//! underflow to registers) are therefore exactly the host's. The consequence, as for SSE:
//! **results follow the host FPU.** Everything the architecture defines is identical on all
//! x86-64 hosts; what it leaves to the implementation — the last bits of FSIN/FCOS/FPTAN/
//! FPATAN/FYL2X/FYL2XP1/F2XM1 and their behaviour outside the documented operand ranges —
//! is that of the host's vendor, so a guest moved between an Intel and an AMD host may see
//! different transcendental results, exactly as on bare metal.
//!
//! A software implementation (e.g. Berkeley SoftFloat's `extF80` with rounding precision)
//! was considered and rejected: SoftFloat has no transcendentals, FPREM/FPREM1 partial
//! remainders, FXTRACT, FBLD/FBSTP or x87 special encodings (pseudo-denormals, unnormals,
//! pseudo-NaNs), and the hardware's masked/unmasked responses would all have to be
//! re-implemented and would still only approximate the host; running the instruction is
//! exact by construction and small.
//!
//! The Rust side models what is not arithmetic: the state ([`X87`]: physical registers,
//! TOP in FSW, the abridged tag word of FXSAVE with full tags computed from the contents as
//! the hardware does; the reserved control-word bits as the host stores them), the
//! instructions that only move state (FNINIT, FNCLEX, FLDCW, FNSTCW,
//! FNSTSW, FNSTENV/FLDENV and FNSAVE/FRSTOR in their 16/32-bit real/protected layouts,
//! FXSAVE/FXRSTOR, FNOP, FWAIT), the memory accesses (faults are taken before
//! any state changes; a store suppressed by an unmasked exception writes nothing), and
//! exception delivery:
//! - CR0.EM or CR0.TS: #NM for x87 instructions (FWAIT: only with CR0.MP and TS; MMX
//!   instructions: #UD on EM);
//! - an unmasked exception sets ES and B (they always equal "some flag set whose mask bit
//!   is clear", recomputed after FLDCW/FLDENV/FRSTOR/FXRSTOR, as hardware does) and is
//!   reported as #MF (vector 16) by the next *waiting* instruction — every x87 instruction
//!   except FNINIT, FNCLEX, FNSTCW, FNSTSW, FNSTENV, FNSAVE, FXSAVE and FXRSTOR, plus
//!   the MMX instructions — before it does anything, when CR0.NE is set. With CR0.NE clear (legacy FERR#
//!   reporting through an external interrupt, never used by a 64-bit OS) the pending
//!   exception is ignored as with IGNNE# asserted.
//!
//! Last-instruction pointers, as AMD processors keep them: every x87 instruction other than
//! the control ones (FNINIT, FNCLEX, FLDCW, FNSTCW, FNSTSW, FNSTENV, FLDENV, FNSAVE, FRSTOR,
//! FWAIT) that completes records FOP (the low 3 bits of the escape byte and the ModRM), FIP
//! (RIP, with FCS = CS selector) and, if it has a memory operand, FDP (its offset, with FDS
//! = the segment's selector); FNINIT clears them. FNSTENV/FNSAVE always store them (real
//! mode: as 20-bit linear addresses). FXSAVE stores them and FXRSTOR loads them only when
//! FSW.ES is set, unless CPUID Fn8000_0008 EBX[2] (RstrFpErrPtrs, "FXSAVE/XSAVE always save
//! error pointers") is advertised, in which case always (AMD APM vol. 5, FXSAVE/FXRSTOR);
//! when not stored, the fields are written as zero. FCS/FDS are not part of the
//! backend-neutral snapshot ([`FpuState`] follows the 64-bit FXSAVE image) and read as 0
//! after a restore.
//!
//! Not modelled: FSTP1 (D9 D8+i), an undocumented alias that Intel runs as an FSTP
//! without the stack-underflow check and whose AMD behaviour is not known, raises #UD.
//! FNENI/FNDISI/FNSETPM (8087/287 control) are no-ops, as on every processor since the 387.
//!
//! MMX register aliasing: MMn is the significand of physical register Rn; FXSAVE stores
//! ST(0)..ST(7), which are MM0..MM7 whenever TOP = 0 (after any MMX instruction). The MMX
//! instructions, EMMS and the x87-to-MMX transition are in `mmx.rs`.

mod host;
#[cfg(test)]
mod tests;

use super::{Handler, Insn, KREG};
use crate::{Cpu, Exc, Mode, Stop, CS, R};
use esvm_arch::bits::rflags::{CF, PF, ZF};
use esvm_arch::bits::{cr0, cr4, efer, vector};
use esvm_arch::FpuState;
use iced_x86::{Instruction, Mnemonic};

/// FSW exception flags IE, DE, ZE, OE, UE, PE.
const FSW_FLAGS: u16 = 0x3f;
/// Stack fault.
const FSW_SF: u16 = 0x40;
/// Exception summary.
const FSW_ES: u16 = 0x80;
/// Busy (mirrors ES).
const FSW_B: u16 = 0x8000;
/// The bits that stay set until FNCLEX/FNINIT: the exception flags and SF.
const FSW_STICKY: u16 = FSW_FLAGS | FSW_SF;
/// FCW exception mask bits.
const FCW_MASKS: u16 = 0x3f;
/// Exceptions whose unmasked occurrence suppresses a store to memory (all but PE).
const STORE_SUPPRESSING: u16 = 0x1f;

/// `Insn::r2` flags of host-executed instructions.
const STORES: u8 = 1;
const SETS_RFLAGS: u8 = 2;
const READS_RFLAGS: u8 = 4;

/// The x87 state of a vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct X87 {
    pub fcw: u16,
    /// Status word, TOP in bits 13:11.
    pub fsw: u16,
    /// Abridged tag word: bit p set = physical register Rp is not empty.
    pub ftw: u8,
    /// Last non-control instruction's opcode (11 bits).
    pub fop: u16,
    pub fip: u64,
    pub fcs: u16,
    pub fdp: u64,
    pub fds: u16,
    /// Physical registers R0..R7; ST(i) is R[(TOP + i) mod 8].
    pub r: [[u8; 10]; 8],
}

impl Default for X87 {
    fn default() -> Self {
        X87::from_fpu(&FpuState::default())
    }
}

/// The full (2-bit) tag of a non-empty register: 0 valid, 1 zero, 2 special (NaN,
/// infinity, denormal, pseudo-denormal, unsupported encodings).
fn tag_of(v: &[u8; 10]) -> u16 {
    let m = u64::from_le_bytes(v[..8].try_into().unwrap_or([0; 8]));
    let e = u16::from_le_bytes([v[8], v[9]]) & 0x7fff;
    match e {
        0x7fff => 2,
        0 if m == 0 => 1,
        0 => 2,
        _ if m >> 63 == 0 => 2,
        _ => 0,
    }
}

fn put16(b: &mut [u8], o: usize, v: u16) {
    b[o..o + 2].copy_from_slice(&v.to_le_bytes());
}
fn put32(b: &mut [u8], o: usize, v: u32) {
    b[o..o + 4].copy_from_slice(&v.to_le_bytes());
}
fn get16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn get32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn get64(b: &[u8], o: usize) -> u64 {
    u64::from(get32(b, o)) | u64::from(get32(b, o + 4)) << 32
}

impl X87 {
    pub(crate) fn top(&self) -> usize {
        ((self.fsw >> 11) & 7) as usize
    }

    /// Physical register number of ST(i).
    fn phys(&self, i: usize) -> usize {
        (self.top() + i) & 7
    }

    /// From the backend-neutral form (registers in stack order, as FXSAVE stores them).
    pub(crate) fn from_fpu(f: &FpuState) -> X87 {
        let mut x = X87 {
            fcw: f.fcw,
            fsw: f.fsw,
            ftw: f.ftw,
            fop: f.fop,
            fip: f.fip,
            fcs: 0,
            fdp: f.fdp,
            fds: 0,
            r: [[0; 10]; 8],
        };
        for (i, st) in f.st.iter().enumerate() {
            let p = x.phys(i);
            x.r[p].copy_from_slice(&st[..10]);
        }
        x
    }

    /// Into the backend-neutral form (the SSE fields of `f` are left alone).
    pub(crate) fn write_fpu(&self, f: &mut FpuState) {
        f.fcw = self.fcw;
        f.fsw = self.fsw;
        f.ftw = self.ftw;
        f.fop = self.fop;
        f.fip = self.fip;
        f.fdp = self.fdp;
        for (i, st) in f.st.iter_mut().enumerate() {
            *st = [0; 16];
            st[..10].copy_from_slice(&self.r[self.phys(i)]);
        }
    }

    /// The full tag word FNSTENV/FNSAVE store: computed from the register contents.
    pub(crate) fn full_tag(&self) -> u16 {
        (0..8).fold(0, |w, p| {
            let t = if self.ftw & (1 << p) != 0 {
                tag_of(&self.r[p])
            } else {
                3
            };
            w | t << (2 * p)
        })
    }

    /// Load a full tag word: only "empty" (11b) or not matters.
    fn set_full_tag(&mut self, w: u16) {
        self.ftw = (0..8).fold(0, |t, p| {
            if (w >> (2 * p)) & 3 != 3 {
                t | 1 << p
            } else {
                t
            }
        });
    }

    /// ES and B: set exactly when an exception flag is set whose mask bit is clear.
    fn fix_es(&mut self) {
        if self.fsw & FSW_FLAGS & !self.fcw != 0 {
            self.fsw |= FSW_ES | FSW_B;
        } else {
            self.fsw &= !(FSW_ES | FSW_B);
        }
    }

    /// Load a control word; its reserved bits end up as the host FPU's do.
    fn set_fcw(&mut self, v: u16) {
        let (keep, ones) = host::fcw_rule();
        self.fcw = (v & keep) | ones;
        self.fix_es();
    }

    /// FNINIT (the registers keep their contents).
    fn init(&mut self) {
        self.fcw = 0x037f;
        self.fsw = 0;
        self.ftw = 0;
        self.fop = 0;
        self.fip = 0;
        self.fcs = 0;
        self.fdp = 0;
        self.fds = 0;
    }

    fn swap_phys(&mut self, a: usize, b: usize) {
        let (a, b) = (a & 7, b & 7);
        self.r.swap(a, b);
        let (ta, tb) = ((self.ftw >> a) & 1, (self.ftw >> b) & 1);
        self.ftw = (self.ftw & !(1 << a) & !(1 << b)) | ta << b | tb << a;
    }

    /// The 108-byte FRSTOR image a host kernel starts from: exception flags, SF, ES and B
    /// cleared (nothing pending on the host), no pointers.
    fn host_image(&self) -> [u8; 108] {
        let mut b = [0u8; 108];
        put16(&mut b, 0, self.fcw);
        put16(&mut b, 4, self.fsw & !(FSW_STICKY | FSW_ES | FSW_B));
        put16(&mut b, 8, self.full_tag());
        for i in 0..8 {
            b[28 + 10 * i..38 + 10 * i].copy_from_slice(&self.r[self.phys(i)]);
        }
        b
    }

    /// Take the state a host kernel stored; `sticky` are the flags (and SF) set before the
    /// instruction. Returns the exception flags the instruction raised.
    fn load_host_image(&mut self, b: &[u8; 108], sticky: u16) -> u16 {
        let sw = get16(b, 4);
        self.fsw = (sw & !(FSW_ES | FSW_B)) | sticky;
        self.fix_es();
        self.set_full_tag(get16(b, 8));
        for i in 0..8 {
            let p = self.phys(i);
            self.r[p].copy_from_slice(&b[28 + 10 * i..38 + 10 * i]);
        }
        sw & FSW_FLAGS
    }

    /// The FNSTENV image: 14 bytes (16-bit operand size) or 28 (32/64-bit), real-mode or
    /// protected-mode layout (Intel SDM vol. 1 figures 8-9 to 8-12). Reserved halves of
    /// the 32-bit layout read as FFFFh.
    fn env_image(&self, wide: bool, real: bool) -> Vec<u8> {
        let tag = self.full_tag();
        let fop = self.fop & 0x7ff;
        // Real mode stores 20-bit (32-bit layout: 32-bit) linear addresses.
        let lin_ip = (u64::from(self.fcs) << 4).wrapping_add(self.fip) as u32;
        let lin_dp = (u64::from(self.fds) << 4).wrapping_add(self.fdp) as u32;
        if wide {
            let mut b = vec![0xffu8; 28];
            put16(&mut b, 0, self.fcw);
            put16(&mut b, 4, self.fsw);
            put16(&mut b, 8, tag);
            if real {
                put16(&mut b, 12, lin_ip as u16);
                put32(&mut b, 16, u32::from(fop) | ((lin_ip >> 16) << 12));
                put16(&mut b, 20, lin_dp as u16);
                put32(&mut b, 24, (lin_dp >> 16) << 12);
            } else {
                put32(&mut b, 12, self.fip as u32);
                put16(&mut b, 16, self.fcs);
                put16(&mut b, 18, fop);
                put32(&mut b, 20, self.fdp as u32);
                put16(&mut b, 24, self.fds);
            }
            b
        } else {
            let mut b = vec![0u8; 14];
            put16(&mut b, 0, self.fcw);
            put16(&mut b, 2, self.fsw);
            put16(&mut b, 4, tag);
            if real {
                put16(&mut b, 6, lin_ip as u16);
                put16(&mut b, 8, fop | (((lin_ip >> 16) as u16 & 0xf) << 12));
                put16(&mut b, 10, lin_dp as u16);
                put16(&mut b, 12, ((lin_dp >> 16) as u16 & 0xf) << 12);
            } else {
                put16(&mut b, 6, self.fip as u16);
                put16(&mut b, 8, self.fcs);
                put16(&mut b, 10, self.fdp as u16);
                put16(&mut b, 12, self.fds);
            }
            b
        }
    }

    /// FLDENV (the first 14 or 28 bytes of `b`). ES and B are recomputed.
    fn load_env(&mut self, b: &[u8], wide: bool, real: bool) {
        if wide {
            self.fcw = get16(b, 0);
            self.fsw = get16(b, 4);
            self.set_full_tag(get16(b, 8));
            if real {
                let w = get32(b, 16);
                self.fip = u64::from(get16(b, 12)) | u64::from((w >> 12) & 0xffff) << 16;
                self.fop = (w & 0x7ff) as u16;
                self.fcs = 0;
                self.fdp = u64::from(get16(b, 20)) | u64::from((get32(b, 24) >> 12) & 0xffff) << 16;
                self.fds = 0;
            } else {
                self.fip = u64::from(get32(b, 12));
                self.fcs = get16(b, 16);
                self.fop = get16(b, 18) & 0x7ff;
                self.fdp = u64::from(get32(b, 20));
                self.fds = get16(b, 24);
            }
        } else {
            self.fcw = get16(b, 0);
            self.fsw = get16(b, 2);
            self.set_full_tag(get16(b, 4));
            if real {
                let w = get16(b, 8);
                self.fip = u64::from(get16(b, 6)) | u64::from(w >> 12) << 16;
                self.fop = w & 0x7ff;
                self.fcs = 0;
                self.fdp = u64::from(get16(b, 10)) | u64::from(get16(b, 12) >> 12) << 16;
                self.fds = 0;
            } else {
                self.fip = u64::from(get16(b, 6));
                self.fcs = get16(b, 8);
                self.fop = 0;
                self.fdp = u64::from(get16(b, 10));
                self.fds = get16(b, 12);
            }
        }
        self.set_fcw(self.fcw);
    }
}

// ---------------------------------------------------------------------- checks, helpers

impl Cpu {
    /// #NM for x87 instructions: CR0.EM (no FPU) or CR0.TS (state not loaded).
    #[inline]
    fn fpu_nm(&self) -> R {
        if self.cr0 & (cr0::EM | cr0::TS) != 0 {
            return Err(Stop::Exc(Exc::new(vector::NM)));
        }
        Ok(())
    }

    /// A waiting instruction: a pending unmasked exception is delivered as #MF (CR0.NE).
    #[inline]
    pub(crate) fn fpu_wait(&self) -> R {
        if self.x87.fsw & FSW_ES != 0 && self.cr0 & cr0::NE != 0 {
            return Err(Stop::Exc(Exc::new(vector::MF)));
        }
        Ok(())
    }

    /// Record FOP, FIP and (with a memory operand) FDP for a non-control instruction.
    fn fpu_pointers(&mut self, d: &Insn, mem: bool) {
        self.x87.fop = (d.imm & 0x7ff) as u16;
        // `self.rip` is not kept up to date inside blocks; `next_rip` is.
        self.x87.fip = self.next_rip.wrapping_sub(d.len as u64);
        self.x87.fcs = self.seg[CS].selector;
        if mem {
            self.x87.fdp = self.ea(d);
            self.x87.fds = self.seg[d.seg as usize].selector;
        }
    }

    fn wrap_linear(&self, lin: u64) -> u64 {
        if self.mode == Mode::Long64 {
            lin
        } else {
            lin & 0xffff_ffff
        }
    }

    /// Write `bytes` at linear `lin` (already checked by `lin`); every page is checked
    /// before the first byte is written.
    fn fpu_write_lin(&mut self, lin: u64, bytes: &[u8]) -> R {
        self.probe_write(lin, bytes.len())?;
        for (k, chunk) in bytes.chunks(16).enumerate() {
            let mut v = [0u8; 16];
            v[..chunk.len()].copy_from_slice(chunk);
            let a = self.wrap_linear(lin.wrapping_add(16 * k as u64));
            self.wr_slow(a, chunk.len(), u128::from_le_bytes(v), false)?;
        }
        Ok(())
    }

    fn fpu_read_lin(&mut self, lin: u64, n: usize) -> R<Vec<u8>> {
        let mut out = Vec::with_capacity(n);
        let mut k = 0;
        while k < n {
            let len = (n - k).min(16);
            let a = self.wrap_linear(lin.wrapping_add(k as u64));
            let v = self.rd_slow(a, len, false)?;
            out.extend_from_slice(&v.to_le_bytes()[..len]);
            k += len;
        }
        Ok(out)
    }

    /// Run the host kernel of `d` on the current state; returns the exception flags the
    /// instruction raised and the host RFLAGS after it.
    fn x87_host(&mut self, d: &Insn, mem: &mut [u8; 16]) -> R<(u16, u64)> {
        let Some(&(_, _, kernel)) = host::KERNELS.get(d.imm2 as usize) else {
            return crate::ud();
        };
        let swap = d.cc as usize;
        let top = self.x87.top();
        if swap >= 2 {
            self.x87.swap_phys(top + 1, top + swap);
        }
        let sticky = self.x87.fsw & FSW_STICKY;
        let mut img = self.x87.host_image();
        let gflags = if d.r2 & READS_RFLAGS != 0 {
            self.compute_arith()
        } else {
            0
        };
        let f = kernel(&mut img, mem, gflags);
        let raised = self.x87.load_host_image(&img, sticky);
        if swap >= 2 {
            self.x87.swap_phys(top + 1, top + swap);
        }
        Ok((raised, f))
    }

    /// Whether FXSAVE/FXRSTOR always store/load FIP, FDP and FOP (CPUID Fn8000_0008
    /// EBX[2]); otherwise only with FSW.ES set.
    fn fx_pointers_always(&self) -> bool {
        self.config.cpuid.lookup(0x8000_0008, 0)[1] & (1 << 2) != 0
    }
}

// ---------------------------------------------------------------------- handlers

/// Every host-executed x87 instruction.
fn h_fpu(c: &mut Cpu, d: &Insn) -> R {
    c.fpu_nm()?;
    c.fpu_wait()?;
    let size = d.r1 as usize;
    let store = d.r2 & STORES != 0;
    let mut mem = [0u8; 16];
    let mut lin = 0;
    if size != 0 {
        let ea = c.ea(d);
        lin = c.lin(d.seg as usize, ea, size, store)?;
        if store {
            c.probe_write(lin, size)?;
        } else {
            mem = c.rd_slow(lin, size, false)?.to_le_bytes();
        }
    }
    let (raised, f) = c.x87_host(d, &mut mem)?;
    if store && raised & !c.x87.fcw & STORE_SUPPRESSING == 0 {
        c.wr_slow(lin, size, u128::from_le_bytes(mem), false)?;
    }
    if d.r2 & SETS_RFLAGS != 0 {
        c.set_arith(f & (ZF | PF | CF));
    }
    c.fpu_pointers(d, size != 0);
    Ok(())
}

fn h_fninit(c: &mut Cpu, _d: &Insn) -> R {
    c.fpu_nm()?;
    c.x87.init();
    Ok(())
}

fn h_fnclex(c: &mut Cpu, _d: &Insn) -> R {
    c.fpu_nm()?;
    c.x87.fsw &= !(FSW_STICKY | FSW_ES | FSW_B);
    Ok(())
}

fn h_fnstcw(c: &mut Cpu, d: &Insn) -> R {
    c.fpu_nm()?;
    let v = u64::from(c.x87.fcw);
    c.opw(d, 0, 2, v)
}

fn h_fldcw(c: &mut Cpu, d: &Insn) -> R {
    c.fpu_nm()?;
    c.fpu_wait()?;
    let v = c.opr(d, 0, 2)? as u16;
    c.x87.set_fcw(v);
    Ok(())
}

fn h_fnstsw(c: &mut Cpu, d: &Insn) -> R {
    c.fpu_nm()?;
    let v = u64::from(c.x87.fsw);
    if d.k0 == KREG {
        c.rw(0, 2, v);
        Ok(())
    } else {
        c.opw(d, 0, 2, v)
    }
}

/// FNSTENV (`d.r1` = 14 or 28): store, then mask all exceptions.
fn h_fnstenv(c: &mut Cpu, d: &Insn) -> R {
    c.fpu_nm()?;
    let img = c.x87.env_image(d.r1 >= 28, c.mode == Mode::Real);
    let ea = c.ea(d);
    let lin = c.lin(d.seg as usize, ea, img.len(), true)?;
    c.fpu_write_lin(lin, &img)?;
    c.x87.fcw |= FCW_MASKS;
    c.x87.fix_es();
    Ok(())
}

fn h_fldenv(c: &mut Cpu, d: &Insn) -> R {
    c.fpu_nm()?;
    c.fpu_wait()?;
    let wide = d.r1 >= 28;
    let n = if wide { 28 } else { 14 };
    let ea = c.ea(d);
    let lin = c.lin(d.seg as usize, ea, n, false)?;
    let b = c.fpu_read_lin(lin, n)?;
    c.x87.load_env(&b, wide, c.mode == Mode::Real);
    Ok(())
}

/// FNSAVE (`d.r1` = 94 or 108): the environment, ST(0)..ST(7), then FNINIT.
fn h_fnsave(c: &mut Cpu, d: &Insn) -> R {
    c.fpu_nm()?;
    let mut img = c.x87.env_image(d.r1 >= 108, c.mode == Mode::Real);
    for i in 0..8 {
        img.extend_from_slice(&c.x87.r[c.x87.phys(i)]);
    }
    let ea = c.ea(d);
    let lin = c.lin(d.seg as usize, ea, img.len(), true)?;
    c.fpu_write_lin(lin, &img)?;
    c.x87.init();
    Ok(())
}

fn h_frstor(c: &mut Cpu, d: &Insn) -> R {
    c.fpu_nm()?;
    c.fpu_wait()?;
    let wide = d.r1 >= 108;
    let env = if wide { 28 } else { 14 };
    let ea = c.ea(d);
    let lin = c.lin(d.seg as usize, ea, env + 80, false)?;
    let b = c.fpu_read_lin(lin, env + 80)?;
    c.x87.load_env(&b, wide, c.mode == Mode::Real);
    for i in 0..8 {
        let p = c.x87.phys(i);
        c.x87.r[p].copy_from_slice(&b[env + 10 * i..env + 10 * i + 10]);
    }
    Ok(())
}

/// FNOP: a waiting, non-control instruction that does nothing else.
fn h_fnop(c: &mut Cpu, d: &Insn) -> R {
    c.fpu_nm()?;
    c.fpu_wait()?;
    c.fpu_pointers(d, false);
    Ok(())
}

/// FNENI, FNDISI, FNSETPM (8087/287 control instructions): no-ops since the 387.
fn h_fnop_legacy(c: &mut Cpu, _d: &Insn) -> R {
    c.fpu_nm()
}

fn h_fwait(c: &mut Cpu, _d: &Insn) -> R {
    if c.cr0 & (cr0::TS | cr0::MP) == (cr0::TS | cr0::MP) {
        return Err(Stop::Exc(Exc::new(vector::NM)));
    }
    c.fpu_wait()
}

/// FXSAVE/FXRSTOR: #NM on CR0.EM or CR0.TS.
fn fx_check(c: &Cpu) -> R {
    if c.cr0 & (cr0::EM | cr0::TS) != 0 {
        return Err(Stop::Exc(Exc::new(vector::NM)));
    }
    Ok(())
}

/// FXSAVE/FXRSTOR: the bytes of the image the processor uses (XMM8-15 only in 64-bit
/// mode) and whether the XMM registers are skipped (EFER.FFXSR in 64-bit mode at CPL 0).
fn fx_extent(c: &Cpu) -> (usize, bool) {
    let long = c.mode == Mode::Long64;
    let fast = long && c.cpl == 0 && c.efer & efer::FFXSR != 0;
    (if long { 416 } else { 288 }, fast)
}

fn h_fxsave(c: &mut Cpu, d: &Insn) -> R {
    fx_check(c)?;
    let lin = c.mlin(d, 512, true)?;
    if lin & 15 != 0 {
        return crate::gp0();
    }
    let (n, fast) = fx_extent(c);
    let wide = d.i.mnemonic() == Mnemonic::Fxsave64;
    let x = &c.x87;
    let mut b = vec![0u8; n];
    put16(&mut b, 0, x.fcw);
    put16(&mut b, 2, x.fsw);
    b[4] = x.ftw;
    if x.fsw & FSW_ES != 0 || c.fx_pointers_always() {
        put16(&mut b, 6, x.fop & 0x7ff);
        if wide {
            b[8..16].copy_from_slice(&x.fip.to_le_bytes());
            b[16..24].copy_from_slice(&x.fdp.to_le_bytes());
        } else {
            put32(&mut b, 8, x.fip as u32);
            put16(&mut b, 12, x.fcs);
            put32(&mut b, 16, x.fdp as u32);
            put16(&mut b, 20, x.fds);
        }
    }
    put32(&mut b, 24, c.mxcsr);
    put32(&mut b, 28, super::sse::MXCSR_MASK);
    for i in 0..8 {
        b[32 + 16 * i..42 + 16 * i].copy_from_slice(&x.r[x.phys(i)]);
    }
    for (k, xmm) in c.xmm.iter().enumerate().take((n - 160) / 16) {
        b[160 + 16 * k..176 + 16 * k].copy_from_slice(&xmm.to_le_bytes());
    }
    // Fast FXSAVE leaves the XMM area alone.
    let len = if fast { 160 } else { n };
    c.fpu_write_lin(lin, &b[..len])
}

fn h_fxrstor(c: &mut Cpu, d: &Insn) -> R {
    fx_check(c)?;
    let lin = c.mlin(d, 512, false)?;
    if lin & 15 != 0 {
        return crate::gp0();
    }
    let (n, fast) = fx_extent(c);
    let b = c.fpu_read_lin(lin, if fast { 160 } else { n })?;
    let mxcsr = get32(&b, 24);
    if mxcsr & !super::sse::MXCSR_MASK != 0 {
        return crate::gp0();
    }
    let wide = d.i.mnemonic() == Mnemonic::Fxrstor64;
    let pointers = c.fx_pointers_always();
    let x = &mut c.x87;
    x.fcw = get16(&b, 0);
    x.fsw = get16(&b, 2);
    x.ftw = b[4];
    if pointers || x.fsw & FSW_ES != 0 {
        x.fop = get16(&b, 6) & 0x7ff;
        if wide {
            x.fip = get64(&b, 8);
            x.fdp = get64(&b, 16);
            x.fcs = 0;
            x.fds = 0;
        } else {
            x.fip = u64::from(get32(&b, 8));
            x.fcs = get16(&b, 12);
            x.fdp = u64::from(get32(&b, 16));
            x.fds = get16(&b, 20);
        }
    }
    x.set_fcw(x.fcw);
    for i in 0..8 {
        let p = x.phys(i);
        x.r[p].copy_from_slice(&b[32 + 16 * i..42 + 16 * i]);
    }
    // Without CR4.OSFXSR the SSE state is not restored.
    if c.cr4 & cr4::OSFXSR != 0 {
        c.mxcsr = mxcsr;
        if !fast {
            for k in 0..(n - 160) / 16 {
                c.xmm[k] = u128::from_le_bytes(
                    b[160 + 16 * k..176 + 16 * k].try_into().unwrap_or([0; 16]),
                );
            }
        }
    }
    Err(Stop::Retire)
}

// ---------------------------------------------------------------------- decoding

/// The kernel that executes (escape byte, ModRM) and the ST(i) to move into ST(1) for it
/// (0: none).
fn canonical(esc: u8, modrm: u8) -> (u8, u8, u8) {
    if modrm < 0xc0 {
        return (esc, (modrm & 0x38) | 7, 0);
    }
    let fixed = match esc {
        0xd9 => modrm >= 0xe0 || modrm == 0xd0 || modrm < 0xc8,
        0xda => modrm == 0xe9,
        0xdb | 0xdf => (0xe0..=0xe7).contains(&modrm),
        0xde => modrm == 0xd9,
        _ => false,
    };
    if fixed {
        return (esc, modrm, 0);
    }
    let (reg, i) = (modrm & 0x38, modrm & 7);
    // The reserved aliases (FCOM2, FCOMP3, FCOMP5, FXCH4, FXCH7, FSTP8, FSTP9) execute as
    // the instruction they repeat.
    let (esc, reg) = match (esc, reg) {
        (0xdc, 0x10) => (0xd8, 0x10),
        (0xdc, 0x18) | (0xde, 0x10) => (0xd8, 0x18),
        (0xdd, 0x08) | (0xdf, 0x08) => (0xd9, 0x08),
        (0xdf, 0x10) | (0xdf, 0x18) => (0xdd, 0x18),
        x => x,
    };
    if i >= 2 {
        (esc, 0xc1 | reg, i)
    } else {
        (esc, 0xc0 | reg | i, 0)
    }
}

pub(crate) fn select(
    m: Mnemonic,
    i: &Instruction,
    d: &mut Insn,
    bytes: &[u8],
    mode: Mode,
) -> Option<Handler> {
    use Mnemonic as M;
    let k = super::opcode_index(mode, bytes);
    let esc = *bytes.get(k)?;
    if !(0xd8..=0xdf).contains(&esc) {
        return match m {
            M::Wait => Some(h_fwait),
            M::Fxsave | M::Fxsave64 => Some(h_fxsave),
            M::Fxrstor | M::Fxrstor64 => Some(h_fxrstor),
            _ => None,
        };
    }
    let modrm = *bytes.get(k + 1)?;
    d.imm = u64::from(esc & 7) << 8 | u64::from(modrm);
    d.r1 = i.memory_size().size().min(255) as u8;
    let h: Handler = match m {
        M::Fninit => h_fninit,
        M::Fnclex => h_fnclex,
        M::Fnstcw => h_fnstcw,
        M::Fldcw => h_fldcw,
        M::Fnstsw => h_fnstsw,
        M::Fnstenv => h_fnstenv,
        M::Fldenv => h_fldenv,
        M::Fnsave => h_fnsave,
        M::Frstor => h_frstor,
        M::Fnop => h_fnop,
        M::Fneni | M::Fndisi | M::Fnsetpm => h_fnop_legacy,
        // FSTP1 (D9 D8+i), undocumented: Intel runs it as an FSTP that ignores stack
        // underflow; what AMD does is unknown, so it is not modelled.
        M::Fstpnce => return None,
        _ => {
            let (e, mr, swap) = canonical(esc, modrm);
            d.imm2 = host::find(e, mr)? as u64;
            d.cc = swap;
            d.r2 = 0;
            if modrm < 0xc0 {
                if !matches!(d.r1, 2 | 4 | 8 | 10) {
                    return None;
                }
                let reg = (modrm >> 3) & 7;
                if matches!(
                    (esc, reg),
                    (0xd9, 2..=3) | (0xdb, 1..=3 | 7) | (0xdd, 1..=3) | (0xdf, 1..=3 | 6..=7)
                ) {
                    d.r2 |= STORES;
                }
            } else {
                d.r1 = 0;
                let reg = modrm & 0x38;
                if matches!(esc, 0xdb | 0xdf) && matches!(reg, 0x28 | 0x30) {
                    d.r2 |= SETS_RFLAGS;
                }
                if matches!(esc, 0xda | 0xdb) && reg <= 0x18 {
                    d.r2 |= READS_RFLAGS;
                }
            }
            h_fpu
        }
    };
    Some(h)
}
