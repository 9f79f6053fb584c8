//! esvm's software x86-64 vCPU: an interpreter on the iced-x86 decoder.
//!
//! A [`Cpu`] holds the full architectural state of one vCPU and runs guest code from a
//! [`PhysMemory`] (guest RAM shared by all vCPUs of a VM; guest-physical addresses outside RAM
//! are MMIO) until an [`Exit`].
//!
//! Execution model:
//! - code is decoded once per guest-physical location into *blocks* of pre-decoded
//!   instructions (each with a handler chosen at decode time); blocks end at control
//!   transfers, system instructions and page ends. Writes to a page holding decoded code bump
//!   the page's epoch in [`PhysMemory`] and the stale blocks are re-decoded; self-modifying
//!   code takes effect from the next instruction;
//! - linear addresses go through a software TLB (separate read/write/execute tags per 4 KiB
//!   page, one set for CPL 0-2 and one for CPL 3) filled by a 4-level (or legacy 2/3-level)
//!   page walk that sets A/D bits and checks P, R/W (with CR0.WP), U/S, NX and reserved bits;
//! - arithmetic flags are computed lazily;
//! - the retired-instruction count is the virtual clock: the guest TSC reads
//!   `tsc_offset + retired * tsc_per_insn` ([`CpuConfig::tsc_per_insn`], default 1), so a run
//!   is fully deterministic.
//!
//! Exits follow KVM's completion model: [`Exit::IoIn`], [`Exit::MmioRead`], [`Exit::Cpuid`],
//! [`Exit::RdMsr`] and [`Exit::WrMsr`] leave the instruction unretired; supply the result with
//! the matching `complete_*` call and the next [`Cpu::run`] re-executes and retires it.
//! [`Exit::IoOut`] and [`Exit::MmioWrite`] are reported after the instruction retired.
//! An instruction whose exit was completed runs before any event is delivered.
//!
//! Memory contract: see [`PhysMemory`]. Every guest write (including page-walk A/D updates,
//! exception frames, descriptor accessed bits and LOCKed read-modify-writes, which are host
//! atomics) stores first and then marks the vm-memory dirty bitmap (relaxed check, atomic
//! set only when clear). A migration thread that takes the bitmap while vCPUs run must
//! issue a process-wide memory barrier ([`process_barrier`]) after `get_and_reset` and
//! before copying pages, so that stores still in a vCPU's store buffer are not missed. Writes the
//! VMM makes to guest code outside [`PhysMemory::write`] must be followed by
//! [`PhysMemory::invalidate_code`].
//!
//! Floating point: SSE/SSE2 (`exec/sse.rs`) and the whole x87 FPU (`exec/x87.rs`) compute
//! on the host FPU, so their results are exactly the host's (including the
//! implementation-specific last bits of the x87 transcendentals). MMX (`exec/mmx.rs`, on the
//! x87 registers) runs its packed arithmetic through the same host SSE2 operations.
//! RDRAND/RDSEED return a deterministic per-vCPU stream ([`CpuConfig::rdrand_seed`]).
//!
//! Not modelled (they raise #UD or #GP, never silently misbehave): SSSE3 and 3DNow! (not
//! advertised; their MMX forms included), AVX/XSAVE instructions (XGETBV/XSETBV work when
//! CPUID advertises XSAVE), SYSENTER/SYSEXIT, task switches, call/task gates, virtual-8086
//! mode, the TSS I/O
//! permission bitmap (I/O at CPL > IOPL is #GP), SMEP/SMAP/PCID/PKE/UMIP/FSGSBASE (their CR4
//! bits are refused), debug-register breakpoints (DR0-7 are stored; RFLAGS.TF single-step
//! works), alignment checking (#AC), MONITOR/MWAIT. CR8 is stored but does not mask
//! interrupts (the VMM's interrupt controller model applies the TPR). A non-canonical stack
//! access raises #GP rather than #SS. Instruction fetch from MMIO (e.g. the RESET vector at
//! 0xFFFFFFF0 without RAM there) ends the run with [`Exit::Shutdown`].
//!
//! SEV-ES mode ([`CpuConfig::sev_es`]) models an encrypted-state guest: #VC instead of
//! exits, VMGEXIT, write traps, C-bit page walks over encrypted memory, and the VMSA.

mod decode;
mod exec;
mod flags;
mod intr;
pub mod mem;
mod mmu;
pub mod model;
mod seg;
mod sev;
pub mod testutil;

use esvm_arch::bits::{cr0, cr4, efer, rflags};
use esvm_arch::cpuid::CpuidTable;
use esvm_arch::{
    DebugRegs, DescriptorTable, FpuState, MsrState, PendingEvents, PendingException, Regs, Segment,
    SpecialRegs, VcpuSnapshot,
};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use thiserror::Error;

pub use mem::{process_barrier, MemError, PageCipher, PhysMemory};
pub use sev::{
    exit_code, vmsa_layout, SevEsConfig, TrapReg, VcIntercepts, SEV_PHYS_ADDR_REDUCTION,
    SEV_STATUS_VALUE,
};

use decode::CodeCache;
use mmu::Tlb;

/// Segment register numbers (iced/x86 order).
pub(crate) const ES: usize = 0;
pub(crate) const CS: usize = 1;
pub(crate) const SS: usize = 2;
pub(crate) const DS: usize = 3;
pub(crate) const FS: usize = 4;
pub(crate) const GS: usize = 5;

