//! timer: the legacy timer path. Remaps the 8259 PICs to vectors 0x20..0x2F, programs
//! PIT channel 0 as a rate generator at `hz=H` (default 100), unmasks IRQ 0 only, and
//! waits in `sti; hlt` until `ticks=N` (default 10) timer interrupts arrived, sending an
//! EOI for each. Each interrupt must arrive on vector 0x20 with IF=1 in the interrupted
//! RFLAGS (and IF=0 inside the handler: interrupt gate).
//!
//! Output:
//! ```text
//! timer: PIT at <H> Hz (divisor <D>), waiting for <N> interrupts
//! timer: tick 1
//! ...
//! timer: tick <N>
//! timer: received <N> timer interrupts
//! ```
//! then exit status 0; `FAIL:` and status 1 on a bad interrupt.
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU64, Ordering};
use esvm_rt::idt::{self, InterruptFrame};
use esvm_rt::{arg_u64_or_exit, check, entry, pic, println, x86, BootInfo, Dec};

entry!(main);

static TICKS: AtomicU64 = AtomicU64::new(0);
static BAD: AtomicU64 = AtomicU64::new(0);

fn on_timer(frame: &mut InterruptFrame) {
    if frame.rflags & x86::RFLAGS_IF == 0 || x86::rflags() & x86::RFLAGS_IF != 0 {
        BAD.fetch_add(1, Ordering::SeqCst);
    }
    TICKS.fetch_add(1, Ordering::SeqCst);
    pic::eoi(0);
}

fn on_spurious(frame: &mut InterruptFrame) {
    println!("FAIL: unexpected interrupt on vector {}", Dec(frame.vector));
    esvm_rt::exit(1);
}

fn main(_bi: &'static BootInfo) -> u32 {
    let n = arg_u64_or_exit("ticks", 10);
    let hz = arg_u64_or_exit("hz", 100).clamp(19, 1_193_182) as u32;
    let divisor = pic::pit_divisor_for(hz);
    println!(
        "timer: PIT at {} Hz (divisor {}), waiting for {} interrupts",
        Dec(u64::from(hz)),
        Dec(u64::from(divisor)),
        Dec(n)
    );
    pic::remap(pic::IRQ_BASE);
    idt::set_handler(pic::IRQ_BASE, on_timer);
    for v in pic::IRQ_BASE + 1..pic::IRQ_BASE + 16 {
        idt::set_handler(v, on_spurious);
    }
    pic::pit_rate_generator(divisor);
    pic::unmask_only(1 << 0);
    let mut seen = 0;
    loop {
        x86::cli();
        let t = TICKS.load(Ordering::SeqCst);
        while seen < t.min(n) {
            seen += 1;
            println!("timer: tick {}", Dec(seen));
        }
        if t >= n {
            break;
        }
        // Atomically enable interrupts and wait: the next tick cannot slip in between.
        x86::sti_hlt();
    }
    pic::set_mask(0xffff);
    check!(
        BAD.load(Ordering::SeqCst) == 0,
        "timer interrupt with wrong IF state ({} times)",
        Dec(BAD.load(Ordering::SeqCst))
    );
    println!("timer: received {} timer interrupts", Dec(n));
    0
}
