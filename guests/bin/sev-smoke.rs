//! sev-smoke: the SEV-ES smoke test (after KVM's sev_smoke_test): checks what an SEV-ES
//! guest sees, prints it, and ends with a termination request instead of an exit status.
//!
//! Checks (each prints a line):
//! - the runtime's SEV-ES setup is active (GHCB registered, #VC handler installed);
//! - SEV_STATUS (MSR 0xC001_0131, read by RDMSR) has bit 0 (SEV) and bit 1 (SEV-ES);
//! - CPUID 0x8000_001F through #VC and the GHCB: EAX bit 1 (SEV) and bit 3 (SEV-ES),
//!   EBX[5:0] = 47, equal to the SEV_INFO C-bit; the same values through the GHCB MSR
//!   protocol (four CPUID requests);
//! - memory: CR3 has the C-bit; code, stack and data pages are private (C-bit set in the
//!   leaf entry), the GHCB page shared (C-bit clear, 4 KiB page);
//! - RDTSC through #VC does not go backwards.
//!
//! Arguments: `reason-set=S` (default 0), `reason-code=C` (default 0): the termination
//! reason; `term=msr|ghcb` (default msr): GHCB MSR protocol request 0x100, or a GHCB
//! TERM_REQUEST (exit 0x8000_FFFE, SW_EXITINFO2 = 0x5e5); `gp-msr=N`: also RDMSR N and
//! expect the hypervisor to answer #GP (raised by the #VC handler, caught here).
//!
//! Output ends with
//! `sev-smoke: all checks passed; requesting termination (msr protocol, reason set S, code C)`
//! and the VMM must report "guest terminated" with that reason. A failed check: `FAIL:`
//! line and exit status 1 (through the debug-exit port).
#![no_std]
#![no_main]

use esvm_rt::sev::{self, SevMode};
use esvm_rt::sevabi::{self, term};
use esvm_rt::{arg, arg_u64_or_exit, check, check_eq, entry, println, x86, BootInfo, Dec, Hex};

entry!(main, sev_es);