/// How a vCPU is configured.
#[derive(Debug, Clone)]
pub struct CpuConfig {
    /// What CPUID reports.
    pub cpuid: CpuidTable,
    /// CPUID functions (EAX on input) that exit with [`Exit::Cpuid`] instead.
    pub cpuid_intercepts: Vec<u32>,
    /// MSR indices whose RDMSR/WRMSR exit with [`Exit::RdMsr`]/[`Exit::WrMsr`]; every other
    /// MSR the vCPU does not model raises #GP.
    pub msr_intercepts: Vec<u32>,
    /// Guest TSC ticks per retired instruction (the virtual clock's rate). Default 1.
    pub tsc_per_insn: u64,
    /// vCPU number (reported as the initial APIC ID in CPUID leaf 1, EBX bits 31:24).
    pub vcpu_id: u32,
    /// SEV-ES mode (None: a plain vCPU). The guest's state is protected: non-automatic
    /// events raise #VC in the guest instead of exiting (the intercept lists above do not
    /// apply), VMGEXIT exits with [`Exit::Vmgexit`], CR0/CR4/CR8/EFER writes exit with
    /// [`Exit::WriteTrap`] after they retired, memory is accessed through the C-bit's
    /// private/shared views of an encrypted [`PhysMemory`], and [`Cpu::to_vmsa`] /
    /// [`Cpu::load_vmsa`] save and load the VMSA. Details in `src/sev.rs`.
    pub sev_es: Option<SevEsConfig>,
    /// Seed of the vCPU's RDRAND/RDSEED generator (a deterministic SplitMix64 stream per
    /// vCPU, mixed with `vcpu_id`; its state travels in [`VcpuSnapshot::rdrand`]). Default 0.
    pub rdrand_seed: u64,
    /// The [`PAUSES_PER_YIELD`]-th PAUSE of a [`Cpu::run`] call gives up the rest of its
    /// budget: the call returns [`Exit::BudgetExhausted`] right after it. A VMM that
    /// interleaves several vCPUs on one thread turns this on so that a spin-wait loop hands
    /// the thread to the vCPU it waits for instead of spinning out its turn (in spirit
    /// AMD's PAUSE filter). Default false.
    pub pause_ends_budget: bool,
    /// A TSC high-water mark shared by the vCPUs of a VM that run on host threads of their
    /// own: a guest read of the TSC (RDTSC, RDTSCP, RDMSR) returns the larger of this vCPU's
    /// TSC and the mark, and raises the mark to what it returns. Each vCPU's TSC counts its
    /// own instructions, so vCPUs running in parallel drift apart; with the mark no vCPU
    /// ever reads a TSC below one another vCPU read before (what Linux's TSC warp check
    /// tests through a lock), and each vCPU's reads stay monotonic. None (the default): a
    /// read is this vCPU's TSC. The mark is not state: it restarts at 0 with the VM.
    pub tsc_mark: Option<Arc<AtomicU64>>,
}

impl Default for CpuConfig {
    fn default() -> Self {
        CpuConfig {
            cpuid: CpuidTable::esvm_default(),
            cpuid_intercepts: Vec::new(),
            msr_intercepts: Vec::new(),
            tsc_per_insn: 1,
            vcpu_id: 0,
            sev_es: None,
            rdrand_seed: 0,
            pause_ends_budget: false,
            tsc_mark: None,
        }
    }
}

/// Why [`Cpu::run`] returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// IN from `port` of `size` bytes (1, 2, 4). Not retired: call [`Cpu::complete_io_in`].
    IoIn { port: u16, size: u8 },
    /// OUT of `size` bytes of `data` to `port`; retired.
    IoOut { port: u16, size: u8, data: u32 },
    /// Read of `size` bytes (1..=16) of MMIO at `gpa`. Not retired: call
    /// [`Cpu::complete_mmio_read`].
    MmioRead { gpa: u64, size: u8 },
    /// Write of `size` bytes (`data[..size]`) to MMIO at `gpa`; retired.
    MmioWrite { gpa: u64, size: u8, data: [u8; 16] },
    /// HLT with nothing deliverable. The vCPU stays halted until an interrupt is queued
    /// (and IF allows it) or the VMM clears `halted` through [`Cpu::set_events`].
    Hlt,
    /// Triple fault or another shutdown condition.
    Shutdown { reason: String },
    /// Intercepted CPUID. Not retired: call [`Cpu::complete_cpuid`].
    Cpuid { function: u32, index: u32 },
    /// Intercepted RDMSR. Not retired: call [`Cpu::complete_rdmsr`].
    RdMsr { index: u32 },
    /// Intercepted WRMSR. Not retired: call [`Cpu::complete_wrmsr`].
    WrMsr { index: u32, value: u64 },
    /// The instruction budget of this [`Cpu::run`] call is used up, or a PAUSE gave it up
    /// ([`CpuConfig::pause_ends_budget`]).
    BudgetExhausted,
    /// The kick flag ([`Cpu::kicker`]) was set.
    Interrupted,
    /// SEV-ES: VMGEXIT (`rep vmmcall`), retired. `ghcb_msr` is the GHCB MSR's value (an
    /// MSR-protocol request or the GHCB's guest-physical address); answer through the
    /// GHCB page or [`Cpu::set_ghcb_msr`], then run again.
    Vmgexit { ghcb_msr: u64 },
    /// SEV-ES: a write to CR0 (MOV, CLTS, LMSW), CR4, CR8 (MOV) or EFER (WRMSR) retired;
    /// `value` is the register's new value and `efer` the EFER after the write (a CR0 write
    /// can change EFER.LMA). Nothing to complete: run again.
    WriteTrap { reg: TrapReg, value: u64, efer: u64 },
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum CpuError {
    #[error("vCPU snapshot version {0} is not supported (expected {expected})", expected = VcpuSnapshot::VERSION)]
    SnapshotVersion(u32),
    #[error("MSR {0:#x} is not modelled by the software vCPU; intercept it or drop it")]
    UnknownMsr(u32),
    #[error("an interrupt (vector {0:#x}) is already queued; wait for the interrupt window")]
    InterruptPending(u8),
    #[error("invalid state: {0}")]
    InvalidState(String),
    #[error("no {0} exit is awaiting completion")]
    NotAwaiting(&'static str),
}

/// An exception raised by an instruction. Eight bytes (the error code and a flag instead
/// of an `Option<u32>`), so that [`R`], which every instruction handler returns, fits in a
/// register.
/// `has_ec` comes first: its unused values are where `Stop` and `R` keep their variants, so
/// checking a handler's result for `Ok` is one compare of the low byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub(crate) struct Exc {
    has_ec: bool,
    pub vector: u8,
    code: u32,
}

impl Exc {
    pub const fn new(vector: u8) -> Self {
        Exc {
            vector,
            has_ec: false,
            code: 0,
        }
    }
    pub const fn ec(vector: u8, code: u32) -> Self {
        Exc {
            vector,
            has_ec: true,
            code,
        }
    }
    pub const fn with(vector: u8, ec: Option<u32>) -> Self {
        match ec {
            Some(c) => Exc::ec(vector, c),
            None => Exc::new(vector),
        }
    }
    /// The error code pushed with the exception, if any.
    pub const fn error_code(self) -> Option<u32> {
        if self.has_ec {
            Some(self.code)
        } else {
            None
        }
    }
}

