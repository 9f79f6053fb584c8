//! Running a snippet natively: fixed mappings, the trampoline and the fault guard.
//!
//! # Trampoline ABI
//! All state crosses through the control page at [`CTL_ADDR`] (layout: the private `Ctl` struct), addressed with
//! absolute disp32 operands, so no register is needed to find it:
//!
//! 1. `enter` (a `sysv64` function, no arguments, returns 0 = finished, 1 = faulted) pushes the
//!    host's callee-saved registers (RBX RBP R12-R15), stores the host RSP in `Ctl::host_rsp`,
//!    loads RFLAGS from `Ctl::in_rflags` with `POPFQ` (from the host stack), loads the 15 GPRs
//!    other than RSP from `Ctl::in_gpr`, then RSP, and jumps through `Ctl::entry` (=
//!    [`CODE_ADDR`]).
//! 2. The snippet runs. The code mapping holds, right after the snippet bytes, the 14-byte tail
//!    `jmp qword ptr [rip+0]; dq exit` (an indirect jump that touches neither the stack nor the
//!    flags).
//! 3. `exit` stores all 16 GPRs into `Ctl::out_gpr` (MOV leaves the flags alone), switches RSP to
//!    a small stack at the end of the control page (so nothing is written below the snippet's
//!    RSP, which is in the compared scratch buffer), stores RFLAGS with `PUSHFQ`/`POP`, reloads the
//!    host RSP, clears DF (the SysV ABI requires it), pops the callee-saved registers and returns 0.
//! 4. If the snippet faults, the signal handler (installed only for the duration of the run, on
//!    an alternate signal stack) records the signal, RIP and fault address in the control page
//!    and rewrites the interrupted context to resume at `fault_resume`, which restores the host
//!    registers exactly like `exit` and returns 1.
//!
//! The x87/SSE state is not touched by the trampoline; integer snippets do not touch it either.
//! Asynchronous signals are blocked while the snippet runs (the snippet's RSP points into the
//! scratch buffer, which must not receive a signal frame).

use crate::{CODE_ADDR, CODE_SIZE, CTL_ADDR, FLAGS_MASK, RFLAGS_FIXED, SCRATCH_ADDR, SCRATCH_SIZE};
use std::fmt::Write as _;
use std::mem::offset_of;
use std::sync::atomic::{compiler_fence, AtomicI32, Ordering};
use std::sync::Mutex;

/// Errors of native snippet execution.
#[derive(Debug, thiserror::Error)]
pub enum NativeError {
    #[error("snippet is {len} bytes, but at most {max} bytes fit in the code mapping; use a shorter snippet")]
    CodeTooLarge { len: usize, max: usize },
    #[error("scratch buffer is {len} bytes, expected exactly {expected} (SCRATCH_SIZE)")]
    ScratchSize { len: usize, expected: usize },
    #[error(
        "address range {addr:#x}..{end:#x} needed by esvm-native is already mapped in this process; \
         run the native tests in a process that does not use it (e.g. a non-PIE binary loaded at 0x400000 \
         is fine, but something else is there)",
        end = addr + *len as u64
    )]
    AddressInUse { addr: u64, len: usize },
    #[error("mmap of {len:#x} bytes at fixed address {addr:#x} failed: {source}")]
    Mmap {
        addr: u64,
        len: usize,
        source: std::io::Error,
    },
    #[error("{what} failed: {source}")]
    Os {
        what: &'static str,
        source: std::io::Error,
    },
    #[error(
        "snippet faulted natively with {signal} at rip={rip:#x} (fault address {addr:#x}); \
         a generated snippet must never fault, so this is a generator bug. Snippet bytes: {code}",
        signal = signal_name(*.signo),
        code = hex(.code)
    )]
    Fault {
        signo: i32,
        rip: u64,
        addr: u64,
        code: Vec<u8>,
    },
}

/// Register state before or after a snippet.
#[derive(Clone, PartialEq, Eq)]
pub struct NativeState {
    /// The sixteen GPRs in x86 encoding order (RAX RCX RDX RBX RSP RBP RSI RDI R8..R15), as
    /// indexed by [`esvm_arch::Gpr`].
    pub gpr: [u64; 16],
    /// RFLAGS. On input only the bits of [`FLAGS_MASK`] are used; on output only they are
    /// reported (everything else is zero).
    pub rflags: u64,
    /// The whole scratch buffer at [`SCRATCH_ADDR`], exactly [`SCRATCH_SIZE`] bytes.
    pub scratch: Vec<u8>,
}

