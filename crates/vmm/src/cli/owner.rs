//! `esvm owner ...`: the guest owner's tools: make a launch session for a
//! platform, verify the launch measurement, package a secret.

use std::path::{Path, PathBuf};

use esvm_owner::{
    create_session, describe_chain, hex, package_secret, parse_digest, verify_measurement,
    GuestMeasurer, LaunchGuest, LaunchInputs, SessionDir,
};
use esvm_psp::cert::CaCert;
use esvm_psp::{Build, Measurement, Policy};
use serde::Serialize;

use super::output::Format;

/// Subcommands of `esvm owner`.
#[derive(Debug, clap::Subcommand)]
pub enum OwnerCommand {
    /// Verify a platform's certificate chain and create a launch session for
    /// it: the owner's DH certificate and the session blob (give `godh.cert`,
    /// `session.bin` and `policy.txt` from OUT to the host), plus the
    /// transport keys, which stay with you (0600).
    Session {
        /// The platform's chain (`esvm platform export`).
        #[arg(long, value_name = "CHAIN")]
        chain: PathBuf,
        /// Guest policy: flags (e.g. es,nodbg: nodbg, noks, es, nosend, domain, sev,
        /// api=MAJOR.MINOR) or a number (0x5), as `esvm run --policy` takes it. It must
        /// include es (SEV-ES guests need it); one without is refused.
        #[arg(long, value_name = "POLICY")]
        policy: String,
        /// New session directory.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Only trust chains rooted in this ARK certificate (e.g. the
        /// emulated CA's ark.cert). Without it the chain's own ARK is used,
        /// which proves only internal consistency.
        #[arg(long, value_name = "ARK_CERT")]
        ark: Option<PathBuf>,
    },
    /// Verify the launch measurement (LAUNCH_MEASURE output) against the
    /// expected launch digest, given directly or computed from the guest
    /// image and its initial VMSAs. Records the verified measurement in the
    /// session directory for `esvm owner secret`.
    Verify {
        /// Session directory (`esvm owner session --out`).
        #[arg(long, value_name = "DIR")]
        session: PathBuf,
        /// Measurement file from the host (51 bytes, or 48 with --build).
        #[arg(long, value_name = "FILE")]
        measurement: PathBuf,
        /// Expected launch digest, 64 hex digits: e.g. the one `esvm run --sev-es` printed
        /// (`esvm: SEV-ES launch digest HEX`, also `launch_digest` in `esvm ctl
        /// launch-measurement`), which is the host's word for it; --guest or --kernel compute
        /// it from the launch inputs instead.
        #[arg(
            long,
            value_name = "HEX",
            conflicts_with_all = ["guest", "kernel"],
            required_unless_present_any = ["guest", "kernel"]
        )]
        digest: Option<String>,
        /// The guest the host was asked to launch, as `esvm run` takes it: a built-in guest's
        /// name (see `esvm guests`) or the path of an image (esvm's boot convention).
        /// Compute the expected digest as the esvm loader measures it, with --mem, --vcpus
        /// and the guest arguments after `--`.
        #[arg(long, value_name = "IMAGE", conflicts_with = "kernel")]
        guest: Option<PathBuf>,
        /// Linux kernel (bzImage or vmlinux) the host was asked to boot with `esvm run
        /// --sev-es --kernel`: compute the expected digest from it, --initrd and --cmdline
        /// (kernel, zero page, command line, initrd, boot page tables, VMSAs).
        #[arg(long, value_name = "PATH")]
        kernel: Option<PathBuf>,
        /// The initrd given to the launch.
        #[arg(long, value_name = "PATH", requires = "kernel")]
        initrd: Option<PathBuf>,
        /// The kernel command line given to the launch (the default is `esvm run`'s).
        #[arg(long, requires = "kernel", default_value = crate::cli::run::DEFAULT_CMDLINE)]
        cmdline: String,
        /// Guest RAM of the launch (default: `esvm run`'s, 64M for an image, 256M for Linux);
        /// a bare number means MiB, as for `esvm run --mem`.
        #[arg(long, value_name = "SIZE", value_parser = esvm::size::parse_guest_mem)]
        mem: Option<u64>,
        /// vCPUs of the launch (one VMSA each). With more than one, the launch also
        /// measures the AP start stub and its empty jump table, and each AP's VMSA starts in
        /// the stub (docs/sev-es-guest.md): a wrong count does not verify.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
        vcpus: u32,
        /// Platform API version and build (MAJOR.MINOR.BUILD) for a 48-byte measurement.
        #[arg(long, value_name = "VERSION")]
        build: Option<String>,
        /// The guest arguments of the launch (with --guest), as given to `esvm run` after
        /// `--`: they are in the measured boot-info block.
        #[arg(last = true, value_name = "GUEST-ARGS")]
        guest_args: Vec<String>,
    },
    /// Package a secret for LAUNCH_SECRET, bound to a measurement that
    /// `esvm owner verify` accepted. The packet is the 52-byte header
    /// (flags, IV, MAC) followed by the AES-128-CTR ciphertext.
    Secret {
        /// Session directory.
        #[arg(long, value_name = "DIR")]
        session: PathBuf,
        /// The verified measurement file.
        #[arg(long, value_name = "FILE")]
        measurement: PathBuf,
        /// File holding the secret (up to 64 KiB).
        #[arg(long = "in", value_name = "SECRET")]
        input: PathBuf,
        /// Output packet file.
        #[arg(long, value_name = "PACKET")]
        out: PathBuf,
        /// Platform API version and build (MAJOR.MINOR.BUILD) for a 48-byte measurement.
        #[arg(long, value_name = "VERSION")]
        build: Option<String>,
    },
}

