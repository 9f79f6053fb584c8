//! Interpreter throughput on three loops (register ALU, memory load/store, call/branch).
//! Run with `cargo run --release -p esvm-cpu --example mips`.

use esvm_cpu::testutil::{Harness, CODE, DATA};
use esvm_cpu::Exit;
use iced_x86::code_asm::*;
use std::time::Instant;

pub fn program(kind: &str, iters: u32) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    let mut lp = a.create_label();
    let mut f = a.create_label();
    a.mov(ecx, iters).unwrap();
    a.mov(rsi, DATA).unwrap();
    a.mov(rbx, 7u64).unwrap();
    a.set_label(&mut lp).unwrap();
    match kind {
        "alu" => {
            a.add(rax, rbx).unwrap();
            a.xor(rdx, rax).unwrap();
            a.sub(rbx, 3).unwrap();
            a.shl(rdi, 1).unwrap();
            a.or(rdi, rdx).unwrap();
            a.and(r8, rax).unwrap();
            a.lea(r9, qword_ptr(rax + rbx * 2 + 8)).unwrap();
            a.cmp(r9, rdx).unwrap();
        }
        "mem" => {
            a.mov(rax, qword_ptr(rsi)).unwrap();
            a.add(rax, 1).unwrap();
            a.mov(qword_ptr(rsi + 8), rax).unwrap();
            a.mov(rdx, qword_ptr(rsi + 16)).unwrap();
            a.mov(qword_ptr(rsi + 24), rdx).unwrap();
            a.mov(r8d, dword_ptr(rsi + rbx * 8 + 64)).unwrap();
            a.mov(dword_ptr(rsi + 32), r8d).unwrap();
            a.mov(qword_ptr(rsi), rax).unwrap();
        }
        _ => {
            let mut skip = a.create_label();
            a.call(f).unwrap();
            a.test(ecx, 1).unwrap();
            a.je(skip).unwrap();
            a.inc(rdx).unwrap();
            a.set_label(&mut skip).unwrap();
            a.call(f).unwrap();
        }
    }
    a.dec(ecx).unwrap();
    a.jnz(lp).unwrap();
    a.hlt().unwrap();
    a.set_label(&mut f).unwrap();
    a.add(rax, 1).unwrap();
    a.ret().unwrap();
    a.assemble(CODE).unwrap()
}

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
