//! Unit tests of the x87 model: stack faults, the save/restore formats, the last-instruction
//! pointers, exception delivery, FBLD/FBSTP (the differential tests against the host are
//! in `src/tests/x87_host.rs`).

use crate::mem::PhysMemory;
use crate::testutil::{Caught, Harness, CODE, DATA};
use crate::{Cpu, CpuConfig, Exit};
use esvm_arch::bits::{cr0, efer, vector};
use esvm_arch::cpuid::CpuidEntry;
use esvm_arch::{Regs, Segment, SegmentAttributes, SpecialRegs};
use iced_x86::code_asm::*;
use iced_x86::BlockEncoderOptions;

fn asm(f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    f(&mut a).unwrap();
    a.hlt().unwrap();
    a.assemble(CODE).unwrap()
}

/// Like [`asm`], also returning the address of the label `f` sets.
fn asm_at(
    f: impl FnOnce(&mut CodeAssembler, &mut CodeLabel) -> Result<(), IcedError>,
) -> (Vec<u8>, u64) {
    let mut a = CodeAssembler::new(64).unwrap();
    let mut l = a.create_label();
    f(&mut a, &mut l).unwrap();
    a.hlt().unwrap();
    let r = a
        .assemble_options(CODE, BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)
        .unwrap();
    let ip = r.label_ip(&l).unwrap();
    (r.inner.code_buffer, ip)
}

/// Run `code` on a fresh 64-bit CPL-0 machine (CR0.NE, MP set); returns the machine and
/// the exception that stopped it, if any.
fn run(code: &[u8]) -> (Harness, Option<Caught>) {
    run_with(code, CpuConfig::default(), |_| {})
}

fn run_with(
    code: &[u8],
    config: CpuConfig,
    setup: impl FnOnce(&mut Harness),
) -> (Harness, Option<Caught>) {
    let mem = PhysMemory::new_owned(16 << 20).unwrap();
    let mut h = Harness::with_memory(mem, config);
    h.load(code);
    setup(&mut h);
    let x = h.run();
    assert_eq!(x, Exit::Hlt, "run ended with {x:?}");
    let e = h.exception();
    (h, e)
}

/// A vCPU whose CPUID does not advertise RstrFpErrPtrs (XSaveErPtr, Fn8000_0008 EBX[2]),
/// unlike the default table: FXSAVE then stores the x87 pointers only with an exception
/// pending, as on AMD parts without the bit.
fn without_errptr() -> CpuConfig {
    let mut config = CpuConfig::default();
    let leaf = config.cpuid.lookup(0x8000_0008, 0);
    config.cpuid.set(CpuidEntry {
        function: 0x8000_0008,
        index: 0,
        indexed: false,
        eax: leaf[0],
        ebx: leaf[1] & !(1 << 2),
        ecx: leaf[2],
        edx: leaf[3],
    });
    config
}

fn ok(code: &[u8]) -> Harness {
    let (h, e) = run(code);
    assert_eq!(e, None);
    h
}

fn f80(v: &[u8]) -> (u64, u16) {
    (
        u64::from_le_bytes(v[..8].try_into().unwrap()),
        u16::from_le_bytes([v[8], v[9]]),
    )
}

fn st(h: &Harness, i: usize) -> (u64, u16) {
    f80(&h.cpu.fpu().st[i][..10])
}

fn fsw(h: &Harness) -> u16 {
    h.cpu.fpu().fsw
}

const ONE: (u64, u16) = (1 << 63, 0x3fff);
const INDEFINITE: (u64, u16) = (3 << 62, 0xffff);
const IE: u16 = 1;
const ZE: u16 = 4;
const SF: u16 = 0x40;
const ES: u16 = 0x80;
const C1: u16 = 0x200;
const B: u16 = 0x8000;

