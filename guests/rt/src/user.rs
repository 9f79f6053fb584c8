//! Ring 3: [`run_user`] calls a function in ring 3 (IRETQ to the user code/data
//! selectors with IOPL=3, so user code can still do port I/O) and comes back to ring 0
//! when it returns (through `int 0xF0`, a DPL-3 gate owned by the runtime). Also the
//! SYSCALL/SYSRET plumbing: [`init_syscall`] programs STAR/LSTAR/SFMASK and the
//! KERNEL_GS_BASE per-CPU area; the entry stub switches GS with SWAPGS and the stack to
//! the per-CPU kernel stack and calls the registered [`SyscallHandler`].

use crate::gdt::{KERNEL_CS, USER_CS, USER_DS};
use crate::idt::{self, GateOptions, InterruptFrame};
use crate::x86::{self, rdmsr, wrmsr};
use crate::Racy;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Vector of the runtime's "return from ring 3" gate.
pub const USER_RETURN_VECTOR: u8 = 0xF0;

const USER_STACK_SIZE: usize = 64 * 1024;

#[repr(C, align(16))]
struct UserStack([u8; USER_STACK_SIZE]);

static USER_STACK: Racy<UserStack> = Racy::new(UserStack([0; USER_STACK_SIZE]));

/// Top of the runtime's ring-3 stack used by [`run_user`].
pub fn user_stack_top() -> u64 {
    USER_STACK.get() as u64 + USER_STACK_SIZE as u64
}

/// Kernel context saved by `esvm_user_enter`; same layout as the catch buffer prefix.
#[repr(C)]
struct KernelContext {
    rbx: u64,
    rbp: u64,
    r12: u64,
    r13: u64,
    r14: u64,
    r15: u64,
    rsp: u64,
    rip: u64,
    rflags: u64,
}

static ACTIVE: AtomicU64 = AtomicU64::new(0);

core::arch::global_asm!(
    r#"
    .section .text.esvm_user,"ax",@progbits
    .globl esvm_user_enter
    // u64 esvm_user_enter(KernelContext *ctx, u64 (*f)(u64), u64 arg, u64 user_rsp,
    //                     u64 rflags)
esvm_user_enter:
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
    // IRETQ frame: SS, RSP, RFLAGS, CS, RIP.
    push {user_ds}
    push rcx
    push r8
    push {user_cs}
    lea rax, [rip + esvm_user_trampoline]
    push rax
    mov rdi, rdx
    xor eax, eax
    xor ebx, ebx
    xor ecx, ecx
    xor edx, edx
    xor ebp, ebp
    xor r8d, r8d
    xor r9d, r9d
    xor r10d, r10d
    xor r11d, r11d
    xor r12d, r12d
    xor r13d, r13d
    xor r14d, r14d
    xor r15d, r15d
    iretq

    // Ring 3: rdi = arg, rsi = f, rsp = user stack top (16-byte aligned).
esvm_user_trampoline:
    call rsi
    mov rdi, rax
    .globl esvm_user_return_insn
esvm_user_return_insn:
    int {ret_vec}
    ud2
"#,
    user_ds = const USER_DS as u64,
    user_cs = const USER_CS as u64,
    ret_vec = const USER_RETURN_VECTOR as u64,
);

extern "C" {
    fn esvm_user_enter(
        ctx: *mut KernelContext,
        f: extern "C" fn(u64) -> u64,
        arg: u64,
        user_rsp: u64,
        rflags: u64,
    ) -> u64;
}

extern "C" {
    static esvm_user_return_insn: u8;
}

