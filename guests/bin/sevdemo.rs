//! sevdemo: the demo guest as an SEV-ES guest (`esvm run --sev-es` without a guest runs it).
//!
//! Same workload (`guests/demo/workload.rs`), arguments and checksum as `demo`:
//! `iterations=N` (default 300000) and `dirty-mib=M` (default 0). All I/O goes through
//! the runtime's SEV-ES support: serial output one VMGEXIT per line through the GHCB, the
//! exit port through the GHCB; the workload itself raises no #VC.
//!
//! Output:
//! ```text
//! esvm sevdemo guest (SEV-ES)
//! sevdemo: memory <MiB> MiB, <n> vCPU(s), args "<argument string>"
//! sevdemo: iterations=<N> dirty-mib=<M>
//! tick 1
//! ...
//! tick 10
//! checksum=<16 lowercase hex digits>
//! ```
//! and, if the guest owner injected a launch secret (LAUNCH_SECRET at `SECRET_ADDR`,
//! 0x4000: `esvm ctl inject-secret` or `esvm run --secret`), one more line
//! `sevdemo: launch secret <n> bytes, fnv1a <16 hex digits>`: its length (up to its last
//! non-zero byte in the secret page) and FNV-1a, which the owner can compare with the
//! secret's (the secret itself stays inside the guest); then exit status 0 (`esvm_guests::demo::expected_output_sev` predicts it). Bad
//! arguments or too little memory: an `error:` line and status 2. Booted without
//! FLAG_PROTECTED_STATE: `error: sevdemo is an SEV-ES guest ...` and status 2.
#![no_std]
#![no_main]

use esvm_abi::layout::{SECRET_ADDR, SECRET_SIZE};
use esvm_rt::{entry, println, BootInfo, Dec, Hex16};

#[path = "../demo/workload.rs"]
mod workload;

#[path = "../demo/main.rs"]
mod demo_main;

entry!(main, sev_es);

fn main(bi: &'static BootInfo) -> u32 {
    if esvm_rt::sev::info().is_none() {
        println!("error: sevdemo is an SEV-ES guest; run it with FLAG_PROTECTED_STATE (esvm run --sev-es)");
        return 2;
    }
    let status = demo_main::run("esvm sevdemo guest (SEV-ES)", "sevdemo", bi);
    if status == 0 {
        report_secret();
    }
    status
}

/// The launch secret page, if the owner injected a secret: its length and FNV-1a.
fn report_secret() {
    // SAFETY: the secret page is guest RAM reserved for LAUNCH_SECRET in the memory map
    // (measured with the boot data: zeros unless a secret was injected), identity-mapped
    // private, and nothing else uses it; it is only read.
    let page =
        unsafe { core::slice::from_raw_parts(SECRET_ADDR as *const u8, SECRET_SIZE as usize) };
    let len = page.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    if len > 0 {
        println!(
            "sevdemo: launch secret {} bytes, fnv1a {}",
            Dec(len as u64),
            Hex16(esvm_rt::checksum::fnv1a(&page[..len]))
        );
    }
}