/// Why an instruction handler did not complete normally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stop {
    /// Fault: deliver the exception with RIP at the faulting instruction.
    Exc(Exc),
    /// Exit in `Cpu::exit`; the instruction is not retired.
    Exit,
    /// Exit in `Cpu::exit` after retiring the instruction.
    ExitRetire,
    /// The instruction retired; end the block (state the block relied on changed).
    Retire,
    /// The instruction has not completed (e.g. a REP string op did some iterations); return
    /// to the run loop without retiring it.
    Yield,
    /// A conditional branch inside a block was taken: the instruction retired; continue at
    /// the target (the rest of the block is the fall-through path).
    Branch,
    /// A fused CMP/TEST + Jcc pair (see `exec::alu::fuse_cmp_jcc`) retired both
    /// instructions; the Jcc was not taken: continue after it.
    FusedNext,
    /// A fused CMP/TEST + Jcc pair retired both instructions and the Jcc was taken.
    FusedBranch,
}

impl From<Exc> for Stop {
    fn from(e: Exc) -> Self {
        Stop::Exc(e)
    }
}

pub(crate) type R<T = ()> = Result<T, Stop>;

const _: () = assert!(std::mem::size_of::<R>() == 8, "R must fit in a register");

pub(crate) fn gp0<T>() -> R<T> {
    Err(Stop::Exc(Exc::ec(esvm_arch::bits::vector::GP, 0)))
}
pub(crate) fn ud<T>() -> R<T> {
    Err(Stop::Exc(Exc::new(esvm_arch::bits::vector::UD)))
}

/// Execution mode (decides decoding and address sizes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Real,
    Prot16,
    Prot32,
    Compat16,
    Compat32,
    Long64,
}

impl Mode {
    pub fn bits(self) -> u32 {
        match self {
            Mode::Real | Mode::Prot16 | Mode::Compat16 => 16,
            Mode::Prot32 | Mode::Compat32 => 32,
            Mode::Long64 => 64,
        }
    }
}

/// `pending` bits: reasons to leave the current block after this instruction.
pub(crate) const P_SMC: u8 = 1;
pub(crate) const P_MMIO: u8 = 2;
pub(crate) const P_FLUSH: u8 = 4;

/// MMIO accesses of the instruction being executed (restart-based completion).
#[derive(Debug, Default)]
pub(crate) struct MmioState {
    /// Values supplied for reads, in access order.
    pub reads: Vec<[u8; 16]>,
    pub cursor: usize,
    /// Writes waiting to be reported.
    pub writes: std::collections::VecDeque<(u64, u8, [u8; 16])>,
    /// A read exit is outstanding.
    pub awaiting: bool,
}

/// Outstanding completions.
#[derive(Debug, Default)]
pub(crate) struct Completion {
    pub io_in: Option<u32>,
    pub io_awaiting: bool,
    pub cpuid: Option<[u32; 4]>,
    pub cpuid_awaiting: bool,
    pub rdmsr: Option<Option<u64>>,
    pub rdmsr_awaiting: bool,
    pub wrmsr: Option<bool>,
    pub wrmsr_awaiting: bool,
}

/// The software vCPU.
pub struct Cpu {
    // ---- hot state ----
    pub(crate) gpr: [u64; 16],
    pub(crate) rip: u64,
    pub(crate) next_rip: u64,
    /// RFLAGS; the arithmetic bits are valid only when `f_op == flags::F_NONE`.
    pub(crate) rflags: u64,
    pub(crate) f_op: u8,
    pub(crate) f_sz: u8,
    pub(crate) f_a: u64,
    pub(crate) f_b: u64,
    pub(crate) f_res: u64,
    pub(crate) f_cin: u64,
    /// Effective segment bases for address computation (0 for ES/CS/SS/DS in 64-bit mode).
    pub(crate) seg_base: [u64; 6],
    pub(crate) tlb: Box<Tlb>,
    /// Offset of the active TLB set (0: CPL 0-2, TLB_SIZE: CPL 3).
    pub(crate) tlb_off: usize,
    pub(crate) ram: *mut u8,
    pub(crate) ram_size: u64,
    pub(crate) raw: mem::RawMem,
    pub(crate) pending: u8,
    pub(crate) retired: u64,
    /// Not in 64-bit mode: segment limits apply and linear addresses wrap at 4 GiB.
    pub(crate) legacy: bool,
    pub(crate) mode: Mode,
    pub(crate) cpl: u8,
    pub(crate) xmm: [u128; 16],
    pub(crate) mxcsr: u32,

    // ---- system state ----
    pub(crate) seg: [Segment; 6],
    pub(crate) ldtr: Segment,
    pub(crate) tr: Segment,
    pub(crate) gdtr: DescriptorTable,
    pub(crate) idtr: DescriptorTable,
    pub(crate) cr0: u64,
    pub(crate) cr2: u64,
    pub(crate) cr3: u64,
    pub(crate) cr4: u64,
    pub(crate) cr8: u64,
    pub(crate) efer: u64,
    pub(crate) apic_base: u64,
    pub(crate) xcr0: u64,
    pub(crate) msrs: MsrState,
    pub(crate) dr: DebugRegs,
    /// x87 state.
    pub(crate) x87: exec::x87::X87,
    pub(crate) tsc_offset: i64,
    /// RDRAND/RDSEED generator state.
    pub(crate) rng: u64,

    // ---- events ----
    pub(crate) ev_exception: Option<PendingException>,
    pub(crate) ev_interrupt: Option<u8>,
    pub(crate) nmi_pending: bool,
    pub(crate) nmi_masked: bool,
    pub(crate) shadow: bool,
    pub(crate) halted: bool,
    /// PAUSEs retired in this [`Cpu::run`] call ([`CpuConfig::pause_ends_budget`]).
    pub(crate) pauses: u32,

