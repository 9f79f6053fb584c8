//! The hypervisor layer of esvm, the analogue of KVM's ioctl interface.
//!
//! A [`Hypervisor`] backend creates [`Vm`]s; a VM owns guest memory and creates [`Vcpu`]s; a
//! vCPU runs until a [`VmExit`] the VMM has to handle. Two backends implement the traits:
//! `emu` (the software vCPU of `esvm-cpu`, deterministic, no privileges) and `kvm`
//! (rust-vmm's `kvm-ioctls`, plain guests only).
//!
//! SEV-ES is an extension of these traits: [`Vm::sev`] and [`Vcpu::sev_mut`] give a backend's
//! [`SevVm`] / [`SevVcpu`] (the emu backend has them, kvm does not); the launch goes through
//! the type-state [`sev::Launcher`].
//!
//! Exits borrow the vCPU like `kvm_run` does: for `IoIn`/`MmioRead` the VMM writes the value
//! into `data` and the next [`Vcpu::run`] completes the instruction with it.

pub mod emu;
pub mod ghcb;
pub mod kvm;
pub mod memory;
pub mod sev;

use esvm_arch::{DebugRegs, FpuState, PendingEvents, Regs, SpecialRegs, VcpuSnapshot};
use std::sync::Arc;
use thiserror::Error;

pub use esvm_cpu::mem::{MissingPages, MissingStats};
pub use memory::{DirtyBitmap, GuestMemory, MemoryError};
pub use sev::{SevVcpu, SevVm, TrackedRegisters};

/// Which backend runs a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum BackendKind {
    Emu,
    Kvm,
}

impl std::str::FromStr for BackendKind {
    type Err = HvError;
    fn from_str(s: &str) -> std::result::Result<Self, HvError> {
        match s {
            "emu" => Ok(BackendKind::Emu),
            "kvm" => Ok(BackendKind::Kvm),
            other => Err(HvError::UnknownBackend(other.to_string())),
        }
    }
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackendKind::Emu => "emu",
            BackendKind::Kvm => "kvm",
        })
    }
}

/// VM types, as KVM's `KVM_X86_*_VM`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum VmType {
    Plain,
    SevEs,
}

/// What a VM is created with.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub vm_type: VmType,
    /// Guest RAM size in bytes; RAM is one slot at guest-physical 0.
    pub mem_size: u64,
    pub vcpus: u32,
    /// The CPUID table of every vCPU; the software backend gives each vCPU its own APIC ID
    /// in it (`CpuidTable::for_vcpu`).
    pub cpuid: esvm_arch::cpuid::CpuidTable,
    /// CPUID leaves that exit to the VMM instead of being answered from `cpuid`.
    pub cpuid_intercepts: Vec<u32>,
    /// MSR indices whose RDMSR/WRMSR exit to the VMM.
    pub msr_intercepts: Vec<u32>,
    /// Software backend: a vCPU that keeps executing PAUSE (16 in one run,
    /// `esvm_cpu::PAUSES_PER_YIELD`) ends the run with [`VmExit::BudgetExhausted`] before the
    /// instruction budget is used up, so a VMM that interleaves vCPUs on one thread can give
    /// the turn of a spin-waiting vCPU to another (KVM has its own pause-loop exiting).
    pub pause_ends_budget: bool,
    /// Software backend: the vCPUs may run on host threads of their own. Their TSC reads
    /// then go through one high-water mark (`esvm_cpu::CpuConfig::tsc_mark`), so that no
    /// vCPU sees the TSC go back from one vCPU to another, and a page decoded for the first
    /// time is read after a process-wide barrier (`esvm_cpu::PhysMemory::set_parallel`).
    pub parallel_vcpus: bool,
}

impl VmConfig {
    pub fn plain(mem_size: u64, vcpus: u32) -> Self {
        VmConfig {
            vm_type: VmType::Plain,
            mem_size,
            vcpus,
            cpuid: esvm_arch::cpuid::CpuidTable::esvm_default(),
            cpuid_intercepts: Vec::new(),
            msr_intercepts: Vec::new(),
            pause_ends_budget: false,
            parallel_vcpus: false,
        }
    }
}