#[test]
fn push_pop_and_arithmetic() {
    let h = ok(&asm(|a| {
        a.fld1()?;
        a.fldpi()?;
        a.faddp(st1, st0)?; // ST(0) = 1 + pi
        a.fld1()?;
        a.fadd_2(st0, st0)?; // 2
        a.fdivp(st1, st0)?; // (1 + pi) / 2
        Ok(())
    }));
    let f = h.cpu.fpu();
    assert_eq!((f.fsw >> 11) & 7, 7, "one value on the stack");
    assert_eq!(f.ftw, 0x80);
    let (m, e) = st(&h, 0);
    let v = m as f64 / (1u64 << 63) as f64 * 2f64.powi(i32::from(e) - 0x3fff);
    assert!(
        (v - (1.0 + std::f64::consts::PI) / 2.0).abs() < 1e-15,
        "{v}"
    );
}

#[test]
fn stack_overflow_and_underflow_masked() {
    // Nine pushes: the ninth overflows (IE, SF, C1 = 1) and loads the indefinite.
    let h = ok(&asm(|a| {
        for _ in 0..9 {
            a.fld1()?;
        }
        Ok(())
    }));
    assert_eq!(fsw(&h) & (IE | SF | C1 | ES), IE | SF | C1);
    assert_eq!(st(&h, 0), INDEFINITE);
    assert_eq!(st(&h, 1), ONE);
    assert_eq!(h.cpu.fpu().ftw, 0xff);
    // Underflow: FADD on an empty stack gives IE, SF, C1 = 0 and the indefinite; FSTP of
    // an empty ST(0) to memory stores the indefinite and pops.
    let h = ok(&asm(|a| {
        a.fninit()?;
        a.fadd_2(st0, st1)?;
        a.mov(rbx, DATA)?;
        a.fincstp()?;
        a.fstp(qword_ptr(rbx))?;
        Ok(())
    }));
    assert_eq!(fsw(&h) & (IE | SF | C1), IE | SF);
    assert_eq!(h.mem().read_u64(DATA).unwrap(), 0xfff8_0000_0000_0000);
}

#[test]
fn stack_overflow_unmasked_leaves_state_and_raises_mf_on_next_waiting_insn() {
    let (code, fldcw_at) = asm_at(|a, l| {
        a.mov(rbx, DATA)?;
        a.mov(word_ptr(rbx), 0x037e)?; // IM clear
        a.fldcw(word_ptr(rbx))?;
        for _ in 0..8 {
            a.fldz()?;
        }
        a.fld1()?; // overflow: unmasked, nothing pushed
        a.fnstsw(word_ptr(rbx + 2))?; // non-waiting: no #MF
        a.set_label(l)?;
        a.fldcw(word_ptr(rbx))?; // waiting: #MF
        Ok(())
    });
    let (h, e) = run(&code);
    let e = e.expect("#MF");
    assert_eq!(
        (e.vector, e.error_code, e.rip),
        (vector::MF, None, fldcw_at)
    );
    let sw = h.mem().read_u64(DATA + 2).unwrap() as u16;
    assert_eq!(sw & (IE | SF | C1 | ES | B), IE | SF | C1 | ES | B);
    assert_eq!((sw >> 11) & 7, 0, "TOP unchanged by the faulting push");
    let f = h.cpu.fpu();
    assert_eq!(f.ftw, 0xff);
    assert_eq!(st(&h, 0), (0, 0), "ST(0) is still the last zero pushed");

    // FNSTENV masks every exception, which clears ES: the next FWAIT does not fault.
    let h = ok(&asm(|a| {
        a.mov(rbx, DATA)?;
        a.mov(word_ptr(rbx), 0x037e)?;
        a.fldcw(word_ptr(rbx))?;
        for _ in 0..9 {
            a.fldz()?;
        }
        a.fnstenv(ptr(rbx + 0x10))?;
        a.wait()?;
        Ok(())
    }));
    let f = h.cpu.fpu();
    assert_eq!(f.fcw & 0x3f, 0x3f);
    assert_eq!(f.fsw & (IE | SF | ES | B), IE | SF);
    let env_sw = h.mem().read_u64(DATA + 0x14).unwrap() as u16;
    assert_eq!(env_sw & (ES | B), ES | B, "stored before masking");
}

