//! The cpubench loops (`loops.S`), shared verbatim by the `cpubench` guest and the host
//! crate `esvm-guests`, which includes this file with `#[path]`. Only `core` is used.

// Both includers use a subset of the items.
#![allow(dead_code)]

core::arch::global_asm!(include_str!("loops.S"));

extern "C" {
    /// Register-only ALU loop: `n` iterations of [`ALU_INSNS_PER_ITER`] instructions.
    pub fn esvm_bench_alu(n: u64, buf: *mut u8) -> u64;
    /// Load/store loop over a [`MEM_BUF_SIZE`]-byte buffer at `buf`: `n` iterations of
    /// [`MEM_INSNS_PER_ITER`] instructions.
    pub fn esvm_bench_mem(n: u64, buf: *mut u8) -> u64;
    /// Data-dependent branch loop: `n` iterations of [`BRANCH_INSNS_PER_ITER`]
    /// instructions on either path.
    pub fn esvm_bench_branch(n: u64, buf: *mut u8) -> u64;
}

/// Instructions retired per iteration of `esvm_bench_alu`.
pub const ALU_INSNS_PER_ITER: u64 = 10;
/// Instructions retired per iteration of `esvm_bench_mem`.
pub const MEM_INSNS_PER_ITER: u64 = 10;
/// Instructions retired per iteration of `esvm_bench_branch`.
pub const BRANCH_INSNS_PER_ITER: u64 = 8;
/// Upper bound on the instructions of one call outside the loop (setup and return).
pub const MAX_OVERHEAD_INSNS: u64 = 8;
/// Size of the scratch buffer `esvm_bench_mem` needs (it touches bytes [0, 65536)).
pub const MEM_BUF_SIZE: usize = 64 * 1024;
