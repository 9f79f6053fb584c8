//! SEV-ES in the hypervisor layer.
//!
//! - [`SevVm`] and [`SevVcpu`]: SEV-ES as an extension of the generic [`Vm`](crate::Vm) and
//!   [`Vcpu`](crate::Vcpu) traits, reached through [`Vm::sev`](crate::Vm::sev) and
//!   [`Vcpu::sev_mut`](crate::Vcpu::sev_mut) (`ext`);
//! - [`Launcher`]: the launch as a type-state sequence (`launch`);
//! - the types a guest travels as: [`SevSessionStart`], [`PagePacket`], [`SevVcpuTransfer`],
//!   [`SevHostVcpuState`], [`SevHostVmState`] (`transfer`);
//! - the same-host move of the encryption context (`moving`);
//! - below, the hypervisor's SEV-ES state and services the emu backend runs them on: the
//!   guest context, the tracked registers, and the GHCB protocol between the guest and the
//!   VMM.
//!
//! Trust boundary: this module is host code. It holds the guest's memory-key handle only to
//! pass it from the firmware to the CPU model (as hardware wires the PSP to the memory
//! controller) and reads guest state only through what the "hardware" exposes to a
//! hypervisor: exits, the GHCB MSR, shared pages, the encrypted VMSA, and write-trap values.

mod ext;
mod launch;
pub mod moving;
pub mod transfer;

pub use ext::{LaunchToken, SevVcpu, SevVm};
pub use launch::{Launched, Launcher, Measured, New, Started};
pub use transfer::{
    ghcb_gpa_of, PagePacket, SevHostVcpuState, SevHostVmState, SevSessionStart, SevVcpuTransfer,
    PRIVATE_PACKET_LEN, SEV_TRANSFER_VERSION, SHARED_PACKET_LEN,
};

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use esvm_abi::sev::{CPUID_SEV_EAX_SEV, CPUID_SEV_EAX_SEV_ES, CPUID_SEV_LEAF};
use esvm_arch::bits::{cr0, rflags};
use esvm_arch::cpuid::CpuidTable;
use esvm_cpu::{PageCipher, PhysMemory};
use esvm_psp::{GuestMemoryAccess, MemoryAccessError, MemoryKey, Psp};

use crate::ghcb::{
    self, CpuidRequest, GhcbConfig, GhcbServices, GhcbState, GhcbVmState, IoSize, ServiceError,
    VmmcallRegs,
};
use crate::HvError;

pub use esvm_psp::TrackedRegisters;

/// C-bit position of esvm's SEV-ES model (CPUID 0x8000_001F EBX[5:0]), the guest ABI's.
pub const C_BIT: u8 = esvm_abi::sev::C_BIT_POSITION;

/// The events this hypervisor intercepts from an SEV-ES guest (its VMCB intercept set):
/// KVM's defaults, so a guest sees what it would see on KVM — RDTSC and RDTSCP run in the
/// guest without a #VC, INVD, WBINVD and DR7 accesses come to the hypervisor.
pub const VC_INTERCEPTS: esvm_cpu::VcIntercepts = esvm_cpu::VcIntercepts::KVM_SEV_ES;

/// The error-code decision of exception injection, as KVM makes it: an exception delivers its
/// error code only if the vCPU is in protected mode — judged from the CR0 the hypervisor
/// *knows*. For a protected vCPU that is the tracked CR0, refreshed by CR0 write traps; a
/// stale value (PE clear although the guest is in long mode) would drop the error code and
/// corrupt the guest's exception frame.
pub fn injected_error_code(known_cr0: u64, error_code: Option<u32>) -> Option<u32> {
    error_code.filter(|_| known_cr0 & cr0::PE != 0)
}

/// Whether the local APIC would accept an interrupt of `vector` given the task priority
/// (CR8 = TPR[7:4]): the vector's priority class must be above the TPR.
pub fn tpr_accepts(known_cr8: u64, vector: u8) -> bool {
    u64::from(vector >> 4) > (known_cr8 & 0xf)
}

/// The memory key as the CPU model's memory controller uses it.
pub(crate) struct MemoryController(pub Arc<MemoryKey>);