#[test]
fn unmasked_zero_divide_reports_mf_at_the_next_waiting_instruction() {
    let code = asm(|a| {
        a.mov(rbx, DATA)?;
        a.mov(word_ptr(rbx), 0x037b)?; // ZM clear
        a.fldcw(word_ptr(rbx))?;
        a.fld1()?;
        a.fldz()?;
        a.fdivp(st1, st0)?; // 1/0: ZE unmasked, ST(1) unchanged, no pop
        a.nop()?;
        a.fnstsw(ax)?;
        a.wait()?;
        Ok(())
    });
    let (h, e) = run(&code);
    let e = e.expect("#MF on FWAIT");
    assert_eq!(e.vector, vector::MF);
    assert_eq!(e.rip, CODE + code.len() as u64 - 2);
    let sw = h.cpu.regs().gpr[0] as u16;
    assert_eq!(sw & (ZE | ES | B), ZE | ES | B);
    assert_eq!((sw >> 11) & 7, 6, "no pop");
    assert_eq!(st(&h, 0), (0, 0));
    assert_eq!(st(&h, 1), ONE);

    // With CR0.NE clear the exception is not reported (IGNNE#).
    let (h, e) = run_with(&code, CpuConfig::default(), |h| {
        let mut s = h.cpu.sregs();
        s.cr0 &= !cr0::NE;
        h.cpu.set_sregs(&s).unwrap();
    });
    assert_eq!(e, None);
    assert_ne!(fsw(&h) & ES, 0);

    // FNCLEX clears the pending exception; FLDCW unmasking a set flag raises it again.
    let h = ok(&asm(|a| {
        a.fld1()?;
        a.fldz()?;
        a.fdivp(st1, st0)?; // masked: +inf, ZE set
        a.fnclex()?;
        a.wait()?;
        a.fld1()?;
        a.fldz()?;
        a.fdivp(st1, st0)?;
        a.mov(rbx, DATA)?;
        a.mov(word_ptr(rbx), 0x037b)?;
        a.fldcw(word_ptr(rbx))?; // unmasks ZE: ES, B set, no fault yet
        a.fnstsw(ax)?;
        Ok(())
    }));
    let sw = h.cpu.regs().gpr[0] as u16;
    assert_eq!(sw & (ZE | ES | B), ZE | ES | B);
}

#[test]
fn device_not_available() {
    for (cr0_bits, code, want) in [
        (cr0::TS, vec![0xd9, 0xe8], vector::NM),       // FLD1
        (cr0::EM, vec![0xd9, 0xe8], vector::NM),       // FLD1
        (cr0::TS, vec![0xdb, 0xe3], vector::NM),       // FNINIT
        (cr0::TS, vec![0x9b], vector::NM),             // FWAIT with MP
        (cr0::EM, vec![0x0f, 0x77], vector::UD),       // EMMS
        (cr0::TS, vec![0x0f, 0x77], vector::NM),       // EMMS
        (cr0::EM, vec![0x0f, 0xae, 0x03], vector::NM), // FXSAVE [rbx]
    ] {
        let mut c = code.clone();
        c.push(0xf4);
        let (_, e) = run_with(&c, CpuConfig::default(), |h| {
            let mut s = h.cpu.sregs();
            s.cr0 |= cr0_bits;
            h.cpu.set_sregs(&s).unwrap();
            let mut r = h.cpu.regs();
            r.gpr[3] = DATA;
            h.cpu.set_regs(&r);
        });
        assert_eq!(
            e.map(|e| e.vector),
            Some(want),
            "{code:02x?} with CR0 {cr0_bits:#x}"
        );
    }
    // FWAIT without MP ignores TS.
    let (_, e) = run_with(&[0x9b, 0xf4], CpuConfig::default(), |h| {
        let mut s = h.cpu.sregs();
        s.cr0 = (s.cr0 | cr0::TS) & !cr0::MP;
        h.cpu.set_sregs(&s).unwrap();
    });
    assert_eq!(e, None);
}

