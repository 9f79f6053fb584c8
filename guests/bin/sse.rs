//! sse: SSE/SSE2 state and arithmetic, each result computed two ways (SIMD instruction
//! vs. scalar integer code, or against a known exact IEEE-754 bit pattern).
//!
//! Cases (each prints `sse: <case> ok`):
//! - `cpuid`: FXSR, SSE, SSE2 present; CR4.OSFXSR set, CR0.EM clear.
//! - `moves`: movdqu/movdqa/movups/movaps/movq/movd between memory, XMM and GPRs.
//! - `integer`: paddd, psubq, pmuludq, pand/por/pxor, pshufd, psllq/psrlq, pcmpeqb +
//!   pmovmskb, punpcklbw — against scalar models.
//! - `double`: addsd/mulsd/divsd/sqrtsd/addpd/mulpd with exact results, cvtsi2sd and
//!   cvttsd2si (sum 1..100 = 5050 both ways), 1/3 = 0x3fd5555555555555.
//! - `mxcsr`: 0x1f80 at boot; PE after 1/3, ZE after 1/0 (= +inf); the four rounding
//!   modes on cvtsd2si of +-2.5 and 3.5.
//! - `#XM`: with ZE unmasked, 1/0 raises #XM (vector 19).
//! - `fxsave`: FXSAVE image (FCW 0x37f, MXCSR at 24, XMM0-15 at 160) and FXRSTOR of a
//!   modified image into all 16 XMM registers and MXCSR.
//!
//! `skip=case,...` leaves cases out (moves, integer, double, mxcsr, xm, fxsave).
//! `ring=3` runs everything after the CPUID/CR checks in ring 3 (SSE behaves the same;
//! useful where ring-0 SSE is not available, e.g. KVM's PVM).
//!
//! Ends with `sse: all tests passed`, exit status 0; `FAIL:` and status 1 otherwise.
#![no_std]
#![no_main]

use core::arch::asm;
use esvm_rt::trap::catch;
use esvm_rt::{check, check_eq, entry, println, x86, BootInfo, Dec, Hex};

entry!(main);

#[repr(C, align(16))]
struct A16<const N: usize>([u8; N]);

fn stmxcsr() -> u32 {
    let mut v: u32 = 0;
    // SAFETY: stores MXCSR into v.
    unsafe { asm!("stmxcsr [{}]", in(reg) &mut v, options(nostack)) };
    v
}

fn ldmxcsr(v: u32) {
    // SAFETY: loads MXCSR; callers pass values with reserved bits clear.
    unsafe { asm!("ldmxcsr [{}]", in(reg) &v, options(nostack)) };
}

fn test_cpuid() {
    let (_, _, _, edx) = x86::cpuid(1, 0);
    check!(edx & (1 << 24) != 0, "CPUID.1:EDX.FXSR is clear");
    check!(edx & (1 << 25) != 0, "CPUID.1:EDX.SSE is clear");
    check!(edx & (1 << 26) != 0, "CPUID.1:EDX.SSE2 is clear");
    check!(x86::read_cr4() & (1 << 9) != 0, "CR4.OSFXSR is clear");
    check!(x86::read_cr0() & (1 << 2) == 0, "CR0.EM is set");
    println!("sse: cpuid ok");
}