impl PageCipher for MemoryController {
    fn encrypt_page(&self, gpa: u64, page: &mut [u8; 4096]) {
        self.0.encrypt_in_place(gpa, page);
    }
    fn decrypt_page(&self, gpa: u64, page: &mut [u8; 4096]) {
        self.0.decrypt_in_place(gpa, page);
    }
}

/// The firmware's trusted path into guest memory: the private (plaintext) view.
pub(crate) struct PrivateView(pub PhysMemory);

impl GuestMemoryAccess for PrivateView {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> std::result::Result<(), MemoryAccessError> {
        self.0
            .read_private(gpa, buf)
            .map_err(|_| MemoryAccessError::OutOfRange {
                gpa,
                len: buf.len() as u64,
            })
    }
    fn write(&self, gpa: u64, buf: &[u8]) -> std::result::Result<(), MemoryAccessError> {
        self.0
            .write_private(gpa, buf)
            .map_err(|_| MemoryAccessError::OutOfRange {
                gpa,
                len: buf.len() as u64,
            })
    }
}

/// The VM-wide SEV-ES state of a VM: its guest context in the secure processor (shared by
/// the VMs a same-host move passed it through) and the hypervisor's GHCB bookkeeping.
pub struct SevGuestContext {
    pub(crate) psp: Arc<Mutex<Psp>>,
    pub(crate) handle: u32,
    pub(crate) ghcb_vm: Mutex<GhcbVmState>,
    /// The send session's packet maker, between SEND_START and SEND_FINISH/CANCEL.
    pub(crate) send_worker: Mutex<Option<esvm_psp::SendWorker>>,
    /// The receive session's packet checker, between RECEIVE_START and RECEIVE_FINISH.
    pub(crate) recv_worker: Mutex<Option<esvm_psp::ReceiveWorker>>,
}

impl SevGuestContext {
    pub(crate) fn new(psp: Arc<Mutex<Psp>>, handle: u32) -> Self {
        SevGuestContext {
            psp,
            handle,
            ghcb_vm: Default::default(),
            send_worker: Default::default(),
            recv_worker: Default::default(),
        }
    }

