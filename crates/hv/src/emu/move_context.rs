//! The emu backend's side of the same-host move of an SEV-ES guest (KVM's
//! `KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM`; the move itself and its rules are in
//! [`crate::sev::moving`], reached through [`SevVm::move_enc_context_from`]).
//!
//! - [`EmuVm::new_sharing_memory`] creates the destination over the source's guest RAM: the
//!   same [`GuestMemory`](crate::GuestMemory) and the same `PhysMemory` (the CPU model's view,
//!   which with SEV holds the private backing and page states, i.e. "DRAM encrypted with the
//!   guest's key"), as userspace maps the same memory into a second KVM VM. Such a VM holds
//!   no guest of its own: its vCPUs refuse to run, and it has no dirty log and refuses
//!   LAUNCH_START, until a context moves into it.
//! - The vCPU hooks: a source vCPU hands over the VMSA as the CPU model saved it plus the
//!   host-visible state outside it (APIC base, TSC, GHCB MSR), the hypervisor's SEV-ES state
//!   and any GHCB request in flight with the VMM's answer; a destination vCPU loads it (and
//!   can be put back); after the commit the source vCPU is reset and keeps nothing.
//!
//! Ownership: all VMs over one memory keep it alive (the `PhysMemory` holds the
//! `GuestMemory`); the code-invalidation write hook of the `GuestMemory` stays armed until
//! the last of them is dropped (a per-memory count, `VmMoves::release_memory`).

use std::sync::{Arc, Mutex, OnceLock};

use esvm_cpu::Cpu;

use super::{Awaiting, EmuVcpu, EmuVm};
use crate::sev::moving::{dead_message, MoveProbe, SevVcpuMove, SevVcpuUndo, VmMoves};
use crate::sev::SevVcpuState;
use crate::{BackendKind, HvError, Result, VmConfig};

#[cfg(doc)]
use crate::sev::SevVm;

impl EmuVcpu {
    /// `run`: refused on a dead VM and on one waiting for a moved context.
    pub(crate) fn check_runnable(&self) -> Result<()> {
        match &self.moves {
            Some(f) => f.check_runnable(),
            None => Ok(()),
        }
    }

    /// The vCPU's SEV commands: refused once its VM is dead.
    pub(crate) fn check_sev_alive(&self) -> Result<()> {
        match &self.moves {
            Some(f) => f.check_sev_alive(),
            None => Ok(()),
        }
    }

    pub(super) fn move_probe_impl(&self) -> MoveProbe {
        MoveProbe {
            id: self.id,
            owner: self.moves.clone(),
            protected: self.sev.as_ref().is_some_and(|s| s.protected),
            mid_exit: self.awaiting != Awaiting::Nothing,
            fresh: self
                .sev
                .as_ref()
                .is_some_and(|s| !s.protected && s.in_flight.is_none() && s.outbox.is_empty())
                && self.awaiting == Awaiting::Nothing
                && self.ghcb_read.is_none(),
        }
    }

    /// A copy of this protected vCPU's whole state (the move checked that it is protected
    /// and not in the middle of an exit).
    pub(super) fn move_export_impl(&self) -> Result<SevVcpuMove> {
        let state = self.sev.clone().ok_or_else(|| {
            HvError::Sev(format!(
                "move encryption context: vCPU {} is not an SEV-ES vCPU",
                self.id
            ))
        })?;
        Ok(SevVcpuMove {
            vmsa: self.cpu.to_vmsa(),
            apic_base: self.cpu.sregs().apic_base,
            tsc: self.cpu.tsc(),
            ghcb_msr: self.cpu.ghcb_msr(),
            state,
            ghcb_read: self.ghcb_read.clone(),
            exit_data: self.data,
            exit_msr: (self.msr_value, self.msr_fault),
        })
    }

    /// Become the moved vCPU: load the VMSA (what the CPU model loads at VMRUN) and the
    /// host-visible state outside it, take the hypervisor's SEV-ES state. On error nothing
    /// changed.
    pub(super) fn move_import_impl(&mut self, m: SevVcpuMove) -> Result<SevVcpuUndo> {
        let before = Box::new(self.cpu.snapshot());
        let loaded = self
            .cpu
            .set_msr(esvm_arch::msr::IA32_APIC_BASE, m.apic_base)
            .and_then(|_| self.cpu.load_vmsa(&m.vmsa));
        self.cpu.set_tsc(m.tsc);
        self.cpu.set_ghcb_msr(m.ghcb_msr);
        let problem = match loaded {
            Err(source) => Some(HvError::MoveVmsa {
                vcpu: self.id,
                source,
            }),
            Ok(()) if self.cpu.to_vmsa().as_bytes() != m.vmsa.as_bytes() => {
                Some(HvError::Internal {
                    backend: BackendKind::Emu,
                    message: format!(
                        "move encryption context: vCPU {}'s VMSA did not load unchanged",
                        self.id
                    ),
                })
            }
            Ok(()) => None,
        };
        if let Some(e) = problem {
            let _ = self.cpu.restore(&before);
            self.cpu.set_ghcb_msr(0);
            return Err(e);
        }
        let state = self.sev.replace(m.state);
        self.ghcb_read = m.ghcb_read;
        self.data = m.exit_data;
        (self.msr_value, self.msr_fault) = m.exit_msr;
        self.awaiting = Awaiting::Nothing;
        Ok(SevVcpuUndo { before, state })
    }