impl NativeState {
    /// All registers zero, flags clear, scratch zero, RSP = [`crate::STACK_TOP`].
    pub fn new() -> Self {
        let mut gpr = [0; 16];
        gpr[esvm_arch::Gpr::Rsp as usize] = crate::STACK_TOP;
        NativeState {
            gpr,
            rflags: 0,
            scratch: vec![0; SCRATCH_SIZE],
        }
    }

    pub fn get(&self, r: esvm_arch::Gpr) -> u64 {
        self.gpr[r as usize]
    }

    pub fn set(&mut self, r: esvm_arch::Gpr, v: u64) {
        self.gpr[r as usize] = v;
    }
}

impl Default for NativeState {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for NativeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut s = f.debug_struct("NativeState");
        for r in esvm_arch::Gpr::ALL {
            s.field(r.name(), &format_args!("{:#018x}", self.gpr[r as usize]));
        }
        s.field("rflags", &format_args!("{:#x}", self.rflags));
        let nonzero = self.scratch.iter().filter(|&&b| b != 0).count();
        s.field(
            "scratch",
            &format_args!("[{} bytes, {} nonzero]", self.scratch.len(), nonzero),
        );
        s.finish()
    }
}

/// Largest snippet that fits in the code mapping together with the jump back.
pub const MAX_CODE_LEN: usize = CODE_SIZE - TAIL_LEN;
const TAIL_LEN: usize = 14;

/// The control page shared by Rust and the trampoline.
#[repr(C)]
struct Ctl {
    in_gpr: [u64; 16],
    in_rflags: u64,
    entry: u64,
    out_gpr: [u64; 16],
    out_rflags: u64,
    host_rsp: u64,
    fault_signo: u64,
    fault_rip: u64,
    fault_addr: u64,
}

const CTL_SIZE: usize = 0x1000;
/// Top of the small stack at the end of the control page used by `exit` and the fault handler.
const CTL_STACK_TOP: u64 = CTL_ADDR + CTL_SIZE as u64 - 64;
const _: () = assert!(std::mem::size_of::<Ctl>() < CTL_SIZE / 2);
const _: () = assert!(CTL_STACK_TOP < 0x8000_0000);

const C_IN: u64 = CTL_ADDR + offset_of!(Ctl, in_gpr) as u64;
const C_IN_RFLAGS: u64 = CTL_ADDR + offset_of!(Ctl, in_rflags) as u64;
const C_ENTRY: u64 = CTL_ADDR + offset_of!(Ctl, entry) as u64;
const C_OUT: u64 = CTL_ADDR + offset_of!(Ctl, out_gpr) as u64;
const C_OUT_RFLAGS: u64 = CTL_ADDR + offset_of!(Ctl, out_rflags) as u64;
const C_HOST_RSP: u64 = CTL_ADDR + offset_of!(Ctl, host_rsp) as u64;

/// Enters the snippet (see the module docs for the ABI).
///
/// # Safety
/// The control page must be mapped and filled in, the code mapping must hold the
/// snippet followed by the tail, and the snippet must return through the tail without touching
/// memory outside the scratch buffer.
#[unsafe(naked)]
unsafe extern "sysv64" fn enter() -> u64 {
    core::arch::naked_asm!(
        "push rbx",
        "push rbp",
        "push r12",
        "push r13",
        "push r14",
        "push r15",
        "mov qword ptr [{host_rsp}], rsp",
        "push qword ptr [{in_rflags}]",
        "popfq",
        "mov rax, qword ptr [{gin} + 0]",
        "mov rcx, qword ptr [{gin} + 8]",
        "mov rdx, qword ptr [{gin} + 16]",
        "mov rbx, qword ptr [{gin} + 24]",
        "mov rbp, qword ptr [{gin} + 40]",
        "mov rsi, qword ptr [{gin} + 48]",
        "mov rdi, qword ptr [{gin} + 56]",
        "mov r8, qword ptr [{gin} + 64]",
        "mov r9, qword ptr [{gin} + 72]",
        "mov r10, qword ptr [{gin} + 80]",
        "mov r11, qword ptr [{gin} + 88]",
        "mov r12, qword ptr [{gin} + 96]",
        "mov r13, qword ptr [{gin} + 104]",
        "mov r14, qword ptr [{gin} + 112]",
        "mov r15, qword ptr [{gin} + 120]",
        "mov rsp, qword ptr [{gin} + 32]",
        "jmp qword ptr [{entry}]",
        host_rsp = const C_HOST_RSP,
        in_rflags = const C_IN_RFLAGS,
        gin = const C_IN,
        entry = const C_ENTRY,
    )
}

