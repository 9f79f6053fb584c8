//! pagefault: page faults with exact CR2, error codes and RIP, fixed up by the handler
//! and resumed (the faulting instruction is re-executed).
//!
//! Cases (each prints `pagefault: <case> ok (error=<code>)`):
//! - not-present read (error 0x0) and write (0x2) in ring 0;
//! - write to a read-only page with CR0.WP=1 (0x3); with CR0.WP=0 the same write succeeds
//!   without a fault;
//! - ring-3 read (0x5) and write (0x7) of a supervisor page; ring-3 read of a
//!   not-present page (0x4);
//! - instruction fetch from an NX page in ring 0 (0x11) and ring 3 (0x15): RIP = CR2 =
//!   the page; after clearing NX the code runs and returns its value.
//!
//! The test pages are 4 KiB pages split out of the loader's 2 MiB mappings.
//!
//! Ends with `pagefault: all tests passed`, exit status 0; `FAIL:` and status 1 otherwise.
#![no_std]
#![no_main]

use core::arch::asm;
use core::sync::atomic::{AtomicU64, Ordering};
use esvm_rt::gdt::{KERNEL_CS, USER_CS};
use esvm_rt::idt::{self, InterruptFrame};
use esvm_rt::paging::{self, pf};
use esvm_rt::{check, check_eq, entry, println, user, x86, BootInfo, Hex};

entry!(main);

/// What the next #PF must look like and how to fix it.
static EXP_ADDR: AtomicU64 = AtomicU64::new(0);
static EXP_ERROR: AtomicU64 = AtomicU64::new(0);
static EXP_RIP: AtomicU64 = AtomicU64::new(0);
static EXP_CS: AtomicU64 = AtomicU64::new(0);
/// Paging flags to set / clear on the faulting page.
static FIX_SET: AtomicU64 = AtomicU64::new(0);
static FIX_CLEAR: AtomicU64 = AtomicU64::new(0);
static HITS: AtomicU64 = AtomicU64::new(0);

fn on_pf(frame: &mut InterruptFrame) {
    let cr2 = x86::read_cr2();
    let hits = HITS.fetch_add(1, Ordering::SeqCst) + 1;
    if hits > 1 {
        println!(
            "FAIL: #PF taken again after the fix-up (cr2={} error={})",
            Hex(cr2),
            Hex(frame.error_code)
        );
        esvm_rt::exit(1);
    }
    check_eq!(cr2, EXP_ADDR.load(Ordering::SeqCst), "CR2");
    check_eq!(
        frame.error_code,
        EXP_ERROR.load(Ordering::SeqCst),
        "#PF error code"
    );
    check_eq!(frame.rip, EXP_RIP.load(Ordering::SeqCst), "#PF RIP");
    check_eq!(frame.cs, EXP_CS.load(Ordering::SeqCst), "#PF CS");
    let page = cr2 & !0xfff;
    if paging::update_flags(
        page,
        FIX_SET.load(Ordering::SeqCst),
        FIX_CLEAR.load(Ordering::SeqCst),
    )
    .is_err()
    {
        println!("FAIL: cannot fix the mapping of {}", Hex(page));
        esvm_rt::exit(1);
    }
}

fn arm(addr: u64, error: u64, cs: u16, set: u64, clear: u64) {
    EXP_ADDR.store(addr, Ordering::SeqCst);
    EXP_ERROR.store(error, Ordering::SeqCst);
    EXP_CS.store(u64::from(cs), Ordering::SeqCst);
    FIX_SET.store(set, Ordering::SeqCst);
    FIX_CLEAR.store(clear, Ordering::SeqCst);
    HITS.store(0, Ordering::SeqCst);
}

fn hits() -> u64 {
    HITS.swap(0, Ordering::SeqCst)
}

