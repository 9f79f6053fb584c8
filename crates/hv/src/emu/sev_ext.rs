//! The emu backend's SEV-ES extension: [`SevVm`] for [`EmuVm`] and [`SevVcpu`] for
//! [`EmuVcpu`] — the launch, SEND_*/RECEIVE_* for live migration and sealed snapshots (see
//! [`crate::sev::transfer`](crate::sev) for what travels), the hypervisor's own state, and
//! the hooks of the same-host move (`move_context`).

use std::sync::{Arc, Mutex, MutexGuard};

use esvm_arch::vmsa::Vmsa;
use esvm_psp::session::PACKET_HEADER_LEN;
use esvm_psp::{
    LaunchStart, Measurement, PacketHeader, Policy, Psp, TrackedExtension, TrackedRegisters,
};

use super::{Awaiting, EmuVcpu, EmuVm};
use crate::ghcb::VmgexitCounts;
use crate::sev::moving::{MoveEndpoint, MoveProbe, MoveToken, SevVcpuMove, SevVcpuUndo};
use crate::sev::transfer::{KIND_PRIVATE, KIND_SHARED, PAGE};
use crate::sev::{
    self, ghcb_gpa_of, psp_err, LaunchToken, MemoryController, PagePacket, PrivateView,
    SevGuestContext, SevHostVcpuState, SevHostVmState, SevSessionStart, SevVcpu, SevVcpuTransfer,
    SevVm, PRIVATE_PACKET_LEN, SHARED_PACKET_LEN,
};
use crate::{HvError, Result, SevMemoryOp, Vcpu, VmType};

fn sev(msg: impl Into<String>) -> HvError {
    HvError::Sev(msg.into())
}

