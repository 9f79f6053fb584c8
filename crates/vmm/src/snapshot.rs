//! Snapshots: `esvm ctl snapshot DIR` writes one, `esvm restore DIR` runs it.
//!
//! # Plain guests (format version 3)
//!
//! A snapshot directory holds two files:
//!
//! * `memory.img` — guest RAM as a **sparse** file of exactly the guest's memory size: only
//!   pages ever written ([`crate::dirty`]) are stored, at their guest-physical offsets; the
//!   rest are holes (zero, as in a fresh VM).
//! * `vm.state` — one header line `ESVM-SNAPSHOT <version> crc32c=<8 hex> len=<bytes>\n`
//!   followed by `len` bytes of JSON ([`Manifest`]): the VM's configuration, the
//!   [`MachineState`] (devices, virtual clock, instruction counts), every vCPU's
//!   [`VcpuSnapshot`], and the index of the stored memory: runs of at most 1024 pages, each
//!   with the CRC32C of its bytes.
//!
//! # SEV-ES guests: sealed to their platform (format version 4)
//!
//! The host can read neither an SEV-ES guest's private memory nor its vCPUs, so a snapshot
//! of one is a live migration to its **own** platform that never finishes: SEND_START
//! towards the platform's own certificate chain (the firmware enforces the guest's policy:
//! a NOSEND guest cannot be snapshotted), SEND_UPDATE_DATA for every page ever written,
//! SEND_UPDATE_VMSA for every vCPU, the send transcript tag, and then always SEND_CANCEL,
//! so the guest runs on. The transport keys are wrapped for the platform's own PDH: only
//! that platform, with that PDH, can open the snapshot (`esvm restore DIR --platform DIR`:
//! RECEIVE_START, RECEIVE_UPDATE_DATA / _VMSA, RECEIVE_FINISH into a fresh VM). The
//! directory holds:
//!
//! * `memory.sev` — the page packets back to back, in ascending page order, exactly as live
//!   migration sends them ([`esvm_hv::sev::PagePacket`]): a private page as its firmware
//!   transport packet ([`PRIVATE_PACKET_LEN`] bytes: kind, header with IV and MAC,
//!   ciphertext), a shared page (one the guest shares with the host, e.g. its GHCB) as its
//!   host-visible bytes ([`SHARED_PACKET_LEN`] bytes: kind, page).
//! * `vm.state` — the same header and checksum as above with version 4; its JSON has no
//!   vCPU snapshots and no memory runs but a `sev` section ([`SealedState`]): the
//!   SEND_START output, each vCPU's VMSA packet with the hypervisor's own vCPU state, the
//!   transcript tag, and the index of `memory.sev`: runs of at most 1024 consecutive pages
//!   of one kind, each with the CRC32C of its packets (a run starts where the one before it
//!   ends). The [`MachineState`] carries the hypervisor's VM-wide GHCB state.
//!
//! # Versions
//! The format versions are derived ([`SNAPSHOT_VERSION`], [`SEALED_SNAPSHOT_VERSION`]): a
//! generation that goes up with the files' own layout and with the machine state they hold
//! ([`MACHINE_STATE_VERSION`](crate::machine::MACHINE_STATE_VERSION), which follows the
//! devices' state format); plain snapshots are odd (2 x generation - 1), sealed ones even.
//! Generation 1 (versions 1 and 2) kept the devices in fixed fields; generation 2 keeps them
//! by id (`esvm_devices::DevicesState`). A snapshot of an older generation is refused before
//! anything is read beyond its header, with a message saying so.
//!
//! # Writing and restoring
//!
//! The guest is paused (an internal hold) while the snapshot is taken and resumes
//! afterwards. The memory file is written first and `vm.state` last, each under a temporary
//! name renamed into place after an fsync, so a crash leaves no half-written state file.
//! Restoring checks everything it can before the guest runs: the header, the state's
//! checksum and length (truncation), the JSON, the index (ascending, in range), the memory
//! file's size and every run's checksum (and, sealed, every packet's kind). A corrupt or
//! truncated snapshot is refused with a message naming the file and what is wrong. A
//! sealed snapshot is then checked by the secure processor: RECEIVE_START fails on another
//! platform (or after the PDH was regenerated), every private page and vCPU packet must
//! pass its MAC (bound to its address or vCPU), and RECEIVE_FINISH checks the transcript
//! tag (no packet dropped or added). Whatever is refused is decommissioned and never runs.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use esvm_arch::VcpuSnapshot;
use esvm_hv::sev::{
    PagePacket, SevSessionStart, SevVcpuTransfer, SevVm, PRIVATE_PACKET_LEN, SHARED_PACKET_LEN,
};
use esvm_hv::{BackendKind, HvError, VmType};
use esvm_migration::PageSet;
use thiserror::Error;

use crate::machine::{
    Machine, MachineConfig, MachineHandle, MachineState, StoppedGuard, MACHINE_STATE_VERSION,
};
use crate::runctl::{ControlError, PARK_TIMEOUT};

/// Name of the state file in a snapshot directory.
pub const STATE_FILE: &str = "vm.state";
/// Name of the memory file of a plain snapshot.
pub const MEMORY_FILE: &str = "memory.img";
/// Name of the memory file of a sealed SEV-ES snapshot.
pub const SEALED_MEMORY_FILE: &str = "memory.sev";
/// Generation of the snapshot files' own layout (header, manifest, memory index); bump it
/// when they change.
const SNAPSHOT_LAYOUT_VERSION: u32 = 1;
/// Generation of the snapshot format: it goes up with the files' layout and with the
/// machine state they hold (and so with the devices' state format).
const SNAPSHOT_GENERATION: u32 = SNAPSHOT_LAYOUT_VERSION + MACHINE_STATE_VERSION - 1;
/// Format version of plain snapshots (odd).
pub const SNAPSHOT_VERSION: u32 = 2 * SNAPSHOT_GENERATION - 1;
/// Format version of sealed SEV-ES snapshots (even).
pub const SEALED_SNAPSHOT_VERSION: u32 = 2 * SNAPSHOT_GENERATION;
const MAGIC: &str = "ESVM-SNAPSHOT";
/// Largest state file accepted (the JSON of devices and vCPUs is far smaller).
const MAX_STATE_LEN: u64 = 256 << 20;
/// Most pages per stored run (4 MiB of plain memory).
pub const MAX_RUN_PAGES: u64 = 1024;
const PAGE: u64 = 4096;

