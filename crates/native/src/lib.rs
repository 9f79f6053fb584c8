//! Native execution of x86-64 snippets on the host CPU, and a generator of random snippets, for
//! differential testing of the esvm software interpreter (`esvm-cpu`).
//!
//! # Fixed addresses
//! A snippet runs in ring 3 inside this very process, at addresses that are the same in the
//! interpreter's identity-mapped test environment, so the same bytes mean the same thing in
//! both:
//!
//! | what                     | address range                         | notes                                  |
//! |--------------------------|---------------------------------------|----------------------------------------|
//! | code                     | [`CODE_ADDR`] .. +[`CODE_SIZE`]       | snippet, then a jump back (native only) |
//! | control page (native)    | [`CTL_ADDR`] .. +4 KiB                | register save area of the trampoline    |
//! | scratch buffer           | [`SCRATCH_ADDR`] .. +[`SCRATCH_SIZE`] | data area, then the private stack      |
//!
//! The scratch buffer holds the data area `[SCRATCH_ADDR, SCRATCH_ADDR + DATA_SIZE)` that
//! generated memory operands and string instructions use, and above it the private stack;
//! [`STACK_TOP`] is the initial RSP the generator's inputs use (4 KiB of room below it and
//! above it, all inside the scratch buffer). The whole scratch buffer, stack included, is part
//! of [`NativeState`] and is compared by the differential tests.
//!
//! The addresses are below 2 GiB (so they fit a sign-extended disp32 and the trampoline can use
//! absolute addressing), above any sane `vm.mmap_min_addr`, and far from where Linux puts PIE
//! executables, the heap, libraries and stacks. They are mapped with `MAP_FIXED_NOREPLACE`;
//! if something already lives there, [`run::run_native`] fails with
//! [`NativeError::AddressInUse`] instead of clobbering it.

pub mod features;
pub mod gen;
pub mod run;

pub use features::HostFeatures;
pub use run::{run_native, NativeError, NativeState};

/// Where snippet code is placed (identically in the interpreter environment).
pub const CODE_ADDR: u64 = 0x0010_0000;
/// Size of the code mapping.
pub const CODE_SIZE: usize = 0x1_0000;
/// The native trampoline's control page (not used by the interpreter).
pub const CTL_ADDR: u64 = CODE_ADDR + CODE_SIZE as u64;
/// Start of the scratch buffer (data area + private stack).
pub const SCRATCH_ADDR: u64 = 0x0020_0000;
/// Size of the scratch buffer, stack included.
pub const SCRATCH_SIZE: usize = 0x1_0000;
/// Size of the data area at the start of the scratch buffer that generated memory operands use.
pub const DATA_SIZE: usize = 0xE000;
/// Initial RSP used by generated inputs: 4 KiB below the end of the scratch buffer.
pub const STACK_TOP: u64 = SCRATCH_ADDR + 0xF000;
/// Lowest RSP value the generator's programs may reach (bottom of the private stack).
pub const STACK_LIMIT: u64 = SCRATCH_ADDR + DATA_SIZE as u64;

/// The RFLAGS bits a snippet's input may set and that are compared afterwards: the six
/// arithmetic flags CF PF AF ZF SF OF and DF.
pub const FLAGS_MASK: u64 = esvm_arch::bits::rflags::ARITH | esvm_arch::bits::rflags::DF;

/// RFLAGS bits that are always set while a snippet runs natively in ring 3 on Linux: bit 1
/// (reads as one) and IF. An interpreter environment must start with
/// `(input.rflags & FLAGS_MASK) | RFLAGS_FIXED` so that `PUSHF` pushes the same image
/// (IOPL 0, TF/AC/NT/ID/RF clear).
pub const RFLAGS_FIXED: u64 = esvm_arch::bits::rflags::FIXED | esvm_arch::bits::rflags::IF;
