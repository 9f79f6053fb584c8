//! sev-mmio: MMIO from an SEV-ES guest through #VC (exit code NPF) and the GHCB
//! (MMIO_READ/MMIO_WRITE): exercises every move form the #VC handler decodes.
//!
//! Needs a RAM-like MMIO device (reads return what was written, byte granular, little
//! endian) of at least 0x40 bytes at `addr=<gpa>` (default 0xFEB0_0000, the VMM's MMIO scratch window
//! `esvm_abi::layout::MMIO_SCRATCH_ADDR`), outside RAM and
//! inside one 4 KiB page. The guest clears the C-bit of that page (MMIO must be accessed
//! shared) and runs these cases, each a write and a read-back through MMIO:
//! `mov32` (89/8B), `mov64` (REX.W 89/8B), `mov16` (66 89/8B, merge), `mov8` (88/8A with
//! AL/AH/CL/CH, merge), `imm` (C7 imm32, REX.W C7 sign-extended, C6 imm8), `movzx`
//! (0F B6/0F B7, REX.W 0F B6), `sib` (base + index * scale + disp with R8-R15).
//!
//! Output: `sev-mmio: window at <addr> mapped shared`, one `sev-mmio: <case> ok` per case,
//! `sev-mmio: all 7 cases passed (<n> #VCs)`, exit status 0. A wrong value: `FAIL:` line,
//! status 1; `addr` inside RAM or crossing a page: `error:` line, status 2.
//!
//! `unsupported=1`: afterwards executes `add dword ptr [addr], 1` (a form the handler does
//! not decode): the guest must end with termination reason set 1, code 8 (VC_DECODE).
#![no_std]
#![no_main]

use core::arch::asm;
use esvm_abi::layout::MMIO_SCRATCH_ADDR;
use esvm_abi::testing::MMIO_TEST_WINDOW;
use esvm_rt::{arg_u64_or_exit, check_eq, entry, println, BootInfo, Dec, Hex};

entry!(main, sev_es);