    // ---- machinery ----
    pub(crate) cache: CodeCache,
    pub(crate) mem: PhysMemory,
    pub(crate) config: CpuConfig,
    /// Attention flags checked at block boundaries: [`KICK_STOP`] (the [`Kicker`]) and
    /// [`KICK_SEV`] (SEV-ES: another party converted a page; flush the TLB and go on).
    pub(crate) kick: Arc<AtomicU8>,
    pub(crate) exit: Option<Exit>,
    pub(crate) mmio: MmioState,
    pub(crate) compl: Completion,
    /// A shutdown condition recorded during exception delivery.
    pub(crate) shutdown: Option<String>,
    /// SEV-ES mode state (None: a plain vCPU).
    pub(crate) sev: Option<Box<sev::SevCpu>>,
}

// SAFETY: `ram` points into the `PhysMemory` this `Cpu` holds (kept alive by `mem`), which is
// `Send + Sync`; everything else is owned data. A `Cpu` is used by one thread at a time.
unsafe impl Send for Cpu {}

/// `Cpu::kick` bits: stop with [`Exit::Interrupted`]; SEV-ES page conversion elsewhere; a
/// PAUSE gave up the budget (set by the vCPU itself, so block chaining stops after it).
pub(crate) const KICK_STOP: u8 = 1;
pub(crate) const KICK_SEV: u8 = 2;
pub(crate) const KICK_PAUSE: u8 = 4;

/// With [`CpuConfig::pause_ends_budget`], the PAUSEs of one [`Cpu::run`] call after which
/// the budget ends: a loop that keeps spinning is waiting for another vCPU, while a short
/// back-off (a lock taken after a few tries) is not worth a switch, which costs the VMM
/// far more than a few guest instructions.
pub const PAUSES_PER_YIELD: u32 = 16;

/// Handle to make a running [`Cpu`] return [`Exit::Interrupted`] at its next block boundary.
#[derive(Debug, Clone)]
pub struct Kicker(Arc<AtomicU8>);

impl Kicker {
    pub fn kick(&self) {
        self.0.fetch_or(KICK_STOP, Ordering::Release);
    }
}

impl Cpu {
    /// A vCPU in the RESET state (real mode, CS:IP = F000:FFF0, CS base FFFF0000) over `mem`.
    pub fn new(config: CpuConfig, mem: PhysMemory) -> Self {
        let mut cpu = Cpu {
            gpr: [0; 16],
            rip: 0,
            next_rip: 0,
            rflags: rflags::FIXED,
            f_op: flags::F_NONE,
            f_sz: 8,
            f_a: 0,
            f_b: 0,
            f_res: 0,
            f_cin: 0,
            seg_base: [0; 6],
            tlb: Tlb::new_boxed(),
            tlb_off: 0,
            ram: mem.base(),
            ram_size: mem.size(),
            raw: mem.raw(),
            pending: 0,
            retired: 0,
            legacy: true,
            mode: Mode::Real,
            cpl: 0,
            xmm: [0; 16],
            mxcsr: 0x1f80,
            seg: [Segment::default(); 6],
            ldtr: Segment::default(),
            tr: Segment::default(),
            gdtr: DescriptorTable::default(),
            idtr: DescriptorTable::default(),
            cr0: 0,
            cr2: 0,
            cr3: 0,
            cr4: 0,
            cr8: 0,
            efer: 0,
            apic_base: 0,
            xcr0: 1,
            msrs: MsrState::default(),
            dr: DebugRegs::default(),
            x87: exec::x87::X87::default(),
            tsc_offset: 0,
            rng: exec::misc::rng_init(config.rdrand_seed, config.vcpu_id),
            ev_exception: None,
            ev_interrupt: None,
            nmi_pending: false,
            nmi_masked: false,
            shadow: false,
            halted: false,
            pauses: 0,
            cache: CodeCache::new(),
            sev: sev::SevCpu::new(&config, &mem),
            mem,
            config,
            kick: Arc::new(AtomicU8::new(0)),
            exit: None,
            mmio: MmioState::default(),
            compl: Completion::default(),
            shutdown: None,
        };
        let mut reset = VcpuSnapshot::reset();
        reset.regs.gpr[2] = 0x0080_0f10; // EDX = family/model/stepping after RESET
        cpu.restore(&reset)
            .expect("the reset snapshot is valid by construction");
        cpu
    }

    /// The guest memory this vCPU runs on.
    pub fn memory(&self) -> &PhysMemory {
        &self.mem
    }

    /// A handle that makes [`Cpu::run`] return [`Exit::Interrupted`] soon (from any thread).
    pub fn kicker(&self) -> Kicker {
        Kicker(self.kick.clone())
    }

    /// Instructions retired since creation (the virtual clock).
    pub fn instructions_retired(&self) -> u64 {
        self.retired
    }

    // ------------------------------------------------------------------ registers

    pub fn regs(&self) -> Regs {
        Regs {
            gpr: self.gpr,
            rip: self.rip,
            rflags: self.get_rflags(),
        }
    }

    pub fn set_regs(&mut self, r: &Regs) {
        self.gpr = r.gpr;
        self.rip = r.rip;
        self.set_rflags_raw(r.rflags);
    }

    pub fn sregs(&self) -> SpecialRegs {
        SpecialRegs {
            es: self.seg[ES],
            cs: self.seg[CS],
            ss: self.seg[SS],
            ds: self.seg[DS],
            fs: self.seg[FS],
            gs: self.seg[GS],
            tr: self.tr,
            ldt: self.ldtr,
            gdt: self.gdtr,
            idt: self.idtr,
            cr0: self.cr0,
            cr2: self.cr2,
            cr3: self.cr3,
            cr4: self.cr4,
            cr8: self.cr8,
            efer: self.efer,
            apic_base: self.apic_base,
        }
    }

