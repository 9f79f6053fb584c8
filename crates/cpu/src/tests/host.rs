//! Differential tests of single instructions against the host CPU (any x86-64): the same
//! instruction bytes run natively (in a small RWX page) and in the interpreter, and
//! RAX/RCX/RDX and the arithmetic flags are compared. Flags and results the architecture
//! leaves undefined are compared only when the host is the modelled family
//! ([`crate::model::host_is_modelled`]); elsewhere the flags are masked and inputs with an
//! undefined result are left out. Instructions the host lacks (BMI1, LZCNT, POPCNT, MOVBE,
//! LAHF/SAHF in 64-bit mode) are skipped with a "skipped:" line, never run: the host would
//! fault or, worse, run TZCNT/LZCNT as BSF/BSR.

use crate::model::{host_is_modelled, undefined_flags};
use crate::testutil::{run_snippet, SnippetEnd};
use esvm_arch::bits::rflags;
use esvm_arch::Regs;
use iced_x86::code_asm::*;

/// One host page, readable, writable and executable, for running instruction snippets
/// natively (the host-differential tests).
pub(super) struct Page(pub(super) *mut u8);

impl Page {
    pub(super) fn new() -> Page {
        // SAFETY: anonymous private mapping; checked for failure.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        Page(p as *mut u8)
    }
}

impl Drop for Page {
    fn drop(&mut self) {
        // SAFETY: mapped in `new`.
        unsafe { libc::munmap(self.0 as *mut _, 4096) };
    }
}

/// Run `insn` natively with rax, rcx, rdx and the arithmetic flags given.
///
/// # Safety
/// `insn` must be one instruction (at most 15 bytes) that only reads and writes rax, rcx,
/// rdx and the flags, and does not fault for these inputs (no #DE).
unsafe fn native(page: &Page, insn: &[u8], v: [u64; 3], flags: u64) -> ([u64; 3], u64) {
    let mut code = vec![0x41, 0x50, 0x9d];
    code.extend_from_slice(insn);
    code.extend_from_slice(&[0x9c, 0x41, 0x58, 0xc3]);
    // SAFETY: the page is 4 KiB and the code (one instruction plus 7 bytes) is far shorter.
    unsafe { std::ptr::copy_nonoverlapping(code.as_ptr(), page.0, code.len()) };
    let (mut a, mut c, mut d, mut f) = (v[0], v[1], v[2], flags & rflags::ARITH);
    // SAFETY: the code only touches rax, rcx, rdx, r8, the flags and balanced stack slots
    // and returns; the instruction cannot fault (the caller's contract).
    unsafe {
        std::arch::asm!(
            "call {p}",
            p = in(reg) page.0,
            inout("rax") a,
            inout("rcx") c,
            inout("rdx") d,
            inout("r8") f,
        );
    }
    ([a, c, d], f)
}

fn emulated(insn: &[u8], v: [u64; 3], flags: u64) -> ([u64; 3], u64) {
    let mut r = Regs::default();
    r.gpr[0] = v[0];
    r.gpr[1] = v[1];
    r.gpr[2] = v[2];
    r.gpr[4] = crate::testutil::SNIPPET_SCRATCH + 0x800;
    r.rflags = flags & rflags::ARITH;
    let mut scratch = [0u8; 4096];
    let o = run_snippet(insn, &r, &mut scratch);
    assert_eq!(o.end, SnippetEnd::Completed, "{insn:02x?}");
    ([o.regs.gpr[0], o.regs.gpr[1], o.regs.gpr[2]], o.regs.rflags)
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn interesting(&mut self) -> u64 {
        const V: [u64; 12] = [
            0,
            1,
            2,
            0x7f,
            0x80,
            0xff,
            0x7fff,
            0x8000,
            0x7fff_ffff,
            0x8000_0000,
            0x7fff_ffff_ffff_ffff,
            u64::MAX,
        ];
        match self.next() % 4 {
            0 => V[(self.next() % 12) as usize],
            1 => self.next() & 0x3f,
            _ => self.next(),
        }
    }
}

