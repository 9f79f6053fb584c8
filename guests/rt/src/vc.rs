//! The #VC (vector 29) handler of the SEV-ES runtime.
//!
//! Entry: IDT gate 29 points at `esvm_rt_vc_entry` (not the generic stubs) with IST slot
//! [`IST_VC`]. The stub pushes the same [`InterruptFrame`] as the generic stubs, saves the
//! interrupted x87/SSE state with FXSAVE64 (so the handler, and any exception handler it
//! calls, may use SSE registers without corrupting the interrupted code), calls
//! [`esvm_rt_vc_handler`], restores and returns with IRETQ.
//!
//! Nesting: the #VC stack ([`VC_STACK_SIZE`]) is split into [`VC_SLOTS`] slots of
//! [`VC_SLOT_SIZE`]. On entry at depth d the handler moves TSS.IST2 down to slot d, so a #VC
//! raised while it runs (depth d+1) gets a fresh slot instead of overwriting the live
//! frame; on return IST2 moves back. Nothing between the hardware entry and that move can
//! raise #VC (memory accesses to private memory only). A #VC at depth [`VC_SLOTS`] ends
//! the guest (`VC_NESTING`). Each level must fit its slot: the handler itself uses about
//! 1 KiB; exception handlers it calls (for an exception the hypervisor asks for) run on the
//! slot too.
//!
//! What nests safely: anything before the GHCB exists (the early path only uses the
//! stateless MSR protocol), and any #VC raised outside a GHCB transaction (the handler
//! holds the GHCB only between filling it and reading the answer, with interrupts off and
//! no #VC-raising instruction inside). A #VC or exception that needs the GHCB while a
//! transaction is in flight ends the guest (`GHCB_BUSY`): there is no backup GHCB.
//!
//! Before the GHCB exists only CPUID is served (four MSR-protocol requests; ECX is not
//! passed); any other exit code ends the guest (`EARLY_VC_UNSUPPORTED`). Afterwards:
//! CPUID, IOIO (IN/OUT imm8/DX, INS/OUTS with REP through the shared buffer, DF honoured),
//! MSR, VMMCALL, RDTSC, RDTSCP, WBINVD, INVD, MONITOR, MWAIT, DR7 read/write and MMIO
//! (exit code NPF: the MOV/MOVZX forms of `vcdecode`). The instruction at RIP must decode
//! to the form the exit code implies (`VC_DECODE` otherwise). On success RIP moves past
//! the instruction; if the hypervisor asks for an exception, RIP stays and the exception is
//! dispatched as if the instruction had raised it (a registered handler, an active
//! `trap::catch`, or the runtime's "unexpected interrupt" report).

use crate::gdt;
use crate::ghcb::{self, Ghcb};
use crate::idt::{self, GateOptions, InterruptFrame};
use crate::sev::{self, terminate};
use crate::vcdecode::{self, Insn, Io, IoPort, Mmio, MmioOp, Reg};
use crate::Racy;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use esvm_abi::exit_code as ec;
use esvm_abi::ghcb::{ioio, save_area as L, SHARED_BUFFER_SIZE};
use esvm_abi::sev::VC_VECTOR;
use esvm_abi::term;

/// TSS IST slot of the #VC gate.
pub const IST_VC: u8 = 2;
/// Bytes per nesting level.
pub const VC_SLOT_SIZE: usize = 16 * 1024;
/// Nesting levels (the last one only terminates the guest).
pub const VC_SLOTS: usize = 4;
/// The whole #VC stack.
pub const VC_STACK_SIZE: usize = VC_SLOT_SIZE * VC_SLOTS;

#[repr(C, align(64))]
struct VcStack([u8; VC_STACK_SIZE]);

static VC_STACK: Racy<VcStack> = Racy::new(VcStack([0; VC_STACK_SIZE]));
/// Current nesting depth (0 = not in the handler).
static DEPTH: AtomicUsize = AtomicUsize::new(0);
/// #VCs handled.
static COUNT: AtomicU64 = AtomicU64::new(0);

const RFLAGS_DF: u64 = 1 << 10;

