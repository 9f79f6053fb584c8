//! A VM assembled from a backend, guest memory, vCPUs and the legacy devices, and its run loop.
//!
//! The run loop is controllable from other threads through the machine's
//! [`VmControl`] (pause, resume, jobs on the loop's thread, death
//! after a migration); its state can be saved and restored ([`MachineState`] plus one
//! [`VcpuSnapshot`] per vCPU) for snapshots and live migration.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use esvm_arch::{layout, VcpuSnapshot};
use esvm_devices::intc::ApSignal;
use esvm_devices::{Devices, DevicesError, DevicesState, DEVICES_STATE_VERSION};
use esvm_hv::ghcb::VmgexitCounts;
use esvm_hv::sev::{Launcher, SevHostVmState, SevVcpu, SevVcpuTransfer, SevVm, Started};
use esvm_hv::{BackendKind, HvError, Vcpu, Vm, VmConfig, VmExit, VmType};
use esvm_loader::linux::{LinuxBoot, LinuxImage, LinuxLoadError};
use esvm_loader::{BootState, LoadError, LoadOptions};
use thiserror::Error;

use crate::console::ConsoleInput;
use crate::dirty::DirtyTracker;
use crate::lifecycle::{Ending, LifecycleError, LoopEnd};
use crate::outcome::{Outcome, EXIT_ESVM_ERROR};
use crate::ram::RamError;
use crate::runctl::RunControl;

mod parallel;
pub use parallel::PARALLEL_SLICE;

/// The control of a machine's run loop: its jobs run on the [`Machine`].
pub type VmControl = RunControl<Machine>;
/// A hold on a machine whose run loop is parked: no vCPU runs while it lives.
pub type StoppedGuard = crate::runctl::StoppedGuard<Machine>;
/// A live migration of a machine, registered in its lifecycle.
pub type MigrationTicket = crate::runctl::MigrationTicket<Machine>;
/// A snapshot of a machine, registered in its lifecycle.
pub type SnapshotTicket = crate::runctl::SnapshotTicket<Machine>;

/// Why a machine could not be built, loaded, run, saved or restored.
#[allow(missing_docs)] // Each variant is documented by its #[error] message.
#[derive(Debug, Error)]
pub enum MachineError {
    #[error(transparent)]
    Hv(#[from] HvError),
    #[error("cannot load the guest: {0}")]
    Load(#[from] LoadError),
    #[error("cannot boot the kernel: {0}")]
    LoadLinux(#[from] LinuxLoadError),
    #[error("device error: {0}")]
    Devices(#[from] DevicesError),
    #[error(
        "the guest halted waiting for an interrupt, but no device has a timer armed and no \
         console input can come (vCPU {vcpu}{}); it can never make progress",
        rip.map(|r| format!(" at rip {r:#x}")).unwrap_or_default()
    )]
    HaltedForever { vcpu: u32, rip: Option<u64> },
    #[error("invalid machine state: {0}")]
    State(String),
    #[error(transparent)]
    Lifecycle(#[from] LifecycleError),
    #[error(transparent)]
    Ram(#[from] RamError),
}

/// What a machine is made of.
#[derive(Debug, Clone)]
pub struct MachineConfig {
    /// The hypervisor backend (emu or KVM).
    pub backend: BackendKind,
    /// Plain or SEV-ES (SEV-ES needs the emu backend).
    pub vm_type: VmType,
    /// Guest RAM in bytes (a multiple of 4 KiB).
    pub mem_size: u64,
    /// vCPUs. The boot vCPU (0) runs the guest; the others (APs) wait for INIT-SIPI-SIPI
    /// (plain guests on the emu backend), park in the AP start stub until a SIPI releases
    /// them (SEV-ES, `esvm_loader::ap_stub`) or stay parked (KVM).
    pub vcpus: u32,
    /// Stop after this many retired instructions (emu backend only).
    pub max_instructions: Option<u64>,
}

/// The byte range of the MMIO scratch window an access covers, if it lies inside it.
fn scratch_range(addr: u64, len: usize) -> Option<std::ops::Range<usize>> {
    let off = addr.checked_sub(MMIO_SCRATCH_BASE)? as usize;
    (off.checked_add(len)? <= MMIO_SCRATCH_LEN).then(|| off..off + len)
}

/// Virtual time. On the emu backend it is the instructions retired by all vCPUs together
/// (1 instruction = 1 ns) plus the time skipped while every vCPU was halted. When the vCPUs
/// take turns on one thread each turn's instructions move the one clock, so runs are
/// deterministic and every vCPU's TSC follows it exactly (see [`Machine::tsc_offsets`]); in
/// parallel the clock is the sum of the counts each vCPU thread publishes (see the
/// `parallel` module for how the TSCs follow it). On KVM it is host time. Both continue from the saved value after a restore or a migration.
enum Clock {
    Virtual { idle_ns: u64 },
    Host { start: Instant, offset_ns: u64 },
}

/// A 4 KiB RAM-like MMIO window for guests that test MMIO paths (e.g. `sev-mmio`): reads
/// return what was written. Outside it, MMIO reads return all-ones and writes are dropped.
/// Its place in the memory map: `esvm_arch::layout::MMIO_SCRATCH_ADDR`.
pub const MMIO_SCRATCH_BASE: u64 = layout::MMIO_SCRATCH_ADDR;
const MMIO_SCRATCH_LEN: usize = layout::MMIO_SCRATCH_SIZE as usize;

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
    /// [`MACHINE_STATE_VERSION`] of the format.
    pub version: u32,
    /// The backend the state was saved on (informational: plain state moves across).
    pub backend: BackendKind,
    /// The legacy devices (UART, PIT, PICs, debug-exit port) and their virtual time.
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
    /// Live migration only: the user had paused the VM at the source (`esvm ctl pause`), so
    /// the destination keeps it paused until `esvm ctl resume`. Written only when set:
    /// snapshots and unpaused VMs serialise as before, and a stream without it (an older
    /// source) reads as not paused.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub user_paused: bool,
    /// Where each vCPU stands (running, halted, waiting for SIPI) and whose turn it is:
    /// written for machines of more than one vCPU (and a halted single one). A state
    /// without it (an older esvm's) restores as a fresh machine stands: vCPU 0 running,
    /// the APs waiting for SIPI.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduler: Option<SchedulerState>,
}

/// Where a vCPU stands, as on hardware.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VcpuRunState {
    /// Runs (takes its turns).
    Running,
    /// Stopped in HLT until an interrupt (or an NMI, or INIT) wakes it.
    Halted,
    /// After reset or INIT: waits for a start-up IPI, runs nothing.
    WaitForSipi,
    /// SEV-ES: parked itself in the GHCB AP reset hold (the AP start stub); no interrupt
    /// wakes it, a SIPI releases it (`SevVcpu::deliver_sipi`) and it runs on in its own code.
    ApResetHold,
}

impl VcpuRunState {
    /// The state's name as snapshots and the control API spell it.
    pub fn name(self) -> &'static str {
        match self {
            VcpuRunState::Running => "running",
            VcpuRunState::Halted => "halted",
            VcpuRunState::WaitForSipi => "wait-for-sipi",
            VcpuRunState::ApResetHold => "ap-reset-hold",
        }
    }
}

/// The one-thread scheduler's state: every vCPU's run state and the turn in progress.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulerState {
    /// Per vCPU.
    pub vcpus: Vec<VcpuRunState>,
    /// The vCPU whose turn it is.
    pub current: u32,
    /// Instructions left in its turn.
    pub slot_left: u64,
    /// The VM runs its vCPUs in turns on one thread (`--deterministic`) rather than in
    /// parallel: it stays so after a restore or a migration. Written only when set.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deterministic: bool,
}

/// Instructions a vCPU runs per turn when several take turns on the machine's thread
/// (round robin). A turn ends early when the vCPU halts or sends an IPI to another vCPU, so
/// the target answers soon; all of it is decided by retired instructions, so a run replays
/// exactly.
pub const QUANTUM: u64 = 20_000;

/// A VM assembled from a backend, guest memory, vCPUs and the legacy devices; see the
/// module documentation. Its run loop ([`Machine::run`]) owns it; other threads hold a
/// [`MachineHandle`].
pub struct Machine {
    vm: Arc<dyn Vm>,
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
    /// Where COM1's input comes from (esvm's stdin), if anywhere.
    console: Option<ConsoleInput>,
    /// References to the VM when nobody but the machine holds it (its own, the dirty
    /// tracker's, the backend's): more means a handle or a clone exists.
    own_vm_refs: usize,
    /// The VMM models the local APIC and I/O APIC (the software vCPU; KVM has its own
    /// in-kernel irqchip) and places ACPI tables for Linux.
    apic: bool,
    /// The APs start (plain: INIT-SIPI-SIPI; SEV-ES: released from the AP stub by a SIPI)
    /// and run beside the boot vCPU (the emu backend); otherwise they stay parked.
    smp: bool,
    /// Per vCPU: where it stands.
    run_state: Vec<VcpuRunState>,
    /// The vCPU whose turn it is, and the instructions left in the turn.
    current: usize,
    slot_left: u64,
    /// The last exit was `BudgetExhausted` (with fewer instructions than the budget: PAUSEs
    /// gave it up, [`VmConfig::pause_ends_budget`]).
    budget_ended: bool,
    /// Per vCPU (virtual time only, while the run loop runs): its TSC minus virtual time.
    /// A vCPU's TSC is brought to `now + offset` when its turn starts, so every vCPU's TSC
    /// follows the one clock (the guest's own TSC writes are kept as the offset). None
    /// outside the run loop: the vCPUs' TSCs are then up to date.
    tsc_offsets: Option<Vec<i64>>,
    /// IPIs sent between vCPUs so far (the devices' count), to end a turn after one.
    ipis_seen: u64,
    /// Several vCPUs take turns on the machine's thread ([`Machine::set_deterministic`])
    /// instead of running on a host thread each.
    deterministic: bool,
}