/// The host feature an instruction needs beyond baseline x86-64, if any.
fn host_lacks(name: &str) -> Option<&'static str> {
    let lahf_lm = std::arch::x86_64::__cpuid(0x8000_0000).eax >= 0x8000_0001
        && std::arch::x86_64::__cpuid(0x8000_0001).ecx & 1 != 0;
    let (feature, present) = match name {
        "tzcnt" | "andn" | "blsr" | "blsi" | "blsmsk" | "bextr" => {
            ("BMI1", std::arch::is_x86_feature_detected!("bmi1"))
        }
        "lzcnt" => ("LZCNT", std::arch::is_x86_feature_detected!("lzcnt")),
        "popcnt" => ("POPCNT", std::arch::is_x86_feature_detected!("popcnt")),
        "movbe" => ("MOVBE", std::arch::is_x86_feature_detected!("movbe")),
        "lahf" | "sahf" => ("LAHF/SAHF in 64-bit mode", lahf_lm),
        _ => return None,
    };
    (!present).then_some(feature)
}

/// The flags compared for `name` on this host.
fn compared_flags(name: &str) -> u64 {
    if host_is_modelled() {
        rflags::ARITH
    } else {
        rflags::ARITH & !undefined_flags(name)
    }
}

/// Says once per test binary what the comparisons hold this host to.
fn announce_host() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let host = esvm_arch::cpuid::CpuSignature::host();
        println!(
            "host {host}; modelled {}: undefined flags and results {}",
            crate::model::modelled(),
            if host_is_modelled() {
                "compared"
            } else {
                "masked (the host is not the modelled family)"
            }
        );
    });
}

/// Whether the check of `name` must be skipped on this host (it says so).
fn skip_on_this_host(name: &str) -> bool {
    announce_host();
    match host_lacks(name) {
        Some(feature) => {
            println!("skipped: {name}: the host CPU lacks {feature}");
            true
        }
        None => false,
    }
}

/// Compares `f`'s instruction natively and emulated on 200 inputs that `skip` lets through.
/// Test-harness contract (the tests below keep it): the instruction only touches rax, rcx,
/// rdx and the flags, and `skip` rejects the inputs on which it faults (#DE).
fn check(
    name: &str,
    f: impl Fn(&mut CodeAssembler) -> Result<(), IcedError>,
    skip: impl Fn([u64; 3]) -> bool,
) {
    if skip_on_this_host(name) {
        return;
    }
    let mut a = CodeAssembler::new(64).unwrap();
    f(&mut a).unwrap();
    let insn = a.assemble(0).unwrap();
    let page = Page::new();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ name.len() as u64);
    let cmp = compared_flags(name);
    let mut bad = Vec::new();
    for _ in 0..200 {
        let v = [rng.interesting(), rng.interesting(), rng.interesting()];
        if skip(v) {
            continue;
        }
        let fl = rng.next() & rflags::ARITH;
        // SAFETY: `insn` is one instruction on rax/rcx/rdx/flags and `skip` let through only
        // inputs it does not fault on (this harness's contract, above).
        let (nv, nf) = unsafe { native(&page, &insn, v, fl) };
        let (ev, ef) = emulated(&insn, v, fl);
        if nv != ev || nf & cmp != ef & cmp {
            bad.push(format!(
                "inputs {v:x?} flags {fl:#x}: native {nv:x?} {:#x} emulated {ev:x?} {:#x}",
                nf & rflags::ARITH,
                ef & rflags::ARITH
            ));
        }
    }
    assert!(
        bad.is_empty(),
        "{name} {insn:02x?}:\n{}",
        bad[..bad.len().min(8)].join("\n")
    );
}

fn never(_: [u64; 3]) -> bool {
    false
}

macro_rules! rr_all_sizes {
    ($name:literal, $m:ident) => {
        check($name, |a| a.$m(al, cl), never);
        check($name, |a| a.$m(ah, dl), never);
        check($name, |a| a.$m(ax, cx), never);
        check($name, |a| a.$m(eax, ecx), never);
        check($name, |a| a.$m(rax, rcx), never);
        check($name, |a| a.$m(rdx, rdx), never);
    };
}

#[test]
fn alu_rr() {
    rr_all_sizes!("add", add);
    rr_all_sizes!("adc", adc);
    rr_all_sizes!("sub", sub);
    rr_all_sizes!("sbb", sbb);
    rr_all_sizes!("and", and);
    rr_all_sizes!("or", or);
    rr_all_sizes!("xor", xor);
    rr_all_sizes!("cmp", cmp);
    rr_all_sizes!("test", test);
    check("add", |a| a.add(eax, 0x7fff_ffff), never);
    check("sub", |a| a.sub(rax, -5), never);
    check("xor", |a| a.xor(cl, 0x80u32), never);
}

