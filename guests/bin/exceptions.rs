//! exceptions: exception and software-interrupt delivery, checked field by field.
//!
//! Cases (each prints `exceptions: <case> ok`):
//! - `#DE`: DIV by zero; vector 0, error 0, RIP = the DIV, CS/SS/RSP as before, RFLAGS
//!   as before plus RF (faults push RF=1; traps and INT n push it unchanged).
//! - `#UD`: UD2 with CF set; RIP = the UD2, RFLAGS.CF preserved in the frame.
//! - `#BP`: INT3 is a trap: RIP = the instruction after INT3.
//! - `#GP`: load from a non-canonical address; error code 0, RIP = the load.
//! - `#DF (bad gate)`: #DE with its IDT gate not present -> #NP while delivering
//!   (contributory on contributory) -> #DF, error 0, handled on the IST1 stack.
//! - `#DF (bad stack)`: PUSH with RSP on a not-present page -> #PF, and #PF again while
//!   pushing the frame -> #DF on IST1; CR2 = the failing stack address.
//! - `int 0x80`: from ring 0 and from ring 3 through a DPL-3 gate; vector, RIP after
//!   the INT, CS/SS of the caller, no error code; `int 0x81` (DPL-0 gate) from ring 3
//!   raises #GP with error code 0x81*8+2 (IDT bit set).
//!
//! `skip=case,...` leaves cases out (names: de, ud, bp, gp, df-gate, df-stack, int80),
//! printing `exceptions: <case> skipped`.
//!
//! Ends with `exceptions: all tests passed` and exit status 0; on a mismatch prints a
//! `FAIL:` line and exits with status 1.
#![no_std]
#![no_main]

use core::arch::asm;
use core::sync::atomic::{AtomicU64, Ordering};
use esvm_rt::gdt::{self, KERNEL_CS, KERNEL_DS, USER_CS, USER_DS};
use esvm_rt::idt::{self, vector, GateOptions, InterruptFrame};
use esvm_rt::trap::{catch, Fault};
use esvm_rt::{check, check_eq, entry, paging, println, x86, BootInfo, Hex};

entry!(main);

/// Where the faulting (or trapping) instruction's RIP is expected.
static EXP_RIP: AtomicU64 = AtomicU64::new(0);
/// RSP right before the instruction.
static EXP_RSP: AtomicU64 = AtomicU64::new(0);
/// RFLAGS right before the instruction.
static EXP_FLAGS: AtomicU64 = AtomicU64::new(0);

fn exp_ptrs() -> (*const AtomicU64, *const AtomicU64, *const AtomicU64) {
    (&EXP_RIP, &EXP_RSP, &EXP_FLAGS)
}

fn expect(vec: u8, result: Result<(), Fault>, what: &str) -> Fault {
    match result {
        Ok(()) => {
            println!("FAIL: {}: no exception was raised", what);
            esvm_rt::exit(1)
        }
        Err(f) => {
            if f.vector != u64::from(vec) {
                println!(
                    "FAIL: {}: got vector {} ({}), expected {}",
                    what,
                    Hex(f.vector),
                    idt::vector_name(f.vector),
                    Hex(u64::from(vec))
                );
                println!(
                    "  error={} rip={} cr2={}",
                    Hex(f.error_code),
                    Hex(f.rip),
                    Hex(f.cr2)
                );
                esvm_rt::exit(1)
            }
            f
        }
    }
}

/// RFLAGS.RF: pushed as 1 for every fault-class exception (so IRET back to the
/// faulting instruction skips instruction breakpoints), as-is for traps and INT n.
const RFLAGS_RF: u64 = 1 << 16;

/// Checks the hardware frame against the values captured before the instruction.
fn check_frame(f: &Fault, rip: u64, fault_class: bool, what: &str) {
    check_eq!(f.rip, rip, what);
    check_eq!(f.cs, KERNEL_CS, "frame CS");
    check_eq!(f.ss, KERNEL_DS, "frame SS");
    check_eq!(f.rsp, EXP_RSP.load(Ordering::SeqCst), "frame RSP");
    let rf = if fault_class { RFLAGS_RF } else { 0 };
    check_eq!(
        f.rflags,
        EXP_FLAGS.load(Ordering::SeqCst) | rf,
        if fault_class {
            "frame RFLAGS (faults push RF=1)"
        } else {
            "frame RFLAGS (traps push RF as it was)"
        }
    );
}

