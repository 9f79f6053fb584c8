//! Architectural state of an x86-64 vCPU, in a backend-neutral shape.
//!
//! Every layer of esvm speaks these types: the software vCPU keeps its state in them, the KVM
//! backend converts to and from `kvm_bindings`, the secure processor serialises them into the
//! SEV-ES save area ([`vmsa::Vmsa`]), and snapshots/migration carry [`VcpuSnapshot`]. All state
//! a vCPU has must be representable here, so that save/restore is exact.
//!
//! [`layout`] is the guest-physical memory map, defined in the guest ABI crate `esvm-abi`
//! (the bare-metal guests need part of it) and re-exported here for the host crates.

pub mod bits;
pub mod cpuid;
pub mod fpu;
pub mod msr;
pub mod regs;
pub mod segment;
pub mod snapshot;
pub mod vmsa;

pub use esvm_abi::layout;

pub use fpu::FpuState;
pub use msr::MsrState;
pub use regs::{Gpr, Regs};
pub use segment::{DescriptorTable, Segment, SegmentAttributes};
pub use snapshot::{DebugRegs, PendingEvents, PendingException, SpecialRegs, VcpuSnapshot};
pub use vmsa::Vmsa;
