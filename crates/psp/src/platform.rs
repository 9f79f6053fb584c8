//! The firmware object: platform commands, guest contexts and guest commands.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use p384::ecdsa::SigningKey;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::cert::{Algo, CaCert, CertChain, SevCert, Usage, SEV_CERT_LEN};
use crate::crypto::{aes128_ctr, mac_eq, random_array};
use crate::error::{PspError, PspResult};
use crate::memkey::{MemoryKey, PAGE_SIZE};
use crate::memory::GuestMemoryAccess;
use crate::nv::{EmulatedAmdCa, FirmwareVersion, Identity, StorageError};
use crate::session::{
    measurement_mac, secret_mac, shared_secret, unwrap_session, wrap_session, Build, Measurement,
    PacketHeader, Policy, SessionBlob, TransportKeys,
};
use crate::transport::{
    ReceiveWorker, ReceivedVmsa, RecvState, SendState, SendWorker, FLAG_COMPRESSED,
};
use crate::vmsa::{TrackedExtension, VMSA_SIZE};
use crate::{allowed_list, Command, GuestState, PlatformState};

/// Largest valid ASID.
pub const MAX_ASID: u32 = 509;
/// Most guest contexts at once.
pub const MAX_GUESTS: usize = 509;
/// Lowest API version that is SEV-ES capable, for the ES policy bit's check
/// of a migration target (esvm's rule: the target's PEK certificate carries
/// its API version, signed by its CEK).
pub const ES_MIN_API: (u8, u8) = (0, 17);
/// Largest LAUNCH_SECRET payload.
pub const MAX_SECRET_LEN: usize = 64 << 10;
/// Largest DBG_DECRYPT / DBG_ENCRYPT range.
pub const MAX_DBG_LEN: usize = 1 << 20;
/// Chunk size used to stream guest memory into the launch digest.
const MEASURE_CHUNK: usize = 64 << 10;

/// The guest owner's half of a session (LAUNCH_START inputs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnerSession {
    /// The owner's DH certificate (an SEV certificate with usage PDH).
    pub dh_cert: Vec<u8>,
    /// The 128-byte session blob.
    pub session: Vec<u8>,
}

/// LAUNCH_START parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaunchStart {
    /// The guest policy.
    pub policy: Policy,
    /// The owner's session; `None` launches without an owner (the firmware
    /// picks random transport keys and nobody can verify the measurement).
    pub owner: Option<OwnerSession>,
    /// Share the memory key of this existing guest (refused if either policy has NOKS).
    pub share_key_with: Option<u32>,
}

/// SEND_START output, for the target's RECEIVE_START.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SendStartOut {
    /// The guest policy (bound into the session by its MAC).
    pub policy: Policy,
    /// The source platform's PDH certificate (the DH certificate for RECEIVE_START).
    pub pdh: SevCert,
    /// Transport keys wrapped for the target's PDH.
    pub session: SessionBlob,
}

/// PLATFORM_STATUS output.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct PlatformStatus {
    /// API major version.
    pub api_major: u8,
    /// API minor version.
    pub api_minor: u8,
    /// Firmware build.
    pub build: u8,
    /// Platform state.
    pub state: PlatformState,
    /// True once an external OCA was imported (PEK_CERT_IMPORT).
    pub owned_externally: bool,
    /// SEV-ES capable.
    pub es_capable: bool,
    /// Number of guest contexts.
    pub guest_count: u32,
}

impl PlatformStatus {
    /// SEV API flags word: bit 0 = externally owned, bit 8 = SEV-ES capable.
    pub fn flags(&self) -> u32 {
        (self.owned_externally as u32) | ((self.es_capable as u32) << 8)
    }

    /// The version and build as bound into measurements.
    pub fn build_info(&self) -> Build {
        Build {
            api_major: self.api_major,
            api_minor: self.api_minor,
            build: self.build,
        }
    }
}

/// GUEST_STATUS output.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct GuestStatus {
    /// The handle.
    pub handle: u32,
    /// The policy.
    pub policy: Policy,
    /// The ASID, or 0 if the guest is not active.
    pub asid: u32,
    /// The guest state.
    pub state: GuestState,
}

/// Host-ciphertext view of one guest's private pages: what the memory
/// controller shows the untrusted host. It can only encrypt.
#[derive(Clone, Debug)]
pub struct HostView {
    memkey: Arc<MemoryKey>,
}

impl HostView {
    /// The ciphertext the host sees for private page `plain` at `gpa`.
    pub fn encrypt_page(&self, gpa: u64, plain: &[u8; PAGE_SIZE]) -> [u8; PAGE_SIZE] {
        self.memkey.encrypt_page(gpa, plain)
    }
}

struct Guest {
    state: GuestState,
    policy: Policy,
    asid: Option<u32>,
    /// Launch / receive transport keys; dropped at LAUNCH_FINISH / RECEIVE_FINISH.
    keys: Option<TransportKeys>,
    memkey: Arc<MemoryKey>,
    key_group: u64,
    digest: Sha256,
    launch_digest: Option<[u8; 32]>,
    measure: Option<[u8; 32]>,
    vmsas: BTreeMap<u32, u64>,
    send: Option<Arc<SendState>>,
    recv: Option<Arc<RecvState>>,
}

impl Guest {
    fn close_channels(&mut self, after: GuestState) {
        if let Some(s) = self.send.take() {
            s.close(after);
        }
        if let Some(r) = self.recv.take() {
            r.close(after);
        }
    }
}

/// The SEV firmware model. See the crate docs.
pub struct Psp {
    storage: Option<PathBuf>,
    id: Identity,
    initialized: bool,
    guests: BTreeMap<u32, Guest>,
    next_handle: u32,
    next_key_group: u64,
}

impl std::fmt::Debug for Psp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Psp")
            .field("storage", &self.storage)
            .field("state", &self.state())
            .field("guests", &self.guests.len())
            .finish()
    }
}

fn policy_failure(s: impl Into<String>) -> PspError {
    PspError::PolicyFailure(s.into())
}

