//! The `emu` backend: VMs whose vCPUs are esvm's software x86-64 interpreter (`esvm-cpu`).
//!
//! Deterministic (virtual time is the retired-instruction count), unprivileged, and the only
//! backend that can run SEV-ES guests.

use std::sync::{Arc, Mutex, OnceLock};

use esvm_arch::{DebugRegs, FpuState, PendingEvents, Regs, SpecialRegs, VcpuSnapshot};
use esvm_cpu::{Cpu, CpuConfig, CpuError, Exit, PhysMemory, SevEsConfig, TrapReg};

mod move_context;
mod sev_ext;

use crate::ghcb::{GhcbOutcome, GuestResponse, MsrProtocolOutcome, VmgexitOutcome};
use crate::memory::GuestMemory;
use crate::sev::moving::{MoveFlags, VmMoves};
use crate::sev::{
    self, Attempt, ReplayServices, SevGuestContext, SevVcpu, SevVcpuState, SevVm, VmmAnswer, VmmIo,
};
use crate::{
    BackendKind, DirtyBitmap, HvError, Hypervisor, Kicker, Result, SevMemoryOp, SregsView,
    TrackedSregs, Vcpu, Vm, VmConfig, VmExit, VmType,
};

fn cpu_err(e: CpuError) -> HvError {
    match e {
        CpuError::UnknownMsr(i) => {
            HvError::InvalidState(format!("MSR {i:#x} is not modelled by the software vCPU"))
        }
        other => HvError::Cpu(other),
    }
}

/// The software-vCPU backend.
pub struct EmuHypervisor;

impl Hypervisor for EmuHypervisor {
    fn kind(&self) -> BackendKind {
        BackendKind::Emu
    }

    fn create_vm(&self, config: &VmConfig) -> Result<Arc<dyn Vm>> {
        Ok(Arc::new(EmuVm::new(config)?))
    }
}

/// A VM on the software vCPU.
pub struct EmuVm {
    config: VmConfig,
    memory: Arc<GuestMemory>,
    phys: PhysMemory,
    created: Mutex<Vec<u32>>,
    /// SEV-ES guest context, set by LAUNCH_START, RECEIVE_START or a same-host move.
    sev: Arc<OnceLock<Arc<SevGuestContext>>>,
    /// The PhysMemory the guest-memory write hook uses; emptied on drop (see `new`).
    hook_slot: Arc<Mutex<Option<PhysMemory>>>,
    /// Same-host moves of the guest (see `crate::sev::moving`).
    moves: VmMoves,
    /// The vCPUs' shared TSC mark ([`VmConfig::parallel_vcpus`]).
    tsc_mark: Arc<std::sync::atomic::AtomicU64>,
}

impl Drop for EmuVm {
    fn drop(&mut self) {
        // VMs sharing this memory (move_context) share the slot: the last one empties it.
        if !self.moves.release_memory() {
            return;
        }
        self.hook_slot
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
    }
}