/// Jumped to from the snippet's tail with the snippet's registers and flags live.
///
/// # Safety
/// Only reachable through the tail written by [`run_native`] while `enter` is active.
#[unsafe(naked)]
unsafe extern "sysv64" fn exit() {
    core::arch::naked_asm!(
        "mov qword ptr [{gout} + 0], rax",
        "mov qword ptr [{gout} + 8], rcx",
        "mov qword ptr [{gout} + 16], rdx",
        "mov qword ptr [{gout} + 24], rbx",
        "mov qword ptr [{gout} + 32], rsp",
        "mov qword ptr [{gout} + 40], rbp",
        "mov qword ptr [{gout} + 48], rsi",
        "mov qword ptr [{gout} + 56], rdi",
        "mov qword ptr [{gout} + 64], r8",
        "mov qword ptr [{gout} + 72], r9",
        "mov qword ptr [{gout} + 80], r10",
        "mov qword ptr [{gout} + 88], r11",
        "mov qword ptr [{gout} + 96], r12",
        "mov qword ptr [{gout} + 104], r13",
        "mov qword ptr [{gout} + 112], r14",
        "mov qword ptr [{gout} + 120], r15",
        "mov rsp, {ctl_stack}",
        "pushfq",
        "pop qword ptr [{out_rflags}]",
        "mov rsp, qword ptr [{host_rsp}]",
        "xor eax, eax",
        "cld",
        "pop r15",
        "pop r14",
        "pop r13",
        "pop r12",
        "pop rbp",
        "pop rbx",
        "ret",
        gout = const C_OUT,
        ctl_stack = const CTL_STACK_TOP,
        out_rflags = const C_OUT_RFLAGS,
        host_rsp = const C_HOST_RSP,
    )
}

/// Where the fault handler resumes a faulted snippet: back to `enter`'s caller, returning 1.
///
/// # Safety
/// Only reachable from the signal handler while `enter` is active.
#[unsafe(naked)]
unsafe extern "sysv64" fn fault_resume() {
    core::arch::naked_asm!(
        "mov rsp, qword ptr [{host_rsp}]",
        "mov eax, 1",
        "cld",
        "pop r15",
        "pop r14",
        "pop r13",
        "pop r12",
        "pop rbp",
        "pop rbx",
        "ret",
        host_rsp = const C_HOST_RSP,
    )
}

/// Thread id of the thread currently running a snippet (0 = none).
static ACTIVE_TID: AtomicI32 = AtomicI32::new(0);

/// Signals turned into [`NativeError::Fault`].
const GUARDED: [libc::c_int; 5] = [
    libc::SIGSEGV,
    libc::SIGBUS,
    libc::SIGILL,
    libc::SIGFPE,
    libc::SIGTRAP,
];

/// Previous handlers while ours are installed; read by our handler to forward foreign faults.
struct OldActions(std::cell::UnsafeCell<[libc::sigaction; 5]>);
// SAFETY: written only by the thread holding `ARENA`'s lock before our handlers are installed,
// and read (by the handler) only while they are installed; `sigaction` orders the two.
unsafe impl Sync for OldActions {}
// SAFETY: `sigaction` is plain old data for which all-zero is a valid value (SIG_DFL).
static OLD_ACTIONS: OldActions =
    OldActions(std::cell::UnsafeCell::new(unsafe { std::mem::zeroed() }));

fn gettid() -> i32 {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as i32 }
}