impl Psp {
    fn from_identity(id: Identity, storage: Option<PathBuf>) -> Psp {
        Psp {
            storage,
            id,
            initialized: false,
            guests: BTreeMap::new(),
            next_handle: 1,
            next_key_group: 1,
        }
    }

    /// Creates a new platform identity in `dir` (the PSP's NV storage) with
    /// its CEK signed by `ca`'s emulated ASK. Refuses to overwrite an existing
    /// identity. The platform starts in UNINIT; run [`Psp::init`].
    pub fn create(
        dir: &Path,
        ca: &EmulatedAmdCa,
        version: FirmwareVersion,
    ) -> Result<Psp, StorageError> {
        if Identity::exists(dir) {
            return Err(StorageError::AlreadyInitialized(dir.to_path_buf()));
        }
        let id = Identity::generate(ca, version)?;
        id.save_all(dir)?;
        Ok(Psp::from_identity(id, Some(dir.to_path_buf())))
    }

    /// True if `dir` already holds a platform identity.
    pub fn storage_exists(dir: &Path) -> bool {
        Identity::exists(dir)
    }

    /// Opens the identity stored in `dir`. The platform starts in UNINIT.
    pub fn open(dir: &Path) -> Result<Psp, StorageError> {
        Ok(Psp::from_identity(
            Identity::load(dir)?,
            Some(dir.to_path_buf()),
        ))
    }

    /// A platform whose identity lives only in memory (tests, tools).
    pub fn ephemeral(ca: &EmulatedAmdCa, version: FirmwareVersion) -> Result<Psp, StorageError> {
        Ok(Psp::from_identity(Identity::generate(ca, version)?, None))
    }

    /// The storage directory, if any.
    pub fn storage_dir(&self) -> Option<&Path> {
        self.storage.as_deref()
    }

    /// The platform state.
    pub fn state(&self) -> PlatformState {
        if !self.initialized {
            PlatformState::Uninit
        } else if self.guests.is_empty() {
            PlatformState::Init
        } else {
            PlatformState::Working
        }
    }

    /// The ARK this firmware trusts (its own emulated ARK).
    pub fn trusted_ark(&self) -> &CaCert {
        &self.id.ark
    }

    fn require(&self, command: Command, ok: &[PlatformState], hint: &'static str) -> PspResult<()> {
        let state = self.state();
        if ok.contains(&state) {
            Ok(())
        } else {
            Err(PspError::InvalidPlatformState {
                command,
                state,
                hint,
            })
        }
    }

    fn require_for_guests(&self, command: Command) -> PspResult<()> {
        self.require(
            command,
            &[PlatformState::Init, PlatformState::Working],
            "run INIT first",
        )
    }

    fn build(&self) -> Build {
        Build {
            api_major: self.id.version.api_major,
            api_minor: self.id.version.api_minor,
            build: self.id.version.build,
        }
    }

    fn api(&self) -> (u8, u8) {
        (self.id.version.api_major, self.id.version.api_minor)
    }

    fn persist_pek(&self) -> PspResult<()> {
        if let Some(d) = &self.storage {
            self.id.save_pek_oca_pdh(d)?;
        }
        Ok(())
    }

    // ---------------------------------------------------------------- platform

    /// INIT: UNINIT -> INIT.
    pub fn init(&mut self) -> PspResult<()> {
        self.require(
            Command::Init,
            &[PlatformState::Uninit],
            "the platform is already initialised; SHUTDOWN first to run INIT again",
        )?;
        self.initialized = true;
        Ok(())
    }

    /// SHUTDOWN: decommissions every guest and returns to UNINIT.
    pub fn shutdown(&mut self) -> PspResult<()> {
        for g in self.guests.values_mut() {
            g.close_channels(GuestState::Uninit);
        }
        self.guests.clear();
        self.initialized = false;
        Ok(())
    }

    /// PLATFORM_RESET (UNINIT only): new PEK, self-signed OCA and PDH; the
    /// platform becomes self-owned. The CEK (chip key) is kept.
    pub fn platform_reset(&mut self) -> PspResult<()> {
        self.require(
            Command::PlatformReset,
            &[PlatformState::Uninit],
            "SHUTDOWN first",
        )?;
        self.id
            .regenerate_pek()
            .map_err(|e| PspError::cert("regenerated PEK", e))?;
        self.persist_pek()
    }

    /// PLATFORM_STATUS.
    pub fn platform_status(&self) -> PlatformStatus {
        PlatformStatus {
            api_major: self.id.version.api_major,
            api_minor: self.id.version.api_minor,
            build: self.id.version.build,
            state: self.state(),
            owned_externally: self.id.oca_key.is_none(),
            es_capable: self.api() >= ES_MIN_API,
            guest_count: self.guests.len() as u32,
        }
    }

    /// PEK_GEN (INIT only): new PEK, self-signed OCA (self-owned) and PDH.
    pub fn pek_gen(&mut self) -> PspResult<()> {
        self.require(
            Command::PekGen,
            &[PlatformState::Init],
            "PEK_GEN needs the INIT state: run INIT, and decommission all guests",
        )?;
        self.id
            .regenerate_pek()
            .map_err(|e| PspError::cert("regenerated PEK", e))?;
        self.persist_pek()
    }

    /// PDH_GEN (INIT only): new PDH signed by the PEK.
    pub fn pdh_gen(&mut self) -> PspResult<()> {
        self.require(
            Command::PdhGen,
            &[PlatformState::Init],
            "PDH_GEN needs the INIT state: run INIT, and decommission all guests",
        )?;
        self.id
            .regenerate_pdh()
            .map_err(|e| PspError::cert("regenerated PDH", e))?;
        if let Some(d) = &self.storage {
            self.id.save_pdh(d)?;
        }
        Ok(())
    }

    /// PEK_CSR: the PEK certificate without signatures, for an owner to sign
    /// with its OCA.
    pub fn pek_csr(&self) -> PspResult<SevCert> {
        self.require_for_guests(Command::PekCsr)?;
        let mut c = self.id.pek.clone();
        c.clear_signatures();
        Ok(c)
    }

