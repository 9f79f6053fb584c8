//! `esvm run --sev-es`: launch a guest as SEV-ES through the secure processor.
//!
//! LAUNCH_START (with the owner's session, if given), LAUNCH_UPDATE_DATA over the loaded
//! image and the loader's boot structures, LAUNCH_UPDATE_VMSA for each vCPU (its initial state
//! synced in, FPU/SSE included), LAUNCH_MEASURE (printed, optionally written to a file), an
//! optional LAUNCH_UPDATE_SECRET, LAUNCH_FINISH. From then on the host sees only ciphertext.
//!
//! The sequence runs on the hypervisor's type-state [`Launcher`] (`New` → `Started` →
//! `Measured` → finished), so its order is checked by the compiler: [`start`] gives the
//! `Launcher<Started>`, [`measure`] the `Launcher<Measured>` (which a caller may keep, e.g.
//! to wait for the owner's secret), [`finish`] injects the secret, if any, and ends it.
//!
//! `esvm run --wait-for-secret` stops after LAUNCH_MEASURE ([`launch_measured`]) and keeps
//! the `Launcher<Measured>` in a [`PendingLaunch`], which the control API serves: the owner
//! reads the measurement, injects a secret bound to it (LAUNCH_SECRET), and `resume` runs
//! LAUNCH_FINISH, after which the guest starts.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use esvm_arch::layout;
use esvm_hv::sev::{Launched, Launcher, Measured, Started};
use esvm_hv::HvError;
use esvm_loader::BootState;
use esvm_psp::{LaunchStart, Measurement, Policy, Psp};
use thiserror::Error;

use crate::machine::Machine;

/// Where LAUNCH_UPDATE_SECRET places an owner's secret (one page; see docs/sev-es-guest.md
/// and the memory map, `esvm_arch::layout::SECRET_ADDR`).
pub const SECRET_GPA: u64 = layout::SECRET_ADDR;

/// The launch policy used without `--session`: ES, nothing else.
pub const DEFAULT_POLICY: u32 = Policy::ES;

