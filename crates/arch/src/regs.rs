//! General-purpose registers, RIP and RFLAGS.

use serde::{Deserialize, Serialize};

/// Index of a general-purpose register in [`Regs::gpr`], in the x86 encoding order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Gpr {
    Rax = 0,
    Rcx = 1,
    Rdx = 2,
    Rbx = 3,
    Rsp = 4,
    Rbp = 5,
    Rsi = 6,
    Rdi = 7,
    R8 = 8,
    R9 = 9,
    R10 = 10,
    R11 = 11,
    R12 = 12,
    R13 = 13,
    R14 = 14,
    R15 = 15,
}

impl Gpr {
    pub const ALL: [Gpr; 16] = [
        Gpr::Rax,
        Gpr::Rcx,
        Gpr::Rdx,
        Gpr::Rbx,
        Gpr::Rsp,
        Gpr::Rbp,
        Gpr::Rsi,
        Gpr::Rdi,
        Gpr::R8,
        Gpr::R9,
        Gpr::R10,
        Gpr::R11,
        Gpr::R12,
        Gpr::R13,
        Gpr::R14,
        Gpr::R15,
    ];

    pub fn name(self) -> &'static str {
        [
            "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11",
            "r12", "r13", "r14", "r15",
        ][self as usize]
    }
}

/// The registers KVM calls `kvm_regs`: sixteen GPRs, RIP and RFLAGS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Regs {
    /// Indexed by [`Gpr`] (x86 encoding order: rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi, r8..r15).
    pub gpr: [u64; 16],
    pub rip: u64,
    pub rflags: u64,
}

impl Default for Regs {
    fn default() -> Self {
        Regs {
            gpr: [0; 16],
            rip: 0,
            rflags: crate::bits::rflags::FIXED,
        }
    }
}

impl Regs {
    pub fn get(&self, r: Gpr) -> u64 {
        self.gpr[r as usize]
    }
    pub fn set(&mut self, r: Gpr, v: u64) {
        self.gpr[r as usize] = v;
    }
}