    /// PEK_CERT_IMPORT (INIT only): takes ownership by an external OCA. `pek`
    /// is the PEK_CSR output signed by `oca` (self-signed OCA certificate).
    pub fn pek_cert_import(&mut self, pek: &[u8], oca: &[u8]) -> PspResult<()> {
        self.require(
            Command::PekCertImport,
            &[PlatformState::Init],
            "PEK_CERT_IMPORT needs the INIT state: run INIT, and decommission all guests",
        )?;
        if self.id.oca_key.is_none() {
            return Err(PspError::AlreadyOwned);
        }
        let oca = SevCert::from_bytes_with_usage(oca, Usage::OCA)
            .map_err(|e| PspError::cert("OCA certificate", e))?;
        if !matches!(oca.algo(), Algo::ECDSA_SHA256 | Algo::ECDSA_SHA384) {
            return Err(PspError::CertificateMismatch(
                "the OCA must be an ECDSA key".into(),
            ));
        }
        oca.verify_signed_by(&oca)
            .map_err(|e| PspError::cert("OCA self-signature", e))?;
        let pek = SevCert::from_bytes_with_usage(pek, Usage::PEK)
            .map_err(|e| PspError::cert("PEK certificate", e))?;
        if pek.body() != self.id.pek.body() {
            return Err(PspError::CertificateMismatch(
                "the PEK certificate is not this platform's current PEK: sign the output of PEK_CSR".into(),
            ));
        }
        pek.verify_signed_by(&oca)
            .map_err(|e| PspError::cert("PEK signature by the OCA", e))?;
        let mut new_pek = self.id.pek.clone();
        new_pek.clear_signatures();
        new_pek
            .adopt_signature(&pek, Usage::OCA)
            .map_err(|e| PspError::cert("PEK certificate", e))?;
        new_pek
            .sign_ecdsa(Usage::CEK, &SigningKey::from(&self.id.cek_key))
            .map_err(|e| PspError::cert("PEK certificate", e))?;
        self.id.pek = new_pek;
        self.id.oca = oca;
        self.id.oca_key = None;
        self.persist_pek()
    }

    /// PDH_CERT_EXPORT: the platform's certificate chain (PDH, PEK, OCA, CEK)
    /// with the emulated ASK and ARK.
    pub fn pdh_cert_export(&self) -> PspResult<CertChain> {
        self.require_for_guests(Command::PdhCertExport)?;
        Ok(self.chain())
    }

    /// The certificate chain, in any platform state (for tools reading NV storage).
    pub fn chain(&self) -> CertChain {
        CertChain {
            pdh: self.id.pdh.clone(),
            pek: self.id.pek.clone(),
            oca: self.id.oca.clone(),
            cek: self.id.cek.clone(),
            ask: self.id.ask.clone(),
            ark: self.id.ark.clone(),
        }
    }

    /// GET_ID: the 64-byte chip id.
    pub fn get_id(&self) -> [u8; 64] {
        self.id.chip_id
    }

    // ------------------------------------------------------------ guest gating

    fn check_state(&self, command: Command, handle: u32) -> PspResult<&Guest> {
        self.require_for_guests(command)?;
        let g = self
            .guests
            .get(&handle)
            .ok_or(PspError::InvalidGuest { handle })?;
        if !command.allowed_states().contains(&g.state) {
            return Err(PspError::InvalidGuestState {
                command,
                handle,
                state: g.state,
                allowed: allowed_list(command),
            });
        }
        Ok(g)
    }

    fn guest_mut(&mut self, command: Command, handle: u32) -> PspResult<&mut Guest> {
        self.check_state(command, handle)?;
        self.guests
            .get_mut(&handle)
            .ok_or(PspError::InvalidGuest { handle })
    }

    fn require_active(handle: u32, g: &Guest) -> PspResult<()> {
        if g.asid.is_none() {
            return Err(PspError::Inactive { handle });
        }
        Ok(())
    }

    fn check_policy_here(&self, policy: Policy) -> PspResult<()> {
        if policy.0 & Policy::RESERVED != 0 {
            return Err(policy_failure(format!(
                "policy {policy} sets reserved bits 0x{:x}; clear them",
                policy.0 & Policy::RESERVED
            )));
        }
        if policy.min_api() > self.api() {
            let (a, b) = policy.min_api();
            return Err(policy_failure(format!(
                "the policy requires firmware API {a}.{b} or later; this platform has {}.{}",
                self.api().0,
                self.api().1
            )));
        }
        if policy.es() && self.api() < ES_MIN_API {
            return Err(policy_failure(
                "the policy requires SEV-ES, which this platform's firmware does not support",
            ));
        }
        Ok(())
    }

    fn check_range(gpa: u64, len: usize, max: usize, what: &'static str) -> PspResult<()> {
        if len == 0 || len > max {
            return Err(PspError::InvalidLen {
                what,
                expected: format!("1..={max} bytes"),
                got: len,
            });
        }
        if gpa.checked_add(len as u64).is_none() {
            return Err(PspError::InvalidAddress {
                gpa,
                len: len as u64,
                why: "the range wraps around the address space".into(),
            });
        }
        Ok(())
    }

    fn unwrap_peer_session(
        &self,
        what: &'static str,
        dh_cert: &[u8],
        session: &[u8],
        policy: Policy,
    ) -> PspResult<TransportKeys> {
        let cert = SevCert::from_bytes_with_usage(dh_cert, Usage::PDH)
            .map_err(|e| PspError::cert(what, e))?;
        if cert.algo() != Algo::ECDH_SHA256 {
            return Err(PspError::cert(
                what,
                crate::cert::CertError::Algorithm(cert.algo().0),
            ));
        }
        let blob = SessionBlob::from_bytes(session).map_err(|_| PspError::InvalidLen {
            what: "session blob",
            expected: format!("{} bytes", crate::session::SESSION_LEN),
            got: session.len(),
        })?;
        let peer = cert.public_key().map_err(|e| PspError::cert(what, e))?;
        let z = shared_secret(&self.id.pdh_key, &peer);
        unwrap_session(&z[..], &blob, policy).map_err(PspError::BadSession)
    }