fn stack_top() -> u64 {
    VC_STACK.get() as u64 + VC_STACK_SIZE as u64
}

/// Number of #VC exceptions taken so far.
pub fn count() -> u64 {
    COUNT.load(Ordering::Relaxed)
}

core::arch::global_asm!(
    r#"
    .section .text.esvm_vc,"ax",@progbits
    .balign 16
    .globl esvm_rt_vc_entry
esvm_rt_vc_entry:
    push 29
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
    mov rbp, rsp
    sub rsp, 512
    and rsp, -64
    fxsave64 [rsp]
    cld
    mov rdi, rbp
    call esvm_rt_vc_handler
    fxrstor64 [rsp]
    mov rsp, rbp
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
    add rsp, 16
    iretq
"#
);

extern "C" {
    static esvm_rt_vc_entry: u8;
    /// The runtime's interrupt dispatcher (idt.rs): used to raise an exception the
    /// hypervisor asked for, with the #VC's frame.
    fn esvm_rt_isr_dispatch(frame: &mut InterruptFrame);
}

/// Points IDT gate 29 at the #VC entry with its IST stack.
pub(crate) fn install() {
    gdt::set_ist(IST_VC, stack_top());
    idt::set_raw_gate(
        VC_VECTOR,
        core::ptr::addr_of!(esvm_rt_vc_entry) as u64,
        gdt::KERNEL_CS,
        GateOptions {
            ist: IST_VC,
            ..GateOptions::default()
        },
    );
}

#[no_mangle]
extern "C" fn esvm_rt_vc_handler(frame: &mut InterruptFrame) {
    let depth = DEPTH.load(Ordering::Relaxed) + 1;
    if depth >= VC_SLOTS {
        ghcb::msr_terminate(term::SET_ESVM, term::VC_NESTING);
    }
    DEPTH.store(depth, Ordering::Relaxed);
    gdt::set_ist(IST_VC, stack_top() - (depth * VC_SLOT_SIZE) as u64);
    COUNT.fetch_add(1, Ordering::Relaxed);

    handle(frame);

    gdt::set_ist(IST_VC, stack_top() - ((depth - 1) * VC_SLOT_SIZE) as u64);
    DEPTH.store(depth - 1, Ordering::Relaxed);
}

/// GPR `n` (x86 order) of the interrupted context.
fn gpr(f: &InterruptFrame, n: u8) -> u64 {
    match n & 15 {
        0 => f.rax,
        1 => f.rcx,
        2 => f.rdx,
        3 => f.rbx,
        4 => f.rsp,
        5 => f.rbp,
        6 => f.rsi,
        7 => f.rdi,
        8 => f.r8,
        9 => f.r9,
        10 => f.r10,
        11 => f.r11,
        12 => f.r12,
        13 => f.r13,
        14 => f.r14,
        _ => f.r15,
    }
}

fn set_gpr(f: &mut InterruptFrame, n: u8, v: u64) {
    let slot = match n & 15 {
        0 => &mut f.rax,
        1 => &mut f.rcx,
        2 => &mut f.rdx,
        3 => &mut f.rbx,
        4 => &mut f.rsp,
        5 => &mut f.rbp,
        6 => &mut f.rsi,
        7 => &mut f.rdi,
        8 => &mut f.r8,
        9 => &mut f.r9,
        10 => &mut f.r10,
        11 => &mut f.r11,
        12 => &mut f.r12,
        13 => &mut f.r13,
        14 => &mut f.r14,
        _ => &mut f.r15,
    };
    *slot = v;
}

fn fetch(rip: u64) -> [u8; vcdecode::MAX_INSN_LEN] {
    let mut b = [0u8; vcdecode::MAX_INSN_LEN];
    for (i, x) in b.iter_mut().enumerate() {
        // SAFETY: the instruction that raised #VC is mapped at RIP; an instruction is at
        // most 15 bytes and the guest's code is identity-mapped with its neighbours.
        *x = unsafe { ((rip + i as u64) as *const u8).read_volatile() };
    }
    b
}

fn first8(b: &[u8; vcdecode::MAX_INSN_LEN]) -> u64 {
    let mut v = 0u64;
    for (i, &x) in b.iter().take(8).enumerate() {
        v |= u64::from(x) << (8 * i);
    }
    v
}

