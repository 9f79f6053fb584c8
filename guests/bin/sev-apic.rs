//! sev-apic: the local APIC through its MSRs — x2APIC registers and the TSC-deadline timer —
//! from a plain guest (RDMSR/WRMSR exits to the VMM) or an SEV-ES guest (RDMSR/WRMSR raise
//! #VC; the #VC handler forwards them by VMGEXIT MSR, and the hypervisor passes them on to
//! the VMM's local APIC). The same checks in both modes:
//!
//! - CPUID leaf 1 offers x2APIC (ECX bit 21) and the TSC-deadline timer (ECX bit 24);
//! - IA32_APIC_BASE: x2APIC mode is switched on (EN and EXTD set) and reads back;
//! - x2APIC registers: ID (0x802) and version (0x803, version 0x14) read; the spurious
//!   vector register (0x80F) takes 0x1FF and reads it back;
//! - refused accesses raise #GP: a write of the read-only version register (0x803) and a
//!   read of a register that does not exist (0x801);
//! - the timer: LVT timer (0x832) in TSC-deadline mode on vector 0x40, IA32_TSC_DEADLINE
//!   (0x6E0) = RDTSC + `delta=N` (default 1000000) reads back; the guest waits in
//!   `sti; hlt`; the interrupt must come on vector 0x40 with the TSC at or after the
//!   deadline and at most `slack=N` (default 20000) TSC ticks after it (virtual time: the
//!   VMM must fire it when the deadline is reached, not later), and IA32_TSC_DEADLINE reads
//!   0 afterwards; the handler's EOI goes through MSR 0x80B. `timers=N` (default 3) repeats
//!   the timer N times.
//!
//! Output: `sev-apic: <mode> guest; CPUID offers x2APIC and TSC-deadline`, `sev-apic:
//! x2APIC on (APIC base <v>)`, `sev-apic: x2APIC id <n> version <v>`, `sev-apic: refused
//! accesses raise #GP`, one `sev-apic: timer <i> fired <d> ticks after its deadline` per
//! timer, `sev-apic: all checks passed (<n> #VCs)`, exit status 0; a failed check: `FAIL:`
//! line, status 1.
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU64, Ordering};
use esvm_rt::idt::{self, InterruptFrame};
use esvm_rt::{arg_u64_or_exit, check, check_eq, entry, println, x86, BootInfo, Dec, Hex};

entry!(main, sev_es);

const IA32_APIC_BASE: u32 = 0x1b;
const APIC_BASE_EN: u64 = 1 << 11;
const APIC_BASE_EXTD: u64 = 1 << 10;
const TSC_DEADLINE: u32 = 0x6e0;
const X2APIC_ID: u32 = 0x802;
const X2APIC_VERSION: u32 = 0x803;
const X2APIC_RESERVED: u32 = 0x801;
const X2APIC_EOI: u32 = 0x80b;
const X2APIC_SVR: u32 = 0x80f;
const X2APIC_LVT_TIMER: u32 = 0x832;
const LVT_TIMER_TSC_DEADLINE: u64 = 2 << 17;
const TIMER_VECTOR: u8 = 0x40;

/// The TSC when the timer interrupt came (0: not yet).
static FIRED_TSC: AtomicU64 = AtomicU64::new(0);
static FIRED: AtomicU64 = AtomicU64::new(0);

fn on_timer(_frame: &mut InterruptFrame) {
    FIRED_TSC.store(x86::rdtsc(), Ordering::SeqCst);
    FIRED.fetch_add(1, Ordering::SeqCst);
    // SAFETY: EOI of the local APIC in x2APIC mode.
    unsafe { x86::wrmsr(X2APIC_EOI, 0) };
}

fn on_spurious(frame: &mut InterruptFrame) {
    println!(
        "FAIL: sev-apic: unexpected interrupt on vector {}",
        Dec(frame.vector)
    );
    esvm_rt::exit(1);
}

/// Whether `f` raised #GP (and nothing else).
fn raises_gp(f: impl FnOnce()) -> bool {
    matches!(esvm_rt::trap::catch(f), Err(fault) if fault.vector == 13)
}