    fn new_handle(&mut self) -> PspResult<u32> {
        if self.guests.len() >= MAX_GUESTS {
            return Err(PspError::ResourceLimit(format!(
                "the platform already has {MAX_GUESTS} guests; decommission one first"
            )));
        }
        let h = self.next_handle;
        self.next_handle = self.next_handle.wrapping_add(1).max(1);
        Ok(h)
    }

    fn new_guest(
        state: GuestState,
        policy: Policy,
        keys: TransportKeys,
        memkey: Arc<MemoryKey>,
        key_group: u64,
    ) -> Guest {
        Guest {
            state,
            policy,
            asid: None,
            keys: Some(keys),
            memkey,
            key_group,
            digest: Sha256::new(),
            launch_digest: None,
            measure: None,
            vmsas: BTreeMap::new(),
            send: None,
            recv: None,
        }
    }

    // ------------------------------------------------------------------ launch

    /// LAUNCH_START: creates a guest context in LUPDATE.
    pub fn launch_start(&mut self, req: &LaunchStart) -> PspResult<u32> {
        self.require_for_guests(Command::LaunchStart)?;
        self.check_policy_here(req.policy)?;
        let keys = match &req.owner {
            None => TransportKeys::random(),
            Some(o) => self.unwrap_peer_session(
                "guest owner's DH certificate",
                &o.dh_cert,
                &o.session,
                req.policy,
            )?,
        };
        let (memkey, group) =
            match req.share_key_with {
                None => {
                    let g = self.next_key_group;
                    self.next_key_group += 1;
                    (Arc::new(MemoryKey::random()), g)
                }
                Some(h) => {
                    let other = self
                        .guests
                        .get(&h)
                        .ok_or(PspError::InvalidGuest { handle: h })?;
                    if other.policy.noks() || req.policy.noks() {
                        return Err(policy_failure(format!(
                        "key sharing with guest {h} is forbidden by the NOKS policy bit (of {})",
                        if req.policy.noks() { "the new guest" } else { "that guest" }
                    )));
                    }
                    (other.memkey.clone(), other.key_group)
                }
            };
        let handle = self.new_handle()?;
        let g = Self::new_guest(GuestState::Lupdate, req.policy, keys, memkey, group);
        self.guests.insert(handle, g);
        Ok(handle)
    }

    /// LAUNCH_UPDATE_DATA: measures `len` bytes of plaintext the host placed
    /// at `gpa` (read through the trusted path). From now on these pages are
    /// private: the host sees them only as ciphertext (see [`Psp::host_view`]).
    pub fn launch_update_data(
        &mut self,
        handle: u32,
        mem: &dyn GuestMemoryAccess,
        gpa: u64,
        len: usize,
    ) -> PspResult<()> {
        let g = self.guest_mut(Command::LaunchUpdateData, handle)?;
        Self::require_active(handle, g)?;
        Self::check_range(gpa, len, usize::MAX, "LAUNCH_UPDATE_DATA length")?;
        let mut digest = g.digest.clone();
        let mut buf = Zeroizing::new(vec![0u8; len.min(MEASURE_CHUNK)]);
        let mut done = 0usize;
        while done < len {
            let n = (len - done).min(buf.len());
            mem.read(gpa + done as u64, &mut buf[..n])?;
            digest.update(&buf[..n]);
            done += n;
        }
        g.digest = digest;
        Ok(())
    }

    /// LAUNCH_UPDATE_VMSA: measures vCPU `vcpu`'s initial VMSA page and
    /// returns it encrypted under the guest's memory key at `vmsa_gpa`; the
    /// host keeps that ciphertext. Requires the ES policy bit.
    pub fn launch_update_vmsa(
        &mut self,
        handle: u32,
        vcpu: u32,
        vmsa_gpa: u64,
        vmsa: &[u8; VMSA_SIZE],
    ) -> PspResult<Box<[u8; VMSA_SIZE]>> {
        let g = self.guest_mut(Command::LaunchUpdateVmsa, handle)?;
        if !g.policy.es() {
            return Err(policy_failure(
                "LAUNCH_UPDATE_VMSA is only for SEV-ES guests: the policy has no ES bit",
            ));
        }
        Self::require_active(handle, g)?;
        if vmsa_gpa & (PAGE_SIZE as u64 - 1) != 0 {
            return Err(PspError::InvalidAddress {
                gpa: vmsa_gpa,
                len: VMSA_SIZE as u64,
                why: "a VMSA must be page-aligned".into(),
            });
        }
        if let Some(old) = g.vmsas.get(&vcpu) {
            return Err(PspError::InvalidParam(format!(
                "vCPU {vcpu} already has a VMSA (at GPA 0x{old:x})"
            )));
        }
        if g.vmsas.values().any(|v| *v == vmsa_gpa) {
            return Err(PspError::InvalidParam(format!(
                "GPA 0x{vmsa_gpa:x} already holds another vCPU's VMSA"
            )));
        }
        g.digest.update(vmsa);
        g.vmsas.insert(vcpu, vmsa_gpa);
        Ok(Box::new(g.memkey.encrypt_page(vmsa_gpa, vmsa)))
    }

    /// LAUNCH_MEASURE: LUPDATE -> LSECRET; returns the measurement.
    pub fn launch_measure(&mut self, handle: u32) -> PspResult<Measurement> {
        let build = self.build();
        let g = self.guest_mut(Command::LaunchMeasure, handle)?;
        if g.policy.es() && g.vmsas.is_empty() {
            return Err(policy_failure(
                "an SEV-ES guest needs LAUNCH_UPDATE_VMSA for its vCPUs before LAUNCH_MEASURE",
            ));
        }
        let keys = g
            .keys
            .as_ref()
            .ok_or_else(|| PspError::InvalidParam("the launch keys are gone".into()))?;
        let digest: [u8; 32] = g.digest.clone().finalize().into();
        let mnonce: [u8; 16] = random_array();
        let measure = measurement_mac(&keys.tik, build, g.policy, &digest, &mnonce);
        g.launch_digest = Some(digest);
        g.measure = Some(measure);
        g.state = GuestState::Lsecret;
        Ok(Measurement {
            measure,
            mnonce,
            build,
        })
    }