fn is_supported_exit(code: u64) -> bool {
    matches!(
        code,
        ec::CPUID
            | ec::IOIO
            | ec::MSR
            | ec::VMMCALL
            | ec::RDTSC
            | ec::RDTSCP
            | ec::WBINVD
            | ec::INVD
            | ec::MONITOR
            | ec::MWAIT
            | ec::DR7_READ
            | ec::DR7_WRITE
            | ec::NPF
    )
}

fn handle(frame: &mut InterruptFrame) {
    let code = frame.error_code;
    if !is_supported_exit(code) {
        terminate(term::SET_ESVM, term::VC_UNSUPPORTED_EXIT, code);
    }
    let bytes = fetch(frame.rip);
    let d = match vcdecode::decode(&bytes) {
        Ok(d) if d.insn.matches_exit_code(code) => d,
        _ => terminate(term::SET_ESVM, term::VC_DECODE, first8(&bytes)),
    };
    if !ghcb::ready() {
        early(frame, d.insn);
        frame.rip += d.len as u64;
        return;
    }
    // MMIO: find the guest-physical address before taking the GHCB (a bad address ends
    // the guest with a message).
    let mmio_gpa = match d.insn {
        Insn::Mmio(m) => mmio_target(frame, m, d.len),
        _ => 0,
    };
    let result = {
        let mut g = ghcb::acquire();
        match d.insn {
            Insn::Cpuid => cpuid(&mut g, frame),
            Insn::Io(io) => ioio(&mut g, frame, io),
            Insn::Rdmsr | Insn::Wrmsr => msr(&mut g, frame, d.insn == Insn::Wrmsr),
            Insn::Vmmcall => vmmcall(&mut g, frame),
            Insn::Rdtsc | Insn::Rdtscp => rdtsc(&mut g, frame, d.insn == Insn::Rdtscp),
            Insn::Wbinvd | Insn::Invd => g.call(code, 0, 0),
            Insn::Monitor => {
                g.set(L::RAX, frame.rax);
                g.set(L::RCX, frame.rcx);
                g.set(L::RDX, frame.rdx);
                g.call(code, 0, 0)
            }
            Insn::Mwait => {
                g.set(L::RAX, frame.rax);
                g.set(L::RCX, frame.rcx);
                g.call(code, 0, 0)
            }
            Insn::MovFromDr7 { gpr: n } => g.call(code, 0, 0).map(|()| {
                let v = g.need(L::RAX, code);
                set_gpr(frame, n, v);
            }),
            Insn::MovToDr7 { gpr: n } => {
                g.set(L::RAX, gpr(frame, n));
                g.call(code, 0, 0)
            }
            Insn::Mmio(m) => mmio(&mut g, frame, m, mmio_gpa),
        }
        // The GHCB is released here, before any exception is raised.
    };
    match result {
        Ok(()) => frame.rip += d.len as u64,
        Err(vector) => raise(frame, vector),
    }
}

/// Before the GHCB: only CPUID, through the MSR protocol.
fn early(frame: &mut InterruptFrame, insn: Insn) {
    if insn != Insn::Cpuid {
        ghcb::msr_terminate(term::SET_ESVM, term::EARLY_VC_UNSUPPORTED);
    }
    match ghcb::msr_cpuid(frame.rax as u32) {
        Ok([a, b, c, d]) => {
            frame.rax = u64::from(a);
            frame.rbx = u64::from(b);
            frame.rcx = u64::from(c);
            frame.rdx = u64::from(d);
        }
        Err(_) => ghcb::msr_terminate(term::SET_ESVM, term::BAD_CPUID_RESPONSE),
    }
}

/// Dispatches exception `vector` with the #VC frame (RIP at the instruction).
fn raise(frame: &mut InterruptFrame, vector: u8) {
    frame.vector = u64::from(vector);
    frame.error_code = 0;
    // SAFETY: the dispatcher takes a live interrupt frame; the #VC stub restores from it,
    // so a catch() it resumes into or a handler's changes take effect on IRETQ.
    unsafe { esvm_rt_isr_dispatch(frame) }
}