    pub fn handle(&self) -> u32 {
        self.handle
    }
    pub fn psp(&self) -> MutexGuard<'_, Psp> {
        self.psp.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for SevGuestContext {
    /// The VM is gone: free its ASID and guest context in the firmware (as KVM does when an
    /// SEV VM is destroyed), so that a long-lived platform does not run out of either.
    fn drop(&mut self) {
        let mut p = self.psp();
        let _ = p.deactivate(self.handle);
        let _ = p.decommission(self.handle);
    }
}

/// ACTIVATE a new guest context with the lowest ASID no other guest of the platform uses
/// (KVM allocates ASIDs from its pool the same way).
pub(crate) fn activate_free_asid(p: &mut Psp, handle: u32) -> std::result::Result<u32, HvError> {
    let used: Vec<u32> = p
        .guest_handles()
        .into_iter()
        .filter_map(|h| p.guest_status(h).ok().map(|s| s.asid))
        .collect();
    let asid = (1..=esvm_psp::MAX_ASID)
        .find(|a| !used.contains(a))
        .ok_or_else(|| {
            HvError::Sev(format!(
                "all {} ASIDs of the platform are in use; stop another SEV-ES guest first",
                esvm_psp::MAX_ASID
            ))
        })?;
    p.activate(handle, asid).map_err(psp_err)?;
    Ok(asid)
}

pub(crate) fn psp_err(e: esvm_psp::PspError) -> HvError {
    HvError::Psp(e)
}

/// IA32_TSC_DEADLINE: forwarded to the VMM's local APIC when CPUID offers the TSC-deadline
/// timer (leaf 1 ECX bit 24).
pub const MSR_TSC_DEADLINE: u32 = 0x6e0;
/// The x2APIC registers as MSRs: forwarded to the VMM's local APIC when CPUID offers x2APIC
/// (leaf 1 ECX bit 21).
pub const MSR_X2APIC: std::ops::RangeInclusive<u32> = 0x800..=0x8ff;
/// IA32_APIC_BASE bit 11: the local APIC is enabled.
const APIC_BASE_EN: u64 = 1 << 11;
/// IA32_APIC_BASE bit 10: x2APIC mode.
const APIC_BASE_EXTD: u64 = 1 << 10;
/// CPUID leaf 1 ECX: x2APIC.
const CPUID_1_ECX_X2APIC: u32 = 1 << 21;
/// CPUID leaf 1 ECX: TSC-deadline timer.
const CPUID_1_ECX_TSC_DEADLINE: u32 = 1 << 24;

/// Whether RDMSR/WRMSR of `index` goes to the VMM (its local APIC) for a guest whose CPUID
/// is `cpuid`: IA32_TSC_DEADLINE and the x2APIC range, each only if CPUID offers the feature
/// (otherwise the MSR does not exist and the guest gets #GP, as on hardware without it).
pub fn msr_forwarded_to_vmm(cpuid: &CpuidTable, index: u32) -> bool {
    let ecx = cpuid.lookup(1, 0)[2];
    (index == MSR_TSC_DEADLINE && ecx & CPUID_1_ECX_TSC_DEADLINE != 0)
        || (MSR_X2APIC.contains(&index) && ecx & CPUID_1_ECX_X2APIC != 0)
}

/// One I/O the VMM must perform for a GHCB request.
///
/// Reads (`IoIn`, `MmioRead`, `RdMsr`) and MSR writes block the request until the VMM
/// answered (the answer decides the guest's result: a value, or #GP for a refused MSR
/// access); port and MMIO writes, and the notice of a completed IA32_APIC_BASE write (the
/// hypervisor tracks that register; the VMM's local APIC follows it), go to the VMM after
/// the request completed, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum VmmIo {
    IoIn { port: u16, size: usize },
    IoOut { port: u16, size: usize, value: u32 },
    MmioRead { gpa: u64, len: usize },
    MmioWrite { gpa: u64, data: Vec<u8> },
    RdMsr { index: u32 },
    WrMsr { index: u32, value: u64 },
}

/// The answer the VMM gave to a [`VmmIo`] read.
#[derive(Debug, Clone)]
pub(crate) enum VmmAnswer {
    Value(u32),
    Bytes(Vec<u8>),
    /// An RDMSR's value; None: the VMM refused it (#GP).
    MsrRead(Option<u64>),
    /// Whether the VMM took a WRMSR (false: #GP).
    MsrWritten(bool),
    Done,
}

/// Per-vCPU SEV-ES state kept by the hypervisor.
#[derive(Clone)]
pub(crate) struct SevVcpuState {
    pub protected: bool,
    pub tracked: TrackedRegisters,
    /// The MTRRs the hypervisor emulates (not in the VMSA; guest accesses are #VC events).
    pub mtrr: esvm_arch::msr::MtrrState,
    /// An NMI was delivered and the guest has not sent NMI_COMPLETE yet.
    pub nmi_blocked: bool,
    /// An NMI injected while blocked, delivered at the NMI_COMPLETE.
    pub nmi_pending: bool,
    pub ghcb: GhcbState,
    /// The GHCB MSR value of the VMGEXIT being handled, if its handling waits on the VMM.
    pub in_flight: Option<u64>,
    /// Answers the VMM gave so far for the in-flight VMGEXIT, in order.
    pub answers: Vec<VmmAnswer>,
    /// Writes (port/MMIO) of a completed VMGEXIT still to be shown to the VMM.
    pub outbox: VecDeque<VmmIo>,
    /// The VMGEXITs this vCPU completed here, by request ([`SevVcpu::vmgexits`]).
    pub vmgexits: ghcb::VmgexitCounts,
}

impl SevVcpuState {
    pub fn new() -> Self {
        SevVcpuState {
            protected: false,
            mtrr: Default::default(),
            nmi_blocked: false,
            nmi_pending: false,
            tracked: TrackedRegisters {
                cr0: 0,
                cr4: 0,
                efer: 0,
                cr8: 0,
                apic_base: esvm_arch::msr::APIC_BASE_DEFAULT_BSP,
            },
            ghcb: GhcbState::new(GhcbConfig {
                cbit_position: C_BIT,
                ..GhcbConfig::default()
            }),
            in_flight: None,
            answers: Vec::new(),
            outbox: VecDeque::new(),
            vmgexits: ghcb::VmgexitCounts::default(),
        }
    }
}