    /// LAUNCH_SECRET: verifies a secret packet (bound to this launch's
    /// measurement), decrypts it and writes it at `gpa`. Nothing is written
    /// unless the MAC verifies.
    pub fn launch_secret(
        &mut self,
        handle: u32,
        mem: &dyn GuestMemoryAccess,
        gpa: u64,
        header: &PacketHeader,
        ciphertext: &[u8],
    ) -> PspResult<()> {
        let g = self.guest_mut(Command::LaunchSecret, handle)?;
        Self::require_active(handle, g)?;
        if header.flags & FLAG_COMPRESSED != 0 {
            return Err(PspError::Unsupported(
                "compressed secrets are not supported".into(),
            ));
        }
        if header.flags != 0 {
            return Err(PspError::InvalidParam(format!(
                "unknown secret header flags 0x{:x}",
                header.flags
            )));
        }
        Self::check_range(
            gpa,
            ciphertext.len(),
            MAX_SECRET_LEN,
            "LAUNCH_SECRET payload",
        )?;
        let (Some(keys), Some(measure)) = (g.keys.as_ref(), g.measure.as_ref()) else {
            return Err(PspError::InvalidParam(
                "no measurement to bind the secret to".into(),
            ));
        };
        let mac = secret_mac(
            &keys.tik,
            header.flags,
            &header.iv,
            ciphertext.len() as u32,
            ciphertext,
            measure,
        );
        if !mac_eq(&mac, &header.mac) {
            return Err(PspError::BadSignature(
                "the secret's MAC does not verify: it was packaged for another launch measurement or session, or altered; guest memory was not changed".into(),
            ));
        }
        let mut plain = Zeroizing::new(ciphertext.to_vec());
        aes128_ctr(&keys.tek, &header.iv, &mut plain);
        mem.write(gpa, &plain)?;
        Ok(())
    }

    /// LAUNCH_FINISH: LSECRET -> RUNNING; the launch transport keys are erased.
    pub fn launch_finish(&mut self, handle: u32) -> PspResult<()> {
        let g = self.guest_mut(Command::LaunchFinish, handle)?;
        g.keys = None;
        g.state = GuestState::Running;
        Ok(())
    }

    /// The launch digest the firmware computed at LAUNCH_MEASURE (not secret;
    /// for diagnostics and tests).
    pub fn launch_digest(&self, handle: u32) -> PspResult<Option<[u8; 32]>> {
        Ok(self
            .guests
            .get(&handle)
            .ok_or(PspError::InvalidGuest { handle })?
            .launch_digest)
    }

    // -------------------------------------------------------------------- send

    /// SEND_START: checks the policy against the target, agrees fresh
    /// transport keys with the target's PDH; RUNNING -> SUPDATE.
    ///
    /// `target` is either the target's full chain (PDH, PEK, OCA, CEK, ASK,
    /// ARK, as exported) or a bare PDH certificate. A chain is always
    /// verified against this firmware's ARK. Policy: NOSEND refuses; SEV,
    /// DOMAIN, ES and a minimum API version need the full chain; DOMAIN needs
    /// the target's OCA to be this platform's OCA; ES needs a target API
    /// version of at least [`ES_MIN_API`].
    pub fn send_start(&mut self, handle: u32, target: &[u8]) -> PspResult<SendStartOut> {
        let g = self.check_state(Command::SendStart, handle)?;
        let policy = g.policy;
        if policy.nosend() {
            return Err(policy_failure(
                "the guest policy has NOSEND: this guest may never leave its platform",
            ));
        }
        let (pdh, chain) = if target.len() == SEV_CERT_LEN {
            let pdh = SevCert::from_bytes_with_usage(target, Usage::PDH)
                .map_err(|e| PspError::cert("target PDH", e))?;
            (pdh, None)
        } else {
            let chain = CertChain::from_bytes(target)
                .map_err(|e| PspError::cert("target certificate chain", e))?;
            chain
                .verify(Some(&self.id.ark))
                .map_err(|e| PspError::cert("target certificate chain", e))?;
            (chain.pdh.clone(), Some(chain))
        };
        if pdh.algo() != Algo::ECDH_SHA256 {
            return Err(PspError::cert(
                "target PDH",
                crate::cert::CertError::Algorithm(pdh.algo().0),
            ));
        }
        let need_chain = |why: &str| {
            policy_failure(format!(
                "policy {why} needs the target's full certificate chain (PDH, PEK, OCA, CEK, ASK, ARK) to authenticate it; only a PDH was given"
            ))
        };
        if policy.sev() && chain.is_none() {
            return Err(need_chain("SEV"));
        }
        if policy.domain() {
            let c = chain.as_ref().ok_or_else(|| need_chain("DOMAIN"))?;
            if !c.oca.same_key(&self.id.oca) {
                return Err(policy_failure(
                    "policy DOMAIN: the target's OCA is not this platform's owner, so the guest may not go there",
                ));
            }
        }
        let target_api = chain.as_ref().map(|c| c.pek.api_version());
        if policy.es() {
            let api = target_api.ok_or_else(|| need_chain("ES"))?;
            if api < ES_MIN_API {
                return Err(policy_failure(format!(
                    "policy ES: the target's firmware API {}.{} is not SEV-ES capable (needs {}.{} or later)",
                    api.0, api.1, ES_MIN_API.0, ES_MIN_API.1
                )));
            }
        }
        if policy.min_api() != (0, 0) {
            let api = target_api.ok_or_else(|| need_chain("minimum API version"))?;
            if api < policy.min_api() {
                return Err(policy_failure(format!(
                    "the policy requires firmware API {}.{} or later; the target has {}.{}",
                    policy.min_api().0,
                    policy.min_api().1,
                    api.0,
                    api.1
                )));
            }
        }
        let peer = pdh
            .public_key()
            .map_err(|e| PspError::cert("target PDH", e))?;
        let keys = TransportKeys::random();
        let z = shared_secret(&self.id.pdh_key, &peer);
        let session = wrap_session(&z[..], &keys, policy);
        let own_pdh = self.id.pdh.clone();
        let start = crate::transport::session_start_digest(own_pdh.as_bytes(), &session.to_bytes());
        let g = self.guest_mut(Command::SendStart, handle)?;
        let state = SendState::new(
            handle,
            &keys,
            g.memkey.clone(),
            g.vmsas.clone(),
            g.asid.is_some(),
            policy.es(),
            start,
        );
        g.send = Some(Arc::new(state));
        g.state = GuestState::Supdate;
        Ok(SendStartOut {
            policy,
            pdh: own_pdh,
            session,
        })
    }

