//! A VM assembled from a backend, guest memory, vCPUs and the legacy devices, and its run loop.
//!
//! The run loop is controllable from other threads through the machine's
//! [`VmControl`](crate::runctl::VmControl) (pause, resume, jobs on the loop's thread, death
//! after a migration); its state can be saved and restored ([`MachineState`] plus one
//! [`VcpuSnapshot`] per vCPU) for snapshots and live migration.

use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

use esvm_arch::VcpuSnapshot;
use esvm_devices::{Devices, DevicesError, DevicesState, DEVICES_STATE_VERSION};
use esvm_hv::emu::{EmuVm, SevHostVmState, SevVcpuTransfer};
use esvm_hv::{BackendKind, HvError, Vcpu, Vm, VmConfig, VmExit, VmType};
use esvm_loader::{BootState, LoadError, LoadOptions};
use thiserror::Error;

use crate::dirty::DirtyTracker;
use crate::runctl::{LoopEnd, VmControl};

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
    #[error("invalid machine state: {0}")]
    State(String),
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
    /// The VM was live-migrated to the destination at this URL, which committed: the guest
    /// runs there now and never runs here again.
    Migrated(String),
}

/// What a machine is made of.
#[derive(Debug, Clone)]
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
/// Both continue from the saved value after a restore or a migration.
enum Clock {
    Virtual { idle_ns: u64 },
    Host { start: Instant, offset_ns: u64 },
}

/// A 4 KiB RAM-like MMIO window for guests that test MMIO paths (e.g. `sev-mmio`): reads
/// return what was written. Outside it, MMIO reads return all-ones and writes are dropped.
pub const MMIO_SCRATCH_BASE: u64 = 0xFEB0_0000;
const MMIO_SCRATCH_LEN: usize = 4096;

/// Generation of [`MachineState`]'s own fields; bump it when they change.
const MACHINE_STATE_FIELDS_VERSION: u32 = 1;
/// Version of [`MachineState`]'s serialised form, derived: it goes up whenever its own fields
/// or the devices' state format ([`DEVICES_STATE_VERSION`]) do. Both generations start at 1,
/// so the first format is version 1 and every later change of either gives a new number.
pub const MACHINE_STATE_VERSION: u32 = MACHINE_STATE_FIELDS_VERSION + DEVICES_STATE_VERSION - 1;

/// Everything of a machine that is not guest memory or vCPU state: the devices, the clock
/// and the VMM-side MMIO window. Serialised (JSON) into snapshots and migration streams.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineState {
    pub version: u32,
    /// The backend the state was saved on (informational: plain state moves across).
    pub backend: BackendKind,
    pub devices: DevicesState,
    /// Instructions retired by each vCPU over the VM's whole life (emu; 0 on KVM).
    pub instructions: Vec<u64>,
    /// Virtual time skipped while the guest was halted (emu).
    pub idle_ns: u64,
    /// The machine's clock (ns since the VM started), for host-time backends.
    pub clock_ns: u64,
    /// The MMIO scratch window's bytes.
    pub mmio_scratch: Vec<u8>,
    /// The `--max-instructions` limit, which stays with the VM.
    pub max_instructions: Option<u64>,
    /// SEV-ES: the hypervisor's VM-wide GHCB state (absent for plain guests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sev: Option<SevHostVmState>,
}

pub struct Machine {
    vm: Arc<dyn Vm>,
    /// The same VM as `vm` when it runs on the emu backend (SEV-ES commands live there).
    emu: Option<Arc<EmuVm>>,
    config: MachineConfig,
    mmio_scratch: Box<[u8; MMIO_SCRATCH_LEN]>,
    vcpus: Vec<Box<dyn Vcpu>>,
    devices: Devices,
    clock: Clock,
    max_instructions: Option<u64>,
    /// Instructions each vCPU retired before this process took the VM over (restore or
    /// migration); the backend's counters start at 0.
    retired_base: Vec<u64>,
    control: Arc<VmControl>,
    tracker: Arc<DirtyTracker>,
    /// The last exit waits for the VMM's answer to complete its instruction (IN, MMIO read,
    /// CPUID, MSR): not a clean point for pausing or saving state.
    mid_exit: bool,
}

