//! Application processors (APs): how many CPUs the machine has and how to start them.
//!
//! **How many.** [`cpu_count`] reads CPUID: leaf 0xB (x2APIC topology; the core level's
//! EBX[15:0] counts the logical processors of the package), else leaf 1 EBX[23:16] when
//! the HTT bit says it is valid, else 1. CPUID rather than the ACPI MADT: the loader
//! writes ACPI tables only for a Linux boot (esvm's own boot stack covers the BIOS area),
//! CPUID works in every mode, and esvm's CPUID advertises a topology exactly where its
//! APs can be started by INIT-SIPI-SIPI (plain guests on the emu backend). Elsewhere (KVM,
//! SEV-ES today) it says 1, and `BootInfo::vcpus` then counts vCPUs that stay parked.
//!
//! **Starting them.** [`start_aps`] copies a small real-mode trampoline to
//! [`TRAMPOLINE_ADDR`] (0x8000, a page the esvm convention leaves free below 1 MiB: an AP
//! starts in real mode at `vector << 12`, so the code must sit below 1 MiB on a 4 KiB
//! boundary) and starts the APs one after the other through the BSP's xAPIC ICR: INIT
//! (assert, then de-assert), SIPI, SIPI, polling the delivery status before each write.
//! The trampoline is written in assembly because it runs in 16-bit real mode and 32-bit
//! protected mode, which Rust cannot generate: it loads its own GDT, enters protected
//! mode, loads the BSP's CR4, CR3 (the boot page tables) and EFER, enables paging (long
//! mode), and jumps to 64-bit Rust code on the stack the BSP allocated for that AP. There
//! the AP loads the runtime's GDT (without its TSS: the BSP's TR owns it) and IDT, checks
//! in and runs the guest's AP function. An AP never returns: after its function it halts
//! with interrupts off.
//!
//! The architectural delays (10 ms after INIT, 200 us after a SIPI) are short PAUSE loops
//! here: esvm's APIC delivers at once.
//!
//! **SEV-ES** (reached once esvm's SEV-ES machines advertise their APs; until then they
//! advertise one CPU and the guest runs on its boot vCPU): the hypervisor cannot set an AP's registers, so before the SIPIs the
//! BSP asks for the AP jump table through the GHCB (AP_JUMP_TABLE GET; SET of a page of its
//! own when none is registered, as firmware would) and writes the trampoline's IP and CS
//! there; a released AP continues in real mode at that CS:IP, then as above. The IPIs go
//! through the x2APIC MSRs (#VC, GHCB) instead of the xAPIC page, which would need a shared
//! (C-bit clear) mapping. The AP code
//! causes no #VC (no CPUID, port I/O or intercepted MSR), as it has no GHCB of its own; a
//! protected guest without GHCB support gets [`ApError::ProtectedState`].

use crate::x86::{rdmsr, read_cr0, read_cr3, read_cr4};
use core::arch::global_asm;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Where the trampoline is copied: SIPI vector `TRAMPOLINE_ADDR >> 12`.
pub const TRAMPOLINE_ADDR: u64 = 0x8000;
/// The SIPI vector that starts an AP at [`TRAMPOLINE_ADDR`].
pub const SIPI_VECTOR: u8 = (TRAMPOLINE_ADDR >> 12) as u8;
/// SEV-ES: the AP jump table this guest registers when none is (a page the esvm boot
/// convention leaves free below 1 MiB).
pub const SEV_JUMP_TABLE_ADDR: u64 = 0x7000;
/// Stack of each AP.
pub const AP_STACK_PAGES: u64 = 4;
/// How many PAUSE rounds the BSP waits for an AP to check in before giving up.
pub const CHECK_IN_SPINS: u64 = 20_000_000;

const LAPIC_BASE: u64 = esvm_abi::layout::LAPIC_ADDR;
const LAPIC_SVR: u64 = 0xF0;
const LAPIC_ICR_LO: u64 = 0x300;
const LAPIC_ICR_HI: u64 = 0x310;
const ICR_DELIVERY_PENDING: u32 = 1 << 12;
const ICR_INIT_ASSERT: u32 = (5 << 8) | (1 << 14) | (1 << 15);
const ICR_INIT_DEASSERT: u32 = (5 << 8) | (1 << 15);
const ICR_SIPI: u32 = 6 << 8;
const MSR_EFER: u32 = 0xC000_0080;
const IA32_APIC_BASE: u32 = 0x1B;
const APIC_BASE_EN: u64 = 1 << 11;
const APIC_BASE_EXTD: u64 = 1 << 10;
const X2APIC_SVR: u32 = 0x80F;
const X2APIC_ICR: u32 = 0x830;
const EFER_LMA: u64 = 1 << 10;
const CR4_PCIDE: u64 = 1 << 17;

