//! The esvm guest ABI: everything a guest and the host must agree on, defined once.
//!
//! This crate is compiled in two worlds: by cargo for the host crates (loader, CPU model,
//! hypervisor, VMM, tests) and by `crates/guests/build.rs`, which runs `rustc` on this file
//! to build an rlib for the bare-metal guests (`guests/rt` and `guests/bin/*`). It therefore
//! has no dependencies, uses nothing but `core` and contains no `unsafe`.
//!
//! | module | contents |
//! |---|---|
//! | [`layout`] | the guest-physical memory map: every fixed address and size (also `esvm_arch::layout`) |
//! | [`boot`] | the esvm boot protocol: the boot-info block, the loader's GDT and selectors, the I/O ports |
//! | [`ghcb`] | the GHCB page: save-area offsets, valid bitmap, shared buffer, version and usage; response codes; IOIO encoding |
//! | [`msr_protocol`] | the GHCB MSR protocol: request/response codes and their field positions |
//! | [`exit_code`] | SW_EXITCODE values (also the #VC error codes) |
//! | [`sev`] | SEV-ES identification: MSRs, CPUID bits, the C-bit position, the #VC vector, GHCB versions |
//! | [`term`] | termination reasons (GHCB set 0, esvm runtime set 1) |
//! | [`testing`] | what esvm's SEV-ES test guests share with the host tests that run them |
//!
//! Facts about the GHCB follow the AMD GHCB specification (pub. 56421) as Linux implements
//! it (`arch/x86/include/asm/sev-common.h`, `arch/x86/include/asm/svm.h`). The prose versions
//! are `docs/boot-protocol.md` and `docs/sev-es-guest.md`.

#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

pub mod boot;
pub mod exit_code;
pub mod ghcb;
pub mod layout;
pub mod msr_protocol;
pub mod sev;
pub mod term;
pub mod testing;

#[cfg(test)]
mod tests;