/// Why a snapshot could not be written or restored.
#[allow(missing_docs)] // Each variant is documented by its #[error] message.
#[derive(Debug, Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} is not an esvm snapshot directory: it has no {STATE_FILE}")]
    NotASnapshot(PathBuf),
    #[error("{path} is corrupt: {why}; the snapshot cannot be restored")]
    Corrupt { path: PathBuf, why: String },
    #[error("{path} is corrupt: {what}: {source}; the snapshot cannot be restored")]
    CorruptBy {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: BoxError,
    },
    #[error("{path} is truncated: {why}; the snapshot cannot be restored")]
    Truncated { path: PathBuf, why: String },
    #[error(
        "snapshot format version {0} is not supported (this esvm reads version \
         {SNAPSHOT_VERSION}, plain guests, and {SEALED_SNAPSHOT_VERSION}, sealed SEV-ES guests); \
         restore it with the esvm version that wrote it"
    )]
    Version(u32),
    #[error(
        "snapshot format version {0} was written by an older esvm, whose machine and device \
         state this esvm no longer reads (it reads version {SNAPSHOT_VERSION}, plain guests, \
         and {SEALED_SNAPSHOT_VERSION}, sealed SEV-ES guests); restore it with the esvm \
         version that wrote it"
    )]
    OldVersion(u32),
    #[error("{0}")]
    Unsupported(String),
    #[error("saving the VM state: {0}")]
    SaveVcpu(#[source] crate::machine::MachineError),
    #[error("saving the VM state: {what}: {source}")]
    Save {
        what: &'static str,
        #[source]
        source: BoxError,
    },
    #[error("reading guest memory: {0}")]
    ReadMemory(#[source] crate::ram::RamError),
    #[error("restoring the VM: {0}")]
    Restore(#[from] crate::machine::MachineError),
    #[error("cannot snapshot this SEV-ES guest: {0}")]
    SealedSave(String),
    #[error("cannot snapshot this SEV-ES guest: {what}: {source}")]
    SealedSaveBy {
        what: String,
        #[source]
        source: BoxError,
    },
    #[error(
        "this snapshot is of an SEV-ES guest sealed to its platform; give that platform with \
         --platform DIR"
    )]
    PlatformNeeded,
    #[error("the platform directory {0} does not exist (give the directory of the platform the guest ran on)")]
    NoPlatformDir(PathBuf),
    #[error(transparent)]
    Platform(#[from] crate::sev_launch::SevLaunchError),
    #[error(
        "the snapshot in {dir} is sealed to another platform (or its PDH was regenerated \
         since): the platform in {platform} cannot open it{detail}. Restore it with --platform \
         naming the platform the guest ran on"
    )]
    OtherPlatform {
        dir: PathBuf,
        platform: PathBuf,
        detail: String,
    },
    #[error(
        "{path}: the secure processor refused the sealed guest: {what}: {source}. The snapshot \
         was damaged or altered; the guest was discarded and never ran"
    )]
    SealedRefused {
        path: PathBuf,
        what: String,
        #[source]
        source: BoxError,
    },
}

/// The error of another layer that a [`SnapshotError`] keeps as its source.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// `what` failed while sealing the guest, because of `source`.
fn sealed_save_by(what: String, source: impl Into<BoxError>) -> SnapshotError {
    SnapshotError::SealedSaveBy {
        what,
        source: source.into(),
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A stored run of pages in `memory.img`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Run {
    /// The first guest page of the run.
    pub first: u64,
    /// Pages in the run (at most [`MAX_RUN_PAGES`]).
    pub count: u64,
    /// CRC32C of the run's bytes.
    pub crc32c: u32,
}

/// The kind of a page packet in `memory.sev`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PacketKind {
    /// A private page: its firmware transport packet (SEND_UPDATE_DATA).
    Private,
    /// A page the guest shares with the host: its bytes.
    Shared,
}

impl PacketKind {
    /// The length of one encoded packet of this kind.
    pub fn packet_len(self) -> usize {
        match self {
            PacketKind::Private => PRIVATE_PACKET_LEN,
            PacketKind::Shared => SHARED_PACKET_LEN,
        }
    }

    /// The kind of an encoded packet (checking its length).
    fn of(packet: &[u8]) -> Result<PacketKind, HvError> {
        Ok(match PagePacket::decode(packet)? {
            PagePacket::Private { .. } => PacketKind::Private,
            PagePacket::Shared(_) => PacketKind::Shared,
        })
    }

    fn name(self) -> &'static str {
        match self {
            PacketKind::Private => "private",
            PacketKind::Shared => "shared",
        }
    }
}

/// A run of consecutive pages of one kind in `memory.sev`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SealedRun {
    /// The first guest page of the run.
    pub first: u64,
    /// Pages in the run (at most [`MAX_RUN_PAGES`]).
    pub count: u64,
    /// Private or shared: the kind of every packet of the run.
    pub kind: PacketKind,
    /// CRC32C of the run's `count` packets as stored.
    pub crc32c: u32,
}

impl SealedRun {
    fn len(&self) -> usize {
        self.count as usize * self.kind.packet_len()
    }
}

/// The sealed part of an SEV-ES snapshot's `vm.state`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SealedState {
    /// SEND_START's output: policy, the platform's PDH, the transport keys wrapped for it.
    pub session: SevSessionStart,
    /// Every vCPU's VMSA packet and the hypervisor's state of it, in vCPU order.
    pub vcpus: Vec<SevVcpuTransfer>,
    /// The send transcript tag of every packet, for RECEIVE_FINISH.
    pub transcript_tag: [u8; 32],
    /// The index of `memory.sev`.
    pub memory: Vec<SealedRun>,
}

