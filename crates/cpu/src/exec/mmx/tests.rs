//! Unit tests of the MMX model: the x87 transitions, the FXSAVE/FNSTENV images after MMX
//! use, the exceptions and their order, and the choices the differential tests against the
//! host (`src/tests/mmx_host.rs`) cannot pin down host-independently.

use crate::mem::PhysMemory;
use crate::testutil::{Caught, Harness, CODE, DATA};
use crate::{CpuConfig, Exit};
use esvm_arch::bits::{cr0, cr4, vector};
use iced_x86::code_asm::*;
use iced_x86::Mnemonic;

fn asm(f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    f(&mut a).unwrap();
    a.hlt().unwrap();
    a.assemble(CODE).unwrap()
}

fn run_with(code: &[u8], setup: impl FnOnce(&mut Harness)) -> (Harness, Option<Caught>) {
    let mem = PhysMemory::new_owned(16 << 20).unwrap();
    let mut h = Harness::with_memory(mem, CpuConfig::default());
    h.load(code);
    setup(&mut h);
    let x = h.run();
    assert_eq!(x, Exit::Hlt, "run ended with {x:?}");
    let e = h.exception();
    (h, e)
}

fn run(code: &[u8]) -> (Harness, Option<Caught>) {
    run_with(code, |_| {})
}

fn ok(code: &[u8]) -> Harness {
    let (h, e) = run(code);
    assert_eq!(e, None);
    h
}

fn set_cr(h: &mut Harness, cr0_set: u64, cr0_clear: u64, cr4_clear: u64) {
    let mut s = h.cpu.sregs();
    s.cr0 = (s.cr0 | cr0_set) & !cr0_clear;
    s.cr4 &= !cr4_clear;
    h.cpu.set_sregs(&s).unwrap();
}

fn top(h: &Harness) -> u16 {
    (h.cpu.fpu().fsw >> 11) & 7
}

/// Physical register `p` (significand, sign/exponent) from the stack-ordered snapshot.
fn phys(h: &Harness, p: usize) -> (u64, u16) {
    let f = h.cpu.fpu();
    let st = &f.st[(p + 8 - ((f.fsw >> 11) & 7) as usize) & 7];
    (
        u64::from_le_bytes(st[..8].try_into().unwrap()),
        u16::from_le_bytes([st[8], st[9]]),
    )
}

const ONE: (u64, u16) = (1 << 63, 0x3fff);

#[test]
fn mmx_instructions_set_top_zero_and_all_tags_valid() {
    let h = ok(&asm(|a| {
        a.fld1()?; // R7
        a.fld1()?; // R6; TOP = 6, tags 0b1100_0000
        a.mov(rax, 0x1122_3344_5566_7788u64)?;
        a.movq(mm2, rax)?; // writes R2
        a.movd(ecx, mm6)?; // reads R6 (1.0's significand, low half)
        Ok(())
    }));
    assert_eq!(top(&h), 0);
    assert_eq!(h.cpu.fpu().ftw, 0xff);
    assert_eq!(phys(&h, 2), (0x1122_3344_5566_7788, 0xffff), "written");
    assert_eq!(phys(&h, 6), ONE, "read: exponent unchanged");
    assert_eq!(phys(&h, 7), ONE);
    assert_eq!(h.cpu.regs().gpr[1], 0);
    // Every other FSW bit, the control word and the pointers are left alone.
    let h2 = ok(&asm(|a| {
        a.fld1()?;
        a.fld1()?;
        Ok(())
    }));
    let (f, f2) = (h.cpu.fpu(), h2.cpu.fpu());
    assert_eq!(f.fsw & !0x3800, f2.fsw & !0x3800);
    assert_eq!(
        (f.fcw, f.fop, f.fip, f.fdp),
        (f2.fcw, f2.fop, f2.fip, f2.fdp)
    );
}

#[test]
fn emms_after_mmx_empties_the_tags_and_keeps_the_registers() {
    let prologue = |a: &mut CodeAssembler| {
        a.fld1()?;
        a.fld1()?; // TOP = 6
        a.mov(rax, 5u64)?;
        a.movq(mm3, rax)?;
        a.emms()
    };
    let h = ok(&asm(prologue));
    assert_eq!(top(&h), 0);
    assert_eq!(h.cpu.fpu().ftw, 0);
    assert_eq!(phys(&h, 3), (5, 0xffff));
    assert_eq!(phys(&h, 6), ONE);
    assert_eq!(phys(&h, 7), ONE);
    // The x87 is usable again: a push goes to R7 without a stack fault.
    let h = ok(&asm(|a| {
        prologue(a)?;
        a.fldz()
    }));
    assert_eq!(top(&h), 7);
    assert_eq!(h.cpu.fpu().ftw, 0x80);
    assert_eq!(h.cpu.fpu().fsw & 0x41, 0, "no IE/SF");
    assert_eq!(phys(&h, 7), (0, 0));
}