fn encryption_err(source: esvm_cpu::MemError) -> HvError {
    HvError::SevMemory {
        op: SevMemoryOp::Encryption,
        source,
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl EmuVm {
    /// The guest-physical address of page `page`, if it lies in guest memory.
    fn page_gpa(&self, page: u64) -> Result<u64> {
        page.checked_mul(PAGE as u64)
            .filter(|g| g + PAGE as u64 <= self.memory.size())
            .ok_or_else(|| sev(format!("page {page} lies outside guest memory")))
    }
}

impl SevVm for EmuVm {
    fn launch_start(
        &self,
        _: &LaunchToken,
        psp: Arc<Mutex<Psp>>,
        req: &LaunchStart,
    ) -> Result<u32> {
        self.require_sev_type()?;
        self.moves.check_launch()?;
        if self.sev.get().is_some() {
            return Err(sev("LAUNCH_START was already done for this VM"));
        }
        let handle = {
            let mut p = lock(&psp);
            let handle = p.launch_start(req).map_err(psp_err)?;
            if let Err(e) = sev::activate_free_asid(&mut p, handle) {
                let _ = p.decommission(handle);
                return Err(e);
            }
            handle
        };
        // From here on the context frees itself (SevGuestContext's Drop) if anything fails.
        let ctx = SevGuestContext::new(psp, handle);
        let key = ctx.psp().memory_controller_key(handle).map_err(psp_err)?;
        self.phys
            .enable_encryption(Arc::new(MemoryController(key)))
            .map_err(encryption_err)?;
        let _ = self.sev.set(Arc::new(ctx));
        Ok(handle)
    }

    fn launch_update_data(&self, _: &LaunchToken, gpa: u64, len: u64) -> Result<()> {
        let ctx = self.sev_vm()?;
        self.phys
            .encrypt_in_place(gpa, len)
            .map_err(encryption_err)?;
        let view = PrivateView(self.phys.clone());
        ctx.psp()
            .launch_update_data(ctx.handle, &view, gpa, len as usize)
            .map_err(psp_err)
    }

    fn launch_measure(&self, _: &LaunchToken) -> Result<Measurement> {
        let ctx = self.sev_vm()?;
        let m = ctx.psp().launch_measure(ctx.handle).map_err(psp_err);
        m
    }

    fn launch_secret(
        &self,
        _: &LaunchToken,
        gpa: u64,
        header: &PacketHeader,
        ciphertext: &[u8],
    ) -> Result<()> {
        let ctx = self.sev_vm()?;
        let view = PrivateView(self.phys.clone());
        let r = ctx
            .psp()
            .launch_secret(ctx.handle, &view, gpa, header, ciphertext)
            .map_err(psp_err);
        r
    }

    fn launch_finish(&self, _: &LaunchToken) -> Result<()> {
        let ctx = self.sev_vm()?;
        let r = ctx.psp().launch_finish(ctx.handle).map_err(psp_err);
        r
    }

    fn handle(&self) -> Option<u32> {
        self.sev_context().map(|c| c.handle)
    }

    fn platform(&self) -> Option<Arc<Mutex<Psp>>> {
        self.sev_context().map(|c| c.psp.clone())
    }

    fn send_start(&self, target: &[u8]) -> Result<SevSessionStart> {
        let ctx = self.sev_vm()?;
        let mut psp = ctx.psp();
        let out = psp.send_start(ctx.handle, target).map_err(psp_err)?;
        let worker = psp.send_worker(ctx.handle).map_err(psp_err)?;
        *lock(&ctx.send_worker) = Some(worker);
        Ok(SevSessionStart::from(&out))
    }

    fn send_page(&self, page: u64, out: &mut Vec<u8>) -> Result<()> {
        let ctx = self.sev_vm()?;
        let gpa = self.page_gpa(page)?;
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
                return Err(HvError::SevMemory {
                    op: SevMemoryOp::ReadSharedPage(page),
                    source: e,
                });
            }
        }
        Ok(())
    }

    fn send_transcript_tag(&self) -> Result<[u8; 32]> {
        let ctx = self.sev_vm()?;
        let tag = ctx.psp().send_transcript_tag(ctx.handle).map_err(psp_err);
        tag
    }

    fn send_finish(&self) -> Result<[u8; 32]> {
        let ctx = self.sev_vm()?;
        lock(&ctx.send_worker).take();
        let tag = ctx.psp().send_finish(ctx.handle).map_err(psp_err);
        tag
    }

    fn send_cancel(&self) -> Result<()> {
        let ctx = self.sev_vm()?;
        lock(&ctx.send_worker).take();
        let r = ctx.psp().send_cancel(ctx.handle).map_err(psp_err);
        r
    }

    fn receive_start(&self, psp: Arc<Mutex<Psp>>, start: &SevSessionStart) -> Result<u32> {
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
            let mut p = lock(&psp);
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
        // From here on the context frees itself (SevGuestContext's Drop) if anything fails.
        let ctx = SevGuestContext::new(psp, handle);
        let worker = ctx.psp().receive_worker(handle).map_err(psp_err)?;
        self.phys
            .enable_encryption(Arc::new(MemoryController(key)))
            .map_err(encryption_err)?;
        *lock(&ctx.recv_worker) = Some(worker);
        let _ = self.sev.set(Arc::new(ctx));
        Ok(handle)
    }

    /// RECEIVE_UPDATE_DATA (or a shared page's plaintext). Also during post-copy, while the
    /// guest runs: the vCPU never asks the firmware's guest state (RUPDATE until
    /// RECEIVE_FINISH) before it runs, only the memory key, so pages keep arriving this way
    /// until RECEIVE_FINISH checks the transcript (see `esvm_psp::Psp::receive_finish` for
    /// what that means against a replayed packet). A missing page is filled without waiting
    /// for itself; the migration layer publishes it afterwards.
    fn receive_page(&self, page: u64, packet: &[u8]) -> Result<()> {
        let ctx = self.sev_vm()?;
        let gpa = self.page_gpa(page)?;
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
            PagePacket::Shared(bytes) => {
                // Post-copy: a missing page is filled without waiting for itself (the
                // migration layer publishes it afterwards).
                let missing = self
                    .phys
                    .missing_pages()
                    .is_some_and(|m| m.is_missing(page));
                let written = if missing {
                    self.phys.fill_missing_host(gpa, bytes)
                } else {
                    self.phys.write_host(gpa, bytes)
                };
                written.map_err(|source| HvError::SevMemory {
                    op: SevMemoryOp::WriteSharedPage(page),
                    source,
                })
            }
        }
    }

    fn receive_finish(&self, tag: &[u8; 32]) -> Result<()> {
        let ctx = self.sev_vm()?;
        lock(&ctx.recv_worker).take();
        let r = ctx.psp().receive_finish(ctx.handle, tag).map_err(psp_err);
        r
    }

    fn decommission(&self) -> Result<()> {
        let ctx = self.sev_vm()?;
        lock(&ctx.recv_worker).take();
        let mut p = ctx.psp();
        p.deactivate(ctx.handle).map_err(psp_err)?;
        p.decommission(ctx.handle).map_err(psp_err)
    }

    fn prealloc_private(&self) {
        self.phys.prefault_private();
    }

    fn host_state(&self) -> Result<SevHostVmState> {
        let ctx = self.sev_vm()?;
        let vm = *lock(&ctx.ghcb_vm);
        Ok(SevHostVmState {
            ap_jump_table: vm.ap_jump_table,
        })
    }

    fn set_host_state(&self, s: &SevHostVmState) -> Result<()> {
        let ctx = self.sev_vm()?;
        lock(&ctx.ghcb_vm).ap_jump_table = s.ap_jump_table;
        Ok(())
    }

    fn is_dead(&self) -> bool {
        self.moves.is_dead()
    }

    fn move_endpoint(&self, _: &MoveToken) -> Option<MoveEndpoint<'_>> {
        Some(MoveEndpoint {
            vm_type: self.config.vm_type,
            moves: &self.moves,
            created: &self.created,
            context: &self.sev,
            memory: &self.memory,
        })
    }
}

