//! sev-cr: control-register writes in an SEV-ES guest, with a checkpoint after each so the
//! host can compare the hypervisor's tracked CR0/CR4/CR8/EFER (refreshed by the write
//! traps) with what the guest wrote.
//!
//! Steps (`esvm_abi::testing::cr_steps::STEPS`): 1 CR0 |= AM, 2 CR0 &= !MP, 3 CR0 |= MP &
//! &= !AM, 4 CR4 |= PGE, 5 CR4 &= !OSXMMEXCPT, 6 CR4 |= OSXMMEXCPT & &= !PGE, 7 CR8 = 5,
//! 8 CR8 = 15, 9 CR8 = 0, 10 EFER &= !SCE, 11 EFER |= SCE. CR0/CR4/CR8 are written with
//! MOV, EFER with WRMSR, read back with MOV and RDMSR.
//!
//! For step 0 (the state at main, nothing written) and after each step n the guest prints
//! ```text
//! sev-cr: step <n> <reg>: cr0=<hex> cr4=<hex> cr8=<hex> efer=<hex> vc=<#VCs in the step>
//! ```
//! checks the read-back values against `cr_steps::expected(step-0 state, n)` and writes
//! `checkpoint::cr_step(n)` (0x5EC0_0000 | n, 32-bit) to the checkpoint port 0xF6 through
//! the GHCB. At a checkpoint the hypervisor's tracked values must equal the ones printed.
//! `vc=` counts #VCs during the write and read-back (0 if EFER accesses are not
//! intercepted). Ends with `sev-cr: all 11 steps passed`, exit status 0; a mismatch prints
//! `FAIL:` and exits 1.
#![no_std]
#![no_main]

use esvm_abi::testing::checkpoint;
use esvm_abi::testing::cr_steps::{self, CrReg, CrState, STEPS};
use esvm_rt::x86::{self, MSR_EFER};
use esvm_rt::{entry, println, BootInfo, Dec, Hex};

entry!(main, sev_es);

fn read_state() -> CrState {
    CrState {
        cr0: x86::read_cr0(),
        cr4: x86::read_cr4(),
        cr8: x86::read_cr8(),
        efer: x86::rdmsr(MSR_EFER),
    }
}

fn name(reg: Option<CrReg>) -> &'static str {
    match reg {
        None => "initial",
        Some(CrReg::Cr0) => "cr0",
        Some(CrReg::Cr4) => "cr4",
        Some(CrReg::Cr8) => "cr8",
        Some(CrReg::Efer) => "efer",
    }
}

fn report(n: usize, reg: Option<CrReg>, s: CrState, vcs: u64) {
    println!(
        "sev-cr: step {} {}: cr0={} cr4={} cr8={} efer={} vc={}",
        Dec(n as u64),
        name(reg),
        Hex(s.cr0),
        Hex(s.cr4),
        Hex(s.cr8),
        Hex(s.efer),
        Dec(vcs)
    );
}

fn main(_bi: &'static BootInfo) -> u32 {
    if esvm_rt::sev::info().is_none() {
        println!("FAIL: sev-cr: not an SEV-ES boot; run it with --sev-es");
        return 1;
    }
    let vc0 = esvm_rt::sev::vc_count();
    let initial = read_state();
    report(0, None, initial, esvm_rt::sev::vc_count() - vc0);
    esvm_rt::sev::checkpoint(checkpoint::cr_step(0));
    for (i, step) in STEPS.iter().enumerate() {
        let n = i + 1;
        let want = cr_steps::expected(initial, n);
        let vc0 = esvm_rt::sev::vc_count();
        // SAFETY: each step toggles bits that are harmless here (see esvm_abi::testing::cr_steps):
        // paging, protected mode and long mode stay as they are.
        unsafe {
            match step.reg {
                CrReg::Cr0 => x86::write_cr0(want.cr0),
                CrReg::Cr4 => x86::write_cr4(want.cr4),
                CrReg::Cr8 => x86::write_cr8(want.cr8),
                CrReg::Efer => x86::wrmsr(MSR_EFER, want.efer),
            }
        }
        let got = read_state();
        report(n, Some(step.reg), got, esvm_rt::sev::vc_count() - vc0);
        if got != want {
            println!(
                "FAIL: sev-cr: step {}: expected cr0={} cr4={} cr8={} efer={}",
                Dec(n as u64),
                Hex(want.cr0),
                Hex(want.cr4),
                Hex(want.cr8),
                Hex(want.efer)
            );
            return 1;
        }
        esvm_rt::sev::checkpoint(checkpoint::cr_step(n as u32));
    }
    println!("sev-cr: all {} steps passed", Dec(STEPS.len() as u64));
    0
}