impl EmuVm {
    pub fn new(config: &VmConfig) -> Result<Self> {
        if config.vcpus == 0 {
            return Err(HvError::InvalidState("a VM needs at least one vCPU".into()));
        }
        let memory = Arc::new(GuestMemory::new(config.mem_size)?);
        let keepalive: Arc<dyn std::any::Any + Send + Sync> = memory.clone();
        // SAFETY: host_base()/bitmap() describe the single mmap region of `memory`, which
        // stays mapped while `keepalive` (an Arc of it) lives inside the PhysMemory; the VMM
        // accesses guest RAM only through vm-memory's volatile accessors, never through Rust
        // references to its bytes.
        let phys = unsafe {
            PhysMemory::from_raw(
                memory.host_base(),
                memory.size(),
                memory.bitmap() as *const _,
                Some(keepalive),
            )
        }
        .map_err(HvError::EmuMemory)?;
        phys.set_parallel(config.parallel_vcpus);
        // VMM-side writes through GuestMemory::write must drop decoded code. The hook reaches
        // the PhysMemory through a slot the VM empties when it is dropped: PhysMemory keeps
        // the GuestMemory alive, so holding it directly would be a reference cycle (a leak of
        // all guest RAM per VM).
        let hook_slot = Arc::new(Mutex::new(Some(phys.clone())));
        {
            let slot = hook_slot.clone();
            memory.set_write_hook(Box::new(move |gpa, len| {
                if let Some(p) = slot.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                    p.invalidate_code(gpa, len);
                }
            }));
        }
        Ok(EmuVm {
            config: config.clone(),
            memory,
            phys,
            created: Mutex::new(Vec::new()),
            sev: Arc::new(OnceLock::new()),
            hook_slot,
            moves: VmMoves::new(),
            tsc_mark: Arc::default(),
        })
    }

    fn sev_vm(&self) -> Result<&Arc<SevGuestContext>> {
        self.moves.check_sev()?;
        self.sev
            .get()
            .ok_or_else(|| HvError::Sev("no SEV-ES guest context: run LAUNCH_START first".into()))
    }

    fn require_sev_type(&self) -> Result<()> {
        if self.config.vm_type != VmType::SevEs {
            return Err(HvError::Sev(
                "this VM is a plain VM; SEV-ES commands need a VM created with VmType::SevEs"
                    .into(),
            ));
        }
        Ok(())
    }

    /// The guest context this VM holds (the firmware handle and the secure processor it
    /// lives in), once launched, received or moved in; None once it moved away.
    pub fn sev_context(&self) -> Option<Arc<SevGuestContext>> {
        // A dead VM's context belongs to the VM it was moved to.
        self.sev.get().filter(|_| !self.moves.is_dead()).cloned()
    }

    /// The interpreter configuration of this VM's vCPU `id`: the VM's CPUID table with
    /// this vCPU's APIC ID in it.
    fn cpu_config(&self, id: u32) -> CpuConfig {
        CpuConfig {
            cpuid: self.config.cpuid.clone().for_vcpu(id),
            cpuid_intercepts: self.config.cpuid_intercepts.clone(),
            msr_intercepts: self.config.msr_intercepts.clone(),
            pause_ends_budget: self.config.pause_ends_budget,
            tsc_mark: self.config.parallel_vcpus.then(|| self.tsc_mark.clone()),
            vcpu_id: id,
            sev_es: (self.config.vm_type == VmType::SevEs).then_some(SevEsConfig {
                c_bit: sev::C_BIT,
                intercepts: sev::VC_INTERCEPTS,
            }),
            ..CpuConfig::default()
        }
    }

    /// The interpreter's view of guest RAM.
    pub fn phys(&self) -> &PhysMemory {
        &self.phys
    }
}

impl Vm for EmuVm {
    fn backend(&self) -> BackendKind {
        BackendKind::Emu
    }

    fn vm_type(&self) -> VmType {
        self.config.vm_type
    }

    fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    fn create_vcpu(&self, id: u32) -> Result<Box<dyn Vcpu>> {
        let mut created = self.created.lock().expect("vcpu list poisoned");
        if id >= self.config.vcpus {
            return Err(HvError::InvalidState(format!(
                "vCPU id {id} is out of range: the VM was created with {} vCPUs",
                self.config.vcpus
            )));
        }
        if created.contains(&id) {
            return Err(HvError::InvalidState(format!("vCPU {id} already exists")));
        }
        created.push(id);
        let sev_es = self.config.vm_type == VmType::SevEs;
        let config = self.cpu_config(id);
        let mut vcpu = EmuVcpu::new(id, Cpu::new(config.clone(), self.phys.clone()), config);
        vcpu.moves = Some(self.moves.flags());
        if sev_es {
            vcpu.sev = Some(Box::new(SevVcpuState::new()));
            vcpu.sev_ctx = Some(self.sev.clone());
            vcpu.cpuid = self.config.cpuid.clone().for_vcpu(id);
        }
        Ok(Box::new(vcpu))
    }

    fn begin_postcopy(&self, missing: &[u64]) -> Result<Arc<esvm_cpu::mem::MissingPages>> {
        self.phys
            .begin_postcopy(missing)
            .map_err(HvError::EmuMemory)
    }

    unsafe fn missing_pages_mut(&self, first: u64, count: u64) -> Result<&mut [u8]> {
        // SAFETY: the caller's contract is the one `missing_pages_mut` requires.
        unsafe { self.phys.missing_pages_mut(first, count) }.map_err(HvError::EmuMemory)
    }