#[test]
fn last_instruction_and_data_pointers() {
    let (code, fld_at) = asm_at(|a, l| {
        a.mov(rbx, DATA)?;
        a.mov(qword_ptr(rbx + 0x40), 0)?;
        a.set_label(l)?;
        a.fld(qword_ptr(rbx + 0x40))?; // DD /0: FOP 0x543
        a.fnstcw(word_ptr(rbx + 0x48))?; // control: no update
        a.fnstenv(ptr(rbx))?;
        a.fninit()?;
        a.fnstenv(ptr(rbx + 0x20))?;
        Ok(())
    });
    let h = ok(&code);
    let m = h.mem();
    let rd32 = |a: u64| m.read_u64(a).unwrap() as u32;
    assert_eq!(rd32(DATA + 12), fld_at as u32, "FIP");
    assert_eq!(
        rd32(DATA + 16) & 0xffff,
        u32::from(crate::testutil::KCODE),
        "FCS"
    );
    assert_eq!(rd32(DATA + 16) >> 16, 0x543, "FOP");
    assert_eq!(rd32(DATA + 20), (DATA + 0x40) as u32, "FDP");
    assert_eq!(
        rd32(DATA + 24) & 0xffff,
        u32::from(crate::testutil::KDATA),
        "FDS"
    );
    assert_eq!(
        rd32(DATA + 8) & 0xffff,
        0x7fff,
        "tags: ST(0) = R7 zero, rest empty"
    );
    assert_eq!(rd32(DATA + 4) >> 16, 0xffff, "reserved halves");
    // After FNINIT: pointers cleared.
    for o in [12, 16, 20] {
        assert_eq!(rd32(DATA + 0x20 + o), 0);
    }
}

#[test]
fn fnstenv_fldenv_fnsave_frstor_formats_round_trip() {
    // 16- and 32-bit FNSAVE in 64-bit mode, then FRSTOR of each: the state comes back.
    let code = asm(|a| {
        a.mov(rbx, DATA)?;
        a.fld1()?;
        a.fldpi()?;
        a.fldl2e()?;
        a.fincstp()?; // TOP moved without pop: an empty ST(7) that is not empty physically
        a.fstp(st2)?;
        a.fnsave(ptr(rbx))?; // 108 bytes
        a.frstor(ptr(rbx))?;
        a.db(&[0x66, 0xdd, 0xb3, 0x00, 0x01, 0x00, 0x00])?; // fnsave (94) [rbx+0x100]
        a.db(&[0x66, 0xdd, 0xa3, 0x00, 0x01, 0x00, 0x00])?; // frstor (94) [rbx+0x100]
        a.db(&[0x66, 0xd9, 0xb3, 0x00, 0x02, 0x00, 0x00])?; // fnstenv (14) [rbx+0x200]
        a.fnstenv(ptr(rbx + 0x300))?;
        a.fldenv(ptr(rbx + 0x300))?;
        Ok(())
    });
    let (before, e) = run(&asm(|a| {
        a.fld1()?;
        a.fldpi()?;
        a.fldl2e()?;
        a.fincstp()?;
        a.fstp(st2)?;
        Ok(())
    }));
    assert_eq!(e, None);
    let h = ok(&code);
    let mut want = before.cpu.fpu();
    let got = h.cpu.fpu();
    // FNSTENV masked all exceptions (they were already).
    want.fcw |= 0x3f;
    assert_eq!((got.fcw, got.fsw, got.ftw), (want.fcw, want.fsw, want.ftw));
    assert_eq!(got.st, want.st);
    // The 108-byte image: FCW, FSW, tags, registers in stack order.
    let m = h.mem();
    let mut img = [0u8; 108];
    m.read(DATA, &mut img).unwrap();
    assert_eq!(u16::from_le_bytes([img[0], img[1]]), 0x037f);
    assert_eq!(u16::from_le_bytes([img[4], img[5]]), want.fsw);
    let top = (want.fsw >> 11) & 7;
    assert_eq!(top, 7);
    assert_eq!(&img[28..38], &want.st[0][..10]);
    // Full tag word computed from the contents.
    let tw = u16::from_le_bytes([img[8], img[9]]);
    for p in 0..8 {
        let t = (tw >> (2 * p)) & 3;
        let valid = want.ftw & (1 << p) != 0;
        assert_eq!(t == 3, !valid, "tag of R{p}: {tw:#06x}");
    }
    // The 14-byte environment: FCW, FSW, FTW as 16-bit words.
    let mut env = [0u8; 14];
    m.read(DATA + 0x200, &mut env).unwrap();
    assert_eq!(u16::from_le_bytes([env[0], env[1]]), 0x037f);
    assert_eq!(u16::from_le_bytes([env[2], env[3]]), want.fsw);
    assert_eq!(u16::from_le_bytes([env[4], env[5]]), tw);
    // FNSAVE re-initialised the FPU between the saves: FRSTOR restored it.
    let mut img94 = [0u8; 94];
    m.read(DATA + 0x100, &mut img94).unwrap();
    assert_eq!(&img94[14..94], &img[28..108]);
}

