//! Same-host move of an SEV-ES guest from one emu VM to another: the analogue of KVM's
//! `KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM` ("intra-host migration", `sev_vm_move_enc_context_from`).
//!
//! On KVM, userspace maps the *same* guest memory into a second VM and asks that VM to take
//! over the first one's encryption context: firmware handle, ASID (so the memory key), and
//! each vCPU's encrypted VMSA and GHCB bookkeeping. Nothing is re-encrypted and the firmware
//! is not involved (no SEND/RECEIVE, no new key). The source VM is dead afterwards.
//!
//! The emu equivalent:
//! - [`EmuVm::new_sharing_memory`] creates the destination over the source's guest RAM: the
//!   same [`GuestMemory`](crate::GuestMemory) and the same `PhysMemory` (the CPU model's view,
//!   which with SEV holds the private backing and page states, i.e. "DRAM encrypted with the
//!   guest's key"). Such a VM holds no guest of its own: its vCPUs refuse to run, and it has
//!   no dirty log and refuses LAUNCH_START, until a context moves into it.
//! - [`EmuVm::sev_move_enc_context_from`] moves the context: the destination's context slot
//!   receives the source's guest context (the same firmware handle and memory key), each
//!   destination vCPU takes over the source vCPU with the same id (the VMSA as the CPU model
//!   saved it, the GHCB MSR, TSC and APIC base, the tracked registers, the GHCB protocol state
//!   and any GHCB request in flight, pending events), the source vCPUs are scrubbed (a reset
//!   CPU, no protected state) and the source VM is marked dead.
//!
//! Rules (KVM's, plus what the emu model needs):
//! - source and destination are different VMs, both of type SEV-ES;
//! - the source has a guest context; the destination has none and is not dead;
//! - the destination maps the source's guest memory (created by `new_sharing_memory`);
//! - every created vCPU of each VM is passed, the two VMs have the same vCPU ids, and every
//!   source vCPU is protected (went through LAUNCH_UPDATE_VMSA or RECEIVE_UPDATE_VMSA);
//! - neither VM is part of another move at the same time (that move's caller gets an error
//!   and may retry; nothing blocks).
//!
//! A refused move changes nothing. After a move the source is dead for good: its vCPUs'
//! `run` and every SEV command of the VM and of its vCPUs fail with an error saying so, its
//! dirty log is refused, and it can be neither the source nor the destination of a move.
//!
//! Locking: the vCPUs are passed as `&mut`, so none of them can be running (the borrow is
//! KVM's vCPU mutex). Each VM has a `busy` flag taken with a compare-exchange, never waited
//! for, so two moves touching the same VM cannot wait on each other (KVM's
//! `migration_in_progress`). With both flags held, the two VMs' vCPU lists are locked in
//! address order (keeps vCPU creation out while the move runs). No other lock is held across
//! the move; in particular the secure processor is not touched.
//!
//! Ownership: all VMs over one memory keep it alive (the `PhysMemory` holds the
//! `GuestMemory`); the code-invalidation write hook of the `GuestMemory` stays armed until
//! the last of them is dropped (a per-memory count, see [`VmMoves::release_memory`]). The
//! dirty bitmap is the memory's, so it follows the guest: only the VM that holds the guest
//! (never a dead VM, never a VM still waiting for a context) may take it. The firmware
//! context is one `Arc` shared by the source's (dead) slot and the destination's: it is
//! decommissioned when both are gone.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use esvm_cpu::Cpu;

use super::{Awaiting, EmuVcpu, EmuVm};
use crate::{BackendKind, HvError, Result, Vcpu, VmConfig, VmType};

/// Per-VM move state, shared with the VM's vCPUs.
#[derive(Debug)]
pub(crate) struct MoveFlags {
    /// The guest context was moved away: the VM never runs or takes SEV commands again.
    dead: AtomicBool,
    /// A move involving this VM is in progress.
    busy: AtomicBool,
    /// The VM holds the guest on its memory: created by [`EmuVm::new`], or the destination of
    /// a move. False for a VM from [`EmuVm::new_sharing_memory`] until a context moves in,
    /// and for a dead VM.
    owns_memory: AtomicBool,
}

impl MoveFlags {
    fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }
}

fn dead_message() -> &'static str {
    "this VM is dead: its SEV-ES guest context was moved to another VM \
     (sev_move_enc_context_from); it can neither run nor take SEV commands again. Use the \
     destination VM"
}

fn waiting_message() -> &'static str {
    "this VM was created over another VM's guest memory (EmuVm::new_sharing_memory) and holds \
     no guest yet; move the SEV-ES context into it (sev_move_enc_context_from) first"
}