#[test]
fn fxsave_and_fnstenv_images_after_mmx_use() {
    let h = ok(&asm(|a| {
        a.mov(rbx, DATA)?;
        a.fld1()?;
        a.fld1()?;
        a.fld1()?; // TOP = 5
        for (k, r) in [mm0, mm1, mm2, mm3, mm4, mm5, mm6, mm7]
            .into_iter()
            .enumerate()
        {
            a.mov(rax, 0x0101_0101_0101_0101u64 * (k as u64 + 1))?;
            a.movq(r, rax)?;
        }
        a.fxsave64(ptr(rbx))?;
        a.fnstenv(ptr(rbx + 0x200))?;
        Ok(())
    }));
    let m = h.mem();
    let mut img = [0u8; 512];
    m.read(DATA, &mut img).unwrap();
    assert_eq!(u16::from_le_bytes([img[2], img[3]]) & 0x3800, 0, "TOP");
    assert_eq!(img[4], 0xff, "abridged tag word: all valid");
    for k in 0..8 {
        let st = &img[32 + 16 * k..42 + 16 * k];
        assert_eq!(
            u64::from_le_bytes(st[..8].try_into().unwrap()),
            0x0101_0101_0101_0101 * (k as u64 + 1),
            "ST({k}) = MM{k}"
        );
        assert_eq!(u16::from_le_bytes([st[8], st[9]]), 0xffff);
    }
    // FNSTENV computes the full tags from the contents: exponent all ones = special (10b).
    let env_tag = m.read_u64(DATA + 0x200 + 8).unwrap() as u16;
    assert_eq!(env_tag, 0xaaaa);
}

#[test]
fn ud_on_em_nm_on_ts_and_osfxsr_only_for_xmm_forms() {
    let paddb = asm(|a| a.paddb(mm0, mm1));
    let pshufw = asm(|a| a.pshufw(mm0, mm1, 0x1b));
    let cvt = asm(|a| a.cvtpi2ps(xmm0, mm1));
    let movq2dq = asm(|a| a.movq2dq(xmm0, mm1));
    for (code, cr0_set, cr4_clear, want) in [
        (&paddb, cr0::EM, 0, Some(vector::UD)),
        (&paddb, cr0::TS, 0, Some(vector::NM)),
        (&paddb, cr0::EM | cr0::TS, 0, Some(vector::UD)),
        (&pshufw, cr0::TS, 0, Some(vector::NM)),
        (&paddb, 0, cr4::OSFXSR, None),
        (&pshufw, 0, cr4::OSFXSR, None),
        (&cvt, 0, cr4::OSFXSR, Some(vector::UD)),
        (&cvt, cr0::TS, 0, Some(vector::NM)),
        (&movq2dq, 0, cr4::OSFXSR, Some(vector::UD)),
        (&movq2dq, cr0::EM, 0, Some(vector::UD)),
    ] {
        let (h, e) = run_with(code, |h| set_cr(h, cr0_set, 0, cr4_clear));
        assert_eq!(
            e.map(|e| e.vector),
            want,
            "{code:02x?} CR0 |= {cr0_set:#x} CR4 &= !{cr4_clear:#x}"
        );
        if want.is_some() {
            assert_eq!(h.cpu.fpu().ftw, 0, "no transition on a fault");
        }
    }
}

/// Code that leaves an unmasked zero-divide pending (FSW.ES), TOP = 6, then `tail`.
fn pending_then(tail: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) -> Vec<u8> {
    asm(|a| {
        a.mov(rbx, DATA)?;
        a.mov(word_ptr(rbx), 0x037b)?; // ZE unmasked
        a.fldcw(word_ptr(rbx))?;
        a.fld1()?;
        a.fldz()?;
        a.fdivp(st1, st0)?; // no pop: TOP = 6, ES set
        tail(a)
    })
}