/// A real-mode machine: CS = DS = 0x1000 (base 0x10000), code at IP 0.
fn real_mode(code16: &[u8]) -> Cpu {
    let mem = PhysMemory::new_owned(2 << 20).unwrap();
    mem.write(0x10000, code16).unwrap();
    let mut cpu = Cpu::new(CpuConfig::default(), mem);
    let mut s = SpecialRegs::reset();
    let seg = |sel: u16, code: bool| Segment {
        selector: sel,
        base: u64::from(sel) << 4,
        limit: 0xffff,
        attrib: SegmentAttributes::new(
            if code { 0xb } else { 0x3 },
            true,
            0,
            true,
            false,
            false,
            false,
        ),
    };
    s.cs = seg(0x1000, true);
    s.ds = seg(0x1000, false);
    s.es = s.ds;
    s.ss = s.ds;
    s.cr0 = cr0::ET | cr0::NE;
    cpu.set_sregs(&s).unwrap();
    cpu.set_regs(&Regs {
        rip: 0,
        rflags: 2,
        ..Regs::default()
    });
    assert_eq!(cpu.run(100), Exit::Hlt);
    cpu
}

#[test]
fn real_mode_environment_holds_linear_addresses() {
    let mut a = CodeAssembler::new(16).unwrap();
    a.mov(bx, 0x800u32).unwrap();
    a.fld(dword_ptr(bx + 4)).unwrap(); // at IP 3: linear 0x10003, FDP 0x10804
    a.fnstenv(ptr(bx + 0x20)).unwrap(); // 16-bit: 14-byte real-mode layout
    a.db(&[0x66, 0xd9, 0x77, 0x40]).unwrap(); // fnstenv (28) [bx+0x40]
    a.db(&[0x66, 0xd9, 0x67, 0x40]).unwrap(); // fldenv (28) [bx+0x40]
    a.db(&[0x66, 0xd9, 0x77, 0x60]).unwrap(); // fnstenv again
    a.hlt().unwrap();
    let code = a.assemble(0).unwrap();
    let cpu = real_mode(&code);
    let m = cpu.memory();
    let mut e14 = [0u8; 14];
    m.read(0x10820, &mut e14).unwrap();
    let w = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    assert_eq!(w(&e14, 6), 0x0003, "FIP[15:0]");
    assert_eq!(
        w(&e14, 8),
        1 << 12 | 0x147,
        "FIP[19:16], FOP (D9 /0 [bx+4])"
    );
    assert_eq!(w(&e14, 10), 0x0804, "FDP[15:0]");
    assert_eq!(w(&e14, 12), 1 << 12, "FDP[19:16]");
    let mut e28 = [0u8; 28];
    m.read(0x10840, &mut e28).unwrap();
    let d = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
    assert_eq!(w(&e28, 12), 0x0003);
    assert_eq!(d(&e28, 16), 1 << 12 | 0x147);
    assert_eq!(w(&e28, 20), 0x0804);
    assert_eq!(d(&e28, 24), 1 << 12);
    // FLDENV of the real-mode image and FNSTENV again: the same bytes.
    let mut again = [0u8; 28];
    m.read(0x10860, &mut again).unwrap();
    assert_eq!(again[12..], e28[12..]);
}