/// What an [`EmuVm`] keeps for moves.
pub(crate) struct VmMoves {
    flags: Arc<MoveFlags>,
    /// How many VMs map this guest memory (shared by all of them).
    mem_users: Arc<AtomicUsize>,
}

impl VmMoves {
    /// A VM on its own, new memory.
    pub(crate) fn new() -> Self {
        VmMoves {
            flags: Arc::new(MoveFlags {
                dead: AtomicBool::new(false),
                busy: AtomicBool::new(false),
                owns_memory: AtomicBool::new(true),
            }),
            mem_users: Arc::new(AtomicUsize::new(1)),
        }
    }

    /// A VM over `src`'s memory, waiting for a context.
    fn sharing(src: &VmMoves) -> Self {
        // `src` is alive while we run, so the count cannot have reached zero.
        src.mem_users.fetch_add(1, Ordering::AcqRel);
        VmMoves {
            flags: Arc::new(MoveFlags {
                dead: AtomicBool::new(false),
                busy: AtomicBool::new(false),
                owns_memory: AtomicBool::new(false),
            }),
            mem_users: src.mem_users.clone(),
        }
    }

    /// The flags the VM's vCPUs hold.
    pub(crate) fn flags(&self) -> Arc<MoveFlags> {
        self.flags.clone()
    }

    /// Called once, when the VM is dropped: true if it was the last VM on its memory (which
    /// then disarms the memory's write hook).
    pub(crate) fn release_memory(&self) -> bool {
        self.mem_users.fetch_sub(1, Ordering::AcqRel) == 1
    }

    /// SEV commands of the VM: refused once it is dead.
    pub(crate) fn check_sev(&self) -> Result<()> {
        if self.flags.is_dead() {
            return Err(HvError::Sev(dead_message().into()));
        }
        Ok(())
    }

    /// LAUNCH_START: refused on a dead VM and on one waiting for a moved context.
    pub(crate) fn check_launch(&self) -> Result<()> {
        self.check_sev()?;
        if !self.flags.owns_memory.load(Ordering::Acquire) {
            return Err(HvError::Sev(waiting_message().into()));
        }
        Ok(())
    }

    /// The dirty log: only the VM that holds the guest has it.
    pub(crate) fn check_dirty_log(&self) -> Result<()> {
        check_runnable(&self.flags)
    }

    pub(crate) fn is_dead(&self) -> bool {
        self.flags.is_dead()
    }
}

fn check_runnable(flags: &MoveFlags) -> Result<()> {
    if flags.is_dead() {
        return Err(HvError::InvalidState(dead_message().into()));
    }
    if !flags.owns_memory.load(Ordering::Acquire) {
        return Err(HvError::InvalidState(waiting_message().into()));
    }
    Ok(())
}

impl EmuVcpu {
    /// `run`: refused on a dead VM and on one waiting for a moved context.
    pub(crate) fn check_runnable(&self) -> Result<()> {
        match &self.moves {
            Some(f) => check_runnable(f),
            None => Ok(()),
        }
    }

    /// The vCPU's SEV commands: refused once its VM is dead.
    pub(crate) fn check_sev_alive(&self) -> Result<()> {
        if self.moves.as_ref().is_some_and(|f| f.is_dead()) {
            return Err(HvError::Sev(dead_message().into()));
        }
        Ok(())
    }
}

fn refuse<T>(what: impl std::fmt::Display) -> Result<T> {
    Err(HvError::Sev(format!("move encryption context: {what}")))
}

/// The `busy` flag of one VM, held for the duration of a move.
struct Busy<'a>(&'a MoveFlags);

impl Busy<'_> {
    fn take<'a>(flags: &'a MoveFlags, role: &str) -> Result<Busy<'a>> {
        match flags
            .busy
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
        {
            Ok(_) => Ok(Busy(flags)),
            Err(_) => refuse(format!(
                "the {role} VM is part of another move right now; retry once that one has \
                 finished"
            )),
        }
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.busy.store(false, Ordering::Release);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The emu vCPUs in `vcpus`, sorted by id, after checking that they are exactly the vCPUs
/// created on `vm` (`created`).
fn vcpus_of<'a>(
    vcpus: &'a mut [Box<dyn Vcpu>],
    vm: &EmuVm,
    created: &[u32],
    role: &str,
) -> Result<Vec<&'a mut EmuVcpu>> {
    let mut out = Vec::with_capacity(vcpus.len());
    for v in vcpus.iter_mut() {
        let id = v.id();
        let Some(e) = v.as_any_mut().and_then(|a| a.downcast_mut::<EmuVcpu>()) else {
            return refuse(format!(
                "{role} vCPU {id} is not an emu vCPU; pass the vCPUs created on the {role} VM"
            ));
        };
        if !e
            .moves
            .as_ref()
            .is_some_and(|f| Arc::ptr_eq(f, &vm.moves.flags))
        {
            return refuse(format!(
                "{role} vCPU {id} belongs to another VM; pass the vCPUs created on the {role} \
                 VM"
            ));
        }
        out.push(e);
    }
    out.sort_by_key(|v| v.id);
    let mut want = created.to_vec();
    want.sort_unstable();
    let got: Vec<u32> = out.iter().map(|v| v.id).collect();
    if got != want {
        return refuse(format!(
            "the {role} vCPUs passed (ids {got:?}) are not the vCPUs created on the {role} VM \
             (ids {want:?}); pass every one of them exactly once"
        ));
    }
    Ok(out)
}

