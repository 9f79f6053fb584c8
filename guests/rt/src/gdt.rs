//! The guest's own GDT and TSS.
//!
//! Selectors (same layout as the loader's GDT, plus a TSS):
//! 0x08 kernel code (64-bit, DPL 0), 0x10 kernel data, 0x18 user data (DPL 3),
//! 0x20 user code (64-bit, DPL 3), 0x28 the 64-bit TSS (two slots).
//! This order is what SYSCALL/SYSRET need with STAR = (0x10 << 48) | (0x08 << 32).
//!
//! The TSS provides RSP0 (the stack for interrupts arriving in ring 3) and IST1 (a
//! separate stack for #DF, so a double fault caused by a bad stack is still handled).

use crate::x86::{lgdt, DescriptorPointer};
use crate::Racy;
use core::arch::asm;
use esvm_abi::boot::GDT_ENTRIES;

pub use esvm_abi::boot::{KERNEL_CS, KERNEL_DS, USER_CS, USER_DS};
/// The TSS selector.
pub const TSS_SEL: u16 = 0x28;
/// IST slot used for #DF.
pub const IST_DOUBLE_FAULT: u8 = 1;

const STACK_SIZE: usize = 32 * 1024;

#[repr(C, align(16))]
pub(crate) struct Stack(pub(crate) [u8; STACK_SIZE]);

/// Stack for entries from ring 3 (TSS.RSP0) and SYSCALL.
pub(crate) static RING0_STACK: Racy<Stack> = Racy::new(Stack([0; STACK_SIZE]));
/// Stack for #DF (TSS.IST1).
pub(crate) static DF_STACK: Racy<Stack> = Racy::new(Stack([0; STACK_SIZE]));

/// The 64-bit TSS. `packed(4)` puts RSP0 at offset 4 as the hardware format requires.
#[repr(C, packed(4))]
struct Tss {
    _reserved0: u32,
    rsp: [u64; 3],
    _reserved1: u64,
    ist: [u64; 7],
    _reserved2: u64,
    _reserved3: u16,
    iomap_base: u16,
}
const _: () = assert!(core::mem::size_of::<Tss>() == 104);

static TSS: Racy<Tss> = Racy::new(Tss {
    _reserved0: 0,
    rsp: [0; 3],
    _reserved1: 0,
    ist: [0; 7],
    _reserved2: 0,
    _reserved3: 0,
    // At or beyond the limit: no I/O permission bitmap (IOPL alone decides).
    iomap_base: 104,
});

#[repr(C, align(16))]
struct Gdt([u64; 7]);

/// The loader's five descriptors (`esvm_abi::boot::GDT_ENTRIES`), then the TSS.
static GDT: Racy<Gdt> = Racy::new(Gdt([
    GDT_ENTRIES[0],
    GDT_ENTRIES[1], // 0x08 kernel code: P, DPL0, code exec/read accessed, L, G
    GDT_ENTRIES[2], // 0x10 kernel data: P, DPL0, data r/w accessed, D/B, G
    GDT_ENTRIES[3], // 0x18 user data: P, DPL3
    GDT_ENTRIES[4], // 0x20 user code: P, DPL3, L
    0,              // 0x28 TSS low, filled in by init()
    0,              // 0x30 TSS high
]));

fn stack_top(s: &Racy<Stack>) -> u64 {
    s.get() as u64 + STACK_SIZE as u64
}

/// Top of the RSP0 stack.
pub fn ring0_stack_top() -> u64 {
    stack_top(&RING0_STACK)
}

/// Bounds `[bottom, top)` of the #DF (IST1) stack.
pub fn df_stack_bounds() -> (u64, u64) {
    (DF_STACK.get() as u64, stack_top(&DF_STACK))
}

/// Sets TSS.RSP0 (the stack used when an interrupt or exception arrives in ring 3).
pub fn set_rsp0(top: u64) {
    // SAFETY: single vCPU; the TSS is only read by the CPU on a privilege change, which
    // cannot happen while ring-0 code runs this.
    unsafe { core::ptr::addr_of_mut!((*TSS.get()).rsp[0]).write_unaligned(top) }
}

/// Reads TSS.RSP0.
pub fn rsp0() -> u64 {
    // SAFETY: plain read of the static TSS.
    unsafe { core::ptr::addr_of!((*TSS.get()).rsp[0]).read_unaligned() }
}

/// Sets TSS.IST`n` (n in 1..=7).
pub fn set_ist(n: u8, top: u64) {
    let i = usize::from(n.clamp(1, 7) - 1);
    // SAFETY: as for set_rsp0.
    unsafe { core::ptr::addr_of_mut!((*TSS.get()).ist[i]).write_unaligned(top) }
}

/// Builds and loads the GDT and TSS, reloads all segment registers.
pub fn init() {
    set_rsp0(ring0_stack_top());
    set_ist(IST_DOUBLE_FAULT, stack_top(&DF_STACK));
    let base = TSS.get() as u64;
    let limit = (core::mem::size_of::<Tss>() - 1) as u64;
    // Available 64-bit TSS (type 9), present, DPL 0.
    let low = (limit & 0xFFFF)
        | ((base & 0xFF_FFFF) << 16)
        | (0x89 << 40)
        | (((limit >> 16) & 0xF) << 48)
        | (((base >> 24) & 0xFF) << 56);
    let high = base >> 32;
    let gdt = GDT.get();
    // SAFETY: single vCPU, the GDT is not yet loaded or only read by the CPU on selector
    // loads; after LGDT, the selectors in use point at identical descriptors.
    unsafe {
        (*gdt).0[5] = low;
        (*gdt).0[6] = high;
        let ptr = DescriptorPointer {
            limit: (7 * 8 - 1) as u16,
            base: gdt as u64,
        };
        lgdt(&ptr);
        asm!(
            // Reload CS with a far return, then the data segments and TR.
            "push {cs}",
            "lea {tmp}, [rip + 2f]",
            "push {tmp}",
            "retfq",
            "2:",
            "mov ds, {ds:x}",
            "mov es, {ds:x}",
            "mov ss, {ds:x}",
            "mov fs, {ds:x}",
            "mov gs, {ds:x}",
            "ltr {tss:x}",
            cs = in(reg) u64::from(KERNEL_CS),
            ds = in(reg) u64::from(KERNEL_DS),
            tss = in(reg) u64::from(TSS_SEL),
            tmp = out(reg) _,
        );
    }
}

/// On an application processor (see [`crate::smp`]): loads the GDT the BSP built and
/// reloads the segment registers, but not TR — the TSS descriptor is busy (the BSP's), so
/// LTR would fault. An AP thus has no RSP0/IST stacks: it must stay in ring 0 and must not
/// take a #DF.
pub fn load_on_ap() {
    let gdt = GDT.get();
    let ptr = DescriptorPointer {
        limit: (7 * 8 - 1) as u16,
        base: gdt as u64,
    };
    // SAFETY: the GDT is a static the BSP filled in before starting any AP; the selectors
    // loaded below point at the same descriptors the AP's trampoline used.
    unsafe {
        lgdt(&ptr);
        asm!(
            "push {cs}",
            "lea {tmp}, [rip + 2f]",
            "push {tmp}",
            "retfq",
            "2:",
            "mov ds, {ds:x}",
            "mov es, {ds:x}",
            "mov ss, {ds:x}",
            "mov fs, {ds:x}",
            "mov gs, {ds:x}",
            cs = in(reg) u64::from(KERNEL_CS),
            ds = in(reg) u64::from(KERNEL_DS),
            tmp = out(reg) _,
        );
    }
}