/// Reads [addr], publishing the RIP of the load in EXP_RIP first.
extern "C" fn probe_read(addr: u64) -> u64 {
    let v: u64;
    // SAFETY: the page may fault; the #PF handler fixes it and the load is re-executed.
    unsafe {
        asm!(
            "lea rax, [rip + 2f]",
            "mov [{rip}], rax",
            "2: mov rax, [rdi]",
            rip = in(reg) &EXP_RIP, in("rdi") addr, out("rax") v,
        )
    }
    v
}

/// Writes `value` to [addr]; like [`probe_read`].
fn probe_write(addr: u64, value: u64) {
    // SAFETY: as for probe_read; the page belongs to this test.
    unsafe {
        asm!(
            "lea rax, [rip + 2f]",
            "mov [{rip}], rax",
            "2: mov [rdi], rsi",
            rip = in(reg) &EXP_RIP, in("rdi") addr, in("rsi") value, out("rax") _,
        )
    }
}

extern "C" fn user_write(addr: u64) -> u64 {
    probe_write(addr, 0x7777);
    0
}

fn page() -> u64 {
    match esvm_rt::mem::alloc_pages(1) {
        Some(p) => p,
        None => {
            println!("FAIL: out of memory for a test page");
            esvm_rt::exit(1)
        }
    }
}

fn ok(case: &str, error: u64) {
    check_eq!(hits(), 1, case);
    println!("pagefault: {} ok (error={})", case, Hex(error));
}

fn test_not_present(p: u64) {
    // SAFETY: p is our freshly allocated page.
    unsafe { ((p + 0x10) as *mut u64).write_volatile(0xfeed_f00d) };
    check!(paging::unmap(p).is_ok(), "unmap failed");
    let t = paging::translate(p);
    check!(t.is_none(), "page still translates after unmap");
    arm(p + 0x10, 0, KERNEL_CS, paging::PRESENT, 0);
    let v = probe_read(p + 0x10);
    check_eq!(v, 0xfeed_f00d, "value read after the fix-up");
    ok("not-present read", 0);

    check!(paging::unmap(p).is_ok(), "unmap failed");
    arm(p + 0x28, pf::WRITE, KERNEL_CS, paging::PRESENT, 0);
    probe_write(p + 0x28, 0xabcd);
    ok("not-present write", pf::WRITE);
    check_eq!(
        // SAFETY: `p` is this test's page, present again after the fault handler's fix-up.
        unsafe { ((p + 0x28) as *const u64).read_volatile() },
        0xabcd,
        "value written after the fix-up"
    );

    match paging::translate(p) {
        Some((phys, flags, size)) => {
            check_eq!(phys, p, "identity translation");
            check_eq!(size, 4096, "page size after the split");
            check!(
                flags & paging::PRESENT != 0,
                "page not present after the fix-up"
            );
        }
        None => {
            println!("FAIL: page not mapped after the fix-up");
            esvm_rt::exit(1)
        }
    }
}

fn test_read_only(p: u64) {
    check!(
        x86::read_cr0() & x86::CR0_WP != 0,
        "CR0.WP is clear at boot"
    );
    check!(
        paging::update_flags(p, 0, paging::WRITABLE).is_ok(),
        "cannot clear R/W"
    );
    arm(
        p + 0x40,
        pf::PRESENT | pf::WRITE,
        KERNEL_CS,
        paging::WRITABLE,
        0,
    );
    probe_write(p + 0x40, 1);
    ok(
        "write to read-only page (CR0.WP=1)",
        pf::PRESENT | pf::WRITE,
    );

    // With WP clear, supervisor writes ignore R/W.
    check!(
        paging::update_flags(p, 0, paging::WRITABLE).is_ok(),
        "cannot clear R/W"
    );
    let cr0 = x86::read_cr0();
    arm(0, 0, KERNEL_CS, 0, 0);
    // SAFETY: clearing WP only relaxes write protection for ring 0 for a moment.
    unsafe { x86::write_cr0(cr0 & !x86::CR0_WP) };
    probe_write(p + 0x48, 2);
    // SAFETY: restores the previous CR0.
    unsafe { x86::write_cr0(cr0) };
    check_eq!(hits(), 0, "faults for a read-only write with CR0.WP=0");
    check_eq!(
        // SAFETY: `p` is this test's page, mapped (read-only, which a read does not mind).
        unsafe { ((p + 0x48) as *const u64).read_volatile() },
        2,
        "write with CR0.WP=0"
    );
    check!(
        paging::update_flags(p, paging::WRITABLE, 0).is_ok(),
        "cannot set R/W"
    );
    println!("pagefault: write to read-only page with CR0.WP=0 ok (no fault)");
}