fn test_de() {
    let (pr, ps, pf) = exp_ptrs();
    let r = catch(|| {
        // SAFETY: divides by zero on purpose; catch() recovers. Captures RIP/RSP/RFLAGS
        // right before the DIV (lea/mov/pushfq/pop do not change flags).
        unsafe {
            asm!(
                "xor edx, edx",
                "mov eax, 1",
                "xor ecx, ecx",
                "pushfq",
                "pop r8",
                "mov [{pf}], r8",
                "mov [{ps}], rsp",
                "lea r8, [rip + 2f]",
                "mov [{pr}], r8",
                "2: div ecx",
                pr = in(reg) pr, ps = in(reg) ps, pf = in(reg) pf,
                out("rax") _, out("rcx") _, out("rdx") _, out("r8") _,
            )
        }
    });
    let f = expect(vector::DE, r, "#DE");
    check_eq!(f.error_code, 0, "#DE error code");
    check_frame(
        &f,
        EXP_RIP.load(Ordering::SeqCst),
        true,
        "#DE RIP (the DIV)",
    );
    println!("exceptions: #DE ok (rip={})", Hex(f.rip));
}

fn test_ud() {
    let (pr, ps, pf) = exp_ptrs();
    let r = catch(|| {
        // SAFETY: UD2 on purpose, with CF set so the frame's RFLAGS shows it.
        unsafe {
            asm!(
                "stc",
                "pushfq",
                "pop r8",
                "mov [{pf}], r8",
                "mov [{ps}], rsp",
                "lea r8, [rip + 2f]",
                "mov [{pr}], r8",
                "2: ud2",
                pr = in(reg) pr, ps = in(reg) ps, pf = in(reg) pf,
                out("r8") _,
            )
        }
    });
    let f = expect(vector::UD, r, "#UD");
    check_eq!(f.error_code, 0, "#UD error code");
    check!(
        f.rflags & x86::RFLAGS_CF != 0,
        "#UD: CF not preserved in the frame's RFLAGS"
    );
    check_frame(
        &f,
        EXP_RIP.load(Ordering::SeqCst),
        true,
        "#UD RIP (the UD2)",
    );
    println!("exceptions: #UD ok");
}

fn test_bp() {
    let (pr, ps, pf) = exp_ptrs();
    let r = catch(|| {
        // SAFETY: INT3 on purpose; its RIP in the frame is the next instruction.
        unsafe {
            asm!(
                "pushfq",
                "pop r8",
                "mov [{pf}], r8",
                "mov [{ps}], rsp",
                "lea r8, [rip + 2f]",
                "mov [{pr}], r8",
                "int3",
                "2: nop",
                pr = in(reg) pr, ps = in(reg) ps, pf = in(reg) pf,
                out("r8") _,
            )
        }
    });
    let f = expect(vector::BP, r, "#BP");
    check_eq!(f.error_code, 0, "#BP error code");
    check_frame(
        &f,
        EXP_RIP.load(Ordering::SeqCst),
        false,
        "#BP RIP (after INT3)",
    );
    println!("exceptions: #BP ok");
}

fn test_gp() {
    let (pr, ps, pf) = exp_ptrs();
    let r = catch(|| {
        // SAFETY: a load from a non-canonical address raises #GP(0) before any access.
        unsafe {
            asm!(
                "movabs rax, 0x8000000000000000",
                "pushfq",
                "pop r8",
                "mov [{pf}], r8",
                "mov [{ps}], rsp",
                "lea r8, [rip + 2f]",
                "mov [{pr}], r8",
                "2: mov rax, [rax]",
                pr = in(reg) pr, ps = in(reg) ps, pf = in(reg) pf,
                out("rax") _, out("r8") _,
            )
        }
    });
    let f = expect(vector::GP, r, "#GP (non-canonical)");
    check_eq!(f.error_code, 0, "#GP error code");
    check_frame(
        &f,
        EXP_RIP.load(Ordering::SeqCst),
        true,
        "#GP RIP (the load)",
    );
    println!("exceptions: #GP ok");
}