    /// A worker that makes SEND_UPDATE_* packets for this guest on any thread.
    pub fn send_worker(&self, handle: u32) -> PspResult<SendWorker> {
        let g = self.check_state(Command::SendUpdateData, handle)?;
        Self::require_active(handle, g)?;
        let inner = g
            .send
            .clone()
            .ok_or_else(|| PspError::InvalidParam("no send context".into()))?;
        Ok(SendWorker { inner })
    }

    /// SEND_UPDATE_DATA: `len` bytes of guest memory at `gpa`, re-wrapped
    /// under the transport keys.
    pub fn send_update_data(
        &self,
        handle: u32,
        mem: &dyn GuestMemoryAccess,
        gpa: u64,
        len: usize,
    ) -> PspResult<(PacketHeader, Vec<u8>)> {
        self.send_worker(handle)?.send_update_data(mem, gpa, len)
    }

    /// SEND_UPDATE_VMSA: vCPU `vcpu`'s VMSA (the host's encrypted copy at
    /// `vmsa_gpa`) plus the tracked extension, re-wrapped under the transport keys.
    pub fn send_update_vmsa(
        &self,
        handle: u32,
        vcpu: u32,
        vmsa_gpa: u64,
        encrypted_vmsa: &[u8; VMSA_SIZE],
        ext: &TrackedExtension,
    ) -> PspResult<(PacketHeader, Vec<u8>)> {
        let g = self.check_state(Command::SendUpdateVmsa, handle)?;
        if !g.policy.es() {
            return Err(policy_failure(
                "SEND_UPDATE_VMSA is only for SEV-ES guests: the policy has no ES bit",
            ));
        }
        Self::require_active(handle, g)?;
        self.send_worker(handle)?
            .send_update_vmsa(vcpu, vmsa_gpa, encrypted_vmsa, ext)
    }

    /// The transcript tag of the packets made so far (an esvm extension, like the
    /// tag itself): the value SEND_FINISH would return now, without leaving SUPDATE.
    ///
    /// Why: a live migration must hand the tag to the target's RECEIVE_FINISH
    /// *before* the target commits, yet the source may only give up its guest
    /// (SEND_FINISH) *after* that commit — until then any failure must leave the
    /// source running (SEND_CANCEL). Sealed snapshots likewise keep the guest
    /// running. This is no weaker than the SEV API, where RECEIVE_FINISH needs
    /// nothing from the source at all.
    pub fn send_transcript_tag(&self, handle: u32) -> PspResult<[u8; 32]> {
        let g = self.check_state(Command::SendFinish, handle)?;
        g.send
            .as_ref()
            .map(|s| s.finish_tag())
            .ok_or_else(|| PspError::InvalidParam("no send context".into()))
    }

    /// SEND_FINISH: SUPDATE -> SENT; returns the transcript tag the target's
    /// RECEIVE_FINISH checks. The guest must not run again here.
    pub fn send_finish(&mut self, handle: u32) -> PspResult<[u8; 32]> {
        let g = self.guest_mut(Command::SendFinish, handle)?;
        let tag = g
            .send
            .as_ref()
            .map(|s| s.finish_tag())
            .ok_or_else(|| PspError::InvalidParam("no send context".into()))?;
        g.close_channels(GuestState::Sent);
        g.state = GuestState::Sent;
        Ok(tag)
    }

    /// SEND_CANCEL: SUPDATE -> RUNNING; the guest keeps running here.
    pub fn send_cancel(&mut self, handle: u32) -> PspResult<()> {
        let g = self.guest_mut(Command::SendCancel, handle)?;
        g.close_channels(GuestState::Running);
        g.state = GuestState::Running;
        Ok(())
    }

    // ----------------------------------------------------------------- receive

    /// RECEIVE_START: creates a guest context in RUPDATE from the source's
    /// PDH certificate and session blob (SEND_START output). The guest gets a
    /// fresh memory key.
    pub fn receive_start(
        &mut self,
        policy: Policy,
        source_pdh: &[u8],
        session: &[u8],
    ) -> PspResult<u32> {
        self.require_for_guests(Command::ReceiveStart)?;
        self.check_policy_here(policy)?;
        let keys =
            self.unwrap_peer_session("source PDH certificate", source_pdh, session, policy)?;
        let memkey = Arc::new(MemoryKey::random());
        let group = self.next_key_group;
        self.next_key_group += 1;
        let handle = self.new_handle()?;
        let start = crate::transport::session_start_digest(source_pdh, session);
        let recv = RecvState::new(handle, &keys, memkey.clone(), false, policy.es(), start);
        let mut g = Self::new_guest(GuestState::Rupdate, policy, keys, memkey, group);
        g.recv = Some(Arc::new(recv));
        self.guests.insert(handle, g);
        Ok(handle)
    }

    /// A worker that checks RECEIVE_UPDATE_* packets for this guest on any thread.
    pub fn receive_worker(&self, handle: u32) -> PspResult<ReceiveWorker> {
        let g = self.check_state(Command::ReceiveUpdateData, handle)?;
        Self::require_active(handle, g)?;
        let inner = g
            .recv
            .clone()
            .ok_or_else(|| PspError::InvalidParam("no receive context".into()))?;
        Ok(ReceiveWorker { inner })
    }