#[test]
fn unary() {
    for (n, f) in [
        (
            "inc",
            (|a: &mut CodeAssembler| a.inc(eax)) as fn(&mut CodeAssembler) -> Result<(), IcedError>,
        ),
        ("inc", |a| a.inc(al)),
        ("dec", |a| a.dec(rcx)),
        ("dec", |a| a.dec(cx)),
        ("neg", |a| a.neg(rax)),
        ("neg", |a| a.neg(dl)),
        ("not", |a| a.not(eax)),
        ("bswap", |a| a.bswap(eax)),
        ("bswap", |a| a.bswap(rcx)),
        ("cbw", |a| a.cbw()),
        ("cwde", |a| a.cwde()),
        ("cdqe", |a| a.cdqe()),
        ("cwd", |a| a.cwd()),
        ("cdq", |a| a.cdq()),
        ("cqo", |a| a.cqo()),
        ("lahf", |a| a.lahf()),
        ("sahf", |a| a.sahf()),
        ("movzx", |a| a.movzx(eax, cl)),
        ("movzx", |a| a.movzx(rax, dx)),
        ("movsx", |a| a.movsx(rax, cl)),
        ("movsx", |a| a.movsx(ax, ch)),
        ("movsxd", |a| a.movsxd(rax, ecx)),
        ("xchg", |a| a.xchg(eax, ecx)),
        ("xchg", |a| a.xchg(ah, dl)),
        ("xadd", |a| a.xadd(rax, rcx)),
        ("xadd", |a| a.xadd(ax, dx)),
        ("cmpxchg", |a| a.cmpxchg(ecx, edx)),
        ("cmpxchg", |a| a.cmpxchg(rcx, rdx)),
        ("cmpxchg", |a| a.cmpxchg(cl, dl)),
        ("setcc", |a| a.setbe(cl)),
        ("setcc", |a| a.setl(dh)),
        ("cmovcc", |a| a.cmovg(eax, ecx)),
        ("cmovcc", |a| a.cmovo(rax, rdx)),
        ("cmovcc", |a| a.cmovp(ax, dx)),
    ] {
        check(n, f, never);
    }
}

#[test]
fn shifts() {
    macro_rules! sh {
        ($n:literal, $m:ident) => {
            check($n, |a| a.$m(eax, cl), never);
            check($n, |a| a.$m(rax, cl), never);
            check($n, |a| a.$m(dx, cl), never);
            check($n, |a| a.$m(al, cl), never);
            check($n, |a| a.$m(rdx, 1), never);
            check($n, |a| a.$m(ax, 1), never);
            check($n, |a| a.$m(al, 9), never);
            check($n, |a| a.$m(ecx, 31), never);
        };
    }
    sh!("shl", shl);
    sh!("shr", shr);
    sh!("sar", sar);
    sh!("rol", rol);
    sh!("ror", ror);
    sh!("rcl", rcl);
    sh!("rcr", rcr);
    // A 16-bit SHLD/SHRD by more than 16 has an undefined result (see crate::model).
    let undefined_16 = |v: [u64; 3]| !host_is_modelled() && v[1] & 31 > 16;
    check("shld", |a| a.shld(eax, edx, cl), never);
    check("shld", |a| a.shld(rax, rdx, cl), never);
    check("shld", |a| a.shld(ax, dx, cl), undefined_16);
    check("shrd", |a| a.shrd(eax, edx, cl), never);
    check("shrd", |a| a.shrd(rax, rdx, 7), never);
    check("shrd", |a| a.shrd(ax, dx, cl), undefined_16);
}

