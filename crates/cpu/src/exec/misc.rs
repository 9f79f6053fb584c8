//! Hint-space NOPs, cache-line and prefetch hints, fences, RDRAND/RDSEED.
//!
//! - `0F 18`..`0F 1F` with any ModRM and any prefixes (multi-byte NOP, PREFETCHh, the
//!   reserved NOPs, ENDBR32/ENDBR64, RDSSPD/RDSSPQ, CLDEMOTE) do nothing: the modelled CPU
//!   (AMD family 17h) has no CET or MPX, so they are the architectural NOPs there. A memory
//!   operand is not accessed and cannot fault.
//! - PREFETCH/PREFETCHW (`0F 0D` with a memory operand) never fault either.
//! - CLFLUSH, CLFLUSHOPT and CLWB do the checks of a one-byte load (segment checks, the
//!   page walk: #GP on a non-canonical address, #PF on an unmapped or supervisor-only one
//!   from CPL 3) without accessing the byte; memory is coherent, so nothing else remains.
//! - LFENCE and SFENCE are no-ops (the host is x86, whose stores are already ordered as the
//!   guest expects; non-temporal stores are plain stores here); MFENCE is a host full
//!   fence, so a store before it is globally visible before a load after it, for other
//!   vCPU threads too.
//! - RDRAND and RDSEED (16/32/64-bit) always succeed (CF = 1; OF, SF, ZF, AF, PF cleared)
//!   and return the next output of a per-vCPU SplitMix64 generator: deterministic by
//!   design (a run is reproducible, like the virtual clock), seeded from
//!   [`crate::CpuConfig::rdrand_seed`] and the vCPU number, its state carried by vCPU
//!   snapshots ([`esvm_arch::VcpuSnapshot::rdrand`]). It is not a cryptographic generator:
//!   a guest that needs secrecy must get entropy from elsewhere (e.g. a virtio-rng device).

use super::{Handler, Insn};
use crate::mmu::Acc;
use crate::{Cpu, Mode, R};
use esvm_arch::bits::rflags::CF;
use iced_x86::{Instruction, Mnemonic};

/// The initial generator state of vCPU `vcpu_id` for `seed`.
pub(crate) fn rng_init(seed: u64, vcpu_id: u32) -> u64 {
    seed ^ u64::from(vcpu_id).wrapping_mul(0xd1b5_4a32_d192_ed03)
}