extern "C" fn fault_handler(
    signo: libc::c_int,
    info: *mut libc::siginfo_t,
    ctx: *mut libc::c_void,
) {
    let ours = ACTIVE_TID.load(Ordering::SeqCst) == gettid();
    if !ours {
        // A fault on another thread while our handlers are installed: put the previous handler
        // back and return, so the faulting instruction re-executes and gets the old treatment.
        if let Some(i) = GUARDED.iter().position(|&s| s == signo) {
            // SAFETY: OLD_ACTIONS was filled before our handler was installed (see `Guard`).
            unsafe {
                let old = &(*OLD_ACTIONS.0.get())[i];
                libc::sigaction(signo, old, std::ptr::null_mut());
            }
        }
        return;
    }
    // SAFETY: the kernel passes valid siginfo/ucontext pointers to an SA_SIGINFO handler; the
    // control page is mapped for as long as ACTIVE_TID names this thread.
    unsafe {
        let uc = &mut *(ctx as *mut libc::ucontext_t);
        let gregs = &mut uc.uc_mcontext.gregs;
        let ctl = CTL_ADDR as *mut Ctl;
        std::ptr::write_volatile(&raw mut (*ctl).fault_signo, signo as u64);
        std::ptr::write_volatile(
            &raw mut (*ctl).fault_rip,
            gregs[libc::REG_RIP as usize] as u64,
        );
        std::ptr::write_volatile(&raw mut (*ctl).fault_addr, (*info).si_addr() as u64);
        gregs[libc::REG_RIP as usize] = fault_resume as *const () as usize as i64;
        gregs[libc::REG_RSP as usize] = CTL_STACK_TOP as i64;
        // Clear TF, DF and AC so the resumed host code runs with a sane RFLAGS.
        gregs[libc::REG_EFL as usize] &= !((1 << 8) | (1 << 10) | (1 << 18));
    }
}

/// The fixed mappings, created on first use and kept for the life of the process.
struct Arena {
    /// Alternate signal stack used while a snippet runs.
    altstack: Box<[u8]>,
}

static ARENA: Mutex<Option<Arena>> = Mutex::new(None);

fn map_fixed(addr: u64, len: usize) -> Result<(), NativeError> {
    // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping, so this cannot invalidate
    // memory anyone else uses; the result is checked below.
    let p = unsafe {
        libc::mmap(
            addr as *mut libc::c_void,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EEXIST) {
            return Err(NativeError::AddressInUse { addr, len });
        }
        return Err(NativeError::Mmap {
            addr,
            len,
            source: e,
        });
    }
    if p as u64 != addr {
        // A kernel older than 4.17 treats the unknown flag as a hint: undo and report.
        // SAFETY: `p` is the mapping we just created and nobody else knows about it.
        unsafe { libc::munmap(p, len) };
        return Err(NativeError::AddressInUse { addr, len });
    }
    Ok(())
}

impl Arena {
    fn create() -> Result<Arena, NativeError> {
        map_fixed(CODE_ADDR, CODE_SIZE + CTL_SIZE)?;
        if let Err(e) = map_fixed(SCRATCH_ADDR, SCRATCH_SIZE) {
            // SAFETY: the code/control mapping was created just above and is not in use.
            unsafe { libc::munmap(CODE_ADDR as *mut libc::c_void, CODE_SIZE + CTL_SIZE) };
            return Err(e);
        }
        Ok(Arena {
            altstack: vec![0u8; 256 * 1024].into_boxed_slice(),
        })
    }
}

fn os_err(what: &'static str) -> NativeError {
    NativeError::Os {
        what,
        source: std::io::Error::last_os_error(),
    }
}

fn protect_code(prot: libc::c_int) -> Result<(), NativeError> {
    // SAFETY: the code range is our own mapping (created in `Arena::create`).
    let r = unsafe { libc::mprotect(CODE_ADDR as *mut libc::c_void, CODE_SIZE, prot) };
    if r != 0 {
        return Err(os_err("mprotect of the code mapping"));
    }
    Ok(())
}

/// Fault handlers, alternate signal stack and blocked asynchronous signals for one run;
/// dropping it restores the previous state.
struct Guard {
    old_stack: libc::stack_t,
    old_mask: libc::sigset_t,
    installed: usize,
}