/// Why the APs could not be started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApError {
    /// The guest runs with protected state (SEV-ES): APs start through the AP jump table.
    ProtectedState,
    /// No memory for an AP's stack.
    OutOfMemory,
    /// AP `cpu` (APIC ID) did not check in within [`CHECK_IN_SPINS`] rounds.
    NoCheckIn {
        /// The AP's APIC ID (= CPU index).
        cpu: u32,
    },
    /// The ICR kept its delivery-status bit set.
    IcrBusy,
    /// More CPUs than the xAPIC can address (255).
    TooMany,
    /// SEV-ES: AP_JUMP_TABLE failed, or named an unusable page.
    JumpTable,
}

impl core::fmt::Display for ApError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ApError::ProtectedState => f.write_str(
                "a protected-state (SEV-ES) guest starts its APs through the GHCB AP jump table, not by INIT-SIPI-SIPI",
            ),
            ApError::OutOfMemory => f.write_str("no memory left for an AP stack"),
            ApError::NoCheckIn { cpu } => write!(
                f,
                "AP {} did not check in after INIT-SIPI-SIPI",
                crate::Dec(u64::from(*cpu))
            ),
            ApError::IcrBusy => f.write_str("the local APIC's ICR stayed busy (delivery pending)"),
            ApError::TooMany => f.write_str("more than 255 CPUs: the xAPIC cannot address them"),
            ApError::JumpTable => f.write_str(
                "SEV-ES: AP_JUMP_TABLE through the GHCB failed or named an unusable page",
            ),
        }
    }
}

/// The number of CPUs CPUID advertises (see the module documentation).
pub fn cpu_count() -> u32 {
    let (max, _, _, _) = crate::x86::cpuid(0, 0);
    if max >= 0xB {
        // Subleaf 1 should be the core level (ECX[15:8] = 2).
        let (_, ebx, ecx, _) = crate::x86::cpuid(0xB, 1);
        if (ecx >> 8) & 0xFF == 2 && ebx & 0xFFFF != 0 {
            return ebx & 0xFFFF;
        }
    }
    let (_, ebx, _, edx) = crate::x86::cpuid(1, 0);
    if edx & (1 << 28) != 0 && (ebx >> 16) & 0xFF != 0 {
        (ebx >> 16) & 0xFF
    } else {
        1
    }
}

/// This CPU's initial APIC ID (CPUID leaf 1 EBX[31:24]).
pub fn apic_id() -> u32 {
    crate::x86::cpuid(1, 0).1 >> 24
}

/// The parameter block at the end of the trampoline, as the assembly reads it.
#[repr(C)]
struct Params {
    cr3: u64,
    cr4: u64,
    efer: u64,
    cr0: u64,
    stack_top: u64,
    cpu: u64,
    entry: u64,
}

// AT&T syntax: the far jumps and the 32-bit LGDT of 16-bit code are spelled most plainly
// there. `P` is the parameter block's address once the blob is at TRAMP.
global_asm!(
    r#"
    .pushsection .rodata.esvm_ap_trampoline,"a",@progbits
    .balign 16
    .globl esvm_ap_trampoline_start
    .globl esvm_ap_trampoline_params
    .globl esvm_ap_trampoline_end
    .set TRAMP, 0x8000
    .set P, TRAMP + (esvm_ap_trampoline_params - esvm_ap_trampoline_start)
    .code16
esvm_ap_trampoline_start:
    cli
    cld
    movw %cs, %ax
    movw %ax, %ds
    lgdtl (esvm_ap_gdtr - esvm_ap_trampoline_start)
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $0x18, $(TRAMP + (esvm_ap_pm - esvm_ap_trampoline_start))
    .code32
esvm_ap_pm:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movl (P + 8), %eax
    movl %eax, %cr4
    movl (P + 0), %eax
    movl %eax, %cr3
    movl $0xC0000080, %ecx
    movl (P + 16), %eax
    movl (P + 20), %edx
    wrmsr
    movl (P + 24), %eax
    movl %eax, %cr0
    ljmpl $0x08, $(TRAMP + (esvm_ap_lm - esvm_ap_trampoline_start))
    .code64
esvm_ap_lm:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    movq (P + 32), %rsp
    movq (P + 40), %rdi
    movq (P + 48), %rax
    xorl %ebp, %ebp
    callq *%rax
esvm_ap_halt:
    cli
    hlt
    jmp esvm_ap_halt
    .balign 8
esvm_ap_gdt:
    .quad 0
    .quad 0x00AF9B000000FFFF
    .quad 0x00CF93000000FFFF
    .quad 0x00CF9B000000FFFF
esvm_ap_gdtr:
    .word 4 * 8 - 1
    .long TRAMP + (esvm_ap_gdt - esvm_ap_trampoline_start)
    .balign 8
esvm_ap_trampoline_params:
    .fill 7, 8, 0
esvm_ap_trampoline_end:
    .popsection
"#,
    options(att_syntax)
);

