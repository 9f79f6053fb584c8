//! Differential tests of the x87 against the host FPU: every x87 encoding (each escape
//! byte with every register ModRM, and every memory form on `[rsi]`) runs natively in an
//! RWX page and in the interpreter, from the same random x87 state and memory operand:
//!
//! ```text
//! push rdx; popfq          ; random arithmetic flags (FCMOVcc reads them)
//! fxrstor [rdi]            ; random state: TOP, tags, registers, FCW (all RC/PC values,
//!                          ;   some exceptions unmasked), FSW condition codes and flags
//! <instruction>            ; memory operand at [rsi]
//! lahf; seto al            ; the flags FCOMI & co. write
//! fxsave [rdi + 512]; fninit
//! ```
//!
//! and the whole result is compared: FCW, FSW (TOP, C0-C3, exception flags, SF, ES, B), the
//! abridged tag word, ST(0)..ST(7), MXCSR, the memory operand area and the flags — but not
//! FIP/FDP/FOP (the code addresses differ; they have their own unit tests). Register
//! values cover zeros, denormals, pseudo-denormals, unnormals, infinities, pseudo-NaNs,
//! QNaNs, SNaNs, the indefinite, huge and tiny exponents, integers and random values.

use super::host::Page;
use crate::testutil::{Harness, CODE, DATA, STACK_TOP};
use crate::Exit;
use iced_x86::{Code, Decoder, DecoderOptions, Mnemonic};

/// Input image at 0, output image at `OUT`, memory operand at `MEM`.
const OUT: usize = 512;
const MEM: usize = 1024;
const MEM_LEN: usize = 128;

#[repr(C, align(64))]
struct Buf([u8; 2048]);

fn snippet(insn: &[u8]) -> Vec<u8> {
    let mut c = vec![0x52, 0x9d, 0x0f, 0xae, 0x0f]; // push rdx; popfq; fxrstor [rdi]
    c.extend_from_slice(insn);
    // lahf; seto al; fxsave [rdi+512]; fninit
    c.extend_from_slice(&[
        0x9f, 0x0f, 0x90, 0xc0, 0x0f, 0xae, 0x87, 0x00, 0x02, 0x00, 0x00,
    ]);
    c.extend_from_slice(&[0xdb, 0xe3]);
    c
}

/// Calls the snippet on `page` with `buf` as its state and memory buffer.
///
/// # Safety
/// `page` must hold `snippet(insn)` + RET for a single defined x87 instruction `insn` whose
/// memory operand, if any, is `[rsi]`, and `buf` must start with a valid FXSAVE image with
/// MXCSR 0x1f80 and no pending unmasked exception.
unsafe fn native(page: &Page, buf: &mut Buf, flags: u64) -> u64 {
    let p = buf.0.as_mut_ptr();
    let mut ax: u64 = 0;
    // SAFETY: the page holds `snippet(..)` + RET (the caller's contract): it pops the
    // flags it pushed, loads the x87/SSE state from `buf` (a valid FXSAVE image with MXCSR
    // 0x1f80 and no pending unmasked exception), runs one x87 instruction whose memory
    // operand is inside `buf`, stores the state into `buf`, re-initialises the x87 with
    // non-waiting FNINIT (an unmasked exception the instruction raised never traps) and
    // returns. It changes rax, the arithmetic flags, and the x87/MMX/XMM registers
    // (declared clobbered).
    unsafe {
        std::arch::asm!(
            "call {c}",
            c = in(reg) page.0,
            inout("rax") ax,
            in("rdx") flags,
            in("rdi") p,
            in("rsi") p.add(MEM),
            out("xmm0") _, out("xmm1") _, out("xmm2") _, out("xmm3") _,
            out("xmm4") _, out("xmm5") _, out("xmm6") _, out("xmm7") _,
            out("xmm8") _, out("xmm9") _, out("xmm10") _, out("xmm11") _,
            out("xmm12") _, out("xmm13") _, out("xmm14") _, out("xmm15") _,
            out("st(0)") _, out("st(1)") _, out("st(2)") _, out("st(3)") _,
            out("st(4)") _, out("st(5)") _, out("st(6)") _, out("st(7)") _,
            out("mm0") _, out("mm1") _, out("mm2") _, out("mm3") _,
            out("mm4") _, out("mm5") _, out("mm6") _, out("mm7") _,
        );
    }
    ax & 0xffff
}