/// Ring-3 exceptions the runtime resolves itself (called by the dispatcher for vectors
/// without a registered handler). Two compatibility paths for CPUs/hypervisors that run
/// ring 3 in a restricted hardware context (e.g. KVM's PVM, which runs guest user mode
/// natively): there `int 0xF0` raises #UD and port I/O raises #GP despite IOPL=3.
/// - #UD exactly at the trampoline's `int 0xF0`: treated as the return to ring 0.
/// - #GP(0) on an IN/OUT instruction, when the running [`run_user_with`] asked for
///   `emulate_port_io`: the access is done in ring 0 and the instruction skipped.
///
/// Both are counted ([`compat_fallbacks`]).
pub(crate) fn fallback(frame: &mut InterruptFrame) -> bool {
    if frame.cs & 3 != 3 || ACTIVE.load(Ordering::SeqCst) == 0 {
        return false;
    }
    let ret_insn = core::ptr::addr_of!(esvm_user_return_insn) as u64;
    let handled = match frame.vector {
        6 if frame.rip == ret_insn => {
            user_return(frame);
            true
        }
        13 if frame.error_code == 0 && EMULATE_IO.load(Ordering::SeqCst) != 0 => emulate_io(frame),
        _ => false,
    };
    if handled {
        FALLBACKS.fetch_add(1, Ordering::SeqCst);
    }
    handled
}

static EMULATE_IO: AtomicU64 = AtomicU64::new(0);
static FALLBACKS: AtomicU64 = AtomicU64::new(0);

/// How many ring-3 exceptions the compatibility paths of the runtime resolved (0 on a
/// CPU that honours IOPL=3 and INT n in ring 3).
pub fn compat_fallbacks() -> u64 {
    FALLBACKS.load(Ordering::SeqCst)
}

/// Performs the IN/OUT instruction at `frame.rip` on behalf of ring 3.
fn emulate_io(frame: &mut InterruptFrame) -> bool {
    let rip = frame.rip as *const u8;
    // SAFETY: ring-3 code just faulted at `rip`, so its bytes are mapped and readable;
    // an IN/OUT instruction is at most 3 bytes long.
    let b = unsafe {
        [
            rip.read_volatile(),
            rip.add(1).read_volatile(),
            rip.add(2).read_volatile(),
        ]
    };
    let (prefix, op, rest) = if b[0] == 0x66 {
        (1usize, b[1], b[2])
    } else {
        (0, b[0], b[1])
    };
    let (port, len) = match op {
        0xE4..=0xE7 => (u16::from(rest), prefix + 2),
        0xEC..=0xEF => (frame.rdx as u16, prefix + 1),
        _ => return false,
    };
    let wide = op & 1 != 0;
    let is_out = op & 2 != 0;
    let size = if !wide {
        1
    } else if prefix == 1 {
        2
    } else {
        4
    };
    if is_out {
        match size {
            1 => x86::outb(port, frame.rax as u8),
            2 => x86::outw(port, frame.rax as u16),
            _ => x86::outl(port, frame.rax as u32),
        }
    } else {
        frame.rax = match size {
            1 => (frame.rax & !0xFF) | u64::from(x86::inb(port)),
            2 => (frame.rax & !0xFFFF) | u64::from(x86::inw(port)),
            // A 32-bit destination zero-extends into RAX.
            _ => u64::from(x86::inl(port)),
        };
    }
    frame.rip += len as u64;
    true
}

fn user_return(frame: &mut InterruptFrame) {
    let active = ACTIVE.load(Ordering::SeqCst);
    if active == 0 || frame.cs & 3 != 3 {
        crate::println!(
            "FAIL: int {} outside run_user",
            crate::serial::Hex(frame.vector)
        );
        crate::idt::dump_frame(frame, 0);
        crate::exit(101);
    }
    // SAFETY: ACTIVE points at the context of the run_user call that is still on the
    // kernel stack.
    let ctx = unsafe { &*(active as *const KernelContext) };
    let result = frame.rdi;
    *frame = InterruptFrame {
        rbx: ctx.rbx,
        rbp: ctx.rbp,
        r12: ctx.r12,
        r13: ctx.r13,
        r14: ctx.r14,
        r15: ctx.r15,
        rsp: ctx.rsp,
        rip: ctx.rip,
        rflags: ctx.rflags,
        cs: u64::from(KERNEL_CS),
        ss: u64::from(crate::gdt::KERNEL_DS),
        rax: result,
        ..*frame
    };
}