/// The JSON part of `vm.state`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Plain or SEV-ES.
    pub vm_type: VmType,
    /// The backend the snapshot was taken on (plain state restores on either).
    pub backend: BackendKind,
    /// Guest RAM in bytes.
    pub mem_size: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Devices, virtual clock, instruction counts (and, sealed, the host's GHCB state).
    pub machine: MachineState,
    /// Plain: every vCPU's state (empty when sealed).
    pub vcpu_states: Vec<VcpuSnapshot>,
    /// Plain: the index of `memory.img` (empty when sealed).
    pub memory: Vec<Run>,
    /// SEV-ES (version 2): the sealed guest. Absent from plain snapshots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sev: Option<SealedState>,
}

/// Write a snapshot of the machine behind `h` into `dir` (created if missing). The snapshot
/// is registered in the VM's lifecycle (which refuses it while another snapshot or a
/// migration runs) and the guest is held stopped meanwhile. Returns the bytes written.
pub fn save(h: &MachineHandle, dir: &Path) -> Result<u64, SnapshotError> {
    let _snapshot = h
        .control
        .begin_snapshot(h.config.vm_type == VmType::SevEs)
        .map_err(ControlError::from)?;
    let stopped = h.control.stop(PARK_TIMEOUT)?;
    match h.config.vm_type {
        VmType::Plain => save_stopped(h, &stopped, dir),
        VmType::SevEs => save_sealed(h, &stopped, dir),
    }
}

/// A plain snapshot of the guest `stopped` keeps stopped: its memory goes to the file straight
/// from guest RAM (no vCPU can change it meanwhile).
fn save_stopped(
    h: &MachineHandle,
    stopped: &StoppedGuard,
    dir: &Path,
) -> Result<u64, SnapshotError> {
    let (machine, vcpu_states) = h
        .control
        .run_job(|m| {
            let state = m.save_state();
            let vcpus: Result<Vec<_>, _> = (0..m.config().vcpus).map(|i| m.save_vcpu(i)).collect();
            vcpus.map(|v| (state, v))
        })?
        .map_err(SnapshotError::SaveVcpu)?;
    let written = h.tracker.ever_written().map_err(|e| SnapshotError::Save {
        what: "reading the dirty log",
        source: e.into(),
    })?;

    fs::create_dir_all(dir).map_err(io(dir))?;
    let mem_path = dir.join(MEMORY_FILE);
    let mem_tmp = dir.join(format!("{MEMORY_FILE}.tmp"));
    let mut runs = Vec::new();
    let mut bytes = 0u64;
    {
        let f = File::create(&mem_tmp).map_err(io(&mem_tmp))?;
        f.set_len(h.config.mem_size).map_err(io(&mem_tmp))?;
        let mut cursor = 0;
        while let Some(first) = written.next_set(cursor) {
            let count = written.run_len(first, MAX_RUN_PAGES);
            let data = h
                .stopped_ram(stopped, first, count)
                .map_err(SnapshotError::ReadMemory)?;
            f.write_all_at(data, first * PAGE).map_err(io(&mem_tmp))?;
            runs.push(Run {
                first,
                count,
                crc32c: crc32c::crc32c(data),
            });
            bytes += data.len() as u64;
            cursor = first + count;
        }
        f.sync_all().map_err(io(&mem_tmp))?;
    }
    fs::rename(&mem_tmp, &mem_path).map_err(io(&mem_path))?;

    let manifest = Manifest {
        vm_type: h.config.vm_type,
        backend: h.config.backend,
        mem_size: h.config.mem_size,
        vcpus: h.config.vcpus,
        machine,
        vcpu_states,
        memory: runs,
        sev: None,
    };
    Ok(bytes + write_state(dir, SNAPSHOT_VERSION, &manifest)?)
}

/// Write `vm.state` (header and JSON) under a temporary name, fsync, rename it into place.
/// Returns the bytes written.
fn write_state(dir: &Path, version: u32, manifest: &Manifest) -> Result<u64, SnapshotError> {
    let json = serde_json::to_vec(manifest).map_err(|e| SnapshotError::Save {
        what: "encoding the state",
        source: e.into(),
    })?;
    let header = format!(
        "{MAGIC} {version} crc32c={:08x} len={}\n",
        crc32c::crc32c(&json),
        json.len()
    );
    let state_path = dir.join(STATE_FILE);
    let state_tmp = dir.join(format!("{STATE_FILE}.tmp"));
    {
        let mut f = File::create(&state_tmp).map_err(io(&state_tmp))?;
        f.write_all(header.as_bytes()).map_err(io(&state_tmp))?;
        f.write_all(&json).map_err(io(&state_tmp))?;
        f.sync_all().map_err(io(&state_tmp))?;
    }
    fs::rename(&state_tmp, &state_path).map_err(io(&state_path))?;
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok((header.len() + json.len()) as u64)
}

