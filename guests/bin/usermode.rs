//! usermode: privilege transitions.
//!
//! Cases (each prints `usermode: <case> ok`):
//! - `iretq to ring 3`: ring-3 code sees CS=0x23, SS=0x1B, IOPL=3 (port I/O allowed),
//!   and the runtime brings it back to ring 0 with its return value.
//! - `int 0x80`: ring 3 -> ring 0 through a DPL-3 gate; the frame lies at the top of
//!   TSS.RSP0 (checked for two different RSP0 values), carries the user CS/SS/RSP/RIP.
//! - `syscall/sysret`: STAR/LSTAR/SFMASK; in the handler CS=0x08, SS=0x10, RCX = the
//!   user return RIP, R11 = the user RFLAGS, SFMASK bits (TF, IF, DF, AC) cleared; DF
//!   set by the user is restored by SYSRET; CS/SS back to 0x23/0x1B.
//! - `swapgs`: user GS base (a user area) is visible as gs:[0] in ring 3; in the SYSCALL
//!   handler GS base = the kernel per-CPU area and KERNEL_GS_BASE = the user area; after
//!   SYSRET the user sees its area again.
//!
//! `skip=case,...` leaves cases out (names: iretq, int80, syscall).
//!
//! Ends with `usermode: all tests passed`, exit status 0; `FAIL:` and status 1 otherwise.
#![no_std]
#![no_main]

use core::arch::asm;
use core::sync::atomic::{AtomicU64, Ordering};
use esvm_rt::gdt::{self, KERNEL_CS, KERNEL_DS, USER_CS, USER_DS};
use esvm_rt::idt::{self, GateOptions, InterruptFrame};
use esvm_rt::user::{self, SyscallFrame};
use esvm_rt::x86::{self, rdmsr, wrmsr};
use esvm_rt::{check, check_eq, entry, println, BootInfo, Hex, Racy};

entry!(main);

const USER_GS_MAGIC: u64 = 0x5553_4552_4753_2121; // "!!SGRESU"

#[repr(C, align(64))]
struct UserArea {
    magic: u64,
    counter: u64,
}

static USER_AREA: Racy<UserArea> = Racy::new(UserArea {
    magic: USER_GS_MAGIC,
    counter: 0,
});

fn user_area() -> u64 {
    USER_AREA.get() as u64
}

// ---- iretq to ring 3 -------------------------------------------------------------

extern "C" fn user_identity(arg: u64) -> u64 {
    // Report CS, SS and IOPL packed into the result; also print from ring 3.
    println!("usermode: hello from ring 3");
    let iopl = (x86::rflags() >> 12) & 3;
    (u64::from(x86::cs()) << 48) | (u64::from(x86::ss()) << 32) | (iopl << 16) | (arg & 0xffff)
}

fn test_iretq() {
    let r = user::run_user(user_identity, 0x1234);
    check_eq!(r >> 48, USER_CS, "CS in ring 3");
    check_eq!((r >> 32) & 0xffff, USER_DS, "SS in ring 3");
    check_eq!((r >> 16) & 0xffff, 3, "IOPL in ring 3");
    check_eq!(r & 0xffff, 0x1234, "argument passed to ring 3");
    check_eq!(x86::cs(), KERNEL_CS, "CS back in ring 0");
    check_eq!(x86::ss(), KERNEL_DS, "SS back in ring 0");
    println!("usermode: iretq to ring 3 and back ok");
}

// ---- int 0x80 --------------------------------------------------------------------

static INT80_FRAME_END: AtomicU64 = AtomicU64::new(0);
static INT80_RIP_OK: AtomicU64 = AtomicU64::new(0);
static INT80_RSP_OK: AtomicU64 = AtomicU64::new(0);
static INT80_SEL: AtomicU64 = AtomicU64::new(0);