#[test]
fn muldiv_bits() {
    check("mul", |a| a.mul(rcx), never);
    check("mul", |a| a.mul(ecx), never);
    check("mul", |a| a.mul(cl), never);
    check("mul", |a| a.mul(cx), never);
    check("imul", |a| a.imul(rcx), never);
    check("imul", |a| a.imul(cl), never);
    check("imul", |a| a.imul_2(eax, ecx), never);
    check("imul", |a| a.imul_2(rax, rdx), never);
    check("imul", |a| a.imul_3(ax, cx, 300), never);
    check("imul", |a| a.imul_3(rax, rcx, -7), never);
    // DIV: skip inputs that would raise #DE natively.
    check("div", |a| a.div(rcx), |v| v[1] == 0 || v[2] >= v[1]);
    check(
        "div",
        |a| a.div(ecx),
        |v| {
            let d = v[1] as u32 as u64;
            d == 0 || ((v[2] as u32 as u64) << 32 | v[0] as u32 as u64) / d > u32::MAX as u64
        },
    );
    check(
        "idiv",
        |a| a.idiv(rcx),
        |v| {
            let n = ((v[2] as i128) << 64) | v[0] as i128;
            let d = v[1] as i64 as i128;
            d == 0 || {
                let q = n / d;
                q > i64::MAX as i128 || q < i64::MIN as i128
            }
        },
    );
    check(
        "idiv",
        |a| a.idiv(cl),
        |v| {
            let n = v[0] as i16 as i32;
            let d = v[1] as i8 as i32;
            d == 0 || {
                let q = n / d;
                !(-128..=127).contains(&q)
            }
        },
    );
    for (n, f) in [
        (
            "bt",
            (|a: &mut CodeAssembler| a.bt(rax, rcx))
                as fn(&mut CodeAssembler) -> Result<(), IcedError>,
        ),
        ("bts", |a| a.bts(eax, ecx)),
        ("btr", |a| a.btr(ax, cx)),
        ("btc", |a| a.btc(rax, 63)),
        ("bsf", |a| a.bsf(rax, rcx)),
        ("bsr", |a| a.bsr(eax, ecx)),
        ("bsr", |a| a.bsr(ax, cx)),
        ("tzcnt", |a| a.tzcnt(rax, rcx)),
        ("lzcnt", |a| a.lzcnt(eax, ecx)),
        ("lzcnt", |a| a.lzcnt(ax, cx)),
        ("popcnt", |a| a.popcnt(rax, rcx)),
        ("andn", |a| a.andn(rax, rcx, rdx)),
        ("blsr", |a| a.blsr(eax, ecx)),
        ("blsi", |a| a.blsi(rax, rcx)),
        ("blsmsk", |a| a.blsmsk(rax, rcx)),
        ("bextr", |a| a.bextr(rax, rcx, rdx)),
    ] {
        check(n, f, never);
    }
}

/// Run `insn` natively with xmm0/xmm1, MXCSR and rax/rcx/rdx; returns
/// (xmm0, xmm1, mxcsr, [rax, rcx, rdx], rflags).
///
/// # Safety
/// `insn` must be one SSE instruction that only reads and writes xmm0, xmm1, MXCSR, rax,
/// rcx, rdx and the flags, and `mx` must mask every SIMD exception (so nothing traps).
unsafe fn native_sse(
    page: &Page,
    insn: &[u8],
    x: [u128; 2],
    mx: u32,
    g: [u64; 3],
) -> ([u128; 2], u32, [u64; 3], u64) {
    // movdqu xmm0,[rdi]; movdqu xmm1,[rdi+16]; ldmxcsr [rdi+32]
    // push 0; popfq (clear the arithmetic flags) first.
    let mut code = vec![
        0x6a, 0x00, 0x9d, 0xf3, 0x0f, 0x6f, 0x07, 0xf3, 0x0f, 0x6f, 0x4f, 0x10, 0x0f, 0xae, 0x57,
        0x20,
    ];
    code.extend_from_slice(insn);
    // movdqu [rdi],xmm0; movdqu [rdi+16],xmm1; stmxcsr [rdi+32]; pushfq; pop r8; ret
    code.extend_from_slice(&[
        0xf3, 0x0f, 0x7f, 0x07, 0xf3, 0x0f, 0x7f, 0x4f, 0x10, 0x0f, 0xae, 0x5f, 0x20, 0x9c, 0x41,
        0x58, 0xc3,
    ]);
    // SAFETY: the code (one instruction plus 33 bytes) fits the 4 KiB page.
    unsafe { std::ptr::copy_nonoverlapping(code.as_ptr(), page.0, code.len()) };
    #[repr(C, align(16))]
    struct Buf([u128; 2], u32, [u32; 3]);
    let mut b = Buf(x, mx, [0; 3]);
    let (mut a, mut c, mut d, mut f) = (g[0], g[1], g[2], 0u64);
    let mut host: u32 = 0;
    // SAFETY: the code reads/writes only `b` (via rdi), xmm0/xmm1, MXCSR (saved and
    // restored here), rax/rcx/rdx/r8, flags and balanced stack slots; all SIMD exceptions
    // are masked (the caller's contract) so nothing traps.
    unsafe {
        std::arch::asm!(
            "stmxcsr [{h}]",
            "call {p}",
            "ldmxcsr [{h}]",
            p = in(reg) page.0,
            h = in(reg) &mut host as *mut u32,
            in("rdi") &mut b as *mut Buf,
            inout("rax") a,
            inout("rcx") c,
            inout("rdx") d,
            inout("r8") f,
            out("xmm0") _,
            out("xmm1") _,
        );
    }
    (b.0, b.1, [a, c, d], f)
}