/// SEV-ES: send the guest `_stopped` keeps stopped (so that its pages, VMSAs and device
/// state are one consistent moment) to its own platform and store what was sent; the send
/// session is always cancelled afterwards, so the guest runs on.
fn save_sealed(
    h: &MachineHandle,
    _stopped: &StoppedGuard,
    dir: &Path,
) -> Result<u64, SnapshotError> {
    let fail = |s: String| SnapshotError::SealedSave(s);
    let sev =
        h.vm.sev()
            .ok_or_else(|| fail("SEV-ES guests run only on the emu backend".into()))?;
    let (platform, handle) = sev
        .platform()
        .zip(sev.handle())
        .ok_or_else(|| fail("the VM has no SEV-ES guest context".into()))?;
    // The platform's own chain: the snapshot is sealed to this platform's PDH.
    let (chain, nosend) = {
        let psp = platform.lock().unwrap_or_else(|e| e.into_inner());
        let chain = psp.pdh_cert_export().map_err(|e| {
            sealed_save_by("the platform cannot export its certificate chain".into(), e)
        })?;
        let nosend = psp.guest_status(handle).is_ok_and(|s| s.policy.nosend());
        (chain.to_bytes(), nosend)
    };
    // The firmware enforces the guest's policy here.
    let start = sev.send_start(&chain).map_err(|e| {
        fail(if nosend {
            format!(
                "its policy has NOSEND: the guest may never leave its secure processor, and a \
                 sealed snapshot is a send to this same platform (SEND_START refused: {e}); \
                 the guest runs on"
            )
        } else {
            format!("the secure processor refused SEND_START: {e}; the guest runs on")
        })
    })?;
    let written = write_sealed(h, sev, start, dir);
    let cancelled = sev.send_cancel();
    match (written, cancelled) {
        (Ok(n), Ok(())) => Ok(n),
        (Ok(_), Err(e)) => Err(sealed_save_by(
            format!(
                "the snapshot was written to {}, but SEND_CANCEL failed afterwards",
                dir.display()
            ),
            e,
        )),
        (Err(e), Ok(())) => Err(e),
        (Err(e), Err(c)) => {
            tracing::warn!("SEND_CANCEL after a failed snapshot: {c}");
            Err(e)
        }
    }
}

/// Within a send session: every written page's packet to `memory.sev`, then every vCPU's
/// VMSA packet, the machine state and the transcript tag to `vm.state`.
fn write_sealed(
    h: &MachineHandle,
    sev: &dyn SevVm,
    session: SevSessionStart,
    dir: &Path,
) -> Result<u64, SnapshotError> {
    let written = h
        .tracker
        .ever_written()
        .map_err(|e| sealed_save_by("reading the dirty log".into(), e))?;

    fs::create_dir_all(dir).map_err(io(dir))?;
    let mem_path = dir.join(SEALED_MEMORY_FILE);
    let mem_tmp = dir.join(format!("{SEALED_MEMORY_FILE}.tmp"));
    let mut runs: Vec<SealedRun> = Vec::new();
    let mut bytes = 0u64;
    {
        let f = File::create(&mem_tmp).map_err(io(&mem_tmp))?;
        let mut w = BufWriter::with_capacity(1 << 20, &f);
        let mut packet = Vec::with_capacity(PRIVATE_PACKET_LEN);
        for page in written.iter() {
            packet.clear();
            sev.send_page(page, &mut packet).map_err(|e| {
                sealed_save_by(format!("SEND_UPDATE_DATA of guest page {page:#x}"), e)
            })?;
            let kind = PacketKind::of(&packet)
                .map_err(|e| sealed_save_by(format!("the packet of guest page {page:#x}"), e))?;
            match runs.last_mut() {
                Some(r)
                    if r.kind == kind && r.first + r.count == page && r.count < MAX_RUN_PAGES =>
                {
                    r.count += 1;
                    r.crc32c = crc32c::crc32c_append(r.crc32c, &packet);
                }
                _ => runs.push(SealedRun {
                    first: page,
                    count: 1,
                    kind,
                    crc32c: crc32c::crc32c(&packet),
                }),
            }
            w.write_all(&packet).map_err(io(&mem_tmp))?;
            bytes += packet.len() as u64;
        }
        w.flush().map_err(io(&mem_tmp))?;
        drop(w);
        f.sync_all().map_err(io(&mem_tmp))?;
    }
    fs::rename(&mem_tmp, &mem_path).map_err(io(&mem_path))?;

    let (machine, vcpus) = h
        .control
        .run_job(|m| {
            let state = m.save_state();
            let vcpus: Result<Vec<_>, _> =
                (0..m.config().vcpus).map(|i| m.send_vcpu_sev(i)).collect();
            vcpus.map(|v| (state, v))
        })?
        .map_err(|e| sealed_save_by("SEND_UPDATE_VMSA".into(), e))?;
    // After every packet: the tag covers them all.
    let transcript_tag = sev
        .send_transcript_tag()
        .map_err(|e| sealed_save_by("reading the send transcript tag".into(), e))?;
    let manifest = Manifest {
        vm_type: VmType::SevEs,
        backend: h.config.backend,
        mem_size: h.config.mem_size,
        vcpus: h.config.vcpus,
        machine,
        vcpu_states: Vec::new(),
        memory: Vec::new(),
        sev: Some(SealedState {
            session,
            vcpus,
            transcript_tag,
            memory: runs,
        }),
    };
    Ok(bytes + write_state(dir, SEALED_SNAPSHOT_VERSION, &manifest)?)
}

/// Read and check `dir/vm.state`.
pub fn read_manifest(dir: &Path) -> Result<Manifest, SnapshotError> {
    let path = dir.join(STATE_FILE);
    let meta = match fs::metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(SnapshotError::NotASnapshot(dir.to_path_buf()))
        }
        Err(e) => return Err(io(&path)(e)),
    };
    if meta.len() > MAX_STATE_LEN {
        return Err(SnapshotError::Corrupt {
            path,
            why: format!("it is {} bytes, more than any VM state", meta.len()),
        });
    }
    let data = fs::read(&path).map_err(io(&path))?;
    parse_state(&path, &data)
}

/// Why `data` is not a snapshot state file, with its first bytes in hex (what a binary
/// file or another format starts with is recognisable that way).
fn not_a_snapshot(data: &[u8]) -> String {
    let start: String = data.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!(
        "it does not start with an esvm snapshot header (it starts with 0x{start}, a \
         snapshot with {MAGIC:?})"
    )
}

