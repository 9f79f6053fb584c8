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
//! - RDTSC (through #VC if the hypervisor intercepts it) does not go backwards;
//! - port I/O through #VC: IN from the UART's LSR (THRE set), REP INSB of 4 LSR bytes, REP
//!   OUTSB of `sev-smoke: REP OUTSB through #VC ok` and, with DF=1, ` (DF=1 ok)` to COM1,
//!   OUT of the newline (RSI/RDI/RCX checked afterwards; exactly 5 #VCs).
//!
//! Arguments: `reason-set=S` (default 0), `reason-code=C` (default 0): the termination
//! reason; `term=msr|ghcb` (default msr): GHCB MSR protocol request 0x100, or a GHCB
//! TERM_REQUEST (exit 0x8000_FFFE, SW_EXITINFO2 = 0x5e5); `gp-msr=N`: also RDMSR N and
//! expect the hypervisor to answer #GP (raised by the #VC handler, caught here), then again
//! with a #GP handler that executes CPUID: a #VC nested inside the #VC handler; `extra=1`:
//! also WBINVD, DR7 write/read/write (0x500, then back to 0x400), MONITOR + MWAIT, RDTSCP
//! and VMMCALL (RAX = 0; the hypervisor's answer is printed, not checked), 8 #VCs;
//! `mtrr=V`: the MTRRs through #VC: MTRR_DEF_TYPE reads V (what the VMM set before the
//! launch), MTRRCAP reads 0x508, PHYSBASE0 keeps a write, and a write of an invalid memory
//! type raises #GP; `nmi=1`: an NMI handler that executes CPUID (a #VC, whose IRET ends
//! the CPU's own NMI blocking) before it sends NMI_COMPLETE, then the checkpoint
//! `NMI_READY`, at which the host injects two NMIs: both must arrive, one after the other,
//! never one inside the other's handler (the hypervisor holds the second until the
//! NMI_COMPLETE); `jump-table=1`: AP_JUMP_TABLE SET of 0x9F000, the checkpoint
//! `JUMP_TABLE_SET`, about 20 M instructions of spinning (a host may migrate the guest
//! meanwhile), then a GET that must answer 0x9F000.
//!
//! Output ends with
//! `sev-smoke: all checks passed; requesting termination (msr protocol, reason set S, code C)`
//! and the VMM must report "guest terminated" with that reason. A failed check: `FAIL:`
//! line and exit status 1 (through the debug-exit port).
#![no_std]
#![no_main]

use core::arch::asm;
use core::sync::atomic::{AtomicU64, Ordering};
use esvm_abi::exit_code as sevabi_exit;
use esvm_abi::sev as sevabi;
use esvm_abi::term;
use esvm_rt::idt::{self, InterruptFrame};
use esvm_rt::sev::{self, SevMode};
use esvm_rt::{arg, arg_u64_or_exit, check, check_eq, entry, println, x86, BootInfo, Dec, Hex};

entry!(main, sev_es);

static NESTED_CPUID: AtomicU64 = AtomicU64::new(0);