/// What other threads hold of a machine: guest memory and dirty log (through the VM), and
/// the run loop's control.
#[derive(Clone)]
pub struct MachineHandle {
    /// The VM: guest memory (read it; writing it in place needs a guard, see
    /// [`MachineHandle::stopped_ram`] and [`Machine::exclusive_ram`]) and the dirty log.
    pub vm: Arc<dyn Vm>,
    /// The run loop's control and the VM's lifecycle.
    pub control: Arc<VmControl>,
    /// The dirty-log view used by migrations and snapshots.
    pub tracker: Arc<DirtyTracker>,
    /// What the machine was created with.
    pub config: MachineConfig,
    /// How its vCPUs run, where that matters ([`Machine::vcpu_scheduling`]).
    pub vcpu_scheduling: Option<esvm_control::VcpuScheduling>,
}

/// `vm`'s SEV-ES extension, or an error if its backend has none.
fn sev_of(vm: &dyn Vm) -> Result<&dyn SevVm, MachineError> {
    vm.sev().ok_or_else(|| {
        MachineError::Hv(HvError::NoSevSupport {
            backend: vm.backend(),
        })
    })
}

/// `vcpu`'s SEV-ES extension, or an error if its backend (`backend`) has none.
fn vcpu_sev(vcpu: &dyn Vcpu, backend: BackendKind) -> Result<&dyn SevVcpu, MachineError> {
    vcpu.sev()
        .ok_or(MachineError::Hv(HvError::NoSevSupport { backend }))
}

/// Where the vCPUs of a fresh machine stand: the boot vCPU runs; the APs wait for SIPI, or
/// with `sev_aps` (SEV-ES, several vCPUs) run too: they park themselves in the AP stub.
fn initial_run_states(vcpus: usize, sev_aps: bool) -> Vec<VcpuRunState> {
    let ap = if sev_aps {
        VcpuRunState::Running
    } else {
        VcpuRunState::WaitForSipi
    };
    let mut states = vec![ap; vcpus];
    states[0] = VcpuRunState::Running;
    states
}

/// Slice of virtual time a vCPU runs at most before the loop looks at devices again, when no
/// device deadline is nearer (keeps limits and kicks responsive).
const MAX_SLICE_NS: u64 = 10_000_000;
/// Longest real-time wait for console input while the guest idles in HLT (then virtual
/// time moves on to the next timer, or the wait repeats when there is none).
const CONSOLE_IDLE_WAIT_NS: u64 = 20_000_000;
/// Slice while an interrupt waits for the guest to open its interrupt window.
const WINDOW_POLL_NS: u64 = 64;

impl MachineHandle {
    /// The VM's SEV-ES extension (send, receive), or an error if its backend has none.
    pub fn sev(&self) -> Result<&dyn SevVm, MachineError> {
        sev_of(self.vm.as_ref())
    }

    /// Guest pages `first_page..first_page + count` in place, read-only, for as long as
    /// `stopped` keeps this machine's vCPUs stopped (e.g. stop-and-copy, a snapshot).
    pub fn stopped_ram<'a>(
        &'a self,
        stopped: &'a StoppedGuard,
        first_page: u64,
        count: u64,
    ) -> Result<&'a [u8], RamError> {
        if !stopped.stops(&self.control) {
            return Err(RamError::OtherVm);
        }
        // SAFETY: while `stopped` is borrowed its hold keeps this machine's run loop parked
        // (or not started): the run loop leaves `RunControl::service` only when every hold
        // is released, or returns for good when the VM migrated away, so no vCPU runs and
        // the devices (which do no DMA) write nothing. The other writers of guest memory are
        // excluded too: the loader and SEV launch refuse a shared machine
        // (`ensure_exclusive`, which a live guard fails), `ExclusiveRam` (in-place writes,
        // discarding) needs an unshared machine, and the library writes guest memory through
        // a handle nowhere (snapshots and migrations only read it). The slice borrows
        // `self`, whose VM keeps the mapping alive.
        unsafe { crate::ram::pages(self.vm.memory(), first_page, count) }
    }
}

/// Guest RAM of a machine nobody else holds ([`Machine::exclusive_ram`]): no vCPU runs (the
/// run loop needs `&mut Machine`, which this borrows) and no other thread can reach the
/// memory, so it may be written in place or discarded.
pub struct ExclusiveRam<'m> {
    mem: &'m esvm_hv::GuestMemory,
}

impl<'m> ExclusiveRam<'m> {
    /// Guest pages `first_page..first_page + count` in place, writable. The writes bypass the
    /// dirty log: record them with [`DirtyTracker::mark_written`].
    pub fn pages_mut(self, first_page: u64, count: u64) -> Result<&'m mut [u8], RamError> {
        // SAFETY: the machine is borrowed mutably for 'm, so its run loop cannot run and no
        // other slice of it exists on this thread (this consumes the only `ExclusiveRam`),
        // and `exclusive_ram` checked that no handle, guard or VM clone lets another thread
        // reach the memory.
        unsafe { crate::ram::pages_mut(self.mem, first_page, count) }
    }

    /// Give the memory back to the system; it reads as zero afterwards.
    pub fn discard(self) {
        // SAFETY: as for `pages_mut`: nothing else holds or uses the memory, and no slice of
        // it is alive (this consumes the only `ExclusiveRam`).
        unsafe { crate::ram::discard(self.mem) }
    }

    /// Fault in all of the memory (`MADV_POPULATE_WRITE`) without changing it.
    pub fn prealloc(&self) {
        crate::ram::prealloc(self.mem);
    }
}

impl Machine {
    /// A machine of `config` with all of its vCPUs, its devices and zeroed RAM, its serial
    /// port (COM1) writing to `serial_out`. Nothing is loaded; the run loop has not started.
    pub fn new(
        config: &MachineConfig,
        serial_out: Box<dyn Write + Send>,
    ) -> Result<Self, MachineError> {
        let mut vm_config = VmConfig::plain(config.mem_size, config.vcpus);
        vm_config.vm_type = config.vm_type;
        let apic = config.backend == BackendKind::Emu;
        let smp = apic && config.vcpus > 1;
        if apic {
            // The software vCPU's local APIC is the VMM's (`esvm_devices::lapic`). A plain
            // vCPU reaches the x2APIC and TSC-deadline MSRs through MSR exits; a protected
            // one's RDMSR/WRMSR of them come through the hypervisor's GHCB handler, which
            // forwards them to the VMM as the same exits (`esvm_hv::sev::msr_forwarded_to_vmm`).
            let plain = config.vm_type == VmType::Plain;
            vm_config.cpuid = vm_config.cpuid.clone().with_local_apic(true, true);
            if plain {
                // IA32_APIC_BASE too: the devices follow its enable and x2APIC bits as the
                // guest writes them, without asking the vCPU on every exit.
                vm_config
                    .msr_intercepts
                    .push(esvm_arch::msr::IA32_APIC_BASE);
                vm_config
                    .msr_intercepts
                    .push(esvm_devices::lapic::TSC_DEADLINE_MSR);
                vm_config.msr_intercepts.extend(
                    esvm_devices::lapic::X2APIC_MSR_BASE..=esvm_devices::lapic::X2APIC_MSR_END,
                );
            }
            if smp {
                // One package of N cores, APIC ID = vCPU index; the TSCs run on one clock.
                vm_config.cpuid = vm_config.cpuid.clone().with_topology(config.vcpus);
                // A spin-waiting vCPU (PAUSE) gives its turn to the others at once.
                vm_config.pause_ends_budget = true;
                // vCPUs in parallel (unless --deterministic): no TSC read goes back from
                // one vCPU to another, first decodes see every vCPU's code stores.
                vm_config.parallel_vcpus = true;
            }
        }
        let vm = esvm_hv::open(config.backend)?.create_vm(&vm_config)?;
        let mut vcpus = Vec::new();
        for id in 0..config.vcpus {
            vcpus.push(vm.create_vcpu(id)?);
        }
        let run_state = initial_run_states(vcpus.len(), smp && config.vm_type == VmType::SevEs);
        if smp {
            for ap in vcpus.iter_mut().skip(1) {
                let s = if config.vm_type == VmType::SevEs {
                    // Real mode at the first byte of the AP start stub, where it parks in the
                    // AP reset hold; this is its initial (measured) VMSA.
                    esvm_loader::ap_stub::ap_initial_state()
                } else {
                    // An AP's power-on state: real mode at the reset vector, its APIC enabled
                    // without the BSP flag; it waits for INIT-SIPI-SIPI.
                    let mut s = VcpuSnapshot::reset();
                    s.sregs.apic_base = layout::LAPIC_ADDR | (1 << 11);
                    s
                };
                ap.restore(&s)?;
            }
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
        let control = Arc::new(VmControl::new(Arc::new(AllKicker(
            vcpus.iter().map(|v| v.kicker()).collect(),
        ))));
        let tracker = Arc::new(DirtyTracker::new(vm.clone()));
        let own_vm_refs = Arc::strong_count(&vm);
        let mut devices = Devices::new(serial_out);
        if smp {
            devices.set_vcpus(vcpus.len());
        }
        Ok(Machine {
            vm,
            config: config.clone(),
            mmio_scratch: Box::new([0; MMIO_SCRATCH_LEN]),
            retired_base: vec![0; vcpus.len()],
            vcpus,
            devices,
            clock,
            max_instructions: config.max_instructions,
            control,
            tracker,
            mid_exit: false,
            console: None,
            own_vm_refs,
            apic,
            smp,
            run_state,
            current: 0,
            slot_left: 0,
            budget_ended: false,
            tsc_offsets: None,
            ipis_seen: 0,
            deterministic: false,
        })
    }

    /// `Ok` if nobody but this machine (borrowed mutably by the caller) can reach its guest
    /// memory: no [`MachineHandle`], no guard or ticket of its control, no clone of its VM.
    pub fn ensure_exclusive(&self) -> Result<(), RamError> {
        let controls = Arc::strong_count(&self.control) - 1;
        let vms = Arc::strong_count(&self.vm).saturating_sub(self.own_vm_refs);
        if controls == 0 && vms == 0 {
            return Ok(());
        }
        Err(RamError::Shared {
            what: format!(
                "{controls} handles or guards of its control, {vms} other references to its VM"
            ),
        })
    }

    /// Guest RAM to write or discard in place, for a machine nobody else holds (checked:
    /// see [`ExclusiveRam`]). For filling a machine that has not run (an incoming
    /// migration) and for giving back the memory of one that is done.
    pub fn exclusive_ram(&mut self) -> Result<ExclusiveRam<'_>, RamError> {
        self.ensure_exclusive()?;
        Ok(ExclusiveRam {
            mem: self.vm.memory(),
        })
    }