fn parse_state(path: &Path, data: &[u8]) -> Result<Manifest, SnapshotError> {
    let corrupt = |why: String| SnapshotError::Corrupt {
        path: path.to_path_buf(),
        why,
    };
    let Some(nl) = data.iter().take(128).position(|&b| b == b'\n') else {
        let magic = MAGIC.as_bytes();
        let prefix = data.starts_with(magic) || magic.starts_with(data);
        return Err(if data.len() < 128 && prefix {
            SnapshotError::Truncated {
                path: path.to_path_buf(),
                why: "its header line is incomplete".into(),
            }
        } else {
            corrupt(not_a_snapshot(data))
        });
    };
    let header =
        std::str::from_utf8(&data[..nl]).map_err(|_| corrupt("its header is not text".into()))?;
    let body = &data[nl + 1..];
    let fields: Vec<&str> = header.split(' ').collect();
    let [magic, version, crc, len] = fields[..] else {
        return Err(corrupt(format!("unexpected header {header:?}")));
    };
    if magic != MAGIC {
        return Err(corrupt(not_a_snapshot(data)));
    }
    let version: u32 = version
        .parse()
        .map_err(|_| corrupt(format!("bad version in header {header:?}")))?;
    if version < SNAPSHOT_VERSION {
        return Err(SnapshotError::OldVersion(version));
    }
    if version != SNAPSHOT_VERSION && version != SEALED_SNAPSHOT_VERSION {
        return Err(SnapshotError::Version(version));
    }
    let crc = crc
        .strip_prefix("crc32c=")
        .and_then(|c| u32::from_str_radix(c, 16).ok())
        .ok_or_else(|| corrupt(format!("bad checksum field in header {header:?}")))?;
    let len: u64 = len
        .strip_prefix("len=")
        .and_then(|l| l.parse().ok())
        .ok_or_else(|| corrupt(format!("bad length field in header {header:?}")))?;
    if (body.len() as u64) < len {
        return Err(SnapshotError::Truncated {
            path: path.to_path_buf(),
            why: format!(
                "the header announces {len} bytes of state, only {} follow",
                body.len()
            ),
        });
    }
    if body.len() as u64 > len {
        return Err(corrupt(format!(
            "{} bytes follow the {len} bytes of state the header announces",
            body.len() as u64 - len
        )));
    }
    if crc32c::crc32c(body) != crc {
        return Err(corrupt("the state fails its checksum".into()));
    }
    let m: Manifest = serde_json::from_slice(body).map_err(|e| SnapshotError::CorruptBy {
        path: path.to_path_buf(),
        what: "the state cannot be decoded",
        source: e.into(),
    })?;
    check_manifest(&m, version).map_err(corrupt)?;
    Ok(m)
}

fn check_manifest(m: &Manifest, version: u32) -> Result<(), String> {
    if m.mem_size == 0 || !m.mem_size.is_multiple_of(PAGE) {
        return Err(format!(
            "memory size {:#x} is not a multiple of 4 KiB",
            m.mem_size
        ));
    }
    if m.vcpus == 0 {
        return Err("the VM has no vCPUs".into());
    }
    if m.machine.instructions.len() != m.vcpus as usize {
        return Err(format!(
            "{} vCPUs, but instruction counts for {}",
            m.vcpus,
            m.machine.instructions.len()
        ));
    }
    let pages = m.mem_size / PAGE;
    let check_runs = |runs: &mut dyn Iterator<Item = (u64, u64)>| {
        let mut next = 0u64;
        for (first, count) in runs {
            if count == 0 || count > MAX_RUN_PAGES || first < next {
                return Err(format!(
                    "memory run {first}+{count} is empty, too long or out of order"
                ));
            }
            if first.checked_add(count).is_none_or(|end| end > pages) {
                return Err(format!(
                    "memory run {first}+{count} lies outside the {pages} pages of guest memory"
                ));
            }
            next = first + count;
        }
        Ok(())
    };
    match (version, m.vm_type, &m.sev) {
        (SNAPSHOT_VERSION, VmType::Plain, None) => {
            if m.vcpu_states.len() != m.vcpus as usize {
                return Err(format!(
                    "{} vCPUs, but {} vCPU states",
                    m.vcpus,
                    m.vcpu_states.len()
                ));
            }
            check_runs(&mut m.memory.iter().map(|r| (r.first, r.count)))
        }
        (SEALED_SNAPSHOT_VERSION, VmType::SevEs, Some(s)) => {
            if s.vcpus.len() != m.vcpus as usize {
                return Err(format!(
                    "{} vCPUs, but {} sealed vCPU states",
                    m.vcpus,
                    s.vcpus.len()
                ));
            }
            if !m.vcpu_states.is_empty() || !m.memory.is_empty() {
                return Err("a sealed snapshot with plain vCPU states or memory".into());
            }
            if m.machine.sev.is_none() {
                return Err("a sealed snapshot without the hypervisor's SEV-ES state".into());
            }
            check_runs(&mut s.memory.iter().map(|r| (r.first, r.count)))
        }
        _ => Err(format!(
            "a version {version} snapshot of {} guest {} a sealed section is inconsistent",
            match m.vm_type {
                VmType::Plain => "a plain",
                VmType::SevEs => "an SEV-ES",
            },
            if m.sev.is_some() { "with" } else { "without" }
        )),
    }
}

