//! Interpreter throughput on three loops (register ALU, memory load/store, call/branch).
//! Run with `cargo run --release -p esvm-cpu --example mips`.

use esvm_cpu::testutil::Harness;
use esvm_cpu::Exit;
use std::time::Instant;

#[path = "../benches/support/loops.rs"]
mod loops;
use loops::program;

/// CPU time of this thread (robust against other processes competing for the cores).
fn thread_cpu() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer; CLOCK_THREAD_CPUTIME_ID is always available on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

fn main() {
    let iters = 20_000_000u32;
    for kind in ["alu", "mem", "call"] {
        let mut h = Harness::new(64 << 20);
        h.load(&program(kind, iters));
        let t = Instant::now();
        let c0 = thread_cpu();
        let x = h.cpu.run(u64::MAX);
        let cpu = thread_cpu() - c0;
        let dt = t.elapsed();
        assert_eq!(x, Exit::Hlt);
        assert!(h.exception().is_none());
        let n = h.cpu.instructions_retired();
        println!(
            "{kind:5} {n:>11} instructions in {:>7.3} s: {:>7.1} MIPS ({:.1} MIPS of thread CPU time)",
            dt.as_secs_f64(),
            n as f64 / dt.as_secs_f64() / 1e6,
            n as f64 / cpu / 1e6
        );
    }
}