    /// Load segment, descriptor-table and control registers as-is (like KVM_SET_SREGS: the
    /// hidden segment parts are taken from `s`, not reloaded from the GDT).
    pub fn set_sregs(&mut self, s: &SpecialRegs) -> Result<(), CpuError> {
        if s.efer & efer::LME != 0 && s.cr0 & cr0::PG != 0 && s.cr4 & cr4::PAE == 0 {
            return Err(CpuError::InvalidState(
                "long mode paging (EFER.LME and CR0.PG) requires CR4.PAE".into(),
            ));
        }
        self.seg = [s.es, s.cs, s.ss, s.ds, s.fs, s.gs];
        self.tr = s.tr;
        self.ldtr = s.ldt;
        self.gdtr = s.gdt;
        self.idtr = s.idt;
        self.cr0 = s.cr0 | cr0::ET;
        self.cr2 = s.cr2;
        self.cr3 = s.cr3;
        self.cr4 = s.cr4;
        self.cr8 = s.cr8 & 0xf;
        self.efer = s.efer;
        self.apic_base = s.apic_base;
        self.mode_changed();
        Ok(())
    }

    pub fn fpu(&self) -> FpuState {
        let mut f = FpuState::default();
        self.x87.write_fpu(&mut f);
        f.mxcsr = self.mxcsr;
        f.mxcsr_mask = exec::sse::MXCSR_MASK;
        for (i, x) in self.xmm.iter().enumerate() {
            f.xmm[i] = x.to_le_bytes();
        }
        f
    }

    pub fn set_fpu(&mut self, f: &FpuState) {
        self.x87 = exec::x87::X87::from_fpu(f);
        self.mxcsr = f.mxcsr & exec::sse::MXCSR_MASK;
        for (i, x) in f.xmm.iter().enumerate() {
            self.xmm[i] = u128::from_le_bytes(*x);
        }
    }

    pub fn xcr0(&self) -> u64 {
        self.xcr0
    }

    pub fn set_xcr0(&mut self, v: u64) -> Result<(), CpuError> {
        if v & 1 == 0 || v & !3 != 0 {
            return Err(CpuError::InvalidState(format!(
                "XCR0 {v:#x}: only x87 (bit 0, required) and SSE (bit 1) are supported"
            )));
        }
        self.xcr0 = v;
        Ok(())
    }

    pub fn msrs(&self) -> MsrState {
        self.msrs
    }

    pub fn set_msrs(&mut self, m: &MsrState) {
        self.msrs = *m;
    }

    /// Read one MSR the vCPU models (including EFER, APIC base, FS/GS base, TSC).
    pub fn get_msr(&self, index: u32) -> Result<u64, CpuError> {
        exec::system::msr_read(self, index).ok_or(CpuError::UnknownMsr(index))
    }

    /// Write one MSR the vCPU models, without the guest's #GP checks beyond validity.
    pub fn set_msr(&mut self, index: u32, value: u64) -> Result<(), CpuError> {
        match exec::system::msr_write(self, index, value) {
            Ok(true) => Ok(()),
            Ok(false) => Err(CpuError::UnknownMsr(index)),
            Err(_) => Err(CpuError::InvalidState(format!(
                "value {value:#x} is not valid for MSR {index:#x}"
            ))),
        }
    }

    pub fn debug_regs(&self) -> DebugRegs {
        self.dr
    }

    pub fn set_debug_regs(&mut self, d: &DebugRegs) {
        self.dr = *d;
    }

    pub fn events(&self) -> PendingEvents {
        PendingEvents {
            exception: self.ev_exception,
            interrupt: self.ev_interrupt,
            nmi_pending: self.nmi_pending,
            nmi_masked: self.nmi_masked,
            interrupt_shadow: self.shadow,
            halted: self.halted,
        }
    }

    pub fn set_events(&mut self, e: &PendingEvents) {
        self.ev_exception = e.exception;
        self.ev_interrupt = e.interrupt;
        self.nmi_pending = e.nmi_pending;
        self.nmi_masked = e.nmi_masked;
        self.shadow = e.interrupt_shadow;
        self.halted = e.halted;
    }

    /// Current guest TSC.
    pub fn tsc(&self) -> u64 {
        (self.tsc_offset as u64).wrapping_add(self.retired.wrapping_mul(self.config.tsc_per_insn))
    }

    /// The TSC as a guest read (RDTSC, RDTSCP, RDMSR) sees it: [`Cpu::tsc`], or with a
    /// shared mark ([`CpuConfig::tsc_mark`]) the larger of it and the mark, which it raises.
    pub fn guest_tsc_read(&self) -> u64 {
        let own = self.tsc();
        match &self.config.tsc_mark {
            // AcqRel: a read on another vCPU that happens after this one (through any
            // synchronisation of the guest's) sees the raised mark.
            Some(mark) => mark.fetch_max(own, Ordering::AcqRel).max(own),
            None => own,
        }
    }

    pub fn set_tsc(&mut self, tsc: u64) {
        self.tsc_offset =
            tsc.wrapping_sub(self.retired.wrapping_mul(self.config.tsc_per_insn)) as i64;
    }

    /// Queue an exception for delivery before the next instruction. Whether it pushes the
    /// error code is decided by the mode at delivery (none in real mode).
    pub fn inject_exception(&mut self, vector: u8, error_code: Option<u32>) {
        self.ev_exception = Some(PendingException {
            vector,
            error_code,
            cr2: None,
        });
    }

    /// Queue an external interrupt; delivered once RFLAGS.IF=1 and no interrupt shadow.
    pub fn queue_interrupt(&mut self, vector: u8) -> Result<(), CpuError> {
        if let Some(v) = self.ev_interrupt {
            return Err(CpuError::InterruptPending(v));
        }
        self.ev_interrupt = Some(vector);
        Ok(())
    }

    /// Queue an NMI.
    pub fn queue_nmi(&mut self) {
        self.nmi_pending = true;
    }

    /// Whether an interrupt queued now would be delivered at the next instruction boundary.
    /// RFLAGS.IF: whether the guest accepts maskable interrupts. Hardware shows the
    /// hypervisor this bit even for an SEV-ES guest (the VMCB's GUEST_INTERRUPT_MASK), whose
    /// registers it cannot otherwise read.
    pub fn interrupts_enabled(&self) -> bool {
        self.rflags & rflags::IF != 0
    }

    pub fn interrupt_window_open(&self) -> bool {
        self.rflags & rflags::IF != 0 && !self.shadow && self.ev_interrupt.is_none()
    }

    // ------------------------------------------------------------------ completions