fn fp_interesting(r: &mut Rng) -> u128 {
    let f32s: [u32; 10] = [
        0,
        0x8000_0000,
        0x3f80_0000,
        0xbf80_0000,
        0x7f80_0000,
        0x7fc0_0000,
        0x0000_0001,
        0x7f7f_ffff,
        0x4f00_0000,
        0xcf00_0001,
    ];
    let f64s: [u64; 8] = [
        0,
        0x3ff0_0000_0000_0000,
        0x7ff0_0000_0000_0000,
        0x7ff8_0000_0000_0000,
        1,
        0xc3e0_0000_0000_0001,
        0x41e0_0000_0000_0000,
        0x8000_0000_0000_0000,
    ];
    let mut v = 0u128;
    match r.next() % 3 {
        0 => {
            for k in 0..4 {
                v |= (f32s[(r.next() % 10) as usize] as u128) << (32 * k);
            }
        }
        1 => {
            for k in 0..2 {
                v |= (f64s[(r.next() % 8) as usize] as u128) << (64 * k);
            }
        }
        _ => {
            // Random but mostly normal floats: random mantissa, moderate exponents.
            for k in 0..4 {
                let e = 100 + r.next() % 60;
                let f = ((r.next() & 1) << 31) | (e << 23) | (r.next() & 0x7f_ffff);
                v |= (f as u128) << (32 * k);
            }
            if r.next() & 1 == 0 {
                v = (r.next() as u128) | ((r.next() as u128) << 64);
            }
        }
    }
    v
}

/// Compares `f`'s instruction natively and emulated. Test-harness contract (the tests below
/// keep it): one SSE instruction on xmm0, xmm1, MXCSR, rax, rcx, rdx and the flags only.
fn check_sse(name: &str, f: impl Fn(&mut CodeAssembler) -> Result<(), IcedError>) {
    let mut a = CodeAssembler::new(64).unwrap();
    f(&mut a).unwrap();
    let insn = a.assemble(0).unwrap();
    let page = Page::new();
    let mut rng = Rng(0x1234_5678_9abc_def1 ^ (name.len() as u64 * 77));
    let mut bad = Vec::new();
    for k in 0..120 {
        let x = [fp_interesting(&mut rng), fp_interesting(&mut rng)];
        let mx = [0x1f80, 0x3f80, 0x5f80, 0x7f80, 0x9fc0][k % 5];
        let g = [rng.interesting(), rng.interesting(), rng.interesting()];
        // SAFETY: `insn` only uses those registers (this harness's contract, above) and
        // every MXCSR value here has all exception mask bits (0x1f80) set.
        let (nx, nmx, ng, nf) = unsafe { native_sse(&page, &insn, x, mx, g) };
        let mut r = Regs::default();
        r.gpr[0] = g[0];
        r.gpr[1] = g[1];
        r.gpr[2] = g[2];
        let mut xin = [0u128; 16];
        xin[0] = x[0];
        xin[1] = x[1];
        let mut scratch = [0u8; 64];
        let o = crate::testutil::run_snippet_with(&insn, &r, &mut scratch, &xin, mx);
        assert_eq!(o.end, SnippetEnd::Completed, "{name}");
        let eg = [o.regs.gpr[0], o.regs.gpr[1], o.regs.gpr[2]];
        let ef = o.regs.rflags & rflags::ARITH;
        if nx != [o.xmm[0], o.xmm[1]] || nmx != o.mxcsr || ng != eg || nf & rflags::ARITH != ef {
            bad.push(format!(
                "in {x:x?} mxcsr {mx:#x} g {g:x?}: native {nx:x?} {nmx:#x} {ng:x?} {:#x} emulated {:x?} {:#x} {eg:x?} {ef:#x}",
                nf & rflags::ARITH,
                [o.xmm[0], o.xmm[1]],
                o.mxcsr
            ));
        }
    }
    assert!(
        bad.is_empty(),
        "{name} {insn:02x?}:\n{}",
        bad[..bad.len().min(6)].join("\n")
    );
}