/// The hypervisor's services to one GHCB request: answered at once where the hypervisor
/// itself knows the answer (CPUID, MSRs it emulates, TSC), and for device I/O by replay —
/// the request is handled again from the start once the VMM has answered the read it was
/// blocked on. Nothing is written to guest memory until an attempt completes.
pub(crate) struct ReplayServices<'a> {
    pub phys: &'a PhysMemory,
    pub cpuid: &'a CpuidTable,
    pub tsc: u64,
    pub vcpu_id: u32,
    pub tracked: &'a mut TrackedRegisters,
    pub mtrr: &'a mut esvm_arch::msr::MtrrState,
    pub vm: &'a SevGuestContext,
    pub answers: &'a [VmmAnswer],
    pub next_answer: usize,
    pub blocked_on: Option<VmmIo>,
    pub writes: Vec<VmmIo>,
    pub shared_writes: Vec<(u64, Vec<u8>)>,
}

impl ReplayServices<'_> {
    fn blocked() -> ServiceError {
        ServiceError::refused("waiting for the VMM (replayed once answered)")
    }

    fn take_answer(&mut self, req: VmmIo) -> std::result::Result<VmmAnswer, ServiceError> {
        if let Some(a) = self.answers.get(self.next_answer) {
            self.next_answer += 1;
            return Ok(a.clone());
        }
        if self.blocked_on.is_none() {
            self.blocked_on = Some(req);
        }
        Err(Self::blocked())
    }

    fn private(&self, gpa: u64, len: usize) -> bool {
        let first = gpa / 4096;
        let last = (gpa + len.max(1) as u64 - 1) / 4096;
        (first..=last).any(|p| self.phys.is_private(p))
    }
}