fn test_moves() {
    let mut src = A16([0u8; 48]);
    for (i, b) in src.0.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(37).wrapping_add(11);
    }
    let mut dst = A16([0u8; 48]);
    let (q, d): (u64, u32);
    // SAFETY: all accesses stay inside src/dst (48 bytes each, 16-byte aligned).
    unsafe {
        asm!(
            "movdqu xmm0, [{s} + 1]",
            "movdqa [{d}], xmm0",
            "movaps xmm1, [{s} + 16]",
            "movups [{d} + 17], xmm1",
            "movabs rax, 0x0123456789abcdef",
            "movq xmm2, rax",
            "movq {q}, xmm2",
            "mov eax, 0xdeadbeef",
            "movd xmm3, eax",
            "movd {d32:e}, xmm3",
            s = in(reg) src.0.as_ptr(), d = in(reg) dst.0.as_mut_ptr(),
            q = out(reg) q, d32 = out(reg) d,
            out("rax") _, out("xmm0") _, out("xmm1") _, out("xmm2") _, out("xmm3") _,
        )
    }
    for i in 0..16 {
        check_eq!(dst.0[i], src.0[i + 1], "movdqu/movdqa byte");
        check_eq!(dst.0[17 + i], src.0[16 + i], "movaps/movups byte");
    }
    check_eq!(dst.0[16], 0, "movups wrote outside its 16 bytes");
    check_eq!(q, 0x0123_4567_89ab_cdef_u64, "movq rax<->xmm");
    check_eq!(d, 0xdead_beef_u32, "movd eax<->xmm");
    println!("sse: moves ok");
}

fn lanes32(b: &[u8; 16]) -> [u32; 4] {
    let mut out = [0u32; 4];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]);
    }
    out
}

fn lanes64(b: &[u8; 16]) -> [u64; 2] {
    let mut out = [0u64; 2];
    for (i, o) in out.iter_mut().enumerate() {
        let mut w = [0u8; 8];
        w.copy_from_slice(&b[8 * i..8 * i + 8]);
        *o = u64::from_le_bytes(w);
    }
    out
}

fn test_integer() {
    let mut a = A16([0u8; 16]);
    let mut b = A16([0u8; 16]);
    for i in 0..16 {
        a.0[i] = (i as u8).wrapping_mul(29).wrapping_add(200);
        b.0[i] = (i as u8).wrapping_mul(71).wrapping_add(3);
    }
    b.0[5] = a.0[5]; // one equal byte for pcmpeqb
    b.0[12] = a.0[12];
    let mut out = A16([0u8; 16 * 9]);
    let mask: u32;
    // SAFETY: reads a/b (16 bytes each), writes the 144-byte out buffer.
    unsafe {
        asm!(
            "movdqa xmm0, [{a}]",
            "movdqa xmm1, [{b}]",
            "movdqa xmm2, xmm0", "paddd xmm2, xmm1", "movdqa [{o}], xmm2",
            "movdqa xmm2, xmm0", "psubq xmm2, xmm1", "movdqa [{o} + 16], xmm2",
            "movdqa xmm2, xmm0", "pmuludq xmm2, xmm1", "movdqa [{o} + 32], xmm2",
            "movdqa xmm2, xmm0", "pand xmm2, xmm1", "movdqa xmm3, xmm0", "por xmm3, xmm1",
            "pxor xmm2, xmm3", "movdqa [{o} + 48], xmm2",
            "pshufd xmm2, xmm0, 0x1b", "movdqa [{o} + 64], xmm2",
            "movdqa xmm2, xmm0", "psllq xmm2, 13", "movdqa [{o} + 80], xmm2",
            "movdqa xmm2, xmm1", "psrlq xmm2, 7", "movdqa [{o} + 96], xmm2",
            "movdqa xmm2, xmm0", "pcmpeqb xmm2, xmm1", "movdqa [{o} + 112], xmm2",
            "pmovmskb {m:e}, xmm2",
            "movdqa xmm2, xmm0", "punpcklbw xmm2, xmm1", "movdqa [{o} + 128], xmm2",
            a = in(reg) a.0.as_ptr(), b = in(reg) b.0.as_ptr(), o = in(reg) out.0.as_mut_ptr(),
            m = out(reg) mask,
            out("xmm0") _, out("xmm1") _, out("xmm2") _, out("xmm3") _,
        )
    }
    let blk = |k: usize| -> [u8; 16] {
        let mut r = [0u8; 16];
        r.copy_from_slice(&out.0[16 * k..16 * k + 16]);
        r
    };
    let (a32, b32) = (lanes32(&a.0), lanes32(&b.0));
    let (a64, b64) = (lanes64(&a.0), lanes64(&b.0));
    let paddd = lanes32(&blk(0));
    let psubq = lanes64(&blk(1));
    let pmuludq = lanes64(&blk(2));
    let logic = lanes64(&blk(3));
    let pshufd = lanes32(&blk(4));
    let psllq = lanes64(&blk(5));
    let psrlq = lanes64(&blk(6));
    let pcmpeqb = blk(7);
    let punpck = blk(8);
    for i in 0..4 {
        check_eq!(paddd[i], a32[i].wrapping_add(b32[i]), "paddd lane");
        check_eq!(pshufd[i], a32[3 - i], "pshufd 0x1b lane");
    }
    for i in 0..2 {
        check_eq!(psubq[i], a64[i].wrapping_sub(b64[i]), "psubq lane");
        check_eq!(
            pmuludq[i],
            (a64[i] & 0xffff_ffff) * (b64[i] & 0xffff_ffff),
            "pmuludq lane"
        );
        check_eq!(
            logic[i],
            (a64[i] & b64[i]) ^ (a64[i] | b64[i]),
            "pand/por/pxor lane"
        );
        check_eq!(psllq[i], a64[i] << 13, "psllq lane");
        check_eq!(psrlq[i], b64[i] >> 7, "psrlq lane");
    }
    let mut expect_mask = 0u32;
    for (i, &got) in pcmpeqb.iter().enumerate() {
        let eq = a.0[i] == b.0[i];
        check_eq!(got, if eq { 0xff } else { 0 }, "pcmpeqb byte");
        expect_mask |= u32::from(eq) << i;
    }
    check_eq!(mask, expect_mask, "pmovmskb");
    check_eq!(
        mask,
        (1 << 5) | (1 << 12),
        "pmovmskb of the two equal bytes"
    );
    for i in 0..8 {
        check_eq!(punpck[2 * i], a.0[i], "punpcklbw even byte");
        check_eq!(punpck[2 * i + 1], b.0[i], "punpcklbw odd byte");
    }
    println!("sse: integer ok");
}