impl Guard {
    fn install(altstack: &mut [u8]) -> Result<Guard, NativeError> {
        // SAFETY: plain libc calls on locally owned, properly initialised structs. OLD_ACTIONS is
        // only written here, under the ARENA lock, before our handler is installed.
        unsafe {
            let mut g = Guard {
                old_stack: std::mem::zeroed(),
                old_mask: std::mem::zeroed(),
                installed: 0,
            };
            let st = libc::stack_t {
                ss_sp: altstack.as_mut_ptr() as *mut libc::c_void,
                ss_flags: 0,
                ss_size: altstack.len(),
            };
            if libc::sigaltstack(&st, &mut g.old_stack) != 0 {
                return Err(os_err("sigaltstack"));
            }
            // Block everything except the synchronous fault signals (a signal frame must not
            // land on the snippet's stack).
            let mut mask: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut mask);
            for s in GUARDED {
                libc::sigdelset(&mut mask, s);
            }
            if libc::pthread_sigmask(libc::SIG_SETMASK, &mask, &mut g.old_mask) != 0 {
                libc::sigaltstack(&g.old_stack, std::ptr::null_mut());
                return Err(os_err("pthread_sigmask"));
            }
            let old = &mut *OLD_ACTIONS.0.get();
            for (i, &s) in GUARDED.iter().enumerate() {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = fault_handler as *const () as usize;
                sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
                libc::sigfillset(&mut sa.sa_mask);
                if libc::sigaction(s, &sa, &mut old[i]) != 0 {
                    let e = os_err("sigaction");
                    drop(g);
                    return Err(e);
                }
                g.installed = i + 1;
            }
            Ok(g)
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        // SAFETY: restores exactly what `install` saved, on the same thread.
        unsafe {
            let old = &*OLD_ACTIONS.0.get();
            for (i, &s) in GUARDED.iter().enumerate().take(self.installed) {
                libc::sigaction(s, &old[i], std::ptr::null_mut());
            }
            libc::pthread_sigmask(libc::SIG_SETMASK, &self.old_mask, std::ptr::null_mut());
            libc::sigaltstack(&self.old_stack, std::ptr::null_mut());
        }
    }
}