impl Cpu {
    /// The next RDRAND/RDSEED value (SplitMix64).
    pub(crate) fn rng_next(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

fn h_nop(_c: &mut Cpu, _d: &Insn) -> R {
    Ok(())
}

fn h_mfence(_c: &mut Cpu, _d: &Insn) -> R {
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    Ok(())
}

/// CLFLUSH/CLFLUSHOPT/CLWB: the permission checks of a byte load, no access.
fn h_clflush(c: &mut Cpu, d: &Insn) -> R {
    let ea = c.ea(d);
    let lin = c.lin(d.seg as usize, ea, 1, false)?;
    let user = c.cpl == 3;
    c.translate(lin, Acc::Read, user)?;
    Ok(())
}

fn h_rdrand(c: &mut Cpu, d: &Insn) -> R {
    let v = c.rng_next();
    c.rw(d.r0, d.sz as usize, v);
    c.set_arith(CF);
    Ok(())
}

pub(crate) fn select(
    m: Mnemonic,
    _i: &Instruction,
    d: &mut Insn,
    bytes: &[u8],
    mode: Mode,
) -> Option<Handler> {
    use Mnemonic as M;
    let k = super::opcode_index(mode, bytes);
    if bytes.get(k) == Some(&0x0f) && matches!(bytes.get(k + 1), Some(0x18..=0x1f)) {
        return Some(h_nop);
    }
    let h: Handler = match m {
        M::Lfence | M::Sfence => h_nop,
        M::Mfence => h_mfence,
        M::Clflush | M::Clflushopt | M::Clwb => h_clflush,
        M::Prefetch | M::Prefetchw | M::Prefetchwt1 => h_nop,
        M::Rdrand | M::Rdseed if matches!(d.sz, 2 | 4 | 8) => h_rdrand,
        _ => return None,
    };
    Some(h)
}

#[cfg(test)]
mod tests {
    use crate::mem::PhysMemory;
    use crate::testutil::{Harness, CODE, DATA};
    use crate::{CpuConfig, Exit};
    use esvm_arch::bits::{rflags, vector};
    use iced_x86::code_asm::*;

    fn machine(code: &[u8], config: CpuConfig) -> Harness {
        let mem = PhysMemory::new_owned(16 << 20).unwrap();
        let mut h = Harness::with_memory(mem, config);
        h.load(code);
        h
    }

    fn run(code: &[u8]) -> Harness {
        let mut h = machine(code, CpuConfig::default());
        assert_eq!(h.run(), Exit::Hlt);
        h
    }

    #[test]
    fn hint_space_nops_never_fault() {
        let mut code = vec![
            0x48, 0xc7, 0xc0, 0x2a, 0, 0, 0, // mov rax, 42
            0x48, 0xc7, 0xc3, 0, 0, 0, 0x40, // mov rbx, 0x40000000 (unmapped)
            0xf3, 0x0f, 0x1e, 0xfa, // endbr64
            0xf3, 0x0f, 0x1e, 0xfb, // endbr32
            0x66, 0xf3, 0x0f, 0x1e, 0xfa, // endbr64 with an extra prefix
            0xf3, 0x48, 0x0f, 0x1e, 0xc8, // rdsspq rax: a NOP without CET
            0xf3, 0x0f, 0x1e, 0xc8, // rdsspd eax
            0x0f, 0x1f, 0x00, // nop [rax]
            0x0f, 0x1f, 0x44, 0x00, 0x00, // nop [rax+rax]
            0x66, 0x66, 0x2e, 0x0f, 0x1f, 0x84, 0, 0, 0, 0, 0, // 11-byte NOP
            0x0f, 0x1c, 0x03, // cldemote [rbx]
            0xf3, 0x0f, 0x1a, 0x03, // reserved NOP (BNDCL form) [rbx]
            0x66, 0x0f, 0x1b, 0x03, // reserved NOP [rbx]
            0x0f, 0x19, 0xc0, // reserved NOP, register form
            0x0f, 0x0d, 0x0b, // prefetchw [rbx]
            0x0f, 0x0d, 0x03, // prefetch [rbx]
            0x0f, 0xae, 0xe8, // lfence
            0x0f, 0xae, 0xf0, // mfence
            0x0f, 0xae, 0xf8, // sfence
        ];
        for reg in 0..8u8 {
            code.extend_from_slice(&[0x0f, 0x18, reg << 3 | 3]); // prefetch*/reserved [rbx]
        }
        // A non-canonical address is no fault for a hint either.
        code.extend_from_slice(&[0x48, 0xbb]);
        code.extend_from_slice(&0x8000_0000_0000_0000u64.to_le_bytes());
        code.extend_from_slice(&[0x0f, 0x18, 0x0b, 0x0f, 0x1f, 0x03, 0xf4]);
        let h = run(&code);
        assert_eq!(h.exception(), None, "{:x?}", h.exception());
        assert_eq!(h.cpu.regs().gpr[0], 42, "RDSSP left RAX alone");
    }

    #[test]
    fn clflush_checks_like_a_byte_load() {
        for prefix in [&[][..], &[0x66][..]] {
            for reg in [7u8, 6] {
                // CLFLUSH / CLFLUSHOPT (66, /7), CLWB (66, /6) of [rbx].
                if prefix.is_empty() && reg == 6 {
                    continue; // 0F AE /6 without 66 is XSAVEOPT
                }
                let mut insn = prefix.to_vec();
                insn.extend_from_slice(&[0x0f, 0xae, reg << 3 | 3]);
                for (addr, want) in [
                    (DATA, None),
                    (0x4000_1234u64, Some((vector::PF, Some(0u32)))),
                    (0x8000_0000_0000_0000, Some((vector::GP, Some(0)))),
                ] {
                    let mut code = vec![0x48, 0xbb];
                    code.extend_from_slice(&addr.to_le_bytes());
                    code.extend_from_slice(&insn);
                    code.push(0xf4);
                    let h = run(&code);
                    let e = h.exception().map(|e| (e.vector, e.error_code));
                    assert_eq!(e, want, "{insn:02x?} at {addr:#x}");
                    if want.is_some_and(|w| w.0 == vector::PF) {
                        assert_eq!(h.cpu.sregs().cr2, addr);
                    }
                }
            }
        }
    }

    fn rdrand_run(config: CpuConfig, n: usize) -> (Harness, Vec<u64>) {
        let code = {
            let mut a = CodeAssembler::new(64).unwrap();
            a.mov(rbx, DATA).unwrap();
            for k in 0..n {
                a.rdrand(rax).unwrap();
                a.mov(qword_ptr(rbx + 8 * k as i32), rax).unwrap();
            }
            a.hlt().unwrap();
            a.assemble(CODE).unwrap()
        };
        let mut h = machine(&code, config);
        assert_eq!(h.run(), Exit::Hlt);
        assert_eq!(h.exception(), None);
        let v = (0..n)
            .map(|k| h.mem().read_u64(DATA + 8 * k as u64).unwrap())
            .collect();
        (h, v)
    }

    #[test]
    fn rdrand_is_deterministic_per_seed_and_vcpu() {
        let (_, a) = rdrand_run(CpuConfig::default(), 4);
        let (_, b) = rdrand_run(CpuConfig::default(), 4);
        assert_eq!(a, b);
        assert!(a.windows(2).all(|w| w[0] != w[1]));
        let (_, c) = rdrand_run(
            CpuConfig {
                vcpu_id: 1,
                ..CpuConfig::default()
            },
            4,
        );
        let (_, d) = rdrand_run(
            CpuConfig {
                rdrand_seed: 7,
                ..CpuConfig::default()
            },
            4,
        );
        assert_ne!(a, c);
        assert_ne!(a, d);
    }

    #[test]
    fn rdrand_rdseed_sizes_and_flags() {
        let code = {
            let mut a = CodeAssembler::new(64).unwrap();
            a.mov(rax, -1i64).unwrap();
            a.mov(rcx, -1i64).unwrap();
            a.mov(rdx, -1i64).unwrap();
            a.stc().unwrap(); // a result must set CF itself
            a.clc().unwrap();
            a.cmp(eax, 0).unwrap(); // OF/SF/ZF/AF/PF in some state
            a.rdrand(ax).unwrap();
            a.rdseed(ecx).unwrap();
            a.rdseed(rdx).unwrap();
            a.hlt().unwrap();
            a.assemble(CODE).unwrap()
        };
        let h = run(&code);
        assert_eq!(h.exception(), None);
        let r = h.cpu.regs();
        assert_eq!(r.gpr[0] >> 16, 0xffff_ffff_ffff, "16-bit form merges");
        assert_eq!(r.gpr[1] >> 32, 0, "32-bit form zero-extends");
        assert_eq!(r.rflags & rflags::ARITH, rflags::CF);
    }

    #[test]
    fn rdrand_state_travels_in_snapshots() {
        let (h, _) = rdrand_run(CpuConfig::default(), 3);
        let snap = h.cpu.snapshot();
        assert!(snap.rdrand.is_some());
        // A fresh vCPU with another seed continues the stream after restore.
        let (mut other, _) = rdrand_run(
            CpuConfig {
                rdrand_seed: 99,
                ..CpuConfig::default()
            },
            1,
        );
        other.cpu.restore(&snap).unwrap();
        let mut h = h;
        let want: Vec<u64> = (0..3).map(|_| h.cpu.rng_next()).collect();
        let got: Vec<u64> = (0..3).map(|_| other.cpu.rng_next()).collect();
        assert_eq!(want, got);
        // Snapshots without the field (KVM's, older files) keep the target's state.
        let mut s2 = snap.clone();
        s2.rdrand = None;
        let before = other.cpu.rng;
        other.cpu.restore(&s2).unwrap();
        assert_eq!(other.cpu.rng, before);
    }
}