fn main(_bi: &'static BootInfo) -> u32 {
    let delta = arg_u64_or_exit("delta", 1_000_000);
    let slack = arg_u64_or_exit("slack", 20_000);
    let timers = arg_u64_or_exit("timers", 3);
    let protected = esvm_rt::sev::info().is_some();
    let vc0 = esvm_rt::sev::vc_count();

    let (_, _, ecx, _) = x86::cpuid(1, 0);
    check!(
        ecx & (1 << 21) != 0 && ecx & (1 << 24) != 0,
        "sev-apic: CPUID 1 ECX {} lacks x2APIC (bit 21) or TSC-deadline (bit 24)",
        Hex(u64::from(ecx))
    );
    println!(
        "sev-apic: {} guest; CPUID offers x2APIC and TSC-deadline",
        if protected { "SEV-ES" } else { "plain" }
    );

    let base = x86::rdmsr(IA32_APIC_BASE);
    check!(
        base & APIC_BASE_EN != 0,
        "sev-apic: the local APIC is disabled (APIC base {})",
        Hex(base)
    );
    // SAFETY: switches the enabled local APIC to x2APIC mode; the guest uses it only
    // through MSRs from here on.
    unsafe { x86::wrmsr(IA32_APIC_BASE, base | APIC_BASE_EXTD) };
    let base = x86::rdmsr(IA32_APIC_BASE);
    check_eq!(
        base & (APIC_BASE_EN | APIC_BASE_EXTD),
        APIC_BASE_EN | APIC_BASE_EXTD,
        "APIC base EN and EXTD after the switch"
    );
    println!("sev-apic: x2APIC on (APIC base {})", Hex(base));

    let id = x86::rdmsr(X2APIC_ID);
    let version = x86::rdmsr(X2APIC_VERSION);
    check_eq!(version & 0xff, 0x14, "x2APIC version");
    println!("sev-apic: x2APIC id {} version {}", Dec(id), Hex(version));
    // SAFETY: enables the APIC with spurious vector 0xFF.
    unsafe { x86::wrmsr(X2APIC_SVR, 0x1ff) };
    check_eq!(x86::rdmsr(X2APIC_SVR), 0x1ff, "spurious vector register");

    // SAFETY: the write is refused (#GP, caught).
    let version_write = raises_gp(|| unsafe { x86::wrmsr(X2APIC_VERSION, 0) });
    check!(
        version_write,
        "sev-apic: a write of the x2APIC version register did not raise #GP"
    );
    let reserved_read = raises_gp(|| {
        let _ = x86::rdmsr(X2APIC_RESERVED);
    });
    check!(
        reserved_read,
        "sev-apic: a read of x2APIC MSR 0x801 (no register) did not raise #GP"
    );
    check_eq!(
        x86::rdmsr(X2APIC_VERSION),
        version,
        "version register after the refused write"
    );
    println!("sev-apic: refused accesses raise #GP");

    idt::set_handler(TIMER_VECTOR, on_timer);
    idt::set_handler(0xff, on_spurious);
    // SAFETY: the timer in TSC-deadline mode, unmasked, on TIMER_VECTOR.
    unsafe {
        x86::wrmsr(
            X2APIC_LVT_TIMER,
            LVT_TIMER_TSC_DEADLINE | u64::from(TIMER_VECTOR),
        )
    };
    for i in 1..=timers {
        let before = FIRED.load(Ordering::SeqCst);
        let deadline = x86::rdtsc() + delta;
        // SAFETY: arms the timer.
        unsafe { x86::wrmsr(TSC_DEADLINE, deadline) };
        check_eq!(
            x86::rdmsr(TSC_DEADLINE),
            deadline,
            "IA32_TSC_DEADLINE read back"
        );
        loop {
            x86::cli();
            if FIRED.load(Ordering::SeqCst) != before {
                break;
            }
            x86::sti_hlt();
        }
        let fired = FIRED_TSC.load(Ordering::SeqCst);
        check!(
            fired >= deadline,
            "sev-apic: timer {} fired at TSC {}, before its deadline {}",
            Dec(i),
            Dec(fired),
            Dec(deadline)
        );
        check!(
            fired - deadline <= slack,
            "sev-apic: timer {} fired {} ticks after its deadline (at most {} expected)",
            Dec(i),
            Dec(fired - deadline),
            Dec(slack)
        );
        check_eq!(
            x86::rdmsr(TSC_DEADLINE),
            0,
            "IA32_TSC_DEADLINE after it fired"
        );
        println!(
            "sev-apic: timer {} fired {} ticks after its deadline",
            Dec(i),
            Dec(fired - deadline)
        );
    }
    println!(
        "sev-apic: all checks passed ({} #VCs)",
        Dec(esvm_rt::sev::vc_count() - vc0)
    );
    0
}
