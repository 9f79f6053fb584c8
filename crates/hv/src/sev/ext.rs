//! SEV-ES as an extension of the generic [`Vm`](crate::Vm) and [`Vcpu`](crate::Vcpu) traits
//! (as crosvm extends its `Vm`/`Vcpu` with `VmX86_64`/`VcpuX86_64`): a backend that can run
//! SEV-ES guests hands out a [`SevVm`] from [`Vm::sev`](crate::Vm::sev) and a [`SevVcpu`] from
//! [`Vcpu::sev`](crate::Vcpu::sev) / [`Vcpu::sev_mut`](crate::Vcpu::sev_mut); one that
//! cannot (kvm) returns `None`. Code above the hypervisor layer reaches SEV-ES only this
//! way: no downcasts, no backend types.
//!
//! The commands are the SEV firmware API's as KVM exposes them (`KVM_SEV_*`):
//! - the launch (LAUNCH_START, _UPDATE_DATA, _UPDATE_VMSA, _MEASURE, _SECRET, _FINISH) only
//!   through the type-state [`Launcher`](super::Launcher), so that a command out of order
//!   does not compile: the launch methods here take a [`LaunchToken`], which only the
//!   launcher can make;
//! - sending (SEND_*) and receiving (RECEIVE_*) a guest, for live migration and sealed
//!   snapshots, with the transfer types of [`super::transfer`];
//! - the hypervisor's own, non-secret state that travels with a guest;
//! - the same-host move of the encryption context ([`SevVm::move_enc_context_from`]).
//!
//! A backend's extension refuses its commands on a plain VM or vCPU with an error that says
//! so (as KVM's `KVM_MEMORY_ENCRYPT_OP` does on a VM that is not SEV).

use std::sync::{Arc, Mutex};

use esvm_psp::{LaunchStart, Measurement, PacketHeader, Psp};

use super::moving::{self, MoveEndpoint, MoveProbe, MoveToken, SevVcpuMove, SevVcpuUndo};
use super::{SevHostVmState, SevSessionStart, SevVcpuTransfer};
use crate::ghcb::VmgexitCounts;
use crate::{HvError, Result, Vcpu};

/// Proof that a launch command comes from a [`Launcher`](super::Launcher) in the state that
/// admits it (only the launcher can make one).
pub struct LaunchToken(());

impl LaunchToken {
    pub(crate) fn new() -> Self {
        LaunchToken(())
    }
}

/// The SEV-ES commands of a VM.
///
/// The same-host move hooks ([`SevVm::move_endpoint`]) use types only esvm-hv can make; a
/// backend outside it keeps their default (no moves).
pub trait SevVm: Send + Sync {
    /// LAUNCH_START (+ ACTIVATE) on `psp`: create the guest context in the secure
    /// processor and wire its memory key to the memory controller. Returns the guest's
    /// firmware handle. Through [`Launcher::start`](super::Launcher::start).
    fn launch_start(
        &self,
        token: &LaunchToken,
        psp: Arc<Mutex<Psp>>,
        req: &LaunchStart,
    ) -> Result<u32>;
    /// LAUNCH_UPDATE_DATA: encrypt `[gpa, gpa+len)` in place and measure it. Through
    /// [`Launcher::update_data`](super::Launcher::update_data).
    fn launch_update_data(&self, token: &LaunchToken, gpa: u64, len: u64) -> Result<()>;
    /// LAUNCH_MEASURE. Through [`Launcher::measure`](super::Launcher::measure).
    fn launch_measure(&self, token: &LaunchToken) -> Result<Measurement>;
    /// LAUNCH_UPDATE_SECRET: inject an owner's secret packet at `gpa`. Through
    /// [`Launcher::inject_secret`](super::Launcher::inject_secret).
    fn launch_secret(
        &self,
        token: &LaunchToken,
        gpa: u64,
        header: &PacketHeader,
        ciphertext: &[u8],
    ) -> Result<()>;
    /// LAUNCH_FINISH. Through [`Launcher::finish`](super::Launcher::finish).
    fn launch_finish(&self, token: &LaunchToken) -> Result<()>;

    /// The guest's firmware handle, once it has a guest context (launched, received or
    /// moved in) and as long as the VM holds it.
    fn handle(&self) -> Option<u32>;
    /// The secure processor the guest context lives in, while the VM holds one.
    fn platform(&self) -> Option<Arc<Mutex<Psp>>>;