fn on_int80(frame: &mut InterruptFrame) {
    let end = frame as *mut InterruptFrame as u64 + core::mem::size_of::<InterruptFrame>() as u64;
    INT80_FRAME_END.store(end, Ordering::SeqCst);
    INT80_RIP_OK.store(u64::from(frame.rip == frame.rcx), Ordering::SeqCst);
    INT80_RSP_OK.store(u64::from(frame.rsp == frame.rdx), Ordering::SeqCst);
    INT80_SEL.store((frame.cs << 16) | frame.ss, Ordering::SeqCst);
    frame.rax = frame.rdi.wrapping_mul(3);
}

extern "C" fn user_int80(arg: u64) -> u64 {
    let ret: u64;
    // SAFETY: int 0x80 reaches on_int80, which only changes RAX.
    unsafe {
        asm!(
            "lea rcx, [rip + 2f]",
            "mov rdx, rsp",
            "int 0x80",
            "2:",
            in("rdi") arg, lateout("rax") ret, out("rcx") _, out("rdx") _,
        )
    }
    ret
}

#[repr(C, align(16))]
struct AltStack([u8; 8192]);
static ALT_STACK: Racy<AltStack> = Racy::new(AltStack([0; 8192]));

fn test_int80() {
    idt::set_gate(
        0x80,
        GateOptions {
            dpl: 3,
            ..GateOptions::default()
        },
    );
    idt::set_handler(0x80, on_int80);
    let default_rsp0 = gdt::rsp0();
    let alt_rsp0 = ALT_STACK.get() as u64 + 8192;
    for (i, rsp0) in [default_rsp0, alt_rsp0].into_iter().enumerate() {
        gdt::set_rsp0(rsp0);
        let r = user::run_user(user_int80, 7 + i as u64);
        check_eq!(r, 3 * (7 + i as u64), "int 0x80 result");
        check_eq!(
            INT80_FRAME_END.load(Ordering::SeqCst),
            rsp0,
            "int 0x80 frame end (TSS.RSP0)"
        );
        check!(
            INT80_RIP_OK.load(Ordering::SeqCst) == 1,
            "int 0x80: frame RIP is not the instruction after INT"
        );
        check!(
            INT80_RSP_OK.load(Ordering::SeqCst) == 1,
            "int 0x80: frame RSP is not the user RSP"
        );
        let sel = INT80_SEL.load(Ordering::SeqCst);
        check_eq!(sel >> 16, USER_CS, "int 0x80 frame CS");
        check_eq!(sel & 0xffff, USER_DS, "int 0x80 frame SS");
    }
    gdt::set_rsp0(default_rsp0);
    println!("usermode: int 0x80 from ring 3 (RSP0 stack switch) ok");
}

// ---- syscall / sysret / swapgs ---------------------------------------------------

/// Bit per failed check in the SYSCALL handler (0 = all good).
static SYSCALL_ERRORS: AtomicU64 = AtomicU64::new(0);

fn on_syscall(frame: &mut SyscallFrame) {
    let mut err = 0u64;
    // The stub loads the expected values into r8 (user RFLAGS), r9 (user RSP) and r10
    // (return RIP) right before SYSCALL.
    if frame.rip != frame.r10 {
        err |= 1 << 0;
    }
    if frame.rsp != frame.r9 {
        err |= 1 << 1;
    }
    if frame.rflags != frame.r8 {
        err |= 1 << 2;
    }
    // RFLAGS right after SYSCALL: SFMASK bits (TF, IF, DF, AC) cleared, though the
    // user had DF set.
    if user::syscall_entry_rflags() & user::SYSCALL_SFMASK != 0 {
        err |= 1 << 3;
    }
    if x86::cs() != KERNEL_CS {
        err |= 1 << 4;
    }
    if x86::ss() != KERNEL_DS {
        err |= 1 << 5;
    }
    if rdmsr(x86::MSR_GS_BASE) != user::percpu_addr() {
        err |= 1 << 6;
    }
    if rdmsr(x86::MSR_KERNEL_GS_BASE) != user_area() {
        err |= 1 << 7;
    }
    let sp = x86::rsp();
    let top = gdt::ring0_stack_top();
    if sp >= top || sp < top - 32 * 1024 {
        err |= 1 << 8;
    }
    SYSCALL_ERRORS.fetch_or(err, Ordering::SeqCst);
    frame.rax = frame.rdi ^ 0xffff;
}

