//! sev-fpu: checks that the x87/SSE state the VMM put into the vCPU before launch (synced
//! into the VMSA by LAUNCH_UPDATE_VMSA) is what the guest finds at its first instruction.
//!
//! `_start` saves the state with FXSAVE64 before any other instruction could touch it
//! (`esvm_rt::sev::entry_fxsave`, protected boots only); this guest compares that image
//! with the pattern of `esvm_abi::testing::fpu_pattern`, which the host loads from the same
//! definition (`fpu_pattern::fxsave_image()`). Compared, byte for byte: FCW, FSW,
//! abridged FTW, MXCSR, the 80-bit values of ST0-ST7 and XMM0-XMM15 (28 fields).
//!
//! Output:
//! ```text
//! sev-fpu: FXSAVE image of the first instruction: fcw=<hex> fsw=<hex> ftw=<hex> mxcsr=<hex>
//! sev-fpu: all 28 fields (FCW, FSW, FTW, MXCSR, ST0-7, XMM0-15) match the pattern
//! ```
//! exit status 0. Each differing field: `FAIL: sev-fpu: <field> byte at offset <n> is <x>,
//! expected <y>`, then `FAIL: sev-fpu: <k> of 28 fields differ` and status 1.
#![no_std]
#![no_main]

use esvm_abi::testing::fpu_pattern::{self, COMPARED};
use esvm_rt::{entry, println, BootInfo, Dec, Hex};

entry!(main, sev_es);

fn u16_at(b: &[u8; 512], o: usize) -> u64 {
    u64::from(b[o]) | (u64::from(b[o + 1]) << 8)
}

fn main(_bi: &'static BootInfo) -> u32 {
    let Some(img) = esvm_rt::sev::entry_fxsave() else {
        println!("FAIL: sev-fpu: no FXSAVE image of the first instruction (not a protected boot?)");
        return 1;
    };
    println!(
        "sev-fpu: FXSAVE image of the first instruction: fcw={} fsw={} ftw={} mxcsr={}",
        Hex(u16_at(img, 0)),
        Hex(u16_at(img, 2)),
        Hex(u64::from(img[4])),
        Hex(u16_at(img, 24) | (u16_at(img, 26) << 16))
    );
    let bad = fpu_pattern::compare(img, |m| match m.field.index() {
        Some(i) => println!(
            "FAIL: sev-fpu: {}{} byte at offset {} is {}, expected {}",
            m.field.name(),
            Dec(u64::from(i)),
            Dec(m.offset as u64),
            Hex(u64::from(m.got)),
            Hex(u64::from(m.expected))
        ),
        None => println!(
            "FAIL: sev-fpu: {} byte at offset {} is {}, expected {}",
            m.field.name(),
            Dec(m.offset as u64),
            Hex(u64::from(m.got)),
            Hex(u64::from(m.expected))
        ),
    });
    if bad != 0 {
        println!(
            "FAIL: sev-fpu: {} of {} fields differ",
            Dec(bad as u64),
            Dec(COMPARED.len() as u64)
        );
        return 1;
    }
    println!(
        "sev-fpu: all {} fields (FCW, FSW, FTW, MXCSR, ST0-7, XMM0-15) match the pattern",
        Dec(COMPARED.len() as u64)
    );
    0
}