    /// SEND_START towards the platform whose certificate chain (or bare PDH) is `target`:
    /// the firmware enforces the guest policy (NOSEND, DOMAIN, ES, minimum API) and agrees
    /// fresh transport keys with the target. The guest keeps running.
    fn send_start(&self, target: &[u8]) -> Result<SevSessionStart>;
    /// Append page `page`'s packet to `out`: SEND_UPDATE_DATA for a private page, its bytes
    /// for a shared one (see [`PagePacket`](super::PagePacket)). The guest may be running: a
    /// page it changes or converts afterwards is in the dirty log and is sent again.
    fn send_page(&self, page: u64, out: &mut Vec<u8>) -> Result<()>;
    /// The transcript tag of every packet sent so far (for the target's RECEIVE_FINISH);
    /// the send session stays open.
    fn send_transcript_tag(&self) -> Result<[u8; 32]>;
    /// SEND_FINISH: the guest has left; it never runs here again.
    fn send_finish(&self) -> Result<[u8; 32]>;
    /// SEND_CANCEL: the migration failed; the guest runs on here.
    fn send_cancel(&self) -> Result<()>;

    /// RECEIVE_START (+ ACTIVATE) on a fresh SEV-ES VM: the firmware of `psp` unwraps the
    /// transport keys with its PDH and creates the guest context with a new memory key.
    /// Returns the guest's firmware handle.
    fn receive_start(&self, psp: Arc<Mutex<Psp>>, start: &SevSessionStart) -> Result<u32>;
    /// Apply one incoming page: RECEIVE_UPDATE_DATA for a private page (the firmware checks
    /// its MAC and address binding before anything is written), a host write for a shared
    /// one. Only before the guest runs here.
    fn receive_page(&self, page: u64, packet: &[u8]) -> Result<()>;
    /// RECEIVE_FINISH: the firmware checks the source's transcript tag against every packet
    /// it accepted; only then may the guest run here.
    fn receive_finish(&self, tag: &[u8; 32]) -> Result<()>;
    /// Give up an incoming guest that will never run (DEACTIVATE + DECOMMISSION).
    fn decommission(&self) -> Result<()>;
    /// Fault in the backing of the guest's private (encrypted) memory, for a destination
    /// that preallocates its memory before the pages arrive.
    fn prealloc_private(&self);

    /// The VM-wide hypervisor state that travels with the guest.
    fn host_state(&self) -> Result<SevHostVmState>;
    /// Take over the VM-wide hypervisor state of an incoming guest.
    fn set_host_state(&self, s: &SevHostVmState) -> Result<()>;

    /// KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM: take over `src`'s SEV-ES guest — its firmware
    /// context (same handle, same memory key) and each of its vCPUs, exactly where they are
    /// — into this VM, which must be a fresh SEV-ES VM over `src`'s guest memory with the
    /// same vCPU ids. `vcpus` are all the vCPUs created on this VM, `src_vcpus` all of
    /// `src`'s; the rules are in [`super::moving`]. On success `src` is dead; on error
    /// nothing changed.
    fn move_enc_context_from(
        &self,
        vcpus: &mut [Box<dyn Vcpu>],
        src: &dyn SevVm,
        src_vcpus: &mut [Box<dyn Vcpu>],
    ) -> Result<()> {
        let token = MoveToken::new();
        let dst = self
            .move_endpoint(&token)
            .ok_or_else(no_moves("destination"))?;
        let from = src.move_endpoint(&token).ok_or_else(no_moves("source"))?;
        moving::move_enc_context(dst, vcpus, from, src_vcpus)
    }
    /// Whether this VM's guest context was moved to another VM (it can never run again).
    fn is_dead(&self) -> bool;
    /// Move hook: the VM's SEV-ES bookkeeping, for [`SevVm::move_enc_context_from`].
    fn move_endpoint(&self, token: &MoveToken) -> Option<MoveEndpoint<'_>> {
        let _ = token;
        None
    }
}

fn no_moves(role: &'static str) -> impl FnOnce() -> HvError {
    move || {
        HvError::Sev(format!(
            "move encryption context: the {role} VM's backend cannot move SEV-ES guests"
        ))
    }
}

