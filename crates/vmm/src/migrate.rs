//! Live migration of a [`Machine`]: the source side ([`MachineSource`], driven by
//! `esvm_migration::Sender` on a migration thread while the guest runs) and the destination
//! side ([`MachineTarget`], driven by `esvm_migration::Receiver` into a fresh machine).
//!
//! What travels (see `docs/migration-protocol.md` for the frames):
//! * `Config`: memory size, vCPU count, VM type, no feature bits, and as extra compatibility
//!   data [`compat_extra`], the names and versions of this VMM's state formats (derived from
//!   their version constants, every device's included): a destination that serialises
//!   differently refuses before any memory moves.
//! * pages: the first pass carries every page ever written (the destination starts zeroed;
//!   see [`crate::dirty`]), later passes the dirty log.
//! * `DeviceState`: the [`MachineState`] as JSON (devices, virtual clock, instruction
//!   counts, MMIO window, instruction limit), so the guest's time continues exactly.
//! * `VcpuState`: each vCPU's [`VcpuSnapshot`](esvm_arch::VcpuSnapshot) as JSON.
//!
//! SEV-ES guests travel through the secure processors of both hosts: the destination
//! answers `Config` with its platform's certificate chain; the source checks it against the
//! root the operator trusts (`esvm ctl migrate --trust CHAIN`; by default the root its own
//! platform trusts) and runs SEND_START (the firmware enforces NOSEND, DOMAIN, ES and the
//! minimum API version). Pages go as [`esvm_hv::sev::PagePacket`]s (private pages as
//! SEND_UPDATE_DATA packets), each vCPU as a [`SevVcpuTransfer`] (SEND_UPDATE_VMSA with the
//! tracked extension), and `Complete` carries the send transcript tag for RECEIVE_FINISH.
//! The source's SEND_FINISH happens only after the destination committed; any failure
//! before that ends in SEND_CANCEL, and the guest runs on at the source.

use std::io::Write;

use std::sync::{Arc, Mutex, OnceLock};

use esvm_hv::sev::{SevSessionStart, SevVcpuTransfer, SevVm};
use esvm_hv::{BackendKind, MissingPages, Vm, VmType};
use esvm_migration::{
    GuestType, MigrationConfig, MigrationSource, MigrationTarget, PageSet, SourceError,
    TargetError, PAGE_SIZE,
};
use esvm_psp::cert::{CaCert, CertChain};
use esvm_psp::Psp;
use thiserror::Error;

use crate::lifecycle::LifecycleError;
use crate::machine::{
    Machine, MachineConfig, MachineHandle, MachineState, MigrationTicket, StoppedGuard, VmControl,
    MACHINE_STATE_VERSION,
};
use crate::ram::RamError;
use crate::runctl::PARK_TIMEOUT;

/// The VMM-specific compatibility data of the `Config` frame: the formats of the state this
/// VMM sends, derived from their version constants — the machine state
/// ([`MACHINE_STATE_VERSION`], which follows the devices' state format) and every device's
/// id and state version ([`esvm_devices::state_format`]). Both sides must agree exactly, e.g.
/// `esvm machine-state/2 devices/2 bench-marker/1 com1/1 ... vcpu-snapshot/1 sev-transfer/1
/// json`.
pub fn compat_extra() -> &'static [u8] {
    static EXTRA: OnceLock<Vec<u8>> = OnceLock::new();
    EXTRA.get_or_init(|| {
        format!(
            "esvm machine-state/{MACHINE_STATE_VERSION} {} vcpu-snapshot/{} sev-transfer/{} json",
            esvm_devices::state_format(),
            esvm_arch::VcpuSnapshot::VERSION,
            esvm_hv::sev::SEV_TRANSFER_VERSION,
        )
        .into_bytes()
    })
}

/// Why the trusted root for an SEV-ES destination could not be read.
#[allow(missing_docs)] // Each variant is documented by its #[error] message.
#[derive(Debug, Error)]
pub enum TrustError {
    #[error("cannot read the trusted root {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is neither a platform certificate chain (as `esvm platform export` writes it) \
         nor an ARK certificate: {reason}"
    )]
    Parse {
        path: std::path::PathBuf,
        reason: String,
    },
}

/// The root key (ARK) an operator trusts, from a chain file (`esvm platform export`) or a
/// bare ARK certificate.
pub fn trusted_root(bytes: &[u8]) -> Result<CaCert, String> {
    match CertChain::from_bytes(bytes) {
        Ok(chain) => Ok(chain.ark),
        Err(chain_err) => CaCert::from_bytes(bytes)
            .map_err(|ark_err| format!("as a chain: {chain_err}; as an ARK: {ark_err}")),
    }
}