#[test]
fn fxsave_fxrstor_round_trip_and_abridged_tags() {
    let code = asm(|a| {
        a.mov(rbx, DATA)?;
        a.fldz()?;
        a.fld1()?;
        a.fldpi()?;
        a.ffree(st1)?; // a hole in the tags
        a.fxsave(ptr(rbx))?;
        a.fninit()?;
        a.fldz()?;
        a.fxrstor(ptr(rbx))?;
        a.fxsave64(ptr(rbx + 0x200))?;
        Ok(())
    });
    let (h, e) = run_with(&code, without_errptr(), |_| {});
    assert_eq!(e, None);
    let f = h.cpu.fpu();
    assert_eq!((f.fsw >> 11) & 7, 5);
    assert_eq!(f.ftw, 0b1010_0000, "R5 (pi) and R7 (zero) valid, R6 freed");
    assert_eq!(f80(&f.st[0][..10]).1, 0x4000);
    let m = h.mem();
    let mut a = [0u8; 512];
    let mut b = [0u8; 512];
    m.read(DATA, &mut a).unwrap();
    m.read(DATA + 0x200, &mut b).unwrap();
    assert_eq!(a[4], 0b1010_0000);
    // No exception pending and RstrFpErrPtrs not advertised: no pointers (AMD).
    assert!(a[6..24].iter().all(|&x| x == 0), "{:02x?}", &a[6..24]);
    assert_eq!(a[..6], b[..6]);
    assert_eq!(a[24..416], b[24..416]);
    // Bytes 416..512 are not written.
    let code = asm(|a| {
        a.mov(rbx, DATA + 0x400)?;
        a.fxsave64(ptr(rbx))?;
        Ok(())
    });
    let (h2, e) = run_with(&code, CpuConfig::default(), |h| {
        h.mem().write(DATA + 0x400, &[0x5a; 512]).unwrap();
    });
    assert_eq!(e, None);
    let mut c = [0u8; 512];
    h2.mem().read(DATA + 0x400, &mut c).unwrap();
    assert!(c[..416].iter().any(|&x| x != 0x5a));
    assert!(c[416..].iter().all(|&x| x == 0x5a));
}

#[test]
fn fxsave_stores_pointers_when_es_or_when_cpuid_says_always() {
    let (code, fld_at) = asm_at(|a, l| {
        a.mov(rbx, DATA)?;
        a.set_label(l)?;
        a.fld(qword_ptr(rbx + 0x400))?;
        a.fxsave64(ptr(rbx))?;
        a.fxsave(ptr(rbx + 0x200))?;
        Ok(())
    });
    // No RstrFpErrPtrs, no exception pending: zeros.
    let (h, e) = run_with(&code, without_errptr(), |_| {});
    assert_eq!(e, None);
    assert_eq!(h.mem().read_u64(DATA + 8).unwrap(), 0);
    // With the CPUID bit: FOP, FIP (64-bit format; 32-bit + FCS), FDP.
    let mut config = CpuConfig::default();
    config.cpuid.set(CpuidEntry {
        function: 0x8000_0008,
        index: 0,
        indexed: false,
        eax: 0x3030,
        ebx: 1 << 2,
        ecx: 0,
        edx: 0,
    });
    let (h, e) = run_with(&code, config.clone(), |_| {});
    assert_eq!(e, None);
    let m = h.mem();
    assert_eq!(
        m.read_u64(DATA + 6).unwrap() as u16,
        0x583,
        "FOP (DD /0, disp32)"
    );
    assert_eq!(m.read_u64(DATA + 8).unwrap(), fld_at, "FIP (64-bit)");
    assert_eq!(m.read_u64(DATA + 16).unwrap(), DATA + 0x400, "FDP (64-bit)");
    let w = m.read_u64(DATA + 0x208).unwrap();
    assert_eq!(w as u32 as u64, fld_at);
    assert_eq!((w >> 32) as u16, crate::testutil::KCODE, "FCS");
    // FXRSTOR loads them (checked with FNSTENV) only with the bit or ES.
    let code = asm(|a| {
        a.mov(rbx, DATA)?;
        a.mov(qword_ptr(rbx + 8), 0x1234)?;
        a.mov(word_ptr(rbx + 6), 0x7ff)?;
        a.mov(word_ptr(rbx), 0x037f)?;
        a.fxrstor64(ptr(rbx))?;
        a.fnstenv(ptr(rbx + 0x300))?;
        Ok(())
    });
    let (h, _) = run_with(&code, config, |_| {});
    assert_eq!(h.mem().read_u64(DATA + 0x300 + 12).unwrap() as u32, 0x1234);
    let (h, _) = run_with(&code, without_errptr(), |_| {});
    assert_eq!(h.mem().read_u64(DATA + 0x300 + 12).unwrap() as u32, 0);
}