fn emulated(h: &mut Harness, buf: &mut Buf, flags: u64) -> u64 {
    h.mem().write(DATA, &buf.0).unwrap();
    let mut r = h.cpu.regs();
    r.rip = CODE;
    r.gpr[0] = 0;
    r.gpr[2] = flags;
    r.gpr[4] = STACK_TOP;
    r.gpr[6] = DATA + MEM as u64;
    r.gpr[7] = DATA;
    h.cpu.set_regs(&r);
    h.restart(CODE);
    let x = h.cpu.run(64);
    assert_eq!(x, Exit::Hlt);
    assert_eq!(h.exception(), None);
    h.mem().read(DATA, &mut buf.0).unwrap();
    h.cpu.regs().gpr[0] & 0xffff
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// An 80-bit value from every class the x87 distinguishes.
    fn f80(&mut self) -> [u8; 10] {
        let s = (self.next() & 1) << 15;
        let r = self.next();
        let (m, e): (u64, u64) = match self.below(16) {
            0 => (0, 0),
            1 => (r >> (1 + self.below(63)) | 1, 0), // denormal
            2 => (r | 1 << 63, 0),                   // pseudo-denormal
            3 => (r >> 1, 1 + self.below(0x7ffe)),   // unnormal
            4 => (1 << 63, 0x7fff),                  // infinity
            5 => (r | 3 << 62, 0x7fff),              // QNaN
            6 => ((r & !(1 << 62)) | 1 << 63 | 1, 0x7fff), // SNaN
            7 => (3 << 62, 0x7fff),                  // (the indefinite with sign 1)
            8 => (r >> 1, 0x7fff),                   // pseudo-NaN / pseudo-infinity
            9 => (r | 1 << 63, 0x7ffe - self.below(70)), // huge
            10 => (r | 1 << 63, 1 + self.below(70)), // tiny
            11 => (r | 1 << 63, 0x3fff - 4 + self.below(8)), // near 1
            12 => {
                // An integer (or half-integer) of up to 64 bits.
                let bits = 1 + self.below(64);
                let v = (r >> (64 - bits)) | 1 << (bits - 1);
                (v << (63 - (bits - 1)), 0x3fff + bits - 1)
            }
            13 => (r | 1 << 63, 0x3fff + self.below(66)), // large, near integer range
            _ => (r | 1 << 63, 1 + self.below(0x7ffe)),
        };
        let se = (e as u16) | s as u16;
        let mut b = [0u8; 10];
        b[..8].copy_from_slice(&m.to_le_bytes());
        b[8..].copy_from_slice(&se.to_le_bytes());
        b
    }

    fn f64(&mut self) -> u64 {
        let s = (self.next() & 1) << 63;
        let r = self.next() & ((1 << 52) - 1);
        s | match self.below(10) {
            0 => 0,
            1 => r | 1,                                 // denormal
            2 => 0x7ff << 52,                           // infinity
            3 => 0x7ff << 52 | 1 << 51 | r,             // QNaN
            4 => 0x7ff << 52 | (r & !(1 << 51)) | 1,    // SNaN
            5 => (0x3ff - 2 + self.below(5)) << 52 | r, // near 1
            6 => (1 + self.below(0x7fe)) << 52 | r,
            7 => 0x3ff << 52, // 1.0
            _ => self.next() & !(1 << 63),
        }
    }

    fn f32(&mut self) -> u32 {
        let s = ((self.next() & 1) << 31) as u32;
        let r = (self.next() & ((1 << 23) - 1)) as u32;
        s | match self.below(10) {
            0 => 0,
            1 => r | 1,
            2 => 0xff << 23,
            3 => 0xff << 23 | 1 << 22 | r,
            4 => 0xff << 23 | (r & !(1 << 22)) | 1,
            5 => (0x7f - 2 + self.below(5) as u32) << 23 | r,
            6 => (1 + self.below(0xfe) as u32) << 23 | r,
            7 => 0x7f << 23,
            _ => self.next() as u32 & !(1 << 31),
        }
    }

    fn int(&mut self, bytes: u32) -> u64 {
        let bits = 8 * bytes;
        let v = match self.below(6) {
            0 => 0,
            1 => 1,
            2 => u64::MAX,
            3 => 1 << (bits - 1),
            4 => self.next() >> self.below(64),
            _ => self.next(),
        };
        if bits == 64 {
            v
        } else {
            v & ((1 << bits) - 1)
        }
    }

    fn bcd(&mut self) -> [u8; 10] {
        let mut b = [0u8; 10];
        let digits = self.below(19);
        for (k, byte) in b.iter_mut().take(9).enumerate() {
            let lo = if (2 * k as u64) < digits {
                self.below(10)
            } else {
                0
            };
            let hi = if (2 * k as u64 + 1) < digits {
                self.below(10)
            } else {
                0
            };
            *byte = (hi << 4 | lo) as u8;
        }
        if self.below(8) == 0 {
            b[self.below(9) as usize] |= 0xa0 + (self.below(6) << 4) as u8; // invalid digit
        }
        let sign = if self.next() & 1 != 0 { 0x80 } else { 0 };
        let junk = if self.below(16) == 0 { 0x7f } else { 0 }; // bits FBLD ignores
        b[9] = sign | junk;
        b
    }

    /// A random FXSAVE image with no pending unmasked exception; `k` selects RC and PC.
    fn state(&mut self, k: u64) -> [u8; 512] {
        let mut img = [0u8; 512];
        let masks = if self.below(4) == 0 {
            self.next() & 0x3f
        } else {
            0x3f
        };
        let rc = k & 3;
        let pc = (k >> 2) & 3;
        let fcw = masks | 0x40 | pc << 8 | rc << 10 | (self.next() & 1) << 12;
        let top = self.below(8);
        let cc = self.next() & 0x4700;
        let flags = self.next() & 0x7f & (masks | 0x40);
        let fsw = flags | cc | top << 11;
        let ftw = match self.below(4) {
            0 => 0xff,
            1 => 0,
            _ => self.next() & 0xff,
        };
        img[0..2].copy_from_slice(&(fcw as u16).to_le_bytes());
        img[2..4].copy_from_slice(&(fsw as u16).to_le_bytes());
        img[4] = ftw as u8;
        img[24..28].copy_from_slice(&0x1f80u32.to_le_bytes());
        img[28..32].copy_from_slice(&0xffffu32.to_le_bytes());
        for i in 0..8 {
            let v = self.f80();
            img[32 + 16 * i..42 + 16 * i].copy_from_slice(&v);
        }
        img
    }

    /// Memory operand bytes for an operand of type `ms`.
    fn operand(&mut self, ms: iced_x86::MemorySize) -> [u8; MEM_LEN] {
        use iced_x86::MemorySize as S;
        let mut m = [0u8; MEM_LEN];
        for b in m.iter_mut() {
            *b = self.next() as u8;
        }
        match ms {
            S::Float32 => m[..4].copy_from_slice(&self.f32().to_le_bytes()),
            S::Float64 => m[..8].copy_from_slice(&self.f64().to_le_bytes()),
            S::Float80 => m[..10].copy_from_slice(&self.f80()),
            S::Int16 => m[..2].copy_from_slice(&(self.int(2) as u16).to_le_bytes()),
            S::Int32 => m[..4].copy_from_slice(&(self.int(4) as u32).to_le_bytes()),
            S::Int64 => m[..8].copy_from_slice(&self.int(8).to_le_bytes()),
            S::Bcd => m[..10].copy_from_slice(&self.bcd()),
            S::FpuEnv28 | S::FpuState108 => {
                // Random control, status and tag words (reserved bits too), random
                // registers.
                let fcw = self.next() as u16;
                m[0..2].copy_from_slice(&fcw.to_le_bytes());
                m[4..6].copy_from_slice(&(self.next() as u16).to_le_bytes());
                m[8..10].copy_from_slice(&(self.next() as u16).to_le_bytes());
                if ms == S::FpuState108 {
                    for i in 0..8 {
                        let v = self.f80();
                        m[28 + 10 * i..38 + 10 * i].copy_from_slice(&v);
                    }
                }
            }
            _ => {}
        }
        m
    }
}