const ONE: u64 = 0x3ff0_0000_0000_0000;
const THREE: u64 = 0x4008_0000_0000_0000;

/// Runs `divsd` of two doubles given as bit patterns; returns the quotient's bits.
fn divsd(a: u64, b: u64) -> u64 {
    let r: u64;
    // SAFETY: register-only SSE arithmetic.
    unsafe {
        asm!("movq xmm0, {a}", "movq xmm1, {b}", "divsd xmm0, xmm1", "movq {r}, xmm0",
             a = in(reg) a, b = in(reg) b, r = out(reg) r, out("xmm0") _, out("xmm1") _)
    }
    r
}

/// cvtsd2si (rounding per MXCSR.RC) of a double's bit pattern.
fn cvtsd2si(a: u64) -> i64 {
    let r: i64;
    // SAFETY: register-only SSE conversion.
    unsafe {
        asm!("movq xmm0, {a}", "cvtsd2si {r}, xmm0", a = in(reg) a, r = out(reg) r, out("xmm0") _)
    }
    r
}

fn test_double() {
    // (1.5 + 2.25) * 4.0 / 2.0 = 7.5, sqrt(6.25) = 2.5
    let vals: [u64; 5] = [
        0x3ff8_0000_0000_0000, // 1.5
        0x4002_0000_0000_0000, // 2.25
        0x4010_0000_0000_0000, // 4.0
        0x4000_0000_0000_0000, // 2.0
        0x4019_0000_0000_0000, // 6.25
    ];
    let (r1, r2): (u64, u64);
    // SAFETY: reads the 5-element array; register-only arithmetic.
    unsafe {
        asm!(
            "movsd xmm0, [{v}]",
            "addsd xmm0, [{v} + 8]",
            "mulsd xmm0, [{v} + 16]",
            "divsd xmm0, [{v} + 24]",
            "movq {r1}, xmm0",
            "sqrtsd xmm1, [{v} + 32]",
            "movq {r2}, xmm1",
            v = in(reg) vals.as_ptr(), r1 = out(reg) r1, r2 = out(reg) r2,
            out("xmm0") _, out("xmm1") _,
        )
    }
    check_eq!(r1, 0x401e_0000_0000_0000_u64, "(1.5+2.25)*4/2 = 7.5");
    check_eq!(r2, 0x4004_0000_0000_0000_u64, "sqrt(6.25) = 2.5");

    // Packed: [1.5, 2.25] + [4.0, 2.0] = [5.5, 4.25]; * [2.0, 4.0] = [11.0, 17.0]
    let mut out = A16([0u8; 16]);
    let pa = A16(concat_u64(vals[0], vals[1]));
    let pb = A16(concat_u64(vals[2], vals[3]));
    let pc = A16(concat_u64(vals[3], vals[2]));
    // SAFETY: aligned 16-byte operands.
    unsafe {
        asm!(
            "movapd xmm0, [{a}]", "addpd xmm0, [{b}]", "mulpd xmm0, [{c}]", "movapd [{o}], xmm0",
            a = in(reg) pa.0.as_ptr(), b = in(reg) pb.0.as_ptr(), c = in(reg) pc.0.as_ptr(),
            o = in(reg) out.0.as_mut_ptr(), out("xmm0") _,
        )
    }
    let p = lanes64(&out.0);
    check_eq!(p[0], 0x4026_0000_0000_0000_u64, "addpd/mulpd lane 0 = 11.0");
    check_eq!(p[1], 0x4031_0000_0000_0000_u64, "addpd/mulpd lane 1 = 17.0");

    // Sum 1..=100 in doubles (exact) vs integers.
    let mut isum = 0i64;
    for i in 1..=100i64 {
        isum += i;
    }
    let fsum: i64;
    // SAFETY: register-only SSE arithmetic.
    unsafe {
        asm!(
            "xorpd xmm0, xmm0",
            "mov {i}, 1",
            "2:",
            "cvtsi2sd xmm1, {i}",
            "addsd xmm0, xmm1",
            "inc {i}",
            "cmp {i}, 100",
            "jle 2b",
            "cvttsd2si {s}, xmm0",
            i = out(reg) _, s = out(reg) fsum, out("xmm0") _, out("xmm1") _,
        )
    }
    check_eq!(fsum, isum, "sum 1..100 via cvtsi2sd/addsd/cvttsd2si");
    check_eq!(divsd(ONE, THREE), 0x3fd5_5555_5555_5555_u64, "1/3");
    println!("sse: double ok");
}