impl GhcbServices for ReplayServices<'_> {
    fn cpuid(&mut self, r: CpuidRequest) -> std::result::Result<[u32; 4], ServiceError> {
        let mut v = self.cpuid.lookup(r.function, r.index);
        match r.function {
            1 => {
                v[1] = (v[1] & 0x00ff_ffff) | (self.vcpu_id << 24);
                // OSXSAVE mirrors the guest's CR4 as the hypervisor tracks it.
                if self.tracked.cr4 & esvm_arch::bits::cr4::OSXSAVE != 0 {
                    v[2] |= 1 << 27;
                }
            }
            CPUID_SEV_LEAF => {
                // SEV and SEV-ES; C-bit position; physical-address bits lost (EBX[11:6]; the
                // CPU model's reserved-bit checks follow it).
                v = [
                    CPUID_SEV_EAX_SEV | CPUID_SEV_EAX_SEV_ES,
                    u32::from(C_BIT) | (esvm_cpu::SEV_PHYS_ADDR_REDUCTION << 6),
                    1,
                    0,
                ];
            }
            _ => {}
        }
        Ok(v)
    }
    fn io_in(&mut self, port: u16, size: IoSize) -> std::result::Result<u32, ServiceError> {
        match self.take_answer(VmmIo::IoIn {
            port,
            size: size.bytes(),
        })? {
            VmmAnswer::Value(v) => Ok(v & size.mask()),
            _ => Err(ServiceError::refused(
                "replay mismatch: expected a port value",
            )),
        }
    }
    fn io_out(
        &mut self,
        port: u16,
        size: IoSize,
        value: u32,
    ) -> std::result::Result<(), ServiceError> {
        self.writes.push(VmmIo::IoOut {
            port,
            size: size.bytes(),
            value: value & size.mask(),
        });
        Ok(())
    }
    fn mmio_read(&mut self, gpa: u64, data: &mut [u8]) -> std::result::Result<(), ServiceError> {
        match self.take_answer(VmmIo::MmioRead {
            gpa,
            len: data.len(),
        })? {
            VmmAnswer::Bytes(b) if b.len() == data.len() => {
                data.copy_from_slice(&b);
                Ok(())
            }
            _ => Err(ServiceError::refused("replay mismatch: expected MMIO data")),
        }
    }
    fn mmio_write(&mut self, gpa: u64, data: &[u8]) -> std::result::Result<(), ServiceError> {
        self.writes.push(VmmIo::MmioWrite {
            gpa,
            data: data.to_vec(),
        });
        Ok(())
    }
    /// The MSRs outside the VMSA, emulated as KVM emulates them for an SEV-ES guest: APIC
    /// base, TSC, the MTRRs, and the stateless AMD ones ([`esvm_arch::msr::kvm_style_read`]);
    /// any other MSR is a #GP, which the guest's #VC handler forwards.
    fn rdmsr(&mut self, index: u32) -> std::result::Result<u64, ServiceError> {
        if let Some(v) = esvm_arch::msr::kvm_style_read(index).or_else(|| self.mtrr.get(index)) {
            return Ok(v);
        }
        if msr_forwarded_to_vmm(self.cpuid, index) {
            return match self.take_answer(VmmIo::RdMsr { index })? {
                VmmAnswer::MsrRead(Some(v)) => Ok(v),
                VmmAnswer::MsrRead(None) => Err(ServiceError::GeneralProtection),
                _ => Err(ServiceError::refused(
                    "replay mismatch: expected an MSR value",
                )),
            };
        }
        match index {
            esvm_arch::msr::IA32_APIC_BASE => Ok(self.tracked.apic_base),
            esvm_arch::msr::IA32_TIME_STAMP_COUNTER => Ok(self.tsc),
            _ => Err(ServiceError::GeneralProtection),
        }
    }
    fn wrmsr(&mut self, index: u32, value: u64) -> std::result::Result<(), ServiceError> {
        match esvm_arch::msr::kvm_style_write(index, value) {
            Some(true) => return Ok(()),
            Some(false) => return Err(ServiceError::GeneralProtection),
            None => {}
        }
        // Physical addresses of an SEV guest lose the C-bit's bits (CPUID 0x8000001F).
        let phys_bits = 48 - esvm_cpu::SEV_PHYS_ADDR_REDUCTION;
        match self.mtrr.set(index, value, phys_bits) {
            Ok(true) => return Ok(()),
            Err(()) => return Err(ServiceError::GeneralProtection),
            Ok(false) => {}
        }
        if msr_forwarded_to_vmm(self.cpuid, index) {
            return match self.take_answer(VmmIo::WrMsr { index, value })? {
                VmmAnswer::MsrWritten(true) => Ok(()),
                VmmAnswer::MsrWritten(false) => Err(ServiceError::GeneralProtection),
                _ => Err(ServiceError::refused(
                    "replay mismatch: expected an MSR write's result",
                )),
            };
        }
        match index {
            esvm_arch::msr::IA32_APIC_BASE => {
                let x2apic_offered = self.cpuid.lookup(1, 0)[2] & CPUID_1_ECX_X2APIC != 0;
                if !apic_base_transition_valid(self.tracked.apic_base, value, x2apic_offered) {
                    return Err(ServiceError::GeneralProtection);
                }
                // A tracked value: it changes here, in the GHCB exchange; the VMM's local
                // APIC learns it once the request completed.
                self.tracked.apic_base = value;
                self.writes.push(VmmIo::WrMsr { index, value });
                Ok(())
            }
            _ => Err(ServiceError::GeneralProtection),
        }
    }
    fn vmmcall(&mut self, regs: &mut VmmcallRegs) -> std::result::Result<(), ServiceError> {
        // esvm offers no hypercalls; answer like KVM does for an unknown one (-KVM_ENOSYS).
        regs.rax = (-1000i64) as u64;
        Ok(())
    }
    fn tsc(&mut self) -> std::result::Result<u64, ServiceError> {
        Ok(self.tsc)
    }
    fn tsc_aux(&mut self) -> std::result::Result<u32, ServiceError> {
        Ok(self.vcpu_id)
    }
    fn ap_jump_table(&mut self) -> std::result::Result<u64, ServiceError> {
        Ok(self
            .vm
            .ghcb_vm
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .ap_jump_table)
    }
    fn set_ap_jump_table(&mut self, gpa: u64) -> std::result::Result<(), ServiceError> {
        self.vm
            .ghcb_vm
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .ap_jump_table = gpa;
        Ok(())
    }
    fn read_shared(&mut self, gpa: u64, buf: &mut [u8]) -> std::result::Result<(), ServiceError> {
        if self.private(gpa, buf.len()) {
            return Err(ServiceError::refused(format!(
                "guest memory at {gpa:#x} is private (C-bit set); the GHCB and scratch areas must be shared"
            )));
        }
        self.phys
            .read_host(gpa, buf)
            .map_err(|e| ServiceError::refused(e.to_string()))?;
        // A write of this attempt to the same bytes must be seen by later reads.
        for (wgpa, data) in &self.shared_writes {
            overlay(gpa, buf, *wgpa, data);
        }
        Ok(())
    }
    fn write_shared(&mut self, gpa: u64, data: &[u8]) -> std::result::Result<(), ServiceError> {
        if self.private(gpa, data.len()) {
            return Err(ServiceError::refused(format!(
                "guest memory at {gpa:#x} is private (C-bit set); refusing to write it"
            )));
        }
        if gpa
            .checked_add(data.len() as u64)
            .is_none_or(|e| e > self.phys.size())
        {
            return Err(ServiceError::refused(format!(
                "shared range {gpa:#x}+{:#x} is outside guest RAM",
                data.len()
            )));
        }
        self.shared_writes.push((gpa, data.to_vec()));
        Ok(())
    }
}