fn on_df_stack(f: &Fault) -> bool {
    let (lo, hi) = gdt::df_stack_bounds();
    f.frame_addr >= lo && f.frame_addr < hi
}

fn test_df_bad_gate() {
    idt::set_gate(
        vector::DE,
        GateOptions {
            present: false,
            ..GateOptions::default()
        },
    );
    let r = catch(|| {
        // SAFETY: #DE through a not-present gate; catch() recovers from the #DF.
        unsafe {
            asm!(
                "xor edx, edx",
                "mov eax, 1",
                "xor ecx, ecx",
                "div ecx",
                out("rax") _, out("rcx") _, out("rdx") _,
            )
        }
    });
    idt::set_gate(vector::DE, GateOptions::default());
    let f = expect(vector::DF, r, "#DF (not-present #DE gate)");
    check_eq!(f.error_code, 0, "#DF error code");
    check!(
        on_df_stack(&f),
        "#DF: handler frame at {} is not on the IST1 stack",
        Hex(f.frame_addr)
    );
    println!("exceptions: #DF (bad gate) ok");
}

fn test_df_bad_stack() {
    let page = match esvm_rt::mem::alloc_pages(1) {
        Some(p) => p,
        None => {
            println!("FAIL: out of memory for the bad-stack page");
            esvm_rt::exit(1)
        }
    };
    check!(
        paging::unmap(page).is_ok(),
        "#DF: cannot unmap the bad-stack page"
    );
    let top = page + 4096;
    let r = catch(|| {
        // SAFETY: switches to a not-present stack and pushes: #PF, then #PF while
        // delivering it -> #DF on IST1. catch() restores RSP.
        unsafe { asm!("mov rsp, {top}", "push rax", top = in(reg) top, out("rax") _) }
    });
    let _ = paging::map_present(page);
    let f = expect(vector::DF, r, "#DF (not-present stack)");
    check_eq!(f.error_code, 0, "#DF error code");
    check!(
        on_df_stack(&f),
        "#DF: handler frame at {} is not on the IST1 stack",
        Hex(f.frame_addr)
    );
    check_eq!(f.cr2, top - 8, "#DF: CR2 (the failing stack slot)");
    println!("exceptions: #DF (bad stack) ok");
}

static INT80_FRAME: AtomicU64 = AtomicU64::new(0);
static INT80_HITS: AtomicU64 = AtomicU64::new(0);
static mut INT80_SAVED: InterruptFrame = InterruptFrame {
    r15: 0,
    r14: 0,
    r13: 0,
    r12: 0,
    r11: 0,
    r10: 0,
    r9: 0,
    r8: 0,
    rbp: 0,
    rdi: 0,
    rsi: 0,
    rdx: 0,
    rcx: 0,
    rbx: 0,
    rax: 0,
    vector: 0,
    error_code: 0,
    rip: 0,
    cs: 0,
    rflags: 0,
    rsp: 0,
    ss: 0,
};

fn on_int80(frame: &mut InterruptFrame) {
    INT80_HITS.fetch_add(1, Ordering::SeqCst);
    INT80_FRAME.store(frame as *mut InterruptFrame as u64, Ordering::SeqCst);
    // SAFETY: single vCPU; read by the test after the INT returned.
    unsafe { core::ptr::addr_of_mut!(INT80_SAVED).write_volatile(*frame) };
    // "System call": rax = rdi + 1.
    frame.rax = frame.rdi.wrapping_add(1);
}

fn saved_int80() -> InterruptFrame {
    // SAFETY: written by on_int80 before, single vCPU.
    unsafe { core::ptr::addr_of!(INT80_SAVED).read_volatile() }
}