    /// Put back what [`Self::move_import_impl`] changed.
    pub(super) fn move_undo_impl(&mut self, undo: SevVcpuUndo) {
        let _ = self.cpu.restore(&undo.before);
        self.cpu.set_ghcb_msr(0);
        self.sev = undo.state;
        self.ghcb_read = None;
        self.data = [0; 16];
        self.msr_value = 0;
        self.msr_fault = false;
    }

    /// After the commit, on the source: a fresh, unprotected SEV-ES state and a CPU in
    /// RESET; nothing of the guest stays.
    pub(super) fn move_scrub_impl(&mut self) {
        if self.sev.is_some() {
            self.sev = Some(Box::new(SevVcpuState::new()));
        }
        self.ghcb_read = None;
        self.data = [0; 16];
        self.cpuid_result = [0; 4];
        self.msr_value = 0;
        self.msr_fault = false;
        self.awaiting = Awaiting::Nothing;
        self.cpu = Cpu::new(self.cpu_config.clone(), self.cpu.memory().clone());
    }
}

impl EmuVm {
    /// A VM over `src`'s guest memory (the same RAM, dirty bitmap and encryption state), to
    /// receive `src`'s SEV-ES guest with [`SevVm::move_enc_context_from`] — the emu
    /// equivalent of mapping the same memory into a second KVM VM. `config.mem_size` must be
    /// `src`'s memory size. Until a context moves in, the new VM's vCPUs cannot run, it has
    /// no dirty log and it refuses LAUNCH_START.
    pub fn new_sharing_memory(config: &VmConfig, src: &EmuVm) -> Result<EmuVm> {
        if config.vcpus == 0 {
            return Err(HvError::InvalidState("a VM needs at least one vCPU".into()));
        }
        if config.mem_size != src.memory.size() {
            return Err(HvError::InvalidState(format!(
                "a VM sharing another VM's memory must have its size: {:#x} bytes requested, \
                 the other VM has {:#x}",
                config.mem_size,
                src.memory.size()
            )));
        }
        if src.moves.is_dead() {
            return Err(HvError::InvalidState(format!(
                "{} (create the new VM over the memory of the VM that holds the guest now)",
                dead_message()
            )));
        }
        Ok(EmuVm {
            config: config.clone(),
            memory: src.memory.clone(),
            phys: src.phys.clone(),
            created: Mutex::new(Vec::new()),
            sev: Arc::new(OnceLock::new()),
            hook_slot: src.hook_slot.clone(),
            moves: VmMoves::sharing(&src.moves),
            // The moved vCPUs' TSCs come with their state; reads start from them.
            tsc_mark: Arc::default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Vm;

    /// The memory's write hook stays armed while any VM over the memory lives, whichever is
    /// dropped first, and guest RAM is freed with the last one (no reference cycle).
    #[test]
    fn shared_memory_lives_until_the_last_vm() {
        for drop_source_first in [true, false] {
            let a = EmuVm::new(&VmConfig::plain(1 << 20, 1)).unwrap();
            let b = EmuVm::new_sharing_memory(&VmConfig::plain(1 << 20, 1), &a).unwrap();
            let weak = Arc::downgrade(&a.memory);
            let slot = a.hook_slot.clone();
            let (first, second) = if drop_source_first { (a, b) } else { (b, a) };
            drop(first);
            assert!(slot.lock().unwrap().is_some(), "hook disarmed too early");
            second.memory().write(0x1000, &[1]).unwrap();
            drop(second);
            assert!(slot.lock().unwrap().is_none(), "hook still armed");
            drop(slot);
            assert!(weak.upgrade().is_none(), "guest memory leaked");
        }
    }

    #[test]
    fn sharing_needs_the_same_size_and_a_live_source() {
        let a = EmuVm::new(&VmConfig::plain(1 << 20, 1)).unwrap();
        let e = EmuVm::new_sharing_memory(&VmConfig::plain(2 << 20, 1), &a)
            .err()
            .unwrap();
        assert!(e.to_string().contains("size"), "{e}");
        a.moves.kill_for_test();
        let e = EmuVm::new_sharing_memory(&VmConfig::plain(1 << 20, 1), &a)
            .err()
            .unwrap();
        assert!(e.to_string().contains("dead"), "{e}");
    }

    /// A VM waiting for a context neither runs nor hands out the memory's dirty log.
    #[test]
    fn a_waiting_vm_cannot_run() {
        let a = EmuVm::new(&VmConfig::plain(1 << 20, 1)).unwrap();
        let b = EmuVm::new_sharing_memory(&VmConfig::plain(1 << 20, 1), &a).unwrap();
        let mut v = b.create_vcpu(0).unwrap();
        let e = v.run().err().unwrap().to_string();
        assert!(e.contains("new_sharing_memory"), "{e}");
        assert!(b.take_dirty_log().is_err());
        a.memory().write(0x2000, &[1]).unwrap();
        assert!(a.take_dirty_log().unwrap().is_set(2));
    }
}
