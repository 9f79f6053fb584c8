//! hello: the smallest useful guest. Prints its boot-info block and arguments, then
//! exits with the status given by `exit=N` (default 0).
//!
//! Expected output (values vary with the VM):
//! ```text
//! hello: esvm guest alive
//! hello: mem_size=<bytes> vcpus=<n> flags=<hex> image=<start>..<end> free=<addr>
//! hello: args="<argument string>"
//! hello: exiting with status <N>
//! ```
#![no_std]
#![no_main]

use esvm_rt::{arg_u64_or_exit, entry, println, BootInfo, Dec, Hex};

entry!(main);

fn main(bi: &'static BootInfo) -> u32 {
    let code = arg_u64_or_exit("exit", 0);
    println!("hello: esvm guest alive");
    println!(
        "hello: mem_size={} vcpus={} flags={} image={}..{} free={}",
        Dec(bi.mem_size),
        Dec(u64::from(bi.vcpus)),
        Hex(u64::from(bi.flags)),
        Hex(bi.image_start),
        Hex(bi.image_end),
        Hex(bi.free_start)
    );
    println!("hello: args=\"{}\"", esvm_rt::args::all());
    println!("hello: exiting with status {}", Dec(code & 0xff));
    code as u32
}