fn main(bi: &'static BootInfo) -> u32 {
    let addr = arg_u64_or_exit("addr", MMIO_SCRATCH_ADDR);
    let unsupported = arg_u64_or_exit("unsupported", 0) != 0;
    if esvm_rt::sev::info().is_none() {
        println!("FAIL: sev-mmio: not an SEV-ES boot; run it with --sev-es");
        return 1;
    }
    if addr < bi.mem_size || (addr & 0xFFF) + MMIO_TEST_WINDOW > 0x1000 || addr & 7 != 0 {
        println!(
            "error: addr={} must be 8-byte aligned, outside RAM (below {}) and {} bytes inside one page",
            Hex(addr),
            Hex(bi.mem_size),
            Hex(MMIO_TEST_WINDOW)
        );
        return 2;
    }
    if let Err(e) = esvm_rt::sev::set_encrypted(addr & !0xFFF, false) {
        println!("FAIL: sev-mmio: cannot map {} shared: {:?}", Hex(addr), e);
        return 1;
    }
    println!("sev-mmio: window at {} mapped shared", Hex(addr));
    let vc0 = esvm_rt::sev::vc_count();
    let b = addr;

    // Every asm block below accesses only the MMIO window [b, b + 0x40), mapped shared and
    // backed by the test device; the #VC handler performs the accesses through the GHCB.

    // mov32: 89 /r, 8B /r (the load zero-extends into the 64-bit register).
    let got: u64;
    // SAFETY: MMIO accesses inside the shared test window (see above).
    unsafe {
        asm!("mov dword ptr [{b}], {v:e}", "mov {r:e}, dword ptr [{b}]",
             b = in(reg) b, v = in(reg) 0x89AB_CDEFu64, r = inout(reg) u64::MAX => got,
             options(nostack));
    }
    check_eq!(got, 0x89AB_CDEFu64, "mov32 read-back");
    println!("sev-mmio: mov32 ok");

    // mov64: REX.W 89, REX.W 8B.
    let got: u64;
    // SAFETY: MMIO accesses inside the shared test window (see above).
    unsafe {
        asm!("mov qword ptr [{b} + 8], {v}", "mov {r}, qword ptr [{b} + 8]",
             b = in(reg) b, v = in(reg) 0x0123_4567_89AB_CDEFu64, r = out(reg) got,
             options(nostack));
    }
    check_eq!(got, 0x0123_4567_89AB_CDEFu64, "mov64 read-back");
    println!("sev-mmio: mov64 ok");

    // mov16: 66 89, 66 8B (the load merges into the low 16 bits).
    let got: u64;
    // SAFETY: MMIO accesses inside the shared test window (see above).
    unsafe {
        asm!("mov word ptr [{b} + 0x10], {v:x}", "mov {r:x}, word ptr [{b} + 0x10]",
             b = in(reg) b, v = in(reg) 0xBEEFu64, r = inout(reg) 0x1111_2222_3333_4444u64 => got,
             options(nostack));
    }
    check_eq!(got, 0x1111_2222_3333_BEEFu64, "mov16 read-back (merged)");
    println!("sev-mmio: mov16 ok");

    // mov8: 88 with AL and AH, 8A into CL and CH (merging).
    let got: u64;
    // SAFETY: MMIO accesses inside the shared test window (see above).
    unsafe {
        asm!("mov byte ptr [rdi + 0x12], al", "mov byte ptr [rdi + 0x13], ah",
             "mov cl, byte ptr [rdi + 0x12]", "mov ch, byte ptr [rdi + 0x13]",
             in("rdi") b, in("rax") 0xA55Au64, inout("rcx") 0x7777_7777_7777_7777u64 => got,
             options(nostack));
    }
    check_eq!(
        got,
        0x7777_7777_7777_A55Au64,
        "mov8 read-back (AL/AH -> CL/CH)"
    );
    println!("sev-mmio: mov8 ok");

    // imm: C7 /0 imm32, REX.W C7 /0 (sign-extended), C6 /0 imm8; read back with 8B/8A.
    let (d32, q64, b8): (u64, u64, u64);
    // SAFETY: MMIO accesses inside the shared test window (see above).
    unsafe {
        asm!("mov dword ptr [{b} + 0x18], 0xDEADBEEF", "mov qword ptr [{b} + 0x20], -2",
             "mov byte ptr [{b} + 0x28], 0x7E",
             "mov {d:e}, dword ptr [{b} + 0x18]", "mov {q}, qword ptr [{b} + 0x20]",
             "mov {c}, 0", "mov {c:l}, byte ptr [{b} + 0x28]",
             b = in(reg) b, d = out(reg) d32, q = out(reg) q64, c = out(reg_abcd) b8,
             options(nostack));
    }
    check_eq!(d32, 0xDEAD_BEEFu64, "C7 imm32 read-back");
    check_eq!(
        q64,
        0xFFFF_FFFF_FFFF_FFFEu64,
        "REX.W C7 imm32 (sign-extended) read-back"
    );
    check_eq!(b8, 0x7Eu64, "C6 imm8 read-back");
    println!("sev-mmio: imm ok");

    // movzx: 0F B6, 0F B7, REX.W 0F B6 (zero-extend into dirty registers).
    let (z8, z16, z64): (u64, u64, u64);
    // SAFETY: MMIO accesses inside the shared test window (see above).
    unsafe {
        asm!("movzx {x:e}, byte ptr [{b} + 0x28]", "movzx {y:e}, word ptr [{b} + 0x18]",
             "movzx {z}, byte ptr [{b} + 0x12]",
             b = in(reg) b, x = inout(reg) u64::MAX => z8, y = inout(reg) u64::MAX => z16,
             z = inout(reg) u64::MAX => z64, options(nostack));
    }
    check_eq!(z8, 0x7Eu64, "movzx r32, byte");
    check_eq!(z16, 0xBEEFu64, "movzx r32, word");
    check_eq!(z64, 0x5Au64, "movzx r64, byte");
    println!("sev-mmio: movzx ok");

    // sib: [r10 + r11*8 - 8] = window + 0x30 with R8-R15 operands.
    let (got, low): (u64, u64);
    // SAFETY: MMIO accesses inside the shared test window (see above).
    unsafe {
        asm!("mov qword ptr [r10 + r11*8 - 8], r12", "mov r13, qword ptr [r10 + r11*8 - 8]",
             "mov r9d, dword ptr [r10 + r11*4 + 0x14]",
             in("r10") b, in("r11") 7u64, in("r12") 0x0F1E_2D3C_4B5A_6978u64,
             out("r13") got, out("r9") low, options(nostack));
    }
    check_eq!(got, 0x0F1E_2D3C_4B5A_6978u64, "SIB addressing read-back");
    check_eq!(low, 0x4B5A_6978u64, "SIB addressing, 32-bit load");
    println!("sev-mmio: sib ok");

    println!(
        "sev-mmio: all 7 cases passed ({} #VCs)",
        Dec(esvm_rt::sev::vc_count() - vc0)
    );
    if unsupported {
        println!("sev-mmio: executing add dword ptr [addr], 1; expect termination (reason set 1, code 8)");
        // SAFETY: an MMIO access inside the window; the handler ends the guest.
        unsafe {
            asm!("add dword ptr [{b}], 1", b = in(reg) b, options(nostack));
        }
        println!("FAIL: sev-mmio: the unsupported MMIO form did not end the guest");
        return 1;
    }
    0
}