    /// The VM's SEV-ES extension (launch, send, receive), or an error if its backend has
    /// none.
    pub fn sev(&self) -> Result<&dyn SevVm, MachineError> {
        sev_of(self.vm.as_ref())
    }

    /// The legacy devices.
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
            control: self.control.clone(),
            tracker: self.tracker.clone(),
            config: self.config.clone(),
            vcpu_scheduling: self.vcpu_scheduling(),
        }
    }

    /// Load an ELF64 guest and point the boot vCPU at it. The machine must not be shared yet
    /// (the loader writes guest memory, which a [`StoppedGuard`] holder may be reading).
    pub fn load(&mut self, elf: &[u8], args: &str) -> Result<BootState, MachineError> {
        self.ensure_exclusive()?;
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
                    esvm_abi::boot::FLAG_PROTECTED_STATE
                } else {
                    0
                },
            },
            sev_es.then_some(esvm_hv::sev::C_BIT),
        )?;
        if self.sev_aps() {
            // The AP start stub, inside the measured low memory (`measured_regions`).
            let (start, len) = esvm_loader::ap_stub::range();
            let mut page = esvm_loader::ap_stub::page();
            page.resize(len as usize, 0);
            self.vm
                .memory()
                .write(start, &page)
                .map_err(HvError::from)?;
        }
        let bsp = &mut self.vcpus[0];
        bsp.set_sregs(&boot.sregs)?;
        bsp.set_regs(&boot.regs)?;
        Ok(boot)
    }

    /// SEV-ES: run every AP that has not run yet into the AP stub's reset hold before the
    /// boot vCPU runs, as firmware parks the APs before it hands over to the OS. Otherwise a
    /// guest's early INIT-SIPI-SIPI could reach an AP still on its way into the hold (its
    /// vCPU thread not yet scheduled): the SIPI is ignored (the AP is not held) and the AP
    /// parks for good.
    fn park_fresh_sev_aps(&mut self) -> Result<(), MachineError> {
        /// The stub holds within a few instructions; far more means it is not the stub.
        const PARK_BUDGET: u64 = 10_000;
        if !self.sev_aps() {
            return Ok(());
        }
        for i in 1..self.vcpus.len() {
            let fresh = self.run_state[i] == VcpuRunState::Running
                && self.retired_base[i] == 0
                && self.vcpus[i].instructions_retired() == Some(0);
            if !fresh {
                continue;
            }
            let vcpu = &mut self.vcpus[i];
            vcpu.set_instruction_budget(Some(PARK_BUDGET))?;
            let (parked, what) = loop {
                let (interrupted, parked, what) = match vcpu.run()? {
                    VmExit::ApResetHold => (false, true, String::new()),
                    VmExit::Interrupted => (true, false, "Interrupted".to_string()),
                    other => (false, false, format!("{other:?}")),
                };
                // A kick (the control wants the machine) ends a run early: go on.
                if !(interrupted && vcpu.instructions_retired().unwrap_or(0) < PARK_BUDGET) {
                    break (parked, what);
                }
            };
            vcpu.set_instruction_budget(None)?;
            if !parked {
                return Err(MachineError::State(format!(
                    "SEV-ES vCPU {i} did not park in the AP start stub's reset hold (its first \
                     run ended with {what}); the stub at its reset state is damaged"
                )));
            }
            self.run_state[i] = VcpuRunState::ApResetHold;
        }
        Ok(())
    }

    /// SEV-ES with several vCPUs: the APs start in the AP start stub.
    fn sev_aps(&self) -> bool {
        self.smp && self.config.vm_type == VmType::SevEs
    }

    /// Load a Linux kernel (bzImage or vmlinux), its initrd and command line by the Linux
    /// 64-bit boot protocol and point the boot vCPU at its entry. For an SEV-ES machine the
    /// boot page tables carry the C-bit; launch it afterwards with the pages the load wrote
    /// (`LinuxBoot::written_pages`).
    pub fn load_linux(&mut self, image: &LinuxImage<'_>) -> Result<LinuxBoot, MachineError> {
        self.ensure_exclusive()?;
        // SEV-ES: C-bit page tables, all memory private until the kernel shares pages.
        let c_bit = (self.vm.vm_type() == VmType::SevEs).then_some(esvm_hv::sev::C_BIT);
        // ACPI tables describe the VMM's interrupt controllers: only where the VMM models
        // them. Every vCPU where the APs start (INIT-SIPI, or for SEV-ES the AP stub and
        // jump table); else the boot vCPU only.
        let described = if self.smp { self.vcpus.len() as u32 } else { 1 };
        let acpi = self.apic.then_some(described);
        let boot = esvm_loader::linux::load_linux_with_ap_stub(
            self.vm.memory().mmap(),
            image,
            c_bit,
            acpi,
            self.sev_aps(),
        )?;
        // What firmware leaves for an OS: MTRRs enabled, all memory write-back (Linux 6.1
        // turns PAT off without enabled MTRRs, and an SEV-ES kernel needs PAT).
        for vcpu in &mut self.vcpus {
            vcpu.set_msrs(&[(
                esvm_arch::msr::IA32_MTRR_DEF_TYPE,
                esvm_arch::msr::MTRR_DEF_TYPE_FIRMWARE,
            )])?;
        }
        let bsp = &mut self.vcpus[0];
        bsp.set_sregs(&boot.sregs)?;
        bsp.set_regs(&boot.regs)?;
        Ok(boot)
    }

    /// Run several vCPUs in turns on the machine's thread with a fixed quantum
    /// ([`QUANTUM`]), so that a run replays exactly (same output, same instruction counts),
    /// instead of in parallel on a host thread each (the default). One vCPU, KVM and
    /// machines whose APs stay parked run the same either way. Set it before the run; a
    /// restored or received state brings its own choice ([`SchedulerState::deterministic`]).
    pub fn set_deterministic(&mut self, on: bool) {
        self.deterministic = on;
    }

    /// Whether the vCPUs take turns on one thread ([`Machine::set_deterministic`]).
    pub fn deterministic(&self) -> bool {
        self.deterministic
    }

    /// How the vCPUs run, for a machine where the choice matters (several vCPUs started by
    /// the guest, on virtual time: the emu backend); None for one vCPU or KVM.
    pub fn vcpu_scheduling(&self) -> Option<esvm_control::VcpuScheduling> {
        use esvm_control::VcpuScheduling as S;
        let matters = self.smp && matches!(self.clock, Clock::Virtual { .. });
        matters.then_some(if self.deterministic {
            S::Deterministic
        } else {
            S::Parallel
        })
    }

    /// Whether the run loop runs the vCPUs on a host thread each.
    fn parallel(&self) -> bool {
        self.vcpu_scheduling() == Some(esvm_control::VcpuScheduling::Parallel)
    }

    /// The plaintext VMSAs LAUNCH_UPDATE_VMSA would take in now, in vCPU order.
    pub fn initial_vmsas(&self) -> Result<Vec<[u8; 4096]>, MachineError> {
        let backend = self.config.backend;
        self.vcpus
            .iter()
            .map(|v| Ok(*vcpu_sev(v.as_ref(), backend)?.initial_vmsa()?))
            .collect()
    }

    /// SEV-ES LAUNCH_UPDATE_VMSA of `launcher` (this machine's launch) for every vCPU, in
    /// vCPU order.
    pub fn launch_update_vmsas(
        &mut self,
        launcher: &mut Launcher<Started>,
    ) -> Result<(), MachineError> {
        if !Arc::ptr_eq(launcher.vm(), &self.vm) {
            return Err(MachineError::State(
                "the launch is of another VM; launch this machine's vCPUs with a launcher of                  its own VM (Launcher::new(machine.vm().clone()))"
                    .into(),
            ));
        }
        for vcpu in &mut self.vcpus {
            launcher.update_vmsa(vcpu.as_mut())?;
        }
        Ok(())
    }

    fn now(&self) -> u64 {
        match &self.clock {
            Clock::Virtual { idle_ns } => self.instructions().unwrap_or(0) + idle_ns,
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

    /// SEV-ES: the VMGEXITs the hypervisor handled for the vCPUs, by what they asked for
    /// (see [`SevVcpu::vmgexits`]); None for a plain VM.
    pub fn vmgexits(&self) -> Option<VmgexitCounts> {
        if self.config.vm_type != VmType::SevEs {
            return None;
        }
        let mut all = VmgexitCounts::default();
        for v in &self.vcpus {
            all.add(&v.sev()?.vmgexits().ok()?);
        }
        Some(all)
    }

    /// Run the vCPUs (several: in parallel, or in turns with
    /// [`Machine::set_deterministic`]) until the guest exits, shuts down, the limit runs out
    /// or the VM migrates away. Other threads steer it through [`Machine::control`].
    pub fn run(&mut self) -> Result<Outcome, MachineError> {
        let control = self.control.clone();
        match control.loop_started() {
            Ok(()) => {}
            // Dead: it migrated away and must never run again.
            Err(LifecycleError::Migrated { url }) => return Ok(Outcome::Migrated(url)),
            Err(e) => return Err(e.into()),
        }
        let result = self.run_loop(&control);
        let result = match self.settle_tscs() {
            Ok(()) => result,
            Err(e) => result.and(Err(e)),
        };
        let end = match &result {
            Ok(Outcome::Migrated(url)) => LoopEnd::Migrated(url.clone()),
            Ok(o) => LoopEnd::Finished(Ending {
                exit_status: o.exit_status(),
                failed: o.is_failure(),
                what: o.describe(),
            }),
            Err(e) => LoopEnd::Finished(Ending {
                exit_status: EXIT_ESVM_ERROR,
                failed: true,
                what: format!("the VMM failed: {e}"),
            }),
        };
        control.publish_instructions(self.instructions().unwrap_or(0));
        control.loop_ended(end);
        result
    }

    fn run_loop(&mut self, control: &VmControl) -> Result<Outcome, MachineError> {
        let virtual_time = matches!(self.clock, Clock::Virtual { .. });
        self.park_fresh_sev_aps()?;
        if !self.mid_exit {
            for cpu in 0..self.vcpus.len() {
                self.sync_apic(cpu)?;
            }
        }
        if virtual_time {
            let now = self.now();
            let offsets = self
                .vcpus
                .iter()
                .map(|v| Ok(v.get_tsc()?.wrapping_sub(now) as i64))
                .collect::<Result<Vec<_>, HvError>>()?;
            self.tsc_offsets = Some(offsets);
        }
        if self.parallel() {
            return self.run_parallel(control);
        }
        loop {
            if !self.mid_exit {
                if let Some(outcome) = self.pump_console() {
                    return Ok(outcome);
                }
                control.publish_instructions(self.instructions().unwrap_or(0));
                if control.attention() {
                    if let Some(outcome) = control.service(self) {
                        return Ok(outcome);
                    }
                }
                if let Some(outcome) = self.schedule()? {
                    return Ok(outcome);
                }
            }
            let cpu = self.current;
            let now = self.now();
            self.devices.advance_to(now);
            self.devices.select_vcpu(cpu);
            if virtual_time {
                if self.devices.has_interrupt_request() {
                    self.sync_apic(cpu)?;
                }
                self.offer_interrupt(cpu)?;
            }
            let mut slice = MAX_SLICE_NS;
            if let Some(deadline) = self.devices.next_deadline_ns() {
                slice = slice.min(deadline.saturating_sub(now).max(1));
            }
            if virtual_time && self.devices.pending_interrupt().is_some() {
                slice = slice.min(WINDOW_POLL_NS);
            }
            if self.vcpus.len() > 1 {
                slice = slice.min(self.slot_left.max(1));
            }
            if let Some(limit) = self.max_instructions {
                let done = self.instructions().unwrap_or(0);
                if done >= limit {
                    return Ok(Outcome::InstructionLimit(done));
                }
                slice = slice.min(limit - done);
            }
            let before = self.vcpus[cpu].instructions_retired().unwrap_or(0);
            if virtual_time {
                self.vcpus[cpu].set_instruction_budget(Some(slice))?;
                // The vCPU's TSC follows the machine's clock (it stood still while the
                // others had their turns).
                if let Some(off) = self.tsc_offsets.as_ref().map(|o| o[cpu]) {
                    let tsc = now.wrapping_add(off as u64);
                    if self.vcpus[cpu].get_tsc()? != tsc {
                        self.vcpus[cpu].set_tsc(tsc)?;
                    }
                }
            }
            let outcome = self.run_once(cpu)?;
            let ran = self.vcpus[cpu]
                .instructions_retired()
                .unwrap_or(0)
                .saturating_sub(before);
            self.slot_left = self.slot_left.saturating_sub(ran);
            if self.budget_ended && ran < slice {
                // The budget ended early: PAUSEs gave it up (spin-waiting). The turn ends
                // so that the vCPU it waits for runs.
                self.slot_left = 0;
            }
            if virtual_time {
                let now = self.now();
                let tsc = self.vcpus[cpu].get_tsc()?;
                if let Some(o) = self.tsc_offsets.as_mut() {
                    o[cpu] = tsc.wrapping_sub(now) as i64;
                }
            }
            if let Some(outcome) = outcome {
                return Ok(outcome);
            }
            if self.vcpus.len() > 1 {
                if let Some(outcome) = self.after_turn_step(cpu)? {
                    return Ok(outcome);
                }
            }
        }
    }

    /// After a vCPU's step when several take turns: act on INIT and SIPI (the AP state
    /// machine) and end the turn after an IPI to another vCPU, so that it answers soon.
    /// Returns the outcome that ends the run, if an INIT reset the machine.
    fn after_turn_step(&mut self, cpu: usize) -> Result<Option<Outcome>, MachineError> {
        let ipis = self.devices.intc().ipis_sent;
        if ipis != self.ipis_seen {
            self.ipis_seen = ipis;
            self.slot_left = 0;
        }
        for i in 0..self.vcpus.len() {
            // A vCPU in the middle of an exit is reset once the exit is done.
            if (i == cpu && self.mid_exit) || !self.devices.has_ap_signals_of(i) {
                continue;
            }
            for signal in self.devices.take_ap_signals_of(i) {
                if let Some(outcome) = self.apply_ap_signal(i, signal)? {
                    return Ok(Some(outcome));
                }
                if i == cpu && self.run_state[i] != VcpuRunState::Running {
                    self.slot_left = 0;
                }
            }
        }
        Ok(None)
    }

    /// Act on INIT or SIPI `signal` sent to vCPU `i` (the AP state machine), at a clean
    /// point of `i` (its exit fully handled). A plain vCPU: INIT puts it in its INIT state
    /// waiting for SIPI; a SIPI starts a waiting vCPU in real mode at its vector. A protected
    /// (SEV-ES) vCPU: INIT is ignored (the hypervisor cannot reset its encrypted registers),
    /// a SIPI releases it from the AP reset hold if it is held. A SIPI to a vCPU that is not
    /// waiting for one is ignored, as on hardware (Linux sends two). INIT to the boot vCPU
    /// (the APIC base's BSP flag) resets the machine: on hardware the BSP restarts at the
    /// reset vector, in firmware, which esvm's guests do not have, so the run ends as for
    /// any other reset of the guest ([`Outcome::Reset`], status 0); the BSP never waits
    /// for SIPI. Machines whose APs stay parked (KVM) ignore both.
    fn apply_ap_signal(
        &mut self,
        i: usize,
        signal: ApSignal,
    ) -> Result<Option<Outcome>, MachineError> {
        if !self.smp {
            return Ok(None);
        }
        if self.vcpus[i].is_protected() {
            if let ApSignal::Sipi(_) = signal {
                let backend = self.config.backend;
                let vcpu = self.vcpus[i]
                    .sev_mut()
                    .ok_or(MachineError::Hv(HvError::NoSevSupport { backend }))?;
                if vcpu.deliver_sipi()? {
                    self.run_state[i] = VcpuRunState::Running;
                }
            }
            return Ok(None);
        }
        match signal {
            ApSignal::Init
                if self.vcpus[i].get_sregs()?.apic_base & esvm_arch::msr::APIC_BASE_BSP != 0 =>
            {
                return Ok(Some(Outcome::Reset(format!(
                    "INIT to the boot vCPU {i}: it restarts in firmware, which esvm's \
                     guests do not have"
                ))));
            }
            ApSignal::Init => {
                self.init_vcpu(i)?;
                self.run_state[i] = VcpuRunState::WaitForSipi;
            }
            ApSignal::Sipi(vector) if self.run_state[i] == VcpuRunState::WaitForSipi => {
                self.start_vcpu(i, vector)?;
                self.run_state[i] = VcpuRunState::Running;
            }
            ApSignal::Sipi(_) => {}
        }
        Ok(None)
    }

    /// INIT of vCPU `i`: the power-on state, except for what INIT keeps on hardware (the
    /// APIC base, so the APIC ID; the MTRRs) and the TSC.
    fn init_vcpu(&mut self, i: usize) -> Result<(), MachineError> {
        let vcpu = &mut self.vcpus[i];
        let old = vcpu.snapshot()?;
        let mut s = VcpuSnapshot::reset();
        s.sregs.apic_base = old.sregs.apic_base;
        s.msrs.mtrr = old.msrs.mtrr;
        s.tsc = old.tsc;
        vcpu.restore(&s)?;
        Ok(())
    }

    /// SIPI with `vector` to vCPU `i` waiting for it: it starts in real mode at
    /// CS.selector = vector << 8, CS.base = vector << 12, IP = 0.
    fn start_vcpu(&mut self, i: usize, vector: u8) -> Result<(), MachineError> {
        let vcpu = &mut self.vcpus[i];
        let mut sregs = vcpu.get_sregs()?;
        sregs.cs.selector = u16::from(vector) << 8;
        sregs.cs.base = u64::from(vector) << 12;
        sregs.cs.limit = 0xffff;
        vcpu.set_sregs(&sregs)?;
        let mut regs = vcpu.get_regs()?;
        regs.rip = 0;
        vcpu.set_regs(&regs)?;
        Ok(())
    }

    /// Whether halted vCPU `i` has something that wakes it: an NMI, or an interrupt it
    /// takes (interrupts enabled).
    fn wakes(&self, i: usize) -> Result<bool, MachineError> {
        if self.devices.nmi_pending_of(i) {
            return Ok(true);
        }
        Ok(self.devices.pending_interrupt_of(i).is_some() && self.vcpus[i].interrupts_enabled()?)
    }

    /// Choose the vCPU for the next step: the current one while its turn lasts and it runs,
    /// else the next running one in round-robin order (a halted one runs again when
    /// something wakes it). When none can run, virtual time skips to the next device
    /// deadline ([`Machine::idle`]).
    fn schedule(&mut self) -> Result<Option<Outcome>, MachineError> {
        let n = self.vcpus.len();
        let now = self.now();
        self.devices.advance_to(now);
        loop {
            for i in 0..n {
                if self.run_state[i] == VcpuRunState::Halted && self.wakes(i)? {
                    self.run_state[i] = VcpuRunState::Running;
                }
            }
            if self.run_state[self.current] == VcpuRunState::Running
                && (n == 1 || self.slot_left > 0)
            {
                return Ok(None);
            }
            if let Some(next) = (1..=n)
                .map(|k| (self.current + k) % n)
                .find(|&i| self.run_state[i] == VcpuRunState::Running)
            {
                self.current = next;
                self.slot_left = QUANTUM;
                return Ok(None);
            }
            if let Some(outcome) = self.idle()? {
                return Ok(Some(outcome));
            }
        }
    }

    /// Give the devices vCPU `cpu`'s APIC base (enable, x2APIC mode) and CR8 (the TPR) as
    /// the VMM knows them: tracked values for a protected vCPU. Needed before interrupts are
    /// judged and when the run loop starts (a plain vCPU's APIC base writes exit to the VMM,
    /// which passes them on at once).
    fn sync_apic(&mut self, cpu: usize) -> Result<(), MachineError> {
        sync_apic_of(self.apic, self.vcpus[cpu].as_ref(), &mut self.devices, cpu)
    }

    /// Hand the interrupt controllers' pending interrupt for vCPU `cpu` (its local APIC, or
    /// for the boot vCPU the 8259 through LINT0) to it if it has none queued; NMIs too. The
    /// devices have `cpu` selected.
    fn offer_interrupt(&mut self, cpu: usize) -> Result<(), MachineError> {
        offer_interrupt_to(self.apic, self.vcpus[cpu].as_mut(), &mut self.devices)
    }

    /// Bring every vCPU's TSC to the machine's clock (the run loop leaves them behind while
    /// others have their turns) and forget the offsets: outside the run loop the vCPUs'
    /// own TSCs are the truth.
    fn settle_tscs(&mut self) -> Result<(), MachineError> {
        let Some(offsets) = self.tsc_offsets.take() else {
            return Ok(());
        };
        let now = self.now();
        for (v, off) in self.vcpus.iter_mut().zip(offsets) {
            let tsc = now.wrapping_add(off as u64);
            if v.get_tsc()? != tsc {
                v.set_tsc(tsc)?;
            }
        }
        Ok(())
    }

    /// One step of vCPU `cpu` on the machine's thread: run it to its next exit and handle
    /// the exit.
    fn run_once(&mut self, cpu: usize) -> Result<Option<Outcome>, MachineError> {
        let retired = self.vcpus[cpu].instructions_retired().unwrap_or(0);
        // Only this vCPU runs: virtual time moves with its instructions.
        let now_base = self.now().wrapping_sub(retired);
        let side = TurnSide {
            devices: &mut self.devices,
            scratch: &mut self.mmio_scratch,
            now_base,
        };
        let (h, _) = run_exit(self.vcpus[cpu].as_mut(), cpu, self.apic, || side)?;
        self.budget_ended = h.budget_ended;
        if h.held {
            self.run_state[cpu] = VcpuRunState::ApResetHold;
            self.slot_left = 0;
        } else if h.halted {
            self.run_state[cpu] = VcpuRunState::Halted;
            self.slot_left = 0;
        }
        self.mid_exit = h.mid_exit;
        Ok(h.outcome)
    }

    /// No vCPU can run: each halted or waiting for SIPI. If none can ever wake (halted with
    /// interrupts disabled, or waiting for a SIPI nobody can send) the guest powered off.
    /// Otherwise virtual time skips to the next device deadline; while a console can still
    /// bring input, the loop first waits for it in real time (at most until that deadline,
    /// and briefly), so an idle interactive guest neither spins nor misses a key. Then the
    /// halted vCPUs with interrupts enabled run again.
    fn idle(&mut self) -> Result<Option<Outcome>, MachineError> {
        let mut wakeable = false;
        for (v, state) in self.vcpus.iter().zip(&self.run_state) {
            // From the interrupt-mask bit the hardware exposes: a protected (SEV-ES) vCPU's
            // registers are not readable.
            if *state == VcpuRunState::Halted && v.interrupts_enabled()? {
                wakeable = true;
            }
        }
        if !wakeable {
            return Ok(Some(Outcome::PowerOff(crate::outcome::HALTED_OFF.into())));
        }
        let now = self.now();
        let deadline = self.devices.next_deadline_ns();
        // Input arrived: the run loop hands it to the UART, whose interrupt wakes the guest;
        // virtual time stays where it is.
        let console_input = wait_for_console_input(self.console.as_mut(), now, deadline);
        if !console_input {
            match (&mut self.clock, deadline) {
                (Clock::Virtual { idle_ns }, Some(deadline)) => {
                    // The vCPUs' TSCs follow when their turns start.
                    *idle_ns += deadline.saturating_sub(now);
                }
                (Clock::Host { .. }, _) => {
                    // KVM handles HLT in the kernel with its irqchip; a HLT exit here means no
                    // in-kernel device will wake it, but the serial line might; wait briefly.
                    std::thread::sleep(Duration::from_millis(1));
                }
                // Only the console could still wake it.
                (Clock::Virtual { .. }, None)
                    if self.console.as_ref().is_some_and(|c| c.open()) => {}
                (Clock::Virtual { .. }, None) => {
                    let vcpu = self.current as u32;
                    return Err(MachineError::HaltedForever {
                        vcpu,
                        rip: self.vcpus[self.current].get_regs().ok().map(|r| r.rip),
                    });
                }
            }
        }
        // As after a HLT on hardware once something happened: the halted vCPUs look again
        // (an interrupt that is not deliverable sends them back to HLT).
        for (v, state) in self.vcpus.iter().zip(self.run_state.iter_mut()) {
            if *state == VcpuRunState::Halted && v.interrupts_enabled()? {
                *state = VcpuRunState::Running;
            }
        }
        Ok(None)
    }

    /// Hand console input to COM1 as its FIFO has room; the user's Ctrl-A x ends the run.
    fn pump_console(&mut self) -> Option<Outcome> {
        let console = self.console.as_mut()?;
        let devices = &mut self.devices;
        console.pump(|bytes| devices.enqueue_serial_input(bytes));
        console
            .quit_requested()
            .then(|| Outcome::Stopped("from the console (Ctrl-A x)".into()))
    }

    /// Feed COM1 from `console` (e.g. esvm's stdin) while the machine runs.
    pub fn attach_console(&mut self, console: ConsoleInput) {
        self.console = Some(console);
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
                .vm
                .sev()
                .filter(|s| s.handle().is_some())
                .and_then(|s| s.host_state().ok()),
            user_paused: false,
            scheduler: (self.vcpus.len() > 1 || self.run_state[0] != VcpuRunState::Running).then(
                || SchedulerState {
                    vcpus: self.run_state.clone(),
                    current: self.current as u32,
                    slot_left: self.slot_left,
                    deterministic: self.deterministic,
                },
            ),
        }
    }

    fn vcpu_mut(&mut self, id: u32) -> Result<&mut Box<dyn Vcpu>, MachineError> {
        let n = self.vcpus.len();
        self.vcpus.get_mut(id as usize).ok_or_else(|| {
            MachineError::State(format!("vCPU {id} does not exist (the VM has {n})"))
        })
    }

    /// vCPU `id` at a clean point (between exits), for saving or sending its state.
    /// vCPU `id` between exits (its state is whole there), e.g. to inspect it.
    pub fn clean_vcpu(&self, id: u32) -> Result<&dyn Vcpu, MachineError> {
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
        let backend = self.config.backend;
        let mut t = vcpu_sev(self.clean_vcpu(id)?, backend)?.send_state()?;
        // As in `save_vcpu`: inside the run loop a vCPU's TSC is brought up to the clock only
        // when its turn starts; one that has not had a turn for long (an AP held in the AP
        // stub) would arrive with its TSC far behind the others'.
        if let Some(off) = self.tsc_offsets.as_ref().and_then(|o| o.get(id as usize)) {
            t.host.tsc = self.now().wrapping_add(*off as u64);
        }
        Ok(t)
    }

    /// SEV-ES: make vCPU `id` of a receiving machine the incoming one (RECEIVE_UPDATE_VMSA).
    pub fn receive_vcpu_sev(&mut self, id: u32, t: &SevVcpuTransfer) -> Result<(), MachineError> {
        let backend = self.config.backend;
        self.vcpu_mut(id)?
            .sev_mut()
            .ok_or(HvError::NoSevSupport { backend })?
            .receive_state(t)?;
        self.mid_exit = false;
        Ok(())
    }

    /// The state of vCPU `id`, at a clean point. Its TSC is the one it has on the machine's
    /// clock now (in the run loop a vCPU's TSC catches up only when its turn starts).
    pub fn save_vcpu(&self, id: u32) -> Result<VcpuSnapshot, MachineError> {
        let mut s = self.clean_vcpu(id)?.snapshot()?;
        if let Some(off) = self.tsc_offsets.as_ref().and_then(|o| o.get(id as usize)) {
            s.tsc = self.now().wrapping_add(*off as u64);
        }
        Ok(s)
    }

    /// Where each vCPU stands (running, halted, waiting for SIPI).
    pub fn vcpu_run_states(&self) -> &[VcpuRunState] {
        &self.run_state
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
            (Some(sev), VmType::SevEs) => self.sev()?.set_host_state(sev)?,
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
        if let Some(sched) = &s.scheduler {
            if sched.vcpus.len() != self.vcpus.len() || sched.current as usize >= self.vcpus.len() {
                return Err(MachineError::State(format!(
                    "the scheduler state describes {} vCPUs (current {}), this machine has {}",
                    sched.vcpus.len(),
                    sched.current,
                    self.vcpus.len()
                )));
            }
            if !self.smp
                && sched.vcpus[1..]
                    .iter()
                    .any(|r| *r != VcpuRunState::WaitForSipi)
            {
                return Err(MachineError::State(
                    "the state has running APs, but on this machine the APs stay parked (a KVM \
                     machine): restore it on a machine of the emu backend"
                        .into(),
                ));
            }
        }
        self.devices.restore(&s.devices)?;
        // A state without it (an older esvm's) stands as a fresh machine does.
        match &s.scheduler {
            Some(sched) => {
                self.run_state = sched.vcpus.clone();
                self.current = sched.current as usize;
                self.slot_left = sched.slot_left;
                self.deterministic = sched.deterministic;
            }
            None => {
                self.run_state = initial_run_states(self.vcpus.len(), self.sev_aps());
                self.current = 0;
                self.slot_left = 0;
            }
        }
        self.ipis_seen = self.devices.intc().ipis_sent;
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
                let base: u64 = s.instructions.iter().sum();
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

/// With every vCPU idle: wait in real time for input on an open console, at most until the
/// next device deadline and briefly, so an idle interactive guest neither spins nor misses
/// a key. Whether input arrived.
fn wait_for_console_input(
    console: Option<&mut ConsoleInput>,
    now: u64,
    deadline: Option<u64>,
) -> bool {
    let Some(console) = console.filter(|c| c.open()) else {
        return false;
    };
    let wait_ns = deadline.map_or(CONSOLE_IDLE_WAIT_NS, |d| {
        d.saturating_sub(now).min(CONSOLE_IDLE_WAIT_NS)
    });
    console.wait(Duration::from_nanos(wait_ns))
}

/// What the VMM made of one exit ([`run_exit`]).
struct Handled {
    /// The exit ends the VM.
    outcome: Option<Outcome>,
    /// The exit waits for the VMM's answer or the hypervisor's further work: the vCPU is not
    /// at a clean point ([`Machine::clean_vcpu`]) until it ran again.
    mid_exit: bool,
    /// The run ended at its instruction budget (or PAUSEs gave the budget up).
    budget_ended: bool,
    /// The vCPU halted (HLT with no interrupt to take at once).
    halted: bool,
    /// SEV-ES: the vCPU parked itself in the AP reset hold; only a SIPI releases it.
    held: bool,
}

/// Where a vCPU's exit is handled: the devices and the MMIO window, and virtual time.
trait ExitSide {
    /// The devices (the exiting vCPU selected) and the MMIO scratch window.
    fn parts(&mut self) -> (&mut Devices, &mut [u8; MMIO_SCRATCH_LEN]);
    /// Virtual time once the exit's instruction retired on `vcpu`.
    fn now_after(&mut self, vcpu: &dyn Vcpu) -> u64;
}

/// The exit side of the vCPUs' turns on one thread: the machine's own devices; virtual
/// time moves with the one running vCPU's instructions.
struct TurnSide<'a> {
    devices: &'a mut Devices,
    scratch: &'a mut [u8; MMIO_SCRATCH_LEN],
    /// Virtual time minus the running vCPU's retired instructions.
    now_base: u64,
}

impl ExitSide for TurnSide<'_> {
    fn parts(&mut self) -> (&mut Devices, &mut [u8; MMIO_SCRATCH_LEN]) {
        (self.devices, self.scratch)
    }

    fn now_after(&mut self, vcpu: &dyn Vcpu) -> u64 {
        self.now_base
            .wrapping_add(vcpu.instructions_retired().unwrap_or(0))
    }
}

