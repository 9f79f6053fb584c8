//! Thin wrappers around privileged x86-64 instructions: port I/O, control registers,
//! MSRs, flags, descriptor-table loads, TLB maintenance, the time-stamp counter.

use core::arch::asm;

/// IA32_EFER.
pub const MSR_EFER: u32 = 0xC000_0080;
/// SYSCALL target selectors.
pub const MSR_STAR: u32 = 0xC000_0081;
/// 64-bit SYSCALL entry point.
pub const MSR_LSTAR: u32 = 0xC000_0082;
/// RFLAGS bits cleared on SYSCALL.
pub const MSR_SFMASK: u32 = 0xC000_0084;
/// FS base.
pub const MSR_FS_BASE: u32 = 0xC000_0100;
/// GS base (the active one).
pub const MSR_GS_BASE: u32 = 0xC000_0101;
/// The GS base SWAPGS exchanges with [`MSR_GS_BASE`].
pub const MSR_KERNEL_GS_BASE: u32 = 0xC000_0102;

/// EFER.SCE (SYSCALL enable).
pub const EFER_SCE: u64 = 1 << 0;
/// EFER.LME.
pub const EFER_LME: u64 = 1 << 8;
/// EFER.LMA.
pub const EFER_LMA: u64 = 1 << 10;
/// EFER.NXE.
pub const EFER_NXE: u64 = 1 << 11;

/// CR0.WP (supervisor writes honour read-only pages).
pub const CR0_WP: u64 = 1 << 16;
/// CR0.PG.
pub const CR0_PG: u64 = 1 << 31;

/// RFLAGS.CF.
pub const RFLAGS_CF: u64 = 1 << 0;
/// RFLAGS bit 1, always set.
pub const RFLAGS_FIXED: u64 = 1 << 1;
/// RFLAGS.TF.
pub const RFLAGS_TF: u64 = 1 << 8;
/// RFLAGS.IF.
pub const RFLAGS_IF: u64 = 1 << 9;
/// RFLAGS.DF.
pub const RFLAGS_DF: u64 = 1 << 10;
/// RFLAGS.IOPL = 3.
pub const RFLAGS_IOPL3: u64 = 3 << 12;
/// RFLAGS.AC.
pub const RFLAGS_AC: u64 = 1 << 18;

/// Writes a byte to an I/O port.
#[inline(always)]
pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O has no memory effects visible to Rust; devices are the VMM's.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    }
}

/// Writes a 16-bit word to an I/O port.
#[inline(always)]
pub fn outw(port: u16, value: u16) {
    // SAFETY: as for `outb`.
    unsafe {
        asm!("out dx, ax", in("dx") port, in("ax") value, options(nomem, nostack, preserves_flags))
    }
}

/// Writes a 32-bit word to an I/O port.
#[inline(always)]
pub fn outl(port: u16, value: u32) {
    // SAFETY: as for `outb`.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags))
    }
}

/// Reads a byte from an I/O port.
#[inline(always)]
pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: as for `outb`.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack, preserves_flags))
    }
    v
}

/// Reads a 16-bit word from an I/O port.
#[inline(always)]
pub fn inw(port: u16) -> u16 {
    let v: u16;
    // SAFETY: as for `outb`.
    unsafe {
        asm!("in ax, dx", in("dx") port, out("ax") v, options(nomem, nostack, preserves_flags))
    }
    v
}

/// Reads a 32-bit word from an I/O port.
#[inline(always)]
pub fn inl(port: u16) -> u32 {
    let v: u32;
    // SAFETY: as for `outb`.
    unsafe {
        asm!("in eax, dx", in("dx") port, out("eax") v, options(nomem, nostack, preserves_flags))
    }
    v
}

/// Reads CR0.
#[inline(always)]
pub fn read_cr0() -> u64 {
    let v: u64;
    // SAFETY: reading a control register has no side effects.
    unsafe { asm!("mov {}, cr0", out(reg) v, options(nomem, nostack, preserves_flags)) }
    v
}

/// Writes CR0.
///
/// # Safety
/// The new value must keep paging and protected mode consistent with the current tables.
#[inline(always)]
pub unsafe fn write_cr0(v: u64) {
    // SAFETY: the caller upholds the contract above.
    unsafe { asm!("mov cr0, {}", in(reg) v, options(nostack, preserves_flags)) }
}

