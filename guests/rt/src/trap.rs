//! Recovering from expected exceptions: [`catch`] runs a closure and, if an exception
//! (vector < 32) without a registered handler occurs inside it, abandons the closure
//! and returns the [`Fault`] — a setjmp/longjmp done by the interrupt dispatcher, which
//! rewrites the interrupt frame so IRETQ "returns" from the catch call.
//!
//! Works from ring 0 and ring 3 (the privilege level of the `catch` call is restored),
//! and from #DF on its IST stack. Nested catches are allowed. The abandoned closure's
//! frames are not unwound: keep catch bodies free of values with `Drop`.

use crate::idt::InterruptFrame;
use core::sync::atomic::{AtomicU64, Ordering};

/// An exception recovered by [`catch`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fault {
    /// Exception vector.
    pub vector: u64,
    /// Error code (0 for vectors without one).
    pub error_code: u64,
    /// RIP in the hardware frame.
    pub rip: u64,
    /// CS in the hardware frame.
    pub cs: u64,
    /// RFLAGS in the hardware frame.
    pub rflags: u64,
    /// RSP in the hardware frame.
    pub rsp: u64,
    /// SS in the hardware frame.
    pub ss: u64,
    /// CR2 at the time of the exception (meaningful for #PF).
    pub cr2: u64,
    /// Address of the interrupt frame, i.e. the stack the handler ran on.
    pub frame_addr: u64,
}

/// Saved context of an active catch; layout shared with the assembly below.
#[repr(C)]
struct JmpBuf {
    rbx: u64,    // 0
    rbp: u64,    // 8
    r12: u64,    // 16
    r13: u64,    // 24
    r14: u64,    // 32
    r15: u64,    // 40
    rsp: u64,    // 48: RSP after returning from esvm_catch_call
    rip: u64,    // 56: return address
    rflags: u64, // 64
    cs: u64,     // 72
    ss: u64,     // 80
}

/// Innermost active JmpBuf (0 = none).
static ACTIVE: AtomicU64 = AtomicU64::new(0);
/// The fault recorded by the dispatcher for the innermost catch.
static mut LAST: Fault = Fault {
    vector: 0,
    error_code: 0,
    rip: 0,
    cs: 0,
    rflags: 0,
    rsp: 0,
    ss: 0,
    cr2: 0,
    frame_addr: 0,
};

core::arch::global_asm!(
    r#"
    .section .text.esvm_catch,"ax",@progbits
    .globl esvm_catch_call
    // u64 esvm_catch_call(JmpBuf *buf, void (*f)(void *), void *arg)
    // Returns 0 when f returns normally; the dispatcher makes it return 1 on a fault.
esvm_catch_call:
    mov [rdi + 0], rbx
    mov [rdi + 8], rbp
    mov [rdi + 16], r12
    mov [rdi + 24], r13
    mov [rdi + 32], r14
    mov [rdi + 40], r15
    lea rax, [rsp + 8]
    mov [rdi + 48], rax
    mov rax, [rsp]
    mov [rdi + 56], rax
    pushfq
    pop rax
    mov [rdi + 64], rax
    mov ax, cs
    movzx eax, ax
    mov [rdi + 72], rax
    mov ax, ss
    movzx eax, ax
    mov [rdi + 80], rax
    sub rsp, 8
    mov rax, rsi
    mov rdi, rdx
    call rax
    add rsp, 8
    xor eax, eax
    ret
"#
);

extern "C" {
    fn esvm_catch_call(buf: *mut JmpBuf, f: unsafe extern "C" fn(*mut u8), arg: *mut u8) -> u64;
}

/// Takes the closure out of `*arg` and runs it.
///
/// # Safety
/// `arg` must point to a live `Option<F>` that nothing else accesses during the call.
unsafe extern "C" fn trampoline<F: FnOnce()>(arg: *mut u8) {
    // SAFETY: the caller guarantees `arg` is a live, exclusively ours `Option<F>`.
    let f = unsafe { (*(arg as *mut Option<F>)).take() };
    if let Some(f) = f {
        f();
    }
}

/// Runs `f`; returns `Err(fault)` if an exception without a registered handler occurred
/// while it ran (the rest of `f` is skipped), `Ok(())` otherwise.
pub fn catch<F: FnOnce()>(f: F) -> Result<(), Fault> {
    // Filled completely by esvm_catch_call before anything reads it (left uninitialised
    // so no SSE stores are needed to zero it).
    let mut buf = core::mem::MaybeUninit::<JmpBuf>::uninit();
    let mut slot = Some(f);
    let outer = ACTIVE.swap(buf.as_mut_ptr() as u64, Ordering::SeqCst);
    // SAFETY: esvm_catch_call saves the callee-saved registers and calls the trampoline
    // with a pointer to `slot` (a live local of the matching type, untouched until the call
    // returns: the trampoline's contract); on a fault the dispatcher restores exactly that
    // context, so control resumes here as if the call returned 1.
    let faulted = unsafe {
        esvm_catch_call(
            buf.as_mut_ptr(),
            trampoline::<F>,
            &mut slot as *mut Option<F> as *mut u8,
        )
    };
    ACTIVE.store(outer, Ordering::SeqCst);
    core::sync::atomic::compiler_fence(Ordering::SeqCst);
    if faulted != 0 {
        // SAFETY: LAST is written by the dispatcher before it resumes us; single vCPU.
        Err(unsafe { core::ptr::addr_of!(LAST).read_volatile() })
    } else {
        Ok(())
    }
}

/// Called by the dispatcher for exceptions without a handler: if a catch is active,
/// records the fault and rewrites `frame` to resume after its `esvm_catch_call`.
pub(crate) fn recover(frame: &mut InterruptFrame, cr2: u64) -> bool {
    let active = ACTIVE.load(Ordering::SeqCst);
    if active == 0 {
        return false;
    }
    let fault = Fault {
        vector: frame.vector,
        error_code: frame.error_code,
        rip: frame.rip,
        cs: frame.cs,
        rflags: frame.rflags,
        rsp: frame.rsp,
        ss: frame.ss,
        cr2,
        frame_addr: frame as *mut InterruptFrame as u64,
    };
    // SAFETY: single vCPU; `catch` reads LAST only after being resumed.
    unsafe { core::ptr::addr_of_mut!(LAST).write_volatile(fault) };
    // SAFETY: ACTIVE points at the JmpBuf of a catch call whose frame is still live
    // (catches are strictly nested).
    let buf = unsafe { &*(active as *const JmpBuf) };
    frame.rbx = buf.rbx;
    frame.rbp = buf.rbp;
    frame.r12 = buf.r12;
    frame.r13 = buf.r13;
    frame.r14 = buf.r14;
    frame.r15 = buf.r15;
    frame.rsp = buf.rsp;
    frame.rip = buf.rip;
    frame.rflags = buf.rflags;
    frame.cs = buf.cs;
    frame.ss = buf.ss;
    frame.rax = 1;
    true
}

/// Runs `f`, which is expected to raise exception `vector`; returns the fault, or a
/// description of what happened instead.
pub fn expect_fault<F: FnOnce()>(vector: u8, f: F) -> Result<Fault, &'static str> {
    match catch(f) {
        Ok(()) => Err("no exception was raised"),
        Err(fault) if fault.vector == u64::from(vector) => Ok(fault),
        Err(_) => Err("a different exception was raised"),
    }
}