    /// Supply the value of an [`Exit::IoIn`].
    pub fn complete_io_in(&mut self, value: u32) -> Result<(), CpuError> {
        if !self.compl.io_awaiting {
            return Err(CpuError::NotAwaiting("IoIn"));
        }
        self.compl.io_awaiting = false;
        self.compl.io_in = Some(value);
        Ok(())
    }

    /// Supply the bytes of an [`Exit::MmioRead`] (`data.len()` = the exit's size).
    pub fn complete_mmio_read(&mut self, data: &[u8]) -> Result<(), CpuError> {
        if !self.mmio.awaiting {
            return Err(CpuError::NotAwaiting("MmioRead"));
        }
        self.mmio.awaiting = false;
        let mut b = [0u8; 16];
        let n = data.len().min(16);
        b[..n].copy_from_slice(&data[..n]);
        self.mmio.reads.push(b);
        Ok(())
    }

    /// Supply the result of an [`Exit::Cpuid`] (eax, ebx, ecx, edx).
    pub fn complete_cpuid(&mut self, result: [u32; 4]) -> Result<(), CpuError> {
        if !self.compl.cpuid_awaiting {
            return Err(CpuError::NotAwaiting("Cpuid"));
        }
        self.compl.cpuid_awaiting = false;
        self.compl.cpuid = Some(result);
        Ok(())
    }

    /// Supply the result of an [`Exit::RdMsr`]: `None` raises #GP in the guest.
    pub fn complete_rdmsr(&mut self, value: Option<u64>) -> Result<(), CpuError> {
        if !self.compl.rdmsr_awaiting {
            return Err(CpuError::NotAwaiting("RdMsr"));
        }
        self.compl.rdmsr_awaiting = false;
        self.compl.rdmsr = Some(value);
        Ok(())
    }

    /// Complete an [`Exit::WrMsr`]: `ok == false` raises #GP in the guest.
    pub fn complete_wrmsr(&mut self, ok: bool) -> Result<(), CpuError> {
        if !self.compl.wrmsr_awaiting {
            return Err(CpuError::NotAwaiting("WrMsr"));
        }
        self.compl.wrmsr_awaiting = false;
        self.compl.wrmsr = Some(ok);
        Ok(())
    }

    // ------------------------------------------------------------------ snapshot

    pub fn snapshot(&self) -> VcpuSnapshot {
        VcpuSnapshot {
            version: VcpuSnapshot::VERSION,
            regs: self.regs(),
            sregs: self.sregs(),
            fpu: self.fpu(),
            xcr0: self.xcr0,
            msrs: self.msrs,
            debug: self.dr,
            events: self.events(),
            tsc: self.tsc(),
            rdrand: Some(self.rng),
        }
    }

    pub fn restore(&mut self, s: &VcpuSnapshot) -> Result<(), CpuError> {
        if s.version != VcpuSnapshot::VERSION {
            return Err(CpuError::SnapshotVersion(s.version));
        }
        self.set_sregs(&s.sregs)?;
        self.set_regs(&s.regs);
        self.set_fpu(&s.fpu);
        self.set_xcr0(s.xcr0)?;
        self.msrs = s.msrs;
        self.dr = s.debug;
        self.set_events(&s.events);
        self.set_tsc(s.tsc);
        if let Some(r) = s.rdrand {
            self.rng = r;
        }
        self.exit = None;
        self.mmio = MmioState::default();
        self.compl = Completion::default();
        self.shutdown = None;
        Ok(())
    }

    // ------------------------------------------------------------------ internals

    /// Recompute everything derived from CR0/CR4/EFER/CS/SS: mode, CPL, segment bases,
    /// TLB and decoded-block lookups.
    pub(crate) fn mode_changed(&mut self) {
        self.recompute_mode();
        self.tlb.flush();
        self.cache.flush_lookup();
        self.pending |= P_FLUSH;
    }

    /// Recompute mode, CPL (from SS.DPL), TLB set and segment bases from the current
    /// registers, without flushing anything.
    pub(crate) fn recompute_mode(&mut self) {
        let long_active = self.efer & efer::LME != 0 && self.cr0 & cr0::PG != 0;
        if long_active {
            self.efer |= efer::LMA;
        } else {
            self.efer &= !efer::LMA;
        }
        let cs = self.seg[CS].attrib;
        self.mode = if self.cr0 & cr0::PE == 0 {
            Mode::Real
        } else if self.efer & efer::LMA != 0 {
            if cs.long() {
                Mode::Long64
            } else if cs.db() {
                Mode::Compat32
            } else {
                Mode::Compat16
            }
        } else if cs.db() {
            Mode::Prot32
        } else {
            Mode::Prot16
        };
        self.legacy = self.mode != Mode::Long64;
        self.cpl = if self.mode == Mode::Real {
            0
        } else {
            self.seg[SS].attrib.dpl()
        };
        if self.rflags & rflags::VM != 0 {
            self.cpl = 3;
        }
        self.tlb_off = if self.cpl == 3 { mmu::TLB_SIZE } else { 0 };
        self.update_seg_bases();
    }

    pub(crate) fn update_seg_bases(&mut self) {
        for i in 0..6 {
            self.seg_base[i] = if self.mode == Mode::Long64 && i < FS {
                0
            } else {
                self.seg[i].base
            };
        }
    }

    /// Set CPL (after CS/SS loads in protected mode).
    pub(crate) fn set_cpl(&mut self, cpl: u8) {
        self.cpl = cpl;
        self.tlb_off = if cpl == 3 { mmu::TLB_SIZE } else { 0 };
    }

    fn completion_pending(&self) -> bool {
        self.compl.io_in.is_some()
            || self.compl.cpuid.is_some()
            || self.compl.rdmsr.is_some()
            || self.compl.wrmsr.is_some()
            || !self.mmio.reads.is_empty()
    }

    /// Log a guest write to RAM page `gpn` (< RAM pages): dirty bit (check, then set) and
    /// decoded-code invalidation.
    ///
    /// # Safety
    /// `gpn` must be a page of guest RAM (`gpn < ram_size / PAGE_SIZE`): it indexes the code
    /// bitmap unchecked.
    #[inline(always)]
    pub(crate) unsafe fn note_write(&mut self, gpn: u64) {
        // SAFETY: `raw` points into `self.mem`, which lives as long as `self`; the caller
        // passes a page number inside RAM, so the code-bitmap word index is in bounds.
        let (bm, w) = unsafe { (&*self.raw.dirty, &*self.raw.code.add((gpn / 64) as usize)) };
        if !bm.is_bit_set(gpn as usize) {
            bm.set_bit(gpn as usize);
        }
        if w.load(Ordering::Relaxed) & (1 << (gpn % 64)) != 0 {
            self.mem.invalidate_page(gpn);
            self.pending |= P_SMC;
        }
    }