/// Reads CR2 (the last page-fault linear address).
#[inline(always)]
pub fn read_cr2() -> u64 {
    let v: u64;
    // SAFETY: reading a control register has no side effects.
    unsafe { asm!("mov {}, cr2", out(reg) v, options(nomem, nostack, preserves_flags)) }
    v
}

/// Writes CR2.
#[inline(always)]
pub fn write_cr2(v: u64) {
    // SAFETY: CR2 is a plain scratch register for the OS.
    unsafe { asm!("mov cr2, {}", in(reg) v, options(nomem, nostack, preserves_flags)) }
}

/// Reads CR3 (the page-table root).
#[inline(always)]
pub fn read_cr3() -> u64 {
    let v: u64;
    // SAFETY: reading a control register has no side effects.
    unsafe { asm!("mov {}, cr3", out(reg) v, options(nomem, nostack, preserves_flags)) }
    v
}

/// Writes CR3, flushing non-global TLB entries.
///
/// # Safety
/// `v` must point to valid page tables that map the running code, stack and data.
#[inline(always)]
pub unsafe fn write_cr3(v: u64) {
    // SAFETY: the caller upholds the contract above.
    unsafe { asm!("mov cr3, {}", in(reg) v, options(nostack, preserves_flags)) }
}

/// Reads CR4.
#[inline(always)]
pub fn read_cr4() -> u64 {
    let v: u64;
    // SAFETY: reading a control register has no side effects.
    unsafe { asm!("mov {}, cr4", out(reg) v, options(nomem, nostack, preserves_flags)) }
    v
}

/// Writes CR4.
///
/// # Safety
/// The new value must be valid for the current mode (PAE stays set in long mode).
#[inline(always)]
pub unsafe fn write_cr4(v: u64) {
    // SAFETY: the caller upholds the contract above.
    unsafe { asm!("mov cr4, {}", in(reg) v, options(nostack, preserves_flags)) }
}

/// Reads CR8 (the task-priority register).
#[inline(always)]
pub fn read_cr8() -> u64 {
    let v: u64;
    // SAFETY: reading a control register has no side effects.
    unsafe { asm!("mov {}, cr8", out(reg) v, options(nomem, nostack, preserves_flags)) }
    v
}

/// Writes CR8 (the task-priority register).
#[inline(always)]
pub fn write_cr8(v: u64) {
    // SAFETY: CR8 only masks interrupt delivery by priority.
    unsafe { asm!("mov cr8, {}", in(reg) v, options(nomem, nostack, preserves_flags)) }
}

/// Reads a model-specific register.
#[inline(always)]
pub fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: reading an MSR the guest knows exists has no memory effects.
    unsafe {
        asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    }
    u64::from(lo) | (u64::from(hi) << 32)
}

/// Writes a model-specific register.
///
/// # Safety
/// Writing MSRs such as EFER or LSTAR changes how the CPU executes; the value must be sane.
#[inline(always)]
pub unsafe fn wrmsr(msr: u32, value: u64) {
    // SAFETY: the caller upholds the contract above.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32,
             options(nostack, preserves_flags))
    }
}

/// Reads RFLAGS.
#[inline(always)]
pub fn rflags() -> u64 {
    let v: u64;
    // SAFETY: pushfq/pop only touch the stack slot they allocate.
    unsafe { asm!("pushfq", "pop {}", out(reg) v, options(nomem, preserves_flags)) }
    v
}

/// Reads the current code selector.
#[inline(always)]
pub fn cs() -> u16 {
    let v: u16;
    // SAFETY: reading a segment selector has no side effects.
    unsafe { asm!("mov {0:x}, cs", out(reg) v, options(nomem, nostack, preserves_flags)) }
    v
}

/// Reads the current stack selector.
#[inline(always)]
pub fn ss() -> u16 {
    let v: u16;
    // SAFETY: reading a segment selector has no side effects.
    unsafe { asm!("mov {0:x}, ss", out(reg) v, options(nomem, nostack, preserves_flags)) }
    v
}