/// Run `vcpu` (number `cpu`) to its next exit, then get the exit side from `enter` (with
/// vCPUs in parallel: take the devices' lock; the vCPU runs without it) and handle the
/// exit there. Returns what came of it and the exit side, still held.
fn run_exit<G: ExitSide>(
    vcpu: &mut dyn Vcpu,
    cpu: usize,
    apic: bool,
    enter: impl FnOnce() -> G,
) -> Result<(Handled, G), MachineError> {
    let mut tsc_deadline = None;
    let mut x2apic_write = None;
    let mut apic_base_write = None;
    let mut hlt = false;
    let mut held = false;
    let exit = vcpu.run()?;
    let mut side = enter();
    let (devices, scratch) = side.parts();
    let budget_ended = matches!(exit, VmExit::BudgetExhausted);
    let answer_needed = matches!(
        exit,
        VmExit::IoIn { .. }
            | VmExit::MmioRead { .. }
            | VmExit::Cpuid { .. }
            | VmExit::RdMsr { .. }
            | VmExit::WrMsr { .. }
    );
    let ends = |outcome| Handled {
        outcome: Some(outcome),
        mid_exit: false,
        budget_ended,
        halted: false,
        held: false,
    };
    match exit {
        VmExit::IoIn { port, data } => devices.io_read(port, data)?,
        VmExit::IoOut { port, data } => {
            devices.io_write(port, data)?;
            if port == esvm_devices::ACPI_PM1A_CNT && devices.take_power_off_request() {
                let off = Outcome::PowerOff(crate::outcome::ACPI_OFF.into());
                return Ok((ends(off), side));
            }
            if let Some(code) = devices.take_exit_request() {
                return Ok((ends(Outcome::Exited(code)), side));
            }
            if devices.take_reset_request() {
                let reset =
                    Outcome::Reset("through the i8042 keyboard controller's reset line".into());
                return Ok((ends(reset), side));
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
                    None => {
                        tracing::debug!(addr, len = data.len(), "write to unbacked memory ignored")
                    }
                }
            }
        }
        VmExit::Shutdown { reason } => return Ok((ends(Outcome::Shutdown(reason)), side)),
        VmExit::Terminated { reason } => return Ok((ends(Outcome::Terminated(reason)), side)),
        VmExit::Cpuid { result, .. } => *result = [0; 4],
        // The local APIC's MSRs (intercepted for a plain software vCPU, forwarded from
        // the GHCB for a protected one).
        VmExit::RdMsr {
            index: esvm_arch::msr::IA32_APIC_BASE,
            value,
            ..
        } => *value = devices.apic_base(),
        VmExit::WrMsr {
            index: esvm_arch::msr::IA32_APIC_BASE,
            value,
            ..
        } => apic_base_write = Some(value),
        VmExit::RdMsr {
            index,
            value,
            fault,
        } => match devices.apic_msr_read(index) {
            Some(v) => *value = v,
            None => *fault = true,
        },
        VmExit::WrMsr {
            index: esvm_devices::lapic::TSC_DEADLINE_MSR,
            value,
            ..
        } => tsc_deadline = Some(value),
        VmExit::WrMsr {
            index,
            value,
            fault,
        } => {
            // Whether it faults is decided now; the write itself once the exit is done
            // with (it may need the vCPU).
            if devices.apic_msr_writable(index) {
                x2apic_write = Some((index, value));
            } else {
                *fault = true;
            }
        }
        VmExit::BudgetExhausted | VmExit::Interrupted => {}
        VmExit::Hlt => hlt = true,
        VmExit::ApResetHold => held = true,
    }
    if let Some(value) = tsc_deadline {
        // The write retired: the guest TSC and virtual time are those after it.
        let tsc = vcpu.get_tsc()?;
        let now = side.now_after(vcpu);
        let (devices, _) = side.parts();
        devices.advance_to(now);
        devices.apic_msr_write(esvm_devices::lapic::TSC_DEADLINE_MSR, value, tsc);
    }
    let (devices, _) = side.parts();
    if let Some(value) = apic_base_write {
        if vcpu.is_protected() {
            // SEV-ES: the hypervisor tracks it (it changed in the GHCB exchange, which
            // shows the VMM the completed write); the devices follow the tracked value.
            sync_apic_of(apic, vcpu, devices, cpu)?;
        } else {
            // The vCPU keeps its copy (snapshots, the control API show it).
            vcpu.set_msrs(&[(esvm_arch::msr::IA32_APIC_BASE, value)])?;
            devices.set_apic_base(value);
        }
    }
    if let Some((index, value)) = x2apic_write {
        devices.apic_msr_write(index, value, 0);
    }
    // HLT. An interrupt that arrived while the window was shut (`STI; HLT`: the STI's
    // shadow covers the HLT) wakes it at once: the loop hands it over now that the window
    // is open. Otherwise the vCPU halts.
    let halted = hlt && !(devices.pending_interrupt().is_some() && vcpu.interrupts_enabled()?);
    let handled = Handled {
        outcome: None,
        mid_exit: answer_needed || vcpu.exit_pending(),
        budget_ended,
        halted,
        held,
    };
    Ok((handled, side))
}