/// Whether IA32_APIC_BASE may go from `old` to `new` (else #GP), by the architectural
/// rules of the enable (EN) and x2APIC (EXTD) bits: x2APIC mode needs CPUID's x2APIC and
/// the APIC enabled; x2APIC mode is left only by disabling the APIC (not straight to xAPIC).
fn apic_base_transition_valid(old: u64, new: u64, x2apic_offered: bool) -> bool {
    let extd = new & APIC_BASE_EXTD != 0;
    let en = new & APIC_BASE_EN != 0;
    if extd && (!x2apic_offered || !en) {
        return false;
    }
    let was_x2apic = old & APIC_BASE_EXTD != 0;
    !(was_x2apic && en && !extd)
}

/// Copy the part of `(wgpa, data)` that overlaps `[gpa, gpa+buf.len())` into `buf`.
fn overlay(gpa: u64, buf: &mut [u8], wgpa: u64, data: &[u8]) {
    let start = gpa.max(wgpa);
    let end = (gpa + buf.len() as u64).min(wgpa + data.len() as u64);
    if start < end {
        let n = (end - start) as usize;
        buf[(start - gpa) as usize..(start - gpa) as usize + n]
            .copy_from_slice(&data[(start - wgpa) as usize..(start - wgpa) as usize + n]);
    }
}

/// What one attempt at a VMGEXIT produced.
pub(crate) enum Attempt {
    /// Blocked on a VMM read; nothing was changed.
    Blocked(VmmIo),
    /// Completed: apply the outcome (of a request of this kind).
    Done(
        ghcb::VmgexitKind,
        ghcb::VmgexitOutcome,
        Vec<VmmIo>,
        Vec<(u64, Vec<u8>)>,
    ),
}

/// Handle the in-flight VMGEXIT once (from the start, replaying the VMM's answers).
pub(crate) fn attempt(
    ghcb_msr: u64,
    state: &mut GhcbState,
    services: &mut ReplayServices<'_>,
) -> Attempt {
    let saved = state.clone();
    let (kind, outcome) = ghcb::handle_vmgexit_of_kind(ghcb_msr, services, state);
    if let Some(req) = services.blocked_on.take() {
        *state = saved;
        return Attempt::Blocked(req);
    }
    Attempt::Done(
        kind,
        outcome,
        std::mem::take(&mut services.writes),
        std::mem::take(&mut services.shared_writes),
    )
}

