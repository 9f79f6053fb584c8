//! `esvm run`.

use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;
use esvm_hv::BackendKind;
use thiserror::Error;

use esvm::machine::{Machine, MachineConfig};
use esvm::sev_launch::PendingLaunch;
use esvm::size::{format_size, parse_guest_mem};
use esvm_psp::Policy;

/// The command line a Linux kernel gets without --cmdline: the console on COM1, a reboot
/// through the i8042 (which ends the VM), a panic that reboots at once instead of spinning
/// forever, and no boot-time crypto self-tests (about 880 M instructions of them).
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 cryptomgr.notests";

/// Guest RAM when --mem is not given: for esvm's own guests, and for a Linux kernel (which
/// needs its decompression area, the initrd and room to boot).
pub const DEFAULT_MEM: u64 = 64 << 20;
pub const DEFAULT_LINUX_MEM: u64 = 256 << 20;
/// The least RAM an SEV-ES Linux guest is started with: its kernel bounces all device I/O
/// through a shared (unencrypted) software-IOTLB buffer of 6% of RAM but at least 64 MiB
/// (Linux 6.1 `sev_setup_arch`), which a smaller guest cannot spare and still boot.
pub const MIN_SEV_LINUX_MEM: u64 = 256 << 20;

#[derive(Args, Debug)]
pub struct RunArgs {
    /// A built-in guest name (see `esvm guests`) or the path of an ELF64 guest image that
    /// follows esvm's boot protocol. Default: `demo`, or `sevdemo` with --sev-es. Use
    /// --kernel instead to boot Linux.
    pub guest: Option<String>,
    /// Boot a Linux kernel (a bzImage or a vmlinux ELF) by the Linux 64-bit boot protocol
    /// (docs/linux-boot.md), e.g. Debian's linux-image-cloud-amd64 (`scripts/linux.sh`
    /// fetches one and boots it). Its console is COM1 on esvm's stdout, and esvm's stdin
    /// feeds it (see --console).
    #[arg(long, value_name = "PATH", conflicts_with = "guest")]
    pub kernel: Option<PathBuf>,
    /// An initrd / initramfs for --kernel.
    #[arg(long, value_name = "PATH", requires = "kernel")]
    pub initrd: Option<PathBuf>,
    /// The kernel command line for --kernel.
    #[arg(long, value_name = "STRING", requires = "kernel",
          default_value = DEFAULT_CMDLINE, hide_default_value = false)]
    pub cmdline: String,
    /// Where the guest's serial input (COM1) comes from: `stdin` (on a terminal it is put in
    /// raw mode while the guest runs; Ctrl-A x quits, Ctrl-A h helps) or `none`. Default:
    /// stdin with --kernel, none for esvm's own guests.
    #[arg(long, value_name = "stdin|none", value_parser = parse_console)]
    pub console: Option<ConsoleSource>,
    /// Guest RAM size, e.g. 64M, 512M, 2G; a bare number means MiB (`--mem 64` is 64 MiB).
    /// A multiple of 4 KiB, from 4 MiB to 3 GiB. Default 64M, or 256M with --kernel.
    #[arg(long, value_name = "SIZE", value_parser = parse_guest_mem)]
    pub mem: Option<u64>,
    /// Number of vCPUs. The boot vCPU starts the guest; the others (APs) wait for the guest
    /// to start them by INIT-SIPI-SIPI (plain guests on emu), then each runs on a host
    /// thread of its own, in parallel (see --deterministic for the other way). SEV-ES
    /// guests: the APs start in a measured AP stub and park in the GHCB AP reset hold until
    /// the guest's SIPI releases them into its AP jump table. KVM: the APs stay parked.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub vcpus: u32,
    /// With several vCPUs (emu backend): run them in turns on one host thread, a fixed
    /// quantum of instructions each, instead of in parallel on a thread each. A run then
    /// replays exactly — same output, same instruction counts, same guest TSC values —
    /// at the cost of using one host core: about N times slower than parallel on N free
    /// cores. Parallel runs compute the same results for correct guests, but the order in
    /// which vCPUs meet (and so instruction counts and timings) varies from run to run.
    /// The choice travels with the VM into snapshots and migrations (`esvm restore` and
    /// `esvm receive` can change it). One vCPU, SEV-ES guests whose APs stay parked, and
    /// KVM run the same either way.
    #[arg(long)]
    pub deterministic: bool,
    /// Backend: 'emu' (the software vCPU, deterministic, the default) or 'kvm'.
    #[arg(long, default_value = "emu", value_parser = parse_backend)]
    pub backend: BackendKind,
    /// Stop the guest after this many retired instructions, all vCPUs together (emu only);
    /// exit status 123.
    #[arg(long)]
    pub max_instructions: Option<u64>,
    /// Serve the control API (`esvm ctl`: status, pause, resume, snapshot, migrate, cancel)
    /// on this Unix socket while the guest runs.
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// Start with the guest paused until `esvm ctl resume` (needs --api-socket).
    #[arg(long, requires = "api_socket")]
    pub start_paused: bool,
    /// Run the guest as an SEV-ES guest (encrypted memory and register state) on the
    /// software secure processor in --platform: LAUNCH_START, LAUNCH_UPDATE_DATA over the
    /// image, LAUNCH_UPDATE_VMSA per vCPU, LAUNCH_MEASURE (the measurement and the launch
    /// digest are printed), optional secret (--secret, or --wait-for-secret for the owner),
    /// LAUNCH_FINISH. Emu backend only.
    #[arg(long, requires = "platform")]
    pub sev_es: bool,
    /// Platform directory (`esvm platform init --dir DIR`) of the secure processor.
    #[arg(long, value_name = "DIR")]
    pub platform: Option<PathBuf>,
    /// The guest owner's session directory (`esvm owner session --out DIR`): policy, DH
    /// certificate and session blob. Without it the launch has no owner (policy ES only).
    #[arg(long, value_name = "DIR", requires = "sev_es")]
    pub session: Option<PathBuf>,
    /// Guest policy of a launch without --session, as `esvm owner session --policy` takes
    /// it: flag names (e.g. es,nodbg: nodbg, noks, es, nosend, domain, sev, api=MAJOR.MINOR)
    /// or a number (0x5); bits: 0 NODBG, 1 NOKS, 2 ES (required), 3 NOSEND, 4 DOMAIN, 5
    /// SEV, 16..31 minimum firmware API. Default es (0x4).
    #[arg(long, value_name = "POLICY", requires = "sev_es", conflicts_with = "session",
          value_parser = parse_policy)]
    pub policy: Option<u32>,
    /// Write the launch measurement (for `esvm owner verify`) to FILE.
    #[arg(long, value_name = "FILE", requires = "sev_es")]
    pub measurement_out: Option<PathBuf>,
    /// Inject an owner's secret packet (`esvm owner secret`) before LAUNCH_FINISH; it lands
    /// at guest-physical 0x4000. Needs --session (the packet is wrapped with its keys) and a
    /// packet bound to this launch's measurement, which is new on every launch: use
    /// --wait-for-secret to let the owner build it from this launch.
    #[arg(long, value_name = "PACKET", requires = "sev_es")]
    pub secret: Option<PathBuf>,
    /// Stop the SEV-ES launch after LAUNCH_MEASURE and wait for the guest owner on the API
    /// socket: `esvm ctl launch-measurement` reports the measurement, `esvm ctl
    /// inject-secret PACKET` runs LAUNCH_SECRET, `esvm ctl resume` runs LAUNCH_FINISH and
    /// starts the guest (like QEMU's query-sev-launch-measure / sev-inject-launch-secret /
    /// cont). Status `starting` meanwhile.
    #[arg(long, requires_all = ["sev_es", "api_socket"],
          conflicts_with_all = ["secret", "start_paused"])]
    pub wait_for_secret: bool,
    /// Arguments for the guest, passed in its boot-info block (e.g. iterations=1000).
    #[arg(last = true)]
    pub guest_args: Vec<String>,
}