#[test]
fn sse_against_host() {
    check_sse("addps", |a| a.addps(xmm0, xmm1));
    check_sse("addsd", |a| a.addsd(xmm0, xmm1));
    check_sse("mulss", |a| a.mulss(xmm0, xmm1));
    check_sse("divpd", |a| a.divpd(xmm0, xmm1));
    check_sse("sqrtsd", |a| a.sqrtsd(xmm0, xmm1));
    check_sse("minps", |a| a.minps(xmm0, xmm1));
    check_sse("maxsd", |a| a.maxsd(xmm0, xmm1));
    check_sse("rcpps", |a| a.rcpps(xmm0, xmm1));
    check_sse("cvtsi2sd", |a| a.cvtsi2sd(xmm0, rax));
    check_sse("cvtsi2ss", |a| a.cvtsi2ss(xmm1, ecx));
    check_sse("cvttsd2si", |a| a.cvttsd2si(rax, xmm1));
    check_sse("cvtsd2si", |a| a.cvtsd2si(eax, xmm0));
    check_sse("cvtss2si", |a| a.cvtss2si(rdx, xmm1));
    check_sse("cvtps2dq", |a| a.cvtps2dq(xmm0, xmm1));
    check_sse("cvtdq2pd", |a| a.cvtdq2pd(xmm0, xmm1));
    check_sse("cvtpd2ps", |a| a.cvtpd2ps(xmm1, xmm0));
    check_sse("ucomisd", |a| a.ucomisd(xmm0, xmm1));
    check_sse("comiss", |a| a.comiss(xmm1, xmm0));
    check_sse("cmpps", |a| a.cmpps(xmm0, xmm1, 1));
    check_sse("cmpsd", |a| a.cmpsd_3(xmm0, xmm1, 4));
    check_sse("paddb", |a| a.paddb(xmm0, xmm1));
    check_sse("psubq", |a| a.psubq(xmm0, xmm1));
    check_sse("pcmpeqb", |a| a.pcmpeqb(xmm0, xmm1));
    check_sse("pcmpgtd", |a| a.pcmpgtd(xmm1, xmm0));
    check_sse("pmovmskb", |a| a.pmovmskb(eax, xmm1));
    check_sse("movmskpd", |a| a.movmskpd(ecx, xmm0));
    check_sse("pshufd", |a| a.pshufd(xmm0, xmm1, 0x1b));
    check_sse("pshufhw", |a| a.pshufhw(xmm0, xmm1, 0xd2));
    check_sse("shufps", |a| a.shufps(xmm0, xmm1, 0x4e));
    check_sse("shufpd", |a| a.shufpd(xmm0, xmm1, 2));
    check_sse("punpcklbw", |a| a.punpcklbw(xmm0, xmm1));
    check_sse("punpckhqdq", |a| a.punpckhqdq(xmm0, xmm1));
    check_sse("packuswb", |a| a.packuswb(xmm0, xmm1));
    check_sse("psllw", |a| a.psllw(xmm0, 3));
    check_sse("psrad", |a| a.psrad(xmm0, xmm1));
    check_sse("psrldq", |a| a.psrldq(xmm0, 5));
    check_sse("pslldq", |a| a.pslldq(xmm1, 15));
    check_sse("pmuludq", |a| a.pmuludq(xmm0, xmm1));
    check_sse("pmaddwd", |a| a.pmaddwd(xmm0, xmm1));
    check_sse("pextrw", |a| a.pextrw(edx, xmm1, 5));
    check_sse("pinsrw", |a| a.pinsrw(xmm0, ecx, 3));
    check_sse("movq", |a| a.movq(xmm0, xmm1));
    check_sse("movq", |a| a.movq(rax, xmm1));
    check_sse("movd", |a| a.movd(xmm1, ecx));
    check_sse("movss", |a| a.movss(xmm0, xmm1));
    check_sse("movsd", |a| a.movsd_2(xmm1, xmm0));
    check_sse("movhlps", |a| a.movhlps(xmm0, xmm1));
    check_sse("movlhps", |a| a.movlhps(xmm0, xmm1));
    check_sse("xorps", |a| a.xorps(xmm0, xmm1));
    check_sse("andnpd", |a| a.andnpd(xmm0, xmm1));
    check_sse("unpcklps", |a| a.unpcklps(xmm0, xmm1));
    check_sse("psadbw", |a| a.psadbw(xmm0, xmm1));
}

