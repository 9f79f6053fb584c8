//! The host-executed x87 instructions ("kernels"): one small function per instruction
//! encoding the interpreter hands to the host FPU.
//!
//! A kernel loads a whole x87 state with FRSTOR (108-byte 32-bit protected-mode image),
//! sets the host's arithmetic flags to the guest's CF/PF/ZF (FCMOVcc reads them), executes
//! the instruction as raw bytes (escape byte, ModRM) — memory forms address `[rdi]`, a
//! 16-byte buffer — reads RFLAGS (FCOMI and friends write them), and stores the state back
//! with FNSAVE, which also re-initialises the host FPU. The host control word is saved and
//! restored around it, so the Rust code around a kernel sees the FPU as the ABI requires
//! (empty stack, its own control word).
//!
//! The image handed to a kernel never has a pending unmasked exception (the caller clears
//! the status word's exception flags, ES and B), and every instruction after the guest's one
//! is non-waiting (PUSHFQ/POP, FNSAVE) — so an unmasked exception the instruction raises
//! only sets ES in the saved image and never traps on the host. Only encodings listed in
//! [`KERNELS`] are ever executed, and all of them are defined on every x86-64 CPU.

use std::arch::asm;
use std::sync::OnceLock;

/// A kernel: (state image in/out, memory operand in/out, guest RFLAGS bits CF/PF/ZF) ->
/// the host RFLAGS after the instruction.
pub(crate) type Kernel = fn(&mut [u8; 108], &mut [u8; 16], u64) -> u64;

/// The flags a kernel copies from the guest into the host RFLAGS (CF, PF, AF, ZF, SF, OF).
pub(crate) const KERNEL_FLAGS: u64 = 0x8d5;

fn kernel<const E: u8, const M: u8>(img: &mut [u8; 108], mem: &mut [u8; 16], gflags: u64) -> u64 {
    let mut cw: u16 = 0;
    let f: u64;
    // SAFETY: the asm reads and writes only the 108-byte image (rsi), the 16-byte buffer
    // (rdi; x87 memory operands are at most 10 bytes) and `cw`, all valid for the call, and
    // balanced stack slots (no `nostack`). The image has no pending unmasked exception and
    // only non-waiting instructions follow the guest's one, so nothing traps (see the module
    // doc); `E`/`M` come from `KERNELS`, which lists only defined encodings. FNSAVE leaves
    // the x87 initialised (empty stack) and the host control word is restored, as the ABI
    // requires; the x87/MMX registers are declared clobbered. Only CF/PF/AF/ZF/SF/OF of
    // the host RFLAGS are changed (POPFQ of the saved value with those bits replaced).
    unsafe {
        asm!(
            "fnstcw word ptr [{cw}]",
            "frstor [rsi]",
            "pushfq",
            "and qword ptr [rsp], -0x8d6",
            "or qword ptr [rsp], {gf}",
            "popfq",
            ".byte {e}, {m}",
            "pushfq",
            "pop {f}",
            "fnsave [rsi]",
            "fldcw word ptr [{cw}]",
            e = const E,
            m = const M,
            cw = in(reg) &mut cw as *mut u16,
            gf = in(reg) gflags & KERNEL_FLAGS,
            f = out(reg) f,
            in("rsi") img.as_mut_ptr(),
            in("rdi") mem.as_mut_ptr(),
            out("st(0)") _,
            out("st(1)") _,
            out("st(2)") _,
            out("st(3)") _,
            out("st(4)") _,
            out("st(5)") _,
            out("st(6)") _,
            out("st(7)") _,
            out("mm0") _,
            out("mm1") _,
            out("mm2") _,
            out("mm3") _,
            out("mm4") _,
            out("mm5") _,
            out("mm6") _,
            out("mm7") _,
        );
    }
    f
}

macro_rules! kernels {
    ($($e:literal: $($m:literal)*;)*) => {
        /// Every (escape byte, ModRM) the interpreter runs on the host. Memory forms use
        /// ModRM `(reg << 3) | 7` (`[rdi]`); register forms taking ST(i) exist for i = 0
        /// and 1 (the caller moves ST(i), i >= 2, into ST(1) and back), except FLD ST(i),
        /// whose push can land on ST(7) itself, which has all eight.
        pub(crate) static KERNELS: &[(u8, u8, Kernel)] = &[
            $($( ($e, $m, kernel::<$e, $m>), )*)*
        ];
    };
}