/// Build a machine from the snapshot in `dir` on `backend`, with COM1 writing to
/// `serial_out`: memory, vCPUs and devices restored, ready to run. A sealed SEV-ES snapshot
/// needs the directory of the platform it was sealed to (`platform`, ignored for plain
/// snapshots).
pub fn restore(
    dir: &Path,
    backend: BackendKind,
    platform: Option<&Path>,
    serial_out: Box<dyn Write + Send>,
) -> Result<Machine, SnapshotError> {
    let m = read_manifest(dir)?;
    if m.sev.is_some() {
        return restore_sealed(dir, m, backend, platform, serial_out);
    }
    let mem_path = dir.join(MEMORY_FILE);
    let f = File::open(&mem_path).map_err(io(&mem_path))?;
    let size = f.metadata().map_err(io(&mem_path))?.len();
    if size < m.mem_size {
        return Err(SnapshotError::Truncated {
            path: mem_path,
            why: format!(
                "it is {size} bytes, the guest has {} bytes of memory",
                m.mem_size
            ),
        });
    }
    if size > m.mem_size {
        return Err(SnapshotError::Corrupt {
            path: mem_path,
            why: format!(
                "it is {size} bytes, the guest has only {} bytes of memory",
                m.mem_size
            ),
        });
    }
    let config = MachineConfig {
        backend,
        vm_type: VmType::Plain,
        mem_size: m.mem_size,
        vcpus: m.vcpus,
        max_instructions: None,
    };
    let mut machine = Machine::new(&config, serial_out)?;
    let mut buf = vec![0u8; (MAX_RUN_PAGES * PAGE) as usize];
    for r in &m.memory {
        let data = &mut buf[..(r.count * PAGE) as usize];
        f.read_exact_at(data, r.first * PAGE)
            .map_err(io(&mem_path))?;
        if crc32c::crc32c(data) != r.crc32c {
            return Err(SnapshotError::Corrupt {
                path: mem_path,
                why: format!(
                    "guest pages {:#x}..{:#x} fail their checksum",
                    r.first,
                    r.first + r.count
                ),
            });
        }
        machine
            .vm()
            .memory()
            .write(r.first * PAGE, data)
            .map_err(|e| SnapshotError::Save {
                what: "writing guest memory",
                source: e.into(),
            })?;
    }
    for (i, s) in m.vcpu_states.iter().enumerate() {
        machine.restore_vcpu(i as u32, s)?;
    }
    machine.restore_state(&m.machine)?;
    Ok(machine)
}

/// Check `memory.sev` against the index: its exact size, then every run's checksum and
/// every packet's kind and length.
fn check_sealed_memory(f: &File, path: &Path, runs: &[SealedRun]) -> Result<(), SnapshotError> {
    let expected: u128 = runs.iter().map(|r| r.len() as u128).sum();
    let size = f.metadata().map_err(io(path))?.len();
    if u128::from(size) < expected {
        return Err(SnapshotError::Truncated {
            path: path.to_path_buf(),
            why: format!("it is {size} bytes, its index describes {expected}"),
        });
    }
    if u128::from(size) > expected {
        return Err(SnapshotError::Corrupt {
            path: path.to_path_buf(),
            why: format!("it is {size} bytes, its index describes only {expected}"),
        });
    }
    let mut buf = Vec::new();
    let mut offset = 0u64;
    for r in runs {
        read_sealed_run(f, path, offset, r, &mut buf)?;
        offset += r.len() as u64;
    }
    Ok(())
}

/// Read run `r` (at `offset` in `memory.sev`) into `buf` and check its checksum and the
/// kind and length of each of its packets.
fn read_sealed_run<'a>(
    f: &File,
    path: &Path,
    offset: u64,
    r: &SealedRun,
    buf: &'a mut Vec<u8>,
) -> Result<&'a [u8], SnapshotError> {
    let corrupt = |why: String| SnapshotError::Corrupt {
        path: path.to_path_buf(),
        why,
    };
    buf.resize(r.len(), 0);
    f.read_exact_at(buf, offset).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            SnapshotError::Truncated {
                path: path.to_path_buf(),
                why: format!("it ends inside the packets of guest pages {:#x}..", r.first),
            }
        } else {
            io(path)(e)
        }
    })?;
    if crc32c::crc32c(buf) != r.crc32c {
        return Err(corrupt(format!(
            "the packets of guest pages {:#x}..{:#x} fail their checksum",
            r.first,
            r.first + r.count
        )));
    }
    for (i, packet) in buf.chunks_exact(r.kind.packet_len()).enumerate() {
        if PacketKind::of(packet).ok() != Some(r.kind) {
            return Err(corrupt(format!(
                "the packet of guest page {:#x} is not a {} page packet",
                r.first + i as u64,
                r.kind.name()
            )));
        }
    }
    Ok(buf.as_slice())
}

/// Restore a sealed SEV-ES snapshot (checked by [`read_manifest`]) on the platform in
/// `platform`.
fn restore_sealed(
    dir: &Path,
    mut m: Manifest,
    backend: BackendKind,
    platform: Option<&Path>,
    serial_out: Box<dyn Write + Send>,
) -> Result<Machine, SnapshotError> {
    let sealed = m.sev.take().ok_or_else(|| SnapshotError::Corrupt {
        path: dir.join(STATE_FILE),
        why: "the sealed section is missing".into(),
    })?;
    let platform = platform.ok_or(SnapshotError::PlatformNeeded)?;
    if backend != BackendKind::Emu {
        return Err(SnapshotError::Unsupported(format!(
            "SEV-ES guests run only on the emu backend; restore without --backend {backend}"
        )));
    }
    let mem_path = dir.join(SEALED_MEMORY_FILE);
    let f = File::open(&mem_path).map_err(io(&mem_path))?;
    check_sealed_memory(&f, &mem_path, &sealed.memory)?;

    if !platform.is_dir() {
        return Err(SnapshotError::NoPlatformDir(platform.to_path_buf()));
    }
    let psp = crate::sev_launch::open_platform(platform)?;
    let other_platform = |detail: String| SnapshotError::OtherPlatform {
        dir: dir.to_path_buf(),
        platform: platform.to_path_buf(),
        detail,
    };
    let own_pdh = psp
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .chain()
        .pdh
        .as_bytes()
        .to_vec();
    if own_pdh != sealed.session.pdh {
        return Err(other_platform(String::new()));
    }
    let config = MachineConfig {
        backend,
        vm_type: VmType::SevEs,
        mem_size: m.mem_size,
        vcpus: m.vcpus,
        max_instructions: None,
    };
    let mut machine = Machine::new(&config, serial_out)?;
    let vm = machine.vm().clone();
    let sev = vm
        .sev()
        .ok_or_else(|| SnapshotError::Unsupported("SEV-ES guests need the emu backend".into()))?;
    // The firmware unwraps the transport keys with this platform's PDH.
    sev.receive_start(psp, &sealed.session)
        .map_err(|e| other_platform(format!(" (RECEIVE_START: {e})")))?;
    match receive_sealed(dir, &mut machine, sev, &f, &sealed, &m.machine) {
        Ok(()) => Ok(machine),
        Err(e) => {
            if let Err(d) = sev.decommission() {
                tracing::warn!("DECOMMISSION of the refused sealed guest: {d}");
            }
            Err(e)
        }
    }
}