    /// Whether RAM page `gpn` holds decoded code.
    #[inline(always)]
    pub(crate) fn is_code_page(&self, gpn: u64) -> bool {
        // SAFETY: as in `note_write`.
        let w = unsafe { &*self.raw.code.add((gpn / 64) as usize) };
        w.load(Ordering::Relaxed) & (1 << (gpn % 64)) != 0
    }

    /// Current code epoch of RAM page `page`.
    ///
    /// # Safety
    /// `page` must be a page of guest RAM: it indexes the epoch array unchecked.
    #[inline(always)]
    pub(crate) unsafe fn code_epoch(&self, page: u64) -> u32 {
        // SAFETY: `raw` is valid (see `note_write`) and the caller passes a RAM page.
        unsafe { (*self.raw.epoch.add(page as usize)).load(Ordering::Relaxed) }
    }

    pub(crate) fn stack_mask(&self) -> u64 {
        if self.mode == Mode::Long64 {
            u64::MAX
        } else if self.seg[SS].attrib.db() {
            0xffff_ffff
        } else {
            0xffff
        }
    }

    // ------------------------------------------------------------------ run loop

    /// Run until an exit, retiring at most `budget` instructions.
    pub fn run(&mut self, budget: u64) -> Exit {
        // Queued MMIO writes of an earlier instruction come first.
        if let Some((gpa, size, data)) = self.mmio.writes.pop_front() {
            return Exit::MmioWrite { gpa, size, data };
        }
        if let Some(reason) = &self.shutdown {
            return Exit::Shutdown {
                reason: reason.clone(),
            };
        }
        if self.sev.is_some() {
            if let Some(x) = self.sev_enter() {
                return x;
            }
        }
        let limit = self.retired.saturating_add(budget);
        self.pauses = 0;
        loop {
            if self.kick.load(Ordering::Relaxed) != 0 {
                let k = self.kick.swap(0, Ordering::Acquire);
                if k & KICK_SEV != 0 {
                    self.sev_poll();
                }
                if k & KICK_STOP != 0 {
                    return Exit::Interrupted;
                }
                if k & KICK_PAUSE != 0 {
                    return Exit::BudgetExhausted;
                }
            }
            // An instruction whose exit was just completed runs first, before any event
            // is delivered (its result must not be consumed by a handler instead).
            if self.completion_pending() {
                self.shadow = false;
                if let Some(x) = self.run_block(1) {
                    return x;
                }
                if self.completion_pending() {
                    // The instruction faulted or was interrupted before using the value: drop it.
                    self.compl = Completion::default();
                    self.mmio.reads.clear();
                    self.mmio.cursor = 0;
                }
                continue;
            }
            if self.retired >= limit {
                return Exit::BudgetExhausted;
            }
            // Events at an instruction boundary.
            if let Some(e) = self.ev_exception.take() {
                self.halted = false;
                if let Some(cr2) = e.cr2 {
                    self.cr2 = cr2;
                }
                let exc = Exc::with(e.vector, e.error_code);
                if let Some(x) = self.raise(exc) {
                    return x;
                }
                continue;
            }
            if !self.shadow {
                if self.nmi_pending && !self.nmi_masked {
                    self.nmi_pending = false;
                    self.nmi_masked = true;
                    self.halted = false;
                    if let Some(x) = self.deliver_external(2) {
                        return x;
                    }
                    continue;
                }
                if self.rflags & rflags::IF != 0 {
                    if let Some(v) = self.ev_interrupt.take() {
                        self.halted = false;
                        if let Some(x) = self.deliver_external(v) {
                            return x;
                        }
                        continue;
                    }
                }
            }
            if self.halted {
                return Exit::Hlt;
            }
            // Single-stepping (RFLAGS.TF): one instruction, then a #DB trap.
            let tf = self.rflags & rflags::TF != 0;
            let max = if self.shadow || tf {
                1
            } else {
                limit - self.retired
            };
            self.shadow = false;
            let before = self.retired;
            let x = self.run_block(max);
            if tf && self.retired > before && self.ev_exception.is_none() {
                self.dr.dr6 |= 1 << 14;
                self.ev_exception = Some(PendingException {
                    vector: esvm_arch::bits::vector::DB,
                    error_code: None,
                    cr2: None,
                });
            }
            if let Some(x) = x {
                return x;
            }
        }
    }