kernels! {
    // FADD FMUL FCOM FCOMP FSUB FSUBR FDIV FDIVR: m32fp, ST(0),ST(i).
    0xd8: 0x07 0x0f 0x17 0x1f 0x27 0x2f 0x37 0x3f
          0xc0 0xc1 0xc8 0xc9 0xd0 0xd1 0xd8 0xd9 0xe0 0xe1 0xe8 0xe9 0xf0 0xf1 0xf8 0xf9;
    // FLD/FST/FSTP m32fp; FLD ST(i); FXCH; FCHS FABS FTST FXAM; constants; the rest of D9.
    0xd9: 0x07 0x17 0x1f
          0xc0 0xc1 0xc2 0xc3 0xc4 0xc5 0xc6 0xc7 0xc8 0xc9
          0xe0 0xe1 0xe4 0xe5 0xe8 0xe9 0xea 0xeb 0xec 0xed 0xee
          0xf0 0xf1 0xf2 0xf3 0xf4 0xf5 0xf6 0xf7 0xf8 0xf9 0xfa 0xfb 0xfc 0xfd 0xfe 0xff;
    // FIADD..FIDIVR m32int; FCMOVB/E/BE/U; FUCOMPP.
    0xda: 0x07 0x0f 0x17 0x1f 0x27 0x2f 0x37 0x3f
          0xc0 0xc1 0xc8 0xc9 0xd0 0xd1 0xd8 0xd9 0xe9;
    // FILD/FISTTP/FIST/FISTP m32int, FLD/FSTP m80fp; FCMOVNB/NE/NBE/NU; FUCOMI; FCOMI.
    0xdb: 0x07 0x0f 0x17 0x1f 0x2f 0x3f
          0xc0 0xc1 0xc8 0xc9 0xd0 0xd1 0xd8 0xd9 0xe8 0xe9 0xf0 0xf1;
    // Arithmetic m64fp; FADD/FMUL/FSUBR/FSUB/FDIVR/FDIV ST(i),ST(0).
    0xdc: 0x07 0x0f 0x17 0x1f 0x27 0x2f 0x37 0x3f
          0xc0 0xc1 0xc8 0xc9 0xe0 0xe1 0xe8 0xe9 0xf0 0xf1 0xf8 0xf9;
    // FLD m64fp, FISTTP m64int, FST/FSTP m64fp; FFREE; FST; FSTP; FUCOM; FUCOMP.
    0xdd: 0x07 0x0f 0x17 0x1f
          0xc0 0xc1 0xd0 0xd1 0xd8 0xd9 0xe0 0xe1 0xe8 0xe9;
    // Arithmetic m16int; the popping ST(i),ST(0) forms; FCOMPP.
    0xde: 0x07 0x0f 0x17 0x1f 0x27 0x2f 0x37 0x3f
          0xc0 0xc1 0xc8 0xc9 0xd9 0xe0 0xe1 0xe8 0xe9 0xf0 0xf1 0xf8 0xf9;
    // FILD/FISTTP/FIST/FISTP m16int, FBLD, FILD m64int, FBSTP, FISTP m64int; FFREEP;
    // FUCOMIP; FCOMIP.
    0xdf: 0x07 0x0f 0x17 0x1f 0x27 0x2f 0x37 0x3f
          0xc0 0xc1 0xe8 0xe9 0xf0 0xf1;
}

/// The index in [`KERNELS`] of (escape byte, ModRM).
pub(crate) fn find(esc: u8, modrm: u8) -> Option<usize> {
    KERNELS.iter().position(|&(e, m, _)| e == esc && m == modrm)
}

/// The control word the host FPU holds after loading `v` (FLDCW then FNSTCW).
fn host_fldcw(v: u16) -> u16 {
    let mut saved: u16 = 0;
    let mut out: u16 = 0;
    // SAFETY: reads `v` and writes `saved`/`out` (valid locals) only. The exception flags
    // are cleared first (FNCLEX; the x87 status word is not preserved across calls by the
    // ABI anyway), so loading a control word that unmasks exceptions leaves none pending
    // and the final FLDCW, a waiting instruction, cannot trap; the host control word is
    // restored.
    unsafe {
        asm!(
            "fnstcw word ptr [{saved}]",
            "fnclex",
            "fldcw word ptr [{v}]",
            "fnstcw word ptr [{out}]",
            "fldcw word ptr [{saved}]",
            saved = in(reg) &mut saved as *mut u16,
            v = in(reg) &v as *const u16,
            out = in(reg) &mut out as *mut u16,
            options(nostack),
        );
    }
    out
}

/// How the host stores a loaded control word: (bits kept as loaded, bits that read as 1).
/// Reserved bits read as the host's do (Intel: 15:13 and 7 as 0, 6 as 1), so FLDCW,
/// FLDENV, FRSTOR and FXRSTOR agree with the FPU that computes.
pub(crate) fn fcw_rule() -> (u16, u16) {
    static RULE: OnceLock<(u16, u16)> = OnceLock::new();
    *RULE.get_or_init(|| {
        let (ones, zeros) = (host_fldcw(0xffff), host_fldcw(0));
        (ones & !zeros, zeros)
    })
}