fn concat_u64(a: u64, b: u64) -> [u8; 16] {
    let mut r = [0u8; 16];
    r[..8].copy_from_slice(&a.to_le_bytes());
    r[8..].copy_from_slice(&b.to_le_bytes());
    r
}

fn test_mxcsr() {
    ldmxcsr(0x1f80);
    let _ = divsd(ONE, THREE);
    check!(
        stmxcsr() & (1 << 5) != 0,
        "MXCSR.PE not set by an inexact 1/3"
    );
    ldmxcsr(0x1f80);
    let inf = divsd(ONE, 0);
    check_eq!(inf, 0x7ff0_0000_0000_0000_u64, "1/0 = +inf");
    check_eq!(stmxcsr() & 0x3f, 1 << 2, "MXCSR flags after 1/0 (only ZE)");

    const P2_5: u64 = 0x4004_0000_0000_0000;
    const M2_5: u64 = 0xc004_0000_0000_0000;
    const P3_5: u64 = 0x400c_0000_0000_0000;
    // RC: 00 nearest-even, 01 down, 10 up, 11 toward zero.
    let expected: [(u32, [i64; 3]); 4] = [
        (0x1f80, [2, -2, 4]),
        (0x3f80, [2, -3, 3]),
        (0x5f80, [3, -2, 4]),
        (0x7f80, [2, -2, 3]),
    ];
    for (mx, exp) in expected {
        ldmxcsr(mx);
        let got = [cvtsd2si(P2_5), cvtsd2si(M2_5), cvtsd2si(P3_5)];
        ldmxcsr(0x1f80);
        for k in 0..3 {
            if got[k] != exp[k] {
                println!(
                    "FAIL: cvtsd2si with MXCSR={} of value {}: got {}, expected {}",
                    Hex(u64::from(mx)),
                    Hex([P2_5, M2_5, P3_5][k]),
                    Hex(got[k] as u64),
                    Hex(exp[k] as u64)
                );
                esvm_rt::exit(1);
            }
        }
    }

    println!("sse: mxcsr ok");
}