impl SevVcpu for EmuVcpu {
    fn launch_update_vmsa(&mut self, _: &LaunchToken) -> Result<()> {
        let ctx = self.sev_context()?;
        if self.is_protected() {
            return Err(sev(format!(
                "vCPU {} already went through LAUNCH_UPDATE_VMSA",
                self.id
            )));
        }
        // As KVM: the VMSA cannot be encrypted while guest debugging is active, since the
        // hypervisor could no longer service the debug state.
        if self.cpu.debug_regs().dr7 & 0xff != 0 {
            return Err(sev(format!(
                "vCPU {}: DR7 enables breakpoints ({:#x}); clear guest debugging before \
                 LAUNCH_UPDATE_VMSA",
                self.id,
                self.cpu.debug_regs().dr7
            )));
        }
        let Some(state) = self.sev.as_mut() else {
            return Err(sev(format!("vCPU {} is not an SEV-ES vCPU", self.id)));
        };
        let vmsa = self.cpu.to_vmsa();
        let sregs = self.cpu.sregs();
        ctx.psp()
            .launch_update_vmsa(
                ctx.handle(),
                self.id,
                esvm_arch::layout::vmsa_addr(self.id),
                vmsa.as_bytes(),
            )
            .map_err(psp_err)?;
        state.tracked = TrackedRegisters {
            cr0: sregs.cr0,
            cr4: sregs.cr4,
            efer: sregs.efer,
            cr8: sregs.cr8,
            apic_base: sregs.apic_base,
        };
        // The MTRRs the VMM (as firmware) set before the launch become the hypervisor's.
        state.mtrr = self.cpu.msrs().mtrr;
        state.protected = true;
        Ok(())
    }