fn parse_backend(s: &str) -> Result<BackendKind, String> {
    s.parse().map_err(|e: esvm_hv::HvError| e.to_string())
}

#[derive(Debug, Error)]
pub enum RunError {
    #[error("unknown guest {0:?}: it is neither a built-in guest (run `esvm guests` to list them) nor an existing file")]
    UnknownGuest(String),
    #[error("cannot read guest image {path}: {source}")]
    ReadGuest {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Machine(#[from] esvm::machine::MachineError),
    #[error(
        "--secret needs --session DIR: a secret packet is wrapped with the guest owner's \
         session keys (`esvm owner session`), and only a launch started with that session can \
         unwrap it; give the session the packet was made for"
    )]
    SecretWithoutSession,
}

impl RunError {
    /// Whether the command line itself is wrong (exit status 120, as clap's own refusals).
    pub fn is_usage(&self) -> bool {
        matches!(self, RunError::SecretWithoutSession)
    }
}

/// Find the guest image: a built-in name, or a path.
pub fn resolve_guest(guest: &str) -> Result<(String, std::borrow::Cow<'static, [u8]>), RunError> {
    if let Some(g) = esvm_guests::builtin(guest) {
        return Ok((g.name.to_string(), std::borrow::Cow::Borrowed(g.elf)));
    }
    let path = PathBuf::from(guest);
    let looks_like_path = guest.contains('/') || guest.contains('.') || path.exists();
    if !looks_like_path {
        return Err(RunError::UnknownGuest(guest.to_string()));
    }
    let bytes = std::fs::read(&path).map_err(|source| RunError::ReadGuest {
        path: path.clone(),
        source,
    })?;
    Ok((path.display().to_string(), std::borrow::Cow::Owned(bytes)))
}

