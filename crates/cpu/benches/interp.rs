//! Criterion benchmark of interpreter throughput (instructions per second) on three loops:
//! register ALU, memory load/store, call/branch. `cargo bench -p esvm-cpu`.
//! For a quick MIPS printout use `cargo run --release -p esvm-cpu --example mips`.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use esvm_cpu::testutil::{Harness, CODE};
use esvm_cpu::Exit;

#[path = "support/loops.rs"]
mod loops;
use loops::program;

fn bench(c: &mut Criterion) {
    let iters = 100_000u32;
    let mut g = c.benchmark_group("interp");
    g.sample_size(20);
    for kind in ["alu", "mem", "call"] {
        let code = program(kind, iters);
        let mut h = Harness::new(16 << 20);
        h.load(&code);
        h.run();
        let per_run = h.cpu.instructions_retired();
        g.throughput(Throughput::Elements(per_run));
        g.bench_function(kind, |b| {
            b.iter(|| {
                h.restart(CODE);
                assert_eq!(h.cpu.run(u64::MAX), Exit::Hlt);
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
