//! Native copies of the `cpubench` guest loops. The assembly is `guests/bench/loops.S`,
//! assembled into this crate and into the guest alike, so the machine code is identical.

#[path = "../../../guests/bench/loops.rs"]
mod loops;

pub use loops::{MAX_OVERHEAD_INSNS, MEM_BUF_SIZE};

/// One of the three benchmark loops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BenchLoop {
    /// Register-only ALU operations.
    Alu,
    /// Loads and stores on a 64 KiB buffer.
    Mem,
    /// A data-dependent conditional branch.
    Branch,
}

impl BenchLoop {
    /// All loops.
    pub const ALL: [BenchLoop; 3] = [BenchLoop::Alu, BenchLoop::Mem, BenchLoop::Branch];

    /// The name the guest's `loop=` argument uses.
    pub fn name(self) -> &'static str {
        match self {
            BenchLoop::Alu => "alu",
            BenchLoop::Mem => "mem",
            BenchLoop::Branch => "branch",
        }
    }

    /// Parses a `loop=` value.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|l| l.name() == name)
    }

    /// Instructions retired per iteration (exact).
    pub fn insns_per_iter(self) -> u64 {
        match self {
            BenchLoop::Alu => loops::ALU_INSNS_PER_ITER,
            BenchLoop::Mem => loops::MEM_INSNS_PER_ITER,
            BenchLoop::Branch => loops::BRANCH_INSNS_PER_ITER,
        }
    }

    /// Runs the loop natively for `n` iterations; returns the loop's result value, which
    /// the guest prints as `result=<16 hex digits>` (the same for the same `n`).
    pub fn run_native(self, n: u64) -> u64 {
        let mut buf = vec![0u8; MEM_BUF_SIZE];
        let f = match self {
            BenchLoop::Alu => loops::esvm_bench_alu,
            BenchLoop::Mem => loops::esvm_bench_mem,
            BenchLoop::Branch => loops::esvm_bench_branch,
        };
        // SAFETY: the loops follow the System V ABI, touch only registers and, for `mem`,
        // bytes [0, MEM_BUF_SIZE) of `buf`, which is that large and exclusively ours.
        unsafe { f(n, buf.as_mut_ptr()) }
    }
}

/// The ALU loop, natively.
pub fn native_loop_alu(n: u64) -> u64 {
    BenchLoop::Alu.run_native(n)
}

/// The memory loop, natively (on a fresh zeroed 64 KiB buffer, as in the guest).
pub fn native_loop_mem(n: u64) -> u64 {
    BenchLoop::Mem.run_native(n)
}

/// The branch loop, natively.
pub fn native_loop_branch(n: u64) -> u64 {
    BenchLoop::Branch.run_native(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Reference models of the loops in plain Rust: the assembly must compute the same.
    fn model_alu(n: u64) -> u64 {
        let (mut rax, mut rdx, mut rcx) = (0x9e37_79b9_7f4a_7c15u64, n, 0x2545_f491_4f6c_dd1du64);
        for _ in 0..n {
            rax = rax.wrapping_add(rdx);
            rdx ^= rcx;
            rax = rax.rotate_left(13);
            rcx = rcx.wrapping_add(rax.wrapping_mul(2)).wrapping_add(7);
            rdx = rdx.wrapping_mul(rax);
            rcx = rcx.wrapping_sub(rdx);
            rdx |= 1;
            rcx = rcx.rotate_right(7);
        }
        rax ^ rcx
    }

    fn model_mem(n: u64) -> u64 {
        let mut buf = vec![0u64; MEM_BUF_SIZE / 8];
        let (mut rdx, mut rax) = (0usize, 0u64);
        let mut rdi = n;
        while rdi != 0 {
            let rcx = buf[rdx / 8].wrapping_add(rdi);
            buf[rdx / 8] = rcx;
            rax = rax.wrapping_add(rcx);
            rax ^= buf[rdx / 8 + 1];
            rdx = (rdx + 80) & 0xfff0;
            rdi -= 1;
        }
        rax
    }

    fn model_branch(n: u64) -> u64 {
        let (mut rax, mut rdx) = (n, 0u64);
        for _ in 0..n {
            rax = rax
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            if rax & (1 << 40) != 0 {
                rdx = rdx.wrapping_sub(1);
            } else {
                rdx = rdx.wrapping_add(3);
            }
        }
        rax.wrapping_add(rdx)
    }

    #[test]
    fn native_loops_match_their_models() {
        for n in [0u64, 1, 2, 3, 1000, 4099] {
            assert_eq!(native_loop_alu(n), model_alu(n), "alu n={n}");
            assert_eq!(native_loop_mem(n), model_mem(n), "mem n={n}");
            assert_eq!(native_loop_branch(n), model_branch(n), "branch n={n}");
        }
    }

    #[test]
    fn native_results_match_the_guest() {
        // `cpubench: result=` lines printed by the cpubench guest under KVM (ring 0 and
        // ring 3): the host runs the identical code.
        assert_eq!(native_loop_alu(100_000), 0x1f62_a15b_b737_c41e);
        assert_eq!(native_loop_mem(1_000_000), 0x0000_4a3e_01a3_4ba0);
        assert_eq!(native_loop_branch(1_000_000), 0x570d_ceed_5e6b_821c);
        assert_eq!(native_loop_branch(1000), 0x8689_2fb1_37dc_471c);
    }

    #[test]
    fn names_round_trip() {
        for l in BenchLoop::ALL {
            assert_eq!(BenchLoop::from_name(l.name()), Some(l));
            assert!(l.insns_per_iter() >= 8);
        }
        assert_eq!(BenchLoop::from_name("fpu"), None);
    }
}