/// Why a vCPU stopped running.
#[derive(Debug)]
pub enum VmExit<'a> {
    /// IN from `port`: fill `data` (1, 2 or 4 bytes) before the next run.
    IoIn { port: u16, data: &'a mut [u8] },
    /// OUT to `port`; the instruction has completed.
    IoOut { port: u16, data: &'a [u8] },
    /// Read of unbacked guest-physical memory: fill `data` before the next run.
    MmioRead { addr: u64, data: &'a mut [u8] },
    /// Write to unbacked guest-physical memory; the instruction has completed.
    MmioWrite { addr: u64, data: &'a [u8] },
    /// HLT with interrupts disabled or nothing pending: the VMM decides when to resume.
    Hlt,
    /// SEV-ES: the vCPU parked itself in AP reset hold (GHCB MSR protocol AP_RESET_HOLD or
    /// the AP_HLT_LOOP event). Unlike HLT no interrupt wakes it: only a SIPI does, through
    /// [`sev::SevVcpu::deliver_sipi`]; until then every run returns this exit again without
    /// running the guest.
    ApResetHold,
    /// Triple fault (or a shutdown-class failure); `reason` says what happened.
    Shutdown { reason: String },
    /// An intercepted CPUID leaf: fill `result` (eax, ebx, ecx, edx).
    Cpuid {
        function: u32,
        index: u32,
        result: &'a mut [u32; 4],
    },
    /// An intercepted RDMSR: fill `value`; set `fault` for a #GP.
    RdMsr {
        index: u32,
        value: &'a mut u64,
        fault: &'a mut bool,
    },
    /// An intercepted WRMSR (already retired unless `fault` is set).
    WrMsr {
        index: u32,
        value: u64,
        fault: &'a mut bool,
    },
    /// The instruction budget set by [`Vcpu::set_instruction_budget`] ran out, or PAUSEs
    /// gave it up ([`VmConfig::pause_ends_budget`]).
    BudgetExhausted,
    /// An SEV-ES guest asked to be terminated (GHCB termination request), reported an event
    /// it cannot handle, or broke the GHCB protocol; `reason` says which and why.
    Terminated { reason: String },
    /// [`Kicker::kick`] was called, or a signal interrupted the run.
    Interrupted,
}

#[derive(Debug, Error)]
pub enum HvError {
    #[error("unknown backend {0:?}: use 'emu' (software vCPU, default) or 'kvm'")]
    UnknownBackend(String),
    #[error("the kvm backend is not available: {0}")]
    KvmUnavailable(String),
    #[error("{backend} backend does not support {what}")]
    Unsupported { backend: BackendKind, what: String },
    #[error(
        "vCPU {vcpu}: its register state is protected (encrypted VMSA); {operation} is refused. \
         Only the tracked registers (cr0, cr4, cr8, efer, apic_base) are visible via get_sregs"
    )]
    ProtectedState { vcpu: u32, operation: &'static str },
    #[error("secure processor: {0}")]
    Sev(String),
    #[error("secure processor: {0}")]
    Psp(#[from] esvm_psp::PspError),
    #[error("the {backend} backend has no SEV-ES support (use --backend emu)")]
    NoSevSupport { backend: BackendKind },
    #[error("invalid vCPU state: {0}")]
    InvalidState(String),
    #[error("guest memory: {0}")]
    Memory(#[from] MemoryError),
    #[error("KVM ioctl {op} failed: {source}")]
    Kvm {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("internal error in the {backend} backend: {message}")]
    Internal {
        backend: BackendKind,
        message: String,
    },
    /// The software vCPU refused a state change.
    #[error("invalid vCPU state: {0}")]
    Cpu(#[source] esvm_cpu::CpuError),
    /// The software vCPU refused the VMSA an SEV-ES move brought in.
    #[error(
        "internal error in the emu backend: move encryption context: loading vCPU {vcpu}'s \
         VMSA: {source}"
    )]
    MoveVmsa {
        vcpu: u32,
        #[source]
        source: esvm_cpu::CpuError,
    },
    /// The software vCPU's guest memory could not be set up over the VM's RAM.
    #[error("internal error in the emu backend: {0}")]
    EmuMemory(#[source] esvm_cpu::MemError),
    /// The software vCPU's guest-memory model failed an SEV-ES memory operation.
    #[error("secure processor: {}{source}", .op.prefix())]
    SevMemory {
        op: SevMemoryOp,
        #[source]
        source: esvm_cpu::MemError,
    },
    /// A decrypted VMSA is not a VMSA page.
    #[error("secure processor: {0}")]
    BadVmsa(#[source] esvm_arch::vmsa::VmsaError),
    /// The hypervisor's part of an SEV-ES vCPU transfer does not decode.
    #[error("secure processor: the hypervisor's vCPU state: {0}")]
    SevTransferState(#[source] serde_json::Error),
    /// The KVM backend failed to set up or drive a vCPU (see [`kvm::KvmError`]).
    #[error(transparent)]
    KvmSetup(#[from] kvm::KvmError),
}

/// What the SEV-ES guest-memory model was doing when it failed ([`HvError::SevMemory`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SevMemoryOp {
    /// Turning on memory encryption (LAUNCH_START, RECEIVE_START) or encrypting a range in
    /// place (LAUNCH_UPDATE_DATA).
    Encryption,
    /// Reading guest page `n` (shared) for a send.
    ReadSharedPage(u64),
    /// Writing guest page `n` (shared) on receive.
    WriteSharedPage(u64),
    /// Writing the GHCB page back after a VMGEXIT.
    WriteGhcb,
}

impl SevMemoryOp {
    /// How [`HvError::SevMemory`] names the operation before the memory error.
    fn prefix(self) -> String {
        match self {
            SevMemoryOp::Encryption => String::new(),
            SevMemoryOp::ReadSharedPage(page) => format!("reading shared page {page}: "),
            SevMemoryOp::WriteSharedPage(page) => format!("writing shared page {page}: "),
            SevMemoryOp::WriteGhcb => "writing the GHCB back: ".to_string(),
        }
    }
}

pub type Result<T> = std::result::Result<T, HvError>;

/// The special registers a hypervisor may see. For a vCPU whose state is protected (an
/// encrypted VMSA) only the values the hypervisor tracks through write traps exist; every
/// other field is unavailable by construction rather than silently zero (upstream KVM's
/// `KVM_GET_SREGS` returns zeros there, and its `KVM_SET_SREGS` ignores writes silently).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SregsView {
    Full(SpecialRegs),
    Tracked(TrackedSregs),
}

/// The tracked registers of a protected vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct TrackedSregs {
    pub cr0: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    pub apic_base: u64,
}

impl SregsView {
    pub fn cr0(&self) -> u64 {
        match self {
            SregsView::Full(s) => s.cr0,
            SregsView::Tracked(t) => t.cr0,
        }
    }
    pub fn cr4(&self) -> u64 {
        match self {
            SregsView::Full(s) => s.cr4,
            SregsView::Tracked(t) => t.cr4,
        }
    }
    pub fn cr8(&self) -> u64 {
        match self {
            SregsView::Full(s) => s.cr8,
            SregsView::Tracked(t) => t.cr8,
        }
    }
    pub fn efer(&self) -> u64 {
        match self {
            SregsView::Full(s) => s.efer,
            SregsView::Tracked(t) => t.efer,
        }
    }
    pub fn apic_base(&self) -> u64 {
        match self {
            SregsView::Full(s) => s.apic_base,
            SregsView::Tracked(t) => t.apic_base,
        }
    }
    /// The full register set, if the vCPU is not protected.
    pub fn full(self) -> Option<SpecialRegs> {
        match self {
            SregsView::Full(s) => Some(s),
            SregsView::Tracked(_) => None,
        }
    }
}

/// Makes a running vCPU return [`VmExit::Interrupted`] soon; callable from any thread.
pub trait Kicker: Send + Sync {
    fn kick(&self);
}

/// A virtual CPU.
pub trait Vcpu: Send {
    fn id(&self) -> u32;
    /// Run until the next exit.
    fn run(&mut self) -> Result<VmExit<'_>>;

    fn get_regs(&self) -> Result<Regs>;
    fn set_regs(&mut self, regs: &Regs) -> Result<()>;
    /// All special registers. Fails with [`HvError::ProtectedState`] for a protected vCPU:
    /// use [`Vcpu::get_sregs_view`], which returns the tracked view there.
    fn get_sregs(&self) -> Result<SpecialRegs>;
    /// The special registers the hypervisor may see: all of them for a plain vCPU, only the
    /// tracked ones (cr0, cr4, cr8, efer, apic_base) for a protected one.
    fn get_sregs_view(&self) -> Result<SregsView> {
        self.get_sregs().map(SregsView::Full)
    }
    /// Whether the vCPU's register state is protected (its VMSA is encrypted).
    fn is_protected(&self) -> bool {
        false
    }
    /// Whether the last instruction still has work in the hypervisor before the vCPU is at a
    /// clean point for saving its state (SEV-ES: a GHCB request whose device I/O is not all
    /// shown to the VMM yet). Run the vCPU on until this is false.
    fn exit_pending(&self) -> bool {
        false
    }
    /// The vCPU's SEV-ES extension, if its backend can run SEV-ES guests (emu); None
    /// otherwise (kvm). Its commands refuse a vCPU of a plain VM.
    fn sev(&self) -> Option<&dyn SevVcpu> {
        None
    }
    /// [`Vcpu::sev`], for the commands that change the vCPU.
    fn sev_mut(&mut self) -> Option<&mut dyn SevVcpu> {
        None
    }
    fn set_sregs(&mut self, sregs: &SpecialRegs) -> Result<()>;
    fn get_fpu(&self) -> Result<FpuState>;
    fn set_fpu(&mut self, fpu: &FpuState) -> Result<()>;
    fn get_xcr0(&self) -> Result<u64>;
    fn set_xcr0(&mut self, xcr0: u64) -> Result<()>;
    /// Read MSRs by index; unknown indices are an error.
    fn get_msrs(&self, indices: &[u32]) -> Result<Vec<u64>>;
    fn set_msrs(&mut self, entries: &[(u32, u64)]) -> Result<()>;
    fn get_debug_regs(&self) -> Result<DebugRegs>;
    fn set_debug_regs(&mut self, regs: &DebugRegs) -> Result<()>;
    fn get_events(&self) -> Result<PendingEvents>;
    fn set_events(&mut self, events: &PendingEvents) -> Result<()>;
    fn get_tsc(&self) -> Result<u64>;
    fn set_tsc(&mut self, tsc: u64) -> Result<()>;

    /// Queue an exception for delivery at the next entry. Whether it pushes `error_code` is
    /// decided as the hardware would in the vCPU's current mode.
    fn inject_exception(&mut self, vector: u8, error_code: Option<u32>) -> Result<()>;
    /// Queue an external interrupt; it is delivered once RFLAGS.IF allows.
    fn queue_interrupt(&mut self, vector: u8) -> Result<()>;
    /// Inject an NMI. It is delivered at the next instruction boundary unless NMIs are
    /// blocked; then it stays pending (one at most, as the hardware latches one). For a
    /// protected SEV-ES vCPU the hypervisor itself keeps NMIs blocked from an NMI's
    /// delivery until the guest's NMI_COMPLETE VMGEXIT (it cannot see the guest's IRET, and
    /// an IRET of a #VC inside the NMI handler must not let the next NMI in).
    fn inject_nmi(&mut self) -> Result<()>;
    /// Whether an interrupt queued now would be delivered at the next instruction boundary.
    fn interrupt_window_open(&self) -> Result<bool>;
    /// RFLAGS.IF as the hardware shows it to the hypervisor — also for a protected vCPU,
    /// whose registers are otherwise hidden (AMD: the VMCB's GUEST_INTERRUPT_MASK bit; KVM:
    /// `kvm_run.if_flag`). A VMM decides what a HLT means from it: with interrupts disabled
    /// nothing but an NMI or INIT can wake the vCPU.
    fn interrupts_enabled(&self) -> Result<bool>;

    /// Limit the next runs to `budget` retired instructions (emu only; None = unlimited).
    fn set_instruction_budget(&mut self, budget: Option<u64>) -> Result<()>;
    /// Instructions retired so far, if the backend counts them.
    fn instructions_retired(&self) -> Option<u64>;
    fn kicker(&self) -> Arc<dyn Kicker>;

    /// Capture everything the vCPU is, for a snapshot or a cross-backend move.
    fn snapshot(&self) -> Result<VcpuSnapshot> {
        let msrs_idx = esvm_arch::MsrState::indices();
        let values = self.get_msrs(&msrs_idx)?;
        let mut msrs = esvm_arch::MsrState::default();
        for (i, v) in msrs_idx.iter().zip(values) {
            msrs.set(*i, v);
        }
        Ok(VcpuSnapshot {
            version: VcpuSnapshot::VERSION,
            regs: self.get_regs()?,
            sregs: self.get_sregs()?,
            fpu: self.get_fpu()?,
            xcr0: self.get_xcr0()?,
            msrs,
            debug: self.get_debug_regs()?,
            events: self.get_events()?,
            tsc: self.get_tsc()?,
            rdrand: None,
        })
    }

    /// Restore a snapshot taken by [`Vcpu::snapshot`] on any backend.
    fn restore(&mut self, s: &VcpuSnapshot) -> Result<()> {
        if s.version != VcpuSnapshot::VERSION {
            return Err(HvError::InvalidState(format!(
                "vCPU snapshot version {} is not supported (expected {})",
                s.version,
                VcpuSnapshot::VERSION
            )));
        }
        self.set_sregs(&s.sregs)?;
        self.set_regs(&s.regs)?;
        self.set_fpu(&s.fpu)?;
        self.set_xcr0(s.xcr0)?;
        let entries: Vec<(u32, u64)> = esvm_arch::MsrState::indices()
            .iter()
            .map(|i| (*i, s.msrs.get(*i).unwrap_or(0)))
            .collect();
        self.set_msrs(&entries)?;
        self.set_debug_regs(&s.debug)?;
        self.set_tsc(s.tsc)?;
        self.set_events(&s.events)
    }
}

/// A virtual machine: guest memory plus vCPUs.
pub trait Vm: Send + Sync {
    fn backend(&self) -> BackendKind;
    fn vm_type(&self) -> VmType;
    /// Guest RAM. Writes through it (VMM-side writes, loading, DMA) are recorded in the dirty
    /// log just like guest writes.
    fn memory(&self) -> &GuestMemory;
    fn create_vcpu(&self, id: u32) -> Result<Box<dyn Vcpu>>;
    /// Return the dirty pages of guest RAM since the last call (one bit per 4 KiB page, bit
    /// `i` of word `i / 64`) and clear them. Guest writes and VMM writes are both included.
    fn take_dirty_log(&self) -> Result<DirtyBitmap>;
    /// The VM's SEV-ES extension (launch, send, receive, same-host move), if its backend can
    /// run SEV-ES guests (emu); None otherwise (kvm). Its commands refuse a plain VM.
    fn sev(&self) -> Option<&dyn SevVm> {
        None
    }
    /// Drive interrupt line `irq` (GSI) of the VM's interrupt controllers: `true` raises it,
    /// `false` lowers it (an edge-triggered device raises and lowers). Only backends with
    /// in-kernel interrupt controllers (kvm with its default irqchip) have lines; the others
    /// return `Unsupported` and take interrupts through [`Vcpu::queue_interrupt`].
    fn set_irq_line(&self, irq: u32, level: bool) -> Result<()> {
        let _ = (irq, level);
        Err(HvError::Unsupported {
            backend: self.backend(),
            what: "interrupt lines (deliver interrupts with Vcpu::queue_interrupt)".into(),
        })
    }

    /// Post-copy (live migration, destination): the pages set in `missing` (dirty-log
    /// layout) have not arrived; until published through the returned set, every vCPU and
    /// VMM access to one waits for it (`esvm_cpu::mem::postcopy`). Only the software vCPU
    /// can fault on a page without kernel help: kvm would need userfaultfd and refuses.
    fn begin_postcopy(&self, missing: &[u64]) -> Result<Arc<MissingPages>> {
        let _ = missing;
        Err(HvError::Unsupported {
            backend: self.backend(),
            what: "post-copy (a guest running with pages missing needs the emu backend)".into(),
        })
    }

    /// Post-copy: guest RAM of missing pages `first..first + count` for the migration layer
    /// to fill (plain guests), before it publishes them.
    ///
    /// # Safety
    /// As `esvm_cpu::PhysMemory::missing_pages_mut`: no other slice of these pages may exist
    /// while the returned one lives.
    #[allow(clippy::mut_from_ref)]
    unsafe fn missing_pages_mut(&self, first: u64, count: u64) -> Result<&mut [u8]> {
        let _ = (first, count);
        Err(HvError::Unsupported {
            backend: self.backend(),
            what: "post-copy".into(),
        })
    }
}

/// A backend.
pub trait Hypervisor {
    fn kind(&self) -> BackendKind;
    fn create_vm(&self, config: &VmConfig) -> Result<Arc<dyn Vm>>;
}

/// Open a backend by kind.
pub fn open(kind: BackendKind) -> Result<Box<dyn Hypervisor>> {
    match kind {
        BackendKind::Kvm => Ok(Box::new(kvm::KvmHypervisor::open()?)),
        BackendKind::Emu => Ok(Box::new(emu::EmuHypervisor)),
    }
}