/// What other threads hold of a machine: guest memory and dirty log (through the VM), and
/// the run loop's control.
#[derive(Clone)]
pub struct MachineHandle {
    pub vm: Arc<dyn Vm>,
    /// The same VM when it runs on the emu backend (its SEV-ES commands live there).
    pub emu: Option<Arc<EmuVm>>,
    pub control: Arc<VmControl>,
    pub tracker: Arc<DirtyTracker>,
    pub config: MachineConfig,
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
                offset_ns: 0,
            },
        };
        if config.max_instructions.is_some() && config.backend != BackendKind::Emu {
            return Err(MachineError::Hv(HvError::Unsupported {
                backend: config.backend,
                what: "--max-instructions (KVM does not count instructions)".into(),
            }));
        }
        let control = Arc::new(VmControl::new(vcpus[0].kicker()));
        let tracker = Arc::new(DirtyTracker::new(vm.clone()));
        Ok(Machine {
            vm,
            emu,
            config: config.clone(),
            mmio_scratch: Box::new([0; MMIO_SCRATCH_LEN]),
            retired_base: vec![0; vcpus.len()],
            vcpus,
            devices: Devices::new(serial_out),
            clock,
            max_instructions: config.max_instructions,
            control,
            tracker,
            mid_exit: false,
        })
    }

    /// The emu VM behind this machine, if it runs on the emu backend.
    pub fn emu_vm(&self) -> Option<&Arc<EmuVm>> {
        self.emu.as_ref()
    }

    pub fn devices(&self) -> &Devices {
        &self.devices
    }

    /// The VM (guest memory, dirty log).
    pub fn vm(&self) -> &Arc<dyn Vm> {
        &self.vm
    }

    /// What the machine was created with.
    pub fn config(&self) -> &MachineConfig {
        &self.config
    }

    /// The run loop's control (pause, resume, jobs, death).
    pub fn control(&self) -> &Arc<VmControl> {
        &self.control
    }

    /// The dirty-log view used by migrations and snapshots.
    pub fn tracker(&self) -> &Arc<DirtyTracker> {
        &self.tracker
    }

    /// What other threads need to steer this machine and read its memory.
    pub fn handle(&self) -> MachineHandle {
        MachineHandle {
            vm: self.vm.clone(),
            emu: self.emu.clone(),
            control: self.control.clone(),
            tracker: self.tracker.clone(),
            config: self.config.clone(),
        }
    }

    /// Load an ELF64 guest and point the boot vCPU at it.
    pub fn load(&mut self, elf: &[u8], args: &str) -> Result<BootState, MachineError> {
        // SEV-ES guests get the protected-state boot flag and C-bit page tables (all memory
        // private until the guest shares pages itself).
        let sev_es = self.vm.vm_type() == VmType::SevEs;
        let boot = esvm_loader::load_elf_with_c_bit(
            self.vm.memory().mmap(),
            elf,
            &LoadOptions {
                args,
                vcpus: self.vcpus.len() as u32,
                flags: if sev_es {
                    esvm_loader::bootinfo::FLAG_PROTECTED_STATE
                } else {
                    0
                },
            },
            sev_es.then_some(esvm_hv::sev::C_BIT),
        )?;
        let bsp = &mut self.vcpus[0];
        bsp.set_sregs(&boot.sregs)?;
        bsp.set_regs(&boot.regs)?;
        Ok(boot)
    }

    /// The plaintext VMSAs LAUNCH_UPDATE_VMSA would take in now, in vCPU order.
    pub fn initial_vmsas(&self) -> Result<Vec<[u8; 4096]>, MachineError> {
        self.vcpus
            .iter()
            .map(|v| Ok(*v.sev_initial_vmsa()?))
            .collect()
    }

    /// SEV-ES LAUNCH_UPDATE_VMSA for every vCPU, in vCPU order.
    pub fn launch_update_vmsas(&mut self) -> Result<(), MachineError> {
        for vcpu in &mut self.vcpus {
            vcpu.sev_launch_update_vmsa()?;
        }
        Ok(())
    }

    fn now(&self) -> u64 {
        match &self.clock {
            Clock::Virtual { idle_ns } => {
                self.retired_base[0] + self.vcpus[0].instructions_retired().unwrap_or(0) + idle_ns
            }
            Clock::Host { start, offset_ns } => offset_ns + start.elapsed().as_nanos() as u64,
        }
    }

    /// Instructions retired by all vCPUs (emu) over the VM's life, if counted.
    pub fn instructions(&self) -> Option<u64> {
        self.vcpus
            .iter()
            .zip(&self.retired_base)
            .map(|(v, base)| v.instructions_retired().map(|n| n + base))
            .sum()
    }

    /// Run the boot vCPU until the guest exits, shuts down, the limit runs out or the VM
    /// migrates away. Other threads steer it through [`Machine::control`].
    pub fn run(&mut self) -> Result<Outcome, MachineError> {
        let control = self.control.clone();
        if let Some(url) = control.loop_started() {
            // Dead: it migrated away and must never run again.
            return Ok(Outcome::Migrated(url));
        }
        let result = self.run_loop(&control);
        let end = match &result {
            Ok(Outcome::Migrated(url)) => LoopEnd::Migrated(url.clone()),
            Ok(o) => LoopEnd::Finished {
                exit_status: crate::session::exit_status(o),
                failed: crate::session::is_failure(o),
                what: crate::session::describe(o),
            },
            Err(e) => LoopEnd::Finished {
                exit_status: crate::EXIT_ESVM_ERROR,
                failed: true,
                what: format!("the VMM failed: {e}"),
            },
        };
        control.publish_instructions(self.instructions().unwrap_or(0));
        control.loop_ended(end);
        result
    }

    fn run_loop(&mut self, control: &VmControl) -> Result<Outcome, MachineError> {
        let virtual_time = matches!(self.clock, Clock::Virtual { .. });
        loop {
            if !self.mid_exit {
                control.publish_instructions(self.instructions().unwrap_or(0));
                if control.attention() {
                    if let Some(outcome) = control.service(self) {
                        return Ok(outcome);
                    }
                }
            }
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
        let answer_needed = matches!(
            exit,
            VmExit::IoIn { .. }
                | VmExit::MmioRead { .. }
                | VmExit::Cpuid { .. }
                | VmExit::RdMsr { .. }
                | VmExit::WrMsr { .. }
        );
        match exit {
            VmExit::IoIn { port, data } => devices.io_read(port, data)?,
            VmExit::IoOut { port, data } => {
                devices.io_write(port, data)?;
                if let Some(code) = devices.take_exit_request() {
                    return Ok(Some(Outcome::Exited(code)));
                }
                if devices.take_reset_request() {
                    return Ok(Some(Outcome::Shutdown(
                        "it asked for a CPU reset through the i8042 keyboard controller \
                         (esvm does not reboot guests)"
                            .into(),
                    )));
                }
            }
            // MMIO goes to the devices first, then to the scratch window.
            VmExit::MmioRead { addr, data } => {
                if !devices.mmio_read(addr, data) {
                    match scratch_range(addr, data.len()) {
                        Some(r) => data.copy_from_slice(&scratch[r]),
                        None => {
                            tracing::debug!(addr, len = data.len(), "read of unbacked memory");
                            data.fill(0xff);
                        }
                    }
                }
            }
            VmExit::MmioWrite { addr, data } => {
                if !devices.mmio_write(addr, data) {
                    match scratch_range(addr, data.len()) {
                        Some(r) => scratch[r].copy_from_slice(data),
                        None => tracing::debug!(
                            addr,
                            len = data.len(),
                            "write to unbacked memory ignored"
                        ),
                    }
                }
            }
            VmExit::Shutdown { reason } => return Ok(Some(Outcome::Shutdown(reason))),
            VmExit::Terminated { reason } => return Ok(Some(Outcome::Terminated(reason))),
            VmExit::Cpuid { result, .. } => *result = [0; 4],
            VmExit::RdMsr { fault, .. } | VmExit::WrMsr { fault, .. } => *fault = true,
            VmExit::BudgetExhausted | VmExit::Interrupted => {}
            VmExit::Hlt => self.on_halt()?,
        }
        self.mid_exit = answer_needed || self.vcpus[0].exit_pending();
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

    // ---------------------------------------------------------------- state

    /// The machine's non-memory, non-vCPU state. Call it at a clean point (from a job or
    /// before/after the run loop).
    pub fn save_state(&self) -> MachineState {
        let (idle_ns, clock_ns) = match &self.clock {
            Clock::Virtual { idle_ns } => (*idle_ns, 0),
            Clock::Host { start, offset_ns } => (0, offset_ns + start.elapsed().as_nanos() as u64),
        };
        MachineState {
            version: MACHINE_STATE_VERSION,
            backend: self.config.backend,
            devices: self.devices.save(),
            instructions: self
                .vcpus
                .iter()
                .zip(&self.retired_base)
                .map(|(v, base)| base + v.instructions_retired().unwrap_or(0))
                .collect(),
            idle_ns,
            clock_ns,
            mmio_scratch: self.mmio_scratch.to_vec(),
            max_instructions: self.max_instructions,
            sev: self
                .emu
                .as_ref()
                .filter(|e| e.sev_handle().is_some())
                .and_then(|e| e.sev_host_state().ok()),
        }
    }

    fn vcpu_mut(&mut self, id: u32) -> Result<&mut Box<dyn Vcpu>, MachineError> {
        let n = self.vcpus.len();
        self.vcpus.get_mut(id as usize).ok_or_else(|| {
            MachineError::State(format!("vCPU {id} does not exist (the VM has {n})"))
        })
    }

    /// vCPU `id` at a clean point (between exits), for saving or sending its state.
    fn clean_vcpu(&self, id: u32) -> Result<&dyn Vcpu, MachineError> {
        if self.mid_exit {
            return Err(MachineError::State(
                "the vCPU is in the middle of an exit; its state can only be saved between exits"
                    .into(),
            ));
        }
        self.vcpus
            .get(id as usize)
            .map(|v| v.as_ref())
            .ok_or_else(|| {
                MachineError::State(format!(
                    "vCPU {id} does not exist (the VM has {})",
                    self.vcpus.len()
                ))
            })
    }

    /// SEV-ES: vCPU `id` as a VMSA transport packet (SEND_UPDATE_VMSA), at a clean point,
    /// during a send session.
    pub fn send_vcpu_sev(&self, id: u32) -> Result<SevVcpuTransfer, MachineError> {
        Ok(self.clean_vcpu(id)?.sev_send_state()?)
    }

    /// SEV-ES: make vCPU `id` of a receiving machine the incoming one (RECEIVE_UPDATE_VMSA).
    pub fn receive_vcpu_sev(&mut self, id: u32, t: &SevVcpuTransfer) -> Result<(), MachineError> {
        self.vcpu_mut(id)?.sev_receive_state(t)?;
        self.mid_exit = false;
        Ok(())
    }

    /// The state of vCPU `id`, at a clean point.
    pub fn save_vcpu(&self, id: u32) -> Result<VcpuSnapshot, MachineError> {
        Ok(self.clean_vcpu(id)?.snapshot()?)
    }

    /// Put vCPU `id` in a saved state (a fresh machine, before it runs).
    pub fn restore_vcpu(&mut self, id: u32, s: &VcpuSnapshot) -> Result<(), MachineError> {
        self.vcpu_mut(id)?.restore(s)?;
        self.mid_exit = false;
        Ok(())
    }

    /// Put the devices, clock and MMIO window in a saved state (a fresh machine, before it
    /// runs). On error nothing is changed.
    pub fn restore_state(&mut self, s: &MachineState) -> Result<(), MachineError> {
        if s.version != MACHINE_STATE_VERSION {
            return Err(MachineError::State(format!(
                "machine state version {} is not supported (this esvm reads version \
                 {MACHINE_STATE_VERSION})",
                s.version
            )));
        }
        if s.instructions.len() != self.vcpus.len() {
            return Err(MachineError::State(format!(
                "the state is of a VM with {} vCPUs, this machine has {}",
                s.instructions.len(),
                self.vcpus.len()
            )));
        }
        if s.mmio_scratch.len() != MMIO_SCRATCH_LEN {
            return Err(MachineError::State(format!(
                "the MMIO window is {} bytes, expected {MMIO_SCRATCH_LEN}",
                s.mmio_scratch.len()
            )));
        }
        if s.max_instructions.is_some() && self.config.backend != BackendKind::Emu {
            return Err(MachineError::Hv(HvError::Unsupported {
                backend: self.config.backend,
                what: "an instruction limit (KVM does not count instructions)".into(),
            }));
        }
        match (&s.sev, self.config.vm_type) {
            (Some(sev), VmType::SevEs) => {
                let emu = self.emu.as_ref().ok_or_else(|| {
                    MachineError::State("SEV-ES state for a machine without the emu backend".into())
                })?;
                emu.sev_set_host_state(sev)?;
            }
            (None, VmType::Plain) => {}
            (Some(_), VmType::Plain) => {
                return Err(MachineError::State(
                    "the state is of an SEV-ES VM, this machine is plain".into(),
                ))
            }
            (None, VmType::SevEs) => {
                return Err(MachineError::State(
                    "the state is of a plain VM, this machine is SEV-ES".into(),
                ))
            }
        }
        self.devices.restore(&s.devices)?;
        // The backend's counters restart at 0: the bases carry the VM's history so that
        // virtual time (and the instruction limit) continue where the source left off.
        self.retired_base = self
            .vcpus
            .iter()
            .zip(&s.instructions)
            .map(|(v, n)| n.saturating_sub(v.instructions_retired().unwrap_or(0)))
            .collect();
        self.clock = match self.config.backend {
            BackendKind::Emu => {
                // From a host-time backend (KVM) the instruction counts are 0: start virtual
                // time at the devices' time so that timers go on from where they were.
                let base = self.retired_base[0] + self.vcpus[0].instructions_retired().unwrap_or(0);
                Clock::Virtual {
                    idle_ns: s.idle_ns.max(s.devices.now_ns.saturating_sub(base)),
                }
            }
            BackendKind::Kvm => Clock::Host {
                start: Instant::now(),
                offset_ns: s.clock_ns.max(s.devices.now_ns),
            },
        };
        self.mmio_scratch.copy_from_slice(&s.mmio_scratch);
        self.max_instructions = s.max_instructions;
        self.config.max_instructions = s.max_instructions;
        self.control
            .publish_instructions(self.instructions().unwrap_or(0));
        Ok(())
    }
}
