//! `esvm owner ...`: the guest owner's tools: make a launch session for a
//! platform, verify the launch measurement, package a secret.

use std::path::{Path, PathBuf};

use esvm_owner::{
    create_session, describe_chain, hex, package_secret, parse_digest, verify_measurement,
    GuestMeasurer, LaunchGuest, LaunchInputs, SessionDir,
};
use esvm_psp::cert::CaCert;
use esvm_psp::{Build, Measurement, Policy};

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
        /// Expected launch digest, 64 hex digits.
        #[arg(
            long,
            value_name = "HEX",
            conflicts_with_all = ["guest", "kernel"],
            required_unless_present_any = ["guest", "kernel"]
        )]
        digest: Option<String>,
        /// Guest image (esvm's boot convention): compute the expected digest as the esvm
        /// loader measures it.
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
        /// vCPUs of the launch (one VMSA each).
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        /// Platform API version and build (MAJOR.MINOR.BUILD) for a 48-byte measurement.
        #[arg(long, value_name = "VERSION")]
        build: Option<String>,
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

/// Runs an `esvm owner` subcommand. `measurer` computes what the esvm loader
/// measures for `verify --guest IMAGE`; without it `--guest` is refused.
pub fn run_owner(cmd: OwnerCommand, measurer: Option<&dyn GuestMeasurer>) -> CliResult<()> {
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
            println!("chain verified: {}", describe_chain(&s.chain));
            if ark.is_none() {
                println!("  note: no --ark given; the chain was checked against its own ARK only");
            }
            println!("session for policy {policy} written to {}", out.display());
            println!(
                "  give the host: godh.cert session.bin policy.txt; keep tek.key tik.key secret"
            );
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
        } => {
            let s = SessionDir::load(&session)?;
            let m = load_measurement(&measurement, build.as_deref())?;
            let launch_guest = match (guest, kernel) {
                (Some(image), _) => Some(LaunchGuest::Image(image)),
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
                        LaunchGuest::Image(_) => crate::cli::run::DEFAULT_MEM,
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
            println!(
                "measurement verified: launch digest {} on firmware {} with policy {}",
                hex(&digest),
                m.build,
                s.policy
            );
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
            println!(
                "secret packet ({} bytes) written to {}",
                pkt.len(),
                out.display()
            );
            Ok(())
        }
    }
}