/// Within a receive session: every page, every vCPU, RECEIVE_FINISH, the machine state.
fn receive_sealed(
    dir: &Path,
    machine: &mut Machine,
    sev: &dyn SevVm,
    f: &File,
    sealed: &SealedState,
    state: &MachineState,
) -> Result<(), SnapshotError> {
    let mem_path = dir.join(SEALED_MEMORY_FILE);
    let state_path = dir.join(STATE_FILE);
    let refused = |path: &Path, what: String, e: BoxError| SnapshotError::SealedRefused {
        path: path.to_path_buf(),
        what,
        source: e,
    };
    let mut received = PageSet::new(machine.config().mem_size / PAGE);
    let mut buf = Vec::new();
    let mut offset = 0u64;
    for r in &sealed.memory {
        // Checked again as read: the file may have changed since it was checked.
        let data = read_sealed_run(f, &mem_path, offset, r, &mut buf)?;
        for (i, packet) in data.chunks_exact(r.kind.packet_len()).enumerate() {
            let page = r.first + i as u64;
            sev.receive_page(page, packet)
                .map_err(|e| refused(&mem_path, format!("guest page {page:#x}"), e.into()))?;
            received.set(page);
        }
        offset += r.len() as u64;
    }
    for (i, t) in sealed.vcpus.iter().enumerate() {
        machine
            .receive_vcpu_sev(i as u32, t)
            .map_err(|e| refused(&state_path, format!("vCPU {i}"), e.into()))?;
    }
    sev.receive_finish(&sealed.transcript_tag)
        .map_err(|e| refused(dir, "RECEIVE_FINISH".into(), e.into()))?;
    machine.restore_state(state)?;
    // A later snapshot or migration of the restored guest must carry every received page
    // (whether or not the backend logged the writes).
    machine.tracker().mark_written(&received);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_errors_are_clear() {
        let p = Path::new("/x/vm.state");
        let e = parse_state(p, b"hello").unwrap_err();
        assert!(e.to_string().contains("does not start"), "{e}");
        assert!(e.to_string().contains("starts with 0x68656c6c6f,"), "{e}");
        let e = parse_state(p, b"ESVM-SNAP").unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");
        let e = parse_state(p, b"ESVM-SNAPSHOT 9 crc32c=0 len=0\n").unwrap_err();
        assert!(e.to_string().contains("version 9"), "{e}");
        let h = format!("ESVM-SNAPSHOT {SNAPSHOT_VERSION} crc32c=00000000 len=10\n{{}}");
        let e = parse_state(p, h.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");
        let body = b"{}";
        let h = format!(
            "ESVM-SNAPSHOT {SNAPSHOT_VERSION} crc32c={:08x} len=2\n",
            crc32c::crc32c(body) ^ 1
        );
        let e = parse_state(p, &[h.as_bytes(), body].concat()).unwrap_err();
        assert!(e.to_string().contains("checksum"), "{e}");
        let h = format!(
            "ESVM-SNAPSHOT {SNAPSHOT_VERSION} crc32c={:08x} len=2\n",
            crc32c::crc32c(body)
        );
        let e = parse_state(p, &[h.as_bytes(), body].concat()).unwrap_err();
        assert!(e.to_string().contains("cannot be decoded"), "{e}");
    }

    fn plain_manifest() -> Manifest {
        let config = MachineConfig {
            backend: BackendKind::Emu,
            vm_type: VmType::Plain,
            mem_size: 64 * PAGE,
            vcpus: 1,
            max_instructions: None,
        };
        let m = Machine::new(&config, Box::new(std::io::sink())).unwrap();
        Manifest {
            vm_type: VmType::Plain,
            backend: BackendKind::Emu,
            mem_size: config.mem_size,
            vcpus: 1,
            machine: m.save_state(),
            vcpu_states: vec![m.save_vcpu(0).unwrap()],
            memory: vec![Run {
                first: 2,
                count: 3,
                crc32c: 0,
            }],
            sev: None,
        }
    }

    fn state_file(version: u32, m: &Manifest) -> Vec<u8> {
        let json = serde_json::to_vec(m).unwrap();
        let h = format!(
            "ESVM-SNAPSHOT {version} crc32c={:08x} len={}\n",
            crc32c::crc32c(&json),
            json.len()
        );
        [h.as_bytes(), &json].concat()
    }

    /// Plain snapshots have no sealed section in the JSON; the version, the VM type and the
    /// sealed section must agree.
    #[test]
    fn versions_and_sealed_sections_must_agree() {
        let p = Path::new("/x/vm.state");
        let plain = plain_manifest();
        let bytes = state_file(SNAPSHOT_VERSION, &plain);
        assert!(!String::from_utf8_lossy(&bytes).contains("\"sev\""));
        assert_eq!(parse_state(p, &bytes).unwrap(), plain);
        // A plain manifest under the sealed version, and an SEV-ES one without its section.
        let e = parse_state(p, &state_file(SEALED_SNAPSHOT_VERSION, &plain)).unwrap_err();
        assert!(e.to_string().contains("inconsistent"), "{e}");
        let mut sev = plain.clone();
        sev.vm_type = VmType::SevEs;
        for v in [SNAPSHOT_VERSION, SEALED_SNAPSHOT_VERSION] {
            let e = parse_state(p, &state_file(v, &sev)).unwrap_err();
            assert!(e.to_string().contains("inconsistent"), "{e}");
        }
        // A sealed section with the wrong number of vCPUs.
        sev.vcpu_states.clear();
        sev.memory.clear();
        sev.sev = Some(SealedState {
            session: SevSessionStart {
                policy: 4,
                pdh: vec![],
                session: vec![],
            },
            vcpus: vec![],
            transcript_tag: [0; 32],
            memory: vec![],
        });
        let e = parse_state(p, &state_file(SEALED_SNAPSHOT_VERSION, &sev)).unwrap_err();
        assert!(e.to_string().contains("sealed vCPU states"), "{e}");
        // Runs out of order.
        let mut bad = plain.clone();
        bad.memory.push(Run {
            first: 1,
            count: 1,
            crc32c: 0,
        });
        let e = parse_state(p, &state_file(SNAPSHOT_VERSION, &bad)).unwrap_err();
        assert!(e.to_string().contains("out of order"), "{e}");
    }

    /// A plain snapshot directory as esvm wrote it before the device registry (generation
    /// 1): a version-1 header, machine state version 1 with the devices in fixed fields.
    fn write_generation_1_snapshot(dir: &Path) {
        let m = plain_manifest();
        let mut v = serde_json::to_value(&m).unwrap();
        let devices = v["machine"]["devices"].take();
        let state = |id: &str| devices["devices"][id]["state"].clone();
        v["machine"]["version"] = 1.into();
        v["machine"]["devices"] = serde_json::json!({
            "version": 1,
            "now_ns": devices["now_ns"],
            "serial": state("com1"),
            "pit": state("pit"),
            "pic": state("pic"),
            "debug_exit": state("debug-exit"),
        });
        v["memory"] = serde_json::json!([]);
        let json = serde_json::to_vec(&v).unwrap();
        let h = format!(
            "ESVM-SNAPSHOT 1 crc32c={:08x} len={}\n",
            crc32c::crc32c(&json),
            json.len()
        );
        fs::write(dir.join(STATE_FILE), [h.as_bytes(), &json].concat()).unwrap();
        File::create(dir.join(MEMORY_FILE))
            .unwrap()
            .set_len(m.mem_size)
            .unwrap();
    }

    /// Snapshots written before the device state was kept by id are refused, plain and
    /// sealed, with a message that says why and what to do.
    #[test]
    fn older_snapshot_formats_are_refused_with_a_clear_message() {
        assert_eq!((SNAPSHOT_VERSION, SEALED_SNAPSHOT_VERSION), (3, 4));
        let dir = tempfile::tempdir().unwrap();
        write_generation_1_snapshot(dir.path());
        let refused =
            |dir: &Path| match restore(dir, BackendKind::Emu, None, Box::new(std::io::sink())) {
                Ok(_) => panic!("an old snapshot was restored"),
                Err(e) => e,
            };
        let e = refused(dir.path());
        assert!(matches!(e, SnapshotError::OldVersion(1)), "{e}");
        let msg = e.to_string();
        for needle in [
            "snapshot format version 1 was written by an older esvm",
            "it reads version 3, plain guests, and 4, sealed SEV-ES guests",
            "restore it with the esvm version that wrote it",
        ] {
            assert!(msg.contains(needle), "{needle:?} not in {msg}");
        }
        // A sealed snapshot of that generation (version 2): the same.
        let state = fs::read(dir.path().join(STATE_FILE)).unwrap();
        let mut sealed = b"ESVM-SNAPSHOT 2".to_vec();
        sealed.extend_from_slice(&state[b"ESVM-SNAPSHOT 1".len()..]);
        fs::write(dir.path().join(STATE_FILE), sealed).unwrap();
        assert!(matches!(refused(dir.path()), SnapshotError::OldVersion(2)));
        // A newer one is refused as well, differently.
        let e = parse_state(
            Path::new("/x/vm.state"),
            b"ESVM-SNAPSHOT 5 crc32c=0 len=0\n",
        );
        assert!(matches!(e, Err(SnapshotError::Version(5))));
    }

    /// A shared-page packet as `sev_send_page` encodes it: kind 2, the page.
    fn shared_packet(fill: u8) -> Vec<u8> {
        let mut p = vec![fill; SHARED_PACKET_LEN];
        p[0] = 2;
        assert_eq!(PacketKind::of(&p).unwrap(), PacketKind::Shared);
        p
    }

    #[test]
    fn sealed_memory_file_is_checked_against_its_index() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SEALED_MEMORY_FILE);
        let packets: Vec<Vec<u8>> = (0..3).map(shared_packet).collect();
        let runs = vec![
            SealedRun {
                first: 4,
                count: 2,
                kind: PacketKind::Shared,
                crc32c: crc32c::crc32c(&[&packets[0][..], &packets[1]].concat()),
            },
            SealedRun {
                first: 9,
                count: 1,
                kind: PacketKind::Shared,
                crc32c: crc32c::crc32c(&packets[2]),
            },
        ];
        let good = packets.concat();
        let check = |bytes: &[u8], runs: &[SealedRun]| {
            fs::write(&path, bytes).unwrap();
            check_sealed_memory(&File::open(&path).unwrap(), &path, runs)
        };
        check(&good, &runs).unwrap();
        let e = check(&good[..good.len() - 1], &runs).unwrap_err();
        assert!(e.to_string().contains("memory.sev is truncated"), "{e}");
        let e = check(&[&good[..], &[0]].concat(), &runs).unwrap_err();
        assert!(e.to_string().contains("memory.sev is corrupt"), "{e}");
        let mut flipped = good.clone();
        flipped[SHARED_PACKET_LEN + 77] ^= 1;
        let e = check(&flipped, &runs).unwrap_err();
        assert!(e.to_string().contains("fail their checksum"), "{e}");
        // A record of the wrong kind, even with a matching checksum.
        let mut wrong = good.clone();
        wrong[2 * SHARED_PACKET_LEN] = 1;
        let mut runs2 = runs.clone();
        runs2[1].crc32c = crc32c::crc32c(&wrong[2 * SHARED_PACKET_LEN..]);
        let e = check(&wrong, &runs2).unwrap_err();
        assert!(e.to_string().contains("not a shared page packet"), "{e}");
    }
}
