//! demo: the built-in demo guest.
//!
//! Arguments: `iterations=N` (default 300000, about 70 M instructions; about 120 M with
//! a dirty buffer) and
//! `dirty-mib=M` (default 0: a buffer of M MiB, zeroed, then rewritten with a page-stride
//! pattern every iteration — exercises dirty-page tracking during migration).
//!
//! Output:
//! ```text
//! esvm demo guest
//! demo: memory <MiB> MiB, <n> vCPU(s), args "<argument string>"
//! demo: iterations=<N> dirty-mib=<M>
//! tick 1
//! ...
//! tick 10
//! checksum=<16 lowercase hex digits>
//! ```
//! then exit status 0. The checksum depends only on N and M (see
//! `guests/demo/workload.rs`; the host computes the same value with
//! `esvm_guests::demo::expected_checksum`). Bad arguments or too little memory for the
//! buffer: an `error:` line and exit status 2.
#![no_std]
#![no_main]

use esvm_rt::{arg_u64_or_exit, entry, println, BootInfo, Dec, Hex16};

#[path = "../demo/workload.rs"]
mod workload;

entry!(main);

fn main(bi: &'static BootInfo) -> u32 {
    println!("esvm demo guest");
    println!(
        "demo: memory {} MiB, {} vCPU(s), args \"{}\"",
        Dec(bi.mem_size >> 20),
        Dec(u64::from(bi.vcpus)),
        esvm_rt::args::all()
    );
    let iterations = arg_u64_or_exit("iterations", workload::DEFAULT_ITERATIONS);
    let dirty_mib = arg_u64_or_exit("dirty-mib", 0);
    println!(
        "demo: iterations={} dirty-mib={}",
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
            // SAFETY: freshly allocated, zeroed, identity-mapped memory owned by us only.
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