fn low32(v: u64) -> u64 {
    v & 0xFFFF_FFFF
}

fn cpuid(g: &mut Ghcb, f: &mut InterruptFrame) -> Result<(), u8> {
    let leaf = low32(f.rax);
    g.set(L::RAX, leaf);
    g.set(L::RCX, low32(f.rcx));
    if leaf == 0xD {
        g.set(L::XCR0, xcr0());
    }
    g.call(ec::CPUID, 0, 0)?;
    f.rax = low32(g.need(L::RAX, ec::CPUID));
    f.rbx = low32(g.need(L::RBX, ec::CPUID));
    f.rcx = low32(g.need(L::RCX, ec::CPUID));
    f.rdx = low32(g.need(L::RDX, ec::CPUID));
    Ok(())
}

/// XCR0, or its reset value 1 (x87) when CR4.OSXSAVE is clear (XGETBV would #UD).
fn xcr0() -> u64 {
    if crate::x86::read_cr4() & (1 << 18) == 0 {
        return 1;
    }
    let (lo, hi): (u32, u32);
    // SAFETY: XGETBV with ECX = 0 reads XCR0; OSXSAVE is set so it does not fault.
    unsafe {
        core::arch::asm!("xgetbv", in("ecx") 0u32, out("eax") lo, out("edx") hi,
                         options(nomem, nostack, preserves_flags))
    }
    u64::from(lo) | (u64::from(hi) << 32)
}

fn msr(g: &mut Ghcb, f: &mut InterruptFrame, write: bool) -> Result<(), u8> {
    g.set(L::RCX, low32(f.rcx));
    if write {
        g.set(L::RAX, low32(f.rax));
        g.set(L::RDX, low32(f.rdx));
        return g.call(ec::MSR, 1, 0);
    }
    g.call(ec::MSR, 0, 0)?;
    f.rax = low32(g.need(L::RAX, ec::MSR));
    f.rdx = low32(g.need(L::RDX, ec::MSR));
    Ok(())
}

fn vmmcall(g: &mut Ghcb, f: &mut InterruptFrame) -> Result<(), u8> {
    g.set(L::RAX, f.rax);
    g.set(L::RBX, f.rbx);
    g.set(L::RCX, f.rcx);
    g.set(L::RDX, f.rdx);
    g.set(L::RSI, f.rsi);
    g.set_cpl((f.cs & 3) as u8);
    g.call(ec::VMMCALL, 0, 0)?;
    f.rax = g.need(L::RAX, ec::VMMCALL);
    if let Some(v) = g.get(L::RBX) {
        f.rbx = v;
    }
    if let Some(v) = g.get(L::RCX) {
        f.rcx = v;
    }
    if let Some(v) = g.get(L::RDX) {
        f.rdx = v;
    }
    Ok(())
}

fn rdtsc(g: &mut Ghcb, f: &mut InterruptFrame, rdtscp: bool) -> Result<(), u8> {
    let code = if rdtscp { ec::RDTSCP } else { ec::RDTSC };
    g.call(code, 0, 0)?;
    f.rax = low32(g.need(L::RAX, code));
    f.rdx = low32(g.need(L::RDX, code));
    if rdtscp {
        f.rcx = low32(g.need(L::RCX, code));
    }
    Ok(())
}