#[test]
fn pending_x87_exception_raises_mf_first() {
    let code = pending_then(|a| {
        a.mov(rcx, 0x4000_0000u64)?; // unmapped
        a.paddb(mm0, qword_ptr(rcx))
    });
    let (h, e) = run(&code);
    let e = e.expect("#MF");
    assert_eq!(e.vector, vector::MF, "before the memory operand's #PF");
    assert_eq!(e.rip, CODE + code.len() as u64 - 1 - 3);
    assert_eq!(top(&h), 6, "no transition");
    assert_eq!(h.cpu.fpu().ftw, 0b1100_0000);
    // EMMS, MOVQ2DQ and the conversions to MMX registers wait too.
    for tail in [
        asm(|a| a.emms()),
        asm(|a| a.movq2dq(xmm0, mm1)),
        asm(|a| a.cvtps2pi(mm0, qword_ptr(rbx))),
        asm(|a| a.cvtpi2pd(xmm0, mm1)),
    ] {
        let code = pending_then(|a| a.db(&tail[..tail.len() - 1]));
        let (_, e) = run(&code);
        assert_eq!(e.map(|e| e.vector), Some(vector::MF), "{tail:02x?}");
    }
    // With CR0.NE clear the pending exception is ignored (IGNNE#), as for x87.
    let code = pending_then(|a| a.paddb(mm0, mm1));
    let (h, e) = run_with(&code, |h| set_cr(h, 0, cr0::NE, 0));
    assert_eq!(e, None);
    assert_eq!(top(&h), 0);
}

#[test]
fn cvtpi2ps_and_cvtpi2pd_from_memory_neither_transition_nor_wait() {
    for m in [Mnemonic::Cvtpi2ps, Mnemonic::Cvtpi2pd] {
        let code = pending_then(|a| {
            a.mov(dword_ptr(rbx + 8), -2)?;
            a.mov(dword_ptr(rbx + 12), 3)?;
            if m == Mnemonic::Cvtpi2ps {
                a.cvtpi2ps(xmm0, qword_ptr(rbx + 8))
            } else {
                a.cvtpi2pd(xmm0, qword_ptr(rbx + 8))
            }
        });
        let (h, e) = run(&code);
        assert_eq!(e, None, "{m:?}: no #MF");
        assert_eq!(top(&h), 6, "{m:?}: no transition");
        assert_eq!(h.cpu.fpu().ftw, 0b1100_0000);
        let x = u128::from_le_bytes(h.cpu.fpu().xmm[0]);
        if m == Mnemonic::Cvtpi2ps {
            let lo = u64::from((-2.0f32).to_bits()) | u64::from(3.0f32.to_bits()) << 32;
            assert_eq!(x as u64, lo);
        } else {
            let v = u128::from((-2.0f64).to_bits()) | u128::from(3.0f64.to_bits()) << 64;
            assert_eq!(x, v);
        }
    }
}

#[test]
fn memory_faults_leave_the_x87_state_alone() {
    let code = asm(|a| {
        a.fld1()?;
        a.paddb(mm0, qword_ptr(0x4000_0000u64)) // beyond the identity map: #PF
    });
    let (h, e) = run(&code);
    assert_eq!(e.map(|e| e.vector), Some(vector::PF));
    assert_eq!(top(&h), 7);
    assert_eq!(h.cpu.fpu().ftw, 0x80);
    // CVTPD2PI from a misaligned m128: #GP(0), no transition.
    let code = asm(|a| {
        a.fld1()?;
        a.cvtpd2pi(mm0, xmmword_ptr(DATA + 8))
    });
    let (h, e) = run(&code);
    let e = e.unwrap();
    assert_eq!((e.vector, e.error_code), (vector::GP, Some(0)));
    assert_eq!(top(&h), 7);
}

#[test]
fn unmasked_simd_exception_of_a_conversion_transitions_but_does_not_write() {
    let code = asm(|a| {
        a.mov(rbx, DATA)?;
        a.mov(dword_ptr(rbx), 0x0f80)?; // PE unmasked
        a.ldmxcsr(dword_ptr(rbx))?;
        a.mov(rax, 0x3fc0_0000u64)?; // 1.5f: inexact
        a.movq(xmm1, rax)?;
        a.fld1()?;
        a.cvtps2pi(mm7, xmm1)
    });
    let (h, e) = run(&code);
    assert_eq!(e.map(|e| e.vector), Some(vector::XM));
    assert_eq!(top(&h), 0, "transitioned (as the host does)");
    assert_eq!(h.cpu.fpu().ftw, 0xff);
    assert_eq!(phys(&h, 7), ONE, "MM7 not written");
    assert_eq!(h.cpu.fpu().mxcsr & 0x3f, 0x20, "PE set");
    // Without CR4.OSXMMEXCPT: #UD.
    let (_, e) = run_with(&code, |h| set_cr(h, 0, 0, cr4::OSXMMEXCPT));
    assert_eq!(e.map(|e| e.vector), Some(vector::UD));
}

