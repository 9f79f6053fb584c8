//! The IDT: 256 64-bit interrupt gates whose assembly stubs push a uniform
//! [`InterruptFrame`] and call one Rust dispatcher, which runs the handler registered for
//! the vector, or recovers into an active [`crate::trap::catch`], or reports the
//! unexpected interrupt and exits (status 101).

use crate::gdt::{IST_DOUBLE_FAULT, KERNEL_CS};
use crate::serial::{Dec, Hex};
use crate::x86::{lidt, read_cr2, DescriptorPointer};
use crate::Racy;
use core::sync::atomic::{AtomicUsize, Ordering};

/// Exception vectors.
pub mod vector {
    /// Divide error.
    pub const DE: u8 = 0;
    /// Debug.
    pub const DB: u8 = 1;
    /// Non-maskable interrupt.
    pub const NMI: u8 = 2;
    /// Breakpoint (INT3).
    pub const BP: u8 = 3;
    /// Overflow (INTO).
    pub const OF: u8 = 4;
    /// BOUND range exceeded.
    pub const BR: u8 = 5;
    /// Invalid opcode.
    pub const UD: u8 = 6;
    /// Device not available.
    pub const NM: u8 = 7;
    /// Double fault.
    pub const DF: u8 = 8;
    /// Invalid TSS.
    pub const TS: u8 = 10;
    /// Segment not present.
    pub const NP: u8 = 11;
    /// Stack-segment fault.
    pub const SS: u8 = 12;
    /// General protection.
    pub const GP: u8 = 13;
    /// Page fault.
    pub const PF: u8 = 14;
    /// x87 floating-point error.
    pub const MF: u8 = 16;
    /// Alignment check.
    pub const AC: u8 = 17;
    /// Machine check.
    pub const MC: u8 = 18;
    /// SIMD floating-point exception.
    pub const XM: u8 = 19;
    /// Control protection.
    pub const CP: u8 = 21;
    /// VMM communication exception (SEV-ES).
    pub const VC: u8 = 29;
    /// Security exception.
    pub const SX: u8 = 30;
}

/// Short mnemonic of an exception vector ("#PF"), or "IRQ/INT" for the rest.
pub fn vector_name(v: u64) -> &'static str {
    const NAMES: [&str; 32] = [
        "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "#CSO", "#TS", "#NP", "#SS",
        "#GP", "#PF", "#15", "#MF", "#AC", "#MC", "#XM", "#VE", "#CP", "#22", "#23", "#24", "#25",
        "#26", "#27", "#HV", "#VC", "#SX", "#31",
    ];
    NAMES.get(v as usize).copied().unwrap_or("INT")
}

/// Register state saved by the interrupt stubs, lowest address first. Handlers may
/// modify it; the stub restores all of it and returns with IRETQ.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct InterruptFrame {
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
    /// Interrupt vector.
    pub vector: u64,
    /// Error code pushed by the CPU, or 0 for vectors without one.
    pub error_code: u64,
    /// Hardware frame.
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

/// A handler for one vector.
pub type Handler = fn(&mut InterruptFrame);

static HANDLERS: [AtomicUsize; 256] = [const { AtomicUsize::new(0) }; 256];

#[repr(C, align(16))]
struct Idt([[u64; 2]; 256]);

static IDT: Racy<Idt> = Racy::new(Idt([[0; 2]; 256]));

// Stubs: one 16-byte slot per vector. Vectors with a CPU error code skip the `push 0`
// (6a 00); `push imm32` (68 imm32) pushes the vector number.
// Frame on entry to the common path: [vector][error][rip][cs][rflags][rsp][ss].
core::arch::global_asm!(
    r#"
    .section .text.esvm_isr,"ax",@progbits
    .balign 16
    .globl esvm_isr_stubs
esvm_isr_stubs:
    .set vec, 0
    .rept 256
    .balign 16
    .if (vec == 8) || ((vec >= 10) && (vec <= 14)) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
    .else
    .byte 0x6a, 0x00
    .endif
    .byte 0x68
    .long vec
    jmp esvm_isr_common
    .set vec, vec + 1
    .endr

esvm_isr_common:
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
    cld
    mov rdi, rsp
    call esvm_rt_isr_dispatch
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
    static esvm_isr_stubs: u8;
}

fn stub_address(vector: u8) -> u64 {
    let base = core::ptr::addr_of!(esvm_isr_stubs) as u64;
    base + 16 * u64::from(vector)
}

fn gate(handler: u64, selector: u16, dpl: u8, ist: u8, trap: bool, present: bool) -> [u64; 2] {
    let kind: u64 = if trap { 0xF } else { 0xE };
    let low = (handler & 0xFFFF)
        | (u64::from(selector) << 16)
        | (u64::from(ist & 7) << 32)
        | (kind << 40)
        | (u64::from(dpl & 3) << 45)
        | (u64::from(present) << 47)
        | (((handler >> 16) & 0xFFFF) << 48);
    [low, handler >> 32]
}

