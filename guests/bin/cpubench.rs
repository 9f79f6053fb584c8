//! cpubench: one benchmark loop between two markers on port 0xF5, so the VMM can time
//! exactly the loop. Arguments: `loop=alu|mem|branch` (default alu), `n=ITERATIONS`
//! (default 1000000), `ring=0|3` (default 0; ring 3 runs the loop and the marker writes
//! in user mode, IOPL=3).
//!
//! The loops are `guests/bench/loops.S`; the host crate esvm-guests runs the very same
//! code natively (`esvm_guests::bench`). Instructions per iteration: alu 10, mem 10,
//! branch 8 (exact), plus at most 8 per call.
//!
//! Markers (32-bit writes to port 0xF5): 0xE5B00001 right before the loop, 0xE5B00002
//! right after it, each written twice in a row. The VMM stamps a port write with the
//! virtual time its devices last saw, the vCPU's previous exit (a loop without exits runs
//! in slices of up to 10 M instructions); so the second write of each pair carries the
//! exact time of the first, and the VMM reads the last mark of each value.
//!
//! Output:
//! ```text
//! cpubench: loop=<name> n=<N> ring=<R> insns-per-iter=<K>
//! cpubench: result=<16 hex digits>
//! ```
//! then exit status 0 (2 for bad arguments). The result equals the native loop's.
#![no_std]
#![no_main]

use esvm_abi::boot::{BENCH_MARKER_END, BENCH_MARKER_PORT, BENCH_MARKER_START};
use esvm_rt::{arg, arg_u64_or_exit, entry, println, user, x86, BootInfo, Dec, Hex16, Racy};

#[path = "../bench/loops.rs"]
mod loops;

entry!(main);

#[repr(C, align(4096))]
struct Buf([u8; loops::MEM_BUF_SIZE]);

static BUF: Racy<Buf> = Racy::new(Buf([0; loops::MEM_BUF_SIZE]));

type LoopFn = unsafe extern "C" fn(u64, *mut u8) -> u64;

static mut SELECTED: Option<LoopFn> = None;

/// Writes `value` to the marker port twice (see the module documentation).
#[inline(always)]
fn mark(value: u32) {
    x86::outl(BENCH_MARKER_PORT, value);
    x86::outl(BENCH_MARKER_PORT, value);
}

/// Runs the selected loop between the markers; callable in ring 0 and ring 3.
extern "C" fn timed(n: u64) -> u64 {
    // SAFETY: written once in main before this runs; single vCPU.
    let f = unsafe { core::ptr::addr_of!(SELECTED).read() };
    let Some(f) = f else { return 0 };
    mark(BENCH_MARKER_START);
    // SAFETY: the loops follow the C ABI and touch at most MEM_BUF_SIZE bytes of BUF.
    let r = unsafe { f(n, BUF.get() as *mut u8) };
    mark(BENCH_MARKER_END);
    r
}

fn main(_bi: &'static BootInfo) -> u32 {
    let name = arg("loop").unwrap_or("alu");
    let (f, per_iter): (LoopFn, u64) = match name {
        "alu" => (loops::esvm_bench_alu, loops::ALU_INSNS_PER_ITER),
        "mem" => (loops::esvm_bench_mem, loops::MEM_INSNS_PER_ITER),
        "branch" => (loops::esvm_bench_branch, loops::BRANCH_INSNS_PER_ITER),
        other => {
            println!("error: loop={} is not one of alu, mem, branch", other);
            return 2;
        }
    };
    let n = arg_u64_or_exit("n", 1_000_000);
    let ring = arg_u64_or_exit("ring", 0);
    if ring != 0 && ring != 3 {
        println!("error: ring={} must be 0 or 3", Dec(ring));
        return 2;
    }
    println!(
        "cpubench: loop={} n={} ring={} insns-per-iter={}",
        name,
        Dec(n),
        Dec(ring),
        Dec(per_iter)
    );
    // SAFETY: single vCPU, nothing reads SELECTED concurrently.
    unsafe { core::ptr::addr_of_mut!(SELECTED).write(Some(f)) };
    let r = if ring == 3 {
        // Port I/O from ring 3 relies on IOPL=3; under hypervisors that run ring 3 in a
        // restricted context the runtime performs the marker writes after the #GP.
        let opts = user::UserOptions {
            emulate_port_io: true,
            ..user::UserOptions::default()
        };
        user::run_user_with(timed, n, opts)
    } else {
        timed(n)
    };
    println!("cpubench: result={}", Hex16(r));
    0
}
