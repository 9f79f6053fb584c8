//! sev-pf: an exception injected by the VMM into an SEV-ES guest. The guest installs a #PF
//! handler, writes `checkpoint::PF_READY` (0x5EF0_0001) to the checkpoint port 0xF6
//! through the GHCB, then halts with interrupts off (`hlt` in a loop). The VMM injects a
//! #PF with the error code the test chose (`ec=N`, default 6) while the guest is halted.
//!
//! The handler checks the frame: the error code was pushed and equals `ec` (an exception
//! carries its error code only if the hypervisor's tracked CR0.PE is set), RIP is the
//! instruction after that HLT, CS = 0x08, SS = 0x10, RSP = the RSP at the HLT, RFLAGS
//! has bit 1 set, IF clear and nothing above bit 21. CR2 is printed, not checked (the
//! hypervisor cannot write it in a protected guest).
//!
//! Output:
//! ```text
//! sev-pf: #PF handler installed; waiting halted for an injected #PF with error code <ec>
//! sev-pf: halting at <hlt address>; the #PF must report rip=<address after it>
//! sev-pf: #PF delivered: error=<hex> rip=<hex> cs=<hex> rflags=<hex> rsp=<hex> ss=<hex> cr2=<hex>
//! sev-pf: all checks passed
//! ```
//! exit status 0. A wrong frame: `FAIL:` line(s), status 1. An injection while the guest is
//! inside a GHCB request ends it with termination reason set 1, code 11 (GHCB busy).
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU64, Ordering};
use esvm_abi::testing::{checkpoint, PF_DEFAULT_ERROR_CODE};
use esvm_rt::idt::{self, vector, InterruptFrame};
use esvm_rt::x86::RFLAGS_IF;
use esvm_rt::{arg_u64_or_exit, check, check_eq, entry, println, BootInfo, Hex};

entry!(main, sev_es);

static EXPECTED_EC: AtomicU64 = AtomicU64::new(0);
static HLT_ADDR: AtomicU64 = AtomicU64::new(0);
static RESUME_RIP: AtomicU64 = AtomicU64::new(0);
static HALT_RSP: AtomicU64 = AtomicU64::new(0);

/// Address of the HLT and of the instruction after it.
fn halt_addresses() -> (u64, u64) {
    let (h, r): (u64, u64);
    // SAFETY: only computes the addresses of the labels in `halt_forever`.
    unsafe {
        core::arch::asm!(
            "lea {h}, [rip + esvm_sev_pf_hlt]",
            "lea {r}, [rip + esvm_sev_pf_after_hlt]",
            h = out(reg) h, r = out(reg) r, options(nomem, nostack, preserves_flags)
        )
    };
    (h, r)
}

core::arch::global_asm!(
    r#"
    .section .text.esvm_sev_pf,"ax",@progbits
    .globl esvm_sev_pf_halt
    .globl esvm_sev_pf_hlt
    .globl esvm_sev_pf_after_hlt
    // fn(rsp_slot: *mut u64) -> !: records RSP, then halts with IF clear forever.
esvm_sev_pf_halt:
    cli
    mov [rdi], rsp
esvm_sev_pf_hlt:
    hlt
esvm_sev_pf_after_hlt:
    jmp esvm_sev_pf_hlt
"#
);

extern "C" {
    fn esvm_sev_pf_halt(rsp_slot: *mut u64) -> !;
}

fn on_pf(f: &mut InterruptFrame) {
    let cr2 = esvm_rt::x86::read_cr2();
    println!(
        "sev-pf: #PF delivered: error={} rip={} cs={} rflags={} rsp={} ss={} cr2={}",
        Hex(f.error_code),
        Hex(f.rip),
        Hex(f.cs),
        Hex(f.rflags),
        Hex(f.rsp),
        Hex(f.ss),
        Hex(cr2)
    );
    let resume = RESUME_RIP.load(Ordering::Relaxed);
    if f.error_code == resume && f.rip == u64::from(idt_cs()) {
        println!(
            "FAIL: sev-pf: no error code was pushed (the frame is shifted by 8 bytes): the \
             hypervisor injected the #PF as if CR0.PE were clear"
        );
        esvm_rt::exit(1);
    }
    check_eq!(
        f.error_code,
        EXPECTED_EC.load(Ordering::Relaxed),
        "#PF error code"
    );
    check_eq!(f.rip, resume, "#PF RIP (the instruction after the HLT)");
    check_eq!(f.cs, idt_cs(), "#PF CS");
    check_eq!(f.ss, esvm_rt::gdt::KERNEL_DS, "#PF SS");
    check_eq!(f.rsp, HALT_RSP.load(Ordering::Relaxed), "#PF RSP");
    check!(
        f.rflags & 2 != 0 && f.rflags & RFLAGS_IF == 0 && f.rflags >> 22 == 0,
        "sev-pf: implausible RFLAGS {}",
        Hex(f.rflags)
    );
    println!("sev-pf: all checks passed");
    esvm_rt::exit(0);
}

fn idt_cs() -> u16 {
    esvm_rt::gdt::KERNEL_CS
}

fn main(_bi: &'static BootInfo) -> u32 {
    let ec = arg_u64_or_exit("ec", PF_DEFAULT_ERROR_CODE);
    if esvm_rt::sev::info().is_none() {
        println!("FAIL: sev-pf: not an SEV-ES boot; run it with --sev-es");
        return 1;
    }
    EXPECTED_EC.store(ec, Ordering::Relaxed);
    let (hlt, after) = halt_addresses();
    HLT_ADDR.store(hlt, Ordering::Relaxed);
    RESUME_RIP.store(after, Ordering::Relaxed);
    idt::set_handler(vector::PF, on_pf);
    println!(
        "sev-pf: #PF handler installed; waiting halted for an injected #PF with error code {}",
        Hex(ec)
    );
    println!(
        "sev-pf: halting at {}; the #PF must report rip={}",
        Hex(hlt),
        Hex(after)
    );
    esvm_rt::sev::checkpoint(checkpoint::PF_READY);
    // SAFETY: halts forever with interrupts off; only the injected #PF gets us out (its
    // handler exits the VM).
    unsafe { esvm_sev_pf_halt(HALT_RSP.as_ptr()) }
}
