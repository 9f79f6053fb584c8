//! Same-host move of an SEV-ES guest from one VM to another: the analogue of KVM's
//! `KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM` ("intra-host migration", `sev_vm_move_enc_context_from`),
//! reached through [`SevVm::move_enc_context_from`](super::SevVm::move_enc_context_from).
//!
//! On KVM, userspace maps the *same* guest memory into a second VM and asks that VM to take
//! over the first one's encryption context: firmware handle, ASID (so the memory key), and
//! each vCPU's encrypted VMSA and GHCB bookkeeping. Nothing is re-encrypted and the firmware
//! is not involved (no SEND/RECEIVE, no new key). The source VM is dead afterwards.
//!
//! Here the destination VM's extension drives the move (`move_enc_context`); it reaches the
//! source VM and every vCPU only through the extension traits' move hooks, whose types
//! ([`MoveEndpoint`], [`MoveProbe`], [`SevVcpuMove`], [`SevVcpuUndo`]) only esvm-hv can make
//! or read, and which only esvm-hv can call (they take a [`MoveToken`]):
//! - the destination's context slot receives the source's guest context (the same firmware
//!   handle and memory key);
//! - each destination vCPU takes over the source vCPU with the same id (the VMSA as the CPU
//!   model saved it, the GHCB MSR, TSC and APIC base, the tracked registers, the GHCB
//!   protocol state and any GHCB request in flight, pending events);
//! - the source vCPUs are scrubbed (a reset CPU, no protected state) and the source VM is
//!   marked dead.
//!
//! Rules (KVM's, plus what the model needs):
//! - source and destination are different VMs, both of type SEV-ES;
//! - the source has a guest context; the destination has none and is not dead;
//! - the destination maps the source's guest memory (the emu backend's
//!   `EmuVm::new_sharing_memory`);
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
//! Ownership: the firmware context is one `Arc` shared by the source's (dead) slot and the
//! destination's: it is decommissioned when both are gone. The dirty bitmap is the memory's,
//! so it follows the guest: only the VM that holds the guest (never a dead VM, never a VM
//! still waiting for a context) may take it.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use esvm_arch::vmsa::Vmsa;

use super::{SevGuestContext, SevVcpu, SevVcpuState, VmmIo};
use crate::{GuestMemory, HvError, Result, Vcpu, VmType};

/// Proof that a move hook is called by esvm-hv's move (only esvm-hv can make one).
pub struct MoveToken(());

impl MoveToken {
    pub(crate) fn new() -> Self {
        MoveToken(())
    }
}

/// Per-VM move state, shared with the VM's vCPUs.
#[derive(Debug)]
pub(crate) struct MoveFlags {
    /// The guest context was moved away: the VM never runs or takes SEV commands again.
    dead: AtomicBool,
    /// A move involving this VM is in progress.
    busy: AtomicBool,
    /// The VM holds the guest on its memory: created on memory of its own, or the
    /// destination of a move. False for a VM created over another VM's memory until a
    /// context moves in, and for a dead VM.
    owns_memory: AtomicBool,
}

impl MoveFlags {
    pub(crate) fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    /// `run`: refused on a dead VM and on one waiting for a moved context.
    pub(crate) fn check_runnable(&self) -> Result<()> {
        if self.is_dead() {
            return Err(HvError::InvalidState(dead_message().into()));
        }
        if !self.owns_memory.load(Ordering::Acquire) {
            return Err(HvError::InvalidState(waiting_message().into()));
        }
        Ok(())
    }

    /// SEV commands: refused once the VM is dead.
    pub(crate) fn check_sev_alive(&self) -> Result<()> {
        if self.is_dead() {
            return Err(HvError::Sev(dead_message().into()));
        }
        Ok(())
    }
}

pub(crate) fn dead_message() -> &'static str {
    "this VM is dead: its SEV-ES guest context was moved to another VM \
     (SevVm::move_enc_context_from); it can neither run nor take SEV commands again. Use \
     the destination VM"
}

fn waiting_message() -> &'static str {
    "this VM was created over another VM's guest memory (EmuVm::new_sharing_memory) and holds \
     no guest yet; move the SEV-ES context into it (SevVm::move_enc_context_from) first"
}