/// [`trusted_root`] of a file.
pub fn read_trusted_root(path: &std::path::Path) -> Result<CaCert, TrustError> {
    let bytes = std::fs::read(path).map_err(|source| TrustError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    trusted_root(&bytes).map_err(|reason| TrustError::Parse {
        path: path.to_path_buf(),
        reason,
    })
}

pub use crate::transport::{tcp_url, MigrationUrl, UrlError};

/// The migration configuration a machine sends.
pub fn migration_config(c: &MachineConfig) -> MigrationConfig {
    MigrationConfig {
        mem_size: c.mem_size,
        vcpus: c.vcpus,
        vm_type: match c.vm_type {
            VmType::Plain => GuestType::Plain,
            VmType::SevEs => GuestType::SevEs,
        },
        features: 0,
        extra: compat_extra().to_vec(),
    }
}

/// `what` failed with `e` (kept as the error's source); the message is `"{what}: {e}"`.
fn source_err(what: &str, e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> SourceError {
    SourceError::failed_by(what, e)
}

/// The source VM as the migration sender drives it (on the migration thread, while the run
/// loop keeps running the guest until [`MigrationSource::pause`]).
///
/// The migration is registered in the VM's lifecycle from [`MachineSource::new`] until the
/// source is dropped ([`MachineSource::finish`]): committed (the VM is dead here), failed or
/// cancelled (the guest runs on), or — if the source still holds the guest stopped, because
/// the sender could not learn whether the destination committed — in doubt: the guest stays
/// stopped until the operator resumes it.
pub struct MachineSource {
    h: MachineHandle,
    url: String,
    /// The root the destination's platform chain must verify against (SEV-ES).
    trust: Option<CaCert>,
    /// The migration in the lifecycle; `None` once committed.
    ticket: Option<MigrationTicket>,
    /// Stop-and-copy: the guest is held stopped, its run loop parked.
    stopped: Option<StoppedGuard>,
}

impl MachineSource {
    /// A migration of the machine behind `h` to `url` (for messages and status). Refused if
    /// the lifecycle does not allow a migration now (one is running, a snapshot is being
    /// written, the last one is in doubt, the VM ended or migrated away).
    pub fn new(h: MachineHandle, url: impl Into<String>) -> Result<Self, LifecycleError> {
        let ticket = h.control.begin_migration()?;
        Ok(MachineSource {
            h,
            url: url.into(),
            trust: None,
            ticket: Some(ticket),
            stopped: None,
        })
    }

    /// Check an SEV-ES destination's platform chain against `ark` (the operator's trusted
    /// root) instead of the root this host's platform trusts.
    pub fn with_trust(mut self, ark: Option<CaCert>) -> Self {
        self.trust = ark;
        self
    }

    fn sev(&self) -> Result<&dyn SevVm, SourceError> {
        self.h
            .vm
            .sev()
            .ok_or_else(|| SourceError::failed("SEV-ES guests run only on the emu backend"))
    }

    /// End the migration in the lifecycle (what dropping the source does; see the type's
    /// documentation).
    pub fn finish(self) {}
}

impl Drop for MachineSource {
    fn drop(&mut self) {
        match (self.ticket.take(), self.stopped.take()) {
            // The sender left the guest stopped: it cannot know whether the destination
            // committed, so the guest must not run here until the operator says so.
            (Some(ticket), Some(stopped)) => ticket.in_doubt(stopped),
            // Failed or cancelled (the guest was resumed), or committed.
            (ticket, stopped) => {
                drop(stopped);
                drop(ticket);
            }
        }
    }
}

impl MigrationSource for MachineSource {
    fn config(&self) -> MigrationConfig {
        migration_config(&self.h.config)
    }

    fn start_dirty_log(&mut self) -> Result<(), SourceError> {
        // The log is always on; start a fresh interval (what it held so far is folded into
        // the written set, which the first pass sends in full).
        self.h
            .tracker
            .take()
            .map(|_| ())
            .map_err(|e| source_err("reading the dirty log", e))
    }

    fn written_pages(&mut self) -> Result<Option<PageSet>, SourceError> {
        self.h
            .tracker
            .ever_written()
            .map(Some)
            .map_err(|e| source_err("reading the dirty log", e))
    }

    fn take_dirty_log(&mut self) -> Result<PageSet, SourceError> {
        self.h
            .tracker
            .take()
            .map_err(|e| source_err("reading the dirty log", e))
    }

    fn restore_dirty_log(&mut self, pages: &PageSet) -> Result<(), SourceError> {
        self.h.tracker.give_back(pages);
        Ok(())
    }

    fn read_pages(&mut self, first_page: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        self.h
            .vm
            .memory()
            .read(first_page * PAGE_SIZE, buf)
            .map_err(|e| source_err("reading guest memory", e))
    }

    fn paused_pages(&self, first_page: u64, count: u64) -> Option<&[u8]> {
        // Only during stop-and-copy: the guard lives in `self`, so it outlives the slice (it
        // is dropped only by `resume(&mut self)` or `mark_dead(&mut self)`).
        let stopped = self.stopped.as_ref()?;
        self.h.stopped_ram(stopped, first_page, count).ok()
    }

    fn sev_send_start(&mut self, target_certs: &[u8]) -> Result<Vec<u8>, SourceError> {
        let chain = CertChain::from_bytes(target_certs).map_err(|e| {
            source_err(
                "the destination's platform certificate chain is malformed",
                e,
            )
        })?;
        let sev = self.sev()?;
        let root = match &self.trust {
            Some(ark) => ark.clone(),
            None => {
                let psp = sev
                    .platform()
                    .ok_or_else(|| SourceError::failed("the VM has no SEV-ES guest context"))?;
                let ark = psp
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .trusted_ark()
                    .clone();
                ark
            }
        };
        chain.verify(Some(&root)).map_err(|e| {
            SourceError::failed(format!(
                "the destination's platform certificate chain does not verify against the \
                 trusted root ({}): {e}; refusing to send the guest there",
                if self.trust.is_some() {
                    "given with --trust"
                } else {
                    "this platform's; pass the right one with --trust CHAIN"
                }
            ))
        })?;
        let start = sev
            .send_start(target_certs)
            .map_err(|e| source_err("SEND_START refused", e))?;
        Ok(start.to_bytes())
    }

    fn sev_page_packet(&mut self, page: u64, out: &mut Vec<u8>) -> Result<(), SourceError> {
        self.sev()?
            .send_page(page, out)
            .map_err(|e| source_err("SEND_UPDATE_DATA", e))
    }

    fn sev_finish_blob(&mut self) -> Result<Vec<u8>, SourceError> {
        self.sev()?
            .send_transcript_tag()
            .map(|t| t.to_vec())
            .map_err(|e| source_err("reading the send transcript tag", e))
    }

    fn sev_send_cancel(&mut self) -> Result<(), SourceError> {
        self.sev()?
            .send_cancel()
            .map_err(|e| source_err("SEND_CANCEL", e))
    }

    fn pause(&mut self) -> Result<(), SourceError> {
        if self.stopped.is_none() {
            let stopped = self
                .h
                .control
                .stop(PARK_TIMEOUT)
                .map_err(|e| source_err("pausing the guest", e))?;
            self.stopped = Some(stopped);
        }
        Ok(())
    }

    fn resume(&mut self) -> Result<(), SourceError> {
        self.stopped = None;
        Ok(())
    }

    fn device_state(&mut self) -> Result<Vec<u8>, SourceError> {
        let mut state = self
            .h
            .control
            .run_job(|m| m.save_state())
            .map_err(|e| source_err("saving the device state", e))?;
        // A VM the user paused arrives paused (the stop-and-copy hold is not the user's).
        state.user_paused = self.h.control.lifecycle().pauses().user;
        serde_json::to_vec(&state).map_err(|e| source_err("encoding the device state", e))
    }

    fn vcpu_state(&mut self, vcpu: u32) -> Result<Vec<u8>, SourceError> {
        if self.h.config.vm_type == VmType::SevEs {
            let t = self
                .h
                .control
                .run_job(move |m| m.send_vcpu_sev(vcpu))
                .map_err(|e| source_err("sending the vCPU state", e))?
                .map_err(|e| source_err("SEND_UPDATE_VMSA", e))?;
            return Ok(t.to_bytes());
        }
        let snap = self
            .h
            .control
            .run_job(move |m| m.save_vcpu(vcpu))
            .map_err(|e| source_err("saving the vCPU state", e))?
            .map_err(|e| source_err("saving the vCPU state", e))?;
        serde_json::to_vec(&snap).map_err(|e| source_err("encoding the vCPU state", e))
    }

    fn mark_dead(&mut self) {
        // Dead first, then the hold goes: the guest never runs here again.
        if let Some(ticket) = self.ticket.take() {
            ticket.commit(&self.url);
        }
        self.stopped = None;
        if self.h.config.vm_type == VmType::SevEs {
            // The destination committed: the guest left this platform for good.
            if let Some(sev) = self.h.vm.sev() {
                if let Err(e) = sev.send_finish() {
                    tracing::warn!("SEND_FINISH after the destination committed: {e}");
                }
            }
        }
    }
}

/// Give a discarded machine's guest memory back to the system (`MADV_DONTNEED`), whether
/// or not its mapping is unmapped when the machine is dropped: for machines nobody else
/// holds any more (an aborted incoming migration, a benchmark's machines once their threads
/// are joined and their handles dropped); it reads as zero afterwards. Refused (and nothing
/// happens) while the machine is shared.
pub fn release_guest_memory(m: &mut Machine) -> Result<(), RamError> {
    m.exclusive_ram()?.discard();
    Ok(())
}

/// Makes the serial output writer of a received machine.
pub type SerialFactory = Box<dyn FnMut() -> Box<dyn Write + Send> + Send>;

/// The destination: a fresh machine built from the incoming configuration, filled by the
/// receiver, and handed over by [`MachineTarget::into_machine`] once committed.
pub struct MachineTarget {
    backend: BackendKind,
    /// This host's secure processor (SEV-ES guests need one).
    platform: Option<Arc<Mutex<Psp>>>,
    sev_es: bool,
    prealloc: bool,
    serial: SerialFactory,
    machine: Option<Machine>,
    received: Option<PageSet>,
    state: Option<MachineState>,
    committed: bool,
    /// The committed VM was paused by its user at the source.
    arrived_paused: bool,
    /// Post-copy: where the machine goes when it starts with pages missing (the thread
    /// that runs it); `None`: post-copy is not offered.
    handoff: Option<std::sync::mpsc::Sender<PostcopyStart>>,
    /// Post-copy, from the switch on.
    postcopy: Option<PostcopyLink>,
}

/// A machine that starts running with pages still missing (post-copy), for the thread
/// that runs it; its pages keep arriving through the [`MachineTarget`].
pub struct PostcopyStart {
    /// The machine, to run at once.
    pub machine: Machine,
    /// Whether the VM was paused by its user at the source.
    pub arrived_paused: bool,
    /// The pages still missing and the demand faults on them (for status displays).
    pub missing: Arc<MissingPages>,
}

/// What the target keeps of a machine that runs elsewhere during post-copy.
struct PostcopyLink {
    missing: Arc<MissingPages>,
    /// Set once the machine was handed over (it runs).
    running: Option<(Arc<dyn Vm>, Arc<VmControl>)>,
}

/// `what` was refused because of `e` (kept as the error's source); the message is
/// `"refused: {what}: {e}"`.
fn refused(what: &str, e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> TargetError {
    TargetError::refused_by(what, e)
}

impl MachineTarget {
    /// A destination that builds its machine on `backend`, with COM1 writing to what
    /// `serial` makes.
    pub fn new(backend: BackendKind, serial: SerialFactory) -> Self {
        MachineTarget {
            backend,
            platform: None,
            sev_es: false,
            prealloc: false,
            serial,
            machine: None,
            received: None,
            state: None,
            committed: false,
            arrived_paused: false,
            handoff: None,
            postcopy: None,
        }
    }

    /// Offer post-copy (emu backend only): when the source switches, the machine is sent to
    /// `to` and must be run there at once, while the receiver keeps filling its missing
    /// pages. Drop the target (or call [`MachineTarget::end_handoff`]) when the receiver
    /// returns, so that the other end of the channel sees it end.
    pub fn with_postcopy(mut self, to: std::sync::mpsc::Sender<PostcopyStart>) -> Self {
        self.handoff = Some(to);
        self
    }

    /// Close the post-copy channel (the receiver returned).
    pub fn end_handoff(&mut self) {
        self.handoff = None;
    }

    /// Whether the machine was handed over for post-copy.
    pub fn switched_to_postcopy(&self) -> bool {
        self.postcopy.as_ref().is_some_and(|p| p.running.is_some())
    }

    /// Allocate (fault in) all of the destination's guest memory when the configuration
    /// is accepted, before any page arrives, as a VMM with preallocated guest RAM has it.
    /// The cost moves from the transfer to the setup, and the destination then uses its
    /// whole memory size at once (instead of only the pages that arrive).
    pub fn with_prealloc(mut self, on: bool) -> Self {
        self.prealloc = on;
        self
    }

    /// Receive SEV-ES guests into this platform (RECEIVE_*); without one they are refused.
    pub fn with_platform(mut self, psp: Option<Arc<Mutex<Psp>>>) -> Self {
        self.platform = psp;
        self
    }

    /// The incoming VM, for its SEV-ES extension ([`sev_of`]) (during post-copy: the VM
    /// that runs elsewhere).
    fn vm(&mut self) -> Result<Arc<dyn Vm>, TargetError> {
        if let Some((vm, _)) = self.postcopy.as_ref().and_then(|p| p.running.as_ref()) {
            return Ok(vm.clone());
        }
        Ok(self.machine_mut()?.vm().clone())
    }

    /// Whether the committed VM was paused by its user at the source: it should stay
    /// paused here until resumed (`esvm receive` does that).
    pub fn arrived_paused(&self) -> bool {
        self.committed && self.arrived_paused
    }

    /// The received machine, once committed.
    pub fn into_machine(self) -> Option<Machine> {
        if self.committed {
            self.machine
        } else {
            None
        }
    }

    fn machine_mut(&mut self) -> Result<&mut Machine, TargetError> {
        self.machine.as_mut().ok_or_else(|| {
            TargetError::Failed("no machine: the configuration was not accepted".into())
        })
    }
}

/// `vm`'s SEV-ES extension (RECEIVE_*), or the refusal of a destination without one.
fn sev_of(vm: &dyn Vm) -> Result<&dyn SevVm, TargetError> {
    vm.sev()
        .ok_or_else(|| TargetError::Failed("SEV-ES guests need the emu backend".into()))
}

impl MigrationTarget for MachineTarget {
    fn accept_config(&mut self, config: &MigrationConfig) -> Result<Vec<u8>, TargetError> {
        let certs = match config.vm_type {
            GuestType::Plain => Vec::new(),
            GuestType::SevEs => {
                if self.backend != BackendKind::Emu {
                    return Err(TargetError::Incompatible(format!(
                        "SEV-ES guests run only on the emu backend; this destination uses {}",
                        self.backend
                    )));
                }
                let psp = self.platform.as_ref().ok_or_else(|| {
                    TargetError::Incompatible(
                        "this destination has no SEV platform, so it cannot run SEV-ES guests; \
                         start `esvm receive` with --platform DIR"
                            .into(),
                    )
                })?;
                let chain = psp
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .pdh_cert_export();
                chain
                    .map_err(|e| {
                        TargetError::Incompatible(format!(
                            "this destination's platform cannot export its certificate chain: {e}"
                        ))
                    })?
                    .to_bytes()
            }
        };
        if config.extra != compat_extra() {
            return Err(TargetError::Incompatible(format!(
                "the source's state formats are {:?}, this destination reads {:?}; run the \
                 same esvm version on both hosts",
                String::from_utf8_lossy(&config.extra),
                String::from_utf8_lossy(compat_extra())
            )));
        }
        if config.features != 0 {
            return Err(TargetError::Incompatible(format!(
                "the source uses guest features {:#x} that this destination does not know",
                config.features
            )));
        }
        self.sev_es = config.vm_type == GuestType::SevEs;
        let mc = MachineConfig {
            backend: self.backend,
            vm_type: if self.sev_es {
                VmType::SevEs
            } else {
                VmType::Plain
            },
            mem_size: config.mem_size,
            vcpus: config.vcpus,
            max_instructions: None,
        };
        let machine = Machine::new(&mc, (self.serial)()).map_err(|e| {
            TargetError::Incompatible(format!(
                "cannot create a VM with {} of memory and {} vCPUs on the {} backend here: \
                 {e}",
                crate::size::format_size(config.mem_size),
                config.vcpus,
                self.backend
            ))
        })?;
        if self.prealloc {
            crate::ram::prealloc(machine.vm().memory());
        }
        self.received = Some(PageSet::new(config.pages()));
        self.machine = Some(machine);
        Ok(certs)
    }

    fn sev_receive_start(&mut self, session: &[u8]) -> Result<(), TargetError> {
        let start =
            SevSessionStart::from_bytes(session).map_err(|e| refused("the session start", e))?;
        let psp = self
            .platform
            .clone()
            .ok_or_else(|| TargetError::Failed("no SEV platform".into()))?;
        let vm = self.vm()?;
        let sev = sev_of(vm.as_ref())?;
        sev.receive_start(psp, &start)
            .map_err(|e| refused("RECEIVE_START", e))?;
        if self.prealloc {
            // The guest's private pages live in the encrypted view's own backing: fault it
            // in too, before the pages arrive.
            sev.prealloc_private();
        }
        Ok(())
    }

    fn receive_page_packet(&mut self, page: u64, packet: &[u8]) -> Result<(), TargetError> {
        let vm = self.vm()?;
        sev_of(vm.as_ref())?
            .receive_page(page, packet)
            .map_err(|e| refused(&format!("page {page}"), e))?;
        if let Some(r) = self.received.as_mut() {
            r.set(page);
        }
        Ok(())
    }

    fn sev_receive_finish(&mut self, blob: &[u8]) -> Result<(), TargetError> {
        let tag: [u8; 32] = blob.try_into().map_err(|_| {
            TargetError::Refused(format!(
                "the finish blob is {} bytes, a transcript tag has 32",
                blob.len()
            ))
        })?;
        let vm = self.vm()?;
        sev_of(vm.as_ref())?
            .receive_finish(&tag)
            .map_err(|e| refused("RECEIVE_FINISH", e))
    }

    fn pages_mut(&mut self, first_page: u64, count: u64) -> Result<&mut [u8], TargetError> {
        if self.switched_to_postcopy() {
            let vm = match self.postcopy.as_ref().and_then(|p| p.running.as_ref()) {
                Some((vm, _)) => vm,
                None => return Err(TargetError::Failed("no post-copy machine".into())),
            };
            // The guest runs elsewhere. The receiver asks only for missing pages, fills the
            // slice, and drops it before its next call (the borrow of `self` says so), so
            // this is the only slice of these pages; it publishes them afterwards.
            // SAFETY: as just said, no other slice of these pages exists while it lives.
            return unsafe { vm.missing_pages_mut(first_page, count) }
                .map_err(TargetError::failed_by);
        }
        if let Some(r) = self.received.as_mut() {
            r.set_range(first_page, count);
        }
        // The machine has never run and nobody else holds it (checked): the receiver writes
        // the pages in place. The writes bypass the dirty log; `received` records them for
        // the machine's written-page set at commit.
        self.machine_mut()?
            .exclusive_ram()
            .and_then(|ram| ram.pages_mut(first_page, count))
            .map_err(TargetError::failed_by)
    }

    fn apply_device_state(&mut self, state: &[u8]) -> Result<(), TargetError> {
        let s: MachineState =
            serde_json::from_slice(state).map_err(|e| refused("the device state", e))?;
        let vcpus = self.machine_mut()?.config().vcpus as usize;
        if s.instructions.len() != vcpus {
            return Err(TargetError::Refused(format!(
                "the device state: it describes {} vCPUs, the VM has {vcpus}",
                s.instructions.len()
            )));
        }
        self.state = Some(s);
        Ok(())
    }

    fn apply_vcpu_state(&mut self, vcpu: u32, state: &[u8]) -> Result<(), TargetError> {
        if self.sev_es {
            let t = SevVcpuTransfer::from_bytes(state).map_err(|e| refused("the vCPU state", e))?;
            return self
                .machine_mut()?
                .receive_vcpu_sev(vcpu, &t)
                .map_err(|e| refused(&format!("the state of vCPU {vcpu}"), e));
        }
        let snap: esvm_arch::VcpuSnapshot =
            serde_json::from_slice(state).map_err(|e| refused("the vCPU state", e))?;
        self.machine_mut()?
            .restore_vcpu(vcpu, &snap)
            .map_err(|e| refused(&format!("the state of vCPU {vcpu}"), e))
    }

    fn commit(&mut self) -> Result<(), TargetError> {
        if self.switched_to_postcopy() {
            // Every page arrived and was published; the machine runs elsewhere.
            self.committed = true;
            return Ok(());
        }
        let state = self
            .state
            .take()
            .ok_or_else(|| TargetError::Failed("no device state arrived".into()))?;
        let received = self.received.take();
        let m = self.machine_mut()?;
        m.restore_state(&state)
            .map_err(|e| refused("the device state", e))?;
        if let Some(r) = received {
            m.tracker().mark_written(&r);
        }
        self.arrived_paused = state.user_paused;
        self.committed = true;
        Ok(())
    }

    fn postcopy_supported(&self) -> bool {
        self.handoff.is_some() && self.backend == BackendKind::Emu
    }

    fn postcopy_begin(&mut self, pending: &PageSet) -> Result<(), TargetError> {
        let vm = self.vm()?;
        let missing = vm
            .begin_postcopy(pending.words())
            .map_err(|e| refused("post-copy", e))?;
        // Every page is (or will be) written: a later migration from here must send them.
        if let Some(r) = self.received.as_mut() {
            r.union(pending);
        }
        self.postcopy = Some(PostcopyLink {
            missing,
            running: None,
        });
        Ok(())
    }

    fn postcopy_run(&mut self) -> Result<(), TargetError> {
        let state = self
            .state
            .take()
            .ok_or_else(|| TargetError::Failed("no device state arrived".into()))?;
        let received = self.received.take();
        let missing = self
            .postcopy
            .as_ref()
            .map(|p| p.missing.clone())
            .ok_or_else(|| TargetError::Failed("post-copy run before the switch".into()))?;
        let m = self.machine_mut()?;
        m.restore_state(&state)
            .map_err(|e| refused("the device state", e))?;
        if let Some(r) = received {
            m.tracker().mark_written(&r);
        }
        let running = (m.vm().clone(), m.control().clone());
        let handoff = self
            .handoff
            .clone()
            .ok_or(TargetError::Unsupported { what: "post-copy" })?;
        let machine = self
            .machine
            .take()
            .ok_or_else(|| TargetError::Failed("no machine".into()))?;
        if let Some(p) = self.postcopy.as_mut() {
            p.running = Some(running);
        }
        handoff
            .send(PostcopyStart {
                machine,
                arrived_paused: state.user_paused,
                missing,
            })
            .map_err(|_| {
                TargetError::Failed("nothing runs the post-copy machine (an esvm bug)".into())
            })
    }

    fn postcopy_publish(&mut self, first_page: u64, count: u64) -> Result<(), TargetError> {
        let p = self
            .postcopy
            .as_ref()
            .ok_or_else(|| TargetError::Failed("publish before the switch".into()))?;
        if let Some(why) = p.missing.failure() {
            // The machine could not run (or stopped for good): end the migration.
            return Err(TargetError::Failed(why));
        }
        p.missing.publish(first_page, count);
        Ok(())
    }

    fn postcopy_faults(&mut self, out: &mut Vec<u64>) {
        if let Some(p) = &self.postcopy {
            p.missing.take_faults(out);
        }
    }

    fn abort(&mut self) {
        if let Some(p) = self.postcopy.take() {
            // Post-copy: the guest may run elsewhere. Every access to a missing page fails
            // from now on, and the run loop ends: it never runs on with a page missing.
            let why = "the incoming migration failed after the switch to post-copy; the \
                       pages still at the source are lost";
            p.missing.fail(why);
            if let Some((_, control)) = p.running {
                let _ = control.request_stop(crate::outcome::Outcome::MigrationLost(why.into()));
            }
        }
        // The machine never ran and nobody else holds it: free what it received at once.
        if let Some(mut m) = self.machine.take() {
            if let Some(sev) = m.vm().sev().filter(|s| s.handle().is_some()) {
                if let Err(e) = sev.decommission() {
                    tracing::warn!("DECOMMISSION of the aborted incoming guest: {e}");
                }
            }
            if let Err(e) = release_guest_memory(&mut m) {
                tracing::warn!("cannot give the aborted incoming guest's memory back: {e}");
            }
        }
        self.received = None;
        self.state = None;
        self.committed = false;
        self.arrived_paused = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::Outcome;
    use crate::runctl::Hold;
    use esvm_migration::{Receiver, ReceiverConfig, Sender, SenderConfig};
    use std::sync::{Arc, Mutex};

    /// Serial output collected in memory.
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Buf {
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
        }
    }

    /// A whole migration in one process: the demo guest moves mid-run from one machine to
    /// another and finishes there with exactly the output of a run that never moved.
    #[test]
    fn a_running_guest_moves_and_finishes_exactly() {
        let (iterations, dirty) = (300_000u64, 1u64);
        let args = format!("iterations={iterations} dirty-mib={dirty}");
        let mem = 16u64 << 20;
        let src_out = Buf::default();
        let mut src = Machine::new(
            &MachineConfig {
                backend: BackendKind::Emu,
                vm_type: VmType::Plain,
                mem_size: mem,
                vcpus: 1,
                max_instructions: None,
            },
            Box::new(src_out.clone()),
        )
        .unwrap();
        src.load(esvm_guests::builtin("demo").unwrap().elf, &args)
            .unwrap();
        let h = src.handle();
        // Held until pre-copy starts (so the guest cannot end before the migration), then
        // running while its memory is copied.
        let mut hold = Some(h.control.hold().unwrap());
        let src_thread = std::thread::spawn(move || src.run().map(|o| (o, src)));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let dst_out = Buf::default();
        let out2 = dst_out.clone();
        let dst_thread = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut t = MachineTarget::new(
                BackendKind::Emu,
                Box::new(move || Box::new(out2.clone()) as Box<dyn Write + Send>),
            );
            Receiver::new(ReceiverConfig::default())
                .run_tcp(&mut t, s)
                .unwrap();
            t.into_machine().unwrap()
        });
        let mut source = MachineSource::new(h.clone(), "tcp://test").unwrap();
        let mut sender = Sender::new(SenderConfig::default());
        sender.on_progress(move |p| {
            if p.phase == esvm_migration::Phase::PreCopy {
                drop(hold.take());
            }
        });
        let o = sender
            .run_tcp(&mut source, std::net::TcpStream::connect(addr).unwrap())
            .unwrap();
        assert!(o.passes >= 2, "{o:?}");
        let (outcome, _) = src_thread.join().unwrap().unwrap();
        assert_eq!(outcome, Outcome::Migrated("tcp://test".into()));
        let mut dst = dst_thread.join().unwrap();
        assert_eq!(dst.run().unwrap(), Outcome::Exited(0));
        let expected = esvm_guests::demo::expected_output(mem, 1, &args, iterations, dirty);
        assert_eq!(src_out.text() + &dst_out.text(), expected);
        // The dead source refuses to run again.
        assert!(h.control.hold().is_err());
    }

    fn emulated_ca(n: usize) -> &'static esvm_psp::EmulatedAmdCa {
        static CAS: [std::sync::OnceLock<esvm_psp::EmulatedAmdCa>; 2] =
            [std::sync::OnceLock::new(), std::sync::OnceLock::new()];
        CAS[n].get_or_init(|| esvm_psp::EmulatedAmdCa::generate(2048).unwrap())
    }

    /// A platform under emulated AMD root `ca` (0 or 1).
    fn platform(ca: usize) -> Arc<Mutex<Psp>> {
        let mut psp = Psp::ephemeral(emulated_ca(ca), Default::default()).unwrap();
        psp.init().unwrap();
        Arc::new(Mutex::new(psp))
    }

    /// An SEV-ES machine running `sevdemo` with `args`, launched on `psp` with `policy`,
    /// held before its first instruction.
    fn sev_source(
        psp: Arc<Mutex<Psp>>,
        policy: u32,
        vcpus: u32,
        args: &str,
        out: Buf,
    ) -> (Machine, MachineHandle, Hold<Machine>) {
        let mut m = Machine::new(
            &MachineConfig {
                backend: BackendKind::Emu,
                vm_type: VmType::SevEs,
                mem_size: 16 << 20,
                vcpus,
                max_instructions: None,
            },
            Box::new(out),
        )
        .unwrap();
        let boot = m
            .load(esvm_guests::builtin("sevdemo").unwrap().elf, args)
            .unwrap();
        crate::sev_launch::launch_on(
            &mut m,
            &crate::sev_launch::measured_regions(&boot),
            psp,
            &crate::sev_launch::SevLaunchArgs {
                platform: std::path::Path::new("-"),
                session: None,
                measurement_out: None,
                secret: None,
                policy: Some(policy),
            },
        )
        .unwrap();
        let h = m.handle();
        let hold = h.control.hold().unwrap();
        (m, h, hold)
    }

    /// Migrate the SEV-ES machine behind `h` (running in `src_thread`) to a destination on
    /// `dst_platform`; the guest is let run (`hold` released) once pre-copy starts.
    fn migrate_sev(
        h: &MachineHandle,
        hold: Hold<Machine>,
        dst_platform: Option<Arc<Mutex<Psp>>>,
        trust: Option<CaCert>,
        dst_out: Buf,
    ) -> (
        Result<esvm_migration::SendOutcome, esvm_migration::SendError>,
        Result<Machine, esvm_migration::ReceiveError>,
    ) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let dst_thread = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut t = MachineTarget::new(
                BackendKind::Emu,
                Box::new(move || Box::new(dst_out.clone()) as Box<dyn Write + Send>),
            )
            .with_platform(dst_platform);
            Receiver::new(ReceiverConfig::default())
                .run_tcp(&mut t, s)
                .map(|_| t.into_machine().unwrap())
        });
        let mut source = MachineSource::new(h.clone(), "tcp://test")
            .unwrap()
            .with_trust(trust);
        let mut sender = Sender::new(SenderConfig::default());
        let mut hold = Some(hold);
        sender.on_progress(move |p| {
            if p.phase == esvm_migration::Phase::PreCopy {
                drop(hold.take());
            }
        });
        let sent = sender.run_tcp(&mut source, std::net::TcpStream::connect(addr).unwrap());
        // A refusal before pre-copy leaves the guest held by the test: let it run.
        drop(sender);
        source.finish();
        (sent, dst_thread.join().unwrap())
    }

    /// Issue 4 item 5: an SEV-ES guest moves mid-run between two platforms through SEND_* /
    /// RECEIVE_* and finishes exactly as a run that never moved; the source is dead.
    #[test]
    fn an_sev_es_guest_moves_between_platforms_and_finishes_exactly() {
        let (iterations, dirty) = (300_000u64, 1u64);
        let args = format!("iterations={iterations} dirty-mib={dirty}");
        let src_out = Buf::default();
        // Two vCPUs: the parked AP's VMSA travels too.
        let (mut src, h, hold) = sev_source(platform(0), 0x4, 2, &args, src_out.clone());
        let src_thread = std::thread::spawn(move || src.run().map(|o| (o, src)));
        let dst_out = Buf::default();
        let (sent, received) = migrate_sev(&h, hold, Some(platform(0)), None, dst_out.clone());
        let o = sent.unwrap();
        assert!(o.passes >= 2, "{o:?}");
        let (outcome, _) = src_thread.join().unwrap().unwrap();
        assert_eq!(outcome, Outcome::Migrated("tcp://test".into()));
        let mut dst = received.unwrap();
        assert_eq!(dst.run().unwrap(), Outcome::Exited(0));
        let expected =
            esvm_guests::demo::expected_output_sev(16 << 20, 2, &args, iterations, dirty);
        assert_eq!(src_out.text() + &dst_out.text(), expected);
        assert!(h.control.hold().is_err(), "the source is dead");
    }

    /// Refusals before anything secret moves — no SEV platform at the destination, NOSEND,
    /// DOMAIN with another owner, a chain that does not verify against the trusted root —
    /// leave the source running; it finishes with the right output.
    #[test]
    fn sev_es_refusals_leave_the_source_running() {
        let args = "iterations=20000";
        let expected = esvm_guests::demo::expected_output_sev(16 << 20, 1, args, 20_000, 0);
        let other_root = platform(1).lock().unwrap().trusted_ark().clone();
        type Case = (
            &'static str,
            u32,
            Option<Arc<Mutex<Psp>>>,
            Option<CaCert>,
            &'static str,
        );
        let cases: [Case; 4] = [
            ("no platform", 0x4, None, None, "no SEV platform"),
            ("NOSEND", 0x4 | 0x8, Some(platform(0)), None, "NOSEND"),
            ("DOMAIN", 0x4 | 0x10, Some(platform(0)), None, "DOMAIN"),
            (
                "trust",
                0x4,
                Some(platform(0)),
                Some(other_root),
                "trusted root",
            ),
        ];
        for (what, policy, dst, trust, needle) in cases {
            let out = Buf::default();
            let (mut src, h, hold) = sev_source(platform(0), policy, 1, args, out.clone());
            let src_thread = std::thread::spawn(move || src.run());
            let (sent, received) = migrate_sev(&h, hold, dst, trust, Buf::default());
            let e = sent.unwrap_err().to_string();
            assert!(e.contains(needle), "{what}: {e}");
            assert!(received.is_err(), "{what}");
            assert_eq!(src_thread.join().unwrap().unwrap(), Outcome::Exited(0));
            assert_eq!(out.text(), expected, "{what}");
        }
    }

    #[test]
    fn target_refuses_sev_es_without_a_platform_and_foreign_formats() {
        let mut t = MachineTarget::new(BackendKind::Emu, Box::new(|| Box::new(std::io::sink())));
        let mut c = migration_config(&MachineConfig {
            backend: BackendKind::Emu,
            vm_type: VmType::SevEs,
            mem_size: 4 << 20,
            vcpus: 1,
            max_instructions: None,
        });
        let e = t.accept_config(&c).unwrap_err();
        assert!(e.to_string().contains("--platform"), "{e}");
        c.vm_type = GuestType::Plain;
        c.extra = b"other".to_vec();
        let e = t.accept_config(&c).unwrap_err();
        assert!(e.to_string().contains("same esvm version"), "{e}");
        // A source from before the device registry (machine state 1, fixed device fields).
        c.extra = b"esvm machine-state/1 vcpu-snapshot/1 sev-transfer/1 json".to_vec();
        let e = t.accept_config(&c).unwrap_err().to_string();
        assert!(e.contains("machine-state/1 vcpu-snapshot/1"), "{e}");
        assert!(e.contains("same esvm version"), "{e}");
        let ours = String::from_utf8(compat_extra().to_vec()).unwrap();
        assert!(
            ours.starts_with("esvm machine-state/2 devices/2 "),
            "{ours}"
        );
        assert!(
            ours.contains(" com1/1 ") && ours.contains(" pic/1 "),
            "{ours}"
        );
        c.extra = compat_extra().to_vec();
        assert_eq!(t.accept_config(&c).unwrap(), Vec::<u8>::new());
        assert!(t.apply_device_state(b"{not json").is_err());
        assert!(t.apply_vcpu_state(0, b"[]").is_err());
        assert!(t.commit().is_err(), "no device state yet");
        t.abort();
        assert!(t.into_machine().is_none());
    }
}