#[test]
fn emms_empties_the_tags() {
    let h = ok(&asm(|a| {
        a.fld1()?;
        a.fldz()?;
        a.emms()?;
        Ok(())
    }));
    assert_eq!(h.cpu.fpu().ftw, 0);
    assert_eq!((fsw(&h) >> 11) & 7, 0, "TOP = 0 (an MMX instruction)");
}

/// FBSTP of `v` (an f64 loaded with FLD) under rounding control `rc`; returns the 10 bytes
/// and the FSW.
fn fbstp(v: f64, rc: u16) -> ([u8; 10], u16) {
    let h = ok(&asm(|a| {
        a.mov(rbx, DATA)?;
        a.mov(rax, v.to_bits())?;
        a.mov(qword_ptr(rbx), rax)?;
        a.mov(word_ptr(rbx + 8), u32::from(0x037f | rc << 10))?;
        a.fldcw(word_ptr(rbx + 8))?;
        a.fld(qword_ptr(rbx))?;
        a.fbstp(tword_ptr(rbx + 0x10))?;
        Ok(())
    }));
    let mut b = [0u8; 10];
    h.mem().read(DATA + 0x10, &mut b).unwrap();
    (b, fsw(&h))
}

#[test]
fn fbld_fbstp() {
    let (b, sw) = fbstp(1_234_567_890.0, 0);
    assert_eq!(b, [0x90, 0x78, 0x56, 0x34, 0x12, 0, 0, 0, 0, 0]);
    assert_eq!(sw & 0x3f, 0);
    let (b, _) = fbstp(-987_654_321_098_765_432.0, 0);
    // The f64 nearest to -987654321098765432 is -987654321098765440.
    assert_eq!(
        b,
        [0x40, 0x54, 0x76, 0x98, 0x10, 0x32, 0x54, 0x76, 0x98, 0x80]
    );
    // Rounding follows RC: 2.5 -> 2 (nearest even), 3 (up), 2 (down, chop); PE set.
    for (rc, want) in [(0, 2), (1, 2), (2, 3), (3, 2)] {
        let (b, sw) = fbstp(2.5, rc);
        assert_eq!(b[0], want, "RC {rc}");
        assert_eq!(sw & 0x20, 0x20);
    }
    // Out of range (>= 10^18): IE, the BCD indefinite (FFFF C000 0000 0000 0000... ).
    let (b, sw) = fbstp(1e18, 0);
    assert_eq!(sw & IE, IE);
    assert_eq!(b, [0, 0, 0, 0, 0, 0, 0, 0xc0, 0xff, 0xff]);
    // FBLD: BCD to the exact integer; FISTP m64 reads it back.
    let h = ok(&asm(|a| {
        a.mov(rbx, DATA)?;
        a.mov(rax, 0x1200_0000_0000_9876u64)?;
        a.mov(qword_ptr(rbx), rax)?;
        a.mov(word_ptr(rbx + 8), 0x8034)?; // sign, digits 17..16 = 34
        a.fbld(tword_ptr(rbx))?;
        a.fistp(qword_ptr(rbx + 0x10))?;
        Ok(())
    }));
    assert_eq!(
        h.mem().read_u64(DATA + 0x10).unwrap() as i64,
        -341_200_000_000_009_876
    );
}