/// What a VM keeps for moves.
pub(crate) struct VmMoves {
    pub(crate) flags: Arc<MoveFlags>,
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
    pub(crate) fn sharing(src: &VmMoves) -> Self {
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

    /// Called once, when the VM is dropped: true if it was the last VM on its memory.
    pub(crate) fn release_memory(&self) -> bool {
        self.mem_users.fetch_sub(1, Ordering::AcqRel) == 1
    }

    /// SEV commands of the VM: refused once it is dead.
    pub(crate) fn check_sev(&self) -> Result<()> {
        self.flags.check_sev_alive()
    }

    /// LAUNCH_START and RECEIVE_START: refused on a dead VM and on one waiting for a moved
    /// context.
    pub(crate) fn check_launch(&self) -> Result<()> {
        self.check_sev()?;
        if !self.flags.owns_memory.load(Ordering::Acquire) {
            return Err(HvError::Sev(waiting_message().into()));
        }
        Ok(())
    }

    /// The dirty log: only the VM that holds the guest has it.
    pub(crate) fn check_dirty_log(&self) -> Result<()> {
        self.flags.check_runnable()
    }

    pub(crate) fn is_dead(&self) -> bool {
        self.flags.is_dead()
    }

    #[cfg(test)]
    pub(crate) fn kill_for_test(&self) {
        self.flags.dead.store(true, Ordering::Release);
    }
}

/// What the move needs of one VM: its SEV-ES bookkeeping, borrowed for the move.
pub struct MoveEndpoint<'a> {
    pub(crate) vm_type: VmType,
    pub(crate) moves: &'a VmMoves,
    /// The ids of the vCPUs created on the VM.
    pub(crate) created: &'a Mutex<Vec<u32>>,
    /// The VM's guest context slot.
    pub(crate) context: &'a OnceLock<Arc<SevGuestContext>>,
    pub(crate) memory: &'a Arc<GuestMemory>,
}

/// What the move needs to know of one vCPU before it changes anything.
pub struct MoveProbe {
    pub(crate) id: u32,
    /// The move flags of the VM the vCPU was created on.
    pub(crate) owner: Option<Arc<MoveFlags>>,
    /// It has an encrypted VMSA.
    pub(crate) protected: bool,
    /// It is in the middle of an instruction's exit (waits for the VMM's answer).
    pub(crate) mid_exit: bool,
    /// A fresh SEV-ES vCPU: no VMSA, no GHCB request, not in an exit.
    pub(crate) fresh: bool,
}

/// One protected vCPU's state on its way to the vCPU with its id in the destination VM (KVM
/// hands over the VMSA page and `vcpu_sev_es_state`). It never leaves esvm-hv.
pub struct SevVcpuMove {
    /// The VMSA as the CPU model saved it.
    pub(crate) vmsa: Vmsa,
    pub(crate) apic_base: u64,
    pub(crate) tsc: u64,
    pub(crate) ghcb_msr: u64,
    /// The hypervisor's SEV-ES state of the vCPU (tracked registers, GHCB protocol state,
    /// the GHCB request in flight).
    pub(crate) state: Box<SevVcpuState>,
    /// The read the in-flight GHCB request is blocked on, and the VMM's answer to it.
    pub(crate) ghcb_read: Option<VmmIo>,
    pub(crate) exit_data: [u8; 16],
    /// The VMM's answer to a forwarded RDMSR/WRMSR the request is blocked on: the value
    /// read and whether it refused the access.
    pub(crate) exit_msr: (u64, bool),
}

/// How to put a destination vCPU back as it was before it took a moved state (a move that
/// failed later).
pub struct SevVcpuUndo {
    pub(crate) before: Box<esvm_arch::VcpuSnapshot>,
    pub(crate) state: Option<Box<SevVcpuState>>,
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

/// The SEV-ES extensions of the vCPUs in `vcpus` with what the move needs to know of each,
/// sorted by id, after checking that they are exactly the vCPUs created on `vm` (`created`).
fn vcpus_of<'a>(
    vcpus: &'a mut [Box<dyn Vcpu>],
    vm: &MoveEndpoint<'_>,
    created: &[u32],
    role: &str,
    token: &MoveToken,
) -> Result<Vec<(MoveProbe, &'a mut dyn SevVcpu)>> {
    let mut out = Vec::with_capacity(vcpus.len());
    for v in vcpus.iter_mut() {
        let id = v.id();
        let probed = v
            .sev_mut()
            .and_then(|s| s.move_probe(token).map(|p| (p, s)));
        let Some((probe, sev)) = probed else {
            return refuse(format!(
                "{role} vCPU {id} cannot take part in a move (its backend has no SEV-ES move \
                 support); pass the vCPUs created on the {role} VM"
            ));
        };
        if !probe
            .owner
            .as_ref()
            .is_some_and(|f| Arc::ptr_eq(f, &vm.moves.flags))
        {
            return refuse(format!(
                "{role} vCPU {id} belongs to another VM; pass the vCPUs created on the {role} \
                 VM"
            ));
        }
        out.push((probe, sev));
    }
    out.sort_by_key(|(p, _)| p.id);
    let mut want = created.to_vec();
    want.sort_unstable();
    let got: Vec<u32> = out.iter().map(|(p, _)| p.id).collect();
    if got != want {
        return refuse(format!(
            "the {role} vCPUs passed (ids {got:?}) are not the vCPUs created on the {role} VM \
             (ids {want:?}); pass every one of them exactly once"
        ));
    }
    Ok(out)
}