/// Give the devices vCPU `cpu`'s APIC base (enable, x2APIC mode) and CR8 (the TPR) as the
/// VMM knows them: tracked values for a protected vCPU; see [`Machine::sync_apic`].
fn sync_apic_of(
    apic: bool,
    vcpu: &dyn Vcpu,
    devices: &mut Devices,
    cpu: usize,
) -> Result<(), MachineError> {
    if apic && cpu < devices.vcpus() {
        let view = vcpu.get_sregs_view()?;
        devices.select_vcpu(cpu);
        devices.set_apic_base(view.apic_base());
        devices.sync_cr8(view.cr8());
    }
    Ok(())
}

/// Hand the interrupt controllers' pending interrupt for `vcpu` (selected in `devices`) to
/// it if it has none queued; NMIs too. See [`Machine::offer_interrupt`].
fn offer_interrupt_to(
    apic: bool,
    vcpu: &mut dyn Vcpu,
    devices: &mut Devices,
) -> Result<(), MachineError> {
    if devices.take_nmi() {
        vcpu.inject_nmi()?;
    }
    if !devices.has_interrupt_request() {
        return Ok(());
    }
    let Some(vector) = devices.pending_interrupt() else {
        return Ok(());
    };
    if vcpu.get_events()?.interrupt.is_some() || !vcpu.interrupt_window_open()? {
        return Ok(());
    }
    // The backend refuses vectors the CR8 it knows masks (the tracked CR8 of a protected
    // vCPU): they wait until the guest lowers it.
    if apic && !esvm_hv::sev::tpr_accepts(vcpu.get_sregs_view()?.cr8(), vector) {
        return Ok(());
    }
    let vector = devices.acknowledge_interrupt();
    vcpu.queue_interrupt(vector)?;
    Ok(())
}