    fn initial_vmsa(&self) -> Result<Box<[u8; 4096]>> {
        if self.sev.is_none() {
            return Err(sev("not an SEV-ES vCPU"));
        }
        self.guard("sev_initial_vmsa (the VMSA is already encrypted)")?;
        Ok(Box::new(self.cpu.to_vmsa().to_bytes()))
    }

    fn encrypted_vmsa(&self) -> Result<Box<[u8; 4096]>> {
        let ctx = self.sev_context()?;
        if !self.is_protected() {
            return Err(sev(format!("vCPU {} has no encrypted VMSA yet", self.id)));
        }
        // The CPU model saves its state into the VMSA at VMEXIT; the host only ever holds
        // the ciphertext.
        let vmsa = self.cpu.to_vmsa();
        let psp = ctx.psp();
        psp.seal_vmsa(
            ctx.handle(),
            esvm_arch::layout::vmsa_addr(self.id),
            vmsa.as_bytes(),
        )
        .map_err(psp_err)
    }

    fn debug_vmsa(&self) -> Result<Box<[u8; 4096]>> {
        let encrypted = self.encrypted_vmsa()?;
        let ctx = self.sev_context()?;
        let psp = ctx.psp();
        psp.dbg_decrypt_vmsa(
            ctx.handle(),
            esvm_arch::layout::vmsa_addr(self.id),
            &encrypted,
        )
        .map_err(psp_err)
    }