/// Why an SEV-ES launch failed.
#[allow(missing_docs)] // Each variant is documented by its #[error] message.
#[derive(Debug, Error)]
pub enum SevLaunchError {
    // The storage error says what to do (e.g. a directory without an identity: run
    // `esvm platform init`); repeating that advice here printed it twice.
    #[error("cannot open the platform in {dir}: {source}")]
    Platform {
        dir: PathBuf,
        #[source]
        source: esvm_psp::StorageError,
    },
    #[error("cannot open the platform in {dir}: {source}. Create one with `esvm platform init --dir {dir}`")]
    PlatformInit {
        dir: PathBuf,
        #[source]
        source: esvm_psp::PspError,
    },
    #[error("cannot read the owner's session in {dir}: {source}")]
    Session {
        dir: PathBuf,
        #[source]
        source: esvm_owner::OwnerError,
    },
    #[error("the policy {0:#x} lacks the ES bit: SEV-ES guests need policy bit 2 (0x4)")]
    NotEs(u32),
    #[error("cannot read the secret packet {path}: {reason}")]
    Secret { path: PathBuf, reason: String },
    #[error("cannot read the secret packet {path}: {source}")]
    SecretRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the measurement to {path}: {source}")]
    MeasurementOut {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("SEV-ES launch failed: {0}")]
    Launch(#[source] HvError),
    #[error("SEV-ES launch failed: {0}")]
    Machine(#[source] crate::machine::MachineError),
    #[error("cannot launch a machine that is already shared: {0}")]
    Shared(#[source] crate::ram::RamError),
    #[error("cannot compute the launch digest from the guest's initial memory: {0}")]
    Digest(#[source] esvm_hv::MemoryError),
}

/// What `esvm run --sev-es` was asked for.
pub struct SevLaunchArgs<'a> {
    /// The platform directory of the secure processor (`esvm platform init`).
    pub platform: &'a Path,
    /// The guest owner's session directory (`esvm owner session`), if any.
    pub session: Option<&'a Path>,
    /// Where to write the launch measurement, if anywhere.
    pub measurement_out: Option<&'a Path>,
    /// An owner's secret packet to inject (`esvm owner secret`), if any.
    pub secret: Option<&'a Path>,
    /// The policy of a launch without an owner's session (default [`DEFAULT_POLICY`]); a
    /// session brings its own.
    pub policy: Option<u32>,
}

/// The regions LAUNCH_UPDATE_DATA measures for a loaded guest, in order: the loader's low
/// memory (GDT, boot info, arguments, page tables and the boot stack) and the image.
/// Memory outside them starts unmeasured: a guest that uses it privately must initialise it
/// first (as on hardware, where such pages read as the decryption of whatever DRAM held).
pub fn measured_regions(boot: &BootState) -> Vec<(u64, u64)> {
    let start = boot.boot_info.image_start & !0xfff;
    let end = (boot.boot_info.image_end + 0xfff) & !0xfff;
    vec![(0, layout::STACK_TOP), (start, end - start)]
}

/// Open (and INIT) the platform firmware from its NV storage.
pub fn open_platform(dir: &Path) -> Result<Arc<Mutex<Psp>>, SevLaunchError> {
    let mut psp = Psp::open(dir).map_err(|source| SevLaunchError::Platform {
        dir: dir.to_path_buf(),
        source,
    })?;
    if psp.state() == esvm_psp::PlatformState::Uninit {
        psp.init().map_err(|source| SevLaunchError::PlatformInit {
            dir: dir.to_path_buf(),
            source,
        })?;
    }
    Ok(Arc::new(Mutex::new(psp)))
}

/// Run the launch sequence on a machine whose guest is loaded (with the C-bit page tables);
/// `regions` (guest-physical start, length) are what LAUNCH_UPDATE_DATA encrypts and
/// measures, in order: [`measured_regions`] for esvm's own guests,
/// `LinuxBoot::written_pages` for a Linux kernel.
pub fn launch(
    machine: &mut Machine,
    regions: &[(u64, u64)],
    args: &SevLaunchArgs<'_>,
) -> Result<Measurement, SevLaunchError> {
    let psp = open_platform(args.platform)?;
    launch_on(machine, regions, psp, args)
}

/// [`launch`] on an open platform (`args.platform` is not read).
pub fn launch_on(
    machine: &mut Machine,
    regions: &[(u64, u64)],
    psp: Arc<Mutex<Psp>>,
    args: &SevLaunchArgs<'_>,
) -> Result<Measurement, SevLaunchError> {
    let started = start(machine, regions, psp, args)?;
    let measured = measure(started, args)?;
    Ok(finish(measured, args)?.measurement)
}

/// The LAUNCH_START request `args` ask for: the owner's session (and its policy) or a
/// policy of their own.
fn launch_request(args: &SevLaunchArgs<'_>) -> Result<LaunchStart, SevLaunchError> {
    let (policy, owner) = match args.session {
        Some(dir) => {
            let (policy, owner) =
                esvm_owner::launch_request(dir).map_err(|source| SevLaunchError::Session {
                    dir: dir.to_path_buf(),
                    source,
                })?;
            (policy, Some(owner))
        }
        None => (Policy(args.policy.unwrap_or(DEFAULT_POLICY)), None),
    };
    if !policy.es() {
        return Err(SevLaunchError::NotEs(policy.0));
    }
    Ok(LaunchStart {
        policy,
        owner,
        share_key_with: None,
    })
}

/// LAUNCH_START on `psp`, LAUNCH_UPDATE_DATA of `regions` in order, LAUNCH_UPDATE_VMSA of
/// every vCPU: the launch of `machine` (loaded, not shared), ready to be measured.
pub fn start(
    machine: &mut Machine,
    regions: &[(u64, u64)],
    psp: Arc<Mutex<Psp>>,
    args: &SevLaunchArgs<'_>,
) -> Result<Launcher<Started>, SevLaunchError> {
    let req = launch_request(args)?;
    // LAUNCH_UPDATE_DATA encrypts guest memory in place: nobody else may see it meanwhile.
    machine.ensure_exclusive().map_err(SevLaunchError::Shared)?;
    let mut launcher = Launcher::new(machine.vm().clone())
        .and_then(|l| l.start(psp, &req))
        .map_err(SevLaunchError::Launch)?;
    for &(gpa, len) in regions {
        launcher
            .update_data(gpa, len)
            .map_err(SevLaunchError::Launch)?;
    }
    machine
        .launch_update_vmsas(&mut launcher)
        .map_err(SevLaunchError::Machine)?;
    if machine.config().vcpus > 1 {
        register_ap_jump_table(machine)?;
    }
    Ok(launcher)
}

/// Register the AP stub's jump table ([`layout::AP_JUMP_TABLE_ADDR`]) as the VM's AP jump
/// table, so that the guest's AP_JUMP_TABLE GET finds it: the part of firmware's
/// AP_JUMP_TABLE SET. The stub cannot SET it itself: SET is a GHCB-page request, and the
/// stub runs in real mode, where every data access is private and no (shared) GHCB page can
/// be used; the boot vCPU enters the kernel directly and never runs firmware code.
fn register_ap_jump_table(machine: &Machine) -> Result<(), SevLaunchError> {
    let sev = machine.sev().map_err(SevLaunchError::Machine)?;
    let mut host = sev.host_state().map_err(SevLaunchError::Launch)?;
    host.ap_jump_table = layout::AP_JUMP_TABLE_ADDR;
    sev.set_host_state(&host).map_err(SevLaunchError::Launch)
}

/// LAUNCH_MEASURE; the measurement is written to `args.measurement_out`, if given.
pub fn measure(
    started: Launcher<Started>,
    args: &SevLaunchArgs<'_>,
) -> Result<Launcher<Measured>, SevLaunchError> {
    let measured = started.measure().map_err(SevLaunchError::Launch)?;
    if let Some(path) = args.measurement_out {
        std::fs::write(path, measured.measurement().to_file_bytes()).map_err(|source| {
            SevLaunchError::MeasurementOut {
                path: path.to_path_buf(),
                source,
            }
        })?;
    }
    Ok(measured)
}

/// The launch digest of `machine` as LAUNCH_UPDATE_DATA of `regions` and LAUNCH_UPDATE_VMSA
/// of its vCPUs will measure it, computed from the plaintext the host hands to the firmware
/// (call it before the launch encrypts it) by the owner's own computation
/// ([`esvm_owner::MeasuredLaunch::digest`]): the digest `esvm owner verify --digest` takes.
pub fn launch_digest(
    machine: &Machine,
    regions: &[(u64, u64)],
) -> Result<[u8; 32], SevLaunchError> {
    let mut launch = esvm_owner::MeasuredLaunch::default();
    for &(gpa, len) in regions {
        let mut data = vec![0u8; len as usize];
        machine
            .vm()
            .memory()
            .read(gpa, &mut data)
            .map_err(SevLaunchError::Digest)?;
        launch.regions.push((gpa, data));
    }
    launch.vmsas = machine.initial_vmsas().map_err(SevLaunchError::Machine)?;
    Ok(launch.digest())
}

/// What the guest owner needs beside a launch's measurement: the policy, the launch digest
/// (as the host computed it) and the platform's identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchInfo {
    /// LAUNCH_MEASURE's result.
    pub measurement: Measurement,
    /// The launch's guest policy.
    pub policy: Policy,
    /// The launch digest ([`launch_digest`]).
    pub digest: [u8; 32],
    /// The platform's PDH certificate fingerprint (as `esvm owner session` prints it).
    pub pdh_fingerprint: String,
    /// The platform's chip id (GET_ID).
    pub chip_id: [u8; 64],
}

/// LAUNCH_START, LAUNCH_UPDATE_DATA of `regions`, LAUNCH_UPDATE_VMSA, LAUNCH_MEASURE on the
/// platform in `args.platform`: the measured launch, not finished (see [`finish`] and
/// [`PendingLaunch`]), with what the owner needs to check it.
pub fn launch_measured(
    machine: &mut Machine,
    regions: &[(u64, u64)],
    args: &SevLaunchArgs<'_>,
) -> Result<(Launcher<Measured>, LaunchInfo), SevLaunchError> {
    let psp = open_platform(args.platform)?;
    let (pdh_fingerprint, chip_id) = {
        let p = psp.lock().unwrap_or_else(PoisonError::into_inner);
        (
            esvm_psp::cert::fingerprint(p.chain().pdh.as_bytes()),
            p.get_id(),
        )
    };
    let policy = launch_request(args)?.policy;
    let digest = launch_digest(machine, regions)?;
    let measured = measure(start(machine, regions, psp, args)?, args)?;
    let info = LaunchInfo {
        measurement: *measured.measurement(),
        policy,
        digest,
        pdh_fingerprint,
        chip_id,
    };
    Ok((measured, info))
}

/// Why a request to a launch that waits for its owner was refused.
#[allow(missing_docs)] // Each variant is documented by its #[error] message.
#[derive(Debug, Error)]
pub enum PendingLaunchError {
    #[error(
        "the launch is over: LAUNCH_FINISH ran when the VM was resumed, and the guest owns its \
         memory now; a secret can be injected only while the launch waits (before `esvm ctl \
         resume`)"
    )]
    Finished,
    #[error(
        "a secret was injected into this launch already (LAUNCH_SECRET is accepted once); \
         resume the VM with `esvm ctl resume`"
    )]
    AlreadyInjected,
    #[error(
        "not a secret packet from `esvm owner secret` (a 52-byte header, then the ciphertext): {0}"
    )]
    BadPacket(String),
    #[error(
        "the secret is {len} bytes; the launch secret page at {SECRET_GPA:#x} holds {max} bytes"
    )]
    TooLarge { len: usize, max: u64 },
    #[error(
        "the firmware refused the secret packet: {source}. The packet must be built from this \
         launch's measurement (its mnonce is new on every launch): `esvm ctl launch-measurement \
         --out m.bin`, then `esvm owner verify --measurement m.bin ...` and `esvm owner secret \
         --measurement m.bin ...`. The launch still waits for a packet"
    )]
    Refused {
        #[source]
        source: HvError,
    },
    #[error("LAUNCH_FINISH failed: {0}; the launch is abandoned")]
    Finish(#[source] HvError),
    #[error("the launch was abandoned: {0}")]
    Abandoned(String),
}

