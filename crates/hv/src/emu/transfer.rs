//! SEV-ES guests leaving and entering an emu VM through the secure processor: SEND_* on the
//! source, RECEIVE_* on the destination, for live migration and sealed snapshots.
//!
//! What travels, and who can read it:
//! - a **private** page as a firmware transport packet (SEND_UPDATE_DATA: TEK-encrypted,
//!   TIK-authenticated, bound to its address); the hypervisor never sees its plaintext;
//! - a **shared** page (one the guest shares with the host, e.g. its GHCB) as the bytes the
//!   host sees anyway, as hypervisors send them on hardware;
//! - each vCPU as a VMSA packet (SEND_UPDATE_VMSA) that also carries the
//!   [`TrackedExtension`] (APIC base, GHCB address, AP state), plus the hypervisor's own,
//!   non-secret per-vCPU state ([`SevHostVcpuState`]: TSC, GHCB MSR, GHCB protocol state).
//!
//! At the destination the firmware hands back what it decrypted and verified: those values
//! — not anything the hypervisor read from the stream — become the tracked registers.
//!
//! The packet and state formats here are esvm's; they are opaque to the migration protocol.

use esvm_arch::layout;
use esvm_arch::vmsa::Vmsa;
use esvm_psp::session::PACKET_HEADER_LEN;
use esvm_psp::{PacketHeader, Policy, SendStartOut, TrackedExtension, TrackedRegisters};

use super::{EmuVcpu, EmuVm};
use crate::ghcb::ApResetHold;
use crate::sev::{self, psp_err, MemoryController, PrivateView, SevVm};
use crate::{HvError, Result, VmType};

const PAGE: usize = 4096;
const KIND_PRIVATE: u8 = 1;
const KIND_SHARED: u8 = 2;

/// Length of an encoded private-page packet: kind, firmware header, ciphertext.
pub const PRIVATE_PACKET_LEN: usize = 1 + PACKET_HEADER_LEN + PAGE;
/// Length of an encoded shared-page packet: kind, the page's bytes.
pub const SHARED_PACKET_LEN: usize = 1 + PAGE;

fn sev(msg: impl Into<String>) -> HvError {
    HvError::Sev(msg.into())
}

/// One guest page in transit, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PagePacket<'a> {
    /// A private page: the firmware's transport packet.
    Private {
        header: PacketHeader,
        ciphertext: &'a [u8],
    },
    /// A shared page: its host-visible bytes.
    Shared(&'a [u8]),
}

impl<'a> PagePacket<'a> {
    /// Decode an encoded packet (see [`EmuVm::sev_send_page`]), checking its length.
    pub fn decode(b: &'a [u8]) -> Result<PagePacket<'a>> {
        match (b.first(), b.len()) {
            (Some(&KIND_PRIVATE), PRIVATE_PACKET_LEN) => Ok(PagePacket::Private {
                header: PacketHeader::from_bytes(&b[1..1 + PACKET_HEADER_LEN])
                    .ok_or_else(|| sev("bad transport packet header"))?,
                ciphertext: &b[1 + PACKET_HEADER_LEN..],
            }),
            (Some(&KIND_SHARED), SHARED_PACKET_LEN) => Ok(PagePacket::Shared(&b[1..])),
            (kind, len) => Err(sev(format!(
                "malformed page packet: kind {kind:?}, {len} bytes (expected kind 1 with \
                 {PRIVATE_PACKET_LEN} bytes or kind 2 with {SHARED_PACKET_LEN})"
            ))),
        }
    }
}

/// The hypervisor's own state of a protected vCPU: what a hypervisor on hardware holds
/// outside the encrypted VMSA (VMCB control area, its GHCB bookkeeping). Not secret, and not
/// trusted by the destination beyond what it checks against the authenticated extension.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SevHostVcpuState {
    pub tsc: u64,
    pub ghcb_msr: u64,
    pub ghcb_version: Option<u16>,
    pub ghcb_registered_gpa: Option<u64>,
    pub ap_reset_hold: Option<ApResetHold>,
    pub dr7: u64,
}

/// One protected vCPU in transit: its VMSA packet (firmware header + ciphertext of the VMSA
/// and the tracked extension) and the hypervisor's state.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SevVcpuTransfer {
    pub vmsa_header: Vec<u8>,
    pub vmsa_ciphertext: Vec<u8>,
    pub host: SevHostVcpuState,
}

/// The VM-wide hypervisor state of an SEV-ES VM (GHCB bookkeeping).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SevHostVmState {
    pub ap_jump_table: u64,
}