pub fn run(args: RunArgs) -> Result<u8, Box<dyn std::error::Error>> {
    // Before anything runs: without the owner's session the packet can never verify.
    if args.secret.is_some() && args.session.is_none() {
        return Err(RunError::SecretWithoutSession.into());
    }
    if args.kernel.is_some() {
        return run_linux(args);
    }
    let default_guest = if args.sev_es { "sevdemo" } else { "demo" };
    let (name, elf) = resolve_guest(args.guest.as_deref().unwrap_or(default_guest))?;
    if args.sev_es && args.backend != BackendKind::Emu {
        return Err("SEV-ES guests run only on the emu backend (drop --backend kvm)".into());
    }
    let config = MachineConfig {
        backend: args.backend,
        vm_type: if args.sev_es {
            esvm_hv::VmType::SevEs
        } else {
            esvm_hv::VmType::Plain
        },
        mem_size: args.mem.unwrap_or(DEFAULT_MEM),
        vcpus: args.vcpus,
        max_instructions: args.max_instructions,
    };
    let mut machine = Machine::new(&config, Box::new(std::io::stdout())).map_err(RunError::from)?;
    machine.set_deterministic(args.deterministic);
    let _raw = attach_console(&mut machine, args.console.unwrap_or(ConsoleSource::None));
    let guest_args = args.guest_args.join(" ");
    let boot = machine.load(&elf, &guest_args).map_err(RunError::from)?;
    let launch = if args.sev_es {
        sev_launch(
            &mut machine,
            &esvm::sev_launch::measured_regions(&boot),
            &args,
        )?
    } else {
        None
    };
    tracing::info!(guest = %name, backend = %args.backend, mem = config.mem_size, "starting");
    session(&name, &mut machine, &args, launch)
}

/// The SEV-ES launch of `esvm run` over `regions`: measured (the measurement and the launch
/// digest printed), then finished, or with --wait-for-secret left waiting for the owner.
fn sev_launch(
    machine: &mut Machine,
    regions: &[(u64, u64)],
    args: &RunArgs,
) -> Result<Option<Arc<PendingLaunch>>, Box<dyn std::error::Error>> {
    let launch_args = esvm::sev_launch::SevLaunchArgs {
        platform: args.platform.as_deref().expect("clap requires --platform"),
        session: args.session.as_deref(),
        measurement_out: args.measurement_out.as_deref(),
        secret: args.secret.as_deref(),
        policy: args.policy,
    };
    let (measured, info) = esvm::sev_launch::launch_measured(machine, regions, &launch_args)?;
    let hex = esvm::sev_launch::hex;
    eprintln!(
        "esvm: SEV-ES launch measurement {} (mnonce {})",
        hex(&info.measurement.measure),
        hex(&info.measurement.mnonce)
    );
    eprintln!(
        "esvm: SEV-ES launch digest {} (what `esvm owner verify --digest` checks)",
        hex(&info.digest)
    );
    if args.wait_for_secret {
        return Ok(Some(Arc::new(PendingLaunch::new(measured, info))));
    }
    esvm::sev_launch::finish(measured, &launch_args)?;
    Ok(None)
}