fn host_is_intel() -> bool {
    std::arch::x86_64::__cpuid(0).ebx == u32::from_le_bytes(*b"Genu")
}

/// The reserved aliases (FCOM2, FCOMP3, FCOMP5, FXCH4, FXCH7, FSTP8, FSTP9) are
/// documented by Intel; they run natively only there. (FSTP1, D9 D8+i, raises #UD.)
fn is_alias(i: &iced_x86::Instruction) -> bool {
    matches!(
        i.code(),
        Code::Fcom_st0_sti_DCD0
            | Code::Fcomp_st0_sti_DCD8
            | Code::Fcomp_st0_sti_DED0
            | Code::Fxch_st0_sti_DDC8
            | Code::Fxch_st0_sti_DFC8
            | Code::Fstp_sti_DFD0
            | Code::Fstp_sti_DFD8
    )
}

/// Byte ranges of the memory operand area that hold code or data addresses (FNSTENV and
/// FNSAVE images: FIP, FCS/FOP, FDP, FDS) or reserved halves; not compared.
fn pointer_bytes(m: Mnemonic) -> &'static [std::ops::Range<usize>] {
    match m {
        Mnemonic::Fnstenv | Mnemonic::Fnsave => &[2..4, 6..8, 10..28],
        _ => &[],
    }
}