/// SEND_START's output in the form RECEIVE_START takes it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SevSessionStart {
    pub policy: u32,
    /// The source platform's PDH certificate.
    pub pdh: Vec<u8>,
    /// The transport keys wrapped for the target's PDH.
    pub session: Vec<u8>,
}

/// Read a `u32` length-prefixed field at `*at`, advancing it.
fn take_field<'a>(b: &'a [u8], at: &mut usize, what: &str) -> Result<&'a [u8]> {
    let bad = || sev(format!("truncated {what}"));
    let len_bytes = b.get(*at..*at + 4).ok_or_else(bad)?;
    let len = u32::from_le_bytes(len_bytes.try_into().expect("4 bytes")) as usize;
    let field = b.get(*at + 4..*at + 4 + len).ok_or_else(bad)?;
    *at += 4 + len;
    Ok(field)
}

fn put_field(out: &mut Vec<u8>, field: &[u8]) {
    out.extend_from_slice(&(field.len() as u32).to_le_bytes());
    out.extend_from_slice(field);
}

impl SevSessionStart {
    /// Wire form: `policy u32, pdh (u32 length + bytes), session (u32 length + bytes)`.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = self.policy.to_le_bytes().to_vec();
        put_field(&mut out, &self.pdh);
        put_field(&mut out, &self.session);
        out
    }

    pub fn from_bytes(b: &[u8]) -> Result<SevSessionStart> {
        let policy = b
            .get(..4)
            .map(|p| u32::from_le_bytes(p.try_into().expect("4 bytes")))
            .ok_or_else(|| sev("truncated session start"))?;
        let mut at = 4;
        let pdh = take_field(b, &mut at, "session start (PDH)")?.to_vec();
        let session = take_field(b, &mut at, "session start (session blob)")?.to_vec();
        if at != b.len() {
            return Err(sev("trailing bytes after the session start"));
        }
        Ok(SevSessionStart {
            policy,
            pdh,
            session,
        })
    }
}

impl SevVcpuTransfer {
    /// Wire form: `VMSA packet header (u32 length + bytes), VMSA ciphertext (u32 length +
    /// bytes), the hypervisor's state as JSON (the rest)`.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.vmsa_ciphertext.len() + 512);
        put_field(&mut out, &self.vmsa_header);
        put_field(&mut out, &self.vmsa_ciphertext);
        out.extend_from_slice(&serde_json::to_vec(&self.host).expect("plain integers serialise"));
        out
    }

    pub fn from_bytes(b: &[u8]) -> Result<SevVcpuTransfer> {
        let mut at = 0;
        let vmsa_header = take_field(b, &mut at, "vCPU state (VMSA header)")?.to_vec();
        let vmsa_ciphertext = take_field(b, &mut at, "vCPU state (VMSA packet)")?.to_vec();
        let host = serde_json::from_slice(&b[at..])
            .map_err(|e| sev(format!("the hypervisor's vCPU state: {e}")))?;
        Ok(SevVcpuTransfer {
            vmsa_header,
            vmsa_ciphertext,
            host,
        })
    }
}

impl From<&SendStartOut> for SevSessionStart {
    fn from(o: &SendStartOut) -> Self {
        SevSessionStart {
            policy: o.policy.0,
            pdh: o.pdh.as_bytes().to_vec(),
            session: o.session.to_bytes().to_vec(),
        }
    }
}

impl EmuVm {
    /// SEND_START towards the platform whose certificate chain (or bare PDH) is `target`:
    /// the firmware enforces the guest policy (NOSEND, DOMAIN, ES, minimum API) and agrees
    /// fresh transport keys with the target. The guest keeps running.
    pub fn sev_send_start(&self, target: &[u8]) -> Result<SevSessionStart> {
        let ctx = self.sev_vm()?;
        let mut psp = ctx.psp();
        let out = psp.send_start(ctx.handle, target).map_err(psp_err)?;
        let worker = psp.send_worker(ctx.handle).map_err(psp_err)?;
        *lock(&ctx.send_worker) = Some(worker);
        Ok(SevSessionStart::from(&out))
    }