fn test_xm() {
    // Unmask ZE (bit 9): division by zero raises #XM (CR4.OSXMMEXCPT is set).
    ldmxcsr(0x1f80 & !(1 << 9));
    let r = catch(|| {
        let _ = divsd(ONE, 0);
    });
    ldmxcsr(0x1f80);
    match r {
        Err(f) if f.vector == 19 => {}
        Err(f) => {
            println!(
                "FAIL: unmasked 1/0 raised vector {} instead of #XM (19)",
                Hex(f.vector)
            );
            esvm_rt::exit(1);
        }
        Ok(()) => {
            println!("FAIL: unmasked 1/0 raised no exception");
            esvm_rt::exit(1);
        }
    }
    println!("sse: #XM ok");
}

fn test_fxsave() {
    let mut pat = A16([0u8; 256]);
    for (i, b) in pat.0.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(13) ^ 0x5a;
    }
    let mut img = A16([0u8; 512]);
    let mx: u32 = 0x3f80;
    // SAFETY: loads the 16 patterns into XMM0-15, sets MXCSR, saves the state into the
    // 512-byte, 16-byte aligned image.
    unsafe {
        asm!(
            "movdqa xmm0, [{p}]", "movdqa xmm1, [{p} + 16]", "movdqa xmm2, [{p} + 32]",
            "movdqa xmm3, [{p} + 48]", "movdqa xmm4, [{p} + 64]", "movdqa xmm5, [{p} + 80]",
            "movdqa xmm6, [{p} + 96]", "movdqa xmm7, [{p} + 112]", "movdqa xmm8, [{p} + 128]",
            "movdqa xmm9, [{p} + 144]", "movdqa xmm10, [{p} + 160]", "movdqa xmm11, [{p} + 176]",
            "movdqa xmm12, [{p} + 192]", "movdqa xmm13, [{p} + 208]", "movdqa xmm14, [{p} + 224]",
            "movdqa xmm15, [{p} + 240]",
            "ldmxcsr [{m}]",
            "fxsave [{i}]",
            p = in(reg) pat.0.as_ptr(), m = in(reg) &mx, i = in(reg) img.0.as_mut_ptr(),
            out("xmm0") _, out("xmm1") _, out("xmm2") _, out("xmm3") _, out("xmm4") _,
            out("xmm5") _, out("xmm6") _, out("xmm7") _, out("xmm8") _, out("xmm9") _,
            out("xmm10") _, out("xmm11") _, out("xmm12") _, out("xmm13") _, out("xmm14") _,
            out("xmm15") _,
        )
    }
    ldmxcsr(0x1f80);
    let fcw = u16::from_le_bytes([img.0[0], img.0[1]]);
    let img_mx = u32::from_le_bytes([img.0[24], img.0[25], img.0[26], img.0[27]]);
    check_eq!(fcw, 0x37f, "FXSAVE FCW (FNINIT default)");
    check_eq!(img_mx, 0x3f80, "FXSAVE MXCSR");
    for i in 0..256 {
        if img.0[160 + i] != pat.0[i] {
            println!(
                "FAIL: FXSAVE image XMM{} byte {} differs",
                Dec((i / 16) as u64),
                Dec((i % 16) as u64)
            );
            esvm_rt::exit(1);
        }
    }
    // Modify the image: XMM5 := all 0xA5, MXCSR := 0x5f80 (round up).
    for b in &mut img.0[160 + 5 * 16..160 + 6 * 16] {
        *b = 0xa5;
    }
    img.0[24..28].copy_from_slice(&0x5f80u32.to_le_bytes());
    let mut back = A16([0u8; 256]);
    let mut mx_back: u32 = 0;
    // SAFETY: clears all XMM registers, restores the image, stores XMM0-15 and MXCSR.
    unsafe {
        asm!(
            "pxor xmm0, xmm0", "pxor xmm1, xmm1", "pxor xmm2, xmm2", "pxor xmm3, xmm3",
            "pxor xmm4, xmm4", "pxor xmm5, xmm5", "pxor xmm6, xmm6", "pxor xmm7, xmm7",
            "pxor xmm8, xmm8", "pxor xmm9, xmm9", "pxor xmm10, xmm10", "pxor xmm11, xmm11",
            "pxor xmm12, xmm12", "pxor xmm13, xmm13", "pxor xmm14, xmm14", "pxor xmm15, xmm15",
            "fxrstor [{i}]",
            "stmxcsr [{m}]",
            "movdqa [{b}], xmm0", "movdqa [{b} + 16], xmm1", "movdqa [{b} + 32], xmm2",
            "movdqa [{b} + 48], xmm3", "movdqa [{b} + 64], xmm4", "movdqa [{b} + 80], xmm5",
            "movdqa [{b} + 96], xmm6", "movdqa [{b} + 112], xmm7", "movdqa [{b} + 128], xmm8",
            "movdqa [{b} + 144], xmm9", "movdqa [{b} + 160], xmm10", "movdqa [{b} + 176], xmm11",
            "movdqa [{b} + 192], xmm12", "movdqa [{b} + 208], xmm13", "movdqa [{b} + 224], xmm14",
            "movdqa [{b} + 240], xmm15",
            i = in(reg) img.0.as_ptr(), m = in(reg) &mut mx_back, b = in(reg) back.0.as_mut_ptr(),
            out("xmm0") _, out("xmm1") _, out("xmm2") _, out("xmm3") _, out("xmm4") _,
            out("xmm5") _, out("xmm6") _, out("xmm7") _, out("xmm8") _, out("xmm9") _,
            out("xmm10") _, out("xmm11") _, out("xmm12") _, out("xmm13") _, out("xmm14") _,
            out("xmm15") _,
        )
    }
    ldmxcsr(0x1f80);
    check_eq!(mx_back, 0x5f80, "MXCSR after FXRSTOR");
    for i in 0..256 {
        let want = if (80..96).contains(&i) {
            0xa5
        } else {
            pat.0[i]
        };
        if back.0[i] != want {
            println!(
                "FAIL: after FXRSTOR XMM{} byte {} is {}, expected {}",
                Dec((i / 16) as u64),
                Dec((i % 16) as u64),
                Hex(u64::from(back.0[i])),
                Hex(u64::from(want))
            );
            esvm_rt::exit(1);
        }
    }
    println!("sse: fxsave/fxrstor ok");
}

extern "C" fn unprivileged_tests(_: u64) -> u64 {
    // Before any floating-point arithmetic could have set a flag.
    check_eq!(stmxcsr(), 0x1f80, "MXCSR at boot");
    let run = |case: &str, f: fn()| esvm_rt::args::run_case("sse", case, f);
    run("moves", test_moves);
    run("integer", test_integer);
    run("double", test_double);
    run("mxcsr", test_mxcsr);
    run("xm", test_xm);
    run("fxsave", test_fxsave);
    0
}

fn main(_bi: &'static BootInfo) -> u32 {
    let ring = esvm_rt::arg_u64_or_exit("ring", 0);
    println!("sse: starting (ring {})", Dec(ring));
    test_cpuid();
    if ring == 3 {
        let opts = esvm_rt::user::UserOptions {
            emulate_port_io: true,
            ..Default::default()
        };
        esvm_rt::user::run_user_with(unprivileged_tests, 0, opts);
    } else {
        unprivileged_tests(0);
    }
    println!("sse: all tests passed");
    0
}