/// Whether interrupts are architecturally enabled according to an RFLAGS value.
pub fn interrupts_enabled(rflags_value: u64) -> bool {
    rflags_value & rflags::IF != 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use esvm_arch::bits::{cr0, efer};

    /// The bug class from the SEV-ES review thread: a #PF injected while the hypervisor's idea
    /// of CR0 is stale (PE clear, as at reset) loses its error code, although the guest runs
    /// in long mode; with CR0 refreshed by write traps it keeps it.
    #[test]
    fn stale_tracked_cr0_would_drop_the_error_code() {
        let reset_cr0 = cr0::ET | cr0::CD | cr0::NW;
        let long_mode_cr0 = cr0::PE | cr0::PG | cr0::ET | cr0::NE | cr0::WP;
        assert_eq!(injected_error_code(reset_cr0, Some(6)), None);
        assert_eq!(injected_error_code(long_mode_cr0, Some(6)), Some(6));
        assert_eq!(injected_error_code(long_mode_cr0, None), None);
        let _ = efer::LMA;
    }

    #[test]
    fn tpr_masks_lower_priority_classes() {
        assert!(tpr_accepts(0, 0x20));
        assert!(!tpr_accepts(2, 0x20));
        assert!(!tpr_accepts(2, 0x2f));
        assert!(tpr_accepts(2, 0x30));
        assert!(!tpr_accepts(15, 0xff));
    }

    /// x2APIC mode only where CPUID offers it and with the APIC enabled; out of it only
    /// through the disabled state (SDM "x2APIC state transitions").
    #[test]
    fn apic_base_transitions_follow_the_architecture() {
        let xapic = esvm_arch::msr::APIC_BASE_DEFAULT_BSP;
        let x2apic = xapic | APIC_BASE_EXTD;
        let disabled = xapic & !APIC_BASE_EN;
        assert!(apic_base_transition_valid(xapic, x2apic, true));
        assert!(
            !apic_base_transition_valid(xapic, x2apic, false),
            "not offered"
        );
        assert!(!apic_base_transition_valid(
            disabled,
            disabled | APIC_BASE_EXTD,
            true
        ));
        assert!(
            !apic_base_transition_valid(x2apic, xapic, true),
            "x2APIC -> xAPIC"
        );
        assert!(apic_base_transition_valid(x2apic, disabled, true));
        assert!(apic_base_transition_valid(disabled, xapic, true));
        assert!(apic_base_transition_valid(x2apic, x2apic, true));
        assert!(apic_base_transition_valid(xapic, disabled, false));
    }

    /// IA32_TSC_DEADLINE and the x2APIC range go to the VMM only where CPUID offers the
    /// feature; otherwise the hypervisor answers #GP as for any MSR it does not know.
    #[test]
    fn apic_msrs_are_forwarded_only_when_cpuid_offers_them() {
        let none = CpuidTable::esvm_default();
        let both = none.clone().with_local_apic(true, true);
        let deadline_only = none.clone().with_local_apic(false, true);
        for i in [MSR_TSC_DEADLINE, 0x800, 0x80b, 0x8ff] {
            assert!(!msr_forwarded_to_vmm(&none, i), "{i:#x}");
            assert!(msr_forwarded_to_vmm(&both, i), "{i:#x}");
        }
        assert!(msr_forwarded_to_vmm(&deadline_only, MSR_TSC_DEADLINE));
        assert!(!msr_forwarded_to_vmm(&deadline_only, 0x830));
        for i in [0x6df, 0x6e1, 0x7ff, 0x900, esvm_arch::msr::IA32_APIC_BASE] {
            assert!(!msr_forwarded_to_vmm(&both, i), "{i:#x}");
        }
    }

    #[test]
    fn overlay_merges_pending_writes() {
        let mut buf = [0u8; 8];
        overlay(100, &mut buf, 104, &[1, 2, 3, 4, 5, 6]);
        assert_eq!(buf, [0, 0, 0, 0, 1, 2, 3, 4]);
        let mut buf = [0u8; 4];
        overlay(100, &mut buf, 90, &[9; 12]);
        assert_eq!(buf, [9, 9, 0, 0]);
        let mut buf = [7u8; 4];
        overlay(100, &mut buf, 200, &[1]);
        assert_eq!(buf, [7; 4]);
    }
}
