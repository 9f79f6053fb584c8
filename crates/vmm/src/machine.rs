//! A VM assembled from a backend, guest memory, vCPUs and the legacy devices, and its run loop.

use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

use esvm_devices::{Devices, DevicesError};
use esvm_hv::emu::EmuVm;
use esvm_hv::{BackendKind, HvError, Vcpu, Vm, VmConfig, VmExit, VmType};
use esvm_loader::{BootState, LoadError, LoadOptions};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum MachineError {
    #[error(transparent)]
    Hv(#[from] HvError),
    #[error("cannot load the guest: {0}")]
    Load(#[from] LoadError),
    #[error("device error: {0}")]
    Devices(#[from] DevicesError),
    #[error(
        "the guest halted with interrupts disabled and no interrupt can arrive (vCPU {vcpu} at \
         rip {rip:#x}); it can never make progress. A guest must end by writing its exit status \
         to port 0xf4"
    )]
    HaltedForever { vcpu: u32, rip: u64 },
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The guest wrote its exit status to the debug-exit port.
    Exited(u8),
    /// The guest shut down (triple fault or equivalent).
    Shutdown(String),
    /// The instruction limit ran out first.
    InstructionLimit(u64),
    /// An SEV-ES guest asked to be terminated through the GHCB, or broke its protocol.
    Terminated(String),
}

/// What a machine is made of.
pub struct MachineConfig {
    pub backend: BackendKind,
    /// Plain or SEV-ES (SEV-ES needs the emu backend).
    pub vm_type: VmType,
    pub mem_size: u64,
    pub vcpus: u32,
    /// Stop after this many retired instructions (emu backend only).
    pub max_instructions: Option<u64>,
}

/// The byte range of the MMIO scratch window an access covers, if it lies inside it.
fn scratch_range(addr: u64, len: usize) -> Option<std::ops::Range<usize>> {
    let off = addr.checked_sub(MMIO_SCRATCH_BASE)? as usize;
    (off.checked_add(len)? <= MMIO_SCRATCH_LEN).then(|| off..off + len)
}

/// Virtual time. On the emu backend it is the retired-instruction count (1 instruction =
/// 1 ns) plus the time skipped while halted, so runs are deterministic; on KVM it is host time.
enum Clock {
    Virtual { idle_ns: u64 },
    Host { start: Instant },
}

/// A 4 KiB RAM-like MMIO window for guests that test MMIO paths (e.g. `sev-mmio`): reads
/// return what was written. Outside it, MMIO reads return all-ones and writes are dropped.
pub const MMIO_SCRATCH_BASE: u64 = 0xFEB0_0000;
const MMIO_SCRATCH_LEN: usize = 4096;

pub struct Machine {
    vm: Arc<dyn Vm>,
    /// The same VM as `vm` when it runs on the emu backend (SEV-ES commands live there).
    #[allow(dead_code)]
    emu: Option<Arc<EmuVm>>,
    mmio_scratch: Box<[u8; MMIO_SCRATCH_LEN]>,
    vcpus: Vec<Box<dyn Vcpu>>,
    devices: Devices,
    clock: Clock,
    max_instructions: Option<u64>,
}

/// Slice of virtual time a vCPU runs at most before the loop looks at devices again, when no
/// device deadline is nearer (keeps limits and kicks responsive).
const MAX_SLICE_NS: u64 = 10_000_000;
/// Slice while an interrupt waits for the guest to open its interrupt window.
const WINDOW_POLL_NS: u64 = 64;

impl Machine {
    pub fn new(
        config: &MachineConfig,
        serial_out: Box<dyn Write + Send>,
    ) -> Result<Self, MachineError> {
        let mut vm_config = VmConfig::plain(config.mem_size, config.vcpus);
        vm_config.vm_type = config.vm_type;
        // The emu VM is kept concretely as well: its SEV-ES commands are emu-only.
        let (vm, emu): (Arc<dyn Vm>, Option<Arc<EmuVm>>) = match config.backend {
            BackendKind::Emu => {
                let emu = Arc::new(EmuVm::new(&vm_config)?);
                (emu.clone(), Some(emu))
            }
            BackendKind::Kvm => (esvm_hv::open(config.backend)?.create_vm(&vm_config)?, None),
        };
        let mut vcpus = Vec::new();
        for id in 0..config.vcpus {
            vcpus.push(vm.create_vcpu(id)?);
        }
        let clock = match config.backend {
            BackendKind::Emu => Clock::Virtual { idle_ns: 0 },
            BackendKind::Kvm => Clock::Host {
                start: Instant::now(),
            },
        };
        if config.max_instructions.is_some() && config.backend != BackendKind::Emu {
            return Err(MachineError::Hv(HvError::Unsupported {
                backend: config.backend,
                what: "--max-instructions (KVM does not count instructions)".into(),
            }));
        }
        Ok(Machine {
            vm,
            emu,
            mmio_scratch: Box::new([0; MMIO_SCRATCH_LEN]),
            vcpus,
            devices: Devices::new(serial_out),
            clock,
            max_instructions: config.max_instructions,
        })
    }

    /// The emu VM behind this machine, if it runs on the emu backend.
    #[allow(dead_code)] // the SEV-ES launch flow uses it (being wired in)
    pub fn emu_vm(&self) -> Option<&Arc<EmuVm>> {
        self.emu.as_ref()
    }

    pub fn devices(&self) -> &Devices {
        &self.devices
    }

    /// Load an ELF64 guest and point the boot vCPU at it.
    pub fn load(&mut self, elf: &[u8], args: &str) -> Result<BootState, MachineError> {
        let boot = esvm_loader::load_elf_with(
            self.vm.memory().mmap(),
            elf,
            &LoadOptions {
                args,
                vcpus: self.vcpus.len() as u32,
                flags: 0,
            },
        )?;
        let bsp = &mut self.vcpus[0];
        bsp.set_sregs(&boot.sregs)?;
        bsp.set_regs(&boot.regs)?;
        Ok(boot)
    }

    fn now(&self) -> u64 {
        match &self.clock {
            Clock::Virtual { idle_ns } => {
                self.vcpus[0].instructions_retired().unwrap_or(0) + idle_ns
            }
            Clock::Host { start } => start.elapsed().as_nanos() as u64,
        }
    }

    /// Instructions retired by all vCPUs (emu), if counted.
    pub fn instructions(&self) -> Option<u64> {
        self.vcpus.iter().map(|v| v.instructions_retired()).sum()
    }

    /// Run the boot vCPU until the guest exits, shuts down or the limit runs out.
    pub fn run(&mut self) -> Result<Outcome, MachineError> {
        let virtual_time = matches!(self.clock, Clock::Virtual { .. });
        loop {
            let now = self.now();
            self.devices.advance_to(now);
            if virtual_time {
                self.offer_interrupt()?;
            }
            let mut slice = MAX_SLICE_NS;
            if let Some(deadline) = self.devices.next_deadline_ns() {
                slice = slice.min(deadline.saturating_sub(now).max(1));
            }
            if virtual_time && self.devices.pending_interrupt().is_some() {
                slice = slice.min(WINDOW_POLL_NS);
            }
            if let Some(limit) = self.max_instructions {
                let done = self.instructions().unwrap_or(0);
                if done >= limit {
                    return Ok(Outcome::InstructionLimit(done));
                }
                slice = slice.min(limit - done);
            }
            if virtual_time {
                self.vcpus[0].set_instruction_budget(Some(slice))?;
            }
            if let Some(outcome) = self.run_once()? {
                return Ok(outcome);
            }
        }
    }

    /// Hand the PIC's pending interrupt to the boot vCPU if it has none queued.
    fn offer_interrupt(&mut self) -> Result<(), MachineError> {
        if self.devices.pending_interrupt().is_none() {
            return Ok(());
        }
        let bsp = &mut self.vcpus[0];
        if bsp.get_events()?.interrupt.is_some() || !bsp.interrupt_window_open()? {
            return Ok(());
        }
        let vector = self.devices.acknowledge_interrupt();
        bsp.queue_interrupt(vector)?;
        Ok(())
    }

    fn run_once(&mut self) -> Result<Option<Outcome>, MachineError> {
        let devices = &mut self.devices;
        let scratch = &mut self.mmio_scratch;
        let exit = self.vcpus[0].run()?;
        match exit {
            VmExit::IoIn { port, data } => devices.io_read(port, data)?,
            VmExit::IoOut { port, data } => {
                devices.io_write(port, data)?;
                if let Some(code) = devices.take_exit_request() {
                    return Ok(Some(Outcome::Exited(code)));
                }
            }
            VmExit::MmioRead { addr, data } => match scratch_range(addr, data.len()) {
                Some(r) => data.copy_from_slice(&scratch[r]),
                None => {
                    tracing::debug!(addr, len = data.len(), "read of unbacked memory");
                    data.fill(0xff);
                }
            },
            VmExit::MmioWrite { addr, data } => match scratch_range(addr, data.len()) {
                Some(r) => scratch[r].copy_from_slice(data),
                None => tracing::debug!(addr, len = data.len(), "write to unbacked memory ignored"),
            },
            VmExit::Shutdown { reason } => return Ok(Some(Outcome::Shutdown(reason))),
            VmExit::Terminated { reason } => return Ok(Some(Outcome::Terminated(reason))),
            VmExit::Cpuid { result, .. } => *result = [0; 4],
            VmExit::RdMsr { fault, .. } | VmExit::WrMsr { fault, .. } => *fault = true,
            VmExit::BudgetExhausted | VmExit::Interrupted => {}
            VmExit::Hlt => self.on_halt()?,
        }
        Ok(None)
    }

    /// HLT: skip virtual time to the next device deadline, or fail if none can wake the guest.
    fn on_halt(&mut self) -> Result<(), MachineError> {
        let bsp = &self.vcpus[0];
        let rflags = bsp.get_regs()?.rflags;
        let interrupts_on = rflags & esvm_arch::bits::rflags::IF != 0;
        let now = self.now();
        match (&mut self.clock, self.devices.next_deadline_ns()) {
            (Clock::Virtual { idle_ns }, Some(deadline)) if interrupts_on => {
                let skip = deadline.saturating_sub(now);
                *idle_ns += skip;
                let tsc = bsp.get_tsc()?;
                self.vcpus[0].set_tsc(tsc + skip)?;
                Ok(())
            }
            (Clock::Host { .. }, _) if interrupts_on => {
                // KVM handles HLT in the kernel with its irqchip; a HLT exit here means no
                // in-kernel device will wake it, but the serial line might; wait briefly.
                std::thread::sleep(std::time::Duration::from_millis(1));
                Ok(())
            }
            _ => Err(MachineError::HaltedForever {
                vcpu: 0,
                rip: bsp.get_regs()?.rip,
            }),
        }
    }
}