    fn take_dirty_log(&self) -> Result<DirtyBitmap> {
        self.moves.check_dirty_log()?;
        Ok(self.memory.take_dirty())
    }

    /// The emu backend models SEV-ES hardware: every VM has the extension; its commands
    /// refuse a plain VM.
    fn sev(&self) -> Option<&dyn SevVm> {
        Some(self)
    }
}

/// What a protected vCPU's run produced, before it is shown to the VMM.
enum SevStep {
    Io(VmmIo),
    Cpu(Exit),
    Terminated(String),
    /// In AP reset hold: waits for a SIPI ([`SevVcpu::deliver_sipi`]).
    ApResetHold,
    Budget,
}

/// What the last exit left for the VMM to fill in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Awaiting {
    Nothing,
    IoIn(usize),
    MmioRead(usize),
    Cpuid,
    RdMsr,
    WrMsr,
}

struct CpuKicker(esvm_cpu::Kicker);

impl Kicker for CpuKicker {
    fn kick(&self) {
        self.0.kick();
    }
}

/// A software vCPU.
pub struct EmuVcpu {
    id: u32,
    cpu: Cpu,
    budget: Option<u64>,
    awaiting: Awaiting,
    data: [u8; 16],
    cpuid_result: [u32; 4],
    msr_value: u64,
    msr_fault: bool,
    /// What the CPU was created with (a same-host move resets the CPU of a source vCPU).
    cpu_config: CpuConfig,
    /// SEV-ES: the hypervisor's per-vCPU state (None on plain VMs).
    sev: Option<Box<SevVcpuState>>,
    sev_ctx: Option<Arc<OnceLock<Arc<SevGuestContext>>>>,
    /// CPUID table the hypervisor answers GHCB CPUID requests from.
    cpuid: esvm_arch::cpuid::CpuidTable,
    /// The VMM's answer to the GHCB request's blocking read (SEV-ES).
    ghcb_read: Option<VmmIo>,
    /// The VM's move state (see `crate::sev::moving`).
    moves: Option<Arc<MoveFlags>>,
}

impl EmuVcpu {
    fn new(id: u32, cpu: Cpu, cpu_config: CpuConfig) -> Self {
        EmuVcpu {
            id,
            cpu,
            cpu_config,
            budget: None,
            awaiting: Awaiting::Nothing,
            data: [0; 16],
            cpuid_result: [0; 4],
            msr_value: 0,
            msr_fault: false,
            sev: None,
            sev_ctx: None,
            cpuid: esvm_arch::cpuid::CpuidTable {
                entries: Vec::new(),
            },
            ghcb_read: None,
            moves: None,
        }
    }

    /// Hand the VMM's answer to the last exit back to the interpreter.
    fn complete(&mut self) -> Result<()> {
        let awaiting = std::mem::replace(&mut self.awaiting, Awaiting::Nothing);
        match awaiting {
            Awaiting::Nothing => Ok(()),
            Awaiting::IoIn(n) => {
                let mut v = [0u8; 4];
                v[..n].copy_from_slice(&self.data[..n]);
                self.cpu.complete_io_in(u32::from_le_bytes(v))
            }
            Awaiting::MmioRead(n) => self.cpu.complete_mmio_read(&self.data[..n]),
            Awaiting::Cpuid => self.cpu.complete_cpuid(self.cpuid_result),
            Awaiting::RdMsr => self
                .cpu
                .complete_rdmsr((!self.msr_fault).then_some(self.msr_value)),
            Awaiting::WrMsr => self.cpu.complete_wrmsr(!self.msr_fault),
        }
        .map_err(cpu_err)
    }

    /// Retire an instruction whose exit the VMM has answered, so that the architectural
    /// state is self-contained (for snapshots).
    fn settle(&mut self) -> Result<()> {
        if self.awaiting == Awaiting::Nothing {
            return Ok(());
        }
        self.complete()?;
        match self.cpu.run(1) {
            Exit::BudgetExhausted | Exit::IoOut { .. } | Exit::MmioWrite { .. } => Ok(()),
            other => Err(HvError::Internal {
                backend: BackendKind::Emu,
                message: format!("completing an exit before a snapshot produced {other:?}"),
            }),
        }
    }