/// Executes `int 0x80` with rdi = arg; rcx = RIP after the INT, rdx = RSP at the INT.
/// Returns rax.
extern "C" fn do_int80(arg: u64) -> u64 {
    let ret: u64;
    // SAFETY: int 0x80 goes to on_int80, which only changes RAX.
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

fn check_int80(from_user: bool, what: &str) {
    let f = saved_int80();
    check_eq!(f.vector, 0x80, "int 0x80 vector");
    check_eq!(f.error_code, 0, "int 0x80 error code");
    check_eq!(f.rip, f.rcx, "int 0x80 RIP (after the INT)");
    check_eq!(f.rsp, f.rdx, "int 0x80 RSP (the caller's)");
    let (cs, ss) = if from_user {
        (USER_CS, USER_DS)
    } else {
        (KERNEL_CS, KERNEL_DS)
    };
    check_eq!(f.cs, cs, "int 0x80 CS");
    check_eq!(f.ss, ss, "int 0x80 SS");
    if from_user {
        // Entered from ring 3: the CPU switched to TSS.RSP0 and pushed 5 words there.
        let frame_end =
            INT80_FRAME.load(Ordering::SeqCst) + core::mem::size_of::<InterruptFrame>() as u64;
        check_eq!(
            frame_end,
            gdt::rsp0(),
            "int 0x80 from ring 3: frame not at the top of TSS.RSP0"
        );
        check_eq!(
            f.rflags & x86::RFLAGS_IOPL3,
            x86::RFLAGS_IOPL3,
            "ring-3 RFLAGS.IOPL"
        );
    }
    println!("exceptions: {} ok", what);
}

extern "C" fn user_int81(_: u64) -> u64 {
    let r = catch(|| {
        // SAFETY: int 0x81 through a DPL-0 gate from ring 3 raises #GP; catch() (set up in
        // ring 3) resumes here in ring 3.
        unsafe {
            asm!("lea r8, [rip + 2f]", "mov [{p}], r8", "2: int 0x81", p = in(reg) &EXP_RIP, out("r8") _)
        }
    });
    match r {
        Ok(()) => 1,
        Err(f) if f.vector != u64::from(vector::GP) => 2,
        Err(f) if f.error_code != 0x81 * 8 + 2 => 3,
        Err(f) if f.rip != EXP_RIP.load(Ordering::SeqCst) => 4,
        Err(f) if f.cs != u64::from(USER_CS) => 5,
        Err(_) if x86::cs() != USER_CS => 6,
        Err(_) => 0,
    }
}

fn test_int80() {
    idt::set_gate(
        0x80,
        GateOptions {
            dpl: 3,
            ..GateOptions::default()
        },
    );
    idt::set_handler(0x80, on_int80);
    let r = do_int80(41);
    check_eq!(r, 42, "int 0x80 from ring 0: result");
    check_int80(false, "int 0x80 (ring 0)");

    let r = esvm_rt::user::run_user(do_int80, 99);
    check_eq!(r, 100, "int 0x80 from ring 3: result");
    check_int80(true, "int 0x80 (ring 3, DPL-3 gate)");
    check_eq!(
        INT80_HITS.load(Ordering::SeqCst),
        2,
        "int 0x80 handler runs"
    );

    // 0x81 keeps its default DPL-0 gate.
    let code = esvm_rt::user::run_user(user_int81, 0);
    check!(
        code == 0,
        "int 0x81 (DPL-0 gate) from ring 3: check {} failed (expected #GP, error 0x40a)",
        Hex(code)
    );
    println!("exceptions: int 0x81 from ring 3 -> #GP(0x40a) ok");
}

fn main(_bi: &'static BootInfo) -> u32 {
    println!("exceptions: starting");
    let run = |case: &str, f: fn()| esvm_rt::args::run_case("exceptions", case, f);
    run("de", test_de);
    run("ud", test_ud);
    run("bp", test_bp);
    run("gp", test_gp);
    run("df-gate", test_df_bad_gate);
    run("df-stack", test_df_bad_stack);
    run("int80", test_int80);
    println!("exceptions: all tests passed");
    0
}