/// Gate options for [`set_gate`].
#[derive(Clone, Copy, Debug)]
pub struct GateOptions {
    /// Descriptor privilege level: the highest CPL allowed to use INT n on this vector.
    pub dpl: u8,
    /// IST slot (0 = none).
    pub ist: u8,
    /// Trap gate (IF stays set) instead of interrupt gate.
    pub trap: bool,
    /// Present bit.
    pub present: bool,
}

impl Default for GateOptions {
    fn default() -> Self {
        GateOptions {
            dpl: 0,
            ist: 0,
            trap: false,
            present: true,
        }
    }
}

/// Rewrites the gate of `vector` to point at its standard stub with `opts`.
pub fn set_gate(vector: u8, opts: GateOptions) {
    set_raw_gate(vector, stub_address(vector), KERNEL_CS, opts);
}

/// Rewrites the gate of `vector` with an arbitrary target (for tests of broken gates).
pub fn set_raw_gate(vector: u8, target: u64, selector: u16, opts: GateOptions) {
    let g = gate(
        target,
        selector,
        opts.dpl,
        opts.ist,
        opts.trap,
        opts.present,
    );
    // SAFETY: single vCPU; each 16-byte gate is written while no interrupt can use it
    // (exceptions are synchronous, and callers keep IF clear while rewriting IRQ gates).
    unsafe { (*IDT.get()).0[usize::from(vector)] = g }
}

/// Registers `h` for `vector` (replacing any previous handler).
pub fn set_handler(vector: u8, h: Handler) {
    HANDLERS[usize::from(vector)].store(h as usize, Ordering::SeqCst);
}

/// Removes the handler of `vector`.
pub fn clear_handler(vector: u8) {
    HANDLERS[usize::from(vector)].store(0, Ordering::SeqCst);
}

/// Loads the runtime's IDT (limit 4095).
pub fn load() {
    let ptr = DescriptorPointer {
        limit: (256 * 16 - 1) as u16,
        base: IDT.get() as u64,
    };
    // SAFETY: the IDT is a static that lives forever.
    unsafe { lidt(&ptr) }
}

/// Fills all 256 gates (DPL 0 interrupt gates; #DF on IST1) and loads the IDT.
pub fn init() {
    for v in 0..=255u8 {
        let ist = if v == crate::idt::vector::DF {
            IST_DOUBLE_FAULT
        } else {
            0
        };
        set_gate(
            v,
            GateOptions {
                ist,
                ..GateOptions::default()
            },
        );
    }
    load();
}

/// Base address and limit of the runtime's IDT.
pub fn idt_base() -> u64 {
    IDT.get() as u64
}

#[no_mangle]
extern "C" fn esvm_rt_isr_dispatch(frame: &mut InterruptFrame) {
    let v = (frame.vector & 0xFF) as usize;
    // CR2 matters for #PF and for a #DF raised while delivering one.
    let cr2 = if v < 32 { read_cr2() } else { 0 };
    let h = HANDLERS[v].load(Ordering::SeqCst);
    if h != 0 {
        // SAFETY: only `Handler` values are ever stored in HANDLERS.
        let f: Handler = unsafe { core::mem::transmute::<usize, Handler>(h) };
        f(frame);
        return;
    }
    if v < 32 && crate::user::fallback(frame) {
        return;
    }
    if v < 32 && crate::trap::recover(frame, cr2) {
        return;
    }
    report_unexpected(frame, cr2);
}

/// Prints an interrupt frame.
pub fn dump_frame(frame: &InterruptFrame, cr2: u64) {
    crate::println!(
        "  vector={} ({}) error={} rip={} cs={} rflags={} rsp={} ss={} cr2={}",
        Dec(frame.vector),
        vector_name(frame.vector),
        Hex(frame.error_code),
        Hex(frame.rip),
        Hex(frame.cs),
        Hex(frame.rflags),
        Hex(frame.rsp),
        Hex(frame.ss),
        Hex(cr2)
    );
    crate::println!(
        "  rax={} rbx={} rcx={} rdx={} rsi={} rdi={} rbp={}",
        Hex(frame.rax),
        Hex(frame.rbx),
        Hex(frame.rcx),
        Hex(frame.rdx),
        Hex(frame.rsi),
        Hex(frame.rdi),
        Hex(frame.rbp)
    );
}

fn report_unexpected(frame: &InterruptFrame, cr2: u64) -> ! {
    crate::println!("FAIL: unexpected interrupt {}", vector_name(frame.vector));
    dump_frame(frame, cr2);
    crate::exit(101)
}
