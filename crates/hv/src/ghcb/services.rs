//! What the GHCB handler asks of the VMM.

use thiserror::Error;

/// Why a VMM service did not produce a result.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ServiceError {
    /// Deliver a #GP to the guest (e.g. RDMSR/WRMSR of an MSR the VMM does not emulate).
    #[error("general-protection fault (#GP) for the guest")]
    GeneralProtection,
    /// Deliver a #UD to the guest.
    #[error("invalid-opcode fault (#UD) for the guest")]
    InvalidOpcode,
    /// The VMM refuses the request; the guest gets a "malformed input" GHCB error (or, for the
    /// shared-memory accessors, "invalid scratch area"). The text is for the VMM's log.
    #[error("{0}")]
    Refused(String),
}

impl ServiceError {
    pub fn refused(why: impl Into<String>) -> Self {
        ServiceError::Refused(why.into())
    }
}

/// Operand size of a port I/O access.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum IoSize {
    Byte,
    Word,
    Dword,
}

impl IoSize {
    pub const fn bytes(self) -> usize {
        match self {
            IoSize::Byte => 1,
            IoSize::Word => 2,
            IoSize::Dword => 4,
        }
    }

    /// The mask of the bits an access of this size carries.
    pub const fn mask(self) -> u32 {
        match self {
            IoSize::Byte => 0xFF,
            IoSize::Word => 0xFFFF,
            IoSize::Dword => 0xFFFF_FFFF,
        }
    }
}

/// A CPUID request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuidRequest {
    /// EAX.
    pub function: u32,
    /// ECX (0 for the MSR protocol, which cannot carry it).
    pub index: u32,
    /// The guest's XCR0 if it supplied it (always for leaf 0xD via the GHCB page).
    pub xcr0: Option<u64>,
    /// The guest's IA32_XSS if it supplied it.
    pub xss: Option<u64>,
}

/// Registers of a VMMCALL made through the GHCB. Inputs the guest did not mark valid are 0
/// (RAX and CPL are always supplied). The VMM writes its results into `rax`..`rdx`, which go
/// back to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VmmcallRegs {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    /// Privilege level the guest made the call from.
    pub cpl: u8,
}

/// The VMM-side services the GHCB handler needs.
///
/// Every method may fail: [`ServiceError::GeneralProtection`]/[`ServiceError::InvalidOpcode`]
/// become an exception the guest's #VC handler raises, [`ServiceError::Refused`] becomes a GHCB
/// error for the guest. The handler guarantees the arguments it passes:
/// - port I/O: `value` fits `size`; at most [`crate::ghcb::GhcbConfig::scratch_limit`] calls
///   per VMGEXIT (string I/O);
/// - MMIO: `data` is 1..=8 bytes and `gpa + data.len()` does not overflow;
/// - shared memory: `gpa + buf.len()` does not overflow, the length is at most the scratch
///   limit (or one page for the GHCB itself), and a scratch range never overlaps the GHCB page
///   except inside its shared buffer (which the handler accesses in the page, not through
///   these methods).
pub trait GhcbServices {
    /// CPUID for the guest: `[eax, ebx, ecx, edx]`.
    fn cpuid(&mut self, request: CpuidRequest) -> Result<[u32; 4], ServiceError>;
    /// IN from `port`; only the low `size` bytes of the result are used.
    fn io_in(&mut self, port: u16, size: IoSize) -> Result<u32, ServiceError>;
    /// OUT of `value` to `port`.
    fn io_out(&mut self, port: u16, size: IoSize, value: u32) -> Result<(), ServiceError>;
    /// MMIO read at `gpa`: fill `data`.
    fn mmio_read(&mut self, gpa: u64, data: &mut [u8]) -> Result<(), ServiceError>;
    /// MMIO write of `data` at `gpa`.
    fn mmio_write(&mut self, gpa: u64, data: &[u8]) -> Result<(), ServiceError>;
    /// RDMSR; `Err(GeneralProtection)` for an MSR the guest may not read.
    fn rdmsr(&mut self, index: u32) -> Result<u64, ServiceError>;
    /// WRMSR; `Err(GeneralProtection)` for an MSR or value the guest may not write.
    fn wrmsr(&mut self, index: u32, value: u64) -> Result<(), ServiceError>;
    /// A hypercall (KVM ABI: number in RAX, arguments in RBX, RCX, RDX, RSI; result in RAX).
    fn vmmcall(&mut self, regs: &mut VmmcallRegs) -> Result<(), ServiceError>;
    /// The guest's current TSC.
    fn tsc(&mut self) -> Result<u64, ServiceError>;
    /// The guest's TSC_AUX (for RDTSCP).
    fn tsc_aux(&mut self) -> Result<u32, ServiceError>;
    /// The VM-wide AP jump table address (0 until the guest sets one). Keep it in a
    /// [`GhcbVmState`] shared by all vCPUs.
    fn ap_jump_table(&mut self) -> Result<u64, ServiceError>;
    /// Set the VM-wide AP jump table address.
    fn set_ap_jump_table(&mut self, gpa: u64) -> Result<(), ServiceError>;
    /// Read shared (unencrypted) guest memory. Must fail for private pages and for ranges not
    /// entirely backed by guest RAM.
    fn read_shared(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), ServiceError>;
    /// Write shared guest memory; same rules as [`GhcbServices::read_shared`].
    fn write_shared(&mut self, gpa: u64, data: &[u8]) -> Result<(), ServiceError>;
}

/// GHCB state shared by all vCPUs of a VM (migrates with the VM). A VMM can back
/// [`GhcbServices::ap_jump_table`] / [`GhcbServices::set_ap_jump_table`] with it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GhcbVmState {
    /// Guest-physical address of the AP jump table (0 = not set).
    pub ap_jump_table: u64,
}