    /// Execute (part of) the block at RIP. Returns an exit, or None to continue.
    fn run_block(&mut self, mut max: u64) -> Option<Exit> {
        // Whether the run loop has events to look at before more blocks run. Evaluated once:
        // instructions that can make it true (STI, POPF, IRET, MOV/POP SS, HLT, INT n and
        // other event delivery) leave run_block, CLI only clears IF, and the other inputs
        // change only between runs.
        let events = self.ev_exception.is_some()
            || (self.ev_interrupt.is_some() && self.rflags & rflags::IF != 0)
            || self.nmi_pending
            || self.shadow
            || self.halted
            || self.rflags & rflags::TF != 0;
        loop {
            let (ptr, len) = match self.lookup_block() {
                Ok(b) => b,
                Err(Stop::Exc(e)) => return self.raise(e),
                Err(Stop::Exit) | Err(Stop::ExitRetire) => return self.exit.take(),
                Err(_) => return None,
            };
            // n >= 1: blocks are never empty and run_block is never called with max == 0.
            let n = (len as u64).min(max) as usize;
            // All instructions but the last: `self.rip` and `self.retired` are committed
            // only when leaving the loop (no handler of an instruction that does not end its
            // block reads them; they see `next_rip`). `cur` is the RIP of instruction `i`.
            let mut cur = self.rip;
            let mut done = 0;
            // `p` walks the array; `last` is instruction n - 1.
            let mut p = ptr;
            // SAFETY: n - 1 < len.
            let last = unsafe { ptr.add(n - 1) };
            while p < last {
                // SAFETY: `ptr..ptr+len` is the instruction array of a block in
                // `self.cache`; blocks are only freed or replaced by `lookup_block` (never
                // while a block runs), so the array outlives this loop. Handlers never touch
                // `self.cache` blocks. p < last < ptr + len.
                let d = unsafe { &*p };
                let next = cur.wrapping_add(d.len as u64);
                self.next_rip = next;
                match (d.h)(self, d) {
                    Ok(()) => {
                        cur = next;
                        // SAFETY: p < last, so p + 1 <= last.
                        p = unsafe { p.add(1) };
                        if self.pending != 0 {
                            self.rip = cur;
                            // SAFETY: both in the array.
                            self.retired += unsafe { p.offset_from(ptr) } as u64;
                            return self.after_pending();
                        }
                    }
                    Err(Stop::Branch) => {
                        self.rip = self.next_rip;
                        // SAFETY: both in the array.
                        done = unsafe { p.offset_from(ptr) } as usize + 1;
                        break;
                    }
                    // A fused pair (only installed where the Jcc, at p + 1, is in the block;
                    // p < last, so it is within the budget too).
                    Err(Stop::FusedNext) => {
                        cur = self.next_rip;
                        // SAFETY: p + 1 <= last, so p + 2 <= last + 1 (one past at most).
                        p = unsafe { p.add(2) };
                    }
                    Err(Stop::FusedBranch) => {
                        self.rip = self.next_rip;
                        // SAFETY: both in the array.
                        done = unsafe { p.offset_from(ptr) } as usize + 2;
                        break;
                    }
                    Err(s) => {
                        self.rip = cur;
                        // SAFETY: both in the array.
                        self.retired += unsafe { p.offset_from(ptr) } as u64;
                        return self.handle_stop(s);
                    }
                }
            }
            // SAFETY: p is at most one past `last`, inside or one past the array.
            let i = unsafe { p.offset_from(ptr) } as usize;
            if done != 0 {
                self.retired += done as u64;
            } else if i == n {
                // A fused pair ended the run.
                self.rip = cur;
                self.retired += n as u64;
                done = n;
            } else {
                // The last one runs alone (`h1`: a fused pair must not run past the budget)
                // with RIP and the retired count committed (RDTSC, RDMSR and other
                // block-ending instructions read them).
                self.rip = cur;
                self.retired += i as u64;
                // SAFETY: as above (i < n <= len).
                let d = unsafe { &*ptr.add(i) };
                self.next_rip = cur.wrapping_add(d.len as u64);
                match (d.h1)(self, d) {
                    Ok(()) | Err(Stop::Branch) => {
                        self.rip = self.next_rip;
                        self.retired += 1;
                        if self.pending != 0 {
                            return self.after_pending();
                        }
                    }
                    Err(s) => return self.handle_stop(s),
                }
                done = n;
            }
            max -= done as u64;
            // Chain to the next block unless something needs the run loop's attention.
            if max == 0 || events || self.kick.load(Ordering::Relaxed) != 0 {
                return None;
            }
        }
    }

    #[cold]
    fn after_pending(&mut self) -> Option<Exit> {
        let p = self.pending;
        self.pending = 0;
        if p & P_MMIO != 0 {
            self.mmio.reads.clear();
            self.mmio.cursor = 0;
            if let Some((gpa, size, data)) = self.mmio.writes.pop_front() {
                return Some(Exit::MmioWrite { gpa, size, data });
            }
        }
        None
    }

    #[cold]
    fn handle_stop(&mut self, s: Stop) -> Option<Exit> {
        match s {
            Stop::Exc(e) => {
                self.pending = 0;
                self.mmio.reads.clear();
                self.mmio.cursor = 0;
                self.mmio.writes.clear();
                self.raise(e)
            }
            Stop::Exit => {
                // Not retired: it will run again, so MMIO writes it queued are dropped and
                // the MMIO reads it consumed will be replayed.
                self.mmio.cursor = 0;
                self.mmio.writes.clear();
                self.pending = 0;
                self.exit.take()
            }
            Stop::ExitRetire => {
                self.rip = self.next_rip;
                self.retired += 1;
                let x = self.exit.take();
                if let Some(w) = self.after_pending() {
                    // An MMIO write and another exit in one instruction: report the write
                    // first, the other exit cannot be deferred, so keep it for later.
                    self.mmio.writes.push_front(match w {
                        Exit::MmioWrite { gpa, size, data } => (gpa, size, data),
                        _ => unreachable!(),
                    });
                }
                x
            }
            Stop::Retire | Stop::Branch => {
                self.rip = self.next_rip;
                self.retired += 1;
                self.after_pending()
            }
            Stop::FusedNext | Stop::FusedBranch => {
                self.rip = self.next_rip;
                self.retired += 2;
                self.after_pending()
            }
            Stop::Yield => {
                self.mmio.cursor = 0;
                self.after_pending()
            }
        }
    }

    /// Raise an exception at the current instruction boundary (with double/triple fault
    /// handling). Returns a shutdown exit on triple fault.
    pub(crate) fn raise(&mut self, e: Exc) -> Option<Exit> {
        self.halted = false;
        match self.deliver_exception(e) {
            Ok(()) => None,
            Err(reason) => {
                self.shutdown = Some(reason.clone());
                Some(Exit::Shutdown { reason })
            }
        }
    }

    fn deliver_external(&mut self, vector: u8) -> Option<Exit> {
        let ret = self.rip;
        match self.deliver_event(vector, None, intr::Kind::External, ret) {
            Ok(()) => None,
            Err(Stop::Exc(e)) => self.raise_during_delivery(vector, e),
            Err(_) => {
                let reason = format!("interrupt {vector} could not be delivered");
                self.shutdown = Some(reason.clone());
                Some(Exit::Shutdown { reason })
            }
        }
    }

    fn raise_during_delivery(&mut self, first: u8, e: Exc) -> Option<Exit> {
        match self.fault_during_delivery(first, e) {
            Ok(()) => None,
            Err(reason) => {
                self.shutdown = Some(reason.clone());
                Some(Exit::Shutdown { reason })
            }
        }
    }
}

#[cfg(test)]
mod tests;