    /// Append page `page`'s packet to `out`: SEND_UPDATE_DATA for a private page, its bytes
    /// for a shared one. The guest may be running: a page it changes or converts afterwards
    /// is in the dirty log and is sent again.
    pub fn sev_send_page(&self, page: u64, out: &mut Vec<u8>) -> Result<()> {
        let ctx = self.sev_vm()?;
        let gpa = page
            .checked_mul(PAGE as u64)
            .filter(|g| g + PAGE as u64 <= self.memory.size())
            .ok_or_else(|| sev(format!("page {page} lies outside guest memory")))?;
        let at = out.len();
        if self.phys.is_private(page) {
            let worker = lock(&ctx.send_worker)
                .clone()
                .ok_or_else(|| sev("no send session: SEND_START first"))?;
            out.resize(at + PRIVATE_PACKET_LEN, 0);
            let view = PrivateView(self.phys.clone());
            let body = &mut out[at + 1 + PACKET_HEADER_LEN..];
            match worker.send_update_data_into(&view, gpa, body) {
                Ok(h) => {
                    out[at] = KIND_PRIVATE;
                    out[at + 1..at + 1 + PACKET_HEADER_LEN].copy_from_slice(&h.to_bytes());
                }
                Err(e) => {
                    out.truncate(at);
                    return Err(psp_err(e));
                }
            }
        } else {
            out.resize(at + SHARED_PACKET_LEN, 0);
            out[at] = KIND_SHARED;
            if let Err(e) = self.phys.read_host(gpa, &mut out[at + 1..]) {
                out.truncate(at);
                return Err(sev(format!("reading shared page {page}: {e}")));
            }
        }
        Ok(())
    }

    /// The transcript tag of every packet sent so far (for the target's RECEIVE_FINISH);
    /// the send session stays open.
    pub fn sev_send_transcript_tag(&self) -> Result<[u8; 32]> {
        let ctx = self.sev_vm()?;
        let tag = ctx.psp().send_transcript_tag(ctx.handle).map_err(psp_err);
        tag
    }

    /// SEND_FINISH: the guest has left; it never runs here again.
    pub fn sev_send_finish(&self) -> Result<[u8; 32]> {
        let ctx = self.sev_vm()?;
        lock(&ctx.send_worker).take();
        let tag = ctx.psp().send_finish(ctx.handle).map_err(psp_err);
        tag
    }

    /// SEND_CANCEL: the migration failed; the guest runs on here.
    pub fn sev_send_cancel(&self) -> Result<()> {
        let ctx = self.sev_vm()?;
        lock(&ctx.send_worker).take();
        let r = ctx.psp().send_cancel(ctx.handle).map_err(psp_err);
        r
    }

    /// The VM-wide hypervisor state that travels with the guest.
    pub fn sev_host_state(&self) -> Result<SevHostVmState> {
        let ctx = self.sev_vm()?;
        let vm = *lock(&ctx.ghcb_vm);
        Ok(SevHostVmState {
            ap_jump_table: vm.ap_jump_table,
        })
    }

    /// Take over the VM-wide hypervisor state of an incoming guest.
    pub fn sev_set_host_state(&self, s: &SevHostVmState) -> Result<()> {
        let ctx = self.sev_vm()?;
        lock(&ctx.ghcb_vm).ap_jump_table = s.ap_jump_table;
        Ok(())
    }

    /// RECEIVE_START (+ ACTIVATE) on a fresh SEV-ES VM: the firmware unwraps the transport
    /// keys with this platform's PDH and creates the guest context with a new memory key,
    /// which is wired to the CPU model's memory controller.
    pub fn sev_receive_start(
        &self,
        psp: std::sync::Arc<std::sync::Mutex<esvm_psp::Psp>>,
        start: &SevSessionStart,
    ) -> Result<u32> {
        if self.config.vm_type != VmType::SevEs {
            return Err(sev(
                "RECEIVE_START needs a VM created as SEV-ES (VmType::SevEs)",
            ));
        }
        self.moves.check_launch()?;
        if self.sev.get().is_some() {
            return Err(sev("this VM already has an SEV-ES guest context"));
        }
        let (handle, key) = {
            let mut p = psp.lock().unwrap_or_else(|e| e.into_inner());
            let handle = p
                .receive_start(Policy(start.policy), &start.pdh, &start.session)
                .map_err(psp_err)?;
            let activated = sev::activate_free_asid(&mut p, handle)
                .and_then(|_| p.memory_controller_key(handle).map_err(psp_err));
            match activated {
                Ok(key) => (handle, key),
                Err(e) => {
                    let _ = p.deactivate(handle);
                    let _ = p.decommission(handle);
                    return Err(e);
                }
            }
        };
        // From here on the context frees itself (SevVm's Drop) if anything fails.
        let ctx = SevVm::new(psp, handle);
        let worker = ctx.psp().receive_worker(handle).map_err(psp_err)?;
        self.phys
            .enable_encryption(std::sync::Arc::new(MemoryController(key)))
            .map_err(|e| sev(e.to_string()))?;
        *lock(&ctx.recv_worker) = Some(worker);
        let _ = self.sev.set(std::sync::Arc::new(ctx));
        Ok(handle)
    }