/// Runs `code` natively on the host CPU in ring 3, starting from `input`, and returns the
/// registers, the arithmetic flags + DF and the scratch buffer afterwards.
///
/// The snippet is placed at [`CODE_ADDR`] and falls through its end into a jump back to the
/// trampoline. RSP is loaded from `input` like every other GPR; RFLAGS is loaded as
/// `(input.rflags & FLAGS_MASK) | RFLAGS_FIXED`. Calls are serialised process-wide.
///
/// A fault (SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGTRAP) inside the snippet is caught and returned
/// as [`NativeError::Fault`] naming the snippet bytes.
///
/// # Safety
/// The snippet executes with the full privileges of this process. The caller must guarantee
/// that, for the given input registers, it
/// - only writes memory inside the scratch buffer ([`SCRATCH_ADDR`], [`SCRATCH_SIZE`]), which
///   includes the stack, so RSP must point into it with enough room for the snippet's pushes;
/// - leaves the code through its end (no jumps or returns elsewhere, no endless loops), and
///   neither changes segment registers, FS/GS bases, the signal mask, the x87/SSE control state,
///   nor makes system calls;
/// - sets no RFLAGS bits beyond [`FLAGS_MASK`] (TF or AC via `POPF`).
///
/// Faults are caught, so a snippet that faults (e.g. a load outside the scratch buffer or a
/// divide error) is reported rather than crashing, but a stray *write* to other valid memory of
/// the process cannot be detected.
/// [`crate::gen::Program::run_native`] is a safe wrapper for generated programs.
pub unsafe fn run_native(code: &[u8], input: &NativeState) -> Result<NativeState, NativeError> {
    if code.len() > MAX_CODE_LEN {
        return Err(NativeError::CodeTooLarge {
            len: code.len(),
            max: MAX_CODE_LEN,
        });
    }
    if input.scratch.len() != SCRATCH_SIZE {
        return Err(NativeError::ScratchSize {
            len: input.scratch.len(),
            expected: SCRATCH_SIZE,
        });
    }
    let mut arena = ARENA.lock().unwrap_or_else(|e| e.into_inner());
    if arena.is_none() {
        *arena = Some(Arena::create()?);
    }
    let arena = arena.as_mut().expect("arena created above");

    protect_code(libc::PROT_READ | libc::PROT_WRITE)?;
    // SAFETY: the code mapping is ours, writable now, and CODE_SIZE bytes long; the snippet
    // plus tail fits (checked above).
    unsafe {
        let base = CODE_ADDR as *mut u8;
        std::ptr::write_bytes(base, 0xCC, CODE_SIZE);
        std::ptr::copy_nonoverlapping(code.as_ptr(), base, code.len());
        let tail = base.add(code.len());
        let mut t = [0u8; TAIL_LEN];
        t[..6].copy_from_slice(&[0xFF, 0x25, 0, 0, 0, 0]);
        t[6..].copy_from_slice(&(exit as *const () as usize as u64).to_le_bytes());
        std::ptr::copy_nonoverlapping(t.as_ptr(), tail, TAIL_LEN);
    }
    protect_code(libc::PROT_READ | libc::PROT_EXEC)?;

    // SAFETY: the scratch mapping and the control page are ours, mapped read/write, and only
    // this thread (holding the ARENA lock) touches them.
    unsafe {
        std::ptr::copy_nonoverlapping(
            input.scratch.as_ptr(),
            SCRATCH_ADDR as *mut u8,
            SCRATCH_SIZE,
        );
        let ctl = CTL_ADDR as *mut Ctl;
        std::ptr::write_bytes(ctl, 0, 1);
        std::ptr::write_volatile(&raw mut (*ctl).in_gpr, input.gpr);
        std::ptr::write_volatile(
            &raw mut (*ctl).in_rflags,
            (input.rflags & FLAGS_MASK) | RFLAGS_FIXED,
        );
        std::ptr::write_volatile(&raw mut (*ctl).entry, CODE_ADDR);
    }

    let guard = Guard::install(&mut arena.altstack)?;
    ACTIVE_TID.store(gettid(), Ordering::SeqCst);
    compiler_fence(Ordering::SeqCst);
    // SAFETY: the control page, code (with tail) and scratch are set up above; the caller
    // guarantees the snippet's behaviour (see the function's safety contract); faults resume
    // through `fault_resume`, which restores the callee-saved registers like a normal return.
    let status = unsafe { enter() };
    compiler_fence(Ordering::SeqCst);
    ACTIVE_TID.store(0, Ordering::SeqCst);
    drop(guard);

    // SAFETY: as above; the snippet has finished.
    unsafe {
        let ctl = CTL_ADDR as *const Ctl;
        if status != 0 {
            return Err(NativeError::Fault {
                signo: std::ptr::read_volatile(&raw const (*ctl).fault_signo) as i32,
                rip: std::ptr::read_volatile(&raw const (*ctl).fault_rip),
                addr: std::ptr::read_volatile(&raw const (*ctl).fault_addr),
                code: code.to_vec(),
            });
        }
        let mut scratch = vec![0u8; SCRATCH_SIZE];
        std::ptr::copy_nonoverlapping(
            SCRATCH_ADDR as *const u8,
            scratch.as_mut_ptr(),
            SCRATCH_SIZE,
        );
        Ok(NativeState {
            gpr: std::ptr::read_volatile(&raw const (*ctl).out_gpr),
            rflags: std::ptr::read_volatile(&raw const (*ctl).out_rflags) & FLAGS_MASK,
            scratch,
        })
    }
}

fn signal_name(signo: i32) -> &'static str {
    match signo {
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGBUS => "SIGBUS",
        libc::SIGILL => "SIGILL",
        libc::SIGFPE => "SIGFPE",
        libc::SIGTRAP => "SIGTRAP",
        _ => "an unexpected signal",
    }
}

