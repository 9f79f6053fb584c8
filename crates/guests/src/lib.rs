//! The esvm guests: the built-in demo and the scenario-test guests, compiled from
//! `guests/` at the repository root by this crate's build script (see `build.rs`) and
//! embedded here as ELF64 images for the loader (`esvm-loader`).
//!
//! What the guests share with the host (the boot protocol, the SEV-ES ABI, the `sev-fpu`
//! pattern, the checkpoint port) is the crate `esvm-abi`, which the guests link too.
//!
//! Also exports:
//! - [`demo`]: the demo guest's workload compiled for the host, to predict its output;
//! - [`bench`]: native copies of the `cpubench` loops — the same assembly, so a benchmark
//!   can compare the identical machine code in a guest and in a host process.

/// The #VC handler's instruction decoder, compiled here for its tests against iced-x86.
#[cfg(test)]
#[path = "../../../guests/rt/src/vcdecode.rs"]
mod vcdecode;

pub mod bench;
pub mod demo;

/// A built-in guest image.
#[derive(Debug)]
pub struct Guest {
    /// Name (`demo`, `pagefault`, ...), the file name under `guests/bin/`.
    pub name: &'static str,
    /// One-line description, including the arguments it understands.
    pub description: &'static str,
    /// The ELF64 executable.
    pub elf: &'static [u8],
}

include!(concat!(env!("OUT_DIR"), "/guests/guests.rs"));

/// All built-in guests.
pub fn list() -> &'static [Guest] {
    &GUESTS
}

/// The built-in guest called `name`.
pub fn builtin(name: &str) -> Option<&'static Guest> {
    GUESTS.iter().find(|g| g.name == name)
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod sev_tests;