fn main(bi: &'static BootInfo) -> u32 {
    let set = arg_u64_or_exit("reason-set", u64::from(term::SET_GENERAL));
    let code = arg_u64_or_exit("reason-code", u64::from(term::GENERAL));
    let use_ghcb = match arg("term") {
        None | Some("msr") => false,
        Some("ghcb") => true,
        Some(other) => {
            println!("error: term={} (expected msr or ghcb)", other);
            return 2;
        }
    };
    if set > 15 || code > 255 {
        println!("error: reason-set must be 0..=15 and reason-code 0..=255");
        return 2;
    }
    let Some(info) = sev::info() else {
        println!(
            "FAIL: sev-smoke: not an SEV-ES boot (flags {})",
            Hex(u64::from(bi.flags))
        );
        return 1;
    };
    check!(
        info.mode == SevMode::Full,
        "sev-smoke: SEV-ES support not in full mode"
    );
    println!(
        "sev-smoke: SEV-ES guest: GHCB protocol {} (hypervisor {}..{}), GHCB at {}, C-bit {}",
        Dec(u64::from(info.version)),
        Dec(u64::from(info.hv_min_version)),
        Dec(u64::from(info.hv_max_version)),
        Hex(info.ghcb_gpa),
        Dec(u64::from(info.c_bit))
    );

    // SEV_STATUS.
    let status = x86::rdmsr(sevabi::MSR_SEV_STATUS);
    println!("sev-smoke: SEV_STATUS={}", Hex(status));
    check!(
        status & sevabi::SEV_STATUS_SEV != 0 && status & sevabi::SEV_STATUS_SEV_ES != 0,
        "sev-smoke: SEV_STATUS {} lacks SEV (bit 0) or SEV-ES (bit 1)",
        Hex(status)
    );

    // CPUID through #VC + GHCB, and through the MSR protocol.
    let vcs = sev::vc_count();
    let (a, b, c, d) = x86::cpuid(sevabi::CPUID_SEV_LEAF, 0);
    check!(
        sev::vc_count() > vcs,
        "sev-smoke: CPUID did not go through #VC"
    );
    println!(
        "sev-smoke: CPUID 0x8000001f (#VC/GHCB): eax={} ebx={} ecx={} edx={}",
        Hex(u64::from(a)),
        Hex(u64::from(b)),
        Hex(u64::from(c)),
        Hex(u64::from(d))
    );
    check!(
        a & sevabi::CPUID_SEV_EAX_SEV != 0 && a & sevabi::CPUID_SEV_EAX_SEV_ES != 0,
        "sev-smoke: CPUID 0x8000001f eax={} lacks SEV (bit 1) or SEV-ES (bit 3)",
        Hex(u64::from(a))
    );
    let cbit = (b & sevabi::CPUID_SEV_EBX_CBIT_MASK) as u8;
    check_eq!(
        cbit,
        sevabi::C_BIT_POSITION,
        "C-bit position (CPUID 0x8000001f ebx[5:0])"
    );
    check_eq!(cbit, info.c_bit, "C-bit position (CPUID vs SEV_INFO)");
    match sev::msr_cpuid(sevabi::CPUID_SEV_LEAF) {
        Ok(m) => {
            println!(
                "sev-smoke: CPUID 0x8000001f (MSR protocol): eax={} ebx={} ecx={} edx={}",
                Hex(u64::from(m[0])),
                Hex(u64::from(m[1])),
                Hex(u64::from(m[2])),
                Hex(u64::from(m[3]))
            );
            check!(
                m == [a, b, c, d],
                "sev-smoke: CPUID through the MSR protocol differs from CPUID through the GHCB"
            );
        }
        Err(resp) => {
            println!("FAIL: sev-smoke: MSR-protocol CPUID answered {}", Hex(resp));
            return 1;
        }
    }

    // Private and shared memory.
    let cmask = 1u64 << info.c_bit;
    check!(
        x86::read_cr3() & cmask != 0,
        "sev-smoke: CR3 {} lacks the C-bit",
        Hex(x86::read_cr3())
    );
    let local = 0u64;
    let places: [(&str, u64); 4] = [
        ("code", main as fn(&'static BootInfo) -> u32 as usize as u64),
        ("stack", core::ptr::addr_of!(local) as u64),
        ("boot info", bi as *const BootInfo as u64),
        ("free memory", bi.free_start),
    ];
    for (what, va) in places {
        match sev::translate(va) {
            Some(t) => check!(
                t.encrypted,
                "sev-smoke: {} page {} is not private",
                what,
                Hex(va)
            ),
            None => {
                println!("FAIL: sev-smoke: {} page {} is not mapped", what, Hex(va));
                return 1;
            }
        }
    }
    match sev::translate(info.ghcb_gpa) {
        Some(t) => {
            check!(!t.encrypted, "sev-smoke: the GHCB page is private");
            check_eq!(t.page_size, 4096, "GHCB page size");
            check_eq!(t.phys, info.ghcb_gpa, "GHCB identity mapping");
        }
        None => {
            println!("FAIL: sev-smoke: the GHCB page is not mapped");
            return 1;
        }
    }
    println!("sev-smoke: CR3, code, stack, boot info and free memory private; GHCB page shared");

    // RDTSC through #VC.
    let t0 = x86::rdtsc();
    let t1 = x86::rdtsc();
    check!(
        t1 >= t0,
        "sev-smoke: RDTSC went backwards ({} then {})",
        Hex(t0),
        Hex(t1)
    );
    println!("sev-smoke: RDTSC through #VC: {} then {}", Hex(t0), Hex(t1));

    // Optional: an MSR the hypervisor refuses with #GP.
    if let Some(v) = arg("gp-msr") {
        let Some(msr) = esvm_rt::args::parse_u64(v) else {
            println!("error: gp-msr={} is not a number", v);
            return 2;
        };
        match esvm_rt::trap::catch(|| {
            let _ = x86::rdmsr(msr as u32);
        }) {
            Err(f) => {
                check_eq!(f.vector, 13, "exception raised for RDMSR of gp-msr");
                println!(
                    "sev-smoke: RDMSR {} raised #GP through the #VC handler",
                    Hex(msr)
                );
            }
            Ok(()) => {
                println!("FAIL: sev-smoke: RDMSR {} did not raise #GP", Hex(msr));
                return 1;
            }
        }
    }

    println!(
        "sev-smoke: {} #VCs, {} VMGEXITs so far",
        Dec(sev::vc_count()),
        Dec(sev::vmgexit_count())
    );
    println!(
        "sev-smoke: all checks passed; requesting termination ({}, reason set {}, code {})",
        if use_ghcb {
            "GHCB TERM_REQUEST"
        } else {
            "msr protocol"
        },
        Dec(set),
        Dec(code)
    );
    if use_ghcb {
        sev::ghcb_terminate(set as u8, code as u8, 0x5e5)
    } else {
        sev::flush();
        sev::msr_terminate(set as u8, code as u8)
    }
}