    fn send_state(&self) -> Result<SevVcpuTransfer> {
        let ctx = self.sev_context()?;
        let s = self
            .sev
            .as_ref()
            .filter(|s| s.protected)
            .ok_or_else(|| sev(format!("vCPU {} is not a protected SEV-ES vCPU", self.id)))?;
        if self.awaiting != Awaiting::Nothing
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
        let gpa = esvm_arch::layout::vmsa_addr(self.id);
        let vmsa = self.cpu.to_vmsa();
        let psp = ctx.psp();
        // The CPU model saves its state into the VMSA (host copy: ciphertext); the firmware
        // re-wraps it for transport.
        let sealed = psp
            .seal_vmsa(ctx.handle(), gpa, vmsa.as_bytes())
            .map_err(psp_err)?;
        let (header, ciphertext) = psp
            .send_update_vmsa(ctx.handle(), self.id, gpa, &sealed, &ext)
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
                mtrr: s.mtrr,
                nmi_blocked: s.nmi_blocked,
                nmi_pending: s.nmi_pending,
            },
        })
    }

    /// The firmware authenticates and decrypts the VMSA packet; the CPU model loads the
    /// VMSA, and the tracked registers, APIC base, GHCB address and AP state are taken from
    /// what the firmware verified. The hypervisor's own state must agree with them.
    fn receive_state(&mut self, t: &SevVcpuTransfer) -> Result<()> {
        let ctx = self.sev_context()?;
        if self.sev.as_ref().is_none_or(|s| s.protected) {
            return Err(sev(format!(
                "vCPU {} is not a fresh SEV-ES vCPU (plain, or it already has a VMSA)",
                self.id
            )));
        }
        let header = PacketHeader::from_bytes(&t.vmsa_header)
            .ok_or_else(|| sev("bad VMSA packet header"))?;
        let gpa = esvm_arch::layout::vmsa_addr(self.id);
        let (received, plain) = {
            let psp = ctx.psp();
            let r = psp
                .receive_update_vmsa(ctx.handle(), self.id, gpa, &header, &t.vmsa_ciphertext)
                .map_err(psp_err)?;
            // Trusted CPU model: decrypt the host copy to load it at VMRUN.
            let plain = psp
                .vmsa_plaintext(ctx.handle(), gpa, &r.encrypted_vmsa)
                .map_err(psp_err)?;
            (r, plain)
        };
        let ext = received.extension;
        let vmsa = Vmsa::from_bytes(&plain[..]).map_err(HvError::BadVmsa)?;
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
        let Some(s) = self.sev.as_mut() else {
            return Err(sev(format!("vCPU {} is not an SEV-ES vCPU", self.id)));
        };
        s.tracked = TrackedRegisters {
            apic_base: ext.apic_base,
            ..received.tracked
        };
        s.ghcb.negotiated_version = t.host.ghcb_version;
        s.ghcb.registered_gpa = t.host.ghcb_registered_gpa;
        s.ghcb.ap_reset_hold = t.host.ap_reset_hold;
        s.ghcb.dr7 = t.host.dr7;
        s.mtrr = t.host.mtrr;
        s.nmi_blocked = t.host.nmi_blocked;
        s.nmi_pending = t.host.nmi_pending;
        s.protected = true;
        self.awaiting = Awaiting::Nothing;
        Ok(())
    }

    fn ghcb_msr(&self) -> Result<u64> {
        if self.sev.is_none() {
            return Err(sev("not an SEV-ES vCPU"));
        }
        Ok(self.cpu.ghcb_msr())
    }

    fn vmgexits(&self) -> Result<VmgexitCounts> {
        match &self.sev {
            Some(s) => Ok(s.vmgexits.clone()),
            None => Err(sev("not an SEV-ES vCPU")),
        }
    }

    fn deliver_sipi(&mut self) -> Result<bool> {
        let ctx = self.sev_context()?;
        if !self.is_protected() {
            return Err(sev(format!(
                "vCPU {} has no encrypted VMSA yet: a SIPI can only release a launched vCPU",
                self.id
            )));
        }
        let phys = self.cpu.memory().clone();
        let tsc = self.cpu.tsc();
        let Some(s) = self.sev.as_deref_mut() else {
            return Err(sev(format!("vCPU {} is not an SEV-ES vCPU", self.id)));
        };
        if s.ghcb.ap_reset_hold.is_none() {
            return Ok(false);
        }
        let crate::sev::SevVcpuState {
            tracked,
            mtrr,
            ghcb,
            ..
        } = s;
        // The release writes the AP_HLT_LOOP GHCB (shared memory) through the same services
        // a VMGEXIT uses; its writes are applied once it succeeded.
        let mut services = crate::sev::ReplayServices {
            phys: &phys,
            cpuid: &self.cpuid,
            tsc,
            vcpu_id: self.id,
            tracked,
            mtrr,
            vm: &ctx,
            answers: &[],
            next_answer: 0,
            blocked_on: None,
            writes: Vec::new(),
            shared_writes: Vec::new(),
        };
        let released = ghcb.release_ap_reset_hold(&mut services).map_err(|e| {
            sev(format!(
                "vCPU {}: cannot release the AP reset hold: {e}",
                self.id
            ))
        })?;
        for (gpa, data) in std::mem::take(&mut services.shared_writes) {
            phys.write_host(gpa, &data)
                .map_err(|source| HvError::SevMemory {
                    op: SevMemoryOp::WriteGhcb,
                    source,
                })?;
        }
        match released {
            crate::ghcb::ApHoldRelease::NotHeld => Ok(false),
            crate::ghcb::ApHoldRelease::SetMsr(msr) => {
                self.cpu.set_ghcb_msr(msr);
                Ok(true)
            }
            crate::ghcb::ApHoldRelease::GhcbUpdated => Ok(true),
        }
    }

    fn move_probe(&self, _: &MoveToken) -> Option<MoveProbe> {
        Some(self.move_probe_impl())
    }

    fn move_export(&self, _: &MoveToken) -> Result<SevVcpuMove> {
        self.move_export_impl()
    }

    fn move_import(&mut self, _: &MoveToken, state: SevVcpuMove) -> Result<SevVcpuUndo> {
        self.move_import_impl(state)
    }

    fn move_undo(&mut self, _: &MoveToken, undo: SevVcpuUndo) {
        self.move_undo_impl(undo);
    }

    fn move_scrub(&mut self, _: &MoveToken) {
        self.move_scrub_impl();
    }
}