/// #GP handler for the nesting test: CPUID (a nested #VC), then skip the 2-byte RDMSR.
fn on_gp(f: &mut InterruptFrame) {
    let (_, b, _, _) = x86::cpuid(0, 0);
    NESTED_CPUID.store(u64::from(b) | (1 << 32), Ordering::SeqCst);
    f.rip += 2;
}

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

    // RDTSC: executed directly or through #VC, as the hypervisor chose.
    let t0 = x86::rdtsc();
    let t1 = x86::rdtsc();
    check!(
        t1 >= t0,
        "sev-smoke: RDTSC went backwards ({} then {})",
        Hex(t0),
        Hex(t1)
    );
    println!("sev-smoke: RDTSC: {} then {}", Hex(t0), Hex(t1));

    // Port I/O through #VC: IN, REP INSB, REP OUTSB (forwards and with DF=1), OUT.
    sev::flush();
    let vcs = sev::vc_count();
    let lsr = x86::inb(0x3FD);
    check!(
        lsr & 0x20 != 0,
        "sev-smoke: UART LSR {} without THRE",
        Hex(u64::from(lsr))
    );
    let mut lsrs = [0u8; 4];
    let (rdi, rcx): (u64, u64);
    // SAFETY: REP INSB writes the 4 bytes of `lsrs`.
    unsafe {
        asm!("rep insb", in("dx") 0x3FDu16, inout("rdi") lsrs.as_mut_ptr() as u64 => rdi,
             inout("rcx") 4u64 => rcx, options(nostack))
    };
    check_eq!(rdi, lsrs.as_ptr() as u64 + 4, "RDI after REP INSB");
    check_eq!(rcx, 0, "RCX after REP INSB");
    check!(
        lsrs.iter().all(|&b| b & 0x20 != 0),
        "sev-smoke: REP INSB from the LSR read {:?}",
        lsrs
    );
    let fwd = b"sev-smoke: REP OUTSB through #VC ok";
    let back = b")ko 1=FD( ";
    let (rsi1, rsi2): (u64, u64);
    // SAFETY: REP OUTSB reads `fwd`, then (DF=1, from its last byte down) `back`; DF is
    // cleared again before the block ends.
    unsafe {
        asm!("rep outsb", in("dx") 0x3F8u16, inout("rsi") fwd.as_ptr() as u64 => rsi1,
             inout("rcx") fwd.len() as u64 => _, options(nostack));
        asm!("std", "rep outsb", "cld", in("dx") 0x3F8u16,
             inout("rsi") back.as_ptr() as u64 + back.len() as u64 - 1 => rsi2,
             inout("rcx") back.len() as u64 => _, options(nostack));
    }
    x86::outb(0x3F8, b'\n');
    check_eq!(
        rsi1,
        fwd.as_ptr() as u64 + fwd.len() as u64,
        "RSI after REP OUTSB"
    );
    check_eq!(
        rsi2,
        back.as_ptr() as u64 - 1,
        "RSI after REP OUTSB with DF=1"
    );
    check_eq!(
        sev::vc_count() - vcs,
        5,
        "#VCs for IN, REP INSB, 2x REP OUTSB, OUT"
    );

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
        // Again with a #GP handler that executes CPUID: a #VC nested in the handling of
        // the first one (the #GP is raised from inside the #VC handler).
        let (_, vendor, _, _) = x86::cpuid(0, 0);
        idt::set_handler(idt::vector::GP, on_gp);
        // SAFETY: RDMSR of the test MSR; the #GP handler skips it. No `nomem`: the handler
        // writes NESTED_CPUID.
        unsafe {
            asm!("rdmsr", in("ecx") msr as u32, out("eax") _, out("edx") _, options(nostack))
        };
        idt::clear_handler(idt::vector::GP);
        check_eq!(
            NESTED_CPUID.load(Ordering::SeqCst),
            u64::from(vendor) | (1 << 32),
            "CPUID 0 EBX read by a #GP handler raised inside the #VC handler"
        );
        println!("sev-smoke: #VC nested inside the #VC handler's #GP ok");
    }

    if arg_u64_or_exit("extra", 0) != 0 {
        extra_checks();
    }
    if arg_u64_or_exit("jump-table", 0) != 0 {
        const TABLE: u64 = 0x9_F000;
        check_eq!(
            sev::ap_jump_table(Some(TABLE)).unwrap_or(1),
            0,
            "AP_JUMP_TABLE SET"
        );
        sev::checkpoint(esvm_abi::testing::checkpoint::JUMP_TABLE_SET);
        for _ in 0..5_000_000u32 {
            core::hint::spin_loop();
        }
        check_eq!(
            sev::ap_jump_table(None).unwrap_or(1),
            TABLE,
            "AP_JUMP_TABLE GET after the SET"
        );
        println!("sev-smoke: AP jump table {} kept", Hex(TABLE));
    }
    if arg_u64_or_exit("nmi", 0) != 0 && !nmi_checks() {
        return 1;
    }
    if let Some(v) = arg("mtrr") {
        let Some(def_type) = esvm_rt::args::parse_u64(v) else {
            println!("error: mtrr={} is not a number", v);
            return 2;
        };
        if !mtrr_checks(def_type) {
            return 1;
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

static NMIS: AtomicU64 = AtomicU64::new(0);
static NMI_DEPTH: AtomicU64 = AtomicU64::new(0);
static NMI_MAX_DEPTH: AtomicU64 = AtomicU64::new(0);

static NMI_COMPLETES_OWED: AtomicU64 = AtomicU64::new(0);

fn nmi_complete() {
    if sev::nmi_complete().is_err() {
        sev::terminate(
            term::SET_ESVM,
            term::GHCB_BAD_RESPONSE,
            sevabi_exit::NMI_COMPLETE,
        );
    }
}

fn on_nmi(_f: &mut InterruptFrame) {
    if sev::ghcb_busy() {
        // Arrived between an NMI_COMPLETE's VMGEXIT and the GHCB's release (allowed: the
        // previous NMI is complete); the code that holds the GHCB completes this one.
        NMIS.fetch_add(1, Ordering::SeqCst);
        NMI_COMPLETES_OWED.fetch_add(1, Ordering::SeqCst);
        return;
    }
    let depth = NMI_DEPTH.fetch_add(1, Ordering::SeqCst) + 1;
    NMI_MAX_DEPTH.fetch_max(depth, Ordering::SeqCst);
    // A #VC inside the handler: its IRET ends the CPU's own NMI blocking, so only the
    // hypervisor's blocking (until NMI_COMPLETE) keeps the next NMI out of this handler.
    let _ = x86::cpuid(0, 0);
    NMIS.fetch_add(1, Ordering::SeqCst);
    NMI_DEPTH.fetch_sub(1, Ordering::SeqCst);
    nmi_complete();
    while NMI_COMPLETES_OWED.load(Ordering::SeqCst) > 0 {
        NMI_COMPLETES_OWED.fetch_sub(1, Ordering::SeqCst);
        nmi_complete();
    }
}

/// `nmi=1`: two NMIs injected at once arrive one after the other.
fn nmi_checks() -> bool {
    idt::set_handler(idt::vector::NMI, on_nmi);
    sev::checkpoint(esvm_abi::testing::checkpoint::NMI_READY);
    let mut spins = 0u64;
    while NMIS.load(Ordering::SeqCst) < 2 && spins < 50_000_000 {
        core::hint::spin_loop();
        spins += 1;
    }
    idt::clear_handler(idt::vector::NMI);
    check_eq!(NMIS.load(Ordering::SeqCst), 2, "NMIs received");
    check_eq!(
        NMI_MAX_DEPTH.load(Ordering::SeqCst),
        1,
        "NMI handlers nested (an NMI inside another's handler)"
    );
    println!("sev-smoke: 2 NMIs, the second after the first's NMI_COMPLETE ok");
    true
}

/// `mtrr=V`: MSRs outside the VMSA that the hypervisor emulates with state of its own.
fn mtrr_checks(def_type: u64) -> bool {
    const MTRRCAP: u32 = 0xfe;
    const DEF_TYPE: u32 = 0x2ff;
    const PHYSBASE0: u32 = 0x200;
    check_eq!(
        x86::rdmsr(DEF_TYPE),
        def_type,
        "MTRR_DEF_TYPE set before the launch"
    );
    check_eq!(x86::rdmsr(MTRRCAP), 0x508, "MTRRCAP: 8 ranges, fixed, WC");
    // SAFETY: MTRRs change no behaviour of the modelled machine (it has no caches).
    unsafe { x86::wrmsr(PHYSBASE0, 0x8000_0006) };
    check_eq!(
        x86::rdmsr(PHYSBASE0),
        0x8000_0006,
        "PHYSBASE0 after a write"
    );
    // Memory type 2 is reserved: #GP, raised by the #VC handler from the hypervisor's answer.
    match esvm_rt::trap::catch(|| {
        // SAFETY: as above; the write is refused.
        unsafe { x86::wrmsr(PHYSBASE0, 0x8000_0002) };
    }) {
        Err(f) => check_eq!(f.vector, 13, "exception for a reserved MTRR type"),
        Ok(()) => {
            println!("FAIL: sev-smoke: a reserved MTRR type was accepted");
            return false;
        }
    }
    check_eq!(
        x86::rdmsr(PHYSBASE0),
        0x8000_0006,
        "PHYSBASE0 after a refused write"
    );
    println!("sev-smoke: MTRRs through #VC ok");
    true
}

/// `extra=1`: the remaining #VC events, each checked only for completing (values printed).
fn extra_checks() {
    let vcs = sev::vc_count();
    let (dr7, aux, tsc, hc, rdtscp_vcs): (u64, u64, u64, u64, u64);
    // SAFETY: WBINVD has no effect on a guest's correctness; DR7 gets only its reset value
    // plus LE (no breakpoint enabled) and is restored; MONITOR/MWAIT on a local and a hint
    // of 0 return at the latest at the next event (the hypervisor treats MWAIT as a NOP);
    // RDTSCP and VMMCALL only return values in registers.
    unsafe {
        asm!("wbinvd", options(nomem, nostack));
        asm!("mov dr7, {v}", "mov {r}, dr7", "mov dr7, {d}", v = in(reg) 0x500u64,
             d = in(reg) 0x400u64, r = out(reg) dr7, options(nomem, nostack));
        let word = 0u64;
        asm!("monitor", "mwait", in("rax") core::ptr::addr_of!(word), in("ecx") 0u32,
             in("edx") 0u32, options(nostack));
        let before_rdtscp = sev::vc_count();
        let (lo, hi, c): (u32, u32, u32);
        asm!("rdtscp", out("eax") lo, out("edx") hi, out("ecx") c, options(nomem, nostack));
        tsc = u64::from(lo) | (u64::from(hi) << 32);
        aux = u64::from(c);
        rdtscp_vcs = sev::vc_count() - before_rdtscp;
        let rax: u64;
        asm!("mov {t}, rbx", "vmmcall", "mov rbx, {t}", t = out(reg) _,
             inout("rax") 0u64 => rax, out("rcx") _, out("rdx") _, options(nomem, nostack));
        hc = rax;
    }
    check_eq!(dr7, 0x500, "DR7 read back through the GHCB");
    // RDTSCP raises #VC only if the hypervisor intercepts it (KVM does not).
    check!(rdtscp_vcs <= 1, "RDTSCP raised more than one #VC");
    check_eq!(
        sev::vc_count() - vcs - rdtscp_vcs,
        7,
        "#VCs for WBINVD, 3x DR7, MONITOR, MWAIT, VMMCALL"
    );
    println!(
        "sev-smoke: extra: WBINVD, DR7={}, MONITOR/MWAIT, RDTSCP tsc={} aux={} ({}), VMMCALL rax={} ok",
        Hex(dr7),
        Hex(tsc),
        Hex(aux),
        if rdtscp_vcs == 1 { "intercepted" } else { "not intercepted" },
        Hex(hc)
    );
}