/// Kicks every vCPU of a machine: the control's kick, so that all of them reach a clean
/// point when the control needs the machine.
struct AllKicker(Vec<Arc<dyn esvm_hv::Kicker>>);

impl esvm_hv::Kicker for AllKicker {
    fn kick(&self) {
        for k in &self.0 {
            k.kick();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runctl::PARK_TIMEOUT;

    fn machine() -> Machine {
        let config = MachineConfig {
            backend: BackendKind::Emu,
            vm_type: VmType::Plain,
            mem_size: 16 * 4096,
            vcpus: 1,
            max_instructions: None,
        };
        Machine::new(&config, Box::new(std::io::sink())).unwrap()
    }

    /// Guest RAM is seen in place only with the proof the precondition holds: a guard that
    /// stops this very machine, or a machine nobody else holds.
    #[test]
    fn in_place_ram_needs_its_guard() {
        let mut m = machine();
        m.vm().memory().write(2 * 4096 + 5, &[0x5a]).unwrap();
        let h = m.handle();
        let other = machine().handle();
        let stopped = h.control.stop(PARK_TIMEOUT).unwrap();
        assert_eq!(h.stopped_ram(&stopped, 2, 1).unwrap()[5], 0x5a);
        assert_eq!(other.stopped_ram(&stopped, 2, 1), Err(RamError::OtherVm));
        assert!(matches!(
            h.stopped_ram(&stopped, 15, 2),
            Err(RamError::OutOfRange { .. })
        ));
        // While the guard (or any handle) lives, nothing may write the memory in place.
        assert!(matches!(m.exclusive_ram(), Err(RamError::Shared { .. })));
        assert!(matches!(
            m.load(&[], ""),
            Err(MachineError::Ram(RamError::Shared { .. }))
        ));
        drop(stopped);
        assert!(
            m.exclusive_ram().is_err(),
            "the handle still shares the machine"
        );
        drop(h);
        let vm = m.vm().clone();
        assert!(
            m.exclusive_ram().is_err(),
            "a clone of the VM shares it too"
        );
        drop(vm);
        m.exclusive_ram().unwrap().pages_mut(3, 1).unwrap()[0] = 7;
        let mut b = [0];
        m.vm().memory().read(3 * 4096, &mut b).unwrap();
        assert_eq!(b, [7]);
        m.exclusive_ram().unwrap().discard();
        m.vm().memory().read(3 * 4096, &mut b).unwrap();
        assert_eq!(b, [0]);
    }

    /// A plain machine of `vcpus` vCPUs whose boot vCPU runs `code` at 0x1000 in 32-bit
    /// protected mode (flat segments, no paging).
    fn flat32_machine(vcpus: u32, code: &[u8]) -> Machine {
        use esvm_arch::{Segment, SegmentAttributes};
        let config = MachineConfig {
            backend: BackendKind::Emu,
            vm_type: VmType::Plain,
            mem_size: 1 << 20,
            vcpus,
            max_instructions: Some(5_000_000),
        };
        let mut m = Machine::new(&config, Box::new(std::io::sink())).unwrap();
        m.vm().memory().write(0x1000, code).unwrap();
        let seg = |ty, selector| Segment {
            selector,
            base: 0,
            limit: 0xffff_ffff,
            attrib: SegmentAttributes::new(ty, true, 0, true, false, true, true),
        };
        let bsp = &mut m.vcpus[0];
        let mut sregs = bsp.get_sregs().unwrap();
        sregs.cs = seg(0xb, 8);
        for d in [
            &mut sregs.ds,
            &mut sregs.es,
            &mut sregs.ss,
            &mut sregs.fs,
            &mut sregs.gs,
        ] {
            *d = seg(0x3, 16);
        }
        sregs.cr0 |= 1;
        bsp.set_sregs(&sregs).unwrap();
        let mut regs = bsp.get_regs().unwrap();
        regs.rip = 0x1000;
        regs.gpr[4] = 0x7000;
        bsp.set_regs(&regs).unwrap();
        m
    }

    /// `mov dword [addr], value` (32-bit code).
    fn mov_mem32(addr: u32, value: u32) -> Vec<u8> {
        let mut v = vec![0xc7, 0x05];
        v.extend_from_slice(&addr.to_le_bytes());
        v.extend_from_slice(&value.to_le_bytes());
        v
    }

    /// INIT to the boot vCPU resets the machine (it would restart in firmware): the run ends
    /// as a reset, in turns and in parallel, instead of the BSP waiting for a SIPI forever.
    #[test]
    fn init_to_the_boot_vcpu_resets_the_machine() {
        let mut bsp = Vec::new();
        bsp.extend(mov_mem32(0xfee0_0310, 0)); // destination: APIC ID 0, itself
        bsp.extend(mov_mem32(0xfee0_0300, 0xc500)); // INIT, level, assert
        bsp.extend([0xeb, 0xfe]); // jmp $
        for deterministic in [true, false] {
            let mut m = flat32_machine(2, &bsp);
            m.set_deterministic(deterministic);
            let outcome = m.run().unwrap();
            match &outcome {
                Outcome::Reset(how) => assert!(how.contains("INIT to the boot vCPU"), "{how}"),
                other => panic!("deterministic={deterministic}: {other:?}"),
            }
            assert_eq!(outcome.exit_status(), 0);
        }
    }

    /// The BSP starts the AP by INIT-SIPI-SIPI (vector 8: real mode at 0x8000); the AP writes
    /// a flag and counts its starts, the BSP waits for the flag and writes its own result.
    #[test]
    fn the_bsp_starts_an_ap_by_init_sipi_sipi() {
        let icr_hi = 0xfee0_0310;
        let icr_lo = 0xfee0_0300;
        let mut bsp = Vec::new();
        bsp.extend(mov_mem32(icr_hi, 1 << 24));
        bsp.extend(mov_mem32(icr_lo, 0xc500)); // INIT, level, assert
        bsp.extend(mov_mem32(icr_lo, 0x8500)); // INIT de-assert
        bsp.extend(mov_mem32(icr_lo, 0x0608)); // SIPI, vector 8
        bsp.extend(mov_mem32(icr_lo, 0x0608)); // the second SIPI: ignored, the AP runs
                                               // wait: cmp byte [0x9000], 0x5a; jne wait
        bsp.extend([0x80, 0x3d, 0x00, 0x90, 0, 0, 0x5a, 0x75, 0xf7]);
        // mov byte [0x9001], 0x42; mov al, 7; out 0xf4, al
        bsp.extend([0xc6, 0x05, 0x01, 0x90, 0, 0, 0x42, 0xb0, 0x07, 0xe6, 0xf4]);
        // AP, real mode at 0800:0000: xor ax, ax; mov ds, ax; inc word [0x9002];
        // mov byte [0x9000], 0x5a; cli; hlt
        let ap = [
            0x31, 0xc0, 0x8e, 0xd8, 0xff, 0x06, 0x02, 0x90, 0xc6, 0x06, 0x00, 0x90, 0x5a, 0xfa,
            0xf4,
        ];
        let run = |deterministic| {
            let mut m = flat32_machine(2, &bsp);
            m.set_deterministic(deterministic);
            m.vm().memory().write(0x8000, &ap).unwrap();
            assert_eq!(
                m.vcpu_run_states(),
                [VcpuRunState::Running, VcpuRunState::WaitForSipi]
            );
            let outcome = m.run().unwrap();
            assert!(matches!(outcome, Outcome::Exited(7)), "{outcome:?}");
            let mut res = [0u8; 4];
            m.vm().memory().read(0x9000, &mut res).unwrap();
            assert_eq!(res, [0x5a, 0x42, 1, 0], "flag, BSP result, one AP start");
            // The AP ran in real mode where the SIPI put it, and retired its instructions.
            // In parallel the BSP's exit may end the run between the AP's flag store and its
            // HLT.
            let ap_regs = m.vcpus[1].get_regs().unwrap();
            let ap_sregs = m.vcpus[1].get_sregs().unwrap();
            assert_eq!((ap_sregs.cs.selector, ap_sregs.cs.base), (0x800, 0x8000));
            if deterministic {
                assert_eq!(
                    m.vcpu_run_states(),
                    [VcpuRunState::Running, VcpuRunState::Halted]
                );
                assert_eq!(ap_regs.rip, ap.len() as u64);
            } else {
                assert!(ap_regs.rip >= ap.len() as u64 - 2, "{:#x}", ap_regs.rip);
            }
            assert_eq!(
                ap_sregs.apic_base,
                layout::LAPIC_ADDR | (1 << 11),
                "not the BSP"
            );
            let state = m.save_state();
            (state.instructions, m.vcpus[1].get_tsc().unwrap(), m.now())
        };
        let (counts, ap_tsc, now) = run(true);
        assert_eq!(counts[1], 6, "the AP's six instructions");
        // Virtual time is every vCPU's instructions; the AP's TSC is on it.
        assert_eq!(now, counts.iter().sum::<u64>());
        assert_eq!(ap_tsc, now);
        // It replays exactly.
        assert_eq!(run(true), (counts, ap_tsc, now));
        // In parallel (each vCPU on a thread of its own) it comes to the same end; the
        // BSP's spin count depends on the host's timing.
        let (counts, ap_tsc, now) = run(false);
        assert!(
            (4..=6).contains(&counts[1]),
            "the AP's instructions: {counts:?}"
        );
        assert_eq!(now, counts.iter().sum::<u64>());
        assert_eq!(ap_tsc, now);
    }

    /// vCPUs in parallel: pause (a stop guard), a job on the whole machine and resume, while
    /// two vCPUs run; every vCPU is at a clean point while the guest is stopped, and the
    /// run goes on to its end.
    #[test]
    fn parallel_vcpus_stop_together_for_the_control() {
        // BSP: start the AP (INIT, SIPI vector 8), then count in [0x9004] until the AP's
        // counter [0x9008] reaches 5000000; exit 7. AP: count [0x9008] up to 5000000; hlt.
        let icr_hi = 0xfee0_0310;
        let icr_lo = 0xfee0_0300;
        let mut bsp = Vec::new();
        bsp.extend(mov_mem32(icr_hi, 1 << 24));
        bsp.extend(mov_mem32(icr_lo, 0xc500));
        bsp.extend(mov_mem32(icr_lo, 0x8500));
        bsp.extend(mov_mem32(icr_lo, 0x0608));
        // loop: inc dword [0x9004]; cmp dword [0x9008], 5000000; jb loop
        bsp.extend([0xff, 0x05, 0x04, 0x90, 0, 0]);
        bsp.extend([0x81, 0x3d, 0x08, 0x90, 0, 0]);
        bsp.extend(5_000_000u32.to_le_bytes());
        bsp.extend([0x72, 0xee]);
        bsp.extend([0xb0, 0x07, 0xe6, 0xf4]); // mov al, 7; out 0xf4, al
                                              // AP, real mode at 0800:0000: xor ax, ax; mov ds, ax;
                                              // loop: add dword [0x9008], 1 (66 83 06 08 90 01); cmp dword [0x9008], 5000000
                                              // (66 81 3e 08 90 imm32); jb loop; cli; hlt
        let mut ap = vec![0x31, 0xc0, 0x8e, 0xd8];
        ap.extend([0x66, 0x83, 0x06, 0x08, 0x90, 0x01]);
        ap.extend([0x66, 0x81, 0x3e, 0x08, 0x90]);
        ap.extend(5_000_000u32.to_le_bytes());
        ap.extend([0x72, 0xef, 0xfa, 0xf4]);
        let mut m = flat32_machine(2, &bsp);
        m.max_instructions = None;
        m.vm().memory().write(0x8000, &ap).unwrap();
        let control = m.control().clone();
        let stopper = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for _ in 0..3 {
                std::thread::sleep(Duration::from_millis(20));
                let Ok(stopped) = control.stop(PARK_TIMEOUT) else {
                    break; // the run ended first
                };
                let job = control.run_job(|m: &mut Machine| {
                    let clean = (0..2).all(|i| m.save_vcpu(i).is_ok());
                    (clean, m.instructions().unwrap_or(0))
                });
                match job {
                    Ok(r) => seen.push(r),
                    Err(_) => break,
                }
                drop(stopped);
            }
            seen
        });
        let outcome = m.run().unwrap();
        assert!(matches!(outcome, Outcome::Exited(7)), "{outcome:?}");
        let seen = stopper.join().unwrap();
        assert!(
            !seen.is_empty(),
            "the run ended before the control stopped it"
        );
        assert!(seen.iter().all(|(clean, _)| *clean), "{seen:?}");
        // Each stop saw the guest further on.
        assert!(seen.windows(2).all(|w| w[0].1 < w[1].1), "{seen:?}");
        let mut count = [0u8; 4];
        m.vm().memory().read(0x9008, &mut count).unwrap();
        assert_eq!(u32::from_le_bytes(count), 5_000_000);
        // The run ended at the BSP's exit: the AP has halted or is on its way to its HLT.
        assert_eq!(m.vcpu_run_states()[0], VcpuRunState::Running);
    }