/// A CPU in the RESET state for vCPU `id` of `vm` (as `create_vcpu` makes it).
fn fresh_cpu(vm: &EmuVm, id: u32) -> Cpu {
    Cpu::new(vm.cpu_config(id), vm.phys.clone())
}

impl EmuVm {
    /// A VM over `src`'s guest memory (the same RAM, dirty bitmap and encryption state), to
    /// receive `src`'s SEV-ES guest with [`EmuVm::sev_move_enc_context_from`] — the emu
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
        })
    }

    /// Whether this VM's guest context was moved to another VM (it can never run again).
    pub fn is_dead(&self) -> bool {
        self.moves.is_dead()
    }

    /// KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM: take over `src`'s SEV-ES guest — its firmware context
    /// (same handle, same memory key) and each of its vCPUs, exactly where they are — into
    /// this VM, which must be a fresh SEV-ES VM created over `src`'s memory with
    /// [`EmuVm::new_sharing_memory`] and given the same vCPU ids. `vcpus` are all the vCPUs
    /// created on this VM, `src_vcpus` all of `src`'s; see the module documentation for the
    /// rules. On success `src` is dead; on error nothing changed.
    pub fn sev_move_enc_context_from(
        &self,
        vcpus: &mut [Box<dyn Vcpu>],
        src: &EmuVm,
        src_vcpus: &mut [Box<dyn Vcpu>],
    ) -> Result<()> {
        if std::ptr::eq(self, src) {
            return refuse("source and destination are the same VM");
        }
        let _dst_busy = Busy::take(&self.moves.flags, "destination")?;
        let _src_busy = Busy::take(&src.moves.flags, "source")?;
        // Both busy flags are ours, so no other move holds either list; the address order
        // keeps even that case free of lock-order inversions.
        let (dst_created, src_created) =
            if std::ptr::from_ref(&self.created).addr() < std::ptr::from_ref(&src.created).addr() {
                let d = lock(&self.created);
                (d, lock(&src.created))
            } else {
                let s = lock(&src.created);
                (lock(&self.created), s)
            };

        if src.moves.is_dead() {
            return refuse(
                "the source VM is dead: its guest context was already moved to another VM; \
                 move from the VM that holds the guest now",
            );
        }
        if self.moves.is_dead() {
            return refuse(
                "the destination VM is dead (its guest context was moved away) and cannot \
                 take a guest again; create a fresh VM with EmuVm::new_sharing_memory",
            );
        }
        if src.config.vm_type != VmType::SevEs {
            return refuse(
                "the source is a plain VM; only an SEV-ES guest has an encryption context to \
                 move",
            );
        }
        if self.config.vm_type != VmType::SevEs {
            return refuse(
                "the destination is a plain VM; it must be of the source's type (create it \
                 with VmType::SevEs)",
            );
        }
        let Some(ctx) = src.sev.get().cloned() else {
            return refuse(
                "the source VM has no SEV-ES guest context; launch it (LAUNCH_START) or \
                 receive one (RECEIVE_START) first",
            );
        };
        if self.sev.get().is_some() {
            return refuse(
                "the destination already has an SEV-ES guest context (LAUNCH_START, \
                 RECEIVE_START or an earlier move); the destination must be a fresh VM",
            );
        }
        if !Arc::ptr_eq(&self.memory, &src.memory) {
            return refuse(
                "the destination does not map the source's guest memory; create it with \
                 EmuVm::new_sharing_memory(config, &source)",
            );
        }

        let mut dst_v = vcpus_of(vcpus, self, &dst_created, "destination")?;
        let mut src_v = vcpus_of(src_vcpus, src, &src_created, "source")?;
        let src_ids: Vec<u32> = src_v.iter().map(|v| v.id).collect();
        let dst_ids: Vec<u32> = dst_v.iter().map(|v| v.id).collect();
        if src_ids != dst_ids {
            return refuse(format!(
                "vCPU mismatch: the source has {} vCPU(s) (ids {src_ids:?}), the destination \
                 {} (ids {dst_ids:?}); create the same vCPUs on the destination",
                src_ids.len(),
                dst_ids.len()
            ));
        }
        for s in &src_v {
            if !s.is_protected() {
                return refuse(format!(
                    "source vCPU {} has no encrypted VMSA (it never went through \
                     LAUNCH_UPDATE_VMSA or RECEIVE_UPDATE_VMSA); only a guest whose vCPUs are \
                     all protected can move",
                    s.id
                ));
            }
            if s.awaiting != Awaiting::Nothing {
                return refuse(format!(
                    "source vCPU {} is in the middle of an instruction's exit; run it to its \
                     next exit first",
                    s.id
                ));
            }
        }
        for d in &dst_v {
            let fresh = d
                .sev
                .as_ref()
                .is_some_and(|s| !s.protected && s.in_flight.is_none() && s.outbox.is_empty())
                && d.awaiting == Awaiting::Nothing
                && d.ghcb_read.is_none();
            if !fresh {
                return refuse(format!(
                    "destination vCPU {} is not a fresh SEV-ES vCPU; use a new VM",
                    d.id
                ));
            }
        }

        // Load each destination CPU with its source's saved state: the VMSA (what the CPU
        // model saves at VMEXIT and loads at VMRUN) plus the host-visible state that lives
        // outside it (APIC base, TSC, GHCB MSR). Undone if anything fails.
        let mut before = Vec::with_capacity(dst_v.len());
        let mut failure = None;
        for (d, s) in dst_v.iter_mut().zip(src_v.iter()) {
            before.push(d.cpu.snapshot());
            let vmsa = s.cpu.to_vmsa();
            let loaded = d
                .cpu
                .set_msr(esvm_arch::msr::IA32_APIC_BASE, s.cpu.sregs().apic_base)
                .and_then(|_| d.cpu.load_vmsa(&vmsa));
            d.cpu.set_tsc(s.cpu.tsc());
            d.cpu.set_ghcb_msr(s.cpu.ghcb_msr());
            let problem = match loaded {
                Err(e) => Some(format!("loading vCPU {}'s VMSA: {e}", s.id)),
                Ok(()) if d.cpu.to_vmsa().as_bytes() != vmsa.as_bytes() => {
                    Some(format!("vCPU {}'s VMSA did not load unchanged", s.id))
                }
                Ok(()) => None,
            };
            if problem.is_some() {
                failure = problem;
                break;
            }
        }
        let rollback = |dst_v: &mut Vec<&mut EmuVcpu>, before: &[esvm_arch::VcpuSnapshot]| {
            for (d, snap) in dst_v.iter_mut().zip(before) {
                let _ = d.cpu.restore(snap);
                d.cpu.set_ghcb_msr(0);
            }
        };
        if let Some(message) = failure {
            rollback(&mut dst_v, &before);
            return Err(HvError::Internal {
                backend: BackendKind::Emu,
                message: format!("move encryption context: {message}"),
            });
        }
        // The commit point: the destination's context slot takes the guest context.
        if self.sev.set(ctx).is_err() {
            rollback(&mut dst_v, &before);
            return refuse(
                "the destination got an SEV-ES guest context while the move ran; the \
                 destination must be a fresh VM",
            );
        }
        src.moves.flags.dead.store(true, Ordering::Release);
        src.moves.flags.owns_memory.store(false, Ordering::Release);
        self.moves.flags.owns_memory.store(true, Ordering::Release);

        // The hypervisor's per-vCPU state moves with the guest; the source vCPUs keep
        // nothing of it (a fresh, unprotected SEV-ES state and a CPU in RESET).
        for (d, s) in dst_v.iter_mut().zip(src_v.iter_mut()) {
            std::mem::swap(&mut d.sev, &mut s.sev);
            d.ghcb_read = s.ghcb_read.take();
            d.data = std::mem::take(&mut s.data);
            d.cpuid_result = std::mem::take(&mut s.cpuid_result);
            d.msr_value = std::mem::take(&mut s.msr_value);
            d.msr_fault = std::mem::take(&mut s.msr_fault);
            d.awaiting = Awaiting::Nothing;
            s.cpu = fresh_cpu(src, s.id);
        }
        drop((dst_created, src_created));
        tracing::debug!(
            handle = self.sev_handle(),
            vcpus = dst_v.len(),
            "SEV-ES guest context moved to another VM"
        );
        Ok(())
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
        a.moves.flags.dead.store(true, Ordering::Release);
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
