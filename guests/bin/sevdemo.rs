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

use esvm_rt::{arg_u64_or_exit, entry, println, BootInfo, Dec, Hex16};

#[path = "../demo/workload.rs"]
mod workload;

entry!(main, sev_es);

fn main(bi: &'static BootInfo) -> u32 {
    if esvm_rt::sev::info().is_none() {
        println!("error: sevdemo is an SEV-ES guest; run it with FLAG_PROTECTED_STATE (esvm run --sev-es)");
        return 2;
    }
    println!("esvm sevdemo guest (SEV-ES)");
    println!(
        "sevdemo: memory {} MiB, {} vCPU(s), args \"{}\"",
        Dec(bi.mem_size >> 20),
        Dec(u64::from(bi.vcpus)),
        esvm_rt::args::all()
    );
    let iterations = arg_u64_or_exit("iterations", workload::DEFAULT_ITERATIONS);
    let dirty_mib = arg_u64_or_exit("dirty-mib", 0);
    println!(
        "sevdemo: iterations={} dirty-mib={}",
        Dec(iterations),
        Dec(dirty_mib)
    );

    let bytes = match dirty_mib.checked_mul(1 << 20) {
        Some(b) if b <= esvm_rt::mem::free_bytes() => b,
        _ => {
            println!(
                "error: dirty-mib={} does not fit in the {} MiB of free guest memory",
                Dec(dirty_mib),
                Dec(esvm_rt::mem::free_bytes() >> 20)
            );
            return 2;
        }
    };
    let buf: &mut [u64] = if bytes == 0 {
        &mut []
    } else {
        match esvm_rt::mem::alloc_aligned(bytes, 4096) {
            // SAFETY: freshly allocated, zeroed, identity-mapped (private) memory owned by
            // us only.
            Some(addr) => unsafe {
                core::slice::from_raw_parts_mut(addr as *mut u64, (bytes / 8) as usize)
            },
            None => {
                println!(
                    "error: cannot allocate {} MiB for the dirty buffer",
                    Dec(dirty_mib)
                );
                return 2;
            }
        }
    };
    let sum = workload::run(iterations, buf, |k| println!("tick {}", Dec(k)));
    println!("checksum={}", Hex16(sum));
    0
}