extern "C" {
    static esvm_ap_trampoline_start: u8;
    static esvm_ap_trampoline_params: u8;
    static esvm_ap_trampoline_end: u8;
}

/// APs that reached 64-bit Rust code.
static CHECKED_IN: AtomicU32 = AtomicU32::new(0);
/// The guest's AP function, as an address.
static AP_MAIN: AtomicU64 = AtomicU64::new(0);

fn lapic_read(reg: u64) -> u32 {
    // SAFETY: the boot page tables identity-map the local APIC page; an aligned 32-bit
    // MMIO read of an APIC register has no side effect.
    unsafe { ((LAPIC_BASE + reg) as *const u32).read_volatile() }
}

fn lapic_write(reg: u64, v: u32) {
    // SAFETY: as for lapic_read; the callers write registers meant for it.
    unsafe { ((LAPIC_BASE + reg) as *mut u32).write_volatile(v) }
}

/// A short stand-in for an architectural delay of `rounds` PAUSEs.
fn delay(rounds: u32) {
    for _ in 0..rounds {
        core::hint::spin_loop();
    }
}

fn wait_icr_idle() -> Result<(), ApError> {
    for _ in 0..1_000_000u32 {
        if lapic_read(LAPIC_ICR_LO) & ICR_DELIVERY_PENDING == 0 {
            return Ok(());
        }
        core::hint::spin_loop();
    }
    Err(ApError::IcrBusy)
}

/// Which APIC interface the BSP drives: the xAPIC MMIO page, or (SEV-ES, where MMIO would
/// need a shared mapping of the APIC page) the x2APIC MSRs, which reach the hypervisor
/// through #VC and the GHCB.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Apic {
    X,
    X2,
}

fn send_ipi(apic: Apic, apic_id: u32, lo: u32) -> Result<(), ApError> {
    if apic == Apic::X2 {
        // x2APIC: one 64-bit ICR write, no delivery status to poll.
        // SAFETY: x2APIC mode is on (enable_apic); the ICR accepts this message.
        unsafe { crate::x86::wrmsr(X2APIC_ICR, (u64::from(apic_id) << 32) | u64::from(lo)) };
        return Ok(());
    }
    wait_icr_idle()?;
    lapic_write(LAPIC_ICR_HI, apic_id << 24);
    lapic_write(LAPIC_ICR_LO, lo);
    wait_icr_idle()
}

/// Software-enables the BSP's APIC (spurious vector 0xFF); with [`Apic::X2`] first
/// switches it to x2APIC mode.
fn enable_apic(apic: Apic) {
    if apic == Apic::X {
        lapic_write(LAPIC_SVR, lapic_read(LAPIC_SVR) | 0x1FF);
        return;
    }
    let base = rdmsr(IA32_APIC_BASE);
    // SAFETY: setting EN and EXTD switches the local APIC to x2APIC mode, which this
    // runtime uses nowhere else; the SVR write only sets the enable bit and the vector.
    unsafe {
        crate::x86::wrmsr(IA32_APIC_BASE, base | APIC_BASE_EN | APIC_BASE_EXTD);
        crate::x86::wrmsr(X2APIC_SVR, rdmsr(X2APIC_SVR) | 0x1FF);
    }
}

/// Where every AP starts in 64-bit mode (called by the trampoline with its CPU index).
extern "C" fn ap_entry(cpu: u64) -> ! {
    crate::gdt::load_on_ap();
    crate::idt::load();
    CHECKED_IN.fetch_add(1, Ordering::SeqCst);
    let f = AP_MAIN.load(Ordering::SeqCst);
    // SAFETY: start_aps stored a `fn(u32)` here before starting any AP.
    let f: fn(u32) = unsafe { core::mem::transmute::<u64, fn(u32)>(f) };
    f(cpu as u32);
    loop {
        crate::x86::cli();
        crate::x86::hlt();
    }
}