fn ioio(g: &mut Ghcb, f: &mut InterruptFrame, io: Io) -> Result<(), u8> {
    let port = match io.port {
        IoPort::Imm(p) => u16::from(p),
        IoPort::Dx => f.rdx as u16,
    };
    let addr_bits = if io.addr32 { 32 } else { 64 };
    let info1 = ioio::exit_info1(port, io.size, io.is_in, io.string, io.rep, addr_bits);
    let acc = Reg {
        num: 0,
        high8: false,
    };
    if !io.string {
        if io.is_in {
            g.call(ec::IOIO, info1, 0)?;
            let v = g.need(L::RAX, ec::IOIO);
            f.rax = acc.write(f.rax, io.size, v);
        } else {
            g.set(L::RAX, acc.read(f.rax, io.size));
            g.call(ec::IOIO, info1, 0)?;
        }
        return Ok(());
    }

    // INS/OUTS: up to 2032 bytes per request through the shared buffer.
    let amask = if io.addr32 { 0xFFFF_FFFF } else { u64::MAX };
    let size = u64::from(io.size);
    let per_call = (SHARED_BUFFER_SIZE as u64) / size;
    let down = f.rflags & RFLAGS_DF != 0;
    let mut remaining = if io.rep { f.rcx & amask } else { 1 };
    let step = |addr: u64, bytes: u64| -> u64 {
        (if down {
            addr.wrapping_sub(bytes)
        } else {
            addr.wrapping_add(bytes)
        }) & amask
    };
    while remaining > 0 {
        let n = remaining.min(per_call);
        g.reset();
        let scratch = g.buffer_gpa();
        g.set(L::SW_SCRATCH, scratch);
        let mut elem = [0u8; 4];
        if io.is_in {
            g.call(ec::IOIO, info1, n)?;
            let mut addr = f.rdi & amask;
            for k in 0..n {
                g.read_buffer((k * size) as usize, &mut elem[..io.size as usize]);
                for (j, &b) in elem[..io.size as usize].iter().enumerate() {
                    // SAFETY: INS writes the guest's own (identity-mapped) destination
                    // buffer, as the instruction would have.
                    unsafe { ((addr + j as u64) as *mut u8).write_volatile(b) };
                }
                addr = step(addr, size);
            }
            f.rdi = addr;
        } else {
            let mut addr = f.rsi & amask;
            for k in 0..n {
                for (j, b) in elem[..io.size as usize].iter_mut().enumerate() {
                    // SAFETY: OUTS reads the guest's own (identity-mapped) source buffer.
                    *b = unsafe { ((addr + j as u64) as *const u8).read_volatile() };
                }
                g.write_buffer((k * size) as usize, &elem[..io.size as usize]);
                addr = step(addr, size);
            }
            g.call(ec::IOIO, info1, n)?;
            f.rsi = addr;
        }
        remaining -= n;
        if io.rep {
            f.rcx = remaining;
        }
    }
    Ok(())
}

/// The guest-physical address of an MMIO access: it must lie in one page mapped shared
/// (C-bit clear); anything else ends the guest (`MMIO_UNSUPPORTED`, info = the address).
fn mmio_target(f: &InterruptFrame, m: Mmio, len: usize) -> u64 {
    let next_rip = f.rip + len as u64;
    let va = m.mem.effective_address(|n| gpr(f, n), next_rip);
    if (va & 0xFFF) + u64::from(m.size) > 0x1000 {
        terminate(term::SET_ESVM, term::MMIO_UNSUPPORTED, va);
    }
    match sev::translate(va) {
        Some(t) if !t.encrypted => t.phys,
        _ => terminate(term::SET_ESVM, term::MMIO_UNSUPPORTED, va),
    }
}

fn mmio(g: &mut Ghcb, f: &mut InterruptFrame, m: Mmio, gpa: u64) -> Result<(), u8> {
    let size = u64::from(m.size);
    let scratch = g.buffer_gpa();
    g.set(L::SW_SCRATCH, scratch);
    match m.op {
        MmioOp::StoreReg(_) | MmioOp::StoreImm(_) => {
            let value = match m.op {
                MmioOp::StoreReg(r) => r.read(gpr(f, r.num), m.size),
                MmioOp::StoreImm(v) => v,
                MmioOp::Load { .. } => 0,
            };
            g.write_buffer(0, &value.to_le_bytes()[..m.size as usize]);
            g.call(ec::MMIO_WRITE, gpa, size)
        }
        MmioOp::Load { dst, dst_size } => {
            g.call(ec::MMIO_READ, gpa, size)?;
            let mut b = [0u8; 8];
            g.read_buffer(0, &mut b[..m.size as usize]);
            let value = u64::from_le_bytes(b);
            let old = gpr(f, dst.num);
            set_gpr(f, dst.num, dst.write(old, dst_size, value));
            Ok(())
        }
    }
}