/// Like `native` but with RSI pointing into a 4 KiB buffer (at offset 0x800).
///
/// # Safety
/// As for [`native`], except that `insn` may also access memory at RSI-relative addresses
/// inside `buf` (offsets -0x800..0x800 from RSI).
unsafe fn native_mem(
    page: &Page,
    insn: &[u8],
    v: [u64; 3],
    flags: u64,
    buf: &mut [u8; 4096],
) -> ([u64; 3], u64) {
    let mut code = vec![0x41, 0x50, 0x9d];
    code.extend_from_slice(insn);
    code.extend_from_slice(&[0x9c, 0x41, 0x58, 0xc3]);
    // SAFETY: the code (one instruction plus 7 bytes) fits the 4 KiB page.
    unsafe { std::ptr::copy_nonoverlapping(code.as_ptr(), page.0, code.len()) };
    let (mut a, mut c, mut d, mut f) = (v[0], v[1], v[2], flags & rflags::ARITH);
    let p = buf.as_mut_ptr().wrapping_add(0x800);
    // SAFETY: as in `native`; memory operands stay within `buf` (the caller's contract).
    unsafe {
        std::arch::asm!(
            "call {p}",
            p = in(reg) page.0,
            in("rsi") p,
            inout("rax") a,
            inout("rcx") c,
            inout("rdx") d,
            inout("r8") f,
        );
    }
    ([a, c, d], f)
}

/// Compares `f`'s instruction natively and emulated with RSI pointing into a buffer.
/// Test-harness contract (the tests below keep it): one instruction on rax, rcx, rdx, the
/// flags and memory within 0x800 bytes of RSI (with RCX-indexed or bit-offset operands
/// only when `small_rcx` keeps RCX within +-1000); it cannot fault (no division).
fn check_mem(name: &str, f: impl Fn(&mut CodeAssembler) -> Result<(), IcedError>, small_rcx: bool) {
    if skip_on_this_host(name) {
        return;
    }
    let mut a = CodeAssembler::new(64).unwrap();
    f(&mut a).unwrap();
    let insn = a.assemble(0).unwrap();
    let page = Page::new();
    let mut rng = Rng(0x5555_aaaa_1234_4321 ^ (name.len() as u64 * 31));
    let cmp = compared_flags(name);
    let mut bad = Vec::new();
    for _ in 0..60 {
        let mut v = [rng.interesting(), rng.interesting(), rng.interesting()];
        if small_rcx {
            v[1] = (v[1] % 2000).wrapping_sub(1000);
        }
        let fl = rng.next() & rflags::ARITH;
        let mut buf = [0u8; 4096];
        for b in buf.iter_mut() {
            *b = rng.next() as u8;
        }
        let mut nbuf = buf;
        // SAFETY: `insn` only uses those registers and memory near RSI, inside `nbuf`
        // (this harness's contract, above).
        let (nv, nf) = unsafe { native_mem(&page, &insn, v, fl, &mut nbuf) };
        let mut r = Regs::default();
        r.gpr[0] = v[0];
        r.gpr[1] = v[1];
        r.gpr[2] = v[2];
        r.gpr[6] = crate::testutil::SNIPPET_SCRATCH + 0x800;
        r.gpr[4] = crate::testutil::SNIPPET_SCRATCH + 0x400;
        r.rflags = fl;
        let mut ebuf = buf;
        let o = run_snippet(&insn, &r, &mut ebuf);
        assert_eq!(o.end, SnippetEnd::Completed, "{name}");
        let ev = [o.regs.gpr[0], o.regs.gpr[1], o.regs.gpr[2]];
        // The emulated stack area (0x400) is used by nothing here; compare everything.
        if nv != ev || nf & cmp != o.regs.rflags & cmp || nbuf[..] != ebuf[..] {
            let diff = (0..4096).find(|&i| nbuf[i] != ebuf[i]);
            bad.push(format!(
                "inputs {v:x?} flags {fl:#x}: native {nv:x?} {:#x} emulated {ev:x?} {:#x} first byte diff {diff:?}",
                nf & rflags::ARITH,
                o.regs.rflags & rflags::ARITH
            ));
        }
    }
    assert!(
        bad.is_empty(),
        "{name} {insn:02x?}:\n{}",
        bad[..bad.len().min(6)].join("\n")
    );
}

