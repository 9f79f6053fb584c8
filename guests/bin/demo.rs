//! demo: the built-in demo guest.
//!
//! Arguments: `iterations=N` (default 300000, about 70 M instructions; about 120 M with
//! a dirty buffer) and
//! `dirty-mib=M` (default 0: a buffer of M MiB, zeroed, then rewritten with a page-stride
//! pattern every iteration — exercises dirty-page tracking during migration).
//!
//! Output:
//! ```text
//! esvm demo guest
//! demo: memory <MiB> MiB, <n> vCPU(s), args "<argument string>"
//! demo: iterations=<N> dirty-mib=<M>
//! tick 1
//! ...
//! tick 10
//! checksum=<16 lowercase hex digits>
//! ```
//! then exit status 0. The checksum depends only on N and M (see
//! `guests/demo/workload.rs`; the host computes the same value with
//! `esvm_guests::demo::expected_checksum`). Bad arguments or too little memory for the
//! buffer: an `error:` line and exit status 2.
#![no_std]
#![no_main]

use esvm_rt::{entry, BootInfo};

#[path = "../demo/workload.rs"]
mod workload;

#[path = "../demo/main.rs"]
mod demo_main;

entry!(main);

fn main(bi: &'static BootInfo) -> u32 {
    demo_main::run("esvm demo guest", "demo", bi)
}
