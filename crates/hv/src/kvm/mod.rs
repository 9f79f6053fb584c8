//! The KVM backend: plain (non-SEV) guests on the host's KVM through rust-vmm's `kvm-ioctls`.
//!
//! One VM = one KVM VM fd with guest RAM as memory slot 0 (dirty-logged) and, by default, the
//! in-kernel interrupt controllers (PIC, IOAPIC, LAPIC) and PIT, so guests program the PIT and
//! PIC natively. [`KvmOptions::irqchip`] = false gives a VM without them instead, in which HLT
//! exits to the VMM ([`VmExit::Hlt`](crate::VmExit::Hlt)) and [`Vcpu::queue_interrupt`]
//! works, mirroring the emu backend's contract.
//!
//! Semantics the VMM must know:
//! - With the in-kernel irqchip, HLT is handled inside KVM: the vCPU sleeps in KVM_RUN until an
//!   interrupt from the in-kernel PIC/PIT/LAPIC arrives, and never returns `VmExit::Hlt`. A
//!   `cli; hlt` guest sleeps until kicked (then `run` returns `Interrupted` and
//!   `get_events().halted` is true). Device interrupts are raised with
//!   [`Vm::set_irq_line`]; `queue_interrupt` is unsupported.
//! - I/O, MMIO and MSR exits are completed by KVM on the next KVM_RUN. Any register accessor
//!   called in between first completes the instruction (a KVM_RUN with `immediate_exit` set,
//!   as the KVM API documents for migration), so state read after an exit is always at an
//!   instruction boundary, and snapshots are exact.
//! - String I/O (`rep ins/outs`) that KVM batches into one exit is handed to the VMM one
//!   element per exit, so `data` is always 1, 2 or 4 bytes as with the emu backend. Between
//!   the elements of one instruction the register accessors return `InvalidState`.
//! - Without the in-kernel irqchip, `queue_interrupt` holds the vector in userspace (it shows
//!   in `get_events().interrupt`) and injects it through KVM_SET_VCPU_EVENTS once RFLAGS.IF,
//!   the interrupt shadow and pending events allow, using KVM's interrupt-window exits.
//! - CPUID intercepts are unsupported (KVM answers CPUID itself); MSR intercepts use
//!   KVM_X86_SET_MSR_FILTER with userspace MSR exits.
//! - FPU state goes through KVM_GET/SET_XSAVE (legacy FXSAVE area), because some KVMs lose
//!   MXCSR in KVM_GET/SET_FPU. MXCSR_MASK is read-only: `set_fpu` keeps the vCPU's own.
//!
//! Observed on the software-assisted KVM of the CI machines (ring 3 native, ring 0
//! emulated): guest TSC writes are ignored (the guest sees the host TSC; `set_tsc` logs a
//! warning); RFLAGS.IOPL is not honoured for native ring-3 code (IN/OUT still exit, CLI/STI
//! fault); an interrupt that becomes deliverable right before an emulated ring-0 I/O
//! instruction is delivered after that instruction's exit rather than before it.

mod convert;
pub mod cpuid;
mod kick;
mod vcpu;

pub use convert::{
    debugregs_from_kvm, debugregs_to_kvm, events_from_kvm, events_to_kvm, fpu_from_kvm, fpu_to_kvm,
    regs_from_kvm, regs_to_kvm, segment_from_kvm, segment_to_kvm, sregs_from_kvm, sregs_to_kvm,
};
pub use kick::{kick_signal, KICK_SIGNAL_OFFSET};
pub use vcpu::KvmVcpu;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use esvm_arch::layout;
use kvm_bindings::{
    kvm_cpuid_entry2, kvm_enable_cap, kvm_pit_config, kvm_userspace_memory_region, KVM_API_VERSION,
    KVM_CAP_EXCEPTION_PAYLOAD, KVM_CAP_X86_USER_SPACE_MSR, KVM_MAX_CPUID_ENTRIES,
    KVM_MEM_LOG_DIRTY_PAGES, KVM_MSR_EXIT_REASON_FILTER, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags, VmFd};