/// Run every encoding with escape byte `esc` against the host, `cases` random states each.
fn check_escape(esc: u8, cases: u64) {
    let page = Page::new();
    let mut h = Harness::new(16 << 20);
    let intel = host_is_intel();
    let mut bad = Vec::new();
    let mut forms = 0;
    for modrm in 0..=255u8 {
        if modrm < 0xc0 && modrm & 0xc7 != 0x06 {
            continue; // memory forms: [rsi] only
        }
        let bytes = [esc, modrm];
        let i = Decoder::new(64, &bytes, DecoderOptions::NONE).decode();
        if i.code() == Code::INVALID
            || matches!(
                i.mnemonic(),
                Mnemonic::Fneni | Mnemonic::Fndisi | Mnemonic::Fnsetpm | Mnemonic::Fstpnce
            )
            || (is_alias(&i) && !intel)
        {
            continue;
        }
        forms += 1;
        let code = snippet(&bytes);
        // SAFETY: the page is 4 KiB and the code is far shorter.
        unsafe {
            std::ptr::copy_nonoverlapping(code.as_ptr(), page.0, code.len());
            *page.0.add(code.len()) = 0xc3;
        }
        let mut code_hlt = code.clone();
        code_hlt.push(0xf4);
        h.load(&code_hlt);
        let skip = pointer_bytes(i.mnemonic());
        let mut rng = Rng(0x2545_f491_4f6c_dd1d ^ u64::from(esc) << 8 ^ u64::from(modrm));
        for k in 0..cases {
            let state = rng.state(k);
            let mem = rng.operand(i.memory_size());
            let flags = (rng.next() & 0x8d5) | 0x202;
            let mut nb = Buf([0; 2048]);
            nb.0[..512].copy_from_slice(&state);
            nb.0[MEM..MEM + MEM_LEN].copy_from_slice(&mem);
            let mut eb = Buf(nb.0);
            // SAFETY: the page holds `snippet(&bytes)` + RET for a defined x87 encoding
            // (invalid and legacy-only ones skipped above) whose memory forms use `[rsi]`
            // only; `nb` starts with `rng.state`'s FXSAVE image, which has MXCSR 0x1f80 and
            // no pending unmasked exception.
            let nax = unsafe { native(&page, &mut nb, flags) };
            let eax = emulated(&mut h, &mut eb, flags);
            let mut diff = Vec::new();
            let cmp = |r: std::ops::Range<usize>, what: &str, diff: &mut Vec<String>| {
                if nb.0[r.clone()] != eb.0[r.clone()] {
                    diff.push(format!(
                        "{what}: native {:02x?} emulated {:02x?}",
                        &nb.0[r.clone()],
                        &eb.0[r]
                    ));
                }
            };
            cmp(OUT..OUT + 6, "fcw/fsw/ftw", &mut diff);
            cmp(OUT + 24..OUT + 28, "mxcsr", &mut diff);
            // MXCSR_MASK describes the CPU, not the instruction: the host may implement more
            // MXCSR bits than the model (AMD's misaligned-SSE mask, bit 17: 0x2ffff), never
            // fewer.
            let mask_at = |b: &Buf| u32::from_le_bytes(b.0[OUT + 28..OUT + 32].try_into().unwrap());
            let (native_mask, model_mask) = (mask_at(&nb), mask_at(&eb));
            if model_mask != crate::exec::sse::MXCSR_MASK || native_mask & model_mask != model_mask
            {
                diff.push(format!(
                    "mxcsr_mask: native {native_mask:#x} emulated {model_mask:#x}"
                ));
            }
            for r in 0..8 {
                let o = OUT + 32 + 16 * r;
                cmp(o..o + 16, &format!("st{r}"), &mut diff);
            }
            let mut nm = nb.0[MEM..MEM + MEM_LEN].to_vec();
            let mut em = eb.0[MEM..MEM + MEM_LEN].to_vec();
            for r in skip {
                nm[r.clone()].fill(0);
                em[r.clone()].fill(0);
            }
            if nm != em {
                diff.push(format!("memory: native {nm:02x?}\n  emulated {em:02x?}"));
            }
            if nax != eax {
                diff.push(format!(
                    "ax (lahf/seto): native {nax:#06x} emulated {eax:#06x}"
                ));
            }
            if !diff.is_empty() {
                bad.push(format!(
                    "{esc:02x} {modrm:02x} ({:?}) case {k}: state fcw {:04x} fsw {:04x} ftw {:02x} st {:02x?} mem {:02x?}\n  {}",
                    i.code(),
                    u16::from_le_bytes([state[0], state[1]]),
                    u16::from_le_bytes([state[2], state[3]]),
                    state[4],
                    (0..8).map(|r| &state[32 + 16 * r..42 + 16 * r]).collect::<Vec<_>>(),
                    &mem[..16],
                    diff.join("\n  ")
                ));
            }
        }
    }
    assert!(forms > 0);
    assert!(
        bad.is_empty(),
        "{} mismatches, first ones:\n{}",
        bad.len(),
        bad[..bad.len().min(6)].join("\n")
    );
}

const CASES: u64 = 192;

#[test]
fn x87_d8_arith_m32_and_st() {
    check_escape(0xd8, CASES);
}

#[test]
fn x87_d9_load_store_consts_transcendental() {
    check_escape(0xd9, CASES);
}

#[test]
fn x87_da_int32_arith_fcmov() {
    check_escape(0xda, CASES);
}

#[test]
fn x87_db_int32_m80_fcmovn_fcomi() {
    check_escape(0xdb, CASES);
}

#[test]
fn x87_dc_arith_m64_and_sti() {
    check_escape(0xdc, CASES);
}

#[test]
fn x87_dd_m64_ffree_fst_fucom_env() {
    check_escape(0xdd, CASES);
}

#[test]
fn x87_de_int16_arith_popping() {
    check_escape(0xde, CASES);
}

#[test]
fn x87_df_int16_int64_bcd_fcomip() {
    check_escape(0xdf, CASES);
}