    /// RECEIVE_UPDATE_DATA: verifies, decrypts and writes one data packet.
    pub fn receive_update_data(
        &self,
        handle: u32,
        mem: &dyn GuestMemoryAccess,
        gpa: u64,
        header: &PacketHeader,
        ciphertext: &[u8],
    ) -> PspResult<()> {
        self.receive_worker(handle)?
            .receive_update_data(mem, gpa, header, ciphertext)
    }

    /// RECEIVE_UPDATE_VMSA: verifies and decrypts one VMSA packet; returns
    /// the VMSA encrypted under this guest's memory key and the tracked
    /// registers derived from the decrypted VMSA.
    pub fn receive_update_vmsa(
        &self,
        handle: u32,
        vcpu: u32,
        vmsa_gpa: u64,
        header: &PacketHeader,
        ciphertext: &[u8],
    ) -> PspResult<ReceivedVmsa> {
        let g = self.check_state(Command::ReceiveUpdateVmsa, handle)?;
        if !g.policy.es() {
            return Err(policy_failure(
                "RECEIVE_UPDATE_VMSA is only for SEV-ES guests: the policy has no ES bit",
            ));
        }
        Self::require_active(handle, g)?;
        self.receive_worker(handle)?
            .receive_update_vmsa(vcpu, vmsa_gpa, header, ciphertext)
    }

    /// RECEIVE_FINISH: checks the source's transcript tag; RUPDATE -> RUNNING.
    /// On failure the guest stays in RUPDATE and must be decommissioned.
    ///
    /// Post-copy: RECEIVE_UPDATE_DATA stays allowed in RUPDATE after the VMSAs arrived,
    /// while the guest already runs, until this command. That works because running a vCPU
    /// (VMRUN; the software vCPU here) never consults the firmware's guest state — only the
    /// ASID's key, installed at ACTIVATE — as on hardware, where the SEV firmware is not on
    /// the VMRUN path either. Consequence: the transcript is checked only here, after the
    /// guest ran. Each packet is authenticated on arrival (its MAC binds it to its GPA) and
    /// its sequence number can be used once, so a packet already delivered cannot be
    /// replayed; but an active attacker who *withheld* an older packet of a page (and
    /// rewrote the frames around it) can deliver it in place of that page's newer one
    /// during post-copy. The guest then runs on an older version of its own page (never
    /// someone else's data: it decrypts under its own key) until this command refuses the
    /// transcript and the destination stops the guest. Pre-copy never runs the guest before
    /// this check.
    pub fn receive_finish(&mut self, handle: u32, tag: &[u8; 32]) -> PspResult<()> {
        let g = self.guest_mut(Command::ReceiveFinish, handle)?;
        let recv = g
            .recv
            .clone()
            .ok_or_else(|| PspError::InvalidParam("no receive context".into()))?;
        if !mac_eq(&recv.finish_tag(), tag) {
            return Err(PspError::BadMeasurement(
                "the packets received differ from what the source sent (a packet was lost, replayed or injected) or the tag is not the source's SEND_FINISH output; the guest cannot run: decommission it and migrate again".into(),
            ));
        }
        let vmsas = recv
            .vmsas
            .lock()
            .map_err(|_| PspError::ResourceLimit("receive state lock poisoned".into()))?
            .clone();
        if g.policy.es() && vmsas.is_empty() {
            return Err(policy_failure(
                "an SEV-ES guest needs RECEIVE_UPDATE_VMSA for its vCPUs before RECEIVE_FINISH",
            ));
        }
        g.vmsas = vmsas;
        g.keys = None;
        g.close_channels(GuestState::Running);
        g.state = GuestState::Running;
        Ok(())
    }

    // ------------------------------------------------------------------- debug

    fn dbg_check(&self, command: Command, handle: u32, gpa: u64, len: usize) -> PspResult<()> {
        let g = self.check_state(command, handle)?;
        if g.policy.nodbg() {
            return Err(policy_failure(format!(
                "{command} refused: the guest policy has NODBG"
            )));
        }
        Self::require_active(handle, g)?;
        Self::check_range(gpa, len, MAX_DBG_LEN, "debug range")
    }

    /// DBG_DECRYPT: plaintext of `len` bytes of guest memory at `gpa`.
    pub fn dbg_decrypt(
        &self,
        handle: u32,
        mem: &dyn GuestMemoryAccess,
        gpa: u64,
        len: usize,
    ) -> PspResult<Vec<u8>> {
        self.dbg_check(Command::DbgDecrypt, handle, gpa, len)?;
        let mut v = vec![0u8; len];
        mem.read(gpa, &mut v)?;
        Ok(v)
    }

    /// DBG_ENCRYPT: writes `data` into guest memory at `gpa`.
    pub fn dbg_encrypt(
        &self,
        handle: u32,
        mem: &dyn GuestMemoryAccess,
        gpa: u64,
        data: &[u8],
    ) -> PspResult<()> {
        self.dbg_check(Command::DbgEncrypt, handle, gpa, data.len())?;
        mem.write(gpa, data)?;
        Ok(())
    }

    // ---------------------------------------------------------------- lifecycle

    /// ACTIVATE: binds the guest to `asid` (1..=MAX_ASID). An ASID may be
    /// shared only by guests that share a memory key.
    pub fn activate(&mut self, handle: u32, asid: u32) -> PspResult<()> {
        self.check_state(Command::Activate, handle)?;
        if asid == 0 || asid > MAX_ASID {
            return Err(PspError::InvalidAsid {
                asid,
                max: MAX_ASID,
            });
        }
        let me = &self.guests[&handle];
        if let Some(a) = me.asid {
            return Err(PspError::Active { handle, asid: a });
        }
        let group = me.key_group;
        if let Some((owner, _)) = self
            .guests
            .iter()
            .find(|(h, g)| **h != handle && g.asid == Some(asid) && g.key_group != group)
        {
            return Err(PspError::AsidOwned {
                asid,
                owner: *owner,
            });
        }
        let g = self.guest_mut(Command::Activate, handle)?;
        g.asid = Some(asid);
        if let Some(s) = &g.send {
            s.set_active(true);
        }
        if let Some(r) = &g.recv {
            r.set_active(true);
        }
        Ok(())
    }