/// In ring 3: checks gs:[0], does one SYSCALL with DF set, checks the state after
/// SYSRET. Returns a bitmask of failed user-side checks (0 = ok).
extern "C" fn user_syscall(arg: u64) -> u64 {
    let mut err = 0u64;
    let gs0: u64;
    // SAFETY: GS base points at USER_AREA, which is mapped and user-accessible.
    unsafe { asm!("mov {}, gs:[0]", out(reg) gs0) };
    if gs0 != USER_GS_MAGIC {
        err |= 1 << 0;
    }
    let (ret, flags_before, flags_after): (u64, u64, u64);
    let (cs_after, ss_after): (u64, u64);
    // SAFETY: SYSCALL into the runtime's entry stub, which preserves all registers but
    // RAX (result), RCX and R11; DF is set around it and cleared before returning to Rust.
    unsafe {
        asm!(
            "std",
            "pushfq",
            "pop r8",
            "mov r9, rsp",
            "lea r10, [rip + 2f]",
            "syscall",
            "2:",
            "pushfq",
            "pop r11",
            "cld",
            "mov {cs:e}, cs",
            "mov {ss:e}, ss",
            cs = out(reg) cs_after, ss = out(reg) ss_after,
            inout("rax") 0u64 => ret, in("rdi") arg, out("rcx") _,
            out("r8") flags_before, out("r9") _, out("r10") _, out("r11") flags_after,
        )
    }
    if ret != arg ^ 0xffff {
        err |= 1 << 1;
    }
    if flags_after != flags_before {
        err |= 1 << 2;
    }
    if flags_before & x86::RFLAGS_DF == 0 {
        err |= 1 << 3;
    }
    if cs_after & 0xffff != u64::from(USER_CS) {
        err |= 1 << 4;
    }
    if ss_after & 0xffff != u64::from(USER_DS) {
        err |= 1 << 5;
    }
    let gs_after: u64;
    // SAFETY: as above.
    unsafe { asm!("mov {}, gs:[0]", out(reg) gs_after) };
    if gs_after != USER_GS_MAGIC {
        err |= 1 << 6;
    }
    err
}

fn test_syscall() {
    user::init_syscall(on_syscall);
    let before = user::syscall_count();
    // SAFETY: the user GS base points at a static user area; the per-CPU area is what
    // init_syscall put into KERNEL_GS_BASE.
    unsafe { wrmsr(x86::MSR_GS_BASE, user_area()) };
    let user_err = user::run_user(user_syscall, 0x1234_5678);
    check!(user_err == 0, "syscall: user-side checks failed, mask {} (bit 0 gs:[0] before, 1 result, 2 RFLAGS not restored, 3 DF, 4 CS, 5 SS, 6 gs:[0] after)", Hex(user_err));
    let k = SYSCALL_ERRORS.load(Ordering::SeqCst);
    check!(k == 0, "syscall: handler-side checks failed, mask {} (bit 0 RCX, 1 RSP, 2 R11, 3 SFMASK, 4 CS, 5 SS, 6 GS base, 7 KERNEL_GS_BASE, 8 stack)", Hex(k));
    check_eq!(
        user::syscall_count() - before,
        1,
        "number of SYSCALLs taken"
    );
    check_eq!(rdmsr(x86::MSR_GS_BASE), user_area(), "GS base after SYSRET");
    check_eq!(
        rdmsr(x86::MSR_KERNEL_GS_BASE),
        user::percpu_addr(),
        "KERNEL_GS_BASE after SYSRET"
    );
    check_eq!(rdmsr(x86::MSR_STAR) >> 32, 0x0010_0008, "STAR selectors");
    println!("usermode: syscall/sysret ok");
    println!("usermode: swapgs ok");
}

fn main(_bi: &'static BootInfo) -> u32 {
    println!("usermode: starting");
    let run = |case: &str, f: fn()| esvm_rt::args::run_case("usermode", case, f);
    run("iretq", test_iretq);
    run("int80", test_int80);
    run("syscall", test_syscall);
    println!("usermode: all tests passed");
    0
}