    /// Apply one incoming page: RECEIVE_UPDATE_DATA for a private page (the firmware checks
    /// its MAC and address binding before anything is written), a host write for a shared
    /// one. Called only before the guest runs here.
    pub fn sev_receive_page(&self, page: u64, packet: &[u8]) -> Result<()> {
        let ctx = self.sev_vm()?;
        let gpa = page
            .checked_mul(PAGE as u64)
            .filter(|g| g + PAGE as u64 <= self.memory.size())
            .ok_or_else(|| sev(format!("page {page} lies outside guest memory")))?;
        match PagePacket::decode(packet)? {
            PagePacket::Private { header, ciphertext } => {
                let worker = lock(&ctx.recv_worker)
                    .clone()
                    .ok_or_else(|| sev("no receive session: RECEIVE_START first"))?;
                let view = PrivateView(self.phys.clone());
                worker
                    .receive_update_data(&view, gpa, &header, ciphertext)
                    .map_err(psp_err)
            }
            PagePacket::Shared(bytes) => self
                .phys
                .write_host(gpa, bytes)
                .map_err(|e| sev(format!("writing shared page {page}: {e}"))),
        }
    }

    /// RECEIVE_FINISH: the firmware checks the source's transcript tag against every packet
    /// it accepted; only then may the guest run here.
    pub fn sev_receive_finish(&self, tag: &[u8; 32]) -> Result<()> {
        let ctx = self.sev_vm()?;
        lock(&ctx.recv_worker).take();
        let r = ctx.psp().receive_finish(ctx.handle, tag).map_err(psp_err);
        r
    }