use crate::{
    BackendKind, DirtyBitmap, GuestMemory, HvError, Hypervisor, Result, Vcpu, Vm, VmConfig, VmType,
};

/// The slot guest RAM occupies.
const RAM_SLOT: u32 = 0;

/// Why the KVM backend could not set up or drive a vCPU, beyond an ioctl that simply failed
/// ([`HvError::Kvm`]). Seen as [`HvError::KvmSetup`].
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// `/dev/kvm` cannot be opened; `why` explains it for the user.
    #[error("the kvm backend is not available: {why}; or use the emu backend (--backend emu)")]
    Open {
        why: String,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The CPUID table does not fit KVM's entry list.
    #[error("invalid vCPU state: the CPUID table has too many entries for KVM: {0:?}")]
    CpuidTable(#[source] vmm_sys_util::fam::Error),
    /// KVM_SET_XSAVE refused the FPU state.
    #[error(
        "invalid vCPU state: KVM_SET_XSAVE rejected the FPU state ({source}); MXCSR {mxcsr:#x} \
         may have bits set that MXCSR_MASK {mxcsr_mask:#x} does not allow"
    )]
    Xsave {
        mxcsr: u32,
        mxcsr_mask: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM_SET_XCRS refused an XCR0 value.
    #[error(
        "invalid vCPU state: KVM_SET_XCRS rejected XCR0 = {xcr0:#x} ({source}): bit 0 must be \
         set and only state components the vCPU's CPUID leaf 0xD allows may be enabled"
    )]
    Xcr0 {
        xcr0: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// An MSR list does not fit KVM's entry list.
    #[error("internal error in the kvm backend: building the KVM MSR list: {0:?}")]
    MsrList(#[source] vmm_sys_util::fam::Error),
    /// The kick signal handler cannot be installed.
    #[error(
        "internal error in the kvm backend: cannot install the vCPU kick signal handler \
         (SIGRTMIN+{offset}): {source}",
        offset = kick::KICK_SIGNAL_OFFSET
    )]
    KickHandler {
        #[source]
        source: vmm_sys_util::errno::Error,
    },
}

pub(crate) fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> HvError {
    move |e| HvError::Kvm {
        op,
        source: std::io::Error::from_raw_os_error(e.errno()),
    }
}

/// How VMs of a [`KvmHypervisor`] are built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvmOptions {
    /// Create the in-kernel PIC/IOAPIC/LAPIC (KVM_CREATE_IRQCHIP) and PIT (KVM_CREATE_PIT2).
    /// Default true. When false, HLT exits to the VMM and `queue_interrupt` injects interrupts.
    pub irqchip: bool,
}

impl Default for KvmOptions {
    fn default() -> Self {
        KvmOptions { irqchip: true }
    }
}

/// The KVM backend: an open `/dev/kvm`.
pub struct KvmHypervisor {
    kvm: Kvm,
    options: KvmOptions,
    supported_cpuid: Vec<kvm_cpuid_entry2>,
    exception_payload: bool,
    user_space_msr: bool,
}

/// Capabilities the backend cannot work without, and what each is for.
const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (Cap::UserMemory, "user memory slots"),
    (Cap::SetTssAddr, "KVM_SET_TSS_ADDR"),
    (Cap::SetIdentityMapAddr, "KVM_SET_IDENTITY_MAP_ADDR"),
    (Cap::ExtCpuid, "KVM_GET_SUPPORTED_CPUID / KVM_SET_CPUID2"),
    (Cap::VcpuEvents, "KVM_GET/SET_VCPU_EVENTS (pending events)"),
    (Cap::Debugregs, "KVM_GET/SET_DEBUGREGS"),
    (Cap::Xcrs, "KVM_GET/SET_XCRS (XCR0)"),
    (Cap::MpState, "KVM_GET/SET_MP_STATE (halted state)"),
    (Cap::ImmediateExit, "kvm_run.immediate_exit (kicking vCPUs)"),
];

const IRQCHIP_CAPS: &[(Cap, &str)] = &[
    (Cap::Irqchip, "the in-kernel interrupt controller"),
    (Cap::Pit2, "the in-kernel PIT"),
];