/// Ring-3 flags options for [`run_user_with`].
#[derive(Clone, Copy, Debug)]
pub struct UserOptions {
    /// RFLAGS for ring 3 (bit 1 is forced on); default IOPL=3, IF=0.
    pub rflags: u64,
    /// Stack top for ring 3; default the runtime's 64 KiB user stack.
    pub stack_top: u64,
    /// If ring-3 port I/O raises #GP(0) although IOPL=3 (a hypervisor that runs ring 3
    /// in a restricted context), perform the access in ring 0 instead. Default off, so
    /// the architecture tests see the real behaviour.
    pub emulate_port_io: bool,
}

impl Default for UserOptions {
    fn default() -> Self {
        UserOptions {
            rflags: x86::RFLAGS_IOPL3,
            stack_top: user_stack_top(),
            emulate_port_io: false,
        }
    }
}

/// Runs `f(arg)` in ring 3 with the default options and returns its result in ring 0.
pub fn run_user(f: extern "C" fn(u64) -> u64, arg: u64) -> u64 {
    run_user_with(f, arg, UserOptions::default())
}

/// Runs `f(arg)` in ring 3 and returns its result in ring 0. Exceptions in ring 3 go
/// through the IDT as usual (on the TSS.RSP0 stack); a [`crate::trap::catch`] around
/// this call catches them. Not reentrant.
pub fn run_user_with(f: extern "C" fn(u64) -> u64, arg: u64, opts: UserOptions) -> u64 {
    idt::set_gate(
        USER_RETURN_VECTOR,
        GateOptions {
            dpl: 3,
            ..GateOptions::default()
        },
    );
    idt::set_handler(USER_RETURN_VECTOR, user_return);
    // Filled completely by esvm_user_enter before anything reads it.
    let mut ctx = core::mem::MaybeUninit::<KernelContext>::uninit();
    let outer = ACTIVE.swap(ctx.as_mut_ptr() as u64, Ordering::SeqCst);
    let outer_io = EMULATE_IO.swap(u64::from(opts.emulate_port_io), Ordering::SeqCst);
    // SAFETY: esvm_user_enter saves the callee-saved registers, RSP and the return
    // address in `ctx` and IRETQs to ring 3; `user_return` restores that context, so
    // control comes back here as if the call returned f's result.
    let r = unsafe {
        esvm_user_enter(
            ctx.as_mut_ptr(),
            f,
            arg,
            opts.stack_top & !0xF,
            opts.rflags | x86::RFLAGS_FIXED,
        )
    };
    ACTIVE.store(outer, Ordering::SeqCst);
    EMULATE_IO.store(outer_io, Ordering::SeqCst);
    r
}

/// Registers saved by the SYSCALL entry stub, lowest address first. The handler may
/// modify them; `rax` is the usual return value. `rip`/`rflags` come from RCX/R11 and
/// are restored into them before SYSRETQ.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SyscallFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    /// User RFLAGS (from R11).
    pub rflags: u64,
    /// User return address (from RCX).
    pub rip: u64,
    /// User RSP.
    pub rsp: u64,
}

/// A SYSCALL handler.
pub type SyscallHandler = fn(&mut SyscallFrame);

/// Per-CPU area reached through GS after SWAPGS in the SYSCALL entry.
#[repr(C)]
pub struct PerCpu {
    /// Offset 0: kernel stack top loaded on SYSCALL.
    pub kernel_rsp: u64,
    /// Offset 8: scratch slot for the user RSP.
    pub user_rsp: u64,
    /// Offset 16: number of SYSCALLs taken.
    pub syscalls: u64,
    /// Offset 24: the GS base after SWAPGS (filled by the entry stub).
    pub gs_base_in_handler: u64,
    /// Offset 32: RFLAGS right after SYSCALL, before the stub touches them.
    pub entry_rflags: u64,
}

static PERCPU: Racy<PerCpu> = Racy::new(PerCpu {
    kernel_rsp: 0,
    user_rsp: 0,
    syscalls: 0,
    gs_base_in_handler: 0,
    entry_rflags: 0,
});
static SYSCALL_HANDLER: AtomicUsize = AtomicUsize::new(0);

/// Address of the per-CPU area (the value KERNEL_GS_BASE holds while in ring 3).
pub fn percpu_addr() -> u64 {
    PERCPU.get() as u64
}