#[test]
fn snapshot_carries_the_x87_state() {
    let h = ok(&asm(|a| {
        a.fld1()?;
        a.fldpi()?;
        a.fld1()?;
        a.fdivp(st1, st0)?;
        Ok(())
    }));
    let snap = h.cpu.snapshot();
    let mut other = Harness::new(16 << 20);
    other.cpu.restore(&snap).unwrap();
    assert_eq!(other.cpu.fpu(), h.cpu.fpu());
    assert_eq!(other.cpu.snapshot().fpu, snap.fpu);
}

#[test]
fn x87_in_compatibility_and_legacy_fxsave_extent() {
    // FXSAVE outside 64-bit mode writes only the first 288 bytes (XMM0-7).
    let mut a = CodeAssembler::new(32).unwrap();
    a.mov(ebx, (DATA + 0x100) as u32).unwrap();
    a.fld1().unwrap();
    a.fxsave(ptr(ebx)).unwrap();
    a.hlt().unwrap();
    let code = a.assemble(CODE).unwrap();
    let mem = PhysMemory::new_owned(16 << 20).unwrap();
    let mut h = Harness::with_memory(mem, CpuConfig::default());
    h.mem().write(DATA + 0x100, &[0xa5; 512]).unwrap();
    h.load(&code);
    let mut s = h.cpu.sregs();
    s.cs = Segment {
        selector: crate::testutil::UCODE32,
        base: 0,
        limit: 0xffff_ffff,
        attrib: SegmentAttributes::new(0xb, true, 0, true, false, true, true),
    };
    s.efer |= efer::LMA;
    h.cpu.set_sregs(&s).unwrap();
    assert_eq!(h.run(), Exit::Hlt);
    assert_eq!(h.exception(), None);
    let mut b = [0u8; 512];
    h.mem().read(DATA + 0x100, &mut b).unwrap();
    assert!(b[..288].iter().any(|&x| x != 0xa5));
    assert!(b[288..].iter().all(|&x| x == 0xa5));
}

#[test]
fn memory_faults_come_before_any_state_change() {
    let unmapped = 0x4000_0000u64; // beyond the harness's identity map
    for (insn, ec) in [
        (vec![0xdd, 0x1b], 2u32),    // fstp qword [rbx]: write fault, no pop
        (vec![0xdd, 0x03], 0),       // fld qword [rbx]: read fault, no push
        (vec![0xdf, 0x33], 2),       // fbstp [rbx]
        (vec![0xdd, 0x33], 2),       // fnsave [rbx]: no re-initialisation
        (vec![0xdd, 0x23], 0),       // frstor [rbx]
        (vec![0x0f, 0xae, 0x03], 2), // fxsave [rbx]
    ] {
        let mut code = vec![0xd9, 0xe8, 0xd9, 0xeb]; // fld1; fldpi
        code.extend_from_slice(&[0x48, 0xbb]);
        code.extend_from_slice(&unmapped.to_le_bytes());
        code.extend_from_slice(&insn);
        code.push(0xf4);
        let (h, e) = run(&code);
        let e = e.expect("#PF");
        assert_eq!(
            (e.vector, e.error_code, e.cr2),
            (vector::PF, Some(ec), unmapped),
            "{insn:02x?}"
        );
        let f = h.cpu.fpu();
        assert_eq!((f.fsw >> 11) & 7, 6, "{insn:02x?}: TOP");
        assert_eq!(f.ftw, 0xc0, "{insn:02x?}: tags");
        assert_eq!(f.fcw, 0x037f);
        assert_eq!(f.fop, 0x1eb, "{insn:02x?}: FOP of FLDPI");
    }
}