#[test]
fn maskmovq_writes_the_selected_bytes_through_the_segment_and_address_size() {
    let code = asm(|a| {
        a.mov(rax, 0x1111_2222_3333_4444u64)?;
        a.movq(mm0, rax)?;
        a.mov(rax, 0x8000_0080_0080_8000u64)?;
        a.movq(mm1, rax)?;
        a.mov(rdi, 0x40u64)?;
        a.db(&[0x64, 0x0f, 0xf7, 0xc1])?; // fs maskmovq mm0, mm1
                                          // Address size 32: EDI.
        a.mov(rdi, 0xffff_ffff_0000_0000 | (DATA + 0x80))?;
        a.db(&[0x67, 0x0f, 0xf7, 0xc1])?; // addr32 maskmovq mm0, mm1
                                          // An all-zero mask accesses nothing, even at an unmapped address.
        a.pxor(mm1, mm1)?;
        a.mov(rdi, 0x4000_0000u64)?;
        a.maskmovq(mm0, mm1)
    });
    let (h, e) = run_with(&code, |h| {
        h.mem().write(DATA + 0x40, &[0x5a; 8]).unwrap();
        h.mem().write(DATA + 0x80, &[0; 8]).unwrap();
        let mut s = h.cpu.sregs();
        s.fs.base = DATA;
        h.cpu.set_sregs(&s).unwrap();
    });
    assert_eq!(e, None);
    let v = h.mem().read_u64(DATA + 0x40).unwrap();
    assert_eq!(v, 0x115a_5a22_5a33_445a);
    assert_eq!(
        h.mem().read_u64(DATA + 0x80).unwrap(),
        0x1100_0022_0033_4400
    );
    assert_eq!(top(&h), 0);
}

#[test]
fn movd_movq_gpr_forms_zero_extend() {
    let h = ok(&asm(|a| {
        a.mov(rax, 0xdead_beef_8765_4321u64)?;
        a.movd(mm1, eax)?;
        a.movq(mm2, rax)?;
        a.mov(rcx, u64::MAX)?;
        a.movd(ecx, mm2)?;
        a.mov(rdx, u64::MAX)?;
        a.pextrw(edx, mm2, 3)?;
        a.pmovmskb(rsi, mm2)?;
        Ok(())
    }));
    assert_eq!(phys(&h, 1), (0x8765_4321, 0xffff));
    assert_eq!(phys(&h, 2), (0xdead_beef_8765_4321, 0xffff));
    let g = h.cpu.regs().gpr;
    assert_eq!(g[1], 0x8765_4321);
    assert_eq!(g[2], 0xdead);
    assert_eq!(g[6], 0b1111_1000);
}

#[test]
fn snapshot_carries_the_mmx_registers() {
    let h = ok(&asm(|a| {
        a.mov(rax, 0x0102_0304_0506_0708u64)?;
        a.movq(mm5, rax)?;
        Ok(())
    }));
    let snap = h.cpu.snapshot();
    let (mut h2, _) = run(&asm(|a| a.emms()));
    h2.cpu.restore(&snap).unwrap();
    let code = asm(|a| a.movq(rax, mm5));
    h2.load(&code);
    assert_eq!(h2.run(), Exit::Hlt);
    assert_eq!(h2.cpu.regs().gpr[0], 0x0102_0304_0506_0708);
}

#[test]
fn mmx_at_cpl3() {
    use crate::testutil::{run_snippet, SnippetEnd, SNIPPET_SCRATCH};
    let code = {
        let mut a = CodeAssembler::new(64).unwrap();
        a.mov(rbx, SNIPPET_SCRATCH).unwrap();
        a.movq(mm0, qword_ptr(rbx)).unwrap();
        a.paddusb(mm0, qword_ptr(rbx + 8)).unwrap();
        a.movntq(qword_ptr(rbx + 16), mm0).unwrap();
        a.emms().unwrap();
        a.assemble(0).unwrap()
    };
    let mut mem = [0u8; 4096];
    mem[..8].copy_from_slice(&0x80ff_7f01_0000_00f0u64.to_le_bytes());
    mem[8..16].copy_from_slice(&0x8001_0101_0000_0020u64.to_le_bytes());
    let o = run_snippet(&code, &esvm_arch::Regs::default(), &mut mem);
    assert_eq!(o.end, SnippetEnd::Completed);
    let r = u64::from_le_bytes(mem[16..24].try_into().unwrap());
    assert_eq!(r, 0xffff_8002_0000_00ff);
}