/// Reads RSP.
#[inline(always)]
pub fn rsp() -> u64 {
    let v: u64;
    // SAFETY: copying RSP has no side effects.
    unsafe { asm!("mov {}, rsp", out(reg) v, options(nomem, nostack, preserves_flags)) }
    v
}

/// Disables maskable interrupts.
#[inline(always)]
pub fn cli() {
    // SAFETY: only changes RFLAGS.IF.
    unsafe { asm!("cli", options(nomem, nostack)) }
}

/// Enables maskable interrupts.
#[inline(always)]
pub fn sti() {
    // SAFETY: only changes RFLAGS.IF; handlers must be installed by the caller.
    unsafe { asm!("sti", options(nomem, nostack)) }
}

/// Enables interrupts and halts in one step (no wake-up can be lost between the two).
#[inline(always)]
pub fn sti_hlt() {
    // SAFETY: the instruction after STI runs before any interrupt is taken, so an
    // interrupt arriving in between wakes the HLT instead of being lost.
    unsafe { asm!("sti", "hlt", options(nomem, nostack)) }
}

/// Halts until the next interrupt.
#[inline(always)]
pub fn hlt() {
    // SAFETY: HLT only waits.
    unsafe { asm!("hlt", options(nomem, nostack, preserves_flags)) }
}

/// Invalidates the TLB entry for the page containing `addr`.
#[inline(always)]
pub fn invlpg(addr: u64) {
    // SAFETY: INVLPG only drops a cached translation.
    unsafe { asm!("invlpg [{}]", in(reg) addr, options(nostack, preserves_flags)) }
}

/// Reads the time-stamp counter.
#[inline(always)]
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: RDTSC has no side effects.
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) }
    u64::from(lo) | (u64::from(hi) << 32)
}

/// Executes CPUID for `leaf`/`subleaf`, returning (eax, ebx, ecx, edx).
#[inline(always)]
pub fn cpuid(leaf: u32, subleaf: u32) -> (u32, u32, u32, u32) {
    let (a, b, c, d): (u32, u32, u32, u32);
    // SAFETY: CPUID has no side effects. RBX is reserved by LLVM, so it is saved manually.
    unsafe {
        asm!("mov {t:r}, rbx", "cpuid", "xchg {t:r}, rbx", t = out(reg) b,
             inout("eax") leaf => a, inout("ecx") subleaf => c, out("edx") d,
             options(nomem, nostack, preserves_flags))
    }
    (a, b, c, d)
}

/// A pseudo-descriptor as LGDT/LIDT take it.
#[repr(C, packed)]
pub struct DescriptorPointer {
    /// Table size in bytes minus one.
    pub limit: u16,
    /// Linear address of the table.
    pub base: u64,
}

/// Loads the IDT register.
///
/// # Safety
/// The table must stay valid while it is installed.
#[inline(always)]
pub unsafe fn lidt(ptr: &DescriptorPointer) {
    // SAFETY: the caller upholds the contract above.
    unsafe { asm!("lidt [{}]", in(reg) ptr, options(readonly, nostack, preserves_flags)) }
}

/// Loads the GDT register.
///
/// # Safety
/// The table must stay valid while it is installed and hold the selectors in use.
#[inline(always)]
pub unsafe fn lgdt(ptr: &DescriptorPointer) {
    // SAFETY: the caller upholds the contract above.
    unsafe { asm!("lgdt [{}]", in(reg) ptr, options(readonly, nostack, preserves_flags)) }
}

/// Stores the IDT register.
pub fn sidt() -> (u16, u64) {
    let mut p = DescriptorPointer { limit: 0, base: 0 };
    // SAFETY: SIDT writes 10 bytes into `p`.
    unsafe { asm!("sidt [{}]", in(reg) &mut p, options(nostack, preserves_flags)) }
    (p.limit, p.base)
}

/// Stores the GDT register.
pub fn sgdt() -> (u16, u64) {
    let mut p = DescriptorPointer { limit: 0, base: 0 };
    // SAFETY: SGDT writes 10 bytes into `p`.
    unsafe { asm!("sgdt [{}]", in(reg) &mut p, options(nostack, preserves_flags)) }
    (p.limit, p.base)
}