enum PendingState {
    Waiting {
        launcher: Launcher<Measured>,
        secret_injected: bool,
    },
    /// LAUNCH_FINISH ran (or failed: the reason).
    Finished(Result<Launched, String>),
}

/// A measured SEV-ES launch that waits for its owner (`esvm run --wait-for-secret`): the
/// `Launcher<Measured>` until [`PendingLaunch::finish`], shared between the control API
/// (which injects the secret and finishes it) and the thread that starts the guest
/// ([`PendingLaunch::wait`]).
pub struct PendingLaunch {
    info: LaunchInfo,
    state: Mutex<PendingState>,
    done: Condvar,
}

impl PendingLaunch {
    /// A launch that waits, from [`launch_measured`].
    pub fn new(launcher: Launcher<Measured>, info: LaunchInfo) -> Self {
        PendingLaunch {
            info,
            state: Mutex::new(PendingState::Waiting {
                launcher,
                secret_injected: false,
            }),
            done: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, PendingState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The measurement and what goes with it.
    pub fn info(&self) -> &LaunchInfo {
        &self.info
    }

    /// Whether the launch still waits (not finished).
    pub fn is_waiting(&self) -> bool {
        matches!(*self.lock(), PendingState::Waiting { .. })
    }

    /// Whether a secret was injected (false once finished).
    pub fn secret_injected(&self) -> bool {
        matches!(
            *self.lock(),
            PendingState::Waiting {
                secret_injected: true,
                ..
            }
        )
    }

    /// LAUNCH_SECRET of the owner's `packet` (`esvm owner secret`'s file) at [`SECRET_GPA`].
    /// Once per launch; a packet the firmware refuses leaves the launch waiting.
    pub fn inject_secret(&self, packet: &[u8]) -> Result<(), PendingLaunchError> {
        let mut st = self.lock();
        let PendingState::Waiting {
            launcher,
            secret_injected,
        } = &mut *st
        else {
            return Err(PendingLaunchError::Finished);
        };
        if *secret_injected {
            return Err(PendingLaunchError::AlreadyInjected);
        }
        let (header, ct) = esvm_owner::parse_secret_packet(packet).ok_or_else(|| {
            PendingLaunchError::BadPacket(format!(
                "{} bytes, no valid header and ciphertext",
                packet.len()
            ))
        })?;
        if ct.len() as u64 > layout::SECRET_SIZE {
            return Err(PendingLaunchError::TooLarge {
                len: ct.len(),
                max: layout::SECRET_SIZE,
            });
        }
        launcher
            .inject_secret(SECRET_GPA, &header, &ct)
            .map_err(|source| PendingLaunchError::Refused { source })?;
        *secret_injected = true;
        Ok(())
    }

    /// LAUNCH_FINISH: the guest may run; [`PendingLaunch::wait`] returns.
    pub fn finish(&self) -> Result<Launched, PendingLaunchError> {
        let mut st = self.lock();
        let result = match std::mem::replace(
            &mut *st,
            PendingState::Finished(Err("LAUNCH_FINISH is running".into())),
        ) {
            PendingState::Waiting { launcher, .. } => launcher.finish(),
            finished @ PendingState::Finished(_) => {
                *st = finished;
                return Err(PendingLaunchError::Finished);
            }
        };
        *st = PendingState::Finished(result.as_ref().map(|l| *l).map_err(|e| e.to_string()));
        self.done.notify_all();
        result.map_err(PendingLaunchError::Finish)
    }

    /// Abandon a launch that still waits (the VMM is stopping): [`PendingLaunch::wait`]
    /// returns `reason` as its error.
    pub fn abandon(&self, reason: &str) {
        let mut st = self.lock();
        if let PendingState::Waiting { .. } = *st {
            *st = PendingState::Finished(Err(reason.to_string()));
            self.done.notify_all();
        }
    }

    /// Block until the launch is finished (or abandoned).
    pub fn wait(&self) -> Result<Launched, PendingLaunchError> {
        let mut st = self.lock();
        loop {
            match &*st {
                PendingState::Waiting { .. } => {
                    st = self.done.wait(st).unwrap_or_else(PoisonError::into_inner)
                }
                PendingState::Finished(r) => {
                    return r.clone().map_err(PendingLaunchError::Abandoned)
                }
            }
        }
    }
}

/// LAUNCH_SECRET of the owner's packet in `args.secret` (at [`SECRET_GPA`]), if given, and
/// LAUNCH_FINISH: the guest may run.
pub fn finish(
    mut measured: Launcher<Measured>,
    args: &SevLaunchArgs<'_>,
) -> Result<Launched, SevLaunchError> {
    if let Some(path) = args.secret {
        let bytes = std::fs::read(path).map_err(|source| SevLaunchError::SecretRead {
            path: path.to_path_buf(),
            source,
        })?;
        let (header, ct) =
            esvm_owner::parse_secret_packet(&bytes).ok_or_else(|| SevLaunchError::Secret {
                path: path.to_path_buf(),
                reason: "not a secret packet (header + ciphertext) from `esvm owner secret`".into(),
            })?;
        measured
            .inject_secret(SECRET_GPA, &header, &ct)
            .map_err(SevLaunchError::Launch)?;
    }
    measured.finish().map_err(SevLaunchError::Launch)
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Predicts an esvm SEV-ES launch for the guest owner (`esvm owner verify --guest IMAGE`):
/// loads the image (a built-in guest's name or a file, as `esvm run` resolves it) exactly as
/// `esvm run --sev-es IMAGE --mem M --vcpus N -- ARGS` does (memory size, vCPUs and
/// arguments are all part of the measured boot data) and returns the measured regions and
/// the initial VMSAs, without any secure processor.
pub struct LaunchPredictor;

/// Why [`LaunchPredictor`] could not predict a launch.
#[allow(missing_docs)] // Each variant is documented by its #[error] message.
#[derive(Debug, Error)]
pub enum PredictError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Machine(#[from] crate::machine::MachineError),
    #[error("{0}")]
    Memory(#[from] esvm_hv::MemoryError),
}

impl esvm_owner::GuestMeasurer for LaunchPredictor {
    fn measured_launch(
        &self,
        inputs: &esvm_owner::LaunchInputs,
        _policy: Policy,
    ) -> Result<esvm_owner::MeasuredLaunch, Box<dyn std::error::Error + Send + Sync>> {
        Ok(self.predict(inputs)?)
    }
}

fn read_input(path: &Path) -> Result<Vec<u8>, PredictError> {
    std::fs::read(path).map_err(|source| PredictError::Read {
        path: path.to_path_buf(),
        source,
    })
}

impl LaunchPredictor {
    /// [`esvm_owner::GuestMeasurer::measured_launch`], with its error type: loads the
    /// guest into a machine of the same shape as `esvm run --sev-es` does and reads back
    /// what the launch would measure (the same loader, so the same bytes).
    pub fn predict(
        &self,
        inputs: &esvm_owner::LaunchInputs,
    ) -> Result<esvm_owner::MeasuredLaunch, PredictError> {
        let config = crate::machine::MachineConfig {
            backend: esvm_hv::BackendKind::Emu,
            vm_type: esvm_hv::VmType::SevEs,
            mem_size: inputs.mem,
            vcpus: inputs.vcpus,
            max_instructions: None,
        };
        let mut m = Machine::new(&config, Box::new(std::io::sink()))?;
        let pages = match &inputs.guest {
            esvm_owner::LaunchGuest::Image { image, args } => {
                // As `esvm run GUEST` resolves it: a built-in name first, then a file.
                let builtin = image.to_str().and_then(esvm_guests::builtin);
                let elf = match builtin {
                    Some(g) => std::borrow::Cow::Borrowed(g.elf),
                    None => std::borrow::Cow::Owned(read_input(image)?),
                };
                let boot = m.load(&elf, args)?;
                measured_regions(&boot)
            }
            esvm_owner::LaunchGuest::Linux {
                kernel,
                initrd,
                cmdline,
            } => {
                let kernel_bytes = read_input(kernel)?;
                let initrd_bytes = initrd.as_deref().map(read_input).transpose()?;
                let name = kernel.display().to_string();
                let boot = m.load_linux(&esvm_loader::linux::LinuxImage {
                    name: &name,
                    kernel: &kernel_bytes,
                    initrd: initrd_bytes.as_deref(),
                    cmdline,
                })?;
                boot.written_pages()
            }
        };
        let mut regions = Vec::new();
        for (gpa, len) in pages {
            let mut data = vec![0u8; len as usize];
            m.vm().memory().read(gpa, &mut data)?;
            regions.push((gpa, data));
        }
        let vmsas = m.initial_vmsas()?;
        Ok(esvm_owner::MeasuredLaunch { regions, vmsas })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::MachineConfig;

    /// `sevdemo` loaded with `args` on a machine of `vcpus` vCPUs, and its measured regions.
    fn loaded(vcpus: u32, args: &str) -> (Machine, Vec<(u64, u64)>) {
        let mut m = Machine::new(
            &MachineConfig {
                backend: esvm_hv::BackendKind::Emu,
                vm_type: esvm_hv::VmType::SevEs,
                mem_size: 16 << 20,
                vcpus,
                max_instructions: None,
            },
            Box::new(std::io::sink()),
        )
        .unwrap();
        let boot = m
            .load(esvm_guests::builtin("sevdemo").unwrap().elf, args)
            .unwrap();
        let regions = measured_regions(&boot);
        (m, regions)
    }

    /// A launch of `sevdemo` measured on an ephemeral platform, left waiting.
    fn pending() -> (Machine, PendingLaunch) {
        let ca = esvm_psp::EmulatedAmdCa::generate(2048).unwrap();
        let mut psp = Psp::ephemeral(&ca, Default::default()).unwrap();
        psp.init().unwrap();
        let psp = Arc::new(Mutex::new(psp));
        let (mut m, regions) = loaded(1, "");
        let args = SevLaunchArgs {
            platform: Path::new("-"),
            session: None,
            measurement_out: None,
            secret: None,
            policy: None,
        };
        let digest = launch_digest(&m, &regions).unwrap();
        let measured = measure(start(&mut m, &regions, psp, &args).unwrap(), &args).unwrap();
        let info = LaunchInfo {
            measurement: *measured.measurement(),
            policy: Policy(DEFAULT_POLICY),
            digest,
            pdh_fingerprint: String::new(),
            chip_id: [0; 64],
        };
        (m, PendingLaunch::new(measured, info))
    }

    /// The digest the host computes from what it measures is the owner's prediction from the
    /// same inputs (vCPUs and arguments included), and differs when an input does.
    #[test]
    fn the_hosts_launch_digest_is_the_owners_prediction() {
        let (m, regions) = loaded(2, "iterations=7");
        let host = launch_digest(&m, &regions).unwrap();
        let predict = |vcpus, args: &str| {
            LaunchPredictor
                .predict(&esvm_owner::LaunchInputs {
                    guest: esvm_owner::LaunchGuest::Image {
                        image: "sevdemo".into(),
                        args: args.into(),
                    },
                    mem: 16 << 20,
                    vcpus,
                })
                .unwrap()
                .digest()
        };
        assert_eq!(host, predict(2, "iterations=7"));
        assert_ne!(host, predict(1, "iterations=7"));
        assert_ne!(host, predict(2, "iterations=8"));
    }

    /// With several vCPUs the owner's prediction measures the AP start stub (its code at
    /// `AP_STUB_ADDR`, the jump table zero) and one VMSA per vCPU, the APs' in the stub in
    /// real mode without the BSP flag; with one vCPU the stub's page stays zero.
    #[test]
    fn the_prediction_of_several_vcpus_measures_the_ap_stub_and_the_aps_vmsas() {
        let predict = |vcpus| {
            LaunchPredictor
                .predict(&esvm_owner::LaunchInputs {
                    guest: esvm_owner::LaunchGuest::Image {
                        image: "sevdemo".into(),
                        args: String::new(),
                    },
                    mem: 16 << 20,
                    vcpus,
                })
                .unwrap()
        };
        let measured_at = |l: &esvm_owner::MeasuredLaunch, gpa: u64, len: usize| {
            let (start, data) = l
                .regions
                .iter()
                .find(|(s, d)| *s <= gpa && gpa + len as u64 <= s + d.len() as u64)
                .expect("measured");
            data[(gpa - start) as usize..][..len].to_vec()
        };
        let code = esvm_loader::ap_stub::code();
        let one = predict(1);
        assert_eq!(one.vmsas.len(), 1);
        assert_eq!(
            measured_at(&one, layout::AP_STUB_ADDR, code.len()),
            vec![0; code.len()]
        );
        for n in [2, 4] {
            let l = predict(n);
            assert_eq!(l.vmsas.len(), n as usize);
            assert_eq!(measured_at(&l, layout::AP_STUB_ADDR, code.len()), code);
            assert_eq!(
                measured_at(&l, layout::AP_JUMP_TABLE_ADDR, 4096),
                vec![0; 4096]
            );
            for ap in &l.vmsas[1..] {
                let v = esvm_arch::Vmsa::from_bytes(&ap[..]).unwrap();
                assert_eq!(v.sregs().cs.base + v.regs().rip, layout::AP_STUB_ADDR);
                assert_eq!(v.cr0() & 1, 0, "real mode");
                assert_eq!(v.sregs().apic_base & (1 << 8), 0, "not the BSP");
            }
            assert_eq!(l.vmsas[1], l.vmsas[n as usize - 1], "the APs start alike");
            assert_ne!(l.vmsas[0], l.vmsas[1]);
        }
    }

    /// `wait` returns once `finish` ran on another thread; afterwards the launch takes no
    /// secret and cannot be finished again.
    #[test]
    fn a_pending_launch_is_finished_from_another_thread() {
        let (_m, launch) = pending();
        let launch = Arc::new(launch);
        assert!(launch.is_waiting());
        let waiter = {
            let l = launch.clone();
            std::thread::spawn(move || l.wait())
        };
        let finished = launch.finish().unwrap();
        let waited = waiter.join().unwrap().unwrap();
        assert_eq!(waited, finished);
        assert_eq!(finished.measurement, launch.info().measurement);
        assert!(!launch.is_waiting());
        assert!(matches!(
            launch.inject_secret(&[0u8; 80]),
            Err(PendingLaunchError::Finished)
        ));
        assert!(matches!(launch.finish(), Err(PendingLaunchError::Finished)));
    }

    /// A packet that is not one, or whose MAC does not verify, leaves the launch waiting;
    /// abandoning it wakes the waiter with the reason.
    #[test]
    fn refused_packets_keep_the_launch_waiting_until_abandoned() {
        let (_m, launch) = pending();
        assert!(matches!(
            launch.inject_secret(&[1, 2, 3]),
            Err(PendingLaunchError::BadPacket(_))
        ));
        let mut forged = vec![0u8; esvm_psp::session::PACKET_HEADER_LEN];
        forged.extend_from_slice(b"not bound to this measurement");
        let e = launch.inject_secret(&forged).unwrap_err();
        assert!(matches!(e, PendingLaunchError::Refused { .. }), "{e}");
        assert!(e.to_string().contains("this launch's measurement"), "{e}");
        assert!(launch.is_waiting() && !launch.secret_injected());
        launch.abandon("the VMM is stopping");
        let e = launch.wait().unwrap_err();
        assert!(e.to_string().contains("the VMM is stopping"), "{e}");
        assert!(matches!(launch.finish(), Err(PendingLaunchError::Finished)));
    }
}