/// Run the machine as `esvm run` does (the launch, if it waits, first) and report its end.
fn session(
    name: &str,
    machine: &mut Machine,
    args: &RunArgs,
    launch: Option<Arc<PendingLaunch>>,
) -> Result<u8, Box<dyn std::error::Error>> {
    let opts = esvm::session::RunOptions {
        api_socket: args.api_socket.clone(),
        start_paused: args.start_paused,
        incoming_postcopy: None,
    };
    match launch {
        None => crate::cli::run_session(name, machine, &opts),
        Some(launch) => {
            let outcome = esvm::session::run_with_launch(machine, &opts, launch)?;
            Ok(crate::cli::report(name, &outcome))
        }
    }
}

/// Where COM1's input comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsoleSource {
    Stdin,
    None,
}

pub fn parse_console(s: &str) -> Result<ConsoleSource, String> {
    match s {
        "stdin" => Ok(ConsoleSource::Stdin),
        "none" => Ok(ConsoleSource::None),
        other => Err(format!("{other:?}: use 'stdin' or 'none'")),
    }
}

/// Feed COM1 from `source`. Returns the raw-mode guard of a terminal stdin: the terminal is
/// restored when it drops (at the end of the run, or when esvm exits on an error).
pub fn attach_console(
    machine: &mut Machine,
    source: ConsoleSource,
) -> Option<esvm::console::RawTerminal> {
    match source {
        ConsoleSource::None => None,
        ConsoleSource::Stdin => {
            let terminal = esvm::console::stdin_is_terminal();
            machine.attach_console(esvm::console::ConsoleInput::stdin(terminal));
            if terminal {
                eprintln!(
                    "esvm: the guest's console is this terminal; Ctrl-A x quits, Ctrl-A h helps"
                );
                esvm::console::RawTerminal::enter()
            } else {
                None
            }
        }
    }
}

#[derive(Debug, Error)]
pub enum LinuxRunError {
    #[error("cannot read the kernel {path}: {source}")]
    ReadKernel {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the initrd {path}: {source}")]
    ReadInitrd {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("guest arguments after `--` are for esvm's own guests; pass a kernel's parameters with --cmdline")]
    GuestArgs,
    #[error("{0}")]
    Unsupported(&'static str),
    #[error(
        "--mem {} is too small for an SEV-ES Linux guest: its kernel reserves at least 64 MiB \
         of shared memory as a bounce buffer for device I/O; give --mem {}M or more",
        format_size(*mem), MIN_SEV_LINUX_MEM >> 20
    )]
    SevMemTooSmall { mem: u64 },
}