impl KvmHypervisor {
    /// Open `/dev/kvm` with the default options (in-kernel irqchip and PIT).
    pub fn open() -> Result<Self> {
        Self::open_with(KvmOptions::default())
    }

    /// Open `/dev/kvm` and check that it can run esvm VMs.
    pub fn open_with(options: KvmOptions) -> Result<Self> {
        let kvm = Kvm::new().map_err(|e| {
            let why = match e.errno() {
                libc::ENOENT => "/dev/kvm does not exist: the host has no KVM (load the kvm \
                                 module, or enable nested virtualization for this VM)"
                    .to_string(),
                libc::EACCES | libc::EPERM => "permission denied opening /dev/kvm: run as a \
                                               user in the 'kvm' group (or as root)"
                    .to_string(),
                _ => format!("cannot open /dev/kvm: {e}"),
            };
            HvError::from(KvmError::Open { why, source: e })
        })?;
        let api = kvm.get_api_version();
        if api != KVM_API_VERSION as i32 {
            return Err(HvError::KvmUnavailable(format!(
                "/dev/kvm speaks KVM API version {api}, esvm needs version {KVM_API_VERSION}; \
                 use the emu backend (--backend emu)"
            )));
        }
        let irq_caps: &[(Cap, &str)] = if options.irqchip { IRQCHIP_CAPS } else { &[] };
        let missing: Vec<&str> = REQUIRED_CAPS
            .iter()
            .chain(irq_caps)
            .filter(|(c, _)| !kvm.check_extension(*c))
            .map(|(_, what)| *what)
            .collect();
        if !missing.is_empty() {
            return Err(HvError::KvmUnavailable(format!(
                "the host's KVM lacks capabilities esvm needs: {}; use the emu backend \
                 (--backend emu)",
                missing.join(", ")
            )));
        }
        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?
            .as_slice()
            .to_vec();
        let exception_payload = kvm.check_extension_raw(KVM_CAP_EXCEPTION_PAYLOAD as _) > 0;
        let user_space_msr =
            kvm.check_extension(Cap::X86UserSpaceMsr) && kvm.check_extension(Cap::X86MsrFilter);
        kick::ensure_handler()?;
        Ok(KvmHypervisor {
            kvm,
            options,
            supported_cpuid,
            exception_payload,
            user_space_msr,
        })
    }

    pub fn options(&self) -> KvmOptions {
        self.options
    }

    /// KVM_GET_SUPPORTED_CPUID of this host.
    pub fn supported_cpuid(&self) -> &[kvm_cpuid_entry2] {
        &self.supported_cpuid
    }

    /// How `table` would be translated for this host (see [`cpuid`] for the policy).
    pub fn translate_cpuid(
        &self,
        table: &esvm_arch::cpuid::CpuidTable,
        apic_id: u32,
    ) -> cpuid::CpuidTranslation {
        cpuid::translate(table, &self.supported_cpuid, apic_id)
    }