/// Lower-case hex of `bytes`, space separated.
pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 3);
    for (i, b) in bytes.iter().enumerate() {
        if i > 0 {
            s.push(' ');
        }
        let _ = write!(s, "{b:02x}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::STACK_TOP;
    use esvm_arch::bits::rflags::{AF, CF, DF, OF, PF, SF, ZF};
    use esvm_arch::Gpr::*;

    fn run(code: &[u8], input: &NativeState) -> NativeState {
        // SAFETY: the test snippets below only touch registers, the scratch buffer and the
        // private stack (RSP = STACK_TOP), and fall through their end.
        unsafe { run_native(code, input) }.unwrap()
    }

    #[test]
    fn add_with_carry_out() {
        let mut s = NativeState::new();
        s.set(Rax, u64::MAX);
        s.set(Rbx, 2);
        let out = run(&[0x48, 0x01, 0xD8], &s); // add rax, rbx
        assert_eq!(out.get(Rax), 1);
        assert_eq!(out.get(Rbx), 2);
        assert_eq!(out.rflags & (CF | ZF | SF | OF), CF);
        assert_eq!(out.rflags & AF, AF); // 0xF + 0x2 carries out of bit 3
    }

    #[test]
    fn adc_uses_input_carry_and_other_registers_survive() {
        let mut s = NativeState::new();
        for (i, g) in s.gpr.iter_mut().enumerate() {
            *g = 0x1111_1111_1111_1111u64.wrapping_mul(i as u64);
        }
        s.set(Rsp, STACK_TOP);
        s.rflags = CF;
        let out = run(&[0x4C, 0x11, 0xF9], &s); // adc rcx, r15
        let mut expect = s.gpr;
        expect[Rcx as usize] = s.get(Rcx).wrapping_add(s.get(R15)).wrapping_add(1);
        assert_eq!(out.gpr, expect);
    }

    #[test]
    fn imul_two_operand_overflow() {
        let mut s = NativeState::new();
        s.set(Rax, 0x4000_0000_0000_0000);
        s.set(Rcx, 4);
        let out = run(&[0x48, 0x0F, 0xAF, 0xC1], &s); // imul rax, rcx
        assert_eq!(out.get(Rax), 0);
        assert_eq!(out.rflags & (CF | OF), CF | OF);
        s.set(Rax, 7);
        s.set(Rcx, (-3i64) as u64);
        let out = run(&[0x48, 0x0F, 0xAF, 0xC1], &s);
        assert_eq!(out.get(Rax), (-21i64) as u64);
        assert_eq!(out.rflags & (CF | OF), 0);
    }

    #[test]
    fn rep_stosb_fills_scratch_and_respects_df() {
        let mut s = NativeState::new();
        s.set(Rdi, SCRATCH_ADDR + 0x100);
        s.set(Rcx, 16);
        s.set(Rax, 0xAB);
        let out = run(&[0xF3, 0xAA], &s); // rep stosb
        assert_eq!(out.get(Rcx), 0);
        assert_eq!(out.get(Rdi), SCRATCH_ADDR + 0x110);
        assert!(out.scratch[0x100..0x110].iter().all(|&b| b == 0xAB));
        assert_eq!(out.scratch[0xFF], 0);
        assert_eq!(out.scratch[0x110], 0);

        s.rflags = DF;
        let out = run(&[0xF3, 0xAA], &s);
        assert_eq!(out.get(Rdi), SCRATCH_ADDR + 0xF0);
        assert!(out.scratch[0xF1..=0x100].iter().all(|&b| b == 0xAB));
        assert_eq!(out.scratch[0xF0], 0);
        assert_eq!(out.rflags & DF, DF);
    }

    #[test]
    fn pushfq_pop_sees_fixed_bits_and_stack_is_in_scratch() {
        let mut s = NativeState::new();
        s.rflags = CF | PF | ZF | SF | OF | AF;
        let out = run(&[0x9C, 0x58], &s); // pushfq; pop rax
        assert_eq!(out.get(Rax), s.rflags | RFLAGS_FIXED);
        assert_eq!(out.get(Rsp), STACK_TOP);
        let off = (STACK_TOP - 8 - SCRATCH_ADDR) as usize;
        let pushed = u64::from_le_bytes(out.scratch[off..off + 8].try_into().unwrap());
        assert_eq!(pushed, s.rflags | RFLAGS_FIXED);
    }

    #[test]
    fn popf_sets_flags_and_df() {
        let mut s = NativeState::new();
        s.set(Rbx, DF | CF | OF);
        let out = run(&[0x53, 0x9D], &s); // push rbx; popfq
        assert_eq!(out.rflags, DF | CF | OF);
    }

    #[test]
    fn fault_is_reported_not_fatal() {
        let mut s = NativeState::new();
        s.set(Rax, 0x10); // unmapped low page
        let code = [0x48, 0x8B, 0x00]; // mov rax, [rax]
                                       // SAFETY: the snippet only reads (and faults); nothing is written.
        let err = unsafe { run_native(&code, &s) }.unwrap_err();
        match &err {
            NativeError::Fault {
                signo, rip, addr, ..
            } => {
                assert_eq!(*signo, libc::SIGSEGV);
                assert_eq!(*rip, CODE_ADDR);
                assert_eq!(*addr, 0x10);
            }
            e => panic!("unexpected error {e}"),
        }
        assert!(err.to_string().contains("48 8b 00"), "{err}");
        // Division by zero and ud2 are caught too, and the runner keeps working afterwards.
        // SAFETY: `div rcx` with RCX = 0 faults before writing anything.
        let err = unsafe { run_native(&[0x48, 0xF7, 0xF1], &NativeState::new()) }.unwrap_err();
        assert!(matches!(err, NativeError::Fault { signo, .. } if signo == libc::SIGFPE));
        // SAFETY: `ud2` faults without touching anything.
        let err = unsafe { run_native(&[0x0F, 0x0B], &NativeState::new()) }.unwrap_err();
        assert!(matches!(err, NativeError::Fault { signo, .. } if signo == libc::SIGILL));
        let out = run(&[0x48, 0xFF, 0xC0], &NativeState::new()); // inc rax
        assert_eq!(out.get(Rax), 1);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let s = NativeState {
            scratch: vec![0; 10],
            ..NativeState::new()
        };
        // SAFETY: rejected (wrong scratch size) before anything runs.
        let r = unsafe { run_native(&[0x90], &s) };
        assert!(matches!(r, Err(NativeError::ScratchSize { len: 10, .. })));
        let big = vec![0x90; MAX_CODE_LEN + 1];
        // SAFETY: rejected (too long) before anything runs.
        let r = unsafe { run_native(&big, &NativeState::new()) };
        assert!(matches!(r, Err(NativeError::CodeTooLarge { .. })));
        // The largest snippet still fits and runs (a long nop slide).
        let big = vec![0x90; MAX_CODE_LEN];
        assert_eq!(run(&big, &NativeState::new()).get(Rax), 0);
    }

    #[test]
    fn bsf_bsr_with_zero_source_leave_the_destination_unchanged_on_amd() {
        let v = core::arch::x86_64::__cpuid(0);
        let vendor: Vec<u8> = [v.ebx, v.edx, v.ecx]
            .iter()
            .flat_map(|r| r.to_le_bytes())
            .collect();
        if vendor != b"AuthenticAMD" {
            println!("skipped: the rule is documented by AMD; this host is not an AMD CPU");
            return;
        }
        // bsf/bsr rax,rbx / eax,ebx / ax,bx with rbx = 0: RAX keeps all 64 bits (the 32-bit
        // form does not zero-extend), ZF is set.
        let codes: [&[u8]; 6] = [
            &[0x48, 0x0F, 0xBC, 0xC3],
            &[0x0F, 0xBC, 0xC3],
            &[0x66, 0x0F, 0xBC, 0xC3],
            &[0x48, 0x0F, 0xBD, 0xC3],
            &[0x0F, 0xBD, 0xC3],
            &[0x66, 0x0F, 0xBD, 0xC3],
        ];
        for code in codes {
            let mut s = NativeState::new();
            s.set(Rax, 0x1234_5678_9ABC_DEF0);
            let out = run(code, &s);
            assert_eq!(out.get(Rax), 0x1234_5678_9ABC_DEF0, "{}", hex(code));
            assert_eq!(out.rflags & ZF, ZF);
        }
    }

    #[test]
    fn threads_are_serialised() {
        let hs: Vec<_> = (0..4u64)
            .map(|t| {
                std::thread::spawn(move || {
                    for i in 0..200u64 {
                        let mut s = NativeState::new();
                        s.set(Rax, t * 1000 + i);
                        let out = run(&[0x48, 0xFF, 0xC0], &s); // inc rax
                        assert_eq!(out.get(Rax), t * 1000 + i + 1);
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
    }
}
