//! sev-novc: the negative SEV-ES test: a guest with a GHCB (so it can print) but no #VC
//! handler. It loads an empty IDT and executes an instruction that raises #VC (`insn=cpuid`,
//! the default, or `insn=out`: OUT to port 0x80). The #VC has no handler: #GP, then #DF,
//! then a shutdown, which the VMM must report.
//!
//! Output (through the GHCB, without #VC) before the shutdown:
//! ```text
//! sev-novc: SEV-ES guest without a #VC handler (IDT gate 29 not present), GHCB at <gpa>
//! sev-novc: loading an empty IDT and executing <insn>; expect a shutdown
//! ```
//! If execution continues: a `FAIL:` line and status 1.
#![no_std]
#![no_main]

use esvm_rt::sev::SevMode;
use esvm_rt::x86::{lidt, DescriptorPointer};
use esvm_rt::{arg, entry, println, BootInfo, Hex};

entry!(main, sev_es_no_vc);

fn main(_bi: &'static BootInfo) -> u32 {
    let out = match arg("insn") {
        None | Some("cpuid") => false,
        Some("out") => true,
        Some(other) => {
            println!("error: insn={} (expected cpuid or out)", other);
            return 2;
        }
    };
    let Some(info) = esvm_rt::sev::info() else {
        println!("FAIL: sev-novc: not an SEV-ES boot; run it with --sev-es");
        return 1;
    };
    if info.mode != SevMode::NoVc {
        println!("FAIL: sev-novc: the runtime installed SEV-ES support with a #VC handler");
        return 1;
    }
    println!(
        "sev-novc: SEV-ES guest without a #VC handler (IDT gate 29 not present), GHCB at {}",
        Hex(info.ghcb_gpa)
    );
    println!(
        "sev-novc: loading an empty IDT and executing {}; expect a shutdown",
        if out { "out 0x80, al" } else { "cpuid" }
    );
    let empty = DescriptorPointer { limit: 0, base: 0 };
    // SAFETY: deliberately breaks exception delivery; the #VC the next instruction raises
    // shuts the VM down.
    unsafe {
        lidt(&empty);
        if out {
            core::arch::asm!("out 0x80, al", in("al") 0u8, options(nomem, nostack));
        } else {
            core::arch::asm!("mov {t}, rbx", "cpuid", "mov rbx, {t}", t = out(reg) _,
                             inout("eax") 0u32 => _, inout("ecx") 0u32 => _, out("edx") _,
                             options(nomem, nostack));
        }
    }
    println!("FAIL: sev-novc: still running after a #VC without a handler");
    1
}