    /// Create a VM with the concrete type (for KVM-specific calls).
    pub fn create_kvm_vm(&self, config: &VmConfig) -> Result<Arc<KvmVm>> {
        if config.vm_type == VmType::SevEs {
            return Err(HvError::Unsupported {
                backend: BackendKind::Kvm,
                what: "SEV-ES guests: they run on the emu backend (--backend emu), which \
                       models the SEV-ES hardware and firmware"
                    .into(),
            });
        }
        if !config.cpuid_intercepts.is_empty() {
            return Err(HvError::Unsupported {
                backend: BackendKind::Kvm,
                what: format!(
                    "CPUID intercepts (leaves {:x?}): KVM answers CPUID in the kernel from the \
                     table given to KVM_SET_CPUID2; put the values in VmConfig::cpuid instead",
                    config.cpuid_intercepts
                ),
            });
        }
        let max_vcpus = self.kvm.get_max_vcpus();
        if config.vcpus == 0 || config.vcpus as usize > max_vcpus {
            return Err(HvError::InvalidState(format!(
                "a VM needs between 1 and {max_vcpus} vCPUs on this host, {} were asked for",
                config.vcpus
            )));
        }
        let memory = GuestMemory::new(config.mem_size)?;
        let fd = self.kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        fd.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDR)
            .map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
        fd.set_tss_address(layout::KVM_TSS_ADDR as usize)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        if self.options.irqchip {
            fd.create_irq_chip()
                .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
            let pit = kvm_pit_config {
                flags: KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            };
            fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
        }
        if self.exception_payload {
            let cap = kvm_enable_cap {
                cap: KVM_CAP_EXCEPTION_PAYLOAD,
                args: [1, 0, 0, 0],
                ..Default::default()
            };
            fd.enable_cap(&cap)
                .map_err(kvm_err("KVM_ENABLE_CAP(EXCEPTION_PAYLOAD)"))?;
        }
        if !config.msr_intercepts.is_empty() {
            self.install_msr_intercepts(&fd, &config.msr_intercepts)?;
        }
        let region = kvm_userspace_memory_region {
            slot: RAM_SLOT,
            flags: KVM_MEM_LOG_DIRTY_PAGES,
            guest_phys_addr: 0,
            memory_size: memory.size(),
            userspace_addr: memory.host_base() as u64,
        };
        // SAFETY: the region is the whole of `memory`'s mmap, which lives in the same VmInner
        // as `fd` and is dropped after it (field order), and vCPUs keep the VmInner alive.
        unsafe { fd.set_user_memory_region(region) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        Ok(Arc::new(KvmVm {
            inner: Arc::new(VmInner {
                fd,
                memory,
                run_size: self
                    .kvm
                    .get_vcpu_mmap_size()
                    .map_err(kvm_err("KVM_GET_VCPU_MMAP_SIZE"))?,
                irqchip: self.options.irqchip,
                exception_payload: self.exception_payload,
                vcpus: config.vcpus,
                cpuid: config.cpuid.clone(),
                supported_cpuid: self.supported_cpuid.clone(),
                created: Mutex::new(HashSet::new()),
            }),
        }))
    }

    fn install_msr_intercepts(&self, fd: &VmFd, indices: &[u32]) -> Result<()> {
        if !self.user_space_msr {
            return Err(HvError::Unsupported {
                backend: BackendKind::Kvm,
                what: "MSR intercepts on this host (KVM_CAP_X86_USER_SPACE_MSR and \
                       KVM_CAP_X86_MSR_FILTER are missing)"
                    .into(),
            });
        }
        let mut sorted: Vec<u32> = indices.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        // Group into ranges of up to 4096 MSRs; in a range's bitmap a 1 bit allows the access
        // in the kernel and a 0 bit denies it, which (with FILTER exits enabled) exits to us.
        const SPAN: u32 = 4096;
        let mut groups: Vec<(u32, Vec<u8>)> = Vec::new();
        for idx in sorted {
            match groups.last_mut() {
                Some((base, bits)) if idx - *base < SPAN => {
                    let off = idx - *base;
                    bits[(off / 8) as usize] &= !(1 << (off % 8));
                }
                _ => {
                    let mut bits = vec![0xffu8; (SPAN / 8) as usize];
                    bits[0] &= !1;
                    groups.push((idx, bits));
                }
            }
        }
        let max = kvm_bindings::KVM_MSR_FILTER_MAX_RANGES as usize;
        if groups.len() > max {
            return Err(HvError::Unsupported {
                backend: BackendKind::Kvm,
                what: format!(
                    "MSR intercepts spread over {} regions (KVM's MSR filter has {max} ranges \
                     of 4096 MSRs)",
                    groups.len()
                ),
            });
        }
        let cap = kvm_enable_cap {
            cap: KVM_CAP_X86_USER_SPACE_MSR,
            args: [KVM_MSR_EXIT_REASON_FILTER as u64, 0, 0, 0],
            ..Default::default()
        };
        fd.enable_cap(&cap)
            .map_err(kvm_err("KVM_ENABLE_CAP(X86_USER_SPACE_MSR)"))?;
        let ranges: Vec<MsrFilterRange<'_>> = groups
            .iter()
            .map(|(base, bits)| MsrFilterRange {
                flags: MsrFilterRangeFlags::READ | MsrFilterRangeFlags::WRITE,
                base: *base,
                msr_count: SPAN,
                bitmap: bits,
            })
            .collect();
        fd.set_msr_filter(MsrFilterDefaultAction::ALLOW, &ranges)
            .map_err(kvm_err("KVM_X86_SET_MSR_FILTER"))
    }
}