    /// DEACTIVATE: unbinds the guest from its ASID.
    pub fn deactivate(&mut self, handle: u32) -> PspResult<()> {
        let g = self.guest_mut(Command::Deactivate, handle)?;
        if g.asid.take().is_none() {
            return Err(PspError::Inactive { handle });
        }
        if let Some(s) = &g.send {
            s.set_active(false);
        }
        if let Some(r) = &g.recv {
            r.set_active(false);
        }
        Ok(())
    }

    /// DECOMMISSION: deletes an inactive guest context and its keys.
    pub fn decommission(&mut self, handle: u32) -> PspResult<()> {
        let g = self.guest_mut(Command::Decommission, handle)?;
        if let Some(asid) = g.asid {
            return Err(PspError::Active { handle, asid });
        }
        g.close_channels(GuestState::Uninit);
        self.guests.remove(&handle);
        Ok(())
    }

    /// GUEST_STATUS.
    pub fn guest_status(&self, handle: u32) -> PspResult<GuestStatus> {
        let g = self.check_state(Command::GuestStatus, handle)?;
        Ok(GuestStatus {
            handle,
            policy: g.policy,
            asid: g.asid.unwrap_or(0),
            state: g.state,
        })
    }

    /// Handles of all guest contexts.
    pub fn guest_handles(&self) -> Vec<u32> {
        self.guests.keys().copied().collect()
    }

    // ------------------------------------------------- memory controller model

    fn any_guest(&self, handle: u32) -> PspResult<&Guest> {
        self.guests
            .get(&handle)
            .ok_or(PspError::InvalidGuest { handle })
    }

    /// The ciphertext the host sees for a private page of this guest.
    pub fn host_view_page(
        &self,
        handle: u32,
        gpa: u64,
        plain: &[u8; PAGE_SIZE],
    ) -> PspResult<[u8; PAGE_SIZE]> {
        Ok(self.any_guest(handle)?.memkey.encrypt_page(gpa, plain))
    }

    /// An encrypt-only handle on the guest's memory key, for the hypervisor
    /// layer's host-ciphertext view of private pages (keeps working while the
    /// guest context exists; share it instead of locking the PSP per page).
    pub fn host_view(&self, handle: u32) -> PspResult<HostView> {
        Ok(HostView {
            memkey: self.any_guest(handle)?.memkey.clone(),
        })
    }

    fn check_vmsa_gpa(&self, handle: u32, vmsa_gpa: u64) -> PspResult<&Guest> {
        let g = self.any_guest(handle)?;
        let received = g.recv.as_ref().is_some_and(|r| {
            r.vmsas
                .lock()
                .map(|m| m.values().any(|v| *v == vmsa_gpa))
                .unwrap_or(false)
        });
        if !received && !g.vmsas.values().any(|v| *v == vmsa_gpa) {
            return Err(PspError::InvalidParam(format!(
                "guest {handle} has no VMSA at GPA 0x{vmsa_gpa:x}"
            )));
        }
        Ok(g)
    }

    /// **Trusted CPU model only.** The guest's memory key as the memory
    /// controller holds it: the CPU model uses it to convert pages between the
    /// private (C-bit set) and shared views exactly as hardware would. The
    /// hypervisor only passes this handle from the firmware to the CPU model;
    /// it must never use it itself.
    pub fn memory_controller_key(&self, handle: u32) -> PspResult<Arc<MemoryKey>> {
        Ok(self.any_guest(handle)?.memkey.clone())
    }

    /// **Trusted CPU model only.** Decrypts the host's copy of a VMSA so the
    /// CPU model can load it at VMRUN. The hypervisor (untrusted) must never
    /// call this: doing so would break the model's trust boundary.
    pub fn vmsa_plaintext(
        &self,
        handle: u32,
        vmsa_gpa: u64,
        encrypted: &[u8; VMSA_SIZE],
    ) -> PspResult<Box<[u8; VMSA_SIZE]>> {
        let g = self.check_vmsa_gpa(handle, vmsa_gpa)?;
        Ok(Box::new(g.memkey.decrypt_page(vmsa_gpa, encrypted)))
    }

    /// DBG_DECRYPT of a vCPU's VMSA page (the host holds its ciphertext): the plaintext,
    /// if the guest's policy allows debugging (refused with NODBG).
    pub fn dbg_decrypt_vmsa(
        &self,
        handle: u32,
        vmsa_gpa: u64,
        encrypted: &[u8; VMSA_SIZE],
    ) -> PspResult<Box<[u8; VMSA_SIZE]>> {
        self.dbg_check(Command::DbgDecrypt, handle, vmsa_gpa, VMSA_SIZE)?;
        let g = self.check_vmsa_gpa(handle, vmsa_gpa)?;
        Ok(Box::new(g.memkey.decrypt_page(vmsa_gpa, encrypted)))
    }

    /// **Trusted CPU model only.** Encrypts a VMSA the CPU model saved at
    /// VMEXIT; the host keeps the ciphertext.
    pub fn seal_vmsa(
        &self,
        handle: u32,
        vmsa_gpa: u64,
        plain: &[u8; VMSA_SIZE],
    ) -> PspResult<Box<[u8; VMSA_SIZE]>> {
        let g = self.check_vmsa_gpa(handle, vmsa_gpa)?;
        Ok(Box::new(g.memkey.encrypt_page(vmsa_gpa, plain)))
    }

    /// The VMSA GPAs of a guest's vCPUs (vCPU index -> GPA).
    pub fn vmsa_gpas(&self, handle: u32) -> PspResult<BTreeMap<u32, u64>> {
        Ok(self.any_guest(handle)?.vmsas.clone())
    }
}