    pub fn cpu(&self) -> &Cpu {
        &self.cpu
    }
}

impl EmuVcpu {
    fn sev_context(&self) -> Result<Arc<SevGuestContext>> {
        self.check_sev_alive()?;
        self.sev_ctx
            .as_ref()
            .and_then(|c| c.get().cloned())
            .ok_or_else(|| {
                HvError::Sev("the VM has no SEV-ES guest context yet (LAUNCH_START)".into())
            })
    }

    fn guard(&self, operation: &'static str) -> Result<()> {
        if self.is_protected() {
            return Err(HvError::ProtectedState {
                vcpu: self.id,
                operation,
            });
        }
        Ok(())
    }

    /// Run a protected vCPU: write traps refresh the tracked registers, VMGEXITs are handled
    /// here and turned into ordinary port/MMIO exits for the VMM.
    fn run_sev(&mut self) -> Result<VmExit<'_>> {
        let step = self.sev_step()?;
        Ok(match step {
            SevStep::Io(io) => self.vmm_io_exit(io),
            SevStep::Cpu(exit) => return self.map_exit(exit),
            SevStep::Terminated(reason) => VmExit::Terminated { reason },
            SevStep::ApResetHold => VmExit::ApResetHold,
            SevStep::Budget => VmExit::BudgetExhausted,
        })
    }

    /// Advance a protected vCPU until something the VMM must see (all owned data, so the
    /// borrow of the exit starts only in [`Self::run_sev`]).
    fn sev_step(&mut self) -> Result<SevStep> {
        let start = self.cpu.instructions_retired();
        let budget = self.budget.unwrap_or(u64::MAX);
        loop {
            // Writes a completed VMGEXIT made to devices go to the VMM first, in order.
            if let Some(io) = self.sev.as_mut().and_then(|s| s.outbox.pop_front()) {
                return Ok(SevStep::Io(io));
            }
            // A vCPU in AP reset hold does not run until a SIPI releases it (as KVM blocks
            // it): neither interrupts nor another run wake it.
            if self
                .sev
                .as_ref()
                .is_some_and(|s| s.ghcb.ap_reset_hold.is_some())
            {
                return Ok(SevStep::ApResetHold);
            }
            if let Some(msr) = self.sev.as_ref().and_then(|s| s.in_flight) {
                if let Some(step) = self.advance_vmgexit(msr)? {
                    return Ok(step);
                }
                continue;
            }
            let used = self.cpu.instructions_retired() - start;
            if used >= budget {
                return Ok(SevStep::Budget);
            }
            self.complete()?;
            match self.cpu.run(budget - used) {
                Exit::WriteTrap { reg, value, efer } => {
                    let s = self.sev.as_mut().expect("SEV-ES vCPU");
                    match reg {
                        TrapReg::Cr0 => {
                            s.tracked.cr0 = value;
                            s.tracked.efer = efer;
                        }
                        TrapReg::Cr4 => s.tracked.cr4 = value,
                        TrapReg::Cr8 => s.tracked.cr8 = value,
                        TrapReg::Efer => s.tracked.efer = value,
                    }
                }
                Exit::Vmgexit { ghcb_msr } => {
                    let s = self.sev.as_mut().expect("SEV-ES vCPU");
                    s.in_flight = Some(ghcb_msr);
                    s.answers.clear();
                }
                Exit::Shutdown { reason } => {
                    return Ok(SevStep::Cpu(Exit::Shutdown {
                        reason: format!(
                            "{reason} (SEV-ES guest: CPUID, port I/O, MSR and MMIO accesses \
                             raise #VC, vector 29; a guest without a working #VC handler, or \
                             with a broken IDT, ends in this shutdown)"
                        ),
                    }))
                }
                other => return Ok(SevStep::Cpu(other)),
            }
        }
    }

    /// Show one VMM I/O of a GHCB request to the VMM as an ordinary exit.
    fn vmm_io_exit(&mut self, io: VmmIo) -> VmExit<'_> {
        match io {
            VmmIo::IoOut { port, size, value } => {
                self.data[..4].copy_from_slice(&value.to_le_bytes());
                VmExit::IoOut {
                    port,
                    data: &self.data[..size],
                }
            }
            VmmIo::IoIn { port, size } => {
                self.data = [0; 16];
                VmExit::IoIn {
                    port,
                    data: &mut self.data[..size],
                }
            }
            VmmIo::MmioWrite { gpa, data } => {
                let n = data.len().min(16);
                self.data[..n].copy_from_slice(&data[..n]);
                VmExit::MmioWrite {
                    addr: gpa,
                    data: &self.data[..n],
                }
            }
            VmmIo::MmioRead { gpa, len } => {
                self.data = [0; 16];
                VmExit::MmioRead {
                    addr: gpa,
                    data: &mut self.data[..len.min(16)],
                }
            }
            // The same exits a plain vCPU's intercepted RDMSR/WRMSR give the VMM.
            VmmIo::RdMsr { index } => self.rdmsr_exit(index),
            VmmIo::WrMsr { index, value } => self.wrmsr_exit(index, value),
        }
    }

    /// The RDMSR exit the VMM answers in `msr_value`/`msr_fault` (a plain vCPU's intercepted
    /// RDMSR, or one an SEV-ES guest forwarded through the GHCB).
    fn rdmsr_exit(&mut self, index: u32) -> VmExit<'_> {
        self.msr_value = 0;
        self.msr_fault = false;
        VmExit::RdMsr {
            index,
            value: &mut self.msr_value,
            fault: &mut self.msr_fault,
        }
    }

    /// The WRMSR exit the VMM refuses through `msr_fault` (plain or forwarded, as above).
    fn wrmsr_exit(&mut self, index: u32, value: u64) -> VmExit<'_> {
        self.msr_fault = false;
        VmExit::WrMsr {
            index,
            value,
            fault: &mut self.msr_fault,
        }
    }

    /// Try to finish the in-flight VMGEXIT. `Ok(Some(exit))` when the VMM must act first.
    fn advance_vmgexit(&mut self, msr: u64) -> Result<Option<SevStep>> {
        let ctx = self.sev_context()?;
        let mut s = self.sev.take().expect("SEV-ES vCPU");
        if let Some(req) = self.ghcb_read.take() {
            s.answers.push(match req {
                VmmIo::IoIn { size, .. } => {
                    let mut v = [0u8; 4];
                    v[..size].copy_from_slice(&self.data[..size]);
                    VmmAnswer::Value(u32::from_le_bytes(v))
                }
                VmmIo::MmioRead { len, .. } => VmmAnswer::Bytes(self.data[..len.min(16)].to_vec()),
                VmmIo::RdMsr { .. } => {
                    VmmAnswer::MsrRead((!self.msr_fault).then_some(self.msr_value))
                }
                VmmIo::WrMsr { .. } => VmmAnswer::MsrWritten(!self.msr_fault),
                _ => VmmAnswer::Done,
            });
        }
        let phys = self.cpu.memory().clone();
        let tsc = self.cpu.tsc();
        let result = {
            let SevVcpuState {
                tracked,
                mtrr,
                ghcb,
                answers,
                ..
            } = &mut *s;
            let mut services = ReplayServices {
                phys: &phys,
                cpuid: &self.cpuid,
                tsc,
                vcpu_id: self.id,
                tracked,
                mtrr,
                vm: &ctx,
                answers,
                next_answer: 0,
                blocked_on: None,
                writes: Vec::new(),
                shared_writes: Vec::new(),
            };
            sev::attempt(msr, ghcb, &mut services)
        };
        let outcome = match result {
            Attempt::Blocked(req) => {
                self.sev = Some(s);
                self.ghcb_read = Some(req.clone());
                return Ok(Some(SevStep::Io(req)));
            }
            Attempt::Done(kind, outcome, writes, shared_writes) => {
                for (gpa, data) in shared_writes {
                    phys.write_host(gpa, &data)
                        .map_err(|source| HvError::SevMemory {
                            op: SevMemoryOp::WriteGhcb,
                            source,
                        })?;
                }
                s.in_flight = None;
                s.answers.clear();
                s.outbox.extend(writes);
                s.vmgexits.record(kind);
                outcome
            }
        };
        self.sev = Some(s);
        let terminated = |reason: String| Ok(Some(SevStep::Terminated(reason)));
        match outcome {
            VmgexitOutcome::Msr(MsrProtocolOutcome::Respond { msr }) => {
                self.cpu.set_ghcb_msr(msr);
                Ok(None)
            }
            VmgexitOutcome::Msr(MsrProtocolOutcome::ApResetHold { msr }) => {
                self.cpu.set_ghcb_msr(msr);
                Ok(Some(SevStep::ApResetHold))
            }
            VmgexitOutcome::Msr(MsrProtocolOutcome::Terminate {
                reason_set,
                reason_code,
            }) => terminated(format!(
                "the guest requested termination (GHCB MSR protocol): reason set {reason_set}, \
                 reason code {reason_code:#x}"
            )),
            VmgexitOutcome::Msr(MsrProtocolOutcome::Error(e)) | VmgexitOutcome::Failed(e) => {
                terminated(format!("GHCB protocol violation: {e}"))
            }
            VmgexitOutcome::Ghcb(GhcbOutcome::Resume(GuestResponse::Malformed {
                code,
                detail,
            })) => {
                tracing::debug!(vcpu = self.id, ?code, %detail, "malformed GHCB request answered with an error");
                Ok(None)
            }
            VmgexitOutcome::Ghcb(GhcbOutcome::Resume(_)) => Ok(None),
            VmgexitOutcome::Ghcb(GhcbOutcome::NmiComplete) => {
                // The guest's NMI handler is done: unblock, and deliver what waited.
                let s = self.sev.as_mut().expect("SEV-ES vCPU");
                s.nmi_blocked = s.nmi_pending;
                if std::mem::take(&mut s.nmi_pending) {
                    self.cpu.queue_nmi();
                }
                Ok(None)
            }
            VmgexitOutcome::Ghcb(GhcbOutcome::ApResetHold) => Ok(Some(SevStep::ApResetHold)),
            VmgexitOutcome::Ghcb(GhcbOutcome::Terminate {
                reason_set,
                reason_code,
                info,
            }) => terminated(format!(
                "the guest requested termination (GHCB TERM_REQUEST): reason set {reason_set}, \
                 reason code {reason_code:#x}, info {info:#x}"
            )),
            VmgexitOutcome::Ghcb(GhcbOutcome::UnsupportedEvent { info1, info2 }) => {
                terminated(format!(
                    "the guest reported an event it cannot handle (UNSUPPORTED_EVENT): info1 \
                     {info1:#x}, info2 {info2:#x}"
                ))
            }
        }
    }

    fn map_exit(&mut self, exit: Exit) -> Result<VmExit<'_>> {
        Ok(match exit {
            Exit::IoIn { port, size } => {
                let n = size as usize;
                self.data = [0; 16];
                self.awaiting = Awaiting::IoIn(n);
                VmExit::IoIn {
                    port,
                    data: &mut self.data[..n],
                }
            }
            Exit::IoOut { port, size, data } => {
                let n = size as usize;
                self.data[..4].copy_from_slice(&data.to_le_bytes());
                VmExit::IoOut {
                    port,
                    data: &self.data[..n],
                }
            }
            Exit::MmioRead { gpa, size } => {
                let n = size as usize;
                self.data = [0; 16];
                self.awaiting = Awaiting::MmioRead(n);
                VmExit::MmioRead {
                    addr: gpa,
                    data: &mut self.data[..n],
                }
            }
            Exit::MmioWrite { gpa, size, data } => {
                self.data = data;
                VmExit::MmioWrite {
                    addr: gpa,
                    data: &self.data[..size as usize],
                }
            }
            Exit::Hlt => VmExit::Hlt,
            Exit::Shutdown { reason } => VmExit::Shutdown { reason },
            Exit::Cpuid { function, index } => {
                self.awaiting = Awaiting::Cpuid;
                self.cpuid_result = [0; 4];
                VmExit::Cpuid {
                    function,
                    index,
                    result: &mut self.cpuid_result,
                }
            }
            Exit::RdMsr { index } => {
                self.awaiting = Awaiting::RdMsr;
                self.rdmsr_exit(index)
            }
            Exit::WrMsr { index, value } => {
                self.awaiting = Awaiting::WrMsr;
                self.wrmsr_exit(index, value)
            }
            Exit::BudgetExhausted => VmExit::BudgetExhausted,
            Exit::Interrupted => VmExit::Interrupted,
            Exit::Vmgexit { .. } | Exit::WriteTrap { .. } => {
                return Err(HvError::Internal {
                    backend: BackendKind::Emu,
                    message: format!("SEV-ES exit {exit:?} on a vCPU without SEV-ES state"),
                })
            }
        })
    }
}

