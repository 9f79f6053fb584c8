//! The esvm guests: the built-in demo and the scenario-test guests, compiled from
//! `guests/` at the repository root by this crate's build script (see `build.rs`) and
//! embedded here as ELF64 images for the loader (`esvm-loader`).
//!
//! Also exports:
//! - [`bootinfo`]: the boot-protocol definitions (the same source file the guests use);
//! - [`sevabi`] and [`fpu_pattern`]: what the SEV-ES test guests share with the host
//!   (`docs/sev-es-guest.md`);
//! - [`bench`]: native copies of the `cpubench` loops — the same assembly, so a benchmark
//!   can compare the identical machine code in a guest and in a host process.

#[path = "../../../guests/rt/src/bootinfo.rs"]
pub mod bootinfo;

/// The SEV-ES guest ABI (checkpoint port, `sev-cr` steps, termination reasons, GHCB
/// constants): the same source file the guest runtime uses.
#[path = "../../../guests/rt/src/sevabi.rs"]
pub mod sevabi;

/// The x87/SSE pattern of the `sev-fpu` test: load [`fpu_pattern::fxsave_image`] into the
/// vCPU before LAUNCH_UPDATE_VMSA; the guest compares it with its first FXSAVE.
#[path = "../../../guests/rt/src/fpu_pattern.rs"]
pub mod fpu_pattern;

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