/// What the `esvm owner` and `esvm platform` commands return: any error, its sources kept
/// (main prints the chain).
pub type CliResult<T> = Result<T, Box<dyn std::error::Error>>;

/// An error about the file at `path`, shown as `"{path}: {source}"`.
#[derive(Debug, thiserror::Error)]
#[error("{}: {source}", path.display())]
pub struct InFile<E: std::error::Error + 'static> {
    path: PathBuf,
    #[source]
    source: E,
}

impl<E: std::error::Error + 'static> InFile<E> {
    pub fn new(path: &Path, source: E) -> Self {
        InFile {
            path: path.to_path_buf(),
            source,
        }
    }
}

fn read(p: &Path) -> Result<Vec<u8>, InFile<std::io::Error>> {
    std::fs::read(p).map_err(|e| InFile::new(p, e))
}

fn parse_build(s: &str) -> Result<Build, String> {
    let parts: Vec<&str> = s.trim().split('.').collect();
    let num = |x: &str| {
        x.parse::<u8>()
            .map_err(|_| format!("bad version {s:?}: use MAJOR.MINOR.BUILD, e.g. 0.24.21"))
    };
    match parts.as_slice() {
        [a, b, c] => Ok(Build {
            api_major: num(a)?,
            api_minor: num(b)?,
            build: num(c)?,
        }),
        _ => Err(format!(
            "bad version {s:?}: use MAJOR.MINOR.BUILD, e.g. 0.24.21"
        )),
    }
}

fn load_measurement(path: &Path, build: Option<&str>) -> CliResult<Measurement> {
    let b = build.map(parse_build).transpose()?;
    // The measurement file's format error is a message (no underlying error).
    Measurement::from_file_bytes(&read(path)?, b)
        .map_err(|e| format!("{}: {e}", path.display()).into())
}

/// What `esvm owner session` made.
#[derive(Debug, Serialize)]
struct SessionMade {
    /// The verified chain, described.
    chain: String,
    /// Whether the chain was checked against an ARK given with --ark (otherwise only
    /// against its own ARK).
    ark_given: bool,
    policy: String,
    policy_bits: u32,
    out: PathBuf,
}

/// What `esvm owner verify` accepted.
#[derive(Debug, Serialize)]
struct Verified {
    verified: bool,
    digest: String,
    firmware: String,
    api_major: u8,
    api_minor: u8,
    build: u8,
    policy: String,
    policy_bits: u32,
}

/// What `esvm owner secret` wrote.
#[derive(Debug, Serialize)]
struct Packaged {
    out: PathBuf,
    bytes: usize,
}

