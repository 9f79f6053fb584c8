//! esvm guest runtime: everything a small bare-metal x86-64 test guest needs on top of
//! the esvm boot protocol (see `esvm_abi::boot` and `docs/boot-protocol.md`).
//!
//! A guest is a `#![no_std]`, `#![no_main]` binary that names its main function with
//! [`entry!`]:
//!
//! ```ignore
//! #![no_std]
//! #![no_main]
//! use esvm_rt::{entry, println, BootInfo};
//! entry!(main);
//! fn main(bi: &'static BootInfo) -> u32 { println!("hello"); 0 }
//! ```
//!
//! Before main runs, `_start` has checked the boot-info block, loaded the runtime's GDT
//! (with a TSS: RSP0 and an IST stack for #DF) and its IDT (every vector routed to the
//! dispatcher in [`idt`]). Main's return value becomes the VM exit status.
//!
//! Keep guest code integer-only: format numbers with [`Dec`]/[`Hex`]/[`Hex16`] (core's
//! integer formatting uses SSE).
//!
//! SEV-ES (protected-state) guests opt in with `entry!(main, sev_es)`: see [`sev`] and
//! `docs/sev-es-guest.md`.

#![no_std]

pub mod args;
pub mod checksum;
pub mod gdt;
pub mod idt;
pub mod mem;
pub mod paging;
pub mod pic;
pub mod serial;
pub mod smp;
pub mod trap;
pub mod user;
pub mod x86;

mod ghcb;
pub mod sev;
mod vc;
pub mod vcdecode;

pub use args::{arg, arg_u64, arg_u64_or_exit};
pub use esvm_abi::boot::BootInfo;
pub use serial::{Dec, Hex, Hex16, SDec};

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU64, Ordering};

/// A static mutated through raw pointers. The runtime's own are touched by the boot vCPU
/// only (its `smp` APs share nothing but atomics); a guest that shares one between vCPUs
/// (the `smp` guest's CMPXCHG16B pair) touches it only with atomic instructions. Each use
/// documents why no two plain accesses overlap.
#[repr(transparent)]
pub struct Racy<T>(UnsafeCell<T>);

// SAFETY: plain accesses come from one vCPU at a time; every access site justifies it.
unsafe impl<T> Sync for Racy<T> {}

impl<T> Racy<T> {
    /// Wraps a value.
    pub const fn new(v: T) -> Self {
        Racy(UnsafeCell::new(v))
    }

    /// Raw pointer to the value.
    pub const fn get(&self) -> *mut T {
        self.0.get()
    }
}