    /// Give up an incoming guest that will never run (DEACTIVATE + DECOMMISSION).
    pub fn sev_decommission(&self) -> Result<()> {
        let ctx = self.sev_vm()?;
        lock(&ctx.recv_worker).take();
        let mut p = ctx.psp();
        p.deactivate(ctx.handle).map_err(psp_err)?;
        p.decommission(ctx.handle).map_err(psp_err)
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl EmuVcpu {
    /// SEND_UPDATE_VMSA for this protected vCPU at a clean point (not in the middle of an
    /// exit or of a GHCB request).
    pub(crate) fn sev_send_state_impl(&self) -> Result<SevVcpuTransfer> {
        let ctx = self.sev_context()?;
        let s = self
            .sev
            .as_ref()
            .filter(|s| s.protected)
            .ok_or_else(|| sev(format!("vCPU {} is not a protected SEV-ES vCPU", self.id)))?;
        if self.awaiting != super::Awaiting::Nothing
            || s.in_flight.is_some()
            || !s.outbox.is_empty()
            || self.ghcb_read.is_some()
        {
            return Err(HvError::InvalidState(format!(
                "vCPU {} is in the middle of an exit or a GHCB request; run it to its next \
                 exit first",
                self.id
            )));
        }
        let ghcb_msr = self.cpu.ghcb_msr();
        let mut ap_flags = 0;
        if s.ghcb.ap_reset_hold.is_some() {
            ap_flags |= TrackedExtension::AP_RESET_HOLD;
        }
        if self.cpu.events().halted {
            ap_flags |= TrackedExtension::HALTED;
        }
        let ext = TrackedExtension {
            ap_flags,
            apic_base: s.tracked.apic_base,
            ghcb_gpa: ghcb_gpa_of(ghcb_msr),
        };
        let gpa = layout::vmsa_addr(self.id);
        let vmsa = self.cpu.to_vmsa();
        let psp = ctx.psp();
        // The CPU model saves its state into the VMSA (host copy: ciphertext); the firmware
        // re-wraps it for transport.
        let sealed = psp
            .seal_vmsa(ctx.handle, gpa, vmsa.as_bytes())
            .map_err(psp_err)?;
        let (header, ciphertext) = psp
            .send_update_vmsa(ctx.handle, self.id, gpa, &sealed, &ext)
            .map_err(psp_err)?;
        Ok(SevVcpuTransfer {
            vmsa_header: header.to_bytes().to_vec(),
            vmsa_ciphertext: ciphertext,
            host: SevHostVcpuState {
                tsc: self.cpu.tsc(),
                ghcb_msr,
                ghcb_version: s.ghcb.negotiated_version,
                ghcb_registered_gpa: s.ghcb.registered_gpa,
                ap_reset_hold: s.ghcb.ap_reset_hold,
                dr7: s.ghcb.dr7,
            },
        })
    }

    /// RECEIVE_UPDATE_VMSA for this vCPU of a VM in RECEIVE: the firmware authenticates and
    /// decrypts the VMSA packet; the CPU model loads the VMSA, and the tracked registers, APIC
    /// base, GHCB address and AP state are taken from what the firmware verified. The
    /// hypervisor's own state must agree with them, or the vCPU is refused (unchanged).
    pub(crate) fn sev_receive_state_impl(&mut self, t: &SevVcpuTransfer) -> Result<()> {
        let ctx = self.sev_context()?;
        if self.sev.as_ref().is_none_or(|s| s.protected) {
            return Err(sev(format!(
                "vCPU {} is not a fresh SEV-ES vCPU (plain, or it already has a VMSA)",
                self.id
            )));
        }
        let header = PacketHeader::from_bytes(&t.vmsa_header)
            .ok_or_else(|| sev("bad VMSA packet header"))?;
        let gpa = layout::vmsa_addr(self.id);
        let (received, plain) = {
            let psp = ctx.psp();
            let r = psp
                .receive_update_vmsa(ctx.handle, self.id, gpa, &header, &t.vmsa_ciphertext)
                .map_err(psp_err)?;
            // Trusted CPU model: decrypt the host copy to load it at VMRUN.
            let plain = psp
                .vmsa_plaintext(ctx.handle, gpa, &r.encrypted_vmsa)
                .map_err(psp_err)?;
            (r, plain)
        };
        let ext = received.extension;
        let vmsa = Vmsa::from_bytes(&plain[..]).map_err(|e| sev(e.to_string()))?;
        let refuse = |what: String| {
            Err(sev(format!(
                "vCPU {}: the hypervisor state does not match the authenticated VMSA: {what}",
                self.id
            )))
        };
        if ghcb_gpa_of(t.host.ghcb_msr) != ext.ghcb_gpa {
            return refuse(format!(
                "GHCB MSR {:#x}, but the GHCB address is {:#x}",
                t.host.ghcb_msr, ext.ghcb_gpa
            ));
        }
        if t.host.ap_reset_hold.is_some() != (ext.ap_flags & TrackedExtension::AP_RESET_HOLD != 0) {
            return refuse("AP reset hold".into());
        }
        let before = self.cpu.snapshot();
        let loaded = self
            .cpu
            .set_msr(esvm_arch::msr::IA32_APIC_BASE, ext.apic_base)
            .and_then(|_| self.cpu.load_vmsa(&vmsa));
        if let Err(e) = loaded {
            let _ = self.cpu.restore(&before);
            return Err(super::cpu_err(e));
        }
        if self.cpu.events().halted != (ext.ap_flags & TrackedExtension::HALTED != 0) {
            let _ = self.cpu.restore(&before);
            return refuse("halted state".into());
        }
        self.cpu.set_tsc(t.host.tsc);
        self.cpu.set_ghcb_msr(t.host.ghcb_msr);
        let s = self.sev.as_mut().expect("SEV-ES vCPU");
        s.tracked = TrackedRegisters {
            apic_base: ext.apic_base,
            ..received.tracked
        };
        s.ghcb.negotiated_version = t.host.ghcb_version;
        s.ghcb.registered_gpa = t.host.ghcb_registered_gpa;
        s.ghcb.ap_reset_hold = t.host.ap_reset_hold;
        s.ghcb.dr7 = t.host.dr7;
        s.protected = true;
        self.awaiting = super::Awaiting::Nothing;
        Ok(())
    }
}

/// The GHCB address a GHCB MSR value names: the value itself when it is a page address (the
/// low 12 bits, the MSR protocol's request field, are zero), else 0 (MSR protocol in use).
pub fn ghcb_gpa_of(msr: u64) -> u64 {
    if msr & 0xfff == 0 {
        msr
    } else {
        0
    }
}

impl SevVm {
    pub(crate) fn new(psp: std::sync::Arc<std::sync::Mutex<esvm_psp::Psp>>, handle: u32) -> Self {
        SevVm {
            psp,
            handle,
            ghcb_vm: Default::default(),
            send_worker: Default::default(),
            recv_worker: Default::default(),
        }
    }
}