#[test]
fn memory_forms() {
    check_mem("add", |a| a.add(qword_ptr(rsi + 8), rax), false);
    check_mem("adc", |a| a.adc(dword_ptr(rsi - 3), 0x1234), false);
    check_mem("sub", |a| a.sub(ax, word_ptr(rsi + 1)), false);
    check_mem("sbb", |a| a.lock().sbb(byte_ptr(rsi), dl), false);
    check_mem("xor", |a| a.lock().xor(qword_ptr(rsi + 16), rcx), false);
    check_mem("and", |a| a.and(dword_ptr(rsi + 4), -2), false);
    check_mem("cmp", |a| a.cmp(byte_ptr(rsi + 100), 0x80u32), false);
    check_mem("test", |a| a.test(qword_ptr(rsi + 0x7f8), rdx), false);
    check_mem("inc", |a| a.lock().inc(word_ptr(rsi + 6)), false);
    check_mem("dec", |a| a.dec(qword_ptr(rsi)), false);
    check_mem("neg", |a| a.lock().neg(dword_ptr(rsi + 12)), false);
    check_mem("not", |a| a.not(byte_ptr(rsi - 1)), false);
    check_mem("shl", |a| a.shl(dword_ptr(rsi), cl), false);
    check_mem("rcr", |a| a.rcr(qword_ptr(rsi + 8), 3), false);
    check_mem("shld", |a| a.shld(qword_ptr(rsi), rdx, cl), false);
    check_mem("bt", |a| a.bt(qword_ptr(rsi), rcx), true);
    check_mem("bts", |a| a.lock().bts(dword_ptr(rsi), ecx), true);
    check_mem("btr", |a| a.btr(word_ptr(rsi), cx), true);
    check_mem("btc", |a| a.btc(qword_ptr(rsi + 8), 77), false);
    check_mem("xadd", |a| a.lock().xadd(qword_ptr(rsi + 24), rax), false);
    check_mem("xchg", |a| a.xchg(dword_ptr(rsi + 2), edx), false);
    check_mem("cmpxchg", |a| a.lock().cmpxchg(qword_ptr(rsi), rdx), false);
    check_mem("cmpxchg", |a| a.cmpxchg(byte_ptr(rsi + 1), cl), false);
    check_mem(
        "cmpxchg8b",
        |a| a.lock().cmpxchg8b(qword_ptr(rsi + 8)),
        false,
    );
    check_mem("movzx", |a| a.movzx(eax, word_ptr(rsi + rcx * 1 + 3)), true);
    check_mem("movsx", |a| a.movsx(rdx, byte_ptr(rsi - 0x10)), false);
    check_mem("movbe", |a| a.movbe(rax, qword_ptr(rsi + 5)), false);
    check_mem("movbe", |a| a.movbe(word_ptr(rsi + 5), dx), false);
    check_mem("imul", |a| a.imul_3(rax, qword_ptr(rsi), 1000), false);
    check_mem("mul", |a| a.mul(qword_ptr(rsi + 32)), false);
    check_mem("setcc", |a| a.setae(byte_ptr(rsi + 9)), false);
    check_mem("cmovcc", |a| a.cmovle(ecx, dword_ptr(rsi + 4)), false);
    check_mem("popcnt", |a| a.popcnt(rdx, qword_ptr(rsi)), false);
    check_mem("lea", |a| a.lea(eax, dword_ptr(rdx + rcx * 8 - 7)), false);
}