/// RFLAGS as the last SYSCALL left them (after SFMASK, before the stub's CLD).
pub fn syscall_entry_rflags() -> u64 {
    // SAFETY: plain read of a field of the static per-CPU area; single vCPU.
    unsafe { core::ptr::addr_of!((*PERCPU.get()).entry_rflags).read_volatile() }
}

/// Number of SYSCALLs taken so far.
pub fn syscall_count() -> u64 {
    // SAFETY: plain read of a field of the static per-CPU area; single vCPU.
    unsafe { core::ptr::addr_of!((*PERCPU.get()).syscalls).read_volatile() }
}

core::arch::global_asm!(
    r#"
    .section .text.esvm_syscall,"ax",@progbits
    .globl esvm_syscall_entry
esvm_syscall_entry:
    swapgs
    mov gs:[8], rsp
    mov rsp, gs:[0]
    push qword ptr gs:[8]
    push rcx
    push r11
    push rax
    push rbx
    push rcx
    push rdx
    push rsi
    push rdi
    push rbp
    push r8
    push r9
    push r10
    push r11
    push r12
    push r13
    push r14
    push r15
    pushfq
    pop qword ptr gs:[32]
    inc qword ptr gs:[16]
    mov ecx, {gs_base_msr}
    rdmsr
    shl rdx, 32
    or rax, rdx
    mov gs:[24], rax
    cld
    mov rdi, rsp
    call esvm_rt_syscall_dispatch
    pop r15
    pop r14
    pop r13
    pop r12
    pop r11
    pop r10
    pop r9
    pop r8
    pop rbp
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rbx
    pop rax
    pop r11
    pop rcx
    pop rsp
    swapgs
    sysretq
"#,
    gs_base_msr = const x86::MSR_GS_BASE,
);

extern "C" {
    static esvm_syscall_entry: u8;
}

#[no_mangle]
extern "C" fn esvm_rt_syscall_dispatch(frame: &mut SyscallFrame) {
    let h = SYSCALL_HANDLER.load(Ordering::SeqCst);
    if h == 0 {
        crate::println!(
            "FAIL: SYSCALL without a handler, rax={}",
            crate::serial::Hex(frame.rax)
        );
        crate::exit(101);
    }
    // SAFETY: only `SyscallHandler` values are stored in SYSCALL_HANDLER.
    let f: SyscallHandler = unsafe { core::mem::transmute::<usize, SyscallHandler>(h) };
    f(frame);
}

/// RFLAGS bits cleared on SYSCALL by [`init_syscall`]: TF, IF, DF, AC.
pub const SYSCALL_SFMASK: u64 = x86::RFLAGS_TF | x86::RFLAGS_IF | x86::RFLAGS_DF | x86::RFLAGS_AC;

/// Enables SYSCALL/SYSRET: EFER.SCE, STAR (kernel CS 0x08 / user base 0x10, so SYSRET
/// loads CS 0x23 and SS 0x1B), LSTAR = the runtime's entry stub, SFMASK =
/// [`SYSCALL_SFMASK`], KERNEL_GS_BASE = the per-CPU area; installs `handler`.
pub fn init_syscall(handler: SyscallHandler) {
    SYSCALL_HANDLER.store(handler as usize, Ordering::SeqCst);
    // SAFETY: single vCPU; the per-CPU area is only used by the SYSCALL stub.
    unsafe { (*PERCPU.get()).kernel_rsp = crate::gdt::ring0_stack_top() };
    let entry = core::ptr::addr_of!(esvm_syscall_entry) as u64;
    // SAFETY: these MSR values describe the runtime's GDT layout and entry stub.
    unsafe {
        wrmsr(x86::MSR_EFER, rdmsr(x86::MSR_EFER) | x86::EFER_SCE);
        wrmsr(
            x86::MSR_STAR,
            (0x10u64 << 48) | (u64::from(KERNEL_CS) << 32),
        );
        wrmsr(x86::MSR_LSTAR, entry);
        wrmsr(x86::MSR_SFMASK, SYSCALL_SFMASK);
        wrmsr(x86::MSR_KERNEL_GS_BASE, percpu_addr());
    }
}
