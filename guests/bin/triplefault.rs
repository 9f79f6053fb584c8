//! triplefault: loads an empty IDT (limit 0) and executes UD2. #UD cannot be delivered
//! (#GP), neither can the #GP (#DF), nor the #DF: the CPU shuts down. The VMM must
//! report a shutdown / triple fault rather than an exit status.
//!
//! Output before the shutdown:
//! ```text
//! triplefault: loading an empty IDT and executing ud2; expect a shutdown
//! ```
//! If execution continues, prints a `FAIL:` line and exits with status 1.
#![no_std]
#![no_main]

use esvm_rt::x86::{lidt, DescriptorPointer};
use esvm_rt::{entry, println, BootInfo};

entry!(main);

fn main(_bi: &'static BootInfo) -> u32 {
    println!("triplefault: loading an empty IDT and executing ud2; expect a shutdown");
    let empty = DescriptorPointer { limit: 0, base: 0 };
    // SAFETY: deliberately breaks exception delivery; nothing runs after the shutdown.
    unsafe {
        lidt(&empty);
        core::arch::asm!("ud2", options(nomem, nostack));
    }
    println!("FAIL: still running after ud2 with an empty IDT");
    1
}