/// Starts the APs with APIC IDs `1..cpus` one after the other; each checks in and runs
/// `ap_main(cpu)` on its own stack, then halts. Returns when every AP has checked in, or
/// the first failure. Call once, on the BSP.
pub fn start_aps(cpus: u32, ap_main: fn(u32)) -> Result<(), ApError> {
    if cpus <= 1 {
        return Ok(());
    }
    let apic = if crate::boot_info().flags & esvm_abi::boot::FLAG_PROTECTED_STATE != 0 {
        prepare_sev_es_jump_table()?;
        Apic::X2
    } else {
        Apic::X
    };
    if cpus > 255 {
        return Err(ApError::TooMany);
    }
    AP_MAIN.store(ap_main as *const () as u64, Ordering::SeqCst);
    // The three labels delimit one blob in .rodata (start <= params < end).
    let (start, params_off, len) = {
        let s = core::ptr::addr_of!(esvm_ap_trampoline_start) as u64;
        let p = core::ptr::addr_of!(esvm_ap_trampoline_params) as u64;
        let e = core::ptr::addr_of!(esvm_ap_trampoline_end) as u64;
        (s, p - s, e - s)
    };
    // SAFETY: the page at TRAMPOLINE_ADDR is RAM the esvm boot convention leaves unused
    // (identity-mapped, writable); no AP runs yet, so nothing executes it while copied.
    unsafe {
        core::ptr::copy_nonoverlapping(
            start as *const u8,
            TRAMPOLINE_ADDR as *mut u8,
            len as usize,
        );
    }
    let params = (TRAMPOLINE_ADDR + params_off) as *mut Params;
    enable_apic(apic);
    for cpu in 1..cpus {
        let stack = crate::mem::alloc_pages(AP_STACK_PAGES).ok_or(ApError::OutOfMemory)?;
        let p = Params {
            cr3: read_cr3(),
            cr4: read_cr4() & !CR4_PCIDE,
            efer: rdmsr(MSR_EFER) & !EFER_LMA,
            cr0: read_cr0(),
            stack_top: stack + AP_STACK_PAGES * 4096,
            cpu: u64::from(cpu),
            entry: ap_entry as *const () as u64,
        };
        let before = CHECKED_IN.load(Ordering::SeqCst);
        // SAFETY: the parameter block lies inside the copied trampoline; the previous AP
        // has checked in, so it no longer reads it, and this one is not started yet.
        unsafe { params.write_volatile(p) };
        // The block is written before the INIT (a compiler and CPU fence).
        core::sync::atomic::fence(Ordering::SeqCst);
        send_ipi(apic, cpu, ICR_INIT_ASSERT)?;
        send_ipi(apic, cpu, ICR_INIT_DEASSERT)?;
        delay(100);
        for _ in 0..2 {
            send_ipi(apic, cpu, ICR_SIPI | u32::from(SIPI_VECTOR))?;
            delay(20);
        }
        let mut spins = 0u64;
        while CHECKED_IN.load(Ordering::SeqCst) == before {
            spins += 1;
            if spins > CHECK_IN_SPINS {
                return Err(ApError::NoCheckIn { cpu });
            }
            core::hint::spin_loop();
        }
    }
    Ok(())
}

/// SEV-ES: the hypervisor cannot point an AP at the trampoline, so the AP's start stub
/// reads the AP jump table instead (as Linux does: u16 IP at offset 0, u16 CS at offset 2
/// of the page AP_JUMP_TABLE GET returns) and continues in real mode at CS:IP. Without a
/// registered table (no firmware registered one), this guest registers
/// [`SEV_JUMP_TABLE_ADDR`] with AP_JUMP_TABLE SET first, as firmware would.
///
/// Not reached on this branch's esvm (its SEV-ES machines advertise one CPU); run by hand
/// against the SEV-ES AP start-up being built in parallel (2 and 4 vCPUs: exact totals).
fn prepare_sev_es_jump_table() -> Result<(), ApError> {
    if crate::sev::info().is_none() {
        // Protected but no GHCB (SevMode::None): no way to ask for the jump table.
        return Err(ApError::ProtectedState);
    }
    let mut table = crate::sev::ap_jump_table(None).map_err(|_| ApError::JumpTable)?;
    if table == 0 {
        crate::sev::ap_jump_table(Some(SEV_JUMP_TABLE_ADDR)).map_err(|_| ApError::JumpTable)?;
        table = SEV_JUMP_TABLE_ADDR;
    }
    if table >= 1 << 32 || table % 4 != 0 {
        return Err(ApError::JumpTable);
    }
    let words = table as *mut u16;
    // SAFETY: the jump table is a guest page the hypervisor named (or this guest
    // registered: the page at SEV_JUMP_TABLE_ADDR, unused by the esvm convention); the
    // identity map covers it and nothing else uses it.
    unsafe {
        words.write_volatile(0); // IP: the trampoline starts at offset 0
        words.add(1).write_volatile((TRAMPOLINE_ADDR >> 4) as u16); // CS = 0x0800
    }
    Ok(())
}

/// How many APs have checked in so far.
pub fn checked_in() -> u32 {
    CHECKED_IN.load(Ordering::SeqCst)
}