fn test_user(p: u64) {
    check!(
        paging::update_flags(p, 0, paging::USER).is_ok(),
        "cannot clear U/S"
    );
    arm(p + 0x80, pf::PRESENT | pf::USER, USER_CS, paging::USER, 0);
    let _ = user::run_user(probe_read, p + 0x80);
    ok("ring-3 read of a supervisor page", pf::PRESENT | pf::USER);

    check!(
        paging::update_flags(p, 0, paging::USER).is_ok(),
        "cannot clear U/S"
    );
    arm(
        p + 0x88,
        pf::PRESENT | pf::USER | pf::WRITE,
        USER_CS,
        paging::USER,
        0,
    );
    let _ = user::run_user(user_write, p + 0x88);
    ok(
        "ring-3 write to a supervisor page",
        pf::PRESENT | pf::USER | pf::WRITE,
    );
    check_eq!(
        // SAFETY: `p` is this test's page and present; SMAP is off, so ring 0 may read it
        // whatever its U/S bit.
        unsafe { ((p + 0x88) as *const u64).read_volatile() },
        0x7777,
        "value written from ring 3"
    );

    check!(paging::unmap(p).is_ok(), "unmap failed");
    arm(p + 0x90, pf::USER, USER_CS, paging::PRESENT, 0);
    let _ = user::run_user(probe_read, p + 0x90);
    ok("ring-3 read of a not-present page", pf::USER);
}

/// `mov eax, 0x1234abcd; ret`
const CODE: [u8; 6] = [0xb8, 0xcd, 0xab, 0x34, 0x12, 0xc3];

extern "C" fn call_code(addr: u64) -> u64 {
    // SAFETY: `addr` holds CODE, a complete function returning in EAX.
    let f: extern "C" fn() -> u32 = unsafe { core::mem::transmute(addr as usize) };
    u64::from(f())
}

fn test_nx(p: u64, user_mode: bool) {
    // SAFETY: our page; written before it is executed.
    unsafe { core::ptr::copy_nonoverlapping(CODE.as_ptr(), p as *mut u8, CODE.len()) };
    check!(
        paging::update_flags(p, paging::NO_EXECUTE, 0).is_ok(),
        "cannot set NX"
    );
    let (error, cs) = if user_mode {
        (pf::PRESENT | pf::USER | pf::FETCH, USER_CS)
    } else {
        (pf::PRESENT | pf::FETCH, KERNEL_CS)
    };
    arm(p, error, cs, 0, paging::NO_EXECUTE);
    EXP_RIP.store(p, Ordering::SeqCst);
    let r = if user_mode {
        user::run_user(call_code, p)
    } else {
        call_code(p)
    };
    check_eq!(
        r,
        0x1234_abcd,
        "value returned by the code after clearing NX"
    );
    if user_mode {
        ok("ring-3 fetch from an NX page", error);
    } else {
        ok("fetch from an NX page", error);
    }
}

fn main(_bi: &'static BootInfo) -> u32 {
    println!("pagefault: starting");
    check!(
        x86::rdmsr(x86::MSR_EFER) & x86::EFER_NXE != 0,
        "EFER.NXE is clear at boot"
    );
    idt::set_handler(idt::vector::PF, on_pf);
    let p = page();
    test_not_present(p);
    test_read_only(p);
    test_user(p);
    test_nx(page(), false);
    test_nx(page(), true);
    println!("pagefault: all tests passed");
    0
}