/// Move the guest of `src` (with all its vCPUs `src_vcpus`) into `dst` (with all its vCPUs
/// `vcpus`); see the module documentation. On success `src` is dead; on error nothing
/// changed.
pub(crate) fn move_enc_context(
    dst: MoveEndpoint<'_>,
    vcpus: &mut [Box<dyn Vcpu>],
    src: MoveEndpoint<'_>,
    src_vcpus: &mut [Box<dyn Vcpu>],
) -> Result<()> {
    if Arc::ptr_eq(&dst.moves.flags, &src.moves.flags) {
        return refuse("source and destination are the same VM");
    }
    let _dst_busy = Busy::take(&dst.moves.flags, "destination")?;
    let _src_busy = Busy::take(&src.moves.flags, "source")?;
    // Both busy flags are ours, so no other move holds either list; the address order
    // keeps even that case free of lock-order inversions.
    let (dst_created, src_created) =
        if std::ptr::from_ref(dst.created).addr() < std::ptr::from_ref(src.created).addr() {
            let d = lock(dst.created);
            (d, lock(src.created))
        } else {
            let s = lock(src.created);
            (lock(dst.created), s)
        };

    if src.moves.is_dead() {
        return refuse(
            "the source VM is dead: its guest context was already moved to another VM; \
             move from the VM that holds the guest now",
        );
    }
    if dst.moves.is_dead() {
        return refuse(
            "the destination VM is dead (its guest context was moved away) and cannot \
             take a guest again; create a fresh VM with EmuVm::new_sharing_memory",
        );
    }
    if src.vm_type != VmType::SevEs {
        return refuse(
            "the source is a plain VM; only an SEV-ES guest has an encryption context to \
             move",
        );
    }
    if dst.vm_type != VmType::SevEs {
        return refuse(
            "the destination is a plain VM; it must be of the source's type (create it \
             with VmType::SevEs)",
        );
    }
    let Some(ctx) = src.context.get().cloned() else {
        return refuse(
            "the source VM has no SEV-ES guest context; launch it (LAUNCH_START) or \
             receive one (RECEIVE_START) first",
        );
    };
    if dst.context.get().is_some() {
        return refuse(
            "the destination already has an SEV-ES guest context (LAUNCH_START, \
             RECEIVE_START or an earlier move); the destination must be a fresh VM",
        );
    }
    if !Arc::ptr_eq(dst.memory, src.memory) {
        return refuse(
            "the destination does not map the source's guest memory; create it with \
             EmuVm::new_sharing_memory(config, &source)",
        );
    }

    let token = MoveToken::new();
    let mut dst_v = vcpus_of(vcpus, &dst, &dst_created, "destination", &token)?;
    let mut src_v = vcpus_of(src_vcpus, &src, &src_created, "source", &token)?;
    let src_ids: Vec<u32> = src_v.iter().map(|(p, _)| p.id).collect();
    let dst_ids: Vec<u32> = dst_v.iter().map(|(p, _)| p.id).collect();
    if src_ids != dst_ids {
        return refuse(format!(
            "vCPU mismatch: the source has {} vCPU(s) (ids {src_ids:?}), the destination \
             {} (ids {dst_ids:?}); create the same vCPUs on the destination",
            src_ids.len(),
            dst_ids.len()
        ));
    }
    for (p, _) in &src_v {
        if !p.protected {
            return refuse(format!(
                "source vCPU {} has no encrypted VMSA (it never went through \
                 LAUNCH_UPDATE_VMSA or RECEIVE_UPDATE_VMSA); only a guest whose vCPUs are \
                 all protected can move",
                p.id
            ));
        }
        if p.mid_exit {
            return refuse(format!(
                "source vCPU {} is in the middle of an instruction's exit; run it to its \
                 next exit first",
                p.id
            ));
        }
    }
    for (p, _) in &dst_v {
        if !p.fresh {
            return refuse(format!(
                "destination vCPU {} is not a fresh SEV-ES vCPU; use a new VM",
                p.id
            ));
        }
    }

    // Each destination vCPU takes its source's state; undone if anything fails.
    let mut undo = Vec::with_capacity(dst_v.len());
    let mut failure = None;
    for ((_, d), (_, s)) in dst_v.iter_mut().zip(src_v.iter()) {
        let moved = match s.move_export(&token) {
            Ok(m) => m,
            Err(e) => {
                failure = Some(e);
                break;
            }
        };
        match d.move_import(&token, moved) {
            Ok(u) => undo.push(u),
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    let rollback = |dst_v: &mut Vec<(MoveProbe, &mut dyn SevVcpu)>, undo: Vec<SevVcpuUndo>| {
        for ((_, d), u) in dst_v.iter_mut().zip(undo) {
            d.move_undo(&token, u);
        }
    };
    if let Some(e) = failure {
        rollback(&mut dst_v, undo);
        return Err(e);
    }
    // The commit point: the destination's context slot takes the guest context.
    if dst.context.set(ctx).is_err() {
        rollback(&mut dst_v, undo);
        return refuse(
            "the destination got an SEV-ES guest context while the move ran; the \
             destination must be a fresh VM",
        );
    }
    src.moves.flags.dead.store(true, Ordering::Release);
    src.moves.flags.owns_memory.store(false, Ordering::Release);
    dst.moves.flags.owns_memory.store(true, Ordering::Release);
    // The source vCPUs keep nothing of the guest.
    for (_, s) in src_v.iter_mut() {
        s.move_scrub(&token);
    }
    drop((dst_created, src_created));
    tracing::debug!(
        handle = dst.context.get().map(|c| c.handle()),
        vcpus = dst_v.len(),
        "SEV-ES guest context moved to another VM"
    );
    Ok(())
}