impl Vcpu for EmuVcpu {
    fn id(&self) -> u32 {
        self.id
    }

    fn run(&mut self) -> Result<VmExit<'_>> {
        self.check_runnable()?;
        if let Some(s) = &self.sev {
            if !s.protected {
                // On hardware VMRUN of an SEV-ES guest needs the vCPU's encrypted VMSA (else
                // VMEXIT_INVALID); KVM refuses to run such a vCPU.
                return Err(HvError::Sev(format!(
                    "vCPU {} of an SEV-ES VM has no encrypted VMSA yet: run                      LAUNCH_UPDATE_VMSA (or receive it with RECEIVE_UPDATE_VMSA) before                      running it",
                    self.id
                )));
            }
            return self.run_sev();
        }
        self.complete()?;
        let exit = self.cpu.run(self.budget.unwrap_or(u64::MAX));
        self.map_exit(exit)
    }

    fn get_sregs_view(&self) -> Result<SregsView> {
        match &self.sev {
            Some(s) if s.protected => Ok(SregsView::Tracked(TrackedSregs {
                cr0: s.tracked.cr0,
                cr4: s.tracked.cr4,
                cr8: s.tracked.cr8,
                efer: s.tracked.efer,
                apic_base: s.tracked.apic_base,
            })),
            _ => Ok(SregsView::Full(self.cpu.sregs())),
        }
    }

    fn is_protected(&self) -> bool {
        self.sev.as_ref().is_some_and(|s| s.protected)
    }

    fn exit_pending(&self) -> bool {
        self.ghcb_read.is_some()
            || self
                .sev
                .as_ref()
                .is_some_and(|s| s.in_flight.is_some() || !s.outbox.is_empty())
    }

    fn sev(&self) -> Option<&dyn SevVcpu> {
        Some(self)
    }

    fn sev_mut(&mut self) -> Option<&mut dyn SevVcpu> {
        Some(self)
    }

    fn get_regs(&self) -> Result<Regs> {
        self.guard("get_regs")?;
        Ok(self.cpu.regs())
    }
    fn set_regs(&mut self, regs: &Regs) -> Result<()> {
        self.guard("set_regs")?;
        self.cpu.set_regs(regs);
        Ok(())
    }
    fn get_sregs(&self) -> Result<SpecialRegs> {
        self.guard("get_sregs (use get_sregs_view for the tracked registers)")?;
        Ok(self.cpu.sregs())
    }
    fn set_sregs(&mut self, sregs: &SpecialRegs) -> Result<()> {
        self.guard("set_sregs")?;
        self.cpu.set_sregs(sregs).map_err(cpu_err)
    }
    fn get_fpu(&self) -> Result<FpuState> {
        self.guard("get_fpu")?;
        Ok(self.cpu.fpu())
    }
    fn set_fpu(&mut self, fpu: &FpuState) -> Result<()> {
        self.guard("set_fpu")?;
        self.cpu.set_fpu(fpu);
        Ok(())
    }
    fn get_xcr0(&self) -> Result<u64> {
        self.guard("get_xcr0")?;
        Ok(self.cpu.xcr0())
    }
    fn set_xcr0(&mut self, xcr0: u64) -> Result<()> {
        self.guard("set_xcr0")?;
        self.cpu.set_xcr0(xcr0).map_err(cpu_err)
    }
    fn get_msrs(&self, indices: &[u32]) -> Result<Vec<u64>> {
        self.guard("get_msrs")?;
        indices
            .iter()
            .map(|i| self.cpu.get_msr(*i).map_err(cpu_err))
            .collect()
    }
    fn set_msrs(&mut self, entries: &[(u32, u64)]) -> Result<()> {
        self.guard("set_msrs")?;
        for (i, v) in entries {
            self.cpu.set_msr(*i, *v).map_err(cpu_err)?;
        }
        Ok(())
    }
    fn get_debug_regs(&self) -> Result<DebugRegs> {
        self.guard("get_debug_regs")?;
        Ok(self.cpu.debug_regs())
    }
    fn set_debug_regs(&mut self, regs: &DebugRegs) -> Result<()> {
        self.guard("set_debug_regs")?;
        self.cpu.set_debug_regs(regs);
        Ok(())
    }
    fn get_events(&self) -> Result<PendingEvents> {
        Ok(self.cpu.events())
    }
    fn set_events(&mut self, events: &PendingEvents) -> Result<()> {
        self.cpu.set_events(events);
        Ok(())
    }
    fn get_tsc(&self) -> Result<u64> {
        Ok(self.cpu.tsc())
    }
    fn set_tsc(&mut self, tsc: u64) -> Result<()> {
        self.cpu.set_tsc(tsc);
        Ok(())
    }

    fn inject_exception(&mut self, vector: u8, error_code: Option<u32>) -> Result<()> {
        // As KVM: an exception carries its error code only in protected mode, judged from
        // the CR0 the hypervisor knows (the tracked CR0 for a protected vCPU).
        let known_cr0 = self.get_sregs_view()?.cr0();
        self.cpu
            .inject_exception(vector, sev::injected_error_code(known_cr0, error_code));
        Ok(())
    }
    fn queue_interrupt(&mut self, vector: u8) -> Result<()> {
        let known_cr8 = self.get_sregs_view()?.cr8();
        if !sev::tpr_accepts(known_cr8, vector) {
            return Err(HvError::InvalidState(format!(
                "interrupt vector {vector:#x} is masked by the task priority (CR8 = {known_cr8}); \
                 queue it once the guest lowers its TPR"
            )));
        }
        self.cpu.queue_interrupt(vector).map_err(cpu_err)
    }
    fn inject_nmi(&mut self) -> Result<()> {
        match self.sev.as_mut().filter(|s| s.protected) {
            // NMIs stay blocked from one NMI's delivery to the guest's NMI_COMPLETE.
            Some(s) if s.nmi_blocked => s.nmi_pending = true,
            Some(s) => {
                s.nmi_blocked = true;
                self.cpu.queue_nmi();
            }
            None => self.cpu.queue_nmi(),
        }
        Ok(())
    }
    fn interrupt_window_open(&self) -> Result<bool> {
        Ok(self.cpu.interrupt_window_open())
    }
    fn interrupts_enabled(&self) -> Result<bool> {
        Ok(self.cpu.interrupts_enabled())
    }
    fn set_instruction_budget(&mut self, budget: Option<u64>) -> Result<()> {
        self.budget = budget;
        Ok(())
    }
    fn instructions_retired(&self) -> Option<u64> {
        Some(self.cpu.instructions_retired())
    }
    fn kicker(&self) -> Arc<dyn Kicker> {
        Arc::new(CpuKicker(self.cpu.kicker()))
    }

    fn snapshot(&self) -> Result<VcpuSnapshot> {
        self.guard("snapshot (protected vCPUs move as sealed VMSAs)")?;
        if self.awaiting != Awaiting::Nothing {
            return Err(HvError::InvalidState(
                "vCPU is in the middle of an exit; run it once more (or call settle) before \
                 taking a snapshot"
                    .into(),
            ));
        }
        Ok(self.cpu.snapshot())
    }
    fn restore(&mut self, s: &VcpuSnapshot) -> Result<()> {
        self.guard("restore")?;
        self.awaiting = Awaiting::Nothing;
        self.cpu.restore(s).map_err(cpu_err)
    }
}

impl EmuVcpu {
    /// Complete any answered exit and retire its instruction (see [`Vcpu::snapshot`]).
    pub fn settle_exit(&mut self) -> Result<()> {
        self.settle()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Guest RAM is freed when the VM and its vCPUs are gone (no Arc cycle through the
    /// code-invalidation hook).
    #[test]
    fn guest_memory_is_freed_with_the_vm() {
        let vm = EmuVm::new(&VmConfig::plain(16 << 20, 1)).unwrap();
        let weak = Arc::downgrade(&vm.memory);
        let vcpu = vm.create_vcpu(0).unwrap();
        vm.memory().write(0x1000, &[1, 2, 3]).unwrap();
        drop(vcpu);
        drop(vm);
        assert!(weak.upgrade().is_none(), "guest memory leaked");
    }
}