/// Declares the guest's main function: `fn(&'static BootInfo) -> u32`.
///
/// `entry!(main)` declares a guest without SEV-ES support; `entry!(main, sev_es)` one with
/// the runtime's SEV-ES support (GHCB, #VC handler, serial and exit through the GHCB);
/// `entry!(main, sev_es_no_vc)` one with a GHCB but no #VC handler. The SEV-ES parts only
/// take effect when the boot-info block has `FLAG_PROTECTED_STATE` (see [`sev`]).
#[macro_export]
macro_rules! entry {
    (@define $main:path, $mode:expr) => {
        #[no_mangle]
        pub fn __esvm_guest_main(bi: &'static $crate::BootInfo) -> u32 {
            let f: fn(&'static $crate::BootInfo) -> u32 = $main;
            f(bi)
        }
        #[no_mangle]
        pub static __ESVM_GUEST_SEV_MODE: $crate::sev::SevMode = $mode;
    };
    ($main:path, sev_es) => {
        $crate::entry!(@define $main, $crate::sev::SevMode::Full);
    };
    ($main:path, sev_es_no_vc) => {
        $crate::entry!(@define $main, $crate::sev::SevMode::NoVc);
    };
    ($main:path) => {
        $crate::entry!(@define $main, $crate::sev::SevMode::None);
    };
}

extern "Rust" {
    fn __esvm_guest_main(bi: &'static BootInfo) -> u32;
    static __ESVM_GUEST_SEV_MODE: sev::SevMode;
}

core::arch::global_asm!(
    r#"
    .section .text._start,"ax",@progbits
    .globl _start
_start:
    cld
    xor ebp, ebp
    // A protected (SEV-ES) boot: save the x87/SSE state of the first instruction before
    // any code can touch it (`sev::entry_fxsave`). RDI is checked as esvm_rt_start does.
    test rdi, rdi
    jz 2f
    test dil, 7
    jnz 2f
    mov rax, 0x544F4F424D565345
    cmp [rdi], rax
    jne 2f
    test dword ptr [rdi + 28], 1
    jz 2f
    fxsave64 [rip + ESVM_RT_ENTRY_FXSAVE]
    mov byte ptr [rip + ESVM_RT_ENTRY_FXSAVE_VALID], 1
2:
    call esvm_rt_start
    ud2
"#
);

static BOOT_INFO: AtomicU64 = AtomicU64::new(0);

/// The boot-info block (valid after `_start` checked it).
pub fn boot_info() -> &'static BootInfo {
    let p = BOOT_INFO.load(Ordering::Relaxed) as *const BootInfo;
    // SAFETY: set once in esvm_rt_start to the loader's block, which nothing overwrites.
    unsafe { &*p }
}

/// The Rust entry point, called once by `_start` with the loader's RDI.
///
/// # Safety
/// `bi` is null, misaligned, or points to a readable `BootInfo` that stays valid and
/// unmodified for the guest's lifetime, as the esvm boot protocol promises for RDI.
#[no_mangle]
unsafe extern "C" fn esvm_rt_start(bi: *const BootInfo) -> ! {
    if bi.is_null() || !(bi as usize).is_multiple_of(8) {
        println!("FAIL: boot: RDI does not point at a boot-info block");
        exit(3);
    }
    // SAFETY: non-null and aligned (checked above), so by the function's contract a live
    // boot-info block; its magic and version are checked below.
    let info: &'static BootInfo = unsafe { &*bi };
    if !info.is_valid() {
        println!(
            "FAIL: boot: bad boot-info block (magic {} version {} size {})",
            Hex(info.magic),
            Dec(u64::from(info.version)),
            Dec(u64::from(info.size))
        );
        exit(3);
    }
    BOOT_INFO.store(bi as u64, Ordering::Relaxed);
    args::init(info.args_addr, info.args_len);
    mem::init_allocator(info.free_start, info.mem_size);
    gdt::init();
    idt::init();
    // SAFETY: the guest binary defines this static through `entry!`.
    let sev_mode = unsafe { __ESVM_GUEST_SEV_MODE };
    sev::boot(info, sev_mode);
    // SAFETY: the guest binary defines this symbol through `entry!`.
    let code = unsafe { __esvm_guest_main(info) };
    exit(code)
}

/// Ends the VM with exit status `code & 0xff` through the debug-exit port.
pub fn exit(code: u32) -> ! {
    // SEV-ES with a GHCB: flush serial output and write the port through the GHCB.
    sev::exit_hook(code);
    x86::outb(esvm_abi::boot::DEBUG_EXIT_PORT, code as u8);
    // The VMM should have stopped us; if not, stay quiet forever.
    loop {
        x86::cli();
        x86::hlt();
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    println!("PANIC: {}", info);
    exit(101)
}

/// Prints `FAIL: <msg>` and exits with status 1 when `cond` is false.
#[macro_export]
macro_rules! check {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            $crate::print!("FAIL: ");
            $crate::println!($($msg)+);
            $crate::exit(1);
        }
    };
}

/// Prints `FAIL: <what>: got <a>, expected <b>` (hex) and exits with status 1 unless
/// `a == b`.
#[macro_export]
macro_rules! check_eq {
    ($a:expr, $b:expr, $what:expr) => {{
        let (a, b): (u64, u64) = ($a as u64, $b as u64);
        if a != b {
            $crate::println!(
                "FAIL: {}: got {}, expected {}",
                $what,
                $crate::Hex(a),
                $crate::Hex(b)
            );
            $crate::exit(1);
        }
    }};
}