    /// Without SIPI an AP never runs; a machine whose vCPUs all wait or halt with
    /// interrupts disabled is off.
    #[test]
    fn aps_without_sipi_stay_waiting_and_cli_hlt_powers_off() {
        let mut m = flat32_machine(3, &[0xfa, 0xf4]);
        let outcome = m.run().unwrap();
        assert!(matches!(outcome, Outcome::PowerOff(_)), "{outcome:?}");
        let state = m.save_state();
        assert_eq!(state.instructions, [2, 0, 0]);
        let sched = state.scheduler.clone().unwrap();
        assert_eq!(
            sched.vcpus,
            [
                VcpuRunState::Halted,
                VcpuRunState::WaitForSipi,
                VcpuRunState::WaitForSipi
            ]
        );
        // The state restores, and one without the scheduler (an older esvm's) too.
        let mut m2 = flat32_machine(3, &[0xfa, 0xf4]);
        m2.restore_state(&state).unwrap();
        assert_eq!(m2.vcpu_run_states(), sched.vcpus);
        let mut old = state.clone();
        old.scheduler = None;
        m2.restore_state(&old).unwrap();
        assert_eq!(m2.vcpu_run_states()[0], VcpuRunState::Running);
        let json = serde_json::to_string(&old).unwrap();
        assert!(!json.contains("scheduler"));
        let mut bad = state;
        bad.scheduler.as_mut().unwrap().vcpus.pop();
        assert!(m2.restore_state(&bad).is_err());
    }

    /// `--deterministic` travels with the VM: a saved state carries it (only when set) and a
    /// machine restored from it takes turns on one thread too.
    #[test]
    fn the_deterministic_choice_travels_with_the_state() {
        let mut m = flat32_machine(2, &[0xfa, 0xf4]);
        m.set_deterministic(true);
        let state = m.save_state();
        assert!(state.scheduler.as_ref().unwrap().deterministic);
        let mut m2 = flat32_machine(2, &[0xfa, 0xf4]);
        assert!(!m2.deterministic());
        m2.restore_state(&state).unwrap();
        assert!(m2.deterministic());
        assert!(!m2.parallel());
        // A parallel VM's state does not write the field (older readers take it as before).
        let parallel = flat32_machine(2, &[0xfa, 0xf4]).save_state();
        let json = serde_json::to_string(&parallel).unwrap();
        assert!(!json.contains("deterministic"), "{json}");
        m2.restore_state(&parallel).unwrap();
        assert!(m2.parallel());
    }
}

#[cfg(test)]
mod sev_ap_tests;