/// The SEV-ES commands of a vCPU.
///
/// The same-host move hooks (`move_*`) use types only esvm-hv can make; a backend outside
/// it keeps their defaults (no moves).
pub trait SevVcpu: Send {
    /// LAUNCH_UPDATE_VMSA: the vCPU's current state becomes its initial VMSA, measured and
    /// encrypted by the secure processor; from then on the vCPU is protected. Through
    /// [`Launcher::update_vmsa`](super::Launcher::update_vmsa).
    fn launch_update_vmsa(&mut self, token: &LaunchToken) -> Result<()>;
    /// The VMSA LAUNCH_UPDATE_VMSA would take in now (plaintext; only before the vCPU is
    /// protected — the hypervisor set this state itself). Guest owners use it to predict the
    /// launch digest.
    fn initial_vmsa(&self) -> Result<Box<[u8; 4096]>>;
    /// The vCPU's VMSA as the host sees it: ciphertext under the guest's memory key.
    fn encrypted_vmsa(&self) -> Result<Box<[u8; 4096]>>;
    /// The vCPU's VMSA decrypted by the firmware's DBG_DECRYPT: only for a guest whose
    /// policy allows debugging (NODBG clear), refused otherwise.
    fn debug_vmsa(&self) -> Result<Box<[u8; 4096]>>;
    /// SEND_UPDATE_VMSA: this protected vCPU as a transport packet plus the hypervisor's
    /// own state, at a clean point (not in the middle of an exit or of a GHCB request).
    /// The VM must be in a send session.
    fn send_state(&self) -> Result<SevVcpuTransfer>;
    /// RECEIVE_UPDATE_VMSA: make this fresh vCPU of a receiving VM the one in `t`; its
    /// tracked registers come from what the firmware authenticated. Refused (and nothing
    /// changed) if the hypervisor state in `t` contradicts the authenticated extension.
    fn receive_state(&mut self, t: &SevVcpuTransfer) -> Result<()>;
    /// The GHCB MSR (host-visible state of an SEV-ES vCPU).
    fn ghcb_msr(&self) -> Result<u64>;
    /// The VMGEXITs the hypervisor handled for this vCPU, by what they asked for (SVM exit
    /// code of a GHCB request, or MSR-protocol request), each counted once when its
    /// handling completed. Host-side statistics: a same-host move takes them along with the
    /// rest of the hypervisor's vCPU state; a guest received from elsewhere (migration, a
    /// sealed snapshot) starts at zero.
    fn vmgexits(&self) -> Result<VmgexitCounts>;
    /// A start-up IPI (SIPI) arrived for this protected vCPU. The hypervisor cannot set a
    /// protected vCPU's registers, so the SIPI's vector means nothing here: a vCPU parked in
    /// AP reset hold (see [`VmExit::ApResetHold`](crate::VmExit::ApResetHold)) is released
    /// (`GhcbState::release_ap_reset_hold`: the GHCB MSR answers AP_RESET_HOLD with a
    /// non-zero result, or the AP_HLT_LOOP GHCB gets SW_EXITINFO2 = 1) and runs again at its
    /// next run, in its own code; returns whether it was held. A SIPI to a vCPU that is not
    /// held is ignored (false), as on hardware for a running CPU. INIT has no hypervisor
    /// side at all for a protected vCPU (it cannot reset the encrypted registers).
    fn deliver_sipi(&mut self) -> Result<bool>;

    /// Move hook: what the move must know of this vCPU; `None`: it cannot take part.
    fn move_probe(&self, token: &MoveToken) -> Option<MoveProbe> {
        let _ = token;
        None
    }
    /// Move hook (source vCPU): a copy of its whole protected state.
    fn move_export(&self, token: &MoveToken) -> Result<SevVcpuMove> {
        let _ = token;
        Err(HvError::Sev("this vCPU cannot move".into()))
    }
    /// Move hook (destination vCPU): take over a moved state; on error unchanged.
    fn move_import(&mut self, token: &MoveToken, state: SevVcpuMove) -> Result<SevVcpuUndo> {
        let _ = (token, state);
        Err(HvError::Sev("this vCPU cannot move".into()))
    }
    /// Move hook (destination vCPU): undo a [`SevVcpu::move_import`] of a move that failed.
    fn move_undo(&mut self, token: &MoveToken, undo: SevVcpuUndo) {
        let _ = (token, undo);
    }
    /// Move hook (source vCPU, after the commit): keep nothing of the guest.
    fn move_scrub(&mut self, token: &MoveToken) {
        let _ = token;
    }
}