impl Hypervisor for KvmHypervisor {
    fn kind(&self) -> BackendKind {
        BackendKind::Kvm
    }

    fn create_vm(&self, config: &VmConfig) -> Result<Arc<dyn Vm>> {
        Ok(self.create_kvm_vm(config)?)
    }
}

/// What the VM and all its vCPUs share. Field order matters: the VM fd (and with it the
/// memory slot) goes away before the guest RAM mapping.
pub(crate) struct VmInner {
    pub(crate) fd: VmFd,
    pub(crate) memory: GuestMemory,
    pub(crate) run_size: usize,
    pub(crate) irqchip: bool,
    pub(crate) exception_payload: bool,
    vcpus: u32,
    cpuid: esvm_arch::cpuid::CpuidTable,
    supported_cpuid: Vec<kvm_cpuid_entry2>,
    created: Mutex<HashSet<u32>>,
}

/// A KVM VM.
pub struct KvmVm {
    inner: Arc<VmInner>,
}

impl KvmVm {
    /// Whether the in-kernel irqchip and PIT exist.
    pub fn has_irqchip(&self) -> bool {
        self.inner.irqchip
    }

    /// Create a vCPU with the concrete type.
    pub fn create_kvm_vcpu(&self, id: u32) -> Result<KvmVcpu> {
        let inner = &self.inner;
        if id >= inner.vcpus {
            return Err(HvError::InvalidState(format!(
                "vCPU id {id} is out of range: the VM was created with {} vCPUs",
                inner.vcpus
            )));
        }
        {
            let mut created = inner.created.lock().unwrap_or_else(|p| p.into_inner());
            if !created.insert(id) {
                return Err(HvError::InvalidState(format!("vCPU {id} already exists")));
            }
        }
        let cpuid = cpuid::translate(&inner.cpuid, &inner.supported_cpuid, id);
        for d in &cpuid.dropped {
            tracing::debug!(
                "kvm: CPUID {:#x}.{} {:?} bits {:#x} not supported by the host, hidden",
                d.function,
                d.index,
                d.reg,
                d.mask
            );
        }
        let result = KvmVcpu::new(id, inner.clone(), &cpuid.entries);
        if result.is_err() {
            inner
                .created
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
        }
        result
    }
}

impl Vm for KvmVm {
    fn backend(&self) -> BackendKind {
        BackendKind::Kvm
    }

    fn vm_type(&self) -> VmType {
        VmType::Plain
    }

    fn memory(&self) -> &GuestMemory {
        &self.inner.memory
    }

    fn create_vcpu(&self, id: u32) -> Result<Box<dyn Vcpu>> {
        Ok(Box::new(self.create_kvm_vcpu(id)?))
    }

    fn take_dirty_log(&self) -> Result<DirtyBitmap> {
        let m = &self.inner.memory;
        let words = self
            .inner
            .fd
            .get_dirty_log(RAM_SLOT, m.size() as usize)
            .map_err(kvm_err("KVM_GET_DIRTY_LOG"))?;
        let mut bitmap = DirtyBitmap::from_words(m.pages(), words);
        bitmap.union(&m.take_dirty());
        Ok(bitmap)
    }

    fn set_irq_line(&self, irq: u32, level: bool) -> Result<()> {
        if !self.inner.irqchip {
            return Err(HvError::Unsupported {
                backend: BackendKind::Kvm,
                what: "interrupt lines on a VM without the in-kernel irqchip (KvmOptions { \
                       irqchip: false }): deliver interrupts with Vcpu::queue_interrupt"
                    .into(),
            });
        }
        self.inner
            .fd
            .set_irq_line(irq, level)
            .map_err(kvm_err("KVM_IRQ_LINE"))
    }
}