/// Runs an `esvm owner` subcommand, reporting in `format`. `measurer` computes what the esvm
/// loader measures for `verify --guest IMAGE`; without it `--guest` is refused.
pub fn run_owner(
    cmd: OwnerCommand,
    measurer: Option<&dyn GuestMeasurer>,
    format: Format,
) -> CliResult<()> {
    match cmd {
        OwnerCommand::Session {
            chain,
            policy,
            out,
            ark,
        } => {
            let policy = esvm_owner::require_es(Policy::parse(&policy)?)?;
            let ark = match ark {
                Some(p) => Some(CaCert::from_bytes(&read(&p)?).map_err(|e| InFile::new(&p, e))?),
                None => None,
            };
            let s = create_session(&read(&chain)?, policy, ark.as_ref())?;
            s.save(&out)?;
            let made = SessionMade {
                chain: describe_chain(&s.chain),
                ark_given: ark.is_some(),
                policy: policy.to_string(),
                policy_bits: policy.0,
                out,
            };
            format.emit(&made, |m| {
                let note = if m.ark_given {
                    ""
                } else {
                    "\n  note: no --ark given; the chain was checked against its own ARK only"
                };
                format!(
                    "chain verified: {}{note}\nsession for policy {} written to {}\n  give the \
                     host: godh.cert session.bin policy.txt; keep tek.key tik.key secret",
                    m.chain,
                    m.policy,
                    m.out.display()
                )
            })?;
            Ok(())
        }
        OwnerCommand::Verify {
            session,
            measurement,
            digest,
            guest,
            kernel,
            initrd,
            cmdline,
            mem,
            vcpus,
            build,
            guest_args,
        } => {
            if !guest_args.is_empty() && guest.is_none() {
                return Err(
                    "guest arguments after `--` are measured for esvm's own guests: give them \
                     with --guest (a kernel's parameters go in --cmdline)"
                        .into(),
                );
            }
            let s = SessionDir::load(&session)?;
            let m = load_measurement(&measurement, build.as_deref())?;
            let launch_guest = match (guest, kernel) {
                (Some(image), _) => Some(LaunchGuest::Image {
                    image,
                    args: guest_args.join(" "),
                }),
                (None, Some(kernel)) => Some(LaunchGuest::Linux {
                    kernel,
                    initrd,
                    cmdline,
                }),
                (None, None) => None,
            };
            let digest = match (digest, launch_guest) {
                (Some(d), _) => parse_digest(&d)?,
                (None, Some(guest)) => {
                    let measurer = measurer.ok_or(
                        "--guest and --kernel need the esvm loaders, which this build does not provide; pass --digest",
                    )?;
                    let mem = mem.unwrap_or(match guest {
                        LaunchGuest::Image { .. } => crate::cli::run::DEFAULT_MEM,
                        LaunchGuest::Linux { .. } => crate::cli::run::DEFAULT_LINUX_MEM,
                    });
                    let inputs = LaunchInputs { guest, mem, vcpus };
                    measurer
                        .measured_launch(&inputs, s.policy)
                        .map_err(|e| e as Box<dyn std::error::Error>)?
                        .digest()
                }
                (None, None) => {
                    return Err("give --digest HEX, --guest IMAGE or --kernel PATH".into())
                }
            };
            verify_measurement(&s, &m, &digest)?;
            let v = Verified {
                verified: true,
                digest: hex(&digest),
                firmware: m.build.to_string(),
                api_major: m.build.api_major,
                api_minor: m.build.api_minor,
                build: m.build.build,
                policy: s.policy.to_string(),
                policy_bits: s.policy.0,
            };
            format.emit(&v, |v| {
                format!(
                    "measurement verified: launch digest {} on firmware {} with policy {}",
                    v.digest, v.firmware, v.policy
                )
            })?;
            Ok(())
        }
        OwnerCommand::Secret {
            session,
            measurement,
            input,
            out,
            build,
        } => {
            let s = SessionDir::load(&session)?;
            let m = load_measurement(&measurement, build.as_deref())?;
            let secret = read(&input)?;
            let pkt = package_secret(&s, &m, &secret)?;
            std::fs::write(&out, &pkt).map_err(|e| InFile::new(&out, e))?;
            let p = Packaged {
                out,
                bytes: pkt.len(),
            };
            format.emit(&p, |p| {
                format!(
                    "secret packet ({} bytes) written to {}",
                    p.bytes,
                    p.out.display()
                )
            })?;
            Ok(())
        }
    }
}
