//! The part of `demo` and `sevdemo` after their own checks: the banner, the arguments, the
//! dirty buffer, the workload and the checksum line. Included by both guests (with
//! `crate::workload` beside it); the output format is documented in `guests/bin/demo.rs`.

use esvm_rt::{arg_u64_or_exit, println, BootInfo, Dec, Hex16};

use crate::workload;

/// Run the demo: `title` is the first line, `name` prefixes the argument lines. Returns the
/// exit status (0, or 2 after an `error:` line).
pub fn run(title: &str, name: &str, bi: &BootInfo) -> u32 {
    println!("{}", title);
    println!(
        "{}: memory {} MiB, {} vCPU(s), args \"{}\"",
        name,
        Dec(bi.mem_size >> 20),
        Dec(u64::from(bi.vcpus)),
        esvm_rt::args::all()
    );
    let iterations = arg_u64_or_exit("iterations", workload::DEFAULT_ITERATIONS);
    let dirty_mib = arg_u64_or_exit("dirty-mib", 0);
    println!(
        "{}: iterations={} dirty-mib={}",
        name,
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
            // SAFETY: freshly allocated, zeroed, identity-mapped memory (private in an
            // SEV-ES guest) owned by us only.
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