/// `esvm run --kernel`: boot a Linux kernel.
fn run_linux(args: RunArgs) -> Result<u8, Box<dyn std::error::Error>> {
    let kernel_path = args
        .kernel
        .clone()
        .expect("run_linux is called with --kernel");
    if !args.guest_args.is_empty() {
        return Err(LinuxRunError::GuestArgs.into());
    }
    if args.backend != BackendKind::Emu {
        return Err(LinuxRunError::Unsupported(
            "--kernel runs on the emu backend only for now (drop --backend kvm)",
        )
        .into());
    }
    let kernel = std::fs::read(&kernel_path).map_err(|source| LinuxRunError::ReadKernel {
        path: kernel_path.clone(),
        source,
    })?;
    let initrd = match &args.initrd {
        Some(p) => Some(
            std::fs::read(p).map_err(|source| LinuxRunError::ReadInitrd {
                path: p.clone(),
                source,
            })?,
        ),
        None => None,
    };
    let mem_size = args.mem.unwrap_or(DEFAULT_LINUX_MEM);
    if args.sev_es && mem_size < MIN_SEV_LINUX_MEM {
        return Err(LinuxRunError::SevMemTooSmall { mem: mem_size }.into());
    }
    let config = MachineConfig {
        backend: args.backend,
        vm_type: if args.sev_es {
            esvm_hv::VmType::SevEs
        } else {
            esvm_hv::VmType::Plain
        },
        mem_size,
        vcpus: args.vcpus,
        max_instructions: args.max_instructions,
    };
    let mut machine = Machine::new(&config, Box::new(std::io::stdout())).map_err(RunError::from)?;
    machine.set_deterministic(args.deterministic);
    let name = kernel_path.display().to_string();
    let boot = machine
        .load_linux(&esvm_loader::linux::LinuxImage {
            name: &name,
            kernel: &kernel,
            initrd: initrd.as_deref(),
            cmdline: &args.cmdline,
        })
        .map_err(RunError::from)?;
    tracing::info!(kernel = %name, format = ?boot.format, protocol = boot.protocol,
                   mem = config.mem_size, "booting Linux");
    let launch = if args.sev_es {
        sev_launch(&mut machine, &boot.written_pages(), &args)?
    } else {
        None
    };
    let _raw = attach_console(&mut machine, args.console.unwrap_or(ConsoleSource::Stdin));
    session(&name, &mut machine, &args, launch)
}

/// `--policy`: the one policy parser (`esvm_psp::Policy::parse`), as `esvm owner session`.
fn parse_policy(s: &str) -> Result<u32, String> {
    Policy::parse(s).map(|p| p.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: RunArgs,
    }

    fn parse(argv: &[&str]) -> Result<RunArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("run").chain(argv.iter().copied())).map(|c| c.args)
    }

    #[test]
    fn policies_by_name_or_number() {
        let sev = ["--sev-es", "--platform", "p", "--policy"];
        let policy = |p: &str| {
            let argv: Vec<&str> = sev.iter().copied().chain([p]).collect();
            parse(&argv).map(|a| a.policy)
        };
        assert_eq!(policy("es,nosend").unwrap(), Some(0xc));
        assert_eq!(policy("ES,NODBG").unwrap(), Some(0x5));
        assert_eq!(policy("0x5").unwrap(), Some(0x5));
        assert_eq!(policy("4").unwrap(), Some(0x4));
        assert_eq!(policy("es,api=1.2").unwrap(), Some(0x0201_0004));
        let e = policy("es,fast").unwrap_err().to_string();
        assert!(e.contains("unknown policy flag \"fast\""), "{e}");
    }

    #[test]
    fn memory_sizes() {
        assert_eq!(parse(&["--mem", "64"]).unwrap().mem, Some(64 << 20));
        assert_eq!(parse(&["--mem", "1G"]).unwrap().mem, Some(1 << 30));
        let e = parse(&["--mem", "1M"]).unwrap_err().to_string();
        assert!(e.contains("1 MiB is too small"), "{e}");
        let e = LinuxRunError::SevMemTooSmall { mem: 128 << 20 }.to_string();
        assert!(e.starts_with("--mem 128 MiB is too small"), "{e}");
    }
}

/// `esvm restore` / `esvm receive`: how the vCPUs of the VM run from here on, if not as they
/// ran before (the saved or migrated state carries that choice).
#[derive(clap::Args, Debug, Clone, Copy, Default)]
pub struct SchedulingChoice {
    /// Run the VM's vCPUs in turns on one host thread from here on, as `esvm run
    /// --deterministic` does, whatever they did before: e.g. replay a snapshot taken of a
    /// parallel run exactly, as often as needed.
    #[arg(long, conflicts_with = "parallel")]
    pub deterministic: bool,
    /// Run the VM's vCPUs in parallel, a host thread each, from here on, even if it ran
    /// with --deterministic before.
    #[arg(long)]
    pub parallel: bool,
}

impl SchedulingChoice {
    /// Apply the choice, if one was made, to a restored or received machine.
    pub fn apply(self, machine: &mut Machine) {
        if self.deterministic {
            machine.set_deterministic(true);
        } else if self.parallel {
            machine.set_deterministic(false);
        }
    }
}
