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
//! then exit status 0 (`esvm_guests::demo::expected_output_sev` predicts it). Bad
//! arguments or too little memory: an `error:` line and status 2. Booted without
//! FLAG_PROTECTED_STATE: `error: sevdemo is an SEV-ES guest ...` and status 2.
#![no_std]
#![no_main]

use esvm_rt::{entry, println, BootInfo};

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
    demo_main::run("esvm sevdemo guest (SEV-ES)", "sevdemo", bi)
}
