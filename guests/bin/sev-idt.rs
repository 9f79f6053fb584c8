//! sev-idt: an SEV-ES guest that clobbers its IDT (LIDT with limit 0) and executes UD2.
//! #UD cannot be delivered (#GP), nor the #GP (#DF), nor the #DF: the CPU shuts down.
//! The VMM must report a shutdown (KVM selftest: SEV-ES guest with a clobbered IDT).
//!
//! Output (through the GHCB) before the shutdown:
//! ```text
//! sev-idt: SEV-ES guest, GHCB at <gpa>; loading an empty IDT and executing ud2; expect a shutdown
//! ```
//! If execution continues: a `FAIL:` line (through the GHCB, no #VC needed) and status 1.
#![no_std]
#![no_main]

use esvm_rt::x86::{lidt, DescriptorPointer};
use esvm_rt::{entry, println, BootInfo, Hex};

entry!(main, sev_es);

fn main(_bi: &'static BootInfo) -> u32 {
    let Some(info) = esvm_rt::sev::info() else {
        println!("FAIL: sev-idt: not an SEV-ES boot; run it with --sev-es");
        return 1;
    };
    println!(
        "sev-idt: SEV-ES guest, GHCB at {}; loading an empty IDT and executing ud2; expect a shutdown",
        Hex(info.ghcb_gpa)
    );
    let empty = DescriptorPointer { limit: 0, base: 0 };
    // SAFETY: deliberately breaks exception delivery; nothing runs after the shutdown.
    unsafe {
        lidt(&empty);
        core::arch::asm!("ud2", options(nomem, nostack));
    }
    println!("FAIL: sev-idt: still running after ud2 with an empty IDT");
    1
}
