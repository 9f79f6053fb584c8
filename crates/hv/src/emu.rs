//! The `emu` backend: VMs whose vCPUs are esvm's software x86-64 interpreter (`esvm-cpu`).
//!
//! Deterministic (virtual time is the retired-instruction count), unprivileged, and the only
//! backend that can run SEV-ES guests.

use std::sync::{Arc, Mutex};

use esvm_arch::bits::cr0;
use esvm_arch::{DebugRegs, FpuState, PendingEvents, Regs, SpecialRegs, VcpuSnapshot};
use esvm_cpu::{Cpu, CpuConfig, CpuError, Exit, PhysMemory};

use crate::memory::GuestMemory;
use crate::{
    BackendKind, DirtyBitmap, HvError, Hypervisor, Kicker, Result, Vcpu, Vm, VmConfig, VmExit,
    VmType,
};

fn cpu_err(e: CpuError) -> HvError {
    match e {
        CpuError::UnknownMsr(i) => {
            HvError::InvalidState(format!("MSR {i:#x} is not modelled by the software vCPU"))
        }
        other => HvError::InvalidState(other.to_string()),
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
        .map_err(|e| HvError::Internal {
            backend: BackendKind::Emu,
            message: e.to_string(),
        })?;
        {
            // VMM-side writes through GuestMemory::write must drop decoded code.
            let phys = phys.clone();
            memory.set_write_hook(Box::new(move |gpa, len| phys.invalidate_code(gpa, len)));
        }
        Ok(EmuVm {
            config: config.clone(),
            memory,
            phys,
            created: Mutex::new(Vec::new()),
        })
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
        let cfg = CpuConfig {
            cpuid: self.config.cpuid.clone(),
            cpuid_intercepts: self.config.cpuid_intercepts.clone(),
            msr_intercepts: self.config.msr_intercepts.clone(),
            vcpu_id: id,
            ..CpuConfig::default()
        };
        Ok(Box::new(EmuVcpu::new(id, Cpu::new(cfg, self.phys.clone()))))
    }

    fn take_dirty_log(&self) -> Result<DirtyBitmap> {
        Ok(self.memory.take_dirty())
    }
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
    cpuid: [u32; 4],
    msr_value: u64,
    msr_fault: bool,
}

impl EmuVcpu {
    fn new(id: u32, cpu: Cpu) -> Self {
        EmuVcpu {
            id,
            cpu,
            budget: None,
            awaiting: Awaiting::Nothing,
            data: [0; 16],
            cpuid: [0; 4],
            msr_value: 0,
            msr_fault: false,
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
            Awaiting::Cpuid => self.cpu.complete_cpuid(self.cpuid),
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

impl Vcpu for EmuVcpu {
    fn id(&self) -> u32 {
        self.id
    }

    fn run(&mut self) -> Result<VmExit<'_>> {
        self.complete()?;
        let exit = self.cpu.run(self.budget.unwrap_or(u64::MAX));
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
                self.cpuid = [0; 4];
                VmExit::Cpuid {
                    function,
                    index,
                    result: &mut self.cpuid,
                }
            }
            Exit::RdMsr { index } => {
                self.awaiting = Awaiting::RdMsr;
                self.msr_value = 0;
                self.msr_fault = false;
                VmExit::RdMsr {
                    index,
                    value: &mut self.msr_value,
                    fault: &mut self.msr_fault,
                }
            }
            Exit::WrMsr { index, value } => {
                self.awaiting = Awaiting::WrMsr;
                self.msr_fault = false;
                VmExit::WrMsr {
                    index,
                    value,
                    fault: &mut self.msr_fault,
                }
            }
            Exit::BudgetExhausted => VmExit::BudgetExhausted,
            Exit::Interrupted => VmExit::Interrupted,
        })
    }

    fn get_regs(&self) -> Result<Regs> {
        Ok(self.cpu.regs())
    }
    fn set_regs(&mut self, regs: &Regs) -> Result<()> {
        self.cpu.set_regs(regs);
        Ok(())
    }
    fn get_sregs(&self) -> Result<SpecialRegs> {
        Ok(self.cpu.sregs())
    }
    fn set_sregs(&mut self, sregs: &SpecialRegs) -> Result<()> {
        self.cpu.set_sregs(sregs).map_err(cpu_err)
    }
    fn get_fpu(&self) -> Result<FpuState> {
        Ok(self.cpu.fpu())
    }
    fn set_fpu(&mut self, fpu: &FpuState) -> Result<()> {
        self.cpu.set_fpu(fpu);
        Ok(())
    }
    fn get_xcr0(&self) -> Result<u64> {
        Ok(self.cpu.xcr0())
    }
    fn set_xcr0(&mut self, xcr0: u64) -> Result<()> {
        self.cpu.set_xcr0(xcr0).map_err(cpu_err)
    }
    fn get_msrs(&self, indices: &[u32]) -> Result<Vec<u64>> {
        indices
            .iter()
            .map(|i| self.cpu.get_msr(*i).map_err(cpu_err))
            .collect()
    }
    fn set_msrs(&mut self, entries: &[(u32, u64)]) -> Result<()> {
        for (i, v) in entries {
            self.cpu.set_msr(*i, *v).map_err(cpu_err)?;
        }
        Ok(())
    }
    fn get_debug_regs(&self) -> Result<DebugRegs> {
        Ok(self.cpu.debug_regs())
    }
    fn set_debug_regs(&mut self, regs: &DebugRegs) -> Result<()> {
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
        // As KVM: an exception carries its error code only in protected mode.
        let protected = self.cpu.sregs().cr0 & cr0::PE != 0;
        self.cpu
            .inject_exception(vector, error_code.filter(|_| protected));
        Ok(())
    }
    fn queue_interrupt(&mut self, vector: u8) -> Result<()> {
        self.cpu.queue_interrupt(vector).map_err(cpu_err)
    }
    fn interrupt_window_open(&self) -> Result<bool> {
        Ok(self.cpu.interrupt_window_open())
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
