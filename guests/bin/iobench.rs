//! iobench: port-I/O exit round trips, for `esvm bench io`.
//!
//! Writes `n=N` (default 100000) bytes to the null port 0x80, one exit each, between two
//! markers on port 0xF5 (0xE5B0_0011 before, 0xE5B0_0012 after). Booted plain, each write is
//! an `out` instruction (one port-I/O exit); booted as an SEV-ES guest, each write is a
//! GHCB IOIO request and one VMGEXIT round trip (no #VC: the request is issued directly).
#![no_std]
#![no_main]

use esvm_rt::{arg_u64_or_exit, entry, println, sev, BootInfo, Dec};

entry!(main, sev_es);

const NULL_PORT: u16 = 0x80;
const MARK_PORT: u16 = 0xF5;
const MARK_START: u32 = 0xE5B0_0011;
const MARK_END: u32 = 0xE5B0_0012;

fn out8(port: u16, v: u8) {
    // SAFETY: port output to the VMM's null/marker ports has no memory effects.
    unsafe { core::arch::asm!("out dx, al", in("dx") port, in("al") v, options(nostack)) }
}

fn out32(port: u16, v: u32) {
    // SAFETY: as above.
    unsafe { core::arch::asm!("out dx, eax", in("dx") port, in("eax") v, options(nostack)) }
}

fn main(_bi: &'static BootInfo) -> u32 {
    let n = arg_u64_or_exit("n", 100_000);
    let protected = sev::protected();
    if protected {
        let _ = sev::io_out(MARK_PORT, 4, MARK_START);
        for i in 0..n {
            if sev::io_out(NULL_PORT, 1, i as u32).is_err() {
                return 1;
            }
        }
        let _ = sev::io_out(MARK_PORT, 4, MARK_END);
    } else {
        out32(MARK_PORT, MARK_START);
        for i in 0..n {
            out8(NULL_PORT, i as u8);
        }
        out32(MARK_PORT, MARK_END);
    }
    println!(
        "iobench: {} writes to port 0x80 ({})",
        Dec(n),
        if protected {
            "GHCB IOIO + VMGEXIT"
        } else {
            "OUT exits"
        }
    );
    0
}
